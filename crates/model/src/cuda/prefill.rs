//! Prefill attention launches: which kernel (mma.sync, wgmma variants, TMA), their shared memory,
//! and the TMA tensor maps of a paged cache.

use super::*;

/// Query rows per prefill attention block (`BM` in `kernels/prefill_attention.cu`).
pub(super) const PREFILL_TILE_ROWS: usize = 64;
/// Keys per prefill attention tile (`BN` in `kernels/prefill_attention.cu`).
pub(super) const PREFILL_TILE_KEYS: usize = 64;

/// Dynamic shared memory of the mma.sync prefill kernel: two stages of K and V tiles, rows
/// padded by 8.
pub(super) fn prefill_smem_bytes(head_dim: usize) -> usize {
    2 * 2 * PREFILL_TILE_KEYS * (head_dim + 8) * 2
}

/// Head dimension of the Hopper (wgmma) prefill kernel.
pub(super) const WGMMA_HEAD_DIM: usize = 128;

/// The wgmma prefill kernels: the variant and its kernel name. All heads of a block belong to
/// one KV group and share each K and V tile the block loads.
pub(super) const WGMMA_VARIANTS: [(WgmmaVariant, &str); 14] = [
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
pub(super) const WGMMA_PREFERENCE: [WgmmaVariant; 3] = [
    WgmmaVariant::new(2, 1, false).with_tma(),
    WgmmaVariant::new(2, 1, false).with_one_barrier(),
    WgmmaVariant::new(1, 1, false),
];

/// Dynamic shared memory of a wgmma prefill kernel: a Q tile (64 rows x 128 dims) per head and
/// two stages of K and V tiles (`keys_per_tile` rows each), plus 1024 bytes to align the
/// swizzle atoms and 64 for the TMA variants' stage barriers and counters.
pub(super) fn wgmma_prefill_smem_bytes(variant: WgmmaVariant) -> usize {
    (variant.heads_per_block() * PREFILL_TILE_ROWS + 4 * variant.keys_per_tile) * WGMMA_HEAD_DIM * 2
        + 1024
        + 64
}

/// Whether the TMA prefill kernels can load K and V from a cache of `block_size`-token blocks:
/// a box is one block (or 64 keys of a larger one) and must fill whole 8-row swizzle atoms.
pub fn tma_block_size_ok(block_size: usize) -> bool {
    block_size.is_power_of_two() && block_size >= 8
}

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

/// The first of [`WGMMA_PREFERENCE`] that `kernels` has for this model's heads (leaving out the
/// TMA ones unless `tma`), or mma.sync.
pub(super) fn preferred_prefill_kernel(
    c: &ModelConfig,
    kernels: &Kernels,
    tma: bool,
) -> PrefillKernel {
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
pub(super) fn kv_tensor_map(
    ptr: u64,
    num_slots: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> Result<CUtensorMap, ModelError> {
    super::tma::bf16_tensor_map(
        ptr,
        &[head_dim as u64, kv_heads as u64, num_slots as u64],
        &[2 * head_dim as u64, 2 * (kv_heads * head_dim) as u64],
        &[64, 1, block_size.min(PREFILL_TILE_KEYS) as u32],
        || {
            format!(
                "a KV cache ({num_slots} slots x {kv_heads} heads x {head_dim}, blocks of \
                 {block_size})"
            )
        },
    )
}

/// The wgmma prefill kernel of `variant` in `module`, allowed its shared memory.
pub(super) fn wgmma_function(
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
