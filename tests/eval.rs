//! `nibble eval` and the JSONL reader: loss on every predicted token of chat-formatted rows, and
//! errors that name the file and line.

mod common;

use common::nibble;

use nibble::config::Arch;
use nibble::cpu;
use nibble::data::{self, Example};
use nibble::model::{ModelSource, QuantRequest};
use nibble::synth::{self, SynthSpec};
use nibble::tokenizer::ChatTokenizer;
use std::path::Path;

const CHAT: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]}

{"prompt": "Say hi: ", "completion": "hi"}
{"text": "plain text row"}
"#;

/// Mean next-token loss from full logits, in f64: an independent path to the number eval prints.
fn reference_loss(
    model: &nibble::model::Model,
    tok: &ChatTokenizer,
    examples: &[Example],
) -> (f64, usize) {
    let (mut sum, mut n) = (0f64, 0usize);
    for ex in examples {
        let ids = tok.encode(&data::render(tok, ex).unwrap()).unwrap();
        let logits = cpu::logits(model, None, &ids).unwrap();
        let v = model.config.vocab_size;
        for t in 0..ids.len() - 1 {
            let row: Vec<f64> = logits[t * v..(t + 1) * v]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += lse - row[ids[t + 1] as usize];
            n += 1;
        }
    }
    (sum / n as f64, n)
}

#[test]
fn eval_prints_mean_loss_and_perplexity_over_every_predicted_token() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    let mut spec = SynthSpec::tiny(Arch::Qwen2, 151936);
    spec.std = 0.05;
    synth::write_model_folder(&model_dir, &spec, Some(&synth::qwen25_tokenizer())).unwrap();
    let data_path = dir.path().join("chat.jsonl");
    std::fs::write(&data_path, CHAT).unwrap();

    let eval = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "eval",
            "--model",
            model_dir.to_str().unwrap(),
            "--data",
            data_path.to_str().unwrap(),
            "--quant",
            "nf4",
        ];
        args.extend(extra);
        let out = nibble(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = eval(&["--device", "cpu", "--precision", "f32", "--loss-on", "all"]);

    let source = ModelSource::open(&model_dir).unwrap();
    let tok = ChatTokenizer::from_files(&source.tokenizer, &model_dir).unwrap();
    let model = source
        .load(Some(QuantRequest::Quantize(
            nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 64).unwrap(),
        )))
        .unwrap();
    let examples = data::read_examples(&data_path).unwrap();
    assert_eq!(examples.len(), 4);
    let (loss, tokens) = reference_loss(&model, &tok, &examples);
    assert_eq!(v["tokens"].as_u64().unwrap() as usize, tokens);
    let got = v["loss"].as_f64().unwrap();
    assert!(
        (got - loss).abs() / loss < 1e-5,
        "eval loss {got} vs reference {loss}"
    );
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() / loss.exp() < 1e-5);

    // The default precision (bf16 products where the CPU has them) stays within 1e-3 of float32.
    let fast = eval(&["--loss-on", "all"]);
    let fast_loss = fast["loss"].as_f64().unwrap();
    assert!(
        (fast_loss - loss).abs() / loss < 1e-3,
        "default precision loss {fast_loss} vs f32 {loss}"
    );

    // By default eval counts the tokens training puts the loss on, as TRL's eval_loss does: the
    // prompt/completion row's completion only, from where its prompt's own tokens part from the
    // whole's ("Say hi: " ends in a space, which " hi" takes).
    let default = eval(&["--precision", "f32"]);
    let prompt = tok.encode("Say hi: ").unwrap();
    let whole = tok.encode("Say hi: hi<|im_end|>").unwrap();
    let start = prompt
        .iter()
        .zip(&whole)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        start < prompt.len(),
        "the space joins the completion's token"
    );
    assert_eq!(
        default["tokens"].as_u64().unwrap() as usize,
        tokens - (start - 1)
    );
}

#[test]
fn jsonl_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    for (content, expect) in [
        (
            "{\"text\": \"ok\"}\n{not json}\n",
            "bad.jsonl:2: not valid JSON",
        ),
        (
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n",
            "bad.jsonl:1: messages[0] has unknown role `wizard`",
        ),
        ("{\"foo\": 1}\n", "bad.jsonl:1: expected a `messages` list"),
        ("\n\n", "bad.jsonl: the dataset is empty"),
        (
            "{\"prompt\": \"a\", \"completion\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n",
            "bad.jsonl:1: `prompt` and `completion` must both",
        ),
        (
            "{\"text\": \"a\"}\n{\"tools\": {\"name\": \"f\"}, \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
            "bad.jsonl:2: `tools` must be a list of function schemas",
        ),
        (
            "{\"tools\": \"[{\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
            "bad.jsonl:1: `tools` is a string but not JSON",
        ),
        (
            "{\"chat_template_kwargs\": [1], \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
            "bad.jsonl:1: `chat_template_kwargs` must be an object",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": 7}]}\n",
            "bad.jsonl:1: messages[0].content must be a string, a list of parts or null",
        ),
        (
            "{\"messages\": [\"hi\"]}\n",
            "bad.jsonl:1: messages[0] must be an object",
        ),
    ] {
        std::fs::write(&p, content).unwrap();
        let err = data::read_examples(&p).unwrap_err().to_string();
        assert!(err.contains(expect), "{content:?}: {err}");
    }
    let err = data::read_examples(Path::new("/no/such.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such.jsonl"), "{err}");
}

#[test]
fn eval_with_bad_data_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    synth::write_model_folder(
        &model_dir,
        &SynthSpec::tiny(Arch::Llama, 151936),
        Some(&synth::qwen25_tokenizer()),
    )
    .unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, "{\"text\": \"fine\"}\n{\"messages\": 3}\n").unwrap();
    let out = nibble(&[
        "eval",
        "--model",
        model_dir.to_str().unwrap(),
        "--data",
        p.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("d.jsonl:2") && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Under --loss-on assistant a conversation without an assistant turn is refused by eval, as TRL
/// refuses it in an evaluation set (and as train does), naming its file and line; `data` shows the
/// file and warns with the same place. An example whose assistant turn --max-length cut off counts for
/// nothing in eval's loss, named by its place too.
#[test]
fn examples_with_nothing_to_predict_are_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    let spec = SynthSpec::tiny(Arch::Qwen2, 151936);
    synth::write_model_folder(&model_dir, &spec, Some(&synth::qwen25_tokenizer())).unwrap();
    let answered = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
    let unanswered = r#"{"messages": [{"role": "user", "content": "Only a question"}]}"#;
    let long = serde_json::json!({"messages": [
        {"role": "user", "content": "word ".repeat(200)},
        {"role": "assistant", "content": "Yes"},
    ]})
    .to_string();
    let data_path = dir.path().join("chat.jsonl");
    std::fs::write(&data_path, format!("{answered}\n\n{unanswered}\n")).unwrap();
    let cut_path = dir.path().join("cut.jsonl");
    std::fs::write(&cut_path, format!("{answered}\n{long}\n")).unwrap();
    let (model, data) = (model_dir.to_str().unwrap(), data_path.to_str().unwrap());
    let run = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["--loss-on", "assistant"]);
        let out = nibble(&args);
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (status, stderr) = run(&["eval", "--model", model, "--data", data]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chat.jsonl:3 (example 2)") && stderr.contains("no assistant turn"),
        "{stderr}"
    );
    let (status, stderr) = run(&["data", data, "--model", model]);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("no token that carries loss")
            && stderr.contains("chat.jsonl:3 (example 2)"),
        "{stderr}"
    );
    let cut = cut_path.to_str().unwrap();
    let (status, stderr) = run(&[
        "eval",
        "--model",
        model,
        "--data",
        cut,
        "--max-length",
        "64",
    ]);
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("no token to predict")
            && stderr.contains("cut off the tokens of 1")
            && stderr.contains("cut.jsonl:2 (example 2)"),
        "{stderr}"
    );
}

/// A dataset folder is evaluated on its test split (else validation, else train), and says which:
/// its train split would report a training loss as a held-out one.
#[test]
fn a_dataset_folder_is_evaluated_on_its_test_split() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let spec = SynthSpec::tiny(Arch::Qwen2, 151936);
    synth::write_model_folder(&model, &spec, Some(&synth::qwen25_tokenizer())).unwrap();
    let folder = dir.path().join("dataset");
    std::fs::create_dir(&folder).unwrap();
    let lines: Vec<&str> = CHAT.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "the chats have lines for both splits");
    std::fs::write(folder.join("train.jsonl"), lines[1..].join("\n")).unwrap();
    std::fs::write(folder.join("test.jsonl"), lines[0]).unwrap();
    let eval = |data: &Path| {
        let out = common::nibble_command()
            .env("RUST_LOG", "info")
            .args([
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .args(["--data", data.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (result["tokens"].as_u64().unwrap(), stderr)
    };
    let (tokens, stderr) = eval(&folder);
    assert!(stderr.contains("the test split"), "{stderr}");
    assert_eq!(tokens, eval(&folder.join("test.jsonl")).0);
    assert_ne!(tokens, eval(&folder.join("train.jsonl")).0);
    // Without a test split, the validation split.
    std::fs::rename(folder.join("test.jsonl"), folder.join("validation.jsonl")).unwrap();
    let (tokens_validation, stderr) = eval(&folder);
    assert!(stderr.contains("the validation split"), "{stderr}");
    assert_eq!(tokens_validation, tokens);
}
