//! Readers for the real production traces kept in `shared/traces` (see its README).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::WorkloadError;

/// Tokens per Mooncake prefix block (`hash_ids` entry).
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

/// One request of a trace, before it becomes a [`crate::Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceRecord {
    /// 1-based line number in the trace file (the CSV header is line 1).
    pub line: usize,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// Mooncake prefix-block ids, one per 512 prompt tokens (last block may be partial); empty
    /// for traces without prefix structure.
    pub block_ids: Vec<u64>,
}

/// The traces this project knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamedTrace {
    AzureCode,
    AzureConv,
    Mooncake,
}

impl NamedTrace {
    pub const ALL: [NamedTrace; 3] = [
        NamedTrace::AzureCode,
        NamedTrace::AzureConv,
        NamedTrace::Mooncake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NamedTrace::AzureCode => "azure-code",
            NamedTrace::AzureConv => "azure-conv",
            NamedTrace::Mooncake => "mooncake",
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            NamedTrace::AzureCode => "azure_llm_2023_code.csv",
            NamedTrace::AzureConv => "azure_llm_2023_conv.csv",
            NamedTrace::Mooncake => "mooncake_conversation.jsonl",
        }
    }

    pub fn from_name(name: &str) -> Option<NamedTrace> {
        NamedTrace::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn load(self, traces_dir: &Path) -> Result<Vec<TraceRecord>, WorkloadError> {
        let path = traces_dir.join(self.file_name());
        match self {
            NamedTrace::AzureCode | NamedTrace::AzureConv => read_azure_csv(&path),
            NamedTrace::Mooncake => read_mooncake_jsonl(&path),
        }
    }
}

/// Finds the shared trace folder: `$BLENDSERVE_TRACES`, else `shared/traces` or `../shared/traces`
/// above the current directory or any of its ancestors.
pub fn default_traces_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BLENDSERVE_TRACES") {
        return Some(PathBuf::from(dir));
    }
    let cwd = std::env::current_dir().ok()?;
    for dir in cwd.ancestors() {
        for candidate in [dir.join("shared/traces"), dir.join("../shared/traces")] {
            if candidate.join("README.md").is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

fn open(path: &Path) -> Result<BufReader<File>, WorkloadError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| WorkloadError::io(path, e))
}

/// Reads an Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`, with or
/// without a UTF-8 byte-order mark, `\n` or `\r\n` line ends).
pub fn read_azure_csv(path: &Path) -> Result<Vec<TraceRecord>, WorkloadError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(open(path)?);
    let headers = reader
        .headers()
        .map_err(|e| WorkloadError::parse(path, 1, e.to_string()))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim_start_matches('\u{feff}') == name)
            .ok_or_else(|| {
                WorkloadError::parse(
                    path,
                    1,
                    format!("missing column `{name}` (expected TIMESTAMP,ContextTokens,GeneratedTokens)"),
                )
            })
    };
    let prompt_col = column("ContextTokens")?;
    let output_col = column("GeneratedTokens")?;
    let mut records = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| WorkloadError::parse(path, line, e.to_string()))?;
        let field = |col: usize, name: &str| -> Result<u32, WorkloadError> {
            let text = row.get(col).unwrap_or("");
            text.parse::<u32>().map_err(|_| {
                WorkloadError::parse(path, line, format!("{name} `{text}` is not a token count"))
            })
        };
        let prompt_tokens = field(prompt_col, "ContextTokens")?;
        let output_tokens = field(output_col, "GeneratedTokens")?;
        if prompt_tokens == 0 {
            return Err(WorkloadError::parse(
                path,
                line,
                "ContextTokens is 0; a request needs a prompt",
            ));
        }
        records.push(TraceRecord {
            line,
            prompt_tokens,
            output_tokens: output_tokens.max(1),
            block_ids: Vec::new(),
        });
    }
    Ok(records)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MooncakeLine {
    #[allow(dead_code)]
    timestamp: Option<f64>,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Reads a Mooncake trace (JSON object per line with `timestamp`, `input_length`,
/// `output_length`, `hash_ids`) and checks that `hash_ids` covers the prompt in 512-token blocks.
pub fn read_mooncake_jsonl(path: &Path) -> Result<Vec<TraceRecord>, WorkloadError> {
    let mut records = Vec::new();
    for (i, text) in open(path)?.lines().enumerate() {
        let line = i + 1;
        let text = text.map_err(|e| WorkloadError::io(path, e))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: MooncakeLine = serde_json::from_str(&text)
            .map_err(|e| WorkloadError::parse(path, line, e.to_string()))?;
        if parsed.input_length == 0 {
            return Err(WorkloadError::parse(
                path,
                line,
                "input_length is 0; a request needs a prompt",
            ));
        }
        let blocks_needed = parsed.input_length.div_ceil(MOONCAKE_BLOCK_TOKENS) as usize;
        if parsed.hash_ids.len() != blocks_needed {
            return Err(WorkloadError::parse(
                path,
                line,
                format!(
                    "hash_ids has {} blocks but input_length {} needs {blocks_needed} blocks of {MOONCAKE_BLOCK_TOKENS} tokens",
                    parsed.hash_ids.len(),
                    parsed.input_length
                ),
            ));
        }
        records.push(TraceRecord {
            line,
            prompt_tokens: parsed.input_length,
            output_tokens: parsed.output_length.max(1),
            block_ids: parsed.hash_ids,
        });
    }
    Ok(records)
}
