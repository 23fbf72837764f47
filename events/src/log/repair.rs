//! Repair at open: the end of a group commit that a crash cut short.
//!
//! A group is written as plain inserts (see the writer's `Writes`): the group
//! marker, then each row of records followed by the index entries pointing
//! into it, then the rows of the group's v7 ids, then the head marker, then
//! one flush before anyone is answered. sled recovers a prefix of those
//! writes, so after a crash the log may hold rows of records past the head
//! marker — never acknowledged — and some of the index entries pointing into
//! them. Opening the log removes them, once it is sure that is what they are:
//! the group marker names them, and their chain continues from the head
//! marker's hash. Anything else past the head marker is corruption, reported
//! and left untouched.

use super::keys;
use super::read::split_row;
use super::writer::chain_hash;

/// Removes the records `head.0 + 1 ..= last_seq` and their index entries;
/// returns how many records went, or why they are not a cut-short group.
pub(super) fn cut_unfinished_group(
    db: &sled::Db,
    tree: &sled::Tree,
    head: (u64, [u8; 32]),
    last_seq: u64,
) -> Result<u64, String> {
    let (head_seq, head_hash) = head;
    let past = format!(
        "records {}..={last_seq} follow the head marker (seq {head_seq})",
        head_seq + 1
    );
    let group = tree
        .get(keys::GROUP_KEY)
        .map_err(|e| e.to_string())?
        .and_then(|value| keys::parse_group(&value));
    match group {
        Some((first, last)) if first == head_seq + 1 && last_seq <= last => {}
        _ => {
            return Err(format!(
            "{past} but are not the group commit that was being written: the log cannot be opened safely; restore the data dir from a backup (docs/operations.md, Backups)"
        ))
        }
    }

    let mut rows = Vec::new();
    let mut cut = Vec::new();
    let mut previous = head_hash;
    let mut expected = head_seq + 1;
    for row in tree.range(&keys::record(head_seq + 1)[..]..=&keys::record_row_bound(last_seq)[..]) {
        let (key, value) = row.map_err(|e| e.to_string())?;
        for raw in split_row(&key, value).map_err(|e| e.to_string())? {
            if raw.seq != expected {
                return Err(format!("{past} with record {expected} missing among them"));
            }
            if chain_hash(&previous, &raw.bytes) != raw.hash {
                return Err(format!(
                    "{past}; record {expected} does not continue the chain"
                ));
            }
            previous = raw.hash;
            expected += 1;
            let envelope = raw.decode().map_err(|e| e.to_string())?;
            cut.push((raw.seq, envelope));
        }
        rows.push(key);
    }

    // Index entries before their records, the last record first, so that a
    // crash during the repair leaves what the next open repairs the same way.
    let points_at = |key: &[u8], seq: u64| -> Result<bool, String> {
        Ok(tree
            .get(key)
            .map_err(|e| e.to_string())?
            .is_some_and(|value| keys::seq_value(&value) == Some(seq)))
    };
    let mut timed_rows = std::collections::BTreeSet::new();
    for (seq, envelope) in cut.iter().rev() {
        let id = keys::id(&envelope.id);
        if points_at(&id, *seq)? {
            tree.remove(id).map_err(|e| e.to_string())?;
        }
        // The group's `t` rows are keyed by its first seq, the head's next.
        if envelope.id.get_version_num() == 7 {
            timed_rows.insert(keys::timed_ids(
                &keys::timed_ids_prefix(&envelope.id),
                head_seq + 1,
            ));
        }
        // Logs written before stream index entries waited for the flush
        // have the cut group's: an append's entry is keyed by its first
        // event's version.
        let stream = keys::stream_entry(&envelope.stream, envelope.version);
        let starts_here = tree
            .get(&stream)
            .map_err(|e| e.to_string())?
            .and_then(|value| keys::stream_runs(&value))
            .is_some_and(|runs| runs[0].0 == *seq);
        if starts_here {
            tree.remove(stream).map_err(|e| e.to_string())?;
        }
    }
    for key in timed_rows {
        tree.remove(key).map_err(|e| e.to_string())?;
    }
    for key in rows.iter().rev() {
        tree.remove(key).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())?;
    tracing::warn!(
        removed = cut.len(),
        head = head_seq,
        "removed the records past the log's head marker: a group commit cut short by a crash, none of it acknowledged"
    );
    Ok(cut.len() as u64)
}
