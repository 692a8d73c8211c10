//! The image ops of the FLUX.2 VAE encoder, on activations laid out pixels by channels ([H·W, C],
//! row-major over the image), so that a convolution is a linear over gathered patches and attention
//! over pixels reads rows: 2-D convolution (after an optional nearest-neighbour enlargement, the
//! decoder's upsampling) and GroupNorm (with an optional SiLU after it). Forward only: the VAE encodes
//! images once, before training, and decodes samples. The GPU lowerings (shaders/conv.wgsl) follow
//! the CPU kernels.

use crate::exec::gpu::Recorder;
use crate::gpu::weights::GpuLinear;
use crate::gpu::{GpuBuffer, groups_1d};
use crate::model::LinearWeight;
use crate::ops::{Precision, linear};
use rayon::prelude::*;

/// A convolution's geometry: input size, kernel, stride and zero padding (top, bottom, left, right)
/// of the input enlarged `upsample` times, each pixel repeated `upsample` x `upsample` (PyTorch's
/// `interpolate(mode="nearest")` by an integer factor; 1 for none). Reading the input at (y / up,
/// x / up) spares the decoder the enlarged copy, its largest activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: [usize; 4],
    pub upsample: usize,
}

impl ConvShape {
    /// The output's (height, width).
    pub fn output(&self) -> (usize, usize) {
        let [top, bottom, left, right] = self.pad;
        (
            (self.height * self.upsample + top + bottom - self.kernel) / self.stride + 1,
            (self.width * self.upsample + left + right - self.kernel) / self.stride + 1,
        )
    }

    /// Output pixels per patch tile: the tile of gathered patches stays near 4 MiB.
    pub fn tile_pixels(&self) -> usize {
        let patch = self.channels * self.kernel * self.kernel;
        ((1 << 20) / patch).max(1)
    }
}

/// y [H'·W', out] = patches(x) · Wᵀ + bias, with W [out, channels · k · k] in PyTorch's (channel,
/// row, column) order. Output pixels are taken a tile at a time, each tile's patches gathered and
/// multiplied by the linear kernel.
pub fn conv2d(
    s: &ConvShape,
    x: &[f32],
    weight: &LinearWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
    precision: Precision,
) {
    let (oh, ow) = s.output();
    let (k, c) = (s.kernel, s.channels);
    let patch = c * k * k;
    let out = weight.shape().0;
    let tile = s.tile_pixels();
    let up = s.upsample;
    let (height, width) = (s.height * up, s.width * up);
    let mut patches = vec![0f32; tile * patch];
    for first in (0..oh * ow).step_by(tile) {
        let n = tile.min(oh * ow - first);
        patches[..n * patch]
            .par_chunks_mut(patch)
            .enumerate()
            .for_each(|(i, row)| {
                let (oy, ox) = ((first + i) / ow, (first + i) % ow);
                for ch in 0..c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let iy = (oy * s.stride + ky) as isize - s.pad[0] as isize;
                            let ix = (ox * s.stride + kx) as isize - s.pad[2] as isize;
                            let inside = iy >= 0
                                && ix >= 0
                                && (iy as usize) < height
                                && (ix as usize) < width;
                            row[(ch * k + ky) * k + kx] = if inside {
                                x[(iy as usize / up * s.width + ix as usize / up) * c + ch]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            });
        let rows = &mut y[first * out..(first + n) * out];
        linear::forward_packed(&patches[..n * patch], None, weight, bias, rows, precision);
    }
}

/// The uniform of shaders/conv.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ImageParams {
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub kernel: u32,
    pub stride: u32,
    pub pad_top: u32,
    pub pad_left: u32,
    pub out_width: u32,
    /// Convolution: this tile's first output pixel.
    pub first: u32,
    /// Convolution: output pixels in this tile; GroupNorm: pixels of the image.
    pub pixels: u32,
    pub groups: u32,
    /// GroupNorm: chunks per group, values per chunk.
    pub chunks: u32,
    pub chunk: u32,
    pub eps: f32,
    pub silu: u32,
    /// Convolution: the input's enlargement.
    pub upsample: u32,
}

/// The GPU lowering of `conv2d`: per tile of output pixels, the patches gathered into a scratch buffer
/// and multiplied by the weight with the linear kernel, written into y's rows of that tile.
pub(crate) fn record_conv2d(
    r: &mut Recorder,
    s: &ConvShape,
    x: &GpuBuffer,
    (weight, bias): (&GpuLinear, Option<&GpuBuffer>),
    y: &GpuBuffer,
) {
    let (oh, ow) = s.output();
    let patch = s.channels * s.kernel * s.kernel;
    let tile = s.tile_pixels();
    let patches = r.scratch(tile.min(oh * ow) * patch);
    for first in (0..oh * ow).step_by(tile) {
        let n = tile.min(oh * ow - first);
        let p = ImageParams {
            height: s.height as u32,
            width: s.width as u32,
            channels: s.channels as u32,
            kernel: s.kernel as u32,
            stride: s.stride as u32,
            pad_top: s.pad[0] as u32,
            pad_left: s.pad[2] as u32,
            out_width: ow as u32,
            upsample: s.upsample as u32,
            first: first as u32,
            pixels: n as u32,
            ..ImageParams::default()
        };
        r.dispatch(
            "conv_gather",
            &p,
            &[(1, x), (2, &patches)],
            groups_1d(n * patch, 256),
        );
        linear::record_forward_rows(r, weight, bias, (&patches, n), (y, first));
    }
}

/// Values per workgroup of shaders/conv.wgsl's GroupNorm partial sums: 128 threads, at most 256 values
/// each (well inside a software device's loop budget).
const GROUP_NORM_CHUNK: usize = 128 * 256;

/// Words of the GPU GroupNorm's partial sums over `x_len` values: per group, a pair per chunk of the
/// group's values and one for their total.
pub(crate) fn group_norm_stats_len(x_len: usize, channels: usize, groups: usize) -> usize {
    let per_group = x_len / channels * (channels / groups);
    2 * groups * (per_group.div_ceil(GROUP_NORM_CHUNK).max(1) + 1)
}

/// The GPU lowering of `group_norm`.
pub(crate) fn record_group_norm(
    r: &mut Recorder,
    x: &GpuBuffer,
    (channels, groups, eps): (usize, usize, f64),
    (weight, bias): (&GpuBuffer, &GpuBuffer),
    silu: bool,
    y: &GpuBuffer,
) {
    let stats = r.scratch(group_norm_stats_len(x.len, channels, groups));
    let pixels = x.len / channels;
    let per_group = pixels * (channels / groups);
    let chunks = per_group.div_ceil(GROUP_NORM_CHUNK).max(1);
    let p = ImageParams {
        channels: channels as u32,
        pixels: pixels as u32,
        groups: groups as u32,
        chunks: chunks as u32,
        chunk: GROUP_NORM_CHUNK as u32,
        eps: eps as f32,
        silu: silu.into(),
        ..ImageParams::default()
    };
    r.dispatch(
        "group_norm_partial",
        &p,
        &[(1, x), (5, &stats)],
        [chunks as u32, groups as u32, 1],
    );
    r.dispatch(
        "group_norm_finish",
        &p,
        &[(1, x), (5, &stats)],
        [groups.div_ceil(64) as u32, 1, 1],
    );
    r.dispatch(
        "group_norm_apply",
        &p,
        &[(1, x), (2, y), (3, weight), (4, bias), (5, &stats)],
        groups_1d(x.len, 256),
    );
}

/// GroupNorm over x [pixels, channels]: each of `groups` groups of consecutive channels normalised
/// over all its values (biased variance), then scaled and shifted per channel; SiLU after it when
/// `silu`.
pub fn group_norm(
    x: &[f32],
    (channels, groups, eps): (usize, usize, f64),
    (weight, bias): (&[f32], &[f32]),
    silu: bool,
    y: &mut [f32],
) {
    let per = channels / groups;
    let pixels = x.len() / channels;
    let stats: Vec<(f32, f32)> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let values = || {
                (0..pixels).flat_map(move |p| {
                    x[p * channels + g * per..p * channels + (g + 1) * per].iter()
                })
            };
            let n = (pixels * per) as f64;
            let mean = values().map(|&v| v as f64).sum::<f64>() / n;
            let var = values().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
        })
        .collect();
    y.par_chunks_mut(channels)
        .zip(x.par_chunks(channels))
        .for_each(|(y, x)| {
            for ch in 0..channels {
                let (mean, rstd) = stats[ch / per];
                let v = (x[ch] - mean) * rstd * weight[ch] + bias[ch];
                y[ch] = if silu { v / (1.0 + (-v).exp()) } else { v };
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DenseData, DenseTensor};
    use crate::rng::Rng;

    fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// A convolution straight from its definition, in f64, on channel-first data.
    #[allow(clippy::too_many_arguments)]
    fn reference(s: &ConvShape, x_chw: &[f32], w: &[f32], b: &[f32], out: usize) -> Vec<f64> {
        let (oh, ow) = s.output();
        let (k, c) = (s.kernel, s.channels);
        let mut y = vec![0f64; out * oh * ow];
        for o in 0..out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = b[o] as f64;
                    for ch in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s.stride + ky) as isize - s.pad[0] as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad[2] as isize;
                                let (up, height, width) = (s.upsample, s.height, s.width);
                                if iy < 0
                                    || ix < 0
                                    || iy as usize >= height * up
                                    || ix as usize >= width * up
                                {
                                    continue;
                                }
                                // The enlarged image, written out as PyTorch's nearest mode
                                // indexes it: source floor(y · in / out).
                                let (sy, sx) = (
                                    iy as usize * height / (height * up),
                                    ix as usize * width / (width * up),
                                );
                                let xv = x_chw[(ch * height + sy) * width + sx];
                                sum += xv as f64 * w[((o * c + ch) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    y[(o * oh + oy) * ow + ox] = sum;
                }
            }
        }
        y
    }

    #[test]
    fn convolutions_match_f64_with_padding_and_stride() {
        let mut rng = Rng::new(9);
        for (kernel, stride, pad, upsample) in [
            (3, 1, [1, 1, 1, 1], 1),
            (3, 2, [0, 1, 0, 1], 1),
            (1, 1, [0; 4], 1),
            (3, 1, [1, 1, 1, 1], 2),
            (3, 2, [1, 0, 1, 0], 3),
        ] {
            let s = ConvShape {
                height: 9,
                width: 6,
                channels: 5,
                kernel,
                stride,
                pad,
                upsample,
            };
            let out = 7;
            let x_chw = random(5 * 9 * 6, &mut rng);
            let w = random(out * 5 * kernel * kernel, &mut rng);
            let b = random(out, &mut rng);
            let x_hwc: Vec<f32> = (0..9 * 6)
                .flat_map(|p| (0..5).map(move |c| (p, c)))
                .map(|(p, c)| x_chw[c * 54 + p])
                .collect();
            let weight = LinearWeight::Dense(DenseTensor {
                rows: out,
                cols: 5 * kernel * kernel,
                data: DenseData::F32(w.clone()),
            });
            let (oh, ow) = s.output();
            let mut y = vec![0f32; oh * ow * out];
            conv2d(&s, &x_hwc, &weight, Some(&b), &mut y, Precision::F32);
            let want = reference(&s, &x_chw, &w, &b, out);
            for p in 0..oh * ow {
                for o in 0..out {
                    let (got, want) = (y[p * out + o] as f64, want[o * oh * ow + p]);
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "k{kernel} s{stride} up{upsample}"
                    );
                }
            }
        }
    }

    #[test]
    fn group_norm_matches_its_definition() {
        let mut rng = Rng::new(2);
        let (pixels, channels, groups) = (13, 8, 4);
        let x = random(pixels * channels, &mut rng);
        let (w, b) = (random(channels, &mut rng), random(channels, &mut rng));
        let mut y = vec![0f32; x.len()];
        group_norm(&x, (channels, groups, 1e-6), (&w, &b), true, &mut y);
        for g in 0..groups {
            let vals: Vec<f64> = (0..pixels)
                .flat_map(|p| (0..2).map(move |c| (p, c)))
                .map(|(p, c)| x[p * channels + g * 2 + c] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for p in 0..pixels {
                for c in g * 2..g * 2 + 2 {
                    let n = (x[p * channels + c] as f64 - mean) / (var + 1e-6).sqrt();
                    let v = n * w[c] as f64 + b[c] as f64;
                    let want = v / (1.0 + (-v).exp());
                    assert!((y[p * channels + c] as f64 - want).abs() < 1e-5);
                }
            }
        }
    }
}
