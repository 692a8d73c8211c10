//! Mutation fuzzing in the normal test run: valid inputs of every format nibble reads from users (a
//! safetensors file, config.json, tokenizer files and chat templates, JSONL rows, a checkpoint's state)
//! are damaged at random (bit flips, special values, cuts, deletions, repeats, random bytes, and edits of
//! JSON values), and every reader must answer with a value or an error, never a panic. The runs are
//! seeded, so a failure reproduces; `NIBBLE_FUZZ_RUNS` multiplies the run counts for a longer hunt.

use nibble::config::{Arch, ModelConfig};
use nibble::rng::Rng;
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::{ChatTokenizer, Message};
use std::panic::AssertUnwindSafe;
use std::path::Path;

fn runs(base: usize) -> usize {
    let scale: usize = std::env::var("NIBBLE_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    base * scale.max(1)
}

const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x00\x00\x80\x7f",
    b"\x00\x00\xc0\x7f",
    b"-1",
    b"0",
    b"1e308",
    b"18446744073709551615",
    b"null",
    b"[]",
    b"{}",
    b"\"",
    b"\\",
    b"{%",
    b"}}",
    b"\xf0\x9f",
];

/// One random damage to `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let at = |rng: &mut Rng, len: usize| rng.below(len as u64 + 1) as usize;
    for _ in 0..1 + rng.below(3) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = at(rng, len - 1);
                out[i] ^= 1 << rng.below(8);
            }
            1 => {
                let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                let i = at(rng, len);
                let end = (i + value.len()).min(len);
                out.splice(i..end, value.iter().copied());
            }
            2 => out.truncate(at(rng, len)),
            3 if len > 0 => {
                let i = at(rng, len - 1);
                let n = 1 + rng.below(16) as usize;
                out.drain(i..(i + n).min(len));
            }
            4 if len > 0 => {
                let i = at(rng, len - 1);
                let n = (1 + rng.below(64) as usize).min(len - i);
                let piece = out[i..i + n].to_vec();
                let j = at(rng, len);
                out.splice(j..j, piece);
            }
            5 => {
                let i = at(rng, len);
                let bytes: Vec<u8> = (0..1 + rng.below(8))
                    .map(|_| rng.below(256) as u8)
                    .collect();
                out.splice(i..i, bytes);
            }
            _ => {}
        }
    }
    out
}

/// Replaces one value somewhere in a JSON document with a hostile one.
fn mutate_json(rng: &mut Rng, value: &mut serde_json::Value) {
    let hostile = [
        serde_json::json!(null),
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!(u64::MAX),
        serde_json::json!("x"),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!(0.5),
        serde_json::json!(true),
    ];
    let mut node = value;
    loop {
        let children: usize = match node {
            serde_json::Value::Object(m) => m.len(),
            serde_json::Value::Array(a) => a.len(),
            _ => 0,
        };
        if children == 0 || rng.below(3) == 0 {
            *node = hostile[rng.below(hostile.len() as u64) as usize].clone();
            return;
        }
        let k = rng.below(children as u64) as usize;
        node = match node {
            serde_json::Value::Object(m) => m.values_mut().nth(k).unwrap(),
            serde_json::Value::Array(a) => &mut a[k],
            _ => unreachable!(),
        };
    }
}

/// Runs `check` on `count` damaged versions of `inputs`; a panic fails the test with the input that
/// caused it. Returns how many inputs were tried.
fn fuzz(name: &str, seed: u64, count: usize, inputs: &[Vec<u8>], check: impl Fn(&[u8])) -> usize {
    let mut rng = Rng::new(seed);
    for run in 0..count {
        let original = &inputs[run % inputs.len()];
        let damaged = mutate(&mut rng, original);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&damaged)));
        if outcome.is_err() {
            let shown = String::from_utf8_lossy(&damaged[..damaged.len().min(400)]).into_owned();
            panic!("{name}: run {run} (seed {seed}) panicked on input starting {shown:?}");
        }
    }
    count
}

fn tiny_model_files() -> (
    std::collections::BTreeMap<String, Vec<u8>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::tiny(Arch::Qwen3, synth::BYTE_VOCAB);
    synth::write_model_folder(dir.path(), &spec, Some(&synth::byte_tokenizer())).unwrap();
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        files.insert(
            entry.file_name().to_string_lossy().into_owned(),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    (files, dir)
}

#[test]
fn safetensors_files_and_model_folders() {
    let (files, _dir) = tiny_model_files();
    let weights = files["model.safetensors"].clone();
    let tried = fuzz(
        "safetensors header",
        1,
        runs(3000),
        std::slice::from_ref(&weights),
        |bytes| {
            if let Ok(file) = nibble::source::SafetensorsFile::from_bytes(
                "fuzz.safetensors",
                bytes.to_vec().into(),
            ) {
                let names: Vec<String> = file.tensor_names().cloned().collect();
                for name in names {
                    let _ = file.read_f32(&name);
                    let _ = file.read_u32(&name);
                }
            }
        },
    );
    // Whole folders: the weights damaged, the rest intact, loaded and quantized.
    let tried_folders = fuzz("model folder", 2, runs(150), &[weights], |bytes| {
        let mut memory = std::collections::BTreeMap::new();
        for (name, content) in &files {
            memory.insert(name.clone(), std::sync::Arc::<[u8]>::from(content.clone()));
        }
        memory.insert("model.safetensors".into(), bytes.to_vec().into());
        let files = nibble::source::ModelFiles::Memory {
            label: "fuzz".into(),
            files: memory,
        };
        if let Ok(source) = nibble::model::ModelSource::open_folder(files) {
            let _ = source.load(None);
        }
    });
    eprintln!("safetensors: {tried} headers, {tried_folders} folders");
}

#[test]
fn config_json() {
    let (files, _dir) = tiny_model_files();
    let text = files["config.json"].clone();
    let parse = |bytes: &[u8]| {
        if let Ok(config) =
            ModelConfig::from_json_str(&String::from_utf8_lossy(bytes), Path::new("config.json"))
        {
            // What the loaders and the planner derive from an accepted config must not panic either.
            let _ = config.parameter_count();
            let _ = nibble::model::planned_weight_bytes(&config, None);
            let _ = config.expected_tensors();
        }
    };
    let bytes = fuzz(
        "config.json bytes",
        3,
        runs(3000),
        std::slice::from_ref(&text),
        parse,
    );
    let mut rng = Rng::new(4);
    let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let count = runs(3000);
    for run in 0..count {
        let mut damaged = value.clone();
        for _ in 0..1 + rng.below(3) {
            mutate_json(&mut rng, &mut damaged);
        }
        let text = damaged.to_string();
        let outcome = std::panic::catch_unwind(|| parse(text.as_bytes()));
        assert!(
            outcome.is_ok(),
            "config.json values: run {run} panicked on {text}"
        );
    }
    eprintln!("config.json: {bytes} byte-level, {count} value-level");
}

#[test]
fn tokenizer_files_and_chat_templates() {
    let (files, _dir) = tiny_model_files();
    let text = |name: &str| String::from_utf8(files[name].clone()).unwrap();
    let conversation = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hello?"),
        Message::new("assistant", "Hi."),
        Message::new("user", "Bye \u{1F44B}"),
    ];
    let exercise = |tok: &ChatTokenizer| {
        if let Ok(rendered) = tok.apply_chat_template(&conversation, true)
            && let Ok(ids) = tok.encode(&rendered)
        {
            let _ = tok.decode(&ids);
        }
    };
    let tokenizer_json = fuzz(
        "tokenizer.json",
        5,
        runs(300),
        &[text("tokenizer.json").into_bytes()],
        |bytes| {
            let files = nibble::model::TokenizerFiles {
                tokenizer_json: Some(String::from_utf8_lossy(bytes).into_owned()),
                tokenizer_config_json: Some(text("tokenizer_config.json")),
                chat_template_jinja: None,
            };
            if let Ok(tok) = ChatTokenizer::from_files(&files, Path::new("fuzz")) {
                exercise(&tok);
            }
        },
    );
    let config: serde_json::Value = serde_json::from_str(&text("tokenizer_config.json")).unwrap();
    let template = config["chat_template"]
        .as_str()
        .unwrap()
        .as_bytes()
        .to_vec();
    let templates = fuzz("chat template", 6, runs(2000), &[template], |bytes| {
        let files = nibble::model::TokenizerFiles {
            tokenizer_json: Some(text("tokenizer.json")),
            tokenizer_config_json: Some(text("tokenizer_config.json")),
            chat_template_jinja: Some(String::from_utf8_lossy(bytes).into_owned()),
        };
        if let Ok(tok) = ChatTokenizer::from_files(&files, Path::new("fuzz")) {
            exercise(&tok);
        }
    });
    eprintln!("tokenizer: {tokenizer_json} tokenizer.json, {templates} templates");
}

#[test]
fn jsonl_rows() {
    let (files, _dir) = tiny_model_files();
    let tokenizer = nibble::model::TokenizerFiles {
        tokenizer_json: Some(String::from_utf8(files["tokenizer.json"].clone()).unwrap()),
        tokenizer_config_json: Some(
            String::from_utf8(files["tokenizer_config.json"].clone()).unwrap(),
        ),
        chat_template_jinja: None,
    };
    let tok = ChatTokenizer::from_files(&tokenizer, Path::new("fuzz")).unwrap();
    let rows = [
        nibble::data::demo_jsonl(),
        "{\"prompt\": \"2+2?\", \"completion\": \"4\"}\n{\"text\": \"plain\"}\n".to_string(),
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"completion\": [{\"role\": \"assistant\", \"content\": \"yo\"}]}\n".to_string(),
    ];
    let inputs: Vec<Vec<u8>> = rows.iter().map(|r| r.clone().into_bytes()).collect();
    let tried = fuzz("JSONL rows", 7, runs(2000), &inputs, |bytes| {
        if let Ok(examples) =
            nibble::data::parse_jsonl(&String::from_utf8_lossy(bytes), "fuzz.jsonl")
        {
            for example in &examples {
                for loss_on in [
                    nibble::train::LossOn::Default,
                    nibble::train::LossOn::All,
                    nibble::train::LossOn::Completion,
                    nibble::train::LossOn::Assistant,
                ] {
                    let _ = nibble::train::tokenize(&tok, example, loss_on, 48);
                }
            }
        }
    });
    eprintln!("JSONL: {tried} documents");
}

#[test]
fn checkpoint_state() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec::tiny(Arch::Llama, synth::BYTE_VOCAB);
    let model_dir = dir.path().join("model");
    synth::write_model_folder(&model_dir, &spec, Some(&synth::byte_tokenizer())).unwrap();
    let model = nibble::model::open(&model_dir).unwrap().load(None).unwrap();
    let sequences: Vec<nibble::cpu::Sequence> = (0..5)
        .map(|i| nibble::cpu::Sequence::all_tokens((0..12).map(|t| (t * 7 + i) % 250).collect()))
        .collect();
    let config = nibble::train::TrainConfig {
        max_steps: Some(3),
        ..Default::default()
    };
    let mut trainer =
        nibble::train::Trainer::new(&model, config.clone(), sequences.clone(), None).unwrap();
    trainer.step().unwrap();
    let checkpoint = trainer.save_checkpoint(dir.path(), "fuzz", None).unwrap();
    let state_path = checkpoint.join("nibble_state.json");
    let state = std::fs::read(&state_path).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&state).unwrap();
    let restore = |bytes: &[u8]| {
        std::fs::write(&state_path, bytes).unwrap();
        let mut fresh =
            nibble::train::Trainer::new(&model, config.clone(), sequences.clone(), None).unwrap();
        if fresh.restore(&checkpoint).is_ok() {
            // An accepted state must also train on.
            for _ in 0..3 {
                if fresh.done() || fresh.step().is_err() {
                    break;
                }
            }
        }
    };
    let bytes = fuzz("nibble_state.json bytes", 8, runs(300), &[state], restore);
    let mut rng = Rng::new(9);
    let count = runs(600);
    for run in 0..count {
        let mut damaged = value.clone();
        mutate_json(&mut rng, &mut damaged);
        let text = damaged.to_string();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| restore(text.as_bytes())));
        assert!(
            outcome.is_ok(),
            "nibble_state.json values: run {run} panicked on {text}"
        );
    }
    eprintln!("checkpoint state: {bytes} byte-level, {count} value-level");
}
