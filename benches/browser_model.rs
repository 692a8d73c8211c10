//! The browser demo's workload on the native CPU executor, for comparison with web/test.sh's steps/s:
//! the built-in model, the page's default options and example chats, 30 optimizer steps.
//!   cargo bench --bench browser_model

use nibble::data::parse_jsonl;
use nibble::model::ModelSource;
use nibble::tokenizer::ChatTokenizer;
use nibble::train::{self, Trainer};

fn main() {
    let source = ModelSource::open_folder(nibble::synth::browser_model()).unwrap();
    let tok =
        ChatTokenizer::from_files(&source.tokenizer, std::path::Path::new("builtin")).unwrap();
    let model = source.load(None).unwrap();
    let jsonl = nibble::data::demo_jsonl();
    // The page's default options: the demo preset, 30 of its steps.
    let mut config = nibble::train::settings::TrainSettings::preset("demo")
        .unwrap()
        .train_config()
        .unwrap();
    config.max_steps = Some(30);
    let sequences = parse_jsonl(&jsonl, "chats")
        .unwrap()
        .iter()
        .map(|ex| {
            train::tokenize(&tok, ex, config.loss_on, config.max_length)
                .unwrap()
                .0
        })
        .collect();
    let mut trainer = Trainer::new(&model, config, sequences, None).unwrap();
    let start = std::time::Instant::now();
    let (mut first, mut last) = (None, 0.0);
    while !trainer.done() {
        let r = trainer.step().unwrap();
        first.get_or_insert(r.loss);
        last = r.loss;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "native CPU executor: 30 steps in {seconds:.2} s ({:.1} steps/s), loss {:.4} -> {last:.4}",
        30.0 / seconds,
        first.unwrap()
    );
}
