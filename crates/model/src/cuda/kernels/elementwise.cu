// The step's small kernels: embedding gather, residual add + RMSNorm, SiLU x up, and
// bias + RoPE + K/V cache write.

// out[r] = table[ids[r]]; `width` a multiple of 8. One block per row.
extern "C" __global__ void gather_rows(bf16_t* __restrict__ out, const bf16_t* __restrict__ table,
                                       const u32* __restrict__ ids, int width) {
    int row = blockIdx.x;
    const uint4* src = (const uint4*)(table + (size_t)ids[row] * width);
    uint4* dst = (uint4*)(out + (size_t)row * width);
    for (int i = threadIdx.x; i < width / 8; i += blockDim.x) dst[i] = src[i];
}

// With `delta`: x = bf16(x + delta) (the residual add). Then out = bf16(w * bf16(x * rms(x))).
// One block per row; 16-byte accesses (`hidden` a multiple of 8).
extern "C" __global__ void add_rms_norm(bf16_t* __restrict__ out, bf16_t* __restrict__ x,
                                        const bf16_t* __restrict__ delta,
                                        const bf16_t* __restrict__ weight, int hidden, float eps) {
    size_t base = (size_t)blockIdx.x * hidden;
    uint4* xv = (uint4*)(x + base);
    const uint4* dv = (const uint4*)(delta + base);
    const int chunks = hidden / 8;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        Bf16x8 a;
        a.v = xv[i];
        if (delta != 0) {
            Bf16x8 b;
            b.v = dv[i];
#pragma unroll
            for (int k = 0; k < 8; ++k) a.h[k] = f2bf(bf2f(a.h[k]) + bf2f(b.h[k]));
            xv[i] = a.v;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float v = bf2f(a.h[k]);
            sum_sq += v * v;
        }
    }
    float inv_rms = rsqrtf(block_sum(sum_sq) / (float)hidden + eps);
    uint4* ov = (uint4*)(out + base);
    const uint4* wv = (const uint4*)weight;
    for (int i = threadIdx.x; i < chunks; i += blockDim.x) {
        Bf16x8 a, w, r;
        a.v = xv[i];
        w.v = wv[i];
#pragma unroll
        for (int k = 0; k < 8; ++k) r.h[k] = f2bf(bf2f(w.h[k]) * round_bf(bf2f(a.h[k]) * inv_rms));
        ov[i] = r.v;
    }
}

// out = bf16(bf16(silu(gate)) * up) over [tokens, inter] from gate|up [tokens, 2 * inter].
// Grid (chunks of 8 columns / blockDim, rows at a time); 16-byte accesses (`inter` a multiple
// of 8).
extern "C" __global__ void silu_mul(bf16_t* __restrict__ out, const bf16_t* __restrict__ gate_up,
                                    int tokens, int inter) {
    const int c8 = blockIdx.x * blockDim.x + threadIdx.x;
    if (c8 >= inter / 8) return;
    for (size_t row = blockIdx.y; row < (size_t)tokens; row += gridDim.y) {
        Bf16x8 g, u, r;
        g.v = ((const uint4*)(gate_up + row * 2 * inter))[c8];
        u.v = ((const uint4*)(gate_up + row * 2 * inter + inter))[c8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float gv = bf2f(g.h[k]);
            float sv = round_bf(gv / (1.0f + expf(-gv)));
            r.h[k] = f2bf(sv * bf2f(u.h[k]));
        }
        ((uint4*)(out + row * inter))[c8] = r.v;
    }
}

// x += the 8 bias values at `bias`, each sum rounded to bf16.
__device__ __forceinline__ void add_bias8(Bf16x8& x, const bf16_t* bias) {
    Bf16x8 b;
    b.v = *(const uint4*)bias;
#pragma unroll
    for (int k = 0; k < 8; ++k) x.h[k] = f2bf(round_bf(bf2f(x.h[k]) + bf2f(b.h[k])));
}

// Bias add (Qwen2's q/k/v biases), RoPE on q and k (HF rotate-half layout, cos/sin rounded to
// bf16 as transformers does), and the new K and V written to their cache slots.
// One block per token; each thread item is 8 rotation pairs of a q or k head (16-byte loads of
// both halves) or 8 values of V (`head_dim` a multiple of 16).
extern "C" __global__ void rope_write_kv(bf16_t* __restrict__ qkv, const bf16_t* __restrict__ bias,
                                         const int* __restrict__ positions,
                                         const int* __restrict__ slots,
                                         const float* __restrict__ inv_freq,
                                         bf16_t* __restrict__ k_cache,
                                         bf16_t* __restrict__ v_cache, int heads, int kv_heads,
                                         int head_dim) {
    // Decode attention (launched as a dependent) may start reading the older K and V now.
    pdl_launch_dependents();
    int token = blockIdx.x;
    int width = (heads + 2 * kv_heads) * head_dim;
    bf16_t* row = qkv + (size_t)token * width;
    float pos = (float)positions[token];
    size_t slot = (size_t)slots[token];
    int half = head_dim / 2;
    // cos and sin of this position, once per pair (not once per head).
    __shared__ float cos_s[64], sin_s[64];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float angle = inv_freq[j] * pos;
        cos_s[j] = round_bf(cosf(angle));
        sin_s[j] = round_bf(sinf(angle));
    }
    __syncthreads();
    const int groups = half / 8;  // 8-pair items a head
    const int rotations = (heads + kv_heads) * groups;
    const int v_start = (heads + kv_heads) * head_dim;
    for (int i = threadIdx.x; i < rotations + kv_heads * head_dim / 8; i += blockDim.x) {
        if (i >= rotations) {
            // v heads: bias, then copy.
            const int e = (i - rotations) * 8;
            Bf16x8 v;
            v.v = *(const uint4*)(row + v_start + e);
            if (bias != 0) add_bias8(v, bias + v_start + e);
            *(uint4*)(v_cache + slot * kv_heads * head_dim + e) = v.v;
            continue;
        }
        // q and k heads: rotate pairs (j, j + half) for j in j0 .. j0 + 7.
        const int head = i / groups, j0 = (i % groups) * 8;
        const int c0 = head * head_dim + j0, c1 = c0 + half;
        Bf16x8 a, b, y0, y1;
        a.v = *(const uint4*)(row + c0);
        b.v = *(const uint4*)(row + c1);
        if (bias != 0) {
            add_bias8(a, bias + c0);
            add_bias8(b, bias + c1);
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float x0 = bf2f(a.h[k]), x1 = bf2f(b.h[k]);
            float c = cos_s[j0 + k], s = sin_s[j0 + k];
            y0.h[k] = f2bf(round_bf(x0 * c) + round_bf(-x1 * s));
            y1.h[k] = f2bf(round_bf(x1 * c) + round_bf(x0 * s));
        }
        bf16_t* dst = row + c0;
        if (head >= heads) dst = k_cache + (slot * kv_heads + (head - heads)) * head_dim + j0;
        *(uint4*)dst = y0.v;
        *(uint4*)(dst + half) = y1.v;
    }
}
