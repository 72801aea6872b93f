use crate::annotate::{Demand, ResourceAnnotation};
use crate::tree::{NodeId, PrefixTree, RequestIndex, ROOT};

/// How a DFS visits the children of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildOrder {
    /// Lexicographic by first chunk (the order the tree was built in).
    AsBuilt,
    /// Larger subtrees (more requests) first, as SGLang's DFS-weight policy does.
    LargestFirst,
}

/// Requests in depth-first order: every request's prefix neighbours run next to it. The requests
/// ending at a node come before its children.
pub fn dfs_order(tree: &PrefixTree, child_order: ChildOrder) -> Vec<RequestIndex> {
    let mut out = Vec::with_capacity(tree.requests());
    let mut stack = vec![ROOT];
    let mut children: Vec<NodeId> = Vec::new();
    while let Some(id) = stack.pop() {
        let node = tree.node(id);
        out.extend_from_slice(&node.requests);
        children.clear();
        children.extend_from_slice(&node.children);
        if child_order == ChildOrder::LargestFirst {
            children.sort_by_key(|&c| std::cmp::Reverse(tree.node(c).subtree_requests));
        }
        stack.extend(children.iter().rev());
    }
    out
}

/// BlendServe's tree transformation: a node whose sharing saves less than
/// `min_saving_fraction` of its subtree's compute is dissolved, so that its children are sorted
/// among its siblings rather than kept together. Sharing is then left to the runtime prefix
/// cache, which still catches it when the pieces happen to run close together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelaxConfig {
    pub enabled: bool,
    pub min_saving_fraction: f64,
}

impl Default for RelaxConfig {
    fn default() -> Self {
        RelaxConfig {
            enabled: true,
            min_saving_fraction: 0.1,
        }
    }
}

impl RelaxConfig {
    pub const OFF: RelaxConfig = RelaxConfig {
        enabled: false,
        min_saving_fraction: 0.0,
    };

    fn dissolves(&self, tree: &PrefixTree, annotation: &ResourceAnnotation, id: NodeId) -> bool {
        if !self.enabled || id == ROOT {
            return false;
        }
        let node = tree.node(id);
        if node.subtree_requests < 2 {
            return false;
        }
        let saved =
            f64::from(node.subtree_requests - 1) * annotation.edge[id as usize].compute_secs;
        saved < self.min_saving_fraction * annotation.subtree[id as usize].compute_secs
    }
}

/// A request in an ordering, with the demand attributed to it (its decode plus its share of the
/// prefix edges above it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrderedRequest {
    pub request: RequestIndex,
    pub demand: Demand,
}

#[derive(Clone, Copy)]
enum Unit {
    Request(RequestIndex),
    Node(NodeId),
}

/// BlendServe's resource-aware order: after the relaxation in `relax`, every node's children
/// (and the requests ending at it) are sorted by compute density, highest first, and visited
/// depth-first. Leaves thus run from compute-heavy (front) to memory-heavy (back) while each
/// kept subtree stays contiguous, so a scanner from either end keeps prefix locality.
pub fn resource_aware_order(
    tree: &PrefixTree,
    annotation: &ResourceAnnotation,
    relax: RelaxConfig,
) -> Vec<OrderedRequest> {
    let dissolved: Vec<bool> = (0..tree.nodes().len() as NodeId)
        .map(|id| relax.dissolves(tree, annotation, id))
        .collect();
    let mut out = Vec::with_capacity(tree.requests());
    let mut emit_stack: Vec<Unit> = vec![Unit::Node(ROOT)];
    let mut units: Vec<(Unit, f64)> = Vec::new();
    let mut gather: Vec<(NodeId, Demand)> = Vec::new();
    while let Some(unit) = emit_stack.pop() {
        let expand = match unit {
            Unit::Request(r) => {
                out.push(OrderedRequest {
                    request: r,
                    demand: annotation.attributed[r as usize],
                });
                continue;
            }
            Unit::Node(id) => id,
        };
        // Gather the units below `expand`, looking through dissolved nodes. `inherited` is the
        // per-request share of dissolved edges between `expand` and the unit.
        units.clear();
        gather.clear();
        for &r in &tree.node(expand).requests {
            units.push((Unit::Request(r), annotation.decode[r as usize].density()));
        }
        gather.extend(
            tree.node(expand)
                .children
                .iter()
                .map(|&c| (c, Demand::ZERO)),
        );
        while let Some((id, inherited)) = gather.pop() {
            let node = tree.node(id);
            if dissolved[id as usize] {
                let here = inherited
                    + annotation.edge[id as usize].scaled(1.0 / f64::from(node.subtree_requests));
                for &r in &node.requests {
                    units.push((
                        Unit::Request(r),
                        (annotation.decode[r as usize] + here).density(),
                    ));
                }
                gather.extend(node.children.iter().map(|&c| (c, here)));
            } else {
                let demand = annotation.subtree[id as usize]
                    + inherited.scaled(f64::from(node.subtree_requests));
                units.push((Unit::Node(id), demand.density()));
            }
        }
        units.sort_by(|a, b| b.1.total_cmp(&a.1));
        emit_stack.extend(units.iter().rev().map(|&(u, _)| u));
    }
    out
}

/// Requests sorted by attributed density alone, ignoring prefix locality (an ablation: what the
/// dual scanner does without the tree).
pub fn flat_density_order(annotation: &ResourceAnnotation) -> Vec<OrderedRequest> {
    let mut out: Vec<OrderedRequest> = annotation
        .attributed
        .iter()
        .enumerate()
        .map(|(r, &demand)| OrderedRequest {
            request: r as RequestIndex,
            demand,
        })
        .collect();
    out.sort_by(|a, b| b.demand.density().total_cmp(&a.demand.density()));
    out
}
