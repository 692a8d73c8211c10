//! The CPU executor against transformers + peft (fixtures made by scripts/make_model_fixtures.py): logits,
//! loss and every LoRA gradient of small random Qwen2 (tied, biases), Qwen3 (q/k norm) and Llama
//! (untied, llama3 rope) models, float32, with the base unquantized and in NF4 group 64.

use nibble::cpu::{self, Sequence};
use nibble::lora::{LoraAdapter, peft_key};
use nibble::model::{ModelSource, QuantRequest};
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::source::{ModelFiles, SafetensorsFile};
use std::path::PathBuf;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

#[derive(serde::Deserialize)]
struct Expected {
    input_ids: Vec<u32>,
    labels: Vec<i64>,
    loss: f64,
}

fn check(name: &str, quant: &str) {
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
    let source = ModelSource::open(&dir).unwrap();
    let model = source.load(Some(request)).unwrap();
    let adapter =
        LoraAdapter::load_peft(&ModelFiles::Dir(dir.join("adapter")), &model.config).unwrap();
    assert_eq!(adapter.config.scale(), 2.0);

    let logits = cpu::logits(&model, Some(&adapter), &expected.input_ids).unwrap();
    let e = rel(&logits, &tensors.read_f32("logits").unwrap());
    assert!(e < 1e-5, "{name} {quant}: logits differ by {e:e}");

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
        ids: expected.input_ids.clone(),
        targets,
    };
    let mut grads = adapter.zeros_like();
    let n = seq.target_count();
    let loss = cpu::forward_backward(
        &model,
        Some(&adapter),
        Some(&mut grads),
        &seq,
        1.0 / n as f32,
        None,
    )
    .unwrap();
    let mean = loss.loss_sum / loss.targets as f64;
    assert!(
        (mean - expected.loss).abs() / expected.loss < 1e-5,
        "{name} {quant}: loss {mean} vs {}",
        expected.loss
    );

    let mut worst = (0.0f64, String::new());
    for (l, kind, g) in grads.pairs() {
        for (which, ours) in [("lora_A", &g.a), ("lora_B", &g.b)] {
            let key = peft_key(l, kind, which);
            let e = rel(ours, &tensors.read_f32(&key).unwrap());
            if e > worst.0 {
                worst = (e, key);
            }
        }
    }
    assert!(
        worst.0 < 1e-5,
        "{name} {quant}: gradient {} differs by {:e}",
        worst.1,
        worst.0
    );
    println!(
        "{name} {quant}: logits {e:.1e}, worst gradient {:.1e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn qwen2_matches_transformers_peft() {
    check("qwen2", "none");
    check("qwen2", "nf4");
}

#[test]
fn qwen3_matches_transformers_peft() {
    check("qwen3", "none");
    check("qwen3", "nf4");
}

#[test]
fn llama_matches_transformers_peft() {
    check("llama", "none");
    check("llama", "nf4");
}
