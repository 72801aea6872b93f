//! Which hardware the cost model of `run` prices for: the `--hardware` preset and
//! `--hardware-config` file when given, else the preset of the GPU the run is on and the file
//! `blendserve calibrate` wrote for it in the calibration folder
//! (`$BLENDSERVE_CALIBRATION_DIR`, else `$XDG_CONFIG_HOME/blendserve`, else
//! `~/.config/blendserve`), else the h100 preset.

use std::path::{Path, PathBuf};

/// The hardware preset of a GPU from its name as the driver reports it.
pub fn preset_for_gpu(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_uppercase();
    if name.contains("H200") {
        Some("h200")
    } else if name.contains("H100") {
        Some("h100")
    } else if name.contains("A100") && name.contains("80GB") {
        Some("a100-80g")
    } else {
        None
    }
}

/// Where `calibrate` writes and `run` looks for calibrated hardware files.
pub fn calibration_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("BLENDSERVE_CALIBRATION_DIR")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("blendserve")))
        .or_else(|| var("HOME").map(|d| d.join(".config").join("blendserve")))
}

/// The calibrated file of `preset` in the calibration folder (it may not exist).
pub fn calibrated_path(preset: &str) -> Option<PathBuf> {
    calibration_dir().map(|d| d.join(format!("{preset}-calibrated.toml")))
}

/// The calibrated file of `preset`, if `calibrate` wrote one.
pub fn calibrated_file(preset: &str) -> Option<PathBuf> {
    calibrated_path(preset).filter(|p| p.is_file())
}

/// The preset and override file a run prices with, and how they were chosen (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HardwareChoice {
    pub preset: String,
    pub config: Option<PathBuf>,
    pub how: String,
}

/// The run's hardware: `--hardware` / `--hardware-config` when given; else the preset of
/// `gpu` (the device's name, `None` off the GPU) and its calibrated file from `calibrated`;
/// else h100.
pub fn choose(
    hardware: Option<&str>,
    config: Option<&Path>,
    gpu: Option<&str>,
    calibrated: impl Fn(&str) -> Option<PathBuf>,
) -> HardwareChoice {
    let detected = gpu.and_then(preset_for_gpu);
    let (preset, mut how) = match (hardware, detected, gpu) {
        (Some(h), _, _) => (h.to_string(), format!("hardware {h} (--hardware)")),
        (None, Some(p), Some(name)) => (p.to_string(), format!("hardware {p} (detected: {name})")),
        (None, None, Some(name)) => (
            "h100".to_string(),
            format!("hardware h100 (no preset for {name}; pass --hardware)"),
        ),
        (None, _, None) => ("h100".to_string(), "hardware h100 (default)".to_string()),
    };
    let config = match config {
        Some(path) => {
            how.push_str(&format!(
                ", rates from {} (--hardware-config)",
                path.display()
            ));
            Some(path.to_path_buf())
        }
        None => {
            let found = calibrated(&preset);
            if let Some(path) = &found {
                how.push_str(&format!(", rates from {} (calibrated)", path.display()));
            }
            found
        }
    };
    HardwareChoice {
        preset,
        config,
        how,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_map_to_their_presets() {
        assert_eq!(preset_for_gpu("NVIDIA H200"), Some("h200"));
        assert_eq!(preset_for_gpu("NVIDIA H100 80GB HBM3"), Some("h100"));
        assert_eq!(preset_for_gpu("NVIDIA A100-SXM4-80GB"), Some("a100-80g"));
        assert_eq!(preset_for_gpu("NVIDIA A100-SXM4-40GB"), None);
        assert_eq!(preset_for_gpu("NVIDIA GeForce RTX 4090"), None);
    }

    #[test]
    fn flags_win_then_the_gpu_and_its_calibration() {
        let file = |p: &str| Some(PathBuf::from(format!("/cal/{p}-calibrated.toml")));
        let none = |_: &str| None;
        // Flags as given, whatever the GPU.
        let c = choose(
            Some("h100"),
            Some(Path::new("x.toml")),
            Some("NVIDIA H200"),
            file,
        );
        assert_eq!(
            (c.preset.as_str(), c.config),
            ("h100", Some(PathBuf::from("x.toml")))
        );
        // The GPU's preset and its calibrated file.
        let c = choose(None, None, Some("NVIDIA H200"), file);
        assert_eq!(c.preset, "h200");
        assert_eq!(c.config, Some(PathBuf::from("/cal/h200-calibrated.toml")));
        assert!(
            c.how.contains("detected") && c.how.contains("calibrated"),
            "{}",
            c.how
        );
        // --hardware given, no file: the preset's calibration still applies.
        assert_eq!(choose(Some("h200"), None, None, file).config, file("h200"));
        // Nothing known: h100, no file, and the log says so.
        let c = choose(None, None, Some("Some GPU"), none);
        assert_eq!((c.preset.as_str(), c.config.is_none()), ("h100", true));
        assert!(c.how.contains("pass --hardware"));
        assert_eq!(choose(None, None, None, none).preset, "h100");
    }
}
