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
use scheduler::{
    Executor, HardwareConfig, LengthKnowledge, ModelConfig, PerfModel, PolicyKind, SchedulerConfig,
};

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
                trace_output_tokens: None,
                output_known: false,
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
                // BlendServe's default: a sample run first (a quarter of the requests here).
                lengths: if policy == "blendserve" {
                    LengthKnowledge::Sampled {
                        fraction: 0.25,
                        min_samples: 4,
                        min_node_samples: 1,
                    }
                } else {
                    LengthKnowledge::MaxTokens
                },
            };
            let mut got: Vec<Option<Generation>> = vec![None; reqs.len()];
            let stats = generate(&mut model, &reqs, &config, &perf(), &mut |g: Generation| {
                let i = g.index;
                assert!(got[i].replace(g).is_none(), "request {i} finished twice");
            })
            .unwrap();
            assert_eq!(stats.ended, reqs.len() as u64);
            assert_eq!(
                stats.sample_requests,
                if policy == "blendserve" { 6 } else { 0 }
            );
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
                stats.scheduler.prefix_hit_ratio() > 0.0,
                "{policy}/{blocks}: shared system prompts are reused"
            );
            if blocks == 24 {
                assert!(
                    stats.scheduler.preemptions > 0,
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
    let config = small_engine(PolicyKind::Fcfs, LengthKnowledge::MaxTokens);
    // A token outside the vocabulary, an empty prompt and a prompt longer than the context
    // are refused with the reason; the rest run.
    let mut reqs = requests(64);
    reqs[5].prompt = vec![999];
    reqs[7].prompt = vec![];
    reqs[3].prompt = vec![7; 5000];
    let mut ends = Vec::new();
    generate(&mut model, &reqs, &config, &perf(), &mut |g: Generation| {
        ends.push((g.index, g.end, g.rejection.clone()))
    })
    .unwrap();
    assert_eq!(ends.len(), reqs.len());
    for (index, needle) in [(5, "999"), (7, "empty"), (3, "5000")] {
        let e = ends.iter().find(|e| e.0 == index).unwrap();
        assert_eq!(e.1, GenerationEnd::Rejected);
        let why = e.2.as_ref().unwrap();
        assert!(why.contains(needle), "{why}");
    }
    assert_eq!(
        ends.iter()
            .filter(|e| e.1 != GenerationEnd::Rejected)
            .count(),
        reqs.len() - 3
    );
}

/// Ends text stops and trace lengths, and the observer's steps add up.
struct Recorder {
    ends: Vec<(usize, GenerationEnd, usize)>,
    steps: u64,
    sampled: u64,
    stop_on: u32,
}

impl Recorder {
    fn new(stop_on: u32) -> Self {
        Recorder {
            ends: Vec::new(),
            steps: 0,
            sampled: 0,
            stop_on,
        }
    }
}

/// Default scheduling, a 64-block cache.
fn small_engine(policy: PolicyKind, lengths: LengthKnowledge) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig::default(),
        policy,
        num_kv_blocks: 64,
        seed: 0,
        lengths,
    }
}

impl engine::Observer for Recorder {
    fn finished(&mut self, g: Generation) -> std::io::Result<()> {
        self.ends.push((g.index, g.end, g.tokens.len()));
        Ok(())
    }
    fn step(&mut self, report: &engine::StepReport) {
        self.steps += 1;
        self.sampled += report.sampled_tokens;
        assert_eq!(report.totals.scheduler.steps, self.steps);
    }
    fn stop_text(&mut self, index: usize, generated: &[u32]) -> bool {
        // Request 0 "sees its stop string" at its third token.
        index == 0 && generated.len() as u32 == self.stop_on
    }
}

#[test]
fn trace_lengths_text_stops_and_known_lengths() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
    let mut model =
        BurnStepModel::new(LlamaModel::<B>::load(dir.path(), &Default::default()).unwrap());
    let mut reqs = requests(64);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.stop.ignore_eos = true;
        r.stop.max_tokens = 30;
        r.trace_output_tokens = Some(1 + i as u32 % 4);
    }
    for lengths in [LengthKnowledge::Known, LengthKnowledge::MaxTokens] {
        let config = small_engine(PolicyKind::parse("blendserve").unwrap(), lengths);
        let mut rec = Recorder::new(3);
        let stats = generate(&mut model, &reqs, &config, &perf(), &mut rec).unwrap();
        assert_eq!(rec.ends.len(), reqs.len());
        assert_eq!(stats.scheduler.steps, rec.steps);
        assert_eq!(stats.scheduler.generated_tokens, rec.sampled);
        for &(i, end, len) in &rec.ends {
            if i == 0 {
                // Its trace length (1) comes before the stop string (3).
                assert_eq!((end, len), (GenerationEnd::TraceLength, 1));
            } else {
                assert_eq!((end, len), (GenerationEnd::TraceLength, 1 + i % 4), "{i}");
            }
        }
    }
    // Lengths declared known (video frames) are told as they are, and no sample runs them.
    for r in reqs.iter_mut().step_by(2) {
        r.output_known = true;
    }
    let sampled = LengthKnowledge::Sampled {
        fraction: 1.0,
        min_samples: 1,
        min_node_samples: 1,
    };
    let config = small_engine(PolicyKind::parse("blendserve").unwrap(), sampled);
    let mut rec = Recorder::new(99);
    let stats = generate(&mut model, &reqs, &config, &perf(), &mut rec).unwrap();
    assert_eq!(stats.sample_requests, (reqs.len() / 2) as u64);
    assert_eq!(rec.ends.len(), reqs.len());
    for &(i, end, len) in &rec.ends {
        assert_eq!((end, len), (GenerationEnd::TraceLength, 1 + i % 4), "{i}");
    }
    let known = reqs[0].scheduler_request(None);
    assert!(known.output_known && known.output_tokens == Some(1));
    for r in &mut reqs {
        r.output_known = false;
    }
    reqs[0].trace_output_tokens = Some(10);
    let config = small_engine(PolicyKind::Fcfs, LengthKnowledge::MaxTokens);
    let mut rec = Recorder::new(3);
    generate(&mut model, &reqs, &config, &perf(), &mut rec).unwrap();
    let first = rec.ends.iter().find(|e| e.0 == 0).unwrap();
    assert_eq!((first.1, first.2), (GenerationEnd::StopText, 3));
    // Known lengths need every request's length.
    reqs[4].trace_output_tokens = None;
    let config = EngineConfig {
        lengths: LengthKnowledge::Known,
        ..config
    };
    let err = generate(&mut model, &reqs, &config, &perf(), &mut |_: Generation| {}).unwrap_err();
    assert!(err.to_string().contains("request 4"), "{err}");
}

#[test]
fn the_length_sample_phase_leaves_its_prefixes_cached_for_the_main_phase() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinyModelSpec::default();
    write_tiny_model(dir.path(), &spec).unwrap();
    let mut model =
        BurnStepModel::new(LlamaModel::<B>::load(dir.path(), &Default::default()).unwrap());
    let reqs = requests(spec.vocab_size() as u32);
    let hits = |model: &mut BurnStepModel<B>, lengths| {
        let config = EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_tokens: 32,
                block_tokens: 4,
                max_running: 8,
                ..SchedulerConfig::default()
            },
            policy: PolicyKind::parse("blendserve").unwrap(),
            num_kv_blocks: 400,
            seed: 1,
            lengths,
        };
        let stats = generate(model, &reqs, &config, &perf(), &mut |_: Generation| {}).unwrap();
        assert_eq!(stats.ended, reqs.len() as u64);
        stats.scheduler
    };
    let one_phase = hits(&mut model, LengthKnowledge::MaxTokens);
    let sampled = hits(
        &mut model,
        LengthKnowledge::Sampled {
            fraction: 0.25,
            min_samples: 4,
            min_node_samples: 1,
        },
    );
    assert_eq!(sampled.prefix_lookup_tokens, one_phase.prefix_lookup_tokens);
    // Each of the three shared system prompts is computed once, in whichever phase first
    // needs it, as in a run of one phase.
    assert!(
        sampled.prefix_hit_tokens >= one_phase.prefix_hit_tokens,
        "sampled {} hit tokens, one phase {}",
        sampled.prefix_hit_tokens,
        one_phase.prefix_hit_tokens
    );
}
