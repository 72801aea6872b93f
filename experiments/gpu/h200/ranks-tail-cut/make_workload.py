"""The workload of ranks-tail-cut/: 1,200 compute-heavy requests (1,500-token prompts, 4-token
answers) and 4 long ones (128-token prompts, 4,000-token answers); max_tokens is each request's
length, so `run --rank` cuts with the true lengths.

    python3 experiments/gpu/h200/ranks-tail-cut/make_workload.py > target/device/tail-cut.jsonl
"""
import json

for i in range(1200):
    print(json.dumps({"id": f"short-{i}", "prompt_tokens": 1500, "max_tokens": 4,
                      "output_tokens": 4}))
for i in range(4):
    print(json.dumps({"id": f"long-{i}", "prompt_tokens": 128, "max_tokens": 4000,
                      "output_tokens": 4000}))
