//! Key layout of the log's sled tree. Every key starts with a one-byte prefix and
//! numbers are big-endian, so keys sort by position.
//!
//! | key | value |
//! |---|---|
//! | `r` seq | one record: chain hash (32 bytes) ‖ encoded record |
//! | `r` first seq ‖ last seq | the records `first..=last` of one group commit, each as chain hash ‖ length (u32, little-endian) ‖ encoded record |
//! | `s` stream `0x00` version | seq: one event; or, for each of one or more consecutive appends of the stream, first seq ‖ count: its `count` events, the first entry's from `version` on |
//! | `i` event id (16 bytes) | seq: an id that is not time-ordered (not UUID v7), or any id in logs written before `t` rows |
//! | `t` milliseconds (the first 6 bytes of a v7 id) ‖ group's first seq | the v7 ids of one group commit created in that millisecond: each as the id's other 10 bytes ‖ seq |
//! | `m` name | log metadata: `mformat` marker, `mhead` last seq ‖ hash, `mgroup` first seq ‖ last seq, `mindexed` seq |
//!
//! The `s` entries of a group are written after its flush (see
//! [`super::stream_index`]); `mindexed` is the seq up to which they all are.

use uuid::Uuid;

use crate::envelope::StreamId;

pub const RECORD: u8 = b'r';
pub const STREAM: u8 = b's';
pub const ID: u8 = b'i';
pub const TIMED_IDS: u8 = b't';

/// Bytes of one id in a `t` row: the id past its milliseconds, and its seq.
pub const TIMED_ID_LEN: usize = 10 + 8;

/// Length of the chain hash stored before each record.
pub const HASH_LEN: usize = 32;

/// The last record's seq and chain hash, rewritten by every group commit. The
/// chain alone cannot show that records were cut off the end; this can.
pub const HEAD_KEY: &[u8] = b"mhead";

pub fn head_value(seq: u64, hash: &[u8; 32]) -> [u8; 40] {
    let mut value = [0u8; 40];
    value[..8].copy_from_slice(&seq.to_be_bytes());
    value[8..].copy_from_slice(hash);
    value
}

pub fn parse_head(value: &[u8]) -> Option<(u64, [u8; 32])> {
    let seq = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let hash = value.get(8..40)?.try_into().ok()?;
    Some((seq, hash))
}

/// The seqs of the group commit being written: the first write of every
/// group, as the head marker is the last. Records past the head marker are a
/// group cut short by a crash only if this names them.
pub const GROUP_KEY: &[u8] = b"mgroup";

pub fn group_value(first_seq: u64, last_seq: u64) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&first_seq.to_be_bytes());
    value[8..].copy_from_slice(&last_seq.to_be_bytes());
    value
}

pub fn parse_group(value: &[u8]) -> Option<(u64, u64)> {
    let first = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let last = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((first, last))
}

/// Every record up to this seq (u64, big-endian) has its stream index entry
/// in the tree; the entries of the records after it are written again at
/// open. A log without it was written with each group's entries in the group.
pub const INDEXED_KEY: &[u8] = b"mindexed";

/// Marks a sled tree as a switchboard log; checked at open.
pub const FORMAT_KEY: &[u8] = b"mformat";
pub const FORMAT_MARK: &[u8] = b"switchboard-log-1";

pub fn record(seq: u64) -> [u8; 9] {
    let mut key = [RECORD; 9];
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The key of a row holding the records `first..=last` (`first < last`).
pub fn chunk(first: u64, last: u64) -> [u8; 17] {
    let mut key = [RECORD; 17];
    key[1..9].copy_from_slice(&first.to_be_bytes());
    key[9..].copy_from_slice(&last.to_be_bytes());
    key
}

/// The greatest key a row holding `seq` can have: the row that holds `seq`,
/// if any, is the last one at or before it.
pub fn record_row_bound(seq: u64) -> [u8; 17] {
    chunk(seq, u64::MAX)
}

/// The first and last seq of the records a row holds, from its key; a row of
/// one record has a key of one seq.
pub fn record_row_seqs(key: &[u8]) -> Option<(u64, u64)> {
    match key {
        [RECORD, seq @ ..] if seq.len() == 8 => {
            let seq = u64::from_be_bytes(seq.try_into().ok()?);
            Some((seq, seq))
        }
        [RECORD, seqs @ ..] if seqs.len() == 16 => {
            let first = u64::from_be_bytes(seqs[..8].try_into().ok()?);
            let last = u64::from_be_bytes(seqs[8..].try_into().ok()?);
            (first < last).then_some((first, last))
        }
        _ => None,
    }
}

/// Bytes of one record in a chunk before its encoding: hash and length.
pub const FRAME_HEADER_LEN: usize = HASH_LEN + 4;

pub fn stream_prefix(stream: &StreamId) -> Vec<u8> {
    let mut key = Vec::with_capacity(stream.as_str().len() + 10);
    key.push(STREAM);
    key.extend_from_slice(stream.as_str().as_bytes());
    key.push(0);
    key
}

pub fn stream_entry(stream: &StreamId, version: u64) -> Vec<u8> {
    let mut key = stream_prefix(stream);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The version at the end of a stream index key.
pub fn stream_entry_version(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[tail..].try_into().ok()?))
}

pub fn id(id: &Uuid) -> [u8; 17] {
    let mut key = [ID; 17];
    key[1..].copy_from_slice(id.as_bytes());
    key
}

/// The prefix of the `t` rows that may hold the v7 id `id`: its milliseconds.
pub fn timed_ids_prefix(id: &Uuid) -> [u8; 7] {
    let mut key = [TIMED_IDS; 7];
    key[1..].copy_from_slice(&id.as_bytes()[..6]);
    key
}

/// The `t` row of the v7 ids of the group starting at `first_seq` that share
/// `prefix` (see [`timed_ids_prefix`]).
pub fn timed_ids(prefix: &[u8; 7], first_seq: u64) -> [u8; 15] {
    let mut key = [0u8; 15];
    key[..7].copy_from_slice(prefix);
    key[7..].copy_from_slice(&first_seq.to_be_bytes());
    key
}

/// The ids and seqs of a `t` row; `None` when the row is malformed.
pub fn parse_timed_ids(key: &[u8], value: &[u8]) -> Option<Vec<(Uuid, u64)>> {
    let millis = key.get(1..7).filter(|_| key.len() == 15)?;
    if value.is_empty() || !value.len().is_multiple_of(TIMED_ID_LEN) {
        return None;
    }
    value
        .chunks_exact(TIMED_ID_LEN)
        .map(|entry| {
            let mut id = [0u8; 16];
            id[..6].copy_from_slice(millis);
            id[6..].copy_from_slice(&entry[..10]);
            Some((Uuid::from_bytes(id), seq_value(&entry[10..])?))
        })
        .collect()
}

pub fn seq_value(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.try_into().ok()?))
}

/// The value of a stream index entry: for each of its appends, in version
/// order, the first seq and the number of events; a single seq for one
/// event.
pub fn stream_runs_value(runs: &[(u64, u64)]) -> Vec<u8> {
    if let [(seq, 1)] = runs {
        return seq.to_be_bytes().to_vec();
    }
    let mut value = Vec::with_capacity(runs.len() * 16);
    for (first_seq, count) in runs {
        value.extend_from_slice(&first_seq.to_be_bytes());
        value.extend_from_slice(&count.to_be_bytes());
    }
    value
}

/// The appends of a stream index entry: first seq and number of events of
/// each, at least one.
pub fn stream_runs(value: &[u8]) -> Option<Vec<(u64, u64)>> {
    if value.len() == 8 {
        return Some(vec![(seq_value(value)?, 1)]);
    }
    if value.is_empty() || !value.len().is_multiple_of(16) {
        return None;
    }
    value
        .chunks_exact(16)
        .map(|run| {
            let count = seq_value(&run[8..])?;
            (count >= 1).then_some((seq_value(&run[..8])?, count))
        })
        .collect()
}
