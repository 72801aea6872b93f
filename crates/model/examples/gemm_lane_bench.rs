//! The compute lane's GEMMs: cuBLAS and the persistent wgmma kernel on the whole GPU and on
//! all but k SMs (cuBLAS told the SM count, the persistent kernel run as that many blocks),
//! over the Llama-3-8B layer shapes, each persistent output checked against cuBLAS's. Prints one
//! JSON object; fails if an output differs from cuBLAS's by more than bf16 rounding.
//!
//! ```text
//! cargo build --release -p model --example gemm_lane_bench --features cuda
//! ./target/release/examples/gemm_lane_bench [--quick] [--pairs-only] > gemm.json
//! ./target/release/examples/gemm_lane_bench --invariance   # batch invariance, bit for bit
//! ```

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use model::cuda::{CudaLlama, DecodeKernel, LaneGemm, SmSplit, StepExecutor, StreamVariant};
use serde_json::{json, Value};

mod common;

use common::{context_blocks, decode_batch, llama3_8b, shuffled_block_ids, spread_contexts};

const BLOCK: usize = 16;

/// Marks the start of a benchmark phase on stderr with the Unix time, to line up with clock and
/// power samples (`nvidia-smi --query-gpu=timestamp,... -lms 20`).
fn phase(what: &str) {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    eprintln!("phase {what} at {at:.3}");
}

/// Random bf16 in [-1, 1) (a fixed LCG), uploaded.
fn random_bf16(stream: &std::sync::Arc<CudaStream>, n: usize, seed: u64) -> CudaSlice<u16> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let host: Vec<u16> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let f = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            (f.to_bits() >> 16) as u16
        })
        .collect();
    stream.clone_htod(&host).expect("upload")
}

fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// A Llama-3-8B layer's GEMMs: (k, n, name) of `out[m, n] = x[m, k] · w[n, k]ᵀ`.
const LAYER_GEMMS: [(usize, usize, &str); 4] = [
    (4096, 6144, "qkv"),
    (4096, 4096, "o"),
    (4096, 28672, "gate_up"),
    (14336, 4096, "down"),
];

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut one = CudaLlama::random(llama3_8b(1), 0, 1).expect("model");
    let sms = one.sm_count();
    if std::env::args().any(|a| a == "--invariance") {
        invariance(&one);
        return;
    }
    let pairs = lane_pairs(&mut one, quick);
    if std::env::args().any(|a| a == "--pairs-only") {
        println!("{}", json!({"sms": sms, "pairs": pairs}));
        return;
    }
    let Some(rows) = gemm_table(&one, quick) else {
        eprintln!("no persistent GEMM on this GPU (compute capability 9.0 only)");
        return;
    };
    let device = one.device_name().unwrap_or_default();
    println!(
        "{}",
        serde_json::to_string_pretty(
            &json!({"device": device, "sms": sms, "gemms": rows, "pairs": pairs})
        )
        .expect("json")
    );
}

/// The largest |got - reference| over the largest |reference| (bf16 words).
fn relative_error(got: &[u16], reference: &[u16]) -> f32 {
    let (mut max_diff, mut max_ref) = (0.0f32, 0.0f32);
    for (a, b) in got.iter().zip(reference) {
        let (a, b) = (bf16_to_f32(*a), bf16_to_f32(*b));
        max_diff = max_diff.max((a - b).abs());
        max_ref = max_ref.max(b.abs());
    }
    max_diff / max_ref.max(1e-6)
}

/// Every layer GEMM at several row counts: cuBLAS and the persistent kernel on the whole GPU
/// and on all but k SMs, the persistent output checked against cuBLAS's. `None` without the
/// persistent kernel.
fn gemm_table(one: &CudaLlama, quick: bool) -> Option<Vec<Value>> {
    let stream = one.stream().clone();
    let sms = one.sm_count();
    let ptr = |s: &CudaSlice<u16>| {
        let (p, _guard) = s.device_ptr(&stream);
        p
    };
    let ms: &[usize] = if quick {
        &[1024, 4096]
    } else {
        &[256, 512, 1024, 2048, 4096]
    };
    let memory_sms: &[usize] = &[16, 32, 40];
    let g = one.gemm();
    if !g.set_persistent_ctas(0) {
        return None;
    }
    let mut rows = Vec::new();
    for &(k, n, name) in &LAYER_GEMMS {
        let w = random_bf16(&stream, n * k, 7);
        for &m in ms {
            let x = random_bf16(&stream, m * k, 11 + m as u64);
            let y_ref = stream.alloc_zeros::<u16>(m * n).expect("alloc");
            let y = stream.alloc_zeros::<u16>(m * n).expect("alloc");
            let (wp, xp) = (ptr(&w), ptr(&x));
            let reps = (2e11 / (2.0 * (m * n * k) as f64)).clamp(5.0, 200.0) as usize;
            // (persistent blocks, cuBLAS SM target): 0 blocks is cuBLAS.
            let time = |blocks: usize, target: usize, out: u64| {
                g.set_persistent_ctas(blocks);
                g.set_sm_count_target(target).expect("target");
                g.bf16(out, xp, wp, m, k, n, false).expect("gemm");
                let secs = one
                    .time(reps, |_| g.bf16(out, xp, wp, m, k, n, false))
                    .expect("gemm");
                g.set_persistent_ctas(0);
                g.set_sm_count_target(0).expect("target");
                secs
            };
            let cublas_full = time(0, 0, ptr(&y_ref));
            let persistent_full = time(sms, 0, ptr(&y));
            let rel_err = relative_error(
                &stream.clone_dtoh(&y).expect("download"),
                &stream.clone_dtoh(&y_ref).expect("download"),
            );
            // bf16 rounding of an f32 sum differs by at most a few ulps of the output; more is
            // a broken kernel.
            assert!(
                rel_err < 0.02,
                "{name} m={m}: persistent GEMM differs from cuBLAS by {rel_err} of the largest output"
            );
            let tflops = |secs: f64| 2.0 * (m * n * k) as f64 / secs / 1e12;
            let best_full = cublas_full.min(persistent_full);
            let mut lanes = Vec::new();
            for &kk in memory_sms {
                let lane = sms - kk;
                let cublas = time(0, lane, ptr(&y));
                let persistent = time(lane, 0, ptr(&y));
                // Linear scaling of the whole GPU's best time to the lane's SMs.
                let linear = best_full * sms as f64 / lane as f64;
                eprintln!(
                    "{name} m={m}: {lane} SMs: cuBLAS {:.0} TFLOP/s ({:.2} of linear), \
                     persistent {:.0} ({:.2})",
                    tflops(cublas),
                    linear / cublas,
                    tflops(persistent),
                    linear / persistent
                );
                lanes.push(json!({
                    "memory_sms": kk, "lane_sms": lane,
                    "cublas_secs": cublas, "persistent_secs": persistent,
                    "cublas_of_linear": linear / cublas,
                    "persistent_of_linear": linear / persistent,
                }));
            }
            eprintln!(
                "{name} m={m} k={k} n={n}: whole GPU cuBLAS {:.0} TFLOP/s, persistent {:.0} \
                 (max error {rel_err:.4} of the largest output)",
                tflops(cublas_full),
                tflops(persistent_full)
            );
            rows.push(json!({
                "name": name, "m": m, "k": k, "n": n,
                "cublas_full_secs": cublas_full, "persistent_full_secs": persistent_full,
                "max_rel_error": rel_err, "lanes": lanes,
            }));
        }
    }
    Some(rows)
}

/// The lanes side by side: one layer's four GEMMs for `rows` tokens on the compute lane (cuBLAS
/// with an SM target, or the persistent kernel) beside the stream decode kernel on the memory
/// lane's k SMs, repeated so that both take about as long on the whole GPU; the gain is the
/// two run back to back on the whole GPU (cuBLAS, the default decode kernel) over the pair.
fn lane_pairs(one: &mut CudaLlama, quick: bool) -> Vec<Value> {
    let stream = one.stream().clone();
    let sms = one.sm_count();
    let ptr = |s: &CudaSlice<u16>| {
        let (p, _guard) = s.device_ptr(&stream);
        p
    };
    let weights: Vec<CudaSlice<u16>> = LAYER_GEMMS
        .iter()
        .enumerate()
        .map(|(i, &(k, n, _))| random_bf16(&stream, n * k, 100 + i as u64))
        .collect();
    let ctxs = spread_contexts(256, 1024, 3072);
    let blocks = context_blocks(&ctxs, BLOCK);
    let cache = one.new_cache(blocks + 64, BLOCK).expect("cache");
    let batch = decode_batch(&ctxs, BLOCK, &shuffled_block_ids(blocks));
    one.randomize_attention_inputs(&batch, &cache, 11)
        .expect("inputs");
    let default_decode = one.decode_kernel();
    let attention_full = one.time_attention(&batch, &cache, 20).expect("attention");
    let row_counts: &[usize] = if quick { &[1024] } else { &[512, 1024, 2048] };
    let mut out = Vec::new();
    for &rows in row_counts {
        let x = random_bf16(&stream, rows * 14336, 5);
        let y = stream.alloc_zeros::<u16>(rows * 28672).expect("alloc");
        let (xp, yp) = (ptr(&x), ptr(&y));
        let wps: Vec<u64> = weights.iter().map(&ptr).collect();
        let layer_gemms = |g: &model::cuda::Gemm, times: usize| {
            for _ in 0..times {
                for (&(k, n, _), &wp) in LAYER_GEMMS.iter().zip(&wps) {
                    g.bf16(yp, xp, wp, rows, k, n, false)?;
                }
            }
            Ok(())
        };
        one.time(2, |m| layer_gemms(m.gemm(), 1)).expect("gemm");
        let gemm_full = one.time(5, |m| layer_gemms(m.gemm(), 1)).expect("gemm");
        // Layers of GEMMs and attentions of about equal time on the whole GPU.
        // `--sustain`: 50 times as long (about half a second a timing), for clock sampling.
        let scale = if std::env::args().any(|a| a == "--sustain") {
            50
        } else {
            1
        };
        let attention_reps = ((gemm_full * 8.0 / attention_full).round() as usize).max(1) * scale;
        let gemm_reps = 8 * scale;
        // Back to back on the whole GPU; with `--sustain` timed for as long as the pairs (the
        // board's power limit acts over such spans, not over a few milliseconds).
        let mut sequential = gemm_full * gemm_reps as f64 + attention_full * attention_reps as f64;
        if scale > 1 {
            phase(&format!("whole-gpu-gemm rows={rows}"));
            let gemm = one.time(1, |m| {
                (0..gemm_reps).try_for_each(|_| layer_gemms(m.gemm(), 1))
            });
            phase(&format!("whole-gpu-attention rows={rows}"));
            let attention = one.time_attention(&batch, &cache, attention_reps);
            phase("end");
            sequential =
                gemm.expect("gemm") + attention.expect("attention") * attention_reps as f64;
            eprintln!(
                "rows={rows}: back to back on the whole GPU, sustained: {:.1} ms",
                sequential * 1e3
            );
        }
        one.set_decode_kernel(DecodeKernel::Stream(StreamVariant::DEFAULT))
            .expect("stream kernel");
        for memory_sms in [16, 24, 32, 40] {
            one.set_executor(StepExecutor::Overlapped {
                memory_sms,
                split: SmSplit::GemmTarget,
            })
            .expect("lanes");
            one.set_stream_decode_ctas(Some(memory_sms));
            for kind in [LaneGemm::Cublas, LaneGemm::Persistent] {
                one.set_lane_gemm(kind).expect("lane GEMM");
                let mut time = |attention: usize, gemms: usize| {
                    one.time_lanes_together(&batch, &cache, attention, |g| layer_gemms(g, gemms))
                        .expect("lanes")
                };
                time(attention_reps, gemm_reps);
                let at =
                    |what: &str| phase(&format!("{what} rows={rows} memory {memory_sms} {kind:?}"));
                at("gemm");
                let gemm_alone = time(0, gemm_reps).1;
                at("attention");
                let attention_alone = time(attention_reps, 0).0;
                at("together");
                let (attention_beside, gemm_beside) = time(attention_reps, gemm_reps);
                phase("end");
                let both = attention_beside.max(gemm_beside);
                eprintln!(
                    "pair rows={rows} memory {memory_sms} SMs, {kind:?}: GEMMs {:.2} ms \
                     ({:.2} of linear; {:.2} ms beside attention), attention {:.2} ms ({:.2} of \
                     the whole GPU's; {:.2} ms beside the GEMMs), together {:.2} ms; back to \
                     back on the whole GPU {:.2} ms: gain {:.2}x (ideal {:.2}x)",
                    gemm_alone * 1e3,
                    gemm_full * gemm_reps as f64 * sms as f64
                        / (sms - memory_sms) as f64
                        / gemm_alone,
                    gemm_beside * 1e3,
                    attention_alone * 1e3,
                    attention_full * attention_reps as f64 / attention_alone,
                    attention_beside * 1e3,
                    both * 1e3,
                    sequential * 1e3,
                    sequential / both,
                    sequential
                        / (gemm_full * gemm_reps as f64)
                            .max(attention_full * attention_reps as f64),
                );
                out.push(json!({
                    "rows": rows, "memory_sms": memory_sms, "lane_gemm": format!("{kind:?}"),
                    "gemm_full_secs": gemm_full * gemm_reps as f64,
                    "attention_full_secs": attention_full * attention_reps as f64,
                    "gemm_lane_secs": gemm_alone, "attention_lane_secs": attention_alone,
                    "gemm_beside_secs": gemm_beside, "attention_beside_secs": attention_beside,
                    "together_secs": both, "gain": sequential / both,
                }));
            }
        }
        one.set_executor(StepExecutor::Sequential)
            .expect("sequential");
        one.set_stream_decode_ctas(None);
        one.set_decode_kernel(default_decode).expect("kernel");
    }
    out
}

/// Batch invariance of the persistent GEMM, bit for bit: every tile gives the 128 x 128 tile's
/// output, and the first rows of a large batch equal the same rows run alone (batch-invariant
/// mode: tiles chosen per shape). Panics on the first difference.
fn invariance(one: &CudaLlama) {
    let stream = one.stream().clone();
    let g = one.gemm();
    let sms = one.sm_count();
    if !g.set_batch_invariant(true) {
        eprintln!("no persistent GEMM on this GPU");
        return;
    }
    let ptr = |s: &CudaSlice<u16>| {
        let (p, _guard) = s.device_ptr(&stream);
        p
    };
    let tiles = [(128, 256), (128, 128), (64, 256), (64, 32)];
    // (gate_up's 235 MB of weights would test nothing qkv and o do not.)
    for (k, n, name) in LAYER_GEMMS.into_iter().filter(|g| g.2 != "gate_up") {
        let w = random_bf16(&stream, n * k, 3);
        let x = random_bf16(&stream, 600 * k, 4);
        let run = |m: usize, tile: Option<(usize, usize)>| {
            let y = stream.alloc_zeros::<u16>(m * n).expect("alloc");
            assert!(g.set_persistent_tile(tile));
            g.bf16(ptr(&y), ptr(&x), ptr(&w), m, k, n, false)
                .expect("gemm");
            g.set_persistent_tile(None);
            stream.clone_dtoh(&y).expect("download")
        };
        let reference = run(600, Some((128, 128)));
        for &tile in &tiles {
            let got = run(600, Some(tile));
            let diff = got.iter().zip(&reference).filter(|(a, b)| a != b).count();
            eprintln!(
                "{name}: tile {tile:?} differs from 128 x 128 in {diff} of {}",
                got.len()
            );
            assert_eq!(diff, 0, "{name}: tile {tile:?} is not bit-identical");
        }
        // Batches of 1, 3, 64, 200 rows against the first rows of 600, tiles chosen per shape
        // on the whole GPU.
        let whole = run(600, None);
        assert_eq!(whole, reference, "{name}: the chosen tiles differ");
        for m in [1, 3, 64, 200] {
            let got = run(m, None);
            let diff = got.iter().zip(&whole).filter(|(a, b)| a != b).count();
            eprintln!("{name}: {m} rows alone vs within 600 ({sms} SMs): {diff} differ");
            assert_eq!(diff, 0, "{name}: rows depend on the batch");
        }
    }
    g.set_batch_invariant(false);
    eprintln!("batch invariance: every check bit-identical");
}
