//! Decode attention launches: which kernel, and the split and occupancy of each launch
//! ([`decode_launch_shape`]), chosen from the device's resident blocks and the batch's contexts.

use super::*;

/// Which kernel runs decode attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// 16-lane groups, one token each, scores by FMAs and shuffles, K and V brought through two
    /// cp.async stages of shared memory (the default).
    Lanes,
    /// The same lane groups with K and V loaded straight into registers, so no loads in flight
    /// while a block computes (the first version; benchmark variant: KV group 4, head_dim 128).
    Registers,
    /// The GQA group's heads as the rows of tensor-core MMAs (benchmark variant: compute
    /// capability 9.0, KV group 4, head_dim 128).
    TensorCores,
    /// Persistent blocks, one an SM of the lane, splitting the batch by KV tokens into equal
    /// runs of 16-token tiles brought by bulk copies (`decode_stream.rs`; compute capability
    /// 9.0, KV group 4, head_dim 128): the overlapped executor's memory lane.
    Stream(StreamVariant),
}

/// Dynamic shared memory of the default decode kernel: two stages of 4 tokens a lane group
/// (128 threads x K, V x head_dim / 16 dims of bf16), or the 8 lane groups' merge (m, l and
/// head_dim accumulators of f32 a head) if larger.
pub fn decode_smem_bytes(group: usize, head_dim: usize) -> usize {
    let stage_bytes = 4 * 2 * 128 * (head_dim / 16) * 2;
    (2 * stage_bytes).max(4 * 8 * group * (head_dim + 2))
}

/// Threads a block of the split decode kernels (lanes, registers, tensor cores) launches with.
pub(super) const DECODE_BLOCK_THREADS: u32 = 128;

/// Dynamic shared memory of the tensor-core decode kernel: 4 warps x 2 stages x K, V x 16
/// tokens x 136 (padded) bf16.
pub(super) const DECODE_TC_SMEM_BYTES: usize = 4 * 2 * 2 * 16 * 136 * 2;

/// How decode attention splits each context: `split_tokens` per block, at most `max_splits`
/// blocks per sequence, partial results in `part_acc` / `part_ml` (device addresses).
#[derive(Clone, Copy)]
pub(super) struct DecodeSplit {
    pub(super) split_tokens: usize,
    pub(super) max_splits: usize,
    /// Dynamic shared memory of the decode launch (sets its occupancy).
    pub(super) smem_bytes: u32,
    pub(super) part_acc: u64,
    pub(super) part_ml: u64,
    /// The stream kernel and its shape, when it runs this decode attention (else the model's
    /// decode kernel does).
    pub(super) stream: Option<(StreamVariant, StreamShape)>,
}

/// An occupancy a decode launch may run at: `blocks_per_sm` resident blocks an SM, got with
/// `smem_bytes` of dynamic shared memory (the kernel's own, or padded so that fewer fit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct DecodeOccupancy {
    pub(super) blocks_per_sm: usize,
    pub(super) smem_bytes: u32,
}

/// How many occupancies a decode launch chooses from: the kernel's own and up to two lower.
pub(super) const DECODE_OCCUPANCIES: usize = 3;

/// Where decode blocks run: `sms` SMs at one of `occupancies` (the kernel's own first; an
/// entry of 0 blocks is none), and the split count and occupancy a benchmark forces instead of
/// [`decode_launch_shape`]'s.
#[derive(Clone, Copy, Debug)]
pub(super) struct DecodeSlots {
    pub(super) sms: usize,
    pub(super) occupancies: [DecodeOccupancy; DECODE_OCCUPANCIES],
    pub(super) forced_splits: Option<usize>,
    pub(super) forced_blocks_per_sm: Option<usize>,
    /// The stream kernel, when it runs these slots' decode attention, and the blocks a
    /// benchmark forces (else one an SM).
    pub(super) stream: Option<StreamVariant>,
    pub(super) forced_stream_ctas: Option<usize>,
    /// Context tokens a split takes whatever the batch (batch-invariant runs).
    pub(super) fixed_split_tokens: Option<usize>,
}

/// Context tokens a decode split takes in batch-invariant runs: an item's splits, and so the
/// order its attention sums in, depend on its own context alone.
pub(super) const INVARIANT_DECODE_SPLIT_TOKENS: usize = 512;

impl DecodeSlots {
    /// The splits and occupancy of a launch of `blocks` blocks over contexts of up to
    /// `max_ctx` tokens.
    pub(super) fn shape(&self, blocks: usize, max_ctx: usize) -> (usize, DecodeOccupancy) {
        let allowed: Vec<DecodeOccupancy> = self
            .occupancies
            .iter()
            .copied()
            .filter(|o| o.blocks_per_sm > 0)
            .filter(|o| {
                self.forced_blocks_per_sm
                    .is_none_or(|k| o.blocks_per_sm == k)
            })
            .collect();
        let most = allowed.first().copied().unwrap_or(self.occupancies[0]);
        if let Some(splits) = self.forced_splits {
            return (splits, most);
        }
        let per_sm: Vec<usize> = allowed.iter().map(|o| o.blocks_per_sm).collect();
        let (splits, k) = decode_launch_shape(blocks, self.sms, &per_sm, max_ctx);
        let occupancy = allowed
            .into_iter()
            .find(|o| o.blocks_per_sm == k)
            .unwrap_or(most);
        (splits, occupancy)
    }
}

/// Fewest context tokens a decode split takes (a lane-kernel block reads 32 a step).
pub(super) const MIN_DECODE_SPLIT_TOKENS: usize = 128;

/// Decode blocks an SM, on average, that keep enough loads in flight to pull the HBM
/// bandwidth (H100, `experiments/NOTES.md`: 2.9 an SM unsplit ran as fast as any split, 2.4
/// an SM ran at 0.75x of 2 splits).
pub(super) const DECODE_MIN_BLOCKS_PER_SM: f64 = 2.5;

/// What a split costs a decode launch, as a fraction of its time (the reduction kernel, the
/// partial results and the blocks' fixed costs again: 5-15% on the H100 where the blocks fit
/// either way, NOTES.md).
pub(super) const DECODE_SPLIT_COST: f64 = 0.1;

/// How full the waves of `blocks` blocks on `resident_blocks` slots are on average (the last
/// one partly idle). A partial single wave counts as partly idle too: launched as a
/// programmatic dependent, the next launch's blocks take the free slots early and end up
/// spread unevenly (H100: 64 x 512 at 5 blocks an SM, 148 slots free, ran at 0.77x of copy
/// against 0.87x at 4 an SM, 16 free; NOTES.md).
pub(super) fn wave_fill(blocks: usize, resident_blocks: usize) -> f64 {
    let waves = blocks as f64 / resident_blocks as f64;
    waves / waves.ceil()
}

/// The (splits, blocks an SM) of a decode launch of `blocks` blocks (items x KV heads) over
/// contexts of up to `max_ctx` tokens on `sms` SMs, the kernel able to run at any of
/// `blocks_per_sm` (its occupancy, and lower ones by padding its shared memory). A split
/// count at most one per 128 context tokens; among the shapes with enough blocks in flight
/// (`DECODE_MIN_BLOCKS_PER_SM` an SM), the best wave fill less `DECODE_SPLIT_COST` if split
/// (more waves fill better but cost as much), then within 3% of that the fewest splits, then
/// the most blocks an SM; with no shape that has enough blocks, the one with the most.
/// Measured on the H100 (NOTES.md, `cuda_bench --decode-sweep`): 96 items x 8 KV heads run
/// best as 1.94 waves of 3 blocks an SM rather than 1.45 of 4 or 1.16 of 5; 64 items as one
/// wave of 4 an SM; 32 items split in two.
pub fn decode_launch_shape(
    blocks: usize,
    sms: usize,
    blocks_per_sm: &[usize],
    max_ctx: usize,
) -> (usize, usize) {
    let first = blocks_per_sm.first().copied().unwrap_or(1);
    if blocks == 0 || sms == 0 {
        return (1, first);
    }
    let most_splits = max_ctx.div_ceil(MIN_DECODE_SPLIT_TOKENS).clamp(1, 64);
    let wanted = (DECODE_MIN_BLOCKS_PER_SM * sms as f64).ceil() as usize;
    // (splits, blocks an SM, blocks in flight at once, wave fill less the split's cost)
    let shapes: Vec<(usize, usize, usize, f64)> = blocks_per_sm
        .iter()
        .filter(|&&k| k > 0)
        .flat_map(|&k| {
            (1..=most_splits).map(move |s| {
                let n = blocks * s;
                let cost = if s > 1 { 1.0 - DECODE_SPLIT_COST } else { 1.0 };
                (s, k, n.min(sms * k), cost * wave_fill(n, sms * k))
            })
        })
        .collect();
    let enough: Vec<_> = shapes.iter().filter(|x| x.2 >= wanted).collect();
    let pick = if enough.is_empty() {
        let most = shapes.iter().map(|x| x.2).max().unwrap_or(0);
        shapes
            .iter()
            .filter(|x| x.2 == most)
            .min_by_key(|x| (x.0, std::cmp::Reverse(x.1)))
    } else {
        let best = enough.iter().map(|x| x.3).fold(0.0, f64::max);
        enough
            .into_iter()
            .filter(|x| x.3 >= best - 0.03)
            .min_by_key(|x| (x.0, std::cmp::Reverse(x.1)))
    };
    pick.map_or((1, first), |x| (x.0, x.1))
}

/// The decode split over the context (tokens per split, splits at most) and occupancy for the
/// blocks to fill `slots`, and the scratch (grown on `stream`) for the splits' partial results.
pub(super) fn decode_split(
    c: &ModelConfig,
    slots: DecodeSlots,
    stream: &Arc<CudaStream>,
    plan: &AttentionPlan,
    part_acc: &mut Scratch<f32>,
    part_ml: &mut Scratch<f32>,
) -> Result<DecodeSplit, ModelError> {
    // The stream kernel's tiles are whole 16-token blocks; other caches decode as before. It
    // cuts the batch's tokens into equal runs, so a fixed split (batch-invariant runs) keeps to
    // the split kernels.
    if let Some(variant) = slots.stream.filter(|_| {
        plan.block_size == STREAM_DECODE_CHUNK_TOKENS && slots.fixed_split_tokens.is_none()
    }) {
        let ctas = slots.forced_stream_ctas.unwrap_or(slots.sms);
        let stream_shape = stream_shape(
            plan.decode_chunks,
            plan.decode_max_ctx.div_ceil(STREAM_DECODE_CHUNK_TOKENS),
            c.num_kv_heads,
            ctas,
            variant.warps,
        );
        let entries = plan.decode_items * c.num_heads * stream_shape.max_parts;
        return Ok(DecodeSplit {
            split_tokens: 0,
            max_splits: 1,
            smem_bytes: 0,
            part_acc: part_acc.ptr(stream, entries * c.head_dim)?,
            part_ml: part_ml.ptr(stream, entries * 2)?,
            stream: Some((variant, stream_shape)),
        });
    }
    let (split_tokens, max_splits, occupancy) = if plan.decode_items > 0 {
        let blocks = plan.decode_items * c.num_kv_heads;
        let (splits, occupancy) = slots.shape(blocks, plan.decode_max_ctx);
        let split = slots.fixed_split_tokens.unwrap_or_else(|| {
            plan.decode_max_ctx
                .div_ceil(splits.max(1))
                .next_multiple_of(64)
        });
        (split, plan.decode_max_ctx.div_ceil(split), occupancy)
    } else {
        (256, 1, slots.occupancies[0])
    };
    let entries = plan.decode_items * c.num_heads * max_splits;
    Ok(DecodeSplit {
        split_tokens,
        max_splits,
        smem_bytes: occupancy.smem_bytes,
        part_acc: part_acc.ptr(stream, entries * c.head_dim)?,
        part_ml: part_ml.ptr(stream, entries * 2)?,
        stream: None,
    })
}

/// Device-memory bytes a second per SM above which the lane kernel runs out of instructions
/// before the memory runs out of bytes, so the tensor-core kernel (fewer instructions a byte)
/// decodes faster. Measured (device copy bandwidth, read plus written, over the SMs; NOTES.md):
/// H100 SXM 23 GB/s an SM, lanes 0.87-0.97 of copy against tensor cores' 0.71-0.92; H200 32 GB/s,
/// lanes 0.57-0.72 against 0.72-0.97 (17 of 20 cases faster, the others within 2 us).
pub(super) const TENSOR_CORE_DECODE_MIN_BYTES_PER_SEC_PER_SM: f64 = 28e9;

/// The decode kernel a model runs by default on a GPU with `sms` SMs whose device copy moves
/// `copy_bytes_per_sec`: the tensor-core kernel where there is one for this KV group and head
/// size (`tensor_cores_for_shape`) and the memory is fast for the SM count, else the lanes.
pub(super) fn preferred_decode_kernel(
    copy_bytes_per_sec: f64,
    sms: usize,
    tensor_cores_for_shape: bool,
) -> DecodeKernel {
    let per_sm = copy_bytes_per_sec / sms.max(1) as f64;
    if tensor_cores_for_shape && per_sm >= TENSOR_CORE_DECODE_MIN_BYTES_PER_SEC_PER_SM {
        DecodeKernel::TensorCores
    } else {
        DecodeKernel::Lanes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_cores_decode_where_memory_outruns_the_lanes() {
        // Measured copies: H100 SXM ~3.0 TB/s over 132 SMs, H200 ~4.25 TB/s.
        assert_eq!(
            preferred_decode_kernel(3.0e12, 132, true),
            DecodeKernel::Lanes
        );
        assert_eq!(
            preferred_decode_kernel(4.25e12, 132, true),
            DecodeKernel::TensorCores
        );
        // No tensor-core kernel for this KV group or head size: the lanes, whatever the GPU.
        assert_eq!(
            preferred_decode_kernel(4.25e12, 132, false),
            DecodeKernel::Lanes
        );
    }
}
