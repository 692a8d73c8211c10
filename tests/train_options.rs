//! `nibble train` options beyond the basic loop: assistant-only loss, validation data, warmup ratio,
//! starting from an existing adapter, and stopping on a non-finite loss.

mod common;

use common::{nibble, train_cli};

use nibble::config::{Arch, Multimodal};
use nibble::data::Example;
use nibble::model::ModelSource;
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::{ChatTokenizer, Message};
use nibble::train::{self, LossOn, Schedule, TrainConfig, Trainer};
use std::path::Path;
use std::process::Command;

/// A tiny model with the byte-level tokenizer (vocabulary 259): fast, and any text tokenizes.
fn byte_model(dir: &Path) {
    synth::write_model_folder(
        dir,
        &SynthSpec::tiny(Arch::Qwen2, 259),
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
}

fn chats(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": format!("Question {i}?")},
                {"role": "assistant", "content": format!("Answer {}.", i * 7)},
            ]})
            .to_string()
                + "\n"
        })
        .collect()
}

/// A temporary folder with a byte-tokenizer model (`m`) and four chats (`d.jsonl`).
fn model_and_chats() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(4)).unwrap();
    (dir, model, data)
}

/// Tokens of the data whose base rows were never trained (zero, as a base model's chat tokens can
/// be) are named in a warning: the embedding's for tokens read, the output projection's for tokens
/// the data trains the model to write; a model whose rows are all trained draws none.
#[test]
fn tokens_the_base_never_trained_are_named_in_a_warning() {
    // Qwen2's tiny model ties its output projection to its embedding, Llama's does not.
    for arch in [Arch::Qwen2, Arch::Llama] {
        untrained_tokens_are_named(arch);
    }
}

fn untrained_tokens_are_named(arch: Arch) {
    let (dir, _, data) = model_and_chats();
    let model = dir.path().join(format!("{arch:?}"));
    synth::write_model_folder(
        &model,
        &SynthSpec::tiny(arch, 259),
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
    let warned = |out: &str| {
        let o = train_cli(&model, &data, &dir.path().join(out), &["--max-steps", "1"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = warned("trained");
    assert!(!err.contains("never trained"), "{err}");
    // <|im_start|> (257) read, <|im_end|> (258) read and written: their rows zeroed.
    let weights = model.join("model.safetensors");
    let mut tensors = common::read_f32_tensors(&weights);
    let untied = tensors.iter().any(|(name, _, _)| name == "lm_head.weight");
    for (name, shape, values) in &mut tensors {
        let zeroed: &[usize] = match name.as_str() {
            "model.embed_tokens.weight" => &[257, 258],
            "lm_head.weight" => &[258],
            _ => continue,
        };
        for &row in zeroed {
            values[row * shape[1]..(row + 1) * shape[1]].fill(0.0);
        }
    }
    common::write_f32_tensors(&weights, &tensors);
    let err = warned("untrained");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("never trained"))
        .collect();
    let [read, written] = lines[..] else {
        panic!("two warnings expected: {err}");
    };
    assert!(
        read.contains("embedding rows")
            && read.contains("\"<|im_start|>\" (257)")
            && read.contains("\"<|im_end|>\" (258)")
            && !read.contains("(256)"),
        "{read}"
    );
    // A tied model's output rows are its embedding's.
    assert!(
        written.contains("output rows")
            && written.contains("(258)")
            && written.contains("(257)") != untied,
        "untied {untied}: {written}"
    );
}

/// `nibble eval` of `adapter` on the CPU.
fn eval_cli(model: &Path, data: &Path, adapter: &Path) -> std::process::Output {
    common::nibble(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--device",
        "cpu",
    ])
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn assistant_loss_covers_exactly_the_assistant_turns() {
    let tok = ChatTokenizer::from_files(&synth::qwen25_tokenizer(), Path::new("qwen")).unwrap();
    let conversation = vec![
        Message::new("system", "You are terse."),
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "How are you?"),
        Message::new("assistant", "Fine, thanks."),
    ];
    let (seq, _) = train::tokenize(
        &tok,
        &Example::Messages(conversation.clone(), Default::default()),
        LossOn::Assistant,
        4096,
    )
    .unwrap();
    // Group the labelled tokens into runs and decode each.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for (t, target) in seq.targets.iter().enumerate() {
        if let Some(id) = target {
            assert_eq!(*id, seq.ids[t + 1]);
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(*id);
        }
        previous = target.is_some();
    }
    let text: Vec<String> = runs.iter().map(|r| tok.decode(r).unwrap()).collect();
    assert_eq!(text, ["Hello!<|im_end|>\n", "Fine, thanks.<|im_end|>\n"]);
    // Text rows have no assistant turns to find.
    let err =
        train::tokenize(&tok, &Example::Text("plain".into()), LossOn::Assistant, 64).unwrap_err();
    assert!(err.to_string().contains("conversational"), "{err}");
}

/// A template that ends only the whole conversation with a special token (Phi-3.5's appends its eos
/// once, after the last turn) renders the conversation through an earlier assistant turn with that token
/// where the whole has the next user turn: assistant-only loss is refused there, never spread over the
/// turns that follow; so is a template that closes only the last turn with its end-of-turn token.
#[test]
fn assistant_loss_refuses_a_template_it_cannot_split() {
    let phi = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/templates/phi-3.5-mini-instruct.jinja"
    ))
    .unwrap();
    // Only the last turn closed, with a special token: each turn's own rendering ends with it, the
    // earlier turns in the whole do not, and their headers are found.
    let closes_the_last_turn = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}{% if loop.last and m.role == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let tokenizer = |template: &str| {
        let mut files = synth::qwen25_tokenizer();
        files.chat_template_jinja = Some(template.to_string());
        let mut config: serde_json::Value =
            serde_json::from_str(files.tokenizer_config_json.as_deref().unwrap()).unwrap();
        config["eos_token"] = "<|endoftext|>".into();
        files.tokenizer_config_json = Some(config.to_string());
        ChatTokenizer::from_files(&files, Path::new("closed-once")).unwrap()
    };
    let conversation = vec![
        Message::new("user", "Hi there"),
        Message::new("assistant", "Hello!"),
        Message::new("user", "How are you?"),
        Message::new("assistant", "Fine, thanks."),
    ];
    let example = Example::Messages(conversation.clone(), Default::default());
    for template in [closes_the_last_turn, &phi] {
        let tok = tokenizer(template);
        let err = train::tokenize(&tok, &example, LossOn::Assistant, 4096).unwrap_err();
        assert!(
            err.to_string()
                .contains("assistant turn 2 does not tokenize to a prefix")
                && err.to_string().contains("use --loss-on all"),
            "{err}"
        );
    }
    let tok = tokenizer(&phi);
    // One assistant turn, at the end: its span is found.
    let (seq, _) = train::tokenize(
        &tok,
        &Example::Messages(conversation[..2].to_vec(), Default::default()),
        LossOn::Assistant,
        4096,
    )
    .unwrap();
    let labelled: Vec<u32> = seq.targets.iter().flatten().copied().collect();
    assert_eq!(
        tok.decode(&labelled).unwrap(),
        "Hello!<|end|>\n<|endoftext|>"
    );
}

/// Qwen3's template keeps the reasoning of the turns after the last user query only: in an agent's
/// trace (a call with reasoning, the tool's answer, the final answer, then a new question) the turns
/// before the new question render otherwise in the whole conversation than up to them, where their
/// reasoning is still shown. Assistant-only loss finds each turn in the whole by its header and its
/// end-of-turn token: the call (its reasoning dropped, as the whole renders it), the answer, and the last
/// turn with its empty thinking block; never the question, the tool's answer or the dropped reasoning.
#[test]
fn assistant_loss_through_an_agent_trace_with_reasoning_finds_every_turn() {
    let tok = ChatTokenizer::from_files(&synth::qwen3_tokenizer(), Path::new("qwen3")).unwrap();
    let line = serde_json::json!({"messages": [
        {"role": "user", "content": "Umbrella in Paris?"},
        {"role": "assistant", "reasoning_content": "I need the weather.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "light rain"},
        {"role": "assistant", "reasoning_content": "Rain: yes.", "content": "Yes, take one."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "No need there."}
    ]})
    .to_string();
    let example = nibble::data::parse_jsonl(&line, "row").unwrap().remove(0);
    let (seq, _) = train::tokenize(&tok, &example, LossOn::Assistant, 4096).unwrap();
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for target in &seq.targets {
        if let Some(id) = target {
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(*id);
        }
        previous = target.is_some();
    }
    let text: Vec<String> = runs.iter().map(|r| tok.decode(r).unwrap()).collect();
    assert_eq!(
        text,
        [
            "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
            "Yes, take one.<|im_end|>\n",
            "<think>\n\n</think>\n\nNo need there.<|im_end|>\n",
        ]
    );
}

/// --max-length keeps an example's start or, with --truncation-mode keep_end, its end (TRL's
/// truncation_mode); an example left with no token that carries loss is left out with a warning naming
/// it, as TRL drops it; text rows' text may sit in another column (--dataset-text-field).
#[test]
fn long_examples_keep_the_end_asked_for_and_unlearnable_ones_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    let long_prompt = "Tell me about the sea, at length. ".repeat(4);
    let rows = [
        ("Q: 2+2?\nA:", " 4"),
        ("Q: 3+3?\nA:", " 6"),
        (long_prompt.as_str(), " Waves."),
    ]
    .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n");
    std::fs::write(&data, rows.concat()).unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut options = vec!["--max-steps", "1", "--max-length", "64"];
        options.extend(extra);
        let o = train_cli(&model, &data, &out, &options);
        (o, out)
    };
    let examples = |out: &Path| {
        let run: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        run["data"]["examples"].as_u64().unwrap()
    };

    let (o, out) = run("start", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 of 3 examples have no token that carries loss")
            && err.contains("example 3")
            && err.contains("left out"),
        "{err}"
    );
    assert_eq!(examples(&out), 2);

    let (o, out) = run("end", &["--truncation-mode", "keep_end"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("no token that carries loss"), "{err}");
    assert!(err.contains("the end is kept"), "{err}");
    assert_eq!(examples(&out), 3);
    let recorded = std::fs::read_to_string(out.join("nibble_config.toml")).unwrap();
    assert!(
        recorded.contains("truncation_mode = \"keep_end\""),
        "{recorded}"
    );

    // Packing packs it all the same, as TRL does.
    let (o, out) = run("packed", &["--packing"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("packed all the same"), "{err}");
    assert_eq!(examples(&out), 3);
    // Validation is held out of the examples that carry loss, whichever the seed draws.
    for seed in ["1", "2", "3", "4"] {
        let options = [
            "--packing",
            "--eval-split",
            "0.5",
            "--overwrite",
            "--seed",
            seed,
        ];
        let (o, out) = run("packed and validated", &options);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let validated = metrics(&out)
            .iter()
            .filter_map(|m| m["eval_loss"].as_f64())
            .collect::<Vec<_>>();
        assert!(
            !validated.is_empty() && validated.iter().all(|&l| l > 0.0),
            "{validated:?}"
        );
    }

    let (o, _) = run("refused", &["--truncation-mode", "keep_end", "--packing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--packing"));

    // Nothing left to learn from is an error naming the file.
    let short = ["--max-steps", "1", "--max-length", "8"];
    let o = train_cli(&model, &data, &dir.path().join("none"), &short);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("d.jsonl") && err.contains("nothing is left"),
        "{err}"
    );

    let bodies = dir.path().join("bodies.jsonl");
    std::fs::write(&bodies, "{\"body\": \"The sea is wide.\"}\n").unwrap();
    let out = dir.path().join("bodies");
    let o = train_cli(&model, &bodies, &out, &["--max-steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bodies.jsonl:1") && err.contains("`text`"),
        "{err}"
    );
    let o = train_cli(
        &model,
        &bodies,
        &out,
        &["--max-steps", "1", "--dataset-text-field", "body"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// --packing-strategy bfd_split and wrapped train on every token of examples longer than --max-length
/// (bfd cuts them, saying so); the strategy without --packing is refused.
#[test]
fn packing_strategies_keep_long_examples_whole() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..5)
        .map(|i| {
            serde_json::json!({"text": format!("{i}: {}", "waves on the sea, ".repeat(6))})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, rows).unwrap();
    let tokens = |out: &Path| -> u64 {
        metrics(out)
            .iter()
            .filter_map(|m| m["tokens"].as_u64())
            .sum()
    };
    let mut seen = Vec::new();
    for strategy in ["bfd", "bfd_split", "wrapped"] {
        let out = dir.path().join(strategy);
        let options = [
            "--packing",
            "--packing-strategy",
            strategy,
            "--max-length",
            "64",
            "--epochs",
            "1",
        ];
        let o = train_cli(&model, &data, &out, &options);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert_eq!(
            err.contains("longer than --max-length 64 and cut"),
            strategy == "bfd",
            "{strategy}: {err}"
        );
        seen.push(tokens(&out));
    }
    // Each text is about 115 bytes and its eos: bfd trains on 64 of each, the others on all.
    assert_eq!(seen[0], 5 * 64);
    assert!(seen[1] > 5 * 100 && seen[1] == seen[2], "{seen:?}");
    let o = train_cli(
        &model,
        &data,
        &dir.path().join("no"),
        &["--packing-strategy", "wrapped"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("give --packing too"));
}

/// --save-strategy epoch (transformers' save_strategy="epoch") writes a checkpoint at the end of each
/// epoch; steps needs --save-steps, which the others ignore.
#[test]
fn checkpoints_at_the_end_of_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(6)).unwrap();
    let saved = |out: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("checkpoint-"))
            .collect();
        names.sort();
        names
    };
    let epochs = ["--grad-accum", "2", "--save-strategy", "epoch"];
    let out = dir.path().join("run");
    let o = train_cli(
        &model,
        &data,
        &out,
        &[&epochs[..], &["--epochs", "2"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(saved(&out), ["checkpoint-3", "checkpoint-6"]);
    // --max-steps ending an epoch early saves there too; --save-steps is ignored, as transformers
    // ignores it, with a warning.
    let out = dir.path().join("cut short");
    let extra = ["--epochs", "2", "--max-steps", "4", "--save-steps", "2"];
    let o = train_cli(&model, &data, &out, &[&epochs[..], &extra].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("does not apply"), "{err}");
    assert_eq!(saved(&out), ["checkpoint-3", "checkpoint-4"]);
    let o = train_cli(
        &model,
        &data,
        &dir.path().join("refused"),
        &["--save-strategy", "steps"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("give N"), "{err}");
}

/// A step never reaches into the next epoch: transformers' Trainer steps on an epoch's last batches
/// however few (`_inner_training_loop`: the last update of an epoch takes the remaining batches, the
/// last batch the remaining examples), so each epoch sees each example once. 5 examples in batches of
/// 2, 2 to a step: steps of examples {0, 1, 2, 3} and {4} each epoch (not {4, 0, 1, 2} across it), and
/// a batch larger than the data is the data. The logged epoch counts batches, as transformers' does.
#[test]
fn steps_end_with_their_epoch_as_transformers_steps() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    // Each example a length of its own, so a step's tokens tell which examples it took.
    let rows: String = (0..5)
        .map(|i| serde_json::json!({"text": "ab".repeat(3 + 5 * i)}).to_string() + "\n")
        .collect();
    std::fs::write(&data, rows).unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let out = dir.path().join(name);
        let all = [&["--no-shuffle", "--lora-dropout", "0"][..], extra].concat();
        let o = train_cli(&model, &data, &out, &all);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        metrics(&out)
            .into_iter()
            .filter(|m| m["step"].is_u64())
            .collect()
    };
    let steps = run(
        "aligned",
        &["--batch-size", "2", "--grad-accum", "2", "--epochs", "2"],
    );
    let field =
        |key: &str| -> Vec<f64> { steps.iter().map(|m| m[key].as_f64().unwrap()).collect() };
    // The epoch counted in batches, as transformers logs it: 2 of the epoch's 3 after the first step.
    let epochs = field("epoch");
    let want = [2.0 / 3.0, 1.0, 1.0 + 2.0 / 3.0, 2.0];
    assert!(
        epochs.len() == 4 && epochs.iter().zip(want).all(|(e, w)| (e - w).abs() < 1e-9),
        "{epochs:?}"
    );
    let tokens = field("tokens");
    assert_eq!((tokens[0], tokens[1]), (tokens[2], tokens[3]), "{tokens:?}");
    // The last step holds the longest example alone: fewer tokens than the first's four.
    assert!(tokens[1] < tokens[0], "{tokens:?}");
    let whole = run("larger", &["--batch-size", "50", "--epochs", "2"]);
    let epochs: Vec<f64> = whole.iter().map(|m| m["epoch"].as_f64().unwrap()).collect();
    assert_eq!(epochs, [1.0, 2.0], "one step an epoch, each example once");
    assert_eq!(
        whole[0]["tokens"].as_f64().unwrap(),
        tokens[0] + tokens[1],
        "the batch is the data"
    );
}

/// A fractional --epochs (transformers' `num_train_epochs: 1.5`) runs ceil(epochs · steps per epoch)
/// steps, as transformers' Trainer counts them (in f64: 2.2 epochs of 25 steps are 56 steps there), with
/// the schedule over those steps and a checkpoint where the last, partial epoch stops.
#[test]
fn fractional_epochs_stop_within_the_last_as_transformers_counts() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    // 10 chats in micro-batches of 1, 4 to a step: 3 steps per epoch (the last of 2 chats).
    std::fs::write(&data, chats(10)).unwrap();
    for (epochs, steps) in [("0.5", 2), ("1.5", 5), ("1", 3)] {
        let out = dir.path().join(format!("run {epochs}"));
        let extra = [
            "--grad-accum",
            "4",
            "--epochs",
            epochs,
            "--save-strategy",
            "epoch",
        ];
        let o = train_cli(&model, &data, &out, &extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let logged: Vec<u64> = metrics(&out)
            .iter()
            .filter_map(|m| m["step"].as_u64())
            .collect();
        assert_eq!(logged, (1..=steps).collect::<Vec<_>>(), "--epochs {epochs}");
        // The linear schedule decays over the run's own steps: step 2 of 5 at 4/5 of the rate.
        let lr = |m: &serde_json::Value| m["lr"].as_f64().unwrap();
        let all = metrics(&out);
        let ratio = lr(&all[1]) / lr(&all[0]);
        let want = (steps - 1) as f64 / steps as f64;
        assert!(
            (ratio - want).abs() < 1e-9,
            "--epochs {epochs}: {ratio} vs {want}"
        );
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("checkpoint-{steps}")).join("run.json"))
                .unwrap_or_else(|e| panic!("--epochs {epochs}: a checkpoint where it stops: {e}")),
        )
        .unwrap();
        // Whole epochs recorded as the integers earlier runs recorded, which a resume compares.
        let recorded = &manifest["options"]["epochs"];
        match epochs {
            "1" => assert!(recorded.is_u64() && recorded == 1, "{recorded}"),
            _ => assert_eq!(recorded.as_f64(), epochs.parse().ok(), "{recorded}"),
        }
    }
    for bad in ["0", "-1", "nan"] {
        let flag = format!("--epochs={bad}");
        let o = train_cli(&model, &data, &dir.path().join("bad"), &[flag.as_str()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "--epochs {bad}: {err}");
        assert!(err.contains("--epochs"), "--epochs {bad}: {err}");
    }
    assert_eq!(
        train::epoch_steps(2.2, 25),
        56,
        "Python: math.ceil(2.2 * 25) == 56"
    );
    assert_eq!(train::epoch_steps(2.0, 10), 20);
}

/// --data given twice (TRL's mixture of datasets): the files are one dataset, read one after the
/// other; the run's record lists both, and runs again from it loss for loss; a bad row names its file.
#[test]
fn several_data_files_are_one_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    std::fs::write(&a, chats(3)).unwrap();
    std::fs::write(&b, chats(5)).unwrap();
    let out = dir.path().join("run");
    let two = ["--data", b.to_str().unwrap(), "--grad-accum", "4"];
    let o = train_cli(&model, &a, &out, &two);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // 8 examples, 4 to a step: 2 steps (one file alone would make 1 or 2 of fewer examples).
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2]);
    let record = std::fs::read_to_string(out.join("nibble_config.toml")).unwrap();
    let table: toml::Table = toml::from_str(&record).unwrap();
    let listed: Vec<&str> = table["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    assert_eq!(listed, [canonical(&a), canonical(&b)]);
    let again = dir.path().join("again");
    let o = nibble(&[
        "train",
        "--config",
        out.join("nibble_config.toml").to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let losses = |dir: &Path| -> Vec<f64> {
        metrics(dir)
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect()
    };
    assert_eq!(losses(&out), losses(&again));
    // Only the first file: fewer examples, other losses.
    let one = dir.path().join("one");
    let o = train_cli(&model, &a, &one, &["--grad-accum", "4"]);
    assert!(o.status.success());
    assert_ne!(losses(&one), losses(&out));
    std::fs::write(&b, format!("{}{{\"messages\": 3}}\n", chats(1))).unwrap();
    let o = train_cli(&model, &a, &dir.path().join("bad"), &two);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("b.jsonl") && err.contains('2'), "{err}");
}

/// The names transformers and TRL give options answer too, as flags in their spelling (TRL's command
/// line: underscores) and as keys of an options file; the run records nibble's names.
#[test]
fn options_answer_to_trl_and_transformers_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(4)).unwrap();
    let recorded = |out: &Path| std::fs::read_to_string(out.join("nibble_config.toml")).unwrap();
    let expect = [
        "lr = 0.003",
        "epochs = 1",
        "grad_accum = 2",
        "lora_r = 4",
        "lr_scheduler = \"cosine\"",
        "max_length = 200",
    ];
    let out = dir.path().join("flags");
    let o = nibble(&[
        "train",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--dataset_name",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--device=cpu",
        "--learning_rate=3e-3",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--lora_r",
        "4",
        "--lr_scheduler_type",
        "cosine",
        "--max_seq_length",
        "200",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for line in expect {
        assert!(recorded(&out).contains(line), "{line}: {}", recorded(&out));
    }
    let file = dir.path().join("trl.toml");
    let keys = "learning_rate = 3e-3\nnum_train_epochs = 1\ngradient_accumulation_steps = 2\n\
                lora_r = 4\nlr_scheduler_type = \"cosine\"\nmax_seq_length = 200\n";
    std::fs::write(&file, keys).unwrap();
    let out = dir.path().join("file");
    let o = train_cli(&model, &data, &out, &["--config", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for line in expect {
        assert!(recorded(&out).contains(line), "{line}: {}", recorded(&out));
    }
}

#[test]
fn warmup_ratio_rounds_up_as_transformers_does() {
    let dir = tempfile::tempdir().unwrap();
    byte_model(dir.path());
    let source = ModelSource::open(dir.path()).unwrap();
    let tok = ChatTokenizer::from_files(&source.tokenizer, dir.path()).unwrap();
    let model = source.load(None).unwrap();
    let sequences = nibble::data::parse_jsonl(&chats(10), "chats")
        .unwrap()
        .iter()
        .map(|e| train::tokenize(&tok, e, LossOn::Default, 256).unwrap().0)
        .collect();
    let config = TrainConfig {
        lr: 1e-3,
        schedule: Schedule::Linear,
        warmup_ratio: 0.25,
        max_steps: Some(10),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, config, sequences, None).unwrap();
    assert_eq!(trainer.warmup_steps(), 3, "ceil(0.25 · 10)");
    let lrs: Vec<f64> = (0..4).map(|_| trainer.step().unwrap().lr).collect();
    let expected = [0.0, 1e-3 / 3.0, 2e-3 / 3.0, 1e-3];
    for (got, want) in lrs.iter().zip(expected) {
        assert!((got - want).abs() < 1e-12, "{lrs:?}");
    }
    // transformers 5's warmup_steps: below 1 a fraction of the steps, from 1 up whole steps (rounded
    // down); it wins over a ratio also given; a negative one is refused by name.
    let warmup = |options: &str| {
        nibble::train::settings::TrainSettings::parse_json(options)
            .and_then(|s| s.train_config())
            .map(|c| c.warmup_for(10))
    };
    assert_eq!(warmup(r#"{"warmup_steps": 0.25}"#).unwrap(), 3);
    assert_eq!(warmup(r#"{"warmup_steps": 2.7}"#).unwrap(), 2);
    assert_eq!(
        warmup(r#"{"warmup_steps": 4, "warmup_ratio": 0.5}"#).unwrap(),
        4
    );
    assert_eq!(
        warmup(r#"{"warmup_steps": 0, "warmup_ratio": 0.5}"#).unwrap(),
        5
    );
    let e = warmup(r#"{"warmup_steps": -1}"#).unwrap_err().to_string();
    assert!(e.contains("--warmup-steps"), "{e}");
}

#[test]
fn validation_loss_is_logged_and_an_initial_adapter_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(10)).unwrap();
    let first = dir.path().join("first");
    let o = train_cli(
        &model,
        &data,
        &first,
        &[
            "--max-steps",
            "4",
            "--packing",
            "--max-length",
            "400",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--target-modules",
            "q_proj,v_proj",
            "--eval-split",
            "0.2",
            "--eval-steps",
            "2",
            "--lr",
            "1e-2",
            "--loss-on",
            "assistant",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&first);
    let evals: Vec<&serde_json::Value> =
        m.iter().filter(|v| v.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2, "evaluations at steps 2 and 4: {m:?}");
    assert_eq!(evals[1]["step"], 4);
    assert_eq!(evals[0]["eval_tokens"], evals[1]["eval_tokens"]);
    let steps = m.iter().filter(|v| v.get("loss").is_some()).count();
    assert_eq!(steps, 4);
    // Packed: each step's one sequence holds several ~100-token examples.
    assert!(m[0]["tokens"].as_u64().unwrap() > 250, "{:?}", m[0]);
    // The loss curve: a PNG with both the training line and the validation points drawn.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(first.join("loss_curve.png")).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(
        (info.width, info.height, info.color_type),
        (800, 450, png::ColorType::Rgb)
    );
    let count = |color: [u8; 3]| pixels.chunks(3).filter(|p| *p == color).count();
    assert!(count(nibble::plot::TRAIN_COLOR) > 100, "no training curve");
    assert!(count(nibble::plot::EVAL_COLOR) > 40, "no validation points");
    // The validation loss of the final adapter is what `nibble eval` would report on those examples
    // with assistant-only labels; here: it is finite and changed while training at lr 1e-2.
    let (a, b) = (
        evals[0]["eval_loss"].as_f64().unwrap(),
        evals[1]["eval_loss"].as_f64().unwrap(),
    );
    assert!(a.is_finite() && b.is_finite() && a != b, "{a} {b}");

    // Starting from that adapter with lr 0 keeps it exactly, with its own r, alpha and targets.
    let second = dir.path().join("second");
    let o = train_cli(
        &model,
        &data,
        &second,
        &[
            "--max-steps",
            "2",
            "--lora-r",
            "16",
            "--lr",
            "0",
            "--init-adapter",
            first.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // --lora-r 16 does not apply, and the run says so.
    assert!(
        err.contains("training the adapter's own r 4, alpha 8 on q_proj, v_proj")
            && err.contains("not the options' r 16"),
        "{err}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(second.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(
        std::fs::read(first.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(second.join("adapter_model.safetensors")).unwrap(),
        "lr 0 must leave the initial adapter unchanged"
    );
    // The same modules named otherwise are the same run, and options that asked for no shape are
    // no cause for a warning (train_cli shows warnings only).
    let shape = [
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--target-modules",
        "self_attn.v_proj,self_attn.q_proj",
    ];
    for (name, asked) in [("same", &shape[..]), ("unasked", &[][..])] {
        let mut flags = vec![
            "--max-steps",
            "1",
            "--init-adapter",
            first.to_str().unwrap(),
        ];
        flags.extend_from_slice(asked);
        let o = train_cli(&model, &data, &dir.path().join(name), &flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !err.contains("adapter's own"),
            "{name}: {err}"
        );
    }

    // A GPU's memory cap on a CPU run does nothing, and says so.
    let flags = ["--max-steps", "1", "--device", "cpu", "--gpu-memory", "1GB"];
    let o = train_cli(&model, &data, &dir.path().join("capped"), &flags);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("--gpu-memory caps a GPU's memory"),
        "{err}"
    );

    // An adapter whose shapes do not fit the model is refused, naming it.
    let other = dir.path().join("other");
    let mut wider = SynthSpec::tiny(Arch::Qwen2, 259);
    wider.hidden_size = 128;
    synth::write_model_folder(&other, &wider, Some(&synth::byte_tokenizer())).unwrap();
    let o = train_cli(
        &other,
        &data,
        &dir.path().join("third"),
        &[
            "--max-steps",
            "1",
            "--init-adapter",
            first.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--init-adapter") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(4)).unwrap();
    let out = dir.path().join("run");
    // An absurd learning rate sends the weights to infinity after the first update.
    let o = train_cli(
        &model,
        &data,
        &out,
        &[
            "--max-steps",
            "4",
            "--lr",
            "1e38",
            "--save-steps",
            "1",
            "--lr-scheduler",
            "constant",
            "--max-grad-norm",
            "0",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("at step 2") && err.contains("checkpoint-1"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        out.join("checkpoint-1")
            .join("adapter_model.safetensors")
            .is_file()
    );
    assert!(!out.join("checkpoint-2").exists());
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "no adapter from a diverged run"
    );
}

/// Trains an adapter on `data` (one chat of `chats(1)`) until the model answers it word for word.
fn memorise(model: &Path, data: &Path, out: &Path) {
    let o = train_cli(model, data, out, &memorising("60"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Options under which the tiny byte model learns a one-chat dataset by heart in `steps` steps.
fn memorising(steps: &'static str) -> Vec<&'static str> {
    vec![
        "--max-steps",
        steps,
        "--lr",
        "1e-2",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0",
        "--lr-scheduler",
        "constant",
        "--loss-on",
        "assistant",
    ]
}

/// `nibble merge` of `adapter` into `model`, written to `output`, as it ends.
fn try_merge(model: &Path, adapter: &Path, output: &Path) -> std::process::Output {
    nibble(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ])
}

/// `nibble merge` of `adapter` into `model`, written to `output`.
fn merge(model: &Path, adapter: &Path, output: &Path) {
    let o = try_merge(model, adapter, output);
    assert!(
        o.status.success(),
        "{}: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `nibble generate`'s greedy answer to the first chat's question.
fn ask_question_0(model: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--system",
        "Be brief.",
        "--prompt",
        "Question 0?",
        "--max-new-tokens",
        "30",
    ];
    args.extend_from_slice(extra);
    let o = nibble(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

/// A model taught a function call in the context of its tools (a dataset row's `tools`) makes that
/// call when `generate --tools` renders the same tools into the prompt; bad tools files and keywords are
/// named.
#[test]
fn generate_with_tools_makes_the_call_it_was_taught() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let row = serde_json::json!({"tools": tools, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]});
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, format!("{row}\n")).unwrap();
    let out = dir.path().join("run");
    memorise(&model, &data, &out);
    let tools_file = dir.path().join("tools.json");
    std::fs::write(&tools_file, tools.to_string()).unwrap();
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--prompt",
            "Weather?",
            "--max-new-tokens",
            "80",
        ];
        args.extend_from_slice(extra);
        // At level info: the generation log counts the prompt's tokens.
        common::nibble_command()
            .args(&args)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    };
    let o = ask(&["--tools", tools_file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end(),
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
    );
    let fed = |o: &std::process::Output| {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let at = err.find(" prompt tokens fed").expect("the generation log");
        let digits: String = err[..at]
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .chars()
            .rev()
            .collect::<String>()
            .parse::<usize>()
            .unwrap()
    };
    let without = ask(&[]);
    assert!(
        fed(&without) + 200 < fed(&o),
        "the tools are rendered into the prompt"
    );

    std::fs::write(&tools_file, "{\"name\": \"f\"}").unwrap();
    let o = ask(&["--tools", tools_file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tools.json: expected a list of function schemas"),
        "{err}"
    );
    let o = ask(&["--chat-template-kwargs", "enable_thinking"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--chat-template-kwargs must be a JSON object")
    );
}

/// A base model without a chat template trains on conversations through `--chat-template` (here one
/// with `{% generation %}` blocks, which --loss-on assistant follows); the adapter folder keeps the
/// template, so that generate, eval and a merged model chat through it with no flag.
#[test]
fn a_chat_template_of_ones_own_trains_a_base_model_and_travels_with_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("base");
    byte_model(&model);
    let config = model.join("tokenizer_config.json");
    let mut tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    tokenizer_config
        .as_object_mut()
        .unwrap()
        .remove("chat_template");
    std::fs::write(&config, tokenizer_config.to_string()).unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(1)).unwrap();
    let out = dir.path().join("run");

    let o = train_cli(&model, &data, &out, &memorising("60"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("has no chat template") && err.contains("--chat-template"),
        "{err}"
    );

    let template_file = dir.path().join("turns.jinja");
    let template = concat!(
        "{%- for m in messages %}\n",
        "{%- if m.role == 'assistant' %}A: {% generation %}{{ m.content }}<|endoftext|>{% endgeneration %}\n",
        "{% else %}{{ m.role[0] | upper }}: {{ m.content }}\n",
        "{% endif %}{% endfor %}\n",
        "{%- if add_generation_prompt %}A: {% endif %}",
    );
    std::fs::write(&template_file, template).unwrap();
    let template_flag = ["--chat-template", template_file.to_str().unwrap()];
    let show = nibble(&[
        "data",
        data.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--loss-on",
        "assistant",
        template_flag[0],
        template_flag[1],
    ]);
    assert!(show.status.success());
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("A: ⟦Answer 0.<|endoftext|>⟧"),
        "{}",
        String::from_utf8_lossy(&show.stdout)
    );

    let mut options = memorising("60");
    options.extend(template_flag);
    let o = train_cli(&model, &data, &out, &options);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
        template
    );
    let recorded = std::fs::read_to_string(out.join("nibble_config.toml")).unwrap();
    assert!(recorded.contains("chat_template = "), "{recorded}");
    // The folder holds only what a run writes: --overwrite replaces it.
    let mut again = options.clone();
    again.push("--overwrite");
    let o = train_cli(&model, &data, &out, &again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    assert_eq!(
        ask_question_0(&model, &["--adapter", out.to_str().unwrap()]),
        "Answer 0.",
        "the adapter's template renders the prompt, and its end-of-turn token stops the answer"
    );
    let o = nibble(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Question 0?",
    ]);
    assert_eq!(o.status.code(), Some(1), "no template without the adapter");
    let merged = dir.path().join("merged");
    merge(&model, &out, &merged);
    assert_eq!(
        std::fs::read_to_string(merged.join("chat_template.jinja")).unwrap(),
        template
    );
    // The template's end of turn (<|endoftext|>, 256) ends generation in transformers too.
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let eos = generation["eos_token_id"].as_array().unwrap();
    assert_eq!(eos.last(), Some(&serde_json::json!(256)), "{generation}");
    // The model had no generation_config.json: the new one starts from config.json's ids.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        eos[..eos.len() - 1],
        [config["eos_token_id"].clone()],
        "{generation}"
    );
    assert_eq!(ask_question_0(&merged, &[]), "Answer 0.");
    std::fs::write(model.join("generation_config.json"), "[]").unwrap();
    let o = try_merge(&model, &out, &dir.path().join("merged2"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}: not a JSON object",
            model.join("generation_config.json").display()
        )),
        "{err}"
    );
    assert!(!dir.path().join("merged2").exists());
    std::fs::remove_file(model.join("generation_config.json")).unwrap();

    // A block that leaves the end of the turn out: the model would never learn to stop; said.
    let open_ended = dir.path().join("open.jinja");
    std::fs::write(
        &open_ended,
        template.replace(
            "<|endoftext|>{% endgeneration %}",
            "{% endgeneration %}<|endoftext|>",
        ),
    )
    .unwrap();
    let warning_of_one_step = |template: &Path, run: &str| {
        let flags = ["--chat-template", template.to_str().unwrap()];
        let mut flags = flags.to_vec();
        flags.extend(["--loss-on", "assistant", "--max-steps", "1"]);
        let o = train_cli(&model, &data, &dir.path().join(run), &flags);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).contains("may not learn to stop")
    };
    assert!(warning_of_one_step(&open_ended, "run3"));
    assert!(!warning_of_one_step(&template_file, "run4"));

    let missing = dir.path().join("missing.jinja");
    let o = train_cli(
        &model,
        &data,
        &dir.path().join("run2"),
        &["--chat-template", missing.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.jinja"));
    assert!(!dir.path().join("run2").exists());
}

/// An adapter trained with --eos-token (TRL's eos_token) ends text there when loaded again: `generate
/// --adapter` stops at that token (its nibble_config.toml records it, as a TRL adapter's saved
/// tokenizer_config.json does), and `merge` makes it the merged folder's eos (tokenizer_config.json's
/// `eos_token`, the first of generation_config.json's `eos_token_id`), as TRL's SFTTrainer sets them.
#[test]
fn the_eos_token_an_adapter_was_trained_with_ends_its_text_again() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"The sea is wide and deep\"}\n").unwrap();
    let out = dir.path().join("run");
    // <|im_start|> (id 257): a token of the vocabulary that nothing stops at unless told.
    let mut options = memorising("60");
    options.retain(|o| !["--loss-on", "assistant"].contains(o));
    options.extend(["--eos-token", "<|im_start|>", "--save-steps", "30"]);
    let o = train_cli(&model, &data, &out, &options);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let continue_with = |adapter: &Path| {
        let o = nibble(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--raw",
            "--prompt",
            "The sea",
            "--max-new-tokens",
            "40",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim_end().to_string()
    };
    assert_eq!(
        continue_with(&out),
        " is wide and deep",
        "stopped at <|im_start|>"
    );
    // The tokenizer beside the adapter, as TRL's Trainer saves it: the model's, with the eos the
    // data ended with (in each checkpoint too).
    let read = |path: &Path| std::fs::read_to_string(path).unwrap();
    for folder in [out.clone(), out.join("checkpoint-30")] {
        assert_eq!(
            read(&folder.join("tokenizer.json")),
            read(&model.join("tokenizer.json"))
        );
        let saved: serde_json::Value =
            serde_json::from_str(&read(&folder.join("tokenizer_config.json"))).unwrap();
        let own: serde_json::Value =
            serde_json::from_str(&read(&model.join("tokenizer_config.json"))).unwrap();
        assert_eq!(saved["eos_token"], "<|im_start|>");
        assert_eq!(saved["chat_template"], own["chat_template"]);
    }
    // The adapter's two PEFT files alone, in a folder of their own.
    let adapter_only = |name: &str| {
        let folder = dir.path().join(name);
        std::fs::create_dir(&folder).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(out.join(file), folder.join(file)).unwrap();
        }
        folder
    };
    // The same adapter without the record: nothing says where its text ends.
    let bare = adapter_only("bare");
    let unstopped = continue_with(&bare);
    assert!(
        unstopped.starts_with(" is wide and deep") && unstopped != " is wide and deep",
        "{unstopped:?}"
    );
    // As TRL saves it: a tokenizer_config.json beside the adapter.
    let trl = adapter_only("trl");
    std::fs::write(
        trl.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|im_start|>", "special": true}}"#,
    )
    .unwrap();
    assert_eq!(continue_with(&trl), " is wide and deep");

    let merged = dir.path().join("merged");
    merge(&model, &out, &merged);
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(merged.join(name)).unwrap()).unwrap()
    };
    assert_eq!(json("tokenizer_config.json")["eos_token"], "<|im_start|>");
    let ids = json("generation_config.json")["eos_token_id"].clone();
    assert_eq!(ids[0], 257, "{ids}");
    assert_eq!(json("config.json")["eos_token_id"], 257);
    // A token the tokenizer lacks is an error naming the file that names it.
    std::fs::write(
        trl.join("tokenizer_config.json"),
        r#"{"eos_token": "<|no such token|>"}"#,
    )
    .unwrap();
    let o = nibble(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        trl.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tokenizer_config.json") && err.contains("no such token"),
        "{err}"
    );
}

#[test]
fn generate_answers_with_what_the_adapter_learned_and_chat_keeps_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(1)).unwrap();
    let out = dir.path().join("run");
    memorise(&model, &data, &out);
    let ask = |adapter: bool| match adapter {
        true => ask_question_0(&model, &["--adapter", out.to_str().unwrap()]),
        false => ask_question_0(&model, &[]),
    };
    assert_eq!(
        ask(true),
        "Answer 0.",
        "the memorised answer, stopped at <|im_end|>"
    );
    assert_ne!(ask(false), "Answer 0.");

    // Two turns on stdin; each answer is printed on its own line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--system",
            "Be brief.",
            "--max-new-tokens",
            "30",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Question 0?\nQuestion 0?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], "Answer 0.");
}

/// Each turn of a chat samples from a stream of its own: the same question asked again after /reset
/// is answered anew, and the same --seed replays the whole conversation.
#[test]
fn chat_turns_sample_anew_and_a_seed_replays_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let talk = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(["chat", "--model", model.to_str().unwrap()])
            .args([
                "--temperature",
                "1",
                "--seed",
                "3",
                "--max-new-tokens",
                "24",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"Question 0?\n/reset\nQuestion 0?\n")
            .unwrap();
        drop(stdin);
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let first = talk();
    // Two answers of 24 tokens drawn at temperature 1 from a random model's 259-token vocabulary.
    let answers: Vec<&str> = first.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers.len() >= 2, "{first:?}");
    assert_ne!(answers[0], answers[answers.len() - 1], "{first:?}");
    assert_eq!(talk(), first);
}

#[test]
fn lora_targets_are_module_paths_as_peft_matches_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(4)).unwrap();
    let out = dir.path().join("out");
    let targets = "model.layers.1.mlp.down_proj,q_proj";
    let o = train_cli(
        &model,
        &data,
        &out,
        &["--max-steps", "1", "--target-modules", targets],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights =
        nibble::source::SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<&String> = weights.tensor_names().collect();
    names.sort();
    let layers = nibble::config::ModelConfig::from_file(&model.join("config.json"))
        .unwrap()
        .num_layers;
    let mut expected: Vec<String> = (0..layers)
        .map(|l| format!("model.layers.{l}.self_attn.q_proj"))
        .chain(["model.layers.1.mlp.down_proj".to_string()])
        .flat_map(|p| ["lora_A", "lora_B"].map(|w| nibble::lora::peft_key(&p, w)))
        .collect();
    expected.sort();
    assert_eq!(names, expected.iter().collect::<Vec<_>>());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["model.layers.1.mlp.down_proj", "q_proj"])
    );
    // The folder loads back with the same targets (eval reads it as PEFT would).
    let o = eval_cli(&model, &data, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// PEFT's rank_pattern and alpha_pattern (regular expressions over module paths; the first that
/// matches a path's end after a dot wins): the rank and scale of every module of the qwen2 fixture
/// model, for three sets of patterns (names, dotted paths, alternations, overlapping entries, names
/// that only look alike) with and without rsLoRA, as PEFT gives them
/// (tests/fixtures/hf_train/qwen2/rank_pattern/resolution.json, scripts/make_rank_pattern_fixture.py).
#[test]
fn rank_and_alpha_patterns_name_the_modules_peft_names() {
    use nibble::lora::{LoraAdapter, LoraConfig, Patterns};
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_train/qwen2");
    let model = nibble::config::ModelConfig::from_file(&f.join("model/config.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f.join("rank_pattern/resolution.json")).unwrap(),
    )
    .unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: case["use_rslora"].as_bool().unwrap(),
            use_dora: false,
            targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            target_parameters: Vec::new(),
            rank_pattern: Patterns::from_json(&case["rank_pattern"], "a rank").unwrap(),
            alpha_pattern: Patterns::from_json(&case["alpha_pattern"], "a number").unwrap(),
        };
        let adapter =
            LoraAdapter::init(&model, config.clone(), &mut nibble::rng::Rng::new(1)).unwrap();
        let modules = case["modules"].as_object().unwrap();
        assert_eq!(adapter.pairs().count(), modules.len());
        for (path, pair) in adapter.pairs() {
            let peft = &modules[path];
            let (rank, scaling) = (
                peft["rank"].as_u64().unwrap() as usize,
                peft["scaling"].as_f64().unwrap(),
            );
            assert_eq!(pair.rank, rank, "{path} in {case}");
            assert_eq!(pair.a.len(), rank * pair.in_features, "{path}");
            assert_eq!(pair.b.len(), rank * pair.out_features, "{path}");
            let ours = config.scale_of(path) as f64;
            assert!(
                (ours - scaling).abs() <= 1e-6 * scaling,
                "{path} in {case}: scale {ours} vs PEFT's {scaling}"
            );
        }
    }
}

/// `--lora-rank-pattern` and `--lora-alpha-pattern` (PEFT's rank_pattern and alpha_pattern) from the
/// command line or an options file: the adapter's matrices take each module's rank, adapter_config.json
/// carries the patterns in the order given (PEFT loads them so), run.json records them so that a resume
/// with others is refused, eval loads the folder, and a pattern that is no regular expression, a
/// rank of 0, or a list in place of an object is an error naming the option.
#[test]
fn per_module_ranks_and_alphas_from_the_command_line() {
    let (dir, model, data) = model_and_chats();
    let out = dir.path().join("out");
    let ranks = r#"{"q_proj": 2, "layers\\.1\\.mlp\\.down_proj": 6}"#;
    let alphas = r#"{"o_proj": 3, "layers\\.0\\..*": 12.5}"#;
    let o = train_cli(
        &model,
        &data,
        &out,
        &[
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--lora-rank-pattern",
            ranks,
            "--lora_alpha_pattern",
            alphas,
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let weights =
        nibble::source::SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let rank_of = |path: &str| {
        weights
            .info(&nibble::lora::peft_key(path, "lora_A"))
            .unwrap()
            .shape[0]
    };
    assert_eq!(rank_of("model.layers.0.self_attn.q_proj"), 2);
    assert_eq!(rank_of("model.layers.1.self_attn.q_proj"), 2);
    assert_eq!(rank_of("model.layers.1.mlp.down_proj"), 6);
    assert_eq!(rank_of("model.layers.0.mlp.down_proj"), 8);
    assert_eq!(rank_of("model.layers.0.self_attn.o_proj"), 8);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let ordered = |v: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert_eq!(
        ordered(&config["rank_pattern"]),
        ordered(&serde_json::json!({"q_proj": 2, "layers\\.1\\.mlp\\.down_proj": 6}))
    );
    assert_eq!(
        ordered(&config["alpha_pattern"]),
        ordered(&serde_json::json!({"o_proj": 3.0, "layers\\.0\\..*": 12.5}))
    );
    let o = eval_cli(&model, &data, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The same run from an options file, its patterns as tables: the run it records is the one above.
    let options = dir.path().join("run.toml");
    std::fs::write(
        &options,
        "max_steps = 2\nsave_steps = 1\n[lora_rank_pattern]\nq_proj = 2\n\"layers\\\\.1\\\\.mlp\\\\.down_proj\" = 6\n\
         [alpha_pattern]\no_proj = 3\n\"layers\\\\.0\\\\..*\" = 12.5\n",
    )
    .unwrap();
    let again = dir.path().join("again");
    let o = train_cli(
        &model,
        &data,
        &again,
        &["--config", options.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).unwrap()).unwrap()
    };
    // As text: objects compare without their order, which the patterns' order matters to.
    assert_eq!(
        run(&out)["options"].to_string(),
        run(&again)["options"].to_string()
    );
    let same = std::fs::read(out.join("adapter_model.safetensors")).unwrap()
        == std::fs::read(again.join("adapter_model.safetensors")).unwrap();
    assert!(same, "the options file's run trained another adapter");

    // A resume with the same patterns goes on; with others (or the same in another order, which
    // decides where two name one module) it is another run.
    let checkpoint = out.join("checkpoint-1");
    let resume = |to: &str, ranks: &str, alphas: &str| {
        let to = dir.path().join(to);
        let flags = [
            "--max-steps",
            "2",
            "--save-steps",
            "1",
            "--resume",
            checkpoint.to_str().unwrap(),
        ];
        let mut flags = flags.to_vec();
        flags.extend(["--lora-rank-pattern", ranks, "--lora-alpha-pattern", alphas]);
        train_cli(&model, &data, &to, &flags)
    };
    let o = resume("resumed", ranks, alphas);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = resume("other", r#"{"q_proj": 3}"#, alphas);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("rank_pattern"), "{err}");
    let reordered = r#"{"layers\\.0\\..*": 12.5, "o_proj": 3}"#;
    let o = resume("reordered", ranks, reordered);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("alpha_pattern"),
        "{err}"
    );

    for (flag, value, says) in [
        (
            "--lora-rank-pattern",
            r#"{"q_proj(": 2}"#,
            "is not a regular expression",
        ),
        (
            "--lora-rank-pattern",
            r#"{"q_proj": 0}"#,
            "ranks must be from 1 to 65536",
        ),
        ("--lora-rank-pattern", r#"["q_proj"]"#, "must be an object"),
        (
            "--lora-alpha-pattern",
            r#"{"q_proj": "big"}"#,
            "expected a number",
        ),
        (
            "--lora-alpha-pattern",
            r#"{"q_proj": -16}"#,
            "alphas must be finite numbers > 0",
        ),
        (
            "--lora-alpha-pattern",
            r#"{"q_proj": 0}"#,
            "alphas must be finite numbers > 0",
        ),
    ] {
        let o = train_cli(&model, &data, &dir.path().join("bad"), &[flag, value]);
        assert!(!o.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(flag) && err.contains(says),
            "{flag} {value}: {err}"
        );
        assert!(!dir.path().join("bad").exists());
    }
}

/// `--use-dora` (PEFT's use_dora) from the command line: the folder holds each linear's magnitude as
/// PEFT names it and says use_dora; checkpoints keep the magnitudes' AdamW moments, so that a run
/// resumed from one ends where the uninterrupted run ends, bit for bit; run.json records DoRA, so that a
/// resume without it is refused; eval and generate load the folder.
#[test]
fn dora_trains_resumes_and_loads_from_the_command_line() {
    let (dir, model, data) = model_and_chats();
    let out = dir.path().join("out");
    let flags = ["--max-steps", "3", "--save-steps", "1", "--use-dora"];
    let o = train_cli(&model, &data, &out, &flags);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    let weights =
        nibble::source::SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let magnitude = "base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector";
    let down = weights.info(magnitude).unwrap().shape.clone();
    let b = nibble::lora::peft_key("model.layers.0.mlp.down_proj", "lora_B");
    assert_eq!(down, vec![weights.info(&b).unwrap().shape[0]]);
    let magnitudes = weights
        .tensor_names()
        .filter(|n| n.ends_with(".lora_magnitude_vector"))
        .count();
    let layers = nibble::config::ModelConfig::from_file(&model.join("config.json"))
        .unwrap()
        .num_layers;
    assert_eq!(magnitudes, 7 * layers);
    let optimizer = nibble::source::SafetensorsFile::open(
        &out.join("checkpoint-1").join("optimizer.safetensors"),
    )
    .unwrap();
    assert!(optimizer.info(&format!("v.{magnitude}")).is_some());

    let resumed = dir.path().join("resumed");
    let checkpoint = out.join("checkpoint-1");
    let mut again = flags.to_vec();
    again.extend(["--resume", checkpoint.to_str().unwrap()]);
    let o = train_cli(&model, &data, &resumed, &again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let same = std::fs::read(out.join("adapter_model.safetensors")).unwrap()
        == std::fs::read(resumed.join("adapter_model.safetensors")).unwrap();
    assert!(
        same,
        "a resumed DoRA run ends where the uninterrupted one does"
    );
    let o = train_cli(
        &model,
        &data,
        &dir.path().join("plain"),
        &[
            "--max-steps",
            "3",
            "--save-steps",
            "1",
            "--resume",
            checkpoint.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("use_dora"), "{err}");

    for command in [
        vec!["eval", "--data", data.to_str().unwrap()],
        vec!["generate", "--prompt", "hello", "--max-new-tokens", "4"],
    ] {
        let mut args = command.clone();
        args.extend([
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let o = common::nibble(&args);
        assert!(
            o.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// DoRA folders that do not fit are refused naming what is wrong (a magnitude where the config does
/// not say use_dora, use_dora without magnitudes, a magnitude of the wrong length), and a plain LoRA
/// adapter given as --init-adapter with --use-dora starts DoRA where it is: its magnitudes the rows'
/// norms with its update, so that the first step's loss is the plain adapter's. Patterns other than
/// an initial adapter's are refused.
#[test]
fn dora_folders_are_checked_and_a_lora_adapter_starts_dora() {
    let (dir, model, data) = model_and_chats();
    let train = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut flags = vec!["--max-steps", "2", "--lora-dropout", "0"];
        flags.extend(extra);
        let o = train_cli(&model, &data, &out, &flags);
        (o, out)
    };
    let (o, plain) = train("plain", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, dora) = train("dora", &["--use-dora"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let eval = |adapter: &Path| eval_cli(&model, &data, adapter);
    let with_config = |from: &Path, name: &str, use_dora: bool| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        std::fs::copy(
            from.join("adapter_model.safetensors"),
            to.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(from.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        config["use_dora"] = use_dora.into();
        std::fs::write(to.join("adapter_config.json"), config.to_string()).unwrap();
        to
    };
    for (folder, says) in [
        (
            with_config(&dora, "not_said", false),
            "does not say use_dora",
        ),
        (
            with_config(&plain, "no_magnitudes", true),
            "lora_magnitude_vector",
        ),
    ] {
        let o = eval(&folder);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{err}");
    }
    // One magnitude a value short, the rest as trained.
    let short_dir = with_config(&dora, "short", true);
    let mut tensors = common::read_f32_tensors(&dora.join("adapter_model.safetensors"));
    let cut = tensors
        .iter_mut()
        .find(|(n, ..)| n.ends_with(".lora_magnitude_vector"))
        .unwrap();
    cut.2.pop();
    cut.1 = vec![cut.2.len()];
    common::write_f32_tensors(&short_dir.join("adapter_model.safetensors"), &tensors);
    let o = eval(&short_dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("lora_magnitude_vector") && err.contains("shape"),
        "{err}"
    );

    let (o, as_lora) = train("as_lora", &["--init-adapter", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, as_dora) = train(
        "as_dora",
        &["--init-adapter", plain.to_str().unwrap(), "--use-dora"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first_loss = |out: &Path| metrics(out)[0]["loss"].as_f64().unwrap();
    let (a, b) = (first_loss(&as_lora), first_loss(&as_dora));
    assert!(
        (a - b).abs() < 1e-6 * a,
        "DoRA from a LoRA adapter starts where it is: {a} vs {b}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(as_dora.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["use_dora"], true);
    let (o, _) = train(
        "other_ranks",
        &[
            "--init-adapter",
            plain.to_str().unwrap(),
            "--lora-rank-pattern",
            r#"{"q_proj": 2}"#,
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--lora-rank-pattern"),
        "{err}"
    );
}

/// `--bf16-checkpoints`: a run trains with checkpointing whose layer inputs are kept in bf16; its
/// first loss (before any update) is the exact one, its later ones near; `--offload-checkpoints`
/// gives the same losses (CPU, and GPU against the GPU's bf16 ones); run.json records it, so a
/// resume that leaves checkpointing to nibble keeps it and one that asks for f32 checkpoints is
/// refused by name.
#[test]
fn bf16_checkpoints_train_and_are_recorded_in_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(6)).unwrap();
    // f32 products everywhere: on CPUs with AVX512-BF16 the default precision rounds the products'
    // operands to bf16, and the GPU's losses are compared with the CPU's below.
    let base = [
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--lr",
        "1e-2",
        "--precision",
        "f32",
    ];
    let run = |out: &Path, extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = train_cli(&model, &data, out, &args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        metrics(out)
            .iter()
            .filter_map(|m| m["loss"].as_f64())
            .collect::<Vec<f64>>()
    };
    let (exact, rounded) = (dir.path().join("exact"), dir.path().join("bf16"));
    let exact_losses = run(&exact, &["--gradient-checkpointing"]);
    let rounded_losses = run(&rounded, &["--bf16-checkpoints"]);
    assert_eq!(exact_losses.len(), 3);
    assert_eq!(exact_losses[0], rounded_losses[0]);
    for (a, b) in exact_losses.iter().zip(&rounded_losses) {
        assert!((a - b).abs() < 1e-3 * a.abs(), "{a} vs {b}");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rounded.join("run.json")).unwrap()).unwrap();
    assert_eq!(manifest["options"]["bf16_checkpoints"], true);
    // Offloaded checkpoints are the bf16 ones in host memory: the same numbers on the CPU executor
    // and, against bf16 checkpoints on the device, on the GPU executor.
    let offloaded = run(&dir.path().join("offloaded"), &["--offload-checkpoints"]);
    assert_eq!(offloaded, rounded_losses);
    if common::gpu().is_some() {
        let on_gpu = |name: &str, flag: &str| {
            let out = dir.path().join(name);
            let losses = run(&out, &[flag, "--device", "gpu"]);
            let text = std::fs::read_to_string(out.join("run.json")).unwrap();
            let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(manifest["options"]["bf16_checkpoints"], true);
            losses
        };
        let on_device = on_gpu("gpu-bf16", "--bf16-checkpoints");
        assert_eq!(on_gpu("gpu-offloaded", "--offload-checkpoints"), on_device);
        for (a, b) in on_device.iter().zip(&rounded_losses) {
            assert!((a - b).abs() < 1e-4 * a.abs(), "GPU {a} vs CPU {b}");
        }
    }
    // A resume that leaves checkpointing to nibble keeps what the run recorded; one that asks for
    // f32 checkpoints is refused, naming the option.
    let checkpoint = rounded.join("checkpoint-1");
    let resume = |out: &Path, extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(&["--resume", checkpoint.to_str().unwrap()]);
        args.extend_from_slice(extra);
        train_cli(&model, &data, out, &args)
    };
    let kept = dir.path().join("kept");
    let o = resume(&kept, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kept.join("run.json")).unwrap()).unwrap();
    assert_eq!(manifest["options"]["bf16_checkpoints"], true);
    let o = resume(
        &dir.path().join("exact-resume"),
        &["--gradient-checkpointing"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bf16_checkpoints"),
        "{err}"
    );
}

/// The families of issue 18 through the whole command-line loop: `train` memorises an answer, `generate`
/// gives it back (cached decoding through sliding windows of 8 tokens, shorter than the prompt, and
/// layers without RoPE), `eval` runs with the adapter, and the folder `merge` writes answers the same.
#[test]
fn new_families_train_generate_eval_and_merge_through_the_cli() {
    for arch in [
        Arch::Mistral,
        Arch::Ministral,
        Arch::SmolLM3,
        Arch::Phi3,
        Arch::Gemma3,
        Arch::Ministral3,
        Arch::Gemma4,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        synth::write_model_folder(
            &model,
            &SynthSpec::tiny(arch, 259),
            Some(&synth::byte_tokenizer()),
        )
        .unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, chats(1)).unwrap();
        let out = dir.path().join("run");
        memorise(&model, &data, &out);
        assert_eq!(
            ask_question_0(&model, &["--adapter", out.to_str().unwrap()]),
            "Answer 0.",
            "{arch:?}"
        );
        assert_ne!(
            ask_question_0(&model, &[]),
            "Answer 0.",
            "{arch:?}: the base model cannot know it"
        );

        let o = nibble(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert!(
            o.status.success(),
            "{arch:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        let merged = dir.path().join("merged");
        merge(&model, &out, &merged);
        let config = std::fs::read_to_string(merged.join("config.json")).unwrap();
        assert!(config.contains(arch.model_type()), "{arch:?}: {config}");
        assert_eq!(
            ask_question_0(&merged, &["--quant", "none"]),
            "Answer 0.",
            "{arch:?} merged"
        );
    }
}

/// A tiny multimodal model (Gemma 3 4B and up; Ministral 3 and Mistral Small 3.1 as `mistral3`):
/// config.json nests the text decoder's in `text_config`, its tensors sit under `prefix`
/// (`language_model.model.` as the released checkpoints and transformers 5.24 write them, or
/// `model.language_model.`), beside a vision tensor; Ministral 3's head is untied.
fn multimodal(dir: &Path, wrapper: Multimodal, prefix: &str) {
    let text = dir.join("text");
    let arch = match wrapper {
        Multimodal::Gemma3 => Arch::Gemma3,
        Multimodal::Mistral3 => Arch::Ministral3,
        Multimodal::Gemma4 => Arch::Gemma4,
    };
    let spec = SynthSpec::tiny(arch, 259);
    synth::write_model_folder(&text, &spec, Some(&synth::byte_tokenizer())).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(text.join(name), dir.join(name)).unwrap();
    }
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(text.join("config.json")).unwrap()).unwrap();
    let config = serde_json::json!({
        "architectures": [wrapper.class_name()], "model_type": wrapper.model_type(),
        "text_config": text_config, "tie_word_embeddings": spec.tie_word_embeddings,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let file = nibble::source::SafetensorsFile::open(&text.join("model.safetensors")).unwrap();
    let vision = vec![0x3fu8; 2 * 16 * 3];
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensor_names()
        .map(|n| {
            let info = file.info(n).unwrap();
            let name = match n.strip_prefix("model.") {
                Some(rest) => format!("{prefix}{rest}"),
                // The head: under language_model in the older spelling.
                None if prefix.starts_with("language_model.") => format!("language_model.{n}"),
                None => n.clone(),
            };
            (name, info.shape.clone(), file.raw(n).unwrap().to_vec())
        })
        .collect();
    tensors.push((
        "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
        vec![16, 3],
        vision,
    ));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::remove_dir_all(&text).unwrap();
}

/// Multimodal folders (Gemma 3, Mistral 3 holding Ministral 3) through the command line, in both
/// spellings: `info` names the text decoder, `train` learns an answer, the adapter names the text
/// decoder's modules as PEFT does in the ForConditionalGeneration class (keys and target_modules by
/// full path, so that PEFT leaves the vision tower's q_proj alone), `generate` answers with it, and
/// `merge` writes the folder back in its own spelling with the vision tower kept.
#[test]
fn multimodal_folders_train_generate_and_merge() {
    for (wrapper, prefix) in Multimodal::ALL
        .into_iter()
        .flat_map(|w| [(w, "language_model.model."), (w, "model.language_model.")])
    {
        let what = format!("{wrapper:?} {prefix}");
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        multimodal(&model, wrapper, prefix);
        let o = nibble(&["info", model.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let text_type = match wrapper {
            Multimodal::Gemma3 => "gemma3_text",
            Multimodal::Mistral3 => "ministral3",
            Multimodal::Gemma4 => "gemma4_text",
        };
        assert_eq!(info["architecture"], text_type, "{what}");
        assert_eq!(info["class"], wrapper.class_name(), "{what}");

        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, chats(1)).unwrap();
        let out = dir.path().join("run");
        memorise(&model, &data, &out);
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let targets = config["target_modules"].as_array().unwrap();
        // tiny-gemma4: 9 linears in its sliding layer (7 and the per-layer input's 2), 8 in its full
        // one (no v_proj), 7 in each of the two that reuse their keys and values (no k_proj, v_proj).
        let linears = if wrapper == Multimodal::Gemma4 {
            9 + 8 + 7 + 7
        } else {
            14
        };
        assert_eq!(targets.len(), linears, "{what}");
        assert!(
            targets.iter().all(|t| t
                .as_str()
                .unwrap()
                .starts_with("model.language_model.layers.")),
            "{targets:?}"
        );
        let weights =
            nibble::source::SafetensorsFile::open(&out.join("adapter_model.safetensors")).unwrap();
        assert!(
            weights
                .info("base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight")
                .is_some()
        );
        assert_eq!(
            ask_question_0(&model, &["--adapter", out.to_str().unwrap()]),
            "Answer 0.",
            "{what}"
        );

        let merged = dir.path().join("merged");
        merge(&model, &out, &merged);
        let names = |dir: &Path| -> Vec<String> {
            let f = nibble::source::SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
            let mut n: Vec<String> = f.tensor_names().cloned().collect();
            n.sort();
            n
        };
        assert_eq!(names(&merged), names(&model), "{what}");
        assert_eq!(ask_question_0(&merged, &[]), "Answer 0.", "{what}");
    }
}

/// ShareGPT and Alpaca rows (issue 19) give the token ids and labels of the rows they map to: a
/// messages row, and a conversational prompt/completion row (loss on the output alone by default).
#[test]
fn sharegpt_and_alpaca_rows_tokenize_as_their_mapped_forms() {
    let dir = tempfile::tempdir().unwrap();
    byte_model(dir.path());
    let source = ModelSource::open(dir.path()).unwrap();
    let tok = ChatTokenizer::from_files(&source.tokenizer, dir.path()).unwrap();
    let sequences = |jsonl: &str| -> Vec<(Vec<u32>, Vec<Option<u32>>)> {
        nibble::data::parse_jsonl(jsonl, "rows")
            .unwrap()
            .iter()
            .map(|e| {
                let s = train::tokenize(&tok, e, LossOn::Default, 512).unwrap().0;
                (s.ids, s.targets)
            })
            .collect()
    };
    let sharegpt = concat!(
        r#"{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye?"}, {"from": "gpt", "value": "Bye."}]}"#,
        "\n",
        r#"{"system": "Be brief.", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}"#,
        "\n",
    );
    let messages = concat!(
        r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]}"#,
        "\n",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
        "\n",
    );
    assert_eq!(sequences(sharegpt), sequences(messages));

    let alpaca = concat!(
        r#"{"instruction": "Translate.", "input": "chat", "output": "cat"}"#,
        "\n",
        r#"{"instruction": "Name a colour.", "input": "", "output": "Red.", "system": "Be brief.", "history": [["Hi?", "Hello."]]}"#,
        "\n",
    );
    let prompt_completion = concat!(
        r#"{"prompt": [{"role": "user", "content": "Translate.\nchat"}], "completion": [{"role": "assistant", "content": "cat"}]}"#,
        "\n",
        r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant", "content": "Red."}]}"#,
        "\n",
    );
    let mapped = sequences(alpaca);
    assert_eq!(mapped, sequences(prompt_completion));
    // The loss falls on the output (and the end of its turn) alone.
    let (ids, targets) = &mapped[0];
    let labelled: Vec<u32> = targets.iter().flatten().copied().collect();
    assert!(
        !labelled.is_empty() && labelled.len() < ids.len() / 2,
        "{labelled:?}"
    );

    for (row, expect) in [
        (
            r#"{"conversations": [{"from": "narrator", "value": "x"}]}"#,
            "rows:1: conversations[0] is from `narrator`",
        ),
        (
            r#"{"instruction": "x", "output": "y", "history": [["only a question"]]}"#,
            "rows:1: history[0] must be a [question, answer] pair",
        ),
        (
            r#"{"instruction": 3, "output": "y"}"#,
            "rows:1: `instruction` must be a string",
        ),
        // A function_call turn is a call in JSON, or an error (as LLaMA-Factory has it), never
        // trained as the assistant's plain text.
        (
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "not json"}]}"#,
            "rows:1: conversations[1] is a function_call whose text is not JSON",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{\"name\": 5}"}]}"#,
            "a call without a string `name`",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "[]"}]}"#,
            "an empty list of calls",
        ),
        (
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{\"name\": \"f\"}"}]}"#,
            "a call without `arguments`",
        ),
    ] {
        let e = nibble::data::parse_jsonl(row, "rows")
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "{e}");
    }
}

/// The output folder records the run's options with every default filled in and nibble's version
/// (issue 19); `--config` takes the record back and repeats the run, loss for loss.
#[test]
fn the_recorded_options_repeat_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(4)).unwrap();
    let first = dir.path().join("first");
    let o = train_cli(&model, &data, &first, &["--max-steps", "3", "--lr", "1e-3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let record = std::fs::read_to_string(first.join("nibble_config.toml")).unwrap();
    assert!(
        record.starts_with(&format!(
            "# The options of the run in this folder, as nibble {}",
            env!("CARGO_PKG_VERSION")
        )),
        "{record}"
    );
    for line in [
        "lr = 0.001",
        "max_steps = 3",
        "lora_r = 8",
        "lora_dropout = 0.05",
        "seed = 42",
        "max_length = 1024",
    ] {
        assert!(
            record.lines().any(|l| l == line),
            "{line} missing from:\n{record}"
        );
    }
    let again = dir.path().join("again");
    let o = nibble(&[
        "train",
        "--config",
        first.join("nibble_config.toml").to_str().unwrap(),
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let losses = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    assert_eq!(losses(&first).len(), 3);
    assert_eq!(losses(&first), losses(&again));
}

/// The training log opens with the run in words (the base's 4-bit storage named, no struct dump) and
/// logs each checkpoint it saves (issue 19).
#[test]
fn the_log_says_what_the_run_is_and_when_it_saves() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, chats(2)).unwrap();
    let out = dir.path().join("run");
    let args = common::train_args(
        &model,
        &data,
        &out,
        &["--max-steps", "2", "--save-steps", "1"],
    );
    let o = common::nibble_command()
        .args(&args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains(
            "base qwen2 (2 layers), its decoder linears in 4-bit nf4 (group 64); LoRA r 8 alpha 16"
        ),
        "{log}"
    );
    assert!(!log.contains("TrainConfig {"), "{log}");
    for step in [1, 2] {
        let saved = format!("saved {}", out.join(format!("checkpoint-{step}")).display());
        assert!(log.contains(&saved), "{saved} missing from:\n{log}");
    }
}

/// `--sample-prompts` (issue 19): each prompt is answered every --sample-steps steps and at the end,
/// into samples.jsonl and the log; the last answers are what `nibble generate` answers with the saved
/// adapter, and a memorised answer shows there.
#[test]
fn sample_prompts_are_answered_as_the_run_goes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let data = dir.path().join("d.jsonl");
    let row = serde_json::json!({"messages": [{"role": "user", "content": "Question 0?"},
                                              {"role": "assistant", "content": "Answer 0."}]});
    std::fs::write(&data, format!("{row}\n")).unwrap();
    let prompts = dir.path().join("prompts.txt");
    // A sample as a JSON object reads as its prompt.
    std::fs::write(&prompts, "Question 0?\n\n{\"prompt\": \"What else?\"}\n").unwrap();
    let out = dir.path().join("run");
    let o = common::nibble_command()
        .env("RUST_LOG", "info")
        .args(common::train_args(
            &model,
            &data,
            &out,
            &[
                memorising("50"),
                vec![
                    "--sample-prompts",
                    prompts.to_str().unwrap(),
                    "--sample-steps",
                    "20",
                ],
            ]
            .concat(),
        ))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{log}");
    let samples: Vec<serde_json::Value> = std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at: Vec<(u64, &str)> = samples
        .iter()
        .map(|s| (s["step"].as_u64().unwrap(), s["prompt"].as_str().unwrap()))
        .collect();
    let asked = ["Question 0?", "What else?"];
    let expected: Vec<(u64, &str)> = [20, 40, 50]
        .iter()
        .flat_map(|&step| asked.map(|p| (step, p)))
        .collect();
    assert_eq!(at, expected);
    assert!(
        log.contains("sample at step 20: \"Question 0?\" -> "),
        "{log}"
    );
    for (sample, prompt) in samples[4..].iter().zip(asked) {
        let o = nibble(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "64",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let generated = String::from_utf8_lossy(&o.stdout).trim_end().to_string();
        assert_eq!(sample["answer"].as_str().unwrap(), generated, "{prompt}");
    }
    assert_eq!(samples[4]["answer"], "Answer 0.");
    // Control images are for image runs: refused by name before anything loads.
    std::fs::write(dir.path().join("cat.png"), b"not read").unwrap();
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What is this?\", \"control\": \"cat.png\"}\n",
    )
    .unwrap();
    let o = common::nibble_command()
        .args(common::train_args(
            &model,
            &data,
            &dir.path().join("refused"),
            &["--sample-prompts", prompts.to_str().unwrap()],
        ))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && log.contains("What is this?") && log.contains("language model"),
        "{log}"
    );
}

/// Progress never freezes (issue 19): without a terminal, a step that runs longer than the heartbeat
/// interval (NIBBLE_PROGRESS_SECONDS, 0.3 s here against steps of about a second; 5 s by default) gets
/// a line saying so within about that interval of the run's start, before the step's own line.
#[test]
fn a_slow_step_reports_progress_while_it_runs() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let mut spec = SynthSpec::tiny(Arch::Qwen2, 259);
    (spec.hidden_size, spec.intermediate_size, spec.num_layers) = (512, 2048, 8);
    (spec.num_heads, spec.num_kv_heads) = (8, 2);
    synth::write_model_folder(&model, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let data = dir.path().join("d.jsonl");
    let text = "A long line of training text, repeated. ".repeat(80);
    std::fs::write(&data, format!("{}\n", serde_json::json!({ "text": text }))).unwrap();
    let out = dir.path().join("run");
    let mut child = common::nibble_command()
        .env("RUST_LOG", "info")
        .env("NIBBLE_PROGRESS_SECONDS", "0.3")
        .args(common::train_args(
            &model,
            &data,
            &out,
            &["--max-steps", "2"],
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<(std::time::Instant, String)> =
        std::io::BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map(|l| (std::time::Instant::now(), l.unwrap()))
            .collect();
    assert!(child.wait().unwrap().success());
    let at = |what: &str| {
        lines
            .iter()
            .position(|(_, l)| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?}: {lines:#?}"))
    };
    let (started, beat, stepped) = (
        at("LoRA parameters for 2 steps"),
        at("step 1/2: running for"),
        at("step 1/2  loss"),
    );
    assert!(started < beat && beat < stepped, "{lines:#?}");
    let waited = lines[beat].0 - lines[started].0;
    assert!(
        waited.as_secs_f64() < 1.5,
        "the first progress line came {waited:?} after the start"
    );
}

/// A model without a chat template is refused when chat starts, not after the first line typed.
#[test]
fn chat_without_a_template_is_refused_before_the_first_turn() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    byte_model(&model);
    let _ = std::fs::remove_file(model.join("chat_template.jinja"));
    let config_path = model.join("tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nibble"))
        .args(["chat", "--model", model.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("has no chat template")
            && stderr.contains("--chat-template")
            && !stderr.contains("rows")
            && !stderr.contains("chatting with"),
        "{stderr}"
    );
}
