//! TensorBoard event files beside metrics.jsonl: the documented TFRecord framing (length, masked
//! CRC-32C of the length, data, masked CRC-32C of the data) around `tensorflow.Event` protocol
//! buffers, written by hand (a version event, then one scalar summary per value), so that `tensorboard
//! --logdir OUTPUT` charts a run. A run's file mirrors its metrics.jsonl: a resumed run writes it again
//! from the metrics it kept.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The start of an event file's name (TensorBoard reads the files whose names hold "tfevents").
pub const FILE_PREFIX: &str = "events.out.tfevents.";

/// The end of the names of the event files nibble writes (the part after the time).
const FILE_SUFFIX: &str = ".nibble";

/// What an event carries.
pub enum Payload<'a> {
    /// The format version every event file opens with.
    FileVersion,
    /// One scalar summary value.
    Scalar { tag: &'a str, value: f32 },
}

/// CRC-32C (Castagnoli), bit by bit over a table built once: event files are small.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            (0..8).fold(i as u32, |c, _| match c & 1 {
                1 => (c >> 1) ^ 0x82F6_3B78,
                _ => c >> 1,
            })
        })
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated right by 15 bits, plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// `data` framed as one TFRecord.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A serialized `tensorflow.Event`: wall_time (1, double), step (2, int64), then file_version (3) or
/// summary (5: `Summary { value (1): Value { tag (1), simple_value (2, float) } }`).
pub fn event(wall_time: f64, step: u64, payload: Payload) -> Vec<u8> {
    let mut out = Vec::new();
    varint(1 << 3 | 1, &mut out);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(2 << 3, &mut out);
        varint(step, &mut out);
    }
    match payload {
        Payload::FileVersion => bytes_field(3, b"brain.Event:2", &mut out),
        Payload::Scalar { tag, value } => {
            let mut value_message = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut value_message);
            varint(2 << 3 | 5, &mut value_message);
            value_message.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            bytes_field(1, &value_message, &mut summary);
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

/// The TensorBoard scalars of a metrics.jsonl line, by Hugging Face Trainer's tag names: `train/loss`,
/// `train/learning_rate`, `train/grad_norm`, `eval/loss` and so on (every number but the step).
pub fn scalars(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(fields) = line.as_object() else {
        return Vec::new();
    };
    fields
        .iter()
        .filter(|(key, value)| *key != "step" && value.is_number())
        .filter_map(|(key, value)| {
            let tag = match key.as_str() {
                "lr" => "train/learning_rate".to_string(),
                key => match key.strip_prefix("eval_") {
                    Some(rest) => format!("eval/{rest}"),
                    None => format!("train/{key}"),
                },
            };
            Some((tag, value.as_f64()? as f32))
        })
        .collect()
}

/// A run's event file, open for appending.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir`, in place of any earlier one nibble wrote there, opening with the
    /// version event.
    pub fn create(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_event_file(&name) {
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
            }
        }
        let seconds = now() as u64;
        let path = dir.join(format!("{FILE_PREFIX}{seconds}{FILE_SUFFIX}"));
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter { path, file };
        writer.write(&event(now(), 0, Payload::FileVersion))?;
        Ok(writer)
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The scalars of a metrics.jsonl line, at its step.
    pub fn metrics(&mut self, line: &serde_json::Value) -> Result<()> {
        let step = line["step"].as_u64().unwrap_or(0);
        let wall_time = now();
        for (tag, value) in scalars(line) {
            self.write(&event(
                wall_time,
                step,
                Payload::Scalar { tag: &tag, value },
            ))?;
        }
        Ok(())
    }
}

/// Whether `name` is an event file nibble wrote.
pub fn is_event_file(name: &str) -> bool {
    name.strip_prefix(FILE_PREFIX)
        .and_then(|rest| rest.strip_suffix(FILE_SUFFIX))
        .is_some_and(|time| !time.is_empty() && time.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    /// The check value of CRC-32C ("123456789"), and RFC 3720's 32 zero bytes.
    #[test]
    fn crc32c_matches_its_published_check_values() {
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(super::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }
}
