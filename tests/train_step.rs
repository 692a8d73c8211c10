//! A training step's gradients with LoRA dropout: against a finite-difference directional derivative of
//! the loss (same dropout masks), and unchanged by gradient checkpointing.

mod common;

use nibble::config::Arch;
use nibble::cpu::{self, Sequence, StepOptions};
use nibble::lora::{LoraAdapter, LoraConfig};
use nibble::model::{ModelSource, QuantRequest};
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::rng::Rng;
use nibble::source::FloatDtype;
use nibble::synth::{self, SynthSpec};

type Setup = (
    tempfile::TempDir,
    nibble::model::Model,
    LoraAdapter,
    Sequence,
);

fn setup(arch: Arch) -> Setup {
    setup_with(
        SynthSpec::tiny(arch, 300),
        LoraConfig::default().targets,
        0.2,
    )
}

/// A tiny Qwen3-MoE (8 experts, 2 per token; a dense layer between two sparse ones): LoRA on the
/// attention with dropout, or PEFT's all-linear without (the routers and every expert adapted too).
fn setup_moe(all_linear: bool) -> Setup {
    let (targets, dropout) = match all_linear {
        true => (vec!["all-linear".to_string()], 0.0),
        false => (
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            0.2,
        ),
    };
    setup_with(SynthSpec::tiny_qwen3_moe(300), targets, dropout)
}

fn setup_with(mut spec: SynthSpec, targets: Vec<String>, dropout: f32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    spec.dtype = FloatDtype::F32;
    synth::write_model_folder(dir.path(), &spec, None).unwrap();
    let model = ModelSource::open(dir.path())
        .unwrap()
        .load(Some(QuantRequest::Quantize(
            QuantSpec::new(QuantFormat::Nf4, 32).unwrap(),
        )))
        .unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout,
        use_rslora: false,
        targets,
        ..LoraConfig::default()
    };
    let mut rng = Rng::new(5);
    let mut adapter = LoraAdapter::init(&model.config, config, &mut rng).unwrap();
    // PEFT starts B at zero; a non-zero B makes every gradient path carry signal.
    for (_, p) in adapter.pairs_mut() {
        p.b.iter_mut()
            .for_each(|b| *b = (rng.normal() * 0.1) as f32);
    }
    let ids: Vec<u32> = (0..11).map(|_| rng.below(300) as u32).collect();
    let mut seq = Sequence::all_tokens(ids);
    seq.targets[..3].iter_mut().for_each(|t| *t = None);
    (dir, model, adapter, seq)
}

fn flat(a: &LoraAdapter) -> Vec<f32> {
    a.pairs()
        .flat_map(|(_, p)| p.a.iter().chain(&p.b).copied().collect::<Vec<_>>())
        .collect()
}

fn set_flat(a: &mut LoraAdapter, values: &[f32]) {
    let mut it = values.iter();
    for (_, p) in a.pairs_mut() {
        p.a.iter_mut()
            .chain(p.b.iter_mut())
            .for_each(|x| *x = *it.next().unwrap());
    }
}

#[test]
fn dropout_gradients_match_finite_differences() {
    // Qwen3-MoE: through the routed experts and their weights into the router's logits, and into the
    // experts' and routers' own pairs (all-linear).
    for (arch, moe) in [
        (Arch::Qwen2, None),
        (Arch::Qwen3, None),
        (Arch::Qwen3, Some(false)),
        (Arch::Qwen3, Some(true)),
    ] {
        let (_dir, model, adapter, seq) = match moe {
            Some(all_linear) => setup_moe(all_linear),
            None => setup(arch),
        };
        let n = seq.target_count() as f32;
        let mut grads = adapter.zeros_like();
        cpu::forward_backward(
            &model,
            Some(&adapter),
            Some(&mut grads),
            &seq,
            1.0 / n,
            Some(&mut Rng::new(9)),
        )
        .unwrap();
        let g = flat(&grads);

        let mut rng = Rng::new(77);
        let direction: Vec<f32> = g.iter().map(|_| rng.normal() as f32).collect();
        let analytic: f64 = g
            .iter()
            .zip(&direction)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let theta = flat(&adapter);
        let loss_at = |eps: f32| {
            let mut a = adapter.clone();
            let moved: Vec<f32> = theta
                .iter()
                .zip(&direction)
                .map(|(t, d)| t + eps * d)
                .collect();
            set_flat(&mut a, &moved);
            // The same seed draws the same dropout masks.
            let l =
                cpu::forward_backward(&model, Some(&a), None, &seq, 0.0, Some(&mut Rng::new(9)))
                    .unwrap();
            l.loss_sum / l.targets as f64
        };
        // Small enough that no token's choice of experts flips (top-k is a step, which autograd
        // and nibble hold fixed).
        let eps = if moe.is_some() { 1e-4 } else { 1e-3 };
        let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        let rel = (analytic - numeric).abs() / numeric.abs();
        assert!(
            rel < 1e-2,
            "{arch:?} (MoE {moe:?}): directional derivative {analytic} vs finite difference {numeric} ({rel:e})"
        );
    }
}

#[test]
fn checkpointing_changes_nothing() {
    // Every family: the recomputed forward repeats the in-place ops (RoPE, Gemma's scales) once;
    // Qwen3-MoE's recomputes each token's choice of experts.
    for arch in Arch::ALL {
        checkpointing_changes_nothing_in(arch, setup(arch));
    }
    checkpointing_changes_nothing_in(Arch::Qwen3, setup_moe(false));
    checkpointing_changes_nothing_in(Arch::Qwen3, setup_moe(true));
}

fn checkpointing_changes_nothing_in(arch: Arch, (_dir, model, adapter, seq): Setup) {
    let run = |checkpoint: bool| {
        let mut grads = adapter.zeros_like();
        let mut rng = Rng::new(3);
        let options = StepOptions {
            grad_scale: 0.1,
            checkpoint,
            checkpoints: nibble::graph::checkpoint::Keep::F32,
            precision: Precision::F32,
            ..Default::default()
        };
        let loss = cpu::forward_backward_with(
            &model,
            Some(&adapter),
            Some(&mut grads),
            &seq,
            options,
            Some(&mut rng),
        )
        .unwrap();
        (loss, grads, rng.state())
    };
    let (a, b) = (run(false), run(true));
    assert_eq!(a.0, b.0, "{arch:?}: loss");
    assert_eq!(a.1, b.1, "{arch:?}: gradients must be bit-identical");
    assert_eq!(
        a.2, b.2,
        "the dropout generator must end where it would without checkpointing"
    );
    assert_ne!(
        a.2,
        Rng::new(3).state(),
        "a step with dropout draws from the generator"
    );
}

/// Each faster precision `--precision default` may take (bf16 where the CPU has BF16 dot products;
/// the 16-bit integer products anywhere, on their portable kernel where there is no vector one), on a
/// sequence long enough (40 tokens) for the frozen products to take them.
#[test]
fn default_precision_stays_within_1e3_of_f32() {
    let mut precisions = vec![Precision::Int16];
    if nibble::ops::bf16_gemm::available() {
        precisions.push(Precision::Bf16);
    }
    assert!(precisions.contains(&Precision::fastest()) || Precision::fastest() == Precision::F32);
    for (arch, precision) in [Arch::Qwen2, Arch::Llama]
        .into_iter()
        .flat_map(|a| precisions.iter().map(move |&p| (a, p)))
    {
        let (_dir, model, adapter, _) = setup(arch);
        let mut rng = Rng::new(6);
        let ids: Vec<u32> = (0..40).map(|_| rng.below(300) as u32).collect();
        let mut seq = Sequence::all_tokens(ids);
        seq.targets[..3].iter_mut().for_each(|t| *t = None);
        let run = |precision| {
            let mut grads = adapter.zeros_like();
            let options = StepOptions {
                grad_scale: 1.0 / seq.target_count() as f32,
                checkpoint: false,
                checkpoints: nibble::graph::checkpoint::Keep::F32,
                precision,
                ..Default::default()
            };
            let loss = cpu::forward_backward_with(
                &model,
                Some(&adapter),
                Some(&mut grads),
                &seq,
                options,
                None,
            )
            .unwrap();
            (loss.loss_sum / loss.targets as f64, flat(&grads))
        };
        let (l32, g32) = run(Precision::F32);
        let (l16, g16) = run(precision);
        let loss_rel = (l16 - l32).abs() / l32;
        let d: f64 = g16
            .iter()
            .zip(&g32)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum();
        let n: f64 = g32.iter().map(|b| (*b as f64).powi(2)).sum();
        let grad_rel = (d / n).sqrt();
        eprintln!("{arch:?} {precision:?}: loss {loss_rel:.1e}, gradients {grad_rel:.1e}");
        assert!(
            loss_rel < 1e-3,
            "{arch:?} {precision:?}: loss differs by {loss_rel:e}"
        );
        // bf16 operands keep 8 mantissa bits; on these tiny random models the LoRA gradients move by
        // about 1% (measured 7e-3 to 1.2e-2), the loss by up to 2e-4. The 16-bit integer products:
        // gradients 1.6e-3 to 2.1e-3, the loss up to 3e-5.
        assert!(
            grad_rel < 2e-2,
            "{arch:?} {precision:?}: gradients differ by {grad_rel:e}"
        );
    }
}

/// Three examples packed into one sequence give the same loss and gradients as the three run apart:
/// attention stays inside each example and positions restart at each start. The examples are longer
/// than the tiny Mistral's and Ministral's sliding window (8), so that window and example starts
/// both bound what a token sees.
#[test]
fn a_packed_sequence_equals_its_examples_run_apart() {
    for arch in Arch::ALL {
        let (_dir, model, adapter, _) = setup(arch);
        let mut rng = Rng::new(9);
        let examples: Vec<Sequence> = [18usize, 26, 20]
            .iter()
            .map(|&n| {
                let mut s = Sequence::all_tokens((0..n).map(|_| rng.below(300) as u32).collect());
                s.targets[0] = None;
                s
            })
            .collect();
        let packed = cpu::pack(examples.clone(), 64);
        assert_eq!(packed.len(), 1);
        assert_eq!(packed[0].starts, [0, 26, 46], "longest first");
        assert_eq!(packed[0].positions()[26..29], [0, 1, 2]);
        let mut apart_grads = adapter.zeros_like();
        let mut apart = 0.0;
        for s in &examples {
            apart +=
                cpu::forward_backward(&model, Some(&adapter), Some(&mut apart_grads), s, 0.5, None)
                    .unwrap()
                    .loss_sum;
        }
        let mut packed_grads = adapter.zeros_like();
        let together = cpu::forward_backward(
            &model,
            Some(&adapter),
            Some(&mut packed_grads),
            &packed[0],
            0.5,
            None,
        )
        .unwrap()
        .loss_sum;
        assert!(
            (apart - together).abs() / apart < 1e-5,
            "{arch:?}: loss {apart} vs packed {together}"
        );
        let (a, b) = (flat(&apart_grads), flat(&packed_grads));
        let diff: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(
            diff / norm < 1e-5,
            "{arch:?}: gradients differ by {:e}",
            diff / norm
        );
    }
    // Examples that do not fit together go to separate sequences.
    let long = |n: usize| Sequence::all_tokens(vec![1; n]);
    let packed = cpu::pack(vec![long(20), long(15), long(10), long(12)], 32);
    let sizes: Vec<usize> = packed.iter().map(|s| s.ids.len()).collect();
    assert_eq!(sizes, [32, 25], "first fit, longest first: 20+12 and 15+10");
}

fn dora_gradients(
    model: &nibble::model::Model,
    adapter: &LoraAdapter,
    seq: &Sequence,
    checkpoint: bool,
) -> (f64, LoraAdapter) {
    let mut grads = adapter.zeros_like();
    let options = StepOptions {
        grad_scale: 1.0 / seq.target_count() as f32,
        checkpoint,
        checkpoints: nibble::graph::checkpoint::Keep::F32,
        precision: Precision::F32,
        ..Default::default()
    };
    let loss = cpu::forward_backward_with(
        model,
        Some(adapter),
        Some(&mut grads),
        seq,
        options,
        Some(&mut Rng::new(9)),
    )
    .unwrap();
    (loss.loss_sum / loss.targets as f64, grads)
}

/// DoRA under LoRA dropout, where the rescaled base term takes W·dropout(x) (PEFT recomputes it) and
/// its backward runs apart from the base's: (1) the magnitudes' gradient against a finite-difference
/// directional derivative with the same masks (the norm does not depend on the magnitudes, so the
/// detached gradient is the whole one; measured 3e-4 relative, held to 3e-3); (2) dropout that drops
/// nothing (p = 1e-9) gives the gradients of the dropout-free path, which three steps match PEFT's
/// (tests/train_parity.rs; measured within 4.4e-7, held to 1e-5); (3) gradient checkpointing changes no
/// bit.
#[test]
fn dora_gradients_under_dropout() {
    let (_dir, model, adapter, seq) = setup(Arch::Qwen2);
    let dora = common::as_dora(&model, &adapter, 0.2);
    let (_, grads) = dora_gradients(&model, &dora, &seq, false);
    let mut rng = Rng::new(78);
    // Each magnitude moved in proportion to itself (they are the rows' norms, ~0.2 here).
    let direction: Vec<Vec<f32>> = dora
        .pairs()
        .map(|(_, p)| {
            p.magnitude
                .iter()
                .map(|m| m * rng.normal() as f32)
                .collect()
        })
        .collect();
    let analytic: f64 = grads
        .pairs()
        .zip(&direction)
        .flat_map(|((_, g), d)| g.magnitude.iter().zip(d))
        .map(|(g, d)| *g as f64 * *d as f64)
        .sum();
    let loss_at = |eps: f32| {
        let mut moved = dora.clone();
        for ((_, p), d) in moved.pairs_mut().zip(&direction) {
            p.magnitude
                .iter_mut()
                .zip(d)
                .for_each(|(m, d)| *m += eps * d);
        }
        let l = cpu::forward_backward(
            &model,
            Some(&moved),
            None,
            &seq,
            0.0,
            Some(&mut Rng::new(9)),
        )
        .unwrap();
        l.loss_sum / l.targets as f64
    };
    // The difference's error falls as eps² down to about 2e-4 (measured 3.9e-3 at eps 1e-2, 6.9e-4
    // at 3e-3), below which the float32 loss's rounding takes over.
    let eps = 2e-3;
    let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
    let rel = (analytic - numeric).abs() / numeric.abs();
    eprintln!(
        "magnitudes: directional derivative {analytic} vs finite difference {numeric} ({rel:.1e})"
    );
    assert!(rel < 3e-3, "{analytic} vs {numeric} ({rel:e})");

    let flat = |a: &LoraAdapter| -> Vec<f32> {
        a.pairs()
            .flat_map(|(_, p)| {
                p.factors()
                    .flat_map(|f| p.factor(f).to_vec())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut without = dora.clone();
    without.config.dropout = 0.0;
    let mut nearly = dora.clone();
    nearly.config.dropout = 1e-9;
    let (loss0, g0) = dora_gradients(&model, &without, &seq, false);
    let (loss1, g1) = dora_gradients(&model, &nearly, &seq, false);
    let e = common::rel(&flat(&g1), &flat(&g0));
    eprintln!("dropout of 1e-9 against none: loss {loss1} / {loss0}, gradients {e:.1e}");
    assert!((loss1 - loss0).abs() < 1e-6 * loss0 && e < 1e-5, "{e:e}");

    let (l_plain, g_plain) = dora_gradients(&model, &dora, &seq, false);
    let (l_checkpointed, g_checkpointed) = dora_gradients(&model, &dora, &seq, true);
    assert_eq!(l_plain, l_checkpointed);
    assert_eq!(g_plain, g_checkpointed, "gradients must be bit-identical");
}

/// One DoRA linear alone, as a graph (`models::lora_linear`), under LoRA dropout: the input's gradient
/// against a finite-difference directional derivative of Σ dy ⊙ y with the same masks (the norm does
/// not depend on the input, so the detached gradient is the whole one), which takes the rescaled base
/// term's backward through the dropped input; for a linear with a bias (q_proj) and one without
/// (down_proj). Measured within 7e-7 on x86 and 2.2e-5 under qemu's NEON at a step of 1e-2 (float32's
/// rounding of the sums, y being linear in x), and at the step of 0.1 taken here within 2.9e-6 on x86
/// and 1.3e-6 under NEON; held to 5e-5. The same for a plain LoRA linear, whose dropout runs inside
/// its branch's products (within 4.5e-6 on x86).
#[test]
fn a_lora_linear_s_input_gradient_under_dropout_matches_finite_differences() {
    use nibble::exec::cpu::{Bindings, run};
    use nibble::graph::{Builder, Op, StepInputs};
    use nibble::models::decoder::LoraSpec;
    use nibble::models::lora_linear::{self, BranchDropout};
    let (_dir, model, adapter, _) = setup(Arch::Qwen2);
    let dora = common::as_dora(&model, &adapter, 0.2);
    let c = &model.config;
    // Plain LoRA too: its branch's dropout is fused into its products on both sides.
    for (form, dora) in [("DoRA", &dora), ("LoRA", &adapter)] {
        let spec = LoraSpec::of(dora);
        for (path, out, inp, biased) in [
            (
                "model.layers.0.self_attn.q_proj",
                c.hidden_size,
                c.hidden_size,
                true,
            ),
            (
                "model.layers.1.mlp.down_proj",
                c.hidden_size,
                c.intermediate_size,
                false,
            ),
        ] {
            let t = 7;
            let mut b = Builder::new();
            let x = b.given("x", t * inp);
            let dy = b.given("dy", t * out);
            let bias = biased.then(|| b.weight(&format!("{path}.bias"), out));
            let dropout = Some(BranchDropout { p: 0.2, stream: 5 });
            let names = (path.to_string(), "y".to_string());
            let (y, tape) =
                lora_linear::forward(&mut b, Some(&spec), x, (t, out, inp), names, bias, dropout);
            let y_out = b.output("y", t * out);
            b.node(Op::Add, &[y], &[y_out], true);
            let dx = b.output("dx", t * inp);
            lora_linear::backward(&mut b, &tape, x, dy, dx);
            let graph = b.finish();
            let mut rng = Rng::new(40);
            let random = |n: usize, rng: &mut Rng| -> Vec<f32> {
                (0..n).map(|_| rng.normal() as f32).collect()
            };
            let (x0, g, direction) = (
                random(t * inp, &mut rng),
                random(t * out, &mut rng),
                random(t * inp, &mut rng),
            );
            let step = |x: &[f32]| {
                let inputs = StepInputs {
                    given: [("x".to_string(), x.to_vec()), ("dy".to_string(), g.clone())].into(),
                    dropout_seed: 77,
                    ..StepInputs::default()
                };
                let mut grads = dora.zeros_like();
                let mut outputs = run(
                    &graph,
                    Bindings {
                        model: &model,
                        adapter: Some(dora),
                        grads: Some(&mut grads),
                        cache: None,
                        optimizer: None,
                        inputs: &inputs,
                        precision: Precision::F32,
                    },
                )
                .unwrap();
                let value: f64 = outputs
                    .take("y")
                    .iter()
                    .zip(&g)
                    .map(|(y, g)| *y as f64 * *g as f64)
                    .sum();
                (value, outputs.take("dx"))
            };
            let (_, dx0) = step(&x0);
            let analytic: f64 = dx0
                .iter()
                .zip(&direction)
                .map(|(a, d)| *a as f64 * *d as f64)
                .sum();
            // y is linear in x (the norm does not depend on it), so a wide step adds no truncation error
            // and keeps float32's rounding of the sums small beside the difference.
            let eps = 0.1f32;
            let moved = |sign: f32| -> Vec<f32> {
                x0.iter()
                    .zip(&direction)
                    .map(|(x, d)| x + sign * eps * d)
                    .collect()
            };
            let numeric = (step(&moved(1.0)).0 - step(&moved(-1.0)).0) / (2.0 * eps as f64);
            let rel = (analytic - numeric).abs() / numeric.abs();
            eprintln!("{form} {path}: dx·v {analytic} vs finite difference {numeric} ({rel:.1e})");
            assert!(
                rel < 5e-5,
                "{form} {path}: {analytic} vs {numeric} ({rel:e})"
            );
        }
    }
}

/// Trained token rows (`--trainable-tokens`): the gradient the step takes into them against a
/// finite-difference directional derivative of the loss, the rows moved in the model's tables. Qwen2
/// (tied: one set of rows read by the embedding and the output projection), with and without a logit
/// cap; Llama (untied: each table its own rows); Gemma 3 (its embedding scaled by √hidden). Among the
/// rows, tokens the sequence holds, one it only predicts, and one it never holds. Measured (steps of
/// 1e-3, where the differences' own error falls as the step's square): within 1.1e-4; held to 1e-3.
#[test]
fn token_row_gradients_match_finite_differences() {
    for (arch, softcap) in [
        (Arch::Qwen2, None),
        (Arch::Qwen2, Some(2.0f32)),
        (Arch::Llama, None),
        (Arch::Gemma3, None),
    ] {
        let (_dir, mut model, mut adapter, seq) = setup(arch);
        model.config.final_logit_softcapping = softcap;
        let c = model.config.clone();
        let predicted_only = seq
            .targets
            .iter()
            .flatten()
            .copied()
            .find(|t| !seq.ids.contains(t));
        let mut ids: Vec<usize> = vec![seq.ids[0] as usize, seq.ids[4] as usize];
        ids.extend(predicted_only.map(|t| t as usize));
        ids.extend((0..300).find(|&t| !seq.ids.contains(&(t as u32)) && !ids.contains(&t)));
        ids.dedup();
        let mut rng = Rng::new(31);
        let mut moved = |row: &mut [f32]| {
            row.iter_mut()
                .for_each(|v| *v += (rng.normal() * 0.1) as f32)
        };
        let embed = model.embed.clone();
        adapter.add_token_rows(
            &c.embedding_module(),
            ids.clone(),
            c.hidden_size,
            |id, row| {
                embed.row_f32(id, row);
                moved(row);
            },
        );
        if let Some(head) = model.lm_head.clone() {
            adapter.add_token_rows("lm_head", ids.clone(), c.hidden_size, |id, row| {
                head.row_f32(id, row);
                moved(row);
            });
        }
        model.put_trained_rows(&adapter).unwrap();
        let options = StepOptions {
            grad_scale: 1.0 / seq.target_count() as f32,
            precision: Precision::F32,
            ..StepOptions::default()
        };
        let mut grads = adapter.zeros_like();
        cpu::forward_backward_with(
            &model,
            Some(&adapter),
            Some(&mut grads),
            &seq,
            options,
            None,
        )
        .unwrap();
        let rows = |a: &LoraAdapter| -> Vec<f32> {
            a.token_rows().flat_map(|(_, p)| p.rows.clone()).collect()
        };
        let g = rows(&grads);
        assert!(g.iter().any(|v| *v != 0.0));
        let direction: Vec<f32> = g.iter().map(|_| rng.normal() as f32).collect();
        let analytic: f64 = g
            .iter()
            .zip(&direction)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let loss_at = |eps: f32| {
            let mut a = adapter.clone();
            let mut d = direction.iter();
            for (_, p) in a.trained_mut().filter(|(_, p)| p.is_token_rows()) {
                p.rows
                    .iter_mut()
                    .for_each(|v| *v += eps * d.next().unwrap());
            }
            let mut m = model.clone();
            m.put_trained_rows(&a).unwrap();
            let l = cpu::forward_backward_with(&m, Some(&a), None, &seq, options, None).unwrap();
            l.loss_sum / l.targets as f64
        };
        let eps = 1e-3;
        let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps as f64);
        let rel = (analytic - numeric).abs() / numeric.abs();
        eprintln!("{arch:?} cap {softcap:?}: token rows' directional derivative off by {rel:e}");
        assert!(
            rel < 1e-3,
            "{arch:?} cap {softcap:?}: directional derivative {analytic} vs finite difference {numeric} ({rel:e})"
        );
    }
}
