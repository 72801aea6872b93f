"""Fit the performance model's hardware rates to a measured `blendserve run --timeline` CSV.

Each timeline row holds one engine step's work as the performance model counts it (GEMM FLOPs,
weight bytes, prefill-attention FLOPs and KV bytes, decode KV bytes) and its measured wall
time. The sequential executor prices a step as

    max(gemm_flops / F, weight_bytes / B) + max(prefill_attn_flops / FA, prefill_kv_bytes / B)
      + max(decode_attn_flops / F, decode_kv_bytes / B) + overhead

and this script finds the compute, attention and memory efficiencies (fractions of the
datasheet peak) and the per-step overhead that minimise the squared error over the steps
(coordinate descent on fine grids), then writes a `[hardware]` TOML for `--hardware-config` /
`blendserve sim --config`. Fit on some runs (one policy's run of each of several trace blends,
so that no one trace's mix of work decides the rates), predict the others: a model fitted to the
very run it predicts proves nothing.

    python3 experiments/gpu/calibrate.py TIMELINE.csv [MORE.csv ...] --out h100-fitted.toml
"""

import argparse
import csv

import numpy as np


def load(paths, skip):
    """The steps of every timeline, each leaving out its first `skip` (warm-up) steps."""
    rows = [r for path in paths for r in list(csv.DictReader(open(path)))[skip:]]
    cols = ["gemm_flops", "weight_bytes", "prefill_attention_flops", "prefill_kv_bytes",
            "decode_attention_flops", "decode_kv_bytes", "measured_secs"]
    return {c: np.array([float(r[c]) for r in rows]) for c in cols}


def predict(d, peak, bw, ce, me, ae, overhead):
    F, B, FA = peak * ce, bw * me, peak * ae
    return (np.maximum(d["gemm_flops"] / F, d["weight_bytes"] / B)
            + np.maximum(d["prefill_attention_flops"] / FA, d["prefill_kv_bytes"] / B)
            + np.maximum(d["decode_attention_flops"] / F, d["decode_kv_bytes"] / B)
            + overhead)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("timelines", nargs="+")
    ap.add_argument("--peak-flops", type=float, default=989e12)
    ap.add_argument("--bandwidth", type=float, default=3.35e12)
    ap.add_argument("--preset", default="h100")
    ap.add_argument("--name", default="h100-fitted")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps to leave out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    d = load(args.timelines, args.skip)
    sources = ", ".join(args.timelines)
    y = d["measured_secs"]
    grids = {
        "ce": np.linspace(0.3, 1.0, 141),
        "me": np.linspace(0.3, 1.0, 141),
        "ae": np.linspace(0.01, 1.0, 199),
        "overhead": np.linspace(0.0, 0.01, 201),
    }
    p = {"ce": 0.8, "me": 0.9, "ae": 0.8, "overhead": 0.0}

    def err(q):
        return float(np.sum((predict(d, args.peak_flops, args.bandwidth, **q) - y) ** 2))

    for _ in range(6):
        for k, grid in grids.items():
            best = min(grid, key=lambda v: err({**p, k: v}))
            p[k] = float(best)
    pred = predict(d, args.peak_flops, args.bandwidth, **p)
    total_err = pred.sum() / y.sum()
    print(f"fitted on {len(y)} steps of {sources}: compute {p['ce']:.3f}, memory "
          f"{p['me']:.3f}, prefill attention {p['ae']:.3f} of peak, overhead "
          f"{1e3 * p['overhead']:.2f} ms/step; summed prediction / measured = {total_err:.3f}")
    with open(args.out, "w") as f:
        f.write(f"# Fitted by experiments/gpu/calibrate.py to {sources}\n"
                f"# ({len(y)} steps; summed prediction / measured = {total_err:.3f}).\n"
                f"[hardware]\npreset = \"{args.preset}\"\nname = \"{args.name}\"\n"
                f"compute_efficiency = {p['ce']:.3f}\nmemory_efficiency = {p['me']:.3f}\n"
                f"attention_efficiency = {p['ae']:.3f}\n"
                f"step_overhead_secs = {p['overhead']:.5f}\n")


if __name__ == "__main__":
    main()
