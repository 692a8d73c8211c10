//! Small models with random weights in the real Hugging Face layouts (config.json + safetensors, single
//! file or sharded), written without any download. Tests use them, and so does `nibble demo`.

use crate::config::{Arch, ModelConfig, TensorRole};
use crate::error::{Error, Result};
use crate::model::TokenizerFiles;
use crate::rng::Rng;
use crate::source::{FloatDtype, ModelFiles};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// The Qwen2.5 tokenizer shipped with nibble, so that demos and tests run with no download.
pub fn qwen25_tokenizer() -> TokenizerFiles {
    TokenizerFiles {
        tokenizer_json: Some(
            include_str!("../assets/qwen2.5-tokenizer/tokenizer.json").to_string(),
        ),
        tokenizer_config_json: Some(
            include_str!("../assets/qwen2.5-tokenizer/tokenizer_config.json").to_string(),
        ),
        chat_template_jinja: None,
    }
}

/// Qwen3's tokenizer.json: Qwen2.5's vocabulary and merges with the four tokens Qwen3 adds (tool
/// responses and thinking blocks), not special.
pub fn qwen3_tokenizer_json() -> String {
    let mut json: serde_json::Value =
        serde_json::from_str(include_str!("../assets/qwen2.5-tokenizer/tokenizer.json"))
            .expect("the bundled tokenizer is valid JSON");
    let added = json["added_tokens"]
        .as_array_mut()
        .expect("tokenizer.json has added_tokens");
    for (id, content) in [
        (151665, "<tool_response>"),
        (151666, "</tool_response>"),
        (151667, "<think>"),
        (151668, "</think>"),
    ] {
        added.push(serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false
        }));
    }
    json.to_string()
}

/// Which transformers generation wrote config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSpelling {
    /// transformers 4.x: `rope_theta`, `rope_scaling`, `torch_dtype`.
    V4,
    /// transformers 5.x: `rope_parameters`, `dtype`.
    V5,
}

#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Written to config.json only when set (Qwen3 always sets it).
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub spelling: ConfigSpelling,
    pub dtype: FloatDtype,
    /// 1 writes model.safetensors; more writes model-0000i-of-0000n.safetensors and the index.
    pub shards: usize,
    /// Llama only: add Llama 3.1's rope scaling.
    pub llama3_rope: bool,
    /// Standard deviation of the random weights (0.1 keeps a tiny model's loss away from ln(vocab)).
    pub std: f32,
    pub seed: u64,
}

impl SynthSpec {
    /// A few-layer model of the given family, with GQA and the family's usual options.
    pub fn tiny(arch: Arch, vocab_size: usize) -> Self {
        SynthSpec {
            arch,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: (arch == Arch::Qwen3).then_some(32),
            vocab_size,
            tie_word_embeddings: arch == Arch::Qwen2,
            spelling: ConfigSpelling::V4,
            dtype: FloatDtype::BF16,
            shards: 1,
            llama3_rope: arch == Arch::Llama,
            std: 0.1,
            seed: 0,
        }
    }

    /// Qwen2.5-0.5B's exact shapes (494,032,768 parameters).
    pub fn qwen25_05b() -> Self {
        SynthSpec {
            arch: Arch::Qwen2,
            hidden_size: 896,
            intermediate_size: 4864,
            num_layers: 24,
            num_heads: 14,
            num_kv_heads: 2,
            head_dim: None,
            vocab_size: 151936,
            tie_word_embeddings: true,
            spelling: ConfigSpelling::V4,
            dtype: FloatDtype::BF16,
            shards: 1,
            llama3_rope: false,
            std: 0.02,
            seed: 0,
        }
    }

    pub fn config_json(&self) -> Value {
        let dtype = self.dtype.name();
        let theta = if self.arch == Arch::Llama {
            500000.0
        } else {
            1000000.0
        };
        let mut c = json!({
            "architectures": [self.arch.class_name()],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.special_token_ids().0,
            "eos_token_id": self.special_token_ids().1,
        });
        let obj = c.as_object_mut().expect("object");
        if let Some(d) = self.head_dim {
            obj.insert("head_dim".into(), json!(d));
        }
        if self.arch != Arch::Qwen2 {
            obj.insert("attention_bias".into(), json!(false));
        }
        if self.arch == Arch::Llama {
            obj.insert("mlp_bias".into(), json!(false));
        }
        let scaling = self.llama3_rope.then(|| {
            json!({
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            })
        });
        match self.spelling {
            ConfigSpelling::V4 => {
                obj.insert("rope_theta".into(), json!(theta));
                obj.insert("rope_scaling".into(), scaling.unwrap_or(Value::Null));
                obj.insert("torch_dtype".into(), json!(dtype));
                obj.insert("transformers_version".into(), json!("4.51.3"));
            }
            ConfigSpelling::V5 => {
                let mut params = scaling.unwrap_or_else(|| json!({"rope_type": "default"}));
                params["rope_theta"] = json!(theta);
                obj.insert("rope_parameters".into(), params);
                obj.insert("dtype".into(), json!(dtype));
                obj.insert("transformers_version".into(), json!("5.0.0"));
            }
        }
        c
    }

    /// The config as nibble parses it.
    /// (bos, eos) ids in config.json: Qwen2.5's <|endoftext|> and <|im_end|>, which the byte tokenizer
    /// numbers 256 and 258.
    fn special_token_ids(&self) -> (usize, usize) {
        if self.vocab_size == BYTE_VOCAB {
            (256, 258)
        } else {
            (151643, 151645)
        }
    }

    pub fn config(&self) -> ModelConfig {
        ModelConfig::from_json_str(
            &self.config_json().to_string(),
            Path::new("synth config.json"),
        )
        .expect("synthetic configs are valid")
    }
}

/// Writes config.json, the safetensors file(s) and, if given, the tokenizer files into `dir`.
/// Tensors are generated and written one at a time, so even a 0.5B model needs little memory.
pub fn write_model_folder(
    dir: &Path,
    spec: &SynthSpec,
    tokenizer: Option<&TokenizerFiles>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e))
    };
    write(
        "config.json",
        &serde_json::to_string_pretty(&spec.config_json()).expect("json"),
    )?;
    if let Some(tok) = tokenizer {
        for (name, text) in [
            ("tokenizer.json", &tok.tokenizer_json),
            ("tokenizer_config.json", &tok.tokenizer_config_json),
            ("chat_template.jinja", &tok.chat_template_jinja),
        ] {
            if let Some(text) = text {
                write(name, text)?;
            }
        }
    }

    let config = spec.config();
    let tensors = config.expected_tensors();
    let shards = spec.shards.max(1).min(tensors.len());
    let per_shard = tensors.len().div_ceil(shards);
    let mut rng = Rng::new(spec.seed);
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in tensors.chunks(per_shard).enumerate() {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        let entries: Vec<(String, Vec<usize>)> = chunk
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        let path = dir.join(&name);
        write_safetensors_streaming(&path, spec.dtype, &entries, |i, out| {
            fill_random(&mut rng, spec, chunk[i].role, out)
        })?;
        for t in chunk {
            weight_map.insert(t.name.clone(), json!(name));
        }
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        write(
            "model.safetensors.index.json",
            &serde_json::to_string_pretty(&index).expect("json"),
        )?;
    }
    Ok(())
}

fn fill_random(rng: &mut Rng, spec: &SynthSpec, role: TensorRole, out: &mut [f32]) {
    for x in out.iter_mut() {
        let noise = rng.normal() as f32 * spec.std;
        // Norm scales sit around 1 as in trained models; everything else is centred on 0.
        *x = if role == TensorRole::Norm {
            1.0 + noise
        } else {
            noise
        };
    }
}

/// The same model as `write_model_folder` writes (in one shard), as in-memory files: what the browser,
/// which has no file system, loads.
pub fn model_files(spec: &SynthSpec, tokenizer: &TokenizerFiles, label: &str) -> ModelFiles {
    let mut files = std::collections::BTreeMap::new();
    let text = |t: &str| -> Arc<[u8]> { Arc::from(t.as_bytes()) };
    files.insert(
        "config.json".to_string(),
        text(&serde_json::to_string_pretty(&spec.config_json()).expect("json")),
    );
    for (name, content) in [
        ("tokenizer.json", &tokenizer.tokenizer_json),
        ("tokenizer_config.json", &tokenizer.tokenizer_config_json),
        ("chat_template.jinja", &tokenizer.chat_template_jinja),
    ] {
        if let Some(content) = content {
            files.insert(name.to_string(), text(content));
        }
    }
    let tensors = spec.config().expected_tensors();
    let entries: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let mut rng = Rng::new(spec.seed);
    let mut bytes = Vec::new();
    write_safetensors(&mut bytes, spec.dtype, &entries, &mut |i, out| {
        fill_random(&mut rng, spec, tensors[i].role, out)
    })
    .expect("writing to memory cannot fail");
    files.insert("model.safetensors".to_string(), Arc::from(bytes));
    ModelFiles::Memory {
        label: label.to_string(),
        files,
    }
}

/// The browser demo's built-in model: a random Qwen2-architecture model with the byte-level tokenizer
/// (vocabulary 259) and Qwen2.5's chat template, small enough to train in a page.
pub fn browser_model() -> ModelFiles {
    let mut spec = SynthSpec::tiny(Arch::Qwen2, BYTE_VOCAB);
    spec.hidden_size = 64;
    spec.intermediate_size = 192;
    spec.num_layers = 2;
    spec.seed = 7;
    model_files(&spec, &byte_tokenizer(), "builtin-tiny-qwen2")
}

/// GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in.
fn byte_level_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return byte as char;
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).expect("valid scalar")
}

/// A byte-level tokenizer (256 byte tokens and Qwen's three special tokens, no merges) with Qwen2.5's
/// chat template: tiny models for the browser and for fast tests keep a vocabulary of 259.
pub const BYTE_VOCAB: usize = 259;

pub fn byte_tokenizer() -> TokenizerFiles {
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), json!(b)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                            "use_regex": false});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    let qwen: Value = serde_json::from_str(include_str!(
        "../assets/qwen2.5-tokenizer/tokenizer_config.json"
    ))
    .expect("bundled JSON");
    let config = json!({
        "chat_template": qwen["chat_template"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": null,
    });
    TokenizerFiles {
        tokenizer_json: Some(tokenizer.to_string()),
        tokenizer_config_json: Some(config.to_string()),
        chat_template_jinja: None,
    }
}

/// Writes a safetensors file whose tensors (all of `dtype`) are produced one by one by `fill`.
pub fn write_safetensors_streaming(
    path: &Path,
    dtype: FloatDtype,
    entries: &[(String, Vec<usize>)],
    mut fill: impl FnMut(usize, &mut [f32]),
) -> Result<()> {
    crate::fsutil::write_atomically(path, |tmp| {
        let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        write_safetensors(&mut out, dtype, entries, &mut fill)?;
        out.flush()
    })
}

/// The streaming writer behind `write_safetensors_streaming`, into any `Write`.
fn write_safetensors(
    out: &mut impl Write,
    dtype: FloatDtype,
    entries: &[(String, Vec<usize>)],
    fill: &mut impl FnMut(usize, &mut [f32]),
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in entries {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let dtype_name = format!("{:?}", dtype.safetensors());
        header.insert(
            name.clone(),
            json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&header).expect("json");
    // The data section starts 8-byte aligned, as the safetensors writer does it.
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    for (i, (_, shape)) in entries.iter().enumerate() {
        values.clear();
        values.resize(shape.iter().product(), 0f32);
        fill(i, &mut values);
        bytes.clear();
        for &v in &values {
            match dtype {
                FloatDtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                FloatDtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                FloatDtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        out.write_all(&bytes)?;
    }
    Ok(())
}
