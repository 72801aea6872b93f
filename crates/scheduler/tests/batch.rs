//! Batch formation driven step by step: every step respects its limits and leaves the KV cache
//! consistent; the output-length estimator learns per prefix group.

use kv_cache::KvCacheConfig;
use proptest::prelude::*;
use scheduler::{
    estimate_output_tokens, Executor, HardwareConfig, LengthKnowledge, ModelConfig, PerfModel,
    PolicyInput, PolicyKind, Preparation, RequestEstimates, Scheduler, SchedulerConfig,
    TokenBudget,
};
use workload::{Chunk, Request, Workload};

fn perf() -> PerfModel {
    PerfModel::new(
        ModelConfig::preset("llama3-8b").unwrap(),
        HardwareConfig::preset("h100").unwrap(),
        Executor::Overlapped,
    )
}

fn workload(rows: &[(u64, u32, u32)]) -> Workload {
    Workload {
        requests: rows
            .iter()
            .enumerate()
            .map(|(i, &(group, unique, output))| Request {
                id: i.to_string(),
                prompt: vec![
                    Chunk::new(group, 256),
                    Chunk::new(1 << 40 | i as u64, unique),
                ],
                max_tokens: 2048,
                output_tokens: Some(output),
                output_known: false,
                source: 0,
            })
            .collect(),
        sources: vec!["t".into()],
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn every_step_respects_limits(
        rows in prop::collection::vec((0u64..3, 1u32..2000, 1u32..300), 1..30),
        max_batch_tokens in 32u32..3000,
        max_running in 1u32..16,
        blocks in 200u32..2000,
        balanced in any::<bool>(),
        policy in prop::sample::select(vec!["fcfs", "random", "dfs", "blendserve", "blendserve-noscan"]),
    ) {
        let w = workload(&rows);
        let perf = perf();
        let prep = Preparation::new(&w, &perf, LengthKnowledge::default(), 1);
        let kind = PolicyKind::parse(policy).unwrap();
        let config = SchedulerConfig {
            max_batch_tokens,
            max_running,
            token_budget: if balanced {
                TokenBudget::Balanced { target_density: 1.0, min_prefill_tokens: 16 }
            } else {
                TokenBudget::Fixed
            },
            ..SchedulerConfig::default()
        };
        let kv = KvCacheConfig { block_tokens: 16, num_blocks: blocks, bytes_per_token: 1, enable_prefix_caching: true };
        let mut s = Scheduler::new(
            &w,
            config,
            kv,
            1 << 20,
            kind.build(&PolicyInput { preparation: &prep, perf: &perf, seed: 3 }),
            RequestEstimates {
                demand: prep.annotation.attributed.clone(),
                output_tokens: prep.estimated_output_tokens.clone(),
            },
            Some(perf.clone()),
        ).unwrap();
        let targets: Vec<u32> = w.requests.iter().map(Request::sim_output_tokens).collect();
        let mut steps = 0;
        while !s.is_done() {
            let plan = s.schedule();
            prop_assert!(plan.tokens() <= u64::from(max_batch_tokens));
            prop_assert!(s.running().len() <= max_running as usize);
            let mut seen = std::collections::HashSet::new();
            for item in &plan.items {
                prop_assert!(seen.insert(item.request), "request twice in one step");
                prop_assert!(item.len_tokens > 0);
                prop_assert!(s.running().contains(&item.request));
                let held = s.kv().sequence_tokens(u64::from(item.request)).unwrap();
                prop_assert!(held >= item.start_tokens + u64::from(item.len_tokens), "no KV slot for scheduled tokens");
            }
            s.kv().check_invariants().map_err(TestCaseError::fail)?;
            s.complete_step(&plan, |r, generated| generated >= targets[r as usize]);
            s.kv().check_invariants().map_err(TestCaseError::fail)?;
            steps += 1;
            prop_assert!(steps < 1_000_000, "no progress");
        }
        let stats = s.stats();
        prop_assert_eq!(stats.finished + stats.rejected, w.len() as u64);
        prop_assert_eq!(s.kv_usage().used_blocks, 0, "finished sequences leaked blocks");
    }
}

#[test]
fn sampled_estimates_follow_prefix_groups() {
    // Group 1 answers briefly, group 2 at length; the estimator sees a 20% sample.
    let mut rows = Vec::new();
    for i in 0..200 {
        rows.push((1, 100 + i, 10));
        rows.push((2, 100 + i, 500));
    }
    let w = workload(&rows);
    let prep = Preparation::new(&w, &perf(), LengthKnowledge::Known, 0);
    let knowledge = LengthKnowledge::Sampled {
        fraction: 0.2,
        min_samples: 10,
        min_node_samples: 4,
    };
    let est = estimate_output_tokens(&w, &prep.tree, knowledge, 5);
    for (r, e) in est.iter().enumerate() {
        let want = if r % 2 == 0 { 10 } else { 500 };
        assert_eq!(*e, want, "request {r}");
    }
    let max = estimate_output_tokens(&w, &prep.tree, LengthKnowledge::MaxTokens, 5);
    assert!(max.iter().all(|&e| e == 2048));
    assert_eq!(
        "sampled:0.05"
            .parse::<LengthKnowledge>()
            .ok()
            .map(|k| matches!(k, LengthKnowledge::Sampled { .. })),
        Some(true)
    );
    assert!("psychic".parse::<LengthKnowledge>().is_err());
}

#[test]
fn policy_names_parse_and_unknown_ones_list_the_known() {
    let all = PolicyKind::parse_list("all,ablation").unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fcfs",
            "random",
            "dfs",
            "blendserve",
            "blendserve-nosplit",
            "blendserve-nomemsplit",
            "blendserve-noscan",
            "blendserve-flat"
        ]
    );
    let err = PolicyKind::parse("lifo").unwrap_err().to_string();
    assert!(err.contains("lifo") && err.contains("blendserve"), "{err}");
    match PolicyKind::parse("blendserve@split=0.95").unwrap() {
        PolicyKind::BlendServe(c) => {
            assert!(c.split.enabled && (c.split.keep_sharing - 0.95).abs() < 1e-12)
        }
        other => panic!("{other:?}"),
    }
    match PolicyKind::parse("blendserve-noscan@split=off").unwrap() {
        PolicyKind::BlendServe(c) => {
            assert!(!c.split.enabled && c.scan == scheduler::policy::ScanMode::Single)
        }
        other => panic!("{other:?}"),
    }
    assert!(PolicyKind::parse("blendserve@split=2").is_err());
    assert!(PolicyKind::parse("blendserve@speed=11").is_err());
    assert!(PolicyKind::parse("fcfs@split=0.1")
        .unwrap_err()
        .to_string()
        .contains("no parameters"));
}
