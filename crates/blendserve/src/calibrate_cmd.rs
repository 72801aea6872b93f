//! `blendserve calibrate`: times a grid of step shapes on the GPU and fits the performance
//! model's rates to them, so that `sim`, `run --predict` and the optimal bound price steps as
//! this device runs them.
//!
//! The grid: prefill parts of 0-4096 tokens beside 0-128 decodes at contexts of 512-8192, each a
//! whole step of the model (every layer, the weights' pass, logits), timed under the sequential
//! executor after a warm-up step. The fit (`scheduler::calibrate`) finds the compute, memory
//! and prefill-attention efficiencies and the step overhead; the result is a `[hardware]` TOML
//! for `--hardware-config` and `sim --config`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use model::ProbeBlend;
use scheduler::calibrate::{fit_sequential, hardware_toml, relative_errors, rms, TimedStep};

/// Prefill tokens, decodes and their context of each step the calibration times.
const GRID_PREFILL_TOKENS: [usize; 4] = [0, 256, 1024, 4096];
const GRID_DECODES: [(usize, usize); 5] = [(0, 0), (16, 2048), (64, 512), (128, 2048), (64, 8192)];

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Model folder (config.json; weights unless --random-weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Random weights of the folder's shape (no weights needed).
    #[arg(long)]
    pub random_weights: bool,
    /// Only `cuda` has anything to calibrate.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Hardware preset whose peaks the efficiencies are fractions of (h100, h200, a100-80g).
    #[arg(long, default_value = "h200")]
    pub hardware: String,
    /// Timed steps per shape (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = 16)]
    pub block_tokens: usize,
    /// The hardware TOML to write. Default: `HARDWARE-calibrated.toml` in the calibration
    /// folder (`$BLENDSERVE_CALIBRATION_DIR`, else `$XDG_CONFIG_HOME/blendserve`, else
    /// `~/.config/blendserve`), where `run` on this GPU finds it without `--hardware-config`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The grid's step shapes (every one with some work).
pub fn grid() -> Vec<ProbeBlend> {
    let mut out = Vec::new();
    for prefill_tokens in GRID_PREFILL_TOKENS {
        for (decode_seqs, decode_context) in GRID_DECODES {
            if prefill_tokens + decode_seqs > 0 {
                out.push(ProbeBlend {
                    prefill_tokens,
                    decode_seqs,
                    decode_context: decode_context.max(1),
                });
            }
        }
    }
    out
}

pub fn run_calibrate(args: &CalibrateArgs) -> Result<()> {
    if args.device != "cuda" {
        bail!(
            "--device {}: calibrate times steps on a GPU; only `cuda` is supported",
            args.device
        );
    }
    let config = model::ModelConfig::load(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let name = args
        .model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let base = scheduler::HardwareConfig::preset(&args.hardware).with_context(|| {
        format!(
            "unknown --hardware `{}` (known: {})",
            args.hardware,
            scheduler::HardwareConfig::PRESETS.join(", ")
        )
    })?;
    let perf_config = engine::perf_model_config(&config, &name, 2);
    let perf = scheduler::PerfModel::new(
        perf_config.clone(),
        base.clone(),
        scheduler::Executor::Sequential,
    );
    let blends = grid();
    let measured = time_grid(args, &config, &blends)?;
    let steps: Vec<TimedStep> = blends
        .iter()
        .zip(&measured)
        .map(|(blend, &secs)| TimedStep {
            cost: engine::probe_cost(&perf, blend),
            measured_secs: secs,
        })
        .collect();
    let mut fit = fit_sequential(&perf_config, &base, &steps);
    fit.hardware.name = format!("{}-calibrated", args.hardware);
    let errors = &fit.relative_errors;
    let preset_errors = relative_errors(&perf_config, &base, &steps);
    println!("prefill  decodes x context   measured ms   fitted   preset");
    for ((blend, step), (e, p)) in blends
        .iter()
        .zip(&steps)
        .zip(errors.iter().zip(&preset_errors))
    {
        println!(
            "{:>7}  {:>7} x {:>7}   {:>11.2}   {:>+5.1}%   {:>+5.1}%",
            blend.prefill_tokens,
            blend.decode_seqs,
            blend.decode_context,
            step.measured_secs * 1e3,
            100.0 * e,
            100.0 * p
        );
    }
    let h = &fit.hardware;
    println!(
        "fitted: compute {:.3}, memory {:.3}, attention {:.3} of {}'s peaks, {:.2} ms a step; \
         rms error {:.1}% (the preset: {:.1}%)",
        h.compute_efficiency,
        h.memory_efficiency,
        h.attention_efficiency.unwrap_or(h.compute_efficiency),
        args.hardware,
        h.step_overhead_secs * 1e3,
        100.0 * fit.rms_relative_error(),
        100.0 * rms(&preset_errors)
    );
    let note = format!(
        "blendserve calibrate: {} steps of {name} ({} layers, random weights: {}) timed on {}",
        steps.len(),
        config.num_layers,
        args.random_weights,
        args.hardware
    );
    let out = match &args.out {
        Some(path) => path.clone(),
        None => crate::hardware::calibrated_path(&args.hardware).context(
            "no calibration folder (set BLENDSERVE_CALIBRATION_DIR or HOME) and no --out",
        )?,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, hardware_toml(&fit, &args.hardware, &note))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Seconds a step of each blend takes on the GPU, sequential executor.
#[cfg(feature = "cuda")]
fn time_grid(
    args: &CalibrateArgs,
    config: &model::ModelConfig,
    blends: &[ProbeBlend],
) -> Result<Vec<f64>> {
    use model::StepModel;
    let m = if args.random_weights {
        model::cuda::CudaLlama::random(config.clone(), 0, 0)?
    } else {
        let store = model::WeightStore::open(&args.model)?;
        model::cuda::CudaLlama::from_store(config.clone(), &store, 0)
            .with_context(|| format!("loading {}", args.model.display()))?
    };
    let mut step = model::CudaStepModel::new(m);
    let blocks = blends
        .iter()
        .map(|b| b.blocks_needed(args.block_tokens))
        .max()
        .unwrap_or(0)
        + 64;
    step.allocate_cache(blocks, args.block_tokens)?;
    let ids: Vec<u32> = (0..blocks as u32).collect();
    blends
        .iter()
        .map(|blend| {
            let [whole, _, _] = blend.batches(args.block_tokens, &ids)?;
            let secs = step.time_steps(&whole, args.repeats)?;
            tracing::info!("{blend:?}: {:.2} ms", secs * 1e3);
            Ok(secs)
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn time_grid(
    _args: &CalibrateArgs,
    _config: &model::ModelConfig,
    _blends: &[ProbeBlend],
) -> Result<Vec<f64>> {
    bail!("this blendserve was built without CUDA support; rebuild with `--features cuda`")
}
