//! `experiments paper`: the BlendServe paper's evaluation on the simulator, side by side with
//! its numbers. Its main traces #1-#4 (BurstGPT + MMLU + OpenVid at density 1.4 / 0.9 and prefix
//! sharing 35% / 5%, solved on each hardware preset), each policy under the `sum`, `partial:0.5`
//! and `max` executors; the prefix sharing BlendServe keeps of DFS's; its 65-workload grid; and
//! the ablations. Writes `results/paper-*.csv` and `.svg`; each CSV row carries the paper's figure
//! where the paper gives one (`paper_value`, with `paper_says` naming it).

use anyhow::{Context, Result};
use prefix_tree::{split_outliers, SplitConfig};
use scheduler::{Executor, LengthKnowledge, PolicyKind};
use serde::Serialize;
use sim::paper::{paper_grid, paper_workload, pricing_model, PAPER_TRACES};
use sim::{SimConfig, Simulation};
use workload::traces::{default_traces_dir, NamedTrace, TraceRecord};
use workload::Workload;

use crate::plot::{self, Heatmap};
use crate::Lab;

/// Hardware presets the traces run on (the paper's A100 and ours).
const HARDWARE: [&str; 3] = ["a100-80g", "h100", "h200"];
/// Hardware presets the grid runs on.
const GRID_HARDWARE: [&str; 2] = ["a100-80g", "h200"];
const POLICIES: [&str; 4] = ["fcfs", "random", "dfs", "blendserve"];
/// The executors: sequential, a stand-in for a calibrated partial overlap (no calibrated H200
/// overlap exists yet: issue "Overlap that pays on the H200"), and perfect overlap.
const EXECUTORS: [&str; 3] = ["sum", "partial:0.5", "max"];
const ABLATIONS: [&str; 6] = [
    "dfs",
    "blendserve",
    "blendserve-nosplit",
    "blendserve-nomemsplit",
    "blendserve-noscan",
    "blendserve-flat",
];

#[derive(Serialize)]
struct PaperRow {
    figure: &'static str,
    hardware: String,
    executor: String,
    workload: String,
    target_density: f64,
    target_sharing: f64,
    /// Density and sharing the generated workload came to.
    density: f64,
    sharing: f64,
    requests: usize,
    policy: String,
    lengths: String,
    makespan_secs: f64,
    tokens_per_sec: f64,
    speedup_over_dfs: f64,
    prefix_hit_ratio: f64,
    /// Prefix hits over DFS's on the same workload and executor.
    hits_of_dfs: f64,
    percent_of_optimal: f64,
    /// What conditional node splitting did to this workload's tree (BlendServe rows).
    tree_sharing_kept: Option<f64>,
    requests_split: Option<usize>,
    paper_value: Option<f64>,
    paper_says: &'static str,
}

/// What the paper reports for a row's figure and policy.
fn paper_number(figure: &str, policy: &str) -> (Option<f64>, &'static str) {
    match (figure, policy) {
        ("paper-traces", "blendserve") => (
            Some(1.2084),
            "speedup over NanoFlow-DFS, mean of traces #1-#4 (A100, Llama-3-8B); 86.55% of optimal; hits > 97% of DFS's",
        ),
        ("paper-grid", "blendserve") => (
            Some(1.2253),
            "speedup over NanoFlow-DFS, mean of the 65-workload grid (1.14-1.34, peak 1.34 at density 1.30)",
        ),
        _ => (None, ""),
    }
}

pub(crate) struct Prepared {
    pub(crate) workload: Workload,
    pub(crate) name: String,
    target: (f64, f64),
    density: f64,
    sharing: f64,
}

pub(crate) fn azure(lab: &Lab) -> Result<Vec<TraceRecord>> {
    let dir = lab
        .common
        .traces_dir
        .clone()
        .or_else(default_traces_dir)
        .context("cannot find the traces folder: pass --traces-dir or set BLENDSERVE_TRACES")?;
    Ok(NamedTrace::AzureConv.load(&dir)?)
}

/// A preset workload solved on `hardware`'s prices.
pub(crate) fn prepare(
    lab: &Lab,
    azure: &[TraceRecord],
    hardware: &str,
    name: &str,
    target: (f64, f64),
    requests: usize,
) -> Result<Prepared> {
    let config = SimConfig::from_presets(&lab.common.model, hardware, None, Executor::Sequential)?;
    let perf = pricing_model(&config)?;
    let (workload, shape) = paper_workload(name, requests, lab.common.seed, &perf, azure)?
        .with_context(|| format!("preset {name}"))?;
    Ok(Prepared {
        workload,
        name: name.to_string(),
        target,
        density: shape.density,
        sharing: shape.sharing,
    })
}

/// Runs `policies` on one workload under one executor and hardware; rows get speedups and hit
/// ratios relative to the `dfs` row (which `policies` must hold).
fn run(
    lab: &Lab,
    figure: &'static str,
    hardware: &str,
    executor: &str,
    w: &Prepared,
    policies: &[&str],
    lengths: LengthKnowledge,
) -> Result<Vec<PaperRow>> {
    let mut config = SimConfig::from_presets(&lab.common.model, hardware, None, executor.parse()?)?;
    config.seed = lab.common.seed;
    config.lengths = lengths;
    let simulation = Simulation::new(&w.workload, config)?;
    let p = simulation.preparation();
    let split = split_outliers(
        &p.tree,
        &p.annotation,
        simulation.perf(),
        SplitConfig::default(),
    );
    let mut rows = Vec::new();
    for &policy in policies {
        let report = simulation.run(policy, &PolicyKind::parse(policy)?, &mut |_, _| {})?;
        let blend = policy.starts_with("blendserve");
        let (paper_value, paper_says) = paper_number(figure, policy);
        tracing::info!(
            "{figure} {hardware} {} {policy} ({executor}): {:.0} tok/s, hits {:.1}%, {:.1}% of optimal",
            w.name,
            report.total_tokens_per_sec,
            100.0 * report.prefix_hit_ratio,
            report.percent_of_optimal
        );
        rows.push(PaperRow {
            figure,
            hardware: hardware.to_string(),
            executor: executor.to_string(),
            workload: w.name.clone(),
            target_density: w.target.0,
            target_sharing: w.target.1,
            density: w.density,
            sharing: w.sharing,
            requests: w.workload.len(),
            policy: policy.to_string(),
            lengths: format!("{lengths:?}"),
            makespan_secs: report.makespan_secs,
            tokens_per_sec: report.total_tokens_per_sec,
            speedup_over_dfs: f64::NAN,
            prefix_hit_ratio: report.prefix_hit_ratio,
            hits_of_dfs: f64::NAN,
            percent_of_optimal: report.percent_of_optimal,
            tree_sharing_kept: blend.then(|| split.report.sharing_kept()),
            requests_split: blend.then_some(split.report.requests_split),
            paper_value,
            paper_says,
        });
    }
    let dfs = rows
        .iter()
        .find(|r| r.policy == "dfs")
        .map(|r| (r.tokens_per_sec, r.prefix_hit_ratio))
        .context("the dfs baseline")?;
    for r in &mut rows {
        r.speedup_over_dfs = r.tokens_per_sec / dfs.0;
        r.hits_of_dfs = if dfs.1 > 0.0 {
            r.prefix_hit_ratio / dfs.1
        } else {
            1.0
        };
    }
    Ok(rows)
}

fn write_csv(lab: &Lab, name: &str, rows: &[PaperRow]) -> Result<()> {
    println!("wrote {}", lab.write_csv(name, rows)?.display());
    Ok(())
}

pub(crate) fn trace_label(name: &str) -> String {
    name.replace("paper-trace", "trace #")
}

/// Traces #1-#4 on every hardware preset, policy and executor, plus sharing kept.
fn traces(lab: &Lab, azure: &[TraceRecord], requests: usize) -> Result<Vec<PaperRow>> {
    let mut rows = Vec::new();
    for hardware in HARDWARE {
        for (k, &target) in PAPER_TRACES.iter().enumerate() {
            let name = format!("paper-trace{}", k + 1);
            let w = prepare(lab, azure, hardware, &name, target, requests)?;
            for executor in EXECUTORS {
                rows.extend(run(
                    lab,
                    "paper-traces",
                    hardware,
                    executor,
                    &w,
                    &POLICIES,
                    LengthKnowledge::default(),
                )?);
            }
        }
    }
    for hardware in HARDWARE {
        let (categories, mut series) = plot::bar_groups(
            rows.iter()
                .filter(|r| r.hardware == hardware && r.executor == "max"),
            |r| trace_label(&r.workload),
            |r| r.policy.clone(),
            |r| r.tokens_per_sec,
        );
        let bound: Vec<f64> = rows
            .iter()
            .filter(|r| r.hardware == hardware && r.executor == "max" && r.policy == "dfs")
            .map(|r| 100.0 * r.tokens_per_sec / r.percent_of_optimal)
            .collect();
        series.push(("optimal bound".into(), bound));
        plot::grouped_bars(
            &lab.svg(&format!("paper-traces-{hardware}")),
            &format!("Paper traces on {hardware}, Llama-3-8B, executor max"),
            "tokens/s (prompt + output)",
            &categories,
            &series,
        )?;
    }
    let (categories, series) = plot::bar_groups(
        rows.iter().filter(|r| r.policy == "blendserve"),
        |r| {
            let executor = r.executor.replace("partial:", "p");
            format!("{} {executor}", r.workload.replace("paper-trace", "#"))
        },
        |r| r.hardware.clone(),
        |r| 100.0 * r.hits_of_dfs,
    );
    plot::grouped_bars(
        &lab.svg("paper-sharing-kept"),
        "Prefix hits of BlendServe as % of DFS's per trace and executor (paper: > 97%)",
        "% of DFS's prefix hits",
        &categories,
        &series,
    )?;
    write_csv(lab, "paper-traces", &rows)?;
    Ok(rows)
}

/// The 65-workload grid: BlendServe over DFS under `max`, as heatmaps.
fn grid(lab: &Lab, azure: &[TraceRecord], requests: usize) -> Result<()> {
    let mut rows = Vec::new();
    let points = paper_grid();
    for hardware in GRID_HARDWARE {
        for &(density, sharing) in &points {
            let name = format!("paper-grid:{density:.2}:{sharing:.2}");
            let w = prepare(lab, azure, hardware, &name, (density, sharing), requests)?;
            rows.extend(run(
                lab,
                "paper-grid",
                hardware,
                "max",
                &w,
                &["dfs", "blendserve"],
                LengthKnowledge::default(),
            )?);
        }
        let xs: Vec<f64> = (0..13).map(|i| 0.80 + 0.05 * f64::from(i)).collect();
        let ys: Vec<f64> = (0..5).map(|j| 0.05 + 0.10 * f64::from(j)).collect();
        let mut cells = vec![vec![f64::NAN; xs.len()]; ys.len()];
        for r in rows
            .iter()
            .filter(|r| r.hardware == hardware && r.policy == "blendserve")
        {
            let x = ((r.target_density - 0.80) / 0.05).round() as usize;
            let y = ((r.target_sharing - 0.05) / 0.10).round() as usize;
            cells[y][x] = r.speedup_over_dfs;
        }
        let speedups: Vec<f64> = cells.iter().flatten().copied().collect();
        let mean = speedups.iter().sum::<f64>() / speedups.len() as f64;
        plot::heatmap(
            &lab.svg(&format!("paper-grid-{hardware}")),
            &Heatmap {
                title: &format!("BlendServe over DFS, {hardware}, executor max, mean {mean:.3} (paper, A100: 1.14-1.34, mean 1.225)"),
                x_label: "workload compute density",
                y_label: "prefix-sharing ratio",
                x_values: &xs,
                y_values: &ys,
                cells: &cells,
                low: 1.0,
                high: 1.8,
            },
        )?;
        println!("grid on {hardware}: BlendServe over DFS mean {mean:.3}");
    }
    write_csv(lab, "paper-grid", &rows)
}

/// BlendServe's parts on the four traces (H200, `max`), and sampling against max-tokens.
fn ablation(lab: &Lab, azure: &[TraceRecord], requests: usize) -> Result<()> {
    let mut rows = Vec::new();
    let hardware = "h200";
    for (k, &target) in PAPER_TRACES.iter().enumerate() {
        let name = format!("paper-trace{}", k + 1);
        let w = prepare(lab, azure, hardware, &name, target, requests)?;
        rows.extend(run(
            lab,
            "paper-ablation",
            hardware,
            "max",
            &w,
            &ABLATIONS,
            LengthKnowledge::default(),
        )?);
        let mut nosample = run(
            lab,
            "paper-ablation",
            hardware,
            "max",
            &w,
            &["dfs", "blendserve"],
            LengthKnowledge::MaxTokens,
        )?;
        nosample.retain(|r| r.policy == "blendserve");
        for r in &mut nosample {
            r.policy = "blendserve-nosampling".into();
        }
        rows.extend(nosample);
    }
    let (categories, series) = plot::bar_groups(
        &rows,
        |r| trace_label(&r.workload),
        |r| r.policy.clone(),
        |r| r.speedup_over_dfs,
    );
    plot::grouped_bars(
        &lab.svg("paper-ablation"),
        "BlendServe's parts on the paper traces (h200, executor max)",
        "throughput / DFS's",
        &categories,
        &series,
    )?;
    write_csv(lab, "paper-ablation", &rows)
}

/// Everything above. `trace_requests` per trace, `grid_requests` per grid workload.
pub fn paper(lab: &Lab, trace_requests: usize, grid_requests: usize) -> Result<()> {
    let azure = azure(lab)?;
    let rows = traces(lab, &azure, trace_requests)?;
    for hardware in HARDWARE {
        for executor in EXECUTORS {
            let ours: Vec<&PaperRow> = rows
                .iter()
                .filter(|r| {
                    r.hardware == hardware && r.executor == executor && r.policy == "blendserve"
                })
                .collect();
            let n = ours.len() as f64;
            println!(
                "{hardware} {executor}: BlendServe over DFS mean {:.3}, {:.1}% of optimal, hits {:.1}% of DFS's (min {:.1}%)",
                ours.iter().map(|r| r.speedup_over_dfs).sum::<f64>() / n,
                ours.iter().map(|r| r.percent_of_optimal).sum::<f64>() / n,
                100.0 * ours.iter().map(|r| r.hits_of_dfs).sum::<f64>() / n,
                100.0 * ours.iter().map(|r| r.hits_of_dfs).fold(f64::INFINITY, f64::min),
            );
        }
    }
    ablation(lab, &azure, trace_requests)?;
    grid(lab, &azure, grid_requests)
}
