//! The GPU executor (on Mesa lavapipe in CI, on a real GPU where present) against transformers + peft
//! fixtures and against the CPU executor. Without any Vulkan device these tests skip, unless
//! NIBBLE_REQUIRE_GPU is set (CI sets it, so a missing driver fails there rather than passing silently).

mod common;

use common::{fixture, gpu, rel};
use nibble::cpu;
use nibble::exec;
use nibble::gpu::Gpu;
use nibble::gpu::weights::{self, GpuLora, GpuModel};

fn check(gpu: &Gpu, name: &str, quant: &str) {
    let f = fixture(name, quant);
    let gm = GpuModel::upload(gpu, &f.model).unwrap();
    let gl = GpuLora::upload(gpu, &f.adapter);

    let logits = exec::gpu::logits(gpu, &gm, Some(&gl), &f.seq.ids).unwrap();
    let e = rel(&logits, &f.tensors.read_f32("logits").unwrap());
    assert!(
        e < 1e-5,
        "{name} {quant}: GPU logits differ from transformers by {e:e}"
    );

    let n = f.seq.target_count();
    let grads = weights::zero_grads(gpu, &f.adapter);
    let loss =
        exec::gpu::forward_backward(gpu, &gm, Some(&gl), Some(&grads), &f.seq, 1.0 / n as f32)
            .unwrap();
    let mean = loss.loss_sum / loss.targets as f64;
    // Measured on lavapipe: logits within 8.3e-7, the loss within 1.1e-7, gradients within 2.1e-6 (of
    // transformers' or the CPU's); held to 1e-5, 1e-6 and 1e-5.
    assert!(
        (mean - f.loss).abs() / f.loss < 1e-6,
        "{name} {quant}: GPU loss {mean} vs {}",
        f.loss
    );

    let mut ours = f.adapter.zeros_like();
    grads.download(gpu, &mut ours).unwrap();
    let mut cpu_grads = f.adapter.zeros_like();
    cpu::forward_backward(
        &f.model,
        Some(&f.adapter),
        Some(&mut cpu_grads),
        &f.seq,
        1.0 / n as f32,
        None,
    )
    .unwrap();
    let mut worst = (0.0f64, String::new());
    for ((path, g), (_, c)) in ours.pairs().zip(cpu_grads.pairs()) {
        for which in [nibble::lora::Factor::A, nibble::lora::Factor::B] {
            // As PEFT's file holds them (gpt-oss's gate_up B rows interleaved).
            let (gv, cv) = (g.peft_factor(which), c.peft_factor(which));
            let key = ours.saved_key(path, which);
            let worse = rel(&gv, &f.tensors.read_f32(&key).unwrap()).max(rel(&gv, &cv));
            if worse > worst.0 {
                worst = (worse, key);
            }
        }
    }
    // As tests/hf_parity.rs: transformers' own f32 gradients of the E2B model are 1.8e-5 off its f64.
    // Gemma 4's experts beside the MLP: measured 6.3e-6 on lavapipe, held to about ten times that.
    let tolerance = match name {
        "gemma4_e2b" => 1e-4,
        "gemma4_moe" => 6e-5,
        _ => 1e-5,
    };
    assert!(
        worst.0 < tolerance,
        "{name} {quant}: GPU gradient {} differs by {:e}",
        worst.1,
        worst.0
    );
    eprintln!(
        "{name} {quant}: GPU logits {e:.1e}, loss {:.1e}, worst gradient {:.1e}",
        (mean - f.loss).abs() / f.loss,
        worst.0
    );
}

#[test]
fn gpu_executor_matches_transformers_and_the_cpu_executor() {
    let Some(gpu) = gpu() else { return };
    for name in common::families().into_iter().chain(["gemma4_e2b"]) {
        for quant in ["none", "nf4"] {
            check(&gpu, name, quant);
        }
    }
}

/// gpt-oss (attention sinks, sliding and full layers, biased experts behind a biased router, the
/// clamped SwiGLU; LoRA on the attention and the experts) on the GPU executor.
#[test]
fn gpt_oss_on_the_gpu_matches_transformers_and_the_cpu_executor() {
    let Some(gpu) = gpu() else { return };
    for quant in ["none", "nf4"] {
        check(&gpu, "gpt_oss", quant);
    }
}

/// Gemma 4's experts beside the dense MLP (26B-A4B's block: the router a linear on its own norm,
/// the per-expert scales) on the GPU executor.
#[test]
fn gemma4_moe_on_the_gpu_matches_transformers_and_the_cpu_executor() {
    let Some(gpu) = gpu() else { return };
    for quant in ["none", "nf4"] {
        check(&gpu, "gemma4_moe", quant);
    }
}

#[test]
fn weights_larger_than_a_binding_run_in_row_blocks() {
    let Some(mut gpu) = gpu() else { return };
    // Bindings of a few rows: every linear spans 2 to 16 blocks (dense f32 rows are 256 or 512 bytes,
    // packed ones 32 or 64) and the embedding tens, as a 7B model's dense projections do on a real
    // device's limit.
    for (quant, limit) in [("none", 2048), ("nf4", 256)] {
        gpu.max_binding = limit;
        let f = fixture("qwen2", quant);
        let linears = f.model.layers.len() * 7;
        let blocks = GpuModel::upload(&gpu, &f.model)
            .unwrap()
            .linear_weight_buffers();
        assert!(
            blocks >= 2 * linears,
            "{quant}: {blocks} blocks for {linears} linears"
        );
        check(&gpu, "qwen2", quant);
        // DoRA's factors, each block its rows' (and the linears' backward through their blocks).
        let dora = common::as_dora(&f.model, &f.adapter, 0.0);
        let mut rng = nibble::rng::Rng::new(6);
        let vocab = f.model.config.vocab_size as u64;
        let ids = (0..13).map(|_| rng.below(vocab) as u32).collect();
        let seq = cpu::Sequence::all_tokens(ids);
        assert_step_matches_cpu(
            &gpu,
            &f.model,
            &dora,
            &seq,
            1e-4,
            &format!("DoRA, {quant} in blocks"),
        );
    }
    // A row that fits no binding is an error naming the tensor, not a panic.
    gpu.max_binding = 256;
    let f = fixture("qwen2", "none");
    let err = GpuModel::upload(&gpu, &f.model)
        .err()
        .expect("a 512-byte row cannot fit");
    assert!(err.to_string().contains("mlp.down_proj.weight"), "{err}");
}

/// A sequence whose activations would not fit one of the device's storage bindings is an error that
/// names the limit and what to change, raised before anything is recorded (wgpu would panic).
#[test]
fn a_sequence_too_long_for_the_device_is_an_error() {
    use nibble::cpu::Sequence;
    use nibble::ops::cross_entropy::VOCAB_CHUNK;
    let Some(gpu) = gpu() else { return };
    let f = fixture("qwen2", "nf4");
    let c = &f.model.config;
    let widest = [
        c.hidden_size,
        c.intermediate_size,
        c.q_dim(0),
        VOCAB_CHUNK.min(c.vocab_size),
    ]
    .into_iter()
    .max()
    .unwrap();
    let fits = (gpu.device_binding_limit() / (4 * widest as u64)) as usize;
    let gm = GpuModel::upload(&gpu, &f.model).unwrap();
    let gl = GpuLora::upload(&gpu, &f.adapter);
    let grads = weights::zero_grads(&gpu, &f.adapter);
    let seq = Sequence::all_tokens(vec![1; fits + 1]);
    let err = exec::gpu::forward_backward(&gpu, &gm, Some(&gl), Some(&grads), &seq, 1.0)
        .expect_err("too long for a binding");
    let message = err.to_string();
    assert!(
        message.contains(&format!("at most {fits} tokens")) && message.contains("--max-length"),
        "{message}"
    );
}

#[test]
fn eval_on_gpu_agrees_with_cpu() {
    if gpu().is_none() {
        return;
    }
    use nibble::synth::{self, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("m");
    synth::write_model_folder(
        &model_dir,
        &SynthSpec::tiny(nibble::config::Arch::Qwen3, 151936),
        Some(&synth::qwen25_tokenizer()),
    )
    .unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi there\"}, {\"role\": \"assistant\", \"content\": \"Hello! How can I help?\"}]}\n{\"text\": \"The quick brown fox.\"}\n",
    )
    .unwrap();
    let run = |device: &str| -> serde_json::Value {
        let out = common::nibble(&[
            "eval",
            "--model",
            model_dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--device",
            device,
            "--quant",
            "int4",
            "--group-size",
            "32",
            "--precision",
            "f32",
        ]);
        assert!(
            out.status.success(),
            "{device}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (cpu, gpu) = (run("cpu"), run("gpu"));
    assert_eq!(cpu["tokens"], gpu["tokens"]);
    for key in ["loss", "entropy"] {
        let (a, b) = (cpu[key].as_f64().unwrap(), gpu[key].as_f64().unwrap());
        assert!((a - b).abs() / a < 1e-5, "{key}: cpu {a} vs gpu {b}");
    }
    // The same tokens ranked first (one may flip where two logits all but tie).
    let tokens = cpu["tokens"].as_f64().unwrap();
    let (a, b) = (
        cpu["mean_token_accuracy"].as_f64().unwrap(),
        gpu["mean_token_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() * tokens <= 1.0,
        "accuracy: cpu {a} vs gpu {b}"
    );
}

#[test]
fn gpu_step_memory_follows_the_plan() {
    let Some(gpu) = gpu() else { return };
    use nibble::config::Arch;
    use nibble::synth::SynthSpec;
    let mut spec = SynthSpec::tiny(Arch::Llama, 4000);
    (spec.hidden_size, spec.intermediate_size, spec.num_layers) = (256, 768, 3);
    let (model, adapter, qspec) = planned_model(&spec);
    let tokens = 64;
    let seq = nibble::cpu::Sequence::all_tokens((0..tokens as u32).map(|i| i * 7 % 4000).collect());
    let gm = GpuModel::upload(&gpu, &model).unwrap();
    let gl = GpuLora::upload(&gpu, &adapter);
    let grads = weights::zero_grads(&gpu, &adapter);
    use nibble::graph::checkpoint::Keep;
    let planned = |tokens, checkpoint, checkpoints| {
        plan_of(&model.config, qspec, tokens, (checkpoint, checkpoints))
    };
    for (checkpoint, checkpoints) in [(false, Keep::F32), (true, Keep::Bf16Host)] {
        let planned = planned(tokens, checkpoint, checkpoints);
        // The untied embedding stays in host memory.
        assert!(planned.host_weights > 0);
        let keep = (checkpoint, checkpoints);
        first_step_follows_the_plan(&gpu, (&gm, &gl, &grads), &seq, &planned, keep);
    }
    // Sequences of other lengths, as a run's data has them, with and without checkpointing: the
    // device holds one step's homes (the largest step's so far), not one set per length: where the
    // pool cannot house a step, its idle buffers are freed and the step's homes made anew (measured
    // 1.00 after every step).
    gpu.release_scratch();
    let mut longest_plan = 0u64;
    for (i, tokens) in [64usize, 16, 40, 96, 24, 96, 64, 80]
        .into_iter()
        .enumerate()
    {
        let checkpoint = i % 3 == 1;
        let seq =
            nibble::cpu::Sequence::all_tokens((0..tokens as u32).map(|i| i * 11 % 4000).collect());
        let options = exec::gpu::SequenceOptions {
            grad_scale: 1.0,
            checkpoint,
            checkpoints: Keep::F32,
            dropout: None,
            ..Default::default()
        };
        let mut enc = gpu.encoder();
        let losses =
            exec::gpu::record_sequence(&gpu, &gm, Some(&gl), Some(&grads), &seq, options, &mut enc)
                .unwrap()
                .unwrap();
        gpu.submit_and_read(enc, &[&losses]).unwrap();
        longest_plan = longest_plan.max(planned(tokens, checkpoint, Keep::F32).device_step);
        let held = gpu.scratch_bytes() as f64 / longest_plan as f64;
        eprintln!(
            "after {tokens} tokens (checkpointing {checkpoint}): held {held:.3} of the largest plan"
        );
        assert!(held <= 1.01, "{tokens} tokens: {held:.3}");
    }
    // One optimizer step over a short sequence and a long one, recorded into one submission: the
    // trainer records the long one first, whose buffers then house the short one's, so the step holds
    // one set (the other order would hold both sets).
    use nibble::gpu::train::{BaseModel, GpuTrainState};
    gpu.release_scratch();
    gpu.reset_scratch_peak();
    let zeros = adapter.zeros_like();
    let state =
        GpuTrainState::new(&gpu, BaseModel::Decoder(&model), &adapter, &zeros, &zeros).unwrap();
    let sequence = |tokens: u32| nibble::cpu::Sequence::all_tokens((0..tokens).collect());
    let (short, long) = (sequence(24), sequence(96));
    let options = exec::gpu::SequenceOptions {
        grad_scale: 1.0,
        checkpoint: false,
        checkpoints: Keep::F32,
        dropout: None,
        ..Default::default()
    };
    let adamw = nibble::ops::adamw::AdamWParams::new(1e-4, 0.9, 0.999, 1e-8, 0.0, 1, 1.0);
    let sequences = [(&short, options), (&long, options)];
    pollster::block_on(state.step(&gpu, &sequences, adamw, 1.0)).unwrap();
    let held = gpu.scratch_peak_bytes() as f64 / planned(96, false, Keep::F32).device_step as f64;
    eprintln!("a step of 24 and 96 tokens: at most {held:.3} of the 96-token plan held at once");
    assert!(held <= 1.01, "{held:.3}");
}

/// A random model of `spec` in NF4 (group 64) and a fresh all-linear adapter without dropout, as the
/// memory tests plan them.
fn planned_model(
    spec: &nibble::synth::SynthSpec,
) -> (
    nibble::model::Model,
    nibble::lora::LoraAdapter,
    nibble::quant::QuantSpec,
) {
    use nibble::quant::{QuantFormat, QuantSpec};
    let dir = tempfile::tempdir().unwrap();
    nibble::synth::write_model_folder(dir.path(), spec, None).unwrap();
    let qspec = QuantSpec::new(QuantFormat::Nf4, 64).unwrap();
    let model = nibble::model::ModelSource::open(dir.path())
        .unwrap()
        .load(Some(nibble::model::QuantRequest::Quantize(qspec)))
        .unwrap();
    let config = nibble::lora::LoraConfig {
        dropout: 0.0,
        ..Default::default()
    };
    let adapter =
        nibble::lora::LoraAdapter::init(&model.config, config, &mut nibble::rng::Rng::new(1))
            .unwrap();
    (model, adapter, qspec)
}

/// `nibble plan`'s plan of a step of `tokens` on a `planned_model`.
fn plan_of(
    config: &nibble::config::ModelConfig,
    qspec: nibble::quant::QuantSpec,
    tokens: usize,
    (checkpoint, checkpoints): (bool, nibble::graph::checkpoint::Keep),
) -> nibble::plan::Plan {
    let input = nibble::plan::PlanInput {
        tokens,
        quant: Some(qspec),
        lora_rank: 8,
        lora_rank_pattern: Vec::new(),
        lora_targets: vec!["all-linear".into()],
        lora_target_parameters: Vec::new(),
        lora_dropout: false,
        dora: false,
        checkpoint,
        checkpoints,
        trainable_tokens: 0,
    };
    nibble::plan::plan(config, &input).unwrap()
}

/// One step of `seq` from an empty pool holds on the device what `planned` says, and in host memory
/// the checkpoints it plans offloaded; a second step allocates nothing more.
fn first_step_follows_the_plan(
    gpu: &Gpu,
    (gm, gl, grads): (&GpuModel, &GpuLora, &GpuLora),
    seq: &cpu::Sequence,
    planned: &nibble::plan::Plan,
    (checkpoint, checkpoints): (bool, nibble::graph::checkpoint::Keep),
) {
    let options = exec::gpu::SequenceOptions {
        grad_scale: 1.0,
        checkpoint,
        checkpoints,
        dropout: None,
        ..Default::default()
    };
    let step = || {
        let mut enc = gpu.encoder();
        let losses =
            exec::gpu::record_sequence(gpu, gm, Some(gl), Some(grads), seq, options, &mut enc)
                .unwrap()
                .unwrap();
        gpu.submit_and_read(enc, &[&losses]).unwrap();
    };
    gpu.release_scratch();
    let before = (gpu.scratch_bytes(), gpu.host_scratch_bytes());
    step();
    let first = (
        gpu.scratch_bytes() - before.0,
        gpu.host_scratch_bytes() - before.1,
    );
    // A second step finds everything it needs in the pools.
    step();
    assert_eq!(
        (
            gpu.scratch_bytes() - before.0,
            gpu.host_scratch_bytes() - before.1
        ),
        first,
        "the second step allocated again"
    );
    // Every weight on the device is as planned (group scales in f32, norms in f32).
    assert_eq!(gm.device_bytes(), planned.weights);
    let step_plan = planned.device_step as f64;
    let ratio = first.0 as f64 / step_plan;
    eprintln!(
        "{checkpoints:?}: GPU step scratch {} B, planned {step_plan:.0} B ({ratio:.2}); host {} B, planned {} B",
        first.0, first.1, planned.host_activations
    );
    // Measured 1.00 and 0.99: the plan replays the executor's placement and pool (the plan's
    // step labels every position, this one all but the last). Offloaded buffers are exactly the
    // planned ones: bf16 pairs of each layer's input.
    assert!(
        (0.97..=1.0).contains(&ratio),
        "the GPU step holds {} B, the plan says {step_plan:.0} B",
        first.0
    );
    assert_eq!(first.1, planned.host_activations, "{checkpoints:?}");
}

/// `gpu_step_memory_follows_the_plan` for a mixture of experts (Qwen3-MoE's layout, 8 experts, 2 per
/// token) adapted on PEFT's all-linear: its experts' temporaries (every slot's activations at once)
/// are what the plan counts; and Gemma 4's experts beside its dense MLPs (soft-capped logits, the
/// router linears adapted).
#[test]
fn gpu_step_memory_of_a_mixture_follows_the_plan() {
    let Some(gpu) = gpu() else { return };
    use nibble::graph::checkpoint::Keep;
    use nibble::synth::SynthSpec;
    for mut spec in [
        SynthSpec::tiny_qwen3_moe(4000),
        SynthSpec::tiny_gemma4_moe(4000),
    ] {
        (spec.hidden_size, spec.intermediate_size) = (256, 512);
        let (model, adapter, qspec) = planned_model(&spec);
        let qwen3 = model.config.moe_family() == Some(nibble::config::MoeFamily::Qwen3);
        assert!(!qwen3 || adapter.pairs().any(|(_, p)| p.experts > 1));
        let tokens = 96;
        let seq = cpu::Sequence::all_tokens((0..tokens as u32).map(|i| i * 13 % 4000).collect());
        let gm = GpuModel::upload(&gpu, &model).unwrap();
        let gl = GpuLora::upload(&gpu, &adapter);
        let grads = weights::zero_grads(&gpu, &adapter);
        for (checkpoint, checkpoints) in [(false, Keep::F32), (true, Keep::Bf16Host)] {
            let keep = (checkpoint, checkpoints);
            let planned = plan_of(&model.config, qspec, tokens, keep);
            first_step_follows_the_plan(&gpu, (&gm, &gl, &grads), &seq, &planned, keep);
        }
    }
}

/// Optimizer steps on the GPU (dropout, gradient accumulation, clipping, AdamW and checkpointing all on
/// the device) against the same steps on the CPU executor in float32: the dropout masks are
/// counter-based, so both draw the same ones. Plain LoRA, DoRA (its factors and magnitude
/// gradients on the device, its dropout path, recomputed under checkpointing), and trained token
/// rows that start away from the model's (which the GPU's tables must take when training moves
/// there).
#[test]
fn gpu_training_steps_match_the_cpu_trainer() {
    let Some(gpu) = gpu() else { return };
    for (dora, token_rows) in [(false, false), (true, false), (false, true)] {
        training_steps_match_the_cpu_trainer(&gpu, dora, token_rows);
    }
}

fn training_steps_match_the_cpu_trainer(gpu: &Gpu, dora: bool, token_rows: bool) {
    use nibble::cpu::Sequence;
    use nibble::rng::Rng;
    use nibble::train::{Schedule, TrainConfig, Trainer};
    let f = fixture("qwen3", "nf4");
    let vocab = f.model.config.vocab_size as u64;
    let mut rng = Rng::new(8);
    let sequences: Vec<Sequence> = [9, 14, 6, 11, 12]
        .iter()
        .map(|&n| {
            let mut s = Sequence::all_tokens((0..n).map(|_| rng.below(vocab) as u32).collect());
            s.targets[0] = None; // a masked position, as a chat prompt would have
            s
        })
        .collect();
    let mut lora = f.adapter.config.clone();
    lora.dropout = 0.1;
    lora.use_dora = dora;
    let mut adapter = f.adapter.clone();
    adapter.config = lora.clone();
    if token_rows {
        let c = &f.model.config;
        let mut ids: Vec<usize> = sequences[0].ids[1..5].iter().map(|&t| t as usize).collect();
        ids.dedup();
        for path in c.token_row_modules() {
            adapter.add_token_rows(&path, ids.clone(), c.hidden_size, |_, row| {
                row.iter_mut().for_each(|x| *x = 0.05 * rng.normal() as f32)
            });
        }
    }
    let config = |checkpoint: bool| TrainConfig {
        lora: lora.clone(),
        lr: 1e-3,
        weight_decay: 0.01,
        max_grad_norm: 0.05,
        schedule: Schedule::Cosine,
        warmup_steps: 1,
        max_steps: Some(3),
        grad_accum: 2,
        checkpoint,
        // NEFTune's noise, drawn alike on both from the dropout seeds.
        neftune_noise_alpha: Some(5.0),
        ..TrainConfig::default()
    };
    let mut on_cpu = Trainer::new(
        &f.model,
        config(false),
        sequences.clone(),
        Some(adapter.clone()),
    )
    .unwrap();
    // With DoRA, as the trainer starts it: its magnitudes from the weights.
    let start = on_cpu.adapter.clone();
    let mut on_gpu =
        Trainer::new(&f.model, config(true), sequences, Some(adapter.clone())).unwrap();
    on_gpu.use_gpu(gpu).unwrap();
    let mut clipped = false;
    while !on_cpu.done() {
        let (c, g) = (on_cpu.step().unwrap(), on_gpu.step().unwrap());
        eprintln!(
            "dora {dora}, token rows {token_rows}, step {}: loss {} / {}, grad norm {} / {}",
            c.step, c.loss, g.loss, c.grad_norm, g.grad_norm
        );
        // Measured on lavapipe: losses within 5e-9, grad norms within 1.1e-7, LoRA updates within 1.1e-5
        // (relative, beyond one ulp per parameter: `rel_update`); held to 1e-7, 1e-6 and 1e-4.
        assert!(
            (c.loss - g.loss).abs() / c.loss < 1e-7,
            "step {}: loss {} vs {}",
            c.step,
            c.loss,
            g.loss
        );
        assert!(
            (c.grad_norm - g.grad_norm).abs() / c.grad_norm < 1e-6,
            "step {}: grad norm {} vs {}",
            c.step,
            c.grad_norm,
            g.grad_norm
        );
        assert_eq!(c.lr, g.lr);
        clipped |= c.grad_norm > 0.05;
    }
    assert!(clipped, "the test means to exercise clipping");
    assert!(on_gpu.done());
    on_gpu.sync().unwrap();
    let mut worst = 0.0f64;
    assert_eq!(on_gpu.adapter.token_rows().count() > 0, token_rows);
    for (((_, c), (_, g)), (_, a0)) in on_cpu
        .adapter
        .trained()
        .zip(on_gpu.adapter.trained())
        .zip(start.trained())
    {
        assert_eq!(c.magnitude.is_empty(), !dora || c.is_token_rows());
        for factor in c.factors() {
            let (cv, gv, v0) = (c.factor(factor), g.factor(factor), a0.factor(factor));
            worst = worst.max(common::rel_update(gv, cv, v0));
        }
    }
    eprintln!("worst relative difference of the LoRA updates: {worst:.1e}");
    assert!(worst < 1e-4, "LoRA updates differ by {worst:e}");
}

#[test]
fn packed_sequences_on_the_gpu_match_the_cpu() {
    use nibble::cpu::Sequence;
    let Some(gpu) = gpu() else { return };
    // Mistral's window of 5 binds inside two of the examples.
    for name in ["qwen3", "mistral"] {
        let f = fixture(name, "nf4");
        let vocab = f.model.config.vocab_size as u32;
        let mut rng = nibble::rng::Rng::new(2);
        let examples: Vec<Sequence> = [6usize, 10, 4]
            .iter()
            .map(|&n| {
                Sequence::all_tokens((0..n).map(|_| rng.below(vocab as u64) as u32).collect())
            })
            .collect();
        let packed = cpu::pack(examples, 64).remove(0);
        assert!(packed.is_packed());
        // Measured: gradients within 2.4e-6.
        assert_step_matches_cpu(&gpu, &f.model, &f.adapter, &packed, 3e-5, name);
    }
    // A window inside sequences longer than the GPU kernels' 64-query blocks: blocks whose first
    // keys differ, and key ranges that start past a block's first query.
    let f = fixture("mistral", "nf4");
    let mut rng = nibble::rng::Rng::new(4);
    let vocab = f.model.config.vocab_size as u64;
    let long = Sequence::all_tokens((0..150).map(|_| rng.below(vocab) as u32).collect());
    assert_step_matches_cpu(
        &gpu,
        &f.model,
        &f.adapter,
        &long,
        3e-5,
        "150 tokens, window 5",
    );
    let packed = cpu::pack(
        [70usize, 90]
            .iter()
            .map(|&n| Sequence::all_tokens((0..n).map(|_| rng.below(vocab) as u32).collect()))
            .collect(),
        256,
    )
    .remove(0);
    assert_step_matches_cpu(
        &gpu,
        &f.model,
        &f.adapter,
        &packed,
        3e-5,
        "packed 90 + 70, window 5",
    );
}

/// The tiled linear kernels at shapes off their tiles: inner dimensions that are not multiples of the
/// 32-wide k tile (one odd, so 16-bit pairs straddle rows), outputs that are not multiples of 64, and
/// 37 tokens (not a multiple of 16), in every storage format, against the CPU executor in float32. The
/// vocabulary spans three cross-entropy chunks (its logits and their gradient run through the same
/// kernels), the last one partial; in one case the output projection is split across bindings too, so
/// that chunks start inside a block and blocks end inside a chunk.
#[test]
fn gpu_kernels_match_the_cpu_off_their_tiles() {
    use nibble::config::Arch;
    use nibble::cpu::Sequence;
    use nibble::model::QuantRequest;
    use nibble::ops::cross_entropy::VOCAB_CHUNK;
    use nibble::quant::{QuantFormat, QuantSpec};
    use nibble::rng::Rng;
    use nibble::source::FloatDtype;
    use nibble::synth::SynthSpec;
    let Some(mut gpu) = gpu() else { return };
    let mut rng = Rng::new(31);
    let vocab = 2 * VOCAB_CHUNK + 45;
    let default_binding = gpu.max_binding;
    let quant = |format, group| QuantRequest::Quantize(QuantSpec::new(format, group).unwrap());
    // f16 rows of 36 values are 72 bytes: 400,000-byte bindings hold 5,555 of them.
    let cases = [
        (
            36,
            71,
            FloatDtype::BF16,
            QuantRequest::Dense,
            default_binding,
        ),
        (36, 71, FloatDtype::F16, QuantRequest::Dense, 400_000),
        (
            36,
            70,
            FloatDtype::F32,
            QuantRequest::Dense,
            default_binding,
        ),
        (
            96,
            160,
            FloatDtype::BF16,
            quant(QuantFormat::Int4, 32),
            default_binding,
        ),
        (
            96,
            160,
            FloatDtype::BF16,
            quant(QuantFormat::Nf4, 32),
            default_binding,
        ),
    ];
    for (hidden, intermediate, dtype, request, binding) in cases {
        gpu.max_binding = binding.min(gpu.device_binding_limit());
        let mut spec = SynthSpec::tiny(Arch::Qwen2, vocab);
        spec.hidden_size = hidden;
        spec.intermediate_size = intermediate;
        spec.num_heads = 2;
        spec.num_kv_heads = 1;
        spec.dtype = dtype;
        let (model, adapter) = synth_model(&spec, "off-tile", request, &mut rng);
        let ids: Vec<u32> = (0..37).map(|_| rng.below(vocab as u64) as u32).collect();
        let seq = Sequence::all_tokens(ids.clone());
        let case = format!("hidden {hidden}, intermediate {intermediate}, {dtype:?}, {request:?}");

        let gm = GpuModel::upload(&gpu, &model).unwrap();
        let gl = GpuLora::upload(&gpu, &adapter);
        let logits = exec::gpu::logits(&gpu, &gm, Some(&gl), &ids).unwrap();
        let e = rel(&logits, &cpu::logits(&model, Some(&adapter), &ids).unwrap());
        eprintln!("{case}: logits {e:.1e}");
        assert!(e < 1e-5, "{case}: logits differ by {e:e}");
        // Measured: logits within 8.7e-7, gradients within 2.4e-6.
        assert_step_matches_cpu(&gpu, &model, &adapter, &seq, 2e-5, &case);
    }
}

/// A random model of `spec` loaded with `request`, and a LoRA adapter whose B is random too (it starts
/// at zero, which would leave the LoRA branch out of the forward).
fn synth_model(
    spec: &nibble::synth::SynthSpec,
    name: &str,
    request: nibble::model::QuantRequest,
    rng: &mut nibble::rng::Rng,
) -> (nibble::model::Model, nibble::lora::LoraAdapter) {
    synth_model_with(spec, name, (request, Default::default()), rng)
}

/// `synth_model` with an adapter of `config`.
fn synth_model_with(
    spec: &nibble::synth::SynthSpec,
    name: &str,
    (request, config): (nibble::model::QuantRequest, nibble::lora::LoraConfig),
    rng: &mut nibble::rng::Rng,
) -> (nibble::model::Model, nibble::lora::LoraAdapter) {
    use nibble::lora::LoraAdapter;
    use nibble::synth::{byte_tokenizer, model_files};
    let files = model_files(spec, &byte_tokenizer(), name);
    let model = nibble::model::ModelSource::open_folder(files)
        .unwrap()
        .load(Some(request))
        .unwrap();
    let mut adapter = LoraAdapter::init(&model.config, config, rng).unwrap();
    for (_, pair) in adapter.pairs_mut() {
        pair.b
            .iter_mut()
            .for_each(|b| *b = rng.normal() as f32 * 0.1);
    }
    (model, adapter)
}

/// One forward + backward on the GPU against the CPU executor: every LoRA gradient within `tolerance`
/// and the loss within 1e-6 (relative; losses measured within 3.2e-8 in every case here).
fn assert_step_matches_cpu(
    gpu: &Gpu,
    model: &nibble::model::Model,
    adapter: &nibble::lora::LoraAdapter,
    seq: &cpu::Sequence,
    tolerance: f64,
    case: &str,
) {
    let scale = 1.0 / seq.target_count() as f32;
    let gm = GpuModel::upload(gpu, model).unwrap();
    let gl = GpuLora::upload(gpu, adapter);
    let grads = weights::zero_grads(gpu, adapter);
    let loss = exec::gpu::forward_backward(gpu, &gm, Some(&gl), Some(&grads), seq, scale).unwrap();
    let mut ours = adapter.zeros_like();
    grads.download(gpu, &mut ours).unwrap();
    let mut expected = adapter.zeros_like();
    let cpu_loss =
        cpu::forward_backward(model, Some(adapter), Some(&mut expected), seq, scale, None).unwrap();
    let e = (loss.loss_sum - cpu_loss.loss_sum).abs() / cpu_loss.loss_sum;
    assert!(e < 1e-6, "{case}: losses differ by {e:e}");
    let mut worst = 0f64;
    for ((path, g), (_, c)) in ours.pairs().zip(expected.pairs()) {
        let e = c
            .factors()
            .map(|f| rel(g.factor(f), c.factor(f)))
            .fold(0.0, f64::max);
        assert!(e < tolerance, "{case}: {path} gradients differ by {e:e}");
        worst = worst.max(e);
    }
    eprintln!("{case}: loss {e:.1e}, worst gradient {worst:.1e} (tolerance {tolerance:.0e})");
}

/// Mixture-of-experts layers on the GPU against the CPU executor: Qwen3-MoE (8 experts, 2 per token,
/// renormalised weights, a dense layer between two sparse ones), Mixtral (4 experts, 2 per
/// token) and Qwen2-MoE (as Qwen3-MoE's, weights as routed, a shared expert gated per token beside
/// them) with PEFT's all-linear adapter (each stack of experts' pairs and each router's, random
/// B's), their experts in bf16, NF4 and INT4, in one block or in row blocks of a few experts each
/// (bindings that small), over 150 tokens (300 slots: the busiest experts' rows span two 64-row
/// tiles or three). The logits, the loss and every gradient, as in `assert_step_matches_cpu`.
/// Measured on lavapipe: logits within 8.8e-7, gradients within 2.6e-6; held to 1e-5 and 2e-5.
#[test]
fn mixture_of_experts_layers_match_the_cpu_executor() {
    use nibble::cpu::Sequence;
    use nibble::lora::LoraConfig;
    use nibble::model::QuantRequest;
    use nibble::quant::{QuantFormat, QuantSpec};
    use nibble::rng::Rng;
    use nibble::synth::SynthSpec;
    let Some(mut gpu) = gpu() else { return };
    let mut rng = Rng::new(47);
    let vocab = 300;
    let quant = |format| QuantRequest::Quantize(QuantSpec::new(format, 32).unwrap());
    let config = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    // Stored rows are 128 bytes (bf16) or 32 (packed), an expert's gate/up 128 rows and its down 64:
    // blocks of one or two experts' gate/up and two or four experts' down.
    let cases = [
        ("qwen3_moe", QuantRequest::Dense, u64::MAX),
        ("qwen3_moe", QuantRequest::Dense, 32_768),
        ("qwen3_moe", quant(QuantFormat::Nf4), 8_192),
        ("mixtral", quant(QuantFormat::Int4), 4_096),
        ("mixtral", QuantRequest::Dense, 16_384),
        ("qwen2_moe", quant(QuantFormat::Nf4), 8_192),
    ];
    for (family, request, binding) in cases {
        let spec = match family {
            "qwen3_moe" => SynthSpec::tiny_qwen3_moe(vocab),
            "qwen2_moe" => SynthSpec::tiny_qwen2_moe(vocab),
            _ => SynthSpec::tiny_mixtral(vocab),
        };
        // PEFT converts no names on qwen2_moe: its routers and experts are named.
        let config = LoraConfig {
            target_parameters: match family {
                "qwen2_moe" => ["gate.weight", "gate_up_proj", "down_proj"]
                    .map(String::from)
                    .to_vec(),
                _ => Vec::new(),
            },
            ..config.clone()
        };
        let case = match binding {
            u64::MAX => format!("{family} {request:?}, one binding each"),
            _ => format!("{family} {request:?}, bindings of {binding} bytes"),
        };
        let (model, adapter) = synth_model_with(&spec, family, (request, config.clone()), &mut rng);
        assert_eq!(spec.dtype, nibble::source::FloatDtype::BF16);
        let stacks = adapter.pairs().filter(|(_, p)| p.experts > 1).count();
        let routers = adapter
            .pairs()
            .filter(|(path, _)| path.ends_with("mlp.gate"))
            .count();
        assert!(
            stacks >= 4 && routers >= 2,
            "{case}: {stacks} stacks, {routers} routers"
        );
        gpu.max_binding = binding.min(gpu.device_binding_limit());
        // Only the stacks are larger than a binding: each in two blocks or more.
        let gm = GpuModel::upload(&gpu, &model).unwrap();
        let linears = model
            .named_tensors()
            .iter()
            .filter(|(_, t)| matches!(t, nibble::model::TensorRef::Linear(_)))
            .count();
        let m = model.config.moe.as_ref().unwrap();
        let stacks = 2 * m.sparse.iter().filter(|&&s| s).count();
        assert!(
            binding == u64::MAX || gm.linear_weight_buffers() >= linears + stacks,
            "{case}: the stacked experts are not split in blocks ({} buffers, {linears} linears)",
            gm.linear_weight_buffers()
        );
        let ids: Vec<u32> = (0..150).map(|_| rng.below(vocab as u64) as u32).collect();
        let gl = GpuLora::upload(&gpu, &adapter);
        let logits = exec::gpu::logits(&gpu, &gm, Some(&gl), &ids).unwrap();
        let e = rel(&logits, &cpu::logits(&model, Some(&adapter), &ids).unwrap());
        eprintln!("{case}: logits {e:.1e}");
        assert!(e < 1e-5, "{case}: logits differ by {e:e}");
        let seq = Sequence::all_tokens(ids);
        assert_step_matches_cpu(&gpu, &model, &adapter, &seq, 2e-5, &case);
    }
}

/// Attention across its tiles and passes, against the CPU executor: 150 tokens packed from examples of
/// 63, 47, 33 and 7 (three query workgroups of 64 rows; example boundaries at 63, the last key of the
/// first workgroup, and at 110 and 143, inside the second and third) with head
/// dimensions of 128, 24 and 64 (key tiles of 8, 42 and 16 rows, 42 not dividing 64) and 2, 4 and 7
/// query heads per kv head (7 is Qwen2.5-0.5B's attention: 14 heads, 2 kv heads, head_dim 64); the
/// first case with a loop budget that splits every walk into passes of a few rows, as a software
/// device splits long ones; and one 600-token example, which on llvmpipe needs three passes per walk.
#[test]
fn gpu_attention_spans_workgroups_tiles_and_passes() {
    use nibble::config::Arch;
    use nibble::cpu::Sequence;
    use nibble::model::QuantRequest;
    use nibble::rng::Rng;
    use nibble::source::FloatDtype;
    use nibble::synth::SynthSpec;
    let Some(mut gpu) = gpu() else { return };
    let device_budget = gpu.loop_budget;
    let mut rng = Rng::new(41);
    let packed_150 = [63usize, 7, 47, 33].as_slice();
    // (arch, hidden, heads, kv heads, head_dim, example lengths, loop budget, tolerance); measured
    // gradients within 1.2e-6, 1.0e-6, 8.1e-6, 1.6e-6, 1.5e-6 and 1.5e-6.
    let cases = [
        (
            Arch::Qwen3,
            64,
            4,
            2,
            Some(128),
            packed_150,
            Some(3000),
            1e-5,
        ),
        (Arch::Llama, 96, 4, 1, None, packed_150, device_budget, 1e-5),
        // Sums over 896 inputs in a different order than the CPU's blocked products.
        (
            Arch::Qwen2,
            896,
            14,
            2,
            None,
            packed_150,
            device_budget,
            1e-4,
        ),
        (
            Arch::Qwen2,
            128,
            2,
            1,
            None,
            [600usize].as_slice(),
            device_budget,
            1e-5,
        ),
        // Heads past the narrow build's 256 (Gemma 4's full layers: 512), on the wide one: one row
        // per invocation twice as long, two rows per staged tile; 384 leaves part of a tile unused
        // and walks in passes.
        (
            Arch::Qwen3,
            64,
            2,
            1,
            Some(512),
            packed_150,
            device_budget,
            1e-5,
        ),
        (
            Arch::Qwen3,
            64,
            2,
            1,
            Some(384),
            [70usize].as_slice(),
            Some(30_000),
            1e-5,
        ),
    ];
    for (arch, hidden, heads, kv_heads, head_dim, lengths, budget, tolerance) in cases {
        gpu.loop_budget = budget;
        let mut spec = SynthSpec::tiny(arch, 300);
        spec.hidden_size = hidden;
        spec.num_heads = heads;
        spec.num_kv_heads = kv_heads;
        spec.head_dim = head_dim;
        spec.num_layers = 1;
        spec.dtype = FloatDtype::F32;
        let (model, adapter) = synth_model(&spec, "attention-tiles", QuantRequest::Dense, &mut rng);
        let examples: Vec<Sequence> = lengths
            .iter()
            .map(|&n| Sequence::all_tokens((0..n).map(|_| rng.below(300) as u32).collect()))
            .collect();
        let total: usize = lengths.iter().sum();
        let seq = cpu::pack(examples, total).remove(0);
        assert_eq!(seq.ids.len(), total);
        if lengths.len() > 1 {
            assert_eq!(
                seq.segments()[62..64],
                [0, 63],
                "an example starts at key 63"
            );
        }
        let case = format!(
            "{arch:?}, {heads}/{kv_heads} heads of {}, {total} tokens, budget {budget:?}",
            model.config.head_dim
        );
        assert_step_matches_cpu(&gpu, &model, &adapter, &seq, tolerance, &case);
    }
}

#[test]
fn a_failed_device_allocation_is_an_error_not_a_panic() {
    let Some(gpu) = gpu() else { return };
    assert!(gpu.check_errors().is_ok());
    // wgpu reports this buffer (past the device's limit) to its error handler, as it reports a buffer
    // that does not fit in memory; its default handler would panic.
    let _too_large = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: gpu.device.limits().max_buffer_size + 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = gpu.check_errors().unwrap_err().to_string();
    assert!(e.contains(&gpu.info.name), "{e}");
    // Every later read fails with it rather than returning what an unmade buffer holds.
    let buffer = gpu.upload_f32(&[1.5, -2.0]);
    let read = gpu.submit_and_read(gpu.encoder(), &[&buffer]);
    assert_eq!(read.unwrap_err().to_string(), e);
}

/// Dispatches' parameters share arenas of uniform slots (src/gpu/uniforms.rs): 2,500 dispatches (past
/// two arenas of 1,024 slots) alternating between two encoders, the second submitted first, each
/// scaling its buffer by its own factor. A dispatch that read another's slot, or a slot of an arena
/// not yet handed to the device, would change a product of factors ~1e-3 from one.
#[test]
fn every_dispatch_reads_its_own_parameters() {
    use nibble::gpu::groups_1d;
    use nibble::ops::Dims4;
    let Some(gpu) = gpu() else { return };
    let mut rng = nibble::rng::Rng::new(5);
    let n = 300;
    let start: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let factors: Vec<f32> = (0..2500)
        .map(|_| 1.0 + 1e-3 * rng.normal() as f32)
        .collect();
    let buffers = [gpu.upload_f32(&start), gpu.upload_f32(&start)];
    let mut encoders = [gpu.encoder(), gpu.encoder()];
    let mut expected = [start.clone(), start.clone()];
    for (i, f) in factors.iter().enumerate() {
        let params = Dims4 {
            a: n as u32,
            b: f.to_bits(),
            c: 0,
            d: 0,
        };
        let which = i % 2;
        let (enc, buf) = (&mut encoders[which], &buffers[which]);
        gpu.dispatch(enc, "scale", &params, &[(3, buf)], groups_1d(n, 256));
        expected[which].iter_mut().for_each(|v| *v *= f);
    }
    let [first, second] = encoders;
    gpu.submit(second);
    let got = gpu
        .submit_and_read(first, &[&buffers[0], &buffers[1]])
        .unwrap();
    for (which, (g, e)) in got.iter().zip(&expected).enumerate() {
        // Each product is 1,250 correctly rounded multiplications in the same order on both sides:
        // measured equal; 1e-6 allows a device that rounds differently.
        let err = rel(g, e);
        assert!(err < 1e-6, "encoder {which}: {err:e}");
    }
}
