//! The native workload JSONL format: one request per line.
//!
//! ```json
//! {"id": "a", "prompt_token_ids": [128000, 791, 4062], "max_tokens": 64}
//! {"id": "b", "prompt_tokens": 1800, "prefix": [{"id": "sys-1", "tokens": 512}], "max_tokens": 256, "output_tokens": 97}
//! ```
//!
//! A prompt is either real token ids, or a length whose leading part is made of named shared
//! segments (`prefix`, in order); the rest of the prompt is unique to the request. Two requests
//! share exactly the tokens of their common leading segments. `output_tokens`, when present, is
//! the true generated length (used by the simulator and, when allowed, by schedulers).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use crate::{Chunk, ContentIdAllocator, Namespace, Request, Workload, WorkloadError};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeLine {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    prefix: Vec<NativeSegment>,
    max_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output_tokens: Option<u32>,
    /// `output_tokens` is known before the run (video generation), not only recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    output_known: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeSegment {
    id: String,
    tokens: u32,
}

/// Reads a native workload JSONL file. Blank lines are skipped; any other malformed line is an
/// error naming the line.
pub fn read_native_jsonl(path: &Path) -> Result<Workload, WorkloadError> {
    let file = File::open(path).map_err(|e| WorkloadError::io(path, e))?;
    let mut parser = NativeParser::default();
    for (i, text) in BufReader::new(file).lines().enumerate() {
        let text = text.map_err(|e| WorkloadError::io(path, e))?;
        parser
            .push_line(&text)
            .map_err(|message| WorkloadError::parse(path, i + 1, message))?;
    }
    Ok(parser.finish())
}

/// Parses native JSONL from a string (tests, embedded samples).
pub fn parse_native_jsonl(text: &str, origin: &Path) -> Result<Workload, WorkloadError> {
    let mut parser = NativeParser::default();
    for (i, line) in text.lines().enumerate() {
        parser
            .push_line(line)
            .map_err(|message| WorkloadError::parse(origin, i + 1, message))?;
    }
    Ok(parser.finish())
}

#[derive(Default)]
struct NativeParser {
    workload: Workload,
    segments: FxHashMap<String, Chunk>,
    seen_ids: FxHashSet<String>,
    ids: ContentIdAllocator,
}

impl NativeParser {
    fn push_line(&mut self, text: &str) -> Result<(), String> {
        if text.trim().is_empty() {
            return Ok(());
        }
        let line: NativeLine = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if !self.seen_ids.insert(line.id.clone()) {
            return Err(format!("duplicate request id `{}`", line.id));
        }
        if line.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        if line.output_known && line.output_tokens.is_none() {
            return Err("output_known needs output_tokens (the length that is known)".into());
        }
        let prompt = match (line.prompt_token_ids, line.prompt_tokens) {
            (Some(_), Some(_)) => {
                return Err("give either prompt_token_ids or prompt_tokens, not both".into())
            }
            (None, None) => {
                return Err("missing prompt: give prompt_token_ids or prompt_tokens".into())
            }
            (Some(tokens), None) => {
                if !line.prefix.is_empty() {
                    return Err("prefix goes with prompt_tokens; token-id prompts share prefixes by their tokens".into());
                }
                tokens.into_iter().map(Chunk::token).collect::<Vec<_>>()
            }
            (None, Some(total)) => self.segmented_prompt(total, &line.prefix)?,
        };
        if prompt.is_empty() {
            return Err("prompt is empty; a request needs at least one prompt token".into());
        }
        let source = line.source.as_deref().unwrap_or("native");
        let source = self.workload.source_index(source);
        self.workload.requests.push(Request {
            id: line.id,
            prompt,
            max_tokens: line.max_tokens,
            output_tokens: line.output_tokens,
            output_known: line.output_known,
            source,
        });
        Ok(())
    }

    fn segmented_prompt(
        &mut self,
        total: u64,
        prefix: &[NativeSegment],
    ) -> Result<Vec<Chunk>, String> {
        let mut chunks = Vec::with_capacity(prefix.len() + 1);
        let mut used: u64 = 0;
        for segment in prefix {
            if segment.tokens == 0 {
                return Err(format!("prefix segment `{}` has 0 tokens", segment.id));
            }
            let next_id = self.segments.len() as u64;
            let chunk = *self
                .segments
                .entry(segment.id.clone())
                .or_insert_with(|| Chunk::new(Namespace::NamedSegment.id(next_id), segment.tokens));
            if chunk.len_tokens != segment.tokens {
                return Err(format!(
                    "prefix segment `{}` has {} tokens here but {} where it first appeared",
                    segment.id, segment.tokens, chunk.len_tokens
                ));
            }
            used += u64::from(segment.tokens);
            chunks.push(chunk);
        }
        if used > total {
            return Err(format!(
                "prefix segments hold {used} tokens, more than prompt_tokens {total}"
            ));
        }
        let rest = total - used;
        if rest > 0 {
            let rest =
                u32::try_from(rest).map_err(|_| format!("prompt_tokens {total} is too large"))?;
            chunks.push(self.ids.unique(rest));
        }
        Ok(chunks)
    }

    fn finish(self) -> Workload {
        self.workload
    }
}

/// Writes a workload as native JSONL. Reading it back gives the same requests with the same
/// sharing structure (content ids may be renumbered).
pub fn write_native_jsonl(workload: &Workload, out: &mut impl Write) -> std::io::Result<()> {
    for request in &workload.requests {
        let all_tokens = request
            .prompt
            .iter()
            .all(|c| Namespace::of(c.content_id) == Some(Namespace::Token) && c.len_tokens == 1);
        let (prompt_token_ids, prompt_tokens, prefix) = if all_tokens {
            let ids = request
                .prompt
                .iter()
                .map(|c| (c.content_id & 0xffff_ffff) as u32)
                .collect();
            (Some(ids), None, Vec::new())
        } else {
            let trailing_unique = request
                .prompt
                .last()
                .is_some_and(|c| Namespace::of(c.content_id) == Some(Namespace::Unique));
            let named = &request.prompt[..request.prompt.len() - usize::from(trailing_unique)];
            let prefix = named
                .iter()
                .map(|c| NativeSegment {
                    id: format!("{:x}:{}", c.content_id, c.len_tokens),
                    tokens: c.len_tokens,
                })
                .collect();
            (None, Some(request.prompt_tokens()), prefix)
        };
        let line = NativeLine {
            id: request.id.clone(),
            prompt_token_ids,
            prompt_tokens,
            prefix,
            max_tokens: request.max_tokens,
            output_tokens: request.output_tokens,
            output_known: request.output_known,
            source: workload.sources.get(usize::from(request.source)).cloned(),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
