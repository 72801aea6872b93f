//! The overlapped executor's step on the model (see [`super::overlap`] for the lanes): the
//! half-layer software pipeline of two nano-batches over the compute and memory lanes, the
//! per-step planner of `overlap-auto`, and the lane timing benchmarks read.

use super::*;

impl CudaLlama {
    /// The cost model `overlap-auto` plans each step with (the H200's fit by default).
    pub fn set_overlap_planner(&mut self, planner: crate::OverlapPlanner) {
        self.overlap_planner = planner;
    }

    pub fn overlap_planner(&self) -> &crate::OverlapPlanner {
        &self.overlap_planner
    }

    /// The overlapped executor's compute-lane GEMMs (cuBLAS with an SM target by default);
    /// applies to the lanes in use at once.
    pub fn set_lane_gemm(&mut self, kind: LaneGemm) -> Result<(), ModelError> {
        self.lane_gemm = kind;
        if let Some(o) = self.overlap.as_mut() {
            o.lane_gemm = kind;
            o.size_compute_gemms()?;
        }
        Ok(())
    }

    pub fn lane_gemm(&self) -> LaneGemm {
        self.lane_gemm
    }

    /// The memory lane's SMs of the last step, `None` if it ran sequentially.
    pub fn last_step_memory_sms(&self) -> Option<usize> {
        self.last_memory_sms
    }

    /// Times the overlapped executor's lanes in the steps that follow (benchmarks; costs two
    /// events a decode attention).
    pub fn set_lane_timing(&mut self, on: bool) {
        if let Some(o) = self.overlap.as_mut() {
            o.timing = on.then(Default::default);
        }
    }

    /// Of the last overlapped step with lane timing on: seconds the memory lane spent in decode
    /// attention and the compute lane waiting for it (waits for the GPU); `None` otherwise.
    pub fn last_lane_secs(&self) -> Result<Option<(f64, f64)>, ModelError> {
        match self.overlap.as_ref().and_then(|o| o.timing.as_ref()) {
            Some(t) if !t.borrow().memory.is_empty() => t.borrow().secs().map(Some),
            _ => Ok(None),
        }
    }

    /// [`CudaLlama::forward`] under the overlapped executor (see [`overlap`]): two
    /// nano-batches (rows `[0, n0)` and `[n0, n)` of the activation buffers) pipelined over the
    /// compute and memory lanes layer by layer; the main stream waits for both lanes, then
    /// norms and samples.
    pub(super) fn forward_overlapped(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        slots: &[usize],
    ) -> Result<(), ModelError> {
        let c = self.config.clone();
        let nano = split_nano_batches(batch, slots);
        let rows = [nano.slots[0].len(), nano.slots[1].len()];
        let n = slots.len();
        let plans = [0, 1].map(|k| {
            AttentionPlan::build(
                &nano.parts[k],
                &nano.slots[k],
                cache.block_size,
                self.decode_longest_first,
            )
        });
        // One upload: both plans, then the logit rows.
        let mut ints = plans[0].ints.clone();
        ints.extend_from_slice(&plans[1].ints);
        let logit_base = ints.len();
        ints.extend_from_slice(&nano.logit_rows);
        let dev_ints = self.upload_ints(&ints)?;
        let part_ints = [dev_ints, dev_ints + 4 * plans[0].ints.len() as u64];
        let acts = self.activations(n)?;
        let part_acts = [acts, acts.rows_from(&c, rows[0])];
        let stream = self.stream.clone();
        let memory_sms = self.overlap.as_ref().expect("called with lanes").lanes[1].sm_count;
        let memory_slots = self.memory_lane_slots(memory_sms);
        let overlap = self.overlap.as_mut().expect("called with lanes");
        let mut parts = Vec::with_capacity(2);
        for (k, lane) in overlap.lanes.iter_mut().enumerate() {
            parts.push(StepRows {
                plan: &plans[k],
                ints: part_ints[k],
                acts: part_acts[k],
                rows: rows[k],
                split: decode_split(
                    &c,
                    memory_slots,
                    &stream,
                    &plans[k],
                    &mut lane.part_acc,
                    &mut lane.part_ml,
                )?,
            });
        }
        // The lanes start after the uploads and allocations queued on the main stream.
        record(overlap.start, stream.cu_stream())?;
        let overlap = self.overlap.as_ref().expect("called with lanes");
        let (compute, memory) = (overlap.lanes[0].stream(), overlap.lanes[1].stream());
        let gemm = &overlap.lanes[0].gemm;
        wait(compute, overlap.start)?;
        wait(memory, overlap.start)?;
        for part in &parts {
            self.embed(compute, part)?;
        }
        // Software-pipelined by half a layer: nano-batch 1 runs its output half of layer l - 1
        // while nano-batch 0's decode attention of layer l runs on the memory lane, and
        // nano-batch 0 its output half of layer l while nano-batch 1's runs, so the memory lane
        // works beside the whole compute stream (`overlap` module docs).
        if let Some(t) = &overlap.timing {
            t.borrow_mut().clear();
        }
        let attend = |l: usize, k: usize, part: &StepRows| -> Result<(), ModelError> {
            self.layer_qkv(l, compute, gemm, part, cache)?;
            if part.plan.decode_items > 0 {
                record(overlap.qkv_ready[k], compute)?;
                wait(memory, overlap.qkv_ready[k])?;
                let t0 = overlap.timing.as_ref().map(|_| LaneTiming::mark(memory));
                self.layer_attention(l, memory, part, cache, AttentionPart::Decode)?;
                if let (Some(t), Some(t0)) = (&overlap.timing, t0) {
                    t.borrow_mut().memory.push((t0?, LaneTiming::mark(memory)?));
                }
                record(overlap.attention_done[k], memory)?;
            }
            self.layer_attention(l, compute, part, cache, AttentionPart::Prefill)
        };
        let finish = |l: usize, k: usize, part: &StepRows| -> Result<(), ModelError> {
            if part.plan.decode_items > 0 {
                let t0 = overlap.timing.as_ref().map(|_| LaneTiming::mark(compute));
                wait(compute, overlap.attention_done[k])?;
                if let (Some(t), Some(t0)) = (&overlap.timing, t0) {
                    t.borrow_mut()
                        .compute_waits
                        .push((t0?, LaneTiming::mark(compute)?));
                }
            }
            self.layer_out(l, compute, gemm, part)
        };
        for l in 0..c.num_layers {
            attend(l, 0, &parts[0])?;
            if l > 0 {
                finish(l - 1, 1, &parts[1])?;
            }
            attend(l, 1, &parts[1])?;
            finish(l, 0, &parts[0])?;
        }
        finish(c.num_layers - 1, 1, &parts[1])?;
        for lane in &overlap.lanes {
            record(lane.done, lane.stream())?;
            wait(stream.cu_stream(), lane.done)?;
        }
        let logit_rows = nano.logit_rows.len();
        self.finish(&acts, n, dev_ints + 4 * logit_base as u64, logit_rows)?;
        self.last_logit_rows = logit_rows;
        Ok(())
    }
}

/// What the overlap planner reads of a step.
pub(super) fn step_work(batch: &ForwardBatch) -> crate::StepWork {
    let mut w = crate::StepWork::default();
    for s in &batch.sequences {
        if s.tokens.len() == 1 {
            w.decodes += 1;
            w.decode_context_tokens += s.start_position + 1;
        } else {
            w.prefill_tokens += s.tokens.len();
        }
    }
    w
}

impl CudaLlama {
    /// The lanes side by side (a benchmark of the overlapped executor's SM split): seconds from
    /// queueing `attention_repeats` decode attentions of `batch` (its K and V in `cache`) on the
    /// memory lane and `gemms` on the compute lane's GEMM handle, both at once, until the
    /// memory lane is done and until the compute lane is (the pair's time is the larger).
    /// Either may be empty, which times the other lane alone. Needs an overlapped executor;
    /// the attention runs with the model's decode kernel.
    pub fn time_lanes_together(
        &mut self,
        batch: &ForwardBatch,
        cache: &CudaKvCache,
        attention_repeats: usize,
        gemms: impl Fn(&Gemm) -> Result<(), ModelError>,
    ) -> Result<(f64, f64), ModelError> {
        let memory_sms = self
            .lane_sms()
            .ok_or_else(|| ModelError::Cuda("lanes need an overlapped executor".into()))?
            .1;
        let run = self.prepare_attention(batch, cache, memory_sms)?;
        let main = self.stream.cu_stream();
        let overlap = self.overlap.as_ref().expect("checked");
        let (compute, memory) = (overlap.lanes[0].stream(), overlap.lanes[1].stream());
        let t0 = LaneTiming::mark(main)?;
        wait(compute, t0)?;
        wait(memory, t0)?;
        for _ in 0..attention_repeats {
            self.launch_attention(memory, &run, cache)?;
        }
        gemms(&overlap.lanes[0].gemm)?;
        let ends = [LaneTiming::mark(memory)?, LaneTiming::mark(compute)?];
        let mut secs = [0.0; 2];
        for (s, &end) in secs.iter_mut().zip(&ends) {
            // SAFETY: both events were created and recorded above; `end` is destroyed here.
            let ms = unsafe {
                let ms = cudarc::driver::result::event::synchronize(end)
                    .and_then(|_| cudarc::driver::result::event::elapsed(t0, end));
                let _ = cudarc::driver::result::event::destroy(end);
                ms
            }
            .map_err(|e| cuda_err("timing the lanes", e))?;
            *s = f64::from(ms) / 1e3;
        }
        // SAFETY: created above, no longer used.
        unsafe {
            let _ = cudarc::driver::result::event::destroy(t0);
        }
        Ok((secs[0], secs[1]))
    }
}
