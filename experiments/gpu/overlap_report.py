"""Step executors side by side: reads `overlap_bench`'s JSON and writes one CSV row per blend
and executor with the step time, the speedup over sequential, and the overlap efficiency the
performance model's `partial:E` executor means by it:

    E = (sequential - measured) / (sequential - max(prefill alone, decode alone))

(1: the step costs the max of its parts; 0: their sum as the sequential executor runs it;
negative: slower than sequential). Blends without both parts have no E.

    python3 experiments/gpu/overlap_report.py experiments/gpu/overlap/step-executors.json \
        --out experiments/gpu/overlap/step-executors.csv
"""

import argparse
import csv
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench_json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = json.load(open(args.bench_json))
    rows = []
    for b in data["blends"]:
        seq = b["sequential_secs"]
        ideal = max(b["prefill_alone_secs"], b["decode_alone_secs"])
        both = b["prefill_tokens"] > 0 and b["decode_seqs"] > 0
        for e in b["executors"]:
            if "secs" not in e:
                continue
            eff = (seq - e["secs"]) / (seq - ideal) if both and seq > ideal else None
            rows.append({
                "prefill_tokens": b["prefill_tokens"], "decode_seqs": b["decode_seqs"],
                "decode_ctx": b["decode_ctx"], "executor": e["executor"],
                "sequential_ms": f"{1e3 * seq:.2f}", "ideal_max_ms": f"{1e3 * ideal:.2f}",
                "measured_ms": f"{1e3 * e['secs']:.2f}", "speedup": f"{seq / e['secs']:.3f}",
                "overlap_efficiency": "" if eff is None else f"{eff:.3f}",
            })
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = {}
    for r in rows:
        key = (r["prefill_tokens"], r["decode_seqs"])
        if key not in best or float(r["speedup"]) > float(best[key]["speedup"]):
            best[key] = r
    for (p, d), r in best.items():
        print(f"prefill {p:5} + decode {d:3}: best {r['executor']:18} {r['speedup']}x "
              f"(ideal {float(r['sequential_ms']) / float(r['ideal_max_ms']):.2f}x), "
              f"E = {r['overlap_efficiency'] or '-'}")


if __name__ == "__main__":
    main()
