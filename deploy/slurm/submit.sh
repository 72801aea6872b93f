#!/usr/bin/env bash
# Submits a blendserve batch to Slurm as N data-parallel ranks (a job array, one task a rank,
# each a GPU unless --sbatch says otherwise) and a merge that runs once every rank succeeded.
#
#   deploy/slurm/submit.sh --ranks 8 --input batch.jsonl --job-dir /shared/job1 \
#       [--bin /path/to/blendserve] [--sbatch "--partition=gpu --gres=gpu:1"] \
#       -- --model /models/llama3-8b --device cuda --step-executor overlap-auto
#
# The result lands in JOB_DIR/merged.jsonl (each rank's in JOB_DIR/rank-K.jsonl, logs beside
# them). Every path must be visible from the compute nodes. Prints the array and merge job ids.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ranks="" input="" job="" bin="blendserve" sbatch_args="--gres=gpu:1"
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks="$2"; shift 2 ;;
    --input) input="$2"; shift 2 ;;
    --job-dir) job="$2"; shift 2 ;;
    --bin) bin="$2"; shift 2 ;;
    --sbatch) sbatch_args="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown argument $1 (see the header for usage)" >&2; exit 2 ;;
  esac
done
if [ -z "$ranks" ] || [ -z "$input" ] || [ -z "$job" ]; then
  echo "submit.sh: --ranks, --input and --job-dir are required" >&2
  exit 2
fi
if ! [ "$ranks" -ge 1 ] 2>/dev/null; then
  echo "submit.sh: --ranks $ranks is not a rank count" >&2
  exit 2
fi
mkdir -p "$job"
job="$(cd "$job" && pwd)"
input="$(cd "$(dirname "$input")" && pwd)/$(basename "$input")"
[ -f "$input" ] || { echo "submit.sh: no input $input" >&2; exit 2; }
case "$bin" in */*) bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")" ;; esac
printf 'BLENDSERVE_BIN=%q\nBLENDSERVE_INPUT=%q\n' "$bin" "$input" > "$job/job.env"
printf '%s\n' "$@" > "$job/run-args"
[ $# -gt 0 ] || : > "$job/run-args"
# shellcheck disable=SC2086
array=$(sbatch --parsable --array=0-$((ranks - 1)) $sbatch_args \
  --output="$job/rank-%a.log" "$here/blendserve-rank.sbatch" "$job")
merge=$(sbatch --parsable --dependency=afterok:"$array" --output="$job/merge.log" \
  "$here/blendserve-merge.sbatch" "$job")
echo "array $array merge $merge"
