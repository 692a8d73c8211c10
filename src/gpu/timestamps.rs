//! Device time per dispatch for `NIBBLE_PROFILE` (`exec::profile`): every dispatch runs in a compute
//! pass of its own (`Gpu::dispatch`), whose start and end timestamps go to a query set; the queries
//! are resolved into the encoder that `submit_and_read` submits and waits for, and read back with its
//! results. Dispatches of encoders submitted without a read are resolved with the next one (their
//! queries were written by then: the queue runs submissions in order).

use std::time::Duration;

/// Dispatches per query set (two queries each).
const DISPATCHES_PER_SET: usize = (wgpu::QUERY_SET_MAX_QUERIES / 2) as usize;
const QUERY_BYTES: u64 = wgpu::QUERY_SIZE as u64;

pub(crate) struct Timestamps {
    sets: Vec<wgpu::QuerySet>,
    /// The table row of each dispatch recorded since the last resolve, in order.
    pending: Vec<String>,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
}

/// Resolved queries on their way back: read after the submission completes.
pub(crate) struct Readback {
    pub(crate) staging: wgpu::Buffer,
    rows: Vec<String>,
    period_ns: f64,
}

impl Timestamps {
    pub(crate) fn new(queue: &wgpu::Queue) -> Self {
        Timestamps {
            sets: Vec::new(),
            pending: Vec::new(),
            period_ns: queue.get_timestamp_period() as f64,
        }
    }

    /// The query set and first index for the next dispatch, filed under `row`.
    pub(crate) fn next(&mut self, device: &wgpu::Device, row: String) -> (wgpu::QuerySet, u32) {
        let i = self.pending.len();
        let set = i / DISPATCHES_PER_SET;
        if set == self.sets.len() {
            self.sets
                .push(device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("profile"),
                    ty: wgpu::QueryType::Timestamp,
                    count: wgpu::QUERY_SET_MAX_QUERIES,
                }));
        }
        self.pending.push(row);
        (
            self.sets[set].clone(),
            (2 * (i % DISPATCHES_PER_SET)) as u32,
        )
    }

    /// Appends the resolve of every pending dispatch's queries to `encoder`, with a copy into a
    /// mappable buffer; None when no dispatch is pending.
    pub(crate) fn resolve(
        &mut self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Option<Readback> {
        if self.pending.is_empty() {
            return None;
        }
        let bytes = 2 * QUERY_BYTES * self.pending.len() as u64;
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (k, set) in self.sets.iter().enumerate() {
            let first = k * DISPATCHES_PER_SET;
            let count = self
                .pending
                .len()
                .saturating_sub(first)
                .min(DISPATCHES_PER_SET);
            if count > 0 {
                // A whole set's queries are 32 KiB, a multiple of QUERY_RESOLVE_BUFFER_ALIGNMENT.
                encoder.resolve_query_set(
                    set,
                    0..2 * count as u32,
                    &resolved,
                    2 * QUERY_BYTES * first as u64,
                );
            }
        }
        encoder.copy_buffer_to_buffer(&resolved, 0, &staging, 0, bytes);
        Some(Readback {
            staging,
            rows: std::mem::take(&mut self.pending),
            period_ns: self.period_ns,
        })
    }
}

impl Readback {
    /// Adds each dispatch's time to the GPU table; `ticks` is the mapped staging buffer.
    pub(crate) fn add(self, ticks: &[u8]) {
        let tick = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        for (row, pair) in self.rows.iter().zip(ticks.chunks_exact(16)) {
            let (start, end) = (tick(&pair[..8]), tick(&pair[8..]));
            // A pass's end before its start would be a query never written (its encoder dropped
            // unsubmitted): no time to add.
            let Some(ticks) = end.checked_sub(start) else {
                continue;
            };
            let nanos = (ticks as f64 * self.period_ns).round() as u64;
            crate::exec::profile::GPU.add(row, Duration::from_nanos(nanos), None);
        }
    }
}
