//! The CUDA forward pass: bf16 weights and paged KV cache in GPU memory, every GEMM through
//! cuBLAS (`cublasGemmEx`, bf16 in, f32 accumulate), and our own kernels (`kernels/`, compiled
//! by NVRTC when the model loads) for the rest: fused residual add + RMSNorm, bias + RoPE + KV
//! write, SiLU·up, paged decode attention (K and V through cp.async stages, its split and
//! occupancy chosen per launch by [`decode_launch_shape`], launched as a programmatic dependent
//! of the RoPE kernel on compute capability 9.0) and paged prefill attention on tensor cores:
//! Hopper warpgroup MMAs (`wgmma`, compiled for `sm_90a`, head_dim 128, K and V brought by TMA
//! from the caches' tensor maps; see [`PrefillKernel`]) or `mma.sync` elsewhere. By default
//! everything runs on one CUDA stream, in order, with no host synchronisation inside a step;
//! [`StepExecutor`] offers an overlapped executor (two nano-batches over a compute and a memory
//! lane, see `overlap.rs`).
//!
//! Layout: `kernels/` holds the CUDA C++, one kernel family a file; `compile.rs` compiles and
//! loads it; `decode.rs` and `prefill.rs` choose each attention launch's kernel and shape,
//! `plan.rs` builds a step's attention plan, `attention.rs` launches attention; `gemm.rs` wraps
//! cuBLAS and `gemm_persistent.rs` our persistent wgmma GEMM (the compute lane's option);
//! `overlap.rs` is the overlapped executor. This file keeps the model itself: weights,
//! caches, and the step's orchestration.
//!
//! Why not burn-cuda: cuBLAS must run on the stream that orders our kernels, and CubeCL 0.10 keeps
//! its streams private (non-blocking, created per thread, no accessor), so mixing the two would
//! cost a host synchronisation per GEMM. The burn path stays the reference (CPU tests, the GPU
//! check); this path is checked against it and against transformers on the device.

mod attention;
mod compile;
mod decode;
mod decode_stream;
mod gemm;
mod gemm_persistent;
mod overlap;
mod overlap_step;
mod plan;
mod prefill;
mod tma;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

pub use compile::compile_kernels;
pub use decode::{decode_launch_shape, decode_smem_bytes, DecodeKernel};
pub use decode_stream::StreamVariant;
use decode_stream::{stream_shape, StreamShape, STREAM_DECODE_CHUNK_TOKENS};
pub use gemm::{Gemm, LaneGemm};
pub use overlap::{SmSplit, StepExecutor};
pub use prefill::{tma_block_size_ok, PrefillKernel, WgmmaVariant};

use compile::*;
use decode::*;
use plan::*;
use prefill::*;

use cudarc::driver::sys::{CUstream, CUtensorMap};
use overlap::{record, split_nano_batches, wait, LaneTiming, Overlap};
use overlap_step::step_work;

use crate::config::ModelConfig;
use crate::forward::{plan_slots, ForwardBatch};
use crate::weights::WeightStore;
use crate::ModelError;

pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> ModelError {
    ModelError::Cuda(format!("{what}: {e:?}"))
}

/// A device buffer that grows to the largest size asked of it.
struct Scratch<T> {
    buf: Option<CudaSlice<T>>,
}

impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Scratch<T> {
    fn new() -> Self {
        Scratch { buf: None }
    }

    fn ptr(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<u64, ModelError> {
        let len = len.max(1);
        if self.buf.as_ref().is_none_or(|b| b.len() < len) {
            self.buf = None;
            let grown = len.next_power_of_two();
            self.buf = Some(
                stream
                    .alloc_zeros::<T>(grown)
                    .map_err(|e| cuda_err(&format!("allocating {grown} scratch elements"), e))?,
            );
        }
        let buf = self.buf.as_ref().expect("allocated above");
        Ok(raw_ptr(buf, stream))
    }
}

pub(crate) fn raw_ptr<T>(buf: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    let (ptr, _sync) = buf.device_ptr(stream);
    ptr
}

struct Layer {
    input_norm: CudaSlice<u16>,
    /// `[q | k | v, hidden]`: the three HF projections stacked.
    qkv: CudaSlice<u16>,
    qkv_bias: Option<CudaSlice<u16>>,
    o: CudaSlice<u16>,
    post_norm: CudaSlice<u16>,
    /// `[gate | up, hidden]`.
    gate_up: CudaSlice<u16>,
    down: CudaSlice<u16>,
}

/// K and V of every layer in GPU memory, paged like [`crate::PagedKvCache`]:
/// `num_blocks * block_size` slots of `[kv_heads, head_dim]` bf16.
pub struct CudaKvCache {
    block_size: usize,
    num_blocks: usize,
    keys: Vec<CudaSlice<u16>>,
    values: Vec<CudaSlice<u16>>,
    /// Each layer's K and V TMA descriptors, for the TMA prefill kernels: encoded once here,
    /// where the blocks suit TMA boxes and head_dim is 128; empty otherwise.
    tensor_maps: Vec<[CUtensorMap; 2]>,
}

impl CudaKvCache {
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// A Llama-family model on one CUDA GPU.
pub struct CudaLlama {
    config: ModelConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    gemm: Gemm,
    kernels: Kernels,
    embed: CudaSlice<u16>,
    /// `None` when tied to `embed`.
    lm_head: Option<CudaSlice<u16>>,
    norm: CudaSlice<u16>,
    layers: Vec<Layer>,
    inv_freq: CudaSlice<f32>,
    /// Multiprocessors, for sizing the decode split.
    sm_count: usize,
    prefill_kernel: PrefillKernel,
    decode_kernel: DecodeKernel,
    /// The occupancies the decode kernel may run at (its own first), for sizing the split.
    decode_occupancies: [DecodeOccupancy; DECODE_OCCUPANCIES],
    /// A decode split count and occupancy benchmarks force (`None`: [`decode_launch_shape`]
    /// chooses).
    forced_decode_splits: Option<usize>,
    forced_decode_blocks_per_sm: Option<usize>,
    /// Blocks a stream decode launch runs as (benchmarks; `None`: one an SM of its lane).
    forced_stream_ctas: Option<usize>,
    /// The cost model of `overlap-auto` ([`crate::OverlapPlanner`]).
    overlap_planner: crate::OverlapPlanner,
    /// The memory lane's SMs of the last step (`None`: sequential).
    last_memory_sms: Option<usize>,
    /// The overlapped executor's compute-lane GEMMs.
    lane_gemm: LaneGemm,
    /// Results that do not depend on the batch ([`CudaLlama::set_batch_invariant`]).
    batch_invariant: bool,
    /// The memory lane's decode kernel a benchmark forces (`None`: the stream kernel where the
    /// lane has SMs of its own and the GPU has it, else the model's decode kernel).
    forced_lane_decode: Option<DecodeKernel>,
    /// Decode attention launched as a programmatic dependent of the kernel before it
    /// (compute capability 9.0 and newer, unless a benchmark turns it off).
    decode_dependent_launch: bool,
    /// Decode items launched longest context first (unless a benchmark turns it off).
    decode_longest_first: bool,
    hidden: Scratch<u16>,
    normed: Scratch<u16>,
    qkv_buf: Scratch<u16>,
    attn: Scratch<u16>,
    delta: Scratch<u16>,
    gate_up_buf: Scratch<u16>,
    act: Scratch<u16>,
    selected: Scratch<u16>,
    logits: Scratch<f32>,
    tokens_out: Scratch<u32>,
    ints: Scratch<i32>,
    part_acc: Scratch<f32>,
    part_ml: Scratch<f32>,
    /// Rows of logits the last step produced.
    last_logit_rows: usize,
    /// The overlapped executor's lanes; `None` runs every step sequentially.
    overlap: Option<Overlap>,
    /// While [`CudaLlama::profile_forward`] runs: an event after each operation, with its name.
    profile: std::cell::RefCell<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
}

fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

impl CudaLlama {
    /// Opens GPU `ordinal`, compiles the kernels and creates the stream everything runs on.
    fn open(config: ModelConfig, ordinal: usize) -> Result<(Self, Arc<CudaStream>), ModelError> {
        let c = &config;
        if c.head_dim != 64 && c.head_dim != 128 {
            return Err(ModelError::Cuda(format!(
                "head_dim {} is not supported by the CUDA kernels (64 or 128)",
                c.head_dim
            )));
        }
        let group = c.num_heads / c.num_kv_heads;
        if !(1..=8).contains(&group) || !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(ModelError::Cuda(format!(
                "{} query heads over {} KV heads: the CUDA kernels take groups of 1 to 8",
                c.num_heads, c.num_kv_heads
            )));
        }
        if !c.hidden_size.is_multiple_of(8) || !c.intermediate_size.is_multiple_of(8) {
            return Err(ModelError::Cuda(
                "hidden_size and intermediate_size must be multiples of 8".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("opening the GPU", e))?;
        // One stream, in-order: cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        let kernels = Kernels::compile(&ctx)?;
        let kernels_cc_major = kernels.compute_capability.0;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("SM count", e))? as usize;
        let gemm =
            Gemm::new(stream.clone())?.with_persistent(kernels.gemm_persistent.clone(), sm_count);
        let inv_freq: Vec<f32> = config.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = stream
            .clone_htod(&inv_freq)
            .map_err(|e| cuda_err("upload", e))?;
        let empty = stream
            .alloc_zeros::<u16>(1)
            .map_err(|e| cuda_err("alloc", e))?;
        // The default wgmma variant, or one with fewer heads a block when the KV group is
        // small (a block's heads must share one KV head).
        let prefill_kernel = preferred_prefill_kernel(c, &kernels, true);
        let mut model = CudaLlama {
            ctx,
            stream: stream.clone(),
            gemm,
            kernels,
            embed: empty.clone(),
            lm_head: None,
            norm: empty,
            layers: Vec::new(),
            inv_freq,
            sm_count,
            prefill_kernel,
            decode_kernel: DecodeKernel::Lanes,
            decode_occupancies: [DecodeOccupancy::default(); DECODE_OCCUPANCIES],
            forced_decode_splits: None,
            forced_decode_blocks_per_sm: None,
            forced_stream_ctas: None,
            forced_lane_decode: None,
            overlap_planner: crate::OverlapPlanner::h200(sm_count),
            last_memory_sms: None,
            lane_gemm: LaneGemm::default(),
            batch_invariant: false,
            decode_dependent_launch: kernels_cc_major >= 9,
            decode_longest_first: true,
            hidden: Scratch::new(),
            normed: Scratch::new(),
            qkv_buf: Scratch::new(),
            attn: Scratch::new(),
            delta: Scratch::new(),
            gate_up_buf: Scratch::new(),
            act: Scratch::new(),
            selected: Scratch::new(),
            logits: Scratch::new(),
            tokens_out: Scratch::new(),
            ints: Scratch::new(),
            part_acc: Scratch::new(),
            part_ml: Scratch::new(),
            last_logit_rows: 0,
            overlap: None,
            profile: std::cell::RefCell::new(None),
            config,
        };
        model.decode_occupancies = model.decode_occupancies()?;
        let copy = model.copy_bytes_per_sec()?;
        let c = &model.config;
        let tensor_cores = c.head_dim == 128
            && model
                .kernels
                .decode_tc
                .contains_key(&(c.num_heads / c.num_kv_heads));
        model.set_decode_kernel(preferred_decode_kernel(copy, model.sm_count, tensor_cores))?;
        Ok((model, stream))
    }

    /// Device-to-device copy bandwidth (bytes read plus written a second) over 256 MiB, the
    /// median of 5 copies after 2 untimed: what decides the default decode kernel.
    fn copy_bytes_per_sec(&self) -> Result<f64, ModelError> {
        const BYTES: usize = 256 << 20;
        let src = self
            .stream
            .alloc_zeros::<u8>(BYTES)
            .map_err(|e| cuda_err("alloc", e))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(BYTES)
            .map_err(|e| cuda_err("alloc", e))?;
        let mut copy = |_: &Self| {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| cuda_err("copy", e))
        };
        self.time(2, &mut copy)?;
        let mut secs: Vec<f64> = (0..5)
            .map(|_| self.time(1, &mut copy))
            .collect::<Result<_, _>>()?;
        secs.sort_by(f64::total_cmp);
        Ok(2.0 * BYTES as f64 / secs[2])
    }

    /// Loads a HF model folder onto GPU `ordinal` (weights converted to bf16).
    pub fn load(dir: &Path, ordinal: usize) -> Result<Self, ModelError> {
        let config = ModelConfig::load(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(config, &store, ordinal)
    }

    pub fn from_store(
        config: ModelConfig,
        store: &WeightStore,
        ordinal: usize,
    ) -> Result<Self, ModelError> {
        let (mut model, stream) = Self::open(config.clone(), ordinal)?;
        let c = &config;
        let (h, q_dim, kv_dim, inter) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let upload = |parts: &[(String, Vec<usize>)]| -> Result<CudaSlice<u16>, ModelError> {
            let mut bits = Vec::new();
            for (name, shape) in parts {
                bits.extend(bf16_bits(&store.f32(name, shape)?));
            }
            stream
                .clone_htod(&bits)
                .map_err(|e| cuda_err("uploading weights", e))
        };
        let one = |name: String, shape: Vec<usize>| upload(&[(name, shape)]);
        model.embed = one("model.embed_tokens.weight".into(), vec![c.vocab_size, h])?;
        model.lm_head = if c.tie_word_embeddings {
            None
        } else if store.contains("lm_head.weight") {
            Some(one("lm_head.weight".into(), vec![c.vocab_size, h])?)
        } else {
            return Err(ModelError::MissingTensor {
                name: "lm_head.weight".into(),
            });
        };
        model.norm = one("model.norm.weight".into(), vec![h])?;
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let qkv_bias = if c.qkv_bias {
                Some(upload(&[
                    (format!("{p}.self_attn.q_proj.bias"), vec![q_dim]),
                    (format!("{p}.self_attn.k_proj.bias"), vec![kv_dim]),
                    (format!("{p}.self_attn.v_proj.bias"), vec![kv_dim]),
                ])?)
            } else {
                None
            };
            model.layers.push(Layer {
                input_norm: one(format!("{p}.input_layernorm.weight"), vec![h])?,
                qkv: upload(&[
                    (format!("{p}.self_attn.q_proj.weight"), vec![q_dim, h]),
                    (format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, h]),
                    (format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, h]),
                ])?,
                qkv_bias,
                o: one(format!("{p}.self_attn.o_proj.weight"), vec![h, q_dim])?,
                post_norm: one(format!("{p}.post_attention_layernorm.weight"), vec![h])?,
                gate_up: upload(&[
                    (format!("{p}.mlp.gate_proj.weight"), vec![inter, h]),
                    (format!("{p}.mlp.up_proj.weight"), vec![inter, h]),
                ])?,
                down: one(format!("{p}.mlp.down_proj.weight"), vec![h, inter])?,
            });
        }
        Ok(model)
    }

    /// A model of `config`'s shape with uniform random bf16 weights made on the GPU (for speed
    /// measurements: no file, no upload). Norm weights are 1.
    pub fn random(config: ModelConfig, ordinal: usize, seed: u32) -> Result<Self, ModelError> {
        let (mut model, _) = Self::open(config.clone(), ordinal)?;
        let c = &config;
        let (h, q_dim, kv_dim, inter) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        );
        let mut counter = seed.wrapping_mul(1000);
        let mut rand = |m: &CudaLlama, len: usize, fan_in: usize| {
            counter = counter.wrapping_add(1);
            m.random_buffer(len, counter, 1.0 / (fan_in as f32).sqrt())
        };
        let ones = |m: &CudaLlama, len: usize| {
            m.stream
                .clone_htod(&vec![half::bf16::ONE.to_bits(); len])
                .map_err(|e| cuda_err("upload", e))
        };
        model.embed = rand(&model, c.vocab_size * h, h)?;
        model.lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(rand(&model, c.vocab_size * h, h)?)
        };
        model.norm = ones(&model, h)?;
        for _ in 0..c.num_layers {
            let layer = Layer {
                input_norm: ones(&model, h)?,
                qkv: rand(&model, (q_dim + 2 * kv_dim) * h, h)?,
                qkv_bias: if c.qkv_bias {
                    Some(rand(&model, q_dim + 2 * kv_dim, h)?)
                } else {
                    None
                },
                o: rand(&model, h * q_dim, q_dim)?,
                post_norm: ones(&model, h)?,
                gate_up: rand(&model, 2 * inter * h, h)?,
                down: rand(&model, h * inter, inter)?,
            };
            model.layers.push(layer);
        }
        model.synchronize()?;
        Ok(model)
    }

    fn random_buffer(
        &self,
        len: usize,
        seed: u32,
        bound: f32,
    ) -> Result<CudaSlice<u16>, ModelError> {
        let buf = self
            .stream
            .alloc_zeros::<u16>(len)
            .map_err(|e| cuda_err(&format!("allocating {len} weights"), e))?;
        self.fill_uniform(raw_ptr(&buf, &self.stream), len, seed, bound)?;
        Ok(buf)
    }

    /// `x = x + delta` (unless `delta` is 0) and `out = rms_norm(x) * weight` over `rows` rows
    /// of the hidden size (device addresses).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        stream: CUstream,
        out: u64,
        x: u64,
        delta: u64,
        weight: u64,
        rows: usize,
        what: &str,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        self.launch_on(
            stream,
            &self.kernels.add_rms_norm,
            (rows as u32, 1, 1),
            256,
            &[
                Ptr(out),
                Ptr(x),
                Ptr(delta),
                Ptr(weight),
                I32(c.hidden_size as i32),
                F32(c.rms_norm_eps as f32),
            ],
            what,
        )
    }

    /// Fills `len` bf16 values at device address `ptr` with uniform values in [-bound, bound).
    fn fill_uniform(&self, ptr: u64, len: usize, seed: u32, bound: f32) -> Result<(), ModelError> {
        self.launch(
            &self.kernels.fill_uniform,
            (4 * self.sm_count as u32, 1, 1),
            256,
            &[Ptr(ptr), Arg::U64(len as u64), Arg::U32(seed), F32(bound)],
            "fill_uniform",
        )
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    /// Bytes of K and V one token takes, all layers.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.config.kv_bytes_per_token(2)
    }

    /// The GPU's name as the driver reports it (e.g. "NVIDIA H200").
    pub fn device_name(&self) -> Result<String, ModelError> {
        self.ctx.name().map_err(|e| cuda_err("device name", e))
    }

    /// Free and total GPU memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), ModelError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| cuda_err("memory info", e))
    }

    pub fn new_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<CudaKvCache, ModelError> {
        let c = &self.config;
        let len = num_blocks * block_size * c.num_kv_heads * c.head_dim;
        let alloc = || {
            self.stream.alloc_zeros::<u16>(len).map_err(|e| {
                ModelError::Cuda(format!(
                    "cannot allocate a KV cache of {num_blocks} blocks x {block_size} tokens \
                     ({} MiB per layer): {e:?}; lower the KV memory fraction or block count",
                    len * 4 / (1 << 20)
                ))
            })
        };
        let mut keys = Vec::with_capacity(c.num_layers);
        let mut values = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            keys.push(alloc()?);
            values.push(alloc()?);
        }
        let mut tensor_maps = Vec::new();
        if tma_block_size_ok(block_size) && c.head_dim == WGMMA_HEAD_DIM {
            let num_slots = num_blocks * block_size;
            let map = |layer: &CudaSlice<u16>| {
                kv_tensor_map(
                    raw_ptr(layer, &self.stream),
                    num_slots,
                    c.num_kv_heads,
                    c.head_dim,
                    block_size,
                )
            };
            for (k, v) in keys.iter().zip(&values) {
                tensor_maps.push([map(k)?, map(v)?]);
            }
        }
        Ok(CudaKvCache {
            block_size,
            num_blocks,
            keys,
            values,
            tensor_maps,
        })
    }

    pub fn synchronize(&self) -> Result<(), ModelError> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("stream synchronize", e))
    }

    /// Under [`CudaLlama::profile_forward`], records that the operation `what` was issued
    /// last (an event on the stream); otherwise nothing.
    fn mark(&self, what: &'static str) -> Result<(), ModelError> {
        if let Some(events) = self.profile.borrow_mut().as_mut() {
            events.push((what, self.record_event()?));
        }
        Ok(())
    }

    /// A timing event recorded on the stream now.
    fn record_event(&self) -> Result<cudarc::driver::CudaEvent, ModelError> {
        let event = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("event", e))?;
        event
            .record(&self.stream)
            .map_err(|e| cuda_err("event", e))?;
        Ok(event)
    }

    /// GPU seconds of each kind of operation in one [`CudaLlama::forward`] of `batch` (events
    /// between operations, summed by name over the layers; waits for the GPU). The event
    /// records add a little time of their own.
    pub fn profile_forward(
        &mut self,
        batch: &ForwardBatch,
        cache: &mut CudaKvCache,
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        self.synchronize()?;
        *self.profile.borrow_mut() = Some(Vec::new());
        self.mark("start")?;
        let run = self.forward(batch, cache);
        let events = self.profile.borrow_mut().take().unwrap_or_default();
        run?;
        self.synchronize()?;
        let mut totals: Vec<(&'static str, f64)> = Vec::new();
        for pair in events.windows(2) {
            let ms = pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .map_err(|e| cuda_err("event", e))?;
            let name = pair[1].0;
            match totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, secs)) => *secs += f64::from(ms) / 1e3,
                None => totals.push((name, f64::from(ms) / 1e3)),
            }
        }
        Ok(totals)
    }

    fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
        what: &str,
    ) -> Result<(), ModelError> {
        self.launch_smem(f, grid, block, 0, args, what)
    }

    fn launch_on(
        &self,
        stream: CUstream,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
        what: &str,
    ) -> Result<(), ModelError> {
        launch_smem_on(stream, f, grid, block, 0, args, what, false)
    }

    fn launch_smem(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared_mem_bytes: u32,
        args: &[Arg],
        what: &str,
    ) -> Result<(), ModelError> {
        launch_smem_on(
            self.stream.cu_stream(),
            f,
            grid,
            block,
            shared_mem_bytes,
            args,
            what,
            false,
        )
    }

    /// Runs one step on the GPU: writes the batch's K and V into `cache` and leaves the logits
    /// of the sequences with `logits` set (batch order) on the device, for
    /// [`CudaLlama::logits_to_host`] or [`CudaLlama::greedy_tokens`]. Returns without waiting
    /// for the GPU. Under [`StepExecutor::Overlapped`] a step with both prefill chunks and
    /// decode tokens runs them as two nano-batches on two streams; the results are the same.
    pub fn forward(
        &mut self,
        batch: &ForwardBatch,
        cache: &mut CudaKvCache,
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        if cache.keys.len() != c.num_layers {
            return Err(ModelError::Batch(
                "the KV cache was made for another model".into(),
            ));
        }
        let slots = plan_slots(&c, batch, cache.block_size, cache.num_blocks)?;
        for s in &batch.sequences {
            c.check_token_ids(&s.tokens)?;
        }
        self.last_logit_rows = 0;
        if slots.is_empty() {
            return Ok(());
        }
        let profiling = self.profile.borrow().is_some();
        let decodes = batch
            .sequences
            .iter()
            .filter(|s| s.tokens.len() == 1)
            .count();
        self.last_memory_sms = None;
        if self.overlap.is_some() && decodes >= 2 && !profiling {
            let memory_sms = match self.executor() {
                StepExecutor::Adaptive => self.overlap_planner.plan(&c, step_work(batch)),
                _ => self.lane_sms().map(|(_, memory)| memory),
            };
            if let Some(k) = memory_sms {
                if self.executor() == StepExecutor::Adaptive {
                    self.overlap.as_mut().expect("checked").resize(k)?;
                }
                self.last_memory_sms = Some(k);
                return self.forward_overlapped(batch, cache, &slots);
            }
        }
        let n = slots.len();
        let plan = AttentionPlan::build(batch, &slots, cache.block_size, self.decode_longest_first);
        let stream = self.stream.clone();
        let ints = self.upload_ints(&plan.ints)?;
        let acts = self.activations(n)?;
        let split = decode_split(
            &c,
            self.decode_slots(self.sm_count),
            &stream,
            &plan,
            &mut self.part_acc,
            &mut self.part_ml,
        )?;
        let step = StepRows {
            plan: &plan,
            ints,
            acts,
            rows: n,
            split,
        };
        let main = stream.cu_stream();
        self.embed(main, &step)?;
        for l in 0..c.num_layers {
            self.layer(l, main, &self.gemm, &step, cache)?;
        }
        let rows = plan.num_logit_rows;
        self.finish(&acts, n, ints + 4 * plan.logit_rows as u64, rows)?;
        self.mark("final norm + lm_head")?;
        self.last_logit_rows = rows;
        Ok(())
    }

    /// Chooses how steps run (see [`StepExecutor`]); making lanes on green contexts can fail
    /// on GPUs or drivers without them.
    pub fn set_executor(&mut self, executor: StepExecutor) -> Result<(), ModelError> {
        if self.executor() == executor {
            return Ok(());
        }
        self.synchronize()?;
        self.overlap = None;
        if executor != StepExecutor::Sequential {
            self.overlap = Some(Overlap::new(
                &self.ctx,
                &self.stream,
                self.sm_count,
                executor,
                &self.kernels.gemm_persistent,
                self.lane_gemm,
                self.batch_invariant,
            )?);
        }
        Ok(())
    }

    /// The GPU's multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    pub fn executor(&self) -> StepExecutor {
        self.overlap
            .as_ref()
            .map_or(StepExecutor::Sequential, |o| o.executor)
    }

    /// SMs of the overlapped executor's prefill and decode lanes (the whole GPU each for plain
    /// streams); `None` when sequential.
    pub fn lane_sms(&self) -> Option<(usize, usize)> {
        self.overlap.as_ref().map(Overlap::sm_split)
    }

    /// Copies `ints` to the device (the step's index scratch) on the main stream.
    fn upload_ints(&mut self, ints: &[i32]) -> Result<u64, ModelError> {
        let stream = self.stream.clone();
        let dst = self.ints.ptr(&stream, ints.len())?;
        // From pageable memory the driver stages the copy before returning (after the stream's
        // earlier work), so `ints` may drop right away.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, ints, stream.cu_stream()) }
            .map_err(|e| cuda_err("uploading the step's indices", e))?;
        Ok(dst)
    }

    /// The step's activation buffers for `n` rows (grown on the main stream).
    fn activations(&mut self, n: usize) -> Result<Activations, ModelError> {
        let c = &self.config;
        let stream = self.stream.clone();
        Ok(Activations {
            x: self.hidden.ptr(&stream, n * c.hidden_size)?,
            normed: self.normed.ptr(&stream, n * c.hidden_size)?,
            qkv: self.qkv_buf.ptr(&stream, n * qkv_width(c))?,
            attn: self.attn.ptr(&stream, n * c.num_heads * c.head_dim)?,
            delta: self.delta.ptr(&stream, n * c.hidden_size)?,
            gate_up: self.gate_up_buf.ptr(&stream, n * 2 * c.intermediate_size)?,
            act: self.act.ptr(&stream, n * c.intermediate_size)?,
        })
    }

    /// The embedding rows of the tokens of `rows` into their residual rows, on `stream`.
    fn embed(&self, stream: CUstream, rows: &StepRows) -> Result<(), ModelError> {
        self.launch_on(
            stream,
            &self.kernels.gather_rows,
            (rows.rows as u32, 1, 1),
            128,
            &[
                Ptr(rows.acts.x),
                Ptr(raw_ptr(&self.embed, &self.stream)),
                Ptr(rows.at(rows.plan.tokens)),
                I32(self.config.hidden_size as i32),
            ],
            "gather_rows (embedding)",
        )?;
        self.mark("embedding")
    }

    /// Layer `l` for `rows`, on `stream` with `gemm` (a handle on that stream).
    fn layer(
        &self,
        l: usize,
        stream: CUstream,
        gemm: &Gemm,
        rows: &StepRows,
        cache: &CudaKvCache,
    ) -> Result<(), ModelError> {
        self.layer_qkv(l, stream, gemm, rows, cache)?;
        self.layer_attention(l, stream, rows, cache, AttentionPart::Both)?;
        self.mark("attention")?;
        self.layer_out(l, stream, gemm, rows)
    }

    /// Layer `l` up to attention: (residual add and) input norm, q/k/v projection, RoPE and
    /// the K/V write into the cache.
    fn layer_qkv(
        &self,
        l: usize,
        stream: CUstream,
        gemm: &Gemm,
        rows: &StepRows,
        cache: &CudaKvCache,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let main = &self.stream;
        let layer = &self.layers[l];
        let (acts, n) = (&rows.acts, rows.rows);
        // The residual add of the previous layer's MLP, then this layer's input norm.
        let add = if l == 0 { 0 } else { acts.delta };
        let norm_w = raw_ptr(&layer.input_norm, main);
        self.add_rms_norm(stream, acts.normed, acts.x, add, norm_w, n, "add_rms_norm")?;
        self.mark("add + rms_norm")?;
        let qkv_w = raw_ptr(&layer.qkv, main);
        gemm.bf16(
            acts.qkv,
            acts.normed,
            qkv_w,
            n,
            c.hidden_size,
            qkv_width(c),
            false,
        )?;
        self.mark("gemm qkv")?;
        let bias = layer.qkv_bias.as_ref().map_or(0, |b| raw_ptr(b, main));
        let (kc, vc) = (
            raw_ptr(&cache.keys[l], main),
            raw_ptr(&cache.values[l], main),
        );
        self.launch_on(
            stream,
            &self.kernels.rope_write_kv,
            (n as u32, 1, 1),
            256,
            &[
                Ptr(acts.qkv),
                Ptr(bias),
                Ptr(rows.at(rows.plan.positions)),
                Ptr(rows.at(rows.plan.slots)),
                Ptr(raw_ptr(&self.inv_freq, main)),
                Ptr(kc),
                Ptr(vc),
                I32(c.num_heads as i32),
                I32(c.num_kv_heads as i32),
                I32(c.head_dim as i32),
            ],
            "rope_write_kv",
        )?;
        self.mark("rope + kv write")
    }

    /// Layer `l`'s attention (`part` of it) on `stream`.
    fn layer_attention(
        &self,
        l: usize,
        stream: CUstream,
        rows: &StepRows,
        cache: &CudaKvCache,
        part: AttentionPart,
    ) -> Result<(), ModelError> {
        let (qkv, attn) = (rows.acts.qkv, rows.acts.attn);
        self.attention(
            stream,
            rows.plan,
            rows.ints,
            qkv,
            attn,
            cache,
            l,
            &rows.split,
            part,
        )
    }

    /// Layer `l` after attention: O projection, residual add and norm, the MLP.
    fn layer_out(
        &self,
        l: usize,
        stream: CUstream,
        gemm: &Gemm,
        rows: &StepRows,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let main = &self.stream;
        let layer = &self.layers[l];
        let n = rows.rows;
        let Activations {
            x,
            normed,
            attn,
            delta,
            gate_up,
            act,
            ..
        } = rows.acts;
        let o_w = raw_ptr(&layer.o, main);
        gemm.bf16(delta, attn, o_w, n, c.num_heads * c.head_dim, h, false)?;
        self.mark("gemm o")?;
        let post = raw_ptr(&layer.post_norm, main);
        self.add_rms_norm(stream, normed, x, delta, post, n, "add_rms_norm")?;
        self.mark("add + rms_norm")?;
        gemm.bf16(
            gate_up,
            normed,
            raw_ptr(&layer.gate_up, main),
            n,
            h,
            2 * inter,
            false,
        )?;
        self.mark("gemm gate_up")?;
        self.launch_on(
            stream,
            &self.kernels.silu_mul,
            ((inter / 8).div_ceil(256) as u32, n.min(65535) as u32, 1),
            256,
            &[Ptr(act), Ptr(gate_up), I32(n as i32), I32(inter as i32)],
            "silu_mul",
        )?;
        self.mark("silu_mul")?;
        gemm.bf16(delta, act, raw_ptr(&layer.down, main), n, inter, h, false)?;
        self.mark("gemm down")
    }

    /// On the main stream: the last residual add and the final norm over all `n` rows, then
    /// the logits of the `rows` rows listed at device address `logit_rows`.
    fn finish(
        &mut self,
        acts: &Activations,
        n: usize,
        logit_rows: u64,
        rows: usize,
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        let stream = self.stream.clone();
        let final_norm = raw_ptr(&self.norm, &stream);
        let main = stream.cu_stream();
        self.add_rms_norm(
            main,
            acts.normed,
            acts.x,
            acts.delta,
            final_norm,
            n,
            "add_rms_norm (final)",
        )?;
        if rows == 0 {
            return Ok(());
        }
        let selected = self.selected.ptr(&stream, rows * c.hidden_size)?;
        self.launch(
            &self.kernels.gather_rows,
            (rows as u32, 1, 1),
            128,
            &[
                Ptr(selected),
                Ptr(acts.normed),
                Ptr(logit_rows),
                I32(c.hidden_size as i32),
            ],
            "gather_rows (logit rows)",
        )?;
        let logits = self.logits.ptr(&stream, rows * c.vocab_size)?;
        let head = raw_ptr(self.lm_head.as_ref().unwrap_or(&self.embed), &stream);
        self.gemm.bf16(
            logits,
            selected,
            head,
            rows,
            c.hidden_size,
            c.vocab_size,
            true,
        )
    }

    /// Mean seconds of `f` over `repeats` runs on the stream, timed by CUDA events.
    pub fn time(
        &self,
        repeats: usize,
        mut f: impl FnMut(&Self) -> Result<(), ModelError>,
    ) -> Result<f64, ModelError> {
        let start = self.record_event()?;
        for _ in 0..repeats.max(1) {
            f(self)?;
        }
        let end = self.record_event()?;
        end.synchronize().map_err(|e| cuda_err("event", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| cuda_err("event", e))?;
        Ok(f64::from(ms) / 1e3 / repeats.max(1) as f64)
    }

    /// The last step's logits, one row per sequence that asked for them (waits for the GPU).
    pub fn logits_to_host(&mut self) -> Result<Vec<Vec<f32>>, ModelError> {
        let rows = self.last_logit_rows;
        let vocab = self.config.vocab_size;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let buf = self.logits.buf.as_ref().expect("a step with logits ran");
        let mut host = vec![0f32; rows * vocab];
        self.stream
            .memcpy_dtoh(&buf.slice(..rows * vocab), &mut host)
            .map_err(|e| cuda_err("copying logits", e))?;
        self.synchronize()?;
        Ok(host.chunks(vocab).map(|r| r.to_vec()).collect())
    }

    /// Argmax of each of the last step's logit rows, computed on the GPU (waits for it).
    pub fn greedy_tokens(&mut self) -> Result<Vec<u32>, ModelError> {
        let rows = self.last_logit_rows;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let stream = self.stream.clone();
        let out = self.tokens_out.ptr(&stream, rows)?;
        let logits = raw_ptr(self.logits.buf.as_ref().expect("a step ran"), &stream);
        let vocab_i = self.config.vocab_size as i32;
        self.launch(
            &self.kernels.argmax_rows,
            (rows as u32, 1, 1),
            1024,
            &[Ptr(out), Ptr(logits), I32(vocab_i)],
            "argmax_rows",
        )?;
        let buf = self.tokens_out.buf.as_ref().expect("allocated above");
        let mut host = vec![0u32; rows];
        self.stream
            .memcpy_dtoh(&buf.slice(..rows), &mut host)
            .map_err(|e| cuda_err("copying tokens", e))?;
        self.synchronize()?;
        Ok(host)
    }
}

/// Launches `f` on `stream` with `args`; with `dependent`, as a programmatic dependent of
/// the kernel before it in the stream (compute capability 9.0: its blocks may start while
/// that kernel's last ones run, and must `pdl_wait` before reading what it wrote).
#[allow(clippy::too_many_arguments)]
fn launch_smem_on(
    stream: CUstream,
    f: &CudaFunction,
    grid: (u32, u32, u32),
    block: u32,
    shared_mem_bytes: u32,
    args: &[Arg],
    what: &str,
    dependent: bool,
) -> Result<(), ModelError> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    // Each argument in its own 8-byte slot (little-endian: a 4-byte value sits at the
    // slot's start), and the driver gets a pointer to each slot.
    // A tensor map is passed by a pointer to its 128 bytes.
    let mut slots: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(v) | Arg::U64(v) => v,
            Arg::I32(v) => u64::from(v as u32),
            Arg::U32(v) => u64::from(v),
            Arg::F32(v) => u64::from(v.to_bits()),
            Arg::TensorMap(_) => 0,
        })
        .collect();
    let mut params: Vec<*mut std::ffi::c_void> = slots
        .iter_mut()
        .zip(args)
        .map(|(s, a)| match a {
            Arg::TensorMap(map) => *map as *const CUtensorMap as *mut std::ffi::c_void,
            _ => s as *mut u64 as *mut std::ffi::c_void,
        })
        .collect();
    // SAFETY: the argument list matches the kernel's signature in kernels/ (checked by the
    // device tests); the slots and maps outlive the call, which copies them.
    if !dependent {
        return unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                shared_mem_bytes,
                stream,
                &mut params,
            )
        }
        .map_err(|e| cuda_err(what, e));
    }
    use cudarc::driver::sys;
    // SAFETY: a zeroed attribute is a valid value of the C struct; the id and the union
    // member set below are the programmatic-serialisation pair.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared_mem_bytes,
        hStream: stream,
        attrs: &mut attribute,
        numAttrs: 1,
    };
    // SAFETY: as above; `config` and `attribute` outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| cuda_err(what, e))
}

/// A kernel argument: a device pointer (possibly offset into a buffer) or a scalar.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Ptr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    /// A `__grid_constant__` TMA descriptor.
    TensorMap(&'a CUtensorMap),
}

use Arg::{Ptr, F32, I32};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::SequenceChunk;

    fn seq(tokens: usize, start: usize, table: Vec<u32>, logits: bool) -> SequenceChunk {
        SequenceChunk {
            tokens: vec![5; tokens],
            start_position: start,
            block_table: table,
            logits,
        }
    }

    /// A decode launch keeps enough blocks in flight and fills its waves, splitting as little
    /// as it can (the cases of the H100 sweep in NOTES.md).
    #[test]
    fn decode_launch_shape_fills_waves_with_few_splits() {
        // H100: 132 SMs; the lane kernel at 5, 4 or 3 blocks an SM.
        let lanes = [5, 4, 3];
        let shape = |items: usize, ctx: usize| decode_launch_shape(items * 8, 132, &lanes, ctx);
        // 64 items x 8 KV heads fill a wave of 4 an SM (97%): no split.
        assert_eq!(shape(64, 512), (1, 4));
        assert_eq!(shape(64, 8192), (1, 4));
        // 48 items are 2.9 blocks an SM: enough unsplit, a wave of 3 an SM.
        assert_eq!(shape(48, 2048), (1, 3));
        // 40 and 32 items are too few unsplit: two splits fill a wave.
        assert_eq!(shape(40, 4096), (2, 5));
        assert_eq!(shape(32, 2048), (2, 4));
        // 96 items: 1.94 waves of 3 an SM (4 an SM would be 1.45 waves).
        assert_eq!(shape(96, 512), (1, 3));
        // 128 items: 1.94 waves of 4 an SM; 512 items 7.8 waves, not split for waves a bit
        // fuller.
        assert_eq!(shape(128, 2048), (1, 4));
        assert_eq!(shape(512, 4096), (1, 4));
        // 8 items: six splits bring 384 blocks (2.9 an SM), if the contexts are long enough;
        // else as many as 128-token pieces allow.
        assert_eq!(shape(8, 4096), (6, 3));
        assert_eq!(shape(8, 200), (2, 5));
        assert_eq!(shape(0, 4096), (1, 5));
        // The tensor-core kernel (3 an SM, or 2, 1): 2 an SM is too few blocks in flight, so
        // 64 items take 3 splits, 3.9 waves of 3 an SM.
        assert_eq!(decode_launch_shape(64 * 8, 132, &[3, 2, 1], 2048), (3, 3));
        // Never more splits than 128-token pieces of the context; an occupancy offered.
        for blocks in [1, 7, 33, 100, 300, 5000] {
            for ctx in [1, 100, 129, 1000, 9000] {
                let (s, k) = decode_launch_shape(blocks, 132, &lanes, ctx);
                assert!(
                    s >= 1 && s <= ctx.div_ceil(MIN_DECODE_SPLIT_TOKENS).max(1),
                    "{s}"
                );
                assert!(lanes.contains(&k), "{k}");
            }
        }
    }

    /// Decode tokens go to the decode kernel, chunks of two or more tokens to 64-row prefill
    /// tiles; rows, positions, slots and tables line up with the batch.
    #[test]
    fn attention_plan_routes_decode_and_prefill() {
        let batch = ForwardBatch {
            sequences: vec![
                seq(1, 20, vec![3, 1], true), // decode at position 20, ctx 21
                seq(130, 0, vec![0, 2, 4, 5, 6, 7, 8, 9, 10], true), // 3 tiles
                seq(2, 16, vec![11, 12], false), // prefill chunk of 2 after 16 cached
            ],
        };
        let bs = 16;
        let slots = plan_slots(&test_config(), &batch, bs, 64).expect("valid batch");
        let p = AttentionPlan::build(&batch, &slots, bs, true);
        assert_eq!(p.decode_items, 1);
        assert_eq!(p.decode_max_ctx, 21);
        assert_eq!(p.ints[p.item_rows], 0);
        assert_eq!(p.ints[p.item_ctx], 21);
        assert_eq!(p.prefill_seqs, 2);
        assert_eq!(p.prefill_tiles, 3 + 1);
        assert_eq!(&p.ints[p.tile_seq..p.tile_seq + 4], &[0, 0, 0, 1]);
        assert_eq!(&p.ints[p.tile_q0..p.tile_q0 + 4], &[0, 64, 128, 0]);
        assert_eq!(&p.ints[p.seq_row0..p.seq_row0 + 2], &[1, 131]);
        assert_eq!(&p.ints[p.seq_start..p.seq_start + 2], &[0, 16]);
        assert_eq!(&p.ints[p.seq_len..p.seq_len + 2], &[130, 2]);
        // Tables are trimmed to the blocks each sequence uses, laid end to end.
        let offs = [
            p.ints[p.item_table_off],
            p.ints[p.seq_table_off],
            p.ints[p.seq_table_off + 1],
        ];
        assert_eq!(offs, [0, 2, 2 + 9]);
        assert_eq!(&p.ints[p.tables..p.tables + 2], &[3, 1]);
        // Decode token at position 20 -> block 1 of its table (physical 1), offset 4.
        assert_eq!(p.ints[p.slots], 16 + 4);
        assert_eq!(p.positions - p.tokens, 1 + 130 + 2);
        assert_eq!(p.ints[p.positions + 1 + 130], 16);
        // Logit rows: last token of sequences 0 and 1.
        assert_eq!(p.num_logit_rows, 2);
        assert_eq!(&p.ints[p.logit_rows..p.logit_rows + 2], &[0, 130]);
    }

    fn test_config() -> ModelConfig {
        ModelConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 128,
            "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}"#,
            Path::new("test"),
        )
        .expect("valid config")
    }

    /// Compiles the kernels with NVRTC (no GPU needed). Opt-in, as NVRTC is not on CI:
    /// `BLENDSERVE_NVRTC_TEST=1 LD_LIBRARY_PATH=<dir of libnvrtc.so> cargo test -p model
    /// --features cuda`.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if std::env::var_os("BLENDSERVE_NVRTC_TEST").is_none() {
            return;
        }
        for (major, minor) in [(8, 0), (9, 0)] {
            for all in [false, true] {
                let ptx =
                    super::compile_kernels(major, minor, all).unwrap_or_else(|e| panic!("{e}"));
                let text = ptx.to_src();
                for kernel in ["paged_decode_g4_d128", "paged_prefill_d128", "add_rms_norm"] {
                    assert!(text.contains(kernel), "{kernel} missing from the PTX");
                }
                // The Hopper kernels exist exactly where `Kernels` looks for them: the
                // preferred ones always, the others with `all`. (A name is not a prefix of
                // another one, apart from h2x1 of h2x1_*: checked by the entry's open paren.)
                for (variant, name) in super::WGMMA_VARIANTS {
                    let wanted = (major, minor) == (9, 0)
                        && (all || super::WGMMA_PREFERENCE.contains(&variant));
                    assert_eq!(
                        text.contains(&format!(".entry {name}(")),
                        wanted,
                        "{name} presence for sm_{major}{minor}, all variants {all}"
                    );
                }
                let persistent =
                    super::gemm_persistent::PERSISTENT_TILES.map(|t| t.function_name());
                for name in persistent
                    .iter()
                    .cloned()
                    .chain(super::StreamVariant::ALL.map(|v| v.function_name(4)))
                {
                    assert_eq!(
                        text.contains(&format!(".entry {name}(")),
                        (major, minor) == (9, 0),
                        "{name} presence for sm_{major}{minor}"
                    );
                }
                if let Some(dir) = std::env::var_os("BLENDSERVE_PTX_DIR") {
                    let suffix = if all { "_all" } else { "" };
                    let path = std::path::Path::new(&dir)
                        .join(format!("kernels_sm{major}{minor}{suffix}.ptx"));
                    std::fs::write(path, text).expect("writing the PTX");
                }
            }
        }
    }
}
