//! Datasets as tables (issue 19): Parquet files and `datasets` folders (Arrow stream files) give the
//! same examples as the JSONL form of the same rows, for every row shape (fixtures written by the
//! `datasets` library: scripts/make_table_fixtures.py); a zstd Parquet file (polars' default) too; a
//! `DatasetDict` folder and a damaged file are refused by name; `nibble train` and `nibble data` read
//! them.

use nibble::data::read_examples;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tables")
}

#[test]
fn every_table_form_reads_as_its_jsonl() {
    let dir = fixtures();
    for shape in ["messages", "mixed", "conversational", "sharegpt", "alpaca"] {
        let jsonl = read_examples(&dir.join(format!("{shape}.jsonl"))).unwrap();
        assert!(jsonl.len() >= 2, "{shape}");
        let mut forms = vec![
            dir.join(format!("{shape}.parquet")),
            dir.join(format!("{shape}-dataset")),
            dir.join(format!("{shape}-dataset/data-00000-of-00001.arrow")),
        ];
        if shape == "messages" {
            forms.push(dir.join("messages-zstd.parquet"));
        }
        for form in forms {
            let table = read_examples(&form).unwrap_or_else(|e| panic!("{}: {e}", form.display()));
            assert_eq!(table, jsonl, "{}", form.display());
        }
    }
}

#[test]
fn unreadable_tables_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let damaged = tmp.path().join("broken.parquet");
    let mut bytes = std::fs::read(fixtures().join("messages.parquet")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&damaged, bytes).unwrap();
    let e = read_examples(&damaged).unwrap_err().to_string();
    assert!(
        e.contains("broken.parquet") && e.contains("not a Parquet file"),
        "{e}"
    );

    let dict = tmp.path().join("dict");
    std::fs::create_dir_all(&dict).unwrap();
    std::fs::write(
        dict.join("dataset_dict.json"),
        r#"{"splits": ["train", "test"]}"#,
    )
    .unwrap();
    let e = read_examples(&dict).unwrap_err().to_string();
    assert!(
        e.contains("several splits (train, test)") && e.contains("train"),
        "{e}"
    );

    // Rows of no shape nibble reads name the file and the row.
    let e = read_examples(&fixtures().join("unknown.parquet"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown.parquet: row 1:"), "{e}");
}

/// `nibble data` shows a Parquet file's rows as its JSONL form's (token for token), and `nibble train`
/// trains from a `datasets` folder.
#[test]
fn the_commands_read_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    nibble::synth::write_model_folder(
        &model,
        &nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 259),
        Some(&nibble::synth::byte_tokenizer()),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_nibble"))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let model_arg = model.to_str().unwrap();
    let shown = |data: &Path| {
        run(&[
            "data",
            data.to_str().unwrap(),
            "--model",
            model_arg,
            "--json",
        ])
    };
    let dir = fixtures();
    assert_eq!(
        shown(&dir.join("sharegpt.parquet")),
        shown(&dir.join("sharegpt.jsonl"))
    );
    let out = tmp.path().join("run");
    let data = dir.join("alpaca-dataset");
    run(&[
        "train",
        "--model",
        model_arg,
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
    ]);
    assert!(out.join("adapter_model.safetensors").is_file());
}
