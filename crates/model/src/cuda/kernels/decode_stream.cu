// ---------------------------------------------------------------------------------------------
// Paged decode attention as a persistent stream over KV tiles (Hopper, sm_90a): the memory lane
// of the overlapped executor, and a decode kernel for the whole GPU.
//
// The work is every (item, KV head, 16-token chunk) tile, numbered item by item, then KV head,
// then chunk, and cut into equal runs of `tiles_per_warp` tiles, one run per warp of the grid:
// a batch of mixed contexts is split by KV tokens, not by sequence, so no warp waits for the
// longest item. The grid is one block an SM (its shared memory holds an SM alone), as many blocks
// as the lane has SMs. Each warp brings its tiles through its own ring of S stages by TMA (the
// cache's tensor maps: a tile is one 16-token cache block, K and V each two boxes of 64 dims,
// 128-byte swizzled; one lane issues the four loads, completed on the stage's mbarrier), so
// S - 1 tiles are in flight while it computes one: WARPS x (S - 1) x 8 KiB an SM, what Little's
// law asks of one SM that pulls ~150 GB/s. (A first version brought each 256-byte row by its own
// `cp.async.bulk`, one a lane: 32 copies a tile held every warp to ~4.4 GB/s, NOTES.md.)
//
// Tensor cores, transposed so that the 16 rows of an m16n8k16 are tokens and its 8 columns the
// GQA group's heads (G <= 8) rather than the heads padded to 16 rows:
//   S^T = K Q^T:   A = the K tile (ldmatrix), B = Q^T (registers, loaded once a pair), 8 k-steps;
//   O^T += V^T P^T: A = V^T (ldmatrix.trans), B = P^T (the C fragments of S^T, each 8 x 8 half
//                   transposed by movmatrix), 8 m-tiles of 16 dims.
// A lane (g, t) holds the scores of tokens g and g + 8 for heads 2t and 2t + 1, and O^T of dims
// 16 m + g and 16 m + g + 8 for those heads. A run that covers a whole (item, KV head) writes
// the bf16 output; otherwise it writes its part (m, l, unnormalised acc) for
// `paged_decode_stream_reduce`.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// An L2 policy that evicts the lines it tags first: the KV cache is read once a step, so it
// should not push the GEMMs' operands (running beside it on the other SMs) out of L2.
__device__ __forceinline__ unsigned long long l2_evict_first_policy() {
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// `tma_load_3d` with an L2 cache policy.
__device__ __forceinline__ void tma_load_3d_hint(u32 dst, const TensorMap* map, u32 bar, int c0,
                                                 int c1, int c2, unsigned long long policy) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        ".L2::cache_hint [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2),
        "l"(policy)
        : "memory");
}

// ldmatrix (plain and transposed) from a shared-memory byte address.
__device__ __forceinline__ void ldsm_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Byte offset of the 16-byte chunk `c16` (dims 8 c16 .. 8 c16 + 7) of `row` in a 16-row x
// 128-dim tile laid out by TMA as two 128-byte-swizzled boxes of 64 dims.
__device__ __forceinline__ u32 stream_tile_offset(int row, int c16) {
    return (u32)((c16 >> 3) * (16 * 128) + row * 128 + (((c16 & 7) ^ (row & 7)) << 4));
}

// The 8 x 8 b16 matrix held as mma C fragments (lane (g, t): row g, columns 2t, 2t + 1),
// transposed, in the same layout.
__device__ __forceinline__ u32 movmatrix_trans(u32 x) {
    u32 y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// Where a warp is in the tile order: item, KV head and chunk, with the item's chunk count,
// context and block table.
struct StreamCursor {
    int item, kvh, chunk, chunks, ctx;
    const u32* table;
};

__device__ __forceinline__ void stream_cursor_at(StreamCursor& c, int tile,
                                                 const int* item_chunk_start, const int* item_ctx,
                                                 const u32* block_tables,
                                                 const int* item_table_off, int items,
                                                 int kv_heads) {
    // The last item whose first tile is at or before `tile`.
    int lo = 0, hi = items;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (item_chunk_start[mid] * kv_heads <= tile) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    c.item = lo;
    c.ctx = item_ctx[lo];
    c.table = block_tables + item_table_off[lo];
    c.chunks = (c.ctx + 15) >> 4;
    const int within = tile - item_chunk_start[lo] * kv_heads;
    c.kvh = within / c.chunks;
    c.chunk = within - c.kvh * c.chunks;
}

__device__ __forceinline__ void stream_cursor_next(StreamCursor& c, const int* item_ctx,
                                                   const u32* block_tables,
                                                   const int* item_table_off, int items,
                                                   int kv_heads) {
    if (++c.chunk < c.chunks) return;
    c.chunk = 0;
    if (++c.kvh < kv_heads) return;
    c.kvh = 0;
    if (++c.item < items) {
        c.ctx = item_ctx[c.item];
        c.chunks = (c.ctx + 15) >> 4;
        c.table = block_tables + item_table_off[c.item];
    }
}

#define DECODE_STREAM_PARAMS(R, MAP)                                                             \
    bf16_t *R out, float *R part_acc, float *R part_ml, const bf16_t *R qkv, MAP k_map,          \
        MAP v_map, const u32 *R block_tables,                                                    \
        const int *R item_rows, const int *R item_ctx, const int *R item_table_off,              \
        const int *R item_chunk_start, int items, int kv_heads,                                  \
        int tiles_per_warp, int max_parts, float scale_log2

template <int G, int WARPS, int S>
__device__ void paged_decode_stream_impl(DECODE_STREAM_PARAMS(__restrict__, const TensorMap*)) {
    static_assert(G >= 1 && G <= 8, "the group's heads are the 8 columns of the MMA");
    constexpr int D = 128, CH = 16;
    constexpr u32 TILE = CH * D * 2, STAGE = 2 * TILE;  // bytes: K's two boxes, then V's
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int heads = kv_heads * G;
    const int total = item_chunk_start[items] * kv_heads;
    const int run = blockIdx.x * WARPS + warp;
    const int first = run * tiles_per_warp;
    const int last = min(total, first + tiles_per_warp);  // [first, last)
    if (first >= last) return;

    // The rings, 1024-byte aligned as the swizzle atoms need, then an mbarrier a stage.
    extern __shared__ __align__(128) unsigned char decode_smem[];
    const u32 base = (smem_addr(decode_smem) + 1023u) & ~1023u;
    const u32 ring = base + warp * S * STAGE;
    const u32 bars = base + WARPS * S * STAGE + warp * S * 8;
    if (lane == 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) mbar_init(bars + 8 * s, 1);
        fence_mbar_init();
    }
    __syncwarp();

    // Tile `c` (one 16-token cache block, `block`) into stage `s`. Rows past the context hold
    // whatever the block holds (finite: the cache starts zeroed); their probabilities are zero.
    const unsigned long long policy = l2_evict_first_policy();
    auto issue = [&](const StreamCursor& c, u32 block, int s) {
        if (lane == 0) {
            const u32 dst = ring + s * STAGE, bar = bars + 8 * s;
            const int slot = (int)block * CH;
            mbar_arrive_expect_tx(bar, STAGE);
            tma_load_3d_hint(dst, k_map, bar, 0, c.kvh, slot, policy);
            tma_load_3d_hint(dst + TILE / 2, k_map, bar, 64, c.kvh, slot, policy);
            tma_load_3d_hint(dst + TILE, v_map, bar, 0, c.kvh, slot, policy);
            tma_load_3d_hint(dst + TILE + TILE / 2, v_map, bar, 64, c.kvh, slot, policy);
        }
    };

    StreamCursor ahead, cur;
    stream_cursor_at(ahead, first, item_chunk_start, item_ctx, block_tables, item_table_off,
                     items, kv_heads);
    cur = ahead;
    // The next tile's block id is loaded when a tile is issued, a tile before its use. (Loading
    // it LA = 4 tiles ahead by cp.async through shared memory was slower: NOTES.md.)
    u32 ahead_block = ahead.table[ahead.chunk];
    int issued = 0;  // tiles issued
    auto issue_next = [&](int s) {
        issue(ahead, ahead_block, s);
        ++issued;
        stream_cursor_next(ahead, item_ctx, block_tables, item_table_off, items, kv_heads);
        if (first + issued < last) ahead_block = ahead.table[ahead.chunk];
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (first + s < last) issue_next(s);
    }

    u32 qb[D / 16][2];
    float o[D / 16][4];
    float m[2], l[2];
    int pair_item = -1, pair_kvh = -1, pair_first = 0, pair_end = 0;
    // The finished pair's output (a whole pair) or part.
    auto flush = [&]() {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            l[j] += __shfl_xor_sync(0xffffffffu, l[j], 4);
            l[j] += __shfl_xor_sync(0xffffffffu, l[j], 8);
            l[j] += __shfl_xor_sync(0xffffffffu, l[j], 16);
        }
        const bool whole = pair_first >= first && pair_end <= last;
        const int part = run - pair_first / tiles_per_warp;
        const int row = item_rows[pair_item];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int hh = 2 * t + j;
            if (hh >= G) continue;
            const int h = pair_kvh * G + hh;
            if (whole) {
                const float inv = 1.0f / l[j];
                bf16_t* dst = out + ((size_t)row * heads + h) * D;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    dst[mt * 16 + g] = f2bf(o[mt][j] * inv);
                    dst[mt * 16 + g + 8] = f2bf(o[mt][2 + j] * inv);
                }
            } else {
                const size_t slot = ((size_t)pair_item * heads + h) * max_parts + part;
                float* acc = part_acc + slot * D;
#pragma unroll
                for (int mt = 0; mt < D / 16; ++mt) {
                    acc[mt * 16 + g] = o[mt][j];
                    acc[mt * 16 + g + 8] = o[mt][2 + j];
                }
                if (g == 0) {
                    part_ml[slot * 2] = m[j];
                    part_ml[slot * 2 + 1] = l[j];
                }
            }
        }
    };

    for (int i = 0; first + i < last; ++i) {
        const int s = i % S;
        // Refill the stage computed in the step before (read into registers there).
        if (first + i + S - 1 < last) issue_next((i + S - 1) % S);
        if (cur.item != pair_item || cur.kvh != pair_kvh) {
            if (pair_item >= 0) flush();
            pair_item = cur.item;
            pair_kvh = cur.kvh;
            pair_first = item_chunk_start[cur.item] * kv_heads + cur.kvh * cur.chunks;
            pair_end = pair_first + cur.chunks;
            // Q^T as B fragments: column g is head kvh * G + g (zero for g >= G).
            const size_t width = (size_t)(heads + 2 * kv_heads) * D;
            const u32* q = (const u32*)(qkv + item_rows[cur.item] * width +
                                        ((size_t)cur.kvh * G + min(g, G - 1)) * D);
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                qb[kk][0] = g < G ? q[kk * 8 + t] : 0u;
                qb[kk][1] = g < G ? q[kk * 8 + 4 + t] : 0u;
            }
#pragma unroll
            for (int mt = 0; mt < D / 16; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.0f;
            m[0] = m[1] = -1e30f;
            l[0] = l[1] = 0.0f;
        }
        mbar_wait(bars + 8 * s, (i / S) & 1);
        const u32 sk = ring + s * STAGE, sv = sk + TILE;
        // Every K and V fragment of the tile first (the asm statements keep their order, so
        // the V loads would otherwise wait behind the softmax).
        u32 ka[D / 16][4], va[D / 16][4];
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            ldsm_x4(ka[kk], sk + stream_tile_offset(lane & 15, kk * 2 + (lane >> 4)));
        }
#pragma unroll
        for (int mt = 0; mt < D / 16; ++mt) {
            ldsm_x4_trans(va[mt], sv + stream_tile_offset((lane & 7) + ((lane >> 4) & 1) * 8,
                                                          mt * 2 + ((lane >> 3) & 1)));
        }
        // S^T = K Q^T: rows tokens g, g + 8; columns heads 2t, 2t + 1 (two accumulators, so
        // that the 8 MMAs are two chains of 4; the kernel is bound by instructions issued, so no
        // more: NOTES.md).
        float sc[2][4];
#pragma unroll
        for (int c = 0; c < 2; ++c) sc[c][0] = sc[c][1] = sc[c][2] = sc[c][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) mma_bf16(sc[kk & 1], ka[kk], qb[kk][0], qb[kk][1]);
#pragma unroll
        for (int k = 0; k < 4; ++k) sc[0][k] += sc[1][k];
        const bool v0 = cur.chunk * CH + g < cur.ctx, v1 = cur.chunk * CH + g + 8 < cur.ctx;
        float r[2];
        u32 plo, phi;
        {
            float p[4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const float s0 = v0 ? sc[0][j] * scale_log2 : -1e30f;
                const float s1 = v1 ? sc[0][2 + j] * scale_log2 : -1e30f;
                float mx = fmaxf(s0, s1);
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
                const float mn = fmaxf(m[j], mx);
                r[j] = fast_exp2(m[j] - mn);
                m[j] = mn;
                p[j] = v0 ? fast_exp2(s0 - mn) : 0.0f;
                p[2 + j] = v1 ? fast_exp2(s1 - mn) : 0.0f;
                l[j] = l[j] * r[j] + p[j] + p[2 + j];
            }
            plo = movmatrix_trans(pack_bf2(p[0], p[1]));
            phi = movmatrix_trans(pack_bf2(p[2], p[3]));
        }
        // O^T += V^T P^T over the 16 tokens, 8 tiles of 16 dims; the accumulators rescaled only
        // when some head's maximum rose (after the first tiles of a pair, rarely).
        if (__any_sync(0xffffffffu, r[0] != 1.0f || r[1] != 1.0f)) {
#pragma unroll
            for (int mt = 0; mt < D / 16; ++mt) {
                o[mt][0] *= r[0];
                o[mt][1] *= r[1];
                o[mt][2] *= r[0];
                o[mt][3] *= r[1];
            }
        }
#pragma unroll
        for (int mt = 0; mt < D / 16; ++mt) mma_bf16(o[mt], va[mt], plo, phi);
        __syncwarp();  // every lane has read the stage; a later issue may overwrite it
        stream_cursor_next(cur, item_ctx, block_tables, item_table_off, items, kv_heads);
    }
    flush();
}

// paged_decode_stream_g{G}_w{WARPS}_s{S}: one block an SM, WARPS x 32 threads, dynamic shared
// memory `StreamVariant::smem_bytes` (host): 1 KiB of alignment, WARPS x S x 8 KiB stages and
// their mbarriers.
#define DECODE_STREAM_KERNEL(G, WARPS, S)                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)                                  \
        paged_decode_stream_g##G##_w##WARPS##_s##S(                                              \
            DECODE_STREAM_PARAMS(, const __grid_constant__ TensorMap)) {                         \
        paged_decode_stream_impl<G, WARPS, S>(                                                   \
            out, part_acc, part_ml, qkv, &k_map, &v_map, block_tables, item_rows, item_ctx,      \
            item_table_off, item_chunk_start, items, kv_heads, tiles_per_warp,                   \
            max_parts, scale_log2);                                                              \
    }

DECODE_STREAM_KERNEL(4, 8, 3)
DECODE_STREAM_KERNEL(4, 13, 2)
DECODE_STREAM_KERNEL(4, 12, 2)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Combines the parts of the (item, KV head) pairs a stream run did not cover alone. Block
// (item, head), D threads; the parts of a pair are the runs its tiles fall in.
extern "C" __global__ void paged_decode_stream_reduce(
    bf16_t* __restrict__ out, const float* __restrict__ part_acc, const float* __restrict__ part_ml,
    const int* __restrict__ item_rows, const int* __restrict__ item_ctx,
    const int* __restrict__ item_chunk_start, int heads, int kv_heads, int head_dim,
    int tiles_per_warp, int max_parts) {
    const int item = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const int chunks = (item_ctx[item] + 15) >> 4;
    const int kvh = h / (heads / kv_heads);
    const int pair_first = item_chunk_start[item] * kv_heads + kvh * chunks;
    const int parts = (pair_first + chunks - 1) / tiles_per_warp - pair_first / tiles_per_warp + 1;
    if (parts <= 1) return;
    const size_t p0 = ((size_t)item * heads + h) * max_parts;
    float mx = -1e30f;
    for (int s = 0; s < parts; ++s) mx = fmaxf(mx, part_ml[(p0 + s) * 2]);
    float lsum = 0.0f, a = 0.0f;
    for (int s = 0; s < parts; ++s) {
        const float r = exp2f(part_ml[(p0 + s) * 2] - mx);
        lsum += part_ml[(p0 + s) * 2 + 1] * r;
        a += part_acc[(p0 + s) * head_dim + d] * r;
    }
    out[(size_t)item_rows[item] * heads * head_dim + (size_t)h * head_dim + d] = f2bf(a / lsum);
}
