//! The gradients of trained token rows (PEFT's trainable tokens): rows of the embedding, from the
//! gradient at the embeddings, and rows of the output projection, from the cross-entropy's gradient
//! at their logits. The rows themselves are read where they sit, in the tables the forward reads.

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
