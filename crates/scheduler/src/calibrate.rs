//! Fitting the performance model's hardware rates to measured step times.
//!
//! A device benchmark (`blendserve calibrate`) or an engine timeline gives steps whose work the
//! model counts ([`StepCost`]) and whose time was measured. The sequential executor prices a
//! step as GEMMs `max(flops / F, weight bytes / B)`, then prefill attention `max(flops / FA,
//! KV bytes / B)`, then decode attention, plus a fixed overhead; this finds the compute, memory
//! and attention efficiencies (fractions of the datasheet peaks) and the overhead that minimise
//! the squared *relative* error over the steps (every shape counts alike, short or long), by
//! coordinate descent on shrinking grids.

use crate::config::{HardwareConfig, ModelConfig};
use crate::perf::{Executor, PerfModel, StepCost};

/// One measured step: its work as the model counts it (weights' pass included) and its time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimedStep {
    pub cost: StepCost,
    pub measured_secs: f64,
}

/// The fitted hardware and how well it predicts the steps it was fitted on.
#[derive(Clone, Debug, PartialEq)]
pub struct HardwareFit {
    pub hardware: HardwareConfig,
    /// `predicted / measured - 1` for each step, in order.
    pub relative_errors: Vec<f64>,
}

impl HardwareFit {
    pub fn rms_relative_error(&self) -> f64 {
        rms(&self.relative_errors)
    }

    pub fn max_relative_error(&self) -> f64 {
        self.relative_errors.iter().fold(0.0, |m, e| m.max(e.abs()))
    }
}

/// Root mean square of `errors` (0 for none).
pub fn rms(errors: &[f64]) -> f64 {
    (squared(errors) / errors.len().max(1) as f64).sqrt()
}

/// Predicted / measured - 1 for each step, on `hardware` under the sequential executor.
pub fn relative_errors(
    model: &ModelConfig,
    hardware: &HardwareConfig,
    steps: &[TimedStep],
) -> Vec<f64> {
    let perf = PerfModel::new(model.clone(), hardware.clone(), Executor::Sequential);
    steps
        .iter()
        .map(|s| perf.time(&s.cost).secs / s.measured_secs - 1.0)
        .collect()
}

fn squared(errors: &[f64]) -> f64 {
    errors.iter().map(|e| e * e).sum()
}

/// Fits `base`'s compute, memory and attention efficiencies and step overhead to `steps`
/// (see the module doc). Peaks, memory size and GPU count stay `base`'s.
pub fn fit_sequential(
    model: &ModelConfig,
    base: &HardwareConfig,
    steps: &[TimedStep],
) -> HardwareFit {
    let mut h = base.clone();
    h.attention_efficiency = Some(h.attention_efficiency.unwrap_or(h.compute_efficiency));
    let loss = |h: &HardwareConfig| squared(&relative_errors(model, h, steps));
    // (parameter, lower bound, upper bound), each searched on a grid that shrinks each round.
    type Field = fn(&mut HardwareConfig) -> &mut f64;
    let fields: [(Field, f64, f64); 4] = [
        (|h| &mut h.compute_efficiency, 0.05, 1.0),
        (|h| &mut h.memory_efficiency, 0.05, 1.0),
        (
            |h| h.attention_efficiency.as_mut().expect("set above"),
            0.02,
            1.0,
        ),
        (|h| &mut h.step_overhead_secs, 0.0, 0.05),
    ];
    let mut span = 1.0;
    if !steps.is_empty() {
        for _ in 0..40 {
            for &(field, lo, hi) in &fields {
                let current = *field(&mut h);
                let width = (hi - lo) * span;
                let mut best = (loss(&h), current);
                for k in 0..=40 {
                    let v = (current - width / 2.0 + width * f64::from(k) / 40.0).clamp(lo, hi);
                    *field(&mut h) = v;
                    let l = loss(&h);
                    if l < best.0 {
                        best = (l, v);
                    }
                }
                *field(&mut h) = best.1;
            }
            span *= 0.8;
        }
    }
    HardwareFit {
        relative_errors: relative_errors(model, &h, steps),
        hardware: h,
    }
}

/// The fitted hardware as an override file for `--hardware-config` / `sim --config`, with what
/// it was fitted on in comments.
pub fn hardware_toml(fit: &HardwareFit, preset: &str, note: &str) -> String {
    let h = &fit.hardware;
    let mut out = String::new();
    for line in note.lines() {
        out.push_str(&format!("# {line}\n"));
    }
    out.push_str(&format!(
        "# fit: rms {:.1}% and at most {:.1}% off the steps it was fitted on\n",
        100.0 * fit.rms_relative_error(),
        100.0 * fit.max_relative_error()
    ));
    out.push_str("[hardware]\n");
    out.push_str(&format!("preset = \"{preset}\"\n"));
    out.push_str(&format!("name = \"{}\"\n", h.name));
    out.push_str(&format!(
        "compute_efficiency = {:.4}\n",
        h.compute_efficiency
    ));
    out.push_str(&format!("memory_efficiency = {:.4}\n", h.memory_efficiency));
    if let Some(a) = h.attention_efficiency {
        out.push_str(&format!("attention_efficiency = {a:.4}\n"));
    }
    out.push_str(&format!(
        "step_overhead_secs = {:.6}\n",
        h.step_overhead_secs
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverrideFile;

    fn shapes(perf: &PerfModel) -> Vec<StepCost> {
        let mut out = Vec::new();
        for prefill in [0u64, 256, 1024, 4096] {
            for (decodes, ctx) in [(0u64, 0u64), (64, 512), (256, 2048), (32, 8192)] {
                if prefill == 0 && decodes == 0 {
                    continue;
                }
                let mut c = perf.step_base_cost();
                if prefill > 0 {
                    c += perf.piece_cost(0, prefill, true);
                }
                for _ in 0..decodes {
                    c += perf.piece_cost(ctx - 1, 1, true);
                }
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn recovers_the_rates_that_made_the_times() {
        let model = ModelConfig::preset("llama3-8b").unwrap();
        // Rates only: with a power model the floors of some steps would make the fit ambiguous.
        let base = HardwareConfig {
            power: None,
            ..HardwareConfig::preset("h200").unwrap()
        };
        let mut truth = base.clone();
        truth.compute_efficiency = 0.62;
        truth.memory_efficiency = 0.71;
        truth.attention_efficiency = Some(0.35);
        truth.step_overhead_secs = 4e-4;
        let perf = PerfModel::new(model.clone(), truth.clone(), Executor::Sequential);
        let steps: Vec<TimedStep> = shapes(&perf)
            .into_iter()
            .map(|cost| TimedStep {
                cost,
                measured_secs: perf.time(&cost).secs,
            })
            .collect();
        let fit = fit_sequential(&model, &base, &steps);
        let h = &fit.hardware;
        assert!(fit.max_relative_error() < 0.01, "{fit:?}");
        assert!((h.compute_efficiency - 0.62).abs() < 0.02, "{h:?}");
        assert!((h.memory_efficiency - 0.71).abs() < 0.02, "{h:?}");
        assert!((h.step_overhead_secs - 4e-4).abs() < 2e-4, "{h:?}");
        // The file reads back as the same hardware.
        let text = hardware_toml(&fit, "h200", "test fit");
        let back = OverrideFile::parse(&text)
            .unwrap()
            .hardware("h100")
            .unwrap();
        assert!((back.compute_efficiency - h.compute_efficiency).abs() < 1e-4);
        assert_eq!(back.peak_flops, base.peak_flops);
        assert!(text.starts_with("# test fit\n"));
    }
}
