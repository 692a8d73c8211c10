//! A model's frozen weights and LoRA matrices in GPU memory, as the GPU executor (`exec::gpu`) binds
//! them: dense matrices as 32-bit words, 4-bit weights as packed words with group scales, each split
//! into row blocks that fit one storage binding.

use super::{Gpu, GpuBuffer};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{Factor, LoraAdapter};
use crate::model::{DenseData, DenseTensor, FrozenWeights, LinearWeight, Model, TensorRef};
use crate::quant::QuantFormat;
use std::collections::HashMap;

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

/// Rows per block of a matrix split into blocks that each fit one storage binding, a multiple of
/// `together` (`FrozenWeights::rows_kept_together`). Blocks of 16-bit values start on a whole word:
/// with an odd row length, an even number of rows.
fn rows_per_block(
    gpu: &Gpu,
    (rows, row_bytes): (usize, usize),
    odd_halves: bool,
    together: usize,
    name: &str,
) -> Result<usize> {
    let fit = (gpu.max_binding / row_bytes.max(1) as u64) as usize;
    let halves = if odd_halves { 2 } else { 1 };
    let together = together.max(1);
    let step = if together.is_multiple_of(halves) {
        together
    } else {
        together * halves
    };
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
    /// Writes row `id` (f32 values, converted to the table's format) in place.
    fn put_row(&self, gpu: &Gpu, id: usize, values: &[f32], name: &str) -> Result<()> {
        let dtype = match self.fmt {
            FMT_F32 => crate::source::FloatDtype::F32,
            FMT_BF16 => crate::source::FloatDtype::BF16,
            _ => crate::source::FloatDtype::F16,
        };
        let one = DenseTensor::from_f32(dtype, 1, self.cols, values);
        let (_, words) = dense_words(&one, 0, 1);
        if dtype != crate::source::FloatDtype::F32 && self.cols % 2 == 1 {
            return Err(Error::Invalid(format!(
                "{name}: rows of an odd width share their 16-bit pairs, so trained rows cannot be \
                 written alone"
            )));
        }
        let (start, _, block) = self
            .blocks
            .iter()
            .find(|(start, rows, _)| (*start..start + rows).contains(&id))
            .ok_or_else(|| Error::Invalid(format!("{name}: row {id} past the table")))?;
        gpu.write_words(block, (id - start) * words.len(), &words);
        Ok(())
    }

    fn upload(gpu: &Gpu, t: &DenseTensor, name: &str, together: usize) -> Result<Self> {
        let size = t.dtype().size();
        let rows_per_block = rows_per_block(
            gpu,
            (t.rows, t.cols * size),
            size == 2 && t.cols % 2 == 1,
            together,
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
    fn upload(gpu: &Gpu, weight: &LinearWeight, name: &str, together: usize) -> Result<Self> {
        let (rows, cols) = weight.shape();
        let (fmt, group, blocks) = match weight {
            // Split as any dense matrix is.
            LinearWeight::Dense(d) => {
                let dense = GpuDense::upload(gpu, d, name, together)?;
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
                let per_block = rows_per_block(gpu, (rows, cols / 2), false, together, name)?;
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
        })
    }
}

/// A frozen tensor in GPU memory.
pub(crate) enum GpuTensor {
    Linear(GpuLinear),
    Table(GpuDense),
    Vector(GpuBuffer),
    /// A table kept in host memory, of which a step uploads only the rows it reads: an untied
    /// embedding (1.2 GiB at 16 bits for a 152k vocabulary of width 4096) is read at a step's few
    /// thousand token ids.
    HostTable(std::sync::Arc<DenseTensor>),
}

/// A model's frozen weights in GPU memory, by checkpoint name (`Model::named_tensors`).
pub struct GpuModel {
    pub config: ModelConfig,
    weights: GpuWeights,
}

/// A model's frozen tensors in GPU memory, by the names its graph builder uses: what the GPU executor
/// binds.
pub struct GpuWeights {
    pub(crate) tensors: HashMap<String, GpuTensor>,
    pub(crate) dummy: GpuBuffer,
}

impl GpuWeights {
    pub fn upload(gpu: &Gpu, model: &dyn FrozenWeights) -> Result<Self> {
        Self::upload_keeping(gpu, model, &[])
    }

    /// `upload`, with the tables in `on_host` (by name, shared with the model that holds them) kept
    /// in host memory (read only by `Embed`).
    pub fn upload_keeping(
        gpu: &Gpu,
        model: &dyn FrozenWeights,
        on_host: &[(String, std::sync::Arc<DenseTensor>)],
    ) -> Result<Self> {
        let tensors = model
            .named_tensors()
            .into_iter()
            .map(|(name, tensor)| {
                let kept = on_host.iter().find(|(n, _)| *n == name);
                let uploaded = match (tensor, kept) {
                    (TensorRef::Table(_), Some((_, shared))) => {
                        GpuTensor::HostTable(shared.clone())
                    }
                    (TensorRef::Linear(w), _) => {
                        let together = model.rows_kept_together(&name);
                        GpuTensor::Linear(GpuLinear::upload(gpu, w, &name, together)?)
                    }
                    (TensorRef::Table(t), _) => {
                        GpuTensor::Table(GpuDense::upload(gpu, t, &name, 1)?)
                    }
                    (TensorRef::Vector(v), _) => GpuTensor::Vector(gpu.upload_f32(v)),
                };
                Ok((name, uploaded))
            })
            .collect::<Result<_>>()?;
        Ok(GpuWeights {
            tensors,
            dummy: gpu.zeros(1),
        })
    }

    /// Bytes of device memory the tensors occupy (a host table none).
    pub fn device_bytes(&self) -> u64 {
        let words = |b: &GpuBuffer| 4 * b.len as u64;
        self.tensors
            .values()
            .map(|t| match t {
                GpuTensor::Linear(lin) => lin
                    .blocks
                    .iter()
                    .map(|b| {
                        let extra = b.scales.iter().chain(&b.mins).map(words).sum::<u64>();
                        words(&b.words) + extra
                    })
                    .sum(),
                GpuTensor::Table(t) => t.blocks.iter().map(|(_, _, b)| words(b)).sum(),
                GpuTensor::Vector(v) => words(v),
                GpuTensor::HostTable(_) => 0,
            })
            .sum()
    }

    /// Storage buffers holding the linear weights: one per weight unless some are larger than a
    /// binding and split into row blocks.
    pub fn linear_weight_buffers(&self) -> usize {
        self.tensors
            .values()
            .map(|t| match t {
                GpuTensor::Linear(lin) => lin.blocks.len(),
                _ => 0,
            })
            .sum()
    }
}

impl GpuModel {
    /// Puts an adapter's trained token rows (`rows`: each token-rows module's values, in
    /// `LoraAdapter::token_rows` order) in place in the tables they train: a device table row by row
    /// in its format (rounded as the CPU rounds them), a host table (an untied embedding) in this
    /// model's own copy of it.
    pub fn put_token_rows(
        &mut self,
        gpu: &Gpu,
        adapter: &LoraAdapter,
        rows: &[Vec<f32>],
    ) -> Result<()> {
        for ((path, pair), values) in adapter.token_rows().zip(rows) {
            let name = self.config.token_rows_table(path).unwrap_or_default();
            let table = self.weights.tensors.get_mut(&name).ok_or_else(|| {
                Error::Invalid(format!(
                    "the adapter trains token rows of {path}, a table the model lacks"
                ))
            })?;
            let cols = self.config.hidden_size;
            let rows = pair.token_ids.iter().zip(values.chunks_exact(cols));
            match table {
                GpuTensor::HostTable(host) => {
                    let host = std::sync::Arc::make_mut(host);
                    rows.for_each(|(&id, row)| host.set_row_f32(id, row));
                }
                GpuTensor::Table(dense) => {
                    for (&id, row) in rows {
                        dense.put_row(gpu, id, row, &name)?;
                    }
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "{name}: token rows train in tables"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Bytes of device memory the frozen tensors occupy.
    pub fn device_bytes(&self) -> u64 {
        self.weights.device_bytes()
    }

    pub fn upload(gpu: &Gpu, model: &Model) -> Result<Self> {
        crate::ops::attention::check_gpu_heads(&model.config)?;
        Ok(GpuModel {
            config: model.config.clone(),
            weights: GpuWeights::upload_keeping(gpu, model, &model.host_tables())?,
        })
    }
}

/// A decoder's weights are bound wherever weights are.
impl std::ops::Deref for GpuModel {
    type Target = GpuWeights;

    fn deref(&self) -> &GpuWeights {
        &self.weights
    }
}

/// LoRA tensors in GPU memory: per adapted linear, its module path and its factors (A [r, in],
/// B [out, r], DoRA's magnitude [out]), then the tables' trained token rows, in
/// `LoraAdapter::trained` and `LoraPair::factors` order.
pub struct GpuLora {
    /// Each adapted linear's rank and scale, by module path.
    pub adapted: std::collections::BTreeMap<String, crate::models::decoder::Adapted>,
    /// The tables whose token rows the adapter trains.
    pub tokens: Vec<crate::models::decoder::TrainedRows>,
    pub(crate) tensors: Vec<((String, Factor), GpuBuffer)>,
}

impl GpuLora {
    pub fn upload(gpu: &Gpu, adapter: &LoraAdapter) -> Self {
        let spec = crate::models::decoder::LoraSpec::of(adapter);
        GpuLora {
            adapted: spec.targets,
            tokens: spec.tokens,
            tensors: adapter
                .trained()
                .flat_map(|(path, p)| {
                    p.factors()
                        .map(move |f| ((path.to_string(), f), gpu.upload_f32(p.factor(f))))
                })
                .collect(),
        }
    }

    /// Bytes of device memory the buffers occupy.
    pub fn device_bytes(&self) -> u64 {
        self.buffers().map(|b| 4 * b.len as u64).sum()
    }

    /// Every buffer, in `LoraAdapter::trained` and `LoraPair::factors` order.
    pub fn buffers(&self) -> impl Iterator<Item = &GpuBuffer> {
        self.tensors.iter().map(|(_, b)| b)
    }

    /// The buffers of the tables' trained token rows, in `LoraAdapter::token_rows` order.
    pub fn token_row_buffers(&self) -> impl Iterator<Item = &GpuBuffer> {
        self.tensors
            .iter()
            .filter(|((_, f), _)| *f == Factor::Rows)
            .map(|(_, b)| b)
    }

    /// (module path, factor, length) of every buffer, as `models::optimizer::build` takes them.
    pub fn shapes(&self) -> Vec<(String, Factor, usize)> {
        self.tensors
            .iter()
            .map(|((path, f), b)| (path.clone(), *f, b.len))
            .collect()
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
        for (_, pair) in into.trained_mut() {
            for f in pair.factors().collect::<Vec<_>>() {
                *pair.factor_mut(f) = values.next().expect("same pairs");
            }
        }
        Ok(())
    }
}

/// Zeroed gradient buffers shaped like `adapter`.
pub fn zero_grads(gpu: &Gpu, adapter: &LoraAdapter) -> GpuLora {
    GpuLora::upload(gpu, &adapter.zeros_like())
}
