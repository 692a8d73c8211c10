//! The GPU executor on wgpu (Vulkan, DX12, Metal natively; WebGPU in the browser). Kernels are the WGSL
//! files in shaders/, each prefixed with shaders/common.wgsl; pipelines are created once and cached. All
//! dispatches of a step are recorded into one command encoder and submitted once.

pub mod memory;
mod timestamps;
pub mod train;
mod uniforms;
pub mod weights;

use crate::error::{Error, Result};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use wgpu::util::DeviceExt;

const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Every shader file, by name.
pub const SHADERS: &[(&str, &str)] = &[
    ("linear", include_str!("../../shaders/linear.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("rmsnorm", include_str!("../../shaders/rmsnorm.wgsl")),
    (
        "elementwise",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("embed", include_str!("../../shaders/embed.wgsl")),
    (
        "cross_entropy",
        include_str!("../../shaders/cross_entropy.wgsl"),
    ),
    ("adamw", include_str!("../../shaders/adamw.wgsl")),
    ("rows", include_str!("../../shaders/rows.wgsl")),
    ("bf16", include_str!("../../shaders/bf16.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("modulate", include_str!("../../shaders/modulate.wgsl")),
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("token_rows", include_str!("../../shaders/token_rows.wgsl")),
    ("moe", include_str!("../../shaders/moe.wgsl")),
];

/// (from, to) replacements in a shader's text.
type TextChanges = &'static [(&'static str, &'static str)];

/// Shader modules built from a file of `SHADERS` with textual changes: (name, file, changes).
/// `attention_wide` holds heads up to 512 wide (Gemma 4's full layers): twice the per-invocation rows,
/// which would cost every narrower model registers, hence a module of its own with `_wide` entry points.
const VARIANTS: &[(&str, &str, TextChanges)] = &[(
    "attention_wide",
    "attention",
    &[
        (
            "const MAX_HEAD_DIM: u32 = 256u;",
            "const MAX_HEAD_DIM: u32 = 512u;",
        ),
        ("fn attention_forward(", "fn attention_forward_wide("),
        (
            "fn attention_backward_dq(",
            "fn attention_backward_dq_wide(",
        ),
        (
            "fn attention_backward_dkdv(",
            "fn attention_backward_dkdv_wide(",
        ),
    ],
)];

/// Every shader module's name: the files, then their variants.
pub fn shader_names() -> impl Iterator<Item = &'static str> {
    SHADERS
        .iter()
        .map(|(name, _)| *name)
        .chain(VARIANTS.iter().map(|(name, _, _)| *name))
}

/// Which shader module defines each entry point.
const ENTRY_POINTS: &[(&str, &str)] = &[
    ("linear_forward", "linear"),
    ("linear_backward_input", "linear"),
    ("dora_factors", "linear"),
    ("matmul", "matmul"),
    ("rmsnorm_forward", "rmsnorm"),
    ("rmsnorm_backward", "rmsnorm"),
    ("add", "elementwise"),
    ("pack_bf16", "bf16"),
    ("unpack_bf16", "bf16"),
    ("add_assign", "elementwise"),
    ("swiglu_forward", "elementwise"),
    ("clamped_swiglu_forward", "elementwise"),
    ("clamped_swiglu_backward", "elementwise"),
    ("swiglu_backward", "elementwise"),
    ("geglu_forward", "elementwise"),
    ("geglu_backward", "elementwise"),
    ("scale", "elementwise"),
    ("soft_cap", "elementwise"),
    ("scale_rows", "elementwise"),
    ("sigmoid_gated_rows", "elementwise"),
    ("sigmoid_gated_rows_backward", "elementwise"),
    ("rope_apply", "rope"),
    ("attention_forward", "attention"),
    ("attention_delta", "attention"),
    ("attention_backward_dq", "attention"),
    ("attention_backward_dkdv", "attention"),
    ("attention_reduce_kv", "attention"),
    ("attention_forward_wide", "attention_wide"),
    ("attention_backward_dq_wide", "attention_wide"),
    ("attention_backward_dkdv_wide", "attention_wide"),
    ("embed", "embed"),
    ("ce_reduce", "cross_entropy"),
    ("ce_finalize", "cross_entropy"),
    ("ce_absorb", "cross_entropy"),
    ("ce_grad_finish", "cross_entropy"),
    ("adamw_step", "adamw"),
    ("sum_squares", "adamw"),
    ("gather_rows", "rows"),
    ("scatter_rows", "rows"),
    ("dropout_forward", "dropout"),
    ("dropout_backward", "dropout"),
    ("uniform_noise", "dropout"),
    ("grad_clip", "adamw"),
    ("layernorm_modulate_forward", "modulate"),
    ("layernorm_modulate_backward", "modulate"),
    ("gate", "modulate"),
    ("dora_magnitude_grad", "modulate"),
    ("silu", "modulate"),
    ("columns", "modulate"),
    ("place_columns", "modulate"),
    ("mse_loss", "modulate"),
    ("mse_grad", "modulate"),
    ("conv_gather", "conv"),
    ("group_norm_partial", "conv"),
    ("group_norm_finish", "conv"),
    ("group_norm_apply", "conv"),
    ("embedding_rows_grad", "token_rows"),
    ("output_rows_dlogit", "token_rows"),
    ("output_rows_grad", "token_rows"),
    ("moe_linear_forward", "linear"),
    ("moe_linear_backward_input", "linear"),
    ("moe_route", "moe"),
    ("moe_route_backward", "moe"),
    ("moe_sort", "moe"),
    ("moe_lora_project", "moe"),
    ("moe_lora_expand", "moe"),
    ("moe_add_bias", "moe"),
    ("moe_lora_back_xa", "moe"),
    ("moe_lora_grad_b", "moe"),
    ("moe_lora_grad_a", "moe"),
    ("moe_lora_input", "moe"),
    ("moe_combine", "moe"),
    ("moe_output_grad", "moe"),
];

/// The full WGSL source of a shader module (the common prelude included), as the GPU compiles it: None
/// for an unknown name, or a variant one of whose changes no longer finds its text.
pub fn shader_source(name: &str) -> Option<String> {
    if let Some((_, src)) = SHADERS.iter().find(|(n, _)| *n == name) {
        return Some(format!("{COMMON}\n{src}"));
    }
    let (_, file, changes) = VARIANTS.iter().find(|(n, _, _)| *n == name)?;
    let mut source = shader_source(file)?;
    for (from, to) in *changes {
        if !source.contains(from) {
            return None;
        }
        source = source.replace(from, to);
    }
    Some(source)
}

/// Free scratch buffers by capacity in words.
type Pool = Rc<RefCell<std::collections::BTreeMap<usize, Vec<wgpu::Buffer>>>>;

/// The smallest free buffer of `pool` that holds `len` words (the policy the plan replays).
fn take_free(pool: &Pool, len: usize) -> Option<wgpu::Buffer> {
    crate::graph::pool::take(&mut pool.borrow_mut(), len)
}

/// A storage buffer of `len` 32-bit elements. Scratch buffers go back to their pool when dropped, so a
/// later dispatch of the same step (or a later step) reuses the memory: the GPU runs dispatches in the
/// order they were recorded, so every earlier reader of the buffer is done before it is cleared and
/// written again.
pub struct GpuBuffer {
    pub buffer: wgpu::Buffer,
    pub len: usize,
    pool: Option<Pool>,
}

impl GpuBuffer {
    /// A handle to the first `len` words of this buffer for a tenant that lives in it for a while
    /// (`graph::pool::place`); not pooled.
    pub fn tenant(&self, len: usize) -> GpuBuffer {
        GpuBuffer {
            buffer: self.buffer.clone(),
            len,
            pool: None,
        }
    }

    /// `tenant`, its words zeroed by a command recorded now, as a scratch buffer's are: accumulating
    /// writes add to zeros.
    pub fn cleared_tenant(&self, encoder: &mut wgpu::CommandEncoder, len: usize) -> GpuBuffer {
        encoder.clear_buffer(&self.buffer, 0, Some((len.max(1) * 4) as u64));
        self.tenant(len)
    }

    /// A second handle to the same memory, which (unlike the first, if pooled) does not go back to the
    /// scratch pool when dropped: for passing a buffer where an owned one is expected.
    pub fn share(&self) -> GpuBuffer {
        self.tenant(self.len)
    }
}

/// Puts `buffer` back among `pool`'s free buffers, by its capacity.
fn give_back(pool: &Pool, buffer: wgpu::Buffer) {
    let capacity = (buffer.size() / 4) as usize;
    pool.borrow_mut().entry(capacity).or_default().push(buffer);
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            give_back(&pool, self.buffer.clone());
        }
    }
}

pub struct Gpu {
    pub device: wgpu::Device,
    /// Private: every submission goes through `submit`.
    queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub max_binding: u64,
    /// Loop iterations one shader invocation may run in all, where the device bounds them: Mesa's
    /// llvmpipe (lavapipe) leaves any loop once an invocation has run 65,535 iterations, silently, so
    /// long walks (attention over many keys) are split into passes below that. None on hardware.
    pub loop_budget: Option<usize>,
    modules: RefCell<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: RefCell<HashMap<&'static str, wgpu::ComputePipeline>>,
    pool: Pool,
    scratch_bytes: Cell<u64>,
    /// The most scratch bytes held at once (`scratch_peak_bytes`).
    scratch_peak: Cell<u64>,
    /// Whether a step's homes were taken since the last wait for the device: the pool's idle
    /// buffers may then belong to a submission still being recorded.
    recorded_since_wait: Cell<bool>,
    /// Free host-memory buffers (offloaded checkpoints), by capacity in words; None where the device
    /// cannot copy between its memory and mappable host memory (`MAPPABLE_PRIMARY_BUFFERS`: native
    /// Vulkan, DX12 and Metal can; WebGPU cannot).
    host_pool: Option<Pool>,
    host_bytes: Cell<u64>,
    /// The first error wgpu reported outside an error scope (out of memory, most likely), kept for
    /// `check_errors`: wgpu's own handler would panic.
    first_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// With `NIBBLE_PROFILE`, where the device writes timestamps (None where it cannot).
    timestamps: Option<RefCell<timestamps::Timestamps>>,
    /// The graph operation being recorded, under which the profile files its dispatches.
    profile_scope: RefCell<Option<String>>,
    uniforms: RefCell<uniforms::Uniforms>,
}

impl Gpu {
    /// Opens a GPU. With `allow_software`, a CPU implementation of Vulkan (Mesa lavapipe) is acceptable,
    /// which is how tests run on machines without a GPU; otherwise only real GPUs are.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(allow_software: bool) -> Result<Self> {
        pollster::block_on(Self::new_async(allow_software))
    }

    pub async fn new_async(allow_software: bool) -> Result<Self> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| Error::Invalid(format!("no GPU adapter: {e}")))?;
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu && !allow_software {
            return Err(Error::Invalid(format!(
                "no GPU found (only the software adapter {})",
                info.name
            )));
        }
        let limits = adapter.limits();
        // Buffers that the device copies to and from and that live in host memory: where offloaded
        // checkpoints go.
        let host_copies = adapter
            .features()
            .intersection(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let profiling = crate::exec::profile::enabled();
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        if profiling && !timestamps {
            log::warn!(
                "NIBBLE_PROFILE: GPU {} does not write timestamps, so its kernels are not timed",
                info.name
            );
        }
        let timed = profiling && timestamps;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("nibble"),
                required_features: if timed {
                    host_copies | wgpu::Features::TIMESTAMP_QUERY
                } else {
                    host_copies
                },
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| {
                Error::Invalid(format!("GPU {}: cannot open the device: {e}", info.name))
            })?;
        let first_error = std::sync::Arc::new(std::sync::Mutex::new(None));
        let slot = first_error.clone();
        device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            let what = match &e {
                wgpu::Error::OutOfMemory { .. } => "out of device memory".to_string(),
                other => other.to_string(),
            };
            slot.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(what);
        }));
        let max_binding = binding_limit(&limits);
        // Half of llvmpipe's 65,535, leaving room for the loops outside a pass's main walk.
        let loop_budget = (info.device_type == wgpu::DeviceType::Cpu).then_some(32_768);
        Ok(Gpu {
            info,
            max_binding,
            loop_budget,
            modules: RefCell::new(HashMap::new()),
            pipelines: RefCell::new(HashMap::new()),
            pool: Rc::new(RefCell::new(std::collections::BTreeMap::new())),
            scratch_bytes: Cell::new(0),
            scratch_peak: Cell::new(0),
            recorded_since_wait: Cell::new(false),
            host_pool: (!host_copies.is_empty())
                .then(|| Rc::new(RefCell::new(std::collections::BTreeMap::new()))),
            host_bytes: Cell::new(0),
            first_error,
            timestamps: timed.then(|| RefCell::new(timestamps::Timestamps::new(&queue))),
            profile_scope: RefCell::new(None),
            uniforms: RefCell::new(uniforms::Uniforms::new(&device.limits())),
            device,
            queue,
        })
    }

    /// Files the dispatches recorded from now on under `op` in the profile (None: under their kernel
    /// alone); nothing to do where the device writes no timestamps.
    pub(crate) fn set_profile_scope(&self, op: Option<&crate::graph::Op>) {
        if self.timestamps.is_some() {
            *self.profile_scope.borrow_mut() = op.map(crate::exec::profile::op_name);
        }
    }

    /// An error if wgpu has reported one since the device opened: every later result may be garbage
    /// (a buffer that could not be created reads as zeros), so the run stops here.
    pub fn check_errors(&self) -> Result<()> {
        let first = self
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match first {
            Some(e) => Err(Error::Invalid(format!("GPU {}: {e}", self.info.name))),
            None => Ok(()),
        }
    }

    /// The largest buffer the device binds, whatever `max_binding` was lowered to (tests lower it to
    /// split weights).
    pub fn device_binding_limit(&self) -> u64 {
        binding_limit(&self.device.limits())
    }

    fn pipeline(&self, entry: &'static str) -> wgpu::ComputePipeline {
        if let Some(p) = self.pipelines.borrow().get(entry) {
            return p.clone();
        }
        let file = ENTRY_POINTS
            .iter()
            .find(|(e, _)| *e == entry)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("unknown entry point {entry}"));
        let module = self
            .modules
            .borrow_mut()
            .entry(file)
            .or_insert_with(|| {
                let source = shader_source(file).expect("listed in SHADERS or VARIANTS");
                self.device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(file),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    })
            })
            .clone();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        self.pipelines.borrow_mut().insert(entry, pipeline.clone());
        pipeline
    }

    fn storage(&self, bytes: &[u8], len: usize) -> GpuBuffer {
        // wgpu rejects zero-sized bindings; an empty tensor gets one unused word.
        let contents: &[u8] = if bytes.is_empty() { &[0u8; 4] } else { bytes };
        let buffer = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        GpuBuffer {
            buffer,
            len,
            pool: None,
        }
    }

    /// Writes `words` into `buffer` from word `at`, before anything submitted after this call runs.
    pub fn write_words(&self, buffer: &GpuBuffer, at: usize, words: &[u32]) {
        self.queue
            .write_buffer(&buffer.buffer, (4 * at) as u64, bytemuck::cast_slice(words));
    }

    pub fn upload_f32(&self, data: &[f32]) -> GpuBuffer {
        self.storage(bytemuck::cast_slice(data), data.len())
    }

    pub fn upload_u32(&self, data: &[u32]) -> GpuBuffer {
        self.storage(bytemuck::cast_slice(data), data.len())
    }

    pub fn zeros(&self, len: usize) -> GpuBuffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (len.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        GpuBuffer {
            buffer,
            len,
            pool: None,
        }
    }

    /// A zeroed scratch buffer of `len` words for use later in `encoder`: the smallest free one from the
    /// pool that holds them (`graph::pool::take`; cleared by a command recorded now), or a new one.
    /// Kernels bind whole buffers and read only the words their parameters name, so a larger buffer
    /// serves as well.
    pub fn scratch(&self, encoder: &mut wgpu::CommandEncoder, len: usize) -> GpuBuffer {
        let (buffer, reused) = self.pooled(len);
        if reused {
            encoder.clear_buffer(&buffer.buffer, 0, None);
        }
        buffer
    }

    /// The homes of a step's activations and temporaries (`graph::pool::place`), of these capacities
    /// in words: each the smallest idle buffer of the pool that holds it, however larger (a shorter
    /// sequence after a longer one allocates nothing). Where some cannot be served:
    /// - between submissions, the pool's idle buffers are freed and every home is made anew at its
    ///   size, so that the device holds the homes of one step (the largest so far), not a set per
    ///   sequence length, nor larger buffers kept for smaller homes;
    /// - when an earlier graph of the submission being recorded uses the pool's buffers (they would
    ///   stay allocated until it is done), only the missing homes are made.
    ///
    /// Contents are whatever each last held: every tenant is cleared as it moves in.
    pub fn homes(&self, capacities: &[usize]) -> Vec<GpuBuffer> {
        let mut order: Vec<usize> = (0..capacities.len()).collect();
        order.sort_by_key(|&h| std::cmp::Reverse(capacities[h]));
        let mut found = vec![None; capacities.len()];
        for &h in &order {
            found[h] =
                crate::graph::pool::take_at_least(&mut self.pool.borrow_mut(), capacities[h]);
        }
        if found.iter().any(Option::is_none) && !self.recorded_since_wait.get() {
            for buffer in found.iter_mut().filter_map(Option::take) {
                give_back(&self.pool, buffer);
            }
            self.release_scratch_pool();
        }
        self.recorded_since_wait.set(true);
        found
            .into_iter()
            .zip(capacities)
            .map(|(buffer, &len)| GpuBuffer {
                buffer: buffer.unwrap_or_else(|| self.create_scratch(len)),
                len,
                pool: Some(self.pool.clone()),
            })
            .collect()
    }

    /// A new scratch buffer of `len` words, zeroed, counted in `scratch_bytes`.
    fn create_scratch(&self, len: usize) -> wgpu::Buffer {
        self.scratch_bytes
            .set(self.scratch_bytes.get() + (len.max(1) * 4) as u64);
        self.scratch_peak
            .set(self.scratch_peak.get().max(self.scratch_bytes.get()));
        self.zeros(len).buffer.clone()
    }

    /// Frees the device pool's idle buffers.
    fn release_scratch_pool(&self) {
        let freed: u64 = std::mem::take(&mut *self.pool.borrow_mut())
            .into_iter()
            .map(|(capacity, buffers)| (capacity * 4 * buffers.len()) as u64)
            .sum();
        self.scratch_bytes.set(self.scratch_bytes.get() - freed);
    }

    /// The most scratch memory the device held at once (pooled and in use) since
    /// `reset_scratch_peak`. Buffers are freed only between submissions (`homes`,
    /// `release_scratch`), so none is let go of while the device may still use it.
    pub fn scratch_peak_bytes(&self) -> u64 {
        self.scratch_peak.get()
    }

    pub fn reset_scratch_peak(&self) {
        self.scratch_peak.set(self.scratch_bytes.get());
    }

    /// A buffer from the pool, and whether it was there (else it is new, and zeroed).
    fn pooled(&self, len: usize) -> (GpuBuffer, bool) {
        let (buffer, reused) = match take_free(&self.pool, len) {
            Some(b) => (b, true),
            None => (self.create_scratch(len), false),
        };
        let buffer = GpuBuffer {
            buffer,
            len,
            pool: Some(self.pool.clone()),
        };
        (buffer, reused)
    }

    /// Whether the device can keep buffers in host memory (`host_scratch`).
    pub fn can_offload(&self) -> bool {
        self.host_pool.is_some()
    }

    /// Whether offloading to host memory leaves more room on the device: it can offload, and its
    /// memory is not the host's own (an integrated GPU's, Apple's unified memory).
    pub fn offload_helps(&self) -> bool {
        self.can_offload() && self.info.device_type != wgpu::DeviceType::IntegratedGpu
    }

    /// A buffer of `len` words in host memory that the device copies to and from (and nothing binds),
    /// back to its own pool when dropped; None where the device has none (`can_offload`). Its contents
    /// are whatever it last held: an offloaded buffer is written whole before it is read.
    pub fn host_scratch(&self, len: usize) -> Option<GpuBuffer> {
        let pool = self.host_pool.as_ref()?;
        let buffer = take_free(pool, len).unwrap_or_else(|| {
            self.host_bytes
                .set(self.host_bytes.get() + (len.max(1) * 4) as u64);
            // MAP_READ without MAP_WRITE is what wgpu's Vulkan backend places in host (cached) memory
            // rather than in device memory the host can see (resizable BAR).
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("offloaded"),
                size: (len.max(1) * 4) as u64,
                usage: wgpu::BufferUsages::MAP_READ
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        Some(GpuBuffer {
            buffer,
            len,
            pool: Some(pool.clone()),
        })
    }

    /// Bytes of host memory created so far for offloaded buffers (their high-water mark).
    pub fn host_scratch_bytes(&self) -> u64 {
        self.host_bytes.get()
    }

    /// Frees the pool's idle scratch buffers (those of a finished phase, such as the text encoder's
    /// before training), so that their memory goes back to the device.
    pub fn release_scratch(&self) {
        self.release_scratch_pool();
        if let Some(host) = &self.host_pool {
            host.borrow_mut().clear();
        }
    }

    /// Bytes of scratch memory the device holds for the steps (pooled and in use; idle buffers freed
    /// by `release_scratch` or by `homes` no longer count).
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_bytes.get()
    }

    /// Records one dispatch: binding 0 is the uniform `params`, the others are the given buffers.
    pub fn dispatch<P: bytemuck::Pod>(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        entry: &'static str,
        params: &P,
        buffers: &[(u32, &GpuBuffer)],
        groups: [u32; 3],
    ) {
        let pipeline = self.pipeline(entry);
        let uniform = self
            .uniforms
            .borrow_mut()
            .bind(&self.device, bytemuck::bytes_of(params));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniforms::resource(&uniform),
        }];
        entries.extend(buffers.iter().map(|(binding, b)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: b.buffer.as_entire_binding(),
        }));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let timed = self.timestamps.as_ref().map(|t| {
            let row = match &*self.profile_scope.borrow() {
                Some(op) => format!("{op}: {entry}"),
                None => entry.to_string(),
            };
            t.borrow_mut().next(&self.device, row)
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(entry),
            timestamp_writes: timed
                .as_ref()
                .map(|(set, first)| wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(*first),
                    end_of_pass_write_index: Some(first + 1),
                }),
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// Submits `encoder`: every submission goes through here, after the dispatches' parameters are
    /// handed to the device.
    pub fn submit(&self, encoder: wgpu::CommandEncoder) {
        self.uniforms.borrow_mut().seal();
        self.queue.submit(Some(encoder.finish()));
    }

    pub fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
    }

    /// Submits the encoder with copies of `reads` appended, waits, and returns their contents as f32.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn submit_and_read(
        &self,
        encoder: wgpu::CommandEncoder,
        reads: &[&GpuBuffer],
    ) -> Result<Vec<Vec<f32>>> {
        pollster::block_on(self.submit_and_read_async(encoder, reads))
    }

    /// `submit_and_read` for every target: in a browser the page's event loop completes the read, so
    /// this must be awaited rather than blocked on.
    pub async fn submit_and_read_async(
        &self,
        mut encoder: wgpu::CommandEncoder,
        reads: &[&GpuBuffer],
    ) -> Result<Vec<Vec<f32>>> {
        let staging: Vec<wgpu::Buffer> = reads
            .iter()
            .map(|b| {
                let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: (b.len.max(1) * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(&b.buffer, 0, &s, 0, (b.len.max(1) * 4) as u64);
                s
            })
            .collect();
        let timed = self
            .timestamps
            .as_ref()
            .and_then(|t| t.borrow_mut().resolve(&self.device, &mut encoder));
        self.submit(encoder);
        let mapped = MapAll::new(staging.len() + timed.is_some() as usize);
        for s in staging.iter().chain(timed.as_ref().map(|t| &t.staging)) {
            s.slice(..)
                .map_async(wgpu::MapMode::Read, mapped.callback());
        }
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Invalid(format!("GPU: waiting for the step failed: {e}")))?;
        mapped
            .await
            .map_err(|e| Error::Invalid(format!("GPU: reading back a result failed: {e}")))?;
        // Every submission so far is done: the pool's idle buffers are idle on the device too.
        self.recorded_since_wait.set(false);
        self.check_errors()?;
        if let Some(timed) = timed {
            let view = timed.staging.slice(..).get_mapped_range().map_err(|e| {
                Error::Invalid(format!("GPU: reading back the profile failed: {e}"))
            })?;
            let ticks = view.to_vec();
            drop(view);
            timed.add(&ticks);
        }
        staging
            .iter()
            .zip(reads)
            .map(|(s, b)| {
                let view = s.slice(..).get_mapped_range().map_err(|e| {
                    Error::Invalid(format!("GPU: reading back a result failed: {e}"))
                })?;
                let values: Vec<f32> = bytemuck::cast_slice::<u8, f32>(&view)[..b.len].to_vec();
                drop(view);
                s.unmap();
                Ok(values)
            })
            .collect()
    }
}

/// A future that completes when every one of `count` buffer mappings has called back.
struct MapAll {
    state: std::sync::Arc<std::sync::Mutex<MapState>>,
}

struct MapState {
    remaining: usize,
    error: Option<String>,
    waker: Option<std::task::Waker>,
}

impl MapAll {
    fn new(count: usize) -> Self {
        MapAll {
            state: std::sync::Arc::new(std::sync::Mutex::new(MapState {
                remaining: count,
                error: None,
                waker: None,
            })),
        }
    }

    fn callback(&self) -> impl FnOnce(std::result::Result<(), wgpu::BufferAsyncError>) + 'static {
        let state = self.state.clone();
        move |result| {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = result {
                s.error = Some(e.to_string());
            }
            s.remaining -= 1;
            if s.remaining == 0
                && let Some(w) = s.waker.take()
            {
                w.wake();
            }
        }
    }
}

impl std::future::Future for MapAll {
    type Output = std::result::Result<(), String>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.remaining > 0 {
            s.waker = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(match s.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}

/// The largest buffer that can be created and bound whole under `limits`.
fn binding_limit(limits: &wgpu::Limits) -> u64 {
    limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size)
}

/// Workgroup counts for `n` threads in groups of `size`, spread over y when x would pass 65,535.
pub fn groups_1d(n: usize, size: usize) -> [u32; 3] {
    let total = n.div_ceil(size).max(1);
    if total <= 65535 {
        [total as u32, 1, 1]
    } else {
        [65535, total.div_ceil(65535) as u32, 1]
    }
}
