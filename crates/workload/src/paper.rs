//! Workloads like the BlendServe paper's (arXiv 2411.16102, §6.1 and A.3): its main traces mix
//! BurstGPT-like chat, MMLU-like 5-shot questions and OpenVid-like video generation; LIMO-like
//! reasoning appears in its motivation. None of those datasets is on this machine, so each part
//! is synthesised from the distributions the paper reports (`shared/docs/blendserve-paper.md`):
//!
//! | part | prompt tokens | output tokens | sharing | output known |
//! | --- | --- | --- | --- | --- |
//! | `burstgpt` | Azure conversation prompts scaled to a mean of 244 | Azure outputs scaled to a mean of 27 | none | no |
//! | `mmlu` | 5-shot prefix of its subject (57 subjects, 500-900 tokens each) + a 40-200-token question | 1-2 | the subject's prefix | no |
//! | `openvid` | 60-180 (mean 120) | frames x 256 tokens, 32-96 frames (mean 16k, the paper's normalised length) | none | yes |
//! | `limo` | 50-170 (mean ~110) | log-normal, median 7,000, clamped to 1,000-16,000 (mean ~7.6k) | none | no |
//!
//! BurstGPT-like requests take the Azure conversation trace's shape (its joint prompt/output
//! lengths), rescaled; the others are drawn from the distributions above with a seeded RNG.
//! Mixes of these parts are `PaperMix`es; the named traces #1-#4 and the 65-workload grid are
//! found by the simulator crate, which can price densities (this crate knows no hardware).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::traces::TraceRecord;
use crate::{Chunk, ContentIdAllocator, Namespace, Request, Workload, WorkloadError};

/// One kind of request in the paper's workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PaperPart {
    BurstGpt,
    Mmlu,
    OpenVid,
    Limo,
}

/// `max_tokens` the synthetic requests ask for (LIMO-like reasoning runs long).
pub const PAPER_MAX_TOKENS: u32 = 16_384;
/// MMLU's subject count.
pub const MMLU_SUBJECTS: u64 = 57;
const BURSTGPT_PROMPT_MEAN: f64 = 244.0;
const BURSTGPT_OUTPUT_MEAN: f64 = 27.0;

impl PaperPart {
    pub const ALL: [PaperPart; 4] = [
        PaperPart::BurstGpt,
        PaperPart::Mmlu,
        PaperPart::OpenVid,
        PaperPart::Limo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PaperPart::BurstGpt => "burstgpt",
            PaperPart::Mmlu => "mmlu",
            PaperPart::OpenVid => "openvid",
            PaperPart::Limo => "limo",
        }
    }

    pub fn from_name(name: &str) -> Option<PaperPart> {
        PaperPart::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Relative request counts of the parts.
#[derive(Clone, Debug, PartialEq)]
pub struct PaperMix {
    pub parts: Vec<(PaperPart, f64)>,
}

impl PaperMix {
    /// Parses `burstgpt=0.6,mmlu=0.3,openvid=0.1` (weights relative; a part without `=w`
    /// weighs 1).
    pub fn parse(spec: &str) -> Result<PaperMix, WorkloadError> {
        let mut parts = Vec::new();
        for piece in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match piece.split_once('=') {
                Some((n, w)) => (
                    n.trim(),
                    w.trim().parse::<f64>().map_err(|_| {
                        WorkloadError::Spec(format!("paper mix part `{piece}`: bad weight `{w}`"))
                    })?,
                ),
                None => (piece, 1.0),
            };
            let part = PaperPart::from_name(name).ok_or_else(|| {
                WorkloadError::Spec(format!(
                    "unknown paper part `{name}` (burstgpt, mmlu, openvid, limo)"
                ))
            })?;
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(WorkloadError::Spec(format!(
                    "paper mix part `{piece}`: weight must be zero or positive"
                )));
            }
            parts.push((part, weight));
        }
        if parts.iter().all(|&(_, w)| w == 0.0) {
            return Err(WorkloadError::Spec(format!(
                "paper mix `{spec}` has no part with a positive weight"
            )));
        }
        Ok(PaperMix { parts })
    }

    /// Whether a mix specification names only paper parts (so it is not a trace mix).
    pub fn is_paper_mix(spec: &str) -> bool {
        spec.split(',')
            .map(|p| p.split('=').next().unwrap_or("").trim())
            .filter(|n| !n.is_empty())
            .all(|n| PaperPart::from_name(n).is_some())
    }
}

/// Generates `requests` requests of `mix` in a seeded random order. `azure_conv` is the Azure
/// conversation trace, whose joint lengths BurstGPT-like requests take (rescaled); it may be
/// empty when the mix has no BurstGPT part.
pub fn generate_paper(
    mix: &PaperMix,
    requests: usize,
    seed: u64,
    azure_conv: &[TraceRecord],
) -> Result<Workload, WorkloadError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb1e4_d5e7);
    let mut ids = ContentIdAllocator::default();
    let mut workload = Workload::default();
    let total: f64 = mix.parts.iter().map(|&(_, w)| w).sum();
    let mut counts: Vec<usize> = mix
        .parts
        .iter()
        .map(|&(_, w)| (requests as f64 * w / total).floor() as usize)
        .collect();
    let short = requests - counts.iter().sum::<usize>();
    if let Some(i) = (0..counts.len()).max_by(|&a, &b| mix.parts[a].1.total_cmp(&mix.parts[b].1)) {
        counts[i] += short;
    }
    let azure = AzureScale::new(azure_conv);
    let mmlu_prefix: Vec<u32> = (0..MMLU_SUBJECTS)
        .map(|_| rng.gen_range(500..=900))
        .collect();
    for (&(part, _), &count) in mix.parts.iter().zip(&counts) {
        if count == 0 {
            continue;
        }
        let source = workload.source_index(part.name());
        for k in 0..count {
            let (prompt, output, known) = match part {
                PaperPart::BurstGpt => {
                    let scale = azure.as_ref().ok_or_else(|| {
                        WorkloadError::Spec(
                            "burstgpt-like requests need the Azure conversation trace".into(),
                        )
                    })?;
                    let (p, d) = scale.draw(&mut rng);
                    (vec![ids.unique(p)], d, false)
                }
                PaperPart::Mmlu => {
                    let subject = rng.gen_range(0..MMLU_SUBJECTS);
                    let shots = Chunk::new(
                        Namespace::Template.id((0xa1 << 48) | subject),
                        mmlu_prefix[subject as usize],
                    );
                    let question = ids.unique(rng.gen_range(40..=200));
                    (vec![shots, question], rng.gen_range(1..=2), false)
                }
                PaperPart::OpenVid => {
                    let frames: u32 = rng.gen_range(32..=96);
                    (
                        vec![ids.unique(rng.gen_range(60..=180))],
                        frames * 256,
                        true,
                    )
                }
                PaperPart::Limo => {
                    let normal: f64 = (0..12).map(|_| rng.gen::<f64>()).sum::<f64>() - 6.0;
                    let d = (7000.0 * (0.45 * normal).exp()).clamp(1000.0, 16_000.0) as u32;
                    (vec![ids.unique(rng.gen_range(50..=170))], d, false)
                }
            };
            workload.requests.push(Request {
                id: format!("{}-{k}", part.name()),
                prompt,
                max_tokens: PAPER_MAX_TOKENS.max(output),
                output_tokens: Some(output),
                output_known: known,
                source,
            });
        }
    }
    workload.requests.shuffle(&mut rng);
    Ok(workload)
}

/// The Azure conversation trace's joint lengths, scaled to BurstGPT's means.
struct AzureScale<'a> {
    records: &'a [TraceRecord],
    prompt_scale: f64,
    output_scale: f64,
}

impl<'a> AzureScale<'a> {
    fn new(records: &'a [TraceRecord]) -> Option<Self> {
        if records.is_empty() {
            return None;
        }
        let n = records.len() as f64;
        let prompt_mean = records
            .iter()
            .map(|r| f64::from(r.prompt_tokens))
            .sum::<f64>()
            / n;
        let output_mean = records
            .iter()
            .map(|r| f64::from(r.output_tokens))
            .sum::<f64>()
            / n;
        Some(AzureScale {
            records,
            prompt_scale: BURSTGPT_PROMPT_MEAN / prompt_mean.max(1.0),
            output_scale: BURSTGPT_OUTPUT_MEAN / output_mean.max(1.0),
        })
    }

    fn draw(&self, rng: &mut impl Rng) -> (u32, u32) {
        let r = &self.records[rng.gen_range(0..self.records.len())];
        let p = (f64::from(r.prompt_tokens) * self.prompt_scale)
            .round()
            .max(1.0) as u32;
        let d = (f64::from(r.output_tokens) * self.output_scale)
            .round()
            .max(1.0) as u32;
        (p, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure() -> Vec<TraceRecord> {
        (0..100)
            .map(|i| TraceRecord {
                line: i + 2,
                prompt_tokens: 500 + 20 * i as u32,
                output_tokens: 50 + i as u32,
                block_ids: Vec::new(),
            })
            .collect()
    }

    fn mean(w: &Workload, source: &str, f: impl Fn(&Request) -> f64) -> f64 {
        let s = w.sources.iter().position(|x| x == source).unwrap() as u16;
        let xs: Vec<f64> = w.requests.iter().filter(|r| r.source == s).map(f).collect();
        xs.iter().sum::<f64>() / xs.len() as f64
    }

    #[test]
    fn parts_follow_the_papers_lengths() {
        let mix = PaperMix::parse("burstgpt=1,mmlu=1,openvid=1,limo=1").unwrap();
        let w = generate_paper(&mix, 8000, 3, &azure()).unwrap();
        assert_eq!(w.len(), 8000);
        let prompt = |r: &Request| r.prompt_tokens() as f64;
        let out = |r: &Request| f64::from(r.output_tokens.unwrap());
        assert!((mean(&w, "burstgpt", prompt) - 244.0).abs() < 15.0);
        assert!((mean(&w, "burstgpt", out) - 27.0).abs() < 3.0);
        assert!((mean(&w, "mmlu", prompt) - 820.0).abs() < 40.0);
        assert!(mean(&w, "mmlu", out) <= 2.0);
        assert!((mean(&w, "openvid", out) - 16_384.0).abs() < 600.0);
        assert!((mean(&w, "openvid", prompt) - 120.0).abs() < 8.0);
        assert!(
            (mean(&w, "limo", out) - 7600.0).abs() < 700.0,
            "{}",
            mean(&w, "limo", out)
        );
        // Only video outputs are known in advance; MMLU shares one prefix per subject.
        assert!(w
            .requests
            .iter()
            .all(|r| r.output_known == (w.sources[r.source as usize] == "openvid")));
        let subjects: std::collections::HashSet<u64> = w
            .requests
            .iter()
            .filter(|r| r.prompt.len() == 2)
            .map(|r| r.prompt[0].content_id)
            .collect();
        assert_eq!(subjects.len() as u64, MMLU_SUBJECTS);
    }

    #[test]
    fn mixes_parse_and_errors_name_the_part() {
        assert!(PaperMix::is_paper_mix("mmlu=2,openvid"));
        assert!(!PaperMix::is_paper_mix("azure-conv=1,mmlu=1"));
        let err = PaperMix::parse("mmlu,video=2").unwrap_err().to_string();
        assert!(err.contains("video"), "{err}");
        assert!(PaperMix::parse("mmlu=0").is_err());
        let no_azure = generate_paper(&PaperMix::parse("burstgpt").unwrap(), 10, 1, &[]);
        assert!(no_azure.unwrap_err().to_string().contains("Azure"));
    }
}
