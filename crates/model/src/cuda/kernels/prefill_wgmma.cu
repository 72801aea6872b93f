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

// Shared-memory writes of this thread (cp.async) visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

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

// Byte offset of the 16-byte chunk `c16` (dims 8 c16 .. 8 c16 + 7) of `row` in a swizzled
// 64-row x 128-dim tile.
__device__ __forceinline__ u32 swizzled_offset(int row, int c16) {
    return (u32)((c16 >> 3) * (64 * 128) + row * 128 + (((c16 & 7) ^ (row & 7)) << 4));
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

#pragma unroll
    for (int j = 0; j < HPW; ++j) {
        store_attention_rows<D>(out, (size_t)heads * D, h0 + wg * HPW + j, t, row0 + r_lo,
                                row0 + r_hi, pos_lo >= 0, pos_hi >= 0, o[j], l_lo[j], l_hi[j]);
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
