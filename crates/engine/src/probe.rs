//! The probe step a device's executor is chosen on (`blendserve run --step-executor auto`): a
//! blend at the performance model's balance point, where the prefill part and the decode part
//! alone take about as long, so overlapping them has the most to gain.

use model::ProbeBlend;
use scheduler::{Executor, PerfModel, StepCost};

/// Decode context of the probe's decode sequences, in tokens.
const PROBE_DECODE_CONTEXT: usize = 1024;
/// Longest prefill part of a probe.
const PROBE_MAX_PREFILL_TOKENS: u32 = 2048;

/// Seconds a step of `cost` (plus the weights' pass) takes when its operators run one after
/// another.
fn sequential_step_secs(perf: &PerfModel, cost: StepCost) -> f64 {
    let mut sequential = perf.clone();
    sequential.executor = Executor::Sequential;
    let mut step = sequential.step_base_cost();
    step += cost;
    sequential.time(&step).secs
}

/// The work of one step of `blend` as the performance model counts it: the weights' pass, its
/// decode tokens (each at context `decode_context`) and its prefill chunks, every sequence
/// sampling a token.
pub fn probe_cost(perf: &PerfModel, blend: &ProbeBlend) -> StepCost {
    let mut cost = perf.step_base_cost();
    for _ in 0..blend.decode_seqs {
        cost += perf.piece_cost(blend.decode_context as u64 - 1, 1, true);
    }
    for tokens in blend.prefill_chunks() {
        cost += perf.piece_cost(0, tokens as u64, true);
    }
    cost
}

/// Half the step's token budget (at most 2048) as prefill, and the fewest decode sequences at
/// context 1024 whose part the model prices at least as long as the prefill part (within the
/// budget, `max_running` and `kv_blocks` blocks of `block_tokens`). `None` when not even two
/// decode sequences fit, as the overlapped executors need.
pub fn balanced_probe(
    perf: &PerfModel,
    max_batch_tokens: u32,
    max_running: u32,
    kv_blocks: u32,
    block_tokens: u32,
) -> Option<ProbeBlend> {
    let part_secs = |cost: StepCost| sequential_step_secs(perf, cost);
    // At most 2048 tokens: one prefill chunk of the probe.
    let prefill_tokens = (max_batch_tokens / 2).min(PROBE_MAX_PREFILL_TOKENS) as usize;
    let prefill_secs = part_secs(perf.piece_cost(0, prefill_tokens as u64, true));
    let one_decode = perf.piece_cost(PROBE_DECODE_CONTEXT as u64 - 1, 1, true);
    let decode_secs = |seqs: usize| {
        let mut cost = StepCost::default();
        for _ in 0..seqs {
            cost += one_decode;
        }
        part_secs(cost)
    };
    let block = block_tokens.max(1) as usize;
    let mut probe = ProbeBlend {
        prefill_tokens,
        decode_seqs: 0,
        decode_context: PROBE_DECODE_CONTEXT,
    };
    let prefill_blocks = probe.blocks_needed(block);
    let blocks_left = (kv_blocks as usize).saturating_sub(prefill_blocks);
    let max_seqs = (max_running as usize)
        .min(max_batch_tokens as usize - prefill_tokens)
        .min(blocks_left / PROBE_DECODE_CONTEXT.div_ceil(block));
    if max_seqs < 2 {
        return None;
    }
    // The decode part's time grows with its sequences: the first at least as long as prefill.
    let (mut lo, mut hi) = (2, max_seqs);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if decode_secs(mid) >= prefill_secs {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    probe.decode_seqs = lo;
    Some(probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use scheduler::HardwareConfig;

    fn llama8b() -> PerfModel {
        let config = model::ModelConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false}"#,
            std::path::Path::new("llama-8b"),
        )
        .expect("config");
        PerfModel::new(
            crate::perf_model_config(&config, "llama-8b", 2),
            HardwareConfig::preset("h100").expect("preset"),
            Executor::Overlapped,
        )
    }

    /// The probe sits where the two parts cost about the same, and fits the cache and budget.
    #[test]
    fn the_probe_balances_its_parts_and_fits() {
        let perf = llama8b();
        let probe = balanced_probe(&perf, 8192, 1024, 100_000, 16).expect("a probe");
        assert_eq!(probe.prefill_tokens, 2048);
        assert!(
            probe.decode_seqs > 2 && probe.decode_seqs < 1024,
            "{probe:?}"
        );
        let prefill = sequential_step_secs(&perf, perf.piece_cost(0, 2048, true));
        let decode = |n: usize| {
            let mut c = StepCost::default();
            for _ in 0..n {
                c += perf.piece_cost(1023, 1, true);
            }
            sequential_step_secs(&perf, c)
        };
        assert!(decode(probe.decode_seqs) >= prefill);
        assert!(decode(probe.decode_seqs - 1) < prefill);
        // A small cache caps the decode sequences; a tiny one leaves no probe.
        let small = balanced_probe(&perf, 8192, 1024, 128 + 10 * 64, 16).expect("a probe");
        assert_eq!(small.decode_seqs, 10);
        assert!(small.blocks_needed(16) <= 128 + 10 * 64);
        assert_eq!(balanced_probe(&perf, 8192, 1024, 128 + 64, 16), None);
    }
}
