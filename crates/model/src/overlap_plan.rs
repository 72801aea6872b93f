//! Whether a step runs overlapped, and with how many SMs in the memory lane: a small cost model
//! of the two lanes, fitted to the overlapped executor measured on the H200 (NOTES.md, issue 16),
//! that the CUDA path's `overlap-auto` executor asks once a step. Pure arithmetic, so the CPU
//! tests cover it.
//!
//! A step's *compute* part (every GEMM and the small kernels) takes `C` on the whole GPU, its
//! decode attention `A` (the KV cache read at the GPU's bandwidth); sequentially `C + A`. On two
//! lanes, `k` SMs stream the KV cache at `lane_bytes_per_sec_per_sm` each and the compute lane
//! gets the other `N - k`, running `compute_lane_slowdown` times slower than linear scaling
//! says (the KV stream beside it takes HBM bandwidth and L2 from its GEMMs):
//! `max(slowdown x C x N / (N - k), KV bytes / (k x lane rate))`.

use crate::ModelConfig;

/// The work of one step, as the planner sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepWork {
    /// Prompt tokens computed this step (prefill chunks).
    pub prefill_tokens: usize,
    /// Sequences decoding one token.
    pub decodes: usize,
    /// Context tokens the decodes attend to, summed.
    pub decode_context_tokens: usize,
}

/// The rates and limits of the overlap cost model (module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct OverlapPlanner {
    pub sm_count: usize,
    /// Dense-layer GEMM throughput of a step on the whole GPU, FLOP/s.
    pub gemm_flops_per_sec: f64,
    /// HBM bandwidth decode attention and weight streaming reach on the whole GPU, bytes/s.
    pub memory_bytes_per_sec: f64,
    /// The stream decode kernel's bandwidth per SM of its lane beside the GEMMs, bytes/s.
    pub lane_bytes_per_sec_per_sm: f64,
    /// How much slower than linear SM scaling the compute lane runs beside the memory lane.
    pub compute_lane_slowdown: f64,
    /// Memory-lane sizes to choose from.
    pub memory_sms_choices: Vec<usize>,
    /// Fewest prefill tokens a step overlaps with: with fewer the compute lane's GEMMs stream
    /// weights and fight the memory lane for HBM (all-decode steps ran 0.81-0.94x).
    pub min_prefill_tokens: usize,
    /// Predicted speedup below which the step runs sequentially.
    pub min_gain: f64,
}

impl OverlapPlanner {
    /// Fitted on the H200 (132 SMs; `overlap_bench --lane-timing`, NOTES.md): GEMMs 632 TFLOP/s
    /// (1024 prefill tokens of Llama-3-8B in 22.7 ms), attention 4.0 TB/s, the stream lane 85
    /// GB/s an SM beside GEMMs (105-118 alone), the compute lane 1.3x slower than linear; a
    /// lane of 32 SMs (24 won nowhere the planner chose it on the step grid).
    /// Other GPUs: the same ratios scaled by their SM count (a first guess, not measured).
    pub fn h200(sm_count: usize) -> OverlapPlanner {
        OverlapPlanner {
            sm_count,
            gemm_flops_per_sec: 632e12 * sm_count as f64 / 132.0,
            memory_bytes_per_sec: 4.0e12,
            lane_bytes_per_sec_per_sm: 85e9,
            compute_lane_slowdown: 1.3,
            memory_sms_choices: vec![32],
            min_prefill_tokens: 256,
            min_gain: 1.05,
        }
    }

    /// Seconds of the step's compute part on the whole GPU: its GEMM FLOPs at the GEMM rate, or
    /// the weights read once at the memory rate if that is longer.
    pub fn compute_secs(&self, c: &ModelConfig, w: StepWork) -> f64 {
        let tokens = (w.prefill_tokens + w.decodes) as f64;
        let flops = 2.0 * layer_params(c) * c.num_layers as f64 * tokens;
        let weight_bytes = 2.0 * layer_params(c) * c.num_layers as f64;
        (flops / self.gemm_flops_per_sec).max(weight_bytes / self.memory_bytes_per_sec)
    }

    /// Bytes of K and V the step's decodes read.
    pub fn kv_bytes(&self, c: &ModelConfig, w: StepWork) -> f64 {
        (w.decode_context_tokens * 2 * c.num_kv_heads * c.head_dim * 2 * c.num_layers) as f64
    }

    /// Seconds of the step's decode attention on the whole GPU.
    pub fn attention_secs(&self, c: &ModelConfig, w: StepWork) -> f64 {
        self.kv_bytes(c, w) / self.memory_bytes_per_sec
    }

    /// Predicted seconds of the step run sequentially.
    pub fn sequential_secs(&self, c: &ModelConfig, w: StepWork) -> f64 {
        self.compute_secs(c, w) + self.attention_secs(c, w)
    }

    /// Predicted seconds of the step overlapped with `memory_sms` SMs in the memory lane.
    pub fn overlapped_secs(&self, c: &ModelConfig, w: StepWork, memory_sms: usize) -> f64 {
        let n = self.sm_count as f64;
        let k = memory_sms.clamp(1, self.sm_count.saturating_sub(1).max(1)) as f64;
        let compute = self.compute_lane_slowdown * self.compute_secs(c, w) * n / (n - k);
        let memory = self.kv_bytes(c, w) / (k * self.lane_bytes_per_sec_per_sm);
        compute.max(memory)
    }

    /// The memory lane's SMs for the step, or `None` to run it sequentially: the choice with
    /// the least predicted time, if it beats sequential by `min_gain` and the step has the
    /// prefill tokens and two decodes an overlapped step needs.
    pub fn plan(&self, c: &ModelConfig, w: StepWork) -> Option<usize> {
        if w.decodes < 2 || w.prefill_tokens < self.min_prefill_tokens {
            return None;
        }
        let sequential = self.sequential_secs(c, w);
        self.memory_sms_choices
            .iter()
            .copied()
            .filter(|&k| k > 0 && k < self.sm_count)
            .map(|k| (k, self.overlapped_secs(c, w, k)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|&(_, secs)| sequential >= self.min_gain * secs)
            .map(|(k, _)| k)
    }
}

/// Parameters of one decoder layer's GEMMs (q/k/v, o, gate/up, down).
fn layer_params(c: &ModelConfig) -> f64 {
    let h = c.hidden_size as f64;
    let qkv = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim) as f64;
    let attn_out = (c.num_heads * c.head_dim) as f64;
    let mlp = 3.0 * c.intermediate_size as f64;
    h * (qkv + attn_out + mlp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_8b() -> ModelConfig {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}"#;
        ModelConfig::from_hf_json(text, std::path::Path::new("llama3-8b-shape")).unwrap()
    }

    fn work(prefill_tokens: usize, decodes: usize, context: usize) -> StepWork {
        StepWork {
            prefill_tokens,
            decodes,
            decode_context_tokens: decodes * context,
        }
    }

    /// The measured H200 steps (NOTES.md): sequential wherever overlap lost, a lane where it won.
    #[test]
    fn overlaps_only_the_steps_that_gained_on_the_h200() {
        let c = llama3_8b();
        let p = OverlapPlanner::h200(132);
        // All-prefill, prefill-heavy, balanced-by-time and all-decode steps lost (0.80-0.97x).
        for w in [
            work(2048, 0, 0),
            work(2048, 64, 2048),
            work(1024, 256, 2048),
            work(0, 320, 2048),
        ] {
            assert_eq!(p.plan(&c, w), None, "{w:?}");
        }
        // 512 prefill tokens beside 320 decodes of 2k context: 1.05-1.10x with 24-32 SMs.
        let k = p.plan(&c, work(512, 320, 2048)).expect("overlapped");
        assert!(p.memory_sms_choices.contains(&k));
        assert!(
            p.sequential_secs(&c, work(512, 320, 2048))
                > p.overlapped_secs(&c, work(512, 320, 2048), k)
        );
    }

    /// More SMs to the memory lane never slow its part; fewer never slow the compute lane.
    #[test]
    fn lanes_trade_sms_monotonically() {
        let c = llama3_8b();
        let p = OverlapPlanner::h200(132);
        let w = work(512, 320, 2048);
        let secs: Vec<f64> = (8..=64)
            .step_by(8)
            .map(|k| p.overlapped_secs(&c, w, k))
            .collect();
        let best = secs.iter().copied().fold(f64::INFINITY, f64::min);
        // Falls, then rises: one minimum.
        let at = secs.iter().position(|&s| s == best).unwrap();
        assert!(secs[..=at].windows(2).all(|x| x[0] >= x[1]));
        assert!(secs[at..].windows(2).all(|x| x[0] <= x[1]));
    }
}
