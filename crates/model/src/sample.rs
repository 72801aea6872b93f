//! Token sampling: greedy, temperature, top-k, top-p, seeded per sequence.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability adds up to at least this (1 = off).
    pub top_p: f32,
    /// Keep this many most likely tokens (0 = off).
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// Samples one sequence's tokens; the same seed gives the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        }
    }

    /// Whether [`Sampler::sample`] is the argmax (first index on ties).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return crate::step::argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                (
                    i as u32,
                    f64::from((l - max) / self.params.temperature).exp(),
                )
            })
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = candidates
                .iter()
                .position(|c| {
                    cumulative += c.1 / total;
                    cumulative >= f64::from(self.params.top_p)
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep.max(1));
        }
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut x = self.rng.gen::<f64>() * total;
        for &(token, weight) in &candidates {
            if x < weight {
                return token;
            }
            x -= weight;
        }
        candidates
            .last()
            .map_or_else(|| crate::step::argmax(logits), |c| c.0)
    }
}

/// Why a sequence stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (EOS or one the request named) was generated.
    StopToken(u32),
    /// `max_tokens` tokens were generated.
    Length,
}

/// When a sequence stops: a stop token, or `max_tokens` generated tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopCriteria {
    pub max_tokens: u32,
    /// Token ids that end the sequence (the model's EOS ids plus any the request names).
    pub stop_token_ids: Vec<u32>,
    /// Never stop on a stop token (benchmarks that must generate exactly `max_tokens`).
    pub ignore_eos: bool,
}

impl StopCriteria {
    /// Checks the sequence after `token` was appended as its `generated`-th token.
    pub fn check(&self, token: u32, generated: u32) -> Option<StopReason> {
        if !self.ignore_eos && self.stop_token_ids.contains(&token) {
            Some(StopReason::StopToken(token))
        } else if generated >= self.max_tokens {
            Some(StopReason::Length)
        } else {
            None
        }
    }
}
