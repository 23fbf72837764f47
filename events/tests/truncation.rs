//! The hash chain alone cannot show that records were cut off the end of the
//! log; the head marker written with every group commit can.

use switchboard_events::catalog::AdminAction;
use switchboard_events::{
    Event, EventLog, ExpectedVersion, NewEvent, OpenError, OpenMode, StreamId,
};

fn fill(dir: &std::path::Path, count: usize) -> Vec<NewEvent> {
    let log = EventLog::open(dir, OpenMode::CreateIfMissing).expect("open");
    let events: Vec<NewEvent> = (0..count)
        .map(|i| {
            NewEvent::new(Event::AdminAction(AdminAction {
                actor: "test".into(),
                action: "poke".into(),
                target: format!("t{i}"),
            }))
        })
        .collect();
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
        let db = sled::open(dir.path().join("db")).expect("sled");
        let tree = db.open_tree("log").expect("log tree");
        for (seq, event) in [(49u64, &events[48]), (50, &events[49])] {
            tree.remove(record_key(seq)).expect("remove record");
            let mut id_key = vec![b'i'];
            id_key.extend_from_slice(event.id.as_bytes());
            tree.remove(id_key).expect("remove id entry");
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
