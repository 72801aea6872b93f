"""Speed of the model crate's CUDA path beside PyTorch on the same device, in one run.

Runs our `cuda_bench` binary (cuBLAS GEMMs, our paged attention kernels, whole steps of a
Llama-3-8B-shaped bf16 model with random weights), then the same measurements in PyTorch:
F.linear for the GEMMs, scaled_dot_product_attention (causal, GQA) for prefill attention and
an eager PyTorch Llama step over a contiguous KV cache for the whole steps. Prints a table with
the ratios and writes $OUT/bench.json.

    python3 experiments/gpu/bench_model.py --binary target/device/cuda_bench --out $OUT [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

H, HEADS, KV, D, INTER, VOCAB = 4096, 32, 8, 128, 14336, 128256


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def torch_kernels(ours):
    res = {}
    n = 2 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    res["copy_gbps"] = 2 * n / timed(lambda: y.copy_(x), 10) / 1e9
    del x, y
    gemms = []
    for g in ours["gemm"]:
        m, k, n = g["m"], g["k"], g["n"]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        secs = timed(lambda: F.linear(x, w), 20 if m >= 4096 else 50)
        gemms.append({"m": m, "k": k, "n": n, "name": g["name"], "secs": secs})
    res["gemm"] = gemms
    pre = []
    for p in ours["prefill_attention"]:
        s, L, start = p["seqs"], p["len"], p.get("start", 0)
        q = torch.randn(s, HEADS, L, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(s, KV, start + L, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        if start == 0:
            secs = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 10)
        else:
            # A chunk after a cached prefix: causal aligned to the bottom right.
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(L, start + L)
            secs = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), 10)
        pre.append({"seqs": s, "start": start, "len": L, "secs": secs})
    res["prefill_attention"] = pre
    dec = []
    for p in ours["decode_attention"]:
        b, ctx = p["batch"], p["ctx"]
        q = torch.randn(b, HEADS, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, KV, ctx, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        secs = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20)
        dec.append({"batch": b, "ctx": ctx, "secs": secs})
        del q, k, v
    res["decode_attention"] = dec
    torch.cuda.empty_cache()
    return res


class TorchLlama:
    """Eager PyTorch Llama step (fused qkv and gate|up weights, SDPA, contiguous KV cache)."""

    def __init__(self, layers):
        def w(*shape):
            return (torch.rand(*shape, device="cuda", dtype=torch.bfloat16) * 2 - 1) / shape[-1] ** 0.5
        self.embed = w(VOCAB, H)
        self.head = w(VOCAB, H)
        self.layers = [dict(qkv=w((HEADS + 2 * KV) * D, H), o=w(H, HEADS * D), gu=w(2 * INTER, H),
                            down=w(H, INTER), n1=torch.ones(H, device="cuda", dtype=torch.bfloat16),
                            n2=torch.ones(H, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
        self.norm = torch.ones(H, device="cuda", dtype=torch.bfloat16)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
        self.inv_freq = inv

    def rope(self, x, pos):
        f = pos[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # [T, D]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        rot = torch.cat([-x2, x1], -1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def step(self, tokens, start, caches):
        """tokens [B, T]; every sequence at positions start..start+T; caches [(K, V)] per layer
        with K [B, KV, ctx, D]."""
        B, T = tokens.shape
        pos = torch.arange(start, start + T, device="cuda")
        x = self.embed[tokens]  # [B, T, H]
        for layer, (kc, vc) in zip(self.layers, caches):
            h = F.rms_norm(x, (H,), layer["n1"], 1e-5)
            qkv = F.linear(h, layer["qkv"]).view(B * T, HEADS + 2 * KV, D)
            q = self.rope(qkv[:, :HEADS], pos.repeat(B)).view(B, T, HEADS, D).transpose(1, 2)
            k = self.rope(qkv[:, HEADS:HEADS + KV], pos.repeat(B)).view(B, T, KV, D).transpose(1, 2)
            v = qkv[:, HEADS + KV:].view(B, T, KV, D).transpose(1, 2)
            kc[:, :, start:start + T] = k
            vc[:, :, start:start + T] = v
            a = F.scaled_dot_product_attention(q, kc[:, :, :start + T], vc[:, :, :start + T],
                                               is_causal=T > 1 and start == 0, enable_gqa=True)
            x = x + F.linear(a.transpose(1, 2).reshape(B, T, HEADS * D), layer["o"])
            h = F.rms_norm(x, (H,), layer["n2"], 1e-5)
            gu = F.linear(h, layer["gu"])
            x = x + F.linear(F.silu(gu[..., :INTER]) * gu[..., INTER:], layer["down"])
        x = F.rms_norm(x[:, -1], (H,), self.norm, 1e-5)
        return F.linear(x, self.head).float()


def torch_steps(ours):
    layers = ours["steps"][0]["layers"]
    model = TorchLlama(layers)
    out = []
    for s in ours["steps"]:
        B, start, T = s["seqs"], s["start"], s["tokens"]
        caches = [(torch.zeros(B, KV, start + T, D, device="cuda", dtype=torch.bfloat16),
                   torch.zeros(B, KV, start + T, D, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
        tokens = torch.randint(3, VOCAB, (B, T), device="cuda")
        with torch.no_grad():
            secs = timed(lambda: model.step(tokens, start, caches), 5)
        out.append(dict(s, secs=secs))
        del caches
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t = time.time()
    cmd = [args.binary] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        print("cuda_bench FAILED", proc.returncode)
        sys.exit(1)
    ours = json.loads(proc.stdout)
    print(f"ours: {time.time() - t:.1f}s wall (startup {ours['startup_secs']:.2f}s)", flush=True)
    ref = torch_kernels(ours)
    ref["steps"] = torch_steps(ours)
    json.dump({"ours": ours, "torch": ref, "device": torch.cuda.get_device_name()},
              open(os.path.join(args.out, "bench.json"), "w"), indent=1)
    print(f"device {torch.cuda.get_device_name()}; copy GB/s ours {ours['copy_gbps']:.0f} torch {ref['copy_gbps']:.0f}")
    print("GEMM (ours cuBLAS vs torch F.linear): time ratio torch/ours (>= 0.95 is the goal)")
    for a, b in zip(ours["gemm"], ref["gemm"]):
        print(f"  {a['name']:8s} m={a['m']:5d}: ours {a['secs']*1e6:9.1f} us ({a['tflops']:4.0f} TFLOP/s)  "
              f"torch {b['secs']*1e6:9.1f} us  ratio {b['secs']/a['secs']:.3f}")
    print("Decode attention (paged, ours) vs HBM copy bandwidth (goal >= 0.85); torch SDPA on contiguous KV beside")
    for a, b in zip(ours["decode_attention"], ref["decode_attention"]):
        print(f"  b={a['batch']:4d} ctx={a['ctx']:5d}: ours {a['secs']*1e6:8.1f} us {a['gbps']:5.0f} GB/s = "
              f"{a['gbps']/ref['copy_gbps']:.2f} of copy; torch SDPA {b['secs']*1e6:8.1f} us")
        for v in a.get("variants", [])[1:]:
            print(f"      {v['kernel']:22s} {v['secs']*1e6:8.1f} us = {v['gbps']/ref['copy_gbps']:.2f} of copy, "
                  f"max|diff| vs default {v['max_abs_diff_vs_default']:.1e}, non-finite {v['non_finite']}")
    parts = ours.get("decode_attention_partitions", [])
    if parts:
        print("Decode attention on a green-context partition (the overlapped executor's memory lane)")
        for p in parts:
            print(f"  b={p['batch']:4d} ctx={p['ctx']:5d} on {p['sms']:3d} SMs: {p['secs']*1e6:8.1f} us "
                  f"{p['gbps']:5.0f} GB/s = {p['gbps']/ref['copy_gbps']:.2f} of copy")
    print("Prefill attention (paged, causal) vs torch SDPA: throughput ratio ours/torch (goal >= 0.70)")
    for a, b in zip(ours["prefill_attention"], ref["prefill_attention"]):
        print(f"  {a['seqs']}x{a['len']:5d} @{a.get('start', 0):5d}: ours {a['secs']*1e6:8.1f} us ({a['tflops']:4.0f} TFLOP/s) "
              f"torch {b['secs']*1e6:8.1f} us  ratio {b['secs']/a['secs']:.2f}  [{a.get('kernel', '')}]")
        for v in a.get("variants", []):
            print(f"      {v['kernel']:34s} {v['secs']*1e6:8.1f} us ({v['tflops']:4.0f} TFLOP/s) ratio {b['secs']/v['secs']:.2f}  "
                  f"max|diff| vs mma.sync {v['max_abs_diff_vs_mma_sync']:.1e}, non-finite {v['non_finite']}")
    for b in ours.get("prefill_block_sizes", []):
        print(f"  default kernel over blocks of {b['block_size']:3d} tokens: max|diff| vs mma.sync "
              f"{b['max_abs_diff_vs_mma_sync']:.1e}, non-finite {b['non_finite']}")
    peak = max(g["tflops"] for g in ours["gemm"]) * 1e12
    params = VOCAB * H + ours["steps"][0]["layers"] * (H * (HEADS + 2 * KV) * D + H * HEADS * D + 3 * H * INTER)
    print(f"Whole steps ({ours['steps'][0]['layers']} layers; roofline = max(weight + KV bytes / copy BW, linear-layer FLOPs / best GEMM rate {peak/1e12:.0f} TFLOP/s))")
    for a, b in zip(ours["steps"], ref["steps"]):
        tokens = a["seqs"] * a["tokens"]
        kv = a["seqs"] * (a["start"] + a["tokens"]) * a["layers"] * KV * D * 4
        roof = max((2 * params + kv) / (ref["copy_gbps"] * 1e9), 2 * params * tokens / peak)
        print(f"  {a['kind']:7s} {a['seqs']:3d}x{a['tokens']:4d} @{a['start']:5d}: ours {a['secs']*1e3:7.2f} ms  "
              f"torch {b['secs']*1e3:7.2f} ms  roofline {roof*1e3:6.2f} ms  ours/roofline {a['secs']/roof:.2f}  "
              f"torch/ours {b['secs']/a['secs']:.2f}")
        prof = a.get("profile_secs", {})
        if prof:
            total = sum(prof.values())
            print("      GPU time by operation: " + ", ".join(
                f"{op} {secs*1e3:.2f} ms ({100*secs/total:.0f}%)" for op, secs in sorted(prof.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
