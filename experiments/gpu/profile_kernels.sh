#!/usr/bin/env bash
# Nsight Compute sections and stall reasons of the attention kernels beside torch SDPA's
# (cuDNN's flash kernel on the H100), on the device:
#   bash experiments/gpu/profile_kernels.sh target/device/cuda_bench $OUT
# (one launch each; `cuda_bench --profile-kernels` runs the cases; KERNELS="..." picks others).
# Clocks left alone. Results of session 7: experiments/gpu/ncu/, notes in experiments/NOTES.md.
set -u
bin=$1
out=$2
mkdir -p "$out"
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats
          --section SchedulerStats --section InstructionStats
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,sm__cycles_elapsed.avg")
for k in ${KERNELS:-paged_prefill_wgmma_h2x1_tma paged_prefill_wgmma_h2x1_tma_k128_pingpong paged_decode_g4_d128}; do
    ncu --clock-control none -k "regex:^${k}\$" -c 1 "${sections[@]}" "$bin" --profile-kernels \
        > "$out/ncu-$k.txt" 2>&1
    echo "$k: rc=$?"
done
cat > /tmp/sdpa.py <<'PY'
import torch
import torch.nn.functional as F
q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
for _ in range(3):
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
torch.cuda.synchronize()
PY
ncu --clock-control none -k "regex:(?i)(flash|fmha|attn|attention|sdpa)" -c 1 "${sections[@]}" \
    python3 /tmp/sdpa.py > "$out/ncu-torch-sdpa.txt" 2>&1
echo "torch sdpa: rc=$?"
# Per-instruction stall sampling of the default prefill kernel (SASS with source lines), the
# 60 instructions with the most samples: PROFILE_SOURCE=1.
if [ -n "${PROFILE_SOURCE:-}" ]; then
    BLENDSERVE_NVRTC_LINEINFO=1 ncu --clock-control none -k "regex:^paged_prefill_wgmma_h2x1_tma\$" -c 1 \
        --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
        "$bin" --profile-kernels > "$out/ncu-source-h2x1_tma.csv" 2> "$out/ncu-source.err"
    echo "source: rc=$?"
    python3 - "$out/ncu-source-h2x1_tma.csv" > "$out/ncu-source-top.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if any("Source" in c for c in r))
cols = rows[head]
print(cols)
def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0
key = next((i for i, c in enumerate(cols) if "Warp Stall Sampling (All" in c), None)
body = [r for r in rows[head + 1:] if len(r) == len(cols)]
total = sum(num(r[key]) for r in body) if key is not None else 0
print("instructions", len(body), "samples", total)
for r in sorted(body, key=lambda r: -num(r[key]))[:60]:
    print(f"{num(r[key]) / max(total, 1) * 100:5.1f}% | " + " | ".join(r[:3]))
PY
fi
