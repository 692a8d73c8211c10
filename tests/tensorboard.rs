//! TensorBoard event files (issue 19): nibble's writer against TensorBoard's own (the fixture from
//! scripts/make_tensorboard_fixture.py, written by tensorboard's RecordWriter and read back by its
//! EventFileLoader), byte for byte; and a run's event file, which mirrors its metrics.jsonl.

use nibble::train::tensorboard::{self, Payload};
use std::path::Path;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard")
}

#[derive(serde::Deserialize)]
struct Expected {
    scalars: Vec<(f64, u64, String, f32)>,
    read: Vec<serde_json::Value>,
}

/// The version event and five scalars encode to the bytes TensorBoard's writer wrote, and what its
/// reader read back is what was written.
#[test]
fn events_encode_as_tensorboard_writes_them() {
    let dir = fixture();
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let theirs = std::fs::read(dir.join("events.out.tfevents.fixture")).unwrap();
    let mut ours = tensorboard::record(&tensorboard::event(1700000000.5, 0, Payload::FileVersion));
    for (wall_time, step, tag, value) in &expected.scalars {
        let payload = Payload::Scalar { tag, value: *value };
        ours.extend(tensorboard::record(&tensorboard::event(
            *wall_time, *step, payload,
        )));
    }
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours, theirs);
    assert_eq!(expected.read[0]["file_version"], "brain.Event:2");
    for ((_, step, tag, value), read) in expected.scalars.iter().zip(&expected.read[1..]) {
        assert_eq!(read["tag"], tag.as_str());
        assert_eq!(read["step"], *step);
        assert_eq!(read["value"].as_f64().unwrap() as f32, *value);
    }
}

/// The records of an event file: each one's data, its two masked CRCs checked.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let data = bytes[at + 12..at + 12 + len].to_vec();
        // Each record re-framed is the bytes read: lengths and CRCs as the writer computes them.
        assert_eq!(tensorboard::record(&data), bytes[at..at + 16 + len]);
        out.push(data);
        at += 16 + len;
    }
    out
}

/// A run's event file holds a version event and one scalar per number of each metrics.jsonl line
/// (its step and tag in the record), under Hugging Face Trainer's tag names; a resumed run writes the
/// file again from the metrics it kept, so no step appears twice.
#[test]
fn a_run_writes_its_metrics_as_tensorboard_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    nibble::synth::write_model_folder(
        &model,
        &nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 259),
        Some(&nibble::synth::byte_tokenizer()),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    let rows: String = (0..4)
        .map(|i| format!("{{\"text\": \"Line number {i} of a small file.\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--model", model.to_str().unwrap(), "--data"];
        args.extend([data.to_str().unwrap(), "--output", out.to_str().unwrap()]);
        args.extend([
            "--eval-split",
            "0.25",
            "--eval-steps",
            "2",
            "--save-steps",
            "2",
        ]);
        args.extend(extra);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let event_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("events.out.tfevents.")
            })
            .collect()
    };
    let check = || {
        let files = event_files();
        assert_eq!(files.len(), 1, "{files:?}");
        let records = records(&std::fs::read(&files[0]).unwrap());
        let metrics: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let scalars: Vec<(u64, String)> = metrics
            .iter()
            .flat_map(|m| {
                tensorboard::scalars(m)
                    .into_iter()
                    .map(|(tag, _)| (m["step"].as_u64().unwrap(), tag))
            })
            .collect();
        assert_eq!(records.len(), 1 + scalars.len());
        assert!(records[0].ends_with(b"brain.Event:2"));
        for (record, (step, tag)) in records[1..].iter().zip(&scalars) {
            // step (field 2, a one-byte varint here) and the tag's bytes.
            assert_eq!(record[9..11], [0x10, *step as u8], "{tag}");
            assert!(
                record.windows(tag.len()).any(|w| w == tag.as_bytes()),
                "{tag}"
            );
        }
        // Every number of metrics.jsonl, under Hugging Face Trainer's names (written out here, not
        // read from the mapping under test).
        let tags: std::collections::BTreeSet<&str> = scalars.iter().map(|s| s.1.as_str()).collect();
        let expected = [
            "eval/entropy",
            "eval/loss",
            "eval/mean_token_accuracy",
            "eval/perplexity",
            "eval/tokens",
            "train/entropy",
            "train/epoch",
            "train/grad_norm",
            "train/learning_rate",
            "train/loss",
            "train/mean_token_accuracy",
            "train/tokens",
            "train/tokens_per_s",
        ];
        assert_eq!(tags.into_iter().collect::<Vec<_>>(), expected);
        scalars.len()
    };
    train(&["--max-steps", "4"]);
    let finished = check();
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-4")).unwrap();
    train(&["--max-steps", "4", "--resume", out.to_str().unwrap()]);
    assert_eq!(check(), finished);
}
