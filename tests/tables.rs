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

/// A folder laid out as a Hub dataset repository (what `huggingface-cli download --repo-type dataset`
/// leaves) reads as `datasets.load_dataset(folder)` splits it (tests/fixtures/hub_folders, written
/// with the splits and rows datasets read, in its order, by scripts/make_hub_folder_fixture.py): the
/// Hub's sharded files, splits named by folders or file names, a README's `configs` (its files in the
/// order listed, its `data_dir`, CRLF line ends), one format per split; the folder is its train split,
/// FOLDER/SPLIT another (also where that is a folder of its own).
#[test]
fn repository_folders_split_as_datasets_splits_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub_folders");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    let layouts = expected["layouts"].as_object().unwrap();
    assert_eq!(layouts.len(), 13);
    let texts = |path: &Path| -> Vec<String> {
        read_examples(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .iter()
            .map(|e| match e {
                nibble::data::Example::Text(t) => t.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    for (layout, splits) in layouts {
        let dir = root.join(layout);
        let found = nibble::tables::repository_splits(&dir).unwrap().unwrap();
        let names: Vec<&str> = found.iter().map(|(s, _)| s.as_str()).collect();
        let splits = splits.as_array().unwrap();
        let theirs: Vec<&str> = splits.iter().map(|s| s[0].as_str().unwrap()).collect();
        assert_eq!(names, theirs, "{layout}: splits in order");
        for split in splits {
            let name = split[0].as_str().unwrap();
            let rows: Vec<&str> = split[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            assert_eq!(texts(&dir.join(name)), rows, "{layout}/{name}");
        }
        assert_eq!(
            texts(&dir),
            texts(&dir.join("train")),
            "{layout}: the folder is its train split"
        );
    }
    // A split it lacks is named with those it has; a missing file stays a missing file.
    let err = read_examples(&root.join("file_names/dev"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("train, validation, test"), "{err}");
    let err = read_examples(&root.join("file_names/dev.jsonl"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no such folder or file"), "{err}");
    let err = read_examples(&root.join("file_names/mydata"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no such folder or file"),
        "not a split's name: {err}"
    );
}

/// What `datasets` refuses, nibble refuses by name: several configs and none the default, a listed
/// file that is not there, splits of different formats, formats nibble does not read; and a README
/// whose YAML uses aliases (a few lines of nested aliases would fill memory).
#[test]
fn repository_folders_datasets_refuses_are_refused() {
    // (case, its files and their text, what the error says)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        (
            "configs",
            &[
                (
                    "README.md",
                    "---\nconfigs:\n- config_name: a\n  data_files: a.jsonl\n- config_name: b\n  data_files: b.jsonl\n---\n",
                ),
                ("a.jsonl", "{\"text\": \"a\"}\n"),
                ("b.jsonl", "{\"text\": \"b\"}\n"),
            ],
            "several configs (a, b)",
        ),
        (
            "missing",
            &[
                (
                    "README.md",
                    "---\nconfigs:\n- config_name: default\n  data_files: gone.jsonl\n---\n",
                ),
                ("a.jsonl", "{\"text\": \"a\"}\n"),
            ],
            "gone.jsonl, which is not there",
        ),
        (
            "formats",
            &[
                ("train.jsonl", "{\"text\": \"a\"}\n"),
                ("test.csv", "text\nb\n"),
            ],
            "csv files",
        ),
        (
            "aliases",
            &[
                (
                    "README.md",
                    "---\na: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nconfigs: [*c]\n---\n",
                ),
                ("a.jsonl", "{\"text\": \"a\"}\n"),
            ],
            "aliases",
        ),
        (
            "csv",
            &[("train.csv", "text\na\n")],
            "csv files, which nibble does not read",
        ),
    ];
    for (name, files, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in files {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let err = read_examples(dir.path())
            .err()
            .unwrap_or_else(|| panic!("{name} was read"));
        assert!(err.to_string().contains(says), "{name}: {err}");
    }
}

/// A .json file may hold one array of rows, as `datasets`' json builder reads it.
#[test]
fn a_json_array_of_rows_reads_as_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let array = dir.path().join("rows.json");
    std::fs::write(
        &array,
        r#"[{"text": "a"}, {"prompt": "b", "completion": "c"}]"#,
    )
    .unwrap();
    let lines = dir.path().join("rows.jsonl");
    std::fs::write(
        &lines,
        "{\"text\": \"a\"}\n{\"prompt\": \"b\", \"completion\": \"c\"}\n",
    )
    .unwrap();
    assert_eq!(
        format!("{:?}", read_examples(&array).unwrap()),
        format!("{:?}", read_examples(&lines).unwrap())
    );
    std::fs::write(&array, r#"[{"text": "a"}, 7]"#).unwrap();
    let err = read_examples(&array).err().unwrap().to_string();
    assert!(err.contains("rows.json: row 2"), "{err}");
}
