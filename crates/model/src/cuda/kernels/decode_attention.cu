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

// In the load-time module: the default on GPUs whose memory outruns the lane kernel (see
// `preferred_decode_kernel` in decode.rs).
DECODE_TC_KERNEL(4)
