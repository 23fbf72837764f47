//! Reading the log: by global position, by stream, and live.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;
use uuid::Uuid;

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
    pub(crate) fn parse(key: &[u8], value: sled::IVec) -> Result<RawRecord, ReadError> {
        let seq = keys::record_seq(key).ok_or_else(|| ReadError::Corrupt {
            seq: 0,
            detail: "malformed record key".to_owned(),
        })?;
        let hash = value
            .get(..keys::HASH_LEN)
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .ok_or_else(|| ReadError::Corrupt {
                seq,
                detail: "shorter than its chain hash".to_owned(),
            })?;
        let bytes = value.subslice(keys::HASH_LEN, value.len() - keys::HASH_LEN);
        Ok(RawRecord { seq, hash, bytes })
    }

    pub fn decode(&self) -> Result<Envelope, ReadError> {
        codec::decode(self.seq, &self.bytes).map_err(|source| ReadError::Decode {
            seq: self.seq,
            source,
        })
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
    inner: sled::Iter,
    durable: Durable,
    _lock: Arc<super::lock::DirLock>,
}

impl RecordIter {
    pub(crate) fn next_raw(&mut self) -> Option<Result<RawRecord, ReadError>> {
        let (key, value) = match self.inner.next()? {
            Ok(entry) => entry,
            Err(e) => return Some(Err(e.into())),
        };
        let raw = RawRecord::parse(&key, value);
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
        Some(self.next_raw()?.and_then(|raw| raw.decode()))
    }
}

/// A stream's events in version order, up to the durable head. Records still
/// in the tail come from there, the rest from the tree.
pub struct StreamIter {
    tree: sled::Tree,
    tail: Arc<super::tail::Tail>,
    index: sled::Iter,
    durable: Durable,
    _lock: Arc<super::lock::DirLock>,
}

impl Iterator for StreamIter {
    type Item = Result<Envelope, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (key, value) = match self.index.next()? {
            Ok(entry) => entry,
            Err(e) => return Some(Err(e.into())),
        };
        let seq = match keys::seq_value(&value) {
            Some(seq) => seq,
            None => {
                return Some(Err(ReadError::Corrupt {
                    seq: 0,
                    detail: format!("malformed index entry {}", String::from_utf8_lossy(&key)),
                }))
            }
        };
        // Versions grow with seqs: past the head, the rest is not durable yet.
        if !self.durable.covers(seq) {
            return None;
        }
        Some(read_indexed(&self.tree, &self.tail, seq))
    }
}

/// The record at `seq` if there is one: a copy of the tail's while it holds
/// it, otherwise read from the tree. The caller knows `seq` is durable.
fn stored(
    tree: &sled::Tree,
    tail: &super::tail::Tail,
    seq: u64,
) -> Result<Option<Envelope>, ReadError> {
    if let Some(envelope) = tail.get(seq) {
        return Ok(Some(Envelope::clone(&envelope)));
    }
    let key = keys::record(seq);
    match tree.get(key)? {
        None => Ok(None),
        Some(value) => RawRecord::parse(&key, value)?.decode().map(Some),
    }
}

/// The record an index entry points at, which must be there.
fn read_indexed(
    tree: &sled::Tree,
    tail: &super::tail::Tail,
    seq: u64,
) -> Result<Envelope, ReadError> {
    stored(tree, tail, seq)?.ok_or_else(|| ReadError::Corrupt {
        seq,
        detail: "an index points at this missing record".to_owned(),
    })
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
            inner: self
                .shared
                .tree
                .range(keys::record(from_seq)..=keys::record(to_seq)),
            durable: Durable::new(&self.shared.head),
            _lock: self.shared.lock.clone(),
        }
    }

    /// The events of `stream` from `from_version` on, in order.
    pub fn read_stream(&self, stream: &StreamId, from_version: u64) -> StreamIter {
        let end = {
            let mut end = keys::stream_prefix(stream);
            end.extend_from_slice(&u64::MAX.to_be_bytes());
            end
        };
        StreamIter {
            tree: self.shared.tree.clone(),
            tail: self.shared.tail.clone(),
            durable: Durable::new(&self.shared.head),
            index: self
                .shared
                .tree
                .range(keys::stream_entry(stream, from_version)..=end),
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
        match self.shared.tree.get(keys::id(id))? {
            None => Ok(None),
            Some(value) => match keys::seq_value(&value) {
                Some(seq) if seq > self.head() => Ok(None),
                Some(seq) => Ok(Some(seq)),
                None => Err(ReadError::Corrupt {
                    seq: 0,
                    detail: format!("id index entry of {id} is malformed"),
                }),
            },
        }
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
        for entry in self
            .tree
            .range(keys::record(self.next_seq)..=keys::record(to_seq))
        {
            let (key, value) = entry?;
            let raw = RawRecord::parse(&key, value)?;
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
