//! `nibble info`: what a model is and what its weights take.

use super::{QuantArgs, group_digits, human_bytes, human_count};
use anyhow::Result;
use nibble::config::{GateActivation, RopeScaling};
use nibble::model;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Architecture, shapes, exact parameter count and the memory the weights take.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model folder or a file written by `nibble quantize`.
    model: PathBuf,
    #[command(flatten)]
    quant: QuantArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    show(&args.model, args.quant, args.json)
}

pub fn show(path: &Path, quant: QuantArgs, as_json: bool) -> Result<()> {
    if let Some(c) = nibble::models::flux2::config_at(path)? {
        return show_flux2(path, &c, quant, as_json);
    }
    let source = model::open(path)?;
    let c = &source.config;
    let spec = quant
        .planned_spec(source.stored_quant())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let params = c.parameter_count();
    let bytes16 = model::planned_weight_bytes(c, None);
    // A group size that divides none of some linear's rows is what `train` would refuse: said, not
    // sized.
    let quant_error = spec.and_then(|s| c.check_group_size(s.group_size).err());
    let bytes4 = spec
        .filter(|_| quant_error.is_none())
        .map(|s| model::planned_weight_bytes(c, Some(s)));
    let tokenizer = &source.tokenizer;
    // What every other command would say of it (a tokenizer that does not parse, or is another
    // model's), shown rather than refused: info describes what is there.
    let tokenizer_error = match tokenizer.tokenizer_json {
        Some(_) => source.chat_tokenizer().err().map(|e| e.to_string()),
        None => None,
    };
    let mut rope = match c.rope_scaling {
        RopeScaling::None => "none".to_string(),
        RopeScaling::Linear { factor } => format!("linear x{factor}"),
        RopeScaling::Proportional {
            factor,
            partial_rotary_factor,
        } => format!(
            "proportional: {} of {} frequencies rotate{}",
            (partial_rotary_factor * c.rotary_dim as f64 / 2.0).floor(),
            c.rotary_dim / 2,
            if factor != 1.0 {
                format!(", x{factor}")
            } else {
                String::new()
            }
        ),
        RopeScaling::Llama3 { factor, .. } => format!("llama3 x{factor}"),
        RopeScaling::Yarn {
            factor,
            attention_factor,
            ..
        } => format!("yarn x{factor} (attention factor {attention_factor:.4})"),
        RopeScaling::LongRope {
            original_max_position_embeddings,
            attention_factor,
            ..
        } => format!(
            "longrope, long factors past {original_max_position_embeddings} positions (attention factor {attention_factor:.4})"
        ),
    };
    // The global tables' layers (Gemma 4's full ones have heads of their own).
    let global_head_dim = c
        .layers
        .iter()
        .find(|l| !l.local_rope)
        .map_or(c.head_dim, |l| l.head_dim);
    if c.rotary_dim != global_head_dim {
        rope += &format!(
            ", rotating {} of {} channels per head",
            c.rotary_dim, global_head_dim
        );
    }
    if let Some(theta) = c.local_rope_theta
        && c.layers.iter().any(|l| l.local_rope)
    {
        rope += &format!("; sliding layers theta {theta}, unscaled");
    }
    // What sets the block apart from Llama's, in words.
    let mut block = vec![
        match c.gate_activation {
            GateActivation::Silu => "SwiGLU MLP",
            GateActivation::GeluTanh => "GeGLU MLP (gelu tanh)",
            GateActivation::ClampedSwiglu { .. } => "clamped SwiGLU MLP (gpt-oss)",
        }
        .to_string(),
    ];
    if let Some(m) = &c.moe {
        let sparse = m.sparse.iter().filter(|&&s| s).count();
        let weights = if m.normalize { ", renormalised" } else { "" };
        let shared = match m.shared_expert {
            _ if m.family.beside_dense_mlp() => {
                ", each chosen weight scaled by its expert's factor, added to the dense MLP's output"
                    .to_string()
            }
            0 => String::new(),
            width => format!(", beside a shared expert of width {width} gated per token"),
        };
        block.push(format!(
            "mixture of experts in {sparse} of {} layers: {} experts of width {}, {} per \
             token{weights}{shared}",
            c.num_layers, m.experts, m.inter, m.top_k
        ));
    }
    if c.norm_offset != 0.0 {
        block.push(format!("norms scale by ({} + w)", c.norm_offset));
    }
    if c.sandwich_norms {
        block.push("sandwich norms".into());
    }
    if c.embed_scale != 1.0 {
        block.push(format!("embeddings x{}", c.embed_scale));
    }
    if (c.attention_scale * (c.head_dim as f64).sqrt() - 1.0).abs() > 1e-12 {
        block.push(format!("attention scale {:.6}", c.attention_scale));
    }
    if c.fused_projections {
        block.push("fused qkv_proj and gate_up_proj".into());
    }
    if c.value_norm {
        block.push("v norm".into());
    }
    if let Some(full) = c
        .layers
        .iter()
        .find(|l| l.head_dim != c.head_dim || l.kv_heads != c.num_kv_heads)
    {
        block.push(format!(
            "full layers: head_dim {}, {} kv heads{}",
            full.head_dim,
            full.kv_heads,
            if full.values_from_keys {
                ", values from k_proj"
            } else {
                ""
            }
        ));
    }
    if c.layer_scalars {
        block.push("a scalar per layer".into());
    }
    if let Some(p) = c.per_layer_inputs {
        block.push(format!("per-layer inputs of {}", p.width));
    }
    let shared: Vec<(usize, usize)> = (0..c.num_layers)
        .filter_map(|l| c.layers[l].kv_from.map(|from| (l, from)))
        .collect();
    if let (Some(first), Some(last)) = (shared.first(), shared.last()) {
        let stores: std::collections::BTreeSet<usize> = shared.iter().map(|s| s.1).collect();
        block.push(format!(
            "layers {}-{} reuse the keys and values of layers {stores:?}{}",
            first.0,
            last.0,
            if c.double_wide_shared_mlp {
                " (MLPs twice as wide)"
            } else {
                ""
            }
        ));
    }
    if let Some(q) = c.query_position_scale {
        block.push(format!(
            "queries x(1 + {}·ln(1 + ⌊position / {}⌋))",
            q.beta, q.original_max_position_embeddings
        ));
    }
    if let Some(cap) = c.final_logit_softcapping {
        block.push(format!("logits soft-capped at {cap}"));
    }
    let block = block.join(", ");
    if as_json {
        let v = json!({
            "model": path,
            "architecture": c.model_type(),
            "class": c.class_name(),
            "layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "tie_word_embeddings": c.tie_word_embeddings,
            "qkv_bias": c.qkv_bias,
            "qk_norm": c.qk_norm,
            "sliding_window_layers": c.layers.iter().enumerate()
                .filter_map(|(l, a)| a.window.map(|w| json!({"layer": l, "window": w})))
                .collect::<Vec<_>>(),
            "layers_without_rope": (0..c.num_layers).filter(|&l| !c.layers[l].rope).collect::<Vec<_>>(),
            "per_layer_input_size": c.per_layer_inputs.map(|p| p.width),
            "kv_shared_layers": shared.iter().map(|&(l, from)| json!({"layer": l, "from": from})).collect::<Vec<_>>(),
            "rope_theta": c.rope_theta,
            "rope_scaling": rope,
            "block": block,
            "parameters": params,
            "weight_bytes_16bit": bytes16,
            "quant": spec.map(|s| json!({"format": s.format.name(), "group_size": s.group_size})),
            "weight_bytes_quantized": bytes4,
            "quant_error": quant_error,
            "stored_quant": source.stored_quant().map(|s| s.to_string()),
            "float8": c.float8.as_ref().map(|f| json!({"method": f.method, "block": f.block})),
            "tokenizer": tokenizer.tokenizer_json.is_some(),
            "tokenizer_error": tokenizer_error,
            "chat_template": tokenizer.chat_template_jinja.is_some()
                || tokenizer.tokenizer_config_json.as_deref().is_some_and(|t| t.contains("\"chat_template\"")),
        });
        println!("{v}");
        return Ok(());
    }
    println!("model         {}", path.display());
    if let Some(s) = source.stored_quant() {
        println!("stored as     {s}, quantized from {}", source.label());
    }
    if let Some(f) = &c.float8 {
        let scales = match f.block {
            Some([r, col]) => format!("a scale per {r} x {col} block"),
            None => "scales per tensor or row".to_string(),
        };
        println!(
            "stored as     FP8 ({}, {scales}): read as code · scale, then quantized like 16-bit weights",
            f.method
        );
    }
    println!("architecture  {} ({})", c.model_type(), c.class_name());
    println!(
        "shape         {} layers, hidden {}, intermediate {}, vocab {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    );
    println!(
        "attention     {} heads, {} kv heads (GQA x{}), head_dim {}{}{}{}{}",
        c.num_heads,
        c.num_kv_heads,
        c.num_heads / c.num_kv_heads,
        c.head_dim,
        if c.qkv_bias { ", q/k/v bias" } else { "" },
        if c.o_bias { ", o bias" } else { "" },
        if c.qk_norm { ", q/k norm" } else { "" },
        if c.attention_sinks { ", sinks" } else { "" }
    );
    let layers = c.layer_attention_summary();
    if !layers.is_empty() {
        println!("              {layers}");
    }
    println!("rope          theta {}, scaling {rope}", c.rope_theta);
    println!("block         {block}");
    println!(
        "embeddings    {}",
        if c.tie_word_embeddings {
            "tied to lm_head"
        } else {
            "untied"
        }
    );
    println!(
        "parameters    {} ({})",
        group_digits(params),
        human_count(params)
    );
    println!("weights       {} at 16-bit", human_bytes(bytes16));
    if let (Some(s), Some(b)) = (spec, bytes4) {
        let ratio = bytes16 as f64 / b as f64;
        // A small model's embeddings, which stay 16-bit, can be most of its weights.
        let smaller = match ratio >= 1.05 {
            true => format!("{ratio:.1}x smaller; embeddings stay 16-bit"),
            false => "about as large: its 16-bit embeddings are most of it".to_string(),
        };
        println!(
            "              {} with decoder linears in {s} ({smaller})",
            human_bytes(b)
        );
    }
    if let (Some(s), Some(e)) = (spec, &quant_error) {
        println!("              not in {s}: {e}");
    }
    println!(
        "tokenizer     {}",
        match (tokenizer.tokenizer_json.is_some(), tokenizer_error) {
            (false, _) => "none found".to_string(),
            (true, None) => "tokenizer.json present".to_string(),
            (true, Some(e)) => format!("unusable: {e}"),
        }
    );
    Ok(())
}

/// A FLUX.2 [klein] transformer, from its config alone.
fn show_flux2(
    path: &Path,
    c: &nibble::models::flux2::Flux2Config,
    quant: QuantArgs,
    as_json: bool,
) -> Result<()> {
    use nibble::models::flux2;
    let spec = quant.planned_spec(None)?;
    let params = c.parameters();
    let variant = match (c.double_blocks, c.single_blocks, c.hidden()) {
        (5, 20, 3072) => "FLUX.2 [klein] 4B",
        (8, 24, 4096) => "FLUX.2 [klein] 9B",
        _ => "FLUX.2 transformer",
    };
    let (bytes16, quantized) = (
        flux2::planned_weight_bytes(c, None),
        spec.map(|s| flux2::planned_weight_bytes(c, Some(s))),
    );
    let targets = c.block_linears().len();
    if as_json {
        let v = json!({
            "model": path,
            "architecture": "flux2",
            "variant": variant,
            "double_blocks": c.double_blocks,
            "single_blocks": c.single_blocks,
            "hidden_size": c.hidden(),
            "num_heads": c.heads,
            "head_dim": c.head_dim,
            "mlp_hidden": c.mlp_hidden,
            "text_dim": c.text_dim,
            "latent_channels": c.in_channels,
            "parameters": params,
            "lora_targets": targets,
            "weight_bytes_16bit": bytes16,
            "quant": spec.map(|s| json!({"format": s.format.name(), "group_size": s.group_size})),
            "weight_bytes_quantized": quantized,
        });
        println!("{v}");
        return Ok(());
    }
    println!("model         {}", path.display());
    println!("architecture  {variant} (Flux2Transformer2DModel, image transformer)");
    println!(
        "shape         {} double-stream + {} single-stream blocks, hidden {} ({} heads x {}), MLP {}",
        c.double_blocks,
        c.single_blocks,
        c.hidden(),
        c.heads,
        c.head_dim,
        c.mlp_hidden
    );
    println!(
        "inputs        latents of {} channels, text features of {}",
        c.in_channels, c.text_dim
    );
    println!(
        "parameters    {} ({})",
        group_digits(params),
        human_count(params)
    );
    println!("LoRA targets  {targets} fused block linears");
    println!("weights       {} at 16 bits", human_bytes(bytes16));
    if let (Some(s), Some(b)) = (spec, quantized) {
        println!("              {} as {s}", human_bytes(b));
    }
    Ok(())
}
