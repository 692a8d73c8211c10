//! The model's tokenizer (tokenizer.json through the `tokenizers` crate) and its chat template (a Jinja
//! template rendered with minijinja, set up the way transformers' `apply_chat_template` sets up Jinja2,
//! so that both produce the same string).

use crate::error::{Error, Result};
use crate::model::TokenizerFiles;
use minijinja::value::{Value as JinjaValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One turn of a conversation, as the chat template sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    /// The text, where the data gave a string (None where it gave none).
    pub content: Option<String>,
    /// The turn's other fields as the data gave them, handed to the template as transformers hands it
    /// the message: `tool_calls`, `reasoning_content`, `name`, `tool_call_id`, ..., and a `content` that
    /// is not a string (a list of parts), which then stands in place of the text.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The names a message's reasoning comes under; transformers fills the first (what chat templates read)
/// and `thinking` (gpt-oss's) from whichever is given.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: Some(content.into()),
            extra: serde_json::Map::new(),
        }
    }

    /// A message object as a dataset row holds it. As transformers normalises a chat: fields whose
    /// value is null are dropped (templates handle a missing key, not a None), and reasoning given as
    /// `reasoning` or `thinking` is also `reasoning_content` (and `thinking`).
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        use serde_json::Value;
        let obj = v.as_object().ok_or("must be an object")?;
        let role = obj
            .get("role")
            .and_then(Value::as_str)
            .ok_or("has no string `role`")?
            .to_string();
        let mut extra: serde_json::Map<String, Value> = obj
            .iter()
            .filter(|(k, v)| *k != "role" && !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let content = match extra.remove("content") {
            Some(Value::String(s)) => Some(s),
            None => None,
            Some(parts @ Value::Array(_)) => {
                extra.insert("content".into(), parts);
                None
            }
            Some(_) => return Err(".content must be a string, a list of parts or null".into()),
        };
        let reasoning = REASONING_FIELDS.iter().find_map(|k| extra.get(*k)).cloned();
        if let Some(reasoning) = reasoning {
            extra.entry("thinking").or_insert(reasoning.clone());
            extra.insert("reasoning_content".into(), reasoning);
        }
        Ok(Message {
            role,
            content,
            extra,
        })
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        if let Some(text) = &self.content {
            map.serialize_entry("content", text)?;
        }
        for (key, value) in &self.extra {
            if key != "role" {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(deserializer)?;
        Message::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// What a conversation hands the chat template beside its messages, as TRL hands a dataset row's to
/// `apply_chat_template`: the functions the model may call (`tools`) and the row's
/// `chat_template_kwargs` (Qwen3's `enable_thinking`, for one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemplateArgs {
    pub tools: Option<serde_json::Value>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl TemplateArgs {
    /// `enable_thinking` set, as transformers passes the keyword on: Qwen3's hybrid template then closes
    /// an empty thinking block.
    pub fn thinking(enable: bool) -> Self {
        let mut kwargs = serde_json::Map::new();
        kwargs.insert("enable_thinking".into(), enable.into());
        TemplateArgs {
            tools: None,
            kwargs,
        }
    }
}

/// A tokenizer together with the chat template and special tokens from tokenizer_config.json.
pub struct ChatTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    /// tokenizer.json, for errors.
    path: std::path::PathBuf,
    pub template: Option<ChatTemplate>,
    /// The `tool_use` template of a tokenizer_config.json that names its templates.
    pub tool_template: Option<ChatTemplate>,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    pub pad_token: Option<String>,
}

thread_local! {
    static EXPECTING_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a call whose panics become errors (a panic hook stays quiet then).
pub fn panics_are_caught() -> bool {
    EXPECTING_PANICS.with(|e| e.get())
}

/// Runs a call into the tokenizers crate, which panics on some malformed tokenizer.json files (found by
/// tests/fuzz.rs) instead of returning an error; the panic becomes an error naming the file.
fn guarded<T>(path: &Path, call: impl FnOnce() -> T) -> Result<T> {
    EXPECTING_PANICS.with(|e| e.set(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
    EXPECTING_PANICS.with(|e| e.set(false));
    outcome.map_err(|_| Error::Tokenizer {
        path: path.to_path_buf(),
        msg: "the tokenizer failed on its own description (is the file damaged?)".into(),
    })
}

impl ChatTokenizer {
    /// `origin` is the folder (or quantized file) the files came from; it names them in errors.
    pub fn from_files(files: &TokenizerFiles, origin: &Path) -> Result<Self> {
        let tok_path = origin.join("tokenizer.json");
        let json = files
            .tokenizer_json
            .as_deref()
            .ok_or_else(|| Error::Tokenizer {
                path: tok_path.clone(),
                msg: "missing: nibble needs the model's tokenizer.json".into(),
            })?;
        let tokenizer = guarded(&tok_path, || {
            tokenizers::Tokenizer::from_bytes(json.as_bytes())
        })?
        .map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            msg: format!("cannot be parsed: {e}"),
        })?;

        let cfg_path = origin.join("tokenizer_config.json");
        let config: serde_json::Value = match &files.tokenizer_config_json {
            Some(text) => serde_json::from_str(text).map_err(|e| Error::Tokenizer {
                path: cfg_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?,
            None => serde_json::Value::Null,
        };
        let token = |key: &str| special_token(&config, key);
        // chat_template.jinja (transformers >= 4.43 writes it) wins over the inline template, as in
        // transformers' loading order.
        let source = match (&files.chat_template_jinja, config.get("chat_template")) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(serde_json::Value::String(t))) => Some(t.clone()),
            (None, Some(serde_json::Value::Array(named))) => named_template(named, "default"),
            _ => None,
        };
        // transformers renders with a model's `tool_use` template whenever tools are passed.
        let tool_source = match config.get("chat_template") {
            Some(serde_json::Value::Array(named)) => named_template(named, "tool_use"),
            _ => None,
        };
        let (bos_token, eos_token, pad_token) =
            (token("bos_token"), token("eos_token"), token("pad_token"));
        let compile = |s: String| {
            ChatTemplate::new(&s, bos_token.clone(), eos_token.clone(), cfg_path.clone())
        };
        let template = source.map(compile).transpose()?;
        let tool_template = tool_source.map(compile).transpose()?;
        Ok(ChatTokenizer {
            tokenizer,
            path: tok_path,
            template,
            tool_template,
            eos_token,
            bos_token,
            pad_token,
        })
    }

    /// Token ids of `text`, with no special tokens added (chat templates write their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        guarded(&self.path, || self.tokenizer.encode(text, false))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded(&self.path, || self.tokenizer.decode(ids, false))?
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))
    }

    /// Whether `id` is one of the tokenizer's special added tokens (`<|im_end|>`, `<|eot_id|>`, ...).
    pub fn is_special(&self, id: u32) -> bool {
        self.tokenizer
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.template()?.render(messages, add_generation_prompt)
    }

    /// `apply_chat_template` with a row's tools and keywords.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<String> {
        let template = match (&args.tools, &self.tool_template) {
            (Some(_), Some(tool_use)) => tool_use,
            _ => self.template()?,
        };
        template.render_with(messages, add_generation_prompt, args)
    }

    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template
            .as_ref()
            .ok_or_else(|| Error::Template("this tokenizer has no chat template".into()))
    }
}

/// The template called `name` in a tokenizer_config.json's list of named templates.
fn named_template(named: &[serde_json::Value], name: &str) -> Option<String> {
    named
        .iter()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
        .and_then(|t| t.get("template"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

/// A special token may be a plain string or an AddedToken object `{"content": ...}`.
fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
        origin: PathBuf,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on, and Python's str methods
        // (strip, startswith, split, ...) available on values.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_tojson);
        #[cfg(not(target_arch = "wasm32"))]
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                Error::Template(format!(
                    "{}: `chat_template` does not parse: {e}",
                    origin.display()
                ))
            })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &TemplateArgs::default())
    }

    /// `render` with a row's tools and keywords, in the context transformers renders with: `messages`,
    /// `tools` and `documents` (none where not given), `add_generation_prompt`, then the keywords, then
    /// the special tokens (which the keywords may replace).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("added in new()");
        // The first context holding a key wins.
        let base = minijinja::context! {
            messages => JinjaValue::from(minijinja::value::Serde(messages)),
            tools => JinjaValue::from(minijinja::value::Serde(&args.tools)),
            documents => JinjaValue::from(()),
            add_generation_prompt => add_generation_prompt,
        };
        let kwargs = JinjaValue::from(minijinja::value::Serde(&args.kwargs));
        let tokens = minijinja::context! {
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let ctx = minijinja::context! { ..base, ..kwargs, ..tokens };
        template.render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            Error::Template(msg)
        })
    }
}

fn raise_exception(msg: String) -> std::result::Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, i.e. Python's spacing (", " and ": "), key order kept,
/// and no HTML escaping (minijinja's built-in filter escapes `<` and `>`, which would change prompts).
fn python_tojson(
    value: JinjaValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(JinjaValue::from_safe_string(out))
}

fn write_python_json(
    v: &JinjaValue,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::String => {
            out.push_str(&serde_json::to_string(v.as_str().unwrap_or_default()).expect("string"))
        }
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JinjaValue> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<JinjaValue> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(&key.to_string()).expect("string"));
                out.push_str(": ");
                write_python_json(&v.get_item(key)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).expect("string")),
    }
    Ok(())
}

/// Python's `repr(float)`: shortest round-trip digits, always with a decimal point or exponent.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let s = format!("{f:?}");
    if s.contains('e') {
        // Rust writes 1e-7, Python 1e-07.
        let (mantissa, exp) = s.split_once('e').expect("checked");
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ("-", d),
            None => ("+", exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    s
}

/// transformers exposes `strftime_now(format)` with the local time; Llama 3 templates use it for the
/// "Today Date" line. Only the directives those templates use are supported.
#[cfg(not(target_arch = "wasm32"))]
fn strftime_now(format: String) -> std::result::Result<JinjaValue, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(JinjaValue::from(format_unix_time(secs, &format)?))
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn format_unix_time(secs: i64, format: &str) -> std::result::Result<String, minijinja::Error> {
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
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Howard Hinnant's days-to-civil conversion.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: directive %{} is not supported",
                        other.unwrap_or(' ')
                    ),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_time_formats_like_strftime() {
        // 2024-07-26 13:05:09 UTC, the date Llama 3.1's template falls back to.
        assert_eq!(
            format_unix_time(1722000309, "%d %b %Y %H:%M:%S").unwrap(),
            "26 Jul 2024 13:25:09"
        );
        assert_eq!(
            format_unix_time(0, "%Y-%m-%d %B").unwrap(),
            "1970-01-01 January"
        );
        assert_eq!(format_unix_time(951782400, "%d %m %y").unwrap(), "29 02 00");
    }

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e-7), "1e-07");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(1.5e300), "1.5e+300");
    }
}
