//! The hash chain alone cannot show that records were cut off the end of the
//! log; the head marker written with every group commit can.

use switchboard_events::catalog::AdminAction;
use switchboard_events::{
    Event, EventLog, ExpectedVersion, NewEvent, OpenError, OpenMode, StreamId,
};

/// `count` admin actions named `{prefix}0`, `{prefix}1`, ….
fn actions(prefix: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|i| {
            NewEvent::new(Event::AdminAction(AdminAction {
                actor: "test".into(),
                action: "poke".into(),
                target: format!("{prefix}{i}"),
            }))
        })
        .collect()
}

fn fill(dir: &std::path::Path, count: usize) -> Vec<NewEvent> {
    let log = EventLog::open(dir, OpenMode::CreateIfMissing).expect("open");
    let events = actions("t", count);
    for event in &events {
        log.append_blocking(
            StreamId::system(),
            ExpectedVersion::Any,
            vec![event.clone()],
        )
        .expect("append");
    }
    events
}

/// The log's sled tree, opened directly (the log must be closed).
fn raw_log(dir: &std::path::Path) -> (sled::Db, sled::Tree) {
    let db = sled::open(dir.join("db")).expect("sled");
    let tree = db.open_tree("log").expect("log tree");
    (db, tree)
}

fn record_key(seq: u64) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

#[test]
fn records_cut_off_the_end_are_detected_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let events = fill(dir.path(), 50);
    {
        // Remove the last two records and every index entry pointing at them,
        // leaving a chain that is valid as far as it goes.
        let (db, tree) = raw_log(dir.path());
        for (seq, event) in [(49u64, &events[48]), (50, &events[49])] {
            tree.remove(record_key(seq)).expect("remove record");
            // Each append was a group: its id's row is keyed by its seq.
            tree.remove(timed_ids_key(event, seq))
                .expect("remove")
                .expect("the id's row");
            let mut stream_key = b"ssystem\0".to_vec();
            stream_key.extend_from_slice(&seq.to_be_bytes());
            tree.remove(stream_key).expect("remove stream entry");
        }
        db.flush().expect("flush");
    }
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::Corrupt { detail, .. }) => {
            assert!(detail.contains("49..=50 are missing"), "{detail}");
        }
        Err(other) => panic!("expected a corrupt-log error, got {other}"),
        Ok(_) => panic!("a log with records cut off its end opened as healthy"),
    }
}

#[test]
fn head_marker_follows_every_append_across_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    fill(dir.path(), 5);
    fill(dir.path(), 5);
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    assert_eq!(log.head(), 10);
    assert_eq!(
        log.verify_chain(|_| {}).expect("chain verifies").records,
        10
    );
}

fn stream_key(version: u64) -> Vec<u8> {
    let mut key = b"ssystem\0".to_vec();
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The `t` row that holds a v7 id appended in the group starting at `first_seq`.
fn timed_ids_key(event: &NewEvent, first_seq: u64) -> Vec<u8> {
    let mut key = vec![b't'];
    key.extend_from_slice(&event.id.as_bytes()[..6]);
    key.extend_from_slice(&first_seq.to_be_bytes());
    key
}

/// The keys of every `t` row (the rows of v7 ids).
fn timed_id_rows(tree: &sled::Tree) -> Vec<Vec<u8>> {
    tree.scan_prefix(b"t")
        .map(|row| row.expect("read").0.to_vec())
        .collect()
}

fn id_key(event: &NewEvent) -> Vec<u8> {
    let mut key = vec![b'i'];
    key.extend_from_slice(event.id.as_bytes());
    key
}

fn head_marker(seq: u64, hash: &[u8]) -> Vec<u8> {
    let mut value = seq.to_be_bytes().to_vec();
    value.extend_from_slice(hash);
    value
}

/// The record rows of the tree as (key, first seq, last seq): `r` seq for
/// one record, `r` first ‖ last for several.
fn record_rows(tree: &sled::Tree) -> Vec<(Vec<u8>, u64, u64)> {
    tree.scan_prefix(b"r")
        .map(|row| {
            let key = row.expect("read").0.to_vec();
            let seq = |at: usize| u64::from_be_bytes(key[at..at + 8].try_into().expect("8 bytes"));
            let (first, last) = match key.len() {
                9 => (seq(1), seq(1)),
                _ => (seq(1), seq(9)),
            };
            (key, first, last)
        })
        .collect()
}

/// Sets the head marker back to record 5, as before a group's last write.
fn rewind_head_marker_to_five(db: &sled::Db, tree: &sled::Tree) {
    let fifth = tree.get(record_key(5)).expect("read").expect("record 5");
    tree.insert("mhead", head_marker(5, &fifth[..32]))
        .expect("head marker");
    db.flush().expect("flush");
}

/// A group commit is plain sled inserts — its group marker, then each row
/// of records followed by the index entries pointing into it, the head
/// marker last — and sled recovers a prefix of them after a crash. What such
/// a prefix leaves (nothing of it was acknowledged: that waits for the
/// flush) is removed at open.
#[test]
fn a_group_commit_cut_short_by_a_crash_is_removed_at_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    fill(dir.path(), 5);
    let group = actions("group-commit-cut-short-", 100);
    {
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("open");
        let appended = log
            .append_blocking(StreamId::system(), ExpectedVersion::Any, group.clone())
            .expect("append");
        assert_eq!(appended.first().seq, 6);
    }
    {
        // Back to the prefix that ends with the group's second row: its first
        // row, its second; not the index entries, which follow the last row
        // (the append's stream entry, then the rows of its v7 ids); the head
        // marker still at 5.
        let (db, tree) = raw_log(dir.path());
        let rows = record_rows(&tree);
        let group_rows: Vec<_> = rows.iter().filter(|(_, first, _)| *first >= 6).collect();
        assert!(group_rows.len() >= 3, "the group spans rows: {rows:?}");
        for (key, _, _) in &group_rows[2..] {
            tree.remove(key).expect("remove row");
        }
        let before_group = timed_id_rows(&tree).len();
        for event in &group {
            tree.remove(timed_ids_key(event, 6)).expect("remove");
        }
        assert!(
            timed_id_rows(&tree).len() < before_group,
            "the group had id rows"
        );
        // On the system stream here, version = seq.
        tree.remove(stream_key(6))
            .expect("remove")
            .expect("the append's stream entry");
        rewind_head_marker_to_five(&db, &tree);
    }

    {
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("repaired at open");
        assert_eq!(log.head(), 5);
        assert_eq!(log.read_from(1).count(), 5);
        assert_eq!(log.stream_version(&StreamId::system()).expect("version"), 5);
        assert_eq!(log.seq_of(&group[0].id).expect("id index"), None);
        assert_eq!(log.verify_chain(|_| {}).expect("chain").records, 5);
    }
    {
        let (_db, tree) = raw_log(dir.path());
        let rows = record_rows(&tree);
        assert_eq!(
            rows.last().map(|r| r.2),
            Some(5),
            "no row past the head: {rows:?}"
        );
        for seq in 6..=105 {
            assert!(
                !tree.contains_key(stream_key(seq)).expect("read"),
                "stream entry {seq}"
            );
        }
        assert_eq!(
            timed_id_rows(&tree).len(),
            5,
            "the five single appends' id rows"
        );
        for event in &group {
            assert!(!tree.contains_key(id_key(event)).expect("read"), "id entry");
            assert!(
                !tree.contains_key(timed_ids_key(event, 6)).expect("read"),
                "id row"
            );
        }
    }

    // Never acknowledged, so never stored: the same events append anew.
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    let again = log
        .append_blocking(StreamId::system(), ExpectedVersion::Exact(5), group)
        .expect("append again");
    assert!(!again.deduplicated);
    assert_eq!(again.first().seq, 6);
    assert_eq!(log.verify_chain(|_| {}).expect("chain").records, 105);
    drop(log);

    // The longest prefix short of the head marker: every row and index
    // entry of the group, the append's stream entry included, goes too.
    {
        let (db, tree) = raw_log(dir.path());
        rewind_head_marker_to_five(&db, &tree);
    }
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("repaired at open");
    assert_eq!(log.head(), 5);
    assert_eq!(log.stream_version(&StreamId::system()).expect("version"), 5);
    assert_eq!(log.verify_chain(|_| {}).expect("chain").records, 5);
    drop(log);
    let (_db, tree) = raw_log(dir.path());
    assert!(!tree.contains_key(stream_key(6)).expect("read"));
    assert_eq!(
        timed_id_rows(&tree).len(),
        5,
        "the group's id rows went too"
    );
    assert_eq!(record_rows(&tree).last().map(|r| r.2), Some(5));
}

/// Records past the head marker that are not the group being written — here
/// the head marker itself is gone — are corruption: open refuses, and
/// removes nothing.
#[test]
fn records_past_the_head_marker_that_no_group_names_are_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    fill(dir.path(), 5);
    {
        let (db, tree) = raw_log(dir.path());
        tree.remove("mhead").expect("remove head marker");
        db.flush().expect("flush");
    }
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::Corrupt { detail, .. }) => {
            assert!(
                detail.contains("records 1..=5 follow the head marker"),
                "{detail}"
            );
        }
        Err(other) => panic!("expected a corrupt-log error, got {other}"),
        Ok(_) => panic!("a log without its head marker opened as healthy"),
    }
    let (_db, tree) = raw_log(dir.path());
    assert_eq!(tree.scan_prefix(b"r").count(), 5, "nothing was removed");
}

/// While a group is being written its records are in the tree before they
/// are durable; no read shows them until the head says they are.
#[test]
fn reads_stop_at_the_durable_head() {
    let dir = tempfile::tempdir().expect("temp dir");
    fill(dir.path(), 5);
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("open");
    // What a group in flight has written so far: record 6 and its index entries.
    let tree = log.db().open_tree("log").expect("log tree");
    let fifth = tree.get(record_key(5)).expect("read").expect("record 5");
    let in_flight = uuid::Uuid::now_v7();
    let mut id = vec![b'i'];
    id.extend_from_slice(in_flight.as_bytes());
    tree.insert(record_key(6), fifth).expect("insert");
    tree.insert(stream_key(6), &6u64.to_be_bytes())
        .expect("insert");
    tree.insert(id, &6u64.to_be_bytes()).expect("insert");

    assert_eq!(log.head(), 5);
    assert_eq!(log.read_from(1).count(), 5);
    assert_eq!(log.read_range(4, 10).count(), 2);
    assert_eq!(log.read_stream(&StreamId::system(), 1).count(), 5);
    assert!(log.get(6).expect("get").is_none());
    assert!(log.get(5).expect("get").is_some());
    assert_eq!(log.seq_of(&in_flight).expect("seq_of"), None);
    assert_eq!(log.stream_version(&StreamId::system()).expect("version"), 5);
}
