#!/usr/bin/env python3
"""SM clock and board power per benchmark phase: lines up `nvidia-smi` samples with the
`phase NAME at UNIX_SECS` markers a benchmark prints on stderr (`gemm_lane_bench --sustain`).

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,\
clocks_event_reasons.active --format=csv,nounits -lms 20 > smi.csv &
    ./gemm_lane_bench --pairs-only --quick --sustain 2> log.txt; kill %1
    python3 experiments/gpu/clock_phases.py smi.csv log.txt [--json out.json]

Reasons are nvidia-smi's clock event bit masks (0x4: software power cap).
"""
import argparse
import csv
import datetime
import json
import re
import statistics


def samples(path):
    out = []
    for r in csv.reader(open(path)):
        if not r or r[0].startswith("timestamp"):
            continue
        try:
            t = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
        except ValueError:
            continue
        t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
        out.append({"t": t, "sm_mhz": float(r[1]), "power_w": float(r[3]),
                    "reasons": r[-1].strip()})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("smi")
    ap.add_argument("log")
    ap.add_argument("--json")
    args = ap.parse_args()
    smi = samples(args.smi)
    marks = []
    for line in open(args.log):
        m = re.match(r"phase (.+) at ([\d.]+)$", line.strip())
        if m:
            marks.append((m.group(1), float(m.group(2))))
    rows = []
    for (name, t0), (_, t1) in zip(marks, marks[1:]):
        if name == "end":
            continue
        # Skip the first 50 ms of a phase (the clock settles) and the last 20.
        s = [x for x in smi if t0 + 0.05 <= x["t"] <= t1 - 0.02]
        if not s:
            continue
        row = {"phase": name, "secs": t1 - t0,
               "sm_mhz": statistics.mean(x["sm_mhz"] for x in s),
               "sm_mhz_min": min(x["sm_mhz"] for x in s),
               "power_w": statistics.mean(x["power_w"] for x in s),
               "reasons": sorted({x["reasons"] for x in s}), "samples": len(s)}
        rows.append(row)
        print(f"{name:42} {row['secs']:5.2f} s  SM {row['sm_mhz']:5.0f} MHz "
              f"(min {row['sm_mhz_min']:4.0f})  {row['power_w']:4.0f} W  {','.join(row['reasons'])}")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
