//! The `blendserve` binary end to end: the bundled default runs, results land in CSV, and bad
//! input fails with a message naming the file, line or setting.

use std::process::Command;

fn blendserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blendserve"))
}

#[test]
fn sim_on_bundled_default_prints_table_and_writes_csv() {
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("out.csv");
    let out = blendserve()
        .args(["sim", "--csv"])
        .arg(&csv_path)
        .output()
        .unwrap();
    assert_ok(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    for policy in ["fcfs", "random", "dfs", "blendserve"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(policy)),
            "{policy} missing:\n{stdout}"
        );
    }
    let mut reader = csv::Reader::from_path(&csv_path).unwrap();
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 8, "4 policies x 2 executors");
    for row in &rows {
        assert_eq!(&row[column("workload")], "bundled-default");
        assert_eq!(&row[column("finished")], "1000");
        let pct: f64 = row[column("percent_of_optimal")].parse().unwrap();
        assert!(pct > 10.0 && pct <= 100.0, "{pct}");
    }
}

#[test]
fn sim_reads_a_trace_file_and_a_mix() {
    let traces = workload::traces::default_traces_dir().expect("shared/traces");
    let dir = tempfile::tempdir().unwrap();
    let out = blendserve()
        .args([
            "sim",
            "--policy",
            "dfs",
            "--executor",
            "max",
            "--requests",
            "300",
            "--workload",
        ])
        .arg(traces.join("azure_llm_2023_code.csv"))
        .arg("--csv")
        .arg(dir.path().join("a.csv"))
        .output()
        .unwrap();
    assert_ok(&out);
    let out = blendserve()
        .args([
            "sim",
            "--policy",
            "ablation",
            "--executor",
            "partial:0.5",
            "--requests",
            "300",
            "--prefix-ratio",
            "0.4",
        ])
        .args(["--workload", "azure-code=1,mooncake=1", "--traces-dir"])
        .arg(&traces)
        .arg("--csv")
        .arg(dir.path().join("b.csv"))
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("blendserve-flat"));
}

/// Asserts a command succeeded, showing its stderr if not.
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn failure(args: &[&str]) -> String {
    let out = blendserve().args(args).output().unwrap();
    assert!(!out.status.success(), "expected failure for {args:?}");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_input_names_the_line_or_setting() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"a\", \"prompt_tokens\": 10, \"max_tokens\": 4}\n{\"id\": \"b\", \"prompt_tokens\": \"ten\", \"max_tokens\": 4}\n").unwrap();
    let err = failure(&["sim", "--workload", bad.to_str().unwrap()]);
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    let err = failure(&["sim", "--policy", "lifo"]);
    assert!(err.contains("unknown policy `lifo`"), "{err}");
    let err = failure(&["sim", "--model", "gpt-9"]);
    assert!(err.contains("gpt-9"), "{err}");
    let err = failure(&["sim", "--executor", "partial:3"]);
    assert!(err.contains("partial:E"), "{err}");
    let err = failure(&["sim", "--model", "llama3-70b"]);
    assert!(err.contains("kv_memory_fraction"), "{err}");
    let err = failure(&["sim", "--workload", "azure-cod=1"]);
    assert!(err.contains("unknown trace `azure-cod`"), "{err}");
    let toml = dir.path().join("o.toml");
    std::fs::write(&toml, "[hardware]\npeak_flop = 1e15\n").unwrap();
    let err = failure(&["sim", "--config", toml.to_str().unwrap()]);
    assert!(err.contains("o.toml") && err.contains("peak_flop"), "{err}");
}

#[test]
fn generate_then_simulate_the_written_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("w.jsonl");
    let out = blendserve()
        .args([
            "generate",
            "--workload",
            "azure-conv=1,mooncake=1",
            "--requests",
            "200",
            "--prefix-ratio",
            "0.5",
            "--out",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert_ok(&out);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 200);
    let out = blendserve()
        .args(["inspect", "--workload"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("requests      200") && text.contains("sharing ratio"),
        "{text}"
    );
}

#[test]
fn generate_writes_a_paper_preset_with_known_video_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace2.jsonl");
    let out = blendserve()
        .args([
            "generate",
            "--workload",
            "paper-trace2",
            "--requests",
            "3000",
            "--hardware",
            "h200",
            "--out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_ok(&out);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3000);
    let source = |v: &serde_json::Value| v["source"].as_str().unwrap_or("").to_string();
    for part in ["burstgpt", "mmlu", "openvid"] {
        assert!(lines.iter().any(|v| source(v) == part), "no {part} request");
    }
    for v in &lines {
        let known = v["output_known"].as_bool().unwrap_or(false);
        assert_eq!(known, source(v) == "openvid", "{v}");
    }
    // The file reads back, and sim runs it; a bad preset names itself.
    let sim = blendserve()
        .args([
            "sim",
            "--policy",
            "dfs,blendserve",
            "--executor",
            "max",
            "--requests",
            "0",
            "--hardware",
            "h200",
            "--workload",
        ])
        .arg(&path)
        .arg("--csv")
        .arg(dir.path().join("out.csv"))
        .output()
        .unwrap();
    assert_ok(&sim);
    let bad = blendserve()
        .args(["sim", "--workload", "paper-trace7"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("paper-trace7"));
}

#[test]
fn calibrate_names_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let out = blendserve()
        .args(["calibrate", "--device", "cpu", "--model"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("h.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device cpu"));
    // A folder without config.json is named.
    let out = blendserve()
        .args(["calibrate", "--random-weights", "--model"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("h.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert!(!dir.path().join("h.toml").exists());
}

/// `sim --ranks`: one row per rank count and sharding, each rank's time listed, the speed-up
/// and the prefix hits kept in range; a bad rank count or sharding is named.
#[test]
fn sim_ranks_compares_shardings() {
    let dir = tempfile::tempdir().unwrap();
    let ranks_csv = dir.path().join("ranks.csv");
    let out = blendserve()
        .args([
            "sim",
            "--policy",
            "blendserve",
            "--executor",
            "max",
            "--ranks",
            "1,2,4",
        ])
        .arg("--csv")
        .arg(dir.path().join("out.csv"))
        .arg("--ranks-csv")
        .arg(&ranks_csv)
        .output()
        .unwrap();
    assert_ok(&out);
    let mut reader = csv::Reader::from_path(&ranks_csv).unwrap();
    let headers = reader.headers().unwrap().clone();
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 6, "3 rank counts x 2 shardings");
    for row in &rows {
        let ranks: usize = row[column("ranks")].parse().unwrap();
        assert_eq!(row[column("rank_secs")].split(' ').count(), ranks);
        let speedup: f64 = row[column("speedup")].parse().unwrap();
        let kept: f64 = row[column("prefix_hits_kept")].parse().unwrap();
        if ranks == 1 {
            assert!((speedup - 1.0).abs() < 1e-9 && (kept - 1.0).abs() < 1e-9);
        } else {
            assert!(speedup > 1.0 && speedup < 1.5 * ranks as f64, "{speedup}");
            assert!(kept > 0.5 && kept <= 1.0 + 1e-9, "{kept}");
        }
    }
    for (args, named) in [
        (&["sim", "--ranks", "0"][..], "rank count"),
        (
            &["sim", "--ranks", "2", "--sharding", "hash"][..],
            "sharding",
        ),
    ] {
        let out = blendserve().args(args).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(named),
            "{args:?}"
        );
    }
}
