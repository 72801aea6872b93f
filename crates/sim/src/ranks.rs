//! Data-parallel ranks in the simulator: a workload cut into N shards ([`scheduler::shard()`]),
//! each simulated as its own replica under the same policy and configuration, against the
//! single-rank run. The makespan of N ranks is their slowest rank's.

use scheduler::{shard_weighted, PolicyKind, Sharding};
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
}

/// Rebalancing passes after the first cut (BlendServe's sharding): each gives every rank a share
/// of the demand scaled by the ranks' mean time over its own; of the cuts within 0.5% of the
/// fastest, the most even is kept (`keep_cut`).
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
pub fn sub_workload(w: &Workload, ids: &[prefix_tree::RequestIndex]) -> Workload {
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
fn keep_cut(cuts: Vec<Vec<SimReport>>) -> Vec<SimReport> {
    let best = cuts
        .iter()
        .map(|c| slowest(c))
        .fold(f64::INFINITY, f64::min);
    cuts.into_iter()
        .filter(|c| slowest(c) <= best * (1.0 + KEEP_WITHIN))
        .min_by(|a, b| spread(a).total_cmp(&spread(b)))
        .unwrap_or_default()
}

/// How far a pass moves a rank's share towards what its time says (1: all the way): at 8 ranks a
/// full step made two ranks trade a heavy segment back and forth (+-6%).
const REBALANCE_DAMPING: f64 = 0.5;

/// How much slower than the fastest cut a more even one may be and still be kept.
const KEEP_WITHIN: f64 = 0.005;

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
    let mut shares = vec![1.0; ranks.max(1)];
    let mut cuts: Vec<Vec<SimReport>> = Vec::new();
    for _ in 0..passes {
        let shards = shard_weighted(single.preparation(), &shares, sharding);
        let mut these = Vec::with_capacity(shards.len());
        for ids in &shards {
            let part = sub_workload(workload, ids);
            if part.is_empty() {
                continue;
            }
            let simulation = Simulation::new(&part, config.clone())?;
            these.push(simulation.run(name, kind, &mut |_, _| {})?);
        }
        if these.len() == shares.len() {
            let mean = these.iter().map(|r| r.makespan_secs).sum::<f64>() / these.len() as f64;
            for (s, r) in shares.iter_mut().zip(&these) {
                *s *= (mean / r.makespan_secs.max(1e-12)).powf(REBALANCE_DAMPING);
            }
        }
        tracing::debug!(
            "ranks pass: slowest {:.1} s, spread {:.3}, times {:?}",
            slowest(&these),
            spread(&these),
            these.iter().map(|r| r.makespan_secs).collect::<Vec<_>>()
        );
        cuts.push(these);
    }
    let per_rank = keep_cut(cuts);
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
        prefix_hits_kept: if single_hits > 0.0 {
            hits / single_hits
        } else {
            1.0
        },
        per_rank,
    })
}
