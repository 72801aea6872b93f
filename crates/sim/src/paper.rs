//! The paper's named workloads: traces #1-#4 (density 1.4 / 0.9 x prefix sharing 35% / 5%) and
//! its 65-workload grid (density 0.80-1.40 step 0.05 x sharing 0.05-0.45 step 0.10), built as
//! the paper builds them: BurstGPT-like chat mixed with OpenVid-like video generation until the
//! density is reached, then MMLU-like questions added until the sharing is. Density is priced on
//! the given model and hardware (the paper's were on an A100), so a preset means "this density
//! on this machine".
//!
//! Names: `paper-trace1` .. `paper-trace4`, `paper-grid:D:S` (e.g. `paper-grid:1.30:0.25`).

use scheduler::{LengthKnowledge, PerfModel, Preparation};
use workload::paper::{generate_paper, PaperMix, PaperPart};
use workload::traces::TraceRecord;
use workload::{Workload, WorkloadError};

/// Mean prompt of the paper's mixes, for the decode-concurrency hint that prices weight reads.
pub const TYPICAL_PROMPT_TOKENS: f64 = 300.0;

/// The performance model presets are priced on: `config`'s model and hardware, with the decode
/// concurrency its KV cache would hold for the paper's mixes (as [`crate::Simulation`] sets it).
pub fn pricing_model(config: &crate::SimConfig) -> Result<PerfModel, scheduler::SchedulerError> {
    let mut perf = PerfModel::new(
        config.model.clone(),
        config.hardware.clone(),
        config.executor,
    );
    let s = &config.scheduler;
    let blocks = perf.kv_capacity_blocks(
        config.kv_memory_fraction,
        s.block_tokens,
        s.max_batch_tokens,
    )?;
    perf.set_decode_concurrency(
        f64::from(blocks) * f64::from(s.block_tokens),
        TYPICAL_PROMPT_TOKENS,
        s.max_running,
    );
    Ok(perf)
}

/// The paper's main traces: (density, prefix-sharing ratio).
pub const PAPER_TRACES: [(f64, f64); 4] = [(1.4, 0.35), (0.9, 0.35), (1.4, 0.05), (0.9, 0.05)];

/// The grid of §6.5: densities 0.80-1.40 by 0.05, sharing 0.05-0.45 by 0.10.
pub fn paper_grid() -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for i in 0..13 {
        for j in 0..5 {
            out.push((0.80 + 0.05 * f64::from(i), 0.05 + 0.10 * f64::from(j)));
        }
    }
    out
}

/// The (density, sharing) target a preset name stands for, or `None` if it is no preset.
pub fn preset_target(name: &str) -> Result<Option<(f64, f64)>, WorkloadError> {
    if let Some(k) = name.strip_prefix("paper-trace") {
        let k: usize = k
            .parse()
            .ok()
            .filter(|k| (1..=4).contains(k))
            .ok_or_else(|| WorkloadError::Spec(format!("`{name}`: the paper has traces 1 to 4")))?;
        return Ok(Some(PAPER_TRACES[k - 1]));
    }
    if let Some(rest) = name.strip_prefix("paper-grid:") {
        let parsed = rest
            .split_once(':')
            .and_then(|(d, s)| Some((d.parse::<f64>().ok()?, s.parse::<f64>().ok()?)))
            .filter(|&(d, s)| d > 0.0 && d.is_finite() && (0.0..0.8).contains(&s));
        return parsed.map(Some).ok_or_else(|| {
            WorkloadError::Spec(format!(
                "`{name}`: write paper-grid:DENSITY:SHARING, e.g. paper-grid:1.30:0.25 (sharing below 0.8)"
            ))
        });
    }
    Ok(None)
}

/// Requests of each part priced to learn its mean demand.
const POOL_REQUESTS: usize = 20_000;

/// What a mix came to on the model and hardware it was priced on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixShape {
    pub density: f64,
    pub sharing: f64,
}

/// One part's means per request: compute and memory seconds (its shared prefixes computed once),
/// prompt tokens and prompt tokens shared.
#[derive(Clone, Copy, Debug)]
struct PartMeans {
    compute_secs: f64,
    memory_secs: f64,
    prompt_tokens: f64,
    shared_tokens: f64,
}

fn shape_of(w: &Workload, perf: &PerfModel, seed: u64) -> (MixShape, Preparation) {
    let p = Preparation::new(w, perf, LengthKnowledge::Known, seed);
    let shape = MixShape {
        density: p.annotation.total().density(),
        sharing: p.tree.sharing_ratio(),
    };
    (shape, p)
}

fn part_means(
    part: PaperPart,
    perf: &PerfModel,
    azure: &[TraceRecord],
    seed: u64,
) -> Result<PartMeans, WorkloadError> {
    let w = generate_paper(
        &PaperMix {
            parts: vec![(part, 1.0)],
        },
        POOL_REQUESTS,
        seed,
        azure,
    )?;
    let (shape, p) = shape_of(&w, perf, seed);
    let n = w.len() as f64;
    let total = p.annotation.total();
    let prompt = p.tree.total_prompt_tokens() as f64 / n;
    Ok(PartMeans {
        compute_secs: total.compute_secs / n,
        memory_secs: total.memory_secs / n,
        prompt_tokens: prompt,
        shared_tokens: shape.sharing * prompt,
    })
}

/// The BurstGPT + MMLU + OpenVid mix whose density and sharing on `perf` meet the target. Each
/// part's mean demand per request is priced once on a pool of its own; with BurstGPT's weight 1,
/// density and sharing are then two linear conditions on MMLU's and OpenVid's weights, solved by
/// a few fixed-point rounds. A target no mix of these parts reaches is an error naming it.
pub fn solve_paper_mix(
    density: f64,
    sharing: f64,
    perf: &PerfModel,
    azure: &[TraceRecord],
    seed: u64,
) -> Result<PaperMix, WorkloadError> {
    let b = part_means(PaperPart::BurstGpt, perf, azure, seed)?;
    let u = part_means(PaperPart::Mmlu, perf, azure, seed)?;
    let o = part_means(PaperPart::OpenVid, perf, azure, seed)?;
    let (mut mmlu, mut openvid) = (0.0, 0.0);
    for _ in 0..50 {
        // Sharing: mmlu * u.shared = s * (prompt tokens of all parts).
        mmlu = sharing * (b.prompt_tokens + openvid * o.prompt_tokens)
            / (u.shared_tokens - sharing * u.prompt_tokens);
        // Density: compute = rho * memory over the three parts.
        openvid = (b.compute_secs + mmlu * u.compute_secs
            - density * (b.memory_secs + mmlu * u.memory_secs))
            / (density * o.memory_secs - o.compute_secs);
    }
    if !(mmlu.is_finite() && openvid.is_finite() && mmlu >= 0.0 && openvid >= 0.0) {
        return Err(WorkloadError::Spec(format!(
            "no mix of burstgpt, mmlu and openvid has density {density} and sharing {sharing} on this model and hardware"
        )));
    }
    Ok(PaperMix {
        parts: vec![
            (PaperPart::BurstGpt, 1.0),
            (PaperPart::Mmlu, mmlu),
            (PaperPart::OpenVid, openvid),
        ],
    })
}

/// A preset workload of `requests` requests (see the module doc), and the shape it came to.
pub fn paper_workload(
    name: &str,
    requests: usize,
    seed: u64,
    perf: &PerfModel,
    azure: &[TraceRecord],
) -> Result<Option<(Workload, MixShape)>, WorkloadError> {
    let Some((density, sharing)) = preset_target(name)? else {
        return Ok(None);
    };
    let m = solve_paper_mix(density, sharing, perf, azure, seed)?;
    let w = generate_paper(&m, requests, seed, azure)?;
    let shape = shape_of(&w, perf, seed).0;
    Ok(Some((w, shape)))
}
