//! Speed of the CUDA path on the device: cuBLAS GEMMs at Llama-3-8B shapes, paged decode and
//! prefill attention, and whole decode / prefill steps of a Llama-3-8B-shaped bf16 model with
//! random weights. Prints one JSON object; `experiments/gpu/bench_model.py` runs it beside the
//! same measurements in PyTorch and writes the comparison.
//!
//! ```text
//! cargo build --release -p model --example cuda_bench --features cuda
//! ./target/release/examples/cuda_bench [--quick] > ours.json
//! ```

use std::time::Instant;

use model::cuda::{CudaKvCache, CudaLlama, DecodeKernel, PrefillKernel, WgmmaVariant};
use model::{CudaStepModel, ForwardBatch, SequenceChunk, StepModel};
use serde_json::json;

mod common;

use common::{
    compare_outputs, context_blocks, decode_batch, llama3_8b, shuffled_block_ids, spread_contexts,
};

const BLOCK: usize = 16;

/// `seqs` sequences each with a shuffled run of blocks; `chunk` new tokens at `start`.
fn batch(seqs: usize, start: usize, chunk: usize, num_blocks: usize, logits: bool) -> ForwardBatch {
    batch_in_blocks(seqs, start, chunk, num_blocks, BLOCK, logits)
}

/// [`batch`] for a cache of `block`-token blocks.
fn batch_in_blocks(
    seqs: usize,
    start: usize,
    chunk: usize,
    num_blocks: usize,
    block: usize,
    logits: bool,
) -> ForwardBatch {
    let per_seq = (start + chunk).div_ceil(block);
    assert!(per_seq * seqs <= num_blocks, "cache too small");
    let ids = shuffled_block_ids(per_seq * seqs);
    ForwardBatch {
        sequences: (0..seqs)
            .map(|s| SequenceChunk {
                tokens: (0..chunk)
                    .map(|i| ((s * 7919 + i * 31) % 128000) as u32 + 3)
                    .collect(),
                start_position: start,
                block_table: ids[s * per_seq..(s + 1) * per_seq].to_vec(),
                logits,
            })
            .collect(),
    }
}

/// Each of `kernels` (made current by `choose`) timed over `repeats` launches of `batch`'s
/// attention, with its output (`rows` rows); `restore` is made current afterwards.
#[allow(clippy::too_many_arguments)]
fn time_kernels<K: Copy>(
    one: &mut CudaLlama,
    choose: fn(&mut CudaLlama, K) -> Result<(), model::ModelError>,
    kernels: &[K],
    restore: K,
    batch: &ForwardBatch,
    cache: &CudaKvCache,
    repeats: usize,
    rows: usize,
) -> Vec<(K, f64, Vec<f32>)> {
    let runs = kernels
        .iter()
        .map(|&kernel| {
            choose(one, kernel).expect("kernel");
            let secs = one
                .time_attention(batch, cache, repeats)
                .expect("attention");
            (kernel, secs, one.attention_output(rows).expect("output"))
        })
        .collect();
    choose(one, restore).expect("kernel");
    runs
}

/// Bytes of K and V that `tokens` tokens take in one layer of the 8B shape (8 KV heads x 128
/// dims x bf16).
fn layer_kv_bytes(tokens: usize) -> usize {
    tokens * 8 * 128 * 2 * 2
}

/// A decode kernel and whether it is launched as a programmatic dependent.
#[derive(Clone, Copy)]
struct DecodeLaunch {
    kernel: DecodeKernel,
    dependent: bool,
}

impl std::fmt::Debug for DecodeLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.kernel)?;
        if !self.dependent {
            write!(f, " (plain launch)")?;
        }
        Ok(())
    }
}

fn choose_decode_launch(one: &mut CudaLlama, l: DecodeLaunch) -> Result<(), model::ModelError> {
    one.set_decode_dependent_launch(l.dependent);
    one.set_decode_kernel(l.kernel)
}

/// A cache with room for one decode token after `ctx - 1` cached ones for each `(seqs, ctx)`.
fn decode_cache(one: &CudaLlama, cases: &[(usize, usize)]) -> CudaKvCache {
    let max_tokens = cases
        .iter()
        .map(|&(b, c)| b * (c + BLOCK))
        .max()
        .unwrap_or(0);
    one.new_cache(max_tokens / BLOCK + 64, BLOCK)
        .expect("cache")
}

/// The decode kernels this GPU runs: the model's default for it (tensor cores on an H200,
/// lanes on an H100), then the others it has; the default is left current.
fn decode_kernels(one: &mut CudaLlama) -> Vec<DecodeKernel> {
    let default = one.decode_kernel();
    let mut kernels = vec![default];
    for kernel in [
        DecodeKernel::Lanes,
        DecodeKernel::Registers,
        DecodeKernel::TensorCores,
    ] {
        if kernel != default && one.set_decode_kernel(kernel).is_ok() {
            kernels.push(kernel);
        }
    }
    one.set_decode_kernel(default).expect("kernel");
    kernels
}

/// Decode attention over split counts and occupancies (`--decode-sweep`): each case under each
/// kernel with the split and occupancy `decode_launch_shape` chooses and with 1, 2, 3, 4, 8
/// splits forced (the default kernel at each occupancy it may run at, the others at their
/// own), outputs checked against the default kernel's; and a copy of each case's bytes.
fn decode_sweep(
    one: &mut CudaLlama,
    kernels: &[DecodeKernel],
    copy_gbps: f64,
) -> serde_json::Value {
    let all: &[(usize, usize)] = &[
        (64, 16),
        (64, 128),
        (64, 256),
        (8, 512),
        (8, 4096),
        (32, 2048),
        (40, 4096),
        (48, 2048),
        (96, 512),
        (96, 2048),
        (192, 1024),
        (64, 512),
        (64, 2048),
        (64, 8192),
        (128, 512),
        (128, 2048),
        (256, 512),
        (256, 2048),
        (512, 512),
        (512, 4096),
    ];
    // `--decode-cases 64x512,96x512`: only these.
    let chosen: Vec<(usize, usize)> = std::env::args()
        .skip_while(|a| a != "--decode-cases")
        .nth(1)
        .map(|list| {
            list.split(',')
                .map(|case| {
                    let (b, c) = case.split_once('x').expect("--decode-cases BATCHxCTX,...");
                    (b.parse().expect("batch"), c.parse().expect("context"))
                })
                .collect()
        })
        .unwrap_or_else(|| all.to_vec());
    let cases = &chosen[..];
    let cache = decode_cache(one, cases);
    let mut rows = Vec::new();
    // A copy moving as many bytes as each case reads (half read, half written): the yardstick
    // with the same launch and ramp costs.
    let most = cases
        .iter()
        .map(|&(b, c)| layer_kv_bytes(b * c) / 2)
        .max()
        .unwrap_or(0);
    let stream = one.stream().clone();
    let src = stream.alloc_zeros::<u8>(most).expect("alloc");
    let mut dst = stream.alloc_zeros::<u8>(most).expect("alloc");
    for &(seqs, ctx) in cases {
        let bt = batch(seqs, ctx - 1, 1, cache.num_blocks(), false);
        one.randomize_attention_inputs(&bt, &cache, 5)
            .expect("random inputs");
        let half = layer_kv_bytes(seqs * ctx) / 2;
        let kv_bytes = layer_kv_bytes(seqs * ctx) as f64;
        let copy_secs = one
            .time(50, |_| {
                stream
                    .memcpy_dtod(&src.slice(..half), &mut dst.slice_mut(..half))
                    .map_err(|e| model::ModelError::Cuda(format!("{e:?}")))
            })
            .expect("copy");
        eprintln!(
            "decode sweep b={seqs} ctx={ctx} copy of the same bytes: {:.1} us, {:.0}% of copy",
            copy_secs * 1e6,
            100.0 * kv_bytes / copy_secs / 1e9 / copy_gbps
        );
        rows.push(
            json!({"batch": seqs, "ctx": ctx, "kernel": "copy", "secs": copy_secs,
                         "of_copy": kv_bytes / copy_secs / 1e9 / copy_gbps}),
        );
        // Every run is compared with the first (the default kernel, its own split).
        let mut reference = None;
        for &kernel in kernels {
            one.set_decode_kernel(kernel).expect("kernel");
            let choices = one.decode_occupancy_choices();
            let (auto_splits, auto_blocks_per_sm) =
                model::cuda::decode_launch_shape(seqs * 8, one.sm_count(), &choices, ctx);
            let occupancies = if kernel == DecodeKernel::Lanes {
                choices.clone()
            } else {
                choices[..1].to_vec()
            };
            // (splits, blocks an SM, launched as a programmatic dependent)
            let plain = [(None, None, false)];
            let shapes = std::iter::once((None, None, true))
                .chain(plain.into_iter().filter(|_| kernel == DecodeKernel::Lanes))
                .chain(
                    occupancies
                        .iter()
                        .flat_map(|&k| [1, 2, 3, 4, 8].map(|s| (Some(s), Some(k), true))),
                );
            for (splits, blocks_per_sm, dependent) in shapes {
                one.set_decode_splits(splits);
                one.set_decode_blocks_per_sm(blocks_per_sm);
                one.set_decode_dependent_launch(dependent);
                let secs = one.time_attention(&bt, &cache, 50).expect("attention");
                let got = one.attention_output(seqs).expect("output");
                let reference = reference.get_or_insert_with(|| got.clone());
                let (max_abs_diff, non_finite) = compare_outputs(&got, reference);
                let gbps = kv_bytes / secs / 1e9;
                let label = match (splits, blocks_per_sm) {
                    (Some(s), Some(k)) => format!("{k} blocks/SM, splits {s}"),
                    _ => format!("auto: {auto_blocks_per_sm} blocks/SM, splits {auto_splits}"),
                } + if dependent { "" } else { ", plain launch" };
                eprintln!(
                    "decode sweep b={seqs} ctx={ctx} {kernel:?} {label}: {:.1} us, {:.0}% of \
                     copy, max |diff| vs default {max_abs_diff:.2e}, {non_finite} non-finite",
                    secs * 1e6,
                    100.0 * gbps / copy_gbps
                );
                rows.push(
                    json!({"batch": seqs, "ctx": ctx, "kernel": format!("{kernel:?}"),
                                 "blocks_per_sm": blocks_per_sm, "splits": splits,
                                 "auto_splits": auto_splits,
                                 "auto_blocks_per_sm": auto_blocks_per_sm,
                                 "dependent_launch": dependent, "secs": secs,
                                 "of_copy": gbps / copy_gbps, "max_abs_diff": max_abs_diff,
                                 "non_finite": non_finite}),
                );
            }
        }
    }
    one.set_decode_splits(None);
    one.set_decode_blocks_per_sm(None);
    one.set_decode_dependent_launch(true);
    one.set_decode_kernel(kernels[0]).expect("kernel");
    json!(rows)
}

/// Decode attention over batches whose contexts differ (evenly from `lo` to `hi` tokens, in a
/// shuffled order, as a serving batch has them), launched longest context first (the default)
/// and in batch order, outputs compared.
fn decode_mixed_contexts(one: &mut CudaLlama, copy_gbps: f64) -> serde_json::Value {
    let cases: &[(usize, usize, usize)] = &[
        (256, 64, 4096),
        (128, 128, 8192),
        (96, 32, 1024),
        (64, 512, 4096),
        (512, 16, 2048),
    ];
    let mut rows = Vec::new();
    for &(seqs, lo, hi) in cases {
        let ctxs = spread_contexts(seqs, lo, hi);
        let total = context_blocks(&ctxs, BLOCK);
        let cache = one.new_cache(total + 64, BLOCK).expect("cache");
        let bt = decode_batch(&ctxs, BLOCK, &shuffled_block_ids(total));
        one.randomize_attention_inputs(&bt, &cache, 9)
            .expect("random inputs");
        let kv_bytes = layer_kv_bytes(ctxs.iter().sum()) as f64;
        let mut reference = None;
        for longest_first in [true, false] {
            one.set_decode_longest_first(longest_first);
            one.time_attention(&bt, &cache, 10).expect("attention");
            let secs = one.time_attention(&bt, &cache, 50).expect("attention");
            let got = one.attention_output(seqs).expect("output");
            let reference = reference.get_or_insert_with(|| got.clone());
            let (max_abs_diff, non_finite) = compare_outputs(&got, reference);
            let of_copy = kv_bytes / secs / 1e9 / copy_gbps;
            let order = if longest_first {
                "longest first"
            } else {
                "batch order"
            };
            eprintln!(
                "decode mixed b={seqs} ctx={lo}..{hi} {order}: {:.1} us, {:.0}% of copy, max \
                 |diff| vs longest first {max_abs_diff:.2e}, {non_finite} non-finite",
                secs * 1e6,
                100.0 * of_copy
            );
            rows.push(json!({"batch": seqs, "ctx_lo": lo, "ctx_hi": hi,
                             "longest_first": longest_first, "secs": secs, "of_copy": of_copy,
                             "max_abs_diff": max_abs_diff, "non_finite": non_finite}));
        }
    }
    one.set_decode_longest_first(true);
    json!(rows)
}

/// A few launches of the kernels worth a look under Nsight Compute (`--profile-kernels`): the
/// default prefill attention and the 128-key ping-pong variant at 1 x 8192 from position 0, and
/// decode attention at 64 x 512. Run as `ncu -k regex:NAME -c 1 ... cuda_bench --profile-kernels`.
fn profile_kernels(one: &mut CudaLlama) {
    let cache = one.new_cache(64 * 528 / BLOCK + 600, BLOCK).expect("cache");
    let bt = batch(1, 0, 8192, cache.num_blocks(), false);
    one.randomize_attention_inputs(&bt, &cache, 7)
        .expect("random inputs");
    let k128 = PrefillKernel::Wgmma(
        WgmmaVariant::new(2, 1, true)
            .with_tma()
            .with_keys_per_tile(128),
    );
    let mut kernels = vec![one.prefill_kernel()];
    if one.set_prefill_kernel(k128).is_ok() {
        kernels.push(k128);
    }
    let default = kernels[0];
    for (kernel, secs, _) in time_kernels(
        one,
        CudaLlama::set_prefill_kernel,
        &kernels,
        default,
        &bt,
        &cache,
        3,
        8192,
    ) {
        eprintln!("prefill 1x8192@0 {kernel:?}: {:.1} us", secs * 1e6);
    }
    let bt = batch(64, 511, 1, cache.num_blocks(), false);
    one.randomize_attention_inputs(&bt, &cache, 5)
        .expect("random inputs");
    let secs = one.time_attention(&bt, &cache, 3).expect("decode");
    eprintln!("decode 64x512: {:.1} us", secs * 1e6);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sweep_only = std::env::args().any(|a| a == "--decode-sweep");
    let mut out = serde_json::Map::new();
    let t0 = Instant::now();

    // One layer for the kernel-level measurements.
    let mut one = CudaLlama::random(llama3_8b(1), 0, 1).expect("model");
    out.insert("startup_secs".into(), json!(t0.elapsed().as_secs_f64()));
    let stream = one.stream().clone();
    if std::env::args().any(|a| a == "--profile-kernels") {
        profile_kernels(&mut one);
        return;
    }

    // HBM copy bandwidth (read + write bytes over time).
    let bytes = 2usize << 30;
    let a = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let mut b = stream.alloc_zeros::<u8>(bytes).expect("alloc");
    let secs = one
        .time(10, |_| {
            stream
                .memcpy_dtod(&a, &mut b)
                .map_err(|e| model::ModelError::Cuda(format!("{e:?}")))
        })
        .expect("copy");
    drop((a, b));
    let copy_gbps = 2.0 * bytes as f64 / secs / 1e9;
    out.insert("copy_gbps".into(), json!(copy_gbps));
    eprintln!("copy bandwidth {copy_gbps:.0} GB/s");
    if sweep_only {
        let kernels = decode_kernels(&mut one);
        out.insert(
            "decode_sweep".into(),
            decode_sweep(&mut one, &kernels, copy_gbps),
        );
        out.insert(
            "decode_mixed".into(),
            decode_mixed_contexts(&mut one, copy_gbps),
        );
        println!("{}", serde_json::Value::Object(out));
        return;
    }

    // GEMMs: out[m, n] = x[m, k] w[n, k]^T.
    let shapes = [
        (4096, 6144, "qkv"),
        (4096, 4096, "o"),
        (4096, 28672, "gate_up"),
        (14336, 4096, "down"),
    ];
    let ms: &[usize] = if quick {
        &[1, 256, 4096]
    } else {
        &[1, 16, 64, 256, 1024, 4096, 8192]
    };
    let mut gemms = Vec::new();
    for &(k, n, name) in &shapes {
        let w = stream.alloc_zeros::<u16>(n * k).expect("alloc");
        for &m in ms {
            let x = stream.alloc_zeros::<u16>(m * k).expect("alloc");
            let y = stream.alloc_zeros::<u16>(m * n).expect("alloc");
            let (wp, xp, yp) = (ptr(&w, &stream), ptr(&x, &stream), ptr(&y, &stream));
            let g = one.gemm();
            g.bf16(yp, xp, wp, m, k, n, false).expect("gemm");
            let reps = if m >= 4096 { 20 } else { 50 };
            let secs = one
                .time(reps, |_| g.bf16(yp, xp, wp, m, k, n, false))
                .expect("gemm");
            let tflops = 2.0 * (m * n * k) as f64 / secs / 1e12;
            eprintln!(
                "gemm {name} m={m} k={k} n={n}: {:.1} us, {tflops:.0} TFLOP/s",
                secs * 1e6
            );
            gemms.push(
                json!({"name": name, "m": m, "k": k, "n": n, "secs": secs, "tflops": tflops}),
            );
        }
    }
    out.insert("gemm".into(), json!(gemms));

    // Paged decode attention: one query token per sequence over `ctx` cached tokens.
    let cases: &[(usize, usize)] = if quick {
        &[(64, 2048), (256, 512)]
    } else {
        &[
            (64, 512),
            (64, 2048),
            (64, 8192),
            (128, 2048),
            (256, 512),
            (256, 2048),
            (256, 4096),
            (512, 512),
            (512, 2048),
            (512, 4096),
        ]
    };
    let cache = decode_cache(&one, cases);
    // The default kernel, the same launched plainly (not as a programmatic dependent of the
    // launch before), then (on an H100) the register and tensor-core ones, on the same inputs.
    let decode_kernels = decode_kernels(&mut one);
    let mut launches: Vec<DecodeLaunch> = decode_kernels
        .iter()
        .map(|&kernel| DecodeLaunch {
            kernel,
            dependent: true,
        })
        .collect();
    launches.insert(
        1,
        DecodeLaunch {
            kernel: DecodeKernel::Lanes,
            dependent: false,
        },
    );
    let mut decode = Vec::new();
    for &(seqs, ctx) in cases {
        let bt = batch(seqs, ctx - 1, 1, cache.num_blocks(), false);
        one.randomize_attention_inputs(&bt, &cache, 5)
            .expect("random inputs");
        let kv_bytes = layer_kv_bytes(seqs * ctx) as f64;
        let runs = time_kernels(
            &mut one,
            choose_decode_launch,
            &launches,
            launches[0],
            &bt,
            &cache,
            20,
            seqs,
        );
        let variants: Vec<_> = runs
            .iter()
            .map(|(kernel, secs, got)| {
                let gbps = kv_bytes / secs / 1e9;
                let (max_abs_diff, non_finite) = compare_outputs(got, &runs[0].2);
                eprintln!(
                    "decode attention b={seqs} ctx={ctx} {kernel:?}: {:.1} us, {gbps:.0} GB/s \
                     ({:.0}% of copy), max |diff| vs default {max_abs_diff:.2e}, {non_finite} \
                     non-finite",
                    secs * 1e6,
                    100.0 * gbps / copy_gbps
                );
                json!({"kernel": format!("{kernel:?}"), "secs": secs, "gbps": gbps,
                       "of_copy": gbps / copy_gbps, "max_abs_diff_vs_default": max_abs_diff,
                       "non_finite": non_finite})
            })
            .collect();
        let (secs, gbps) = (runs[0].1, kv_bytes / runs[0].1 / 1e9);
        decode.push(
            json!({"batch": seqs, "ctx": ctx, "secs": secs, "gbps": gbps,
                           "of_copy": gbps / copy_gbps, "variants": variants}),
        );
    }
    out.insert("decode_attention".into(), json!(decode));

    // Decode attention on part of the GPU (a green-context partition; the overlapped executor's
    // memory lane): how much bandwidth a few SMs pull.
    let mut partitions = Vec::new();
    let partition_cases: &[(usize, usize)] = if quick {
        &[(64, 2048)]
    } else {
        &[(256, 2048), (64, 8192)]
    };
    for &(seqs, ctx) in partition_cases {
        let bt = batch(seqs, ctx - 1, 1, cache.num_blocks(), false);
        let kv_bytes = layer_kv_bytes(seqs * ctx) as f64;
        for &kernel in &decode_kernels {
            one.set_decode_kernel(kernel).expect("kernel");
            for sms in [16, 32, 48, 64, 96] {
                match one.time_attention_on_sms(&bt, &cache, sms, 10) {
                    Ok((secs, got)) => {
                        let gbps = kv_bytes / secs / 1e9;
                        eprintln!(
                            "decode attention b={seqs} ctx={ctx} {kernel:?} on {got} SMs: \
                             {:.1} us, {gbps:.0} GB/s ({:.0}% of copy)",
                            secs * 1e6,
                            100.0 * gbps / copy_gbps
                        );
                        partitions.push(json!({"batch": seqs, "ctx": ctx,
                                               "kernel": format!("{kernel:?}"), "sms": got,
                                               "secs": secs, "gbps": gbps,
                                               "of_copy": gbps / copy_gbps}));
                    }
                    Err(e) => eprintln!("decode attention on {sms} SMs: {e}"),
                }
            }
        }
        one.set_decode_kernel(decode_kernels[0]).expect("kernel");
    }
    out.insert("decode_attention_partitions".into(), json!(partitions));

    // Paged prefill attention: `seqs` sequences of `len` new tokens at position `start`, causal.
    // Every case runs both kernels on the same random inputs: the default (wgmma on an H100) is
    // timed and compared with the mma.sync kernel, element by element.
    let cases: &[(usize, usize, usize)] = if quick {
        &[(1, 0, 2048), (1, 4096, 512)]
    } else {
        &[
            (1, 0, 512),
            (1, 0, 1024),
            (1, 0, 2048),
            (1, 0, 4096),
            (1, 0, 8192),
            (4, 0, 2048),
            (1, 4096, 512),
            (8, 2048, 256),
        ]
    };
    let default_kernel = one.prefill_kernel();
    eprintln!("prefill kernel: {default_kernel:?}");
    // The default first, then every other kernel this GPU runs, compared with mma.sync.
    let mut kernels = vec![default_kernel, PrefillKernel::MmaSync];
    for variant in WgmmaVariant::all() {
        let k = PrefillKernel::Wgmma(variant);
        if !kernels.contains(&k) && one.set_prefill_kernel(k).is_ok() {
            kernels.push(k);
        }
    }
    let mut prefill = Vec::new();
    for &(seqs, start, len) in cases {
        let bt = batch(seqs, start, len, cache.num_blocks(), false);
        one.randomize_attention_inputs(&bt, &cache, 7)
            .expect("random inputs");
        let rows = seqs * len;
        let runs = time_kernels(
            &mut one,
            CudaLlama::set_prefill_kernel,
            &kernels,
            default_kernel,
            &bt,
            &cache,
            10,
            rows,
        );
        // Causal: query i of the chunk sees start + i + 1 keys; 4 * d * heads FLOPs a key.
        let flops =
            seqs as f64 * 4.0 * 128.0 * 32.0 * len as f64 * (start as f64 + len as f64 / 2.0);
        let reference = &runs[1].2;
        let variants: Vec<_> = runs
            .iter()
            .map(|(kernel, secs, got)| {
                let (max_abs_diff, non_finite) = compare_outputs(got, reference);
                eprintln!(
                    "prefill attention {seqs}x{len}@{start} {kernel:?}: {:.1} us, {:.0} TFLOP/s, \
                     max |diff| vs mma.sync {max_abs_diff:.2e}, {non_finite} non-finite",
                    secs * 1e6,
                    flops / secs / 1e12,
                );
                json!({"kernel": format!("{kernel:?}"), "secs": secs,
                       "tflops": flops / secs / 1e12,
                       "max_abs_diff_vs_mma_sync": max_abs_diff, "non_finite": non_finite})
            })
            .collect();
        let secs = runs[0].1;
        prefill.push(json!({
            "seqs": seqs, "start": start, "len": len, "secs": secs,
            "tflops": flops / secs / 1e12, "kernel": format!("{default_kernel:?}"),
            "variants": variants,
        }));
    }
    out.insert("prefill_attention".into(), json!(prefill));
    drop(cache);

    // The default prefill kernel over caches of other block sizes (TMA boxes of 8 rows, of 64
    // keys inside 128-token blocks; blocks of 12, which TMA cannot take, fall back), against
    // mma.sync on the same inputs: 2 sequences, 300 new tokens after 100 cached.
    let mut block_sizes = Vec::new();
    for block in [8, 12, 128] {
        let num_blocks = 2 * 400usize.div_ceil(block) + 4;
        let cache = one.new_cache(num_blocks, block).expect("cache");
        let bt = batch_in_blocks(2, 100, 300, num_blocks, block, false);
        one.randomize_attention_inputs(&bt, &cache, 11)
            .expect("random inputs");
        let runs = time_kernels(
            &mut one,
            CudaLlama::set_prefill_kernel,
            &[default_kernel, PrefillKernel::MmaSync],
            default_kernel,
            &bt,
            &cache,
            1,
            600,
        );
        let (max_abs_diff, non_finite) = compare_outputs(&runs[0].2, &runs[1].2);
        eprintln!(
            "prefill attention, blocks of {block}: max |diff| default vs mma.sync \
             {max_abs_diff:.2e}, {non_finite} non-finite"
        );
        block_sizes.push(
            json!({"block_size": block, "max_abs_diff_vs_mma_sync": max_abs_diff,
                                "non_finite": non_finite}),
        );
    }
    out.insert("prefill_block_sizes".into(), json!(block_sizes));
    drop(one);

    // Whole steps of the 32-layer model.
    let t = Instant::now();
    let layers = if quick { 8 } else { 32 };
    let mut full = CudaStepModel::new(CudaLlama::random(llama3_8b(layers), 0, 2).expect("model"));
    eprintln!(
        "{layers}-layer model made in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let steps: &[(&str, usize, usize, usize)] = &[
        // (kind, sequences, start position, new tokens per sequence)
        ("decode", 64, 2047, 1),
        ("decode", 256, 511, 1),
        ("decode", 128, 1023, 1),
        ("prefill", 1, 0, 2048),
        ("prefill", 4, 0, 2048),
    ];
    let max_tokens = steps
        .iter()
        .map(|&(_, s, st, n)| s * (st + n + BLOCK))
        .max()
        .unwrap_or(0);
    full.allocate_cache(max_tokens / BLOCK + 64, BLOCK)
        .expect("cache");
    let mut whole = Vec::new();
    for &(kind, seqs, start, chunk) in steps {
        let bt = batch(seqs, start, chunk, max_tokens / BLOCK + 64, true);
        full.step_async(&bt).expect("step");
        full.model().synchronize().expect("sync");
        let reps = 5;
        let time_steps = |full: &mut CudaStepModel| {
            let t = Instant::now();
            for _ in 0..reps {
                full.step_async(&bt).expect("step");
            }
            full.model().synchronize().expect("sync");
            t.elapsed().as_secs_f64() / reps as f64
        };
        let secs = time_steps(&mut full);
        eprintln!(
            "{kind} step seqs={seqs} start={start} tokens={chunk}: {:.2} ms",
            secs * 1e3
        );
        // The same with decode attention launched plainly (not as a programmatic dependent of
        // the RoPE kernel before it).
        let mut plain_secs = None;
        if kind == "decode" {
            full.model_mut().set_decode_dependent_launch(false);
            let secs = time_steps(&mut full);
            full.model_mut().set_decode_dependent_launch(true);
            eprintln!(
                "    decode attention launched plainly: {:.2} ms",
                secs * 1e3
            );
            plain_secs = Some(secs);
        }
        // Where the step's GPU time goes, by operation (summed over the layers).
        let profile = full.profile_step(&bt).expect("profile");
        let profiled: f64 = profile.iter().map(|(_, secs)| secs).sum();
        for (op, op_secs) in &profile {
            eprintln!(
                "    {op:22} {:8.3} ms ({:4.1}%)",
                op_secs * 1e3,
                100.0 * op_secs / profiled
            );
        }
        let profile: serde_json::Map<String, serde_json::Value> = profile
            .into_iter()
            .map(|(op, secs)| (op.to_string(), json!(secs)))
            .collect();
        whole.push(
            json!({"kind": kind, "seqs": seqs, "start": start, "tokens": chunk,
                          "layers": layers, "secs": secs,
                          "secs_plain_decode_launch": plain_secs, "profile_secs": profile}),
        );
    }
    out.insert("steps".into(), json!(whole));
    println!("{}", serde_json::Value::Object(out));
}

fn ptr<T>(
    buf: &cudarc::driver::CudaSlice<T>,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> u64 {
    use cudarc::driver::DevicePtr;
    buf.device_ptr(stream).0
}
