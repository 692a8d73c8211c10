//! One FLUX.2 [klein] LoRA training step on the CPU executor, as `nibble train` takes it (forward,
//! backward into LoRA r=32 alpha 32 on every fused block linear, gradient checkpointing, clipping and
//! AdamW), beside scripts/bench_flux2_step.py (diffusers + peft on the same weights):
//!
//!     python scripts/bench_flux2_step.py --shape slice4b --out /tmp/slice4b     # writes and times torch
//!     NIBBLE_BENCH_MODEL=/tmp/slice4b cargo bench --bench flux2_step
//!
//! NIBBLE_BENCH_SIDE (latent grid side, default 32: 1024 image tokens, 512 px), NIBBLE_BENCH_TEXT
//! (caption tokens, default 512) and NIBBLE_BENCH_STEPS (timed steps, default 3) match the script's
//! options. Each storage (dense as stored, bf16; NF4 groups of 128) runs at the executor's default
//! precision.

use nibble::lora::LoraConfig;
use nibble::models::flux2;
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use nibble::train::flux2::{Cached, ImageWork, SigmaSampling};
use nibble::train::{Schedule, TrainConfig, Trainer};
use std::time::Instant;

fn main() {
    nibble::alloc::keep_freed_memory();
    let Some(path) = std::env::var_os("NIBBLE_BENCH_MODEL") else {
        eprintln!("set NIBBLE_BENCH_MODEL (see the header of benches/flux2_step.rs)");
        return;
    };
    let number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .map_or(default, |v| v.parse().expect("a whole number"))
    };
    let (side, text_tokens, steps) = (
        number("NIBBLE_BENCH_SIDE", 32),
        number("NIBBLE_BENCH_TEXT", 512),
        number("NIBBLE_BENCH_STEPS", 3),
    );
    let path = std::path::Path::new(&path);
    for (label, quant) in [
        ("dense (bf16 as stored)", None),
        (
            "NF4 g128",
            Some(QuantSpec::new(QuantFormat::Nf4, 128).unwrap()),
        ),
    ] {
        let model = flux2::load(path, quant).unwrap();
        let c = &model.config;
        let mut rng = Rng::new(7);
        let mut normal = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let example = Cached {
            latents: normal(side * side * c.in_channels),
            rows: side,
            cols: side,
            text: normal(text_tokens * c.text_dim).into(),
            references: Default::default(),
        };
        let work = ImageWork {
            model: (&model).into(),
            empty_caption: normal(text_tokens * c.text_dim),
            examples: vec![example],
            sampling: SigmaSampling::Sigmoid,
            caption_dropout: 0.0,
        };
        let config = TrainConfig {
            lora: LoraConfig {
                r: 32,
                alpha: 32.0,
                dropout: 0.0,
                use_rslora: false,
                targets: vec!["all-linear".into()],
                ..LoraConfig::default()
            },
            lr: 1e-4,
            weight_decay: 1e-4,
            schedule: Schedule::Constant,
            checkpoint: true,
            max_steps: Some(steps + 1),
            precision: Precision::fastest(),
            ..TrainConfig::default()
        };
        let precision = config.precision;
        let mut trainer = Trainer::for_images(work, config, None).unwrap();
        let mut times = Vec::new();
        for step in 0..=steps {
            let start = Instant::now();
            trainer.step().unwrap();
            if step > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{label}, {precision:?}: {} image + {text_tokens} text tokens, {} LoRA parameters, \
             threads {}: median {:.2} s/step (all {times:.2?})",
            side * side,
            trainer.adapter.parameter_count(),
            rayon::current_num_threads(),
            times[times.len() / 2]
        );
    }
}
