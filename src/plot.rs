//! The loss-curve PNG `nibble train` writes next to metrics.jsonl: training loss per step (blue) and
//! validation loss (orange), with labelled axes. Drawn on a pixel buffer with a built-in 3x5 font, so it
//! needs no font files; encoded by the `png` crate.

use crate::error::{Error, Result};
use std::path::Path;

const WIDTH: usize = 800;
const HEIGHT: usize = 450;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 30;
const BOTTOM: usize = 50;
/// Each font pixel is drawn as SCALE x SCALE.
const SCALE: usize = 2;

pub const TRAIN_COLOR: [u8; 3] = [37, 99, 235];
pub const EVAL_COLOR: [u8; 3] = [234, 88, 12];
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];

/// Rows of three bits, top first, for the characters the plot writes.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 7, 3, 5, 7],
        'e' => [7, 5, 7, 4, 7],
        'i' => [2, 0, 2, 2, 2],
        'l' => [6, 2, 2, 2, 7],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'r' => [0, 5, 6, 4, 4],
        's' => [0, 3, 6, 3, 6],
        't' => [2, 7, 2, 2, 3],
        'v' => [0, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < WIDTH && (y as usize) < HEIGHT {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    /// A line two pixels thick (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn square(&mut self, (x, y): (i64, i64), half: i64, color: [u8; 3]) {
        for dy in -half..=half {
            for dx in -half..=half {
                self.set(x + dx, y + dy, color);
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            for (row, bits) in glyph(c).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let px = x + ((i * 4 + col) * SCALE) as i64;
                        let py = y + (row * SCALE) as i64;
                        for (dx, dy) in
                            (0..SCALE as i64).flat_map(|a| (0..SCALE as i64).map(move |b| (a, b)))
                        {
                            self.set(px + dx, py + dy, color);
                        }
                    }
                }
            }
        }
    }

    fn text_width(text: &str) -> i64 {
        (text.chars().count() * 4 * SCALE) as i64
    }
}

/// A short label for an axis value.
fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws training (step, loss) points as a line and validation points as squares joined by a line.
pub fn loss_curve(train: &[(f64, f64)], eval: &[(f64, f64)]) -> Vec<u8> {
    let mut c = Canvas::new();
    let all = || train.iter().chain(eval).filter(|p| p.1.is_finite());
    let (mut lo, mut hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let max_step = all().map(|p| p.0).fold(1.0, f64::max);
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let (pw, ph) = (
        (WIDTH - LEFT - RIGHT) as f64,
        (HEIGHT - TOP - BOTTOM) as f64,
    );
    let to_px = |step: f64, loss: f64| {
        (
            (LEFT as f64 + step / max_step * pw).round() as i64,
            (TOP as f64 + (hi - loss) / (hi - lo) * ph).round() as i64,
        )
    };
    for i in 0..=4 {
        let v = lo + (hi - lo) * i as f64 / 4.0;
        let (_, y) = to_px(0.0, v);
        c.line((LEFT as i64, y), ((WIDTH - RIGHT) as i64, y), GRID);
        let text = label(v);
        c.text(
            LEFT as i64 - 8 - Canvas::text_width(&text),
            y - 5,
            &text,
            AXIS,
        );
        let s = max_step * i as f64 / 4.0;
        let (x, _) = to_px(s.round(), lo);
        let text = label(s.round());
        c.text(
            x - Canvas::text_width(&text) / 2,
            (HEIGHT - BOTTOM + 10) as i64,
            &text,
            AXIS,
        );
    }
    let (x0, y0) = (LEFT as i64, (HEIGHT - BOTTOM) as i64);
    c.line((x0, TOP as i64), (x0, y0), AXIS);
    c.line((x0, y0), ((WIDTH - RIGHT) as i64, y0), AXIS);
    c.text((WIDTH / 2) as i64 - 16, (HEIGHT - 18) as i64, "step", AXIS);
    c.text(8, 8, "loss", AXIS);
    c.text(LEFT as i64 + 20, 8, "train", TRAIN_COLOR);
    if !eval.is_empty() {
        c.text(LEFT as i64 + 80, 8, "eval", EVAL_COLOR);
    }
    let finite = |pts: &[(f64, f64)]| -> Vec<(i64, i64)> {
        pts.iter()
            .filter(|p| p.1.is_finite())
            .map(|p| to_px(p.0, p.1))
            .collect()
    };
    let points = finite(train);
    for w in points.windows(2) {
        c.line(w[0], w[1], TRAIN_COLOR);
    }
    if points.len() == 1 {
        c.square(points[0], 2, TRAIN_COLOR);
    }
    let points = finite(eval);
    for w in points.windows(2) {
        c.line(w[0], w[1], EVAL_COLOR);
    }
    for &p in &points {
        c.square(p, 3, EVAL_COLOR);
    }
    c.pixels
}

/// Encodes RGB pixels of the plot's size as PNG bytes.
pub fn encode_png(pixels: &[u8]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder
        .write_header()
        .map_err(|e| Error::Invalid(format!("PNG: {e}")))?;
    writer
        .write_image_data(pixels)
        .map_err(|e| Error::Invalid(format!("PNG: {e}")))?;
    writer
        .finish()
        .map_err(|e| Error::Invalid(format!("PNG: {e}")))?;
    Ok(bytes)
}

/// Reads a metrics.jsonl and writes its loss curve as `png` (atomically).
pub fn write_loss_curve(metrics: &Path, png_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["eval_loss"].as_f64() {
            eval.push((step, l));
        }
    }
    let bytes = encode_png(&loss_curve(&train, &eval))?;
    crate::fsutil::write_atomically(png_path, |tmp| std::fs::write(tmp, &bytes))
}
