//! OpenAI Batch API files: input lines (`custom_id`, `method`, `url`, `body`) as vLLM's
//! `run-batch` accepts them, and output lines (`id`, `custom_id`, `response` or `error`).
//!
//! Every input line either parses into a [`BatchRequest`] or becomes a [`LineError`] that is
//! written to the output as that line's result; one bad line never stops the batch.

use serde::Serialize;
use serde_json::{json, Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    /// A completions prompt given as token ids.
    Tokens(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

/// One valid input line.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRequest {
    /// 1-based line number in the input file.
    pub line: usize,
    pub custom_id: String,
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

/// Why a line cannot run; written to the output as its result.
#[derive(Clone, Debug, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub custom_id: Option<String>,
    /// OpenAI-style code: `invalid_json`, `invalid_request`, `unsupported_parameter`, ...
    pub code: &'static str,
    pub message: String,
}

impl LineError {
    fn new(line: usize, custom_id: Option<&str>, code: &'static str, message: String) -> Self {
        LineError {
            line,
            custom_id: custom_id.map(str::to_string),
            code,
            message,
        }
    }
}

/// Body fields that are accepted only at their default value (anything else would change the
/// result in a way this engine does not implement).
/// `None` for other fields; for these, whether `value` is the default (or why not).
fn check_default(key: &str, value: &Value) -> Option<Result<(), String>> {
    let ok = match key {
        "n" | "best_of" => value.as_u64() == Some(1),
        "stream" | "echo" => value.as_bool() == Some(false),
        "logprobs" | "top_logprobs" => {
            value.is_null() || value.as_bool() == Some(false) || value.as_u64() == Some(0)
        }
        "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
        "repetition_penalty" => value.as_f64() == Some(1.0),
        "logit_bias" => value.as_object().is_some_and(Map::is_empty) || value.is_null(),
        "suffix" | "response_format" | "tools" | "tool_choice" | "stream_options" => {
            value.is_null()
        }
        _ => return None,
    };
    Some(if ok {
        Ok(())
    } else {
        Err(format!("`{key}` = {value} is not supported"))
    })
}

/// Fields that carry no meaning for generation here.
const IGNORED_FIELDS: &[&str] = &["user", "metadata", "store", "service_tier"];

fn parse_u32(key: &str, v: &Value) -> Result<u32, String> {
    v.as_u64()
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| format!("`{key}` must be a non-negative integer, got {v}"))
}

fn parse_f32(key: &str, v: &Value) -> Result<f32, String> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| format!("`{key}` must be a number, got {v}"))
}

fn parse_stop(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`stop` entries must be strings, got {s}"))
            })
            .collect(),
        other => Err(format!(
            "`stop` must be a string or a list of strings, got {other}"
        )),
    }
    .and_then(|stops: Vec<String>| {
        if stops.iter().any(String::is_empty) {
            Err("`stop` strings must not be empty".into())
        } else {
            Ok(stops)
        }
    })
}

fn message_content(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        // The content-parts form: text parts are joined; other parts are unsupported.
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    _ => return Err(format!("message content part {p} is not a text part")),
                }
            }
            Ok(text)
        }
        other => Err(format!("message content must be a string, got {other}")),
    }
}

fn parse_messages(v: &Value) -> Result<Vec<ChatMessage>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| "`messages` must be a list".to_string())?;
    if items.is_empty() {
        return Err("`messages` is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("message {i} has no string `role`"))?;
            let content = message_content(m.get("content").unwrap_or(&Value::Null))
                .map_err(|e| format!("message {i}: {e}"))?;
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn parse_prompt(v: &Value) -> Result<PromptInput, String> {
    match v {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => Ok(PromptInput::Text(
            items[0].as_str().unwrap_or_default().to_string(),
        )),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => items
            .iter()
            .map(|t| parse_u32("prompt", t))
            .collect::<Result<_, _>>()
            .map(PromptInput::Tokens),
        Value::Array(_) => Err(
            "`prompt` must be a string, one string, or a list of token ids (one prompt per line)"
                .into(),
        ),
        other => Err(format!("`prompt` must be a string, got {other}")),
    }
}

/// Parses input line `line` (1-based).
pub fn parse_line(line: usize, text: &str) -> Result<BatchRequest, LineError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        LineError::new(
            line,
            None,
            "invalid_json",
            format!("line {line}: not valid JSON: {e}"),
        )
    })?;
    let obj = value.as_object().ok_or_else(|| {
        LineError::new(
            line,
            None,
            "invalid_json",
            format!("line {line}: not a JSON object"),
        )
    })?;
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => {
            return Err(LineError::new(
                line,
                None,
                "missing_custom_id",
                format!("line {line}: `custom_id` must be a non-empty string"),
            ))
        }
    };
    let bad = |code: &'static str, message: String| {
        LineError::new(
            line,
            Some(custom_id),
            code,
            format!("line {line}: {message}"),
        )
    };
    if let Some(m) = obj.get("method") {
        if m.as_str() != Some("POST") {
            return Err(bad(
                "invalid_request",
                format!("`method` must be POST, got {m}"),
            ));
        }
    }
    let endpoint = match obj.get("url").and_then(Value::as_str) {
        Some("/v1/completions") => Endpoint::Completions,
        Some("/v1/chat/completions") => Endpoint::Chat,
        Some(other) => {
            return Err(bad(
                "unsupported_url",
                format!("url `{other}` is not supported (/v1/completions, /v1/chat/completions)"),
            ))
        }
        None => return Err(bad("invalid_request", "`url` is missing".into())),
    };
    let body = obj
        .get("body")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("invalid_request", "`body` must be an object".into()))?;
    let mut request = BatchRequest {
        line,
        custom_id: custom_id.to_string(),
        endpoint,
        model: None,
        prompt: PromptInput::Text(String::new()),
        max_tokens: None,
        temperature: None,
        top_p: None,
        top_k: None,
        seed: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        ignore_eos: false,
    };
    let mut has_prompt = false;
    for (key, v) in body {
        let invalid = |m: String| bad("invalid_request", m);
        match (key.as_str(), endpoint) {
            ("model", _) => request.model = v.as_str().map(str::to_string),
            ("prompt", Endpoint::Completions) => {
                request.prompt = parse_prompt(v).map_err(invalid)?;
                has_prompt = true;
            }
            ("messages", Endpoint::Chat) => {
                request.prompt = PromptInput::Chat(parse_messages(v).map_err(invalid)?);
                has_prompt = true;
            }
            ("max_tokens" | "max_completion_tokens", _) if !v.is_null() => {
                request.max_tokens = Some(parse_u32(key, v).map_err(invalid)?);
            }
            ("temperature", _) if !v.is_null() => {
                let t = parse_f32(key, v).map_err(invalid)?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(invalid(format!("`temperature` {t} is outside [0, 2]")));
                }
                request.temperature = Some(t);
            }
            ("top_p", _) if !v.is_null() => {
                let p = parse_f32(key, v).map_err(invalid)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(invalid(format!("`top_p` {p} is outside (0, 1]")));
                }
                request.top_p = Some(p);
            }
            ("top_k", _) if !v.is_null() => {
                // vLLM's convention: -1 (or 0) means no limit.
                request.top_k = match v.as_i64() {
                    Some(k) if k <= 0 => None,
                    _ => Some(parse_u32(key, v).map_err(invalid)?),
                };
            }
            ("seed", _) if !v.is_null() => {
                request.seed = Some(v.as_u64().ok_or_else(|| {
                    invalid(format!("`seed` must be a non-negative integer, got {v}"))
                })?);
            }
            ("stop", _) => request.stop = parse_stop(v).map_err(invalid)?,
            ("stop_token_ids", _) if !v.is_null() => {
                request.stop_token_ids = v
                    .as_array()
                    .ok_or_else(|| invalid("`stop_token_ids` must be a list".into()))?
                    .iter()
                    .map(|t| parse_u32(key, t))
                    .collect::<Result<_, _>>()
                    .map_err(invalid)?;
            }
            ("ignore_eos", _) => {
                request.ignore_eos = v
                    .as_bool()
                    .ok_or_else(|| invalid("`ignore_eos` must be true or false".into()))?;
            }
            (k, _) if IGNORED_FIELDS.contains(&k) => {}
            ("max_tokens" | "temperature" | "top_p" | "top_k" | "seed" | "stop_token_ids", _) => {}
            (k, _) => {
                match check_default(k, v) {
                    Some(Ok(())) => continue,
                    Some(Err(message)) => return Err(bad("unsupported_parameter", message)),
                    None => {}
                }
                let message = match (k, endpoint) {
                    ("prompt", Endpoint::Chat) => {
                        "`prompt` belongs to /v1/completions; chat requests take `messages`".into()
                    }
                    ("messages", Endpoint::Completions) => {
                        "`messages` belongs to /v1/chat/completions".into()
                    }
                    _ => format!("unsupported field `{k}`"),
                };
                return Err(bad("unsupported_parameter", message));
            }
        }
    }
    if !has_prompt {
        return Err(bad(
            "invalid_request",
            match endpoint {
                Endpoint::Completions => "`prompt` is missing".into(),
                Endpoint::Chat => "`messages` is missing".into(),
            },
        ));
    }
    Ok(request)
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// What a successful request produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    pub usage: Usage,
    /// The generated token ids, for token-id prompts (native workloads).
    pub token_ids: Option<Vec<u32>>,
}

/// The output line's `id`: stable across runs of the same input (line based).
pub fn line_id(line: usize) -> String {
    format!("batch_req_{line:08}")
}

/// An output line for a request that ran.
pub fn success_line(
    line: usize,
    custom_id: &str,
    endpoint: Endpoint,
    model: &str,
    created_secs: u64,
    completion: &Completion,
) -> Value {
    let id = line_id(line);
    let choice = match endpoint {
        Endpoint::Completions => {
            let mut c = json!({
                "index": 0,
                "text": completion.text,
                "logprobs": null,
                "finish_reason": completion.finish_reason,
            });
            if let Some(ids) = &completion.token_ids {
                c["token_ids"] = json!(ids);
            }
            c
        }
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": completion.text},
            "logprobs": null,
            "finish_reason": completion.finish_reason,
        }),
    };
    let (prefix, object) = match endpoint {
        Endpoint::Completions => ("cmpl", "text_completion"),
        Endpoint::Chat => ("chatcmpl", "chat.completion"),
    };
    json!({
        "id": id,
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": format!("req_{line:08}"),
            "body": {
                "id": format!("{prefix}-{line:08}"),
                "object": object,
                "created": created_secs,
                "model": model,
                "choices": [choice],
                "usage": completion.usage,
            }
        },
        "error": null,
    })
}

/// An output line for a request that could not run: a 400 response naming the problem, or,
/// for a line with no usable `custom_id`, a line-level `error`.
pub fn error_line(error: &LineError) -> Value {
    let id = line_id(error.line);
    match &error.custom_id {
        Some(custom_id) => json!({
            "id": id,
            "custom_id": custom_id,
            "response": {
                "status_code": 400,
                "request_id": format!("req_{:08}", error.line),
                "body": {"error": {
                    "message": error.message,
                    "type": "invalid_request_error",
                    "param": null,
                    "code": error.code,
                }}
            },
            "error": null,
        }),
        None => json!({
            "id": id,
            "custom_id": null,
            "response": null,
            "error": {"code": error.code, "message": error.message},
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(body: Value) -> String {
        json!({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body})
            .to_string()
    }

    #[test]
    fn completions_and_chat_lines_parse() {
        let r = parse_line(
            1,
            &line(
                json!({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5,
                "top_p": 0.9, "seed": 3, "stop": ["\n", "END"], "n": 1, "stream": false,
                "user": "x", "top_k": -1}),
            ),
        )
        .unwrap();
        assert_eq!(r.prompt, PromptInput::Text("hi".into()));
        assert_eq!(
            (r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed),
            (Some(5), Some(0.5), Some(0.9), None, Some(3))
        );
        assert_eq!(r.stop, vec!["\n".to_string(), "END".into()]);
        let chat = json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 7, "stop": "x"}});
        let r = parse_line(2, &chat.to_string()).unwrap();
        assert_eq!(r.endpoint, Endpoint::Chat);
        assert_eq!(r.max_tokens, Some(7));
        match r.prompt {
            PromptInput::Chat(m) => assert_eq!(m[1].content, "ab"),
            other => panic!("{other:?}"),
        }
        let r = parse_line(3, &line(json!({"prompt": [5, 6, 7]}))).unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![5, 6, 7]));
    }

    #[test]
    fn bad_lines_name_the_line_and_the_problem() {
        let cases: Vec<(String, &str, &str)> = vec![
            ("{not json".into(), "invalid_json", "line 4"),
            (
                json!({"method": "POST"}).to_string(),
                "missing_custom_id",
                "custom_id",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/embeddings", "body": {}}).to_string(),
                "unsupported_url",
                "/v1/embeddings",
            ),
            (
                line(json!({"prompt": "x", "n": 2})),
                "unsupported_parameter",
                "`n`",
            ),
            (
                line(json!({"prompt": "x", "logprobs": 5})),
                "unsupported_parameter",
                "logprobs",
            ),
            (
                line(json!({"prompt": "x", "frobnicate": 1})),
                "unsupported_parameter",
                "frobnicate",
            ),
            (
                line(json!({"prompt": "x", "temperature": 3})),
                "invalid_request",
                "temperature",
            ),
            (
                line(json!({"prompt": "x", "max_tokens": -1})),
                "invalid_request",
                "max_tokens",
            ),
            (
                line(json!({"messages": []})),
                "unsupported_parameter",
                "chat",
            ),
            (
                line(json!({"max_tokens": 3})),
                "invalid_request",
                "`prompt` is missing",
            ),
            (
                line(json!({"prompt": "x", "stop": [""]})),
                "invalid_request",
                "empty",
            ),
        ];
        for (text, code, needle) in cases {
            let e = parse_line(4, &text).unwrap_err();
            assert_eq!(e.code, code, "{text}: {e:?}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
            assert!(e.message.starts_with("line 4"), "{}", e.message);
            let out = error_line(&e);
            assert_eq!(out["id"], "batch_req_00000004");
            if e.custom_id.is_some() {
                assert_eq!(out["response"]["status_code"], 400);
                assert_eq!(out["response"]["body"]["error"]["code"], code);
            } else {
                assert_eq!(out["error"]["code"], code);
            }
        }
        // Fields at their defaults are fine.
        assert!(parse_line(1, &line(json!({"prompt": "x", "n": 1, "logprobs": null}))).is_ok());
    }

    #[test]
    fn output_lines_follow_the_batch_schema() {
        let c = Completion {
            text: "hello".into(),
            finish_reason: "stop",
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                total_tokens: 4,
            },
            token_ids: None,
        };
        let out = success_line(7, "x", Endpoint::Chat, "m", 5, &c);
        assert_eq!(out["custom_id"], "x");
        assert_eq!(out["response"]["status_code"], 200);
        let body = &out["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"]["content"], "hello");
        assert_eq!(body["usage"]["total_tokens"], 4);
        assert!(out["error"].is_null());
        let out = success_line(7, "x", Endpoint::Completions, "m", 5, &c);
        assert_eq!(out["response"]["body"]["choices"][0]["text"], "hello");
    }
}
