//! One batch formation (schedule + complete) with 1024 running sequences in steady decode
//! (target: under 1 ms), and the steps of a real trace blend.
//!
//! Both use `iter_custom`: the scheduler's state moves on with every step, so each measured
//! stretch starts from a fresh scheduler, warmed up outside the timing, and stays short enough
//! that the state it measures does not drift (KV stays far from full, the run does not end).

use std::time::{Duration, Instant};

use blendserve_benches::{h100_llama3_8b, trace_workload};
use criterion::{criterion_group, criterion_main, Criterion};
use kv_cache::KvCacheConfig;
use scheduler::{
    LengthKnowledge, PerfModel, PolicyInput, PolicyKind, Preparation, RequestEstimates, Scheduler,
    SchedulerConfig, TokenBudget,
};
use workload::{Chunk, Request, Workload};

/// Steps measured per fresh scheduler.
const STRETCH: u64 = 500;

fn scheduler<'w>(
    workload: &'w Workload,
    prep: &Preparation,
    perf: &PerfModel,
    config: SchedulerConfig,
    kv: KvCacheConfig,
    estimated_output: Vec<u32>,
) -> Scheduler<'w> {
    let kind = PolicyKind::parse("blendserve").expect("registered");
    Scheduler::new(
        workload,
        config,
        kv,
        131_072,
        kind.build(&PolicyInput {
            preparation: prep,
            perf,
            seed: 0,
        }),
        RequestEstimates {
            demand: prep.annotation.attributed.clone(),
            output_tokens: estimated_output,
        },
        Some(perf.clone()),
    )
    .expect("valid config")
}

fn steady_decode(c: &mut Criterion) {
    let perf = h100_llama3_8b();
    // 1100 requests of 1000-token prompts (16 shared system prompts) that never finish here.
    let workload = Workload {
        requests: (0..1100u64)
            .map(|i| Request {
                id: i.to_string(),
                prompt: vec![Chunk::new(i % 16, 512), Chunk::new(1 << 40 | i, 488)],
                max_tokens: 100_000,
                output_tokens: Some(100_000),
                output_known: false,
                source: 0,
            })
            .collect(),
        sources: vec!["bench".into()],
    };
    let prep = Preparation::new(&workload, &perf, LengthKnowledge::Known, 0);
    let kv = KvCacheConfig {
        block_tokens: 16,
        num_blocks: 400_000,
        bytes_per_token: 131_072,
        enable_prefix_caching: true,
    };
    for (label, budget) in [
        ("fixed", TokenBudget::Fixed),
        (
            "balanced",
            TokenBudget::Balanced {
                target_density: 1.0,
                min_prefill_tokens: 64,
            },
        ),
    ] {
        let config = SchedulerConfig {
            max_running: 1024,
            token_budget: budget,
            ..SchedulerConfig::default()
        };
        c.bench_function(&format!("batch_formation_1024_decoding_{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    // Expect 1000 more tokens each, so admission makes room for all 1024.
                    let mut s = scheduler(
                        &workload,
                        &prep,
                        &perf,
                        config.clone(),
                        kv,
                        vec![1000; workload.len()],
                    );
                    let mut warmup = 0;
                    while s.running().len() < 1024 || s.prefilling() > 0 {
                        let plan = s.schedule();
                        s.complete_step(&plan, |_, _| false);
                        warmup += 1;
                        assert!(warmup < 100_000, "never reached 1024 decoding sequences");
                    }
                    let n = STRETCH.min(iters - done);
                    let start = Instant::now();
                    for _ in 0..n {
                        let plan = s.schedule();
                        assert_eq!(plan.items.len(), 1024);
                        s.complete_step(&plan, |_, _| false);
                    }
                    total += start.elapsed();
                    done += n;
                }
                total
            })
        });
    }
}

fn trace_steps(c: &mut Criterion) {
    // Steps of a real blend, from the start of the run, at whatever mix of prefill and decode
    // the run reaches in its first STRETCH steps.
    let perf = h100_llama3_8b();
    let workload = trace_workload(20_000, 2);
    let prep = Preparation::new(&workload, &perf, LengthKnowledge::default(), 0);
    let targets: Vec<u32> = workload
        .requests
        .iter()
        .map(Request::sim_output_tokens)
        .collect();
    let kv = KvCacheConfig {
        block_tokens: 16,
        num_blocks: 25_000,
        bytes_per_token: 131_072,
        enable_prefix_caching: true,
    };
    c.bench_function("batch_formation_trace_blend", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let mut s = scheduler(
                    &workload,
                    &prep,
                    &perf,
                    SchedulerConfig::default(),
                    kv,
                    prep.estimated_output_tokens.clone(),
                );
                let n = STRETCH.min(iters - done);
                let start = Instant::now();
                for _ in 0..n {
                    let plan = s.schedule();
                    s.complete_step(&plan, |r, g| g >= targets[r as usize]);
                }
                total += start.elapsed();
                assert!(!s.is_done(), "the run must outlast the stretch");
                done += n;
            }
            total
        })
    });
}

criterion_group!(benches, steady_decode, trace_steps);
criterion_main!(benches);
