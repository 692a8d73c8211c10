//! A run's output folder belongs to one run at a time: a lock for as long as the run lives, and checks
//! before anything is written, so that a run never writes over another run's work or over files it did
//! not make.

use crate::error::{Error, Result};
use crate::train::{CHECKPOINT_PREFIX, MANIFEST, newest_checkpoint};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

const LOCK: &str = ".nibble.lock";

/// Where `--overwrite` moves an earlier run's files before deleting them (`.nibble-old-PID`).
const ASIDE_PREFIX: &str = ".nibble-old-";

/// The files a run writes at the top of its folder (besides `checkpoint-N/`).
const RUN_FILES: &[&str] = &[
    "adapter_model.safetensors",
    crate::train::flux2::LORA_FILE,
    "adapter_config.json",
    "metrics.jsonl",
    crate::train::run::SAMPLES_FILE,
    "loss_curve.png",
    MANIFEST,
    crate::train::RECORD_FILE,
    crate::train::ADAPTER_CHAT_TEMPLATE,
    LOCK,
];

/// The tokenizer files a run saves beside its adapter: a run's only where the folder also holds a
/// file no one but nibble writes (a saved tokenizer alone is someone's work, not an earlier run).
const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json"];

/// Whether `dir` holds a file only a nibble run writes.
fn holds_a_run(dir: &Path) -> bool {
    [MANIFEST, crate::train::RECORD_FILE, "metrics.jsonl"]
        .iter()
        .any(|f| dir.join(f).is_file() && nibble_wrote(dir, f))
}

/// Whether the file `name` in `dir`, if it is a run's options or manifest, is one nibble wrote: a
/// user's own nibble_config.toml (the one `--config` reads, say) or another tool's run.json under those
/// names is the user's work, which a fresh run must not take for an earlier run's and replace. Other
/// names are taken at their word.
fn nibble_wrote(dir: &Path, name: &str) -> bool {
    let path = dir.join(name);
    if name == crate::train::RECORD_FILE {
        let mut head = [0u8; 64];
        let n = std::fs::File::open(&path)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        return head[..n].starts_with(crate::train::settings::RECORD_HEADER.as_bytes());
    }
    if name == MANIFEST {
        let text = crate::fsutil::read_to_string(&path).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        return ["model", "data", "options"]
            .iter()
            .all(|section| value.get(section).is_some_and(|v| v.is_object()));
    }
    true
}

/// Files an operating system's file browser drops into folders: neither a run's nor the user's work.
const SYSTEM_LITTER: &[&str] = &[".DS_Store", "Thumbs.db", "desktop.ini"];

/// Whether `name` in `dir` is something a nibble run writes: its files, their temporary forms
/// (`.NAME.tmp-PID` while written atomically), and its checkpoints (`checkpoint-N/` holding nibble's
/// optimizer.safetensors, so that a Hugging Face Trainer's checkpoint-N/ is not taken for one, and
/// `.checkpoint-N.tmp/` while one is written, `.checkpoint-N.pruned/` while one is deleted).
fn is_run_entry(dir: &Path, name: &str) -> bool {
    let step_suffix = |n: &str| {
        n.strip_prefix(CHECKPOINT_PREFIX)
            .is_some_and(|step| !step.is_empty() && step.bytes().all(|b| b.is_ascii_digit()))
    };
    let temporary_file = name
        .strip_prefix('.')
        .and_then(|n| n.rsplit_once(".tmp-"))
        .is_some_and(|(file, pid)| {
            let ours = RUN_FILES.contains(&file)
                || ((TOKENIZER_FILES.contains(&file)
                    || crate::train::flux2::is_sample_image(file))
                    && holds_a_run(dir));
            ours && pid.bytes().all(|b| b.is_ascii_digit())
        });
    let temporary_checkpoint = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp").or_else(|| n.strip_suffix(PRUNED)))
        .is_some_and(step_suffix);
    let set_aside = name
        .strip_prefix(ASIDE_PREFIX)
        .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
    let sample_image = crate::train::flux2::is_sample_image(name) && holds_a_run(dir);
    (RUN_FILES.contains(&name) && nibble_wrote(dir, name))
        || sample_image
        || (TOKENIZER_FILES.contains(&name) && holds_a_run(dir))
        || crate::train::tensorboard::is_event_file(name)
        || set_aside
        || temporary_file
        || temporary_checkpoint
        || (step_suffix(name) && dir.join(name).join("optimizer.safetensors").is_file())
}

/// What a checkpoint being deleted is renamed to first (`.checkpoint-N.pruned`): apart from a
/// checkpoint being written (`.checkpoint-N.tmp`), which a killed run may leave whole.
const PRUNED: &str = ".pruned";

/// Deletes all but the `keep` newest of nibble's checkpoints in `dir` (those `is_run_entry` owns:
/// `checkpoint-N/` holding optimizer.safetensors), oldest first; each is renamed to its temporary form
/// before it is deleted, so an interrupted deletion never leaves a half checkpoint that looks complete.
/// Returns the checkpoints removed.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut checkpoints: Vec<(usize, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            is_run_entry(dir, &name).then_some((step, name))
        })
        .collect();
    checkpoints.sort();
    let excess = checkpoints.len().saturating_sub(keep.max(1));
    let mut removed = Vec::new();
    for (_, name) in checkpoints.into_iter().take(excess) {
        let (path, aside) = (dir.join(&name), dir.join(format!(".{name}{PRUNED}")));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&path, &aside).map_err(|e| Error::io(&path, e))?;
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// The output folder, locked by this process. The operating system releases the lock when the process
/// ends however it ends, so a killed run leaves no lock that blocks the next one. The lock file itself
/// stays: deleting it would let a process that opened it just before lock a file no one else sees.
pub struct RunFolder {
    dir: PathBuf,
    lock: Option<std::fs::File>,
    /// The folders this run created to reach `dir`, innermost first.
    created: Vec<PathBuf>,
    /// Whether the lock file is this run's own (it did not exist before).
    lock_created: bool,
    /// Whether the run got past its checks and loading (see `clear_earlier_run`).
    proceeded: bool,
    /// An earlier run's files, cleared by `clear_earlier_run` (`--overwrite`).
    earlier_run: Vec<PathBuf>,
}

impl RunFolder {
    /// Locks `dir` (creating it if needed) and checks that this run may write there. A fresh run needs
    /// an empty folder, or one holding only an earlier run's files with `overwrite`, which
    /// `clear_earlier_run` then clears. Resuming (from `resume`) needs a checkpoint there, and a folder
    /// that is the checkpoint's own or that a fresh run could take.
    pub fn claim(dir: &Path, overwrite: bool, resume: Option<&Path>) -> Result<Self> {
        if overwrite && resume.is_some() {
            return Err(Error::Invalid(
                "--overwrite starts the run over and --resume continues it: give one".into(),
            ));
        }
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "--output {} is a file; name a folder for the run",
                dir.display()
            )));
        }
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock_created = !dir.join(LOCK).exists();
        let lock = lock(dir)?;
        let mut folder = RunFolder {
            dir: dir.to_path_buf(),
            lock,
            created,
            lock_created,
            proceeded: false,
            earlier_run: Vec::new(),
        };
        // Before the checks: a checkpoint a killed run left whole but unnamed is the one to resume.
        folder.remove_stale_temporaries();
        folder.check(overwrite, resume)?;
        Ok(folder)
    }

    fn check(&mut self, overwrite: bool, resume: Option<&Path>) -> Result<()> {
        let dir = self.dir.clone();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK && !SYSTEM_LITTER.contains(&n.as_str()))
            .collect();
        names.sort();
        let finished = crate::train::holds_finished_run(&dir);
        if let Some(from) = resume {
            // A finished run with a checkpoint goes on where --max-steps or --epochs now ask for
            // more steps (as transformers' resume_from_checkpoint does); `run::restore_for_resume`
            // refuses it once the checkpoint shows that they do not.
            let (from_here, own) = match (from.canonicalize(), dir.canonicalize()) {
                (Ok(from), Ok(out)) => (from == out, from.starts_with(out)),
                _ => (false, false),
            };
            if newest_checkpoint(from)?.is_none() {
                return Err(Error::Invalid(if finished && from_here {
                    format!(
                        "{} holds a finished run without checkpoints: nothing to resume from; \
                         pass --overwrite to train it again",
                        dir.display()
                    )
                } else {
                    format!(
                        "{} holds no complete checkpoint to resume from",
                        from.display()
                    )
                }));
            }
            if own {
                return Ok(());
            }
            // Resuming from elsewhere into this folder: it must be one a fresh run could take.
        }
        if let Some(foreign) = names.iter().find(|n| !is_run_entry(&dir, n)) {
            return Err(Error::Invalid(format!(
                "{} holds files nibble did not write ({foreign}); choose a new or empty --output",
                dir.display()
            )));
        }
        let newest = newest_checkpoint(&dir).ok().flatten();
        let metrics = std::fs::metadata(dir.join("metrics.jsonl")).map_or(0, |m| m.len());
        // A run that died before its first step left nothing a user could want back.
        let nothing_to_lose = !finished && newest.is_none() && metrics == 0;
        if names.is_empty() || nothing_to_lose {
            self.earlier_run = names.iter().map(|n| dir.join(n)).collect();
            return Ok(());
        }
        if overwrite && resume.is_none() {
            self.earlier_run = names.iter().map(|n| dir.join(n)).collect();
            return Ok(());
        }
        Err(Error::Invalid(if finished {
            format!(
                "{} already holds a finished run (its adapter is there); pass --overwrite to \
                 replace it",
                dir.display()
            )
        } else if let Some(checkpoint) = newest {
            format!(
                "{} holds an unfinished run (newest checkpoint {}); continue it with --resume {} or \
                 pass --overwrite to start over",
                dir.display(),
                checkpoint.display(),
                dir.display()
            )
        } else {
            format!(
                "{} holds an unfinished run without checkpoints (metrics.jsonl); pass --overwrite to \
                 start over",
                dir.display()
            )
        }))
    }

    /// Refuses to clear an earlier run that holds one of this run's `inputs` (an --init-adapter inside
    /// the folder, say): the run would delete what it is about to read.
    pub fn check_inputs(&self, inputs: &[&Path]) -> Result<()> {
        let dir = self
            .dir
            .canonicalize()
            .map_err(|e| Error::io(&self.dir, e))?;
        for input in inputs {
            let Ok(input) = input.canonicalize() else {
                continue;
            };
            // A folder above the output (a model folder holding its runs) loses nothing it reads.
            let above = dir.starts_with(&input) && dir != input;
            for entry in &self.earlier_run {
                // The input is one of the run's files, inside one of its checkpoints, or a folder
                // holding them.
                if let Ok(entry) = entry.canonicalize()
                    && (input.starts_with(&entry) || (!above && entry.starts_with(&input)))
                {
                    return Err(Error::Invalid(format!(
                        "--overwrite would delete {}, which this run reads; copy it elsewhere first",
                        input.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Marks the folder as this run's: its lock file now names this process, and it stays when the run
    /// ends. Call once the run has started.
    pub fn take(&mut self) {
        self.proceeded = true;
        if let Some(lock) = &mut self.lock {
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(lock, "{}", std::process::id());
        }
    }

    /// Deletes what runs killed in this folder left half-written: checkpoints (`.checkpoint-N.tmp/`),
    /// files (`.NAME.tmp-PID`) and earlier runs set aside. This process holds the lock, so no other
    /// run is writing them; `is_run_entry` tells them from anything of the user's. Where the folder
    /// could not be locked, another run may be writing them: they stay. A checkpoint whose state file
    /// is there is whole (it is written last): one killed between replacing an earlier save of its
    /// step and taking its name is given its name, not deleted.
    fn remove_stale_temporaries(&self) {
        if self.lock.is_none() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let own = name.ends_with(&format!("-{}", std::process::id()));
            if !name.starts_with('.') || name == LOCK || own || !is_run_entry(&self.dir, &name) {
                continue;
            }
            let path = entry.path();
            let whole_checkpoint = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .filter(|n| n.starts_with(CHECKPOINT_PREFIX))
                .filter(|n| !self.dir.join(n).exists())
                .filter(|_| crate::train::state_file(&path).is_some());
            if let Some(final_name) = whole_checkpoint {
                let target = self.dir.join(final_name);
                match std::fs::rename(&path, &target) {
                    Ok(()) => log::warn!(
                        "{} was whole but not yet named: it is {} now",
                        path.display(),
                        target.display()
                    ),
                    Err(e) => log::warn!(
                        "could not name {} {}: {e}",
                        path.display(),
                        target.display()
                    ),
                }
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => log::info!("removed {}, left by a run killed earlier", path.display()),
                Err(e) => log::warn!(
                    "could not remove {} (left by a run killed earlier): {e}",
                    path.display()
                ),
            }
        }
    }

    /// Deletes the earlier run's files (and only them). Call once this run's inputs are loaded.
    pub fn clear_earlier_run(&mut self) -> Result<()> {
        if self.earlier_run.is_empty() {
            return Ok(());
        }
        // Moved aside first (renames within the folder), so that a failure half-way leaves every file
        // in one place or the other, never half a run deleted; then deleted together.
        let aside = self
            .dir
            .join(format!("{ASIDE_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        for path in std::mem::take(&mut self.earlier_run) {
            let target = aside.join(path.file_name().unwrap_or_default());
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        log::info!("cleared the earlier run in {}", self.dir.display());
        Ok(())
    }
}

/// Takes the folder's lock, or explains who holds it. Where the file system cannot lock (some network
/// and FUSE mounts), the run goes on unguarded, with a warning.
fn lock(dir: &Path) -> Result<Option<std::fs::File>> {
    let path = dir.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::Invalid(format!(
                "{} is in use by another nibble run (process {}); wait for it to end or choose \
                 another --output",
                dir.display(),
                holder.trim()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            log::warn!(
                "{} cannot be locked on this file system: make sure no other run uses it",
                dir.display()
            );
            return Ok(None);
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    // A lock file made just now names its holder at once; an existing one only once the run is under
    // way (`take`), so that a refused run leaves the folder exactly as it was.
    if file.metadata().is_ok_and(|m| m.len() == 0) {
        let _ = write!(file, "{}", std::process::id());
    }
    Ok(Some(file))
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        // A run refused or failed before it wrote anything leaves the folder as it found it.
        if self.proceeded || !self.lock_created {
            return;
        }
        let _ = std::fs::remove_file(self.dir.join(LOCK));
        for folder in &self.created {
            let _ = std::fs::remove_dir(folder);
        }
    }
}
