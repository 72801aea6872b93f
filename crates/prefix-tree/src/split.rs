//! Conditional node splitting (BlendServe's Algorithm 2): a node whose density sits on the other
//! side of the workload's density from the subtree around it is moved out to the root, where the
//! layer-wise sort places it among its own kind, at the price of computing its prefix once more.
//! Splits are bought greedily, most misplaced demand per token of sharing lost first, within a
//! budget of sharing (by default 1% of what the tree saves), and the loop sort -> split -> sort
//! repeats until no split pays or the budget is spent.

use crate::annotate::{Demand, DemandModel, ResourceAnnotation};
use crate::tree::{NodeId, PrefixTree, RequestIndex, ROOT};

/// When to split a node out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitConfig {
    pub enabled: bool,
    /// Fraction of the tree's prefix sharing (saved prompt tokens) that splitting must keep.
    pub keep_sharing: f64,
    /// A node is misplaced when its density and its surroundings' differ by at least this factor
    /// and lie on opposite sides of the workload's density.
    pub min_density_ratio: f64,
    /// Sort -> split rounds at most.
    pub max_rounds: u32,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            enabled: true,
            keep_sharing: 0.99,
            min_density_ratio: 2.0,
            max_rounds: 4,
        }
    }
}

impl SplitConfig {
    pub const OFF: SplitConfig = SplitConfig {
        enabled: false,
        keep_sharing: 1.0,
        min_density_ratio: 2.0,
        max_rounds: 0,
    };
}

/// What splitting did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SplitReport {
    pub nodes_split: usize,
    /// Requests below a split node (moved with it).
    pub requests_split: usize,
    /// Prompt tokens the tree shares (saves) before splitting, and after.
    pub saved_tokens_before: u64,
    pub saved_tokens_after: u64,
    pub rounds: u32,
}

impl SplitReport {
    /// Fraction of the tree's sharing kept (1 where there was none).
    pub fn sharing_kept(&self) -> f64 {
        if self.saved_tokens_before == 0 {
            1.0
        } else {
            self.saved_tokens_after as f64 / self.saved_tokens_before as f64
        }
    }
}

/// The tree as the scanner sees it: which nodes sit at the root, and the demand of every unit.
#[derive(Clone, Debug)]
pub struct TreeLayout {
    /// Per node: split out to the root.
    pub split: Vec<bool>,
    pub split_nodes: Vec<NodeId>,
    /// Per node: its subtree's demand without the split-out nodes below it; for a split node,
    /// plus computing its prefix again.
    pub unit: Vec<Demand>,
    /// Per request: its share of the tree as laid out (see [`ResourceAnnotation::attributed`]).
    pub attributed: Vec<Demand>,
    pub report: SplitReport,
}

impl TreeLayout {
    /// The tree as built, nothing split.
    pub fn unsplit(tree: &PrefixTree, annotation: &ResourceAnnotation) -> TreeLayout {
        let saved = saved_tokens(tree);
        TreeLayout {
            split: vec![false; tree.nodes().len()],
            split_nodes: Vec::new(),
            unit: annotation.subtree.clone(),
            attributed: annotation.attributed.clone(),
            report: SplitReport {
                saved_tokens_before: saved,
                saved_tokens_after: saved,
                ..SplitReport::default()
            },
        }
    }

    /// Per request: the prompt tokens it is expected to compute itself, each edge above it
    /// divided among the requests below that edge (a split node's prefix among its own).
    pub fn attributed_prompt_tokens(&self, tree: &PrefixTree) -> Vec<f64> {
        let nodes = tree.nodes();
        let mut out = vec![0.0; tree.requests()];
        shares_from_root(
            tree,
            &tree.preorder(),
            &self.split,
            0.0,
            |id| nodes[id as usize].edge_tokens as f64,
            |id| nodes[nodes[id as usize].parent as usize].depth_tokens as f64,
            |r, share| out[r as usize] = share,
        );
        out
    }
}

/// Walks the tree top-down handing each request its share of the edges above it: an edge's
/// `edge(id)` divided among the requests below it, added to the parent's share, except that a
/// split node starts afresh with its recomputed prefix `prefix(id)` plus its edge. `visit(r,
/// share)` gets each request's share.
fn shares_from_root<T>(
    tree: &PrefixTree,
    preorder: &[NodeId],
    split: &[bool],
    zero: T,
    edge: impl Fn(NodeId) -> T,
    prefix: impl Fn(NodeId) -> T,
    mut visit: impl FnMut(RequestIndex, T),
) where
    T: Copy + std::ops::Add<Output = T> + std::ops::Mul<f64, Output = T>,
{
    let nodes = tree.nodes();
    let mut share_above = vec![zero; nodes.len()];
    for &id in preorder {
        let node = &nodes[id as usize];
        let per_request = 1.0 / f64::from(node.subtree_requests.max(1));
        let here = if id == ROOT {
            zero
        } else if split[id as usize] {
            (prefix(id) + edge(id)) * per_request
        } else {
            share_above[node.parent as usize] + edge(id) * per_request
        };
        share_above[id as usize] = here;
        for &r in &node.requests {
            visit(r, here);
        }
    }
}

/// Prompt tokens a perfect prefix cache saves on this tree: every edge computed once instead of
/// once per request below it.
fn saved_tokens(tree: &PrefixTree) -> u64 {
    tree.nodes()
        .iter()
        .skip(1)
        .map(|n| n.edge_tokens * u64::from(n.subtree_requests.saturating_sub(1)))
        .sum()
}

/// Splits misplaced nodes out to the root under `config` (see the module doc).
pub fn split_outliers(
    tree: &PrefixTree,
    annotation: &ResourceAnnotation,
    model: &dyn DemandModel,
    config: SplitConfig,
) -> TreeLayout {
    let mut layout = TreeLayout::unsplit(tree, annotation);
    if !config.enabled {
        return layout;
    }
    let nodes = tree.nodes();
    let preorder = tree.preorder();
    let root_density = annotation.total().density();
    let budget =
        ((1.0 - config.keep_sharing).max(0.0) * layout.report.saved_tokens_before as f64) as u64;
    let mut spent = 0u64;
    let prefix_demand = |id: NodeId| {
        model.prefill_demand(0, nodes[nodes[id as usize].parent as usize].depth_tokens)
    };
    let mut top = vec![ROOT; nodes.len()];
    let mut unit_taken = vec![false; nodes.len()];
    for round in 0..config.max_rounds {
        recompute_units(tree, annotation, &preorder, &mut layout, &prefix_demand);
        // The unit each node is sorted with at the root.
        for &id in &preorder {
            let parent = nodes[id as usize].parent;
            top[id as usize] = if id == ROOT || parent == ROOT || layout.split[id as usize] {
                id
            } else {
                top[parent as usize]
            };
        }
        let mut candidates: Vec<(f64, NodeId, u64)> = Vec::new();
        for &id in &preorder {
            let t = top[id as usize];
            if t == id {
                continue;
            }
            let own = layout.unit[id as usize];
            let rest = layout.unit[t as usize] - own;
            let (rho, rho_rest) = (own.density(), rest.density());
            let opposite = (rho - root_density) * (rho_rest - root_density) < 0.0;
            let ratio = (rho / rho_rest).max(rho_rest / rho);
            let weight = own.compute_secs + own.memory_secs;
            // An outlier is the minority of its surroundings; the majority stays put.
            let minority = weight <= rest.compute_secs + rest.memory_secs;
            let far_apart = ratio.is_finite() && ratio >= config.min_density_ratio;
            if !(opposite && minority && far_apart) {
                continue;
            }
            let cost = nodes[nodes[id as usize].parent as usize].depth_tokens;
            candidates.push((ratio.ln() * weight / (cost as f64 + 1.0), id, cost));
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        unit_taken.iter_mut().for_each(|c| *c = false);
        let mut any = false;
        for (_, id, cost) in candidates {
            if spent + cost > budget {
                continue;
            }
            // One split per unit and round: the unit's density changes with it, and a node
            // below one split this round (in the same unit) would have moved surroundings.
            let unit = top[id as usize] as usize;
            if unit_taken[unit] {
                continue;
            }
            unit_taken[unit] = true;
            layout.split[id as usize] = true;
            layout.split_nodes.push(id);
            spent += cost;
            any = true;
        }
        layout.report.rounds = round + 1;
        if !any {
            break;
        }
    }
    recompute_units(tree, annotation, &preorder, &mut layout, &prefix_demand);
    let mut moved = vec![false; nodes.len()];
    for &id in &preorder {
        moved[id as usize] =
            layout.split[id as usize] || (id != ROOT && moved[nodes[id as usize].parent as usize]);
    }
    layout.report.nodes_split = layout.split_nodes.len();
    layout.report.requests_split = preorder
        .iter()
        .filter(|&&id| moved[id as usize])
        .map(|&id| nodes[id as usize].requests.len())
        .sum();
    layout.report.saved_tokens_after = layout.report.saved_tokens_before.saturating_sub(spent);
    layout
}

/// Unit demands and per-request shares for the current split set: split subtrees leave their
/// ancestors' totals and carry their prefix's recomputation, shared among their requests.
fn recompute_units(
    tree: &PrefixTree,
    annotation: &ResourceAnnotation,
    preorder: &[NodeId],
    layout: &mut TreeLayout,
    prefix_demand: &dyn Fn(NodeId) -> Demand,
) {
    let nodes = tree.nodes();
    for &id in preorder.iter().rev() {
        let node = &nodes[id as usize];
        let mut total = annotation.edge[id as usize];
        total += node
            .requests
            .iter()
            .map(|&r| annotation.decode[r as usize])
            .sum();
        total += node
            .children
            .iter()
            .filter(|&&c| !layout.split[c as usize])
            .map(|&c| layout.unit[c as usize])
            .sum();
        if layout.split[id as usize] {
            total += prefix_demand(id);
        }
        layout.unit[id as usize] = total;
    }
    let attributed = &mut layout.attributed;
    shares_from_root(
        tree,
        preorder,
        &layout.split,
        Demand::ZERO,
        |id| annotation.edge[id as usize],
        prefix_demand,
        |r, share| attributed[r as usize] = share + annotation.decode[r as usize],
    );
}
