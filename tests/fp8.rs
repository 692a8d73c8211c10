//! FP8 checkpoints: every 8-bit code decodes as torch decodes it, weights come out as code · scale for
//! every layout of scales (blocks cut short at the edges, per tensor, per row, per group, E8M0 powers
//! of two), a broken FP8 folder gets an error naming the tensor, and merging writes plain weights.
//! Parity of whole models with transformers' FP8 readers is in tests/hf_parity.rs.

mod common;

use common::{nibble, rel};
use nibble::cpu;
use nibble::lora::LoraAdapter;
use nibble::model::{LinearWeight, ModelSource, QuantRequest};
use nibble::rng::Rng;
use nibble::source::{Float8, ModelFiles, SafetensorsFile};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Each byte's value in `format` as torch reads it (scripts/make_fp8_fixtures.py: float32 bits).
fn torch_values(format: &str) -> Vec<f32> {
    let text = std::fs::read_to_string(fixtures().join("fp8_values.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[format]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| f32::from_bits(b.as_i64().unwrap() as u32))
        .collect()
}

#[test]
fn every_code_decodes_as_torch_reads_it() {
    for (format, torch) in [
        (Float8::E4M3, "float8_e4m3fn"),
        (Float8::E5M2, "float8_e5m2"),
        (Float8::E8M0, "float8_e8m0fnu"),
    ] {
        let expected = torch_values(torch);
        let ours = format.table();
        let mut nans = 0;
        for (byte, (&e, &o)) in expected.iter().zip(&ours).enumerate() {
            if e.is_nan() {
                assert!(
                    o.is_nan(),
                    "{format:?} {byte:#04x}: {o} where torch has NaN"
                );
                nans += 1;
            } else {
                assert_eq!(
                    o.to_bits(),
                    e.to_bits(),
                    "{format:?} {byte:#04x}: {o} vs {e}"
                );
            }
        }
        // E4M3fn: S.1111.111; E5M2: six NaN payloads per sign; E8M0: 0xFF.
        let want = match format {
            Float8::E4M3 => 2,
            Float8::E5M2 => 6,
            Float8::E8M0 => 1,
        };
        assert_eq!(nans, want, "{format:?}");
    }
}

/// The tensors of a safetensors file, as (dtype, shape, bytes).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> Tensors {
    let file = SafetensorsFile::open(path).unwrap();
    file.tensor_names()
        .map(|n| {
            let info = file.info(n).unwrap();
            let raw = file.raw(n).unwrap().to_vec();
            (n.clone(), (info.dtype, info.shape.clone(), raw))
        })
        .collect()
}

fn write_tensors(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The finite E4M3 code nearest to `x` (by search over torch's table: a quantizer of the test's own).
fn nearest_code(x: f32, table: &[f32]) -> u8 {
    (0..=255u8)
        .filter(|&c| table[c as usize].is_finite())
        .min_by(|&a, &b| {
            let da = (table[a as usize] - x).abs();
            let db = (table[b as usize] - x).abs();
            da.total_cmp(&db)
        })
        .unwrap()
}

/// How a test lays out the scales of one [rows, cols] weight: the scale grid's shape and the block of
/// the weight each scale covers.
struct Layout {
    grid: Vec<usize>,
    block: [usize; 2],
}

/// The f32 fixture Qwen3 (tests/fixtures/hf/qwen3) copied to a new folder with its decoder's linear
/// weights in E4M3 codes and random scales laid out by `layout`, stored as `scale_dtype` under
/// `scale_suffix`, and `quantization_config` in config.json. Returns the folder and, per weight, the
/// value each element must load as, computed here in f64 from torch's table.
fn fp8_folder(
    quantization_config: serde_json::Value,
    layout: impl Fn(usize, usize) -> Layout,
    scale_dtype: Dtype,
    scale_suffix: &str,
) -> (tempfile::TempDir, BTreeMap<String, Vec<f32>>) {
    let source = fixtures().join("hf/qwen3");
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["quantization_config"] = quantization_config;
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();

    let table = torch_values("float8_e4m3fn");
    let powers = torch_values("float8_e8m0fnu");
    let mut rng = Rng::new(7);
    let mut tensors = read_tensors(&source.join("model.safetensors"));
    let mut expected = BTreeMap::new();
    let linears: Vec<String> = tensors
        .keys()
        .filter(|n| n.ends_with("_proj.weight"))
        .cloned()
        .collect();
    for name in linears {
        let (_, shape, raw) = tensors[&name].clone();
        let (rows, cols) = (shape[0], shape[1]);
        let w = f32s(&raw);
        let Layout { grid, block } = layout(rows, cols);
        let count: usize = grid.iter().product();
        // Random powers of two (E8M0 holds nothing else) or random positive scales.
        let exponents: Vec<u8> = (0..count).map(|_| 117 + rng.below(4) as u8).collect();
        let scales: Vec<f32> = match scale_dtype {
            Dtype::F8_E8M0 | Dtype::U8 => exponents.iter().map(|&e| powers[e as usize]).collect(),
            _ => (0..count)
                .map(|_| (0.001 + 0.002 * rng.uniform()) as f32)
                .collect(),
        };
        let grid_cols = if grid.len() == 2 { grid[1] } else { 1 };
        let scale_at = |r: usize, c: usize| scales[(r / block[0]) * grid_cols + c / block[1]];
        let mut codes = vec![0u8; rows * cols];
        let mut values = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let s = scale_at(r, c);
                let code = nearest_code(w[r * cols + c] / s, &table);
                codes[r * cols + c] = code;
                values[r * cols + c] = (f64::from(table[code as usize]) * f64::from(s)) as f32;
            }
        }
        let stored_scales = match scale_dtype {
            Dtype::F8_E8M0 | Dtype::U8 => exponents,
            Dtype::F32 => bytes_of(&scales),
            other => panic!("scales in {other:?}"),
        };
        let module = name.strip_suffix("weight").unwrap();
        tensors.insert(
            format!("{module}{scale_suffix}"),
            (scale_dtype, grid, stored_scales),
        );
        tensors.insert(name.clone(), (Dtype::F8_E4M3, shape, codes));
        expected.insert(name, values);
    }
    write_tensors(&dir.path().join("model.safetensors"), &tensors);
    (dir, expected)
}

/// Loads `dir` with its linears dense and checks each against `expected`, to the bit.
fn assert_loads_as(dir: &Path, expected: &BTreeMap<String, Vec<f32>>) {
    let source = ModelSource::open(dir).unwrap();
    let model = source.load(Some(QuantRequest::Dense)).unwrap();
    let config = &model.config;
    let mut checked = 0;
    for (l, layer) in model.layers.iter().enumerate() {
        for linear in &layer.linears {
            let name = format!("{}.weight", config.linear_path(linear.kind, l));
            let LinearWeight::Dense(d) = &linear.weight else {
                panic!("{name} should load dense")
            };
            let want = &expected[&name];
            for r in 0..d.rows {
                for c in 0..d.cols {
                    let (got, want) = (d.value(r, c), want[r * d.cols + c]);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{name}[{r}, {c}]: {got} vs {want}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, expected.len());
}

#[test]
fn blocks_cut_short_at_the_edges_scale_their_own_elements() {
    // 48 divides none of the fixture's 64- and 128-wide dimensions: the last block of every row and
    // column of blocks is cut short (16 or 32 wide).
    let (dir, expected) = fp8_folder(
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [48, 48]}),
        |rows, cols| Layout {
            grid: vec![rows.div_ceil(48), cols.div_ceil(48)],
            block: [48, 48],
        },
        Dtype::F32,
        "weight_scale_inv",
    );
    assert_loads_as(dir.path(), &expected);
}

#[test]
fn powers_of_two_in_e8m0_scale_as_transformers_ue8m0() {
    let (dir, expected) = fp8_folder(
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"}),
        |rows, cols| Layout {
            grid: vec![rows / 32, cols / 32],
            block: [32, 32],
        },
        Dtype::F8_E8M0,
        "weight_scale_inv",
    );
    assert_loads_as(dir.path(), &expected);
}

#[test]
fn compressed_tensors_groups_along_the_row() {
    let (dir, expected) = fp8_folder(
        serde_json::json!({"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "strategy": "group", "group_size": 32}}}}),
        |rows, cols| Layout {
            grid: vec![rows, cols / 32],
            block: [1, 32],
        },
        Dtype::F32,
        "weight_scale",
    );
    // float32 scales: compressed-tensors' product stays float32.
    assert_loads_as(dir.path(), &expected);

    // The same weights quantize to NF4 from those values: the packed model matches one quantized from
    // the dequantized weights written out as float32.
    let nf4 = QuantRequest::Quantize(
        nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 32).unwrap(),
    );
    let packed = ModelSource::open(dir.path())
        .unwrap()
        .load(Some(nf4))
        .unwrap();
    let plain = tempfile::tempdir().unwrap();
    let mut tensors = read_tensors(&dir.path().join("model.safetensors"));
    tensors.retain(|n, _| !n.ends_with("weight_scale"));
    for (name, values) in &expected {
        let shape = tensors[name].1.clone();
        tensors.insert(name.clone(), (Dtype::F32, shape, bytes_of(values)));
    }
    write_tensors(&plain.path().join("model.safetensors"), &tensors);
    std::fs::copy(
        fixtures().join("hf/qwen3/config.json"),
        plain.path().join("config.json"),
    )
    .unwrap();
    let reference = ModelSource::open(plain.path())
        .unwrap()
        .load(Some(nf4))
        .unwrap();
    for (a, b) in packed.layers.iter().zip(reference.layers.iter()) {
        for (x, y) in a.linears.iter().zip(&b.linears) {
            assert!(x.weight == y.weight, "{:?} packs differently", x.kind);
        }
    }
}

#[test]
fn scales_per_row_and_grids_the_config_does_not_name() {
    // Weight-only FP8 from llm-compressor (naive-quantized), a 1-D scale per row.
    let (dir, expected) = fp8_folder(
        serde_json::json!({"quant_method": "compressed-tensors", "format": "naive-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true}}}}),
        |rows, cols| Layout {
            grid: vec![rows],
            block: [1, cols],
        },
        Dtype::F32,
        "weight_scale",
    );
    assert_loads_as(dir.path(), &expected);
    // No weight_block_size: the 16 x 32 blocks follow from the scales' grid; exponents stored as U8.
    let (dir, expected) = fp8_folder(
        serde_json::json!({"quant_method": "fp8", "scale_fmt": "ue8m0"}),
        |rows, cols| Layout {
            grid: vec![rows / 16, cols / 32],
            block: [16, 32],
        },
        Dtype::U8,
        "weight_scale_inv",
    );
    assert_loads_as(dir.path(), &expected);
}

#[test]
fn scales_in_another_shard_are_found_through_the_index() {
    let (dir, expected) = per_tensor_folder();
    let single = dir.path().join("model.safetensors");
    let tensors = read_tensors(&single);
    std::fs::remove_file(&single).unwrap();
    let (scales, weights): (Tensors, Tensors) = tensors
        .into_iter()
        .partition(|(n, _)| n.ends_with("weight_scale_inv"));
    assert!(!scales.is_empty());
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", &weights),
        ("model-00002-of-00002.safetensors", &scales),
    ] {
        write_tensors(&dir.path().join(shard), part);
        for name in part.keys() {
            map.insert(name.clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_loads_as(dir.path(), &expected);
}

fn open_err(dir: &Path) -> String {
    match ModelSource::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn per_tensor_folder() -> (tempfile::TempDir, BTreeMap<String, Vec<f32>>) {
    fp8_folder(
        serde_json::json!({"quant_method": "fp8", "weight_block_size": null}),
        |rows, cols| Layout {
            grid: vec![],
            block: [rows, cols],
        },
        Dtype::F32,
        "weight_scale_inv",
    )
}

#[test]
fn a_broken_fp8_folder_names_the_tensor() {
    let (dir, expected) = per_tensor_folder();
    assert_loads_as(dir.path(), &expected);
    let weights = dir.path().join("model.safetensors");
    let config = dir.path().join("config.json");
    let original = read_tensors(&weights);
    let original_config = std::fs::read_to_string(&config).unwrap();
    let restore = || {
        write_tensors(&weights, &original);
        std::fs::write(&config, &original_config).unwrap();
    };
    let edit = |f: &dyn Fn(&mut Tensors)| {
        let mut t = original.clone();
        f(&mut t);
        write_tensors(&weights, &t);
    };
    let q = "model.layers.1.self_attn.q_proj";

    edit(&|t| {
        t.remove(&format!("{q}.weight_scale_inv"));
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(&format!("{q}.weight"))
            && e.contains(&format!("{q}.weight_scale_inv"))
            && e.contains(&format!("{q}.weight_scale`"))
            && e.contains("model.safetensors"),
        "{e}"
    );

    edit(&|t| {
        let scale = t.get_mut(&format!("{q}.weight_scale_inv")).unwrap();
        *scale = (Dtype::F32, vec![3, 1], bytes_of(&[0.01, 0.01, 0.01]));
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(&format!("{q}.weight_scale_inv"))
            && e.contains("[3, 1]")
            && e.contains("does not scale the weight"),
        "{e}"
    );

    edit(&|t| {
        let scale = t.get_mut(&format!("{q}.weight_scale_inv")).unwrap();
        scale.0 = Dtype::I32;
    });
    let e = open_err(dir.path());
    assert!(e.contains("I32") && e.contains("scales"), "{e}");

    // A NaN code (E4M3's 0x7F) in a weight: refused when loading, not turned into a NaN loss.
    restore();
    edit(&|t| {
        t.get_mut(&format!("{q}.weight")).unwrap().2[5] = 0x7F;
    });
    let source = ModelSource::open(dir.path()).unwrap();
    let e = source
        .load(Some(QuantRequest::Dense))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&format!("{q}.weight")) && e.contains("element 5 is NaN"),
        "{e}"
    );

    // 8-bit weights in a folder whose config says nothing of them.
    restore();
    let mut plain: serde_json::Value = serde_json::from_str(&original_config).unwrap();
    plain.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&config, plain.to_string()).unwrap();
    let e = open_err(dir.path());
    assert!(
        e.contains("stored in 8-bit floats") && e.contains("quantization_config"),
        "{e}"
    );

    // A norm in 8 bits is not a weight FP8 checkpoints quantize.
    restore();
    edit(&|t| {
        let norm = t.get_mut("model.norm.weight").unwrap();
        *norm = (Dtype::F8_E4M3, norm.1.clone(), vec![0x38; norm.1[0]]);
    });
    let e = open_err(dir.path());
    assert!(
        e.contains("model.norm.weight") && e.contains("F8_E4M3"),
        "{e}"
    );
}

/// A stack of experts stored whole ([experts, rows, cols], as transformers 5 holds them) in 8-bit
/// floats, with a scale per expert beside it: refused by the tensor's name, saying what nibble reads
/// instead, before anything loads.
#[test]
fn a_stack_of_experts_in_fp8_is_refused_by_name() {
    let source = fixtures().join("hf/gemma4_moe");
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    config["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors = read_tensors(&source.join("model.safetensors"));
    let stack = "model.layers.1.experts.gate_up_proj";
    let (_, shape, _) = tensors[stack].clone();
    let count: usize = shape.iter().product();
    let mut rng = Rng::new(5);
    let codes: Vec<u8> = (0..count).map(|_| rng.below(0x70) as u8).collect();
    tensors.insert(stack.to_string(), (Dtype::F8_E4M3, shape.clone(), codes));
    let scales = vec![0.01f32; shape[0]];
    tensors.insert(
        format!("{stack}_scale_inv"),
        (Dtype::F32, vec![shape[0], 1, 1], bytes_of(&scales)),
    );
    write_tensors(&dir.path().join("model.safetensors"), &tensors);
    let e = open_err(dir.path());
    assert!(
        e.contains(stack)
            && e.contains("F8_E4M3")
            && e.contains("a stack of experts in 8-bit floats")
            && e.contains("one tensor per expert"),
        "{e}"
    );
}

#[test]
fn merging_into_an_fp8_checkpoint_writes_plain_weights() {
    let (dir, _) = per_tensor_folder();
    // The fixture's PEFT adapter fits this folder's shapes (the same Qwen3).
    let adapter_dir = fixtures().join("hf/qwen3/adapter");
    let merged = tempfile::tempdir().unwrap();
    let out = merged.path().join("merged");
    let o = nibble(&[
        "merge",
        "--model",
        dir.path().to_str().unwrap(),
        "--adapter",
        adapter_dir.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"), "{config}");
    let tensors = read_tensors(&out.join("model.safetensors"));
    assert!(
        tensors
            .iter()
            .all(|(n, (d, _, _))| *d == Dtype::F32 && !n.contains("scale")),
        "{:?}",
        tensors.keys().collect::<Vec<_>>()
    );

    let source = ModelSource::open(dir.path()).unwrap();
    let model = source.load(Some(QuantRequest::Dense)).unwrap();
    let adapter = LoraAdapter::load_peft(&ModelFiles::Dir(adapter_dir), &model.config).unwrap();
    let ids: Vec<u32> = (0..10).map(|i| (i * 37 + 11) % 256).collect();
    let expected = cpu::logits(&model, Some(&adapter), &ids).unwrap();
    let merged_model = ModelSource::open(&out)
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    let e = rel(&cpu::logits(&merged_model, None, &ids).unwrap(), &expected);
    assert!(e < 1e-5, "merged logits differ by {e:e}");
    let without = cpu::logits(&model, None, &ids).unwrap();
    assert!(rel(&without, &expected) > 1e-3, "the adapter must matter");
}

/// A FLUX.2 transformer file in FP8 as NVIDIA ModelOpt and ComfyUI write them: E4M3 weights with one
/// scale per tensor (`weight_scale`, or ComfyUI's older `scale_weight`) or per row, input scales and
/// ComfyUI's `scaled_fp8` marker beside them (ignored). It loads as the same file with each weight
/// written out as code · scale in float32, dense and in NF4.
#[test]
fn an_fp8_flux2_file_loads_as_its_weights_times_their_scales() {
    use nibble::models::flux2;
    let source = fixtures().join("flux2/tiny_bfl.safetensors");
    let table = torch_values("float8_e4m3fn");
    let mut rng = Rng::new(11);
    let mut fp8 = read_tensors(&source);
    let mut reference = fp8.clone();
    let weights: Vec<String> = fp8
        .iter()
        .filter(|(n, (_, shape, _))| n.ends_with(".weight") && shape.len() == 2)
        .map(|(n, _)| n.clone())
        .collect();
    assert!(weights.len() > 10);
    for (k, name) in weights.iter().enumerate() {
        let (dtype, shape, raw) = fp8[name].clone();
        assert_eq!(dtype, Dtype::BF16);
        let w: Vec<f32> = raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        let (rows, cols) = (shape[0], shape[1]);
        let per_row = k % 2 == 1;
        let scales: Vec<f32> = (0..if per_row { rows } else { 1 })
            .map(|_| (0.0005 + 0.001 * rng.uniform()) as f32)
            .collect();
        let mut codes = vec![0u8; rows * cols];
        let mut values = vec![0f32; rows * cols];
        for r in 0..rows {
            let s = scales[if per_row { r } else { 0 }];
            for c in 0..cols {
                let code = nearest_code(w[r * cols + c] / s, &table);
                codes[r * cols + c] = code;
                values[r * cols + c] = (f64::from(table[code as usize]) * f64::from(s)) as f32;
            }
        }
        let stem = name.strip_suffix("weight").unwrap();
        let scale_name = match k % 3 {
            0 => format!("{stem}scale_weight"),
            _ => format!("{stem}weight_scale"),
        };
        let scale_shape = if per_row { vec![rows, 1] } else { vec![] };
        fp8.insert(name.clone(), (Dtype::F8_E4M3, shape.clone(), codes));
        fp8.insert(scale_name, (Dtype::F32, scale_shape, bytes_of(&scales)));
        fp8.insert(
            format!("{stem}input_scale"),
            (Dtype::F32, vec![], bytes_of(&[0.1])),
        );
        reference.insert(name.clone(), (Dtype::F32, shape, bytes_of(&values)));
    }
    fp8.insert("scaled_fp8".into(), (Dtype::F8_E4M3, vec![0], vec![]));
    let dir = tempfile::tempdir().unwrap();
    let (fp8_file, reference_file) = (
        dir.path().join("fp8.safetensors"),
        dir.path().join("ref.safetensors"),
    );
    write_tensors(&fp8_file, &fp8);
    write_tensors(&reference_file, &reference);
    let nf4 = Some(nibble::quant::QuantSpec::new(nibble::quant::QuantFormat::Nf4, 128).unwrap());
    for quant in [None, nf4] {
        let (a, b) = (
            flux2::load(&fp8_file, quant).unwrap(),
            flux2::load(&reference_file, quant).unwrap(),
        );
        assert!(a.weights.linears == b.weights.linears, "{quant:?}");
        assert!(a.weights.vectors == b.weights.vectors, "{quant:?}");
    }

    // A weight without its scale is named.
    let q = weights[2].clone();
    let stem = q.strip_suffix("weight").unwrap().to_string();
    fp8.retain(|n, _| !n.starts_with(&stem) || n == &q);
    write_tensors(&fp8_file, &fp8);
    let e = flux2::load(&fp8_file, None).err().unwrap().to_string();
    assert!(e.contains(&q) && e.contains("weight_scale"), "{e}");
}
