//! Opening the data dir for a command: the log, then the projections.

use std::path::Path;

use switchboard_events::{EventLog, OpenMode};
use switchboard_projections::Projections;

/// The log and its projections, caught up to the log's head.
pub struct Store {
    pub log: EventLog,
    pub projections: Projections,
}

/// Opens the data dir. Read-only commands use [`OpenMode::MustExist`], so a
/// missing dir is an error and nothing is created.
pub fn open(dir: &Path, mode: OpenMode) -> anyhow::Result<Store> {
    let log = EventLog::open(dir, mode)?;
    let projections = Projections::open(&log)?;
    Ok(Store { log, projections })
}

/// Opens the data dir and brings every projection up to the log's head.
pub fn open_caught_up(dir: &Path, mode: OpenMode) -> anyhow::Result<Store> {
    let store = open(dir, mode)?;
    store.projections.catch_up(&mut |_| {})?;
    Ok(store)
}
