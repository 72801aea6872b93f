//! Small random-weight models written to disk, in the exact layout of a Hugging Face model
//! folder, so tests (here and in the engine) load real files without downloading anything.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, View};
use serde_json::json;

use crate::{Architecture, ModelError};

/// What to write.
#[derive(Clone, Debug)]
pub struct TinyModelSpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Words of the WordLevel tokenizer; the vocabulary is `[UNK]`, `<s>`, `</s>` and these.
    pub words: Vec<String>,
    pub tie_word_embeddings: bool,
    pub llama3_rope_scaling: bool,
    pub dtype: Dtype,
    /// Split the weights into this many safetensors shards with an index (1 = one file).
    pub shards: usize,
    pub seed: u64,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        TinyModelSpec {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            words: (0..61).map(|i| format!("w{i}")).collect(),
            tie_word_embeddings: false,
            llama3_rope_scaling: true,
            dtype: Dtype::F32,
            shards: 1,
            seed: 0,
        }
    }
}

impl TinyModelSpec {
    pub fn vocab_size(&self) -> usize {
        self.words.len() + 3
    }
}

struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// Writes `config.json`, the safetensors weights and `tokenizer.json` into `dir`.
pub fn write_tiny_model(dir: &Path, spec: &TinyModelSpec) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| ModelError::io(&path, e)
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let head_dim = spec.hidden_size / spec.num_heads;
    let vocab = spec.vocab_size();
    let (arch, model_type) = match spec.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut config = json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": [2],
        "torch_dtype": "float32",
    });
    if spec.llama3_rope_scaling {
        config["rope_scaling"] = json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64
        });
    }
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(io(&path))?;

    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, scale: f32, offset: f32, rng: &mut ChaCha8Rng| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| offset + scale * (rng.gen::<f32>() * 2.0 - 1.0))
                .collect();
            tensors.push((
                name,
                Raw {
                    dtype: spec.dtype,
                    shape,
                    bytes: encode(&values, spec.dtype),
                },
            ));
        };
    let (h, q, kv, i) = (
        spec.hidden_size,
        spec.num_heads * head_dim,
        spec.num_kv_heads * head_dim,
        spec.intermediate_size,
    );
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        1.0,
        0.0,
        &mut rng,
    );
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q, h],
            w(h),
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv, h],
            w(h),
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv, h],
            w(h),
            0.0,
            &mut rng,
        );
        if spec.architecture == Architecture::Qwen2 {
            add(
                format!("{p}.self_attn.q_proj.bias"),
                vec![q],
                0.1,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv],
                0.1,
                0.0,
                &mut rng,
            );
            add(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv],
                0.1,
                0.0,
                &mut rng,
            );
        }
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q],
            w(q),
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
            &mut rng,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            w(h),
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![i, h],
            w(h),
            0.0,
            &mut rng,
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            w(i),
            0.0,
            &mut rng,
        );
    }
    add("model.norm.weight".into(), vec![h], 0.2, 1.0, &mut rng);
    if !spec.tie_word_embeddings {
        add("lm_head.weight".into(), vec![vocab, h], w(h), 0.0, &mut rng);
    }

    let shards = spec.shards.max(1);
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = HashMap::new();
    for (k, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        for (name, _) in chunk {
            weight_map.insert(name.clone(), file.clone());
        }
        let views: Vec<(&str, &Raw)> = chunk.iter().map(|(n, r)| (n.as_str(), r)).collect();
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, &None, &path).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    }
    if shards > 1 {
        let path = dir.join("model.safetensors.index.json");
        let index = json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(&path, index.to_string()).map_err(io(&path))?;
    }

    let mut vocab_map = serde_json::Map::new();
    for (id, word) in ["[UNK]", "<s>", "</s>"]
        .iter()
        .map(|s| s.to_string())
        .chain(spec.words.iter().cloned())
        .enumerate()
    {
        vocab_map.insert(word, json!(id));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": vocab_map, "unk_token": "[UNK]"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).map_err(io(&path))?;
    Ok(())
}
