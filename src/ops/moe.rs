//! Mixture-of-experts layers (Qwen3-MoE, Mixtral, gpt-oss): a router picks `top_k` of `experts` gated
//! MLPs for each token and mixes their outputs by its weights. The experts' weights are stacked, as
//! transformers keeps them in memory: `gate_up` [experts · 2·inter, hidden] (each expert's gate rows,
//! then its up rows) and `down` [experts · hidden, inter], so one packed 4-bit tensor holds a layer's
//! experts and a run of its rows is one expert's projection.

use crate::config::GateActivation;
use crate::model::LinearWeight;
use crate::ops::matmul::{View, matmul, matmul_into};
use crate::ops::{Precision, glu, linear};
use rayon::prelude::*;

/// Which of a layer's two stacks of experts a graph adapts with LoRA: each one's (rank, scale).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MoeLora {
    pub gate_up: Option<(usize, f32)>,
    pub down: Option<(usize, f32)>,
}

impl MoeLora {
    /// The adapted stacks in the order their pairs follow an op's other inputs: gate_up, down.
    pub fn stacks(&self) -> [Option<(usize, f32)>; 2] {
        [self.gate_up, self.down]
    }

    /// Floats the branches hold beside `MoeShape::temporaries`: every token's x·Aᵀ of each stack
    /// (and in the backward its gradient, and an expert's B gradient before it is added in).
    pub fn temporaries(&self, shape: &MoeShape, tokens: usize, backward: bool) -> usize {
        let outs = [2 * shape.inter, shape.hidden];
        self.stacks()
            .iter()
            .zip(outs)
            .filter_map(|(stack, out)| stack.map(|(rank, _)| (rank, out)))
            .map(|(rank, out)| match backward {
                false => tokens * rank,
                true => 2 * tokens * rank + out * rank,
            })
            .sum()
    }
}

/// A layer's experts: the stacked weights, their activation, and the LoRA pairs of each stack where
/// an adapter adapts it.
#[derive(Clone, Copy)]
pub struct Experts<'a> {
    pub gate_up: &'a LinearWeight,
    pub down: &'a LinearWeight,
    pub act: GateActivation,
    pub gate_up_lora: Option<ExpertPairs<'a>>,
    pub down_lora: Option<ExpertPairs<'a>>,
}

/// A stack of experts' LoRA pairs in PEFT's layout (`lora::LoraPair`): A [experts · rank, in], expert
/// e's A the rows e·rank..; B [out, rank · experts], expert e's B the columns e, e + experts, …; expert
/// e's weight updated by scale · B_e·A_e.
#[derive(Clone, Copy)]
pub struct ExpertPairs<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f32,
    pub experts: usize,
}

/// The gradients of an `ExpertPairs`' A and B, added to.
pub struct ExpertGrads<'a> {
    pub a: &'a mut [f32],
    pub b: &'a mut [f32],
}

impl<'a> ExpertPairs<'a> {
    /// A stack's pairs as an adapter holds them, at `scale`.
    pub fn of(pair: &'a crate::lora::LoraPair, scale: f32) -> Self {
        ExpertPairs {
            a: &pair.a,
            b: &pair.b,
            rank: pair.rank,
            scale,
            experts: pair.experts,
        }
    }

    /// w [count, inp] += scale · B_e[rows]·A_e: expert e's update of those rows of its weight (a
    /// merge).
    pub fn add_update(&self, e: usize, rows: (usize, usize), w: &mut [f32]) {
        let inp = self.a.len() / (self.experts * self.rank);
        matmul_into(self.b(e, rows), self.a(e, inp), self.scale, w, inp, 0, true);
    }

    /// Expert e's A [rank, inp].
    fn a(&self, e: usize, inp: usize) -> View<'a> {
        View::new(
            &self.a[e * self.rank * inp..][..self.rank * inp],
            self.rank,
            inp,
        )
    }

    /// Rows `first..first + count` of expert e's B: [count, rank].
    fn b(&self, e: usize, (first, count): (usize, usize)) -> View<'a> {
        let ld = self.rank * self.experts;
        View {
            data: &self.b[first * ld + e..],
            rows: count,
            cols: self.rank,
            row_stride: ld,
            col_stride: self.experts,
        }
    }

    /// Their transpose: [rank, count].
    fn b_t(&self, e: usize, rows: (usize, usize)) -> View<'a> {
        self.b(e, rows).t()
    }

    /// x·A_eᵀ [n, rank] of expert e's rows x [n, inp].
    fn project(&self, e: usize, x: &[f32], inp: usize) -> Vec<f32> {
        matmul(View::new(x, x.len() / inp, inp), self.a(e, inp).t())
    }

    /// y [n, count] += scale · xa·B_e[rows]ᵀ, xa = `project`'s.
    fn add_branch(&self, e: usize, xa: &[f32], rows: (usize, usize), y: &mut [f32]) {
        let n = xa.len() / self.rank;
        let b_t = self.b_t(e, rows);
        matmul_into(
            View::new(xa, n, self.rank),
            b_t,
            self.scale,
            y,
            rows.1,
            0,
            true,
        );
    }

    /// The branch's backward for rows `rows` of its output, whose gradient is dy [n, count]:
    /// d(xa) += scale · dy·B_e[rows], and B_e[rows]' gradient += scale · dyᵀ·xa.
    fn branch_backward(
        &self,
        e: usize,
        (xa, dy): (&[f32], &[f32]),
        rows: (usize, usize),
        (d_xa, grads): (&mut [f32], &mut ExpertGrads),
    ) {
        let (n, r) = (xa.len() / self.rank, self.rank);
        matmul_into(
            View::new(dy, n, rows.1),
            self.b(e, rows),
            self.scale,
            d_xa,
            r,
            0,
            true,
        );
        let gb = matmul(View::transposed(dy, n, rows.1), View::new(xa, n, r));
        let ld = r * self.experts;
        for (i, g) in gb.chunks_exact(r).enumerate() {
            let row = &mut grads.b[(rows.0 + i) * ld..][..ld];
            for (k, &g) in g.iter().enumerate() {
                row[k * self.experts + e] += self.scale * g;
            }
        }
    }

    /// The rest of the backward once d(xa) is whole: A_e's gradient += d(xa)ᵀ·x and dx += d(xa)·A_e.
    fn input_backward(
        &self,
        e: usize,
        (x, d_xa): (&[f32], &[f32]),
        inp: usize,
        (dx, grads): (&mut [f32], &mut ExpertGrads),
    ) {
        let (n, r) = (x.len() / inp, self.rank);
        let ga = &mut grads.a[e * r * inp..][..r * inp];
        matmul_into(
            View::transposed(d_xa, n, r),
            View::new(x, n, inp),
            1.0,
            ga,
            inp,
            0,
            true,
        );
        matmul_into(View::new(d_xa, n, r), self.a(e, inp), 1.0, dx, inp, 0, true);
    }
}

/// The shape of a layer's experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MoeShape {
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    /// Each expert's intermediate width.
    pub inter: usize,
}

impl MoeShape {
    /// Expert e's gate rows of the stacked gate/up weight; its up rows follow.
    fn gate_rows(&self, e: usize) -> (usize, usize) {
        (e * 2 * self.inter, self.inter)
    }

    fn up_rows(&self, e: usize) -> (usize, usize) {
        (e * 2 * self.inter + self.inter, self.inter)
    }

    fn down_rows(&self, e: usize) -> (usize, usize) {
        (e * self.hidden, self.hidden)
    }

    /// Floats the experts' kernels hold while they run for `tokens` tokens: every (token, choice)'s
    /// output (or input gradient) before the per-token sums, and the largest expert's rows (at most
    /// every token): its input and output, gate, up and gated activations, and in the backward the
    /// output's gradient, the input's, and the three activations'.
    pub fn temporaries(&self, tokens: usize, backward: bool) -> usize {
        let per_token = match backward {
            false => 2 * self.hidden + 3 * self.inter,
            true => 4 * self.hidden + 6 * self.inter,
        };
        tokens * self.top_k * self.hidden + tokens * per_token
    }
}

/// The softmax of a row of router logits, in f32 as transformers computes it.
fn softmax(logits: &[f32], p: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (p, &l) in p.iter_mut().zip(logits) {
        *p = (l - max).exp();
        sum += *p;
    }
    p.iter_mut().for_each(|p| *p /= sum);
}

/// The `k` largest of `p`, largest first; of equal values the lower index first (torch's order
/// among exact ties is its kernel's, which only degenerate routers meet).
fn top_k(p: &[f32], k: usize, chosen: &mut [u32]) {
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    order.select_nth_unstable_by(k - 1, |&a, &b| {
        p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b))
    });
    order.truncate(k);
    order.sort_unstable_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    chosen.copy_from_slice(&order);
}

/// Each token's experts and their weights from its router logits [tokens, experts]: the softmax's
/// `top_k` largest probabilities, divided by their sum when `normalize` (Qwen3-MoE's
/// `norm_topk_prob`; a softmax over the chosen logits alone, as gpt-oss and Mixtral route).
pub fn route(
    logits: &[f32],
    shape: &MoeShape,
    normalize: bool,
    routes: &mut [u32],
    weights: &mut [f32],
) {
    let (e, k) = (shape.experts, shape.top_k);
    assert_eq!(
        logits.len() % e,
        0,
        "moe route: logits are tokens x experts"
    );
    let tokens = logits.len() / e;
    assert!(routes.len() == tokens * k && weights.len() == tokens * k);
    routes
        .par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(logits.par_chunks(e))
        .for_each(|((chosen, w), logits)| {
            let mut p = vec![0f32; e];
            softmax(logits, &mut p);
            top_k(&p, k, chosen);
            for (w, &c) in w.iter_mut().zip(chosen.iter()) {
                *w = p[c as usize];
            }
            if normalize {
                let sum: f32 = w.iter().sum();
                w.iter_mut().for_each(|w| *w /= sum);
            }
        });
}

/// The router logits' gradient from the routing weights' (`route`'s choices held fixed, as top-k's
/// are to autograd): normalized, the weights are a softmax over the chosen logits, d l_j = w_j (dw_j −
/// Σ w·dw) for the chosen and 0 for the rest; otherwise each weight is the full softmax's p, d l_e =
/// p_e ([e chosen] dw_e − Σ_j p_{chosen j} dw_j).
pub fn route_backward(
    logits: &[f32],
    routes: &[u32],
    d_weights: &[f32],
    shape: &MoeShape,
    normalize: bool,
    d_logits: &mut [f32],
    accumulate: bool,
) {
    let (e, k) = (shape.experts, shape.top_k);
    assert_eq!(d_logits.len(), logits.len(), "moe route backward: d_logits");
    d_logits
        .par_chunks_mut(e)
        .zip(logits.par_chunks(e))
        .zip(routes.par_chunks(k).zip(d_weights.par_chunks(k)))
        .for_each(|((dl, logits), (chosen, dw))| {
            let mut p = vec![0f32; e];
            softmax(logits, &mut p);
            let mut grad = vec![0f32; e];
            if normalize {
                let sum: f32 = chosen.iter().map(|&c| p[c as usize]).sum();
                let w = |j: usize| p[chosen[j] as usize] / sum;
                let mean: f32 = (0..k).map(|j| w(j) * dw[j]).sum();
                for j in 0..k {
                    grad[chosen[j] as usize] = w(j) * (dw[j] - mean);
                }
            } else {
                let mean: f32 = (0..k).map(|j| p[chosen[j] as usize] * dw[j]).sum();
                for (g, &p) in grad.iter_mut().zip(&p) {
                    *g = -p * mean;
                }
                for j in 0..k {
                    let c = chosen[j] as usize;
                    grad[c] += p[c] * dw[j];
                }
            }
            match accumulate {
                true => dl.iter_mut().zip(&grad).for_each(|(d, g)| *d += g),
                false => dl.copy_from_slice(&grad),
            }
        });
}

/// For each expert, the (token, choice) slots routed to it, tokens ascending.
fn slots_by_expert(routes: &[u32], shape: &MoeShape) -> Vec<Vec<usize>> {
    let mut by_expert = vec![Vec::new(); shape.experts];
    for (slot, &e) in routes.iter().enumerate() {
        assert!((e as usize) < shape.experts, "moe: expert {e} routed to");
        by_expert[e as usize].push(slot);
    }
    by_expert
}

/// The rows of x [tokens, dim] of these slots' tokens.
fn gather(x: &[f32], slots: &[usize], k: usize, dim: usize) -> Vec<f32> {
    let mut rows = vec![0f32; slots.len() * dim];
    rows.par_chunks_mut(dim)
        .zip(slots.par_iter())
        .for_each(|(row, &s)| row.copy_from_slice(&x[s / k * dim..][..dim]));
    rows
}

/// Expert e's gate and up projections of its rows `xe`, act(gate)·up, and the LoRA branches' xe·A_eᵀ.
struct Recomputed {
    gate: Vec<f32>,
    up: Vec<f32>,
    hidden: Vec<f32>,
    gate_up_xa: Vec<f32>,
}

/// The rows of expert e's gate and of its up projection, within its own B (gate, then up).
fn own_rows(shape: &MoeShape) -> [(usize, usize); 2] {
    [(0, shape.inter), (shape.inter, shape.inter)]
}

fn gated(
    xe: &[f32],
    e: usize,
    experts: &Experts,
    shape: &MoeShape,
    precision: Precision,
) -> Recomputed {
    let n = xe.len() / shape.hidden;
    let packed = linear::pack_input(xe, shape.hidden, precision);
    let mut gate = vec![0f32; n * shape.inter];
    let mut up = vec![0f32; n * shape.inter];
    let (gate_up, act) = (experts.gate_up, experts.act);
    let rows = shape.gate_rows(e);
    linear::forward_rows_packed(xe, packed.as_ref(), gate_up, rows, &mut gate, precision);
    let rows = shape.up_rows(e);
    linear::forward_rows_packed(xe, packed.as_ref(), gate_up, rows, &mut up, precision);
    let mut gate_up_xa = Vec::new();
    if let Some(lora) = &experts.gate_up_lora {
        gate_up_xa = lora.project(e, xe, shape.hidden);
        let [gate_rows, up_rows] = own_rows(shape);
        lora.add_branch(e, &gate_up_xa, gate_rows, &mut gate);
        lora.add_branch(e, &gate_up_xa, up_rows, &mut up);
    }
    let mut hidden = vec![0f32; n * shape.inter];
    glu::forward(act, &gate, &up, &mut hidden);
    Recomputed {
        gate,
        up,
        hidden,
        gate_up_xa,
    }
}

/// Expert e's output [n, hidden] from its act(gate)·up, and the down branch's hidden·A_eᵀ.
fn expert_output(
    r: &Recomputed,
    e: usize,
    experts: &Experts,
    shape: &MoeShape,
    precision: Precision,
) -> (Vec<f32>, Vec<f32>) {
    let n = r.hidden.len() / shape.inter;
    let mut ye = vec![0f32; n * shape.hidden];
    let packed = linear::pack_input(&r.hidden, shape.inter, precision);
    let rows = shape.down_rows(e);
    linear::forward_rows_packed(
        &r.hidden,
        packed.as_ref(),
        experts.down,
        rows,
        &mut ye,
        precision,
    );
    let mut down_xa = Vec::new();
    if let Some(lora) = &experts.down_lora {
        down_xa = lora.project(e, &r.hidden, shape.inter);
        lora.add_branch(e, &down_xa, (0, shape.hidden), &mut ye);
    }
    (ye, down_xa)
}

/// y (+)= Σ_j weights[t, j] · expert_{routes[t, j]}(x[t]) for each token t, the k terms summed in
/// the router's order; each expert runs once over all its tokens.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    routes: &[u32],
    weights: &[f32],
    experts: &Experts,
    shape: &MoeShape,
    y: &mut [f32],
    accumulate: bool,
    precision: Precision,
) {
    let (h, k) = (shape.hidden, shape.top_k);
    let tokens = x.len() / h;
    assert!(routes.len() == tokens * k && weights.len() == tokens * k && y.len() == x.len());
    let mut outputs = vec![0f32; tokens * k * h];
    for (e, slots) in slots_by_expert(routes, shape).into_iter().enumerate() {
        if slots.is_empty() {
            continue;
        }
        let xe = gather(x, &slots, k, h);
        let r = gated(&xe, e, experts, shape, precision);
        let (ye, _) = expert_output(&r, e, experts, shape, precision);
        for (row, &s) in ye.chunks_exact(h).zip(&slots) {
            outputs[s * h..][..h].copy_from_slice(row);
        }
    }
    y.par_chunks_mut(h)
        .zip(outputs.par_chunks(k * h).zip(weights.par_chunks(k)))
        .for_each(|(y, (out, w))| {
            if !accumulate {
                y.fill(0.0);
            }
            for (o, &w) in out.chunks_exact(h).zip(w) {
                y.iter_mut().zip(o).for_each(|(y, o)| *y += w * o);
            }
        });
}

/// `forward`'s gradients: dx (+)= into x, d_weights [tokens, k] (each choice's output dotted with
/// dy), and the LoRA pairs' gradients added to `grads` (gate_up's, down's) where `experts` has
/// pairs. Each expert's activations are recomputed from x, not kept.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    routes: &[u32],
    weights: &[f32],
    experts: &Experts,
    shape: &MoeShape,
    dy: &[f32],
    (dx, d_weights): (&mut [f32], &mut [f32]),
    mut grads: [Option<ExpertGrads>; 2],
    accumulate: bool,
    precision: Precision,
) {
    let (gate_up, down, act) = (experts.gate_up, experts.down, experts.act);
    // The branches' input gradients need their pairs' gradients' products: both or neither.
    let adapted = [experts.gate_up_lora.is_some(), experts.down_lora.is_some()];
    assert_eq!(adapted, [grads[0].is_some(), grads[1].is_some()]);
    let (h, k) = (shape.hidden, shape.top_k);
    let tokens = x.len() / h;
    assert!(dy.len() == x.len() && dx.len() == x.len() && d_weights.len() == tokens * k);
    let mut d_inputs = vec![0f32; tokens * k * h];
    for (e, slots) in slots_by_expert(routes, shape).into_iter().enumerate() {
        if slots.is_empty() {
            continue;
        }
        let n = slots.len();
        let xe = gather(x, &slots, k, h);
        let r = gated(&xe, e, experts, shape, precision);
        let (ye, down_xa) = expert_output(&r, e, experts, shape, precision);
        let rows = shape.down_rows(e);
        // dy of each slot's token, times its weight: the gradient at the expert's output.
        let mut dye = gather(dy, &slots, k, h);
        for ((d_out, out), &s) in dye.chunks_exact_mut(h).zip(ye.chunks_exact(h)).zip(&slots) {
            d_weights[s] = d_out.iter().zip(out).map(|(d, o)| d * o).sum();
            d_out.iter_mut().for_each(|d| *d *= weights[s]);
        }
        let mut d_hidden = vec![0f32; n * shape.inter];
        linear::backward_input_rows(&dye, down, rows, &mut d_hidden, false, precision);
        if let (Some(lora), Some(g)) = (&experts.down_lora, &mut grads[1]) {
            let mut d_xa = vec![0f32; n * lora.rank];
            lora.branch_backward(e, (&down_xa, &dye), (0, h), (&mut d_xa, g));
            lora.input_backward(e, (&r.hidden, &d_xa), shape.inter, (&mut d_hidden, g));
        }
        let mut d_gate = vec![0f32; n * shape.inter];
        let mut d_up = vec![0f32; n * shape.inter];
        glu::backward(act, &r.gate, &r.up, &d_hidden, &mut d_gate, &mut d_up);
        let mut dxe = vec![0f32; n * h];
        let rows = shape.gate_rows(e);
        linear::backward_input_rows(&d_gate, gate_up, rows, &mut dxe, false, precision);
        let rows = shape.up_rows(e);
        linear::backward_input_rows(&d_up, gate_up, rows, &mut dxe, true, precision);
        if let (Some(lora), Some(g)) = (&experts.gate_up_lora, &mut grads[0]) {
            let mut d_xa = vec![0f32; n * lora.rank];
            let xa = &r.gate_up_xa;
            let [gate_rows, up_rows] = own_rows(shape);
            lora.branch_backward(e, (xa, &d_gate), gate_rows, (&mut d_xa, g));
            lora.branch_backward(e, (xa, &d_up), up_rows, (&mut d_xa, g));
            lora.input_backward(e, (&xe, &d_xa), h, (&mut dxe, g));
        }
        for (row, &s) in dxe.chunks_exact(h).zip(&slots) {
            d_inputs[s * h..][..h].copy_from_slice(row);
        }
    }
    dx.par_chunks_mut(h)
        .zip(d_inputs.par_chunks(k * h))
        .for_each(|(dx, d)| {
            if !accumulate {
                dx.fill(0.0);
            }
            for d in d.chunks_exact(h) {
                dx.iter_mut().zip(d).for_each(|(dx, d)| *dx += d);
            }
        });
}
