//! Radix tree over chunked token sequences, annotated with resource demand, and the request
//! orderings built on it.
//!
//! Owns: tree construction (compressed edges, built from millions of prompts by sorting), the
//! per-node aggregates (requests, unique and shared prompt tokens, compute and memory demand),
//! and orderings: plain DFS (SGLang-like, prefix locality only) and BlendServe's resource-aware
//! order (children sorted by compute density layer by layer, after conditional node splitting
//! has moved misplaced nodes out to the root within a budget of lost sharing).
//!
//! Must not touch: costs themselves (a [`DemandModel`] supplied by the scheduler prices tokens),
//! KV memory, batches or time.

mod annotate;
mod order;
mod split;
mod tree;

pub use annotate::{Demand, DemandModel, ResourceAnnotation};
pub use order::{dfs_order, flat_density_order, resource_aware_order, ChildOrder, OrderedRequest};
pub use split::{split_outliers, SplitConfig, SplitReport, TreeLayout};
pub use tree::{Node, NodeId, PrefixTree, RequestIndex, ROOT};
