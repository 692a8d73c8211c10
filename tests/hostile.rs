//! Hostile but fair input, through the binary: broken model folders, tokenizer files, data files,
//! options, output folders and checkpoints. Every case must exit non-zero with a message naming the
//! culprit, without a panic, and leave every file it was given exactly as it was, with nothing new
//! beside them.

mod common;

use nibble::config::Arch;
use nibble::synth::{self, SynthSpec};
use std::path::{Path, PathBuf};

/// What every case starts from: a tiny model with the byte tokenizer, chats, a finished run with a
/// checkpoint, and an unfinished run (the checkpoint alone).
struct Base {
    dir: tempfile::TempDir,
}

impl Base {
    fn new() -> Base {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let spec = SynthSpec::tiny(Arch::Qwen2, synth::BYTE_VOCAB);
        synth::write_model_folder(&root.join("model"), &spec, Some(&synth::byte_tokenizer()))
            .unwrap();
        std::fs::write(root.join("chats.jsonl"), nibble::data::demo_jsonl()).unwrap();
        let config = nibble::train::TrainConfig {
            max_steps: Some(1),
            max_length: 64,
            ..Default::default()
        };
        let spec = nibble::train::run::RunSpec {
            model: &root.join("model"),
            data: &[root.join("chats.jsonl")],
            output: &root.join("run"),
            quant: None,
            config,
            options: nibble::train::run::RunOptions {
                save_steps: 1,
                ..Default::default()
            },
        };
        struct Quiet;
        impl nibble::train::run::Observer for Quiet {}
        nibble::train::run::run(spec, None, &mut Quiet).unwrap();
        copy_dir(
            &root.join("run/checkpoint-1"),
            &root.join("unfinished/checkpoint-1"),
        );
        Base { dir }
    }

    /// A fresh copy of the base for one case.
    fn copy(&self) -> tempfile::TempDir {
        let case = tempfile::tempdir().unwrap();
        copy_dir(self.dir.path(), case.path());
        case
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// What a case could change under `dir`: every entry's path, kind, permissions, and its bytes (files) or
/// target (links).
fn snapshot(dir: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            let content = if kind.is_file() {
                std::fs::read(&path).unwrap()
            } else if kind.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            if kind.is_dir() {
                stack.push(path.clone());
            }
            out.push((
                path,
                format!("{kind:?}"),
                meta.permissions().mode(),
                content,
            ));
        }
    }
    out.sort();
    out
}

/// Edits a JSON file in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

/// Overwrites the first value of tensor `name` in a safetensors file with `bits` (of the tensor's own
/// width: 2 or 4 bytes).
fn poke_tensor(file: &Path, name: &str, bits: u32) {
    let mut bytes = std::fs::read(file).unwrap();
    let (start, width) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        let width = view.dtype().bitsize() / 8;
        (
            view.data().as_ptr() as usize - bytes.as_ptr() as usize,
            width,
        )
    };
    bytes[start..start + width].copy_from_slice(&bits.to_le_bytes()[..width]);
    std::fs::write(file, bytes).unwrap();
}

fn make_fifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// One hostile case: prepares its inputs in the case folder, returns the command's arguments.
struct Case {
    name: &'static str,
    prepare: fn(&Path) -> Vec<String>,
    /// Substrings the error must contain (the culprit).
    expect: &'static [&'static str],
}

fn p(root: &Path, rel: &str) -> String {
    root.join(rel).display().to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Puts the Qwen2.5 tokenizer (151,665 tokens) into the base's folder of a 259-token model.
fn other_tokenizer(root: &Path) {
    let files = synth::qwen25_tokenizer();
    let json = files.tokenizer_json.unwrap();
    std::fs::write(root.join("model/tokenizer.json"), json).unwrap();
}

/// `nibble train` on the case's model and chats into `out`, with `extra` flags.
fn train(root: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let mut a = common::train_args(
        &root.join("model"),
        &root.join("chats.jsonl"),
        &root.join(out),
        &["--max-steps", "1", "--max-length", "64"],
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `args` with the value of `flag` (which `train` already sets) replaced.
fn with_value(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args
        .iter()
        .position(|a| a == flag)
        .expect("the flag is set");
    args[i + 1] = value.to_string();
    args
}

fn info(root: &Path) -> Vec<String> {
    vec!["info".into(), p(root, "model")]
}

fn data_case(root: &Path, text: &str) -> Vec<String> {
    std::fs::write(root.join("chats.jsonl"), text).unwrap();
    train(root, "new", &[])
}

fn config_edit(root: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<String> {
    edit_json(&root.join("model/config.json"), edit);
    info(root)
}

fn state_edit(root: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<String> {
    edit_json(
        &root.join("unfinished/checkpoint-1/nibble_state.json"),
        edit,
    );
    let dir = p(root, "unfinished");
    train(root, "unfinished", &["--save-steps", "1", "--resume", &dir])
}

const CASES: &[Case] = &[
    // Model folders.
    Case {
        name: "no model folder",
        prepare: |r| args(&["info", &p(r, "nowhere")]),
        expect: &["nowhere"],
    },
    Case {
        name: "config.json missing",
        prepare: |r| {
            std::fs::remove_file(r.join("model/config.json")).unwrap();
            info(r)
        },
        expect: &["config.json"],
    },
    Case {
        name: "config.json not JSON",
        prepare: |r| {
            std::fs::write(r.join("model/config.json"), "{\"hidden_size\": 64,\n oops").unwrap();
            info(r)
        },
        expect: &["config.json"],
    },
    Case {
        name: "config.json a folder",
        prepare: |r| {
            std::fs::remove_file(r.join("model/config.json")).unwrap();
            std::fs::create_dir(r.join("model/config.json")).unwrap();
            info(r)
        },
        expect: &["config.json"],
    },
    Case {
        name: "config.json a FIFO",
        prepare: |r| {
            std::fs::remove_file(r.join("model/config.json")).unwrap();
            make_fifo(&r.join("model/config.json"));
            info(r)
        },
        expect: &["config.json", "not a regular file"],
    },
    Case {
        name: "zero attention heads",
        prepare: |r| config_edit(r, |c| c["num_attention_heads"] = 0.into()),
        expect: &["num_attention_heads"],
    },
    Case {
        name: "zero layers",
        prepare: |r| config_edit(r, |c| c["num_hidden_layers"] = 0.into()),
        expect: &["num_hidden_layers"],
    },
    Case {
        name: "zero vocabulary",
        prepare: |r| config_edit(r, |c| c["vocab_size"] = 0.into()),
        expect: &["vocab_size"],
    },
    Case {
        name: "astronomical hidden size",
        prepare: |r| config_edit(r, |c| c["hidden_size"] = 1_000_000_000_000u64.into()),
        expect: &["hidden_size"],
    },
    Case {
        name: "sizes whose product wraps",
        prepare: |r| {
            config_edit(r, |c| {
                c["hidden_size"] = 16_000_000.into();
                c["intermediate_size"] = 16_000_000.into();
                c["vocab_size"] = 16_000_000.into();
                c["head_dim"] = 64.into();
            })
        },
        expect: &["parameters"],
    },
    Case {
        name: "kv heads not dividing heads",
        prepare: |r| config_edit(r, |c| c["num_key_value_heads"] = 3.into()),
        expect: &["num_key_value_heads"],
    },
    Case {
        name: "odd head_dim",
        prepare: |r| config_edit(r, |c| c["head_dim"] = 15.into()),
        expect: &["head_dim"],
    },
    Case {
        name: "negative size",
        prepare: |r| config_edit(r, |c| c["hidden_size"] = (-64).into()),
        expect: &["hidden_size"],
    },
    Case {
        name: "unknown architecture",
        prepare: |r| {
            config_edit(r, |c| {
                c["model_type"] = "gpt2".into();
                c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
            })
        },
        expect: &["gpt2"],
    },
    Case {
        name: "unsupported activation",
        prepare: |r| config_edit(r, |c| c["hidden_act"] = "gelu".into()),
        expect: &["hidden_act"],
    },
    Case {
        name: "rope_scaling not an object",
        prepare: |r| config_edit(r, |c| c["rope_scaling"] = 3.into()),
        expect: &["rope_scaling"],
    },
    Case {
        name: "more layers than the weights hold",
        prepare: |r| {
            config_edit(r, |c| c["num_hidden_layers"] = 9.into());
            train(r, "new", &[])
        },
        expect: &["model.layers.2"],
    },
    Case {
        name: "weights truncated",
        prepare: |r| {
            let f = r.join("model/model.safetensors");
            let b = std::fs::read(&f).unwrap();
            std::fs::write(&f, &b[..b.len() / 2]).unwrap();
            train(r, "new", &[])
        },
        expect: &["model.safetensors"],
    },
    Case {
        name: "weights header garbage",
        prepare: |r| {
            let f = r.join("model/model.safetensors");
            let mut b = std::fs::read(&f).unwrap();
            b[8..24].copy_from_slice(b"not json at all!");
            std::fs::write(&f, b).unwrap();
            train(r, "new", &[])
        },
        expect: &["model.safetensors"],
    },
    Case {
        name: "weights a FIFO",
        prepare: |r| {
            std::fs::remove_file(r.join("model/model.safetensors")).unwrap();
            make_fifo(&r.join("model/model.safetensors"));
            train(r, "new", &[])
        },
        expect: &["model.safetensors"],
    },
    Case {
        name: "weights a folder",
        prepare: |r| {
            std::fs::remove_file(r.join("model/model.safetensors")).unwrap();
            std::fs::create_dir(r.join("model/model.safetensors")).unwrap();
            train(r, "new", &[])
        },
        expect: &[
            "model.safetensors",
            "a folder, where the model's weights file should be",
        ],
    },
    Case {
        name: "NaN in a norm",
        prepare: |r| {
            poke_tensor(
                &r.join("model/model.safetensors"),
                "model.norm.weight",
                0x7FC0,
            );
            train(r, "new", &[])
        },
        expect: &["model.norm.weight", "NaN"],
    },
    Case {
        name: "infinity in a linear",
        prepare: |r| {
            poke_tensor(
                &r.join("model/model.safetensors"),
                "model.layers.0.mlp.up_proj.weight",
                0x7F80,
            );
            train(r, "new", &[])
        },
        expect: &["model.layers.0.mlp.up_proj.weight", "infinite"],
    },
    Case {
        name: "NaN in the embedding (eval)",
        prepare: |r| {
            poke_tensor(
                &r.join("model/model.safetensors"),
                "model.embed_tokens.weight",
                0x7FC0,
            );
            args(&[
                "eval",
                "--model",
                &p(r, "model"),
                "--data",
                &p(r, "chats.jsonl"),
                "--device",
                "cpu",
            ])
        },
        expect: &["model.embed_tokens.weight"],
    },
    Case {
        name: "tokenizer.json corrupt",
        prepare: |r| {
            std::fs::write(r.join("model/tokenizer.json"), "{\"model\": 5").unwrap();
            train(r, "new", &[])
        },
        expect: &["tokenizer.json"],
    },
    Case {
        name: "chat template broken",
        prepare: |r| {
            edit_json(&r.join("model/tokenizer_config.json"), |t| {
                t["chat_template"] = "{% for m in messages %}{{ m.content }".into()
            });
            train(r, "new", &[])
        },
        expect: &["template"],
    },
    Case {
        name: "tokenizer_config.json missing for chat rows",
        prepare: |r| {
            std::fs::remove_file(r.join("model/tokenizer_config.json")).unwrap();
            train(r, "new", &[])
        },
        expect: &["tokenizer_config.json is missing", "--chat-template"],
    },
    Case {
        name: "plan with a group size that does not divide",
        prepare: |r| args(&["plan", &p(r, "model"), "--group-size", "128"]),
        expect: &["group size 128", "group sizes that work"],
    },
    Case {
        name: "plan of a language model at an image resolution",
        prepare: |r| args(&["plan", &p(r, "model"), "--resolution", "512"]),
        expect: &["--resolution", "--seq-len"],
    },
    Case {
        name: "quantizing over its own input",
        prepare: |r| {
            args(&[
                "quantize",
                &p(r, "model"),
                "--output",
                &p(r, "model/model.safetensors"),
            ])
        },
        expect: &["would replace the input"],
    },
    Case {
        name: "group size that does not divide",
        prepare: |r| {
            args(&[
                "quantize",
                &p(r, "model"),
                "--output",
                &p(r, "q.safetensors"),
                "--group-size",
                "128",
            ])
        },
        expect: &["group size 128"],
    },
    // Data files.
    Case {
        name: "no data file",
        prepare: |r| {
            std::fs::remove_file(r.join("chats.jsonl")).unwrap();
            train(r, "new", &[])
        },
        expect: &["chats.jsonl"],
    },
    Case {
        name: "data a folder",
        prepare: |r| {
            std::fs::remove_file(r.join("chats.jsonl")).unwrap();
            std::fs::create_dir(r.join("chats.jsonl")).unwrap();
            train(r, "new", &[])
        },
        expect: &["chats.jsonl"],
    },
    Case {
        name: "data a FIFO",
        prepare: |r| {
            std::fs::remove_file(r.join("chats.jsonl")).unwrap();
            make_fifo(&r.join("chats.jsonl"));
            train(r, "new", &[])
        },
        expect: &["chats.jsonl", "not a regular file"],
    },
    Case {
        name: "output a file",
        prepare: |r| {
            std::fs::write(r.join("a file"), "mine").unwrap();
            train(r, "a file", &[])
        },
        expect: &["--output", "a file", "is a file"],
    },
    Case {
        name: "a model that is a device",
        prepare: |_| args(&["info", "/dev/zero"]),
        expect: &["/dev/zero", "not a folder or a regular file"],
    },
    Case {
        name: "data empty",
        prepare: |r| data_case(r, ""),
        expect: &["chats.jsonl"],
    },
    Case {
        name: "data not UTF-8 on its third line",
        prepare: |r| {
            let mut rows = std::fs::read(r.join("chats.jsonl")).unwrap();
            let third = rows
                .iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'\n')
                .nth(1)
                .map(|(i, _)| i + 1)
                .unwrap();
            // A Latin-1 "é" inside the third row's first string.
            rows.splice(third + 2..third + 2, [0xE9]);
            std::fs::write(r.join("chats.jsonl"), rows).unwrap();
            train(r, "new", &[])
        },
        expect: &["chats.jsonl", "line 3", "not UTF-8"],
    },
    Case {
        name: "data not JSON on line 2",
        prepare: |r| data_case(r, "{\"text\": \"hello\"}\n{\"text\": \n"),
        expect: &["chats.jsonl", "2"],
    },
    Case {
        name: "row of an unknown shape",
        prepare: |r| data_case(r, "{\"text\": \"hello\"}\n{\"question\": \"hi\"}\n"),
        expect: &["chats.jsonl", "2"],
    },
    Case {
        name: "message content not text",
        prepare: |r| {
            data_case(
                r,
                "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}\n",
            )
        },
        expect: &["chats.jsonl", "1"],
    },
    Case {
        name: "row that is an array",
        prepare: |r| data_case(r, "[1, 2, 3]\n"),
        expect: &["chats.jsonl", "1"],
    },
    Case {
        name: "nothing to learn from",
        prepare: |r| {
            data_case_with(
                r,
                concat!(
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, ",
                    "{\"role\": \"assistant\", \"content\": \"hello\"}]}\n\n",
                    "{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}\n",
                ),
                &["--loss-on", "assistant"],
            )
        },
        expect: &["chats.jsonl:3 (example 2)", "no assistant turn"],
    },
    Case {
        name: "a chat template that refuses a row",
        prepare: |r| {
            std::fs::write(
                r.join("refusing.jinja"),
                "{% for m in messages %}{% if m['content'] == 'bad' %}\
                 {{ raise_exception('no bad rows') }}{% endif %}{{ m['content'] }}{% endfor %}",
            )
            .unwrap();
            let good = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
                        {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";
            let bad = "{\"messages\": [{\"role\": \"user\", \"content\": \"bad\"}, \
                       {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";
            let template = p(r, "refusing.jinja");
            data_case_with(
                r,
                &format!("{good}{good}\n{bad}"),
                &["--chat-template", &template],
            )
        },
        expect: &["chats.jsonl:4 (example 3)", "no bad rows"],
    },
    Case {
        name: "completion loss on chats",
        prepare: |r| train(r, "new", &["--loss-on", "completion"]),
        expect: &["completion"],
    },
    Case {
        name: "assistant loss on text rows",
        prepare: |r| data_case_with(r, "{\"text\": \"hello\"}\n", &["--loss-on", "assistant"]),
        expect: &["assistant"],
    },
    Case {
        name: "validation file broken",
        prepare: |r| {
            std::fs::write(r.join("val.jsonl"), "{oops}\n").unwrap();
            let v = p(r, "val.jsonl");
            train(r, "new", &["--eval-data", &v])
        },
        expect: &["val.jsonl", "1"],
    },
    // Options.
    Case {
        name: "lr NaN",
        prepare: |r| train(r, "new", &["--lr", "NaN"]),
        expect: &["--lr", "NaN"],
    },
    Case {
        name: "lr negative",
        prepare: |r| train(r, "new", &["--lr=-0.1"]),
        expect: &["--lr"],
    },
    Case {
        name: "dropout 2",
        prepare: |r| train(r, "new", &["--lora-dropout", "2"]),
        expect: &["--lora-dropout"],
    },
    Case {
        name: "GPU memory not a size",
        prepare: |r| train(r, "new", &["--gpu-memory", "12 parsecs"]),
        expect: &["--gpu-memory", "12 parsecs", "not a size"],
    },
    Case {
        name: "rank 0",
        prepare: |r| train(r, "new", &["--lora-r", "0"]),
        expect: &["--lora-r"],
    },
    Case {
        name: "epochs 0",
        prepare: |r| train(r, "new", &["--epochs", "0"]),
        expect: &["--epochs"],
    },
    Case {
        name: "max steps 0",
        prepare: |r| with_value(train(r, "new", &[]), "--max-steps", "0"),
        expect: &["--max-steps"],
    },
    Case {
        name: "max grad norm NaN",
        prepare: |r| train(r, "new", &["--max-grad-norm", "nan"]),
        expect: &["--max-grad-norm"],
    },
    Case {
        name: "batch size 0",
        prepare: |r| train(r, "new", &["--batch-size", "0"]),
        expect: &["--batch-size"],
    },
    Case {
        name: "warmup ratio 1",
        prepare: |r| train(r, "new", &["--warmup-ratio", "1"]),
        expect: &["--warmup-ratio"],
    },
    Case {
        name: "eval split 1.5",
        prepare: |r| train(r, "new", &["--eval-split", "1.5"]),
        expect: &["--eval-split"],
    },
    Case {
        name: "eval split and eval data",
        prepare: |r| {
            let d = p(r, "chats.jsonl");
            train(r, "new", &["--eval-split", "0.2", "--eval-data", &d])
        },
        expect: &["--eval-data", "--eval-split"],
    },
    Case {
        name: "unknown target module",
        prepare: |r| train(r, "new", &["--target-modules", "q_proj,attn"]),
        expect: &["attn"],
    },
    Case {
        name: "unknown quant",
        prepare: |r| train(r, "new", &["--quant", "nf3"]),
        expect: &["nf3"],
    },
    Case {
        name: "unknown device",
        prepare: |r| with_value(train(r, "new", &[]), "--device", "tpu"),
        expect: &["tpu"],
    },
    Case {
        name: "unknown preset",
        prepare: |r| train(r, "new", &["--preset", "llama-gpu"]),
        expect: &["llama-gpu"],
    },
    Case {
        name: "missing option file",
        prepare: |r| {
            let f = p(r, "none.toml");
            train(r, "new", &["--config", &f])
        },
        expect: &["none.toml"],
    },
    Case {
        name: "option file with an unknown key",
        prepare: |r| {
            std::fs::write(r.join("run.toml"), "lr = 1e-4\nlearning_rat = 2\n").unwrap();
            let f = p(r, "run.toml");
            train(r, "new", &["--config", &f])
        },
        expect: &["run.toml", "learning_rat"],
    },
    Case {
        name: "option file with a bad value",
        prepare: |r| {
            std::fs::write(r.join("run.toml"), "lr_scheduler = \"sawtooth\"\n").unwrap();
            let f = p(r, "run.toml");
            train(r, "new", &["--config", &f])
        },
        expect: &["run.toml", "sawtooth"],
    },
    Case {
        name: "temperature NaN",
        prepare: |r| {
            args(&[
                "generate",
                "--model",
                &p(r, "model"),
                "--prompt",
                "hi",
                "--temperature",
                "NaN",
                "--device",
                "cpu",
            ])
        },
        expect: &["--temperature"],
    },
    Case {
        name: "top-p above 1",
        prepare: |r| {
            args(&[
                "generate",
                "--model",
                &p(r, "model"),
                "--prompt",
                "hi",
                "--top-p",
                "1.5",
                "--device",
                "cpu",
            ])
        },
        expect: &["--top-p"],
    },
    // Output folders.
    Case {
        name: "output holds someone's files",
        prepare: |r| train(r, "model", &[]),
        expect: &["did not write"],
    },
    Case {
        name: "output holds someone's files, with --overwrite",
        prepare: |r| train(r, "model", &["--overwrite"]),
        expect: &["did not write"],
    },
    Case {
        name: "output is a file",
        prepare: |r| train(r, "chats.jsonl", &[]),
        expect: &["chats.jsonl"],
    },
    Case {
        name: "output holds a finished run",
        prepare: |r| train(r, "run", &[]),
        expect: &["finished run", "--overwrite"],
    },
    Case {
        name: "output holds an unfinished run",
        prepare: |r| train(r, "unfinished", &[]),
        expect: &["unfinished run", "checkpoint-1"],
    },
    Case {
        name: "overwrite would delete the init adapter",
        prepare: |r| {
            let a = p(r, "run");
            train(r, "run", &["--overwrite", "--init-adapter", &a])
        },
        expect: &["--overwrite would delete"],
    },
    Case {
        name: "overwrite with a missing init adapter",
        prepare: |r| {
            let a = p(r, "nowhere");
            train(r, "run", &["--overwrite", "--init-adapter", &a])
        },
        expect: &["--init-adapter", "nowhere"],
    },
    Case {
        name: "overwrite with a damaged init adapter",
        prepare: |r| {
            std::fs::create_dir(r.join("bad")).unwrap();
            for f in ["adapter_model.safetensors", "adapter_config.json"] {
                std::fs::copy(r.join("run").join(f), r.join("bad").join(f)).unwrap();
            }
            edit_json(&r.join("bad/adapter_config.json"), |c| c["r"] = 4.into());
            let a = p(r, "bad");
            train(r, "run", &["--overwrite", "--init-adapter", &a])
        },
        expect: &["--init-adapter", "bad"],
    },
    Case {
        name: "overwrite and resume together",
        prepare: |r| {
            let a = p(r, "unfinished");
            train(r, "unfinished", &["--overwrite", "--resume", &a])
        },
        expect: &["--overwrite", "--resume"],
    },
    Case {
        name: "demo into a non-empty folder",
        prepare: |r| args(&["demo", "--keep", &p(r, "model")]),
        expect: &["not empty"],
    },
    Case {
        name: "merge into an existing folder",
        prepare: |r| {
            args(&[
                "merge",
                "--model",
                &p(r, "model"),
                "--adapter",
                &p(r, "run"),
                "--output",
                &p(r, "run"),
            ])
        },
        expect: &["already exists"],
    },
    Case {
        name: "an adapter's switch that is not true or false",
        prepare: |r| merge_edited_adapter(r, |c| c["use_rslora"] = "yes".into()),
        expect: &["adapter_config.json", "use_rslora", "true or false"],
    },
    Case {
        name: "an adapter of some layers only",
        prepare: |r| merge_edited_adapter(r, |c| c["layers_to_transform"] = vec![1].into()),
        expect: &["adapter_config.json", "layers_to_transform"],
    },
    Case {
        name: "an adapter over repeated layers",
        prepare: |r| {
            merge_edited_adapter(r, |c| {
                c["layer_replication"] = serde_json::json!([[1, 2], [0, 1]])
            })
        },
        expect: &["adapter_config.json", "layer_replication"],
    },
    Case {
        name: "an adapter naming embedding rows it does not hold",
        prepare: |r| merge_edited_adapter(r, |c| c["trainable_token_indices"] = vec![3, 5].into()),
        expect: &[
            "adapter_model.safetensors",
            "trainable_token_indices",
            "holds 0",
        ],
    },
    Case {
        name: "an adapter whose target_modules is not a regular expression",
        prepare: |r| merge_edited_adapter(r, |c| c["target_modules"] = "((".into()),
        expect: &[
            "adapter_config.json",
            "target_modules",
            "not a regular expression",
        ],
    },
    Case {
        name: "an adapter trained against a base PiSSA rewrote",
        prepare: |r| merge_edited_adapter(r, |c| c["init_lora_weights"] = "pissa_niter_4".into()),
        expect: &["init_lora_weights", "pissa_niter_4", "convert"],
    },
    Case {
        name: "a QA-LoRA adapter",
        prepare: |r| merge_edited_adapter(r, |c| c["use_qalora"] = true.into()),
        expect: &["use_qalora"],
    },
    Case {
        name: "an adapter of parameters (target_parameters)",
        prepare: |r| {
            merge_edited_adapter(r, |c| {
                c["target_parameters"] = serde_json::json!(["experts.gate_up_proj"])
            })
        },
        expect: &["target_parameters", "experts.gate_up_proj"],
    },
    Case {
        name: "an adapter whose scale overflows the merged weights",
        prepare: |r| merge_edited_adapter(r, |c| c["lora_alpha"] = 1e308.into()),
        expect: &["lora_alpha over r", "cannot hold"],
    },
    Case {
        name: "a base whose adapted weight f16 cannot hold, merged as f16",
        prepare: |r| {
            let wide = r.join("wide");
            std::fs::create_dir(&wide).unwrap();
            for entry in std::fs::read_dir(r.join("model")).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), wide.join(entry.file_name())).unwrap();
            }
            // One weight of an adapted linear at 70144 (exact in bf16 and f32), past f16's 65504.
            let file = wide.join("model.safetensors");
            let name = "model.layers.0.mlp.down_proj.weight";
            let info = nibble::source::SafetensorsFile::open(&file)
                .unwrap()
                .info(name)
                .unwrap()
                .clone();
            let value: Vec<u8> = match info.dtype {
                safetensors::Dtype::BF16 => 0x4789u16.to_le_bytes().to_vec(),
                safetensors::Dtype::F32 => 70144f32.to_le_bytes().to_vec(),
                other => panic!("the model's weights are {other:?}"),
            };
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[info.start..info.start + value.len()].copy_from_slice(&value);
            std::fs::write(&file, bytes).unwrap();
            let (wide, run, merged) = (p(r, "wide"), p(r, "run"), p(r, "merged"));
            args(&[
                "merge",
                "--model",
                &wide,
                "--adapter",
                &run,
                "--output",
                &merged,
                "--dtype",
                "f16",
            ])
        },
        expect: &["down_proj", "the base's own weight", "cannot hold"],
    },
    Case {
        name: "a data file given as the model",
        prepare: |r| {
            let data = p(r, "chats.jsonl");
            args(&["eval", "--model", &data, "--data", &data])
        },
        expect: &["chats.jsonl", "not a model folder"],
    },
    Case {
        name: "generate with a negative top-p",
        prepare: |r| {
            let m = p(r, "model");
            args(&[
                "generate", "--model", &m, "--prompt", "Hi", "--top-p", "-0.5",
            ])
        },
        expect: &["--top-p", "(got -0.5)"],
    },
    Case {
        name: "generate with a negative temperature",
        prepare: |r| {
            let m = p(r, "model");
            args(&[
                "generate",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--temperature=-1",
            ])
        },
        expect: &["--temperature", "(got -1)"],
    },
    Case {
        name: "generate with a negative top-k written apart",
        prepare: |r| {
            let m = p(r, "model");
            args(&["generate", "--model", &m, "--prompt", "Hi", "--top-k", "-1"])
        },
        expect: &["--top-k", "-1"],
    },
    Case {
        name: "generate with a negative repetition penalty written apart",
        prepare: |r| {
            let m = p(r, "model");
            args(&[
                "generate",
                "--model",
                &m,
                "--prompt",
                "Hi",
                "--repetition-penalty",
                "-0.5",
            ])
        },
        expect: &["--repetition-penalty", "(got -0.5)"],
    },
    Case {
        name: "a generation_config.json that is a folder",
        prepare: |r| {
            let m = p(r, "model");
            std::fs::create_dir_all(Path::new(&m).join("generation_config.json")).unwrap();
            args(&["generate", "--model", &m, "--prompt", "Hi"])
        },
        expect: &["generation_config.json"],
    },
    Case {
        name: "a quantized file whose embedded tokenizer is broken",
        prepare: |r| {
            // The copy inside the file damaged, the folder's intact: the error names the copy.
            let q = r.join("q.safetensors");
            let out = common::nibble_command()
                .args([
                    "quantize",
                    &p(r, "model"),
                    "--output",
                    &p(r, "q.safetensors"),
                ])
                .output()
                .unwrap();
            assert!(out.status.success());
            let bytes = std::fs::read(&q).unwrap();
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
            header["__metadata__"]["tokenizer.json"] = "{\"broken\":".into();
            let text = header.to_string();
            let mut damaged = (text.len() as u64).to_le_bytes().to_vec();
            damaged.extend(text.as_bytes());
            damaged.extend(&bytes[8 + len..]);
            std::fs::write(&q, damaged).unwrap();
            args(&[
                "generate",
                "--model",
                &p(r, "q.safetensors"),
                "--prompt",
                "Hi",
            ])
        },
        expect: &[
            "q.safetensors/[metadata]/tokenizer.json",
            "cannot be parsed",
        ],
    },
    Case {
        name: "quantize a folder whose tokenizer.json is broken",
        prepare: |r| {
            std::fs::write(r.join("model/tokenizer.json"), "{\"broken\":").unwrap();
            let q = p(r, "q.safetensors");
            args(&["quantize", &p(r, "model"), "--output", &q])
        },
        expect: &["model/tokenizer.json", "cannot be parsed"],
    },
    Case {
        name: "synth into a non-empty folder",
        prepare: |r| args(&["synth", "--output", &p(r, "model")]),
        expect: &["not empty"],
    },
    // Another model's tokenizer: ids past the embeddings, refused before anything runs or is
    // written, naming the file.
    Case {
        name: "another model's tokenizer (train)",
        prepare: |r| {
            other_tokenizer(r);
            train(r, "new", &[])
        },
        expect: &["tokenizer.json", "past the model's 259 embeddings"],
    },
    Case {
        name: "another model's tokenizer (data)",
        prepare: |r| {
            other_tokenizer(r);
            args(&["data", &p(r, "chats.jsonl"), "--model", &p(r, "model")])
        },
        expect: &["tokenizer.json", "vocab_size"],
    },
    Case {
        name: "another model's tokenizer (eval)",
        prepare: |r| {
            other_tokenizer(r);
            let (model, data) = (p(r, "model"), p(r, "chats.jsonl"));
            args(&[
                "eval", "--model", &model, "--data", &data, "--device", "cpu",
            ])
        },
        expect: &["tokenizer.json", "not the model's"],
    },
    Case {
        name: "a chat template that is not text",
        prepare: |r| {
            let path = r.join("model/tokenizer_config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["chat_template"] = 5.into();
            std::fs::write(&path, config.to_string()).unwrap();
            train(r, "new", &[])
        },
        expect: &["tokenizer_config.json", "`chat_template` is 5"],
    },
    Case {
        name: "a model of one position",
        prepare: |r| {
            let path = r.join("model/config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["max_position_embeddings"] = 1.into();
            std::fs::write(&path, config.to_string()).unwrap();
            train(r, "new", &[])
        },
        expect: &["config.json", "`max_position_embeddings` is 1"],
    },
    Case {
        name: "a tokenizer without a vocabulary",
        prepare: |r| {
            let path = r.join("model/tokenizer.json");
            let mut tokenizer: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            tokenizer["model"]["vocab"] = serde_json::json!({});
            tokenizer["model"]["merges"] = serde_json::json!([]);
            std::fs::write(&path, tokenizer.to_string()).unwrap();
            args(&["data", &p(r, "chats.jsonl"), "--model", &p(r, "model")])
        },
        expect: &["tokenizer.json", "no vocabulary"],
    },
    // Checkpoints and adapters.
    Case {
        name: "resume from nowhere",
        prepare: |r| {
            let a = p(r, "nowhere");
            train(r, "new", &["--resume", &a])
        },
        expect: &["nowhere"],
    },
    Case {
        name: "resume a finished run",
        prepare: |r| {
            let a = p(r, "run");
            train(r, "run", &["--resume", &a])
        },
        expect: &["nothing to resume"],
    },
    Case {
        name: "resume with another learning rate",
        prepare: |r| {
            let a = p(r, "unfinished");
            train(
                r,
                "unfinished",
                &["--save-steps", "1", "--resume", &a, "--lr", "0.1"],
            )
        },
        expect: &["options.lr", "checkpoint-1"],
    },
    Case {
        name: "resume with other data",
        prepare: |r| {
            std::fs::write(r.join("chats.jsonl"), "{\"text\": \"other data\"}\n").unwrap();
            let a = p(r, "unfinished");
            train(r, "unfinished", &["--save-steps", "1", "--resume", &a])
        },
        expect: &["data."],
    },
    Case {
        name: "trainer state not JSON",
        prepare: |r| {
            std::fs::write(r.join("unfinished/checkpoint-1/nibble_state.json"), "{").unwrap();
            let a = p(r, "unfinished");
            train(r, "unfinished", &["--save-steps", "1", "--resume", &a])
        },
        expect: &["nibble_state.json"],
    },
    Case {
        name: "trainer state order out of range",
        prepare: |r| state_edit(r, |s| s["order"][0] = 1_000_000.into()),
        expect: &["nibble_state.json", "order"],
    },
    Case {
        name: "trainer state step past the end",
        prepare: |r| state_edit(r, |s| s["step"] = 99.into()),
        expect: &["nibble_state.json", "step 99"],
    },
    Case {
        name: "trainer state epoch not a number",
        prepare: |r| state_edit(r, |s| s["epoch"] = "one".into()),
        expect: &["nibble_state.json", "`epoch` must be a whole number"],
    },
    Case {
        name: "trainer state generator not a state",
        prepare: |r| state_edit(r, |s| s["data_rng"] = 7.into()),
        expect: &["nibble_state.json", "`data_rng` is not a generator's state"],
    },
    Case {
        name: "trainer state from steps that reached into the next epoch",
        prepare: |r| {
            state_edit(r, |s| {
                s["position"] = (s["position"].as_u64().unwrap() - 1).into();
            })
        },
        expect: &["nibble_state.json", "earlier nibble"],
    },
    Case {
        name: "trainer state position past the data",
        prepare: |r| state_edit(r, |s| s["position"] = 1000.into()),
        expect: &["nibble_state.json"],
    },
    Case {
        name: "checkpoint adapter with NaN",
        prepare: |r| {
            let f = r.join("unfinished/checkpoint-1/adapter_model.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            let name = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .names()[0]
                .to_string();
            poke_tensor(&f, &name, 0x7FC0_0000);
            let a = p(r, "unfinished");
            train(r, "unfinished", &["--save-steps", "1", "--resume", &a])
        },
        expect: &["adapter_model.safetensors", "NaN"],
    },
    Case {
        name: "checkpoint with a negative second moment",
        prepare: |r| {
            let f = r.join("unfinished/checkpoint-1/optimizer.safetensors");
            let bytes = std::fs::read(&f).unwrap();
            let name = safetensors::SafeTensors::deserialize(&bytes)
                .unwrap()
                .names()
                .into_iter()
                .find(|n| n.starts_with("v."))
                .unwrap()
                .to_string();
            poke_tensor(&f, &name, (-1.5f32).to_bits());
            let a = p(r, "unfinished");
            train(r, "unfinished", &["--save-steps", "1", "--resume", &a])
        },
        expect: &["optimizer.safetensors", "-1.5", "never negative"],
    },
    Case {
        name: "adapter folder without its config",
        prepare: |r| {
            std::fs::remove_file(r.join("run/adapter_config.json")).unwrap();
            args(&[
                "eval",
                "--model",
                &p(r, "model"),
                "--data",
                &p(r, "chats.jsonl"),
                "--adapter",
                &p(r, "run"),
                "--device",
                "cpu",
            ])
        },
        expect: &["adapter_config.json"],
    },
    Case {
        name: "adapter of another shape",
        prepare: |r| {
            let mut spec = SynthSpec::tiny(Arch::Qwen2, synth::BYTE_VOCAB);
            spec.hidden_size = 128;
            synth::write_model_folder(&r.join("wide"), &spec, Some(&synth::byte_tokenizer()))
                .unwrap();
            args(&[
                "eval",
                "--model",
                &p(r, "wide"),
                "--data",
                &p(r, "chats.jsonl"),
                "--adapter",
                &p(r, "run"),
                "--device",
                "cpu",
            ])
        },
        expect: &["--adapter"],
    },
];

/// `nibble merge` of a copy of the finished run's adapter whose adapter_config.json `edit` changed.
fn merge_edited_adapter(root: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<String> {
    let odd = root.join("odd");
    std::fs::create_dir(&odd).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(root.join("run").join(f), odd.join(f)).unwrap();
    }
    edit_json(&odd.join("adapter_config.json"), edit);
    let (model, adapter) = (p(root, "model"), p(root, "odd"));
    let output = p(root, "merged");
    args(&[
        "merge",
        "--model",
        &model,
        "--adapter",
        &adapter,
        "--output",
        &output,
    ])
}

fn data_case_with(root: &Path, text: &str, extra: &[&str]) -> Vec<String> {
    std::fs::write(root.join("chats.jsonl"), text).unwrap();
    train(root, "new", extra)
}

#[test]
fn hostile_input_is_refused_by_name_and_changes_nothing() {
    let base = Base::new();
    let mut failures = Vec::new();
    for case in CASES {
        let dir = base.copy();
        let root = dir.path();
        let args = (case.prepare)(root);
        let before = snapshot(root);
        let out = common::nibble_command()
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut wrong = Vec::new();
        if out.status.success() {
            wrong.push("exited 0".to_string());
        }
        if out.status.code().is_none_or(|c| c == 101) || stderr.contains("panicked") {
            wrong.push("panicked or was killed".to_string());
        }
        for name in case.expect {
            if !stderr.contains(name) {
                wrong.push(format!("the message does not name `{name}`"));
            }
        }
        if snapshot(root) != before {
            wrong.push("files changed or were left behind".to_string());
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}\n  nibble {}\n  {}",
                case.name,
                wrong.join("; "),
                args.join(" "),
                stderr.trim()
            ));
        }
    }
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn an_adapter_trained_on_another_base_is_taken_with_a_warning() {
    let base = Base::new();
    let dir = base.copy();
    let root = dir.path();
    // The same architecture and shapes, other weights.
    let mut spec = SynthSpec::tiny(Arch::Qwen2, synth::BYTE_VOCAB);
    spec.seed = 7;
    synth::write_model_folder(
        &root.join("other-model"),
        &spec,
        Some(&synth::byte_tokenizer()),
    )
    .unwrap();
    let out = common::nibble_command()
        .args([
            "eval",
            "--model",
            &p(root, "other-model"),
            "--data",
            &p(root, "chats.jsonl"),
        ])
        .args(["--adapter", &p(root, "run"), "--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("was trained on") && stderr.contains("other-model"),
        "{stderr}"
    );
    let same = common::nibble_command()
        .args([
            "eval",
            "--model",
            &p(root, "model"),
            "--data",
            &p(root, "chats.jsonl"),
        ])
        .args(["--adapter", &p(root, "run"), "--device", "cpu"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&same.stderr);
    assert!(
        same.status.success() && !stderr.contains("was trained on"),
        "{stderr}"
    );
    // The weights decide, where run.json records them, not the folder's name: the base moved is
    // the base, and other weights under the base's name are not.
    let eval_with = |model: &str| {
        let out = common::nibble_command()
            .args(["eval", "--model", &p(root, model)])
            .args(["--data", &p(root, "chats.jsonl")])
            .args(["--adapter", &p(root, "run"), "--device", "cpu"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    copy_dir(&root.join("model"), &root.join("moved"));
    let stderr = eval_with("moved");
    assert!(!stderr.contains("was trained on"), "{stderr}");
    std::fs::create_dir(root.join("elsewhere")).unwrap();
    std::fs::rename(root.join("other-model"), root.join("elsewhere/model")).unwrap();
    let stderr = eval_with("elsewhere/model");
    assert!(
        stderr.contains("was trained on other weights") && stderr.contains("run.json"),
        "{stderr}"
    );
    // Saved by an editor that starts UTF-8 with a byte-order mark, run.json still tells.
    let record = root.join("run/run.json");
    let text = std::fs::read_to_string(&record).unwrap();
    std::fs::write(&record, format!("\u{feff}{text}")).unwrap();
    let stderr = eval_with("elsewhere/model");
    assert!(
        stderr.contains("was trained on other weights") && stderr.contains("run.json"),
        "{stderr}"
    );
}
