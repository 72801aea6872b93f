//! The critical-path floor of a balanced step's compute.
//!
//! The balanced token budget sizes a step's prefill to its memory time (the decodes' KV reads
//! and the weights' pass), so that long decodes keep moving beside the prefill. Where few
//! decodes run, that memory time is little more than the weights' pass: the step computes a
//! few hundred tokens and pays the pass (its time, and under a power limit its energy) and the
//! step's overhead for them, and a compute-heavy workload takes several times the steps it
//! needs (on `h200`, 500-1,000 requests of the paper's traces ran 1.6x slower than DFS).
//! That costs where the board's power limit holds a balanced step (compute and memory traffic
//! then take time even overlapped); the floor is applied there only (`batch.rs`).
//!
//! No step needs less compute than the pace at which the compute not admitted yet ends with
//! the rest of the run: that compute spread over the steps the rest needs at least, which is
//! the longest decode still to come (a running one's or a waiting one's) and the KV reads
//! still to come over what one step with a full cache reads. Throttling below that pace adds
//! steps and buys nothing; at or above it the balance rule decides, as before. (With only the
//! longest decode, a large memory-heavy run was paced far above its balance point: 100,000
//! requests of the paper's traces ran 15-20% slower on `a100-80g`.)

use std::collections::BinaryHeap;

use prefix_tree::{Demand, RequestIndex};

/// Demand not admitted yet, and the longest output still to be decoded among it.
#[derive(Clone, Debug)]
pub(crate) struct CriticalPath {
    pending: Demand,
    /// (estimated output tokens, request) of requests not admitted yet, longest on top;
    /// admitted ones are dropped lazily.
    pending_outputs: BinaryHeap<(u32, RequestIndex)>,
}

impl CriticalPath {
    /// `requests`: (request, its estimated demand, its estimated output tokens) for every
    /// request that may still be admitted.
    pub(crate) fn new(requests: impl Iterator<Item = (RequestIndex, Demand, u32)>) -> Self {
        let mut pending = Demand::ZERO;
        let mut pending_outputs = BinaryHeap::new();
        for (r, demand, output_tokens) in requests {
            pending += demand;
            pending_outputs.push((output_tokens, r));
        }
        CriticalPath {
            pending,
            pending_outputs,
        }
    }

    /// A request of estimated `demand` was admitted for the first time.
    pub(crate) fn admitted(&mut self, demand: Demand) {
        self.pending = Demand::new(
            (self.pending.compute_secs - demand.compute_secs).max(0.0),
            (self.pending.memory_secs - demand.memory_secs).max(0.0),
        );
    }

    /// Compute seconds a step may reach whatever its memory time: the compute not admitted
    /// yet over the steps the rest of the run needs at least (see the module). `running`: the
    /// running sequences' rest; `full_step_kv_secs`: the KV-read time of a step over a full
    /// cache; `is_admitted` tells the requests admitted since they were counted. 0 once every
    /// request is admitted.
    pub(crate) fn compute_floor_secs(
        &mut self,
        running: RunningRest,
        full_step_kv_secs: f64,
        is_admitted: impl Fn(RequestIndex) -> bool,
    ) -> f64 {
        while let Some(&(_, r)) = self.pending_outputs.peek() {
            if !is_admitted(r) {
                break;
            }
            self.pending_outputs.pop();
        }
        let Some(&(pending_longest, _)) = self.pending_outputs.peek() else {
            return 0.0;
        };
        let longest = pending_longest.max(running.longest_output_tokens);
        let kv_steps = (self.pending.memory_secs + running.kv_secs) / full_step_kv_secs.max(1e-12);
        self.pending.compute_secs / (f64::from(longest) + 1.0).max(kv_steps)
    }
}

/// What the running sequences have still to do.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RunningRest {
    /// The most output tokens any of them has still to generate (estimated).
    pub longest_output_tokens: u32,
    /// Seconds of KV reads their remaining decodes take (estimated).
    pub kv_secs: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> CriticalPath {
        // Three requests of 1 s compute and 0.1 s of KV reads each; outputs 9, 99, 19 tokens.
        CriticalPath::new(
            [(0, 9), (1, 99), (2, 19)]
                .into_iter()
                .map(|(r, out)| (r, Demand::new(1.0, 0.1), out)),
        )
    }

    fn running(longest_output_tokens: u32, kv_secs: f64) -> RunningRest {
        RunningRest {
            longest_output_tokens,
            kv_secs,
        }
    }

    #[test]
    fn floor_spreads_pending_compute_over_the_longest_decode_to_come() {
        let mut p = path();
        let none = |_| false;
        // A step over a full cache reads 1 s of KV: the 0.3 s pending fit in one step, so the
        // longest output, 99 tokens, sets 100 steps.
        assert!((p.compute_floor_secs(running(0, 0.0), 1.0, none) - 3.0 / 100.0).abs() < 1e-12);
        // A running request with 199 tokens to go lengthens the path.
        let floor = p.compute_floor_secs(running(199, 0.0), 1.0, none);
        assert!((floor - 3.0 / 200.0).abs() < 1e-12, "{floor}");
        // Request 1 admitted: its demand leaves, and the longest pending output is 19.
        p.admitted(Demand::new(1.0, 0.1));
        let floor = p.compute_floor_secs(running(0, 0.0), 1.0, |r| r == 1);
        assert!((floor - 2.0 / 20.0).abs() < 1e-12, "{floor}");
        // Everything admitted: no floor, whatever still runs.
        p.admitted(Demand::new(1.0, 0.1));
        p.admitted(Demand::new(1.0, 0.1));
        assert_eq!(p.compute_floor_secs(running(500, 9.0), 1.0, |_| true), 0.0);
    }

    #[test]
    fn kv_reads_to_come_lengthen_the_path_where_they_need_more_steps() {
        let mut p = path();
        // 0.3 s pending and 2.7 s running of KV reads at 1 ms a full step: 3,000 steps, not the
        // 100 the longest output needs.
        let floor = p.compute_floor_secs(running(0, 2.7), 0.001, |_| false);
        assert!((floor - 3.0 / 3000.0).abs() < 1e-12, "{floor}");
    }
}
