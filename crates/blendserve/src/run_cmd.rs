//! `blendserve run`: a batch file in, every answer out, through the engine on the CPU or GPU.
//!
//! Results are appended to the output as they finish and flushed line by line, so a killed run
//! loses nothing it finished; `--resume` skips the custom_ids already there. At the end the file
//! is rewritten in input order (atomically, through a temporary file and a rename).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use engine::{
    EngineConfig, EngineStats, Generation, GenerationEnd, GenerationRequest, Observer, RunPhase,
    StepReport,
};
use indicatif::{ProgressBar, ProgressStyle};
use model::{SamplingParams, StepModel, StopCriteria, StopReason, TextTokenizer};
use rayon::prelude::*;
use scheduler::{Executor, LengthKnowledge, PerfModel, PolicyKind};
use serde::Serialize;
use serde_json::Value;
use workload::Workload;

use crate::args::{SchedulerArgs, WorkloadArgs};
use crate::batch_file::{
    self, error_line, success_line, BatchRequest, Completion, Endpoint, LineError, PromptInput,
    Usage,
};
use crate::chat_template::ChatTemplate;
use crate::demo;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
    /// Default: the bundled demo model (tiny, random weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// OpenAI Batch API JSONL (/v1/completions, /v1/chat/completions), or a native workload
    /// JSONL (token ids or lengths). Default: --workload if given, else the bundled sample batch.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Results (OpenAI Batch output JSONL). Default: standard output, in input order.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// fcfs, random, dfs, blendserve, or one of BlendServe's ablations.
    #[arg(long, default_value = "blendserve")]
    pub policy: String,
    /// cpu (burn, f32) or cuda (bf16; needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Fraction of GPU memory (CPU: of available memory, at most 4 GiB) for weights,
    /// activations and KV cache, as vLLM's gpu_memory_utilization.
    #[arg(long, default_value_t = 0.9)]
    pub kv_memory_fraction: f64,
    /// Exactly this many KV blocks instead of sizing the cache from memory.
    #[arg(long)]
    pub num_kv_blocks: Option<u32>,
    /// Never stop at EOS (benchmarks that must generate max_tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Tell the scheduler each request's true output length (native workloads with recorded
    /// lengths; for ablations).
    #[arg(long)]
    pub assume_known_lengths: bool,
    /// What policies know of output lengths: sampled[:F] (run a sample first), max-tokens,
    /// known. Default: sampled for BlendServe policies, max-tokens for the others.
    #[arg(long)]
    pub lengths: Option<String>,
    /// Skip requests whose custom_id is already in --output (after a crash or kill).
    #[arg(long)]
    pub resume: bool,
    /// Output order: input (rewritten at the end) or completion (as they finish).
    #[arg(long, default_value = "input")]
    pub order: String,
    /// max_tokens for requests that give none (default: up to the context length, as vLLM).
    #[arg(long)]
    pub default_max_tokens: Option<u32>,
    /// CUDA only: random bf16 weights from config.json alone (benchmarks of a model shape).
    #[arg(long)]
    pub random_weights: bool,
    /// Hardware the policies' cost model, the optimal bound and --predict assume (h100, h200,
    /// a100-80g). Default on cuda: the preset of the GPU the run is on (h100 if it has none);
    /// on cpu, policies use h100's and no bound is reported.
    #[arg(long)]
    pub hardware: Option<String>,
    /// TOML overriding [hardware] fields (a calibrated cost model). Default: the file
    /// `blendserve calibrate` wrote for the hardware in the calibration folder, if any
    /// ($BLENDSERVE_CALIBRATION_DIR, else $XDG_CONFIG_HOME/blendserve, else ~/.config/blendserve).
    #[arg(long)]
    pub hardware_config: Option<PathBuf>,
    /// Executor the policies' cost model, the bound and the prediction assume: sum, max,
    /// partial:E. Default: sum, or with `--step-executor auto` what its profile measured.
    #[arg(long)]
    pub executor: Option<String>,
    /// How the GPU runs a step: sequential, or nano-batches overlapping decode attention with
    /// GEMMs (CUDA only): overlap (shared SMs), overlap-gemm:N (cuBLAS sized to leave N SMs to
    /// decode attention), overlap-green:N (green contexts, N SMs for decode attention); or auto:
    /// time a probe step at the cost model's balance point under each and keep the fastest, and
    /// (unless --executor is given) price steps with the overlap it measured. Overlap measured
    /// slower than sequential so far (experiments/NOTES.md).
    #[arg(long, default_value = "sequential")]
    pub step_executor: String,
    /// Make every answer independent of the batch it ran in (CUDA, compute capability 9.0):
    /// the same tokens whatever the policy, step size, ranks or shards, at some speed (every
    /// GEMM on one fixed-tile kernel instead of cuBLAS's best per shape, decode attention split
    /// by fixed context lengths). What vLLM calls batch-invariant mode.
    #[arg(long)]
    pub batch_invariant: bool,
    /// Also simulate this very run (same workload, scheduler and KV size) with the performance
    /// model, and report its predicted time beside the measured one.
    #[arg(long)]
    pub predict: bool,
    /// Write the final report as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write one CSV row per step: its work, its measured time and the performance model's
    /// time for the same step (to calibrate the model).
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Run only this rank's share of the batch (0-based; with --ranks): the whole input is cut
    /// into --ranks shares the same way on every rank, and `blendserve merge` joins the ranks'
    /// outputs. Lines refused up front are written by rank 0.
    #[arg(long)]
    pub rank: Option<usize>,
    /// How many data-parallel ranks the batch is cut into (with --rank; `plan`: how many shard
    /// files to write).
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Run one shard `blendserve plan` wrote (`DIR/rank-K`, `.jsonl` optional) as the input.
    #[arg(long)]
    pub shard: Option<PathBuf>,
    /// Run one rank per listed device on this host (a comma list of device ids, e.g. 0,1,2,3;
    /// each rank a child process seeing only its device through CUDA_VISIBLE_DEVICES), then
    /// merge the ranks' outputs into --output. Rank k's output and log stay beside it as
    /// OUTPUT.rank-k.jsonl / .log (and its --report / --timeline as OUTPUT.rank-k.report.json
    /// / .timeline.csv); `--resume` resumes each.
    #[arg(long)]
    pub devices: Option<String>,
    /// How the ranks are cut: blendserve (one prefix tree, snake-dealt equal-demand segments,
    /// long outputs gathered on the ranks the cost model picks), blendserve-spread (without
    /// gathering them), either with :SEGMENTS_PER_RANK, round-robin.
    #[arg(long, default_value = "blendserve")]
    pub sharding: String,
    /// With --rank / --devices: every rank first runs the simulator's rebalancing passes on the
    /// whole input (as `plan` and `sim --ranks` do) and cuts alike from their result, so the
    /// ranks' predicted times come out even; costs each rank about (1 + passes) simulations of
    /// the input before it starts.
    #[arg(long)]
    pub rebalance_ranks: bool,
}

/// One row of --timeline.
#[derive(Serialize)]
struct TimelineRow {
    step: u64,
    phase: &'static str,
    prefill_tokens: u64,
    decode_tokens: u64,
    running: usize,
    kv_used_blocks: u32,
    measured_secs: f64,
    predicted_secs: f64,
    predicted_compute_secs: f64,
    predicted_memory_secs: f64,
    gemm_flops: f64,
    weight_bytes: f64,
    prefill_attention_flops: f64,
    prefill_kv_bytes: f64,
    decode_attention_flops: f64,
    decode_kv_bytes: f64,
}

/// One request ready for the engine, with what its output line needs.
pub(crate) struct Job {
    line: usize,
    custom_id: String,
    endpoint: Endpoint,
    request: GenerationRequest,
    stop_strings: Vec<String>,
    /// Report generated token ids (token-id prompts).
    token_output: bool,
}

pub(crate) enum Entry {
    Job(Job),
    Error(LineError),
}

impl Entry {
    pub(crate) fn line(&self) -> usize {
        match self {
            Entry::Job(j) => j.line,
            Entry::Error(e) => e.line,
        }
    }

    /// The scheduler's view of a job (`None` for a line refused up front).
    pub(crate) fn scheduler_request(&self) -> Option<workload::Request> {
        match self {
            Entry::Job(j) => Some(j.request.scheduler_request(None)),
            Entry::Error(_) => None,
        }
    }

    fn custom_id(&self) -> Option<&str> {
        match self {
            Entry::Job(j) => Some(&j.custom_id),
            Entry::Error(e) => e.custom_id.as_deref(),
        }
    }
}

/// Everything about the loaded model the request builder needs.
pub(crate) struct ModelInfo {
    name: String,
    config: model::ModelConfig,
    tokenizer: Option<TextTokenizer>,
    chat_template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
}

fn read_generation_eos(dir: &Path) -> Vec<u32> {
    let path = dir.join("generation_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        tracing::warn!("{} is not valid JSON; ignored", path.display());
        return Vec::new();
    };
    match v.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|t| vec![t as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|t| t.as_u64())
            .map(|t| t as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelInfo {
    pub(crate) fn load(dir: &Path) -> Result<ModelInfo> {
        let config = model::ModelConfig::load(dir)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(TextTokenizer::load(dir)?)
        } else {
            tracing::warn!(
                "{} has no tokenizer.json: only token-id prompts can run",
                dir.display()
            );
            None
        };
        let chat_template = ChatTemplate::load(dir)?;
        let mut eos_token_ids = config.eos_token_ids.clone();
        for t in read_generation_eos(dir) {
            if !eos_token_ids.contains(&t) {
                eos_token_ids.push(t);
            }
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Ok(ModelInfo {
            name,
            config,
            tokenizer,
            chat_template,
            eos_token_ids,
        })
    }

    /// The engine request for a parsed batch line, or why it cannot run.
    fn job(&self, r: BatchRequest, args: &RunArgs) -> Result<Job, LineError> {
        let bad = |code: &'static str, message: String| LineError {
            line: r.line,
            custom_id: Some(r.custom_id.clone()),
            code,
            message: format!("line {}: {message}", r.line),
        };
        let tokenizer = || {
            self.tokenizer.as_ref().ok_or_else(|| {
                bad(
                    "invalid_request",
                    "the model has no tokenizer.json, so only token-id prompts can run".into(),
                )
            })
        };
        let (prompt, token_output) = match &r.prompt {
            PromptInput::Tokens(ids) => (ids.clone(), true),
            PromptInput::Text(text) => (
                tokenizer()?
                    .encode(text, true)
                    .map_err(|e| bad("invalid_request", e.to_string()))?,
                false,
            ),
            PromptInput::Chat(messages) => {
                let template = self.chat_template.as_ref().ok_or_else(|| {
                    bad(
                        "invalid_request",
                        "the model folder has no chat template (tokenizer_config.json \
                         `chat_template` or chat_template.jinja)"
                            .into(),
                    )
                })?;
                let text = template
                    .render(messages)
                    .map_err(|e| bad("invalid_request", e))?;
                // The template writes the special tokens itself.
                (
                    tokenizer()?
                        .encode(&text, false)
                        .map_err(|e| bad("invalid_request", e.to_string()))?,
                    false,
                )
            }
        };
        if prompt.is_empty() {
            return Err(bad("invalid_request", "the prompt is empty".into()));
        }
        let context = self.config.max_position_embeddings;
        if prompt.len() >= context {
            return Err(bad(
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; the model's context is {context} tokens",
                    prompt.len()
                ),
            ));
        }
        let room = (context - prompt.len()) as u32;
        let max_tokens = match r.max_tokens.or(args.default_max_tokens) {
            Some(0) => {
                return Err(bad(
                    "invalid_request",
                    "`max_tokens` must be at least 1".into(),
                ))
            }
            Some(m) if m > room => {
                return Err(bad(
                    "context_length_exceeded",
                    format!(
                        "prompt ({} tokens) plus max_tokens ({m}) exceeds the model's context \
                         of {context} tokens",
                        prompt.len()
                    ),
                ))
            }
            Some(m) => m,
            None => room,
        };
        let mut stop_token_ids = self.eos_token_ids.clone();
        stop_token_ids.extend(&r.stop_token_ids);
        Ok(Job {
            line: r.line,
            custom_id: r.custom_id.clone(),
            endpoint: r.endpoint,
            request: GenerationRequest {
                id: r.custom_id.clone(),
                prompt,
                sampling: SamplingParams {
                    temperature: r.temperature.unwrap_or(1.0),
                    top_p: r.top_p.unwrap_or(1.0),
                    top_k: r.top_k.map_or(0, |k| k as usize),
                    // Unseeded requests get one from their line, so reruns agree.
                    seed: r.seed.unwrap_or(r.line as u64),
                },
                stop: StopCriteria {
                    max_tokens,
                    stop_token_ids,
                    ignore_eos: r.ignore_eos || args.ignore_eos,
                },
                trace_output_tokens: None,
                output_known: false,
            },
            stop_strings: r.stop,
            token_output,
        })
    }
}

/// Whether the text looks like an OpenAI batch file (its first JSON line has `custom_id`).
pub(crate) fn is_openai_batch(text: &str) -> bool {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.get("custom_id").is_some())
}

fn openai_entries(text: &str, info: &ModelInfo, args: &RunArgs) -> Vec<Entry> {
    // Parsing and tokenizing (chat templates included) run on every core; only the check for
    // repeated custom_ids runs in line order.
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect();
    let mut parsed: Vec<Result<BatchRequest, LineError>> = lines
        .par_iter()
        .map(|&(line, l)| batch_file::parse_line(line, l))
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in &mut parsed {
        let Ok(r) = p else { continue };
        if let Some(first) = seen.get(&r.custom_id) {
            let message = format!(
                "line {}: custom_id `{}` already names line {first}",
                r.line, r.custom_id
            );
            *p = Err(LineError {
                line: r.line,
                custom_id: Some(r.custom_id.clone()),
                code: "duplicate_custom_id",
                message,
            });
        } else {
            seen.insert(r.custom_id.clone(), r.line);
        }
    }
    parsed
        .into_par_iter()
        .map(|p| match p.and_then(|r| info.job(r, args)) {
            Ok(job) => Entry::Job(job),
            Err(e) => Entry::Error(e),
        })
        .collect()
}

/// A workload of traces (native JSONL, a trace mix): token ids materialized within the
/// vocabulary, generation ending at each request's recorded length as if at EOS.
fn workload_entries(workload: &Workload, info: &ModelInfo, args: &RunArgs) -> Vec<Entry> {
    let vocab = info.config.vocab_size as u32;
    // Skip the low ids where special tokens usually sit.
    let first_id = if vocab > 1024 { 256 } else { 3.min(vocab - 1) };
    workload
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let prompt = workload::materialize_token_ids(&r.prompt, first_id, vocab);
            Entry::Job(Job {
                line: i + 1,
                custom_id: r.id.clone(),
                endpoint: Endpoint::Completions,
                request: GenerationRequest {
                    id: r.id.clone(),
                    prompt,
                    sampling: SamplingParams::default(),
                    stop: StopCriteria {
                        max_tokens: r.max_tokens.max(1),
                        stop_token_ids: info.eos_token_ids.clone(),
                        // A random-weight model's EOS is noise: the trace decides the length.
                        ignore_eos: r.output_tokens.is_some() || args.ignore_eos,
                    },
                    trace_output_tokens: r.output_tokens,
                    output_known: r.output_known,
                },
                stop_strings: Vec::new(),
                token_output: true,
            })
        })
        .collect()
}

/// custom_ids (and line ids of lines without one) already in `path`. A torn last line (the
/// process was killed mid-write) is cut off.
fn finished_in_output(path: &Path) -> Result<HashSet<String>> {
    let mut done = HashSet::new();
    if !path.exists() {
        return Ok(done);
    }
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut good_len = 0usize;
    let mut start = 0usize;
    for (i, &b) in text.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let line = &text[start..i];
        start = i + 1;
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            break;
        };
        good_len = start;
        let duplicate = v["response"]["body"]["error"]["code"] == "duplicate_custom_id";
        match v.get("custom_id").and_then(Value::as_str) {
            Some(id) if !duplicate => {
                done.insert(id.to_string());
            }
            Some(_) => {}
            None => {
                if let Some(id) = v.get("id").and_then(Value::as_str) {
                    done.insert(id.to_string());
                }
            }
        }
    }
    if good_len < text.len() {
        tracing::warn!(
            "{}: dropping {} bytes of a torn last line",
            path.display(),
            text.len() - good_len
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.set_len(good_len as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
    }
    Ok(done)
}

/// Rewrites `path` with its lines sorted by their line-based `id` (input order).
fn rewrite_in_input_order(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines: Vec<(String, String)> = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        let key = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default();
        lines.push((key, line));
    }
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = path.with_extension("jsonl.reorder-tmp");
    {
        let mut out = std::io::BufWriter::new(
            File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
        );
        for (_, line) in &lines {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        out.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))?;
    Ok(())
}

/// Where result lines go.
enum Sink {
    /// Appended and flushed as they come.
    File(File),
    /// Standard output in input order: lines wait for every earlier one.
    Stdout {
        pending: BTreeMap<usize, String>,
        order: Vec<usize>,
        next: usize,
    },
}

impl Sink {
    fn write(&mut self, line_no: usize, line: &Value) -> std::io::Result<()> {
        let text = line.to_string();
        match self {
            Sink::File(f) => {
                // One write per line: a kill leaves whole lines (a torn one at worst, which
                // --resume cuts off).
                f.write_all(format!("{text}\n").as_bytes())?;
                f.flush()
            }
            Sink::Stdout {
                pending,
                order,
                next,
            } => {
                pending.insert(line_no, text);
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                while *next < order.len() {
                    let Some(text) = pending.remove(&order[*next]) else {
                        break;
                    };
                    writeln!(out, "{text}")?;
                    *next += 1;
                }
                out.flush()
            }
        }
    }
}

/// Running totals for the progress bar and the report.
#[derive(Default)]
struct Tally {
    succeeded: u64,
    failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Writes each finished request's line, checks stop strings, drives the progress bar.
struct ResultWriter<'a> {
    jobs: &'a [Job],
    info: &'a ModelInfo,
    sink: Sink,
    bar: ProgressBar,
    created_secs: u64,
    started: Instant,
    last_bar_update: Instant,
    tally: Tally,
    /// Tokens each request generated (for the bound and the prediction).
    output_tokens: Vec<u32>,
    longest_stop_chars: usize,
    timeline: Option<csv::Writer<File>>,
}

impl ResultWriter<'_> {
    fn decode(&self, tokens: &[u32]) -> String {
        self.info
            .tokenizer
            .as_ref()
            .and_then(|t| t.decode(tokens, true).ok())
            .unwrap_or_default()
    }
}

/// The text up to the first stop string, and whether one was found.
fn cut_at_stop(text: &str, stops: &[String]) -> (String, bool) {
    match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

impl Observer for ResultWriter<'_> {
    fn finished(&mut self, g: Generation) -> std::io::Result<()> {
        let job = &self.jobs[g.index];
        self.output_tokens[g.index] = g.tokens.len() as u32;
        let line = match g.end {
            GenerationEnd::Rejected => {
                self.tally.failed += 1;
                error_line(&LineError {
                    line: job.line,
                    custom_id: Some(job.custom_id.clone()),
                    code: "invalid_request",
                    message: format!(
                        "line {}: {}",
                        job.line,
                        g.rejection.as_deref().unwrap_or("refused")
                    ),
                })
            }
            end => {
                let (text, stopped_by_text) =
                    cut_at_stop(&self.decode(&g.tokens), &job.stop_strings);
                let finish_reason = match end {
                    _ if stopped_by_text => "stop",
                    GenerationEnd::Stop(StopReason::StopToken(_))
                    | GenerationEnd::StopText
                    | GenerationEnd::TraceLength => "stop",
                    _ => "length",
                };
                self.tally.succeeded += 1;
                self.tally.prompt_tokens += g.prompt_tokens as u64;
                self.tally.completion_tokens += g.tokens.len() as u64;
                success_line(
                    job.line,
                    &job.custom_id,
                    job.endpoint,
                    &self.info.name,
                    self.created_secs,
                    &Completion {
                        text,
                        finish_reason,
                        usage: Usage {
                            prompt_tokens: g.prompt_tokens,
                            completion_tokens: g.tokens.len(),
                            total_tokens: g.prompt_tokens + g.tokens.len(),
                        },
                        token_ids: job.token_output.then(|| g.tokens.clone()),
                    },
                )
            }
        };
        self.bar.inc(1);
        self.sink.write(job.line, &line)
    }

    fn step(&mut self, report: &StepReport) {
        if let Some(w) = &mut self.timeline {
            let row = TimelineRow {
                step: report.totals.scheduler.steps,
                phase: match report.phase {
                    RunPhase::LengthSample => "length-sample",
                    RunPhase::Main => "main",
                },
                prefill_tokens: report.prefill_tokens,
                decode_tokens: report.decode_tokens,
                running: report.running,
                kv_used_blocks: report.kv.used_blocks,
                measured_secs: report.step_secs,
                predicted_secs: report.predicted.secs,
                predicted_compute_secs: report.predicted.compute_secs,
                predicted_memory_secs: report.predicted.memory_secs,
                gemm_flops: report.cost.gemm_flops,
                weight_bytes: report.cost.weight_bytes,
                prefill_attention_flops: report.cost.prefill_attention_flops,
                prefill_kv_bytes: report.cost.prefill_kv_bytes,
                decode_attention_flops: report.cost.decode_attention_flops,
                decode_kv_bytes: report.cost.decode_kv_bytes,
            };
            if let Err(e) = w.serialize(row) {
                tracing::warn!("--timeline: {e}; no more rows");
                self.timeline = None;
            }
        }
        // Without a terminal (logs, batch jobs) the bar is hidden: a log line every 30 s.
        let every_ms = if self.bar.is_hidden() { 30_000 } else { 100 };
        if self.last_bar_update.elapsed().as_millis() < every_ms {
            return;
        }
        self.last_bar_update = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let t = &report.totals.scheduler;
        let kv = &report.kv;
        self.bar.set_message(format!(
            "{}in {:.0} tok/s, out {:.0} tok/s, KV {:.0}%, prefix hit {:.0}%, {} running",
            if report.phase == RunPhase::LengthSample {
                "[length sample] "
            } else {
                ""
            },
            (t.prefill_tokens + t.prefix_hit_tokens) as f64 / secs,
            t.generated_tokens as f64 / secs,
            100.0 * f64::from(kv.used_blocks) / f64::from(kv.total_blocks.max(1)),
            100.0 * t.prefix_hit_ratio(),
            report.running,
        ));
        if self.bar.is_hidden() {
            tracing::info!(
                "{}/{} requests done, {:.0}s | {}",
                self.bar.position(),
                self.bar.length().unwrap_or(0),
                secs,
                self.bar.message()
            );
        }
    }

    fn stop_text(&mut self, index: usize, generated: &[u32]) -> bool {
        let stops = &self.jobs[index].stop_strings;
        if stops.is_empty() {
            return false;
        }
        // A stop string ends within the last few tokens: decode only a window (each token is
        // at least one character, plus slack for pieces of one character).
        let window = generated.len().min(self.longest_stop_chars + 8);
        let tail = self.decode(&generated[generated.len() - window..]);
        stops.iter().any(|s| tail.contains(s.as_str()))
    }
}

/// The final report (also written as JSON with --report).
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub policy: String,
    pub device: String,
    pub model: String,
    pub lengths: String,
    pub requests: usize,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped_by_resume: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub load_secs: f64,
    pub elapsed_secs: f64,
    pub input_tokens_per_sec: f64,
    pub output_tokens_per_sec: f64,
    pub total_tokens_per_sec: f64,
    pub prefix_hit_ratio: f64,
    pub steps: u64,
    pub preemptions: u64,
    pub kv_blocks: u32,
    pub sample_requests: u64,
    pub sample_secs: f64,
    pub hardware: String,
    pub executor: String,
    /// How the device ran the steps.
    pub step_executor: String,
    /// With `--step-executor auto`: the probe and each executor's time on it.
    pub executor_profile: Option<model::ExecutorProfile>,
    pub optimal_bound_secs: Option<f64>,
    pub percent_of_optimal: Option<f64>,
    pub predicted_secs: Option<f64>,
    pub predicted_over_measured: Option<f64>,
}

/// The model, and for a GPU its free and total memory in bytes after loading.
/// The model, the GPU's free and total memory and its name (`None`s off the GPU).
type LoadedModel = (Box<dyn StepModel>, Option<(usize, usize)>, Option<String>);

fn load_model(args: &RunArgs, dir: &Path, config: &model::ModelConfig) -> Result<LoadedModel> {
    match args.device.as_str() {
        "cpu" => {
            if args.random_weights {
                bail!("--random-weights needs --device cuda");
            }
            if !matches!(args.step_executor.as_str(), "sequential" | "auto") {
                bail!("--step-executor {} needs --device cuda", args.step_executor);
            }
            if args.batch_invariant {
                bail!("--batch-invariant needs --device cuda");
            }
            // config.json is already read (`config`); only the weights are left to load.
            let store = model::WeightStore::open(dir)?;
            let m = model::LlamaModel::<model::CpuBackend>::from_store(
                config.clone(),
                &store,
                &Default::default(),
            )
            .with_context(|| format!("loading {}", dir.display()))?;
            Ok((Box::new(model::BurnStepModel::new(m)), None, None))
        }
        "cuda" => load_cuda(args, dir, config),
        other => bail!("unknown --device `{other}` (cpu, cuda)"),
    }
}

#[cfg(feature = "cuda")]
fn load_cuda(args: &RunArgs, dir: &Path, config: &model::ModelConfig) -> Result<LoadedModel> {
    let mut m = if args.random_weights {
        model::cuda::CudaLlama::random(config.clone(), 0, 0)?
    } else {
        let store = model::WeightStore::open(dir)?;
        model::cuda::CudaLlama::from_store(config.clone(), &store, 0)
            .with_context(|| format!("loading {}", dir.display()))?
    };
    if args.batch_invariant {
        m.set_batch_invariant(true).context("--batch-invariant")?;
    }
    // (auto: sequential until the profile in `choose_step_executor` picks one.)
    if args.step_executor != "auto" {
        let executor: model::cuda::StepExecutor = args
            .step_executor
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--step-executor: {e}"))?;
        m.set_executor(executor)
            .with_context(|| format!("--step-executor {executor}"))?;
    }
    let memory = m.memory_info()?;
    let gpu = m.device_name()?;
    Ok((
        Box::new(model::CudaStepModel::new(m)),
        Some(memory),
        Some(gpu),
    ))
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_args: &RunArgs, _dir: &Path, _config: &model::ModelConfig) -> Result<LoadedModel> {
    bail!("this blendserve was built without CUDA support; rebuild with `--features cuda`")
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// KV blocks: the fraction of memory left after weights (already loaded: `memory` is the GPU's
/// free and total bytes) and a reserve for the step's activations and logits.
fn kv_blocks(
    args: &RunArgs,
    config: &model::ModelConfig,
    kv_bytes_per_token: u64,
    memory: Option<(usize, usize)>,
) -> Result<u32> {
    if let Some(n) = args.num_kv_blocks {
        return Ok(n);
    }
    if !(args.kv_memory_fraction > 0.0 && args.kv_memory_fraction <= 1.0) {
        bail!(
            "--kv-memory-fraction {} must be in (0, 1]",
            args.kv_memory_fraction
        );
    }
    let elem = if memory.is_some() { 2.0 } else { 4.0 };
    let tokens = f64::from(args.scheduler.max_batch_tokens);
    let qkv = ((config.num_heads + 2 * config.num_kv_heads) * config.head_dim) as f64;
    let activations = tokens
        * (6.0 * config.hidden_size as f64 + qkv + 3.0 * config.intermediate_size as f64)
        * elem
        + f64::from(
            args.scheduler
                .max_running
                .min(args.scheduler.max_batch_tokens),
        ) * config.vocab_size as f64
            * 8.0
        + 256.0 * 1024.0 * 1024.0;
    let left = match memory {
        Some((free, total)) => {
            total as f64 * args.kv_memory_fraction - (total - free) as f64 - activations
        }
        None => {
            let budget = available_memory_bytes().unwrap_or(4 << 30).min(4 << 30) as f64;
            budget * args.kv_memory_fraction - activations.min(budget / 4.0)
        }
    };
    let block_bytes = (kv_bytes_per_token * u64::from(args.scheduler.block_tokens)) as f64;
    let blocks = (left / block_bytes).floor();
    if blocks < 1.0 {
        bail!(
            "no memory is left for the KV cache (--kv-memory-fraction {}, --max-batch-tokens {}): \
             raise the fraction or lower the batch",
            args.kv_memory_fraction,
            args.scheduler.max_batch_tokens
        );
    }
    Ok(blocks.min(f64::from(u32::MAX)) as u32)
}

/// The cost model for `info`'s model on the hardware `choice` names.
pub(crate) fn perf_model(
    args: &RunArgs,
    info: &ModelInfo,
    dtype_bytes: u32,
    choice: &crate::hardware::HardwareChoice,
) -> Result<PerfModel> {
    let executor: Executor = args.executor.as_deref().unwrap_or("sum").parse()?;
    let overrides = match &choice.config {
        Some(path) => scheduler::OverrideFile::read(path)?,
        None => scheduler::OverrideFile::default(),
    };
    let hardware = overrides.hardware(&choice.preset)?;
    Ok(PerfModel::new(
        engine::perf_model_config(&info.config, &info.name, dtype_bytes),
        hardware,
        executor,
    ))
}

/// `--step-executor auto`: times a probe step at the cost model's balance point under each
/// executor the device offers (in the cache the run then uses), keeps the fastest, and, unless
/// `--executor` was given, prices steps with the overlap it measured (`sum` when sequential
/// wins, else `partial:E`).
fn choose_step_executor(
    args: &RunArgs,
    model: &mut dyn StepModel,
    num_kv_blocks: u32,
    perf: &mut PerfModel,
) -> Result<Option<model::ExecutorProfile>> {
    let s = &args.scheduler;
    let Some(probe) = engine::balanced_probe(
        perf,
        s.max_batch_tokens,
        s.max_running,
        num_kv_blocks,
        s.block_tokens,
    ) else {
        tracing::warn!("--step-executor auto: no probe step fits the KV cache; sequential");
        return Ok(None);
    };
    model.allocate_cache(num_kv_blocks as usize, s.block_tokens as usize)?;
    let t = Instant::now();
    let Some(profile) = model.choose_step_executor(&probe)? else {
        return Ok(None);
    };
    let (fastest, fastest_secs) = profile.fastest();
    let mut lines = vec![format!(
        "--step-executor auto ({:.1}s): probe of {} prefill tokens + {} decodes at context {}: \
         sequential {:.2} ms (prefill part alone {:.2}, decode part alone {:.2})",
        t.elapsed().as_secs_f64(),
        probe.prefill_tokens,
        probe.decode_seqs,
        probe.decode_context,
        profile.sequential_secs * 1e3,
        profile.prefill_alone_secs * 1e3,
        profile.decode_alone_secs * 1e3,
    )];
    for c in &profile.candidates {
        lines.push(match (c.secs, &c.error) {
            (Some(secs), _) => format!(
                "  {}: {:.2} ms, {:.3}x sequential, overlap efficiency {:.2}",
                c.executor,
                secs * 1e3,
                profile.sequential_secs / secs,
                profile.overlap_efficiency(secs)
            ),
            (None, error) => format!("  {}: {}", c.executor, error.as_deref().unwrap_or("-")),
        });
    }
    let efficiency = profile.overlap_efficiency(fastest_secs).clamp(0.0, 1.0);
    if args.executor.is_none() {
        perf.executor = if fastest == profile.sequential {
            Executor::Sequential
        } else {
            Executor::Partial {
                overlap_efficiency: efficiency,
            }
        };
    }
    lines.push(format!(
        "  chose {fastest}; the cost model prices steps as `{}`",
        perf.executor
    ));
    eprintln!("{}", lines.join("\n"));
    Ok(Some(profile))
}

/// The run's requests, in input order (bad lines become error entries).
pub(crate) fn load_entries(args: &RunArgs, info: &ModelInfo) -> Result<Vec<Entry>> {
    Ok(match (&input_path(args)?, &args.workload.workload) {
        (Some(_), Some(_)) => bail!("give --input or --workload, not both"),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            if is_openai_batch(&text) {
                openai_entries(&text, info, args)
            } else {
                let workload = workload::native::parse_native_jsonl(&text, path)?;
                workload_entries(&workload, info, args)
            }
        }
        (None, Some(_)) => {
            let (workload, _) = args.workload.load()?;
            workload_entries(&workload, info, args)
        }
        (None, None) => {
            tracing::info!("no --input: running the bundled sample batch");
            openai_entries(demo::DEMO_BATCH, info, args)
        }
    })
}

/// `--input`, or the file of `--shard DIR/rank-K` (`.jsonl` added when missing).
fn input_path(args: &RunArgs) -> Result<Option<PathBuf>> {
    match (&args.input, &args.shard) {
        (Some(_), Some(_)) => bail!("give --input or --shard, not both"),
        (None, Some(shard)) if shard.extension().is_none() => {
            Ok(Some(shard.with_extension("jsonl")))
        }
        (input, shard) => Ok(input.clone().or_else(|| shard.clone())),
    }
}

/// The workload the scheduler sees, with the lengths each request actually generated (for the
/// bound and the prediction).
fn realized_workload(jobs: &[Job], output_tokens: &[u32]) -> Workload {
    Workload {
        requests: jobs
            .iter()
            .zip(output_tokens)
            .filter(|(_, &n)| n > 0)
            .map(|(j, &n)| j.request.scheduler_request(Some(n)))
            .collect(),
        sources: vec!["run".into()],
    }
}

pub fn run(args: &RunArgs) -> Result<()> {
    if let Some(devices) = &args.devices {
        return crate::ranks_cmd::run_on_devices(args, devices);
    }
    let policy = PolicyKind::parse(&args.policy)?;
    let order_by_input = match args.order.as_str() {
        "input" => true,
        "completion" => false,
        other => bail!("unknown --order `{other}` (input, completion)"),
    };
    if args.resume && args.output.is_none() {
        bail!("--resume needs --output (the file to resume)");
    }
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => demo::demo_model_dir()?,
    };
    let info = ModelInfo::load(&model_dir)?;
    let entries = crate::ranks_cmd::keep_rank(load_entries(args, &info)?, args, &info)?;
    let total_entries = entries.len();
    let already = match (&args.output, args.resume) {
        (Some(path), true) => finished_in_output(path)?,
        _ => HashSet::new(),
    };
    let entries: Vec<Entry> = entries
        .into_iter()
        .filter(|e| match e.custom_id() {
            Some(id) => !already.contains(id),
            None => !already.contains(&batch_file::line_id(e.line())),
        })
        .collect();
    let skipped = total_entries - entries.len();
    let entry_lines: Vec<usize> = entries.iter().map(Entry::line).collect();
    if args.resume {
        tracing::info!("resuming: {skipped} results already in the output");
    }
    // Jobs run; lines refused while parsing are written first, once everything is checked.
    let mut jobs = Vec::new();
    let mut refused = Vec::new();
    for entry in entries {
        match entry {
            Entry::Job(job) => jobs.push(job),
            Entry::Error(e) => refused.push(e),
        }
    }
    let failed_early = refused.len() as u64;

    // Load and check every setting before touching the output, so a typo never costs results.
    let t_load = Instant::now();
    let (mut model, memory, gpu) = load_model(args, &model_dir, &info.config)?;
    let hardware = crate::hardware::choose(
        args.hardware.as_deref(),
        args.hardware_config.as_deref(),
        gpu.as_deref(),
        crate::hardware::calibrated_file,
    );
    tracing::info!("{}", hardware.how);
    let load_secs = t_load.elapsed().as_secs_f64();
    // Never more KV than the whole batch could hold at once.
    let needed_blocks: u64 = jobs
        .iter()
        .map(|j| {
            let tokens = j.request.prompt.len() as u64 + u64::from(j.request.stop.max_tokens);
            tokens.div_ceil(u64::from(args.scheduler.block_tokens.max(1)))
        })
        .sum::<u64>()
        + 1;
    let num_kv_blocks = kv_blocks(args, &info.config, model.kv_bytes_per_token(), memory)?
        .min(u32::try_from(needed_blocks).unwrap_or(u32::MAX));
    let dtype_bytes = if memory.is_some() { 2 } else { 4 };
    let mut perf = perf_model(args, &info, dtype_bytes, &hardware)?;
    let executor_profile = if args.step_executor == "auto" {
        choose_step_executor(args, &mut *model, num_kv_blocks, &mut perf)?
    } else {
        None
    };
    let step_executor = match &executor_profile {
        Some(profile) => profile.fastest().0.to_string(),
        None if args.step_executor == "auto" => "sequential".to_string(),
        None => args.step_executor.clone(),
    };
    let lengths = if args.assume_known_lengths {
        LengthKnowledge::Known
    } else {
        match &args.lengths {
            Some(l) => l.parse()?,
            None if args.policy.starts_with("blendserve") => LengthKnowledge::default(),
            None => LengthKnowledge::MaxTokens,
        }
    };
    let scheduler = args.scheduler.config()?;
    let config = EngineConfig {
        scheduler: scheduler.clone(),
        policy: policy.clone(),
        num_kv_blocks,
        seed: args.workload.seed,
        lengths,
    };
    tracing::info!(
        "{} requests ({} refused up front) on {} ({}), {} KV blocks of {} tokens, policy {}",
        jobs.len(),
        failed_early,
        info.name,
        args.device,
        num_kv_blocks,
        args.scheduler.block_tokens,
        args.policy
    );
    let mut sink = match &args.output {
        Some(path) => {
            if !args.resume && path.exists() {
                std::fs::remove_file(path)
                    .with_context(|| format!("replacing {}", path.display()))?;
            }
            Sink::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?,
            )
        }
        None => Sink::Stdout {
            pending: BTreeMap::new(),
            order: entry_lines,
            next: 0,
        },
    };
    for e in &refused {
        sink.write(e.line, &error_line(e))
            .context("writing results")?;
    }
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] [{bar:30}] {pos}/{len} requests, ETA {eta} | {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let requests: Vec<GenerationRequest> = jobs.iter().map(|j| j.request.clone()).collect();
    let mut writer = ResultWriter {
        jobs: &jobs,
        info: &info,
        sink,
        bar,
        created_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        started: Instant::now(),
        last_bar_update: Instant::now(),
        tally: Tally::default(),
        output_tokens: vec![0; jobs.len()],
        longest_stop_chars: jobs
            .iter()
            .flat_map(|j| j.stop_strings.iter().map(|s| s.chars().count()))
            .max()
            .unwrap_or(0),
        timeline: match &args.timeline {
            Some(path) => Some(
                csv::Writer::from_path(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
            None => None,
        },
    };
    let t0 = Instant::now();
    let stats: EngineStats = engine::generate(&mut *model, &requests, &config, &perf, &mut writer)
        .context("generation stopped (finished results are in the output; --resume continues)")?;
    let elapsed_secs = t0.elapsed().as_secs_f64();
    writer.bar.finish_and_clear();
    let ResultWriter {
        tally,
        output_tokens,
        timeline,
        ..
    } = writer;
    if let Some(mut w) = timeline {
        w.flush().context("writing --timeline")?;
    }
    if let (Some(path), true) = (&args.output, order_by_input) {
        rewrite_in_input_order(path)?;
    }

    // The bound and the prediction price the work that ran, at the lengths it produced.
    let realized = realized_workload(&jobs, &output_tokens);
    // A bound for a GPU says nothing about a CPU run unless asked for.
    let priced = args.device != "cpu" || args.hardware.is_some();
    let (bound_secs, predicted_secs) = if realized.is_empty() || !priced {
        (None, None)
    } else {
        let tree = scheduler::build_tree(&realized);
        let bound = scheduler::optimal_bound(
            &realized,
            &tree,
            &perf,
            args.scheduler.max_batch_tokens,
            args.scheduler.max_running,
        );
        let predicted = if args.predict {
            let mut sim_config =
                sim::SimConfig::new(perf.model.clone(), perf.hardware.clone(), perf.executor);
            sim_config.scheduler = scheduler;
            sim_config.num_gpu_blocks_override = Some(num_kv_blocks);
            sim_config.lengths = lengths;
            // The engine runs the length sample as its own phase; so does the prediction.
            sim_config.length_sample_phase = true;
            sim_config.seed = args.workload.seed;
            let simulation = sim::Simulation::new(&realized, sim_config)?;
            let report = simulation.run(&args.policy, &policy, &mut |_, _| {})?;
            Some(report.makespan_secs)
        } else {
            None
        };
        (Some(bound.secs), predicted)
    };
    let in_tokens = tally.prompt_tokens as f64;
    let out_tokens = tally.completion_tokens as f64;
    let report = RunReport {
        policy: args.policy.clone(),
        device: args.device.clone(),
        model: info.name.clone(),
        lengths: format!("{lengths:?}"),
        requests: total_entries,
        succeeded: tally.succeeded,
        failed: tally.failed + failed_early,
        skipped_by_resume: skipped,
        prompt_tokens: tally.prompt_tokens,
        completion_tokens: tally.completion_tokens,
        load_secs,
        elapsed_secs,
        input_tokens_per_sec: in_tokens / elapsed_secs.max(1e-9),
        output_tokens_per_sec: out_tokens / elapsed_secs.max(1e-9),
        total_tokens_per_sec: (in_tokens + out_tokens) / elapsed_secs.max(1e-9),
        prefix_hit_ratio: stats.scheduler.prefix_hit_ratio(),
        steps: stats.scheduler.steps,
        preemptions: stats.scheduler.preemptions,
        kv_blocks: num_kv_blocks,
        sample_requests: stats.sample_requests,
        sample_secs: stats.sample_secs,
        hardware: perf.hardware.name.clone(),
        executor: perf.executor.to_string(),
        step_executor,
        executor_profile,
        optimal_bound_secs: bound_secs,
        percent_of_optimal: bound_secs.map(|b| 100.0 * b / elapsed_secs.max(1e-9)),
        predicted_secs,
        predicted_over_measured: predicted_secs.map(|p| p / elapsed_secs.max(1e-9)),
    };
    eprintln!(
        "{} requests: {} ok, {} failed{}; {:.2}s ({:.2}s load); {:.0} tok/s in, {:.0} tok/s out; \
         prefix hit {:.1}%; {} steps, {} preemptions",
        report.requests,
        report.succeeded,
        report.failed,
        if skipped > 0 {
            format!(", {skipped} already done")
        } else {
            String::new()
        },
        report.elapsed_secs,
        report.load_secs,
        report.input_tokens_per_sec,
        report.output_tokens_per_sec,
        100.0 * report.prefix_hit_ratio,
        report.steps,
        report.preemptions,
    );
    if let Some(b) = report.optimal_bound_secs {
        eprintln!(
            "optimal bound on {} ({} executor): {:.3}s; this run reached {:.1}% of it",
            report.hardware,
            report.executor,
            b,
            report.percent_of_optimal.unwrap_or(0.0),
        );
    }
    if let Some(p) = report.predicted_secs {
        eprintln!(
            "simulator's prediction: {p:.3}s ({:.2}x the measured time)",
            p / elapsed_secs.max(1e-9)
        );
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
