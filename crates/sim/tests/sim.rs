//! The simulator driving the real scheduler: conservation, bound validity, prefix reuse,
//! rejections, preemption, and BlendServe's advantage on real trace blends.

use proptest::prelude::*;
use scheduler::{Executor, HardwareConfig, LengthKnowledge, ModelConfig, PolicyKind, TokenBudget};
use sim::{SimConfig, SimReport, Simulation};
use workload::generator::{generate, parse_mix, GeneratorConfig, SyntheticPrefix, TracePools};
use workload::traces::default_traces_dir;
use workload::{Chunk, Request, Workload};

fn config(executor: Executor) -> SimConfig {
    SimConfig::new(
        ModelConfig::preset("llama3-8b").unwrap(),
        HardwareConfig::preset("h100").unwrap(),
        executor,
    )
}

fn request(id: usize, prompt: Vec<Chunk>, output: u32) -> Request {
    Request {
        id: format!("r{id}"),
        prompt,
        max_tokens: 4096,
        output_tokens: Some(output),
        output_known: false,
        source: 0,
    }
}

fn run(workload: &Workload, config: SimConfig, policy: &str) -> SimReport {
    let simulation = Simulation::new(workload, config).unwrap();
    simulation
        .run(policy, &PolicyKind::parse(policy).unwrap(), &mut |_, _| {})
        .unwrap()
}

fn trace_blend(mix: &str, requests: usize, sharing: f64, seed: u64) -> Workload {
    let dir = default_traces_dir().expect("shared/traces must be present");
    let mix = parse_mix(mix).unwrap();
    let pools = TracePools::load_for_mix(&dir, &mix).unwrap();
    let config = GeneratorConfig {
        mix,
        requests,
        seed,
        synthetic_prefix: (sharing > 0.0).then_some(SyntheticPrefix {
            sharing_ratio: sharing,
            ..SyntheticPrefix::default()
        }),
        max_prompt_tokens: Some(32_768),
        max_tokens: 4096,
    };
    generate(&config, &pools).unwrap().0
}

/// Small random workloads with shared prefixes.
fn workload_strategy() -> impl Strategy<Value = Workload> {
    let req = (0u64..4, 1u32..6, 1u32..3000, 1u32..400);
    prop::collection::vec(req, 1..40).prop_map(|rows| Workload {
        requests: rows
            .into_iter()
            .enumerate()
            .map(|(i, (group, shared_blocks, unique, output))| {
                let mut prompt: Vec<Chunk> = (0..shared_blocks)
                    .map(|k| Chunk::new(1000 * (group + 1) + u64::from(k), 64))
                    .collect();
                prompt.push(Chunk::new(1 << 40 | i as u64, unique));
                request(i, prompt, output)
            })
            .collect(),
        sources: vec!["test".into()],
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every request finishes with exactly its output, no step exceeds its limits, and no
    /// policy under any executor beats the optimal bound.
    #[test]
    fn conservation_and_bound(workload in workload_strategy(), budget in 64u32..4096, max_running in 1u32..64, small_kv in any::<bool>()) {
        let expected_output: u64 = workload.requests.iter().map(|r| u64::from(r.sim_output_tokens())).sum();
        let expected_prompt: u64 = workload.requests.iter().map(Request::prompt_tokens).sum();
        for executor in [Executor::Sequential, Executor::Overlapped, Executor::Partial { overlap_efficiency: 0.5 }] {
            let mut c = config(executor);
            c.scheduler.max_batch_tokens = budget;
            c.scheduler.max_running = max_running;
            if small_kv {
                // 4,800 tokens of KV: forces preemption and recomputation.
                c.num_gpu_blocks_override = Some(300);
            }
            for policy in ["fcfs", "random", "dfs", "blendserve", "blendserve-flat"] {
                let simulation = Simulation::new(&workload, c.clone()).unwrap();
                let report = simulation.run(policy, &PolicyKind::parse(policy).unwrap(), &mut |_, _| {}).unwrap();
                prop_assert_eq!(report.finished as usize + report.rejected as usize, workload.len());
                if report.rejected == 0 {
                    prop_assert_eq!(report.output_tokens, expected_output);
                    prop_assert_eq!(report.prompt_tokens, expected_prompt);
                    prop_assert!(report.makespan_secs >= simulation.bound().secs * (1.0 - 1e-9),
                        "{} under {}: {} < bound {}", policy, executor, report.makespan_secs, simulation.bound().secs);
                }
            }
        }
    }
}

#[test]
fn prefix_cache_serves_shared_prompts_once() {
    // 50 requests, all behind one 4096-token system prompt.
    let shared = Chunk::new(7, 4096);
    let workload = Workload {
        requests: (0..50)
            .map(|i| request(i, vec![shared, Chunk::new(100 + i as u64, 100)], 20))
            .collect(),
        sources: vec!["t".into()],
    };
    let with_cache = run(&workload, config(Executor::Sequential), "dfs");
    // Request 0 computes the prefix; the others wait for it rather than compute it again beside
    // it (it is in flight), then find its 256 blocks.
    let expected = 49.0 * 4096.0 / (50.0 * 4196.0);
    assert!(
        (with_cache.prefix_hit_ratio - expected).abs() < 0.01,
        "{}",
        with_cache.prefix_hit_ratio
    );
    let mut no_cache = config(Executor::Sequential);
    no_cache.scheduler.enable_prefix_caching = false;
    let without = run(&workload, no_cache, "dfs");
    assert_eq!(without.prefix_hit_ratio, 0.0);
    assert!(without.makespan_secs > 5.0 * with_cache.makespan_secs);
}

#[test]
fn too_long_prompts_are_rejected_and_the_rest_finish() {
    let mut c = config(Executor::Overlapped);
    c.model.max_context_tokens = 2048;
    let workload = Workload {
        requests: vec![
            request(0, vec![Chunk::new(1, 100)], 10),
            request(1, vec![Chunk::new(2, 5000)], 10),
            request(2, vec![Chunk::new(3, 2040)], 50),
        ],
        sources: vec!["t".into()],
    };
    let report = run(&workload, c, "blendserve");
    assert_eq!(report.rejected, 1);
    assert_eq!(report.finished, 2);
    assert_eq!(report.rejections[0].0, 1);
    assert!(report.rejections[0].1.to_string().contains("5000 tokens"));
    // Request 2 stops at the context length: 2040 + 8 = 2048 tokens.
    assert_eq!(report.output_tokens, 10 + 8);
}

#[test]
fn kv_pressure_preempts_and_recomputes_without_losing_tokens() {
    let mut c = config(Executor::Sequential);
    c.scheduler.token_budget = TokenBudget::Fixed;
    c.scheduler.reserve_ratio_init = 0.0;
    c.scheduler.reserve_ratio_min = 0.0;
    c.scheduler.watermark_fraction = 0.0;
    // KV for 20k tokens; 40 requests that each grow to 1,500.
    c.num_gpu_blocks_override = Some(1250);
    let workload = Workload {
        requests: (0..40)
            .map(|i| request(i, vec![Chunk::new(i as u64, 500)], 1000))
            .collect(),
        sources: vec!["t".into()],
    };
    let simulation = Simulation::new(&workload, c).unwrap();
    assert_eq!(simulation.kv_config().num_blocks, 1250);
    let report = simulation
        .run("fcfs", &PolicyKind::Fcfs, &mut |_, _| {})
        .unwrap();
    assert!(report.preemptions > 0);
    assert_eq!(report.finished, 40);
    assert_eq!(report.output_tokens, 40 * 1000);
}

#[test]
fn known_lengths_and_sampled_estimates_both_run() {
    let workload = trace_blend("azure-code=1,azure-conv=1", 600, 0.5, 5);
    for lengths in [
        LengthKnowledge::Known,
        LengthKnowledge::default(),
        LengthKnowledge::MaxTokens,
    ] {
        let mut c = config(Executor::Overlapped);
        c.lengths = lengths;
        let report = run(&workload, c, "blendserve");
        assert_eq!(report.finished, 600);
    }
}

/// The engine's way: the length sample runs alone first. Every request still finishes with its
/// tokens, the sample's phase costs time (a small batch of long decodes), and a rejected
/// request keeps its own index.
#[test]
fn the_length_sample_phase_costs_time_and_loses_nothing() {
    let mut workload = trace_blend("azure-code=1,azure-conv=1", 600, 0.5, 5);
    workload.requests[17].prompt = vec![Chunk::new(workload::Namespace::Unique.id(1 << 40), 9000)];
    let mut c = config(Executor::Sequential);
    c.model.max_context_tokens = 8192;
    c.lengths = LengthKnowledge::default();
    let free = run(&workload, c.clone(), "blendserve");
    c.length_sample_phase = true;
    let phased = run(&workload, c, "blendserve");
    assert_eq!(phased.finished, free.finished);
    assert_eq!(phased.finished, 599);
    assert_eq!(phased.output_tokens, free.output_tokens);
    assert_eq!(phased.prompt_tokens, free.prompt_tokens);
    assert_eq!(phased.rejections.len(), 1);
    assert_eq!(phased.rejections[0].0, 17);
    assert!(
        phased.makespan_secs > free.makespan_secs,
        "{} <= {}",
        phased.makespan_secs,
        free.makespan_secs
    );
}

/// The acceptance check of the policy core: on real traces blended into compute-heavy and
/// memory-heavy mixes with prefix sharing, BlendServe (as designed: resource-aware tree, dual
/// scanner, balanced steps) beats FCFS (vLLM-like) and DFS (SGLang-like) as those systems
/// schedule, under the overlap executor; and stays within the bound.
#[test]
fn blendserve_beats_fcfs_and_dfs_under_overlap_on_trace_blends() {
    for (mix, seed) in [
        ("azure-code=1,azure-conv[out>=256]=1", 11),
        ("azure-code=1,azure-conv=1,mooncake=1", 12),
    ] {
        let workload = trace_blend(mix, 1500, 0.5, seed);
        let c = config(Executor::Overlapped);
        let simulation = Simulation::new(&workload, c).unwrap();
        let mut tput = std::collections::HashMap::new();
        for policy in ["fcfs", "dfs", "blendserve"] {
            let r = simulation
                .run(policy, &PolicyKind::parse(policy).unwrap(), &mut |_, _| {})
                .unwrap();
            assert!(r.percent_of_optimal <= 100.0 + 1e-9);
            tput.insert(policy, r.total_tokens_per_sec);
        }
        let gain_fcfs = tput["blendserve"] / tput["fcfs"];
        let gain_dfs = tput["blendserve"] / tput["dfs"];
        assert!(
            gain_fcfs > 1.1 && gain_dfs > 1.1,
            "{mix}: blendserve/fcfs {gain_fcfs:.3}, blendserve/dfs {gain_dfs:.3}"
        );
    }
}

#[test]
fn simulation_is_deterministic() {
    let workload = trace_blend("azure-conv=1,mooncake=1", 300, 0.3, 9);
    let a = run(&workload, config(Executor::Overlapped), "blendserve");
    let b = run(&workload, config(Executor::Overlapped), "blendserve");
    assert_eq!(a.makespan_secs, b.makespan_secs);
    assert_eq!(a.steps, b.steps);
}
