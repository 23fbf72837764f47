//! Checking the hash chain and the indexes against the records.

use super::read::{self, RawRecord};
use super::{keys, writer, EventLog, ReadError};
use std::collections::HashMap;

use uuid::Uuid;

use crate::envelope::StreamId;

/// A healthy log's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    pub records: u64,
    /// The chain hash of the last record, hex.
    pub head_hash: String,
}

/// Where and how the log is broken.
#[derive(Debug, thiserror::Error)]
pub enum ChainBreak {
    #[error("record {expected} is missing (the next record is {found})")]
    Missing { expected: u64, found: u64 },
    #[error("record {seq} does not match its chain hash: it or an earlier record was changed")]
    HashMismatch { seq: u64 },
    #[error("record {seq}: {detail}")]
    Index { seq: u64, detail: String },
    #[error("the {index} index has {entries} entries for {records} records")]
    IndexCount {
        index: &'static str,
        entries: u64,
        records: u64,
    },
    #[error("{detail}")]
    Head { detail: String },
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl EventLog {
    /// Walks every record: checks that seqs are gapless, that each chain hash
    /// covers the previous hash and the record's bytes, that each record decodes
    /// and that the stream and id indexes point exactly at the records.
    /// `progress` is called with each verified seq.
    pub fn verify_chain(&self, mut progress: impl FnMut(u64)) -> Result<ChainReport, ChainBreak> {
        let tree = &self.shared.tree;
        // Appends may go on while this runs: check the log up to where it stood.
        let head = self.head();
        // The stream index entries of the last groups may not be in the tree yet.
        self.shared
            .unindexed
            .index_all(tree, head)
            .map_err(ReadError::from)?;
        let mut previous = [0u8; 32];
        let mut expected = 1u64;
        let mut records = self.read_range(1, head);
        // The stream entry of the record before, and its stream.
        let mut stream_entry: Option<(StreamId, read::StreamEntry)> = None;
        // The v7 ids of the record before's millisecond, and their seqs.
        let mut timed: Option<([u8; 7], HashMap<Uuid, u64>)> = None;
        while let Some(raw) = records.next_raw() {
            let raw: RawRecord = raw?;
            if raw.seq != expected {
                return Err(ChainBreak::Missing {
                    expected,
                    found: raw.seq,
                });
            }
            if writer::chain_hash(&previous, &raw.bytes) != raw.hash {
                return Err(ChainBreak::HashMismatch { seq: raw.seq });
            }
            let envelope = raw.decode()?;
            let index_detail = |what: &str| ChainBreak::Index {
                seq: raw.seq,
                detail: what.to_owned(),
            };
            // An append's events are consecutive records under one stream
            // entry: look the entry up at the first of them only.
            let covers = |(stream, entry): &(StreamId, read::StreamEntry)| {
                *stream == envelope.stream && entry.holds(envelope.version)
            };
            if !stream_entry.as_ref().is_some_and(covers) {
                stream_entry =
                    read::stream_entry_holding(tree, &envelope.stream, envelope.version)?
                        .map(|entry| (envelope.stream.clone(), entry));
            }
            let points_here = stream_entry
                .as_ref()
                .is_some_and(|(_, entry)| entry.seq_of(envelope.version) == Some(raw.seq));
            if !points_here {
                return Err(index_detail("the stream index does not point at it"));
            }
            // Consecutive records mostly share a millisecond: its ids are
            // read once.
            let mut by_id = None;
            if envelope.id.get_version_num() == 7 {
                let prefix = keys::timed_ids_prefix(&envelope.id);
                if timed.as_ref().is_none_or(|(cached, _)| *cached != prefix) {
                    let ids = read::timed_ids_of(tree, &prefix)?;
                    timed = Some((prefix, ids.into_iter().collect()));
                }
                by_id = timed
                    .as_ref()
                    .and_then(|(_, ids)| ids.get(&envelope.id).copied());
            }
            if by_id.is_none() {
                by_id = read::untimed_seq(tree, &envelope.id)?;
            }
            if by_id != Some(raw.seq) {
                return Err(index_detail("the id index does not point at it"));
            }
            previous = raw.hash;
            progress(raw.seq);
            expected += 1;
        }
        let records = expected - 1;
        if records != head {
            return Err(ChainBreak::Head {
                detail: format!("records {expected}..={head} are missing"),
            });
        }
        let marked = match tree.get(keys::HEAD_KEY).map_err(ReadError::from)? {
            None => (0, [0u8; 32]),
            Some(value) => keys::parse_head(&value).ok_or(ChainBreak::Head {
                detail: "the head marker is malformed".to_owned(),
            })?,
        };
        let appended_since = marked.0 > head;
        if !appended_since && marked != (records, previous) {
            return Err(ChainBreak::Head {
                detail: format!(
                    "the log ends at record {records} but its head marker names record {}",
                    marked.0
                ),
            });
        }
        let counts = [
            ("stream", stream_entries(tree, head)?),
            ("id", id_entries(tree, head)?),
        ];
        for (index, entries) in counts {
            if entries != records {
                return Err(ChainBreak::IndexCount {
                    index,
                    entries,
                    records,
                });
            }
        }
        Ok(ChainReport {
            records,
            head_hash: hex::encode(previous),
        })
    }
}

/// Events the stream index has entries for, up to `head`: an entry stands
/// for the events of one or more appends.
fn stream_entries(tree: &sled::Tree, head: u64) -> Result<u64, ChainBreak> {
    let mut entries = 0u64;
    for entry in tree.scan_prefix([keys::STREAM]) {
        let (_, value) = entry.map_err(ReadError::from)?;
        for (_, count) in keys::stream_runs(&value)
            .unwrap_or_default()
            .into_iter()
            .filter(|&(first, _)| first <= head)
        {
            entries = entries.saturating_add(count);
        }
    }
    Ok(entries)
}

/// Entries of the id index for records up to `head`: under `i` one each,
/// in `t` rows one per id.
fn id_entries(tree: &sled::Tree, head: u64) -> Result<u64, ChainBreak> {
    let mut entries = 0u64;
    for entry in tree.scan_prefix([keys::ID]) {
        let (_, value) = entry.map_err(ReadError::from)?;
        if keys::seq_value(&value).is_some_and(|seq| seq <= head) {
            entries += 1;
        }
    }
    for row in tree.scan_prefix([keys::TIMED_IDS]) {
        let (key, value) = row.map_err(ReadError::from)?;
        let ids = keys::parse_timed_ids(&key, &value).ok_or_else(|| ChainBreak::Index {
            seq: 0,
            detail: format!("the id index row {key:02x?} is malformed"),
        })?;
        entries += ids.iter().filter(|(_, seq)| *seq <= head).count() as u64;
    }
    Ok(entries)
}
