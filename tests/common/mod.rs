//! Shared by the parity tests: the transformers + peft fixtures of tests/fixtures/hf (made by
//! scripts/make_model_fixtures.py) and the relative-error measure.
#![allow(dead_code)]

use nibble::cpu::Sequence;
use nibble::lora::LoraAdapter;
use nibble::model::{Model, ModelSource, QuantRequest};
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::source::{ModelFiles, SafetensorsFile};
use std::path::PathBuf;

/// The decoder families of tests/fixtures/hf (a folder per `model_type`), one small random model each.
pub fn families() -> [&'static str; nibble::config::Arch::ALL.len()] {
    nibble::config::Arch::ALL.map(nibble::config::Arch::model_type)
}

/// A command for the nibble binary, logging at level warn. `NIBBLE_TEST_RUNNER` (a command line, e.g.
/// `qemu-aarch64 -cpu max -L /usr/aarch64-linux-gnu`) runs it through an emulator, as cargo's target
/// runner runs the tests themselves when they are built for another architecture.
pub fn nibble_command() -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_nibble");
    let runner = std::env::var("NIBBLE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut command = match words.next() {
        Some(emulator) => {
            let mut c = std::process::Command::new(emulator);
            c.args(words).arg(binary);
            c
        }
        None => std::process::Command::new(binary),
    };
    command.env("RUST_LOG", "warn");
    command
}

/// A running child's standard error, line by line as it comes (for waiting on a message) and whole
/// once the child has closed it (from the returned thread).
pub fn stderr_lines(
    child: &mut std::process::Child,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    let (lines, received) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = lines.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    (received, reader)
}

/// Runs the nibble binary with `args` (log level warn).
pub fn nibble(args: &[&str]) -> std::process::Output {
    nibble_command().args(args).output().expect("run nibble")
}

/// The arguments of `nibble train` (on the CPU unless `extra` names a --device) with the given model,
/// data and output, and more flags.
pub fn train_args(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    if !extra.contains(&"--device") {
        args.extend_from_slice(&["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

/// `nibble train` (on the CPU unless `extra` names a --device) with the given model, data and output, and more flags.
pub fn train_cli(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    nibble_command()
        .args(train_args(model, data, out, extra))
        .output()
        .expect("run nibble")
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// How far an optimizer step `got` (parameters after it) is from `expected`, relative to the size of the
/// expected update from `before`: ‖max(0, |got − expected| − ulp(expected))‖ / ‖expected − before‖.
/// One unit in the last place of each parameter is forgiven because a GPU compiler may fuse the
/// weight-decay product into the update's subtraction (an FMA, one rounding instead of two); that moves
/// the stored parameter by up to one ulp (6e-8 of it), a visible share of an update that is only
/// ~1e-3 of the parameter. Simulated on the CPU, such a fusion alone reads as 1.1e-5 to 1.3e-5 through
/// `rel` of the updates, and NVIDIA's Vulkan driver showed 2.8e-5 (session 24); an error in the update
/// itself still counts.
pub fn rel_update(got: &[f32], expected: &[f32], before: &[f32]) -> f64 {
    assert!(got.len() == expected.len() && expected.len() == before.len());
    let ulp = |x: f32| {
        let x = x.abs();
        (f32::from_bits(x.to_bits() + 1) - x) as f64
    };
    let (mut off, mut size) = (0.0f64, 0.0f64);
    for ((&g, &e), &b) in got.iter().zip(expected).zip(before) {
        off += ((g as f64 - e as f64).abs() - ulp(e)).max(0.0).powi(2);
        size += (e as f64 - b as f64).powi(2);
    }
    (off / size).sqrt()
}

#[derive(serde::Deserialize)]
struct Expected {
    input_ids: Vec<u32>,
    labels: Vec<i64>,
    loss: f64,
}

/// One fixture case: the model (dense, or NF4 group 64 for quant "nf4"), its PEFT adapter, the
/// labelled sequence, the mean loss transformers computed, and its logits and gradients.
pub struct Fixture {
    pub model: Model,
    pub adapter: LoraAdapter,
    pub seq: Sequence,
    pub loss: f64,
    pub tensors: SafetensorsFile,
}

pub fn fixture(name: &str, quant: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name);
    let expected: Expected = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("expected_{quant}.json"))).unwrap(),
    )
    .unwrap();
    let tensors =
        SafetensorsFile::open(&dir.join(format!("expected_{quant}.safetensors"))).unwrap();
    let request = match quant {
        "none" => QuantRequest::Dense,
        _ => QuantRequest::Quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap()),
    };
    let model = ModelSource::open(&dir)
        .unwrap()
        .load(Some(request))
        .unwrap();
    let adapter =
        LoraAdapter::load_peft(&ModelFiles::Dir(dir.join("adapter")), &model.config).unwrap();
    // transformers shifts labels: position t predicts labels[t + 1]; -100 carries no loss.
    let targets = (0..expected.labels.len())
        .map(|t| {
            expected
                .labels
                .get(t + 1)
                .filter(|&&l| l >= 0)
                .map(|&l| l as u32)
        })
        .collect();
    let seq = Sequence {
        ids: expected.input_ids,
        targets,
        starts: vec![0],
        first_labelled: false,
    };
    Fixture {
        model,
        adapter,
        seq,
        loss: expected.loss,
        tensors,
    }
}

/// Devices a test process holds open at once. On an NVIDIA H200 (Vulkan, session 24) the ten tests of
/// tests/gpu.rs, started at once with `--test-threads 8` or 16 (ten devices in one process), all stalled
/// for over two minutes, even the ones that submit no work, while binaries opening a few devices
/// passed; a user's run opens one. CI's two cores never ran more than two at once, so this keeps every
/// machine to what CI exercises. (Whether the device count is the cause was not yet isolated.)
const DEVICES_AT_ONCE: usize = 2;

static OPEN_DEVICES: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// One of the `DEVICES_AT_ONCE` places, given back when dropped.
struct DevicePlace;

impl DevicePlace {
    fn take() -> DevicePlace {
        let (count, freed) = &OPEN_DEVICES;
        let mut open = count.lock().unwrap_or_else(|p| p.into_inner());
        while *open >= DEVICES_AT_ONCE {
            open = freed.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        *open += 1;
        DevicePlace
    }
}

impl Drop for DevicePlace {
    fn drop(&mut self) {
        let (count, freed) = &OPEN_DEVICES;
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// A test's GPU: the device, and its place among the process's open devices (dropped after it).
pub struct TestGpu {
    gpu: nibble::gpu::Gpu,
    _place: DevicePlace,
}

impl std::ops::Deref for TestGpu {
    type Target = nibble::gpu::Gpu;
    fn deref(&self) -> &nibble::gpu::Gpu {
        &self.gpu
    }
}

impl std::ops::DerefMut for TestGpu {
    fn deref_mut(&mut self) -> &mut nibble::gpu::Gpu {
        &mut self.gpu
    }
}

/// The GPU executor's device (lavapipe in CI). Without a Vulkan device GPU tests skip, unless
/// NIBBLE_REQUIRE_GPU is set (CI sets it, so a missing driver fails there rather than passing silently).
pub fn gpu() -> Option<TestGpu> {
    let place = DevicePlace::take();
    match nibble::gpu::Gpu::new(true) {
        Ok(g) => {
            eprintln!("GPU executor on {} ({:?})", g.info.name, g.info.backend);
            Some(TestGpu {
                gpu: g,
                _place: place,
            })
        }
        Err(e) if std::env::var_os("NIBBLE_REQUIRE_GPU").is_some() => {
            panic!("NIBBLE_REQUIRE_GPU is set but: {e}")
        }
        Err(e) => {
            eprintln!("skipping GPU test: {e}");
            None
        }
    }
}

/// A tiny random model of `arch` (f32 weights, the real architecture), its decoder linears dense or NF4
/// with groups of 32.
pub fn tiny_model(arch: nibble::config::Arch, vocab: usize, nf4: bool) -> Model {
    tiny_model_of(nibble::synth::SynthSpec::tiny(arch, vocab), nf4)
}

/// `tiny_model` of another shape (a preset with experts, say).
pub fn tiny_model_of(mut spec: nibble::synth::SynthSpec, nf4: bool) -> Model {
    let dir = tempfile::tempdir().unwrap();
    spec.dtype = nibble::source::FloatDtype::F32;
    nibble::synth::write_model_folder(dir.path(), &spec, None).unwrap();
    let request = if nf4 {
        QuantRequest::Quantize(QuantSpec::new(QuantFormat::Nf4, 32).unwrap())
    } else {
        QuantRequest::Dense
    };
    ModelSource::open(dir.path())
        .unwrap()
        .load(Some(request))
        .unwrap()
}

/// Writes a random tiny Qwen2 folder under the real Qwen2.5 tokenizer and vocabulary to `dir`.
pub fn write_tiny_qwen2(dir: &std::path::Path) {
    nibble::synth::write_model_folder(
        dir,
        &nibble::synth::SynthSpec::tiny(nibble::config::Arch::Qwen2, 151936),
        Some(&nibble::synth::qwen25_tokenizer()),
    )
    .unwrap();
}

/// The CPU kernel paths this machine runs, for tests that run a kernel once per path. Prints which
/// paths run and which are skipped and why; `NIBBLE_REQUIRE_CPU_PATHS=avx2,neon` (a comma-separated
/// list) fails the test when a listed path cannot run here, so CI can insist on them.
pub fn cpu_paths(test: &str) -> Vec<nibble::ops::isa::CpuPath> {
    use nibble::ops::isa::{self, CpuPath};
    let required: Vec<CpuPath> = std::env::var("NIBBLE_REQUIRE_CPU_PATHS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            CpuPath::parse(s)
                .unwrap_or_else(|| panic!("NIBBLE_REQUIRE_CPU_PATHS: unknown path {s}"))
        })
        .collect();
    let mut run = Vec::new();
    for (path, supported) in isa::survey() {
        match supported {
            Ok(()) => {
                eprintln!("{test}: CPU path {path}: runs");
                run.push(path);
            }
            Err(why) => {
                assert!(
                    !required.contains(&path),
                    "{test}: CPU path {path} is required (NIBBLE_REQUIRE_CPU_PATHS) but skipped: {why}"
                );
                eprintln!("{test}: CPU path {path}: skipped ({why})");
            }
        }
    }
    run
}

/// `adapter` as DoRA (PEFT's use_dora) with LoRA dropout `p`: magnitudes from the model's dequantized
/// weights (as PEFT initialises them), each then scaled by a random factor in [0.8, 1.2] so that every
/// output is rescaled.
pub fn as_dora(
    model: &nibble::model::Model,
    adapter: &nibble::lora::LoraAdapter,
    p: f32,
) -> nibble::lora::LoraAdapter {
    let mut dora = adapter.clone();
    dora.config.use_dora = true;
    dora.config.dropout = p;
    dora.init_magnitudes(|path| model.linear_weight(path))
        .unwrap();
    let mut rng = nibble::rng::Rng::new(31);
    for (_, pair) in dora.pairs_mut() {
        pair.magnitude
            .iter_mut()
            .for_each(|m| *m *= 0.8 + 0.4 * rng.uniform() as f32);
    }
    dora
}

/// `nibble train`'s options as its command line parses `args` (no program name).
pub fn train_flags(args: &[&str]) -> nibble::train::settings::TrainSettings {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        settings: nibble::train::settings::TrainSettings,
    }
    <Flags as clap::Parser>::try_parse_from(std::iter::once("train").chain(args.iter().copied()))
        .unwrap()
        .settings
}

fn sorted_names(file: &SafetensorsFile) -> impl Iterator<Item = String> {
    let mut names: Vec<String> = file.tensor_names().cloned().collect();
    names.sort();
    names.into_iter()
}

/// A file's tensors as stored: name, dtype, shape, bytes.
pub type RawTensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

pub fn raw_tensors(path: &std::path::Path) -> RawTensors {
    let file = SafetensorsFile::open(path).unwrap();
    sorted_names(&file)
        .map(|n| {
            let info = file.info(&n).unwrap();
            let raw = file.raw(&n).unwrap().to_vec();
            (n, info.dtype, info.shape.clone(), raw)
        })
        .collect()
}

pub fn write_raw(path: &std::path::Path, tensors: &RawTensors, metadata: Option<(&str, String)>) {
    let views = tensors.iter().map(|(n, dtype, shape, raw)| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), raw).unwrap();
        (n.as_str(), view)
    });
    let metadata = metadata.map(|(k, v)| std::collections::HashMap::from([(k.to_string(), v)]));
    safetensors::tensor::serialize_to_file(views, metadata, path).unwrap();
}

/// A tensor of a safetensors file as f32: (name, shape, values).
pub type F32Tensor = (String, Vec<usize>, Vec<f32>);

/// Every tensor of a safetensors file as f32, by name.
pub fn read_f32_tensors(path: &std::path::Path) -> Vec<F32Tensor> {
    let file = SafetensorsFile::open(path).unwrap();
    sorted_names(&file)
        .map(|n| {
            let shape = file.info(&n).unwrap().shape.clone();
            let values = file.read_f32(&n).unwrap();
            (n, shape, values)
        })
        .collect()
}

/// Writes `tensors` as an f32 safetensors file.
pub fn write_f32_tensors(path: &std::path::Path, tensors: &[F32Tensor]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let bytes: &[u8] = bytemuck::cast_slice(v);
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}
