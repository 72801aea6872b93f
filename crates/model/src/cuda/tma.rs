//! TMA descriptors (`cuTensorMapEncodeTiled`) of bf16 tensors in device memory, 128-byte
//! swizzled as the wgmma kernels lay tiles out in shared memory, out-of-range parts read as 0.

use cudarc::driver::sys::CUtensorMap;

use super::cuda_err;
use crate::ModelError;

/// The descriptor of the bf16 tensor at `ptr` with `dims` (innermost first), `strides_bytes`
/// of every dimension but the innermost, read in `boxes`; `what` names it in errors.
pub(super) fn bf16_tensor_map(
    ptr: u64,
    dims: &[u64],
    strides_bytes: &[u64],
    boxes: &[u32],
    what: impl FnOnce() -> String,
) -> Result<CUtensorMap, ModelError> {
    use cudarc::driver::sys::{
        cuTensorMapEncodeTiled, CUresult, CUtensorMapDataType, CUtensorMapFloatOOBfill,
        CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
    };
    assert!(dims.len() == boxes.len() && strides_bytes.len() + 1 == dims.len() && dims.len() <= 5);
    let element_strides = [1u32; 5];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length (asserted); the driver only writes the map.
    let result = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            dims.len() as u32,
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
        return Err(cuda_err(&format!("TMA descriptor of {}", what()), result));
    }
    // SAFETY: encoded successfully above.
    Ok(unsafe { map.assume_init() })
}
