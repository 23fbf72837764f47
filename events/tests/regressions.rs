//! Regressions found by review: each test failed before its fix.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use switchboard_events::catalog::AdminAction;
use switchboard_events::{
    Event, EventLog, ExpectedVersion, NewEvent, OpenError, OpenMode, StreamId,
};

fn poke(i: u64) -> NewEvent {
    NewEvent::new(Event::AdminAction(AdminAction {
        actor: "test".into(),
        action: "poke".into(),
        target: format!("t{i}"),
    }))
}

/// verify_chain used to read the head marker and index counts after walking the
/// records, so appends made meanwhile looked like a broken log.
#[test]
fn verify_chain_is_consistent_while_appends_go_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                log.append_blocking(StreamId::system(), ExpectedVersion::Any, vec![poke(i)])
                    .expect("append");
                i += 1;
            }
        })
    };
    while log.head() < 20 {
        std::thread::yield_now();
    }
    let head_before = log.head();
    for round in 0..100 {
        if let Err(broken) = log.verify_chain(|_| {}) {
            stop.store(true, Ordering::Relaxed);
            panic!("round {round}: a healthy log failed verification: {broken}");
        }
    }
    let head_after = log.head();
    stop.store(true, Ordering::Relaxed);
    appender.join().expect("appender");
    assert!(
        head_after > head_before,
        "no append happened during verification, so the test proved nothing"
    );
}

/// A subscription that outlived its log kept sled open after the dir lock was
/// released, so the next opener got an opaque sled I/O error.
#[test]
fn a_reader_outliving_the_log_keeps_the_dir_locked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
    log.append_blocking(StreamId::system(), ExpectedVersion::Any, vec![poke(0)])
        .expect("append");
    let subscription = log.subscribe(1);
    let records = log.read_from(1);
    drop(log);
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::InUse { .. }) => {}
        Err(other) => panic!("expected InUse while a reader is alive, got {other}"),
        Ok(_) => panic!("opened a dir whose sled database is still open"),
    }
    drop(subscription);
    drop(records);
    EventLog::open(dir.path(), OpenMode::MustExist).expect("opens once every reader is gone");
}
