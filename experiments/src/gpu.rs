//! Figures of the device measurements kept in `experiments/gpu/` (the device tool's JSON
//! outputs: kernel benchmarks, step executors, end-to-end runs). They redraw what was measured;
//! the measuring commands are in `experiments/gpu/README.md`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::plot;

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn field<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| anyhow!("{}: no field `{key}` in {v}", path.display()))
}

fn number(v: &Value, key: &str, path: &Path) -> Result<f64> {
    field(v, key, path)?
        .as_f64()
        .ok_or_else(|| anyhow!("{}: `{key}` is not a number in {v}", path.display()))
}

fn array<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Vec<Value>> {
    field(v, key, path)?
        .as_array()
        .ok_or_else(|| anyhow!("{}: `{key}` is not a list", path.display()))
}

/// One bar of a GPU figure.
#[derive(Serialize)]
pub struct GpuRow {
    figure: &'static str,
    category: String,
    series: String,
    value: f64,
    unit: &'static str,
}

/// Categories in first-seen order and one series per name, for [`plot::grouped_bars`]; a
/// category a series lacks gets 0.
fn bars(rows: &[GpuRow]) -> (Vec<String>, Vec<(String, Vec<f64>)>) {
    let mut categories: Vec<String> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !categories.contains(&r.category) {
            categories.push(r.category.clone());
        }
        if !names.contains(&r.series) {
            names.push(r.series.clone());
        }
    }
    let series = names
        .into_iter()
        .map(|name| {
            let values = categories
                .iter()
                .map(|c| {
                    rows.iter()
                        .find(|r| &r.category == c && r.series == name)
                        .map_or(0.0, |r| r.value)
                })
                .collect();
            (name, values)
        })
        .collect();
    (categories, series)
}

/// Writes `rows` as `<name>.csv` and a grouped bar chart as `<name>.svg` in `out_dir`.
fn write(out_dir: &Path, name: &str, title: &str, y_label: &str, rows: &[GpuRow]) -> Result<()> {
    let csv_path = out_dir.join(format!("{name}.csv"));
    let mut w = csv::Writer::from_path(&csv_path)
        .with_context(|| format!("creating {}", csv_path.display()))?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    let (categories, series) = bars(rows);
    plot::grouped_bars(
        &out_dir.join(format!("{name}.svg")),
        title,
        y_label,
        &categories,
        &series,
    )?;
    println!("wrote {} and its figure", csv_path.display());
    Ok(())
}

/// Prefill attention (ours vs torch SDPA, TFLOP/s) and decode attention (fraction of the copy
/// bandwidth) from `bench.json` of `bench_model.py`.
pub fn kernel_rows(bench: &Path) -> Result<(Vec<GpuRow>, Vec<GpuRow>)> {
    let v = read_json(bench)?;
    let (ours, torch) = (field(&v, "ours", bench)?, field(&v, "torch", bench)?);
    let mut prefill = Vec::new();
    let ours_prefill = array(ours, "prefill_attention", bench)?;
    let torch_prefill = array(torch, "prefill_attention", bench)?;
    for (a, b) in ours_prefill.iter().zip(torch_prefill) {
        let (seqs, start, len) = (
            number(a, "seqs", bench)?,
            number(a, "start", bench)?,
            number(a, "len", bench)?,
        );
        let category = format!("{seqs}x{len}@{start}");
        let tflops = number(a, "tflops", bench)?;
        let ratio = number(b, "secs", bench)? / number(a, "secs", bench)?;
        for (series, value) in [("ours", tflops), ("torch SDPA", tflops / ratio)] {
            prefill.push(GpuRow {
                figure: "gpu-prefill-attention",
                category: category.clone(),
                series: series.into(),
                value,
                unit: "TFLOP/s",
            });
        }
    }
    let copy = number(torch, "copy_gbps", bench)?;
    let mut decode = Vec::new();
    let ours_decode = array(ours, "decode_attention", bench)?;
    let torch_decode = array(torch, "decode_attention", bench)?;
    for (a, b) in ours_decode.iter().zip(torch_decode) {
        let category = format!(
            "{}x{}",
            number(a, "batch", bench)?,
            number(a, "ctx", bench)?
        );
        let gbps = number(a, "gbps", bench)?;
        let torch_gbps = gbps * number(a, "secs", bench)? / number(b, "secs", bench)?;
        for (series, value) in [
            ("ours (paged)", gbps / copy),
            ("torch SDPA (contiguous)", torch_gbps / copy),
        ] {
            decode.push(GpuRow {
                figure: "gpu-decode-attention",
                category: category.clone(),
                series: series.into(),
                value,
                unit: "fraction of copy bandwidth",
            });
        }
    }
    Ok((prefill, decode))
}

/// Step speed-up over the sequential executor per blend: each overlapped executor and the ideal
/// (the step as long as its longer part alone), from `overlap_bench`'s JSON.
pub fn step_executor_rows(path: &Path) -> Result<Vec<GpuRow>> {
    let v = read_json(path)?;
    let mut rows = Vec::new();
    for blend in array(&v, "blends", path)? {
        let category = format!(
            "{}+{}",
            number(blend, "prefill_tokens", path)?,
            number(blend, "decode_seqs", path)?
        );
        let sequential = number(blend, "sequential_secs", path)?;
        let ideal = number(blend, "prefill_alone_secs", path)?.max(number(
            blend,
            "decode_alone_secs",
            path,
        )?);
        rows.push(GpuRow {
            figure: "gpu-step-executors",
            category: category.clone(),
            series: "ideal (longer part alone)".into(),
            value: sequential / ideal,
            unit: "speed-up over sequential",
        });
        for e in array(blend, "executors", path)? {
            // (An executor that could not run has no time.)
            let Some(secs) = e.get("secs").and_then(Value::as_f64) else {
                continue;
            };
            rows.push(GpuRow {
                figure: "gpu-step-executors",
                category: category.clone(),
                series: field(e, "executor", path)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                value: sequential / secs,
                unit: "speed-up over sequential",
            });
        }
    }
    Ok(rows)
}

/// Total tokens/s of each policy per blend and step executor, from `engine_e2e.py`'s JSON
/// (`label` names the blend).
pub fn engine_rows(runs: &[(&str, &Path)]) -> Result<Vec<GpuRow>> {
    let mut rows = Vec::new();
    for &(label, path) in runs {
        let v = read_json(path)?;
        let list = v
            .as_array()
            .ok_or_else(|| anyhow!("{}: not a list of runs", path.display()))?;
        for run in list.iter().filter(|r| r.get("error").is_none()) {
            let executor = run
                .get("step_executor")
                .and_then(Value::as_str)
                .unwrap_or("sequential");
            rows.push(GpuRow {
                figure: "gpu-engine",
                category: format!("{label}, {executor}"),
                series: field(run, "name", path)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                value: number(run, "total_tokens_per_sec", path)?,
                unit: "tokens/s",
            });
        }
    }
    Ok(rows)
}

/// Issue 17's runs of the paper's traces (`engine/h200-paper-traces.json`): each run's
/// tokens/s over DFS's with the sequential executor in the same device call and trace.
/// Categories name the trace, the executor and, for call D, that the length-sample phase's
/// prefixes were kept for the main phase (`*`); call B ran 2,000 requests.
pub fn paper_trace_rows(path: &Path) -> Result<Vec<GpuRow>> {
    let v = read_json(path)?;
    let list = v
        .as_array()
        .ok_or_else(|| anyhow!("{}: not a list of runs", path.display()))?;
    let text = |r: &Value, key: &str| -> Result<String> {
        Ok(field(r, key, path)?.as_str().unwrap_or("?").to_string())
    };
    let mut rows = Vec::new();
    for run in list.iter().filter(|r| r.get("error").is_none()) {
        let (trace, call) = (text(run, "trace")?, text(run, "call")?);
        let executor = text(run, "step_executor")?;
        let dfs = list
            .iter()
            .find(|r| {
                r.get("error").is_none()
                    && text(r, "trace").ok() == Some(trace.clone())
                    && text(r, "call").ok() == Some(call.clone())
                    && text(r, "policy").ok().as_deref() == Some("dfs")
                    && text(r, "step_executor").ok().as_deref() == Some("sequential")
            })
            .ok_or_else(|| anyhow!("{}: no DFS run for {trace} in {call}", path.display()))?;
        let short = if executor == "sequential" {
            "seq"
        } else {
            "overlap"
        };
        let size = if call == "B" { " 2k" } else { "" };
        let kept = if call == "D" { "*" } else { "" };
        rows.push(GpuRow {
            figure: "gpu-h200-paper-traces",
            category: format!("{trace}{size} {short}{kept}"),
            series: text(run, "policy")?,
            value: number(run, "tokens_per_sec", path)? / number(dfs, "tokens_per_sec", path)?,
            unit: "speed-up over DFS, sequential",
        });
    }
    Ok(rows)
}

/// Every GPU figure from the measurements under `gpu_dir`, into `out_dir`.
/// Issue 16's step grid (`overlap/h200-step-gain.json`): speed-up over sequential against the
/// planner's attention / GEMM time, one line per decode context for `overlap-auto` and one
/// dashed for the best fixed SM split.
fn step_gain_series(path: &Path) -> Result<Vec<plot::Series>> {
    let rows = read_json(path)?;
    let rows = rows
        .as_array()
        .ok_or_else(|| anyhow!("{}: not a list", path.display()))?;
    let mut series: Vec<plot::Series> = Vec::new();
    for r in rows {
        let ctx = number(r, "context", path)?;
        let x = number(r, "attention_over_gemm", path)?;
        for (name, key, dashed) in [
            (format!("overlap-auto, context {ctx}"), "gain", false),
            (
                format!("best fixed split, context {ctx}"),
                "best_fixed_gain",
                true,
            ),
        ] {
            let y = number(r, key, path)?;
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push((x, y)),
                None => series.push(plot::Series {
                    name,
                    points: vec![(x, y)],
                    dashed,
                }),
            }
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(series)
}

/// The stream decode kernel's bandwidth against the SMs it runs on (`h200/decode-lane.json`)
/// for a few batches, beside the streaming-read probe's (`h200/overlap-probe.json`).
fn decode_lane_series(lane: &Path, probe: &Path) -> Result<Vec<plot::Series>> {
    let data = read_json(lane)?;
    let wanted = [
        (256.0, 2048.0, 2048.0),
        (128.0, 4096.0, 4096.0),
        (256.0, 64.0, 4096.0),
        (64.0, 512.0, 16384.0),
    ];
    let mut series = Vec::new();
    for (batch, lo, hi) in wanted {
        let mut points = Vec::new();
        for r in array(&data, "rows", lane)? {
            let kernel = field(r, "kernel", lane)?.as_str().unwrap_or_default();
            let key = (
                number(r, "batch", lane)?,
                number(r, "ctx_lo", lane)?,
                number(r, "ctx_hi", lane)?,
            );
            if kernel == "stream_w12_s2" && key == (batch, lo, hi) {
                points.push((number(r, "sms", lane)?, number(r, "gbps", lane)? / 1e3));
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let contexts = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}-{hi}")
        };
        series.push(plot::Series {
            name: format!("decode attention, {batch} x {contexts} tokens"),
            points,
            dashed: false,
        });
    }
    let p = read_json(probe)?;
    let mut read = vec![(
        number(&p, "sms", probe)?,
        number(&p, "read_whole_gpu_tbps", probe)?,
    )];
    for r in array(&p, "rows", probe)? {
        let k = number(r, "k", probe)?;
        read.push((k, k * number(r, "read_gbps_per_sm_partition", probe)? / 1e3));
    }
    read.sort_by(|a, b| a.0.total_cmp(&b.0));
    series.push(plot::Series {
        name: "streaming read kernel (probe, green partitions)".into(),
        points: read,
        dashed: true,
    });
    Ok(series)
}

pub fn figures(gpu_dir: &Path, out_dir: &Path) -> Result<()> {
    plot::line_chart(
        &out_dir.join("gpu-h200-step-gain.svg"),
        "H200, 32-layer Llama-3-8B steps: overlapped over sequential",
        "decode attention time / GEMM time (planner's estimate)",
        "speed-up over sequential (x)",
        &step_gain_series(&gpu_dir.join("overlap/h200-step-gain.json"))?,
    )?;
    plot::line_chart(
        &out_dir.join("gpu-h200-decode-lane.svg"),
        "H200: the memory lane's decode attention on k SMs",
        "SMs the kernel runs on",
        "KV read bandwidth (TB/s)",
        &decode_lane_series(
            &gpu_dir.join("h200/decode-lane.json"),
            &gpu_dir.join("h200/overlap-probe.json"),
        )?,
    )?;
    let (prefill, decode) = kernel_rows(&gpu_dir.join("bench-last-run.json"))?;
    write(
        out_dir,
        "gpu-prefill-attention",
        "Paged causal prefill attention, H100: ours vs torch SDPA",
        "TFLOP/s",
        &prefill,
    )?;
    write(
        out_dir,
        "gpu-decode-attention",
        "Paged decode attention, H100: share of copy bandwidth",
        "fraction of copy bandwidth",
        &decode,
    )?;
    write(
        out_dir,
        "gpu-h200-paper-traces",
        "blendserve run, H200, paper traces (1,000 requests; * sample phase's prefixes kept)",
        "tokens/s over DFS, sequential",
        &paper_trace_rows(&gpu_dir.join("engine/h200-paper-traces.json"))?,
    )?;
    write(
        out_dir,
        "gpu-step-executors",
        "Overlapped step executors vs sequential (prefill tokens + decodes)",
        "speed-up over sequential",
        &step_executor_rows(&gpu_dir.join("overlap/step-executors.json"))?,
    )?;
    write(
        out_dir,
        "gpu-engine",
        "blendserve run on the H100: tokens/s per policy, blend and step executor",
        "tokens/s",
        &engine_rows(&[
            (
                "code+conv",
                &gpu_dir.join("engine/run10-code-conv-tma-auto-and-overlap.json"),
            ),
            (
                "mooncake+conv",
                &gpu_dir.join("engine/run11-mooncake-conv-auto.json"),
            ),
            (
                "code+conv, decode split by occupancy",
                &gpu_dir.join("engine/run12-code-conv-decode-split-auto.json"),
            ),
            (
                "mooncake+conv, session 7",
                &gpu_dir.join("engine/run13-mooncake-conv-session7-last.json"),
            ),
            (
                "code+conv, session 8",
                &gpu_dir.join("engine/run16-code-conv-session8-final.json"),
            ),
            (
                "mooncake+conv, session 8",
                &gpu_dir.join("engine/run16-mooncake-conv-session8-final.json"),
            ),
        ])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored measurements parse, and the figures' numbers are the measured ones.
    #[test]
    fn the_stored_device_measurements_make_their_figures() {
        let gpu = Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu");
        let (prefill, decode) = kernel_rows(&gpu.join("bench-last-run.json")).expect("bench");
        assert!(prefill.len() >= 2 && prefill.len() % 2 == 0);
        assert!(prefill.iter().all(|r| r.value > 1.0 && r.value < 2000.0));
        assert!(decode.iter().all(|r| r.value > 0.1 && r.value < 1.5));
        let steps = step_executor_rows(&gpu.join("overlap/step-executors.json")).expect("steps");
        assert!(steps
            .iter()
            .filter(|r| r.series.starts_with("ideal"))
            .all(|r| r.value >= 0.95));
        let engine = engine_rows(&[(
            "code+conv",
            &gpu.join("engine/run10-code-conv-tma-auto-and-overlap.json"),
        )])
        .expect("engine");
        assert_eq!(engine.len(), 6);
        assert!(engine.iter().any(|r| r.category.ends_with("overlap")));
        let dir = tempfile::tempdir().expect("tempdir");
        figures(&gpu, dir.path()).expect("figures");
        let traces = paper_trace_rows(&gpu.join("engine/h200-paper-traces.json")).expect("traces");
        assert_eq!(traces.len(), 27);
        assert!(traces.iter().all(|r| r.value > 0.8 && r.value < 1.25));
        for name in [
            "gpu-prefill-attention",
            "gpu-engine",
            "gpu-h200-paper-traces",
        ] {
            assert!(dir.path().join(format!("{name}.svg")).exists());
            assert!(dir.path().join(format!("{name}.csv")).exists());
        }
        for name in ["gpu-h200-step-gain", "gpu-h200-decode-lane"] {
            assert!(dir.path().join(format!("{name}.svg")).exists());
        }
        // Every grid step has both lines' points, the lane figure four batches and the probe.
        let gain = step_gain_series(&gpu.join("overlap/h200-step-gain.json")).expect("grid");
        assert_eq!(gain.iter().map(|s| s.points.len()).sum::<usize>(), 2 * 17);
        let lane = decode_lane_series(
            &gpu.join("h200/decode-lane.json"),
            &gpu.join("h200/overlap-probe.json"),
        )
        .expect("lane");
        assert_eq!(lane.len(), 5);
        assert!(lane.iter().all(|s| s.points.len() >= 4));
    }
}
