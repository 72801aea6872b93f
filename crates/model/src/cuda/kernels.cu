// Kernels of the CUDA forward pass. Compiled at load time by NVRTC (no CUDA headers needed:
// bf16 is handled as raw 16-bit words, tensor-core MMAs are inline PTX for sm_80+).
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

// out[r] = table[ids[r]]; `width` a multiple of 8. One block per row.
extern "C" __global__ void gather_rows(bf16_t* __restrict__ out, const bf16_t* __restrict__ table,
                                       const u32* __restrict__ ids, int width) {
    int row = blockIdx.x;
    const uint4* src = (const uint4*)(table + (size_t)ids[row] * width);
    uint4* dst = (uint4*)(out + (size_t)row * width);
    for (int i = threadIdx.x; i < width / 8; i += blockDim.x) dst[i] = src[i];
}

// Eight bf16 values in 16 bytes (one vector load or store).
union Bf16x8 {
    uint4 v;
    bf16_t h[8];
};

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

// ---------------------------------------------------------------------------------------------
// Paged decode attention (one query token per sequence), split over the context.
//
// Block (kv_head, item, split), KV heads fastest so that the plan's item order (longest context
// first) is the launch order: 128 threads = 8 groups of 16 lanes; each lane owns D/16 dims of
// every query head of the GQA group. A group walks tokens split_start + group, + 8, ...: it
// reads the token's K row (16 bytes per lane for D = 128), forms the G scores with a 4-step
// shuffle reduction, and keeps an online softmax (`paged_decode_impl` brings the rows through
// shared memory by cp.async, the register version straight). Groups merge in shared memory; a
// split that is the whole context writes the bf16 output, otherwise (m, l, acc) go to scratch
// for `paged_decode_reduce`.

// Cache slot of position `p` in a paged cache with block table `table`. Blocks are a power of
// two tokens in practice (`pow2`): shift and mask, not divide.
__device__ __forceinline__ size_t paged_slot(const u32* table, int p, int block_size, bool pow2,
                                             int block_shift) {
    int blk = pow2 ? p >> block_shift : p / block_size;
    int within = pow2 ? p & (block_size - 1) : p % block_size;
    return (size_t)table[blk] * block_size + within;
}

// Element offset of position `p`'s row for KV head `kvh` in a paged K or V cache.
__device__ __forceinline__ size_t paged_kv_row(const u32* table, int p, int block_size, bool pow2,
                                               int block_shift, int kv_heads, int kvh, int D) {
    return (paged_slot(table, p, block_size, pow2, block_shift) * kv_heads + kvh) * D;
}

// What a decode block (item, kv_head, split) works on: the split's positions [s0, s1) of the
// item's context, its block table, its query row and the group's query heads in it.
struct DecodeBlock {
    int item, kvh, split, ctx, s0, s1, num_splits, heads, row;
    const u32* table;
    const bf16_t* q;  // the group's first query head (its G heads follow, head_dim apart)
    bool pow2_blocks;
    int block_shift;
};

// A decode kernel's first act: the next launch, if a programmatic dependent, may place its
// blocks now. In a step nothing after decode attention is one (the reduction and the output
// projection are plain launches); in a benchmark's loop of decode launches this makes each
// launch precede the next as `rope_write_kv` precedes decode attention in a step (it also
// triggers at its top), so the loop times the kernel as a step runs it.
__device__ __forceinline__ void decode_launch_dependents() { pdl_launch_dependents(); }

// The block's `DecodeBlock`; false when the split starts past the context (nothing to do).
__device__ __forceinline__ bool decode_block(DecodeBlock& b, int group_heads, int head_dim,
                                             const bf16_t* qkv, const u32* block_tables,
                                             const int* item_rows, const int* item_ctx,
                                             const int* item_table_off, int kv_heads,
                                             int block_size, int split_tokens) {
    b.item = blockIdx.y;
    b.kvh = blockIdx.x;
    b.split = blockIdx.z;
    b.ctx = item_ctx[b.item];
    b.s0 = b.split * split_tokens;
    if (b.s0 >= b.ctx) return false;
    b.s1 = min(b.ctx, b.s0 + split_tokens);
    b.num_splits = (b.ctx + split_tokens - 1) / split_tokens;
    b.heads = kv_heads * group_heads;
    b.table = block_tables + item_table_off[b.item];
    b.row = item_rows[b.item];
    const size_t qkv_width = (size_t)(b.heads + 2 * kv_heads) * head_dim;
    b.q = qkv + b.row * qkv_width + (size_t)b.kvh * group_heads * head_dim;
    b.pow2_blocks = (block_size & (block_size - 1)) == 0;
    b.block_shift = __ffs(block_size) - 1;
    return true;
}

// The merge of NG partial softmax states per head (m, l: [NG][G]; acc: [NG][G][D] in shared
// memory, written and synchronised by the caller): the bf16 output (one split) or the split's
// partial result for `paged_decode_reduce`.
template <int G, int D, int NG>
__device__ void decode_finish(const float* sm_m, const float* sm_l, const float* sm_acc,
                              bf16_t* __restrict__ out, float* __restrict__ part_acc,
                              float* __restrict__ part_ml, const DecodeBlock& b,
                              int max_splits) {
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
        int g = idx / D, d = idx % D;
        float mx = -1e30f;
        for (int w = 0; w < NG; ++w) mx = fmaxf(mx, sm_m[w * G + g]);
        float lsum = 0.0f, a = 0.0f;
        for (int w = 0; w < NG; ++w) {
            float r = exp2f(sm_m[w * G + g] - mx);
            lsum += sm_l[w * G + g] * r;
            a += sm_acc[(w * G + g) * D + d] * r;
        }
        int h = b.kvh * G + g;
        if (b.num_splits == 1) {
            out[(size_t)b.row * b.heads * D + (size_t)h * D + d] = f2bf(a / lsum);
        } else {
            size_t p = ((size_t)b.item * b.heads + h) * max_splits + b.split;
            part_acc[p * D + d] = a;
            if (d == 0) {
                part_ml[p * 2] = mx;
                part_ml[p * 2 + 1] = lsum;
            }
        }
    }
}

// Floats of shared memory `decode_merge` takes: m, l [8][G], acc [8][G][D].
#define DECODE_MERGE_FLOATS(G, D) (8 * (G) * ((D) + 2))

// The end of a decode block: its 8 lane groups' online-softmax states (m, l, acc) merged in
// shared memory `sm` (DECODE_MERGE_FLOATS, free to overwrite), then the bf16 output (one split)
// or the split's partial result.
template <int G, int D>
__device__ void decode_merge(const float (&m)[G], const float (&l)[G], const float (&acc)[G][D / 16],
                             bf16_t* __restrict__ out, float* __restrict__ part_acc,
                             float* __restrict__ part_ml, const DecodeBlock& b,
                             int max_splits, int lane, int group, float* sm) {
    constexpr int DL = D / 16;
    float* sm_m = sm;
    float* sm_l = sm + 8 * G;
    float* sm_acc = sm + 16 * G;
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
            sm_m[group * G + g] = m[g];
            sm_l[group * G + g] = l[g];
        }
    }
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int i = 0; i < DL; ++i) sm_acc[(group * G + g) * D + lane * DL + i] = acc[g][i];
    __syncthreads();
    decode_finish<G, D, 8>(sm_m, sm_l, sm_acc, out, part_acc, part_ml, b, max_splits);
}

// One token of a decode lane group: this lane's DL dims of its K row (`kr`) and V row (`vr`)
// into the G heads' scores (a 16-lane shuffle reduction every lane must join, valid or not)
// and online softmax (m, l, acc).
template <int G, int DL>
__device__ __forceinline__ void decode_accumulate(const float (&q)[G][DL], const bf16_t* kr,
                                                  const bf16_t* vr, bool valid, float (&m)[G],
                                                  float (&l)[G], float (&acc)[G][DL]) {
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) d += q[g][i] * bf2f(kr[i]);
        s[g] = d;
    }
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
    }
    if (!valid) return;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (s[g] > m[g]) {
            float r = exp2f(m[g] - s[g]);
            l[g] *= r;
#pragma unroll
            for (int i = 0; i < DL; ++i) acc[g][i] *= r;
            m[g] = s[g];
        }
        float p = exp2f(s[g] - m[g]);
        l[g] += p;
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[g][i] += p * bf2f(vr[i]);
    }
}

// A lane's start in a decode block: its DL = D / 16 dims of the group's G query heads (scaled
// for exp2) and an empty online-softmax state.
template <int G, int D>
__device__ __forceinline__ void decode_lane_start(const DecodeBlock& b, int lane, float scale_log2,
                                                  float (&q)[G][D / 16], float (&m)[G],
                                                  float (&l)[G], float (&acc)[G][D / 16]) {
    constexpr int DL = D / 16;
#pragma unroll
    for (int g = 0; g < G; ++g) {
        const bf16_t* qp = b.q + (size_t)g * D + lane * DL;
#pragma unroll
        for (int i = 0; i < DL; ++i) q[g][i] = bf2f(qp[i]) * scale_log2;
        m[g] = -1e30f;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DL; ++i) acc[g][i] = 0.0f;
    }
}

// The parameters of every decode kernel: of its entry (`DECODE_ENTRY`, pointers plain, R
// empty) and of the device function the entry runs (R = __restrict__), in this order.
#define DECODE_PARAMS(R)                                                                          \
    bf16_t *R out, float *R part_acc, float *R part_ml, const bf16_t *R qkv,                     \
        const bf16_t *R k_cache, const bf16_t *R v_cache, const u32 *R block_tables,             \
        const int *R item_rows, const int *R item_ctx, const int *R item_table_off, int kv_heads, \
        int block_size, int split_tokens, int max_splits, float scale_log2

// The first version of `paged_decode_impl` (benchmark variant): K and V rows loaded straight
// into registers, U tokens a lane group at a time, so a block has no loads in flight while it
// computes.
template <int G, int D>
__device__ void paged_decode_registers_impl(DECODE_PARAMS(__restrict__)) {
    decode_launch_dependents();
    constexpr int DL = D / 16;  // dims per lane
    // U tokens per group per iteration: 2 * U 16-byte loads in flight per lane (8 measured
    // slower than 4 on the H100: 156 registers, 3 blocks an SM instead of 4).
    constexpr int U = 4;
    DecodeBlock b;
    if (!decode_block(b, G, D, qkv, block_tables, item_rows, item_ctx, item_table_off, kv_heads,
                      block_size, split_tokens)) {
        return;
    }
    pdl_wait();  // (launched as a programmatic dependent, like `paged_decode_impl`)
    const int lane = threadIdx.x & 15, group = threadIdx.x >> 4;

    float q[G][DL], m[G], l[G], acc[G][DL];
    decode_lane_start<G, D>(b, lane, scale_log2, q, m, l, acc);

    // Every lane runs the same number of iterations (the shuffles need the whole warp).
    for (int base = b.s0; base < b.s1; base += 8 * U) {
        uint4 kraw[U], vraw[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + u * 8 + group;
            valid[u] = t < b.s1;
            kraw[u] = make_uint4(0, 0, 0, 0);
            vraw[u] = make_uint4(0, 0, 0, 0);
            if (valid[u]) {
                const size_t off = paged_kv_row(b.table, t, block_size, b.pow2_blocks,
                                                b.block_shift, kv_heads, b.kvh, D) +
                                   lane * DL;
                if (DL == 8) {
                    kraw[u] = *(const uint4*)(k_cache + off);
                    vraw[u] = *(const uint4*)(v_cache + off);
                } else {
                    uint2 k2 = *(const uint2*)(k_cache + off), v2 = *(const uint2*)(v_cache + off);
                    kraw[u].x = k2.x;
                    kraw[u].y = k2.y;
                    vraw[u].x = v2.x;
                    vraw[u].y = v2.y;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            decode_accumulate<G, DL>(q, (const bf16_t*)&kraw[u], (const bf16_t*)&vraw[u], valid[u],
                                     m, l, acc);
        }
    }

    __shared__ float merge_smem[DECODE_MERGE_FLOATS(G, D)];
    decode_merge<G, D>(m, l, acc, out, part_acc, part_ml, b, max_splits, lane, group, merge_smem);
}

// A decode kernel entry `NAME` running the device function `__VA_ARGS__` (a template-id): the
// grid (kv_heads, items, splits), 128 threads, and the arguments every decode kernel takes.
#define DECODE_ENTRY(NAME, ...)                                                                   \
    extern "C" __global__ void __launch_bounds__(128) NAME(DECODE_PARAMS()) {                    \
        __VA_ARGS__(out, part_acc, part_ml, qkv, k_cache, v_cache, block_tables, item_rows,      \
                    item_ctx, item_table_off, kv_heads, block_size, split_tokens, max_splits,    \
                    scale_log2);                                                                 \
    }

#if defined(BLENDSERVE_ALL_WGMMA_VARIANTS)
DECODE_ENTRY(paged_decode_registers_g4_d128, paged_decode_registers_impl<4, 128>)
#endif

// Combines the splits of items whose context spans more than one. Block (item, head), D threads.
extern "C" __global__ void paged_decode_reduce(bf16_t* __restrict__ out,
                                               const float* __restrict__ part_acc,
                                               const float* __restrict__ part_ml,
                                               const int* __restrict__ item_rows,
                                               const int* __restrict__ item_ctx, int heads,
                                               int head_dim, int split_tokens, int max_splits) {
    int item = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    int ctx = item_ctx[item];
    int num_splits = (ctx + split_tokens - 1) / split_tokens;
    if (num_splits <= 1) return;
    size_t p0 = ((size_t)item * heads + h) * max_splits;
    float mx = -1e30f;
    for (int s = 0; s < num_splits; ++s) mx = fmaxf(mx, part_ml[(p0 + s) * 2]);
    float lsum = 0.0f, a = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        float r = exp2f(part_ml[(p0 + s) * 2] - mx);
        lsum += part_ml[(p0 + s) * 2 + 1] * r;
        a += part_acc[(p0 + s) * head_dim + d] * r;
    }
    out[(size_t)item_rows[item] * heads * head_dim + (size_t)h * head_dim + d] = f2bf(a / lsum);
}

// ---------------------------------------------------------------------------------------------
// Paged prefill attention (FlashAttention-2 style, bf16 tensor cores, mma.m16n8k16).
//
// Block (tile, head): 4 warps, 64 query rows of one sequence chunk (16 per warp), keys in tiles
// of 64 gathered from the paged cache (the sequence's earlier chunks and shared prefix blocks as
// well as this chunk's own keys, which `rope_write_kv` stored first). Causal: query at position
// p sees keys 0..=p. K and V are kept [key][dim] in shared memory (rows padded by 8 so the
// fragment loads are free of bank conflicts); K's fragments come by ldmatrix, V's transposed by
// ldmatrix.trans, four 8x8 matrices a load.

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(p));
    return addr;
}

// 16 bytes global -> shared, asynchronous; `src_bytes` < 16 zero-fills the rest.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lanes 8m..8m+7 give the rows of matrix m. Non-transposed: the B
// fragments of m16n8k16 from a [n][k] tile (K as stored), two k-steps at once.
__device__ __forceinline__ void ldmatrix_x4(u32* r, const bf16_t* row) {
    u32 addr = smem_addr(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Transposed: the B fragments from a [k][n] tile (V as stored), two n-tiles at once.
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const bf16_t* row) {
    u32 addr = smem_addr(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// S = Q K^T on mma.sync for NT n-tiles of 8 keys: Q's D / 16 A fragments against the K tile at
// `sk` ([key][KP] bf16 in shared memory). One ldmatrix.x4 brings the B fragments of two k-steps
// (8 keys x 32 dims), a quarter of the shared loads of 32-bit reads.
template <int NT, int D, int KP>
__device__ __forceinline__ void mma_q_kt(float (&s)[NT][4], const u32 (&qf)[D / 16][4],
                                         const bf16_t* sk, int lane) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk += 2) {
            u32 b[4];
            ldmatrix_x4(b, &sk[(n * 8 + (lane & 7)) * KP + kk * 16 + (lane >> 3) * 8]);
            mma_bf16(s[n], qf[kk], b[0], b[1]);
            mma_bf16(s[n], qf[kk + 1], b[2], b[3]);
        }
    }
}

// Dims d8 .. d8 + 7 (16 bytes) of position p's K and V rows, by cp.async into dk and dv; zeros
// for positions at or past `end`.
__device__ __forceinline__ void cp_async_kv_chunk(bf16_t* dk, bf16_t* dv, const bf16_t* k_cache,
                                                  const bf16_t* v_cache, const u32* table, int p,
                                                  int end, int d8, int block_size, bool pow2,
                                                  int block_shift, int kv_heads, int kvh, int D) {
    const bf16_t* ks = k_cache;
    const bf16_t* vs = v_cache;
    int bytes = 0;
    if (p < end) {
        const size_t off =
            paged_kv_row(table, p, block_size, pow2, block_shift, kv_heads, kvh, D) + d8;
        ks = k_cache + off;
        vs = v_cache + off;
        bytes = 16;
    }
    cp_async16(dk, ks, bytes);
    cp_async16(dv, vs, bytes);
}

// 8 bytes global -> shared, asynchronous (the L1-allocating form: .cg takes only 16).
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}

// Paged decode attention (the default kernel): the lane groups and arithmetic of the register
// version above, K and V pieces brought by cp.async through S stages of U tokens a lane group
// in shared memory: a step's loads go out S - 1 steps before it computes, so a block keeps
// loads in flight while it computes. Each thread reads back only the pieces it copied itself
// (slot [stage][u][K|V][thread]), so no barrier until the merge, which reuses the stages.
// Measured on the H100 (NOTES.md): U = 4, S = 2 as fast as (2, 3) and faster than (4, 3),
// (2, 2), (2, 4), (2, 6), (1, 2), (1, 3), (1, 8) (more loads in flight did not help short
// contexts; fewer a step cost long ones). Dynamic shared memory: `decode_smem_bytes` on the
// host.
template <int G, int D>
__device__ void paged_decode_impl(DECODE_PARAMS(__restrict__)) {
    decode_launch_dependents();
    constexpr int U = 4, S = 2;
    constexpr int DL = D / 16;  // dims per lane
    constexpr int CB = DL * 2;  // bytes of a lane's piece of a row (16 or 8)
    DecodeBlock b;
    if (!decode_block(b, G, D, qkv, block_tables, item_rows, item_ctx, item_table_off, kv_heads,
                      block_size, split_tokens)) {
        return;
    }
    const int lane = threadIdx.x & 15, group = threadIdx.x >> 4;
    extern __shared__ __align__(16) unsigned char decode_smem[];
    auto piece = [&](int stage, int u, int kv) {
        return decode_smem + (((stage * U + u) * 2 + kv) * 128 + threadIdx.x) * CB;
    };
    const int steps = (b.s1 - b.s0 + 8 * U - 1) / (8 * U);
    // This lane's pieces of token `t` into slot u of `stage` (zeros past the split).
    auto copy_token = [&](int stage, int u, int t) {
        const bf16_t* ks = k_cache;
        const bf16_t* vs = v_cache;
        int bytes = 0;
        if (t < b.s1) {
            const size_t off = paged_kv_row(b.table, t, block_size, b.pow2_blocks, b.block_shift,
                                            kv_heads, b.kvh, D) +
                               lane * DL;
            ks = k_cache + off;
            vs = v_cache + off;
            bytes = CB;
        }
        if constexpr (CB == 16) {
            cp_async16(piece(stage, u, 0), ks, bytes);
            cp_async16(piece(stage, u, 1), vs, bytes);
        } else {
            cp_async8(piece(stage, u, 0), ks, bytes);
            cp_async8(piece(stage, u, 1), vs, bytes);
        }
    };
    // The copies of `step`'s tokens but `skip`, uncommitted: one commit group a step (empty
    // past the last), so waiting for all but S - 2 groups means the step about to compute
    // has landed.
    auto issue = [&](int step, int skip) {
        if (step < steps) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int t = b.s0 + step * 8 * U + u * 8 + group;
                if (t != skip) copy_token(step % S, u, t);
            }
        }
    };
    // As a programmatic dependent of the kernel that wrote this step's K and V (and q), the
    // first stage goes out before that kernel is done, all but the newest position (ctx - 1,
    // the one it wrote), which follows the wait.
    const int newest = b.s1 == b.ctx ? b.ctx - 1 : -1;
    issue(0, newest);
    pdl_wait();
    const int newest_off = newest - b.s0;
    if (newest >= 0 && newest_off < 8 * U && newest_off % 8 == group) {
        copy_token(0, newest_off / 8, newest);
    }
    cp_async_commit();
#pragma unroll
    for (int j = 1; j < S - 1; ++j) {
        issue(j, -1);
        cp_async_commit();
    }

    float q[G][DL], m[G], l[G], acc[G][DL];
    decode_lane_start<G, D>(b, lane, scale_log2, q, m, l, acc);

    // Every lane runs the same number of steps (the shuffles need the whole warp).
    for (int step = 0; step < steps; ++step) {
        cp_async_wait<S - 2>();
        // The slot this refills was read (into registers) in the step before.
        issue(step + S - 1, -1);
        cp_async_commit();
        const int stage = step % S;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool valid = b.s0 + step * 8 * U + u * 8 + group < b.s1;
            uint4 kraw = make_uint4(0, 0, 0, 0), vraw = make_uint4(0, 0, 0, 0);
            if constexpr (CB == 16) {
                kraw = *(const uint4*)piece(stage, u, 0);
                vraw = *(const uint4*)piece(stage, u, 1);
            } else {
                const uint2 k2 = *(const uint2*)piece(stage, u, 0);
                const uint2 v2 = *(const uint2*)piece(stage, u, 1);
                kraw.x = k2.x;
                kraw.y = k2.y;
                vraw.x = v2.x;
                vraw.y = v2.y;
            }
            decode_accumulate<G, DL>(q, (const bf16_t*)&kraw, (const bf16_t*)&vraw, valid, m, l,
                                     acc);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every thread is done with the stages the merge overwrites
    decode_merge<G, D>(m, l, acc, out, part_acc, part_ml, b, max_splits, lane, group,
                       (float*)decode_smem);
}

#define DECODE_KERNEL(G, D) DECODE_ENTRY(paged_decode_g##G##_d##D, paged_decode_impl<G, D>)

DECODE_KERNEL(1, 64)
DECODE_KERNEL(2, 64)
DECODE_KERNEL(3, 64)
DECODE_KERNEL(4, 64)
DECODE_KERNEL(5, 64)
DECODE_KERNEL(6, 64)
DECODE_KERNEL(7, 64)
DECODE_KERNEL(8, 64)
DECODE_KERNEL(1, 128)
DECODE_KERNEL(2, 128)
DECODE_KERNEL(3, 128)
DECODE_KERNEL(4, 128)
DECODE_KERNEL(5, 128)
DECODE_KERNEL(6, 128)
DECODE_KERNEL(7, 128)
DECODE_KERNEL(8, 128)

// Paged decode attention on tensor cores (head_dim 128, G <= 8 query heads a KV head): the
// GQA group's G heads are the rows of an m16n8k16 A operand (rows G..15 zero), so a token costs
// a few MMAs for the whole group instead of ~110 lane instructions. Block (item, kv_head,
// split), 4 warps; warp w takes 16-token chunks w, w + 4, ... of the split, each double-buffered
// by cp.async into its own shared memory (no block barrier until the merge), and keeps its own
// online softmax; the 4 warps merge at the end like the lane groups of `paged_decode_impl`.
template <int G>
__device__ void paged_decode_tc_impl(DECODE_PARAMS(__restrict__)) {
    decode_launch_dependents();
    static_assert(G >= 1 && G <= 8, "the group's heads are rows 0..7 of the MMA");
    constexpr int D = 128, CH = 16, KP = D + 8, WARPS = 4;
    DecodeBlock b;
    if (!decode_block(b, G, D, qkv, block_tables, item_rows, item_ctx, item_table_off, kv_heads,
                      block_size, split_tokens)) {
        return;
    }
    pdl_wait();  // (launched as a programmatic dependent, like `paged_decode_impl`)
    const int s0 = b.s0, s1 = b.s1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

    // Q as A fragments: row g is head kvh * G + g (rows >= G and 8..15 zero).
    u32 qf[D / 16][4];
    {
        const u32* qrow = (const u32*)(b.q + (size_t)min(g, G - 1) * D);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            qf[kk][0] = g < G ? qrow[kk * 8 + t] : 0u;
            qf[kk][1] = 0u;
            qf[kk][2] = g < G ? qrow[kk * 8 + 4 + t] : 0u;
            qf[kk][3] = 0u;
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_row = -1e30f, l_row = 0.0f;

    // This warp's two stages: K [16][KP], V [16][KP] each.
    extern __shared__ __align__(16) unsigned char decode_smem[];
    bf16_t* wsm = (bf16_t*)decode_smem + warp * 2 * 2 * CH * KP;
    auto load = [&](int chunk, int stage) {
        const int base = s0 + chunk * CH;
        bf16_t* dk = wsm + stage * 2 * CH * KP;
        bf16_t* dv = dk + CH * KP;
#pragma unroll
        for (int c = lane; c < CH * D / 8; c += 32) {
            const int tok = c >> 4, d8 = (c & 15) * 8;
            cp_async_kv_chunk(&dk[tok * KP + d8], &dv[tok * KP + d8], k_cache, v_cache, b.table,
                              base + tok, s1, d8, block_size, b.pow2_blocks, b.block_shift,
                              kv_heads, b.kvh, D);
        }
        cp_async_commit();
    };
    const int chunks = (s1 - s0 + CH - 1) / CH;
    const int mine = chunks > warp ? (chunks - warp + WARPS - 1) / WARPS : 0;
    if (mine > 0) load(warp, 0);
    for (int i = 0; i < mine; ++i) {
        if (i + 1 < mine) {
            load(warp + (i + 1) * WARPS, (i + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncwarp();
        const int base = s0 + (warp + i * WARPS) * CH;
        const bf16_t* sk = wsm + (i & 1) * 2 * CH * KP;
        const bf16_t* sv = sk + CH * KP;
        // S = Q K^T: 16 x 16 (2 n-tiles of 8 tokens), 8 k-steps.
        float sc[2][4];
        mma_q_kt<2, D, KP>(sc, qf, sk, lane);
        // Row g's scores (c0, c1 of each n-tile), tokens past the split masked.
        float mx = m_row;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int key = base + n * 8 + 2 * t;
            sc[n][0] = key < s1 ? sc[n][0] * scale_log2 : -1e30f;
            sc[n][1] = key + 1 < s1 ? sc[n][1] * scale_log2 : -1e30f;
            mx = fmaxf(mx, fmaxf(sc[n][0], sc[n][1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float r = exp2f(m_row - mx);
        m_row = mx;
        float sum = 0.0f;
        u32 pf[4];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const float p0 = sc[n][0] <= -1e29f ? 0.0f : exp2f(sc[n][0] - m_row);
            const float p1 = sc[n][1] <= -1e29f ? 0.0f : exp2f(sc[n][1] - m_row);
            sum += p0 + p1;
            pf[n * 2] = pack_bf2(p0, p1);
            pf[n * 2 + 1] = 0u;  // rows 8..15
        }
        l_row = l_row * r + sum;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= r;
            o[n][1] *= r;
        }
        // O += P V: one k-step of 16 tokens, 16 dim tiles, two a ldmatrix.x4.trans.
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            u32 b[4];
            ldmatrix_x4_trans(b, &sv[(lane & 15) * KP + (n + (lane >> 4)) * 8]);
            mma_bf16(o[n], pf, b[0], b[1]);
            mma_bf16(o[n + 1], pf, b[2], b[3]);
        }
        __syncwarp();  // this stage is read; the next load may overwrite it
    }
    l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
    l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);

    // Merge the 4 warps, in the ring's shared memory once every warp is done with it (so the
    // block fits 3 to an SM): m, l [WARPS][G], then acc [WARPS][G][D].
    __syncthreads();
    float* sm_m = (float*)decode_smem;
    float* sm_l = sm_m + WARPS * G;
    float* sm_acc = sm_l + WARPS * G;
    if (g < G) {
        if (t == 0) {
            sm_m[warp * G + g] = m_row;
            sm_l[warp * G + g] = l_row;
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            sm_acc[(warp * G + g) * D + n * 8 + 2 * t] = o[n][0];
            sm_acc[(warp * G + g) * D + n * 8 + 2 * t + 1] = o[n][1];
        }
    }
    __syncthreads();
    decode_finish<G, D, WARPS>(sm_m, sm_l, sm_acc, out, part_acc, part_ml, b, max_splits);
}

// paged_decode_tc_g{G}_d128: dynamic shared memory 4 warps x 2 stages x (K, V) x 16 x 136 bf16
// = 69632 bytes.
#define DECODE_TC_KERNEL(G) DECODE_ENTRY(paged_decode_tc_g##G##_d128, paged_decode_tc_impl<G>)

#if defined(BLENDSERVE_ALL_WGMMA_VARIANTS)
DECODE_TC_KERNEL(4)
#endif

template <int D>
__device__ void paged_prefill_impl(bf16_t* __restrict__ out, const bf16_t* __restrict__ qkv,
                                   const bf16_t* __restrict__ k_cache,
                                   const bf16_t* __restrict__ v_cache,
                                   const u32* __restrict__ block_tables,
                                   const int* __restrict__ tile_seq,
                                   const int* __restrict__ tile_q0,
                                   const int* __restrict__ seq_row0,
                                   const int* __restrict__ seq_start,
                                   const int* __restrict__ seq_len,
                                   const int* __restrict__ seq_table_off, int heads, int kv_heads,
                                   int block_size, float scale_log2) {
    constexpr int BM = 64, BN = 64, KP = D + 8;
    // Two stages of K and V tiles (dynamic shared memory: 4 * BN * KP bf16).
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16_t* const smem = (bf16_t*)smem_raw;

    // Heaviest tiles first, for every head (grid (heads, tiles); each sequence's tiles are
    // listed by rising q0).
    const int tile = gridDim.y - 1 - blockIdx.y, h = blockIdx.x;
    const int seq = tile_seq[tile], q0 = tile_q0[tile];
    const int start = seq_start[seq], len = seq_len[seq], row0 = seq_row0[seq];
    const int kvh = h / (heads / kv_heads);
    const u32* table = block_tables + seq_table_off[seq];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const size_t qkv_width = (size_t)(heads + 2 * kv_heads) * D;

    // Query rows of this thread: r_lo = q0 + warp*16 + g, r_hi = r_lo + 8 (chunk-relative).
    const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
    const int pos_lo = r_lo < len ? start + r_lo : -1;
    const int pos_hi = r_hi < len ? start + r_hi : -1;

    // Q fragments (scores are scaled in f32 after the MMA).
    u32 qf[D / 16][4];
    {
        const bf16_t* qlo = qkv + (size_t)(row0 + min(r_lo, len - 1)) * qkv_width + (size_t)h * D;
        const bf16_t* qhi = qkv + (size_t)(row0 + min(r_hi, len - 1)) * qkv_width + (size_t)h * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            int c = kk * 16 + 2 * t;
            qf[kk][0] = pack_bf2(bf2f(qlo[c]), bf2f(qlo[c + 1]));
            qf[kk][1] = pack_bf2(bf2f(qhi[c]), bf2f(qhi[c + 1]));
            qf[kk][2] = pack_bf2(bf2f(qlo[c + 8]), bf2f(qlo[c + 9]));
            qf[kk][3] = pack_bf2(bf2f(qhi[c + 8]), bf2f(qhi[c + 9]));
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_lo = -1e30f, m_hi = -1e30f, l_lo = 0.0f, l_hi = 0.0f;

    const int last_q = min(len, q0 + BM) - 1;
    const int kv_end = start + last_q + 1;  // keys 0..kv_end
    const int block_first_pos = start + q0;

    const bool pow2_blocks = (block_size & (block_size - 1)) == 0;
    const int block_shift = __ffs(block_size) - 1;
    // K and V tile at keys k0.. into `stage` with cp.async (zero-filled past the end).
    auto load_tile = [&](int k0, int stage) {
        bf16_t* dk = smem + stage * 2 * BN * KP;
        bf16_t* dv = dk + BN * KP;
        for (int c = threadIdx.x; c < BN * D / 8; c += blockDim.x) {
            int key = c / (D / 8), d8 = (c % (D / 8)) * 8;
            cp_async_kv_chunk(&dk[key * KP + d8], &dv[key * KP + d8], k_cache, v_cache, table,
                              k0 + key, kv_end, d8, block_size, pow2_blocks, block_shift, kv_heads,
                              kvh, D);
        }
        cp_async_commit();
    };
    const int num_tiles = (kv_end + BN - 1) / BN;
    load_tile(0, 0);
    for (int tile_i = 0; tile_i < num_tiles; ++tile_i) {
        const int k0 = tile_i * BN;
        // Prefetch the next tile into the other stage (free since the barrier that ended the
        // previous iteration), then wait for this one.
        if (tile_i + 1 < num_tiles) {
            load_tile(k0 + BN, (tile_i + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16_t* sk = smem + (tile_i & 1) * 2 * BN * KP;
        const bf16_t* sv = sk + BN * KP;

        // S = Q K^T: 16 x 64 per warp, 8 n-tiles.
        float s[BN / 8][4];
        mma_q_kt<BN / 8, D, KP>(s, qf, sk, lane);
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
            for (int i = 0; i < 4; ++i) s[n][i] *= scale_log2;
        }
        // Causal mask (and keys past the end) where the tile reaches the diagonal.
        if (k0 + BN - 1 > block_first_pos) {
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                int key = k0 + n * 8 + 2 * t;
                if (key > pos_lo) s[n][0] = -1e30f;
                if (key + 1 > pos_lo) s[n][1] = -1e30f;
                if (key > pos_hi) s[n][2] = -1e30f;
                if (key + 1 > pos_hi) s[n][3] = -1e30f;
            }
        }
        // Online softmax over the two rows this thread holds (a quad shares a row).
        float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
        }
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        float r_lo_scale = exp2f(m_lo - mx_lo), r_hi_scale = exp2f(m_hi - mx_hi);
        m_lo = mx_lo;
        m_hi = mx_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
        u32 pf[BN / 16][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
            float p0 = s[n][0] <= -1e29f ? 0.0f : exp2f(s[n][0] - m_lo);
            float p1 = s[n][1] <= -1e29f ? 0.0f : exp2f(s[n][1] - m_lo);
            float p2 = s[n][2] <= -1e29f ? 0.0f : exp2f(s[n][2] - m_hi);
            float p3 = s[n][3] <= -1e29f ? 0.0f : exp2f(s[n][3] - m_hi);
            sum_lo += p0 + p1;
            sum_hi += p2 + p3;
            int kk = n / 2, half = n % 2;
            pf[kk][half * 2 + 0] = pack_bf2(p0, p1);
            pf[kk][half * 2 + 1] = pack_bf2(p2, p3);
        }
        l_lo = l_lo * r_lo_scale + sum_lo;
        l_hi = l_hi * r_hi_scale + sum_hi;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= r_lo_scale;
            o[n][1] *= r_lo_scale;
            o[n][2] *= r_hi_scale;
            o[n][3] *= r_hi_scale;
        }
        // O += P V: k = keys (4 steps of 16), n = dims (D / 8 tiles).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                // Two dim tiles (n, n + 1) per ldmatrix.x4.trans.
                u32 b[4];
                ldmatrix_x4_trans(b, &sv[(kk * 16 + (lane & 15)) * KP + (n + (lane >> 4)) * 8]);
                mma_bf16(o[n], pf[kk], b[0], b[1]);
                mma_bf16(o[n + 1], pf[kk], b[2], b[3]);
            }
        }
        __syncthreads();
    }

    // Row sums across the quad, normalise, write.
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const size_t out_width = (size_t)heads * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int d = n * 8 + 2 * t;
        if (pos_lo >= 0) {
            u32* dst = (u32*)(out + (size_t)(row0 + r_lo) * out_width + (size_t)h * D + d);
            *dst = pack_bf2(o[n][0] / l_lo, o[n][1] / l_lo);
        }
        if (pos_hi >= 0) {
            u32* dst = (u32*)(out + (size_t)(row0 + r_hi) * out_width + (size_t)h * D + d);
            *dst = pack_bf2(o[n][2] / l_hi, o[n][3] / l_hi);
        }
    }
}

#define PREFILL_KERNEL(D)                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 3) paged_prefill_d##D(                         \
        bf16_t* out, const bf16_t* qkv, const bf16_t* k_cache, const bf16_t* v_cache,            \
        const u32* block_tables, const int* tile_seq, const int* tile_q0, const int* seq_row0,   \
        const int* seq_start, const int* seq_len, const int* seq_table_off, int heads,           \
        int kv_heads, int block_size, float scale_log2) {                                         \
        paged_prefill_impl<D>(out, qkv, k_cache, v_cache, block_tables, tile_seq, tile_q0,       \
                              seq_row0, seq_start, seq_len, seq_table_off, heads, kv_heads,      \
                              block_size, scale_log2);                                            \
    }

PREFILL_KERNEL(64)
PREFILL_KERNEL(128)

// ---------------------------------------------------------------------------------------------
// Paged prefill attention for Hopper (sm_90a): warpgroup MMAs (wgmma) that read Q, K and V
// straight from shared memory, so no thread loads B fragments (the limit of the mma.sync kernel
// above: every m16n8k16 there pulls 256 bytes of K or V through the shared-memory pipe).
//
// Block (tile, heads): 64 query rows of one chunk for 1, 2 or 4 query heads of one KV group
// (one warpgroup of 128 threads per head or pair of heads); keys in tiles of 64, double-buffered
// by cp.async. Tiles of Q, K and V sit in shared memory in
// wgmma's 128-byte-swizzled layout: [dim / 64][row][64 dims], each 8-row x 128-byte atom with
// its 16-byte chunks XOR-ed by the row within the atom, atoms 1024-byte aligned.
//   S = Q K^T:  m64n64k16, A = Q and B = K both K-major descriptors (8 k-steps over the dims).
//   O += P V:   m64n128k16, A = P from registers (the accumulator layout of S is the A-fragment
//               layout, as for mma.sync), B = V as an N-major ("transposed") descriptor.
// The accumulators follow mma.m16n8's C layout per 8 columns: warp w holds rows 16w + g and
// 16w + g + 8 (g = lane / 4), columns 8i + 2t, 8i + 2t + 1 (t = lane % 4) in d[4i .. 4i + 3].
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ unsigned long long wgmma_desc(u32 smem_addr_bytes, u32 lbo_bytes,
                                                         u32 sbo_bytes) {
    unsigned long long d = (unsigned long long)((smem_addr_bytes & 0x3FFFFu) >> 4);
    d |= (unsigned long long)((lbo_bytes & 0x3FFFFu) >> 4) << 16;
    d |= (unsigned long long)((sbo_bytes & 0x3FFFFu) >> 4) << 32;
    d |= 1ull << 62;  // 128-byte swizzle
    return d;
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Shared-memory writes of this thread (cp.async) visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Keeps the compiler from moving uses of an accumulator across the wgmma that writes it.
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }

__device__ __forceinline__ void cp_async16_to(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

// Named barriers 1.. (0 is __syncthreads): wait until `count` threads arrived, or arrive only.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Tensor Memory Accelerator (TMA) loads into shared memory, completed on an mbarrier. A tensor
// map is the driver's 128-byte description of a global tensor (`cuTensorMapEncodeTiled`),
// passed as a `__grid_constant__` kernel parameter.
struct __align__(64) TensorMap {
    unsigned long long bits[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Barrier initialisations visible to the async proxy (TMA) before any load names them.
__device__ __forceinline__ void fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` the phase's loads will bring.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// Waits until the barrier's phase with parity `parity` completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}
// The box of `map` at coordinates (c0, c1, c2), innermost first, into shared memory at `dst`;
// out-of-range parts of the box are zero-filled.
__device__ __forceinline__ void tma_load_3d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1,
                                            int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
        "[%1, {%3, %4, %5}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

// Byte offset of the 16-byte chunk `c16` (dims 8 c16 .. 8 c16 + 7) of `row` in a swizzled
// 64-row x 128-dim tile.
__device__ __forceinline__ u32 swizzled_offset(int row, int c16) {
    return (u32)((c16 >> 3) * (64 * 128) + row * 128 + (((c16 & 7) ^ (row & 7)) << 4));
}

__device__ __forceinline__ void wgmma_m64n64k16_ss(float* d, unsigned long long desc_a,
                                                      unsigned long long desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_m64n128k16_ss(float* d, unsigned long long desc_a,
                                                       unsigned long long desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_m64n128k16_rs_tb(float* d, const u32* a,
                                                         unsigned long long desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// WGS warpgroups a block, each with HPW query heads of one KV group (done one after the other
// on each K/V tile): the block's WGS * HPW heads share every K and V tile it loads, so a byte of
// K/V brought from L2 feeds 64 * WGS * HPW query rows (64 with one head a block, the L2-bound
// first version).
//
// TMA: K and V tiles come by TMA (one warp issues a tile's boxes, a page of `block_size` tokens
// and 64 dims each, from the caches' tensor maps `k_map` / `v_map`) into two stages, each with
// an mbarrier the loads complete; the last warp to finish with a stage loads the tile after
// next into it. No block barrier a tile and no load instructions in the softmax warps, so the
// warpgroups drift apart instead of moving in lockstep. Needs `block_size` a power of two, >= 8.
//
// BN: keys a K/V tile (64; 128 with TMA: S = Q K^T by m64n128k16, half the Q reads from shared
// memory a FLOP, twice the registers for S and P, so one block an SM).
template <int WGS, int HPW, bool PINGPONG, bool ONE_BARRIER, bool TMA, int BN>
__device__ void paged_prefill_wgmma_impl(bf16_t* __restrict__ out, const bf16_t* __restrict__ qkv,
                                         const bf16_t* __restrict__ k_cache,
                                         const bf16_t* __restrict__ v_cache,
                                         const TensorMap* k_map, const TensorMap* v_map,
                                         const u32* __restrict__ block_tables,
                                         const int* __restrict__ tile_seq,
                                         const int* __restrict__ tile_q0,
                                         const int* __restrict__ seq_row0,
                                         const int* __restrict__ seq_start,
                                         const int* __restrict__ seq_len,
                                         const int* __restrict__ seq_table_off, int heads,
                                         int kv_heads, int block_size, float scale_log2) {
    constexpr int D = 128, BM = 64, NQ = WGS * HPW, THREADS = 128 * WGS;
    static_assert(!PINGPONG || WGS == 2, "ping-pong takes two warpgroups");
    static_assert(!TMA || HPW == 1, "TMA loads: one head a warpgroup");
    static_assert(BN == 64 || (TMA && BN == 128), "64-key tiles, or 128 with TMA loads");
    constexpr u32 Q_BYTES = BM * D * 2;  // one head's 64-row Q tile
    constexpr u32 Q_HALF = Q_BYTES / 2;  // dims 0..63 or 64..127 of it
    constexpr u32 TILE_BYTES = BN * D * 2;  // one K or V tile
    constexpr u32 HALF_BYTES = TILE_BYTES / 2;
    // NQ Q tiles, then two stages of K and V; 1024 bytes of slack to align the swizzle atoms;
    // then (TMA) each stage's mbarrier and warp counter.
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 sq = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 stages = sq + Q_BYTES * NQ;  // K, V of stage 0, then of stage 1
    const u32 stage_bars = stages + TILE_BYTES * 4;
    unsigned int* stage_done =
        reinterpret_cast<unsigned int*>(smem_raw + (stage_bars + 16 - smem_addr(smem_raw)));

    // Heaviest tiles first, for every head group before the next tile (grid (head groups,
    // tiles), the x index launched fastest): the plan lists each sequence's tiles by rising q0,
    // and later tiles see more keys, so the last blocks launched are short ones. (Tiles-fastest
    // order ran each head group's tiles heavy to light, and the last group's heaviest tiles
    // started near the end.)
    const int tile = gridDim.y - 1 - blockIdx.y, h0 = blockIdx.x * NQ;
    const int seq = tile_seq[tile], q0 = tile_q0[tile];
    const int start = seq_start[seq], len = seq_len[seq], row0 = seq_row0[seq];
    const int kvh = h0 / (heads / kv_heads);
    const u32* table = block_tables + seq_table_off[seq];
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const size_t qkv_width = (size_t)(heads + 2 * kv_heads) * D;

    const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
    const int pos_lo = r_lo < len ? start + r_lo : -1;
    const int pos_hi = r_hi < len ? start + r_hi : -1;

    // Q tiles of the block's heads (rows past the chunk zero-filled).
    for (int c = threadIdx.x; c < NQ * BM * D / 8; c += THREADS) {
        int qi = c >> 10, row = (c >> 4) & 63, c16 = c & 15;
        int r = q0 + row;
        const bf16_t* src = qkv + (size_t)(row0 + min(r, len - 1)) * qkv_width +
                            (size_t)(h0 + qi) * D + c16 * 8;
        cp_async16_to(sq + Q_BYTES * qi + swizzled_offset(row, c16), src, r < len ? 16 : 0);
    }

    const int last_q = min(len, q0 + BM) - 1;
    const int kv_end = start + last_q + 1;
    const int block_first_pos = start + q0;
    const bool pow2_blocks = (block_size & (block_size - 1)) == 0;
    const int block_shift = __ffs(block_size) - 1;
    auto load_tile = [&](int k0, int stage) {
        const u32 dk = stages + TILE_BYTES * 2 * stage;
        const u32 dv = dk + TILE_BYTES;
        for (int c = threadIdx.x; c < BN * D / 8; c += THREADS) {
            int key = c >> 4, c16 = c & 15;
            int p = k0 + key;
            const bf16_t* ks = k_cache;
            const bf16_t* vs = v_cache;
            int bytes = 0;
            if (p < kv_end) {
                size_t off = paged_kv_row(table, p, block_size, pow2_blocks, block_shift,
                                          kv_heads, kvh, D) +
                             c16 * 8;
                ks = k_cache + off;
                vs = v_cache + off;
                bytes = 16;
            }
            u32 o = swizzled_offset(key, c16);
            cp_async16_to(dk + o, ks, bytes);
            cp_async16_to(dv + o, vs, bytes);
        }
        cp_async_commit();
    };
    // TMA: one whole warp loads the K and V tile at key k0 into `stage`: boxes of `rows` keys
    // (a block, or 64 keys of a larger one) x 64 dims; keys past the chunk's last one come from
    // slot -rows, out of range, so zeros.
    auto tma_tile = [&](int k0, int stage) {
        const u32 dk = stages + TILE_BYTES * 2 * stage;
        const u32 bar = stage_bars + 8 * stage;
        if (lane == 0) mbar_arrive_expect_tx(bar, 2 * TILE_BYTES);
        __syncwarp();
        const int rows = min(block_size, 64);  // the tensor maps' box (at most 64 keys)
        const int ops = 4 * (BN / rows);
        for (int op = lane; op < ops; op += 32) {
            const int kind = op & 1, half = (op >> 1) & 1, box = op >> 2;
            const int key = k0 + box * rows;
            int slot = -rows;
            if (key < kv_end) slot = (int)paged_slot(table, key, block_size, true, block_shift);
            tma_load_3d(dk + kind * TILE_BYTES + half * HALF_BYTES + box * rows * 128,
                        kind ? v_map : k_map, bar, half * 64, kvh, slot);
        }
    };

    float o[HPW][D / 2];
    float m_lo[HPW], m_hi[HPW], l_lo[HPW], l_hi[HPW];
#pragma unroll
    for (int j = 0; j < HPW; ++j) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[j][i] = 0.0f;
        m_lo[j] = m_hi[j] = -1e30f;
        l_lo[j] = l_hi[j] = 0.0f;
    }
    float s[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = 0.0f;

    const int num_tiles = (kv_end + BN - 1) / BN;
    // TMA: this warp is done with tile t's stage; the last of the block's warps to say so
    // loads tile t + 2 into it (a counter that only grows: every 4 * WGS arrivals end a use of
    // the stage).
    auto release_stage = [&](int t) {
        if (t + 2 >= num_tiles) return;
        unsigned int arrived = 0;
        if (lane == 0) {
            __threadfence_block();
            arrived = atomicAdd(&stage_done[t & 1], 1u) + 1;
            __threadfence_block();
        }
        arrived = __shfl_sync(0xffffffffu, arrived, 0);
        if (arrived % (4 * WGS) == 0) tma_tile((t + 2) * BN, t & 1);
    };
    if constexpr (TMA) {
        cp_async_commit();  // Q
        if (threadIdx.x == 0) {
            mbar_init(stage_bars, 1);
            mbar_init(stage_bars + 8, 1);
            stage_done[0] = stage_done[1] = 0;
            fence_mbar_init();
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            tma_tile(0, 0);
            if (num_tiles > 1) tma_tile(BN, 1);
        }
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
    } else {
        load_tile(0, 0);  // same group as Q
    }
    // The first warpgroup issues first.
    if (PINGPONG && wg == 1) named_barrier_arrive(1, 256);
    for (int tile_i = 0; tile_i < num_tiles; ++tile_i) {
        const int k0 = tile_i * BN;
        if constexpr (TMA) {
            mbar_wait(stage_bars + 8 * (tile_i & 1), (tile_i >> 1) & 1);
        } else if (ONE_BARRIER) {
            cp_async_wait<0>();
        } else if (tile_i + 1 < num_tiles) {
            load_tile(k0 + BN, (tile_i + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if constexpr (!TMA) {
            fence_proxy_async();
            __syncthreads();
        }
        // ONE_BARRIER: the prefetch goes after the barrier, which also says every thread is
        // done with the stage it overwrites (read in the previous tile), so no second barrier.
        if (!TMA && ONE_BARRIER && tile_i + 1 < num_tiles) load_tile(k0 + BN, (tile_i + 1) & 1);
        const u32 sk = stages + TILE_BYTES * 2 * (tile_i & 1);
        const u32 sv = sk + TILE_BYTES;

        // MMA batches of this warpgroup: S_0, then (P_j V, S_j+1) for each head j, the last
        // P V alone. With PINGPONG the two warpgroups take turns issuing batches (named
        // barriers 1 and 2), so one's softmax runs while the other's MMAs do.
        const bool last_tile = tile_i + 1 == num_tiles;
        auto issue_s = [&](int j) {
            const u32 sqj = sq + Q_BYTES * (wg * HPW + j);
            // S = Q K^T (64 x 64), 8 k-steps of 16 dims: 32 bytes along a swizzled row, then
            // the second 64-dim half.
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const u32 qoff = (kk >> 2) * Q_HALF + (kk & 3) * 32;
                const u32 koff = (kk >> 2) * HALF_BYTES + (kk & 3) * 32;
                if constexpr (BN == 128) {
                    wgmma_m64n128k16_ss(s, wgmma_desc(sqj + qoff, 16, 1024),
                                        wgmma_desc(sk + koff, 16, 1024), kk > 0);
                } else {
                    wgmma_m64n64k16_ss(s, wgmma_desc(sqj + qoff, 16, 1024),
                                       wgmma_desc(sk + koff, 16, 1024), kk > 0);
                }
            }
        };
        if (PINGPONG) named_barrier_sync(1 + wg, 256);
        wgmma_fence();
        issue_s(0);
        wgmma_commit();
        if (PINGPONG) named_barrier_arrive(2 - wg, 256);
#pragma unroll
        for (int j = 0; j < HPW; ++j) {
            // (Also waits for the previous head's P V.)
            wgmma_wait_all();
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) reg_fence(s[i]);

            // Online softmax on raw scores: masked keys are -inf (exp2 gives 0), the running
            // max m is kept scaled (finite from the start, so m - m never makes a NaN), and
            // one FFMA a score applies the scale and subtracts the max.
            if (k0 + BN - 1 > block_first_pos) {
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
                    int key = k0 + n * 8 + 2 * t;
                    if (key > pos_lo) s[4 * n + 0] = NEG_INF;
                    if (key + 1 > pos_lo) s[4 * n + 1] = NEG_INF;
                    if (key > pos_hi) s[4 * n + 2] = NEG_INF;
                    if (key + 1 > pos_hi) s[4 * n + 3] = NEG_INF;
                }
            }
            float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                mx_lo = fmaxf(mx_lo, fmaxf(s[4 * n], s[4 * n + 1]));
                mx_hi = fmaxf(mx_hi, fmaxf(s[4 * n + 2], s[4 * n + 3]));
            }
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
            mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
            mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
            mx_lo = fmaxf(m_lo[j], mx_lo * scale_log2);
            mx_hi = fmaxf(m_hi[j], mx_hi * scale_log2);
            const float r_lo_scale = fast_exp2(m_lo[j] - mx_lo);
            const float r_hi_scale = fast_exp2(m_hi[j] - mx_hi);
            m_lo[j] = mx_lo;
            m_hi[j] = mx_hi;
            float sum_lo = 0.0f, sum_hi = 0.0f;
            u32 pf[BN / 16][4];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n) {
                float p0 = fast_exp2(fmaf(s[4 * n + 0], scale_log2, -mx_lo));
                float p1 = fast_exp2(fmaf(s[4 * n + 1], scale_log2, -mx_lo));
                float p2 = fast_exp2(fmaf(s[4 * n + 2], scale_log2, -mx_hi));
                float p3 = fast_exp2(fmaf(s[4 * n + 3], scale_log2, -mx_hi));
                sum_lo += p0 + p1;
                sum_hi += p2 + p3;
                int kk = n / 2, half = n % 2;
                pf[kk][half * 2 + 0] = pack_bf2(p0, p1);
                pf[kk][half * 2 + 1] = pack_bf2(p2, p3);
            }
            l_lo[j] = l_lo[j] * r_lo_scale + sum_lo;
            l_hi[j] = l_hi[j] * r_hi_scale + sum_hi;
            // Rescale O only when some row's max moved (after the first tiles, rarely): a
            // factor of exactly 1 is a no-op, so skipping it changes nothing.
            if (!__all_sync(0xffffffffu, r_lo_scale == 1.0f && r_hi_scale == 1.0f)) {
#pragma unroll
                for (int n = 0; n < D / 8; ++n) {
                    o[j][4 * n + 0] *= r_lo_scale;
                    o[j][4 * n + 1] *= r_lo_scale;
                    o[j][4 * n + 2] *= r_hi_scale;
                    o[j][4 * n + 3] *= r_hi_scale;
                }
            }

            // O += P V: 4 k-steps of 16 keys (2048 bytes: two 8-key atoms); LBO = the next 64
            // dims, SBO = the next 8 keys. The next head's S = Q K^T queues behind it.
            if (PINGPONG) named_barrier_sync(1 + wg, 256);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                wgmma_m64n128k16_rs_tb(o[j], pf[kk], wgmma_desc(sv + kk * 2048, HALF_BYTES, 1024));
            }
            if (j + 1 < HPW) issue_s(j + 1);
            wgmma_commit();
            // The second warpgroup's very last batch has no turn to hand over.
            if (PINGPONG && !(wg == 1 && last_tile && j + 1 == HPW)) {
                named_barrier_arrive(2 - wg, 256);
            }
        }
        wgmma_wait_all();
#pragma unroll
        for (int j = 0; j < HPW; ++j) {
#pragma unroll
            for (int i = 0; i < D / 2; ++i) reg_fence(o[j][i]);
        }
        if constexpr (TMA) {
            release_stage(tile_i);
        } else if (!ONE_BARRIER) {
            __syncthreads();
        }
    }

    const size_t out_width = (size_t)heads * D;
#pragma unroll
    for (int j = 0; j < HPW; ++j) {
        const int h = h0 + wg * HPW + j;
        float sl = l_lo[j], sh = l_hi[j];
        sl += __shfl_xor_sync(0xffffffffu, sl, 1);
        sl += __shfl_xor_sync(0xffffffffu, sl, 2);
        sh += __shfl_xor_sync(0xffffffffu, sh, 1);
        sh += __shfl_xor_sync(0xffffffffu, sh, 2);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            int d = n * 8 + 2 * t;
            if (pos_lo >= 0) {
                u32* dst = (u32*)(out + (size_t)(row0 + r_lo) * out_width + (size_t)h * D + d);
                *dst = pack_bf2(o[j][4 * n + 0] / sl, o[j][4 * n + 1] / sl);
            }
            if (pos_hi >= 0) {
                u32* dst = (u32*)(out + (size_t)(row0 + r_hi) * out_width + (size_t)h * D + d);
                *dst = pack_bf2(o[j][4 * n + 2] / sh, o[j][4 * n + 3] / sh);
            }
        }
    }
}

// paged_prefill_wgmma_h{WGS}x{HPW}[_pingpong]: grid (tiles, heads / (WGS * HPW)), 128 * WGS
// threads.
#define PREFILL_WGMMA_KERNEL(NAME, WGS, HPW, PINGPONG, ONE_BARRIER, MIN_BLOCKS)                  \
    extern "C" __global__ void __launch_bounds__(128 * WGS, MIN_BLOCKS) NAME(                                                      \
            bf16_t* out, const bf16_t* qkv, const bf16_t* k_cache, const bf16_t* v_cache,        \
            const u32* block_tables, const int* tile_seq, const int* tile_q0,                    \
            const int* seq_row0, const int* seq_start, const int* seq_len,                       \
            const int* seq_table_off, int heads, int kv_heads, int block_size,                   \
            float scale_log2) {                                                                  \
        paged_prefill_wgmma_impl<WGS, HPW, PINGPONG, ONE_BARRIER, false, 64>(out, qkv, k_cache, v_cache, nullptr, nullptr, block_tables, tile_seq,  \
                                           tile_q0, seq_row0, seq_start, seq_len,                \
                                           seq_table_off, heads, kv_heads, block_size,           \
                                           scale_log2);                                          \
    }

// paged_prefill_wgmma_h{WGS}x1_tma: the same grid; K and V by TMA from the caches' tensor maps
// (in place of the cache pointers).
#define PREFILL_WGMMA_TMA_KERNEL(NAME, WGS, PINGPONG, BN, MIN_BLOCKS)                            \
    extern "C" __global__ void __launch_bounds__(128 * WGS, MIN_BLOCKS) NAME(                  \
            bf16_t* out, const bf16_t* qkv, const __grid_constant__ TensorMap k_map,           \
            const __grid_constant__ TensorMap v_map, const u32* block_tables,                  \
            const int* tile_seq, const int* tile_q0, const int* seq_row0,                      \
            const int* seq_start, const int* seq_len, const int* seq_table_off, int heads,     \
            int kv_heads, int block_size, float scale_log2) {                                  \
        paged_prefill_wgmma_impl<WGS, 1, PINGPONG, false, true, BN>(                           \
                out, qkv, nullptr, nullptr, &k_map, &v_map, block_tables, tile_seq, tile_q0,   \
                seq_row0, seq_start, seq_len, seq_table_off, heads, kv_heads, block_size,      \
                scale_log2);                                                                   \
    }

// The variants the model picks (`WGMMA_PREFERENCE` in mod.rs) ...
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h2x1_one_barrier, 2, 1, false, true, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h1x1, 1, 1, false, false, 2)
PREFILL_WGMMA_TMA_KERNEL(paged_prefill_wgmma_h2x1_tma, 2, false, 64, 2)
// ... and the ones only benchmarks compare, compiled on request (each costs start-up time when
// the driver turns the PTX into machine code).
#if defined(BLENDSERVE_ALL_WGMMA_VARIANTS)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h1x2, 1, 2, false, false, 2)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h2x1, 2, 1, false, false, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h2x2, 2, 2, false, false, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h2x1_pingpong, 2, 1, true, false, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h2x2_pingpong, 2, 2, true, false, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h4x1, 4, 1, false, false, 1)
PREFILL_WGMMA_KERNEL(paged_prefill_wgmma_h4x1_one_barrier, 4, 1, false, true, 1)
PREFILL_WGMMA_TMA_KERNEL(paged_prefill_wgmma_h4x1_tma, 4, false, 64, 1)
PREFILL_WGMMA_TMA_KERNEL(paged_prefill_wgmma_h2x1_tma_pingpong, 2, true, 64, 2)
PREFILL_WGMMA_TMA_KERNEL(paged_prefill_wgmma_h2x1_tma_k128, 2, false, 128, 1)
PREFILL_WGMMA_TMA_KERNEL(paged_prefill_wgmma_h2x1_tma_k128_pingpong, 2, true, 128, 1)
#endif

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Greedy sampling: out[r] = argmax of logits row r (f32, [rows, vocab]); ties to the lowest id.
extern "C" __global__ void argmax_rows(u32* __restrict__ out, const float* __restrict__ logits,
                                       int vocab) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float best = -3.0e38f;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = row[i];
        if (v > best) {
            best = v;
            best_i = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ov > best || (ov == best && oi < best_i)) {
            best = ov;
            best_i = oi;
        }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = best;
        si[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
            if (sv[w] > best || (sv[w] == best && si[w] < best_i)) {
                best = sv[w];
                best_i = si[w];
            }
        }
        out[blockIdx.x] = (u32)best_i;
    }
}

// Fills a bf16 buffer with uniform(-bound, bound) values from a counter hash (benchmark weights).
extern "C" __global__ void fill_uniform(bf16_t* __restrict__ out, size_t n, u32 seed, float bound) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        u32 x = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        x ^= x >> 16;
        x *= 0x7FEB352Du;
        x ^= x >> 15;
        x *= 0x846CA68Bu;
        x ^= x >> 16;
        float u = (float)(x >> 8) * (1.0f / 16777216.0f);
        out[i] = f2bf((2.0f * u - 1.0f) * bound);
    }
}
