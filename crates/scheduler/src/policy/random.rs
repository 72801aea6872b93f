use prefix_tree::RequestIndex;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{FixedOrder, PolicyInput};

/// A seeded random order: the floor any policy should beat.
pub fn random_policy(input: &PolicyInput<'_>) -> FixedOrder {
    let n = input.preparation.tree.requests() as RequestIndex;
    let mut order: Vec<RequestIndex> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(input.seed));
    FixedOrder::new("random", order)
}
