//! Optimizer steps on the GPU: every micro-batch's forward and backward graph, then the optimizer graph
//! (global gradient norm, clipping coefficient, AdamW), recorded into one command encoder and submitted
//! once; only the losses and the norm come back. The adapters and AdamW's moments stay on the GPU
//! between steps and are downloaded when the trainer saves.

use super::weights::{GpuLora, GpuModel, GpuWeights};
use super::{Gpu, GpuBuffer};
use crate::cpu::{Sequence, StepLoss};
use crate::error::{Error, Result};
use crate::exec::gpu::{
    Bindings, GpuKvCache, SequenceOptions, record, record_sequence_keeping, sequence_loss,
};
use crate::graph::{Graph, StepInputs};
use crate::lora::LoraAdapter;
use crate::model::{FrozenWeights, Model};
use crate::models::decoder::FactorSource;
use crate::models::optimizer;
use crate::ops::adamw::AdamWParams;

/// The frozen model a GPU trainer binds: a decoder (its config drives the sequence graphs), or any
/// other model's named weights, whose graphs the caller builds. One per trainer: the variants' sizes
/// do not matter.
#[allow(clippy::large_enum_variant)]
pub enum GpuBase {
    Decoder(GpuModel),
    Weights(GpuWeights),
}

/// The frozen model to upload for a `GpuBase`.
pub enum BaseModel<'a> {
    Decoder(&'a Model),
    Weights(&'a dyn FrozenWeights),
}

impl GpuBase {
    pub(crate) fn weights(&self) -> &GpuWeights {
        match self {
            GpuBase::Decoder(m) => m,
            GpuBase::Weights(w) => w,
        }
    }
}

pub struct GpuTrainState {
    base: GpuBase,
    params: GpuLora,
    grads: GpuLora,
    m: GpuLora,
    v: GpuLora,
}

/// What one optimizer step read back.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuStepResult {
    /// Each sequence's sums (Σ token cross-entropy and what goes with it), or each image graph's `loss`
    /// as `loss_sum`.
    pub losses: Vec<StepLoss>,
    pub grad_norm: f64,
    /// The trained token rows after the step, in `LoraAdapter::token_rows` order, for
    /// `put_token_rows`.
    pub token_rows: Vec<Vec<f32>>,
}

impl GpuTrainState {
    /// Device memory in use: the frozen weights, the adapters, their gradients and moments, and the
    /// steps' scratch buffers (those of the largest step so far, which the pool keeps for reuse).
    pub fn device_bytes(&self, gpu: &Gpu) -> u64 {
        let base = match &self.base {
            GpuBase::Decoder(model) => model.device_bytes(),
            GpuBase::Weights(weights) => weights.device_bytes(),
        };
        let lora = [&self.params, &self.grads, &self.m, &self.v]
            .iter()
            .map(|l| l.device_bytes())
            .sum::<u64>();
        base + lora + gpu.scratch_bytes()
    }

    /// Uploads the frozen model, the adapters and AdamW's moments.
    pub fn new(
        gpu: &Gpu,
        model: BaseModel,
        adapter: &LoraAdapter,
        m: &LoraAdapter,
        v: &LoraAdapter,
    ) -> Result<Self> {
        let base = match model {
            BaseModel::Decoder(model) => GpuBase::Decoder(GpuModel::upload(gpu, model)?),
            BaseModel::Weights(weights) => GpuBase::Weights(GpuWeights::upload(gpu, weights)?),
        };
        Ok(GpuTrainState {
            base,
            params: GpuLora::upload(gpu, adapter),
            grads: GpuLora::upload(gpu, &adapter.zeros_like()),
            m: GpuLora::upload(gpu, m),
            v: GpuLora::upload(gpu, v),
        })
    }

    /// The decoder these adapters train, when they train one.
    pub fn decoder(&self) -> Option<&GpuModel> {
        match &self.base {
            GpuBase::Decoder(m) => Some(m),
            GpuBase::Weights(_) => None,
        }
    }

    fn decoder_or_error(&self) -> Result<&GpuModel> {
        self.decoder()
            .ok_or_else(|| Error::Invalid("this GPU trainer holds no language model".into()))
    }

    /// One optimizer step over `sequences` (each with its options), then the optimizer graph: the
    /// global gradient norm, the clipping coefficient at `max_norm` and AdamW with `adamw` (whose
    /// grad_scale multiplies the coefficient), all in the same submission.
    pub async fn step(
        &self,
        gpu: &Gpu,
        sequences: &[(&Sequence, SequenceOptions)],
        adamw: AdamWParams,
        max_norm: f32,
    ) -> Result<GpuStepResult> {
        let model = self.decoder_or_error()?;
        let mut enc = self.cleared_grads(gpu);
        // The longest first: the device buffers its step is placed in then house the shorter ones'
        // (`Gpu::homes`), where a longer sequence after a shorter one would need a second set while
        // the first is still part of this submission.
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].0.ids.len()));
        let mut results: Vec<Option<GpuBuffer>> = (0..sequences.len()).map(|_| None).collect();
        // DoRA's factors change only with the optimizer step: the first micro-batch computes them.
        let mut kept = GpuKvCache::new(gpu, model);
        for i in order {
            let (seq, options) = &sequences[i];
            let options = SequenceOptions {
                dora_factors: match kept.keeps_dora_factors() {
                    true => FactorSource::Kept,
                    false => FactorSource::ComputeAndKeep,
                },
                ..*options
            };
            results[i] = record_sequence_keeping(
                gpu,
                model,
                (Some(&self.params), Some(&self.grads)),
                seq,
                options,
                (&mut enc, &mut kept),
            )?;
        }
        let mut reads: Vec<&GpuBuffer> = results.iter().flatten().collect();
        let losses_read = reads.len();
        reads.extend(self.params.token_row_buffers());
        let (mut values, grad_norm) = self.optimize(gpu, enc, &reads, adamw, max_norm).await?;
        let token_rows = values.split_off(losses_read);
        let mut read = values.iter();
        let losses = results
            .iter()
            .map(|r| match r {
                Some(_) => sequence_loss(read.next().expect("one read per result")),
                None => StepLoss::default(),
            })
            .collect();
        Ok(GpuStepResult {
            losses,
            grad_norm,
            token_rows,
        })
    }

    /// One optimizer step over graphs the caller built (each a forward and backward into the LoRA
    /// gradients, with its inputs, leaving the output `loss`), then the optimizer graph, in one
    /// submission. Returns each graph's loss and the gradients' norm before clipping.
    pub async fn step_graphs(
        &self,
        gpu: &Gpu,
        graphs: &[(Graph, StepInputs)],
        adamw: AdamWParams,
        max_norm: f32,
    ) -> Result<GpuStepResult> {
        let mut enc = self.cleared_grads(gpu);
        // The largest first, as `step` records the longest sequence first (images of other
        // aspect ratios have other token counts).
        let mut order: Vec<usize> = (0..graphs.len()).collect();
        order.sort_by_cached_key(|&i| {
            std::cmp::Reverse(crate::graph::pool::device_step_bytes(&graphs[i].0))
        });
        let mut losses: Vec<Option<GpuBuffer>> = (0..graphs.len()).map(|_| None).collect();
        for i in order {
            let (graph, inputs) = &graphs[i];
            let loss = record(graph, self.bindings(gpu, inputs, false), &mut enc)?
                .take("loss")
                .ok_or_else(|| Error::Invalid("a training graph leaves no `loss`".into()))?;
            losses[i] = Some(loss);
        }
        let reads: Vec<&GpuBuffer> = losses.iter().flatten().collect();
        let (values, grad_norm) = self.optimize(gpu, enc, &reads, adamw, max_norm).await?;
        Ok(GpuStepResult {
            losses: values
                .iter()
                .map(|v| StepLoss {
                    loss_sum: v[0] as f64,
                    ..StepLoss::default()
                })
                .collect(),
            grad_norm,
            token_rows: Vec::new(),
        })
    }

    /// Puts the trained token rows `rows` (a step's `GpuStepResult::token_rows`) in place in the
    /// model's tables, for the next step's graphs to read.
    pub fn put_token_rows(
        &mut self,
        gpu: &Gpu,
        adapter: &LoraAdapter,
        rows: &[Vec<f32>],
    ) -> Result<()> {
        match &mut self.base {
            GpuBase::Decoder(model) => model.put_token_rows(gpu, adapter, rows),
            GpuBase::Weights(_) if rows.is_empty() => Ok(()),
            GpuBase::Weights(_) => {
                Err(Error::Invalid("token rows train in language models".into()))
            }
        }
    }

    /// The frozen weights, the adapters and their gradients (and with `moments`, AdamW's moments).
    fn bindings<'a>(&'a self, gpu: &'a Gpu, inputs: &'a StepInputs, moments: bool) -> Bindings<'a> {
        Bindings {
            gpu,
            model: self.base.weights(),
            lora: Some(&self.params),
            grads: Some(&self.grads),
            cache: None,
            moments: moments.then_some([&self.m, &self.v]),
            inputs,
        }
    }

    /// An encoder whose first command zeroes the gradients.
    fn cleared_grads(&self, gpu: &Gpu) -> wgpu::CommandEncoder {
        let mut enc = gpu.encoder();
        for g in self.grads.buffers() {
            enc.clear_buffer(&g.buffer, 0, None);
        }
        enc
    }

    /// Records the optimizer graph after the step in `enc`, submits, and reads `reads` back with the
    /// gradients' norm.
    async fn optimize(
        &self,
        gpu: &Gpu,
        mut enc: wgpu::CommandEncoder,
        reads: &[&GpuBuffer],
        adamw: AdamWParams,
        max_norm: f32,
    ) -> Result<(Vec<Vec<f32>>, f64)> {
        let graph = optimizer::build(&self.params.shapes(), max_norm as f64);
        let inputs = StepInputs {
            adamw: bytemuck::cast(adamw),
            ..StepInputs::default()
        };
        let clip = record(&graph, self.bindings(gpu, &inputs, true), &mut enc)?
            .take("clip")
            .expect("the optimizer graph leaves the norm");
        let mut all = reads.to_vec();
        all.push(&clip);
        let mut values = gpu.submit_and_read_async(enc, &all).await?;
        let norm = values.pop().expect("the norm was read")[0] as f64;
        Ok((values, norm))
    }

    /// The frozen weights as uploaded.
    pub fn frozen(&self) -> &GpuWeights {
        self.base.weights()
    }

    /// The adapters' device copies.
    pub fn params(&self) -> &GpuLora {
        &self.params
    }

    /// The loss of one sequence with the current adapters (no dropout, no gradients).
    pub async fn evaluate(&self, gpu: &Gpu, seq: &Sequence) -> Result<StepLoss> {
        crate::exec::gpu::forward_backward_async(
            gpu,
            self.decoder_or_error()?,
            Some(&self.params),
            None,
            seq,
            1.0,
        )
        .await
    }

    /// Downloads the adapters and AdamW's moments into `adapter`, `m` and `v`.
    pub async fn download(
        &self,
        gpu: &Gpu,
        adapter: &mut LoraAdapter,
        m: &mut LoraAdapter,
        v: &mut LoraAdapter,
    ) -> Result<()> {
        self.params.download_async(gpu, adapter).await?;
        self.m.download_async(gpu, m).await?;
        self.v.download_async(gpu, v).await
    }
}
