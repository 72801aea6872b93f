// Greedy sampling and random weights.

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
