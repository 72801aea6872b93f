// Addressing the paged K / V cache, shared by the decode and prefill attention kernels.

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
