//! `blendserve run` end to end on the bundled demo model (CPU): OpenAI Batch JSONL in and out,
//! per-line errors, input order, stop strings, native workloads, and crash safety (`kill -9`
//! then `--resume` gives what an uninterrupted run gives).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn blendserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_blendserve"))
}

fn run_ok(args: &[&str]) -> String {
    let out = blendserve().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}\n{stderr}");
    stderr
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_batch(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn completion(id: &str, prompt: &str, extra: Value) -> String {
    let mut body = json!({"model": "demo", "prompt": prompt, "max_tokens": 12});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/completions", "body": body}).to_string()
}

#[test]
fn demo_batch_runs_with_no_arguments_and_writes_every_answer_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    run_ok(&[
        "run",
        "--output",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--hardware",
        "h100",
    ]);
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 20);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["id"], format!("batch_req_{:08}", i + 1));
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        let usage = &l["response"]["body"]["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
        let n = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=96).contains(&n), "{l}");
    }
    assert_eq!(lines[0]["custom_id"], "chat-0");
    assert_eq!(lines[0]["response"]["body"]["object"], "chat.completion");
    assert_eq!(lines[12]["response"]["body"]["object"], "text_completion");
    // Stop strings: the text never contains one, and finding one ends with "stop".
    for l in &lines[12..17] {
        let choice = &l["response"]["body"]["choices"][0];
        assert!(!choice["text"].as_str().unwrap().contains('.'), "{l}");
    }
    // ignore_eos requests run to max_tokens.
    for l in &lines[17..20] {
        assert_eq!(l["response"]["body"]["usage"]["completion_tokens"], 96);
        assert_eq!(
            l["response"]["body"]["choices"][0]["finish_reason"],
            "length"
        );
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["succeeded"], 20);
    assert_eq!(report["failed"], 0);
    assert!(report["optimal_bound_secs"].as_f64().unwrap() > 0.0);
    assert_eq!(report["step_executor"], "sequential");
    assert_eq!(report["executor"], "sum");
    assert!(report["executor_profile"].is_null());
    // Standard output gets the same answers in the same order (and on the CPU, `auto` has no
    // executor to choose but the sequential one).
    let stdout = blendserve()
        .args(["run", "--step-executor", "auto"])
        .output()
        .unwrap();
    assert!(stdout.status.success());
    let from_stdout: Vec<Value> = String::from_utf8(stdout.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let choices = |ls: &[Value]| -> Vec<Value> {
        ls.iter()
            .map(|l| l["response"]["body"]["choices"].clone())
            .collect()
    };
    assert_eq!(choices(&from_stdout), choices(&lines));
}

#[test]
fn bad_lines_become_error_results_and_the_batch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out.jsonl");
    let long_prompt = vec!["the"; 5000].join(" ");
    write_batch(
        &input,
        &[
            completion("ok-1", "once upon a time", json!({})),
            "{this is not json".into(),
            completion("n2", "hello", json!({"n": 2})),
            completion("long", &long_prompt, json!({})),
            completion("ok-1", "a duplicate id", json!({})),
            json!({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}})
                .to_string(),
            completion("toomany", "hi", json!({"max_tokens": 5000})),
            completion("ok-2", "the sky is", json!({"temperature": 0.8, "seed": 1})),
        ],
    );
    run_ok(&[
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 8, "one result per input line");
    let by_line: Vec<(Value, Value)> = lines
        .iter()
        .map(|l| (l["custom_id"].clone(), l["response"]["status_code"].clone()))
        .collect();
    assert_eq!(by_line[0], (json!("ok-1"), json!(200)));
    assert_eq!(by_line[7], (json!("ok-2"), json!(200)));
    assert_eq!(lines[1]["error"]["code"], "invalid_json");
    assert!(lines[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 2"));
    let code = |i: usize| lines[i]["response"]["body"]["error"]["code"].clone();
    assert_eq!(code(2), "unsupported_parameter");
    assert_eq!(code(3), "context_length_exceeded");
    assert_eq!(code(4), "duplicate_custom_id");
    assert_eq!(code(5), "unsupported_url");
    assert_eq!(code(6), "context_length_exceeded");
}

#[test]
fn native_workload_replays_recorded_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("w.jsonl");
    let out = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"prompt_tokens\": 40, \"output_tokens\": 7, \"max_tokens\": 64}\n\
         {\"id\": \"b\", \"prompt_token_ids\": [5, 6, 7, 8], \"output_tokens\": 3, \"max_tokens\": 64}\n",
    )
    .unwrap();
    run_ok(&[
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--policy",
        "dfs",
    ]);
    let lines = read_lines(&out);
    let usage = |i: usize| lines[i]["response"]["body"]["usage"].clone();
    assert_eq!(usage(0)["completion_tokens"], 7);
    assert_eq!(usage(0)["prompt_tokens"], 40);
    assert_eq!(usage(1)["completion_tokens"], 3);
    let ids = &lines[1]["response"]["body"]["choices"][0]["token_ids"];
    assert_eq!(ids.as_array().unwrap().len(), 3);
    // A length declared known reaches the scheduler as is: BlendServe's sample phase runs only
    // the other request.
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"prompt_tokens\": 40, \"output_tokens\": 7, \"max_tokens\": 64, \"output_known\": true}\n\
         {\"id\": \"b\", \"prompt_token_ids\": [5, 6, 7, 8], \"output_tokens\": 3, \"max_tokens\": 64}\n",
    )
    .unwrap();
    let report = dir.path().join("report.json");
    run_ok(&[
        "run",
        "--input",
        input.to_str().unwrap(),
        "--output",
        dir.path().join("known.jsonl").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(report["sample_requests"], 1, "{report}");
    let lines = read_lines(&dir.path().join("known.jsonl"));
    assert_eq!(
        lines[0]["response"]["body"]["usage"]["completion_tokens"],
        7
    );
}

/// Results keyed by custom_id, without the wall-clock field.
fn results(path: &Path) -> BTreeMap<String, Value> {
    read_lines(path)
        .into_iter()
        .map(|mut l| {
            l["response"]["body"]["created"] = json!(0);
            (l["custom_id"].as_str().unwrap().to_string(), l)
        })
        .collect()
}

#[test]
fn kill_then_resume_loses_nothing_and_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let words = [
        "the sky is",
        "once upon a time",
        "our team ships",
        "what is rust",
    ];
    let lines: Vec<String> = (0..300)
        .map(|i| {
            completion(
                &format!("r{i}"),
                words[i % 4],
                json!({"max_tokens": 20 + i % 40, "ignore_eos": true,
                       "temperature": if i % 3 == 0 { 0.9 } else { 0.0 }}),
            )
        })
        .collect();
    write_batch(&input, &lines);
    let full = dir.path().join("full.jsonl");
    let common = ["--max-running", "16", "--policy", "fcfs"];
    let mut args = vec!["run", "--input", input.to_str().unwrap()];
    args.extend(common);
    let mut full_args = args.clone();
    full_args.extend(["--output", full.to_str().unwrap()]);
    run_ok(&full_args);

    let part = dir.path().join("part.jsonl");
    let mut part_args = args.clone();
    part_args.extend(["--output", part.to_str().unwrap()]);
    let mut child = blendserve()
        .args(&part_args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let written = std::fs::read_to_string(&part)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if written >= 20 || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = std::fs::read_to_string(&part).unwrap();
    assert!(
        before.lines().count() < 300,
        "the run ended before the kill: nothing was tested"
    );
    // A torn last line, as a kill in the middle of a write leaves.
    std::fs::write(&part, before.clone() + "{\"id\": \"batch_req_0000").unwrap();
    let mut resume_args = part_args.clone();
    resume_args.push("--resume");
    let stderr = run_ok(&resume_args);
    assert!(stderr.contains("already done"), "{stderr}");
    let got = results(&part);
    assert_eq!(got.len(), 300);
    assert_eq!(got, results(&full), "resumed results differ");
    // Input order after the final rewrite.
    let order: Vec<String> = read_lines(&part)
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, (0..300).map(|i| format!("r{i}")).collect::<Vec<_>>());
}

#[test]
fn a_bad_setting_fails_before_the_output_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "{\"earlier\": \"results\"}\n").unwrap();
    for bad in [
        vec!["--token-budget", "greedy"],
        vec!["--lengths", "psychic"],
        vec!["--kv-memory-fraction", "1.5"],
        vec!["--executor", "parallel"],
        vec!["--step-executor", "overlap"],
    ] {
        let mut args = vec!["run", "--output", out.to_str().unwrap()];
        args.extend(&bad);
        let o = blendserve().args(&args).output().unwrap();
        assert!(!o.status.success(), "{bad:?} was accepted");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(bad[1]), "{bad:?}: {stderr}");
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"earlier\": \"results\"}\n",
            "{bad:?} touched the output"
        );
    }
}

/// `blendserve merge --input INPUT --out OUT PARTS...`, which must succeed.
fn merge_ok(input: &Path, out: &Path, parts: &[std::path::PathBuf]) {
    let mut args = vec![
        "merge",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    run_ok(&args);
}

/// Both outputs hold the same result lines in the same order (`created` aside).
fn assert_same_results(got: &Path, want: &Path, what: &str) {
    let strip = |mut v: Value| {
        v["response"]["body"]["created"] = json!(0);
        v
    };
    let got: Vec<Value> = read_lines(got).into_iter().map(strip).collect();
    let want: Vec<Value> = read_lines(want).into_iter().map(strip).collect();
    assert_eq!(got, want, "{what}");
}

/// Data-parallel ranks: every rank of 1, 2 and 3 cuts the batch alike, runs its share, and
/// `merge` joins them into the single run's output line for line (`created` aside), in input
/// order; a missing rank is named by the lines it leaves without a result, and a result in two
/// rank outputs is refused.
#[test]
fn ranks_run_their_shares_and_merge_into_the_single_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("batch.jsonl");
    let prompts = [
        "You are a helpful assistant. Translate to French: good morning",
        "You are a helpful assistant. Translate to French: good night",
        "You are a helpful assistant. Translate to French: thank you very much",
        "Summarise: the quick brown fox jumps over the lazy dog",
        "Summarise: a stitch in time saves nine",
        "Count: one two three four",
        "Count: five six seven eight nine ten",
    ];
    let mut lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| completion(&format!("req-{i}"), p, json!({})))
        .collect();
    lines.insert(3, "{not json".to_string());
    write_batch(&input, &lines);
    let input_s = input.to_str().unwrap();
    let single = dir.path().join("single.jsonl");
    run_ok(&[
        "run",
        "--input",
        input_s,
        "--output",
        single.to_str().unwrap(),
    ]);
    for ranks in [1usize, 2, 3] {
        let mut outputs = Vec::new();
        for rank in 0..ranks {
            let out = dir.path().join(format!("r{rank}-of-{ranks}.jsonl"));
            let (r, n) = (rank.to_string(), ranks.to_string());
            run_ok(&[
                "run",
                "--input",
                input_s,
                "--rank",
                &r,
                "--ranks",
                &n,
                "--output",
                out.to_str().unwrap(),
            ]);
            outputs.push(out);
        }
        let merged = dir.path().join(format!("merged-{ranks}.jsonl"));
        merge_ok(&input, &merged, &outputs);
        assert_same_results(&merged, &single, &format!("{ranks} ranks"));
    }
    // plan: shard files and a manifest; each shard run on its own, then merged.
    let plan = dir.path().join("plan");
    let plan_s = plan.to_str().unwrap();
    run_ok(&[
        "plan", "--input", input_s, "--ranks", "3", "--output", plan_s,
    ]);
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(plan.join("manifest.json")).unwrap())
            .unwrap();
    let planned = manifest["per_rank"].as_array().unwrap();
    assert_eq!(planned.len(), 3);
    let requests: u64 = planned
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, prompts.len() as u64);
    assert!(manifest["sharing_kept"].as_f64().unwrap() > 0.0);
    // BlendServe's cut is rebalanced by the simulator before it is written.
    assert!(manifest["rebalancing_passes"].as_u64().unwrap() >= 1);
    let mut outputs = Vec::new();
    for rank in 0..3 {
        let out = dir.path().join(format!("shard-{rank}.jsonl"));
        let shard = plan.join(format!("rank-{rank}"));
        run_ok(&[
            "run",
            "--shard",
            shard.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        outputs.push(out);
    }
    let merged = dir.path().join("merged-plan.jsonl");
    merge_ok(&input, &merged, &outputs);
    assert_same_results(&merged, &single, "plan + run --shard + merge");
    // One host, several devices: the ranks as child processes, merged into --output.
    let merged = dir.path().join("devices.jsonl");
    run_ok(&[
        "run",
        "--input",
        input_s,
        "--devices",
        "0,1",
        "--report",
        dir.path().join("devices-report.json").to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_same_results(&merged, &single, "--devices 0,1");
    assert!(dir.path().join("devices.rank-1.jsonl").exists());
    // Every rank reaches the same rebalanced cut alone.
    let merged = dir.path().join("rebalanced.jsonl");
    run_ok(&[
        "run",
        "--input",
        input_s,
        "--devices",
        "0,1",
        "--rebalance-ranks",
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_same_results(&merged, &single, "--devices 0,1 --rebalance-ranks");
    let log = std::fs::read_to_string(dir.path().join("rebalanced.rank-0.log")).unwrap();
    assert!(
        log.contains("rebalancing passes") && !log.contains(", 0 rebalancing passes"),
        "rank 0 did not rebalance: {log}"
    );
    assert!(dir.path().join("devices.rank-1.report.json").exists());
    // plan cuts OpenAI batch files only: a native workload's shards would not keep its prompts.
    let native = dir.path().join("native.jsonl");
    std::fs::write(
        &native,
        "{\"id\": \"a\", \"prompt_tokens\": 20, \"max_tokens\": 4}\n",
    )
    .unwrap();
    let out = blendserve()
        .args([
            "plan",
            "--ranks",
            "2",
            "--input",
            native.to_str().unwrap(),
            "--output",
        ])
        .arg(dir.path().join("native-plan"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run --rank K --ranks N"));
    // Rank 1 of 2 missing: the merge keeps rank 0's results and names the lines left over.
    let merged = dir.path().join("partial.jsonl");
    let out = blendserve()
        .args([
            "merge",
            "--input",
            input_s,
            "--out",
            merged.to_str().unwrap(),
        ])
        .arg(dir.path().join("r0-of-2.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("have no result") && stderr.contains("batch_req_"),
        "{stderr}"
    );
    assert_eq!(
        read_lines(&merged).len(),
        read_lines(&dir.path().join("r0-of-2.jsonl")).len()
    );
    // The same rank twice: refused.
    let r0 = dir.path().join("r0-of-2.jsonl");
    let out = blendserve()
        .args(["merge", "--out", merged.to_str().unwrap()])
        .args([&r0, &r0])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in both"));
    // --rank without --ranks, or out of range: a clear error before anything runs.
    for bad in [&["--rank", "0"][..], &["--rank", "2", "--ranks", "2"][..]] {
        let mut args = vec!["run", "--input", input_s];
        args.extend_from_slice(bad);
        let out = blendserve().args(&args).output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--rank"),
            "{bad:?}"
        );
    }
}

/// Batch invariance is a property of the CUDA path's kernels: asked for on the CPU, the run
/// stops before writing anything and says which flag needs what.
#[test]
fn batch_invariance_needs_the_gpu_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.jsonl");
    let out = blendserve()
        .args(["run", "--batch-invariant", "--output"])
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--batch-invariant needs --device cuda"),
        "{stderr}"
    );
    assert!(!out_path.exists() || std::fs::read_to_string(&out_path).unwrap().is_empty());
}
