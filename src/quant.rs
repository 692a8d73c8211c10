//! Packed 4-bit weights: NF4 (bitsandbytes' code table) and affine INT4, eight nibbles per `u32`,
//! one scale (and for INT4 one minimum) per group of `group_size` consecutive weights along a row,
//! i.e. along the input dimension of a linear layer.

use crate::error::{Error, Result};
use rayon::prelude::*;
use std::fmt;

/// bitsandbytes' NF4 code values, in code order (code 7 is exactly 0), written as bitsandbytes
/// publishes them (more digits than an f32 holds; each rounds to the f32 bitsandbytes uses).
#[allow(clippy::excessive_precision)]
pub const NF4_CODES: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Decision thresholds between neighbouring NF4 codes: the midpoints rounded to f32, as bitsandbytes'
/// default (CPU) backend computes them with `(code[:-1] + code[1:]) / 2` in float32. Its CUDA kernel
/// hard-codes decimal literals that differ from these by one ulp at four thresholds; only an input whose
/// normalised value is exactly such a float could be coded differently there.
const NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = ((NF4_CODES[i] as f64 + NF4_CODES[i + 1] as f64) / 2.0) as f32;
        i += 1;
    }
    t
};

pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// The group size when none is asked for.
pub const DEFAULT_GROUP_SIZE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Nf4,
    Int4,
}

impl QuantFormat {
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Int4 => "int4",
        }
    }

    pub fn parse(s: &str) -> Option<QuantFormat> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Some(QuantFormat::Nf4),
            "int4" => Some(QuantFormat::Int4),
            _ => None,
        }
    }

    /// Bytes of group metadata (scale, and minimum for INT4) per group.
    pub fn group_meta_bytes(self) -> usize {
        match self {
            QuantFormat::Nf4 => 4,
            QuantFormat::Int4 => 8,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the decoder's linear weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantSpec {
    pub format: QuantFormat,
    pub group_size: usize,
}

impl QuantSpec {
    pub fn new(format: QuantFormat, group_size: usize) -> Result<Self> {
        if !GROUP_SIZES.contains(&group_size) {
            return Err(Error::Invalid(format!(
                "group size {group_size} is not supported (choose 32, 64 or 128)"
            )));
        }
        Ok(QuantSpec { format, group_size })
    }

    /// Bytes the packed form of a rows x cols matrix takes.
    pub fn packed_bytes(&self, rows: usize, cols: usize) -> u64 {
        let n = (rows * cols) as u64;
        n / 2 + (n / self.group_size as u64) * self.format.group_meta_bytes() as u64
    }
}

impl std::str::FromStr for QuantSpec {
    type Err = Error;

    /// The spec as `Display` writes it (`nf4 (group 64)`: how run.json records a run's weights).
    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "`{text}` is not a 4-bit format such as `nf4 (group 64)`"
            ))
        };
        let (format, rest) = text.trim().split_once(" (group ").ok_or_else(bad)?;
        let format = QuantFormat::parse(format).ok_or_else(bad)?;
        let group = rest
            .strip_suffix(')')
            .and_then(|g| g.parse().ok())
            .ok_or_else(bad)?;
        QuantSpec::new(format, group)
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (group {})", self.format, self.group_size)
    }
}

/// A rows x cols matrix (rows = output features) in packed 4-bit form.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantTensor {
    pub spec: QuantSpec,
    pub rows: usize,
    pub cols: usize,
    /// Element (r, c) is nibble `c % 8` (bits 4*(c%8)..) of word `r * cols/8 + c/8`.
    pub packed: Vec<u32>,
    /// One per group, row-major: `scales[r * cols/G + c/G]`.
    pub scales: Vec<f32>,
    /// INT4 only (empty for NF4): the group minimum, so that w = min + code * scale.
    pub mins: Vec<f32>,
}

impl QuantTensor {
    /// Quantizes a matrix whose rows are produced on demand by `fill_row(r, row)`, so that the caller
    /// never needs the whole matrix in f32. Rows are processed in parallel.
    pub fn quantize_rows<F>(spec: QuantSpec, rows: usize, cols: usize, fill_row: F) -> Result<Self>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let g = spec.group_size;
        if !cols.is_multiple_of(g) {
            return Err(Error::Invalid(format!(
                "group size {g} does not divide the input dimension {cols}"
            )));
        }
        let words_per_row = cols / 8;
        let groups_per_row = cols / g;
        let mut packed = vec![0u32; rows * words_per_row];
        let mut scales = vec![0f32; rows * groups_per_row];
        let mut mins = vec![0f32; rows * groups_per_row];
        packed
            .par_chunks_mut(words_per_row)
            .zip(scales.par_chunks_mut(groups_per_row))
            .zip(mins.par_chunks_mut(groups_per_row))
            .enumerate()
            .for_each_init(
                || vec![0f32; cols],
                |row, (r, ((words, row_scales), row_mins))| {
                    fill_row(r, row);
                    for (gi, group) in row.chunks_exact(g).enumerate() {
                        let group_words = &mut words[gi * g / 8..(gi + 1) * g / 8];
                        match spec.format {
                            QuantFormat::Nf4 => {
                                row_scales[gi] = quantize_group_nf4(group, group_words)
                            }
                            QuantFormat::Int4 => {
                                let (scale, min) = quantize_group_int4(group, group_words);
                                row_scales[gi] = scale;
                                row_mins[gi] = min;
                            }
                        }
                    }
                },
            );
        if spec.format == QuantFormat::Nf4 {
            mins = Vec::new();
        }
        Ok(QuantTensor {
            spec,
            rows,
            cols,
            packed,
            scales,
            mins,
        })
    }

    pub fn quantize(spec: QuantSpec, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        assert_eq!(data.len(), rows * cols, "data length must be rows * cols");
        Self::quantize_rows(spec, rows, cols, |r, row| {
            row.copy_from_slice(&data[r * cols..(r + 1) * cols])
        })
    }

    /// The 4-bit code of element (r, c).
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let word = self.packed[r * self.cols / 8 + c / 8];
        ((word >> (4 * (c % 8))) & 0xF) as u8
    }

    /// Row `r` as f32. Each group's 16 possible values are computed once (the same products and sums
    /// as value by value, so the same bits) and the codes look them up: the decode runs for every
    /// product of the f32 path, where per-value divisions and table-times-scale products were 18% of a
    /// 0.5B training step on an AVX2 CPU.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }

    pub fn bytes(&self) -> u64 {
        self.spec.packed_bytes(self.rows, self.cols)
    }
}

/// The NF4 code nearest to `normalized` (a value in [-1, 1]); a value exactly on a midpoint takes the
/// lower code, as bitsandbytes' `x > threshold` comparisons do.
pub fn nf4_code(normalized: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| normalized > t).count() as u8
}

/// Quantizes one group to NF4 codes in `words`; returns its scale (the group's absolute maximum).
fn quantize_group_nf4(group: &[f32], words: &mut [u32]) -> f32 {
    let absmax = group.iter().fold(0f32, |m, &x| m.max(x.abs()));
    // bitsandbytes multiplies by the reciprocal of absmax rather than dividing; doing the same keeps
    // codes identical for values that land next to a threshold.
    let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
    // `nf4_code` for the whole group at once, thresholds outside: the inner loop runs over the values
    // and vectorises (quantizing was most of a model's load time when each value walked the
    // thresholds on its own).
    let mut codes = [0u32; 128];
    let codes = &mut codes[..group.len()];
    crate::ops::fastmath::wide(
        #[inline(always)]
        || {
            for t in NF4_THRESHOLDS {
                for (code, &x) in codes.iter_mut().zip(group) {
                    *code += u32::from(x * inv > t);
                }
            }
        },
    );
    pack_codes(codes, words);
    absmax
}

/// Quantizes one group to affine INT4 codes; returns (scale, minimum) with w ≈ min + code * scale.
fn quantize_group_int4(group: &[f32], words: &mut [u32]) -> (f32, f32) {
    let (min, max) = group
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let scale = (max - min) / 15.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut codes = [0u32; 128];
    let codes = &mut codes[..group.len()];
    for (code, &x) in codes.iter_mut().zip(group) {
        *code = ((x - min) * inv).round().clamp(0.0, 15.0) as u32;
    }
    pack_codes(codes, words);
    (scale, min)
}

/// Eight 4-bit codes per word, the first in the lowest nibble.
fn pack_codes(codes: &[u32], words: &mut [u32]) {
    for (word, eight) in words.iter_mut().zip(codes.chunks_exact(8)) {
        *word = eight
            .iter()
            .enumerate()
            .fold(0u32, |w, (j, &c)| w | c << (4 * j));
    }
}

/// MXFP4 (OCP microscaling, gpt-oss's experts): each group of 32 values is 16 bytes of E2M1 codes
/// (the low nibble the even value) and one E8M0 scale byte, value = code · 2^(scale − 127).
pub mod mxfp4 {
    /// Values per scale, and bytes per group.
    pub const GROUP: usize = 32;
    pub const GROUP_BYTES: usize = GROUP / 2;

    /// E2M1 by code: bit 3 the sign, bits 0-2 the magnitude.
    const E2M1: [f32; 16] = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];

    /// Decodes one row: `blocks` holds its groups' 16 bytes each, `scales` a byte per group, into
    /// `out` (32 values per group). A group whose values pass f32's range (a scale of 255 is 2^128;
    /// 253 and 254 overflow the larger codes) is refused: the index of the group.
    pub fn decode_row(blocks: &[u8], scales: &[u8], out: &mut [f32]) -> Result<(), usize> {
        assert!(
            blocks.len() == scales.len() * GROUP_BYTES && out.len() == scales.len() * GROUP,
            "mxfp4: a row's blocks, scales and values disagree"
        );
        for (g, ((bytes, &scale), out)) in blocks
            .chunks_exact(GROUP_BYTES)
            .zip(scales)
            .zip(out.chunks_exact_mut(GROUP))
            .enumerate()
        {
            // 2^(scale - 127) exactly: 2^-127 is f32's largest subnormal power.
            let factor = match scale {
                255 => return Err(g),
                0 => f32::from_bits(1 << 22),
                e => f32::from_bits(u32::from(e) << 23),
            };
            for (pair, &byte) in out.chunks_exact_mut(2).zip(bytes) {
                pair[0] = E2M1[usize::from(byte & 0xF)] * factor;
                pair[1] = E2M1[usize::from(byte >> 4)] * factor;
            }
            if out.iter().any(|v| v.is_infinite()) {
                return Err(g);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::excessive_precision)]
    fn thresholds_are_float32_midpoints_within_an_ulp_of_the_cuda_literals() {
        // Literals of bitsandbytes' dQuantizeNF4 decision tree (csrc/kernels.cu).
        let cuda: [f32; 15] = [
            -0.8480964004993439,
            -0.6106329262256622,
            -0.4599952697753906,
            -0.33967943489551544,
            -0.23460740596055984,
            -0.13791173323988914,
            -0.045525018125772476,
            0.03979014977812767,
            0.1202552504837513,
            0.2035212516784668,
            0.2920137718319893,
            0.3893125355243683,
            0.5016634166240692,
            0.6427869200706482,
            0.8614784181118011,
        ];
        for i in 0..15 {
            assert_eq!(NF4_THRESHOLDS[i], (NF4_CODES[i] + NF4_CODES[i + 1]) / 2.0);
            let ulps = (NF4_THRESHOLDS[i].to_bits() as i64 - cuda[i].to_bits() as i64).abs();
            assert!(
                ulps <= 1,
                "threshold {i}: {} vs {}",
                NF4_THRESHOLDS[i],
                cuda[i]
            );
        }
    }

    /// Every code at three scales (the subnormal 2^-127, 2^0, 2^5), against E2M1's definition:
    /// (−1)^s · 2^(e−1) · (1 + m/2), e = 0 subnormal (m/2); a scale of 255 refused by its group.
    #[test]
    fn mxfp4_decodes_every_code_at_every_kind_of_scale() {
        let e2m1 = |code: u8| {
            let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
            let (e, m) = (i32::from((code >> 1) & 3), f64::from(code & 1));
            sign * match e {
                0 => m / 2.0,
                _ => 2f64.powi(e - 1) * (1.0 + m / 2.0),
            }
        };
        // Each group: the 16 codes low then high nibble, so each byte's two values differ.
        let bytes: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
        let blocks = [bytes.clone(), bytes.clone(), bytes].concat();
        let scales = [0u8, 127, 132];
        let mut out = vec![0f32; 96];
        mxfp4::decode_row(&blocks, &scales, &mut out).unwrap();
        for (g, &scale) in scales.iter().enumerate() {
            for (i, &byte) in blocks[g * 16..][..16].iter().enumerate() {
                let factor = 2f64.powi(i32::from(scale) - 127);
                for (k, code) in [byte & 0xF, byte >> 4].into_iter().enumerate() {
                    let want = e2m1(code) * factor;
                    assert_eq!(
                        out[g * 32 + 2 * i + k] as f64,
                        want,
                        "group {g} byte {i} nibble {k}"
                    );
                }
            }
        }
        assert_eq!(
            mxfp4::decode_row(&blocks[..16], &[255], &mut out[..32]),
            Err(0)
        );
        // 6 · 2^126 passes f32's largest value; 3 · 2^126 does not.
        assert_eq!(
            mxfp4::decode_row(&[0x07; 16], &[253], &mut out[..32]),
            Err(0)
        );
        assert_eq!(
            mxfp4::decode_row(&[0x05; 16], &[253], &mut out[..32]),
            Ok(())
        );
    }

    #[test]
    fn a_spec_reads_back_as_run_json_records_it() {
        for format in [QuantFormat::Nf4, QuantFormat::Int4] {
            for group in GROUP_SIZES {
                let spec = QuantSpec::new(format, group).unwrap();
                assert_eq!(spec.to_string().parse::<QuantSpec>().unwrap(), spec);
            }
        }
        for bad in [
            "nf4",
            "nf4 (group 48)",
            "fp4 (group 64)",
            "nf4 (group 64",
            "",
        ] {
            assert!(bad.parse::<QuantSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn midpoint_goes_to_lower_code() {
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code(t), i as u8);
            assert_eq!(nf4_code(t.next_up()), i as u8 + 1);
        }
    }
}
