//! Builds experiment workloads from real traces: blend named traces by ratio, optionally filtered
//! by length, and add synthetic prefix sharing (shared system prompts or few-shot templates) to
//! requests whose trace carries no prefix structure.
//!
//! Mix syntax: `azure-code=0.5,azure-conv[out>=256]=0.3,mooncake=0.2`. Weights are relative;
//! a part without `=w` weighs 1. Filters: `prompt` or `out` with `<`, `<=`, `>`, `>=`.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashMap;

use crate::traces::{NamedTrace, TraceRecord, MOONCAKE_BLOCK_TOKENS};
use crate::{Chunk, ContentIdAllocator, Namespace, Request, Workload, WorkloadError};

/// One part of a blend: a named pool, an optional length filter and a relative weight.
#[derive(Clone, Debug, PartialEq)]
pub struct MixPart {
    pub pool: String,
    pub filters: Vec<LengthFilter>,
    pub weight: f64,
}

impl MixPart {
    /// The label used as the request source and in request ids.
    pub fn label(&self) -> String {
        if self.filters.is_empty() {
            self.pool.clone()
        } else {
            let f: Vec<String> = self.filters.iter().map(LengthFilter::to_string).collect();
            format!("{}[{}]", self.pool, f.join(","))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthField {
    Prompt,
    Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    Less,
    LessEq,
    Greater,
    GreaterEq,
}

/// A condition on a trace record's prompt or output length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthFilter {
    pub field: LengthField,
    pub comparison: Comparison,
    pub tokens: u32,
}

impl LengthFilter {
    pub fn accepts(&self, record: &TraceRecord) -> bool {
        let value = match self.field {
            LengthField::Prompt => record.prompt_tokens,
            LengthField::Output => record.output_tokens,
        };
        match self.comparison {
            Comparison::Less => value < self.tokens,
            Comparison::LessEq => value <= self.tokens,
            Comparison::Greater => value > self.tokens,
            Comparison::GreaterEq => value >= self.tokens,
        }
    }
}

impl std::fmt::Display for LengthFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = match self.field {
            LengthField::Prompt => "prompt",
            LengthField::Output => "out",
        };
        let op = match self.comparison {
            Comparison::Less => "<",
            Comparison::LessEq => "<=",
            Comparison::Greater => ">",
            Comparison::GreaterEq => ">=",
        };
        write!(f, "{field}{op}{}", self.tokens)
    }
}

fn parse_filter(text: &str) -> Result<LengthFilter, WorkloadError> {
    let text = text.trim();
    let (field, rest) = if let Some(rest) = text.strip_prefix("prompt") {
        (LengthField::Prompt, rest)
    } else if let Some(rest) = text.strip_prefix("out") {
        (LengthField::Output, rest)
    } else {
        return Err(WorkloadError::Spec(format!(
            "filter `{text}` must start with `prompt` or `out`"
        )));
    };
    let (comparison, number) = if let Some(n) = rest.strip_prefix("<=") {
        (Comparison::LessEq, n)
    } else if let Some(n) = rest.strip_prefix(">=") {
        (Comparison::GreaterEq, n)
    } else if let Some(n) = rest.strip_prefix('<') {
        (Comparison::Less, n)
    } else if let Some(n) = rest.strip_prefix('>') {
        (Comparison::Greater, n)
    } else {
        return Err(WorkloadError::Spec(format!(
            "filter `{text}` needs one of <, <=, >, >="
        )));
    };
    let tokens = number.trim().parse().map_err(|_| {
        WorkloadError::Spec(format!("filter `{text}`: `{number}` is not a token count"))
    })?;
    Ok(LengthFilter {
        field,
        comparison,
        tokens,
    })
}

/// Parses a mix specification such as `azure-code=0.5,azure-conv[out>=256]=0.5`.
pub fn parse_mix(spec: &str) -> Result<Vec<MixPart>, WorkloadError> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    let mut pieces = Vec::new();
    for (i, ch) in spec.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                pieces.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&spec[start..]);
    for piece in pieces {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        let (head, weight) = match piece.rsplit_once('=') {
            Some((head, w)) if !head.ends_with(['<', '>']) => {
                let weight: f64 = w.trim().parse().map_err(|_| {
                    WorkloadError::Spec(format!("mix part `{piece}`: weight `{w}` is not a number"))
                })?;
                (head.trim(), weight)
            }
            _ => (piece, 1.0),
        };
        if !(weight.is_finite() && weight > 0.0) {
            return Err(WorkloadError::Spec(format!(
                "mix part `{piece}`: weight must be positive"
            )));
        }
        let (pool, filters) = match head.split_once('[') {
            Some((pool, rest)) => {
                let inner = rest.strip_suffix(']').ok_or_else(|| {
                    WorkloadError::Spec(format!("mix part `{piece}`: missing `]`"))
                })?;
                let filters = inner
                    .split(',')
                    .filter(|f| !f.trim().is_empty())
                    .map(parse_filter)
                    .collect::<Result<Vec<_>, _>>()?;
                (pool.trim(), filters)
            }
            None => (head, Vec::new()),
        };
        if pool.is_empty() {
            return Err(WorkloadError::Spec(format!(
                "mix part `{piece}` names no trace"
            )));
        }
        parts.push(MixPart {
            pool: pool.to_string(),
            filters,
            weight,
        });
    }
    if parts.is_empty() {
        return Err(WorkloadError::Spec("the mix names no trace".into()));
    }
    Ok(parts)
}

/// Synthetic prefix sharing for traces that carry none.
///
/// Each request joins one of `groups` groups of its mix part (each part stands for a task with
/// its own prompts; Zipf popularity with exponent `group_skew`, 0 is uniform). Each group owns a
/// template (a system prompt or few-shot block) made of
/// `block_tokens`-token blocks. A request of `p` prompt tokens starts with the first
/// `floor(sharing_ratio * p / block_tokens)` blocks of its group's template (always leaving at
/// least one unique token) and ends with a unique remainder. Two requests of one group therefore
/// share the shorter of their template parts.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticPrefix {
    pub groups: u32,
    pub sharing_ratio: f64,
    pub block_tokens: u32,
    pub group_skew: f64,
}

impl Default for SyntheticPrefix {
    fn default() -> Self {
        SyntheticPrefix {
            groups: 16,
            sharing_ratio: 0.5,
            block_tokens: 64,
            group_skew: 0.0,
        }
    }
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorConfig {
    pub mix: Vec<MixPart>,
    pub requests: usize,
    pub seed: u64,
    pub synthetic_prefix: Option<SyntheticPrefix>,
    /// Requests whose prompt exceeds this are left out of the pools (counted in the report).
    pub max_prompt_tokens: Option<u32>,
    /// The `max_tokens` each request asks for, as a user of a batch API would set it; raised to
    /// the recorded output length where that is longer. Traces record what was generated, not
    /// what was asked, so this must not default to the recorded length (that would tell every
    /// scheduler the true output lengths).
    pub max_tokens: u32,
}

/// A typical batch-API `max_tokens` (long enough for every output in the shared traces).
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Trace records by pool name.
#[derive(Clone, Debug, Default)]
pub struct TracePools {
    pools: FxHashMap<String, Vec<TraceRecord>>,
}

impl TracePools {
    pub fn insert(&mut self, name: impl Into<String>, records: Vec<TraceRecord>) {
        self.pools.insert(name.into(), records);
    }

    pub fn get(&self, name: &str) -> Option<&[TraceRecord]> {
        self.pools.get(name).map(Vec::as_slice)
    }

    /// Loads every named trace that `mix` refers to from `traces_dir`.
    pub fn load_for_mix(traces_dir: &Path, mix: &[MixPart]) -> Result<Self, WorkloadError> {
        let mut pools = TracePools::default();
        for part in mix {
            if pools.pools.contains_key(&part.pool) {
                continue;
            }
            let trace = NamedTrace::from_name(&part.pool).ok_or_else(|| {
                let known: Vec<&str> = NamedTrace::ALL.iter().map(|t| t.name()).collect();
                WorkloadError::Spec(format!(
                    "unknown trace `{}` (known: {})",
                    part.pool,
                    known.join(", ")
                ))
            })?;
            pools.insert(part.pool.clone(), trace.load(traces_dir)?);
        }
        Ok(pools)
    }
}

/// What the generator did, for logs and experiment notes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GeneratorReport {
    /// Per mix part: (label, requests drawn, distinct trace records available after filters).
    pub parts: Vec<(String, usize, usize)>,
    /// Records left out because their prompt exceeded `max_prompt_tokens`.
    pub dropped_too_long: usize,
}

/// Draws `config.requests` requests from the pools in the mix's proportions and interleaves them
/// in a seeded random order (the submission order FCFS follows). A pool smaller than its share is
/// drawn again in a fresh random order; each redraw is a new epoch whose requests share nothing
/// with earlier epochs but what their trace structure says.
pub fn generate(
    config: &GeneratorConfig,
    pools: &TracePools,
) -> Result<(Workload, GeneratorReport), WorkloadError> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut ids = ContentIdAllocator::default();
    let mut workload = Workload::default();
    let mut report = GeneratorReport::default();
    let counts = split_counts(config.requests, &config.mix);
    let templates = config
        .synthetic_prefix
        .as_ref()
        .map(GroupSampler::new)
        .transpose()?;

    for (part_index, (part, count)) in config.mix.iter().zip(counts).enumerate() {
        let records = pools.get(&part.pool).ok_or_else(|| {
            WorkloadError::Spec(format!("no trace loaded for pool `{}`", part.pool))
        })?;
        let mut eligible: Vec<&TraceRecord> = Vec::with_capacity(records.len());
        for record in records {
            if config
                .max_prompt_tokens
                .is_some_and(|m| record.prompt_tokens > m)
            {
                report.dropped_too_long += 1;
                continue;
            }
            if part.filters.iter().all(|f| f.accepts(record)) {
                eligible.push(record);
            }
        }
        let label = part.label();
        report.parts.push((label.clone(), count, eligible.len()));
        if count == 0 {
            continue;
        }
        if eligible.is_empty() {
            return Err(WorkloadError::Spec(format!(
                "mix part `{label}` matches no request of its trace"
            )));
        }
        let source = workload.source_index(&label);
        let mut drawn = 0usize;
        let mut epoch = 0u64;
        while drawn < count {
            let mut order: Vec<&TraceRecord> = eligible.clone();
            order.shuffle(&mut rng);
            for record in order.into_iter().take(count - drawn) {
                let prompt = build_prompt(
                    record,
                    epoch,
                    part_index as u64,
                    templates.as_ref(),
                    &mut rng,
                    &mut ids,
                );
                let id = if epoch == 0 {
                    format!("{}-{}", part.pool, record.line)
                } else {
                    format!("{}-{}-e{epoch}", part.pool, record.line)
                };
                workload.requests.push(Request {
                    id,
                    prompt,
                    max_tokens: config.max_tokens.max(record.output_tokens),
                    output_tokens: Some(record.output_tokens),
                    output_known: false,
                    source,
                });
                drawn += 1;
            }
            epoch += 1;
        }
    }
    workload.requests.shuffle(&mut rng);
    Ok((workload, report))
}

/// Splits `total` over the parts by weight (largest remainder), so the counts add up exactly.
fn split_counts(total: usize, mix: &[MixPart]) -> Vec<usize> {
    let sum: f64 = mix.iter().map(|p| p.weight).sum();
    let exact: Vec<f64> = mix.iter().map(|p| total as f64 * p.weight / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut remainders: Vec<(usize, f64)> = exact
        .iter()
        .enumerate()
        .map(|(i, x)| (i, x - x.floor()))
        .collect();
    remainders.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let missing = total - counts.iter().sum::<usize>();
    for (i, _) in remainders.into_iter().take(missing) {
        counts[i] += 1;
    }
    counts
}

struct GroupSampler {
    config: SyntheticPrefix,
    cumulative: Vec<f64>,
}

impl GroupSampler {
    fn new(config: &SyntheticPrefix) -> Result<Self, WorkloadError> {
        if config.groups == 0 || config.block_tokens == 0 {
            return Err(WorkloadError::Spec(
                "synthetic prefix needs at least one group and a positive block size".into(),
            ));
        }
        if !(0.0..=1.0).contains(&config.sharing_ratio) {
            return Err(WorkloadError::Spec(format!(
                "sharing ratio {} is outside [0, 1]",
                config.sharing_ratio
            )));
        }
        let mut total = 0.0;
        let cumulative = (1..=config.groups)
            .map(|rank| {
                total += 1.0 / f64::from(rank).powf(config.group_skew.max(0.0));
                total
            })
            .collect();
        Ok(GroupSampler {
            config: config.clone(),
            cumulative,
        })
    }

    fn sample_group(&self, rng: &mut impl Rng) -> u64 {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let x = rng.gen::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1) as u64
    }
}

fn build_prompt(
    record: &TraceRecord,
    epoch: u64,
    part_index: u64,
    templates: Option<&GroupSampler>,
    rng: &mut impl Rng,
    ids: &mut ContentIdAllocator,
) -> Vec<Chunk> {
    let p = record.prompt_tokens;
    if !record.block_ids.is_empty() {
        // Real prefix structure: keep it. Block ids are namespaced by epoch, so a redraw of the
        // trace shares nothing with the first draw beyond what the trace itself shares.
        let tag = (epoch & 0xff) << 48;
        let n = record.block_ids.len();
        return record
            .block_ids
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                let len = if i + 1 == n {
                    p - MOONCAKE_BLOCK_TOKENS * (n as u32 - 1)
                } else {
                    MOONCAKE_BLOCK_TOKENS
                };
                Chunk::new(
                    Namespace::MooncakeBlock.id(tag | (h & 0xffff_ffff_ffff)),
                    len,
                )
            })
            .collect();
    }
    let mut prompt = Vec::new();
    if let Some(sampler) = templates {
        let block = sampler.config.block_tokens;
        let wanted = (sampler.config.sharing_ratio * f64::from(p)) as u32 / block;
        let allowed = (p - 1) / block;
        let blocks = wanted.min(allowed);
        if blocks > 0 {
            let group = sampler.sample_group(rng);
            for k in 0..u64::from(blocks) {
                let id = ((part_index & 0xff) << 48) | ((group & 0xff_ffff) << 24) | k;
                prompt.push(Chunk::new(Namespace::Template.id(id), block));
            }
        }
    }
    let shared: u32 = prompt.iter().map(|c| c.len_tokens).sum();
    prompt.push(ids.unique(p - shared));
    prompt
}

/// Every record of a trace, in file order, as requests with their recorded lengths.
pub fn trace_in_file_order(name: &str, records: &[TraceRecord]) -> Workload {
    let mut ids = ContentIdAllocator::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut workload = Workload::default();
    let source = workload.source_index(name);
    for record in records {
        workload.requests.push(Request {
            id: format!("{name}-{}", record.line),
            prompt: build_prompt(record, 0, 0, None, &mut rng, &mut ids),
            max_tokens: DEFAULT_MAX_TOKENS.max(record.output_tokens),
            output_tokens: Some(record.output_tokens),
            output_known: false,
            source,
        });
    }
    workload
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(line: usize, prompt: u32, output: u32) -> TraceRecord {
        TraceRecord {
            line,
            prompt_tokens: prompt,
            output_tokens: output,
            block_ids: Vec::new(),
        }
    }

    #[test]
    fn parses_mix_with_filters_and_weights() {
        let mix = parse_mix("azure-code=0.5, azure-conv[out>=256,prompt<1024]=2,mooncake").unwrap();
        assert_eq!(mix.len(), 3);
        assert_eq!(mix[0].weight, 0.5);
        assert_eq!(mix[1].filters.len(), 2);
        assert_eq!(mix[1].label(), "azure-conv[out>=256,prompt<1024]");
        assert_eq!(mix[2].weight, 1.0);
        assert!(parse_mix("azure-code=-1").is_err());
        assert!(parse_mix("azure-code[tokens>3]").is_err());
        assert!(parse_mix("").is_err());
    }

    #[test]
    fn counts_follow_weights_exactly() {
        let mix = parse_mix("a=1,b=1,c=1").unwrap();
        let counts = split_counts(100, &mix);
        assert_eq!(counts.iter().sum::<usize>(), 100);
        assert!(counts.iter().all(|&c| c == 33 || c == 34));
    }

    #[test]
    fn synthetic_prefix_shares_within_groups_only() {
        let mut pools = TracePools::default();
        pools.insert(
            "t",
            (0..200)
                .map(|i| record(i + 2, 1000 + i as u32, 10))
                .collect(),
        );
        let config = GeneratorConfig {
            mix: parse_mix("t").unwrap(),
            requests: 200,
            seed: 7,
            synthetic_prefix: Some(SyntheticPrefix {
                groups: 4,
                sharing_ratio: 0.5,
                block_tokens: 64,
                group_skew: 0.0,
            }),
            max_prompt_tokens: None,
            max_tokens: DEFAULT_MAX_TOKENS,
        };
        let (workload, _) = generate(&config, &pools).unwrap();
        assert_eq!(workload.len(), 200);
        for r in &workload.requests {
            let shared: u32 = r.prompt[..r.prompt.len() - 1]
                .iter()
                .map(|c| c.len_tokens)
                .sum();
            // floor(0.5 * p / 64) blocks of 64 tokens.
            assert_eq!(shared, (r.prompt_tokens() as u32 / 2) / 64 * 64);
            assert_eq!(
                Namespace::of(r.prompt.last().unwrap().content_id),
                Some(Namespace::Unique)
            );
        }
        let groups: std::collections::HashSet<u64> = workload
            .requests
            .iter()
            .map(|r| r.prompt[0].content_id)
            .collect();
        assert_eq!(groups.len(), 4);
    }

    #[test]
    fn redraws_get_fresh_unique_content() {
        let mut pools = TracePools::default();
        pools.insert("t", vec![record(2, 100, 5), record(3, 50, 5)]);
        let config = GeneratorConfig {
            mix: parse_mix("t").unwrap(),
            requests: 5,
            seed: 1,
            synthetic_prefix: None,
            max_prompt_tokens: None,
            max_tokens: DEFAULT_MAX_TOKENS,
        };
        let (workload, report) = generate(&config, &pools).unwrap();
        assert_eq!(workload.len(), 5);
        let contents: std::collections::HashSet<u64> = workload
            .requests
            .iter()
            .map(|r| r.prompt[0].content_id)
            .collect();
        assert_eq!(contents.len(), 5);
        let ids: std::collections::HashSet<&str> =
            workload.requests.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 5);
        assert_eq!(report.parts[0].2, 2);
    }

    #[test]
    fn empty_filtered_pool_is_an_error() {
        let mut pools = TracePools::default();
        pools.insert("t", vec![record(2, 100, 5)]);
        let config = GeneratorConfig {
            mix: parse_mix("t[out>100]").unwrap(),
            requests: 3,
            seed: 1,
            synthetic_prefix: None,
            max_prompt_tokens: None,
            max_tokens: DEFAULT_MAX_TOKENS,
        };
        let err = generate(&config, &pools).unwrap_err().to_string();
        assert!(err.contains("matches no request"), "{err}");
    }
}
