//! The FLUX.2 VAE (diffusers' AutoencoderKLFlux2) as graph builders: the encoder and what turns an
//! image into the transformer's latent tokens (the posterior mean, 2x2 patches of it (128 channels),
//! normalised by the VAE's BatchNorm statistics), and the decoder and what turns denoised tokens
//! back into pixels. Activations are pixels by channels throughout.

#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Result};
use crate::graph::{BufId, Builder, Graph, Op};
use crate::model::{FrozenWeights, NamedWeights, TensorRef};
use crate::ops::attention::AttentionShape;
use crate::ops::conv::ConvShape;
use serde::Deserialize;

/// The VAE's shape, from its config.json.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    /// The decoder's widths where they differ from the encoder's (some FLUX.2 VAEs ship a smaller
    /// decoder), in the same order: highest resolution first.
    #[serde(default)]
    pub decoder_block_out_channels: Option<Vec<usize>>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub latent_channels: usize,
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    pub batch_norm_eps: f64,
}

fn yes() -> bool {
    true
}

fn three() -> usize {
    3
}

/// Which half of the VAE to load: encoding images for training, or decoding samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    Encoder,
    Decoder,
}

impl VaeConfig {
    /// The decoder's widths, highest resolution first.
    pub fn decoder_widths(&self) -> &[usize] {
        self.decoder_block_out_channels
            .as_deref()
            .unwrap_or(&self.block_out_channels)
    }

    /// The VAE nibble runs: RGB in and out, four levels (8x down and up), widths of the half it
    /// loads that GroupNorm's groups divide.
    #[cfg(not(target_arch = "wasm32"))]
    fn check(&self, half: Half) -> std::result::Result<(), String> {
        for (name, channels) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if channels != 3 {
                return Err(format!("{name} is {channels}: images are RGB (3)"));
            }
        }
        let groups = self.norm_num_groups;
        let (name, levels) = match half {
            Half::Encoder => ("block_out_channels", &self.block_out_channels[..]),
            Half::Decoder => ("decoder_block_out_channels", self.decoder_widths()),
        };
        {
            if levels.len() != 4 {
                return Err(format!(
                    "{name} has {} levels; the FLUX.2 VAE has 4 (8x down)",
                    levels.len()
                ));
            }
            if groups == 0
                || levels
                    .iter()
                    .any(|c| *c == 0 || *c > 65536 || c % groups != 0)
            {
                return Err(format!(
                    "{name} must be positive multiples of norm_num_groups, at most 65536"
                ));
            }
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

/// GroupNorm's eps throughout the VAE.
const NORM_EPS: f64 = 1e-6;

/// One loaded half of a VAE with its BatchNorm statistics.
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

/// Loads one half of a FLUX.2 VAE: a diffusers folder (config.json and
/// diffusion_pytorch_model.safetensors), or one safetensors file in Black Forest Labs' naming
/// (`flux2-vae.safetensors`, as ComfyUI users download it; any prefix before `encoder.`).
#[cfg(not(target_arch = "wasm32"))]
pub fn load(path: &std::path::Path, half: Half) -> Result<Vae> {
    if path.is_dir() {
        return load_folder(path, half);
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
    let config = bfl_config(&file, &prefix)
        .and_then(|config| {
            if half == Half::Decoder && config.decoder_widths().is_empty() {
                return Err(
                    "no decoder.up.0.block.0.conv1.weight: the file holds no decoder".into(),
                );
            }
            config.check(half)?;
            Ok(config)
        })
        .map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
    let levels = config.decoder_widths().len();
    read_half(&file, config, &format!("{prefix}bn."), |name| {
        name.strip_prefix(prefix.as_str())
            .and_then(|bfl| diffusers_name(bfl, levels))
            .filter(|ours| half.holds(ours))
    })
}

impl Half {
    /// Whether a tensor of this diffusers name belongs to the half.
    #[cfg(not(target_arch = "wasm32"))]
    fn holds(self, name: &str) -> bool {
        let prefixes = match self {
            Half::Encoder => ["encoder.", "quant_conv."],
            Half::Decoder => ["decoder.", "post_quant_conv."],
        };
        prefixes.iter().any(|p| name.starts_with(p))
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn load_folder(dir: &std::path::Path, half: Half) -> Result<Vae> {
    let config_path = dir.join("config.json");
    let text =
        crate::fsutil::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: VaeConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config_path.clone(),
        msg: format!("not a FLUX.2 VAE config: {e}"),
    })?;
    config.check(half).map_err(|msg| Error::Config {
        path: config_path,
        msg,
    })?;
    let file =
        crate::source::SafetensorsFile::open(&dir.join("diffusion_pytorch_model.safetensors"))?;
    read_half(&file, config, "bn.", |name| {
        half.holds(name).then(|| name.to_string())
    })
}

/// The VAE's shape read off a BFL-named file's tensors. GroupNorm's group count and the
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
    // LDM numbers the decoder's levels from the highest resolution, as diffusers' widths are listed.
    let decoder_block_out_channels: Vec<usize> = (0..)
        .map_while(|i| shape(&format!("decoder.up.{i}.block.0.conv1.weight")))
        .map(|s| s.first().copied().unwrap_or(0))
        .collect();
    let out_channels = shape("decoder.conv_out.weight")
        .and_then(|s| s.first().copied())
        .unwrap_or(3);
    let conv_out = shape("encoder.conv_out.weight").ok_or("no encoder.conv_out.weight")?;
    if shape("bn.running_mean").is_none() {
        return Err(
            "no bn.running_mean: not a FLUX.2 VAE (FLUX.1's ae.safetensors has no \
                    BatchNorm statistics)"
                .into(),
        );
    }
    let config = VaeConfig {
        decoder_block_out_channels: (decoder_block_out_channels != block_out_channels)
            .then_some(decoder_block_out_channels),
        block_out_channels,
        out_channels,
        use_post_quant_conv: shape("decoder.post_quant_conv.weight").is_some(),
        layers_per_block,
        norm_num_groups: 32,
        latent_channels: conv_out.first().copied().unwrap_or(0) / 2,
        in_channels,
        mid_block_add_attention: shape("encoder.mid.attn_1.q.weight").is_some(),
        use_quant_conv: shape("encoder.quant_conv.weight").is_some(),
        batch_norm_eps: 1e-4,
    };
    Ok(config)
}

/// The diffusers name of a VAE tensor in BFL's (original LDM) naming, `levels` the decoder's; None
/// for the BatchNorm's.
#[cfg(not(target_arch = "wasm32"))]
fn diffusers_name(bfl: &str, levels: usize) -> Option<String> {
    let (half, rest) = bfl.split_once('.')?;
    if half != "encoder" && half != "decoder" {
        return None;
    }
    let resnet = |s: &str| s.replace("nin_shortcut", "conv_shortcut");
    let name = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("{half}.conv_norm_out.{r}")
    } else if rest.starts_with("quant_conv.") || rest.starts_with("post_quant_conv.") {
        // BFL keeps them inside the encoder and decoder; diffusers at the top level.
        rest.to_string()
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
    } else if let Some(r) = rest.strip_prefix("up.") {
        // LDM's level 0 is the highest resolution, diffusers' up block 0 the first to run.
        let (level, r) = r.split_once('.')?;
        let block = levels.checked_sub(1)?.checked_sub(level.parse().ok()?)?;
        if let Some(r) = r.strip_prefix("block.") {
            format!("decoder.up_blocks.{block}.resnets.{}", resnet(r))
        } else {
            let r = r.strip_prefix("upsample.")?;
            format!("decoder.up_blocks.{block}.upsamplers.0.{r}")
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
        format!("{half}.mid_block.attentions.0.{part}.{param}")
    } else if let Some(r) = rest.strip_prefix("mid.block_") {
        let (index, r) = r.split_once('.')?;
        let index: usize = index.parse().ok()?;
        format!(
            "{half}.mid_block.resnets.{}.{}",
            index.checked_sub(1)?,
            resnet(r)
        )
    } else {
        return None;
    };
    Some(name)
}

/// The tensors of `file` that `rename` gives diffusers names (None for the other half's), with the
/// BatchNorm statistics `{bn}running_mean` and `{bn}running_var`.
#[cfg(not(target_arch = "wasm32"))]
fn read_half(
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

/// A graph of either half under construction.
struct Net<'a> {
    b: Builder,
    c: &'a VaeConfig,
    /// The current resolution.
    height: usize,
    width: usize,
}

impl Net<'_> {
    fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn conv(
        &mut self,
        x: BufId,
        name: &str,
        (cin, cout): (usize, usize),
        (kernel, stride, pad, upsample): (usize, usize, [usize; 4], usize),
    ) -> BufId {
        let shape = ConvShape {
            height: self.height,
            width: self.width,
            channels: cin,
            kernel,
            stride,
            pad,
            upsample,
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
        let a = self.norm(x, &format!("{name}.norm1"), cin, true);
        let h = self.conv(a, &format!("{name}.conv1"), (cin, cout), SAME);
        let a = self.norm(h, &format!("{name}.norm2"), cout, true);
        let h = self.conv(a, &format!("{name}.conv2"), (cout, cout), SAME);
        let shortcut = if cin == cout {
            x
        } else {
            self.conv(x, &format!("{name}.conv_shortcut"), (cin, cout), POINTWISE)
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

    /// A resnet, attention over every pixel, and a resnet, at the lowest resolution.
    fn mid_block(&mut self, x: BufId, half: &str, channels: usize) -> BufId {
        let widths = (channels, channels);
        let h = self.resnet(x, &format!("{half}.mid_block.resnets.0"), widths);
        let h = if self.c.mid_block_add_attention {
            self.attention(h, &format!("{half}.mid_block.attentions.0"), channels)
        } else {
            h
        };
        self.resnet(h, &format!("{half}.mid_block.resnets.1"), widths)
    }
}

/// A 3x3 convolution keeping the size, and a 1x1 one.
const SAME: (usize, usize, [usize; 4], usize) = (3, 1, [1; 4], 1);
const POINTWISE: (usize, usize, [usize; 4], usize) = (1, 1, [0; 4], 1);

/// The encoder over an image of `height` x `width` pixels (multiples of 16): given `image` [H·W,
/// channels] in [−1, 1], output `moments` [H/8 · W/8, 2 · latent channels] (mean, then log-variance).
pub fn encoder_graph(c: &VaeConfig, height: usize, width: usize) -> Graph {
    let mut e = Net {
        b: Builder::new(),
        c,
        height,
        width,
    };
    let levels = &c.block_out_channels;
    let x = e.b.given("image", height * width * c.in_channels);
    let mut h = e.conv(x, "encoder.conv_in", (c.in_channels, levels[0]), SAME);
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
            h = e.conv(h, &name, (out, out), (3, 2, [0, 1, 0, 1], 1));
        }
    }
    h = e.mid_block(h, "encoder", channels);
    let a = e.norm(h, "encoder.conv_norm_out", channels, true);
    let moments = 2 * c.latent_channels;
    let mut y = e.conv(a, "encoder.conv_out", (channels, moments), SAME);
    if c.use_quant_conv {
        y = e.conv(y, "quant_conv", (moments, moments), POINTWISE);
    }
    let out = e.b.output("moments", e.pixels() * moments);
    e.b.node(Op::Add, &[y], &[out], true);
    e.b.finish()
}

/// The decoder over latents of `height` x `width` (an eighth of the image's sides): given `latents`
/// [height · width, latent channels] (de-normalised, out of their 2x2 patches), output `image` [8·height
/// · 8·width, out channels], in about [−1, 1].
pub fn decoder_graph(c: &VaeConfig, height: usize, width: usize) -> Graph {
    let mut d = Net {
        b: Builder::new(),
        c,
        height,
        width,
    };
    let levels = c.decoder_widths();
    let latent = c.latent_channels;
    let mut h = d.b.given("latents", height * width * latent);
    if c.use_post_quant_conv {
        h = d.conv(h, "post_quant_conv", (latent, latent), POINTWISE);
    }
    let mut channels = *levels.last().expect("four levels");
    h = d.conv(h, "decoder.conv_in", (latent, channels), SAME);
    h = d.mid_block(h, "decoder", channels);
    for (i, &out) in levels.iter().rev().enumerate() {
        for j in 0..=c.layers_per_block {
            let name = format!("decoder.up_blocks.{i}.resnets.{j}");
            h = d.resnet(h, &name, (channels, out));
            channels = out;
        }
        if i + 1 < levels.len() {
            // Nearest-neighbour enlargement, read by the convolution itself.
            let name = format!("decoder.up_blocks.{i}.upsamplers.0.conv");
            h = d.conv(h, &name, (out, out), (3, 1, [1; 4], 2));
        }
    }
    let a = d.norm(h, "decoder.conv_norm_out", channels, true);
    let y = d.conv(a, "decoder.conv_out", (channels, c.out_channels), SAME);
    let out = d.b.output("image", d.pixels() * c.out_channels);
    d.b.node(Op::Add, &[y], &[out], true);
    d.b.finish()
}

/// `graph`'s one output, given its one input.
#[cfg(not(target_arch = "wasm32"))]
fn run_graph(
    vae: &Vae,
    executor: crate::exec::Forward,
    graph: &Graph,
    (given, values): (&str, Vec<f32>),
    output: &str,
) -> Result<Vec<f32>> {
    let inputs = crate::graph::StepInputs {
        given: [(given.to_string(), values)].into_iter().collect(),
        ..Default::default()
    };
    Ok(executor
        .run(graph, vae, &inputs, &[output])?
        .pop()
        .expect("one output"))
}

/// A decoded image: `height` x `width` pixels of RGB in [0, 1], pixels by channels, as the klein
/// pipeline's image processor leaves it before its 8-bit image.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub rgb: Vec<f32>,
}

impl Image {
    /// The 8-bit pixels PIL is given: round(255 · value), halves to even as NumPy rounds.
    pub fn bytes(&self) -> Vec<u8> {
        self.rgb
            .iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect()
    }

    /// The 8-bit RGB pixels as a PNG, written whole or not at all.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn write_png(&self, path: &std::path::Path) -> Result<()> {
        use image::ImageEncoder;
        let bytes = self.bytes();
        crate::fsutil::write_atomically(path, |tmp| {
            let mut file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            image::codecs::png::PngEncoder::new(&mut file)
                .write_image(
                    &bytes,
                    self.width as u32,
                    self.height as u32,
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(std::io::Error::other)?;
            // A failed flush at drop would go unseen, and a short file would be renamed into place.
            file.into_inner().map_err(|e| e.into_error())?;
            Ok(())
        })
    }
}

/// The image of latent `tokens` [rows · cols, 4 · latent channels] (as the transformer denoises them:
/// normalised, in 2x2 patches, row-major): the BatchNorm statistics undone, the patches unfolded,
/// decoded, and (x / 2 + 1/2) clamped to [0, 1], as Flux2KleinPipeline does after its last step.
#[cfg(not(target_arch = "wasm32"))]
pub fn decode(
    vae: &Vae,
    executor: crate::exec::Forward,
    tokens: &[f32],
    (rows, cols): (usize, usize),
) -> Result<Image> {
    let c = &vae.config;
    let latent = c.latent_channels;
    if tokens.len() != rows * cols * 4 * latent || rows == 0 || cols == 0 {
        return Err(Error::Invalid(format!(
            "{} latent values do not make a {rows} x {cols} grid of {} channels",
            tokens.len(),
            4 * latent
        )));
    }
    let (lh, lw) = (2 * rows, 2 * cols);
    let mut latents = vec![0f32; lh * lw * latent];
    for (t, token) in tokens.chunks(4 * latent).enumerate() {
        let (i, j) = (t / cols, t % cols);
        for (k, &v) in token.iter().enumerate() {
            let (ch, pi, pj) = (k / 4, k / 2 % 2, k % 2);
            let std = (vae.running_var[k] + c.batch_norm_eps as f32).sqrt();
            latents[((2 * i + pi) * lw + 2 * j + pj) * latent + ch] = v * std + vae.running_mean[k];
        }
    }
    let graph = decoder_graph(c, lh, lw);
    let decoded = run_graph(vae, executor, &graph, ("latents", latents), "image")?;
    Ok(Image {
        height: 8 * lh,
        width: 8 * lw,
        rgb: decoded
            .iter()
            .map(|v| (v * 0.5 + 0.5).clamp(0.0, 1.0))
            .collect(),
    })
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
    let moments = run_graph(vae, executor, &graph, ("image", image), "moments")?;
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

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// Every decoder tensor of the tiny BFL-named fixture (scripts/make_flux2_vae_bfl_fixture.py,
    /// checked there against diffusers' converter) lands on the folder's tensor of the same values,
    /// LDM's reversed level numbers included, and each of the folder's decoder tensors is reached;
    /// the shape read off the file is the folder's config but for GroupNorm's groups (not stored in
    /// a BFL file, whose 32 do not divide the tiny decoder's 8 channels: refused on loading).
    #[test]
    fn bfl_decoder_names_are_the_folders() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux2");
        let bfl = crate::source::SafetensorsFile::open(&fixtures.join("tiny_vae_bfl.safetensors"))
            .unwrap();
        let folder = crate::source::SafetensorsFile::open(
            &fixtures.join("tiny_vae/diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let mut reached = Vec::new();
        for name in bfl.tensor_names() {
            let Some(ours) = diffusers_name(name, 4).filter(|n| Half::Decoder.holds(n)) else {
                continue;
            };
            assert_eq!(
                bfl.read_f32(name).unwrap(),
                folder.read_f32(&ours).unwrap(),
                "{name}"
            );
            reached.push(ours);
        }
        reached.sort();
        let mut want: Vec<String> = folder
            .tensor_names()
            .filter(|n| Half::Decoder.holds(n))
            .cloned()
            .collect();
        want.sort();
        assert!(
            want.iter()
                .any(|n| n.contains("up_blocks.3.resnets.0.conv_shortcut"))
        );
        assert_eq!(reached, want);
        let mut config = bfl_config(&bfl, "").unwrap();
        assert_eq!(config.decoder_widths(), [8, 16, 16, 32]);
        assert!(config.check(Half::Decoder).is_err());
        let text = std::fs::read_to_string(fixtures.join("tiny_vae/config.json")).unwrap();
        let folder: VaeConfig = serde_json::from_str(&text).unwrap();
        config.norm_num_groups = folder.norm_num_groups;
        assert_eq!(config, folder);
    }
}
