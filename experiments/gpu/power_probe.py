#!/usr/bin/env python3
"""Board power and SM clock of the minimal kernels, one phase each of about 1.5 s: a streaming
read (the overlap probe's kernel: 16-byte ld.global.nc, one 1024-thread block an SM) on k SMs, a
cuBLAS bf16 GEMM (torch, M 1024 x 4096 x 14336) on the whole GPU, and the two together (read on
32 SMs at high priority). Prints `phase NAME at UNIX_SECS` markers and each phase's bandwidth or
TFLOP/s on stderr, for `clock_phases.py` against nvidia-smi samples taken meanwhile.

    python3 experiments/gpu/power_probe.py 2> log.txt    (on the GPU machine)
"""
import sys
import time

import cupy as cp
import torch

READ = r'''
extern "C" __global__ void __launch_bounds__(1024, 1) read_stream(const uint4* __restrict__ src, unsigned long long n, unsigned int* out) {
  const int U = 8;
  unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned int acc = 0;
  for (; i + (U - 1) * stride < n; i += U * stride) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; u++)
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w) : "l"(src + i + u * stride));
#pragma unroll
    for (int u = 0; u < U; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
'''


def phase(name):
    print(f"phase {name} at {time.time():.3f}", file=sys.stderr, flush=True)


def main():
    kernel = cp.RawKernel(READ, "read_stream", options=("-arch=sm_90",))
    buf = torch.empty(4 << 30, dtype=torch.bfloat16, device="cuda")
    buf.uniform_()
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    nvec = buf.numel() * 2 // 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hi, lo = torch.cuda.Stream(priority=-5), torch.cuda.Stream()

    def read(blocks, stream):
        with cp.cuda.ExternalStream(stream.cuda_stream):
            kernel((blocks,), (1024,), (cp.uint64(buf.data_ptr()), cp.uint64(nvec),
                                        cp.uint64(sink.data_ptr())))

    a = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)

    def gemm(stream):
        with torch.cuda.stream(stream):
            torch.nn.functional.linear(a, w)

    def sustain(name, fn, work_per_call, unit, secs=1.5):
        fn()
        torch.cuda.synchronize()
        phase(name)
        t0, calls = time.time(), 0
        while time.time() - t0 < secs:
            for _ in range(20):
                fn()
            calls += 20
            torch.cuda.synchronize()
        dt = time.time() - t0
        print(f"{name}: {work_per_call * calls / dt / 1e12:.2f} {unit}", file=sys.stderr, flush=True)
        phase("end")
        time.sleep(0.5)

    read_bytes = nvec * 16
    gemm_flops = 2 * 1024 * 4096 * 14336
    time.sleep(1.0)
    phase("idle")
    time.sleep(1.0)
    phase("end")
    for k in (sms, 40, 32, 16):
        sustain(f"read on {k} SMs", lambda k=k: read(k, hi), read_bytes, "TB/s")
    sustain("cuBLAS GEMM on the whole GPU", lambda: gemm(lo), gemm_flops, "TFLOP/s")

    def both():
        read(32, hi)
        for _ in range(6):
            gemm(lo)

    sustain("read on 32 SMs beside 6 cuBLAS GEMMs", both, read_bytes, "TB/s (read)")


if __name__ == "__main__":
    main()
