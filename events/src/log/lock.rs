//! One process per data dir. sled's own lock would make a second opener fail with
//! an opaque I/O error; this lock file is taken first and names its holder, so the
//! second opener can say who holds the dir and leave everything untouched.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::OpenError;

pub const LOCK_FILE: &str = "switchboard.lock";

/// Takes the data dir's lock for as long as the returned file lives.
pub fn acquire(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let io_error = |source| OpenError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error)?;
    match file.try_lock() {
        Ok(()) => {
            let args: Vec<String> = std::env::args().collect();
            let holder = format!("pid {} ({})", std::process::id(), args.join(" "));
            file.set_len(0).map_err(io_error)?;
            file.rewind().map_err(io_error)?;
            file.write_all(holder.as_bytes()).map_err(io_error)?;
            Ok(file)
        }
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
