//! The model crate on the CPU backend, with tiny random-weight models the tests write themselves.

use std::path::Path;

use model::fixture::{write_tiny_model, TinyModelSpec};
use model::{
    logits_rows, Architecture, BurnStepModel, CpuBackend, ForwardBatch, LlamaModel, ModelConfig,
    ModelError, PagedKvCache, Sampler, SamplingParams, SequenceChunk, StepModel, TextTokenizer,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type B = CpuBackend;

fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

fn tiny(spec: &TinyModelSpec) -> (tempfile::TempDir, LlamaModel<B>) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), spec).unwrap();
    let model = LlamaModel::<B>::load(dir.path(), &device()).unwrap();
    (dir, model)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Logits of the last token of `tokens` by the plain, unpaged forward.
fn reference_last(model: &LlamaModel<B>, tokens: &[u32]) -> Vec<f32> {
    logits_rows(model.forward_unpaged(tokens).unwrap())
        .pop()
        .unwrap()
}

#[test]
fn parses_hf_configs() {
    let llama = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
    let c = ModelConfig::from_hf_json(llama, Path::new("config.json")).unwrap();
    assert_eq!((c.head_dim, c.num_kv_heads, c.qkv_bias), (128, 8, false));
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    let inv = c.rope_inv_freq();
    // Highest frequency untouched, lowest divided by the factor.
    assert!((inv[0] - 1.0).abs() < 1e-12);
    let base_last = 1.0 / 500000f64.powf(126.0 / 128.0);
    assert!((inv[63] - base_last / 8.0).abs() < 1e-15);

    let qwen = r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "tie_word_embeddings": true, "eos_token_id": 151643,
        "sliding_window": 32768, "use_sliding_window": false, "max_position_embeddings": 32768}"#;
    let c = ModelConfig::from_hf_json(qwen, Path::new("q.json")).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.qkv_bias && c.tie_word_embeddings);
    assert_eq!((c.head_dim, c.eos_token_ids.clone()), (64, vec![151643]));

    let mistral = r#"{"architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 32768}"#;
    let err = ModelConfig::from_hf_json(mistral, Path::new("m.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.json") && err.contains("sliding_window"),
        "{err}"
    );
    let gpt = r#"{"architectures": ["GPT2LMHeadModel"]}"#;
    let err = ModelConfig::from_hf_json(gpt, Path::new("g.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("GPT2LMHeadModel"), "{err}");
    // transformers 5 writes rope_parameters, with rope_theta inside.
    let v5 = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
    let c5 = ModelConfig::from_hf_json(v5, Path::new("v5.json")).unwrap();
    assert_eq!(c5.rope_theta, 500000.0);
    assert_eq!(c5.rope_inv_freq(), inv);
    let plain = r#"{"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}"#;
    let cp = ModelConfig::from_hf_json(plain, Path::new("p.json")).unwrap();
    assert_eq!((cp.rope_theta, cp.rope_scaling), (1_000_000.0, None));
    let mlp_bias = llama.replace(
        "\"num_hidden_layers\": 32",
        "\"num_hidden_layers\": 32, \"mlp_bias\": true",
    );
    assert!(ModelConfig::from_hf_json(&mlp_bias, Path::new("b.json"))
        .unwrap_err()
        .to_string()
        .contains("mlp_bias"));
    let yarn = llama.replace("\"llama3\"", "\"yarn\"");
    assert!(ModelConfig::from_hf_json(&yarn, Path::new("y.json"))
        .unwrap_err()
        .to_string()
        .contains("yarn"));
}

#[test]
fn paged_mixed_batches_match_the_unpaged_forward() {
    for spec in [
        TinyModelSpec::default(),
        TinyModelSpec {
            architecture: Architecture::Qwen2,
            tie_word_embeddings: true,
            llama3_rope_scaling: false,
            num_kv_heads: 1,
            seed: 3,
            ..TinyModelSpec::default()
        },
    ] {
        let (_dir, model) = tiny(&spec);
        let vocab = spec.vocab_size() as u32;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let block = 4;
        let mut cache = PagedKvCache::<B>::new(model.config(), 64, block, &device());
        let mut physical: Vec<u32> = (0..64).collect();
        physical.shuffle(&mut rng);
        let lens = [23usize, 9, 40];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| (0..n + 2).map(|_| rng.gen_range(3..vocab)).collect())
            .collect();
        let mut tables: Vec<Vec<u32>> = Vec::new();
        let mut next = 0;
        for &n in &lens {
            let blocks = (n + 2).div_ceil(block);
            tables.push(physical[next..next + blocks].to_vec());
            next += blocks;
        }
        let chunk = |i: usize, from: usize, to: usize, logits: bool| SequenceChunk {
            tokens: seqs[i][from..to].to_vec(),
            start_position: from,
            block_table: tables[i].clone(),
            logits,
        };
        // Step 1: prefill chunks; step 2: the rest of two prompts beside a decode; step 3: decodes.
        let steps = vec![
            vec![
                chunk(0, 0, 10, false),
                chunk(1, 0, 9, true),
                chunk(2, 0, 16, false),
            ],
            vec![
                chunk(0, 10, 23, true),
                chunk(1, 9, 10, true),
                chunk(2, 16, 40, true),
            ],
            vec![
                chunk(0, 23, 24, true),
                chunk(1, 10, 11, true),
                chunk(2, 40, 41, true),
            ],
        ];
        for step in steps {
            let batch = ForwardBatch {
                sequences: step.clone(),
            };
            let rows = logits_rows(model.forward(&batch, &mut cache).unwrap());
            let wanted: Vec<&SequenceChunk> = step.iter().filter(|s| s.logits).collect();
            assert_eq!(rows.len(), wanted.len());
            for (row, s) in rows.iter().zip(wanted) {
                let i = tables.iter().position(|t| *t == s.block_table).unwrap();
                let end = s.start_position + s.tokens.len();
                let reference = reference_last(&model, &seqs[i][..end]);
                let diff = max_abs_diff(row, &reference);
                assert!(diff < 1e-4, "sequence {i} at {end}: max diff {diff}");
            }
        }
    }
}

/// A cache allocated again with the same shape is kept as it is (`--step-executor auto` probes
/// on it first), so no step may read a slot it has not written: a prompt run over blocks that
/// another prompt filled gives the unpaged forward's logits, mid-block and over whole blocks.
#[test]
fn a_kept_cache_is_never_read_before_written() {
    let spec = TinyModelSpec::default();
    let (_dir, model) = tiny(&spec);
    let vocab = spec.vocab_size() as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut step_model = BurnStepModel::new(model);
    let block = 4;
    step_model.allocate_cache(8, block).unwrap();
    let table: Vec<u32> = vec![5, 2, 7, 0, 3];
    let run = |m: &mut BurnStepModel<B>, tokens: &[u32], start: usize| {
        m.step_logits(&ForwardBatch {
            sequences: vec![SequenceChunk {
                tokens: tokens[start..].to_vec(),
                start_position: start,
                block_table: table.clone(),
                logits: true,
            }],
        })
        .unwrap()
        .pop()
        .unwrap()
    };
    // Fill every slot of the table's blocks with one prompt's K and V.
    let first: Vec<u32> = (0..20).map(|_| rng.gen_range(3..vocab)).collect();
    run(&mut step_model, &first, 0);
    step_model.allocate_cache(8, block).unwrap();
    // A shorter prompt over the same blocks, then a decode token: the stale slots past its end
    // (in its last block and the blocks after) must not count.
    let second: Vec<u32> = (0..11).map(|_| rng.gen_range(3..vocab)).collect();
    let got = run(&mut step_model, &second[..10], 0);
    let want = reference_last(step_model.model(), &second[..10]);
    assert!(max_abs_diff(&got, &want) < 1e-4);
    let got = run(&mut step_model, &second, 10);
    let want = reference_last(step_model.model(), &second);
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn prefix_shared_blocks_give_the_same_logits_as_unshared() {
    let spec = TinyModelSpec {
        seed: 11,
        ..TinyModelSpec::default()
    };
    let (_dir, model) = tiny(&spec);
    let block = 4;
    let mut cache = PagedKvCache::<B>::new(model.config(), 32, block, &device());
    let prefix: Vec<u32> = (10..22).collect(); // 12 tokens: 3 full blocks
    let a: Vec<u32> = prefix.iter().copied().chain([30, 31, 32]).collect();
    let b: Vec<u32> = prefix.iter().copied().chain([40, 41, 42, 43, 44]).collect();
    let table_a = vec![5, 9, 2, 7];
    model
        .forward(
            &ForwardBatch {
                sequences: vec![SequenceChunk {
                    tokens: a.clone(),
                    start_position: 0,
                    block_table: table_a.clone(),
                    logits: true,
                }],
            },
            &mut cache,
        )
        .unwrap();
    // B reuses A's three prefix blocks and computes only its own 5 tokens, into its own blocks.
    let table_b = vec![5, 9, 2, 11, 12];
    let shared = logits_rows(
        model
            .forward(
                &ForwardBatch {
                    sequences: vec![SequenceChunk {
                        tokens: b[12..].to_vec(),
                        start_position: 12,
                        block_table: table_b,
                        logits: true,
                    }],
                },
                &mut cache,
            )
            .unwrap(),
    );
    // The same prompt computed from scratch in unshared blocks.
    let unshared = logits_rows(
        model
            .forward(
                &ForwardBatch {
                    sequences: vec![SequenceChunk {
                        tokens: b.clone(),
                        start_position: 0,
                        block_table: vec![20, 21, 22, 23, 24],
                        logits: true,
                    }],
                },
                &mut cache,
            )
            .unwrap(),
    );
    assert!(max_abs_diff(&shared[0], &unshared[0]) < 1e-5);
    assert!(max_abs_diff(&shared[0], &reference_last(&model, &b)) < 1e-4);
}

#[test]
fn sharded_and_bf16_weights_load() {
    let spec = TinyModelSpec {
        seed: 5,
        ..TinyModelSpec::default()
    };
    let (_d1, single) = tiny(&spec);
    let (_d2, sharded) = tiny(&TinyModelSpec {
        shards: 3,
        ..spec.clone()
    });
    let tokens = [3u32, 9, 27, 14, 5];
    let a = reference_last(&single, &tokens);
    assert_eq!(a, reference_last(&sharded, &tokens));
    let (_d3, bf16) = tiny(&TinyModelSpec {
        dtype: safetensors::Dtype::BF16,
        ..spec.clone()
    });
    let c = reference_last(&bf16, &tokens);
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
    let diff = max_abs_diff(&a, &c);
    assert!(
        diff < 0.05 * scale && diff > 0.0,
        "bf16 rounding changes logits a little: {diff} of {scale}"
    );
}

fn load_err(dir: &Path) -> String {
    match LlamaModel::<B>::load(dir, &device()) {
        Ok(_) => panic!("expected a load error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_model_folders_fail_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
    let config_path = dir.path().join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        original.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    assert!(load_err(dir.path()).contains("model.layers.2.input_layernorm.weight"));
    std::fs::write(
        &config_path,
        original.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("gate_proj") && err.contains("[96, 64]"),
        "{err}"
    );
    std::fs::write(&config_path, &original).unwrap();
    assert!(LlamaModel::<B>::load(dir.path(), &device()).is_ok());

    // An integer tensor where floats belong.
    let ints: Vec<u8> = (0..64 * 64).flat_map(|i: i32| i.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![64, 64], &ints).unwrap();
    let odd = tempfile::tempdir().unwrap();
    write_tiny_model(odd.path(), &TinyModelSpec::default()).unwrap();
    safetensors::serialize_to_file(
        vec![("model.embed_tokens.weight", view)],
        &None,
        &odd.path().join("model.safetensors"),
    )
    .unwrap();
    let err = load_err(odd.path());
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("I32"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    assert!(load_err(empty.path()).contains("config.json"));
    std::fs::copy(&config_path, empty.path().join("config.json")).unwrap();
    assert!(load_err(empty.path()).contains("model.safetensors"));
    assert!(matches!(
        TextTokenizer::load(empty.path()),
        Err(ModelError::Tokenizer { .. })
    ));
}

#[test]
fn bad_batches_are_refused() {
    let (_dir, model) = tiny(&TinyModelSpec::default());
    let mut cache = PagedKvCache::<B>::new(model.config(), 8, 4, &device());
    let run = |cache: &mut PagedKvCache<B>, sequences: Vec<SequenceChunk>| {
        model
            .forward(&ForwardBatch { sequences }, cache)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let s = |tokens: Vec<u32>, start: usize, table: Vec<u32>| SequenceChunk {
        tokens,
        start_position: start,
        block_table: table,
        logits: true,
    };
    assert!(run(&mut cache, vec![s(vec![5; 9], 0, vec![0, 1])]).contains("needs 3 blocks"));
    assert!(run(&mut cache, vec![s(vec![5; 2], 0, vec![9])]).contains("outside the cache"));
    assert!(run(
        &mut cache,
        vec![s(vec![5; 2], 0, vec![0]), s(vec![6], 1, vec![0])]
    )
    .contains("same KV slot"));
    assert!(run(&mut cache, vec![s(vec![500], 0, vec![0])]).contains("vocabulary"));
    assert!(run(&mut cache, vec![s(vec![], 0, vec![0])]).contains("no tokens"));
}

#[test]
fn tokenizer_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinyModelSpec::default()).unwrap();
    let t = TextTokenizer::load(dir.path()).unwrap();
    let ids = t.encode("w0 w1 w60 nope", false).unwrap();
    assert_eq!(ids, vec![3, 4, 63, 0]);
    assert_eq!(t.decode(&ids[..3], true).unwrap(), "w0 w1 w60");
    assert_eq!(t.token_id("</s>"), Some(2));
    assert_eq!(t.vocab_size(), 64);
}

#[test]
fn sampling_is_seeded_and_follows_its_parameters() {
    let logits = [0.1f32, 2.0, 1.9, -1.0];
    assert_eq!(Sampler::new(SamplingParams::default()).sample(&logits), 1);
    let top1 = SamplingParams {
        temperature: 1.0,
        top_k: 1,
        ..SamplingParams::default()
    };
    assert_eq!(Sampler::new(top1).sample(&logits), 1);
    let tiny_p = SamplingParams {
        temperature: 1.0,
        top_p: 1e-4,
        ..SamplingParams::default()
    };
    assert_eq!(Sampler::new(tiny_p).sample(&logits), 1);
    let hot = SamplingParams {
        temperature: 1.0,
        seed: 42,
        ..SamplingParams::default()
    };
    let draw = |p: SamplingParams| -> Vec<u32> {
        let mut s = Sampler::new(p);
        (0..50).map(|_| s.sample(&logits)).collect()
    };
    assert_eq!(draw(hot), draw(hot));
    assert_ne!(draw(hot), draw(SamplingParams { seed: 43, ..hot }));
    // p(1) = 3/4 for logits [0, ln 3].
    let two = [0.0f32, 3f32.ln()];
    let mut s = Sampler::new(SamplingParams {
        temperature: 1.0,
        seed: 1,
        ..SamplingParams::default()
    });
    let ones = (0..20_000).filter(|_| s.sample(&two) == 1).count();
    assert!((ones as f64 / 20_000.0 - 0.75).abs() < 0.015, "{ones}");
    // top_k = 2 never draws the two least likely tokens.
    let mut s = Sampler::new(SamplingParams {
        temperature: 2.0,
        top_k: 2,
        seed: 3,
        ..SamplingParams::default()
    });
    assert!((0..2000).all(|_| matches!(s.sample(&logits), 1 | 2)));
}

/// Llama as Hugging Face defines it, one token and one head at a time, in f64: the independent
/// check of the burn implementation's math (RoPE's rotate_half layout, GQA's head mapping,
/// RMSNorm, SwiGLU, biases, tied embeddings).
fn naive_last_logits(dir: &Path, tokens: &[u32]) -> Vec<f64> {
    let c = ModelConfig::load(dir).unwrap();
    let store = model::WeightStore::open(dir).unwrap();
    let get = |name: &str, shape: &[usize]| -> Vec<f64> {
        store
            .f32(name, shape)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let (h, d, nh, nkv, inter) = (
        c.hidden_size,
        c.head_dim,
        c.num_heads,
        c.num_kv_heads,
        c.intermediate_size,
    );
    let matvec = |w: &[f64], x: &[f64], rows: usize| -> Vec<f64> {
        (0..rows)
            .map(|r| {
                w[r * x.len()..(r + 1) * x.len()]
                    .iter()
                    .zip(x)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    };
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + c.rms_norm_eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
    };
    let inv_freq = c.rope_inv_freq();
    let rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(d) {
            for j in 0..d / 2 {
                let (s, co) = (pos as f64 * inv_freq[j]).sin_cos();
                let (x1, x2) = (head[j], head[j + d / 2]);
                head[j] = x1 * co - x2 * s;
                head[j + d / 2] = x2 * co + x1 * s;
            }
        }
    };
    let embed = get("model.embed_tokens.weight", &[c.vocab_size, h]);
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| embed[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let proj = |name: &str, rows: usize, cols: usize, x: &[f64]| -> Vec<f64> {
            let mut y = matvec(&get(&format!("{p}.{name}.weight"), &[rows, cols]), x, rows);
            if c.qkv_bias && name.starts_with("self_attn.") && !name.ends_with("o_proj") {
                for (v, b) in y.iter_mut().zip(get(&format!("{p}.{name}.bias"), &[rows])) {
                    *v += b;
                }
            }
            y
        };
        let norm1 = get(&format!("{p}.input_layernorm.weight"), &[h]);
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let hn = rms(x, &norm1);
            let mut q = proj("self_attn.q_proj", nh * d, h, &hn);
            let mut k = proj("self_attn.k_proj", nkv * d, h, &hn);
            rope(&mut q, pos);
            rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(proj("self_attn.v_proj", nkv * d, h, &hn));
        }
        let norm2 = get(&format!("{p}.post_attention_layernorm.weight"), &[h]);
        for t in 0..xs.len() {
            let mut attn = vec![0.0; nh * d];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[t][head * d..(head + 1) * d];
                let scores: Vec<f64> = (0..=t)
                    .map(|u| {
                        q.iter()
                            .zip(&ks[u][kvh * d..(kvh + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (u, w) in weights.iter().enumerate() {
                    for j in 0..d {
                        attn[head * d + j] += w / total * vs[u][kvh * d + j];
                    }
                }
            }
            let o = proj("self_attn.o_proj", h, nh * d, &attn);
            let x: Vec<f64> = xs[t].iter().zip(&o).map(|(a, b)| a + b).collect();
            let hn = rms(&x, &norm2);
            let gate = proj("mlp.gate_proj", inter, h, &hn);
            let up = proj("mlp.up_proj", inter, h, &hn);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = proj("mlp.down_proj", h, inter, &act);
            xs[t] = x.iter().zip(&down).map(|(a, b)| a + b).collect();
        }
    }
    let last = rms(xs.last().unwrap(), &get("model.norm.weight", &[h]));
    let head = if c.tie_word_embeddings {
        embed
    } else {
        get("lm_head.weight", &[c.vocab_size, h])
    };
    matvec(&head, &last, c.vocab_size)
}

#[test]
fn burn_forward_matches_a_naive_f64_llama() {
    for spec in [
        TinyModelSpec {
            seed: 21,
            ..TinyModelSpec::default()
        },
        TinyModelSpec {
            architecture: Architecture::Qwen2,
            tie_word_embeddings: true,
            llama3_rope_scaling: false,
            num_heads: 4,
            num_kv_heads: 4,
            seed: 22,
            ..TinyModelSpec::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), &spec).unwrap();
        let model = LlamaModel::<B>::load(dir.path(), &device()).unwrap();
        // Long enough that RoPE's scaled low frequencies matter (original context 64).
        let tokens: Vec<u32> = (0..90).map(|i| 3 + (i * 7 % 60) as u32).collect();
        let ours = reference_last(&model, &tokens);
        let naive = naive_last_logits(dir.path(), &tokens);
        let diff = ours
            .iter()
            .zip(&naive)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        let scale = naive.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{:?}: max diff {diff} (scale {scale})",
            spec.architecture
        );
    }
}

#[test]
fn stop_criteria_end_sequences() {
    use model::{StopCriteria, StopReason};
    let stop = StopCriteria {
        max_tokens: 3,
        stop_token_ids: vec![2, 7],
        ignore_eos: false,
    };
    assert_eq!(stop.check(5, 1), None);
    assert_eq!(stop.check(7, 1), Some(StopReason::StopToken(7)));
    assert_eq!(stop.check(5, 3), Some(StopReason::Length));
    // A stop token on the last allowed step reports the token.
    assert_eq!(stop.check(2, 3), Some(StopReason::StopToken(2)));
    let ignore = StopCriteria {
        ignore_eos: true,
        ..stop
    };
    assert_eq!(ignore.check(2, 1), None);
    assert_eq!(ignore.check(2, 3), Some(StopReason::Length));
}
