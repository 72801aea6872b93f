//! Attention on the step's rows: which prefill and decode kernels run and how each decode launch
//! is shaped (the model's settings, for benchmarks too), and the launches themselves, on the
//! whole GPU or a lane of SMs.

use super::*;

impl CudaLlama {
    /// The kernel prefill attention runs on (the fastest this GPU and head size allow, unless
    /// set otherwise).
    pub fn prefill_kernel(&self) -> PrefillKernel {
        self.prefill_kernel
    }

    /// The prefill kernel that runs over a cache of `block_size`-token blocks: the chosen one,
    /// or, when it loads by TMA and such blocks do not suit TMA boxes, the best preferred one
    /// that does not.
    pub(super) fn prefill_kernel_for(&self, block_size: usize) -> PrefillKernel {
        match self.prefill_kernel {
            PrefillKernel::Wgmma(v) if v.tma && !tma_block_size_ok(block_size) => {
                preferred_prefill_kernel(&self.config, &self.kernels, false)
            }
            kernel => kernel,
        }
    }

    /// Chooses the prefill attention kernel (benchmarks compare them); an error if this GPU or
    /// head size cannot run it.
    pub fn set_prefill_kernel(&mut self, kernel: PrefillKernel) -> Result<(), ModelError> {
        if let PrefillKernel::Wgmma(variant) = kernel {
            if !self.kernels.prefill_wgmma.contains_key(&variant) {
                self.kernels.load_all_wgmma_variants(&self.ctx)?;
            }
            let c = &self.config;
            let group = c.num_heads / c.num_kv_heads;
            if !self.kernels.prefill_wgmma.contains_key(&variant)
                || c.head_dim != WGMMA_HEAD_DIM
                || !group.is_multiple_of(variant.heads_per_block())
            {
                return Err(ModelError::Cuda(format!(
                    "no wgmma prefill kernel {variant:?} for head_dim {} and KV group {group} \
                     (it needs compute capability 9.0, head_dim {WGMMA_HEAD_DIM}, and the \
                     block's heads dividing the group)",
                    c.head_dim
                )));
            }
        }
        self.prefill_kernel = kernel;
        Ok(())
    }

    pub fn decode_kernel(&self) -> DecodeKernel {
        self.decode_kernel
    }

    /// Chooses the decode attention kernel (benchmarks compare them); an error if this GPU,
    /// KV group or head size has no such kernel.
    pub fn set_decode_kernel(&mut self, kernel: DecodeKernel) -> Result<(), ModelError> {
        if self.batch_invariant && matches!(kernel, DecodeKernel::Stream(_)) {
            return Err(stream_not_invariant());
        }
        if kernel != DecodeKernel::Lanes {
            if kernel == DecodeKernel::Registers {
                self.kernels.load_all_wgmma_variants(&self.ctx)?;
            }
            let c = &self.config;
            let group = c.num_heads / c.num_kv_heads;
            let present = match kernel {
                DecodeKernel::Lanes => true,
                DecodeKernel::Registers => group == 4 && self.kernels.decode_registers.is_some(),
                DecodeKernel::TensorCores => self.kernels.decode_tc.contains_key(&group),
                DecodeKernel::Stream(v) => self.kernels.decode_stream.contains_key(&(group, v)),
            };
            if c.head_dim != 128 || !present {
                return Err(ModelError::Cuda(format!(
                    "no {kernel:?} decode kernel for KV group {group} and head_dim {}",
                    c.head_dim
                )));
            }
        }
        self.decode_kernel = kernel;
        self.decode_occupancies = self.decode_occupancies()?;
        Ok(())
    }

    /// The occupancies the current decode kernel may run at: as many blocks an SM as fit with
    /// its own shared memory, then one and two fewer with the dynamic shared memory padded to
    /// an SM's share (from the driver's sizes, checked by its occupancy calculator).
    pub(super) fn decode_occupancies(
        &self,
    ) -> Result<[DecodeOccupancy; DECODE_OCCUPANCIES], ModelError> {
        use cudarc::driver::sys::{CUdevice_attribute as Dev, CUfunction_attribute as Func};
        let (f, smem_bytes, threads) = self.decode_function();
        let occupancy = |smem: u32| {
            f.occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)
                .map(|b| b as usize)
                .map_err(|e| cuda_err("decode kernel occupancy", e))
        };
        let device = |a| {
            self.ctx
                .attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(|e| cuda_err("shared memory sizes", e))
        };
        let function = |a| {
            f.get_attribute(a)
                .map(|v| v.max(0) as usize)
                .map_err(|e| cuda_err("decode kernel attributes", e))
        };
        let per_sm = device(Dev::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?;
        let reserved = device(Dev::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?;
        let static_bytes = function(Func::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let max_dynamic = function(Func::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)?;
        let most = occupancy(smem_bytes)?.max(1);
        let mut out = [DecodeOccupancy::default(); DECODE_OCCUPANCIES];
        out[0] = DecodeOccupancy {
            blocks_per_sm: most,
            smem_bytes,
        };
        let mut n = 1;
        for k in (most.saturating_sub(DECODE_OCCUPANCIES - 1).max(1)..most).rev() {
            let padded = (per_sm / k).saturating_sub(reserved + static_bytes);
            if padded > smem_bytes as usize
                && padded <= max_dynamic
                && occupancy(padded as u32)? == k
            {
                out[n] = DecodeOccupancy {
                    blocks_per_sm: k,
                    smem_bytes: padded as u32,
                };
                n += 1;
            }
        }
        Ok(out)
    }

    /// The current decode kernel for this model's KV group and head_dim, its dynamic shared
    /// memory and its threads a block (`set_decode_kernel` checked that the kernel exists).
    pub(super) fn decode_function(&self) -> (&CudaFunction, u32, u32) {
        let c = &self.config;
        let (group, head_dim) = (c.num_heads / c.num_kv_heads, c.head_dim);
        match self.decode_kernel {
            DecodeKernel::Lanes => (
                &self.kernels.decode[&(group, head_dim)],
                decode_smem_bytes(group, head_dim) as u32,
                DECODE_BLOCK_THREADS,
            ),
            DecodeKernel::Registers => (
                self.kernels
                    .decode_registers
                    .as_ref()
                    .expect("set_decode_kernel checked"),
                0,
                DECODE_BLOCK_THREADS,
            ),
            DecodeKernel::TensorCores => (
                &self.kernels.decode_tc[&group],
                DECODE_TC_SMEM_BYTES as u32,
                DECODE_BLOCK_THREADS,
            ),
            DecodeKernel::Stream(v) => (
                &self.kernels.decode_stream[&(group, v)],
                v.smem_bytes() as u32,
                (v.warps * 32) as u32,
            ),
        }
    }

    /// Blocks of the current decode kernel an SM holds at once with its own shared memory.
    pub fn decode_blocks_per_sm(&self) -> usize {
        self.decode_occupancies[0].blocks_per_sm
    }

    /// The blocks an SM the current decode kernel may run at (its own, then lower ones).
    pub fn decode_occupancy_choices(&self) -> Vec<usize> {
        self.decode_occupancies
            .iter()
            .map(|o| o.blocks_per_sm)
            .filter(|&k| k > 0)
            .collect()
    }

    /// Forces every context into `splits` decode splits (benchmarks), or (`None`) lets
    /// [`decode_launch_shape`] choose; without a forced occupancy, at the kernel's own.
    pub fn set_decode_splits(&mut self, splits: Option<usize>) {
        self.forced_decode_splits = splits.map(|s| s.max(1));
    }

    /// Runs the stream decode kernel as `ctas` blocks (benchmarks: its bandwidth on that many
    /// SMs), or (`None`) one block an SM of the lane it runs on.
    pub fn set_stream_decode_ctas(&mut self, ctas: Option<usize>) {
        self.forced_stream_ctas = ctas.map(|n| n.max(1));
    }

    /// Launches decode attention as a programmatic dependent of the kernel before it (the
    /// default on compute capability 9.0 and newer), or plainly (benchmarks compare).
    pub fn set_decode_dependent_launch(&mut self, dependent: bool) {
        self.decode_dependent_launch = dependent && self.kernels.compute_capability.0 >= 9;
    }

    /// Launches decode items longest context first (the default), or in batch order
    /// (benchmarks compare).
    pub fn set_decode_longest_first(&mut self, longest_first: bool) {
        self.decode_longest_first = longest_first;
    }

    /// Forces decode launches to `blocks_per_sm` of [`CudaLlama::decode_occupancy_choices`]
    /// (benchmarks), or (`None`) lets [`decode_launch_shape`] choose.
    pub fn set_decode_blocks_per_sm(&mut self, blocks_per_sm: Option<usize>) {
        self.forced_decode_blocks_per_sm = blocks_per_sm;
    }

    /// Makes every sequence's tokens and logits independent of the batch it runs in, and so of
    /// step sizes, ranks and shards: every GEMM on the persistent kernel (f32 logits included;
    /// it never splits K, so every tile sums in one order), decode attention split every [`INVARIANT_DECODE_SPLIT_TOKENS`] context
    /// tokens and never on the stream kernel. Needs compute capability 9.0 (the persistent
    /// kernel); slower than the default (cuBLAS picks faster kernels per shape).
    pub fn set_batch_invariant(&mut self, on: bool) -> Result<(), ModelError> {
        if on && matches!(self.decode_kernel, DecodeKernel::Stream(_)) {
            return Err(stream_not_invariant());
        }
        if on && !self.gemm.set_batch_invariant(true) {
            return Err(ModelError::Cuda(
                "batch-invariant runs need the persistent GEMM (compute capability 9.0)".into(),
            ));
        }
        self.gemm.set_batch_invariant(on);
        self.batch_invariant = on;
        if let Some(o) = &self.overlap {
            for lane in &o.lanes {
                lane.gemm.set_batch_invariant(on);
            }
        }
        // Re-sizes the compute lane's GEMMs (the persistent kernel on its SMs when on).
        self.set_lane_gemm(self.lane_gemm)
    }

    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// Forces the overlapped executor's memory lane to decode with `kernel` (benchmarks; the
    /// stream kernel or the model's decode kernel), or (`None`) lets the executor choose.
    pub fn set_lane_decode_kernel(&mut self, kernel: Option<DecodeKernel>) {
        self.forced_lane_decode = kernel;
    }

    /// The decode kernel of the overlapped executor's memory lane: the stream kernel where the
    /// lane has `memory_sms` of its own (SMs split, not shared) and the GPU and model have it.
    pub fn lane_decode_kernel(&self) -> DecodeKernel {
        let c = &self.config;
        let group = c.num_heads / c.num_kv_heads;
        let own_sms = matches!(
            self.executor(),
            StepExecutor::Adaptive
                | StepExecutor::Overlapped {
                    split: SmSplit::GemmTarget | SmSplit::GreenContexts,
                    ..
                }
        );
        match self.forced_lane_decode {
            Some(k) => k,
            None if own_sms
                && !self.batch_invariant
                && c.head_dim == 128
                && self
                    .kernels
                    .decode_stream
                    .contains_key(&(group, StreamVariant::DEFAULT)) =>
            {
                DecodeKernel::Stream(StreamVariant::DEFAULT)
            }
            None => self.decode_kernel,
        }
    }

    /// The decode slots of the memory lane's `sms` SMs, for its decode kernel.
    pub(super) fn memory_lane_slots(&self, sms: usize) -> DecodeSlots {
        let mut slots = self.decode_slots(sms);
        slots.stream = match self.lane_decode_kernel() {
            DecodeKernel::Stream(v) => Some(v),
            _ => None,
        };
        slots
    }

    /// The decode slots of `sms` SMs.
    pub(super) fn decode_slots(&self, sms: usize) -> DecodeSlots {
        DecodeSlots {
            sms,
            occupancies: self.decode_occupancies,
            forced_splits: self.forced_decode_splits,
            forced_blocks_per_sm: self.forced_decode_blocks_per_sm,
            stream: match self.decode_kernel {
                DecodeKernel::Stream(v) => Some(v),
                _ => None,
            },
            forced_stream_ctas: self.forced_stream_ctas,
            fixed_split_tokens: self
                .batch_invariant
                .then_some(INVARIANT_DECODE_SPLIT_TOKENS),
        }
    }

    /// One layer's attention for the step in `plan` (indices at `ints` on the device): decode
    /// items through the split decode kernel (and its reduction), prefill chunks through the
    /// tensor-core kernel. Reads q from `qkv`, K and V from the cache; writes `attn`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        stream: CUstream,
        plan: &AttentionPlan,
        ints: u64,
        qkv: u64,
        attn: u64,
        cache: &CudaKvCache,
        layer: usize,
        split: &DecodeSplit,
        part: AttentionPart,
    ) -> Result<(), ModelError> {
        let (kc, vc) = (
            raw_ptr(&cache.keys[layer], &self.stream),
            raw_ptr(&cache.values[layer], &self.stream),
        );
        let block_size = cache.block_size;
        let DecodeSplit {
            split_tokens,
            max_splits,
            smem_bytes,
            part_acc,
            part_ml,
            ..
        } = *split;
        let c = &self.config;
        let (heads, kv_heads, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let (heads_i, kv_i, d_i) = (heads as i32, kv_heads as i32, d as i32);
        let bs_i = block_size as i32;
        let scale_log2 = (1.0 / (d as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        let at = |off: usize| ints + 4 * off as u64;
        if let (Some((variant, shape)), true) = (
            split.stream,
            plan.decode_items > 0 && part != AttentionPart::Prefill,
        ) {
            self.launch_stream_decode(
                stream,
                variant,
                shape,
                plan,
                ints,
                qkv,
                attn,
                cache.tensor_maps.get(layer).ok_or_else(|| {
                    ModelError::Cuda(format!(
                        "the stream decode kernel needs the cache's TMA descriptors (layer {layer})"
                    ))
                })?,
                split,
            )?;
        } else if plan.decode_items > 0 && part != AttentionPart::Prefill {
            let (f, _, threads) = self.decode_function();
            let (split_i, max_splits_i) = (split_tokens as i32, max_splits as i32);
            launch_smem_on(
                stream,
                f,
                // KV heads fastest: an item's blocks launch together, items in plan order.
                (kv_heads as u32, plan.decode_items as u32, max_splits as u32),
                threads,
                smem_bytes,
                &[
                    Ptr(attn),
                    Ptr(part_acc),
                    Ptr(part_ml),
                    Ptr(qkv),
                    Ptr(kc),
                    Ptr(vc),
                    Ptr(at(plan.tables)),
                    Ptr(at(plan.item_rows)),
                    Ptr(at(plan.item_ctx)),
                    Ptr(at(plan.item_table_off)),
                    I32(kv_i),
                    I32(bs_i),
                    I32(split_i),
                    I32(max_splits_i),
                    F32(scale_log2),
                ],
                "paged decode attention",
                self.decode_dependent_launch,
            )?;
            if max_splits > 1 {
                self.launch_on(
                    stream,
                    &self.kernels.decode_reduce,
                    (plan.decode_items as u32, heads as u32, 1),
                    d as u32,
                    &[
                        Ptr(attn),
                        Ptr(part_acc),
                        Ptr(part_ml),
                        Ptr(at(plan.item_rows)),
                        Ptr(at(plan.item_ctx)),
                        I32(heads_i),
                        I32(d_i),
                        I32(split_i),
                        I32(max_splits_i),
                    ],
                    "paged decode reduce",
                )?;
            }
        }
        if plan.prefill_tiles > 0 && part != AttentionPart::Decode {
            // (set_prefill_kernel checked that the variant exists and divides the group.)
            let kernel = self.prefill_kernel_for(block_size);
            let (f, heads_per_block, threads, smem_bytes) = match kernel {
                PrefillKernel::Wgmma(v) => (
                    &self.kernels.prefill_wgmma[&v],
                    v.heads_per_block(),
                    128 * v.warpgroups,
                    wgmma_prefill_smem_bytes(v),
                ),
                PrefillKernel::MmaSync => {
                    (&self.kernels.prefill[&d], 1, 128, prefill_smem_bytes(d))
                }
            };
            if plan.prefill_tiles > 65535 {
                return Err(ModelError::Batch(format!(
                    "{} prefill tiles of {PREFILL_TILE_ROWS} rows in one step: at most 65535",
                    plan.prefill_tiles
                )));
            }
            // TMA variants read K and V through the layer's tensor maps (encoded with the cache;
            // prefill_kernel_for chose TMA only for blocks that have them).
            let maps = match kernel {
                PrefillKernel::Wgmma(v) if v.tma => {
                    Some(cache.tensor_maps.get(layer).ok_or_else(|| {
                        ModelError::Cuda(format!("no TMA descriptors for layer {layer}"))
                    })?)
                }
                _ => None,
            };
            launch_smem_on(
                stream,
                f,
                // Head groups fastest, tiles in y (a grid's y is at most 65535).
                (
                    (heads / heads_per_block) as u32,
                    plan.prefill_tiles as u32,
                    1,
                ),
                threads as u32,
                smem_bytes as u32,
                &[
                    Ptr(attn),
                    Ptr(qkv),
                    maps.map_or(Ptr(kc), |[k, _]| Arg::TensorMap(k)),
                    maps.map_or(Ptr(vc), |[_, v]| Arg::TensorMap(v)),
                    Ptr(at(plan.tables)),
                    Ptr(at(plan.tile_seq)),
                    Ptr(at(plan.tile_q0)),
                    Ptr(at(plan.seq_row0)),
                    Ptr(at(plan.seq_start)),
                    Ptr(at(plan.seq_len)),
                    Ptr(at(plan.seq_table_off)),
                    I32(heads_i),
                    I32(kv_i),
                    I32(bs_i),
                    F32(scale_log2),
                ],
                "paged prefill attention",
                false,
            )?;
        }
        Ok(())
    }

    /// Plans layer 0's attention for `batch` over `cache` (decode split sized for `sm_count`
    /// SMs) and uploads the plan: what the attention benchmarks launch again and again.
    pub(super) fn prepare_attention(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        sm_count: usize,
    ) -> Result<AttentionRun, ModelError> {
        let c = self.config.clone();
        let slots = plan_slots(&c, batch, cache.block_size, cache.num_blocks)?;
        let n = slots.len();
        let plan = AttentionPlan::build(batch, &slots, cache.block_size, self.decode_longest_first);
        let stream = self.stream.clone();
        let ints = self.ints.ptr(&stream, plan.ints.len())?;
        unsafe { cudarc::driver::result::memcpy_htod_async(ints, &plan.ints, stream.cu_stream()) }
            .map_err(|e| cuda_err("upload", e))?;
        let qkv = self
            .qkv_buf
            .ptr(&stream, n * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)?;
        let attn = self.attn.ptr(&stream, n * c.num_heads * c.head_dim)?;
        let split = decode_split(
            &c,
            self.decode_slots(sm_count),
            &stream,
            &plan,
            &mut self.part_acc,
            &mut self.part_ml,
        )?;
        Ok(AttentionRun {
            plan,
            ints,
            qkv,
            attn,
            split,
        })
    }

    /// One launch of a prepared attention on `stream`.
    pub(super) fn launch_attention(
        &self,
        stream: CUstream,
        run: &AttentionRun,
        cache: &CudaKvCache,
    ) -> Result<(), ModelError> {
        self.attention(
            stream,
            &run.plan,
            run.ints,
            run.qkv,
            run.attn,
            cache,
            0,
            &run.split,
            AttentionPart::Both,
        )
    }

    /// Seconds one layer's attention takes for `batch` (its K and V already in `cache`; q is
    /// whatever the scratch holds), averaged over `repeats` launches timed by CUDA events.
    pub fn time_attention(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        repeats: usize,
    ) -> Result<f64, ModelError> {
        let run = self.prepare_attention(batch, cache, self.sm_count)?;
        let main = self.stream.cu_stream();
        self.launch_attention(main, &run, cache)?;
        self.time(repeats, |m| m.launch_attention(main, &run, cache))
    }

    /// [`CudaLlama::time_attention`] on a green-context partition of about `sms` SMs (its decode
    /// split sized for them): seconds per launch and the SMs the driver gave.
    pub fn time_attention_on_sms(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        sms: usize,
        repeats: usize,
    ) -> Result<(f64, usize), ModelError> {
        let run = self.prepare_attention(batch, cache, sms.min(self.sm_count))?;
        // The uploads and scratch above come first.
        self.synchronize()?;
        overlap::time_on_partition(&self.ctx, sms, repeats, |lane| {
            self.launch_attention(lane, &run, cache)
        })
    }

    /// Fills the query scratch for `batch` and layer 0's K and V in `cache` with uniform random
    /// values in [-1, 1) (for comparing attention kernels on the same inputs).
    pub fn randomize_attention_inputs(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        seed: u32,
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        let rows: usize = batch.sequences.iter().map(|s| s.tokens.len()).sum();
        let stream = self.stream.clone();
        let qkv_len = rows * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        let qkv = self.qkv_buf.ptr(&stream, qkv_len)?;
        let kv_len = cache.num_blocks * cache.block_size * c.num_kv_heads * c.head_dim;
        let targets = [
            (qkv, qkv_len),
            (raw_ptr(&cache.keys[0], &stream), kv_len),
            (raw_ptr(&cache.values[0], &stream), kv_len),
        ];
        for (i, (ptr, len)) in targets.into_iter().enumerate() {
            self.fill_uniform(ptr, len, seed.wrapping_mul(3).wrapping_add(i as u32), 1.0)?;
        }
        Ok(())
    }

    /// The attention output of the last [`CudaLlama::time_attention`] (`rows` x heads x
    /// head_dim, as f32; waits for the GPU).
    pub fn attention_output(&self, rows: usize) -> Result<Vec<f32>, ModelError> {
        let len = rows * self.config.num_heads * self.config.head_dim;
        let buf = self
            .attn
            .buf
            .as_ref()
            .filter(|b| b.len() >= len)
            .ok_or_else(|| ModelError::Cuda("no attention output of that size".into()))?;
        let mut host = vec![0u16; len];
        self.stream
            .memcpy_dtoh(&buf.slice(..len), &mut host)
            .map_err(|e| cuda_err("copying attention output", e))?;
        self.synchronize()?;
        Ok(host
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect())
    }
}

/// The stream decode kernel cuts the batch's tokens into equal runs, so an item's sums depend on
/// the batch: batch-invariant runs decode with the split kernels.
fn stream_not_invariant() -> ModelError {
    ModelError::Cuda(
        "batch-invariant runs cannot decode with the stream kernel (it splits the batch's \
         tokens, not each item's)"
            .into(),
    )
}
