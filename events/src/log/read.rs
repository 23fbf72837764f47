//! Reading the log: by global position, by stream, and live.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

use super::stream_index::Run;
use super::{keys, EventLog};
use crate::codec::{self, DecodeError};
use crate::envelope::{Envelope, StreamId};

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("record {seq} does not decode: {source}")]
    Decode {
        seq: u64,
        #[source]
        source: DecodeError,
    },
    #[error("record {seq} is corrupt: {detail}")]
    Corrupt { seq: u64, detail: String },
}

impl From<sled::Error> for ReadError {
    fn from(error: sled::Error) -> Self {
        ReadError::Storage(error.to_string())
    }
}

/// A record as stored: its chain hash and encoded bytes.
pub(crate) struct RawRecord {
    pub seq: u64,
    pub hash: [u8; 32],
    pub bytes: sled::IVec,
}

impl RawRecord {
    pub fn decode(&self) -> Result<Envelope, ReadError> {
        codec::decode(self.seq, &self.bytes).map_err(|source| ReadError::Decode {
            seq: self.seq,
            source,
        })
    }
}

/// The records of one row of the record keyspace, in seq order: a row of one
/// record (chain hash ‖ encoding) or a chunk of a group commit's records
/// (chain hash ‖ length ‖ encoding, each); see [`keys`].
pub(crate) fn split_row(key: &[u8], value: sled::IVec) -> Result<Vec<RawRecord>, ReadError> {
    let (first, last) = keys::record_row_seqs(key).ok_or_else(|| ReadError::Corrupt {
        seq: 0,
        detail: format!("malformed record key {key:02x?}"),
    })?;
    let hash_at = |seq: u64, at: usize| {
        value
            .get(at..at + keys::HASH_LEN)
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| ReadError::Corrupt {
                seq,
                detail: "shorter than its chain hash".to_owned(),
            })
    };
    if first == last {
        let hash = hash_at(first, 0)?;
        let bytes = value.subslice(keys::HASH_LEN, value.len() - keys::HASH_LEN);
        return Ok(vec![RawRecord {
            seq: first,
            hash,
            bytes,
        }]);
    }
    let count = (last - first).saturating_add(1);
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(64));
    let mut at = 0;
    for seq in first..=last {
        let hash = hash_at(seq, at)?;
        let len = value
            .get(at + keys::HASH_LEN..at + keys::FRAME_HEADER_LEN)
            .and_then(|len| <[u8; 4]>::try_from(len).ok())
            .map(u32::from_le_bytes)
            .and_then(|len| usize::try_from(len).ok())
            .filter(|len| at + keys::FRAME_HEADER_LEN + len <= value.len())
            .ok_or_else(|| ReadError::Corrupt {
                seq,
                detail: format!(
                    "its length in the chunk of records {first}..={last} is cut off or too long"
                ),
            })?;
        records.push(RawRecord {
            seq,
            hash,
            bytes: value.subslice(at + keys::FRAME_HEADER_LEN, len),
        });
        at += keys::FRAME_HEADER_LEN + len;
    }
    if at != value.len() {
        return Err(ReadError::Corrupt {
            seq: last,
            detail: format!("the chunk of records {first}..={last} has bytes past its last record"),
        });
    }
    Ok(records)
}

/// The stored records with `from <= seq <= to`, in order, row by row (no
/// durability check: the callers make it).
pub(crate) struct StoredRecords {
    rows: sled::Iter,
    from: u64,
    to: u64,
    pending: std::vec::IntoIter<RawRecord>,
    /// An error met before the first row, reported first.
    failed: Option<ReadError>,
}

impl StoredRecords {
    pub(crate) fn new(tree: &sled::Tree, from: u64, to: u64) -> StoredRecords {
        // The row holding `from` may start before it (a chunk).
        let (start, failed) = match row_holding(tree, from) {
            Ok(Some((key, _))) => (key.to_vec(), None),
            Ok(None) => (keys::record(from).to_vec(), None),
            Err(e) => (keys::record(from).to_vec(), Some(e)),
        };
        StoredRecords {
            rows: tree.range(start..=keys::record_row_bound(to).to_vec()),
            from,
            to,
            pending: Vec::new().into_iter(),
            failed,
        }
    }
}

impl Iterator for StoredRecords {
    type Item = Result<RawRecord, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(error) = self.failed.take() {
            return Some(Err(error));
        }
        loop {
            if let Some(raw) = self.pending.next() {
                if raw.seq < self.from {
                    continue;
                }
                if raw.seq > self.to {
                    return None;
                }
                return Some(Ok(raw));
            }
            let (key, value) = match self.rows.next()? {
                Ok(row) => row,
                Err(e) => return Some(Err(e.into())),
            };
            match split_row(&key, value) {
                Ok(records) => self.pending = records.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// The row whose records include `seq`, if one does.
fn row_holding(tree: &sled::Tree, seq: u64) -> Result<Option<(sled::IVec, sled::IVec)>, ReadError> {
    let Some(row) = tree
        .range(&keys::record(0)[..]..=&keys::record_row_bound(seq)[..])
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = row?;
    match keys::record_row_seqs(&key) {
        Some((first, last)) if first <= seq && seq <= last => Ok(Some((key, value))),
        Some(_) => Ok(None),
        None => Err(ReadError::Corrupt {
            seq,
            detail: format!("malformed record key {:02x?}", &key[..]),
        }),
    }
}

/// The durable head as an iterator sees it: read again only when a record
/// lies past the last value read, so a long read takes no lock per record.
struct Durable {
    head: watch::Receiver<u64>,
    seen: u64,
}

impl Durable {
    fn new(head: &watch::Receiver<u64>) -> Self {
        Durable {
            head: head.clone(),
            seen: 0,
        }
    }

    /// Whether the record at `seq` is durable. Past the head, it is still
    /// being written.
    fn covers(&mut self, seq: u64) -> bool {
        if seq > self.seen {
            self.seen = *self.head.borrow();
        }
        seq <= self.seen
    }
}

/// Records in seq order, read lazily from the tree, up to the durable head.
pub struct RecordIter {
    inner: StoredRecords,
    durable: Durable,
    /// The seq the next record must have: the log is gapless, so a record
    /// missing from the tree is an error, not something to skip.
    expected: u64,
    _lock: Arc<super::lock::DirLock>,
}

impl RecordIter {
    pub(crate) fn next_raw(&mut self) -> Option<Result<RawRecord, ReadError>> {
        let raw = self.inner.next()?;
        // A record past the head is being written, not yet durable: the end.
        if matches!(&raw, Ok(raw) if !self.durable.covers(raw.seq)) {
            return None;
        }
        Some(raw)
    }
}

impl Iterator for RecordIter {
    type Item = Result<Envelope, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let raw = match self.next_raw()? {
            Ok(raw) => raw,
            Err(error) => return Some(Err(error)),
        };
        if raw.seq != self.expected {
            let missing = self.expected;
            // Once: the iteration ends with the error.
            self.expected = u64::MAX;
            self.inner.to = 0;
            return Some(Err(ReadError::Corrupt {
                seq: missing,
                detail: format!(
                    "the record is missing (the next one stored is {}); run `switchboard verify`",
                    raw.seq
                ),
            }));
        }
        self.expected = raw.seq + 1;
        Some(raw.decode())
    }
}

/// A stream's events in version order, up to the durable head. Records still
/// in the tail come from there, the rest from the tree.
pub struct StreamIter {
    tree: sled::Tree,
    tail: Arc<super::tail::Tail>,
    index: sled::Iter,
    /// The appends of the entry read last, still to read.
    appends: VecDeque<Run>,
    /// The stream's appends not in the tree's index when the read began,
    /// read after `index`: they follow its entries (or repeat the last ones).
    unindexed: VecDeque<Run>,
    /// The version of the next event to read: an entry's events before it
    /// are skipped.
    next_version: u64,
    /// The entry being read: its next seq and how many of its events are left.
    run: (u64, u64),
    /// The records of the row read last: an append's events share rows.
    row: Vec<RawRecord>,
    durable: Durable,
    /// Entries (or an error) met while finding the start, read before `index`.
    queued: VecDeque<Result<(sled::IVec, sled::IVec), ReadError>>,
    _lock: Arc<super::lock::DirLock>,
}

impl Iterator for StreamIter {
    type Item = Result<Envelope, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.run.1 == 0 {
            let append = match self.appends.pop_front() {
                Some(append) => append,
                None => {
                    let stored = match self.queued.pop_front() {
                        Some(entry) => Some(entry),
                        None => self
                            .index
                            .next()
                            .map(|entry| entry.map_err(ReadError::from)),
                    };
                    match stored
                        .map(|entry| entry.and_then(|(key, value)| StreamEntry::parse(key, value)))
                    {
                        Some(Ok(entry)) => {
                            self.appends.extend(entry.appends());
                            continue;
                        }
                        Some(Err(e)) => return Some(Err(e)),
                        None => self.unindexed.pop_front()?,
                    }
                }
            };
            // The append holding the start may begin before it, and one
            // written into the tree since the read began comes twice.
            let skip = self
                .next_version
                .saturating_sub(append.first_version)
                .min(append.count);
            self.run = (append.first_seq.saturating_add(skip), append.count - skip);
            self.next_version = self.next_version.max(append.end_version());
        }
        let seq = self.run.0;
        // Versions grow with seqs: past the head, the rest is not durable yet.
        if !self.durable.covers(seq) {
            return None;
        }
        self.run = (seq + 1, self.run.1 - 1);
        Some(
            stored_in(&self.tree, &self.tail, seq, &mut self.row).and_then(|found| {
                found.ok_or_else(|| ReadError::Corrupt {
                    seq,
                    detail: "an index points at this missing record".to_owned(),
                })
            }),
        )
    }
}

/// A stream index entry as stored, and what it says.
pub(super) struct StreamEntry {
    pub key: sled::IVec,
    pub value: sled::IVec,
    pub first_version: u64,
    /// Its appends' first seq and number of events, in version order.
    pub runs: Vec<(u64, u64)>,
}

impl StreamEntry {
    fn parse(key: sled::IVec, value: sled::IVec) -> Result<StreamEntry, ReadError> {
        let Some((first_version, runs)) =
            keys::stream_entry_version(&key).zip(keys::stream_runs(&value))
        else {
            return Err(ReadError::Corrupt {
                seq: 0,
                detail: format!("malformed index entry {}", String::from_utf8_lossy(&key)),
            });
        };
        Ok(StreamEntry {
            key,
            value,
            first_version,
            runs,
        })
    }

    /// The seq of its first event.
    pub fn first_seq(&self) -> u64 {
        self.runs[0].0
    }

    /// Its appends as runs, with their versions.
    pub fn appends(&self) -> impl Iterator<Item = Run> + '_ {
        let mut version = self.first_version;
        self.runs.iter().map(move |&(first_seq, count)| {
            let run = Run {
                first_version: version,
                first_seq,
                count,
            };
            version = version.saturating_add(count);
            run
        })
    }

    /// The number of events it stands for.
    pub fn count(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |sum, (_, count)| sum.saturating_add(*count))
    }

    /// The version of the entry's last event.
    pub fn last_version(&self) -> u64 {
        self.first_version.saturating_add(self.count() - 1)
    }

    /// Whether its events include the one at `version`.
    pub fn holds(&self, version: u64) -> bool {
        self.first_version <= version && version <= self.last_version()
    }

    /// The seq of its event at `version`, if it has that event.
    pub fn seq_of(&self, version: u64) -> Option<u64> {
        self.appends()
            .find(|run| run.first_version <= version && version < run.end_version())
            .and_then(|run| run.first_seq.checked_add(version - run.first_version))
    }
}

/// The stream index entry whose events include `version`, if one does.
pub(super) fn stream_entry_holding(
    tree: &sled::Tree,
    stream: &StreamId,
    version: u64,
) -> Result<Option<StreamEntry>, ReadError> {
    let Some(entry) = tree
        .range(keys::stream_entry(stream, 0)..=keys::stream_entry(stream, version))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = entry?;
    let entry = StreamEntry::parse(key, value)?;
    Ok(entry.holds(version).then_some(entry))
}

/// Every stream index entry of `stream`, last first.
pub(super) fn stream_entries_backwards(
    tree: &sled::Tree,
    stream: &StreamId,
) -> impl Iterator<Item = Result<StreamEntry, ReadError>> {
    tree.scan_prefix(keys::stream_prefix(stream))
        .rev()
        .map(|entry| {
            let (key, value) = entry?;
            StreamEntry::parse(key, value)
        })
}

/// The record at `seq` if there is one: a copy of the tail's while it holds
/// it, otherwise read from the tree. The caller knows `seq` is durable.
pub(super) fn stored(
    tree: &sled::Tree,
    tail: &super::tail::Tail,
    seq: u64,
) -> Result<Option<Envelope>, ReadError> {
    stored_in(tree, tail, seq, &mut Vec::new())
}

/// [`stored`], keeping the records of the row it read in `row` and looking
/// there first: consecutive reads mostly fall in one row.
fn stored_in(
    tree: &sled::Tree,
    tail: &super::tail::Tail,
    seq: u64,
    row: &mut Vec<RawRecord>,
) -> Result<Option<Envelope>, ReadError> {
    if let Some(envelope) = tail.get(seq) {
        return Ok(Some(Envelope::clone(&envelope)));
    }
    let in_row = |row: &[RawRecord]| {
        row.first().is_some_and(|r| r.seq <= seq) && row.last().is_some_and(|r| seq <= r.seq)
    };
    if !in_row(row) {
        *row = match row_holding(tree, seq)? {
            Some((key, value)) => split_row(&key, value)?,
            None => Vec::new(),
        };
    }
    row.iter()
        .find(|raw| raw.seq == seq)
        .map(RawRecord::decode)
        .transpose()
}

/// The seq the id index gives `id`, if it has it (durable or not: the
/// caller checks). A v7 id is looked for in the `t` rows of its millisecond,
/// then, as any other id, under `i` (where logs from before `t` rows keep
/// every id).
pub(super) fn indexed_seq(tree: &sled::Tree, id: &Uuid) -> Result<Option<u64>, ReadError> {
    if id.get_version_num() == 7 {
        let timed = timed_ids_of(tree, &keys::timed_ids_prefix(id))?;
        if let Some((_, seq)) = timed.into_iter().find(|(stored, _)| stored == id) {
            return Ok(Some(seq));
        }
    }
    untimed_seq(tree, id)
}

/// The v7 ids (and their seqs) of every `t` row under `prefix`: the ids of
/// one millisecond.
pub(super) fn timed_ids_of(
    tree: &sled::Tree,
    prefix: &[u8; 7],
) -> Result<Vec<(Uuid, u64)>, ReadError> {
    let mut ids = Vec::new();
    for row in tree.scan_prefix(prefix) {
        let (key, value) = row?;
        ids.extend(
            keys::parse_timed_ids(&key, &value).ok_or_else(|| ReadError::Corrupt {
                seq: 0,
                detail: format!("the id index row {:02x?} is malformed", &key[..]),
            })?,
        );
    }
    Ok(ids)
}

/// The seq of `id` under `i`: ids that are not v7, and any in older logs.
pub(super) fn untimed_seq(tree: &sled::Tree, id: &Uuid) -> Result<Option<u64>, ReadError> {
    match tree.get(keys::id(id))? {
        None => Ok(None),
        Some(value) => keys::seq_value(&value)
            .map(Some)
            .ok_or_else(|| ReadError::Corrupt {
                seq: 0,
                detail: format!("id index entry of {id} is malformed"),
            }),
    }
}

impl EventLog {
    /// Every record from `from_seq` on, in order, including ones appended while
    /// iterating. Memory stays bounded: records are read as the iterator advances.
    pub fn read_from(&self, from_seq: u64) -> RecordIter {
        self.read_range(from_seq, u64::MAX)
    }

    /// Records with `from_seq <= seq <= to_seq`, in order.
    pub fn read_range(&self, from_seq: u64, to_seq: u64) -> RecordIter {
        RecordIter {
            inner: StoredRecords::new(&self.shared.tree, from_seq, to_seq),
            durable: Durable::new(&self.shared.head),
            expected: from_seq.max(1),
            _lock: self.shared.lock.clone(),
        }
    }

    /// The events of `stream` from `from_version` on, in order.
    pub fn read_stream(&self, stream: &StreamId, from_version: u64) -> StreamIter {
        // Before the tree: an entry leaves `unindexed` once it is there.
        let unindexed = self.shared.unindexed.of(stream).into();
        let tree = &self.shared.tree;
        let end = {
            let mut end = keys::stream_prefix(stream);
            end.extend_from_slice(&u64::MAX.to_be_bytes());
            end
        };
        let mut index = tree.range(keys::stream_entry(stream, from_version)..=end);
        let first = index.next().map(|entry| entry.map_err(ReadError::from));
        let mut queued = VecDeque::new();
        let starts_there = matches!(&first, Some(Ok((key, _)))
            if keys::stream_entry_version(key) == Some(from_version));
        if !starts_there && from_version > 1 {
            // `from_version` may lie inside an entry that starts before it.
            match stream_entry_holding(tree, stream, from_version) {
                Ok(Some(entry)) => queued.push_back(Ok((entry.key, entry.value))),
                Ok(None) => {}
                Err(e) => queued.push_back(Err(e)),
            }
        }
        queued.extend(first);
        StreamIter {
            tree: tree.clone(),
            tail: self.shared.tail.clone(),
            index,
            appends: VecDeque::new(),
            unindexed,
            next_version: from_version,
            run: (0, 0),
            row: Vec::new(),
            durable: Durable::new(&self.shared.head),
            queued,
            _lock: self.shared.lock.clone(),
        }
    }

    /// The record at `seq`, if there is one (and it is durable): from the
    /// tail while it holds it.
    pub fn get(&self, seq: u64) -> Result<Option<Envelope>, ReadError> {
        if seq > self.head() {
            return Ok(None);
        }
        stored(&self.shared.tree, &self.shared.tail, seq)
    }

    /// The seq an event id was appended at, if it was.
    pub fn seq_of(&self, id: &Uuid) -> Result<Option<u64>, ReadError> {
        let seq = indexed_seq(&self.shared.tree, id)?;
        Ok(seq.filter(|&seq| seq <= self.head()))
    }

    /// Follows the log from `from_seq`: first every stored record, then each new
    /// one as it becomes durable — in order, with no gap and no duplicate.
    pub fn subscribe(&self, from_seq: u64) -> Subscription {
        Subscription {
            tree: self.shared.tree.clone(),
            tail: self.shared.tail.clone(),
            head: self.shared.head.clone(),
            next_seq: from_seq.max(1),
            buffer: VecDeque::new(),
            _lock: self.shared.lock.clone(),
        }
    }
}

/// How many records a subscription reads from the tree at a time.
const SUBSCRIPTION_CHUNK: u64 = 256;

/// A live subscription to the log; see [`EventLog::subscribe`].
///
/// Records come shared: those the writer committed recently straight from
/// its in-memory tail, older ones read from the tree.
pub struct Subscription {
    tree: sled::Tree,
    tail: Arc<super::tail::Tail>,
    head: watch::Receiver<u64>,
    next_seq: u64,
    buffer: VecDeque<Arc<Envelope>>,
    _lock: Arc<super::lock::DirLock>,
}

impl Subscription {
    /// The next record; waits for one when caught up. `None` once the log has
    /// closed and every durable record was delivered.
    pub async fn next(&mut self) -> Option<Result<Arc<Envelope>, ReadError>> {
        loop {
            if let Some(envelope) = self.buffer.pop_front() {
                return Some(Ok(envelope));
            }
            let head = *self.head.borrow_and_update();
            if self.next_seq <= head {
                let to = head.min(self.next_seq + SUBSCRIPTION_CHUNK - 1);
                if let Err(e) = self.fill(to) {
                    return Some(Err(e));
                }
                continue;
            }
            if self.head.changed().await.is_err() {
                return None;
            }
        }
    }

    /// The next record if one is durable already; `None` when caught up (never waits).
    pub fn try_next(&mut self) -> Option<Result<Arc<Envelope>, ReadError>> {
        if self.buffer.is_empty() {
            let head = *self.head.borrow();
            if self.next_seq > head {
                return None;
            }
            let to = head.min(self.next_seq + SUBSCRIPTION_CHUNK - 1);
            if let Err(e) = self.fill(to) {
                return Some(Err(e));
            }
        }
        self.buffer.pop_front().map(Ok)
    }

    /// The seq the next delivered record will have.
    pub fn position(&self) -> u64 {
        self.next_seq - self.buffer.len() as u64
    }

    fn fill(&mut self, to_seq: u64) -> Result<(), ReadError> {
        let taken = self.tail.read(self.next_seq, to_seq, &mut self.buffer);
        if taken > 0 {
            self.next_seq += taken;
            return Ok(());
        }
        for raw in StoredRecords::new(&self.tree, self.next_seq, to_seq) {
            let raw = raw?;
            if raw.seq != self.next_seq {
                return Err(ReadError::Corrupt {
                    seq: self.next_seq,
                    detail: format!("missing; the next stored record is {}", raw.seq),
                });
            }
            self.buffer.push_back(Arc::new(raw.decode()?));
            self.next_seq += 1;
        }
        if self.next_seq <= to_seq {
            return Err(ReadError::Corrupt {
                seq: self.next_seq,
                detail: "durable but missing".to_owned(),
            });
        }
        Ok(())
    }
}
