//! `blendserve`: offline batch inference, and the simulator that plans it.

mod args;
mod batch_file;
mod calibrate_cmd;
mod chat_template;
mod demo;
mod hardware;
mod ranks_cmd;
mod run_cmd;
mod sim_cmd;
mod table;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blendserve",
    version,
    about = "Offline batch inference with resource-aware batching"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a batch (OpenAI Batch JSONL, or a workload) through the model: every answer out.
    Run(run_cmd::RunArgs),
    /// Simulate policies on a workload with the calibrated performance model.
    Sim(sim_cmd::SimArgs),
    /// Generate a workload (trace mix + synthetic prefix sharing) as native JSONL.
    Generate(sim_cmd::GenerateArgs),
    /// Describe a workload: sizes, prefix sharing, compute density spread.
    Inspect(sim_cmd::InspectArgs),
    /// Time a grid of steps on the GPU and fit the performance model's rates to them (a
    /// hardware TOML for `run --hardware-config` and `sim --config`).
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// Cut a batch into `--ranks` shard files (in the `--output` folder) and a manifest of each
    /// rank's predicted time, density and prefix sharing; run each with `run --shard
    /// DIR/rank-K`, join with `merge`. Takes `run`'s input, model and hardware settings.
    Plan(run_cmd::RunArgs),
    /// Join the outputs of `run --rank K --ranks N` into one file in input order.
    Merge(ranks_cmd::MergeArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run_cmd::run(&args),
        Command::Sim(args) => sim_cmd::run_sim(&args),
        Command::Generate(args) => sim_cmd::run_generate(&args),
        Command::Inspect(args) => sim_cmd::run_inspect(&args),
        Command::Calibrate(args) => calibrate_cmd::run_calibrate(&args),
        Command::Plan(args) => ranks_cmd::plan(&args),
        Command::Merge(args) => ranks_cmd::run_merge(&args),
    }
}
