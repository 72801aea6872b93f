use crate::annotate::{Demand, ResourceAnnotation};
use crate::split::TreeLayout;
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

/// BlendServe's resource-aware order over a tree whose `layout` says which nodes were split out
/// to the root ([`crate::split_outliers`]): every node's children (and the requests ending at
/// it) are sorted by compute density, highest first, and visited depth-first; split nodes sort
/// among the root's children. Leaves thus run from compute-heavy (front) to memory-heavy (back)
/// while each subtree stays contiguous, so a scanner from either end keeps prefix locality.
pub fn resource_aware_order(
    tree: &PrefixTree,
    annotation: &ResourceAnnotation,
    layout: &TreeLayout,
) -> Vec<OrderedRequest> {
    let mut out = Vec::with_capacity(tree.requests());
    let mut emit_stack: Vec<Unit> = vec![Unit::Node(ROOT)];
    let mut units: Vec<(Unit, f64)> = Vec::new();
    while let Some(unit) = emit_stack.pop() {
        let id = match unit {
            Unit::Request(r) => {
                out.push(OrderedRequest {
                    request: r,
                    demand: layout.attributed[r as usize],
                });
                continue;
            }
            Unit::Node(id) => id,
        };
        units.clear();
        let node = tree.node(id);
        for &r in &node.requests {
            units.push((Unit::Request(r), annotation.decode[r as usize].density()));
        }
        let children = node.children.iter().filter(|&&c| !layout.split[c as usize]);
        let split_out = if id == ROOT {
            layout.split_nodes.as_slice()
        } else {
            &[]
        };
        for &c in children.chain(split_out) {
            units.push((Unit::Node(c), layout.unit[c as usize].density()));
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
