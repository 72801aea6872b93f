#!/usr/bin/env python3
"""Issue 16's step-gain grid: `overlap_bench` over blends from all-prefill to all-decode at
decode contexts of 1k, 2k and 8k tokens (32-layer Llama-3-8B shape, random bf16 weights), the
sequential executor beside `overlap-auto` (the per-step planner) and two fixed SM splits, in one
run per context. Writes `h200-step-gain.json`: a list of objects

    {"prefill_tokens", "decodes", "context", "attention_over_gemm", "sequential_ms",
     "overlapped_ms", "gain", "memory_sms", "best_fixed", "best_fixed_gain"}

(`overlapped_ms` and `gain` are overlap-auto's; `attention_over_gemm` and `memory_sms` the
planner's), a CSV of the same rows, and each context's raw JSON and log.

    python3 experiments/gpu/overlap_grid.py --binary target/device/overlap_bench --out DIR
    python3 experiments/gpu/overlap_grid.py --from-raw --out DIR     # summary only
"""

import argparse
import csv
import json
import os
import subprocess

# (context, [(prefill tokens, decodes)]): decodes x context bounded by the cache (~100 GB).
GRID = [
    (1024, [(2048, 0), (2048, 64), (1024, 256), (512, 512), (256, 512), (0, 512)]),
    (2048, [(2048, 64), (1024, 256), (768, 320), (512, 320), (256, 320), (0, 320)]),
    (8192, [(2048, 32), (1024, 64), (512, 80), (256, 80), (0, 80)]),
]
EXECUTORS = "overlap-auto,overlap-gemm:24,overlap-gemm:32"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default="h200-step-gain")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--from-raw", action="store_true",
                    help="only rebuild the summary from the per-context JSON already in --out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for ctx, blends in GRID:
        raw = os.path.join(args.out, f"{args.name}-ctx{ctx}.json")
        if not args.from_raw:
            spec = ",".join(f"{p}:{d}" for p, d in blends)
            cmd = [args.binary, "--ctx", str(ctx), "--blends", spec, "--executors", EXECUTORS,
                   "--reps", str(args.reps)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            with open(raw, "w") as f:
                f.write(run.stdout)
            with open(os.path.join(args.out, f"{args.name}-ctx{ctx}.txt"), "w") as f:
                f.write(run.stderr)
        for b in json.load(open(raw))["blends"]:
            seq = b["sequential_secs"]
            by = {e["executor"]: e for e in b["executors"] if "secs" in e}
            auto = by["overlap-auto"]
            fixed = [e for name, e in by.items() if name != "overlap-auto"]
            best = min(fixed, key=lambda e: e["secs"]) if fixed else None
            rows.append({
                "prefill_tokens": b["prefill_tokens"], "decodes": b["decode_seqs"],
                "context": ctx, "attention_over_gemm": round(b["attention_over_gemm"], 4),
                "sequential_ms": round(seq * 1e3, 3), "overlapped_ms": round(auto["secs"] * 1e3, 3),
                "gain": round(seq / auto["secs"], 4), "memory_sms": auto.get("step_memory_sms"),
                "best_fixed": best["executor"] if best else None,
                "best_fixed_gain": round(seq / best["secs"], 4) if best else None,
                "greedy_equal": auto["greedy_equal"], "greedy_total": auto["greedy_total"],
            })
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, f"{args.name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(f"{r['prefill_tokens']:5} + {r['decodes']:3} x {r['context']:5}: "
              f"attn/gemm {r['attention_over_gemm']:5.2f}  seq {r['sequential_ms']:7.2f} ms  "
              f"auto {r['overlapped_ms']:7.2f} ms ({r['gain']:.3f}x, lane {r['memory_sms']})  "
              f"best fixed {r['best_fixed']} {r['best_fixed_gain']}")


if __name__ == "__main__":
    main()
