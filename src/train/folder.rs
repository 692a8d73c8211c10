//! A run's output folder belongs to one run at a time: a lock for as long as the run lives, and checks
//! before anything is written, so that a run never writes over another run's work or over files it did
//! not make.

use crate::error::{Error, Result};
use crate::train::{CHECKPOINT_PREFIX, MANIFEST, newest_checkpoint};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK: &str = ".nibble.lock";

/// The files a run writes at the top of its folder (checkpoints are `checkpoint-N/`, and
/// `.checkpoint-N.tmp/` while one is written).
const RUN_FILES: &[&str] = &[
    "adapter_model.safetensors",
    "adapter_config.json",
    "metrics.jsonl",
    "loss_curve.png",
    MANIFEST,
    LOCK,
];

fn is_run_entry(name: &str) -> bool {
    let checkpoint = |n: &str| {
        n.strip_prefix(CHECKPOINT_PREFIX)
            .is_some_and(|step| step.parse::<usize>().is_ok())
    };
    RUN_FILES.contains(&name)
        || checkpoint(name)
        || name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .is_some_and(checkpoint)
}

/// The output folder, locked by this process. The operating system releases the lock when the process
/// ends however it ends, so a killed run leaves no lock that blocks the next one.
pub struct RunFolder {
    dir: PathBuf,
    lock: std::fs::File,
    created: bool,
}

impl RunFolder {
    /// Locks `dir` (creating it if needed) and checks that this run may write there: a fresh run needs
    /// an empty folder or (with `overwrite`) one holding only an earlier run's files, which it clears;
    /// resuming needs the run unfinished.
    pub fn claim(dir: &Path, overwrite: bool, resuming: bool) -> Result<Self> {
        if overwrite && resuming {
            return Err(Error::Invalid(
                "--overwrite starts the run over and --resume continues it: give one".into(),
            ));
        }
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_path = dir.join(LOCK);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        if let Err(e) = lock.try_lock() {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            return Err(Error::Invalid(match e {
                std::fs::TryLockError::WouldBlock => format!(
                    "{} is in use by another nibble run (process {}); wait for it to end or choose \
                     another --output",
                    dir.display(),
                    holder.trim()
                ),
                std::fs::TryLockError::Error(e) => {
                    format!("{}: cannot lock: {e}", lock_path.display())
                }
            }));
        }
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = write!(lock, "{}", std::process::id());
        let folder = RunFolder {
            dir: dir.to_path_buf(),
            lock,
            created,
        };
        folder.check(overwrite, resuming)?;
        Ok(folder)
    }

    fn check(&self, overwrite: bool, resuming: bool) -> Result<()> {
        let dir = &self.dir;
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK)
            .collect();
        names.sort();
        let finished = dir.join("adapter_model.safetensors").exists();
        if resuming {
            if finished {
                return Err(Error::Invalid(format!(
                    "{} holds a finished run (adapter_model.safetensors): nothing to resume; pass \
                     --overwrite to train it again",
                    dir.display()
                )));
            }
            return Ok(());
        }
        if let Some(foreign) = names.iter().find(|n| !is_run_entry(n)) {
            return Err(Error::Invalid(format!(
                "{} holds files nibble did not write ({foreign}); choose a new or empty --output",
                dir.display()
            )));
        }
        let newest = newest_checkpoint(dir).ok().flatten();
        let metrics = std::fs::metadata(dir.join("metrics.jsonl")).map_or(0, |m| m.len());
        // A run that died before its first step left nothing a user could want back.
        let nothing_to_lose = !finished && newest.is_none() && metrics == 0;
        if names.is_empty() {
            return Ok(());
        }
        if !overwrite && !nothing_to_lose {
            return Err(Error::Invalid(if finished {
                format!(
                    "{} already holds a finished run (adapter_model.safetensors); pass --overwrite to \
                     replace it",
                    dir.display()
                )
            } else {
                format!(
                    "{} holds an unfinished run ({}); continue it with --resume {0} or pass --overwrite \
                     to start over",
                    dir.display(),
                    newest.map_or("no checkpoint".to_string(), |c| format!(
                        "newest checkpoint {}",
                        c.display()
                    ))
                )
            }));
        }
        for name in names {
            let path = dir.join(&name);
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| Error::io(&path, e))?;
        }
        if !nothing_to_lose {
            log::info!("--overwrite: cleared the earlier run in {}", dir.display());
        }
        Ok(())
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        let _ = self.lock.unlock();
        let _ = std::fs::remove_file(self.dir.join(LOCK));
        // A run that failed before writing anything leaves no empty folder behind.
        if self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
