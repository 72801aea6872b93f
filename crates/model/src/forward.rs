//! The decoder and its paged, mixed-batch forward pass.
//!
//! A step's batch is a list of [`SequenceChunk`]s: some are prefill chunks (many tokens from some
//! position on), some single decode tokens. All their tokens go through the GEMMs together; each
//! sequence then attends over its own context, gathered from the paged cache through its block
//! table (blocks may be shared with other sequences by prefix reuse: they are only read).

use std::path::Path;

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::config::ModelConfig;
use crate::weights::WeightStore;
use crate::ModelError;

/// Tokens `[start_position, start_position + tokens.len())` of one sequence, computed this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceChunk {
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`; everything before it is already in the cache.
    pub start_position: usize,
    /// Physical block of each logical block of the sequence (the `kv-cache` crate's table).
    pub block_table: Vec<u32>,
    /// Return logits for the last token (to sample the next one).
    pub logits: bool,
}

/// One step's work.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub sequences: Vec<SequenceChunk>,
}

/// K and V for every layer, paged: `num_blocks * block_size` slots of `[kv_heads, head_dim]`.
pub struct PagedKvCache<B: Backend> {
    block_size: usize,
    num_blocks: usize,
    keys: Vec<Tensor<B, 3>>,
    values: Vec<Tensor<B, 3>>,
}

impl<B: Backend> PagedKvCache<B> {
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        device: &B::Device,
    ) -> Self {
        let shape = [
            num_blocks * block_size,
            config.num_kv_heads,
            config.head_dim,
        ];
        PagedKvCache {
            block_size,
            num_blocks,
            keys: (0..config.num_layers)
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
            values: (0..config.num_layers)
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn slot(&self, table: &[u32], position: usize) -> usize {
        table[position / self.block_size] as usize * self.block_size + position % self.block_size
    }
}

struct Linear<B: Backend> {
    /// `[in, out]`: the HF `[out, in]` weight, transposed once at load.
    weight_t: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    fn load(
        store: &WeightStore,
        name: &str,
        out_features: usize,
        in_features: usize,
        bias: bool,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let w = store.f32(&format!("{name}.weight"), &[out_features, in_features])?;
        let weight_t =
            Tensor::<B, 2>::from_data(TensorData::new(w, [out_features, in_features]), device)
                .transpose();
        let bias = if bias {
            let b = store.f32(&format!("{name}.bias"), &[out_features])?;
            Some(Tensor::from_data(
                TensorData::new(b, [out_features]),
                device,
            ))
        } else {
            None
        };
        Ok(Linear { weight_t, bias })
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.weight_t.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze_dim::<2>(0),
            None => y,
        }
    }
}

fn load_vector<B: Backend>(
    store: &WeightStore,
    name: &str,
    len: usize,
    device: &B::Device,
) -> Result<Tensor<B, 1>, ModelError> {
    Ok(Tensor::from_data(
        TensorData::new(store.f32(name, &[len])?, [len]),
        device,
    ))
}

struct DecoderLayer<B: Backend> {
    input_norm: Tensor<B, 1>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    post_attention_norm: Tensor<B, 1>,
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// A loaded Llama-family model on backend `B`.
pub struct LlamaModel<B: Backend> {
    config: ModelConfig,
    embed: Tensor<B, 2>,
    layers: Vec<DecoderLayer<B>>,
    norm: Tensor<B, 1>,
    /// `[hidden, vocab]`.
    lm_head_t: Tensor<B, 2>,
    inv_freq: Vec<f64>,
    device: B::Device,
}

fn int_tensor<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

impl<B: Backend> LlamaModel<B> {
    /// Loads `config.json` and the safetensors weights of a HF model folder.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let config = ModelConfig::load(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(config, &store, device)
    }

    pub fn from_store(
        config: ModelConfig,
        store: &WeightStore,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (h, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let embed_data = store.f32("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let embed =
            Tensor::<B, 2>::from_data(TensorData::new(embed_data, [c.vocab_size, h]), device);
        let lm_head_t = if store.contains("lm_head.weight") && !c.tie_word_embeddings {
            let w = store.f32("lm_head.weight", &[c.vocab_size, h])?;
            Tensor::<B, 2>::from_data(TensorData::new(w, [c.vocab_size, h]), device).transpose()
        } else if c.tie_word_embeddings {
            embed.clone().transpose()
        } else {
            return Err(ModelError::MissingTensor {
                name: "lm_head.weight".into(),
            });
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_norm: load_vector(store, &format!("{p}.input_layernorm.weight"), h, device)?,
                q: Linear::load(
                    store,
                    &format!("{p}.self_attn.q_proj"),
                    q_dim,
                    h,
                    c.qkv_bias,
                    device,
                )?,
                k: Linear::load(
                    store,
                    &format!("{p}.self_attn.k_proj"),
                    kv_dim,
                    h,
                    c.qkv_bias,
                    device,
                )?,
                v: Linear::load(
                    store,
                    &format!("{p}.self_attn.v_proj"),
                    kv_dim,
                    h,
                    c.qkv_bias,
                    device,
                )?,
                o: Linear::load(
                    store,
                    &format!("{p}.self_attn.o_proj"),
                    h,
                    q_dim,
                    false,
                    device,
                )?,
                post_attention_norm: load_vector(
                    store,
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    device,
                )?,
                gate: Linear::load(
                    store,
                    &format!("{p}.mlp.gate_proj"),
                    c.intermediate_size,
                    h,
                    false,
                    device,
                )?,
                up: Linear::load(
                    store,
                    &format!("{p}.mlp.up_proj"),
                    c.intermediate_size,
                    h,
                    false,
                    device,
                )?,
                down: Linear::load(
                    store,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    c.intermediate_size,
                    false,
                    device,
                )?,
            });
        }
        let norm = load_vector(store, "model.norm.weight", h, device)?;
        Ok(LlamaModel {
            inv_freq: config.rope_inv_freq(),
            config,
            embed,
            layers,
            norm,
            lm_head_t,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 1>) -> Tensor<B, 2> {
        let mean_square = x.clone().powf_scalar(2.0).mean_dim(1);
        x * mean_square
            .add_scalar(self.config.rms_norm_eps)
            .sqrt()
            .recip()
            * weight.clone().unsqueeze_dim::<2>(0)
    }

    /// `[n, 1, head_dim]` cos and sin for `positions` (HF layout: frequencies repeated twice).
    fn rope_tables(&self, positions: &[usize]) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let d = self.config.head_dim;
        let mut cos = Vec::with_capacity(positions.len() * d);
        let mut sin = Vec::with_capacity(positions.len() * d);
        for &p in positions {
            for j in 0..d {
                let angle = p as f64 * self.inv_freq[j % (d / 2)];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let n = positions.len();
        (
            Tensor::from_data(TensorData::new(cos, [n, 1, d]), &self.device),
            Tensor::from_data(TensorData::new(sin, [n, 1, d]), &self.device),
        )
    }

    fn apply_rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 3> {
        let half = self.config.head_dim / 2;
        let first = x.clone().narrow(2, 0, half);
        let second = x.clone().narrow(2, half, half);
        let rotated = Tensor::cat(vec![second.neg(), first], 2);
        x * cos.clone() + rotated * sin.clone()
    }

    /// q `[n, heads, d]`, k and v `[n, kv_heads, d]` for hidden states `x` at `positions`.
    fn qkv(
        &self,
        layer: &DecoderLayer<B>,
        x: Tensor<B, 2>,
        positions: &[usize],
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let c = &self.config;
        let n = positions.len();
        let q = layer
            .q
            .forward(x.clone())
            .reshape([n, c.num_heads, c.head_dim]);
        let k = layer
            .k
            .forward(x.clone())
            .reshape([n, c.num_kv_heads, c.head_dim]);
        let v = layer.v.forward(x).reshape([n, c.num_kv_heads, c.head_dim]);
        let (cos, sin) = self.rope_tables(positions);
        (
            self.apply_rope(q, &cos, &sin),
            self.apply_rope(k, &cos, &sin),
            v,
        )
    }

    /// Causal attention of `q` (`[n, heads, d]`, positions `start..start + n`) over keys and
    /// values at positions `0..ctx` (`[ctx, kv_heads, d]`). Returns `[n, heads * d]`.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        start: usize,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let [n, heads, d] = q.dims();
        let ctx = k.dims()[0];
        let group = heads / c.num_kv_heads;
        let expand_kv = |t: Tensor<B, 3>| -> Tensor<B, 3> {
            // [ctx, kv, d] -> [kv, ctx, d] -> [kv, group, ctx, d] -> [heads, ctx, d]
            t.swap_dims(0, 1)
                .unsqueeze_dim::<4>(1)
                .expand([c.num_kv_heads, group, ctx, d])
                .reshape([heads, ctx, d])
        };
        let q = q.swap_dims(0, 1); // [heads, n, d]
        let k = expand_kv(k);
        let v = expand_kv(v);
        let scores = q
            .matmul(k.swap_dims(1, 2))
            .mul_scalar(1.0 / (d as f64).sqrt()); // [heads, n, ctx]
        let future: Vec<bool> = (0..n)
            .flat_map(|i| (0..ctx).map(move |j| j > start + i))
            .collect();
        let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(future, [n, ctx]), &self.device)
            .unsqueeze_dim::<3>(0)
            .expand([heads, n, ctx]);
        let probs = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 2);
        probs.matmul(v).swap_dims(0, 1).reshape([n, heads * d])
    }

    fn mlp(&self, layer: &DecoderLayer<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let gate = silu(layer.gate.forward(x.clone()));
        layer.down.forward(gate * layer.up.forward(x))
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor<B, 2>, ModelError> {
        self.config.check_token_ids(tokens)?;
        let ids = int_tensor::<B>(tokens.iter().map(|&t| i64::from(t)).collect(), &self.device);
        Ok(self.embed.clone().select(0, ids))
    }

    fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        self.rms_norm(hidden, &self.norm)
            .matmul(self.lm_head_t.clone())
    }

    /// Runs one step: writes the batch's K and V into `cache` and returns logits `[s, vocab]`,
    /// one row per sequence with `logits` set, in batch order.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &mut PagedKvCache<B>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let c = &self.config;
        if cache.keys.len() != c.num_layers
            || cache
                .keys
                .first()
                .is_some_and(|k| k.dims()[1..] != [c.num_kv_heads, c.head_dim])
        {
            return Err(ModelError::Batch(
                "the KV cache was made for another model shape".into(),
            ));
        }
        let slots = plan_slots(c, batch, cache.block_size, cache.num_blocks)?;
        let tokens: Vec<u32> = batch
            .sequences
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = batch
            .sequences
            .iter()
            .flat_map(|s| s.start_position..s.start_position + s.tokens.len())
            .collect();
        let slot_ids = int_tensor::<B>(slots.iter().map(|&s| s as i64).collect(), &self.device);
        let context_slots: Vec<Tensor<B, 1, Int>> = batch
            .sequences
            .iter()
            .map(|s| {
                let end = s.start_position + s.tokens.len();
                int_tensor::<B>(
                    (0..end)
                        .map(|p| cache.slot(&s.block_table, p) as i64)
                        .collect(),
                    &self.device,
                )
            })
            .collect();
        let mut x = self.embed(&tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &layer.input_norm);
            let (q, k, v) = self.qkv(layer, h, &positions);
            cache.keys[l] = overwrite_rows(cache.keys[l].clone(), &slot_ids, k);
            cache.values[l] = overwrite_rows(cache.values[l].clone(), &slot_ids, v);
            let mut outputs = Vec::with_capacity(batch.sequences.len());
            let mut offset = 0;
            for (s, ctx) in batch.sequences.iter().zip(&context_slots) {
                let n = s.tokens.len();
                let q_seq = q.clone().narrow(0, offset, n);
                let k_ctx = cache.keys[l].clone().select(0, ctx.clone());
                let v_ctx = cache.values[l].clone().select(0, ctx.clone());
                outputs.push(self.attend(q_seq, k_ctx, v_ctx, s.start_position));
                offset += n;
            }
            x = x + layer.o.forward(Tensor::cat(outputs, 0));
            let h = self.rms_norm(x.clone(), &layer.post_attention_norm);
            x = x + self.mlp(layer, h);
        }
        let mut rows = Vec::new();
        let mut offset = 0;
        for s in &batch.sequences {
            offset += s.tokens.len();
            if s.logits {
                rows.push(offset as i64 - 1);
            }
        }
        if rows.is_empty() {
            return Ok(Tensor::zeros([0, self.config.vocab_size], &self.device));
        }
        Ok(self.logits(x.select(0, int_tensor::<B>(rows, &self.device))))
    }

    /// The plain forward pass, no cache, no paging: logits of every position of `tokens`
    /// (`[len, vocab]`). The reference the paged path is checked against.
    pub fn forward_unpaged(&self, tokens: &[u32]) -> Result<Tensor<B, 2>, ModelError> {
        if tokens.is_empty() || tokens.len() > self.config.max_position_embeddings {
            return Err(ModelError::Batch(format!(
                "{} tokens do not fit the model's context",
                tokens.len()
            )));
        }
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let mut x = self.embed(tokens)?;
        for layer in &self.layers {
            let h = self.rms_norm(x.clone(), &layer.input_norm);
            let (q, k, v) = self.qkv(layer, h, &positions);
            x = x + layer.o.forward(self.attend(q, k, v, 0));
            let h = self.rms_norm(x.clone(), &layer.post_attention_norm);
            x = x + self.mlp(layer, h);
        }
        Ok(self.logits(x))
    }
}

/// `cache[slots[i]] = rows[i]`. burn 0.21 implements `select_assign` for floats only as an
/// addition, so this adds `rows - old`: exact up to one rounding of the stale value (far below
/// bf16 precision). Slots are distinct (checked per batch).
fn overwrite_rows<B: Backend>(
    cache: Tensor<B, 3>,
    slots: &Tensor<B, 1, Int>,
    rows: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let old = cache.clone().select(0, slots.clone());
    cache.select_assign(0, slots.clone(), rows - old, IndexingUpdateOp::Add)
}

/// Rows of a `[s, vocab]` logits tensor as vectors.
pub fn logits_rows<B: Backend>(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [rows, vocab] = logits.dims();
    let data: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
    (0..rows)
        .map(|r| data[r * vocab..(r + 1) * vocab].to_vec())
        .collect()
}

/// Checks a batch against the model and a cache of `num_blocks` x `block_size` and returns the
/// cache slot of each of its tokens, in batch order.
pub(crate) fn plan_slots(
    c: &ModelConfig,
    batch: &ForwardBatch,
    block_size: usize,
    num_blocks: usize,
) -> Result<Vec<usize>, ModelError> {
    let mut slots = Vec::new();
    for (i, s) in batch.sequences.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(ModelError::Batch(format!("sequence {i} has no tokens")));
        }
        let end = s.start_position + s.tokens.len();
        if end > c.max_position_embeddings {
            return Err(ModelError::Batch(format!(
                "sequence {i} reaches position {end}, past the model's context of {}",
                c.max_position_embeddings
            )));
        }
        let blocks_needed = end.div_ceil(block_size);
        if s.block_table.len() < blocks_needed {
            return Err(ModelError::Batch(format!(
                "sequence {i} needs {blocks_needed} blocks for {end} tokens, its table has {}",
                s.block_table.len()
            )));
        }
        if let Some(&b) = s.block_table[..blocks_needed]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            return Err(ModelError::Batch(format!(
                "sequence {i}: block {b} is outside the cache of {num_blocks} blocks"
            )));
        }
        slots.extend(
            (s.start_position..end)
                .map(|p| s.block_table[p / block_size] as usize * block_size + p % block_size),
        );
    }
    let mut sorted = slots.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(ModelError::Batch(
            "two tokens of the batch write the same KV slot".into(),
        ));
    }
    Ok(slots)
}
