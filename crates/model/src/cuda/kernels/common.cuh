// Kernels of the CUDA forward pass, one family a file in this folder, compiled at load time as
// one NVRTC program in the order `KERNELS_SRC` (cuda/mod.rs) gives: this file's types and
// helpers, `mma.cuh`, `paged_kv.cuh`, then the families: `elementwise.cu` (embedding, norms,
// activations, RoPE), `decode_attention.cu`, `prefill_attention.cu` (mma.sync),
// `prefill_wgmma.cu` (Hopper), `sampling.cu`. No CUDA headers needed: bf16 is handled as raw
// 16-bit words, tensor-core MMAs are inline PTX for sm_80+.
//
// Layouts (row-major, bf16 unless said otherwise):
//   hidden states        [tokens, hidden]
//   fused qkv            [tokens, (heads + 2 * kv_heads) * head_dim]   q | k | v
//   fused gate|up        [tokens, 2 * intermediate]                    gate | up
//   paged K / V cache    [num_blocks * block_size, kv_heads, head_dim] per layer
// Rounding follows Hugging Face transformers in bf16 (each torch op rounds its result to bf16).

typedef unsigned short bf16_t;
typedef unsigned int u32;

__device__ __forceinline__ float bf2f(bf16_t x) { return __uint_as_float(((u32)x) << 16); }

__device__ __forceinline__ bf16_t f2bf(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float round_bf(float f) { return bf2f(f2bf(f)); }

// Two floats to a bf16x2 word: `lo` in the low half. One instruction (round to nearest even,
// as f2bf) instead of two software roundings.
__device__ __forceinline__ u32 pack_bf2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

#define NEG_INF __int_as_float(0xff800000u)

// 2^x, flushing denormals (MUFU.EX2 alone, without exp2f's denormal fix-up).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    float total = partial[0];
    __syncthreads();
    return total;
}

// Eight bf16 values in 16 bytes (one vector load or store).
union Bf16x8 {
    uint4 v;
    bf16_t h[8];
};

// Programmatic dependent launch (compute capability 9.0): `pdl_launch_dependents` lets the
// next kernel in the stream, if launched as a programmatic dependent, start its blocks before
// this one ends; such a kernel calls `pdl_wait` before it reads anything this one writes (it
// returns once this one has finished and its writes are visible). Both are no-ops otherwise.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
