use prefix_tree::{Demand, OrderedRequest, RequestIndex};

/// What the scanner knows of one request before it runs (estimates).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestShape {
    /// Prompt tokens (KV it holds once prefilled).
    pub prompt_tokens: f64,
    /// Prompt tokens it is expected to compute itself: each shared prefix edge divided among the
    /// requests below it.
    pub prefill_tokens: f64,
    /// Estimated output tokens.
    pub output_tokens: f64,
}

impl RequestShape {
    /// KV tokens the request holds on average over its life (prompt plus half its output), the
    /// paper's `p + d/2`.
    pub fn mean_kv_tokens(&self) -> f64 {
        self.prompt_tokens + self.output_tokens / 2.0
    }

    /// KV tokens it holds at its end (prompt plus output).
    pub fn peak_kv_tokens(&self) -> f64 {
        self.prompt_tokens + self.output_tokens
    }
}

/// How the scanner decides which end the next request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideRule {
    /// BlendServe's memory split: KV memory is divided between the two ends so that the running
    /// batch sits at the workload's density (`M_L + M_R = M`, `M_L rho_L + M_R rho_R = M rho`),
    /// re-solved as the cursors move; the end further below its share goes next.
    MemorySplit,
    /// Ablation: the demand handed out so far tracks the workload's density (no memory split).
    AdmittedDemand,
    /// Ablation: one cursor, front to back (no dual scan); the front holds all the memory.
    FrontOnly,
}

/// What one step costs the memory system, for the memory split: every KV token held is read
/// once a step, and the weights once.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMemory {
    /// Seconds a step spends reading one held KV token.
    pub kv_secs_per_token: f64,
    /// Seconds a step spends reading the weights.
    pub weight_secs: f64,
}

/// Which end a handed-out request came from, and the memory it is counted for: its peak, prompt
/// plus output. (The paper's steady-state mean, `p + d/2`, overfilled the cache: requests
/// admitted together grow together, and the memory-heavy end, admitted first, crowded the other
/// out; measured in experiments/NOTES.md.)
#[derive(Clone, Copy, Debug, PartialEq)]
struct Lane {
    side: usize,
    kv_tokens: f64,
}

const FRONT: usize = 0;
const BACK: usize = 1;
/// Requests ahead of a cursor whose mean shape stands for that end (the paper's node at the
/// cursor; a window smooths single outliers).
const WINDOW: usize = 64;

/// BlendServe's dual scanner over a leaf order that runs from compute-heavy (front) to
/// memory-heavy (back).
///
/// One cursor walks forward from the front, the other backward from the back; each is a DFS of
/// its part of the tree, so each keeps prefix locality. Which end goes next follows a
/// [`SideRule`]. Under the memory split the scanner can also pace prefill, as the paper does:
/// each end's share of KV memory holds `N = M_side / (p + d/2)` requests, which finish at
/// `N / (d + 1)` a step, so the step needs `N p' / (d + 1)` prefill tokens (`p'` the tokens a
/// request computes itself) to stay full.
#[derive(Clone, Debug)]
pub struct DualScanner {
    order: Vec<OrderedRequest>,
    /// Prefix sums over `order` of (prompt, prefill, output) tokens and (compute, memory) secs.
    sums: Vec<[f64; 5]>,
    front: usize,
    /// One past the back cursor.
    back: usize,
    target_density: f64,
    rule: SideRule,
    admitted: Demand,
    shape: Vec<RequestShape>,
    lanes: Vec<Option<Lane>>,
    /// KV tokens counted to each end's running requests.
    load_kv_tokens: [f64; 2],
    step_memory: StepMemory,
}

impl DualScanner {
    /// `shape[r]` describes request `r` (indexed by request, not by position in `order`).
    pub fn new(
        order: Vec<OrderedRequest>,
        shape: Vec<RequestShape>,
        rule: SideRule,
        step_memory: StepMemory,
    ) -> Self {
        let total: Demand = order.iter().map(|o| o.demand).sum();
        let mut sums = Vec::with_capacity(order.len() + 1);
        let mut acc = [0.0; 5];
        sums.push(acc);
        for o in &order {
            let s = shape.get(o.request as usize).copied().unwrap_or_default();
            acc[0] += s.prompt_tokens;
            acc[1] += s.prefill_tokens;
            acc[2] += s.output_tokens;
            acc[3] += o.demand.compute_secs;
            acc[4] += o.demand.memory_secs;
            sums.push(acc);
        }
        let back = order.len();
        let lanes = vec![None; shape.len()];
        DualScanner {
            order,
            sums,
            front: 0,
            back,
            target_density: total.density(),
            rule,
            admitted: Demand::ZERO,
            shape,
            lanes,
            load_kv_tokens: [0.0; 2],
            step_memory,
        }
    }

    pub fn target_density(&self) -> f64 {
        self.target_density
    }

    pub fn remaining(&self) -> usize {
        self.back - self.front
    }

    /// Demand of everything handed out so far.
    pub fn admitted(&self) -> Demand {
        self.admitted
    }

    /// KV tokens counted to the front's and the back's running requests.
    pub fn load_kv_tokens(&self) -> [f64; 2] {
        self.load_kv_tokens
    }

    /// Window sums `[prompt, prefill, output, compute, memory]` of the requests next to `side`'s
    /// cursor, and how many requests that is.
    fn window(&self, side: usize) -> ([f64; 5], f64) {
        let (lo, hi) = if side == FRONT {
            (self.front, (self.front + WINDOW).min(self.back))
        } else {
            (self.back.saturating_sub(WINDOW).max(self.front), self.back)
        };
        let mut w = [0.0; 5];
        for (k, x) in w.iter_mut().enumerate() {
            *x = self.sums[hi][k] - self.sums[lo][k];
        }
        (w, (hi - lo) as f64)
    }

    /// Per end: compute seconds a step gets per KV token its running requests hold (a request
    /// delivers its compute over the `d + 1` steps it lives and holds `p + d/2` tokens on
    /// average), and the window's mean shape.
    fn side_rate(&self, side: usize) -> Option<(f64, RequestShape)> {
        let (w, n) = self.window(side);
        if n == 0.0 {
            return None;
        }
        let shape = RequestShape {
            prompt_tokens: w[0] / n,
            prefill_tokens: w[1] / n,
            output_tokens: w[2] / n,
        };
        let lifetime_steps = shape.output_tokens + 1.0;
        let rate = w[3] / n / lifetime_steps / shape.mean_kv_tokens().max(1.0);
        Some((rate, shape))
    }

    /// The front's share of KV memory. With the cache full (`M` tokens), a step reads
    /// `W + M h` (weights, and `h` per held token) and computes `M_L g_L + M_R g_R` (`g` each
    /// end's compute per held token); the share puts the step at the workload's density `rho`:
    /// `M_L = (rho (W + M h) - M g_R) / (g_L - g_R)`, clamped to [0, M]. This is the paper's
    /// `M_L rho_L + M_R rho_R = M rho` with each end's density taken per token held, so that
    /// requests that hold memory briefly (short outputs) are not undercounted.
    pub fn front_share(&self, kv_capacity_tokens: f64) -> f64 {
        if !self.target_density.is_finite() || self.rule == SideRule::FrontOnly {
            return 1.0;
        }
        let (Some((g_l, _)), Some((g_r, _))) = (self.side_rate(FRONT), self.side_rate(BACK)) else {
            return 1.0;
        };
        let m = kv_capacity_tokens.max(1.0);
        let mem = &self.step_memory;
        let wanted = self.target_density * (mem.weight_secs / m + mem.kv_secs_per_token);
        if g_l <= wanted || g_l <= g_r {
            return 1.0;
        }
        ((wanted - g_r) / (g_l - g_r)).clamp(0.0, 1.0)
    }

    /// Prefill tokens per step that keep both ends' shares of the cache full at steady state
    /// (see the type's doc): each end holds `N = M_side / (p + d/2)` requests, which finish at
    /// `N / (d + 1)` a step. Read only under the paced token budget, which BlendServe does not
    /// choose by itself (experiments/NOTES.md says why).
    pub fn prefill_pace_tokens(&self, kv_capacity_tokens: f64) -> f64 {
        if self.front >= self.back {
            return 0.0;
        }
        let f = self.front_share(kv_capacity_tokens);
        [(FRONT, f), (BACK, 1.0 - f)]
            .into_iter()
            .filter(|&(_, share)| share > 0.0)
            .filter_map(|(side, share)| {
                let (_, shape) = self.side_rate(side)?;
                let running = share * kv_capacity_tokens / shape.mean_kv_tokens().max(1.0);
                Some(running * shape.prefill_tokens / (shape.output_tokens + 1.0))
            })
            .sum()
    }

    pub fn rule(&self) -> SideRule {
        self.rule
    }

    fn take_front(&self, kv_capacity_tokens: f64) -> bool {
        match self.rule {
            SideRule::FrontOnly => true,
            SideRule::AdmittedDemand => {
                self.admitted.compute_secs <= self.target_density * self.admitted.memory_secs
                    || !self.target_density.is_finite()
            }
            SideRule::MemorySplit => {
                // Each end fills its own share of the whole cache (M_L + M_R = M), whatever the
                // other end holds; the end further below its share goes next.
                let f = self.front_share(kv_capacity_tokens);
                let m = kv_capacity_tokens.max(1.0);
                let deficit_front = f * m - self.load_kv_tokens[FRONT];
                let deficit_back = (1.0 - f) * m - self.load_kv_tokens[BACK];
                deficit_front > deficit_back || (deficit_front == deficit_back && f >= 0.5)
            }
        }
    }

    /// The next request, for a cache of `kv_capacity_tokens` tokens.
    pub fn pick(&mut self, kv_capacity_tokens: f64) -> Option<RequestIndex> {
        if self.front >= self.back {
            return None;
        }
        let side = if self.take_front(kv_capacity_tokens) {
            FRONT
        } else {
            BACK
        };
        let picked = if side == FRONT {
            self.front += 1;
            self.order[self.front - 1]
        } else {
            self.back -= 1;
            self.order[self.back]
        };
        self.admitted += picked.demand;
        let r = picked.request as usize;
        if let Some(shape) = self.shape.get(r) {
            let kv_tokens = shape.peak_kv_tokens();
            self.load_kv_tokens[side] += kv_tokens;
            self.lanes[r] = Some(Lane { side, kv_tokens });
        }
        Some(picked.request)
    }

    /// Request `r` finished: its end's memory is free again.
    pub fn finished(&mut self, r: RequestIndex) {
        if let Some(lane) = self.lanes.get_mut(r as usize).and_then(Option::take) {
            self.load_kv_tokens[lane.side] =
                (self.load_kv_tokens[lane.side] - lane.kv_tokens).max(0.0);
        }
    }

    /// Request `r` outran its estimated output: it is memory-heavy after all, so it is counted to
    /// the back from now on, for its prompt plus twice its estimated output.
    pub fn overran(&mut self, r: RequestIndex) {
        let Some(shape) = self.shape.get(r as usize).copied() else {
            return;
        };
        if let Some(lane) = self.lanes.get_mut(r as usize).and_then(Option::as_mut) {
            self.load_kv_tokens[lane.side] =
                (self.load_kv_tokens[lane.side] - lane.kv_tokens).max(0.0);
            lane.side = BACK;
            lane.kv_tokens = shape.prompt_tokens + 2.0 * shape.output_tokens;
            self.load_kv_tokens[BACK] += lane.kv_tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(request: u32, c: f64, m: f64) -> OrderedRequest {
        OrderedRequest {
            request,
            demand: Demand::new(c, m),
        }
    }

    fn shapes(n: usize, prompt: f64, output: f64) -> Vec<RequestShape> {
        vec![
            RequestShape {
                prompt_tokens: prompt,
                prefill_tokens: prompt,
                output_tokens: output,
            };
            n
        ]
    }

    #[test]
    fn admitted_demand_rule_mixes_both_ends_and_hands_out_everything_once() {
        // Compute-heavy front, memory-heavy back, total density 1.
        let order = vec![
            req(0, 3.0, 1.0),
            req(1, 3.0, 1.0),
            req(2, 1.0, 3.0),
            req(3, 1.0, 3.0),
        ];
        let mut s = DualScanner::new(
            order,
            shapes(4, 10.0, 10.0),
            SideRule::AdmittedDemand,
            StepMemory::default(),
        );
        assert!((s.target_density() - 1.0).abs() < 1e-12);
        let picks: Vec<u32> = std::iter::from_fn(|| s.pick(1e6)).collect();
        assert_eq!(picks, vec![0, 3, 1, 2]);
        assert_eq!(s.remaining(), 0);
        assert_eq!(s.pick(1e6), None);
    }

    /// 500 compute-heavy requests (4 s compute, 1000-token prompts, 50 out) then 2000
    /// memory-heavy ones (0.25 s, 100-token prompts, 2000 out).
    fn two_kinds() -> DualScanner {
        let mut order: Vec<OrderedRequest> = (0..500).map(|i| req(i, 4.0, 1.0)).collect();
        order.extend((500..2500).map(|i| req(i, 0.25, 1.0)));
        let mut shape = shapes(2500, 1000.0, 50.0);
        for s in &mut shape[500..] {
            *s = RequestShape {
                prompt_tokens: 100.0,
                prefill_tokens: 100.0,
                output_tokens: 2000.0,
            };
        }
        let memory = StepMemory {
            kv_secs_per_token: 1e-6,
            weight_secs: 0.01,
        };
        DualScanner::new(order, shape, SideRule::MemorySplit, memory)
    }

    #[test]
    fn memory_split_solves_for_the_workloads_density_per_token_held() {
        let s = two_kinds();
        let m = 1e6;
        // Compute a step gets per held token: c / ((d + 1) (p + d/2)).
        let g_l = 4.0 / (51.0 * 1025.0);
        let g_r = 0.25 / (2001.0 * 1100.0);
        let wanted = s.target_density() * (0.01 / m + 1e-6);
        let expected = (wanted - g_r) / (g_l - g_r);
        assert!(expected > 0.0 && expected < 1.0);
        assert!(
            (s.front_share(m) / expected - 1.0).abs() < 1e-9,
            "{}",
            s.front_share(m)
        );
    }

    #[test]
    fn memory_split_fills_each_ends_share_of_the_cache() {
        let mut s = two_kinds();
        let m = 1e6;
        let f = s.front_share(m);
        while s.load_kv_tokens().iter().sum::<f64>() < m {
            s.pick(m).unwrap();
        }
        // Each end holds its share of the whole cache (at peak footprints), give or take a
        // request, whatever the other holds.
        let [front, back] = s.load_kv_tokens();
        assert!(
            front >= f * m - 1050.0 && front <= f * m + 1050.0 + 2100.0,
            "{front} vs {}",
            f * m
        );
        assert!(back >= (1.0 - f) * m - 2100.0, "{back}");
        // Finishing the front's requests frees its share, so the front goes next.
        for r in 0..500 {
            s.finished(r);
        }
        assert_eq!(s.load_kv_tokens()[0], 0.0);
        let next = s.pick(m).unwrap();
        assert!(next < 500, "{next}");
        // An overrun moves a front request's memory to the back.
        s.overran(next);
        assert_eq!(s.load_kv_tokens()[0], 0.0);
        assert!(s.load_kv_tokens()[1] > back);
    }

    #[test]
    fn pace_replaces_finishing_requests_at_each_ends_share() {
        let s = two_kinds();
        let m = 1e6;
        let f = s.front_share(m);
        // N = f M / (p + d/2) per end, finishing at N / (d + 1) a step, each computing p'.
        let expected = f * m / 1025.0 * 1000.0 / 51.0 + (1.0 - f) * m / 1100.0 * 100.0 / 2001.0;
        assert!((s.prefill_pace_tokens(m) / expected - 1.0).abs() < 1e-9);
    }

    #[test]
    fn single_cursor_takes_the_front_only() {
        let order = vec![req(0, 3.0, 1.0), req(1, 1.0, 3.0), req(2, 1.0, 3.0)];
        let mut s = DualScanner::new(
            order,
            shapes(3, 10.0, 10.0),
            SideRule::FrontOnly,
            StepMemory::default(),
        );
        let picks: Vec<u32> = std::iter::from_fn(|| s.pick(1e6)).collect();
        assert_eq!(picks, vec![0, 1, 2]);
    }
}
