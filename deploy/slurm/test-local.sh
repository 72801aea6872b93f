#!/usr/bin/env bash
# The Slurm path for real (CI runs it): a one-node cluster on this machine, a small batch on
# the bundled CPU demo model submitted as 3 ranks with submit.sh, and the merged output checked
# against a single-process run line for line (`created` aside). Needs root, Debian's slurm-wlm
# and munge packages (installed if missing and apt-get works) and python3.
#   deploy/slurm/test-local.sh target/release/blendserve
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$(dirname "${1:?usage: test-local.sh BLENDSERVE_BINARY}")" && pwd)/$(basename "$1")"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
fi
work="$(mktemp -d /tmp/blendserve-slurm.XXXXXX)"
cleanup() { "$here/local-cluster.sh" "$work/cluster" stop || true; }
trap cleanup EXIT
eval "$("$here/local-cluster.sh" "$work/cluster")"
python3 - "$work/batch.jsonl" <<'PY'
import json, sys
prompts = ["You are a helpful assistant. Translate to French: good morning",
           "You are a helpful assistant. Translate to French: good night",
           "Summarise: the quick brown fox jumps over the lazy dog",
           "Summarise: a stitch in time saves nine", "Count: one two three four",
           "Count: five six seven eight nine ten", "You are a helpful assistant. Say hello"]
with open(sys.argv[1], "w") as f:
    for i, p in enumerate(prompts):
        body = {"model": "demo", "prompt": p, "max_tokens": 12}
        f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
                            "body": body}) + "\n")
PY
"$bin" run --input "$work/batch.jsonl" --output "$work/single.jsonl" 2>/dev/null
ids=$("$here/submit.sh" --ranks 3 --input "$work/batch.jsonl" --job-dir "$work/job" \
  --bin "$bin" --sbatch "")
echo "slurm: $ids"
merge_id="${ids##* }"
for _ in $(seq 300); do
  state=$(scontrol show job "$merge_id" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)
  case "$state" in
    JobState=COMPLETED) break ;;
    JobState=FAILED|JobState=CANCELLED|JobState=TIMEOUT|JobState=NODE_FAIL)
      echo "merge job $state" >&2; cat "$work"/job/*.log >&2; exit 1 ;;
  esac
  sleep 1
done
python3 - "$work/single.jsonl" "$work/job/merged.jsonl" <<'PY'
import json, sys
def lines(path):
    out = []
    for l in open(path):
        v = json.loads(l)
        v["response"]["body"].pop("created", None)
        out.append(v)
    return out
a, b = lines(sys.argv[1]), lines(sys.argv[2])
assert len(a) == len(b) == 7, (len(a), len(b))
assert a == b, "the merged output differs from the single run"
print(f"slurm: 3 ranks merged into {len(b)} results, equal to the single run line for line")
PY
