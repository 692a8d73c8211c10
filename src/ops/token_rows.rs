//! The gradients of trained token rows (PEFT's trainable tokens): rows of the embedding, from the
//! gradient at the embeddings, and rows of the output projection, from the cross-entropy's gradient
//! at their logits. The rows themselves are read where they sit, in the tables the forward reads.

use crate::exec::gpu::Recorder;
use crate::gpu::GpuBuffer;
use crate::gpu::weights::GpuDense;
use crate::model::DenseTensor;
use crate::ops::cross_entropy::{LossType, TokenLoss, soft_cap_slope};
use rayon::prelude::*;
use std::collections::HashMap;

/// Each trained id's slot among `token_ids`.
fn slots(token_ids: &[u32]) -> HashMap<u32, usize> {
    token_ids
        .iter()
        .enumerate()
        .map(|(j, &id)| (id, j))
        .collect()
}

/// d_rows[j] += scale · Σ dx[t] over the tokens t with ids[t] = token_ids[j] (rows of `dim`).
pub fn embedding_rows_grad(
    dx: &[f32],
    ids: &[u32],
    token_ids: &[u32],
    (dim, scale): (usize, f32),
    d_rows: &mut [f32],
) {
    let slot = slots(token_ids);
    for (&id, row) in ids.iter().zip(dx.chunks_exact(dim)) {
        if let Some(&j) = slot.get(&id) {
            let out = &mut d_rows[j * dim..(j + 1) * dim];
            out.iter_mut().zip(row).for_each(|(o, &g)| *o += scale * g);
        }
    }
}

/// d_rows[j] += Σ_p dlogit[p, v]·hidden[p] for v = token_ids[j]: the cross-entropy's gradient at
/// logit v (grad_scale · weight_p · (slope(z_v)·exp(z_v − lse_p) − [v = label_p]·slope(z_v)), z_v
/// the soft-capped logit, as `cross_entropy::forward_backward` takes it into the hidden states),
/// each logit recomputed from `head`'s row v and each position's log-sum-exp and loss read from its
/// `TokenLoss` row in `losses`.
pub fn output_rows_grad(
    hidden: &[f32],
    head: &DenseTensor,
    (labels, losses): (&[u32], &[f32]),
    token_ids: &[u32],
    (grad_scale, loss_type, softcap): (f32, LossType, Option<f32>),
    d_rows: &mut [f32],
) {
    let dim = head.cols;
    let tokens: Vec<TokenLoss> = losses
        .chunks_exact(TokenLoss::WIDTH)
        .map(TokenLoss::from_row)
        .collect();
    d_rows
        .par_chunks_mut(dim)
        .zip(token_ids.par_iter())
        .for_each(|(out, &v)| {
            let mut row = vec![0f32; dim];
            head.row_f32(v as usize, &mut row);
            for ((h, &label), token) in hidden.chunks_exact(dim).zip(labels).zip(&tokens) {
                let logit = h.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>();
                let (z, slope) = match softcap {
                    Some(cap) => {
                        let z = cap * (logit / cap).clamp(-10.0, 10.0).tanh();
                        (z, soft_cap_slope(z, cap))
                    }
                    None => (logit, 1.0),
                };
                let target = f32::from(u8::from(label == v));
                let weight = loss_type.weight(token.loss as f64) as f32;
                let g = grad_scale * weight * slope * ((z - token.lse).exp() - target);
                out.iter_mut().zip(h).for_each(|(o, &x)| *o += g * x);
            }
        });
}

/// The uniform of shaders/token_rows.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TokenRowsParams {
    /// Tokens (the embedding's rows) or labelled positions (the output projection's).
    pub count: u32,
    pub dim: u32,
    /// Trained rows.
    pub rows: u32,
    /// The embedding's factor, or grad_scale.
    pub scale: f32,
    /// The logits' soft cap; 0 for none.
    pub softcap: f32,
    /// 1 where each position's gradient is weighted by its label's probability (`LossType::Dft`).
    pub dft: u32,
    pub _pad: [u32; 2],
}

/// The GPU lowering of `embedding_rows_grad`.
pub(crate) fn record_embedding_rows_grad(
    r: &mut Recorder,
    (dx, ids): (&GpuBuffer, &GpuBuffer),
    token_ids: &[u32],
    (dim, scale): (usize, f32),
    d_rows: &GpuBuffer,
) {
    let wanted = r.gpu.upload_u32(token_ids);
    let p = TokenRowsParams {
        count: ids.len as u32,
        dim: dim as u32,
        rows: token_ids.len() as u32,
        scale,
        softcap: 0.0,
        dft: 0,
        _pad: [0; 2],
    };
    let groups = [dim.div_ceil(64) as u32, token_ids.len() as u32, 1];
    let b = [(1, dx), (2, ids), (3, &wanted), (4, d_rows)];
    r.dispatch("embedding_rows_grad", &p, &b, groups);
}

/// The GPU lowering of `output_rows_grad`: the rows gathered from the head (shaders/embed.wgsl), each
/// position's gradient at their logits, then its product with the hidden states.
pub(crate) fn record_output_rows_grad(
    r: &mut Recorder,
    head: &GpuDense,
    (hidden, labels, losses): (&GpuBuffer, &GpuBuffer, &GpuBuffer),
    token_ids: &[u32],
    softcap: Option<f32>,
    d_rows: &GpuBuffer,
) {
    let (k, positions, dim) = (token_ids.len(), labels.len, head.cols);
    let wanted = r.gpu.upload_u32(token_ids);
    let rows = r.scratch(k * dim);
    crate::ops::record_embed(r, head, &wanted, &rows, dim);
    let dlogits = r.scratch(positions * k);
    let p = TokenRowsParams {
        count: positions as u32,
        dim: dim as u32,
        rows: k as u32,
        scale: r.inputs.grad_scale,
        softcap: softcap.unwrap_or(0.0),
        dft: u32::from(r.inputs.loss_type == LossType::Dft),
        _pad: [0; 2],
    };
    let b = [
        (1, hidden),
        (2, labels),
        (3, &wanted),
        (5, &rows),
        (6, losses),
        (7, &dlogits),
    ];
    r.dispatch(
        "output_rows_dlogit",
        &p,
        &b,
        [positions.div_ceil(64) as u32, k as u32, 1],
    );
    let b = [(1, hidden), (4, d_rows), (7, &dlogits)];
    r.dispatch(
        "output_rows_grad",
        &p,
        &b,
        [dim.div_ceil(64) as u32, k as u32, 1],
    );
}
