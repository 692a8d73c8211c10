//! Mixture-of-experts layers (Qwen3-MoE, Mixtral, gpt-oss): a router picks `top_k` of `experts` gated
//! MLPs for each token and mixes their outputs by its weights. The experts' weights are stacked, as
//! transformers keeps them in memory: `gate_up` [experts · 2·inter, hidden] (each expert's gate rows,
//! then its up rows) and `down` [experts · hidden, inter], so one packed 4-bit tensor holds a layer's
//! experts and a run of its rows is one expert's projection.

use crate::config::GateActivation;
use crate::exec::gpu::Recorder;
use crate::gpu::weights::GpuLinear;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::model::LinearWeight;
use crate::ops::linear::{ExpertRows, SortedRows};
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
    /// Where `MoeShape::biased`: gate_up's biases [experts, 2·inter] (each expert's gate's, then its
    /// up's) and down's [experts, hidden].
    pub biases: Option<[&'a [f32]; 2]>,
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
    /// Each expert's projections add biases (gpt-oss): the experts' inputs hold them after the
    /// stacked weights (after dy in the backward's).
    pub biased: bool,
}

impl MoeShape {
    /// Where the LoRA pairs start among the experts' inputs, the stacked weights' or dy's index
    /// `after` before them.
    pub fn pairs_at(&self, after: usize) -> usize {
        after + 1 + 2 * usize::from(self.biased)
    }

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
    if let Some([bias, _]) = experts.biases {
        let own = &bias[e * 2 * shape.inter..][..2 * shape.inter];
        let (gate_bias, up_bias) = own.split_at(shape.inter);
        add_bias(&mut gate, gate_bias);
        add_bias(&mut up, up_bias);
    }
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

/// Each row of y += bias.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
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
    if let Some([_, bias]) = experts.biases {
        add_bias(&mut ye, &bias[e * shape.hidden..][..shape.hidden]);
    }
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

/// shaders/moe.wgsl's parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MoeParams {
    pub tokens: u32,
    pub experts: u32,
    pub top_k: u32,
    pub width: u32,
    pub out: u32,
    pub rank: u32,
    pub row_offset: u32,
    pub gather: u32,
    pub scale: f32,
    pub accumulate: u32,
    pub normalize: u32,
    pub weighted: u32,
}

impl MoeParams {
    fn new(shape: &MoeShape, tokens: usize) -> Self {
        MoeParams {
            tokens: tokens as u32,
            experts: shape.experts as u32,
            top_k: shape.top_k as u32,
            ..bytemuck::Zeroable::zeroed()
        }
    }
}

/// Words of the GPU's `sorted` buffer (shaders/moe.wgsl): each expert's first sorted row, and per
/// slot its sorted row, per sorted row its slot and its expert.
fn sorted_len(shape: &MoeShape, tokens: usize) -> usize {
    shape.experts + 1 + 3 * tokens * shape.top_k
}

/// The scratch buffers (words) the GPU lowering of the experts takes, in the order it takes them:
/// the sorted rows; the gate, up and gated activations and the output of every slot (each sorted
/// row) with the branches' x·Aᵀ; in the backward the output's gradient, the activations', the
/// input's and the branches'.
pub fn gpu_temporaries(
    shape: &MoeShape,
    lora: &MoeLora,
    tokens: usize,
    backward: bool,
) -> Vec<usize> {
    let slots = tokens * shape.top_k;
    let (h, i) = (shape.hidden, shape.inter);
    let rank = |stack: Option<(usize, f32)>| stack.map(|(rank, _)| slots * rank);
    let mut lens = vec![sorted_len(shape, tokens), slots * i, slots * i];
    lens.extend(rank(lora.gate_up));
    lens.extend([slots * i, slots * h]);
    lens.extend(rank(lora.down));
    if backward {
        lens.extend([slots * h, slots * i]);
        lens.extend(rank(lora.down));
        lens.extend([slots * i, slots * i, slots * h]);
        lens.extend(rank(lora.gate_up));
    }
    lens
}

/// The GPU lowering of `route`: one thread per token.
pub(crate) fn record_route(
    r: &mut Recorder,
    (shape, normalize): (&MoeShape, bool),
    logits: &GpuBuffer,
    routes: &GpuBuffer,
    weights: &GpuBuffer,
) {
    let tokens = logits.len / shape.experts;
    let p = MoeParams {
        normalize: normalize as u32,
        ..MoeParams::new(shape, tokens)
    };
    let b = [(1, logits), (3, routes), (4, weights)];
    r.dispatch("moe_route", &p, &b, groups_1d(tokens, 256));
}

/// The GPU lowering of `route_backward`.
pub(crate) fn record_route_backward(
    r: &mut Recorder,
    (shape, normalize): (&MoeShape, bool),
    [logits, routes, d_weights]: [&GpuBuffer; 3],
    d_logits: &GpuBuffer,
    accumulate: bool,
) {
    let tokens = logits.len / shape.experts;
    let p = MoeParams {
        normalize: normalize as u32,
        accumulate: accumulate as u32,
        ..MoeParams::new(shape, tokens)
    };
    let b = [(1, logits), (3, routes), (4, d_weights), (7, d_logits)];
    r.dispatch("moe_route_backward", &p, &b, groups_1d(tokens, 256));
}

/// A layer's experts on the GPU: the stacked weights, their activation, and the pairs (A, B, rank,
/// scale) of each stack an adapter adapts.
pub(crate) struct GpuExperts<'a> {
    pub gate_up: &'a GpuLinear,
    pub down: &'a GpuLinear,
    /// As `Experts::biases`.
    pub biases: Option<[&'a GpuBuffer; 2]>,
    pub act: GateActivation,
    pub gate_up_lora: Option<GpuExpertPairs<'a>>,
    pub down_lora: Option<GpuExpertPairs<'a>>,
}

#[derive(Clone, Copy)]
pub(crate) struct GpuExpertPairs<'a> {
    pub a: &'a GpuBuffer,
    pub b: &'a GpuBuffer,
    pub rank: usize,
    pub scale: f32,
}

/// What the experts' forward leaves for their backward, by sorted row (`gated` and `expert_output`'s
/// buffers).
struct GpuRecomputed {
    sorted: GpuBuffer,
    gate: GpuBuffer,
    up: GpuBuffer,
    gate_up_xa: Option<GpuBuffer>,
    hidden: GpuBuffer,
    output: GpuBuffer,
    down_xa: Option<GpuBuffer>,
}

/// The experts' LoRA kernels of one stack over the sorted rows.
struct Branch<'a> {
    pairs: GpuExpertPairs<'a>,
    base: MoeParams,
    slots: usize,
}

impl Branch<'_> {
    fn params(&self, width: usize, out: usize, row_offset: usize) -> MoeParams {
        MoeParams {
            width: width as u32,
            out: out as u32,
            rank: self.pairs.rank as u32,
            row_offset: row_offset as u32,
            scale: self.pairs.scale,
            ..self.base
        }
    }

    /// xa [slots, rank] = each sorted row of `input` (x's rows gathered, or sorted rows) · A_eᵀ.
    fn project(
        &self,
        r: &mut Recorder,
        (input, gather): (&GpuBuffer, bool),
        sorted: &GpuBuffer,
        width: usize,
    ) -> GpuBuffer {
        let xa = r.scratch(self.slots * self.pairs.rank);
        let p = MoeParams {
            gather: gather as u32,
            ..self.params(width, 0, 0)
        };
        let b = [(1, input), (2, sorted), (5, self.pairs.a), (7, &xa)];
        let n = self.slots * self.pairs.rank;
        r.dispatch("moe_lora_project", &p, &b, groups_1d(n, 256));
        xa
    }

    /// y [slots, out] += scale · xa·B_eᵀ over B's rows `row_offset..`.
    fn expand(
        &self,
        r: &mut Recorder,
        xa: &GpuBuffer,
        sorted: &GpuBuffer,
        (row_offset, out): (usize, usize),
        y: &GpuBuffer,
    ) {
        let p = self.params(0, out, row_offset);
        let b = [(1, xa), (2, sorted), (5, self.pairs.b), (7, y)];
        r.dispatch("moe_lora_expand", &p, &b, groups_1d(self.slots * out, 256));
    }

    /// The backward of `expand` for the output's gradient dy [slots, out]: d(xa) (+)= scale ·
    /// dy·B_e, and B's gradient += scale · dyᵀ·xa.
    #[allow(clippy::too_many_arguments)]
    fn expand_backward(
        &self,
        r: &mut Recorder,
        (xa, dy): (&GpuBuffer, &GpuBuffer),
        sorted: &GpuBuffer,
        (row_offset, out): (usize, usize),
        (d_xa, accumulate): (&GpuBuffer, bool),
        grad_b: &GpuBuffer,
    ) {
        let p = MoeParams {
            accumulate: accumulate as u32,
            ..self.params(0, out, row_offset)
        };
        let n = self.slots * self.pairs.rank;
        let b = [(1, dy), (2, sorted), (5, self.pairs.b), (7, d_xa)];
        r.dispatch("moe_lora_back_xa", &p, &b, groups_1d(n, 256));
        let n = self.base.experts as usize * out * self.pairs.rank;
        let b = [(1, dy), (2, sorted), (5, xa), (7, grad_b)];
        r.dispatch("moe_lora_grad_b", &p, &b, groups_1d(n, 256));
    }

    /// The rest once d(xa) is whole: A's gradient += d(xa)ᵀ·input and d_input += d(xa)·A_e.
    fn project_backward(
        &self,
        r: &mut Recorder,
        ((input, gather), d_xa): ((&GpuBuffer, bool), &GpuBuffer),
        sorted: &GpuBuffer,
        width: usize,
        (d_input, grad_a): (&GpuBuffer, &GpuBuffer),
    ) {
        let p = MoeParams {
            gather: gather as u32,
            ..self.params(width, 0, 0)
        };
        let n = self.base.experts as usize * self.pairs.rank * width;
        let b = [(1, input), (2, sorted), (5, d_xa), (7, grad_a)];
        r.dispatch("moe_lora_grad_a", &p, &b, groups_1d(n, 256));
        let b = [(1, d_xa), (2, sorted), (5, self.pairs.a), (7, d_input)];
        r.dispatch("moe_lora_input", &p, &b, groups_1d(self.slots * width, 256));
    }
}

fn branch<'a>(
    pairs: Option<GpuExpertPairs<'a>>,
    shape: &MoeShape,
    tokens: usize,
) -> Option<Branch<'a>> {
    pairs.map(|pairs| Branch {
        pairs,
        base: MoeParams::new(shape, tokens),
        slots: tokens * shape.top_k,
    })
}

/// Sorts the slots by expert and runs the chosen experts over their rows (`gated` and
/// `expert_output` of every expert at once), keeping what the backward reads.
fn recompute(
    r: &mut Recorder,
    (x, routes): (&GpuBuffer, &GpuBuffer),
    experts: &GpuExperts,
    shape: &MoeShape,
) -> GpuRecomputed {
    let (h, i) = (shape.hidden, shape.inter);
    let tokens = x.len / h;
    let slots = tokens * shape.top_k;
    let sorted = r.scratch(sorted_len(shape, tokens));
    let p = MoeParams::new(shape, tokens);
    r.dispatch("moe_sort", &p, &[(2, &sorted), (3, routes)], [1, 1, 1]);
    let rows = SortedRows {
        sorted: &sorted,
        experts: shape.experts,
        tokens,
    };
    let (gate, up) = (r.scratch(slots * i), r.scratch(slots * i));
    for (offset, y) in [(0, &gate), (i, &up)] {
        let projection = ExpertRows {
            stride: 2 * i,
            offset,
            rows: i,
        };
        linear::record_expert_forward(r, experts.gate_up, (x, shape.top_k), &rows, projection, y);
        if let Some([bias, _]) = experts.biases {
            add_expert_bias(r, (bias, 2 * i, offset), (&sorted, tokens), shape, (y, i));
        }
    }
    let gate_up_xa = branch(experts.gate_up_lora, shape, tokens).map(|b| {
        let xa = b.project(r, (x, true), &sorted, h);
        b.expand(r, &xa, &sorted, (0, i), &gate);
        b.expand(r, &xa, &sorted, (i, i), &up);
        xa
    });
    let hidden = r.scratch(slots * i);
    glu::record_forward(r, experts.act, &gate, &up, &hidden);
    let output = r.scratch(slots * h);
    let projection = ExpertRows {
        stride: h,
        offset: 0,
        rows: h,
    };
    linear::record_expert_forward(r, experts.down, (&hidden, 0), &rows, projection, &output);
    if let Some([_, bias]) = experts.biases {
        add_expert_bias(r, (bias, h, 0), (&sorted, tokens), shape, (&output, h));
    }
    let down_xa = branch(experts.down_lora, shape, tokens).map(|b| {
        let xa = b.project(r, (&hidden, false), &sorted, i);
        b.expand(r, &xa, &sorted, (0, h), &output);
        xa
    });
    GpuRecomputed {
        sorted,
        gate,
        up,
        gate_up_xa,
        hidden,
        output,
        down_xa,
    }
}

/// y [slots, width] += each sorted row's expert's bias: the `width` entries from `offset` of its row
/// of `bias` [experts, stride].
fn add_expert_bias(
    r: &mut Recorder,
    (bias, stride, offset): (&GpuBuffer, usize, usize),
    (sorted, tokens): (&GpuBuffer, usize),
    shape: &MoeShape,
    (y, width): (&GpuBuffer, usize),
) {
    let p = MoeParams {
        width: stride as u32,
        out: width as u32,
        row_offset: offset as u32,
        ..MoeParams::new(shape, tokens)
    };
    let b = [(1, bias), (2, sorted), (7, y)];
    let n = tokens * shape.top_k * width;
    r.dispatch("moe_add_bias", &p, &b, groups_1d(n, 256));
}

/// The GPU lowering of `forward`: the slots sorted by expert, each expert's rows through its gated
/// MLP (grouped products over the stacked weights), mixed back per token.
pub(crate) fn record_forward(
    r: &mut Recorder,
    [x, routes, weights]: [&GpuBuffer; 3],
    experts: &GpuExperts,
    shape: &MoeShape,
    (y, accumulate): (&GpuBuffer, bool),
) {
    let tokens = x.len / shape.hidden;
    let rec = recompute(r, (x, routes), experts, shape);
    let p = MoeParams {
        width: shape.hidden as u32,
        accumulate: accumulate as u32,
        weighted: 1,
        ..MoeParams::new(shape, tokens)
    };
    let b = [(1, &rec.output), (2, &rec.sorted), (4, weights), (7, y)];
    r.dispatch("moe_combine", &p, &b, groups_1d(tokens * shape.hidden, 256));
}

/// The GPU lowering of `backward`: dx (+)= into x, d_weights, and each adapted stack's (A, B)
/// gradients in `grads` (gate_up's, down's) added to.
pub(crate) fn record_backward(
    r: &mut Recorder,
    [x, routes, weights, dy]: [&GpuBuffer; 4],
    experts: &GpuExperts,
    shape: &MoeShape,
    (dx, d_weights, accumulate): (&GpuBuffer, &GpuBuffer, bool),
    grads: [Option<(&GpuBuffer, &GpuBuffer)>; 2],
) {
    let (h, i) = (shape.hidden, shape.inter);
    let tokens = x.len / h;
    let slots = tokens * shape.top_k;
    let rec = recompute(r, (x, routes), experts, shape);
    let sorted = &rec.sorted;
    let rows = SortedRows {
        sorted,
        experts: shape.experts,
        tokens,
    };
    let base = MoeParams::new(shape, tokens);
    let p = MoeParams {
        width: h as u32,
        ..base
    };
    let d_output = r.scratch(slots * h);
    let b = [
        (1, dy),
        (2, sorted),
        (4, weights),
        (5, &rec.output),
        (7, &d_output),
        (8, d_weights),
    ];
    r.dispatch("moe_output_grad", &p, &b, groups_1d(slots, 256));
    let d_hidden = r.scratch(slots * i);
    let projection = ExpertRows {
        stride: h,
        offset: 0,
        rows: h,
    };
    linear::record_expert_backward_input(
        r,
        experts.down,
        &d_output,
        &rows,
        projection,
        (&d_hidden, false),
    );
    let down = branch(experts.down_lora, shape, tokens).zip(grads[1]);
    if let (Some((b, (grad_a, grad_b))), Some(xa)) = (down, &rec.down_xa) {
        let d_xa = r.scratch(slots * b.pairs.rank);
        b.expand_backward(r, (xa, &d_output), sorted, (0, h), (&d_xa, false), grad_b);
        let input = ((&rec.hidden, false), &d_xa);
        b.project_backward(r, input, sorted, i, (&d_hidden, grad_a));
    }
    let (d_gate, d_up) = (r.scratch(slots * i), r.scratch(slots * i));
    glu::record_backward(
        r,
        experts.act,
        [&rec.gate, &rec.up, &d_hidden],
        &d_gate,
        &d_up,
    );
    let d_input = r.scratch(slots * h);
    for (offset, dy, accumulate) in [(0, &d_gate, false), (i, &d_up, true)] {
        let projection = ExpertRows {
            stride: 2 * i,
            offset,
            rows: i,
        };
        linear::record_expert_backward_input(
            r,
            experts.gate_up,
            dy,
            &rows,
            projection,
            (&d_input, accumulate),
        );
    }
    let gate_up = branch(experts.gate_up_lora, shape, tokens).zip(grads[0]);
    if let (Some((b, (grad_a, grad_b))), Some(xa)) = (gate_up, &rec.gate_up_xa) {
        let d_xa = r.scratch(slots * b.pairs.rank);
        for (offset, dy, accumulate) in [(0, &d_gate, false), (i, &d_up, true)] {
            b.expand_backward(
                r,
                (xa, dy),
                sorted,
                (offset, i),
                (&d_xa, accumulate),
                grad_b,
            );
        }
        b.project_backward(r, ((x, true), &d_xa), sorted, h, (&d_input, grad_a));
    }
    let p = MoeParams {
        width: h as u32,
        accumulate: accumulate as u32,
        ..base
    };
    let b = [(1, &d_input), (2, sorted), (4, weights), (7, dx)];
    r.dispatch("moe_combine", &p, &b, groups_1d(tokens * h, 256));
}
