//! The optimal bound: no schedule of this workload on this model and hardware, under the same
//! executor, token budget and sequence limit, can finish sooner.

use prefix_tree::{PrefixTree, ROOT};
use serde::Serialize;
use workload::Workload;

use crate::perf::{PerfModel, StepCost};

#[derive(Clone, Copy, Debug, Serialize)]
pub struct OptimalBound {
    /// Fewest engine steps any schedule needs.
    pub min_steps: f64,
    /// Total work with perfect prefix sharing and the fewest weight passes.
    pub cost: StepCost,
    pub compute_secs: f64,
    pub memory_secs: f64,
    /// All the work's energy at the power limit (0 without a power model).
    pub power_secs: f64,
    /// The bound itself.
    pub secs: f64,
}

/// The bound, from the true output lengths.
///
/// Every schedule computes each distinct prompt token at least once (perfect sharing) and every
/// decode step of every request; reads the weights once per step; and needs at least
/// `max(ceil(tokens / max_batch_tokens), ceil(decodes / max_running), longest output)` steps.
/// Each executor's time function is subadditive over steps, so pricing the whole workload as one
/// step of that many weight passes is a lower bound on any schedule's summed step times.
pub fn optimal_bound(
    workload: &Workload,
    tree: &PrefixTree,
    perf: &PerfModel,
    max_batch_tokens: u32,
    max_running: u32,
) -> OptimalBound {
    let m = &perf.model;
    let mut cost = StepCost::default();
    for id in tree.preorder() {
        let node = tree.node(id);
        if id != ROOT && node.edge_tokens > 0 {
            cost += perf.piece_cost(
                node.depth_tokens - node.edge_tokens,
                node.edge_tokens,
                false,
            );
        }
    }
    let mut decode_tokens = 0f64;
    let mut longest = 0u32;
    for r in &workload.requests {
        let d = r.sim_output_tokens();
        longest = longest.max(d);
        decode_tokens += f64::from(d - 1);
        cost += perf.decode_cost(r.prompt_tokens(), u64::from(d));
        // The first token's logits come with the prefill.
        cost.gemm_flops += m.lm_head_flops();
    }
    let tokens = tree.unique_prompt_tokens() as f64 + decode_tokens;
    let min_steps = (tokens / f64::from(max_batch_tokens.max(1)))
        .ceil()
        .max((decode_tokens / f64::from(max_running.max(1))).ceil())
        .max(f64::from(longest));
    cost.steps = min_steps;
    cost.weight_bytes = min_steps * m.weight_bytes_per_step() as f64;
    let t = perf.time(&cost);
    OptimalBound {
        min_steps,
        cost,
        compute_secs: t.compute_secs,
        memory_secs: t.memory_secs,
        power_secs: t.power_secs,
        secs: t.secs,
    }
}
