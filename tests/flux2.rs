//! FLUX.2 [klein]'s transformer, written once as a graph (`models::flux2`), against diffusers: a tiny
//! random klein (one double-stream and one single-stream block, 2 heads of 128, bf16 weights) saved in
//! the diffusers layout by scripts/make_flux2_fixture.py, with the velocity, the flow-matching loss and
//! the gradients of LoRA matrices on the fused block linears that diffusers computes in f32, with the
//! weights dense and NF4 (groups of 128). Measured: velocity 2.6e-6 relative, loss 3.3e-7, LoRA
//! gradients 1.0e-5 (diffusers's own f32 result differs from an f64 one by 1e-6); the tolerances are
//! about ten times those.

mod common;

use common::rel;
use nibble::exec::cpu::{self, Bindings};
use nibble::lora::{LoraAdapter, LoraConfig, LoraPair};
use nibble::models::decoder::LoraSpec;
use nibble::models::flux2::{self, Flux2Inputs, Flux2Step};
use nibble::ops::Precision;
use nibble::quant::{QuantFormat, QuantSpec};
use nibble::source::SafetensorsFile;
use std::path::Path;

const FIXTURE: &str = "tests/fixtures/flux2";

fn ids(values: Vec<f32>) -> Vec<[f32; 4]> {
    values
        .chunks(4)
        .map(|c| c.try_into().expect("rows of 4"))
        .collect()
}

#[test]
fn the_transformer_matches_diffusers_dense_and_nf4() {
    let expected =
        SafetensorsFile::open(&Path::new(FIXTURE).join("tiny_expected.safetensors")).unwrap();
    let read = |name: &str| expected.read_f32(name).unwrap();
    let targets: Vec<String> = expected
        .tensor_names()
        .filter_map(|n| n.strip_prefix("lora.")?.strip_suffix(".lora_A"))
        .map(str::to_string)
        .collect();
    assert_eq!(targets.len(), 10, "the fixture's LoRA targets");
    let (x0, noise, sigma) = (read("x0"), read("noise"), read("sigma")[0]);
    let noised: Vec<f32> = x0
        .iter()
        .zip(&noise)
        .map(|(x, n)| (1.0 - sigma) * x + sigma * n)
        .collect();
    let target: Vec<f32> = noise.iter().zip(&x0).map(|(n, x)| n - x).collect();
    let text = read("ctx");
    // The grid the pipeline builds (3 rows of 5), row-major, and the text positions.
    let (image_ids, text_ids) = (ids(read("img_ids")), ids(read("txt_ids")));
    assert_eq!(
        (image_ids.clone(), text_ids.clone()),
        flux2::position_ids(3, 5, 8)
    );

    for (quant, spec) in [
        ("dense", None),
        ("nf4", Some(QuantSpec::new(QuantFormat::Nf4, 128).unwrap())),
    ] {
        let model = flux2::load_diffusers(&Path::new(FIXTURE).join("tiny"), spec).unwrap();
        let c = &model.config;
        assert_eq!((c.double_blocks, c.single_blocks, c.hidden()), (1, 1, 256));
        let adapter = LoraAdapter {
            config: LoraConfig {
                r: 4,
                alpha: 8.0,
                dropout: 0.0,
                use_rslora: false,
                targets: targets.clone(),
            },
            modules: targets
                .iter()
                .map(|t| {
                    let (a, b) = (
                        read(&format!("lora.{t}.lora_A")),
                        read(&format!("lora.{t}.lora_B")),
                    );
                    let pair = LoraPair {
                        rank: 4,
                        in_features: a.len() / 4,
                        out_features: b.len() / 4,
                        a,
                        b,
                    };
                    (t.clone(), pair)
                })
                .collect(),
        };
        let mut grads = adapter.zeros_like();
        let spec = LoraSpec::of(&adapter);
        let step = Flux2Step {
            image_tokens: 15,
            text_tokens: 8,
            backward: true,
        };
        let graph = flux2::build(c, Some(&spec), step);
        graph.validate().unwrap();
        let inputs = flux2::inputs(
            c,
            &Flux2Inputs {
                noised: &noised,
                text: &text,
                sigma,
                image_ids: &image_ids,
                text_ids: &text_ids,
                target: &target,
                grad_scale: 1.0,
            },
        );
        let mut out = cpu::run(
            &graph,
            Bindings {
                model: &model,
                adapter: Some(&adapter),
                grads: Some(&mut grads),
                cache: None,
                optimizer: None,
                inputs: &inputs,
                precision: Precision::F32,
            },
        )
        .unwrap();
        let velocity = rel(&out.take("velocity"), &read(&format!("{quant}.velocity")));
        let loss = rel(&out.take("loss"), &read(&format!("{quant}.loss")));
        let mut worst = (0.0f64, String::new());
        for (path, pair) in grads.pairs() {
            for (which, got) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
                let e = rel(got, &read(&format!("{quant}.grad.{path}.{which}")));
                if e > worst.0 {
                    worst = (e, format!("{path}.{which}"));
                }
            }
        }
        eprintln!("{quant}: velocity {velocity:e}, loss {loss:e}, worst gradient {worst:?}");
        assert!(velocity < 3e-5, "{quant}: velocity off by {velocity:e}");
        assert!(loss < 3e-6, "{quant}: loss off by {loss:e}");
        assert!(
            worst.0 < 1e-4,
            "{quant}: gradient {} off by {:e}",
            worst.1,
            worst.0
        );
    }
}
