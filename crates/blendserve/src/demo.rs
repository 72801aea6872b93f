//! The bundled demo: a tiny random-weight Llama model (written on first use, deterministic) and a
//! sample batch of chat and completion requests, so `blendserve run` works on a fresh machine
//! with no arguments. The model is random, so its answers are word salad; everything else (chat
//! template, tokenizer, sampling, stop strings, batching, prefix reuse) is the real path.

use std::path::PathBuf;

use anyhow::{Context, Result};
use model::fixture::{write_tiny_model, TinyModelSpec};

/// The sample batch (OpenAI Batch JSONL): chats sharing two system prompts, completions with
/// stop strings, a few long generations.
pub const DEMO_BATCH: &str = include_str!("../data/demo-batch.jsonl");

/// Bump when the demo model changes, so stale copies are rewritten.
const DEMO_VERSION: &str = "1";

const WORDS: &[&str] = &[
    "(",
    ")",
    "+",
    ",",
    "-",
    ".",
    "..",
    "0",
    "10",
    ":",
    "=",
    "?",
    "a",
    "add",
    "and",
    "answer",
    "are",
    "assistant",
    "away",
    "b",
    "best",
    "blue",
    "bug",
    "calls",
    "capital",
    "careful",
    "city",
    "code",
    "compiler",
    "cups",
    "do",
    "does",
    "every",
    "far",
    "fifty",
    "first",
    "fn",
    "food",
    "for",
    "france",
    "get",
    "good",
    "helpful",
    "how",
    "i",
    "if",
    "in",
    "is",
    "language",
    "learn",
    "let",
    "long",
    "make",
    "moon",
    "n",
    "new",
    "number",
    "of",
    "once",
    "one",
    "our",
    "out",
    "plants",
    "point",
    "prime",
    "program",
    "recipe",
    "release",
    "return",
    "reviewer",
    "rust",
    "see",
    "sentence",
    "ships",
    "short",
    "sky",
    "sum",
    "team",
    "the",
    "there",
    "thousand",
    "time",
    "to",
    "true",
    "two",
    "unwrap",
    "upon",
    "vec",
    "was",
    "way",
    "what",
    "who",
    "why",
    "write",
    "wrote",
    "x",
    "year",
    "you",
    "{",
    "}",
    "system",
    "user",
    "it",
    "that",
    "this",
    "with",
    "as",
    "on",
    "at",
    "by",
    "from",
    "or",
    "but",
    "not",
    "all",
    "can",
    "will",
    "would",
    "their",
    "they",
    "we",
    "he",
    "she",
    "his",
    "her",
    "them",
    "then",
    "than",
    "so",
    "some",
    "more",
    "most",
    "very",
    "just",
    "also",
    "about",
    "into",
    "over",
    "after",
    "before",
    "when",
    "where",
    "which",
    "while",
    "because",
    "through",
    "light",
    "water",
    "sun",
    "star",
    "earth",
    "world",
    "people",
    "day",
    "night",
    "work",
    "made",
    "know",
    "think",
    "take",
    "come",
    "go",
    "went",
    "look",
    "want",
    "give",
    "use",
    "find",
    "tell",
    "ask",
    "seem",
    "feel",
    "try",
    "leave",
    "call",
    "small",
    "large",
    "big",
    "old",
    "young",
    "great",
    "little",
    "own",
    "other",
    "same",
    "right",
    "high",
    "low",
    "early",
    "late",
    "hard",
    "easy",
    "strong",
    "weak",
    "fast",
    "slow",
    "warm",
    "cold",
    "red",
    "green",
    "yellow",
    "black",
    "white",
    "bright",
    "dark",
    "happy",
    "sad",
    "!",
    ";",
    "'",
];

const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}";

/// The demo model's folder (under the system temp folder), written if missing.
pub fn demo_model_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("blendserve-demo-model-v{DEMO_VERSION}"));
    if dir.join("complete").is_file() {
        return Ok(dir);
    }
    // Written beside and renamed into place, so concurrent first runs never see half a model.
    let staging = std::env::temp_dir().join(format!(
        "blendserve-demo-model-v{DEMO_VERSION}.{}.tmp",
        std::process::id()
    ));
    write_demo_model(&staging)?;
    if std::fs::rename(&staging, &dir).is_err() {
        // Another process won the race (or a stale folder is in the way).
        let _ = std::fs::remove_dir_all(&staging);
        if !dir.join("complete").is_file() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing the stale {}", dir.display()))?;
            return demo_model_dir();
        }
    }
    Ok(dir)
}

fn write_demo_model(dir: &std::path::Path) -> Result<()> {
    let spec = TinyModelSpec {
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        words: WORDS.iter().map(|w| w.to_string()).collect(),
        seed: 2024,
        ..TinyModelSpec::default()
    };
    write_tiny_model(dir, &spec)
        .with_context(|| format!("writing the demo model to {}", dir.display()))?;
    // Lower-case input so capitalised words find the vocabulary.
    let path = dir.join("tokenizer.json");
    let mut tokenizer: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    tokenizer["normalizer"] = serde_json::json!({"type": "Lowercase"});
    std::fs::write(&path, tokenizer.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(&path, config.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(dir.join("complete"), DEMO_VERSION)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}
