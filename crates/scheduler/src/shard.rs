//! Data-parallel ranks: which requests each of N replicas runs, cut from one prepared workload.
//!
//! BlendServe's sharding walks the resource-aware order of the whole prefix tree (leaves from
//! compute-heavy to memory-heavy, every subtree contiguous), cuts it into `ranks x
//! segments_per_rank` contiguous segments of equal predicted demand (compute plus memory seconds,
//! each request with its share of the prefixes above it), and deals the segments to the ranks
//! in a snake (0, 1, .., N-1, N-1, .., 0, 0, ..), so every rank gets the same amount of work from
//! every part of the density range and prefix sharing is lost only where a cut falls inside a
//! shared prefix (at most one root-to-leaf path per cut). Small workloads get fewer segments (at
//! least 64 requests a segment, at least 2 segments a rank). Requests whose outputs outlast an
//! even rank's steps are first set apart on as few ranks as the cost model says finish soonest
//! ([`RankCutter`]): every step pays a pass over the weights, so a handful of long outputs spread
//! over every rank would make every rank that long. Round-robin (request i to rank i mod N, what
//! vLLM and SGLang's data parallelism does) is the baseline beside it.

use std::str::FromStr;

use prefix_tree::{resource_aware_order, Demand, OrderedRequest, RequestIndex, TreeLayout};

use crate::{PerfModel, Preparation, SchedulerError, StepCost};

/// How a workload is cut into ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Snake-dealt equal-demand segments of the resource-aware order (module docs); with
    /// `gather_long`, the long requests first set apart on the ranks the cost model picks.
    BlendServe {
        segments_per_rank: usize,
        gather_long: bool,
    },
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
            gather_long: true,
        }
    }
}

impl std::fmt::Display for Sharding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sharding::BlendServe {
                segments_per_rank,
                gather_long,
            } => {
                let name = if *gather_long {
                    "blendserve"
                } else {
                    "blendserve-spread"
                };
                write!(f, "{name}:{segments_per_rank}")
            }
            Sharding::RoundRobin => write!(f, "round-robin"),
        }
    }
}

impl FromStr for Sharding {
    type Err = SchedulerError;

    /// `blendserve[:SEGMENTS_PER_RANK]`, `blendserve-spread[:SEGMENTS_PER_RANK]` (every rank
    /// gets its share of the long requests: the ablation of gathering them) or `round-robin`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "round-robin" {
            return Ok(Sharding::RoundRobin);
        }
        let (name, segments) = match s.split_once(':') {
            Some((name, n)) => (name, n.parse().ok().filter(|&n: &usize| n > 0)),
            None => (s, Some(Sharding::DEFAULT_SEGMENTS_PER_RANK)),
        };
        let gather_long = match name {
            "blendserve" => Some(true),
            "blendserve-spread" => Some(false),
            _ => None,
        };
        match (gather_long, segments) {
            (Some(gather_long), Some(segments_per_rank)) => Ok(Sharding::BlendServe {
                segments_per_rank,
                gather_long,
            }),
            _ => Err(SchedulerError::Config(format!(
                "unknown sharding `{s}` (blendserve, blendserve-spread, each with an optional \
                 :SEGMENTS_PER_RANK, or round-robin)"
            ))),
        }
    }
}

/// Each rank's requests, in submission order, for `ranks` ranks (at least 1) of the workload
/// `preparation` was made for, each rank given an even share of the demand.
pub fn shard(
    preparation: &Preparation,
    ranks: usize,
    sharding: Sharding,
    perf: &PerfModel,
    max_batch_tokens: u32,
) -> Vec<Vec<RequestIndex>> {
    let cutter = RankCutter::new(preparation, perf, ranks, sharding, max_batch_tokens);
    cutter.cut(&cutter.even_shares())
}

/// One workload's cut into ranks, prepared once and made with any shares of the demand.
///
/// BlendServe's sharding also keeps the *long* requests (those whose estimated output alone
/// outlasts the steps an even rank's tokens need, `ceil(tokens / ranks / max_batch_tokens)`)
/// on the number of ranks a small roofline model predicts finishes soonest (`TailModel`; with
/// `gather_long: false`, on every rank). Every rank pays one pass over the weights per step and
/// a rank holding a long request runs at least its output's steps, so spreading a few long
/// outputs over all ranks makes every rank that long; gathered on `tail_ranks` ranks, the
/// others finish their share in fewer, fuller steps. The rest is dealt in snake-ordered
/// segments over all ranks, the tail ranks taking less of it.
pub struct RankCutter<'p> {
    preparation: &'p Preparation,
    ranks: usize,
    sharding: Sharding,
    order: Vec<OrderedRequest>,
    long: Vec<bool>,
    tail_ranks: usize,
    even_shares: Vec<f64>,
}

impl<'p> RankCutter<'p> {
    pub fn new(
        preparation: &'p Preparation,
        perf: &PerfModel,
        ranks: usize,
        sharding: Sharding,
        max_batch_tokens: u32,
    ) -> Self {
        let ranks = ranks.max(1);
        let n = preparation.tree.requests();
        let order = match sharding {
            Sharding::RoundRobin => Vec::new(),
            Sharding::BlendServe { .. } => {
                let layout = TreeLayout::unsplit(&preparation.tree, &preparation.annotation);
                resource_aware_order(&preparation.tree, &preparation.annotation, &layout)
            }
        };
        let outputs = &preparation.estimated_output_tokens;
        let tokens = preparation.tree.unique_prompt_tokens() as f64
            + outputs.iter().map(|&o| f64::from(o)).sum::<f64>();
        let rank_steps = (tokens / ranks as f64 / f64::from(max_batch_tokens.max(1))).ceil();
        let long: Vec<bool> = outputs.iter().map(|&o| f64::from(o) > rank_steps).collect();
        let gather_long = matches!(
            sharding,
            Sharding::BlendServe {
                gather_long: true,
                ..
            }
        );
        let model = TailModel::new(&order, &long, outputs, perf);
        let tail_ranks = if gather_long {
            model.best_ranks(ranks)
        } else {
            ranks
        };
        let (long, even_shares) = if tail_ranks < ranks {
            (long, model.shares(ranks, tail_ranks))
        } else {
            (vec![false; n], vec![1.0; ranks])
        };
        RankCutter {
            preparation,
            ranks,
            sharding,
            order,
            long,
            tail_ranks,
            even_shares,
        }
    }

    /// Ranks that hold the long requests (all of them when none are set apart).
    pub fn tail_ranks(&self) -> usize {
        self.tail_ranks
    }

    /// Long requests set apart on the tail ranks.
    pub fn long_requests(&self) -> usize {
        self.long.iter().filter(|&&l| l).count()
    }

    /// Each rank's share of the rest for equal predicted times: the tail ranks take what the
    /// cost model says fits beside their long requests by the common time (all equal where no
    /// requests are set apart).
    pub fn even_shares(&self) -> Vec<f64> {
        self.even_shares.clone()
    }

    /// Each rank's requests in submission order, rank `r` given a `shares[r] / sum(shares)`
    /// part of every round of the rest's segments (round-robin ignores the shares).
    pub fn cut(&self, shares: &[f64]) -> Vec<Vec<RequestIndex>> {
        let ranks = self.ranks;
        let n = self.preparation.tree.requests();
        let mut out = vec![Vec::new(); ranks];
        let Sharding::BlendServe {
            segments_per_rank, ..
        } = self.sharding
        else {
            for r in 0..n {
                out[r % ranks].push(r as RequestIndex);
            }
            return out;
        };
        let (long, rest): (Vec<&OrderedRequest>, Vec<&OrderedRequest>) = self
            .order
            .iter()
            .partition(|o| self.long[o.request as usize]);
        let tail = vec![1.0; self.tail_ranks];
        let long_rounds = segments_per_rank_for(long.len(), self.tail_ranks, segments_per_rank);
        deal(&long, &tail, long_rounds, &mut out);
        let mut shares: Vec<f64> = (0..ranks)
            .map(|r| shares.get(r).copied().unwrap_or(1.0))
            .collect();
        if shares.iter().all(|s| *s <= 0.0) {
            shares = vec![1.0; ranks];
        }
        let rounds = segments_per_rank_for(rest.len(), ranks, segments_per_rank);
        deal(&rest, &shares, rounds, &mut out);
        for rank in &mut out {
            rank.sort_unstable();
        }
        out
    }
}

/// The demand of the long requests and of the rest, priced by the roofline and power model, to
/// choose how many ranks hold the long ones: a tail rank holds `1/k` of the long demand plus one
/// pass over the weights for each step of the longest output, and as much of the rest as keeps
/// it at the common time `T`; the other ranks take the rest at `T`; `k` is the one with the
/// least `T`.
struct TailModel<'a> {
    perf: &'a PerfModel,
    long: Demand,
    rest: Demand,
    /// Memory seconds of one weight pass per step of the longest long output.
    tail_weight_secs: f64,
}

impl<'a> TailModel<'a> {
    fn new(order: &[OrderedRequest], long: &[bool], outputs: &[u32], perf: &'a PerfModel) -> Self {
        let (mut long_demand, mut rest) = (Demand::ZERO, Demand::ZERO);
        let mut longest = 0u32;
        for o in order {
            if long[o.request as usize] {
                long_demand += o.demand;
                longest = longest.max(outputs[o.request as usize]);
            } else {
                rest += o.demand;
            }
        }
        let h = &perf.hardware;
        TailModel {
            perf,
            long: long_demand,
            rest,
            tail_weight_secs: f64::from(longest) * perf.model.weight_bytes_per_step() as f64
                / h.effective_bytes_per_sec(),
        }
    }

    /// Seconds one rank takes for `compute_secs` and `memory_secs` of work, priced by the
    /// performance model as one compute-bound and one memory-bound operator (each at its
    /// roofline and its energy's floor, combined as the executor combines a step's).
    fn secs(&self, compute_secs: f64, memory_secs: f64) -> f64 {
        let h = &self.perf.hardware;
        self.perf
            .time(&StepCost {
                gemm_flops: compute_secs * h.effective_flops(),
                decode_kv_bytes: memory_secs * h.effective_bytes_per_sec(),
                ..StepCost::default()
            })
            .secs
    }

    /// The largest fraction of the rest a rank holding `fixed` (and the weight passes
    /// `weight_secs`) can take within `target` seconds (0 if even the fixed part takes longer).
    fn fraction_within(&self, fixed: Demand, weight_secs: f64, target: f64) -> f64 {
        let at = |x: f64| {
            self.secs(
                fixed.compute_secs + x * self.rest.compute_secs,
                fixed.memory_secs + weight_secs + x * self.rest.memory_secs,
            )
        };
        if at(0.0) > target {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, 1.0);
        if at(hi) <= target {
            return hi;
        }
        for _ in 0..50 {
            let mid = (lo + hi) / 2.0;
            if at(mid) <= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The common time of `ranks` ranks when `k` of them hold the long requests (at least the
    /// time of a tail rank's long share alone).
    fn makespan_secs(&self, ranks: usize, k: usize) -> f64 {
        let share = self.tail_share(k);
        let taken = |target: f64| {
            k as f64 * self.fraction_within(share, self.tail_weight_secs, target)
                + (ranks - k) as f64 * self.fraction_within(Demand::ZERO, 0.0, target)
        };
        let mut hi = self.secs(
            self.long.compute_secs + self.rest.compute_secs,
            self.long.memory_secs + self.rest.memory_secs + self.tail_weight_secs,
        );
        // No rank finishes before the long share it holds.
        let mut lo = self.secs(
            share.compute_secs,
            share.memory_secs + self.tail_weight_secs,
        );
        if taken(lo) >= 1.0 {
            return lo;
        }
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if taken(mid) >= 1.0 {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }

    /// Each rank's fraction of the rest when the first `k` of `ranks` hold the long requests:
    /// what fits each by the common time.
    fn shares(&self, ranks: usize, k: usize) -> Vec<f64> {
        let target = self.makespan_secs(ranks, k);
        let tail = self.fraction_within(self.tail_share(k), self.tail_weight_secs, target);
        let other = self.fraction_within(Demand::ZERO, 0.0, target);
        let sum = k as f64 * tail + (ranks - k) as f64 * other;
        if sum <= 0.0 {
            return vec![1.0; ranks];
        }
        (0..ranks)
            .map(|r| if r < k { tail / sum } else { other / sum })
            .collect()
    }

    /// One of `k` tail ranks' part of the long demand, at the tail's efficiency.
    fn tail_share(&self, k: usize) -> Demand {
        Demand::new(
            self.long.compute_secs / k as f64,
            self.long.memory_secs / k as f64 / TAIL_EFFICIENCY,
        )
    }

    /// Ranks that should hold the long requests: the most whose predicted makespan is within
    /// [`TAIL_TIE`] of the best, all of them when there are none.
    fn best_ranks(&self, ranks: usize) -> usize {
        if self.long.compute_secs + self.long.memory_secs <= 0.0 || ranks == 1 {
            return ranks;
        }
        let times: Vec<f64> = (1..=ranks).map(|k| self.makespan_secs(ranks, k)).collect();
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        tracing::debug!("tail ranks: predicted makespans {times:?} for 1..={ranks}");
        (1..=ranks)
            .rev()
            .find(|&k| times[k - 1] <= best * (1.0 + TAIL_TIE))
            .unwrap_or(ranks)
    }
}

/// The share of its demand's speed a rank's long requests run at: in the simulator, ranks
/// holding long requests end at 90-96% of their bounds where ranks without reach 99% (long
/// decodes grow their KV reads step by step, so a rank's mix with the rest is uneven over time).
const TAIL_EFFICIENCY: f64 = 0.9;

/// Predicted makespans this close (fraction) count as equal, and the most tail ranks among them
/// is taken: more tail ranks keep more ranks at the workload's mix.
const TAIL_TIE: f64 = 0.01;

/// What a request weighs in a cut: its compute plus memory seconds.
fn weight(d: prefix_tree::Demand) -> f64 {
    d.compute_secs + d.memory_secs
}

/// Deals `order` (resource-aware order) to ranks `0..shares.len()` of `out`: `rounds` contiguous
/// rounds of equal demand, each split among the ranks by `shares` in snake order (0..N-1 in
/// even rounds, N-1..0 in odd ones).
fn deal(order: &[&OrderedRequest], shares: &[f64], rounds: usize, out: &mut [Vec<RequestIndex>]) {
    let ranks = shares.len();
    let total: f64 = order.iter().map(|o| weight(o.demand)).sum();
    let share_sum: f64 = shares.iter().map(|s| s.max(0.0)).sum::<f64>().max(1e-12);
    let round = total / rounds as f64;
    let mut done = 0.0;
    for o in order {
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
            let piece = shares[r].max(0.0);
            if at < piece {
                rank = r;
                break;
            }
            at -= piece;
            rank = r;
        }
        out[rank].push(o.request);
    }
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

    fn perf() -> PerfModel {
        PerfModel::new(
            ModelConfig::preset("llama3-8b").unwrap(),
            HardwareConfig::preset("h100").unwrap(),
            Executor::Sequential,
        )
    }

    fn preparation(w: &Workload) -> Preparation {
        Preparation::new(w, &perf(), LengthKnowledge::Known, 1)
    }

    #[test]
    fn every_request_goes_to_exactly_one_rank() {
        let w = workload();
        let p = preparation(&w);
        for sharding in [Sharding::default(), Sharding::RoundRobin] {
            for ranks in [1, 2, 3, 8] {
                let shards = shard(&p, ranks, sharding, &perf(), 8192);
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
        let shards = shard(&p, ranks, Sharding::default(), &perf(), 8192);
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
        let rr = shard(&p, ranks, Sharding::RoundRobin, &perf(), 8192);
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
        let shards = RankCutter::new(&p, &perf(), 2, Sharding::default(), 8192).cut(&[2.0, 1.0]);
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

    /// Compute-heavy requests with unshared prompts and short answers, and `long` requests with
    /// short prompts and known outputs of `long_output` tokens.
    fn with_long_outputs(long: u32, long_output: u32) -> Workload {
        let chunk = |content_id: u64, len_tokens: u32| Chunk {
            content_id,
            len_tokens,
        };
        let mut requests: Vec<Request> = (0..600u32)
            .map(|i| Request {
                id: format!("short-{i}"),
                prompt: vec![chunk(u64::from(i) + 1, 2000)],
                max_tokens: 64,
                output_tokens: Some(8),
                output_known: false,
                source: 0,
            })
            .collect();
        for i in 0..long {
            requests.push(Request {
                id: format!("long-{i}"),
                prompt: vec![chunk(10_000 + u64::from(i), 100)],
                max_tokens: long_output,
                output_tokens: Some(long_output),
                output_known: true,
                source: 1,
            });
        }
        Workload {
            requests,
            sources: vec!["short".into(), "long".into()],
        }
    }

    fn overlapped() -> PerfModel {
        PerfModel::new(
            ModelConfig::preset("llama3-8b").unwrap(),
            HardwareConfig::preset("h200").unwrap(),
            Executor::Overlapped,
        )
    }

    /// A few long outputs go to fewer ranks than all (each rank that holds one runs its output's
    /// steps, each step a pass over the weights); the cut is still complete and the other ranks
    /// get none of them.
    #[test]
    fn long_outputs_gather_on_fewer_ranks() {
        let w = with_long_outputs(12, 6000);
        let perf = overlapped();
        let p = Preparation::new(
            &w,
            &perf,
            LengthKnowledge::Sampled {
                fraction: 0.01,
                min_samples: 64,
                min_node_samples: 4,
            },
            1,
        );
        let cutter = RankCutter::new(&p, &perf, 4, Sharding::default(), 8192);
        assert_eq!(cutter.long_requests(), 12);
        let tail = cutter.tail_ranks();
        assert!((1..4).contains(&tail), "{tail}");
        let shards = cutter.cut(&cutter.even_shares());
        let mut all: Vec<RequestIndex> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, (0..w.len() as RequestIndex).collect::<Vec<_>>());
        for (rank, ids) in shards.iter().enumerate() {
            let longs = ids.iter().filter(|&&r| r >= 600).count();
            if rank < tail {
                assert!(
                    longs >= 12 / tail - 1,
                    "rank {rank}: {longs} long of {shards:?}"
                );
            } else {
                assert_eq!(longs, 0, "rank {rank}");
                assert!(!ids.is_empty(), "rank {rank} got nothing");
            }
        }
        // The tail ranks take less of the rest than the others.
        let shares = cutter.even_shares();
        assert!(shares[0] < shares[3], "{shares:?}");
    }

    /// Where long outputs are most of the work, every rank holds some: no rank can take more.
    #[test]
    fn long_outputs_that_are_the_work_spread_over_every_rank() {
        let w = with_long_outputs(400, 6000);
        let perf = overlapped();
        let p = Preparation::new(&w, &perf, LengthKnowledge::Known, 1);
        let cutter = RankCutter::new(&p, &perf, 4, Sharding::default(), 8192);
        assert_eq!(cutter.tail_ranks(), 4);
        assert_eq!(cutter.long_requests(), 0);
    }

    #[test]
    fn shardings_parse_and_print() {
        for s in [
            Sharding::default(),
            Sharding::RoundRobin,
            Sharding::BlendServe {
                segments_per_rank: 3,
                gather_long: false,
            },
        ] {
            assert_eq!(s.to_string().parse::<Sharding>().unwrap(), s);
        }
        assert_eq!(
            "blendserve-spread".parse::<Sharding>().unwrap(),
            Sharding::BlendServe {
                segments_per_rank: 32,
                gather_long: false
            }
        );
        assert!("blendserve:0".parse::<Sharding>().is_err());
        assert!("blendserve-spread:x".parse::<Sharding>().is_err());
        assert!("hash".parse::<Sharding>().is_err());
    }
}
