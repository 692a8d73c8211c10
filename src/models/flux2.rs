//! FLUX.2 [klein], the image transformer, written once as a graph builder: the timestep embedding and
//! the shared modulation, double-stream blocks (image and text with their own weights, joint
//! attention text first), single-stream blocks over the joined sequence, the final layer, the
//! flow-matching loss, and the backward into the LoRA matrices of the block linears (mirrored in
//! straight-line code as the decoder's is). ../shared/FLUX2-KLEIN.md has the architecture.
//!
//! Weights go by the BFL names (`double_blocks.0.img_attn.qkv.weight`): the LoRA targets are the fused
//! block linears, as ComfyUI and diffusers' Flux2 loader name them. The diffusers layout is mapped on
//! load (its split q/k/v joined, the final modulation's halves swapped).

use crate::config::GateActivation;
use crate::error::{Error, Result};
use crate::graph::{BufId, Builder, Graph, Input, Op, StepInputs};
use crate::model::{FrozenWeights, NamedWeights, TensorRef};
use crate::models::decoder::LoraSpec;
use crate::models::lora_linear::{self, LinearTape};
use crate::ops::attention::AttentionShape;
use crate::quant::QuantSpec;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The transformer's shape, from diffusers' `transformer/config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Flux2Config {
    pub double_blocks: usize,
    pub single_blocks: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Latent channels of a packed token, in and out.
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the text features (3 × the text encoder's hidden size).
    pub text_dim: usize,
    /// The SwiGLU's hidden width (M).
    pub mlp_hidden: usize,
    /// RoPE dimensions per id axis (t, h, w, l).
    pub axes_dims: Vec<usize>,
    pub rope_theta: f64,
    pub eps: f64,
    /// Width of the sinusoidal timestep features.
    pub time_dim: usize,
}

#[derive(Deserialize)]
struct DiffusersConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_layers: usize,
    num_single_layers: usize,
    attention_head_dim: usize,
    num_attention_heads: usize,
    in_channels: usize,
    out_channels: Option<usize>,
    joint_attention_dim: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default = "default_axes")]
    axes_dims_rope: Vec<usize>,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default = "default_time_dim")]
    timestep_guidance_channels: usize,
    #[serde(default)]
    guidance_embeds: bool,
}

fn default_mlp_ratio() -> f64 {
    3.0
}
fn default_axes() -> Vec<usize> {
    vec![32, 32, 32, 32]
}
fn default_theta() -> f64 {
    2000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_time_dim() -> usize {
    256
}

impl Flux2Config {
    /// Parses diffusers' transformer config; `path` names the file in errors.
    pub fn from_diffusers(text: &str, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let d: DiffusersConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("not a FLUX.2 config: {e}")))?;
        if let Some(class) = &d.class_name
            && class != "Flux2Transformer2DModel"
        {
            return Err(bad(format!(
                "_class_name is {class}, not Flux2Transformer2DModel"
            )));
        }
        if d.guidance_embeds {
            return Err(bad(
                "guidance_embeds is set: nibble trains the undistilled FLUX.2 [klein] base models, \
                 which have no guidance embedding"
                    .into(),
            ));
        }
        let c = Flux2Config {
            double_blocks: d.num_layers,
            single_blocks: d.num_single_layers,
            heads: d.num_attention_heads,
            head_dim: d.attention_head_dim,
            in_channels: d.in_channels,
            out_channels: d.out_channels.unwrap_or(d.in_channels),
            text_dim: d.joint_attention_dim,
            mlp_hidden: (d.num_attention_heads as f64 * d.attention_head_dim as f64 * d.mlp_ratio)
                as usize,
            axes_dims: d.axes_dims_rope,
            rope_theta: d.rope_theta,
            eps: d.eps,
            time_dim: d.timestep_guidance_channels,
        };
        c.check().map_err(bad)?;
        Ok(c)
    }

    fn check(&self) -> std::result::Result<(), String> {
        const MAX: usize = 1 << 20;
        let sizes = [
            ("num_attention_heads", self.heads),
            ("attention_head_dim", self.head_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("joint_attention_dim", self.text_dim),
            ("timestep_guidance_channels", self.time_dim),
        ];
        for (name, v) in sizes {
            if v == 0 || v > MAX {
                return Err(format!("{name} is {v}: expected 1 to {MAX}"));
            }
        }
        if self.double_blocks > 1024 || self.single_blocks > 1024 {
            return Err("more than 1024 blocks".into());
        }
        if self.hidden() > 65536 {
            return Err(format!(
                "num_attention_heads x attention_head_dim is {}: expected at most 65536",
                self.hidden()
            ));
        }
        if !(1..=MAX).contains(&self.mlp_hidden) {
            return Err(format!(
                "mlp_ratio gives an MLP width of {}: expected 1 to {MAX}",
                self.mlp_hidden
            ));
        }
        if self.axes_dims.len() != 4 {
            return Err(format!(
                "axes_dims_rope has {} axes; FLUX.2's positions have 4 (t, h, w, l)",
                self.axes_dims.len()
            ));
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim
            || self.axes_dims.iter().any(|d| d % 2 == 1)
        {
            return Err(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims, self.head_dim
            ));
        }
        if self.time_dim % 2 == 1 {
            return Err("timestep_guidance_channels must be even".into());
        }
        if !(self.eps > 0.0 && self.rope_theta > 0.0) {
            return Err("eps and rope_theta must be positive".into());
        }
        Ok(())
    }

    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Every linear by BFL module path, with its (out, in) shape.
    pub fn linears(&self) -> Vec<(String, usize, usize)> {
        let (d, m) = (self.hidden(), self.mlp_hidden);
        let mut out = vec![
            ("img_in".to_string(), d, self.in_channels),
            ("txt_in".to_string(), d, self.text_dim),
            ("time_in.in_layer".to_string(), d, self.time_dim),
            ("time_in.out_layer".to_string(), d, d),
            ("double_stream_modulation_img.lin".to_string(), 6 * d, d),
            ("double_stream_modulation_txt.lin".to_string(), 6 * d, d),
            ("single_stream_modulation.lin".to_string(), 3 * d, d),
            ("final_layer.adaLN_modulation.1".to_string(), 2 * d, d),
            ("final_layer.linear".to_string(), self.out_channels, d),
        ];
        for i in 0..self.double_blocks {
            for s in ["img", "txt"] {
                let p = format!("double_blocks.{i}.{s}");
                out.push((format!("{p}_attn.qkv"), 3 * d, d));
                out.push((format!("{p}_attn.proj"), d, d));
                out.push((format!("{p}_mlp.0"), 2 * m, d));
                out.push((format!("{p}_mlp.2"), d, m));
            }
        }
        for j in 0..self.single_blocks {
            out.push((format!("single_blocks.{j}.linear1"), 3 * d + 2 * m, d));
            out.push((format!("single_blocks.{j}.linear2"), d, d + m));
        }
        out
    }

    /// The q/k RMSNorm scales by BFL name, each of head_dim.
    pub fn norms(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..self.double_blocks {
            for s in ["img", "txt"] {
                for n in ["query", "key"] {
                    out.push(format!("double_blocks.{i}.{s}_attn.norm.{n}_norm.scale"));
                }
            }
        }
        for j in 0..self.single_blocks {
            for n in ["query", "key"] {
                out.push(format!("single_blocks.{j}.norm.{n}_norm.scale"));
            }
        }
        out
    }

    /// The linears LoRA adapts by default: every linear inside a block (8 per double block, 2 per
    /// single block).
    pub fn block_linears(&self) -> Vec<(String, usize, usize)> {
        self.linears()
            .into_iter()
            .filter(|(p, _, _)| p.starts_with("double_blocks.") || p.starts_with("single_blocks."))
            .collect()
    }

    pub fn parameters(&self) -> u64 {
        let linears: u64 = self
            .linears()
            .iter()
            .map(|(_, o, i)| (*o * *i) as u64)
            .sum();
        linears + (self.norms().len() * self.head_dim) as u64
    }
}

/// Where a BFL tensor lives in the diffusers layout: the tensors whose rows it joins, and whether its
/// two halves of rows come swapped (the final modulation: diffusers keeps (scale, shift), BFL
/// (shift, scale)).
pub fn diffusers_names(bfl: &str) -> (Vec<String>, bool) {
    let one = |n: &str| (vec![format!("{n}.weight")], false);
    let stem = bfl.strip_suffix(".weight").unwrap_or(bfl);
    match stem {
        "img_in" => return one("x_embedder"),
        "txt_in" => return one("context_embedder"),
        "time_in.in_layer" => return one("time_guidance_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => return one("time_guidance_embed.timestep_embedder.linear_2"),
        "double_stream_modulation_img.lin" => return one("double_stream_modulation_img.linear"),
        "double_stream_modulation_txt.lin" => return one("double_stream_modulation_txt.linear"),
        "single_stream_modulation.lin" => return one("single_stream_modulation.linear"),
        "final_layer.adaLN_modulation.1" => return (vec!["norm_out.linear.weight".into()], true),
        "final_layer.linear" => return one("proj_out"),
        _ => {}
    }
    let parts: Vec<&str> = bfl.splitn(3, '.').collect();
    let (kind, index, rest) = (parts[0], parts[1], parts.get(2).copied().unwrap_or(""));
    if kind == "double_blocks" {
        let p = format!("transformer_blocks.{index}");
        let name = |n: &str| format!("{p}.{n}");
        let names: Vec<String> = match rest {
            "img_attn.qkv.weight" => ["to_q", "to_k", "to_v"]
                .iter()
                .map(|n| name(&format!("attn.{n}.weight")))
                .collect(),
            "txt_attn.qkv.weight" => ["add_q_proj", "add_k_proj", "add_v_proj"]
                .iter()
                .map(|n| name(&format!("attn.{n}.weight")))
                .collect(),
            "img_attn.proj.weight" => vec![name("attn.to_out.0.weight")],
            "txt_attn.proj.weight" => vec![name("attn.to_add_out.weight")],
            "img_mlp.0.weight" => vec![name("ff.linear_in.weight")],
            "img_mlp.2.weight" => vec![name("ff.linear_out.weight")],
            "txt_mlp.0.weight" => vec![name("ff_context.linear_in.weight")],
            "txt_mlp.2.weight" => vec![name("ff_context.linear_out.weight")],
            "img_attn.norm.query_norm.scale" => vec![name("attn.norm_q.weight")],
            "img_attn.norm.key_norm.scale" => vec![name("attn.norm_k.weight")],
            "txt_attn.norm.query_norm.scale" => vec![name("attn.norm_added_q.weight")],
            "txt_attn.norm.key_norm.scale" => vec![name("attn.norm_added_k.weight")],
            _ => vec![bfl.to_string()],
        };
        return (names, false);
    }
    if kind == "single_blocks" {
        let p = format!("single_transformer_blocks.{index}");
        let n = match rest {
            "linear1.weight" => "attn.to_qkv_mlp_proj.weight",
            "linear2.weight" => "attn.to_out.weight",
            "norm.query_norm.scale" => "attn.norm_q.weight",
            "norm.key_norm.scale" => "attn.norm_k.weight",
            _ => return (vec![bfl.to_string()], false),
        };
        return (vec![format!("{p}.{n}")], false);
    }
    (vec![bfl.to_string()], false)
}

/// A loaded transformer: linears (4-bit or bf16) and norm scales by BFL name.
pub struct Flux2Model {
    pub config: Flux2Config,
    pub weights: NamedWeights,
    pub quant: Option<QuantSpec>,
    pub source: String,
}

impl FrozenWeights for Flux2Model {
    fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        self.weights.named_tensors()
    }
}

/// The transformer folder of a diffusers FLUX.2 pipeline given as the pipeline's folder (the one
/// holding `model_index.json`), its `transformer/` folder, or a weights file in that folder.
pub fn transformer_folder(path: &Path) -> Option<PathBuf> {
    let weights_file = path.is_file() && path.extension().is_some_and(|e| e == "safetensors");
    let candidates = match weights_file {
        true => vec![path.parent()?.to_path_buf()],
        false => vec![path.join("transformer"), path.to_path_buf()],
    };
    candidates.into_iter().find(|d| {
        crate::fsutil::read_to_string(&d.join("config.json"))
            .is_ok_and(|t| t.contains("\"Flux2Transformer2DModel\""))
    })
}

/// The pipeline folder around a diffusers FLUX.2 transformer given as `path` (see
/// `transformer_folder`): where its text encoder, tokenizer and VAE are unless named. None for a
/// transformer outside a pipeline (a `transformer/` folder copied out, BFL's single files).
pub fn pipeline_folder(path: &Path) -> Option<PathBuf> {
    // `.` or a bare file name has no parent as typed.
    let path = &std::path::absolute(path).ok()?;
    let transformer = transformer_folder(path)?;
    if transformer == path.join("transformer") {
        return Some(path.to_path_buf());
    }
    let pipeline = transformer.parent()?;
    pipeline
        .join("model_index.json")
        .is_file()
        .then(|| pipeline.to_path_buf())
}

/// The key every FLUX.2 transformer file in BFL's naming holds, after an optional prefix
/// (`model.diffusion_model.` in some repackaged files).
#[cfg(not(target_arch = "wasm32"))]
const BFL_PROBE: &str = "double_blocks.0.img_attn.qkv.weight";

/// The prefix of the BFL names in `file`, if it is a FLUX.2 transformer in BFL's single-file layout.
#[cfg(not(target_arch = "wasm32"))]
fn bfl_prefix(file: &crate::source::SafetensorsFile) -> Option<String> {
    let prefix = file
        .tensor_names()
        .find_map(|n| n.strip_suffix(BFL_PROBE).map(str::to_string))?;
    // FLUX.1 files share the block names; FLUX.2's shared modulation is its own.
    file.info(&format!("{prefix}double_stream_modulation_img.lin.weight"))
        .map(|_| prefix)
}

/// A FLUX.2 transformer file in BFL's single-file layout (as Black Forest Labs publish klein), if
/// `path` is one: the file and the prefix of its names.
#[cfg(not(target_arch = "wasm32"))]
fn bfl_file(path: &Path) -> Result<Option<(crate::source::SafetensorsFile, String)>> {
    if !path.is_file() || path.extension().is_none_or(|e| e != "safetensors") {
        return Ok(None);
    }
    let file = crate::source::SafetensorsFile::open(path)?;
    Ok(bfl_prefix(&file).map(|prefix| (file, prefix)))
}

impl Flux2Config {
    /// The configuration of a transformer file in BFL's naming, read from its tensors' shapes (such
    /// files carry no config): widths from the embedders, heads from the q/k norms' width, blocks by
    /// counting, the MLP width from the first double block; RoPE and eps as klein has them.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_bfl(file: &crate::source::SafetensorsFile, prefix: &str) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            file.info(&format!("{prefix}{name}"))
                .map(|i| i.shape.clone())
                .ok_or_else(|| Error::Config {
                    path: file.path().to_path_buf(),
                    msg: format!("a FLUX.2 transformer file without {prefix}{name}"),
                })
        };
        let bad = |msg: String| Error::Config {
            path: file.path().to_path_buf(),
            msg,
        };
        if file
            .info(&format!("{prefix}guidance_in.in_layer.weight"))
            .is_some()
        {
            return Err(bad(
                "this FLUX.2 transformer embeds guidance (FLUX.2 [dev]); nibble trains klein"
                    .into(),
            ));
        }
        let matrix = |name: &str| -> Result<(usize, usize)> {
            match shape(name)?.as_slice() {
                [rows, cols] => Ok((*rows, *cols)),
                other => Err(bad(format!(
                    "{prefix}{name} has shape {other:?}, not a matrix"
                ))),
            }
        };
        let (hidden, in_channels) = matrix("img_in.weight")?;
        let (_, text_dim) = matrix("txt_in.weight")?;
        let (_, time_dim) = matrix("time_in.in_layer.weight")?;
        let (mlp_in, _) = matrix("double_blocks.0.img_mlp.0.weight")?;
        let (out_channels, _) = matrix("final_layer.linear.weight")?;
        let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?
            .iter()
            .product::<usize>();
        let count = |kind: &str| {
            file.tensor_names()
                .filter_map(|n| {
                    let rest = n.strip_prefix(prefix)?.strip_prefix(kind)?;
                    rest.split('.').next()?.parse::<usize>().ok()
                })
                .max()
                .map_or(0, |i| i + 1)
        };
        if head_dim == 0 || hidden % head_dim != 0 || head_dim % 4 != 0 || mlp_in % 2 != 0 {
            return Err(bad(format!(
                "widths that make no FLUX.2 transformer: hidden {hidden}, q/k norm {head_dim}, \
                 MLP input rows {mlp_in}"
            )));
        }
        let config = serde_json::json!({
            "_class_name": "Flux2Transformer2DModel",
            "num_layers": count("double_blocks."),
            "num_single_layers": count("single_blocks."),
            "attention_head_dim": head_dim,
            "num_attention_heads": hidden / head_dim,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "joint_attention_dim": text_dim,
            "mlp_ratio": (mlp_in / 2) as f64 / hidden as f64,
            "axes_dims_rope": vec![head_dim / 4; 4],
            "rope_theta": 2000,
            "eps": 1e-6,
            "timestep_guidance_channels": time_dim,
            "guidance_embeds": false,
            "patch_size": 1,
        });
        let mut c = Self::from_diffusers(&config.to_string(), file.path())?;
        // The width as stored, not as the ratio rounds it back.
        c.mlp_hidden = mlp_in / 2;
        Ok(c)
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// An FP8 tensor of a FLUX.2 file (`rows` x `cols`) as f32: its E4M3/E5M2 codes times the scale stored
/// beside it, one per tensor or per row, under the names FP8 files of these models use:
/// `weight_scale` (NVIDIA ModelOpt's, ComfyUI's current format), `scale_weight` (ComfyUI's older
/// "scaled fp8"), `weight_scale_inv` (transformers'). Input scales are ignored, as for the decoders.
fn float8_rows<'a>(
    find: &dyn Fn(&str) -> Result<&'a crate::source::SafetensorsFile>,
    (file, name, format): (
        &'a crate::source::SafetensorsFile,
        &str,
        crate::source::Float8,
    ),
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let stem = name.strip_suffix("weight").unwrap_or(name);
    let names = ["weight_scale", "scale_weight", "weight_scale_inv"].map(|s| format!("{stem}{s}"));
    let Some((scale, scale_file)) = names.iter().find_map(|n| Some((n, find(n).ok()?))) else {
        return Err(Error::tensor(
            file.path(),
            name,
            format!(
                "stored in 8-bit floats, but none of {} holds its scale",
                names.join(", ")
            ),
        ));
    };
    let shape = &scale_file.info(scale).expect("found").shape;
    let block = crate::model::float8_block(shape, rows, cols, None).ok_or_else(|| {
        Error::tensor(
            scale_file.path(),
            scale,
            format!("shape {shape:?} does not scale the weight `{name}` of shape [{rows}, {cols}]"),
        )
    })?;
    let stored = crate::model::StoredMatrix::float8(
        (file, name, format),
        (scale_file, scale),
        block,
        cols,
        false,
    )?;
    Ok(stored.rows_f32(rows, cols))
}

#[cfg(not(target_arch = "wasm32"))]
/// Loads a FLUX.2 transformer, the linears quantized with `quant` (bf16 without): from a diffusers
/// folder (a pipeline or its `transformer/`), or from one file in BFL's naming; FP8 files too
/// (`float8_rows`).
pub fn load(path: &Path, quant: Option<QuantSpec>) -> Result<Flux2Model> {
    use crate::model::{DenseData, DenseTensor, LinearWeight};
    use crate::quant::QuantTensor;
    use crate::source::SafetensorsFile;
    // Where each BFL tensor's rows are: (file, name) parts in order, and whether the halves swap.
    let (config, shards, prefix) = match bfl_file(path)? {
        Some((file, prefix)) => {
            // ComfyUI's quantized files in formats other than fp8 refused by name.
            crate::comfy_quant::check_markers(&file)?;
            (
                Flux2Config::from_bfl(&file, &prefix)?,
                vec![file],
                Some(prefix),
            )
        }
        None => {
            let dir = transformer_folder(path).ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                msg: "no FLUX.2 transformer here (expected transformer/config.json naming \
                      Flux2Transformer2DModel, or a transformer file in BFL's naming)"
                    .into(),
            })?;
            let config_path = dir.join("config.json");
            let text = crate::fsutil::read_to_string(&config_path)
                .map_err(|e| Error::io(&config_path, e))?;
            let config = Flux2Config::from_diffusers(&text, &config_path)?;
            (config, open_shards(&dir)?, None)
        }
    };
    let dir = path.to_path_buf();
    let find = |name: &str| -> Result<&SafetensorsFile> {
        shards
            .iter()
            .find(|f| f.info(name).is_some())
            .ok_or_else(|| Error::Config {
                path: dir.clone(),
                msg: format!("the tensor {name} is missing"),
            })
    };
    // Rows of a BFL tensor gathered from its parts, each checked for its shape.
    let read = |bfl: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
        let (names, swap) = match &prefix {
            Some(prefix) => (vec![format!("{prefix}{bfl}")], false),
            None => diffusers_names(bfl),
        };
        let mut data = Vec::new();
        for name in &names {
            let file = find(name)?;
            let shape = &file.info(name).expect("found").shape;
            let part_rows = rows / names.len();
            if shape.iter().product::<usize>() != part_rows * cols || shape.last() != Some(&cols) {
                return Err(Error::tensor(
                    file.path(),
                    name,
                    format!("shape {shape:?}, expected [{part_rows}, {cols}] for this config"),
                ));
            }
            match crate::source::Float8::of(file.info(name).expect("found").dtype) {
                Some(format) if format != crate::source::Float8::E8M0 => {
                    data.extend(float8_rows(&find, (file, name, format), part_rows, cols)?);
                }
                _ => data.extend_from_slice(&file.read_f32(name)?),
            }
        }
        if swap {
            let half = data.len() / 2;
            data.rotate_left(half);
        }
        Ok(data)
    };
    let mut weights = NamedWeights::default();
    for (path, out, inp) in config.linears() {
        let data = read(&format!("{path}.weight"), out, inp)?;
        let weight =
            match quant {
                Some(spec) => LinearWeight::Quant(
                    QuantTensor::quantize(spec, out, inp, &data).map_err(|e| Error::Config {
                        path: dir.clone(),
                        msg: format!("{path}: {e}"),
                    })?,
                ),
                None => LinearWeight::Dense(DenseTensor {
                    rows: out,
                    cols: inp,
                    // 16-bit, as checkpoints store them and as `planned_weight_bytes` counts.
                    data: DenseData::BF16(data.iter().map(|&v| half::bf16::from_f32(v)).collect()),
                }),
            };
        weights.linears.insert(format!("{path}.weight"), weight);
    }
    for name in config.norms() {
        let scale = read(&name, 1, config.head_dim)?;
        weights.vectors.insert(name, scale);
    }
    Ok(Flux2Model {
        config,
        weights,
        quant,
        source: path.display().to_string(),
    })
}

#[cfg(not(target_arch = "wasm32"))]
/// The safetensors files of a diffusers model folder: one file, or the shards its index names.
fn open_shards(dir: &Path) -> Result<Vec<crate::source::SafetensorsFile>> {
    use crate::source::SafetensorsFile;
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    if index.exists() {
        let text = crate::fsutil::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: index.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let mut files: Vec<String> = v["weight_map"]
            .as_object()
            .ok_or_else(|| Error::Config {
                path: index.clone(),
                msg: "no weight_map".into(),
            })?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return files
            .iter()
            .map(|f| SafetensorsFile::open(&dir.join(f)))
            .collect();
    }
    Ok(vec![SafetensorsFile::open(
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?])
}

/// What a step computes: its token counts and whether it runs the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flux2Step {
    /// Tokens of the image being denoised (whose velocity is the output).
    pub image_tokens: usize,
    /// Tokens of clean reference images after them in the image stream (edit or control images:
    /// attended to, given no velocity and no loss).
    pub reference_tokens: usize,
    pub text_tokens: usize,
    pub backward: bool,
    /// Gradient checkpointing: each block recomputed before its backward.
    pub checkpoint: bool,
}

impl Flux2Step {
    /// A training step at `resolution` pixels square (16 pixels per latent token: the VAE's 8x and
    /// 2x2 patches) with `text_tokens` of caption features.
    pub fn training(resolution: usize, text_tokens: usize, checkpoint: bool) -> Self {
        let side = resolution / 16;
        Flux2Step {
            image_tokens: side * side,
            reference_tokens: 0,
            text_tokens,
            backward: true,
            checkpoint,
        }
    }
}

/// The per-step values: noised latents, text features, timestep, RoPE tables and the target.
pub struct Flux2Inputs<'a> {
    /// x_σ = (1 − σ)·x0 + σ·noise [image tokens, in_channels].
    pub noised: &'a [f32],
    /// Text features [text tokens, text_dim].
    pub text: &'a [f32],
    pub sigma: f32,
    /// Position ids (t, h, w, l) of each image and each text token.
    pub image_ids: &'a [[f32; 4]],
    pub text_ids: &'a [[f32; 4]],
    /// noise − x0 [image tokens, out_channels].
    pub target: &'a [f32],
    pub grad_scale: f32,
}

/// The step's inputs: the timestep's sinusoidal features (t = 1000σ, cosines first), the RoPE tables of
/// the joined sequence (text first; each axis rotates its own adjacent pairs by its id coordinate).
pub fn inputs(c: &Flux2Config, i: &Flux2Inputs) -> StepInputs {
    // In f32 as diffusers computes the phases whatever the model's precision (at t = 370 a phase
    // rounds by up to 3e-5 rad, which moves the output by 1e-5 relative).
    let t = 1000.0 * i.sigma;
    let half = c.time_dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f32.ln()) * k as f32 / half as f32).exp())
        .collect();
    let time: Vec<f32> = freqs
        .iter()
        .map(|f| (t * f).cos())
        .chain(freqs.iter().map(|f| (t * f).sin()))
        .collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for ids in i.text_ids.iter().chain(i.image_ids) {
        for (axis, &dim) in c.axes_dims.iter().enumerate() {
            for j in 0..dim / 2 {
                let omega = c.rope_theta.powf(-2.0 * j as f64 / dim as f64);
                let angle = ids[axis] as f64 * omega;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let given: HashMap<String, Vec<f32>> =
        [("noised", i.noised), ("text", i.text), ("target", i.target)]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .chain([("time".to_string(), time)])
            .collect();
    StepInputs {
        cos,
        sin,
        grad_scale: i.grad_scale,
        given,
        ..StepInputs::default()
    }
}

/// Image ids (0, row, col, 0) of a rows × cols latent grid, row-major, and text ids (0, 0, 0, k).
pub fn position_ids(rows: usize, cols: usize, text: usize) -> (Vec<[f32; 4]>, Vec<[f32; 4]>) {
    let image = (0..rows * cols)
        .map(|i| [0.0, (i / cols) as f32, (i % cols) as f32, 0.0])
        .collect();
    let text = (0..text).map(|k| [0.0, 0.0, 0.0, k as f32]).collect();
    (image, text)
}

/// A reference image as the transformer reads it: its latent tokens [rows · cols, in_channels]
/// (`vae::encode`'s, BatchNorm-normalised as the images a run trains on).
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub tokens: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// The noised tokens followed by each reference's: the image stream as the transformer takes it
/// (`Flux2Step::reference_tokens` of them references).
pub fn with_reference_tokens(noised: &[f32], references: &[Reference]) -> Vec<f32> {
    let mut tokens = noised.to_vec();
    for r in references {
        tokens.extend_from_slice(&r.tokens);
    }
    tokens
}

/// The noised tokens' ids followed by each reference's (`reference_ids`).
pub fn with_reference_ids(image_ids: &[[f32; 4]], references: &[Reference]) -> Vec<[f32; 4]> {
    let mut ids = image_ids.to_vec();
    for (k, r) in references.iter().enumerate() {
        ids.extend(reference_ids(k, r.rows, r.cols));
    }
    ids
}

/// The ids (t, row, col, 0) of reference image `index`'s rows × cols latent grid: each reference on
/// its own time coordinate t = 10 · (index + 1), as Flux2KleinPipeline's `_prepare_image_ids` places
/// them, so that attention tells them from the image being drawn (t = 0) and from each other.
pub fn reference_ids(index: usize, rows: usize, cols: usize) -> Vec<[f32; 4]> {
    let t = 10.0 * (index + 1) as f32;
    (0..rows * cols)
        .map(|i| [t, (i / cols) as f32, (i % cols) as f32, 0.0])
        .collect()
}

/// One stream of a double block, as its forward ran.
struct StreamTape {
    x: BufId,
    a: BufId,
    a_stats: BufId,
    qkv: LinearTape,
    /// (pre-norm q, its scale, inverse RMS), the same for k.
    qk: [(BufId, BufId, BufId); 2],
    o: BufId,
    proj: LinearTape,
    x1: BufId,
    b: BufId,
    b_stats: BufId,
    mlp_in: LinearTape,
    gate: BufId,
    value: BufId,
    hidden: BufId,
    mlp_out: LinearTape,
}

struct DoubleTape {
    /// Text, then image.
    streams: [StreamTape; 2],
    attn: Attention,
}

struct SingleTape {
    h: BufId,
    a: BufId,
    a_stats: BufId,
    linear1: LinearTape,
    qk: [(BufId, BufId, BufId); 2],
    gate: BufId,
    value: BufId,
    attn: Attention,
    joined: BufId,
    linear2: LinearTape,
}

/// Joint attention's buffers: rotated q and k, v, the output and its log-sum-exps.
struct Attention {
    q: BufId,
    k: BufId,
    v: BufId,
    out: BufId,
    lse: BufId,
}

struct Flux<'a> {
    b: Builder,
    c: &'a Flux2Config,
    lora: Option<&'a LoraSpec>,
    step: Flux2Step,
}

impl Flux<'_> {
    fn tokens(&self) -> usize {
        self.step.image_tokens + self.step.reference_tokens + self.step.text_tokens
    }

    fn linear(&mut self, x: BufId, rows: usize, path: &str) -> (BufId, LinearTape) {
        let (_, out, inp) = self
            .c
            .linears()
            .into_iter()
            .find(|(p, _, _)| p == path)
            .expect("a linear of the config");
        let name = path.to_string();
        lora_linear::forward(
            &mut self.b,
            self.lora,
            x,
            (rows, out, inp),
            (name.clone(), name),
            None,
            None,
        )
    }

    fn linear_backward(&mut self, tape: &LinearTape, x: BufId, dy: BufId) -> BufId {
        let inp = self.b.len(x);
        let dx = self.b.activation(inp, format!("d {}", tape.path));
        lora_linear::backward(&mut self.b, tape, x, dy, dx);
        dx
    }

    fn op(&mut self, op: Op, inputs: &[BufId], len: usize, name: String) -> BufId {
        let y = self.b.activation(len, name);
        self.b.node(op, inputs, &[y], false);
        y
    }

    fn silu(&mut self, x: BufId, name: &str) -> BufId {
        let len = self.b.len(x);
        self.op(Op::Silu, &[x], len, name.into())
    }

    /// (1 + scale) ⊙ LayerNorm(x) + shift with vectors (shift, scale) of `mods`; also the row stats.
    fn modulate(
        &mut self,
        x: BufId,
        mods: BufId,
        (shift, scale): (usize, usize),
    ) -> (BufId, BufId) {
        let (len, d) = (self.b.len(x), self.c.hidden());
        let name = format!("{} modulated", self.b.name(x));
        let (y, stats) = (
            self.b.activation(len, name.clone()),
            self.b.activation(2 * len / d, name + " stats"),
        );
        let op = Op::LayerNormModulate {
            dim: d,
            eps: self.c.eps,
            shift,
            scale,
        };
        self.b.node(op, &[x, mods], &[y, stats], false);
        (y, stats)
    }

    /// dx += the gradient through `modulate` of dy.
    fn modulate_backward(
        &mut self,
        x: BufId,
        mods: BufId,
        stats: BufId,
        scale: usize,
        dy: BufId,
        dx: BufId,
    ) {
        let op = Op::LayerNormModulateBackward {
            dim: self.c.hidden(),
            eps: self.c.eps,
            scale,
        };
        self.b.node(op, &[x, mods, stats, dy], &[dx], true);
    }

    /// gate ⊙ y with vector `chunk` of `mods`.
    fn gate(&mut self, mods: BufId, chunk: usize, y: BufId) -> BufId {
        let len = self.b.len(y);
        let name = format!("gated {}", self.b.name(y));
        let d = self.c.hidden();
        self.op(Op::Gate { dim: d, chunk }, &[mods, y], len, name)
    }

    fn add(&mut self, a: BufId, b: BufId, name: String) -> BufId {
        let len = self.b.len(a);
        self.op(Op::Add, &[a, b], len, name)
    }

    fn rms_norm(&mut self, x: BufId, scale: &str) -> (BufId, BufId, BufId) {
        let hd = self.c.head_dim;
        let weight = self.b.weight(scale, hd);
        let len = self.b.len(x);
        let name = format!("{} normed", self.b.name(x));
        let (y, inv) = (
            self.b.activation(len, name.clone()),
            self.b.activation(len / hd, name + " inv_rms"),
        );
        self.b.node(
            Op::RmsNorm {
                dim: hd,
                eps: self.c.eps,
                offset: 0.0,
            },
            &[x, weight],
            &[y, inv],
            false,
        );
        (y, weight, inv)
    }

    fn rope(&mut self, x: BufId, inverse: bool) {
        let half = self.tokens() * self.c.head_dim / 2;
        let cos = self.b.input(Input::RopeCos, half);
        let sin = self.b.input(Input::RopeSin, half);
        let op = Op::Rope {
            heads: self.c.heads,
            head_dim: self.c.head_dim,
            rotated: self.c.head_dim,
            inverse,
            adjacent: true,
        };
        self.b.node(op, &[cos, sin], &[x], false);
    }

    fn shape(&self) -> AttentionShape {
        AttentionShape {
            tokens: self.tokens(),
            heads: self.c.heads,
            kv_heads: self.c.heads,
            head_dim: self.c.head_dim,
            causal: false,
            sinks: false,
        }
    }

    /// Joint attention over q, k, v [tokens, D] (q and k normed, rotated here in place).
    fn attention(&mut self, q: BufId, k: BufId, v: BufId, name: &str) -> Attention {
        self.rope(q, false);
        self.rope(k, false);
        let (t, d) = (self.tokens(), self.c.hidden());
        let out = self.b.activation(t * d, format!("{name}.attn"));
        let lse = self
            .b
            .activation(2 * self.c.heads * t, format!("{name}.lse"));
        self.b.node(
            Op::Attention {
                shape: self.shape(),
            },
            &[q, k, v],
            &[out, lse],
            false,
        );
        Attention { q, k, v, out, lse }
    }

    /// Gradients of the rotated q, k (rotated back: of the normed ones) and of v.
    fn attention_backward(&mut self, a: &Attention, d_out: BufId, name: &str) -> [BufId; 3] {
        let len = self.b.len(a.q);
        let [dq, dk, dv] = ["q", "k", "v"].map(|n| self.b.activation(len, format!("d {name}.{n}")));
        self.b.node(
            Op::AttentionBackward {
                shape: self.shape(),
            },
            &[a.q, a.k, a.v, a.out, a.lse, d_out],
            &[dq, dk, dv],
            false,
        );
        self.rope(dq, true);
        self.rope(dk, true);
        [dq, dk, dv]
    }

    fn rms_backward(&mut self, (x, weight, inv): (BufId, BufId, BufId), dy: BufId) -> BufId {
        let hd = self.c.head_dim;
        let len = self.b.len(x);
        let dx = self.b.activation(len, format!("d {}", self.b.name(x)));
        self.b.node(
            Op::RmsNormBackward {
                dim: hd,
                eps: self.c.eps,
                offset: 0.0,
            },
            &[x, weight, inv, dy],
            &[dx],
            false,
        );
        dx
    }

    /// The first half of a stream of a double block: the modulated input and q/k/v (q and k normed).
    fn stream_qkv(&mut self, i: usize, s: &str, x: BufId, mods: BufId, rows: usize) -> StreamQkv {
        let d = self.c.hidden();
        let p = format!("double_blocks.{i}.{s}_attn");
        let (a, a_stats) = self.modulate(x, mods, (0, 1));
        let (qkv, tape) = self.linear(a, rows, &format!("{p}.qkv"));
        let q = self.b.columns(qkv, 3 * d, (0, d), format!("{p}.q"));
        let k = self.b.columns(qkv, 3 * d, (d, d), format!("{p}.k"));
        let v = self.b.columns(qkv, 3 * d, (2 * d, d), format!("{p}.v"));
        let (qn, qw, qi) = self.rms_norm(q, &format!("{p}.norm.query_norm.scale"));
        let (kn, kw, ki) = self.rms_norm(k, &format!("{p}.norm.key_norm.scale"));
        StreamQkv {
            a,
            a_stats,
            q: qn,
            k: kn,
            v,
            qkv: tape,
            qk: [(q, qw, qi), (k, kw, ki)],
        }
    }
}

/// A double block stream's attention inputs.
struct StreamQkv {
    a: BufId,
    a_stats: BufId,
    q: BufId,
    k: BufId,
    v: BufId,
    qkv: LinearTape,
    qk: [(BufId, BufId, BufId); 2],
}

/// A training (or, without `backward`, evaluation) step of the transformer: the velocity it predicts
/// for the noised latents, the flow-matching loss against `target`, and the LoRA gradients.
pub fn build(c: &Flux2Config, lora: Option<&LoraSpec>, step: Flux2Step) -> Graph {
    let mut f = Flux {
        b: Builder::new(),
        c,
        lora,
        step,
    };
    // The image stream holds the noised tokens, then the references; only the former reach the
    // final layer.
    let (out_rows, l) = (step.image_tokens, step.text_tokens);
    let n = out_rows + step.reference_tokens;
    let t = n + l;
    let (d, m) = (c.hidden(), c.mlp_hidden);
    // The timestep embedding and every modulation: one row each.
    let time = f.b.given("time", c.time_dim);
    let (e1, _) = f.linear(time, 1, "time_in.in_layer");
    let e1 = f.silu(e1, "time_in.silu");
    let (temb, _) = f.linear(e1, 1, "time_in.out_layer");
    let act = f.silu(temb, "temb.silu");
    let (mod_img, _) = f.linear(act, 1, "double_stream_modulation_img.lin");
    let (mod_txt, _) = f.linear(act, 1, "double_stream_modulation_txt.lin");
    let (mod_single, _) = f.linear(act, 1, "single_stream_modulation.lin");
    let (mod_final, _) = f.linear(act, 1, "final_layer.adaLN_modulation.1");

    let noised = f.b.given("noised", n * c.in_channels);
    let text = f.b.given("text", l * c.text_dim);
    let (mut img, _) = f.linear(noised, n, "img_in");
    let (mut txt, _) = f.linear(text, l, "txt_in");

    let mut doubles = Vec::new();
    for i in 0..c.double_blocks {
        f.b.set_stage(Some(i), false);
        let tq = f.stream_qkv(i, "txt", txt, mod_txt, l);
        let iq = f.stream_qkv(i, "img", img, mod_img, n);
        let name = format!("double_blocks.{i}");
        let q =
            f.b.joined(&[(tq.q, 0), (iq.q, l * d)], t * d, format!("{name}.q"));
        let k =
            f.b.joined(&[(tq.k, 0), (iq.k, l * d)], t * d, format!("{name}.k"));
        let v =
            f.b.joined(&[(tq.v, 0), (iq.v, l * d)], t * d, format!("{name}.v"));
        let attn = f.attention(q, k, v, &name);
        let mut streams = Vec::new();
        for (s, x, mods, rows, offset, first) in [
            ("txt", txt, mod_txt, l, 0, tq),
            ("img", img, mod_img, n, l * d, iq),
        ] {
            let StreamQkv {
                a,
                a_stats,
                qkv,
                qk,
                ..
            } = first;
            let p = format!("double_blocks.{i}.{s}");
            let o =
                f.b.columns(attn.out, t * d, (offset, rows * d), format!("{p}.attn"));
            let (proj_y, proj) = f.linear(o, rows, &format!("{p}_attn.proj"));
            let gated = f.gate(mods, 2, proj_y);
            let x1 = f.add(x, gated, format!("{p}.x1"));
            let (bm, b_stats) = f.modulate(x1, mods, (3, 4));
            let (u, mlp_in) = f.linear(bm, rows, &format!("{p}_mlp.0"));
            let gate = f.b.columns(u, 2 * m, (0, m), format!("{p}.gate"));
            let value = f.b.columns(u, 2 * m, (m, m), format!("{p}.value"));
            let hidden = f.op(
                Op::Glu {
                    act: GateActivation::Silu,
                },
                &[gate, value],
                rows * m,
                format!("{p}.swiglu"),
            );
            let (mlp_y, mlp_out) = f.linear(hidden, rows, &format!("{p}_mlp.2"));
            let gated = f.gate(mods, 5, mlp_y);
            let x2 = f.add(x1, gated, format!("{p}.out"));
            streams.push((
                x2,
                StreamTape {
                    x,
                    a,
                    a_stats,
                    qkv,
                    qk,
                    o,
                    proj,
                    x1,
                    b: bm,
                    b_stats,
                    mlp_in,
                    gate,
                    value,
                    hidden,
                    mlp_out,
                },
            ));
        }
        let [(t_out, t_tape), (i_out, i_tape)]: [(BufId, StreamTape); 2] =
            streams.try_into().ok().expect("two streams");
        (txt, img) = (t_out, i_out);
        doubles.push(DoubleTape {
            streams: [t_tape, i_tape],
            attn,
        });
    }

    let mut h =
        f.b.joined(&[(txt, 0), (img, l * d)], t * d, "joined".into());
    let width = 3 * d + 2 * m;
    let mut singles = Vec::new();
    for j in 0..c.single_blocks {
        f.b.set_stage(Some(c.double_blocks + j), false);
        let p = format!("single_blocks.{j}");
        let (a, a_stats) = f.modulate(h, mod_single, (0, 1));
        let (y, linear1) = f.linear(a, t, &format!("{p}.linear1"));
        let q = f.b.columns(y, width, (0, d), format!("{p}.q"));
        let k = f.b.columns(y, width, (d, d), format!("{p}.k"));
        let v = f.b.columns(y, width, (2 * d, d), format!("{p}.v"));
        let gate = f.b.columns(y, width, (3 * d, m), format!("{p}.gate"));
        let value = f.b.columns(y, width, (3 * d + m, m), format!("{p}.value"));
        let (qn, qw, qi) = f.rms_norm(q, &format!("{p}.norm.query_norm.scale"));
        let (kn, kw, ki) = f.rms_norm(k, &format!("{p}.norm.key_norm.scale"));
        let attn = f.attention(qn, kn, v, &p);
        let hidden = f.op(
            Op::Glu {
                act: GateActivation::Silu,
            },
            &[gate, value],
            t * m,
            format!("{p}.swiglu"),
        );
        let joined =
            f.b.joined(&[(attn.out, 0), (hidden, d)], d + m, format!("{p}.joined"));
        let (out, linear2) = f.linear(joined, t, &format!("{p}.linear2"));
        let gated = f.gate(mod_single, 2, out);
        let next = f.add(h, gated, format!("{p}.out"));
        singles.push(SingleTape {
            h,
            a,
            a_stats,
            linear1,
            qk: [(q, qw, qi), (k, kw, ki)],
            gate,
            value,
            attn,
            joined,
            linear2,
        });
        h = next;
    }

    f.b.set_stage(None, false);
    let img_out =
        f.b.columns(h, t * d, (l * d, out_rows * d), "image out".into());
    let (fin, fin_stats) = f.modulate(img_out, mod_final, (0, 1));
    let (velocity, final_tape) = f.linear(fin, out_rows, "final_layer.linear");
    let v_out = f.b.output("velocity", out_rows * c.out_channels);
    f.b.node(Op::Add, &[velocity], &[v_out], true);
    let target = f.b.given("target", out_rows * c.out_channels);
    let loss = f.b.output("loss", 1);
    if !step.backward {
        f.b.node(Op::Mse, &[velocity, target], &[loss], false);
        return f.b.finish();
    }
    f.b.set_stage(None, true);
    let grad_scale = f.b.input(Input::GradScale, 1);
    let d_velocity = f.b.activation(out_rows * c.out_channels, "d velocity");
    f.b.node(
        Op::Mse,
        &[velocity, target, grad_scale],
        &[loss, d_velocity],
        false,
    );
    let d_fin = f.linear_backward(&final_tape, fin, d_velocity);
    let d_img_out = f.b.activation(out_rows * d, "d image out");
    f.modulate_backward(img_out, mod_final, fin_stats, 1, d_fin, d_img_out);
    // The residual stream's gradient, one buffer that every block adds into.
    let dh = f.b.activation(t * d, "d joined");
    f.b.node(
        Op::PlaceColumns {
            width: t * d,
            offset: l * d,
            len: out_rows * d,
        },
        &[d_img_out],
        &[dh],
        true,
    );

    for (j, s) in singles.iter().enumerate().rev() {
        f.b.set_stage(Some(c.double_blocks + j), true);
        let p = format!("single_blocks.{j}");
        let d_out = f.gate(mod_single, 2, dh);
        let d_joined = f.linear_backward(&s.linear2, s.joined, d_out);
        let d_attn = f.b.columns(d_joined, d + m, (0, d), format!("d {p}.attn"));
        let d_hidden =
            f.b.columns(d_joined, d + m, (d, m), format!("d {p}.swiglu"));
        let (dg, dv_) = (
            f.b.activation(t * m, format!("d {p}.gate")),
            f.b.activation(t * m, format!("d {p}.value")),
        );
        f.b.node(
            Op::GluBackward {
                act: GateActivation::Silu,
            },
            &[s.gate, s.value, d_hidden],
            &[dg, dv_],
            false,
        );
        let [dq, dk, dv] = f.attention_backward(&s.attn, d_attn, &p);
        let dq = f.rms_backward(s.qk[0], dq);
        let dk = f.rms_backward(s.qk[1], dk);
        let d_y = f.b.joined(
            &[(dq, 0), (dk, d), (dv, 2 * d), (dg, 3 * d), (dv_, 3 * d + m)],
            width,
            format!("d {p}.linear1"),
        );
        let d_a = f.linear_backward(&s.linear1, s.a, d_y);
        f.modulate_backward(s.h, mod_single, s.a_stats, 1, d_a, dh);
    }

    let offsets = [0, l * d];
    let rows = [l, n];
    let d_streams: Vec<BufId> = (0..2)
        .map(|s| {
            f.b.columns(
                dh,
                t * d,
                (offsets[s], rows[s] * d),
                format!("d stream {s}"),
            )
        })
        .collect();
    for (i, blk) in doubles.iter().enumerate().rev() {
        f.b.set_stage(Some(i), true);
        let mut d_o = Vec::new();
        for (s, st) in blk.streams.iter().enumerate() {
            let dx = d_streams[s];
            let d_mlp = f.gate(if s == 0 { mod_txt } else { mod_img }, 5, dx);
            let d_hidden = f.linear_backward(&st.mlp_out, st.hidden, d_mlp);
            let r = rows[s];
            let name = format!("double_blocks.{i}.{s}");
            let (dg, dv_) = (
                f.b.activation(r * m, format!("d {name}.gate")),
                f.b.activation(r * m, format!("d {name}.value")),
            );
            f.b.node(
                Op::GluBackward {
                    act: GateActivation::Silu,
                },
                &[st.gate, st.value, d_hidden],
                &[dg, dv_],
                false,
            );
            let d_u =
                f.b.joined(&[(dg, 0), (dv_, m)], 2 * m, format!("d {name}.mlp_in"));
            let d_b = f.linear_backward(&st.mlp_in, st.b, d_u);
            let mods = if s == 0 { mod_txt } else { mod_img };
            f.modulate_backward(st.x1, mods, st.b_stats, 4, d_b, dx);
            let d_proj = f.gate(mods, 2, dx);
            d_o.push(f.linear_backward(&st.proj, st.o, d_proj));
        }
        let d_attn = f.b.joined(
            &[(d_o[0], 0), (d_o[1], l * d)],
            t * d,
            format!("d double_blocks.{i}.attn"),
        );
        let name = format!("double_blocks.{i}");
        let [dq, dk, dv] = f.attention_backward(&blk.attn, d_attn, &name);
        for (s, st) in blk.streams.iter().enumerate() {
            let (offset, len) = (offsets[s], rows[s] * d);
            let dq_s =
                f.b.columns(dq, t * d, (offset, len), format!("d {name}.{s}.q"));
            let dk_s =
                f.b.columns(dk, t * d, (offset, len), format!("d {name}.{s}.k"));
            let dv_s =
                f.b.columns(dv, t * d, (offset, len), format!("d {name}.{s}.v"));
            let dq_s = f.rms_backward(st.qk[0], dq_s);
            let dk_s = f.rms_backward(st.qk[1], dk_s);
            let d_qkv = f.b.joined(
                &[(dq_s, 0), (dk_s, d), (dv_s, 2 * d)],
                3 * d,
                format!("d {name}.{s}.qkv"),
            );
            let d_a = f.linear_backward(&st.qkv, st.a, d_qkv);
            let mods = if s == 0 { mod_txt } else { mod_img };
            f.modulate_backward(st.x, mods, st.a_stats, 1, d_a, d_streams[s]);
        }
    }
    let graph = f.b.finish();
    if step.checkpoint {
        crate::graph::checkpoint::apply(&graph, crate::graph::checkpoint::Keep::F32)
    } else {
        graph
    }
}

/// Bytes the transformer's weights take: with `quant`, every linear packed and the norm scales f32;
/// without, every parameter at 16 bits (the checkpoint's size).
pub fn planned_weight_bytes(c: &Flux2Config, quant: Option<QuantSpec>) -> u64 {
    let Some(spec) = quant else {
        return 2 * c.parameters();
    };
    let linears: u64 = c
        .linears()
        .iter()
        .map(|(_, out, inp)| spec.packed_bytes(*out, *inp))
        .sum();
    linears + 4 * (c.norms().len() * c.head_dim) as u64
}

/// The memory of a training step: weights, LoRA (rank r on the block linears `targets` name, as
/// training resolves them) with its gradients and AdamW's moments, and the step's buffers at its
/// worst node, from the graph that runs.
pub fn plan(
    c: &Flux2Config,
    quant: Option<QuantSpec>,
    (rank, targets): (usize, &[String]),
    step: Flux2Step,
) -> Result<crate::plan::Plan> {
    let targets = crate::lora::resolve_among(c.block_linears(), targets)?;
    let spec = LoraSpec::uniform(targets.iter().map(|(p, _, _)| p.clone()), rank, 0.0);
    Ok(crate::plan::Plan::new(
        planned_weight_bytes(c, quant),
        targets
            .iter()
            .map(|(_, out, inp)| (*out, *inp, rank, false)),
        &build(c, Some(&spec), step),
    ))
}

/// The transformer config of a FLUX.2 model (a diffusers pipeline folder, its `transformer/` folder,
/// that folder's config.json, or a transformer file in BFL's naming), if `path` is one: in a folder,
/// weights need not be present.
pub fn config_at(path: &Path) -> Result<Option<Flux2Config>> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some((file, prefix)) = bfl_file(path)? {
        return Flux2Config::from_bfl(&file, &prefix).map(Some);
    }
    let file = if path.is_file() && path.extension().is_some_and(|e| e == "json") {
        path.to_path_buf()
    } else {
        match transformer_folder(path) {
            Some(dir) => dir.join("config.json"),
            None => return Ok(None),
        }
    };
    let text = crate::fsutil::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    if !text.contains("\"Flux2Transformer2DModel\"") {
        return Ok(None);
    }
    Flux2Config::from_diffusers(&text, &file).map(Some)
}

/// The text encoder's layers whose outputs (Hugging Face's `hidden_states[n]`, before the final norm)
/// make a caption's features, in the order they are joined per token.
pub const TEXT_LAYERS: [usize; 3] = [9, 18, 27];

/// The caption tokens the transformer reads: every caption is padded (or cut) to this many.
pub const TEXT_TOKENS: usize = 512;

/// A caption's features as the klein pipeline computes them: the caption as one user message through
/// the text encoder's chat template (generation prompt, thinking disabled), padded on the right with
/// the pad token (or cut) to `tokens`, run through the Qwen3 text encoder with padding masked, the
/// outputs of layers 9, 18 and 27 joined per token: [tokens, 3 · hidden]. Padding positions keep their
/// features (the transformer attends to them).
#[cfg(not(target_arch = "wasm32"))]
pub fn caption_features(
    encoder: &crate::model::Model,
    executor: crate::exec::Forward,
    tokenizer: &crate::tokenizer::ChatTokenizer,
    caption: &str,
    tokens: usize,
) -> Result<Vec<f32>> {
    let c = &encoder.config;
    // Padding past a sliding window's reach would see no key at all (transformers' fully masked rows):
    // FLUX.2's Qwen3 encoders have no windows, and nibble does not guess what one would give.
    if c.layers.iter().any(|l| l.window.is_some()) {
        return Err(Error::Invalid(
            "the text encoder has sliding-window layers; FLUX.2's Qwen3 text encoders have none"
                .into(),
        ));
    }
    if c.num_layers < TEXT_LAYERS[2] {
        return Err(Error::Invalid(format!(
            "the text encoder has {} layers; FLUX.2 reads the outputs of layers {TEXT_LAYERS:?}",
            c.num_layers
        )));
    }
    let message = crate::tokenizer::Message::new("user", caption);
    let prompt = tokenizer.template()?.render_with(
        &[message],
        true,
        &crate::tokenizer::TemplateArgs::thinking(false),
    )?;
    let mut ids = tokenizer.encode(&prompt)?;
    ids.truncate(tokens);
    let real = ids.len();
    let pad = tokenizer.token_id("<|endoftext|>").ok_or_else(|| {
        Error::Invalid("the text tokenizer has no <|endoftext|> pad token".into())
    })?;
    ids.resize(tokens, pad);
    let positions: Vec<u32> = (0..tokens as u32).collect();
    let (cos, sin) = crate::ops::rope::model_tables(c, &positions);
    let inputs = StepInputs {
        ids,
        cos,
        sin,
        first_key: vec![0; tokens],
        window_first_key: crate::models::decoder::window_first_keys(c, &vec![0; tokens], 0),
        key_end: vec![real as u32; tokens],
        ..StepInputs::default()
    };
    let graph = crate::models::decoder::hidden_states(c, &TEXT_LAYERS, tokens, true);
    let names = TEXT_LAYERS.map(|l| format!("hidden.{l}"));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let layers = executor.run(&graph, encoder, &inputs, &names)?;
    let h = c.hidden_size;
    Ok((0..tokens)
        .flat_map(|t| {
            layers
                .iter()
                .flat_map(move |layer| layer[t * h..(t + 1) * h].iter().copied())
        })
        .collect())
}
