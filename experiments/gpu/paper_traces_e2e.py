#!/usr/bin/env python3
"""Issue 17's table: the paper's traces #1-#4 through `blendserve run` on the GPU, fcfs / dfs /
blendserve, each under the sequential step executor and under `overlap-auto` with the policies
pricing steps as overlapped (`--executor max`: BlendServe's design point; the `h200` cost model
caps it by the board's power), each with `--predict` from the calibrated simulator and its
optimal bound. Llama-3-8B shape, bf16, random weights.

    python3 experiments/gpu/paper_traces_e2e.py --binary target/device/blendserve \
        --traces 'trace1=target/device/paper/trace1.jsonl,...' \
        --hardware-config experiments/gpu/h200/h200-calibrated.toml --out $OUT

The workloads are made on the build machine (`blendserve generate --workload paper-traceN
--hardware h200 ...`: the traces are not on the device). fcfs and dfs see `max_tokens`,
blendserve samples lengths (its default). Writes $OUT/h200-paper-traces.json, a list of
{"trace", "policy", "step_executor", "secs", "tokens_per_sec", "prefix_hit_ratio",
"percent_of_optimal", "predicted_secs", ...}.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from engine_e2e import write_model_dir

EXECUTORS = {
    "sequential": ["--step-executor", "sequential", "--executor", "sum"],
    "overlap-auto": ["--step-executor", "overlap-auto", "--executor", "max"],
}


def run(args, model_dir, trace, path, policy, executor):
    name = f"{trace}-{policy}-{executor}"
    out = os.path.join(args.out, f"out-{name}.jsonl")
    report = os.path.join(args.out, f"report-{name}.json")
    cmd = [args.binary, "run", "--device", "cuda", "--model", model_dir, "--random-weights",
           "--input", path, "--output", out, "--policy", policy, "--predict", "--report", report,
           "--order", "completion", "--hardware-config", args.hardware_config] + EXECUTORS[executor]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    row = {"trace": trace, "policy": policy, "step_executor": executor, "wall_secs": wall}
    if p.returncode != 0:
        row["error"] = p.stderr[-1500:]
        return row
    r = json.load(open(report))
    ok = sum(1 for line in open(out) if '"status_code":200' in line)
    os.remove(out)
    row.update({
        "secs": r["elapsed_secs"],
        "tokens_per_sec": r["total_tokens_per_sec"],
        "prefix_hit_ratio": r["prefix_hit_ratio"],
        "percent_of_optimal": r["percent_of_optimal"],
        "predicted_secs": r["predicted_secs"],
        "optimal_bound_secs": r["optimal_bound_secs"],
        "requests": r["requests"], "ok_lines": ok, "steps": r["steps"],
        "lengths": r["lengths"], "executor": r["executor"],
        "sample_secs": r["sample_secs"],
    })
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--traces", required=True, help="name=path,...")
    ap.add_argument("--hardware-config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policies", default="fcfs,dfs,blendserve")
    ap.add_argument("--executors", default="sequential,overlap-auto")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--json-name", default="h200-paper-traces.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_dir = write_model_dir(args.out)
    rows = []
    for item in args.traces.split(","):
        trace, path = item.split("=", 1)
        for executor in args.executors.split(","):
            for policy in args.policies.split(","):
                rows.append(run(args, model_dir, trace, path, policy, executor))
                print(json.dumps(rows[-1]), flush=True)
                with open(os.path.join(args.out, args.json_name), "w") as f:
                    json.dump(rows, f, indent=1)
    print(f"\n{'trace':<8} {'policy':<11} {'executor':<13} {'secs':>7} {'tok/s':>7} {'hit':>6} "
          f"{'%opt':>6} {'pred':>7} {'pred/meas':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['trace']:<8} {r['policy']:<11} {r['step_executor']:<13} ERROR {r['error'][-200:]}")
            continue
        print(f"{r['trace']:<8} {r['policy']:<11} {r['step_executor']:<13} {r['secs']:7.2f} "
              f"{r['tokens_per_sec']:7.0f} {100 * r['prefix_hit_ratio']:5.1f}% "
              f"{r['percent_of_optimal'] or 0:6.1f} {r['predicted_secs'] or 0:7.2f} "
              f"{(r['predicted_secs'] or 0) / r['secs']:9.3f}")


if __name__ == "__main__":
    sys.exit(main())
