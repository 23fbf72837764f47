//! Checking the hash chain and the indexes against the records.

use super::read::RawRecord;
use super::{keys, writer, EventLog, ReadError};

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
        let mut previous = [0u8; 32];
        let mut expected = 1u64;
        let mut records = self.read_range(1, head);
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
            let by_stream = tree
                .get(keys::stream_entry(&envelope.stream, envelope.version))
                .map_err(ReadError::from)?;
            if by_stream.as_deref().and_then(keys::seq_value) != Some(raw.seq) {
                return Err(index_detail("the stream index does not point at it"));
            }
            let by_id = tree.get(keys::id(&envelope.id)).map_err(ReadError::from)?;
            if by_id.as_deref().and_then(keys::seq_value) != Some(raw.seq) {
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
        for (index, prefix) in [("stream", keys::STREAM), ("id", keys::ID)] {
            let mut entries = 0;
            for entry in tree.scan_prefix([prefix]) {
                let (_, seq) = entry.map_err(ReadError::from)?;
                if keys::seq_value(&seq).is_some_and(|seq| seq <= head) {
                    entries += 1;
                }
            }
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
