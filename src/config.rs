//! `config.json` of a Hugging Face causal-LM folder, in both spellings found in the wild:
//! transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`).

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Qwen2,
    Qwen3,
    Llama,
    /// Mistral 7B and its successors (Nemo, Small): Llama's layers with an optional sliding window.
    Mistral,
    /// Ministral 8B: Mistral with per-layer sliding or full attention (`layer_types`).
    Ministral,
    /// SmolLM3: Llama's layers where every few layers skip RoPE (`no_rope_layers`).
    SmolLM3,
    /// Phi-3 and Phi-4-mini: fused `qkv_proj` and `gate_up_proj`, partial rotary embedding, LongRoPE.
    Phi3,
    /// Gemma 3's text decoder (`gemma3_text`): (1 + w) norms, sandwich norms, scaled embeddings, a
    /// GELU-gated MLP, q/k norms, sliding layers with a RoPE base of their own.
    Gemma3,
    /// Ministral 3 (3B, 8B, 14B): Mistral's layers, YaRN, and queries scaled up with the position past
    /// the original context (`llama_4_scaling_beta`).
    Ministral3,
    /// Gemma 4's text decoder (`gemma4_text`): Gemma 3's block with plain-w norms, value norms, an
    /// attention scale of 1, wider heads with partial ("proportional") RoPE on the full layers (whose
    /// values may be their keys), and a scalar per layer.
    Gemma4,
}

impl Arch {
    /// Gemma 3 and 4: sandwich norms, scaled embeddings, GeGLU, q/k norms, local RoPE.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma3 | Arch::Gemma4)
    }
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Ministral => "ministral",
            Arch::SmolLM3 => "smollm3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3_text",
            Arch::Ministral3 => "ministral3",
            Arch::Gemma4 => "gemma4_text",
        }
    }

    pub const ALL: [Arch; 10] = [
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Llama,
        Arch::Mistral,
        Arch::Ministral,
        Arch::SmolLM3,
        Arch::Phi3,
        Arch::Gemma3,
        Arch::Ministral3,
        Arch::Gemma4,
    ];

    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Ministral => "MinistralForCausalLM",
            Arch::SmolLM3 => "SmolLM3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
            Arch::Ministral3 => "Ministral3ForCausalLM",
            Arch::Gemma4 => "Gemma4ForCausalLM",
        }
    }

    fn from_model_type(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == name)
    }

    fn from_class_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.class_name() == name)
    }

    /// transformers' `default_theta` of the family's config: the RoPE base when a config gives none.
    fn default_rope_theta(self) -> f64 {
        match self {
            Arch::SmolLM3 => 2_000_000.0,
            // Gemma 3's global layers; its sliding ones default to `LOCAL_ROPE_THETA`.
            Arch::Gemma3 | Arch::Gemma4 => 1_000_000.0,
            _ => 10_000.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN (transformers `_compute_yarn_parameters`): frequencies blended between interpolation and
    /// extrapolation over a ramp of dimensions, and cos/sin scaled by `attention_factor` (resolved
    /// from `mscale`/`mscale_all_dim` or the factor when the config gives none).
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
    /// Phi-3's LongRoPE (transformers `_compute_longrope_parameters`): per-frequency divisors, the short
    /// ones while a step's positions stay within the original length, the long ones past it; cos/sin
    /// scaled by `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
        attention_factor: f64,
    },
    /// Gemma 4's full layers ("proportional"): the first ⌊partial_rotary_factor · head_dim / 2⌋
    /// frequencies as the default RoPE's over the whole head, the rest zero (those channels pass
    /// through), all divided by `factor`.
    Proportional {
        factor: f64,
        partial_rotary_factor: f64,
    },
}

/// The activation of the MLP's gate: h = act(gate) ⊙ up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateActivation {
    Silu,
    /// PyTorch's `gelu(x, approximate="tanh")` (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
    /// gpt-oss's experts: h = (u + 1)·g·σ(alpha·g) with g = min(gate, limit) and u = up clamped to
    /// ±limit (`swiglu_alpha`, `swiglu_limit`).
    ClampedSwiglu {
        alpha: f32,
        limit: f32,
    },
}

// The constants are finite numbers from a config (checked where it is read): equal as bits.
impl Eq for GateActivation {}

impl std::hash::Hash for GateActivation {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        if let GateActivation::ClampedSwiglu { alpha, limit } = self {
            (alpha.to_bits(), limit.to_bits()).hash(state);
        }
    }
}

/// Every `model_type` nibble reads, in words, for the error that refuses another.
pub fn supported_model_types() -> String {
    let names: Vec<String> = Arch::ALL
        .iter()
        .map(|a| a.model_type().to_string())
        .chain([QWEN2_MOE, QWEN3_MOE, MIXTRAL, GPT_OSS].map(String::from))
        .chain(
            Multimodal::ALL
                .iter()
                .map(|m| format!("{} (its text decoder)", m.model_type())),
        )
        .collect();
    names.join(", ")
}

/// A multimodal model whose text decoder nibble trains, its vision tower left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Multimodal {
    /// Gemma 3 4B, 12B and 27B.
    Gemma3,
    /// Mistral Small 3.1/3.2 (a `mistral` text decoder) and Ministral 3 (`ministral3`).
    Mistral3,
    /// Gemma 4 (its text decoder; the vision and audio towers left as they are).
    Gemma4,
}

impl Multimodal {
    pub const ALL: [Multimodal; 3] = [Multimodal::Gemma3, Multimodal::Mistral3, Multimodal::Gemma4];

    pub fn model_type(self) -> &'static str {
        match self {
            Multimodal::Gemma3 => "gemma3",
            Multimodal::Mistral3 => "mistral3",
            Multimodal::Gemma4 => "gemma4",
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            Multimodal::Gemma3 => "Gemma3ForConditionalGeneration",
            Multimodal::Mistral3 => "Mistral3ForConditionalGeneration",
            Multimodal::Gemma4 => "Gemma4ForConditionalGeneration",
        }
    }

    fn from_model_type(name: &str) -> Option<Multimodal> {
        Multimodal::ALL.into_iter().find(|m| m.model_type() == name)
    }
}

/// Gemma 3's RoPE base for its sliding layers when a config names none (`rope_local_base_freq`).
const LOCAL_ROPE_THETA: f64 = 10_000.0;

/// The output projection's module path, where the model has one of its own (untied).
pub const OUTPUT_MODULE: &str = "lm_head";

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Channels of each head that RoPE rotates: head_dim, or int(head_dim · partial_rotary_factor).
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Qwen2 always has q/k/v biases; Llama and Qwen3 have them when `attention_bias` is set.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// gpt-oss: a learned logit per query head (`self_attn.sinks`) joins each row's softmax.
    pub attention_sinks: bool,
    /// Qwen3 normalises each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Gemma 4 normalises each head of v too, with no scale of its own (`v_norm`).
    pub value_norm: bool,
    /// Gemma 4 multiplies each layer's output by the layer's `layer_scalar` [1].
    pub layer_scalars: bool,
    /// Phi-3 computes q, k, v in one linear (`qkv_proj`) and gate and up in another (`gate_up_proj`).
    pub fused_projections: bool,
    /// Added to every norm's weight: Gemma scales by (1 + w).
    pub norm_offset: f32,
    /// Gemma normalises each block's output too (`post_attention_layernorm` on the attention's,
    /// `post_feedforward_layernorm` on the MLP's) and the MLP's input with `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// The embeddings are multiplied by this (Gemma: √hidden, as an f32).
    pub embed_scale: f32,
    pub gate_activation: GateActivation,
    /// What the attention scores are multiplied by: 1/√head_dim, or Gemma's
    /// `query_pre_attn_scalar`^-½.
    pub attention_scale: f64,
    /// Gemma 3's RoPE base for the layers marked `local_rope` (its sliding ones), never scaled.
    pub local_rope_theta: Option<f64>,
    /// Gemma's causal LMs: logits become cap · tanh(logit / cap) before the softmax.
    pub final_logit_softcapping: Option<f32>,
    /// The decoder is the text part of a multimodal model (Gemma 3 4B and up, Mistral Small 3.1,
    /// Ministral 3): its modules sit under `model.language_model.` rather than `model.`.
    pub multimodal: Option<Multimodal>,
    /// Ministral 3: each query is multiplied by 1 + β·ln(1 + ⌊position / original⌋) after RoPE.
    pub query_position_scale: Option<QueryPositionScale>,
    /// Per decoder layer: how its attention sees the sequence.
    pub layers: Vec<LayerAttention>,
    /// Gemma 4 E2B/E4B's per-layer inputs.
    pub per_layer_inputs: Option<PerLayerInputs>,
    /// Gemma 4 E2B: the layers that share keys and values have MLPs twice as wide
    /// (`use_double_wide_mlp`).
    pub double_wide_shared_mlp: bool,
    /// Qwen3-MoE: the layers whose MLP is a router over experts.
    pub moe: Option<MoeConfig>,
    /// The dtype the checkpoint says it was saved in (informational; tensors carry their own dtype).
    pub dtype: Option<String>,
    /// An FP8 checkpoint's `quantization_config`: how the scales stored beside its 8-bit weights apply.
    pub float8: Option<Float8Scheme>,
    /// The parsed JSON as read, kept so that a merged model or a quantized file can carry it unchanged.
    pub raw: Value,
}

/// A mixture-of-experts MLP (Qwen3-MoE, `model_type` qwen3_moe; Mixtral, mixtral): each token's
/// hidden state goes through the `top_k` of `experts` gated MLPs its router picks, mixed by the
/// router's weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub family: MoeFamily,
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate width (`moe_intermediate_size`).
    pub inter: usize,
    /// The chosen experts' weights divided by their sum (`norm_topk_prob`).
    pub normalize: bool,
    /// Qwen2-MoE: the width of the shared expert every token also goes through
    /// (`shared_expert_intermediate_size`); 0 for none.
    pub shared_expert: usize,
    /// Per layer: whether its MLP is the experts (the rest have a dense MLP of
    /// `intermediate_size`: `mlp_only_layers`, `decoder_sparse_step`).
    pub sparse: Vec<bool>,
    /// transformers adds `router_aux_loss_coef` times the routers' load-balancing loss to the
    /// training loss when `output_router_logits` is set (it is not by default).
    pub output_router_logits: bool,
}

/// Whose mixture of experts: what its checkpoints name the router and experts, and the module
/// names PEFT converts into its `target_parameters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeFamily {
    /// Qwen3-MoE (transformers' qwen2_moe conversion): `mlp.gate`, `mlp.experts.{e}.gate_proj`,
    /// `up_proj`, `down_proj`.
    Qwen3,
    /// Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's names, Qwen2's attention, and a shared
    /// expert in each sparse layer.
    Qwen2,
    /// Mixtral: `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2`
    /// (down).
    Mixtral,
    /// gpt-oss: `mlp.router` (with a bias), the experts stacked with biases, stored [experts, in,
    /// out] with each expert's gate and up columns interleaved (or in MXFP4 blocks), a clamped
    /// SwiGLU; attention with biases and sinks.
    GptOss,
    /// Gemma 4 26B-A4B (`enable_moe_block`): every layer keeps its dense MLP and adds experts beside
    /// it (`experts.gate_up_proj`, `experts.down_proj`, stacked as Qwen3-MoE's), routed by a linear
    /// (`router.proj`) on the attention block's output normalised and scaled, each chosen weight
    /// then scaled by its expert's `router.per_expert_scale`.
    Gemma4,
}

impl MoeFamily {
    /// PEFT's map from the module names a family's v4 model had to the parameters transformers 5
    /// stacks them into (`_MOE_TARGET_MODULE_MAPPING`): the router's, then the experts' gate, up
    /// and down projections.
    pub fn peft_targets(self) -> [(&'static str, &'static str); 4] {
        let [gate, up, down] = self.projection_names();
        [
            ("gate", "gate.weight"),
            (gate, "gate_up_proj"),
            (up, "gate_up_proj"),
            (down, "down_proj"),
        ]
    }

    /// Whether PEFT converts the module names a v4 model had into this family's stacked parameters:
    /// transformers' `_MODEL_TO_CONVERSION_PATTERN` lists qwen3_moe and mixtral, not qwen2_moe
    /// itself, whose `all-linear` adapts the shared expert's linears by those names and leaves the
    /// routers and experts to a `target_parameters` that names them.
    pub fn peft_converts_targets(self) -> bool {
        !matches!(
            self,
            MoeFamily::Qwen2 | MoeFamily::GptOss | MoeFamily::Gemma4
        )
    }

    /// Gemma 4's experts add to the dense MLP's output, routed by a linear module of their own
    /// (`LinearKind::Router`), rather than take the MLP's place under a router parameter.
    pub fn beside_dense_mlp(self) -> bool {
        self == MoeFamily::Gemma4
    }

    /// The module holding a layer's stacked experts.
    pub fn experts_module(self) -> &'static str {
        match self {
            MoeFamily::Gemma4 => "experts",
            _ => "mlp.experts",
        }
    }

    /// A layer's stacked experts' parameter (`EXPERTS_GATE_UP` or `EXPERTS_DOWN`), inside the layer.
    pub fn stack(self, which: &str) -> String {
        let name = which.strip_prefix("experts.").expect("a stack's name");
        format!("{}.{name}", self.experts_module())
    }

    /// Whether each expert's projections and the router add biases (gpt-oss).
    pub fn biased(self) -> bool {
        self == MoeFamily::GptOss
    }

    /// The checkpoints' names of an expert's gate, up and down projections.
    pub fn projection_names(self) -> [&'static str; 3] {
        match self {
            // gpt-oss and Gemma 4 store no expert by itself.
            MoeFamily::Qwen3 | MoeFamily::Qwen2 | MoeFamily::GptOss | MoeFamily::Gemma4 => {
                ["gate_proj", "up_proj", "down_proj"]
            }
            MoeFamily::Mixtral => ["w1", "w3", "w2"],
        }
    }
}

/// A gpt-oss checkpoint's tensor as nibble names it: its router `mlp.router` is `mlp.gate`.
pub fn gpt_oss_name(name: &str) -> Option<String> {
    let (layer, rest) = name.split_once(".mlp.router.")?;
    Some(format!("{layer}.{ROUTER_MODULE}.{rest}"))
}

/// A Mixtral checkpoint's tensor as nibble names it (transformers 5's module names, the experts by
/// Qwen3-MoE's): `block_sparse_moe.gate` is `mlp.gate`, `block_sparse_moe.experts.{e}.w1` (w3, w2)
/// is `mlp.experts.{e}.gate_proj` (up_proj, down_proj).
pub fn mixtral_name(name: &str) -> Option<String> {
    let (layer, rest) = name.split_once("block_sparse_moe.")?;
    if rest == "gate.weight" {
        return Some(format!("{layer}{ROUTER_MODULE}.weight"));
    }
    let (expert, projection) = rest.strip_prefix("experts.")?.split_once('.')?;
    let [gate, up, down] = MoeFamily::Mixtral.projection_names();
    let ours = match projection.strip_suffix(".weight")? {
        p if p == gate => "gate_proj",
        p if p == up => "up_proj",
        p if p == down => "down_proj",
        _ => return None,
    };
    Some(format!("{layer}mlp.experts.{expert}.{ours}.weight"))
}

impl MoeConfig {
    pub fn shape(&self, hidden: usize) -> crate::ops::moe::MoeShape {
        crate::ops::moe::MoeShape {
            experts: self.experts,
            top_k: self.top_k,
            hidden,
            inter: self.inter,
            biased: self.family.biased(),
        }
    }
}

/// The module of a mixture-of-experts layer's router, and its experts' stacked weights (as
/// transformers holds them in memory and may save them: `gate_up_proj` [experts, 2·inter, hidden],
/// each expert's gate rows then its up rows; `down_proj` [experts, hidden, inter]).
pub const ROUTER_MODULE: &str = "mlp.gate";

/// gpt-oss's experts' biases ([experts, 2·inter] and [experts, hidden]; nibble holds each expert's
/// gate biases before its up biases, as its weights' rows) and its attention sinks ([heads]).
pub const EXPERTS_GATE_UP_BIAS: &str = "mlp.experts.gate_up_proj_bias";
pub const EXPERTS_DOWN_BIAS: &str = "mlp.experts.down_proj_bias";
pub const ATTENTION_SINKS: &str = "self_attn.sinks";

/// Whether a module path is a mixture-of-experts layer's router (`…layers.3.mlp.gate`), not a
/// shared expert's or a dense MLP's `gate_proj`.
pub fn is_router_path(path: &str) -> bool {
    path.strip_suffix(ROUTER_MODULE)
        .is_some_and(|layer| layer.ends_with('.'))
}

/// A parameter LoRA adapts by name (`ModelConfig::adaptable_parameters`): `experts` updates
/// ΔW_e = s·B_e·A_e, each [out, inp], of the experts stacked in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptableParameter {
    /// Its full name (`model.layers.3.mlp.experts.gate_up_proj`, `model.layers.3.mlp.gate.weight`).
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub experts: usize,
    /// gpt-oss's gate_up: PEFT's B rows interleave gate and up (`LoraPair::peft_interleaved`).
    pub peft_interleaved: bool,
}
/// The stacks' names as every family's end (`MoeFamily::stack` puts them in their module).
pub const EXPERTS_GATE_UP: &str = "experts.gate_up_proj";
pub const EXPERTS_DOWN: &str = "experts.down_proj";

/// Gemma 4's norms around its experts: of the dense MLP's output, the experts' output, and their
/// input.
pub const GEMMA4_EXPERT_NORMS: [&str; 3] = [
    "post_feedforward_layernorm_1",
    "post_feedforward_layernorm_2",
    "pre_feedforward_layernorm_2",
];

/// Gemma 4's per-layer inputs' model-level tensors (under the decoder's prefix).
pub const PER_LAYER_EMBEDDING: &str = "embed_tokens_per_layer.weight";
pub const PER_LAYER_MODEL_PROJECTION: &str = "per_layer_model_projection.weight";
pub const PER_LAYER_PROJECTION_NORM: &str = "per_layer_projection_norm.weight";

/// How one decoder layer attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerAttention {
    /// A query at position i sees only the keys at positions i - window + 1 ..= i (transformers'
    /// `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`); None: every earlier key.
    pub window: Option<usize>,
    /// Whether q and k are rotated (SmolLM3's NoPE layers are not).
    pub rope: bool,
    /// Whether the rotation uses `ModelConfig::local_rope_theta` (Gemma's sliding layers).
    pub local_rope: bool,
    /// The layer's head size and key/value heads (Gemma 4's full layers have their own).
    pub head_dim: usize,
    pub kv_heads: usize,
    /// The values are the keys' projection (Gemma 4's `attention_k_eq_v` full layers: no v_proj).
    pub values_from_keys: bool,
    /// The layer computes no keys or values of its own: it attends over those of this earlier layer
    /// (Gemma 4's `num_kv_shared_layers`: no k_proj, v_proj, k_norm).
    pub kv_from: Option<usize>,
}

/// Gemma 4 E2B/E4B's per-layer inputs: every token has a second embedding, a slice of `width` per
/// layer, mixed with a projection of its main embedding and added (gated) to each layer's output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerLayerInputs {
    /// `hidden_size_per_layer_input`.
    pub width: usize,
    /// `vocab_size_per_layer_input`: rows of `embed_tokens_per_layer`.
    pub vocab: usize,
    /// √width in the checkpoint's dtype, as transformers scales that embedding.
    pub token_scale: f32,
}

/// A decoder layer's linear layers: seven separate ones, or (Phi-3) q, k, v fused into `qkv_proj` and
/// gate and up into `gate_up_proj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    /// Rows q, then k, then v.
    Qkv,
    /// Rows gate, then up.
    GateUp,
    /// Gemma 4's per-layer inputs: the gate on the layer's output ([width, hidden]), and the
    /// projection of the gated input back to the hidden size ([hidden, width]).
    PerLayerGate,
    PerLayerProjection,
    /// Qwen2-MoE's shared expert, a gated MLP every token goes through beside its routed experts
    /// (`mlp.shared_expert.{gate,up,down}_proj`), and the gate scaling its output per token by
    /// sigmoid(`mlp.shared_expert_gate`·x) ([1, hidden]). Listed after the others: each kind's
    /// place is its LoRA dropout stream.
    SharedGate,
    SharedUp,
    SharedDown,
    SharedExpertGate,
    /// Gemma 4's router (`router.proj`, [experts, hidden]), a linear module beside the experts
    /// (`MoeFamily::beside_dense_mlp`); kept dense as every router is (`TensorRole::Router`).
    Router,
}

impl LinearKind {
    /// The linears of a layer with separate projections, in the order PEFT and nibble list them.
    pub const SEPARATE: [LinearKind; 7] = [
        LinearKind::Q,
        LinearKind::K,
        LinearKind::V,
        LinearKind::O,
        LinearKind::Gate,
        LinearKind::Up,
        LinearKind::Down,
    ];

    /// The linears of a layer with fused projections (Phi-3), in its module order.
    pub const FUSED: [LinearKind; 4] = [
        LinearKind::Qkv,
        LinearKind::O,
        LinearKind::GateUp,
        LinearKind::Down,
    ];

    /// A shared expert's linears in Qwen2-MoE's module order.
    pub const SHARED_EXPERT: [LinearKind; 4] = [
        LinearKind::SharedGate,
        LinearKind::SharedUp,
        LinearKind::SharedDown,
        LinearKind::SharedExpertGate,
    ];

    /// The module name PEFT uses in `target_modules`.
    pub fn module_name(self) -> &'static str {
        match self {
            LinearKind::Q => "q_proj",
            LinearKind::K => "k_proj",
            LinearKind::V => "v_proj",
            LinearKind::O => "o_proj",
            LinearKind::Gate | LinearKind::SharedGate => "gate_proj",
            LinearKind::Up | LinearKind::SharedUp => "up_proj",
            LinearKind::Down | LinearKind::SharedDown => "down_proj",
            LinearKind::SharedExpertGate => "shared_expert_gate",
            LinearKind::Router => "proj",
            LinearKind::Qkv => "qkv_proj",
            LinearKind::GateUp => "gate_up_proj",
            LinearKind::PerLayerGate => "per_layer_input_gate",
            LinearKind::PerLayerProjection => "per_layer_projection",
        }
    }

    /// The parent module inside a decoder layer (None: the layer itself).
    pub fn block(self) -> Option<&'static str> {
        match self {
            LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::O | LinearKind::Qkv => {
                Some("self_attn")
            }
            LinearKind::Gate
            | LinearKind::Up
            | LinearKind::Down
            | LinearKind::GateUp
            | LinearKind::SharedExpertGate => Some("mlp"),
            LinearKind::SharedGate | LinearKind::SharedUp | LinearKind::SharedDown => {
                Some("mlp.shared_expert")
            }
            LinearKind::PerLayerGate | LinearKind::PerLayerProjection => None,
            LinearKind::Router => Some("router"),
        }
    }
}

/// What a tensor is for; the loader decides from it how to store the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    Embedding,
    LmHead,
    /// A norm's scale vector.
    Norm,
    LinearWeight(LinearKind),
    LinearBias(LinearKind),
    /// A frozen matrix kept dense in its checkpoint dtype and read by rows or multiplied whole
    /// (Gemma 4's per-layer embedding and its projection).
    Table,
    /// A mixture-of-experts layer's router [experts, hidden]: a linear kept dense (its choices are
    /// what 4 bits would change most).
    Router,
    /// A mixture-of-experts layer's experts' projections, stacked ([experts · rows, cols], packed
    /// as a linear's weight): `EXPERTS_GATE_UP` or `EXPERTS_DOWN`.
    Experts,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
    /// Decoder layer index, if the tensor belongs to one.
    pub layer: Option<usize>,
}

/// How the weights of an FP8 checkpoint are read: each tensor stored in 8-bit floats has a scale tensor
/// beside it (`<module>.weight_scale_inv` in transformers' own FP8 format, `<module>.weight_scale` in
/// compressed-tensors'), and its values are code · scale. Activation scales are ignored: nibble
/// computes with the weights dequantized (and quantizes them to 4 bits itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Float8Scheme {
    /// `quant_method`, for messages.
    pub method: String,
    /// Rows x columns of a weight that one scale covers, where the config gives blocks (transformers'
    /// `weight_block_size`, compressed-tensors' `block_structure` or `group_size`); otherwise the scales'
    /// shape tells (one per tensor, or one per output row).
    pub block: Option<[usize; 2]>,
    /// compressed-tensors returns a weight in its scales' dtype (code · scale rounded to bfloat16 where
    /// the scales are bfloat16); transformers' FP8 reader keeps the float32 product.
    pub product_in_scale_dtype: bool,
}

impl Float8Scheme {
    /// Reads a `quantization_config`; anything but 8-bit float weights is refused, naming what it is.
    fn from_quantization_config(q: &Value) -> std::result::Result<Self, String> {
        let method = q
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("an unnamed method")
            .to_string();
        let refuse = |what: String| {
            format!(
                "this checkpoint is quantized ({what}); nibble reads F32, F16 and BF16 checkpoints and FP8 ones (quant_method `fp8`, or `compressed-tensors` in its float-quantized format) and quantizes them itself: use the unquantized (BF16) release"
            )
        };
        let block_of = |v: Option<&Value>,
                        key: &str|
         -> std::result::Result<Option<[usize; 2]>, String> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v
                    .as_array()
                    .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>())
                    // compressed-tensors also writes "128x128".
                    .or_else(|| {
                        let text = v.as_str()?;
                        Some(text.split('x').map(|d| d.trim().parse().ok()).collect())
                    }) {
                    Some(dims)
                        if dims.len() == 2 && dims.iter().all(|d| matches!(d, Some(1..))) =>
                    {
                        Ok(Some([dims[0].unwrap() as usize, dims[1].unwrap() as usize]))
                    }
                    _ => Err(format!(
                        "quantization_config: `{key}` should be two positive integers, found {v}"
                    )),
                },
            }
        };
        match method.as_str() {
            "fp8" => Ok(Float8Scheme {
                block: block_of(q.get("weight_block_size"), "weight_block_size")?,
                method,
                product_in_scale_dtype: false,
            }),
            "compressed-tensors" => {
                // Rotations applied while running (QuIP, SpinQuant) or sparse storage would make the
                // stored weights mean something else.
                if q.get("transform_config")
                    .is_some_and(|t| !t.is_null() && t.as_object().is_none_or(|o| !o.is_empty()))
                {
                    return Err(refuse(
                        "compressed-tensors with a `transform_config`: rotations applied while running"
                            .into(),
                    ));
                }
                let sparsity = q
                    .get("sparsity_config")
                    .filter(|c| c.as_object().is_some_and(|o| !o.is_empty()))
                    .map(|c| c.get("format").and_then(Value::as_str));
                if let Some(format) = sparsity.filter(|f| *f != Some("dense")) {
                    return Err(refuse(format!(
                        "compressed-tensors with sparsity_config format {}",
                        format.unwrap_or("(none)")
                    )));
                }
                let top_format = q.get("format").and_then(Value::as_str);
                let groups = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .filter(|g| !g.is_empty())
                    .ok_or_else(|| {
                        "quantization_config: compressed-tensors without `config_groups`"
                            .to_string()
                    })?;
                let mut block = None;
                for (name, group) in groups {
                    let format = group.get("format").and_then(Value::as_str).or(top_format);
                    let weights = group.get("weights").unwrap_or(&Value::Null);
                    let kind = weights.get("type").and_then(Value::as_str);
                    let bits = weights.get("num_bits").and_then(Value::as_u64);
                    // Weight-only FP8 is written as naive-quantized, stored the same way.
                    let stored_as_is =
                        matches!(format, Some("float-quantized" | "naive-quantized"));
                    if !stored_as_is || kind != Some("float") || bits != Some(8) {
                        return Err(refuse(format!(
                            "compressed-tensors, group `{name}`: format {}, weights of type {} in {} bits",
                            format.unwrap_or("(none)"),
                            kind.unwrap_or("(none)"),
                            bits.map_or("(unknown)".to_string(), |b| b.to_string())
                        )));
                    }
                    if weights.get("symmetric").and_then(Value::as_bool) == Some(false) {
                        return Err(refuse(format!(
                            "compressed-tensors, group `{name}`: asymmetric FP8 weights (zero points)"
                        )));
                    }
                    let strategy = weights.get("strategy").and_then(Value::as_str);
                    let this = match strategy {
                        Some("block") => {
                            block_of(weights.get("block_structure"), "block_structure")?
                        }
                        Some("group") => match weights.get("group_size").and_then(Value::as_u64) {
                            Some(g @ 1..) => Some([1, g as usize]),
                            _ => {
                                return Err(format!(
                                    "quantization_config: group `{name}` has strategy `group` but no positive `group_size`"
                                ));
                            }
                        },
                        None | Some("tensor" | "channel") => None,
                        Some(other) => {
                            return Err(refuse(format!(
                                "compressed-tensors, group `{name}`: weights with strategy `{other}`"
                            )));
                        }
                    };
                    // Groups scaled per tensor or row tell by their scales' shape; blocks must agree.
                    if let Some(this) = this {
                        if block.is_some_and(|b| b != this) {
                            return Err(format!(
                                "quantization_config: compressed-tensors groups with different blocks of scales are not supported (group `{name}`)"
                            ));
                        }
                        block = Some(this);
                    }
                }
                Ok(Float8Scheme {
                    method,
                    block,
                    product_in_scale_dtype: true,
                })
            }
            _ => Err(refuse(format!("quantization_config: {method}"))),
        }
    }
}

/// The largest width, count or vocabulary a config may give (16.7M: far beyond any released model, and
/// small enough that products of two stay exact in f64 and in u64).
const MAX_DIMENSION: usize = 1 << 24;

/// Ten trillion parameters: any config beyond it is corrupt.
const MAX_PARAMETERS: u64 = 10_000_000_000_000;

impl ModelConfig {
    /// The mixture-of-experts family, for a model whose MLPs route over experts.
    pub fn moe_family(&self) -> Option<MoeFamily> {
        self.moe.as_ref().map(|m| m.family)
    }

    /// Whether 4-bit groups of `group` weights tile every decoder linear's rows: the message names the
    /// first input width they do not divide and the group sizes that would work.
    pub fn check_group_size(&self, group: usize) -> std::result::Result<(), String> {
        // Every packed weight: the linears, and a mixture-of-experts layer's stacked experts.
        let packed: Vec<(String, usize)> = self
            .expected_tensors()
            .into_iter()
            .filter(|t| matches!(t.role, TensorRole::LinearWeight(_) | TensorRole::Experts))
            .map(|t| (t.name, t.shape[1]))
            .collect();
        let divides_all = |group: usize| packed.iter().all(|(_, cols)| cols.is_multiple_of(group));
        let Some((name, cols)) = packed.iter().find(|(_, cols)| !cols.is_multiple_of(group)) else {
            return Ok(());
        };
        // SmolLM2's widths (576, 960) are multiples of 64 but not of 128.
        let working: Vec<String> = crate::quant::GROUP_SIZES
            .into_iter()
            .filter(|&g| divides_all(g))
            .map(|g| g.to_string())
            .collect();
        let hint = match working.is_empty() {
            true => "no group size nibble supports divides every input dimension of this model"
                .to_string(),
            false => format!(
                "group sizes that work for this model: {}",
                working.join(", ")
            ),
        };
        Err(format!(
            "group size {group} does not divide the input dimension {cols} of `{name}` ({hint})"
        ))
    }

    /// The positions the model was trained to place: what training cuts sequences to and what decoding
    /// warns past. Linear position scaling stretches max_position_embeddings by its factor (configs
    /// differ on whether max_position_embeddings already counts it, so the larger reading is taken);
    /// YaRN's reach is its factor times the original length (Qwen3 keeps max_position_embeddings at
    /// 40,960 beside a factor of 4 over 32,768).
    pub fn trained_positions(&self) -> usize {
        let mpe = self.max_position_embeddings as f64;
        (match self.rope_scaling {
            RopeScaling::Linear { factor } if factor > 1.0 => mpe * factor,
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => mpe.max(factor * original_max_position_embeddings),
            _ => mpe,
        }) as usize
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// `origin` only names the file in error messages.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: origin.to_path_buf(),
            msg,
        };
        let mut raw: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        // Taken out of what a merged model or a quantized file carries on: their weights are not FP8.
        let quantization = raw
            .as_object_mut()
            .and_then(|obj| obj.remove("quantization_config"))
            .filter(|q| !q.is_null());
        // gpt-oss's experts in MXFP4 blocks, which the loader decodes (the rest is 16-bit).
        let mxfp4 = quantization
            .as_ref()
            .is_some_and(|q| q.get("quant_method").and_then(Value::as_str) == Some("mxfp4"));
        if mxfp4 && raw.get("model_type").and_then(Value::as_str) != Some(GPT_OSS) {
            return Err(err(
                "quantization_config: nibble reads MXFP4 weights in gpt-oss's experts only".into(),
            ));
        }
        let float8 = quantization
            .filter(|_| !mxfp4)
            .map(|q| Float8Scheme::from_quantization_config(&q))
            .transpose()
            .map_err(err)?;
        let mut config = Self::from_json_value(raw, origin)?;
        config.float8 = float8;
        Ok(config)
    }

    fn from_json_value(raw: Value, origin: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: origin.to_path_buf(),
            msg,
        };
        let obj = raw
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        let model_type = obj.get("model_type").and_then(Value::as_str);
        if let Some(wrapper) = model_type.and_then(Multimodal::from_model_type) {
            return Self::text_part_of(wrapper, obj, &raw, origin);
        }
        // The config classes' defaults, which released multimodal configs lean on.
        let with_defaults = model_type.and_then(|t| class_defaults(t, obj));
        let obj = with_defaults.as_ref().unwrap_or(obj);
        let fields = Fields { obj, err: &err };

        let class = obj
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str);
        // Qwen3-MoE is Qwen3's attention with experts for MLPs; Qwen2-MoE, Qwen2's; Mixtral,
        // Mistral's.
        let named =
            |t: &str, c: &str| model_type == Some(t) || (model_type.is_none() && class == Some(c));
        let moe = match () {
            _ if named(QWEN3_MOE, QWEN3_MOE_CLASS) => Some(MoeFamily::Qwen3),
            _ if named(QWEN2_MOE, QWEN2_MOE_CLASS) => Some(MoeFamily::Qwen2),
            _ if named(MIXTRAL, MIXTRAL_CLASS) => Some(MoeFamily::Mixtral),
            _ if named(GPT_OSS, GPT_OSS_CLASS) => Some(MoeFamily::GptOss),
            _ if named(Arch::Gemma4.model_type(), Arch::Gemma4.class_name())
                && fields.opt_bool("enable_moe_block")? == Some(true) =>
            {
                Some(MoeFamily::Gemma4)
            }
            _ => None,
        };
        let arch = match (model_type, class) {
            _ if moe == Some(MoeFamily::Qwen3) => Arch::Qwen3,
            _ if moe == Some(MoeFamily::Qwen2) => Arch::Qwen2,
            _ if moe == Some(MoeFamily::Mixtral) => Arch::Mistral,
            // gpt-oss's attention is Ministral's (sliding and full layers by `layer_types`) with
            // biases and sinks.
            _ if moe == Some(MoeFamily::GptOss) => Arch::Ministral,
            (Some(t), _) => Arch::from_model_type(t).ok_or_else(|| {
                Error::UnsupportedArchitecture(format!("{t} (in {})", origin.display()))
            })?,
            (None, Some(c)) => Arch::from_class_name(c).ok_or_else(|| {
                Error::UnsupportedArchitecture(format!("{c} (in {})", origin.display()))
            })?,
            (None, None) => {
                return Err(err("neither `model_type` nor `architectures` is set".into()));
            }
        };

        let gate_activation = match arch {
            // Its experts' own, whatever `hidden_act` says (transformers does not read it there).
            _ if moe == Some(MoeFamily::GptOss) => {
                let constant = |name: &str, default: f64| -> Result<f32> {
                    match fields.opt_f64(name)?.unwrap_or(default) {
                        v if v > 0.0 && v.is_finite() => Ok(v as f32),
                        v => Err(err(format!("`{name}` must be positive, got {v}"))),
                    }
                };
                GateActivation::ClampedSwiglu {
                    alpha: constant("swiglu_alpha", 1.702)?,
                    limit: constant("swiglu_limit", 7.0)?,
                }
            }
            Arch::Gemma3 | Arch::Gemma4 => match fields.opt_str("hidden_activation")? {
                None | Some("gelu_pytorch_tanh") => GateActivation::GeluTanh,
                Some(other) => {
                    return Err(err(format!(
                        "hidden_activation `{other}` is not supported (nibble implements gelu_pytorch_tanh for Gemma)"
                    )));
                }
            },
            _ => match fields.opt_str("hidden_act")?.unwrap_or("silu") {
                "silu" => GateActivation::Silu,
                other => {
                    return Err(err(format!(
                        "hidden_act `{other}` is not supported (nibble implements the SwiGLU MLP with silu)"
                    )));
                }
            },
        };
        // Gemma 3's model never reads attn_logit_softcapping; its causal LM caps the logits where
        // final_logit_softcapping is set.
        let final_logit_softcapping = match arch {
            Arch::Gemma3 | Arch::Gemma4 => match fields.opt_f64("final_logit_softcapping")? {
                Some(cap) if !(cap > 0.0 && cap.is_finite()) => {
                    return Err(err(format!(
                        "`final_logit_softcapping` must be positive, got {cap}"
                    )));
                }
                cap => cap.map(|c| c as f32),
            },
            _ => None,
        };
        if arch == Arch::Gemma3 && fields.opt_bool("use_bidirectional_attention")? == Some(true) {
            return Err(err(
                "use_bidirectional_attention (EmbeddingGemma) is not supported: nibble trains causal decoders".into(),
            ));
        }
        if arch == Arch::Gemma4 {
            refuse_gemma4_parts(&fields)?;
        }
        let hidden_size = fields.usize("hidden_size")?;
        if hidden_size == 0 {
            return Err(err("`hidden_size` must be positive".into()));
        }
        let num_heads = fields.usize("num_attention_heads")?;
        if num_heads == 0 {
            return Err(err("`num_attention_heads` must be positive".into()));
        }
        let num_kv_heads = fields
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_heads);
        let head_dim = match fields.opt_usize("head_dim")? {
            Some(d) => d,
            // Gemma3TextConfig's default.
            None if arch.is_gemma() => 256,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }

        let attention_bias = fields.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            // gpt-oss reads `attention_bias` (on by default) for all four.
            _ if moe == Some(MoeFamily::GptOss) => {
                let bias = fields.opt_bool("attention_bias")?.unwrap_or(true);
                (bias, bias)
            }
            // transformers' Qwen2Attention hard-codes bias=True for q/k/v and False for o;
            // Qwen2-MoE's reads `qkv_bias` (on by default).
            Arch::Qwen2 => match moe {
                Some(_) => (fields.opt_bool("qkv_bias")?.unwrap_or(true), false),
                None => (true, false),
            },
            // Mistral's, Ministral's and Phi-3's attention never has biases; `attention_bias` is not
            // read there.
            Arch::Mistral | Arch::Ministral | Arch::Ministral3 | Arch::Phi3 => (false, false),
            Arch::Qwen3 | Arch::Llama | Arch::SmolLM3 | Arch::Gemma3 | Arch::Gemma4 => {
                (attention_bias, attention_bias)
            }
        };
        // Only Llama's and SmolLM3's MLPs read `mlp_bias`; the others hard-code bias=False.
        let mlp_bias = match arch {
            Arch::Llama | Arch::SmolLM3 => fields.opt_bool("mlp_bias")?.unwrap_or(false),
            Arch::Qwen2
            | Arch::Qwen3
            | Arch::Mistral
            | Arch::Ministral
            | Arch::Ministral3
            | Arch::Phi3
            | Arch::Gemma3
            | Arch::Gemma4 => false,
        };

        // Gemma 3 nests RoPE per layer type (transformers 5) or names the sliding layers' base
        // `rope_local_base_freq` (4.x); its global layers' settings parse as any family's.
        let (rope_fields, local_rope_theta) = gemma_rope_fields(&fields, arch)?;
        let (rope_theta, rope_scaling, rotary_factor) = parse_rope(
            &Fields {
                obj: &rope_fields,
                err: &err,
            },
            arch,
        )?;
        // Values that would leave every loss NaN at the first step rather than fail here.
        let rms_norm_eps = fields.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let bad = if !(rms_norm_eps >= 0.0 && rms_norm_eps.is_finite()) {
            Some(("rms_norm_eps", rms_norm_eps, "0 or more"))
        } else if !positive(rope_theta) {
            Some(("rope_theta", rope_theta, "positive"))
        } else if let Some(theta) = local_rope_theta.filter(|&t| !positive(t)) {
            Some(("the sliding layers' rope_theta", theta, "positive"))
        } else {
            match rope_scaling {
                RopeScaling::Linear { factor } if !positive(factor) => {
                    Some(("the linear rope scaling's factor", factor, "positive"))
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } => [
                    ("factor", factor),
                    ("low_freq_factor", low_freq_factor),
                    ("high_freq_factor", high_freq_factor),
                ]
                .into_iter()
                .find(|&(_, v)| !positive(v))
                .map(|(name, v)| (name, v, "positive (in the llama3 rope scaling)")),
                _ => None,
            }
        };
        if let Some((name, value, want)) = bad {
            return Err(err(format!("`{name}` must be {want}, got {value}")));
        }
        // transformers' `int(head_dim * partial_rotary_factor)`.
        let rotary_dim = (head_dim as f64 * rotary_factor) as usize;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(err(format!(
                "partial_rotary_factor {rotary_factor} rotates {rotary_dim} of {head_dim} channels per head; RoPE needs an even number from 2 to head_dim"
            )));
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &rope_scaling
        {
            for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if list.len() != rotary_dim / 2 {
                    return Err(err(format!(
                        "longrope `{name}` has {} entries; the rotated width {rotary_dim} needs {}",
                        list.len(),
                        rotary_dim / 2
                    )));
                }
            }
        }
        let query_position_scale = match arch {
            Arch::Ministral3 => Some(parse_query_position_scale(&fields, &rope_scaling)?),
            _ => None,
        };
        let num_layers = fields.usize("num_hidden_layers")?;
        let dtype = match fields.opt_str("dtype")? {
            Some(d) => Some(d.to_string()),
            None => fields.opt_str("torch_dtype")?.map(str::to_string),
        };

        let mut config = ModelConfig {
            arch,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: fields.usize("vocab_size")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            rotary_dim,
            max_position_embeddings: fields.opt_usize("max_position_embeddings")?.unwrap_or(
                match arch {
                    Arch::Gemma3 | Arch::Gemma4 => 131072,
                    Arch::Phi3 => 4096,
                    _ => 32768,
                },
            ),
            // transformers' configs default to untied embeddings, except SmolLM3's and Gemma's.
            tie_word_embeddings: fields
                .opt_bool("tie_word_embeddings")?
                .unwrap_or(matches!(arch, Arch::SmolLM3) || arch.is_gemma()),
            qkv_bias,
            o_bias,
            mlp_bias,
            attention_sinks: moe == Some(MoeFamily::GptOss),
            qk_norm: arch == Arch::Qwen3 || arch.is_gemma(),
            value_norm: arch == Arch::Gemma4,
            layer_scalars: arch == Arch::Gemma4,
            fused_projections: arch == Arch::Phi3,
            norm_offset: if arch == Arch::Gemma3 { 1.0 } else { 0.0 },
            sandwich_norms: arch.is_gemma(),
            // √hidden in the checkpoint's dtype, as transformers multiplies a 16-bit model's embeddings
            // by `embed_scale.to(weight.dtype)` (50.5, not 50.596, for Gemma 3 4B in bf16) and
            // Google's reference does the same; f32 for an f32 checkpoint.
            embed_scale: match arch {
                Arch::Gemma3 | Arch::Gemma4 => sqrt_in_dtype(hidden_size, dtype.as_deref()),
                _ => 1.0,
            },
            gate_activation,
            attention_scale: match arch {
                Arch::Gemma3 => {
                    let scalar = fields.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
                    if scalar <= 0.0 || !scalar.is_finite() {
                        return Err(err(format!(
                            "`query_pre_attn_scalar` must be positive, got {scalar}"
                        )));
                    }
                    scalar.powf(-0.5)
                }
                // Gemma 4 scales no scores: its q and k norms set their size.
                Arch::Gemma4 => 1.0,
                _ => (head_dim as f64).powf(-0.5),
            },
            local_rope_theta,
            final_logit_softcapping,
            multimodal: None,
            query_position_scale,
            // Read once the layer count is known to be sane (below).
            layers: Vec::new(),
            per_layer_inputs: None,
            double_wide_shared_mlp: false,
            moe: None,
            dtype,
            float8: None,
            raw: raw.clone(),
        };
        for (name, value) in [
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_layers),
            ("vocab_size", config.vocab_size),
            ("num_attention_heads", config.num_heads),
            ("head_dim", config.head_dim),
            ("max_position_embeddings", config.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(err(format!("`{name}` must be positive")));
            }
            // One position holds no token to predict from the one before it.
            if name == "max_position_embeddings" && value < 2 {
                return Err(err(format!(
                    "`{name}` is {value}: a model places at least 2 positions"
                )));
            }
            if value > MAX_DIMENSION {
                return Err(err(format!(
                    "`{name}` is {value}, beyond any model nibble can hold (at most {MAX_DIMENSION})"
                )));
            }
        }
        // Sizes whose products would wrap (or ask for more memory than any machine has) are refused
        // here rather than failing an allocation later.
        let params = config
            .checked_parameter_count()
            .filter(|&p| p <= MAX_PARAMETERS);
        if params.is_none() {
            return Err(err(format!(
                "these sizes describe more than {MAX_PARAMETERS} parameters, beyond any model nibble can hold"
            )));
        }
        config.layers = parse_layer_attention(&fields, arch, num_layers)?;
        for layer in &mut config.layers {
            (layer.head_dim, layer.kv_heads) = (head_dim, num_kv_heads);
        }
        if arch == Arch::Gemma4 {
            gemma4_full_layer_heads(&fields, &mut config)?;
            gemma4_small_model_parts(&fields, &mut config)?;
        }
        if let Some(family) = moe {
            config.moe = Some(parse_moe(&fields, num_layers, family)?);
        }
        Ok(config)
    }

    /// The text decoder of a multimodal model (`text_config`, its modules under
    /// `model.language_model.`); the embeddings' tying and the dtype are the outer config's.
    fn text_part_of(
        wrapper: Multimodal,
        obj: &Map<String, Value>,
        raw: &Value,
        origin: &Path,
    ) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: origin.to_path_buf(),
            msg,
        };
        let name = wrapper.model_type();
        let text = obj
            .get("text_config")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                err(format!(
                    "a multimodal {name} config needs a `text_config` object"
                ))
            })?;
        let mut text = text.clone();
        match wrapper {
            // Gemma3Config builds a Gemma3TextConfig whatever text_config's own model_type says.
            Multimodal::Gemma3 => {
                text.insert("model_type".into(), "gemma3_text".into());
            }
            Multimodal::Gemma4 => {
                text.insert("model_type".into(), "gemma4_text".into());
            }
            // Mistral3Config resolves text_config by its model_type, "mistral" when it gives none.
            Multimodal::Mistral3 => {
                let inner = text
                    .get("model_type")
                    .and_then(Value::as_str)
                    .unwrap_or("mistral");
                if !matches!(inner, "mistral" | "ministral3") {
                    return Err(err(format!(
                        "a mistral3 text_config of model_type `{inner}` is not supported (nibble reads mistral and ministral3 there)"
                    )));
                }
                text.insert("model_type".into(), inner.into());
            }
        }
        // Both wrappers tie by their own flag, true by default, whatever text_config says.
        let tied = obj
            .get("tie_word_embeddings")
            .cloned()
            .unwrap_or(true.into());
        text.insert("tie_word_embeddings".into(), tied);
        for key in ["dtype", "torch_dtype"] {
            if let Some(v) = obj.get(key) {
                text.entry(key).or_insert(v.clone());
            }
        }
        let mut config = Self::from_json_str(&Value::Object(text).to_string(), origin)?;
        config.multimodal = Some(wrapper);
        // Gemma3ForConditionalGeneration's head never caps its logits, whatever text_config says
        // (Gemma 4's does).
        if wrapper == Multimodal::Gemma3 {
            config.final_logit_softcapping = None;
        }
        config.raw = raw.clone();
        Ok(config)
    }

    /// The parameter count, or None where it does not fit in a u64.
    fn checked_parameter_count(&self) -> Option<u64> {
        let n = |v: usize| v as u64;
        let (h, i, v) = (
            n(self.hidden_size),
            n(self.intermediate_size),
            n(self.vocab_size),
        );
        let (q, kv) = (
            n(self.num_heads).checked_mul(n(self.head_dim))?,
            n(self.num_kv_heads).checked_mul(n(self.head_dim))?,
        );
        let attention = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = h.checked_mul(i)?.checked_mul(3)?;
        let layers = n(self.num_layers).checked_mul(attention.checked_add(mlp)?)?;
        layers.checked_add(v.checked_mul(h)?.checked_mul(2)?)
    }

    /// Which layers slide and which skip RoPE, in words ("" when every layer attends fully with
    /// RoPE): `nibble info`.
    pub fn layer_attention_summary(&self) -> String {
        let layers_where = |pick: &dyn Fn(&LayerAttention) -> bool| -> String {
            let layers: Vec<usize> = (0..self.num_layers)
                .filter(|&l| pick(&self.layers[l]))
                .collect();
            if layers.len() == self.num_layers {
                "all layers".to_string()
            } else {
                format!("layers {layers:?}")
            }
        };
        let mut parts = Vec::new();
        if let Some(window) = self.layers.iter().find_map(|l| l.window) {
            parts.push(format!(
                "sliding window {window} in {}",
                layers_where(&|l| l.window.is_some())
            ));
        }
        if self.layers.iter().any(|l| !l.rope) {
            parts.push(format!("no RoPE in {}", layers_where(&|l| !l.rope)));
        }
        parts.join("; ")
    }

    /// The width of layer `l`'s queries (and of its attention's output).
    pub fn q_dim(&self, l: usize) -> usize {
        self.num_heads * self.layers[l].head_dim
    }

    /// The width of layer `l`'s keys and values.
    pub fn kv_dim(&self, l: usize) -> usize {
        self.layers[l].kv_heads * self.layers[l].head_dim
    }

    /// The model class transformers builds for this folder.
    pub fn class_name(&self) -> &'static str {
        match (self.multimodal, self.moe.as_ref().map(|m| m.family)) {
            (Some(wrapper), _) => wrapper.class_name(),
            (None, Some(MoeFamily::Qwen3)) => QWEN3_MOE_CLASS,
            (None, Some(MoeFamily::Qwen2)) => QWEN2_MOE_CLASS,
            (None, Some(MoeFamily::Mixtral)) => MIXTRAL_CLASS,
            (None, Some(MoeFamily::GptOss)) => GPT_OSS_CLASS,
            (None, None | Some(MoeFamily::Gemma4)) => self.arch.class_name(),
        }
    }

    /// The decoder's `model_type` (its own where it has experts: `qwen3_moe`, `gpt_oss`).
    pub fn model_type(&self) -> &'static str {
        match self.moe.as_ref().map(|m| m.family) {
            Some(MoeFamily::Qwen3) => QWEN3_MOE,
            Some(MoeFamily::Qwen2) => QWEN2_MOE,
            Some(MoeFamily::Mixtral) => MIXTRAL,
            Some(MoeFamily::GptOss) => GPT_OSS,
            None | Some(MoeFamily::Gemma4) => self.arch.model_type(),
        }
    }

    /// The prefix of the decoder's modules: `model.`, or `model.language_model.` in a multimodal model.
    pub fn prefix(&self) -> &'static str {
        match self.multimodal {
            Some(_) => "model.language_model.",
            None => "model.",
        }
    }

    /// The full name of the decoder's tensor `name` (`embed_tokens.weight`, `norm.weight`).
    pub fn tensor(&self, name: &str) -> String {
        format!("{}{name}", self.prefix())
    }

    /// The embedding's module path (`model.embed_tokens`), under which an adapter keeps the rows of
    /// it that it trains.
    pub fn embedding_module(&self) -> String {
        self.tensor("embed_tokens")
    }

    /// The modules whose token rows `--trainable-tokens` trains: the embedding, and an untied
    /// model's output projection (a tied one's reads the embedding's rows).
    pub fn token_row_modules(&self) -> Vec<String> {
        let mut modules = vec![self.embedding_module()];
        if !self.tie_word_embeddings {
            modules.push(OUTPUT_MODULE.to_string());
        }
        modules
    }

    /// The tensor holding the table whose token rows an adapter trains under module `path`: the
    /// embedding's (which a tied model's output projection shares), or an untied model's output
    /// projection's; None for any other module.
    pub fn token_rows_table(&self, path: &str) -> Option<String> {
        if path == self.embedding_module() {
            Some(self.tensor("embed_tokens.weight"))
        } else {
            (path == OUTPUT_MODULE && !self.tie_word_embeddings).then(|| format!("{path}.weight"))
        }
    }

    /// The module path of layer `l`'s module `name` (`input_layernorm`, `self_attn.q_norm`).
    pub fn layer_module(&self, l: usize, name: &str) -> String {
        format!("{}layers.{l}.{name}", self.prefix())
    }

    /// The module path of a linear in layer `l` (append `.weight` or `.bias`).
    pub fn linear_path(&self, kind: LinearKind, l: usize) -> String {
        match kind.block() {
            Some(block) => self.layer_module(l, &format!("{block}.{}", kind.module_name())),
            None => self.layer_module(l, kind.module_name()),
        }
    }

    /// Every linear layer of the decoder that LoRA may adapt: module path, out and in features, in the
    /// model's order (layer by layer, PEFT's module order within a layer).
    pub fn linear_modules(&self) -> Vec<(String, usize, usize)> {
        (0..self.num_layers)
            .flat_map(|l| {
                self.layer_linears(l).into_iter().map(move |kind| {
                    let (out, inp) = self.linear_shape(kind, l);
                    (self.linear_path(kind, l), out, inp)
                })
            })
            .collect()
    }

    /// The parameters PEFT adapts by name (`target_parameters`) rather than as linear modules: each
    /// sparse layer's router weight and its stacked experts' two projections, in module order, as
    /// (the parameter's name, out, in per expert, experts; the router counts as one expert).
    pub fn adaptable_parameters(&self) -> Vec<AdaptableParameter> {
        let Some(m) = &self.moe else {
            return Vec::new();
        };
        let h = self.hidden_size;
        let gpt_oss = m.family == MoeFamily::GptOss;
        (0..self.num_layers)
            .filter(|&l| self.is_sparse(l))
            .flat_map(|l| {
                [
                    (format!("{ROUTER_MODULE}.weight"), m.experts, h, 1),
                    (m.family.stack(EXPERTS_GATE_UP), 2 * m.inter, h, m.experts),
                    (m.family.stack(EXPERTS_DOWN), h, m.inter, m.experts),
                ]
                .map(|(name, out, inp, experts)| AdaptableParameter {
                    name: self.layer_module(l, &name),
                    out,
                    inp,
                    experts,
                    peft_interleaved: gpt_oss && name.ends_with(EXPERTS_GATE_UP),
                })
            })
            // gpt-oss's router (`mlp.router`, which nibble names `mlp.gate`) is left out: PEFT
            // would look for it by its own name; Gemma 4's is a linear module.
            .filter(|p| !((gpt_oss || m.family.beside_dense_mlp()) && p.experts == 1))
            .collect()
    }

    /// (out_features, in_features) of a linear of layer `l`.
    pub fn linear_shape(&self, kind: LinearKind, l: usize) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.mlp_width(l));
        let per_layer = self.per_layer_inputs.map_or(0, |p| p.width);
        let (q, kv) = (self.q_dim(l), self.kv_dim(l));
        match kind {
            LinearKind::Q => (q, h),
            LinearKind::K | LinearKind::V => (kv, h),
            LinearKind::O => (h, q),
            LinearKind::Gate | LinearKind::Up => (i, h),
            LinearKind::Down => (h, i),
            LinearKind::Qkv => (q + 2 * kv, h),
            LinearKind::GateUp => (2 * i, h),
            LinearKind::PerLayerGate => (per_layer, h),
            LinearKind::PerLayerProjection => (h, per_layer),
            LinearKind::SharedGate | LinearKind::SharedUp => (self.shared_expert_width(), h),
            LinearKind::SharedDown => (h, self.shared_expert_width()),
            LinearKind::SharedExpertGate => (1, h),
            LinearKind::Router => (self.moe.as_ref().map_or(0, |m| m.experts), h),
        }
    }

    /// The width of the shared expert beside each sparse layer's routed ones (0: none).
    pub fn shared_expert_width(&self) -> usize {
        self.moe.as_ref().map_or(0, |m| m.shared_expert)
    }

    /// The width of layer `l`'s MLP.
    pub fn mlp_width(&self, l: usize) -> usize {
        match self.double_wide_shared_mlp && self.layers[l].kv_from.is_some() {
            true => 2 * self.intermediate_size,
            false => self.intermediate_size,
        }
    }

    /// The linears layer `l` has, in module order: `linear_kinds` and the per-layer input's two,
    /// less v_proj where the values are the keys' projection and k_proj and v_proj where the layer
    /// shares another's (Gemma 4).
    pub fn layer_linears(&self, l: usize) -> Vec<LinearKind> {
        let layer = self.layers[l];
        let per_layer: &[LinearKind] = match self.per_layer_inputs {
            Some(_) => &[LinearKind::PerLayerGate, LinearKind::PerLayerProjection],
            None => &[],
        };
        self.linear_kinds()
            .iter()
            .chain(per_layer)
            .copied()
            .filter(|&kind| !(layer.values_from_keys && kind == LinearKind::V))
            .filter(|&kind| {
                !(layer.kv_from.is_some() && matches!(kind, LinearKind::K | LinearKind::V))
            })
            .filter(|&kind| !(self.experts_replace_mlp(l) && kind.block() == Some("mlp")))
            .chain(
                match self.is_sparse(l) && self.shared_expert_width() > 0 {
                    true => &LinearKind::SHARED_EXPERT[..],
                    false => &[],
                }
                .iter()
                .copied(),
            )
            .chain(self.experts_beside_mlp(l).then_some(LinearKind::Router))
            .collect()
    }

    /// Whether layer `l`'s MLP is a router over experts.
    pub fn is_sparse(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.sparse[l])
    }

    /// Whether layer `l`'s experts take its dense MLP's place.
    pub fn experts_replace_mlp(&self, l: usize) -> bool {
        self.is_sparse(l) && !self.experts_beside_mlp(l)
    }

    /// Whether layer `l`'s experts add to its dense MLP's output (Gemma 4).
    pub fn experts_beside_mlp(&self, l: usize) -> bool {
        self.is_sparse(l)
            && self
                .moe
                .as_ref()
                .is_some_and(|m| m.family.beside_dense_mlp())
    }

    /// Layer `l`'s stack of experts `which` (`EXPERTS_GATE_UP`, `EXPERTS_DOWN`): its full name.
    pub fn experts_stack(&self, l: usize, which: &str) -> String {
        let m = self.moe.as_ref().expect("a model with experts");
        self.layer_module(l, &m.family.stack(which))
    }

    pub fn linear_has_bias(&self, kind: LinearKind) -> bool {
        match kind {
            LinearKind::Q | LinearKind::K | LinearKind::V | LinearKind::Qkv => self.qkv_bias,
            LinearKind::O => self.o_bias,
            LinearKind::PerLayerGate | LinearKind::PerLayerProjection => false,
            LinearKind::SharedGate
            | LinearKind::SharedUp
            | LinearKind::SharedDown
            | LinearKind::SharedExpertGate
            | LinearKind::Router => false,
            LinearKind::Gate | LinearKind::Up | LinearKind::Down | LinearKind::GateUp => {
                self.mlp_bias
            }
        }
    }

    /// The linears of each decoder layer, in module order.
    pub fn linear_kinds(&self) -> &'static [LinearKind] {
        match self.fused_projections {
            true => &LinearKind::FUSED,
            false => &LinearKind::SEPARATE,
        }
    }

    /// Every tensor a checkpoint of this config must hold, with its shape: the single source of truth
    /// for loading, validation and parameter counts.
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let h = self.hidden_size;
        let mut out = vec![ExpectedTensor {
            name: self.tensor("embed_tokens.weight"),
            shape: vec![self.vocab_size, h],
            role: TensorRole::Embedding,
            layer: None,
        }];
        for l in 0..self.num_layers {
            let norm = |name: String, size: usize| ExpectedTensor {
                name,
                shape: vec![size],
                role: TensorRole::Norm,
                layer: Some(l),
            };
            let weight = |module: &str| format!("{}.weight", self.layer_module(l, module));
            out.push(norm(weight("input_layernorm"), h));
            out.push(norm(weight("post_attention_layernorm"), h));
            if self.sandwich_norms {
                for name in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
                    out.push(norm(weight(name), h));
                }
            }
            if self.qk_norm {
                let head_dim = self.layers[l].head_dim;
                out.push(norm(weight("self_attn.q_norm"), head_dim));
                if self.layers[l].kv_from.is_none() {
                    out.push(norm(weight("self_attn.k_norm"), head_dim));
                }
            }
            if self.per_layer_inputs.is_some() {
                out.push(norm(weight("post_per_layer_input_norm"), h));
            }
            if self.layer_scalars {
                out.push(norm(self.layer_module(l, "layer_scalar"), 1));
            }
            if self.attention_sinks {
                out.push(norm(self.layer_module(l, ATTENTION_SINKS), self.num_heads));
            }
            if let (Some(m), true) = (&self.moe, self.is_sparse(l)) {
                let tensor = |module: &str, shape: Vec<usize>, role| ExpectedTensor {
                    name: self.layer_module(l, module),
                    shape,
                    role,
                    layer: Some(l),
                };
                // Gemma 4's router is a linear among the layer's (`LinearKind::Router`).
                if !m.family.beside_dense_mlp() {
                    out.push(tensor(
                        &format!("{ROUTER_MODULE}.weight"),
                        vec![m.experts, h],
                        TensorRole::Router,
                    ));
                }
                out.extend([
                    tensor(
                        &m.family.stack(EXPERTS_GATE_UP),
                        vec![m.experts * 2 * m.inter, h],
                        TensorRole::Experts,
                    ),
                    tensor(
                        &m.family.stack(EXPERTS_DOWN),
                        vec![m.experts * h, m.inter],
                        TensorRole::Experts,
                    ),
                ]);
                if m.family.beside_dense_mlp() {
                    out.extend([
                        tensor("router.scale", vec![h], TensorRole::Norm),
                        tensor("router.per_expert_scale", vec![m.experts], TensorRole::Norm),
                    ]);
                    for name in GEMMA4_EXPERT_NORMS {
                        out.push(norm(weight(name), h));
                    }
                }
                // gpt-oss's biases, vectors as the norms' are.
                if m.family.biased() {
                    out.extend([
                        tensor(
                            &format!("{ROUTER_MODULE}.bias"),
                            vec![m.experts],
                            TensorRole::Norm,
                        ),
                        tensor(
                            EXPERTS_GATE_UP_BIAS,
                            vec![m.experts, 2 * m.inter],
                            TensorRole::Norm,
                        ),
                        tensor(EXPERTS_DOWN_BIAS, vec![m.experts, h], TensorRole::Norm),
                    ]);
                }
            }
            for kind in self.layer_linears(l) {
                let (o, i) = self.linear_shape(kind, l);
                let role = match kind {
                    LinearKind::Router => TensorRole::Router,
                    _ => TensorRole::LinearWeight(kind),
                };
                out.push(ExpectedTensor {
                    name: format!("{}.weight", self.linear_path(kind, l)),
                    shape: vec![o, i],
                    role,
                    layer: Some(l),
                });
                if self.linear_has_bias(kind) {
                    out.push(ExpectedTensor {
                        name: format!("{}.bias", self.linear_path(kind, l)),
                        shape: vec![o],
                        role: TensorRole::LinearBias(kind),
                        layer: Some(l),
                    });
                }
            }
        }
        out.push(ExpectedTensor {
            name: self.tensor("norm.weight"),
            shape: vec![h],
            role: TensorRole::Norm,
            layer: None,
        });
        if let Some(p) = self.per_layer_inputs {
            let all_layers = self.num_layers * p.width;
            let model_tensor = |name: &str, shape: Vec<usize>, role| ExpectedTensor {
                name: self.tensor(name),
                shape,
                role,
                layer: None,
            };
            out.extend([
                model_tensor(
                    PER_LAYER_EMBEDDING,
                    vec![p.vocab, all_layers],
                    TensorRole::Table,
                ),
                model_tensor(
                    PER_LAYER_MODEL_PROJECTION,
                    vec![all_layers, h],
                    TensorRole::Table,
                ),
                model_tensor(PER_LAYER_PROJECTION_NORM, vec![p.width], TensorRole::Norm),
            ]);
        }
        if !self.tie_word_embeddings {
            out.push(ExpectedTensor {
                name: "lm_head.weight".into(),
                shape: vec![self.vocab_size, h],
                role: TensorRole::LmHead,
                layer: None,
            });
        }
        out
    }

    /// Exact parameter count (tied embeddings counted once, as transformers' `num_parameters()` does).
    pub fn parameter_count(&self) -> u64 {
        self.expected_tensors()
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }
}

/// Each layer's attention as transformers' config classes of 5.24 resolve it: which layers slide (the
/// config's `layer_types`, or the family's default), the window, and SmolLM3's layers without RoPE.
fn parse_layer_attention(
    fields: &Fields,
    arch: Arch,
    num_layers: usize,
) -> Result<Vec<LayerAttention>> {
    let err = fields.err;
    let use_sliding = fields.opt_bool("use_sliding_window")?.unwrap_or(false);
    // A present `null` turns the window off; an absent key is 4096 in Mistral's, Ministral's,
    // Qwen2's and Qwen3's config classes (which still need use_sliding_window), none in SmolLM3's.
    let given_window = match fields.obj.get("sliding_window") {
        None => match arch {
            Arch::Mistral | Arch::Ministral | Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => {
                Some(4096)
            }
            Arch::Gemma4 => Some(512),
            Arch::Llama | Arch::SmolLM3 | Arch::Phi3 | Arch::Ministral3 => None,
        },
        Some(_) => fields.opt_usize("sliding_window")?,
    };
    let window = match arch {
        Arch::Llama => None,
        // Phi-3's model slides every layer whenever the config sets a window.
        Arch::Mistral
        | Arch::Ministral
        | Arch::Ministral3
        | Arch::Phi3
        | Arch::Gemma3
        | Arch::Gemma4 => given_window,
        Arch::Qwen2 | Arch::Qwen3 | Arch::SmolLM3 => given_window.filter(|_| use_sliding),
    };
    if window == Some(0) {
        return Err(err("`sliding_window` must be positive".into()));
    }
    let rope: Vec<bool> = match (arch, fields.get("no_rope_layers")) {
        (Arch::SmolLM3, Some(flags)) => {
            per_layer(fields, "no_rope_layers", flags, num_layers, |f| {
                match f.as_u64() {
                    Some(0) => Ok(false),
                    Some(1) => Ok(true),
                    _ => Err(format!("holds 1 (RoPE) or 0 (none) per layer, got {f}")),
                }
            })?
        }
        (Arch::SmolLM3, None) => {
            let interval = fields.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
            if interval == 0 {
                return Err(err("`no_rope_layer_interval` must be positive".into()));
            }
            (0..num_layers).map(|l| (l + 1) % interval != 0).collect()
        }
        _ => vec![true; num_layers],
    };
    let sliding: Vec<bool> = match fields.get("layer_types") {
        // Mistral's attention reads the window alone (transformers warns about layer_types there).
        Some(types)
            if !matches!(
                arch,
                Arch::Mistral | Arch::Ministral3 | Arch::Llama | Arch::Phi3
            ) =>
        {
            per_layer(fields, "layer_types", types, num_layers, |t| {
                match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(format!(
                        "entry {t} is not supported (nibble implements full_attention and sliding_attention)"
                    )),
                }
            })?
        }
        _ => match arch {
            Arch::Qwen2 | Arch::Qwen3 => {
                let first = fields.opt_usize("max_window_layers")?.unwrap_or(28);
                (0..num_layers).map(|l| l >= first).collect()
            }
            Arch::SmolLM3 => rope.iter().map(|&r| !r).collect(),
            Arch::Mistral | Arch::Ministral | Arch::Ministral3 | Arch::Phi3 => {
                vec![true; num_layers]
            }
            // Every `sliding_window_pattern`-th layer attends fully.
            Arch::Gemma3 => {
                let pattern = match fields.opt_usize("sliding_window_pattern")? {
                    Some(p) => p,
                    None => fields.opt_usize("_sliding_window_pattern")?.unwrap_or(6),
                };
                if pattern == 0 {
                    return Err(err("`sliding_window_pattern` must be positive".into()));
                }
                (0..num_layers).map(|l| (l + 1) % pattern != 0).collect()
            }
            Arch::Gemma4 => (0..num_layers).map(|l| (l + 1) % 6 != 0).collect(),
            Arch::Llama => vec![false; num_layers],
        },
    };
    // Gemma4TextConfig makes the last layer a full one whatever layer_types says.
    let mut sliding = sliding;
    if arch == Arch::Gemma4
        && let Some(last) = sliding.last_mut()
    {
        *last = false;
    }
    Ok(sliding
        .into_iter()
        .zip(rope)
        .map(|(sliding, rope)| LayerAttention {
            window: window.filter(|_| sliding),
            rope,
            local_rope: sliding && arch.is_gemma(),
            // Set by the caller, which knows the heads.
            head_dim: 0,
            kv_heads: 0,
            values_from_keys: false,
            kv_from: None,
        })
        .collect())
}

/// √n as transformers' scaled embeddings multiply by it: rounded to the checkpoint's 16-bit dtype
/// (`embed_scale.to(weight.dtype)`), f32 for an f32 checkpoint.
fn sqrt_in_dtype(n: usize, dtype: Option<&str>) -> f32 {
    let scale = (n as f64).sqrt() as f32;
    match dtype {
        Some("bfloat16") => half::bf16::from_f32(scale).to_f32(),
        Some("float16") => half::f16::from_f32(scale).to_f32(),
        _ => scale,
    }
}

const GPT_OSS: &str = "gpt_oss";
const GPT_OSS_CLASS: &str = "GptOssForCausalLM";

/// Qwen3-MoE's `model_type` and class.
const QWEN3_MOE: &str = "qwen3_moe";
const QWEN3_MOE_CLASS: &str = "Qwen3MoeForCausalLM";
const QWEN2_MOE: &str = "qwen2_moe";
const QWEN2_MOE_CLASS: &str = "Qwen2MoeForCausalLM";
const MIXTRAL: &str = "mixtral";
const MIXTRAL_CLASS: &str = "MixtralForCausalLM";

/// Qwen3MoeConfig's experts: a layer's MLP is the experts unless it is listed in `mlp_only_layers`
/// or `decoder_sparse_step` passes it over (layer l is sparse when (l + 1) % step == 0).
fn parse_moe(fields: &Fields, num_layers: usize, family: MoeFamily) -> Result<MoeConfig> {
    let err = fields.err;
    // Qwen3-MoE's hub configs say num_experts, its save_pretrained writes num_local_experts;
    // Mixtral's experts are as wide as `intermediate_size` says, every layer's.
    // gpt-oss's too.
    let mixtral = matches!(family, MoeFamily::Mixtral | MoeFamily::GptOss);
    if family == MoeFamily::Gemma4 {
        return parse_gemma4_moe(fields, num_layers);
    }
    // The config classes' defaults: (experts, top_k, expert width).
    let defaults = match family {
        MoeFamily::Qwen3 => (128, 8, 768),
        MoeFamily::Qwen2 => (60, 4, 1408),
        MoeFamily::Mixtral => (8, 2, 14336),
        MoeFamily::GptOss => (128, 4, 2880),
        MoeFamily::Gemma4 => unreachable!("read by parse_gemma4_moe"),
    };
    let experts = match fields.opt_usize("num_experts")? {
        Some(n) if !mixtral => n,
        _ => fields.opt_usize("num_local_experts")?.unwrap_or(defaults.0),
    };
    let top_k = fields
        .opt_usize("num_experts_per_tok")?
        .unwrap_or(defaults.1);
    let inter = match mixtral {
        true => fields.opt_usize("intermediate_size")?,
        false => fields.opt_usize("moe_intermediate_size")?,
    }
    .unwrap_or(defaults.2);
    let shared_expert = match family {
        MoeFamily::Qwen2 => fields
            .opt_usize("shared_expert_intermediate_size")?
            .unwrap_or(5632),
        MoeFamily::Qwen3 | MoeFamily::Mixtral | MoeFamily::GptOss | MoeFamily::Gemma4 => 0,
    };
    if mixtral
        && fields
            .opt_f64("router_jitter_noise")?
            .is_some_and(|j| j > 0.0)
    {
        log::warn!(
            "router_jitter_noise: transformers scales each MoE layer's input by noise in training; \
             nibble does not"
        );
    }
    let step = fields.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    check_expert_sizes(fields, (experts, top_k, inter), "num_experts_per_tok")?;
    if shared_expert > MAX_DIMENSION {
        return Err(err(format!(
            "`shared_expert_intermediate_size` ({shared_expert}) must be at most {MAX_DIMENSION}"
        )));
    }
    let dense: Vec<usize> = match fields.get("mlp_only_layers") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|l| l.as_u64().map(|l| l as usize)).collect())
            .ok_or_else(|| {
                err(format!(
                    "`mlp_only_layers` must list layer indices, got {v}"
                ))
            })?,
    };
    if let Some(l) = dense.iter().find(|&&l| l >= num_layers) {
        return Err(err(format!(
            "`mlp_only_layers` names layer {l}; the model has {num_layers}"
        )));
    }
    let sparse = (0..num_layers)
        .map(|l| !dense.contains(&l) && step > 0 && (l + 1) % step == 0)
        .collect();
    Ok(MoeConfig {
        family,
        experts,
        top_k,
        inter,
        // Mixtral's router always renormalises the chosen experts' weights; gpt-oss's takes the
        // softmax of the chosen logits, the same weights.
        normalize: mixtral || fields.opt_bool("norm_topk_prob")?.unwrap_or(false),
        shared_expert,
        sparse,
        output_router_logits: fields.opt_bool("output_router_logits")?.unwrap_or(false),
    })
}

/// Refuses experts a model cannot have: none, more chosen per token (`top_k_key`) than there are, or
/// sizes past what nibble holds.
fn check_expert_sizes(
    fields: &Fields,
    (experts, top_k, inter): (usize, usize, usize),
    top_k_key: &str,
) -> Result<()> {
    let err = fields.err;
    if experts == 0 || top_k == 0 || top_k > experts {
        return Err(err(format!(
            "`{top_k_key}` ({top_k}) must be from 1 to `num_experts` ({experts})"
        )));
    }
    if inter == 0 || inter > MAX_DIMENSION || experts > MAX_DIMENSION {
        return Err(err(format!(
            "`moe_intermediate_size` ({inter}) and `num_experts` ({experts}) must be from 1 to \
             {MAX_DIMENSION}"
        )));
    }
    Ok(())
}

/// Gemma 4's experts (`enable_moe_block`), in every layer: Gemma4TextConfig has no defaults for
/// their sizes (transformers fails building the model without them), so each must be given.
fn parse_gemma4_moe(fields: &Fields, num_layers: usize) -> Result<MoeConfig> {
    let err = fields.err;
    let required = |key: &str| {
        fields.opt_usize(key)?.ok_or_else(|| {
            err(format!(
                "`{key}` must be set when `enable_moe_block` is true (Gemma4TextConfig has no default for it)"
            ))
        })
    };
    let (experts, top_k, inter) = (
        required("num_experts")?,
        required("top_k_experts")?,
        required("moe_intermediate_size")?,
    );
    check_expert_sizes(fields, (experts, top_k, inter), "top_k_experts")?;
    Ok(MoeConfig {
        family: MoeFamily::Gemma4,
        experts,
        top_k,
        inter,
        // Gemma4TextRouter divides the chosen probabilities by their sum.
        normalize: true,
        shared_expert: 0,
        sparse: vec![true; num_layers],
        // Gemma4ForCausalLM adds no load-balancing loss.
        output_router_logits: false,
    })
}

/// Gemma 4 E2B and E4B: per-layer inputs (`hidden_size_per_layer_input`, on at 256 when the key is
/// absent, as in transformers), the last `num_kv_shared_layers` layers attending over the keys and
/// values of the last earlier layer of their type, and E2B's double-wide MLPs on those layers.
fn gemma4_small_model_parts(fields: &Fields, c: &mut ModelConfig) -> Result<()> {
    let err = fields.err;
    let width = fields
        .opt_usize("hidden_size_per_layer_input")?
        .unwrap_or(256);
    if width > 0 {
        let vocab = fields
            .opt_usize("vocab_size_per_layer_input")?
            .unwrap_or(262_144);
        // transformers indexes the table with the main vocabulary's ids.
        if vocab < c.vocab_size {
            return Err(err(format!(
                "`vocab_size_per_layer_input` {vocab} is smaller than `vocab_size` {}: token ids past it have no per-layer embedding",
                c.vocab_size
            )));
        }
        let table = (vocab as u64).checked_mul((c.num_layers as u64) * (width as u64));
        if width > MAX_DIMENSION || table.is_none_or(|n| n > MAX_PARAMETERS) {
            return Err(err(format!(
                "`hidden_size_per_layer_input` {width} with {vocab} rows describes more parameters than nibble can hold"
            )));
        }
        c.per_layer_inputs = Some(PerLayerInputs {
            width,
            vocab,
            token_scale: sqrt_in_dtype(width, c.dtype.as_deref()),
        });
    }
    let shared = fields.opt_usize("num_kv_shared_layers")?.unwrap_or(0);
    if shared > c.num_layers {
        return Err(err(format!(
            "`num_kv_shared_layers` {shared} is more than the {} layers",
            c.num_layers
        )));
    }
    let first_shared = c.num_layers - shared;
    for l in first_shared..c.num_layers {
        let sliding = c.layers[l].local_rope;
        let from = (0..first_shared)
            .rev()
            .find(|&s| c.layers[s].local_rope == sliding);
        let Some(from) = from else {
            let kind = if sliding { "sliding" } else { "full" };
            return Err(err(format!(
                "layer {l} shares the keys and values of an earlier {kind} layer (num_kv_shared_layers {shared}), but no layer before {first_shared} is {kind}"
            )));
        };
        c.layers[l].kv_from = Some(from);
    }
    c.double_wide_shared_mlp = fields.opt_bool("use_double_wide_mlp")?.unwrap_or(false);
    Ok(())
}

/// Refuses, by name, what Gemma 4 configs may ask for that nibble does not implement.
fn refuse_gemma4_parts(fields: &Fields) -> Result<()> {
    // null, false and "vision" (image tokens only) leave text causal.
    match fields.get("use_bidirectional_attention") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::String(s)) if s == "vision" => {}
        Some(other) => {
            return Err((fields.err)(format!(
                "use_bidirectional_attention {other} is not supported: nibble trains causal decoders"
            )));
        }
    }
    // transformers refuses a Gemma 4 without a window for its sliding layers.
    if fields.obj.get("sliding_window").is_some_and(Value::is_null) {
        return Err((fields.err)(
            "`sliding_window` must be set for gemma4_text (its sliding layers need a window)"
                .into(),
        ));
    }
    Ok(())
}

/// Gemma 4's full layers: heads of `global_head_dim` (512 by default, whatever head_dim is), with
/// `attention_k_eq_v` their values from k_proj and `num_global_key_value_heads` of them; or, as
/// transformers writes a config back, `per_layer_config` overrides by layer index. The global RoPE
/// tables are theirs.
fn gemma4_full_layer_heads(fields: &Fields, c: &mut ModelConfig) -> Result<()> {
    let err = fields.err;
    let global_head_dim = fields.opt_usize("global_head_dim")?.unwrap_or(512);
    let k_eq_v = fields.opt_bool("attention_k_eq_v")?.unwrap_or(false);
    let global_kv = fields.opt_usize("num_global_key_value_heads")?;
    // transformers' per-layer overrides: every key a layer index ("05"), every value an object.
    let mut overrides: HashMap<usize, &Map<String, Value>> = HashMap::new();
    if let Some(value) = fields.get("per_layer_config") {
        let by_layer = value
            .as_object()
            .ok_or_else(|| err("`per_layer_config` must be an object of layer indices".into()))?;
        for (key, entry) in by_layer {
            let layer = key.parse::<usize>().ok().filter(|&l| l < c.num_layers);
            let (Some(layer), Some(entry)) = (layer, entry.as_object()) else {
                return Err(err(format!(
                    "`per_layer_config.{key}` must be an object under a layer index below {}",
                    c.num_layers
                )));
            };
            overrides.insert(layer, entry);
        }
    }
    let given = fields.get("per_layer_config").is_some();
    for (l, layer) in c.layers.iter_mut().enumerate() {
        // The layer's type decides, as in transformers (a sliding layer's window is set).
        let full = !layer.local_rope;
        layer.values_from_keys = full && k_eq_v;
        let field = match overrides.get(&l) {
            Some(entry) => {
                let sub = Fields { obj: entry, err };
                layer.head_dim = sub.opt_usize("head_dim")?.unwrap_or(layer.head_dim);
                layer.kv_heads = sub
                    .opt_usize("num_key_value_heads")?
                    .unwrap_or(layer.kv_heads);
                format!("per_layer_config.{l}")
            }
            None if full && !given => {
                layer.head_dim = global_head_dim;
                if let (true, Some(kv)) = (k_eq_v, global_kv) {
                    layer.kv_heads = kv;
                }
                "global_head_dim / num_global_key_value_heads".to_string()
            }
            None => "head_dim / num_key_value_heads".to_string(),
        };
        if layer.head_dim == 0
            || !layer.head_dim.is_multiple_of(2)
            || layer.head_dim > MAX_DIMENSION
        {
            return Err(err(format!(
                "layer {l}'s head_dim {} (from {field}) must be even, positive and at most {MAX_DIMENSION}",
                layer.head_dim
            )));
        }
        if layer.kv_heads == 0 || !c.num_heads.is_multiple_of(layer.kv_heads) {
            return Err(err(format!(
                "layer {l}: num_attention_heads {} is not a multiple of its {} key/value heads (from {field})",
                c.num_heads, layer.kv_heads
            )));
        }
    }
    // One RoPE table per layer type: each type's layers must share a head size.
    for local in [false, true] {
        let mut sizes = c
            .layers
            .iter()
            .filter(|l| l.local_rope == local)
            .map(|l| l.head_dim);
        if let Some(first) = sizes.next()
            && sizes.any(|d| d != first)
        {
            return Err(err(format!(
                "the {} layers have heads of different sizes (per_layer_config); nibble needs one size per layer type",
                if local { "sliding" } else { "full" }
            )));
        }
    }
    if let Some(full) = c.layers.iter().find(|l| !l.local_rope) {
        c.rotary_dim = full.head_dim;
    }
    // The early check counted every layer at head_dim; the wider ones must fit the same bound.
    let total = (0..c.num_layers).try_fold(0u64, |sum, l| {
        let (q, kv) = (c.q_dim(l) as u64, c.kv_dim(l) as u64);
        let attention = (c.hidden_size as u64)
            .checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        sum.checked_add(attention)
    });
    if total.is_none_or(|t| t > MAX_PARAMETERS) {
        return Err(err(format!(
            "these sizes describe more than {MAX_PARAMETERS} parameters, beyond any model nibble can hold"
        )));
    }
    Ok(())
}

/// A config list with one entry per layer, each read by `entry` (whose error the field's name
/// prefixes).
fn per_layer<T>(
    fields: &Fields,
    key: &str,
    value: &Value,
    num_layers: usize,
    entry: impl Fn(&Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let list = value
        .as_array()
        .ok_or_else(|| (fields.err)(format!("`{key}` must be a list, got {value}")))?;
    if list.len() != num_layers {
        return Err((fields.err)(format!(
            "`{key}` has {} entries for {num_layers} layers",
            list.len()
        )));
    }
    list.iter()
        .map(|v| entry(v).map_err(|msg| (fields.err)(format!("`{key}` {msg}"))))
        .collect()
}

/// The config fields that hold the global RoPE settings, and Gemma 3's sliding layers' base. Gemma 3's
/// transformers 5 spelling nests both in `rope_parameters` by layer type (its full layers' entry then
/// stands for the whole of `rope_parameters`); the 4.x one keeps `rope_theta` and `rope_scaling` for the
/// global layers and `rope_local_base_freq` for the sliding ones, which are never scaled.
fn gemma_rope_fields(fields: &Fields, arch: Arch) -> Result<(Map<String, Value>, Option<f64>)> {
    let mut obj = fields.obj.clone();
    if !arch.is_gemma() {
        return Ok((obj, None));
    }
    // Gemma4TextConfig's RoPE when a config gives none; it reads no 4.x-style keys.
    let parameters = match (arch, fields.get("rope_parameters")) {
        (Arch::Gemma4, None) => Some(serde_json::json!({
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                               "rope_theta": 1000000.0},
        })),
        (_, given) => given.cloned(),
    };
    let mut local = match arch {
        Arch::Gemma3 => fields.opt_f64("rope_local_base_freq")?,
        _ => None,
    };
    if let Some(Value::Object(nested)) = &parameters
        && (nested.contains_key("full_attention") || nested.contains_key("sliding_attention"))
    {
        if let Some(sliding) = nested.get("sliding_attention").filter(|v| !v.is_null()) {
            let sub = Fields {
                obj: sliding.as_object().ok_or_else(|| {
                    (fields.err)("`rope_parameters.sliding_attention` must be an object".into())
                })?,
                err: fields.err,
            };
            let kind = match sub.opt_str("rope_type")? {
                Some(t) => t,
                None => sub.opt_str("type")?.unwrap_or("default"),
            };
            if kind != "default" {
                return Err((fields.err)(format!(
                    "rope type `{kind}` on the sliding layers is not supported (Gemma scales only its full layers)"
                )));
            }
            local = sub.opt_f64("rope_theta")?.or(local);
        }
        let full = nested
            .get("full_attention")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"rope_type": "default"}));
        obj.insert("rope_parameters".into(), full);
    }
    let local = local.unwrap_or(LOCAL_ROPE_THETA);
    if local <= 1.0 || !local.is_finite() {
        return Err((fields.err)(format!(
            "the sliding layers' RoPE base must be above 1, got {local}"
        )));
    }
    Ok((obj, Some(local)))
}

/// RoPE's base, its scaling, and the part of each head it rotates (`partial_rotary_factor`, at the top
/// level or in `rope_parameters`).
fn parse_rope(fields: &Fields, arch: Arch) -> Result<(f64, RopeScaling, f64)> {
    let default_theta = arch.default_rope_theta();
    let nested = match fields.obj.get("rope_parameters") {
        Some(Value::Object(p)) => p.get("partial_rotary_factor").and_then(Value::as_f64),
        _ => None,
    };
    // transformers sets the nested value by `setdefault`: one already in rope_parameters wins.
    let rotary_factor = match nested {
        Some(f) => f,
        None => fields.opt_f64("partial_rotary_factor")?.unwrap_or(1.0),
    };
    if !(rotary_factor > 0.0 && rotary_factor <= 1.0) {
        return Err((fields.err)(format!(
            "partial_rotary_factor must be in (0, 1], got {rotary_factor}"
        )));
    }
    // Gemma 4's default RoPE ignores it and its proportional one reads it itself (below); its other
    // types would rotate part of each head, which nibble does for Phi-3 only (refused below).
    let gemma4_reads_it_itself = arch == Arch::Gemma4
        && matches!(
            fields
                .get("rope_parameters")
                .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
                .and_then(Value::as_str),
            None | Some("default") | Some("proportional")
        );
    let rotary_factor = if gemma4_reads_it_itself {
        1.0
    } else {
        rotary_factor
    };
    // Only Phi-3's rotary embedding reads it; the others' default RoPE rotates whole heads (and
    // their scaled ones fail on it), so a factor there is refused rather than guessed.
    if arch != Arch::Phi3 && rotary_factor != 1.0 {
        return Err((fields.err)(format!(
            "partial_rotary_factor {rotary_factor} is not supported for {} (nibble rotates part of each head for phi3 only)",
            arch.model_type()
        )));
    }
    // transformers 5.x folds rope_theta into rope_parameters; 4.x keeps rope_theta at the top level
    // and puts the scaling (if any) in rope_scaling.
    let (params, theta) = match fields.obj.get("rope_parameters") {
        Some(Value::Object(p)) => {
            let theta = match p.get("rope_theta") {
                Some(v) => v.as_f64().ok_or_else(|| {
                    (fields.err)("`rope_parameters.rope_theta` must be a number".into())
                })?,
                None => fields.opt_f64("rope_theta")?.unwrap_or(default_theta),
            };
            (Some(p), theta)
        }
        Some(Value::Null) | None => {
            let theta = fields.opt_f64("rope_theta")?.unwrap_or(default_theta);
            match fields.obj.get("rope_scaling") {
                Some(Value::Object(p)) => (Some(p), theta),
                Some(Value::Null) | None => (None, theta),
                Some(_) => {
                    return Err((fields.err)(
                        "`rope_scaling` must be an object or null".into(),
                    ));
                }
            }
        }
        Some(_) => return Err((fields.err)("`rope_parameters` must be an object".into())),
    };
    let Some(p) = params else {
        return Ok((theta, RopeScaling::None, rotary_factor));
    };
    let sub = Fields {
        obj: p,
        err: fields.err,
    };
    let kind = match sub.opt_str("rope_type")? {
        Some(t) => t,
        None => sub.opt_str("type")?.unwrap_or("default"),
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: sub.f64("factor")?,
        },
        "proportional" if arch == Arch::Gemma4 => {
            let factor = sub.opt_f64("factor")?.unwrap_or(1.0);
            let partial_rotary_factor = sub.opt_f64("partial_rotary_factor")?.unwrap_or(1.0);
            if factor <= 0.0
                || !factor.is_finite()
                || !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0)
            {
                return Err((fields.err)(format!(
                    "proportional RoPE needs a positive factor and a partial_rotary_factor in (0, 1], got {factor} and {partial_rotary_factor}"
                )));
            }
            RopeScaling::Proportional {
                factor,
                partial_rotary_factor,
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: sub.f64("factor")?,
            low_freq_factor: sub.f64("low_freq_factor")?,
            high_freq_factor: sub.f64("high_freq_factor")?,
            original_max_position_embeddings: original_positions(fields, &sub)?,
        },
        "yarn" if arch != Arch::Phi3 => {
            let original = original_positions(fields, &sub)?;
            // DeepSeek-style configs leave the factor to the ratio of the two lengths.
            let factor = match sub.opt_f64("factor")? {
                Some(f) => f,
                None => fields.f64("max_position_embeddings")? / original,
            };
            if factor <= 0.0 || !factor.is_finite() {
                return Err((fields.err)(format!(
                    "the yarn rope factor must be positive, got {factor}"
                )));
            }
            let mscale_of = |scale: f64, mscale: f64| match scale <= 1.0 {
                true => 1.0,
                false => 0.1 * mscale * scale.ln() + 1.0,
            };
            let attention_factor = match (
                sub.opt_f64("attention_factor")?,
                sub.opt_f64("mscale")?,
                sub.opt_f64("mscale_all_dim")?,
            ) {
                (Some(a), _, _) => a,
                // transformers tests both for truth: a zero counts as absent.
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    mscale_of(factor, m) / mscale_of(factor, all)
                }
                _ => mscale_of(factor, 1.0),
            };
            // `or 32` / `or 1` in transformers: a zero takes the default too.
            let nonzero = |v: Option<f64>, default: f64| v.filter(|&b| b != 0.0).unwrap_or(default);
            let (beta_fast, beta_slow) = (
                nonzero(sub.opt_f64("beta_fast")?, 32.0),
                nonzero(sub.opt_f64("beta_slow")?, 1.0),
            );
            // Where transformers would take a logarithm of nothing or scale by nothing.
            for (name, value) in [
                ("rope_theta", theta - 1.0),
                ("beta_fast", beta_fast),
                ("beta_slow", beta_slow),
                ("attention_factor", attention_factor),
            ] {
                if value <= 0.0 || !value.is_finite() {
                    return Err((fields.err)(format!(
                        "yarn rope scaling needs a positive `{name}`{}",
                        if name == "rope_theta" { " above 1" } else { "" }
                    )));
                }
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                attention_factor,
                // `.get("truncate", True)`: a null is falsy there.
                truncate: match sub.obj.get("truncate") {
                    Some(Value::Null) => false,
                    _ => sub.opt_bool("truncate")?.unwrap_or(true),
                },
            }
        }
        // Phi-3's config class reads its older names ("su", "yarn") as LongRoPE.
        "longrope" | "su" | "yarn" if arch == Arch::Phi3 => {
            // Phi3Config's class default of 4096 wins over the scaling's own value.
            let original = match fields.opt_f64("original_max_position_embeddings")? {
                Some(o) if o > 0.0 && o.is_finite() => o,
                Some(o) => {
                    return Err((fields.err)(format!(
                        "original_max_position_embeddings must be positive, got {o}"
                    )));
                }
                None => 4096.0,
            };
            let factor = match sub.opt_f64("factor")? {
                Some(f) => f,
                // Phi3Config's default length.
                None => fields.opt_f64("max_position_embeddings")?.unwrap_or(4096.0) / original,
            };
            let attention_factor = match sub.opt_f64("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / original.ln()).sqrt(),
            };
            if attention_factor <= 0.0 || !attention_factor.is_finite() {
                return Err((fields.err)(format!(
                    "longrope needs a positive attention factor, got {attention_factor}"
                )));
            }
            let list = |key: &str| -> Result<Vec<f64>> {
                let v = sub
                    .get(key)
                    .ok_or_else(|| (fields.err)(format!("longrope needs `{key}`")))?;
                let bad = || {
                    (fields.err)(format!(
                        "longrope `{key}` must be a list of positive numbers"
                    ))
                };
                v.as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|f| {
                        f.as_f64()
                            .filter(|f| *f > 0.0 && f.is_finite())
                            .ok_or_else(bad)
                    })
                    .collect()
            };
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err((fields.err)(format!(
                "rope type `{other}` is not supported (nibble implements default, linear, llama3, yarn, and longrope for Phi-3)"
            )));
        }
    };
    Ok((theta, scaling, rotary_factor))
}

/// The context length a scaled RoPE was pretrained at, as transformers 5.x standardises it: a top-level
/// `original_max_position_embeddings` (Phi-3 keeps it there) wins, then the scaling's own, then
/// `max_position_embeddings`.
fn original_positions(fields: &Fields, sub: &Fields) -> Result<f64> {
    let original = match fields.opt_f64("original_max_position_embeddings")? {
        Some(o) => o,
        None => match sub.opt_f64("original_max_position_embeddings")? {
            Some(o) => o,
            None => fields.f64("max_position_embeddings")?,
        },
    };
    if original <= 0.0 || !original.is_finite() {
        return Err((fields.err)(format!(
            "original_max_position_embeddings must be positive, got {original}"
        )));
    }
    Ok(original)
}

/// `obj` with the fields it leaves out filled in as the config class of `model_type` fills them
/// (tests/fixtures/config_defaults.json checks them against transformers'), where they differ from
/// what nibble takes for a missing field (RMSNorm epsilon 1e-6, hidden_size / heads per head, the
/// arch's RoPE base, plain RoPE, ...): the sizes released multimodal configs lean on (Gemma3TextConfig,
/// Gemma4TextConfig, Ministral3Config), and the epsilon, head size, window and RoPE of Ministral 3,
/// gpt-oss, Mixtral, Qwen3 and Phi-3. None for the others.
fn class_defaults(model_type: &str, obj: &Map<String, Value>) -> Option<Map<String, Value>> {
    let sizes: &[(&str, u64)] = match model_type {
        "gemma3_text" => &[
            ("vocab_size", 262208),
            ("hidden_size", 2304),
            ("intermediate_size", 9216),
            ("num_hidden_layers", 26),
            ("num_attention_heads", 8),
            ("num_key_value_heads", 4),
        ],
        "gemma4_text" => &[
            ("vocab_size", 262144),
            ("hidden_size", 2304),
            ("intermediate_size", 9216),
            ("num_hidden_layers", 30),
            ("num_attention_heads", 8),
            ("num_key_value_heads", 4),
            ("head_dim", 256),
            ("sliding_window", 512),
            ("global_head_dim", 512),
            // On by default: a config that leaves it out has per-layer inputs.
            ("hidden_size_per_layer_input", 256),
        ],
        "ministral3" => &[
            ("vocab_size", 131072),
            ("hidden_size", 4096),
            ("intermediate_size", 14336),
            ("num_hidden_layers", 34),
            ("num_attention_heads", 32),
            ("num_key_value_heads", 8),
            ("head_dim", 128),
            ("max_position_embeddings", 262144),
        ],
        "gpt_oss" => &[("head_dim", 64), ("sliding_window", 128)],
        "qwen3" => &[("head_dim", 128)],
        "mixtral" | "phi3" => &[],
        _ => return None,
    };
    let mut with = obj.clone();
    for &(key, value) in sizes {
        with.entry(key).or_insert(value.into());
    }
    if matches!(model_type, "ministral3" | "gpt_oss" | "mixtral" | "phi3") {
        with.entry("rms_norm_eps").or_insert(1e-5.into());
    }
    // The classes' `default_theta` where it is not the arch's.
    let theta = match model_type {
        "gpt_oss" => Some(150_000.0),
        "mixtral" => Some(1e6),
        _ => None,
    };
    if let Some(theta) = theta {
        with.entry("rope_theta").or_insert(theta.into());
    }
    // MixtralConfig slides nowhere unless told (Mistral's attention, whose class slides at 4096).
    if model_type == "mixtral" {
        with.entry("sliding_window").or_insert(Value::Null);
    }
    // GptOssConfig's layers slide and attend fully in turn, the first sliding.
    if model_type == "gpt_oss"
        && !with.contains_key("layer_types")
        && let Some(layers) = with.get("num_hidden_layers").and_then(Value::as_u64)
    {
        let types: Vec<&str> = (0..layers)
            .map(|l| match l % 2 {
                0 => "sliding_attention",
                _ => "full_attention",
            })
            .collect();
        with.insert("layer_types".into(), serde_json::json!(types));
    }
    // The class's RoPE when a config gives none. As transformers 5 reads them, a null is absent,
    // and so is an empty `rope_scaling` (it takes `rope_scaling or rope_parameters`).
    let absent = |key| match with.get(key) {
        None | Some(Value::Null) => true,
        Some(Value::Object(o)) => key == "rope_scaling" && o.is_empty(),
        Some(_) => false,
    };
    let rope = match model_type {
        // Ministral 3 8B's.
        "ministral3" => Some(serde_json::json!({
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
            "original_max_position_embeddings": 16384,
            "max_position_embeddings": with["max_position_embeddings"].clone(),
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
            "llama_4_scaling_beta": 0.1,
        })),
        // Its base stays the config's `rope_theta` (or the class's).
        "gpt_oss" => Some(serde_json::json!({
            "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": false, "original_max_position_embeddings": 4096,
        })),
        _ => None,
    };
    if let Some(rope) = rope
        && absent("rope_parameters")
        && absent("rope_scaling")
    {
        with.insert("rope_parameters".into(), rope);
    }
    Some(with)
}

/// Ministral 3's per-position query scale (transformers' `get_llama_4_attn_scale`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueryPositionScale {
    /// `llama_4_scaling_beta`.
    pub beta: f64,
    /// `rope_parameters.original_max_position_embeddings`: the positions each step of the scale spans.
    pub original_max_position_embeddings: f64,
}

impl QueryPositionScale {
    /// 1 + β·ln(1 + ⌊position / original⌋), in f32 as transformers computes it.
    pub fn factor(&self, position: u32) -> f32 {
        let steps = (position as f32 / self.original_max_position_embeddings as f32).floor();
        1.0 + self.beta as f32 * (1.0 + steps).ln()
    }
}

/// Ministral 3's query scale from its RoPE settings (`rope_parameters`, or 4.x's `rope_scaling`),
/// which transformers reads without defaults (a config lacking either key fails there).
fn parse_query_position_scale(
    fields: &Fields,
    scaling: &RopeScaling,
) -> Result<QueryPositionScale> {
    let empty = Map::new();
    let rope = Fields {
        obj: ["rope_parameters", "rope_scaling"]
            .iter()
            .find_map(|key| fields.get(key).and_then(Value::as_object))
            .unwrap_or(&empty),
        err: fields.err,
    };
    let beta = rope.opt_f64("llama_4_scaling_beta")?.ok_or_else(|| {
        (rope.err)("ministral3 needs `rope_parameters.llama_4_scaling_beta` (its queries' scale with position)".into())
    })?;
    let original = match (rope.opt_f64("original_max_position_embeddings")?, scaling) {
        (Some(o), _) => o,
        // transformers' yarn validation fills it in from max_position_embeddings.
        (
            None,
            RopeScaling::Yarn {
                original_max_position_embeddings,
                ..
            },
        ) => *original_max_position_embeddings,
        (None, _) => {
            return Err((rope.err)(
                "ministral3 needs `rope_parameters.original_max_position_embeddings` (its queries' scale with position)".into(),
            ));
        }
    };
    if original <= 0.0 || !original.is_finite() || !beta.is_finite() {
        return Err((rope.err)(format!(
            "ministral3's query scale needs a finite llama_4_scaling_beta and a positive original_max_position_embeddings, got {beta} and {original}"
        )));
    }
    Ok(QueryPositionScale {
        beta,
        original_max_position_embeddings: original,
    })
}

/// Typed field access whose errors name the field and the file.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    err: &'a dyn Fn(String) -> Error,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    (self.err)(format!("`{key}` must be a non-negative integer, got {v}"))
                })
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| (self.err)(format!("missing required field `{key}`")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| (self.err)(format!("`{key}` must be a number, got {v}")))
            })
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| (self.err)(format!("missing required field `{key}`")))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| (self.err)(format!("`{key}` must be true or false, got {v}")))
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| (self.err)(format!("`{key}` must be a string, got {v}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4-layer config of `model_type` with `extra` fields.
    fn parse(model_type: &str, extra: Value) -> Result<ModelConfig> {
        let mut c = serde_json::json!({
            "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256,
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json_str(&c.to_string(), Path::new("config.json"))
    }

    #[test]
    fn only_a_layers_router_is_a_router_path() {
        assert!(is_router_path("model.layers.3.mlp.gate"));
        assert!(!is_router_path("model.layers.3.mlp.gate_proj"));
        assert!(!is_router_path(
            "model.layers.3.mlp.shared_expert.gate_proj"
        ));
        assert!(!is_router_path("model.layers.3.mlp.shared_expert_gate"));
        assert!(!is_router_path("model.layers.3.xmlp.gate"));
    }

    /// Values that leave every loss NaN at the first step are refused by name when the config is read.
    #[test]
    fn values_that_would_make_every_loss_nan_are_named() {
        use serde_json::json;
        let linear =
            |factor: f64| json!({"rope_scaling": {"rope_type": "linear", "factor": factor}});
        let llama3 = |low: f64, high: f64| {
            json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low,
                                    "high_freq_factor": high, "original_max_position_embeddings": 64}})
        };
        for (extra, named) in [
            (json!({"rms_norm_eps": -1.0}), "rms_norm_eps"),
            (json!({"rope_theta": 0.0}), "rope_theta"),
            (json!({"rope_theta": -10000.0}), "rope_theta"),
            (linear(0.0), "linear rope scaling"),
            (linear(-2.0), "linear rope scaling"),
            (llama3(0.0, 4.0), "`low_freq_factor` must be positive"),
            (llama3(1.0, -4.0), "`high_freq_factor` must be positive"),
        ] {
            let err = parse("llama", extra.clone()).unwrap_err().to_string();
            assert!(err.contains(named), "{extra}: {err}");
        }
        parse("llama", linear(2.0)).unwrap();
        parse("llama", llama3(1.0, 4.0)).unwrap();
        // Equal frequency factors leave no band between them; transformers runs them too.
        parse("llama", llama3(4.0, 4.0)).unwrap();
        parse("llama", json!({"rms_norm_eps": 0.0})).unwrap();
    }

    fn windows(c: &ModelConfig) -> Vec<Option<usize>> {
        c.layers.iter().map(|l| l.window).collect()
    }

    /// Each family's sliding layers and windows as transformers 5.24's config classes resolve them
    /// (their `__post_init__` and attention modules, read side by side).
    #[test]
    fn layer_attention_follows_each_family() {
        use serde_json::json;
        let none = vec![None; 4];
        // Mistral: every layer slides; 4096 when the key is absent, none when it is null.
        let c = parse("mistral", json!({})).unwrap();
        assert_eq!(windows(&c), vec![Some(4096); 4]);
        let c = parse("mistral", json!({"sliding_window": null})).unwrap();
        assert_eq!(windows(&c), none);
        // Mistral's attention ignores layer_types.
        let types = json!([
            "full_attention",
            "sliding_attention",
            "full_attention",
            "full_attention"
        ]);
        let c = parse(
            "mistral",
            json!({"sliding_window": 8, "layer_types": types}),
        )
        .unwrap();
        assert_eq!(windows(&c), vec![Some(8); 4]);
        // Ministral reads them.
        let c = parse(
            "ministral",
            json!({"sliding_window": 8, "layer_types": types}),
        )
        .unwrap();
        assert_eq!(windows(&c), vec![None, Some(8), None, None]);
        // Qwen2/Qwen3: only with use_sliding_window, from layer max_window_layers on.
        let c = parse(
            "qwen2",
            json!({"sliding_window": 8, "max_window_layers": 2}),
        )
        .unwrap();
        assert_eq!(windows(&c), none);
        let on = json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 2});
        let c = parse("qwen3", on).unwrap();
        assert_eq!(windows(&c), vec![None, None, Some(8), Some(8)]);
        let on = json!({"use_sliding_window": true, "max_window_layers": 2});
        let c = parse("qwen2", on).unwrap();
        assert_eq!(windows(&c), vec![None, None, Some(4096), Some(4096)]);
        // SmolLM3: a NoPE layer every 4th by default; windows only on NoPE layers, only when asked.
        let c = parse("smollm3", json!({})).unwrap();
        let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
        assert_eq!(rope, vec![true, true, true, false]);
        assert_eq!(windows(&c), none);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 2_000_000.0);
        let c = parse(
            "smollm3",
            json!({"no_rope_layers": [0, 1, 1, 0], "use_sliding_window": true, "sliding_window": 8}),
        )
        .unwrap();
        assert_eq!(windows(&c), vec![Some(8), None, None, Some(8)]);
        assert_eq!(
            c.layer_attention_summary(),
            "sliding window 8 in layers [0, 3]; no RoPE in layers [0, 3]"
        );
        // Llama never slides; full attention with RoPE everywhere says nothing.
        let c = parse(
            "llama",
            json!({"sliding_window": 8, "use_sliding_window": true}),
        )
        .unwrap();
        assert_eq!(windows(&c), none);
        assert_eq!(c.layer_attention_summary(), "");
    }

    /// YaRN's fields as transformers resolves them: 4.x spelling, the top-level original length
    /// first (Phi-3 style), betas of 0 or null taking their defaults, a null truncate meaning false,
    /// and the attention factor from the factor alone.
    #[test]
    fn yarn_fields_resolve_as_transformers_does() {
        use serde_json::json;
        let c = parse(
            "qwen2",
            json!({"max_position_embeddings": 1024, "original_max_position_embeddings": 256,
                   "rope_theta": 10000.0,
                   "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                    "beta_fast": 0, "beta_slow": null, "truncate": null}}),
        )
        .unwrap();
        let attention_factor = 0.1 * 4f64.ln() + 1.0;
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 256.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor,
                truncate: false,
            }
        );
        let c = parse(
            "llama",
            json!({"max_position_embeddings": 1024,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}}),
        )
        .unwrap();
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            truncate,
            ..
        } = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((original_max_position_embeddings, truncate), (1024.0, true));
    }

    /// Ministral 3 on Ministral3Config's defaults (8B's), and Mistral 3's multimodal wrapper around a
    /// Ministral 3 or a Mistral (Small 3.1) decoder, as transformers 5.24 resolves them.
    #[test]
    fn ministral3_and_mistral3_resolve_as_transformers_does() {
        use serde_json::json;
        let path = Path::new("config.json");
        let from = |v: Value| ModelConfig::from_json_str(&v.to_string(), path);
        let c = from(json!({"model_type": "ministral3"})).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (4096, 34, 32, 8, 128)
        );
        assert_eq!((c.vocab_size, c.rms_norm_eps), (131072, 1e-5));
        assert_eq!((c.rope_theta, c.max_position_embeddings), (1e6, 262144));
        assert!(!c.tie_word_embeddings && c.layers.iter().all(|l| l.window.is_none()));
        let RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            ..
        } = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((factor, original_max_position_embeddings), (16.0, 16384.0));
        assert_eq!(attention_factor, 1.0);
        // transformers' inv_freq for these settings (_compute_yarn_parameters).
        let inv = crate::ops::rope::inv_freq(c.head_dim, c.rope_theta, &c.rope_scaling);
        for (ours, theirs) in inv.iter().zip([1.0, 0.80584, 0.64938]) {
            assert!((ours - theirs).abs() < 1e-5, "{ours} vs {theirs}");
        }
        assert_eq!(
            c.query_position_scale,
            Some(QueryPositionScale {
                beta: 0.1,
                original_max_position_embeddings: 16384.0
            })
        );
        // 1 + 0.1·ln 2 at 16384 and 1 + 0.1·ln 9 at 131072, as transformers computes them in f32.
        let q = c.query_position_scale.unwrap();
        assert_eq!((q.factor(16383), q.factor(16384)), (1.0, 1.0693147));
        assert_eq!(q.factor(131072), 1.2197225);

        // Mistral Small 3.1's layout: a mistral text_config (the default model_type), a null window,
        // the head tied by the outer default.
        let small = json!({
            "model_type": "mistral3",
            "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                            "vocab_size": 256, "sliding_window": null, "rope_theta": 1e9},
            "vision_config": {"model_type": "pixtral"},
        });
        let c = from(small.clone()).unwrap();
        assert_eq!(c.arch, Arch::Mistral);
        assert_eq!(c.multimodal, Some(Multimodal::Mistral3));
        assert_eq!(c.class_name(), "Mistral3ForConditionalGeneration");
        assert_eq!(
            c.linear_path(LinearKind::Q, 1),
            "model.language_model.layers.1.self_attn.q_proj"
        );
        assert!(c.tie_word_embeddings && c.query_position_scale.is_none());
        assert!(c.layers.iter().all(|l| l.window.is_none()));
        assert_eq!(c.rope_theta, 1e9);

        let mut ministral = small.clone();
        ministral["text_config"]["model_type"] = json!("ministral3");
        ministral["tie_word_embeddings"] = json!(false);
        let c = from(ministral).unwrap();
        assert_eq!((c.arch, c.tie_word_embeddings), (Arch::Ministral3, false));
        assert_eq!(c.head_dim, 32);

        for (config, expect) in [
            (
                json!({"model_type": "ministral3",
                       "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                           "original_max_position_embeddings": 16384}}),
                "`rope_parameters.llama_4_scaling_beta`",
            ),
            (
                json!({"model_type": "ministral3",
                       "rope_parameters": {"rope_type": "default", "llama_4_scaling_beta": 0.1}}),
                "`rope_parameters.original_max_position_embeddings`",
            ),
            (
                json!({"model_type": "mistral3", "text_config": {"model_type": "llama"}}),
                "text_config of model_type `llama` is not supported",
            ),
            (
                json!({"model_type": "mistral3"}),
                "a multimodal mistral3 config needs a `text_config` object",
            ),
            (
                json!({"model_type": "mistral3", "quantization_config": {"quant_method": "gptq"}}),
                "quantized (quantization_config: gptq)",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "pack-quantized",
                    "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}}}),
                "quantized (compressed-tensors, group `group_0`: format pack-quantized, weights of type int in 4 bits)",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "fp8", "weight_block_size": [128, 0]}}),
                "`weight_block_size` should be two positive integers, found [128,0]",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}),
                "compressed-tensors without `config_groups`",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "float-quantized",
                    "transform_config": {"config_groups": {"u": {"type": "hadamard"}}},
                    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}),
                "quantized (compressed-tensors with a `transform_config`: rotations applied while running)",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "float-quantized",
                    "sparsity_config": {"format": "sparse-24-bitmask"},
                    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}}}}),
                "compressed-tensors with sparsity_config format sparse-24-bitmask",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "symmetric": false}}}}}),
                "group `group_0`: asymmetric FP8 weights (zero points)",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {
                        "a": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
                        "b": {"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": "128x128"}},
                        "c": {"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 64]}}}}}),
                "groups with different blocks of scales are not supported (group `c`)",
            ),
            (
                json!({"model_type": "llama", "quantization_config": {
                    "quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor_group"}}}}}),
                "group `g`: weights with strategy `tensor_group`",
            ),
        ] {
            let e = from(config).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("config.json"), "{e}");
        }
    }

    /// Gemma 4 as the hub's configs spell it (global_head_dim, num_global_key_value_heads,
    /// attention_k_eq_v; Gemma4TextConfig's defaults elsewhere), and the parts nibble refuses by name.
    #[test]
    fn gemma4_moe_reads_as_transformers_builds_it() {
        use serde_json::json;
        // 26B-A4B's text config, its sizes cut down.
        let config = json!({
            "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_size_per_layer_input": 0, "vocab_size": 256, "enable_moe_block": true,
            "num_experts": 8, "top_k_experts": 3, "moe_intermediate_size": 32,
        });
        let c = ModelConfig::from_json_str(&config.to_string(), Path::new("config.json")).unwrap();
        let m = c.moe.as_ref().unwrap();
        assert_eq!(m.family, MoeFamily::Gemma4);
        assert_eq!((m.experts, m.top_k, m.inter, m.normalize), (8, 3, 32, true));
        assert_eq!(
            (c.model_type(), c.class_name()),
            ("gemma4_text", "Gemma4ForCausalLM")
        );
        assert!(c.experts_beside_mlp(1) && !c.experts_replace_mlp(1));
        use LinearKind::*;
        // PEFT's module order: the attention, the dense MLP, then the router.
        assert_eq!(c.layer_linears(0), [Q, K, V, O, Gate, Up, Down, Router]);
        assert_eq!(c.linear_path(Router, 1), "model.layers.1.router.proj");
        assert_eq!(c.linear_shape(Router, 1), (8, 64));
        let tensors = c.expected_tensors();
        let find = |name: &str| {
            tensors
                .iter()
                .find(|t| t.name == name)
                .map(|t| (t.shape.clone(), t.role))
        };
        for (name, shape, role) in [
            (
                "model.layers.1.router.proj.weight",
                vec![8, 64],
                TensorRole::Router,
            ),
            ("model.layers.1.router.scale", vec![64], TensorRole::Norm),
            (
                "model.layers.1.router.per_expert_scale",
                vec![8],
                TensorRole::Norm,
            ),
            (
                "model.layers.1.experts.gate_up_proj",
                vec![8 * 64, 64],
                TensorRole::Experts,
            ),
            (
                "model.layers.1.experts.down_proj",
                vec![8 * 64, 32],
                TensorRole::Experts,
            ),
            (
                "model.layers.1.pre_feedforward_layernorm_2.weight",
                vec![64],
                TensorRole::Norm,
            ),
            (
                "model.layers.1.post_feedforward_layernorm_1.weight",
                vec![64],
                TensorRole::Norm,
            ),
            (
                "model.layers.1.post_feedforward_layernorm_2.weight",
                vec![64],
                TensorRole::Norm,
            ),
            (
                "model.layers.1.mlp.gate_proj.weight",
                vec![96, 64],
                TensorRole::LinearWeight(Gate),
            ),
        ] {
            assert_eq!(find(name), Some((shape, role)), "{name}");
        }
        assert!(find("model.layers.1.mlp.gate.weight").is_none());
        // The router is a linear module: PEFT adapts the experts alone by name.
        let names: Vec<String> = c
            .adaptable_parameters()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "model.layers.0.experts.gate_up_proj",
                "model.layers.0.experts.down_proj",
                "model.layers.1.experts.gate_up_proj",
                "model.layers.1.experts.down_proj",
            ]
        );
        // As the hub holds it: the text decoder of Gemma4ForConditionalGeneration.
        let wrapped = json!({"model_type": "gemma4", "text_config": config});
        let c = ModelConfig::from_json_str(&wrapped.to_string(), Path::new("config.json")).unwrap();
        assert_eq!(c.moe_family(), Some(MoeFamily::Gemma4));
        assert_eq!(c.class_name(), "Gemma4ForConditionalGeneration");
        assert_eq!(
            c.experts_stack(1, EXPERTS_DOWN),
            "model.language_model.layers.1.experts.down_proj"
        );
        assert_eq!(
            c.linear_path(Router, 0),
            "model.language_model.layers.0.router.proj"
        );
    }

    #[test]
    fn gemma4_resolves_as_transformers_does() {
        use serde_json::json;
        let path = Path::new("config.json");
        let from = |v: Value| ModelConfig::from_json_str(&v.to_string(), path);
        // 31B's text config, its sizes cut down.
        let base = json!({
            "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 8, "num_key_value_heads": 4,
            "num_global_key_value_heads": 2, "attention_k_eq_v": true, "hidden_size_per_layer_input": 0,
            "vocab_size": 256, "dtype": "bfloat16",
        });
        let c = from(base.clone()).unwrap();
        // Layers 0-4 slide (window 512), 5 is full (every sixth), 6 is made full as the last.
        let kinds: Vec<(Option<usize>, usize, usize, bool)> = c
            .layers
            .iter()
            .map(|l| (l.window, l.head_dim, l.kv_heads, l.values_from_keys))
            .collect();
        let sliding = (Some(512), 256, 4, false);
        let full = (None, 512, 2, true);
        assert_eq!(
            kinds,
            [sliding, sliding, sliding, sliding, sliding, full, full]
        );
        assert_eq!(
            (c.rotary_dim, c.rope_theta, c.local_rope_theta),
            (512, 1e6, Some(1e4))
        );
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Proportional {
                factor: 1.0,
                partial_rotary_factor: 0.25
            }
        );
        // θ^(-2k/512) for the first 64 frequencies, zero for the other 192.
        let inv = crate::ops::rope::inv_freq(c.rotary_dim, c.rope_theta, &c.rope_scaling);
        assert_eq!(inv.len(), 256);
        assert!(inv[64..].iter().all(|&f| f == 0.0));
        assert!((inv[63] as f64 - 1e6f64.powf(-126.0 / 512.0)).abs() < 1e-9);
        assert_eq!(c.layer_linears(5).len(), 6);
        assert_eq!(c.linear_shape(LinearKind::K, 5), (2 * 512, 64));
        assert_eq!(c.linear_shape(LinearKind::O, 0), (64, 8 * 256));
        // √64 = 8 is exact in bf16.
        assert_eq!(
            (c.embed_scale, c.norm_offset, c.attention_scale),
            (8.0, 0.0, 1.0)
        );
        assert!(c.tie_word_embeddings && c.value_norm && c.layer_scalars);

        // "vision" bidirectionality concerns image tokens only; text stays causal.
        let mut vision = base.clone();
        vision["use_bidirectional_attention"] = json!("vision");
        assert!(from(vision).is_ok());
        // Without k_eq_v the full layers keep num_key_value_heads and their v_proj.
        let mut plain = base.clone();
        plain["attention_k_eq_v"] = json!(false);
        let c = from(plain).unwrap();
        assert_eq!(
            (c.layers[5].kv_heads, c.layers[5].values_from_keys),
            (4, false)
        );
        assert_eq!(c.layer_linears(5).len(), 7);

        // E2B's layout (sizes cut down): per-layer inputs on when the key is absent (256 per layer,
        // 262,144 rows), full layers every fifth, the last 20 of 35 layers reusing the keys and values
        // of layers 13 (sliding) and 14 (full) with MLPs twice as wide.
        let mut e2b = base.clone();
        let e2b_fields = json!({
            "num_hidden_layers": 35, "num_key_value_heads": 1, "attention_k_eq_v": false,
            "num_global_key_value_heads": null, "num_kv_shared_layers": 20, "use_double_wide_mlp": true,
            "layer_types": (0..35).map(|l| if l % 5 == 4 { "full_attention" } else { "sliding_attention" })
                .collect::<Vec<_>>(),
        });
        e2b.as_object_mut()
            .unwrap()
            .extend(e2b_fields.as_object().unwrap().clone());
        e2b.as_object_mut()
            .unwrap()
            .remove("hidden_size_per_layer_input");
        let c = from(e2b.clone()).unwrap();
        assert_eq!(
            c.per_layer_inputs,
            Some(PerLayerInputs {
                width: 256,
                vocab: 262_144,
                token_scale: 16.0
            })
        );
        let from_layers: Vec<Option<usize>> = c.layers.iter().map(|l| l.kv_from).collect();
        let expected: Vec<Option<usize>> = (0..35)
            .map(|l| match (l >= 15, l % 5 == 4) {
                (false, _) => None,
                (true, true) => Some(14),
                (true, false) => Some(13),
            })
            .collect();
        assert_eq!(from_layers, expected);
        assert_eq!((c.mlp_width(14), c.mlp_width(15)), (128, 256));
        use LinearKind::*;
        assert_eq!(
            c.layer_linears(15),
            [Q, O, Gate, Up, Down, PerLayerGate, PerLayerProjection]
        );
        assert_eq!(c.linear_shape(PerLayerGate, 0), (256, 64));
        assert_eq!(
            c.linear_path(PerLayerProjection, 3),
            "model.layers.3.per_layer_projection"
        );
        let names: Vec<String> = c.expected_tensors().into_iter().map(|t| t.name).collect();
        for present in [
            "model.embed_tokens_per_layer.weight",
            "model.per_layer_model_projection.weight",
            "model.per_layer_projection_norm.weight",
            "model.layers.15.post_per_layer_input_norm.weight",
            "model.layers.14.self_attn.k_norm.weight",
        ] {
            assert!(names.iter().any(|n| n == present), "{present}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("model.layers.15.self_attn.k_"))
        );

        for (change, expect) in [
            (
                json!({"num_kv_shared_layers": 3}),
                "layer 4 shares the keys and values of an earlier full layer (num_kv_shared_layers 3), but no layer before 4 is full",
            ),
            (
                json!({"num_kv_shared_layers": 36}),
                "`num_kv_shared_layers` 36 is more than the 35 layers",
            ),
            (
                json!({"vocab_size_per_layer_input": 128}),
                "`vocab_size_per_layer_input` 128 is smaller than `vocab_size` 256",
            ),
        ] {
            let mut config = e2b.clone();
            config
                .as_object_mut()
                .unwrap()
                .extend(change.as_object().unwrap().clone());
            if change.get("num_kv_shared_layers") == Some(&json!(3)) {
                config["num_hidden_layers"] = json!(7);
                config["layer_types"] = json!([
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "sliding_attention",
                    "full_attention",
                    "sliding_attention",
                    "full_attention"
                ]);
            }
            let e = from(config).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("config.json"), "{e}");
        }

        for (change, expect) in [
            (
                json!({"enable_moe_block": true}),
                "`num_experts` must be set when `enable_moe_block` is true",
            ),
            (
                json!({"enable_moe_block": true, "num_experts": 4, "top_k_experts": 5,
                       "moe_intermediate_size": 8}),
                "`top_k_experts` (5) must be from 1 to `num_experts` (4)",
            ),
            (
                json!({"use_bidirectional_attention": "all"}),
                "use_bidirectional_attention",
            ),
            (
                json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention true",
            ),
            (
                json!({"sliding_window": null}),
                "`sliding_window` must be set",
            ),
            (
                json!({"per_layer_config": {"sliding_attention": {"head_dim": 8}}}),
                "`per_layer_config.sliding_attention`",
            ),
            (
                json!({"per_layer_config": {"05": {"head_dim": 64}}}),
                "the full layers have heads of different sizes",
            ),
            (
                json!({"global_head_dim": 3}),
                "head_dim 3 (from global_head_dim / num_global_key_value_heads)",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}}}),
                "partial_rotary_factor 0.5 is not supported for gemma4_text",
            ),
            (
                json!({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}}),
                "rope type `linear` on the sliding layers",
            ),
        ] {
            let mut config = base.clone();
            config
                .as_object_mut()
                .unwrap()
                .extend(change.as_object().unwrap().clone());
            let e = from(config).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains("config.json"), "{e}");
        }
        // The multimodal folder: the text decoder under model.language_model, the cap kept.
        let multimodal = json!({"model_type": "gemma4", "text_config": base});
        let c = from(multimodal).unwrap();
        assert_eq!(c.multimodal, Some(Multimodal::Gemma4));
        assert_eq!(c.tensor("norm.weight"), "model.language_model.norm.weight");
    }

    #[test]
    fn bad_layer_attention_fields_are_named() {
        use serde_json::json;
        for (model_type, extra, expect) in [
            (
                "ministral",
                json!({"layer_types": ["full_attention"]}),
                "`layer_types` has 1 entries for 4 layers",
            ),
            (
                "ministral",
                json!({"layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention"]}),
                "chunked_attention",
            ),
            (
                "mistral",
                json!({"sliding_window": 0}),
                "`sliding_window` must be positive",
            ),
            (
                "smollm3",
                json!({"no_rope_layers": [1, 1]}),
                "`no_rope_layers` has 2 entries",
            ),
            (
                "smollm3",
                json!({"no_rope_layers": [1, 2, 1, 1]}),
                "`no_rope_layers` holds 1",
            ),
            (
                "qwen3",
                json!({"rope_scaling": {"type": "yarn", "factor": -2.0}, "max_position_embeddings": 64}),
                "the yarn rope factor must be positive",
            ),
            (
                "qwen3",
                json!({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}}),
                "original_max_position_embeddings must be positive",
            ),
            (
                "llama",
                json!({"rope_scaling": {"type": "yarn", "factor": null}}),
                "missing required field `max_position_embeddings`",
            ),
            (
                "llama",
                json!({"rope_theta": 1.0, "max_position_embeddings": 64,
                       "rope_scaling": {"type": "yarn", "factor": 2.0}}),
                "positive `rope_theta` above 1",
            ),
            (
                "llama",
                json!({"max_position_embeddings": 64,
                       "rope_scaling": {"type": "yarn", "factor": 2.0, "beta_slow": -1.0}}),
                "positive `beta_slow`",
            ),
            (
                "qwen3",
                json!({"partial_rotary_factor": 1.5}),
                "partial_rotary_factor must be in (0, 1], got 1.5",
            ),
            (
                "qwen3",
                json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor 0.5 is not supported for qwen3",
            ),
            (
                // int(10 x 0.3) = 3 channels: no whole pairs.
                "phi3",
                json!({"partial_rotary_factor": 0.3, "head_dim": 10}),
                "partial_rotary_factor 0.3 rotates 3 of 10 channels",
            ),
            (
                "phi3",
                json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.0],
                                         "long_factor": [1.0, 2.0]}}),
                "longrope `short_factor` has 2 entries; the rotated width 16 needs 8",
            ),
            (
                "phi3",
                json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 0.0],
                                         "long_factor": [1.0, 2.0]}}),
                "longrope `short_factor` must be a list of positive numbers",
            ),
            (
                "llama",
                json!({"rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                         "long_factor": [1.0]}}),
                "rope type `longrope` is not supported",
            ),
        ] {
            let err = parse(model_type, extra).unwrap_err().to_string();
            assert!(err.contains(expect) && err.contains("config.json"), "{err}");
        }
    }
}
