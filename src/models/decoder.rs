//! The decoder-only transformer (Qwen2/2.5, Qwen3, Llama, Mistral, Ministral, SmolLM3, Phi-3, Gemma 3)
//! written once, as a graph builder: the forward, the loss (cross-entropy at the labelled positions,
//! walked over vocabulary chunks), the backward into the LoRA matrices (mirrored in straight-line code,
//! as llm.c does), every logit, and decoding with a KV cache. Families differ by configuration (q/k
//! norms, biases, tied embeddings, fused projections, sliding-window layers, layers without RoPE,
//! partial and local RoPE, sandwich norms, gated activations, logit soft-capping); every executor runs
//! the graphs this builds. The optimizer step is `models::optimizer`'s graph.

use crate::config::{
    ATTENTION_SINKS, EXPERTS_DOWN, EXPERTS_DOWN_BIAS, EXPERTS_GATE_UP, EXPERTS_GATE_UP_BIAS,
    GEMMA4_EXPERT_NORMS, LinearKind, ModelConfig, PER_LAYER_EMBEDDING, PER_LAYER_MODEL_PROJECTION,
    PER_LAYER_PROJECTION_NORM, ROUTER_MODULE,
};
use crate::cpu::Sequence;
use crate::graph::{BufId, Builder, Graph, Input, Op, Role, StepInputs, checkpoint};
use crate::lora::{Factor, LoraAdapter};
use crate::models::lora_linear::{self, BranchDropout, LinearTape};
use crate::ops::attention::AttentionShape;
use crate::ops::{dropout, rope};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// The LoRA branches a graph computes: which linears (by module path), each with its rank and scale,
/// and the branches' dropout.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// Probability of dropping an element of a LoRA branch's input while training.
    pub dropout: f32,
    /// Where DoRA's factors come from (decoding keeps them in its cache: they change only with the
    /// adapter).
    pub dora_factors: FactorSource,
    /// The adapted linears by module path (`model.layers.3.self_attn.q_proj`).
    pub targets: BTreeMap<String, Adapted>,
    /// The tables whose token rows the adapter trains (`LoraPair::token_ids`): their rows sit in
    /// the tables the forward reads; the backward takes their gradients.
    pub tokens: Vec<TrainedRows>,
}

/// Trained rows of the table at a module path (the embedding's, `model.embed_tokens`, which a tied
/// model's output projection shares; the output projection's, `lm_head`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainedRows {
    pub path: String,
    pub token_ids: Vec<u32>,
}

/// Where a graph takes DoRA's factors (`Op::DoraFactors`) from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FactorSource {
    /// Computed where the linear runs.
    #[default]
    Compute,
    /// Computed into the decoding cache (`Role::DoraFactors`): the first step of a decode.
    ComputeAndKeep,
    /// Read from the decoding cache: the steps after it.
    Kept,
}

/// An adapted linear's rank, the scale of its update, and whether DoRA rescales its output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adapted {
    pub rank: usize,
    pub scale: f32,
    pub dora: bool,
}

impl LoraSpec {
    pub fn of(adapter: &LoraAdapter) -> Self {
        LoraSpec {
            dropout: adapter.config.dropout,
            dora_factors: FactorSource::Compute,
            targets: adapter
                .pairs()
                .map(|(path, pair)| {
                    let adapted = Adapted {
                        rank: pair.rank,
                        scale: adapter.config.scale_of(path),
                        dora: !pair.magnitude.is_empty(),
                    };
                    (path.to_string(), adapted)
                })
                .collect(),
            tokens: adapter
                .token_rows()
                .map(|(path, pair)| TrainedRows {
                    path: path.to_string(),
                    token_ids: pair.token_ids.iter().map(|&id| id as u32).collect(),
                })
                .collect(),
        }
    }

    /// The spec with DoRA's factors from `source` where a target has DoRA (else the graph is the same
    /// whatever the source, and one graph is built and cached for it, not one per source).
    pub fn with_factors(self, source: FactorSource) -> Self {
        let dora = self.targets.values().any(|a| a.dora);
        LoraSpec {
            dora_factors: if dora { source } else { FactorSource::Compute },
            ..self
        }
    }

    /// Every one of `paths` at the same rank (plans, which size memory, take scale 1).
    pub fn uniform(paths: impl IntoIterator<Item = String>, rank: usize, dropout: f32) -> Self {
        let adapted = Adapted {
            rank,
            scale: 1.0,
            dora: false,
        };
        LoraSpec {
            dropout,
            dora_factors: FactorSource::Compute,
            targets: paths.into_iter().map(|path| (path, adapted)).collect(),
            tokens: Vec::new(),
        }
    }
}

/// What a step computes, beyond the model: everything a graph depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub tokens: usize,
    /// Positions that carry a label.
    pub positions: usize,
    /// Several examples in one sequence: attention stays inside each.
    pub packed: bool,
    /// The backward into the LoRA gradients, after the loss.
    pub backward: bool,
    /// LoRA dropout (training).
    pub dropout: bool,
    /// NEFTune: noise on the embeddings (training; `Input::NoiseMagnitude`, from the dropout seed).
    pub noise: bool,
    /// Gradient checkpointing: each layer recomputed before its backward.
    pub checkpoint: bool,
    /// How checkpointing keeps each layer's input until then.
    pub checkpoints: checkpoint::Keep,
    /// Every logit of every position instead of the loss (evaluation of small models, parity tests).
    pub logits: bool,
    /// Decoding after this many cached positions: the tokens' keys and values join the KV cache,
    /// and the step gives the logits of the last token.
    pub decode_after: Option<usize>,
    /// A longer sequence runs its MLPs over chunks of this many tokens (`MLP_CHUNK`).
    pub mlp_chunk: usize,
}

/// Tokens per MLP chunk in a long sequence (training, evaluation and a long prompt's prefill alike).
/// Past it, a layer's MLP runs chunk by chunk and its backward recomputes each chunk's gate and up
/// projections, so that its workspace (five buffers of tokens x intermediate floats, 1.1 GiB at 4096
/// tokens for an 8B model) stops growing with the sequence. With gradient checkpointing, which
/// recomputes them anyway, that costs nothing more; without, two of the MLP's three forward products
/// again. Shorter sequences keep the projections.
pub const MLP_CHUNK: usize = 2048;

impl StepShape {
    /// The shape of a training (or, without `backward`, evaluation) step over `seq`.
    pub fn of(seq: &Sequence, backward: bool, dropout: bool, checkpoint: bool) -> Self {
        StepShape {
            tokens: seq.ids.len(),
            positions: seq.target_count(),
            packed: seq.is_packed(),
            backward,
            dropout,
            noise: false,
            checkpoint,
            logits: false,
            decode_after: None,
            mlp_chunk: MLP_CHUNK,
            checkpoints: checkpoint::Keep::F32,
        }
    }

    /// Decoding `tokens` new tokens after `past` cached ones.
    pub fn decode(tokens: usize, past: usize) -> Self {
        StepShape {
            decode_after: Some(past),
            ..Self::forward_only(tokens)
        }
    }

    /// A forward over `tokens` tokens with nothing after the layers (hidden states).
    fn forward_only(tokens: usize) -> Self {
        StepShape {
            tokens,
            positions: 0,
            packed: false,
            backward: false,
            dropout: false,
            noise: false,
            checkpoint: false,
            logits: false,
            decode_after: None,
            mlp_chunk: MLP_CHUNK,
            checkpoints: checkpoint::Keep::F32,
        }
    }
}

/// The inputs of decoding `ids` after `past` cached positions.
pub fn decode_inputs(c: &ModelConfig, ids: &[u32], past: usize) -> StepInputs {
    let positions: Vec<u32> = (past as u32..(past + ids.len()) as u32).collect();
    let (cos, sin) = rope::model_tables(c, &positions);
    let (local_cos, local_sin) = rope::local_tables(c, &positions);
    StepInputs {
        ids: ids.to_vec(),
        cos,
        sin,
        local_cos,
        local_sin,
        window_first_key: window_first_keys(c, &vec![0; ids.len()], past),
        query_scale: query_scales(c, &positions),
        label_positions: vec![ids.len().saturating_sub(1) as u32],
        ..StepInputs::default()
    }
}

/// `Input::QueryScale` at each token's position: empty where the model scales no queries.
fn query_scales(c: &ModelConfig, positions: &[u32]) -> Vec<f32> {
    match &c.query_position_scale {
        Some(scale) => positions.iter().map(|&p| scale.factor(p)).collect(),
        None => Vec::new(),
    }
}

/// `Input::WindowFirstKey` of tokens at positions past..past + first_key.len(), each already limited
/// to `first_key[t]` (its example's start): empty where no layer slides.
pub fn window_first_keys(c: &ModelConfig, first_key: &[u32], past: usize) -> Vec<u32> {
    let Some(window) = c.layers.iter().find_map(|l| l.window) else {
        return Vec::new();
    };
    first_key
        .iter()
        .enumerate()
        .map(|(t, &first)| first.max((past + t + 1).saturating_sub(window) as u32))
        .collect()
}

/// The step's per-sequence inputs: ids, RoPE tables at each token's position inside its example, example
/// starts, labels, the gradient scale and the dropout seed.
pub fn inputs(c: &ModelConfig, seq: &Sequence, grad_scale: f32, dropout_seed: u64) -> StepInputs {
    let positions = seq.positions();
    let (cos, sin) = rope::model_tables(c, &positions);
    let (local_cos, local_sin) = rope::local_tables(c, &positions);
    let labelled: Vec<u32> = (0..seq.ids.len() as u32)
        .filter(|&t| seq.targets[t as usize].is_some())
        .collect();
    let first_key = seq.segments();
    StepInputs {
        ids: seq.ids.clone(),
        cos,
        sin,
        local_cos,
        local_sin,
        window_first_key: window_first_keys(c, &first_key, 0),
        query_scale: query_scales(c, &positions),
        first_key,
        labels: labelled
            .iter()
            .map(|&t| seq.targets[t as usize].expect("filtered"))
            .collect(),
        label_positions: labelled,
        grad_scale,
        dropout_seed,
        ..StepInputs::default()
    }
}

/// What a layer's forward produced that its backward reads.
struct LayerTape {
    x: BufId,
    input_norm: BufId,
    xn1: BufId,
    inv1: BufId,
    /// (pre-norm q, its norm weight, inverse RMS), and the same for k (Qwen3; k only in a layer with
    /// keys of its own).
    q_norm: Option<(BufId, BufId, BufId)>,
    k_norm: Option<(BufId, BufId, BufId)>,
    /// (pre-norm v, inverse RMS) (Gemma 4).
    v_norm: Option<(BufId, BufId)>,
    q: BufId,
    k: BufId,
    v: BufId,
    attn: BufId,
    lse: BufId,
    x_mid: BufId,
    post_norm: BufId,
    xn2: BufId,
    inv2: BufId,
    /// The gate and up projections, kept unless the MLP ran in chunks.
    gate_up: Option<(BufId, BufId)>,
    /// A mixture-of-experts layer's routing, where its experts take the MLP's place.
    moe: Option<MoeTape>,
    /// Gemma 4's experts beside the dense MLP.
    beside: Option<BesideTape>,
    /// Sandwich norms (Gemma): (the attention's or MLP's output, the norm's weight, inverse RMS).
    attn_out_norm: Option<(BufId, BufId, BufId)>,
    mlp_out_norm: Option<(BufId, BufId, BufId)>,
    per_layer: Option<PerLayerTape>,
    linears: Vec<(LinearKind, LinearTape)>,
}

/// What a mixture-of-experts MLP keeps for the backward: the router (a linear, adapted or not),
/// its logits and choices, and the experts' buffers.
struct MoeTape {
    router: LinearTape,
    logits: BufId,
    routes: BufId,
    weights: BufId,
    gate_up: BufId,
    down: BufId,
    lora: crate::ops::moe::MoeLora,
    /// The adapted stacks' A and B, in `MoeLora::stacks`' order.
    pairs: Vec<BufId>,
    shared: Option<SharedExpertTape>,
    /// Gemma 4: each chosen expert's `per_expert_scale`, which its weight was multiplied by.
    route_scales: Option<BufId>,
}

/// What Gemma 4's experts beside the dense MLP keep for the backward: each of their norms as
/// (input, weight, inverse RMS), and the inputs of the router's linear and of the experts.
struct BesideTape {
    /// The attention block's output normalised (no weight of its own) and scaled by `router.scale`,
    /// then by hidden^-1/2 (in place): the router linear's input.
    router_input: BufId,
    router_norm: (BufId, BufId, BufId),
    experts_input: BufId,
    experts_input_norm: (BufId, BufId, BufId),
    dense_output_norm: (BufId, BufId, BufId),
    experts_output_norm: (BufId, BufId, BufId),
    experts: MoeTape,
}

/// What Qwen2-MoE's shared expert keeps for the backward: the gate's logit per token and, unless it
/// ran in chunks (`Decoder::mlp_chunks`; the backward then recomputes them chunk by chunk), its gate
/// and up projections and its output before the gate.
struct SharedExpertTape {
    /// The gate and up projections and the output.
    kept: Option<[BufId; 3]>,
    gate_logits: BufId,
}

/// The shared expert on some rows: its gate and up projections, act(gate)·up, the output before the
/// gate, and the tapes of its gate, up and down linears.
struct SharedExpertRows {
    gate: BufId,
    up: BufId,
    hidden: BufId,
    output: BufId,
    tapes: Vec<(LinearKind, LinearTape)>,
}

impl<'a> MlpTapes<'a> {
    /// The shared expert's linears among `tapes`.
    fn shared_expert(tapes: &'a [(LinearKind, LinearTape)], width: usize) -> Self {
        let [gate_kind, up_kind, down_kind, _] = LinearKind::SHARED_EXPERT;
        let tape = |kind: LinearKind| {
            let found = tapes.iter().find(|(k, _)| *k == kind);
            &found.expect("the shared expert's linears ran").1
        };
        MlpTapes {
            gate_up: vec![tape(gate_kind), tape(up_kind)],
            down: tape(down_kind),
            width,
        }
    }
}

/// What Gemma 4's per-layer input added to a layer's output keeps for the backward.
struct PerLayerTape {
    /// The layer's output before it (the gate's input).
    x: BufId,
    gate: BufId,
    /// The layer's slice of the per-layer inputs.
    input: BufId,
    gated: BufId,
    projected: BufId,
    norm: BufId,
    inv: BufId,
}

impl LayerTape {
    fn linear(&self, kind: LinearKind) -> &LinearTape {
        &self
            .linears
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("ran")
            .1
    }
}

/// The tapes of an MLP's linears: gate and up (one fused linear, or two), then down, and its width.
struct MlpTapes<'a> {
    gate_up: Vec<&'a LinearTape>,
    down: &'a LinearTape,
    width: usize,
}

struct Decoder<'a> {
    b: Builder,
    c: &'a ModelConfig,
    lora: Option<LoraSpec>,
    shape: StepShape,
    /// Padding at the end of the sequence that no token attends to (`Input::KeyEnd`).
    padded: bool,
    /// Gemma 4's per-layer inputs of the step's tokens, each layer's [tokens, width] (empty without).
    per_layer_inputs: Vec<BufId>,
    /// Per layer whose keys and values later layers attend over: their copies (after norms and RoPE).
    shared_kv: HashMap<usize, (BufId, BufId)>,
    /// Per such layer, in the backward: the gradients of those copies, summed over the layers that
    /// read them (which run their backward first).
    shared_kv_grads: HashMap<usize, (BufId, BufId)>,
}

impl<'a> Decoder<'a> {
    fn new(c: &'a ModelConfig, lora: Option<&'a LoraSpec>, shape: StepShape, padded: bool) -> Self {
        // Decoding keeps DoRA's factors in its cache from its first step on.
        let lora = lora.map(|spec| {
            spec.clone().with_factors(match shape.decode_after {
                None => spec.dora_factors,
                Some(0) => FactorSource::ComputeAndKeep,
                Some(_) => FactorSource::Kept,
            })
        });
        Decoder {
            b: Builder::new(),
            c,
            lora,
            shape,
            padded,
            per_layer_inputs: Vec::new(),
            shared_kv: HashMap::new(),
            shared_kv_grads: HashMap::new(),
        }
    }
}

impl Decoder<'_> {
    fn t(&self) -> usize {
        self.shape.tokens
    }

    /// The trained rows of the table the output projection reads (`output`: a tied model's
    /// embedding's, or its own), or of the embedding.
    fn trained_rows(&self, output: bool) -> Vec<TrainedRows> {
        let embedding = self.c.embedding_module();
        let table = match (output, self.c.tie_word_embeddings) {
            (true, false) => crate::config::OUTPUT_MODULE.to_string(),
            _ => embedding,
        };
        let tokens = self.lora.as_ref().map_or(&[][..], |l| &l.tokens[..]);
        tokens.iter().filter(|r| r.path == table).cloned().collect()
    }

    /// The gradient buffer of trained rows.
    fn rows_grad(&mut self, rows: &TrainedRows) -> BufId {
        let role = Role::LoraGrad {
            path: rows.path.clone(),
            factor: crate::lora::Factor::Rows,
        };
        let len = rows.token_ids.len() * self.c.hidden_size;
        self.b.lora(role, len)
    }

    /// The step's tokens' embeddings (times Gemma's √hidden).
    fn embed(&mut self) -> BufId {
        let (t, h) = (self.t(), self.c.hidden_size);
        let ids = self.b.input(Input::TokenIds, t);
        let table = self
            .b
            .weight(&self.c.tensor("embed_tokens.weight"), self.c.vocab_size * h);
        let x = self.b.activation(t * h, "embeddings");
        self.b
            .node(Op::Embed { dim: h }, &[ids, table], &[x], false);
        let factor = self.c.embed_scale;
        if factor != 1.0 {
            self.b.node(Op::Scale { factor }, &[], &[x], false);
        }
        // NEFTune's noise on the embedding layer's output, as transformers' hook adds it: after
        // Gemma's scale (its embedding module's own), before anything reads the embeddings.
        if self.shape.noise {
            let seed = self.b.input(Input::DropoutSeed, 2);
            let magnitude = self.b.input(Input::NoiseMagnitude, 1);
            self.b
                .node(Op::UniformNoise, &[seed, magnitude], &[x], false);
        }
        self.per_layer_inputs(x);
        x
    }

    /// Gemma 4 E2B/E4B: the per-layer inputs of the step's tokens, from their embeddings x: each
    /// token's per-layer embedding (times √width) plus the normalised projection of x (times
    /// hidden^-½), times 2^-½. Everything they depend on is frozen: no gradient flows into them.
    fn per_layer_inputs(&mut self, x: BufId) {
        let Some(p) = self.c.per_layer_inputs else {
            return;
        };
        let (t, h) = (self.t(), self.c.hidden_size);
        let width = self.c.num_layers * p.width;
        let ids = self.b.input(Input::TokenIds, t);
        let table_name = self.c.tensor(PER_LAYER_EMBEDDING);
        let table = self.b.weight(&table_name, p.vocab * width);
        let tokens = self.b.activation(t * width, "per-layer embeddings");
        self.b
            .node(Op::Embed { dim: width }, &[ids, table], &[tokens], false);
        let factor = p.token_scale;
        self.b.node(Op::Scale { factor }, &[], &[tokens], false);
        let projection_name = self.c.tensor(PER_LAYER_MODEL_PROJECTION);
        let projection = self.b.weight(&projection_name, width * h);
        let context = self.b.activation(t * width, "per-layer projection");
        // x·Pᵀ with P a dense frozen table: the product the output projection makes.
        let op = Op::Logits {
            dim: h,
            softcap: None,
        };
        self.b.node(op, &[x, projection], &[context], false);
        let factor = (h as f64).powf(-0.5) as f32;
        self.b.node(Op::Scale { factor }, &[], &[context], false);
        let norm = self.norm_weight(&self.c.tensor(PER_LAYER_PROJECTION_NORM), p.width);
        let (normed, _) = self.rmsnorm(context, norm, p.width, "per-layer projection normed");
        let inputs = self.add(normed, tokens, "per-layer inputs".into());
        let factor = std::f32::consts::FRAC_1_SQRT_2;
        self.b.node(Op::Scale { factor }, &[], &[inputs], false);
        // Each layer's slice taken here, before the layers: a checkpointed layer then keeps its own
        // [tokens, width] rather than every layer's.
        self.per_layer_inputs = (0..self.c.num_layers)
            .map(|l| {
                let name = format!("layers.{l}.per-layer input");
                self.b.columns(inputs, width, (l * p.width, p.width), name)
            })
            .collect();
    }

    /// Gemma 4 E2B/E4B: layer `l`'s output x plus its per-layer input, gated by x:
    /// x + norm(projection(act(gate(x)) ⊙ input_l)); the two linears' tapes join `linears`.
    fn add_per_layer_input(
        &mut self,
        l: usize,
        x: BufId,
        linears: &mut Vec<(LinearKind, LinearTape)>,
    ) -> (BufId, Option<PerLayerTape>) {
        let (Some(&input), Some(p)) = (self.per_layer_inputs.get(l), self.c.per_layer_inputs)
        else {
            return (x, None);
        };
        let (t, h) = (self.t(), self.c.hidden_size);
        let (gate, gate_tape) = self.linear(l, LinearKind::PerLayerGate, x);
        let gated = self
            .b
            .activation(t * p.width, format!("layers.{l}.per-layer gated"));
        let act = self.c.gate_activation;
        self.b
            .node(Op::Glu { act }, &[gate, input], &[gated], false);
        let (projected, projection_tape) = self.linear(l, LinearKind::PerLayerProjection, gated);
        let norm_name = self.c.layer_module(l, "post_per_layer_input_norm.weight");
        let norm = self.norm_weight(&norm_name, h);
        let (normed, inv) =
            self.rmsnorm(projected, norm, h, &format!("layers.{l}.per-layer output"));
        linears.push((LinearKind::PerLayerGate, gate_tape));
        linears.push((LinearKind::PerLayerProjection, projection_tape));
        let out = self.add(x, normed, format!("layers.{l}.out with per-layer input"));
        let tape = PerLayerTape {
            x,
            gate,
            input,
            gated,
            projected,
            norm,
            inv,
        };
        (out, Some(tape))
    }

    /// The gradient of a layer's output before its per-layer input, from dy (the gradient after it),
    /// in place: dy + the gate's input gradient.
    fn per_layer_input_backward(&mut self, l: usize, s: &LayerTape, dy: BufId) {
        let Some(p) = &s.per_layer else {
            return;
        };
        let h = self.c.hidden_size;
        let d_projected = self.rmsnorm_backward(p.projected, p.norm, p.inv, dy, h);
        let d_gated = self
            .b
            .activation(self.b.len(p.gated), format!("d layers.{l}.per-layer gated"));
        let projection = s.linear(LinearKind::PerLayerProjection);
        self.linear_backward(projection, p.gated, d_projected, d_gated);
        let (d_gate, d_input) = (
            self.b
                .activation(self.b.len(p.gate), format!("d layers.{l}.per-layer gate")),
            self.b
                .activation(self.b.len(p.input), format!("d layers.{l}.per-layer input")),
        );
        let act = self.c.gate_activation;
        self.b.node(
            Op::GluBackward { act },
            &[p.gate, p.input, d_gated],
            &[d_gate, d_input],
            false,
        );
        self.linear_backward(s.linear(LinearKind::PerLayerGate), p.x, d_gate, dy);
    }

    /// A copy of x, as a buffer of its own.
    fn copy(&mut self, x: BufId, name: String) -> BufId {
        let len = self.b.len(x);
        let y = self.b.activation(len, name);
        let op = Op::CopyRows {
            dim: len,
            from: 0,
            to: 0,
            rows: 1,
        };
        self.b.node(op, &[x], &[y], false);
        y
    }

    fn rmsnorm(&mut self, x: BufId, weight: BufId, dim: usize, name: &str) -> (BufId, BufId) {
        self.rmsnorm_node(x, Some(weight), dim, name)
    }

    /// RMSNorm with no weight of its own (Gemma 4's `v_norm`): offset 1 over a zero weight.
    fn rmsnorm_weightless(&mut self, x: BufId, dim: usize, name: &str) -> (BufId, BufId) {
        self.rmsnorm_node(x, None, dim, name)
    }

    fn rmsnorm_node(
        &mut self,
        x: BufId,
        weight: Option<BufId>,
        dim: usize,
        name: &str,
    ) -> (BufId, BufId) {
        let len = self.b.len(x);
        let (y, inv) = (
            self.b.activation(len, name),
            self.b.activation(len / dim, format!("{name}.inv_rms")),
        );
        let (eps, offset) = (self.c.rms_norm_eps, self.norm_offset(weight));
        let inputs: Vec<BufId> = std::iter::once(x).chain(weight).collect();
        self.b
            .node(Op::RmsNorm { dim, eps, offset }, &inputs, &[y, inv], false);
        (y, inv)
    }

    fn rmsnorm_backward(
        &mut self,
        x: BufId,
        weight: BufId,
        inv: BufId,
        dy: BufId,
        dim: usize,
    ) -> BufId {
        self.rmsnorm_backward_node(x, Some(weight), inv, dy, dim)
    }

    fn rmsnorm_backward_node(
        &mut self,
        x: BufId,
        weight: Option<BufId>,
        inv: BufId,
        dy: BufId,
        dim: usize,
    ) -> BufId {
        let dx = self
            .b
            .activation(self.b.len(x), format!("d {}", self.b.name(x)));
        let (eps, offset) = (self.c.rms_norm_eps, self.norm_offset(weight));
        let inputs: Vec<BufId> = std::iter::once(x).chain(weight).chain([inv, dy]).collect();
        self.b.node(
            Op::RmsNormBackward { dim, eps, offset },
            &inputs,
            &[dx],
            false,
        );
        dx
    }

    /// The model's norm offset, or 1 for a norm without a weight (whose weight the executors take
    /// as zero).
    fn norm_offset(&self, weight: Option<BufId>) -> f32 {
        match weight {
            Some(_) => self.c.norm_offset,
            None => 1.0,
        }
    }

    /// Gemma 4: x (a layer's output, or its gradient) times the layer's `layer_scalar`, in place.
    fn scale_by_layer_scalar(&mut self, l: usize, x: BufId) {
        if self.c.layer_scalars {
            let scalar = self.b.weight(&self.c.layer_module(l, "layer_scalar"), 1);
            let dim = self.b.len(x);
            self.b.node(Op::ScaleRows { dim }, &[scalar], &[x], false);
        }
    }

    fn norm_weight(&mut self, name: &str, len: usize) -> BufId {
        self.b.weight(name, len)
    }

    fn dropout_op(&self, layer: usize, kind: LinearKind) -> Option<BranchDropout> {
        let p = self.lora.as_ref()?.dropout;
        (self.shape.dropout && p > 0.0).then(|| BranchDropout {
            p,
            stream: dropout::stream(layer, kind as usize),
        })
    }

    /// y = x·Wᵀ (+ bias) + scale · (dropout(x)·Aᵀ)·Bᵀ.
    fn linear(&mut self, layer: usize, kind: LinearKind, x: BufId) -> (BufId, LinearTape) {
        self.linear_rows(layer, kind, x, (self.t(), 0))
    }

    /// `linear` over `rows` rows: chunk `chunk` of a long sequence (its own dropout masks).
    fn linear_rows(
        &mut self,
        layer: usize,
        kind: LinearKind,
        x: BufId,
        (rows, chunk): (usize, usize),
    ) -> (BufId, LinearTape) {
        let (out, inp) = self.c.linear_shape(kind, layer);
        let path = self.c.linear_path(kind, layer);
        let bias = self
            .c
            .linear_has_bias(kind)
            .then(|| self.b.weight(&format!("{path}.bias"), out));
        let dropout = self.chunk_dropout(layer, kind, chunk);
        let name = match chunk {
            0 => format!("layers.{layer}.{}", kind.module_name()),
            _ => format!("layers.{layer}.{} chunk {chunk}", kind.module_name()),
        };
        let shape = (rows, out, inp);
        lora_linear::forward(
            &mut self.b,
            self.lora.as_ref(),
            x,
            shape,
            (path, name),
            bias,
            dropout,
        )
    }

    fn linear_backward(&mut self, tape: &LinearTape, x: BufId, dy: BufId, dx: BufId) {
        lora_linear::backward(&mut self.b, tape, x, dy, dx);
    }

    /// What layer `l`'s q is multiplied by so that the attention kernels' 1/√head_dim makes the
    /// model's scale.
    fn query_scale(&self, l: usize) -> f32 {
        let c = self.c;
        (c.attention_scale * (c.layers[l].head_dim as f64).sqrt()) as f32
    }

    fn attention_shape(&self, l: usize) -> AttentionShape {
        AttentionShape {
            tokens: self.t(),
            heads: self.c.num_heads,
            kv_heads: self.c.layers[l].kv_heads,
            head_dim: self.c.layers[l].head_dim,
            causal: true,
            sinks: self.c.attention_sinks,
        }
    }

    /// Rotates x (q or k of layer `l`) in place, or back with `inverse`.
    fn rope(&mut self, l: usize, x: BufId, heads: usize, inverse: bool) {
        let layer = self.c.layers[l];
        // Local layers rotate whole heads (`rope::local_tables`).
        let (cos, sin, rotated) = match layer.local_rope {
            true => (Input::LocalRopeCos, Input::LocalRopeSin, layer.head_dim),
            false => (Input::RopeCos, Input::RopeSin, self.c.rotary_dim),
        };
        let half = self.t() * rotated / 2;
        let (cos, sin) = (self.b.input(cos, half), self.b.input(sin, half));
        let head_dim = layer.head_dim;
        self.b.node(
            Op::Rope {
                heads,
                head_dim,
                rotated,
                inverse,
                adjacent: false,
            },
            &[cos, sin],
            &[x],
            false,
        );
    }

    /// The attention's inputs after q, k, v in layer `l`: each token's first visible key (a sliding
    /// layer's window table, which already holds the example starts; or the example starts, packed or
    /// padded), and where its visible keys end (padded).
    fn key_ranges(&mut self, l: usize) -> Vec<BufId> {
        let t = self.t();
        let mut inputs = Vec::new();
        if self.c.layers[l].window.is_some() {
            inputs.push(self.b.input(Input::WindowFirstKey, t));
        } else if self.shape.packed || self.padded {
            inputs.push(self.b.input(Input::FirstKey, t));
        }
        if self.padded {
            inputs.push(self.b.input(Input::KeyEnd, t));
        }
        inputs
    }

    /// Layer `l`'s attention sinks (gpt-oss), the attention's input after v.
    fn sinks(&mut self, l: usize) -> Option<BufId> {
        let c = self.c;
        c.attention_sinks.then(|| {
            self.b
                .weight(&c.layer_module(l, ATTENTION_SINKS), c.num_heads)
        })
    }

    /// The first key each token of layer `l` may see, where that is not position 0.
    fn first_key(&mut self, l: usize) -> Option<BufId> {
        let t = self.t();
        if self.c.layers[l].window.is_some() {
            Some(self.b.input(Input::WindowFirstKey, t))
        } else {
            self.shape.packed.then(|| self.b.input(Input::FirstKey, t))
        }
    }

    /// Ministral 3's queries (and so their gradient) scaled by a factor per position, after RoPE.
    fn scale_queries_by_position(&mut self, q: BufId, l: usize) {
        if self.c.query_position_scale.is_some() {
            let factors = self.b.input(Input::QueryScale, self.t());
            let dim = self.c.q_dim(l);
            self.b.node(Op::ScaleRows { dim }, &[factors], &[q], false);
        }
    }

    fn add(&mut self, a: BufId, b: BufId, name: String) -> BufId {
        let c = self.b.activation(self.b.len(a), name);
        self.b.node(Op::Add, &[a, b], &[c], false);
        c
    }

    fn layer_forward(&mut self, l: usize, x: BufId) -> (BufId, LayerTape) {
        let c = self.c;
        let (t, h, hd) = (self.t(), c.hidden_size, c.layers[l].head_dim);
        let (q_dim, kv_dim, kv_heads) = (c.q_dim(l), c.kv_dim(l), c.layers[l].kv_heads);
        self.b.set_stage(Some(l), false);
        let input_norm = self.norm_weight(&c.layer_module(l, "input_layernorm.weight"), h);
        let (xn1, inv1) = self.rmsnorm(x, input_norm, h, &format!("layers.{l}.xn1"));
        let mut linears = Vec::with_capacity(7);
        let mut run = |d: &mut Self, kind, input| {
            let (y, tape) = d.linear(l, kind, input);
            linears.push((kind, tape));
            y
        };
        // q, and the layer's own keys and values unless it shares an earlier layer's.
        let (mut q, own_kv) = if c.fused_projections {
            let qkv = run(self, LinearKind::Qkv, xn1);
            let width = q_dim + 2 * kv_dim;
            let mut part = |offset, len, name| {
                let name = format!("layers.{l}.{name}");
                self.b.columns(qkv, width, (offset, len), name)
            };
            let q = part(0, q_dim, "q");
            let k = part(q_dim, kv_dim, "k");
            (q, Some((k, part(q_dim + kv_dim, kv_dim, "v"))))
        } else {
            let q = run(self, LinearKind::Q, xn1);
            let own_kv = match c.layers[l].kv_from {
                Some(_) => None,
                None => {
                    let k = run(self, LinearKind::K, xn1);
                    // Gemma 4's full layers take their values from k_proj, before k's norm and RoPE.
                    let v = match c.layers[l].values_from_keys {
                        true => k,
                        false => run(self, LinearKind::V, xn1),
                    };
                    Some((k, v))
                }
            };
            (q, own_kv)
        };
        let (mut q_norm, mut k_norm, mut v_norm) = (None, None, None);
        if c.qk_norm {
            let qn = self.norm_weight(&c.layer_module(l, "self_attn.q_norm.weight"), hd);
            let (qq, iq) = self.rmsnorm(q, qn, hd, &format!("layers.{l}.q"));
            q_norm = Some((q, qn, iq));
            q = qq;
        }
        if c.layers[l].rope {
            self.rope(l, q, c.num_heads, false);
        }
        let (k, v) = match (own_kv, c.layers[l].kv_from) {
            (Some((mut k, mut v)), _) => {
                // Gemma 4: each head of v normalised, with no weight of its own.
                if c.value_norm {
                    let (vv, inv) = self.rmsnorm_weightless(v, hd, &format!("layers.{l}.v"));
                    v_norm = Some((v, inv));
                    v = vv;
                }
                if c.qk_norm {
                    let kn = self.norm_weight(&c.layer_module(l, "self_attn.k_norm.weight"), hd);
                    let (kk, ik) = self.rmsnorm(k, kn, hd, &format!("layers.{l}.k"));
                    k_norm = Some((k, kn, ik));
                    k = kk;
                }
                if c.layers[l].rope {
                    self.rope(l, k, kv_heads, false);
                }
                if c.layers.iter().any(|later| later.kv_from == Some(l)) {
                    // Copies for the later layers: checkpointing keeps a buffer that another block
                    // reads as it is, and would replay this layer's in-place RoPE over k itself.
                    let shared = (
                        self.copy(k, format!("layers.{l}.shared k")),
                        self.copy(v, format!("layers.{l}.shared v")),
                    );
                    self.shared_kv.insert(l, shared);
                }
                (k, v)
            }
            (None, Some(from)) => self.shared_kv[&from],
            (None, None) => unreachable!("a layer without keys of its own reads another's"),
        };
        // The attention kernels scale scores by 1/√head_dim; Gemma's query_pre_attn_scalar asks for
        // another scale, which q carries.
        let q_scale = self.query_scale(l);
        if q_scale != 1.0 {
            self.b.node(Op::Scale { factor: q_scale }, &[], &[q], false);
        }
        self.scale_queries_by_position(q, l);
        let attn = self.b.activation(t * q_dim, format!("layers.{l}.attn"));
        let shape = self.attention_shape(l);
        if let Some(past) = self.shape.decode_after {
            let cached = (past + t) * kv_dim;
            // A layer sharing another's keys and values writes the same ones into its cache again.
            let layer = c.layers[l].kv_from.unwrap_or(l);
            let keys = self.b.state(
                Role::KvCache {
                    layer,
                    values: false,
                },
                cached,
            );
            let values = self.b.state(
                Role::KvCache {
                    layer,
                    values: true,
                },
                cached,
            );
            let mut inputs = vec![q, k, v];
            inputs.extend(self.sinks(l));
            if c.layers[l].window.is_some() {
                inputs.push(self.b.input(Input::WindowFirstKey, t));
            }
            self.b.node(
                Op::CachedAttention { shape, past },
                &inputs,
                &[attn, keys, values],
                false,
            );
        }
        // Each row's log-sum-exp, and a second number per row that the GPU's backward keeps there (the
        // forward's running denominator, then delta).
        let lse = self
            .b
            .activation(2 * c.num_heads * t, format!("layers.{l}.lse"));
        if self.shape.decode_after.is_none() {
            let mut inputs = vec![q, k, v];
            inputs.extend(self.sinks(l));
            inputs.extend(self.key_ranges(l));
            self.b
                .node(Op::Attention { shape }, &inputs, &[attn, lse], false);
        }
        let o = run(self, LinearKind::O, attn);
        // Gemma's sandwich: the attention's output normalised before the residual, the MLP's input
        // by a norm of its own.
        let (attn_out_norm, o) = self.output_norm(l, o, "post_attention_layernorm");
        let x_mid = self.add(x, o, format!("layers.{l}.x_mid"));
        let post_norm = match c.sandwich_norms {
            true => "pre_feedforward_layernorm.weight",
            false => "post_attention_layernorm.weight",
        };
        let post_norm = self.norm_weight(&c.layer_module(l, post_norm), h);
        let (xn2, inv2) = self.rmsnorm(x_mid, post_norm, h, &format!("layers.{l}.xn2"));
        let mut moe = None;
        let (down, gate_up) = if c.experts_replace_mlp(l) {
            let logits = self.router_parameter(l, xn2);
            let (y, mut tape) = self.experts(l, xn2, logits);
            if c.shared_expert_width() > 0 {
                tape.shared = Some(self.shared_expert(l, xn2, y, &mut linears));
            }
            moe = Some(tape);
            (y, None)
        } else if self.mlp_chunks().len() > 1 {
            (self.chunked_mlp(l, xn2), None)
        } else {
            let (gate, up, tapes) = self.gate_up(l, xn2, (t, 0));
            linears.extend(tapes);
            let hidden = self.gated(gate, up, l);
            let (down, tape) = self.linear(l, LinearKind::Down, hidden);
            linears.push((LinearKind::Down, tape));
            (down, Some((gate, up)))
        };
        let (down, beside) = match c.experts_beside_mlp(l) {
            true => {
                let (sum, tape) = self.experts_beside_mlp(l, x_mid, down);
                (sum, Some(tape))
            }
            false => (down, None),
        };
        let (mlp_out_norm, down) = self.output_norm(l, down, "post_feedforward_layernorm");
        let x_out = self.add(x_mid, down, format!("layers.{l}.out"));
        let (x_out, per_layer) = self.add_per_layer_input(l, x_out, &mut linears);
        self.scale_by_layer_scalar(l, x_out);
        let tape = LayerTape {
            x,
            input_norm,
            xn1,
            inv1,
            q_norm,
            k_norm,
            v_norm,
            q,
            k,
            v,
            attn,
            lse,
            x_mid,
            post_norm,
            xn2,
            inv2,
            gate_up,
            moe,
            beside,
            attn_out_norm,
            mlp_out_norm,
            per_layer,
            linears,
        };
        (x_out, tape)
    }

    /// Layer `l`'s router, a parameter (`mlp.gate.weight`, with gpt-oss's bias), on x: its logits
    /// and its tape.
    fn router_parameter(&mut self, l: usize, x: BufId) -> (BufId, LinearTape) {
        let c = self.c;
        let m = c.moe.as_ref().expect("a sparse layer has experts");
        let (t, h) = (self.t(), c.hidden_size);
        // PEFT adapts the router's weight (a parameter, `gate.weight`) without dropout.
        let router_path = c.layer_module(l, ROUTER_MODULE);
        let bias = m
            .family
            .biased()
            .then(|| self.b.weight(&format!("{router_path}.bias"), m.experts));
        lora_linear::forward(
            &mut self.b,
            self.lora.as_ref(),
            x,
            (t, m.experts, h),
            (router_path, format!("layers.{l}.router logits")),
            bias,
            None,
        )
    }

    /// Layer `l`'s experts on x, routed by the router's `logits` (and tape): each token's choices
    /// and weights, and the chosen experts' outputs mixed.
    fn experts(
        &mut self,
        l: usize,
        x: BufId,
        (logits, router): (BufId, LinearTape),
    ) -> (BufId, MoeTape) {
        let c = self.c;
        let m = c.moe.as_ref().expect("a sparse layer has experts");
        let (t, h) = (self.t(), c.hidden_size);
        let shape = m.shape(h);
        let routes = self.b.indices(t * m.top_k, format!("layers.{l}.routes"));
        let weights = self
            .b
            .activation(t * m.top_k, format!("layers.{l}.routing weights"));
        let op = Op::MoeRoute {
            shape,
            normalize: m.normalize,
        };
        self.b.node(op, &[logits], &[routes, weights], false);
        // Gemma 4 scales each chosen weight by its expert's own factor.
        let route_scales = m.family.beside_dense_mlp().then(|| {
            let table = c.layer_module(l, "router.per_expert_scale");
            let table = self.b.weight(&table, m.experts);
            let scales = self
                .b
                .activation(t * m.top_k, format!("layers.{l}.route scales"));
            let op = Op::GatherRows { dim: 1 };
            self.b.node(op, &[table, routes], &[scales], false);
            let op = Op::ScaleRows { dim: 1 };
            self.b.node(op, &[scales], &[weights], false);
            scales
        });
        let gate_up = c.experts_stack(l, EXPERTS_GATE_UP);
        let gate_up = self.b.weight(&gate_up, m.experts * 2 * m.inter * h);
        let down = self
            .b
            .weight(&c.experts_stack(l, EXPERTS_DOWN), m.experts * h * m.inter);
        let y = self.b.activation(t * h, format!("layers.{l}.experts"));
        let act = c.gate_activation;
        let (lora, pairs) = self.expert_pairs(l);
        let mut inputs = vec![x, routes, weights, gate_up, down];
        let biases = self.expert_biases(l);
        inputs.extend(&biases);
        inputs.extend(&pairs);
        self.b
            .node(Op::MoeExperts { shape, act, lora }, &inputs, &[y], false);
        let tape = MoeTape {
            router,
            logits,
            routes,
            weights,
            gate_up,
            down,
            lora,
            pairs,
            shared: None,
            route_scales,
        };
        (y, tape)
    }

    /// Gemma 4's experts beside layer `l`'s dense MLP, on the attention block's output x: routed
    /// by a linear on x normalised and scaled, run on x normalised by a norm of their own, their
    /// output normalised and added to the dense MLP's `dense` (normalised too).
    fn experts_beside_mlp(&mut self, l: usize, x: BufId, dense: BufId) -> (BufId, BesideTape) {
        let c = self.c;
        let h = c.hidden_size;
        let [dense_norm, experts_norm, input_norm] = GEMMA4_EXPERT_NORMS
            .map(|name| self.norm_weight(&c.layer_module(l, &format!("{name}.weight")), h));
        let router_scale = self.norm_weight(&c.layer_module(l, "router.scale"), h);
        let (router_input, router_inv) =
            self.rmsnorm(x, router_scale, h, &format!("layers.{l}.router input"));
        let factor = (h as f32).powf(-0.5);
        self.b
            .node(Op::Scale { factor }, &[], &[router_input], false);
        let (logits, router) = self.linear(l, LinearKind::Router, router_input);
        let (experts_input, input_inv) =
            self.rmsnorm(x, input_norm, h, &format!("layers.{l}.experts input"));
        let (y, experts) = self.experts(l, experts_input, (logits, router));
        let name = |part: &str| format!("layers.{l}.{part}");
        let (dense_normed, dense_inv) = self.rmsnorm(dense, dense_norm, h, &name("dense output"));
        let (y_normed, y_inv) = self.rmsnorm(y, experts_norm, h, &name("experts output"));
        self.b.node(Op::Add, &[y_normed], &[dense_normed], true);
        let tape = BesideTape {
            router_input,
            router_norm: (x, router_scale, router_inv),
            experts_input,
            experts_input_norm: (x, input_norm, input_inv),
            dense_output_norm: (dense, dense_norm, dense_inv),
            experts_output_norm: (y, experts_norm, y_inv),
            experts,
        };
        (dense_normed, tape)
    }

    /// The experts' part of the gradient of the attention block's output x (Gemma 4's experts
    /// beside the MLP), from that of the sum they add into, added into dx.
    fn experts_beside_mlp_backward(&mut self, l: usize, s: &BesideTape, d_sum: BufId, dx: BufId) {
        let h = self.c.hidden_size;
        let through = |d: &mut Self, (x, w, inv): (BufId, BufId, BufId), dy: BufId| {
            d.rmsnorm_backward(x, w, inv, dy, h)
        };
        let dy = through(self, s.experts_output_norm, d_sum);
        let (d_experts_input, d_logits) = self.experts_backward(l, &s.experts, s.experts_input, dy);
        let d_router_input = self.gradient_of(s.router_input);
        self.linear_backward(&s.experts.router, s.router_input, d_logits, d_router_input);
        let factor = (h as f32).powf(-0.5);
        self.b
            .node(Op::Scale { factor }, &[], &[d_router_input], false);
        for (norm, dy) in [
            (s.router_norm, d_router_input),
            (s.experts_input_norm, d_experts_input),
        ] {
            let part = through(self, norm, dy);
            self.b.node(Op::Add, &[part], &[dx], true);
        }
    }

    /// Adds layer `l`'s shared expert on x into the experts' output y: a gated MLP scaled per
    /// token by the sigmoid of its gate's linear. A long sequence runs it in the dense MLP's chunks,
    /// each chunk's projections released after its output is added. The linears' tapes that the
    /// backward reads join `linears`.
    fn shared_expert(
        &mut self,
        l: usize,
        x: BufId,
        y: BufId,
        linears: &mut Vec<(LinearKind, LinearTape)>,
    ) -> SharedExpertTape {
        let gate_logits_kind = LinearKind::SHARED_EXPERT[3];
        let (gate_logits, gate_logits_tape) = self.linear(l, gate_logits_kind, x);
        linears.push((gate_logits_kind, gate_logits_tape));
        let dim = self.c.hidden_size;
        let chunks = self.mlp_chunks();
        if let [whole] = chunks[..] {
            let rows = self.shared_expert_rows(l, x, (whole.1, 0));
            let op = Op::SigmoidGatedRows { dim };
            self.b.node(op, &[gate_logits, rows.output], &[y], true);
            linears.extend(rows.tapes);
            let kept = Some([rows.gate, rows.up, rows.output]);
            return SharedExpertTape { kept, gate_logits };
        }
        for (chunk, rows) in chunks.into_iter().enumerate() {
            let x_rows = self.rows_of(x, rows, dim);
            let expert = self.shared_expert_rows(l, x_rows, (rows.1, chunk));
            let gate_rows = self.rows_of(gate_logits, rows, 1);
            let y_rows = self.rows_of(y, rows, dim);
            let op = Op::SigmoidGatedRows { dim };
            self.b
                .node(op, &[gate_rows, expert.output], &[y_rows], true);
            self.put_rows(y_rows, y, rows, dim);
        }
        SharedExpertTape {
            kept: None,
            gate_logits,
        }
    }

    /// Layer `l`'s shared expert on x (`at`: rows and chunk, as `linear_rows` takes them), before
    /// its gate.
    fn shared_expert_rows(&mut self, l: usize, x: BufId, at: (usize, usize)) -> SharedExpertRows {
        let [gate_kind, up_kind, down_kind, _] = LinearKind::SHARED_EXPERT;
        let (gate, gate_tape) = self.linear_rows(l, gate_kind, x, at);
        let (up, up_tape) = self.linear_rows(l, up_kind, x, at);
        let hidden = self.gated(gate, up, l);
        let (output, down_tape) = self.linear_rows(l, down_kind, hidden, at);
        SharedExpertRows {
            gate,
            up,
            hidden,
            output,
            tapes: vec![
                (gate_kind, gate_tape),
                (up_kind, up_tape),
                (down_kind, down_tape),
            ],
        }
    }

    /// The shared expert's part of the gradient of its input x (the layer's xn2), added into dx;
    /// chunk by chunk, recomputing each chunk's projections, where the forward ran in chunks.
    fn shared_expert_backward(
        &mut self,
        l: usize,
        s: &LayerTape,
        shared: &SharedExpertTape,
        dy: BufId,
        dx: BufId,
    ) {
        let (dim, width) = (self.c.hidden_size, self.c.shared_expert_width());
        let d_gate_logits = self.b.activation(
            self.b.len(shared.gate_logits),
            format!("d layers.{l}.shared expert gate"),
        );
        if let Some([gate, up, output]) = shared.kept {
            let hidden = self.gated(gate, up, l);
            let tapes = MlpTapes::shared_expert(&s.linears, width);
            let expert = [s.xn2, gate, up, hidden, output];
            let gradients = [shared.gate_logits, dy, d_gate_logits, dx];
            self.shared_expert_rows_backward(&tapes, expert, gradients);
        } else {
            for (chunk, rows) in self.mlp_chunks().into_iter().enumerate() {
                let x = self.rows_of(s.xn2, rows, dim);
                let e = self.shared_expert_rows(l, x, (rows.1, chunk));
                let gate_rows = self.rows_of(shared.gate_logits, rows, 1);
                let dy_rows = self.rows_of(dy, rows, dim);
                let dg_rows = self.gradient_of(gate_rows);
                let dx_rows = self.rows_of(dx, rows, dim);
                let tapes = MlpTapes::shared_expert(&e.tapes, width);
                let expert = [x, e.gate, e.up, e.hidden, e.output];
                let gradients = [gate_rows, dy_rows, dg_rows, dx_rows];
                self.shared_expert_rows_backward(&tapes, expert, gradients);
                self.put_rows(dg_rows, d_gate_logits, rows, 1);
                self.put_rows(dx_rows, dx, rows, dim);
            }
        }
        let gate_logits_tape = s.linear(LinearKind::SHARED_EXPERT[3]);
        self.linear_backward(gate_logits_tape, s.xn2, d_gate_logits, dx);
    }

    /// Through the shared expert on some rows (its input x, projections and output, as
    /// `shared_expert_rows` gives them): the gradient of the gate's logits into dg, and of x added
    /// into dx, from the gated output's dy and the gate's logits g.
    fn shared_expert_rows_backward(
        &mut self,
        tapes: &MlpTapes<'_>,
        [x, gate, up, hidden, output]: [BufId; 5],
        [g, dy, dg, dx]: [BufId; 4],
    ) {
        let d_output = self.gradient_of(output);
        let dim = self.c.hidden_size;
        self.b.node(
            Op::SigmoidGatedRowsBackward { dim },
            &[g, output, dy],
            &[d_output, dg],
            false,
        );
        self.mlp_backward(tapes, [x, gate, up, hidden], d_output, dx);
    }

    /// Layer `l`'s experts' biases (gpt-oss): gate_up's, then down's.
    fn expert_biases(&mut self, l: usize) -> Vec<BufId> {
        let c = self.c;
        let m = c.moe.as_ref().expect("a sparse layer has experts");
        if !m.family.biased() {
            return Vec::new();
        }
        let gate_up = c.layer_module(l, EXPERTS_GATE_UP_BIAS);
        let down = c.layer_module(l, EXPERTS_DOWN_BIAS);
        vec![
            self.b.weight(&gate_up, m.experts * 2 * m.inter),
            self.b.weight(&down, m.experts * c.hidden_size),
        ]
    }

    /// Which of layer `l`'s stacks of experts the adapter adapts, and their pairs' buffers.
    fn expert_pairs(&mut self, l: usize) -> (crate::ops::moe::MoeLora, Vec<BufId>) {
        let c = self.c;
        let m = c.moe.as_ref().expect("a sparse layer has experts");
        let mut pairs = Vec::new();
        let mut stack = |name: &str, (out, inp): (usize, usize)| {
            let path = c.experts_stack(l, name);
            let adapted = *self.lora.as_ref()?.targets.get(&path)?;
            for (factor, len) in [
                (Factor::A, m.experts * adapted.rank * inp),
                (Factor::B, out * adapted.rank * m.experts),
            ] {
                let path = path.clone();
                pairs.push(self.b.lora(Role::Lora { path, factor }, len));
            }
            Some((adapted.rank, adapted.scale))
        };
        let h = c.hidden_size;
        let gate_up = stack(EXPERTS_GATE_UP, (2 * m.inter, h));
        let down = stack(EXPERTS_DOWN, (h, m.inter));
        (crate::ops::moe::MoeLora { gate_up, down }, pairs)
    }

    /// The gradients of `experts`' input x and of the router's logits from that of its output:
    /// through the chosen experts, and through their weights into the logits.
    fn experts_backward(&mut self, l: usize, s: &MoeTape, x: BufId, dy: BufId) -> (BufId, BufId) {
        let c = self.c;
        let m = c.moe.as_ref().expect("a sparse layer has experts");
        let (t, h) = (self.t(), c.hidden_size);
        let shape = m.shape(h);
        let dx = self.b.activation(t * h, format!("d layers.{l}.xn2"));
        let d_weights = self
            .b
            .activation(t * m.top_k, format!("d layers.{l}.routing weights"));
        let act = c.gate_activation;
        let mut inputs = vec![x, s.routes, s.weights, s.gate_up, s.down, dy];
        inputs.extend(self.expert_biases(l));
        inputs.extend(&s.pairs);
        let mut outputs = vec![dx, d_weights];
        for &pair in &s.pairs {
            let Role::Lora { path, factor } = self.b.role(pair).clone() else {
                unreachable!("expert_pairs gives LoRA factors")
            };
            let len = self.b.len(pair);
            outputs.push(self.b.lora(Role::LoraGrad { path, factor }, len));
        }
        let op = Op::MoeExpertsBackward {
            shape,
            act,
            lora: s.lora,
        };
        self.b.node(op, &inputs, &outputs, false);
        if let Some(scales) = s.route_scales {
            let op = Op::ScaleRows { dim: 1 };
            self.b.node(op, &[scales], &[d_weights], false);
        }
        let d_logits = self
            .b
            .activation(t * m.experts, format!("d layers.{l}.router logits"));
        let op = Op::MoeRouteBackward {
            shape,
            normalize: m.normalize,
        };
        self.b
            .node(op, &[s.logits, s.routes, d_weights], &[d_logits], false);
        (dx, d_logits)
    }

    /// A block's output y through the sandwich norm `norm` of layer `l` where the model has them:
    /// (what the backward reads: y, the norm's weight, the inverse RMS; the normalised output).
    fn output_norm(
        &mut self,
        l: usize,
        y: BufId,
        norm: &str,
    ) -> (Option<(BufId, BufId, BufId)>, BufId) {
        if !self.c.sandwich_norms {
            return (None, y);
        }
        let h = self.c.hidden_size;
        let w = self.norm_weight(&self.c.layer_module(l, &format!("{norm}.weight")), h);
        let (normed, inv) = self.rmsnorm(y, w, h, &format!("layers.{l}.{norm}"));
        (Some((y, w, inv)), normed)
    }

    /// The (first row, rows) of each MLP chunk: one chunk for a short sequence or a decoding step.
    fn mlp_chunks(&self) -> Vec<(usize, usize)> {
        let (t, size) = (self.t(), self.shape.mlp_chunk.max(1));
        if t <= size {
            return vec![(0, t)];
        }
        (0..t).step_by(size).map(|r| (r, size.min(t - r))).collect()
    }

    /// Rows `first..first + rows` of x (rows of `dim`) as a buffer of their own.
    fn rows_of(&mut self, x: BufId, (first, rows): (usize, usize), dim: usize) -> BufId {
        let name = format!("{} rows {first}..{}", self.b.name(x), first + rows);
        let y = self.b.activation(rows * dim, name);
        let op = Op::CopyRows {
            dim,
            from: first,
            to: 0,
            rows,
        };
        self.b.node(op, &[x], &[y], false);
        y
    }

    /// Writes `part` (`rows` rows of `dim`) into y from row `first`.
    fn put_rows(&mut self, part: BufId, y: BufId, (first, rows): (usize, usize), dim: usize) {
        let op = Op::CopyRows {
            dim,
            from: 0,
            to: first,
            rows,
        };
        self.b.node(op, &[part], &[y], false);
    }

    /// The gate and up projections of x (`at`: rows and chunk, as `linear_rows` takes them) and their
    /// linears' tapes: one fused linear split in two, or two linears.
    fn gate_up(
        &mut self,
        l: usize,
        x: BufId,
        at: (usize, usize),
    ) -> (BufId, BufId, Vec<(LinearKind, LinearTape)>) {
        if !self.c.fused_projections {
            let (gate, gate_tape) = self.linear_rows(l, LinearKind::Gate, x, at);
            let (up, up_tape) = self.linear_rows(l, LinearKind::Up, x, at);
            let tapes = vec![(LinearKind::Gate, gate_tape), (LinearKind::Up, up_tape)];
            return (gate, up, tapes);
        }
        let (both, tape) = self.linear_rows(l, LinearKind::GateUp, x, at);
        let i = self.c.mlp_width(l);
        let name = self.b.name(both).to_string();
        let gate = self.b.columns(both, 2 * i, (0, i), format!("{name} gate"));
        let up = self.b.columns(both, 2 * i, (i, i), format!("{name} up"));
        (gate, up, vec![(LinearKind::GateUp, tape)])
    }

    /// The MLP's output, chunk by chunk: each chunk's projections are released after its down
    /// projection (the backward recomputes them).
    fn chunked_mlp(&mut self, l: usize, xn2: BufId) -> BufId {
        let h = self.c.hidden_size;
        let down = self.b.activation(self.t() * h, format!("layers.{l}.mlp"));
        for (chunk, rows) in self.mlp_chunks().into_iter().enumerate() {
            let x = self.rows_of(xn2, rows, h);
            let at = (rows.1, chunk);
            let (gate, up, _) = self.gate_up(l, x, at);
            let hidden = self.gated(gate, up, l);
            let (y, _) = self.linear_rows(l, LinearKind::Down, hidden, at);
            self.put_rows(y, down, rows, h);
        }
        down
    }

    /// `linear_rows`'s tape without its output.
    fn linear_tape(
        &mut self,
        layer: usize,
        kind: LinearKind,
        x: BufId,
        (rows, chunk): (usize, usize),
    ) -> LinearTape {
        let (out, inp) = self.c.linear_shape(kind, layer);
        let dropout = self.chunk_dropout(layer, kind, chunk);
        let shape = (rows, out, inp);
        let path = self.c.linear_path(kind, layer);
        lora_linear::tape(&mut self.b, self.lora.as_ref(), x, shape, path, dropout)
    }

    /// The dropout of a linear's LoRA branch in chunk `chunk` (masks of its own in each chunk).
    fn chunk_dropout(&self, layer: usize, kind: LinearKind, chunk: usize) -> Option<BranchDropout> {
        self.dropout_op(layer, kind).map(|dropout| BranchDropout {
            stream: dropout.stream + (chunk << 16) as u32,
            ..dropout
        })
    }

    /// The gradient of an MLP's input x from that of its output, given its gate and up projections
    /// and silu(gate)·up, and its linears' tapes, added into dx; their LoRA gradients accumulate.
    fn mlp_backward(
        &mut self,
        tapes: &MlpTapes<'_>,
        [x, gate, up, hidden]: [BufId; 4],
        dy: BufId,
        dx: BufId,
    ) {
        let dh = self
            .b
            .activation(self.b.len(hidden), format!("d {}", self.b.name(hidden)));
        self.linear_backward(tapes.down, hidden, dy, dh);
        let (dgate, dup) = (
            self.b
                .activation(self.b.len(dh), format!("d {}", self.b.name(gate))),
            self.b
                .activation(self.b.len(dh), format!("d {}", self.b.name(up))),
        );
        let act = self.c.gate_activation;
        self.b.node(
            Op::GluBackward { act },
            &[gate, up, dh],
            &[dgate, dup],
            false,
        );
        match &tapes.gate_up[..] {
            [gate_tape, up_tape] => {
                self.linear_backward(gate_tape, x, dgate, dx);
                self.linear_backward(up_tape, x, dup, dx);
            }
            [fused] => {
                let i = tapes.width;
                let name = format!("d {} gate_up", self.b.name(x));
                let d_both = self.b.joined(&[(dgate, 0), (dup, i)], 2 * i, name);
                self.linear_backward(fused, x, d_both, dx);
            }
            _ => unreachable!("gate and up run as one linear or two"),
        }
    }

    /// A fresh buffer for the gradient of x.
    fn gradient_of(&mut self, x: BufId) -> BufId {
        self.b
            .activation(self.b.len(x), format!("d {}", self.b.name(x)))
    }

    /// The gradient of the chunked MLP's input xn2, from that of its output, chunk by chunk: each
    /// chunk's gate and up projections recomputed, then its backward; LoRA gradients accumulate.
    fn chunked_mlp_backward(&mut self, l: usize, xn2: BufId, dy: BufId) -> BufId {
        let h = self.c.hidden_size;
        let dxn2 = self.b.activation(self.t() * h, format!("d layers.{l}.xn2"));
        for (chunk, rows) in self.mlp_chunks().into_iter().enumerate() {
            let x = self.rows_of(xn2, rows, h);
            let dy_rows = self.rows_of(dy, rows, h);
            let at = (rows.1, chunk);
            let (gate, up, gate_up) = self.gate_up(l, x, at);
            let hidden = self.gated(gate, up, l);
            // The down projection's own output is not needed: only its LoRA branch's (and DoRA's).
            let down = self.linear_tape(l, LinearKind::Down, hidden, at);
            let tapes = MlpTapes {
                gate_up: gate_up.iter().map(|(_, tape)| tape).collect(),
                down: &down,
                width: self.c.mlp_width(l),
            };
            let dx = self.gradient_of(x);
            self.mlp_backward(&tapes, [x, gate, up, hidden], dy_rows, dx);
            self.put_rows(dx, dxn2, rows, h);
        }
        dxn2
    }

    /// act(gate) ⊙ up.
    fn gated(&mut self, gate: BufId, up: BufId, l: usize) -> BufId {
        let h = self
            .b
            .activation(self.b.len(gate), format!("layers.{l}.gated"));
        let act = self.c.gate_activation;
        self.b.node(Op::Glu { act }, &[gate, up], &[h], false);
        h
    }

    fn layer_backward(&mut self, l: usize, s: &LayerTape, dx_out: BufId) -> BufId {
        let c = self.c;
        let (t, h, hd) = (self.t(), c.hidden_size, c.layers[l].head_dim);
        let q_dim = c.q_dim(l);
        self.b.set_stage(Some(l), true);
        self.scale_by_layer_scalar(l, dx_out);
        self.per_layer_input_backward(l, s, dx_out);
        let tape = |kind: LinearKind| s.linear(kind);
        // Through a sandwich norm on a block's output, when there is one.
        let through = |d: &mut Self, norm: Option<(BufId, BufId, BufId)>, dy: BufId| match norm {
            Some((y, w, inv)) => d.rmsnorm_backward(y, w, inv, dy, h),
            None => dy,
        };
        let d_mlp = through(self, s.mlp_out_norm, dx_out);
        // Beside Gemma 4's experts, the dense MLP's output has a norm of its own.
        let d_dense = match &s.beside {
            Some(beside) => through(self, Some(beside.dense_output_norm), d_mlp),
            None => d_mlp,
        };
        let dxn2 = match s.gate_up {
            _ if s.moe.is_some() => {
                let moe = s.moe.as_ref().expect("checked");
                let (dx, d_logits) = self.experts_backward(l, moe, s.xn2, d_mlp);
                lora_linear::backward(&mut self.b, &moe.router, s.xn2, d_logits, dx);
                if let Some(shared) = &moe.shared {
                    self.shared_expert_backward(l, s, shared, d_mlp, dx);
                }
                dx
            }
            Some((gate, up)) => {
                // silu(gate)·up is recomputed rather than kept: cheap, and it saves tokens x
                // intermediate floats per layer, the largest activation there is. The down
                // projection's backward reads these recomputed values, not the forward's (released
                // after the forward's down projection).
                let hidden = self.gated(gate, up, l);
                let gate_up_kinds: &[LinearKind] = match c.fused_projections {
                    true => &[LinearKind::GateUp],
                    false => &[LinearKind::Gate, LinearKind::Up],
                };
                let tapes = MlpTapes {
                    gate_up: gate_up_kinds.iter().map(|&k| tape(k)).collect(),
                    down: tape(LinearKind::Down),
                    width: c.mlp_width(l),
                };
                let dx = self.gradient_of(s.xn2);
                self.mlp_backward(&tapes, [s.xn2, gate, up, hidden], d_dense, dx);
                dx
            }
            None => self.chunked_mlp_backward(l, s.xn2, d_dense),
        };
        let dx_mid = self.rmsnorm_backward(s.x_mid, s.post_norm, s.inv2, dxn2, h);
        if let Some(beside) = &s.beside {
            self.experts_beside_mlp_backward(l, beside, d_mlp, dx_mid);
        }
        self.b.node(Op::Add, &[dx_out], &[dx_mid], true);
        let d_o = through(self, s.attn_out_norm, dx_mid);
        let d_attn = self.b.activation(t * q_dim, format!("d layers.{l}.attn"));
        self.linear_backward(tape(LinearKind::O), s.attn, d_o, d_attn);
        let (dq, dk, dv) = (
            self.b
                .activation(self.b.len(s.q), format!("d layers.{l}.q")),
            self.b
                .activation(self.b.len(s.k), format!("d layers.{l}.k")),
            self.b
                .activation(self.b.len(s.v), format!("d layers.{l}.v")),
        );
        let mut inputs = vec![s.q, s.k, s.v, s.attn, s.lse, d_attn];
        inputs.extend(self.first_key(l));
        let shape = self.attention_shape(l);
        self.b.node(
            Op::AttentionBackward { shape },
            &inputs,
            &[dq, dk, dv],
            false,
        );
        let q_scale = self.query_scale(l);
        if q_scale != 1.0 {
            self.b
                .node(Op::Scale { factor: q_scale }, &[], &[dq], false);
        }
        self.scale_queries_by_position(dq, l);
        if c.layers[l].rope {
            self.rope(l, dq, c.num_heads, true);
        }
        let dq = match s.q_norm {
            Some((qp, qn, iq)) => self.rmsnorm_backward(qp, qn, iq, dq, hd),
            None => dq,
        };
        let dxn1 = self.b.activation(t * h, format!("d layers.{l}.xn1"));
        if let Some(from) = c.layers[l].kv_from {
            // Into the gradients of the keys and values this layer shares, summed over the layers
            // that share them; the layer that computed them takes them in its own backward.
            match self.shared_kv_grads.get(&from) {
                Some(&(gk, gv)) => {
                    self.b.node(Op::Add, &[dk], &[gk], true);
                    self.b.node(Op::Add, &[dv], &[gv], true);
                }
                None => {
                    self.shared_kv_grads.insert(from, (dk, dv));
                }
            }
            self.linear_backward(tape(LinearKind::Q), s.xn1, dq, dxn1);
        } else {
            if let Some((gk, gv)) = self.shared_kv_grads.remove(&l) {
                self.b.node(Op::Add, &[gk], &[dk], true);
                self.b.node(Op::Add, &[gv], &[dv], true);
            }
            self.own_kv_backward(l, s, [dq, dk, dv], dxn1);
        }
        let dx = self.rmsnorm_backward(s.x, s.input_norm, s.inv1, dxn1, h);
        self.b.node(Op::Add, &[dx_mid], &[dx], true);
        dx
    }

    /// The backward of layer `l`'s q, k and v projections from the gradients of its attention's
    /// q, k and v (k through RoPE and both through their norms first), into dxn1.
    fn own_kv_backward(&mut self, l: usize, s: &LayerTape, [dq, dk, dv]: [BufId; 3], dxn1: BufId) {
        let c = self.c;
        let hd = c.layers[l].head_dim;
        let (q_dim, kv_dim) = (c.q_dim(l), c.kv_dim(l));
        let tape = |kind: LinearKind| s.linear(kind);
        if c.layers[l].rope {
            self.rope(l, dk, c.layers[l].kv_heads, true);
        }
        let dv = match s.v_norm {
            Some((v_raw, inv)) => self.rmsnorm_backward_node(v_raw, None, inv, dv, hd),
            None => dv,
        };
        let dk = match s.k_norm {
            Some((kp, kn, ik)) => self.rmsnorm_backward(kp, kn, ik, dk, hd),
            None => dk,
        };
        if c.fused_projections {
            let (qd, kvd) = (q_dim, kv_dim);
            let parts = [(dq, 0), (dk, qd), (dv, qd + kvd)];
            let dqkv = self
                .b
                .joined(&parts, qd + 2 * kvd, format!("d layers.{l}.qkv"));
            self.linear_backward(tape(LinearKind::Qkv), s.xn1, dqkv, dxn1);
        } else if c.layers[l].values_from_keys {
            // k_proj's output fed both k and v: its gradient is the sum.
            self.b.node(Op::Add, &[dv], &[dk], true);
            for (kind, d) in [(LinearKind::Q, dq), (LinearKind::K, dk)] {
                self.linear_backward(tape(kind), s.xn1, d, dxn1);
            }
        } else {
            for (kind, d) in [
                (LinearKind::Q, dq),
                (LinearKind::K, dk),
                (LinearKind::V, dv),
            ] {
                self.linear_backward(tape(kind), s.xn1, d, dxn1);
            }
        }
    }
}

/// The output projection's tensor: lm_head, or the embedding when they are tied.
fn head_name(c: &ModelConfig) -> String {
    if c.tie_word_embeddings {
        c.tensor("embed_tokens.weight")
    } else {
        "lm_head.weight".into()
    }
}

/// The tables a GPU keeps in host memory, uploading only the rows a step reads: the embedding (1.2
/// GiB at 16 bits for a 152k vocabulary of width 4096, of which a step reads a few thousand rows),
/// unless the output projection reads all of it too (tied), and Gemma 4's per-layer embedding (4.7
/// GiB in E2B).
pub fn host_tables(c: &ModelConfig) -> Vec<String> {
    let mut tables = Vec::new();
    if !c.tie_word_embeddings {
        tables.push(c.tensor("embed_tokens.weight"));
    }
    if c.per_layer_inputs.is_some() {
        tables.push(c.tensor(PER_LAYER_EMBEDDING));
    }
    tables
}

/// `build`, remembered: a training run or a conversation repeats a few shapes, and a 0.5B model's
/// checkpointed training graph takes milliseconds to build. Keyed by everything the graph depends on.
pub fn cached(c: &ModelConfig, lora: Option<&LoraSpec>, shape: StepShape) -> Arc<Graph> {
    // Bounded: decoding makes a new shape per token.
    const MOST: usize = 64;
    static GRAPHS: Mutex<Option<HashMap<String, Arc<Graph>>>> = Mutex::new(None);
    let key = format!("{c:?}|{lora:?}|{shape:?}");
    if let Some(g) = GRAPHS
        .lock()
        .ok()
        .and_then(|m| m.as_ref().and_then(|m| m.get(&key).cloned()))
    {
        return g;
    }
    let graph = Arc::new(build(c, lora, shape));
    if let Ok(mut m) = GRAPHS.lock() {
        let m = m.get_or_insert_with(HashMap::new);
        if m.len() >= MOST {
            m.clear();
        }
        m.insert(key, graph.clone());
    }
    graph
}

/// The hidden states after `layers[i]` decoder layers (Hugging Face's `hidden_states[layers[i]]`, no
/// final norm) of `tokens` tokens, as outputs `hidden.{n}`; the layers past the last one asked are not
/// built. With `padded`, the sequence ends in padding that no token attends to (`Input::KeyEnd`), as
/// transformers' attention mask does.
pub fn hidden_states(c: &ModelConfig, layers: &[usize], tokens: usize, padded: bool) -> Graph {
    let shape = StepShape::forward_only(tokens);
    let mut d = Decoder::new(c, None, shape, padded);
    let h = c.hidden_size;
    let mut x = d.embed();
    let last = layers.iter().copied().max().unwrap_or(0).min(c.num_layers);
    for l in 0..=last {
        if layers.contains(&l) {
            let out = d.b.output(&format!("hidden.{l}"), tokens * h);
            d.b.node(Op::Add, &[x], &[out], true);
        }
        if l < last {
            x = d.layer_forward(l, x).0;
        }
    }
    d.b.finish()
}

/// The graph of one step of shape `shape` over the decoder `c`, with the LoRA branches of `lora`.
pub fn build(c: &ModelConfig, lora: Option<&LoraSpec>, shape: StepShape) -> Graph {
    let mut d = Decoder::new(c, lora, shape, false);
    let (t, h, vocab) = (shape.tokens, c.hidden_size, c.vocab_size);
    let mut x = d.embed();
    let mut tapes = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let (next, tape) = d.layer_forward(l, x);
        tapes.push(tape);
        x = next;
    }
    d.b.set_stage(None, false);
    let final_norm = d.b.weight(&c.tensor("norm.weight"), h);
    let head = d.b.weight(&head_name(c), vocab * h);
    let softcap = c.final_logit_softcapping;
    if shape.decode_after.is_some() {
        // Only the last token's logits: its row alone is normalised and projected.
        let last = d.b.input(Input::LabelPositions, 1);
        let row = d.b.activation(h, "last hidden");
        d.b.node(Op::GatherRows { dim: h }, &[x, last], &[row], false);
        let (xf, _) = d.rmsnorm(row, final_norm, h, "final_norm");
        let logits = d.b.output("logits", vocab);
        d.b.node(
            Op::Logits { dim: h, softcap },
            &[xf, head],
            &[logits],
            false,
        );
        return d.b.finish();
    }
    let (xf, inv_f) = d.rmsnorm(x, final_norm, h, "final_norm");
    if shape.logits {
        let logits = d.b.output("logits", t * vocab);
        d.b.node(
            Op::Logits { dim: h, softcap },
            &[xf, head],
            &[logits],
            false,
        );
        return d.b.finish();
    }
    let np = shape.positions;
    let index = d.b.input(Input::LabelPositions, np);
    let labels = d.b.input(Input::Labels, np);
    let hidden = d.b.activation(np * h, "labelled hidden");
    d.b.node(Op::GatherRows { dim: h }, &[xf, index], &[hidden], false);
    // Per position: the loss, the log-sum-exp and what goes with them (`TokenLoss`).
    let losses =
        d.b.output("losses", crate::ops::cross_entropy::TokenLoss::WIDTH * np);
    if !shape.backward {
        d.b.node(
            Op::CrossEntropy { dim: h, softcap },
            &[hidden, head, labels],
            &[losses],
            false,
        );
        return d.b.finish();
    }
    d.b.set_stage(None, true);
    let grad_scale = d.b.input(Input::GradScale, 1);
    let loss_type = d.b.input(Input::LossType, 1);
    let d_hidden = d.b.activation(np * h, "d labelled hidden");
    d.b.node(
        Op::CrossEntropyWithGrad { dim: h, softcap },
        &[hidden, head, labels, grad_scale, loss_type],
        &[losses, d_hidden],
        false,
    );
    for rows in d.trained_rows(true) {
        let grad = d.rows_grad(&rows);
        let op = Op::OutputRowsGrad {
            dim: h,
            softcap,
            token_ids: rows.token_ids,
        };
        let ins = [hidden, head, labels, losses, grad_scale, loss_type];
        d.b.node(op, &ins, &[grad], true);
    }
    let dxf = d.b.activation(t * h, "d final_norm");
    d.b.node(
        Op::ScatterRows { dim: h },
        &[d_hidden, index],
        &[dxf],
        false,
    );
    let mut dx = d.rmsnorm_backward(x, final_norm, inv_f, dxf, h);
    for (l, tape) in tapes.iter().enumerate().rev() {
        dx = d.layer_backward(l, tape, dx);
    }
    for rows in d.trained_rows(false) {
        let grad = d.rows_grad(&rows);
        let ids = d.b.input(Input::TokenIds, t);
        let op = Op::EmbeddingRowsGrad {
            dim: h,
            scale: c.embed_scale,
            token_ids: rows.token_ids,
        };
        d.b.node(op, &[dx, ids], &[grad], true);
    }
    let graph = d.b.finish();
    if shape.checkpoint {
        checkpoint::apply(&graph, shape.checkpoints)
    } else {
        graph
    }
}
