//! Executors: each runs the graphs that `models` build.

pub mod cpu;
pub mod gpu;
pub mod profile;

use crate::error::{Error, Result};

serde_as_value_enum!(Device, PrecisionChoice);
use crate::gpu::Gpu;

/// Where a run, an evaluation or a decode executes: the one place that turns the choice into an executor.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// A real GPU if one is present, otherwise the CPU.
    #[default]
    Auto,
    Cpu,
    /// A GPU, software ones included (lavapipe, SwiftShader: useful for testing); an error when there is
    /// none.
    Gpu,
}

impl Device {
    /// The GPU to run on, or None for the CPU executor.
    pub async fn open_async(self) -> Result<Option<Gpu>> {
        // Natively a software Vulkan device is slower than the CPU executor, so `auto` passes it over; in
        // a browser the CPU executor is single-threaded wasm, which a software WebGPU adapter still beats.
        const AUTO_TAKES_SOFTWARE: bool = cfg!(target_arch = "wasm32");
        match self {
            Device::Cpu => Ok(None),
            Device::Gpu => {
                let gpu = Gpu::new_async(true)
                    .await
                    .map_err(|e| Error::Invalid(format!("--device gpu: {e}")))?;
                if let Some(warning) = software_gpu_warning(&gpu.info) {
                    log::warn!("{warning}");
                }
                Ok(Some(gpu))
            }
            Device::Auto => match Gpu::new_async(AUTO_TAKES_SOFTWARE).await {
                Ok(gpu) => Ok(Some(gpu)),
                Err(e) => {
                    log::info!("using the CPU executor: {e}");
                    Ok(None)
                }
            },
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(self) -> Result<Option<Gpu>> {
        pollster::block_on(self.open_async())
    }
}

/// What to say when `--device gpu` opens a software renderer natively: it runs nibble's kernels on
/// the CPU through an emulated GPU, far slower than the CPU executor (a 0.5B step about 200x).
pub fn software_gpu_warning(info: &wgpu::AdapterInfo) -> Option<String> {
    let native = cfg!(not(target_arch = "wasm32"));
    (native && info.device_type == wgpu::DeviceType::Cpu).then(|| {
        format!(
            "{} is a software renderer, not a GPU: steps run far slower than on the CPU executor \
             (--device cpu, or auto); use it to test the GPU path",
            info.name
        )
    })
}

/// The arithmetic asked for the frozen-weight products.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrecisionChoice {
    /// The executor's fastest mode that keeps the loss within 1e-3 (relative) of float32: 16-bit
    /// integer products on Intel CPUs with VNNI and without AMX and on x86 CPUs with AVX2 and without
    /// AVX512-BF16 whose cores multiply 16-bit pairs on two pipes (Skylake and later, Zen 3 and
    /// later), bf16 products on Intel's AMX tiles (Xeon since Sapphire Rapids, Linux), AMD's
    /// AVX512-BF16 CPUs and ARM BF16, float32 elsewhere and on the GPU.
    #[default]
    Default,
    /// Exact float32 everywhere, for parity checks.
    F32,
    /// The CPU executor's frozen products in 16-bit integers whatever the core, to measure the choice
    /// `default` makes by CPU model (x86 cores without AVX2 and other architectures run the portable
    /// integer kernel, slowly). The GPU executor computes in float32.
    Int16,
}

impl PrecisionChoice {
    /// What the CPU executor runs on this machine.
    pub fn cpu(self) -> crate::ops::Precision {
        match self {
            PrecisionChoice::F32 => crate::ops::Precision::F32,
            PrecisionChoice::Default => crate::ops::Precision::fastest(),
            PrecisionChoice::Int16 => crate::ops::Precision::Int16,
        }
    }
}

/// Where a forward-only graph of a frozen model runs (the caching phase's encoders, sampling): the CPU
/// executor at a precision, or a GPU already holding the model's weights.
#[derive(Clone, Copy)]
pub enum Forward<'a> {
    Cpu(crate::ops::Precision),
    Gpu(&'a Gpu, &'a crate::gpu::weights::GpuWeights),
}

/// LoRA matrices on the host, and their copy on the GPU where the graph runs there.
#[cfg(not(target_arch = "wasm32"))]
pub type AdapterCopies<'a> = (
    &'a crate::lora::LoraAdapter,
    Option<&'a crate::gpu::weights::GpuLora>,
);

impl Forward<'_> {
    /// Runs `graph` over `model` (bound on the CPU; on the GPU its uploaded weights) with `inputs`, and
    /// returns the outputs `names`, in order.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(
        self,
        graph: &crate::graph::Graph,
        model: &dyn crate::model::FrozenWeights,
        inputs: &crate::graph::StepInputs,
        names: &[&str],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_adapted(graph, (model, None), inputs, names)
    }

    /// `run` with LoRA adapters: the host's matrices, and on the GPU their uploaded copy.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_adapted(
        self,
        graph: &crate::graph::Graph,
        (model, adapter): (&dyn crate::model::FrozenWeights, Option<AdapterCopies>),
        inputs: &crate::graph::StepInputs,
        names: &[&str],
    ) -> Result<Vec<Vec<f32>>> {
        match self {
            Forward::Cpu(precision) => {
                let bind = cpu::Bindings {
                    model,
                    adapter: adapter.map(|a| a.0),
                    grads: None,
                    cache: None,
                    optimizer: None,
                    inputs,
                    precision,
                };
                let mut out = cpu::run(graph, bind)?;
                Ok(names.iter().map(|n| out.take(n)).collect())
            }
            Forward::Gpu(device, weights) => {
                let bind = gpu::Bindings {
                    gpu: device,
                    model: weights,
                    lora: adapter.and_then(|a| a.1),
                    grads: None,
                    cache: None,
                    moments: None,
                    inputs,
                };
                let mut enc = device.encoder();
                let mut recorded = gpu::record(graph, bind, &mut enc)?;
                let outputs = names
                    .iter()
                    .map(|n| {
                        recorded
                            .take(n)
                            .ok_or_else(|| Error::Invalid(format!("the graph leaves no {n}")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                device.submit_and_read(enc, &outputs.iter().collect::<Vec<_>>())
            }
        }
    }
}
