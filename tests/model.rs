//! Model folders in the real Hugging Face layouts: config spellings, shards, dtypes, quantized files,
//! and the errors a broken folder gets.

use nibble::config::{Arch, GateActivation, LinearKind, RopeScaling};
use nibble::model::{self, LinearWeight, ModelSource, QuantRequest};
use nibble::quant::{QuantFormat, QuantSpec, QuantTensor};
use nibble::source::{FloatDtype, SafetensorsFile};
use nibble::synth::{self, ConfigSpelling, SynthSpec};
use std::path::Path;

const VOCAB: usize = 512;

fn folder(spec: &SynthSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth::write_model_folder(dir.path(), spec, None).unwrap();
    dir
}

fn nf4(g: usize) -> QuantRequest {
    QuantRequest::Quantize(QuantSpec::new(QuantFormat::Nf4, g).unwrap())
}

/// Parameter count written out by hand from the architecture, independent of `expected_tensors`.
fn hand_count(s: &SynthSpec) -> u64 {
    let (h, i, v) = (
        s.hidden_size as u64,
        s.intermediate_size as u64,
        s.vocab_size as u64,
    );
    let hd = s.head_dim.unwrap_or(s.hidden_size / s.num_heads) as u64;
    let (q, kv) = (s.num_heads as u64 * hd, s.num_kv_heads as u64 * hd);
    let attn = h * q + 2 * h * kv + q * h;
    let bias = if s.arch == Arch::Qwen2 { q + 2 * kv } else { 0 };
    let qk_norm = match s.arch {
        Arch::Qwen3 | Arch::Gemma3 => 2 * hd,
        _ => 0,
    };
    // Gemma's sandwich adds two norms per layer.
    let norms = if s.arch == Arch::Gemma3 { 4 * h } else { 2 * h };
    let layer = attn + bias + 3 * h * i + norms + qk_norm;
    let head = if s.tie_word_embeddings { 0 } else { v * h };
    let layers = match s.arch {
        // tiny-gemma4, four layers, each with four norms of h, a scalar and per-layer input parts of
        // 64 (gate, projection, a norm of h). Layer 0 (sliding) as above with q/k norms; layer 1
        // (full) with heads of 32, one KV head, no v_proj, q/k norms of 32; layers 2 and 3 reuse
        // their keys and values (q, o, a q norm) with MLPs twice as wide.
        Arch::Gemma4 => {
            let per_layer = 1 + 4 * h + 2 * 64 * h + h;
            let sliding = attn + 3 * h * i + 2 * hd;
            let q1 = s.num_heads as u64 * 32;
            let full = h * q1 + h * 32 + q1 * h + 3 * h * i + 2 * 32;
            let reusing = |q: u64, norm: u64| 2 * h * q + 3 * h * 2 * i + norm;
            let model_parts = v * 4 * 64 + 4 * 64 * h + 64;
            sliding + full + reusing(q, hd) + reusing(q1, 32) + 4 * per_layer + model_parts
        }
        _ => s.num_layers as u64 * layer,
    };
    v * h + layers + h + head
}

#[test]
fn qwen25_05b_shapes_have_the_published_parameter_count() {
    assert_eq!(
        SynthSpec::qwen25_05b().config().parameter_count(),
        494_032_768
    );
}

#[test]
fn every_family_in_both_spellings_parses_and_loads() {
    for arch in Arch::ALL {
        for spelling in [ConfigSpelling::V4, ConfigSpelling::V5] {
            let mut spec = SynthSpec::tiny(arch, VOCAB);
            spec.spelling = spelling;
            let dir = folder(&spec);
            let src = ModelSource::open(dir.path()).unwrap();
            let c = &src.config;
            let what = format!("{arch:?} {spelling:?}");
            assert_eq!(c.arch, arch, "{what}");
            assert_eq!(c.parameter_count(), hand_count(&spec), "{what}");
            assert_eq!(c.qkv_bias, arch == Arch::Qwen2, "{what}");
            assert!(!c.o_bias && !c.mlp_bias, "{what}");
            assert_eq!(
                c.qk_norm,
                matches!(arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Gemma4),
                "{what}"
            );
            assert_eq!(
                c.head_dim,
                spec.head_dim.unwrap_or(spec.hidden_size / spec.num_heads),
                "{what}"
            );
            assert_eq!((c.num_heads, c.num_kv_heads), (4, 2), "{what}");
            assert_eq!(c.tie_word_embeddings, spec.tie_word_embeddings, "{what}");
            match arch {
                Arch::Llama => {
                    assert_eq!(c.rope_theta, 500000.0, "{what}");
                    assert_eq!(
                        c.rope_scaling,
                        RopeScaling::Llama3 {
                            factor: 8.0,
                            low_freq_factor: 1.0,
                            high_freq_factor: 4.0,
                            original_max_position_embeddings: 512.0
                        },
                        "{what}"
                    );
                }
                Arch::Phi3 => {
                    // 64 / 4 heads = 16 channels, 3/4 of them rotated: 6 frequencies.
                    assert_eq!(c.rotary_dim, 12, "{what}");
                    let RopeScaling::LongRope {
                        short_factor,
                        long_factor,
                        original_max_position_embeddings,
                        attention_factor,
                    } = &c.rope_scaling
                    else {
                        panic!("{what}: {:?}", c.rope_scaling)
                    };
                    assert_eq!(short_factor.len(), 6, "{what}");
                    assert_eq!(long_factor[1], 2.5, "{what}");
                    assert_eq!(*original_max_position_embeddings, 64.0, "{what}");
                    // sqrt(1 + ln(4096 / 64) / ln(64)).
                    assert!((attention_factor - 2f64.sqrt()).abs() < 1e-12, "{what}");
                }
                Arch::Gemma3 => {
                    // The full layers': linear x8 on 10^6; the sliding ones': 10^4, unscaled.
                    assert_eq!(c.rope_theta, 1000000.0, "{what}");
                    assert_eq!(
                        c.rope_scaling,
                        RopeScaling::Linear { factor: 8.0 },
                        "{what}"
                    );
                    assert_eq!(c.local_rope_theta, Some(10000.0), "{what}");
                    let local: Vec<bool> = c.layers.iter().map(|l| l.local_rope).collect();
                    assert_eq!(local, [true, false], "{what}");
                    assert_eq!(c.gate_activation, GateActivation::GeluTanh, "{what}");
                    assert_eq!((c.norm_offset, c.embed_scale), (1.0, 8.0), "{what}");
                    assert!(c.sandwich_norms, "{what}");
                    assert!(
                        (c.attention_scale - 24f64.powf(-0.5)).abs() < 1e-15,
                        "{what}"
                    );
                }
                Arch::Gemma4 => {
                    assert_eq!(c.rope_theta, 1000000.0, "{what}");
                    assert_eq!(
                        c.rope_scaling,
                        RopeScaling::Proportional {
                            factor: 1.0,
                            partial_rotary_factor: 0.5
                        },
                        "{what}"
                    );
                    assert_eq!(c.local_rope_theta, Some(10000.0), "{what}");
                    let layers: Vec<(bool, usize, usize, bool, Option<usize>)> = c
                        .layers
                        .iter()
                        .map(|l| {
                            let (heads, keys) = (l.head_dim, l.kv_heads);
                            (l.local_rope, heads, keys, l.values_from_keys, l.kv_from)
                        })
                        .collect();
                    let (sliding, full) = ((true, 16, 2, false), (false, 32, 1, true));
                    let with = |(a, b, c, d): (bool, usize, usize, bool), from| (a, b, c, d, from);
                    assert_eq!(
                        layers,
                        [
                            with(sliding, None),
                            with(full, None),
                            with(sliding, Some(0)),
                            with(full, Some(1))
                        ],
                        "{what}"
                    );
                    let per_layer = c
                        .per_layer_inputs
                        .map(|p| (p.width, p.vocab, p.token_scale));
                    assert_eq!(per_layer, Some((64, VOCAB, 8.0)), "{what}");
                    assert!(c.double_wide_shared_mlp, "{what}");
                    // The full layers' tables rotate whole 32-wide heads (half their frequencies zero).
                    assert_eq!(c.rotary_dim, 32, "{what}");
                    assert_eq!((c.norm_offset, c.embed_scale), (0.0, 8.0), "{what}");
                    assert!(
                        c.value_norm && c.layer_scalars && c.sandwich_norms,
                        "{what}"
                    );
                    assert_eq!(c.attention_scale, 1.0, "{what}");
                    assert_eq!(c.final_logit_softcapping, Some(30.0), "{what}");
                }
                Arch::Ministral3 => {
                    assert_eq!(c.rope_theta, 1000000.0, "{what}");
                    let RopeScaling::Yarn {
                        factor,
                        original_max_position_embeddings,
                        attention_factor,
                        ..
                    } = c.rope_scaling
                    else {
                        panic!("{what}: {:?}", c.rope_scaling)
                    };
                    assert_eq!(
                        (factor, original_max_position_embeddings, attention_factor),
                        (16.0, 8.0, 1.0),
                        "{what}"
                    );
                    let q = c.query_position_scale.expect("ministral3 scales queries");
                    // 1 + 0.1·ln(1 + ⌊position / 8⌋): 1 below 8, 1 + 0.1·ln 2 from 8 to 15.
                    let factors: Vec<f32> = [0, 7, 8, 15, 16].map(|p| q.factor(p)).to_vec();
                    let ln = |x: f32| x.ln();
                    assert_eq!(
                        factors,
                        [
                            1.0,
                            1.0,
                            1.0 + 0.1 * ln(2.0),
                            1.0 + 0.1 * ln(2.0),
                            1.0 + 0.1 * ln(3.0)
                        ],
                        "{what}"
                    );
                }
                _ => {
                    assert_eq!(c.rope_theta, 1000000.0, "{what}");
                    assert_eq!(c.rope_scaling, RopeScaling::None, "{what}");
                }
            }
            assert_eq!(c.dtype.as_deref(), Some("bfloat16"), "{what}");
            let windows: Vec<Option<usize>> = c.layers.iter().map(|l| l.window).collect();
            let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
            let (want_windows, want_rope) = match arch {
                Arch::Mistral => ([Some(8), Some(8)], [true, true]),
                Arch::Ministral | Arch::Gemma3 | Arch::Gemma4 => ([Some(8), None], [true, true]),
                Arch::SmolLM3 => ([None, None], [true, false]),
                Arch::Qwen2 | Arch::Qwen3 | Arch::Llama | Arch::Phi3 | Arch::Ministral3 => {
                    ([None, None], [true, true])
                }
            };
            // tiny-gemma4's four layers repeat the pattern.
            assert_eq!(
                windows.chunks(2).collect::<Vec<_>>(),
                vec![want_windows; spec.num_layers / 2],
                "{what}"
            );
            assert_eq!(
                rope.chunks(2).collect::<Vec<_>>(),
                vec![want_rope; spec.num_layers / 2],
                "{what}"
            );

            let m = src.load(Some(nf4(32))).unwrap();
            assert_eq!(m.layers.len(), spec.num_layers);
            assert_eq!(m.lm_head.is_some(), !spec.tie_word_embeddings, "{what}");
            assert_eq!(
                m.norm("model.layers.0.self_attn.q_norm.weight").is_some(),
                matches!(arch, Arch::Qwen3 | Arch::Gemma3 | Arch::Gemma4),
                "{what}"
            );
            let kinds: Vec<LinearKind> = m.layers[1].linears.iter().map(|l| l.kind).collect();
            match arch {
                Arch::Phi3 => assert_eq!(kinds, LinearKind::FUSED, "{what}"),
                // Gemma 4's full layer takes its values from k_proj; its per-layer input adds two.
                Arch::Gemma4 => {
                    let mut without_v = LinearKind::SEPARATE.to_vec();
                    without_v.retain(|&k| k != LinearKind::V);
                    without_v.extend([LinearKind::PerLayerGate, LinearKind::PerLayerProjection]);
                    assert_eq!(kinds, without_v, "{what}");
                    assert_eq!(
                        m.norm("model.layers.1.layer_scalar").map(<[f32]>::len),
                        Some(1)
                    );
                }
                _ => assert_eq!(kinds, LinearKind::SEPARATE, "{what}"),
            }
            assert_eq!(
                m.layers[1].linears[0].bias.is_some(),
                arch == Arch::Qwen2,
                "{what}"
            );
        }
    }
}

#[test]
fn loaded_weights_equal_the_file_and_quantize_as_the_quantizer_does() {
    let spec = SynthSpec::tiny(Arch::Qwen2, VOCAB);
    let dir = folder(&spec);
    let file = SafetensorsFile::open(&dir.path().join("model.safetensors")).unwrap();
    let src = ModelSource::open(dir.path()).unwrap();
    let dense = src.load(Some(QuantRequest::Dense)).unwrap();
    assert_eq!(dense.embed.dtype(), FloatDtype::BF16);
    assert_eq!(
        dense.embed.to_f32(),
        file.read_f32("model.embed_tokens.weight").unwrap()
    );
    assert_eq!(
        dense.norm("model.norm.weight").unwrap(),
        file.read_f32("model.norm.weight").unwrap()
    );
    let name = "model.layers.1.self_attn.q_proj";
    let w = file.read_f32(&format!("{name}.weight")).unwrap();
    assert_eq!(dense.layers[1].linear(LinearKind::Q).weight.to_f32(), w);
    assert_eq!(
        dense.layers[1]
            .linear(LinearKind::Q)
            .bias
            .as_deref()
            .unwrap(),
        &file.read_f32(&format!("{name}.bias")).unwrap()[..]
    );

    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        let qspec = QuantSpec::new(format, 64).unwrap();
        let m = src.load(Some(QuantRequest::Quantize(qspec))).unwrap();
        let LinearWeight::Quant(q) = &m.layers[1].linear(LinearKind::Q).weight else {
            panic!("not quantized")
        };
        let direct = QuantTensor::quantize(qspec, q.rows, q.cols, &w).unwrap();
        assert_eq!(q, &direct, "{format}");
        assert!(m.weight_bytes() < dense.weight_bytes());
        // The figure `nibble info` plans before loading is what loading then takes.
        assert_eq!(
            model::planned_weight_bytes(&m.config, Some(qspec)),
            m.weight_bytes(),
            "{format}"
        );
    }
}

#[test]
fn shards_dtypes_and_single_file_load_identically() {
    let mut spec = SynthSpec::tiny(Arch::Llama, VOCAB);
    spec.dtype = FloatDtype::F32;
    let single = folder(&spec);
    spec.shards = 3;
    let sharded = folder(&spec);
    assert!(
        sharded
            .path()
            .join("model.safetensors.index.json")
            .is_file()
    );
    assert!(
        sharded
            .path()
            .join("model-00003-of-00003.safetensors")
            .is_file()
    );
    let a = ModelSource::open(single.path())
        .unwrap()
        .load(Some(nf4(64)))
        .unwrap();
    let b = ModelSource::open(sharded.path())
        .unwrap()
        .load(Some(nf4(64)))
        .unwrap();
    assert_eq!(a.layers, b.layers);
    assert_eq!(a.embed, b.embed);
    assert_eq!(a.lm_head, b.lm_head);

    spec.shards = 1;
    spec.dtype = FloatDtype::F16;
    let f16 = folder(&spec);
    let c = ModelSource::open(f16.path())
        .unwrap()
        .load(Some(QuantRequest::Dense))
        .unwrap();
    assert_eq!(c.embed.dtype(), FloatDtype::F16);
    // Same random stream, so f16 weights are the f32 ones rounded to f16.
    let rounded: Vec<f32> = a
        .embed
        .to_f32()
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(c.embed.to_f32(), rounded);
}

#[test]
fn quantized_file_round_trips_with_config_and_tokenizer() {
    for (arch, format) in [
        (Arch::Qwen3, QuantFormat::Int4),
        (Arch::Qwen2, QuantFormat::Nf4),
    ] {
        let spec = SynthSpec::tiny(arch, VOCAB);
        let dir = tempfile::tempdir().unwrap();
        synth::write_model_folder(dir.path(), &spec, Some(&synth::qwen25_tokenizer())).unwrap();
        let src = ModelSource::open(dir.path()).unwrap();
        let qspec = QuantSpec::new(format, 32).unwrap();
        let m = src.load(Some(QuantRequest::Quantize(qspec))).unwrap();
        let out = dir.path().join("q.safetensors");
        m.save_quantized(&out, (&src.tokenizer, None)).unwrap();

        let reopened = model::open(&out).unwrap();
        assert_eq!(reopened.stored_quant(), Some(qspec));
        assert_eq!(reopened.config, src.config);
        assert_eq!(reopened.tokenizer, src.tokenizer);
        let back = reopened.load(None).unwrap();
        assert_eq!(back.layers, m.layers);
        assert_eq!(back.embed, m.embed);
        assert_eq!(back.norms, m.norms);
        assert_eq!(back.quant, Some(qspec));
        // Asking for another format than the one stored is an error, not a silent re-quantization.
        let err = reopened.load(Some(nf4(128))).unwrap_err().to_string();
        assert!(err.contains("already quantized"), "{err}");
        // And so are the plans of `info` and `plan` (which described the other format).
        let err = QuantRequest::planned(Some(nf4(128)), Some(qspec)).unwrap_err();
        assert!(err.to_string().contains("already quantized"), "{err}");
        assert!(QuantRequest::planned(Some(QuantRequest::Dense), Some(qspec)).is_err());
        let same = QuantRequest::planned(Some(QuantRequest::Quantize(qspec)), Some(qspec));
        assert_eq!(same.unwrap(), Some(qspec));
        assert_eq!(
            QuantRequest::planned(None, Some(qspec)).unwrap(),
            Some(qspec)
        );
        // No temporary file is left beside the output.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !names.iter().any(|n| n.to_string_lossy().contains(".tmp")),
            "{names:?}"
        );
    }
}

fn open_err(dir: &Path) -> String {
    match ModelSource::open(dir) {
        Ok(_) => panic!("{} opened although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_names_the_file() {
    let dir = folder(&SynthSpec::tiny(Arch::Qwen2, VOCAB));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = folder(&SynthSpec::tiny(Arch::Qwen2, VOCAB));
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"qwen2\"", "\"gpt_neox\"");
    std::fs::write(&p, text).unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("unsupported architecture `gpt_neox"), "{err}");
    // Every family nibble reads is listed, the multimodal wrappers too.
    for name in
        Arch::ALL
            .map(Arch::model_type)
            .into_iter()
            .chain(["gemma3 (", "mistral3 (", "gemma4 ("])
    {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
}

/// A path that is not there says so once (not "not found: not found"), and a hub id gets the hint to
/// download it first (issue 19).
#[test]
fn a_missing_model_path_says_so_once_and_a_hub_id_gets_a_hint() {
    let missing = tempfile::tempdir().unwrap().path().join("nothing");
    let err = open_err(&missing);
    assert!(err.ends_with("nothing: no such folder or file"), "{err}");
    let err = open_err(Path::new("Qwen/Qwen2.5-0.5B-Instruct"));
    assert!(
        err.contains("looks like a Hugging Face hub id")
            && err.contains("huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir Qwen2.5-0.5B-Instruct"),
        "{err}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors_name_the_file() {
    let dir = folder(&SynthSpec::tiny(Arch::Qwen2, VOCAB));
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // A header length pointing past the end of the file.
    let mut corrupt = bytes.clone();
    corrupt[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&p, &corrupt).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("header"),
        "{err}"
    );

    // A header that is not JSON.
    let mut garbage = bytes.clone();
    garbage[8..40].fill(b'#');
    std::fs::write(&p, &garbage).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("header"),
        "{err}"
    );

    std::fs::write(&p, b"abc").unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");

    // A tensor whose dtype's width does not fit its offsets, and one that starts inside another:
    // the error names the tensor.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = &bytes[8 + header_len..];
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let with_header = |header: &serde_json::Value| {
        let text = header.to_string();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text.as_bytes());
        out.extend(data);
        out
    };
    let mut wide = header.clone();
    let dtype = wide[name]["dtype"].as_str().unwrap();
    wide[name]["dtype"] = if dtype == "F64" { "F32" } else { "F64" }.into();
    std::fs::write(&p, with_header(&wide)).unwrap();
    let err = open_err(dir.path());
    let shape = header[name]["shape"].to_string();
    assert!(
        err.contains(name) && err.contains("do not hold") && err.contains(&shape),
        "{err}"
    );
    let mut overlapping = header.clone();
    let offsets = overlapping[name]["data_offsets"].clone();
    let (start, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
    // Two bytes earlier and two bytes shorter at its end: its size holds, its start does not.
    overlapping[name]["data_offsets"] = serde_json::json!([start - 2, end - 2]);
    std::fs::write(&p, with_header(&overlapping)).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains(name) && err.contains("starts at byte"),
        "{err}"
    );
}

#[test]
fn shape_disagreeing_with_config_names_the_tensor() {
    let dir = folder(&SynthSpec::tiny(Arch::Llama, VOCAB));
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"intermediate_size\": 128", "\"intermediate_size\": 192");
    std::fs::write(&p, text).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[192, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let spec = SynthSpec::tiny(Arch::Qwen3, VOCAB);
    let dir = folder(&spec);
    // Rewrite the file without one tensor.
    let config = spec.config();
    let entries: Vec<(String, Vec<usize>)> = config
        .expected_tensors()
        .into_iter()
        .filter(|t| t.name != "model.layers.1.self_attn.k_norm.weight")
        .map(|t| (t.name, t.shape))
        .collect();
    synth::write_safetensors_streaming(
        &dir.path().join("model.safetensors"),
        FloatDtype::BF16,
        &entries,
        |_, v| v.fill(0.5),
    )
    .unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.layers.1.self_attn.k_norm.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn unreadable_dtype_is_named() {
    let spec = SynthSpec::tiny(Arch::Qwen2, VOCAB);
    let dir = folder(&spec);
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
    // Relabel the final norm (a bf16 [64] tensor, 128 bytes) as I16, which has the same size.
    let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
    v["model.norm.weight"]["dtype"] = "I16".into();
    let mut new_header = serde_json::to_vec(&v).unwrap();
    while new_header.len() < header_len {
        new_header.push(b' ');
    }
    assert_eq!(
        new_header.len(),
        header_len,
        "relabelled header must keep its length"
    );
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&p, out).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.norm.weight")
            && err.contains("I16")
            && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn group_size_that_does_not_divide_names_the_tensor() {
    let mut spec = SynthSpec::tiny(Arch::Qwen2, VOCAB);
    spec.hidden_size = 96;
    spec.num_heads = 4;
    spec.num_kv_heads = 2;
    let dir = folder(&spec);
    let src = ModelSource::open(dir.path()).unwrap();
    let err = src.load(Some(nf4(64))).unwrap_err().to_string();
    assert!(
        err.contains("group size 64 does not divide the input dimension 96")
            && err.contains("q_proj.weight")
            && err.contains("group sizes that work for this model: 32)"),
        "{err}"
    );
    assert!(src.load(Some(nf4(32))).is_ok());
    // SmolLM2-135M's widths: hidden 576 (9 heads of 64, 3 kv heads), intermediate 1536.
    let mut spec = SynthSpec::tiny(Arch::Llama, VOCAB);
    (spec.hidden_size, spec.intermediate_size) = (576, 1536);
    (spec.num_heads, spec.num_kv_heads) = (9, 3);
    let dir = folder(&spec);
    let src = ModelSource::open(dir.path()).unwrap();
    let err = src.load(Some(nf4(128))).unwrap_err().to_string();
    assert!(
        err.contains("group size 128 does not divide the input dimension 576")
            && err.contains("group sizes that work for this model: 32, 64)"),
        "{err}"
    );
    assert!(src.load(Some(nf4(64))).is_ok());
}

#[test]
fn index_that_disagrees_with_shards_is_an_error() {
    let mut spec = SynthSpec::tiny(Arch::Qwen2, VOCAB);
    spec.shards = 2;
    let dir = folder(&spec);
    let p = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors".into();
    std::fs::write(&p, index.to_string()).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("model-00002-of-00002"),
        "{err}"
    );
}

#[test]
fn bad_config_values_are_named() {
    let dir = folder(&SynthSpec::tiny(Arch::Qwen2, VOCAB));
    let p = dir.path().join("config.json");
    let original = std::fs::read_to_string(&p).unwrap();
    for (from, to, expect) in [
        (
            "\"num_key_value_heads\": 2",
            "\"num_key_value_heads\": 3",
            "num_key_value_heads",
        ),
        (
            "\"hidden_size\": 64",
            "\"hidden_size\": \"64\"",
            "`hidden_size` must be a non-negative integer",
        ),
        (
            "\"hidden_size\": 64",
            "\"hidden_size\": 0",
            "`hidden_size` must be positive",
        ),
        (
            "\"hidden_act\": \"silu\"",
            "\"hidden_act\": \"gelu\"",
            "hidden_act `gelu`",
        ),
        (
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"rope_type\": \"longrope\", \"factor\": 4.0}",
            "rope type `longrope`",
        ),
        ("{", "[", "config.json"),
    ] {
        assert!(original.contains(from), "fixture lacks {from}");
        std::fs::write(&p, original.replacen(from, to, 1)).unwrap();
        let err = open_err(dir.path());
        assert!(
            err.contains(expect) && err.contains("config.json"),
            "{from} -> {to}: {err}"
        );
    }
}

#[test]
fn in_memory_files_load_like_the_folder() {
    // The browser build has no file system: it hands over the folder's files as bytes.
    let mut spec = SynthSpec::tiny(Arch::Qwen3, VOCAB);
    spec.shards = 2;
    let dir = folder(&spec);
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let bytes: std::sync::Arc<[u8]> = std::fs::read(entry.path()).unwrap().into();
        files.insert(entry.file_name().to_string_lossy().into_owned(), bytes);
    }
    let memory = nibble::source::ModelFiles::Memory {
        label: "picked files".into(),
        files,
    };
    let a = ModelSource::open_folder(memory)
        .unwrap()
        .load(Some(nf4(32)))
        .unwrap();
    let b = ModelSource::open(dir.path())
        .unwrap()
        .load(Some(nf4(32)))
        .unwrap();
    assert_eq!(a.layers, b.layers);
    assert_eq!(a.embed, b.embed);
    assert_eq!(a.source, "picked files");
}
