//! Data-parallel ranks: which requests each of N replicas runs, cut from one prepared workload.
//!
//! BlendServe's sharding walks the resource-aware order of the whole prefix tree (leaves from
//! compute-heavy to memory-heavy, every subtree contiguous), cuts it into `ranks x
//! segments_per_rank` contiguous segments of equal predicted demand (compute plus memory seconds,
//! each request with its share of the prefixes above it), and deals the segments to the ranks
//! in a snake (0, 1, .., N-1, N-1, .., 0, 0, ..), so every rank gets the same amount of work from
//! every part of the density range and prefix sharing is lost only where a cut falls inside a
//! shared prefix (at most one root-to-leaf path per cut). Small workloads get fewer segments (at
//! least 64 requests a segment, at least 2 segments a rank). Round-robin (request i to rank i mod
//! N, what vLLM and SGLang's data parallelism does) is the baseline beside it.

use std::str::FromStr;

use prefix_tree::{resource_aware_order, RequestIndex, TreeLayout};

use crate::{Preparation, SchedulerError};

/// How a workload is cut into ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Snake-dealt equal-demand segments of the resource-aware order (module docs).
    BlendServe { segments_per_rank: usize },
    /// Request i to rank i mod N.
    RoundRobin,
}

impl Sharding {
    /// Segments a rank gets by default: enough that every rank's share of each density range
    /// is within a segment's demand of the others', few enough that cuts cost little sharing.
    pub const DEFAULT_SEGMENTS_PER_RANK: usize = 32;
}

impl Default for Sharding {
    fn default() -> Self {
        Sharding::BlendServe {
            segments_per_rank: Sharding::DEFAULT_SEGMENTS_PER_RANK,
        }
    }
}

impl std::fmt::Display for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sharding::BlendServe { segments_per_rank } => {
                write!(f, "blendserve:{segments_per_rank}")
            }
            Sharding::RoundRobin => write!(f, "round-robin"),
        }
    }
}

impl FromStr for Sharding {
    type Err = SchedulerError;

    /// `blendserve`, `blendserve:SEGMENTS_PER_RANK` or `round-robin`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blendserve" => Ok(Sharding::default()),
            "round-robin" => Ok(Sharding::RoundRobin),
            other => other
                .strip_prefix("blendserve:")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .map(|segments_per_rank| Sharding::BlendServe { segments_per_rank })
                .ok_or_else(|| {
                    SchedulerError::Config(format!(
                        "unknown sharding `{other}` (blendserve, blendserve:SEGMENTS_PER_RANK, \
                         round-robin)"
                    ))
                }),
        }
    }
}

/// Each rank's requests, in submission order, for `ranks` ranks (at least 1) of the workload
/// `preparation` was made for.
pub fn shard(
    preparation: &Preparation,
    ranks: usize,
    sharding: Sharding,
) -> Vec<Vec<RequestIndex>> {
    shard_weighted(preparation, &vec![1.0; ranks.max(1)], sharding)
}

/// [`shard`] with rank `r` given a `shares[r] / sum(shares)` part of every round of segments
/// (BlendServe's sharding; round-robin ignores the shares): a second pass can give a rank that
/// ran slow per unit of demand less of it.
pub fn shard_weighted(
    preparation: &Preparation,
    shares: &[f64],
    sharding: Sharding,
) -> Vec<Vec<RequestIndex>> {
    let ranks = shares.len().max(1);
    let n = preparation.tree.requests();
    let mut out = vec![Vec::new(); ranks];
    match sharding {
        Sharding::RoundRobin => {
            for r in 0..n {
                out[r % ranks].push(r as RequestIndex);
            }
        }
        Sharding::BlendServe { segments_per_rank } => {
            let layout = TreeLayout::unsplit(&preparation.tree, &preparation.annotation);
            let order = resource_aware_order(&preparation.tree, &preparation.annotation, &layout);
            let weight = |d: prefix_tree::Demand| d.compute_secs + d.memory_secs;
            let total: f64 = order.iter().map(|o| weight(o.demand)).sum();
            let rounds = segments_per_rank_for(n, ranks, segments_per_rank);
            // Within a round, rank r's segment is its share of the round's demand; the ranks
            // come in snake order (0..N-1 in even rounds, N-1..0 in odd ones).
            let share_sum: f64 = shares.iter().map(|s| s.max(0.0)).sum::<f64>().max(1e-12);
            let round = total / rounds as f64;
            let mut done = 0.0;
            for o in &order {
                // Where this request's midpoint falls: round, then the rank whose piece holds it.
                let mid = done + weight(o.demand) / 2.0;
                done += weight(o.demand);
                let k = if total > 0.0 {
                    ((mid / round) as usize).min(rounds - 1)
                } else {
                    0
                };
                let mut at = (mid - k as f64 * round) / round * share_sum;
                let mut rank = ranks - 1;
                for slot in 0..ranks {
                    let r = snake_rank(k * ranks + slot, ranks);
                    let piece = shares.get(r).copied().unwrap_or(1.0).max(0.0);
                    if at < piece {
                        rank = r;
                        break;
                    }
                    at -= piece;
                    rank = r;
                }
                out[rank].push(o.request);
            }
            for rank in &mut out {
                rank.sort_unstable();
            }
        }
    }
    out
}

/// Fewest requests a segment should hold: smaller segments cut more prefix groups than they
/// even out.
const MIN_SEGMENT_REQUESTS: usize = 64;

/// Segments a rank of `n` requests over `ranks` ranks gets: `wanted`, fewer where segments would
/// hold under [`MIN_SEGMENT_REQUESTS`], and never under 2 (one from each half of the density
/// range, so every rank keeps the mix).
fn segments_per_rank_for(n: usize, ranks: usize, wanted: usize) -> usize {
    (n / (ranks * MIN_SEGMENT_REQUESTS)).clamp(2, wanted.max(2))
}

/// The rank segment `segment` goes to when dealt in a snake over `ranks` ranks.
fn snake_rank(segment: usize, ranks: usize) -> usize {
    let (round, at) = (segment / ranks, segment % ranks);
    if round % 2 == 0 {
        at
    } else {
        ranks - 1 - at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Executor, HardwareConfig, LengthKnowledge, ModelConfig, PerfModel};
    use workload::{Chunk, Request, Workload};

    fn workload() -> Workload {
        // 40 prefix groups of 5 requests; prompt and output lengths spread so densities differ.
        let mut requests = Vec::new();
        for g in 0..40u32 {
            for k in 0..5u32 {
                let chunk = |content_id: u64, len_tokens: u32| Chunk {
                    content_id,
                    len_tokens,
                };
                requests.push(Request {
                    id: format!("g{g}-{k}"),
                    prompt: vec![
                        chunk(u64::from(g) + 1, 256 + 128 * (g % 7)),
                        chunk(1000 + u64::from(g * 5 + k), 8 + 32 * (k % 3)),
                    ],
                    max_tokens: 2048,
                    output_tokens: Some(16 + 200 * ((g + k) % 5)),
                    output_known: false,
                    source: 0,
                });
            }
        }
        Workload {
            requests,
            sources: vec!["test".into()],
        }
    }

    fn preparation(w: &Workload) -> Preparation {
        let perf = PerfModel::new(
            ModelConfig::preset("llama3-8b").unwrap(),
            HardwareConfig::preset("h100").unwrap(),
            Executor::Sequential,
        );
        Preparation::new(w, &perf, LengthKnowledge::Known, 1)
    }

    #[test]
    fn every_request_goes_to_exactly_one_rank() {
        let w = workload();
        let p = preparation(&w);
        for sharding in [Sharding::default(), Sharding::RoundRobin] {
            for ranks in [1, 2, 3, 8] {
                let shards = shard(&p, ranks, sharding);
                assert_eq!(shards.len(), ranks);
                let mut all: Vec<RequestIndex> = shards.concat();
                all.sort_unstable();
                assert_eq!(all, (0..w.len() as RequestIndex).collect::<Vec<_>>());
                assert!(shards.iter().all(|s| s.windows(2).all(|x| x[0] < x[1])));
            }
        }
    }

    /// BlendServe's ranks carry equal demand and the same density mix; its cuts split fewer
    /// prefix groups than round-robin's.
    #[test]
    fn blendserve_ranks_are_balanced_and_keep_groups_together() {
        let w = workload();
        let p = preparation(&w);
        let ranks = 4;
        let demand = |ids: &[RequestIndex]| {
            ids.iter().fold((0.0, 0.0), |(c, m), &r| {
                let d = p.annotation.attributed[r as usize];
                (c + d.compute_secs, m + d.memory_secs)
            })
        };
        let shards = shard(&p, ranks, Sharding::default());
        let sums: Vec<(f64, f64)> = shards.iter().map(|s| demand(s)).collect();
        let mean = sums.iter().map(|s| s.0 + s.1).sum::<f64>() / ranks as f64;
        for s in &sums {
            assert!(((s.0 + s.1) / mean - 1.0).abs() < 0.1, "{sums:?}");
        }
        let densities: Vec<f64> = sums.iter().map(|s| s.0 / s.1).collect();
        let (lo, hi) = densities
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), &d| (l.min(d), h.max(d)));
        assert!(hi / lo < 1.3, "{densities:?}");
        // Prefix groups split across ranks.
        let split_groups = |shards: &[Vec<RequestIndex>]| {
            (0..40)
                .filter(|g| {
                    let owners: std::collections::HashSet<usize> = (0..5)
                        .map(|k| {
                            shards
                                .iter()
                                .position(|s| s.contains(&(g * 5 + k)))
                                .unwrap()
                        })
                        .collect();
                    owners.len() > 1
                })
                .count()
        };
        let rr = shard(&p, ranks, Sharding::RoundRobin);
        assert!(
            split_groups(&shards) < split_groups(&rr) / 2,
            "{} vs {}",
            split_groups(&shards),
            split_groups(&rr)
        );
    }

    /// A rank with twice the share gets about twice the demand.
    #[test]
    fn shares_scale_a_ranks_demand() {
        let w = workload();
        let p = preparation(&w);
        let shards = shard_weighted(&p, &[2.0, 1.0], Sharding::default());
        let demand = |ids: &[RequestIndex]| -> f64 {
            ids.iter()
                .map(|&r| {
                    let d = p.annotation.attributed[r as usize];
                    d.compute_secs + d.memory_secs
                })
                .sum()
        };
        let ratio = demand(&shards[0]) / demand(&shards[1]);
        assert!((ratio - 2.0).abs() < 0.3, "{ratio}");
    }

    #[test]
    fn shardings_parse_and_print() {
        for s in [
            Sharding::default(),
            Sharding::RoundRobin,
            Sharding::BlendServe {
                segments_per_rank: 3,
            },
        ] {
            assert_eq!(s.to_string().parse::<Sharding>().unwrap(), s);
        }
        assert!("blendserve:0".parse::<Sharding>().is_err());
        assert!("hash".parse::<Sharding>().is_err());
    }
}
