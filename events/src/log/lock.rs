//! One process per data dir. sled's own lock would make a second opener fail with
//! an opaque I/O error; this lock file is taken first and names its holder, so the
//! second opener can say who holds the dir and leave everything untouched.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::OpenError;

pub const LOCK_FILE: &str = "switchboard.lock";

/// The data dir's lock, taken but not yet claimed.
pub struct DirLock {
    file: File,
    path: PathBuf,
    /// Whether this open created the lock file (removed again if the open fails).
    created: bool,
}

/// Takes the data dir's lock for as long as the returned lock lives.
pub fn acquire(dir: &Path) -> Result<DirLock, OpenError> {
    let path = dir.join(LOCK_FILE);
    let io_error = |source| OpenError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock {
            file,
            path,
            created,
        }),
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // The holder's description is best effort; the refusal is what matters.
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            Err(OpenError::InUse {
                dir: dir.display().to_string(),
                holder: if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    holder.chars().take(300).collect()
                },
            })
        }
        Err(TryLockError::Error(source)) => Err(io_error(source)),
    }
}

impl DirLock {
    /// Records this process as the holder, once the open has succeeded, so a
    /// refused open leaves the previous holder's description in place.
    pub fn claim(&mut self) -> std::io::Result<()> {
        let holder = format!("pid {} ({})", std::process::id(), command_words());
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(holder.as_bytes())?;
        self.created = false;
        Ok(())
    }
}

/// The program's name and the words of its command line before the first
/// flag (`switchboard keys issue`): the rest may hold secrets (a NATS URL's
/// password, an admin key), and the lock file outlives the process.
fn command_words() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .map(|program| {
            std::path::Path::new(&program)
                .file_name()
                .map_or(program.clone(), |name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    std::iter::once(program)
        .chain(args.take_while(|arg| !arg.starts_with('-')))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Drop for DirLock {
    /// An open that failed after taking the lock removes the lock file it created.
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
