//! The offline batch engine's core: the very [`scheduler::Scheduler`] the simulator uses,
//! driving a real model (any [`model::StepModel`]: burn on the CPU, the CUDA fast path) step by
//! step.
//!
//! Owns: turning each step's plan into a mixed forward batch over the paged cache (token ids,
//! positions, the KV manager's block tables), sampling, stop criteria, and collecting finished
//! generations. Preempted sequences are recomputed from their prompt and generated tokens, mostly
//! from the prefix cache.
//!
//! Must not touch: scheduling decisions (the scheduler's), request files and the CLI (the
//! `blendserve` binary's), GPU kernels (the model's).

use kv_cache::{KvCacheConfig, SeqId};
use model::{
    ForwardBatch, ModelError, Sampler, SamplingParams, SequenceChunk, StepModel, StopCriteria,
    StopReason,
};
use scheduler::{
    FinishReason, PolicyInput, PolicyKind, Preparation, RequestEstimates, Scheduler,
    SchedulerConfig, SchedulerError,
};
use workload::{Chunk, Request, Workload};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    #[error("the engine stalled: {0} requests unfinished but nothing could be scheduled")]
    Stalled(usize),
}

/// One request to generate for: its prompt token ids and how to sample and stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationEnd {
    Stop(StopReason),
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
}

/// Counters of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    pub prefix_hit_ratio: f64,
    pub preemptions: u64,
    pub generated_tokens: u64,
}

/// Generates for every request, calling `on_finished` as each one ends (in finishing order).
pub fn generate<M: StepModel + ?Sized>(
    model: &mut M,
    requests: &[GenerationRequest],
    config: &EngineConfig,
    perf: &scheduler::PerfModel,
    mut on_finished: impl FnMut(Generation),
) -> Result<EngineStats, EngineError> {
    for (index, r) in requests.iter().enumerate() {
        if r.prompt.is_empty() {
            return Err(EngineError::Request {
                index,
                message: "empty prompt".into(),
            });
        }
        if let Some(&t) = r
            .prompt
            .iter()
            .find(|&&t| t as usize >= model.config().vocab_size)
        {
            return Err(EngineError::Request {
                index,
                message: format!("token id {t} is outside the vocabulary"),
            });
        }
    }
    let workload = Workload {
        requests: requests
            .iter()
            .map(|r| Request {
                id: r.id.clone(),
                prompt: r.prompt.iter().map(|&t| Chunk::token(t)).collect(),
                max_tokens: r.stop.max_tokens.max(1),
                output_tokens: None,
                source: 0,
            })
            .collect(),
        sources: vec!["engine".into()],
    };
    let block_tokens = config.scheduler.block_tokens;
    // Output lengths are unknown before running. BlendServe's sampled estimate needs a sample
    // run first (issue 4); until then policies see `max_tokens`.
    let preparation = Preparation::new(
        &workload,
        perf,
        scheduler::LengthKnowledge::MaxTokens,
        config.seed,
    );
    let policy = config.policy.build(&PolicyInput {
        preparation: &preparation,
        perf,
        seed: config.seed,
    });
    let kv = KvCacheConfig {
        block_tokens,
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
    for &(r, ref why) in sched.rejections() {
        let r = r as usize;
        on_finished(Generation {
            index: r,
            tokens: Vec::new(),
            end: GenerationEnd::Rejected,
            prompt_tokens: requests[r].prompt.len(),
            rejection: Some(why.to_string()),
        });
    }
    model.allocate_cache(config.num_kv_blocks as usize, block_tokens as usize)?;
    let mut samplers: Vec<Sampler> = requests.iter().map(|r| Sampler::new(r.sampling)).collect();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut stop_reason: Vec<Option<StopReason>> = vec![None; requests.len()];
    while !sched.is_done() {
        let plan = sched.schedule();
        for f in &plan.finished {
            let r = f.request as usize;
            on_finished(Generation {
                index: r,
                tokens: std::mem::take(&mut generated[r]),
                end: GenerationEnd::KvCapacity,
                prompt_tokens: requests[r].prompt.len(),
                rejection: None,
            });
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
                let r = item.request as usize;
                let start = item.start_tokens as usize;
                let end = start + item.len_tokens as usize;
                let prompt = &requests[r].prompt;
                let tokens = (start..end)
                    .map(|p| {
                        if p < prompt.len() {
                            prompt[p]
                        } else {
                            generated[r][p - prompt.len()]
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
            .all(|i| samplers[i.request as usize].is_greedy());
        let mut sampled = if all_greedy {
            model.step_greedy(&batch)?
        } else {
            let rows = model.step_logits(&batch)?;
            plan.items
                .iter()
                .filter(|i| i.samples)
                .zip(&rows)
                .map(|(item, row)| samplers[item.request as usize].sample(row))
                .collect()
        }
        .into_iter();
        for item in plan.items.iter().filter(|i| i.samples) {
            let r = item.request as usize;
            let token = sampled
                .next()
                .expect("one sampled token per sampling sequence");
            generated[r].push(token);
            stop_reason[r] = requests[r].stop.check(token, generated[r].len() as u32);
        }
        for f in sched.complete_step(&plan, |r, _| stop_reason[r as usize].is_some()) {
            let r = f.request as usize;
            let end = match f.reason {
                FinishReason::Stop => {
                    GenerationEnd::Stop(stop_reason[r].expect("stopped sequences have a reason"))
                }
                FinishReason::Length => GenerationEnd::ContextLength,
                FinishReason::KvCapacity => GenerationEnd::KvCapacity,
            };
            on_finished(Generation {
                index: r,
                tokens: std::mem::take(&mut generated[r]),
                end,
                prompt_tokens: requests[r].prompt.len(),
                rejection: None,
            });
        }
    }
    let stats = sched.stats();
    Ok(EngineStats {
        steps: stats.steps,
        prefix_hit_ratio: stats.prefix_hit_ratio(),
        preemptions: stats.preemptions,
        generated_tokens: stats.generated_tokens,
    })
}
