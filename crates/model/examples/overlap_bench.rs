//! Step time of the sequential and the overlapped executors (`StepExecutor`) on blended batches
//! of a Llama-3-8B-shaped bf16 model with random weights, from all-prefill to all-decode, in one
//! run; and the two lanes alone (prefill part only, decode part only), whose max is the ideal
//! overlapped time and whose sum the sequential time a perfect model predicts. Also checks that
//! both executors give the same greedy tokens. Prints one JSON object (text on stderr).
//!
//! ```text
//! cargo build --release -p model --example overlap_bench --features cuda
//! ./target/release/examples/overlap_bench [--layers N] [--ctx TOKENS] [--executors LIST] > out.json
//! ```

use std::time::Instant;

use model::cuda::{CudaLlama, StepExecutor};
use model::{CudaStepModel, ForwardBatch, SequenceChunk, StepModel};
use serde_json::json;

mod common;

use common::{llama3_8b, shuffled_block_ids};

const BLOCK: usize = 16;

/// Hands out the cache's blocks in a fixed shuffled order, so tables are not contiguous.
struct Blocks {
    ids: Vec<u32>,
    next: usize,
}

impl Blocks {
    fn new(num_blocks: usize) -> Blocks {
        Blocks {
            ids: shuffled_block_ids(num_blocks),
            next: 0,
        }
    }

    fn take(&mut self, tokens: usize) -> Vec<u32> {
        let n = tokens.div_ceil(BLOCK);
        assert!(self.next + n <= self.ids.len(), "cache too small");
        self.next += n;
        self.ids[self.next - n..self.next].to_vec()
    }
}

fn seq(tokens: usize, start: usize, salt: usize, blocks: &mut Blocks) -> SequenceChunk {
    SequenceChunk {
        tokens: (0..tokens)
            .map(|i| ((salt * 7919 + i * 31) % 128000) as u32 + 3)
            .collect(),
        start_position: start,
        block_table: blocks.take(start + tokens),
        logits: true,
    }
}

/// One prefill chunk of `prefill_tokens` (as sequences of at most 2048 tokens) and
/// `decode_seqs` decode tokens at context `ctx`, decode sequences first (the engine's order).
fn blend(
    prefill_tokens: usize,
    decode_seqs: usize,
    ctx: usize,
    blocks: &mut Blocks,
) -> ForwardBatch {
    let mut sequences = Vec::new();
    for d in 0..decode_seqs {
        sequences.push(seq(1, ctx - 1, d, blocks));
    }
    let mut left = prefill_tokens;
    let mut salt = decode_seqs;
    while left > 0 {
        let n = left.min(2048);
        sequences.push(seq(n, 0, salt, blocks));
        left -= n;
        salt += 1;
    }
    ForwardBatch { sequences }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let layers: usize = arg("--layers").map_or(32, |v| v.parse().expect("--layers N"));
    let ctx: usize = arg("--ctx").map_or(1024, |v| v.parse().expect("--ctx TOKENS"));
    let executors: Vec<StepExecutor> = arg("--executors")
        .unwrap_or_else(|| {
            "overlap,overlap-gemm:16,overlap-gemm:32,overlap-gemm:48,overlap-green:64".into()
        })
        .split(',')
        .map(|e| e.parse().expect("executor"))
        .collect();
    // (prefill tokens, decode sequences), all-prefill to all-decode.
    let blends: &[(usize, usize)] = &[
        (2048, 0),
        (2048, 64),
        (1536, 128),
        (1024, 128),
        (1024, 256),
        (512, 256),
        (512, 320),
        (256, 320),
        (0, 320),
    ];
    let t0 = Instant::now();
    let mut model = CudaStepModel::new(CudaLlama::random(llama3_8b(layers), 0, 2).expect("model"));
    eprintln!("{layers}-layer model in {:.1}s", t0.elapsed().as_secs_f64());
    let max_tokens = blends
        .iter()
        .map(|&(p, d)| p + BLOCK * 2 + d * (ctx + BLOCK))
        .max()
        .unwrap_or(0);
    let num_blocks = max_tokens / BLOCK + 64;
    model.allocate_cache(num_blocks, BLOCK).expect("cache");
    let sm_total = model.model().sm_count();

    let try_time = |m: &mut CudaStepModel, b: &ForwardBatch, reps: usize| {
        m.step_async(b)?;
        m.model().synchronize()?;
        let t = Instant::now();
        for _ in 0..reps {
            m.step_async(b)?;
        }
        m.model().synchronize()?;
        Ok::<f64, model::ModelError>(t.elapsed().as_secs_f64() / reps as f64)
    };
    let time = |m: &mut CudaStepModel, b: &ForwardBatch, reps: usize| -> f64 {
        try_time(m, b, reps).expect("step")
    };
    let reps = 4;
    let mut rows = Vec::new();
    for &(p, d) in blends {
        let mut blocks = Blocks::new(num_blocks);
        let b = blend(p, d, ctx, &mut blocks);
        let parts: Vec<ForwardBatch> = [true, false]
            .iter()
            .map(|&prefill| ForwardBatch {
                sequences: b
                    .sequences
                    .iter()
                    .filter(|s| (s.tokens.len() > 1) == prefill)
                    .cloned()
                    .collect(),
            })
            .collect();
        model
            .model_mut()
            .set_executor(StepExecutor::Sequential)
            .expect("executor");
        let sequential = time(&mut model, &b, reps);
        let prefill_alone = time(&mut model, &parts[0], reps);
        let decode_alone = time(&mut model, &parts[1], reps);
        let reference = model.step_greedy(&b).expect("step");
        // Logits of the (1024, 128) blend, compared across executors.
        let compare_logits = (p, d) == (1024, 128);
        let reference_logits = if compare_logits {
            model.step_logits(&b).expect("step")
        } else {
            Vec::new()
        };
        eprintln!(
            "prefill {p:5} + decode {d:3}x{ctx}: sequential {:7.2} ms (prefill alone {:7.2}, \
             decode alone {:7.2}; max {:7.2})",
            sequential * 1e3,
            prefill_alone * 1e3,
            decode_alone * 1e3,
            prefill_alone.max(decode_alone) * 1e3
        );
        let mut by_executor = Vec::new();
        for &e in &executors {
            if let Err(err) = model.model_mut().set_executor(e) {
                eprintln!("    {e}: {err}");
                by_executor.push(json!({"executor": e.to_string(), "error": err.to_string()}));
                continue;
            }
            let run =
                try_time(&mut model, &b, reps).and_then(|secs| Ok((secs, model.step_greedy(&b)?)));
            let (secs, tokens) = match run {
                Ok(r) => r,
                Err(err) => {
                    eprintln!("    {e}: {err}");
                    by_executor.push(json!({"executor": e.to_string(), "error": err.to_string()}));
                    continue;
                }
            };
            let same = tokens
                .iter()
                .zip(&reference)
                .filter(|(a, b)| a == b)
                .count();
            let (prefill_sms, decode_sms) = model.model().lane_sms().unwrap_or((sm_total, 0));
            let mut max_logit_diff = None;
            if compare_logits {
                let logits = model.step_logits(&b).expect("step");
                let diff = logits
                    .iter()
                    .flatten()
                    .zip(reference_logits.iter().flatten())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                let scale = reference_logits
                    .iter()
                    .flatten()
                    .map(|a| a.abs())
                    .fold(0.0f32, f32::max);
                eprintln!("    {e}: max |logit - sequential| {diff:.4} (max |logit| {scale:.3})");
                max_logit_diff = Some(diff);
            }
            eprintln!(
                "    {:12} {:7.2} ms  {:5.3}x sequential  lanes {prefill_sms}/{decode_sms} SMs (compute/memory)  \
                 greedy tokens equal {same}/{}",
                e.to_string(),
                secs * 1e3,
                sequential / secs,
                tokens.len()
            );
            by_executor.push(json!({
                "executor": e.to_string(), "secs": secs, "speedup": sequential / secs,
                "compute_sms": prefill_sms, "memory_sms": decode_sms,
                "greedy_equal": same, "greedy_total": tokens.len(),
                "max_logit_diff": max_logit_diff,
            }));
        }
        rows.push(json!({
            "prefill_tokens": p, "decode_seqs": d, "decode_ctx": ctx,
            "sequential_secs": sequential, "prefill_alone_secs": prefill_alone,
            "decode_alone_secs": decode_alone, "executors": by_executor,
        }));
    }
    println!(
        "{}",
        json!({"layers": layers, "sm_count": sm_total, "blends": rows})
    );
}
