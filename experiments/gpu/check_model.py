"""GPU check of the model crate against Hugging Face transformers (run on the device machine).

Builds random-weight models with transformers itself (so the folder layout, tensor names and
config are HF's own), runs our `model_check` binary on them (paged, chunked, mixed-batch prefill,
then greedy decode through the paged cache), computes the same with transformers in float32
from the same weights, and compares last-position logits (relative L2 error) and greedy tokens.

    python3 experiments/gpu/check_model.py --binary target/device/model_check --out $OUT \
        [--devices cuda,cpu] [--big-layers 4]

Writes $OUT/check.json and prints a table.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


import transformers

V5 = int(transformers.__version__.split(".")[0]) >= 5


def rope(theta, scaling):
    """RoPE settings in the form this transformers version expects."""
    if V5:
        params = {"rope_type": "default", "rope_theta": theta} if scaling is None else dict(scaling, rope_theta=theta)
        return {"rope_parameters": params}
    return {"rope_theta": theta, "rope_scaling": scaling}


def make_models(root, big_layers):
    torch.manual_seed(0)
    specs = []
    tiny_llama = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        **rope(500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    )
    specs.append(("tiny-llama", LlamaForCausalLM, tiny_llama, torch.float32))
    tiny_qwen = Qwen2Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, use_sliding_window=False,
    )
    specs.append(("tiny-qwen2", Qwen2ForCausalLM, tiny_qwen, torch.float32))
    if big_layers > 0:
        big = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_hidden_layers=big_layers, num_attention_heads=32, num_key_value_heads=8,
            max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
            **rope(500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        )
        specs.append((f"llama3-8b-shape-{big_layers}l-bf16", LlamaForCausalLM, big, torch.bfloat16))
    made = []
    for name, cls, config, dtype in specs:
        path = os.path.join(root, name)
        with torch.device("cuda"):
            model = cls(config).to(dtype)
        model.save_pretrained(path, safe_serialization=True)
        del model
        torch.cuda.empty_cache()
        with open(os.path.join(path, "config.json")) as f:
            print(name, "config.json:", f.read().replace("\n", " ")[:600], flush=True)
        made.append((name, cls, path, config.vocab_size))
    return made


def reference(cls, path, prompts, steps, dtype=torch.float32):
    try:
        model = cls.from_pretrained(path, dtype=dtype)
    except TypeError:
        model = cls.from_pretrained(path, torch_dtype=dtype)
    model = model.cuda().eval()
    last, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            logits = model(ids).logits[0, -1].float()
            last.append(logits.cpu())
            tokens = []
            for _ in range(steps):
                nxt = int(model(ids).logits[0, -1].argmax())
                tokens.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]], device="cuda")], dim=1)
            greedy.append(tokens)
    del model
    torch.cuda.empty_cache()
    return last, greedy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--big-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt-lengths", default="5,37,100,300")
    ap.add_argument("--binary-timeout", type=int, default=200)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    root = "/tmp/bs-models"
    os.makedirs(root, exist_ok=True)
    results = []
    t0 = time.time()
    models = make_models(root, args.big_layers)
    print(f"made {len(models)} models in {time.time() - t0:.1f}s", flush=True)
    for name, cls, path, vocab in models:
        g = torch.Generator().manual_seed(1)
        lengths = [int(n) for n in args.prompt_lengths.split(",")]
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        prompt_file = os.path.join(path, "prompts.json")
        with open(prompt_file, "w") as f:
            json.dump(prompts, f)
        ref_last, ref_greedy = reference(cls, path, prompts, args.steps)
        # transformers itself in bf16: how far a bf16 computation lands from the f32 reference.
        bf_last, _ = reference(cls, path, prompts, 0, torch.bfloat16)
        for device in args.devices.split(","):
            out_file = os.path.join(path, f"ours-{device.replace(':', '-')}.json")
            t = time.time()
            try:
                # `cuda@EXECUTOR`: the CUDA path under another step executor.
                dev, _, executor = device.partition("@")
                proc = subprocess.run(
                    [args.binary, "--model", path, "--prompts", prompt_file, "--out", out_file,
                     "--device", dev, "--steps", str(args.steps)]
                    + (["--executor", executor] if executor else []),
                    capture_output=True, text=True, timeout=args.binary_timeout)
            except subprocess.TimeoutExpired as e:
                print(f"{name} {device}: TIMEOUT after {args.binary_timeout}s", flush=True)
                results.append({"model": name, "device": device, "error": f"timeout {args.binary_timeout}s"})
                continue
            if proc.returncode != 0:
                print(f"{name} {device}: FAILED\n{proc.stdout}\n{proc.stderr}", flush=True)
                results.append({"model": name, "device": device, "error": proc.stderr[-2000:]})
                continue
            ours = json.load(open(out_file))
            for i, p in enumerate(prompts):
                a = torch.tensor(ours["last_logits"][i])
                b = ref_last[i]
                rel = float((a - b).norm() / b.norm())
                top2 = torch.topk(b, 2).values
                results.append({
                    "model": name, "device": device, "prompt_tokens": len(p),
                    "rel_l2_error": rel,
                    "hf_bf16_rel_l2_error": float((bf_last[i] - b).norm() / b.norm()),
                    "max_abs_error": float((a - b).abs().max()),
                    "ref_top2_margin": float(top2[0] - top2[1]),
                    "argmax_match": int(a.argmax()) == int(b.argmax()),
                    "greedy_ours": ours["greedy_tokens"][i], "greedy_ref": ref_greedy[i],
                    "greedy_match": ours["greedy_tokens"][i] == ref_greedy[i],
                    "load_secs": ours["load_secs"], "run_secs": ours["run_secs"],
                    "wall_secs": time.time() - t,
                })
                r = results[-1]
                print(f"{name} {device} prompt {len(p)}: rel_l2 {r['rel_l2_error']:.2e} argmax "
                      f"{r['argmax_match']} greedy {r['greedy_match']} (load {r['load_secs']:.1f}s, "
                      f"run {r['run_secs']:.1f}s, wall {r['wall_secs']:.1f}s)", flush=True)
        with open(os.path.join(args.out, "check.json"), "w") as f:
            json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "check.json"), "w") as f:
        json.dump(results, f, indent=1)
    # CPU computes in f32 like the reference: near-exact. burn-cuda's matmuls round like TF32, so
    # the CUDA path is held to the bf16 band (METHOD.md: 1e-3 to 1e-2). An argmax may differ
    # only where the reference's top-2 margin is within the observed error (near-ties of
    # random-weight models).
    # Our CUDA path computes in bf16 (weights rounded to bf16, bf16 activations as transformers
    # in bf16): it passes when it lands no further from the f32 reference than transformers'
    # own bf16 run does (x1.5, + 5e-3).
    tolerance = {"cpu": lambda r: 1e-5, "burn-cuda": lambda r: 1e-2,
                 "cuda": lambda r: 1.5 * r["hf_bf16_rel_l2_error"] + 5e-3}
    print(f"{'model':28s} {'device':22s} {'prompt':>6s} {'rel_l2':>10s} {'hf_bf16':>9s} {'max_abs':>9s} {'margin':>9s} {'argmax':>6s} {'greedy':>6s} {'ok':>4s}")
    ok = True
    for r in results:
        if "error" in r:
            ok = False
            print(f"{r['model']:28s} {r['device']:6s} ERROR {r['error'][:200]}")
            continue
        near_tie = r["ref_top2_margin"] < 4 * r["max_abs_error"]
        good = r["rel_l2_error"] < tolerance[r["device"].partition("@")[0]](r) and (r["argmax_match"] or near_tie)
        ok &= good
        print(f"{r['model']:28s} {r['device']:22s} {r['prompt_tokens']:6d} {r['rel_l2_error']:10.2e} {r['hf_bf16_rel_l2_error']:9.2e} "
              f"{r['max_abs_error']:9.2e} {r['ref_top2_margin']:9.2e} {str(r['argmax_match']):>6s} "
              f"{str(r['greedy_match']):>6s} {str(good):>4s}")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
