//! Scheduling policies: who is admitted next.
//!
//! A policy sees the whole offline workload up front (through [`PolicyInput`]) and answers one
//! question per admission: which request next? Batch formation, KV memory, chunked prefill and
//! preemption are the [`crate::Scheduler`]'s, identical for every policy. To add a policy,
//! implement [`Policy`] in a new file here and add one arm to [`PolicyKind`].

mod blendserve;
mod dfs;
mod dual_scanner;
mod fcfs;
mod random;

pub use blendserve::{BlendServeConfig, BlendServePolicy, LeafOrder, ScanMode};
pub use dfs::dfs_policy;
pub use dual_scanner::{DualScanner, RequestShape, SideRule, StepMemory};
pub use fcfs::fcfs_policy;
pub use random::random_policy;

use kv_cache::KvUsage;
use prefix_tree::{Demand, RequestIndex};

use crate::prepare::Preparation;
use crate::SchedulerError;

/// What a policy may look at when choosing.
#[derive(Clone, Copy, Debug)]
pub struct BatchView {
    /// Requests running now.
    pub running: usize,
    /// Estimated demand of the running requests (attributed demand, summed at admission).
    pub running_demand: Demand,
    pub kv: KvUsage,
    /// Tokens the whole KV cache holds.
    pub kv_capacity_tokens: u64,
}

/// Chooses the order in which waiting requests are admitted.
pub trait Policy: Send {
    fn name(&self) -> &str;
    /// The next request to admit, or `None` when every request has been handed out. A request
    /// handed out is the scheduler's from then on (it retries it itself if memory is short).
    fn next(&mut self, view: &BatchView) -> Option<RequestIndex>;
    /// Requests not handed out yet.
    fn remaining(&self) -> usize;
    /// The token budget this policy is designed for (used unless the run overrides it).
    fn preferred_budget(&self) -> crate::TokenBudget {
        crate::TokenBudget::Fixed
    }
    /// Prefill tokens a step should take to keep the running batch where the policy wants it
    /// (read under [`crate::TokenBudget::Paced`]); `None` leaves the step to the balance rule.
    fn prefill_pace_tokens(&self, _view: &BatchView) -> Option<u64> {
        None
    }
    /// Request `r`, handed out earlier, finished: its memory is free again.
    fn on_finished(&mut self, _r: RequestIndex) {}
    /// Request `r` generated more tokens than its estimate (called once, when it passes it).
    fn on_overrun(&mut self, _r: RequestIndex) {}
}

/// Everything a policy is built from.
pub struct PolicyInput<'a> {
    pub preparation: &'a Preparation,
    pub perf: &'a crate::PerfModel,
    pub seed: u64,
}

/// The policies this crate provides, by name.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyKind {
    Fcfs,
    Random,
    Dfs,
    BlendServe(BlendServeConfig),
}

impl PolicyKind {
    /// The policies compared by default.
    pub const MAIN: [&'static str; 4] = ["fcfs", "random", "dfs", "blendserve"];
    /// BlendServe's ablations.
    pub const ABLATIONS: [&'static str; 5] = [
        "blendserve",
        "blendserve-nosplit",
        "blendserve-nomemsplit",
        "blendserve-noscan",
        "blendserve-flat",
    ];

    /// Parses a policy name. BlendServe variants take parameters after `@`:
    /// `blendserve@split=0.95` (sharing that node splitting must keep; `off` disables it).
    pub fn parse(name: &str) -> Result<PolicyKind, SchedulerError> {
        if let Some((base, params)) = name.split_once('@') {
            let PolicyKind::BlendServe(mut config) = PolicyKind::parse(base)? else {
                return Err(SchedulerError::Config(format!(
                    "policy `{base}` takes no parameters (in `{name}`)"
                )));
            };
            for param in params.split('@') {
                match param.split_once('=') {
                    Some(("split", "off")) => config.split = prefix_tree::SplitConfig::OFF,
                    Some(("split", v)) => {
                        let keep = v
                            .parse::<f64>()
                            .ok()
                            .filter(|t| (0.0..=1.0).contains(t))
                            .ok_or_else(|| {
                                SchedulerError::Config(format!(
                                    "`{name}`: split takes `off` or the sharing to keep, a fraction in [0, 1]"
                                ))
                            })?;
                        config.split = prefix_tree::SplitConfig {
                            enabled: true,
                            keep_sharing: keep,
                            ..prefix_tree::SplitConfig::default()
                        };
                    }
                    _ => {
                        return Err(SchedulerError::Config(format!(
                            "`{name}`: unknown parameter `{param}` (split=F|off)"
                        )))
                    }
                }
            }
            return Ok(PolicyKind::BlendServe(config));
        }
        let blend = |f: fn(&mut BlendServeConfig)| {
            let mut config = BlendServeConfig::default();
            f(&mut config);
            PolicyKind::BlendServe(config)
        };
        Ok(match name {
            "fcfs" | "vllm" => PolicyKind::Fcfs,
            "random" => PolicyKind::Random,
            "dfs" | "lpm" | "sglang" => PolicyKind::Dfs,
            "blendserve" => blend(|_| {}),
            "blendserve-nosplit" => blend(|c| c.split = prefix_tree::SplitConfig::OFF),
            "blendserve-nomemsplit" => blend(|c| c.scan = ScanMode::Dual(SideRule::AdmittedDemand)),
            "blendserve-noscan" => blend(|c| c.scan = ScanMode::Single),
            "blendserve-flat" => blend(|c| c.leaf_order = LeafOrder::FlatDensity),
            _ => {
                let mut known: Vec<&str> = Self::MAIN.to_vec();
                known.extend_from_slice(&Self::ABLATIONS[1..]);
                return Err(SchedulerError::Config(format!(
                    "unknown policy `{name}` (known: {})",
                    known.join(", ")
                )));
            }
        })
    }

    /// Expands `all` and `ablation` and splits comma lists.
    pub fn parse_list(spec: &str) -> Result<Vec<(String, PolicyKind)>, SchedulerError> {
        let mut out = Vec::new();
        for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let names: Vec<&str> = match name {
                "all" => Self::MAIN.to_vec(),
                "ablation" => Self::ABLATIONS.to_vec(),
                other => vec![other],
            };
            for n in names {
                if !out.iter().any(|(existing, _)| existing == n) {
                    out.push((n.to_string(), PolicyKind::parse(n)?));
                }
            }
        }
        if out.is_empty() {
            return Err(SchedulerError::Config("no policy named".into()));
        }
        Ok(out)
    }

    pub fn build(&self, input: &PolicyInput<'_>) -> Box<dyn Policy> {
        match self {
            PolicyKind::Fcfs => Box::new(fcfs_policy(input)),
            PolicyKind::Random => Box::new(random_policy(input)),
            PolicyKind::Dfs => Box::new(dfs_policy(input)),
            PolicyKind::BlendServe(config) => {
                Box::new(BlendServePolicy::new(input, config.clone()))
            }
        }
    }
}

/// A policy that hands out an order fixed before the run, front to back: FCFS, random and DFS
/// are each just the function that computes their order.
#[derive(Clone, Debug)]
pub struct FixedOrder {
    name: &'static str,
    order: Vec<RequestIndex>,
    next: usize,
}

impl FixedOrder {
    pub fn new(name: &'static str, order: Vec<RequestIndex>) -> Self {
        FixedOrder {
            name,
            order,
            next: 0,
        }
    }

    pub(crate) fn pop(&mut self) -> Option<RequestIndex> {
        let r = self.order.get(self.next).copied();
        self.next += usize::from(r.is_some());
        r
    }
}

impl Policy for FixedOrder {
    fn name(&self) -> &str {
        self.name
    }
    fn next(&mut self, _view: &BatchView) -> Option<RequestIndex> {
        self.pop()
    }
    fn remaining(&self) -> usize {
        self.order.len() - self.next
    }
}
