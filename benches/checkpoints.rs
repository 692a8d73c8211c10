//! What keeping the checkpoints costs in time: one training step (forward and backward into LoRA r=8 on
//! every linear, NF4 group 64, gradient checkpointing) with each layer's input kept in f32, in bf16, and
//! in bf16 offloaded to host memory, on the CPU executor and (where there is one, lavapipe included) the
//! GPU executor. A Llama-shaped random model of hidden 512, intermediate 1536, 8 layers, vocabulary
//! 4000, written to a temporary folder; the steps of each configuration alternate so that a machine's
//! changing load falls on all of them alike.
//!
//!     cargo bench --bench checkpoints
//!
//! NIBBLE_BENCH_TOKENS (default 1024) and NIBBLE_BENCH_REPS (default 3, after one warm-up) set the step;
//! NIBBLE_BENCH_DEVICE=cpu or gpu measures one executor only.

use nibble::cpu::{self, Sequence, StepOptions};
use nibble::exec::gpu::{SequenceOptions, record_sequence};
use nibble::gpu::weights::{GpuLora, GpuModel, zero_grads};
use nibble::graph::checkpoint::Keep;
use nibble::lora::{LoraAdapter, LoraConfig};
use nibble::model::{ModelSource, QuantRequest};
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use std::time::Instant;

fn main() {
    nibble::alloc::keep_freed_memory();
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (tokens, reps) = (
        env("NIBBLE_BENCH_TOKENS", 1024),
        env("NIBBLE_BENCH_REPS", 3),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut spec = nibble::synth::SynthSpec::tiny(nibble::config::Arch::Llama, 4000);
    (spec.hidden_size, spec.intermediate_size, spec.num_layers) = (512, 1536, 8);
    (spec.num_heads, spec.num_kv_heads, spec.head_dim) = (8, 2, Some(64));
    nibble::synth::write_model_folder(dir.path(), &spec, None).unwrap();
    let quant = QuantSpec::new(QuantFormat::Nf4, 64).unwrap();
    let model = ModelSource::open(dir.path())
        .unwrap()
        .load(Some(QuantRequest::Quantize(quant)))
        .unwrap();
    let mut rng = Rng::new(0);
    let config = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::init(&model.config, config, &mut rng).unwrap();
    let seq = Sequence::all_tokens((0..tokens).map(|_| rng.below(4000) as u32).collect());
    let keeps = [Keep::F32, Keep::Bf16, Keep::Bf16Host];
    let mut grads = adapter.zeros_like();
    let mut cpu_step = |keep: Keep| {
        let options = StepOptions {
            grad_scale: 1.0 / tokens as f32,
            checkpoint: true,
            checkpoints: keep,
            precision: Precision::F32,
            ..Default::default()
        };
        let start = Instant::now();
        cpu::forward_backward_with(
            &model,
            Some(&adapter),
            Some(&mut grads),
            &seq,
            options,
            None,
        )
        .unwrap();
        start.elapsed().as_secs_f64()
    };
    let device = std::env::var("NIBBLE_BENCH_DEVICE").unwrap_or_default();
    if device != "gpu" {
        report("CPU executor", tokens, &keeps, reps, &mut cpu_step);
    }
    if device == "cpu" {
        return;
    }
    let Ok(gpu) = nibble::gpu::Gpu::new(true) else {
        println!("no GPU: the GPU executor was not measured");
        return;
    };
    let (gm, gl) = (
        GpuModel::upload(&gpu, &model).unwrap(),
        GpuLora::upload(&gpu, &adapter),
    );
    let gpu_grads = zero_grads(&gpu, &adapter);
    let mut gpu_step = |keep: Keep| {
        let options = SequenceOptions {
            grad_scale: 1.0 / tokens as f32,
            checkpoint: true,
            checkpoints: keep,
            dropout: None,
            ..Default::default()
        };
        let start = Instant::now();
        let mut enc = gpu.encoder();
        let losses = record_sequence(
            &gpu,
            &gm,
            Some(&gl),
            Some(&gpu_grads),
            &seq,
            options,
            &mut enc,
        )
        .unwrap()
        .unwrap();
        gpu.submit_and_read(enc, &[&losses]).unwrap();
        start.elapsed().as_secs_f64()
    };
    report(
        &format!("GPU executor on {}", gpu.info.name),
        tokens,
        &keeps,
        reps,
        &mut gpu_step,
    );
}

/// Runs a warm-up step of each configuration, then `reps` rounds of one step of each, and prints each
/// configuration's median.
fn report(
    what: &str,
    tokens: usize,
    keeps: &[Keep],
    reps: usize,
    step: &mut dyn FnMut(Keep) -> f64,
) {
    for &keep in keeps {
        step(keep);
    }
    let mut times = vec![Vec::new(); keeps.len()];
    for _ in 0..reps {
        for (i, &keep) in keeps.iter().enumerate() {
            times[i].push(step(keep));
        }
    }
    println!("{what}, {tokens} tokens:");
    for (keep, mut t) in keeps.iter().zip(times) {
        t.sort_by(f64::total_cmp);
        println!(
            "  checkpoints {:<9} median {:.3} s per step (of {:?})",
            format!("{keep:?}"),
            t[t.len() / 2],
            t.iter()
                .map(|s| (s * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>()
        );
    }
}
