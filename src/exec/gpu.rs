//! The GPU executor: records a graph's nodes, in order, into one command encoder with the WGSL kernels
//! of shaders/. Transient buffers come from the device's scratch pool at their first write (zeroed) and
//! go back to it after their last use, so a later node reuses them; only results are read back.
//! Each op's lowering (its kernels' entry points, uniforms, bindings, workgroups) lives beside its CPU
//! kernel in `ops/`, executor-specific ones included: weights split in row blocks across storage
//! bindings, the vocabulary walked chunk by chunk inside those blocks, attention walked in passes under
//! a device's loop budget.

use crate::config::ModelConfig;
use crate::cpu::{Sequence, StepLoss};
use crate::error::{Error, Result};
use crate::gpu::weights::{GpuDense, GpuLinear, GpuLora, GpuModel, GpuTensor, GpuWeights};
use crate::gpu::{Gpu, GpuBuffer};
use crate::graph::{Graph, InputValue, Node, Op, Role, StepInputs};
use crate::lora::Factor;
use crate::models::decoder::{self, LoraSpec, StepShape};
use crate::ops::adamw::AdamWParams;
use crate::ops::cross_entropy::VOCAB_CHUNK;
use crate::ops::dropout::DropoutParams;
use crate::ops::matmul::{self, GpuView};
use crate::ops::rmsnorm::{self, RmsNormParams};
use crate::ops::{
    self, attention, conv, cross_entropy, dora, glu, linear, modulate, moe, rope, token_rows,
};
use std::collections::HashMap;

/// Activations are one buffer each, bound whole: the widest, [tokens, the widest of the hidden size,
/// the MLP's intermediate size, the query width and a vocabulary chunk] in f32, must fit one storage
/// binding. Checked before anything is recorded, so that a sequence too long for the device is an
/// error that says what to change, not a failure inside wgpu.
fn check_activation_bindings(gpu: &Gpu, c: &ModelConfig, tokens: usize) -> Result<()> {
    // Phi-3's fused projections are wider: q, k and v in one buffer, gate and up in another.
    let widest_layer = |width: &dyn Fn(usize) -> usize| (0..c.num_layers).map(width).max();
    // A shared expert (Qwen2-MoE) runs in the MLP's chunks too.
    let mlp = widest_layer(&|l| c.mlp_width(l))
        .unwrap_or(0)
        .max(c.shared_expert_width());
    let (qkv, gate_up) = match c.fused_projections {
        true => (widest_layer(&|l| c.q_dim(l) + 2 * c.kv_dim(l)), 2 * mlp),
        false => (widest_layer(&|l| c.q_dim(l)), mlp),
    };
    let qkv = qkv.unwrap_or(0);
    // Gemma 4's per-layer inputs: every layer's slice in one buffer.
    let per_layer = c.per_layer_inputs.map_or(0, |p| c.num_layers * p.width);
    // A mixture's experts keep every (token, choice) slot's rows, as wide as the hidden size or an
    // expert's intermediate size.
    let experts = c
        .moe
        .as_ref()
        .map_or(0, |m| m.top_k * c.hidden_size.max(m.inter));
    let widest = c
        .hidden_size
        .max(qkv)
        .max(per_layer)
        .max(experts)
        .max(VOCAB_CHUNK.min(c.vocab_size));
    // The MLP's buffers are as long as a chunk of the sequence (`decoder::MLP_CHUNK`).
    let mlp_rows = tokens.min(decoder::MLP_CHUNK);
    let bytes = (tokens * widest).max(mlp_rows * gate_up) as u64 * 4;
    let limit = gpu.device_binding_limit();
    if bytes <= limit {
        return Ok(());
    }
    let most = (limit / (widest as u64 * 4)).min(limit / (gate_up as u64 * 4));
    Err(Error::Invalid(format!(
        "a {tokens}-token sequence needs activation buffers of {bytes} bytes ({tokens} x {widest} \
         floats), over this GPU's storage binding limit of {limit} bytes: use sequences of at most \
         {most} tokens (--max-length) or the CPU executor (--device cpu)"
    )))
}

/// Refuses a graph with a buffer larger than the device binds (decoders check first, naming the sequence
/// length that fits).
fn check_buffer_bindings(gpu: &Gpu, graph: &Graph, tokens: usize) -> Result<()> {
    let limit = gpu.device_binding_limit();
    let Some((name, bytes)) = widest_binding(graph).filter(|(_, bytes)| *bytes > limit) else {
        return Ok(());
    };
    Err(Error::Invalid(format!(
        "a step of {tokens} tokens needs a buffer of {bytes} bytes ({name}), over this GPU's \
         storage binding limit of {limit} bytes: use a shorter input or the CPU executor (--device \
         cpu)"
    )))
}

/// The largest buffer the GPU binds to run `graph`: its name and bytes.
pub fn widest_binding(graph: &Graph) -> Option<(&str, u64)> {
    graph
        .bufs
        .iter()
        .filter(|b| b.role.is_transient() && !b.role.in_host_memory())
        .max_by_key(|b| b.len)
        .map(|b| (b.name.as_str(), b.len as u64 * 4))
}

/// How one sequence's step is recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct SequenceOptions {
    /// The gradients computed are those of grad_scale · Σ loss.
    pub grad_scale: f32,
    /// Keep only each decoder layer's input and recompute the layer in the backward.
    pub checkpoint: bool,
    /// How each layer's input is kept until then.
    pub checkpoints: crate::graph::checkpoint::Keep,
    /// LoRA dropout: the seed of the sequence's masks and the probability (None: no dropout).
    pub dropout: Option<(u64, f32)>,
    /// How each token's loss counts.
    pub loss_type: crate::ops::cross_entropy::LossType,
    /// NEFTune: the seed of the noise on the embeddings (dropout's, where both are on) and its
    /// half-width (None: no noise).
    pub noise: Option<(u64, f32)>,
    /// Where DoRA's factors come from (`record_sequence_keeping` keeps them between the
    /// micro-batches of an optimizer step).
    pub dora_factors: crate::models::decoder::FactorSource,
}

/// The sums of a sequence's `TokenLoss` rows, as `record_sequence` leaves them.
pub fn sequence_loss(result: &[f32]) -> StepLoss {
    StepLoss::of_rows(result)
}

fn lora_tensors(lora: Option<&GpuLora>) -> HashMap<(&str, Factor), &GpuBuffer> {
    lora.map_or_else(HashMap::new, |l| {
        l.tensors
            .iter()
            .map(|((path, f), b)| ((path.as_str(), *f), b))
            .collect()
    })
}

#[derive(Default)]
enum Slot<'a> {
    #[default]
    Empty,
    /// A scratch buffer of this step (returned to the pool when dropped).
    Own(GpuBuffer),
    /// A buffer that outlives the step: a LoRA matrix or gradient, a norm or bias vector.
    Ext(&'a GpuBuffer),
    Tensor(&'a GpuTensor),
}

impl Slot<'_> {
    fn buf(&self) -> &GpuBuffer {
        match self {
            Slot::Own(b) => b,
            Slot::Ext(b) => b,
            Slot::Tensor(GpuTensor::Vector(b)) => b,
            _ => panic!("graph: a buffer read as a vector holds a matrix or nothing"),
        }
    }

    fn linear(&self) -> &GpuLinear {
        match self {
            Slot::Tensor(GpuTensor::Linear(l)) => l,
            _ => panic!("graph: a linear's weight is not a linear weight"),
        }
    }

    fn table(&self) -> &GpuDense {
        match self {
            Slot::Tensor(GpuTensor::Table(t)) => t,
            _ => panic!("graph: a table is not a dense matrix"),
        }
    }
}

/// What a graph reads from outside on the GPU.
pub struct Bindings<'a> {
    pub gpu: &'a Gpu,
    pub model: &'a GpuWeights,
    pub lora: Option<&'a GpuLora>,
    pub grads: Option<&'a GpuLora>,
    /// The keys and values of the positions decoded so far (decoding graphs), with room for this
    /// step's.
    pub cache: Option<&'a GpuKvCache>,
    /// AdamW's first and second moments (optimizer graphs; `lora` is updated in place).
    pub moments: Option<[&'a GpuLora; 2]>,
    pub inputs: &'a StepInputs,
}

/// The result buffers a recorded graph leaves (`Role::Output`), by name, to read back after submission.
#[derive(Default)]
pub struct Recorded(pub HashMap<String, GpuBuffer>);

impl Recorded {
    /// The output `name`, if the graph has it.
    pub fn take(&mut self, name: &str) -> Option<GpuBuffer> {
        self.0.remove(name)
    }
}

/// Records `graph` into `enc`.
pub fn record(graph: &Graph, bind: Bindings, enc: &mut wgpu::CommandEncoder) -> Result<Recorded> {
    let tokens = bind.inputs.ids.len();
    check_buffer_bindings(bind.gpu, graph, tokens)?;
    if !bind.gpu.can_offload() && graph.bufs.iter().any(|b| b.role.in_host_memory()) {
        return Err(Error::Invalid(format!(
            "GPU {} cannot keep buffers in host memory: offloaded checkpoints need a native \
             Vulkan, DX12 or Metal device; keep them on the device",
            bind.gpu.info.name
        )));
    }
    let params = lora_tensors(bind.lora);
    let grads = lora_tensors(bind.grads);
    let moments = bind
        .moments
        .map(|[m, v]| [lora_tensors(Some(m)), lora_tensors(Some(v))]);
    let missing = |what: &str, name: &str| {
        Error::Invalid(format!("the step needs {what} {name}, which is not loaded"))
    };
    let mut slots = Vec::with_capacity(graph.bufs.len());
    for desc in &graph.bufs {
        let slot = match &desc.role {
            Role::Weight(name) => Slot::Tensor(
                bind.model
                    .tensors
                    .get(name)
                    .ok_or_else(|| missing("the model tensor", name))?,
            ),
            Role::Lora { path, factor } => Slot::Ext(
                params
                    .get(&(path.as_str(), *factor))
                    .ok_or_else(|| missing("a LoRA adapter for", path))?,
            ),
            Role::LoraGrad { path, factor } => Slot::Ext(
                grads
                    .get(&(path.as_str(), *factor))
                    .ok_or_else(|| missing("a LoRA gradient for", path))?,
            ),
            Role::Input(input) => Slot::Own(match bind.inputs.value(*input) {
                InputValue::U32(v) => bind.gpu.upload_u32(&v),
                InputValue::F32(v) => bind.gpu.upload_f32(&v),
            }),
            Role::Moment {
                path,
                factor,
                second,
            } => Slot::Ext(
                moments
                    .as_ref()
                    .and_then(|m| m[usize::from(*second)].get(&(path.as_str(), *factor)))
                    .ok_or_else(|| missing("the AdamW moments for", path))?,
            ),
            Role::DoraFactors(path) => Slot::Ext(
                bind.cache
                    .and_then(|cache| cache.dora.get(path))
                    .ok_or_else(|| missing("the kept DoRA factors of", path))?,
            ),
            Role::KvCache { layer, values } => {
                let cache = bind
                    .cache
                    .ok_or_else(|| missing("a KV cache for layer", &layer.to_string()))?;
                let (k, v, _) = &cache.layers[*layer];
                Slot::Ext(if *values { v } else { k })
            }
            Role::Given(name) => Slot::Own(
                bind.gpu.upload_f32(
                    bind.inputs
                        .given
                        .get(name)
                        .ok_or_else(|| missing("the value", name))?,
                ),
            ),
            Role::Activation | Role::Offloaded | Role::Output(_) => Slot::Empty,
        };
        slots.push(slot);
    }
    let last_use = graph.last_use();
    let placement = crate::graph::pool::place(graph);
    let homes = bind.gpu.homes(&placement.capacities);
    let homes = Homes {
        of: &placement.home,
        buffers: &homes,
    };
    let outer = std::mem::replace(enc, bind.gpu.encoder());
    let mut r = Recorder {
        gpu: bind.gpu,
        enc: outer,
        dummy: &bind.model.dummy,
        inputs: bind.inputs,
        temporaries: Vec::new(),
    };
    let mut recorded = Recorded::default();
    for (i, node) in graph.nodes.iter().enumerate() {
        r.temporaries = placement.temporaries[i]
            .iter()
            .map(|&h| homes.buffers[h].tenant(placement.capacities[h]))
            .collect();
        r.gpu.set_profile_scope(Some(&node.op));
        let recorded_node = record_node(&mut r, graph, node, &mut slots, &homes);
        r.gpu.set_profile_scope(None);
        recorded_node?;
        for b in node.reads().chain(node.outputs.iter().copied()) {
            if last_use[b] == Some(i) {
                let slot = std::mem::replace(&mut slots[b], Slot::Empty);
                match (&graph.bufs[b].role, slot) {
                    (Role::Output(name), Slot::Own(buf)) => {
                        recorded.0.insert(name.clone(), buf);
                    }
                    (_, slot) if !graph.bufs[b].role.is_transient() => slots[b] = slot,
                    _ => {}
                }
            }
        }
    }
    *enc = r.enc;
    Ok(recorded)
}

/// What an op's GPU lowering (beside its CPU kernel in `ops`) records into: the device, the step's
/// command encoder, a buffer bound where a kernel's optional input is absent, and the step's inputs.
pub(crate) struct Recorder<'a> {
    pub(crate) gpu: &'a Gpu,
    pub(crate) enc: wgpu::CommandEncoder,
    pub(crate) dummy: &'a GpuBuffer,
    pub(crate) inputs: &'a StepInputs,
    /// The homes planned for the temporaries of the node being recorded (`graph::pool::place`).
    temporaries: Vec<GpuBuffer>,
}

impl Recorder<'_> {
    /// Records one dispatch of `entry` with uniform `params` and the buffers at their bindings.
    pub(crate) fn dispatch<P: bytemuck::Pod>(
        &mut self,
        entry: &'static str,
        params: &P,
        buffers: &[(u32, &GpuBuffer)],
        groups: [u32; 3],
    ) {
        self.gpu
            .dispatch(&mut self.enc, entry, params, buffers, groups);
    }

    /// A zeroed scratch buffer of `len` words for the node being recorded: the smallest of its
    /// planned homes that holds them, else one from the pool (back to it when dropped).
    pub(crate) fn scratch(&mut self, len: usize) -> GpuBuffer {
        let words = |b: &GpuBuffer| (b.buffer.size() / 4) as usize;
        let planned = (0..self.temporaries.len())
            .filter(|&i| words(&self.temporaries[i]) >= len)
            .min_by_key(|&i| words(&self.temporaries[i]));
        match planned {
            Some(i) => self
                .temporaries
                .swap_remove(i)
                .cleared_tenant(&mut self.enc, len),
            None => self.gpu.scratch(&mut self.enc, len),
        }
    }
}

/// The device buffers a graph's activations live in (`graph::pool::place`), held while it is recorded.
struct Homes<'h> {
    of: &'h [Option<usize>],
    buffers: &'h [GpuBuffer],
}

/// A node's outputs, taken out of their slots while it is recorded.
struct Outs<'a, 'h> {
    slots: Vec<Slot<'a>>,
    lens: Vec<usize>,
    /// Which of them live in host memory (`Role::Offloaded`).
    on_host: Vec<bool>,
    /// The home of each activation among them.
    homes: Vec<Option<&'h GpuBuffer>>,
}

impl<'a> Outs<'a, '_> {
    fn get(&mut self, r: &mut Recorder, i: usize) -> &GpuBuffer {
        if let Slot::Empty = self.slots[i] {
            let len = self.lens[i];
            let buffer = match (self.on_host[i], self.homes[i]) {
                (true, _) => r
                    .gpu
                    .host_scratch(len)
                    .expect("`record` checked that the device keeps buffers in host memory"),
                (false, Some(home)) => home.cleared_tenant(&mut r.enc, len),
                (false, None) => r.gpu.scratch(&mut r.enc, len),
            };
            self.slots[i] = Slot::Own(buffer);
        }
        self.slots[i].buf()
    }
}

/// A MoE op's experts: the stacked weights at inputs 3 and 4, and the LoRA pairs `lora` says it
/// has from input `first_pair` on.
fn gpu_experts<'i>(
    ins: &[&'i Slot],
    after: usize,
    (act, lora): (crate::config::GateActivation, &moe::MoeLora),
    shape: &moe::MoeShape,
) -> moe::GpuExperts<'i> {
    let mut next = shape.pairs_at(after);
    let [gate_up_lora, down_lora] = lora.stacks().map(|stack| {
        stack.map(|(rank, scale)| {
            let pairs = moe::GpuExpertPairs {
                a: ins[next].buf(),
                b: ins[next + 1].buf(),
                rank,
                scale,
            };
            next += 2;
            pairs
        })
    });
    moe::GpuExperts {
        gate_up: ins[3].linear(),
        down: ins[4].linear(),
        biases: shape
            .biased
            .then(|| [ins[after + 1].buf(), ins[after + 2].buf()]),
        act,
        gate_up_lora,
        down_lora,
    }
}

/// Records one node with the lowering of its op.
fn record_node(
    r: &mut Recorder,
    graph: &Graph,
    node: &Node,
    slots: &mut [Slot],
    homes: &Homes,
) -> Result<()> {
    let (taken, lens) = node.take_outputs(graph, slots);
    let on_host = node
        .outputs
        .iter()
        .map(|&o| graph.bufs[o].role.in_host_memory())
        .collect();
    let mut outs = Outs {
        slots: taken,
        lens,
        on_host,
        homes: node
            .outputs
            .iter()
            .map(|&o| homes.of[o].map(|h| &homes.buffers[h]))
            .collect(),
    };
    // Every output exists before the inputs are borrowed.
    for i in 0..outs.slots.len() {
        outs.get(r, i);
    }
    let ins: Vec<&Slot> = node.inputs.iter().map(|&i| &slots[i]).collect();
    let o = |i: usize| outs.slots[i].buf();
    let x = |i: usize| ins[i].buf();
    let acc = node.accumulate;
    let dropout =
        |n: usize, stream: u32, p: f32| DropoutParams::new(n, r.inputs.dropout_seed, stream, p);
    match &node.op {
        Op::Embed { dim } => match ins[1] {
            Slot::Tensor(GpuTensor::HostTable(table)) => {
                let ids = match graph.bufs[node.inputs[0]].role {
                    Role::Input(input) => match r.inputs.value(input) {
                        crate::graph::InputValue::U32(ids) => ids,
                        _ => panic!("graph: token ids are not integers"),
                    },
                    _ => panic!("graph: a host table is read at ids the graph computes"),
                };
                let mut rows = vec![0f32; ids.len() * dim];
                for (row, &id) in rows.chunks_mut(*dim).zip(ids.iter()) {
                    if id as usize >= table.rows {
                        return Err(Error::Invalid(format!(
                            "token id {id} is outside the embedding's {} rows",
                            table.rows
                        )));
                    }
                    table.row_f32(id as usize, row);
                }
                // Uploaded to a buffer of its own: a write into the output itself would land before
                // the whole submission, under whatever an earlier graph in it leaves there.
                let staged = r.gpu.upload_f32(&rows);
                let bytes = (rows.len() * 4) as u64;
                r.enc
                    .copy_buffer_to_buffer(&staged.buffer, 0, &o(0).buffer, 0, bytes);
            }
            _ => ops::record_embed(r, ins[1].table(), x(0), o(0), *dim),
        },
        Op::RmsNorm { dim, eps, offset } => {
            let p = RmsNormParams::new(x(0).len / dim, *dim, *eps, *offset);
            // No weight input: a zero one (Gemma 4's v_norm, offset 1).
            let zeros = (ins.len() == 1).then(|| r.gpu.zeros(*dim));
            let weight = zeros.as_ref().unwrap_or_else(|| x(1));
            rmsnorm::record_forward(r, &p, x(0), weight, o(0), o(1));
        }
        Op::RmsNormBackward { dim, eps, offset } => {
            let p = RmsNormParams::new(x(0).len / dim, *dim, *eps, *offset);
            let zeros = (ins.len() == 3).then(|| r.gpu.zeros(*dim));
            let (weight, rest) = match &zeros {
                Some(z) => (z, 1),
                None => (x(1), 2),
            };
            rmsnorm::record_backward(r, &p, [x(0), weight, x(rest), x(rest + 1)], o(0));
        }
        Op::Linear { .. } => {
            let bias = ins.get(2).map(|b| b.buf());
            linear::record_forward(r, ins[1].linear(), bias, x(0), o(0));
        }
        Op::LinearBackwardInput { .. } => {
            linear::record_backward_input(r, ins[1].linear(), x(0), o(0), acc)
        }
        Op::Matmul {
            m,
            n,
            k,
            a_t,
            b_t,
            alpha,
        } => matmul::record_matmul(
            r,
            GpuView::new(x(0), *m, *k, *a_t),
            GpuView::new(x(1), *k, *n, *b_t),
            *alpha,
            o(0),
            *n,
            acc,
            None,
        ),
        Op::DropoutMatmul {
            m,
            n,
            k,
            a_t,
            b_t,
            alpha,
            p,
            stream,
            side,
        } => {
            let masked_len = side.masked_len((*m, *n, *k));
            matmul::record_matmul(
                r,
                GpuView::new(x(0), *m, *k, *a_t),
                GpuView::new(x(1), *k, *n, *b_t),
                *alpha,
                o(0),
                *n,
                acc,
                Some((&dropout(masked_len, *stream, *p), *side)),
            )
        }
        Op::Dropout { p, stream } => {
            let d = dropout(x(0).len, *stream, *p);
            ops::dropout::record_forward(r, &d, x(0), o(0));
        }
        Op::DropoutBackward { p, stream } => {
            assert!(acc, "dropout_backward accumulates into its output");
            let d = dropout(x(0).len, *stream, *p);
            ops::dropout::record_backward_accumulate(r, &d, x(0), o(0));
        }
        Op::Add => ops::record_add(r, x(0), (!acc).then(|| x(1)), o(0)),
        Op::PackBf16 => ops::bf16::record_pack(r, x(0), o(0), x(0).len),
        Op::UnpackBf16 => ops::bf16::record_unpack(r, x(0), o(0)),
        Op::CopyRows {
            dim,
            from,
            to,
            rows,
        } => {
            let word = |row: usize| (row * dim * 4) as u64;
            let (source, target) = (&x(0).buffer, &o(0).buffer);
            r.enc
                .copy_buffer_to_buffer(source, word(*from), target, word(*to), word(*rows));
        }
        Op::Rope {
            heads,
            head_dim,
            rotated,
            inverse,
            adjacent,
        } => rope::record_apply(
            r,
            o(0),
            (*heads, *head_dim, *rotated),
            [x(0), x(1)],
            *inverse,
            *adjacent,
        ),
        Op::LayerNormModulate {
            dim,
            eps,
            shift,
            scale,
        } => modulate::record_layernorm_modulate(
            r,
            [x(0), x(1)],
            (*dim, *eps),
            (*shift, *scale),
            [o(0), o(1)],
        ),
        Op::LayerNormModulateBackward { dim, eps, scale } => {
            let inputs = [x(0), x(1), x(2), x(3)];
            modulate::record_layernorm_modulate_backward(r, inputs, (*dim, *eps, *scale), o(0), acc)
        }
        Op::Gate { dim, chunk } => modulate::record_gate(r, x(0), (*dim, *chunk), x(1), o(0), acc),
        Op::Silu => modulate::record_silu(r, x(0), o(0)),
        Op::SigmoidGatedRows { dim } => {
            glu::record_sigmoid_gated_rows(r, [x(0), x(1)], o(0), *dim, acc)
        }
        Op::SigmoidGatedRowsBackward { dim } => {
            glu::record_sigmoid_gated_rows_backward(r, [x(0), x(1), x(2)], [o(0), o(1)], *dim)
        }
        Op::DoraFactors { rank, scale, .. } => linear::record_dora_factors(
            r,
            ins[0].linear(),
            (x(1), x(2), x(3)),
            (*rank, *scale),
            o(0),
        ),
        Op::DoraMagnitudeGrad { dim } => {
            dora::record_magnitude_grad(r, (x(0), x(1), x(2)), *dim, o(0), acc)
        }
        Op::Columns { width, offset, len } => {
            modulate::record_columns(r, x(0), o(0), (*width, *offset, *len), false, acc)
        }
        Op::PlaceColumns { width, offset, len } => {
            modulate::record_columns(r, x(0), o(0), (*width, *offset, *len), true, acc)
        }
        Op::Mse => {
            let grad = ins.get(2).map(|s| (s.buf(), o(1)));
            modulate::record_mse(r, [x(0), x(1)], o(0), grad);
        }
        Op::Glu { act } => glu::record_forward(r, *act, x(0), x(1), o(0)),
        Op::GluBackward { act } => glu::record_backward(r, *act, [x(0), x(1), x(2)], o(0), o(1)),
        Op::Scale { factor } => glu::record_scale(r, o(0), *factor),
        Op::UniformNoise => {
            let (seed, magnitude) = (r.inputs.dropout_seed, r.inputs.noise_magnitude);
            let params = DropoutParams::noise(o(0).len, seed, magnitude);
            ops::dropout::record_uniform_noise(r, &params, o(0));
        }
        Op::ScaleRows { dim } => glu::record_scale_rows(r, x(0), o(0), *dim),
        Op::Conv2d { shape } => {
            let bias = ins.get(2).map(|b| b.buf());
            conv::record_conv2d(r, shape, x(0), (ins[1].linear(), bias), o(0));
        }
        Op::GroupNorm {
            channels,
            groups,
            eps,
            silu,
        } => conv::record_group_norm(
            r,
            x(0),
            (*channels, *groups, *eps),
            (x(1), x(2)),
            *silu,
            o(0),
        ),
        Op::Attention { shape } => {
            let at = shape.masks_at();
            let masks = (
                ins.get(at).map(|s| s.buf()),
                ins.get(at + 1).map(|s| s.buf()),
                shape.sinks.then(|| x(3)),
            );
            attention::record_forward(r, shape, [x(0), x(1), x(2)], masks, o(0), o(1));
        }
        Op::CachedAttention { shape, past } => attention::record_forward_cached(
            r,
            shape,
            *past,
            [x(0), x(1), x(2)],
            (
                ins.get(shape.masks_at()).map(|s| s.buf()),
                shape.sinks.then(|| x(3)),
            ),
            o(0),
            [o(1), o(2)],
        ),
        Op::AttentionBackward { .. } if ins.len() > 7 => {
            return Err(Error::Invalid(
                "the backward of attention over padded sequences runs on the CPU executor only"
                    .into(),
            ));
        }
        Op::AttentionBackward { shape } => {
            let first_key = ins.get(6).map(|s| s.buf());
            let ins6 = [x(0), x(1), x(2), x(3), x(4), x(5)];
            attention::record_backward(r, shape, ins6, first_key, [o(0), o(1), o(2)]);
        }
        Op::GatherRows { dim } => ops::record_rows(r, "gather_rows", x(0), x(1), o(0), *dim),
        Op::EmbeddingRowsGrad {
            dim,
            scale,
            token_ids,
        } => {
            assert!(acc, "embedding_rows_grad accumulates into its output");
            let ids = (x(0), x(1));
            token_rows::record_embedding_rows_grad(r, ids, token_ids, (*dim, *scale), o(0));
        }
        Op::OutputRowsGrad {
            softcap, token_ids, ..
        } => {
            assert!(acc, "output_rows_grad accumulates into its output");
            let ins3 = (x(0), x(2), x(3));
            token_rows::record_output_rows_grad(r, ins[1].table(), ins3, token_ids, *softcap, o(0));
        }
        Op::ScatterRows { dim } => ops::record_rows(r, "scatter_rows", x(0), x(1), o(0), *dim),
        Op::CrossEntropy { softcap, .. } => {
            cross_entropy::record(r, ins[1].table(), x(0), x(2), o(0), None, *softcap)
        }
        Op::CrossEntropyWithGrad { softcap, .. } => {
            cross_entropy::record(r, ins[1].table(), x(0), x(2), o(0), Some(o(1)), *softcap)
        }
        Op::Logits { softcap, .. } => {
            cross_entropy::record_logits(r, ins[1].table(), x(0), o(0), *softcap)
        }
        Op::GradNorm { max_norm } => {
            let grads: Vec<&GpuBuffer> = ins.iter().map(|s| s.buf()).collect();
            ops::adamw::record_grad_norm(r, &grads, *max_norm, o(0));
        }
        Op::AdamW => {
            let params: AdamWParams = bytemuck::cast(r.inputs.adamw);
            ops::adamw::record_step(r, params, [o(0), o(1), o(2)], x(0), x(1));
        }
        Op::MoeRoute { shape, normalize } => {
            moe::record_route(r, (shape, *normalize), x(0), o(0), o(1))
        }
        Op::MoeRouteBackward { shape, normalize } => {
            let ins = [x(0), x(1), x(2)];
            moe::record_route_backward(r, (shape, *normalize), ins, o(0), acc)
        }
        Op::MoeExperts { shape, act, lora } => {
            let experts = gpu_experts(&ins, 4, (*act, lora), shape);
            moe::record_forward(r, [x(0), x(1), x(2)], &experts, shape, (o(0), acc))
        }
        Op::MoeExpertsBackward { shape, act, lora } => {
            let experts = gpu_experts(&ins, 5, (*act, lora), shape);
            let mut grads = (2..node.outputs.len()).step_by(2).map(|i| (o(i), o(i + 1)));
            let grads = lora.stacks().map(|stack| stack.and_then(|_| grads.next()));
            let ins = [x(0), x(1), x(2), x(5)];
            moe::record_backward(r, ins, &experts, shape, (o(0), o(1), acc), grads)
        }
    }
    drop(ins);
    node.put_back(slots, outs.slots);
    Ok(())
}

fn lora_spec(lora: &GpuLora, dropout: f32) -> LoraSpec {
    LoraSpec {
        tokens: lora.tokens.clone(),
        dropout,
        dora_factors: Default::default(),
        targets: lora.adapted.clone(),
    }
}

/// Records one sequence's forward (and with `grads` its backward, adding ∂(grad_scale · loss_sum)/∂θ
/// into the gradient buffers) into `enc`, through the decoder's graph. Returns the buffer of
/// per-position `TokenLoss` rows to read back, or None when no position carries a label.
pub fn record_sequence(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    grads: Option<&GpuLora>,
    seq: &Sequence,
    options: SequenceOptions,
    enc: &mut wgpu::CommandEncoder,
) -> Result<Option<GpuBuffer>> {
    record_sequence_in(gpu, model, (lora, grads), seq, options, enc, None)
}

/// `record_sequence`, DoRA's factors kept in `kept` (`options.dora_factors`): computed into it by a
/// step's first micro-batch and read by the others, recorded after it.
pub fn record_sequence_keeping(
    gpu: &Gpu,
    model: &GpuModel,
    (lora, grads): (Option<&GpuLora>, Option<&GpuLora>),
    seq: &Sequence,
    options: SequenceOptions,
    (enc, kept): (&mut wgpu::CommandEncoder, &mut GpuKvCache),
) -> Result<Option<GpuBuffer>> {
    record_sequence_in(gpu, model, (lora, grads), seq, options, enc, Some(kept))
}

fn record_sequence_in(
    gpu: &Gpu,
    model: &GpuModel,
    (lora, grads): (Option<&GpuLora>, Option<&GpuLora>),
    seq: &Sequence,
    options: SequenceOptions,
    enc: &mut wgpu::CommandEncoder,
    kept: Option<&mut GpuKvCache>,
) -> Result<Option<GpuBuffer>> {
    seq.check(model.config.vocab_size)?;
    check_activation_bindings(gpu, &model.config, seq.ids.len())?;
    if seq.target_count() == 0 {
        return Ok(None);
    }
    let (seed, p) = options.dropout.unwrap_or((0, 0.0));
    let spec = lora.map(|l| lora_spec(l, p).with_factors(options.dora_factors));
    let backward = grads.is_some();
    let noise = options.noise.filter(|_| backward);
    let shape = StepShape {
        checkpoints: options.checkpoints,
        noise: noise.is_some(),
        ..StepShape::of(
            seq,
            backward,
            options.dropout.is_some(),
            options.checkpoint && backward,
        )
    };
    let graph = decoder::cached(&model.config, spec.as_ref(), shape);
    let kept = kept.map(|kept| {
        kept.keep_dora_factors(gpu, &graph);
        &*kept
    });
    let seed = options.dropout.or(noise).map_or(seed, |(s, _)| s);
    let inputs = StepInputs {
        loss_type: options.loss_type,
        noise_magnitude: noise.map_or(0.0, |(_, m)| m),
        ..decoder::inputs(&model.config, seq, options.grad_scale, seed)
    };
    let bind = Bindings {
        gpu,
        model,
        lora,
        grads,
        cache: kept,
        moments: None,
        inputs: &inputs,
    };
    Ok(record(&graph, bind, enc)?.take("losses"))
}

/// Forward over one sequence and, with `grads`, the backward adding ∂(grad_scale · loss_sum)/∂θ into
/// the GPU gradient buffers; one submission, only the per-position losses read back.
pub async fn forward_backward_async(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    grads: Option<&GpuLora>,
    seq: &Sequence,
    grad_scale: f32,
) -> Result<StepLoss> {
    let options = SequenceOptions {
        grad_scale,
        ..SequenceOptions::default()
    };
    let mut enc = gpu.encoder();
    let Some(result) = record_sequence(gpu, model, lora, grads, seq, options, &mut enc)? else {
        return Ok(StepLoss::default());
    };
    let values = gpu.submit_and_read_async(enc, &[&result]).await?;
    Ok(sequence_loss(&values[0]))
}

#[cfg(not(target_arch = "wasm32"))]
pub fn forward_backward(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    grads: Option<&GpuLora>,
    seq: &Sequence,
    grad_scale: f32,
) -> Result<StepLoss> {
    pollster::block_on(forward_backward_async(
        gpu, model, lora, grads, seq, grad_scale,
    ))
}

/// Logits [tokens, vocab] (small models and parity tests).
pub async fn logits_async(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    ids: &[u32],
) -> Result<Vec<f32>> {
    let seq = Sequence::all_tokens(ids.to_vec());
    seq.check(model.config.vocab_size)?;
    let shape = StepShape {
        logits: true,
        ..StepShape::of(&seq, false, false, false)
    };
    let spec = lora.map(|l| lora_spec(l, 0.0));
    let graph = decoder::cached(&model.config, spec.as_ref(), shape);
    let inputs = decoder::inputs(&model.config, &seq, 0.0, 0);
    let mut enc = gpu.encoder();
    let bind = Bindings {
        gpu,
        model,
        lora,
        grads: None,
        cache: None,
        moments: None,
        inputs: &inputs,
    };
    let logits = record(&graph, bind, &mut enc)?
        .take("logits")
        .expect("a logits graph leaves logits");
    Ok(gpu.submit_and_read_async(enc, &[&logits]).await?.remove(0))
}

#[cfg(not(target_arch = "wasm32"))]
pub fn logits(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    ids: &[u32],
) -> Result<Vec<f32>> {
    pollster::block_on(logits_async(gpu, model, lora, ids))
}

/// Keys and values of every decoded position, per layer (after RoPE), in GPU buffers that grow as
/// decoding goes on.
pub struct GpuKvCache {
    /// Per layer: keys, values, and their width per position.
    layers: Vec<(GpuBuffer, GpuBuffer, usize)>,
    /// Positions held.
    len: usize,
    /// Positions the buffers have room for.
    capacity: usize,
    /// DoRA's factors by module path, from the first step on (`Role::DoraFactors`).
    dora: HashMap<String, GpuBuffer>,
}

impl GpuKvCache {
    pub fn new(gpu: &Gpu, model: &GpuModel) -> Self {
        let c = &model.config;
        GpuKvCache {
            // A layer sharing another's keys and values keeps none of its own.
            layers: (0..c.num_layers)
                .map(|l| match c.layers[l].kv_from {
                    Some(_) => 0,
                    None => c.kv_dim(l),
                })
                .map(|kv_dim| (gpu.zeros(1), gpu.zeros(1), kv_dim))
                .collect(),
            len: 0,
            capacity: 0,
            dora: HashMap::new(),
        }
    }

    /// Room for the DoRA factors that `graph` computes and keeps (`FactorSource::ComputeAndKeep`).
    fn keep_dora_factors(&mut self, gpu: &Gpu, graph: &Graph) {
        for (id, desc) in graph.bufs.iter().enumerate() {
            if let Role::DoraFactors(path) = &desc.role
                && graph.nodes.iter().any(|n| n.outputs.contains(&id))
            {
                self.dora.insert(path.clone(), gpu.zeros(desc.len));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it holds DoRA's factors (a step has computed them into it).
    pub fn keeps_dora_factors(&self) -> bool {
        !self.dora.is_empty()
    }

    /// Forgets every position from `len` on (a conversation that diverges from what was decoded).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Room for `positions`, the buffers doubled (their contents copied) when they have less.
    fn reserve(&mut self, gpu: &Gpu, positions: usize) -> Result<()> {
        if positions <= self.capacity {
            return Ok(());
        }
        let capacity = positions.max(2 * self.capacity).max(64);
        let widest = self.layers.iter().map(|l| l.2).max().unwrap_or(0);
        let bytes = (capacity * widest * 4) as u64;
        let limit = gpu.device_binding_limit();
        if bytes > limit {
            return Err(Error::Invalid(format!(
                "decoding {positions} positions needs KV cache buffers of {bytes} bytes, over this GPU's \
                 storage binding limit of {limit} bytes: shorten the conversation or decode on the CPU \
                 (--device cpu)"
            )));
        }
        let mut enc = gpu.encoder();
        for (k, v, kv_dim) in &mut self.layers {
            let held = (self.len * *kv_dim * 4) as u64;
            for old in [k, v] {
                let new = gpu.zeros(capacity * *kv_dim);
                if held > 0 {
                    enc.copy_buffer_to_buffer(&old.buffer, 0, &new.buffer, 0, held);
                }
                *old = new;
            }
        }
        gpu.submit(enc);
        self.capacity = capacity;
        Ok(())
    }
}

/// Feeds `ids` at the positions after those in `cache` (adding theirs to it) and returns the logits
/// [vocab] of the last one: one submission, the logits read back.
pub async fn decode_async(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    cache: &mut GpuKvCache,
    ids: &[u32],
) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::Invalid("nothing to decode".into()));
    }
    crate::cpu::check_tokens(ids, model.config.vocab_size)?;
    check_activation_bindings(gpu, &model.config, ids.len())?;
    let past = cache.len;
    cache.reserve(gpu, past + ids.len())?;
    let spec = lora.map(|l| lora_spec(l, 0.0));
    let graph = decoder::cached(
        &model.config,
        spec.as_ref(),
        StepShape::decode(ids.len(), past),
    );
    cache.keep_dora_factors(gpu, &graph);
    let inputs = decoder::decode_inputs(&model.config, ids, past);
    let mut enc = gpu.encoder();
    let bind = Bindings {
        gpu,
        model,
        lora,
        grads: None,
        cache: Some(cache),
        moments: None,
        inputs: &inputs,
    };
    let logits = record(&graph, bind, &mut enc)?
        .take("logits")
        .expect("a decoding graph leaves logits");
    let values = gpu.submit_and_read_async(enc, &[&logits]).await?.remove(0);
    cache.len = past + ids.len();
    Ok(values)
}

#[cfg(not(target_arch = "wasm32"))]
pub fn decode(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    cache: &mut GpuKvCache,
    ids: &[u32],
) -> Result<Vec<f32>> {
    pollster::block_on(decode_async(gpu, model, lora, cache, ids))
}
