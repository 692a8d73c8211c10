//! Output files appear whole or not at all: written next to their destination, synced, then renamed.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Runs `write` on a temporary path beside `path`, then renames it into place. On failure the
/// temporary file is removed and `path` is left as it was; on an interruption too, where the
/// command removes partial outputs (`remove_partial_outputs`).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temporary_sibling(path);
    let _partial = Partial::file(&tmp);
    let result = write(&tmp)
        .and_then(|()| make_shareable(&tmp))
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Outputs being written (temporary files and folders, later renamed into place), which an
/// interrupted command removes rather than leave behind: a model's worth of bytes, hidden by a dot.
static PARTIAL: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

/// Set once `remove_partial_outputs` ran: the command is ending on a signal, and an error its
/// writer meets from then on is that, not a failure to report.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A path in `PARTIAL` while this lives, dropped once it is renamed into place or removed. A file
/// is registered before it is created (so that one under the name already, someone's, is at most
/// truncated, never a folder deleted); a folder only once this command created it.
pub struct Partial(PathBuf);

impl Partial {
    /// A file this command is about to write.
    pub fn file(path: &Path) -> Self {
        Self::register(path, false)
    }

    /// A folder this command is about to create.
    pub fn folder(path: &Path) -> Self {
        Self::register(path, true)
    }

    fn register(path: &Path, folder: bool) -> Self {
        PARTIAL
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.to_path_buf(), folder));
        Partial(path.to_path_buf())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        let mut partial = PARTIAL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = partial.iter().rposition(|(p, _)| *p == self.0) {
            partial.remove(i);
        }
    }
}

/// Removes every partial output (`Partial`): what a command that writes files does when it is
/// interrupted, before it exits. Returns the paths removed. A folder is first renamed aside, so
/// that files the command goes on creating in it meanwhile fail instead of keeping it.
pub fn remove_partial_outputs() -> Vec<PathBuf> {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    let partial = std::mem::take(&mut *PARTIAL.lock().unwrap_or_else(|e| e.into_inner()));
    partial
        .into_iter()
        .filter(|(path, folder)| match folder {
            true => {
                let aside = path.with_file_name(format!(
                    "{}.removing",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
                std::fs::rename(path, &aside).is_ok() && std::fs::remove_dir_all(&aside).is_ok()
            }
            false => std::fs::remove_file(path).is_ok(),
        })
        .map(|(path, _)| path)
        .collect()
}

/// Whether the command is ending on a signal (`remove_partial_outputs` ran).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// The file standing where `folder`, or a folder above it, would be: creating the folder would fail
/// with the OS's bare "File exists".
pub fn file_in_the_way(folder: &Path) -> Option<&Path> {
    folder
        .ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .filter(|a| !a.is_dir())
}

/// Runs `write` on a new temporary folder beside `folder`, then renames it into place (over an
/// empty folder there). On failure or interruption (`remove_partial_outputs`) the temporary folder is
/// removed and nothing appears at `folder`. The temporary name is this process's, created afresh: a
/// folder already there under it is someone's (a user's, or a command killed earlier) and is
/// neither reused nor deleted.
pub fn write_folder_atomically(
    folder: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    if let Some(file) = file_in_the_way(folder) {
        return Err(Error::Invalid(format!(
            "{}: {} is a file, not a folder",
            folder.display(),
            file.display()
        )));
    }
    let tmp = temporary_sibling(folder);
    if let Some(parent) = tmp.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // Registered before it is made: an interruption just after it appears must find it.
    let _partial = Partial::folder(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write(&tmp).and_then(|()| {
        // An empty folder made for the output gives way (only an empty one: remove_dir refuses
        // others); renaming over it is not possible everywhere.
        if folder.is_dir() {
            std::fs::remove_dir(folder).map_err(|e| Error::io(folder, e))?;
        }
        std::fs::rename(&tmp, folder).map_err(|e| Error::io(folder, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What a missing path could have been meant as on the Hugging Face hub.
#[derive(Clone, Copy)]
pub enum HubRepo {
    Model,
    Dataset,
}

/// What to say of a path that is neither a folder nor a file: that, and for what looks like a Hugging
/// Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `trl-lib/Capybara`), how to get it (nibble never
/// downloads).
pub fn not_found_message(path: &Path, repo: HubRepo) -> String {
    let text = path.to_string_lossy();
    let parts: Vec<&str> = text.split('/').collect();
    // Not `data/rows.jsonl` (a file's name) nor `runs/x` where runs/ is a folder here.
    let file_name = [
        ".jsonl",
        ".json",
        ".parquet",
        ".arrow",
        ".safetensors",
        ".csv",
    ]
    .iter()
    .any(|ext| text.ends_with(ext));
    let hub_id = parts.len() == 2
        && !file_name
        && !Path::new(parts[0]).is_dir()
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.starts_with('.')
        });
    if path.exists() {
        // A device or a FIFO: there, but neither a folder nor a file to read.
        return format!("{text}: not a folder or a regular file");
    }
    if !hub_id {
        return format!("{text}: no such folder or file");
    }
    let (what, repo_type, pass) = match repo {
        HubRepo::Model => ("", "", "that folder"),
        HubRepo::Dataset => (
            " dataset",
            " --repo-type dataset",
            "that folder (its train split; FOLDER/SPLIT for another)",
        ),
    };
    format!(
        "{text}: no such folder or file. It looks like a Hugging Face hub{what} id: nibble reads local \
         files only and never downloads; fetch it first, e.g. `huggingface-cli download{repo_type} \
         {text} --local-dir {}`, and pass {pass}",
        parts[1]
    )
}

pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    // The browser build has no process ids; it never writes files either, so a fixed suffix is enough.
    #[cfg(not(target_arch = "wasm32"))]
    let id = std::process::id();
    #[cfg(target_arch = "wasm32")]
    let id = 0;
    path.with_file_name(format!(".{name}.tmp-{id}"))
}

/// Writers built on temporary-file crates create files readable by the owner only; a model or adapter
/// is meant to be shared like any other output, so give it the usual rw-r--r--.
fn make_shareable(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Refuses an `output` that would replace one of a command's `inputs` (a file, or anything inside an
/// input folder): the command would destroy what it reads.
pub fn refuse_overwriting_inputs(output: &Path, inputs: &[&Path], flag: &str) -> Result<()> {
    let Ok(target) = output.canonicalize() else {
        return Ok(()); // nothing there yet
    };
    for input in inputs {
        if let Ok(input) = input.canonicalize()
            && target.starts_with(&input)
        {
            return Err(Error::Invalid(format!(
                "{flag} {} would replace the input {}; write somewhere else",
                output.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Refuses a path that is not a regular file (a folder, a FIFO, a device): reading a FIFO would wait
/// forever, and a device may never end.
pub fn require_regular_file(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a folder, FIFO or device); give a file",
        ))
    }
}

/// `std::fs::read_to_string` for regular files only, and where the file is not UTF-8, an error that
/// says on which line and column (the standard one names no place).
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    require_regular_file(path)?;
    String::from_utf8(std::fs::read(path)?).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            not_utf8(e.as_bytes(), e.utf8_error().valid_up_to()),
        )
    })
}

/// Where the first byte that is not UTF-8 lies in `bytes` (at `at`), in a reader's terms.
pub fn not_utf8(bytes: &[u8], at: usize) -> String {
    let before = &bytes[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    format!(
        "line {line}, byte {} of the line: not UTF-8 text (0x{:02x}); save the file as UTF-8",
        at - line_start + 1,
        bytes[at]
    )
}
