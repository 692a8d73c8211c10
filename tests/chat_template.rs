//! The chat template renders to the same string, and the tokenizer to the same ids, as transformers'
//! `apply_chat_template` with the real Qwen2.5 tokenizer (fixture made by scripts/make_chat_fixture.py).

use nibble::synth::qwen25_tokenizer;
use nibble::tokenizer::{ChatTokenizer, Message};
use std::path::Path;

#[derive(serde::Deserialize)]
struct Case {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: String,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[test]
fn qwen25_template_and_ids_equal_transformers() {
    let path = format!(
        "{}/tests/fixtures/chat_template_qwen2.5.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(fixture.cases.len() >= 10);
    let tok = ChatTokenizer::from_files(&qwen25_tokenizer(), Path::new("assets/qwen2.5-tokenizer"))
        .unwrap();
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token.as_deref(), Some("<|endoftext|>"));
    for (i, case) in fixture.cases.iter().enumerate() {
        let text = tok
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(text, case.text, "case {i}: rendered text differs");
        assert_eq!(
            tok.encode(&text).unwrap(),
            case.ids,
            "case {i}: token ids differ"
        );
        assert_eq!(
            tok.decode(&case.ids).unwrap(),
            case.text,
            "case {i}: decode does not round-trip"
        );
    }
}

#[test]
fn template_errors_are_reported_not_panicked() {
    let mut files = qwen25_tokenizer();
    files.chat_template_jinja =
        Some("{{ raise_exception('only user and assistant roles') }}".into());
    let tok = ChatTokenizer::from_files(&files, Path::new("model")).unwrap();
    let err = tok
        .apply_chat_template(&[Message::new("user", "hi")], false)
        .unwrap_err();
    assert!(
        err.to_string().contains("only user and assistant roles"),
        "{err}"
    );

    files.chat_template_jinja = Some("{% for m in messages %}".into());
    let err = ChatTokenizer::from_files(&files, Path::new("model"))
        .err()
        .expect("unclosed for must fail");
    assert!(err.to_string().contains("does not parse"), "{err}");
}

#[test]
fn tojson_uses_python_spacing_without_html_escaping() {
    let mut files = qwen25_tokenizer();
    files.chat_template_jinja = Some(
        "{{ {'a': 1, 'b': [true, none, 'x<y>'], 'c': 0.5} | tojson }}|{{ 'é' | tojson }}".into(),
    );
    let tok = ChatTokenizer::from_files(&files, Path::new("model")).unwrap();
    let out = tok.apply_chat_template(&[], false).unwrap();
    // Python: json.dumps({"a": 1, "b": [True, None, "x<y>"], "c": 0.5}, ensure_ascii=False)
    assert_eq!(out, r#"{"a": 1, "b": [true, null, "x<y>"], "c": 0.5}|"é""#);
}

#[derive(serde::Deserialize)]
struct TextCase {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: String,
}

#[derive(serde::Deserialize)]
struct TextFixture {
    cases: Vec<TextCase>,
}

#[test]
fn jinja_features_of_current_templates_render_as_transformers_does() {
    // tests/fixtures/features_template.jinja uses reverse slicing, namespace(), str.split/strip/lstrip/
    // rstrip/startswith/endswith, `is string`, `is defined`, `in`, map/join/upper/trim filters, loop.index0.
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let fixture: TextFixture = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/features_template.json")).unwrap(),
    )
    .unwrap();
    let mut files = qwen25_tokenizer();
    files.chat_template_jinja =
        Some(std::fs::read_to_string(format!("{dir}/features_template.jinja")).unwrap());
    let tok = ChatTokenizer::from_files(&files, Path::new(&dir)).unwrap();
    assert_eq!(fixture.cases.len(), 4);
    for (i, case) in fixture.cases.iter().enumerate() {
        let text = tok
            .apply_chat_template(&case.messages, case.add_generation_prompt)
            .unwrap();
        assert_eq!(text, case.text, "case {i}");
    }
}

#[test]
fn broken_tokenizer_files_name_the_file() {
    let mut files = qwen25_tokenizer();
    files.tokenizer_json = Some("{\"version\": \"1.0\", \"model\": 42}".into());
    let err = ChatTokenizer::from_files(&files, Path::new("some/model"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("some/model/tokenizer.json"), "{err}");

    let mut files = qwen25_tokenizer();
    files.tokenizer_config_json = Some("{not json".into());
    let err = ChatTokenizer::from_files(&files, Path::new("some/model"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("some/model/tokenizer_config.json"), "{err}");

    let files = nibble::model::TokenizerFiles::default();
    let err = ChatTokenizer::from_files(&files, Path::new("some/model"))
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
}

#[derive(Debug, serde::Deserialize)]
struct FamilyCase {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    text: Option<String>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct FamilyTemplate {
    special_tokens: std::collections::BTreeMap<String, String>,
    cases: Vec<FamilyCase>,
    /// The date in renders of a template that writes today's, and its `strftime_now` format.
    date: Option<String>,
    date_format: Option<String>,
}

#[derive(serde::Deserialize)]
struct FamilyFixture {
    templates: std::collections::BTreeMap<String, FamilyTemplate>,
}

/// The Qwen2.5 tokenizer with the template `{dir}/{name}.jinja` and that family's special tokens.
fn family_tokenizer(
    dir: &str,
    name: &str,
    special_tokens: &std::collections::BTreeMap<String, String>,
) -> ChatTokenizer {
    let mut files = qwen25_tokenizer();
    let mut config: serde_json::Value =
        serde_json::from_str(files.tokenizer_config_json.as_deref().unwrap()).unwrap();
    for (key, value) in special_tokens {
        config[key] = serde_json::json!(value);
    }
    files.tokenizer_config_json = Some(config.to_string());
    files.chat_template_jinja =
        Some(std::fs::read_to_string(format!("{dir}/{name}.jinja")).unwrap());
    ChatTokenizer::from_files(&files, Path::new(dir)).unwrap()
}

/// The released chat templates of Gemma 3, Phi-3.5, Phi-4-mini, Mistral Small 3.2 and Mistral Nemo,
/// and the Gemma 4, SmolLM3 and gpt-oss (harmony: the last turn's `thinking` in training) ones inference
/// engines ship (tests/fixtures/templates/, sources in SOURCES.md there: macros, recursion, `dictsort`,
/// `map`, namespaces, today's date in two formats) render as transformers renders them, with
/// each family's special tokens from tokenizer_config.json; where transformers raises (Gemma's and
/// Mistral's templates refuse two user turns in a row), nibble errors with the template's message.
#[test]
fn family_templates_render_as_transformers_does() {
    let dir = format!("{}/tests/fixtures/templates", env!("CARGO_MANIFEST_DIR"));
    let fixture: FamilyFixture =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/rendered.json")).unwrap())
            .unwrap();
    assert_eq!(fixture.templates.len(), 8);
    for (name, family) in &fixture.templates {
        let tok = family_tokenizer(&dir, name, &family.special_tokens);
        let mut errors = 0;
        for (i, case) in family.cases.iter().enumerate() {
            let ours = tok.apply_chat_template(&case.messages, case.add_generation_prompt);
            match (&case.text, &case.error, ours) {
                (Some(text), None, Ok(ours)) => {
                    let text = match (&family.date, &family.date_format) {
                        (Some(then), Some(format)) => text.replace(then.as_str(), &today(format)),
                        _ => text.clone(),
                    };
                    assert_eq!(ours, text, "{name} case {i}")
                }
                (None, Some(error), Err(ours)) => {
                    errors += 1;
                    assert!(
                        ours.to_string().contains(error.as_str()),
                        "{name} case {i}: {ours}"
                    );
                }
                (_, _, ours) => panic!("{name} case {i}: transformers {case:?}, nibble {ours:?}"),
            }
        }
        // Gemma 3's and Mistral's templates refuse turns out of order; Gemma 4's renders them.
        let refuses = name.starts_with("gemma3") || name.starts_with("mistral");
        assert_eq!(
            errors > 0,
            refuses,
            "{name}: {errors} refused conversations"
        );
    }
}

/// Today in `format`, through a template of one `strftime_now` call, checked to be written as
/// transformers writes it (for "%d %B %Y": a two-digit day, an English month name and the year; for
/// "%Y-%m-%d", ISO 8601's).
fn today(format: &str) -> String {
    let mut files = qwen25_tokenizer();
    files.chat_template_jinja = Some(format!(r#"{{{{ strftime_now("{format}") }}}}"#));
    let tok = ChatTokenizer::from_files(&files, Path::new("today")).unwrap();
    let today = tok.apply_chat_template(&[], false).unwrap();
    if format == "%Y-%m-%d" {
        let parts: Vec<&str> = today.split('-').collect();
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        assert!(
            parts.len() == 3 && digits(parts[0], 4) && digits(parts[1], 2) && digits(parts[2], 2),
            "{today}"
        );
        return today;
    }
    assert_eq!(format, "%d %B %Y", "a format this test knows");
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
    let parts: Vec<&str> = today.split(' ').collect();
    assert!(
        parts.len() == 3
            && parts[0].len() == 2
            && parts[0].bytes().all(|b| b.is_ascii_digit())
            && MONTHS.contains(&parts[1])
            && parts[2].len() == 4
            && parts[2].bytes().all(|b| b.is_ascii_digit()),
        "strftime_now(\"%d %B %Y\") gave {today:?}"
    );
    today
}

#[derive(serde::Deserialize)]
struct ToolCase {
    tokenizer: String,
    row: serde_json::Value,
    text: String,
    ids: Vec<u32>,
    prompt_text: Option<String>,
    /// The messages transformers rendered, where the row is not a messages row (ShareGPT).
    messages: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct ToolFixture {
    cases: Vec<ToolCase>,
}

/// Function-calling and reasoning rows (tests/fixtures/tool_chats.json, made by
/// scripts/make_tool_chat_fixture.py): a `tools` column as a list or as a JSON string, assistant turns
/// with `tool_calls` beside null or empty content, tool turns, Qwen3's `reasoning_content` and
/// `chat_template_kwargs`, conversational prompt/completion with tools, LLaMA-Factory's ShareGPT with a
/// `function_call` turn (rendered as the tool call it holds). Each row, read as nibble reads a
/// JSONL line and tokenized for training, gives the text and the ids TRL's SFTTrainer trains on; with
/// `--loss-on assistant` the loss falls on the calls and answers, never on the tools' results.
#[test]
fn tool_calling_and_reasoning_rows_train_on_what_trl_trains_on() {
    use nibble::data::{self, Example};
    use nibble::train::{self, LossOn};
    let path = format!(
        "{}/tests/fixtures/tool_chats.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let fixture: ToolFixture =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(fixture.cases.len(), 10);
    let qwen25 = ChatTokenizer::from_files(&qwen25_tokenizer(), Path::new("qwen2.5")).unwrap();
    let qwen3 =
        ChatTokenizer::from_files(&nibble::synth::qwen3_tokenizer(), Path::new("qwen3")).unwrap();
    for (i, case) in fixture.cases.iter().enumerate() {
        let tok = match case.tokenizer.as_str() {
            "qwen2.5" => &qwen25,
            _ => &qwen3,
        };
        let line = case.row.to_string();
        let example = data::parse_jsonl(&line, "row").unwrap().remove(0);
        assert_eq!(data::render(tok, &example).unwrap(), case.text, "case {i}");
        let (seq, _) = train::tokenize(tok, &example, LossOn::Default, 4096).unwrap();
        assert_eq!(seq.ids, case.ids, "case {i}: ids");
        if let Some(prompt) = &case.prompt_text {
            // The completion (the call) alone carries loss.
            let prompt_len = tok.encode(prompt).unwrap().len();
            let first = seq.targets.iter().position(Option::is_some).unwrap();
            assert_eq!(
                first + 1,
                prompt_len,
                "case {i}: loss starts after the prompt"
            );
        }
        if matches!(example, Example::Messages(..)) {
            let (seq, _) = train::tokenize(tok, &example, LossOn::Assistant, 4096).unwrap();
            let labelled: Vec<u32> = seq.targets.iter().flatten().copied().collect();
            let text = tok.decode(&labelled).unwrap();
            let messages = case.messages.as_ref().unwrap_or(&case.row["messages"]);
            // Every assistant turn carries loss, no user or tool turn does.
            for m in messages.as_array().unwrap() {
                let content = m["content"].as_str().unwrap_or_default();
                match m["role"].as_str().unwrap() {
                    "assistant" => assert!(text.contains(content), "case {i}: {text:?}"),
                    _ => assert!(!text.contains(content), "case {i}: {content:?} in {text:?}"),
                }
            }
            assert!(!text.contains("<tool_response>"), "case {i}: {text:?}");
            let calls = messages
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["tool_calls"].is_array());
            if calls {
                assert!(text.contains("<tool_call>"), "case {i}: {text:?}");
            }
            if line.contains("Peru's capital") {
                assert!(text.contains("Peru's capital is Lima."), "{text:?}");
            }
            // Qwen3 keeps the last turn's reasoning and drops the earlier one's: so does the loss.
            if line.contains("Add them.") {
                assert!(
                    text.contains("5 x 4 = 20.") && !text.contains("Add them."),
                    "{text:?}"
                );
                assert!(text.contains("5<|im_end|>"), "{text:?}");
            }
        }
    }
}

/// A tokenizer_config.json that names its templates: transformers renders with `tool_use` when tools
/// are given and with `default` otherwise; `tools` and `documents` are defined (none) when not given,
/// and a row's keywords reach the template.
#[test]
fn tools_pick_the_tool_use_template_and_are_none_when_absent() {
    use nibble::tokenizer::TemplateArgs;
    let mut files = qwen25_tokenizer();
    let mut config: serde_json::Value =
        serde_json::from_str(files.tokenizer_config_json.as_deref().unwrap()).unwrap();
    config["chat_template"] = serde_json::json!([
        {"name": "default", "template": "D{% if tools is none and documents is none %}N{% endif %}{{ messages[0].content }}{{ flag }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}{{ tools[0].function.name }}{{ eos_token }}"}
    ]);
    files.tokenizer_config_json = Some(config.to_string());
    let tok = ChatTokenizer::from_files(&files, Path::new("named")).unwrap();
    let messages = [Message::new("user", "hi")];
    assert_eq!(tok.apply_chat_template(&messages, false).unwrap(), "DNhi");
    let mut args = TemplateArgs::default();
    args.kwargs.insert("flag".into(), "!".into());
    assert_eq!(
        tok.apply_chat_template_with(&messages, false, &args)
            .unwrap(),
        "DNhi!"
    );
    args.tools = Some(serde_json::json!([{"type": "function", "function": {"name": "f"}}]));
    assert_eq!(
        tok.apply_chat_template_with(&messages, false, &args)
            .unwrap(),
        "T1f<|im_end|>"
    );
}

#[derive(serde::Deserialize)]
struct FamilyToolCase {
    row: serde_json::Value,
    text: Option<String>,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
struct FamilyTools {
    special_tokens: std::collections::BTreeMap<String, String>,
    cases: Vec<FamilyToolCase>,
}

#[derive(serde::Deserialize)]
struct FamilyToolFixture {
    templates: std::collections::BTreeMap<String, FamilyTools>,
}

/// Rows with tools and calls through the other families' templates that render tools (Mistral Small
/// 3.2's and Nemo's `[AVAILABLE_TOOLS]`/`[TOOL_CALLS]`, Phi-4-mini's, Gemma 4's), read as nibble reads
/// a JSONL line: the text transformers renders, or an error where its template fails (Phi-4-mini's reads
/// the content a call turn does not have).
#[test]
fn family_templates_render_tool_rows_as_transformers_does() {
    use nibble::data;
    let dir = format!("{}/tests/fixtures/templates", env!("CARGO_MANIFEST_DIR"));
    let fixture: FamilyToolFixture = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/rendered_tools.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(fixture.templates.len(), 4);
    let mut errors = 0;
    for (name, family) in &fixture.templates {
        let tok = family_tokenizer(&dir, name, &family.special_tokens);
        for (i, case) in family.cases.iter().enumerate() {
            let example = data::parse_jsonl(&case.row.to_string(), "row")
                .unwrap()
                .remove(0);
            match (&case.text, data::render(&tok, &example)) {
                (Some(text), Ok(ours)) => assert_eq!(&ours, text, "{name} case {i}"),
                (None, Err(_)) => errors += 1,
                (_, ours) => panic!(
                    "{name} case {i}: transformers {:?}, nibble {ours:?}",
                    case.error
                ),
            }
        }
    }
    assert_eq!(errors, 1);
}

/// `--chat-template` takes a Jinja file, a tokenizer folder, or a tokenizer_config.json (inline or named
/// templates); a place without a template is named.
#[test]
fn a_chat_template_is_read_from_a_file_a_folder_or_a_tokenizer_config() {
    use nibble::tokenizer::TemplateChoice;
    let dir = tempfile::tempdir().unwrap();
    let jinja = dir.path().join("t.jinja");
    std::fs::write(&jinja, "{{ messages[0].content }}!").unwrap();
    let choice = TemplateChoice::read(&jinja).unwrap();
    assert_eq!(choice.default, "{{ messages[0].content }}!");

    let folder = dir.path().join("tok");
    std::fs::create_dir(&folder).unwrap();
    let named = serde_json::json!({"chat_template": [
        {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]});
    std::fs::write(folder.join("tokenizer_config.json"), named.to_string()).unwrap();
    // The default template only, as TRL takes a tokenizer's (tool rows render through it too).
    let choice = TemplateChoice::read(&folder).unwrap();
    assert_eq!(choice.default, "plain");
    let tok = ChatTokenizer::from_files(&qwen25_tokenizer(), Path::new("qwen"))
        .unwrap()
        .with_template(&choice)
        .unwrap();
    let args = nibble::tokenizer::TemplateArgs {
        tools: Some(serde_json::json!([])),
        ..Default::default()
    };
    assert_eq!(
        tok.apply_chat_template_with(&[], false, &args).unwrap(),
        "plain"
    );
    // chat_template.jinja replaces tokenizer_config.json's templates, as transformers loads them;
    // a broken tokenizer_config.json beside it is not read.
    std::fs::write(folder.join("chat_template.jinja"), "from jinja").unwrap();
    std::fs::write(folder.join("tokenizer_config.json"), "{broken").unwrap();
    assert_eq!(TemplateChoice::read(&folder).unwrap().default, "from jinja");
    let mut files = qwen25_tokenizer();
    files.chat_template_jinja = Some("J".into());
    files.tokenizer_config_json = Some(named.to_string());
    let tok = ChatTokenizer::from_files(&files, Path::new("qwen")).unwrap();
    assert!(tok.tool_template.is_none());
    assert_eq!(
        tok.apply_chat_template_with(&[], false, &args).unwrap(),
        "J"
    );

    // An adapter folder's kept template: its chat_template.jinja, else a usable one in a tokenizer
    // saved beside it; anything else leaves the model's (None).
    let adapter = dir.path().join("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let chosen = |dir: &Path| {
        TemplateChoice::chosen(None, Some(dir), None)
            .unwrap()
            .map(|c| c.default)
    };
    assert_eq!(chosen(&adapter), None);
    for broken in [
        "{broken",
        r#"{"chat_template": null}"#,
        r#"{"chat_template": [{"name": "x"}]}"#,
    ] {
        std::fs::write(adapter.join("tokenizer_config.json"), broken).unwrap();
        assert_eq!(chosen(&adapter), None, "{broken}");
    }
    std::fs::write(
        adapter.join("tokenizer_config.json"),
        r#"{"chat_template": "T"}"#,
    )
    .unwrap();
    assert_eq!(chosen(&adapter).as_deref(), Some("T"));
    std::fs::write(adapter.join("chat_template.jinja"), "K").unwrap();
    assert_eq!(chosen(&adapter).as_deref(), Some("K"));
    // The model's own default kept beside the adapter (as nibble and TRL save the tokenizer) leaves
    // the model's templates, its named ones included.
    let with_own = |own: &str| {
        TemplateChoice::chosen(None, Some(&adapter), Some(own))
            .unwrap()
            .map(|c| c.default)
    };
    assert_eq!(with_own("K"), None);
    assert_eq!(with_own("other").as_deref(), Some("K"));
    assert_eq!(
        TemplateChoice::chosen(Some(&jinja), Some(&adapter), Some("K"))
            .unwrap()
            .map(|c| c.default)
            .as_deref(),
        Some("{{ messages[0].content }}!")
    );
    let inline = dir.path().join("tokenizer_config.json");
    std::fs::write(&inline, r#"{"chat_template": "inline", "eos_token": "x"}"#).unwrap();
    assert_eq!(TemplateChoice::read(&inline).unwrap().default, "inline");

    std::fs::write(&inline, r#"{"eos_token": "x"}"#).unwrap();
    let err = TemplateChoice::read(&inline).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json: no chat template here"),
        "{err}"
    );
    let err = TemplateChoice::read(&dir.path().join("none.jinja"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("none.jinja"), "{err}");

    std::fs::write(&jinja, "{% for m in messages %}").unwrap();
    let tok = ChatTokenizer::from_files(&qwen25_tokenizer(), Path::new("qwen")).unwrap();
    let err = tok
        .with_template(&TemplateChoice::read(&jinja).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("t.jinja") && err.contains("does not parse"),
        "{err}"
    );
}

/// `{% generation %}` blocks render their text in place and say where it is, in every spelling of the
/// tag (whitespace control on either side); text that holds the characters nibble marks blocks with is
/// refused rather than misread.
#[test]
fn generation_blocks_render_in_place_and_report_their_text() {
    use nibble::tokenizer::{ChatTemplate, TemplateArgs};
    let template = ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{%- generation -%}  {{ m.content }}{%+ endgeneration %}|{% endfor %}",
        None,
        None,
        "t".into(),
    )
    .unwrap();
    assert!(template.marks_generation());
    let messages = [
        Message::new("user", "héllo"),
        Message::new("assistant", "wörld"),
    ];
    let args = TemplateArgs::default();
    let (text, spans) = template.render_marked(&messages, false, &args).unwrap();
    assert_eq!(text, "<user>héllo|<assistant>wörld|");
    assert_eq!(template.render_with(&messages, false, &args).unwrap(), text);
    let pieces: Vec<&str> = spans.iter().map(|&(a, b)| &text[a..b]).collect();
    assert_eq!(pieces, ["héllo", "wörld"]);

    // Comments and raw blocks are text, whatever tags they mention.
    let quoted = ChatTemplate::new(
        "{#- adds {% generation %} here -#}{% raw %}{% generation %}{% endraw %}{{ messages[0].content }}",
        None,
        None,
        "t".into(),
    )
    .unwrap();
    assert!(!quoted.marks_generation());
    assert_eq!(
        quoted.render_with(&messages, false, &args).unwrap(),
        "{% generation %}héllo"
    );

    let sneaky = [Message::new("assistant", "a\u{10FFFD}b")];
    let err = template
        .render_marked(&sneaky, false, &args)
        .unwrap_err()
        .to_string();
    assert!(err.contains("U+10FFFD"), "{err}");
}

/// Jinja's tests (`is iterable`, `is sequence`, ...) answer as Jinja2 answers them in transformers
/// (the table is Jinja2's own output): templates such as Nemotron's guard `tools | length` with
/// `tools is iterable`, which is false for the None transformers passes when a row has no tools.
#[test]
fn jinja_tests_answer_as_jinja2_does() {
    use nibble::tokenizer::{ChatTemplate, TemplateArgs};
    let tests = [
        "iterable", "sequence", "mapping", "string", "number", "none", "defined", "true", "false",
        "boolean", "integer", "float",
    ];
    // Value, then the tests above that are true of it.
    let table: [(&str, &[&str]); 7] = [
        ("none", &["none", "defined"]),
        ("'ab'", &["iterable", "sequence", "string", "defined"]),
        ("[1]", &["iterable", "sequence", "defined"]),
        ("{'a': 1}", &["iterable", "sequence", "mapping", "defined"]),
        ("3", &["number", "defined", "integer"]),
        ("nothing_here", &["iterable", "sequence"]),
        ("true", &["number", "defined", "true", "boolean"]),
    ];
    let mut wrong = Vec::new();
    for (value, truths) in table {
        for test in tests {
            let source = format!("{{{{ ({value}) is {test} }}}}");
            let template = ChatTemplate::new(&source, None, None, "t".into()).unwrap();
            let got = template
                .render_with(&[], false, &TemplateArgs::default())
                .unwrap();
            let expected = if truths.contains(&test) {
                "True"
            } else {
                "False"
            };
            if got != expected {
                wrong.push(format!("{value} is {test}: {got}, Jinja2 {expected}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// `tojson`'s keywords as transformers' filter takes them (GLM-4.5's template passes
/// `ensure_ascii=False`), a tokenizer without a BOS token leaving `bos_token` undefined as transformers
/// leaves it (Llama 3's template adds it to text), and line ends as Jinja2 reads them (a file saved on
/// Windows). Expected strings are Jinja2's output in transformers.
#[test]
fn tojson_keywords_missing_special_tokens_and_crlf_files_follow_transformers() {
    use nibble::tokenizer::{ChatTemplate, TemplateArgs, TemplateChoice};
    let render = |source: &str, bos: Option<&str>| {
        ChatTemplate::new(source, bos.map(String::from), None, "t".into())
            .unwrap()
            .render_with(&[], false, &TemplateArgs::default())
    };
    let json = "{{ {'k': 'é🚀', 'n': [1, 2.5]} | tojson(ensure_ascii=True) }}|{{ {'a': [1, 2]} | tojson(separators=(',', ':')) }}|{{ [1, {'b': 'x'}] | tojson(indent=2, separators=(', ', ' = ')) }}";
    assert_eq!(
        render(json, None).unwrap(),
        "{\"k\": \"\\u00e9\\ud83d\\ude80\", \"n\": [1, 2.5]}|{\"a\":[1,2]}|[\n  1, \n  {\n    \"b\" = \"x\"\n  }\n]"
    );
    let err = render("{{ 1 | tojson(separators=',') }}", None).unwrap_err();
    assert!(err.to_string().contains("separators"), "{err}");
    assert_eq!(
        render("{{ 'a\x7fé' | tojson(ensure_ascii=True) }}", None).unwrap(),
        "\"a\\u007f\\u00e9\""
    );
    assert_eq!(
        render("{{ {'a': [1]} | tojson(indent='\t') }}", None).unwrap(),
        "{\n\t\"a\": [\n\t\t1\n\t]\n}"
    );
    assert_eq!(
        render("{{ {'a': [1, 2]} | tojson(separators=',:') }}", None).unwrap(),
        "{\"a\":[1,2]}"
    );
    let err = render("{{ [[1]] | tojson(indent=1000000000000) }}", None).unwrap_err();
    assert!(err.to_string().contains("indent"), "{err}");
    // Jinja2 reads every line end of the source as "\n", in strings too.
    assert_eq!(
        render("{{ 'x\r\ny\rz' }}|a\r\nb", None).unwrap(),
        "x\ny\nz|a\nb"
    );

    let bos = "{{ bos_token is defined }}{{ bos_token }}";
    assert_eq!(render(bos, None).unwrap(), "False");
    assert_eq!(render(bos, Some("<s>")).unwrap(), "True<s>");
    assert!(render("{{ bos_token + 'x' }}", None).is_err());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crlf.jinja");
    std::fs::write(&file, "{% if true %}\r\nA\r\n{% endif %}\rB\r\n").unwrap();
    let choice = TemplateChoice::read(&file).unwrap();
    // Jinja drops the template's last newline.
    assert_eq!(render(&choice.default, None).unwrap(), "A\nB");
}

/// A tokenizer.json saved with truncation and padding switched on encodes whole texts, unpadded, as
/// transformers encodes them (it turns both off for each call).
#[test]
fn saved_truncation_and_padding_do_not_apply() {
    let mut files = qwen25_tokenizer();
    let mut json: serde_json::Value =
        serde_json::from_str(files.tokenizer_json.as_deref().unwrap()).unwrap();
    let plain = ChatTokenizer::from_files(&files, Path::new("qwen")).unwrap();
    json["truncation"] = serde_json::json!({"direction": "Right", "max_length": 3,
        "strategy": "LongestFirst", "stride": 0});
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 40}, "direction": "Right",
        "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "!"});
    files.tokenizer_json = Some(json.to_string());
    let saved = ChatTokenizer::from_files(&files, Path::new("qwen")).unwrap();
    let text = "Hello there, general Kenobi.";
    let ids = plain.encode_text(text).unwrap();
    assert!(ids.len() > 3);
    assert_eq!(saved.encode_text(text).unwrap(), ids);
    assert_eq!(saved.encode(text).unwrap(), ids);
}
