//! What an image run computes before its first step (each caption's features, each image's latents),
//! kept on disk so that later runs over the same images, captions, resolution and models skip the text
//! encoder and the VAE. Each entry is a safetensors file named by a digest of everything it was
//! computed from, and records that description in its metadata: an entry is used only when the
//! description matches exactly, so a digest collision or a stale file costs a recomputation, never a
//! wrong value. A cache that cannot be read or written is warned about and bypassed: it never fails a
//! run.

use crate::error::{Error, Result};
use crate::rng::Fnv1a;
use std::path::{Path, PathBuf};

/// Bumped when what an entry holds, or how it is computed, changes: older entries then miss (as do
/// those of another nibble version, whose encoders may round differently).
const FORMAT: &str = concat!("nibble-flux2-cache-1 ", env!("CARGO_PKG_VERSION"));

/// The metadata key holding an entry's description.
const DESCRIPTION: &str = "nibble_cache_key";

/// A folder of cached tensors.
pub struct FeatureCache {
    dir: PathBuf,
}

/// One cached tensor: its values and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
}

impl FeatureCache {
    /// The cache in `dir` (created when missing).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(FeatureCache {
            dir: dir.to_path_buf(),
        })
    }

    /// Where nibble keeps its cache unless told: `$NIBBLE_CACHE_DIR`, else `$XDG_CACHE_HOME/nibble`,
    /// else `~/.cache/nibble` (Windows: `%LOCALAPPDATA%\nibble`).
    pub fn default_dir() -> Option<PathBuf> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        var("NIBBLE_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("nibble")))
            .or_else(|| var("LOCALAPPDATA").map(|d| d.join("nibble")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("nibble")))
    }

    /// `describe()`, or None with a warning when it fails (a file that cannot be read for its
    /// digest): the run goes on without the cache for that entry.
    pub fn describe(&self, describe: impl FnOnce() -> Result<String>) -> Option<String> {
        describe()
            .map_err(|e| log::warn!("not using the cache here: {e}"))
            .ok()
    }

    fn path(&self, kind: &str, description: &str) -> PathBuf {
        let mut digest = Fnv1a::new();
        digest.write(FORMAT.as_bytes());
        digest.write(description.as_bytes());
        self.dir
            .join(format!("{kind}-{:016x}.safetensors", digest.finish()))
    }

    /// The entry of `kind` computed from `description`, if one is stored and readable.
    pub fn get(&self, kind: &str, description: &str) -> Option<Entry> {
        let path = self.path(kind, description);
        if !path.is_file() {
            return None;
        }
        let read = || -> Result<Option<Entry>> {
            let file = crate::source::SafetensorsFile::open(&path)?;
            let wanted = format!("{FORMAT}\n{description}");
            if file.metadata().get(DESCRIPTION) != Some(&wanted) {
                return Ok(None);
            }
            let shape = file
                .info("values")
                .map(|i| i.shape.clone())
                .ok_or_else(|| Error::tensor(&path, "values", "missing"))?;
            let values = file.read_f32("values")?;
            if values.len() != shape.iter().product::<usize>() {
                return Err(Error::tensor(&path, "values", "does not fill its shape"));
            }
            Ok(Some(Entry { values, shape }))
        };
        match read() {
            Ok(entry) => entry,
            Err(e) => {
                log::warn!("ignoring the cache entry {}: {e}", path.display());
                None
            }
        }
    }

    /// Stores `entry` of `kind` as computed from `description` (atomically; a failure is only
    /// warned about).
    pub fn put(&self, kind: &str, description: &str, entry: &Entry) {
        let path = self.path(kind, description);
        let write = || -> Result<()> {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                entry.shape.clone(),
                bytemuck::cast_slice(&entry.values),
            )
            .map_err(|e| Error::tensor(&path, "values", e.to_string()))?;
            let metadata = std::collections::HashMap::from([(
                DESCRIPTION.to_string(),
                format!("{FORMAT}\n{description}"),
            )]);
            let bytes = safetensors::serialize([("values", view)], Some(metadata))
                .map_err(|e| Error::tensor(&path, "values", e.to_string()))?;
            crate::fsutil::write_atomically(&path, |tmp| std::fs::write(tmp, &bytes))
        };
        if let Err(e) = write() {
            log::warn!("could not cache {}: {e}", path.display());
        }
    }
}

/// A digest of a model (a folder's files, or one file) that changes when any of them does, without
/// reading them whole: each regular file's name, size and modification time, with 64 KiB samples from
/// its start, middle and end (safetensors headers and tensors from every part of each shard).
pub fn model_digest(path: &Path) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut names: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    names.sort();
    let mut digest = Fnv1a::new();
    let mut sample = vec![0u8; 64 << 10];
    for path in names {
        crate::fsutil::require_regular_file(&path).map_err(|e| Error::io(&path, e))?;
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let modified = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        digest.write(path.file_name().unwrap_or_default().as_encoded_bytes());
        digest.write(&len.to_le_bytes());
        digest.write(&modified.to_le_bytes());
        for start in [0, len / 2, len.saturating_sub(sample.len() as u64)] {
            let n = (len - start.min(len)).min(sample.len() as u64) as usize;
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut sample[..n]))
                .map_err(|e| Error::io(&path, e))?;
            digest.write(&sample[..n]);
        }
    }
    Ok(format!("{:016x}", digest.finish()))
}

/// A digest of a whole file's bytes (an image: small, and any change must miss).
pub fn file_digest(path: &Path) -> Result<String> {
    crate::fsutil::require_regular_file(path).map_err(|e| Error::io(path, e))?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut digest = Fnv1a::new();
    digest.write(&bytes);
    Ok(format!("{:016x}-{}", digest.finish(), bytes.len()))
}
