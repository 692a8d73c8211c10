//! Training and evaluation data: JSONL rows in the three shapes TRL accepts — `{"messages": [...]}`,
//! `{"prompt": ..., "completion": ...}` (strings or message lists) and `{"text": ...}` — and the two
//! that axolotl and LLaMA-Factory read, mapped onto them: ShareGPT (`{"conversations": [{"from",
//! "value"}, ...]}`, a messages row) and Alpaca (`{"instruction", "input", "output"}`, a conversational
//! prompt/completion row); all turned into token sequences with the model's own chat template.

use crate::error::{Error, Result};
use crate::tokenizer::{ChatTokenizer, Message, TemplateArgs};
use serde_json::Value;
use std::path::Path;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One side of a prompt/completion row: plain text, or messages (conversational).
#[derive(Clone, Debug, PartialEq)]
pub enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

/// A row; conversational ones carry what the row gives the chat template beside the messages.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    Messages(Vec<Message>, TemplateArgs),
    PromptCompletion {
        prompt: Turns,
        completion: Turns,
        args: TemplateArgs,
    },
    Text(String),
}

/// The column of text rows unless told otherwise (TRL's `dataset_text_field` default).
pub const TEXT_FIELD: &str = "text";

/// Where each example of a dataset was read, so that what goes wrong with one later (its chat
/// template, its tokens) names its file and line, or row, as a parse error does.
#[derive(Clone, Debug)]
pub struct Places {
    /// The dataset as the user named it.
    origin: String,
    /// Each file read, and whether its examples are lines (JSONL) or rows (a table, a JSON array).
    files: Vec<(String, Unit)>,
    /// Per example: its file's index in `files`, and its line or row, from 1.
    at: Vec<(u32, u32)>,
}

#[derive(Clone, Copy, Debug)]
enum Unit {
    Line,
    Row,
}

impl Places {
    /// Examples known only by their order in `origin` (text from the browser, a test's rows).
    pub fn numbered(origin: &str) -> Self {
        Places {
            origin: origin.to_string(),
            files: Vec::new(),
            at: Vec::new(),
        }
    }

    /// The dataset as the user named it.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Example `i` (from 0): `FILE:LINE (example N)`, `FILE: row R (example N)`, or
    /// `ORIGIN: example N` where its place is not known.
    pub fn of(&self, i: usize) -> String {
        let Some(&(file, n)) = self.at.get(i) else {
            return format!("{}: example {}", self.origin, i + 1);
        };
        let (name, unit) = &self.files[file as usize];
        match unit {
            Unit::Line => format!("{name}:{n} (example {})", i + 1),
            Unit::Row => format!("{name}: row {n} (example {})", i + 1),
        }
    }

    /// Examples by number (from 1), each by its place, the first ten of them: "chats.jsonl:4
    /// (example 3), chats.jsonl:9 (example 7) and 12 more".
    pub fn list(&self, numbers: &[usize]) -> String {
        // Known only by number, an example's origin is already in the message.
        let place = |n: usize| match self.at.is_empty() {
            true => format!("example {n}"),
            false => self.of(n - 1),
        };
        let shown: Vec<String> = numbers.iter().take(10).map(|&n| place(n)).collect();
        match numbers.len() {
            n if n > 10 => format!("{} and {} more", shown.join(", "), n - 10),
            _ => shown.join(", "),
        }
    }

    fn add(&mut self, file: &str, unit: Unit, n: usize) {
        if self.files.last().is_none_or(|(f, _)| f != file) {
            self.files.push((file.to_string(), unit));
        }
        let index = (self.files.len() - 1) as u32;
        self.at.push((index, u32::try_from(n).unwrap_or(u32::MAX)));
    }
}

/// Reads a dataset: a JSONL file, or a table (a Parquet or Arrow file, or a folder `datasets` saved;
/// `tables`), whose rows take the same shapes; errors name the file and line or row.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    read_examples_with(path, TEXT_FIELD)
}

/// `read_examples`, with text rows' text in the column `text_field`. A folder laid out as a Hub
/// dataset repository reads its train split (`FOLDER/SPLIT` another), its files one after the other.
pub fn read_examples_with(path: &Path, text_field: &str) -> Result<Vec<Example>> {
    Ok(read_examples_placed(path, text_field)?.0)
}

/// `read_examples_with`, and where each example was read.
pub fn read_examples_placed(path: &Path, text_field: &str) -> Result<(Vec<Example>, Places)> {
    let mut places = Places::numbered(&path.display().to_string());
    #[cfg(not(target_arch = "wasm32"))]
    {
        if let Some(files) = crate::tables::repository_split_files(path)? {
            let mut out = Vec::new();
            for file in &files {
                out.extend(read_file(file, text_field, &mut places)?);
            }
            return Ok((non_empty(out, places.origin())?, places));
        }
        if !path.exists() {
            let repo = crate::fsutil::HubRepo::Dataset;
            return Err(Error::Invalid(crate::fsutil::not_found_message(path, repo)));
        }
    }
    let out = read_file(path, text_field, &mut places)?;
    Ok((non_empty(out, places.origin())?, places))
}

/// The rows of one data file or `datasets` folder (not yet checked for being none), their places
/// added to `places`.
fn read_file(path: &Path, text_field: &str, places: &mut Places) -> Result<Vec<Example>> {
    let name = path.display().to_string();
    #[cfg(not(target_arch = "wasm32"))]
    if crate::tables::is_table(path) {
        let mut out = Vec::new();
        for (i, row) in crate::tables::rows(path)?.iter().enumerate() {
            let at =
                |msg: String| Error::Invalid(format!("{}: row {}: {msg}", path.display(), i + 1));
            out.push(parse_row(row, text_field).map_err(at)?);
            places.add(&name, Unit::Row, i + 1);
        }
        return Ok(out);
    }
    let text = crate::fsutil::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // A byte-order mark some editors write first is not part of the first row.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let origin = path.display().to_string();
    // A .json file may hold one array of rows, as `datasets`' json builder reads it.
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json && text.trim_start().starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("{origin}: not a JSON array of rows: {e}")))?;
        return rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                places.add(&name, Unit::Row, i + 1);
                parse_row(row, text_field)
                    .map_err(|msg| Error::Invalid(format!("{origin}: row {}: {msg}", i + 1)))
            })
            .collect();
    }
    parse_lines(text, &origin, text_field, places)
}

/// Parses JSONL text; `origin` names it in errors (a path, or a label in the browser).
pub fn parse_jsonl(text: &str, origin: &str) -> Result<Vec<Example>> {
    parse_jsonl_with(text, origin, TEXT_FIELD)
}

/// `parse_jsonl`, with text rows' text in the column `text_field`.
pub fn parse_jsonl_with(text: &str, origin: &str, text_field: &str) -> Result<Vec<Example>> {
    Ok(parse_jsonl_placed(text, origin, text_field)?.0)
}

/// `parse_jsonl_with`, and the line of each example.
pub fn parse_jsonl_placed(
    text: &str,
    origin: &str,
    text_field: &str,
) -> Result<(Vec<Example>, Places)> {
    let mut places = Places::numbered(origin);
    let examples = non_empty(parse_lines(text, origin, text_field, &mut places)?, origin)?;
    Ok((examples, places))
}

fn parse_lines(
    text: &str,
    origin: &str,
    text_field: &str,
    places: &mut Places,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::Invalid(format!("{origin}:{}: {msg}", i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        out.push(parse_row(&v, text_field).map_err(at)?);
        places.add(origin, Unit::Line, i + 1);
    }
    Ok(out)
}

/// The examples read from `origin`, or the error that it holds none.
fn non_empty(examples: Vec<Example>, origin: &str) -> Result<Vec<Example>> {
    match examples.is_empty() {
        true => Err(Error::Invalid(format!("{origin}: the dataset is empty"))),
        false => Ok(examples),
    }
}

/// A row's `tools` (a list of function schemas, or that list as a JSON string, as TRL reads it) and
/// `chat_template_kwargs` (an object).
fn template_args(
    obj: &serde_json::Map<String, Value>,
) -> std::result::Result<TemplateArgs, String> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            let parsed: Value = serde_json::from_str(text)
                .map_err(|e| format!("`tools` is a string but not JSON: {e}"))?;
            Some(parsed).filter(|v| !v.is_null())
        }
        Some(v) => Some(v.clone()),
    };
    if let Some(t) = &tools
        && !t.is_array()
    {
        return Err(
            "`tools` must be a list of function schemas (or that list as a JSON string)".into(),
        );
    }
    let kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err("`chat_template_kwargs` must be an object".into()),
    };
    Ok(TemplateArgs { tools, kwargs })
}

fn parse_row(v: &Value, text_field: &str) -> std::result::Result<Example, String> {
    let obj = v.as_object().ok_or("each line must be a JSON object")?;
    let args = template_args(obj)?;
    if let Some(m) = obj.get("messages") {
        return Ok(Example::Messages(parse_messages(m, "messages")?, args));
    }
    if let Some(c) = obj.get("conversations") {
        return sharegpt(obj, c, args);
    }
    if obj.contains_key("instruction") && obj.contains_key("output") {
        return alpaca(obj, args);
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
        return Ok(Example::PromptCompletion {
            prompt,
            completion,
            args,
        });
    }
    if let Some(t) = obj.get(text_field) {
        return t
            .as_str()
            .map(|s| Example::Text(s.to_string()))
            .ok_or_else(|| format!("`{text_field}` must be a string"));
    }
    Err(format!(
        "expected a `messages` list, `prompt` and `completion`, `{text_field}`, ShareGPT's `conversations` or Alpaca's `instruction` and `output`"
    ))
}

/// ShareGPT's speaker names (axolotl's default role map, with LLaMA-Factory's `observation` and
/// `function_call`) as chat roles.
const SHAREGPT_ROLES: [(&str, &str); 9] = [
    ("human", "user"),
    ("user", "user"),
    ("gpt", "assistant"),
    ("assistant", "assistant"),
    ("model", "assistant"),
    ("function_call", "assistant"),
    ("system", "system"),
    ("tool", "tool"),
    ("observation", "tool"),
];

/// A ShareGPT row: `conversations` of `{"from", "value"}` (or `{"role", "content"}`) turns, after an
/// optional top-level `system` prompt (LLaMA-Factory's), as a messages row.
fn sharegpt(
    obj: &serde_json::Map<String, Value>,
    turns: &Value,
    args: TemplateArgs,
) -> std::result::Result<Example, String> {
    let list = turns.as_array().ok_or("`conversations` must be a list")?;
    if list.is_empty() {
        return Err("`conversations` is empty".into());
    }
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(system) = obj.get("system").filter(|v| !v.is_null()) {
        let system = system.as_str().ok_or("`system` must be a string")?;
        if !system.is_empty() {
            messages.push(Message::new("system", system));
        }
    }
    for (i, turn) in list.iter().enumerate() {
        let text = |key: &str| turn.get(key).and_then(Value::as_str);
        let (speaker, content) = match (text("from"), text("role")) {
            (Some(from), _) => (from, turn.get("value")),
            (None, Some(role)) => (role, turn.get("content")),
            (None, None) => {
                return Err(format!(
                    "conversations[{i}] has no string `from` (or `role`)"
                ));
            }
        };
        let role = SHAREGPT_ROLES
            .iter()
            .find(|(name, _)| *name == speaker)
            .map(|(_, role)| *role)
            .ok_or_else(|| {
                let known: Vec<&str> = SHAREGPT_ROLES.iter().map(|(n, _)| *n).collect();
                format!(
                    "conversations[{i}] is from `{speaker}`; nibble maps {}",
                    known.join(", ")
                )
            })?;
        let content = match content {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(_) => return Err(format!("conversations[{i}]'s text must be a string")),
        };
        let mut message = match turn.get("from") {
            // `{"role", "content"}` turns keep their other fields (tool calls, reasoning).
            None => Message::from_json(turn).map_err(|e| format!("conversations[{i}] {e}"))?,
            Some(_) => Message::new(role, &content),
        };
        message.role = role.into();
        if speaker == "function_call" {
            let calls = tool_calls_of(&content).map_err(|e| {
                format!("conversations[{i}] is a function_call whose text {e} (LLaMA-Factory refuses it too)")
            })?;
            message.content = None;
            message.extra.insert("tool_calls".into(), calls);
        }
        messages.push(message);
    }
    Ok(Example::Messages(messages, args))
}

/// LLaMA-Factory's `function_call` turn as the tool calls chat templates render: its text is JSON, a
/// `{"name", "arguments"}` object or a list of them; anything else is an error saying what the text
/// is (the rest of a sentence after "whose text").
fn tool_calls_of(text: &str) -> std::result::Result<Value, String> {
    let parsed: Value =
        serde_json::from_str(text).map_err(|e| format!("is not JSON ({e}): {}", excerpt(text)))?;
    let calls = match parsed {
        Value::Array(calls) => calls,
        call @ Value::Object(_) => vec![call],
        other => return Err(format!("is {other}, not a call or a list of calls")),
    };
    if calls.is_empty() {
        return Err("is an empty list of calls".into());
    }
    calls
        .into_iter()
        .map(|call| {
            let Some(name) = call.get("name").and_then(Value::as_str) else {
                return Err(format!("holds {call}, a call without a string `name`"));
            };
            let Some(arguments) = call.get("arguments").cloned() else {
                return Err(format!("holds {call}, a call without `arguments`"));
            };
            Ok(serde_json::json!({"type": "function", "function": {"name": name, "arguments": arguments}}))
        })
        .collect::<std::result::Result<Vec<Value>, String>>()
        .map(Value::Array)
}

/// The start of `text`, for a message.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("`{}...`", &text[..end]),
        None => format!("`{text}`"),
    }
}

/// An Alpaca row as LLaMA-Factory maps it: the user turn is `instruction`, then `input` on a new line
/// when there is one, after the optional `system` prompt and `history` ([question, answer] pairs); the
/// assistant's `output` is the completion, so the loss falls on it alone by default (TRL's rule for
/// prompt/completion rows).
fn alpaca(
    obj: &serde_json::Map<String, Value>,
    args: TemplateArgs,
) -> std::result::Result<Example, String> {
    let text = |key: &str| -> std::result::Result<Option<&str>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("`{key}` must be a string")),
        }
    };
    let message = Message::new;
    let mut prompt = Vec::new();
    if let Some(system) = text("system")?.filter(|s| !s.is_empty()) {
        prompt.push(message("system", system));
    }
    if let Some(history) = obj.get("history").filter(|v| !v.is_null()) {
        let pairs = history
            .as_array()
            .ok_or("`history` must be a list of [question, answer] pairs")?;
        for (i, pair) in pairs.iter().enumerate() {
            let Some([q, a]) = pair
                .as_array()
                .map(Vec::as_slice)
                .and_then(|p| <&[Value; 2]>::try_from(p).ok())
            else {
                return Err(format!("history[{i}] must be a [question, answer] pair"));
            };
            let (Some(q), Some(a)) = (q.as_str(), a.as_str()) else {
                return Err(format!("history[{i}] must hold two strings"));
            };
            prompt.push(message("user", q));
            prompt.push(message("assistant", a));
        }
    }
    let instruction = text("instruction")?.unwrap_or("");
    let user = match text("input")?.filter(|s| !s.is_empty()) {
        Some(input) => format!("{instruction}\n{input}"),
        None => instruction.to_string(),
    };
    prompt.push(message("user", &user));
    let output = text("output")?.unwrap_or("");
    Ok(Example::PromptCompletion {
        prompt: Turns::Messages(prompt),
        completion: Turns::Messages(vec![message("assistant", output)]),
        args,
    })
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
            let message = Message::from_json(m).map_err(|e| match e.starts_with('.') {
                true => format!("{field}[{i}]{e}"),
                false => format!("{field}[{i}] {e}"),
            })?;
            if !ROLES.contains(&message.role.as_str()) {
                return Err(format!(
                    "{field}[{i}] has unknown role `{}` (expected system, user, assistant or tool)",
                    message.role
                ));
            }
            Ok(message)
        })
        .collect()
}

/// The example as the model sees it, one string (chat template applied to messages). Text rows and
/// text completions end with the tokenizer's eos token, which TRL's SFTTrainer appends where they do not
/// (so that the model learns to stop); conversations end as their template ends them.
pub fn render(tok: &ChatTokenizer, example: &Example) -> Result<String> {
    let with_eos = |text: String| match &tok.eos_token {
        Some(eos) if !text.ends_with(eos.as_str()) => text + eos,
        _ => text,
    };
    match example {
        Example::Messages(m, args) => tok.apply_chat_template_with(m, false, args),
        Example::Text(t) => Ok(with_eos(t.clone())),
        Example::PromptCompletion {
            prompt: Turns::Text(p),
            completion: Turns::Text(c),
            ..
        } => Ok(format!("{p}{}", with_eos(c.clone()))),
        Example::PromptCompletion {
            prompt: Turns::Messages(p),
            completion: Turns::Messages(c),
            args,
        } => {
            let all: Vec<Message> = p.iter().chain(c).cloned().collect();
            tok.apply_chat_template_with(&all, false, args)
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
