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
    let (first, last) = row_seqs(key)?;
    let count = (last - first).saturating_add(1);
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(64));
    walk_row(first, last, &value, |frame| {
        records.push(frame.record(&value))
    })?;
    Ok(records)
}

/// The record at `seq` of a row of the record keyspace, if the row holds
/// it: [`split_row`]'s, with the same checks of the whole row, but copying
/// out only that one (a chunk holds up to a group commit's records).
fn record_in_row(key: &[u8], value: sled::IVec, seq: u64) -> Result<Option<RawRecord>, ReadError> {
    let (first, last) = row_seqs(key)?;
    let mut found = None;
    walk_row(first, last, &value, |frame| {
        if frame.seq == seq {
            found = Some(frame);
        }
    })?;
    Ok(found.map(|frame| frame.record(&value)))
}

/// The first and last seq of the records a row holds, from its key.
fn row_seqs(key: &[u8]) -> Result<(u64, u64), ReadError> {
    keys::record_row_seqs(key).ok_or_else(|| ReadError::Corrupt {
        seq: 0,
        detail: format!("malformed record key {key:02x?}"),
    })
}

/// Loads a byte of each cache line of `value`. A row read from sled is
/// mostly not in the CPU's caches, and the walk over its frames is a chain of
/// loads, each at an offset the one before read: one memory latency per
/// record, and most of a history read's time (`bench http`). These loads
/// depend on nothing, so the CPU makes them together, and the walk then
/// reads from the cache.
fn touch_lines(value: &[u8]) {
    const LINE: usize = 64;
    let touched = value.iter().step_by(LINE).fold(0u8, |acc, byte| acc ^ byte);
    std::hint::black_box(touched);
}

/// Where one record lies in its row's value.
#[derive(Clone, Copy)]
struct Frame {
    seq: u64,
    /// Where its chain hash starts; its encoding follows the hash (and, in a
    /// chunk, its length).
    hash_at: usize,
    bytes_at: usize,
    len: usize,
}

impl Frame {
    fn record(self, value: &sled::IVec) -> RawRecord {
        let hash = <[u8; 32]>::try_from(&value[self.hash_at..self.hash_at + keys::HASH_LEN])
            .expect("a frame's hash lies in its row: walk_row checked");
        RawRecord {
            seq: self.seq,
            hash,
            bytes: value.subslice(self.bytes_at, self.len),
        }
    }
}

/// Checks that `value`, the row of records `first..=last`, is laid out
/// whole (see [`split_row`]), handing `each` every record's frame in seq
/// order; a row that is not is corrupt at the first record it cuts off, or
/// at its last record when bytes follow it.
fn walk_row(
    first: u64,
    last: u64,
    value: &[u8],
    mut each: impl FnMut(Frame),
) -> Result<(), ReadError> {
    if first == last {
        let len = value
            .len()
            .checked_sub(keys::HASH_LEN)
            .ok_or_else(|| ReadError::Corrupt {
                seq: first,
                detail: "shorter than its chain hash".to_owned(),
            })?;
        each(Frame {
            seq: first,
            hash_at: 0,
            bytes_at: keys::HASH_LEN,
            len,
        });
        return Ok(());
    }
    touch_lines(value);
    let mut at = 0;
    for seq in first..=last {
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
        each(Frame {
            seq,
            hash_at: at,
            bytes_at: at + keys::FRAME_HEADER_LEN,
            len,
        });
        at += keys::FRAME_HEADER_LEN + len;
    }
    if at != value.len() {
        return Err(ReadError::Corrupt {
            seq: last,
            detail: format!("the chunk of records {first}..={last} has bytes past its last record"),
        });
    }
    Ok(())
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
    // Not `range(..).next_back()`: a sled iterator starts with a copy of the
    // whole node it is in (see vendor/README.md).
    let Some((key, value)) = tree.last_at_or_below(keys::record_row_bound(seq))? else {
        return Ok(None);
    };
    if key[..] < keys::record(0)[..] {
        return Ok(None);
    }
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
    if let Some(envelope) = tail.get(seq) {
        return Ok(Some(Envelope::clone(&envelope)));
    }
    match row_holding(tree, seq)? {
        Some((key, value)) => record_in_row(&key, value, seq)?
            .as_ref()
            .map(RawRecord::decode)
            .transpose(),
        None => Ok(None),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk row of `records` (seq, hash byte, encoding) as the writer
    /// lays it out: chain hash ‖ length ‖ encoding, each.
    fn chunk(records: &[(u64, u8, &[u8])]) -> (Vec<u8>, sled::IVec) {
        let mut value = Vec::new();
        for (_, hash, bytes) in records {
            value.extend_from_slice(&[*hash; keys::HASH_LEN]);
            value.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_le_bytes());
            value.extend_from_slice(bytes);
        }
        let (first, last) = (records[0].0, records[records.len() - 1].0);
        (keys::chunk(first, last).to_vec(), value.into())
    }

    fn same(found: &RawRecord, expected: &RawRecord) -> bool {
        found.seq == expected.seq && found.hash == expected.hash && found.bytes == expected.bytes
    }

    #[test]
    fn a_record_read_alone_from_its_row_is_the_one_splitting_the_row_gives() {
        let records: Vec<(u64, u8, &[u8])> = vec![
            (10, 1, b"first"),
            (11, 2, b""),
            (12, 3, &[7; 300]),
            (13, 4, b"x"),
            (14, 5, b"last of the chunk"),
        ];
        let (key, value) = chunk(&records);
        let split = split_row(&key, value.clone()).expect("a well-formed chunk");
        assert_eq!(split.len(), records.len());
        for expected in &split {
            let found = record_in_row(&key, value.clone(), expected.seq)
                .expect("a well-formed chunk")
                .expect("the chunk holds it");
            assert!(same(&found, expected), "seq {}", expected.seq);
        }
        for outside in [0, 9, 15, u64::MAX] {
            assert!(record_in_row(&key, value.clone(), outside)
                .unwrap()
                .is_none());
        }

        let mut lone = vec![9; keys::HASH_LEN];
        lone.extend_from_slice(b"a record of its own");
        let (key, value) = (keys::record(20).to_vec(), sled::IVec::from(lone));
        let expected = &split_row(&key, value.clone()).unwrap()[0];
        let found = record_in_row(&key, value.clone(), 20).unwrap().unwrap();
        assert!(same(&found, expected));
        assert!(record_in_row(&key, value, 21).unwrap().is_none());
    }

    #[test]
    fn a_damaged_row_is_corrupt_at_each_of_its_records_and_never_a_panic() {
        let records: Vec<(u64, u8, &[u8])> = vec![(1, 1, b"one"), (2, 2, b"two"), (3, 3, b"3")];
        let (key, value) = chunk(&records);
        let mut damaged: Vec<Vec<u8>> = (0..value.len()).map(|len| value[..len].to_vec()).collect();
        let mut longer = value.to_vec();
        longer.extend_from_slice(b"extra");
        damaged.push(longer);
        let mut too_long = value.to_vec();
        too_long[keys::HASH_LEN..keys::FRAME_HEADER_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        damaged.push(too_long);
        for bytes in damaged {
            let row = sled::IVec::from(bytes);
            assert!(split_row(&key, row.clone()).is_err(), "{} bytes", row.len());
            for seq in 1..=3 {
                assert!(
                    matches!(
                        record_in_row(&key, row.clone(), seq),
                        Err(ReadError::Corrupt { .. })
                    ),
                    "seq {seq} of a damaged row of {} bytes",
                    row.len()
                );
            }
        }
        let lone = sled::IVec::from(&[1u8; 5][..]);
        assert!(matches!(
            record_in_row(&keys::record(4), lone, 4),
            Err(ReadError::Corrupt { seq: 4, .. })
        ));
    }

    /// The vendored `Tree::last_at_or_below` (vendor/README.md) finds what
    /// a reverse range does, in a tree of many nodes, as they split and merge.
    #[test]
    fn the_last_entry_at_or_below_a_key_is_the_one_a_reverse_range_finds() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("rows").unwrap();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let check = |tree: &sled::Tree, query: &[u8]| {
            let expected = tree.range(..=query).next_back().transpose().unwrap();
            assert_eq!(
                tree.last_at_or_below(query).unwrap(),
                expected,
                "at {query:02x?}"
            );
        };
        assert_eq!(tree.last_at_or_below(keys::record(5)).unwrap(), None);
        for round in 0..4 {
            for _ in 0..3_000 {
                let seq = next() % 20_000;
                let key = if next() % 3 == 0 {
                    keys::chunk(seq, seq + 1 + next() % 40).to_vec()
                } else {
                    keys::record(seq).to_vec()
                };
                let value = vec![round; usize::try_from(next() % 600).unwrap()];
                tree.insert(key, value).unwrap();
            }
            if round % 2 == 1 {
                // Emptied runs of keys: nodes merge.
                let from = next() % 15_000;
                let gone: Vec<_> = tree
                    .range(keys::record(from)..keys::record(from + 4_000))
                    .keys()
                    .map(Result::unwrap)
                    .collect();
                for key in gone {
                    tree.remove(key).unwrap();
                }
            }
            for _ in 0..2_000 {
                let seq = next() % 21_000;
                check(&tree, &keys::record_row_bound(seq));
                check(&tree, &keys::record(seq));
            }
            for query in [&[][..], &[0][..], &[keys::RECORD][..], &[0xff; 20][..]] {
                check(&tree, query);
            }
        }
    }
}
