//! A training or inference step as data: nodes of nibble's fused ops over buffers. A model is written
//! once as a function that builds a graph (`models::decoder`); each executor interprets graphs
//! (`exec::cpu`). A graph depends only on a step's shape (tokens, labelled positions, packing, dropout,
//! checkpointing): everything that changes from step to step (token ids, rope tables, example starts,
//! labels, the gradient scale, the dropout seed) is an input buffer the executor fills.
//!
//! Buffers are written before they are read, in node order. A node may write a buffer more than once
//! (`accumulate`: the output is added to, as gradients and a linear's LoRA branch are) and a few ops
//! rotate their output in place (`Op::reads_output`). Memory follows from the node order: a buffer lives
//! from its first write to its last use (`liveness`), which is what the executors allocate and what
//! `nibble plan` reports.

pub mod checkpoint;
pub mod pool;

use crate::lora::Factor;
use crate::ops::attention::AttentionShape;

pub type BufId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    U32,
}

impl Dtype {
    pub fn size(self) -> u64 {
        4
    }
}

/// Values that change from step to step, filled by the executor before a graph runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Token ids [tokens].
    TokenIds,
    /// RoPE cos and sin tables [tokens, head_dim / 2] at each token's position in its example.
    RopeCos,
    RopeSin,
    /// The tables of Gemma 3's sliding layers, from their own base.
    LocalRopeCos,
    LocalRopeSin,
    /// Per token, the first position it may attend to (the start of its example in a packed sequence).
    FirstKey,
    /// Per token, one past the last position it may attend to (a padded sequence: the real tokens'
    /// end, so that padding is never attended to).
    KeyEnd,
    /// Per token, the first position a sliding-window layer lets it attend to: `FirstKey` or the
    /// window's start, whichever is later.
    WindowFirstKey,
    /// Per token, the factor its query is scaled by at its position (Ministral 3).
    QueryScale,
    /// The positions that carry a label, ascending [positions].
    LabelPositions,
    /// The token each labelled position must predict [positions].
    Labels,
    /// [1]: gradients are those of grad_scale · Σ loss.
    GradScale,
    /// [1]: the half-width of NEFTune's noise on the embeddings (`Op::UniformNoise`).
    NoiseMagnitude,
    /// [1]: how each token's loss counts (`cross_entropy::LossType`): 0 plain, 1 weighted by its
    /// label's probability.
    LossType,
    /// [2]: the LoRA dropout masks' seed, low and high words.
    DropoutSeed,
    /// [8]: this optimizer step's AdamW parameters (`ops::adamw::AdamWParams`, its grad_scale
    /// multiplying the clipping coefficient).
    AdamW,
}

/// The values of a step's inputs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepInputs {
    pub ids: Vec<u32>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub local_cos: Vec<f32>,
    pub local_sin: Vec<f32>,
    pub first_key: Vec<u32>,
    pub key_end: Vec<u32>,
    pub window_first_key: Vec<u32>,
    pub query_scale: Vec<f32>,
    pub label_positions: Vec<u32>,
    pub labels: Vec<u32>,
    pub grad_scale: f32,
    pub loss_type: crate::ops::cross_entropy::LossType,
    /// `Input::NoiseMagnitude` (0: none).
    pub noise_magnitude: f32,
    pub dropout_seed: u64,
    /// `Input::AdamW`.
    pub adamw: [f32; 8],
    /// Values of `Role::Given` buffers, by name.
    pub given: std::collections::HashMap<String, Vec<f32>>,
}

/// An input's value: integers or floats.
pub enum InputValue<'a> {
    U32(std::borrow::Cow<'a, [u32]>),
    F32(std::borrow::Cow<'a, [f32]>),
}

impl StepInputs {
    pub fn value(&self, input: Input) -> InputValue<'_> {
        use std::borrow::Cow::{Borrowed, Owned};
        match input {
            Input::TokenIds => InputValue::U32(Borrowed(&self.ids)),
            Input::RopeCos => InputValue::F32(Borrowed(&self.cos)),
            Input::RopeSin => InputValue::F32(Borrowed(&self.sin)),
            Input::LocalRopeCos => InputValue::F32(Borrowed(&self.local_cos)),
            Input::LocalRopeSin => InputValue::F32(Borrowed(&self.local_sin)),
            Input::FirstKey => InputValue::U32(Borrowed(&self.first_key)),
            Input::KeyEnd => InputValue::U32(Borrowed(&self.key_end)),
            Input::WindowFirstKey => InputValue::U32(Borrowed(&self.window_first_key)),
            Input::QueryScale => InputValue::F32(Borrowed(&self.query_scale)),
            Input::LabelPositions => InputValue::U32(Borrowed(&self.label_positions)),
            Input::Labels => InputValue::U32(Borrowed(&self.labels)),
            Input::GradScale => InputValue::F32(Owned(vec![self.grad_scale])),
            Input::NoiseMagnitude => InputValue::F32(Owned(vec![self.noise_magnitude])),
            Input::LossType => InputValue::F32(Owned(vec![f32::from(u8::from(
                self.loss_type == crate::ops::cross_entropy::LossType::Dft,
            ))])),
            Input::AdamW => InputValue::F32(Borrowed(&self.adamw)),
            Input::DropoutSeed => InputValue::U32(Owned(vec![
                self.dropout_seed as u32,
                (self.dropout_seed >> 32) as u32,
            ])),
        }
    }
}

/// What a buffer holds, and so who owns its memory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A frozen tensor of the model, by its checkpoint name (`model.layers.3.self_attn.q_proj.weight`).
    Weight(String),
    /// A trained tensor of the linear at a module path (`model.layers.3.self_attn.q_proj`): A [r, in],
    /// B [out, r] or DoRA's magnitude [out].
    Lora {
        path: String,
        factor: Factor,
    },
    /// Its gradient, accumulated over a step's sequences.
    LoraGrad {
        path: String,
        factor: Factor,
    },
    /// AdamW's first (or, `second`, second) moment of a trained tensor.
    Moment {
        path: String,
        factor: Factor,
        second: bool,
    },
    Input(Input),
    /// The keys (or values) of every position decoded so far in one layer, after RoPE: kept between
    /// decoding steps, appended to by each.
    KvCache {
        layer: usize,
        values: bool,
    },
    /// DoRA's factors of the linear at a module path, kept by the decoding cache between steps (they
    /// change only with the adapter).
    DoraFactors(String),
    /// Values the caller gives by name (`StepInputs::given`).
    Given(String),
    /// A result the caller reads back, by name: a step's per-position losses, logits.
    Output(String),
    /// An intermediate value: allocated at its first write, released after its last use.
    Activation,
    /// An intermediate value kept in host memory (an offloaded checkpoint): only ever copied to and
    /// from (`Op::CopyRows`), never bound to a kernel. The GPU executor keeps it in host-visible
    /// memory that the device copies to and from inside the step's submission; the CPU executor,
    /// whose memory is all the host's, as any activation.
    Offloaded,
}

impl Role {
    /// Whether the executor allocates and releases the buffer as the graph runs (everything that the
    /// step produces and that does not outlive it).
    pub fn is_transient(&self) -> bool {
        matches!(self, Role::Activation | Role::Offloaded)
    }

    /// Whether the GPU executor keeps the buffer in host memory.
    pub fn in_host_memory(&self) -> bool {
        matches!(self, Role::Offloaded)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufDesc {
    /// Elements.
    pub len: usize,
    pub dtype: Dtype,
    pub role: Role,
    /// What it is, for error messages and dumps (`layers.3.xn1`).
    pub name: String,
}

/// nibble's fused ops. Shapes that the buffers' lengths do not fix are parameters; each op's inputs and
/// outputs are listed in order beside it.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// [ids, table] -> [x]: rows of an embedding table.
    Embed { dim: usize },
    /// [x] -> [words]: x as bf16, two values to a word (`ops::bf16`).
    PackBf16,
    /// [words] -> [x]: the bf16 values back as f32 (as many as x holds).
    UnpackBf16,
    /// [x] -> [y]: rows `from..from + rows` of x (rows of `dim`) into y from row `to`; y's other rows
    /// keep what they hold. What lets a step work over token chunks of a long sequence.
    CopyRows {
        dim: usize,
        from: usize,
        to: usize,
        rows: usize,
    },
    /// [x, weight] -> [y, inv_rms]: RMSNorm over rows of `dim`, scaled by offset + weight.
    /// Without a weight input (Gemma 4's `v_norm`), the weight is zero: y = offset · x · r.
    RmsNorm { dim: usize, eps: f64, offset: f32 },
    /// [x, weight, inv_rms, dy] -> [dx].
    RmsNormBackward { dim: usize, eps: f64, offset: f32 },
    /// [x, weight (, bias)] -> [y]: y = x·Wᵀ (+ bias) with W [out, inp] frozen (4-bit or dense).
    Linear { out: usize, inp: usize },
    /// [dy, weight] -> [dx]: dx = dy·W.
    LinearBackwardInput { out: usize, inp: usize },
    /// [a, b] -> [c]: c = alpha · A·B with A [m, k] (stored transposed, [k, m], when `a_t`) and B
    /// [k, n] (stored [n, k] when `b_t`).
    Matmul {
        m: usize,
        n: usize,
        k: usize,
        a_t: bool,
        b_t: bool,
        alpha: f32,
    },
    /// [a, b, seed] -> [c]: `Matmul` with LoRA dropout on one side (`ops::dropout::DropoutSide`):
    /// alpha · dropout(A)·B, alpha · A·dropout(B), or (`Product`, accumulating) c += dropout(alpha ·
    /// A·B), the gradient through dropout. The masked matrix is row-major and its masks are
    /// `Dropout`'s over its buffer, so the dropped matrix is never stored.
    DropoutMatmul {
        m: usize,
        n: usize,
        k: usize,
        a_t: bool,
        b_t: bool,
        alpha: f32,
        p: f32,
        stream: u32,
        side: crate::ops::dropout::DropoutSide,
    },
    /// [x, seed] -> [y]: LoRA dropout with the counter-based masks of `stream`.
    Dropout { p: f32, stream: u32 },
    /// [dy, seed] -> [dx]: the same mask applied to a gradient.
    DropoutBackward { p: f32, stream: u32 },
    /// [a, b] -> [c] = a + b, or [a] -> [c] += a with `accumulate`.
    Add,
    /// [cos, sin] -> [x]: rotates the first `rotated` channels of each head of x [tokens, heads ·
    /// head_dim] in place (half-split pairs, or `adjacent` ones); `inverse` rotates back (the
    /// backward).
    Rope {
        heads: usize,
        head_dim: usize,
        rotated: usize,
        inverse: bool,
        adjacent: bool,
    },
    /// [gate, up] -> [h] = act(gate) · up.
    Glu { act: crate::config::GateActivation },
    /// [gate, up, dh] -> [dgate, dup].
    GluBackward { act: crate::config::GateActivation },
    /// [] -> [x]: x *= factor, in place.
    Scale { factor: f32 },
    /// [seed, magnitude] -> [x]: x += noise uniform in [−magnitude, magnitude), each element's drawn
    /// from (seed, its index), in place (NEFTune's on the embeddings in training).
    UniformNoise,
    /// [factors] -> [x]: row r of x [*, dim] *= factors[r], in place.
    ScaleRows { dim: usize },
    /// [q, k, v (, sinks) (, first_key (, key_end))] -> [out, lse]: grouped-query attention; with
    /// `first_key`, each token attends only inside its own example; with `key_end`, to none at or
    /// past its entry (padding); the sinks ([heads]) where `shape.sinks`.
    Attention { shape: AttentionShape },
    /// [q, k, v (, sinks) (, first_key)] -> [out, cache_k, cache_v]: decoding. The T queries sit at positions
    /// past..past+T; their keys and values are appended to the caches, which they attend over (from
    /// `first_key[t]` on, a sliding window's start, when given).
    CachedAttention { shape: AttentionShape, past: usize },
    /// [q, k, v, out, lse, d_out (, first_key)] -> [dq, dk, dv].
    AttentionBackward { shape: AttentionShape },
    /// [x, index] -> [rows]: rows `index[i]` of x [*, dim].
    GatherRows { dim: usize },
    /// [rows, index] -> [x]: row i into row `index[i]` of x; other rows zero.
    ScatterRows { dim: usize },
    /// [dx, ids] -> [d_rows]: d_rows[j] = scale · Σ dx[t] over the tokens t whose id is
    /// `token_ids[j]`, rows of `dim`: the gradient of trained embedding rows from the gradient at the
    /// embeddings (`scale` the embedding's own factor, Gemma's √hidden).
    EmbeddingRowsGrad {
        dim: usize,
        scale: f32,
        token_ids: Vec<u32>,
    },
    /// [hidden, head, labels, losses, grad_scale, loss_type] -> [d_rows]: d_rows[j] = Σ_p
    /// dlogit[p, v]·hidden[p] with v = `token_ids[j]`, the gradient `CrossEntropyWithGrad` takes
    /// into hidden, taken into the output projection's rows v instead: each logit recomputed from
    /// the head's row and each position's log-sum-exp from `losses`.
    OutputRowsGrad {
        dim: usize,
        softcap: Option<f32>,
        token_ids: Vec<u32>,
    },
    /// [hidden, head, labels] -> [losses]: per position a `cross_entropy::TokenLoss` row (−log
    /// softmax(h·headᵀ)[label], the log-sum-exp of the logits, the entropy of the softmax, 1 where the
    /// label is the first argmax), the vocabulary walked in chunks; rows of `dim`. With `softcap`, each
    /// logit is softcap · tanh(logit / softcap) first.
    CrossEntropy { dim: usize, softcap: Option<f32> },
    /// [hidden, head, labels, grad_scale] -> [losses, d_hidden]: the `TokenLoss` rows and grad_scale
    /// times the loss's gradient, in one walk over the vocabulary.
    CrossEntropyWithGrad { dim: usize, softcap: Option<f32> },
    /// [hidden, head] -> [logits]: every logit [positions, vocab], soft-capped as the loss's.
    Logits { dim: usize, softcap: Option<f32> },
    /// [x, mods] -> [y, stats]: y = (1 + scale) ⊙ LayerNorm(x) + shift over rows of `dim` (no affine
    /// parameters), shift and scale the vectors `shift` and `scale` of mods; stats: (mean, 1/std) per
    /// row.
    LayerNormModulate {
        dim: usize,
        eps: f64,
        shift: usize,
        scale: usize,
    },
    /// [x, mods, stats, dy] -> [dx] (the modulation is a constant of the step).
    LayerNormModulateBackward { dim: usize, eps: f64, scale: usize },
    /// [mods, y] -> [out] = gate ⊙ y, the gate vector `chunk` of mods broadcast over rows of `dim`.
    Gate { dim: usize, chunk: usize },
    /// [weight, a, b, magnitude] -> [factors]: DoRA's per-output factors of the linear W [out, inp]
    /// with its pair A [rank, inp], B [out, rank] at `scale`: with n = ‖W + scale·B·A‖ of each row,
    /// [m/n, m/n − 1, 1/n], each `out` long.
    DoraFactors {
        out: usize,
        inp: usize,
        rank: usize,
        scale: f32,
    },
    /// [dy, h, factors] -> [d_magnitude]: d_magnitude[o] = factors[2·dim + o] · Σ_rows dy[·, o] ·
    /// h[·, o] over rows of `dim` (DoRA's magnitude gradient, the norm held constant).
    DoraMagnitudeGrad { dim: usize },
    /// [x] -> [y] = x · sigmoid(x).
    Silu,
    /// [g, s] -> [y] = σ(g[r]) · s[r, ·] for each row r of s [rows, dim] (Qwen2-MoE's shared expert
    /// scaled by its gate).
    SigmoidGatedRows { dim: usize },
    /// [g, s, dy] -> [ds, dg], both written.
    SigmoidGatedRowsBackward { dim: usize },
    /// [x] -> [y]: columns offset..offset + len of each row of x [rows, width].
    Columns {
        width: usize,
        offset: usize,
        len: usize,
    },
    /// [y] -> [x]: y's rows into columns offset..offset + len of x [rows, width], its other columns
    /// untouched (builders place with `accumulate`, into zeros at first, so that a buffer assembled
    /// from parts reads as written).
    PlaceColumns {
        width: usize,
        offset: usize,
        len: usize,
    },
    /// [pred, target (, grad_scale)] -> [loss (, d_pred)]: the mean of (pred − target)² over every
    /// element, and grad_scale times its gradient.
    Mse,
    /// [x, weight (, bias)] -> [y]: a 2-D convolution of x [H·W, channels] (pixels by channels), the
    /// weight [out, channels·k·k] in PyTorch's order, y [H'·W', out].
    Conv2d { shape: crate::ops::conv::ConvShape },
    /// [x, weight, bias] -> [y]: GroupNorm over x [pixels, channels], then SiLU when `silu`.
    GroupNorm {
        channels: usize,
        groups: usize,
        eps: f64,
        silu: bool,
    },
    /// [gradients...] -> [clip]: the global norm of all the gradients and torch's clipping coefficient
    /// for it, min(1, max_norm / (norm + 1e-6)) (1 when max_norm ≤ 0), as [norm, coefficient].
    GradNorm { max_norm: f64 },
    /// [grad, clip, adamw] -> [param, m, v]: one AdamW step of a parameter in place (torch's AdamW),
    /// the gradient multiplied by the clipping coefficient.
    AdamW,
    /// [logits] -> [routes (u32), weights]: each token's `top_k` experts from its router logits
    /// [tokens, experts] and their weights (`ops::moe::route`), [tokens, top_k] each.
    MoeRoute {
        shape: crate::ops::moe::MoeShape,
        normalize: bool,
    },
    /// [logits, routes, d_weights] -> [d_logits], the choices held fixed.
    MoeRouteBackward {
        shape: crate::ops::moe::MoeShape,
        normalize: bool,
    },
    /// [x, routes, weights, gate_up, down (, gate_up's bias, down's bias) (, gate_up's A, B)(, down's
    /// A, B)] -> [y]: the routed experts' gated MLPs, mixed by the weights (`ops::moe::forward`; the
    /// experts' weights stacked, frozen; their biases where `shape.biased`), with LoRA pairs on the
    /// stacks `lora` adapts.
    MoeExperts {
        shape: crate::ops::moe::MoeShape,
        act: crate::config::GateActivation,
        lora: crate::ops::moe::MoeLora,
    },
    /// [x, routes, weights, gate_up, down, dy (, the biases and the pairs as `MoeExperts` takes
    /// them)] -> [dx,
    /// d_weights (, the pairs' gradients: A, B of each)], each expert's activations recomputed; the
    /// pairs' gradients are added to whatever `accumulate` says, which applies to dx alone (d_weights
    /// is written).
    MoeExpertsBackward {
        shape: crate::ops::moe::MoeShape,
        act: crate::config::GateActivation,
        lora: crate::ops::moe::MoeLora,
    },
}

impl Op {
    /// Whether the op reads output `index`'s previous contents other than by the node's
    /// `accumulate` (rotating in place; an op that always adds into some outputs, as the experts'
    /// backward into its pairs' gradients).
    pub fn reads_output(&self, index: usize) -> bool {
        match self {
            Op::Rope { .. }
            | Op::AdamW
            | Op::Scale { .. }
            | Op::ScaleRows { .. }
            | Op::UniformNoise => true,
            Op::CachedAttention { .. } => index > 0,
            Op::MoeExpertsBackward { .. } => index >= 2,
            _ => false,
        }
    }

    /// The op's name in dumps and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::RmsNormBackward { .. } => "rmsnorm_backward",
            Op::Linear { .. } => "linear",
            Op::LinearBackwardInput { .. } => "linear_backward_input",
            Op::Matmul { .. } => "matmul",
            Op::DropoutMatmul { .. } => "dropout_matmul",
            Op::Dropout { .. } => "dropout",
            Op::DropoutBackward { .. } => "dropout_backward",
            Op::Add => "add",
            Op::CopyRows { .. } => "copy_rows",
            Op::PackBf16 => "pack_bf16",
            Op::UnpackBf16 => "unpack_bf16",
            Op::Rope { .. } => "rope",
            Op::Glu { .. } => "glu",
            Op::GluBackward { .. } => "glu_backward",
            Op::Scale { .. } => "scale",
            Op::UniformNoise => "uniform_noise",
            Op::ScaleRows { .. } => "scale_rows",
            Op::Attention { .. } => "attention",
            Op::CachedAttention { .. } => "cached_attention",
            Op::AttentionBackward { .. } => "attention_backward",
            Op::GatherRows { .. } => "gather_rows",
            Op::ScatterRows { .. } => "scatter_rows",
            Op::EmbeddingRowsGrad { .. } => "embedding_rows_grad",
            Op::OutputRowsGrad { .. } => "output_rows_grad",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyWithGrad { .. } => "cross_entropy_with_grad",
            Op::Logits { .. } => "logits",
            Op::LayerNormModulate { .. } => "layernorm_modulate",
            Op::LayerNormModulateBackward { .. } => "layernorm_modulate_backward",
            Op::Gate { .. } => "gate",
            Op::Silu => "silu",
            Op::SigmoidGatedRows { .. } => "sigmoid_gated_rows",
            Op::SigmoidGatedRowsBackward { .. } => "sigmoid_gated_rows_backward",
            Op::DoraFactors { .. } => "dora_factors",
            Op::DoraMagnitudeGrad { .. } => "dora_magnitude_grad",
            Op::Columns { .. } => "columns",
            Op::PlaceColumns { .. } => "place_columns",
            Op::Mse => "mse",
            Op::Conv2d { .. } => "conv2d",
            Op::GroupNorm { .. } => "group_norm",
            Op::GradNorm { .. } => "grad_norm",
            Op::AdamW => "adamw",
            Op::MoeRoute { .. } => "moe_route",
            Op::MoeRouteBackward { .. } => "moe_route_backward",
            Op::MoeExperts { .. } => "moe_experts",
            Op::MoeExpertsBackward { .. } => "moe_experts_backward",
        }
    }
}

/// Which part of the step a node belongs to; gradient checkpointing recomputes the forward nodes of a
/// block before the backward nodes that read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stage {
    /// The repeated unit (a decoder layer) the node belongs to, if any.
    pub block: Option<usize>,
    pub backward: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<BufId>,
    pub outputs: Vec<BufId>,
    /// Outputs are added to instead of overwritten.
    pub accumulate: bool,
    pub stage: Stage,
}

impl Node {
    /// The node's output slots, taken out of an executor's table while the node runs (its inputs stay
    /// borrowed in place), with their lengths; `put_back` returns them.
    pub fn take_outputs<S: Default>(&self, graph: &Graph, slots: &mut [S]) -> (Vec<S>, Vec<usize>) {
        let taken = self
            .outputs
            .iter()
            .map(|&o| std::mem::take(&mut slots[o]))
            .collect();
        (
            taken,
            self.outputs.iter().map(|&o| graph.bufs[o].len).collect(),
        )
    }

    pub fn put_back<S>(&self, slots: &mut [S], taken: Vec<S>) {
        for (&o, slot) in self.outputs.iter().zip(taken) {
            slots[o] = slot;
        }
    }

    /// Every buffer the node reads, its outputs included where it reads them.
    pub fn reads(&self) -> impl Iterator<Item = BufId> + '_ {
        let read = move |i: usize| self.accumulate || self.op.reads_output(i);
        let outputs = self.outputs.iter().enumerate();
        self.inputs
            .iter()
            .copied()
            .chain(outputs.filter(move |(i, _)| read(*i)).map(|(_, &b)| b))
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    pub bufs: Vec<BufDesc>,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// For each buffer, the index of the last node that reads or writes it (None: never used).
    pub fn last_use(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.bufs.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for b in node.reads().chain(node.outputs.iter().copied()) {
                last[b] = Some(i);
            }
        }
        last
    }

    /// For each buffer, the index of the first node that writes it.
    pub fn first_write(&self) -> Vec<Option<usize>> {
        let mut first = vec![None; self.bufs.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for &b in &node.outputs {
                first[b].get_or_insert(i);
            }
        }
        first
    }

    /// Bytes of transient buffers alive at once on the device, at the worst node: each lives from its
    /// first write to its last use, both included.
    pub fn peak_transient_bytes(&self) -> u64 {
        self.memory().buffers
    }

    /// The step's memory at its worst node: transient buffers alive there (each lives from its first
    /// write to its last use, both included) and the node's kernel temporaries; offloaded buffers are
    /// counted apart, at their own worst node.
    pub fn memory(&self) -> Memory {
        let (first, last) = (self.first_write(), self.last_use());
        // Per node, the change in live bytes on the device and in host memory.
        let mut delta = vec![[0i64; 2]; self.nodes.len() + 1];
        for (b, desc) in self.bufs.iter().enumerate() {
            if let (true, Some(f), Some(l)) = (desc.role.is_transient(), first[b], last[b]) {
                let bytes = (desc.len as u64 * desc.dtype.size()) as i64;
                let place = usize::from(desc.role.in_host_memory());
                delta[f][place] += bytes;
                delta[l + 1][place] -= bytes;
            }
        }
        let mut live = [0i64; 2];
        let mut worst = Memory::default();
        for (node, d) in self.nodes.iter().zip(delta) {
            live = [live[0] + d[0], live[1] + d[1]];
            worst.host = worst.host.max(live[1] as u64);
            let here = Memory {
                buffers: live[0] as u64,
                temporaries: self.temporaries(node),
                host: worst.host,
            };
            if here.total() > worst.total() {
                worst = here;
            }
        }
        worst
    }

    /// Bytes a node's kernels allocate for themselves while it runs, the larger of the two executors'.
    /// CPU: a linear decodes up to 256 rows of its frozen weight into an f32 tile; attention's backward
    /// keeps each query head's dq, dk and dv before summing them per kv head (the GPU keeps the dk and
    /// dv shares); the loss holds one vocabulary chunk's logits and (in f32) its rows of the output
    /// projection.
    pub fn temporaries(&self, node: &Node) -> u64 {
        let len = |i: usize| self.bufs[node.inputs[i]].len as u64;
        let floats = match &node.op {
            Op::Linear { out, inp } | Op::LinearBackwardInput { out, inp } => {
                (*out).min(256) as u64 * *inp as u64
            }
            Op::Conv2d { shape } => {
                let (k, c) = (shape.kernel, shape.channels);
                (shape.tile_pixels() * c * k * k) as u64
            }
            Op::AttentionBackward { shape } => {
                3 * (shape.tokens * shape.heads * shape.head_dim) as u64
            }
            // The GPU keeps every slot's activations at once; the CPU one expert's.
            Op::MoeExperts { shape, lora, .. } | Op::MoeExpertsBackward { shape, lora, .. } => {
                let tokens = self.bufs[node.inputs[0]].len / shape.hidden;
                let backward = matches!(node.op, Op::MoeExpertsBackward { .. });
                let cpu =
                    shape.temporaries(tokens, backward) + lora.temporaries(shape, tokens, backward);
                let gpu = crate::ops::moe::gpu_temporaries(shape, lora, tokens, backward);
                cpu.max(gpu.iter().sum()) as u64
            }
            Op::CrossEntropy { dim, .. }
            | Op::CrossEntropyWithGrad { dim, .. }
            | Op::Logits { dim, .. } => {
                let dim = *dim as u64;
                let (positions, vocab) = (len(0) / dim, len(1) / dim);
                let chunk = (crate::ops::cross_entropy::VOCAB_CHUNK as u64).min(vocab);
                chunk * (positions + dim)
            }
            _ => 0,
        };
        floats * 4
    }

    /// The buffer of a role (an input, the losses), if the graph has one.
    pub fn find(&self, role: &Role) -> Option<BufId> {
        self.bufs.iter().position(|b| &b.role == role)
    }

    /// Removes the nodes whose outputs are all transient buffers that no kept node after them reads:
    /// a model written once emits its layers' backward whole, and the first layer's input gradient
    /// flows into a frozen embedding that nothing differentiates (as autograd never computes a
    /// gradient nothing requires). Buffers that outlive the step (outputs, gradients, state) are
    /// always needed. A buffer that a kept node reads keeps every node that writes it, so partial
    /// and accumulating writes stay whole.
    fn drop_dead_nodes(&mut self) {
        let mut needed: Vec<bool> = self.bufs.iter().map(|b| !b.role.is_transient()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate().rev() {
            if node.outputs.is_empty() || node.outputs.iter().any(|&o| needed[o]) {
                keep[i] = true;
                for b in node.reads() {
                    needed[b] = true;
                }
            }
        }
        let mut keep = keep.into_iter();
        self.nodes.retain(|_| keep.next().unwrap_or(true));
    }

    /// Checks the graph's own consistency: every buffer read is written earlier (or comes from outside
    /// the step), ids are in range, accumulating writes target buffers that exist. A violation is a bug
    /// in a model's builder, reported with the node.
    pub fn validate(&self) -> Result<(), String> {
        let mut written = vec![false; self.bufs.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for b in node.reads().chain(node.outputs.iter().copied()) {
                if b >= self.bufs.len() {
                    return Err(format!("node {i} ({}) names buffer {b}", node.op.name()));
                }
            }
            // An accumulating write into a buffer not written yet adds to zeros.
            let rotated = node.outputs.iter().enumerate();
            let rotated = rotated
                .filter(|(i, _)| node.op.reads_output(*i))
                .map(|(_, b)| b);
            for &b in node.inputs.iter().chain(rotated) {
                let from_outside = !self.bufs[b].role.is_transient()
                    && !matches!(self.bufs[b].role, Role::Output(_));
                if !written[b] && !from_outside {
                    return Err(format!(
                        "node {i} ({}) reads {} before anything writes it",
                        node.op.name(),
                        self.bufs[b].name
                    ));
                }
            }
            for &b in &node.outputs {
                written[b] = true;
            }
        }
        Ok(())
    }
}

/// Memory at a step's worst node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Transient buffers alive there.
    pub buffers: u64,
    /// The node's kernel temporaries.
    pub temporaries: u64,
    /// Offloaded buffers (`Role::Offloaded`) alive at once at their worst node, in host memory; not
    /// part of `total`.
    pub host: u64,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.buffers + self.temporaries
    }
}

/// Builds a graph node by node; models call its op methods in the order the step runs.
#[derive(Default)]
pub struct Builder {
    graph: Graph,
    stage: Stage,
    /// Buffers of outside roles (weights, inputs, LoRA matrices), each created once.
    outside: std::collections::HashMap<Role, BufId>,
}

impl Builder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The graph, without the nodes whose results nothing needs (`Graph::drop_dead_nodes`).
    pub fn finish(mut self) -> Graph {
        self.graph.drop_dead_nodes();
        self.graph
    }

    /// Nodes added from now on belong to `stage`.
    pub fn set_stage(&mut self, block: Option<usize>, backward: bool) {
        self.stage = Stage { block, backward };
    }

    /// A transient buffer of integers (a router's choices).
    pub fn indices(&mut self, len: usize, name: impl Into<String>) -> BufId {
        self.buffer(len, Dtype::U32, Role::Activation, name.into())
    }

    fn buffer(&mut self, len: usize, dtype: Dtype, role: Role, name: String) -> BufId {
        self.graph.bufs.push(BufDesc {
            len,
            dtype,
            role,
            name,
        });
        self.graph.bufs.len() - 1
    }

    /// The buffer of an outside role (a weight, an input, a LoRA matrix), created once.
    fn outside(&mut self, role: Role, len: usize, dtype: Dtype, name: &str) -> BufId {
        if let Some(&b) = self.outside.get(&role) {
            return b;
        }
        let b = self.buffer(len, dtype, role.clone(), name.to_string());
        self.outside.insert(role, b);
        b
    }

    /// A fresh f32 activation of `len` elements.
    pub fn activation(&mut self, len: usize, name: impl Into<String>) -> BufId {
        self.buffer(len, Dtype::F32, Role::Activation, name.into())
    }

    /// A result read back by `name`.
    pub fn output(&mut self, name: &str, len: usize) -> BufId {
        self.outside(Role::Output(name.to_string()), len, Dtype::F32, name)
    }

    /// A value the caller gives by `name`.
    pub fn given(&mut self, name: &str, len: usize) -> BufId {
        self.outside(Role::Given(name.to_string()), len, Dtype::F32, name)
    }

    pub fn weight(&mut self, name: &str, len: usize) -> BufId {
        self.outside(Role::Weight(name.to_string()), len, Dtype::F32, name)
    }

    pub fn input(&mut self, input: Input, len: usize) -> BufId {
        let dtype = match input {
            Input::RopeCos
            | Input::RopeSin
            | Input::LocalRopeCos
            | Input::LocalRopeSin
            | Input::QueryScale
            | Input::GradScale
            | Input::LossType
            | Input::NoiseMagnitude
            | Input::AdamW => Dtype::F32,
            _ => Dtype::U32,
        };
        self.outside(Role::Input(input), len, dtype, &format!("{input:?}"))
    }

    /// State kept between steps (a KV cache).
    pub fn state(&mut self, role: Role, len: usize) -> BufId {
        let name = format!("{role:?}");
        self.outside(role, len, Dtype::F32, &name)
    }

    pub fn lora(&mut self, role: Role, len: usize) -> BufId {
        let name = format!("{role:?}");
        self.outside(role, len, Dtype::F32, &name)
    }

    pub fn node(&mut self, op: Op, inputs: &[BufId], outputs: &[BufId], accumulate: bool) {
        self.graph.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            accumulate,
            stage: self.stage,
        });
    }

    pub fn len(&self, b: BufId) -> usize {
        self.graph.bufs[b].len
    }

    pub fn role(&self, b: BufId) -> &Role {
        &self.graph.bufs[b].role
    }

    /// Columns offset..offset + len of each row of x [_, width], as a buffer of their own.
    pub fn columns(
        &mut self,
        x: BufId,
        width: usize,
        (offset, len): (usize, usize),
        name: String,
    ) -> BufId {
        let y = self.activation(self.len(x) / width * len, name);
        self.node(Op::Columns { width, offset, len }, &[x], &[y], false);
        y
    }

    /// A [rows, width] buffer assembled from parts placed at their column offsets (each part reaching
    /// the next one's offset, the last one the end).
    pub fn joined(&mut self, parts: &[(BufId, usize)], width: usize, name: String) -> BufId {
        let part_width = |i: usize| parts.get(i + 1).map_or(width, |p| p.1) - parts[i].1;
        let rows = self.len(parts[0].0) / part_width(0);
        let y = self.activation(rows * width, name);
        for (i, &(part, offset)) in parts.iter().enumerate() {
            let len = part_width(i);
            self.node(Op::PlaceColumns { width, offset, len }, &[part], &[y], true);
        }
        y
    }

    pub fn name(&self, b: BufId) -> &str {
        &self.graph.bufs[b].name
    }
}
