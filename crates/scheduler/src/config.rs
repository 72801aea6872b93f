//! Model and hardware descriptions, presets, and TOML overrides.

use serde::{Deserialize, Serialize};

use crate::SchedulerError;

/// The shape of a Llama-family decoder: what the performance model needs to price tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub intermediate: u32,
    pub vocab: u32,
    pub tied_embeddings: bool,
    /// Bytes per weight and per KV element (2 for bf16).
    pub dtype_bytes: u32,
    /// Longest sequence (prompt + output) the model accepts.
    pub max_context_tokens: u64,
}

impl ModelConfig {
    fn linear_params_per_layer(&self) -> u64 {
        let h = u64::from(self.hidden);
        let q = u64::from(self.heads) * u64::from(self.head_dim);
        let kv = u64::from(self.kv_heads) * u64::from(self.head_dim);
        h * q + 2 * h * kv + q * h + 3 * h * u64::from(self.intermediate)
    }

    /// All weights, embeddings included.
    pub fn params(&self) -> u64 {
        let embed = u64::from(self.vocab) * u64::from(self.hidden);
        let lm_head = if self.tied_embeddings { 0 } else { embed };
        let norms = (2 * u64::from(self.layers) + 1) * u64::from(self.hidden);
        u64::from(self.layers) * self.linear_params_per_layer() + embed + lm_head + norms
    }

    /// Bytes read from device memory for one pass over the weights (the embedding table is
    /// gathered, not streamed, so it is left out unless tied to the LM head).
    pub fn weight_bytes_per_step(&self) -> u64 {
        let lm_head = u64::from(self.vocab) * u64::from(self.hidden);
        (u64::from(self.layers) * self.linear_params_per_layer() + lm_head)
            * u64::from(self.dtype_bytes)
    }

    /// Bytes the weights occupy in device memory.
    pub fn weight_bytes(&self) -> u64 {
        self.params() * u64::from(self.dtype_bytes)
    }

    /// KV-cache bytes per token, all layers, K and V.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    /// GEMM FLOPs per token through all decoder layers.
    pub fn linear_flops_per_token(&self) -> f64 {
        2.0 * (u64::from(self.layers) * self.linear_params_per_layer()) as f64
    }

    /// FLOPs of the LM head for one token whose logits are needed.
    pub fn lm_head_flops(&self) -> f64 {
        2.0 * f64::from(self.hidden) * f64::from(self.vocab)
    }

    /// Attention FLOPs (QK^T and PV) for one query attending to `keys` keys.
    pub fn attention_flops_per_key(&self) -> f64 {
        4.0 * f64::from(self.layers) * f64::from(self.heads) * f64::from(self.head_dim)
    }

    pub fn preset(name: &str) -> Option<ModelConfig> {
        let m = |name: &str,
                 layers,
                 hidden,
                 heads,
                 kv_heads,
                 head_dim,
                 intermediate,
                 vocab,
                 tied,
                 ctx| ModelConfig {
            name: name.to_string(),
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            vocab,
            tied_embeddings: tied,
            dtype_bytes: 2,
            max_context_tokens: ctx,
        };
        Some(match name {
            "llama3-8b" => m(name, 32, 4096, 32, 8, 128, 14336, 128_256, false, 131_072),
            "llama3-70b" => m(name, 80, 8192, 64, 8, 128, 28672, 128_256, false, 131_072),
            "llama2-7b" => m(name, 32, 4096, 32, 32, 128, 11008, 32_000, false, 4096),
            "qwen2.5-7b" => m(name, 28, 3584, 28, 4, 128, 18944, 152_064, false, 131_072),
            "qwen2.5-1.5b" => m(name, 28, 1536, 12, 2, 128, 8960, 151_936, true, 32_768),
            "qwen2.5-0.5b" => m(name, 24, 896, 14, 2, 64, 4864, 151_936, true, 32_768),
            _ => return None,
        })
    }

    pub const PRESETS: [&'static str; 6] = [
        "llama3-8b",
        "llama3-70b",
        "llama2-7b",
        "qwen2.5-7b",
        "qwen2.5-1.5b",
        "qwen2.5-0.5b",
    ];
}

/// An accelerator (or `gpus` of them serving one model replica with tensor parallelism).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareConfig {
    pub name: String,
    /// Dense bf16 matrix FLOP/s per GPU (datasheet).
    pub peak_flops: f64,
    /// Device-memory bandwidth per GPU in bytes/s (datasheet).
    pub memory_bytes_per_sec: f64,
    /// Device memory per GPU in bytes.
    pub memory_bytes: u64,
    /// Fraction of `peak_flops` that large GEMMs reach (measured: cuBLAS ~0.75-0.8 on H100).
    pub compute_efficiency: f64,
    /// Fraction of `memory_bytes_per_sec` that streaming kernels reach (measured ~0.9).
    pub memory_efficiency: f64,
    /// GPUs per model replica.
    pub gpus: u32,
    /// Fixed cost per engine step (scheduling, launches) in seconds.
    pub step_overhead_secs: f64,
    /// Fraction of `peak_flops` that prefill attention reaches, where it differs from GEMMs'
    /// (an engine's own attention kernels; calibrated from a device benchmark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_efficiency: Option<f64>,
    /// The board's power limit and what work costs in energy, where measured: an overlapped
    /// step cannot run faster than its energy at the power limit allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerModel>,
}

/// Energy per unit of work and the power a GPU may draw (linear: power = idle + the work's
/// energy over time). Measured with `experiments/gpu/power_probe.py` (NOTES.md section 13).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerModel {
    /// The board's power limit, watts.
    pub cap_watts: f64,
    /// Power with nothing running, watts.
    pub idle_watts: f64,
    /// Energy above idle per FLOP of tensor-core arithmetic, picojoules.
    pub picojoules_per_flop: f64,
    /// Energy above idle per byte of device-memory traffic, picojoules.
    pub picojoules_per_byte: f64,
}

impl PowerModel {
    /// Seconds `flops` and `bytes` take at least on one GPU: their energy over the power the
    /// limit leaves above idle.
    pub fn floor_secs(&self, flops: f64, bytes: f64) -> f64 {
        let joules = (flops * self.picojoules_per_flop + bytes * self.picojoules_per_byte) * 1e-12;
        joules / (self.cap_watts - self.idle_watts)
    }
}

impl HardwareConfig {
    /// Seconds `flops` and `bytes` take at least under the power limit (0 without a power
    /// model); a replica of several GPUs has as many power budgets.
    pub fn power_floor_secs(&self, flops: f64, bytes: f64) -> f64 {
        self.power
            .map_or(0.0, |p| p.floor_secs(flops, bytes) / f64::from(self.gpus))
    }

    pub fn effective_flops(&self) -> f64 {
        self.peak_flops * self.compute_efficiency * f64::from(self.gpus)
    }

    /// FLOP/s of prefill attention.
    pub fn effective_attention_flops(&self) -> f64 {
        self.peak_flops
            * self.attention_efficiency.unwrap_or(self.compute_efficiency)
            * f64::from(self.gpus)
    }

    pub fn effective_bytes_per_sec(&self) -> f64 {
        self.memory_bytes_per_sec * self.memory_efficiency * f64::from(self.gpus)
    }

    pub fn total_memory_bytes(&self) -> u64 {
        self.memory_bytes * u64::from(self.gpus)
    }

    pub fn preset(name: &str) -> Option<HardwareConfig> {
        let h = |name: &str, flops: f64, bw: f64, mem_gb: u64, ce| HardwareConfig {
            name: name.to_string(),
            peak_flops: flops,
            memory_bytes_per_sec: bw,
            memory_bytes: mem_gb * 1_000_000_000,
            compute_efficiency: ce,
            memory_efficiency: 0.9,
            gpus: 1,
            step_overhead_secs: 0.0,
            attention_efficiency: None,
            power: None,
        };
        Some(match name {
            // 798 TFLOP/s and 3.0 TB/s measured on the lent H100 (see DEVELOPERS.md).
            "h100" => h(name, 989e12, 3.35e12, 80, 0.8),
            // Power measured on the lent H200 (NOTES.md section 13): idle 120 W; a streaming
            // read at 4.2-4.45 TB/s 455-514 W above it (109-116 pJ a byte); a sustained cuBLAS
            // GEMM (1024 x 4096 x 14336) held at the 700 W limit at 643 TFLOP/s: 566 W above
            // idle, of which its 0.83 TB/s of traffic takes ~94 W, so 0.73 pJ a FLOP.
            "h200" => HardwareConfig {
                power: Some(PowerModel {
                    cap_watts: 700.0,
                    idle_watts: 120.0,
                    picojoules_per_flop: 0.73,
                    picojoules_per_byte: 113.0,
                }),
                ..h(name, 989e12, 4.8e12, 141, 0.8)
            },
            "a100-80g" => h(name, 312e12, 2.039e12, 80, 0.8),
            _ => return None,
        })
    }

    pub const PRESETS: [&'static str; 3] = ["h100", "h200", "a100-80g"];
}

/// Optional overrides for every model field (a TOML `[model]` table).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelOverride {
    pub preset: Option<String>,
    pub name: Option<String>,
    pub layers: Option<u32>,
    pub hidden: Option<u32>,
    pub heads: Option<u32>,
    pub kv_heads: Option<u32>,
    pub head_dim: Option<u32>,
    pub intermediate: Option<u32>,
    pub vocab: Option<u32>,
    pub tied_embeddings: Option<bool>,
    pub dtype_bytes: Option<u32>,
    pub max_context_tokens: Option<u64>,
}

/// Optional overrides for every hardware field (a TOML `[hardware]` table).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareOverride {
    pub preset: Option<String>,
    pub name: Option<String>,
    pub peak_flops: Option<f64>,
    pub memory_bytes_per_sec: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub compute_efficiency: Option<f64>,
    pub memory_efficiency: Option<f64>,
    pub gpus: Option<u32>,
    pub step_overhead_secs: Option<f64>,
    pub attention_efficiency: Option<f64>,
    /// The power model's fields, each over the preset's (all four needed where the preset has
    /// none).
    pub power_cap_watts: Option<f64>,
    pub power_idle_watts: Option<f64>,
    pub picojoules_per_flop: Option<f64>,
    pub picojoules_per_byte: Option<f64>,
}

impl HardwareOverride {
    /// The power model from `base` with this file's fields over it; `None` where neither has
    /// one, an error where the file gives some fields and there is nothing to complete them.
    fn power(&self, base: Option<PowerModel>) -> Result<Option<PowerModel>, SchedulerError> {
        let fields = [
            self.power_cap_watts,
            self.power_idle_watts,
            self.picojoules_per_flop,
            self.picojoules_per_byte,
        ];
        let p = match (base, fields) {
            (None, [None, None, None, None]) => return Ok(None),
            (None, [Some(cap), Some(idle), Some(flop), Some(byte)]) => PowerModel {
                cap_watts: cap,
                idle_watts: idle,
                picojoules_per_flop: flop,
                picojoules_per_byte: byte,
            },
            (None, _) => {
                return Err(SchedulerError::Config(
                    "hardware: a power model needs all of power_cap_watts, power_idle_watts, \
                     picojoules_per_flop and picojoules_per_byte (the preset has none)"
                        .into(),
                ))
            }
            (Some(b), [cap, idle, flop, byte]) => PowerModel {
                cap_watts: cap.unwrap_or(b.cap_watts),
                idle_watts: idle.unwrap_or(b.idle_watts),
                picojoules_per_flop: flop.unwrap_or(b.picojoules_per_flop),
                picojoules_per_byte: byte.unwrap_or(b.picojoules_per_byte),
            },
        };
        if !(p.idle_watts >= 0.0
            && p.cap_watts > p.idle_watts
            && p.picojoules_per_flop > 0.0
            && p.picojoules_per_byte > 0.0)
        {
            return Err(SchedulerError::Config(format!(
                "hardware: power_cap_watts {} must exceed power_idle_watts {} (>= 0), and the \
                 picojoules per FLOP and per byte be positive",
                p.cap_watts, p.idle_watts
            )));
        }
        Ok(Some(p))
    }
}

/// A TOML file that overrides presets: `[model]` and `[hardware]` tables, every key optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideFile {
    #[serde(default)]
    pub model: ModelOverride,
    #[serde(default)]
    pub hardware: HardwareOverride,
}

macro_rules! apply_fields {
    ($target:expr, $src:expr, $($field:ident),*) => {
        $( if let Some(v) = $src.$field.clone() { $target.$field = v; } )*
    };
}

/// The preset `name` of `kind`, or an error listing the known ones.
fn preset_or_error<T>(
    kind: &str,
    name: &str,
    lookup: fn(&str) -> Option<T>,
    known: &[&str],
) -> Result<T, SchedulerError> {
    lookup(name).ok_or_else(|| {
        SchedulerError::Config(format!(
            "unknown {kind} preset `{name}` (known: {})",
            known.join(", ")
        ))
    })
}

impl OverrideFile {
    /// Reads and parses a TOML file; errors name it.
    pub fn read(path: &std::path::Path) -> Result<OverrideFile, SchedulerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SchedulerError::Config(format!("cannot read {}: {e}", path.display())))?;
        OverrideFile::parse(&text)
            .map_err(|e| SchedulerError::Config(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<OverrideFile, SchedulerError> {
        toml::from_str(text).map_err(|e| SchedulerError::Config(format!("override file: {e}")))
    }

    /// Resolves the model: the file's preset (else `default_preset`), then the file's fields.
    pub fn model(&self, default_preset: &str) -> Result<ModelConfig, SchedulerError> {
        let preset = self.model.preset.as_deref().unwrap_or(default_preset);
        let mut m = preset_or_error("model", preset, ModelConfig::preset, &ModelConfig::PRESETS)?;
        let o = &self.model;
        apply_fields!(
            m,
            o,
            name,
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            vocab,
            tied_embeddings,
            dtype_bytes,
            max_context_tokens
        );
        if m.layers == 0
            || m.hidden == 0
            || m.heads == 0
            || m.kv_heads == 0
            || m.head_dim == 0
            || m.dtype_bytes == 0
        {
            return Err(SchedulerError::Config(format!(
                "model `{}` has a zero dimension",
                m.name
            )));
        }
        if m.heads % m.kv_heads != 0 {
            return Err(SchedulerError::Config(format!(
                "model `{}`: heads {} is not a multiple of kv_heads {}",
                m.name, m.heads, m.kv_heads
            )));
        }
        Ok(m)
    }

    /// Resolves the hardware: the file's preset (else `default_preset`), then the file's fields.
    pub fn hardware(&self, default_preset: &str) -> Result<HardwareConfig, SchedulerError> {
        let preset = self.hardware.preset.as_deref().unwrap_or(default_preset);
        let mut h = preset_or_error(
            "hardware",
            preset,
            HardwareConfig::preset,
            &HardwareConfig::PRESETS,
        )?;
        let o = &self.hardware;
        apply_fields!(
            h,
            o,
            name,
            peak_flops,
            memory_bytes_per_sec,
            memory_bytes,
            compute_efficiency,
            memory_efficiency,
            gpus,
            step_overhead_secs
        );
        if let Some(e) = o.attention_efficiency {
            h.attention_efficiency = Some(e);
        }
        h.power = o.power(h.power)?;
        let positive =
            h.peak_flops > 0.0 && h.memory_bytes_per_sec > 0.0 && h.memory_bytes > 0 && h.gpus > 0;
        let fractions = (0.0..=1.0).contains(&h.compute_efficiency)
            && h.compute_efficiency > 0.0
            && (0.0..=1.0).contains(&h.memory_efficiency)
            && h.memory_efficiency > 0.0
            && h.attention_efficiency.is_none_or(|e| e > 0.0 && e <= 1.0);
        if !positive || !fractions || h.step_overhead_secs < 0.0 {
            return Err(SchedulerError::Config(format!(
                "hardware `{}`: rates, memory and gpus must be positive and efficiencies in (0, 1]",
                h.name
            )));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_8b_shape_is_right() {
        let m = ModelConfig::preset("llama3-8b").unwrap();
        // 8.03 B parameters, 128 KiB of KV per token.
        assert!(
            (m.params() as f64 / 1e9 - 8.03).abs() < 0.01,
            "{}",
            m.params()
        );
        assert_eq!(m.kv_bytes_per_token(), 131_072);
    }

    #[test]
    fn overrides_apply_and_bad_values_are_named() {
        let file = OverrideFile::parse(
            "[model]\npreset = \"qwen2.5-7b\"\nlayers = 2\n[hardware]\ngpus = 2\n",
        )
        .unwrap();
        assert_eq!(file.model("llama3-8b").unwrap().layers, 2);
        assert_eq!(file.model("llama3-8b").unwrap().name, "qwen2.5-7b");
        assert_eq!(file.hardware("h100").unwrap().gpus, 2);
        assert!(OverrideFile::parse("[model]\nlayerz = 2\n").is_err());
        let bad = OverrideFile::parse("[hardware]\ncompute_efficiency = 1.5\n").unwrap();
        assert!(bad
            .hardware("h100")
            .unwrap_err()
            .to_string()
            .contains("efficiencies"));
        // Power: fields over the preset's; all four where the preset has none; cap above idle.
        let h200 = OverrideFile::parse("[hardware]\npower_cap_watts = 600\n")
            .unwrap()
            .hardware("h200")
            .unwrap();
        let power = h200.power.unwrap();
        assert_eq!(power.cap_watts, 600.0);
        assert_eq!(power.idle_watts, 120.0);
        let partial = OverrideFile::parse("[hardware]\npower_cap_watts = 400\n").unwrap();
        let err = partial.hardware("a100-80g").unwrap_err().to_string();
        assert!(err.contains("picojoules_per_byte"), "{err}");
        let low = OverrideFile::parse("[hardware]\npower_cap_watts = 100\n").unwrap();
        let err = low.hardware("h200").unwrap_err().to_string();
        assert!(err.contains("power_cap_watts 100"), "{err}");
        let unknown = OverrideFile::default()
            .model("gpt-9")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("gpt-9") && unknown.contains("llama3-8b"));
    }
}
