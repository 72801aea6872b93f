use prefix_tree::{dfs_order, ChildOrder};

use super::{FixedOrder, PolicyInput};

/// Depth-first over the prefix tree, larger subtrees first: what SGLang's longest-prefix-match
/// scheduling converges to when the whole workload is queued. Best prefix reuse, no regard for
/// resource mix.
pub fn dfs_policy(input: &PolicyInput<'_>) -> FixedOrder {
    FixedOrder::new(
        "dfs",
        dfs_order(&input.preparation.tree, ChildOrder::LargestFirst),
    )
}
