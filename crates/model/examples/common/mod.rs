//! What the CUDA benchmark examples share: the Llama-3-8B shape, shuffled block ids, decode
//! batches of spread contexts and comparing outputs.

use model::{ForwardBatch, ModelConfig, SequenceChunk};

/// Llama-3-8B's shape with `layers` layers.
pub fn llama3_8b(layers: usize) -> ModelConfig {
    let text = format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": {layers},
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false}}"#
    );
    ModelConfig::from_hf_json(&text, std::path::Path::new("llama3-8b-shape")).expect("valid config")
}

/// Block ids `0..n` in a fixed pseudo-random order (xorshift), so block tables are not
/// contiguous.
pub fn shuffled_block_ids(n: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..n as u32).collect();
    let mut x = 0x2545F491u64;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}

/// How far `got` is from `reference`: the largest absolute difference and how many values of
/// `got` are not finite.
#[allow(dead_code)] // (not every example compares outputs)
pub fn compare_outputs(got: &[f32], reference: &[f32]) -> (f32, usize) {
    let max_abs_diff = got
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    (max_abs_diff, got.iter().filter(|x| !x.is_finite()).count())
}

/// `seqs` contexts spread evenly over [lo, hi], in shuffled order.
#[allow(dead_code)] // (not every example builds decode batches)
pub fn spread_contexts(seqs: usize, lo: usize, hi: usize) -> Vec<usize> {
    shuffled_block_ids(seqs)
        .iter()
        .map(|&k| lo + (hi - lo) * k as usize / (seqs - 1).max(1))
        .collect()
}

/// Cache blocks of `block` tokens the contexts `ctxs` take.
#[allow(dead_code)]
pub fn context_blocks(ctxs: &[usize], block: usize) -> usize {
    ctxs.iter().map(|c| c.div_ceil(block)).sum()
}

/// One decode token a sequence after `ctx - 1` cached ones for each of `ctxs`, the sequences'
/// blocks of `block` tokens taken in turn from `ids`.
#[allow(dead_code)]
pub fn decode_batch(ctxs: &[usize], block: usize, ids: &[u32]) -> ForwardBatch {
    let mut next = 0;
    ForwardBatch {
        sequences: ctxs
            .iter()
            .enumerate()
            .map(|(s, &ctx)| {
                let n = ctx.div_ceil(block);
                next += n;
                SequenceChunk {
                    tokens: vec![(s % 1000) as u32 + 3],
                    start_position: ctx - 1,
                    block_table: ids[next - n..next].to_vec(),
                    logits: false,
                }
            })
            .collect(),
    }
}
