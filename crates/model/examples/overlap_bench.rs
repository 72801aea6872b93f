//! Step time of the sequential and the overlapped executors (`StepExecutor`) on blended batches
//! of a Llama-3-8B-shaped bf16 model with random weights, from all-prefill to all-decode, in one
//! run; and the two lanes alone (prefill part only, decode part only), whose max is the ideal
//! overlapped time and whose sum the sequential time a perfect model predicts. Also checks that
//! both executors give the same greedy tokens. Prints one JSON object (text on stderr).
//!
//! ```text
//! cargo build --release -p model --example overlap_bench --features cuda
//! ./target/release/examples/overlap_bench [--layers N] [--ctx TOKENS] [--executors LIST] \
//!     [--decode-kernel lanes|tensor-cores] [--lane-kernel stream|default] \
//!     [--blends PREFILL:DECODES,...] [--lane-timing] [--reps N] \
//!     [--lane-gemms cublas,persistent] > out.json
//!
//! `--lane-gemms` runs every overlapped executor with each compute-lane GEMM in turn (default:
//! the model's).
//! ```

use std::time::Instant;

use model::cuda::{CudaLlama, DecodeKernel, LaneGemm, StepExecutor, StreamVariant};
use model::{CudaStepModel, ProbeBlend, StepModel, StepWork};
use serde_json::json;

mod common;

use common::{llama3_8b, shuffled_block_ids};

const BLOCK: usize = 16;

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
    let default_blends: &[(usize, usize)] = &[
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
    let blends: Vec<(usize, usize)> = arg("--blends").map_or(default_blends.to_vec(), |v| {
        v.split(',')
            .map(|b| {
                let (p, d) = b.split_once(':').expect("--blends PREFILL:DECODES,...");
                (
                    p.parse().expect("prefill tokens"),
                    d.parse().expect("decodes"),
                )
            })
            .collect()
    });
    let blends = &blends[..];
    let t0 = Instant::now();
    let mut model = CudaStepModel::new(CudaLlama::random(llama3_8b(layers), 0, 2).expect("model"));
    eprintln!("{layers}-layer model in {:.1}s", t0.elapsed().as_secs_f64());
    let probe = |(prefill_tokens, decode_seqs): (usize, usize)| ProbeBlend {
        prefill_tokens,
        decode_seqs,
        decode_context: ctx,
    };
    let num_blocks = blends
        .iter()
        .map(|&b| probe(b).blocks_needed(BLOCK))
        .max()
        .unwrap_or(0)
        + 64;
    model.allocate_cache(num_blocks, BLOCK).expect("cache");
    let decode_kernel = match arg("--decode-kernel").as_deref() {
        None => model.model().decode_kernel(),
        Some("lanes") => DecodeKernel::Lanes,
        Some("tensor-cores") => DecodeKernel::TensorCores,
        Some(other) => panic!("--decode-kernel {other}: lanes or tensor-cores"),
    };
    model
        .model_mut()
        .set_decode_kernel(decode_kernel)
        .expect("decode kernel");
    match arg("--lane-kernel").as_deref() {
        None => {}
        Some("stream") => model
            .model_mut()
            .set_lane_decode_kernel(Some(DecodeKernel::Stream(StreamVariant::DEFAULT))),
        Some("default") => model
            .model_mut()
            .set_lane_decode_kernel(Some(decode_kernel)),
        Some(other) => panic!("--lane-kernel {other}: stream or default"),
    }
    let sm_total = model.model().sm_count();
    // Shuffled blocks, so no block table is contiguous.
    let block_ids = shuffled_block_ids(num_blocks);

    let reps: usize = arg("--reps").map_or(4, |v| v.parse().expect("--reps N"));
    let lane_gemms: Vec<LaneGemm> = arg("--lane-gemms").map_or_else(
        || vec![model.model().lane_gemm()],
        |v| {
            v.split(',')
                .map(|k| k.parse().unwrap_or_else(|e| panic!("--lane-gemms: {e}")))
                .collect()
        },
    );
    let mut rows = Vec::new();
    for &(p, d) in blends {
        let [b, prefill_part, decode_part] = probe((p, d))
            .batches(BLOCK, &block_ids)
            .expect("cache holds the blend");
        model
            .model_mut()
            .set_executor(StepExecutor::Sequential)
            .expect("executor");
        let mut time = |batch| model.time_steps(batch, reps).expect("step");
        let sequential = time(&b);
        let prefill_alone = time(&prefill_part);
        let decode_alone = time(&decode_part);
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
        // The overlap planner's view of the blend (what `overlap-auto` decides from).
        let work = StepWork {
            prefill_tokens: p,
            decodes: d,
            decode_context_tokens: d * ctx,
        };
        let planner = model.model().overlap_planner().clone();
        let config = model.model().config().clone();
        let attention_over_gemm =
            planner.attention_secs(&config, work) / planner.compute_secs(&config, work);
        let planned = planner.plan(&config, work);
        eprintln!(
            "    planner: attention / GEMM {attention_over_gemm:.2}, memory lane {planned:?} SMs"
        );
        let mut by_executor = Vec::new();
        let runs = executors.iter().flat_map(|&e| {
            let kinds = if e == StepExecutor::Sequential {
                &lane_gemms[..1]
            } else {
                &lane_gemms[..]
            };
            kinds.iter().map(move |&kind| (e, kind))
        });
        for (e, lane_gemm) in runs {
            let set = model
                .model_mut()
                .set_executor(e)
                .and_then(|_| model.model_mut().set_lane_gemm(lane_gemm));
            if let Err(err) = set {
                eprintln!("    {e}: {err}");
                by_executor.push(json!({"executor": e.to_string(), "error": err.to_string()}));
                continue;
            }
            let run = model
                .time_steps(&b, reps)
                .and_then(|secs| Ok((secs, model.step_greedy(&b)?)));
            let (secs, tokens) = match run {
                Ok(r) => r,
                Err(err) => {
                    eprintln!("    {e}: {err}");
                    by_executor.push(json!({"executor": e.to_string(), "error": err.to_string()}));
                    continue;
                }
            };
            // The lanes' busy and waiting time of one more step, timed by events.
            let mut lanes = None;
            if args.iter().any(|a| a == "--lane-timing") {
                model.model_mut().set_lane_timing(true);
                let step = model.time_steps(&b, 1).expect("step");
                if let Some((memory, waits)) = model.model().last_lane_secs().expect("timing") {
                    eprintln!(
                        "    {e}: timed step {:.2} ms: memory lane busy {:.2} ms, compute lane \
                         waiting for it {:.2} ms",
                        step * 1e3,
                        memory * 1e3,
                        waits * 1e3
                    );
                    lanes = Some(json!({"step_secs": step, "memory_busy_secs": memory,
                                        "compute_wait_secs": waits}));
                }
                model.model_mut().set_lane_timing(false);
            }
            let same = tokens
                .iter()
                .zip(&reference)
                .filter(|(a, b)| a == b)
                .count();
            let (prefill_sms, decode_sms) = model.model().lane_sms().unwrap_or((sm_total, 0));
            let lane_kernel = format!("{:?}", model.model().lane_decode_kernel());
            let step_memory_sms = model.model().last_step_memory_sms();
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
                 greedy tokens equal {same}/{}  lane {lane_kernel}, GEMM {lane_gemm:?}",
                e.to_string(),
                secs * 1e3,
                sequential / secs,
                tokens.len()
            );
            by_executor.push(json!({
                "executor": e.to_string(), "lane_gemm": format!("{lane_gemm:?}"),
                "secs": secs, "speedup": sequential / secs,
                "compute_sms": prefill_sms, "memory_sms": decode_sms, "lane_kernel": lane_kernel,
                "step_memory_sms": step_memory_sms,
                "greedy_equal": same, "greedy_total": tokens.len(),
                "max_logit_diff": max_logit_diff, "lane_timing": lanes,
            }));
        }
        rows.push(json!({
            "prefill_tokens": p, "decode_seqs": d, "decode_ctx": ctx,
            "sequential_secs": sequential, "prefill_alone_secs": prefill_alone,
            "decode_alone_secs": decode_alone, "executors": by_executor,
            "attention_over_gemm": attention_over_gemm, "planned_memory_sms": planned,
        }));
    }
    println!(
        "{}",
        json!({"layers": layers, "sm_count": sm_total, "decode_kernel": format!("{decode_kernel:?}"), "blends": rows})
    );
}
