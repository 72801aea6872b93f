//! How many prefill tokens a step takes: the token budget modes ([`TokenBudget`]) and the
//! allowance of one step being formed ([`StepBudget`]), which batch formation asks chunk by
//! chunk. Prices steps with the performance model; must not touch KV memory or the policy.

use serde::Serialize;

use crate::perf::{PerfModel, StepCost};
use crate::SchedulerError;

/// The prefill allowance of one step being formed.
pub(crate) struct StepBudget {
    /// Tokens the step may still take in all (`max_batch_tokens` minus scheduled).
    pub(crate) tokens_left: u64,
    mode: TokenBudget,
    /// Prefill tokens still owed to the step's minimum (balanced and paced modes: the minimum,
    /// or the policy's pace when larger).
    min_prefill_left: u64,
    /// Compute seconds the balanced and paced modes let the step reach whatever its memory
    /// time ([`CriticalPath`]).
    compute_floor_secs: f64,
    cost: StepCost,
}

impl StepBudget {
    /// `pace_tokens`: the policy's prefill pace, read in paced mode; `compute_floor_secs`, read
    /// in balanced and paced modes.
    pub(crate) fn new(
        max_batch_tokens: u64,
        mode: TokenBudget,
        perf: Option<&PerfModel>,
        pace_tokens: Option<u64>,
        compute_floor_secs: f64,
    ) -> Self {
        let min_prefill_left = match mode {
            TokenBudget::Balanced {
                min_prefill_tokens, ..
            } => u64::from(min_prefill_tokens),
            TokenBudget::Paced { min_prefill_tokens } => {
                u64::from(min_prefill_tokens).max(pace_tokens.unwrap_or(0))
            }
            _ => 0,
        };
        StepBudget {
            tokens_left: max_batch_tokens,
            mode,
            min_prefill_left,
            compute_floor_secs,
            cost: perf.map_or_else(StepCost::default, PerfModel::step_base_cost),
        }
    }

    /// Prefill tokens granted to a chunk starting at `start` that wants `wanted` tokens.
    pub(crate) fn grant(&mut self, perf: Option<&PerfModel>, start: u64, wanted: u64) -> u64 {
        let hard = wanted.min(self.tokens_left);
        let target_density = match self.mode {
            TokenBudget::Balanced { target_density, .. } => target_density,
            TokenBudget::Paced { .. } => 1.0,
            _ => return hard,
        };
        let Some(perf) = perf else {
            return hard;
        };
        let t = perf.time(&self.cost);
        let target_secs = (target_density * t.memory_secs).max(self.compute_floor_secs);
        let room = target_secs - t.compute_secs;
        let balanced = perf.prefill_tokens_for_compute(start, room);
        let granted = hard.min(balanced.max(self.min_prefill_left));
        self.min_prefill_left = self.min_prefill_left.saturating_sub(granted);
        granted
    }

    pub(crate) fn record(&mut self, perf: Option<&PerfModel>, start: u64, len: u64) {
        self.tokens_left -= len;
        if let Some(perf) = perf {
            self.cost += perf.piece_cost(start, len, false);
        }
    }
}

/// How many prefill tokens a step takes besides its decodes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum TokenBudget {
    /// Whatever the policy prefers ([`Policy::preferred_budget`]).
    PolicyDefault,
    /// Fill up to `max_batch_tokens` (vLLM's and SGLang's chunked prefill).
    Fixed,
    /// Prefill chunks sized so the step's compute time is `target_density` times its memory
    /// time (decodes' KV reads plus the weights), never more than `max_batch_tokens` in all and
    /// never fewer than `min_prefill_tokens` when prefill work waits, and never throttled below
    /// the critical path's pace (the compute not admitted yet over the steps the longest decode
    /// to come needs: `pace.rs`). Needs a performance model.
    Balanced {
        target_density: f64,
        min_prefill_tokens: u32,
    },
    /// The balance rule at density 1, or the policy's pace ([`Policy::prefill_pace_tokens`]:
    /// BlendServe's steady state for a memory-bound workload, the prefill tokens that replace
    /// the requests finishing so that memory stays full) where that gives more; at least
    /// `min_prefill_tokens` when prefill work waits.
    Paced { min_prefill_tokens: u32 },
}

impl std::str::FromStr for TokenBudget {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" | "policy" => Ok(TokenBudget::PolicyDefault),
            "fixed" => Ok(TokenBudget::Fixed),
            "balanced" => Ok(TokenBudget::Balanced {
                target_density: 1.0,
                min_prefill_tokens: 64,
            }),
            "paced" => Ok(TokenBudget::Paced {
                min_prefill_tokens: 64,
            }),
            other => Err(SchedulerError::Config(format!(
                "unknown token budget `{other}` (auto, fixed, balanced, paced)"
            ))),
        }
    }
}
