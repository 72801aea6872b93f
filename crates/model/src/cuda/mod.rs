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
//! Why not burn-cuda: cuBLAS must run on the stream that orders our kernels, and CubeCL 0.10 keeps
//! its streams private (non-blocking, created per thread, no accessor), so mixing the two would
//! cost a host synchronisation per GEMM. The burn path stays the reference (CPU tests, the GPU
//! check); this path is checked against it and against transformers on the device.

mod gemm;
mod overlap;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

pub use gemm::Gemm;
pub use overlap::{SmSplit, StepExecutor};

use cudarc::driver::sys::{CUstream, CUtensorMap};
use overlap::{record, split_nano_batches, wait, Overlap};

use crate::config::ModelConfig;
use crate::forward::{plan_slots, ForwardBatch};
use crate::weights::WeightStore;
use crate::ModelError;

/// The kernels, one family a file under `kernels/`, compiled as one NVRTC program (shared headers
/// first, each in the order its users need).
const KERNELS_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/mma.cuh"),
    "\n",
    include_str!("kernels/paged_kv.cuh"),
    "\n",
    include_str!("kernels/elementwise.cu"),
    "\n",
    include_str!("kernels/decode_attention.cu"),
    "\n",
    include_str!("kernels/prefill_attention.cu"),
    "\n",
    include_str!("kernels/prefill_wgmma.cu"),
    "\n",
    include_str!("kernels/sampling.cu"),
);
/// Query rows per prefill attention block (`BM` in `kernels/prefill_attention.cu`).
const PREFILL_TILE_ROWS: usize = 64;
/// Keys per prefill attention tile (`BN` in `kernels/prefill_attention.cu`).
const PREFILL_TILE_KEYS: usize = 64;

/// Dynamic shared memory of the mma.sync prefill kernel: two stages of K and V tiles, rows
/// padded by 8.
fn prefill_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * PREFILL_TILE_KEYS * (head_dim + 8) * 2
}

/// Head dimension of the Hopper (wgmma) prefill kernel.
const WGMMA_HEAD_DIM: usize = 128;

/// The wgmma prefill kernels: the variant and its kernel name. All heads of a block belong to
/// one KV group and share each K and V tile the block loads.
const WGMMA_VARIANTS: [(WgmmaVariant, &str); 14] = [
    (WgmmaVariant::new(1, 1, false), "paged_prefill_wgmma_h1x1"),
    (WgmmaVariant::new(1, 2, false), "paged_prefill_wgmma_h1x2"),
    (WgmmaVariant::new(2, 1, false), "paged_prefill_wgmma_h2x1"),
    (WgmmaVariant::new(2, 2, false), "paged_prefill_wgmma_h2x2"),
    (
        WgmmaVariant::new(2, 1, true),
        "paged_prefill_wgmma_h2x1_pingpong",
    ),
    (
        WgmmaVariant::new(2, 2, true),
        "paged_prefill_wgmma_h2x2_pingpong",
    ),
    (WgmmaVariant::new(4, 1, false), "paged_prefill_wgmma_h4x1"),
    (
        WgmmaVariant::new(2, 1, false).with_one_barrier(),
        "paged_prefill_wgmma_h2x1_one_barrier",
    ),
    (
        WgmmaVariant::new(4, 1, false).with_one_barrier(),
        "paged_prefill_wgmma_h4x1_one_barrier",
    ),
    (
        WgmmaVariant::new(2, 1, false).with_tma(),
        "paged_prefill_wgmma_h2x1_tma",
    ),
    (
        WgmmaVariant::new(4, 1, false).with_tma(),
        "paged_prefill_wgmma_h4x1_tma",
    ),
    (
        WgmmaVariant::new(2, 1, true).with_tma(),
        "paged_prefill_wgmma_h2x1_tma_pingpong",
    ),
    (
        WgmmaVariant::new(2, 1, false)
            .with_tma()
            .with_keys_per_tile(128),
        "paged_prefill_wgmma_h2x1_tma_k128",
    ),
    (
        WgmmaVariant::new(2, 1, true)
            .with_tma()
            .with_keys_per_tile(128),
        "paged_prefill_wgmma_h2x1_tma_k128_pingpong",
    ),
];

/// The wgmma variants the model takes by default, best first (as measured in
/// `experiments/gpu/bench-last-run.txt`); the first whose heads divide the KV group (and, for
/// TMA loads, whose cache blocks suit them: [`tma_block_size_ok`]) wins. Only these are in the
/// kernels compiled at load; the others are compiled when a benchmark asks for one
/// ([`CudaLlama::set_prefill_kernel`]).
const WGMMA_PREFERENCE: [WgmmaVariant; 3] = [
    WgmmaVariant::new(2, 1, false).with_tma(),
    WgmmaVariant::new(2, 1, false).with_one_barrier(),
    WgmmaVariant::new(1, 1, false),
];

/// Dynamic shared memory of a wgmma prefill kernel: a Q tile (64 rows x 128 dims) per head and
/// two stages of K and V tiles (`keys_per_tile` rows each), plus 1024 bytes to align the
/// swizzle atoms and 64 for the TMA variants' stage barriers and counters.
fn wgmma_prefill_smem_bytes(variant: WgmmaVariant) -> usize {
    (variant.heads_per_block() * PREFILL_TILE_ROWS + 4 * variant.keys_per_tile) * WGMMA_HEAD_DIM * 2
        + 1024
        + 64
}

/// Whether the TMA prefill kernels can load K and V from a cache of `block_size`-token blocks:
/// a box is one block (or 64 keys of a larger one) and must fill whole 8-row swizzle atoms.
pub fn tma_block_size_ok(block_size: usize) -> bool {
    block_size.is_power_of_two() && block_size >= 8
}

/// Which kernel runs decode attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// 16-lane groups, one token each, scores by FMAs and shuffles, K and V brought through two
    /// cp.async stages of shared memory (the default).
    Lanes,
    /// The same lane groups with K and V loaded straight into registers, so no loads in flight
    /// while a block computes (the first version; benchmark variant: KV group 4, head_dim 128).
    Registers,
    /// The GQA group's heads as the rows of tensor-core MMAs (benchmark variant: compute
    /// capability 9.0, KV group 4, head_dim 128).
    TensorCores,
}

/// Dynamic shared memory of the default decode kernel: two stages of 4 tokens a lane group
/// (128 threads x K, V x head_dim / 16 dims of bf16), or the 8 lane groups' merge (m, l and
/// head_dim accumulators of f32 a head) if larger.
pub fn decode_smem_bytes(group: usize, head_dim: usize) -> usize {
    let stage_bytes = 4 * 2 * 128 * (head_dim / 16) * 2;
    (2 * stage_bytes).max(4 * 8 * group * (head_dim + 2))
}

/// Dynamic shared memory of the tensor-core decode kernel: 4 warps x 2 stages x K, V x 16
/// tokens x 136 (padded) bf16.
const DECODE_TC_SMEM_BYTES: usize = 4 * 2 * 2 * 16 * 136 * 2;

/// Which kernel runs prefill attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// `mma.sync` tensor-core kernel (compute capability 8.0 and newer, head dim 64 or 128).
    MmaSync,
    /// Hopper warpgroup MMAs from shared memory (compute capability 9.0, head dim 128).
    Wgmma(WgmmaVariant),
}

/// Shape of a wgmma prefill block: `warpgroups` (128 threads each), each taking
/// `heads_per_warpgroup` query heads one after the other; with `pingpong` the two warpgroups
/// take turns issuing MMAs so that one's softmax overlaps the other's MMAs; with
/// `one_barrier` a K/V tile costs one block barrier instead of two (the next tile's loads start
/// after it instead of before); with `tma` (one head a warpgroup, no ping-pong) K and V come by
/// TMA into stages with mbarriers, and no block barrier a tile at all; `keys_per_tile` is 64, or
/// 128 with TMA (one block an SM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WgmmaVariant {
    pub warpgroups: usize,
    pub heads_per_warpgroup: usize,
    pub pingpong: bool,
    pub one_barrier: bool,
    pub tma: bool,
    pub keys_per_tile: usize,
}

impl WgmmaVariant {
    pub const fn new(warpgroups: usize, heads_per_warpgroup: usize, pingpong: bool) -> Self {
        WgmmaVariant {
            warpgroups,
            heads_per_warpgroup,
            pingpong,
            one_barrier: false,
            tma: false,
            keys_per_tile: PREFILL_TILE_KEYS,
        }
    }

    pub const fn with_tma(self) -> Self {
        WgmmaVariant { tma: true, ..self }
    }

    pub const fn with_keys_per_tile(self, keys_per_tile: usize) -> Self {
        WgmmaVariant {
            keys_per_tile,
            ..self
        }
    }

    pub const fn with_one_barrier(self) -> Self {
        WgmmaVariant {
            one_barrier: true,
            ..self
        }
    }

    /// Query heads a block.
    pub fn heads_per_block(&self) -> usize {
        self.warpgroups * self.heads_per_warpgroup
    }

    /// Every variant compiled into the kernels.
    pub fn all() -> impl Iterator<Item = WgmmaVariant> {
        WGMMA_VARIANTS.iter().map(|&(v, _)| v)
    }
}

/// NVRTC's target for compute capability `major.minor`: Hopper gets `sm_90a`, which its
/// warpgroup MMA instructions need.
fn nvrtc_arch(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> ModelError {
    ModelError::Cuda(format!("{what}: {e:?}"))
}

/// The kernels (`kernels/`) as PTX for compute capability `major.minor`; with `all_wgmma_variants`, also
/// the wgmma prefill variants only benchmarks use.
pub fn compile_kernels(
    major: i32,
    minor: i32,
    all_wgmma_variants: bool,
) -> Result<cudarc::nvrtc::Ptx, ModelError> {
    let arch: &'static str = Box::leak(nvrtc_arch(major, minor).into_boxed_str());
    let mut options = vec!["-std=c++17".to_string()];
    if all_wgmma_variants {
        options.push("-DBLENDSERVE_ALL_WGMMA_VARIANTS".into());
    }
    // Source lines in the machine code, for Nsight Compute's per-line stall sampling
    // (`experiments/gpu/profile_kernels.sh`).
    if std::env::var_os("BLENDSERVE_NVRTC_LINEINFO").is_some() {
        options.push("-lineinfo".into());
    }
    compile_ptx_with_opts(
        KERNELS_SRC,
        CompileOptions {
            arch: Some(arch),
            options,
            ..Default::default()
        },
    )
    .map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => ModelError::Cuda(format!(
            "NVRTC cannot compile the kernels (cuda/kernels/):\n{}",
            log.to_string_lossy()
        )),
        other => cuda_err("NVRTC", other),
    })
}

/// The compiled kernels.
struct Kernels {
    _module: Arc<CudaModule>,
    /// The module with every wgmma variant, once a benchmark asked for one.
    all_wgmma_module: Option<Arc<CudaModule>>,
    compute_capability: (i32, i32),
    gather_rows: CudaFunction,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    rope_write_kv: CudaFunction,
    decode: HashMap<(usize, usize), CudaFunction>,
    /// Tensor-core decode kernels by KV group, once a benchmark asked for one.
    decode_tc: HashMap<usize, CudaFunction>,
    /// The register decode kernel (KV group 4, head_dim 128), likewise.
    decode_registers: Option<CudaFunction>,
    decode_reduce: CudaFunction,
    prefill: HashMap<usize, CudaFunction>,
    /// Compute capability 9.0 only (compiled for `sm_90a`): the variants of `WGMMA_PREFERENCE`,
    /// then the others when [`Kernels::load_all_wgmma_variants`] ran.
    prefill_wgmma: HashMap<WgmmaVariant, CudaFunction>,
    argmax_rows: CudaFunction,
    fill_uniform: CudaFunction,
}

impl Kernels {
    fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, ModelError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        if major < 8 {
            return Err(ModelError::Cuda(format!(
                "compute capability {major}.{minor}: the bf16 tensor-core kernels need 8.0 or newer"
            )));
        }
        let ptx = compile_kernels(major, minor, false)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| cuda_err("loading kernels", e))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| cuda_err(&format!("kernel {name}"), e))
        };
        let mut decode = HashMap::new();
        for g in 1..=8 {
            for d in [64, 128] {
                let func = f(&format!("paged_decode_g{g}_d{d}"))?;
                allow_all_dynamic_smem(ctx, &func)?;
                decode.insert((g, d), func);
            }
        }
        let mut prefill = HashMap::new();
        for d in [64, 128] {
            let func = f(&format!("paged_prefill_d{d}"))?;
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                prefill_smem_bytes(d) as i32,
            )
            .map_err(|e| cuda_err("prefill kernel shared memory", e))?;
            prefill.insert(d, func);
        }
        let mut prefill_wgmma = HashMap::new();
        if (major, minor) == (9, 0) {
            for variant in WGMMA_PREFERENCE {
                prefill_wgmma.insert(variant, wgmma_function(&module, variant)?);
            }
        }
        Ok(Kernels {
            gather_rows: f("gather_rows")?,
            add_rms_norm: f("add_rms_norm")?,
            silu_mul: f("silu_mul")?,
            rope_write_kv: f("rope_write_kv")?,
            decode,
            decode_tc: HashMap::new(),
            decode_registers: None,
            decode_reduce: f("paged_decode_reduce")?,
            prefill,
            prefill_wgmma,
            argmax_rows: f("argmax_rows")?,
            fill_uniform: f("fill_uniform")?,
            _module: module,
            all_wgmma_module: None,
            compute_capability: (major, minor),
        })
    }

    /// Compiles and loads the wgmma variants (and the tensor-core decode kernel) that are not in
    /// the load-time module (compute capability 9.0 only; a few seconds of NVRTC).
    fn load_all_wgmma_variants(&mut self, ctx: &Arc<CudaContext>) -> Result<(), ModelError> {
        let (major, minor) = self.compute_capability;
        if (major, minor) != (9, 0) || self.all_wgmma_module.is_some() {
            return Ok(());
        }
        let module = ctx
            .load_module(compile_kernels(major, minor, true)?)
            .map_err(|e| cuda_err("loading kernels", e))?;
        for variant in WgmmaVariant::all() {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                self.prefill_wgmma.entry(variant)
            {
                slot.insert(wgmma_function(&module, variant)?);
            }
        }
        let name = "paged_decode_tc_g4_d128";
        let func = module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
        allow_all_dynamic_smem(ctx, &func)?;
        self.decode_tc.insert(4, func);
        let name = "paged_decode_registers_g4_d128";
        let func = module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
        allow_all_dynamic_smem(ctx, &func)?;
        self.decode_registers = Some(func);
        self.all_wgmma_module = Some(module);
        Ok(())
    }
}

/// Lets `f` take as much dynamic shared memory as a block may (decode launches pad theirs to
/// run fewer blocks an SM).
fn allow_all_dynamic_smem(ctx: &Arc<CudaContext>, f: &CudaFunction) -> Result<(), ModelError> {
    use cudarc::driver::sys::{CUdevice_attribute as Dev, CUfunction_attribute as Func};
    let optin = ctx
        .attribute(Dev::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(|e| cuda_err("shared memory sizes", e))?;
    let static_bytes = f
        .get_attribute(Func::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(|e| cuda_err("kernel attributes", e))?;
    f.set_attribute(
        Func::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        optin - static_bytes,
    )
    .map_err(|e| cuda_err("kernel shared memory", e))
}

/// The first of [`WGMMA_PREFERENCE`] that `kernels` has for this model's heads (leaving out the
/// TMA ones unless `tma`), or mma.sync.
fn preferred_prefill_kernel(c: &ModelConfig, kernels: &Kernels, tma: bool) -> PrefillKernel {
    let group = c.num_heads / c.num_kv_heads;
    WGMMA_PREFERENCE
        .into_iter()
        .find(|v| {
            c.head_dim == WGMMA_HEAD_DIM
                && (tma || !v.tma)
                && group.is_multiple_of(v.heads_per_block())
                && kernels.prefill_wgmma.contains_key(v)
        })
        .map_or(PrefillKernel::MmaSync, PrefillKernel::Wgmma)
}

/// The TMA descriptor of one layer's K or V cache at device address `ptr`: `num_slots` rows of
/// `[kv_heads, head_dim]` bf16, read in boxes of 64 dims x 1 head x one cache block (at most 64
/// tokens), 128-byte swizzled as the wgmma kernels lay tiles out. Out-of-range rows read as 0.
fn kv_tensor_map(
    ptr: u64,
    num_slots: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Result<CUtensorMap, ModelError> {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMapDataType, CUtensorMapFloatOOBfill,
        CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    let dims = [head_dim as u64, kv_heads as u64, num_slots as u64];
    let strides_bytes = [2 * head_dim as u64, 2 * (kv_heads * head_dim) as u64];
    let boxes = [64u32, 1, block_size.min(PREFILL_TILE_KEYS) as u32];
    let element_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length; the driver only writes the map.
    let result = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides_bytes.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if result != CUresult::CUDA_SUCCESS {
        return Err(cuda_err(
            &format!(
                "TMA descriptor of a KV cache ({num_slots} slots x {kv_heads} heads x \
                 {head_dim}, blocks of {block_size})"
            ),
            result,
        ));
    }
    // SAFETY: encoded successfully above.
    Ok(unsafe { map.assume_init() })
}

/// The wgmma prefill kernel of `variant` in `module`, allowed its shared memory.
fn wgmma_function(
    module: &Arc<CudaModule>,
    variant: WgmmaVariant,
) -> Result<CudaFunction, ModelError> {
    let name = WGMMA_VARIANTS
        .iter()
        .find(|(v, _)| *v == variant)
        .map(|(_, name)| *name)
        .expect("every variant has a kernel name");
    let func = module
        .load_function(name)
        .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
    func.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        wgmma_prefill_smem_bytes(variant) as i32,
    )
    .map_err(|e| cuda_err("wgmma prefill kernel shared memory", e))?;
    Ok(func)
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

/// How decode attention splits each context: `split_tokens` per block, at most `max_splits`
/// blocks per sequence, partial results in `part_acc` / `part_ml` (device addresses).
#[derive(Clone, Copy)]
struct DecodeSplit {
    split_tokens: usize,
    max_splits: usize,
    /// Dynamic shared memory of the decode launch (sets its occupancy).
    smem_bytes: u32,
    part_acc: u64,
    part_ml: u64,
}

/// An occupancy a decode launch may run at: `blocks_per_sm` resident blocks an SM, got with
/// `smem_bytes` of dynamic shared memory (the kernel's own, or padded so that fewer fit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DecodeOccupancy {
    blocks_per_sm: usize,
    smem_bytes: u32,
}

/// How many occupancies a decode launch chooses from: the kernel's own and up to two lower.
const DECODE_OCCUPANCIES: usize = 3;

/// Where decode blocks run: `sms` SMs at one of `occupancies` (the kernel's own first; an
/// entry of 0 blocks is none), and the split count and occupancy a benchmark forces instead of
/// [`decode_launch_shape`]'s.
#[derive(Clone, Copy, Debug)]
struct DecodeSlots {
    sms: usize,
    occupancies: [DecodeOccupancy; DECODE_OCCUPANCIES],
    forced_splits: Option<usize>,
    forced_blocks_per_sm: Option<usize>,
}

impl DecodeSlots {
    /// The splits and occupancy of a launch of `blocks` blocks over contexts of up to
    /// `max_ctx` tokens.
    fn shape(&self, blocks: usize, max_ctx: usize) -> (usize, DecodeOccupancy) {
        let allowed: Vec<DecodeOccupancy> = self
            .occupancies
            .iter()
            .copied()
            .filter(|o| o.blocks_per_sm > 0)
            .filter(|o| {
                self.forced_blocks_per_sm
                    .is_none_or(|k| o.blocks_per_sm == k)
            })
            .collect();
        let most = allowed.first().copied().unwrap_or(self.occupancies[0]);
        if let Some(splits) = self.forced_splits {
            return (splits, most);
        }
        let per_sm: Vec<usize> = allowed.iter().map(|o| o.blocks_per_sm).collect();
        let (splits, k) = decode_launch_shape(blocks, self.sms, &per_sm, max_ctx);
        let occupancy = allowed
            .into_iter()
            .find(|o| o.blocks_per_sm == k)
            .unwrap_or(most);
        (splits, occupancy)
    }
}

/// Fewest context tokens a decode split takes (a lane-kernel block reads 32 a step).
const MIN_DECODE_SPLIT_TOKENS: usize = 128;

/// Decode blocks an SM, on average, that keep enough loads in flight to pull the HBM
/// bandwidth (H100, `experiments/NOTES.md`: 2.9 an SM unsplit ran as fast as any split, 2.4
/// an SM ran at 0.75x of 2 splits).
const DECODE_MIN_BLOCKS_PER_SM: f64 = 2.5;

/// What a split costs a decode launch, as a fraction of its time (the reduction kernel, the
/// partial results and the blocks' fixed costs again: 5-15% on the H100 where the blocks fit
/// either way, NOTES.md).
const DECODE_SPLIT_COST: f64 = 0.1;

/// How full the waves of `blocks` blocks on `resident_blocks` slots are on average (the last
/// one partly idle). A partial single wave counts as partly idle too: launched as a
/// programmatic dependent, the next launch's blocks take the free slots early and end up
/// spread unevenly (H100: 64 x 512 at 5 blocks an SM, 148 slots free, ran at 0.77x of copy
/// against 0.87x at 4 an SM, 16 free; NOTES.md).
fn wave_fill(blocks: usize, resident_blocks: usize) -> f64 {
    let waves = blocks as f64 / resident_blocks as f64;
    waves / waves.ceil()
}

/// The (splits, blocks an SM) of a decode launch of `blocks` blocks (items x KV heads) over
/// contexts of up to `max_ctx` tokens on `sms` SMs, the kernel able to run at any of
/// `blocks_per_sm` (its occupancy, and lower ones by padding its shared memory). A split
/// count at most one per 128 context tokens; among the shapes with enough blocks in flight
/// (`DECODE_MIN_BLOCKS_PER_SM` an SM), the best wave fill less `DECODE_SPLIT_COST` if split
/// (more waves fill better but cost as much), then within 3% of that the fewest splits, then
/// the most blocks an SM; with no shape that has enough blocks, the one with the most.
/// Measured on the H100 (NOTES.md, `cuda_bench --decode-sweep`): 96 items x 8 KV heads run
/// best as 1.94 waves of 3 blocks an SM rather than 1.45 of 4 or 1.16 of 5; 64 items as one
/// wave of 4 an SM; 32 items split in two.
pub fn decode_launch_shape(
    blocks: usize,
    sms: usize,
    blocks_per_sm: &[usize],
    max_ctx: usize,
) -> (usize, usize) {
    let first = blocks_per_sm.first().copied().unwrap_or(1);
    if blocks == 0 || sms == 0 {
        return (1, first);
    }
    let most_splits = max_ctx.div_ceil(MIN_DECODE_SPLIT_TOKENS).clamp(1, 64);
    let wanted = (DECODE_MIN_BLOCKS_PER_SM * sms as f64).ceil() as usize;
    // (splits, blocks an SM, blocks in flight at once, wave fill less the split's cost)
    let shapes: Vec<(usize, usize, usize, f64)> = blocks_per_sm
        .iter()
        .filter(|&&k| k > 0)
        .flat_map(|&k| {
            (1..=most_splits).map(move |s| {
                let n = blocks * s;
                let cost = if s > 1 { 1.0 - DECODE_SPLIT_COST } else { 1.0 };
                (s, k, n.min(sms * k), cost * wave_fill(n, sms * k))
            })
        })
        .collect();
    let enough: Vec<_> = shapes.iter().filter(|x| x.2 >= wanted).collect();
    let pick = if enough.is_empty() {
        let most = shapes.iter().map(|x| x.2).max().unwrap_or(0);
        shapes
            .iter()
            .filter(|x| x.2 == most)
            .min_by_key(|x| (x.0, std::cmp::Reverse(x.1)))
    } else {
        let best = enough.iter().map(|x| x.3).fold(0.0, f64::max);
        enough
            .into_iter()
            .filter(|x| x.3 >= best - 0.03)
            .min_by_key(|x| (x.0, std::cmp::Reverse(x.1)))
    };
    pick.map_or((1, first), |x| (x.0, x.1))
}

/// The decode split over the context (tokens per split, splits at most) and occupancy for the
/// blocks to fill `slots`, and the scratch (grown on `stream`) for the splits' partial results.
fn decode_split(
    c: &ModelConfig,
    slots: DecodeSlots,
    stream: &Arc<CudaStream>,
    plan: &AttentionPlan,
    part_acc: &mut Scratch<f32>,
    part_ml: &mut Scratch<f32>,
) -> Result<DecodeSplit, ModelError> {
    let (split_tokens, max_splits, occupancy) = if plan.decode_items > 0 {
        let blocks = plan.decode_items * c.num_kv_heads;
        let (splits, occupancy) = slots.shape(blocks, plan.decode_max_ctx);
        let split = plan
            .decode_max_ctx
            .div_ceil(splits.max(1))
            .next_multiple_of(64);
        (split, plan.decode_max_ctx.div_ceil(split), occupancy)
    } else {
        (256, 1, slots.occupancies[0])
    };
    let entries = plan.decode_items * c.num_heads * max_splits;
    Ok(DecodeSplit {
        split_tokens,
        max_splits,
        smem_bytes: occupancy.smem_bytes,
        part_acc: part_acc.ptr(stream, entries * c.head_dim)?,
        part_ml: part_ml.ptr(stream, entries * 2)?,
    })
}

/// A planned and uploaded attention launch (benchmarks).
struct AttentionRun {
    plan: AttentionPlan,
    ints: u64,
    qkv: u64,
    attn: u64,
    split: DecodeSplit,
}

/// The rows of a step one pass over the layers works on (the whole batch, or one nano-batch of
/// the overlapped executor): their plan, where its indices sit on the device, their
/// activation rows and their decode split.
struct StepRows<'a> {
    plan: &'a AttentionPlan,
    ints: u64,
    acts: Activations,
    rows: usize,
    split: DecodeSplit,
}

impl StepRows<'_> {
    /// Device address of the plan's index array at `offset` (in i32s).
    fn at(&self, offset: usize) -> u64 {
        self.ints + 4 * offset as u64
    }
}

/// Which of a step's attention work [`CudaLlama::attention`] queues.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AttentionPart {
    Both,
    Decode,
    Prefill,
}

/// Width of the fused q, k, v projection's output.
fn qkv_width(c: &ModelConfig) -> usize {
    (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
}

/// A step's activation buffers (device addresses of their first row), row-major bf16.
#[derive(Clone, Copy)]
struct Activations {
    /// Residual stream `[rows, hidden]`.
    x: u64,
    /// Normed residual `[rows, hidden]`.
    normed: u64,
    /// q, k, v projections `[rows, qkv_width]`.
    qkv: u64,
    /// Attention output `[rows, heads * head_dim]`.
    attn: u64,
    /// Output of the O and down projections `[rows, hidden]`.
    delta: u64,
    /// Gate and up projections `[rows, 2 * intermediate]`.
    gate_up: u64,
    /// SiLU(gate) * up `[rows, intermediate]`.
    act: u64,
}

impl Activations {
    /// The same buffers from row `row` on.
    fn rows_from(&self, c: &ModelConfig, row: usize) -> Activations {
        let at = |base: u64, width: usize| base + 2 * (row * width) as u64;
        Activations {
            x: at(self.x, c.hidden_size),
            normed: at(self.normed, c.hidden_size),
            qkv: at(self.qkv, qkv_width(c)),
            attn: at(self.attn, c.num_heads * c.head_dim),
            delta: at(self.delta, c.hidden_size),
            gate_up: at(self.gate_up, 2 * c.intermediate_size),
            act: at(self.act, c.intermediate_size),
        }
    }
}

/// Where a step's attention work goes, built on the host and uploaded in one copy.
#[derive(Default)]
struct AttentionPlan {
    ints: Vec<i32>,
    decode_items: usize,
    decode_max_ctx: usize,
    prefill_tiles: usize,
    prefill_seqs: usize,
    // Offsets (in i32s) of each array inside `ints`.
    tokens: usize,
    positions: usize,
    slots: usize,
    tables: usize,
    item_rows: usize,
    item_ctx: usize,
    item_table_off: usize,
    tile_seq: usize,
    tile_q0: usize,
    seq_row0: usize,
    seq_start: usize,
    seq_len: usize,
    seq_table_off: usize,
    logit_rows: usize,
    num_logit_rows: usize,
}

impl AttentionPlan {
    /// The plan of `batch`'s attention; with `longest_decodes_first`, the decode items ordered
    /// by falling context (ties in batch order), which the decode grid launches in order.
    fn build(
        batch: &ForwardBatch,
        slots: &[usize],
        block_size: usize,
        longest_decodes_first: bool,
    ) -> AttentionPlan {
        let mut p = AttentionPlan::default();
        let mut table_off = Vec::new();
        let mut tables = Vec::new();
        for s in &batch.sequences {
            table_off.push(tables.len() as i32);
            let end = s.start_position + s.tokens.len();
            tables.extend(
                s.block_table[..end.div_ceil(block_size)]
                    .iter()
                    .map(|&b| b as i32),
            );
        }
        let ints = &mut p.ints;
        p.tokens = ints.len();
        for s in &batch.sequences {
            ints.extend(s.tokens.iter().map(|&t| t as i32));
        }
        p.positions = ints.len();
        for s in &batch.sequences {
            ints.extend((s.start_position..s.start_position + s.tokens.len()).map(|x| x as i32));
        }
        p.slots = ints.len();
        ints.extend(slots.iter().map(|&x| x as i32));
        p.tables = ints.len();
        ints.extend(&tables);
        let mut rows = Vec::with_capacity(batch.sequences.len());
        let mut row = 0usize;
        for s in &batch.sequences {
            rows.push(row);
            row += s.tokens.len();
        }
        let mut decode: Vec<usize> = (0..batch.sequences.len())
            .filter(|&i| batch.sequences[i].tokens.len() == 1)
            .collect();
        if longest_decodes_first {
            decode.sort_by_key(|&i| std::cmp::Reverse(batch.sequences[i].start_position));
        }
        let prefill: Vec<usize> = (0..batch.sequences.len())
            .filter(|&i| batch.sequences[i].tokens.len() > 1)
            .collect();
        p.decode_items = decode.len();
        p.item_rows = ints.len();
        ints.extend(decode.iter().map(|&i| rows[i] as i32));
        p.item_ctx = ints.len();
        ints.extend(
            decode
                .iter()
                .map(|&i| batch.sequences[i].start_position as i32 + 1),
        );
        p.decode_max_ctx = decode
            .iter()
            .map(|&i| batch.sequences[i].start_position + 1)
            .max()
            .unwrap_or(0);
        p.item_table_off = ints.len();
        ints.extend(decode.iter().map(|&i| table_off[i]));
        p.prefill_seqs = prefill.len();
        let mut tile_seq = Vec::new();
        let mut tile_q0 = Vec::new();
        for (k, &i) in prefill.iter().enumerate() {
            let len = batch.sequences[i].tokens.len();
            for q0 in (0..len).step_by(PREFILL_TILE_ROWS) {
                tile_seq.push(k as i32);
                tile_q0.push(q0 as i32);
            }
        }
        p.prefill_tiles = tile_seq.len();
        p.tile_seq = ints.len();
        ints.extend(&tile_seq);
        p.tile_q0 = ints.len();
        ints.extend(&tile_q0);
        p.seq_row0 = ints.len();
        ints.extend(prefill.iter().map(|&i| rows[i] as i32));
        p.seq_start = ints.len();
        ints.extend(
            prefill
                .iter()
                .map(|&i| batch.sequences[i].start_position as i32),
        );
        p.seq_len = ints.len();
        ints.extend(
            prefill
                .iter()
                .map(|&i| batch.sequences[i].tokens.len() as i32),
        );
        p.seq_table_off = ints.len();
        ints.extend(prefill.iter().map(|&i| table_off[i]));
        p.logit_rows = ints.len();
        for (i, s) in batch.sequences.iter().enumerate() {
            if s.logits {
                ints.push((rows[i] + s.tokens.len() - 1) as i32);
            }
        }
        p.num_logit_rows = ints.len() - p.logit_rows;
        p
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
        let gemm = Gemm::new(stream.clone())?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| cuda_err("SM count", e))? as usize;
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
        Ok((model, stream))
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

    /// The kernel prefill attention runs on (the fastest this GPU and head size allow, unless
    /// set otherwise).
    pub fn prefill_kernel(&self) -> PrefillKernel {
        self.prefill_kernel
    }

    /// The prefill kernel that runs over a cache of `block_size`-token blocks: the chosen one,
    /// or, when it loads by TMA and such blocks do not suit TMA boxes, the best preferred one
    /// that does not.
    fn prefill_kernel_for(&self, block_size: usize) -> PrefillKernel {
        match self.prefill_kernel {
            PrefillKernel::Wgmma(v) if v.tma && !tma_block_size_ok(block_size) => {
                preferred_prefill_kernel(&self.config, &self.kernels, false)
            }
            kernel => kernel,
        }
    }

    /// Chooses the prefill attention kernel (benchmarks compare them); an error if this GPU or
    /// head size cannot run it.
    pub fn set_prefill_kernel(&mut self, kernel: PrefillKernel) -> Result<(), ModelError> {
        if let PrefillKernel::Wgmma(variant) = kernel {
            if !self.kernels.prefill_wgmma.contains_key(&variant) {
                self.kernels.load_all_wgmma_variants(&self.ctx)?;
            }
            let c = &self.config;
            let group = c.num_heads / c.num_kv_heads;
            if !self.kernels.prefill_wgmma.contains_key(&variant)
                || c.head_dim != WGMMA_HEAD_DIM
                || !group.is_multiple_of(variant.heads_per_block())
            {
                return Err(ModelError::Cuda(format!(
                    "no wgmma prefill kernel {variant:?} for head_dim {} and KV group {group} \
                     (it needs compute capability 9.0, head_dim {WGMMA_HEAD_DIM}, and the \
                     block's heads dividing the group)",
                    c.head_dim
                )));
            }
        }
        self.prefill_kernel = kernel;
        Ok(())
    }

    pub fn decode_kernel(&self) -> DecodeKernel {
        self.decode_kernel
    }

    /// Chooses the decode attention kernel (benchmarks compare them); an error if this GPU,
    /// KV group or head size has no such kernel.
    pub fn set_decode_kernel(&mut self, kernel: DecodeKernel) -> Result<(), ModelError> {
        if kernel != DecodeKernel::Lanes {
            self.kernels.load_all_wgmma_variants(&self.ctx)?;
            let c = &self.config;
            let group = c.num_heads / c.num_kv_heads;
            let present = match kernel {
                DecodeKernel::Lanes => true,
                DecodeKernel::Registers => group == 4 && self.kernels.decode_registers.is_some(),
                DecodeKernel::TensorCores => self.kernels.decode_tc.contains_key(&group),
            };
            if c.head_dim != 128 || !present {
                return Err(ModelError::Cuda(format!(
                    "no {kernel:?} decode kernel for KV group {group} and head_dim {}",
                    c.head_dim
                )));
            }
        }
        self.decode_kernel = kernel;
        self.decode_occupancies = self.decode_occupancies()?;
        Ok(())
    }

    /// The occupancies the current decode kernel may run at: as many blocks an SM as fit with
    /// its own shared memory, then one and two fewer with the dynamic shared memory padded to
    /// an SM's share (from the driver's sizes, checked by its occupancy calculator).
    fn decode_occupancies(&self) -> Result<[DecodeOccupancy; DECODE_OCCUPANCIES], ModelError> {
        use cudarc::driver::sys::{CUdevice_attribute as Dev, CUfunction_attribute as Func};
        let (f, smem_bytes) = self.decode_function();
        let occupancy = |smem: u32| {
            f.occupancy_max_active_blocks_per_multiprocessor(128, smem as usize, None)
                .map(|b| b as usize)
                .map_err(|e| cuda_err("decode kernel occupancy", e))
        };
        let device = |a| {
            self.ctx
                .attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(|e| cuda_err("shared memory sizes", e))
        };
        let function = |a| {
            f.get_attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(|e| cuda_err("decode kernel attributes", e))
        };
        let per_sm = device(Dev::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?;
        let reserved = device(Dev::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?;
        let static_bytes = function(Func::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let max_dynamic = function(Func::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?;
        let most = occupancy(smem_bytes)?.max(1);
        let mut out = [DecodeOccupancy::default(); DECODE_OCCUPANCIES];
        out[0] = DecodeOccupancy {
            blocks_per_sm: most,
            smem_bytes,
        };
        let mut n = 1;
        for k in (most.saturating_sub(DECODE_OCCUPANCIES - 1).max(1)..most).rev() {
            let padded = (per_sm / k).saturating_sub(reserved + static_bytes);
            if padded > smem_bytes as usize
                && padded <= max_dynamic
                && occupancy(padded as u32)? == k
            {
                out[n] = DecodeOccupancy {
                    blocks_per_sm: k,
                    smem_bytes: padded as u32,
                };
                n += 1;
            }
        }
        Ok(out)
    }

    /// The current decode kernel for this model's KV group and head_dim, and its dynamic shared
    /// memory (`set_decode_kernel` checked that the tensor-core kernel exists).
    fn decode_function(&self) -> (&CudaFunction, u32) {
        let c = &self.config;
        let (group, head_dim) = (c.num_heads / c.num_kv_heads, c.head_dim);
        match self.decode_kernel {
            DecodeKernel::Lanes => (
                &self.kernels.decode[&(group, head_dim)],
                decode_smem_bytes(group, head_dim) as u32,
            ),
            DecodeKernel::Registers => (
                self.kernels
                    .decode_registers
                    .as_ref()
                    .expect("set_decode_kernel checked"),
                0,
            ),
            DecodeKernel::TensorCores => {
                (&self.kernels.decode_tc[&group], DECODE_TC_SMEM_BYTES as u32)
            }
        }
    }

    /// Blocks of the current decode kernel an SM holds at once with its own shared memory.
    pub fn decode_blocks_per_sm(&self) -> usize {
        self.decode_occupancies[0].blocks_per_sm
    }

    /// The blocks an SM the current decode kernel may run at (its own, then lower ones).
    pub fn decode_occupancy_choices(&self) -> Vec<usize> {
        self.decode_occupancies
            .iter()
            .map(|o| o.blocks_per_sm)
            .filter(|&k| k > 0)
            .collect()
    }

    /// Forces every context into `splits` decode splits (benchmarks), or (`None`) lets
    /// [`decode_launch_shape`] choose; without a forced occupancy, at the kernel's own.
    pub fn set_decode_splits(&mut self, splits: Option<usize>) {
        self.forced_decode_splits = splits.map(|s| s.max(1));
    }

    /// Launches decode attention as a programmatic dependent of the kernel before it (the
    /// default on compute capability 9.0 and newer), or plainly (benchmarks compare).
    pub fn set_decode_dependent_launch(&mut self, dependent: bool) {
        self.decode_dependent_launch = dependent && self.kernels.compute_capability.0 >= 9;
    }

    /// Launches decode items longest context first (the default), or in batch order
    /// (benchmarks compare).
    pub fn set_decode_longest_first(&mut self, longest_first: bool) {
        self.decode_longest_first = longest_first;
    }

    /// Forces decode launches to `blocks_per_sm` of [`CudaLlama::decode_occupancy_choices`]
    /// (benchmarks), or (`None`) lets [`decode_launch_shape`] choose.
    pub fn set_decode_blocks_per_sm(&mut self, blocks_per_sm: Option<usize>) {
        self.forced_decode_blocks_per_sm = blocks_per_sm;
    }

    /// The decode slots of `sms` SMs.
    fn decode_slots(&self, sms: usize) -> DecodeSlots {
        DecodeSlots {
            sms,
            occupancies: self.decode_occupancies,
            forced_splits: self.forced_decode_splits,
            forced_blocks_per_sm: self.forced_decode_blocks_per_sm,
        }
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
        self.launch_smem_on(stream, f, grid, block, 0, args, what, false)
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
        self.launch_smem_on(
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

    /// Launches `f` on `stream` with `args`; with `dependent`, as a programmatic dependent of
    /// the kernel before it in the stream (compute capability 9.0: its blocks may start while
    /// that kernel's last ones run, and must `pdl_wait` before reading what it wrote).
    #[allow(clippy::too_many_arguments)]
    fn launch_smem_on(
        &self,
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
        attribute.id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
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
        if self.overlap.is_some() && decodes >= 2 && !profiling {
            return self.forward_overlapped(batch, cache, &slots);
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

    /// [`CudaLlama::forward`] under the overlapped executor (see [`overlap`]): two
    /// nano-batches (rows `[0, n0)` and `[n0, n)` of the activation buffers) pipelined over the
    /// compute and memory lanes layer by layer; the main stream waits for both lanes, then
    /// norms and samples.
    fn forward_overlapped(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        slots: &[usize],
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        let nano = split_nano_batches(batch, slots);
        let rows = [nano.slots[0].len(), nano.slots[1].len()];
        let n = slots.len();
        let plans = [0, 1].map(|k| {
            AttentionPlan::build(
                &nano.parts[k],
                &nano.slots[k],
                cache.block_size,
                self.decode_longest_first,
            )
        });
        // One upload: both plans, then the logit rows.
        let mut ints = plans[0].ints.clone();
        ints.extend_from_slice(&plans[1].ints);
        let logit_base = ints.len();
        ints.extend_from_slice(&nano.logit_rows);
        let dev_ints = self.upload_ints(&ints)?;
        let part_ints = [dev_ints, dev_ints + 4 * plans[0].ints.len() as u64];
        let acts = self.activations(n)?;
        let part_acts = [acts, acts.rows_from(&c, rows[0])];
        let stream = self.stream.clone();
        let memory_sms = self.overlap.as_ref().expect("called with lanes").lanes[1].sm_count;
        let memory_slots = self.decode_slots(memory_sms);
        let overlap = self.overlap.as_mut().expect("called with lanes");
        let mut parts = Vec::with_capacity(2);
        for (k, lane) in overlap.lanes.iter_mut().enumerate() {
            parts.push(StepRows {
                plan: &plans[k],
                ints: part_ints[k],
                acts: part_acts[k],
                rows: rows[k],
                split: decode_split(
                    &c,
                    memory_slots,
                    &stream,
                    &plans[k],
                    &mut lane.part_acc,
                    &mut lane.part_ml,
                )?,
            });
        }
        // The lanes start after the uploads and allocations queued on the main stream.
        record(overlap.start, stream.cu_stream())?;
        let overlap = self.overlap.as_ref().expect("called with lanes");
        let (compute, memory) = (overlap.lanes[0].stream(), overlap.lanes[1].stream());
        let gemm = &overlap.lanes[0].gemm;
        wait(compute, overlap.start)?;
        wait(memory, overlap.start)?;
        for part in &parts {
            self.embed(compute, part)?;
        }
        for l in 0..c.num_layers {
            for (k, part) in parts.iter().enumerate() {
                self.layer_qkv(l, compute, gemm, part, cache)?;
                if part.plan.decode_items > 0 {
                    record(overlap.qkv_ready[k], compute)?;
                    wait(memory, overlap.qkv_ready[k])?;
                    self.layer_attention(l, memory, part, cache, AttentionPart::Decode)?;
                    record(overlap.attention_done[k], memory)?;
                }
                self.layer_attention(l, compute, part, cache, AttentionPart::Prefill)?;
            }
            for (k, part) in parts.iter().enumerate() {
                if part.plan.decode_items > 0 {
                    wait(compute, overlap.attention_done[k])?;
                }
                self.layer_out(l, compute, gemm, part)?;
            }
        }
        for lane in &overlap.lanes {
            record(lane.done, lane.stream())?;
            wait(stream.cu_stream(), lane.done)?;
        }
        let logit_rows = nano.logit_rows.len();
        self.finish(&acts, n, dev_ints + 4 * logit_base as u64, logit_rows)?;
        self.last_logit_rows = logit_rows;
        Ok(())
    }

    /// One layer's attention for the step in `plan` (indices at `ints` on the device): decode
    /// items through the split decode kernel (and its reduction), prefill chunks through the
    /// tensor-core kernel. Reads q from `qkv`, K and V from the cache; writes `attn`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        stream: CUstream,
        plan: &AttentionPlan,
        ints: u64,
        qkv: u64,
        attn: u64,
        cache: &CudaKvCache,
        layer: usize,
        split: &DecodeSplit,
        part: AttentionPart,
    ) -> Result<(), ModelError> {
        let (kc, vc) = (
            raw_ptr(&cache.keys[layer], &self.stream),
            raw_ptr(&cache.values[layer], &self.stream),
        );
        let block_size = cache.block_size;
        let DecodeSplit {
            split_tokens,
            max_splits,
            smem_bytes,
            part_acc,
            part_ml,
        } = *split;
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (heads_i, kv_i, d_i) = (heads as i32, kv_heads as i32, d as i32);
        let bs_i = block_size as i32;
        let scale_log2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let at = |off: usize| ints + 4 * off as u64;
        if plan.decode_items > 0 && part != AttentionPart::Prefill {
            let (f, _) = self.decode_function();
            let (split_i, max_splits_i) = (split_tokens as i32, max_splits as i32);
            self.launch_smem_on(
                stream,
                f,
                // KV heads fastest: an item's blocks launch together, items in plan order.
                (kv_heads as u32, plan.decode_items as u32, max_splits as u32),
                128,
                smem_bytes,
                &[
                    Ptr(attn),
                    Ptr(part_acc),
                    Ptr(part_ml),
                    Ptr(qkv),
                    Ptr(kc),
                    Ptr(vc),
                    Ptr(at(plan.tables)),
                    Ptr(at(plan.item_rows)),
                    Ptr(at(plan.item_ctx)),
                    Ptr(at(plan.item_table_off)),
                    I32(kv_i),
                    I32(bs_i),
                    I32(split_i),
                    I32(max_splits_i),
                    F32(scale_log2),
                ],
                "paged decode attention",
                self.decode_dependent_launch,
            )?;
            if max_splits > 1 {
                self.launch_on(
                    stream,
                    &self.kernels.decode_reduce,
                    (plan.decode_items as u32, heads as u32, 1),
                    d as u32,
                    &[
                        Ptr(attn),
                        Ptr(part_acc),
                        Ptr(part_ml),
                        Ptr(at(plan.item_rows)),
                        Ptr(at(plan.item_ctx)),
                        I32(heads_i),
                        I32(d_i),
                        I32(split_i),
                        I32(max_splits_i),
                    ],
                    "paged decode reduce",
                )?;
            }
        }
        if plan.prefill_tiles > 0 && part != AttentionPart::Decode {
            // (set_prefill_kernel checked that the variant exists and divides the group.)
            let kernel = self.prefill_kernel_for(block_size);
            let (f, heads_per_block, threads, smem_bytes) = match kernel {
                PrefillKernel::Wgmma(v) => (
                    &self.kernels.prefill_wgmma[&v],
                    v.heads_per_block(),
                    128 * v.warpgroups,
                    wgmma_prefill_smem_bytes(v),
                ),
                PrefillKernel::MmaSync => {
                    (&self.kernels.prefill[&d], 1, 128, prefill_smem_bytes(d))
                }
            };
            if plan.prefill_tiles > 65535 {
                return Err(ModelError::Batch(format!(
                    "{} prefill tiles of {PREFILL_TILE_ROWS} rows in one step: at most 65535",
                    plan.prefill_tiles
                )));
            }
            // TMA variants read K and V through the layer's tensor maps (encoded with the cache;
            // prefill_kernel_for chose TMA only for blocks that have them).
            let maps = match kernel {
                PrefillKernel::Wgmma(v) if v.tma => {
                    Some(cache.tensor_maps.get(layer).ok_or_else(|| {
                        ModelError::Cuda(format!("no TMA descriptors for layer {layer}"))
                    })?)
                }
                _ => None,
            };
            self.launch_smem_on(
                stream,
                f,
                // Head groups fastest, tiles in y (a grid's y is at most 65535).
                (
                    (heads / heads_per_block) as u32,
                    plan.prefill_tiles as u32,
                    1,
                ),
                threads as u32,
                smem_bytes as u32,
                &[
                    Ptr(attn),
                    Ptr(qkv),
                    maps.map_or(Ptr(kc), |[k, _]| Arg::TensorMap(k)),
                    maps.map_or(Ptr(vc), |[_, v]| Arg::TensorMap(v)),
                    Ptr(at(plan.tables)),
                    Ptr(at(plan.tile_seq)),
                    Ptr(at(plan.tile_q0)),
                    Ptr(at(plan.seq_row0)),
                    Ptr(at(plan.seq_start)),
                    Ptr(at(plan.seq_len)),
                    Ptr(at(plan.seq_table_off)),
                    I32(heads_i),
                    I32(kv_i),
                    I32(bs_i),
                    F32(scale_log2),
                ],
                "paged prefill attention",
                false,
            )?;
        }
        Ok(())
    }

    /// Plans layer 0's attention for `batch` over `cache` (decode split sized for `sm_count`
    /// SMs) and uploads the plan: what the attention benchmarks launch again and again.
    fn prepare_attention(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        sm_count: usize,
    ) -> Result<AttentionRun, ModelError> {
        let c = self.config.clone();
        let slots = plan_slots(&c, batch, cache.block_size, cache.num_blocks)?;
        let n = slots.len();
        let plan = AttentionPlan::build(batch, &slots, cache.block_size, self.decode_longest_first);
        let stream = self.stream.clone();
        let ints = self.ints.ptr(&stream, plan.ints.len())?;
        unsafe { cudarc::driver::result::memcpy_htod_async(ints, &plan.ints, stream.cu_stream()) }
            .map_err(|e| cuda_err("upload", e))?;
        let qkv = self
            .qkv_buf
            .ptr(&stream, n * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)?;
        let attn = self.attn.ptr(&stream, n * c.num_heads * c.head_dim)?;
        let split = decode_split(
            &c,
            self.decode_slots(sm_count),
            &stream,
            &plan,
            &mut self.part_acc,
            &mut self.part_ml,
        )?;
        Ok(AttentionRun {
            plan,
            ints,
            qkv,
            attn,
            split,
        })
    }

    /// One launch of a prepared attention on `stream`.
    fn launch_attention(
        &self,
        stream: CUstream,
        run: &AttentionRun,
        cache: &CudaKvCache,
    ) -> Result<(), ModelError> {
        self.attention(
            stream,
            &run.plan,
            run.ints,
            run.qkv,
            run.attn,
            cache,
            0,
            &run.split,
            AttentionPart::Both,
        )
    }

    /// Seconds one layer's attention takes for `batch` (its K and V already in `cache`; q is
    /// whatever the scratch holds), averaged over `repeats` launches timed by CUDA events.
    pub fn time_attention(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        repeats: usize,
    ) -> Result<f64, ModelError> {
        let run = self.prepare_attention(batch, cache, self.sm_count)?;
        let main = self.stream.cu_stream();
        self.launch_attention(main, &run, cache)?;
        self.time(repeats, |m| m.launch_attention(main, &run, cache))
    }

    /// [`CudaLlama::time_attention`] on a green-context partition of about `sms` SMs (its decode
    /// split sized for them): seconds per launch and the SMs the driver gave.
    pub fn time_attention_on_sms(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        sms: usize,
        repeats: usize,
    ) -> Result<(f64, usize), ModelError> {
        let run = self.prepare_attention(batch, cache, sms.min(self.sm_count))?;
        // The uploads and scratch above come first.
        self.synchronize()?;
        overlap::time_on_partition(&self.ctx, sms, repeats, |lane| {
            self.launch_attention(lane, &run, cache)
        })
    }

    /// Fills the query scratch for `batch` and layer 0's K and V in `cache` with uniform random
    /// values in [-1, 1) (for comparing attention kernels on the same inputs).
    pub fn randomize_attention_inputs(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        seed: u32,
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        let rows: usize = batch.sequences.iter().map(|s| s.tokens.len()).sum();
        let stream = self.stream.clone();
        let qkv_len = rows * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let qkv = self.qkv_buf.ptr(&stream, qkv_len)?;
        let kv_len = cache.num_blocks * cache.block_size * c.num_kv_heads * c.head_dim;
        let targets = [
            (qkv, qkv_len),
            (raw_ptr(&cache.keys[0], &stream), kv_len),
            (raw_ptr(&cache.values[0], &stream), kv_len),
        ];
        for (i, (ptr, len)) in targets.into_iter().enumerate() {
            self.fill_uniform(ptr, len, seed.wrapping_mul(3).wrapping_add(i as u32), 1.0)?;
        }
        Ok(())
    }

    /// The attention output of the last [`CudaLlama::time_attention`] (`rows` x heads x
    /// head_dim, as f32; waits for the GPU).
    pub fn attention_output(&self, rows: usize) -> Result<Vec<f32>, ModelError> {
        let len = rows * self.config.num_heads * self.config.head_dim;
        let buf = self
            .attn
            .buf
            .as_ref()
            .filter(|b| b.len() >= len)
            .ok_or_else(|| ModelError::Cuda("no attention output of that size".into()))?;
        let mut host = vec![0u16; len];
        self.stream
            .memcpy_dtoh(&buf.slice(..len), &mut host)
            .map_err(|e| cuda_err("copying attention output", e))?;
        self.synchronize()?;
        Ok(host
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect())
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
