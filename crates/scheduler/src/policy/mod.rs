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

pub use blendserve::{BlendServeConfig, BlendServePolicy, LeafOrder};
pub use dfs::dfs_policy;
pub use dual_scanner::DualScanner;
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
    pub const ABLATIONS: [&'static str; 4] = [
        "blendserve",
        "blendserve-norelax",
        "blendserve-noscan",
        "blendserve-flat",
    ];

    /// Parses a policy name. BlendServe variants take parameters after `@`:
    /// `blendserve@relax=0.05` (relaxation threshold; `off` disables it).
    pub fn parse(name: &str) -> Result<PolicyKind, SchedulerError> {
        if let Some((base, params)) = name.split_once('@') {
            let PolicyKind::BlendServe(mut config) = PolicyKind::parse(base)? else {
                return Err(SchedulerError::Config(format!(
                    "policy `{base}` takes no parameters (in `{name}`)"
                )));
            };
            for param in params.split('@') {
                match param.split_once('=') {
                    Some(("relax", "off")) => config.relax = prefix_tree::RelaxConfig::OFF,
                    Some(("relax", v)) => {
                        let threshold = v
                            .parse::<f64>()
                            .ok()
                            .filter(|t| (0.0..=1.0).contains(t))
                            .ok_or_else(|| {
                            SchedulerError::Config(format!(
                                "`{name}`: relax takes `off` or a fraction in [0, 1]"
                            ))
                        })?;
                        config.relax = prefix_tree::RelaxConfig {
                            enabled: true,
                            min_saving_fraction: threshold,
                        };
                    }
                    _ => {
                        return Err(SchedulerError::Config(format!(
                            "`{name}`: unknown parameter `{param}` (relax=F|off)"
                        )))
                    }
                }
            }
            return Ok(PolicyKind::BlendServe(config));
        }
        Ok(match name {
            "fcfs" | "vllm" => PolicyKind::Fcfs,
            "random" => PolicyKind::Random,
            "dfs" | "lpm" | "sglang" => PolicyKind::Dfs,
            "blendserve" => PolicyKind::BlendServe(BlendServeConfig::default()),
            "blendserve-norelax" => PolicyKind::BlendServe(BlendServeConfig {
                relax: prefix_tree::RelaxConfig::OFF,
                ..BlendServeConfig::default()
            }),
            "blendserve-noscan" => PolicyKind::BlendServe(BlendServeConfig {
                dual_scan: false,
                ..BlendServeConfig::default()
            }),
            "blendserve-flat" => PolicyKind::BlendServe(BlendServeConfig {
                leaf_order: LeafOrder::FlatDensity,
                ..BlendServeConfig::default()
            }),
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
