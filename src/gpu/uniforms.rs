//! Dispatches' uniform parameters, packed into shared buffers: a buffer of its own per dispatch made
//! recording a training step cost ~0.1 s per sequence on the CPU (thousands of buffers, each created,
//! written and tracked by wgpu), time the device waits for since a step is one submission. Each
//! dispatch binds its slot of an arena; an arena is created mapped, filled as dispatches are
//! recorded, and unmapped (its bytes handed to the device) when full or before any submission, so a
//! submission that used a still-mapped arena would be refused by wgpu rather than read stale values.

use std::num::NonZeroU64;

/// Slots per arena.
const SLOTS: u64 = 1024;

pub(crate) struct Uniforms {
    /// Bytes per slot: the device's uniform offset alignment, at least 256.
    slot: u64,
    /// The arena being filled and the bytes written to it so far.
    open: Option<(wgpu::Buffer, Vec<u8>)>,
}

impl Uniforms {
    pub(crate) fn new(limits: &wgpu::Limits) -> Self {
        Uniforms {
            slot: (limits.min_uniform_buffer_offset_alignment as u64).max(256),
            open: None,
        }
    }

    /// A binding of `params` in a slot of the open arena.
    pub(crate) fn bind(
        &mut self,
        device: &wgpu::Device,
        params: &[u8],
    ) -> (wgpu::Buffer, u64, u64) {
        assert!(
            params.len() as u64 <= self.slot,
            "uniform parameters over {} bytes",
            self.slot
        );
        if self
            .open
            .as_ref()
            .is_some_and(|(_, bytes)| bytes.len() as u64 == SLOTS * self.slot)
        {
            self.seal();
        }
        let (buffer, bytes) = self.open.get_or_insert_with(|| {
            let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("uniforms"),
                size: SLOTS * self.slot,
                usage: wgpu::BufferUsages::UNIFORM,
                mapped_at_creation: true,
            });
            (buffer, Vec::with_capacity((SLOTS * self.slot) as usize))
        });
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(params);
        bytes.resize((offset + self.slot) as usize, 0);
        (buffer.clone(), offset, self.slot)
    }

    /// Hands the open arena's bytes to the device: before every submission.
    pub(crate) fn seal(&mut self) {
        if let Some((buffer, bytes)) = self.open.take() {
            buffer
                .slice(..bytes.len() as u64)
                .get_mapped_range_mut()
                .expect("an arena stays mapped from its creation until it is sealed")
                .copy_from_slice(&bytes);
            buffer.unmap();
        }
    }
}

/// The binding resource of a slot.
pub(crate) fn resource(binding: &(wgpu::Buffer, u64, u64)) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: &binding.0,
        offset: binding.1,
        size: NonZeroU64::new(binding.2),
    })
}
