//! A whole training step (forward + backward into LoRA r=8 on all seven linears, NF4 group 64 base) of
//! a Qwen2.5-0.5B-shaped random model on the CPU executor (the decoder graph), at 64 and 256 tokens.
//! (Commit 4d5f038 ran it beside the hand-written step the graph replaced: BENCHMARKS.md, session 6.)
//!
//!     cargo run --release -- synth --preset qwen2.5-0.5b --output /tmp/q05
//!     NIBBLE_BENCH_MODEL=/tmp/q05 cargo bench --bench cpu_step

use nibble::cpu::{self, Sequence, StepOptions};
use nibble::lora::{LoraAdapter, LoraConfig};
use nibble::model::{ModelSource, QuantRequest};
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use std::time::Instant;

fn main() {
    // As the nibble binary runs.
    nibble::alloc::keep_freed_memory();
    let Some(path) = std::env::var_os("NIBBLE_BENCH_MODEL") else {
        eprintln!(
            "set NIBBLE_BENCH_MODEL to a model folder (see the header of benches/cpu_step.rs)"
        );
        return;
    };
    let source = ModelSource::open(std::path::Path::new(&path)).unwrap();
    let model = source
        .load(Some(QuantRequest::Quantize(
            QuantSpec::new(QuantFormat::Nf4, 64).unwrap(),
        )))
        .unwrap();
    let mut rng = Rng::new(0);
    let adapter = LoraAdapter::init(&model.config, LoraConfig::default(), &mut rng).unwrap();
    println!(
        "threads: {}, LoRA parameters: {}",
        rayon::current_num_threads(),
        adapter.parameter_count()
    );
    // NIBBLE_BENCH_ONLY=default-256 (or f32-64, default-190, ...) runs one configuration, e.g. under a
    // profiler or at a recipe's sequence length.
    let configurations: Vec<(Precision, usize)> = match std::env::var("NIBBLE_BENCH_ONLY") {
        Ok(only) => {
            let (precision, tokens) = only
                .split_once('-')
                .expect("NIBBLE_BENCH_ONLY is PRECISION-TOKENS");
            let precision = if precision == "f32" {
                Precision::F32
            } else {
                Precision::fastest()
            };
            vec![(precision, tokens.parse().expect("a token count"))]
        }
        Err(_) => vec![
            (Precision::F32, 64),
            (Precision::F32, 256),
            (Precision::fastest(), 64),
            (Precision::fastest(), 256),
        ],
    };
    // NIBBLE_BENCH_REPS: steps per configuration, the first a warm-up (default 4).
    let repetitions: usize = std::env::var("NIBBLE_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4)
        .max(2);
    for (precision, tokens) in configurations {
        let ids: Vec<u32> = (0..tokens).map(|_| rng.below(150000) as u32).collect();
        let seq = Sequence::all_tokens(ids);
        let mut times = Vec::new();
        for _ in 0..repetitions {
            let mut grads = adapter.zeros_like();
            let t = Instant::now();
            let options = StepOptions {
                grad_scale: 1.0,
                checkpoint: false,
                checkpoints: nibble::graph::checkpoint::Keep::F32,
                precision,
                ..Default::default()
            };
            cpu::forward_backward_with(
                &model,
                Some(&adapter),
                Some(&mut grads),
                &seq,
                options,
                Some(&mut rng),
            )
            .unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0); // warm-up
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        println!(
            "{precision:?} {tokens:>4} tokens: {median:.3} s per forward+backward (fastest {:.3} s), {:.0} tokens/s",
            times[0],
            tokens as f64 / median
        );
    }
}
