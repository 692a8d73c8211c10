//! Peak memory of a training step, computed from the model's shapes before anything runs: what tells a
//! user whether a model fits their machine. The figures follow what the CPU executor holds (`cpu.rs`):
//! every activation the backward reads, kept per layer or, with gradient checkpointing, only each
//! layer's input plus one layer's activations while it is recomputed.

use crate::config::{LinearKind, ModelConfig};
use crate::model::planned_weight_bytes;
use crate::ops::cross_entropy::VOCAB_CHUNK;
use crate::quant::QuantSpec;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    pub tokens: usize,
    /// None: dense 16-bit weights.
    pub quant: Option<QuantSpec>,
    pub lora_rank: usize,
    pub lora_targets: Vec<LinearKind>,
    pub lora_dropout: bool,
    pub checkpoint: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    pub weights: u64,
    /// LoRA matrices, their gradients and AdamW's two moments (f32 each).
    pub lora_and_optimizer: u64,
    pub lora_parameters: u64,
    /// Activations kept for the backward.
    pub activations: u64,
    /// The largest set of temporaries alive at once (a layer's backward, or the loss).
    pub workspace: u64,
    pub total: u64,
}

const F32: u64 = 4;

/// Bytes the forward keeps for one layer's backward.
fn layer_activations(c: &ModelConfig, p: &PlanInput) -> u64 {
    let (t, h, i) = (
        p.tokens as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
    );
    let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
    let (nh, nkv) = (c.num_heads as u64, c.num_kv_heads as u64);
    let mut floats = 2 * t * h + t // x, xn1, inv1
        + t * (qd + 2 * kvd) // q, k, v
        + t * qd + 2 * nh * t // attention output, log-sum-exp (and on the GPU a second number per row)
        + 2 * t * h + t // x_mid, xn2, inv2
        + 2 * t * i; // gate, up (silu(gate)·up is recomputed in the backward)
    if c.qk_norm {
        floats += t * (qd + kvd) + t * (nh + nkv);
    }
    let mut bytes = floats * F32;
    bytes += p.lora_targets.len() as u64 * t * p.lora_rank as u64 * F32; // x·Aᵀ of each LoRA linear
    bytes
}

/// Temporaries alive at the peak of one layer's backward.
fn layer_backward_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let (t, h, i) = (
        p.tokens as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
    );
    let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
    let max_in = c.hidden_size.max(c.intermediate_size).max(c.q_dim()) as u64;
    // dh, d gate, d up; the residual gradients in flight; dq, dk, dv and d attention; each query
    // head's share of them before the sums over a kv head's group (dq, dk, dv per head on the CPU, dk
    // and dv on the GPU); one unpacked weight tile of 256 rows; a LoRA branch's input gradient, and
    // with dropout its regenerated input.
    let lora_inputs = if p.lora_dropout { 2 } else { 1 };
    let floats = 3 * t * i
        + 5 * t * h
        + t * (2 * qd + 2 * kvd)
        + 3 * t * qd
        + 256 * max_in
        + lora_inputs * t * max_in;
    floats * F32
}

/// Temporaries of the loss: gathered hidden rows and their gradient, one chunk of logits and of the
/// output projection's rows, and the gradient scattered back to every position.
fn loss_workspace(c: &ModelConfig, p: &PlanInput) -> u64 {
    let (t, h) = (p.tokens as u64, c.hidden_size as u64);
    let chunk = VOCAB_CHUNK.min(c.vocab_size) as u64;
    (2 * t * h + t * chunk + chunk * h + t * h + 3 * t) * F32
}

pub fn plan(c: &ModelConfig, p: &PlanInput) -> Plan {
    let weights = planned_weight_bytes(c, p.quant);
    let lora_parameters: u64 = p
        .lora_targets
        .iter()
        .map(|k| {
            let (out, inp) = c.linear_shape(*k);
            (p.lora_rank * (inp + out)) as u64
        })
        .sum::<u64>()
        * c.num_layers as u64;
    let lora_and_optimizer = 4 * F32 * lora_parameters;
    let (t, h) = (p.tokens as u64, c.hidden_size as u64);
    let per_layer = layer_activations(c, p);
    // Final norm input and output, its inverse RMS.
    let tail = (2 * t * h + t) * F32;
    let activations = if p.checkpoint {
        c.num_layers as u64 * t * h * F32 + tail
    } else {
        c.num_layers as u64 * per_layer + tail
    };
    // With checkpointing, one layer's activations are rebuilt during the backward.
    let recompute = if p.checkpoint { per_layer } else { 0 };
    let workspace = (recompute + layer_backward_workspace(c, p)).max(loss_workspace(c, p));
    Plan {
        weights,
        lora_and_optimizer,
        lora_parameters,
        activations,
        workspace,
        total: weights + lora_and_optimizer + activations + workspace,
    }
}
