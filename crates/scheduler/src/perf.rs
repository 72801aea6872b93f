//! The performance model: prices a batch step or a request in compute seconds and memory seconds
//! from the model shape and the hardware rates, and turns a step's costs into time under an
//! executor.

use std::str::FromStr;

use prefix_tree::{Demand, DemandModel};
use serde::Serialize;

use crate::config::{HardwareConfig, ModelConfig};
use crate::SchedulerError;

/// How a step's operators share the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Executor {
    /// Operators run one after another, each at its own roofline: GEMMs at
    /// `max(flops, weight bytes)`, then prefill attention, then decode attention. This is what a
    /// plain engine (vLLM, SGLang) does.
    Sequential,
    /// Compute-bound and memory-bound work of a step run at once (nano-batching):
    /// `max(all compute, all memory)`. The ideal BlendServe assumes.
    Overlapped,
    /// Between the two: `sequential - e * (sequential - overlapped)`, with `e` the overlap
    /// efficiency measured on a device.
    Partial { overlap_efficiency: f64 },
}

impl FromStr for Executor {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sum" | "sequential" => Ok(Executor::Sequential),
            "max" | "overlap" | "overlapped" => Ok(Executor::Overlapped),
            _ => {
                let e = s
                    .strip_prefix("partial:")
                    .and_then(|x| x.parse::<f64>().ok())
                    .filter(|e| (0.0..=1.0).contains(e))
                    .ok_or_else(|| {
                        SchedulerError::Config(format!(
                            "unknown executor `{s}` (sum, max, or partial:E with E in [0, 1])"
                        ))
                    })?;
                Ok(Executor::Partial {
                    overlap_efficiency: e,
                })
            }
        }
    }
}

impl std::fmt::Display for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Executor::Sequential => write!(f, "sum"),
            Executor::Overlapped => write!(f, "max"),
            Executor::Partial { overlap_efficiency } => write!(f, "partial:{overlap_efficiency}"),
        }
    }
}

/// Work in one step (or a whole workload), by operator class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepCost {
    pub gemm_flops: f64,
    pub weight_bytes: f64,
    pub prefill_attention_flops: f64,
    pub prefill_kv_bytes: f64,
    pub decode_attention_flops: f64,
    pub decode_kv_bytes: f64,
    /// Engine steps this cost spans (1 for a step; the minimum step count for a bound).
    pub steps: f64,
}

impl std::ops::AddAssign for StepCost {
    fn add_assign(&mut self, o: StepCost) {
        self.gemm_flops += o.gemm_flops;
        self.weight_bytes += o.weight_bytes;
        self.prefill_attention_flops += o.prefill_attention_flops;
        self.prefill_kv_bytes += o.prefill_kv_bytes;
        self.decode_attention_flops += o.decode_attention_flops;
        self.decode_kv_bytes += o.decode_kv_bytes;
        self.steps += o.steps;
    }
}

/// A step's cost in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepTime {
    /// All arithmetic at the achievable rate.
    pub compute_secs: f64,
    /// All device-memory traffic at the achievable bandwidth.
    pub memory_secs: f64,
    /// All the work's energy at the power limit (0 without a power model): an overlapped step
    /// takes at least this long.
    pub power_secs: f64,
    /// Wall time under the executor.
    pub secs: f64,
}

/// Prices work on one model and one piece of hardware.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PerfModel {
    pub model: ModelConfig,
    pub hardware: HardwareConfig,
    pub executor: Executor,
    /// Sequences expected to decode together; a decode step's weight read is shared among them
    /// when pricing single requests (not steps). Set from the KV capacity and the workload.
    pub decode_concurrency_hint: f64,
}

impl PerfModel {
    pub fn new(model: ModelConfig, hardware: HardwareConfig, executor: Executor) -> Self {
        PerfModel {
            model,
            hardware,
            executor,
            decode_concurrency_hint: 64.0,
        }
    }

    /// Sets [`PerfModel::decode_concurrency_hint`] for a KV cache of `kv_capacity_tokens` and
    /// prompts of `mean_prompt_tokens` on average: as many sequences as the cache holds, at most
    /// `max_running`. The simulator and the engine both call it, so they price alike.
    pub fn set_decode_concurrency(
        &mut self,
        kv_capacity_tokens: f64,
        mean_prompt_tokens: f64,
        max_running: u32,
    ) {
        self.decode_concurrency_hint = (kv_capacity_tokens / mean_prompt_tokens.max(1.0))
            .clamp(1.0, f64::from(max_running.max(1)));
    }

    /// The cost of computing tokens `[start, start + len)` of one sequence in a step (weights
    /// excluded: they are read once per step). `logits` says whether the last token is sampled.
    pub fn piece_cost(&self, start_tokens: u64, len_tokens: u64, logits: bool) -> StepCost {
        let m = &self.model;
        let len = len_tokens as f64;
        let keys = len * start_tokens as f64 + len * (len + 1.0) / 2.0;
        let attention = m.attention_flops_per_key() * keys;
        let kv = m.kv_bytes_per_token() as f64 * (start_tokens + len_tokens) as f64;
        let mut cost = StepCost {
            gemm_flops: m.linear_flops_per_token() * len
                + if logits { m.lm_head_flops() } else { 0.0 },
            ..StepCost::default()
        };
        if len_tokens == 1 {
            cost.decode_attention_flops = attention;
            cost.decode_kv_bytes = kv;
        } else {
            cost.prefill_attention_flops = attention;
            cost.prefill_kv_bytes = kv;
        }
        cost
    }

    /// How many tokens a prefill chunk starting at `start_tokens` can have for its arithmetic to
    /// take about `compute_secs` (attention to the prefix included).
    pub fn prefill_tokens_for_compute(&self, start_tokens: u64, compute_secs: f64) -> u64 {
        if compute_secs <= 0.0 {
            return 0;
        }
        let m = &self.model;
        let flops = compute_secs * self.hardware.effective_flops();
        let per_key = m.attention_flops_per_key();
        let lin = m.linear_flops_per_token();
        // flops(n) = n * (lin + per_key * (start + (n + 1) / 2)): two fixed-point steps suffice.
        let mut n = flops / (lin + per_key * start_tokens as f64);
        for _ in 0..2 {
            n = flops / (lin + per_key * (start_tokens as f64 + (n + 1.0) / 2.0));
        }
        n.max(0.0) as u64
    }

    /// The work of decoding `output_tokens` tokens after a prompt of `prompt_tokens` (the first
    /// output token comes with the prefill): every decode step's GEMMs and logits, and its
    /// attention over the prompt and the tokens so far. Weights excluded.
    pub fn decode_cost(&self, prompt_tokens: u64, output_tokens: u64) -> StepCost {
        let m = &self.model;
        let steps = output_tokens.saturating_sub(1) as f64;
        // Decode step k (1-based) attends prompt + k keys and reads that much KV.
        let keys = steps * prompt_tokens as f64 + steps * (steps + 1.0) / 2.0;
        StepCost {
            gemm_flops: steps * (m.linear_flops_per_token() + m.lm_head_flops()),
            decode_attention_flops: m.attention_flops_per_key() * keys,
            decode_kv_bytes: m.kv_bytes_per_token() as f64 * keys,
            ..StepCost::default()
        }
    }

    /// A cost as demand on the two resources (independent of the executor).
    fn demand(&self, cost: &StepCost) -> Demand {
        let t = self.time(cost);
        Demand::new(t.compute_secs, t.memory_secs)
    }

    /// The fixed part of one step: one pass over the weights.
    pub fn step_base_cost(&self) -> StepCost {
        StepCost {
            weight_bytes: self.model.weight_bytes_per_step() as f64,
            steps: 1.0,
            ..StepCost::default()
        }
    }

    /// Time of a step (or of a summed cost spanning `cost.steps` steps) under the executor.
    pub fn time(&self, cost: &StepCost) -> StepTime {
        let f = self.hardware.effective_flops();
        let fa = self.hardware.effective_attention_flops();
        let b = self.hardware.effective_bytes_per_sec();
        let h = &self.hardware;
        // Each operator at its roofline, and no faster than its energy at the power limit.
        let op = |flops: f64, rate: f64, bytes: f64| {
            (flops / rate)
                .max(bytes / b)
                .max(h.power_floor_secs(flops, bytes))
        };
        let gemm = op(cost.gemm_flops, f, cost.weight_bytes);
        let prefill = op(cost.prefill_attention_flops, fa, cost.prefill_kv_bytes);
        let decode = op(cost.decode_attention_flops, f, cost.decode_kv_bytes);
        let compute_secs =
            (cost.gemm_flops + cost.decode_attention_flops) / f + cost.prefill_attention_flops / fa;
        let all_bytes = cost.weight_bytes + cost.prefill_kv_bytes + cost.decode_kv_bytes;
        let memory_secs = all_bytes / b;
        let all_flops =
            cost.gemm_flops + cost.decode_attention_flops + cost.prefill_attention_flops;
        let power_secs = h.power_floor_secs(all_flops, all_bytes);
        let sequential = gemm + prefill + decode;
        let overlapped = compute_secs.max(memory_secs).max(power_secs);
        let secs = match self.executor {
            Executor::Sequential => sequential,
            Executor::Overlapped => overlapped,
            Executor::Partial { overlap_efficiency } => {
                sequential - overlap_efficiency * (sequential - overlapped)
            }
        } + cost.steps * self.hardware.step_overhead_secs;
        StepTime {
            compute_secs,
            memory_secs,
            power_secs,
            secs,
        }
    }

    /// KV blocks that fit beside the weights in `kv_memory_fraction` of device memory, keeping an
    /// activation reserve for `max_batch_tokens`.
    pub fn kv_capacity_blocks(
        &self,
        kv_memory_fraction: f64,
        block_tokens: u32,
        max_batch_tokens: u32,
    ) -> Result<u32, SchedulerError> {
        if !(kv_memory_fraction > 0.0 && kv_memory_fraction <= 1.0) {
            return Err(SchedulerError::Config(format!(
                "kv_memory_fraction {kv_memory_fraction} must be in (0, 1]"
            )));
        }
        let m = &self.model;
        let budget = self.hardware.total_memory_bytes() as f64 * kv_memory_fraction;
        // Activations: a few hidden-sized and intermediate-sized buffers per batch token, fp32
        // logits for the sampled rows, plus a fixed workspace.
        let activations = f64::from(max_batch_tokens)
            * (4.0 * f64::from(m.hidden) + 2.0 * f64::from(m.intermediate))
            * f64::from(m.dtype_bytes)
            + f64::from(max_batch_tokens.min(1024)) * f64::from(m.vocab) * 4.0
            + 1e9;
        let left = budget - m.weight_bytes() as f64 - activations;
        let block_bytes = (m.kv_bytes_per_token() * u64::from(block_tokens)) as f64;
        if left < block_bytes {
            return Err(SchedulerError::Config(format!(
                "model `{}` ({:.1} GB of weights) leaves no room for a KV cache in {:.0}% of {} ({:.0} GB); \
                 raise kv_memory_fraction or use more gpus",
                m.name,
                m.weight_bytes() as f64 / 1e9,
                kv_memory_fraction * 100.0,
                self.hardware.name,
                self.hardware.total_memory_bytes() as f64 / 1e9
            )));
        }
        Ok((left / block_bytes).min(f64::from(u32::MAX - 1)) as u32)
    }
}

impl DemandModel for PerfModel {
    fn prefill_demand(&self, start_tokens: u64, len_tokens: u64) -> Demand {
        if len_tokens == 0 {
            return Demand::ZERO;
        }
        self.demand(&self.piece_cost(start_tokens, len_tokens, false))
    }

    fn decode_demand(&self, prompt_tokens: u64, output_tokens: u64) -> Demand {
        let steps = output_tokens.saturating_sub(1) as f64;
        if steps == 0.0 {
            return Demand::ZERO;
        }
        // Each decode step's share of that step's weight pass.
        let weight_share = StepCost {
            weight_bytes: steps * self.model.weight_bytes_per_step() as f64
                / self.decode_concurrency_hint.max(1.0),
            ..StepCost::default()
        };
        self.demand(&self.decode_cost(prompt_tokens, output_tokens)) + self.demand(&weight_share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100_llama() -> PerfModel {
        PerfModel::new(
            ModelConfig::preset("llama3-8b").unwrap(),
            HardwareConfig::preset("h100").unwrap(),
            Executor::Sequential,
        )
    }

    #[test]
    fn executors_order_and_parse() {
        let mut p = h100_llama();
        let mut cost = p.step_base_cost();
        cost += p.piece_cost(0, 2048, true);
        for _ in 0..64 {
            cost += p.piece_cost(4000, 1, true);
        }
        let seq = p.time(&cost).secs;
        p.executor = Executor::Overlapped;
        let ovl = p.time(&cost).secs;
        p.executor = "partial:0.5".parse().unwrap();
        let half = p.time(&cost).secs;
        assert!(ovl < half && half < seq, "{ovl} {half} {seq}");
        assert!((half - (seq + ovl) / 2.0).abs() < 1e-12);
        assert!("partial:2".parse::<Executor>().is_err());
        assert_eq!("max".parse::<Executor>().unwrap(), Executor::Overlapped);
    }

    /// On the H200 at its 700 W limit a step half GEMM, half decode attention gains little
    /// from overlap however the SMs are split (NOTES.md section 13); without the power model
    /// the ideal `max(compute, memory)` would nearly halve it.
    #[test]
    fn the_power_limit_bounds_overlap() {
        let mut p = PerfModel::new(
            ModelConfig::preset("llama3-8b").unwrap(),
            HardwareConfig::preset("h200").unwrap(),
            Executor::Sequential,
        );
        let mut cost = p.step_base_cost();
        cost += p.piece_cost(0, 1024, true);
        for _ in 0..256 {
            cost += p.piece_cost(2048, 1, true);
        }
        let t = p.time(&cost);
        let sequential = t.secs;
        // Balanced: decode attention within 25% of the rest.
        assert!((t.memory_secs / t.compute_secs - 1.0).abs() < 0.6, "{t:?}");
        p.executor = Executor::Overlapped;
        let overlapped = p.time(&cost);
        assert_eq!(overlapped.secs, overlapped.power_secs, "{overlapped:?}");
        let gain = sequential / overlapped.secs;
        assert!(gain > 1.0 && gain < 1.15, "{gain}");
        p.hardware.power = None;
        let ideal = sequential / p.time(&cost).secs;
        assert!(ideal > 1.5, "{ideal}");
        // Sequentially each operator alone is held a little (the preset's 791 TFLOP/s GEMMs
        // would draw more than 700 W; sustained they ran at 643).
        p.executor = Executor::Sequential;
        let unlimited = p.time(&cost).secs;
        assert!(sequential >= unlimited && sequential < 1.1 * unlimited);
    }

    #[test]
    fn decode_step_is_weight_bound_and_prefill_compute_bound() {
        let p = h100_llama();
        let mut decode = p.step_base_cost();
        decode += p.piece_cost(100, 1, true);
        let t = p.time(&decode);
        // 16 GB of weights at 3.0 TB/s: about 5 ms.
        assert!(t.memory_secs > 10.0 * t.compute_secs);
        assert!((t.secs - 5.35e-3).abs() < 0.5e-3, "{}", t.secs);
        let mut prefill = p.step_base_cost();
        prefill += p.piece_cost(0, 8192, true);
        let t = p.time(&prefill);
        assert!(t.compute_secs > 5.0 * t.memory_secs);
    }

    #[test]
    fn request_demand_reflects_shape() {
        let p = h100_llama();
        let compute_heavy = p.prefill_demand(0, 4000) + p.decode_demand(4000, 10);
        let memory_heavy = p.prefill_demand(0, 4000) + p.decode_demand(4000, 4000);
        assert!(compute_heavy.density() > 1.0);
        assert!(memory_heavy.density() < 1.0);
    }

    #[test]
    fn kv_capacity_is_bounded_and_errors_name_the_setting() {
        let p = h100_llama();
        let blocks = p.kv_capacity_blocks(0.9, 16, 8192).unwrap();
        let gb = f64::from(blocks) * 16.0 * 131_072.0 / 1e9;
        assert!(gb > 40.0 && gb < 56.0, "{gb}");
        let big = PerfModel::new(
            ModelConfig::preset("llama3-70b").unwrap(),
            HardwareConfig::preset("h100").unwrap(),
            Executor::Sequential,
        );
        let err = big
            .kv_capacity_blocks(0.9, 16, 8192)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kv_memory_fraction"), "{err}");
    }
}
