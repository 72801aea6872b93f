//! [`StepModel`]: a model with its paged KV cache, run one step at a time. The engine drives any
//! implementation: burn on any backend ([`BurnStepModel`]) or the CUDA fast path.

use burn::tensor::backend::Backend;

use crate::config::ModelConfig;
use crate::forward::{logits_rows, ForwardBatch, LlamaModel, PagedKvCache};
use crate::probe::{ExecutorProfile, ProbeBlend};
use crate::ModelError;

pub trait StepModel {
    fn config(&self) -> &ModelConfig;

    /// Bytes of K and V one token takes in this model's cache (all layers).
    fn kv_bytes_per_token(&self) -> u64;

    /// Allocates the paged cache (`num_blocks` x `block_size` tokens), replacing any other of
    /// another shape; one of the same shape is kept as it is (a step never reads a slot before
    /// writing it, so what an earlier run left there does not matter).
    fn allocate_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<(), ModelError>;

    /// Runs one step and returns the logits of the sequences that asked for them, batch order.
    fn step_logits(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError>;

    /// Runs one step and returns the argmax token (ties to the lowest id) of each sequence that
    /// asked for logits. Implementations may do it without copying the logits off the device.
    fn step_greedy(&mut self, batch: &ForwardBatch) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .step_logits(batch)?
            .iter()
            .map(|row| argmax(row))
            .collect())
    }

    /// Chooses how the device runs steps from a short profile of `blend`: times it under each
    /// executor the device offers, keeps the fastest and returns what was measured. `Ok(None)`
    /// where there is nothing to choose (the burn path). Needs a cache that holds the probe
    /// (its blocks are overwritten).
    fn choose_step_executor(
        &mut self,
        blend: &ProbeBlend,
    ) -> Result<Option<ExecutorProfile>, ModelError> {
        let _ = blend;
        Ok(None)
    }
}

/// Index of the largest value, the first one on ties.
pub fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
            if l > best.1 {
                (i, l)
            } else {
                best
            }
        })
        .0 as u32
}

fn no_cache() -> ModelError {
    ModelError::Batch("no KV cache: call allocate_cache first".into())
}

/// A burn model and its cache.
pub struct BurnStepModel<B: Backend> {
    model: LlamaModel<B>,
    cache: Option<PagedKvCache<B>>,
}

impl<B: Backend> BurnStepModel<B> {
    pub fn new(model: LlamaModel<B>) -> Self {
        BurnStepModel { model, cache: None }
    }

    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }
}

impl<B: Backend> StepModel for BurnStepModel<B> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn kv_bytes_per_token(&self) -> u64 {
        self.model
            .config()
            .kv_bytes_per_token(std::mem::size_of::<B::FloatElem>())
    }

    fn allocate_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<(), ModelError> {
        let same =
            |c: &PagedKvCache<B>| (c.num_blocks(), c.block_size()) == (num_blocks, block_size);
        if self.cache.as_ref().is_some_and(same) {
            return Ok(());
        }
        self.cache = None;
        self.cache = Some(PagedKvCache::new(
            self.model.config(),
            num_blocks,
            block_size,
            self.model.device(),
        ));
        Ok(())
    }

    fn step_logits(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
        let cache = self.cache.as_mut().ok_or_else(no_cache)?;
        Ok(logits_rows(self.model.forward(batch, cache)?))
    }
}

#[cfg(feature = "cuda")]
pub use cuda_step::CudaStepModel;

#[cfg(feature = "cuda")]
mod cuda_step {
    use std::time::Instant;

    use super::*;
    use crate::cuda::{CudaKvCache, CudaLlama, StepExecutor};
    use crate::probe::ExecutorTiming;

    /// The CUDA fast path and its cache.
    pub struct CudaStepModel {
        model: CudaLlama,
        cache: Option<CudaKvCache>,
    }

    impl CudaStepModel {
        pub fn new(model: CudaLlama) -> Self {
            CudaStepModel { model, cache: None }
        }

        pub fn model(&self) -> &CudaLlama {
            &self.model
        }

        pub fn model_mut(&mut self) -> &mut CudaLlama {
            &mut self.model
        }

        /// Runs one step without waiting for the GPU or reading anything back (benchmarks).
        pub fn step_async(&mut self, batch: &ForwardBatch) -> Result<(), ModelError> {
            let cache = self.cache.as_mut().ok_or_else(no_cache)?;
            self.model.forward(batch, cache)
        }

        /// Wall seconds a step of `batch` takes, averaged over `repeats` steps after one
        /// warm-up (0 for an empty batch).
        pub fn time_steps(
            &mut self,
            batch: &ForwardBatch,
            repeats: usize,
        ) -> Result<f64, ModelError> {
            if batch.sequences.is_empty() {
                return Ok(0.0);
            }
            self.step_async(batch)?;
            self.model.synchronize()?;
            let t = Instant::now();
            for _ in 0..repeats.max(1) {
                self.step_async(batch)?;
            }
            self.model.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / repeats.max(1) as f64)
        }

        /// Times `blend` (from the cache's first blocks) under the sequential executor, its
        /// prefill and decode parts alone, and each of `candidates`, `repeats` steps each; the
        /// executor is left as it was.
        pub fn profile_executors(
            &mut self,
            blend: &ProbeBlend,
            candidates: &[StepExecutor],
            repeats: usize,
        ) -> Result<ExecutorProfile, ModelError> {
            let cache = self.cache.as_ref().ok_or_else(no_cache)?;
            let ids: Vec<u32> = (0..cache.num_blocks() as u32).collect();
            let [whole, prefill, decode] = blend.batches(cache.block_size(), &ids)?;
            let before = self.model.executor();
            self.model.set_executor(StepExecutor::Sequential)?;
            let sequential_secs = self.time_steps(&whole, repeats)?;
            let prefill_alone_secs = self.time_steps(&prefill, repeats)?;
            let decode_alone_secs = self.time_steps(&decode, repeats)?;
            let mut timings = Vec::new();
            for &executor in candidates {
                let secs = self
                    .model
                    .set_executor(executor)
                    .and_then(|()| self.time_steps(&whole, repeats));
                timings.push(ExecutorTiming {
                    executor: executor.to_string(),
                    secs: secs.as_ref().ok().copied(),
                    error: secs.err().map(|e| e.to_string()),
                });
            }
            self.model.set_executor(before)?;
            Ok(ExecutorProfile {
                blend: *blend,
                sequential: StepExecutor::Sequential.to_string(),
                sequential_secs,
                prefill_alone_secs,
                decode_alone_secs,
                candidates: timings,
            })
        }

        /// GPU seconds of each kind of operation in one step (see
        /// [`CudaLlama::profile_forward`]).
        pub fn profile_step(
            &mut self,
            batch: &ForwardBatch,
        ) -> Result<Vec<(&'static str, f64)>, ModelError> {
            let cache = self.cache.as_mut().ok_or_else(no_cache)?;
            self.model.profile_forward(batch, cache)
        }
    }

    impl StepModel for CudaStepModel {
        fn config(&self) -> &ModelConfig {
            self.model.config()
        }

        fn kv_bytes_per_token(&self) -> u64 {
            self.model.kv_bytes_per_token()
        }

        fn allocate_cache(
            &mut self,
            num_blocks: usize,
            block_size: usize,
        ) -> Result<(), ModelError> {
            let same =
                |c: &CudaKvCache| (c.num_blocks(), c.block_size()) == (num_blocks, block_size);
            if self.cache.as_ref().is_some_and(same) {
                return Ok(());
            }
            self.cache = None;
            self.cache = Some(self.model.new_cache(num_blocks, block_size)?);
            Ok(())
        }

        fn step_logits(&mut self, batch: &ForwardBatch) -> Result<Vec<Vec<f32>>, ModelError> {
            self.step_async(batch)?;
            self.model.logits_to_host()
        }

        fn step_greedy(&mut self, batch: &ForwardBatch) -> Result<Vec<u32>, ModelError> {
            self.step_async(batch)?;
            self.model.greedy_tokens()
        }

        fn choose_step_executor(
            &mut self,
            blend: &ProbeBlend,
        ) -> Result<Option<ExecutorProfile>, ModelError> {
            let profile = self.profile_executors(blend, &StepExecutor::profile_candidates(), 3)?;
            let fastest: StepExecutor = profile.fastest().0.parse().map_err(ModelError::Cuda)?;
            self.model.set_executor(fastest)?;
            Ok(Some(profile))
        }
    }
}
