//! The GPU executor: records a graph's nodes, in order, into one command encoder with the WGSL kernels
//! of shaders/. Transient buffers come from the device's scratch pool at their first write (zeroed) and
//! go back to it after their last use, so a later node reuses them; only results are read back.
//! Executor-specific lowerings live here: weights split in row blocks across storage bindings, the
//! vocabulary walked chunk by chunk inside those blocks, attention walked in passes under a device's
//! loop budget.

use crate::config::ModelConfig;
use crate::cpu::{Sequence, StepLoss};
use crate::error::{Error, Result};
use crate::gpu::weights::{GpuDense, GpuLinear, GpuLora, GpuModel, GpuTensor, LinearBlock};
use crate::gpu::{Gpu, GpuBuffer, groups_1d};
use crate::graph::{Graph, InputValue, Node, Op, Role, StepInputs};
use crate::models::decoder::{self, LoraSpec, StepShape};
use crate::ops::attention::{AttentionParams, AttentionShape};
use crate::ops::cross_entropy::{CeParams, VOCAB_CHUNK};
use crate::ops::dropout::DropoutParams;
use crate::ops::linear::LinearParams;
use crate::ops::matmul::MatmulParams;
use crate::ops::rmsnorm::RmsNormParams;
use crate::ops::rope::RopeParams;
use crate::ops::{Dims4, EmbedParams};
use std::collections::HashMap;

/// Workgroups of shaders/linear.wgsl for `outputs` columns of y (dx) and `tokens` rows: 64 x 64 each.
fn linear_groups(outputs: usize, tokens: usize) -> [u32; 3] {
    [outputs.div_ceil(64) as u32, tokens.div_ceil(64) as u32, 1]
}

/// Activations are one buffer each, bound whole: the widest, [tokens, the widest of the hidden size,
/// the MLP's intermediate size, the query width and a vocabulary chunk] in f32, must fit one storage
/// binding. Checked before anything is recorded, so that a sequence too long for the device is an
/// error that says what to change, not a failure inside wgpu.
fn check_activation_bindings(gpu: &Gpu, c: &ModelConfig, tokens: usize) -> Result<()> {
    let widest = c
        .hidden_size
        .max(c.intermediate_size)
        .max(c.q_dim())
        .max(VOCAB_CHUNK.min(c.vocab_size));
    let bytes = (tokens * widest * 4) as u64;
    let limit = gpu.device_binding_limit();
    if bytes <= limit {
        return Ok(());
    }
    let most = limit / (widest as u64 * 4);
    Err(Error::Invalid(format!(
        "a {tokens}-token sequence needs activation buffers of {bytes} bytes ({tokens} x {widest} \
         floats), over this GPU's storage binding limit of {limit} bytes: use sequences of at most \
         {most} tokens (--max-length) or the CPU executor (--device cpu)"
    )))
}

/// How one sequence's step is recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct SequenceOptions {
    /// The gradients computed are those of grad_scale · Σ loss.
    pub grad_scale: f32,
    /// Keep only each decoder layer's input and recompute the layer in the backward.
    pub checkpoint: bool,
    /// LoRA dropout: the seed of the sequence's masks and the probability (None: no dropout).
    pub dropout: Option<(u64, f32)>,
}

/// Σ loss of a sequence from the [loss, log-sum-exp] pairs `record_sequence` leaves.
pub fn sequence_loss(result: &[f32]) -> StepLoss {
    StepLoss {
        loss_sum: result.chunks(2).map(|pair| pair[0] as f64).sum(),
        targets: result.len() / 2,
    }
}

fn lora_pairs(lora: Option<&GpuLora>) -> HashMap<&str, &(GpuBuffer, GpuBuffer)> {
    lora.map_or_else(HashMap::new, |l| {
        l.pairs.iter().map(|(path, p)| (path.as_str(), p)).collect()
    })
}

enum Slot<'a> {
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
    pub model: &'a GpuModel,
    pub lora: Option<&'a GpuLora>,
    pub grads: Option<&'a GpuLora>,
    /// The keys and values of the positions decoded so far (decoding graphs), with room for this
    /// step's.
    pub cache: Option<&'a GpuKvCache>,
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
    check_activation_bindings(bind.gpu, &bind.model.config, tokens)?;
    let params = lora_pairs(bind.lora);
    let grads = lora_pairs(bind.grads);
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
            Role::LoraA(path)
            | Role::LoraB(path)
            | Role::LoraGradA(path)
            | Role::LoraGradB(path) => {
                let (pairs, what) = match desc.role {
                    Role::LoraA(_) | Role::LoraB(_) => (&params, "a LoRA adapter for"),
                    _ => (&grads, "a LoRA gradient for"),
                };
                let (a, b) = pairs
                    .get(path.as_str())
                    .ok_or_else(|| missing(what, path))?;
                Slot::Ext(match desc.role {
                    Role::LoraA(_) | Role::LoraGradA(_) => a,
                    _ => b,
                })
            }
            Role::Input(input) => Slot::Own(match bind.inputs.value(*input) {
                InputValue::U32(v) => bind.gpu.upload_u32(&v),
                InputValue::F32(v) => bind.gpu.upload_f32(&v),
            }),
            Role::KvCache { layer, values } => {
                let cache = bind
                    .cache
                    .ok_or_else(|| missing("a KV cache for layer", &layer.to_string()))?;
                let (k, v) = &cache.layers[*layer];
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
            Role::Activation | Role::Output(_) => Slot::Empty,
        };
        slots.push(slot);
    }
    let last_use = graph.last_use();
    let outer = std::mem::replace(enc, bind.gpu.encoder());
    let mut r = Recorder {
        gpu: bind.gpu,
        enc: outer,
        dummy: &bind.model.dummy,
        inputs: bind.inputs,
    };
    let mut recorded = Recorded::default();
    for (i, node) in graph.nodes.iter().enumerate() {
        r.node(graph, node, &mut slots);
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

/// A strided view of a GPU matrix, as `ops::matmul::View` is of a CPU one.
#[derive(Clone, Copy)]
struct View<'a> {
    buf: &'a GpuBuffer,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A [rows, cols] matrix stored row-major, or (`transposed`) stored as its [cols, rows] transpose.
fn view(buf: &GpuBuffer, rows: usize, cols: usize, transposed: bool) -> View<'_> {
    let (rs, cs) = if transposed { (1, rows) } else { (cols, 1) };
    View {
        buf,
        rows,
        cols,
        rs,
        cs,
    }
}

struct Recorder<'a> {
    gpu: &'a Gpu,
    enc: wgpu::CommandEncoder,
    /// Bound where a kernel's optional buffer is absent.
    dummy: &'a GpuBuffer,
    inputs: &'a StepInputs,
}

/// A node's outputs, taken out of their slots while it is recorded.
struct Outs<'a> {
    slots: Vec<Slot<'a>>,
    lens: Vec<usize>,
}

impl<'a> Outs<'a> {
    fn get(&mut self, r: &mut Recorder, i: usize) -> &GpuBuffer {
        if let Slot::Empty = self.slots[i] {
            self.slots[i] = Slot::Own(r.gpu.scratch(&mut r.enc, self.lens[i]));
        }
        self.slots[i].buf()
    }
}

impl Recorder<'_> {
    fn dims(n: usize) -> Dims4 {
        Dims4 {
            a: n as u32,
            b: 0,
            c: 0,
            d: 0,
        }
    }

    fn node(&mut self, graph: &Graph, node: &Node, slots: &mut [Slot]) {
        let mut outs = Outs {
            slots: node
                .outputs
                .iter()
                .map(|&o| std::mem::replace(&mut slots[o], Slot::Empty))
                .collect(),
            lens: node.outputs.iter().map(|&o| graph.bufs[o].len).collect(),
        };
        // Every output exists before the inputs are borrowed.
        for i in 0..outs.slots.len() {
            outs.get(self, i);
        }
        let ins: Vec<&Slot> = node.inputs.iter().map(|&i| &slots[i]).collect();
        let o = |i: usize| outs.slots[i].buf();
        let x = |i: usize| ins[i].buf();
        let acc = node.accumulate;
        match &node.op {
            Op::Embed { dim } => self.embed(ins[1].table(), x(0), o(0), *dim),
            Op::RmsNorm { dim, eps } => {
                let rows = x(0).len / dim;
                let p = RmsNormParams::new(rows, *dim, *eps);
                let b = [(1, x(0)), (2, x(1)), (3, o(0)), (4, o(1))];
                self.gpu
                    .dispatch(&mut self.enc, "rmsnorm_forward", &p, &b, groups_1d(rows, 1));
            }
            Op::RmsNormBackward { dim, eps } => {
                let rows = x(0).len / dim;
                let p = RmsNormParams::new(rows, *dim, *eps);
                let b = [(1, x(0)), (2, x(1)), (3, o(0)), (4, x(2)), (5, x(3))];
                self.gpu.dispatch(
                    &mut self.enc,
                    "rmsnorm_backward",
                    &p,
                    &b,
                    groups_1d(rows, 1),
                );
            }
            Op::Linear { .. } => {
                let bias = ins.get(2).map(|b| b.buf());
                self.linear_forward(ins[1].linear(), bias, x(0), o(0));
            }
            Op::LinearBackwardInput { .. } => {
                self.linear_backward_input(ins[1].linear(), x(0), o(0), acc)
            }
            Op::Matmul {
                m,
                n,
                k,
                a_t,
                b_t,
                alpha,
            } => self.matmul(
                view(x(0), *m, *k, *a_t),
                view(x(1), *k, *n, *b_t),
                *alpha,
                o(0),
                *n,
                acc,
            ),
            Op::Dropout { p, stream } => {
                let d = self.dropout_params(x(0).len, *stream, *p);
                let b = [(1, x(0)), (2, o(0))];
                self.gpu.dispatch(
                    &mut self.enc,
                    "dropout_forward",
                    &d,
                    &b,
                    groups_1d(d.n as usize, 256),
                );
            }
            Op::DropoutBackward { p, stream } => {
                // The kernel adds the masked gradient into its output.
                assert!(acc, "dropout_backward accumulates into its output");
                let d = self.dropout_params(x(0).len, *stream, *p);
                let b = [(1, x(0)), (2, o(0))];
                self.gpu.dispatch(
                    &mut self.enc,
                    "dropout_backward",
                    &d,
                    &b,
                    groups_1d(d.n as usize, 256),
                );
            }
            Op::Add => {
                let n = o(0).len;
                let groups = groups_1d(n, 256);
                if acc {
                    let b = [(1, x(0)), (3, o(0))];
                    self.gpu
                        .dispatch(&mut self.enc, "add_assign", &Self::dims(n), &b, groups);
                } else {
                    let b = [(1, x(0)), (2, x(1)), (3, o(0))];
                    self.gpu
                        .dispatch(&mut self.enc, "add", &Self::dims(n), &b, groups);
                }
            }
            Op::Rope {
                heads,
                head_dim,
                inverse,
            } => {
                let tokens = o(0).len / (heads * head_dim);
                let p = RopeParams {
                    tokens: tokens as u32,
                    heads: *heads as u32,
                    head_dim: *head_dim as u32,
                    sign: if *inverse { -1.0 } else { 1.0 },
                };
                let groups = [
                    (head_dim / 2).div_ceil(64) as u32,
                    *heads as u32,
                    tokens as u32,
                ];
                let b = [(1, x(0)), (2, x(1)), (3, o(0))];
                self.gpu
                    .dispatch(&mut self.enc, "rope_apply", &p, &b, groups);
            }
            Op::SwiGlu => {
                let n = o(0).len;
                let b = [(1, x(0)), (2, x(1)), (3, o(0))];
                self.gpu.dispatch(
                    &mut self.enc,
                    "swiglu_forward",
                    &Self::dims(n),
                    &b,
                    groups_1d(n, 256),
                );
            }
            Op::SwiGluBackward => {
                let n = o(0).len;
                let b = [(1, x(0)), (2, x(1)), (3, o(0)), (4, o(1)), (5, x(2))];
                self.gpu.dispatch(
                    &mut self.enc,
                    "swiglu_backward",
                    &Self::dims(n),
                    &b,
                    groups_1d(n, 256),
                );
            }
            Op::Attention { shape } => {
                let first_key = self.first_key(ins.get(3).map(|s| s.buf()), shape);
                let groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
                // Per key: the score's dot product and the running sum's update.
                for p in self.attention_passes(shape, 2) {
                    let b = [
                        (1, x(0)),
                        (2, x(1)),
                        (3, x(2)),
                        (4, o(0)),
                        (5, o(1)),
                        (10, first_key.as_ref()),
                    ];
                    self.gpu
                        .dispatch(&mut self.enc, "attention_forward", &p, &b, groups);
                }
            }
            Op::CachedAttention { shape, past } => {
                let kv = shape.kv_heads * shape.head_dim;
                let (offset, bytes) = ((past * kv * 4) as u64, (shape.tokens * kv * 4) as u64);
                let (keys, values) = (o(1), o(2));
                self.enc
                    .copy_buffer_to_buffer(&x(1).buffer, 0, &keys.buffer, offset, bytes);
                self.enc
                    .copy_buffer_to_buffer(&x(2).buffer, 0, &values.buffer, offset, bytes);
                let all = AttentionShape {
                    tokens: past + shape.tokens,
                    ..*shape
                };
                let first_key = self.gpu.scratch(&mut self.enc, shape.tokens);
                let stats = self
                    .gpu
                    .scratch(&mut self.enc, 2 * shape.heads * all.tokens);
                let groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
                for p in self.attention_passes(&all, 2) {
                    let p = AttentionParams {
                        query_offset: *past as u32,
                        ..p
                    };
                    let b = [
                        (1, x(0)),
                        (2, keys),
                        (3, values),
                        (4, o(0)),
                        (5, &stats),
                        (10, &first_key),
                    ];
                    self.gpu
                        .dispatch(&mut self.enc, "attention_forward", &p, &b, groups);
                }
            }
            Op::AttentionBackward { shape } => {
                let first_key = self.first_key(ins.get(6).map(|s| s.buf()), shape);
                self.attention_backward(
                    shape,
                    [x(0), x(1), x(2), x(3), x(4), x(5)],
                    first_key.as_ref(),
                    [o(0), o(1), o(2)],
                );
            }
            Op::GatherRows { dim } => self.rows("gather_rows", x(0), x(1), o(0), *dim),
            Op::ScatterRows { dim } => self.rows("scatter_rows", x(0), x(1), o(0), *dim),
            Op::CrossEntropy { .. } => self.cross_entropy(ins[1].table(), x(0), x(2), o(0), None),
            Op::CrossEntropyWithGrad { .. } => {
                self.cross_entropy(ins[1].table(), x(0), x(2), o(0), Some(o(1)))
            }
            Op::Logits { .. } => {
                let head = ins[1].table();
                let positions = x(0).len / head.cols;
                let vocab = o(0).len / positions.max(1);
                self.for_each_chunk(head, positions, 0.0, |r, block, p| {
                    // Each chunk's logits land in their columns of the full matrix.
                    let lp = LinearParams {
                        out_stride: vocab as u32,
                        row_offset: p.block_start + p.chunk_start,
                        ..r.ce_linear_params(head, &p, false)
                    };
                    r.ce_logits_with(block, &lp, x(0), o(0));
                });
            }
        }
        drop(ins);
        for (&o, slot) in node.outputs.iter().zip(outs.slots) {
            slots[o] = slot;
        }
    }

    /// A sequence of one example still binds a first-key table: zeros.
    fn first_key<'b>(
        &mut self,
        given: Option<&'b GpuBuffer>,
        shape: &AttentionShape,
    ) -> FirstKey<'b> {
        match given {
            Some(b) => FirstKey::Given(b),
            None => FirstKey::Own(self.gpu.scratch(&mut self.enc, shape.tokens)),
        }
    }

    fn dropout_params(&self, n: usize, stream: u32, p: f32) -> DropoutParams {
        DropoutParams::new(n, self.inputs.dropout_seed, stream, p)
    }

    fn embed(&mut self, table: &GpuDense, ids: &GpuBuffer, x: &GpuBuffer, dim: usize) {
        let t = ids.len;
        for (start, rows, block) in &table.blocks {
            let p = EmbedParams {
                tokens: t as u32,
                dim: dim as u32,
                fmt: table.fmt,
                row_start: *start as u32,
                row_count: *rows as u32,
                _pad: [0; 3],
            };
            self.gpu.dispatch(
                &mut self.enc,
                "embed",
                &p,
                &[(1, block), (2, ids), (3, x)],
                [dim.div_ceil(64) as u32, t as u32, 1],
            );
        }
    }

    fn rows(
        &mut self,
        entry: &'static str,
        src: &GpuBuffer,
        index: &GpuBuffer,
        dst: &GpuBuffer,
        dim: usize,
    ) {
        let rows = index.len;
        let p = Dims4 {
            a: rows as u32,
            b: dim as u32,
            c: 0,
            d: 0,
        };
        self.gpu.dispatch(
            &mut self.enc,
            entry,
            &p,
            &[(1, src), (2, index), (3, dst)],
            [dim.div_ceil(64) as u32, rows as u32, 1],
        );
    }

    fn matmul(
        &mut self,
        a: View,
        b: View,
        alpha: f32,
        c: &GpuBuffer,
        ldc: usize,
        accumulate: bool,
    ) {
        assert_eq!(a.cols, b.rows);
        let p = MatmulParams {
            m: a.rows as u32,
            n: b.cols as u32,
            k: a.cols as u32,
            a_row_stride: a.rs as u32,
            a_col_stride: a.cs as u32,
            b_row_stride: b.rs as u32,
            b_col_stride: b.cs as u32,
            ldc: ldc as u32,
            c_col: 0,
            accumulate: accumulate as u32,
            alpha,
            _pad: 0,
        };
        // shaders/matmul.wgsl: 16 x 16 outputs per workgroup.
        let groups = [b.cols.div_ceil(16) as u32, a.rows.div_ceil(16) as u32, 1];
        self.gpu.dispatch(
            &mut self.enc,
            "matmul",
            &p,
            &[(1, a.buf), (2, b.buf), (3, c)],
            groups,
        );
    }

    fn linear_params(
        &self,
        lin: &GpuLinear,
        block: &LinearBlock,
        tokens: usize,
        accumulate: bool,
        with_bias: bool,
    ) -> LinearParams {
        LinearParams {
            tokens: tokens as u32,
            rows: block.rows as u32,
            cols: lin.cols as u32,
            fmt: lin.fmt,
            group_size: lin.group as u32,
            has_bias: with_bias as u32,
            accumulate: accumulate as u32,
            row_offset: block.start as u32,
            out_stride: lin.rows as u32,
            weight_row: 0,
            _pad: [0; 2],
        }
    }

    fn linear_forward(
        &mut self,
        lin: &GpuLinear,
        bias: Option<&GpuBuffer>,
        x: &GpuBuffer,
        y: &GpuBuffer,
    ) {
        let t = x.len / lin.cols;
        for block in &lin.blocks {
            let p = self.linear_params(lin, block, t, false, bias.is_some());
            let mut bindings = weight_bindings(self.dummy, block).to_vec();
            bindings.extend([(4, bias.unwrap_or(self.dummy)), (5, x), (6, y)]);
            let groups = linear_groups(block.rows, t);
            self.gpu
                .dispatch(&mut self.enc, "linear_forward", &p, &bindings, groups);
        }
    }

    /// dx (+)= dy·W: every block adds its rows' share.
    fn linear_backward_input(
        &mut self,
        lin: &GpuLinear,
        dy: &GpuBuffer,
        dx: &GpuBuffer,
        accumulate: bool,
    ) {
        let t = dy.len / lin.rows;
        assert!(
            accumulate || lin.blocks.len() == 1,
            "a weight split in blocks adds each block's share"
        );
        for block in &lin.blocks {
            let p = self.linear_params(lin, block, t, accumulate, false);
            let mut bindings = weight_bindings(self.dummy, block).to_vec();
            bindings.extend([(5, dy), (6, dx)]);
            let groups = linear_groups(lin.cols, t);
            self.gpu.dispatch(
                &mut self.enc,
                "linear_backward_input",
                &p,
                &bindings,
                groups,
            );
        }
    }

    fn attention_params(&self, shape: &AttentionShape) -> AttentionParams {
        AttentionParams {
            tokens: shape.tokens as u32,
            heads: shape.heads as u32,
            kv_heads: shape.kv_heads as u32,
            head_dim: shape.head_dim as u32,
            scale: 1.0 / (shape.head_dim as f32).sqrt(),
            pass_begin: 0,
            pass_end: shape.tokens as u32,
            pass_flags: 3,
            query_offset: 0,
            _pad: [0; 3],
        }
    }

    /// An attention kernel's walk over all tokens (keys or queries) as passes whose loop iterations per
    /// invocation stay within the device's budget: each row walked costs a thread `loops_per_row` loops
    /// over the head dimension. One pass where the device has no budget.
    fn attention_passes(
        &self,
        shape: &AttentionShape,
        loops_per_row: usize,
    ) -> Vec<AttentionParams> {
        let base = self.attention_params(shape);
        let t = shape.tokens.max(1);
        // A few more iterations per row for the walk's own loops (tile rows, staging).
        let per_pass = self.gpu.loop_budget.map_or(t, |budget| {
            (budget / (loops_per_row * shape.head_dim + 8)).max(1)
        });
        let passes = t.div_ceil(per_pass);
        (0..passes)
            .map(|i| AttentionParams {
                pass_begin: (i * per_pass) as u32,
                pass_end: ((i + 1) * per_pass).min(t) as u32,
                pass_flags: (i == 0) as u32 | ((i + 1 == passes) as u32) << 1,
                ..base
            })
            .collect()
    }

    /// `ins`: q, k, v, out, lse (with the GPU's second number per row), d_out; `outs`: dq, dk, dv.
    fn attention_backward(
        &mut self,
        shape: &AttentionShape,
        ins: [&GpuBuffer; 6],
        first_key: &GpuBuffer,
        outs: [&GpuBuffer; 3],
    ) {
        let [q, k, v, attn, lse, d_attn] = ins;
        let [dq, dk, dv] = outs;
        let p = self.attention_params(shape);
        let heads_groups = [shape.tokens.div_ceil(64) as u32, shape.heads as u32, 1];
        self.gpu.dispatch(
            &mut self.enc,
            "attention_delta",
            &p,
            &[(4, attn), (5, lse), (6, d_attn)],
            heads_groups,
        );
        // Each query head's share of dk and dv, summed over each kv head's group at the end.
        let (dk_shares, dv_shares) = (
            self.gpu.scratch(&mut self.enc, q.len),
            self.gpu.scratch(&mut self.enc, q.len),
        );
        let common = [
            (1, q),
            (2, k),
            (3, v),
            (5, lse),
            (6, d_attn),
            (10, first_key),
        ];
        let mut b = common.to_vec();
        b.push((8, dq));
        // Per key: the score, d_out·v and the update of dq.
        for pass in self.attention_passes(shape, 3) {
            self.gpu.dispatch(
                &mut self.enc,
                "attention_backward_dq",
                &pass,
                &b,
                heads_groups,
            );
        }
        let mut b = common.to_vec();
        b.extend([(8, &dk_shares), (9, &dv_shares)]);
        // Per query: the score, d_out·v with the update of dv, and the update of dk.
        for pass in self.attention_passes(shape, 3) {
            self.gpu.dispatch(
                &mut self.enc,
                "attention_backward_dkdv",
                &pass,
                &b,
                heads_groups,
            );
        }
        self.gpu.dispatch(
            &mut self.enc,
            "attention_reduce_kv",
            &p,
            &[(8, &dk_shares), (9, &dv_shares), (12, dk), (13, dv)],
            [
                shape.head_dim.div_ceil(64) as u32,
                shape.kv_heads as u32,
                shape.tokens as u32,
            ],
        );
    }

    /// One vocabulary chunk of the output projection as a frozen linear layer: positions x chunk rows.
    fn ce_linear_params(&self, head: &GpuDense, p: &CeParams, accumulate: bool) -> LinearParams {
        LinearParams {
            tokens: p.positions,
            rows: p.chunk_len,
            cols: head.cols as u32,
            fmt: head.fmt,
            // Dense formats have no groups.
            group_size: 1,
            has_bias: 0,
            accumulate: accumulate as u32,
            row_offset: 0,
            out_stride: p.chunk_len,
            weight_row: p.chunk_start,
            _pad: [0; 2],
        }
    }

    fn ce_logits_with(
        &mut self,
        block: &GpuBuffer,
        lp: &LinearParams,
        hidden: &GpuBuffer,
        logits: &GpuBuffer,
    ) {
        let d = self.dummy;
        let groups = linear_groups(lp.rows as usize, lp.tokens as usize);
        self.gpu.dispatch(
            &mut self.enc,
            "linear_forward",
            lp,
            &[(1, block), (2, d), (3, d), (4, d), (5, hidden), (6, logits)],
            groups,
        );
    }

    /// Calls `f` for each vocabulary chunk with its block buffer and parameters.
    fn for_each_chunk(
        &mut self,
        head: &GpuDense,
        positions: usize,
        grad_scale: f32,
        mut f: impl FnMut(&mut Self, &GpuBuffer, CeParams),
    ) {
        for (block_start, rows, block) in &head.blocks {
            let (block_start, rows) = (*block_start, *rows);
            for chunk_start in (0..rows).step_by(VOCAB_CHUNK) {
                let p = CeParams {
                    positions: positions as u32,
                    chunk_start: chunk_start as u32,
                    chunk_len: VOCAB_CHUNK.min(rows - chunk_start) as u32,
                    block_start: block_start as u32,
                    grad_scale,
                    _pad: [0; 3],
                };
                f(self, block, p);
            }
        }
    }

    /// Per-position [loss, log-sum-exp] into `result`; with `d_hidden`, grad_scale times the loss's
    /// gradient with respect to `hidden` (a second walk over the vocabulary recomputes each chunk's
    /// logits instead of keeping them all).
    fn cross_entropy(
        &mut self,
        head: &GpuDense,
        hidden: &GpuBuffer,
        labels: &GpuBuffer,
        result: &GpuBuffer,
        d_hidden: Option<&GpuBuffer>,
    ) {
        let np = labels.len;
        let grad_scale = self.inputs.grad_scale;
        let state = self.gpu.upload_f32(
            &(0..np)
                .flat_map(|_| [-3.0e38f32, 0.0, 0.0])
                .collect::<Vec<_>>(),
        );
        let logits = self.gpu.scratch(&mut self.enc, np * VOCAB_CHUNK);
        self.for_each_chunk(head, np, grad_scale, |r, block, p| {
            let lp = r.ce_linear_params(head, &p, false);
            r.ce_logits_with(block, &lp, hidden, &logits);
            r.gpu.dispatch(
                &mut r.enc,
                "ce_reduce",
                &p,
                &[(3, &logits), (4, &state), (5, labels)],
                [np as u32, 1, 1],
            );
        });
        let p = CeParams {
            positions: np as u32,
            chunk_start: 0,
            chunk_len: 0,
            block_start: 0,
            grad_scale,
            _pad: [0; 3],
        };
        self.gpu.dispatch(
            &mut self.enc,
            "ce_finalize",
            &p,
            &[(4, &state), (7, result)],
            groups_1d(np, 64),
        );
        let Some(d_hidden) = d_hidden else {
            return;
        };
        self.for_each_chunk(head, np, grad_scale, |r, block, p| {
            let lp = r.ce_linear_params(head, &p, false);
            r.ce_logits_with(block, &lp, hidden, &logits);
            let groups = [p.chunk_len.div_ceil(64), np as u32, 1];
            r.gpu.dispatch(
                &mut r.enc,
                "ce_grad_logits",
                &p,
                &[(3, &logits), (5, labels), (7, result)],
                groups,
            );
            // d_hidden += d_logits · chunk rows.
            let lp = r.ce_linear_params(head, &p, true);
            let d = r.dummy;
            let groups = linear_groups(lp.cols as usize, np);
            r.gpu.dispatch(
                &mut r.enc,
                "linear_backward_input",
                &lp,
                &[(1, block), (2, d), (3, d), (5, &logits), (6, d_hidden)],
                groups,
            );
        });
    }
}

/// A frozen weight block's words, group scales and minimums (the dummy where a format has none).
fn weight_bindings<'b>(dummy: &'b GpuBuffer, block: &'b LinearBlock) -> [(u32, &'b GpuBuffer); 3] {
    [
        (1, &block.words),
        (2, block.scales.as_ref().unwrap_or(dummy)),
        (3, block.mins.as_ref().unwrap_or(dummy)),
    ]
}

/// Attention's first-key table: the step's input, or zeros for a sequence of one example.
enum FirstKey<'b> {
    Given(&'b GpuBuffer),
    Own(GpuBuffer),
}

impl AsRef<GpuBuffer> for FirstKey<'_> {
    fn as_ref(&self) -> &GpuBuffer {
        match self {
            FirstKey::Given(b) => b,
            FirstKey::Own(b) => b,
        }
    }
}

fn lora_spec(lora: &GpuLora, dropout: f32) -> LoraSpec {
    LoraSpec {
        rank: lora.rank,
        scale: lora.scale,
        dropout,
        targets: lora.pairs.iter().map(|(path, _)| path.clone()).collect(),
    }
}

/// Records one sequence's forward (and with `grads` its backward, adding ∂(grad_scale · loss_sum)/∂θ
/// into the gradient buffers) into `enc`, through the decoder's graph. Returns the buffer of
/// per-position [loss, log-sum-exp] pairs to read back, or None when no position carries a label.
pub fn record_sequence(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    grads: Option<&GpuLora>,
    seq: &Sequence,
    options: SequenceOptions,
    enc: &mut wgpu::CommandEncoder,
) -> Result<Option<GpuBuffer>> {
    seq.check(model.config.vocab_size)?;
    check_activation_bindings(gpu, &model.config, seq.ids.len())?;
    if seq.target_count() == 0 {
        return Ok(None);
    }
    let (seed, p) = options.dropout.unwrap_or((0, 0.0));
    let spec = lora.map(|l| lora_spec(l, p));
    let backward = grads.is_some();
    let shape = StepShape::of(
        seq,
        backward,
        options.dropout.is_some(),
        options.checkpoint && backward,
    );
    let graph = decoder::cached(&model.config, spec.as_ref(), shape);
    let inputs = decoder::inputs(&model.config, seq, options.grad_scale, seed);
    let bind = Bindings {
        gpu,
        model,
        lora,
        grads,
        cache: None,
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
        return Ok(StepLoss {
            loss_sum: 0.0,
            targets: 0,
        });
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
    layers: Vec<(GpuBuffer, GpuBuffer)>,
    /// Positions held.
    len: usize,
    /// Positions the buffers have room for.
    capacity: usize,
    kv_dim: usize,
}

impl GpuKvCache {
    pub fn new(gpu: &Gpu, model: &GpuModel) -> Self {
        let c = &model.config;
        GpuKvCache {
            layers: (0..c.num_layers)
                .map(|_| (gpu.zeros(1), gpu.zeros(1)))
                .collect(),
            len: 0,
            capacity: 0,
            kv_dim: c.kv_dim(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        let bytes = (capacity * self.kv_dim * 4) as u64;
        let limit = gpu.device_binding_limit();
        if bytes > limit {
            return Err(Error::Invalid(format!(
                "decoding {positions} positions needs KV cache buffers of {bytes} bytes, over this GPU's \
                 storage binding limit of {limit} bytes: shorten the conversation or decode on the CPU \
                 (--device cpu)"
            )));
        }
        let mut enc = gpu.encoder();
        let held = (self.len * self.kv_dim * 4) as u64;
        for (k, v) in &mut self.layers {
            for old in [k, v] {
                let new = gpu.zeros(capacity * self.kv_dim);
                if held > 0 {
                    enc.copy_buffer_to_buffer(&old.buffer, 0, &new.buffer, 0, held);
                }
                *old = new;
            }
        }
        gpu.queue.submit([enc.finish()]);
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
    let inputs = decoder::decode_inputs(&model.config, ids, past);
    let mut enc = gpu.encoder();
    let bind = Bindings {
        gpu,
        model,
        lora,
        grads: None,
        cache: Some(cache),
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
