#!/usr/bin/env bash
# On the device: `blendserve calibrate` on a Llama-3-8B-shaped random-weight model, then each
# given workload end to end (fcfs, sequential executor) with `--predict` under the calibrated
# file: how far the simulator's time for the very same run is from the measured one.
#   bash experiments/gpu/calibrate_check.sh target/device/blendserve $OUT h200 WORKLOAD.jsonl...
set -euo pipefail
bin=$1 out=$2 hardware=$3
shift 3
model=$out/llama3-8b-shape
mkdir -p "$model"
cat > "$model/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
 "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
 "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": false,
 "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
JSON
"$bin" calibrate --model "$model" --random-weights --hardware "$hardware" \
    --out "$out/$hardware-calibrated.toml" 2>&1 | tee "$out/calibrate.txt"
for w in "$@"; do
    name=$(basename "$w" .jsonl)
    "$bin" run --device cuda --model "$model" --random-weights --input "$w" \
        --output "$out/out-$name.jsonl" --policy fcfs --predict --hardware "$hardware" \
        --hardware-config "$out/$hardware-calibrated.toml" --report "$out/report-$name.json" \
        --order completion 2> "$out/run-$name.log" > /dev/null
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'measured', round(r['elapsed_secs'],1), 's predicted', round(r['predicted_secs'],1), 's ratio', round(r['predicted_over_measured'],3))" "$out/report-$name.json" "$name"
done
