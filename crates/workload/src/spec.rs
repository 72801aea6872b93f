//! One way to name a workload from the command line or an experiment: a file path, or a mix of
//! named traces with generator options.

use std::path::PathBuf;

use crate::generator::{
    generate, parse_mix, GeneratorConfig, GeneratorReport, SyntheticPrefix, TracePools,
};
use crate::traces::default_traces_dir;
use crate::{load_file, Workload, WorkloadError};

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadSpec {
    /// A workload file (native JSONL, Mooncake JSONL, Azure CSV), or a mix such as
    /// `azure-code=1,azure-conv=1`.
    pub source: String,
    /// Requests to draw for a mix; for a file, the first this many (0: all).
    pub requests: usize,
    pub seed: u64,
    pub synthetic_prefix: Option<SyntheticPrefix>,
    pub max_prompt_tokens: Option<u32>,
    /// `max_tokens` of generated requests (see [`GeneratorConfig::max_tokens`]).
    pub max_tokens: u32,
    /// Where named traces live (default: `$BLENDSERVE_TRACES` or `shared/traces` found upwards).
    pub traces_dir: Option<PathBuf>,
}

impl WorkloadSpec {
    pub fn load(&self) -> Result<(Workload, Option<GeneratorReport>), WorkloadError> {
        let path = PathBuf::from(&self.source);
        if path.is_file() {
            let mut workload = load_file(&path)?;
            if self.requests > 0 {
                workload.requests.truncate(self.requests);
            }
            return Ok((workload, None));
        }
        if crate::paper::PaperMix::is_paper_mix(&self.source) {
            return Ok((self.load_paper_mix()?, None));
        }
        let mix = parse_mix(&self.source).map_err(|e| match e {
            WorkloadError::Spec(m) => WorkloadError::Spec(format!(
                "`{}` is neither a file nor a trace mix: {m}",
                self.source
            )),
            other => other,
        })?;
        let dir = self.traces_dir()?;
        let pools = TracePools::load_for_mix(&dir, &mix)?;
        let config = GeneratorConfig {
            mix,
            requests: self.requests,
            seed: self.seed,
            synthetic_prefix: self.synthetic_prefix.clone(),
            max_prompt_tokens: self.max_prompt_tokens,
            max_tokens: self.max_tokens,
        };
        let (workload, report) = generate(&config, &pools)?;
        Ok((workload, Some(report)))
    }

    fn traces_dir(&self) -> Result<PathBuf, WorkloadError> {
        self.traces_dir
            .clone()
            .or_else(default_traces_dir)
            .ok_or_else(|| {
                WorkloadError::Spec(
                    "cannot find the traces folder: pass --traces-dir or set BLENDSERVE_TRACES"
                        .into(),
                )
            })
    }

    /// A mix of the paper's synthetic parts (`burstgpt=1,mmlu=1,openvid=0.1`).
    fn load_paper_mix(&self) -> Result<Workload, WorkloadError> {
        use crate::paper::{generate_paper, PaperMix, PaperPart};
        let mix = PaperMix::parse(&self.source)?;
        let azure = if mix
            .parts
            .iter()
            .any(|&(p, w)| p == PaperPart::BurstGpt && w > 0.0)
        {
            crate::traces::NamedTrace::AzureConv.load(&self.traces_dir()?)?
        } else {
            Vec::new()
        };
        generate_paper(&mix, self.requests, self.seed, &azure)
    }
}
