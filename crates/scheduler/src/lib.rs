//! The scheduler shared, unchanged, by the engine and the simulator.
//!
//! Owns: the performance model (model and hardware descriptions, per-step and per-request
//! compute and memory time, executors, the optimal bound), offline preparation (prefix tree,
//! output-length estimates, resource annotation), the [`Policy`] trait and its implementations
//! (FCFS, random, DFS, BlendServe and its ablations), and batch formation under token, sequence
//! and KV-memory budgets with chunked prefill, prefix reuse and preemption; and which requests
//! each data-parallel rank runs ([`shard()`]).
//!
//! Must not touch: GPUs, tensors or clocks. It decides; the driver (engine or simulator) runs
//! the step and reports back.

mod batch;
mod bound;
mod budget;
pub mod calibrate;
pub mod config;
mod pace;
pub mod perf;
pub mod policy;
mod prepare;
pub mod shard;

pub use batch::{
    FinishReason, Finished, Rejection, RequestEstimates, ScheduledItem, Scheduler, SchedulerConfig,
    SchedulerStats, StepPlan,
};
pub use bound::{optimal_bound, OptimalBound};
pub use budget::TokenBudget;
pub use config::{HardwareConfig, ModelConfig, OverrideFile};
pub use perf::{Executor, PerfModel, StepCost, StepTime};
pub use policy::{BatchView, Policy, PolicyInput, PolicyKind};
pub use prepare::{
    build_tree, choose_length_sample, estimate_from_samples, estimate_output_tokens,
    LengthKnowledge, Preparation,
};
pub use shard::{shard, RankCutter, Sharding};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0}")]
    Config(String),
}
