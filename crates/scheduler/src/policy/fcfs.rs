use prefix_tree::RequestIndex;

use super::{BatchView, FixedOrder, Policy, PolicyInput};

/// First come, first served: submission order, as vLLM schedules. Prefix sharing happens only
/// when shared requests happen to be submitted close together.
pub struct FcfsPolicy {
    order: FixedOrder,
}

impl FcfsPolicy {
    pub fn new(input: &PolicyInput<'_>) -> Self {
        let n = input.preparation.tree.requests() as RequestIndex;
        FcfsPolicy {
            order: FixedOrder::new((0..n).collect()),
        }
    }
}

impl Policy for FcfsPolicy {
    fn name(&self) -> &str {
        "fcfs"
    }
    fn next(&mut self, _view: &BatchView) -> Option<RequestIndex> {
        self.order.next()
    }
    fn remaining(&self) -> usize {
        self.order.remaining()
    }
}
