//! The persistent wgmma GEMM (`kernels/gemm_persistent.cu`): a bf16 GEMM for Hopper that runs
//! as exactly `ctas` blocks, one an SM, so that the compute lane of the overlapped executor
//! keeps to the SMs the memory lane leaves. Its tile widths, their shared memory, the choice of
//! width per shape, the TMA descriptors of its operands and its launch.

use super::*;

/// The k-block the ring holds (64 bf16: one 128-byte swizzled row).
const TILE_K: usize = 64;

/// A compiled tile: rows (64 a consumer warpgroup), columns, stages of the shared-memory ring,
/// and its time per FLOP against the 128 x 256 tile's, in percent (from `gemm_lane_bench`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PersistentTile {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) stages: usize,
    pub(super) cost_percent: usize,
}

/// The compiled tiles, largest first (`gemm_persistent_m{rows}_n{cols}`).
pub(super) const PERSISTENT_TILES: [PersistentTile; 4] = [
    PersistentTile {
        rows: 128,
        cols: 256,
        stages: 4,
        cost_percent: 100,
    },
    PersistentTile {
        rows: 128,
        cols: 128,
        stages: 6,
        cost_percent: 110,
    },
    PersistentTile {
        rows: 64,
        cols: 256,
        stages: 5,
        cost_percent: 120,
    },
    PersistentTile {
        rows: 64,
        cols: 32,
        stages: 8,
        cost_percent: 250,
    },
];

/// The tile of the f32-out kernel (the logits).
pub(super) const F32_TILE: PersistentTile = PERSISTENT_TILES[1];

/// The f32-out kernel (of [`F32_TILE`]).
const F32_FUNCTION: &str = "gemm_persistent_m128_n128_f32";

impl PersistentTile {
    pub(super) fn function_name(self) -> String {
        format!("gemm_persistent_m{}_n{}", self.rows, self.cols)
    }

    /// The producer warpgroup and a consumer warpgroup for each 64 rows.
    pub(super) fn threads(self) -> usize {
        128 * (1 + self.rows / 64)
    }

    /// 1 KiB to align the ring, the ring (x and w boxes a stage), two mbarriers and a tile
    /// index a stage.
    pub(super) fn smem_bytes(self) -> usize {
        1024 + self.stages * (self.rows + self.cols) * TILE_K * 2 + 20 * self.stages
    }

    /// Tiles of an `m x n` output.
    fn tiles(self, m: usize, n: usize) -> usize {
        m.div_ceil(self.rows) * n.div_ceil(self.cols)
    }
}

/// The tile for an `m x n` output on `ctas` blocks: the least time, counted as waves of tiles
/// times a tile's FLOPs times its cost per FLOP; the larger tile on a tie.
pub(super) fn pick_tile(m: usize, n: usize, ctas: usize) -> PersistentTile {
    let cost =
        |t: PersistentTile| t.tiles(m, n).div_ceil(ctas.max(1)) * t.rows * t.cols * t.cost_percent;
    PERSISTENT_TILES
        .into_iter()
        .min_by_key(|&t| cost(t))
        .expect("tiles compiled")
}

/// Whether the persistent kernel takes `x [m, k] · w [n, k]ᵀ`: TMA needs 16-byte row strides,
/// the epilogue whole bf16 pairs.
pub(super) fn persistent_shape_ok(k: usize, n: usize) -> bool {
    k.is_multiple_of(8) && n.is_multiple_of(2) && k > 0 && n > 0
}

/// The persistent GEMM's kernels, one a tile, and the f32-out one of [`F32_TILE`].
#[derive(Clone)]
pub(super) struct PersistentGemm {
    pub(super) functions: Vec<(PersistentTile, CudaFunction)>,
    pub(super) f32_out: CudaFunction,
}

/// How a persistent launch runs: its blocks, its tile (`None`: chosen for the shape) and
/// whether it writes f32.
#[derive(Clone, Copy, Debug)]
pub(super) struct PersistentLaunch {
    pub(super) ctas: usize,
    pub(super) tile: Option<PersistentTile>,
    pub(super) out_f32: bool,
}

impl PersistentGemm {
    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` (bf16 in, device addresses) on `stream` as `how`
    /// says; `counters`: two zeroed u32 words that only launches on `stream` use.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch(
        &self,
        stream: CUstream,
        how: PersistentLaunch,
        counters: u64,
        out: u64,
        x: u64,
        w: u64,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<(), ModelError> {
        let ctas = how.ctas;
        let (tile, f) = if how.out_f32 {
            (F32_TILE, &self.f32_out)
        } else {
            let tile = how.tile.unwrap_or_else(|| pick_tile(m, n, ctas));
            let f = &self
                .functions
                .iter()
                .find(|(t, _)| *t == tile)
                .expect("every tile compiled")
                .1;
            (tile, f)
        };
        let x_map = matrix_tensor_map(x, m, k, tile.rows)?;
        let w_map = matrix_tensor_map(w, n, k, tile.cols)?;
        let blocks = tile.tiles(m, n).min(ctas).max(1);
        launch_smem_on(
            stream,
            f,
            (blocks as u32, 1, 1),
            tile.threads() as u32,
            tile.smem_bytes() as u32,
            &[
                Ptr(out),
                Arg::TensorMap(&x_map),
                Arg::TensorMap(&w_map),
                Ptr(counters),
                I32(m as i32),
                I32(n as i32),
                I32(k as i32),
            ],
            "persistent GEMM",
            false,
        )
        .map_err(|e| match e {
            ModelError::Cuda(msg) => ModelError::Cuda(format!("{msg} ({m}x{k}x{n})")),
            other => other,
        })
    }
}

/// The persistent GEMM's kernels from `module` (compiled for `sm_90a`), allowed their shared
/// memory.
pub(super) fn persistent_gemm(module: &Arc<CudaModule>) -> Result<PersistentGemm, ModelError> {
    let load = |name: &str, tile: PersistentTile| {
        let func = module
            .load_function(name)
            .map_err(|e| cuda_err(&format!("kernel {name}"), e))?;
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tile.smem_bytes() as i32,
        )
        .map_err(|e| cuda_err("persistent GEMM shared memory", e))?;
        Ok::<_, ModelError>(func)
    };
    let functions = PERSISTENT_TILES
        .into_iter()
        .map(|tile| Ok((tile, load(&tile.function_name(), tile)?)))
        .collect::<Result<Vec<_>, ModelError>>()?;
    Ok(PersistentGemm {
        functions,
        f32_out: load(F32_FUNCTION, F32_TILE)?,
    })
}

/// The TMA descriptor of a row-major bf16 matrix `[rows, cols]` at `ptr`, read in boxes of 64
/// columns x `box_rows` rows.
fn matrix_tensor_map(
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: usize,
) -> Result<CUtensorMap, ModelError> {
    super::tma::bf16_tensor_map(
        ptr,
        &[cols as u64, rows as u64],
        &[2 * cols as u64],
        &[TILE_K as u32, box_rows as u32],
        || format!("a {rows} x {cols} GEMM operand"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_in_shared_memory() {
        for t in PERSISTENT_TILES {
            assert!(t.smem_bytes() <= 227 * 1024, "{t:?}: {}", t.smem_bytes());
        }
    }

    #[test]
    fn the_tile_follows_the_waves() {
        let pick = |m, n, ctas| {
            let t = pick_tile(m, n, ctas);
            (t.rows, t.cols)
        };
        // Many waves of any tile: the largest.
        assert_eq!(pick(4096, 28672, 100), (128, 256));
        // 8 x 16 = 128 tiles of 128 x 256 on 100 blocks: 2 waves (2 x 32768 x 100); 8 x 32 of
        // 128 x 128: 3 waves (3 x 16384 x 110); 16 x 16 of 64 x 256: 3 waves (3 x 16384 x 120).
        assert_eq!(pick(1024, 4096, 100), (128, 128));
        // 4 x 16 = 64 tiles of 128 x 256 on 100 blocks: 1 wave (32768 x 100); 7 x 16 = 112 of
        // 64 x 256: 2 waves (2 x 16384 x 120).
        assert_eq!(pick(416, 4096, 100), (128, 256));
        // 320 rows: 3 x 112 tiles of 128 x 256 (4 waves, 32768 x 400), 3 x 224 of 128 x 128
        // (7 waves, 16384 x 770), 5 x 112 of 64 x 256 (6 waves, 16384 x 720).
        assert_eq!(pick(320, 28672, 100), (64, 256));
        // A decode step's few rows: narrow tiles, so that every SM streams weights.
        assert_eq!(pick(3, 4096, 132), (64, 32));
        assert_eq!(pick(1024, 4096, 132), (128, 256));
        assert!(persistent_shape_ok(4096, 14336));
        assert!(!persistent_shape_ok(4100, 14336));
    }
}
