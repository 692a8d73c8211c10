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
        let run = |checkpoint: bool| {
            let mut grads = adapter.zeros_like();
            let step = Flux2Step {
                image_tokens: 15,
                text_tokens: 8,
                backward: true,
                checkpoint,
            };
            let graph = flux2::build(c, Some(&LoraSpec::of(&adapter)), step);
            graph.validate().unwrap();
            let bind = Bindings {
                model: &model,
                adapter: Some(&adapter),
                grads: Some(&mut grads),
                cache: None,
                optimizer: None,
                inputs: &inputs,
                precision: Precision::F32,
            };
            let out = cpu::run(&graph, bind).unwrap();
            (out, grads, graph.memory().total())
        };
        let (mut out, grads, memory) = run(false);
        // Recomputing each block before its backward gives the same gradients, bit for bit, in less
        // memory.
        let (_, recomputed, less) = run(true);
        assert_eq!(recomputed, grads, "{quant}: checkpointed gradients");
        assert!(
            less < memory,
            "{quant}: {less} bytes checkpointed, {memory} not"
        );
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

/// klein 9B's transformer config as diffusers ships it.
const KLEIN_9B: &str = r#"{"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
  "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": false, "in_channels": 128,
  "joint_attention_dim": 12288, "mlp_ratio": 3.0, "num_attention_heads": 32, "num_layers": 8,
  "num_single_layers": 24, "out_channels": null, "patch_size": 1, "rope_theta": 2000,
  "timestep_guidance_channels": 256}"#;

#[test]
fn klein_9b_plans_within_a_12_gb_card() {
    let c = flux2::Flux2Config::from_diffusers(KLEIN_9B, Path::new("config.json")).unwrap();
    assert_eq!(
        c.parameters(),
        9_078_581_248,
        "the published parameter count"
    );
    assert_eq!(c.block_linears().len(), 112);
    let nf4 = Some(QuantSpec::new(QuantFormat::Nf4, 128).unwrap());
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let plan = |resolution, checkpoint| {
        let p = flux2::plan(
            &c,
            nf4,
            32,
            Flux2Step::training(resolution, 512, checkpoint),
        );
        eprintln!(
            "{resolution} px, checkpointing {checkpoint}: weights {:.2}, LoRA {:.2} ({} parameters), \
             buffers {:.2}, temporaries {:.2}, total {:.2} GiB",
            gib(p.weights),
            gib(p.lora_and_optimizer),
            p.lora_parameters,
            gib(p.activations),
            gib(p.workspace),
            gib(p.total)
        );
        p
    };
    // The issue's targets: NF4 g128, r=32 on the 112 block linears, 512 caption tokens.
    let small = plan(512, true);
    assert_eq!(small.lora_parameters, 82_837_504);
    assert!(
        gib(small.total) <= 8.0,
        "512 px: {:.2} GiB",
        gib(small.total)
    );
    let large = plan(1024, true);
    assert!(
        gib(large.total) <= 10.0,
        "1024 px: {:.2} GiB",
        gib(large.total)
    );
    assert!(
        plan(512, false).total > small.total + (4u64 << 30),
        "checkpointing saves"
    );
}

#[test]
fn info_and_plan_describe_klein_from_its_config_alone() {
    let dir = tempfile::tempdir().unwrap();
    let transformer = dir.path().join("transformer");
    std::fs::create_dir(&transformer).unwrap();
    std::fs::write(transformer.join("config.json"), KLEIN_9B).unwrap();
    let folder = dir.path().to_str().unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let out = common::nibble(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let info = json(&["info", folder, "--group-size", "128", "--json"]);
    assert_eq!(info["variant"], "FLUX.2 [klein] 9B");
    assert_eq!(info["parameters"], 9_078_581_248u64);
    assert_eq!(info["lora_targets"], 112);
    let args = [
        "plan",
        folder,
        "--resolution",
        "512",
        "--lora-r",
        "32",
        "--group-size",
        "128",
    ];
    let plan = json(&[&args[..], &["--json"]].concat());
    let c = flux2::Flux2Config::from_diffusers(KLEIN_9B, Path::new("config.json")).unwrap();
    let nf4 = Some(QuantSpec::new(QuantFormat::Nf4, 128).unwrap());
    let want = flux2::plan(&c, nf4, 32, Flux2Step::training(512, 512, true));
    assert_eq!(plan["total"], want.total, "checkpointing by default");
    let parts = ["weights", "lora_and_optimizer", "activations", "workspace"];
    let sum: u64 = parts.iter().map(|k| plan[k].as_u64().unwrap()).sum();
    assert_eq!(sum, want.total);
    let out = common::nibble(&["plan", folder, "--resolution", "500"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resolution"));
}
