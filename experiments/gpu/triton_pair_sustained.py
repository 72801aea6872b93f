#!/usr/bin/env python3
"""Issue 16's deciding measurement: does the Triton persistent-GEMM + streaming-read pair of
`shared/tools/persistent_gemm_probe.py` keep its 1.24-1.38x when every phase lasts long enough
for the board's power limiter (>= 0.5 s), and against which baseline?

Same two kernels as the probe (the read from `power_probe.py`; a plain persistent Triton matmul on 132 - k programs; a 16-byte
`ld.global.nc` streaming read holding exactly k SMs on a high-priority stream). Each phase is
repeated until it lasts ~`--phase-secs`; printed: the whole-GPU Triton GEMM, the whole-GPU cuBLAS
GEMM of the same shape, the whole-GPU read, and the pair, all sustained, with `phase NAME at T`
markers on stderr for `clock_phases.py`. Gains: back to back (Triton GEMM + read, as the probe
counts) over the pair, and back to back with cuBLAS (the best sequential step) over the pair.

usage: python3 triton_pair_sustained.py [--phase-secs 0.6] [--ms 2048,4096] [--ks 24,32,40]
"""
import argparse
import json
import os
import time

import cupy as cp
import torch
import triton
import triton.language as tl

# The streaming-read kernel and the phase markers `clock_phases.py` reads.
from power_probe import READ, phase


@triton.jit
def mm_persistent(a_ptr, w_ptr, c_ptr, M, N, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in range(pid, num_tiles, NUM_PROGS):
        group = tile // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        gsize = min(num_pid_m - first_m, GROUP_M)
        pm = first_m + (tile % gsize)
        pn = (tile % (GROUP_M * num_pid_n)) // gsize
        rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
        w_ptrs = w_ptr + rn[None, :] * K + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, k_tiles):
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16))


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase-secs", type=float, default=0.6)
    ap.add_argument("--ms", default="2048,4096")
    ap.add_argument("--ks", default="24,32,40")
    ap.add_argument("--cfg", default="128,256,64,8,3", help="BLOCK_M,BLOCK_N,BLOCK_K,warps,stages")
    args = ap.parse_args()
    bm, bn, bk, nw, ns = (int(x) for x in args.cfg.split(","))
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    rk = cp.RawKernel(READ, "read_stream", options=("-arch=sm_90",))
    buf = torch.empty(4 << 30, dtype=torch.bfloat16, device="cuda")
    buf.uniform_()
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    nvec = buf.numel() * 2 // 16
    default = torch.cuda.current_stream().cuda_stream
    hi, lo = torch.cuda.Stream(priority=-5), torch.cuda.Stream()

    def read(blocks, stream, reps):
        with cp.cuda.ExternalStream(stream):
            for _ in range(reps):
                rk((blocks,), (1024,), (cp.uint64(buf.data_ptr()), cp.uint64(nvec), cp.uint64(sink.data_ptr())))

    phase("idle")
    time.sleep(1.0)
    out = []
    for m in (int(x) for x in args.ms.split(",")):
        n, k_dim = 14336, 4096
        a = torch.randn(m, k_dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k_dim, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * n * k_dim

        def gemm(progs, reps):
            for _ in range(reps):
                mm_persistent[(progs,)](a, w, c, m, n, k_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                        GROUP_M=8, NUM_PROGS=progs, num_warps=nw, num_stages=ns)

        def cublas(reps):
            for _ in range(reps):
                torch.nn.functional.linear(a, w)

        gemm(nsm, 3)
        cublas(3)
        read(nsm, default, 1)
        one_gemm = timed(lambda: gemm(nsm, 20)) / 20
        one_read = timed(lambda: read(nsm, default, 3)) / 3
        g_reps = max(4, int(args.phase_secs / one_gemm))
        r_reps = max(1, round(g_reps * one_gemm / one_read))
        c_reps = g_reps
        row = {"M": m, "gemm_reps": g_reps, "read_reps": r_reps}
        phase(f"M{m}-triton-full")
        row["triton_full_s"] = timed(lambda: gemm(nsm, g_reps))
        phase(f"M{m}-cublas-full")
        row["cublas_full_s"] = timed(lambda: cublas(c_reps))
        phase(f"M{m}-read-full")
        row["read_full_s"] = timed(lambda: read(nsm, default, r_reps))
        phase("gap")
        time.sleep(0.3)
        tflops = flops * g_reps / row["triton_full_s"] / 1e12
        cub = flops * c_reps / row["cublas_full_s"] / 1e12
        tbps = buf.numel() * 2 * r_reps / row["read_full_s"] / 1e12
        print(f"M={m}: sustained Triton {tflops:.0f} TFLOP/s, cuBLAS {cub:.0f}, read {tbps:.2f} TB/s "
              f"({row['triton_full_s']:.2f} / {row['cublas_full_s']:.2f} / {row['read_full_s']:.2f} s)", flush=True)
        for k in (int(x) for x in args.ks.split(",")):
            progs = nsm - k

            def both():
                read(k, hi.cuda_stream, r_reps)
                with torch.cuda.stream(lo):
                    gemm(progs, g_reps)

            phase(f"M{m}-k{k}-triton-part")
            t_part = timed(lambda: gemm(progs, g_reps))
            phase(f"M{m}-k{k}-pair")
            t_pair = timed(both)
            phase("gap")
            time.sleep(0.3)
            r = dict(row, k=k, triton_part_s=t_part, pair_s=t_pair,
                     gain_vs_triton_seq=(row["triton_full_s"] + row["read_full_s"]) / t_pair,
                     gain_vs_cublas_seq=(row["cublas_full_s"] + row["read_full_s"]) / t_pair,
                     part_of_linear=row["triton_full_s"] * nsm / progs / t_part)
            out.append(r)
            print(f"  k={k}: Triton on {progs} progs {t_part:.3f} s ({r['part_of_linear']:.2f} of linear) | "
                  f"pair {t_pair:.3f} s | gain over Triton+read {r['gain_vs_triton_seq']:.3f}x, "
                  f"over cuBLAS+read {r['gain_vs_cublas_seq']:.3f}x", flush=True)
    phase("end")
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "triton-pair-sustained.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
