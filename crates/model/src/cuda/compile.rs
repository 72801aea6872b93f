//! The kernels' source and their compilation: NVRTC to PTX for the device's compute capability,
//! the module loaded, every kernel function looked up once.

use super::*;

/// The kernels, one family a file under `kernels/`, compiled as one NVRTC program (shared headers
/// first, each in the order its users need).
pub(super) const KERNELS_SRC: &str = concat!(
    include_str!("kernels/common.cuh"),
    "\n",
    include_str!("kernels/mma.cuh"),
    "\n",
    include_str!("kernels/paged_kv.cuh"),
    "\n",
    include_str!("kernels/hopper.cuh"),
    "\n",
    include_str!("kernels/elementwise.cu"),
    "\n",
    include_str!("kernels/decode_attention.cu"),
    "\n",
    include_str!("kernels/prefill_attention.cu"),
    "\n",
    include_str!("kernels/prefill_wgmma.cu"),
    "\n",
    include_str!("kernels/gemm_persistent.cu"),
    "\n",
    include_str!("kernels/decode_stream.cu"),
    "\n",
    include_str!("kernels/sampling.cu"),
);
/// NVRTC's target for compute capability `major.minor`: Hopper gets `sm_90a`, which its
/// warpgroup MMA instructions need.
pub(super) fn nvrtc_arch(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
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
pub(super) struct Kernels {
    pub(super) _module: Arc<CudaModule>,
    /// The module with every wgmma variant, once a benchmark asked for one.
    pub(super) all_wgmma_module: Option<Arc<CudaModule>>,
    pub(super) compute_capability: (i32, i32),
    pub(super) gather_rows: CudaFunction,
    pub(super) add_rms_norm: CudaFunction,
    pub(super) silu_mul: CudaFunction,
    pub(super) rope_write_kv: CudaFunction,
    pub(super) decode: HashMap<(usize, usize), CudaFunction>,
    /// Tensor-core decode kernels by KV group (group 4 compiled).
    pub(super) decode_tc: HashMap<usize, CudaFunction>,
    /// The register decode kernel (KV group 4, head_dim 128), likewise.
    pub(super) decode_registers: Option<CudaFunction>,
    pub(super) decode_reduce: CudaFunction,
    /// Stream decode kernels by (KV group, variant): compute capability 9.0, group 4.
    pub(super) decode_stream: HashMap<(usize, StreamVariant), CudaFunction>,
    pub(super) decode_stream_reduce: CudaFunction,
    pub(super) prefill: HashMap<usize, CudaFunction>,
    /// Compute capability 9.0 only (compiled for `sm_90a`): the variants of `WGMMA_PREFERENCE`,
    /// then the others when [`Kernels::load_all_wgmma_variants`] ran.
    pub(super) prefill_wgmma: HashMap<WgmmaVariant, CudaFunction>,
    /// The persistent GEMM (compute capability 9.0).
    pub(super) gemm_persistent: Option<gemm_persistent::PersistentGemm>,
    pub(super) argmax_rows: CudaFunction,
    pub(super) fill_uniform: CudaFunction,
}

impl Kernels {
    pub(super) fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, ModelError> {
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
        let mut decode_tc = HashMap::new();
        let func = f("paged_decode_tc_g4_d128")?;
        allow_all_dynamic_smem(ctx, &func)?;
        decode_tc.insert(4, func);
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
        let mut decode_stream = HashMap::new();
        let mut gemm_persistent = None;
        if (major, minor) == (9, 0) {
            gemm_persistent = Some(gemm_persistent::persistent_gemm(&module)?);
            for variant in StreamVariant::ALL {
                let func = f(&variant.function_name(4))?;
                allow_all_dynamic_smem(ctx, &func)?;
                decode_stream.insert((4, variant), func);
            }
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
            decode_tc,
            decode_registers: None,
            decode_reduce: f("paged_decode_reduce")?,
            decode_stream,
            decode_stream_reduce: f("paged_decode_stream_reduce")?,
            prefill,
            prefill_wgmma,
            gemm_persistent,
            argmax_rows: f("argmax_rows")?,
            fill_uniform: f("fill_uniform")?,
            _module: module,
            all_wgmma_module: None,
            compute_capability: (major, minor),
        })
    }

    /// Compiles and loads the wgmma variants (and the register decode kernel) that are not in
    /// the load-time module (compute capability 9.0 only; a few seconds of NVRTC).
    pub(super) fn load_all_wgmma_variants(
        &mut self,
        ctx: &Arc<CudaContext>,
    ) -> Result<(), ModelError> {
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
pub(super) fn allow_all_dynamic_smem(
    ctx: &Arc<CudaContext>,
    f: &CudaFunction,
) -> Result<(), ModelError> {
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
