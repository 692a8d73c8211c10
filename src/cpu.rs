//! The CPU executor: one decoder-only transformer step (forward, and backward into the LoRA gradients)
//! over the shared op kernels in `ops`. Frozen weights get no gradient; activations are kept per layer
//! for the backward.

use crate::config::{LinearKind, ModelConfig};
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraPair};
use crate::model::{DenseTensor, Layer, Linear, Model};
use crate::ops::attention::{self, AttentionShape};
use crate::ops::bf16_gemm::PackedRows;
use crate::ops::dropout::{self, DropoutParams};
use crate::ops::matmul::{View, matmul_into};
use crate::ops::rmsnorm::{self, RmsNormParams};
use crate::ops::{self, Precision, cross_entropy, linear, rope, swiglu, zeros};
use crate::rng::Rng;

/// One training sequence: token ids and, for each position, the token it must predict (None: no loss).
/// A packed sequence holds several examples: `starts` lists where each begins; attention stays inside
/// each example and positions (RoPE) restart at each start.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub targets: Vec<Option<u32>>,
    pub starts: Vec<u32>,
}

impl Sequence {
    /// Causal-LM targets as transformers derives them from `labels` (shifted by one; -100 ignored):
    /// every next token is a target.
    pub fn all_tokens(ids: Vec<u32>) -> Self {
        let targets = (0..ids.len()).map(|t| ids.get(t + 1).copied()).collect();
        Sequence {
            ids,
            targets,
            starts: vec![0],
        }
    }

    /// Whether the sequence holds more than one example.
    pub fn is_packed(&self) -> bool {
        self.starts.len() > 1
    }

    /// For each token, the first position it may attend to: the start of its example.
    pub fn segments(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.ids.len());
        for (i, &start) in self.starts.iter().enumerate() {
            let end = self
                .starts
                .get(i + 1)
                .map_or(self.ids.len(), |&e| e as usize);
            out.extend(std::iter::repeat_n(start, end - start as usize));
        }
        out
    }

    /// Each token's position inside its own example.
    pub fn positions(&self) -> Vec<u32> {
        self.segments()
            .iter()
            .enumerate()
            .map(|(t, &s)| t as u32 - s)
            .collect()
    }
}

/// Packs examples into sequences of at most `max_len` tokens (first fit, longest first, as TRL's
/// best-fit packing does), each example kept whole; an example's last token predicts nothing, so no
/// loss crosses from one example into the next.
pub fn pack(sequences: Vec<Sequence>, max_len: usize) -> Vec<Sequence> {
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].ids.len()));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    for i in order {
        let n = sequences[i].ids.len();
        match room.iter().position(|&r| r >= n) {
            Some(b) => {
                bins[b].push(i);
                room[b] -= n;
            }
            None => {
                bins.push(vec![i]);
                room.push(max_len.saturating_sub(n));
            }
        }
    }
    bins.into_iter()
        .map(|bin| {
            let mut packed = Sequence {
                ids: Vec::new(),
                targets: Vec::new(),
                starts: Vec::new(),
            };
            for i in bin {
                let s = &sequences[i];
                packed.starts.push(packed.ids.len() as u32);
                packed.ids.extend_from_slice(&s.ids);
                let mut targets = s.targets.clone();
                if let Some(last) = targets.last_mut() {
                    *last = None;
                }
                packed.targets.extend(targets);
            }
            packed
        })
        .collect()
}

impl Sequence {
    /// Checks that every id and target lies inside a vocabulary of `vocab` tokens.
    pub fn check(&self, vocab: usize) -> Result<()> {
        if self.ids.len() != self.targets.len() {
            return Err(Error::Invalid(
                "a sequence needs one target slot per token".into(),
            ));
        }
        let ordered = self.starts.first() == Some(&0)
            && self.starts.windows(2).all(|w| w[0] < w[1])
            && self
                .starts
                .last()
                .is_some_and(|&s| (s as usize) < self.ids.len().max(1));
        if !ordered {
            return Err(Error::Invalid(
                "a sequence's example starts must begin at 0 and increase inside it".into(),
            ));
        }
        check_tokens(&self.ids, vocab)?;
        match self
            .targets
            .iter()
            .flatten()
            .find(|&&t| t as usize >= vocab)
        {
            Some(bad) => Err(Error::Invalid(format!(
                "target token {bad} is outside the model's vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoss {
    /// Σ cross-entropy over the sequence's targets.
    pub loss_sum: f64,
    pub targets: usize,
}

struct LinearSaved {
    /// The LoRA branch's dropout (None: the branch reads the linear's input). The backward regenerates
    /// the mask from it instead of keeping the dropped input.
    dropout: Option<DropoutParams>,
    /// dropout(x)·Aᵀ, [tokens, r].
    xa: Vec<f32>,
}

struct LayerSaved {
    x: Vec<f32>,
    xn1: Vec<f32>,
    inv1: Vec<f32>,
    q_pre_norm: Option<Vec<f32>>,
    k_pre_norm: Option<Vec<f32>>,
    inv_q: Vec<f32>,
    inv_k: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    x_mid: Vec<f32>,
    xn2: Vec<f32>,
    inv2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    linears: Vec<Option<LinearSaved>>,
}

/// What a forward pass needs besides the model: adapters, the dropout seed, rope tables.
struct Context<'a> {
    model: &'a Model,
    adapter: Option<&'a LoraAdapter>,
    /// LoRA dropout is on when set: the seed of this sequence's counter-based masks.
    dropout_seed: Option<u64>,
    /// For a packed sequence, each token's first attendable position.
    segments: Option<Vec<u32>>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    tokens: usize,
    precision: Precision,
}

fn config_of(model: &Model) -> &ModelConfig {
    &model.config
}

fn rms(x: &[f32], weight: &[f32], dim: usize, eps: f64) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / dim;
    let mut y = zeros(x.len());
    let mut inv = vec![0f32; rows];
    rmsnorm::forward(
        &RmsNormParams::new(rows, dim, eps),
        x,
        weight,
        &mut y,
        &mut inv,
    );
    (y, inv)
}

fn rms_backward(
    x: &[f32],
    weight: &[f32],
    inv: &[f32],
    dy: &[f32],
    dim: usize,
    eps: f64,
) -> Vec<f32> {
    let mut dx = zeros(x.len());
    rmsnorm::backward(
        &RmsNormParams::new(x.len() / dim, dim, eps),
        x,
        weight,
        inv,
        dy,
        &mut dx,
    );
    dx
}

impl<'a> Context<'a> {
    fn lora(&self, layer: usize, kind: LinearKind) -> Option<(&'a LoraPair, f32, f32)> {
        let adapter = self.adapter?;
        adapter
            .pair(layer, kind)
            .map(|p| (p, adapter.config.scale(), adapter.config.dropout))
    }

    fn dropout(&self, layer: usize, kind: LinearKind, p: f32, n: usize) -> Option<DropoutParams> {
        let seed = self.dropout_seed?;
        (p > 0.0).then(|| DropoutParams::new(n, seed, dropout::stream(layer, kind as usize), p))
    }

    /// `packed`: x as `linear::pack_input` prepares it for this context's precision.
    fn linear_forward(
        &self,
        layer: usize,
        lin: &Linear,
        x: &[f32],
        packed: Option<&PackedRows>,
    ) -> (Vec<f32>, Option<LinearSaved>) {
        let (out, inp) = lin.weight.shape();
        let mut y = zeros(self.tokens * out);
        linear::forward_packed(
            x,
            packed,
            &lin.weight,
            lin.bias.as_deref(),
            &mut y,
            self.precision,
        );
        let Some((pair, scale, p)) = self.lora(layer, lin.kind) else {
            return (y, None);
        };
        let dropout = self.dropout(layer, lin.kind, p, x.len());
        let dropped = dropout.map(|d| dropout::apply(&d, x));
        let lora_in = dropped.as_deref().unwrap_or(x);
        let r = pair.rank;
        let mut xa = vec![0f32; self.tokens * r];
        matmul_into(
            View::new(lora_in, self.tokens, inp),
            View::transposed(&pair.a, r, inp),
            1.0,
            &mut xa,
            r,
            0,
            false,
        );
        matmul_into(
            View::new(&xa, self.tokens, r),
            View::transposed(&pair.b, out, r),
            scale,
            &mut y,
            out,
            0,
            true,
        );
        (y, Some(LinearSaved { dropout, xa }))
    }

    /// dx += dy·W (+ the LoRA branch's input gradient); LoRA gradients accumulate into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        layer: usize,
        lin: &Linear,
        x: &[f32],
        saved: Option<&LinearSaved>,
        dy: &[f32],
        dx: &mut [f32],
        grads: &mut Option<&mut LoraAdapter>,
    ) {
        linear::backward_input(dy, &lin.weight, dx, true, self.precision);
        let (Some((pair, scale, _)), Some(saved)) = (self.lora(layer, lin.kind), saved) else {
            return;
        };
        let (out, inp, r, t) = (pair.out_features, pair.in_features, pair.rank, self.tokens);
        // d(xa) = scale · dy·B, [tokens, r]
        let mut dxa = vec![0f32; t * r];
        matmul_into(
            View::new(dy, t, out),
            View::new(&pair.b, out, r),
            scale,
            &mut dxa,
            r,
            0,
            false,
        );
        if let Some(g) = grads
            .as_deref_mut()
            .and_then(|g| g.layers[layer][lin.kind as usize].as_mut())
        {
            let dropped = saved.dropout.map(|d| dropout::apply(&d, x));
            let lora_in = dropped.as_deref().unwrap_or(x);
            // dB += scale · dyᵀ·xa, dA += d(xa)ᵀ·dropout(x)
            matmul_into(
                View::transposed(dy, t, out),
                View::new(&saved.xa, t, r),
                scale,
                &mut g.b,
                r,
                0,
                true,
            );
            matmul_into(
                View::transposed(&dxa, t, r),
                View::new(lora_in, t, inp),
                1.0,
                &mut g.a,
                inp,
                0,
                true,
            );
        }
        let mut d_lora_in = zeros(t * inp);
        matmul_into(
            View::new(&dxa, t, r),
            View::new(&pair.a, r, inp),
            1.0,
            &mut d_lora_in,
            inp,
            0,
            false,
        );
        if let Some(d) = &saved.dropout {
            dropout::backward_accumulate(d, &d_lora_in, dx);
        } else {
            ops::add_assign(dx, &d_lora_in);
        }
    }

    /// With `cache` (decoding), the layer's new keys and values are appended to it and the queries attend
    /// to every cached position.
    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        x: Vec<f32>,
        cache: Option<&mut LayerCache>,
    ) -> (Vec<f32>, LayerSaved) {
        let c = config_of(self.model).clone();
        let (t, hd) = (self.tokens, c.head_dim);
        let (xn1, inv1) = rms(&x, &layer.input_norm, c.hidden_size, c.rms_norm_eps);
        let mut linears: Vec<Option<LinearSaved>> = (0..7).map(|_| None).collect();
        // One packing of an input for every linear that reads it.
        let pack = |input: &[f32], reader: LinearKind| {
            let inp = layer.linear(reader).weight.shape().1;
            linear::pack_input(input, inp, self.precision)
        };
        let run = |kind: LinearKind,
                   input: &[f32],
                   packed: Option<&PackedRows>,
                   linears: &mut Vec<Option<LinearSaved>>| {
            let (y, saved) = self.linear_forward(l, layer.linear(kind), input, packed);
            linears[kind as usize] = saved;
            y
        };
        let packed = pack(&xn1, LinearKind::Q);
        let mut q = run(LinearKind::Q, &xn1, packed.as_ref(), &mut linears);
        let mut k = run(LinearKind::K, &xn1, packed.as_ref(), &mut linears);
        let v = run(LinearKind::V, &xn1, packed.as_ref(), &mut linears);
        drop(packed);
        let (mut q_pre_norm, mut k_pre_norm, mut inv_q, mut inv_k) =
            (None, None, Vec::new(), Vec::new());
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (qq, iq) = rms(&q, qn, hd, c.rms_norm_eps);
            let (kk, ik) = rms(&k, kn, hd, c.rms_norm_eps);
            q_pre_norm = Some(std::mem::replace(&mut q, qq));
            k_pre_norm = Some(std::mem::replace(&mut k, kk));
            (inv_q, inv_k) = (iq, ik);
        }
        rope::apply(&mut q, c.num_heads, hd, &self.cos, &self.sin, false);
        rope::apply(&mut k, c.num_kv_heads, hd, &self.cos, &self.sin, false);
        let shape = AttentionShape {
            tokens: t,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
        };
        let mut attn = zeros(t * c.q_dim());
        let mut lse = vec![0f32; c.num_heads * t];
        match cache {
            None => attention::forward(
                shape,
                &q,
                &k,
                &v,
                self.segments.as_deref(),
                &mut attn,
                &mut lse,
            ),
            Some(cache) => {
                let past = cache.k.len() / c.kv_dim();
                cache.k.extend_from_slice(&k);
                cache.v.extend_from_slice(&v);
                attention::forward_cached(shape, past, &q, &cache.k, &cache.v, &mut attn);
            }
        }
        let o = run(
            LinearKind::O,
            &attn,
            pack(&attn, LinearKind::O).as_ref(),
            &mut linears,
        );
        let x_mid = ops::sum(&x, &o);
        let (xn2, inv2) = rms(
            &x_mid,
            &layer.post_attention_norm,
            c.hidden_size,
            c.rms_norm_eps,
        );
        let packed = pack(&xn2, LinearKind::Gate);
        let gate = run(LinearKind::Gate, &xn2, packed.as_ref(), &mut linears);
        let up = run(LinearKind::Up, &xn2, packed.as_ref(), &mut linears);
        drop(packed);
        let mut h = zeros(gate.len());
        swiglu::forward(&gate, &up, &mut h);
        let down = run(
            LinearKind::Down,
            &h,
            pack(&h, LinearKind::Down).as_ref(),
            &mut linears,
        );
        let x_out = ops::sum(&x_mid, &down);
        let saved = LayerSaved {
            x,
            xn1,
            inv1,
            q_pre_norm,
            k_pre_norm,
            inv_q,
            inv_k,
            q,
            k,
            v,
            attn,
            lse,
            x_mid,
            xn2,
            inv2,
            gate,
            up,
            linears,
        };
        (x_out, saved)
    }

    fn layer_backward(
        &self,
        l: usize,
        layer: &Layer,
        s: &LayerSaved,
        dx_out: Vec<f32>,
        grads: &mut Option<&mut LoraAdapter>,
    ) -> Vec<f32> {
        let c = config_of(self.model);
        let (t, hd, h_size) = (self.tokens, c.head_dim, c.hidden_size);
        let saved = |k: LinearKind| s.linears[k as usize].as_ref();

        // silu(gate)·up is recomputed rather than kept: cheap, and it saves tokens x intermediate floats
        // per layer, the largest activation there is.
        let mut h = zeros(s.gate.len());
        swiglu::forward(&s.gate, &s.up, &mut h);
        let mut dh = zeros(h.len());
        self.linear_backward(
            l,
            layer.linear(LinearKind::Down),
            &h,
            saved(LinearKind::Down),
            &dx_out,
            &mut dh,
            grads,
        );
        let (mut dgate, mut dup) = (zeros(dh.len()), zeros(dh.len()));
        drop(h);
        swiglu::backward(&s.gate, &s.up, &dh, &mut dgate, &mut dup);
        let mut dxn2 = zeros(t * h_size);
        self.linear_backward(
            l,
            layer.linear(LinearKind::Gate),
            &s.xn2,
            saved(LinearKind::Gate),
            &dgate,
            &mut dxn2,
            grads,
        );
        self.linear_backward(
            l,
            layer.linear(LinearKind::Up),
            &s.xn2,
            saved(LinearKind::Up),
            &dup,
            &mut dxn2,
            grads,
        );
        let mut dx_mid = rms_backward(
            &s.x_mid,
            &layer.post_attention_norm,
            &s.inv2,
            &dxn2,
            h_size,
            c.rms_norm_eps,
        );
        ops::add_assign(&mut dx_mid, &dx_out);

        let mut d_attn = zeros(t * c.q_dim());
        self.linear_backward(
            l,
            layer.linear(LinearKind::O),
            &s.attn,
            saved(LinearKind::O),
            &dx_mid,
            &mut d_attn,
            grads,
        );
        let shape = AttentionShape {
            tokens: t,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: hd,
        };
        let (mut dq, mut dk, mut dv) = (zeros(s.q.len()), zeros(s.k.len()), zeros(s.v.len()));
        attention::backward(
            shape,
            &s.q,
            &s.k,
            &s.v,
            &s.attn,
            &s.lse,
            &d_attn,
            self.segments.as_deref(),
            &mut dq,
            &mut dk,
            &mut dv,
        );
        rope::apply(&mut dq, c.num_heads, hd, &self.cos, &self.sin, true);
        rope::apply(&mut dk, c.num_kv_heads, hd, &self.cos, &self.sin, true);
        if let (Some(qn), Some(kn), Some(qp), Some(kp)) =
            (&layer.q_norm, &layer.k_norm, &s.q_pre_norm, &s.k_pre_norm)
        {
            dq = rms_backward(qp, qn, &s.inv_q, &dq, hd, c.rms_norm_eps);
            dk = rms_backward(kp, kn, &s.inv_k, &dk, hd, c.rms_norm_eps);
        }
        let mut dxn1 = zeros(t * h_size);
        for (kind, d) in [
            (LinearKind::Q, &dq),
            (LinearKind::K, &dk),
            (LinearKind::V, &dv),
        ] {
            self.linear_backward(
                l,
                layer.linear(kind),
                &s.xn1,
                saved(kind),
                d,
                &mut dxn1,
                grads,
            );
        }
        let mut dx = rms_backward(
            &s.x,
            &layer.input_norm,
            &s.inv1,
            &dxn1,
            h_size,
            c.rms_norm_eps,
        );
        ops::add_assign(&mut dx, &dx_mid);
        dx
    }
}

fn lm_head(model: &Model) -> &DenseTensor {
    model.lm_head.as_ref().unwrap_or(&model.embed)
}

/// Checks that every token id lies inside a vocabulary of `vocab` tokens.
pub fn check_tokens(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::Invalid(format!(
            "token id {id} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

fn embed(model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let (v, h) = (model.config.vocab_size, model.config.hidden_size);
    let mut x = zeros(ids.len() * h);
    check_tokens(ids, v)?;
    for (row, &id) in x.chunks_mut(h).zip(ids) {
        model.embed.row_f32(id as usize, row);
    }
    Ok(x)
}

fn context<'a>(
    model: &'a Model,
    adapter: Option<&'a LoraAdapter>,
    dropout_seed: Option<u64>,
    tokens: usize,
    precision: Precision,
) -> Context<'a> {
    let positions: Vec<u32> = (0..tokens as u32).collect();
    context_at(model, adapter, dropout_seed, &positions, None, precision)
}

/// A context for tokens at `positions` (decoding after cached positions, or a packed sequence with its
/// `segments`).
fn context_at<'a>(
    model: &'a Model,
    adapter: Option<&'a LoraAdapter>,
    dropout_seed: Option<u64>,
    positions: &[u32],
    segments: Option<Vec<u32>>,
    precision: Precision,
) -> Context<'a> {
    let c = &model.config;
    let tokens = positions.len();
    let (cos, sin) = rope::tables(
        positions,
        &rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
    );
    Context {
        model,
        adapter,
        dropout_seed,
        segments,
        cos,
        sin,
        tokens,
        precision,
    }
}

/// What the forward keeps of a layer for the backward: everything, or (gradient checkpointing) only its
/// input, from which the backward recomputes the rest (dropout masks included: they are counter-based).
enum Kept {
    Full(LayerSaved),
    Checkpoint(Vec<f32>),
}

/// Runs the decoder and returns the final normalised hidden states [tokens, hidden] with what the
/// backward needs.
fn decoder_forward(
    ctx: &Context,
    ids: &[u32],
    checkpoint: bool,
) -> Result<(Vec<f32>, Vec<Kept>, Vec<f32>, Vec<f32>)> {
    let model = ctx.model;
    let mut x = embed(model, ids)?;
    let mut kept = Vec::with_capacity(model.layers.len());
    for (l, layer) in model.layers.iter().enumerate() {
        if checkpoint {
            let input = x.clone();
            let (next, _) = ctx.layer_forward(l, layer, x, None);
            kept.push(Kept::Checkpoint(input));
            x = next;
        } else {
            let (next, s) = ctx.layer_forward(l, layer, x, None);
            kept.push(Kept::Full(s));
            x = next;
        }
    }
    let (xf, inv_f) = rms(
        &x,
        &model.final_norm,
        model.config.hidden_size,
        model.config.rms_norm_eps,
    );
    Ok((xf, kept, x, inv_f))
}

/// Logits [tokens, vocab] of a sequence (for evaluation of small models and parity tests).
pub fn logits(model: &Model, adapter: Option<&LoraAdapter>, ids: &[u32]) -> Result<Vec<f32>> {
    let ctx = context(model, adapter, None, ids.len(), Precision::F32);
    let (xf, _, _, _) = decoder_forward(&ctx, ids, false)?;
    Ok(cross_entropy::logits(&xf, lm_head(model), Precision::F32))
}

/// Keys and values of every decoded position, per layer (after RoPE), for incremental decoding.
pub struct KvCache {
    layers: Vec<LayerCache>,
}

#[derive(Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        KvCache {
            layers: (0..model.layers.len())
                .map(|_| LayerCache::default())
                .collect(),
        }
    }

    /// Positions held.
    pub fn len(&self, model: &Model) -> usize {
        self.layers
            .first()
            .map_or(0, |l| l.k.len() / model.config.kv_dim())
    }

    pub fn is_empty(&self) -> bool {
        self.layers.first().is_none_or(|l| l.k.is_empty())
    }

    /// Forgets every position from `len` on (a conversation that diverges from what was decoded).
    pub fn truncate(&mut self, model: &Model, len: usize) {
        let kv = model.config.kv_dim();
        for l in &mut self.layers {
            l.k.truncate(len * kv);
            l.v.truncate(len * kv);
        }
    }
}

/// Feeds `ids` at the positions after those in `cache` (adding theirs to it) and returns the logits
/// [vocab] of the last one.
pub fn decode(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    cache: &mut KvCache,
    ids: &[u32],
) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::Invalid("nothing to decode".into()));
    }
    let c = &model.config;
    let start = cache.len(model) as u32;
    let positions: Vec<u32> = (start..start + ids.len() as u32).collect();
    let ctx = context_at(model, adapter, None, &positions, None, Precision::F32);
    let mut x = embed(model, ids)?;
    for (l, layer) in model.layers.iter().enumerate() {
        x = ctx.layer_forward(l, layer, x, Some(&mut cache.layers[l])).0;
    }
    let last = &x[(ids.len() - 1) * c.hidden_size..];
    let (xf, _) = rms(last, &model.final_norm, c.hidden_size, c.rms_norm_eps);
    Ok(cross_entropy::logits(&xf, lm_head(model), Precision::F32))
}

/// How a training step runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    /// The gradients computed are those of grad_scale · Σ loss.
    pub grad_scale: f32,
    /// Keep only each decoder layer's input in the forward and recompute the layer in the backward.
    pub checkpoint: bool,
    /// Arithmetic of the frozen-weight products.
    pub precision: Precision,
}

/// Forward over one sequence; with `grads`, also the backward, adding ∂(grad_scale · loss_sum)/∂θ into
/// `grads` for every LoRA matrix. `dropout_rng` enables LoRA dropout (training): one seed is drawn from
/// it per call, from which every mask of the sequence follows. None disables dropout.
pub fn forward_backward(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    grads: Option<&mut LoraAdapter>,
    seq: &Sequence,
    grad_scale: f32,
    dropout_rng: Option<&mut Rng>,
) -> Result<StepLoss> {
    let options = StepOptions {
        grad_scale,
        checkpoint: false,
        precision: Precision::F32,
    };
    forward_backward_with(model, adapter, grads, seq, options, dropout_rng)
}

/// `forward_backward` with every option.
pub fn forward_backward_with(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    grads: Option<&mut LoraAdapter>,
    seq: &Sequence,
    options: StepOptions,
    dropout_rng: Option<&mut Rng>,
) -> Result<StepLoss> {
    on_worker(|| step_on_worker(model, adapter, grads, seq, options, dropout_rng))
}

/// Runs `f` on one of rayon's worker threads. From outside the pool, each of a step's thousands of
/// parallel operations parks the calling thread and wakes every worker; the serial code between them
/// then competes for the cores with workers spinning for work. Inside the pool the caller takes part
/// in each operation and only one worker is idle during serial code.
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

fn step_on_worker(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    mut grads: Option<&mut LoraAdapter>,
    seq: &Sequence,
    options: StepOptions,
    dropout_rng: Option<&mut Rng>,
) -> Result<StepLoss> {
    let grad_scale = options.grad_scale;
    seq.check(model.config.vocab_size)?;
    let h = model.config.hidden_size;
    let ctx = context_at(
        model,
        adapter,
        dropout_rng.map(|r| r.next_u64()),
        &seq.positions(),
        seq.is_packed().then(|| seq.segments()),
        options.precision,
    );
    let (xf, kept, x_last, inv_f) = decoder_forward(&ctx, &seq.ids, options.checkpoint)?;
    let positions: Vec<usize> = (0..seq.ids.len())
        .filter(|&t| seq.targets[t].is_some())
        .collect();
    let labels: Vec<u32> = positions
        .iter()
        .map(|&t| seq.targets[t].expect("filtered"))
        .collect();
    let hidden: Vec<f32> = positions
        .iter()
        .flat_map(|&t| xf[t * h..(t + 1) * h].iter().copied())
        .collect();
    if grads.is_none() || positions.is_empty() {
        let (losses, _) =
            cross_entropy::forward(&hidden, lm_head(model), &labels, options.precision);
        return Ok(StepLoss {
            loss_sum: losses.iter().map(|&l| l as f64).sum(),
            targets: positions.len(),
        });
    }
    // The loss and its gradient in one pass over the vocabulary.
    let (losses, d_hidden) = cross_entropy::forward_backward(
        &hidden,
        lm_head(model),
        &labels,
        grad_scale,
        options.precision,
    );
    let loss = StepLoss {
        loss_sum: losses.iter().map(|&l| l as f64).sum(),
        targets: positions.len(),
    };
    let mut dxf = zeros(xf.len());
    for (i, &t) in positions.iter().enumerate() {
        dxf[t * h..(t + 1) * h].copy_from_slice(&d_hidden[i * h..(i + 1) * h]);
    }
    let mut dx = rms_backward(
        &x_last,
        &model.final_norm,
        &inv_f,
        &dxf,
        h,
        model.config.rms_norm_eps,
    );
    for (l, layer) in model.layers.iter().enumerate().rev() {
        dx = match &kept[l] {
            Kept::Full(saved) => ctx.layer_backward(l, layer, saved, dx, &mut grads),
            Kept::Checkpoint(x) => {
                let (_, saved) = ctx.layer_forward(l, layer, x.clone(), None);
                ctx.layer_backward(l, layer, &saved, dx, &mut grads)
            }
        };
    }
    Ok(loss)
}
