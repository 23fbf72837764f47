//! The durable event log on sled (DESIGN §3).
//!
//! One sled tree holds records, the stream index, the id index and the chain
//! hash. Each group commit writes them in an order that makes a crash
//! mid-group repairable at open (see `writer.rs` and `repair.rs`), and readers
//! stop at the durable head. Readers iterate the tree lazily, so memory stays
//! bounded however long the log is; live followers take new records from the
//! writer's in-memory tail (`tail.rs`).

mod keys;
mod lock;
mod read;
mod repair;
mod stream_index;
mod tail;
mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::envelope::{NewEvent, StreamId};

pub use read::{ReadError, RecordIter, StreamIter, Subscription};
pub use verify::{ChainBreak, ChainReport};

/// The subdirectory of the data dir that holds the sled database.
pub const DB_DIR: &str = "db";

/// What version the appender believes the stream is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// Append only if the stream is exactly at this version (0: the stream is new).
    Exact(u64),
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
        }
    }
}

/// Where an event sits: globally and in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub seq: u64,
    pub version: u64,
}

/// Publishing held back ([`EventLog::hold_publishing`]) until this drops.
#[cfg(any(test, feature = "test-hooks"))]
pub struct PublishingHeld {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

#[cfg(any(test, feature = "test-hooks"))]
impl Drop for PublishingHeld {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

#[cfg(any(test, feature = "test-hooks"))]
impl EventLog {
    /// Holds back the publishing of flushed groups, as a group flushed
    /// before them would, until the returned guard drops: appends are then
    /// written and flushed, but not durable to anyone, nor readable, and
    /// the writer takes no more of them. For tests of what happens in
    /// between (only with the `test-hooks` feature).
    pub fn hold_publishing(&self) -> PublishingHeld {
        let durable = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .durable
            .clone();
        let (held, held_seen) = std::sync::mpsc::sync_channel(0);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _held = durable.publishing();
            let _ = held.send(());
            let _ = released.recv();
        });
        let _ = held_seen.recv();
        PublishingHeld {
            release: Some(release),
            holder: Some(holder),
        }
    }
}

/// When the events of an [`EventLog::append_early`] are durable.
#[must_use = "the events are not known to be durable until this says so"]
pub struct WhenDurable(writer::Answer);

impl WhenDurable {
    /// Waits for the flush of the events; their positions once durable.
    pub async fn wait(self) -> Result<Appended, AppendError> {
        self.0.await.map_err(|_| AppendError::Closed)?
    }
}

/// The positions of an append's events, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub positions: Vec<Position>,
    /// True when every event had been appended before: nothing was written and
    /// the positions are the original ones.
    pub deduplicated: bool,
}

impl Appended {
    pub fn first(&self) -> Position {
        self.positions[0]
    }

    pub fn last(&self) -> Position {
        self.positions[self.positions.len() - 1]
    }
}

/// Why an append was refused. Nothing of a refused append is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("version conflict on stream {stream}: expected version {expected}, actual {actual}")]
    Conflict {
        stream: StreamId,
        expected: ExpectedVersion,
        actual: u64,
    },
    #[error("an append needs at least one event")]
    Empty,
    #[error("event id {id} appears twice in one append")]
    DuplicateInAppend { id: Uuid },
    #[error("event id {id} was appended before (seq {seq}) but others of this append were not; an append is deduplicated whole")]
    PartialDuplicate { id: Uuid, seq: u64 },
    #[error("the event log is closed")]
    Closed,
    #[error("{0}")]
    Storage(String),
}

/// Why a data dir could not be opened. A refused open never changes the log's
/// contents (sled may still rewrite its own bookkeeping files when it opened the
/// database before the refusal).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data dir {dir} does not exist")]
    Missing { dir: String },
    #[error("{path} is not a directory")]
    NotADirectory { path: String },
    #[error("{dir} holds no switchboard event log")]
    NotADataDir { dir: String },
    #[error("data dir {dir} is in use by another switchboard process: {holder}")]
    InUse { dir: String, holder: String },
    #[error("data dir {dir} is corrupt: {detail}")]
    Corrupt { dir: String, detail: String },
    #[error("cannot open data dir {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to open a data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the dir and an empty log when missing (`serve`, `keys issue`).
    CreateIfMissing,
    /// Refuse a missing dir or one without a log (read-only commands).
    MustExist,
}

/// The durable event log. Cheap to clone; the last clone to drop closes it.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    appends: Mutex<Option<mpsc::Sender<writer::AppendRequest>>>,
    /// The writer's state, for lone appenders; its thread has it too.
    writer: Arc<writer::Shared>,
    /// The writer's flushes and their outcome (whether the log has failed).
    durable: Arc<writer::Durability>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    head: watch::Receiver<u64>,
    /// The newest durable records, decoded, for live followers.
    tail: Arc<tail::Tail>,
    /// Stream index entries not in the tree yet.
    unindexed: Arc<stream_index::Unindexed>,
    db: sled::Db,
    tree: sled::Tree,
    /// The data dir's lock. Readers that outlive the log (subscriptions,
    /// iterators) hold sled open, so they hold this too: the lock is released
    /// only when the last sled handle is gone. Declared last for the same reason.
    lock: Arc<lock::DirLock>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.appends.lock().expect("append sender lock").take();
        if let Some(writer) = self
            .writer_thread
            .lock()
            .expect("writer handle lock")
            .take()
        {
            let _ = writer.join();
        }
    }
}

/// How long an open waits for sled's own file lock once it holds the data
/// dir's: this process's last log may still be finishing a write.
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database. sled panics on some corruptions instead of
/// returning an error, hence the outer `Result`.
///
/// The caller holds the data dir's lock, so no other process has the
/// database; if sled's own lock is still taken, it is this process's
/// previous log — dropped, but sled finishes its last IO buffer write on
/// a pool thread that keeps the file open for a moment — and waiting a
/// little is the answer.
fn open_sled(db_path: &Path) -> std::thread::Result<sled::Result<sled::Db>> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        let config = sled::Config::new().path(db_path);
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()));
        let locked = matches!(&opened, Ok(Err(sled::Error::Io(e)))
            if e.to_string().contains("could not acquire lock"));
        if !locked || std::time::Instant::now() >= deadline {
            return opened;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

impl EventLog {
    /// Opens (or with [`OpenMode::CreateIfMissing`], creates) the log in `dir`.
    pub fn open(dir: &Path, mode: OpenMode) -> Result<EventLog, OpenError> {
        let shown = dir.display().to_string();
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(OpenError::NotADirectory { path: shown });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match mode {
                OpenMode::MustExist => return Err(OpenError::Missing { dir: shown }),
                OpenMode::CreateIfMissing => {
                    std::fs::create_dir_all(dir).map_err(|source| OpenError::Io {
                        dir: shown.clone(),
                        source,
                    })?;
                }
            },
            Err(source) => return Err(OpenError::Io { dir: shown, source }),
        }
        let db_path = dir.join(DB_DIR);
        let existed = db_path.join("conf").exists();
        if mode == OpenMode::MustExist && !existed {
            return Err(OpenError::NotADataDir { dir: shown });
        }
        let lock = lock::acquire(dir)?;
        let corrupt = |detail: String| OpenError::Corrupt {
            dir: shown.clone(),
            detail,
        };
        let db = open_sled(&db_path)
            .map_err(|_| corrupt("the database could not be read".to_owned()))?
            .map_err(|e| match e {
                sled::Error::Io(source) => OpenError::Io {
                    dir: shown.clone(),
                    source,
                },
                other => corrupt(other.to_string()),
            })?;
        let tree = db.open_tree("log").map_err(|e| corrupt(e.to_string()))?;
        match tree
            .get(keys::FORMAT_KEY)
            .map_err(|e| corrupt(e.to_string()))?
        {
            Some(mark) if mark == keys::FORMAT_MARK => {}
            Some(mark) => {
                return Err(corrupt(format!(
                    "unknown log format {:?}",
                    String::from_utf8_lossy(&mark)
                )))
            }
            // sled recovers some garbage as an empty database: a database that
            // existed before this open must already carry the mark.
            None if existed => return Err(corrupt(
                "the event log's format mark is missing (if this dir never held events, remove it)"
                    .to_owned(),
            )),
            None if tree.is_empty() => {
                tree.insert(keys::FORMAT_KEY, keys::FORMAT_MARK)
                    .and_then(|_| db.flush())
                    .map_err(|e| corrupt(e.to_string()))?;
            }
            None => return Err(corrupt("the log has records but no format mark".to_owned())),
        }
        let (last_seq, last_hash) = match tree.scan_prefix([keys::RECORD]).next_back() {
            None => (0, [0u8; 32]),
            Some(entry) => {
                let (key, value) = entry.map_err(|e| corrupt(e.to_string()))?;
                let last = read::split_row(&key, value)
                    .map_err(|e| corrupt(e.to_string()))?
                    .pop()
                    .ok_or_else(|| corrupt("a record row holds no record".to_owned()))?;
                (last.seq, last.hash)
            }
        };

        let marked = match tree
            .get(keys::HEAD_KEY)
            .map_err(|e| corrupt(e.to_string()))?
        {
            None => (0, [0u8; 32]),
            Some(value) => keys::parse_head(&value)
                .ok_or_else(|| corrupt("the head marker is malformed".to_owned()))?,
        };
        if marked.0 > last_seq {
            return Err(corrupt(format!(
                "the log ends at seq {last_seq} but was written up to seq {}: records {}..={} are missing",
                marked.0,
                last_seq + 1,
                marked.0
            )));
        }
        let (last_seq, last_hash) = if last_seq > marked.0 {
            repair::cut_unfinished_group(&db, &tree, marked, last_seq).map_err(corrupt)?;
            marked
        } else {
            (last_seq, last_hash)
        };
        if marked != (last_seq, last_hash) {
            return Err(corrupt(format!(
                "the last record (seq {last_seq}) does not match the head marker (seq {}): the log cannot be opened safely; restore the data dir from a backup (docs/operations.md, Backups)",
                marked.0
            )));
        }

        let indexed = stream_index::catch_up(&tree, last_seq).map_err(corrupt)?;
        let newest_v7 = writer::newest_v7_id(&tree).map_err(|e| corrupt(e.to_string()))?;
        let mut lock = lock;
        lock.claim().map_err(|source| OpenError::Io {
            dir: dir.display().to_string(),
            source,
        })?;
        let (head_tx, head_rx) = watch::channel(last_seq);
        let (appends_tx, appends_rx) = mpsc::channel(8192);
        let tail = Arc::new(tail::Tail::default());
        let unindexed = Arc::new(stream_index::Unindexed::new(indexed));
        let durable = Arc::new(writer::Durability::new(
            db.clone(),
            tree.clone(),
            unindexed.clone(),
            head_tx,
            tail.clone(),
        ));
        let writer = Arc::new(Mutex::new(writer::Writer {
            tree: tree.clone(),
            next_seq: last_seq + 1,
            last_hash,
            versions: Default::default(),
            durable: durable.clone(),
            newest_v7,
            flusher: None,
        }));
        let thread_writer = writer.clone();
        let handle = std::thread::Builder::new()
            .name("event-log-writer".to_owned())
            .spawn(move || writer::run(thread_writer, appends_rx))
            .map_err(|source| OpenError::Io {
                dir: dir.display().to_string(),
                source,
            })?;
        Ok(EventLog {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                appends: Mutex::new(Some(appends_tx)),
                writer,
                durable,
                writer_thread: Mutex::new(Some(handle)),
                head: head_rx,
                tail,
                unindexed,
                db,
                tree,
                lock: Arc::new(lock),
            }),
        })
    }

    /// Appends `events` to `stream` if it is at `expected`; returns once they are
    /// flushed to disk. Appending events whose ids were all appended before
    /// writes nothing and returns the original positions.
    pub async fn append(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, AppendError> {
        let (request, answer) = writer::AppendRequest::new(stream, expected, events);
        if let Some((sender, request)) = self.append_alone(request)? {
            sender
                .send(request)
                .await
                .map_err(|_| AppendError::Closed)?;
        }
        answer.await.map_err(|_| AppendError::Closed)?
    }

    /// [`EventLog::append`] that returns as soon as the events are written,
    /// before the flush that makes them durable: with their positions, and
    /// what says when they are durable ([`WhenDurable`]). For an appender
    /// with work to do that needs the events' positions but not their
    /// durability (a turn whose message nobody has been told is stored),
    /// so that the work and the flush overlap. Nothing written is readable
    /// before it is durable, and nothing appended later is durable before
    /// it. When the writer thread is not busy the events are written on the
    /// caller's thread and flushed on the flusher's
    /// ([`writer::append_early_alone`]); otherwise they go through the queue.
    pub async fn append_early(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<(Appended, WhenDurable), AppendError> {
        let (mut request, answer) = writer::AppendRequest::new(stream, expected, events);
        let (written, written_seen) = oneshot::channel();
        request.written = Some(written);
        let sender = self.sender()?;
        if let Err(request) = writer::append_early_alone(&self.shared.writer, &sender, request) {
            sender
                .send(request)
                .await
                .map_err(|_| AppendError::Closed)?;
        }
        match written_seen.await {
            Ok(Ok(appended)) => Ok((appended, WhenDurable(answer))),
            Ok(Err(error)) => Err(error),
            // Refused before it was written: the answer says why.
            Err(_) => match answer.await {
                Ok(Err(error)) => Err(error),
                _ => Err(AppendError::Closed),
            },
        }
    }

    /// [`EventLog::append`] for callers outside an async runtime (the CLI).
    pub fn append_blocking(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, AppendError> {
        let (request, answer) = writer::AppendRequest::new(stream, expected, events);
        if let Some((sender, request)) = self.append_alone(request)? {
            sender
                .blocking_send(request)
                .map_err(|_| AppendError::Closed)?;
        }
        answer.blocking_recv().map_err(|_| AppendError::Closed)?
    }

    /// Appends `request` on this thread when the log is idle (see
    /// [`writer::append_alone`]); otherwise gives it back with the queue it
    /// goes into.
    fn append_alone(
        &self,
        request: writer::AppendRequest,
    ) -> Result<Option<(mpsc::Sender<writer::AppendRequest>, writer::AppendRequest)>, AppendError>
    {
        let sender = self.sender()?;
        Ok(writer::append_alone(&self.shared.writer, &sender, request)
            .err()
            .map(|request| (sender, request)))
    }

    fn sender(&self) -> Result<mpsc::Sender<writer::AppendRequest>, AppendError> {
        self.shared
            .appends
            .lock()
            .expect("append sender lock")
            .clone()
            .ok_or(AppendError::Closed)
    }

    /// The seq of the last durable record (0 for an empty log).
    pub fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    /// Why the log refuses appends, once a write or flush has failed (a
    /// full disk, an I/O error): after that, what is on disk is only known
    /// again to a restart, which reads it back. `None` while it takes them.
    pub fn failure(&self) -> Option<String> {
        self.shared.durable.failure()
    }

    /// The current version of a stream (0 when it has no events).
    pub fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        writer::stream_version_through(
            &self.shared.tree,
            &self.shared.unindexed,
            stream,
            self.head(),
        )
    }

    /// The data dir this log lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The sled database, for projections to keep their own trees beside the log.
    pub fn db(&self) -> &sled::Db {
        &self.shared.db
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, ReadError> {
        self.shared
            .db
            .size_on_disk()
            .map_err(|e| ReadError::Storage(e.to_string()))
    }
}
