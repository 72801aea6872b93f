use prefix_tree::RequestIndex;

use super::{FixedOrder, PolicyInput};

/// First come, first served: submission order, as vLLM schedules. Prefix sharing happens only
/// when shared requests happen to be submitted close together.
pub fn fcfs_policy(input: &PolicyInput<'_>) -> FixedOrder {
    let n = input.preparation.tree.requests() as RequestIndex;
    FixedOrder::new("fcfs", (0..n).collect())
}
