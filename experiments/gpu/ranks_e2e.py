"""Issue 18 on one GPU: a workload run whole, then as 2 data-parallel ranks one after the other
on the same GPU (`run --rank K --ranks 2`), merged; each run beside the calibrated simulator's
prediction of it (`--predict`). Writes ranks_e2e.json: the times, the predictions and how many
result lines are identical to the single run's (`created` aside).

    python3 experiments/gpu/ranks_e2e.py --binary target/device/blendserve \
        --workload target/device/blend-mooncake-conv.jsonl --out $OUT \
        --extra "--hardware h200 --hardware-config experiments/gpu/h200/h200-calibrated.toml"
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from engine_e2e import write_model_dir  # noqa: E402


def run(args, model_dir, name, extra):
    out = os.path.join(args.out, f"out-{name}.jsonl")
    report = os.path.join(args.out, f"report-{name}.json")
    cmd = [args.binary, "run", "--device", "cuda", "--model", model_dir, "--random-weights",
           "--input", args.workload, "--output", out, "--predict", "--report", report] \
        + extra + args.extra.split()
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    sys.stderr.write(p.stderr[-1500:])
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    r = json.load(open(report))
    return out, {"name": name, "wall_secs": time.time() - t0, "elapsed_secs": r["elapsed_secs"],
                 "predicted_secs": r.get("predicted_secs"), "requests": r["requests"],
                 "prefix_hit_ratio": r["prefix_hit_ratio"]}


def lines(path):
    out = {}
    for line in open(path):
        v = json.loads(line)
        v["response"]["body"].pop("created", None)
        out[v["id"]] = v
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--extra", default="")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_dir = write_model_dir(args.out)
    single_out, single = run(args, model_dir, "single", [])
    rows, outs = [], []
    for k in range(args.ranks):
        out, r = run(args, model_dir, f"rank-{k}", ["--rank", str(k), "--ranks", str(args.ranks)])
        rows.append(r)
        outs.append(out)
    merged = os.path.join(args.out, "merged.jsonl")
    subprocess.run([args.binary, "merge", *outs, "--input", args.workload, "--out", merged],
                   check=True)
    a, b = lines(single_out), lines(merged)
    same = sum(1 for k, v in a.items() if b.get(k) == v)
    summary = {"single": single, "ranks": rows, "lines": len(a), "merged_lines": len(b),
               "identical_lines": same}
    json.dump(summary, open(os.path.join(args.out, "ranks_e2e.json"), "w"), indent=1)
    for r in [single] + rows:
        print(f"{r['name']:8} {r['requests']:5} requests  {r['elapsed_secs']:7.2f} s  predicted "
              f"{r['predicted_secs']:7.2f} s ({r['predicted_secs'] / r['elapsed_secs']:.3f})  "
              f"hits {100 * r['prefix_hit_ratio']:.1f}%")
    print(f"merged {len(b)} of {len(a)} lines; identical to the single run: {same}")
    for f in [single_out, *outs]:
        os.remove(f)


if __name__ == "__main__":
    main()
