//! TRL's recipe files (`trl sft --config recipe.yaml`) as `nibble train --config recipe.yaml`: each
//! recipe of tests/fixtures/trl_config resolves to what TRL's own parser made of it
//! (`scripts/make_trl_config_fixture.py`, TRL 1.16 / transformers 5.25 / PEFT 0.21), options nibble
//! cannot honour are refused by name, and a recipe trains end to end from the command line.

mod common;

use nibble::train::settings::{TrainSettings, defaults_for_help};
use nibble::train::trl_config;
use serde_json::Value;
use std::path::Path;

use common::train_flags as flags;

/// A folder holding a model folder whose config.json says qwen2 (all PEFT's defaults read of it).
fn qwen2_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("model")).unwrap();
    std::fs::write(
        dir.path().join("model/config.json"),
        r#"{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}"#,
    )
    .unwrap();
    dir
}

/// The recipe with its model and chat template in `dir` (TRL reads paths from where it runs; so
/// does nibble).
fn recipe_text(name: &str, dir: &Path) -> String {
    let text = std::fs::read_to_string(format!("tests/fixtures/trl_config/{name}")).unwrap();
    let line = "model_name_or_path: model\n";
    assert!(
        text.contains(line),
        "{name} names its model as the test expects"
    );
    let template = dir.join("template.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    text.replace(
        line,
        &format!("model_name_or_path: {}\n", dir.join("model").display()),
    )
    .replace(
        "chat_template_path: template.jinja\n",
        &format!("chat_template_path: {}\n", template.display()),
    )
}

/// What TRL's parser made of the fixtures (scripts/make_trl_config_fixture.py).
fn trl_expected() -> Value {
    let text = std::fs::read_to_string("tests/fixtures/trl_config/expected.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read(text: &str, flags: &TrainSettings) -> nibble::Result<trl_config::Recipe> {
    trl_config::read(text, Path::new("recipe.yaml"), flags)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn recipes_resolve_as_trl_sft_resolves_them() {
    let expected = trl_expected();
    let cases = expected["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 5);
    let dir = qwen2_folder();
    let model = dir.path().join("model");
    for (name, e) in cases {
        // Two recipes evaluate on the dataset's test split, which a JSONL file lacks: a fraction then.
        let with_eval = e["eval_strategy"] != "no";
        let flags = if with_eval {
            flags(&["--eval-split", "0.25"])
        } else {
            TrainSettings::default()
        };
        let recipe =
            read(&recipe_text(name, dir.path()), &flags).unwrap_or_else(|e| panic!("{name}: {e}"));
        let s = TrainSettings::layered(flags.clone())
            .unwrap()
            .over(recipe.settings.clone())
            .unwrap();
        let c = s.train_config().unwrap_or_else(|e| panic!("{name}: {e}"));
        let run = s.run_options().unwrap();
        let check =
            |what: &str, ok: bool| assert!(ok, "{name}: {what}: nibble {c:?} / {run:?}, TRL {e}");
        check("model", s.model.as_deref() == Some(model.as_path()));
        check(
            "data",
            s.data
                .as_deref()
                .and_then(|p| Some(p.first()?.display().to_string()))
                == e["dataset_name"].as_str().map(String::from),
        );
        check(
            "output",
            s.output
                .as_deref()
                .map(|p| p.display().to_string())
                .as_deref()
                == Some(e["output_dir"].as_str().unwrap()).filter(|o| *o != "trainer_output"),
        );
        check("lr", c.lr == f(&e["learning_rate"]));
        check("epochs", c.epochs == f(&e["num_train_epochs"]));
        check(
            "max_steps",
            c.max_steps.map_or(-1.0, |n| n as f64) == f(&e["max_steps"]),
        );
        check(
            "batch",
            c.batch_size as f64 == f(&e["per_device_train_batch_size"]),
        );
        check(
            "accumulation",
            c.grad_accum as f64 == f(&e["gradient_accumulation_steps"]),
        );
        check(
            "schedule",
            nibble::value_name(c.schedule) == e["lr_scheduler_type"].as_str().unwrap(),
        );
        check(
            "schedule kwargs",
            serde_json::to_value(&c.schedule_kwargs).unwrap() == e["lr_scheduler_kwargs"],
        );
        // transformers' own count for a run of 100 steps (warmup_steps below 1 is a fraction).
        check(
            "warmup",
            c.warmup_for(100) as f64 == f(&e["warmup_steps_of_100"]),
        );
        check("weight decay", c.weight_decay == f(&e["weight_decay"]));
        check(
            "adam",
            (c.adam_beta1, c.adam_beta2, c.adam_epsilon)
                == (
                    f(&e["adam_beta1"]),
                    f(&e["adam_beta2"]),
                    f(&e["adam_epsilon"]),
                ),
        );
        check("clipping", c.max_grad_norm == f(&e["max_grad_norm"]));
        check("seed", c.seed as f64 == f(&e["seed"]));
        check("max length", c.max_length as f64 == f(&e["max_length"]));
        check(
            "truncation",
            nibble::value_name(c.truncation) == e["truncation_mode"].as_str().unwrap(),
        );
        check("packing", run.packing == e["packing"].as_bool().unwrap());
        check(
            "packing strategy",
            nibble::value_name(run.packing_strategy) == e["packing_strategy"].as_str().unwrap(),
        );
        check(
            "text field",
            c.text_field == e["dataset_text_field"].as_str().unwrap(),
        );
        check(
            "neftune",
            c.neftune_noise_alpha == e["neftune_noise_alpha"].as_f64(),
        );
        check(
            "loss type",
            nibble::value_name(c.loss_type) == e["loss_type"].as_str().unwrap(),
        );
        // TRL's masks: completion_only_loss (None: the completion of prompt/completion rows) and
        // assistant_only_loss.
        let loss_on = match (
            e["assistant_only_loss"].as_bool().unwrap(),
            e["completion_only_loss"].as_bool(),
        ) {
            (true, _) => "assistant",
            (false, Some(false)) => "all",
            _ => "default",
        };
        check("loss on", nibble::value_name(c.loss_on) == loss_on);
        check(
            "chat template",
            s.chat_template
                .as_deref()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                == e["chat_template_path"].as_str().map(String::from),
        );
        let saves_by_steps = e["save_strategy"] == "steps";
        check(
            "save steps",
            run.save_steps as f64
                == if saves_by_steps {
                    f(&e["save_steps"])
                } else {
                    0.0
                },
        );
        check(
            "eos token",
            run.eos_token.as_deref() == e["eos_token"].as_str(),
        );
        check(
            "save each epoch",
            run.save_each_epoch == (e["save_strategy"] == "epoch"),
        );
        check(
            "save limit",
            run.save_total_limit.map(|n| n as f64) == e["save_total_limit"].as_f64(),
        );
        check(
            "eval steps",
            match e["eval_strategy"].as_str().unwrap() {
                "steps" => run.eval_steps as f64 == f(&e["eval_steps"]),
                _ => run.eval_steps == 0,
            },
        );
        let lora = &e["lora"];
        check("rank", c.lora.r as f64 == f(&lora["r"]));
        check("alpha", c.lora.alpha == f(&lora["lora_alpha"]));
        check(
            "dropout",
            (c.lora.dropout as f64 - f(&lora["lora_dropout"])).abs() < 1e-7,
        );
        check(
            "rslora",
            c.lora.use_rslora == lora["use_rslora"].as_bool().unwrap(),
        );
        check(
            "dora",
            c.lora.use_dora == lora["use_dora"].as_bool().unwrap(),
        );
        let mut targets = c.lora.targets.clone();
        targets.sort();
        let trl_targets: Vec<String> = match &lora["target_modules"] {
            Value::String(s) => vec![s.clone()],
            list => list
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect(),
        };
        check("targets", targets == trl_targets);
        // bitsandbytes NF4 where TRL quantizes; nibble's NF4 (with a note) where it does not.
        check(
            "quant",
            s.quant.map(nibble::value_name).as_deref()
                == e["load_in_4bit"].as_bool().unwrap().then_some("nf4"),
        );
        let noted_16_bit = recipe.notes.iter().any(|n| n.contains("16 bits"));
        check(
            "16-bit note",
            noted_16_bit != e["load_in_4bit"].as_bool().unwrap(),
        );
    }
}

/// Every TRL option nibble takes as it is defaults to what nibble's does, so a recipe that leaves it
/// out means the same in both (those whose defaults differ are filled in from TRL's table).
#[test]
fn trl_and_nibble_default_alike_where_nibble_takes_the_option_as_it_is() {
    let nibble: std::collections::HashMap<&str, String> = defaults_for_help().into_iter().collect();
    let taken = trl_config::options_taken_as_they_are();
    assert!(taken.len() >= 20, "{taken:?}");
    for (name, id, trl_default) in taken {
        let ours = &nibble[id.as_str()];
        let alike = match &trl_default {
            // None in TRL: none in nibble too (or nothing to default, such as the model).
            Value::Null => ours.starts_with("none") || ours == "required" || ours == "the model's",
            Value::Number(n) => ours.parse::<f64>().ok() == n.as_f64(),
            Value::Bool(b) => *ours == b.to_string(),
            Value::String(s) => ours == s,
            other => panic!("{name}: {other}"),
        };
        assert!(
            alike,
            "{name}: TRL's default {trl_default}, nibble's {id} {ours}"
        );
    }
}

#[test]
fn options_nibble_cannot_honour_are_refused_by_name() {
    let dir = qwen2_folder();
    let head = format!(
        "model_name_or_path: {}\ndataset_name: chats.jsonl\n",
        dir.path().join("model").display()
    );
    let cases = [
        ("use_peft: false\n", "use_peft: false"),
        ("load_in_8bit: true\n", "load_in_8bit"),
        (
            "load_in_4bit: true\nbnb_4bit_quant_type: fp4\n",
            "bnb_4bit_quant_type: fp4",
        ),
        ("lora_modules_to_save: [lm_head]\n", "lora_modules_to_save"),
        (
            "save_strategy: steps\nsave_steps: 0.5\n",
            "`save_steps: 0.5`: a whole number of steps",
        ),
        ("lora_target_modules: q_proj\n", "regular expression"),
        ("lora_task_type: SEQ_CLS\n", "SEQ_CLS"),
        ("optim: adafactor\n", "optim: adafactor"),
        (
            "label_smoothing_factor: 0.1\n",
            "label_smoothing_factor: 0.1",
        ),
        ("eos_token: 7\n", "eos_token: 7"),
        ("dataloader_drop_last: true\n", "dataloader_drop_last"),
        ("num_train_epochs: 0\n", "epochs > 0"),
        ("learnig_rate: 1e-4\n", "did you mean `learning_rate`"),
        ("learning_rate: 1e-4\nlr: 2e-4\n", "give it once"),
        ("learning_rate: fast\n", "learning_rate: fast"),
        ("eval_strategy: steps\n", "needs validation data"),
        (
            "eval_strategy: \"no\"\neval_split: 0.2\n",
            "would not validate",
        ),
        (
            "datasets:\n  - path: a\n    fraction: 0.3\n  - path: b\n    fraction: 0.7\n",
            "`fraction: 0.3` in a mixture of 2",
        ),
        (
            "datasets:\n  - path: json\n    data_files: 7\n",
            "a file name or a list",
        ),
        (
            "datasets:\n  - path: json\n    data_files: a.jsonl\n    split: train[:10]\n",
            "`split: train[:10]` takes part of the rows",
        ),
        (
            "datasets:\n  - path: json\n    data_files: a.jsonl\n    split: test\n",
            "`split: test` with data_files that are not keyed by split",
        ),
        (
            "datasets:\n  - path: json\n    data_files: a.jsonl\ntest_split_size: 50\n",
            "test_split_size: 50",
        ),
        ("max_length: null\n", "max_length: null"),
        ("load_in_4bit: true\nload_in_8bit: true\n", "both true"),
        ("num_processes: 2\n", "num_processes: 2"),
        ("dataset_streaming: true\n", "dataset_streaming"),
        (
            "shuffle_dataset: true\ntrain_sampling_strategy: sequential\n",
            "shuffle_dataset",
        ),
        ("dataset_train_split: validation\n", "no such split"),
        ("data_seed: 3\n", "data_seed"),
        (
            "assistant_only_loss: true\ncompletion_only_loss: false\n",
            "assistant_only_loss",
        ),
        (
            "train_sampling_strategy: group_by_length\n",
            "group_by_length",
        ),
        ("config: other.yaml\n", "another options file"),
        (
            "lr_scheduler_type: reduce_lr_on_plateau\n",
            "reduce_lr_on_plateau",
        ),
    ];
    for (extra, says) in cases {
        let peft = if extra.contains("use_peft") {
            ""
        } else {
            "use_peft: true\n"
        };
        let err = match read(&format!("{head}{peft}{extra}"), &TrainSettings::default()) {
            Ok(r) => r.settings.train_config().err().map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        let err = err.unwrap_or_else(|| panic!("`{extra}` was accepted"));
        assert!(
            err.contains(says) && err.contains("recipe.yaml"),
            "`{extra}`: {err}"
        );
    }
    // Not a mapping, not YAML (the line named), a duplicated key: the file is named.
    for (text, says) in [
        ("- a\n- b\n", "one YAML mapping"),
        ("", "one YAML mapping"),
        ("lr: [1, 2\n", "line"),
        ("lr: 1\nlr: 2\n", "duplicate"),
        ("a: &x 1\nlr: *x\n", "aliases"),
    ] {
        let err = read(text, &TrainSettings::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(says) && err.starts_with("recipe.yaml"),
            "{text:?}: {err}"
        );
    }
    // Without lora_target_modules PEFT picks by the model's type, and has no pick for Phi-3.
    std::fs::write(
        dir.path().join("model/config.json"),
        r#"{"model_type": "phi3"}"#,
    )
    .unwrap();
    let err = read(&head, &TrainSettings::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("phi3") && err.contains("lora_target_modules"),
        "{err}"
    );
}

/// PEFT's default modules (for a LoraConfig without target_modules) for every model type nibble
/// trains, as PEFT's table has them.
#[test]
fn peft_default_targets_are_peft_s() {
    let expected = trl_expected();
    let table = expected["peft_default_targets"].as_object().unwrap();
    let types = nibble::config::Arch::ALL
        .iter()
        .map(|a| a.model_type())
        .chain(["gemma3", "mistral3", "gemma4"]);
    for model_type in types {
        let ours = trl_config::peft_default_targets(model_type);
        let peft = table
            .get(model_type)
            .unwrap_or_else(|| panic!("{model_type} is not in the fixture: run the script again"));
        let alike = match peft {
            Value::Null => ours.is_none(),
            // A list of names.
            Value::Array(names) => {
                let mut names: Vec<&str> = names.iter().map(|n| n.as_str().unwrap()).collect();
                names.sort();
                ours.map(|o| o.split(',').collect::<Vec<_>>()) == Some(names)
            }
            // A regular expression over the language model's modules (Gemma 4's).
            Value::String(pattern) => ours.is_some_and(|o| {
                o.split(',').all(|name| pattern.contains(name))
                    && pattern.contains("language_model")
            }),
            other => panic!("{other}"),
        };
        assert!(alike, "{model_type}: PEFT {peft}, nibble {ours:?}");
    }
}

/// What TRL takes otherwise than nibble's checks would: YAML 1.1 switches, fractional epochs under
/// max_steps, eval_steps 0, a one-dataset mixture, a folder of split files, options that only apply
/// with (or without) packing.
#[test]
fn recipes_trl_runs_run() {
    let dir = qwen2_folder();
    let head = format!(
        "model_name_or_path: {}\nuse_peft: true\nlora_target_modules: all-linear\n",
        dir.path().join("model").display()
    );
    let read_ok = |extra: &str, flags: &TrainSettings| {
        let recipe =
            read(&format!("{head}{extra}"), flags).unwrap_or_else(|e| panic!("{extra}: {e}"));
        let s = flags.clone().over(recipe.settings.clone()).unwrap();
        let c = s.train_config().unwrap_or_else(|e| panic!("{extra}: {e}"));
        let run = s.run_options().unwrap_or_else(|e| panic!("{extra}: {e}"));
        (recipe, s, c, run)
    };
    let none = TrainSettings::default();
    let (_, _, _, run) = read_ok(
        "dataset_name: d.jsonl\npacking: yes\npacking_strategy: wrapped\n",
        &none,
    );
    assert!(run.packing, "PyYAML's yes");
    // PEFT's parameters adapted by name (a Qwen2-MoE's experts), as TRL passes them to LoraConfig.
    let (_, _, c, _) = read_ok(
        "dataset_name: d.jsonl\nlora_target_parameters: [gate_up_proj, down_proj]\n",
        &none,
    );
    assert_eq!(c.lora.target_parameters, ["gate_up_proj", "down_proj"]);
    assert_eq!(nibble::value_name(run.packing_strategy), "wrapped");
    // Text where a switch goes, as argparse hands it to string_to_bool.
    let (_, _, _, run) = read_ok(
        "dataset_name: d.jsonl\npacking: \"true\"\neval_split: 0.3\neval_on_start: \"1\"\n",
        &none,
    );
    assert!(run.packing && run.eval_on_start, "quoted true and 1");
    let (r, _, _, run) = read_ok(
        "dataset_name: d.jsonl\npacking_strategy: wrapped\ntruncation_mode: keep_end\n",
        &none,
    );
    assert!(
        !run.packing && r.notes.iter().any(|n| n.contains("packing_strategy")),
        "{:?}",
        r.notes
    );
    let (_, _, c, _) = read_ok(
        "dataset_name: d.jsonl\nnum_train_epochs: 1.5\nmax_steps: 3\n",
        &none,
    );
    assert_eq!((c.epochs, c.max_steps), (2.0, Some(3)));
    let (_, _, c, _) = read_ok("dataset_name: d.jsonl\nnum_train_epochs: 1.5\n", &none);
    assert_eq!((c.epochs, c.max_steps), (1.5, None));
    let (_, _, c, run) = read_ok(
        "dataset_name: d.jsonl\neval_strategy: steps\neval_steps: 0\nlogging_steps: 7\nloss_type: chunked_nll\n",
        &flags(&["--eval-split", "0.1"]),
    );
    assert_eq!(run.eval_steps, 7, "every logging_steps");
    assert_eq!(nibble::value_name(c.loss_type), "nll");
    let (r, s, _, run) = read_ok(
        "dataset_name: ignored.jsonl\ndatasets:\n  - path: json\n    data_files: {train: a.jsonl, test: b.jsonl}\ntest_split_size: 0.2\n",
        &none,
    );
    assert_eq!(s.data, Some(vec![std::path::PathBuf::from("a.jsonl")]));
    assert_eq!(run.eval_split, Some(0.2));
    // Several datasets (a list of files is one dataset too): read one after the other, as TRL
    // concatenates them.
    let (_, s, _, _) = read_ok(
        "datasets:\n  - path: a.jsonl\n  - path: json\n    data_files: [b.jsonl, c.jsonl]\n  - path: json\n    data_files: {train: [d.jsonl]}\n",
        &none,
    );
    let files = ["a.jsonl", "b.jsonl", "c.jsonl", "d.jsonl"].map(std::path::PathBuf::from);
    assert_eq!(s.data, Some(files.to_vec()));
    assert!(
        r.notes.iter().any(|n| n.contains("both name data")),
        "{:?}",
        r.notes
    );
    let splits = dir.path().join("splits");
    std::fs::create_dir(&splits).unwrap();
    for file in ["train.jsonl", "test.jsonl"] {
        std::fs::write(splits.join(file), "{\"text\": \"x\"}\n").unwrap();
    }
    let (_, s, _, _) = read_ok(
        &format!("dataset_name: {}\neval_strategy: epoch\n", splits.display()),
        &none,
    );
    assert_eq!(s.data, Some(vec![splits.join("train")]));
    assert_eq!(s.eval_data, Some(splits.join("test")));
    // The command line's --quant leaves nothing to say of the 16-bit base.
    let (r, _, _, _) = read_ok("dataset_name: d.jsonl\n", &flags(&["--quant", "none"]));
    assert!(
        !r.notes.iter().any(|n| n.contains("16 bits")),
        "{:?}",
        r.notes
    );
    // PEFT would adapt a multimodal model's vision tower by the same names: said.
    let gemma3 = dir.path().join("gemma3");
    std::fs::create_dir(&gemma3).unwrap();
    std::fs::write(gemma3.join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
    let text = format!(
        "model_name_or_path: {}\nuse_peft: true\nlora_target_modules: all-linear\n",
        gemma3.display()
    );
    let r = read(&text, &none).unwrap();
    assert!(
        r.notes.iter().any(|n| n.contains("vision tower")),
        "{:?}",
        r.notes
    );
    // A typo on nibble sft's command line is the command line's, not the recipe's.
    let recipe_file = dir.path().join("r.yaml");
    std::fs::write(&recipe_file, &head).unwrap();
    let err = trl_config::read_command_line(&strings(&[
        "--config",
        recipe_file.to_str().unwrap(),
        "--lerning_rate",
        "1",
    ]))
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.starts_with("nibble sft") && err.contains("learning_rate"),
        "{err}"
    );
}

#[test]
fn what_changes_nothing_is_noted_and_flags_win() {
    let dir = qwen2_folder();
    let model = dir.path().join("model");
    let text = format!(
        "model_name_or_path: {}\ndataset_name: d.jsonl\noutput_dir: out\nuse_peft: true\n\
         load_in_4bit: true\nlora_target_modules: all-linear\nbf16: true\nreport_to: [wandb]\n\
         push_to_hub: true\ntorch_dtype: bfloat16\noptim: paged_adamw_8bit\nevaluation_strategy: \"no\"\n\
         resume_from_checkpoint: true\ntrain_sampling_strategy: sequential\n",
        model.display()
    );
    let recipe = read(&text, &TrainSettings::default()).unwrap();
    let notes = recipe.notes.join("\n");
    for said in [
        "bf16",
        "report_to",
        "torch_dtype",
        "never uploads",
        "fewer bits",
    ] {
        assert!(notes.contains(said), "{said}: {notes}");
    }
    assert!(!notes.contains("16 bits"), "{notes}");
    let s = &recipe.settings;
    assert_eq!(
        s.resume.as_deref(),
        Some(Path::new("out")),
        "true: the output folder"
    );
    assert_eq!(s.no_shuffle, Some(true));
    // The command line wins over the recipe, TRL's defaults included.
    let layered = flags(&["--lr", "1e-3", "--output", "elsewhere"])
        .over(recipe.settings.clone())
        .unwrap();
    let c = layered.train_config().unwrap();
    assert_eq!(
        (c.lr, c.batch_size),
        (1e-3, 8),
        "the flag, then TRL's default batch"
    );
    // A `datasets` folder of splits: TRL trains on its train split and evaluates on its test split.
    let splits = dir.path().join("ds");
    for split in ["train", "test"] {
        std::fs::create_dir_all(splits.join(split)).unwrap();
    }
    std::fs::write(
        splits.join("dataset_dict.json"),
        r#"{"splits": ["train", "test"]}"#,
    )
    .unwrap();
    let text = format!(
        "model_name_or_path: {}\ndataset_name: {}\nuse_peft: true\neval_strategy: epoch\n",
        model.display(),
        splits.display()
    );
    let s = read(&text, &TrainSettings::default()).unwrap().settings;
    assert_eq!(s.data, Some(vec![splits.join("train")]));
    assert_eq!(s.eval_data, Some(splits.join("test")));
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// `nibble sft` takes `trl sft`'s command line: flags over the recipe, lists as several values, bare
/// switches, `--name=value`, values typed as argparse types them.
#[test]
fn trl_sft_command_lines_read_as_trl_reads_them() {
    let dir = qwen2_folder();
    let recipe = dir.path().join("recipe.yaml");
    std::fs::write(&recipe, recipe_text("qwen_recipe.yaml", dir.path())).unwrap();
    let args = strings(&[
        "--config",
        recipe.to_str().unwrap(),
        "--learning_rate",
        "1e-3",
        "--lora_target_modules",
        "q_proj",
        "--packing",
        "--eval_strategy",
        "no",
        "--use_dora",
        "yes",
        "--max_steps=-1",
        "--save-strategy",
        "epoch",
        "--gradient_checkpointing",
        "--no_gradient_checkpointing",
        "--output_dir",
        "2024",
        "--device",
        "cpu",
    ]);
    let recipe = trl_config::read_command_line(&args).unwrap();
    let s = &recipe.settings;
    let c = s.train_config().unwrap();
    assert_eq!(c.lr, 1e-3, "the flag over the recipe");
    assert_eq!(
        (c.lora.r, c.grad_accum, c.epochs),
        (8, 4, 2.0),
        "the recipe"
    );
    assert_eq!(
        c.lora.targets,
        ["q_proj"],
        "one value of a list option is a list"
    );
    assert!(c.lora.use_dora, "argparse's yes");
    assert_eq!(c.max_steps, None, "-1: the epochs decide");
    let run = s.run_options().unwrap();
    assert!(run.packing && run.save_each_epoch && run.save_steps == 0);
    assert_eq!(
        s.device,
        Some(nibble::exec::Device::Cpu),
        "nibble's own option"
    );
    assert_eq!(
        s.gradient_checkpointing,
        Some(false),
        "--no_NAME, as HfArgumentParser's"
    );
    assert_eq!(
        s.output.as_deref(),
        Some(Path::new("2024")),
        "text, as argparse types it"
    );
    // nibble's names for the recipe's options win over the recipe too (`-o` as train takes it);
    // two names of one option on the command line are refused.
    let recipe_file = dir.path().join("recipe.yaml");
    let over = |extra: &[&str]| {
        let mut args = vec!["--config", recipe_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        trl_config::read_command_line(&strings(&args)).map_err(|e| e.to_string())
    };
    let s = over(&["--lr", "3e-3", "--epochs", "5", "-o", "elsewhere"])
        .unwrap()
        .settings;
    let c = s.train_config().unwrap();
    assert_eq!((c.lr, c.epochs), (3e-3, 5.0));
    assert_eq!(s.output.as_deref(), Some(Path::new("elsewhere")));
    std::fs::write(
        &recipe_file,
        recipe_text("qwen_recipe.yaml", dir.path()) + "overwrite_output_dir: false\n",
    )
    .unwrap();
    let s = over(&["--overwrite"]).unwrap().settings;
    assert_eq!(
        s.overwrite,
        Some(true),
        "the flag over overwrite_output_dir"
    );
    let err = over(&["--num_train_epochs", "1", "--epochs", "2"])
        .err()
        .unwrap();
    assert!(
        err.contains("nibble sft")
            && err.contains("--num_train_epochs and --epochs are one option"),
        "{err}"
    );
    // Without a recipe, TRL's defaults.
    let model = dir.path().join("model");
    let args = strings(&[
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--use_peft",
    ]);
    let c = trl_config::read_command_line(&args)
        .unwrap()
        .settings
        .train_config()
        .unwrap();
    assert_eq!((c.lr, c.batch_size, c.epochs, c.lora.r), (2e-5, 8, 3.0, 16));
    assert_eq!(
        c.lora.targets,
        ["q_proj", "v_proj"],
        "PEFT's default for qwen2"
    );
    // A dict option as JSON text, as HfArgumentParser reads it: loading options are noted, others
    // refused.
    let model_init = |kwargs: &str| {
        let args = strings(&[
            "--model_name_or_path",
            model.to_str().unwrap(),
            "--model_init_kwargs",
            kwargs,
        ]);
        trl_config::read_command_line(&args).map_err(|e| e.to_string())
    };
    let recipe = model_init(r#"{"torch_dtype": "bfloat16"}"#).unwrap();
    assert!(recipe.notes.join("\n").contains("model_init_kwargs"));
    let err = model_init(r#"{"rope_scaling": {"factor": 2}}"#)
        .err()
        .unwrap();
    assert!(
        err.contains("rope_scaling") && err.contains("ignores"),
        "{err}"
    );
    let err = model_init("{torch_dtype").err().unwrap();
    assert!(err.contains("not a JSON object"), "{err}");
    for (args, says) in [
        (vec!["model"], "--name value"),
        (vec!["--learning_rate", "1", "2"], "one value"),
        (vec!["--config"], "one file"),
        (vec!["--use_peft", "maybe"], "use_peft: maybe"),
        (vec!["--lora_rr", "4"], "did you mean `lora_r`"),
        // A bare flag is true only for a switch, as argparse has it.
        (vec!["--dataset_name"], "--dataset_name takes a value"),
        (
            vec!["--lora_target_modules", "--use_peft"],
            "--lora_target_modules takes one value or more",
        ),
    ] {
        let err = trl_config::read_command_line(&strings(&args))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(says) && err.starts_with("nibble sft"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_trl_recipe_trains_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let synth = common::nibble(&[
        "synth",
        "--preset",
        "tiny-qwen2",
        "--output",
        model.to_str().unwrap(),
    ]);
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    std::fs::write(
        dir.path().join("chats.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"What is nibble?\"}, {\"role\": \"assistant\", \"content\": \"A QLoRA trainer.\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Where?\"}, {\"role\": \"assistant\", \"content\": \"On laptops.\"}]}\n",
    )
    .unwrap();
    std::fs::copy(
        "tests/fixtures/trl_config/qwen_recipe.yaml",
        dir.path().join("recipe.yaml"),
    )
    .unwrap();
    let out = common::nibble_command()
        .current_dir(dir.path())
        .args([
            "train",
            "--config",
            "recipe.yaml",
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("ignored, as they change nothing") && log.contains("dtype"),
        "{log}"
    );
    let run = dir.path().join("qwen-lora");
    let adapter: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (adapter["r"].as_u64(), adapter["lora_alpha"].as_f64()),
        (Some(8), Some(16.0))
    );
    let recorded = std::fs::read_to_string(run.join("nibble_config.toml")).unwrap();
    for line in [
        "lr = 0.0002",
        "grad_accum = 4",
        "epochs = 2",
        "quant = \"nf4\"",
        "target_modules = \"all-linear\"",
    ] {
        assert!(recorded.contains(line), "{line}: {recorded}");
    }
    // `trl sft`'s command line as it is.
    let out = common::nibble_command()
        .current_dir(dir.path())
        .args([
            "sft",
            "--model_name_or_path",
            "model",
            "--dataset_name",
            "chats.jsonl",
            "--use_peft",
            "--load_in_4bit",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--learning_rate",
            "2e-4",
            "--output_dir",
            "sft-out",
            "--max_steps",
            "1",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("sft-out/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter["r"], 16, "TRL's default rank");
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // A value nibble's checks refuse is named as the recipe names it, beside nibble's flag.
    std::fs::write(
        dir.path().join("bad.yaml"),
        "model_name_or_path: model\ndataset_name: chats.jsonl\nuse_peft: true\noutput_dir: bad-out\n\
         per_device_train_batch_size: 0\n",
    )
    .unwrap();
    let out = common::nibble_command()
        .current_dir(dir.path())
        .args(["sft", "--config", "bad.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("bad.yaml: `per_device_train_batch_size` (nibble's --batch-size)"),
        "{stderr}"
    );
    // Hub ids (what TRL's recipes usually name) are not fetched: the error says how to get them.
    let out = common::nibble_command()
        .current_dir(dir.path())
        .args([
            "train",
            "--config",
            "recipe.yaml",
            "--dataset-name",
            "trl-lib/Capybara",
            "--output",
            "hub",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && log.contains("hub dataset id")
            && log.contains("--repo-type dataset trl-lib/Capybara"),
        "{log}"
    );
    // A TOML file stays TOML.
    std::fs::write(dir.path().join("bad.toml"), "use_peft: true\n").unwrap();
    let out = common::nibble_command()
        .current_dir(dir.path())
        .args(["train", "--config", "bad.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// `nibble sft` asks for what trl sft needs by TRL's names, the model first.
#[test]
fn sft_names_a_missing_model_dataset_or_output_as_trl_does() {
    let dir = qwen2_folder();
    let model = dir.path().join("model");
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "").unwrap();
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    for (args, says) in [
        (vec!["sft"], "--model_name_or_path is required"),
        (
            vec!["sft", "--model_name_or_path", model, "--use_peft"],
            "--dataset_name is required",
        ),
        (
            vec!["sft", "--model_name_or_path", model, "--dataset_name", data],
            "--output_dir is required",
        ),
    ] {
        let out = common::nibble(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
    // A split of a single file: datasets has only its train split (this was read as FILE/test).
    let text = format!(
        "model_name_or_path: {model}\nuse_peft: true\ndatasets:\n  - path: {data}\n    split: test\n"
    );
    let err = read(&text, &TrainSettings::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("single file is the split train"), "{err}");
}

/// A recipe TRL's parser refuses (tests/fixtures/trl_config/refused/, with the error
/// scripts/make_trl_config_fixture.py recorded: a quoted "on", which PyYAML keeps as text and
/// transformers' string_to_bool does not take) is refused by nibble, naming the option.
#[test]
fn recipes_trl_refuses_are_refused() {
    let expected = trl_expected();
    let refused = expected["refused"].as_object().unwrap();
    assert_eq!(refused.len(), 1);
    let dir = qwen2_folder();
    for (name, theirs) in refused {
        let text = recipe_text(&format!("refused/{name}"), dir.path());
        let none = TrainSettings::default();
        let ours = read(&text, &none)
            .and_then(|recipe| none.clone().over(recipe.settings))
            .and_then(|s| s.run_options().map(|_| ()))
            .expect_err(name)
            .to_string();
        assert!(
            ours.contains("packing"),
            "{name}: nibble {ours}; TRL {theirs}"
        );
    }
}
