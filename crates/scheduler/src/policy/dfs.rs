use prefix_tree::{dfs_order, ChildOrder, RequestIndex};

use super::{BatchView, FixedOrder, Policy, PolicyInput};

/// Depth-first over the prefix tree, larger subtrees first: what SGLang's longest-prefix-match
/// scheduling converges to when the whole workload is queued. Best prefix reuse, no regard for
/// resource mix.
pub struct DfsPolicy {
    order: FixedOrder,
}

impl DfsPolicy {
    pub fn new(input: &PolicyInput<'_>) -> Self {
        DfsPolicy {
            order: FixedOrder::new(dfs_order(&input.preparation.tree, ChildOrder::LargestFirst)),
        }
    }
}

impl Policy for DfsPolicy {
    fn name(&self) -> &str {
        "dfs"
    }
    fn next(&mut self, _view: &BatchView) -> Option<RequestIndex> {
        self.order.next()
    }
    fn remaining(&self) -> usize {
        self.order.remaining()
    }
}
