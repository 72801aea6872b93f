//! Property tests: every ordering is a permutation of the requests, and the tree's shared-prefix
//! accounting equals a brute-force count over all distinct prefixes.

use std::collections::HashSet;

use prefix_tree::{
    dfs_order, flat_density_order, resource_aware_order, split_outliers, ChildOrder, Demand,
    DemandModel, PrefixTree, ResourceAnnotation, SplitConfig, TreeLayout,
};
use proptest::prelude::*;
use workload::Chunk;

/// Prices prefill linearly plus a quadratic attention term, decode by context read.
struct ToyModel;

impl DemandModel for ToyModel {
    fn prefill_demand(&self, start: u64, len: u64) -> Demand {
        let attention = (len * start + len * (len + 1) / 2) as f64 * 1e-6;
        Demand::new(len as f64 * 1e-3 + attention, len as f64 * 1e-5)
    }
    fn decode_demand(&self, prompt: u64, out: u64) -> Demand {
        let reads = (out * prompt + out * out / 2) as f64;
        Demand::new(out as f64 * 1e-3, reads * 2e-5)
    }
}

fn prompts_strategy() -> impl Strategy<Value = Vec<Vec<Chunk>>> {
    // Few distinct chunk ids so that prompts share prefixes often; lengths tied to the id so
    // equal ids mean equal content.
    let chunk = (0u64..5).prop_map(|id| Chunk::new(id, 1 + (id as u32 * 7) % 13));
    prop::collection::vec(prop::collection::vec(chunk, 0..7), 0..60)
}

fn brute_force_unique_tokens(prompts: &[Vec<Chunk>]) -> u64 {
    let mut prefixes: HashSet<&[Chunk]> = HashSet::new();
    let mut unique = 0u64;
    for p in prompts {
        for k in 1..=p.len() {
            if prefixes.insert(&p[..k]) {
                unique += u64::from(p[k - 1].len_tokens);
            }
        }
    }
    unique
}

fn assert_permutation(order: impl IntoIterator<Item = u32>, n: usize) {
    let mut seen = vec![false; n];
    let mut count = 0;
    for r in order {
        assert!(!seen[r as usize], "request {r} appears twice");
        seen[r as usize] = true;
        count += 1;
    }
    assert_eq!(count, n, "some request is missing");
}

proptest! {
    #[test]
    fn orderings_are_permutations(prompts in prompts_strategy(), outs in prop::collection::vec(1u64..500, 60), fraction in 0.0f64..1.0) {
        let tree = PrefixTree::build(&prompts);
        let n = prompts.len();
        assert_permutation(dfs_order(&tree, ChildOrder::AsBuilt), n);
        assert_permutation(dfs_order(&tree, ChildOrder::LargestFirst), n);
        let annotation = ResourceAnnotation::compute(&tree, &ToyModel, &|r| outs[r as usize]);
        for split in [SplitConfig::OFF, SplitConfig { keep_sharing: 1.0 - fraction, ..SplitConfig::default() }] {
            let layout = split_outliers(&tree, &annotation, &ToyModel, split);
            assert_permutation(resource_aware_order(&tree, &annotation, &layout).iter().map(|o| o.request), n);
            // Splitting never costs more sharing than it was allowed to.
            prop_assert!(layout.report.sharing_kept() >= split.keep_sharing - 1e-9,
                "kept {} < {}", layout.report.sharing_kept(), split.keep_sharing);
            prop_assert!(layout.report.requests_split <= n);
            prop_assert_eq!(layout.split_nodes.len(), layout.report.nodes_split);
        }
        assert_permutation(flat_density_order(&annotation).iter().map(|o| o.request), n);
    }

    #[test]
    fn shared_prefix_accounting_matches_brute_force(prompts in prompts_strategy()) {
        let tree = PrefixTree::build(&prompts);
        let total: u64 = prompts.iter().flatten().map(|c| u64::from(c.len_tokens)).sum();
        prop_assert_eq!(tree.total_prompt_tokens(), total);
        prop_assert_eq!(tree.unique_prompt_tokens(), brute_force_unique_tokens(&prompts));
        prop_assert_eq!(tree.root().shared_tokens(), total - brute_force_unique_tokens(&prompts));
        for (r, p) in prompts.iter().enumerate() {
            let leaf = tree.node(tree.leaf_of(r as u32));
            let len: u64 = p.iter().map(|c| u64::from(c.len_tokens)).sum();
            prop_assert_eq!(leaf.depth_tokens, len);
            prop_assert!(leaf.requests.contains(&(r as u32)));
        }
        // Every subtree's unique tokens: brute force over the requests below it.
        for (id, node) in tree.nodes().iter().enumerate() {
            let below: Vec<Vec<Chunk>> = (0..prompts.len())
                .filter(|&r| tree.path_to(tree.leaf_of(r as u32)).contains(&(id as u32)))
                .map(|r| prompts[r].clone())
                .collect();
            prop_assert_eq!(below.len() as u32, node.subtree_requests);
            let parent_chunks = if id == 0 { 0 } else { tree.node(node.parent).depth_chunks as usize };
            let suffixes: Vec<Vec<Chunk>> = below.iter().map(|p| p[parent_chunks..].to_vec()).collect();
            prop_assert_eq!(node.subtree_unique_tokens, brute_force_unique_tokens(&suffixes));
        }
    }

    #[test]
    fn annotation_adds_up(prompts in prompts_strategy(), outs in prop::collection::vec(1u64..500, 60)) {
        let tree = PrefixTree::build(&prompts);
        let annotation = ResourceAnnotation::compute(&tree, &ToyModel, &|r| outs[r as usize]);
        let attributed: Demand = annotation.attributed.iter().copied().sum();
        let total = annotation.total();
        prop_assert!((attributed.compute_secs - total.compute_secs).abs() <= 1e-9 * (1.0 + total.compute_secs));
        prop_assert!((attributed.memory_secs - total.memory_secs).abs() <= 1e-9 * (1.0 + total.memory_secs));
    }

    #[test]
    fn dfs_keeps_subtrees_contiguous(prompts in prompts_strategy()) {
        let tree = PrefixTree::build(&prompts);
        let order = dfs_order(&tree, ChildOrder::LargestFirst);
        let mut position = vec![0usize; prompts.len()];
        for (i, &r) in order.iter().enumerate() { position[r as usize] = i; }
        for (id, node) in tree.nodes().iter().enumerate() {
            let members: Vec<usize> = (0..prompts.len())
                .filter(|&r| tree.path_to(tree.leaf_of(r as u32)).contains(&(id as u32)))
                .map(|r| position[r])
                .collect();
            if let (Some(lo), Some(hi)) = (members.iter().min(), members.iter().max()) {
                prop_assert_eq!(hi - lo + 1, node.subtree_requests as usize);
            }
        }
    }
}

#[test]
fn resource_aware_order_puts_compute_heavy_first() {
    // Four unrelated requests: long prompt/short output is compute-heavy; short prompt/long
    // output memory-heavy.
    let prompts = vec![
        vec![Chunk::new(1, 10)],
        vec![Chunk::new(2, 4000)],
        vec![Chunk::new(3, 20)],
        vec![Chunk::new(4, 2000)],
    ];
    let outs = [2000u64, 2, 3000, 10];
    let tree = PrefixTree::build(&prompts);
    let annotation = ResourceAnnotation::compute(&tree, &ToyModel, &|r| outs[r as usize]);
    let layout = TreeLayout::unsplit(&tree, &annotation);
    let order: Vec<u32> = resource_aware_order(&tree, &annotation, &layout)
        .iter()
        .map(|o| o.request)
        .collect();
    assert_eq!(order, vec![1, 3, 0, 2]);
}

#[test]
fn splitting_moves_a_misplaced_request_to_its_kind() {
    // Under one short shared prefix, three compute-heavy requests and one memory-heavy one (3);
    // beside them a request in between (5) and an unrelated memory-heavy one (4). Unsplit, 3
    // stays inside the compute-heavy subtree, ahead of 5; split (its 8-token prefix is well
    // within 1% of the sharing of the big block below), it joins its kind behind 5.
    let shared = Chunk::new(9, 8);
    let big = Chunk::new(8, 50_000);
    let prompts = vec![
        vec![shared, big, Chunk::new(1, 4000)],
        vec![shared, big, Chunk::new(2, 4000)],
        vec![shared, big, Chunk::new(3, 4000)],
        vec![shared, Chunk::new(4, 10)],
        vec![Chunk::new(5, 10)],
        vec![Chunk::new(6, 1000)],
    ];
    let outs = [2u64, 2, 2, 5000, 6000, 300];
    let tree = PrefixTree::build(&prompts);
    let annotation = ResourceAnnotation::compute(&tree, &ToyModel, &|r| outs[r as usize]);
    let position = |layout: &TreeLayout, r: u32| -> usize {
        resource_aware_order(&tree, &annotation, layout)
            .iter()
            .position(|o| o.request == r)
            .unwrap()
    };
    let unsplit = TreeLayout::unsplit(&tree, &annotation);
    assert!(position(&unsplit, 3) < position(&unsplit, 5));
    let layout = split_outliers(&tree, &annotation, &ToyModel, SplitConfig::default());
    assert_eq!(layout.report.nodes_split, 1);
    assert_eq!(layout.report.requests_split, 1);
    assert!(layout.report.sharing_kept() >= 0.99);
    assert!(position(&layout, 3) > position(&layout, 5));
    // With no sharing to spare, nothing is split.
    let strict = SplitConfig {
        keep_sharing: 1.0,
        ..SplitConfig::default()
    };
    assert_eq!(
        split_outliers(&tree, &annotation, &ToyModel, strict)
            .report
            .nodes_split,
        0
    );
}
