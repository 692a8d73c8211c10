//! One op suite for both executors: every op of the graph, forward and backward, run alone in a
//! one-node (or few-node) graph on random inputs by the GPU executor (lavapipe in CI) and by the CPU
//! executor, outputs compared op by op, so that a kernel bug names its op instead of showing up as
//! "layer l's gradient differs". The CPU kernels themselves are held to f64 references and finite
//! differences in tests/ops.rs. Cached attention (decoding) is covered by tests/generate.rs; the
//! optimizer's ops (global norm and clipping, AdamW) by the optimizer graph below.

mod common;

use nibble::config::Arch;
use nibble::config::GateActivation;
use nibble::cpu::Sequence;
use nibble::exec;
use nibble::gpu::Gpu;
use nibble::gpu::weights::GpuModel;
use nibble::graph::{BufId, Builder, Graph, Input, Op, StepInputs};
use nibble::model::Model;
use nibble::models::decoder;
use nibble::ops::Precision;
use nibble::ops::attention::AttentionShape;
use nibble::ops::cross_entropy::TokenLoss;
use nibble::rng::Rng;
use std::collections::HashMap;

/// Past one vocabulary chunk, so that the cross-entropy's running max is rescaled across chunks.
const VOCAB: usize = nibble::ops::cross_entropy::VOCAB_CHUNK + 300;
const TOKENS: usize = 37;

fn model(quant: bool) -> Model {
    common::tiny_model(Arch::Qwen2, VOCAB, quant)
}

/// A case: a graph over given random values and step inputs, and the outputs to compare.
struct Case {
    name: String,
    graph: Graph,
    inputs: StepInputs,
}

/// Builds cases with random given values.
struct Cases<'a> {
    model: &'a Model,
    rng: Rng,
    out: Vec<Case>,
}

impl Cases<'_> {
    /// Three packed examples over TOKENS tokens, labels at most positions.
    fn inputs(&mut self) -> StepInputs {
        let ids: Vec<u32> = (0..TOKENS)
            .map(|_| self.rng.below(VOCAB as u64) as u32)
            .collect();
        let mut seq = Sequence::all_tokens(ids);
        seq.starts = vec![0, 15, 29];
        seq.targets[3] = None;
        seq.targets[20] = None;
        let mut inputs = decoder::inputs(&self.model.config, &seq, 0.6, 0x1234_5678_9abc);
        inputs.dropout_seed = self.rng.next_u64();
        inputs
    }

    fn case(&mut self, name: &str, build: impl FnOnce(&mut Builder, &mut Given)) {
        let mut b = Builder::new();
        let mut given = Given {
            rng: &mut self.rng,
            values: HashMap::new(),
        };
        build(&mut b, &mut given);
        let values = given.values;
        let mut inputs = self.inputs();
        inputs.given = values;
        let graph = b.finish();
        graph.validate().unwrap();
        self.out.push(Case {
            name: name.to_string(),
            graph,
            inputs,
        });
    }
}

/// Random given values, none zero.
struct Given<'a> {
    rng: &'a mut Rng,
    values: HashMap<String, Vec<f32>>,
}

impl Given<'_> {
    fn add(&mut self, b: &mut Builder, name: &str, len: usize, scale: f64) -> BufId {
        let v: Vec<f32> = (0..len)
            .map(|_| {
                let x = self.rng.normal() * scale;
                (if x.abs() < 1e-3 { 1e-3 } else { x }) as f32
            })
            .collect();
        self.values.insert(name.to_string(), v);
        b.given(name, len)
    }
}

fn cases(model: &Model) -> Vec<Case> {
    let c = model.config.clone();
    let (t, h, i, hd) = (TOKENS, c.hidden_size, c.intermediate_size, c.head_dim);
    let (heads, kv_heads) = (c.num_heads, c.num_kv_heads);
    let mut cases = Cases {
        model,
        rng: Rng::new(7),
        out: Vec::new(),
    };
    let eps = c.rms_norm_eps;
    cases.case("embed", |b, _| {
        let ids = b.input(Input::TokenIds, t);
        let table = b.weight("model.embed_tokens.weight", VOCAB * h);
        let x = b.output("x", t * h);
        b.node(Op::Embed { dim: h }, &[ids, table], &[x], false);
    });
    // Llama's w and Gemma's (1 + w).
    for offset in [0.0, 1.0] {
        cases.case(
            &format!("rmsnorm offset {offset} and its backward"),
            |b, g| {
                let x = g.add(b, "x", t * h, 1.0);
                let dy = g.add(b, "dy", t * h, 1.0);
                let w = b.weight("model.layers.1.input_layernorm.weight", h);
                let (y, inv, dx) = (
                    b.output("y", t * h),
                    b.output("inv", t),
                    b.output("dx", t * h),
                );
                let op = Op::RmsNorm {
                    dim: h,
                    eps,
                    offset,
                };
                b.node(op, &[x, w], &[y, inv], false);
                let op = Op::RmsNormBackward {
                    dim: h,
                    eps,
                    offset,
                };
                b.node(op, &[x, w, inv, dy], &[dx], false);
            },
        );
    }
    // Gemma 4's v_norm: no weight input, offset 1.
    cases.case("rmsnorm without a weight and its backward", |b, g| {
        let x = g.add(b, "x", t * hd, 1.0);
        let dy = g.add(b, "dy", t * hd, 1.0);
        let (y, inv, dx) = (
            b.output("y", t * hd),
            b.output("inv", t),
            b.output("dx", t * hd),
        );
        let (dim, offset) = (hd, 1.0);
        b.node(Op::RmsNorm { dim, eps, offset }, &[x], &[y, inv], false);
        let op = Op::RmsNormBackward { dim, eps, offset };
        b.node(op, &[x, inv, dy], &[dx], false);
    });
    for (module, out, inp, bias) in [
        ("self_attn.q_proj", h, h, true),
        ("self_attn.k_proj", c.kv_dim(0), h, true),
        ("mlp.down_proj", h, i, false),
    ] {
        cases.case(
            &format!("linear {module} and its input gradient"),
            |b, g| {
                let x = g.add(b, "x", t * inp, 1.0);
                let dy = g.add(b, "dy", t * out, 1.0);
                let path = format!("model.layers.0.{module}");
                let w = b.weight(&format!("{path}.weight"), out * inp);
                let mut inputs = vec![x, w];
                if bias {
                    inputs.push(b.weight(&format!("{path}.bias"), out));
                }
                let (y, dx) = (b.output("y", t * out), b.output("dx", t * inp));
                b.node(Op::Linear { out, inp }, &inputs, &[y], false);
                b.node(Op::LinearBackwardInput { out, inp }, &[dy, w], &[dx], true);
            },
        );
    }
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        cases.case(
            &format!("matmul a_t={a_t} b_t={b_t}, then accumulated"),
            |b, g| {
                let (m, n, k) = (t, 24, 40);
                let a = g.add(b, "a", m * k, 1.0);
                let bm = g.add(b, "b", k * n, 1.0);
                let c2 = g.add(b, "c2", m * k, 1.0);
                let out = b.output("c", m * n);
                let op = |alpha| Op::Matmul {
                    m,
                    n,
                    k,
                    a_t,
                    b_t,
                    alpha,
                };
                b.node(op(0.7), &[a, bm], &[out], false);
                b.node(op(-1.3), &[c2, bm], &[out], true);
            },
        );
    }
    cases.case("dropout and its backward", |b, g| {
        let x = g.add(b, "x", t * h, 1.0);
        let dy = g.add(b, "dy", t * h, 1.0);
        let seed = b.input(Input::DropoutSeed, 2);
        let (y, dx) = (b.output("y", t * h), b.output("dx", t * h));
        let (p, stream) = (0.3, 11);
        b.node(Op::Dropout { p, stream }, &[x, seed], &[y], false);
        b.node(Op::DropoutBackward { p, stream }, &[dy, seed], &[dx], true);
    });
    cases.case("add, then accumulated", |b, g| {
        let (x, y, z) = (
            g.add(b, "x", t * h, 1.0),
            g.add(b, "y", t * h, 1.0),
            g.add(b, "z", t * h, 1.0),
        );
        let out = b.output("sum", t * h);
        b.node(Op::Add, &[x, y], &[out], false);
        b.node(Op::Add, &[z], &[out], true);
    });
    // Whole heads, and (Phi-4-mini) 3/4 of each head rotated.
    let partial = hd * 3 / 4 / 2 * 2;
    for (inverse, adjacent, rotated) in [
        (false, false, hd),
        (true, false, hd),
        (false, true, hd),
        (true, true, hd),
        (false, false, partial),
        (true, false, partial),
    ] {
        cases.case(
            &format!("rope inverse={inverse} adjacent={adjacent} rotated={rotated}"),
            |b, g| {
                let (x, y) = (
                    g.add(b, "x", t * heads * hd, 1.0),
                    g.add(b, "y", t * heads * hd, 1.0),
                );
                // The step's tables cover whole heads; a partial rotation reads random ones.
                let (cos, sin) = match rotated == hd {
                    true => (
                        b.input(Input::RopeCos, t * hd / 2),
                        b.input(Input::RopeSin, t * hd / 2),
                    ),
                    false => (
                        g.add(b, "cos", t * rotated / 2, 1.0),
                        g.add(b, "sin", t * rotated / 2, 1.0),
                    ),
                };
                let out = b.output("x", t * heads * hd);
                b.node(Op::Add, &[x, y], &[out], false);
                let op = Op::Rope {
                    heads,
                    head_dim: hd,
                    rotated,
                    inverse,
                    adjacent,
                };
                b.node(op, &[cos, sin], &[out], false);
            },
        );
    }
    for act in [GateActivation::Silu, GateActivation::GeluTanh] {
        cases.case(&format!("{act:?} gate and its backward"), |b, g| {
            let (gate, up, dh) = (
                g.add(b, "gate", t * i, 2.0),
                g.add(b, "up", t * i, 1.0),
                g.add(b, "dh", t * i, 1.0),
            );
            let (hh, dgate, dup) = (
                b.output("h", t * i),
                b.output("dgate", t * i),
                b.output("dup", t * i),
            );
            b.node(Op::Glu { act }, &[gate, up], &[hh], false);
            let op = Op::GluBackward { act };
            b.node(op, &[gate, up, dh], &[dgate, dup], false);
        });
    }
    cases.case("scale in place", |b, g| {
        let x = g.add(b, "x", t * h, 1.0);
        let y = b.output("y", t * h);
        b.node(Op::Add, &[x], &[y], true);
        b.node(Op::Scale { factor: 0.37 }, &[], &[y], false);
    });
    cases.case("scale rows in place", |b, g| {
        let x = g.add(b, "x", t * h, 1.0);
        let factors = g.add(b, "factors", t, 1.0);
        let y = b.output("y", t * h);
        b.node(Op::Add, &[x], &[y], true);
        b.node(Op::ScaleRows { dim: h }, &[factors], &[y], false);
    });
    for (packed, causal) in [(false, true), (true, true), (false, false)] {
        cases.case(
            &format!("attention and its backward, packed={packed} causal={causal}"),
            |b, g| {
                let shape = AttentionShape {
                    tokens: t,
                    heads,
                    kv_heads,
                    head_dim: hd,
                    causal,
                    sinks: false,
                };
                let q = g.add(b, "q", t * heads * hd, 1.0);
                let k = g.add(b, "k", t * kv_heads * hd, 1.0);
                let v = g.add(b, "v", t * kv_heads * hd, 1.0);
                let d_out = g.add(b, "d_out", t * heads * hd, 1.0);
                let first_key = packed.then(|| b.input(Input::FirstKey, t));
                let out = b.output("out", t * heads * hd);
                // The log-sum-exp's second half is the GPU's own bookkeeping: compared through the backward.
                let lse = b.activation(2 * heads * t, "lse");
                let (dq, dk, dv) = (
                    b.output("dq", t * heads * hd),
                    b.output("dk", t * kv_heads * hd),
                    b.output("dv", t * kv_heads * hd),
                );
                let mut inputs = vec![q, k, v];
                inputs.extend(first_key);
                b.node(Op::Attention { shape }, &inputs, &[out, lse], false);
                let mut inputs = vec![q, k, v, out, lse, d_out];
                inputs.extend(first_key);
                b.node(
                    Op::AttentionBackward { shape },
                    &inputs,
                    &[dq, dk, dv],
                    false,
                );
            },
        );
    }
    cases.case(
        "conv2d (1x1, stride 2, padded) and groupnorm (+silu, two chunks)",
        |b, g| {
            // A 1x1 convolution over 128 channels with the decoder's down projection [64, 128] as its
            // kernel (3x3 ones run in tests/flux2.rs's VAE test); GroupNorm over enough pixels that each
            // group's statistics add two partial chunks on the GPU.
            let shape = nibble::ops::conv::ConvShape {
                height: 9,
                width: 7,
                channels: i,
                kernel: 1,
                stride: 2,
                pad: [0, 1, 0, 1],
                upsample: 1,
            };
            let (oh, ow) = shape.output();
            let x = g.add(b, "image", 9 * 7 * i, 1.0);
            let kernel = b.weight("model.layers.0.mlp.down_proj.weight", h * i);
            let bias = b.weight("model.layers.0.input_layernorm.weight", h);
            let y = b.output("conv", oh * ow * h);
            b.node(Op::Conv2d { shape }, &[x, kernel, bias], &[y], false);
            // More output pixels than one tile of patches holds (2^20 values): the GPU multiplies
            // the image tile by tile into rows further down y.
            let large = nibble::ops::conv::ConvShape {
                height: 100,
                width: 90,
                channels: i,
                kernel: 1,
                stride: 1,
                pad: [0; 4],
                upsample: 1,
            };
            assert!(large.tile_pixels() < 100 * 90);
            let x = g.add(b, "large_image", 100 * 90 * i, 1.0);
            let y = b.output("conv_tiles", 100 * 90 * h);
            b.node(Op::Conv2d { shape: large }, &[x, kernel, bias], &[y], false);
            let pixels = 1100;
            let x = g.add(b, "pixels", pixels * h, 2.0);
            let scale = b.weight("model.layers.1.input_layernorm.weight", h);
            let shift = b.weight("model.layers.0.post_attention_layernorm.weight", h);
            for silu in [false, true] {
                let y = b.output(
                    if silu { "groupnorm_silu" } else { "groupnorm" },
                    pixels * h,
                );
                let op = Op::GroupNorm {
                    channels: h,
                    groups: 2,
                    eps: 1e-6,
                    silu,
                };
                b.node(op, &[x, scale, shift], &[y], false);
            }
        },
    );
    cases.case("attention over a padded sequence (forward)", |b, g| {
        let shape = AttentionShape {
            tokens: t,
            heads,
            kv_heads,
            head_dim: hd,
            causal: true,
            sinks: false,
        };
        let q = g.add(b, "q", t * heads * hd, 1.0);
        let k = g.add(b, "k", t * kv_heads * hd, 1.0);
        let v = g.add(b, "v", t * kv_heads * hd, 1.0);
        let inputs = [
            q,
            k,
            v,
            b.input(Input::FirstKey, t),
            b.input(Input::KeyEnd, t),
        ];
        let out = b.output("out", t * heads * hd);
        let lse = b.activation(2 * heads * t, "lse");
        b.node(Op::Attention { shape }, &inputs, &[out, lse], false);
    });
    // The caption's last real token is 20: tokens past it (padding) see only keys before it.
    let padded = cases.out.last_mut().expect("just added");
    padded.inputs.first_key = vec![0; t];
    padded.inputs.key_end = vec![21; t];
    cases.case(
        "modulated layernorm and its backward, gate, silu",
        |b, g| {
            let x = g.add(b, "x", t * h, 1.0);
            let mods = g.add(b, "mods", 6 * h, 0.5);
            let dy = g.add(b, "dy", t * h, 1.0);
            let earlier = g.add(b, "earlier", t * h, 1.0);
            let (y, stats, dx, gated) = (
                b.output("y", t * h),
                b.output("stats", 2 * t),
                b.output("dx", t * h),
                b.output("gated", t * h),
            );
            let op = Op::LayerNormModulate {
                dim: h,
                eps: 1e-6,
                shift: 3,
                scale: 4,
            };
            b.node(op, &[x, mods], &[y, stats], false);
            // Accumulating, as the builders do into a residual gradient.
            b.node(Op::Add, &[earlier], &[dx], true);
            let op = Op::LayerNormModulateBackward {
                dim: h,
                eps: 1e-6,
                scale: 4,
            };
            b.node(op, &[x, mods, stats, dy], &[dx], true);
            b.node(Op::Gate { dim: h, chunk: 5 }, &[mods, y], &[gated], false);
            b.node(Op::Gate { dim: h, chunk: 2 }, &[mods, x], &[gated], true);
            let silu = b.output("silu", t * h);
            b.node(Op::Silu, &[dy], &[silu], false);
        },
    );
    cases.case(
        "columns, placed columns and the mean squared error",
        |b, g| {
            let x = g.add(b, "x", t * i, 1.0);
            let target = g.add(b, "target", t * 7, 1.0);
            let scale = b.input(Input::GradScale, 1);
            let (cols, joined, loss, grad) = (
                b.output("cols", t * 7),
                b.output("joined", t * (7 + h)),
                b.output("loss", 1),
                b.output("grad", t * 7),
            );
            let (width, offset) = (i, 5);
            b.node(
                Op::Columns {
                    width,
                    offset,
                    len: 7,
                },
                &[x],
                &[cols],
                false,
            );
            let place = |offset, len| Op::PlaceColumns {
                width: 7 + h,
                offset,
                len,
            };
            let other = g.add(b, "other", t * h, 1.0);
            b.node(place(0, 7), &[cols], &[joined], true);
            b.node(place(7, h), &[other], &[joined], true);
            b.node(Op::Mse, &[cols, target, scale], &[loss, grad], false);
        },
    );
    // All but the last token (which predicts nothing) and the two whose targets were removed.
    let labelled = TOKENS - 3;
    cases.case("NEFTune's noise on embeddings", |b, g| {
        let x = b.output("x", t * h);
        let table = b.weight("model.embed_tokens.weight", VOCAB * h);
        let ids = b.input(Input::TokenIds, t);
        let seed = b.input(Input::DropoutSeed, 2);
        let magnitude = b.input(Input::NoiseMagnitude, 1);
        let _ = g;
        b.node(Op::Embed { dim: h }, &[ids, table], &[x], false);
        b.node(Op::UniformNoise, &[seed, magnitude], &[x], false);
    });
    cases
        .out
        .last_mut()
        .expect("just added")
        .inputs
        .noise_magnitude = 0.05;
    cases.case("gather and scatter rows", |b, g| {
        let x = g.add(b, "x", t * h, 1.0);
        let rows = g.add(b, "rows", labelled * h, 1.0);
        let index = b.input(Input::LabelPositions, labelled);
        let (gathered, scattered) = (
            b.output("gathered", labelled * h),
            b.output("scattered", t * h),
        );
        b.node(Op::GatherRows { dim: h }, &[x, index], &[gathered], false);
        b.node(
            Op::ScatterRows { dim: h },
            &[rows, index],
            &[scattered],
            false,
        );
    });
    use nibble::ops::cross_entropy::LossType;
    for (softcap, loss_type) in [
        (None, LossType::Nll),
        (Some(2.5f32), LossType::Nll),
        (Some(2.5f32), LossType::Dft),
    ] {
        let name = format!(
            "cross-entropy, with its gradient, and logits (soft cap {softcap:?}, {loss_type:?} loss)"
        );
        cases.case(&name, |b, g| {
            let hidden = g.add(b, "hidden", labelled * h, 1.0);
            let head = b.weight("model.embed_tokens.weight", VOCAB * h);
            let labels = b.input(Input::Labels, labelled);
            let scale = b.input(Input::GradScale, 1);
            let weighting = b.input(Input::LossType, 1);
            let (losses, fused, d_hidden, logits) = (
                b.output("losses", TokenLoss::WIDTH * labelled),
                b.output("fused losses", TokenLoss::WIDTH * labelled),
                b.output("d_hidden", labelled * h),
                b.output("logits", labelled * VOCAB),
            );
            b.node(
                Op::CrossEntropy { dim: h, softcap },
                &[hidden, head, labels],
                &[losses],
                false,
            );
            let op = Op::CrossEntropyWithGrad { dim: h, softcap };
            b.node(
                op,
                &[hidden, head, labels, scale, weighting],
                &[fused, d_hidden],
                false,
            );
            b.node(
                Op::Logits { dim: h, softcap },
                &[hidden, head],
                &[logits],
                false,
            );
            // Trained output rows' gradient from the fused losses: rows of labels (set below) and
            // of a token no position predicts.
            let d_rows = b.output("d_rows", 3 * h);
            let op = Op::OutputRowsGrad {
                dim: h,
                softcap,
                token_ids: vec![100, 5, VOCAB as u32 - 1],
            };
            let ins = [hidden, head, labels, fused, scale, weighting];
            b.node(op, &ins, &[d_rows], true);
        });
        let inputs = &mut cases.out.last_mut().expect("just added").inputs;
        inputs.loss_type = loss_type;
        inputs.labels[0] = 100;
        inputs.labels[3] = 5;
    }
    cases.case("trained embedding rows' gradient", |b, g| {
        let dx = g.add(b, "dx", t * h, 1.0);
        let ids = b.input(Input::TokenIds, t);
        let d_rows = b.output("d_rows", 3 * h);
        let op = Op::EmbeddingRowsGrad {
            dim: h,
            scale: 1.5,
            token_ids: vec![7, 11, 13],
        };
        b.node(op, &[dx, ids], &[d_rows], true);
    });
    let ids = &mut cases.out.last_mut().expect("just added").inputs.ids;
    ids[0] = 7;
    ids[5] = 7;
    ids[9] = 11;
    // Last (but for those added since): its draws from the cases' generator leave the others' inputs
    // as they were.
    cases.case(
        "dropout inside the LoRA products: x′·Aᵀ, d(xa)ᵀ·x′ and dx += dropout′(d(xa)·A)",
        |b, g| {
            use nibble::ops::dropout::DropoutSide;
            // Past one 512-column tile of the CPU kernel, and 37 rows: off every tile.
            let (inp, r) = (600, 8);
            let x = g.add(b, "x", t * inp, 1.0);
            let a = g.add(b, "a", r * inp, 1.0);
            let dxa = g.add(b, "dxa", t * r, 1.0);
            let dx0 = g.add(b, "dx0", t * inp, 1.0);
            let dx1 = g.add(b, "dx1", t * inp, 1.0);
            let seed = b.input(Input::DropoutSeed, 2);
            let (xa, ga, dx) = (
                b.output("xa", t * r),
                b.output("ga", r * inp),
                b.output("dx", t * inp),
            );
            let op = |(m, n, k), (a_t, b_t), side| Op::DropoutMatmul {
                m,
                n,
                k,
                a_t,
                b_t,
                alpha: 0.9,
                p: 0.3,
                stream: 12,
                side,
            };
            let forward = op((t, r, inp), (false, true), DropoutSide::A);
            b.node(forward, &[x, a, seed], &[xa], false);
            let grad_a = op((r, inp, t), (true, false), DropoutSide::B);
            b.node(grad_a, &[dxa, x, seed], &[ga], false);
            b.node(Op::Add, &[dx0, dx1], &[dx], false);
            let grad_x = op((t, inp, r), (false, false), DropoutSide::Product);
            b.node(grad_x, &[dxa, a, seed], &[dx], true);
        },
    );
    // Appended: earlier cases' draws stay as they were. Rows wider than the GPU backward's 256 lanes too, not a multiple of them.
    for dim in [h, 600] {
        cases.case(
            &format!("sigmoid-gated rows of {dim}, accumulated, and the backward"),
            |b, g| {
                let (gates, s, y0, dy) = (
                    g.add(b, "gates", t, 2.0),
                    g.add(b, "s", t * dim, 1.0),
                    g.add(b, "y0", t * dim, 1.0),
                    g.add(b, "dy", t * dim, 1.0),
                );
                let (y, ds, dg) = (
                    b.output("y", t * dim),
                    b.output("ds", t * dim),
                    b.output("dg", t),
                );
                b.node(Op::Add, &[y0], &[y], true);
                b.node(Op::SigmoidGatedRows { dim }, &[gates, s], &[y], true);
                let op = Op::SigmoidGatedRowsBackward { dim };
                b.node(op, &[gates, s, dy], &[ds, dg], false);
            },
        );
    }
    // gpt-oss's sinks: in packed examples with the backward (which reads the forward's lse), and
    // over a padded sequence whose last rows see no key at all (the sink alone).
    let sinks_shape = AttentionShape {
        tokens: t,
        heads,
        kv_heads,
        head_dim: hd,
        causal: true,
        sinks: true,
    };
    for padded in [false, true] {
        let name = match padded {
            false => "attention with sinks and its backward, packed",
            true => "attention with sinks over a padded sequence (forward)",
        };
        cases.case(name, |b, g| {
            let shape = sinks_shape;
            let q = g.add(b, "q", t * heads * hd, 1.0);
            let k = g.add(b, "k", t * kv_heads * hd, 1.0);
            let v = g.add(b, "v", t * kv_heads * hd, 1.0);
            let sinks = g.add(b, "sinks", heads, 3.0);
            let out = b.output("out", t * heads * hd);
            let lse = b.activation(2 * heads * t, "lse");
            let mut inputs = vec![q, k, v, sinks, b.input(Input::FirstKey, t)];
            if padded {
                inputs.push(b.input(Input::KeyEnd, t));
                b.node(Op::Attention { shape }, &inputs, &[out, lse], false);
                return;
            }
            b.node(Op::Attention { shape }, &inputs, &[out, lse], false);
            let d_out = g.add(b, "d_out", t * heads * hd, 1.0);
            let (dq, dk, dv) = (
                b.output("dq", t * heads * hd),
                b.output("dk", t * kv_heads * hd),
                b.output("dv", t * kv_heads * hd),
            );
            let inputs = [q, k, v, out, lse, d_out, inputs[4]];
            b.node(
                Op::AttentionBackward { shape },
                &inputs,
                &[dq, dk, dv],
                false,
            );
        });
    }
    let padded = cases.out.last_mut().expect("just added");
    padded.inputs.first_key = vec![0; t];
    padded.inputs.key_end = (0..t).map(|p| if p + 3 < t { 21 } else { 0 }).collect();
    // gpt-oss's, its inputs spread past the clamps.
    let act = GateActivation::ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    };
    cases.case("clamped SwiGLU gate and its backward", |b, g| {
        let (gate, up, dh) = (
            g.add(b, "gate", t * i, 7.0),
            g.add(b, "up", t * i, 7.0),
            g.add(b, "dh", t * i, 1.0),
        );
        let (hh, dgate, dup) = (
            b.output("h", t * i),
            b.output("dgate", t * i),
            b.output("dup", t * i),
        );
        b.node(Op::Glu { act }, &[gate, up], &[hh], false);
        let op = Op::GluBackward { act };
        b.node(op, &[gate, up, dh], &[dgate, dup], false);
    });
    cases.case(
        "conv2d over an image enlarged twice (the VAE decoder's upsampling)",
        |b, g| {
            // A 1x1 kernel (the model's down projection, as above) padded unevenly: every output pixel
            // reads its enlarged source (y / 2, x / 2), and the padding's edges are those of the
            // enlarged image (3x3 kernels run in tests/flux2.rs's VAE decoder test).
            let shape = nibble::ops::conv::ConvShape {
                height: 5,
                width: 7,
                channels: i,
                kernel: 1,
                stride: 1,
                pad: [1, 0, 1, 2],
                upsample: 2,
            };
            assert_eq!(shape.output(), (11, 17));
            let x = g.add(b, "small_image", 5 * 7 * i, 1.0);
            let kernel = b.weight("model.layers.0.mlp.down_proj.weight", h * i);
            let bias = b.weight("model.layers.0.input_layernorm.weight", h);
            let y = b.output("upsampled_conv", 11 * 17 * h);
            b.node(Op::Conv2d { shape }, &[x, kernel, bias], &[y], false);
        },
    );
    // Every other labelled position's hidden state points along its label's head row, so that its
    // label ranks first (the losses' top-1 column is then not all zeros).
    let mut row = vec![0f32; h];
    for case in cases
        .out
        .iter_mut()
        .filter(|c| c.name.starts_with("cross-entropy"))
    {
        let hidden = case.inputs.given.get_mut("hidden").unwrap();
        for (p, &label) in case.inputs.labels.iter().enumerate().step_by(2) {
            model.embed.row_f32(label as usize, &mut row);
            let norm2: f32 = row.iter().map(|w| w * w).sum();
            for (x, w) in hidden[p * h..(p + 1) * h].iter_mut().zip(&row) {
                *x = 4.0 * w / norm2;
            }
        }
    }
    cases.out
}

fn run_cpu(model: &Model, case: &Case) -> HashMap<String, Vec<f32>> {
    let bind = exec::cpu::Bindings {
        model,
        adapter: None,
        grads: None,
        cache: None,
        optimizer: None,
        inputs: &case.inputs,
        precision: Precision::F32,
    };
    exec::cpu::run(&case.graph, bind).unwrap().0
}

fn run_gpu(gpu: &Gpu, model: &GpuModel, case: &Case) -> HashMap<String, Vec<f32>> {
    let bind = exec::gpu::Bindings {
        gpu,
        model,
        lora: None,
        grads: None,
        cache: None,
        moments: None,
        inputs: &case.inputs,
    };
    let mut enc = gpu.encoder();
    let recorded = exec::gpu::record(&case.graph, bind, &mut enc).unwrap();
    let (names, buffers): (Vec<String>, Vec<_>) = recorded.0.into_iter().unzip();
    let reads: Vec<_> = buffers.iter().collect();
    let values = gpu.submit_and_read(enc, &reads).unwrap();
    names.into_iter().zip(values).collect()
}

/// Some positions' largest logit lies in the second vocabulary chunk (the running max grows, and what
/// was summed against it is rescaled) and some in the first (it does not).
fn assert_max_in_both_chunks(logits: &[f32], case: &str) {
    let chunk = nibble::ops::cross_entropy::VOCAB_CHUNK;
    let in_later_chunk: Vec<bool> = logits
        .chunks(VOCAB)
        .map(|row| {
            let first_max = row[..chunk].iter().fold(f32::MIN, |m, &x| m.max(x));
            row[chunk..].iter().any(|&x| x > first_max)
        })
        .collect();
    assert!(
        in_later_chunk.contains(&true) && in_later_chunk.contains(&false),
        "{case}: the largest logits lie all in one chunk ({in_later_chunk:?})"
    );
}

/// Measured on lavapipe: at most 3.2e-7 (relative, per output: the cross-entropy gradient), most outputs
/// 1e-7 or exact; held to 3e-6. The gradient weighted by each label's probability (dft), which carries
/// the loss's rounding: 1.1e-6, held to 1e-5.
#[test]
fn every_op_agrees_on_both_executors() {
    let Some(gpu) = common::gpu() else { return };
    let mut worst = 0f64;
    for quant in [false, true] {
        let model = model(quant);
        let gm = GpuModel::upload(&gpu, &model).unwrap();
        let cases = cases(&model);
        assert!(cases.len() >= 17);
        for case in &cases {
            let (cpu, e) = compare(&gpu, (&model, &gm), case, quant);
            worst = worst.max(e);
            if let Some(logits) = cpu.get("logits") {
                assert_max_in_both_chunks(logits, &case.name);
            }
            if case.name.starts_with("NEFTune") {
                // The embeddings moved by noise within ±magnitude, not left as they were.
                let mut row = vec![0f32; model.config.hidden_size];
                let mut largest = 0f32;
                for (t, x) in cpu["x"].chunks(row.len()).enumerate() {
                    model.embed.row_f32(case.inputs.ids[t] as usize, &mut row);
                    for (a, b) in x.iter().zip(&row) {
                        largest = largest.max((a - b).abs());
                    }
                }
                let magnitude = case.inputs.noise_magnitude;
                assert!(largest > 0.9 * magnitude && largest <= magnitude * 1.001);
            }
        }
    }
    eprintln!("worst: {worst:.1e}");
}

/// Runs `case` on both executors and compares every output: the same names and lengths, mostly
/// nonzero, within the tolerance (3e-6 relative; 1e-5 for the DFT loss's gradient). The CPU's
/// outputs and the worst difference.
fn compare(
    gpu: &Gpu,
    (model, gm): (&Model, &GpuModel),
    case: &Case,
    quant: bool,
) -> (HashMap<String, Vec<f32>>, f64) {
    let (cpu, gpu_out) = (run_cpu(model, case), run_gpu(gpu, gm, case));
    assert_eq!(
        cpu.keys().collect::<std::collections::BTreeSet<_>>(),
        gpu_out.keys().collect(),
        "{}: outputs",
        case.name
    );
    let mut worst = 0f64;
    for (name, expected) in &cpu {
        let got = &gpu_out[name];
        assert_eq!(got.len(), expected.len(), "{} {name}: length", case.name);
        assert!(
            expected.iter().filter(|&&x| x != 0.0).count() > expected.len() / 2,
            "{} {name}: mostly zeros, the case tests nothing",
            case.name
        );
        if name.ends_with("losses") {
            let first: usize = expected
                .chunks(TokenLoss::WIDTH)
                .map(|r| usize::from(TokenLoss::from_row(r).top1))
                .sum();
            assert!(first >= 2, "{} {name}: no label ranks first", case.name);
        }
        let e = common::rel(got, expected);
        eprintln!("quant={quant} {} {name}: {e:.1e}", case.name);
        let tolerance = if case.name.contains("Dft") {
            1e-5
        } else {
            3e-6
        };
        assert!(
            e < tolerance,
            "quant={quant} {} {name}: GPU differs by {e:e}",
            case.name
        );
        worst = worst.max(e);
    }
    (cpu, worst)
}

/// A tiny Qwen3-MoE (8 experts, 2 per token; layer 0 sparse), dense f32 or NF4.
fn moe_model(quant: bool) -> Model {
    use nibble::model::{ModelSource, QuantRequest};
    use nibble::quant::{QuantFormat, QuantSpec};
    use nibble::synth::{SynthSpec, byte_tokenizer, model_files};
    let mut spec = SynthSpec::tiny_qwen3_moe(VOCAB);
    spec.dtype = nibble::source::FloatDtype::F32;
    let request = match quant {
        true => QuantRequest::Quantize(QuantSpec::new(QuantFormat::Nf4, 32).unwrap()),
        false => QuantRequest::Dense,
    };
    let files = model_files(&spec, &byte_tokenizer(), "moe");
    ModelSource::open_folder(files)
        .unwrap()
        .load(Some(request))
        .unwrap()
}

/// The mixture-of-experts ops: the routing (renormalised or not) and its backward, and the experts
/// without and with LoRA pairs on both stacks, forward and backward; every output written once and
/// then accumulated into, as a graph may (the pairs' gradients always are).
fn moe_cases(model: &Model) -> Vec<Case> {
    use nibble::ops::moe::{MoeLora, MoeShape};
    let c = &model.config;
    let m = c.moe.as_ref().unwrap();
    let shape = m.shape(c.hidden_size);
    let (t, h, i, e, k) = (
        TOKENS,
        shape.hidden,
        shape.inter,
        shape.experts,
        shape.top_k,
    );
    let mut cases = Cases {
        model,
        rng: Rng::new(11),
        out: Vec::new(),
    };
    // An output written as the sum of two given values, then accumulated into by `node`.
    fn written(b: &mut Builder, g: &mut Given, name: &str, len: usize) -> BufId {
        let (first, second) = (
            g.add(b, &format!("{name} 0"), len, 1.0),
            g.add(b, &format!("{name} 1"), len, 1.0),
        );
        let out = b.output(name, len);
        b.node(Op::Add, &[first, second], &[out], false);
        out
    }
    for normalize in [true, false] {
        let name = format!("moe route normalize={normalize} and its backward, accumulated");
        cases.case(&name, |b, g| {
            let logits = g.add(b, "logits", t * e, 1.0);
            let d_weights = g.add(b, "dy", t * k, 1.0);
            let routes = b.indices(t * k, "routes");
            let weights = b.output("weights", t * k);
            let op = Op::MoeRoute { shape, normalize };
            b.node(op, &[logits], &[routes, weights], false);
            let d_logits = written(b, g, "d_logits", t * e);
            let op = Op::MoeRouteBackward { shape, normalize };
            b.node(op, &[logits, routes, d_weights], &[d_logits], true);
        });
    }
    let adapted = MoeLora {
        gate_up: Some((4, 0.7)),
        down: Some((2, 1.3)),
    };
    // The last: gpt-oss's experts, biased, their SwiGLU clamped.
    for (what, lora, gpt_oss) in [
        ("without LoRA", MoeLora::default(), false),
        ("with pairs", adapted, false),
        ("with biases, clamped SwiGLU and pairs", adapted, true),
    ] {
        let name = format!("moe experts {what}, forward and backward accumulated");
        let shape = MoeShape {
            biased: gpt_oss,
            ..shape
        };
        cases.case(&name, |b, g| {
            let x = g.add(b, "x", t * h, 1.0);
            let logits = g.add(b, "logits", t * e, 1.0);
            let dy = g.add(b, "dy", t * h, 1.0);
            let routes = b.indices(t * k, "routes");
            let weights = b.output("weights", t * k);
            let op = Op::MoeRoute {
                shape,
                normalize: true,
            };
            b.node(op, &[logits], &[routes, weights], false);
            let gate_up = b.weight("model.layers.0.mlp.experts.gate_up_proj", e * 2 * i * h);
            let down = b.weight("model.layers.0.mlp.experts.down_proj", e * h * i);
            let mut pairs = Vec::new();
            let stacks = lora.stacks().into_iter().zip([(2 * i, h), (h, i)]);
            for (s, (stack, (out, inp))) in stacks.enumerate() {
                if let Some((rank, _)) = stack {
                    pairs.push(g.add(b, &format!("A {s}"), e * rank * inp, 0.3));
                    pairs.push(g.add(b, &format!("B {s}"), out * rank * e, 0.3));
                }
            }
            let act = match gpt_oss {
                true => GateActivation::ClampedSwiglu {
                    alpha: 1.702,
                    limit: 7.0,
                },
                false => GateActivation::Silu,
            };
            let biases = match gpt_oss {
                true => vec![
                    g.add(b, "gate_up bias", e * 2 * i, 4.0),
                    g.add(b, "down bias", e * h, 1.0),
                ],
                false => Vec::new(),
            };
            let y = written(b, g, "y", t * h);
            let mut inputs = vec![x, routes, weights, gate_up, down];
            inputs.extend(&biases);
            inputs.extend(&pairs);
            b.node(Op::MoeExperts { shape, act, lora }, &inputs, &[y], true);
            let dx = written(b, g, "dx", t * h);
            let d_weights = b.output("d_weights", t * k);
            let mut outputs = vec![dx, d_weights];
            for (n, &pair) in pairs.iter().enumerate() {
                outputs.push(written(b, g, &format!("grad {n}"), b.len(pair)));
            }
            let mut inputs = vec![x, routes, weights, gate_up, down, dy];
            inputs.extend(&biases);
            inputs.extend(&pairs);
            let op = Op::MoeExpertsBackward { shape, act, lora };
            b.node(op, &inputs, &outputs, true);
        });
    }
    // Gemma 4's per-expert factors on the chosen weights: gathered by route, over more routes than
    // a dispatch's 65,535 rows.
    let long = 65_536usize.div_ceil(k) + 7;
    cases.case("moe routes' expert factors past 65,535 routes", |b, g| {
        let logits = g.add(b, "logits", long * e, 1.0);
        let table = g.add(b, "per_expert_scale", e, 1.0);
        let routes = b.indices(long * k, "routes");
        let weights = b.output("weights", long * k);
        let op = Op::MoeRoute {
            shape,
            normalize: true,
        };
        b.node(op, &[logits], &[routes, weights], false);
        let scales = b.output("scales", long * k);
        b.node(
            Op::GatherRows { dim: 1 },
            &[table, routes],
            &[scales],
            false,
        );
        b.node(Op::ScaleRows { dim: 1 }, &[scales], &[weights], false);
    });
    cases.out
}

/// `every_op_agrees_on_both_executors` for the mixture-of-experts ops, on a model with experts.
/// Measured on lavapipe: within 4.9e-7 (the routing weights' gradient); held to 3e-6.
#[test]
fn moe_ops_agree_on_both_executors() {
    let Some(gpu) = common::gpu() else { return };
    let mut worst = 0f64;
    for quant in [false, true] {
        let model = moe_model(quant);
        let gm = GpuModel::upload(&gpu, &model).unwrap();
        let cases = moe_cases(&model);
        assert_eq!(cases.len(), 6);
        for case in &cases {
            worst = worst.max(compare(&gpu, (&model, &gm), case, quant).1);
        }
    }
    eprintln!("worst: {worst:.1e}");
}

/// The optimizer graph (global norm, clipping coefficient, AdamW in place) on both executors: random
/// parameters, gradients and moments, a norm large enough to clip. Measured on lavapipe: every updated
/// parameter within one ulp of the CPU's (0 by `rel_update`; 4.0e-7 by `rel` of the updates, and 2.8e-5
/// on an NVIDIA H200, whose compiler fuses the weight decay into the update), moments 1.7e-8, norm and
/// coefficient 1.4e-11 (relative); held to 4e-6.
#[test]
fn the_optimizer_graph_agrees_on_both_executors() {
    use nibble::gpu::weights::GpuLora;
    use nibble::lora::{LoraAdapter, LoraConfig};
    use nibble::models::optimizer;
    use nibble::ops::adamw::AdamWParams;
    let Some(gpu) = common::gpu() else { return };
    let model = model(true);
    let mut rng = Rng::new(4);
    let mut random = |a: &mut LoraAdapter, scale: f64, positive: bool| {
        for (_, p) in a.pairs_mut() {
            for x in p.a.iter_mut().chain(p.b.iter_mut()) {
                let r = rng.normal() * scale;
                *x = if positive {
                    (r.abs() + 1e-4) as f32
                } else {
                    r as f32
                };
            }
        }
    };
    let mut params =
        LoraAdapter::init(&model.config, LoraConfig::default(), &mut Rng::new(1)).unwrap();
    let (mut grads, mut m, mut v) = (
        params.zeros_like(),
        params.zeros_like(),
        params.zeros_like(),
    );
    random(&mut params, 0.1, false);
    random(&mut grads, 0.5, false);
    random(&mut m, 0.01, false);
    random(&mut v, 0.001, true);
    let graph = optimizer::build(&optimizer::shapes(&params), 1.0);
    graph.validate().unwrap();
    let inputs = StepInputs {
        adamw: bytemuck::cast(AdamWParams::new(2e-3, 0.9, 0.999, 1e-8, 0.01, 3, 1.0)),
        ..StepInputs::default()
    };
    let upload = |a: &LoraAdapter| GpuLora::upload(&gpu, a);
    let (gp, gg, gm, gv) = (upload(&params), upload(&grads), upload(&m), upload(&v));
    let gmodel = GpuModel::upload(&gpu, &model).unwrap();
    let mut enc = gpu.encoder();
    let bind = exec::gpu::Bindings {
        gpu: &gpu,
        model: &gmodel,
        lora: Some(&gp),
        grads: Some(&gg),
        cache: None,
        moments: Some([&gm, &gv]),
        inputs: &inputs,
    };
    let clip_buffer = exec::gpu::record(&graph, bind, &mut enc)
        .unwrap()
        .take("clip")
        .unwrap();
    let gpu_clip = gpu.submit_and_read(enc, &[&clip_buffer]).unwrap().remove(0);
    let (mut gpu_params, mut gpu_m, mut gpu_v) = (params.clone(), m.clone(), v.clone());
    gp.download(&gpu, &mut gpu_params).unwrap();
    gm.download(&gpu, &mut gpu_m).unwrap();
    gv.download(&gpu, &mut gpu_v).unwrap();
    let before = params.clone();
    let cpu_clip = exec::cpu::run(
        &graph,
        exec::cpu::Bindings {
            model: &model,
            adapter: None,
            grads: Some(&mut grads),
            cache: None,
            optimizer: Some(exec::cpu::OptimizerState {
                params: &mut params,
                m: &mut m,
                v: &mut v,
            }),
            inputs: &inputs,
            precision: Precision::F32,
        },
    )
    .unwrap()
    .take("clip");
    assert!(
        cpu_clip[1] < 0.5,
        "the norm {} should be clipped",
        cpu_clip[0]
    );
    let flat = |a: &LoraAdapter| -> Vec<f32> {
        a.pairs()
            .flat_map(|(_, p)| p.a.iter().chain(&p.b).copied().collect::<Vec<_>>())
            .collect()
    };
    let updates = common::rel_update(&flat(&gpu_params), &flat(&params), &flat(&before));
    eprintln!("parameter updates: {updates:.1e}");
    let mut worst = common::rel(&gpu_clip, &cpu_clip).max(updates);
    for (name, got, expected) in [
        ("first moments", flat(&gpu_m), flat(&m)),
        ("second moments", flat(&gpu_v), flat(&v)),
    ] {
        let e = common::rel(&got, &expected);
        eprintln!("{name}: {e:.1e}");
        worst = worst.max(e);
    }
    eprintln!("norm and clip: {:.1e}", common::rel(&gpu_clip, &cpu_clip));
    assert!(worst < 4e-6, "the optimizer graph differs by {worst:e}");
}
