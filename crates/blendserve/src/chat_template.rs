//! Chat templates from a Hugging Face model folder (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja plus Python string methods, as
//! transformers' `apply_chat_template(..., add_generation_prompt=True)` renders them.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value;

use crate::batch_file::ChatMessage;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// `strftime_now(format)`: today's date (UTC) for the few directives templates use.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%B", name)
        .replace("%b", &name[..3])
}

impl ChatTemplate {
    /// The model folder's template, or `None` when it has none.
    pub fn load(dir: &Path) -> Result<Option<ChatTemplate>> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?
        } else {
            Value::Null
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("reading {}", jinja_path.display()))?
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                // A list of named templates: the one named "default".
                Some(Value::Array(items)) => items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: `chat_template` lists no template named \"default\"",
                            config_path.display()
                        )
                    })?,
                _ => return Ok(None),
            }
        };
        ChatTemplate::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )
        .map(Some)
        .with_context(|| format!("the chat template of {}", dir.display()))
    }

    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<(), Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", strftime_now);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow!("does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text for `messages`, ending where the assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => format!("the chat template refused: {e}"),
                _ => format!("the chat template failed: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    /// Llama 3's template (abridged: no tools), as its tokenizer_config.json carries it.
    const LLAMA3: &str = "{{- bos_token }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n";

    #[test]
    fn renders_llama3_and_python_methods() {
        let t =
            ChatTemplate::new(LLAMA3.into(), "<|begin_of_text|>".into(), String::new()).unwrap();
        let text = t
            .render(&msgs(&[("system", "Be brief. "), ("user", "Hi")]))
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Python string methods and raise_exception, as HF templates use them.
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&msgs(&[("user", " hi ")])).unwrap(), "HI");
        let err = t.render(&msgs(&[("system", "x")])).unwrap_err();
        assert!(err.contains("first message must be from the user"), "{err}");
    }

    #[test]
    fn loads_from_a_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::load(dir.path()).unwrap().is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&msgs(&[("user", "a")])).unwrap(), "<s>user: a\n");
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages|length }}",
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "a"), ("user", "b")])).unwrap(),
            "2"
        );
        assert!(strftime_now("%d %b %Y".into()).len() == 11);
    }
}
