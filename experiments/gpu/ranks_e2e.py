"""Issue 18 on one GPU: a workload run whole, then as 2 data-parallel ranks one after the other
on the same GPU (`run --rank K --ranks 2`), merged; each run beside the calibrated simulator's
prediction of it (`--predict`). With `--shardings a,b`, the ranks run once per sharding (the
single run once). Writes ranks_e2e.json: the times, the predictions and how many result lines
are identical to the single run's (`created` aside).

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
    ap.add_argument("--shardings", default="blendserve",
                    help="comma list of `run --sharding` values, each run as its own set of ranks")
    ap.add_argument("--extra", default="")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_dir = write_model_dir(args.out)
    single_out, single = run(args, model_dir, "single", [])
    summary = {"single": single, "lines": 0, "shardings": {}}
    a = lines(single_out)
    summary["lines"] = len(a)
    for sharding in args.shardings.split(","):
        rows, outs = [], []
        for k in range(args.ranks):
            out, r = run(args, model_dir, f"{sharding}-rank-{k}",
                         ["--rank", str(k), "--ranks", str(args.ranks), "--sharding", sharding])
            rows.append(r)
            outs.append(out)
        merged = os.path.join(args.out, f"merged-{sharding}.jsonl")
        subprocess.run([args.binary, "merge", *outs, "--input", args.workload, "--out", merged],
                       check=True)
        b = lines(merged)
        same = sum(1 for k, v in a.items() if b.get(k) == v)
        summary["shardings"][sharding] = {
            "ranks": rows, "merged_lines": len(b), "identical_lines": same,
            "makespan_secs": max(r["elapsed_secs"] for r in rows),
            "predicted_makespan_secs": max(r["predicted_secs"] for r in rows)}
        for f in [merged, *outs]:
            os.remove(f)
    json.dump(summary, open(os.path.join(args.out, "ranks_e2e.json"), "w"), indent=1)
    rows = [single] + [r for v in summary["shardings"].values() for r in v["ranks"]]
    for r in rows:
        print(f"{r['name']:24} {r['requests']:5} requests  {r['elapsed_secs']:7.2f} s  predicted "
              f"{r['predicted_secs']:7.2f} s ({r['predicted_secs'] / r['elapsed_secs']:.3f})  "
              f"hits {100 * r['prefix_hit_ratio']:.1f}%")
    for name, v in summary["shardings"].items():
        print(f"{name}: ranks one after another; side by side {v['makespan_secs']:.2f} s "
              f"(predicted {v['predicted_makespan_secs']:.2f} s), "
              f"{single['elapsed_secs'] / v['makespan_secs']:.2f}x over the single run; merged "
              f"{v['merged_lines']} of {len(a)} lines, identical to the single run: "
              f"{v['identical_lines']}")
    os.remove(single_out)


if __name__ == "__main__":
    main()
