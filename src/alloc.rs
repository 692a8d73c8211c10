//! Allocator settings for training. A CPU step allocates and frees activation buffers of megabytes in
//! every layer. With its default settings glibc's malloc returns such blocks to the kernel (munmap of
//! large blocks, trimming of the heaps' free tops) and faults fresh zeroed pages in on the next use, with
//! TLB shootdowns between the worker threads each time: 10-15% of a 0.5B model's step on a 2-core machine
//! (BENCHMARKS.md). Serving blocks up to 32 MiB from the heaps and never trimming them removes that
//! churn. The peak resident size does not grow: freed memory is reused by the next step, whose peak is
//! the same. One arena for all threads: the per-thread arenas delete a whole 64 MiB heap as soon as it is
//! empty whatever the trim threshold says, and a step runs on the worker threads, so their activations
//! were faulted in afresh every step (7% of a step's samples in page clearing); a few thousand
//! allocations per step do not contend for the one arena's lock.

/// Applies the settings above where the C library is glibc; elsewhere the system allocator's defaults
/// stay. Returns whether they were applied. Call once, early in `main`.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts malloc's tuning parameters; the values are within the ranges
        // glibc documents (the mmap threshold at most 32 MiB on 64-bit systems), and it is safe to call
        // at any time, from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        let applied = super::keep_freed_memory();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Allocation still works across the new thresholds.
        let big = vec![1u8; 40 << 20];
        let small = vec![2u8; 1 << 20];
        assert_eq!(big[big.len() - 1] as usize + small[0] as usize, 3);
    }
}
