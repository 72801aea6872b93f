//! Tree build, orderings, and the whole offline scheduling pass (the target: 1M requests in
//! under 5 s on 2 cores).

use blendserve_benches::{h100_llama3_8b, trace_workload};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use prefix_tree::{
    dfs_order, resource_aware_order, split_outliers, ChildOrder, PrefixTree, SplitConfig,
};
use scheduler::{LengthKnowledge, PolicyInput, PolicyKind, Preparation};

fn tree(c: &mut Criterion) {
    let perf = h100_llama3_8b();
    let mut group = c.benchmark_group("prefix_tree");
    group.sample_size(10);
    for n in [10_000usize, 100_000, 1_000_000] {
        let workload = trace_workload(n, 1);
        let prompts: Vec<&[workload::Chunk]> = workload
            .requests
            .iter()
            .map(|r| r.prompt.as_slice())
            .collect();
        group.bench_with_input(BenchmarkId::new("build", n), &prompts, |b, p| {
            b.iter(|| PrefixTree::build(p))
        });
        let prep = Preparation::new(&workload, &perf, LengthKnowledge::default(), 1);
        group.bench_with_input(BenchmarkId::new("dfs_order", n), &prep, |b, p| {
            b.iter(|| dfs_order(&p.tree, ChildOrder::LargestFirst))
        });
        group.bench_with_input(
            BenchmarkId::new("resource_aware_order", n),
            &prep,
            |b, p| {
                b.iter(|| {
                    let layout =
                        split_outliers(&p.tree, &p.annotation, &perf, SplitConfig::default());
                    resource_aware_order(&p.tree, &p.annotation, &layout)
                })
            },
        );
        // Everything a BlendServe run does before its first step: tree, sampled length
        // estimates, annotation, ordering and scanner.
        group.bench_with_input(
            BenchmarkId::new("schedule_offline_blendserve", n),
            &workload,
            |b, w| {
                b.iter(|| {
                    let prep = Preparation::new(w, &perf, LengthKnowledge::default(), 1);
                    let kind = PolicyKind::parse("blendserve").expect("registered");
                    let policy = kind.build(&PolicyInput {
                        preparation: &prep,
                        perf: &perf,
                        seed: 1,
                    });
                    (prep.tree.nodes().len(), policy.remaining())
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, tree);
criterion_main!(benches);
