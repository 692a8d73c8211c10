//! Small models with random weights in the real Hugging Face layouts (config.json + safetensors, single
//! file or sharded), written without any download. Tests use them, and so does `nibble demo`.

use crate::config::{Arch, ModelConfig, TensorRole};
use crate::error::{Error, Result};
use crate::model::TokenizerFiles;
use crate::rng::Rng;
use crate::source::{FloatDtype, ModelFiles};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Mixture-of-experts MLPs: Qwen3-MoE's (on Qwen3) and Qwen2-MoE's (on Qwen2) in every layer
    /// but the second, Mixtral's (on Mistral) in every layer.
    pub moe: Option<SynthMoe>,
}

/// A synthetic mixture of experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthMoe {
    pub family: crate::config::MoeFamily,
    pub experts: usize,
    pub top_k: usize,
    pub inter: usize,
    /// Qwen2-MoE's shared expert's width (0: none).
    pub shared_expert: usize,
}

impl SynthSpec {
    /// A few-layer Qwen3-MoE: 8 experts of width 64, 2 per token, weights renormalised (as
    /// Qwen3-30B-A3B), the second of three layers a dense MLP (`mlp_only_layers`).
    pub fn tiny_qwen3_moe(vocab_size: usize) -> Self {
        SynthSpec {
            num_layers: 3,
            moe: Some(SynthMoe {
                family: crate::config::MoeFamily::Qwen3,
                experts: 8,
                top_k: 2,
                inter: 64,
                shared_expert: 0,
            }),
            ..Self::tiny(Arch::Qwen3, vocab_size)
        }
    }

    /// A few-layer Qwen2-MoE: Qwen2's attention, 8 experts of width 64, 2 per token, their weights
    /// not renormalised (Qwen2-MoE's default), a shared expert of width 192 beside them, the second of
    /// three layers a dense MLP.
    pub fn tiny_qwen2_moe(vocab_size: usize) -> Self {
        SynthSpec {
            num_layers: 3,
            moe: Some(SynthMoe {
                family: crate::config::MoeFamily::Qwen2,
                experts: 8,
                top_k: 2,
                inter: 64,
                shared_expert: 192,
            }),
            ..Self::tiny(Arch::Qwen2, vocab_size)
        }
    }

    /// A two-layer gpt-oss: a sliding layer (a window of 8) and a full one with attention biases and
    /// sinks, 4 biased experts of width 64 in each, 2 per token behind a biased router, the clamped
    /// SwiGLU at a limit of 1.5 (where the random activations meet it), the experts stored as
    /// transformers holds them ([experts, in, out], gate and up columns interleaved).
    pub fn tiny_gpt_oss(vocab_size: usize) -> Self {
        SynthSpec {
            num_layers: 2,
            // Written out: GptOssConfig's default is 64.
            head_dim: Some(16),
            moe: Some(SynthMoe {
                family: crate::config::MoeFamily::GptOss,
                experts: 4,
                top_k: 2,
                inter: 64,
                shared_expert: 0,
            }),
            ..Self::tiny(Arch::Ministral, vocab_size)
        }
    }

    /// A two-layer Gemma 4 with experts beside each dense MLP (26B-A4B's block): a sliding and a
    /// full layer, 4 experts of width 64, 2 per token, and neither per-layer inputs nor shared keys
    /// and values (26B-A4B has none).
    pub fn tiny_gemma4_moe(vocab_size: usize) -> Self {
        SynthSpec {
            num_layers: 2,
            moe: Some(SynthMoe {
                family: crate::config::MoeFamily::Gemma4,
                experts: 4,
                top_k: 2,
                inter: 64,
                shared_expert: 0,
            }),
            ..Self::tiny(Arch::Gemma4, vocab_size)
        }
    }

    /// A two-layer Mixtral: Mistral's attention, 4 experts of width 64 in each layer, 2 per token.
    pub fn tiny_mixtral(vocab_size: usize) -> Self {
        SynthSpec {
            intermediate_size: 64,
            moe: Some(SynthMoe {
                family: crate::config::MoeFamily::Mixtral,
                experts: 4,
                top_k: 2,
                inter: 64,
                shared_expert: 0,
            }),
            ..Self::tiny(Arch::Mistral, vocab_size)
        }
    }
}

impl SynthSpec {
    /// A few-layer model of the given family, with GQA and the family's usual options.
    pub fn tiny(arch: Arch, vocab_size: usize) -> Self {
        SynthSpec {
            arch,
            hidden_size: 64,
            intermediate_size: 128,
            // Gemma 4: two layers computing keys and values, two sharing theirs.
            num_layers: if arch == Arch::Gemma4 { 4 } else { 2 },
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: match arch {
                Arch::Qwen3 | Arch::Mistral | Arch::Gemma3 => Some(32),
                Arch::Gemma4 => Some(16),
                Arch::Ministral3 => Some(16),
                _ => None,
            },
            vocab_size,
            tie_word_embeddings: matches!(
                arch,
                Arch::Qwen2 | Arch::SmolLM3 | Arch::Phi3 | Arch::Gemma3 | Arch::Gemma4
            ),
            spelling: ConfigSpelling::V4,
            dtype: FloatDtype::BF16,
            shards: 1,
            llama3_rope: arch == Arch::Llama,
            std: 0.1,
            seed: 0,
            moe: None,
        }
    }

    /// The model `nibble demo` and the browser page's built-in example train: two small random Qwen2
    /// layers under the real Qwen2.5 tokenizer's vocabulary, which learn the demo chats in the demo
    /// preset's 96 steps.
    pub fn demo() -> Self {
        SynthSpec {
            hidden_size: 128,
            intermediate_size: 384,
            ..Self::tiny(Arch::Qwen2, 151936)
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
            moe: None,
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
        // Windows shorter than the tests' sequences, so that they change the numbers.
        match self.arch {
            Arch::Mistral => {
                obj.insert("sliding_window".into(), json!(8));
            }
            Arch::Ministral => {
                obj.insert("sliding_window".into(), json!(8));
                let types: Vec<&str> = (0..self.num_layers)
                    .map(|l| {
                        if l % 2 == 0 {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                obj.insert("layer_types".into(), json!(types));
            }
            Arch::SmolLM3 => {
                let no_rope: Vec<u32> = (0..self.num_layers).map(|l| (l % 2 == 0) as u32).collect();
                obj.insert("no_rope_layers".into(), json!(no_rope));
            }
            Arch::Phi3 => {
                // Phi-4-mini's 3/4 of each head rotated; LongRoPE's long factors past 64 positions.
                obj.insert("partial_rotary_factor".into(), json!(0.75));
                // Phi3Config's default (32000) is past a small vocabulary.
                obj.insert("pad_token_id".into(), json!(self.special_token_ids().1));
                obj.insert("original_max_position_embeddings".into(), json!(64));
            }
            Arch::Gemma3 => {
                // Sliding and full layers alternating, a query scale apart from head_dim's, and
                // the activation under Gemma's own key.
                obj.remove("hidden_act");
                obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                obj.insert("sliding_window".into(), json!(8));
                obj.insert("sliding_window_pattern".into(), json!(2));
                obj.insert("query_pre_attn_scalar".into(), json!(24));
            }
            Arch::Gemma4 => {
                // Sliding and full layers alternating (the last one full), full layers with wider
                // heads whose values are their keys (31B's), and E2B's parts: per-layer inputs of
                // 64, the second half of the layers (from four) attending over the keys and values
                // of the first half's last of their type, with MLPs twice as wide.
                obj.remove("hidden_act");
                obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                obj.insert("sliding_window".into(), json!(8));
                let types: Vec<&str> = (0..self.num_layers)
                    .map(|l| match l % 2 {
                        0 => "sliding_attention",
                        _ => "full_attention",
                    })
                    .collect();
                obj.insert("layer_types".into(), json!(types));
                obj.insert("global_head_dim".into(), json!(32));
                obj.insert("attention_k_eq_v".into(), json!(true));
                obj.insert("num_global_key_value_heads".into(), json!(1));
                obj.insert("hidden_size_per_layer_input".into(), json!(64));
                obj.insert("vocab_size_per_layer_input".into(), json!(self.vocab_size));
                let shared = if self.num_layers >= 4 {
                    self.num_layers / 2
                } else {
                    0
                };
                obj.insert("num_kv_shared_layers".into(), json!(shared));
                obj.insert("use_double_wide_mlp".into(), json!(true));
                obj.insert("final_logit_softcapping".into(), json!(30.0));
                if let Some(m) = self.moe {
                    obj.insert("hidden_size_per_layer_input".into(), json!(0));
                    obj.insert("use_double_wide_mlp".into(), json!(false));
                    obj.insert("enable_moe_block".into(), json!(true));
                    obj.insert("num_experts".into(), json!(m.experts));
                    obj.insert("top_k_experts".into(), json!(m.top_k));
                    obj.insert("moe_intermediate_size".into(), json!(m.inter));
                }
            }
            Arch::Qwen2 | Arch::Qwen3 | Arch::Llama | Arch::Ministral3 => {}
        }
        if let Some(m) = self
            .moe
            .filter(|m| m.family == crate::config::MoeFamily::GptOss)
        {
            obj.insert("architectures".into(), json!(["GptOssForCausalLM"]));
            obj.insert("model_type".into(), json!("gpt_oss"));
            obj.insert("num_local_experts".into(), json!(m.experts));
            obj.insert("num_experts_per_tok".into(), json!(m.top_k));
            obj.insert("intermediate_size".into(), json!(m.inter));
            obj.insert("attention_bias".into(), json!(true));
            obj.insert("swiglu_limit".into(), json!(1.5));
            obj.insert("output_router_logits".into(), json!(false));
        } else if let Some(m) = self
            .moe
            .filter(|m| m.family == crate::config::MoeFamily::Mixtral)
        {
            obj.insert("architectures".into(), json!(["MixtralForCausalLM"]));
            obj.insert("model_type".into(), json!("mixtral"));
            obj.insert("num_local_experts".into(), json!(m.experts));
            obj.insert("num_experts_per_tok".into(), json!(m.top_k));
            obj.insert("intermediate_size".into(), json!(m.inter));
            obj.insert("output_router_logits".into(), json!(false));
            obj.insert("router_jitter_noise".into(), json!(0.0));
        } else if let Some(m) = self
            .moe
            .filter(|m| m.family != crate::config::MoeFamily::Gemma4)
        {
            let qwen2 = m.family == crate::config::MoeFamily::Qwen2;
            let (class, model_type) = match qwen2 {
                true => ("Qwen2MoeForCausalLM", "qwen2_moe"),
                false => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            };
            obj.insert("architectures".into(), json!([class]));
            obj.insert("model_type".into(), json!(model_type));
            obj.insert("num_experts".into(), json!(m.experts));
            obj.insert("num_experts_per_tok".into(), json!(m.top_k));
            obj.insert("moe_intermediate_size".into(), json!(m.inter));
            obj.insert("norm_topk_prob".into(), json!(!qwen2));
            if qwen2 {
                obj.insert(
                    "shared_expert_intermediate_size".into(),
                    json!(m.shared_expert),
                );
                obj.insert("qkv_bias".into(), json!(true));
            }
            obj.insert("decoder_sparse_step".into(), json!(1));
            let dense: &[usize] = if self.num_layers > 1 { &[1] } else { &[] };
            obj.insert("mlp_only_layers".into(), json!(dense));
            obj.insert("output_router_logits".into(), json!(false));
        }
        let gpt_oss = self
            .moe
            .is_some_and(|m| m.family == crate::config::MoeFamily::GptOss);
        let scaling = match self.arch {
            // The released gpt-oss's YaRN, over 64 original positions so that the tests' sequences
            // see both ends of its ramp (a config without one would get transformers' default).
            _ if gpt_oss => Some(json!({
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": false,
                "original_max_position_embeddings": 64,
            })),
            // Gemma 3 4B's: linear scaling on the full layers only.
            Arch::Gemma3 => Some(json!({"rope_type": "linear", "factor": 8.0})),
            Arch::Llama if self.llama3_rope => Some(json!({
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            })),
            Arch::Phi3 => {
                let pairs = self.head_dim.unwrap_or(self.hidden_size / self.num_heads) * 3 / 8;
                let factors =
                    |step: f64| -> Vec<f64> { (0..pairs).map(|i| 1.0 + step * i as f64).collect() };
                Some(json!({
                    "type": "longrope",
                    "short_factor": factors(0.05),
                    "long_factor": factors(1.5),
                }))
            }
            // Ministral 3's YaRN and query scale, their steps every 8 positions so that the tests'
            // sequences cross several.
            Arch::Ministral3 => Some(json!({
                "rope_type": "yarn",
                "factor": 16.0,
                "original_max_position_embeddings": 8,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            })),
            _ => None,
        };
        // Gemma 4's configs spell RoPE one way only (transformers 5): proportional on the full
        // layers, rotating half of each 32-wide head here.
        if self.arch == Arch::Gemma4 {
            obj.insert(
                "rope_parameters".into(),
                json!({
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                       "rope_theta": theta},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                }),
            );
            let (key, version) = match self.spelling {
                ConfigSpelling::V4 => ("torch_dtype", "4.51.3"),
                ConfigSpelling::V5 => ("dtype", "5.0.0"),
            };
            obj.insert(key.into(), json!(dtype));
            obj.insert("transformers_version".into(), json!(version));
            return c;
        }
        match self.spelling {
            ConfigSpelling::V4 => {
                obj.insert("rope_theta".into(), json!(theta));
                obj.insert("rope_scaling".into(), scaling.unwrap_or(Value::Null));
                if self.arch == Arch::Gemma3 {
                    obj.insert("rope_local_base_freq".into(), json!(10000.0));
                }
                obj.insert("torch_dtype".into(), json!(dtype));
                obj.insert("transformers_version".into(), json!("4.51.3"));
            }
            ConfigSpelling::V5 => {
                let mut params = scaling.unwrap_or_else(|| json!({"rope_type": "default"}));
                if let Some(kind) = params.as_object_mut().and_then(|p| p.remove("type")) {
                    params["rope_type"] = kind;
                }
                params["rope_theta"] = json!(theta);
                if self.arch == Arch::Gemma3 {
                    params = json!({
                        "full_attention": params,
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    });
                }
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
    let mut rng = Rng::new(spec.seed);
    let mut weight_map = serde_json::Map::new();
    // As many files as shards, each holding at least one tensor (chunks of ceil(n / shards) could
    // make fewer files than their names count).
    let n = tensors.len();
    for s in 0..shards {
        let chunk = &tensors[s * n / shards..(s + 1) * n / shards];
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        let entries: Vec<(String, Vec<usize>)> = chunk
            .iter()
            .map(|t| (stored_name(&config, t), stored_shape(&config, t)))
            .collect();
        let path = dir.join(&name);
        write_safetensors_streaming(&path, spec.dtype, &entries, |i, out| {
            fill_random(&mut rng, spec, chunk[i].role, out)
        })?;
        for t in chunk {
            weight_map.insert(stored_name(&config, t), json!(name));
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

/// The shape a tensor is written with: stacked experts in transformers' own 3-D layout
/// ([experts, rows, cols], which it loads and may save; gpt-oss's [experts, cols, rows]),
/// everything else as expected.
fn stored_shape(config: &ModelConfig, t: &crate::config::ExpectedTensor) -> Vec<usize> {
    match (&config.moe, t.role) {
        (Some(m), TensorRole::Experts) if m.family == crate::config::MoeFamily::GptOss => {
            vec![m.experts, t.shape[1], t.shape[0] / m.experts]
        }
        (Some(m), TensorRole::Experts) => vec![m.experts, t.shape[0] / m.experts, t.shape[1]],
        _ => t.shape.clone(),
    }
}

/// The name a tensor is written under: gpt-oss's router is its checkpoints' `mlp.router`.
fn stored_name(config: &ModelConfig, t: &crate::config::ExpectedTensor) -> String {
    let gpt_oss = config.moe_family() == Some(crate::config::MoeFamily::GptOss);
    let router = format!(".{}.", crate::config::ROUTER_MODULE);
    match gpt_oss {
        true => t.name.replace(&router, ".mlp.router."),
        false => t.name.clone(),
    }
}

fn fill_random(rng: &mut Rng, spec: &SynthSpec, role: TensorRole, out: &mut [f32]) {
    // Gemma 4's router sees its input scaled by hidden^-1/2: its weights are as much larger, so
    // that its logits spread as other families' do and no two experts sit near a tie.
    let gemma4_router = role == TensorRole::Router
        && spec
            .moe
            .is_some_and(|m| m.family == crate::config::MoeFamily::Gemma4);
    let std = match gemma4_router {
        true => spec.std * (spec.hidden_size as f32).sqrt(),
        false => spec.std,
    };
    for x in out.iter_mut() {
        let noise = rng.normal() as f32 * std;
        // Norm scales sit around 1 as in trained models (Gemma's stored w around 0: it scales by
        // 1 + w); everything else is centred on 0.
        *x = if role == TensorRole::Norm && spec.arch != Arch::Gemma3 {
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
    let config = spec.config();
    let tensors = config.expected_tensors();
    let entries: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|t| (stored_name(&config, t), stored_shape(&config, t)))
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

/// The browser page's built-in model: `nibble demo`'s (`SynthSpec::demo`), with the Qwen2.5 tokenizer
/// the library already carries (so the page downloads nothing more for it).
pub fn browser_model() -> ModelFiles {
    model_files(
        &SynthSpec::demo(),
        &qwen25_tokenizer(),
        "builtin-demo-qwen2",
    )
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
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    let mut values = Vec::new();
    // Encoded a block at a time: the whole tensor's bytes beside its f32 values would add half or
    // all of its size again to what a merge of a large embedding or expert stack holds.
    const BLOCK: usize = 1 << 16;
    let mut bytes = Vec::with_capacity(BLOCK * dtype.size());
    for (i, (_, shape)) in entries.iter().enumerate() {
        values.clear();
        values.resize(shape.iter().product(), 0f32);
        fill(i, &mut values);
        for block in values.chunks(BLOCK) {
            bytes.clear();
            for &v in block {
                match dtype {
                    FloatDtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                    FloatDtype::F16 => {
                        bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
                    }
                    FloatDtype::BF16 => {
                        bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())
                    }
                }
            }
            out.write_all(&bytes)?;
        }
    }
    Ok(())
}

/// The FLUX.2 [klein] pipelines `nibble synth` writes with random weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KleinPreset {
    /// One double- and one single-stream block of 2 heads, a 28-layer Qwen3 of width 128, a small VAE:
    /// every part of the real layout, small enough for tests.
    Tiny,
    /// klein 4B's transformer (the text encoder and VAE at their real shapes too).
    B4,
    /// klein 9B's.
    B9,
}

/// The Qwen3 tokenizer: Qwen2.5's vocabulary with Qwen3's four added tokens and hybrid chat template.
pub fn qwen3_tokenizer() -> TokenizerFiles {
    TokenizerFiles {
        tokenizer_json: Some(qwen3_tokenizer_json()),
        tokenizer_config_json: Some(
            include_str!("../assets/qwen3-tokenizer/tokenizer_config.json").to_string(),
        ),
        chat_template_jinja: None,
    }
}

/// Writes a diffusers FLUX.2 [klein] pipeline folder with random weights: model_index.json,
/// transformer/, text_encoder/ (Qwen3), tokenizer/, scheduler/ and vae/.
pub fn write_klein_pipeline(dir: &Path, preset: KleinPreset, seed: u64) -> Result<()> {
    let (double, single, heads, te_hidden, te_layers, te_heads, te_inter, vae_widths, groups) =
        match preset {
            KleinPreset::Tiny => (1, 1, 2, 128, 28, 4, 256, vec![32, 32, 64, 64], 8),
            KleinPreset::B4 => (5, 20, 24, 2560, 36, 32, 9728, vec![128, 256, 512, 512], 32),
            KleinPreset::B9 => (8, 24, 32, 4096, 36, 32, 12288, vec![128, 256, 512, 512], 32),
        };
    let write = |path: PathBuf, value: &Value| {
        std::fs::create_dir_all(path.parent().expect("inside dir"))
            .and_then(|_| std::fs::write(&path, serde_json::to_string_pretty(value).expect("json")))
            .map_err(|e| Error::io(&path, e))
    };
    write(
        dir.join("model_index.json"),
        &json!({"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1",
                "transformer": ["diffusers", "Flux2Transformer2DModel"],
                "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                "vae": ["diffusers", "AutoencoderKLFlux2"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}),
    )?;
    let mut rng = Rng::new(seed);
    // The transformer, in diffusers' names.
    let transformer = json!({"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-6, "guidance_embeds": false, "in_channels": 128,
        "joint_attention_dim": 3 * te_hidden, "mlp_ratio": 3.0, "num_attention_heads": heads,
        "num_layers": double, "num_single_layers": single, "out_channels": null, "patch_size": 1,
        "rope_theta": 2000, "timestep_guidance_channels": 256});
    write(dir.join("transformer/config.json"), &transformer)?;
    let c = crate::models::flux2::Flux2Config::from_diffusers(
        &transformer.to_string(),
        &dir.join("transformer/config.json"),
    )?;
    let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
    for (path, out, inp) in c.linears() {
        let names = crate::models::flux2::diffusers_names(&format!("{path}.weight")).0;
        let rows = out / names.len();
        entries.extend(names.into_iter().map(|n| (n, vec![rows, inp])));
    }
    for name in c.norms() {
        let names = crate::models::flux2::diffusers_names(&name).0;
        entries.push((names[0].clone(), vec![c.head_dim]));
    }
    write_random(
        &dir.join("transformer/diffusion_pytorch_model.safetensors"),
        &entries,
        &mut rng,
    )?;
    // The Qwen3 text encoder and its tokenizer.
    let encoder = SynthSpec {
        arch: Arch::Qwen3,
        hidden_size: te_hidden,
        intermediate_size: te_inter,
        num_layers: te_layers,
        num_heads: te_heads,
        num_kv_heads: 8.min(te_heads),
        head_dim: Some(if preset == KleinPreset::Tiny { 32 } else { 128 }),
        vocab_size: 151936,
        tie_word_embeddings: preset == KleinPreset::Tiny,
        spelling: ConfigSpelling::V4,
        dtype: FloatDtype::BF16,
        shards: 1,
        llama3_rope: false,
        std: 0.1,
        seed: seed.wrapping_add(1),
        moe: None,
    };
    write_model_folder(&dir.join("text_encoder"), &encoder, None)?;
    let tokenizer = qwen3_tokenizer();
    for (name, text) in [
        ("tokenizer.json", &tokenizer.tokenizer_json),
        ("tokenizer_config.json", &tokenizer.tokenizer_config_json),
    ] {
        let path = dir.join("tokenizer").join(name);
        std::fs::create_dir_all(dir.join("tokenizer"))
            .and_then(|_| std::fs::write(&path, text.as_deref().unwrap_or_default()))
            .map_err(|e| Error::io(&path, e))?;
    }
    // Klein's scheduler, as the released pipelines ship it.
    write(
        dir.join("scheduler/scheduler_config.json"),
        &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                "base_shift": 0.5, "invert_sigmas": false, "max_image_seq_len": 4096,
                "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "shift_terminal": null, "stochastic_sampling": false,
                "time_shift_type": "exponential", "use_beta_sigmas": false,
                "use_dynamic_shifting": true, "use_exponential_sigmas": false,
                "use_karras_sigmas": false}),
    )?;
    // The VAE: the encoder, its BatchNorm statistics, then the decoder (after them, so that the
    // encoder's random values are those of pipelines written before it), and a config diffusers
    // accepts.
    let vae = json!({"_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "batch_norm_eps": 1e-4,
        "batch_norm_momentum": 0.1, "block_out_channels": vae_widths, "in_channels": 3,
        "latent_channels": 32, "layers_per_block": 2, "mid_block_add_attention": true,
        "norm_num_groups": groups, "out_channels": 3, "patch_size": [2, 2],
        "use_post_quant_conv": true, "use_quant_conv": true,
        "down_block_types": (["DownEncoderBlock2D"; 4]),
        "up_block_types": (["UpDecoderBlock2D"; 4])});
    write(dir.join("vae/config.json"), &vae)?;
    let mut entries = Vec::new();
    let conv =
        |entries: &mut Vec<(String, Vec<usize>)>, name: &str, cin: usize, cout: usize, k: usize| {
            entries.push((format!("{name}.weight"), vec![cout, cin, k, k]));
            entries.push((format!("{name}.bias"), vec![cout]));
        };
    let norm = |entries: &mut Vec<(String, Vec<usize>)>, name: &str, ch: usize| {
        entries.push((format!("{name}.weight"), vec![ch]));
        entries.push((format!("{name}.bias"), vec![ch]));
    };
    let resnet = |entries: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, cout: usize| {
        norm(entries, &format!("{p}.norm1"), cin);
        conv(entries, &format!("{p}.conv1"), cin, cout, 3);
        norm(entries, &format!("{p}.norm2"), cout);
        conv(entries, &format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(entries, &format!("{p}.conv_shortcut"), cin, cout, 1);
        }
    };
    let mid_block = |entries: &mut Vec<(String, Vec<usize>)>, half: &str, ch: usize| {
        for r in 0..2 {
            resnet(entries, &format!("{half}.mid_block.resnets.{r}"), ch, ch);
        }
        let attn = format!("{half}.mid_block.attentions.0");
        norm(entries, &format!("{attn}.group_norm"), ch);
        for l in ["to_q", "to_k", "to_v", "to_out.0"] {
            entries.push((format!("{attn}.{l}.weight"), vec![ch, ch]));
            entries.push((format!("{attn}.{l}.bias"), vec![ch]));
        }
    };
    conv(&mut entries, "encoder.conv_in", 3, vae_widths[0], 3);
    let mut ch = vae_widths[0];
    for (i, &out) in vae_widths.iter().enumerate() {
        for j in 0..2 {
            resnet(
                &mut entries,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                ch,
                out,
            );
            ch = out;
        }
        if i + 1 < vae_widths.len() {
            conv(
                &mut entries,
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                out,
                out,
                3,
            );
        }
    }
    mid_block(&mut entries, "encoder", ch);
    norm(&mut entries, "encoder.conv_norm_out", ch);
    conv(&mut entries, "encoder.conv_out", ch, 64, 3);
    conv(&mut entries, "quant_conv", 64, 64, 1);
    entries.push(("bn.running_mean".into(), vec![128]));
    entries.push(("bn.running_var".into(), vec![128]));
    conv(&mut entries, "post_quant_conv", 32, 32, 1);
    conv(&mut entries, "decoder.conv_in", 32, ch, 3);
    mid_block(&mut entries, "decoder", ch);
    for (i, &out) in vae_widths.iter().rev().enumerate() {
        for j in 0..3 {
            resnet(
                &mut entries,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                ch,
                out,
            );
            ch = out;
        }
        if i + 1 < vae_widths.len() {
            let name = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            conv(&mut entries, &name, out, out, 3);
        }
    }
    norm(&mut entries, "decoder.conv_norm_out", ch);
    conv(&mut entries, "decoder.conv_out", ch, 3, 3);
    write_random(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &entries,
        &mut rng,
    )
}

/// Random bf16 tensors: weights of matrices and kernels scaled by 1/√fan-in, norm scales and variances
/// around 1, biases and means small.
fn write_random(path: &Path, entries: &[(String, Vec<usize>)], rng: &mut Rng) -> Result<()> {
    write_safetensors_streaming(path, FloatDtype::BF16, entries, |i, out| {
        let (name, shape) = &entries[i];
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let around_one = name.contains("norm") && !name.contains("norm_out.linear")
            || name.ends_with("running_var");
        for v in out.iter_mut() {
            let n = rng.normal() as f32;
            *v = if shape.len() > 1 {
                n / (fan_in as f32).sqrt()
            } else if around_one && name.ends_with("running_var") {
                (0.5 * n).exp()
            } else if around_one && !name.ends_with(".bias") {
                1.0 + 0.1 * n
            } else {
                0.1 * n
            };
        }
    })
}
