//! `NIBBLE_PROFILE=1`: where a run's time goes, without a profiler. The CPU executor adds each graph
//! operation's wall time (products by shape); the GPU executor adds each dispatch's time on the device,
//! read from timestamps its compute pass writes (`gpu::timestamps`), under the operation that recorded
//! it and the kernel's entry point: the CPU cannot time GPU work, whose submission returns at once.
//! Both tables are summed over the process and printed when it ends. Beside the CPU executor's wall
//! times, the cores an operation kept busy on average (the process's CPU time over its wall time):
//! an operation well under the thread count leaves cores idle, which no kernel speed-up shows.

use crate::graph::Op;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

static ENABLED: LazyLock<AtomicBool> =
    LazyLock::new(|| AtomicBool::new(std::env::var_os("NIBBLE_PROFILE").is_some()));

/// Whether profiling is on (`NIBBLE_PROFILE` set, or `enable` called).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns profiling on for the rest of the process (for tests and embedders; a GPU opened before
/// this call writes no timestamps).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Per name: the time spent, how many calls, and the process's CPU time over them where measured.
pub struct Table {
    title: &'static str,
    totals: Mutex<BTreeMap<String, Totals>>,
}

#[derive(Default)]
struct Totals {
    wall: Duration,
    calls: u64,
    cpu: Option<Duration>,
}

/// The CPU time of every thread of this process so far, where the system tells it.
pub(crate) fn process_cpu_time() -> Option<Duration> {
    // libc is a dependency where nibble needs it elsewhere (Linux with glibc); other systems'
    // tables leave the column out.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through the pointer, which points at a local.
        let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) } == 0;
        ok.then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

pub static CPU: Table = Table::new("CPU executor, time per operation");
pub static GPU: Table = Table::new("GPU executor, device time per operation and kernel");

impl Table {
    const fn new(title: &'static str) -> Self {
        Table {
            title,
            totals: Mutex::new(BTreeMap::new()),
        }
    }

    /// One call of `name` that took `took`, of which `cpu` the process's CPU time where measured.
    pub(crate) fn add(&self, name: &str, took: Duration, cpu: Option<Duration>) {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match totals.get_mut(name) {
            Some(entry) => entry,
            None => totals.entry(name.to_string()).or_insert_with(|| Totals {
                cpu: cpu.map(|_| Duration::ZERO),
                ..Totals::default()
            }),
        };
        entry.wall += took;
        entry.calls += 1;
        entry.cpu = entry.cpu.zip(cpu).map(|(sum, cpu)| sum + cpu);
    }

    /// Each name's time and calls, longest first.
    pub fn rows(&self) -> Vec<(String, Duration, u64)> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = totals
            .iter()
            .map(|(name, t)| (name.clone(), t.wall, t.calls))
            .collect();
        rows.sort_by_key(|(_, d, _)| std::cmp::Reverse(*d));
        rows
    }

    /// The table, or None when nothing was added.
    pub fn report(&self) -> Option<String> {
        let rows = self.rows();
        if rows.is_empty() {
            return None;
        }
        let all: f64 = rows.iter().map(|(_, d, _)| d.as_secs_f64()).sum();
        let cores = |name: &str| {
            let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
            let t = &totals[name];
            t.cpu
                .map(|cpu| {
                    format!(
                        " {:>5.2} cores",
                        cpu.as_secs_f64() / t.wall.as_secs_f64().max(1e-12)
                    )
                })
                .unwrap_or_default()
        };
        let mut text = format!("{} ({all:.3} s in all):\n", self.title);
        for (name, d, calls) in rows {
            text += &format!(
                "  {name:<48} {:>9.3} s {:>5.1}% {calls:>8} calls{}\n",
                d.as_secs_f64(),
                100.0 * d.as_secs_f64() / all.max(1e-12),
                cores(&name)
            );
        }
        Some(text)
    }
}

/// Both executors' tables, or None when profiling is off or nothing ran.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let text: String = [CPU.report(), GPU.report()].into_iter().flatten().collect();
    (!text.is_empty()).then_some(text)
}

/// How an operation is named in the tables: products by shape, other operations by kind.
pub(crate) fn op_name(op: &Op) -> String {
    match op {
        Op::Linear { out, inp } => format!("Linear {out}x{inp}"),
        Op::LinearBackwardInput { out, inp } => format!("LinearBackwardInput {out}x{inp}"),
        // The variant's name: what `Debug` writes before its fields.
        other => format!("{other:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}
