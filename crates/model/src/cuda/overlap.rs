//! The overlapped executor (nano-batching, after NanoFlow): a step's batch is cut into two
//! nano-batches, each with half the decode sequences and half the prefill tokens, and each
//! layer runs as a pipeline over two lanes: the compute lane queues every GEMM, norm and the
//! prefill attention of both nano-batches, the memory lane the decode attention (bound by
//! KV-cache reads), so that one nano-batch's decode attention runs beside the other's GEMMs.
//! The layers are software-pipelined by half a layer, in each lane's order:
//!
//! ```text
//! compute: qkv(0,l) pattn(0,l) [wait d(1,l-1)] out(1,l-1) qkv(1,l) pattn(1,l) [wait d(0,l)] out(0,l)
//! memory:  [wait qkv(0,l)] decode-attn(0,l) [wait qkv(1,l)] decode-attn(1,l)
//! ```
//!
//! so nano-batch 0's decode attention of layer l runs beside nano-batch 1's output half of layer
//! l - 1 and its q/k/v, and nano-batch 1's beside nano-batch 0's output half of layer l and the
//! next layer's q/k/v: the memory lane works beside the whole compute stream. (A first version
//! finished both nano-batches' layer before the next began, which left the memory lane idle for
//! the last output half and the first q/k/v of every layer; NOTES.md.)
//!
//! With `decode_sms > 0` the two lanes' streams live in CUDA green contexts that split the SMs
//! between them; with 0 they are plain streams and the hardware scheduler interleaves their
//! blocks. Events (never host synchronisation) order the lanes against each other and against
//! the model's main stream: the lanes wait for the step's uploads, the main stream for both
//! lanes before the final norm and logits.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUevent, CUgreenCtx, CUstream};
use cudarc::driver::{CudaContext, CudaStream};

use super::gemm_persistent::PersistentGemm;
use super::{cuda_err, Gemm, LaneGemm, Scratch};
use crate::ModelError;

use crate::forward::{ForwardBatch, SequenceChunk};

/// How [`super::CudaLlama::forward`] runs a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StepExecutor {
    /// Every operation on one stream, in order.
    #[default]
    Sequential,
    /// A step with two or more decode tokens runs as two nano-batches pipelined over a compute
    /// lane and a memory lane (see the module docs); other steps run sequentially. `memory_sms`
    /// SMs go to the memory lane as `split` says.
    Overlapped { memory_sms: usize, split: SmSplit },
    /// Per step, [`crate::OverlapPlanner`] decides: sequential, or overlapped on plain streams
    /// with the memory lane's SMs it chooses and the compute lane's GEMMs sized for the rest
    /// (as `overlap-gemm:N`).
    Adaptive,
}

impl StepExecutor {
    /// The overlapped executors a profile (`--step-executor auto`) times against the sequential
    /// one: the per-step planner, shared SMs, cuBLAS leaving 16 or 32 SMs to decode attention,
    /// green contexts of 32 or 64 SMs for it.
    pub fn profile_candidates() -> Vec<StepExecutor> {
        let overlapped = |memory_sms, split| StepExecutor::Overlapped { memory_sms, split };
        vec![
            StepExecutor::Adaptive,
            overlapped(0, SmSplit::Shared),
            overlapped(16, SmSplit::GemmTarget),
            overlapped(32, SmSplit::GemmTarget),
            overlapped(32, SmSplit::GreenContexts),
            overlapped(64, SmSplit::GreenContexts),
        ]
    }
}

/// How the overlapped executor shares the SMs between its lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmSplit {
    /// Two plain streams; the hardware scheduler interleaves their blocks (`memory_sms` unused).
    Shared,
    /// Two plain streams, the memory lane at the highest priority, and the compute lane's
    /// cuBLAS GEMMs sized for all but `memory_sms` SMs (`cublasSetSmCountTarget`), so decode
    /// attention finds SMs free beside them while the other kernels still use the whole GPU.
    GemmTarget,
    /// CUDA green contexts: `memory_sms` SMs (rounded by the driver to its partition size) for
    /// the memory lane, the rest for the compute lane, for every kernel.
    GreenContexts,
}

impl std::fmt::Display for StepExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            StepExecutor::Sequential => write!(f, "sequential"),
            StepExecutor::Adaptive => write!(f, "overlap-auto"),
            StepExecutor::Overlapped {
                split: SmSplit::Shared,
                ..
            } => write!(f, "overlap"),
            StepExecutor::Overlapped {
                memory_sms,
                split: SmSplit::GemmTarget,
            } => write!(f, "overlap-gemm:{memory_sms}"),
            StepExecutor::Overlapped {
                memory_sms,
                split: SmSplit::GreenContexts,
            } => write!(f, "overlap-green:{memory_sms}"),
        }
    }
}

impl std::str::FromStr for StepExecutor {
    type Err = String;

    /// `sequential`, `overlap` (shared SMs), `overlap-gemm:N` or `overlap-green:N` (N SMs for
    /// the memory lane).
    fn from_str(s: &str) -> Result<Self, String> {
        let with_sms = |prefix: &str, split: SmSplit| {
            s.strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .map(|memory_sms| StepExecutor::Overlapped { memory_sms, split })
        };
        match s {
            "sequential" => Ok(StepExecutor::Sequential),
            "overlap-auto" => Ok(StepExecutor::Adaptive),
            "overlap" => Ok(StepExecutor::Overlapped {
                memory_sms: 0,
                split: SmSplit::Shared,
            }),
            _ => with_sms("overlap-gemm:", SmSplit::GemmTarget)
                .or_else(|| with_sms("overlap-green:", SmSplit::GreenContexts))
                .ok_or_else(|| {
                    format!(
                        "unknown executor {s:?}: sequential, overlap, overlap-auto, \
                         overlap-gemm:MEMORY_SMS or overlap-green:MEMORY_SMS"
                    )
                }),
        }
    }
}

/// A non-blocking stream a lane owns, in the primary context or in a green context (destroyed
/// with it).
struct LaneStream {
    stream: CUstream,
    green: Option<CUgreenCtx>,
}

impl LaneStream {
    /// A stream of the current (primary) context at `priority` (lower is more urgent).
    fn plain(priority: i32) -> Result<LaneStream, ModelError> {
        let mut stream: CUstream = std::ptr::null_mut();
        // SAFETY: plain driver call; the stream is owned by the returned value.
        unsafe {
            sys::cuStreamCreateWithPriority(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                priority,
            )
        }
        .result()
        .map_err(|e| cuda_err("creating a lane stream", e))?;
        Ok(LaneStream {
            stream,
            green: None,
        })
    }
}

impl Drop for LaneStream {
    fn drop(&mut self) {
        // SAFETY: both were created for this lane and are used by nothing else (the lane's
        // cuBLAS handle is dropped before this stream).
        unsafe {
            let _ = sys::cuStreamDestroy_v2(self.stream);
            if let Some(ctx) = self.green {
                let _ = sys::cuGreenCtxDestroy(ctx);
            }
        }
    }
}

/// The most urgent stream priority of the current context.
fn greatest_priority() -> Result<i32, ModelError> {
    let (mut least, mut greatest) = (0, 0);
    // SAFETY: plain driver query.
    unsafe { sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest) }
        .result()
        .map_err(|e| cuda_err("stream priorities", e))?;
    Ok(greatest)
}

/// One lane's stream and cuBLAS handle, and one nano-batch's decode-split scratch.
pub(super) struct Lane {
    // Field order is drop order: the handle before its stream.
    pub(super) gemm: Gemm,
    pub(super) part_acc: Scratch<f32>,
    pub(super) part_ml: Scratch<f32>,
    /// SMs this lane's work may use (sizes its decode split).
    pub(super) sm_count: usize,
    /// Recorded when the lane's last operation of a step is queued.
    pub(super) done: CUevent,
    stream: LaneStream,
}

impl Drop for Lane {
    fn drop(&mut self) {
        // SAFETY: created in `Lane::new`, used only by this lane.
        unsafe {
            let _ = cudarc::driver::result::event::destroy(self.done);
        }
    }
}

/// The two lanes of the overlapped executor and the events that order them.
pub(super) struct Overlap {
    /// `[compute, memory]`; lane k's scratch holds nano-batch k's decode split.
    pub(super) lanes: [Lane; 2],
    /// Recorded on the main stream once the step's inputs are queued.
    pub(super) start: CUevent,
    /// Per nano-batch: its q, k, v of the current layer are ready (compute lane).
    pub(super) qkv_ready: [CUevent; 2],
    /// Per nano-batch: its decode attention of the current layer is done (memory lane).
    pub(super) attention_done: [CUevent; 2],
    pub(super) executor: StepExecutor,
    /// The compute lane's GEMMs.
    pub(super) lane_gemm: LaneGemm,
    /// Timing events of the last step, when a benchmark asked for them.
    pub(super) timing: Option<std::cell::RefCell<LaneTiming>>,
}

/// Timed event pairs of one overlapped step (a benchmark's diagnosis): around each decode
/// attention on the memory lane, and around each wait of the compute lane for one.
#[derive(Default)]
pub(super) struct LaneTiming {
    pub(super) memory: Vec<(CUevent, CUevent)>,
    pub(super) compute_waits: Vec<(CUevent, CUevent)>,
}

impl LaneTiming {
    /// A timing event recorded on `stream`.
    pub(super) fn mark(stream: CUstream) -> Result<CUevent, ModelError> {
        let e = cudarc::driver::result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| cuda_err("creating an event", e))?;
        record(e, stream)?;
        Ok(e)
    }

    /// Seconds the memory lane spent in decode attention and the compute lane waiting for it
    /// (waits for the events to complete).
    pub(super) fn secs(&self) -> Result<(f64, f64), ModelError> {
        let sum = |pairs: &[(CUevent, CUevent)]| -> Result<f64, ModelError> {
            let mut total = 0.0;
            for &(a, b) in pairs {
                // SAFETY: both events were created and recorded by this step.
                let ms = unsafe {
                    cudarc::driver::result::event::synchronize(b)
                        .and_then(|_| cudarc::driver::result::event::elapsed(a, b))
                }
                .map_err(|e| cuda_err("timing a lane", e))?;
                total += f64::from(ms) / 1e3;
            }
            Ok(total)
        };
        Ok((sum(&self.memory)?, sum(&self.compute_waits)?))
    }

    pub(super) fn clear(&mut self) {
        for (a, b) in self.memory.drain(..).chain(self.compute_waits.drain(..)) {
            // SAFETY: created by `mark`, no longer used.
            unsafe {
                let _ = cudarc::driver::result::event::destroy(a);
                let _ = cudarc::driver::result::event::destroy(b);
            }
        }
    }
}

impl Drop for LaneTiming {
    fn drop(&mut self) {
        self.clear();
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        // SAFETY: created in `Overlap::new`, used only by this executor.
        unsafe {
            for e in [self.start]
                .into_iter()
                .chain(self.qkv_ready)
                .chain(self.attention_done)
            {
                let _ = cudarc::driver::result::event::destroy(e);
            }
        }
    }
}

/// A step's batch cut in two for the overlapped executor.
#[derive(Debug, PartialEq)]
pub(super) struct NanoBatches {
    pub(super) parts: [ForwardBatch; 2],
    /// Cache slot of each token of each part.
    pub(super) slots: [Vec<usize>; 2],
    /// Row of the last token of each sequence that wants logits, in batch order, counting the
    /// step's rows as part 0's then part 1's.
    pub(super) logit_rows: Vec<i32>,
}

/// Cuts `batch` (with its tokens' cache `slots`, batch order) into two nano-batches: decode
/// sequences alternate between them; the first half of the prefill tokens (batch order) goes
/// to part 0, the rest to part 1, a prefill chunk cut at the boundary becoming two chunks (the
/// first without logits; the compute lane writes its K/V before the second reads them).
pub(super) fn split_nano_batches(batch: &ForwardBatch, slots: &[usize]) -> NanoBatches {
    let prefill_tokens: usize = batch
        .sequences
        .iter()
        .filter(|s| s.tokens.len() > 1)
        .map(|s| s.tokens.len())
        .sum();
    let mut part0_prefill_left = prefill_tokens.div_ceil(2);
    let mut parts: [ForwardBatch; 2] = Default::default();
    let mut part_slots: [Vec<usize>; 2] = Default::default();
    let mut last = Vec::with_capacity(batch.sequences.len());
    let mut decodes = 0;
    let mut first_slot = 0;
    for s in &batch.sequences {
        let len = s.tokens.len();
        let seq_slots = &slots[first_slot..first_slot + len];
        first_slot += len;
        let mut push = |k: usize, from: usize, to: usize, logits: bool| {
            parts[k].sequences.push(SequenceChunk {
                tokens: s.tokens[from..to].to_vec(),
                start_position: s.start_position + from,
                block_table: s.block_table.clone(),
                logits,
            });
            part_slots[k].extend_from_slice(&seq_slots[from..to]);
            (k, part_slots[k].len() - 1)
        };
        if len == 1 {
            last.push(push(decodes % 2, 0, 1, s.logits));
            decodes += 1;
        } else {
            let take = part0_prefill_left.min(len);
            part0_prefill_left -= take;
            let mut end = None;
            if take > 0 {
                end = Some(push(0, 0, take, s.logits && take == len));
            }
            if take < len {
                end = Some(push(1, take, len, s.logits));
            }
            last.push(end.expect("a chunk has tokens"));
        }
    }
    let rows0 = part_slots[0].len();
    let logit_rows = batch
        .sequences
        .iter()
        .zip(&last)
        .filter(|(s, _)| s.logits)
        .map(|(_, &(k, row))| (if k == 0 { row } else { rows0 + row }) as i32)
        .collect();
    NanoBatches {
        parts,
        slots: part_slots,
        logit_rows,
    }
}

fn sync_event() -> Result<CUevent, ModelError> {
    cudarc::driver::result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
        .map_err(|e| cuda_err("creating an event", e))
}

impl Lane {
    fn new(
        main: &Arc<CudaStream>,
        stream: LaneStream,
        sm_count: usize,
        persistent: &Option<PersistentGemm>,
        batch_invariant: bool,
    ) -> Result<Lane, ModelError> {
        let gemm = Gemm::new(main.clone())?.with_persistent(persistent.clone(), sm_count);
        gemm.set_batch_invariant(batch_invariant);
        gemm.set_stream(stream.stream)?;
        Ok(Lane {
            gemm,
            part_acc: Scratch::new(),
            part_ml: Scratch::new(),
            sm_count,
            done: sync_event()?,
            stream,
        })
    }

    pub(super) fn stream(&self) -> CUstream {
        self.stream.stream
    }
}

impl Overlap {
    /// Lanes for `executor` (which must be [`StepExecutor::Overlapped`]) on the GPU of `ctx`,
    /// which has `sm_count` SMs; the compute lane's GEMMs as `lane_gemm` says (`persistent`:
    /// the persistent kernels, where compiled).
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        main: &Arc<CudaStream>,
        sm_count: usize,
        executor: StepExecutor,
        persistent: &Option<PersistentGemm>,
        lane_gemm: LaneGemm,
        batch_invariant: bool,
    ) -> Result<Overlap, ModelError> {
        let (memory_sms, split) = match executor {
            StepExecutor::Sequential => {
                return Err(ModelError::Cuda(
                    "the sequential executor has no lanes".into(),
                ))
            }
            // Sized per step (`Overlap::resize`).
            StepExecutor::Adaptive => (sm_count / 4, SmSplit::GemmTarget),
            StepExecutor::Overlapped { memory_sms, split } => (memory_sms, split),
        };
        if split != SmSplit::Shared && memory_sms >= sm_count {
            return Err(ModelError::Cuda(format!(
                "{memory_sms} SMs for the memory lane leave none of the GPU's {sm_count} for \
                 the compute lane"
            )));
        }
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        let lanes = match split {
            SmSplit::Shared => {
                let lane = || {
                    let stream = LaneStream::plain(0)?;
                    Lane::new(main, stream, sm_count, persistent, batch_invariant)
                };
                [lane()?, lane()?]
            }
            SmSplit::GemmTarget => {
                let compute = Lane::new(
                    main,
                    LaneStream::plain(0)?,
                    sm_count - memory_sms,
                    persistent,
                    batch_invariant,
                )?;
                let memory = LaneStream::plain(greatest_priority()?)?;
                [
                    compute,
                    Lane::new(main, memory, memory_sms, &None, batch_invariant)?,
                ]
            }
            SmSplit::GreenContexts => {
                let (compute, compute_sms, memory, memory_sms) =
                    green_lane_streams(ctx, memory_sms)?;
                let compute = Lane::new(main, compute, compute_sms, persistent, batch_invariant)?;
                [
                    compute,
                    Lane::new(main, memory, memory_sms, &None, batch_invariant)?,
                ]
            }
        };
        let overlap = Overlap {
            lane_gemm,
            lanes,
            start: sync_event()?,
            qkv_ready: [sync_event()?, sync_event()?],
            attention_done: [sync_event()?, sync_event()?],
            executor,
            timing: None,
        };
        overlap.size_compute_gemms()?;
        Ok(overlap)
    }

    /// SMs of the compute and memory lanes.
    pub(super) fn sm_split(&self) -> (usize, usize) {
        (self.lanes[0].sm_count, self.lanes[1].sm_count)
    }

    /// Gives the memory lane `memory_sms` of the GPU's SMs and the compute lane's GEMMs the
    /// rest (plain-stream lanes of `overlap-auto`; a no-op when already so).
    pub(super) fn resize(&mut self, memory_sms: usize) -> Result<(), ModelError> {
        let total = self.lanes[0].sm_count + self.lanes[1].sm_count;
        if self.lanes[1].sm_count != memory_sms && memory_sms < total {
            self.lanes[0].sm_count = total - memory_sms;
            self.lanes[1].sm_count = memory_sms;
            self.size_compute_gemms()?;
        }
        Ok(())
    }

    /// Sizes the compute lane's GEMMs for its SMs as `lane_gemm` says: on plain streams the
    /// persistent kernel on that many blocks, or cuBLAS told that many SMs; on a green
    /// partition the persistent kernel's blocks (cuBLAS needs no target there); on shared SMs
    /// nothing.
    pub(super) fn size_compute_gemms(&self) -> Result<(), ModelError> {
        let compute = &self.lanes[0];
        let split = match self.executor {
            StepExecutor::Overlapped { split, .. } => split,
            // Plain-stream lanes sized per step (`resize`).
            _ => SmSplit::GemmTarget,
        };
        match split {
            SmSplit::Shared => Ok(()),
            SmSplit::GemmTarget => compute.gemm.size_for_lane(compute.sm_count, self.lane_gemm),
            SmSplit::GreenContexts => {
                let persistent = self.lane_gemm == LaneGemm::Persistent;
                compute
                    .gemm
                    .set_persistent_ctas(if persistent { compute.sm_count } else { 0 });
                Ok(())
            }
        }
    }
}

/// `event` recorded on `stream` now.
pub(super) fn record(event: CUevent, stream: CUstream) -> Result<(), ModelError> {
    // SAFETY: both handles are live (owned by the executor and the model).
    unsafe { cudarc::driver::result::event::record(event, stream) }
        .map_err(|e| cuda_err("recording an event", e))
}

/// Work queued on `stream` from now on waits for `event`'s last record.
pub(super) fn wait(stream: CUstream, event: CUevent) -> Result<(), ModelError> {
    // SAFETY: both handles are live.
    unsafe {
        cudarc::driver::result::stream::wait_event(
            stream,
            event,
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        )
    }
    .map_err(|e| cuda_err("waiting for an event", e))
}

/// Two green contexts splitting the GPU's SMs: about `decode_sms` for the memory lane (rounded
/// by the driver), the rest for the compute lane; a non-blocking stream in each. Returns
/// `(compute stream, its SMs, memory stream, its SMs)`.
fn green_lane_streams(
    ctx: &Arc<CudaContext>,
    decode_sms: usize,
) -> Result<(LaneStream, usize, LaneStream, usize), ModelError> {
    let green = |what: &str, e: sys::CUresult| {
        ModelError::Cuda(format!(
            "green contexts ({what}): {e:?}; they need CUDA 12.4+ and a driver that supports \
             them; use the sequential executor or `overlap` (plain streams)"
        ))
    };
    let check = |what: &str, r: sys::CUresult| match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(green(what, e)),
    };
    // (`Overlap::new` made the primary context current.)
    let dev = ctx.cu_device();
    // SAFETY: plain-data driver structs, zeroed as the driver expects, filled by the calls below;
    // the handles made here are owned by the returned `LaneStream`s (or destroyed on error by
    // their Drop).
    unsafe {
        let mut all: sys::CUdevResource = std::mem::zeroed();
        check(
            "querying SMs",
            sys::cuDeviceGetDevResource(
                dev,
                &mut all,
                sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
            ),
        )?;
        let mut group: sys::CUdevResource = std::mem::zeroed();
        let mut rest: sys::CUdevResource = std::mem::zeroed();
        let mut groups = 1u32;
        check(
            "splitting SMs",
            sys::cuDevSmResourceSplitByCount(
                &mut group,
                &mut groups,
                &all,
                &mut rest,
                0,
                decode_sms as u32,
            ),
        )?;
        if groups != 1 {
            return Err(ModelError::Cuda(format!(
                "the GPU's {} SMs cannot give {decode_sms} to the decode lane",
                all.__bindgen_anon_1.sm.smCount
            )));
        }
        let make = |res: &mut sys::CUdevResource| -> Result<LaneStream, ModelError> {
            let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
            check(
                "making a descriptor",
                sys::cuDevResourceGenerateDesc(&mut desc, res, 1),
            )?;
            let mut gctx: CUgreenCtx = std::ptr::null_mut();
            check(
                "creating a green context",
                sys::cuGreenCtxCreate(
                    &mut gctx,
                    desc,
                    dev,
                    sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32,
                ),
            )?;
            let mut stream: CUstream = std::ptr::null_mut();
            let made = sys::cuGreenCtxStreamCreate(
                &mut stream,
                gctx,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                0,
            );
            if made != sys::CUresult::CUDA_SUCCESS {
                let _ = sys::cuGreenCtxDestroy(gctx);
                return Err(green("creating a stream", made));
            }
            Ok(LaneStream {
                stream,
                green: Some(gctx),
            })
        };
        let decode_count = group.__bindgen_anon_1.sm.smCount as usize;
        let prefill_count = rest.__bindgen_anon_1.sm.smCount as usize;
        let decode = make(&mut group)?;
        let prefill = make(&mut rest)?;
        // Green-context calls may leave another context current; the model's own calls expect
        // its primary context.
        ctx.bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))?;
        Ok((prefill, prefill_count, decode, decode_count))
    }
}

/// Seconds one call of `f` takes on a stream of a green context of about `sms` SMs (the driver
/// rounds the partition), averaged over `repeats` calls after a warm-up, timed by events on
/// that stream; and the partition's SM count. Benchmarks of one kernel on part of the GPU.
pub(super) fn time_on_partition(
    ctx: &Arc<CudaContext>,
    sms: usize,
    repeats: usize,
    mut f: impl FnMut(CUstream) -> Result<(), ModelError>,
) -> Result<(f64, usize), ModelError> {
    let (_rest, _, lane, lane_sms) = green_lane_streams(ctx, sms)?;
    let timing_event = || {
        cudarc::driver::result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| cuda_err("creating an event", e))
    };
    let (start, end) = (timing_event()?, timing_event()?);
    let timed = (|| {
        f(lane.stream)?;
        record(start, lane.stream)?;
        for _ in 0..repeats.max(1) {
            f(lane.stream)?;
        }
        record(end, lane.stream)?;
        // SAFETY: both events were recorded above.
        let ms = unsafe {
            cudarc::driver::result::event::synchronize(end)
                .and_then(|()| cudarc::driver::result::event::elapsed(start, end))
        }
        .map_err(|e| cuda_err("timing on a partition", e))?;
        Ok::<f64, ModelError>(f64::from(ms))
    })();
    // SAFETY: events made above, no longer used after the synchronisation.
    unsafe {
        let _ = cudarc::driver::result::event::destroy(start);
        let _ = cudarc::driver::result::event::destroy(end);
    }
    drop((_rest, lane));
    // (Destroying green contexts may leave another context current.)
    ctx.bind_to_thread()
        .map_err(|e| cuda_err("binding the context", e))?;
    Ok((timed? / 1e3 / repeats.max(1) as f64, lane_sms))
}

#[cfg(test)]
mod tests {
    use super::{split_nano_batches, SmSplit, StepExecutor};
    use crate::forward::{ForwardBatch, SequenceChunk};

    fn chunk(tokens: usize, start: usize, first_block: u32, logits: bool) -> SequenceChunk {
        SequenceChunk {
            tokens: (0..tokens as u32).map(|t| 100 + t).collect(),
            start_position: start,
            block_table: (first_block..first_block + 8).collect(),
            logits,
        }
    }

    #[test]
    fn nano_batches_cover_every_token_once_and_find_logit_rows() {
        // Prefill tokens 5 + 3 = 8: part 0 takes the 5-token chunk's first 4; decode
        // sequences alternate, part 0 first.
        let batch = ForwardBatch {
            sequences: vec![
                chunk(1, 9, 0, true),
                chunk(5, 0, 10, true),
                chunk(1, 20, 20, true),
                chunk(3, 4, 30, false),
                chunk(1, 7, 40, true),
            ],
        };
        let slots: Vec<usize> = (0..11).map(|i| 1000 + i).collect();
        let nano = split_nano_batches(&batch, &slots);
        let [p0, p1] = &nano.parts;
        // Part 0: decode 0, first 4 tokens of the 5-token chunk (no logits), decode 4.
        assert_eq!(p0.sequences.len(), 3);
        assert_eq!(p0.sequences[1].tokens, vec![100, 101, 102, 103]);
        assert!(!p0.sequences[1].logits);
        // Part 1: the chunk's last token at position 4, decode 2, the 3-token chunk.
        assert_eq!(p1.sequences.len(), 3);
        assert_eq!(p1.sequences[0].tokens, vec![104]);
        assert_eq!(p1.sequences[0].start_position, 4);
        assert!(p1.sequences[0].logits);
        assert_eq!(p1.sequences[2].tokens.len(), 3);
        // Each token's slot goes along with it.
        assert_eq!(nano.slots[0], vec![1000, 1001, 1002, 1003, 1004, 1010]);
        assert_eq!(nano.slots[1], vec![1005, 1006, 1007, 1008, 1009]);
        // Logit rows (part 0's 6 rows first): decode 0 -> 0, chunk -> part 1 row 0 = 6,
        // decode 2 -> part 1 row 1 = 7, the 3-token chunk wants none, decode 4 -> row 5.
        assert_eq!(nano.logit_rows, vec![0, 6, 7, 5]);
    }

    #[test]
    fn decode_only_batches_alternate() {
        let batch = ForwardBatch {
            sequences: (0..5)
                .map(|i| chunk(1, 3 + i, 10 * i as u32, true))
                .collect(),
        };
        let slots: Vec<usize> = (0..5).collect();
        let nano = split_nano_batches(&batch, &slots);
        assert_eq!(nano.slots, [vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(nano.logit_rows, vec![0, 3, 1, 4, 2]);
    }

    #[test]
    fn executor_names_round_trip() {
        for e in [
            StepExecutor::Sequential,
            StepExecutor::Overlapped {
                memory_sms: 0,
                split: SmSplit::Shared,
            },
            StepExecutor::Overlapped {
                memory_sms: 32,
                split: SmSplit::GemmTarget,
            },
            StepExecutor::Overlapped {
                memory_sms: 48,
                split: SmSplit::GreenContexts,
            },
            StepExecutor::Adaptive,
        ] {
            assert_eq!(e.to_string().parse::<StepExecutor>(), Ok(e));
        }
        for bad in ["overlap-green:x", "overlap-gemm:0", "parallel", "overlap:8"] {
            assert!(bad.parse::<StepExecutor>().is_err(), "{bad}");
        }
    }
}
