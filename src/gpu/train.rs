//! Optimizer steps on the GPU: every micro-batch's forward and backward graph, then the optimizer graph
//! (global gradient norm, clipping coefficient, AdamW), recorded into one command encoder and submitted
//! once; only the
//! per-position losses and the norm come back. The adapters and AdamW's moments stay on the GPU between
//! steps and are downloaded when the trainer saves.

use super::weights::{GpuLora, GpuModel};
use super::{Gpu, GpuBuffer};
use crate::cpu::{Sequence, StepLoss};
use crate::error::Result;
use crate::exec::gpu::{Bindings, SequenceOptions, record, record_sequence, sequence_loss};
use crate::graph::StepInputs;
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::models::optimizer;
use crate::ops::adamw::AdamWParams;

pub struct GpuTrainState {
    pub model: GpuModel,
    params: GpuLora,
    grads: GpuLora,
    m: GpuLora,
    v: GpuLora,
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
        Ok(GpuTrainState {
            model: GpuModel::upload(gpu, model)?,
            params: GpuLora::upload(gpu, adapter),
            grads: GpuLora::upload(gpu, &adapter.zeros_like()),
            m: GpuLora::upload(gpu, m),
            v: GpuLora::upload(gpu, v),
        })
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
        let shapes: Vec<(String, usize, usize)> = self
            .params
            .pairs
            .iter()
            .map(|(path, (a, b))| (path.clone(), a.len, b.len))
            .collect();
        let graph = optimizer::build(&shapes, max_norm as f64);
        let inputs = StepInputs {
            adamw: bytemuck::cast(adamw),
            ..StepInputs::default()
        };
        let bind = Bindings {
            gpu,
            model: &self.model,
            lora: Some(&self.params),
            grads: Some(&self.grads),
            cache: None,
            moments: Some([&self.m, &self.v]),
            inputs: &inputs,
        };
        let clip = record(&graph, bind, &mut enc)?
            .take("clip")
            .expect("the optimizer graph leaves the norm");
        let mut reads: Vec<&GpuBuffer> = results.iter().flatten().collect();
        reads.push(&clip);
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
