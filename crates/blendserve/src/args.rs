//! Command-line options shared by subcommands.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use workload::generator::SyntheticPrefix;
use workload::{native, Workload, WorkloadSpec};

/// The bundled default workload: 1000 requests drawn from the Azure code and conversation traces
/// and the Mooncake trace, with synthetic prefix sharing (see data/README.md).
const DEFAULT_WORKLOAD: &str = include_str!("../data/default-workload.jsonl");

#[derive(Args, Clone, Debug)]
pub struct WorkloadArgs {
    /// A workload file (native JSONL, Mooncake JSONL or Azure CSV) or a mix of named traces,
    /// e.g. `azure-code=1,azure-conv[out>=256]=1,mooncake=0.5`. Default: the bundled sample.
    #[arg(long)]
    pub workload: Option<String>,
    /// Requests to draw from a mix (or the first N of a file; 0 = all).
    #[arg(long, default_value_t = 5000)]
    pub requests: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder holding the named traces (default: $BLENDSERVE_TRACES or shared/traces upwards).
    #[arg(long)]
    pub traces_dir: Option<PathBuf>,
    /// Synthetic prefix sharing for traces without prefix structure: fraction of each prompt
    /// taken from its group's shared template (0 disables).
    #[arg(long, default_value_t = 0.0)]
    pub prefix_ratio: f64,
    /// Template groups per mix part.
    #[arg(long, default_value_t = 16)]
    pub prefix_groups: u32,
    /// Granularity of shared templates in tokens.
    #[arg(long, default_value_t = 64)]
    pub prefix_block_tokens: u32,
    /// Zipf exponent of group popularity (0 = uniform).
    #[arg(long, default_value_t = 0.0)]
    pub prefix_skew: f64,
    /// Leave out trace requests with longer prompts.
    #[arg(long)]
    pub max_prompt_tokens: Option<u32>,
    /// `max_tokens` of generated requests (raised to the recorded output where longer).
    #[arg(long, default_value_t = workload::generator::DEFAULT_MAX_TOKENS)]
    pub max_tokens: u32,
}

impl WorkloadArgs {
    pub fn load(&self) -> Result<(Workload, String)> {
        let Some(source) = &self.workload else {
            let workload = native::parse_native_jsonl(
                DEFAULT_WORKLOAD,
                std::path::Path::new("<bundled default workload>"),
            )
            .context("bundled default workload")?;
            return Ok((workload, "bundled-default".to_string()));
        };
        let spec = WorkloadSpec {
            source: source.clone(),
            requests: self.requests,
            seed: self.seed,
            synthetic_prefix: (self.prefix_ratio > 0.0).then_some(SyntheticPrefix {
                groups: self.prefix_groups,
                sharing_ratio: self.prefix_ratio,
                block_tokens: self.prefix_block_tokens,
                group_skew: self.prefix_skew,
            }),
            max_prompt_tokens: self.max_prompt_tokens,
            max_tokens: self.max_tokens,
            traces_dir: self.traces_dir.clone(),
        };
        let (workload, report) = spec.load()?;
        if let Some(report) = report {
            for (label, drawn, available) in &report.parts {
                tracing::info!(
                    "drew {drawn} requests from {label} ({available} distinct available)"
                );
            }
            if report.dropped_too_long > 0 {
                tracing::info!(
                    "left out {} trace requests over --max-prompt-tokens",
                    report.dropped_too_long
                );
            }
        }
        Ok((workload, source.clone()))
    }
}

/// Batch-formation limits shared by `sim` and `run`, so the simulator and the engine are set
/// up alike.
#[derive(Args, Clone, Debug)]
pub struct SchedulerArgs {
    /// Tokens computed per step at most (chunked prefill splits prompts to fit).
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: u32,
    /// Prefill budget per step: auto (each policy's own: fixed for fcfs/random/dfs, balanced
    /// for blendserve), fixed (fill max-batch-tokens), balanced (size prefill to the step's
    /// memory time).
    #[arg(long, default_value = "auto")]
    pub token_budget: String,
    /// Sequences running at once at most.
    #[arg(long, default_value_t = 1024)]
    pub max_running: u32,
    /// KV reserved at admission for running sequences' estimated remaining output, as a ratio
    /// that starts here and decays to --reserve-ratio-min (SGLang's new_token_ratio).
    #[arg(long, default_value_t = scheduler::SchedulerConfig::default().reserve_ratio_init)]
    pub reserve_ratio_init: f64,
    #[arg(long, default_value_t = scheduler::SchedulerConfig::default().reserve_ratio_min)]
    pub reserve_ratio_min: f64,
    #[arg(long, default_value_t = 16)]
    pub block_tokens: u32,
    #[arg(long)]
    pub no_prefix_caching: bool,
}

impl SchedulerArgs {
    pub fn config(&self) -> Result<scheduler::SchedulerConfig> {
        Ok(scheduler::SchedulerConfig {
            max_batch_tokens: self.max_batch_tokens,
            token_budget: self.token_budget.parse()?,
            max_running: self.max_running,
            block_tokens: self.block_tokens,
            reserve_ratio_init: self.reserve_ratio_init,
            reserve_ratio_min: self.reserve_ratio_min,
            enable_prefix_caching: !self.no_prefix_caching,
            ..scheduler::SchedulerConfig::default()
        })
    }
}
