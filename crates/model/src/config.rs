//! The model shape, read from a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// Llama 3.1's frequency-dependent RoPE scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 names it so, and moves `rope_theta` into it.
    rope_parameters: Option<Value>,
    mlp_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn token_ids(value: &Option<Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        ModelConfig::from_hf_json(&text, &path)
    }

    /// Parses a Hugging Face config; `origin` names it in errors.
    pub fn from_hf_json(text: &str, origin: &Path) -> Result<ModelConfig, ModelError> {
        let err = |m: String| ModelError::config(origin, m);
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let arch_name = hf
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| hf.model_type.clone())
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(err(format!(
                    "unsupported architecture `{other}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
                )))
            }
        };
        let need =
            |v: Option<usize>, name: &str| v.ok_or_else(|| err(format!("`{name}` is missing")));
        let hidden_size = need(hf.hidden_size, "hidden_size")?;
        let num_heads = need(hf.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(err(format!(
                "num_attention_heads {num_heads} must be a positive multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = hf.head_dim.unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(err(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(err(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        let max_position_embeddings = hf.max_position_embeddings.unwrap_or(4096);
        let sliding = match (&hf.sliding_window, hf.use_sliding_window) {
            (_, Some(false)) => None,
            (Some(Value::Number(n)), _) => n.as_u64(),
            _ => None,
        };
        if let Some(window) = sliding {
            if (window as usize) < max_position_embeddings {
                return Err(err(format!(
                    "sliding_window = {window} (shorter than the context) is not supported"
                )));
            }
        }
        if hf.mlp_bias == Some(true) {
            return Err(err("mlp_bias = true is not supported".into()));
        }
        let rope_theta = hf
            .rope_theta
            .or_else(|| {
                hf.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let rope_scaling = match hf.rope_scaling.as_ref().or(hf.rope_parameters.as_ref()) {
            None | Some(Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if kind == "default" || (kind.is_empty() && v.get("factor").is_none()) {
                    None
                } else if kind != "llama3" {
                    return Err(err(format!(
                        "rope_scaling type `{kind}` is not supported (llama3 only)"
                    )));
                } else {
                    let field = |name: &str| {
                        v.get(name)
                            .and_then(Value::as_f64)
                            .ok_or_else(|| err(format!("rope_scaling.{name} is missing")))
                    };
                    Some(Llama3RopeScaling {
                        factor: field("factor")?,
                        low_freq_factor: field("low_freq_factor")?,
                        high_freq_factor: field("high_freq_factor")?,
                        original_max_position_embeddings: field(
                            "original_max_position_embeddings",
                        )?,
                    })
                }
            }
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: need(hf.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(hf.intermediate_size, "intermediate_size")?,
            num_layers: need(hf.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || hf.attention_bias.unwrap_or(false),
            bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&hf.eos_token_id),
        })
    }

    /// Bytes of K and V one token takes in a cache of `bytes_per_element` elements, all layers.
    pub fn kv_bytes_per_token(&self, bytes_per_element: usize) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element) as u64
    }

    /// Refuses token ids outside the vocabulary (the embedding lookup would read past it).
    pub fn check_token_ids(&self, tokens: &[u32]) -> Result<(), ModelError> {
        match tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(&bad) => Err(ModelError::Batch(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// RoPE inverse frequencies, one per pair of dimensions, with Llama 3 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let base = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d);
                match self.rope_scaling {
                    None => base,
                    Some(s) => {
                        let wavelen = 2.0 * std::f64::consts::PI / base;
                        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                        if wavelen < high_wavelen {
                            base
                        } else if wavelen > low_wavelen {
                            base / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * base / s.factor + smooth * base
                        }
                    }
                }
            })
            .collect()
    }
}
