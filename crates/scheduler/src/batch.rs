//! Batch formation (the step's prefill allowance is `budget.rs`): the scheduler core every policy and both drivers (simulator, engine) share.
//!
//! Each step: running sequences first, in admission order, each taking what it still has to
//! compute (one token when decoding, a chunk of its prompt when prefilling) under the step's
//! token budget; then new requests, in the order the policy gives, with their cached prefix
//! blocks reused, while budget, sequence limit and KV memory (above a watermark) allow. When a
//! running sequence cannot get a KV slot, the most recently admitted one is preempted (its
//! blocks freed, to be recomputed later, mostly from the prefix cache).

use std::collections::VecDeque;

use kv_cache::{BlockHasher, KvCacheConfig, KvCacheManager, KvError, KvUsage, SeqId};
use prefix_tree::{Demand, RequestIndex};
use serde::Serialize;
use workload::{Namespace, Workload};

use crate::budget::{StepBudget, TokenBudget};
use crate::pace::{CriticalPath, RunningRest};
use crate::perf::{PerfModel, StepCost};
use crate::policy::{BatchView, Policy};
use crate::SchedulerError;

/// Limits of batch formation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SchedulerConfig {
    /// Tokens computed per step at most (chunked prefill splits prompts to fit).
    pub max_batch_tokens: u32,
    /// How prefill tokens are budgeted within `max_batch_tokens`.
    pub token_budget: TokenBudget,
    /// Sequences running at once at most.
    pub max_running: u32,
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// Fraction of KV blocks kept free when admitting, so running sequences can grow.
    pub watermark_fraction: f64,
    /// Admission also keeps free the KV that running sequences are expected to still need:
    /// their estimated remaining output tokens times an adaptive ratio (SGLang's
    /// `new_token_ratio`). The ratio starts at `reserve_ratio_init`, decays linearly to
    /// `reserve_ratio_min` over `reserve_decay_steps` steps, and resets on every preemption.
    pub reserve_ratio_init: f64,
    pub reserve_ratio_min: f64,
    pub reserve_decay_steps: u32,
    pub enable_prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_batch_tokens: 8192,
            token_budget: TokenBudget::PolicyDefault,
            max_running: 1024,
            block_tokens: 16,
            watermark_fraction: 0.01,
            reserve_ratio_init: 0.7,
            reserve_ratio_min: 0.1,
            reserve_decay_steps: 600,
            enable_prefix_caching: true,
        }
    }
}

/// Work for one sequence in one step: compute tokens `[start_tokens, start_tokens + len_tokens)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ScheduledItem {
    pub request: RequestIndex,
    pub start_tokens: u64,
    pub len_tokens: u32,
    /// The step computes the last known token, so it samples the next one.
    pub samples: bool,
}

/// Why a request finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FinishReason {
    /// The driver said so (stop token, `max_tokens`, the trace's length).
    Stop,
    /// The sequence reached the model's context length.
    Length,
    /// The sequence alone outgrew the whole KV cache; its output is truncated.
    KvCapacity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Finished {
    pub request: RequestIndex,
    pub generated_tokens: u32,
    pub reason: FinishReason,
}

/// One step's decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepPlan {
    pub items: Vec<ScheduledItem>,
    pub admitted: Vec<RequestIndex>,
    pub preempted: Vec<RequestIndex>,
    /// Requests ended while scheduling (only [`FinishReason::KvCapacity`]).
    pub finished: Vec<Finished>,
}

impl ScheduledItem {
    /// A single-token decode (it samples); anything else computes prompt (or recomputed) tokens.
    pub fn is_decode(&self) -> bool {
        self.len_tokens == 1 && self.samples
    }
}

impl StepPlan {
    /// Sequences that decode one token this step.
    pub fn decode_tokens(&self) -> u64 {
        self.items.iter().filter(|i| i.is_decode()).count() as u64
    }

    /// Prompt (and recomputed) tokens computed this step.
    pub fn prefill_tokens(&self) -> u64 {
        self.tokens() - self.decode_tokens()
    }

    /// The step's work under the performance model: weights once, plus every item's piece.
    pub fn cost(&self, perf: &PerfModel) -> StepCost {
        let mut cost = perf.step_base_cost();
        for item in &self.items {
            cost += perf.piece_cost(item.start_tokens, u64::from(item.len_tokens), item.samples);
        }
        cost
    }

    pub fn tokens(&self) -> u64 {
        self.items.iter().map(|i| u64::from(i.len_tokens)).sum()
    }
}

/// What the scheduler may know of each request before it runs.
#[derive(Clone, Debug, Default)]
pub struct RequestEstimates {
    /// Estimated compute and memory demand (the policy's view of the running set).
    pub demand: Vec<Demand>,
    /// Estimated output tokens (KV reservation at admission).
    pub output_tokens: Vec<u32>,
}

/// Why a request is refused before scheduling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub enum Rejection {
    #[error("prompt of {prompt_tokens} tokens leaves no room to generate within the model's context of {max_context_tokens} tokens")]
    PromptTooLong {
        prompt_tokens: u64,
        max_context_tokens: u64,
    },
    #[error("prompt of {prompt_tokens} tokens does not fit in the KV cache ({capacity_tokens} tokens; raise kv_memory_fraction)")]
    ExceedsKvCache {
        prompt_tokens: u64,
        capacity_tokens: u64,
    },
}

/// Counters over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SchedulerStats {
    pub steps: u64,
    pub admitted: u64,
    pub finished: u64,
    pub rejected: u64,
    /// Prompt tokens of first admissions, and of those, tokens found in the prefix cache.
    pub prefix_lookup_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Tokens computed by prefill chunks (prompts and recomputation).
    pub prefill_tokens: u64,
    /// Tokens computed by single-token decode steps.
    pub decode_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    /// Tokens whose KV was dropped by preemption.
    pub preempted_tokens: u64,
}

/// Summing the counters of runs (the engine's and the simulator's phases).
impl std::ops::AddAssign for SchedulerStats {
    fn add_assign(&mut self, o: SchedulerStats) {
        self.steps += o.steps;
        self.admitted += o.admitted;
        self.finished += o.finished;
        self.rejected += o.rejected;
        self.prefix_lookup_tokens += o.prefix_lookup_tokens;
        self.prefix_hit_tokens += o.prefix_hit_tokens;
        self.prefill_tokens += o.prefill_tokens;
        self.decode_tokens += o.decode_tokens;
        self.generated_tokens += o.generated_tokens;
        self.preemptions += o.preemptions;
        self.preempted_tokens += o.preempted_tokens;
    }
}

impl SchedulerStats {
    pub fn prefix_hit_ratio(&self) -> f64 {
        if self.prefix_lookup_tokens == 0 {
            0.0
        } else {
            self.prefix_hit_tokens as f64 / self.prefix_lookup_tokens as f64
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
    Finished,
    Rejected,
}

#[derive(Clone, Debug)]
struct SeqState {
    phase: Phase,
    prompt_tokens: u64,
    /// Prompt plus generated tokens.
    known_tokens: u64,
    /// Tokens whose KV is computed and held.
    computed_tokens: u64,
    generated: u32,
    hasher: Option<BlockHasher>,
    admitted_once: bool,
}

/// The scheduler core.
pub struct Scheduler<'w> {
    workload: &'w Workload,
    config: SchedulerConfig,
    max_context_tokens: u64,
    perf: Option<PerfModel>,
    kv: KvCacheManager,
    policy: Box<dyn Policy>,
    demand: Vec<Demand>,
    seqs: Vec<SeqState>,
    running: Vec<RequestIndex>,
    preempted: VecDeque<RequestIndex>,
    pending: Option<RequestIndex>,
    running_demand: Demand,
    critical_path: CriticalPath,
    /// Estimated output tokens of each request (what the scheduler may know).
    estimated_output: Vec<u32>,
    /// Over running sequences: estimated output tokens, and tokens generated so far.
    running_estimated_output: u64,
    running_generated: u64,
    /// Over running sequences: known tokens (prompt plus generated), and KV slots held.
    running_known: u64,
    running_slots: u64,
    reserve_ratio: f64,
    rejections: Vec<(RequestIndex, Rejection)>,
    /// Added to a request's index to name its output tokens' content in block hashes.
    output_id_base: u64,
    unfinished: usize,
    stats: SchedulerStats,
}

impl<'w> Scheduler<'w> {
    /// `demand[r]` is request `r`'s estimated demand (for the policy's view); `kv` the cache
    /// shape; `perf` prices steps for the balanced token budget.
    pub fn new(
        workload: &'w Workload,
        config: SchedulerConfig,
        kv: KvCacheConfig,
        max_context_tokens: u64,
        policy: Box<dyn Policy>,
        estimates: RequestEstimates,
        perf: Option<PerfModel>,
    ) -> Result<Self, SchedulerError> {
        let RequestEstimates {
            demand,
            output_tokens: estimated_output,
        } = estimates;
        if config.max_batch_tokens == 0 || config.max_running == 0 || config.block_tokens == 0 {
            return Err(SchedulerError::Config(
                "max_batch_tokens, max_running and block_tokens must be positive".into(),
            ));
        }
        if kv.block_tokens != config.block_tokens {
            return Err(SchedulerError::Config(
                "KV block size differs from the scheduler's".into(),
            ));
        }
        if demand.len() != workload.len() || estimated_output.len() != workload.len() {
            return Err(SchedulerError::Config(
                "one estimate per request is needed".into(),
            ));
        }
        let capacity_tokens = u64::from(kv.num_blocks) * u64::from(kv.block_tokens);
        let reserve_ratio_init = config.reserve_ratio_init;
        let mut rejections = Vec::new();
        let seqs: Vec<SeqState> = workload
            .requests
            .iter()
            .enumerate()
            .map(|(r, req)| {
                let prompt = req.prompt_tokens();
                let rejection = if prompt >= max_context_tokens {
                    Some(Rejection::PromptTooLong {
                        prompt_tokens: prompt,
                        max_context_tokens,
                    })
                } else if prompt + 1 > capacity_tokens {
                    Some(Rejection::ExceedsKvCache {
                        prompt_tokens: prompt,
                        capacity_tokens,
                    })
                } else {
                    None
                };
                let phase = if let Some(why) = rejection {
                    rejections.push((r as RequestIndex, why));
                    Phase::Rejected
                } else {
                    Phase::Waiting
                };
                SeqState {
                    phase,
                    prompt_tokens: prompt,
                    known_tokens: prompt,
                    computed_tokens: 0,
                    generated: 0,
                    hasher: None,
                    admitted_once: false,
                }
            })
            .collect();
        let unfinished = workload.len() - rejections.len();
        let critical_path = CriticalPath::new(
            seqs.iter()
                .enumerate()
                .filter(|(_, s)| s.phase == Phase::Waiting)
                .map(|(r, _)| (r as RequestIndex, demand[r], estimated_output[r])),
        );
        let stats = SchedulerStats {
            rejected: rejections.len() as u64,
            ..SchedulerStats::default()
        };
        let scheduler = Scheduler {
            workload,
            kv: KvCacheManager::new(KvCacheConfig {
                enable_prefix_caching: config.enable_prefix_caching && kv.enable_prefix_caching,
                ..kv
            }),
            config,
            max_context_tokens,
            perf,
            policy,
            demand,
            seqs,
            running: Vec::new(),
            preempted: VecDeque::new(),
            pending: None,
            running_demand: Demand::ZERO,
            critical_path,
            estimated_output,
            running_estimated_output: 0,
            running_generated: 0,
            running_known: 0,
            running_slots: 0,
            reserve_ratio: reserve_ratio_init,
            rejections,
            output_id_base: 0,
            unfinished,
            stats,
        };
        if matches!(
            scheduler.token_budget(),
            TokenBudget::Balanced { .. } | TokenBudget::Paced { .. }
        ) && scheduler.perf.is_none()
        {
            return Err(SchedulerError::Config(
                "the balanced and paced token budgets need a performance model".into(),
            ));
        }
        Ok(scheduler)
    }

    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    pub fn is_done(&self) -> bool {
        self.unfinished == 0
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// The KV cache manager, for a later scheduler over the same device cache
    /// ([`Scheduler::continue_cache`]).
    pub fn into_kv_cache(self) -> KvCacheManager {
        self.kv
    }

    /// Starts from `previous`, an earlier scheduler's cache over the same device blocks (a run
    /// in phases: its cached prefixes stay reusable), instead of an empty one. Output tokens
    /// are then named from `output_id_base` on, which must not overlap the earlier phases'
    /// (their indices), so that the outputs of two requests are never taken for each other.
    /// Refused once this scheduler has admitted anything, or where the caches differ in
    /// shape or still hold sequences.
    pub fn continue_cache(
        &mut self,
        previous: KvCacheManager,
        output_id_base: u64,
    ) -> Result<(), SchedulerError> {
        let (mine, theirs) = (self.kv.config(), previous.config());
        if mine.num_blocks != theirs.num_blocks
            || mine.block_tokens != theirs.block_tokens
            || mine.enable_prefix_caching != theirs.enable_prefix_caching
        {
            return Err(SchedulerError::Config(format!(
                "an earlier phase's KV cache differs: {} blocks of {} tokens, not {} of {}",
                theirs.num_blocks, theirs.block_tokens, mine.num_blocks, mine.block_tokens
            )));
        }
        if previous.usage().used_blocks != 0 {
            return Err(SchedulerError::Config(
                "an earlier phase's KV cache still holds sequences".into(),
            ));
        }
        if self.stats.admitted != 0 {
            return Err(SchedulerError::Config(
                "a scheduler can take over a cache only before it admits".into(),
            ));
        }
        self.kv = previous;
        self.output_id_base = output_id_base;
        Ok(())
    }

    pub fn running(&self) -> &[RequestIndex] {
        &self.running
    }

    pub fn rejections(&self) -> &[(RequestIndex, Rejection)] {
        &self.rejections
    }

    /// Requests neither finished nor rejected.
    pub fn unfinished(&self) -> usize {
        self.unfinished
    }

    /// Running sequences still computing prompt (or recomputing) rather than decoding.
    pub fn prefilling(&self) -> usize {
        self.running
            .iter()
            .filter(|&&r| {
                let s = &self.seqs[r as usize];
                s.known_tokens - s.computed_tokens > 1
            })
            .count()
    }

    /// Tokens request `r` has generated so far.
    pub fn generated_tokens(&self, r: RequestIndex) -> u32 {
        self.seqs[r as usize].generated
    }

    fn view(&self) -> BatchView {
        let kv = self.kv.usage();
        BatchView {
            running: self.running.len(),
            running_demand: self.running_demand,
            kv,
            kv_capacity_tokens: u64::from(kv.total_blocks) * u64::from(self.config.block_tokens),
        }
    }

    /// The budget mode in force: the configured one, or the policy's preference.
    pub fn token_budget(&self) -> TokenBudget {
        match self.config.token_budget {
            TokenBudget::PolicyDefault => self.policy.preferred_budget(),
            mode => mode,
        }
    }

    /// Decides the next step: decodes first, then chunks of prompts already running, then new
    /// requests, prefill tokens limited by the step budget.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mode = self.token_budget();
        let pace = match mode {
            TokenBudget::Paced { .. } => self.policy.prefill_pace_tokens(&self.view()),
            _ => None,
        };
        let compute_floor_secs = match mode {
            TokenBudget::Balanced { .. } | TokenBudget::Paced { .. } => self.compute_floor_secs(),
            _ => 0.0,
        };
        let mut budget = StepBudget::new(
            u64::from(self.config.max_batch_tokens),
            mode,
            self.perf.as_ref(),
            pace,
            compute_floor_secs,
        );
        let c = &self.config;
        let decay =
            (c.reserve_ratio_init - c.reserve_ratio_min) / f64::from(c.reserve_decay_steps.max(1));
        self.reserve_ratio = (self.reserve_ratio - decay).max(c.reserve_ratio_min);
        let mut prefilling = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let r = self.running[i];
            let s = &self.seqs[r as usize];
            let start = s.computed_tokens;
            if s.known_tokens - start != 1 {
                prefilling.push(r);
                i += 1;
                continue;
            }
            if budget.tokens_left == 0 || !self.reserve_slots(r, start + 1, &mut plan) {
                break;
            }
            plan.items.push(ScheduledItem {
                request: r,
                start_tokens: start,
                len_tokens: 1,
                samples: true,
            });
            budget.record(self.perf.as_ref(), start, 1);
            i += 1;
        }
        let mut blocked = !plan.preempted.is_empty() || !plan.finished.is_empty();
        for r in prefilling {
            if blocked || self.seqs[r as usize].phase != Phase::Running {
                break;
            }
            let s = &self.seqs[r as usize];
            let start = s.computed_tokens;
            let known = s.known_tokens;
            let len = budget.grant(self.perf.as_ref(), start, known - start);
            if len == 0 {
                blocked = true;
                break;
            }
            if !self.reserve_slots(r, start + len, &mut plan) {
                blocked = true;
                break;
            }
            plan.items.push(ScheduledItem {
                request: r,
                start_tokens: start,
                len_tokens: len as u32,
                samples: start + len == known,
            });
            budget.record(self.perf.as_ref(), start, len);
        }
        // Like vLLM, admit nobody in a step that had to preempt.
        if !blocked && plan.preempted.is_empty() && plan.finished.is_empty() {
            self.admit(&mut plan, &mut budget);
        }
        self.stats.steps += 1;
        plan
    }

    /// Makes sure running sequence `r` has KV slots for `upto` tokens, preempting from the back
    /// of the running list (never a sequence already in this step's plan). False when `r` gets
    /// no slots this step (it may have been preempted itself).
    fn reserve_slots(&mut self, r: RequestIndex, upto: u64, plan: &mut StepPlan) -> bool {
        loop {
            let have = self.kv.sequence_tokens(SeqId::from(r)).unwrap_or(0);
            let extra = upto.saturating_sub(have);
            if extra == 0 {
                return true;
            }
            match self.kv.grow(SeqId::from(r), extra) {
                Ok(()) => {
                    self.running_slots += extra;
                    return true;
                }
                Err(KvError::OutOfBlocks { .. }) => {
                    let victim = *self.running.last().expect("r is running");
                    if victim == r && self.running.len() == 1 {
                        let generated = self.seqs[r as usize].generated;
                        self.finish(r);
                        self.running.pop();
                        plan.finished.push(Finished {
                            request: r,
                            generated_tokens: generated,
                            reason: FinishReason::KvCapacity,
                        });
                        return false;
                    }
                    if plan.items.iter().any(|item| item.request == victim) {
                        return false;
                    }
                    self.preempt_last();
                    plan.preempted.push(victim);
                    if victim == r {
                        return false;
                    }
                }
                Err(e) => unreachable!("running sequence lost its table: {e}"),
            }
        }
    }

    fn preempt_last(&mut self) {
        let r = self.running.pop().expect("something to preempt");
        let known = self.seqs[r as usize].known_tokens;
        self.leave_running(r, known);
        let s = &mut self.seqs[r as usize];
        self.stats.preemptions += 1;
        self.stats.preempted_tokens += s.computed_tokens;
        s.computed_tokens = 0;
        s.phase = Phase::Waiting;
        self.reserve_ratio = self.config.reserve_ratio_init;
        self.kv
            .free(SeqId::from(r))
            .expect("running sequence has a table");
        self.preempted.push_front(r);
    }

    fn enter_running(&mut self, r: RequestIndex) {
        self.running.push(r);
        self.running_demand += self.demand[r as usize];
        self.running_estimated_output += u64::from(self.estimated_output[r as usize]);
        self.running_generated += u64::from(self.seqs[r as usize].generated);
        self.running_known += self.seqs[r as usize].known_tokens;
        self.running_slots += self.kv.sequence_tokens(SeqId::from(r)).unwrap_or(0);
    }

    /// Bookkeeping for a sequence leaving the running set, called while it still holds its KV
    /// (the caller frees it and removes it from the list).
    fn leave_running(&mut self, r: RequestIndex, known_tokens: u64) {
        self.running_demand = self.running_demand - self.demand[r as usize];
        self.running_estimated_output -= u64::from(self.estimated_output[r as usize]);
        self.running_generated -= u64::from(self.seqs[r as usize].generated);
        self.running_known -= known_tokens;
        self.running_slots -= self.kv.sequence_tokens(SeqId::from(r)).unwrap_or(0);
    }

    /// KV blocks admission keeps free for the running sequences' growth: the rest of their
    /// prompts (certain) and their estimated remaining output times the adaptive ratio.
    fn reserved_blocks(&self) -> u32 {
        let prompt_rest = self.running_known.saturating_sub(self.running_slots) as f64;
        let output_rest = self
            .running_estimated_output
            .saturating_sub(self.running_generated) as f64;
        let tokens = prompt_rest + output_rest * self.reserve_ratio;
        (tokens / f64::from(self.config.block_tokens)).ceil() as u32
    }

    /// The critical path's floor on this step's compute ([`CriticalPath`]).
    fn compute_floor_secs(&mut self) -> f64 {
        let Some(perf) = self.perf.as_ref() else {
            return 0.0;
        };
        // Only where the power limit holds a balanced step (a second of compute beside a second
        // of memory traffic needs more than a second of energy): there throttled prefill saves
        // no time and each extra step pays the weights' pass again. Without the limit the
        // balance point is what overlap is for (and the floor, priced on estimates, cost
        // 4-15% on 100,000 requests of the paper's traces on `a100-80g`).
        let h = &perf.hardware;
        if h.power_floor_secs(h.effective_flops(), h.effective_bytes_per_sec()) <= 1.0 {
            return 0.0;
        }
        let mut rest = RunningRest::default();
        for &r in &self.running {
            let s = &self.seqs[r as usize];
            let to_go = self.estimated_output[r as usize].saturating_sub(s.generated);
            rest.longest_output_tokens = rest.longest_output_tokens.max(to_go);
            let kv_bytes = perf
                .decode_cost(s.known_tokens, u64::from(to_go) + 1)
                .decode_kv_bytes;
            rest.kv_secs += kv_bytes / perf.hardware.effective_bytes_per_sec();
        }
        let capacity_tokens = self.view().kv_capacity_tokens as f64;
        let full_step_kv_secs = capacity_tokens * perf.model.kv_bytes_per_token() as f64
            / perf.hardware.effective_bytes_per_sec();
        let seqs = &self.seqs;
        self.critical_path
            .compute_floor_secs(rest, full_step_kv_secs, |r| seqs[r as usize].admitted_once)
    }

    fn next_candidate(&mut self) -> Option<RequestIndex> {
        if let Some(r) = self.pending.take() {
            return Some(r);
        }
        if let Some(r) = self.preempted.pop_front() {
            return Some(r);
        }
        loop {
            let view = self.view();
            let r = self.policy.next(&view)?;
            if self
                .seqs
                .get(r as usize)
                .is_some_and(|s| s.phase == Phase::Waiting && !s.admitted_once)
            {
                return Some(r);
            }
        }
    }

    fn admit(&mut self, plan: &mut StepPlan, budget: &mut StepBudget) {
        let block = u64::from(self.config.block_tokens);
        let total_blocks = self.kv.usage().total_blocks;
        let watermark = (f64::from(total_blocks) * self.config.watermark_fraction).ceil() as u32;
        while budget.tokens_left > 0 && self.running.len() < self.config.max_running as usize {
            let Some(r) = self.next_candidate() else {
                break;
            };
            let keep_free = if self.running.is_empty() {
                0
            } else {
                watermark + self.reserved_blocks()
            };
            let request = &self.workload.requests[r as usize];
            let s = &mut self.seqs[r as usize];
            let hasher = s.hasher.get_or_insert_with(|| {
                let mut h = BlockHasher::new(self.config.block_tokens);
                for &chunk in &request.prompt {
                    h.push_chunk(chunk);
                }
                h
            });
            let hashes = hasher.hashes();
            let max_reuse = ((s.known_tokens - 1) / block) as usize;
            let reuse = self.kv.match_prefix(hashes).min(max_reuse);
            // A running sequence is computing the next block this one needs: wait for it rather
            // than compute the shared prefix twice.
            if hashes.get(reuse).is_some_and(|h| self.kv.being_computed(h)) {
                self.pending = Some(r);
                break;
            }
            let cached = reuse as u64 * block;
            let want = budget.grant(self.perf.as_ref(), cached, s.known_tokens - cached);
            if want == 0 {
                self.pending = Some(r);
                break;
            }
            // Room for the whole known sequence, not only this step's chunk: the rest of the
            // prompt follows in the next steps.
            let needed = self.kv.blocks_for_tokens(s.known_tokens) - reuse as u32;
            let lookup = if s.admitted_once { 0 } else { s.prompt_tokens };
            if self.kv.usage().available_blocks() < needed + keep_free
                || self
                    .kv
                    .admit(SeqId::from(r), hashes, reuse, want, lookup)
                    .is_err()
            {
                self.pending = Some(r);
                break;
            }
            if !s.admitted_once {
                s.admitted_once = true;
                self.critical_path.admitted(self.demand[r as usize]);
                self.stats.admitted += 1;
                self.stats.prefix_lookup_tokens += s.prompt_tokens;
                self.stats.prefix_hit_tokens += cached.min(s.prompt_tokens);
            }
            s.computed_tokens = cached;
            s.phase = Phase::Running;
            plan.items.push(ScheduledItem {
                request: r,
                start_tokens: cached,
                len_tokens: want as u32,
                samples: cached + want == s.known_tokens,
            });
            plan.admitted.push(r);
            self.enter_running(r);
            budget.record(self.perf.as_ref(), cached, want);
        }
    }

    fn finish(&mut self, r: RequestIndex) {
        let known = self.seqs[r as usize].known_tokens;
        self.leave_running(r, known);
        let s = &mut self.seqs[r as usize];
        s.phase = Phase::Finished;
        s.hasher = None;
        self.policy.on_finished(r);
        self.unfinished -= 1;
        self.stats.finished += 1;
        self.kv
            .free(SeqId::from(r))
            .expect("running sequence has a table");
    }

    /// Records that `plan` ran. For each sequence that sampled a token, `is_finished(r,
    /// generated_tokens)` says whether it is done. Returns the requests that finished.
    pub fn complete_step(
        &mut self,
        plan: &StepPlan,
        mut is_finished: impl FnMut(RequestIndex, u32) -> bool,
    ) -> Vec<Finished> {
        let block = u64::from(self.config.block_tokens);
        let mut finished = Vec::new();
        for item in &plan.items {
            let r = item.request;
            let s = &mut self.seqs[r as usize];
            debug_assert_eq!(s.phase, Phase::Running);
            debug_assert_eq!(s.computed_tokens, item.start_tokens);
            s.computed_tokens += u64::from(item.len_tokens);
            if item.is_decode() {
                self.stats.decode_tokens += 1;
            } else {
                self.stats.prefill_tokens += u64::from(item.len_tokens);
            }
            let hasher = s.hasher.as_mut().expect("admitted sequences have a hasher");
            let full = ((s.computed_tokens / block) as usize).min(hasher.hashes().len());
            self.kv
                .commit_hashes(SeqId::from(r), &hasher.hashes()[..full])
                .expect("running sequence has a table");
            if s.computed_tokens < s.known_tokens {
                continue;
            }
            hasher.push(
                Namespace::Output.id(self.output_id_base + u64::from(r)),
                u64::from(s.generated),
                1,
            );
            s.generated += 1;
            s.known_tokens += 1;
            self.stats.generated_tokens += 1;
            self.running_generated += 1;
            self.running_known += 1;
            let generated = s.generated;
            if generated == self.estimated_output[r as usize].saturating_add(1) {
                self.policy.on_overrun(r);
            }
            let reason = if is_finished(r, generated) {
                Some(FinishReason::Stop)
            } else if s.known_tokens >= self.max_context_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.finish(r);
                finished.push(Finished {
                    request: r,
                    generated_tokens: generated,
                    reason,
                });
            }
        }
        if !finished.is_empty() {
            let seqs = &self.seqs;
            self.running
                .retain(|&r| seqs[r as usize].phase == Phase::Running);
        }
        finished
    }
}
