//! How much memory the device has for nibble, asked before anything is allocated, so that a run that
//! cannot fit is refused with both figures instead of failing (or, on some drivers, paging to system
//! memory at a fraction of the speed) half-way through loading.
//!
//! WebGPU has no such query. On Vulkan (Linux, Windows, Android) the driver reports it through
//! `VK_EXT_memory_budget` (or, without that extension, the size of its device-local heaps). DX12 and
//! Metal are not asked yet: there a run that does not fit fails at its first allocation, which
//! `Gpu::check_errors` turns into an error.

use super::Gpu;

/// Device-local memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceMemory {
    /// What this process may use in all (the driver's budget, or the heaps' size).
    pub budget: u64,
    /// What this process already uses.
    pub used: u64,
    /// Where the figures came from, for messages.
    pub source: &'static str,
}

impl DeviceMemory {
    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used)
    }

    /// The figures with the user's cap (`--gpu-memory`) applied.
    pub fn capped(self, cap: Option<u64>) -> DeviceMemory {
        match cap {
            Some(cap) if cap < self.budget => DeviceMemory {
                budget: cap,
                used: self.used,
                source: "--gpu-memory",
            },
            _ => self,
        }
    }
}

impl Gpu {
    /// The device's memory as its driver reports it, where the backend can say.
    pub fn memory(&self) -> Option<DeviceMemory> {
        #[cfg(all(
            not(target_arch = "wasm32"),
            any(target_os = "linux", target_os = "windows", target_os = "android")
        ))]
        if let Some(m) = vulkan_memory(&self.device) {
            return Some(m);
        }
        None
    }

    /// Refuses a run whose planned device memory exceeds what the device has free for it (capped by
    /// the user's `cap`), naming both figures; silent where the device cannot say.
    pub fn check_fits(
        &self,
        what: &str,
        bytes: u64,
        cap: Option<u64>,
        advice: &str,
    ) -> crate::Result<()> {
        // A software adapter (lavapipe, SwiftShader) allocates system memory, whatever heap size it
        // reports (lavapipe says 2 GiB).
        let software = self.info.device_type == wgpu::DeviceType::Cpu;
        if software && cap.is_none() {
            return crate::alloc::check_fits(what, bytes, advice);
        }
        let driver = if software { None } else { self.memory() };
        let known = match (driver, cap) {
            (Some(m), cap) => Some(m.capped(cap)),
            (None, Some(cap)) => Some(DeviceMemory {
                budget: cap,
                used: 0,
                source: "--gpu-memory",
            }),
            (None, None) => None,
        };
        let Some(memory) = known else {
            return Ok(());
        };
        if bytes > memory.free() {
            let human = crate::alloc::human_bytes;
            return Err(crate::Error::Invalid(format!(
                "{what} needs {} on {}, which has {} free for it ({} by {}, {} in use){advice}",
                human(bytes),
                self.info.name,
                human(memory.free()),
                human(memory.budget),
                memory.source,
                human(memory.used),
            )));
        }
        Ok(())
    }
}

#[cfg(all(
    not(target_arch = "wasm32"),
    any(target_os = "linux", target_os = "windows", target_os = "android")
))]
fn vulkan_memory(device: &wgpu::Device) -> Option<DeviceMemory> {
    use ash::vk;
    // SAFETY: the raw handles are used only within this call, while `device` (which owns them) is
    // alive, and only for a read-only query that Vulkan allows from any thread at any time.
    let hal = unsafe { device.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    let physical = hal.raw_physical_device();
    let with_budget = hal
        .enabled_device_extensions()
        .contains(&ash::ext::memory_budget::NAME);
    let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
    let mut props = vk::PhysicalDeviceMemoryProperties2::default();
    if with_budget {
        props = props.push_next(&mut budget);
    }
    // SAFETY: `physical` belongs to `instance` (wgpu-hal created both); `props` is a valid chain whose
    // only extension struct outlives the call. Memory-properties-2 is core in Vulkan 1.1, which wgpu
    // requires.
    unsafe { instance.get_physical_device_memory_properties2(physical, &mut props) };
    let heaps = props.memory_properties;
    let count = (heaps.memory_heap_count as usize).min(vk::MAX_MEMORY_HEAPS);
    let local: Vec<usize> = (0..count)
        .filter(|&i| {
            heaps.memory_heaps[i]
                .flags
                .contains(vk::MemoryHeapFlags::DEVICE_LOCAL)
        })
        .collect();
    if local.is_empty() {
        return None;
    }
    // One heap of device memory is the rule; where a driver splits it (a small host-visible window
    // beside the rest), the largest heap is where buffers go.
    let largest = *local
        .iter()
        .max_by_key(|&&i| heaps.memory_heaps[i].size)
        .expect("not empty");
    Some(if with_budget {
        DeviceMemory {
            budget: budget.heap_budget[largest],
            used: budget.heap_usage[largest],
            source: "the driver's budget",
        }
    } else {
        DeviceMemory {
            budget: heaps.memory_heaps[largest].size,
            used: 0,
            source: "the size of the device's memory",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::DeviceMemory;

    #[test]
    fn a_cap_lowers_the_budget_but_never_raises_it() {
        let driver = DeviceMemory {
            budget: 12 << 30,
            used: 1 << 30,
            source: "the driver's budget",
        };
        let capped = driver.capped(Some(6 << 30));
        assert_eq!((capped.budget, capped.free()), (6 << 30, 5 << 30));
        assert_eq!(capped.source, "--gpu-memory");
        assert_eq!(driver.capped(Some(20 << 30)), driver);
        assert_eq!(driver.capped(None), driver);
    }
}
