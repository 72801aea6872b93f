//! The offline batch engine's core: the very [`scheduler::Scheduler`] the simulator uses,
//! driving a real model (any [`model::StepModel`]: burn on the CPU, the CUDA fast path) step by
//! step.
//!
//! Owns: turning each step's plan into a mixed forward batch over the paged cache (token ids,
//! positions, the KV manager's block tables), sampling, stop criteria, the sample run behind
//! BlendServe's output-length estimates, and reporting steps and finished generations to an
//! [`Observer`]. Preempted sequences are recomputed from their prompt and generated tokens,
//! mostly from the prefix cache.
//!
//! Must not touch: scheduling decisions (the scheduler's), request files and the CLI (the
//! `blendserve` binary's), GPU kernels (the model's).

mod probe;

use std::time::Instant;

use kv_cache::{KvCacheConfig, KvCacheManager, KvUsage, SeqId};
use model::{
    ForwardBatch, ModelError, Sampler, SamplingParams, SequenceChunk, StepModel, StopCriteria,
    StopReason,
};
use scheduler::{
    FinishReason, LengthKnowledge, PolicyInput, PolicyKind, Preparation, RequestEstimates,
    Scheduler, SchedulerConfig, SchedulerError, SchedulerStats,
};
use workload::{Chunk, Request, Workload};

pub use probe::{balanced_probe, probe_cost};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("the engine stalled: {0} requests unfinished but nothing could be scheduled")]
    Stalled(usize),
    #[error("known output lengths were asked for, but request {0} has none")]
    UnknownLength(usize),
    /// The observer failed (writing results); the run stops so that nothing more is lost.
    #[error("handing out results: {0}")]
    Observer(#[source] std::io::Error),
}

/// One request to generate for: its prompt token ids and how to sample and stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Stop tokens and `max_tokens` (the limit the scheduler sees).
    pub stop: StopCriteria,
    /// Replaying a trace: the generation ends after this many tokens, as if the model had
    /// produced EOS there. The scheduler does not see it (unless lengths are
    /// [`LengthKnowledge::Known`]).
    pub trace_output_tokens: Option<u32>,
    /// `trace_output_tokens` is known before the run (a length the request fixes, as video
    /// generation's frames do): every length mode gives it to the scheduler as is, and the
    /// length-sample phase neither runs it nor learns from it (the simulator's rule).
    pub output_known: bool,
}

impl GenerationRequest {
    fn check(&self, token: u32, generated: u32) -> Option<GenerationEnd> {
        if let Some(reason) = self.stop.check(token, generated) {
            return Some(GenerationEnd::Stop(reason));
        }
        (self.trace_output_tokens == Some(generated)).then_some(GenerationEnd::TraceLength)
    }

    /// The scheduler's view of this request, with `output_tokens` as its true length if known
    /// (a request whose length is [`GenerationRequest::output_known`] always carries it).
    pub fn scheduler_request(&self, output_tokens: Option<u32>) -> Request {
        let known = self.declared_output_tokens();
        Request {
            id: self.id.clone(),
            prompt: self.prompt.iter().map(|&t| Chunk::token(t)).collect(),
            max_tokens: self.stop.max_tokens.max(1),
            output_tokens: known.or(output_tokens),
            output_known: known.is_some(),
            source: 0,
        }
    }

    /// The trace length, within `max_tokens` (what [`LengthKnowledge::Known`] tells).
    fn known_output_tokens(&self) -> Option<u32> {
        self.trace_output_tokens
            .map(|t| t.min(self.stop.max_tokens).max(1))
    }

    /// The length the request itself declares known before the run, if it does.
    fn declared_output_tokens(&self) -> Option<u32> {
        self.known_output_tokens().filter(|_| self.output_known)
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationEnd {
    Stop(StopReason),
    /// The observer ended it (a stop string).
    StopText,
    /// It reached the length its trace recorded.
    TraceLength,
    /// The sequence reached the model's context length.
    ContextLength,
    /// The sequence alone outgrew the KV cache.
    KvCapacity,
    /// Refused before running (the message says why).
    Rejected,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Index of the request in the input.
    pub index: usize,
    pub tokens: Vec<u32>,
    pub end: GenerationEnd,
    pub prompt_tokens: usize,
    /// Why the request was refused, for [`GenerationEnd::Rejected`].
    pub rejection: Option<String>,
}

/// Engine settings besides the scheduler's.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub policy: PolicyKind,
    pub num_kv_blocks: u32,
    pub seed: u64,
    /// What policies know of output lengths. `Sampled` runs a random sample of the requests
    /// first (their results are final, not thrown away) and estimates the rest from it.
    pub lengths: LengthKnowledge,
}

/// Which part of a run a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    /// The sample run behind output-length estimates.
    LengthSample,
    Main,
}

/// What one step did, for progress reports.
#[derive(Clone, Copy, Debug)]
pub struct StepReport {
    pub phase: RunPhase,
    /// Prompt (and recomputed) tokens computed this step.
    pub prefill_tokens: u64,
    /// Sequences that decoded one token this step.
    pub decode_tokens: u64,
    /// Tokens sampled this step.
    pub sampled_tokens: u64,
    pub running: usize,
    pub kv: KvUsage,
    /// Wall time of the step (scheduling, batch building, the forward pass, sampling).
    pub step_secs: f64,
    /// The step's work under the performance model, and the model's time for it.
    pub cost: scheduler::StepCost,
    pub predicted: scheduler::StepTime,
    /// Counters of the run so far (both phases).
    pub totals: EngineStats,
}

/// Receives what the engine produces. Closures taking a [`Generation`] are observers.
pub trait Observer {
    /// A request ended (in finishing order). An error stops the run.
    fn finished(&mut self, generation: Generation) -> std::io::Result<()>;
    /// A step ran.
    fn step(&mut self, _report: &StepReport) {}
    /// After each sampled token: whether request `index` should end now (stop strings).
    fn stop_text(&mut self, _index: usize, _generated: &[u32]) -> bool {
        false
    }
}

impl<F: FnMut(Generation)> Observer for F {
    fn finished(&mut self, generation: Generation) -> std::io::Result<()> {
        self(generation);
        Ok(())
    }
}

/// Counters of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// The scheduler's counters, summed over the run's phases.
    pub scheduler: SchedulerStats,
    /// Requests that ended, refused ones included.
    pub ended: u64,
    /// Requests run in the length-sample phase, and its wall time.
    pub sample_requests: u64,
    pub sample_secs: f64,
}

/// Why `r` cannot run at all, checked before scheduling.
fn invalid(r: &GenerationRequest, config: &model::ModelConfig) -> Option<String> {
    if r.prompt.is_empty() {
        return Some("empty prompt".into());
    }
    if r.stop.max_tokens == 0 {
        return Some("max_tokens must be at least 1".into());
    }
    match config.check_token_ids(&r.prompt) {
        Ok(()) => None,
        Err(ModelError::Batch(why)) => Some(why),
        Err(other) => Some(other.to_string()),
    }
}

/// The scheduler's view of some requests.
fn workload_of(requests: &[GenerationRequest], indices: &[usize]) -> Workload {
    Workload {
        requests: indices
            .iter()
            .map(|&i| requests[i].scheduler_request(None))
            .collect(),
        sources: vec!["engine".into()],
    }
}

/// Generates for every request, telling `observer` as each one ends (in finishing order) and
/// after every step. Invalid requests (empty prompt, token ids outside the vocabulary, prompts
/// too long for the context or the cache) end as [`GenerationEnd::Rejected`]; the rest run.
pub fn generate<M: StepModel + ?Sized, O: Observer + ?Sized>(
    model: &mut M,
    requests: &[GenerationRequest],
    config: &EngineConfig,
    perf: &scheduler::PerfModel,
    observer: &mut O,
) -> Result<EngineStats, EngineError> {
    let mut valid = Vec::with_capacity(requests.len());
    for (index, r) in requests.iter().enumerate() {
        match invalid(r, model.config()) {
            Some(why) => observer
                .finished(Generation {
                    index,
                    tokens: Vec::new(),
                    end: GenerationEnd::Rejected,
                    prompt_tokens: r.prompt.len(),
                    rejection: Some(why),
                })
                .map_err(EngineError::Observer)?,
            None => valid.push(index),
        }
    }
    model.allocate_cache(
        config.num_kv_blocks as usize,
        config.scheduler.block_tokens as usize,
    )?;
    // Price single requests as the simulator does for this cache and these prompts.
    let mut perf = perf.clone();
    let mean_prompt_tokens = valid
        .iter()
        .map(|&i| requests[i].prompt.len() as f64)
        .sum::<f64>()
        / valid.len().max(1) as f64;
    perf.set_decode_concurrency(
        f64::from(config.num_kv_blocks) * f64::from(config.scheduler.block_tokens),
        mean_prompt_tokens,
        config.scheduler.max_running,
    );
    let perf = &perf;
    let mut run = Run {
        requests,
        samplers: requests.iter().map(|r| Sampler::new(r.sampling)).collect(),
        generated: vec![Vec::new(); requests.len()],
        output_tokens: vec![0; requests.len()],
        ended: vec![None; requests.len()],
        totals: EngineStats::default(),
        config,
        perf,
        kv_cache: None,
    };
    match config.lengths {
        LengthKnowledge::MaxTokens => {
            let estimates = valid
                .iter()
                .map(|&i| {
                    let r = &requests[i];
                    r.declared_output_tokens().unwrap_or(r.stop.max_tokens)
                })
                .collect();
            run.phase(model, observer, &valid, estimates, RunPhase::Main)?;
        }
        LengthKnowledge::Known => {
            let estimates = valid
                .iter()
                .map(|&i| {
                    requests[i]
                        .known_output_tokens()
                        .ok_or(EngineError::UnknownLength(i))
                })
                .collect::<Result<Vec<u32>, _>>()?;
            run.phase(model, observer, &valid, estimates, RunPhase::Main)?;
        }
        LengthKnowledge::Sampled {
            fraction,
            min_samples,
            min_node_samples,
        } => {
            let t0 = Instant::now();
            // Requests of known length are no sample of the others (video lengths say nothing
            // of chat answers beside them).
            let unknown: Vec<usize> = valid
                .iter()
                .copied()
                .filter(|&i| !requests[i].output_known)
                .collect();
            let mut chosen: Vec<usize> =
                scheduler::choose_length_sample(unknown.len(), fraction, min_samples, config.seed)
                    .into_iter()
                    .map(|k| unknown[k])
                    .collect();
            chosen.sort_unstable();
            let estimates = chosen
                .iter()
                .map(|&i| requests[i].stop.max_tokens)
                .collect();
            run.phase(model, observer, &chosen, estimates, RunPhase::LengthSample)?;
            run.totals.sample_requests = chosen.len() as u64;
            run.totals.sample_secs = t0.elapsed().as_secs_f64();
            // Estimate over the tree of every valid request from what the sample produced.
            let all = workload_of(requests, &valid);
            let tree = scheduler::build_tree(&all);
            let observed: Vec<(usize, u32)> = valid
                .iter()
                .enumerate()
                .filter_map(|(k, &i)| run.observed_length(i).map(|len| (k, len)))
                .collect();
            let estimates_all =
                scheduler::estimate_from_samples(&all, &tree, &observed, min_node_samples);
            let (rest, estimates): (Vec<usize>, Vec<u32>) = valid
                .iter()
                .zip(estimates_all)
                .filter(|(&i, _)| run.ended[i].is_none())
                .map(|(&i, e)| (i, e))
                .unzip();
            run.phase(model, observer, &rest, estimates, RunPhase::Main)?;
        }
    }
    Ok(run.totals)
}

/// State shared by the phases of one run.
struct Run<'a> {
    requests: &'a [GenerationRequest],
    samplers: Vec<Sampler>,
    generated: Vec<Vec<u32>>,
    /// Tokens each finished request generated.
    output_tokens: Vec<u32>,
    /// Why each request ended, once it has.
    ended: Vec<Option<GenerationEnd>>,
    totals: EngineStats,
    config: &'a EngineConfig,
    perf: &'a scheduler::PerfModel,
    /// The last phase's KV cache manager, for the next phase to go on from.
    kv_cache: Option<KvCacheManager>,
}

impl Run<'_> {
    /// The output length request `i` showed, if it ran to a natural end.
    fn observed_length(&self, i: usize) -> Option<u32> {
        match self.ended[i]? {
            GenerationEnd::Rejected | GenerationEnd::KvCapacity => None,
            _ => Some(self.output_tokens[i]),
        }
    }

    fn finish<O: Observer + ?Sized>(
        &mut self,
        observer: &mut O,
        r: usize,
        end: GenerationEnd,
        rejection: Option<String>,
    ) -> Result<(), EngineError> {
        let tokens = std::mem::take(&mut self.generated[r]);
        self.output_tokens[r] = tokens.len() as u32;
        self.ended[r] = Some(end);
        self.totals.ended += 1;
        observer
            .finished(Generation {
                index: r,
                tokens,
                end,
                prompt_tokens: self.requests[r].prompt.len(),
                rejection,
            })
            .map_err(EngineError::Observer)
    }

    /// Runs `indices` (requests of the input) to the end with the scheduler seeing
    /// `estimates` as their output lengths.
    fn phase<M: StepModel + ?Sized, O: Observer + ?Sized>(
        &mut self,
        model: &mut M,
        observer: &mut O,
        indices: &[usize],
        estimates: Vec<u32>,
        phase: RunPhase,
    ) -> Result<(), EngineError> {
        if indices.is_empty() {
            return Ok(());
        }
        let requests = self.requests;
        let config = self.config;
        let perf = self.perf;
        let workload = workload_of(requests, indices);
        let preparation = Preparation::with_estimates(&workload, perf, estimates);
        let policy = config.policy.build(&PolicyInput {
            preparation: &preparation,
            perf,
            seed: config.seed,
        });
        let kv = KvCacheConfig {
            block_tokens: config.scheduler.block_tokens,
            num_blocks: config.num_kv_blocks,
            // K and V, every layer, in the element the model's cache stores.
            bytes_per_token: model.kv_bytes_per_token(),
            enable_prefix_caching: config.scheduler.enable_prefix_caching,
        };
        let mut sched = Scheduler::new(
            &workload,
            config.scheduler.clone(),
            kv,
            model.config().max_position_embeddings as u64,
            policy,
            RequestEstimates {
                demand: preparation.annotation.attributed.clone(),
                output_tokens: preparation.estimated_output_tokens.clone(),
            },
            Some(perf.clone()),
        )?;
        // An earlier phase's cached prefixes stay usable: the device cache is the same. Its
        // requests' outputs were named by their indices in it, below `requests.len()`.
        if let Some(previous) = self.kv_cache.take() {
            sched.continue_cache(previous, requests.len() as u64)?;
        }
        // The scheduler's counters of earlier phases.
        let before = self.totals.scheduler;
        // Why each of this phase's requests ends, set when its last token is sampled.
        let mut pending_end: Vec<Option<GenerationEnd>> = vec![None; indices.len()];
        for (k, why) in sched.rejections().to_vec() {
            self.finish(
                observer,
                indices[k as usize],
                GenerationEnd::Rejected,
                Some(why.to_string()),
            )?;
        }
        while !sched.is_done() {
            let t0 = Instant::now();
            let plan = sched.schedule();
            for f in &plan.finished {
                self.finish(
                    observer,
                    indices[f.request as usize],
                    GenerationEnd::KvCapacity,
                    None,
                )?;
            }
            if plan.items.is_empty() {
                if plan.finished.is_empty() && plan.preempted.is_empty() && !sched.is_done() {
                    return Err(EngineError::Stalled(sched.unfinished()));
                }
                continue;
            }
            let sequences = plan
                .items
                .iter()
                .map(|item| {
                    let r = indices[item.request as usize];
                    let start = item.start_tokens as usize;
                    let end = start + item.len_tokens as usize;
                    let prompt = &requests[r].prompt;
                    let generated = &self.generated[r];
                    let tokens = (start..end)
                        .map(|p| {
                            if p < prompt.len() {
                                prompt[p]
                            } else {
                                generated[p - prompt.len()]
                            }
                        })
                        .collect();
                    SequenceChunk {
                        tokens,
                        start_position: start,
                        block_table: sched
                            .kv()
                            .block_table(SeqId::from(item.request))
                            .expect("scheduled sequences hold KV")
                            .to_vec(),
                        logits: item.samples,
                    }
                })
                .collect();
            let batch = ForwardBatch { sequences };
            // Greedy rows need only their argmax: the model may take it without copying logits.
            let all_greedy = plan
                .items
                .iter()
                .filter(|i| i.samples)
                .all(|i| self.samplers[indices[i.request as usize]].is_greedy());
            let sampled = if all_greedy {
                model.step_greedy(&batch)?
            } else {
                let rows = model.step_logits(&batch)?;
                plan.items
                    .iter()
                    .filter(|i| i.samples)
                    .zip(&rows)
                    .map(|(item, row)| self.samplers[indices[item.request as usize]].sample(row))
                    .collect()
            };
            let mut sampled = sampled.into_iter();
            for item in plan.items.iter().filter(|i| i.samples) {
                let r = indices[item.request as usize];
                let token = sampled
                    .next()
                    .expect("one sampled token per sampling sequence");
                self.generated[r].push(token);
                let n = self.generated[r].len() as u32;
                pending_end[item.request as usize] = requests[r].check(token, n).or_else(|| {
                    observer
                        .stop_text(r, &self.generated[r])
                        .then_some(GenerationEnd::StopText)
                });
            }
            let finished = sched.complete_step(&plan, |k, _| pending_end[k as usize].is_some());
            for f in finished {
                let r = indices[f.request as usize];
                let end = match f.reason {
                    FinishReason::Stop => {
                        pending_end[f.request as usize].expect("stopped sequences have a reason")
                    }
                    FinishReason::Length => GenerationEnd::ContextLength,
                    FinishReason::KvCapacity => GenerationEnd::KvCapacity,
                };
                self.finish(observer, r, end, None)?;
            }
            let mut totals = self.totals;
            totals.scheduler = before;
            totals.scheduler += sched.stats();
            let cost = plan.cost(perf);
            observer.step(&StepReport {
                phase,
                prefill_tokens: plan.prefill_tokens(),
                decode_tokens: plan.decode_tokens(),
                sampled_tokens: plan.items.iter().filter(|i| i.samples).count() as u64,
                running: sched.running().len(),
                kv: sched.kv_usage(),
                step_secs: t0.elapsed().as_secs_f64(),
                cost,
                predicted: perf.time(&cost),
                totals,
            });
        }
        self.totals.scheduler = before;
        self.totals.scheduler += sched.stats();
        self.kv_cache = Some(sched.into_kv_cache());
        Ok(())
    }
}

/// The performance model's view of a loaded model: its shape, with weights and KV cache in
/// elements of `dtype_bytes`.
pub fn perf_model_config(
    config: &model::ModelConfig,
    name: &str,
    dtype_bytes: u32,
) -> scheduler::ModelConfig {
    scheduler::ModelConfig {
        name: name.to_string(),
        layers: config.num_layers as u32,
        hidden: config.hidden_size as u32,
        heads: config.num_heads as u32,
        kv_heads: config.num_kv_heads as u32,
        head_dim: config.head_dim as u32,
        intermediate: config.intermediate_size as u32,
        vocab: config.vocab_size as u32,
        tied_embeddings: config.tie_word_embeddings,
        dtype_bytes,
        max_context_tokens: config.max_position_embeddings as u64,
    }
}
