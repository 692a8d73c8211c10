//! The decoder written once as a graph (`models::decoder`) and run by the CPU executor (`exec::cpu`)
//! against the hand-written CPU step it replaces (`cpu.rs`), which stays as the oracle until the GPU
//! executor runs graphs too: losses, logits and every LoRA gradient must be bit for bit the same (same
//! kernels, same summation order), over the three families, dense and NF4 weights, gradient
//! checkpointing, LoRA dropout and packed sequences.

mod common;

use nibble::config::Arch;
use nibble::cpu::{self, Sequence, StepOptions};
use nibble::exec;
use nibble::graph::Role;
use nibble::lora::{LoraAdapter, LoraConfig};
use nibble::model::{Model, ModelSource, QuantRequest};
use nibble::models::decoder::{self, LoraSpec, StepShape};
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use nibble::source::FloatDtype;
use nibble::synth::{self, SynthSpec};

const VOCAB: usize = 300;

fn model(arch: Arch, quant: bool) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::tiny(arch, VOCAB);
    spec.dtype = FloatDtype::F32;
    synth::write_model_folder(dir.path(), &spec, None).unwrap();
    let request = if quant {
        QuantRequest::Quantize(QuantSpec::new(QuantFormat::Nf4, 32).unwrap())
    } else {
        QuantRequest::Dense
    };
    ModelSource::open(dir.path())
        .unwrap()
        .load(Some(request))
        .unwrap()
}

fn adapter(model: &Model, rng: &mut Rng) -> LoraAdapter {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.2,
        use_rslora: false,
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::init(&model.config, config, rng);
    // PEFT starts B at zero; a non-zero B makes every gradient path carry signal.
    for (_, _, p) in adapter.pairs_mut() {
        p.b.iter_mut()
            .for_each(|b| *b = (rng.normal() * 0.1) as f32);
    }
    adapter
}

fn sequence(rng: &mut Rng, packed: bool) -> Sequence {
    let example = |rng: &mut Rng, n: usize| {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(VOCAB as u64) as u32).collect();
        let mut seq = Sequence::all_tokens(ids);
        seq.targets[..2].iter_mut().for_each(|t| *t = None);
        seq
    };
    if packed {
        let parts = vec![example(rng, 9), example(rng, 6), example(rng, 4)];
        let packed = cpu::pack(parts, 64);
        assert_eq!(packed.len(), 1);
        packed.into_iter().next().unwrap()
    } else {
        example(rng, 13)
    }
}

fn bits(a: &LoraAdapter) -> Vec<u32> {
    a.pairs()
        .flat_map(|(_, _, p)| {
            p.a.iter()
                .chain(&p.b)
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn graph_steps_equal_the_hand_written_cpu_step_bit_for_bit() {
    let mut cases = 0;
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Llama] {
        for quant in [false, true] {
            let model = model(arch, quant);
            let mut rng = Rng::new(11);
            let adapter = adapter(&model, &mut rng);
            for packed in [false, true] {
                let seq = sequence(&mut rng, packed);
                for checkpoint in [false, true] {
                    for dropout in [false, true] {
                        let options = StepOptions {
                            grad_scale: 0.37,
                            checkpoint,
                            precision: Precision::F32,
                        };
                        let case = format!(
                            "{arch:?} quant={quant} packed={packed} checkpoint={checkpoint} dropout={dropout}"
                        );
                        let (mut old_grads, mut new_grads) =
                            (adapter.zeros_like(), adapter.zeros_like());
                        let (mut r1, mut r2) = (Rng::new(3), Rng::new(3));
                        let old = cpu::forward_backward_with(
                            &model,
                            Some(&adapter),
                            Some(&mut old_grads),
                            &seq,
                            options,
                            dropout.then_some(&mut r1),
                        )
                        .unwrap();
                        let new = exec::cpu::forward_backward(
                            &model,
                            Some(&adapter),
                            Some(&mut new_grads),
                            &seq,
                            options,
                            dropout.then_some(&mut r2),
                        )
                        .unwrap();
                        assert_eq!(old.loss_sum.to_bits(), new.loss_sum.to_bits(), "{case}");
                        assert_eq!(old.targets, new.targets, "{case}");
                        assert!(
                            bits(&old_grads) == bits(&new_grads),
                            "{case}: gradients differ"
                        );
                        assert!(
                            new_grads
                                .pairs()
                                .all(|(_, _, p)| p.a.iter().any(|&g| g != 0.0)),
                            "{case}: every A gets a gradient"
                        );
                        // The forward alone (evaluation).
                        let old = cpu::forward_backward_with(
                            &model,
                            Some(&adapter),
                            None,
                            &seq,
                            options,
                            None,
                        )
                        .unwrap();
                        let new = exec::cpu::forward_backward(
                            &model,
                            Some(&adapter),
                            None,
                            &seq,
                            options,
                            None,
                        )
                        .unwrap();
                        assert_eq!(old.loss_sum.to_bits(), new.loss_sum.to_bits(), "{case}");
                        cases += 1;
                    }
                }
            }
            let ids = sequence(&mut rng, false).ids;
            let old = cpu::logits(&model, Some(&adapter), &ids).unwrap();
            let new = exec::cpu::logits(&model, Some(&adapter), &ids).unwrap();
            assert_eq!(old.len(), ids.len() * VOCAB);
            assert!(
                old.iter()
                    .zip(&new)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{arch:?} quant={quant}: logits differ"
            );
        }
    }
    assert_eq!(cases, 48);
}

/// The same on the GPU executor (lavapipe in CI): the graph recorded with the WGSL kernels against the
/// hand-written GPU step (`gpu/step.rs`), losses, logits and gradients bit for bit.
#[test]
fn graph_steps_on_the_gpu_equal_the_hand_written_gpu_step_bit_for_bit() {
    use nibble::gpu::step::{self, GpuLora, GpuModel, SequenceOptions};
    let Some(gpu) = common::gpu() else { return };
    let mut cases = 0;
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Llama] {
        for quant in [false, true] {
            let model = model(arch, quant);
            let mut rng = Rng::new(11);
            let adapter = adapter(&model, &mut rng);
            let gm = GpuModel::upload(&gpu, &model).unwrap();
            let gl = GpuLora::upload(&gpu, &adapter);
            for packed in [false, true] {
                let seq = sequence(&mut rng, packed);
                for checkpoint in [false, true] {
                    for dropout in [false, true] {
                        let case = format!(
                            "{arch:?} quant={quant} packed={packed} checkpoint={checkpoint} dropout={dropout}"
                        );
                        let options = SequenceOptions {
                            grad_scale: 0.37,
                            checkpoint,
                            dropout: dropout.then_some((0x5eed_1234_abcd, 0.2)),
                        };
                        let mut losses = Vec::new();
                        let mut grads = Vec::new();
                        for new in [false, true] {
                            let g = step::zero_grads(&gpu, &adapter);
                            let mut enc = gpu.encoder();
                            let record = if new {
                                exec::gpu::record_sequence
                            } else {
                                step::record_sequence
                            };
                            let result =
                                record(&gpu, &gm, Some(&gl), Some(&g), &seq, options, &mut enc)
                                    .unwrap()
                                    .unwrap();
                            losses.push(gpu.submit_and_read(enc, &[&result]).unwrap().remove(0));
                            let mut down = adapter.zeros_like();
                            g.download(&gpu, &mut down).unwrap();
                            grads.push(bits(&down));
                        }
                        let loss_bits =
                            |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            loss_bits(&losses[0]),
                            loss_bits(&losses[1]),
                            "{case}: losses"
                        );
                        assert!(grads[0] == grads[1], "{case}: gradients differ");
                        assert!(grads[1].iter().any(|&g| g != 0), "{case}");
                        cases += 1;
                    }
                }
            }
            let ids = sequence(&mut rng, false).ids;
            let old = step::logits(&gpu, &gm, Some(&gl), &ids).unwrap();
            let new = exec::gpu::logits(&gpu, &gm, Some(&gl), &ids).unwrap();
            assert!(
                old.iter()
                    .zip(&new)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && old.len() == new.len(),
                "{arch:?} quant={quant}: GPU logits differ"
            );
        }
    }
    assert_eq!(cases, 48);
}

/// Every graph the decoder builds is consistent, and checkpointing lowers its peak of live activations
/// while recomputing only forward nodes.
#[test]
fn decoder_graphs_validate_and_checkpointing_lowers_the_peak() {
    let mut spec = SynthSpec::tiny(Arch::Qwen3, VOCAB);
    spec.num_layers = 6;
    let dir = tempfile::tempdir().unwrap();
    synth::write_model_folder(dir.path(), &spec, None).unwrap();
    let config = ModelSource::open(dir.path()).unwrap().config;
    let mut rng = Rng::new(2);
    let lora = LoraSpec::of(&LoraAdapter::init(&config, LoraConfig::default(), &mut rng));
    let shape = |checkpoint| StepShape {
        tokens: 200,
        positions: 150,
        packed: true,
        backward: true,
        dropout: true,
        checkpoint,
        logits: false,
    };
    let full = decoder::build(&config, Some(&lora), shape(false));
    let ckpt = decoder::build(&config, Some(&lora), shape(true));
    full.validate().unwrap();
    ckpt.validate().unwrap();
    let (pf, pc) = (full.peak_transient_bytes(), ckpt.peak_transient_bytes());
    assert!(pc * 2 < pf, "checkpointing: peak {pc} vs {pf} bytes");
    let forward = |g: &nibble::graph::Graph| g.nodes.iter().filter(|n| !n.stage.backward).count();
    let backward = |g: &nibble::graph::Graph| g.nodes.iter().filter(|n| n.stage.backward).count();
    assert_eq!(backward(&full), backward(&ckpt));
    assert!(forward(&ckpt) > forward(&full));
    // Each LoRA matrix is read in the forward and gets one gradient buffer.
    let grads = ckpt
        .bufs
        .iter()
        .filter(|b| matches!(b.role, Role::LoraGradA(_) | Role::LoraGradB(_)))
        .count();
    assert_eq!(grads, 2 * 7 * spec.num_layers);
}
