//! Readers: the real traces load completely; malformed input is an error naming the line;
//! native JSONL round-trips.

use std::io::Write;
use std::path::PathBuf;

use workload::generator::{
    generate, parse_mix, GeneratorConfig, SyntheticPrefix, TracePools, DEFAULT_MAX_TOKENS,
};
use workload::traces::{
    default_traces_dir, read_azure_csv, read_mooncake_jsonl, NamedTrace, TraceRecord,
};
use workload::{load_file, native, Namespace, Request, WorkloadError};

fn traces_dir() -> PathBuf {
    default_traces_dir()
        .expect("the shared traces folder (../shared/traces) must be present for these tests")
}

fn temp_file(name: &str, contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(contents)
        .unwrap();
    (dir, path)
}

fn line_of(err: WorkloadError) -> usize {
    match err {
        WorkloadError::Parse { line, .. } => line,
        other => panic!("expected a parse error with a line, got {other}"),
    }
}

fn mean(records: &[TraceRecord], field: fn(&TraceRecord) -> u32) -> f64 {
    records.iter().map(|x| f64::from(field(x))).sum::<f64>() / records.len() as f64
}

#[test]
fn real_traces_load_completely() {
    let dir = traces_dir();
    let code = NamedTrace::AzureCode.load(&dir).unwrap();
    let conv = NamedTrace::AzureConv.load(&dir).unwrap();
    let moon = NamedTrace::Mooncake.load(&dir).unwrap();
    // The traces README says 8,818 and 19,365; the files hold one row more each (checked with
    // Python's csv module too).
    assert_eq!(code.len(), 8819);
    assert_eq!(conv.len(), 19366);
    assert_eq!(moon.len(), 12031);
    // Means from the traces README: code 2048 prompt, conversation 211 output, Mooncake 12035.
    assert!((mean(&code, |r| r.prompt_tokens) - 2048.0).abs() < 1.0);
    assert!((mean(&conv, |r| r.output_tokens) - 211.0).abs() < 1.0);
    assert!((mean(&moon, |r| r.prompt_tokens) - 12035.0).abs() < 1.0);
    assert_eq!(code[0].line, 2);
    // Whole-file workloads keep file order.
    let w = load_file(&dir.join(NamedTrace::Mooncake.file_name())).unwrap();
    assert_eq!(w.len(), 12031);
    assert_eq!(w.requests[0].prompt_tokens(), 6758);
    assert_eq!(
        w.requests[0].prompt[0], w.requests[1].prompt[0],
        "Mooncake's first block is shared"
    );
}

#[test]
fn azure_csv_with_bom_and_crlf_parses_and_bad_rows_name_their_line() {
    let (_d, ok) = temp_file(
        "ok.csv",
        b"\xef\xbb\xbfTIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.98,4808,10\r\nx,3,8\r\n",
    );
    let records = read_azure_csv(&ok).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (
            records[0].prompt_tokens,
            records[0].output_tokens,
            records[1].line
        ),
        (4808, 10, 3)
    );

    let (_d, bad) = temp_file(
        "bad.csv",
        b"TIMESTAMP,ContextTokens,GeneratedTokens\nt,1,1\nt,12x,4\n",
    );
    let err = read_azure_csv(&bad).unwrap_err();
    assert!(err.to_string().contains("12x"), "{err}");
    assert_eq!(line_of(err), 3);

    let (_d, zero) = temp_file(
        "zero.csv",
        b"TIMESTAMP,ContextTokens,GeneratedTokens\nt,0,4\n",
    );
    assert_eq!(line_of(read_azure_csv(&zero).unwrap_err()), 2);

    let (_d, cols) = temp_file("cols.csv", b"time,prompt,out\nt,1,1\n");
    assert!(read_azure_csv(&cols)
        .unwrap_err()
        .to_string()
        .contains("ContextTokens"));
}

#[test]
fn mooncake_block_count_is_checked() {
    let (_d, bad) = temp_file(
        "m.jsonl",
        b"{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1, 2]}\n\n{\"timestamp\": 1, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1]}\n",
    );
    let err = read_mooncake_jsonl(&bad).unwrap_err();
    assert!(err.to_string().contains("needs 2 blocks"), "{err}");
    assert_eq!(line_of(err), 3);
}

#[test]
fn native_errors_name_line_and_problem() {
    let cases: [(&str, &str); 7] = [
        (r#"{"id": "a", "max_tokens": 5}"#, "missing prompt"),
        (
            r#"{"id": "a", "prompt_tokens": 5, "max_tokens": 5, "temprature": 1}"#,
            "unknown field",
        ),
        (
            r#"{"id": "a", "prompt_tokens": 5, "prefix": [{"id": "s", "tokens": 9}], "max_tokens": 5}"#,
            "more than prompt_tokens",
        ),
        (
            r#"{"id": "a", "prompt_tokens": 5, "max_tokens": 0}"#,
            "max_tokens",
        ),
        (
            r#"{"id": "a", "prompt_token_ids": [], "max_tokens": 3}"#,
            "empty",
        ),
        (r#"{"id": "a", "prompt_tokens": 5, "max_tokens": 5"#, "EOF"),
        (
            r#"{"id": "a", "prompt_token_ids": [1], "prompt_tokens": 1, "max_tokens": 3}"#,
            "not both",
        ),
    ];
    for (line, expected) in cases {
        let text = format!("{{\"id\": \"ok\", \"prompt_tokens\": 3, \"max_tokens\": 1}}\n{line}\n");
        let err = native::parse_native_jsonl(&text, std::path::Path::new("in.jsonl")).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("in.jsonl:2:"), "{message}");
        assert!(message.contains(expected), "{message} lacks {expected}");
    }
    let dup = "{\"id\": \"a\", \"prompt_tokens\": 3, \"max_tokens\": 1}\n{\"id\": \"a\", \"prompt_tokens\": 3, \"max_tokens\": 1}\n";
    assert!(native::parse_native_jsonl(dup, std::path::Path::new("x"))
        .unwrap_err()
        .to_string()
        .contains("duplicate"));
    let mismatch = "{\"id\": \"a\", \"prompt_tokens\": 30, \"prefix\": [{\"id\": \"s\", \"tokens\": 8}], \"max_tokens\": 1}\n{\"id\": \"b\", \"prompt_tokens\": 30, \"prefix\": [{\"id\": \"s\", \"tokens\": 9}], \"max_tokens\": 1}\n";
    let err = native::parse_native_jsonl(mismatch, std::path::Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("x:2:") && err.contains("`s`"), "{err}");
}

fn common_chunks(p: &Request, q: &Request) -> usize {
    p.prompt
        .iter()
        .zip(&q.prompt)
        .take_while(|(x, y)| x == y)
        .count()
}

#[test]
fn native_round_trip_keeps_requests_and_sharing() {
    let mut pools = TracePools::default();
    pools.insert(
        "azure-conv",
        NamedTrace::AzureConv.load(&traces_dir()).unwrap(),
    );
    pools.insert(
        "mooncake",
        NamedTrace::Mooncake.load(&traces_dir()).unwrap(),
    );
    let config = GeneratorConfig {
        mix: parse_mix("azure-conv=1,mooncake=1").unwrap(),
        requests: 400,
        seed: 3,
        synthetic_prefix: Some(SyntheticPrefix::default()),
        max_prompt_tokens: None,
        max_tokens: DEFAULT_MAX_TOKENS,
    };
    let (original, _) = generate(&config, &pools).unwrap();
    let mut text = Vec::new();
    native::write_native_jsonl(&original, &mut text).unwrap();
    let back = native::parse_native_jsonl(
        std::str::from_utf8(&text).unwrap(),
        std::path::Path::new("mem"),
    )
    .unwrap();
    assert_eq!(back.len(), original.len());
    for (a, b) in original.requests.iter().zip(&back.requests) {
        assert_eq!(
            (&a.id, a.prompt_tokens(), a.max_tokens, a.output_tokens),
            (&b.id, b.prompt_tokens(), b.max_tokens, b.output_tokens)
        );
        assert_eq!(a.prompt.len(), b.prompt.len());
    }
    // Same sharing structure: two prompts share k leading chunks before iff they do after.
    let (a, b) = (&original.requests, &back.requests);
    let mut shared_pairs = 0;
    for i in 0..a.len() {
        for j in (i + 1)..a.len() {
            assert_eq!(common_chunks(&a[i], &a[j]), common_chunks(&b[i], &b[j]));
            shared_pairs += usize::from(common_chunks(&a[i], &a[j]) > 0);
        }
    }
    assert!(shared_pairs > 100, "the sample shares prefixes");
    // Token-id prompts round-trip as token ids.
    let tokens = "{\"id\": \"t\", \"prompt_token_ids\": [5, 6, 7], \"max_tokens\": 2}\n";
    let w = native::parse_native_jsonl(tokens, std::path::Path::new("t")).unwrap();
    assert_eq!(
        Namespace::of(w.requests[0].prompt[0].content_id),
        Some(Namespace::Token)
    );
    let mut out = Vec::new();
    native::write_native_jsonl(&w, &mut out).unwrap();
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("\"prompt_token_ids\":[5,6,7]"));
}

#[test]
fn generated_max_tokens_does_not_reveal_output_lengths() {
    let mut pools = TracePools::default();
    pools.insert(
        "azure-code",
        NamedTrace::AzureCode.load(&traces_dir()).unwrap(),
    );
    let config = GeneratorConfig {
        mix: parse_mix("azure-code").unwrap(),
        requests: 200,
        seed: 1,
        synthetic_prefix: None,
        max_prompt_tokens: Some(4000),
        max_tokens: 2048,
    };
    let (w, report) = generate(&config, &pools).unwrap();
    assert!(w.requests.iter().all(|r| r.max_tokens >= 2048));
    assert!(w.requests.iter().all(|r| r.prompt_tokens() <= 4000));
    assert!(report.dropped_too_long > 0);
}
