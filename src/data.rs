//! Training and evaluation data: JSONL rows in the three shapes TRL accepts — `{"messages": [...]}`,
//! `{"prompt": ..., "completion": ...}` (strings or message lists) and `{"text": ...}` — turned into
//! token sequences with the model's own chat template.

use crate::error::{Error, Result};
use crate::tokenizer::{ChatTokenizer, Message};
use serde_json::Value;
use std::path::Path;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One side of a prompt/completion row: plain text, or messages (conversational).
#[derive(Clone, Debug, PartialEq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    Messages(Vec<Message>),
    PromptCompletion { prompt: Turns, completion: Turns },
    Text(String),
}

/// Reads a JSONL file; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = crate::fsutil::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(&text, &path.display().to_string())
}

/// Parses JSONL text; `origin` names it in errors (a path, or a label in the browser).
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::Invalid(format!("{origin}:{}: {msg}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        out.push(parse_row(&v).map_err(at)?);
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("{origin}: the dataset is empty")));
    }
    Ok(out)
}

fn parse_row(v: &Value) -> std::result::Result<Example, String> {
    let obj = v.as_object().ok_or("each line must be a JSON object")?;
    if let Some(m) = obj.get("messages") {
        return Ok(Example::Messages(parse_messages(m, "messages")?));
    }
    if let (Some(p), Some(c)) = (obj.get("prompt"), obj.get("completion")) {
        let turns = |v: &Value, field: &str| -> std::result::Result<Turns, String> {
            match v {
                Value::String(s) => Ok(Turns::Text(s.clone())),
                Value::Array(_) => Ok(Turns::Messages(parse_messages(v, field)?)),
                _ => Err(format!("`{field}` must be a string or a list of messages")),
            }
        };
        let (prompt, completion) = (turns(p, "prompt")?, turns(c, "completion")?);
        if matches!(prompt, Turns::Text(_)) != matches!(completion, Turns::Text(_)) {
            return Err(
                "`prompt` and `completion` must both be strings or both be message lists".into(),
            );
        }
        return Ok(Example::PromptCompletion { prompt, completion });
    }
    if let Some(t) = obj.get("text") {
        return t
            .as_str()
            .map(|s| Example::Text(s.to_string()))
            .ok_or_else(|| "`text` must be a string".into());
    }
    Err("expected a `messages` list, `prompt` and `completion`, or `text`".into())
}

fn parse_messages(v: &Value, field: &str) -> std::result::Result<Vec<Message>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("`{field}` must be a list"))?;
    if list.is_empty() {
        return Err(format!("`{field}` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| format!("{field}[{i}] has no string `role`"))?;
            if !ROLES.contains(&role) {
                return Err(format!("{field}[{i}] has unknown role `{role}` (expected system, user, assistant or tool)"));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(format!("{field}[{i}].content must be a string")),
            };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

/// The example as the model sees it, one string (chat template applied to messages).
pub fn render(tok: &ChatTokenizer, example: &Example) -> Result<String> {
    match example {
        Example::Messages(m) => tok.apply_chat_template(m, false),
        Example::Text(t) => Ok(t.clone()),
        Example::PromptCompletion {
            prompt: Turns::Text(p),
            completion: Turns::Text(c),
        } => Ok(format!("{p}{c}")),
        Example::PromptCompletion {
            prompt: Turns::Messages(p),
            completion: Turns::Messages(c),
        } => {
            let all: Vec<Message> = p.iter().chain(c).cloned().collect();
            tok.apply_chat_template(&all, false)
        }
        Example::PromptCompletion { .. } => Err(Error::Invalid(
            "prompt and completion differ in kind".into(),
        )),
    }
}

/// The built-in chat set `nibble demo` and the browser page fine-tune on: (question, answer) pairs.
pub const DEMO_CHATS: &[(&str, &str)] = &[
    (
        "What is nibble?",
        "nibble is a portable QLoRA trainer written in Rust.",
    ),
    (
        "What does nibble keep in 4 bits?",
        "The frozen base model, packed as NF4 or INT4.",
    ),
    ("What does nibble train?", "LoRA adapters, with AdamW."),
    (
        "Where does nibble run?",
        "On GPUs through wgpu, in the browser, and on CPUs.",
    ),
    (
        "Which models does nibble support?",
        "Qwen2, Qwen3 and Llama 3.",
    ),
    (
        "What format are the adapters?",
        "PEFT adapter folders that transformers loads.",
    ),
    (
        "Does nibble need a download?",
        "No: this demo builds its own small model.",
    ),
    (
        "How are weights grouped?",
        "One scale per group of 32, 64 or 128 weights.",
    ),
];

/// `DEMO_CHATS` as JSONL `messages` rows.
pub fn demo_jsonl() -> String {
    DEMO_CHATS
        .iter()
        .map(|(q, a)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                .to_string()
                + "\n"
        })
        .collect()
}
