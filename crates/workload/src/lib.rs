//! Workloads for blendserve: what a request *is* to the scheduler and where requests come from.
//!
//! Owns the [`Request`] / [`Chunk`] data model (a prompt is a sequence of content-identified token
//! runs, so that a 100k-token prompt costs a few words, yet two prompts share a prefix exactly when
//! their leading chunks are equal), readers for the real traces in `shared/traces` (Azure 2023 CSV,
//! Mooncake JSONL) and the native workload JSONL, and a generator that blends traces by ratio and
//! adds synthetic prefix sharing.
//!
//! Must not touch: scheduling, cost models, KV memory. It knows nothing about hardware.

mod chunk;
mod error;
pub mod generator;
pub mod native;
pub mod paper;
mod spec;
pub mod traces;

pub use chunk::{materialize_token_ids, Chunk, ContentIdAllocator, Namespace};
pub use error::WorkloadError;
pub use spec::WorkloadSpec;

use serde::{Deserialize, Serialize};

/// One inference request as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// User-facing identifier (the native JSONL `id`, or `<trace>-<line>` for traces).
    pub id: String,
    /// The prompt as content-identified token runs.
    pub prompt: Vec<Chunk>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// The true number of generated tokens when the source records it (traces). The simulator uses
    /// it as ground truth; schedulers may look at it only when told lengths are known.
    pub output_tokens: Option<u32>,
    /// The output length is known before the run (image and video generation: it follows from
    /// the resolution and frame count asked for), so a scheduler may use `output_tokens` as is.
    #[serde(default)]
    pub output_known: bool,
    /// Index into [`Workload::sources`]: which trace or file this request came from.
    pub source: u16,
}

impl Request {
    /// Number of prompt tokens.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt.iter().map(|c| u64::from(c.len_tokens)).sum()
    }

    /// The output length, where it is known before the run (`output_known`).
    pub fn known_output_tokens(&self) -> Option<u32> {
        self.output_known.then(|| self.sim_output_tokens())
    }

    /// Tokens this request will generate in a simulation: the recorded length capped by
    /// `max_tokens`, or `max_tokens` when nothing is recorded. Always at least 1.
    pub fn sim_output_tokens(&self) -> u32 {
        self.output_tokens
            .map_or(self.max_tokens, |d| d.min(self.max_tokens))
            .max(1)
    }
}

/// An ordered set of requests (the order is the submission order, which FCFS follows).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub requests: Vec<Request>,
    /// Names of the sources that `Request::source` indexes.
    pub sources: Vec<String>,
}

/// Aggregate shape of a workload, for reports and sanity checks.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkloadSummary {
    pub requests: usize,
    pub prompt_tokens_total: u64,
    pub output_tokens_total: u64,
    pub prompt_tokens_mean: f64,
    pub output_tokens_mean: f64,
    pub prompt_tokens_max: u64,
}

impl Workload {
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Index of `name` in `sources`, adding it if new.
    pub fn source_index(&mut self, name: &str) -> u16 {
        if let Some(i) = self.sources.iter().position(|s| s == name) {
            return i as u16;
        }
        self.sources.push(name.to_string());
        (self.sources.len() - 1) as u16
    }

    pub fn summary(&self) -> WorkloadSummary {
        let n = self.requests.len();
        let prompt: Vec<u64> = self.requests.iter().map(Request::prompt_tokens).collect();
        let prompt_total: u64 = prompt.iter().sum();
        let output_total: u64 = self
            .requests
            .iter()
            .map(|r| u64::from(r.sim_output_tokens()))
            .sum();
        let denom = n.max(1) as f64;
        WorkloadSummary {
            requests: n,
            prompt_tokens_total: prompt_total,
            output_tokens_total: output_total,
            prompt_tokens_mean: prompt_total as f64 / denom,
            output_tokens_mean: output_total as f64 / denom,
            prompt_tokens_max: prompt.iter().copied().max().unwrap_or(0),
        }
    }
}

/// Loads a workload file, telling the format by its content: an Azure trace CSV, a Mooncake
/// trace JSONL (objects with `hash_ids`), or the native JSONL. Trace requests keep file order and
/// their recorded output lengths (`max_tokens` = [`generator::DEFAULT_MAX_TOKENS`] or the
/// recorded length if longer).
pub fn load_file(path: &std::path::Path) -> Result<Workload, WorkloadError> {
    use std::io::BufRead;
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let records = if is_csv {
        traces::read_azure_csv(path)?
    } else {
        let file = std::fs::File::open(path).map_err(|e| WorkloadError::io(path, e))?;
        let mut first = String::new();
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| WorkloadError::io(path, e))?;
            if !line.trim().is_empty() {
                first = line;
                break;
            }
        }
        if !first.contains("\"hash_ids\"") {
            return native::read_native_jsonl(path);
        }
        traces::read_mooncake_jsonl(path)?
    };
    let name = path
        .file_stem()
        .map_or_else(|| "trace".to_string(), |s| s.to_string_lossy().into_owned());
    Ok(generator::trace_in_file_order(&name, &records))
}
