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

/// Returns the heap's free pages to the system, which `keep_freed_memory`'s settings never do by
/// themselves. Loading frees its temporaries (the tokenizer's parse of tokenizer.json alone is ~90 MB
/// for a 150k vocabulary) in the middle of the heap, where the steps' buffers, of other sizes, do not
/// reuse all of them. Call once after loading, before the steps.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages of the heap back to the kernel (contents of freed
    // memory only); glibc documents it as safe to call at any time, from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Asks the kernel to back `buffer`'s whole 2 MiB pages with huge pages (Linux transparent huge pages,
/// where the system leaves them to each program: "madvise", the common default). Call it on a large
/// buffer before its pages are first written, so that they are faulted in as huge pages. Decoding reads
/// the output projection (272 MB for Qwen2.5-0.5B) once per token: with 4 KiB pages, each page's
/// translation misses the TLB, and the product ran at 17 GB/s where it runs at 27 GB/s with huge pages
/// (BENCHMARKS.md session 19). Best effort: where the system has no such pages, nothing changes.
pub fn advise_huge_pages<T>(buffer: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let first = buffer.as_ptr() as usize;
        let (start, end) = (
            first.next_multiple_of(HUGE),
            (first + std::mem::size_of_val(buffer)) / HUGE * HUGE,
        );
        if end > start {
            // SAFETY: the range lies inside `buffer`'s allocation, which is live for this call;
            // MADV_HUGEPAGE only changes how the kernel backs those pages, never their contents, and
            // its failure (a kernel without transparent huge pages) changes nothing.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buffer;
}

/// The machine's memory in bytes: (RAM and swap in total, available now), where the system says
/// (Linux's /proc/meminfo); None elsewhere.
pub fn system_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    let swap = field("SwapTotal:").unwrap_or(0);
    Some((field("MemTotal:")? + swap, field("MemAvailable:")?))
}

/// Refuses work that needs more memory than the machine has at all (it would be killed after minutes
/// of swapping), naming both figures; warns when it needs more than is free now.
pub fn check_fits(what: &str, bytes: u64, advice: &str) -> crate::Result<()> {
    let Some((total, available)) = system_memory() else {
        return Ok(());
    };
    if bytes > total {
        return Err(crate::Error::Invalid(format!(
            "{what} needs {}, more than this machine's {} of memory and swap{advice}",
            human_bytes(bytes),
            human_bytes(total)
        )));
    }
    if bytes > available {
        log::warn!(
            "{what} needs {} and {} is free now: expect swapping",
            human_bytes(bytes),
            human_bytes(available)
        );
    }
    Ok(())
}

/// A size as people write it: bytes, or a number with KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB
/// (powers of 1024), case-insensitive, such as `11.5GiB` or `8000 MB`. `option` names the flag.
pub fn parse_size(text: &str, option: &str) -> crate::Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    let multiplier: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        _ => f64::NAN,
    };
    let bytes = number.parse::<f64>().map(|n| n * multiplier);
    match bytes {
        Ok(b) if b.is_finite() && b >= 1.0 && b < 2f64.powi(63) => Ok(b as u64),
        _ => Err(crate::Error::Invalid(format!(
            "{option}: {text:?} is not a size (write bytes, or a number with KB, MB, GB, TB, KiB, MiB, \
             GiB or TiB, such as 11.5GiB)"
        ))),
    }
}

/// `bytes` in the binary unit that shows it best: 2.00 GiB, 512.0 MiB, 1.7 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    // The larger unit is taken where the smaller one, rounded to its one decimal, would read 1024.0:
    // just under a GiB reads "1.00 GiB", not "1024.0 MiB".
    if b >= KIB * KIB * KIB - 0.05 * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB - 0.05 * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_show_in_the_unit_that_reads_best() {
        let shown = super::human_bytes;
        assert_eq!(shown(3 << 30), "3.00 GiB");
        assert_eq!(shown(1_750_000), "1.7 MiB");
        assert_eq!(shown(1_700), "1.7 KiB");
        assert_eq!(shown(900), "900 bytes");
        assert_eq!(shown((1 << 30) - 10_000), "1.00 GiB");
        assert_eq!(shown((1 << 30) - (1 << 20)), "1023.0 MiB");
        assert_eq!(shown((1 << 20) - 20), "1.0 MiB");
        assert_eq!(shown(1023), "1023 bytes");
    }

    #[test]
    fn sizes_parse_in_both_unit_families_and_nonsense_is_named() {
        let parse = |t| super::parse_size(t, "--gpu-memory");
        assert_eq!(parse("11.5GiB").unwrap(), 11 * (1 << 30) + (1 << 29));
        assert_eq!(parse("8000 mb").unwrap(), 8_000_000_000);
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse(" 2TiB ").unwrap(), 1 << 41);
        for bad in [
            "",
            "GiB",
            "-1GiB",
            "1.2.3GB",
            "12 parsecs",
            "0",
            "nan",
            "1e400",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("--gpu-memory") && e.contains("not a size"),
                "{bad}: {e}"
            );
        }
    }

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
