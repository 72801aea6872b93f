//! A Llama-family decoder (Llama 3/3.1, Qwen2/2.5, Mistral-style configs) on burn.
//!
//! Owns: reading a Hugging Face model folder (`config.json`, sharded or single `*.safetensors`,
//! `tokenizer.json`), the forward pass over a *mixed batch* (prefill chunks of some sequences
//! and single decode tokens of others, in one call) reading and writing a paged KV cache laid
//! out by the `kv-cache` crate's block tables, an unpaged reference forward for checking it,
//! and sampling. Generic over the burn backend: the CPU (ndarray) backend runs the tests.
//! With feature `cuda`, [`cuda::CudaLlama`] is the fast path: cuBLAS GEMMs and our own kernels
//! on one CUDA stream.
//!
//! Must not touch: scheduling (which sequences run, which blocks they get) or request files.

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
pub mod fixture;
mod forward;
mod overlap_plan;
mod probe;
mod sample;
mod step;
mod tokenizer;
mod weights;

pub use config::{Architecture, Llama3RopeScaling, ModelConfig};
pub use error::ModelError;
pub use forward::{logits_rows, ForwardBatch, LlamaModel, PagedKvCache, SequenceChunk};
pub use overlap_plan::{OverlapPlanner, StepWork};
pub use probe::{ExecutorProfile, ExecutorTiming, ProbeBlend};
pub use sample::{Sampler, SamplingParams, StopCriteria, StopReason};
#[cfg(feature = "cuda")]
pub use step::CudaStepModel;
pub use step::{argmax, BurnStepModel, StepModel};
pub use tokenizer::TextTokenizer;
pub use weights::WeightStore;

/// The CPU backend the tests and the embedded demo use.
pub type CpuBackend = burn::backend::NdArray<f32>;
