//! The memory lane's bandwidth: the stream decode kernel run as k blocks (one an SM, so on k
//! SMs) over uniform and mixed-context decode batches of the Llama-3-8B shape (8 KV heads x 128
//! dims, bf16), beside the default decode kernel on the whole GPU, every output checked against
//! the default's. Prints one JSON object (`experiments/gpu/decode_lane.py` reads it).
//!
//! ```text
//! cargo build --release -p model --example decode_lane_bench --features cuda
//! ./target/release/examples/decode_lane_bench [--quick] > lane.json
//! ```

use model::cuda::{CudaLlama, DecodeKernel, StreamVariant};
use serde_json::json;

mod common;

use common::{
    compare_outputs, context_blocks, decode_batch, llama3_8b, shuffled_block_ids, spread_contexts,
};

const BLOCK: usize = 16;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut one = CudaLlama::random(llama3_8b(1), 0, 1).expect("model");
    let default = one.decode_kernel();
    let sms = one.sm_count();
    let cases: &[(usize, usize, usize)] = if quick {
        &[(64, 2048, 2048), (256, 64, 4096)]
    } else {
        &[
            (32, 512, 512),
            (64, 2048, 2048),
            (256, 2048, 2048),
            (128, 4096, 4096),
            (32, 16384, 16384),
            (512, 512, 512),
            (256, 64, 4096),
            (128, 128, 8192),
            (64, 512, 16384),
            (400, 1024, 3072),
        ]
    };
    let ctas: &[usize] = &[8, 16, 24, 32, 40, 48, 64, 96, sms];
    let mut rows = Vec::new();
    for &(seqs, lo, hi) in cases {
        let ctxs = spread_contexts(seqs, lo, hi);
        let blocks = context_blocks(&ctxs, BLOCK);
        let cache = one.new_cache(blocks + 64, BLOCK).expect("cache");
        let bt = decode_batch(&ctxs, BLOCK, &shuffled_block_ids(blocks));
        one.randomize_attention_inputs(&bt, &cache, 11)
            .expect("inputs");
        let kv_bytes = (ctxs.iter().sum::<usize>() * 8 * 128 * 2 * 2) as f64;
        let time = |one: &mut CudaLlama| {
            one.time_attention(&bt, &cache, 3).expect("attention");
            let secs = one.time_attention(&bt, &cache, 20).expect("attention");
            (secs, one.attention_output(seqs).expect("output"))
        };
        one.set_decode_kernel(default).expect("kernel");
        let (base_secs, reference) = time(&mut one);
        eprintln!(
            "b={seqs} ctx={lo}..{hi} {default:?} on {sms} SMs: {:.1} us, {:.0} GB/s",
            base_secs * 1e6,
            kv_bytes / base_secs / 1e9
        );
        rows.push(
            json!({"batch": seqs, "ctx_lo": lo, "ctx_hi": hi, "kernel": format!("{default:?}"),
                         "sms": sms, "secs": base_secs, "gbps": kv_bytes / base_secs / 1e9,
                         "max_abs_diff": 0.0, "non_finite": 0}),
        );
        for variant in StreamVariant::ALL {
            one.set_decode_kernel(DecodeKernel::Stream(variant))
                .expect("stream kernel");
            for &k in ctas {
                if variant != StreamVariant::DEFAULT && k != 32 && k != 40 && k != sms {
                    continue;
                }
                one.set_stream_decode_ctas(Some(k));
                let (secs, got) = time(&mut one);
                let (diff, non_finite) = compare_outputs(&got, &reference);
                let gbps = kv_bytes / secs / 1e9;
                eprintln!(
                    "  stream w{}s{} on {k} SMs: {:.1} us, {gbps:.0} GB/s ({:.0} an SM), \
                     max |diff| {diff:.2e}, {non_finite} non-finite",
                    variant.warps,
                    variant.stages,
                    secs * 1e6,
                    gbps / k as f64
                );
                rows.push(json!({"batch": seqs, "ctx_lo": lo, "ctx_hi": hi,
                                 "kernel": format!("stream_w{}_s{}", variant.warps, variant.stages),
                                 "sms": k, "secs": secs, "gbps": gbps,
                                 "max_abs_diff": diff, "non_finite": non_finite}));
            }
        }
        one.set_stream_decode_ctas(None);
    }
    println!("{}", json!({"sms": sms, "rows": rows}));
}
