//! bf16 GEMMs through cuBLAS on the model's stream.

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream};

use super::{cuda_err, raw_ptr};
use crate::ModelError;

/// cuBLAS workspace: what PyTorch gives cuBLAS on Hopper (32 MiB), so that both pick from the
/// same kernels.
const WORKSPACE_BYTES: usize = 32 << 20;

/// `out[tokens, n] = x[tokens, k] · w[n, k]ᵀ`, row-major, the layout of a HF linear layer.
pub struct Gemm {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
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
        Ok(Gemm {
            blas,
            _workspace: workspace,
        })
    }

    /// Queues this handle's GEMMs on `stream` (a lane of the overlapped executor) instead of
    /// the stream it was made on.
    pub fn set_stream(&self, stream: cudarc::driver::sys::CUstream) -> Result<(), ModelError> {
        // SAFETY: the handle is live; the caller keeps `stream` alive while the handle is.
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
