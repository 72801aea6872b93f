//! bf16 GEMMs through cuBLAS on the model's stream, or (Hopper, bf16 out) through the
//! persistent wgmma GEMM on a fixed number of SMs when the overlapped executor's compute lane
//! asks for it ([`Gemm::set_persistent_ctas`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream};

use super::gemm_persistent::{
    persistent_shape_ok, PersistentGemm, PersistentLaunch, PersistentTile, PERSISTENT_TILES,
};
use super::{cuda_err, raw_ptr};
use crate::ModelError;

/// cuBLAS workspace: what PyTorch gives cuBLAS on Hopper (32 MiB), so that both pick from the
/// same kernels.
const WORKSPACE_BYTES: usize = 32 << 20;

/// The GEMMs of the overlapped executor's compute lane, which must leave the memory lane's SMs
/// free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LaneGemm {
    /// cuBLAS told the lane's SM count (`cublasSetSmCountTarget`): the default, as it ran the
    /// overlapped steps faster on the H200 (NOTES.md section 13).
    #[default]
    Cublas,
    /// The persistent wgmma kernel as exactly one block a lane SM (compute capability 9.0;
    /// cuBLAS elsewhere and for f32 outputs).
    Persistent,
}

impl std::str::FromStr for LaneGemm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cublas" => Ok(LaneGemm::Cublas),
            "persistent" => Ok(LaneGemm::Persistent),
            _ => Err(format!("unknown lane GEMM {s:?}: cublas or persistent")),
        }
    }
}

/// `out[tokens, n] = x[tokens, k] · w[n, k]ᵀ`, row-major, the layout of a HF linear layer.
pub struct Gemm {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
    /// The stream GEMMs go on (a `CUstream` as an integer).
    stream: AtomicU64,
    /// The persistent kernels, where compiled (compute capability 9.0).
    persistent: Option<PersistentGemm>,
    /// Blocks the persistent kernel runs as; 0: cuBLAS.
    persistent_ctas: AtomicUsize,
    /// The persistent kernel's tile counters (two u32, zero between launches) and their device
    /// address.
    _tile_counters: CudaSlice<u32>,
    tile_counters_ptr: u64,
    /// Every GEMM on the persistent kernel's one invariant tile ([`Gemm::set_batch_invariant`]).
    batch_invariant: AtomicBool,
    /// Blocks a batch-invariant GEMM runs as without a lane's count (the GPU's SMs).
    whole_gpu_ctas: usize,
    /// The persistent tile a benchmark forces (an index into `PERSISTENT_TILES`; `usize::MAX`:
    /// chosen per shape).
    forced_tile: AtomicUsize,
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Gemm, ModelError> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("cuBLAS init", e))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|e| cuda_err("cuBLAS workspace", e))?;
        let ptr = raw_ptr(&workspace, &stream);
        unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| cuda_err("cuBLAS workspace", e))?;
        let tile_counters = stream
            .alloc_zeros::<u32>(2)
            .map_err(|e| cuda_err("GEMM tile counters", e))?;
        Ok(Gemm {
            tile_counters_ptr: raw_ptr(&tile_counters, &stream),
            _tile_counters: tile_counters,
            blas,
            _workspace: workspace,
            stream: AtomicU64::new(stream.cu_stream() as u64),
            persistent: None,
            persistent_ctas: AtomicUsize::new(0),
            batch_invariant: AtomicBool::new(false),
            whole_gpu_ctas: 1,
            forced_tile: AtomicUsize::new(usize::MAX),
        })
    }

    /// Gives this handle the persistent kernels (compiled for Hopper) to run on request, on a
    /// GPU of `sm_count` SMs.
    pub(super) fn with_persistent(
        mut self,
        persistent: Option<PersistentGemm>,
        sm_count: usize,
    ) -> Gemm {
        self.persistent = persistent;
        self.whole_gpu_ctas = sm_count.max(1);
        self
    }

    /// Runs every GEMM (bf16 and f32 out) on the persistent kernel with one tile shape, so that
    /// a row's result does not depend on the other rows of the batch; returns whether the
    /// kernel is there (compute capability 9.0).
    pub fn set_batch_invariant(&self, on: bool) -> bool {
        self.batch_invariant.store(on, Ordering::Relaxed);
        self.persistent.is_some()
    }

    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant.load(Ordering::Relaxed) && self.persistent.is_some()
    }

    /// Forces the persistent kernel's tile (`(rows, cols)`, benchmarks), or (`None`) lets the
    /// shape choose; returns whether that tile is compiled.
    pub fn set_persistent_tile(&self, tile: Option<(usize, usize)>) -> bool {
        let index = match tile {
            None => usize::MAX,
            Some((rows, cols)) => match PERSISTENT_TILES
                .iter()
                .position(|t| t.rows == rows && t.cols == cols)
            {
                Some(i) => i,
                None => return false,
            },
        };
        self.forced_tile.store(index, Ordering::Relaxed);
        true
    }

    fn forced_tile(&self) -> Option<PersistentTile> {
        PERSISTENT_TILES
            .get(self.forced_tile.load(Ordering::Relaxed))
            .copied()
    }

    /// Runs bf16-out GEMMs as the persistent kernel on exactly `ctas` SMs (0: back to cuBLAS).
    /// Returns whether the kernel is there (compute capability 9.0).
    pub fn set_persistent_ctas(&self, ctas: usize) -> bool {
        self.persistent_ctas.store(ctas, Ordering::Relaxed);
        self.persistent.is_some()
    }

    /// Sizes this handle's GEMMs for a lane of `sms` SMs with `kind`: the persistent kernel on
    /// `sms` blocks where it is compiled, else cuBLAS with that SM-count target.
    pub(super) fn size_for_lane(&self, sms: usize, kind: LaneGemm) -> Result<(), ModelError> {
        if (kind == LaneGemm::Persistent || self.batch_invariant()) && self.set_persistent_ctas(sms)
        {
            self.set_sm_count_target(0)
        } else {
            self.set_persistent_ctas(0);
            self.set_sm_count_target(sms)
        }
    }

    /// Blocks of the persistent kernel, if bf16 GEMMs run on it.
    pub fn persistent_ctas(&self) -> Option<usize> {
        let ctas = self.persistent_ctas.load(Ordering::Relaxed);
        (self.persistent.is_some() && ctas > 0).then_some(ctas)
    }

    /// Queues this handle's GEMMs on `stream` (a lane of the overlapped executor) instead of
    /// the stream it was made on.
    pub fn set_stream(&self, stream: cudarc::driver::sys::CUstream) -> Result<(), ModelError> {
        // SAFETY: the handle is live; the caller keeps `stream` alive while the handle is.
        self.stream.store(stream as u64, Ordering::Relaxed);
        unsafe { sys::cublasSetStream_v2(*self.blas.handle(), stream as sys::cudaStream_t) }
            .result()
            .map_err(|e| cuda_err("cuBLAS set stream", e))
    }

    /// Sizes this handle's GEMMs for `sms` multiprocessors (0: the whole GPU), leaving the rest
    /// free for work on other streams.
    pub fn set_sm_count_target(&self, sms: usize) -> Result<(), ModelError> {
        // SAFETY: the handle is live.
        unsafe { sys::cublasSetSmCountTarget(*self.blas.handle(), sms as i32) }
            .result()
            .map_err(|e| cuda_err("cuBLAS SM count target", e))
    }

    /// `out = x · wᵀ` with `x` `[tokens, k]` bf16, `w` `[n, k]` bf16, `out` `[tokens, n]` in bf16
    /// (or f32 with `out_f32`), f32 accumulation. Pointers are device addresses.
    #[allow(clippy::too_many_arguments)]
    pub fn bf16(
        &self,
        out: u64,
        x: u64,
        w: u64,
        tokens: usize,
        k: usize,
        n: usize,
        out_f32: bool,
    ) -> Result<(), ModelError> {
        if tokens == 0 {
            return Ok(());
        }
        if let Some(p) = &self.persistent {
            // Batch-invariant: every GEMM, on the lane's blocks or the whole GPU's; otherwise
            // bf16 outputs where a lane asked for the kernel.
            let invariant = self.batch_invariant();
            let ctas = if invariant {
                Some(self.persistent_ctas().unwrap_or(self.whole_gpu_ctas))
            } else {
                self.persistent_ctas().filter(|_| !out_f32)
            };
            if let Some(ctas) = ctas {
                if persistent_shape_ok(k, n) {
                    // Any tile: an element's sum over k runs in the same order in each
                    // (`gemm_lane_bench --invariance` checks they agree bit for bit).
                    let how = PersistentLaunch {
                        ctas,
                        tile: self.forced_tile(),
                        out_f32,
                    };
                    let stream =
                        self.stream.load(Ordering::Relaxed) as cudarc::driver::sys::CUstream;
                    let counters = self.tile_counters_ptr;
                    return p.launch(stream, how, counters, out, x, w, tokens, k, n);
                }
                if invariant {
                    return Err(ModelError::Cuda(format!(
                        "batch-invariant GEMM {tokens}x{k}x{n}: the persistent kernel needs k a \
                         multiple of 8 and n even"
                    )));
                }
            }
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let out_type = if out_f32 {
            sys::cudaDataType::CUDA_R_32F
        } else {
            sys::cudaDataType::CUDA_R_16BF
        };
        // Column-major view: outᵀ[n, tokens] = w[n, k] (w row-major read as wᵀ, so op T) ·
        // xᵀ[k, tokens].
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                tokens as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                out_type,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err(&format!("cuBLAS GEMM {tokens}x{k}x{n}"), e))
    }
}
