//! Runs the paged forward on a model folder and writes what the GPU check compares with HF
//! transformers: for each prompt, the last-position logits after a chunked, mixed-batch prefill,
//! and `--steps` greedy tokens decoded through the paged cache.
//!
//! ```text
//! cargo run --release -p model --example model_check [--features cuda,burn-cuda] -- \
//!     --model DIR --prompts prompts.json --out out.json --device cpu|cuda|burn-cuda --steps 8
//! ```
//! `cuda` is our fast path (cuBLAS + our kernels, bf16), `burn-cuda` burn's CUDA backend (f32).
//! ```text
//! ```
//! `prompts.json` is a JSON list of token-id lists.

use std::path::PathBuf;
use std::time::Instant;

use model::{argmax, BurnStepModel, ForwardBatch, LlamaModel, SequenceChunk, StepModel};

struct Args {
    model: PathBuf,
    prompts: PathBuf,
    out: PathBuf,
    device: String,
    steps: usize,
    /// The CUDA step executor (`sequential` unless given), or `batch-invariant` (sequential,
    /// batch-invariant kernels).
    executor: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut model, mut prompts, mut out, mut device, mut steps) =
        (None, None, None, "cpu".to_string(), 8);
    let mut executor = None;
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(value()?)),
            "--prompts" => prompts = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--device" => device = value()?,
            "--executor" => executor = Some(value()?),
            "--steps" => {
                steps = value()?
                    .parse()
                    .map_err(|_| "--steps takes a number".to_string())?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        model: model.ok_or("--model is required")?,
        prompts: prompts.ok_or("--prompts is required")?,
        out: out.ok_or("--out is required")?,
        device,
        steps,
        executor,
    })
}

fn run(
    args: &Args,
    model: &mut dyn StepModel,
    load_secs: f64,
) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(&args.prompts)
        .map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    let prompts: Vec<Vec<u32>> =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.prompts.display()))?;
    let block = 16;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + args.steps + 1;
    let per_seq = longest.div_ceil(block);
    model
        .allocate_cache(per_seq * prompts.len(), block)
        .map_err(|e| e.to_string())?;
    // Interleaved block ids, so no sequence's blocks are contiguous.
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| {
            (0..per_seq)
                .map(|k| (k * prompts.len() + s) as u32)
                .collect()
        })
        .collect();
    // Prefill in two mixed steps: the first half of every prompt, then the rest with logits.
    let started = Instant::now();
    for half in [false, true] {
        let sequences = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| {
                let cut = p.len() / 2;
                let (from, to) = if half { (cut, p.len()) } else { (0, cut) };
                SequenceChunk {
                    tokens: p[from..to].to_vec(),
                    start_position: from,
                    block_table: t.clone(),
                    logits: half,
                }
            })
            .filter(|s| !s.tokens.is_empty())
            .collect();
        let rows = model
            .step_logits(&ForwardBatch { sequences })
            .map_err(|e| e.to_string())?;
        if half {
            let mut generated: Vec<Vec<u32>> = rows.iter().map(|r| vec![argmax(r)]).collect();
            for _ in 1..args.steps {
                let sequences = prompts
                    .iter()
                    .zip(&tables)
                    .zip(&generated)
                    .map(|((p, t), g)| SequenceChunk {
                        tokens: vec![*g.last().expect("one token")],
                        start_position: p.len() + g.len() - 1,
                        block_table: t.clone(),
                        logits: true,
                    })
                    .collect();
                let next = model
                    .step_greedy(&ForwardBatch { sequences })
                    .map_err(|e| e.to_string())?;
                for (g, t) in generated.iter_mut().zip(next) {
                    g.push(t);
                }
            }
            return Ok(serde_json::json!({
                "device": args.device,
                "load_secs": load_secs,
                "run_secs": started.elapsed().as_secs_f64(),
                "last_logits": rows,
                "greedy_tokens": generated,
            }));
        }
    }
    Err("no prompts".into())
}

fn load(args: &Args) -> Result<(Box<dyn StepModel>, f64), String> {
    let started = Instant::now();
    if args.executor.is_some() && args.device != "cuda" {
        return Err("--executor needs --device cuda".into());
    }
    let model: Box<dyn StepModel> = match args.device.as_str() {
        "cpu" => Box::new(BurnStepModel::new(
            LlamaModel::<model::CpuBackend>::load(&args.model, &Default::default())
                .map_err(|e| e.to_string())?,
        )),
        #[cfg(feature = "cuda")]
        "cuda" => {
            let mut m = model::cuda::CudaLlama::load(&args.model, 0).map_err(|e| e.to_string())?;
            match args.executor.as_deref() {
                // Not an executor: the sequential one with batch-invariant kernels.
                Some("batch-invariant") => {
                    m.set_batch_invariant(true).map_err(|e| e.to_string())?
                }
                Some(name) => {
                    let executor: model::cuda::StepExecutor = name.parse()?;
                    m.set_executor(executor).map_err(|e| e.to_string())?;
                }
                None => {}
            }
            Box::new(model::CudaStepModel::new(m))
        }
        #[cfg(feature = "burn-cuda")]
        "burn-cuda" => Box::new(BurnStepModel::new(
            LlamaModel::<burn::backend::Cuda<f32>>::load(
                &args.model,
                &burn::backend::cuda::CudaDevice::default(),
            )
            .map_err(|e| e.to_string())?,
        )),
        other => {
            return Err(format!(
                "device `{other}` is not available in this build (cpu; cuda with --features \
                 cuda; burn-cuda with --features burn-cuda)"
            ))
        }
    };
    Ok((model, started.elapsed().as_secs_f64()))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let result = load(&args).and_then(|(mut model, load_secs)| run(&args, &mut *model, load_secs));
    match result.and_then(|v| {
        std::fs::write(&args.out, v.to_string()).map_err(|e| format!("{}: {e}", args.out.display()))
    }) {
        Ok(()) => println!("wrote {}", args.out.display()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
