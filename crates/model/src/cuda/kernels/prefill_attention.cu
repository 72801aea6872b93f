// ---------------------------------------------------------------------------------------------
// Paged prefill attention (FlashAttention-2 style, bf16 tensor cores, mma.m16n8k16).
//
// Block (tile, head): 4 warps, 64 query rows of one sequence chunk (16 per warp), keys in tiles
// of 64 gathered from the paged cache (the sequence's earlier chunks and shared prefix blocks as
// well as this chunk's own keys, which `rope_write_kv` stored first). Causal: query at position
// p sees keys 0..=p. K and V are kept [key][dim] in shared memory (rows padded by 8 so the
// fragment loads are free of bank conflicts); K's fragments come by ldmatrix, V's transposed by
// ldmatrix.trans, four 8x8 matrices a load.

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
    store_attention_rows<D>(out, (size_t)heads * D, h, t, row0 + r_lo, row0 + r_hi, pos_lo >= 0,
                            pos_hi >= 0, &o[0][0], l_lo, l_hi);
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
