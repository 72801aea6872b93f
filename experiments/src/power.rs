//! `experiments power`: what the H200's 700 W limit does to BlendServe's gain (NOTES.md section
//! 13). The paper's traces #1-#4 on the `h200` preset, DFS and BlendServe, sequential (`sum`) and
//! overlapped (`max`), with the preset's measured power model and without it
//! (`power_cap_watts = inf`): speed-up over DFS run sequentially under the same limit.

use anyhow::Result;
use scheduler::{LengthKnowledge, PolicyKind};
use serde::Serialize;
use sim::paper::PAPER_TRACES;
use sim::{SimConfig, Simulation};

use crate::paper::{azure, prepare, trace_label};
use crate::plot::{bar_groups, grouped_bars};
use crate::Lab;

const HARDWARE: &str = "h200";
const POLICIES: [&str; 2] = ["dfs", "blendserve"];
const EXECUTORS: [&str; 2] = ["sum", "max"];

#[derive(Serialize)]
struct PowerRow {
    workload: String,
    requests: usize,
    power_limit: String,
    policy: String,
    executor: String,
    makespan_secs: f64,
    tokens_per_sec: f64,
    /// Over DFS with the sequential executor, under the same power limit.
    speedup_over_dfs_sequential: f64,
    percent_of_optimal: f64,
    /// The optimal bound's share set by energy at the power limit (0 without one).
    bound_power_secs: f64,
    bound_secs: f64,
}

pub fn power(lab: &Lab, requests: usize) -> Result<()> {
    let azure = azure(lab)?;
    let mut rows: Vec<PowerRow> = Vec::new();
    for (k, &target) in PAPER_TRACES.iter().enumerate() {
        let name = format!("paper-trace{}", k + 1);
        let w = prepare(lab, &azure, HARDWARE, &name, target, requests)?;
        for limited in [true, false] {
            let first = rows.len();
            for executor in EXECUTORS {
                let mut config =
                    SimConfig::from_presets(&lab.common.model, HARDWARE, None, executor.parse()?)?;
                config.seed = lab.common.seed;
                config.lengths = LengthKnowledge::default();
                let limit = match (limited, config.hardware.power.as_mut()) {
                    (true, Some(p)) => format!("{:.0} W", p.cap_watts),
                    (false, Some(p)) => {
                        p.cap_watts = f64::INFINITY;
                        "none".to_string()
                    }
                    (_, None) => anyhow::bail!("the {HARDWARE} preset has no power model"),
                };
                let simulation = Simulation::new(&w.workload, config)?;
                let bound = simulation.bound();
                for policy in POLICIES {
                    let report =
                        simulation.run(policy, &PolicyKind::parse(policy)?, &mut |_, _| {})?;
                    tracing::info!(
                        "{name} limit {limit} {policy} ({executor}): {:.1} s, {:.1}% of optimal",
                        report.makespan_secs,
                        report.percent_of_optimal
                    );
                    rows.push(PowerRow {
                        workload: trace_label(&name),
                        requests: w.workload.len(),
                        power_limit: limit.clone(),
                        policy: policy.to_string(),
                        executor: executor.to_string(),
                        makespan_secs: report.makespan_secs,
                        tokens_per_sec: report.total_tokens_per_sec,
                        speedup_over_dfs_sequential: f64::NAN,
                        percent_of_optimal: report.percent_of_optimal,
                        bound_power_secs: bound.power_secs,
                        bound_secs: bound.secs,
                    });
                }
            }
            let base = rows[first..]
                .iter()
                .find(|r| r.policy == "dfs" && r.executor == "sum")
                .map(|r| r.tokens_per_sec)
                .expect("dfs under sum was run");
            for r in &mut rows[first..] {
                r.speedup_over_dfs_sequential = r.tokens_per_sec / base;
            }
        }
    }
    println!("wrote {}", lab.write_csv("power", &rows)?.display());
    let (categories, series) = bar_groups(
        rows.iter().filter(|r| r.executor == "max"),
        |r| r.workload.clone(),
        |r| {
            let policy = if r.policy == "dfs" {
                "DFS"
            } else {
                "BlendServe"
            };
            match r.power_limit.as_str() {
                "none" => format!("{policy}, overlapped, no power limit"),
                limit => format!("{policy}, overlapped, {limit} limit"),
            }
        },
        |r| r.speedup_over_dfs_sequential,
    );
    grouped_bars(
        &lab.svg("power"),
        "Simulated H200, Llama-3-8B: overlap under the board's 700 W limit",
        "speed-up over DFS run sequentially (x)",
        &categories,
        &series,
    )
}
