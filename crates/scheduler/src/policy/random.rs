use prefix_tree::RequestIndex;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{BatchView, FixedOrder, Policy, PolicyInput};

/// A seeded random order: the floor any policy should beat.
pub struct RandomPolicy {
    order: FixedOrder,
}

impl RandomPolicy {
    pub fn new(input: &PolicyInput<'_>) -> Self {
        let n = input.preparation.tree.requests() as RequestIndex;
        let mut order: Vec<RequestIndex> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(input.seed));
        RandomPolicy {
            order: FixedOrder::new(order),
        }
    }
}

impl Policy for RandomPolicy {
    fn name(&self) -> &str {
        "random"
    }
    fn next(&mut self, _view: &BatchView) -> Option<RequestIndex> {
        self.order.next()
    }
    fn remaining(&self) -> usize {
        self.order.remaining()
    }
}
