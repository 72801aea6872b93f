"""`blendserve run` end to end on the device: fcfs, dfs and blendserve on one trace blend with a
Llama-3-8B-shaped bf16 random-weight model, each beside the simulator's prediction for the
very same run (`--predict`) and its optimal bound, then HF transformers' own batched
`generate` on a slice of the same workload as an outside reference. One call, one table.

    python3 experiments/gpu/engine_e2e.py --binary target/device/blendserve \
        --workload experiments/gpu/engine/data/blend-code-conv.jsonl --out $OUT

The workload is made on the build machine (the traces are not on the device):

    blendserve generate --workload 'azure-code=1,azure-conv=1' --requests 1000 \
        --prefix-ratio 0.5 --max-prompt-tokens 4096 --max-tokens 2048 --seed 7 \
        --out experiments/gpu/engine/data/blend-code-conv.jsonl

Requests replay their recorded output lengths (EOS ignored; the scheduler does not see the
lengths unless a run says `--lengths known`).
"""

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def write_model_dir(out):
    """A model folder holding only the Llama-3-8B-shaped config (`--random-weights` runs)."""
    model_dir = os.path.join(out, "llama3-8b-shape")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f)
    return model_dir


def run_policy(args, model_dir, name, policy, extra):
    out = os.path.join(args.out, f"out-{name}.jsonl")
    report = os.path.join(args.out, f"report-{name}.json")
    cmd = [args.binary, "run", "--device", "cuda", "--model", model_dir, "--random-weights",
           "--input", args.workload, "--output", out, "--policy", policy, "--predict",
           "--report", report, "--order", "completion",
           "--timeline", os.path.join(args.out, f"timeline-{name}.csv")] + extra
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.time() - t0
    sys.stderr.write(p.stderr[-3000:])
    if p.returncode != 0:
        return {"name": name, "error": p.stderr[-2000:]}
    with open(report) as f:
        r = json.load(f)
    ok = sum(1 for line in open(out) if '"status_code":200' in line)
    r.update({"name": name, "wall_secs": wall, "ok_lines": ok})
    os.remove(out)  # large, and the report holds what matters
    return r


def hf_reference(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    reqs = []
    for line in open(args.workload):
        r = json.loads(line)
        plen = len(r["prompt_token_ids"]) if "prompt_token_ids" in r else r["prompt_tokens"]
        reqs.append((plen, r["output_tokens"]))
    reqs = reqs[: args.hf_requests]
    # Batches of similar output length, HF's best case.
    reqs.sort(key=lambda x: x[1])
    config = LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    init_secs = time.time() - t0
    done_tokens = 0
    done_reqs = 0
    t0 = time.time()
    for i in range(0, len(reqs), args.hf_batch):
        if time.time() - t0 > args.hf_budget_secs:
            break
        batch = reqs[i : i + args.hf_batch]
        longest = max(p for p, _ in batch)
        new = max(o for _, o in batch)
        ids = torch.randint(256, 128000, (len(batch), longest), device="cuda")
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(batch):
            mask[j, longest - p :] = 1  # left padding
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        done_tokens += sum(p + o for p, o in batch)
        done_reqs += len(batch)
    secs = time.time() - t0
    return {"name": "hf-generate", "requests": done_reqs, "batch": args.hf_batch,
            "init_secs": init_secs, "elapsed_secs": secs,
            "total_tokens_per_sec": done_tokens / max(secs, 1e-9)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="fcfs,dfs,blendserve,blendserve-sampled")
    ap.add_argument("--extra", default="", help="more arguments for every run")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--hf-requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-budget-secs", type=float, default=60)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model_dir = write_model_dir(args.out)
    rows = []
    runs = {
        "fcfs": ("fcfs", ["--lengths", "max-tokens"]),
        "dfs": ("dfs", ["--lengths", "max-tokens"]),
        "blendserve": ("blendserve", ["--lengths", "max-tokens"]),
        "blendserve-sampled": ("blendserve", ["--lengths", "sampled"]),
        "blendserve-known": ("blendserve", ["--lengths", "known"]),
    }
    for name in args.runs.split(","):
        policy, extra = runs[name]
        rows.append(run_policy(args, model_dir, name, policy, extra + args.extra.split()))
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_hf:
        try:
            rows.append(hf_reference(args))
        except Exception as e:  # the reference must not lose the engine's results
            rows.append({"name": "hf-generate", "error": repr(e)})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "engine_e2e.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print()
    print(f"{'run':<20} {'secs':>7} {'tok/s':>8} {'out tok/s':>9} {'%opt':>6} "
          f"{'pred s':>7} {'pred/meas':>9} {'hit':>5} {'steps':>6} {'ok':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} ERROR {r['error'][-300:]}")
            continue
        if r["name"] == "hf-generate":
            print(f"{r['name']:<20} {r['elapsed_secs']:7.1f} {r['total_tokens_per_sec']:8.0f} "
                  f"({r['requests']} requests, batch {r['batch']})")
            continue
        print(f"{r['name']:<20} {r['elapsed_secs']:7.1f} {r['total_tokens_per_sec']:8.0f} "
              f"{r['output_tokens_per_sec']:9.0f} {r['percent_of_optimal'] or 0:6.1f} "
              f"{r['predicted_secs'] or 0:7.1f} {r['predicted_over_measured'] or 0:9.2f} "
              f"{100 * r['prefix_hit_ratio']:5.1f} {r['steps']:6d} {r['ok_lines']:5d}")


if __name__ == "__main__":
    main()
