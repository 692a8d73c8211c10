//! Where model bytes come from: a folder on disk (memory-mapped, read one tensor at a time) or, on
//! wasm, files handed over as bytes. Everything above this module sees named tensors only.

use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files of a model: a folder, or an in-memory set (the browser has no file system).
#[derive(Clone, Debug)]
pub enum ModelFiles {
    Dir(PathBuf),
    Memory {
        label: String,
        files: BTreeMap<String, Arc<[u8]>>,
    },
}

impl ModelFiles {
    /// The path shown in error messages for file `name`.
    pub fn display_path(&self, name: &str) -> PathBuf {
        match self {
            ModelFiles::Dir(dir) => dir.join(name),
            ModelFiles::Memory { label, .. } => Path::new(label).join(name),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            ModelFiles::Dir(dir) => dir.join(name).is_file(),
            ModelFiles::Memory { files, .. } => files.contains_key(name),
        }
    }

    pub fn read_string(&self, name: &str) -> Result<Option<String>> {
        match self {
            ModelFiles::Dir(dir) => {
                let path = dir.join(name);
                match crate::fsutil::read_to_string(&path) {
                    Ok(s) => Ok(Some(s)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(path, e)),
                }
            }
            ModelFiles::Memory { files, .. } => files
                .get(name)
                .map(|b| {
                    String::from_utf8(b.to_vec()).map_err(|_| {
                        Error::Invalid(format!(
                            "{}: not valid UTF-8",
                            self.display_path(name).display()
                        ))
                    })
                })
                .transpose(),
        }
    }

    pub fn open_safetensors(&self, name: &str) -> Result<SafetensorsFile> {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            ModelFiles::Dir(dir) => SafetensorsFile::open(&dir.join(name)),
            #[cfg(target_arch = "wasm32")]
            ModelFiles::Dir(dir) => Err(Error::Invalid(format!(
                "{}: reading from a folder is not available in the browser",
                dir.display()
            ))),
            ModelFiles::Memory { files, .. } => {
                let path = self.display_path(name);
                let bytes = files.get(name).ok_or_else(|| {
                    Error::io(&path, std::io::Error::from(std::io::ErrorKind::NotFound))
                })?;
                SafetensorsFile::from_storage(path, Storage::Shared(bytes.clone()))
            }
        }
    }
}

enum Storage {
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(memmap2::Mmap),
    Shared(Arc<[u8]>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            Storage::Mmap(m) => m,
            Storage::Shared(b) => b,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// Which tensor of a header the safetensors crate refused is at fault, where its error does not say:
/// one whose offsets do not hold its shape of its dtype, or do not start where the one before ends.
fn header_culprit(bytes: &[u8]) -> Option<String> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let mut spans = Vec::new();
    for (name, info) in header.iter().filter(|(n, _)| *n != "__metadata__") {
        let bits: u64 = match info.get("dtype")?.as_str()? {
            "F64" | "I64" | "U64" => 64,
            "F32" | "I32" | "U32" => 32,
            "F16" | "BF16" | "I16" | "U16" => 16,
            "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "I8" | "U8" | "BOOL" => 8,
            _ => continue,
        };
        let shape: Option<Vec<u64>> = info
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64())
            .collect();
        let elements = shape?.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let offsets: Option<Vec<u64>> = info
            .get("data_offsets")?
            .as_array()?
            .iter()
            .map(|o| o.as_u64())
            .collect();
        let [start, stop] = offsets?[..] else {
            return Some(format!("tensor `{name}`: data_offsets are not two numbers"));
        };
        let held = stop.checked_sub(start);
        let needed = elements.and_then(|n| n.checked_mul(bits)).map(|b| b / 8);
        if held != needed || held.is_none() {
            let needed = needed.map_or("more than 2^64".to_string(), |n| n.to_string());
            return Some(format!(
                "tensor `{name}`: its offsets {start}..{stop} do not hold its shape {} of {} \
                 ({needed} bytes)",
                info["shape"],
                info["dtype"].as_str().unwrap_or_default()
            ));
        }
        spans.push((start, stop, name));
    }
    spans.sort();
    let mut previous: Option<(u64, &String)> = None;
    for (start, stop, name) in spans {
        let expected = previous.map_or(0, |(end, _)| end);
        if start != expected {
            return Some(match previous {
                Some((end, before)) => format!(
                    "tensor `{name}` starts at byte {start}, where `{before}` before it ends at {end}"
                ),
                None => format!("tensor `{name}` starts at byte {start}, not 0"),
            });
        }
        previous = Some((stop, name));
    }
    None
}

/// One parsed safetensors file: the header is validated on open; tensor data is read on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    storage: Storage,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
    /// Stored names of renamed tensors, by the name they are read as (`rename`).
    stored: HashMap<String, String>,
}

/// Safetensors files up to this size are read into memory rather than mapped.
#[cfg(not(target_arch = "wasm32"))]
const READ_INSTEAD_OF_MAP: u64 = 64 << 20;

impl SafetensorsFile {
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::require_regular_file(path).map_err(|e| Error::io(path, e))?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Small files (adapters, optimizer states, tiny models) are read, not mapped: a mapped file that
        // another process truncates kills the reader with SIGBUS, and reading costs nothing at this size.
        // Model shards stay mapped: copying gigabytes would double the memory a load needs.
        if len <= READ_INSTEAD_OF_MAP {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            return Self::from_storage(path.to_path_buf(), Storage::Shared(bytes.into()));
        }
        // SAFETY: the mapping is read-only and private. It stays valid while another process modifies the
        // file only in the sense that we may read changed bytes, which the header validation and the
        // per-tensor checks turn into errors rather than undefined behaviour in safe code above us:
        // all access goes through `&[u8]` copies into owned buffers.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_storage(path.to_path_buf(), Storage::Mmap(map))
    }

    /// Parses a safetensors file already held in memory (the wasm path, and tests).
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Arc<[u8]>) -> Result<Self> {
        Self::from_storage(path.into(), Storage::Shared(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let bad = |msg: String| Error::Safetensors {
            path: path.clone(),
            msg,
        };
        let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
            let culprit = header_culprit(bytes).map_or(String::new(), |c| format!(" ({c})"));
            bad(format!(
                "invalid safetensors header, the file is truncated or corrupt: {e}{culprit}"
            ))
        })?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        let mut data_end = 0usize;
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            data_end = data_end.max(e);
            tensors.insert(
                name.clone(),
                TensorInfo {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                },
            );
        }
        if data_start + data_end != bytes.len() {
            return Err(bad(format!(
                "file is {} bytes but its header describes {} bytes (truncated or corrupt)",
                bytes.len(),
                data_start + data_end
            )));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile {
            path,
            storage,
            tensors,
            metadata,
            stored: HashMap::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Gives the tensors `rename` maps a new name (a checkpoint's older spelling), by which they are
    /// read from then on; `stored_name` still tells the file's own.
    pub fn rename(&mut self, rename: impl Fn(&str) -> Option<String>) {
        for (old, info) in std::mem::take(&mut self.tensors) {
            let name = match rename(&old) {
                Some(new) => {
                    self.stored.insert(new.clone(), old);
                    new
                }
                None => old,
            };
            self.tensors.insert(name, info);
        }
    }

    /// The name the file itself gives the tensor read as `name`.
    pub fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.stored.get(name).map_or(name, String::as_str)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in this file"))
    }

    /// The raw little-endian bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let info = self.require(name)?;
        Ok(&self.storage.bytes()[info.start..info.end])
    }

    /// Reads a floating-point tensor (f32, f16 or bf16) converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.require(name)?.shape.iter().product()];
        self.read_f32_into(name, &mut out)?;
        Ok(out)
    }

    /// A float tensor as f32 into `out`, which holds all of it: no second copy of a large tensor.
    pub fn read_f32_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self.require(name)?;
        let float = FloatDtype::of(info.dtype)
            .ok_or_else(|| Error::tensor(&self.path, name, unsupported_dtype(info.dtype)))?;
        let raw = self.finite_raw(name, float)?;
        if raw.len() != out.len() * float.size() {
            let msg = format!(
                "holds {} values, not {}",
                raw.len() / float.size(),
                out.len()
            );
            return Err(Error::tensor(&self.path, name, msg));
        }
        float.convert(raw, out);
        Ok(())
    }

    /// A float tensor's bytes, refused when any value is NaN or infinite: such a weight would turn every
    /// loss into NaN (and quantizing would hide it as zeros).
    pub fn finite_raw(&self, name: &str, dtype: FloatDtype) -> Result<&[u8]> {
        let raw = self.raw(name)?;
        match dtype.first_non_finite(raw) {
            Some(i) => Err(Error::tensor(
                &self.path,
                name,
                format!("element {i} is NaN or infinite"),
            )),
            None => Ok(raw),
        }
    }

    /// Reads a u32 tensor (the packed 4-bit words of a quantized file).
    pub fn read_u32(&self, name: &str) -> Result<Vec<u32>> {
        let info = self.require(name)?;
        if info.dtype != Dtype::U32 {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("expected dtype U32, found {:?}", info.dtype),
            ));
        }
        Ok(self
            .raw(name)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Tells the OS that a tensor's pages will not be read again, so that streaming through a large
    /// checkpoint does not leave it all resident. A no-op for in-memory files.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let (Storage::Mmap(map), Some(info)) = (&self.storage, self.tensors.get(name)) {
            // SAFETY: the map is a read-only private file mapping that nothing writes to; MADV_DONTNEED on
            // such pages only drops them from memory, and a later read faults them in again from the file
            // with the same contents. No reference into the range is held across this call by us
            // (callers copy tensor data into owned buffers before releasing).
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    info.start,
                    info.end - info.start,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }
}

pub(crate) fn unsupported_dtype(dtype: Dtype) -> String {
    format!(
        "dtype {dtype:?} is not supported (nibble reads F32, F16 and BF16 weights, and the linear weights of FP8 checkpoints)"
    )
}

/// The floating-point dtypes a checkpoint's weights may come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F32,
    F16,
    BF16,
}

impl FloatDtype {
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatDtype::F32),
            Dtype::F16 => Some(FloatDtype::F16),
            Dtype::BF16 => Some(FloatDtype::BF16),
            _ => None,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            FloatDtype::F32 => Dtype::F32,
            FloatDtype::F16 => Dtype::F16,
            FloatDtype::BF16 => Dtype::BF16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::BF16 => "bfloat16",
        }
    }

    /// The index of the first NaN or infinite value in `raw` (little-endian values of this dtype).
    pub fn first_non_finite(self, raw: &[u8]) -> Option<usize> {
        // A value is NaN or infinite exactly when its exponent bits are all ones.
        match self {
            FloatDtype::F32 => {
                first_matching::<4>(raw, |b| (u32::from_le_bytes(*b) >> 23) & 0xFF == 0xFF)
            }
            FloatDtype::F16 => {
                first_matching::<2>(raw, |b| (u16::from_le_bytes(*b) >> 10) & 0x1F == 0x1F)
            }
            FloatDtype::BF16 => {
                first_matching::<2>(raw, |b| (u16::from_le_bytes(*b) >> 7) & 0xFF == 0xFF)
            }
        }
    }

    /// Each value as the nearest this dtype holds, widened back to f32.
    pub fn round(self, values: &mut [f32]) {
        match self {
            FloatDtype::F32 => {}
            FloatDtype::F16 => values
                .iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            FloatDtype::BF16 => values
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        }
    }

    /// Converts little-endian bytes of this dtype into f32 values (`out.len() * size() == raw.len()`).
    pub fn convert(self, raw: &[u8], out: &mut [f32]) {
        debug_assert_eq!(raw.len(), out.len() * self.size());
        match self {
            FloatDtype::F32 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FloatDtype::F16 => {
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            FloatDtype::BF16 => {
                // bf16 is the top half of an f32: widening the bits is exact (NaN payloads included)
                // and, unlike a conversion call per value, vectorises.
                for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
        }
    }
}

/// The 8-bit float formats of FP8 checkpoints: E4M3 (the `fn` variant: no infinities, S.1111.111 is
/// NaN) and E5M2 for weights, E8M0 (an exponent alone, 2^(e - 127); 0xFF is NaN) for some scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Float8 {
    E4M3,
    E5M2,
    E8M0,
}

impl Float8 {
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F8_E4M3 => Some(Float8::E4M3),
            Dtype::F8_E5M2 => Some(Float8::E5M2),
            Dtype::F8_E8M0 => Some(Float8::E8M0),
            _ => None,
        }
    }

    /// The value of one stored byte (exact in f32).
    pub fn value(self, byte: u8) -> f32 {
        match self {
            Float8::E4M3 => {
                let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
                let (exponent, mantissa) = (i32::from((byte >> 3) & 0xF), f32::from(byte & 7));
                match (exponent, byte & 7) {
                    (15, 7) => f32::NAN,
                    (0, _) => sign * mantissa / 8.0 * 2f32.powi(-6),
                    _ => sign * (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7),
                }
            }
            // E5M2 is float16's upper byte: same exponent bias, infinities and NaNs.
            Float8::E5M2 => half::f16::from_bits(u16::from(byte) << 8).to_f32(),
            Float8::E8M0 => match byte {
                0xFF => f32::NAN,
                // 2^-127 lies below f32's normal range: its one mantissa bit.
                0 => f32::from_bits(1 << 22),
                e => f32::from_bits(u32::from(e) << 23),
            },
        }
    }

    /// Every byte's value, for decoding a tensor by lookup.
    pub fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| self.value(b as u8))
    }

    /// The index of the first NaN or infinite value in `raw` (one byte each), searched as
    /// `FloatDtype::first_non_finite` searches: a checkpoint's weights are gigabytes.
    pub fn first_non_finite(self, raw: &[u8]) -> Option<usize> {
        let table = self.table();
        first_matching::<1>(raw, |b| !table[usize::from(b[0])].is_finite())
    }
}

/// The index of the first N-byte value of `raw` that `bad` holds for. Blocks are checked without an
/// early exit and with N known to the compiler, which vectorises the loop (a per-element search took
/// seconds for a 0.5B model's gigabyte of weights); only a block that holds a match is searched for
/// its first one.
fn first_matching<const N: usize>(
    raw: &[u8],
    bad: impl Fn(&[u8; N]) -> bool + Sync,
) -> Option<usize> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 15;
    let (values, _) = raw.as_chunks::<N>();
    let block = values
        .par_chunks(BLOCK)
        .position_first(|block| block.iter().fold(false, |any, v| any | bad(v)))?;
    let within = values[block * BLOCK..]
        .iter()
        .position(bad)
        .expect("the block holds a match");
    Some(block * BLOCK + within)
}

#[cfg(test)]
mod tests {
    use super::FloatDtype;

    /// The first NaN or infinity of random finite values is found at its index in each dtype, in the
    /// first block, past a block boundary and as the last element; finite data gives None.
    #[test]
    fn first_non_finite_finds_the_first_bad_value() {
        let mut rng = crate::rng::Rng::new(7);
        let n = 200_003;
        let values: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 100.0).collect();
        for dtype in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
            let encode = |v: &[f32]| -> Vec<u8> {
                v.iter()
                    .flat_map(|&x| match dtype {
                        FloatDtype::F32 => x.to_le_bytes().to_vec(),
                        FloatDtype::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
                        FloatDtype::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
                    })
                    .collect()
            };
            assert_eq!(dtype.first_non_finite(&encode(&values)), None, "{dtype:?}");
            for (at, bad) in [
                (5, f32::NAN),
                (40_000, f32::INFINITY),
                (n - 1, f32::NEG_INFINITY),
            ] {
                let mut v = values.clone();
                v[at] = bad;
                // A later bad value must not hide the first.
                v[(at + 70_001).min(n - 1)] = f32::NAN;
                assert_eq!(
                    dtype.first_non_finite(&encode(&v)),
                    Some(at),
                    "{dtype:?} {at}"
                );
            }
        }
    }
}
