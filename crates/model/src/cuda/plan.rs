//! A step's attention plan: the rows, sequences and tiles the attention kernels read, built on the
//! host and uploaded once a step, and the activations' layout.

use super::*;

/// A planned and uploaded attention launch (benchmarks).
pub(super) struct AttentionRun {
    pub(super) plan: AttentionPlan,
    pub(super) ints: u64,
    pub(super) qkv: u64,
    pub(super) attn: u64,
    pub(super) split: DecodeSplit,
}

/// The rows of a step one pass over the layers works on (the whole batch, or one nano-batch of
/// the overlapped executor): their plan, where its indices sit on the device, their
/// activation rows and their decode split.
pub(super) struct StepRows<'a> {
    pub(super) plan: &'a AttentionPlan,
    pub(super) ints: u64,
    pub(super) acts: Activations,
    pub(super) rows: usize,
    pub(super) split: DecodeSplit,
}

impl StepRows<'_> {
    /// Device address of the plan's index array at `offset` (in i32s).
    pub(super) fn at(&self, offset: usize) -> u64 {
        self.ints + 4 * offset as u64
    }
}

/// Which of a step's attention work [`CudaLlama::attention`] queues.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum AttentionPart {
    Both,
    Decode,
    Prefill,
}

/// Width of the fused q, k, v projection's output.
pub(super) fn qkv_width(c: &ModelConfig) -> usize {
    (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
}

/// A step's activation buffers (device addresses of their first row), row-major bf16.
#[derive(Clone, Copy)]
pub(super) struct Activations {
    /// Residual stream `[rows, hidden]`.
    pub(super) x: u64,
    /// Normed residual `[rows, hidden]`.
    pub(super) normed: u64,
    /// q, k, v projections `[rows, qkv_width]`.
    pub(super) qkv: u64,
    /// Attention output `[rows, heads * head_dim]`.
    pub(super) attn: u64,
    /// Output of the O and down projections `[rows, hidden]`.
    pub(super) delta: u64,
    /// Gate and up projections `[rows, 2 * intermediate]`.
    pub(super) gate_up: u64,
    /// SiLU(gate) * up `[rows, intermediate]`.
    pub(super) act: u64,
}

impl Activations {
    /// The same buffers from row `row` on.
    pub(super) fn rows_from(&self, c: &ModelConfig, row: usize) -> Activations {
        let at = |base: u64, width: usize| base + 2 * (row * width) as u64;
        Activations {
            x: at(self.x, c.hidden_size),
            normed: at(self.normed, c.hidden_size),
            qkv: at(self.qkv, qkv_width(c)),
            attn: at(self.attn, c.num_heads * c.head_dim),
            delta: at(self.delta, c.hidden_size),
            gate_up: at(self.gate_up, 2 * c.intermediate_size),
            act: at(self.act, c.intermediate_size),
        }
    }
}

/// Where a step's attention work goes, built on the host and uploaded in one copy.
#[derive(Default)]
pub(super) struct AttentionPlan {
    pub(super) ints: Vec<i32>,
    pub(super) decode_items: usize,
    pub(super) decode_max_ctx: usize,
    pub(super) prefill_tiles: usize,
    pub(super) prefill_seqs: usize,
    // Offsets (in i32s) of each array inside `ints`.
    pub(super) tokens: usize,
    pub(super) positions: usize,
    pub(super) slots: usize,
    pub(super) tables: usize,
    pub(super) item_rows: usize,
    pub(super) item_ctx: usize,
    pub(super) item_table_off: usize,
    /// Per decode item, the 16-token chunks of the items before it (`decode_items + 1`
    /// entries, the last the total): the stream decode kernel's tile numbering.
    pub(super) item_chunk_start: usize,
    pub(super) decode_chunks: usize,
    /// Tokens a cache block (the stream decode kernel's tiles are single blocks of 16).
    pub(super) block_size: usize,
    pub(super) tile_seq: usize,
    pub(super) tile_q0: usize,
    pub(super) seq_row0: usize,
    pub(super) seq_start: usize,
    pub(super) seq_len: usize,
    pub(super) seq_table_off: usize,
    pub(super) logit_rows: usize,
    pub(super) num_logit_rows: usize,
}

impl AttentionPlan {
    /// The plan of `batch`'s attention; with `longest_decodes_first`, the decode items ordered
    /// by falling context (ties in batch order), which the decode grid launches in order.
    pub(super) fn build(
        batch: &ForwardBatch,
        slots: &[usize],
        block_size: usize,
        longest_decodes_first: bool,
    ) -> AttentionPlan {
        let mut p = AttentionPlan {
            block_size,
            ..AttentionPlan::default()
        };
        let mut table_off = Vec::new();
        let mut tables = Vec::new();
        for s in &batch.sequences {
            table_off.push(tables.len() as i32);
            let end = s.start_position + s.tokens.len();
            tables.extend(
                s.block_table[..end.div_ceil(block_size)]
                    .iter()
                    .map(|&b| b as i32),
            );
        }
        let ints = &mut p.ints;
        p.tokens = ints.len();
        for s in &batch.sequences {
            ints.extend(s.tokens.iter().map(|&t| t as i32));
        }
        p.positions = ints.len();
        for s in &batch.sequences {
            ints.extend((s.start_position..s.start_position + s.tokens.len()).map(|x| x as i32));
        }
        p.slots = ints.len();
        ints.extend(slots.iter().map(|&x| x as i32));
        p.tables = ints.len();
        ints.extend(&tables);
        let mut rows = Vec::with_capacity(batch.sequences.len());
        let mut row = 0usize;
        for s in &batch.sequences {
            rows.push(row);
            row += s.tokens.len();
        }
        let mut decode: Vec<usize> = (0..batch.sequences.len())
            .filter(|&i| batch.sequences[i].tokens.len() == 1)
            .collect();
        if longest_decodes_first {
            decode.sort_by_key(|&i| std::cmp::Reverse(batch.sequences[i].start_position));
        }
        let prefill: Vec<usize> = (0..batch.sequences.len())
            .filter(|&i| batch.sequences[i].tokens.len() > 1)
            .collect();
        p.decode_items = decode.len();
        p.item_rows = ints.len();
        ints.extend(decode.iter().map(|&i| rows[i] as i32));
        p.item_ctx = ints.len();
        ints.extend(
            decode
                .iter()
                .map(|&i| batch.sequences[i].start_position as i32 + 1),
        );
        p.decode_max_ctx = decode
            .iter()
            .map(|&i| batch.sequences[i].start_position + 1)
            .max()
            .unwrap_or(0);
        p.item_table_off = ints.len();
        ints.extend(decode.iter().map(|&i| table_off[i]));
        p.item_chunk_start = ints.len();
        let mut chunks = 0usize;
        for &i in &decode {
            ints.push(chunks as i32);
            chunks += (batch.sequences[i].start_position + 1).div_ceil(STREAM_DECODE_CHUNK_TOKENS);
        }
        ints.push(chunks as i32);
        p.decode_chunks = chunks;
        p.prefill_seqs = prefill.len();
        let mut tile_seq = Vec::new();
        let mut tile_q0 = Vec::new();
        for (k, &i) in prefill.iter().enumerate() {
            let len = batch.sequences[i].tokens.len();
            for q0 in (0..len).step_by(PREFILL_TILE_ROWS) {
                tile_seq.push(k as i32);
                tile_q0.push(q0 as i32);
            }
        }
        p.prefill_tiles = tile_seq.len();
        p.tile_seq = ints.len();
        ints.extend(&tile_seq);
        p.tile_q0 = ints.len();
        ints.extend(&tile_q0);
        p.seq_row0 = ints.len();
        ints.extend(prefill.iter().map(|&i| rows[i] as i32));
        p.seq_start = ints.len();
        ints.extend(
            prefill
                .iter()
                .map(|&i| batch.sequences[i].start_position as i32),
        );
        p.seq_len = ints.len();
        ints.extend(
            prefill
                .iter()
                .map(|&i| batch.sequences[i].tokens.len() as i32),
        );
        p.seq_table_off = ints.len();
        ints.extend(prefill.iter().map(|&i| table_off[i]));
        p.logit_rows = ints.len();
        for (i, s) in batch.sequences.iter().enumerate() {
            if s.logits {
                ints.push((rows[i] + s.tokens.len() - 1) as i32);
            }
        }
        p.num_logit_rows = ints.len() - p.logit_rows;
        p
    }
}
