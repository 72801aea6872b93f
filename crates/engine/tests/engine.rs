//! The engine end to end on the CPU backend: whatever the policy, batching, chunking, prefix
//! reuse and preemption, every request gets exactly the tokens a plain one-request-at-a-time
//! loop over the unpaged forward gives.

use engine::{generate, EngineConfig, Generation, GenerationEnd, GenerationRequest};
use model::fixture::{write_tiny_model, TinyModelSpec};
use model::{
    logits_rows, BurnStepModel, CpuBackend, LlamaModel, Sampler, SamplingParams, StopCriteria,
    StopReason,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use scheduler::{Executor, HardwareConfig, ModelConfig, PerfModel, PolicyKind, SchedulerConfig};

type B = CpuBackend;

fn perf() -> PerfModel {
    PerfModel::new(
        ModelConfig::preset("qwen2.5-0.5b").unwrap(),
        HardwareConfig::preset("h100").unwrap(),
        Executor::Overlapped,
    )
}

/// Requests in three prefix groups (shared 20-token system prompts), some sampled.
fn requests(vocab: u32) -> Vec<GenerationRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let systems: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..20).map(|_| rng.gen_range(3..vocab)).collect())
        .collect();
    (0..24)
        .map(|i| {
            let mut prompt = systems[i % 3].clone();
            prompt.extend((0..rng.gen_range(1..15)).map(|_| rng.gen_range(3..vocab)));
            GenerationRequest {
                id: format!("r{i}"),
                prompt,
                sampling: if i % 4 == 0 {
                    SamplingParams {
                        temperature: 0.8,
                        top_p: 0.9,
                        top_k: 20,
                        seed: i as u64,
                    }
                } else {
                    SamplingParams::default()
                },
                stop: StopCriteria {
                    max_tokens: 4 + (i % 5) as u32 * 3,
                    stop_token_ids: vec![2],
                    ignore_eos: false,
                },
            }
        })
        .collect()
}

/// One request at a time, no cache, no paging.
fn reference(model: &LlamaModel<B>, r: &GenerationRequest) -> (Vec<u32>, GenerationEnd) {
    let mut tokens = r.prompt.clone();
    let mut sampler = Sampler::new(r.sampling);
    let mut out = Vec::new();
    loop {
        let row = logits_rows(model.forward_unpaged(&tokens).unwrap())
            .pop()
            .unwrap();
        let t = sampler.sample(&row);
        out.push(t);
        tokens.push(t);
        if let Some(reason) = r.stop.check(t, out.len() as u32) {
            return (out, GenerationEnd::Stop(reason));
        }
    }
}

#[test]
fn engine_output_equals_unbatched_generation_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec {
        seed: 8,
        ..TinyModelSpec::default()
    };
    write_tiny_model(dir.path(), &spec).unwrap();
    let mut model =
        BurnStepModel::new(LlamaModel::<B>::load(dir.path(), &Default::default()).unwrap());
    let reqs = requests(spec.vocab_size() as u32);
    let expected: Vec<(Vec<u32>, GenerationEnd)> =
        reqs.iter().map(|r| reference(model.model(), r)).collect();
    assert!(expected
        .iter()
        .any(|e| e.1 == GenerationEnd::Stop(StopReason::Length)));
    for policy in ["fcfs", "dfs", "blendserve", "random"] {
        // A roomy cache; and 24 blocks of 4 tokens with admission reserving nothing for growth,
        // which forces preemption and recomputation.
        for blocks in [400u32, 24] {
            let small = blocks == 24;
            let config = EngineConfig {
                scheduler: SchedulerConfig {
                    max_batch_tokens: 32,
                    block_tokens: 4,
                    max_running: 8,
                    watermark_fraction: if small { 0.0 } else { 0.01 },
                    reserve_ratio_init: if small { 0.0 } else { 0.7 },
                    reserve_ratio_min: if small { 0.0 } else { 0.1 },
                    ..SchedulerConfig::default()
                },
                policy: PolicyKind::parse(policy).unwrap(),
                num_kv_blocks: blocks,
                seed: 1,
            };
            let mut got: Vec<Option<Generation>> = vec![None; reqs.len()];
            let stats = generate(&mut model, &reqs, &config, &perf(), |g| {
                let i = g.index;
                assert!(got[i].replace(g).is_none(), "request {i} finished twice");
            })
            .unwrap();
            for (i, g) in got.iter().enumerate() {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{policy}/{blocks}: request {i} never finished"));
                assert_eq!(
                    (&g.tokens, g.end),
                    (&expected[i].0, expected[i].1),
                    "{policy}/{blocks}: request {i}"
                );
            }
            assert!(
                stats.prefix_hit_ratio > 0.0,
                "{policy}/{blocks}: shared system prompts are reused"
            );
            if blocks == 24 {
                assert!(
                    stats.preemptions > 0,
                    "{policy}: the small cache must preempt"
                );
            }
        }
    }
}

#[test]
fn bad_requests_are_refused_with_their_index() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
    let mut model =
        BurnStepModel::new(LlamaModel::<B>::load(dir.path(), &Default::default()).unwrap());
    let config = EngineConfig {
        scheduler: SchedulerConfig::default(),
        policy: PolicyKind::Fcfs,
        num_kv_blocks: 64,
        seed: 0,
    };
    let mut reqs = requests(64);
    reqs[5].prompt = vec![999];
    let err = generate(&mut model, &reqs, &config, &perf(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("request 5") && err.contains("999"), "{err}");
    // A prompt longer than the context is rejected, the rest run.
    let mut reqs = requests(64);
    reqs[3].prompt = vec![7; 5000];
    let mut ends = Vec::new();
    generate(&mut model, &reqs, &config, &perf(), |g| {
        ends.push((g.index, g.end, g.rejection.clone()))
    })
    .unwrap();
    assert_eq!(ends.len(), reqs.len());
    let rejected = ends.iter().find(|e| e.0 == 3).unwrap();
    assert_eq!(rejected.1, GenerationEnd::Rejected);
    assert!(rejected.2.as_ref().unwrap().contains("5000"));
}
