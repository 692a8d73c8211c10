//! The CPU executor: walks a graph's nodes in order with the kernels of `ops`, allocating each
//! transient buffer at its first write and releasing it after its last use.

use crate::config::GateActivation;
use crate::cpu::{Sequence, StepLoss, StepOptions};
use crate::error::{Error, Result};
use crate::exec::profile;
use crate::graph::{BufId, Dtype, Graph, Input, InputValue, Node, Op, Role, StepInputs};
use crate::lora::{Factor, LoraAdapter, LoraPair};
use crate::model::{DenseTensor, LinearWeight, Model, TensorRef};
use crate::models::decoder::{self, LoraSpec, StepShape};
use crate::ops::adamw::{self, AdamWParams};
use crate::ops::bf16_gemm::PackedRows;
use crate::ops::dropout::{self, DropoutParams};
use crate::ops::matmul::{View, matmul_into};
use crate::ops::rmsnorm::{self, RmsNormParams};
use crate::ops::{
    self, Precision, attention, conv, cross_entropy, dora, glu, linear, modulate, moe, rope,
    token_rows, zeros,
};
use crate::rng::Rng;
use std::collections::HashMap;

/// A buffer while the graph runs.
#[derive(Default)]
enum Slot<'a> {
    /// Not written yet, or released.
    #[default]
    Empty,
    F32(Vec<f32>),
    U32(Vec<u32>),
    Tensor(TensorRef<'a>),
    /// A LoRA matrix.
    Param(&'a [f32]),
    /// A LoRA matrix, its gradient or an AdamW moment, written in place.
    Mutable(&'a mut [f32]),
    /// A layer's cached keys or values, appended to while decoding.
    Cache(&'a mut Vec<f32>),
}

impl Slot<'_> {
    fn f32(&self) -> &[f32] {
        match self {
            Slot::F32(v) => v,
            Slot::Param(p) => p,
            Slot::Mutable(g) => g,
            Slot::Cache(c) => c,
            Slot::Tensor(TensorRef::Vector(v)) => v,
            _ => panic!("graph: a buffer read as f32 holds something else"),
        }
    }

    fn u32(&self) -> &[u32] {
        match self {
            Slot::U32(v) => v,
            _ => panic!("graph: a buffer read as u32 holds something else"),
        }
    }

    fn f32_mut(&mut self) -> &mut [f32] {
        match self {
            Slot::F32(v) => v,
            Slot::Mutable(g) => g,
            Slot::Cache(c) => c,
            _ => panic!("graph: a buffer written as f32 holds something else"),
        }
    }

    fn linear(&self) -> &LinearWeight {
        match self {
            Slot::Tensor(TensorRef::Linear(w)) => w,
            _ => panic!("graph: a linear's weight is not a linear weight"),
        }
    }

    fn table(&self) -> &DenseTensor {
        match self {
            Slot::Tensor(TensorRef::Table(t)) => t,
            _ => panic!("graph: a table is not a dense matrix"),
        }
    }
}

/// What a graph reads from outside and what it gives back.
pub struct Bindings<'a> {
    pub model: &'a dyn crate::model::FrozenWeights,
    pub adapter: Option<&'a LoraAdapter>,
    /// The LoRA gradients the backward adds into.
    pub grads: Option<&'a mut LoraAdapter>,
    /// The keys and values of the positions decoded so far (decoding graphs).
    pub cache: Option<&'a mut KvCache>,
    /// What an optimizer graph updates (`adapter` is then None: the matrices are read from here).
    pub optimizer: Option<OptimizerState<'a>>,
    pub inputs: &'a StepInputs,
    pub precision: Precision,
}

/// The LoRA matrices and AdamW's moments an optimizer graph updates in place.
pub struct OptimizerState<'a> {
    pub params: &'a mut LoraAdapter,
    pub m: &'a mut LoraAdapter,
    pub v: &'a mut LoraAdapter,
}

/// The results a graph produced (`Role::Output`), by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outputs(pub HashMap<String, Vec<f32>>);

impl Outputs {
    /// The output `name`; empty when the graph has none.
    pub fn take(&mut self, name: &str) -> Vec<f32> {
        self.0.remove(name).unwrap_or_default()
    }
}

/// Each trained tensor of an adapter by module path and factor, each to be bound once.
type GradSlots<'a> = HashMap<(String, Factor), &'a mut [f32]>;

fn grad_slots(grads: Option<&mut LoraAdapter>) -> GradSlots<'_> {
    let Some(grads) = grads else {
        return HashMap::new();
    };
    grads
        .trained_mut()
        .flat_map(|(path, p)| {
            let LoraPair {
                a,
                b,
                magnitude,
                rows,
                ..
            } = p;
            [
                (Factor::A, a),
                (Factor::B, b),
                (Factor::Magnitude, magnitude),
                (Factor::Rows, rows),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(move |(f, v)| ((path.to_string(), f), v.as_mut_slice()))
        })
        .collect()
}

/// Runs `graph` with `bind`. The graph must come from a builder for this model (`models::decoder`):
/// a tensor, adapter or input it names that `bind` lacks is an error.
pub fn run(graph: &Graph, bind: Bindings) -> Result<Outputs> {
    on_worker(move || run_here(graph, bind))
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

fn run_here(graph: &Graph, bind: Bindings) -> Result<Outputs> {
    let tensors: HashMap<String, TensorRef> = bind.model.named_tensors().into_iter().collect();
    let mut params: HashMap<String, &LoraPair> = HashMap::new();
    if let Some(a) = bind.adapter {
        params.extend(a.trained().map(|(path, p)| (path.to_string(), p)));
    }
    let optimizer_bound = bind.optimizer.is_some();
    let mut grads = grad_slots(bind.grads);
    let (mut mutable_params, mut moments) = (HashMap::new(), [HashMap::new(), HashMap::new()]);
    if let Some(opt) = bind.optimizer {
        mutable_params = grad_slots(Some(opt.params));
        moments = [grad_slots(Some(opt.m)), grad_slots(Some(opt.v))];
    }
    let mut caches: HashMap<(usize, bool), &mut Vec<f32>> = HashMap::new();
    let mut dora_factors: HashMap<&str, &mut Vec<f32>> = HashMap::new();
    if let Some(cache) = bind.cache {
        // The step that computes DoRA's factors keeps them (`FactorSource::ComputeAndKeep`).
        for (id, desc) in graph.bufs.iter().enumerate() {
            if let Role::DoraFactors(path) = &desc.role
                && graph.nodes.iter().any(|n| n.outputs.contains(&id))
            {
                cache.dora.insert(path.clone(), vec![0.0; desc.len]);
            }
        }
        for (l, layer) in cache.layers.iter_mut().enumerate() {
            caches.insert((l, false), &mut layer.k);
            caches.insert((l, true), &mut layer.v);
        }
        dora_factors = cache
            .dora
            .iter_mut()
            .map(|(path, v)| (path.as_str(), v))
            .collect();
    }
    let missing = |what: &str, name: &str| {
        Error::Invalid(format!("the step needs {what} {name}, which is not loaded"))
    };
    let mut slots: Vec<Slot> = Vec::with_capacity(graph.bufs.len());
    for desc in &graph.bufs {
        let slot = match &desc.role {
            Role::Weight(name) => {
                let tensor = *tensors
                    .get(name)
                    .ok_or_else(|| missing("the model tensor", name))?;
                let values = match tensor {
                    TensorRef::Linear(w) => w.shape().0 * w.shape().1,
                    TensorRef::Table(t) => t.rows * t.cols,
                    TensorRef::Vector(v) => v.len(),
                };
                // A checkpoint whose tensor disagrees with its config is refused here, by name,
                // rather than failing inside a kernel.
                if values != desc.len {
                    return Err(Error::Invalid(format!(
                        "the model tensor {name} holds {values} values where the model's \
                         configuration needs {}",
                        desc.len
                    )));
                }
                Slot::Tensor(tensor)
            }
            Role::Lora { path, factor } if optimizer_bound => {
                let matrix = mutable_params
                    .remove(&(path.clone(), *factor))
                    .ok_or_else(|| missing("a LoRA adapter for", path))?;
                Slot::Mutable(matrix)
            }
            Role::Moment {
                path,
                factor,
                second,
            } => {
                let matrix = moments[usize::from(*second)]
                    .remove(&(path.clone(), *factor))
                    .ok_or_else(|| missing("the AdamW moments for", path))?;
                Slot::Mutable(matrix)
            }
            Role::Lora { path, factor } => {
                let values = params
                    .get(path)
                    .map(|pair| pair.factor(*factor))
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| missing("a LoRA adapter for", path))?;
                Slot::Param(values)
            }
            Role::LoraGrad { path, factor } => {
                let matrix = grads
                    .remove(&(path.clone(), *factor))
                    .ok_or_else(|| missing("a LoRA gradient for", path))?;
                Slot::Mutable(matrix)
            }
            Role::Input(input) => match bind.inputs.value(*input) {
                InputValue::U32(v) => Slot::U32(v.into_owned()),
                InputValue::F32(v) => Slot::F32(v.into_owned()),
            },
            Role::DoraFactors(path) => Slot::Cache(
                dora_factors
                    .remove(path.as_str())
                    .ok_or_else(|| missing("the kept DoRA factors of", path))?,
            ),
            Role::KvCache { layer, values } => Slot::Cache(
                caches
                    .remove(&(*layer, *values))
                    .ok_or_else(|| missing("the KV cache of layer", &layer.to_string()))?,
            ),
            Role::Given(name) => Slot::F32(
                bind.inputs
                    .given
                    .get(name)
                    .ok_or_else(|| missing("the value", name))?
                    .clone(),
            ),
            Role::Activation | Role::Offloaded | Role::Output(_) => Slot::Empty,
        };
        slots.push(slot);
    }
    check_inputs(graph, &slots)?;
    let last_use = graph.last_use();
    let last_linear_reader = last_linear_readers(graph);
    let mut exec = Exec {
        precision: bind.precision,
        packed: None,
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        // The CPU clock is a system call: read outside the wall clock's window, which small
        // operations (a decoded token's) would otherwise count as theirs.
        let started =
            profile::enabled().then(|| (profile::process_cpu_time(), std::time::Instant::now()));
        exec.node(graph, node, &mut slots);
        if let Some((cpu, started)) = started {
            let took = started.elapsed();
            let cpu = cpu
                .zip(profile::process_cpu_time())
                .map(|(a, b)| b.saturating_sub(a));
            profile::CPU.add(&profile::op_name(&node.op), took, cpu);
        }
        if exec
            .packed
            .as_ref()
            .is_some_and(|(b, _)| last_linear_reader[*b] == Some(i))
        {
            exec.packed = None;
        }
        for b in node.reads().chain(node.outputs.iter().copied()) {
            if last_use[b] == Some(i) && graph.bufs[b].role.is_transient() {
                slots[b] = Slot::Empty;
            }
        }
    }
    let mut outputs = Outputs::default();
    for (desc, slot) in graph.bufs.iter().zip(slots) {
        if let (Role::Output(name), Slot::F32(v)) = (&desc.role, slot) {
            outputs.0.insert(name.clone(), v);
        }
    }
    Ok(outputs)
}

/// Token ids and labels inside the vocabulary (the embedding and the loss index with them).
fn check_inputs(graph: &Graph, slots: &[Slot]) -> Result<()> {
    for (b, desc) in graph.bufs.iter().enumerate() {
        if let Role::Input(Input::TokenIds | Input::Labels) = desc.role {
            let vocab = graph
                .nodes
                .iter()
                .find(|n| n.inputs.contains(&b))
                .and_then(|n| n.inputs.iter().find_map(|&i| table_rows(&slots[i])));
            if let (Some(vocab), Slot::U32(ids)) = (vocab, &slots[b]) {
                crate::cpu::check_tokens(ids, vocab)?;
            }
        }
        if slots[b].len_matches(desc).is_none() {
            return Err(Error::Invalid(format!(
                "the step's {} holds the wrong number of values",
                desc.name
            )));
        }
    }
    Ok(())
}

fn table_rows(slot: &Slot) -> Option<usize> {
    match slot {
        Slot::Tensor(TensorRef::Table(t)) => Some(t.rows),
        _ => None,
    }
}

impl Slot<'_> {
    /// Some(()) unless the slot holds an input whose length is not the buffer's.
    fn len_matches(&self, desc: &crate::graph::BufDesc) -> Option<()> {
        let len = match self {
            Slot::U32(v) => v.len(),
            Slot::F32(v) => v.len(),
            _ => return Some(()),
        };
        (len == desc.len && (desc.dtype == Dtype::U32) == matches!(self, Slot::U32(_)))
            .then_some(())
    }
}

/// For each buffer, the last node that reads it as a linear's input (the packed copy of it for the
/// bf16 products is kept until then).
fn last_linear_readers(graph: &Graph) -> Vec<Option<usize>> {
    let mut last = vec![None; graph.bufs.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        if let Op::Linear { .. } = node.op {
            last[node.inputs[0]] = Some(i);
        }
    }
    last
}

struct Exec {
    precision: Precision,
    /// A linear input packed for the bf16 products, shared by the linears that read it (q/k/v, gate/up).
    packed: Option<(BufId, PackedRows)>,
}

/// A node's outputs, taken out of their slots while it runs (its inputs stay borrowed in place).
struct Outs<'a> {
    slots: Vec<Slot<'a>>,
    lens: Vec<usize>,
}

impl Outs<'_> {
    /// Output `i` as a writable slice, zeros if it was not written before.
    fn get(&mut self, i: usize) -> &mut [f32] {
        if let Slot::Empty = self.slots[i] {
            self.slots[i] = Slot::F32(zeros(self.lens[i]));
        }
        self.slots[i].f32_mut()
    }

    /// Sets output `i` to `v`, a fresh result, when nothing was written to it yet.
    fn set(&mut self, i: usize, v: Vec<f32>) {
        match &mut self.slots[i] {
            Slot::Empty => self.slots[i] = Slot::F32(v),
            other => other.f32_mut().copy_from_slice(&v),
        }
    }
}

impl Exec {
    fn node<'a>(&mut self, graph: &Graph, node: &Node, slots: &mut [Slot<'a>]) {
        let (taken, lens) = node.take_outputs(graph, slots);
        let mut outs = Outs { slots: taken, lens };
        let ins: Vec<&Slot> = node.inputs.iter().map(|&i| &slots[i]).collect();
        let x = |i: usize| ins[i].f32();
        let acc = node.accumulate;
        match &node.op {
            Op::Embed { dim } => {
                let (ids, table) = (ins[0].u32(), ins[1].table());
                let out = outs.get(0);
                for (row, &id) in out.chunks_mut(*dim).zip(ids) {
                    table.row_f32(id as usize, row);
                }
            }
            Op::RmsNorm { dim, eps, offset } => {
                let rows = x(0).len() / dim;
                let p = RmsNormParams::new(rows, *dim, *eps, *offset);
                let zeros = vec![0.0; if ins.len() == 1 { *dim } else { 0 }];
                let weight = if ins.len() == 1 { &zeros } else { x(1) };
                let (y, inv) = two(&mut outs);
                rmsnorm::forward(&p, x(0), weight, y, inv);
            }
            Op::RmsNormBackward { dim, eps, offset } => {
                let p = RmsNormParams::new(x(0).len() / dim, *dim, *eps, *offset);
                // [x, (weight,) inv_rms, dy]: no weight is a zero one.
                let zeros = vec![0.0; if ins.len() == 3 { *dim } else { 0 }];
                let (weight, rest) = match ins.len() {
                    3 => (&zeros[..], 1),
                    _ => (x(1), 2),
                };
                rmsnorm::backward(&p, x(0), weight, x(rest), x(rest + 1), outs.get(0));
            }
            Op::Linear { .. } => {
                let (input, w) = (x(0), ins[1].linear());
                let bias = ins.get(2).map(|b| b.f32());
                let packed = match &self.packed {
                    Some((b, p)) if *b == node.inputs[0] => Some(p),
                    _ => {
                        self.packed = linear::pack_input(input, w.shape().1, self.precision)
                            .map(|p| (node.inputs[0], p));
                        self.packed.as_ref().map(|(_, p)| p)
                    }
                };
                linear::forward_packed(input, packed, w, bias, outs.get(0), self.precision);
            }
            Op::LinearBackwardInput { .. } => {
                linear::backward_input(x(0), ins[1].linear(), outs.get(0), acc, self.precision);
            }
            Op::Matmul {
                m,
                n,
                k,
                a_t,
                b_t,
                alpha,
            } => {
                let (a, b) = operands(x(0), x(1), (*m, *n, *k), (*a_t, *b_t));
                matmul_into(a, b, *alpha, outs.get(0), *n, 0, acc);
            }
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
                let (a, b) = operands(x(0), x(1), (*m, *n, *k), (*a_t, *b_t));
                let masked_len = side.masked_len((*m, *n, *k));
                let d = dropout_params(masked_len, ins[2].u32(), *stream, *p);
                dropout::matmul_into(&d, *side, a, b, *alpha, outs.get(0), acc);
            }
            Op::Dropout { p, stream } => {
                let d = dropout_params(x(0).len(), ins[1].u32(), *stream, *p);
                outs.set(0, dropout::apply(&d, x(0)));
            }
            Op::DropoutBackward { p, stream } => {
                let d = dropout_params(x(0).len(), ins[1].u32(), *stream, *p);
                assert!(acc, "dropout_backward accumulates into its output");
                dropout::backward_accumulate(&d, x(0), outs.get(0));
            }
            Op::PackBf16 => outs.slots[0] = Slot::U32(crate::ops::bf16::pack(x(0))),
            Op::UnpackBf16 => crate::ops::bf16::unpack(ins[0].u32(), outs.get(0)),
            Op::CopyRows {
                dim,
                from,
                to,
                rows,
            } => {
                let n = rows * dim;
                match ins[0] {
                    // Packed bf16 words (an offloaded checkpoint) are copied whole, as words.
                    Slot::U32(words) => {
                        assert!(
                            *from == 0 && *to == 0 && n == words.len(),
                            "graph: words are copied whole"
                        );
                        outs.slots[0] = Slot::U32(words.clone());
                    }
                    _ => outs.get(0)[to * dim..][..n].copy_from_slice(&x(0)[from * dim..][..n]),
                }
            }
            Op::Add => {
                if acc {
                    ops::add_assign(outs.get(0), x(0));
                } else {
                    outs.set(0, ops::sum(x(0), x(1)));
                }
            }
            Op::Rope {
                heads,
                head_dim,
                rotated,
                inverse,
                adjacent,
            } => rope::apply(
                outs.get(0),
                (*heads, *head_dim, *rotated),
                x(0),
                x(1),
                *inverse,
                *adjacent,
            ),
            Op::LayerNormModulate {
                dim,
                eps,
                shift,
                scale,
            } => {
                let (y, stats) = two(&mut outs);
                modulate::layernorm_modulate(x(0), x(1), (*dim, *eps), (*shift, *scale), y, stats);
            }
            Op::LayerNormModulateBackward { dim, scale, .. } => {
                let (input, mods, stats, dy) = (x(0), x(1), x(2), x(3));
                let dx = outs.get(0);
                modulate::layernorm_modulate_backward(
                    input,
                    mods,
                    stats,
                    dy,
                    (*dim, *scale),
                    dx,
                    acc,
                );
            }
            Op::Gate { dim, chunk } => modulate::gate(x(0), (*dim, *chunk), x(1), outs.get(0), acc),
            Op::Silu => modulate::silu(x(0), outs.get(0)),
            Op::SigmoidGatedRows { dim } => {
                glu::sigmoid_gated_rows(x(0), x(1), *dim, outs.get(0), acc)
            }
            Op::SigmoidGatedRowsBackward { dim } => {
                let (ds, dg) = two(&mut outs);
                glu::sigmoid_gated_rows_backward(x(0), x(1), x(2), *dim, ds, dg);
            }
            Op::DoraFactors { rank, scale, .. } => dora::factors(
                ins[0].linear(),
                (x(1), x(2), x(3)),
                (*rank, *scale),
                outs.get(0),
            ),
            Op::DoraMagnitudeGrad { dim } => {
                dora::magnitude_grad(x(0), x(1), x(2), *dim, outs.get(0), acc)
            }
            Op::Columns { width, offset, len } => {
                modulate::columns(x(0), outs.get(0), (*width, *offset, *len), false, acc)
            }
            Op::PlaceColumns { width, offset, len } => {
                modulate::columns(x(0), outs.get(0), (*width, *offset, *len), true, acc)
            }
            Op::Conv2d { shape } => {
                let bias = ins.get(2).map(|b| b.f32());
                let y = outs.get(0);
                conv::conv2d(shape, x(0), ins[1].linear(), bias, y, self.precision);
            }
            Op::GroupNorm {
                channels,
                groups,
                eps,
                silu,
            } => conv::group_norm(
                x(0),
                (*channels, *groups, *eps),
                (x(1), x(2)),
                *silu,
                outs.get(0),
            ),
            Op::Mse => {
                let grad_scale = ins.get(2).map(|s| s.f32()[0]);
                let (loss, grad) = modulate::mse(x(0), x(1), grad_scale);
                outs.set(0, vec![loss]);
                if let Some(grad) = grad {
                    outs.set(1, grad);
                }
            }
            Op::Glu { act } => glu::forward(*act, x(0), x(1), outs.get(0)),
            Op::MoeRoute { shape, normalize } => {
                let tokens = x(0).len() / shape.experts;
                let mut routes = vec![0u32; tokens * shape.top_k];
                moe::route(x(0), shape, *normalize, &mut routes, outs.get(1));
                outs.slots[0] = Slot::U32(routes);
            }
            Op::MoeRouteBackward { shape, normalize } => {
                let (routes, dw) = (ins[1].u32(), x(2));
                moe::route_backward(x(0), routes, dw, shape, *normalize, outs.get(0), acc);
            }
            Op::MoeExperts { shape, act, lora } => {
                let experts = moe_experts(&ins, 4, (*act, lora), shape);
                let (routes, y) = (ins[1].u32(), outs.get(0));
                moe::forward(x(0), routes, x(2), &experts, shape, y, acc, self.precision);
            }
            Op::MoeExpertsBackward { shape, act, lora } => {
                let experts = moe_experts(&ins, 5, (*act, lora), shape);
                let mut outs = every(&mut outs).into_iter();
                let (dx, dw) = (outs.next().expect("dx"), outs.next().expect("d_weights"));
                let grads = lora.stacks().map(|stack| {
                    stack.map(|_| moe::ExpertGrads {
                        a: outs.next().expect("A's gradient"),
                        b: outs.next().expect("B's gradient"),
                    })
                });
                let (routes, dy) = (ins[1].u32(), x(5));
                let p = self.precision;
                moe::backward(
                    x(0),
                    routes,
                    x(2),
                    &experts,
                    shape,
                    dy,
                    (dx, dw),
                    grads,
                    acc,
                    p,
                );
            }
            Op::GluBackward { act } => {
                let (dgate, dup) = two(&mut outs);
                glu::backward(*act, x(0), x(1), x(2), dgate, dup);
            }
            Op::Scale { factor } => glu::scale(outs.get(0), *factor),
            Op::UniformNoise => {
                let magnitude = x(1)[0];
                let out = outs.get(0);
                let params = noise_params(out.len(), ins[0].u32(), magnitude);
                dropout::add_uniform_noise(&params, out);
            }
            Op::ScaleRows { dim } => glu::scale_rows(outs.get(0), x(0), *dim),
            Op::Attention { shape } => {
                let masks = shape.masks_at();
                let segments = ins.get(masks).map(|s| s.u32());
                let key_end = ins.get(masks + 1).map(|s| s.u32());
                let sinks = shape.sinks.then(|| x(3));
                let (out, lse) = two(&mut outs);
                let qkv = [x(0), x(1), x(2)];
                attention::forward_with(*shape, qkv, segments, key_end, sinks, out, lse);
            }
            Op::CachedAttention { shape, past } => {
                let (out, rest) = outs.slots.split_at_mut(1);
                let [Slot::Cache(keys), Slot::Cache(values)] = rest else {
                    panic!("graph: cached attention appends to the KV cache");
                };
                // Positions from `past` on are (re)written: a layer sharing another's cache writes
                // the same keys and values there again.
                let width = x(1).len() / shape.tokens.max(1);
                keys.truncate(past * width);
                values.truncate(past * width);
                keys.extend_from_slice(x(1));
                values.extend_from_slice(x(2));
                if let Slot::Empty = out[0] {
                    out[0] = Slot::F32(zeros(outs.lens[0]));
                }
                let first_key = ins.get(shape.masks_at()).map(|s| s.u32());
                let sinks = shape.sinks.then(|| x(3));
                attention::forward_cached(
                    *shape,
                    *past,
                    x(0),
                    keys,
                    values,
                    first_key,
                    sinks,
                    out[0].f32_mut(),
                );
            }
            Op::AttentionBackward { shape } => {
                let segments = ins.get(6).map(|s| s.u32());
                let (dq, dk, dv) = three(&mut outs);
                attention::backward(
                    *shape,
                    x(0),
                    x(1),
                    x(2),
                    x(3),
                    x(4),
                    x(5),
                    segments,
                    dq,
                    dk,
                    dv,
                );
            }
            Op::GatherRows { dim } => {
                let (src, index) = (x(0), ins[1].u32());
                let rows: Vec<f32> = index
                    .iter()
                    .flat_map(|&t| {
                        src[t as usize * dim..(t as usize + 1) * dim]
                            .iter()
                            .copied()
                    })
                    .collect();
                outs.set(0, rows);
            }
            Op::ScatterRows { dim } => {
                let (rows, index) = (x(0), ins[1].u32());
                let out = outs.get(0);
                for (i, &t) in index.iter().enumerate() {
                    out[t as usize * dim..(t as usize + 1) * dim]
                        .copy_from_slice(&rows[i * dim..(i + 1) * dim]);
                }
            }
            Op::EmbeddingRowsGrad {
                dim,
                scale,
                token_ids,
            } => {
                assert!(acc, "embedding_rows_grad accumulates into its output");
                let (dx, ids) = (x(0), ins[1].u32());
                token_rows::embedding_rows_grad(dx, ids, token_ids, (*dim, *scale), outs.get(0));
            }
            Op::OutputRowsGrad {
                softcap, token_ids, ..
            } => {
                assert!(acc, "output_rows_grad accumulates into its output");
                let loss_type = cross_entropy::LossType::of_input(x(5)[0]);
                token_rows::output_rows_grad(
                    x(0),
                    ins[1].table(),
                    (ins[2].u32(), x(3)),
                    token_ids,
                    (x(4)[0], loss_type, *softcap),
                    outs.get(0),
                );
            }
            Op::CrossEntropy { softcap, .. } => {
                let tokens = cross_entropy::forward(
                    x(0),
                    ins[1].table(),
                    ins[2].u32(),
                    self.precision,
                    *softcap,
                );
                outs.set(0, rows(&tokens));
            }
            Op::CrossEntropyWithGrad { softcap, .. } => {
                let scale = x(3)[0];
                let loss_type = cross_entropy::LossType::of_input(x(4)[0]);
                let (tokens, d_hidden) = cross_entropy::forward_backward(
                    x(0),
                    ins[1].table(),
                    ins[2].u32(),
                    scale,
                    loss_type,
                    self.precision,
                    *softcap,
                );
                outs.set(0, rows(&tokens));
                outs.set(1, d_hidden);
            }
            Op::GradNorm { max_norm } => {
                let squares: f64 = ins.iter().map(|g| adamw::sum_of_squares(g.f32())).sum();
                let norm = squares.sqrt();
                let coefficient = if *max_norm > 0.0 {
                    adamw::clip_coefficient(norm, *max_norm)
                } else {
                    1.0
                };
                outs.set(0, vec![norm as f32, coefficient as f32]);
            }
            Op::AdamW => {
                let (clip, h) = (x(1)[1], x(2));
                let params = AdamWParams {
                    grad_scale: h[7] * clip,
                    ..bytemuck::cast::<[f32; 8], AdamWParams>(h.try_into().expect("8 values"))
                };
                let (param, m, v) = three(&mut outs);
                adamw::step(&params, param, x(0), m, v);
            }
            Op::Logits { softcap, .. } => {
                outs.set(
                    0,
                    cross_entropy::logits(x(0), ins[1].table(), self.precision, *softcap),
                );
            }
        }
        drop(ins);
        node.put_back(slots, outs.slots);
    }
}

/// The `losses` output: each position's `TokenLoss` as a row.
fn rows(tokens: &[cross_entropy::TokenLoss]) -> Vec<f32> {
    tokens.iter().flat_map(|t| t.to_row()).collect()
}

fn noise_params(n: usize, seed: &[u32], magnitude: f32) -> DropoutParams {
    DropoutParams::noise(n, seed[0] as u64 | (seed[1] as u64) << 32, magnitude)
}

/// `Op::Matmul`'s operands A [m, k] and B [k, n] as views of their buffers, either stored transposed.
fn operands<'a>(
    a: &'a [f32],
    b: &'a [f32],
    (m, n, k): (usize, usize, usize),
    (a_t, b_t): (bool, bool),
) -> (View<'a>, View<'a>) {
    let a = if a_t {
        View::transposed(a, k, m)
    } else {
        View::new(a, m, k)
    };
    let b = if b_t {
        View::transposed(b, n, k)
    } else {
        View::new(b, k, n)
    };
    (a, b)
}

fn dropout_params(n: usize, seed: &[u32], stream: u32, p: f32) -> DropoutParams {
    let seed = seed[0] as u64 | (seed[1] as u64) << 32;
    DropoutParams::new(n, seed, stream, p)
}

/// A MoE op's experts: the stacked weights at inputs 3 and 4, and the LoRA pairs `lora` says it
/// has from input `first_pair` on.
fn moe_experts<'i>(
    ins: &[&'i Slot<'_>],
    after: usize,
    (act, lora): (GateActivation, &moe::MoeLora),
    shape: &moe::MoeShape,
) -> moe::Experts<'i> {
    let mut next = shape.pairs_at(after);
    let [gate_up_lora, down_lora] = lora.stacks().map(|stack| {
        stack.map(|(rank, scale)| {
            let pairs = moe::ExpertPairs {
                a: ins[next].f32(),
                b: ins[next + 1].f32(),
                rank,
                scale,
                experts: shape.experts,
            };
            next += 2;
            pairs
        })
    });
    moe::Experts {
        gate_up: ins[3].linear(),
        down: ins[4].linear(),
        biases: shape
            .biased
            .then(|| [ins[after + 1].f32(), ins[after + 2].f32()]),
        act,
        gate_up_lora,
        down_lora,
    }
}

/// Every output as a writable slice (zeros where nothing was written), in order.
fn every<'o>(outs: &'o mut Outs<'_>) -> Vec<&'o mut [f32]> {
    for i in 0..outs.slots.len() {
        outs.get(i);
    }
    outs.slots.iter_mut().map(|s| s.f32_mut()).collect()
}

fn two<'o>(outs: &'o mut Outs<'_>) -> (&'o mut [f32], &'o mut [f32]) {
    outs.get(0);
    outs.get(1);
    let (a, b) = outs.slots.split_at_mut(1);
    (a[0].f32_mut(), b[0].f32_mut())
}

fn three<'o>(outs: &'o mut Outs<'_>) -> (&'o mut [f32], &'o mut [f32], &'o mut [f32]) {
    for i in 0..3 {
        outs.get(i);
    }
    let (a, rest) = outs.slots.split_at_mut(1);
    let (b, c) = rest.split_at_mut(1);
    (a[0].f32_mut(), b[0].f32_mut(), c[0].f32_mut())
}

/// One sequence's forward and, with `grads`, its backward adding ∂(grad_scale · loss_sum)/∂θ into
/// `grads` for every LoRA matrix, through the decoder's graph, in f32 without checkpointing.
/// `dropout_rng` enables LoRA dropout: one seed is drawn from it per call, from which every mask of the
/// sequence follows. None disables dropout.
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
        precision: Precision::F32,
        ..StepOptions::default()
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
    forward_backward_in(model, adapter, grads, seq, options, dropout_rng, None)
}

/// `forward_backward_with`, DoRA's factors kept in `kept` (`options.dora_factors`): computed into it
/// by a step's first micro-batch and read by the others.
pub fn forward_backward_keeping(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    grads: Option<&mut LoraAdapter>,
    seq: &Sequence,
    options: StepOptions,
    (dropout_rng, kept): (Option<&mut Rng>, &mut KvCache),
) -> Result<StepLoss> {
    forward_backward_in(model, adapter, grads, seq, options, dropout_rng, Some(kept))
}

fn forward_backward_in(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    grads: Option<&mut LoraAdapter>,
    seq: &Sequence,
    options: StepOptions,
    dropout_rng: Option<&mut Rng>,
    kept: Option<&mut KvCache>,
) -> Result<StepLoss> {
    seq.check(model.config.vocab_size)?;
    let seed = dropout_rng.map(|r| r.next_u64());
    let targets = seq.target_count();
    if targets == 0 {
        return Ok(StepLoss::default());
    }
    let backward = grads.is_some();
    let lora = adapter.map(|a| LoraSpec::of(a).with_factors(options.dora_factors));
    let noise = options.noise.filter(|_| backward);
    let shape = StepShape {
        checkpoints: options.checkpoints,
        noise: noise.is_some(),
        ..StepShape::of(
            seq,
            backward,
            seed.is_some(),
            options.checkpoint && backward,
        )
    };
    let graph = decoder::cached(&model.config, lora.as_ref(), shape);
    let inputs = StepInputs {
        loss_type: options.loss_type,
        noise_magnitude: noise.unwrap_or(0.0),
        ..decoder::inputs(&model.config, seq, options.grad_scale, seed.unwrap_or(0))
    };
    let mut out = run(
        &graph,
        Bindings {
            model,
            adapter,
            grads,
            cache: kept,
            optimizer: None,
            inputs: &inputs,
            precision: options.precision,
        },
    )?;
    Ok(StepLoss::of_rows(&out.take("losses")))
}

/// Keys and values of every decoded position, per layer (after RoPE), for incremental decoding.
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// DoRA's factors by module path, from the first step on (`Role::DoraFactors`).
    dora: HashMap<String, Vec<f32>>,
}

struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// The width of a position's keys (and values).
    kv_dim: usize,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        KvCache {
            layers: (0..model.layers.len())
                .map(|l| LayerCache {
                    k: Vec::new(),
                    v: Vec::new(),
                    kv_dim: model.config.kv_dim(l),
                })
                .collect(),
            dora: HashMap::new(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k.len() / l.kv_dim)
    }

    pub fn is_empty(&self) -> bool {
        self.layers.first().is_none_or(|l| l.k.is_empty())
    }

    /// Whether it holds DoRA's factors (a step has computed them into it).
    pub fn keeps_dora_factors(&self) -> bool {
        !self.dora.is_empty()
    }

    /// Forgets every position from `len` on (a conversation that diverges from what was decoded).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.k.truncate(len * l.kv_dim);
            l.v.truncate(len * l.kv_dim);
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
    let past = cache.len();
    let lora = adapter.map(LoraSpec::of);
    let graph = decoder::cached(
        &model.config,
        lora.as_ref(),
        StepShape::decode(ids.len(), past),
    );
    let inputs = decoder::decode_inputs(&model.config, ids, past);
    let mut out = run(
        &graph,
        Bindings {
            model,
            adapter,
            grads: None,
            cache: Some(cache),
            optimizer: None,
            inputs: &inputs,
            precision: Precision::F32,
        },
    )?;
    Ok(out.take("logits"))
}

/// Logits [tokens, vocab] of a sequence in f32 (evaluation of small models, parity tests).
pub fn logits(model: &Model, adapter: Option<&LoraAdapter>, ids: &[u32]) -> Result<Vec<f32>> {
    let seq = Sequence::all_tokens(ids.to_vec());
    let shape = StepShape {
        logits: true,
        ..StepShape::of(&seq, false, false, false)
    };
    let lora = adapter.map(LoraSpec::of);
    let graph = decoder::cached(&model.config, lora.as_ref(), shape);
    let inputs = decoder::inputs(&model.config, &seq, 0.0, 0);
    let mut out = run(
        &graph,
        Bindings {
            model,
            adapter,
            grads: None,
            cache: None,
            optimizer: None,
            inputs: &inputs,
            precision: Precision::F32,
        },
    )?;
    Ok(out.take("logits"))
}
