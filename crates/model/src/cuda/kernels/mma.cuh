// Tensor-core and asynchronous-copy building blocks shared by the attention kernels:
// mma.sync m16n8k16, cp.async, ldmatrix, and S = Q K^T over a K tile.

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

// 8 bytes global -> shared, asynchronous (the L1-allocating form: .cg takes only 16).
__device__ __forceinline__ void cp_async8(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}

// The end of a flash-attention row pair in the m16n8 accumulator layout, shared by the prefill
// kernels: sums each row's softmax denominator over its quad of lanes, divides the row pair's
// D / 2 accumulators `acc` (4 a tile of 8 dims: row lo twice, then row hi twice) by it and
// stores them as bf16 pairs at dims 8n + 2t of head `h` in rows `row_lo` / `row_hi` of `out`
// (`out_width` wide), leaving out a row whose `*_ok` is false (past the chunk).
template <int D>
__device__ __forceinline__ void store_attention_rows(bf16_t* __restrict__ out, size_t out_width,
                                                     int h, int t, int row_lo, int row_hi,
                                                     bool lo_ok, bool hi_ok, const float* acc,
                                                     float l_lo, float l_hi) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        int d = n * 8 + 2 * t;
        if (lo_ok) {
            u32* dst = (u32*)(out + (size_t)row_lo * out_width + (size_t)h * D + d);
            *dst = pack_bf2(acc[4 * n + 0] / l_lo, acc[4 * n + 1] / l_lo);
        }
        if (hi_ok) {
            u32* dst = (u32*)(out + (size_t)row_hi * out_width + (size_t)h * D + d);
            *dst = pack_bf2(acc[4 * n + 2] / l_hi, acc[4 * n + 3] / l_hi);
        }
    }
}
