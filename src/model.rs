//! A decoder-only model's weights as nibble holds them: the decoder's linear weights packed to 4 bits (or
//! dense with `--quant none`), embeddings and lm_head in their 16-bit checkpoint dtype, norms and biases
//! in f32. Loading streams one tensor at a time so that peak memory stays near the packed size.

use crate::config::{ExpectedTensor, LinearKind, ModelConfig, TensorRole};
use crate::error::{Error, Result};
use crate::quant::{QuantFormat, QuantSpec, QuantTensor};
use crate::source::{Float8, FloatDtype, ModelFiles, SafetensorsFile, unsupported_dtype};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// The `format` metadata value that marks a safetensors file written by `nibble quantize`.
pub const QUANTIZED_FORMAT_TAG: &str = "nibble-quantized";
const META_FORMAT: &str = "format";
const META_QUANT: &str = "quant_format";
const META_GROUP: &str = "group_size";
const META_SOURCE: &str = "source";
const META_CONFIG: &str = "config";
/// transformers' generation defaults for the model, in a folder and in a quantized file's metadata.
pub const GENERATION_CONFIG: &str = "generation_config.json";
const META_VERSION: &str = "nibble_version";

/// Tokenizer files travel with the model (in a folder, or inside a quantized file's metadata).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerFiles {
    pub tokenizer_json: Option<String>,
    pub tokenizer_config_json: Option<String>,
    pub chat_template_jinja: Option<String>,
}

impl TokenizerFiles {
    const NAMES: [&'static str; 3] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ];

    fn fields_mut(&mut self) -> [&mut Option<String>; 3] {
        [
            &mut self.tokenizer_json,
            &mut self.tokenizer_config_json,
            &mut self.chat_template_jinja,
        ]
    }

    fn fields(&self) -> [&Option<String>; 3] {
        [
            &self.tokenizer_json,
            &self.tokenizer_config_json,
            &self.chat_template_jinja,
        ]
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A rows x cols matrix kept in its checkpoint dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData,
}

impl DenseTensor {
    /// `values` (rows x cols) stored as `dtype`, rounded to nearest as a checkpoint's are.
    pub fn from_f32(dtype: FloatDtype, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "from_f32: a rows x cols matrix");
        let data = match dtype {
            FloatDtype::F32 => DenseData::F32(values.to_vec()),
            FloatDtype::F16 => DenseData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            FloatDtype::BF16 => {
                DenseData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
        };
        DenseTensor { rows, cols, data }
    }

    /// No rows yet, room for `rows` (`append_rows`).
    fn empty(dtype: FloatDtype, rows: usize, cols: usize) -> Self {
        let data = match dtype {
            FloatDtype::F32 => DenseData::F32(Vec::with_capacity(rows * cols)),
            FloatDtype::F16 => DenseData::F16(Vec::with_capacity(rows * cols)),
            FloatDtype::BF16 => DenseData::BF16(Vec::with_capacity(rows * cols)),
        };
        DenseTensor {
            rows: 0,
            cols,
            data,
        }
    }

    /// `more`'s rows after these (both of one dtype and width).
    fn append_rows(&mut self, more: DenseTensor) {
        assert_eq!(self.cols, more.cols, "append_rows: one width");
        match (&mut self.data, more.data) {
            (DenseData::F32(a), DenseData::F32(b)) => a.extend(b),
            (DenseData::F16(a), DenseData::F16(b)) => a.extend(b),
            (DenseData::BF16(a), DenseData::BF16(b)) => a.extend(b),
            _ => panic!("append_rows: one dtype"),
        }
        self.rows += more.rows;
    }

    fn from_raw(dtype: FloatDtype, rows: usize, cols: usize, raw: &[u8]) -> Self {
        // In parallel: an embedding table is hundreds of megabytes read from the mapped file. Written
        // into memory advised for huge pages first (the output projection is read once per token).
        fn halves<T: Send>(raw: &[u8], from_bits: fn(u16) -> T) -> Vec<T> {
            let mut out = Vec::with_capacity(raw.len() / 2);
            crate::alloc::advise_huge_pages(out.spare_capacity_mut());
            out.par_extend(
                raw.par_chunks_exact(2)
                    .with_min_len(1 << 16)
                    .map(move |b| from_bits(u16::from_le_bytes([b[0], b[1]]))),
            );
            out
        }
        let data = match dtype {
            FloatDtype::F32 => {
                let mut v = vec![0f32; rows * cols];
                crate::alloc::advise_huge_pages(&v);
                dtype.convert(raw, &mut v);
                DenseData::F32(v)
            }
            FloatDtype::F16 => DenseData::F16(halves(raw, f16::from_bits)),
            FloatDtype::BF16 => DenseData::BF16(halves(raw, bf16::from_bits)),
        };
        DenseTensor { rows, cols, data }
    }

    pub fn dtype(&self) -> FloatDtype {
        match self.data {
            DenseData::F32(_) => FloatDtype::F32,
            DenseData::F16(_) => FloatDtype::F16,
            DenseData::BF16(_) => FloatDtype::BF16,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            DenseData::F32(v) => bytemuck::cast_slice(v),
            DenseData::F16(v) => bytemuck::cast_slice(v),
            DenseData::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// Element (r, c) as f32.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let at = r * self.cols + c;
        match &self.data {
            DenseData::F32(v) => v[at],
            DenseData::F16(v) => v[at].to_f32(),
            DenseData::BF16(v) => v[at].to_f32(),
        }
    }

    /// Row `r` set to `values`, rounded to the table's dtype.
    pub fn set_row_f32(&mut self, r: usize, values: &[f32]) {
        assert_eq!(values.len(), self.cols, "set_row_f32: values are one row");
        let range = r * self.cols..(r + 1) * self.cols;
        match &mut self.data {
            DenseData::F32(v) => v[range].copy_from_slice(values),
            DenseData::F16(v) => v[range]
                .iter_mut()
                .zip(values)
                .for_each(|(o, &x)| *o = f16::from_f32(x)),
            DenseData::BF16(v) => v[range]
                .iter_mut()
                .zip(values)
                .for_each(|(o, &x)| *o = bf16::from_f32(x)),
        }
    }

    /// The rows `rows` names, in place.
    pub fn put_rows(&mut self, rows: &crate::lora::TokenRows) {
        for (r, values) in rows.rows(self.cols) {
            self.set_row_f32(r, values);
        }
    }

    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "row_f32: out is one row");
        self.row_part_f32(r, 0, out);
    }

    /// Columns `first_col..first_col + out.len()` of row `r` as f32. Inlined so that a caller built
    /// for wider vectors (int16_gemm's AVX2 panels) converts with them.
    #[inline(always)]
    pub fn row_part_f32(&self, r: usize, first_col: usize, out: &mut [f32]) {
        assert!(
            first_col + out.len() <= self.cols,
            "row_part_f32: columns past the row"
        );
        let range = r * self.cols + first_col..r * self.cols + first_col + out.len();
        match &self.data {
            DenseData::F32(v) => out.copy_from_slice(&v[range]),
            // half's slice conversion uses the CPU's f16 instructions (F16C, NEON) where present.
            DenseData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[range].convert_to_f32_slice(out)
            }
            // A bf16 is the top half of an f32: the shift is exact for every value (a NaN stays a
            // NaN) and, unlike `to_f32`'s NaN branch, vectorises.
            DenseData::BF16(v) => out
                .iter_mut()
                .zip(&v[range])
                .for_each(|(o, x)| *o = f32::from_bits((x.to_bits() as u32) << 16)),
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_f32(r, row);
        }
        out
    }
}

/// The frozen weight of a linear layer.
#[derive(Clone, Debug, PartialEq)]
pub enum LinearWeight {
    Dense(DenseTensor),
    Quant(QuantTensor),
}

impl LinearWeight {
    pub fn bytes(&self) -> u64 {
        match self {
            LinearWeight::Dense(d) => d.as_bytes().len() as u64,
            LinearWeight::Quant(q) => q.bytes(),
        }
    }

    /// The weight as f32 (dequantized when packed), row-major [out, in].
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            LinearWeight::Dense(d) => d.to_f32(),
            LinearWeight::Quant(q) => q.dequantize(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    pub kind: LinearKind,
    pub weight: LinearWeight,
    pub bias: Option<Vec<f32>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    /// In `ModelConfig::layer_linears` order, less a router (`LinearKind::Router`, in `moe`).
    pub linears: Vec<Linear>,
    /// A mixture-of-experts layer's router (dense) and stacked experts (`TensorRole::Router`,
    /// `TensorRole::Experts`), by tensor name; empty for a dense MLP.
    pub moe: Vec<(String, LinearWeight)>,
}

impl Layer {
    /// The layer's linear of `kind`; panics on a kind the model does not have (fused or not).
    pub fn linear(&self, kind: LinearKind) -> &Linear {
        self.linears
            .iter()
            .find(|l| l.kind == kind)
            .unwrap_or_else(|| panic!("the model has no {} linears", kind.module_name()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub config: ModelConfig,
    /// Shared: the GPU executor keeps an untied embedding in host memory and binds this one.
    pub embed: std::sync::Arc<DenseTensor>,
    /// Shared: a run training token rows keeps a copy of the model whose tables it changes.
    pub layers: std::sync::Arc<Vec<Layer>>,
    /// Every norm's scale by tensor name, in checkpoint order (layer norms, q/k norms, the final norm).
    pub norms: Vec<(String, Vec<f32>)>,
    /// None when the embeddings are tied.
    pub lm_head: Option<DenseTensor>,
    /// Other frozen matrices kept dense (`TensorRole::Table`: Gemma 4's per-layer embedding and
    /// projection) by tensor name; shared, as the GPU executor keeps the embedding in host memory.
    pub tables: Vec<(String, std::sync::Arc<DenseTensor>)>,
    /// How the decoder linears are stored; None means dense.
    pub quant: Option<QuantSpec>,
    pub source: String,
}

/// A frozen tensor of a loaded model, as the executors bind it.
#[derive(Clone, Copy)]
pub enum TensorRef<'a> {
    /// A linear layer's weight, packed 4-bit or dense.
    Linear(&'a LinearWeight),
    /// A dense matrix read by rows: the embedding, the output projection.
    Table(&'a DenseTensor),
    /// A norm's scale or a linear's bias.
    Vector(&'a [f32]),
}

/// Frozen tensors by the names a model's graph builder gives them: what an executor binds.
pub trait FrozenWeights: Sync {
    fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)>;

    /// Rows of tensor `name` that a device must keep in one of the blocks it splits a large weight
    /// into: a mixture's stacked experts are multiplied one expert's rows at a time.
    fn rows_kept_together(&self, _name: &str) -> usize {
        1
    }

    /// Bytes the tensors occupy in memory (as stored: packed 4-bit, 16-bit or f32).
    fn tensor_bytes(&self) -> u64 {
        self.named_tensors()
            .iter()
            .map(|(_, t)| match t {
                TensorRef::Linear(w) => w.bytes(),
                TensorRef::Table(t) => t.as_bytes().len() as u64,
                TensorRef::Vector(v) => 4 * v.len() as u64,
            })
            .sum()
    }

    /// A 64-bit digest of the weights that tells two models of one shape apart (a base and its merged
    /// fine-tune, say) without reading every byte: each tensor's name, size and three 256-byte samples
    /// (start, middle, end) of its stored form.
    fn fingerprint(&self) -> u64 {
        let mut hash = crate::rng::Fnv1a::new();
        let mut sample = |bytes: &[u8]| {
            hash.write(&(bytes.len() as u64).to_le_bytes());
            let n = bytes.len();
            for start in [0, n / 2, n.saturating_sub(256)] {
                hash.write(&bytes[start.min(n)..(start + 256).min(n)]);
            }
        };
        for (name, tensor) in self.named_tensors() {
            sample(name.as_bytes());
            match tensor {
                TensorRef::Table(t) => sample(t.as_bytes()),
                TensorRef::Vector(v) => sample(bytemuck::cast_slice(v)),
                TensorRef::Linear(LinearWeight::Dense(d)) => sample(d.as_bytes()),
                TensorRef::Linear(LinearWeight::Quant(q)) => {
                    sample(bytemuck::cast_slice(&q.packed));
                    sample(bytemuck::cast_slice(&q.scales));
                    sample(bytemuck::cast_slice(&q.mins));
                }
            }
        }
        hash.finish()
    }
}

/// Frozen tensors held by name: linears (4-bit or dense) and vectors (norm scales, biases). Models
/// that are not decoders (FLUX.2's transformer and VAE) keep their weights here.
#[derive(Default)]
pub struct NamedWeights {
    pub linears: std::collections::BTreeMap<String, LinearWeight>,
    pub vectors: std::collections::BTreeMap<String, Vec<f32>>,
}

impl FrozenWeights for NamedWeights {
    fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        let linears = self
            .linears
            .iter()
            .map(|(n, w)| (n.clone(), TensorRef::Linear(w)));
        let vectors = self
            .vectors
            .iter()
            .map(|(n, v)| (n.clone(), TensorRef::Vector(v)));
        linears.chain(vectors).collect()
    }
}

impl FrozenWeights for Model {
    fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        Model::named_tensors(self)
    }

    fn rows_kept_together(&self, name: &str) -> usize {
        let Some(m) = &self.config.moe else {
            return 1;
        };
        if name.ends_with(crate::config::EXPERTS_GATE_UP) {
            2 * m.inter
        } else if name.ends_with(crate::config::EXPERTS_DOWN) {
            self.config.hidden_size
        } else {
            1
        }
    }
}

impl Model {
    /// The scale vector of the norm named `name` (`model.norm.weight`), if the model has one.
    pub fn norm(&self, name: &str) -> Option<&[f32]> {
        self.norms
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The tables a GPU keeps in host memory (`decoder::host_tables`), shared with this model (one
    /// not found here would go to the device).
    pub fn host_tables(&self) -> Vec<(String, std::sync::Arc<DenseTensor>)> {
        let held = std::iter::once((self.config.tensor("embed_tokens.weight"), &self.embed)).chain(
            self.tables
                .iter()
                .map(|(name, table)| (name.clone(), table)),
        );
        let on_host = crate::models::decoder::host_tables(&self.config);
        held.filter(|(name, _)| on_host.contains(name))
            .map(|(name, table)| (name, table.clone()))
            .collect()
    }

    /// The frozen weight of the linear at a module path (`model.layers.3.self_attn.q_proj`).
    pub fn linear_weight(&self, path: &str) -> Result<&LinearWeight> {
        let name = format!("{path}.weight");
        match self.named_tensors().into_iter().find(|(n, _)| *n == name) {
            Some((_, TensorRef::Linear(w))) => Ok(w),
            _ => Err(Error::Invalid(format!(
                "{name} is no linear layer's weight of this model"
            ))),
        }
    }

    /// Every frozen tensor by its checkpoint name (the names the graph builders use). The tied output
    /// projection has no entry of its own: it is the embedding.
    pub fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        let mut out = vec![(
            self.config.tensor("embed_tokens.weight"),
            TensorRef::Table(&self.embed),
        )];
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), TensorRef::Table(head)));
        }
        for (name, table) in &self.tables {
            out.push((name.clone(), TensorRef::Table(table)));
        }
        for (name, norm) in &self.norms {
            out.push((name.clone(), TensorRef::Vector(norm)));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            for lin in &layer.linears {
                let path = self.config.linear_path(lin.kind, l);
                out.push((format!("{path}.weight"), TensorRef::Linear(&lin.weight)));
                if let Some(b) = &lin.bias {
                    out.push((format!("{path}.bias"), TensorRef::Vector(b)));
                }
            }
            for (name, w) in &layer.moe {
                out.push((name.clone(), TensorRef::Linear(w)));
            }
        }
        out
    }

    /// Puts an adapter's whole modules (PEFT's `modules_to_save`) or rows (`trainable_token_indices`)
    /// in place of the base's embedding and output projection, each kept in the dtype of the table
    /// it replaces. A tied model whose two tables then differ reads them apart, as PEFT's model does.
    pub fn put_saved_modules(&mut self, saved: &crate::lora::SavedModules) {
        let (rows, cols) = (self.embed.rows, self.embed.cols);
        if saved.unties(self.config.tie_word_embeddings) {
            self.lm_head = Some((*self.embed).clone());
            self.config.tie_word_embeddings = false;
        }
        if let Some((_, values)) = &saved.embed {
            let dtype = self.embed.dtype();
            self.embed = std::sync::Arc::new(DenseTensor::from_f32(dtype, rows, cols, values));
        }
        if let Some((_, values)) = &saved.head {
            let dtype = self
                .lm_head
                .as_ref()
                .map_or(self.embed.dtype(), |h| h.dtype());
            self.lm_head = Some(DenseTensor::from_f32(dtype, rows, cols, values));
        }
        if let Some(token_rows) = &saved.embed_rows {
            std::sync::Arc::make_mut(&mut self.embed).put_rows(token_rows);
        }
        if let Some(token_rows) = &saved.head_rows {
            // A tied model's output projection with rows of its own was untied above.
            self.lm_head
                .as_mut()
                .expect("an untied output projection")
                .put_rows(token_rows);
        }
    }

    /// Puts an adapter's trained token rows in place in the tables it trains them in (the
    /// embedding's module, which a tied model's output projection shares, and the output
    /// projection's), each row rounded to its table's dtype. A table still shared with another copy
    /// of the model is copied first.
    pub fn put_trained_rows(&mut self, adapter: &crate::lora::LoraAdapter) -> Result<()> {
        let embed_name = self.config.tensor("embed_tokens.weight");
        for (path, pair) in adapter.token_rows() {
            let table = match (self.config.token_rows_table(path), self.lm_head.as_mut()) {
                (Some(name), _) if name == embed_name => std::sync::Arc::make_mut(&mut self.embed),
                (Some(_), Some(head)) => head,
                _ => {
                    return Err(Error::Invalid(format!(
                        "the adapter trains token rows of {path}, which is neither the model's \
                         embedding ({}) nor its own output projection",
                        self.config.embedding_module()
                    )));
                }
            };
            for (&id, row) in pair
                .token_ids
                .iter()
                .zip(pair.rows.chunks_exact(table.cols))
            {
                table.set_row_f32(id, row);
            }
        }
        Ok(())
    }

    /// Which of `ids` have rows of the embedding (or, with `head`, of the output projection) that
    /// training never reached: all but zero, under a thousandth of the table's median row norm (as
    /// a base model's reserved and chat-template tokens often are, Llama 3's among them). LoRA on
    /// the linear layers cannot change what such a row gives: a zero embedding carries nothing but
    /// its position, a zero output row keeps its token's logit at 0.
    pub fn untrained_rows(&self, ids: &std::collections::BTreeSet<u32>, head: bool) -> Vec<u32> {
        let table = match (head, &self.lm_head) {
            (true, Some(head)) => head,
            _ => &*self.embed,
        };
        let norm = |r: usize| {
            let mut row = vec![0f32; table.cols];
            table.row_f32(r, &mut row);
            row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
        };
        // The median over up to 4096 rows spread across the table: the typical trained row.
        let every = table.rows.div_ceil(4096).max(1);
        let mut norms: Vec<f64> = (0..table.rows).step_by(every).map(norm).collect();
        norms.sort_by(f64::total_cmp);
        let typical = norms[norms.len() / 2];
        ids.iter()
            .copied()
            .filter(|&id| (id as usize) < table.rows && norm(id as usize) < 1e-3 * typical)
            .collect()
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> u64 {
        FrozenWeights::tensor_bytes(self)
    }

    /// Writes the model as a nibble quantized safetensors file (packed words, scales, minimums, the
    /// other tensors as loaded, config and tokenizer in the metadata). The file appears atomically.
    pub fn save_quantized<'a>(
        &'a self,
        path: &Path,
        (tokenizer, generation): (&TokenizerFiles, Option<&str>),
    ) -> Result<()> {
        let spec = self.quant.ok_or_else(|| {
            Error::Invalid("only a 4-bit quantized model can be saved as a quantized file".into())
        })?;
        let mut views = Vec::new();
        let mut add =
            |name: String, dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8]| -> Result<()> {
                let view = safetensors::tensor::TensorView::new(dtype, shape, bytes)
                    .map_err(|e| Error::tensor(path, &name, e.to_string()))?;
                views.push((name, view));
                Ok(())
            };
        let dense =
            |t: &'a DenseTensor| (t.dtype().safetensors(), vec![t.rows, t.cols], t.as_bytes());
        let vector = |v: &'a Vec<f32>| {
            (
                Dtype::F32,
                vec![v.len()],
                bytemuck::cast_slice::<f32, u8>(v),
            )
        };

        let (d, s, b) = dense(&self.embed);
        add(self.config.tensor("embed_tokens.weight"), d, s, b)?;
        if let Some(head) = &self.lm_head {
            let (d, s, b) = dense(head);
            add("lm_head.weight".into(), d, s, b)?;
        }
        for (name, table) in &self.tables {
            let (d, s, b) = dense(table);
            add(name.clone(), d, s, b)?;
        }
        for (name, v) in &self.norms {
            let (d, s, b) = vector(v);
            add(name.clone(), d, s, b)?;
        }
        // A packed weight as its words, scales and (INT4) minimums under `name`.
        let mut add_packed = |name: String, q: &'a QuantTensor| -> Result<()> {
            let groups = q.cols / q.spec.group_size;
            add(
                format!("{name}.qweight"),
                Dtype::U32,
                vec![q.rows, q.cols / 8],
                bytemuck::cast_slice(&q.packed),
            )?;
            add(
                format!("{name}.scales"),
                Dtype::F32,
                vec![q.rows, groups],
                bytemuck::cast_slice(&q.scales),
            )?;
            if q.spec.format == QuantFormat::Int4 {
                add(
                    format!("{name}.mins"),
                    Dtype::F32,
                    vec![q.rows, groups],
                    bytemuck::cast_slice(&q.mins),
                )?;
            }
            Ok(())
        };
        let mut rest = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for lin in &layer.linears {
                let base = self.config.linear_path(lin.kind, l);
                let LinearWeight::Quant(q) = &lin.weight else {
                    return Err(Error::Invalid(format!("{base}.weight is not quantized")));
                };
                add_packed(format!("{base}.weight"), q)?;
                if let Some(bias) = &lin.bias {
                    rest.push((format!("{base}.bias"), vector(bias)));
                }
            }
            // A mixture-of-experts layer's packed experts, and its router as loaded (dense).
            for (name, weight) in &layer.moe {
                match weight {
                    LinearWeight::Quant(q) => add_packed(name.clone(), q)?,
                    LinearWeight::Dense(d) => rest.push((name.clone(), dense(d))),
                }
            }
        }
        for (name, (d, s, b)) in rest {
            add(name, d, s, b)?;
        }

        let mut metadata = HashMap::from([
            (META_FORMAT.to_string(), QUANTIZED_FORMAT_TAG.to_string()),
            (
                META_VERSION.to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
            (META_QUANT.to_string(), spec.format.name().to_string()),
            (META_GROUP.to_string(), spec.group_size.to_string()),
            (META_SOURCE.to_string(), self.source.clone()),
            (META_CONFIG.to_string(), self.config.raw.to_string()),
        ]);
        for (name, field) in TokenizerFiles::NAMES.iter().zip(tokenizer.fields()) {
            if let Some(text) = field {
                metadata.insert(name.to_string(), text.clone());
            }
        }
        if let Some(text) = generation {
            metadata.insert(GENERATION_CONFIG.to_string(), text.to_string());
        }
        crate::fsutil::write_atomically(path, |tmp| {
            safetensors::serialize_to_file(views, Some(metadata), tmp)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
    }
}

/// A multimodal Gemma 3 text tensor's name as transformers 5 spells it, for names in the spelling of
/// the released checkpoints (which transformers 5.24 still writes): `language_model.model.layers.0...`
/// is `model.language_model.layers.0...`. The vision tower's are never read.
pub(crate) fn multimodal_name(name: &str) -> Option<String> {
    [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
    ]
    .into_iter()
    .find_map(|(old, new)| name.strip_prefix(old).map(|rest| format!("{new}{rest}")))
}

/// What to do with the decoder's linear weights when loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantRequest {
    /// Keep them dense in their checkpoint dtype.
    Dense,
    Quantize(QuantSpec),
}

/// How the command line and option files name a storage for the decoder's linears.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantChoice {
    Nf4,
    Int4,
    /// Keep them 16-bit.
    None,
}

serde_as_value_enum!(QuantChoice);

impl QuantRequest {
    /// The storage a load with `request` ends in, for a source stored as `stored` (None: 16-bit).
    pub fn planned(
        request: Option<QuantRequest>,
        stored: Option<QuantSpec>,
    ) -> Result<Option<QuantSpec>> {
        Ok(match request {
            // As `ModelSource::load` refuses it.
            Some(asked) if stored.is_some_and(|s| asked != QuantRequest::Quantize(s)) => {
                let wanted = match asked {
                    QuantRequest::Dense => "no quantization".to_string(),
                    QuantRequest::Quantize(s) => s.to_string(),
                };
                return Err(Error::Invalid(format!(
                    "already quantized as {}; {wanted} needs the original model folder",
                    stored.expect("checked above")
                )));
            }
            Some(QuantRequest::Quantize(s)) => Some(s),
            Some(QuantRequest::Dense) => None,
            None => Some(match stored {
                Some(s) => s,
                None => QuantSpec::new(QuantFormat::Nf4, crate::quant::DEFAULT_GROUP_SIZE)?,
            }),
        })
    }

    /// What `--quant` and `--group-size` ask for. None (neither given) leaves the choice to the source: a
    /// quantized file stays as stored, a folder becomes NF4 with groups of 64.
    pub fn from_options(
        choice: Option<QuantChoice>,
        group_size: Option<usize>,
    ) -> Result<Option<Self>> {
        Ok(match (choice, group_size) {
            (None, None) => None,
            (Some(QuantChoice::None), _) => Some(QuantRequest::Dense),
            (choice, group) => {
                let format = match choice {
                    Some(QuantChoice::Int4) => QuantFormat::Int4,
                    _ => QuantFormat::Nf4,
                };
                Some(QuantRequest::Quantize(QuantSpec::new(
                    format,
                    group.unwrap_or(crate::quant::DEFAULT_GROUP_SIZE),
                )?))
            }
        })
    }
}

enum SourceKind {
    /// A Hugging Face folder: its shards and which shard holds each tensor.
    Folder {
        shards: Vec<SafetensorsFile>,
        shard_of: HashMap<String, usize>,
    },
    /// A file written by `nibble quantize`.
    Quantized {
        file: SafetensorsFile,
        spec: QuantSpec,
    },
}

/// What of a model describes its text: config and tokenizer files, and where the tokenizer came
/// from (`ModelSource::tokenizer_origin`).
pub struct ModelText {
    pub config: ModelConfig,
    pub tokenizer: TokenizerFiles,
    pub origin: std::path::PathBuf,
}

impl ModelText {
    /// The model's tokenizer, fitted to its embeddings (`ChatTokenizer::fit_to_model`).
    pub fn chat_tokenizer(&self) -> Result<crate::tokenizer::ChatTokenizer> {
        fitted_tokenizer(&self.tokenizer, &self.origin, &self.config)
    }
}

/// Tokenizer files read from `origin`, fitted to `config`'s embeddings.
fn fitted_tokenizer(
    files: &TokenizerFiles,
    origin: &Path,
    config: &ModelConfig,
) -> Result<crate::tokenizer::ChatTokenizer> {
    let mut tok = crate::tokenizer::ChatTokenizer::from_files(files, origin)?;
    tok.fit_to_model(config.vocab_size)?;
    Ok(tok)
}

/// An opened model: config parsed and every safetensors header read and checked; no weights read yet.
pub struct ModelSource {
    pub config: ModelConfig,
    pub tokenizer: TokenizerFiles,
    /// The folder's generation_config.json (a quantized file keeps it in its metadata), with where
    /// it was read from for errors to name; a file that cannot be read is an error only to the
    /// commands that read it (generate and chat), not to training on the weights.
    pub generation_config: Option<(std::result::Result<String, String>, std::path::PathBuf)>,
    label: String,
    kind: SourceKind,
}

impl ModelSource {
    /// The folder a path to a model folder's config.json stands for (as `nibble plan` reads it), where
    /// it is one.
    pub fn folder_of_config(path: &Path) -> Option<std::path::PathBuf> {
        let folder = path
            .parent()
            .filter(|_| path.file_name().is_some_and(|n| n == "config.json") && path.is_file())?;
        Some(match folder.as_os_str().is_empty() {
            true => ".".into(),
            false => folder.to_path_buf(),
        })
    }

    /// Opens a model folder (or its config.json) or a nibble quantized file.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(folder) = Self::folder_of_config(path) {
            Self::open_folder(ModelFiles::Dir(folder))
        } else if path.is_dir() {
            Self::open_folder(ModelFiles::Dir(path.to_path_buf()))
        } else if path.is_file() {
            #[cfg(not(target_arch = "wasm32"))]
            {
                // Data or a script given as --model by mistake would read as a broken header.
                let file = SafetensorsFile::open(path).map_err(|e| {
                    match path.extension().is_some_and(|e| e == "safetensors") {
                        true => e,
                        false => Error::Invalid(format!(
                            "{}: not a model folder or a quantized safetensors file (written by \
                             `nibble quantize`): {e}",
                            path.display()
                        )),
                    }
                })?;
                Self::open_quantized(file)
            }
            #[cfg(target_arch = "wasm32")]
            {
                Err(Error::Invalid(format!(
                    "{}: files cannot be opened by path in the browser",
                    path.display()
                )))
            }
        } else {
            Err(Error::Invalid(crate::fsutil::not_found_message(
                path,
                crate::fsutil::HubRepo::Model,
            )))
        }
    }

    /// A model's config and tokenizer without its weights, for what reads text only (`nibble data`):
    /// a folder's weights need not be there.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_text(path: &Path) -> Result<ModelText> {
        let folder = Self::folder_of_config(path).or_else(|| path.is_dir().then(|| path.into()));
        let Some(folder) = folder else {
            let source = Self::open(path)?;
            return Ok(ModelText {
                origin: source.tokenizer_origin(),
                config: source.config,
                tokenizer: source.tokenizer,
            });
        };
        let files = ModelFiles::Dir(folder.clone());
        let (config, tokenizer) = Self::read_config_and_tokenizer(&files)?;
        Ok(ModelText {
            config,
            tokenizer,
            origin: folder,
        })
    }

    fn read_config_and_tokenizer(files: &ModelFiles) -> Result<(ModelConfig, TokenizerFiles)> {
        let config_text = match files.read_string("config.json")? {
            Some(text) => text,
            // A diffusers pipeline keeps its config in each part's folder.
            None if files.read_string("model_index.json")?.is_some() => {
                return Err(Error::Invalid(format!(
                    "{}: a diffusers pipeline (model_index.json) that is not a language model: \
                     nibble takes FLUX.2 [klein] pipelines (train, plan, info) and language models",
                    files.display_path("").display()
                )));
            }
            None => {
                return Err(Error::Config {
                    path: files.display_path("config.json"),
                    msg: "missing: a model folder needs config.json".into(),
                });
            }
        };
        let config = ModelConfig::from_json_str(&config_text, &files.display_path("config.json"))?;
        let mut tokenizer = TokenizerFiles::default();
        for (name, field) in TokenizerFiles::NAMES.iter().zip(tokenizer.fields_mut()) {
            *field = files.read_string(name)?;
        }
        Ok((config, tokenizer))
    }

    /// Opens a Hugging Face model folder (on disk, or as in-memory files).
    pub fn open_folder(files: ModelFiles) -> Result<Self> {
        let (config, tokenizer) = Self::read_config_and_tokenizer(&files)?;

        let index_name = "model.safetensors.index.json";
        let shard_names: Vec<String>;
        let mut weight_map: Option<HashMap<String, String>> = None;
        if let Some(index_text) = files.read_string(index_name)? {
            let index_path = files.display_path(index_name);
            let index: serde_json::Value =
                serde_json::from_str(&index_text).map_err(|e| Error::Config {
                    path: index_path.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    msg: "missing `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = Vec::new();
            let mut wm = HashMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    msg: format!("weight_map entry for `{tensor}` is not a file name"),
                })?;
                if !names.iter().any(|n| n == file) {
                    names.push(file.to_string());
                }
                wm.insert(tensor.clone(), file.to_string());
            }
            names.sort();
            shard_names = names;
            weight_map = Some(wm);
        } else if files.exists("model.safetensors") {
            shard_names = vec!["model.safetensors".into()];
        } else {
            let path = files.display_path("model.safetensors");
            let msg = match path.is_dir() {
                true => "a folder, where the model's weights file should be",
                false => {
                    "missing: a model folder needs model.safetensors or model.safetensors.index.json"
                }
            };
            return Err(Error::Config {
                path,
                msg: msg.into(),
            });
        }

        let mut shards = shard_names
            .iter()
            .map(|n| files.open_safetensors(n))
            .collect::<Result<Vec<_>>>()?;
        // Checkpoints that spell some names otherwise than nibble (transformers 5) does.
        let rename: Option<fn(&str) -> Option<String>> = match config.moe_family() {
            _ if config.multimodal.is_some() => Some(multimodal_name),
            Some(crate::config::MoeFamily::Mixtral) => Some(crate::config::mixtral_name),
            Some(crate::config::MoeFamily::GptOss) => Some(crate::config::gpt_oss_name),
            _ => None,
        };
        if let Some(rename) = rename {
            for shard in &mut shards {
                shard.rename(rename);
            }
            if let Some(wm) = weight_map.as_mut() {
                *wm = std::mem::take(wm)
                    .into_iter()
                    .map(|(name, file)| (rename(&name).unwrap_or(name), file))
                    .collect();
            }
        }
        let mut shard_of = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.tensor_names() {
                shard_of.insert(name.clone(), i);
            }
        }
        if let Some(wm) = weight_map {
            // The index must agree with the shards, or we would silently read a different tensor.
            for (tensor, file) in wm {
                let listed = shard_names
                    .iter()
                    .position(|n| *n == file)
                    .expect("collected above");
                if shard_of.get(&tensor) != Some(&listed) {
                    return Err(Error::tensor(
                        files.display_path(index_name),
                        tensor,
                        format!("listed in {file} but not found there"),
                    ));
                }
            }
        }
        let generation_config = match files.read_string(GENERATION_CONFIG) {
            Ok(None) => None,
            Ok(Some(text)) => Some((Ok(text), files.display_path(GENERATION_CONFIG))),
            Err(e) => Some((Err(e.to_string()), files.display_path(GENERATION_CONFIG))),
        };
        let source = ModelSource {
            config,
            tokenizer,
            generation_config,
            label: match &files {
                ModelFiles::Dir(dir) => dir.display().to_string(),
                ModelFiles::Memory { label, .. } => label.clone(),
            },
            kind: SourceKind::Folder { shards, shard_of },
        };
        source.check()?;
        Ok(source)
    }

    /// A folder's safetensors shards (None for a quantized file).
    pub fn shards(&self) -> Option<&[SafetensorsFile]> {
        match &self.kind {
            SourceKind::Folder { shards, .. } => Some(shards),
            SourceKind::Quantized { .. } => None,
        }
    }

    /// Drops tensor `name`'s pages from memory once read (`SafetensorsFile::release`).
    pub(crate) fn release(&self, name: &str) {
        if let Ok(file) = self.file_of(name) {
            file.release(name);
        }
    }

    /// The names of the tensors the checkpoint stores expected tensor `t` in.
    pub(crate) fn stored_part_names(&self, t: &ExpectedTensor) -> Vec<String> {
        self.stored_parts(t).into_iter().map(|p| p.0).collect()
    }

    /// Opens a file written by `nibble quantize`.
    /// A Qwen3 text encoder as one safetensors file without its folder, as ComfyUI users keep FLUX.2
    /// [klein]'s (`qwen_3_4b.safetensors`, `qwen_3_8b.safetensors`): transformers' tensor names
    /// (any prefix before `model.`, or none before `layers.`), the configuration read from the
    /// shapes (head size from the q/k norms) with Qwen3's fixed values (RoPE θ 10⁶, RMSNorm ε 10⁻⁶,
    /// 40,960 positions, the embedding tied where there is no `lm_head`), and the bundled Qwen3
    /// tokenizer. ComfyUI's 8-bit files ("fp8mixed", and the older "fp8_scaled") are read as its
    /// loader reads them (`crate::comfy_quant`); its other quantized formats are refused by name.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_qwen3_file(path: &Path) -> Result<Self> {
        let mut file = SafetensorsFile::open(path)?;
        let anchor = "layers.0.self_attn.q_norm.weight";
        let prefix = file
            .tensor_names()
            .find_map(|n| n.strip_suffix(anchor))
            .map(|p| p.strip_suffix("model.").unwrap_or(p).to_string())
            .ok_or_else(|| Error::Safetensors {
                path: path.to_path_buf(),
                msg: format!(
                    "not a Qwen3 text encoder: no tensor ends in `{anchor}` (give a Qwen3 folder \
                     with its config.json, or ComfyUI's qwen_3_*.safetensors)"
                ),
            })?;
        // ComfyUI's fp8mixed files: its markers checked under the file's own names.
        crate::comfy_quant::check_markers(&file)?;
        let float8 = file.tensor_names().any(|n| {
            let dtype = file.info(n).expect("listed").dtype;
            crate::source::Float8::of(dtype).is_some()
        });
        // transformers' names: `model.` before the decoder's, `lm_head.weight` as it is, and the
        // older fp8 files' `scale_weight` as the scale's name now is.
        file.rename(|name| {
            let rest = name.strip_prefix(prefix.as_str())?;
            let rest = rest.strip_prefix("model.").unwrap_or(rest);
            let rest = match rest.strip_suffix(crate::comfy_quant::LEGACY_SCALE) {
                Some(layer) => format!("{layer}.weight_scale"),
                None => rest.to_string(),
            };
            Some(match rest.as_str() {
                "lm_head.weight" => rest,
                _ => format!("model.{rest}"),
            })
        });
        let shape = |name: &str| {
            file.info(name)
                .map(|i| i.shape.clone())
                .ok_or_else(|| Error::tensor(path.to_path_buf(), name, "missing"))
        };
        let embed = shape("model.embed_tokens.weight")?;
        let head_dim = shape("model.layers.0.self_attn.q_norm.weight")?[0];
        let q = shape("model.layers.0.self_attn.q_proj.weight")?;
        let k = shape("model.layers.0.self_attn.k_proj.weight")?;
        let gate = shape("model.layers.0.mlp.gate_proj.weight")?;
        let layers = (0..)
            .take_while(|i| {
                file.info(&format!("model.layers.{i}.input_layernorm.weight"))
                    .is_some()
            })
            .count();
        let mut config = serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": embed[0], "hidden_size": embed[1], "intermediate_size": gate[0],
            "num_hidden_layers": layers, "head_dim": head_dim,
            "num_attention_heads": q[0] / head_dim.max(1),
            "num_key_value_heads": k[0] / head_dim.max(1),
            "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
            "tie_word_embeddings": file.info("lm_head.weight").is_none(),
            "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
        });
        // The stored precision, as config.json's `dtype` gives it: the final norm's, as ComfyUI
        // takes it (the embedding may be 8-bit).
        let stored = match file.info("model.norm.weight").map(|i| i.dtype) {
            Some(safetensors::Dtype::BF16) => Some("bfloat16"),
            Some(safetensors::Dtype::F16) => Some("float16"),
            Some(safetensors::Dtype::F32) => Some("float32"),
            _ => None,
        };
        if let Some(dtype) = stored {
            config["dtype"] = dtype.into();
        }
        let mut config = ModelConfig::from_json_str(&config.to_string(), &path.join("[shapes]"))?;
        // Codes times the scale beside them (`weight_scale`: one per tensor in ComfyUI's files), in
        // f32 as comfy-kitchen dequantizes them.
        config.float8 = float8.then(|| crate::config::Float8Scheme {
            method: "ComfyUI's fp8".into(),
            block: None,
            product_in_scale_dtype: false,
        });
        let shard_of = file.tensor_names().map(|n| (n.clone(), 0)).collect();
        let source = ModelSource {
            config,
            tokenizer: crate::synth::qwen3_tokenizer(),
            generation_config: None,
            label: path.display().to_string(),
            kind: SourceKind::Folder {
                shards: vec![file],
                shard_of,
            },
        };
        source.check()?;
        Ok(source)
    }

    pub fn open_quantized(file: SafetensorsFile) -> Result<Self> {
        let path = file.path().to_path_buf();
        let meta = file.metadata();
        let bad = |msg: String| Error::Safetensors {
            path: path.clone(),
            msg,
        };
        if meta.get(META_FORMAT).map(String::as_str) != Some(QUANTIZED_FORMAT_TAG) {
            return Err(bad(
                "not a nibble quantized model (expected a model folder, or a file written by `nibble quantize`)".into(),
            ));
        }
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("metadata field `{k}` is missing")))
        };
        let format = QuantFormat::parse(field(META_QUANT)?)
            .ok_or_else(|| bad(format!("unknown quant_format `{}`", meta[META_QUANT])))?;
        let group: usize = field(META_GROUP)?
            .parse()
            .map_err(|_| bad(format!("group_size `{}` is not a number", meta[META_GROUP])))?;
        let spec = QuantSpec::new(format, group).map_err(|e| bad(e.to_string()))?;
        let config =
            ModelConfig::from_json_str(field(META_CONFIG)?, &path.join("[metadata config]"))?;
        let mut tokenizer = TokenizerFiles::default();
        for (name, f) in TokenizerFiles::NAMES.iter().zip(tokenizer.fields_mut()) {
            *f = meta.get(*name).cloned();
        }
        let generation_config = meta.get(GENERATION_CONFIG).map(|text| {
            (
                Ok(text.clone()),
                path.join(format!("[metadata {GENERATION_CONFIG}]")),
            )
        });
        let source = ModelSource {
            config,
            tokenizer,
            generation_config,
            label: meta
                .get(META_SOURCE)
                .cloned()
                .unwrap_or_else(|| path.display().to_string()),
            kind: SourceKind::Quantized { file, spec },
        };
        source.check()?;
        Ok(source)
    }

    /// The packed format a quantized file already has, if this source is one.
    pub fn stored_quant(&self) -> Option<QuantSpec> {
        match &self.kind {
            SourceKind::Quantized { spec, .. } => Some(*spec),
            SourceKind::Folder { .. } => None,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// Where the tokenizer's files were read from, as errors about them name it: the model folder,
    /// or a quantized file's metadata (its label names the folder it was made from, whose files may
    /// be fine).
    pub fn tokenizer_origin(&self) -> std::path::PathBuf {
        match &self.kind {
            SourceKind::Quantized { file, .. } => file.path().join("[metadata]"),
            SourceKind::Folder { .. } => std::path::PathBuf::from(&self.label),
        }
    }

    /// The model's tokenizer, checked against its vocabulary.
    pub fn chat_tokenizer(&self) -> Result<crate::tokenizer::ChatTokenizer> {
        fitted_tokenizer(&self.tokenizer, &self.tokenizer_origin(), &self.config)
    }

    /// The parts a tensor is stored as: (name in file, expected shape, allowed dtypes).
    fn stored_parts(&self, t: &ExpectedTensor) -> Vec<(String, Vec<usize>, &'static [Dtype])> {
        const FLOATS: &[Dtype] = &[Dtype::F32, Dtype::F16, Dtype::BF16];
        // What FP8 checkpoints store in 8 bits (with scales beside them: `float8_scale`).
        const MATRICES: &[Dtype] = &[
            Dtype::F32,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F8_E4M3,
            Dtype::F8_E5M2,
        ];
        match (&self.kind, t.role) {
            // gpt-oss's: [experts, in, out] as transformers holds them, or MXFP4 blocks [experts,
            // out, in / 32, 16] with a scale byte per block.
            (SourceKind::Folder { shard_of, .. }, TensorRole::Experts) if self.gpt_oss() => {
                let experts = self.config.moe.as_ref().map_or(1, |m| m.experts);
                let (out, inp) = (t.shape[0] / experts, t.shape[1]);
                // In 16 or 32 bits, as the other families' stacks (`check` names FP8 there).
                if shard_of.contains_key(&t.name) {
                    return vec![(t.name.clone(), vec![experts, inp, out], FLOATS)];
                }
                let groups = inp / crate::quant::mxfp4::GROUP;
                let bytes = crate::quant::mxfp4::GROUP_BYTES;
                vec![
                    (
                        format!("{}_blocks", t.name),
                        vec![experts, out, groups, bytes],
                        &[Dtype::U8][..],
                    ),
                    (
                        format!("{}_scales", t.name),
                        vec![experts, out, groups],
                        &[Dtype::U8][..],
                    ),
                ]
            }
            (SourceKind::Folder { shard_of, .. }, TensorRole::Experts)
                if !shard_of.contains_key(&t.name) =>
            {
                expert_parts(&self.config, t)
                    .into_iter()
                    .map(|(name, shape)| (name, shape, MATRICES))
                    .collect()
            }
            (SourceKind::Folder { .. }, TensorRole::Experts) => {
                // transformers' own layout, when saved unconverted: [experts, rows, cols]; in
                // 16 or 32 bits (`check` names FP8 there).
                let experts = self.config.moe.as_ref().map_or(1, |m| m.experts);
                let shape = vec![experts, t.shape[0] / experts, t.shape[1]];
                vec![(t.name.clone(), shape, FLOATS)]
            }
            (
                SourceKind::Quantized { spec, .. },
                TensorRole::LinearWeight(_) | TensorRole::Experts,
            ) => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let groups = cols / spec.group_size;
                let mut parts = vec![
                    (
                        format!("{}.qweight", t.name),
                        vec![rows, cols / 8],
                        &[Dtype::U32][..],
                    ),
                    (
                        format!("{}.scales", t.name),
                        vec![rows, groups],
                        &[Dtype::F32][..],
                    ),
                ];
                if spec.format == QuantFormat::Int4 {
                    parts.push((
                        format!("{}.mins", t.name),
                        vec![rows, groups],
                        &[Dtype::F32][..],
                    ));
                }
                parts
            }
            // A quantized file holds every vector flat (gpt-oss's experts' biases too).
            (SourceKind::Quantized { .. }, TensorRole::Norm | TensorRole::LinearBias(_)) => {
                vec![(t.name.clone(), vec![t.shape.iter().product()], FLOATS)]
            }
            (_, TensorRole::Norm | TensorRole::LinearBias(_)) => {
                vec![(t.name.clone(), t.shape.clone(), FLOATS)]
            }
            _ => vec![(t.name.clone(), t.shape.clone(), MATRICES)],
        }
    }

    /// The scale tensor of the 8-bit weight `name` ([rows, cols]) and the rows x columns of the weight
    /// each of its values covers, from the headers alone.
    fn float8_scale(&self, name: &str, rows: usize, cols: usize) -> Result<(String, [usize; 2])> {
        let path = self.file_of(name)?.path();
        let Some(scheme) = &self.config.float8 else {
            return Err(Error::tensor(
                path,
                name,
                "stored in 8-bit floats, but config.json has no `quantization_config` saying how its scales apply",
            ));
        };
        let module = name.strip_suffix("weight").unwrap_or(name);
        let names = [
            format!("{module}weight_scale_inv"),
            format!("{module}weight_scale"),
        ];
        let found = names.iter().find_map(|n| {
            let file = self.file_of(n).ok()?;
            Some((n, file, file.info(n)?))
        });
        let Some((scale, file, info)) = found else {
            return Err(Error::tensor(
                path,
                name,
                format!(
                    "stored in 8-bit floats ({}), but the checkpoint has neither `{}` nor `{}` to scale it",
                    scheme.method, names[0], names[1]
                ),
            ));
        };
        if FloatDtype::of(info.dtype).is_none() && !matches!(info.dtype, Dtype::F8_E8M0 | Dtype::U8)
        {
            return Err(Error::tensor(
                file.path(),
                scale,
                format!(
                    "dtype {:?} is not supported for scales (F32, F16, BF16, or F8_E8M0 or U8 exponents)",
                    info.dtype
                ),
            ));
        }
        let block = float8_block(&info.shape, rows, cols, scheme.block).ok_or_else(|| {
            let given = match scheme.block {
                Some([r, c]) => format!(" in blocks of {r} x {c} (quantization_config)"),
                None => String::new(),
            };
            Error::tensor(
                file.path(),
                scale,
                format!(
                    "shape {:?} does not scale the weight `{name}` of shape [{rows}, {cols}]{given}",
                    info.shape
                ),
            )
        })?;
        Ok((scale.clone(), block))
    }

    /// Any tensor of the folder as f32 (`out` holds all of it): 8-bit weights times their scales.
    pub(crate) fn read_f32_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let file = self.file_of(name)?;
        let info = file.info(name).expect("file_of found it");
        if FloatDtype::of(info.dtype).is_some() {
            return file.read_f32_into(name, out);
        }
        let [rows, cols] = info.shape[..] else {
            return Err(Error::tensor(
                file.path(),
                name,
                unsupported_dtype(info.dtype),
            ));
        };
        let stored = self.stored_matrix(name, rows, cols)?;
        for (r, row) in out.chunks_mut(cols).enumerate() {
            stored.row(r, row);
        }
        Ok(())
    }

    /// Whether tensor `name` only serves to read another of an FP8 checkpoint (a weight's scales, the
    /// activation or cache scales of its FP8 kernels).
    pub(crate) fn is_float8_companion(&self, name: &str) -> bool {
        const SUFFIXES: [&str; 8] = [
            ".weight_scale_inv",
            ".weight_scale",
            // Zeros where the weights are symmetric (the only FP8 weights nibble reads).
            ".weight_zero_point",
            ".weight_g_idx",
            ".activation_scale",
            ".input_scale",
            ".k_scale",
            ".v_scale",
        ];
        self.config.float8.is_some() && SUFFIXES.iter().any(|s| name.ends_with(s))
    }

    /// Tensor `name` ([rows, cols]) as the checkpoint stores it, refused where a value (or a scale) is NaN
    /// or infinite.
    fn stored_matrix(&self, name: &str, rows: usize, cols: usize) -> Result<StoredMatrix<'_>> {
        let file = self.file_of(name)?;
        let dtype = file.info(name).expect("checked").dtype;
        if let Some(dtype) = FloatDtype::of(dtype) {
            let raw = file.finite_raw(name, dtype)?;
            return Ok(StoredMatrix::Float { dtype, raw });
        }
        let format = Float8::of(dtype)
            .filter(|f| *f != Float8::E8M0)
            .ok_or_else(|| Error::tensor(file.path(), name, unsupported_dtype(dtype)))?;
        let (scale, block) = self.float8_scale(name, rows, cols)?;
        let product_in_scale_dtype = self
            .config
            .float8
            .as_ref()
            .is_some_and(|s| s.product_in_scale_dtype);
        let scales = (self.file_of(&scale)?, scale.as_str());
        StoredMatrix::float8(
            (file, name, format),
            scales,
            block,
            cols,
            product_in_scale_dtype,
        )
    }

    fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        match &self.kind {
            SourceKind::Folder { shards, shard_of } => {
                shard_of.get(name).map(|&i| &shards[i]).ok_or_else(|| {
                    let where_ = if shards.len() == 1 {
                        shards[0].path().display().to_string()
                    } else {
                        format!("{} shards in {}", shards.len(), self.label)
                    };
                    Error::Invalid(format!("tensor `{name}` is missing from {where_}"))
                })
            }
            SourceKind::Quantized { file, .. } => {
                if file.info(name).is_some() {
                    Ok(file)
                } else {
                    Err(Error::tensor(file.path(), name, "missing"))
                }
            }
        }
    }

    /// Checks that every tensor the config implies is present with the right shape and a readable
    /// dtype, reading headers only.
    pub fn check(&self) -> Result<()> {
        for t in self.config.expected_tensors() {
            for (name, shape, dtypes) in self.stored_parts(&t) {
                let file = self.file_of(&name)?;
                let info = file.info(&name).expect("file_of found it");
                if info.shape != shape {
                    return Err(Error::tensor(
                        file.path(),
                        &name,
                        format!(
                            "shape {:?} does not match the config, which implies {:?}",
                            info.shape, shape
                        ),
                    ));
                }
                if !dtypes.contains(&info.dtype) {
                    let why = match Float8::of(info.dtype) {
                        Some(_) if t.role == TensorRole::Experts && shape.len() == 3 => format!(
                            "{:?}: a stack of experts in 8-bit floats, one tensor for all of them, is \
                             not supported (nibble reads FP8 experts stored one tensor per expert \
                             and projection, each with its scales)",
                            info.dtype
                        ),
                        _ => unsupported_dtype(info.dtype),
                    };
                    return Err(Error::tensor(file.path(), &name, why));
                }
                if Float8::of(info.dtype).is_some() {
                    self.float8_scale(&name, shape[0], shape[1])?;
                }
            }
        }
        Ok(())
    }

    /// Reads the weights. `None` keeps a quantized file as stored and quantizes a folder to NF4, group 64.
    pub fn load(&self, request: Option<QuantRequest>) -> Result<Model> {
        let quant = match (&self.kind, request) {
            (SourceKind::Quantized { spec, .. }, None) => Some(*spec),
            (SourceKind::Quantized { spec, .. }, Some(QuantRequest::Quantize(want)))
                if *spec == want =>
            {
                Some(want)
            }
            (SourceKind::Quantized { spec, file }, Some(other)) => {
                let wanted = match other {
                    QuantRequest::Dense => "no quantization".to_string(),
                    QuantRequest::Quantize(s) => s.to_string(),
                };
                return Err(Error::Invalid(format!(
                    "{} is already quantized as {spec}; {wanted} needs the original model folder",
                    file.path().display()
                )));
            }
            (SourceKind::Folder { .. }, None) => Some(QuantSpec::new(
                QuantFormat::Nf4,
                crate::quant::DEFAULT_GROUP_SIZE,
            )?),
            (SourceKind::Folder { .. }, Some(QuantRequest::Dense)) => None,
            (SourceKind::Folder { .. }, Some(QuantRequest::Quantize(s))) => Some(s),
        };
        if let Some(spec) = quant {
            self.config
                .check_group_size(spec.group_size)
                .map_err(|msg| Error::Invalid(format!("{}: {msg}", self.label)))?;
        }

        let mut embed = None;
        let mut lm_head = None;
        let mut norms = Vec::new();
        let mut tables = Vec::new();
        let mut weights: HashMap<(usize, LinearKind), LinearWeight> = HashMap::new();
        let mut biases: HashMap<(usize, LinearKind), Vec<f32>> = HashMap::new();
        let mut moe: Vec<Vec<(String, LinearWeight)>> = vec![Vec::new(); self.config.num_layers];
        for t in self.config.expected_tensors() {
            let file = self.file_of(&self.stored_parts(&t)[0].0)?;
            match t.role {
                TensorRole::Embedding | TensorRole::LmHead => {
                    let dense = self.read_dense(&t)?;
                    if t.role == TensorRole::Embedding {
                        embed = Some(dense);
                    } else {
                        lm_head = Some(dense);
                    }
                }
                TensorRole::Norm => {
                    let mut values = file.read_f32(&t.name)?;
                    // gpt-oss's gate and up biases interleave in its checkpoints as its weights'
                    // rows do (a quantized file holds them as nibble does).
                    let folder = matches!(self.kind, SourceKind::Folder { .. });
                    if folder && t.name.ends_with(crate::config::EXPERTS_GATE_UP_BIAS) {
                        let inter = self.config.moe.as_ref().map_or(1, |m| m.inter);
                        values = deinterleave_rows(&values, 2 * inter, 1);
                    }
                    norms.push((t.name.clone(), values))
                }
                TensorRole::Table => {
                    let table = std::sync::Arc::new(self.read_dense(&t)?);
                    tables.push((t.name.clone(), table));
                }
                TensorRole::LinearBias(kind) => {
                    biases.insert(
                        (t.layer.expect("bias in a layer"), kind),
                        file.read_f32(&t.name)?,
                    );
                }
                TensorRole::LinearWeight(kind) => {
                    let weight = self.read_linear(file, &t, quant)?;
                    weights.insert((t.layer.expect("linear in a layer"), kind), weight);
                }
                TensorRole::Router => {
                    let router = LinearWeight::Dense(self.read_dense(&t)?);
                    moe[t.layer.expect("router in a layer")].push((t.name.clone(), router));
                }
                TensorRole::Experts => {
                    let experts = self.read_linear(file, &t, quant)?;
                    moe[t.layer.expect("experts in a layer")].push((t.name.clone(), experts));
                }
            }
            // Each part from its own shard (a layer's experts may span several).
            for (name, _, _) in self.stored_parts(&t) {
                if let Ok(file) = self.file_of(&name) {
                    file.release(&name);
                }
            }
        }

        let mut moe = moe.into_iter();
        let layers = (0..self.config.num_layers)
            .map(|l| Layer {
                moe: moe.next().unwrap_or_default(),
                linears: self
                    .config
                    .layer_linears(l)
                    .into_iter()
                    // Gemma 4's router linear is among `moe`, dense as every router.
                    .filter(|&kind| kind != LinearKind::Router)
                    .map(|kind| Linear {
                        kind,
                        weight: weights
                            .remove(&(l, kind))
                            .expect("listed in expected_tensors"),
                        bias: biases.remove(&(l, kind)),
                    })
                    .collect(),
            })
            .collect();
        Ok(Model {
            config: self.config.clone(),
            embed: std::sync::Arc::new(embed.expect("listed in expected_tensors")),
            layers: std::sync::Arc::new(layers),
            norms,
            lm_head,
            tables,
            quant,
            source: self.label.clone(),
        })
    }

    fn read_dense(&self, t: &ExpectedTensor) -> Result<DenseTensor> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        Ok(match self.stored_matrix(&t.name, rows, cols)? {
            StoredMatrix::Float { dtype, raw } => DenseTensor::from_raw(dtype, rows, cols, raw),
            // Kept in f32: code · scale is exact there.
            scaled => DenseTensor {
                rows,
                cols,
                data: DenseData::F32(scaled.rows_f32(rows, cols)),
            },
        })
    }

    fn read_linear(
        &self,
        file: &SafetensorsFile,
        t: &ExpectedTensor,
        quant: Option<QuantSpec>,
    ) -> Result<LinearWeight> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        if let SourceKind::Quantized { spec, .. } = &self.kind {
            let parts = self.stored_parts(t);
            let q = QuantTensor {
                spec: *spec,
                rows,
                cols,
                packed: file.read_u32(&parts[0].0)?,
                scales: file.read_f32(&parts[1].0)?,
                mins: match parts.get(2) {
                    Some((name, _, _)) => file.read_f32(name)?,
                    None => Vec::new(),
                },
            };
            return Ok(LinearWeight::Quant(q));
        }
        if self.gpt_oss() && t.role == TensorRole::Experts {
            return self.read_gpt_oss_experts(t, quant);
        }
        let parts = self.stored_parts(t);
        if parts.len() > 1 {
            return self.read_stacked(t, &parts, quant);
        }
        let Some(spec) = quant else {
            return Ok(LinearWeight::Dense(self.read_dense(t)?));
        };
        let stored = self.stored_matrix(&t.name, rows, cols)?;
        let q = QuantTensor::quantize_rows(spec, rows, cols, |r, row| stored.row(r, row))
            .map_err(|e| Error::tensor(file.path(), &t.name, e.to_string()))?;
        Ok(LinearWeight::Quant(q))
    }

    fn gpt_oss(&self) -> bool {
        self.config.moe_family() == Some(crate::config::MoeFamily::GptOss)
    }

    /// gpt-oss's stacked experts in nibble's layout ([experts · out, in], each expert's gate rows
    /// before its up rows) from its checkpoint's (`GptOssExperts`), quantized expert by expert where
    /// `quant` says.
    fn read_gpt_oss_experts(
        &self,
        t: &ExpectedTensor,
        quant: Option<QuantSpec>,
    ) -> Result<LinearWeight> {
        let stack = self.gpt_oss_experts(t)?;
        let (rows, inp) = (t.shape[0], t.shape[1]);
        let (experts, out) = (stack.experts, stack.out);
        let (file, dtype) = (stack.file, stack.dtype);
        let Some(spec) = quant else {
            // Stacked in the stored dtype expert by expert: never the whole stack in f32.
            let mut whole = DenseTensor::empty(dtype, rows, inp);
            for e in 0..experts {
                whole.append_rows(DenseTensor::from_f32(dtype, out, inp, &stack.expert(e)?));
            }
            return Ok(LinearWeight::Dense(whole));
        };
        let mut whole = QuantTensor {
            spec,
            rows,
            cols: inp,
            packed: Vec::new(),
            scales: Vec::new(),
            mins: Vec::new(),
        };
        for e in 0..experts {
            // Rows are packed each on its own: the experts' tensors stack.
            let q = QuantTensor::quantize(spec, out, inp, &stack.expert(e)?)
                .map_err(|err| Error::tensor(file.path(), &t.name, err.to_string()))?;
            whole.packed.extend(q.packed);
            whole.scales.extend(q.scales);
            whole.mins.extend(q.mins);
        }
        Ok(LinearWeight::Quant(whole))
    }

    /// A gpt-oss expert stack `t` as its checkpoint stores it: [experts, in, out] (transformers'
    /// own, each expert's gate and up columns interleaved) or MXFP4 blocks
    /// [experts, out, in / 32, 16] (rows interleaved alike).
    pub(crate) fn gpt_oss_experts(&self, t: &ExpectedTensor) -> Result<GptOssExperts<'_>> {
        let experts = self.config.moe.as_ref().map_or(1, |m| m.experts);
        let (rows, inp) = (t.shape[0], t.shape[1]);
        let out = rows / experts;
        let parts = self.stored_parts(t);
        let file = self.file_of(&parts[0].0)?;
        let mxfp4 = match &parts[..] {
            [(blocks, _, _), (scales, _, _)] if inp % crate::quant::mxfp4::GROUP != 0 => {
                return Err(Error::tensor(
                    file.path(),
                    blocks,
                    format!(
                        "MXFP4 blocks of 32 values cannot cover the experts' inputs ({inp}) with \
                         {scales} beside them"
                    ),
                ));
            }
            [(blocks, _, _), (scales, _, _)] => Some((
                file.raw(blocks)?,
                self.file_of(scales)?.raw(scales)?,
                scales.clone(),
            )),
            _ => None,
        };
        let stored = match mxfp4 {
            Some(_) => None,
            None => Some(self.stored_matrix(&t.name, experts * inp, out)?),
        };
        // E2M1 codes times powers of two are bf16 values.
        let dtype = match &stored {
            Some(StoredMatrix::Float { dtype, .. }) => *dtype,
            Some(_) => FloatDtype::F32,
            None => FloatDtype::BF16,
        };
        Ok(GptOssExperts {
            file,
            gate_up: t.name.ends_with(crate::config::EXPERTS_GATE_UP),
            experts,
            out,
            inp,
            mxfp4,
            stored,
            dtype,
        })
    }

    /// A linear's weight stored as equal runs of its rows in tensors of their own (one expert's
    /// projection each), stacked in `parts`' order.
    fn read_stacked(
        &self,
        t: &ExpectedTensor,
        parts: &[(String, Vec<usize>, &'static [Dtype])],
        quant: Option<QuantSpec>,
    ) -> Result<LinearWeight> {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let stored: Vec<StoredMatrix> = parts
            .iter()
            .map(|(name, shape, _)| self.stored_matrix(name, shape[0], shape[1]))
            .collect::<Result<_>>()?;
        let each = rows / stored.len();
        let row = |r: usize, out: &mut [f32]| stored[r / each].row(r % each, out);
        let Some(spec) = quant else {
            let dtype = match &stored[0] {
                StoredMatrix::Float { dtype, .. } => *dtype,
                _ => FloatDtype::F32,
            };
            let mut values = vec![0f32; rows * cols];
            for (r, out) in values.chunks_mut(cols).enumerate() {
                row(r, out);
            }
            return Ok(LinearWeight::Dense(DenseTensor::from_f32(
                dtype, rows, cols, &values,
            )));
        };
        let q = QuantTensor::quantize_rows(spec, rows, cols, row).map_err(|e| {
            let path = self.file_of(&parts[0].0).map(|f| f.path().to_path_buf());
            Error::tensor(path.unwrap_or_default(), &t.name, e.to_string())
        })?;
        Ok(LinearWeight::Quant(q))
    }
}

/// Each run of `run` rows of `width` values, its even rows (gpt-oss's gate channels) first and its
/// odd rows (up) after: how nibble holds an expert's gate and up projections.
pub(crate) fn deinterleave_rows(values: &[f32], run: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(run * width) {
        for parity in [0, 1] {
            for row in block.chunks(width).skip(parity).step_by(2) {
                out.extend_from_slice(row);
            }
        }
    }
    out
}

/// `deinterleave_rows`' inverse.
pub(crate) fn interleave_rows(values: &[f32], run: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(values.len());
    for block in values.chunks(run * width) {
        let (first, second) = block.split_at(run / 2 * width);
        for (a, b) in first.chunks(width).zip(second.chunks(width)) {
            out.extend_from_slice(a);
            out.extend_from_slice(b);
        }
    }
    out
}

/// A gpt-oss expert stack as its checkpoint stores it (`ModelSource::gpt_oss_experts`), read one
/// expert at a time: a 20B model's gate_up stack is 2 GB in f32.
pub(crate) struct GptOssExperts<'a> {
    file: &'a SafetensorsFile,
    /// Whether the stack is gate_up_proj, whose gate and up rows interleave.
    gate_up: bool,
    pub experts: usize,
    /// Each expert's outputs and inputs.
    pub out: usize,
    pub inp: usize,
    /// MXFP4's blocks and scales, with the scales' name.
    mxfp4: Option<(&'a [u8], &'a [u8], String)>,
    stored: Option<StoredMatrix<'a>>,
    /// The dtype that holds the stored values exactly.
    pub dtype: FloatDtype,
}

impl GptOssExperts<'_> {
    /// Expert e's [out, in] in nibble's order (gate rows before up rows).
    pub fn expert(&self, e: usize) -> Result<Vec<f32>> {
        let (out, inp) = (self.out, self.inp);
        let mut values = vec![0f32; out * inp];
        if let Some((blocks, scales, scales_name)) = &self.mxfp4 {
            let groups = inp / crate::quant::mxfp4::GROUP;
            let bytes = groups * crate::quant::mxfp4::GROUP_BYTES;
            for (o, row) in values.chunks_mut(inp).enumerate() {
                let r = e * out + o;
                let scales = &scales[r * groups..][..groups];
                crate::quant::mxfp4::decode_row(&blocks[r * bytes..][..bytes], scales, row)
                    .map_err(|g| {
                        let msg = format!("row {r}, block {g}: values past f32's range");
                        Error::tensor(self.file.path(), scales_name, msg)
                    })?;
            }
        } else if let Some(stored) = &self.stored {
            let mut column = vec![0f32; out];
            for i in 0..inp {
                stored.row(e * inp + i, &mut column);
                for (o, &v) in column.iter().enumerate() {
                    values[o * inp + i] = v;
                }
            }
        }
        Ok(match self.gate_up {
            true => deinterleave_rows(&values, out, inp),
            false => values,
        })
    }

    /// An expert's [out, in] in nibble's order written into `stored` ([in, out], that expert's slice
    /// of the checkpoint's [experts, in, out]), gate and up interleaved again.
    pub fn store(&self, values: &[f32], stored: &mut [f32]) {
        let (out, inp) = (self.out, self.inp);
        let values = match self.gate_up {
            true => std::borrow::Cow::Owned(interleave_rows(values, out, inp)),
            false => std::borrow::Cow::Borrowed(values),
        };
        for (o, row) in values.chunks_exact(inp).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                stored[i * out + o] = v;
            }
        }
    }
}

/// A 2-D tensor as its checkpoint stores it, read a row at a time as f32.
pub(crate) enum StoredMatrix<'a> {
    Float {
        dtype: FloatDtype,
        raw: &'a [u8],
    },
    /// 8-bit float codes times the scales stored beside them (an FP8 checkpoint's weights).
    Float8 {
        /// Each code's value.
        table: Box<[f32; 256]>,
        raw: &'a [u8],
        scales: Vec<f32>,
        /// Rows x columns of the weight one scale covers (the last block of a row or column may be
        /// cut short).
        block: [usize; 2],
        /// Scales per row of blocks.
        grid_cols: usize,
        /// compressed-tensors' weights come out in their scales' dtype.
        round_to: Option<FloatDtype>,
    },
}

impl<'a> StoredMatrix<'a> {
    /// The 8-bit codes of tensor `name` times the scales of tensor `scale`, each covering `block` of the
    /// weight (rows `cols` wide); with `product_in_scale_dtype` (compressed-tensors) rounded to the
    /// scales' 16-bit dtype. Refused where a code or a scale is NaN or infinite.
    pub(crate) fn float8(
        (file, name, format): (&'a SafetensorsFile, &str, Float8),
        (scale_file, scale): (&SafetensorsFile, &str),
        block: [usize; 2],
        cols: usize,
        product_in_scale_dtype: bool,
    ) -> Result<Self> {
        let table = Box::new(format.table());
        let raw = file.raw(name)?;
        if let Some(i) = format.first_non_finite(raw) {
            return Err(Error::tensor(
                file.path(),
                name,
                format!("element {i} is NaN or infinite"),
            ));
        }
        let scale_dtype = FloatDtype::of(scale_file.info(scale).expect("found").dtype);
        let scales = match scale_dtype {
            Some(_) => scale_file.read_f32(scale)?,
            // Exponents, 2^(e - 127): F8_E8M0, or U8 as transformers reads them too.
            None => {
                let powers = Float8::E8M0.table();
                let values: Vec<f32> = scale_file
                    .raw(scale)?
                    .iter()
                    .map(|&b| powers[usize::from(b)])
                    .collect();
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::tensor(
                        scale_file.path(),
                        scale,
                        format!("element {i} is NaN"),
                    ));
                }
                values
            }
        };
        let round_to = match product_in_scale_dtype {
            true => scale_dtype.filter(|d| *d != FloatDtype::F32),
            false => None,
        };
        Ok(StoredMatrix::Float8 {
            table,
            raw,
            scales,
            block,
            grid_cols: cols.div_ceil(block[1]),
            round_to,
        })
    }

    /// All `rows` rows, `cols` wide.
    pub(crate) fn rows_f32(&self, rows: usize, cols: usize) -> Vec<f32> {
        let mut values = vec![0f32; rows * cols];
        values
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, row)| self.row(r, row));
        values
    }

    fn row(&self, r: usize, out: &mut [f32]) {
        let cols = out.len();
        match self {
            StoredMatrix::Float { dtype, raw } => {
                let bytes = cols * dtype.size();
                dtype.convert(&raw[r * bytes..(r + 1) * bytes], out)
            }
            StoredMatrix::Float8 {
                table,
                raw,
                scales,
                block,
                grid_cols,
                round_to,
            } => {
                let codes = &raw[r * cols..(r + 1) * cols];
                let row_scales = &scales[(r / block[0]) * grid_cols..][..*grid_cols];
                let pieces = out.chunks_mut(block[1]).zip(codes.chunks(block[1]));
                for ((values, codes), &scale) in pieces.zip(row_scales) {
                    for (v, &code) in values.iter_mut().zip(codes) {
                        let exact = table[usize::from(code)] * scale;
                        *v = match round_to {
                            Some(FloatDtype::BF16) => half::bf16::from_f32(exact).to_f32(),
                            Some(FloatDtype::F16) => half::f16::from_f32(exact).to_f32(),
                            _ => exact,
                        };
                    }
                }
            }
        }
    }
}

/// The rows x columns of a [rows, cols] weight that each value of a scale tensor of shape `scales`
/// covers, or None where the shape fits no layout: one scale for the tensor, one per block of the
/// config's `block` (a grid of ⌈rows / b0⌉ x ⌈cols / b1⌉), one per row ([rows] or [rows, 1]), or, where
/// the config names no block, the block that divides the weight evenly into the scales' grid.
pub(crate) fn float8_block(
    scales: &[usize],
    rows: usize,
    cols: usize,
    block: Option<[usize; 2]>,
) -> Option<[usize; 2]> {
    if rows == 0 || cols == 0 {
        return None;
    }
    if scales.iter().product::<usize>() == 1 {
        return Some([rows, cols]);
    }
    if let (Some([b0, b1]), [g0, g1]) = (block, scales)
        && *g0 == rows.div_ceil(b0)
        && *g1 == cols.div_ceil(b1)
    {
        return Some([b0, b1]);
    }
    match scales {
        [g] | [g, 1] if *g == rows => Some([1, cols]),
        [g0, g1]
            if block.is_none()
                && *g0 > 0
                && *g1 > 0
                && rows.is_multiple_of(*g0)
                && cols.is_multiple_of(*g1) =>
        {
            Some([rows / g0, cols / g1])
        }
        _ => None,
    }
}

/// The tensors a checkpoint stores one expert at a time (transformers' saved layout,
/// `mlp.experts.{e}.gate_proj.weight` ...) that make up the stacked experts tensor `t`, in its row
/// order: each expert's gate then up rows, or each expert's down rows.
pub(crate) fn expert_parts(config: &ModelConfig, t: &ExpectedTensor) -> Vec<(String, Vec<usize>)> {
    let Some(m) = &config.moe else {
        return Vec::new();
    };
    let (h, i) = (config.hidden_size, m.inter);
    let base = t.name.rsplit_once('.').map_or("", |(base, _)| base);
    let gate_up = t.name.ends_with(crate::config::EXPERTS_GATE_UP);
    (0..m.experts)
        .flat_map(|e| match gate_up {
            true => vec![
                (format!("{base}.{e}.gate_proj.weight"), vec![i, h]),
                (format!("{base}.{e}.up_proj.weight"), vec![i, h]),
            ],
            false => vec![(format!("{base}.{e}.down_proj.weight"), vec![h, i])],
        })
        .collect()
}

/// Bytes the weights of `config` take: with `quant`, as nibble stores them (decoder linears packed,
/// embeddings and lm_head 16-bit, norms and biases f32); without, every parameter at 16 bits, the figure
/// a 16-bit checkpoint has.
pub fn planned_weight_bytes(config: &ModelConfig, quant: Option<QuantSpec>) -> u64 {
    config
        .expected_tensors()
        .iter()
        .map(|t| {
            let n: u64 = t.shape.iter().product::<usize>() as u64;
            match (t.role, quant) {
                (_, None) => 2 * n,
                (TensorRole::LinearWeight(_) | TensorRole::Experts, Some(spec)) => {
                    spec.packed_bytes(t.shape[0], t.shape[1])
                }
                (TensorRole::Norm | TensorRole::LinearBias(_), Some(_)) => 4 * n,
                (
                    TensorRole::Embedding
                    | TensorRole::LmHead
                    | TensorRole::Table
                    | TensorRole::Router,
                    Some(_),
                ) => 2 * n,
            }
        })
        .sum()
}

/// Bytes of the embedding and (untied) output projection tables, as `planned_weight_bytes` counts them.
pub fn planned_table_bytes(config: &ModelConfig) -> u64 {
    config
        .expected_tensors()
        .iter()
        .filter(|t| matches!(t.role, TensorRole::Embedding | TensorRole::LmHead))
        .map(|t| 2 * t.shape.iter().product::<usize>() as u64)
        .sum()
}

/// Convenience for the command line: a path to a folder or a quantized file.
pub fn open(path: impl AsRef<Path>) -> Result<ModelSource> {
    ModelSource::open(path.as_ref())
}
