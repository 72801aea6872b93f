//! Discrete-step trace simulator.
//!
//! Owns: driving the *same* [`scheduler::Scheduler`] and [`kv_cache`] the engine uses, with step
//! times from the [`scheduler::PerfModel`] instead of a GPU, and the per-policy report (makespan,
//! throughput, prefix-hit ratio, KV and resource utilisation, % of the optimal bound), and a
//! workload's data-parallel ranks simulated as replicas ([`ranks`]).
//!
//! Must not touch: scheduling decisions (all in the scheduler crate) or any GPU code.

pub mod paper;
pub mod ranks;

use std::time::Instant;

use kv_cache::KvCacheConfig;
use prefix_tree::RequestIndex;
use scheduler::{
    choose_length_sample, estimate_from_samples, optimal_bound, Executor, HardwareConfig,
    LengthKnowledge, ModelConfig, OptimalBound, PerfModel, PolicyInput, PolicyKind, Preparation,
    Rejection, RequestEstimates, Scheduler, SchedulerConfig, SchedulerError, SchedulerStats,
    TokenBudget,
};
use serde::Serialize;
use workload::Workload;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("simulation stalled at step {step}: {unfinished} requests unfinished but nothing could be scheduled")]
    Stalled { step: u64, unfinished: usize },
}

/// Everything a simulation run depends on besides the workload and the policy.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    pub model: ModelConfig,
    pub hardware: HardwareConfig,
    pub executor: Executor,
    pub scheduler: SchedulerConfig,
    /// Fraction of device memory for weights, activations and the KV cache.
    pub kv_memory_fraction: f64,
    /// Use exactly this many KV blocks instead of sizing the cache from memory (vLLM's
    /// `num_gpu_blocks_override`).
    pub num_gpu_blocks_override: Option<u32>,
    #[serde(skip)]
    pub lengths: LengthKnowledge,
    /// Under sampled lengths, simulate the sample run as its own phase before the rest, as the
    /// engine runs it (otherwise the sample's lengths come for free).
    pub length_sample_phase: bool,
    pub seed: u64,
    /// Keep one [`StepRecord`] every this many steps (0: none).
    pub timeline_every: u64,
}

impl SimConfig {
    /// Model and hardware from presets, then an optional override TOML file's `[model]` and
    /// `[hardware]` tables.
    pub fn from_presets(
        model: &str,
        hardware: &str,
        overrides: Option<&std::path::Path>,
        executor: Executor,
    ) -> Result<SimConfig, SchedulerError> {
        let file = match overrides {
            Some(path) => scheduler::OverrideFile::read(path)?,
            None => scheduler::OverrideFile::default(),
        };
        Ok(SimConfig::new(
            file.model(model)?,
            file.hardware(hardware)?,
            executor,
        ))
    }

    pub fn new(model: ModelConfig, hardware: HardwareConfig, executor: Executor) -> Self {
        SimConfig {
            model,
            hardware,
            executor,
            scheduler: SchedulerConfig::default(),
            kv_memory_fraction: 0.9,
            num_gpu_blocks_override: None,
            lengths: LengthKnowledge::default(),
            length_sample_phase: false,
            seed: 0,
            timeline_every: 0,
        }
    }
}

/// One sampled step, for timeline plots.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub clock_secs: f64,
    pub step_secs: f64,
    pub compute_secs: f64,
    pub memory_secs: f64,
    pub prefill_tokens: u64,
    pub decode_sequences: u64,
    pub running: usize,
    pub kv_used_fraction: f64,
}

/// What one policy achieved on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    /// Set by the caller (the simulator does not know the workload's name).
    pub workload: String,
    pub model: String,
    pub hardware: String,
    pub policy: String,
    pub executor: String,
    pub token_budget: String,
    pub lengths: String,
    pub requests: usize,
    pub finished: u64,
    pub rejected: u64,
    pub steps: u64,
    pub makespan_secs: f64,
    /// Prompt tokens of finished requests.
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Output tokens per second.
    pub output_tokens_per_sec: f64,
    /// Prompt plus output tokens per second (the paper's throughput).
    pub total_tokens_per_sec: f64,
    /// Prompt tokens served from the prefix cache at first admission.
    pub prefix_hit_ratio: f64,
    /// What a perfect prefix cache would save (from the tree).
    pub sharing_ratio: f64,
    /// Time-weighted fraction of KV blocks held by running sequences.
    pub kv_utilization: f64,
    /// Busy time of each resource over the makespan.
    pub compute_utilization: f64,
    pub memory_utilization: f64,
    pub preemptions: u64,
    pub preempted_tokens: u64,
    pub optimal_secs: f64,
    /// Optimal bound over makespan, in percent.
    pub percent_of_optimal: f64,
    /// Wall time to prepare (tree, estimates) and build the policy's order.
    pub schedule_wall_secs: f64,
    /// Wall time of the whole simulated run.
    pub sim_wall_secs: f64,
    #[serde(skip)]
    pub timeline: Vec<StepRecord>,
    #[serde(skip)]
    pub rejections: Vec<(RequestIndex, Rejection)>,
}

fn token_budget_label(budget: TokenBudget) -> String {
    match budget {
        TokenBudget::Balanced { target_density, .. } => format!("balanced:{target_density:.2}"),
        TokenBudget::Paced { .. } => "paced".to_string(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One workload prepared once, then simulated under any number of policies.
pub struct Simulation<'w> {
    workload: &'w Workload,
    config: SimConfig,
    perf: PerfModel,
    kv: KvCacheConfig,
    preparation: Preparation,
    bound: OptimalBound,
    prepare_wall_secs: f64,
    targets: Vec<u32>,
}

impl<'w> Simulation<'w> {
    pub fn new(workload: &'w Workload, config: SimConfig) -> Result<Self, SimError> {
        let started = Instant::now();
        let mut perf = PerfModel::new(
            config.model.clone(),
            config.hardware.clone(),
            config.executor,
        );
        let sched = &config.scheduler;
        let num_blocks = match config.num_gpu_blocks_override {
            Some(0) => {
                return Err(SchedulerError::Config(
                    "num_gpu_blocks_override must be positive".into(),
                )
                .into())
            }
            Some(blocks) => blocks,
            None => perf.kv_capacity_blocks(
                config.kv_memory_fraction,
                sched.block_tokens,
                sched.max_batch_tokens,
            )?,
        };
        perf.set_decode_concurrency(
            f64::from(num_blocks) * f64::from(sched.block_tokens),
            workload.summary().prompt_tokens_mean,
            sched.max_running,
        );
        let kv = KvCacheConfig {
            block_tokens: sched.block_tokens,
            num_blocks,
            bytes_per_token: config.model.kv_bytes_per_token(),
            enable_prefix_caching: sched.enable_prefix_caching,
        };
        let preparation = Preparation::new(workload, &perf, config.lengths, config.seed);
        let bound = optimal_bound(
            workload,
            &preparation.tree,
            &perf,
            sched.max_batch_tokens,
            sched.max_running,
        );
        let targets = workload
            .requests
            .iter()
            .map(|r| r.sim_output_tokens())
            .collect();
        Ok(Simulation {
            workload,
            perf,
            kv,
            preparation,
            bound,
            prepare_wall_secs: started.elapsed().as_secs_f64(),
            targets,
            config,
        })
    }

    pub fn preparation(&self) -> &Preparation {
        &self.preparation
    }

    pub fn bound(&self) -> &OptimalBound {
        &self.bound
    }

    pub fn perf(&self) -> &PerfModel {
        &self.perf
    }

    pub fn kv_config(&self) -> &KvCacheConfig {
        &self.kv
    }

    /// Simulates `kind` to completion. `progress(done, total)` is called every 256 steps.
    ///
    /// With [`SimConfig::length_sample_phase`] and sampled lengths, the run is the engine's: the
    /// sample runs first on its own (the scheduler told only `max_tokens`), then the rest with
    /// estimates from what the sample produced; both phases' time counts.
    pub fn run(
        &self,
        name: &str,
        kind: &PolicyKind,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<SimReport, SimError> {
        let started = Instant::now();
        let mut acc = PhaseTotals::default();
        let n = self.workload.len();
        let schedule_wall_secs;
        match (self.config.lengths, self.config.length_sample_phase) {
            (
                LengthKnowledge::Sampled {
                    fraction,
                    min_samples,
                    min_node_samples,
                },
                true,
            ) => {
                // Requests whose length is known (video generation) need no sample run.
                let unknown: Vec<usize> = (0..n)
                    .filter(|&i| !self.workload.requests[i].output_known)
                    .collect();
                let mut chosen: Vec<usize> =
                    choose_length_sample(unknown.len(), fraction, min_samples, self.config.seed)
                        .into_iter()
                        .map(|k| unknown[k])
                        .collect();
                chosen.sort_unstable();
                let sample = self.subset(&chosen);
                let estimates = sample
                    .requests
                    .iter()
                    .map(|r| r.max_tokens.max(1))
                    .collect();
                let prep = Preparation::with_estimates(&sample, &self.perf, estimates);
                self.run_phase(&sample, &chosen, &prep, kind, &mut acc, progress)?;
                let observed: Vec<(usize, u32)> =
                    chosen.iter().map(|&i| (i, self.targets[i])).collect();
                let all = estimate_from_samples(
                    self.workload,
                    &self.preparation.tree,
                    &observed,
                    min_node_samples,
                );
                let mut sampled = vec![false; n];
                for &i in &chosen {
                    sampled[i] = true;
                }
                let rest: Vec<usize> = (0..n).filter(|&i| !sampled[i]).collect();
                let rest_workload = self.subset(&rest);
                let estimates = rest.iter().map(|&i| all[i]).collect();
                let prep = Preparation::with_estimates(&rest_workload, &self.perf, estimates);
                self.run_phase(&rest_workload, &rest, &prep, kind, &mut acc, progress)?;
                schedule_wall_secs = self.prepare_wall_secs + acc.policy_build_secs;
            }
            _ => {
                let all: Vec<usize> = (0..n).collect();
                self.run_phase(
                    self.workload,
                    &all,
                    &self.preparation,
                    kind,
                    &mut acc,
                    progress,
                )?;
                schedule_wall_secs = self.prepare_wall_secs + acc.policy_build_secs;
            }
        }
        let stats = acc.stats;
        let clock = acc.clock;
        let makespan = clock.max(f64::MIN_POSITIVE);
        Ok(SimReport {
            workload: String::new(),
            model: self.config.model.name.clone(),
            hardware: self.config.hardware.name.clone(),
            policy: name.to_string(),
            executor: self.config.executor.to_string(),
            token_budget: token_budget_label(acc.token_budget.unwrap_or(TokenBudget::Fixed)),
            lengths: format!("{:?}", self.config.lengths),
            requests: self.workload.len(),
            finished: stats.finished,
            rejected: stats.rejected,
            steps: stats.steps,
            makespan_secs: clock,
            prompt_tokens: acc.prompt_tokens,
            output_tokens: stats.generated_tokens,
            output_tokens_per_sec: stats.generated_tokens as f64 / makespan,
            total_tokens_per_sec: (acc.prompt_tokens + stats.generated_tokens) as f64 / makespan,
            prefix_hit_ratio: stats.prefix_hit_ratio(),
            sharing_ratio: self.preparation.tree.sharing_ratio(),
            kv_utilization: acc.kv_used_time / makespan,
            compute_utilization: acc.compute_busy / makespan,
            memory_utilization: acc.memory_busy / makespan,
            preemptions: stats.preemptions,
            preempted_tokens: stats.preempted_tokens,
            optimal_secs: self.bound.secs,
            percent_of_optimal: 100.0 * self.bound.secs / makespan,
            schedule_wall_secs,
            sim_wall_secs: started.elapsed().as_secs_f64(),
            timeline: acc.timeline,
            rejections: acc.rejections,
        })
    }

    /// The requests `indices` of the workload, in that order.
    fn subset(&self, indices: &[usize]) -> Workload {
        Workload {
            requests: indices
                .iter()
                .map(|&i| self.workload.requests[i].clone())
                .collect(),
            sources: self.workload.sources.clone(),
        }
    }

    /// Runs `workload` (the requests `indices` of the whole workload) to completion, adding its
    /// time and counters to `acc`.
    fn run_phase(
        &self,
        workload: &Workload,
        indices: &[usize],
        preparation: &Preparation,
        kind: &PolicyKind,
        acc: &mut PhaseTotals,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), SimError> {
        if workload.is_empty() {
            return Ok(());
        }
        let built = Instant::now();
        let policy = kind.build(&PolicyInput {
            preparation,
            perf: &self.perf,
            seed: self.config.seed,
        });
        acc.policy_build_secs += built.elapsed().as_secs_f64();
        let mut scheduler = Scheduler::new(
            workload,
            self.config.scheduler.clone(),
            self.kv,
            self.config.model.max_context_tokens,
            policy,
            RequestEstimates {
                demand: preparation.annotation.attributed.clone(),
                output_tokens: preparation.estimated_output_tokens.clone(),
            },
            Some(self.perf.clone()),
        )?;
        // As the engine does: an earlier phase's cached prefixes stay usable, its outputs named
        // below the whole workload's size.
        if let Some(previous) = acc.kv_cache.take() {
            scheduler.continue_cache(previous, self.workload.len() as u64)?;
        }
        let total = self.workload.len() as u64;
        acc.token_budget.get_or_insert(scheduler.token_budget());
        let before = acc.stats;
        let targets: Vec<u32> = indices.iter().map(|&i| self.targets[i]).collect();
        while !scheduler.is_done() {
            let plan = scheduler.schedule();
            if plan.items.is_empty() {
                if scheduler.is_done() {
                    break;
                }
                if plan.finished.is_empty() && plan.preempted.is_empty() {
                    return Err(SimError::Stalled {
                        step: before.steps + scheduler.stats().steps,
                        unfinished: scheduler.unfinished(),
                    });
                }
                continue;
            }
            let t = self.perf.time(&plan.cost(&self.perf));
            let kv_used = scheduler.kv_usage().used_fraction();
            acc.clock += t.secs;
            acc.compute_busy += t.compute_secs;
            acc.memory_busy += t.memory_secs;
            acc.kv_used_time += kv_used * t.secs;
            let step = before.steps + scheduler.stats().steps;
            if self.config.timeline_every > 0 && step.is_multiple_of(self.config.timeline_every) {
                let decode_sequences = plan.decode_tokens();
                acc.timeline.push(StepRecord {
                    step,
                    clock_secs: acc.clock,
                    step_secs: t.secs,
                    compute_secs: t.compute_secs,
                    memory_secs: t.memory_secs,
                    prefill_tokens: plan.prefill_tokens(),
                    decode_sequences,
                    running: scheduler.running().len(),
                    kv_used_fraction: kv_used,
                });
            }
            let finished =
                scheduler.complete_step(&plan, |r, generated| generated >= targets[r as usize]);
            for f in finished.iter().chain(&plan.finished) {
                acc.prompt_tokens += workload.requests[f.request as usize].prompt_tokens();
            }
            if step.is_multiple_of(256) {
                progress(before.finished + scheduler.stats().finished, total);
            }
        }
        acc.stats += scheduler.stats();
        progress(acc.stats.finished, total);
        acc.rejections.extend(
            scheduler
                .rejections()
                .iter()
                .map(|(r, why)| (indices[*r as usize] as RequestIndex, why.clone())),
        );
        acc.kv_cache = Some(scheduler.into_kv_cache());
        Ok(())
    }
}

/// What the phases of one simulated run add up to.
#[derive(Default)]
struct PhaseTotals {
    clock: f64,
    compute_busy: f64,
    memory_busy: f64,
    kv_used_time: f64,
    prompt_tokens: u64,
    stats: SchedulerStats,
    timeline: Vec<StepRecord>,
    rejections: Vec<(RequestIndex, Rejection)>,
    token_budget: Option<TokenBudget>,
    policy_build_secs: f64,
    /// The last phase's KV cache, for the next phase to go on from.
    kv_cache: Option<kv_cache::KvCacheManager>,
}
