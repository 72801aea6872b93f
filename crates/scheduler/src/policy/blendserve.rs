use prefix_tree::{flat_density_order, resource_aware_order, RelaxConfig, RequestIndex};

use super::{BatchView, DualScanner, FixedOrder, Policy, PolicyInput};
use crate::{Executor, TokenBudget};

/// How BlendServe lays out leaves before scanning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafOrder {
    /// The resource-aware prefix tree (children sorted by compute density).
    ResourceAwareTree,
    /// Requests sorted by density alone, ignoring prefixes (ablation).
    FlatDensity,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlendServeConfig {
    pub leaf_order: LeafOrder,
    pub relax: RelaxConfig,
    /// Scan from both ends (else front to back, one cursor: ablation).
    pub dual_scan: bool,
}

impl Default for BlendServeConfig {
    fn default() -> Self {
        BlendServeConfig {
            leaf_order: LeafOrder::ResourceAwareTree,
            relax: RelaxConfig::default(),
            dual_scan: true,
        }
    }
}

enum Cursor {
    Dual(DualScanner),
    Single(FixedOrder),
}

/// BlendServe: a resource-aware prefix tree, scanned from both ends so that every stretch of
/// admissions blends compute-heavy and memory-heavy requests while each end keeps its prefixes
/// together.
pub struct BlendServePolicy {
    name: String,
    cursor: Cursor,
    overlapping_executor: bool,
}

impl BlendServePolicy {
    pub fn new(input: &PolicyInput<'_>, config: BlendServeConfig) -> Self {
        let p = input.preparation;
        let order = match config.leaf_order {
            LeafOrder::ResourceAwareTree => {
                resource_aware_order(&p.tree, &p.annotation, config.relax)
            }
            LeafOrder::FlatDensity => flat_density_order(&p.annotation),
        };
        let cursor = if config.dual_scan {
            Cursor::Dual(DualScanner::new(order))
        } else {
            Cursor::Single(FixedOrder::new(
                "blendserve-noscan",
                order.iter().map(|o| o.request).collect(),
            ))
        };
        let name = match (&config.leaf_order, config.relax.enabled, config.dual_scan) {
            (LeafOrder::FlatDensity, _, _) => "blendserve-flat",
            (_, _, false) => "blendserve-noscan",
            (_, false, _) => "blendserve-norelax",
            _ => "blendserve",
        };
        BlendServePolicy {
            name: name.to_string(),
            cursor,
            overlapping_executor: input.perf.executor != Executor::Sequential,
        }
    }
}

impl Policy for BlendServePolicy {
    fn name(&self) -> &str {
        &self.name
    }
    fn next(&mut self, _view: &BatchView) -> Option<RequestIndex> {
        match &mut self.cursor {
            Cursor::Dual(s) => s.pick(),
            Cursor::Single(o) => o.pop(),
        }
    }
    fn remaining(&self) -> usize {
        match &self.cursor {
            Cursor::Dual(s) => s.remaining(),
            Cursor::Single(o) => Policy::remaining(o),
        }
    }
    fn preferred_budget(&self) -> TokenBudget {
        // With overlap, each step at the hardware's balance point. (Aiming at the workload's own
        // density when it is compute-heavy was measured worse: KV capacity, not arithmetic,
        // bounds the memory-heavy phases.) Without overlap, balancing buys nothing and costs
        // weight passes: fill the budget. See experiments/NOTES.md.
        if self.overlapping_executor {
            TokenBudget::Balanced {
                target_density: 1.0,
                min_prefill_tokens: 64,
            }
        } else {
            TokenBudget::Fixed
        }
    }
}
