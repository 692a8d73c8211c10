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

/// A stretch of text, in bytes: start, end.
pub type ByteRange = (usize, usize);

/// A tokenizer together with the chat template and special tokens from tokenizer_config.json.
pub struct ChatTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    /// tokenizer.json, for errors.
    path: std::path::PathBuf,
    /// Whether a tokenizer_config.json came with it, for errors.
    has_config: bool,
    pub template: Option<ChatTemplate>,
    /// The `tool_use` template of a tokenizer_config.json that names its templates.
    pub tool_template: Option<ChatTemplate>,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    pub pad_token: Option<String>,
    /// The model's embeddings (`fit_to_model`): ids from here on are refused where text produces
    /// them.
    vocab_limit: Option<u32>,
}

/// More tokens past a model's embeddings than this mark another model's tokenizer; fewer are added
/// tokens the model never uses (Gemma 3 1B's tokenizer has `<image_soft_token>` at 262144, past its
/// 262,144 embeddings), refused only where some text produces one.
const STRAY_TOKENS: usize = 64;

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
        let mut tokenizer = guarded(&tok_path, || {
            tokenizers::Tokenizer::from_bytes(json.as_bytes())
        })?
        .map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            msg: format!("cannot be parsed: {e}"),
        })?;
        // Text would vanish through it, token by token, without a word.
        if tokenizer.get_vocab_size(false) == 0 {
            return Err(Error::Tokenizer {
                path: tok_path,
                msg: "its model has no vocabulary: text cannot be tokenized".into(),
            });
        }
        // A tokenizer.json may keep the truncation and padding it was saved with; transformers turns
        // both off for each call unless asked, and training cuts and packs sequences itself.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                msg: format!("cannot turn off its truncation: {e}"),
            })?
            .with_padding(None);

        let cfg_path = origin.join("tokenizer_config.json");
        let config: serde_json::Value = match &files.tokenizer_config_json {
            Some(text) => serde_json::from_str(text).map_err(|e| Error::Tokenizer {
                path: cfg_path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?,
            None => serde_json::Value::Null,
        };
        let token = |key: &str| special_token(&config, key);
        let (source, tool_source) = templates_of(files.chat_template_jinja.as_deref(), &config)
            .map_err(|msg| Error::Tokenizer {
                path: cfg_path.clone(),
                msg,
            })?;
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
            has_config: files.tokenizer_config_json.is_some(),
            template,
            tool_template,
            eos_token,
            bos_token,
            pad_token,
            vocab_limit: None,
        })
    }

    /// Fits this tokenizer to a model of `vocab_size` embeddings. Another model's tokenizer (many
    /// ids past them) is refused here, naming the file: it would fail at its first such token, deep
    /// in a step. A few added tokens past them (`STRAY_TOKENS`) are refused only where text produces
    /// one (`encode`), naming the token.
    pub fn fit_to_model(&mut self, vocab_size: usize) -> Result<()> {
        let vocab = self.tokenizer.get_vocab(true);
        let mut past: Vec<(&String, u32)> = vocab
            .iter()
            .filter(|(_, id)| **id as usize >= vocab_size)
            .map(|(token, id)| (token, *id))
            .collect();
        if past.len() > STRAY_TOKENS {
            past.sort_by_key(|(_, id)| *id);
            let (token, id) = past[past.len() - 1];
            return Err(Error::Tokenizer {
                path: self.path.clone(),
                msg: format!(
                    "{} of its tokens have ids past the model's {vocab_size} embeddings (vocab_size \
                     in its config.json; `{token}` is {id}): this tokenizer is not the model's",
                    past.len()
                ),
            });
        }
        self.vocab_limit = (!past.is_empty()).then(|| vocab_size.min(u32::MAX as usize) as u32);
        Ok(())
    }

    /// This tokenizer rendering chats through `choice`'s templates instead of its own, as transformers
    /// does with a `chat_template` set on it (its special tokens stay the model's).
    pub fn with_template(mut self, choice: &TemplateChoice) -> Result<Self> {
        let compile = |s: &str| {
            ChatTemplate::new(
                s,
                self.bos_token.clone(),
                self.eos_token.clone(),
                choice.origin.clone(),
            )
        };
        self.template = Some(compile(&choice.default)?);
        self.tool_template = None;
        Ok(self)
    }

    /// This tokenizer with `token` as its eos token, as TRL's `eos_token` sets it: what text rows and
    /// completions end with, and what chat templates see as `eos_token`. TRL refuses a token the
    /// vocabulary lacks, and so does nibble.
    pub fn with_eos_token(mut self, token: &str) -> Result<Self> {
        if self.token_id(token).is_none() {
            return Err(Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("eos_token `{token}` is not a token of this tokenizer"),
            });
        }
        for template in self
            .template
            .iter_mut()
            .chain(self.tool_template.iter_mut())
        {
            template.eos_token = Some(token.to_string());
        }
        self.eos_token = Some(token.to_string());
        Ok(self)
    }

    /// Token ids of `text`, with no special tokens added (chat templates write their own).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_adding_specials(text, false)
    }

    /// Token ids of plain text as transformers' `tokenizer(text)` gives them, with the special tokens
    /// the tokenizer adds around a text (Llama's, Gemma's and Mistral's BOS; Qwen's none).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_adding_specials(text, true)
    }

    fn encode_adding_specials(&self, text: &str, add: bool) -> Result<Vec<u32>> {
        Ok(self.encoding(text, add)?.get_ids().to_vec())
    }

    /// `encode` (or with `add_specials`, `encode_text`), with each token's byte range in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_specials: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self.encoding(text, add_specials)?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    fn encoding(&self, text: &str, add_specials: bool) -> Result<tokenizers::Encoding> {
        let encoding = guarded(&self.path, || self.tokenizer.encode(text, add_specials))?
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        if let Some(limit) = self.vocab_limit
            && let Some(&id) = encoding.get_ids().iter().find(|&&id| id >= limit)
        {
            let token = self.tokenizer.id_to_token(id).unwrap_or_default();
            return Err(Error::Invalid(format!(
                "the text holds the token `{token}` (id {id}), which the tokenizer has but the \
                 model's {limit} embeddings do not"
            )));
        }
        Ok(encoding)
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
        self.template_for(args)?
            .render_with(messages, add_generation_prompt, args)
    }

    /// The template a conversation with `args` renders through: transformers takes a model's
    /// `tool_use` template whenever tools are passed.
    pub fn template_for(&self, args: &TemplateArgs) -> Result<&ChatTemplate> {
        match (&args.tools, &self.tool_template) {
            (Some(_), Some(tool_use)) => Ok(tool_use),
            _ => self.template(),
        }
    }

    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            Error::Template(format!(
                "{}: give one with --chat-template FILE.jinja, or use text or prompt/completion rows",
                self.missing_template()
            ))
        })
    }

    /// Why there is no chat template, naming the file that would hold it.
    pub fn missing_template(&self) -> String {
        let config = self.path.with_file_name("tokenizer_config.json");
        let missing = match self.has_config {
            true => format!("{} has no chat template", config.display()),
            false => format!(
                "{} is missing, and with it the chat template",
                config.display()
            ),
        };
        format!("{missing} (a base model's often has none)")
    }
}

/// A tokenizer's chat templates: the default one and its `tool_use` one (transformers renders with that
/// whenever tools are passed). chat_template.jinja (transformers >= 4.43 writes it) replaces
/// tokenizer_config.json's templates, as in transformers' loading order.
fn templates_of(
    jinja: Option<&str>,
    config: &serde_json::Value,
) -> std::result::Result<(Option<String>, Option<String>), String> {
    if let Some(t) = jinja {
        return Ok((Some(t.to_string()), None));
    }
    Ok(match config.get("chat_template") {
        Some(serde_json::Value::String(t)) => (Some(t.clone()), None),
        Some(serde_json::Value::Array(named)) => (
            named_template(named, "default"),
            named_template(named, "tool_use"),
        ),
        // {name: template}, as transformers also takes them.
        Some(serde_json::Value::Object(by_name)) => {
            let named = |name: &str| by_name.get(name).and_then(|t| t.as_str()).map(String::from);
            (named("default"), named("tool_use"))
        }
        None | Some(serde_json::Value::Null) => (None, None),
        Some(other) => {
            return Err(format!(
                "`chat_template` is {other}: a template's text, or templates by name"
            ));
        }
    })
}

/// Template source as Jinja2 lexes it (and Python reads a Jinja file in text mode): each "\r\n" or
/// lone "\r" a "\n", in string literals too (a template saved on Windows renders the same).
fn universal_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// Makes `token` a tokenizer_config.json's eos token: its `eos_token` text, or the `content` of the added
/// token it describes (whose other fields stay).
pub fn set_eos_token(config: &mut serde_json::Map<String, serde_json::Value>, token: &str) {
    match config.get_mut("eos_token") {
        Some(serde_json::Value::Object(added)) => {
            added.insert("content".into(), token.into());
        }
        _ => {
            config.insert("eos_token".into(), token.into());
        }
    }
}

/// The eos token an adapter was trained with (nibble's `--eos-token`, TRL's `eos_token`), where its
/// folder records one, with the file that does: nibble_config.toml's `eos_token`, else the
/// tokenizer_config.json TRL saves beside an adapter (its `eos_token`, text or an added token's
/// `content`). What loads the adapter then ends text where the training did.
pub fn adapter_eos_token(dir: &Path) -> Result<Option<(String, PathBuf)>> {
    let record = dir.join(crate::train::RECORD_FILE);
    if record.is_file() {
        let text = crate::fsutil::read_to_string(&record).map_err(|e| Error::io(&record, e))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| Error::Config {
            path: record.clone(),
            msg: format!("not a TOML file: {e}"),
        })?;
        return match table.get("eos_token") {
            None => Ok(None),
            Some(toml::Value::String(token)) => Ok(Some((token.clone(), record))),
            Some(other) => Err(Error::Config {
                path: record,
                msg: format!("eos_token = {other}: the token's text"),
            }),
        };
    }
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = crate::fsutil::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let token = match value.get("eos_token") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(token)) => Some(token.as_str()),
        Some(added) => added.get("content").and_then(serde_json::Value::as_str),
    };
    match token {
        Some(token) => Ok(Some((token.to_string(), config))),
        None => Err(Error::Config {
            path: config,
            msg: format!("eos_token {}: the token's text", value["eos_token"]),
        }),
    }
}

/// A chat template given in place of the model's (`--chat-template`, TRL's `chat_template_path`). As
/// TRL takes it, only the default template: conversations with tools render through it too.
#[derive(Clone, Debug)]
pub struct TemplateChoice {
    /// Where it came from, for errors.
    pub origin: PathBuf,
    pub default: String,
}

impl TemplateChoice {
    /// The template to render with: the one asked for (`--chat-template`), else the one an adapter
    /// folder keeps (its chat_template.jinja, or the template of a tokenizer saved beside it, as TRL
    /// and nibble save one) where it is not the model's `own` default, else None: the model's own
    /// templates (its named ones, such as a tool template, included).
    pub fn chosen(
        asked: Option<&Path>,
        adapter: Option<&Path>,
        own: Option<&str>,
    ) -> Result<Option<Self>> {
        if let Some(path) = asked {
            return Self::read(path).map(Some);
        }
        let Some(dir) = adapter else {
            return Ok(None);
        };
        let kept = match dir.join("chat_template.jinja") {
            jinja if jinja.is_file() => Some(Self::read(&jinja)?),
            // A tokenizer saved beside the adapter: its template where it has a usable one (an
            // adapter loaded without it before, so nothing here stops it loading now).
            _ => {
                let config = dir.join("tokenizer_config.json");
                crate::fsutil::read_to_string(&config)
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok())
                    .and_then(|v: serde_json::Value| templates_of(None, &v).ok()?.0)
                    .map(|default| TemplateChoice {
                        origin: config,
                        default,
                    })
            }
        };
        let kept = kept.filter(|choice| own != Some(choice.default.as_str()));
        if let Some(choice) = &kept {
            log::info!(
                "{}: rendering chats through the chat template the adapter keeps (--chat-template chooses another)",
                choice.origin.display()
            );
        }
        Ok(kept)
    }

    /// The default template of a model's tokenizer files (its chat_template.jinja, else its
    /// tokenizer_config.json's), as `chosen` reads one kept beside an adapter.
    pub fn of_model(files: &TokenizerFiles) -> Option<String> {
        let config = files
            .tokenizer_config_json
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or(serde_json::Value::Null);
        templates_of(files.chat_template_jinja.as_deref(), &config)
            .ok()?
            .0
    }

    /// A Jinja file, or the template of a tokenizer: its folder (chat_template.jinja or
    /// tokenizer_config.json) or its tokenizer_config.json.
    pub fn read(path: &Path) -> Result<Self> {
        let read = |p: &Path| crate::fsutil::read_to_string(p).map_err(|e| Error::io(p, e));
        let (origin, jinja, config) = if path.is_dir() {
            let jinja = path.join("chat_template.jinja");
            let config = path.join("tokenizer_config.json");
            let jinja = jinja.is_file().then(|| read(&jinja)).transpose()?;
            let config_text = match jinja {
                Some(_) => None,
                None => config.is_file().then(|| read(&config)).transpose()?,
            };
            (config, jinja, config_text)
        } else {
            let text = read(path)?;
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v.is_object() => (path.to_path_buf(), None, Some(text)),
                _ => (path.to_path_buf(), Some(text), None),
            }
        };
        let config = match config {
            Some(text) => serde_json::from_str(&text).map_err(|e| Error::Config {
                path: origin.clone(),
                msg: format!("not valid JSON: {e}"),
            })?,
            None => serde_json::Value::Null,
        };
        let (default, _) =
            templates_of(jinja.as_deref(), &config).map_err(|msg| Error::Config {
                path: origin.clone(),
                msg,
            })?;
        let default = default.ok_or_else(|| Error::Template(format!(
            "{}: no chat template here (give a Jinja file, or a tokenizer folder or tokenizer_config.json that has one)",
            path.display()
        )))?;
        Ok(TemplateChoice {
            origin: path.to_path_buf(),
            default,
        })
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
    /// Whether the template marks what the assistant generates with `{% generation %}` blocks.
    marks_generation: bool,
}

const TEMPLATE_NAME: &str = "chat";

/// What a `{% generation %}` block's output is wrapped in while rendering, to be cut out after it:
/// code points of Unicode's private use plane 16, which no tokenizer's text nor chat data holds (a
/// conversation that does is refused).
const GENERATION_OPEN: char = '\u{10FFFD}';
const GENERATION_CLOSE: char = '\u{10FFFC}';
const GENERATION_FILTER: &str = "nibble_generation_mark";

/// `source` with transformers' `{% generation %}` ... `{% endgeneration %}` blocks (its Jinja extension
/// for assistant masks, which TRL's training templates use) written as filter blocks, which minijinja
/// knows; whitespace control (`{%-`, `-%}`) and hence trim_blocks/lstrip_blocks behave as on the tags.
/// Returns whether there was any.
fn generation_blocks_as_filters(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    // One pass: each tag or comment opening is found from where the last one ended.
    let opening = |text: &str| {
        text.as_bytes()
            .windows(2)
            .position(|w| w[0] == b'{' && (w[1] == b'%' || w[1] == b'#'))
    };
    while let Some(at) = opening(rest) {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // Where the tag ends, after its opening (in "{%}" they overlap), and what replaces it.
        let closing = if tag.starts_with("{#") { "#}" } else { "%}" };
        let Some(close) = tag[2..].find(closing).map(|i| i + 4) else {
            break;
        };
        let inner = &tag[2..close - 2];
        let (open_ws, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, close_ws) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        let (end, replaced) = match (closing, body.trim()) {
            // Comments and raw blocks are text, whatever tags they mention.
            ("#}", _) => (close, None),
            ("%}", "raw") => {
                let after = &tag[close..];
                let end = after
                    .find("endraw")
                    .and_then(|e| after[e..].find("%}").map(|c| close + e + c + 2));
                match end {
                    Some(end) => (end, None),
                    None => break,
                }
            }
            (_, "generation") => (close, Some(format!("filter {GENERATION_FILTER}"))),
            (_, "endgeneration") => (close, Some("endfilter".to_string())),
            _ => (close, None),
        };
        match replaced {
            Some(r) => {
                found = true;
                out.push_str(&format!("{{%{open_ws} {r} {close_ws}%}}"));
            }
            None => out.push_str(&tag[..end]),
        }
        rest = &tag[end..];
    }
    out.push_str(rest);
    (out, found)
}

/// Jinja2's `iterable` test (whether Python's `iter()` takes the value): none is not, where minijinja
/// says it is, and templates guard `tools | length` with it (Nemotron's), tools being None in a row
/// without them.
fn is_iterable_in_jinja2(value: JinjaValue) -> bool {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Number => false,
        ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map => true,
        _ => value.try_iter().is_ok(),
    }
}

/// Jinja2's `sequence` test (a length and indexing): strings and mappings are, where minijinja says
/// only lists are.
fn is_sequence_in_jinja2(value: JinjaValue) -> bool {
    matches!(
        value.kind(),
        ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map
    )
}

/// The output of one `{% generation %}` block, marked for `ChatTemplate::render_marked`.
fn generation_mark(body: String) -> String {
    format!("{GENERATION_OPEN}{body}{GENERATION_CLOSE}")
}

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
        env.add_filter(GENERATION_FILTER, generation_mark);
        env.add_test("iterable", is_iterable_in_jinja2);
        env.add_test("sequence", is_sequence_in_jinja2);
        #[cfg(not(target_arch = "wasm32"))]
        env.add_function("strftime_now", strftime_now);
        let (source, marks_generation) = generation_blocks_as_filters(&universal_newlines(source));
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| {
            Error::Template(format!(
                "{}: `chat_template` does not parse: {e}",
                origin.display()
            ))
        })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            marks_generation,
        })
    }

    /// Whether the template marks the assistant's output with `{% generation %}` blocks (then
    /// `render_marked` finds it, as transformers' `return_assistant_tokens_mask` does).
    pub fn marks_generation(&self) -> bool {
        self.marks_generation
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
        Ok(self.render_marked(messages, add_generation_prompt, args)?.0)
    }

    /// `render_with`, and the byte ranges of the text the template's `{% generation %}` blocks wrote (in
    /// the order written; none for a template without them).
    pub fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        args: &TemplateArgs,
    ) -> Result<(String, Vec<ByteRange>)> {
        let rendered = self.render_raw(messages, add_generation_prompt, args)?;
        if !self.marks_generation {
            return Ok((rendered, Vec::new()));
        }
        let data = serde_json::to_string(&(messages, &args.tools, &args.kwargs))
            .map_err(|e| Error::Template(e.to_string()))?;
        if data.contains([GENERATION_OPEN, GENERATION_CLOSE]) {
            return Err(marker_in_data());
        }
        let mut text = String::with_capacity(rendered.len());
        let (mut spans, mut open) = (Vec::new(), Vec::new());
        for c in rendered.chars() {
            match c {
                GENERATION_OPEN => open.push(text.len()),
                GENERATION_CLOSE => {
                    let start = open.pop().ok_or_else(marker_in_data)?;
                    // A block inside another adds nothing to the outer block's span.
                    if open.is_empty() {
                        spans.push((start, text.len()));
                    }
                }
                c => text.push(c),
            }
        }
        if !open.is_empty() {
            return Err(marker_in_data());
        }
        Ok((text, spans))
    }

    fn render_raw(
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
        // transformers passes the tokens the tokenizer has (its special_tokens_map): one it lacks is
        // undefined, not empty.
        let tokens: std::collections::BTreeMap<&str, &str> = [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
        ]
        .into_iter()
        .filter_map(|(key, token)| Some((key, token.as_deref()?)))
        .collect();
        let tokens = JinjaValue::from(minijinja::value::Serde(&tokens));
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

fn marker_in_data() -> Error {
    Error::Template(format!(
        "the conversation or the chat template holds the character U+{:X} or U+{:X}, which nibble reserves to find the chat template's {{% generation %}} blocks",
        GENERATION_OPEN as u32, GENERATION_CLOSE as u32
    ))
}

fn raise_exception(msg: String) -> std::result::Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
/// separators=separators, sort_keys=sort_keys)` (`ensure_ascii` False unless given), i.e. Python's
/// spacing (", " and ": "), key order kept, and no HTML escaping (minijinja's built-in filter escapes
/// `<` and `>`, which would change prompts).
fn python_tojson(
    value: JinjaValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<JinjaValue, minijinja::Error> {
    let invalid = |msg: &str| minijinja::Error::new(ErrorKind::InvalidOperation, msg.to_string());
    // Python's json takes a number of spaces or the string itself.
    let indent = match kwargs.get::<Option<JinjaValue>>("indent")? {
        Some(v) if !v.is_none() => Some(match v.as_str() {
            Some(text) => text.to_string(),
            None => {
                let n = usize::try_from(v)
                    .map_err(|_| invalid("tojson: indent must be a count or a string"))?;
                if n > MAX_JSON_INDENT {
                    return Err(invalid("tojson: indent is too wide"));
                }
                " ".repeat(n)
            }
        }),
        _ => None,
    };
    // Any two strings, as Python unpacks them (a two-character string too).
    let separators: Option<JinjaValue> = kwargs.get("separators")?;
    let separators: Option<Vec<String>> = separators.map(|v| match v.as_str() {
        Some(text) => text.chars().map(String::from).collect(),
        None => v
            .try_iter()
            .map(|items| {
                items
                    .filter_map(|s| Some(s.as_str()?.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
    });
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings (item separator, key separator)",
            ));
        }
        // Python's defaults: no space before a newline when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        indent,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        item_sep,
        key_sep,
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_python_json(&value, &style, 0, &mut out)?;
    Ok(JinjaValue::from_safe_string(out))
}

/// The widest `tojson(indent=N)`: a template asking for more is refused rather than filling memory.
const MAX_JSON_INDENT: usize = 64;

/// How Python's `json.dumps` was asked to write.
struct JsonStyle {
    indent: Option<String>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
}

impl JsonStyle {
    /// A JSON string literal, with every character beyond ASCII escaped (as UTF-16 units) when
    /// `ensure_ascii` asks for it.
    fn string(&self, text: &str, out: &mut String) {
        let quoted = serde_json::to_string(text).expect("a string serializes");
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            // Python escapes DEL too.
            if c.is_ascii() && c != '\x7f' {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

fn write_python_json(
    v: &JinjaValue,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            (0..depth).for_each(|_| out.push_str(indent));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::String => style.string(v.as_str().unwrap_or_default(), out),
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
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<JinjaValue> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                style.string(&key.to_string(), out);
                out.push_str(&style.key_sep);
                write_python_json(&v.get_item(key)?, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => style.string(&v.to_string(), out),
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

    /// A tokenizer_config.json's templates by name, as a list or as an object (transformers takes
    /// both); another type is refused naming the file.
    #[test]
    fn templates_are_read_by_name_from_a_list_or_an_object() {
        let with = |template: serde_json::Value| {
            let mut files = crate::synth::byte_tokenizer();
            let mut config: serde_json::Value =
                serde_json::from_str(files.tokenizer_config_json.as_deref().unwrap()).unwrap();
            config["chat_template"] = template;
            files.tokenizer_config_json = Some(config.to_string());
            files.chat_template_jinja = None;
            ChatTokenizer::from_files(&files, Path::new("m"))
        };
        let hello = [Message::new("user", "hello")];
        let plain = "{{ messages[0]['content'] }}!";
        for form in [
            serde_json::json!([{"name": "default", "template": plain}]),
            serde_json::json!({"default": plain}),
        ] {
            let tok = with(form).unwrap();
            assert_eq!(tok.apply_chat_template(&hello, false).unwrap(), "hello!");
        }
        let err = with(serde_json::json!(5)).err().unwrap().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("is 5"),
            "{err}"
        );
    }

    /// Another model's tokenizer (many ids past the embeddings) is refused at once; a few added
    /// tokens past them only where text produces one, naming the token.
    #[test]
    fn a_tokenizer_is_fitted_to_the_models_embeddings() {
        let files = crate::synth::byte_tokenizer();
        let tok = || ChatTokenizer::from_files(&files, Path::new("byte")).unwrap();
        // 256 bytes, then <|endoftext|>, <|im_start|>, <|im_end|> at 256-258.
        let mut fits = tok();
        fits.fit_to_model(259).unwrap();
        assert!(fits.encode("<|im_end|>").is_ok());
        let mut strays = tok();
        strays.fit_to_model(257).unwrap();
        assert_eq!(strays.encode("hi").unwrap(), tok().encode("hi").unwrap());
        let err = strays.encode("hi<|im_end|>").unwrap_err().to_string();
        assert!(
            err.contains("`<|im_end|>` (id 258)") && err.contains("257 embeddings"),
            "{err}"
        );
        let err = tok().fit_to_model(64).unwrap_err().to_string();
        assert!(
            err.contains("195 of its tokens") && err.contains("not the model's"),
            "{err}"
        );
    }

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
