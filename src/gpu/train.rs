//! Optimizer steps on the GPU: every micro-batch's forward and backward, the global gradient norm, the
//! clipping coefficient and AdamW are recorded into one command encoder and submitted once; only the
//! per-position losses and the norm come back. The adapters and AdamW's moments stay on the GPU between
//! steps and are downloaded when the trainer saves.

use super::weights::{GpuLora, GpuModel};
use super::{Gpu, GpuBuffer, groups_1d};
use crate::cpu::{Sequence, StepLoss};
use crate::error::Result;
use crate::exec::gpu::{SequenceOptions, record_sequence, sequence_loss};
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::ops::adamw::{AdamWKernelParams, AdamWParams, SUM_SQUARES_BLOCK};

pub struct GpuTrainState {
    pub model: GpuModel,
    params: GpuLora,
    grads: GpuLora,
    m: GpuLora,
    v: GpuLora,
    /// One partial sum of squared gradients per 4096 elements of every gradient tensor.
    sums: GpuBuffer,
    /// [global norm, clipping coefficient].
    clip: GpuBuffer,
}

/// What one optimizer step read back.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuStepResult {
    /// Σ token cross-entropy of each micro-batch sequence.
    pub loss_sums: Vec<f64>,
    pub grad_norm: f64,
}

impl GpuTrainState {
    /// Uploads the frozen model, the adapters and AdamW's moments.
    pub fn new(
        gpu: &Gpu,
        model: &Model,
        adapter: &LoraAdapter,
        m: &LoraAdapter,
        v: &LoraAdapter,
    ) -> Result<Self> {
        let partials: usize = adapter
            .pairs()
            .map(|(_, p)| {
                p.a.len().div_ceil(SUM_SQUARES_BLOCK) + p.b.len().div_ceil(SUM_SQUARES_BLOCK)
            })
            .sum();
        Ok(GpuTrainState {
            model: GpuModel::upload(gpu, model)?,
            params: GpuLora::upload(gpu, adapter),
            grads: GpuLora::upload(gpu, &adapter.zeros_like()),
            m: GpuLora::upload(gpu, m),
            v: GpuLora::upload(gpu, v),
            sums: gpu.zeros(partials),
            clip: gpu.zeros(2),
        })
    }

    /// One optimizer step over `sequences` (each with its options), then AdamW with `adamw` (its
    /// grad_scale is multiplied by the clipping coefficient the GPU computes from `max_norm`).
    pub async fn step(
        &self,
        gpu: &Gpu,
        sequences: &[(&Sequence, SequenceOptions)],
        adamw: AdamWParams,
        max_norm: f32,
    ) -> Result<GpuStepResult> {
        let mut enc = gpu.encoder();
        for g in self.grads.buffers() {
            enc.clear_buffer(&g.buffer, 0, None);
        }
        let mut results = Vec::with_capacity(sequences.len());
        for (seq, options) in sequences {
            results.push(record_sequence(
                gpu,
                &self.model,
                Some(&self.params),
                Some(&self.grads),
                seq,
                *options,
                &mut enc,
            )?);
        }
        let kernel = |n: usize, sums_offset: usize| AdamWKernelParams {
            step: adamw,
            n: n as u32,
            sums_offset: sums_offset as u32,
            max_norm,
            _pad: 0,
        };
        let mut offset = 0;
        for g in self.grads.buffers() {
            gpu.dispatch(
                &mut enc,
                "sum_squares",
                &kernel(g.len, offset),
                &[(2, g), (5, &self.sums)],
                [g.len.div_ceil(SUM_SQUARES_BLOCK) as u32, 1, 1],
            );
            offset += g.len.div_ceil(SUM_SQUARES_BLOCK);
        }
        gpu.dispatch(
            &mut enc,
            "grad_clip",
            &kernel(offset, 0),
            &[(5, &self.sums), (6, &self.clip)],
            [1, 1, 1],
        );
        let tensors = self
            .params
            .buffers()
            .zip(self.grads.buffers())
            .zip(self.m.buffers())
            .zip(self.v.buffers());
        for (((p, g), m), v) in tensors {
            gpu.dispatch(
                &mut enc,
                "adamw_step",
                &kernel(p.len, 0),
                &[(1, p), (2, g), (3, m), (4, v), (6, &self.clip)],
                groups_1d(p.len, 256),
            );
        }
        let mut reads: Vec<&GpuBuffer> = results.iter().flatten().collect();
        reads.push(&self.clip);
        let values = gpu.submit_and_read_async(enc, &reads).await?;
        let mut losses = values[..values.len() - 1].iter();
        let loss_sums = results
            .iter()
            .map(|r| match r {
                Some(_) => sequence_loss(losses.next().expect("one read per result")).loss_sum,
                None => 0.0,
            })
            .collect();
        Ok(GpuStepResult {
            loss_sums,
            grad_norm: values[values.len() - 1][0] as f64,
        })
    }

    /// The adapters' device copies.
    pub fn params(&self) -> &GpuLora {
        &self.params
    }

    /// The loss of one sequence with the current adapters (no dropout, no gradients).
    pub async fn evaluate(&self, gpu: &Gpu, seq: &Sequence) -> Result<StepLoss> {
        crate::exec::gpu::forward_backward_async(
            gpu,
            &self.model,
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
