//! `NIBBLE_PROFILE=1`: where a run's time goes, without a profiler. The CPU executor adds each graph
//! operation's wall time (products by shape); the GPU executor adds each dispatch's time on the device,
//! read from timestamps its compute pass writes (`gpu::timestamps`), under the operation that recorded
//! it and the kernel's entry point: the CPU cannot time GPU work, whose submission returns at once.
//! Both tables are summed over the process and printed when it ends.

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

/// Per name: the time spent and how many calls.
pub struct Table {
    title: &'static str,
    totals: Mutex<BTreeMap<String, (Duration, u64)>>,
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

    pub(crate) fn add(&self, name: &str, took: Duration) {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let entry = match totals.get_mut(name) {
            Some(entry) => entry,
            None => totals.entry(name.to_string()).or_default(),
        };
        entry.0 += took;
        entry.1 += 1;
    }

    /// Each name's time and calls, longest first.
    pub fn rows(&self) -> Vec<(String, Duration, u64)> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<_> = totals
            .iter()
            .map(|(name, (d, calls))| (name.clone(), *d, *calls))
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
        let mut text = format!("{} ({all:.3} s in all):\n", self.title);
        for (name, d, calls) in rows {
            text += &format!(
                "  {name:<48} {:>9.3} s {:>5.1}% {calls:>8} calls\n",
                d.as_secs_f64(),
                100.0 * d.as_secs_f64() / all.max(1e-12)
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
