//! `NIBBLE_PROFILE`'s tables (src/exec/profile.rs): the CPU executor's wall time and the GPU
//! executor's device time (timestamps written around each dispatch), both filed under the graph's
//! operations. Its own test binary: profiling, once on, stays on for the process.

mod common;

use common::{fixture, gpu};
use nibble::cpu::Sequence;
use nibble::exec::{self, profile};
use nibble::gpu::weights::{self, GpuLora, GpuModel};
use nibble::rng::Rng;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Per table row: its time and calls.
fn rows(table: &profile::Table) -> BTreeMap<String, (Duration, u64)> {
    table
        .rows()
        .into_iter()
        .map(|(name, d, calls)| (name, (d, calls)))
        .collect()
}

#[test]
fn both_executors_file_their_time_under_the_graph_operations() {
    profile::enable();
    let f = fixture("qwen3", "nf4");
    let vocab = f.model.config.vocab_size as u64;
    let mut rng = Rng::new(3);
    let sequences: Vec<Sequence> = [13, 7, 10]
        .iter()
        .map(|&n| Sequence::all_tokens((0..n).map(|_| rng.below(vocab) as u32).collect()))
        .collect();

    let started = Instant::now();
    for seq in &sequences {
        let mut grads = f.adapter.zeros_like();
        nibble::cpu::forward_backward(&f.model, Some(&f.adapter), Some(&mut grads), seq, 0.1, None)
            .unwrap();
    }
    let cpu_wall = started.elapsed();
    let cpu = rows(&profile::CPU);
    let layers = f.model.config.num_layers as u64;
    let runs = sequences.len() as u64;
    assert_eq!(cpu["Embed"].1, runs, "{cpu:?}");
    assert_eq!(cpu["CrossEntropyWithGrad"].1, runs, "{cpu:?}");
    assert_eq!(cpu["Attention"].1, layers * runs, "{cpu:?}");
    let cpu_total: Duration = cpu.values().map(|(d, _)| *d).sum();
    assert!(cpu_total <= cpu_wall, "{cpu_total:?} timed in {cpu_wall:?}");
    // Beside each CPU row, the cores it kept busy: more than none, no more than the threads it has
    // (with room for the two clocks being read apart), on the rows long enough to tell.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let report = profile::CPU.report().unwrap();
        let threads = rayon::current_num_threads() as f64;
        for line in report.lines().skip(1) {
            let name = line[2..2 + 48].trim_end();
            let cores: f64 = line
                .strip_suffix(" cores")
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no cores on {line:?}"));
            if cpu[name].0 >= Duration::from_micros(500) {
                assert!(cores > 0.0 && cores <= threads * 1.5, "{line}");
            }
        }
    }

    let Some(gpu) = gpu() else { return };
    if !gpu
        .device
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY)
    {
        eprintln!(
            "skipping the GPU table: {} writes no timestamps",
            gpu.info.name
        );
        return;
    }
    let gm = GpuModel::upload(&gpu, &f.model).unwrap();
    let gl = GpuLora::upload(&gpu, &f.adapter);
    let grads = weights::zero_grads(&gpu, &f.adapter);
    let started = Instant::now();
    for seq in &sequences {
        exec::gpu::forward_backward(&gpu, &gm, Some(&gl), Some(&grads), seq, 0.1).unwrap();
    }
    let gpu_wall = started.elapsed();
    let timed = rows(&profile::GPU);
    // Every dispatch of the step is recorded by one of the graph's operations, the same ones the CPU
    // executor ran, and the device cannot spend more time on them than the run took.
    let operation = |row: &str| row.split(": ").next().unwrap().to_string();
    for row in timed.keys() {
        assert!(row.contains(": "), "a dispatch outside the graph: {row}");
        assert!(
            cpu.contains_key(&operation(row)),
            "{row} is no CPU operation"
        );
    }
    // (Some operations are buffer copies on the GPU, with no dispatch to time: the embedding here.)
    for op in [
        "Attention",
        "AttentionBackward",
        "CrossEntropyWithGrad",
        "RmsNorm",
        "Matmul",
    ] {
        assert!(
            timed.keys().any(|row| operation(row) == op),
            "{op} has no GPU time: {timed:?}"
        );
    }
    assert_eq!(
        timed["Attention: attention_forward"].1,
        layers * runs,
        "{timed:?}"
    );
    let gpu_total: Duration = timed.values().map(|(d, _)| *d).sum();
    assert!(
        gpu_total > Duration::ZERO && gpu_total <= gpu_wall,
        "device time {gpu_total:?} in a run of {gpu_wall:?}"
    );
    eprintln!(
        "CPU: {cpu_total:?} of {cpu_wall:?}; GPU: {gpu_total:?} of {gpu_wall:?}\n{}",
        profile::report().unwrap()
    );
}
