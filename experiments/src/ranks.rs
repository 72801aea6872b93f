//! Data-parallel scaling in the simulator (issue 18): the paper's traces #1-#4 cut into 1-8
//! ranks by BlendServe's sharding (one tree, snake-dealt segments, long outputs gathered on the
//! ranks the cost model picks), by the same without gathering (`blendserve-spread`, the CSV's
//! ablation) and by round-robin, each rank a replica of the same GPU running the BlendServe
//! policy; makespan is the slowest rank's.

use anyhow::Result;
use scheduler::{LengthKnowledge, PolicyKind, Sharding};
use sim::paper::PAPER_TRACES;
use sim::ranks::simulate_ranks;
use sim::{SimConfig, Simulation};

use crate::paper::{azure, prepare, trace_label};
use crate::plot::{line_chart, Series};
use crate::Lab;

const HARDWARE: &str = "h200";
const EXECUTOR: &str = "max";
const RANKS: [usize; 4] = [1, 2, 4, 8];
/// The tree cut without gathering the long outputs: the CSV's ablation (not drawn).
const SPREAD: Sharding = Sharding::BlendServe {
    segments_per_rank: Sharding::DEFAULT_SEGMENTS_PER_RANK,
    gather_long: false,
};

pub fn ranks(lab: &Lab, requests: usize) -> Result<()> {
    let azure = azure(lab)?;
    let mut rows = Vec::new();
    for (k, &target) in PAPER_TRACES.iter().enumerate() {
        let name = format!("paper-trace{}", k + 1);
        let w = prepare(lab, &azure, HARDWARE, &name, target, requests)?;
        let mut config =
            SimConfig::from_presets(&lab.common.model, HARDWARE, None, EXECUTOR.parse()?)?;
        config.seed = lab.common.seed;
        config.lengths = LengthKnowledge::default();
        let single = Simulation::new(&w.workload, config.clone())?;
        let kind = PolicyKind::parse("blendserve")?;
        let report = single.run("blendserve", &kind, &mut |_, _| {})?;
        for sharding in [Sharding::default(), SPREAD, Sharding::RoundRobin] {
            for n in RANKS {
                let r = simulate_ranks(
                    &w.workload,
                    &single,
                    &report,
                    &config,
                    ("blendserve", &kind),
                    n,
                    sharding,
                )?;
                tracing::info!(
                    "{name} {sharding} x{n}: {:.2}x, spread {:.1}%, hits kept {:.1}%",
                    r.speedup,
                    100.0 * r.spread,
                    100.0 * r.prefix_hits_kept
                );
                rows.push(r.row(&trace_label(&name), w.workload.len(), EXECUTOR));
            }
        }
    }
    println!("wrote {}", lab.write_csv("ranks", &rows)?.display());
    let mut series: Vec<Series> = Vec::new();
    for r in rows.iter().filter(|r| r.sharding != SPREAD.to_string()) {
        let cut = if r.sharding == "round-robin" {
            "round-robin"
        } else {
            "BlendServe tree cut"
        };
        let name = format!("{}, {cut}", r.workload);
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((r.ranks as f64, r.speedup)),
            None => series.push(Series {
                name,
                points: vec![(r.ranks as f64, r.speedup)],
                dashed: r.sharding == "round-robin",
            }),
        }
    }
    series.push(Series {
        name: "linear".into(),
        points: RANKS.iter().map(|&n| (n as f64, n as f64)).collect(),
        dashed: true,
    });
    line_chart(
        &lab.svg("ranks"),
        &format!(
            "Data-parallel ranks, simulated ({HARDWARE}, executor {EXECUTOR}, BlendServe policy)"
        ),
        "ranks (replicas of the GPU)",
        "speed-up over one rank (x)",
        &series,
    )
}
