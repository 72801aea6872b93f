//! `experiments`: one command per figure. Each runs the simulator (the real scheduler and KV
//! cache with the performance model) on blends of the real traces and writes
//! `results/<figure>.csv` and `results/<figure>.svg`; `gpu` redraws the device measurements
//! kept in `experiments/gpu/`.
//!
//! ```text
//! cargo run --release -p experiments -- density-mix
//! cargo run --release -p experiments -- sharing
//! cargo run --release -p experiments -- optimal
//! cargo run --release -p experiments -- ablation
//! cargo run --release -p experiments -- paper
//! cargo run --release -p experiments -- power
//! cargo run --release -p experiments -- all
//! cargo run --release -p experiments -- gpu
//! ```

mod gpu;
mod paper;
mod plot;
mod power;
mod ranks;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use scheduler::{Executor, PolicyKind, TokenBudget};
use serde::Serialize;
use sim::{SimConfig, SimReport, Simulation};
use workload::generator::SyntheticPrefix;
use workload::{Workload, WorkloadSpec};

use crate::plot::Series;

#[derive(Parser)]
#[command(
    name = "experiments",
    about = "Reproduce BlendServe's figures on the simulator"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    figure: Figure,
}

#[derive(Args, Clone)]
struct Common {
    /// Requests per workload.
    #[arg(long, default_value_t = 4000, global = true)]
    requests: usize,
    #[arg(long, default_value_t = 1, global = true)]
    seed: u64,
    #[arg(long, default_value = "llama3-8b", global = true)]
    model: String,
    #[arg(long, default_value = "h100", global = true)]
    hardware: String,
    /// Where CSV and SVG files go.
    #[arg(long, global = true)]
    out_dir: Option<PathBuf>,
    /// Folder of the named traces (default: found upwards as shared/traces).
    #[arg(long, global = true)]
    traces_dir: Option<PathBuf>,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Figure {
    /// Throughput vs the share of compute-heavy requests in a compute/memory blend.
    DensityMix,
    /// Throughput vs synthetic prefix-sharing ratio.
    Sharing,
    /// Percent of the optimal bound per workload and policy.
    Optimal,
    /// BlendServe's parts: node splitting, memory split, dual scanner, tree vs flat order, balanced budget.
    Ablation,
    /// The paper's evaluation: traces #1-#4 on a100/h100/h200 under sum, partial and max,
    /// prefix sharing kept, the 65-workload grid, the ablations; the paper's numbers beside ours.
    Paper {
        /// Requests per trace (the paper ran >= 400,000).
        #[arg(long, default_value_t = 100_000)]
        trace_requests: usize,
        /// Requests per grid workload (the paper's A.3: 40,000).
        #[arg(long, default_value_t = 40_000)]
        grid_requests: usize,
    },
    /// Data-parallel ranks: traces #1-#4 cut into 1-8 ranks by BlendServe's sharding and by
    /// round-robin (speed-up, per-rank spread, prefix hits kept).
    Ranks {
        /// Requests per trace (enough that the longest request's latency does not set a
        /// rank's time: at 40,000 it did).
        #[arg(long, default_value_t = 200_000)]
        requests: usize,
    },
    /// Overlap under the H200's power limit: traces #1-#4, DFS and BlendServe, sequential and
    /// overlapped, with the `h200` preset's measured power model and without it.
    Power {
        /// Requests per trace.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
    },
    /// Every simulator figure above.
    All,
    /// The device measurements in experiments/gpu: kernels against torch, step executors,
    /// end-to-end throughput per policy and executor (no simulation, no GPU needed).
    Gpu,
}

const COMPUTE_POOL: &str = "azure-code";
const MEMORY_POOL: &str = "azure-conv[out>=256]";
const MAIN_POLICIES: [&str; 3] = ["fcfs", "dfs", "blendserve"];

/// One simulated point of a figure.
#[derive(Serialize)]
struct Row {
    figure: &'static str,
    /// The swept value (share, ratio) or 0 where the figure sweeps workloads.
    x: f64,
    /// Workload density (compute seconds per memory second) under the model.
    workload_density: f64,
    optimal_tokens_per_sec: f64,
    workload: String,
    policy: String,
    executor: String,
    token_budget: String,
    requests: usize,
    makespan_secs: f64,
    total_tokens_per_sec: f64,
    output_tokens_per_sec: f64,
    prefix_hit_ratio: f64,
    sharing_ratio: f64,
    kv_utilization: f64,
    compute_utilization: f64,
    memory_utilization: f64,
    preemptions: u64,
    percent_of_optimal: f64,
}

impl Row {
    fn new(
        figure: &'static str,
        x: f64,
        workload_density: f64,
        optimal_tokens_per_sec: f64,
        r: &SimReport,
    ) -> Self {
        Row {
            figure,
            x,
            workload_density,
            optimal_tokens_per_sec,
            workload: r.workload.clone(),
            policy: r.policy.clone(),
            executor: r.executor.clone(),
            token_budget: r.token_budget.clone(),
            requests: r.requests,
            makespan_secs: r.makespan_secs,
            total_tokens_per_sec: r.total_tokens_per_sec,
            output_tokens_per_sec: r.output_tokens_per_sec,
            prefix_hit_ratio: r.prefix_hit_ratio,
            sharing_ratio: r.sharing_ratio,
            kv_utilization: r.kv_utilization,
            compute_utilization: r.compute_utilization,
            memory_utilization: r.memory_utilization,
            preemptions: r.preemptions,
            percent_of_optimal: r.percent_of_optimal,
        }
    }
}

/// A policy as run in a figure: a registered policy, optionally with the token budget forced.
struct Variant {
    label: &'static str,
    policy: &'static str,
    budget: TokenBudget,
}

impl Variant {
    fn plain(policy: &'static str) -> Variant {
        Variant {
            label: policy,
            policy,
            budget: TokenBudget::PolicyDefault,
        }
    }
}

struct Lab {
    common: Common,
    out_dir: PathBuf,
}

impl Lab {
    fn workload(&self, mix: &str, sharing: f64, groups: u32) -> Result<Workload> {
        let spec = WorkloadSpec {
            source: mix.to_string(),
            requests: self.common.requests,
            seed: self.common.seed,
            synthetic_prefix: (sharing > 0.0).then_some(SyntheticPrefix {
                groups,
                sharing_ratio: sharing,
                ..SyntheticPrefix::default()
            }),
            max_prompt_tokens: Some(32_768),
            max_tokens: workload::generator::DEFAULT_MAX_TOKENS,
            traces_dir: self.common.traces_dir.clone(),
        };
        Ok(spec.load().with_context(|| format!("workload {mix}"))?.0)
    }

    /// Simulates every variant on `workload`; returns rows and the workload's density and bound.
    fn simulate(
        &self,
        figure: &'static str,
        x: f64,
        name: &str,
        workload: &Workload,
        executor: Executor,
        variants: &[Variant],
    ) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for v in variants {
            let mut config =
                SimConfig::from_presets(&self.common.model, &self.common.hardware, None, executor)?;
            config.seed = self.common.seed;
            config.scheduler.token_budget = v.budget;
            let simulation = Simulation::new(workload, config)?;
            let kind = PolicyKind::parse(v.policy)?;
            let mut report = simulation.run(v.label, &kind, &mut |_, _| {})?;
            report.workload = name.to_string();
            let density = simulation.preparation().annotation.total().density();
            let tokens = report.prompt_tokens + report.output_tokens;
            tracing::info!(
                "{figure} {name} x={x:.2} {} ({executor}): {:.0} tok/s, {:.1}% of optimal",
                v.label,
                report.total_tokens_per_sec,
                report.percent_of_optimal
            );
            rows.push(Row::new(
                figure,
                x,
                density,
                tokens as f64 / simulation.bound().secs,
                &report,
            ));
        }
        Ok(rows)
    }

    fn write_csv<T: Serialize>(&self, name: &str, rows: &[T]) -> Result<PathBuf> {
        let path = self.out_dir.join(format!("{name}.csv"));
        let mut w = csv::Writer::from_path(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for row in rows {
            w.serialize(row)?;
        }
        w.flush()?;
        Ok(path)
    }

    fn svg(&self, name: &str) -> PathBuf {
        self.out_dir.join(format!("{name}.svg"))
    }
}

fn series_by_policy(rows: &[Row], executor: &str, value: impl Fn(&Row) -> f64) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for row in rows.iter().filter(|r| r.executor == executor) {
        let name = &row.policy;
        let point = (row.x, value(row));
        match series.iter_mut().find(|s| &s.name == name) {
            Some(s) => s.points.push(point),
            None => series.push(Series {
                name: name.clone(),
                points: vec![point],
                dashed: false,
            }),
        }
    }
    series
}

fn optimal_series(rows: &[Row], executor: &str) -> Series {
    let mut points: Vec<(f64, f64)> = Vec::new();
    for row in rows.iter().filter(|r| r.executor == executor) {
        if !points.iter().any(|p| p.0 == row.x) {
            points.push((row.x, row.optimal_tokens_per_sec));
        }
    }
    Series {
        name: "optimal bound".into(),
        points,
        dashed: true,
    }
}

fn density_mix(lab: &Lab) -> Result<()> {
    let mut rows = Vec::new();
    let variants: Vec<Variant> = MAIN_POLICIES.iter().map(|&p| Variant::plain(p)).collect();
    for step in 0..=10 {
        let share = f64::from(step) / 10.0;
        let mix = match step {
            0 => MEMORY_POOL.to_string(),
            10 => COMPUTE_POOL.to_string(),
            _ => format!("{COMPUTE_POOL}={share},{MEMORY_POOL}={}", 1.0 - share),
        };
        let workload = lab.workload(&mix, 0.5, 16)?;
        for executor in [Executor::Overlapped, Executor::Sequential] {
            rows.extend(lab.simulate(
                "density-mix",
                share,
                &mix,
                &workload,
                executor,
                &variants,
            )?);
        }
    }
    let csv = lab.write_csv("density-mix", &rows)?;
    for (executor, file) in [("max", "density-mix"), ("sum", "density-mix-sum")] {
        let mut series = series_by_policy(&rows, executor, |r| r.total_tokens_per_sec);
        series.push(optimal_series(&rows, executor));
        plot::line_chart(
            &lab.svg(file),
            &format!("Throughput vs compute-heavy share ({COMPUTE_POOL} + {MEMORY_POOL}), executor {executor}"),
            "share of compute-heavy requests",
            "tokens/s (prompt + output)",
            &series,
        )?;
    }
    println!("wrote {} and its figures", csv.display());
    Ok(())
}

fn sharing(lab: &Lab) -> Result<()> {
    let mut rows = Vec::new();
    let variants: Vec<Variant> = MAIN_POLICIES.iter().map(|&p| Variant::plain(p)).collect();
    let mix = format!("{COMPUTE_POOL}=1,{MEMORY_POOL}=1");
    for step in 0..=9 {
        let ratio = f64::from(step) / 10.0;
        // Many groups, so that the shared templates do not all fit in the prefix cache at once
        // and the order of requests decides how often they are found.
        let workload = lab.workload(&mix, ratio, 256)?;
        rows.extend(lab.simulate(
            "sharing",
            ratio,
            &mix,
            &workload,
            Executor::Overlapped,
            &variants,
        )?);
    }
    let csv = lab.write_csv("sharing", &rows)?;
    let mut series = series_by_policy(&rows, "max", |r| r.total_tokens_per_sec);
    series.push(optimal_series(&rows, "max"));
    plot::line_chart(
        &lab.svg("sharing"),
        &format!("Throughput vs prefix-sharing ratio ({mix}, 256 groups per trace)"),
        "fraction of each prompt from a shared template",
        "tokens/s (prompt + output)",
        &series,
    )?;
    println!("wrote {} and its figure", csv.display());
    Ok(())
}

const OPTIMAL_WORKLOADS: [&str; 7] = [
    "azure-code",
    "azure-conv",
    "mooncake",
    "azure-code=1,azure-conv=1",
    "azure-code=1,mooncake=1",
    "azure-conv=1,mooncake=1",
    "azure-code=1,azure-conv=1,mooncake=1",
];

fn short_name(mix: &str) -> String {
    mix.replace("azure-", "")
        .replace("=1", "")
        .replace(',', "+")
}

fn bar_figure(
    lab: &Lab,
    file: &str,
    title: &str,
    y_label: &str,
    rows: &[Row],
    executor: &str,
    value: impl Fn(&Row) -> f64,
) -> Result<()> {
    let (categories, series) = plot::bar_groups(
        rows.iter().filter(|r| r.executor == executor),
        |r| short_name(&r.workload),
        |r| r.policy.clone(),
        value,
    );
    plot::grouped_bars(&lab.svg(file), title, y_label, &categories, &series)
}

fn optimal(lab: &Lab) -> Result<()> {
    let mut rows = Vec::new();
    let variants: Vec<Variant> = MAIN_POLICIES.iter().map(|&p| Variant::plain(p)).collect();
    for mix in OPTIMAL_WORKLOADS {
        let workload = lab.workload(mix, 0.5, 16)?;
        for executor in [Executor::Overlapped, Executor::Sequential] {
            rows.extend(lab.simulate("optimal", 0.0, mix, &workload, executor, &variants)?);
        }
    }
    let csv = lab.write_csv("optimal", &rows)?;
    for (executor, file) in [("max", "optimal"), ("sum", "optimal-sum")] {
        bar_figure(
            lab,
            file,
            &format!("Percent of the optimal bound, executor {executor}"),
            "% of optimal",
            &rows,
            executor,
            |r| r.percent_of_optimal,
        )?;
    }
    println!("wrote {} and its figures", csv.display());
    Ok(())
}

fn ablation(lab: &Lab) -> Result<()> {
    let balanced = TokenBudget::Balanced {
        target_density: 1.0,
        min_prefill_tokens: 64,
    };
    let fixed = TokenBudget::Fixed;
    let variants = [
        Variant::plain("fcfs"),
        Variant::plain("dfs"),
        Variant {
            label: "fcfs+balanced",
            policy: "fcfs",
            budget: balanced,
        },
        Variant {
            label: "dfs+balanced",
            policy: "dfs",
            budget: balanced,
        },
        Variant {
            label: "blendserve+fixed",
            policy: "blendserve",
            budget: fixed,
        },
        Variant::plain("blendserve-nosplit"),
        Variant::plain("blendserve-nomemsplit"),
        Variant::plain("blendserve-noscan"),
        Variant::plain("blendserve-flat"),
        Variant::plain("blendserve"),
    ];
    let mut rows = Vec::new();
    for mix in [
        format!("{COMPUTE_POOL}=1,{MEMORY_POOL}=1"),
        "azure-code=1,azure-conv=1,mooncake=1".to_string(),
        "azure-conv=1,mooncake=1".to_string(),
    ] {
        let workload = lab.workload(&mix, 0.5, 64)?;
        let mut these = lab.simulate(
            "ablation",
            0.0,
            &mix,
            &workload,
            Executor::Overlapped,
            &variants,
        )?;
        let base = these[0].total_tokens_per_sec;
        for row in &mut these {
            row.x = row.total_tokens_per_sec / base;
        }
        rows.extend(these);
    }
    let csv = lab.write_csv("ablation", &rows)?;
    bar_figure(
        lab,
        "ablation",
        "Ablation: throughput relative to FCFS (executor max); x column = ratio",
        "throughput / fcfs",
        &rows,
        "max",
        |r| r.x,
    )?;
    println!("wrote {} and its figure", csv.display());
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let out_dir = cli
        .common
        .out_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    if cli.figure == Figure::Gpu {
        return gpu::figures(&Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu"), &out_dir);
    }
    let lab = Lab {
        common: cli.common,
        out_dir,
    };
    let run: &[fn(&Lab) -> Result<()>] = match cli.figure {
        Figure::DensityMix => &[density_mix],
        Figure::Sharing => &[sharing],
        Figure::Optimal => &[optimal],
        Figure::Ablation => &[ablation],
        Figure::All => &[density_mix, sharing, optimal, ablation],
        Figure::Paper {
            trace_requests,
            grid_requests,
        } => return paper::paper(&lab, trace_requests, grid_requests),
        Figure::Ranks { requests } => return ranks::ranks(&lab, requests),
        Figure::Power { requests } => return power::power(&lab, requests),
        Figure::Gpu => unreachable!("drawn above"),
    };
    for figure in run {
        figure(&lab)?;
    }
    Ok(())
}
