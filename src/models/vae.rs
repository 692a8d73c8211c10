//! The FLUX.2 VAE's encoder (diffusers' AutoencoderKLFlux2) as a graph builder, and what turns an
//! image into the transformer's latent tokens: the posterior mean, 2x2 patches of it (128 channels),
//! normalised by the VAE's BatchNorm statistics. Activations are pixels by channels throughout.

#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Result};
use crate::graph::{BufId, Builder, Graph, Op};
use crate::model::{FrozenWeights, NamedWeights, TensorRef};
use crate::ops::attention::AttentionShape;
use crate::ops::conv::ConvShape;
use serde::Deserialize;

/// The encoder's shape, from the VAE's config.json.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub latent_channels: usize,
    pub in_channels: usize,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    pub batch_norm_eps: f64,
}

fn yes() -> bool {
    true
}

impl VaeConfig {
    /// The encoder nibble runs: RGB in, four levels (8x down), widths that GroupNorm's groups divide.
    #[cfg(not(target_arch = "wasm32"))]
    fn check(&self) -> std::result::Result<(), String> {
        let levels = &self.block_out_channels;
        if self.in_channels != 3 {
            return Err(format!(
                "in_channels is {}: images are RGB (3)",
                self.in_channels
            ));
        }
        if levels.len() != 4 {
            return Err(format!(
                "block_out_channels has {} levels; the FLUX.2 VAE has 4 (8x down)",
                levels.len()
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0
            || levels
                .iter()
                .any(|c| *c == 0 || *c > 65536 || c % groups != 0)
        {
            return Err(
                "block_out_channels must be positive multiples of norm_num_groups, at most 65536"
                    .into(),
            );
        }
        if !(1..=16).contains(&self.layers_per_block) || !(1..=1024).contains(&self.latent_channels)
        {
            return Err("layers_per_block must be 1 to 16 and latent_channels 1 to 1024".into());
        }
        if !self.batch_norm_eps.is_finite() || self.batch_norm_eps <= 0.0 {
            return Err("batch_norm_eps must be positive".into());
        }
        Ok(())
    }
}

/// GroupNorm's eps throughout the encoder.
const NORM_EPS: f64 = 1e-6;

/// A loaded VAE encoder with its BatchNorm statistics.
pub struct Vae {
    pub config: VaeConfig,
    pub weights: NamedWeights,
    pub running_mean: Vec<f32>,
    pub running_var: Vec<f32>,
}

impl FrozenWeights for Vae {
    fn named_tensors(&self) -> Vec<(String, TensorRef<'_>)> {
        self.weights.named_tensors()
    }
}

/// Loads the encoder half of a FLUX.2 VAE: a diffusers folder (config.json and
/// diffusion_pytorch_model.safetensors), or one safetensors file in Black Forest Labs' naming
/// (`flux2-vae.safetensors`, as ComfyUI users download it; any prefix before `encoder.`).
#[cfg(not(target_arch = "wasm32"))]
pub fn load(path: &std::path::Path) -> Result<Vae> {
    if path.is_dir() {
        return load_folder(path);
    }
    let file = crate::source::SafetensorsFile::open(path)?;
    let prefix = file
        .tensor_names()
        .find_map(|n| n.strip_suffix("encoder.conv_in.weight"))
        .map(str::to_string)
        .ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            msg: "not a VAE file: no encoder.conv_in.weight (give a FLUX.2 VAE file in BFL's naming, \
                  or a diffusers VAE folder)"
                .into(),
        })?;
    let config = bfl_config(&file, &prefix).map_err(|msg| Error::Config {
        path: path.to_path_buf(),
        msg,
    })?;
    read_encoder(&file, config, &format!("{prefix}bn."), |name| {
        name.strip_prefix(prefix.as_str()).and_then(diffusers_name)
    })
}

#[cfg(not(target_arch = "wasm32"))]
fn load_folder(dir: &std::path::Path) -> Result<Vae> {
    let config_path = dir.join("config.json");
    let text =
        crate::fsutil::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: VaeConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config_path.clone(),
        msg: format!("not a FLUX.2 VAE config: {e}"),
    })?;
    config.check().map_err(|msg| Error::Config {
        path: config_path,
        msg,
    })?;
    let file =
        crate::source::SafetensorsFile::open(&dir.join("diffusion_pytorch_model.safetensors"))?;
    read_encoder(&file, config, "bn.", |name| {
        (name.starts_with("encoder.") || name.starts_with("quant_conv.")).then(|| name.to_string())
    })
}

/// The encoder's shape read off a BFL-named file's tensors. GroupNorm's group count and the
/// BatchNorm eps are not stored there: they are the FLUX.2 VAE's (32 and 1e-4).
#[cfg(not(target_arch = "wasm32"))]
fn bfl_config(
    file: &crate::source::SafetensorsFile,
    prefix: &str,
) -> std::result::Result<VaeConfig, String> {
    let shape = |name: &str| {
        file.info(&format!("{prefix}{name}"))
            .map(|i| i.shape.clone())
    };
    let conv_in = shape("encoder.conv_in.weight").unwrap_or_default();
    let in_channels = *conv_in
        .get(1)
        .ok_or("encoder.conv_in.weight is not a conv kernel")?;
    let block_out_channels: Vec<usize> = (0..)
        .map_while(|i| shape(&format!("encoder.down.{i}.block.0.conv1.weight")))
        .map(|s| s.first().copied().unwrap_or(0))
        .collect();
    let layers_per_block = (0..)
        .take_while(|j| shape(&format!("encoder.down.0.block.{j}.conv1.weight")).is_some())
        .count();
    let conv_out = shape("encoder.conv_out.weight").ok_or("no encoder.conv_out.weight")?;
    if shape("bn.running_mean").is_none() {
        return Err(
            "no bn.running_mean: not a FLUX.2 VAE (FLUX.1's ae.safetensors has no \
                    BatchNorm statistics)"
                .into(),
        );
    }
    let config = VaeConfig {
        block_out_channels,
        layers_per_block,
        norm_num_groups: 32,
        latent_channels: conv_out.first().copied().unwrap_or(0) / 2,
        in_channels,
        mid_block_add_attention: shape("encoder.mid.attn_1.q.weight").is_some(),
        use_quant_conv: shape("encoder.quant_conv.weight").is_some(),
        batch_norm_eps: 1e-4,
    };
    config.check()?;
    Ok(config)
}

/// The diffusers name of an encoder tensor in BFL's (original LDM) naming; None for the decoder's
/// and the BatchNorm's.
#[cfg(not(target_arch = "wasm32"))]
fn diffusers_name(bfl: &str) -> Option<String> {
    let rest = bfl.strip_prefix("encoder.")?;
    let resnet = |s: &str| s.replace("nin_shortcut", "conv_shortcut");
    let name = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("encoder.conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("quant_conv.") {
        format!("quant_conv.{r}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        bfl.to_string()
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (level, r) = r.split_once('.')?;
        if let Some(r) = r.strip_prefix("block.") {
            format!("encoder.down_blocks.{level}.resnets.{}", resnet(r))
        } else {
            let r = r.strip_prefix("downsample.")?;
            format!("encoder.down_blocks.{level}.downsamplers.0.{r}")
        }
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (part, param) = r.split_once('.')?;
        let part = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("encoder.mid_block.attentions.0.{part}.{param}")
    } else if let Some(r) = rest.strip_prefix("mid.block_") {
        let (index, r) = r.split_once('.')?;
        let index: usize = index.parse().ok()?;
        format!(
            "encoder.mid_block.resnets.{}.{}",
            index.checked_sub(1)?,
            resnet(r)
        )
    } else {
        return None;
    };
    Some(name)
}

/// The encoder tensors of `file` under their diffusers names (`rename` gives None for the rest),
/// with the BatchNorm statistics `{bn}running_mean` and `{bn}running_var`.
#[cfg(not(target_arch = "wasm32"))]
fn read_encoder(
    file: &crate::source::SafetensorsFile,
    config: VaeConfig,
    bn: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<Vae> {
    use crate::model::{DenseData, DenseTensor, LinearWeight};
    let mut weights = NamedWeights::default();
    for name in file.tensor_names() {
        let Some(ours) = rename(name) else {
            continue;
        };
        let shape = &file.info(name).expect("listed").shape;
        let values = file.read_f32(name)?;
        if shape.len() >= 2 {
            // Conv kernels [out, in, k, k] and linears [out, in] (BFL's 1x1 convs in the attention
            // too), flattened per output channel.
            let rows = shape[0];
            let cols = values.len() / rows.max(1);
            let dense = DenseTensor {
                rows,
                cols,
                data: DenseData::F32(values),
            };
            weights.linears.insert(ours, LinearWeight::Dense(dense));
        } else {
            weights.vectors.insert(ours, values);
        }
    }
    let mean = format!("{bn}running_mean");
    let (running_mean, running_var) = (
        file.read_f32(&mean)?,
        file.read_f32(&format!("{bn}running_var"))?,
    );
    let channels = 4 * config.latent_channels;
    if running_mean.len() != channels || running_var.len() != channels {
        return Err(Error::tensor(
            file.path(),
            &mean,
            format!("expected {channels} statistics (the latent channels in 2x2 patches)"),
        ));
    }
    Ok(Vae {
        config,
        weights,
        running_mean,
        running_var,
    })
}

struct Encoder<'a> {
    b: Builder,
    c: &'a VaeConfig,
    /// The current resolution.
    height: usize,
    width: usize,
}

impl Encoder<'_> {
    fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn conv(
        &mut self,
        x: BufId,
        name: &str,
        (cin, cout): (usize, usize),
        (kernel, stride, pad): (usize, usize, [usize; 4]),
    ) -> BufId {
        let shape = ConvShape {
            height: self.height,
            width: self.width,
            channels: cin,
            kernel,
            stride,
            pad,
        };
        let (oh, ow) = shape.output();
        let weight = self
            .b
            .weight(&format!("{name}.weight"), cout * cin * kernel * kernel);
        let bias = self.b.weight(&format!("{name}.bias"), cout);
        let y = self.b.activation(oh * ow * cout, name);
        self.b
            .node(Op::Conv2d { shape }, &[x, weight, bias], &[y], false);
        (self.height, self.width) = (oh, ow);
        y
    }

    fn norm(&mut self, x: BufId, name: &str, channels: usize, silu: bool) -> BufId {
        let weight = self.b.weight(&format!("{name}.weight"), channels);
        let bias = self.b.weight(&format!("{name}.bias"), channels);
        let y = self.b.activation(self.b.len(x), name);
        let op = Op::GroupNorm {
            channels,
            groups: self.c.norm_num_groups,
            eps: NORM_EPS,
            silu,
        };
        self.b.node(op, &[x, weight, bias], &[y], false);
        y
    }

    fn add(&mut self, a: BufId, b: BufId, name: &str) -> BufId {
        let y = self.b.activation(self.b.len(a), name);
        self.b.node(Op::Add, &[a, b], &[y], false);
        y
    }

    fn resnet(&mut self, x: BufId, name: &str, (cin, cout): (usize, usize)) -> BufId {
        const SAME: (usize, usize, [usize; 4]) = (3, 1, [1; 4]);
        let a = self.norm(x, &format!("{name}.norm1"), cin, true);
        let h = self.conv(a, &format!("{name}.conv1"), (cin, cout), SAME);
        let a = self.norm(h, &format!("{name}.norm2"), cout, true);
        let h = self.conv(a, &format!("{name}.conv2"), (cout, cout), SAME);
        let shortcut = if cin == cout {
            x
        } else {
            self.conv(
                x,
                &format!("{name}.conv_shortcut"),
                (cin, cout),
                (1, 1, [0; 4]),
            )
        };
        self.add(shortcut, h, name)
    }

    fn linear(&mut self, x: BufId, name: &str, dim: usize) -> BufId {
        let weight = self.b.weight(&format!("{name}.weight"), dim * dim);
        let bias = self.b.weight(&format!("{name}.bias"), dim);
        let y = self.b.activation(self.b.len(x), name);
        self.b.node(
            Op::Linear { out: dim, inp: dim },
            &[x, weight, bias],
            &[y],
            false,
        );
        y
    }

    /// One head of self-attention over every pixel, with a residual.
    fn attention(&mut self, x: BufId, name: &str, channels: usize) -> BufId {
        let h = self.norm(x, &format!("{name}.group_norm"), channels, false);
        let [q, k, v] =
            ["to_q", "to_k", "to_v"].map(|p| self.linear(h, &format!("{name}.{p}"), channels));
        let tokens = self.pixels();
        let out = self.b.activation(tokens * channels, format!("{name}.attn"));
        let lse = self.b.activation(2 * tokens, format!("{name}.lse"));
        let shape = AttentionShape {
            tokens,
            heads: 1,
            kv_heads: 1,
            head_dim: channels,
            causal: false,
            sinks: false,
        };
        self.b
            .node(Op::Attention { shape }, &[q, k, v], &[out, lse], false);
        let o = self.linear(out, &format!("{name}.to_out.0"), channels);
        self.add(o, x, name)
    }
}

/// The encoder over an image of `height` x `width` pixels (multiples of 16): given `image` [H·W,
/// channels] in [−1, 1], output `moments` [H/8 · W/8, 2 · latent channels] (mean, then log-variance).
pub fn encoder_graph(c: &VaeConfig, height: usize, width: usize) -> Graph {
    let mut e = Encoder {
        b: Builder::new(),
        c,
        height,
        width,
    };
    let levels = &c.block_out_channels;
    let x = e.b.given("image", height * width * c.in_channels);
    let same = (3, 1, [1; 4]);
    let mut h = e.conv(x, "encoder.conv_in", (c.in_channels, levels[0]), same);
    let mut channels = levels[0];
    for (i, &out) in levels.iter().enumerate() {
        for j in 0..c.layers_per_block {
            h = e.resnet(
                h,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                (channels, out),
            );
            channels = out;
        }
        if i + 1 < levels.len() {
            // One zero row at the bottom and one zero column on the right, then stride 2.
            let name = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            h = e.conv(h, &name, (out, out), (3, 2, [0, 1, 0, 1]));
        }
    }
    h = e.resnet(h, "encoder.mid_block.resnets.0", (channels, channels));
    if c.mid_block_add_attention {
        h = e.attention(h, "encoder.mid_block.attentions.0", channels);
    }
    h = e.resnet(h, "encoder.mid_block.resnets.1", (channels, channels));
    let a = e.norm(h, "encoder.conv_norm_out", channels, true);
    let moments = 2 * c.latent_channels;
    let mut y = e.conv(a, "encoder.conv_out", (channels, moments), same);
    if c.use_quant_conv {
        y = e.conv(y, "quant_conv", (moments, moments), (1, 1, [0; 4]));
    }
    let out = e.b.output("moments", e.pixels() * moments);
    e.b.node(Op::Add, &[y], &[out], true);
    e.b.finish()
}

/// The transformer's latent tokens of an image (`pixels` [3, height, width] in [0, 1], sides
/// multiples of 16): [(height/16) · (width/16), 4 · latent channels], row-major over the token grid,
/// each token's channel c·4 + 2·row + column of its 2x2 patch, normalised by the BatchNorm statistics.
#[cfg(not(target_arch = "wasm32"))]
pub fn encode(
    vae: &Vae,
    executor: crate::exec::Forward,
    pixels: &[f32],
    (height, width): (usize, usize),
) -> Result<Vec<f32>> {
    let c = &vae.config;
    if height % 16 != 0 || width % 16 != 0 || height == 0 || width == 0 {
        return Err(Error::Invalid(format!(
            "image sides must be positive multiples of 16 (got {width}x{height})"
        )));
    }
    let channels = c.in_channels;
    // 2p − 1 in f32, as the pipeline's image processor computes it; pixels by channels.
    let image: Vec<f32> = (0..height * width)
        .flat_map(|p| (0..channels).map(move |ch| (p, ch)))
        .map(|(p, ch)| 2.0 * pixels[ch * height * width + p] - 1.0)
        .collect();
    let graph = encoder_graph(c, height, width);
    let inputs = crate::graph::StepInputs {
        given: [("image".to_string(), image)].into_iter().collect(),
        ..Default::default()
    };
    let moments = executor
        .run(&graph, vae, &inputs, &["moments"])?
        .pop()
        .expect("one output");
    let (lh, lw, latent) = (height / 8, width / 8, c.latent_channels);
    let stride = 2 * latent;
    let (th, tw) = (lh / 2, lw / 2);
    let mut tokens = vec![0f32; th * tw * 4 * latent];
    for i in 0..th {
        for j in 0..tw {
            let token = &mut tokens[(i * tw + j) * 4 * latent..][..4 * latent];
            for ch in 0..latent {
                for (pi, pj) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let k = ch * 4 + pi * 2 + pj;
                    let mean = moments[((2 * i + pi) * lw + 2 * j + pj) * stride + ch];
                    let std = (vae.running_var[k] + c.batch_norm_eps as f32).sqrt();
                    token[k] = (mean - vae.running_mean[k]) / std;
                }
            }
        }
    }
    Ok(tokens)
}
