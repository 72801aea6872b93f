//! Shared fixtures for the criterion benchmarks: large workloads drawn from the real traces.

use scheduler::{Executor, HardwareConfig, ModelConfig, PerfModel};
use workload::generator::{generate, parse_mix, GeneratorConfig, SyntheticPrefix, TracePools};
use workload::traces::default_traces_dir;
use workload::Workload;

/// `n` requests blended from all three traces (Azure with synthetic shared templates), drawn
/// again in fresh epochs as needed.
pub fn trace_workload(n: usize, seed: u64) -> Workload {
    let dir = default_traces_dir().expect("benchmarks need shared/traces (or BLENDSERVE_TRACES)");
    let mix = parse_mix("azure-code=1,azure-conv=1,mooncake=1").expect("static mix");
    let pools = TracePools::load_for_mix(&dir, &mix).expect("traces load");
    let config = GeneratorConfig {
        mix,
        requests: n,
        seed,
        synthetic_prefix: Some(SyntheticPrefix {
            groups: 256,
            ..SyntheticPrefix::default()
        }),
        max_prompt_tokens: Some(32_768),
        max_tokens: workload::generator::DEFAULT_MAX_TOKENS,
    };
    generate(&config, &pools).expect("generation").0
}

pub fn h100_llama3_8b() -> PerfModel {
    PerfModel::new(
        ModelConfig::preset("llama3-8b").expect("preset"),
        HardwareConfig::preset("h100").expect("preset"),
        Executor::Overlapped,
    )
}
