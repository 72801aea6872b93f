//! Data-parallel ranks of `blendserve run`: which of a batch's requests rank K of N runs
//! (`run --rank K --ranks N`, planned deterministically from the whole input, so every rank
//! computes the same cut), and `blendserve merge`, which joins the ranks' outputs into one file
//! in input order and says which lines are missing and so which rank to rerun.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use prefix_tree::RequestIndex;
use scheduler::{shard, LengthKnowledge, PerfModel, Preparation, Sharding};
use serde_json::Value;
use workload::{Request, Workload};

use crate::run_cmd::{is_openai_batch, load_entries, perf_model, Entry, ModelInfo, RunArgs};

/// The requests of `workload` (in input order) each of `ranks` ranks runs, cut by `sharding`
/// (priced by `perf`; output lengths as the scheduler will know them: the recorded ones when
/// `known_lengths`, else `max_tokens`; `max_batch_tokens` as the run's).
pub fn cut_ranks(
    workload: &Workload,
    perf: &PerfModel,
    known_lengths: bool,
    seed: u64,
    ranks: usize,
    (sharding, max_batch_tokens): (Sharding, u32),
) -> Vec<Vec<RequestIndex>> {
    let lengths = if known_lengths {
        LengthKnowledge::Known
    } else {
        LengthKnowledge::MaxTokens
    };
    shard(
        &Preparation::new(workload, perf, lengths, seed),
        ranks,
        sharding,
        perf,
        max_batch_tokens,
    )
}

/// `--rank K --ranks N`: both or neither, K < N.
pub fn check_rank(rank: Option<usize>, ranks: Option<usize>) -> Result<Option<(usize, usize)>> {
    match (rank, ranks) {
        (None, None) => Ok(None),
        (Some(k), Some(n)) if n >= 1 && k < n => Ok(Some((k, n))),
        (Some(k), Some(n)) => bail!(
            "--rank {k} is not one of --ranks {n} (0 to {})",
            n.max(1) - 1
        ),
        (Some(_), None) => bail!("--rank needs --ranks N"),
        (None, Some(_)) => bail!("--ranks needs --rank K (which of the ranks this run is)"),
    }
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The ranks' output files (`run --rank K --ranks N --output ...`).
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
    /// The merged output, in input order.
    #[arg(long)]
    pub out: PathBuf,
    /// The batch every rank ran: checks that every line of it has a result.
    #[arg(long)]
    pub input: Option<PathBuf>,
}

/// One result line of a rank's output: its line-based id and text.
struct ResultLine {
    id: String,
    text: String,
}

/// The complete result lines of one output file (a torn last line, from a rank that died while
/// writing, is left out with a warning).
fn read_results(path: &Path) -> Result<Vec<ResultLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let complete = line.ends_with('\n');
        let body = line.trim_end();
        if body.is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(body);
        match parsed {
            Ok(v) => {
                let id = v.get("id").and_then(Value::as_str).with_context(|| {
                    format!(
                        "{}:{}: a result line without an `id`",
                        path.display(),
                        i + 1
                    )
                })?;
                out.push(ResultLine {
                    id: id.to_string(),
                    text: body.to_string(),
                });
            }
            Err(_) if !complete && i + 1 == lines.len() => {
                tracing::warn!("{}: dropping a torn last line", path.display());
            }
            Err(e) => bail!("{}:{}: not a result line: {e}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// The line-based ids of every non-empty line of a batch file (what `run` names results by).
fn input_ids(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| crate::batch_file::line_id(i + 1))
        .collect())
}

pub fn run_merge(args: &MergeArgs) -> Result<()> {
    let mut all: Vec<ResultLine> = Vec::new();
    let mut from: HashMap<String, usize> = HashMap::new();
    for (k, path) in args.shards.iter().enumerate() {
        for line in read_results(path)? {
            if let Some(&other) = from.get(&line.id) {
                bail!(
                    "{} is in both {} and {}: were the ranks cut the same way?",
                    line.id,
                    args.shards[other].display(),
                    path.display()
                );
            }
            from.insert(line.id.clone(), k);
            all.push(line);
        }
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    // Written whole, then renamed: a merge never leaves a half file where the output was.
    let tmp = args.out.with_extension("merge-tmp");
    {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(file);
        for line in &all {
            writeln!(out, "{}", line.text)?;
        }
        out.flush()?;
    }
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "merged {} results from {} rank outputs into {}",
        all.len(),
        args.shards.len(),
        args.out.display()
    );
    if let Some(input) = &args.input {
        let missing: Vec<String> = input_ids(input)?
            .into_iter()
            .filter(|id| !from.contains_key(id))
            .collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
            bail!(
                "{} of {}'s lines have no result ({}{}); rerun the ranks that ran them with \
                 --resume on their own output, then merge again (the merged file holds every \
                 result so far)",
                missing.len(),
                input.display(),
                shown.join(", "),
                if missing.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        println!("every line of {} has a result", input.display());
    }
    Ok(())
}

/// The command line of this process with `--devices` and `--output` (and their values) left
/// out, for the ranks' child processes.
fn child_args(skip: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if skip.contains(&a.as_str()) {
            args.next();
        } else if !skip.iter().any(|s| a.starts_with(&format!("{s}="))) {
            out.push(a);
        }
    }
    out
}

/// Rank k's output beside the merged one: `OUT.rank-k.jsonl` (and `.log`).
fn rank_path(out: &Path, rank: usize, ext: &str) -> PathBuf {
    let mut name = out.file_stem().unwrap_or_default().to_os_string();
    name.push(format!(".rank-{rank}.{ext}"));
    out.with_file_name(name)
}

/// Lines written so far to a rank's output.
fn lines_in(path: &Path) -> u64 {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64)
}

/// `run --devices 0,1,..`: one child `run --rank k --ranks N` per device (CUDA_VISIBLE_DEVICES
/// set to it), one progress bar over all of them, then `merge` into `--output`. A rank that
/// fails leaves the others' results (merged) and its log, and the error says how to rerun it.
pub fn run_on_devices(args: &RunArgs, devices: &str) -> Result<()> {
    let devices: Vec<&str> = devices.split(',').map(str::trim).collect();
    if devices.iter().any(|d| d.is_empty()) {
        bail!("--devices takes a comma list of device ids, e.g. 0,1,2,3");
    }
    if args.rank.is_some() || args.ranks.is_some() {
        bail!("--devices runs every rank itself: leave out --rank and --ranks");
    }
    let Some(out) = &args.output else {
        bail!("--devices needs --output (the merged result; each rank's goes beside it)");
    };
    let exe = std::env::current_exe().context("finding this executable")?;
    // Each rank writes its own output, report and timeline beside the merged output.
    let base = child_args(&["--devices", "--output", "--report", "--timeline"]);
    let n = devices.len();
    let mut children = Vec::with_capacity(n);
    for (rank, device) in devices.iter().enumerate() {
        let log_path = rank_path(out, rank, "log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = std::process::Command::new(&exe)
            .args(&base)
            .args([
                "--rank",
                &rank.to_string(),
                "--ranks",
                &n.to_string(),
                "--output",
            ])
            .arg(rank_path(out, rank, "jsonl"))
            .args(args.report.iter().flat_map(|_| {
                [
                    "--report".into(),
                    rank_path(out, rank, "report.json").into_os_string(),
                ]
            }))
            .args(args.timeline.iter().flat_map(|_| {
                [
                    "--timeline".into(),
                    rank_path(out, rank, "timeline.csv").into_os_string(),
                ]
            }))
            .env("CUDA_VISIBLE_DEVICES", device)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting rank {rank} on device {device}"))?;
        children.push((rank, *device, child));
    }
    let total = args
        .input
        .as_deref()
        .and_then(|p| input_ids(p).ok())
        .map_or(0, |ids| ids.len() as u64);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} results, {elapsed} (ETA {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{n} ranks"));
    let mut failed = Vec::new();
    let mut running = children;
    while !running.is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut still = Vec::new();
        for (rank, device, mut child) in running {
            match child.try_wait()? {
                None => still.push((rank, device, child)),
                Some(status) if status.success() => {}
                Some(status) => failed.push((rank, device, status)),
            }
        }
        running = still;
        bar.set_position((0..n).map(|k| lines_in(&rank_path(out, k, "jsonl"))).sum());
    }
    bar.finish_and_clear();
    let shards: Vec<PathBuf> = (0..n)
        .map(|k| rank_path(out, k, "jsonl"))
        .filter(|p| p.exists())
        .collect();
    run_merge(&MergeArgs {
        shards,
        out: out.clone(),
        input: if failed.is_empty() {
            args.input.clone()
        } else {
            None
        },
    })?;
    if let Some((rank, device, status)) = failed.first() {
        bail!(
            "rank {rank} (device {device}) failed ({status}): see {}; the merged output holds \
             every other result. Rerun the same command with --resume to finish it",
            rank_path(out, *rank, "log").display()
        );
    }
    Ok(())
}

/// One rank in `manifest.json`.
#[derive(serde::Serialize)]
struct PlannedRank {
    rank: usize,
    file: String,
    requests: usize,
    /// The simulator's time for this rank alone (output lengths as planned: `max_tokens`
    /// unless known), seconds.
    predicted_secs: f64,
    /// Compute seconds over memory seconds of the rank's predicted demand.
    density: f64,
    /// Prompt tokens a perfect prefix cache saves within the rank.
    shared_prompt_tokens: f64,
}

#[derive(serde::Serialize)]
struct Manifest {
    ranks: usize,
    sharding: String,
    model: String,
    hardware: String,
    requests: usize,
    /// The simulator's time for the whole input on one rank.
    predicted_single_secs: f64,
    /// The slowest rank's predicted time.
    predicted_secs: f64,
    /// Prompt tokens the ranks' prefix caches can save, over what one rank's could.
    sharing_kept: f64,
    /// Cuts the simulator tried after the first (0: the first cut, as `run --rank` makes it).
    rebalancing_passes: usize,
    per_rank: Vec<PlannedRank>,
}

/// The simulator's settings for `plan`'s predictions and rebalancing: the run's model,
/// hardware and executor, output lengths as planned.
fn plan_sim_config(perf: &PerfModel) -> sim::SimConfig {
    let mut config = sim::SimConfig::new(perf.model.clone(), perf.hardware.clone(), perf.executor);
    config.lengths = LengthKnowledge::Known;
    config
}

/// The simulator's view of `requests` alone: predicted seconds (`simulated_secs` where the
/// rebalancing already simulated them, else a run of the simulator), density, shared prompt
/// tokens.
fn predict(
    workload: &Workload,
    perf: &PerfModel,
    policy: &str,
    simulated_secs: Option<f64>,
) -> Result<(f64, f64, f64)> {
    if workload.is_empty() {
        return Ok((0.0, 1.0, 0.0));
    }
    let simulation = sim::Simulation::new(workload, plan_sim_config(perf))?;
    let secs = match simulated_secs {
        Some(secs) => secs,
        None => {
            let kind = scheduler::PolicyKind::parse(policy)?;
            simulation.run(policy, &kind, &mut |_, _| {})?.makespan_secs
        }
    };
    let p = simulation.preparation();
    let shared = p.tree.sharing_ratio() * p.tree.total_prompt_tokens() as f64;
    Ok((secs, p.annotation.total().density(), shared))
}

/// Writes `plan`'s shard files and manifest (see `run_cmd::plan`): rank k's file is the input
/// with every line not of rank k blanked.
fn write_plan(
    dir: &Path,
    text: &str,
    line_rank: &HashMap<usize, usize>,
    cut: &EntryRanks,
    policy: &str,
) -> Result<()> {
    let EntryRanks {
        sharding,
        workload,
        shards,
        perf,
        simulated,
        ..
    } = cut;
    let ranks = shards.len();
    // The rebalancing's times, where it simulated every rank (it leaves out empty ones).
    let rank_secs = simulated
        .as_ref()
        .map(|s| &s.rank_secs)
        .filter(|secs| secs.len() == ranks);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut per_rank = Vec::with_capacity(ranks);
    for (rank, ids) in shards.iter().enumerate() {
        let name = format!("rank-{rank}.jsonl");
        let mut out = String::with_capacity(text.len() / ranks.max(1));
        for (i, line) in text.lines().enumerate() {
            if line_rank.get(&(i + 1)) == Some(&rank) {
                out.push_str(line);
            }
            out.push('\n');
        }
        let path = dir.join(&name);
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        let mine = sim::ranks::sub_workload(workload, ids);
        let known = rank_secs.map(|secs| secs[rank]);
        let (predicted_secs, density, shared_prompt_tokens) = predict(&mine, perf, policy, known)?;
        per_rank.push(PlannedRank {
            rank,
            file: name,
            requests: mine.len(),
            predicted_secs,
            density,
            shared_prompt_tokens,
        });
    }
    let (single, _, shared) = predict(
        workload,
        perf,
        policy,
        simulated.as_ref().map(|s| s.single_secs),
    )?;
    let manifest = Manifest {
        ranks,
        sharding: sharding.to_string(),
        model: perf.model.name.clone(),
        hardware: perf.hardware.name.clone(),
        requests: workload.len(),
        predicted_single_secs: single,
        predicted_secs: per_rank
            .iter()
            .map(|r| r.predicted_secs)
            .fold(0.0, f64::max),
        rebalancing_passes: cut.rebalancing_passes(),
        sharing_kept: if shared > 0.0 {
            per_rank.iter().map(|r| r.shared_prompt_tokens).sum::<f64>() / shared
        } else {
            1.0
        },
        per_rank,
    };
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "planned {} requests into {ranks} ranks in {}: predicted {:.1}s per rank at most \
         (one rank {:.1}s), {:.1}% of the prefix sharing kept",
        manifest.requests,
        dir.display(),
        manifest.predicted_secs,
        manifest.predicted_single_secs,
        100.0 * manifest.sharing_kept
    );
    for r in &manifest.per_rank {
        println!(
            "  rank {}: {} requests, {:.1}s, density {:.2}",
            r.rank, r.requests, r.predicted_secs, r.density
        );
    }
    Ok(())
}

/// `blendserve plan`: the input cut into `--ranks` shard files in `--output` (a folder), each the
/// input with the other ranks' lines blanked (so results keep their line-based ids and `merge`
/// restores input order), and `manifest.json` with each rank's requests, predicted time
/// (the simulator, on the run's hardware and policy), compute density and prefix sharing.
pub fn plan(args: &RunArgs) -> Result<()> {
    let ranks = args.ranks.context("plan needs --ranks N")?;
    let dir = args
        .output
        .as_ref()
        .context("plan needs --output DIR (the folder for the shards and manifest)")?;
    let Some(input) = &args.input else {
        bail!("plan needs --input FILE (a batch or native JSONL file)");
    };
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    if !is_openai_batch(&text) {
        // A native workload's prefixes get their token ids in order of appearance, so a shard
        // parsed alone would not reproduce them.
        bail!(
            "plan writes shard files of OpenAI batch files; for the native workload {} run \
             `run --rank K --ranks N` on the whole file on each rank instead",
            input.display()
        );
    }
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => crate::demo::demo_model_dir()?,
    };
    let info = ModelInfo::load(&model_dir)?;
    let entries = load_entries(args, &info)?;
    let mut cut = EntryRanks::new(&entries, args, &info, ranks)?;
    cut.rebalance(&args.policy)?;
    // Each input line's rank: its job's, or rank 0 for a line refused up front.
    let line_rank: HashMap<usize, usize> = entries
        .iter()
        .zip(&cut.of_entry)
        .map(|(e, r)| (e.line(), r.unwrap_or(0)))
        .collect();
    write_plan(dir, &text, &line_rank, &cut, &args.policy)
}

/// With `--rank K --ranks N`, rank K's entries: its share of the jobs (cut from all of them,
/// so every rank cuts alike) and, on rank 0, the lines refused up front.
pub(crate) fn keep_rank(
    entries: Vec<Entry>,
    args: &RunArgs,
    info: &ModelInfo,
) -> Result<Vec<Entry>> {
    let Some((rank, ranks)) = check_rank(args.rank, args.ranks)? else {
        return Ok(entries);
    };
    let mut cut = EntryRanks::new(&entries, args, info, ranks)?;
    if args.rebalance_ranks {
        cut.rebalance(&args.policy)?;
    }
    let jobs = cut.workload.len();
    let kept: Vec<Entry> = entries
        .into_iter()
        .zip(&cut.of_entry)
        .filter(|(_, r)| r.unwrap_or(0) == rank)
        .map(|(e, _)| e)
        .collect();
    tracing::info!(
        "rank {rank} of {ranks} ({}, {} rebalancing passes): {} of {jobs} requests",
        cut.sharding,
        cut.rebalancing_passes(),
        cut.of_entry.iter().filter(|r| **r == Some(rank)).count()
    );
    Ok(kept)
}

/// The run's requests cut into ranks: each entry's rank (`None` for a line refused up front,
/// which rank 0 writes), the requests as the scheduler sees them, each rank's, and how they
/// were priced.
struct EntryRanks {
    of_entry: Vec<Option<usize>>,
    workload: Workload,
    shards: Vec<Vec<RequestIndex>>,
    sharding: Sharding,
    perf: PerfModel,
    /// What [`EntryRanks::rebalance`] simulated, if it ran.
    simulated: Option<Simulated>,
}

/// The simulator's times for a rebalanced cut, kept for the manifest.
struct Simulated {
    /// Cuts simulated after the first.
    passes: usize,
    single_secs: f64,
    /// Each rank's time, rank order (the simulator leaves out an empty rank).
    rank_secs: Vec<f64>,
}

impl EntryRanks {
    fn new(entries: &[Entry], args: &RunArgs, info: &ModelInfo, ranks: usize) -> Result<Self> {
        let sharding: Sharding = args.sharding.parse()?;
        let requests: Vec<Option<Request>> = entries.iter().map(Entry::scheduler_request).collect();
        // A job's rank is set by `assign`; lines refused up front have none.
        let of_entry = requests.iter().map(|r| r.as_ref().map(|_| 0)).collect();
        let workload = Workload {
            requests: requests.into_iter().flatten().collect(),
            sources: vec!["run".into()],
        };
        let dtype_bytes = if args.device == "cuda" { 2 } else { 4 };
        // From the flags alone: every rank must cut alike, whatever files its machine holds.
        let choice = crate::hardware::choose(
            args.hardware.as_deref(),
            args.hardware_config.as_deref(),
            None,
            |_| None,
        );
        let perf = perf_model(args, info, dtype_bytes, &choice)?;
        let shards = cut_ranks(
            &workload,
            &perf,
            args.assume_known_lengths,
            args.workload.seed,
            ranks,
            (sharding, args.scheduler.max_batch_tokens),
        );
        let mut cut = EntryRanks {
            of_entry,
            workload,
            shards: Vec::new(),
            sharding,
            perf,
            simulated: None,
        };
        cut.assign(shards);
        Ok(cut)
    }

    /// Takes `shards` as the cut: each job entry gets its request's rank (jobs are the
    /// workload's requests in entry order).
    fn assign(&mut self, shards: Vec<Vec<RequestIndex>>) {
        let mut rank_of = vec![0; self.workload.len()];
        for (rank, ids) in shards.iter().enumerate() {
            for &i in ids {
                rank_of[i as usize] = rank;
            }
        }
        let mut job_ranks = rank_of.into_iter();
        for r in self.of_entry.iter_mut().flatten() {
            *r = job_ranks.next().unwrap_or(0);
        }
        self.shards = shards;
    }

    /// Cuts simulated after the first (0 where the cut was not rebalanced).
    fn rebalancing_passes(&self) -> usize {
        self.simulated.as_ref().map_or(0, |s| s.passes)
    }

    /// The cut `plan` (and `run --rank` with `--rebalance-ranks`) uses: BlendServe's sharding
    /// re-cut by the simulator's rebalancing passes (`sim::ranks::simulate_ranks`, each rank
    /// simulated under `policy`), so the ranks' predicted times come out even as `sim --ranks`
    /// reports them. The simulation is deterministic, so every rank reaches the same cut alone.
    fn rebalance(&mut self, policy: &str) -> Result<()> {
        let ranks = self.shards.len();
        if ranks < 2 || self.sharding == Sharding::RoundRobin || self.workload.is_empty() {
            return Ok(());
        }
        let config = plan_sim_config(&self.perf);
        let single = sim::Simulation::new(&self.workload, config.clone())?;
        let kind = scheduler::PolicyKind::parse(policy)?;
        let report = single.run(policy, &kind, &mut |_, _| {})?;
        let kept = sim::ranks::simulate_ranks(
            &self.workload,
            &single,
            &report,
            &config,
            (policy, &kind),
            ranks,
            self.sharding,
        )?;
        if kept.shards.len() != ranks {
            return Ok(());
        }
        self.simulated = Some(Simulated {
            passes: kept.passes - 1,
            single_secs: report.makespan_secs,
            rank_secs: kept.per_rank.iter().map(|r| r.makespan_secs).collect(),
        });
        self.assign(kept.shards);
        Ok(())
    }
}
