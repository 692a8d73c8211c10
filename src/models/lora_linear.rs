//! A frozen linear with its optional LoRA branch, forward and backward, as graph nodes: the one place
//! every model builder gets its adapted linears from.
//!
//! DoRA (PEFT's `DoraLinearLayer`) rescales each output of the adapted linear by c = m / n, m the
//! trained magnitude and n = ‖W + s·B·A‖ of the output's row (held constant in the backward): with
//! x′ = dropout(x) and the branch l = s·(x′·Aᵀ)·Bᵀ, y = W·x + bias + l + (c − 1) ⊙ h where
//! h = W·x′ + l, which is c ⊙ (W·x + l) + bias when no dropout applies, as PEFT computes it.

use crate::graph::{BufId, Builder, Input, Op, Role};
use crate::lora::Factor;
use crate::models::decoder::{Adapted, FactorSource, LoraSpec};
use crate::ops::dropout::DropoutSide;

/// A linear layer as the forward ran it: what its backward reads.
pub struct LinearTape {
    pub path: String,
    weight: BufId,
    out: usize,
    inp: usize,
    /// Rows (tokens) of its input.
    tokens: usize,
    lora: Option<LoraTape>,
}

struct LoraTape {
    rank: usize,
    scale: f32,
    a: BufId,
    b: BufId,
    /// dropout(x)·Aᵀ [tokens, r].
    xa: BufId,
    dropout: Option<BranchDropout>,
    dora: Option<DoraTape>,
}

struct DoraTape {
    /// [m/n, m/n − 1, 1/n] (`Op::DoraFactors`).
    factors: BufId,
    /// W·dropout(x) + the branch's output [tokens, out].
    h: BufId,
}

/// c = alpha · A·B with A [m, k] (stored transposed when `a_t`) and B [k, n] (when `b_t`).
pub fn mm(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, alpha: f32) -> Op {
    Op::Matmul {
        m,
        n,
        k,
        a_t,
        b_t,
        alpha,
    }
}

/// A LoRA branch's dropout: its probability and the stream its masks are drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BranchDropout {
    pub p: f32,
    pub stream: u32,
}

impl BranchDropout {
    /// `mm` with this dropout on the `side` matrix.
    fn masked_mm(
        self,
        (m, n, k): (usize, usize, usize),
        (a_t, b_t): (bool, bool),
        side: DropoutSide,
    ) -> Op {
        Op::DropoutMatmul {
            m,
            n,
            k,
            a_t,
            b_t,
            alpha: 1.0,
            p: self.p,
            stream: self.stream,
            side,
        }
    }
}

/// A LoRA branch's input: x, or x through the branch's dropout.
fn lora_input(b: &mut Builder, x: BufId, dropout: Option<BranchDropout>, path: &str) -> BufId {
    let Some(BranchDropout { p, stream }) = dropout else {
        return x;
    };
    let dropped = b.activation(b.len(x), format!("{path} dropout"));
    let seed = b.input(Input::DropoutSeed, 2);
    b.node(Op::Dropout { p, stream }, &[x, seed], &[dropped], false);
    dropped
}

/// y = x·Wᵀ (+ bias) + scale · (dropout(x)·Aᵀ)·Bᵀ for x [tokens, inp] and the weight `{path}.weight`
/// [out, inp]; the LoRA branch where `lora` targets `path`. `name` names the output.
pub fn forward(
    b: &mut Builder,
    lora: Option<&LoraSpec>,
    x: BufId,
    (t, out, inp): (usize, usize, usize),
    (path, name): (String, String),
    bias: Option<BufId>,
    dropout: Option<BranchDropout>,
) -> (BufId, LinearTape) {
    let weight = b.weight(&format!("{path}.weight"), out * inp);
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let y = b.activation(t * out, name);
    b.node(Op::Linear { out, inp }, &inputs, &[y], false);
    // Without dropout or bias, h = W·x + branch is y itself before DoRA's term: copied, not computed.
    let h_is_y = dropout.is_none() && bias.is_none();
    let tape = tape_of(b, lora, x, (t, out, inp), path, (dropout, !h_is_y));
    if let Some(branch) = &tape.lora {
        let (r, scale) = (branch.rank, branch.scale);
        b.node(
            mm(t, out, r, false, true, scale),
            &[branch.xa, branch.b],
            &[y],
            true,
        );
        if let Some(dora) = &branch.dora {
            if h_is_y {
                let copy = Op::Columns {
                    width: out,
                    offset: 0,
                    len: out,
                };
                b.node(copy, &[y], &[dora.h], false);
            }
            // y += (m/n − 1) ⊙ h
            let gate = Op::Gate { dim: out, chunk: 1 };
            b.node(gate, &[dora.factors, dora.h], &[y], true);
        }
    }
    (y, tape)
}

/// What `backward` reads of the linear at `path` on x, without computing its output: the LoRA
/// branch's dropout(x)·Aᵀ where `lora` targets it, and under DoRA the factors and h = W·x′ + branch
/// (a backward that recomputes its inputs needs no more).
pub fn tape(
    b: &mut Builder,
    lora: Option<&LoraSpec>,
    x: BufId,
    dims: (usize, usize, usize),
    path: String,
    dropout: Option<BranchDropout>,
) -> LinearTape {
    tape_of(b, lora, x, dims, path, (dropout, true))
}

/// `tape`, DoRA's h computed (`compute_h`) or left for the caller to write.
fn tape_of(
    b: &mut Builder,
    lora: Option<&LoraSpec>,
    x: BufId,
    (t, out, inp): (usize, usize, usize),
    path: String,
    (dropout, compute_h): (Option<BranchDropout>, bool),
) -> LinearTape {
    let weight = b.weight(&format!("{path}.weight"), out * inp);
    let lora = match lora.and_then(|spec| spec.targets.get(&path)) {
        Some(&Adapted {
            rank: r,
            scale,
            dora,
        }) => {
            let factor = |b: &mut Builder, factor, len| {
                let path = path.clone();
                b.lora(Role::Lora { path, factor }, len)
            };
            let a = factor(b, Factor::A, r * inp);
            let bm = factor(b, Factor::B, out * r);
            let xa = b.activation(t * r, format!("{path} x·Aᵀ"));
            // DoRA's h reads the dropped input too: only then is it stored.
            let lora_in = match dropout {
                Some(dropout) if !dora => {
                    let op = dropout.masked_mm((t, r, inp), (false, true), DropoutSide::A);
                    let seed = b.input(Input::DropoutSeed, 2);
                    b.node(op, &[x, a, seed], &[xa], false);
                    x
                }
                _ => {
                    let lora_in = lora_input(b, x, dropout, &path);
                    b.node(mm(t, r, inp, false, true, 1.0), &[lora_in, a], &[xa], false);
                    lora_in
                }
            };
            let dora = dora.then(|| {
                let source = lora.map(|spec| spec.dora_factors).unwrap_or_default();
                let factors = match source {
                    FactorSource::Compute => b.activation(3 * out, format!("{path} DoRA factors")),
                    _ => b.state(Role::DoraFactors(path.clone()), 3 * out),
                };
                if source != FactorSource::Kept {
                    let magnitude = factor(b, Factor::Magnitude, out);
                    let op = Op::DoraFactors {
                        out,
                        inp,
                        rank: r,
                        scale,
                    };
                    b.node(op, &[weight, a, bm, magnitude], &[factors], false);
                }
                let h = b.activation(t * out, format!("{path} DoRA W·x′ + branch"));
                if compute_h {
                    b.node(Op::Linear { out, inp }, &[lora_in, weight], &[h], false);
                    b.node(mm(t, out, r, false, true, scale), &[xa, bm], &[h], true);
                }
                DoraTape { factors, h }
            });
            Some(LoraTape {
                rank: r,
                scale,
                a,
                b: bm,
                xa,
                dropout,
                dora,
            })
        }
        None => None,
    };
    LinearTape {
        path,
        weight,
        out,
        inp,
        tokens: t,
        lora,
    }
}

/// dx += dy·W and the LoRA branch's input gradient; the LoRA matrices' gradients accumulate. `x` is
/// the linear's input: the forward's, or the same values recomputed.
pub fn backward(b: &mut Builder, tape: &LinearTape, x: BufId, dy: BufId, dx: BufId) {
    let (t, out, inp) = (tape.tokens, tape.out, tape.inp);
    let path = &tape.path;
    // Under DoRA the branch sees dy scaled by m/n, as does the base without dropout (where
    // y = m/n ⊙ (W·x + l) + bias); with dropout the base sees dy, and W·x′ (m/n − 1) ⊙ dy.
    let (branch_dy, base_dy) = match tape.lora.as_ref().and_then(|l| l.dora.as_ref()) {
        Some(dora) => {
            let scaled = b.activation(t * out, format!("d {path} DoRA-scaled"));
            let gate = Op::Gate { dim: out, chunk: 0 };
            b.node(gate, &[dora.factors, dy], &[scaled], false);
            let role = Role::LoraGrad {
                path: path.clone(),
                factor: Factor::Magnitude,
            };
            let gm = b.lora(role, out);
            let op = Op::DoraMagnitudeGrad { dim: out };
            b.node(op, &[dy, dora.h, dora.factors], &[gm], true);
            let dropped = tape.lora.as_ref().is_some_and(|l| l.dropout.is_some());
            (scaled, if dropped { dy } else { scaled })
        }
        None => (dy, dy),
    };
    b.node(
        Op::LinearBackwardInput { out, inp },
        &[base_dy, tape.weight],
        &[dx],
        true,
    );
    let Some(lora) = &tape.lora else {
        return;
    };
    let dy = branch_dy;
    let (r, scale) = (lora.rank, lora.scale);
    // d(xa) = scale · dy·B
    let dxa = b.activation(t * r, format!("d {path} x·Aᵀ"));
    b.node(
        mm(t, r, out, false, false, scale),
        &[dy, lora.b],
        &[dxa],
        false,
    );
    let grad = |b: &mut Builder, factor, len| {
        let path = path.clone();
        b.lora(Role::LoraGrad { path, factor }, len)
    };
    let gb = grad(b, Factor::B, out * r);
    let ga = grad(b, Factor::A, r * inp);
    // dB += scale · dyᵀ·xa
    b.node(
        mm(out, r, t, true, false, scale),
        &[dy, lora.xa],
        &[gb],
        true,
    );
    // dA += d(xa)ᵀ·dropout(x) and dx += dropout′(d(xa)·A); the dropped input is drawn again rather
    // than kept (the masks are counter-based), within the products except under DoRA.
    match (lora.dropout, &lora.dora) {
        (None, _) => {
            b.node(mm(r, inp, t, true, false, 1.0), &[dxa, x], &[ga], true);
            // The branch's input is x itself: its gradient adds into dx with no buffer of its own.
            b.node(
                mm(t, inp, r, false, false, 1.0),
                &[dxa, lora.a],
                &[dx],
                true,
            );
        }
        (Some(dropout), None) => {
            let seed = b.input(Input::DropoutSeed, 2);
            let op = dropout.masked_mm((r, inp, t), (true, false), DropoutSide::B);
            b.node(op, &[dxa, x, seed], &[ga], true);
            let op = dropout.masked_mm((t, inp, r), (false, false), DropoutSide::Product);
            b.node(op, &[dxa, lora.a, seed], &[dx], true);
        }
        (Some(dropout), Some(dora)) => {
            let lora_in = lora_input(b, x, Some(dropout), path);
            b.node(
                mm(r, inp, t, true, false, 1.0),
                &[dxa, lora_in],
                &[ga],
                true,
            );
            let d_lora_in = b.activation(t * inp, format!("d {path} input"));
            b.node(
                mm(t, inp, r, false, false, 1.0),
                &[dxa, lora.a],
                &[d_lora_in],
                false,
            );
            // h's W·x′ term: d(x′) += ((m/n − 1) ⊙ dy)·W, dy the linear's own.
            let dh = b.activation(t * out, format!("d {path} DoRA W·x′"));
            let gate = Op::Gate { dim: out, chunk: 1 };
            b.node(gate, &[dora.factors, base_dy], &[dh], false);
            let op = Op::LinearBackwardInput { out, inp };
            b.node(op, &[dh, tape.weight], &[d_lora_in], true);
            let BranchDropout { p, stream } = dropout;
            let seed = b.input(Input::DropoutSeed, 2);
            let op = Op::DropoutBackward { p, stream };
            b.node(op, &[d_lora_in, seed], &[dx], true);
        }
    }
}
