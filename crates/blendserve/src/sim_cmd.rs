//! `blendserve sim`, `generate` and `inspect`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use scheduler::{Executor, LengthKnowledge, PolicyKind, Sharding};
use sim::{SimConfig, Simulation};

use crate::args::{SchedulerArgs, WorkloadArgs};
use crate::table;

#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Policies: a comma list of fcfs, random, dfs, blendserve, blendserve-nosplit,
    /// blendserve-nomemsplit, blendserve-noscan, blendserve-flat; `all` for the main four, `ablation` for BlendServe's.
    #[arg(long, default_value = "all")]
    pub policy: String,
    /// Model preset (llama3-8b, llama3-70b, llama2-7b, qwen2.5-7b, qwen2.5-1.5b, qwen2.5-0.5b).
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    /// Hardware preset (h100, h200, a100-80g).
    #[arg(long, default_value = "h100")]
    pub hardware: String,
    /// TOML file overriding model and hardware fields ([model], [hardware] tables).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Executors, comma list: sum (operators in sequence), max (perfect compute/memory overlap),
    /// partial:E (overlap efficiency E).
    #[arg(long, default_value = "sum,max")]
    pub executor: String,
    /// What the scheduler knows of output lengths: sampled, sampled:F, known, max-tokens.
    #[arg(long, default_value = "sampled")]
    pub lengths: String,
    /// Under sampled lengths, run the sample as its own phase first and count its time, as
    /// `blendserve run` does (by default the sample's lengths come for free).
    #[arg(long)]
    pub length_sample_phase: bool,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Fraction of device memory for weights, activations and KV cache.
    #[arg(long, default_value_t = 0.9)]
    pub kv_memory_fraction: f64,
    /// CSV file for the results (one row per policy and executor).
    #[arg(long, default_value = "sim-results.csv")]
    pub csv: PathBuf,
    /// Also write a per-step timeline CSV per policy and executor into this folder.
    #[arg(long)]
    pub timeline_dir: Option<PathBuf>,
    /// Keep one timeline row every this many steps.
    #[arg(long, default_value_t = 1)]
    pub timeline_every: u64,
    /// Also simulate the workload cut into this many data-parallel ranks (a comma list, e.g.
    /// 2,4,8), each rank a replica of the configured GPU, under each sharding.
    #[arg(long)]
    pub ranks: Option<String>,
    /// Shardings for `--ranks`: blendserve (one tree cut into snake-dealt segments, long outputs
    /// gathered on the ranks the cost model picks), blendserve-spread (the same without gathering
    /// them), either with :SEGMENTS_PER_RANK, round-robin.
    #[arg(long, default_value = "blendserve,round-robin")]
    pub sharding: String,
    /// CSV file for the `--ranks` results (one row per rank count, sharding, policy, executor).
    #[arg(long, default_value = "sim-ranks.csv")]
    pub ranks_csv: PathBuf,
}

/// `--ranks`: rank counts (each >= 1) and shardings.
fn rank_plan(args: &SimArgs) -> Result<(Vec<usize>, Vec<Sharding>)> {
    let Some(list) = &args.ranks else {
        return Ok((Vec::new(), Vec::new()));
    };
    let ranks = list
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .with_context(|| format!("--ranks: `{n}` is not a rank count of 1 or more"))
        })
        .collect::<Result<Vec<_>>>()?;
    let shardings = args
        .sharding
        .split(',')
        .map(|s| s.trim().parse::<Sharding>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    Ok((ranks, shardings))
}

pub fn build_sim_config(args: &SimArgs, executor: Executor) -> Result<SimConfig> {
    let mut config = SimConfig::from_presets(
        &args.model,
        &args.hardware,
        args.config.as_deref(),
        executor,
    )?;
    config.scheduler = args.scheduler.config()?;
    config.kv_memory_fraction = args.kv_memory_fraction;
    config.lengths = args.lengths.parse::<LengthKnowledge>()?;
    config.length_sample_phase = args.length_sample_phase;
    config.seed = args.workload.seed;
    if args.timeline_dir.is_some() {
        config.timeline_every = args.timeline_every.max(1);
    }
    Ok(config)
}

/// The workload, with the paper's presets (`paper-trace1`..`4`, `paper-grid:D:S`) solved for
/// density on the given model and hardware.
pub fn load_workload(
    args: &WorkloadArgs,
    model: &str,
    hardware: &str,
    overrides: Option<&std::path::Path>,
) -> Result<(workload::Workload, String)> {
    let Some(name) = args.workload.as_deref() else {
        return args.load();
    };
    if sim::paper::preset_target(name)?.is_none() {
        return args.load();
    }
    let config = SimConfig::from_presets(model, hardware, overrides, Executor::Sequential)?;
    let perf = sim::paper::pricing_model(&config)?;
    let dir = args
        .traces_dir
        .clone()
        .or_else(workload::traces::default_traces_dir)
        .context("cannot find the traces folder: pass --traces-dir or set BLENDSERVE_TRACES")?;
    let azure = workload::traces::NamedTrace::AzureConv.load(&dir)?;
    let (workload, shape) =
        sim::paper::paper_workload(name, args.requests, args.seed, &perf, &azure)?
            .context("a preset")?;
    tracing::info!(
        "preset {name}: density {:.2}, prefix sharing {:.1}% on {model} / {hardware}",
        shape.density,
        100.0 * shape.sharing,
    );
    Ok((workload, name.to_string()))
}

pub fn run_sim(args: &SimArgs) -> Result<()> {
    let policies = PolicyKind::parse_list(&args.policy)?;
    let (rank_counts, shardings) = rank_plan(args)?;
    let mut rank_rows = Vec::new();
    let executors: Vec<Executor> = args
        .executor
        .split(',')
        .map(|e| e.trim().parse::<Executor>())
        .collect::<Result<_, _>>()?;
    let (workload, workload_name) = load_workload(
        &args.workload,
        &args.model,
        &args.hardware,
        args.config.as_deref(),
    )?;
    if workload.is_empty() {
        bail!("the workload has no requests");
    }
    let summary = workload.summary();
    tracing::info!(
        "workload {workload_name}: {} requests, prompt mean {:.0} tokens, output mean {:.0} tokens",
        summary.requests,
        summary.prompt_tokens_mean,
        summary.output_tokens_mean
    );
    let mut reports = Vec::new();
    for &executor in &executors {
        let config = build_sim_config(args, executor)?;
        let simulation = Simulation::new(&workload, config.clone())?;
        let p = simulation.preparation();
        tracing::info!(
            "executor {executor}: tree of {} nodes in {:.2}s, sharing ratio {:.1}%, {} KV blocks, optimal bound {:.1}s",
            p.tree.nodes().len(),
            p.build_secs,
            100.0 * p.tree.sharing_ratio(),
            simulation.kv_config().num_blocks,
            simulation.bound().secs
        );
        for (name, kind) in &policies {
            let bar = ProgressBar::new(workload.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>24} [{bar:30}] {pos}/{len} requests, {elapsed}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{name} ({executor})"));
            let mut report = simulation.run(name, kind, &mut |done, _| bar.set_position(done))?;
            report.workload = workload_name.clone();
            if let Some(dir) = &args.timeline_dir {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let path = dir.join(format!("timeline-{name}-{executor}.csv"));
                let mut w = csv::Writer::from_path(&path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                for record in &report.timeline {
                    w.serialize(record)?;
                }
                w.flush()?;
            }
            bar.finish_and_clear();
            if !report.rejections.is_empty() {
                let (r, why) = &report.rejections[0];
                tracing::warn!(
                    "{} requests rejected; first: {}: {why}",
                    report.rejections.len(),
                    workload.requests[*r as usize].id
                );
            }
            for &n in &rank_counts {
                for &sharding in &shardings {
                    let r = sim::ranks::simulate_ranks(
                        &workload,
                        &simulation,
                        &report,
                        &config,
                        (name, kind),
                        n,
                        sharding,
                    )?;
                    rank_rows.push(r.row(&workload_name, workload.len(), &executor.to_string()));
                }
            }
            reports.push(report);
        }
    }
    let header = [
        "policy",
        "executor",
        "budget",
        "makespan_s",
        "tok/s",
        "out_tok/s",
        "prefix_hit",
        "kv_util",
        "compute_util",
        "memory_util",
        "preempt",
        "%optimal",
    ];
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                r.executor.clone(),
                r.token_budget.clone(),
                format!("{:.1}", r.makespan_secs),
                format!("{:.0}", r.total_tokens_per_sec),
                format!("{:.0}", r.output_tokens_per_sec),
                format!("{:.1}%", 100.0 * r.prefix_hit_ratio),
                format!("{:.1}%", 100.0 * r.kv_utilization),
                format!("{:.1}%", 100.0 * r.compute_utilization),
                format!("{:.1}%", 100.0 * r.memory_utilization),
                r.preemptions.to_string(),
                format!("{:.1}%", r.percent_of_optimal),
            ]
        })
        .collect();
    println!("{}", table::render(&header, &rows));
    let mut writer = csv::Writer::from_path(&args.csv)
        .with_context(|| format!("cannot write {}", args.csv.display()))?;
    for report in &reports {
        writer.serialize(report)?;
    }
    writer.flush()?;
    println!("wrote {}", args.csv.display());
    if !rank_rows.is_empty() {
        print_ranks(&rank_rows, &args.ranks_csv)?;
    }
    Ok(())
}

fn print_ranks(rows: &[sim::ranks::RanksRow], csv_path: &std::path::Path) -> Result<()> {
    let header = [
        "policy",
        "executor",
        "sharding",
        "ranks",
        "makespan_s",
        "speedup",
        "spread",
        "hits_kept",
        "tail_ranks",
        "rank_s",
        "rank_%opt",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                r.executor.clone(),
                r.sharding.clone(),
                r.ranks.to_string(),
                format!("{:.1}", r.makespan_secs),
                format!("{:.2}x", r.speedup),
                format!("{:.1}%", 100.0 * r.spread),
                format!("{:.1}%", 100.0 * r.prefix_hits_kept),
                r.tail_ranks.to_string(),
                r.rank_secs.clone(),
                r.rank_percent_of_optimal.clone(),
            ]
        })
        .collect();
    println!("{}", table::render(&header, &cells));
    let mut writer = csv::Writer::from_path(csv_path)
        .with_context(|| format!("cannot write {}", csv_path.display()))?;
    for r in rows {
        writer.serialize(r)?;
    }
    writer.flush()?;
    println!("wrote {}", csv_path.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Model preset the paper presets' density is priced on.
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    /// Hardware preset the paper presets' density is priced on.
    #[arg(long, default_value = "h100")]
    pub hardware: String,
    /// Output native JSONL file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let (workload, _) = load_workload(&args.workload, &args.model, &args.hardware, None)?;
    let file =
        File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = BufWriter::new(file);
    workload::native::write_native_jsonl(&workload, &mut out)?;
    out.flush()?;
    println!(
        "wrote {} requests to {}",
        workload.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[arg(long, default_value = "llama3-8b")]
    pub model: String,
    #[arg(long, default_value = "h100")]
    pub hardware: String,
}

pub fn run_inspect(args: &InspectArgs) -> Result<()> {
    let (workload, name) = load_workload(&args.workload, &args.model, &args.hardware, None)?;
    let mut config =
        SimConfig::from_presets(&args.model, &args.hardware, None, Executor::Overlapped)?;
    config.lengths = LengthKnowledge::Known;
    let simulation = Simulation::new(&workload, config)?;
    let p = simulation.preparation();
    let s = workload.summary();
    println!("workload      {name}");
    println!("requests      {}", s.requests);
    println!(
        "prompt tokens mean {:.0}, max {}, total {}",
        s.prompt_tokens_mean, s.prompt_tokens_max, s.prompt_tokens_total
    );
    println!(
        "output tokens mean {:.0}, total {}",
        s.output_tokens_mean, s.output_tokens_total
    );
    println!(
        "prefix tree   {} nodes, sharing ratio {:.1}%",
        p.tree.nodes().len(),
        100.0 * p.tree.sharing_ratio()
    );
    let split = prefix_tree::split_outliers(
        &p.tree,
        &p.annotation,
        simulation.perf(),
        prefix_tree::SplitConfig::default(),
    );
    println!(
        "node split    {} nodes ({} requests) moved to the root, {:.2}% of the sharing kept",
        split.report.nodes_split,
        split.report.requests_split,
        100.0 * split.report.sharing_kept()
    );
    let total = p.annotation.total();
    println!(
        "demand        compute {:.1}s, memory {:.1}s, density {:.2} ({} {})",
        total.compute_secs,
        total.memory_secs,
        total.density(),
        args.model,
        args.hardware
    );
    let mut densities: Vec<f64> = p
        .annotation
        .attributed
        .iter()
        .map(|d| d.density())
        .collect();
    densities.sort_by(f64::total_cmp);
    let q = |f: f64| densities[((densities.len() - 1) as f64 * f) as usize];
    println!(
        "request density quantiles: p10 {:.2}  p25 {:.2}  p50 {:.2}  p75 {:.2}  p90 {:.2}; memory-bound (<1): {:.1}%",
        q(0.1),
        q(0.25),
        q(0.5),
        q(0.75),
        q(0.9),
        100.0 * densities.iter().filter(|&&d| d < 1.0).count() as f64 / densities.len() as f64
    );
    let b = simulation.bound();
    let power = if b.power_secs > 0.0 {
        format!(", energy at the power limit {:.1}s", b.power_secs)
    } else {
        String::new()
    };
    println!(
        "optimal bound {:.1}s (compute {:.1}s, memory {:.1}s{power}, {} steps)",
        b.secs, b.compute_secs, b.memory_secs, b.min_steps
    );
    Ok(())
}
