//! 4-bit quantization against bitsandbytes' own output and against plain f64 references.

use nibble::quant::{NF4_CODES, QuantFormat, QuantSpec, QuantTensor, nf4_code};
use nibble::rng::Rng;
use nibble::source::SafetensorsFile;
use std::sync::Arc;

fn gaussian(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..rows * cols).map(|_| rng.normal() as f32).collect()
}

fn fixture(name: &str) -> SafetensorsFile {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes: Arc<[u8]> = std::fs::read(&path).unwrap().into();
    SafetensorsFile::from_bytes(path, bytes).unwrap()
}

#[test]
fn nf4_codes_scales_and_dequantization_equal_bitsandbytes() {
    // Made by scripts/make_nf4_fixture.py with bitsandbytes.functional.quantize_4bit(quant_type="nf4"):
    // Gaussian rows, bf16-rounded rows, rows of values exactly on the decision thresholds, heavy tails.
    let f = fixture("nf4_bitsandbytes.safetensors");
    for g in [32, 64, 128] {
        let input = f.read_f32(&format!("g{g}.input")).unwrap();
        let shape = &f.info(&format!("g{g}.input")).unwrap().shape;
        let (rows, cols) = (shape[0], shape[1]);
        let codes = f.raw(&format!("g{g}.codes")).unwrap();
        let absmax = f.read_f32(&format!("g{g}.absmax")).unwrap();
        let deq = f.read_f32(&format!("g{g}.dequantized")).unwrap();
        let q = QuantTensor::quantize(
            QuantSpec::new(QuantFormat::Nf4, g).unwrap(),
            rows,
            cols,
            &input,
        )
        .unwrap();
        let mut mismatches = 0;
        for r in 0..rows {
            for c in 0..cols {
                if q.code(r, c) != codes[r * cols + c] {
                    mismatches += 1;
                }
            }
        }
        assert_eq!(mismatches, 0, "group {g}: codes differ from bitsandbytes");
        assert_eq!(
            q.scales, absmax,
            "group {g}: scales differ from bitsandbytes' absmax"
        );
        assert_eq!(q.dequantize(), deq, "group {g}: dequantized values differ");
    }
}

/// Reference: the nearest code by exhaustive f64 search, ties to the lower code.
fn nf4_reference(x: f64) -> u8 {
    let mut best = 0;
    for (i, &c) in NF4_CODES.iter().enumerate() {
        if (x - c as f64).abs() < (x - NF4_CODES[best] as f64).abs() {
            best = i;
        }
    }
    best as u8
}

#[test]
fn nf4_code_is_the_nearest_code() {
    let mut rng = Rng::new(3);
    for _ in 0..100_000 {
        let x = (rng.uniform() * 2.0 - 1.0) as f32;
        let ours = nf4_code(x);
        let reference = nf4_reference(x as f64);
        if ours != reference {
            // Only a value within float rounding of a midpoint may disagree with the f64 search.
            let mid = (NF4_CODES[ours.min(reference) as usize] as f64
                + NF4_CODES[ours.max(reference) as usize] as f64)
                / 2.0;
            assert!(
                (x as f64 - mid).abs() < 1e-7,
                "x={x}: ours {ours}, reference {reference}"
            );
        }
    }
}

#[test]
fn every_element_is_within_half_a_step_of_its_dequantized_value() {
    let (rows, cols) = (24, 384);
    let w = gaussian(rows, cols, 11);
    for g in [32, 64, 128] {
        for format in [QuantFormat::Nf4, QuantFormat::Int4] {
            let q =
                QuantTensor::quantize(QuantSpec::new(format, g).unwrap(), rows, cols, &w).unwrap();
            let d = q.dequantize();
            for r in 0..rows {
                for gi in 0..cols / g {
                    let group = &w[r * cols + gi * g..r * cols + (gi + 1) * g];
                    let lo = group
                        .iter()
                        .cloned()
                        .fold(f64::INFINITY, |a, b| a.min(b as f64));
                    let hi = group
                        .iter()
                        .cloned()
                        .fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
                    let absmax = lo.abs().max(hi.abs());
                    for (j, &x) in group.iter().enumerate() {
                        let c = r * cols + gi * g + j;
                        let err = (x as f64 - d[c] as f64).abs();
                        let bound = match format {
                            // Half the widest gap between neighbouring NF4 codes (between -1.0 and -0.696).
                            QuantFormat::Nf4 => absmax * 0.152,
                            QuantFormat::Int4 => (hi - lo) / 15.0 / 2.0,
                        };
                        assert!(
                            err <= bound * (1.0 + 1e-5) + 1e-7,
                            "{format} g{g}: |{x} - {}| > {bound}",
                            d[c]
                        );
                    }
                    // Group extremes are represented exactly (up to f32 rounding).
                    let i_max = group
                        .iter()
                        .position(|&x| {
                            x as f64
                                == if format == QuantFormat::Nf4 && lo.abs() > hi.abs() {
                                    lo
                                } else {
                                    hi
                                }
                        })
                        .unwrap();
                    let c = r * cols + gi * g + i_max;
                    assert!(
                        (w[c] - d[c]).abs() <= 1e-6 * w[c].abs(),
                        "{format} g{g}: extreme not exact"
                    );
                }
            }
        }
    }
}

#[test]
fn packing_puts_eight_codes_per_word_low_nibble_first() {
    let (rows, cols) = (3, 64);
    let w = gaussian(rows, cols, 5);
    let q = QuantTensor::quantize(
        QuantSpec::new(QuantFormat::Nf4, 32).unwrap(),
        rows,
        cols,
        &w,
    )
    .unwrap();
    assert_eq!(q.packed.len(), rows * cols / 8);
    assert_eq!(q.scales.len(), rows * cols / 32);
    for r in 0..rows {
        for c in 0..cols {
            let absmax = w[r * cols + (c / 32) * 32..r * cols + (c / 32 + 1) * 32]
                .iter()
                .fold(0f32, |m, x| m.max(x.abs()));
            let expected = nf4_code(w[r * cols + c] * (1.0 / absmax));
            let word = q.packed[r * cols / 8 + c / 8];
            assert_eq!((word >> (4 * (c % 8))) & 0xF, expected as u32);
        }
    }
}

/// Relative RMS error ‖w − deq(q(w))‖ / ‖w‖ on N(0, 1) weights, computed in f64.
fn relative_rms_error(spec: QuantSpec, w: &[f32], rows: usize, cols: usize) -> f64 {
    let d = QuantTensor::quantize(spec, rows, cols, w)
        .unwrap()
        .dequantize();
    let err: f64 = w
        .iter()
        .zip(&d)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let norm: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn dequantization_error_on_gaussian_weights_is_as_documented() {
    // README's table lists these figures; each bound sits 1-3% above the value measured with this seed, so a
    // regression in code selection or scaling fails here.
    let (rows, cols) = (256, 1024);
    let w = gaussian(rows, cols, 2024);
    let cases = [
        (QuantFormat::Nf4, 32, 0.0880),
        (QuantFormat::Nf4, 64, 0.0930),
        (QuantFormat::Nf4, 128, 0.0975),
        (QuantFormat::Int4, 32, 0.0800),
        (QuantFormat::Int4, 64, 0.0905),
        (QuantFormat::Int4, 128, 0.1010),
    ];
    let mut previous = None;
    for (format, g, bound) in cases {
        let e = relative_rms_error(QuantSpec::new(format, g).unwrap(), &w, rows, cols);
        println!("{format} group {g}: relative RMS error {e:.4}");
        assert!(
            e < bound,
            "{format} g{g}: error {e:.4} above documented {bound}"
        );
        assert!(
            e > bound * 0.9,
            "{format} g{g}: error {e:.4} far below documented {bound}: update the docs"
        );
        if let Some((pf, pe)) = previous
            && pf == format
        {
            assert!(e > pe, "{format}: larger groups must not reduce the error");
        }
        previous = Some((format, e));
    }
}

#[test]
fn group_size_must_divide_the_input_dimension_and_be_supported() {
    let w = gaussian(2, 96, 1);
    let err = QuantTensor::quantize(QuantSpec::new(QuantFormat::Nf4, 64).unwrap(), 2, 96, &w)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not divide the input dimension 96"),
        "{err}"
    );
    assert!(QuantSpec::new(QuantFormat::Int4, 48).is_err());
}

#[test]
fn constant_groups_dequantize_exactly() {
    let mut w = gaussian(1, 64, 9);
    w[..32].fill(0.0);
    w[32..].fill(-0.25);
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        let d = QuantTensor::quantize(QuantSpec::new(format, 32).unwrap(), 1, 64, &w)
            .unwrap()
            .dequantize();
        assert_eq!(d, w, "{format}");
    }
}

/// Dequantizing a row is, bit for bit, code → value element by element: NF4 code times the group's
/// scale, INT4 the group's minimum plus code times scale (every format and group size, several rows).
#[test]
fn dequantized_rows_are_the_per_element_formula() {
    for format in [QuantFormat::Nf4, QuantFormat::Int4] {
        for g in [32, 64, 128] {
            let (rows, cols) = (5, 384);
            let w = gaussian(rows, cols, g as u64 + 7);
            let spec = QuantSpec::new(format, g).unwrap();
            let q = QuantTensor::quantize(spec, rows, cols, &w).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                q.dequantize_row(r, &mut row);
                for (c, &got) in row.iter().enumerate() {
                    let (code, at) = (q.code(r, c) as usize, r * cols / g + c / g);
                    let expected = match format {
                        QuantFormat::Nf4 => NF4_CODES[code] * q.scales[at],
                        QuantFormat::Int4 => q.mins[at] + code as f32 * q.scales[at],
                    };
                    assert_eq!(
                        got.to_bits(),
                        expected.to_bits(),
                        "{format:?} g{g} ({r}, {c})"
                    );
                }
            }
        }
    }
}
