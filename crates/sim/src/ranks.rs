//! Data-parallel ranks in the simulator: a workload cut into N shards ([`scheduler::shard()`]),
//! each simulated as its own replica under the same policy and configuration, against the
//! single-rank run. The makespan of N ranks is their slowest rank's.

use prefix_tree::RequestIndex;
use scheduler::{PolicyKind, RankCutter, Sharding};
use serde::Serialize;
use workload::Workload;

use crate::{SimConfig, SimError, SimReport, Simulation};

/// One sharding of one workload over N ranks, simulated.
#[derive(Clone, Debug, Serialize)]
pub struct RanksReport {
    pub sharding: String,
    pub ranks: usize,
    pub policy: String,
    /// Each rank's report, rank order.
    pub per_rank: Vec<SimReport>,
    /// The slowest rank's makespan.
    pub makespan_secs: f64,
    /// The single-rank run's makespan over this one's.
    pub speedup: f64,
    /// Largest |rank makespan / mean - 1|.
    pub spread: f64,
    /// Prompt tokens served from the prefix cache summed over ranks, over the single-rank run's.
    pub prefix_hits_kept: f64,
    /// Cuts simulated: 1, plus one for each rebalancing pass.
    pub passes: usize,
    /// Ranks holding the long requests (all ranks where none were set apart).
    pub tail_ranks: usize,
    /// The kept cut: each rank's requests, submission order.
    #[serde(skip)]
    pub shards: Vec<Vec<RequestIndex>>,
}

/// Rebalancing passes after the first cut (BlendServe's sharding): each gives the ranks the
/// shares of the demand that their times so far say make them even ([`next_shares`]); of the
/// cuts within 0.5% of the fastest, the most even is kept (`keep_cut`).
pub const REBALANCE_PASSES: usize = 6;

/// One line of a ranks table or CSV (`sim --ranks`, the experiments' figure).
#[derive(Clone, Debug, Serialize)]
pub struct RanksRow {
    pub workload: String,
    pub requests: usize,
    pub policy: String,
    pub executor: String,
    pub sharding: String,
    pub ranks: usize,
    pub makespan_secs: f64,
    pub speedup: f64,
    /// Largest |rank time / mean - 1|.
    pub spread: f64,
    pub prefix_hits_kept: f64,
    pub passes: usize,
    pub tail_ranks: usize,
    /// Each rank's makespan, seconds.
    pub rank_secs: String,
    /// Each rank's percent of its own optimal bound.
    pub rank_percent_of_optimal: String,
}

impl RanksReport {
    /// This report as a row, for `workload` of `requests` requests under `executor`.
    pub fn row(&self, workload: &str, requests: usize, executor: &str) -> RanksRow {
        RanksRow {
            workload: workload.to_string(),
            requests,
            policy: self.policy.clone(),
            executor: executor.to_string(),
            sharding: self.sharding.clone(),
            ranks: self.ranks,
            makespan_secs: self.makespan_secs,
            speedup: self.speedup,
            spread: self.spread,
            prefix_hits_kept: self.prefix_hits_kept,
            passes: self.passes,
            tail_ranks: self.tail_ranks,
            rank_secs: self.rank_secs_text(),
            rank_percent_of_optimal: self.rank_percent_of_optimal_text(),
        }
    }

    /// Each rank's makespan, seconds, space-separated (for a table or CSV cell).
    pub fn rank_secs_text(&self) -> String {
        self.per_rank
            .iter()
            .map(|p| format!("{:.1}", p.makespan_secs))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Each rank's percent of its own optimal bound, space-separated.
    pub fn rank_percent_of_optimal_text(&self) -> String {
        self.per_rank
            .iter()
            .map(|p| format!("{:.0}", p.percent_of_optimal))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The requests of `w` at `ids` (submission order kept), as a workload of their own.
pub fn sub_workload(w: &Workload, ids: &[RequestIndex]) -> Workload {
    Workload {
        requests: ids
            .iter()
            .map(|&i| w.requests[i as usize].clone())
            .collect(),
        sources: w.sources.clone(),
    }
}

/// The slowest rank's makespan.
fn slowest(ranks: &[SimReport]) -> f64 {
    ranks.iter().map(|r| r.makespan_secs).fold(0.0, f64::max)
}

/// Largest |rank makespan / mean - 1|.
fn spread(ranks: &[SimReport]) -> f64 {
    let mean = ranks.iter().map(|r| r.makespan_secs).sum::<f64>() / ranks.len().max(1) as f64;
    ranks
        .iter()
        .map(|r| (r.makespan_secs / mean - 1.0).abs())
        .fold(0.0, f64::max)
}

/// Of the passes' cuts, the most even among those whose slowest rank is within
/// [`KEEP_WITHIN`] of the fastest cut's: a rank that finishes early costs nothing, but a cut as
/// fast and more even is the better plan.
fn keep_cut(cuts: Vec<(Shards, Vec<SimReport>)>) -> (Shards, Vec<SimReport>) {
    let best = cuts
        .iter()
        .map(|(_, c)| slowest(c))
        .fold(f64::INFINITY, f64::min);
    cuts.into_iter()
        .filter(|(_, c)| slowest(c) <= best * (1.0 + KEEP_WITHIN))
        .min_by(|(_, a), (_, b)| spread(a).total_cmp(&spread(b)))
        .unwrap_or_default()
}

/// Each rank's requests.
type Shards = Vec<Vec<RequestIndex>>;

/// How much slower than the fastest cut a more even one may be and still be kept.
const KEEP_WITHIN: f64 = 0.005;

/// `shares` scaled to sum to 1.
fn fractions(shares: &[f64]) -> Vec<f64> {
    let sum: f64 = shares.iter().map(|s| s.max(0.0)).sum::<f64>().max(1e-12);
    shares.iter().map(|s| s.max(0.0) / sum).collect()
}

/// The shares (fractions of the rest) that make the ranks' times even, from the passes so far
/// (each its fractions and the ranks' times): rank `r`'s time is modelled as `a + b x` in its
/// fraction `x`, fitted through its last two passes, or as proportional (`a = 0`) after one pass
/// or where the two fractions barely differ. A rank's fixed part `a` is what it holds outside
/// the shares (the long requests of a tail rank), which a proportional step would ignore and
/// overshoot by. Every rank's slope is the time of the same rest on the same hardware, so slopes
/// are kept within [1/4, 4] of an even rank's (mean time x ranks) against noise from whole
/// segments.
fn next_shares(history: &[(Vec<f64>, Vec<f64>)]) -> Vec<f64> {
    let Some((x1, t1)) = history.last() else {
        return Vec::new();
    };
    let previous = history.len().checked_sub(2).map(|k| &history[k]);
    let ranks = x1.len();
    let mean_time = t1.iter().sum::<f64>() / ranks.max(1) as f64;
    let mean_slope = mean_time * ranks as f64;
    let lines: Vec<(f64, f64)> = (0..ranks)
        .map(|r| {
            let proportional = if x1[r] > 1e-9 {
                t1[r] / x1[r]
            } else {
                mean_slope
            };
            let fitted = previous.and_then(|(x0, t0)| {
                let dx = x1[r] - x0[r];
                (dx.abs() > 1e-3 * x1[r].max(x0[r])).then(|| (t1[r] - t0[r]) / dx)
            });
            let b = fitted
                .unwrap_or(proportional)
                .clamp(mean_slope / 4.0, mean_slope * 4.0);
            (t1[r] - b * x1[r], b)
        })
        .collect();
    // Equal time T with the fractions summing to 1; a rank whose fixed part alone exceeds T
    // gets none and the others are solved again.
    let mut open: Vec<bool> = vec![true; ranks];
    let mut shares = vec![0.0; ranks];
    for _ in 0..ranks {
        let (mut inverse, mut offset) = (0.0, 0.0);
        for (r, &(a, b)) in lines.iter().enumerate() {
            if open[r] {
                inverse += 1.0 / b;
                offset += a / b;
            }
        }
        let target = (1.0 + offset) / inverse.max(1e-12);
        let mut closed = false;
        for (r, &(a, b)) in lines.iter().enumerate() {
            if open[r] && target < a {
                open[r] = false;
                closed = true;
            }
            shares[r] = if open[r] { (target - a) / b } else { 0.0 };
        }
        if !closed {
            break;
        }
    }
    shares
}

/// Prompt tokens a report served from the prefix cache.
fn hit_tokens(r: &SimReport) -> f64 {
    r.prefix_hit_ratio * r.prompt_tokens as f64
}

/// Simulates `kind` on `ranks` shards of `workload` cut by `sharding` (the cut uses `single`'s
/// preparation) and compares with `single_report`, the single-rank run of the same policy.
pub fn simulate_ranks(
    workload: &Workload,
    single: &Simulation<'_>,
    single_report: &SimReport,
    config: &SimConfig,
    (name, kind): (&str, &PolicyKind),
    ranks: usize,
    sharding: Sharding,
) -> Result<RanksReport, SimError> {
    let passes = match sharding {
        Sharding::BlendServe { .. } if ranks > 1 => 1 + REBALANCE_PASSES,
        _ => 1,
    };
    let cutter = RankCutter::new(
        single.preparation(),
        single.perf(),
        ranks,
        sharding,
        config.scheduler.max_batch_tokens,
    );
    let mut shares = cutter.even_shares();
    let mut history: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    let mut cuts: Vec<(Shards, Vec<SimReport>)> = Vec::new();
    for _ in 0..passes {
        let mut these = Vec::with_capacity(ranks);
        let shards = cutter.cut(&shares);
        for ids in &shards {
            let part = sub_workload(workload, ids);
            if part.is_empty() {
                continue;
            }
            let simulation = Simulation::new(&part, config.clone())?;
            these.push(simulation.run(name, kind, &mut |_, _| {})?);
        }
        tracing::debug!(
            "ranks pass: slowest {:.1} s, spread {:.3}, times {:?}",
            slowest(&these),
            spread(&these),
            these.iter().map(|r| r.makespan_secs).collect::<Vec<_>>()
        );
        if these.len() == shares.len() {
            let times = these.iter().map(|r| r.makespan_secs).collect();
            history.push((fractions(&shares), times));
            shares = next_shares(&history);
            tracing::debug!("next shares {:?}", fractions(&shares));
        }
        cuts.push((shards, these));
    }
    let (shards, per_rank) = keep_cut(cuts);
    let makespan_secs = slowest(&per_rank);
    let spread = spread(&per_rank);
    let single_hits = hit_tokens(single_report);
    let hits: f64 = per_rank.iter().map(hit_tokens).sum();
    Ok(RanksReport {
        sharding: sharding.to_string(),
        ranks,
        policy: name.to_string(),
        makespan_secs,
        speedup: single_report.makespan_secs / makespan_secs.max(1e-12),
        spread,
        passes,
        tail_ranks: cutter.tail_ranks(),
        prefix_hits_kept: if single_hits > 0.0 {
            hits / single_hits
        } else {
            1.0
        },
        per_rank,
        shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks whose times are `a + b x` in their fraction `x` of the rest: after a proportional
    /// first step, the fitted second one makes them even, fixed parts (tail ranks) included.
    #[test]
    fn next_shares_even_out_ranks_with_fixed_parts() {
        let lines = [
            (150.0, 1000.0),
            (150.0, 1000.0),
            (0.0, 1000.0),
            (0.0, 1000.0),
        ];
        let times = |x: &[f64]| -> Vec<f64> {
            lines.iter().zip(x).map(|(&(a, b), &x)| a + b * x).collect()
        };
        let mut x = vec![0.25; 4];
        let mut history = vec![(x.clone(), times(&x))];
        for _ in 0..2 {
            x = fractions(&next_shares(&history));
            history.push((x.clone(), times(&x)));
        }
        let t = times(&x);
        assert!((x.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        for ti in &t {
            assert!((ti / t[0] - 1.0).abs() < 1e-6, "{t:?} at {x:?}");
        }
        // T = (1 + 2 * 0.15) / (4 / 1000) = 325; the tail ranks take 0.175 each.
        assert!((t[0] - 325.0).abs() < 1e-6, "{t:?}");
        assert!((x[0] - 0.175).abs() < 1e-9, "{x:?}");
    }

    /// A rank whose fixed part alone outlasts the others gets none of the rest.
    #[test]
    fn next_shares_give_an_overfull_rank_nothing() {
        let history = vec![(vec![0.5, 0.5], vec![900.0, 300.0])];
        let fitted = vec![
            (vec![0.5, 0.5], vec![900.0, 300.0]),
            (vec![0.3, 0.7], vec![880.0, 420.0]),
        ];
        assert!(next_shares(&history)[0] < next_shares(&history)[1]);
        let shares = next_shares(&fitted);
        assert_eq!(shares[0], 0.0, "{shares:?}");
        assert!(shares[1] > 0.0);
    }
}
