//! Training options as people give them: flags over a TOML file over a preset, each option declared once,
//! defaults from the trainer, and errors that name the file, line or option.

mod common;

use nibble::exec::Device;
use nibble::train::settings::TrainSettings;
use nibble::train::{LossOn, Schedule, TrainConfig};

use common::train_flags as flags;

#[test]
fn flags_win_over_the_file_and_the_file_over_the_preset() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.toml");
    std::fs::write(
        &file,
        "preset = \"qwen2.5-cpu\"\nlr = 5e-4\nepochs = 3\nlr_scheduler = \"cosine\"\ndevice = \"cpu\"\n",
    )
    .unwrap();
    let config_flag = file.display().to_string();
    let settings = TrainSettings::layered(flags(&[
        "--config",
        &config_flag,
        "--epochs",
        "5",
        "--loss-on",
        "assistant",
    ]))
    .unwrap();
    let config = settings.train_config().unwrap();
    assert_eq!(config.epochs, 5.0, "the flag");
    assert_eq!(config.lr, 5e-4, "the file");
    assert_eq!(config.schedule, Schedule::Cosine, "the file");
    assert_eq!(config.grad_accum, 4, "the preset");
    assert_eq!(config.loss_on, LossOn::Assistant, "the flag");
    assert_eq!(settings.device, Some(Device::Cpu), "the file");
    let defaults = TrainConfig::default();
    assert_eq!(
        config.max_length, defaults.max_length,
        "nobody's: the default"
    );
    assert_eq!(config.seed, defaults.seed);
}

#[test]
fn every_preset_parses_and_names_the_recipe() {
    let preset = TrainSettings::preset("qwen2.5-cpu").unwrap();
    let config = preset.train_config().unwrap();
    assert_eq!((config.lora.r, config.lora.alpha), (8, 16.0));
    assert_eq!(
        (config.batch_size, config.grad_accum, config.epochs),
        (1, 4, 2.0)
    );
    let err = TrainSettings::preset("qwen9").unwrap_err().to_string();
    assert!(
        err.contains("unknown preset `qwen9`") && err.contains("qwen2.5-cpu"),
        "{err}"
    );
}

#[test]
fn a_bad_file_is_named_with_its_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "lr = 1e-4\nlr_scheduler = \"sawtooth\"\n").unwrap();
    let err = TrainSettings::layered(TrainSettings {
        config: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("line 2") && err.contains("sawtooth"), "{err}");

    std::fs::write(&file, "learning_rat = 1e-4\n").unwrap();
    let err = TrainSettings::layered(TrainSettings {
        config: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("learning_rat"),
        "an unknown key is named: {err}"
    );
    // An option given under both its names.
    std::fs::write(&file, "lr = 1e-4\nlearning_rate = 2e-4\n").unwrap();
    let err = TrainSettings::layered(TrainSettings {
        config: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("give it once"), "{err}");
}

#[test]
fn the_page_json_uses_the_same_names_and_defaults() {
    let settings =
        TrainSettings::parse_json(r#"{"lr": 3e-3, "lora_r": 4, "lr_scheduler": "constant"}"#)
            .unwrap();
    let config = settings.train_config().unwrap();
    assert_eq!((config.lr, config.lora.r), (3e-3, 4));
    assert_eq!(config.schedule, Schedule::Constant);
    assert_eq!(config.lora.alpha, TrainConfig::default().lora.alpha);
    assert!(settings.outside_the_page().is_empty());
    let with_file =
        TrainSettings::parse_json(r#"{"data": "x.jsonl", "resume": "out", "device": "cpu"}"#)
            .unwrap();
    assert_eq!(
        with_file.outside_the_page(),
        vec!["data", "resume", "device"]
    );
    let preset = TrainSettings::parse_json(r#"{"preset": "qwen2.5-cpu", "epochs": 1}"#)
        .and_then(TrainSettings::with_preset)
        .unwrap();
    let config = preset.train_config().unwrap();
    assert_eq!(
        (config.epochs, config.grad_accum),
        (1.0, 4),
        "the page's value over the preset's"
    );
    let err = TrainSettings::parse_json(r#"{"schedule": "linear"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("schedule"), "{err}");
}

#[test]
fn out_of_range_options_are_refused_by_name() {
    for (args, named) in [
        (
            &["--warmup-ratio", "1.5"][..],
            "--warmup-ratio must be in [0, 1) (got 1.5)",
        ),
        (&["--lora-dropout", "1.0"][..], "--lora-dropout"),
        (&["--lora-dropout", "2"][..], "--lora-dropout"),
        (&["--target-modules", " , "][..], "--target-modules"),
        (
            &["--lr", "NaN"][..],
            "--lr must be a finite number >= 0 (got NaN)",
        ),
        (
            &["--lr=-1e-4"][..],
            "--lr must be a finite number >= 0 (got -0.0001)",
        ),
        (&["--max-grad-norm", "NaN"][..], "--max-grad-norm"),
        (&["--weight-decay", "inf"][..], "--weight-decay"),
        (&["--lora-alpha", "0"][..], "--lora-alpha"),
        (&["--lora-r", "0"][..], "--lora-r"),
        (&["--epochs", "0"][..], "--epochs"),
        (&["--max-steps", "0"][..], "--max-steps"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--grad-accum", "0"][..], "--grad-accum"),
        (&["--max-length", "1"][..], "--max-length"),
    ] {
        let err = flags(args).train_config().unwrap_err().to_string();
        assert!(err.contains(named), "{args:?}: {err}");
    }
    let err = flags(&["--eval-split", "1.0"])
        .run_options()
        .unwrap_err()
        .to_string();
    assert!(err.contains("--eval-split"), "{err}");
    let err = flags(&["--eval-split", "0.1", "--eval-data", "v.jsonl"])
        .run_options()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not both"), "{err}");
}

/// `target_modules` in an options file as PEFT and TRL write it, a list, or as the flag takes it, one
/// string; anything else is refused naming the line and what is expected.
#[test]
fn target_modules_are_a_list_or_a_string_in_an_options_file() {
    let origin = std::path::Path::new("run.toml");
    let targets = |text: &str| {
        TrainSettings::parse_toml(text, origin)
            .and_then(|s| s.train_config())
            .map(|c| c.lora.targets)
    };
    let pair = vec!["q_proj".to_string(), "v_proj".to_string()];
    assert_eq!(
        targets("target_modules = [\"q_proj\", \"v_proj\"]").unwrap(),
        pair
    );
    assert_eq!(
        targets("lora_target_modules = [\"q_proj\", \"v_proj\"]").unwrap(),
        pair
    );
    assert_eq!(targets("target_modules = \"q_proj,v_proj\"").unwrap(), pair);
    for bad in ["target_modules = [1]", "target_modules = 5"] {
        let err = targets(bad).unwrap_err().to_string();
        assert!(
            err.contains("run.toml") && err.contains("line 1") && err.contains("module names"),
            "{err}"
        );
    }
}
