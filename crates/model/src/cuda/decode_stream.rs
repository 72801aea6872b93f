//! The stream decode kernel (`kernels/decode_stream.cu`): persistent blocks, one an SM, whose
//! warps split a step's decode attention by KV tokens into equal runs of 16-token tiles. Its
//! variants, its shape for a batch (runs, parts a pair may be cut into) and its launch.

use super::*;

/// Tokens of a stream-kernel tile (one chunk of one KV head's context).
pub(super) const STREAM_DECODE_CHUNK_TOKENS: usize = 16;

/// A compiled variant of the stream decode kernel: `warps` warps a block, each with `stages`
/// tiles of K and V in its shared-memory ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamVariant {
    pub warps: usize,
    pub stages: usize,
}

impl StreamVariant {
    /// The default: 12 warps x 2 stages (the most tiles a warp's latency allows an SM; 8 x 3
    /// pulled ~85 GB/s an SM against 12 x 2's ~103 on the H200, NOTES.md).
    pub const DEFAULT: StreamVariant = StreamVariant {
        warps: 12,
        stages: 2,
    };

    /// Every compiled variant (each fills ~200 KiB of shared memory).
    pub const ALL: [StreamVariant; 3] = [
        StreamVariant::DEFAULT,
        StreamVariant {
            warps: 8,
            stages: 3,
        },
        StreamVariant {
            warps: 13,
            stages: 2,
        },
    ];

    pub(super) fn function_name(self, group: usize) -> String {
        format!(
            "paged_decode_stream_g{group}_w{}_s{}",
            self.warps, self.stages
        )
    }

    /// Dynamic shared memory: 1 KiB to align the rings, the rings (K and V tiles of 16 x 128
    /// bf16) and an mbarrier a stage.
    pub fn smem_bytes(self) -> usize {
        let stage = 2 * STREAM_DECODE_CHUNK_TOKENS * 128 * 2;
        1024 + self.warps * self.stages * (stage + 8)
    }
}

/// How a stream decode launch cuts a batch: `ctas` blocks, `tiles_per_warp` tiles a warp, and
/// at most `max_parts` runs touching one (item, KV head).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StreamShape {
    pub(super) ctas: usize,
    pub(super) tiles_per_warp: usize,
    pub(super) max_parts: usize,
}

/// The shape of a stream launch over `total_chunks` chunks (of all items, one KV head) whose
/// longest item has `max_item_chunks`, on `ctas` blocks of `warps` warps: equal runs of
/// `tiles_per_warp` over `total_chunks x kv_heads` tiles.
pub(super) fn stream_shape(
    total_chunks: usize,
    max_item_chunks: usize,
    kv_heads: usize,
    ctas: usize,
    warps: usize,
) -> StreamShape {
    let tiles = total_chunks * kv_heads;
    let runs = (ctas * warps).max(1);
    let tiles_per_warp = tiles.div_ceil(runs).max(1);
    StreamShape {
        ctas: ctas.max(1),
        tiles_per_warp,
        // A pair of n tiles starting anywhere spans at most ceil((n - 1) / P) + 1 runs.
        max_parts: max_item_chunks.saturating_sub(1).div_ceil(tiles_per_warp) + 1,
    }
}

impl CudaLlama {
    /// Launches the stream decode kernel (and the reduction of cut pairs) for `plan` on
    /// `stream` (see [`CudaLlama::attention`] for the pointers).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn launch_stream_decode(
        &self,
        stream: CUstream,
        variant: StreamVariant,
        shape: StreamShape,
        plan: &AttentionPlan,
        ints: u64,
        qkv: u64,
        attn: u64,
        maps: &[CUtensorMap; 2],
        split: &DecodeSplit,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let group = c.num_heads / c.num_kv_heads;
        let f = self
            .kernels
            .decode_stream
            .get(&(group, variant))
            .ok_or_else(|| ModelError::Cuda(format!("no stream decode kernel {variant:?}")))?;
        let at = |off: usize| ints + 4 * off as u64;
        let scale_log2 = (1.0 / (c.head_dim as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        launch_smem_on(
            stream,
            f,
            (shape.ctas as u32, 1, 1),
            (variant.warps * 32) as u32,
            variant.smem_bytes() as u32,
            &[
                Ptr(attn),
                Ptr(split.part_acc),
                Ptr(split.part_ml),
                Ptr(qkv),
                Arg::TensorMap(&maps[0]),
                Arg::TensorMap(&maps[1]),
                Ptr(at(plan.tables)),
                Ptr(at(plan.item_rows)),
                Ptr(at(plan.item_ctx)),
                Ptr(at(plan.item_table_off)),
                Ptr(at(plan.item_chunk_start)),
                I32(plan.decode_items as i32),
                I32(c.num_kv_heads as i32),
                I32(shape.tiles_per_warp as i32),
                I32(shape.max_parts as i32),
                F32(scale_log2),
            ],
            "paged decode attention (stream)",
            false,
        )?;
        if shape.max_parts > 1 {
            self.launch_on(
                stream,
                &self.kernels.decode_stream_reduce,
                (plan.decode_items as u32, c.num_heads as u32, 1),
                c.head_dim as u32,
                &[
                    Ptr(attn),
                    Ptr(split.part_acc),
                    Ptr(split.part_ml),
                    Ptr(at(plan.item_rows)),
                    Ptr(at(plan.item_ctx)),
                    Ptr(at(plan.item_chunk_start)),
                    I32(c.num_heads as i32),
                    I32(c.num_kv_heads as i32),
                    I32(c.head_dim as i32),
                    I32(shape.tiles_per_warp as i32),
                    I32(shape.max_parts as i32),
                ],
                "paged decode reduce (stream)",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (item, KV head) pair's runs, counted the way the kernels count them, fit in
    /// `max_parts`, and the runs cover every tile.
    #[test]
    fn stream_runs_cover_the_tiles_and_fit_the_parts() {
        let cases: &[(&[usize], usize, usize, usize)] = &[
            (&[1, 1, 1], 8, 132, 8),
            (&[32; 64], 8, 32, 8),
            (&[4, 512, 33, 1, 128], 8, 16, 12),
            (&[1000], 8, 132, 4),
            (&[7, 9, 200, 3], 2, 1, 8),
        ];
        for &(item_chunks, kv_heads, ctas, warps) in cases {
            let total: usize = item_chunks.iter().sum();
            let longest = *item_chunks.iter().max().unwrap();
            let s = stream_shape(total, longest, kv_heads, ctas, warps);
            assert!(s.tiles_per_warp * ctas * warps >= total * kv_heads);
            let mut start = 0;
            for &n in item_chunks {
                for kvh in 0..kv_heads {
                    let first = start * kv_heads + kvh * n;
                    let parts = (first + n - 1) / s.tiles_per_warp - first / s.tiles_per_warp + 1;
                    assert!(parts <= s.max_parts, "{parts} > {}", s.max_parts);
                }
                start += n;
            }
        }
    }
}
