//! A write that fails under the log: nobody waiting on it is acknowledged,
//! the log refuses appends from then on with a coded error, and a restart
//! reads back exactly what was acknowledged, with a chain that verifies.
//!
//! Uses sled's failpoints, which are process-wide, so this file holds one
//! test and is a test binary of its own.

use std::collections::HashSet;
use std::path::Path;

use switchboard_events::catalog::MessageReceived;
use switchboard_events::{
    AppendError, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId,
};
use uuid::Uuid;

const ACKED_BEFORE: u64 = 20;

fn message(n: u64) -> NewEvent {
    let id = Uuid::from_u128(0xf1u128 << 120 | u128::from(n));
    NewEvent::with_id(
        id,
        Event::MessageReceived(MessageReceived {
            conversation_id: format!("c{}", n % 3),
            message_id: format!("m{n}"),
            key_id: "key_1".into(),
            user: None,
            content: format!("message number {n}"),
            agent: None,
        }),
    )
}

fn append(log: &EventLog, n: u64) -> Result<u64, AppendError> {
    let stream = StreamId::conversation(&format!("c{}", n % 3)).expect("a valid stream id");
    log.append_blocking(stream, ExpectedVersion::Any, vec![message(n)])
        .map(|appended| appended.first().seq)
}

/// Every stored message's number, in seq order.
fn stored(dir: &Path) -> Vec<u64> {
    let log = EventLog::open(dir, OpenMode::MustExist).expect("reopen the log");
    log.verify_chain(|_| {}).expect("the chain verifies");
    log.read_from(1)
        .map(
            |envelope| match envelope.expect("every record reads").event {
                Event::MessageReceived(m) => m.message_id[1..].parse().expect("a number"),
                other => panic!("only messages were appended, not {other:?}"),
            },
        )
        .collect()
}

/// Failpoints are process-wide, so the cases run one after the other: a lone
/// appender, whose append the idle log writes and flushes on the appender's
/// own thread, concurrent appenders, whose appends go through the queue, and
/// an early appender, told its append is written before the flush fails.
#[test]
fn a_failed_write_acknowledges_nothing_and_a_restart_keeps_what_was_acknowledged() {
    for appenders_during in [1, 8] {
        fail_a_write_under(appenders_during);
    }
    fail_the_flush_of_an_early_append();
}

/// An append answered once written ([`EventLog::append_early`]) is never
/// durable when the flush after it fails.
fn fail_the_flush_of_an_early_append() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    append(&log, 0).expect("an append before the failure");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    sled::fail::set("buffer write", 1);
    let stream = StreamId::conversation("c1").expect("a valid stream id");
    let (written, durable) = runtime
        .block_on(log.append_early(stream, ExpectedVersion::Any, vec![message(1)]))
        .expect("written: the failure comes with the flush");
    assert_eq!(written.first().seq, 2);
    let durable = runtime.block_on(durable.wait());
    assert!(
        matches!(durable, Err(AppendError::Storage(_))),
        "{durable:?}"
    );
    assert_eq!(log.head(), 1, "the early append was published");
    drop(log);
    sled::fail::reset();
    assert_eq!(stored(dir.path()), [0], "only what was durable is stored");
}

fn fail_a_write_under(appenders_during: u64) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    for n in 0..ACKED_BEFORE {
        append(&log, n).expect("an append before the failure");
    }

    // The next IO buffer sled writes fails (before any byte of it is written).
    sled::fail::set("buffer write", 1);
    let during: Vec<Result<u64, AppendError>> = std::thread::scope(|scope| {
        let appenders: Vec<_> = (ACKED_BEFORE..ACKED_BEFORE + appenders_during)
            .map(|n| {
                scope.spawn({
                    let log = &log;
                    move || append(log, n)
                })
            })
            .collect();
        appenders
            .into_iter()
            .map(|a| a.join().expect("appender"))
            .collect()
    });
    for (n, result) in (ACKED_BEFORE..).zip(&during) {
        assert!(
            matches!(result, Err(AppendError::Storage(_))),
            "append {n} during the failure, {appenders_during} appending: {result:?}"
        );
    }
    // From then on the log refuses, saying why, until it is opened again.
    let after = append(&log, 100);
    let Err(AppendError::Storage(reason)) = &after else {
        panic!("an append after the failure: {after:?}");
    };
    assert!(reason.contains("event log write failed"), "{reason}");
    drop(log);
    sled::fail::reset();

    let numbers = stored(dir.path());
    let unique: HashSet<u64> = numbers.iter().copied().collect();
    assert_eq!(unique.len(), numbers.len(), "no event twice: {numbers:?}");
    for n in 0..ACKED_BEFORE {
        assert!(
            unique.contains(&n),
            "acknowledged event {n} is lost: {numbers:?}"
        );
    }

    // A client retries what was refused: each lands exactly once, whether or
    // not the failed write had left it behind.
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen the log");
    for n in (ACKED_BEFORE..ACKED_BEFORE + appenders_during).chain([100]) {
        append(&log, n).expect("a retry after the restart");
    }
    drop(log);
    let numbers = stored(dir.path());
    let mut expected: Vec<u64> = (0..ACKED_BEFORE + appenders_during).chain([100]).collect();
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(sorted, expected, "every event exactly once");
}
