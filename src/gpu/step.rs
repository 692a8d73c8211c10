//! A decoder-only transformer step on the GPU: the same sequence of ops as the CPU executor (`cpu.rs`),
//! recorded into one command encoder; only per-position losses (and requested results) are read back.
//! Entry points are async (a browser completes read-backs from its event loop); native targets also get
//! blocking wrappers.

use super::{Gpu, GpuBuffer, groups_1d};
use crate::config::{LinearKind, ModelConfig};
use crate::cpu::{Sequence, StepLoss};
use crate::error::{Error, Result};
use crate::lora::LoraAdapter;
use crate::model::{DenseData, DenseTensor, LinearWeight, Model};
use crate::ops::attention::AttentionParams;
use crate::ops::cross_entropy::CeParams;
use crate::ops::cross_entropy::VOCAB_CHUNK;
use crate::ops::dropout::{self, DropoutParams};
use crate::ops::linear::LinearParams;
use crate::ops::matmul::MatmulParams;
use crate::ops::rmsnorm::RmsNormParams;
use crate::ops::rope;
use crate::ops::rope::RopeParams;
use crate::ops::{Dims4, EmbedParams};
use crate::quant::QuantFormat;

const FMT_F32: u32 = 0;
const FMT_BF16: u32 = 1;
const FMT_F16: u32 = 2;
const FMT_NF4: u32 = 3;
const FMT_INT4: u32 = 4;

/// A dense matrix as 32-bit words (f32, or two 16-bit values per word), split into row blocks that each
/// fit one storage binding.
pub struct GpuDense {
    pub(crate) fmt: u32,
    pub(crate) cols: usize,
    pub(crate) blocks: Vec<(usize, usize, GpuBuffer)>,
}

fn dense_words(t: &DenseTensor, start: usize, rows: usize) -> (u32, Vec<u32>) {
    let range = start * t.cols..(start + rows) * t.cols;
    let pack = |bits: &mut dyn Iterator<Item = u16>| -> Vec<u32> {
        let v: Vec<u16> = bits.collect();
        v.chunks(2)
            .map(|p| p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16)
            .collect()
    };
    match &t.data {
        DenseData::F32(v) => (FMT_F32, v[range].iter().map(|x| x.to_bits()).collect()),
        DenseData::BF16(v) => (FMT_BF16, pack(&mut v[range].iter().map(|x| x.to_bits()))),
        DenseData::F16(v) => (FMT_F16, pack(&mut v[range].iter().map(|x| x.to_bits()))),
    }
}

/// Rows per block of a matrix split into blocks that each fit one storage binding. Blocks of 16-bit
/// values start on a whole word: with an odd row length, an even number of rows.
fn rows_per_block(
    gpu: &Gpu,
    rows: usize,
    row_bytes: usize,
    odd_halves: bool,
    name: &str,
) -> Result<usize> {
    let fit = (gpu.max_binding / row_bytes.max(1) as u64) as usize;
    let step = if odd_halves { 2 } else { 1 };
    let per_block = fit / step * step;
    if per_block == 0 {
        return Err(Error::Invalid(format!(
            "{name}: {step} row(s) of {row_bytes} bytes do not fit the GPU's storage binding limit of {} bytes",
            gpu.max_binding
        )));
    }
    Ok(per_block.min(rows.max(1)))
}

impl GpuDense {
    fn upload(gpu: &Gpu, t: &DenseTensor, name: &str) -> Result<Self> {
        let size = t.dtype().size();
        let rows_per_block = rows_per_block(
            gpu,
            t.rows,
            t.cols * size,
            size == 2 && t.cols % 2 == 1,
            name,
        )?;
        let mut blocks = Vec::new();
        let mut fmt = FMT_F32;
        for start in (0..t.rows).step_by(rows_per_block) {
            let rows = rows_per_block.min(t.rows - start);
            let (f, words) = dense_words(t, start, rows);
            fmt = f;
            blocks.push((start, rows, gpu.upload_u32(&words)));
        }
        Ok(GpuDense {
            fmt,
            cols: t.cols,
            blocks,
        })
    }
}

pub struct GpuLinear {
    pub(crate) fmt: u32,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) group: usize,
    /// W in row blocks that each fit one storage binding (one block unless W is larger).
    pub(crate) blocks: Vec<LinearBlock>,
    pub(crate) bias: Option<GpuBuffer>,
}

/// Rows `start..start + rows` of a frozen weight: its words, and for the 4-bit formats its group scales
/// (and INT4 minimums).
pub(crate) struct LinearBlock {
    pub(crate) start: usize,
    pub(crate) rows: usize,
    pub(crate) words: GpuBuffer,
    pub(crate) scales: Option<GpuBuffer>,
    pub(crate) mins: Option<GpuBuffer>,
}

impl GpuLinear {
    fn upload(gpu: &Gpu, weight: &LinearWeight, bias: Option<&[f32]>, name: &str) -> Result<Self> {
        let (rows, cols) = weight.shape();
        let (fmt, group, blocks) = match weight {
            // Split as any dense matrix is.
            LinearWeight::Dense(d) => {
                let dense = GpuDense::upload(gpu, d, name)?;
                let blocks = dense
                    .blocks
                    .into_iter()
                    .map(|(start, rows, words)| LinearBlock {
                        start,
                        rows,
                        words,
                        scales: None,
                        mins: None,
                    });
                (dense.fmt, 1, blocks.collect())
            }
            LinearWeight::Quant(q) => {
                let group = q.spec.group_size;
                let (words, groups) = (cols / 8, cols / group);
                let per_block = rows_per_block(gpu, rows, cols / 2, false, name)?;
                let blocks = (0..rows).step_by(per_block).map(|start| {
                    let n = per_block.min(rows - start);
                    let meta = start * groups..(start + n) * groups;
                    LinearBlock {
                        start,
                        rows: n,
                        words: gpu.upload_u32(&q.packed[start * words..(start + n) * words]),
                        scales: Some(gpu.upload_f32(&q.scales[meta.clone()])),
                        mins: (!q.mins.is_empty()).then(|| gpu.upload_f32(&q.mins[meta])),
                    }
                });
                let fmt = if q.spec.format == QuantFormat::Nf4 {
                    FMT_NF4
                } else {
                    FMT_INT4
                };
                (fmt, group, blocks.collect())
            }
        };
        Ok(GpuLinear {
            fmt,
            rows,
            cols,
            group,
            blocks,
            bias: bias.map(|b| gpu.upload_f32(b)),
        })
    }
}

pub(crate) struct GpuLayer {
    pub(crate) input_norm: GpuBuffer,
    pub(crate) post_norm: GpuBuffer,
    pub(crate) q_norm: Option<GpuBuffer>,
    pub(crate) k_norm: Option<GpuBuffer>,
    pub(crate) linears: Vec<GpuLinear>,
}

/// A model's frozen weights in GPU memory.
pub struct GpuModel {
    pub config: ModelConfig,
    pub(crate) embed: GpuDense,
    pub(crate) lm_head: Option<GpuDense>,
    pub(crate) layers: Vec<GpuLayer>,
    pub(crate) final_norm: GpuBuffer,
    pub(crate) dummy: GpuBuffer,
}

impl GpuModel {
    pub fn upload(gpu: &Gpu, model: &Model) -> Result<Self> {
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                let linears = layer
                    .linears
                    .iter()
                    .map(|lin| {
                        GpuLinear::upload(
                            gpu,
                            &lin.weight,
                            lin.bias.as_deref(),
                            &format!("{}.weight", lin.kind.path(l)),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(GpuLayer {
                    input_norm: gpu.upload_f32(&layer.input_norm),
                    post_norm: gpu.upload_f32(&layer.post_attention_norm),
                    q_norm: layer.q_norm.as_ref().map(|v| gpu.upload_f32(v)),
                    k_norm: layer.k_norm.as_ref().map(|v| gpu.upload_f32(v)),
                    linears,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuModel {
            config: model.config.clone(),
            embed: GpuDense::upload(gpu, &model.embed, "model.embed_tokens.weight")?,
            lm_head: model
                .lm_head
                .as_ref()
                .map(|h| GpuDense::upload(gpu, h, "lm_head.weight"))
                .transpose()?,
            layers,
            final_norm: gpu.upload_f32(&model.final_norm),
            dummy: gpu.zeros(1),
        })
    }

    /// Storage buffers holding the decoder's linear weights: one per weight unless some are larger
    /// than a binding and split into row blocks.
    pub fn linear_weight_buffers(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| &l.linears)
            .map(|lin| lin.blocks.len())
            .sum()
    }

    pub(crate) fn head(&self) -> &GpuDense {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// LoRA matrices in GPU memory, `pairs[layer][kind]` = (A [r, in], B [out, r]).
pub struct GpuLora {
    pub scale: f32,
    pub rank: usize,
    pub(crate) pairs: Vec<Vec<Option<(GpuBuffer, GpuBuffer)>>>,
}

impl GpuLora {
    pub fn upload(gpu: &Gpu, adapter: &LoraAdapter) -> Self {
        GpuLora {
            scale: adapter.config.scale(),
            rank: adapter.config.r,
            pairs: adapter
                .layers
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|p| {
                            p.as_ref()
                                .map(|p| (gpu.upload_f32(&p.a), gpu.upload_f32(&p.b)))
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// The A and B buffers of every pair, in `LoraAdapter::pairs` order.
    pub fn buffers(&self) -> impl Iterator<Item = &GpuBuffer> {
        self.pairs
            .iter()
            .flatten()
            .flatten()
            .flat_map(|(a, b)| [a, b])
    }

    /// Reads the matrices back into `into` (which gives the shapes).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn download(&self, gpu: &Gpu, into: &mut LoraAdapter) -> Result<()> {
        pollster::block_on(self.download_async(gpu, into))
    }

    pub async fn download_async(&self, gpu: &Gpu, into: &mut LoraAdapter) -> Result<()> {
        let buffers: Vec<&GpuBuffer> = self.buffers().collect();
        let mut values = gpu
            .submit_and_read_async(gpu.encoder(), &buffers)
            .await?
            .into_iter();
        for (_, _, pair) in into.pairs_mut() {
            pair.a = values.next().expect("same pairs");
            pair.b = values.next().expect("same pairs");
        }
        Ok(())
    }
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

fn view(buf: &GpuBuffer, rows: usize, cols: usize) -> View<'_> {
    View {
        buf,
        rows,
        cols,
        rs: cols,
        cs: 1,
    }
}

fn transposed(buf: &GpuBuffer, rows: usize, cols: usize) -> View<'_> {
    View {
        buf,
        rows: cols,
        cols: rows,
        rs: 1,
        cs: cols,
    }
}

struct LinearSaved {
    xa: GpuBuffer,
    /// The LoRA branch's dropout; the backward regenerates the mask from it.
    dropout: Option<DropoutParams>,
}

struct LayerSaved {
    x: GpuBuffer,
    xn1: GpuBuffer,
    inv1: GpuBuffer,
    q_pre: Option<(GpuBuffer, GpuBuffer)>,
    k_pre: Option<(GpuBuffer, GpuBuffer)>,
    q: GpuBuffer,
    k: GpuBuffer,
    v: GpuBuffer,
    attn: GpuBuffer,
    lse: GpuBuffer,
    x_mid: GpuBuffer,
    xn2: GpuBuffer,
    inv2: GpuBuffer,
    gate: GpuBuffer,
    up: GpuBuffer,
    h: GpuBuffer,
    linears: Vec<Option<LinearSaved>>,
}

struct Recorder<'a> {
    gpu: &'a Gpu,
    model: &'a GpuModel,
    lora: Option<&'a GpuLora>,
    enc: wgpu::CommandEncoder,
    tokens: usize,
    cos: GpuBuffer,
    sin: GpuBuffer,
    /// Per token, the first position it may attend to (the start of its example when packed).
    first_key: GpuBuffer,
    /// LoRA dropout is on when set: the seed of this sequence's counter-based masks.
    dropout_seed: Option<u64>,
    dropout_p: f32,
}

impl<'a> Recorder<'a> {
    fn c(&self) -> &ModelConfig {
        &self.model.config
    }

    fn scratch(&mut self, len: usize) -> GpuBuffer {
        self.gpu.scratch(&mut self.enc, len)
    }

    fn copy(&mut self, x: &GpuBuffer) -> GpuBuffer {
        let out = self.scratch(x.len);
        self.enc
            .copy_buffer_to_buffer(&x.buffer, 0, &out.buffer, 0, (x.len * 4) as u64);
        out
    }

    /// One vocabulary chunk of the output projection as a frozen linear layer: positions x chunk rows.
    fn ce_linear_params(&self, p: &CeParams, accumulate: bool) -> LinearParams {
        let model: &'a GpuModel = self.model;
        let head = model.head();
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

    /// logits[position, v] of one vocabulary chunk.
    fn ce_logits(
        &mut self,
        block: &GpuBuffer,
        p: &CeParams,
        hidden: &GpuBuffer,
        logits: &GpuBuffer,
    ) {
        let lp = self.ce_linear_params(p, false);
        let d = &self.model.dummy;
        let groups = linear_groups(p.chunk_len as usize, p.positions as usize);
        self.gpu.dispatch(
            &mut self.enc,
            "linear_forward",
            &lp,
            &[(1, block), (2, d), (3, d), (4, d), (5, hidden), (6, logits)],
            groups,
        );
    }

    /// d_hidden += d_logits · chunk rows.
    fn ce_grad_hidden(
        &mut self,
        block: &GpuBuffer,
        p: &CeParams,
        d_logits: &GpuBuffer,
        d_hidden: &GpuBuffer,
    ) {
        let lp = self.ce_linear_params(p, true);
        let d = &self.model.dummy;
        let groups = linear_groups(lp.cols as usize, p.positions as usize);
        self.gpu.dispatch(
            &mut self.enc,
            "linear_backward_input",
            &lp,
            &[(1, block), (2, d), (3, d), (5, d_logits), (6, d_hidden)],
            groups,
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
        accumulate: bool,
        with_bias: bool,
    ) -> LinearParams {
        LinearParams {
            tokens: self.tokens as u32,
            rows: block.rows as u32,
            cols: lin.cols as u32,
            fmt: lin.fmt,
            group_size: lin.group as u32,
            has_bias: (with_bias && lin.bias.is_some()) as u32,
            accumulate: accumulate as u32,
            row_offset: block.start as u32,
            out_stride: lin.rows as u32,
            weight_row: 0,
            _pad: [0; 2],
        }
    }

    fn linear_bindings(
        &self,
        lin: &'a GpuLinear,
        block: &'a LinearBlock,
    ) -> [(u32, &'a GpuBuffer); 4] {
        let model: &'a GpuModel = self.model;
        let d = &model.dummy;
        [
            (1, &block.words),
            (2, block.scales.as_ref().unwrap_or(d)),
            (3, block.mins.as_ref().unwrap_or(d)),
            (4, lin.bias.as_ref().unwrap_or(d)),
        ]
    }

    fn linear_forward(
        &mut self,
        l: usize,
        kind: LinearKind,
        x: &GpuBuffer,
    ) -> (GpuBuffer, Option<LinearSaved>) {
        let model: &'a GpuModel = self.model;
        let lin = &model.layers[l].linears[kind as usize];
        let t = self.tokens;
        let y = self.scratch(t * lin.rows);
        for block in &lin.blocks {
            let p = self.linear_params(lin, block, false, true);
            let mut bindings = self.linear_bindings(lin, block).to_vec();
            bindings.extend([(5, x), (6, &y)]);
            let groups = linear_groups(block.rows, t);
            self.gpu
                .dispatch(&mut self.enc, "linear_forward", &p, &bindings, groups);
        }
        let Some((a, b)) = self.lora.and_then(|lo| lo.pairs[l][kind as usize].as_ref()) else {
            return (y, None);
        };
        let (r, scale) = (
            self.lora.expect("checked").rank,
            self.lora.expect("checked").scale,
        );
        let dropout = self.dropout_params(l, kind, t * lin.cols);
        let dropped = dropout.map(|d| self.dropout_forward(&d, x));
        let xa = self.scratch(t * r);
        self.matmul(
            view(dropped.as_ref().unwrap_or(x), t, lin.cols),
            transposed(a, r, lin.cols),
            1.0,
            &xa,
            r,
            false,
        );
        self.matmul(
            view(&xa, t, r),
            transposed(b, lin.rows, r),
            scale,
            &y,
            lin.rows,
            true,
        );
        (y, Some(LinearSaved { xa, dropout }))
    }

    fn dropout_params(&self, l: usize, kind: LinearKind, n: usize) -> Option<DropoutParams> {
        let seed = self.dropout_seed?;
        (self.dropout_p > 0.0)
            .then(|| DropoutParams::new(n, seed, dropout::stream(l, kind as usize), self.dropout_p))
    }

    fn dropout_forward(&mut self, d: &DropoutParams, x: &GpuBuffer) -> GpuBuffer {
        let out = self.scratch(x.len);
        self.gpu.dispatch(
            &mut self.enc,
            "dropout_forward",
            d,
            &[(1, x), (2, &out)],
            groups_1d(x.len, 256),
        );
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        l: usize,
        kind: LinearKind,
        x: &GpuBuffer,
        saved: Option<&LinearSaved>,
        dy: &GpuBuffer,
        dx: &GpuBuffer,
        grads: Option<&GpuLora>,
    ) {
        let model: &'a GpuModel = self.model;
        let lin = &model.layers[l].linears[kind as usize];
        let t = self.tokens;
        // Every block adds its rows' share of dy·W.
        for block in &lin.blocks {
            let p = self.linear_params(lin, block, true, false);
            // The backward reads no bias, so its layout has no binding 4.
            let mut bindings: Vec<(u32, &GpuBuffer)> = self
                .linear_bindings(lin, block)
                .into_iter()
                .filter(|(b, _)| *b != 4)
                .collect();
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
        let (Some(lora), Some(saved)) = (self.lora, saved) else {
            return;
        };
        let Some((a, b)) = lora.pairs[l][kind as usize].as_ref() else {
            return;
        };
        let (r, out, inp) = (lora.rank, lin.rows, lin.cols);
        let dxa = self.scratch(t * r);
        self.matmul(
            view(dy, t, out),
            view(b, out, r),
            lora.scale,
            &dxa,
            r,
            false,
        );
        if let Some((ga, gb)) = grads.and_then(|g| g.pairs[l][kind as usize].as_ref()) {
            self.matmul(
                transposed(dy, t, out),
                view(&saved.xa, t, r),
                lora.scale,
                gb,
                r,
                true,
            );
            let dropped = saved.dropout.map(|d| self.dropout_forward(&d, x));
            let lora_in = dropped.as_ref().unwrap_or(x);
            self.matmul(
                transposed(&dxa, t, r),
                view(lora_in, t, inp),
                1.0,
                ga,
                inp,
                true,
            );
        }
        match &saved.dropout {
            None => self.matmul(view(&dxa, t, r), view(a, r, inp), 1.0, dx, inp, true),
            Some(d) => {
                let d_lora_in = self.scratch(t * inp);
                self.matmul(
                    view(&dxa, t, r),
                    view(a, r, inp),
                    1.0,
                    &d_lora_in,
                    inp,
                    false,
                );
                self.gpu.dispatch(
                    &mut self.enc,
                    "dropout_backward",
                    d,
                    &[(1, &d_lora_in), (2, dx)],
                    groups_1d(d_lora_in.len, 256),
                );
            }
        }
    }

    fn rms_params(&self, rows: usize, dim: usize) -> RmsNormParams {
        RmsNormParams::new(rows, dim, self.c().rms_norm_eps)
    }

    fn rmsnorm(&mut self, x: &GpuBuffer, w: &GpuBuffer, dim: usize) -> (GpuBuffer, GpuBuffer) {
        let rows = x.len / dim;
        let (y, inv) = (self.scratch(x.len), self.scratch(rows));
        let p = self.rms_params(rows, dim);
        let groups = groups_1d(rows, 1);
        self.gpu.dispatch(
            &mut self.enc,
            "rmsnorm_forward",
            &p,
            &[(1, x), (2, w), (3, &y), (4, &inv)],
            groups,
        );
        (y, inv)
    }

    fn rmsnorm_backward(
        &mut self,
        x: &GpuBuffer,
        w: &GpuBuffer,
        inv: &GpuBuffer,
        dy: &GpuBuffer,
        dim: usize,
    ) -> GpuBuffer {
        let rows = x.len / dim;
        let dx = self.scratch(x.len);
        let p = self.rms_params(rows, dim);
        let groups = groups_1d(rows, 1);
        self.gpu.dispatch(
            &mut self.enc,
            "rmsnorm_backward",
            &p,
            &[(1, x), (2, w), (3, &dx), (4, inv), (5, dy)],
            groups,
        );
        dx
    }

    fn add(&mut self, a: &GpuBuffer, b: &GpuBuffer) -> GpuBuffer {
        let out = self.scratch(a.len);
        let p = Dims4 {
            a: a.len as u32,
            b: 0,
            c: 0,
            d: 0,
        };
        self.gpu.dispatch(
            &mut self.enc,
            "add",
            &p,
            &[(1, a), (2, b), (3, &out)],
            groups_1d(a.len, 256),
        );
        out
    }

    fn rope(&mut self, x: &GpuBuffer, heads: usize, sign: f32) {
        let hd = self.c().head_dim;
        let p = RopeParams {
            tokens: self.tokens as u32,
            heads: heads as u32,
            head_dim: hd as u32,
            sign,
        };
        let groups = [
            (hd / 2).div_ceil(64) as u32,
            heads as u32,
            self.tokens as u32,
        ];
        self.gpu.dispatch(
            &mut self.enc,
            "rope_apply",
            &p,
            &[(1, &self.cos), (2, &self.sin), (3, x)],
            groups,
        );
    }

    fn attention_params(&self) -> AttentionParams {
        let c = self.c();
        AttentionParams {
            tokens: self.tokens as u32,
            heads: c.num_heads as u32,
            kv_heads: c.num_kv_heads as u32,
            head_dim: c.head_dim as u32,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            pass_begin: 0,
            pass_end: self.tokens as u32,
            pass_flags: 3,
        }
    }

    /// An attention kernel's walk over all tokens (keys or queries) as passes whose loop iterations per
    /// invocation stay within the device's budget: each row walked costs a thread `loops_per_row` loops
    /// over the head dimension. One pass where the device has no budget.
    fn attention_passes(&self, loops_per_row: usize) -> Vec<AttentionParams> {
        let base = self.attention_params();
        let t = self.tokens.max(1);
        // A few more iterations per row for the walk's own loops (tile rows, staging).
        let per_pass = self.gpu.loop_budget.map_or(t, |budget| {
            (budget / (loops_per_row * self.c().head_dim + 8)).max(1)
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

    fn layer_forward(&mut self, l: usize, x: GpuBuffer) -> (GpuBuffer, LayerSaved) {
        let c = self.c().clone();
        let t = self.tokens;
        let model: &'a GpuModel = self.model;
        let layer = &model.layers[l];
        let (xn1, inv1) = self.rmsnorm(&x, &layer.input_norm, c.hidden_size);
        let mut linears: Vec<Option<LinearSaved>> = (0..7).map(|_| None).collect();
        let (mut q, sq) = self.linear_forward(l, LinearKind::Q, &xn1);
        let (mut k, sk) = self.linear_forward(l, LinearKind::K, &xn1);
        let (v, sv) = self.linear_forward(l, LinearKind::V, &xn1);
        linears[LinearKind::Q as usize] = sq;
        linears[LinearKind::K as usize] = sk;
        linears[LinearKind::V as usize] = sv;
        let (mut q_pre, mut k_pre) = (None, None);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (qq, iq) = self.rmsnorm(&q, qn, c.head_dim);
            let (kk, ik) = self.rmsnorm(&k, kn, c.head_dim);
            q_pre = Some((std::mem::replace(&mut q, qq), iq));
            k_pre = Some((std::mem::replace(&mut k, kk), ik));
        }
        self.rope(&q, c.num_heads, 1.0);
        self.rope(&k, c.num_kv_heads, 1.0);
        let attn = self.scratch(t * c.q_dim());
        // shaders/attention.wgsl: each row's log-sum-exp, then its softmax denominator or delta.
        let lse = self.scratch(2 * c.num_heads * t);
        let groups = [t.div_ceil(64) as u32, c.num_heads as u32, 1];
        // Per key: the score's dot product and the running sum's update.
        for p in self.attention_passes(2) {
            self.gpu.dispatch(
                &mut self.enc,
                "attention_forward",
                &p,
                &[
                    (1, &q),
                    (2, &k),
                    (3, &v),
                    (4, &attn),
                    (5, &lse),
                    (10, &self.first_key),
                ],
                groups,
            );
        }
        let (o, so) = self.linear_forward(l, LinearKind::O, &attn);
        linears[LinearKind::O as usize] = so;
        let x_mid = self.add(&x, &o);
        let (xn2, inv2) = self.rmsnorm(&x_mid, &layer.post_norm, c.hidden_size);
        let (gate, sg) = self.linear_forward(l, LinearKind::Gate, &xn2);
        let (up, su) = self.linear_forward(l, LinearKind::Up, &xn2);
        linears[LinearKind::Gate as usize] = sg;
        linears[LinearKind::Up as usize] = su;
        let h = self.scratch(gate.len);
        let n = Dims4 {
            a: gate.len as u32,
            b: 0,
            c: 0,
            d: 0,
        };
        self.gpu.dispatch(
            &mut self.enc,
            "swiglu_forward",
            &n,
            &[(1, &gate), (2, &up), (3, &h)],
            groups_1d(gate.len, 256),
        );
        let (down, sd) = self.linear_forward(l, LinearKind::Down, &h);
        linears[LinearKind::Down as usize] = sd;
        let x_out = self.add(&x_mid, &down);
        let saved = LayerSaved {
            x,
            xn1,
            inv1,
            q_pre,
            k_pre,
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
            h,
            linears,
        };
        (x_out, saved)
    }

    fn layer_backward(
        &mut self,
        l: usize,
        s: &LayerSaved,
        dx_out: &GpuBuffer,
        grads: Option<&GpuLora>,
    ) -> GpuBuffer {
        let c = self.c().clone();
        let t = self.tokens;
        let model: &'a GpuModel = self.model;
        let layer = &model.layers[l];
        let saved = |k: LinearKind| s.linears[k as usize].as_ref();
        let dh = self.scratch(s.h.len);
        self.linear_backward(
            l,
            LinearKind::Down,
            &s.h,
            saved(LinearKind::Down),
            dx_out,
            &dh,
            grads,
        );
        let (dgate, dup) = (self.scratch(dh.len), self.scratch(dh.len));
        let n = Dims4 {
            a: dh.len as u32,
            b: 0,
            c: 0,
            d: 0,
        };
        let bindings = [(1, &s.gate), (2, &s.up), (3, &dgate), (4, &dup), (5, &dh)];
        self.gpu.dispatch(
            &mut self.enc,
            "swiglu_backward",
            &n,
            &bindings,
            groups_1d(dh.len, 256),
        );
        let dxn2 = self.scratch(t * c.hidden_size);
        self.linear_backward(
            l,
            LinearKind::Gate,
            &s.xn2,
            saved(LinearKind::Gate),
            &dgate,
            &dxn2,
            grads,
        );
        self.linear_backward(
            l,
            LinearKind::Up,
            &s.xn2,
            saved(LinearKind::Up),
            &dup,
            &dxn2,
            grads,
        );
        let d_norm2 =
            self.rmsnorm_backward(&s.x_mid, &layer.post_norm, &s.inv2, &dxn2, c.hidden_size);
        let dx_mid = self.add(&d_norm2, dx_out);

        let d_attn = self.scratch(t * c.q_dim());
        self.linear_backward(
            l,
            LinearKind::O,
            &s.attn,
            saved(LinearKind::O),
            &dx_mid,
            &d_attn,
            grads,
        );
        let p = self.attention_params();
        let (mut dq, mut dk, dv) = (
            self.scratch(s.q.len),
            self.scratch(s.k.len),
            self.scratch(s.v.len),
        );
        let heads_groups = [t.div_ceil(64) as u32, c.num_heads as u32, 1];
        self.gpu.dispatch(
            &mut self.enc,
            "attention_delta",
            &p,
            &[(4, &s.attn), (5, &s.lse), (6, &d_attn)],
            heads_groups,
        );
        // Each query head's share of dk and dv, summed over each kv head's group at the end.
        let (dk_shares, dv_shares) = (self.scratch(s.q.len), self.scratch(s.q.len));
        let first_key = &self.first_key;
        let common = [
            (1, &s.q),
            (2, &s.k),
            (3, &s.v),
            (5, &s.lse),
            (6, &d_attn),
            (10, first_key),
        ];
        let mut b = common.to_vec();
        b.push((8, &dq));
        // Per key: the score, d_out·v and the update of dq.
        for pass in self.attention_passes(3) {
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
        for pass in self.attention_passes(3) {
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
            &[(8, &dk_shares), (9, &dv_shares), (12, &dk), (13, &dv)],
            [
                c.head_dim.div_ceil(64) as u32,
                c.num_kv_heads as u32,
                t as u32,
            ],
        );
        self.rope(&dq, c.num_heads, -1.0);
        self.rope(&dk, c.num_kv_heads, -1.0);
        if let (Some(qn), Some(kn), Some((qp, iq)), Some((kp, ik))) =
            (&layer.q_norm, &layer.k_norm, &s.q_pre, &s.k_pre)
        {
            dq = self.rmsnorm_backward(qp, qn, iq, &dq, c.head_dim);
            dk = self.rmsnorm_backward(kp, kn, ik, &dk, c.head_dim);
        }
        let dxn1 = self.scratch(t * c.hidden_size);
        for (kind, d) in [
            (LinearKind::Q, &dq),
            (LinearKind::K, &dk),
            (LinearKind::V, &dv),
        ] {
            self.linear_backward(l, kind, &s.xn1, saved(kind), d, &dxn1, grads);
        }
        let d_norm1 = self.rmsnorm_backward(&s.x, &layer.input_norm, &s.inv1, &dxn1, c.hidden_size);
        self.add(&d_norm1, &dx_mid)
    }

    fn embed(&mut self, ids: &GpuBuffer) -> GpuBuffer {
        let (t, h) = (self.tokens, self.c().hidden_size);
        let x = self.scratch(t * h);
        let model: &'a GpuModel = self.model;
        let table = &model.embed;
        for (start, rows, block) in &table.blocks {
            let p = EmbedParams {
                tokens: t as u32,
                dim: h as u32,
                fmt: table.fmt,
                row_start: *start as u32,
                row_count: *rows as u32,
                _pad: [0; 3],
            };
            self.gpu.dispatch(
                &mut self.enc,
                "embed",
                &p,
                &[(1, block), (2, ids), (3, &x)],
                [h.div_ceil(64) as u32, t as u32, 1],
            );
        }
        x
    }

    fn rows(
        &mut self,
        entry: &'static str,
        src: &GpuBuffer,
        index: &GpuBuffer,
        dst: &GpuBuffer,
        rows: usize,
    ) {
        let dim = self.c().hidden_size;
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

    /// Calls `f` for each vocabulary chunk with its block buffer and parameters.
    fn for_each_chunk(
        &mut self,
        positions: usize,
        grad_scale: f32,
        mut f: impl FnMut(&mut Self, &GpuBuffer, CeParams),
    ) {
        // The model outlives the recorder ('a), so its blocks can be borrowed while `self` is mutated.
        let model: &'a GpuModel = self.model;
        let head = model.head();
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
}

fn rope_tables(gpu: &Gpu, c: &ModelConfig, positions: &[u32]) -> (GpuBuffer, GpuBuffer) {
    let (cos, sin) = rope::tables(
        positions,
        &rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
    );
    (gpu.upload_f32(&cos), gpu.upload_f32(&sin))
}

/// Workgroups of shaders/linear.wgsl for `outputs` columns of y (dx) and `tokens` rows: 64 x 64 each.
pub(crate) fn linear_groups(outputs: usize, tokens: usize) -> [u32; 3] {
    [outputs.div_ceil(64) as u32, tokens.div_ceil(64) as u32, 1]
}

/// Activations are one buffer each, bound whole: the widest, [tokens, the widest of the hidden size,
/// the MLP's intermediate size, the query width and a vocabulary chunk] in f32, must fit one storage
/// binding. Checked before anything is recorded, so that a sequence too long for the device is an
/// error that says what to change, not a failure inside wgpu.
pub(crate) fn check_activation_bindings(gpu: &Gpu, c: &ModelConfig, tokens: usize) -> Result<()> {
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

/// A recorder for one sequence (its tokens' positions inside their examples and, per token, the first
/// position it may attend to).
fn recorder<'a>(
    gpu: &'a Gpu,
    model: &'a GpuModel,
    lora: Option<&'a GpuLora>,
    seq: &Sequence,
    enc: wgpu::CommandEncoder,
) -> Recorder<'a> {
    let (cos, sin) = rope_tables(gpu, &model.config, &seq.positions());
    Recorder {
        gpu,
        model,
        lora,
        enc,
        tokens: seq.ids.len(),
        cos,
        sin,
        first_key: gpu.upload_u32(&seq.segments()),
        dropout_seed: None,
        dropout_p: 0.0,
    }
}

/// What the forward keeps of a layer for the backward: everything, or (gradient checkpointing) only its
/// input, from which the backward recomputes the rest (dropout masks included: they are counter-based).
enum Kept {
    Full(LayerSaved),
    Checkpoint(GpuBuffer),
}

/// Runs the decoder; returns the final normalised hidden states and what the backward needs.
fn decoder(
    r: &mut Recorder,
    ids: &[u32],
    checkpoint: bool,
) -> (GpuBuffer, Vec<Kept>, GpuBuffer, GpuBuffer) {
    let ids = r.gpu.upload_u32(ids);
    let mut x = r.embed(&ids);
    let mut kept = Vec::new();
    for l in 0..r.model.layers.len() {
        if checkpoint {
            let input = r.copy(&x);
            // The layer's saved activations go back to the pool here, for the next layer to reuse.
            let (next, _) = r.layer_forward(l, x);
            kept.push(Kept::Checkpoint(input));
            x = next;
        } else {
            let (next, s) = r.layer_forward(l, x);
            kept.push(Kept::Full(s));
            x = next;
        }
    }
    let h = r.c().hidden_size;
    let (xf, inv) = r.rmsnorm(&x, &r.model.final_norm, h);
    (xf, kept, x, inv)
}

/// Logits [tokens, vocab] (small models and parity tests).
#[cfg(not(target_arch = "wasm32"))]
pub fn logits(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    ids: &[u32],
) -> Result<Vec<f32>> {
    pollster::block_on(logits_async(gpu, model, lora, ids))
}

pub async fn logits_async(
    gpu: &Gpu,
    model: &GpuModel,
    lora: Option<&GpuLora>,
    ids: &[u32],
) -> Result<Vec<f32>> {
    crate::cpu::check_tokens(ids, model.config.vocab_size)?;
    check_activation_bindings(gpu, &model.config, ids.len())?;
    let mut r = recorder(
        gpu,
        model,
        lora,
        &Sequence::all_tokens(ids.to_vec()),
        gpu.encoder(),
    );
    let (xf, _, _, _) = decoder(&mut r, ids, false);
    let t = ids.len();
    let vocab = model.config.vocab_size;
    let mut chunks = Vec::new();
    r.for_each_chunk(t, 0.0, |r, block, p| {
        let logits = r.scratch(t * p.chunk_len as usize);
        r.ce_logits(block, &p, &xf, &logits);
        chunks.push((
            (p.block_start + p.chunk_start) as usize,
            p.chunk_len as usize,
            logits,
        ));
    });
    let reads: Vec<&GpuBuffer> = chunks.iter().map(|(_, _, b)| b).collect();
    let values = gpu.submit_and_read_async(r.enc, &reads).await?;
    let mut out = vec![0f32; t * vocab];
    for ((start, n, _), chunk) in chunks.iter().zip(values) {
        for pos in 0..t {
            out[pos * vocab + start..pos * vocab + start + n]
                .copy_from_slice(&chunk[pos * n..(pos + 1) * n]);
        }
    }
    Ok(out)
}

/// Forward over one sequence and, with `grads`, the backward adding ∂(grad_scale · loss_sum)/∂θ into
/// the GPU gradient buffers. One submission; only the per-position losses are read back.
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
    let result = record_sequence(gpu, model, lora, grads, seq, options, &mut enc)?;
    let Some(result) = result else {
        return Ok(StepLoss {
            loss_sum: 0.0,
            targets: 0,
        });
    };
    let values = gpu.submit_and_read_async(enc, &[&result]).await?;
    Ok(sequence_loss(&values[0]))
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

/// Records one sequence's forward (and with `grads` its backward) into `enc`. Returns the buffer of
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
    let grad_scale = options.grad_scale;
    seq.check(model.config.vocab_size)?;
    check_activation_bindings(gpu, &model.config, seq.ids.len())?;
    let positions: Vec<u32> = (0..seq.ids.len() as u32)
        .filter(|&t| seq.targets[t as usize].is_some())
        .collect();
    if positions.is_empty() {
        return Ok(None);
    }
    let labels: Vec<u32> = positions
        .iter()
        .map(|&t| seq.targets[t as usize].expect("filtered"))
        .collect();
    let (t, h, np) = (seq.ids.len(), model.config.hidden_size, positions.len());
    let outer = std::mem::replace(enc, gpu.encoder());
    let mut r = recorder(gpu, model, lora, seq, outer);
    if let Some((seed, p)) = options.dropout {
        r.dropout_seed = Some(seed);
        r.dropout_p = p;
    }
    let (xf, kept, x_last, inv_f) = decoder(&mut r, &seq.ids, options.checkpoint);
    let index = gpu.upload_u32(&positions);
    let labels_buf = gpu.upload_u32(&labels);
    let hidden = r.scratch(np * h);
    r.rows("gather_rows", &xf, &index, &hidden, np);
    let state = gpu.upload_f32(
        &positions
            .iter()
            .flat_map(|_| [-3.0e38f32, 0.0, 0.0])
            .collect::<Vec<_>>(),
    );
    let result = r.scratch(2 * np);
    let logits = r.scratch(np * VOCAB_CHUNK);
    r.for_each_chunk(np, grad_scale, |r, block, p| {
        r.ce_logits(block, &p, &hidden, &logits);
        r.gpu.dispatch(
            &mut r.enc,
            "ce_reduce",
            &p,
            &[(3, &logits), (4, &state), (5, &labels_buf)],
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
    r.gpu.dispatch(
        &mut r.enc,
        "ce_finalize",
        &p,
        &[(4, &state), (7, &result)],
        groups_1d(np, 64),
    );

    if let Some(grads) = grads {
        let d_hidden = r.scratch(np * h);
        r.for_each_chunk(np, grad_scale, |r, block, p| {
            r.ce_logits(block, &p, &hidden, &logits);
            let groups = [p.chunk_len.div_ceil(64), np as u32, 1];
            r.gpu.dispatch(
                &mut r.enc,
                "ce_grad_logits",
                &p,
                &[(3, &logits), (5, &labels_buf), (7, &result)],
                groups,
            );
            r.ce_grad_hidden(block, &p, &logits, &d_hidden);
        });
        let dxf = r.scratch(t * h);
        r.rows("scatter_rows", &d_hidden, &index, &dxf, np);
        let mut dx = r.rmsnorm_backward(&x_last, &model.final_norm, &inv_f, &dxf, h);
        for (l, k) in kept.iter().enumerate().rev() {
            dx = match k {
                Kept::Full(saved) => r.layer_backward(l, saved, &dx, Some(grads)),
                Kept::Checkpoint(x) => {
                    let input = r.copy(&x);
                    let (_, saved) = r.layer_forward(l, input);
                    r.layer_backward(l, &saved, &dx, Some(grads))
                }
            };
        }
    }
    *enc = r.enc;
    Ok(Some(result))
}

/// Zeroed gradient buffers shaped like `adapter`.
pub fn zero_grads(gpu: &Gpu, adapter: &LoraAdapter) -> GpuLora {
    GpuLora::upload(gpu, &adapter.zeros_like())
}
