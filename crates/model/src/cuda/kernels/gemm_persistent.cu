// ---------------------------------------------------------------------------------------------
// Persistent bf16 GEMM for Hopper (sm_90a) that takes its CTA count: out[M, N] = x[M, K] · w[N, K]^T,
// all row-major (a Hugging Face linear layer), f32 accumulation, bf16 out. The compute lane of
// the overlapped executor runs it on the SMs the memory lane leaves (cuBLAS with an SM-count
// target scaled 1.3x worse than linear beside the decode lane, NOTES.md section 13).
//
// Grid: `ctas` blocks, one an SM, taking tiles of BM = 64 x CONSUMERS rows x BN columns from a
// global counter (rows fastest, so blocks running together share each weight tile through L2).
// Warp-specialised as CUTLASS's "cooperative" kernel:
//   warpgroup 0, one thread: the producer. For every k-block of 64 it waits for the stage to be
//     empty, then loads the x box (64 k x BM rows) and the w box (64 k x BN rows) by TMA into a
//     STAGES-deep ring (128-byte swizzled, the K-major layout wgmma reads), completing on the
//     stage's `full` mbarrier;
//   warpgroups 1 (and 2): the consumers, 64 rows of the tile each. Per k-block: wait `full`,
//     4 x wgmma m64nBNk16 with both operands from shared memory, commit, wait for the previous
//     k-block's MMAs and hand its stage back (one arrival a warp on `empty`). Then the epilogue
//     stores the accumulators as bf16 while the producer already fills the next tile's stages.
// Registers: setmaxnreg moves them from the producer (40) to the consumers (232).
// Batch invariance: an output element's sum runs over k in the same order (k-blocks of 64 in
// turn, 4 wgmma k-steps of 16 each) whatever the tile and the other rows, and K is never split,
// so a row's result does not depend on the batch it came in (`Gemm::set_batch_invariant`;
// `gemm_lane_bench` checks the tiles agree bit for bit).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

__device__ __forceinline__ void tma_load_2d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], "
        "[%1, {%3, %4}], [%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c0), "r"(c1)
        : "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void wgmma_wait_one() {
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}

template <int BN>
__device__ __forceinline__ void gemm_wgmma_k16(float* acc, unsigned long long da,
                                               unsigned long long db, int accumulate) {
    if constexpr (BN == 256) {
        wgmma_m64n256k16_ss(acc, da, db, accumulate);
    } else if constexpr (BN == 128) {
        wgmma_m64n128k16_ss(acc, da, db, accumulate);
    } else {
        static_assert(BN == 32, "tiles of 256, 128 or 32 columns");
        wgmma_m64n32k16_ss(acc, da, db, accumulate);
    }
}

template <int CONSUMERS, int BN, int STAGES, bool OUT_F32>
__device__ void gemm_persistent_impl(void* __restrict__ out, const TensorMap* x_map,
                                     const TensorMap* w_map, unsigned int* counters, int M, int N,
                                     int K) {
    constexpr int BM = 64 * CONSUMERS, BK = 64;
    constexpr u32 A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
    constexpr u32 STAGE_BYTES = A_BYTES + B_BYTES;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const u32 ring = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 full = ring + STAGES * STAGE_BYTES;  // STAGES mbarriers, then STAGES more
    const u32 empty = full + 8 * STAGES;
    // The tile whose first k-block a stage holds (written by the producer before it arms the
    // stage's `full` barrier; `tiles` says there are no more).
    int* stage_tile = reinterpret_cast<int*>(smem_raw + (empty + 8 * STAGES - smem_addr(smem_raw)));
    const int wg = threadIdx.x >> 7;
    const int m_blocks = (M + BM - 1) / BM, n_blocks = (N + BN - 1) / BN;
    const int tiles = m_blocks * n_blocks, k_blocks = (K + BK - 1) / BK;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, 4 * CONSUMERS);  // lane 0 of each consumer warp
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x != 0) return;
        // Tiles come from a counter (rows fastest) as blocks ask, not by block index: a block
        // that starts late (its SM busy with the memory lane's kernel) takes fewer.
        int it = 0;
        for (;;) {
            const int tile = (int)atomicAdd(&counters[0], 1u);
            const int s = it % STAGES;
            const u32 phase = (u32)(it / STAGES) & 1u;
            // A fresh barrier's "previous" phase counts as complete: the first pass through
            // the ring does not wait.
            mbar_wait(empty + 8 * s, phase ^ 1u);
            if (tile >= tiles) {
                stage_tile[s] = tiles;
                mbar_arrive(full + 8 * s);
                // The last block out resets the counters for the next launch on the stream.
                if (atomicAdd(&counters[1], 1u) == gridDim.x - 1) {
                    counters[0] = 0;
                    counters[1] = 0;
                }
                return;
            }
            const int mb = tile % m_blocks, nb = tile / m_blocks;
            for (int kb = 0; kb < k_blocks; ++kb, ++it) {
                const int s = it % STAGES;
                if (kb > 0) mbar_wait(empty + 8 * s, ((u32)(it / STAGES) & 1u) ^ 1u);
                if (kb == 0) stage_tile[s] = tile;
                mbar_arrive_expect_tx(full + 8 * s, STAGE_BYTES);
                const u32 dst = ring + s * STAGE_BYTES;
                tma_load_2d(dst, x_map, full + 8 * s, kb * BK, mb * BM);
                tma_load_2d(dst + A_BYTES, w_map, full + 8 * s, kb * BK, nb * BN);
            }
        }
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    float acc[BN / 2];
    int it = 0;
    for (;;) {
        const int s0 = it % STAGES;
        mbar_wait(full + 8 * s0, (u32)(it / STAGES) & 1u);
        const int tile = stage_tile[s0];
        if (tile >= tiles) break;
        const int mb = tile % m_blocks, nb = tile / m_blocks;
        for (int kb = 0; kb < k_blocks; ++kb, ++it) {
            const int s = it % STAGES;
            if (kb > 0) mbar_wait(full + 8 * s, (u32)(it / STAGES) & 1u);
            const u32 a = ring + s * STAGE_BYTES + cw * 64 * 128;
            const u32 b = ring + s * STAGE_BYTES + A_BYTES;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                gemm_wgmma_k16<BN>(acc, wgmma_desc(a + kk * 32, 16, 1024),
                                   wgmma_desc(b + kk * 32, 16, 1024), kb > 0 || kk > 0);
            }
            wgmma_commit();
            // The previous k-block's MMAs are done: its stage goes back to the producer.
            wgmma_wait_one();
            if (kb > 0 && lane == 0) mbar_arrive(empty + 8 * ((it - 1) % STAGES));
        }
        wgmma_wait_all();
        if (lane == 0) mbar_arrive(empty + 8 * ((it - 1) % STAGES));
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) reg_fence(acc[i]);
        // Accumulator layout (as mma.m16n8's C per 8 columns): rows 16 warp + g and + 8,
        // columns 8 i + 2 t and + 1.
        const int r_lo = mb * BM + cw * 64 + warp * 16 + g, r_hi = r_lo + 8;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            const int col = nb * BN + 8 * i + 2 * t;
            if (col < N) {
                if constexpr (OUT_F32) {
                    float* o = reinterpret_cast<float*>(out);
                    if (r_lo < M) {
                        *(float2*)(o + (size_t)r_lo * N + col) =
                                make_float2(acc[4 * i], acc[4 * i + 1]);
                    }
                    if (r_hi < M) {
                        *(float2*)(o + (size_t)r_hi * N + col) =
                                make_float2(acc[4 * i + 2], acc[4 * i + 3]);
                    }
                } else {
                    bf16_t* o = reinterpret_cast<bf16_t*>(out);
                    if (r_lo < M) {
                        *(u32*)(o + (size_t)r_lo * N + col) = pack_bf2(acc[4 * i], acc[4 * i + 1]);
                    }
                    if (r_hi < M) {
                        *(u32*)(o + (size_t)r_hi * N + col) =
                                pack_bf2(acc[4 * i + 2], acc[4 * i + 3]);
                    }
                }
            }
        }
    }
}

// gemm_persistent_m{64 CONSUMERS}_n{BN}: grid (ctas), 128 (1 + CONSUMERS) threads, dynamic
// shared memory `PersistentTile::smem_bytes` (gemm_persistent.rs); x_map / w_map: 2-d TMA
// descriptors of x [M, K] and w [N, K] with boxes of 64 x 64 CONSUMERS and 64 x BN, 128-byte
// swizzled; `counters`: two zeroed words only this stream's launches use (left zeroed).
#define GEMM_PERSISTENT_KERNEL(NAME, CONSUMERS, BN, STAGES, OUT_F32)                            \
    extern "C" __global__ void __launch_bounds__(128 * (1 + CONSUMERS), 1) NAME(               \
            void* out, const __grid_constant__ TensorMap x_map,                                \
            const __grid_constant__ TensorMap w_map, unsigned int* counters, int M, int N,     \
            int K) {                                                                           \
        gemm_persistent_impl<CONSUMERS, BN, STAGES, OUT_F32>(out, &x_map, &w_map, counters, M, \
                                                              N, K);                           \
    }

GEMM_PERSISTENT_KERNEL(gemm_persistent_m128_n256, 2, 256, 4, false)
GEMM_PERSISTENT_KERNEL(gemm_persistent_m128_n128, 2, 128, 6, false)
GEMM_PERSISTENT_KERNEL(gemm_persistent_m64_n256, 1, 256, 5, false)
// Few rows (decode steps): narrow tiles, so that enough blocks stream the weights.
GEMM_PERSISTENT_KERNEL(gemm_persistent_m64_n32, 1, 32, 8, false)
// f32 out (the logits) on the tile batch-invariant runs use for every GEMM.
GEMM_PERSISTENT_KERNEL(gemm_persistent_m128_n128_f32, 2, 128, 6, true)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
