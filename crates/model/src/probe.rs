//! Probe steps for choosing how a device runs a step: a blended batch (fresh prefill chunks beside
//! decode tokens over a cached context) and what timing it under each executor found. Device
//! neutral: the CUDA step model fills an [`ExecutorProfile`]; the engine reads it.

use serde::Serialize;

use crate::forward::{ForwardBatch, SequenceChunk};

/// Longest prefill chunk of a probe (one sequence's share of the step).
const PROBE_CHUNK_TOKENS: usize = 2048;

/// A blended probe step: `prefill_tokens` new tokens of fresh sequences (chunks of at most 2048)
/// beside `decode_seqs` decode tokens, each at context `decode_context` (its earlier tokens
/// already cached).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeBlend {
    pub prefill_tokens: usize,
    pub decode_seqs: usize,
    pub decode_context: usize,
}

impl ProbeBlend {
    /// Cache blocks of `block_size` tokens the probe's sequences take.
    pub fn blocks_needed(&self, block_size: usize) -> usize {
        let decode = self.decode_seqs * self.decode_context.div_ceil(block_size);
        let prefill: usize = self.prefill_chunks().map(|n| n.div_ceil(block_size)).sum();
        decode + prefill
    }

    /// Token counts of the prefill part's chunks (each a fresh sequence from position 0).
    pub fn prefill_chunks(&self) -> impl Iterator<Item = usize> {
        let full = self.prefill_tokens / PROBE_CHUNK_TOKENS;
        let rest = self.prefill_tokens % PROBE_CHUNK_TOKENS;
        std::iter::repeat_n(PROBE_CHUNK_TOKENS, full).chain((rest > 0).then_some(rest))
    }

    /// The whole step (decode sequences first, as the engine orders them), its prefill part
    /// alone and its decode part alone, taking blocks from `block_ids` in order. Every sequence
    /// asks for logits. Tokens are arbitrary ids below 1000.
    pub fn batches(
        &self,
        block_size: usize,
        block_ids: &[u32],
    ) -> Result<[ForwardBatch; 3], crate::ModelError> {
        if block_ids.len() < self.blocks_needed(block_size) {
            return Err(crate::ModelError::Batch(format!(
                "a probe of {} prefill tokens and {} decodes at context {} needs {} blocks of {} \
                 tokens, the cache has {}",
                self.prefill_tokens,
                self.decode_seqs,
                self.decode_context,
                self.blocks_needed(block_size),
                block_size,
                block_ids.len()
            )));
        }
        let mut next = 0;
        let mut chunk = |tokens: usize, start: usize, salt: usize| {
            let blocks = (start + tokens).div_ceil(block_size);
            next += blocks;
            SequenceChunk {
                tokens: (0..tokens)
                    .map(|i| ((salt * 7919 + i * 31) % 997) as u32 + 3)
                    .collect(),
                start_position: start,
                block_table: block_ids[next - blocks..next].to_vec(),
                logits: true,
            }
        };
        let decode: Vec<SequenceChunk> = (0..self.decode_seqs)
            .map(|d| chunk(1, self.decode_context - 1, d))
            .collect();
        let prefill: Vec<SequenceChunk> = self
            .prefill_chunks()
            .enumerate()
            .map(|(i, n)| chunk(n, 0, self.decode_seqs + i))
            .collect();
        let whole = ForwardBatch {
            sequences: decode.iter().chain(&prefill).cloned().collect(),
        };
        Ok([
            whole,
            ForwardBatch { sequences: prefill },
            ForwardBatch { sequences: decode },
        ])
    }
}

/// One executor's time on a probe, or why it could not run there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecutorTiming {
    pub executor: String,
    pub secs: Option<f64>,
    pub error: Option<String>,
}

/// A probe step timed under the sequential executor, its two parts alone, and each candidate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecutorProfile {
    pub blend: ProbeBlend,
    /// The executor every step runs under when no candidate beats it.
    pub sequential: String,
    pub sequential_secs: f64,
    pub prefill_alone_secs: f64,
    pub decode_alone_secs: f64,
    pub candidates: Vec<ExecutorTiming>,
}

impl ExecutorProfile {
    /// The fastest executor and its time (the sequential one unless a candidate beats it).
    pub fn fastest(&self) -> (&str, f64) {
        self.candidates
            .iter()
            .filter_map(|c| c.secs.map(|s| (c.executor.as_str(), s)))
            .fold(
                (self.sequential.as_str(), self.sequential_secs),
                |best, c| if c.1 < best.1 { c } else { best },
            )
    }

    /// How much of the ideal overlap a step time of `secs` reached: 1 when the step took as
    /// long as its longer part alone (perfect overlap), 0 when as long as the sequential step,
    /// negative when slower than that. The performance model's `partial:E` in measured form.
    pub fn overlap_efficiency(&self, secs: f64) -> f64 {
        let ideal = self.prefill_alone_secs.max(self.decode_alone_secs);
        let room = self.sequential_secs - ideal;
        if room <= 0.0 {
            return 0.0;
        }
        (self.sequential_secs - secs) / room
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three batches share no block, take blocks in order, and hold exactly the blend.
    #[test]
    fn probe_batches_hold_the_blend_in_disjoint_blocks() {
        let blend = ProbeBlend {
            prefill_tokens: 2048 + 100,
            decode_seqs: 3,
            decode_context: 40,
        };
        let need = blend.blocks_needed(16);
        assert_eq!(need, 3 * 3 + 128 + 7);
        let ids: Vec<u32> = (0..need as u32).rev().collect();
        let [whole, prefill, decode] = blend.batches(16, &ids).expect("enough blocks");
        assert_eq!(decode.sequences.len(), 3);
        assert!(decode
            .sequences
            .iter()
            .all(|s| s.tokens.len() == 1 && s.start_position == 39 && s.block_table.len() == 3));
        let chunks: Vec<usize> = prefill.sequences.iter().map(|s| s.tokens.len()).collect();
        assert_eq!(chunks, vec![2048, 100]);
        assert_eq!(whole.sequences.len(), 5);
        assert_eq!(whole.sequences[0], decode.sequences[0]);
        let mut used: Vec<u32> = whole
            .sequences
            .iter()
            .flat_map(|s| s.block_table.clone())
            .collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), need);
        assert!(blend.batches(16, &ids[1..]).is_err());
    }

    fn profile(candidates: &[(&str, Option<f64>)]) -> ExecutorProfile {
        ExecutorProfile {
            blend: ProbeBlend {
                prefill_tokens: 1024,
                decode_seqs: 256,
                decode_context: 1024,
            },
            sequential: "sequential".into(),
            sequential_secs: 0.040,
            prefill_alone_secs: 0.024,
            decode_alone_secs: 0.020,
            candidates: candidates
                .iter()
                .map(|&(e, secs)| ExecutorTiming {
                    executor: e.into(),
                    secs,
                    error: secs.is_none().then(|| "cannot run".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn the_fastest_executor_wins_and_efficiency_spans_sum_to_max() {
        let slower = profile(&[("overlap", Some(0.044)), ("overlap-green:32", None)]);
        assert_eq!(slower.fastest(), ("sequential", 0.040));
        assert!(slower.overlap_efficiency(0.044) < 0.0);
        let faster = profile(&[("overlap", Some(0.044)), ("overlap-gemm:16", Some(0.032))]);
        assert_eq!(faster.fastest(), ("overlap-gemm:16", 0.032));
        assert!((faster.overlap_efficiency(0.032) - 0.5).abs() < 1e-9);
        assert!((faster.overlap_efficiency(0.024) - 1.0).abs() < 1e-9);
        assert!(faster.overlap_efficiency(0.040).abs() < 1e-9);
    }
}
