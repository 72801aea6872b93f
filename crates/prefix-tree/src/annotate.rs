use crate::tree::{NodeId, PrefixTree, RequestIndex, ROOT};

/// Time a piece of work needs from each of the two resources, if it had the GPU to itself.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Demand {
    /// Seconds of arithmetic (matrix units) at the achievable rate.
    pub compute_secs: f64,
    /// Seconds of device-memory traffic at the achievable bandwidth.
    pub memory_secs: f64,
}

impl Demand {
    pub const ZERO: Demand = Demand {
        compute_secs: 0.0,
        memory_secs: 0.0,
    };

    pub fn new(compute_secs: f64, memory_secs: f64) -> Self {
        Demand {
            compute_secs,
            memory_secs,
        }
    }

    /// Compute density: compute seconds per memory second. Above 1 the work is compute-bound,
    /// below 1 memory-bound, on the hardware whose rates priced it.
    pub fn density(&self) -> f64 {
        if self.memory_secs > 0.0 {
            self.compute_secs / self.memory_secs
        } else if self.compute_secs > 0.0 {
            f64::INFINITY
        } else {
            1.0
        }
    }

    pub fn scaled(self, factor: f64) -> Demand {
        Demand::new(self.compute_secs * factor, self.memory_secs * factor)
    }
}

impl std::ops::Add for Demand {
    type Output = Demand;
    fn add(self, o: Demand) -> Demand {
        Demand::new(
            self.compute_secs + o.compute_secs,
            self.memory_secs + o.memory_secs,
        )
    }
}

impl std::ops::Mul<f64> for Demand {
    type Output = Demand;
    fn mul(self, factor: f64) -> Demand {
        self.scaled(factor)
    }
}

impl std::ops::AddAssign for Demand {
    fn add_assign(&mut self, o: Demand) {
        *self = *self + o;
    }
}

impl std::ops::Sub for Demand {
    type Output = Demand;
    fn sub(self, o: Demand) -> Demand {
        Demand::new(
            self.compute_secs - o.compute_secs,
            self.memory_secs - o.memory_secs,
        )
    }
}

impl std::iter::Sum for Demand {
    fn sum<I: Iterator<Item = Demand>>(iter: I) -> Demand {
        iter.fold(Demand::ZERO, |a, b| a + b)
    }
}

/// Prices tokens. Implemented by the scheduler's performance model; the tree only adds up.
pub trait DemandModel {
    /// Demand of prefilling tokens `[start_tokens, start_tokens + len_tokens)` of one sequence
    /// whose earlier tokens are already in the KV cache.
    fn prefill_demand(&self, start_tokens: u64, len_tokens: u64) -> Demand;
    /// Demand of generating `output_tokens` tokens after a prompt of `prompt_tokens` tokens
    /// (the first output token comes with the prefill and costs nothing here).
    fn decode_demand(&self, prompt_tokens: u64, output_tokens: u64) -> Demand;
}

/// Resource demand of every subtree and of every request, for one output-length estimate.
#[derive(Clone, Debug)]
pub struct ResourceAnnotation {
    /// Demand of prefilling each node's edge once.
    pub edge: Vec<Demand>,
    /// Demand of each whole subtree: every edge prefilled once, every request decoded.
    pub subtree: Vec<Demand>,
    /// Each request's decode demand.
    pub decode: Vec<Demand>,
    /// Each request's share of the tree: its decode, plus each edge on its path divided evenly
    /// among the requests below that edge. These add up to the root's subtree demand.
    pub attributed: Vec<Demand>,
}

impl ResourceAnnotation {
    /// Annotates `tree` using `model`, with `output_tokens(r)` the (estimated) output length of
    /// request `r`.
    pub fn compute(
        tree: &PrefixTree,
        model: &dyn DemandModel,
        output_tokens: &dyn Fn(RequestIndex) -> u64,
    ) -> ResourceAnnotation {
        let nodes = tree.nodes();
        let mut edge = vec![Demand::ZERO; nodes.len()];
        let mut subtree = vec![Demand::ZERO; nodes.len()];
        let mut decode = vec![Demand::ZERO; tree.requests()];
        let preorder = tree.preorder();
        for &id in &preorder {
            let node = &nodes[id as usize];
            if id != ROOT {
                edge[id as usize] =
                    model.prefill_demand(node.depth_tokens - node.edge_tokens, node.edge_tokens);
            }
            for &r in &node.requests {
                decode[r as usize] = model.decode_demand(node.depth_tokens, output_tokens(r));
            }
        }
        for &id in preorder.iter().rev() {
            let node = &nodes[id as usize];
            let mut total = edge[id as usize];
            total += node.requests.iter().map(|&r| decode[r as usize]).sum();
            total += node.children.iter().map(|&c| subtree[c as usize]).sum();
            subtree[id as usize] = total;
        }
        // Per-request share of the edges above it, accumulated top-down.
        let mut share_above: Vec<Demand> = vec![Demand::ZERO; nodes.len()];
        let mut attributed = vec![Demand::ZERO; tree.requests()];
        for &id in &preorder {
            let node = &nodes[id as usize];
            let parent_share = if id == ROOT {
                Demand::ZERO
            } else {
                share_above[node.parent as usize]
            };
            let here = parent_share
                + edge[id as usize].scaled(1.0 / f64::from(node.subtree_requests.max(1)));
            share_above[id as usize] = here;
            for &r in &node.requests {
                attributed[r as usize] = here + decode[r as usize];
            }
        }
        ResourceAnnotation {
            edge,
            subtree,
            decode,
            attributed,
        }
    }

    /// Demand of the whole workload with perfect prefix sharing.
    pub fn total(&self) -> Demand {
        self.subtree[ROOT as usize]
    }

    pub fn subtree_density(&self, node: NodeId) -> f64 {
        self.subtree[node as usize].density()
    }
}
