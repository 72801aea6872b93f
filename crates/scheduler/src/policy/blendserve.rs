use prefix_tree::{
    flat_density_order, resource_aware_order, split_outliers, RequestIndex, SplitConfig,
    SplitReport, TreeLayout,
};

use super::dual_scanner::{RequestShape, SideRule, StepMemory};
use super::{BatchView, DualScanner, Policy, PolicyInput};
use crate::{Executor, TokenBudget};

/// How BlendServe lays out leaves before scanning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafOrder {
    /// The resource-aware prefix tree (children sorted by compute density).
    ResourceAwareTree,
    /// Requests sorted by density alone, ignoring prefixes (ablation).
    FlatDensity,
}

/// How the leaves are scanned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// Two cursors, one from each end, choosing ends by `SideRule`.
    Dual(SideRule),
    /// One cursor, front to back (ablation).
    Single,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BlendServeConfig {
    pub leaf_order: LeafOrder,
    pub split: SplitConfig,
    pub scan: ScanMode,
}

impl Default for BlendServeConfig {
    fn default() -> Self {
        BlendServeConfig {
            leaf_order: LeafOrder::ResourceAwareTree,
            split: SplitConfig::default(),
            scan: ScanMode::Dual(SideRule::MemorySplit),
        }
    }
}

impl BlendServeConfig {
    /// The name of this variant (`blendserve` or the ablation it is).
    pub fn name(&self) -> &'static str {
        match (self.leaf_order, self.split.enabled, self.scan) {
            (LeafOrder::FlatDensity, _, _) => "blendserve-flat",
            (_, _, ScanMode::Single) => "blendserve-noscan",
            (_, _, ScanMode::Dual(SideRule::AdmittedDemand)) => "blendserve-nomemsplit",
            (_, false, _) => "blendserve-nosplit",
            _ => "blendserve",
        }
    }
}

/// BlendServe: a resource-aware prefix tree, scanned from both ends with KV memory split between
/// the ends so that the running batch sits at the workload's compute density, while each end
/// keeps its prefixes together.
pub struct BlendServePolicy {
    name: String,
    scanner: DualScanner,
    overlapping_executor: bool,
    split_report: SplitReport,
}

impl BlendServePolicy {
    pub fn new(input: &PolicyInput<'_>, config: BlendServeConfig) -> Self {
        let p = input.preparation;
        let layout = match config.leaf_order {
            LeafOrder::ResourceAwareTree => {
                split_outliers(&p.tree, &p.annotation, input.perf, config.split)
            }
            LeafOrder::FlatDensity => TreeLayout::unsplit(&p.tree, &p.annotation),
        };
        let order = match config.leaf_order {
            LeafOrder::ResourceAwareTree => resource_aware_order(&p.tree, &p.annotation, &layout),
            LeafOrder::FlatDensity => flat_density_order(&p.annotation),
        };
        let prefill = layout.attributed_prompt_tokens(&p.tree);
        let shape = (0..p.tree.requests())
            .map(|r| RequestShape {
                prompt_tokens: p.tree.node(p.tree.leaf_of(r as RequestIndex)).depth_tokens as f64,
                prefill_tokens: prefill[r],
                output_tokens: f64::from(p.estimated_output_tokens[r]),
            })
            .collect();
        let rule = match config.scan {
            ScanMode::Dual(rule) => rule,
            ScanMode::Single => SideRule::FrontOnly,
        };
        let bandwidth = input.perf.hardware.effective_bytes_per_sec();
        let model = &input.perf.model;
        let step_memory = StepMemory {
            kv_secs_per_token: model.kv_bytes_per_token() as f64 / bandwidth,
            weight_secs: model.weight_bytes_per_step() as f64 / bandwidth,
        };
        BlendServePolicy {
            name: config.name().to_string(),
            scanner: DualScanner::new(order, shape, rule, step_memory),
            overlapping_executor: input.perf.executor != Executor::Sequential,
            split_report: layout.report,
        }
    }

    /// What conditional node splitting did to the tree.
    pub fn split_report(&self) -> SplitReport {
        self.split_report
    }
}

impl Policy for BlendServePolicy {
    fn name(&self) -> &str {
        &self.name
    }
    fn next(&mut self, view: &BatchView) -> Option<RequestIndex> {
        self.scanner.pick(view.kv_capacity_tokens as f64)
    }
    fn remaining(&self) -> usize {
        self.scanner.remaining()
    }
    fn preferred_budget(&self) -> TokenBudget {
        // With overlap, each step at the hardware's balance point: the memory split decides the
        // mix, the balance rule the size. (The paper's steady-state pace, `--token-budget paced`,
        // made steps long enough that the longest decodes ran on alone at the end, and filled
        // memory until admission stalled; aiming at the workload's own density was worse too.)
        // Without overlap, balancing buys nothing and costs weight passes: fill the budget. See
        // experiments/NOTES.md.
        if self.overlapping_executor {
            TokenBudget::Balanced {
                target_density: 1.0,
                min_prefill_tokens: 64,
            }
        } else {
            TokenBudget::Fixed
        }
    }
    fn prefill_pace_tokens(&self, view: &BatchView) -> Option<u64> {
        Some(
            self.scanner
                .prefill_pace_tokens(view.kv_capacity_tokens as f64) as u64,
        )
    }
    fn on_finished(&mut self, r: RequestIndex) {
        self.scanner.finished(r);
    }
    fn on_overrun(&mut self, r: RequestIndex) {
        self.scanner.overran(r);
    }
}
