//! The durable event log (DESIGN §3) against a real sled database in a temp dir:
//! positions, optimistic concurrency, idempotent appends, concurrent appenders,
//! live subscriptions, reopening, the data dir lock and tamper detection.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use switchboard_events::catalog::{ConversationStarted, MessageReceived};
use switchboard_events::log::DB_DIR;
use switchboard_events::{
    AppendError, ChainBreak, Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenError,
    OpenMode, Position, StreamId,
};
use tempfile::TempDir;
use uuid::Uuid;

// ---- helpers ----------------------------------------------------------------

fn open(dir: &Path) -> EventLog {
    EventLog::open(dir, OpenMode::CreateIfMissing).expect("open the event log")
}

fn conv(id: &str) -> StreamId {
    StreamId::conversation(id).expect("valid conversation stream")
}

/// A message whose content names `n`, so a record can be recognised in raw bytes.
fn message(n: u64) -> Event {
    Event::MessageReceived(MessageReceived {
        conversation_id: "c1".into(),
        message_id: format!("m{n}"),
        key_id: "key_1".into(),
        user: None,
        content: format!("message number {n:06}"),
        agent: None,
    })
}

fn new_message(n: u64) -> NewEvent {
    NewEvent::new(message(n))
}

fn messages(range: std::ops::Range<u64>) -> Vec<NewEvent> {
    range.map(new_message).collect()
}

fn content_of(envelope: &Envelope) -> &str {
    match &envelope.event {
        Event::MessageReceived(m) => &m.content,
        other => panic!("expected a message_received, got {other:?}"),
    }
}

fn all(log: &EventLog) -> Vec<Envelope> {
    log.read_from(1)
        .collect::<Result<_, _>>()
        .expect("every record reads")
}

fn stream_events(log: &EventLog, stream: &StreamId, from_version: u64) -> Vec<Envelope> {
    log.read_stream(stream, from_version)
        .collect::<Result<_, _>>()
        .expect("every stream record reads")
}

/// Names and sizes of every file under `dir`, recursively.
fn listing(dir: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let entry = entry.expect("dir entry");
            let path = entry.path();
            let meta = entry.metadata().expect("metadata");
            let name = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            if meta.is_dir() {
                out.insert(format!("{name}/"), 0);
                walk(root, &path, out);
            } else {
                out.insert(name, meta.len());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

// ---- positions and reads ----------------------------------------------------

#[test]
fn appends_get_gapless_seqs_and_per_stream_versions_that_every_read_agrees_on() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    assert_eq!(log.head(), 0);
    assert!(all(&log).is_empty());

    // "conv/a" and "conv/ab" share a prefix: their indexes must not bleed into each other.
    let streams = [conv("a"), conv("ab"), StreamId::system()];
    let mut expected: Vec<(u64, StreamId, u64, Uuid)> = Vec::new();
    let mut versions = [0u64; 3];
    let mut n = 0;
    for round in 0..10u64 {
        for (s, stream) in streams.iter().enumerate() {
            let batch = 1 + (round + s as u64) % 3;
            let events = messages(n..n + batch);
            let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
            let appended = log
                .append_blocking(stream.clone(), ExpectedVersion::Exact(versions[s]), events)
                .expect("append");
            assert!(!appended.deduplicated);
            assert_eq!(appended.positions.len(), ids.len());
            for (offset, (position, id)) in appended.positions.iter().zip(ids).enumerate() {
                let seq = expected.len() as u64 + 1;
                let version = versions[s] + offset as u64 + 1;
                assert_eq!(*position, Position { seq, version });
                expected.push((seq, stream.clone(), version, id));
            }
            versions[s] += batch;
            n += batch;
            assert_eq!(log.head(), n);
        }
    }

    let records = all(&log);
    assert_eq!(records.len(), expected.len());
    for (record, (seq, stream, version, id)) in records.iter().zip(&expected) {
        assert_eq!(
            (record.seq, &record.stream, record.version, record.id),
            (*seq, stream, *version, *id)
        );
        assert_eq!(content_of(record), format!("message number {:06}", seq - 1));
        assert_eq!(
            record.at.timestamp_subsec_nanos() % 1_000,
            0,
            "stored at microsecond precision"
        );
        assert_eq!(log.get(*seq).expect("get").as_ref(), Some(record));
        assert_eq!(log.seq_of(id).expect("seq_of"), Some(*seq));
    }
    assert!(records.windows(2).all(|w| w[0].at <= w[1].at));

    let head = log.head();
    assert_eq!(head, expected.len() as u64);
    assert_eq!(log.get(head + 1).expect("get"), None);
    assert_eq!(log.get(0).expect("get"), None);
    assert_eq!(log.seq_of(&Uuid::now_v7()).expect("seq_of"), None);

    let range: Vec<u64> = log.read_range(5, 9).map(|r| r.expect("read").seq).collect();
    assert_eq!(range, vec![5, 6, 7, 8, 9]);
    assert_eq!(log.read_range(head, head + 100).count(), 1);
    assert_eq!(log.read_range(9, 5).count(), 0);
    let tail: Vec<u64> = log
        .read_from(head - 2)
        .map(|r| r.expect("read").seq)
        .collect();
    assert_eq!(tail, vec![head - 2, head - 1, head]);
    assert_eq!(log.read_from(head + 1).count(), 0);

    for (s, stream) in streams.iter().enumerate() {
        assert_eq!(log.stream_version(stream).expect("version"), versions[s]);
        let of_stream: Vec<&(u64, StreamId, u64, Uuid)> =
            expected.iter().filter(|e| &e.1 == stream).collect();
        let read = stream_events(&log, stream, 1);
        assert_eq!(read.len() as u64, versions[s], "{stream}");
        for (record, (seq, _, version, id)) in read.iter().zip(of_stream) {
            assert_eq!(
                (record.seq, record.version, record.id),
                (*seq, *version, *id)
            );
            assert_eq!(&record.stream, stream);
        }
        let versions_from_3: Vec<u64> = stream_events(&log, stream, 3)
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions_from_3, (3..=versions[s]).collect::<Vec<_>>());
        // Version 0 does not exist: reading from it reads from the start.
        assert_eq!(stream_events(&log, stream, 0).len() as u64, versions[s]);
    }
    let unknown = conv("nobody");
    assert_eq!(log.stream_version(&unknown).expect("version"), 0);
    assert!(stream_events(&log, &unknown, 1).is_empty());

    let report = log.verify_chain(|_| {}).expect("chain verifies");
    assert_eq!(report.records, head);
    assert_eq!(report.head_hash.len(), 64);
}

#[test]
fn causal_context_of_a_new_event_is_stored() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let mut event = NewEvent::with_id(Uuid::from_u128(42), message(1));
    event.correlation_id = Some(Uuid::from_u128(7));
    event.causation_id = Some(Uuid::from_u128(8));
    event.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    log.append_blocking(conv("a"), ExpectedVersion::Any, vec![event.clone()])
        .expect("append");
    let stored = log.get(1).expect("get").expect("record 1");
    assert_eq!(stored.id, event.id);
    assert_eq!(stored.correlation_id, event.correlation_id);
    assert_eq!(stored.causation_id, event.causation_id);
    assert_eq!(stored.traceparent, event.traceparent);
    assert_eq!(stored.event, event.event);
}

// ---- expected versions ------------------------------------------------------

#[tokio::test]
async fn an_exact_expected_version_conflicts_and_writes_nothing() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let stream = conv("c1");

    let first = log
        .append(
            stream.clone(),
            ExpectedVersion::Exact(0),
            vec![new_message(1)],
        )
        .await
        .expect("Exact(0) on a new stream");
    assert_eq!(first.first(), Position { seq: 1, version: 1 });

    let refused = NewEvent::new(message(2));
    let err = log
        .append(
            stream.clone(),
            ExpectedVersion::Exact(0),
            vec![refused.clone()],
        )
        .await
        .expect_err("the stream is at 1");
    assert_eq!(
        err,
        AppendError::Conflict {
            stream: stream.clone(),
            expected: ExpectedVersion::Exact(0),
            actual: 1,
        }
    );
    let err = log
        .append(
            stream.clone(),
            ExpectedVersion::Exact(5),
            vec![refused.clone()],
        )
        .await
        .expect_err("the stream is at 1, not 5");
    assert!(
        matches!(err, AppendError::Conflict { actual: 1, .. }),
        "{err:?}"
    );
    assert_eq!(log.head(), 1, "a refused append writes nothing");
    assert_eq!(log.stream_version(&stream).expect("version"), 1);
    assert_eq!(log.seq_of(&refused.id).expect("seq_of"), None);
    assert_eq!(all(&log).len(), 1);

    // Exact(actual) works; the refused event's id is still free.
    let ok = log
        .append(stream.clone(), ExpectedVersion::Exact(1), vec![refused])
        .await
        .expect("Exact(1)");
    assert_eq!(ok.first(), Position { seq: 2, version: 2 });

    for n in 3..6 {
        let any = log
            .append(stream.clone(), ExpectedVersion::Any, vec![new_message(n)])
            .await
            .expect("Any always appends");
        assert_eq!(any.first(), Position { seq: n, version: n });
    }
    let other = log
        .append(conv("c2"), ExpectedVersion::Any, vec![new_message(9)])
        .await
        .expect("Any on a new stream");
    assert_eq!(other.first(), Position { seq: 6, version: 1 });
    log.verify_chain(|_| {}).expect("chain verifies");
}

// ---- idempotency ------------------------------------------------------------

#[tokio::test]
async fn re_appending_the_same_ids_is_deduplicated_even_after_reopening() {
    let dir = TempDir::new().expect("temp dir");
    let stream = conv("c1");
    let a = NewEvent::with_id(Uuid::from_u128(0xa), message(1));
    let b = NewEvent::with_id(Uuid::from_u128(0xb), message(2));
    let c = NewEvent::with_id(Uuid::from_u128(0xc), message(3));

    let original = {
        let log = open(dir.path());
        log.append(conv("other"), ExpectedVersion::Any, vec![new_message(0)])
            .await
            .expect("append");
        let original = log
            .append(
                stream.clone(),
                ExpectedVersion::Exact(0),
                vec![a.clone(), b.clone()],
            )
            .await
            .expect("first append");
        assert!(!original.deduplicated);
        assert_eq!(
            original.positions,
            vec![
                Position { seq: 2, version: 1 },
                Position { seq: 3, version: 2 }
            ]
        );

        // A retry of the same append, with its now stale expected version.
        let retry = log
            .append(
                stream.clone(),
                ExpectedVersion::Exact(0),
                vec![a.clone(), b.clone()],
            )
            .await
            .expect("retry");
        assert_eq!(retry.positions, original.positions);
        assert!(retry.deduplicated);
        let again = log
            .append(
                stream.clone(),
                ExpectedVersion::Any,
                vec![a.clone(), b.clone()],
            )
            .await
            .expect("retry with Any");
        assert_eq!(again, retry);
        assert_eq!(log.head(), 3, "deduplicated appends write nothing");
        assert_eq!(log.stream_version(&stream).expect("version"), 2);
        original
    };

    // Every clone is gone; the dedup is durable, not a cache.
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    let retry = log
        .append(
            stream.clone(),
            ExpectedVersion::Exact(0),
            vec![a.clone(), b.clone()],
        )
        .await
        .expect("retry after reopening");
    assert!(retry.deduplicated);
    assert_eq!(retry.positions, original.positions);
    // A subset of an earlier append is a full duplicate too.
    let just_b = log
        .append(stream.clone(), ExpectedVersion::Any, vec![b.clone()])
        .await
        .expect("retry of b alone");
    assert!(just_b.deduplicated);
    assert_eq!(just_b.positions, vec![Position { seq: 3, version: 2 }]);

    let err = log
        .append(
            stream.clone(),
            ExpectedVersion::Any,
            vec![c.clone(), a.clone()],
        )
        .await
        .expect_err("a was appended before, c was not");
    assert_eq!(err, AppendError::PartialDuplicate { id: a.id, seq: 2 });
    assert_eq!(
        log.seq_of(&c.id).expect("seq_of"),
        None,
        "nothing of it written"
    );

    let err = log
        .append(
            stream.clone(),
            ExpectedVersion::Any,
            vec![c.clone(), c.clone()],
        )
        .await
        .expect_err("c twice");
    assert_eq!(err, AppendError::DuplicateInAppend { id: c.id });

    let err = log
        .append(stream.clone(), ExpectedVersion::Any, vec![])
        .await
        .expect_err("no events");
    assert_eq!(err, AppendError::Empty);

    assert_eq!(log.head(), 3, "refused appends write nothing");
    assert_eq!(log.stream_version(&stream).expect("version"), 2);
    let fresh = log
        .append(stream.clone(), ExpectedVersion::Exact(2), vec![c])
        .await
        .expect("c alone");
    assert_eq!(fresh.first(), Position { seq: 4, version: 3 });
    log.verify_chain(|_| {}).expect("chain verifies");
}

/// The writer looks a new v7 id up in the id index only when it is not past
/// every v7 id stored (v7 ids start with their time). Whatever the order and
/// version of the ids, every stored one still deduplicates, across reopening.
#[tokio::test]
async fn stored_ids_of_every_version_deduplicate_across_reopening() {
    let dir = TempDir::new().expect("temp dir");
    let stream = conv("ids");
    let older_v7 = NewEvent::new(message(1));
    let random = NewEvent::with_id(Uuid::new_v4(), message(2));
    let newer_v7 = NewEvent::new(message(3));
    let named = NewEvent::with_id(Uuid::new_v5(&Uuid::NAMESPACE_OID, b"alert"), message(4));
    let stored = [&older_v7, &random, &newer_v7, &named];
    // A v7 id from the end of v7 time, above any the clock will give.
    let far_future = uuid::Builder::from_unix_timestamp_millis((1 << 48) - 1, &[7; 10]).into_uuid();
    assert_eq!(far_future.get_version_num(), 7);
    let future_v7 = NewEvent::with_id(far_future, message(5));

    let append = |log: &EventLog, event: &NewEvent| {
        let (log, stream, event) = (log.clone(), stream.clone(), event.clone());
        async move {
            log.append(stream, ExpectedVersion::Any, vec![event])
                .await
                .expect("append")
        }
    };
    let mut seqs = Vec::new();
    {
        let log = open(dir.path());
        for event in stored {
            let first = append(&log, event).await;
            assert!(!first.deduplicated);
            seqs.push(first.first().seq);
            assert!(append(&log, event).await.deduplicated);
        }
    }
    {
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
        for (event, seq) in stored.iter().zip(&seqs) {
            let again = append(&log, event).await;
            assert!(again.deduplicated, "{:?}", event.id);
            assert_eq!(again.first().seq, *seq);
        }
        assert!(!append(&log, &new_message(6)).await.deduplicated);
        assert!(!append(&log, &future_v7).await.deduplicated);
        // Now below the newest v7 id: a new one is looked up, and is new.
        assert!(!append(&log, &new_message(7)).await.deduplicated);
        assert!(append(&log, &future_v7).await.deduplicated);
        assert!(append(&log, &older_v7).await.deduplicated);
    }
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    assert!(append(&log, &future_v7).await.deduplicated);
    assert!(append(&log, &newer_v7).await.deduplicated);
    assert!(!append(&log, &new_message(8)).await.deduplicated);
    assert_eq!(log.head(), 8);
    log.verify_chain(|_| {}).expect("chain verifies");
}

/// v7 ids are indexed in rows of one group and millisecond (`t`); logs
/// written before those rows keep every id under `i`. A log of both reads,
/// deduplicates and verifies as one.
#[tokio::test]
async fn ids_indexed_before_rows_of_ids_existed_still_deduplicate() {
    let dir = TempDir::new().expect("temp dir");
    let stream = conv("old-ids");
    let old: Vec<NewEvent> = messages(1..41);
    {
        let log = open(dir.path());
        log.append(stream.clone(), ExpectedVersion::Any, old[..20].to_vec())
            .await
            .expect("append");
        log.append(stream.clone(), ExpectedVersion::Any, old[20..].to_vec())
            .await
            .expect("append");
    }
    // Rewrite the id index as a log from before `t` rows: an `i` entry each.
    tamper(dir.path(), |tree| {
        let rows: Vec<_> = tree
            .scan_prefix(b"t")
            .map(|row| row.expect("read"))
            .collect();
        assert!(!rows.is_empty(), "v7 ids are in t rows");
        for (key, value) in rows {
            for entry in value.chunks_exact(18) {
                let mut id_key = vec![b'i'];
                id_key.extend_from_slice(&key[1..7]);
                id_key.extend_from_slice(&entry[..10]);
                tree.insert(id_key, &entry[10..]).expect("insert");
            }
            tree.remove(key).expect("remove");
        }
    });

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, 40);
    for (n, event) in old.iter().enumerate() {
        assert_eq!(log.seq_of(&event.id).expect("seq_of"), Some(n as u64 + 1));
    }
    let again = log
        .append(stream.clone(), ExpectedVersion::Any, old[20..].to_vec())
        .await
        .expect("append again");
    assert!(again.deduplicated);
    assert_eq!(again.first().seq, 21);
    let new = messages(41..43);
    let appended = log
        .append(stream.clone(), ExpectedVersion::Exact(40), new.clone())
        .await
        .expect("append new");
    assert!(!appended.deduplicated);
    assert!(
        log.append(stream, ExpectedVersion::Any, new)
            .await
            .expect("append new again")
            .deduplicated
    );
    assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_of_one_id_write_it_once() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let event = NewEvent::new(message(1));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let log = log.clone();
            let event = event.clone();
            tokio::spawn(async move {
                log.append(conv("c1"), ExpectedVersion::Any, vec![event])
                    .await
            })
        })
        .collect();
    let mut written = 0;
    for task in tasks {
        let appended = task.await.expect("task").expect("append");
        assert_eq!(appended.positions, vec![Position { seq: 1, version: 1 }]);
        if !appended.deduplicated {
            written += 1;
        }
    }
    assert_eq!(written, 1, "exactly one append writes the event");
    assert_eq!(log.head(), 1);
    log.verify_chain(|_| {}).expect("chain verifies");
}

// ---- concurrency ------------------------------------------------------------

/// Pairs of tasks append the same events at the same time, so one of each
/// pair is answered `deduplicated`, often from the very group that writes the
/// event: whoever is answered, and however, the durable head already covers
/// the answer (no acknowledgment before the flush).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_answer_comes_after_the_flush_that_makes_it_durable() {
    const PAIRS: u64 = 16;
    const EACH: u64 = 100;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let events: Arc<Vec<NewEvent>> = Arc::new(messages(0..PAIRS * EACH));
    let tasks: Vec<_> = (0..PAIRS * 2)
        .map(|task| {
            let (log, events) = (log.clone(), events.clone());
            tokio::spawn(async move {
                let pair = task / 2;
                let mut deduplicated = 0;
                for n in 0..EACH {
                    let event = events[(pair * EACH + n) as usize].clone();
                    let appended = log
                        .append(conv(&format!("c{pair}")), ExpectedVersion::Any, vec![event])
                        .await
                        .expect("append");
                    let seq = appended.positions[0].seq;
                    assert!(
                        log.head() >= seq,
                        "answered for seq {seq} while the durable head is {}",
                        log.head()
                    );
                    deduplicated += u64::from(appended.deduplicated);
                }
                deduplicated
            })
        })
        .collect();
    let mut deduplicated = 0;
    for task in tasks {
        deduplicated += task.await.expect("task");
    }
    assert_eq!(
        deduplicated,
        PAIRS * EACH,
        "one of each pair writes, one is told it was written"
    );
    assert_eq!(log.head(), PAIRS * EACH);
    log.verify_chain(|_| {}).expect("chain verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appenders_on_one_stream_get_exactly_one_winner_per_version() {
    const TASKS: usize = 32;
    const TOTAL: u64 = 500;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let stream = conv("contended");
    let conflicts = Arc::new(AtomicU64::new(0));

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let log = log.clone();
            let stream = stream.clone();
            let conflicts = conflicts.clone();
            tokio::spawn(async move {
                let mut won = Vec::new();
                loop {
                    let version = log.stream_version(&stream).expect("stream version");
                    if version >= TOTAL {
                        return won;
                    }
                    let event = new_message(task as u64);
                    match log
                        .append(stream.clone(), ExpectedVersion::Exact(version), vec![event])
                        .await
                    {
                        Ok(appended) => {
                            assert!(!appended.deduplicated);
                            assert_eq!(appended.first().version, version + 1);
                            won.push(appended.first());
                        }
                        Err(AppendError::Conflict {
                            expected, actual, ..
                        }) => {
                            assert_eq!(expected, ExpectedVersion::Exact(version));
                            assert!(actual > version, "a conflict means someone else won");
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(other) => panic!("append failed: {other}"),
                    }
                }
            })
        })
        .collect();

    let mut wins = Vec::new();
    for task in tasks {
        wins.extend(task.await.expect("appender task"));
    }
    assert_eq!(wins.len() as u64, TOTAL, "acknowledged appends");
    let won_versions: BTreeSet<u64> = wins.iter().map(|p| p.version).collect();
    assert_eq!(
        won_versions,
        (1..=TOTAL).collect(),
        "one winner per version"
    );
    let won_seqs: BTreeSet<u64> = wins.iter().map(|p| p.seq).collect();
    assert_eq!(won_seqs, (1..=TOTAL).collect());

    let read = stream_events(&log, &stream, 1);
    let versions: Vec<u64> = read.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=TOTAL).collect::<Vec<_>>());
    let seqs: Vec<u64> = all(&log).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(log.head(), TOTAL);
    assert_eq!(log.stream_version(&stream).expect("version"), TOTAL);
    let report = log.verify_chain(|_| {}).expect("chain verifies");
    assert_eq!(report.records, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_appenders_on_distinct_streams_are_all_acknowledged() {
    const TASKS: u64 = 256;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let tasks: Vec<_> = (0..TASKS)
        .map(|n| {
            let log = log.clone();
            tokio::spawn(async move {
                let stream = conv(&format!("c{n}"));
                let appended = log
                    .append(
                        stream.clone(),
                        ExpectedVersion::Exact(0),
                        vec![new_message(n)],
                    )
                    .await
                    .expect("append to a fresh stream");
                (stream, appended)
            })
        })
        .collect();
    let mut seqs = BTreeSet::new();
    let mut acked = Vec::new();
    for task in tasks {
        let (stream, appended) = task.await.expect("appender task");
        assert!(!appended.deduplicated);
        assert_eq!(appended.first().version, 1, "{stream}");
        assert!(seqs.insert(appended.first().seq), "seq given twice");
        acked.push((stream, appended.first().seq));
    }
    assert_eq!(seqs, (1..=TASKS).collect(), "gapless seqs");
    assert_eq!(log.head(), TASKS);
    for (stream, seq) in acked {
        let events = stream_events(&log, &stream, 1);
        assert_eq!(events.len(), 1, "{stream}");
        assert_eq!(events[0].seq, seq);
        assert_eq!(log.stream_version(&stream).expect("version"), 1);
    }
    let report = log.verify_chain(|_| {}).expect("chain verifies");
    assert_eq!(report.records, TASKS);
}

// ---- subscriptions ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_follows_live_appends_without_gap_or_duplicate() {
    const TOTAL: u64 = 2_000;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let mut subscription = log.subscribe(1);
    assert_eq!(subscription.position(), 1);

    let subscriber = tokio::spawn(async move {
        let mut seqs = Vec::with_capacity(TOTAL as usize);
        while (seqs.len() as u64) < TOTAL {
            let envelope = subscription
                .next()
                .await
                .expect("the log is open")
                .expect("a record");
            assert_eq!(
                content_of(&envelope),
                format!("message number {:06}", envelope.seq)
            );
            seqs.push(envelope.seq);
        }
        (seqs, subscription)
    });
    let appender = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut n = 1;
            let mut batch = 1;
            while n <= TOTAL {
                let end = (n + batch).min(TOTAL + 1);
                let stream = conv(&format!("c{}", n % 7));
                log.append(stream, ExpectedVersion::Any, messages(n..end))
                    .await
                    .expect("append");
                n = end;
                batch = batch % 5 + 1;
                tokio::task::yield_now().await;
            }
        })
    };
    appender.await.expect("appender task");
    let (seqs, mut subscription) = subscriber.await.expect("subscriber task");
    assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(subscription.position(), TOTAL + 1);

    // The subscription does not keep the log open: once the last clone of the log
    // is gone it ends, having delivered everything.
    drop(log);
    assert!(
        subscription.next().await.is_none(),
        "ends after the log closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_a_position_catches_up_then_follows() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    for start in (1..=1_000).step_by(100) {
        log.append(
            conv("c1"),
            ExpectedVersion::Any,
            messages(start..start + 100),
        )
        .await
        .expect("append");
    }

    let mut subscription = log.subscribe(500);
    assert_eq!(subscription.position(), 500);
    for expected in 500..=1_000 {
        let envelope = subscription.next().await.expect("open").expect("record");
        assert_eq!(envelope.seq, expected);
    }
    log.append(conv("c2"), ExpectedVersion::Any, messages(1_001..1_011))
        .await
        .expect("append");
    for expected in 1_001..=1_010 {
        let envelope = subscription.next().await.expect("open").expect("record");
        assert_eq!(envelope.seq, expected);
        assert_eq!(envelope.stream, conv("c2"));
    }

    // A subscription from 0 starts at 1; one past the head waits for the next append.
    let mut from_zero = log.subscribe(0);
    assert_eq!(
        from_zero.next().await.expect("open").expect("record").seq,
        1
    );
    let mut from_head = log.subscribe(log.head() + 1);
    let follower = tokio::spawn(async move {
        let next = from_head.next().await.expect("open").expect("record");
        (next.seq, from_head)
    });
    log.append(conv("c3"), ExpectedVersion::Any, vec![new_message(1_011)])
        .await
        .expect("append");
    let (seq, mut from_head) = follower.await.expect("follower task");
    assert_eq!(seq, 1_011);

    drop(log);
    assert_eq!(
        subscription
            .next()
            .await
            .expect("one record left")
            .expect("record")
            .seq,
        1_011
    );
    assert!(subscription.next().await.is_none());
    assert!(from_head.next().await.is_none());
}

/// Followers take new records from the writer's in-memory tail; a follower
/// further behind than the tail holds reads the tree until it reaches what
/// the tail still has, then goes on from there — with no gap and no duplicate
/// at the seam. The same records come back as a fresh read of the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_stream_reads_take_the_tree_up_to_the_tail() {
    const TOTAL: u64 = 40_000; // more than the tail keeps
    const BATCH: u64 = 1_000;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    let mut live = log.subscribe(1);
    for start in (1..=TOTAL).step_by(BATCH as usize) {
        let stream = conv(&format!("c{}", start % 3));
        log.append(stream, ExpectedVersion::Any, messages(start..start + BATCH))
            .await
            .expect("append");
    }

    let mut behind = log.subscribe(1);
    let stored: Vec<_> = log.read_from(1).map(|e| e.expect("record")).collect();
    assert_eq!(stored.len() as u64, TOTAL);
    for (i, expected) in stored.iter().enumerate() {
        for subscription in [&mut behind, &mut live] {
            let envelope = subscription
                .try_next()
                .unwrap_or_else(|| panic!("record {} is durable", i + 1))
                .expect("record");
            assert_eq!(*envelope, *expected);
        }
    }
    assert!(behind.try_next().is_none(), "caught up");
    // Stream reads and `get` take the newest records from the tail, the
    // older ones from the tree (`read_from` reads only the tree).
    for stream in ["c0", "c1", "c2"].map(conv) {
        let read: Vec<_> = log
            .read_stream(&stream, 1)
            .map(|e| e.expect("record"))
            .collect();
        let expected: Vec<_> = stored.iter().filter(|e| e.stream == stream).collect();
        assert_eq!(read.iter().collect::<Vec<_>>(), expected, "stream {stream}");
    }
    for seq in [1, TOTAL / 2, TOTAL] {
        let got = log.get(seq).expect("get").expect("stored");
        assert_eq!(got, stored[(seq - 1) as usize]);
    }

    // Both follow what comes next.
    log.append(
        conv("c9"),
        ExpectedVersion::Any,
        messages(TOTAL + 1..TOTAL + 3),
    )
    .await
    .expect("append");
    for subscription in [&mut behind, &mut live] {
        for seq in TOTAL + 1..TOTAL + 3 {
            let envelope = subscription.next().await.expect("open").expect("record");
            assert_eq!((envelope.seq, envelope.stream.clone()), (seq, conv("c9")));
        }
    }
}

// ---- long reads -------------------------------------------------------------

#[test]
fn reading_two_hundred_thousand_records_in_order() {
    const TOTAL: u64 = 200_000;
    const BATCH: u64 = 500;
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    for start in (1..=TOTAL).step_by(BATCH as usize) {
        let events = (start..start + BATCH)
            .map(|n| {
                NewEvent::new(Event::ConversationStarted(ConversationStarted {
                    conversation_id: format!("c{n}"),
                    key_id: "k".into(),
                    user: None,
                }))
            })
            .collect();
        log.append_blocking(
            conv(&format!("c{}", start % 10)),
            ExpectedVersion::Any,
            events,
        )
        .expect("append");
    }
    assert_eq!(log.head(), TOTAL);
    let mut expected = 1;
    for record in log.read_from(1) {
        let record = record.expect("record reads");
        assert_eq!(record.seq, expected);
        expected += 1;
    }
    assert_eq!(expected - 1, TOTAL);
    assert_eq!(log.read_from(TOTAL - 999).count(), 1_000);
}

// ---- rows of records --------------------------------------------------------

/// The record rows of the log in `dir`, read with sled directly: each key's
/// first and last seq, and the row's length.
fn record_rows(dir: &Path) -> Vec<(u64, u64, usize)> {
    dump(dir)
        .into_iter()
        .filter(|(key, _)| key.first() == Some(&b'r'))
        .map(|(key, value)| {
            let seq = |at: usize| u64::from_be_bytes(key[at..at + 8].try_into().expect("8 bytes"));
            match key.len() {
                9 => (seq(1), seq(1), value.len()),
                17 => (seq(1), seq(9), value.len()),
                other => panic!("a record key of {other} bytes"),
            }
        })
        .collect()
}

/// A group commit of many records writes them as a few rows of consecutive
/// records (one append is one group); every way of reading finds each record
/// in them, from any position, once the tail no longer holds them.
#[test]
fn records_of_one_group_share_rows_and_every_read_finds_each_of_them() {
    let dir = TempDir::new().expect("temp dir");
    let stream = conv("rows");
    let mut group = messages(2..32);
    let long = Event::MessageReceived(MessageReceived {
        conversation_id: "c1".into(),
        message_id: "long".into(),
        key_id: "key_1".into(),
        user: None,
        content: "x".repeat(10_000),
        agent: None,
    });
    group.push(NewEvent::new(long));
    group.extend(messages(32..62));
    let written = {
        let log = open(dir.path());
        log.append_blocking(conv("before"), ExpectedVersion::Any, messages(1..2))
            .expect("append one");
        log.append_blocking(stream.clone(), ExpectedVersion::Exact(0), group)
            .expect("append the group");
        log.append_blocking(conv("after"), ExpectedVersion::Any, messages(62..63))
            .expect("append one more");
        all(&log)
    };
    assert_eq!(written.len(), 63);

    // Rows cover every seq once, in order: single records around a group of
    // rows of at most 4 KiB, and the long record in a row of its own.
    let rows = record_rows(dir.path());
    let covered: Vec<u64> = rows
        .iter()
        .flat_map(|&(first, last, _)| first..=last)
        .collect();
    assert_eq!(covered, (1..=63).collect::<Vec<_>>(), "{rows:?}");
    assert_eq!(rows.first(), Some(&(1, 1, rows[0].2)), "{rows:?}");
    assert_eq!(rows.last().map(|r| (r.0, r.1)), Some((63, 63)), "{rows:?}");
    let shared: Vec<_> = rows
        .iter()
        .filter(|(first, last, _)| last > first)
        .collect();
    assert!(shared.len() >= 2, "the group shares rows: {rows:?}");
    assert!(shared.iter().all(|&&(_, _, len)| len <= 4096), "{rows:?}");
    let &(_, last, len) = rows.iter().find(|r| r.0 == 32).expect("a row starts at 32");
    assert_eq!(last, 32, "the long record has a row of its own: {rows:?}");
    assert!(len > 10_000, "{rows:?}");

    // Reopened, the tail is empty: every read below comes from the rows.
    let log = open(dir.path());
    assert_eq!(all(&log), written);
    for seq in 1..=63u64 {
        let got = log.get(seq).expect("get").expect("stored");
        assert_eq!(got, written[seq as usize - 1], "get({seq})");
        let from: Vec<_> = log.read_from(seq).map(|e| e.expect("record")).collect();
        assert_eq!(from, written[seq as usize - 1..], "read_from({seq})");
        for to in [seq, seq + 1, seq + 17, 63] {
            let range: Vec<_> = log
                .read_range(seq, to)
                .map(|e| e.expect("record"))
                .collect();
            assert_eq!(
                range,
                written[seq as usize - 1..to.min(63) as usize],
                "read_range({seq}, {to})"
            );
        }
        let mut subscription = log.subscribe(seq);
        let mut followed = Vec::new();
        while let Some(envelope) = subscription.try_next() {
            followed.push(Envelope::clone(&envelope.expect("record")));
        }
        assert_eq!(followed, written[seq as usize - 1..], "subscribe({seq})");
    }
    for version in 1..=61u64 {
        let read = stream_events(&log, &stream, version);
        assert_eq!(
            read,
            written[version as usize..62],
            "read_stream(rows, {version})"
        );
    }
    assert!(log.get(64).expect("get").is_none());
    assert_eq!(
        log.verify_chain(|_| {})
            .expect("the chain verifies")
            .records,
        63
    );

    // Appending again after reopening continues the chain and the rows.
    log.append_blocking(stream.clone(), ExpectedVersion::Exact(61), messages(63..73))
        .expect("append after reopening");
    assert_eq!(
        log.verify_chain(|_| {})
            .expect("the chain verifies")
            .records,
        73
    );
    assert_eq!(stream_events(&log, &stream, 60).len(), 12);
}

/// The stream index entries of `stream` in the closed log in `dir`, read
/// with sled directly: each entry's first version and its value's length.
fn stream_entries(dir: &Path, stream: &str) -> Vec<(u64, usize)> {
    entries_of(dump(dir), stream)
}

/// [`stream_entries`] in the tree of the open `log`.
fn stream_entries_open(log: &EventLog, stream: &str) -> Vec<(u64, usize)> {
    let tree = log.db().open_tree("log").expect("the log tree");
    let rows = tree.iter().map(|entry| {
        let (key, value) = entry.expect("read an entry");
        (key.to_vec(), value.to_vec())
    });
    entries_of(rows.collect(), stream)
}

fn entries_of(rows: Vec<(Vec<u8>, Vec<u8>)>, stream: &str) -> Vec<(u64, usize)> {
    let mut prefix = vec![b's'];
    prefix.extend_from_slice(stream.as_bytes());
    prefix.push(0);
    rows.into_iter()
        .filter(|(key, _)| key.starts_with(&prefix))
        .map(|(key, value)| {
            let version = u64::from_be_bytes(key[prefix.len()..].try_into().expect("8 bytes"));
            (version, value.len())
        })
        .collect()
}

/// A stream's appends share one stream index entry (first seq and count of
/// each, 16 bytes apiece; a single seq for one event, as every entry was
/// before), written into the tree after their flush, and at the latest when
/// the log closes; stream reads start anywhere inside one, before and after.
#[test]
fn a_streams_appends_share_one_stream_entry_and_reads_start_inside_it() {
    let dir = TempDir::new().expect("temp dir");
    let stream = conv("runs");
    let written = {
        let log = open(dir.path());
        for (range, other) in [(1..11, 100), (11..12, 101), (12..17, 102)] {
            log.append_blocking(stream.clone(), ExpectedVersion::Any, messages(range))
                .expect("append to the stream");
            log.append_blocking(
                conv("other"),
                ExpectedVersion::Any,
                messages(other..other + 2),
            )
            .expect("append elsewhere");
        }
        let written = stream_events(&log, &stream, 1);
        // Not in the tree yet: read from what the log holds back.
        assert_eq!(stream_entries_open(&log, "conv/runs"), []);
        for from in 0..=17u64 {
            let skip = from.saturating_sub(1).min(16) as usize;
            let read = stream_events(&log, &stream, from);
            assert_eq!(
                read,
                written[skip..],
                "read_stream(runs, {from}) while open"
            );
        }
        written
    };
    assert_eq!(written.len(), 16);
    let contents: Vec<_> = written.iter().map(content_of).collect();
    let expected: Vec<_> = (1..17).map(|n| format!("message number {n:06}")).collect();
    assert_eq!(contents, expected);
    assert_eq!(stream_entries(dir.path(), "conv/runs"), [(1, 3 * 16)]);

    let log = open(dir.path());
    for from in 0..=17u64 {
        let read = stream_events(&log, &stream, from);
        let skip = from.saturating_sub(1).min(16) as usize;
        assert_eq!(read, written[skip..], "read_stream(runs, {from})");
    }
    assert_eq!(log.stream_version(&stream).expect("version"), 16);
    assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, 22);
    log.append_blocking(stream.clone(), ExpectedVersion::Exact(16), messages(17..19))
        .expect("append at the version after the entries");
    assert_eq!(stream_events(&log, &stream, 16).len(), 3);
}

/// What a crash leaves of the stream index: entries written since the last
/// flush lost, and the `mindexed` marker no further than the first record
/// without an entry. Opening the log writes an entry for each record past
/// the marker that no entry covers: reads, versions and `verify` agree with
/// the records, and no event is counted twice.
#[test]
fn stream_index_entries_a_crash_lost_are_written_again_at_open() {
    let dir = TempDir::new().expect("temp dir");
    let (a, b) = (conv("a"), conv("b"));
    let written: Vec<(StreamId, Vec<Envelope>)> = {
        let log = open(dir.path());
        for n in 0..40u64 {
            let stream = if n % 4 == 0 { &b } else { &a };
            log.append_blocking(
                stream.clone(),
                ExpectedVersion::Any,
                messages(n * 2 + 1..n * 2 + 3),
            )
            .expect("append");
        }
        // a's first 16 appends filled an entry; the rest waited for the close.
        assert_eq!(stream_entries_open(&log, "conv/a"), [(1, 16 * 16)]);
        assert_eq!(stream_entries_open(&log, "conv/b"), []);
        [a.clone(), b.clone()]
            .map(|stream| (stream.clone(), stream_events(&log, &stream, 1)))
            .into()
    };
    assert_eq!(written[0].1.len() + written[1].1.len(), 80);
    assert_eq!(
        stream_entries(dir.path(), "conv/a"),
        [(1, 256), (33, 14 * 16)]
    );
    assert_eq!(stream_entries(dir.path(), "conv/b"), [(1, 10 * 16)]);
    tamper(dir.path(), |tree| {
        for (stream, version) in [("conv/a", 33u64), ("conv/b", 1)] {
            let mut key = format!("s{stream}\0").into_bytes();
            key.extend_from_slice(&version.to_be_bytes());
            tree.remove(key)
                .expect("remove")
                .expect("the entry was there");
        }
        // b's first record, seq 1, lost its entry: the marker stays before it.
        tree.insert(b"mindexed", &0u64.to_be_bytes())
            .expect("insert");
    });

    let log = open(dir.path());
    for (stream, events) in &written {
        assert_eq!(&stream_events(&log, stream, 1), events, "{stream}");
        assert_eq!(stream_events(&log, stream, 10), events[9..], "{stream}");
        let version = log.stream_version(stream).expect("version");
        assert_eq!(version, events.len() as u64, "{stream}");
    }
    assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, 80);
    // a's entry of 16 appends covered its first 32 records: none for them.
    let a_entries = stream_entries_open(&log, "conv/a");
    assert_eq!(a_entries.len(), 1 + 28, "{a_entries:?}");
    assert_eq!(a_entries[..2], [(1, 256), (33, 8)]);
    assert_eq!(stream_entries_open(&log, "conv/b").len(), 20);
    log.append_blocking(a.clone(), ExpectedVersion::Exact(60), messages(81..83))
        .expect("append after the repair");
    assert_eq!(stream_events(&log, &a, 60).len(), 3);
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, 82);
    assert_eq!(log.stream_version(&a).expect("version"), 62);
}

/// A record past the `mindexed` marker that does not decode, after a crash:
/// the open that would write the stream index entries the crash lost fails,
/// names the record, and changes nothing.
#[test]
fn a_record_that_does_not_decode_past_the_index_marker_fails_the_open_and_changes_nothing() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        let keys: Vec<_> = tree.scan_prefix(b"s").map(|e| e.expect("read").0).collect();
        for key in keys {
            tree.remove(key).expect("remove");
        }
        tree.insert(b"mindexed", &0u64.to_be_bytes())
            .expect("insert");
        let key = record_key(20);
        let mut value = tree.get(&key).expect("get").expect("record 20").to_vec();
        value.truncate(40);
        tree.insert(&key, value).expect("insert");
    });
    let before = dump(dir.path());
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::Corrupt { detail, .. }) => {
            assert!(detail.contains("record 20 does not decode"), "{detail}");
        }
        Err(other) => panic!("expected a corrupt log, got {other}"),
        Ok(_) => panic!("the log opened with an undecodable record to index"),
    }
    assert_eq!(dump(dir.path()), before, "the refused open changed the log");
}

// ---- reopening --------------------------------------------------------------

#[test]
fn reopening_continues_the_head_the_versions_and_the_chain() {
    let dir = TempDir::new().expect("temp dir");
    let (a, b) = (conv("a"), conv("b"));
    let report = {
        let log = open(dir.path());
        log.append_blocking(a.clone(), ExpectedVersion::Exact(0), messages(1..4))
            .expect("append");
        log.append_blocking(b.clone(), ExpectedVersion::Exact(0), messages(4..6))
            .expect("append");
        log.append_blocking(a.clone(), ExpectedVersion::Exact(3), messages(6..7))
            .expect("append");
        let clone = log.clone();
        drop(log);
        // A clone keeps it open.
        clone
            .append_blocking(b.clone(), ExpectedVersion::Exact(2), messages(7..8))
            .expect("append through a clone");
        clone.verify_chain(|_| {}).expect("chain verifies")
    };
    assert_eq!(report.records, 7);

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    assert_eq!(log.head(), 7);
    assert_eq!(log.stream_version(&a).expect("version"), 4);
    assert_eq!(log.stream_version(&b).expect("version"), 3);
    assert_eq!(log.verify_chain(|_| {}).expect("chain verifies"), report);

    let next = log
        .append_blocking(a.clone(), ExpectedVersion::Exact(4), messages(8..9))
        .expect("append after reopening");
    assert_eq!(next.first(), Position { seq: 8, version: 5 });
    let mut verified = Vec::new();
    let after = log
        .verify_chain(|seq| verified.push(seq))
        .expect("the chain continues across the reopen");
    assert_eq!(after.records, 8);
    assert_ne!(after.head_hash, report.head_hash);
    assert_eq!(verified, (1..=8).collect::<Vec<_>>());
    let seqs: Vec<u64> = all(&log).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}

// ---- the data dir lock and open errors --------------------------------------

#[test]
fn a_second_open_of_a_dir_in_use_is_refused_and_changes_nothing() {
    let dir = TempDir::new().expect("temp dir");
    let first = open(dir.path());
    first
        .append_blocking(conv("a"), ExpectedVersion::Any, messages(1..4))
        .expect("append");
    let before = listing(dir.path());

    for mode in [OpenMode::CreateIfMissing, OpenMode::MustExist] {
        let err = match EventLog::open(dir.path(), mode) {
            Err(err) => err,
            Ok(_) => panic!("{mode:?}: a second open of a dir in use succeeded"),
        };
        assert!(matches!(err, OpenError::InUse { .. }), "{mode:?}: {err:?}");
        let message = err.to_string();
        assert!(message.contains("in use"), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "the refusal names the holder: {message}"
        );
        assert_eq!(
            listing(dir.path()),
            before,
            "{mode:?}: the refused open changed the dir"
        );
    }

    // The first opener is unharmed.
    first
        .append_blocking(conv("a"), ExpectedVersion::Exact(3), messages(4..5))
        .expect("the first opener still appends");
    drop(first);

    let second = EventLog::open(dir.path(), OpenMode::MustExist).expect("open after release");
    assert_eq!(second.head(), 4);
    second.verify_chain(|_| {}).expect("chain verifies");
}

#[test]
fn must_exist_refuses_a_missing_dir_without_creating_it() {
    let parent = TempDir::new().expect("temp dir");
    let missing = parent.path().join("no-such-dir");
    let err = EventLog::open(&missing, OpenMode::MustExist)
        .err()
        .expect("a missing dir is refused");
    assert!(matches!(err, OpenError::Missing { .. }), "{err:?}");
    assert!(!missing.exists(), "the refused open created the dir");
}

#[test]
fn a_regular_file_is_not_a_data_dir() {
    let parent = TempDir::new().expect("temp dir");
    let file = parent.path().join("data");
    std::fs::write(&file, b"not a log").expect("write file");
    for mode in [OpenMode::MustExist, OpenMode::CreateIfMissing] {
        let err = EventLog::open(&file, mode)
            .err()
            .expect("a file is refused");
        assert!(
            matches!(err, OpenError::NotADirectory { .. }),
            "{mode:?}: {err:?}"
        );
    }
    assert_eq!(std::fs::read(&file).expect("read file"), b"not a log");
}

#[test]
fn must_exist_refuses_an_empty_dir_and_leaves_it_empty() {
    let dir = TempDir::new().expect("temp dir");
    let err = EventLog::open(dir.path(), OpenMode::MustExist)
        .err()
        .expect("an empty dir is refused");
    assert!(matches!(err, OpenError::NotADataDir { .. }), "{err:?}");
    assert!(
        listing(dir.path()).is_empty(),
        "the refused open wrote into the dir"
    );
}

#[test]
fn create_if_missing_creates_the_dir_and_must_exist_then_opens_it() {
    let parent = TempDir::new().expect("temp dir");
    let dir = parent.path().join("nested/data");
    {
        let log = open(&dir);
        assert_eq!(log.head(), 0);
        assert_eq!(log.dir(), dir.as_path());
    }
    assert!(dir.join(DB_DIR).is_dir());
    let log = EventLog::open(&dir, OpenMode::MustExist).expect("an empty log exists");
    assert_eq!(log.head(), 0);
    log.verify_chain(|_| {}).expect("an empty chain verifies");
}

// ---- tamper detection -------------------------------------------------------

/// A closed log of 50 messages in `dir`, seq n holding "message number 00000n".
fn closed_log_of_fifty(dir: &Path) {
    let log = open(dir);
    for n in 1..=50 {
        log.append_blocking(
            conv(&format!("c{}", n % 3)),
            ExpectedVersion::Any,
            vec![new_message(n)],
        )
        .expect("append");
    }
    log.verify_chain(|_| {})
        .expect("the untouched chain verifies");
}

fn record_key(seq: u64) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Opens the log's sled tree directly, as an attacker or a disk fault would.
fn tamper(dir: &Path, change: impl FnOnce(&sled::Tree)) {
    let db = sled::open(dir.join(DB_DIR)).expect("open sled directly");
    let tree = db.open_tree("log").expect("the log tree");
    change(&tree);
    db.flush().expect("flush the tampering");
}

/// Every key and value of the log's tree, read with sled directly.
fn dump(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = sled::open(dir.join(DB_DIR)).expect("open sled directly");
    let tree = db.open_tree("log").expect("the log tree");
    tree.iter()
        .map(|entry| {
            let (key, value) = entry.expect("read an entry");
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

#[test]
fn a_changed_record_breaks_the_chain_at_that_record() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        let key = record_key(20);
        let mut value = tree.get(&key).expect("get").expect("record 20").to_vec();
        let needle = b"message number 000020";
        let at = value[32..]
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("record 20's content is in its bytes")
            + 32;
        value[at] = b'M'; // still valid UTF-8, still decodable
        tree.insert(&key, value).expect("insert");
    });

    assert_changed_at_twenty(dir.path());
}

/// Record 20 of the log in `dir` reads "Message number 000020" and breaks
/// the chain there.
fn assert_changed_at_twenty(dir: &Path) {
    let log = EventLog::open(dir, OpenMode::MustExist).expect("reopen");
    let changed = log
        .get(20)
        .expect("the changed record still decodes")
        .expect("record 20");
    assert_eq!(content_of(&changed), "Message number 000020");
    let mut verified = Vec::new();
    match log.verify_chain(|seq| verified.push(seq)) {
        Err(ChainBreak::HashMismatch { seq: 20 }) => {}
        other => panic!("expected HashMismatch at 20, got {other:?}"),
    }
    assert_eq!(verified, (1..20).collect::<Vec<_>>());
}

/// A closed log of 100 messages appended at once, so that they share rows.
fn closed_log_in_rows(dir: &Path) -> Vec<(u64, u64, usize)> {
    let log = open(dir);
    log.append_blocking(conv("c1"), ExpectedVersion::Any, messages(1..101))
        .expect("append");
    log.verify_chain(|_| {})
        .expect("the untouched chain verifies");
    drop(log);
    let rows = record_rows(dir);
    assert!(rows.iter().all(|(first, last, _)| last > first), "{rows:?}");
    rows
}

/// The key of the row holding records `first..=last`.
fn row_key(first: u64, last: u64) -> Vec<u8> {
    let mut key = record_key(first);
    key.extend_from_slice(&last.to_be_bytes());
    key
}

#[test]
fn a_changed_record_in_a_shared_row_breaks_the_chain_at_that_record() {
    let dir = TempDir::new().expect("temp dir");
    let rows = closed_log_in_rows(dir.path());
    let &(first, last, _) = rows
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&20))
        .expect("a row holds record 20");
    tamper(dir.path(), |tree| {
        let key = row_key(first, last);
        let mut value = tree.get(&key).expect("get").expect("the row").to_vec();
        let needle = b"message number 000020";
        let at = value
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("record 20's content is in the row");
        value[at] = b'M';
        tree.insert(&key, value).expect("insert");
    });

    assert_changed_at_twenty(dir.path());
}

/// A row whose framing is damaged — a length past its end, bytes cut off,
/// bytes left over — reads as a corrupt record named by seq, never a panic;
/// the rows before it still read. Damage to the last row is found at open.
#[test]
fn a_damaged_shared_row_reads_as_corrupt_at_its_records() {
    let rows = {
        let dir = TempDir::new().expect("temp dir");
        closed_log_in_rows(dir.path())
    };
    assert!(rows.len() >= 3, "{rows:?}");
    let &(first, last, _) = &rows[1];
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 3] = [
        ("a length past the end", |value| {
            value[32..36].copy_from_slice(&u32::MAX.to_le_bytes())
        }),
        ("cut off", |value| value.truncate(value.len() - 5)),
        ("bytes left over", |value| value.extend_from_slice(b"extra")),
    ];
    for (what, damage) in damages {
        let dir = TempDir::new().expect("temp dir");
        assert_eq!(closed_log_in_rows(dir.path()), rows, "{what}");
        tamper(dir.path(), |tree| {
            let key = row_key(first, last);
            let mut value = tree.get(&key).expect("get").expect("the row").to_vec();
            damage(&mut value);
            tree.insert(&key, value).expect("insert");
        });
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
        let read: Vec<_> = log.read_from(1).collect();
        let good = read.iter().take_while(|r| r.is_ok()).count() as u64;
        assert_eq!(good, first - 1, "{what}: the rows before the damage read");
        let error = read[good as usize].as_ref().expect_err("the damaged row");
        assert!(
            error.to_string().contains("corrupt")
                && error.to_string().contains(&format!("{first}..={last}")),
            "{what}: {error}"
        );
        assert!(log.get(first).is_err(), "{what}: get in the damaged row");
        assert!(
            log.get(first - 1).expect("get before it").is_some(),
            "{what}"
        );
        match log.verify_chain(|_| {}) {
            Err(ChainBreak::Read(_)) => {}
            other => panic!("{what}: expected a read error, got {other:?}"),
        }
    }

    let dir = TempDir::new().expect("temp dir");
    closed_log_in_rows(dir.path());
    let &(first, last, _) = rows.last().expect("a last row");
    tamper(dir.path(), |tree| {
        let key = row_key(first, last);
        let mut value = tree.get(&key).expect("get").expect("the row").to_vec();
        value.truncate(value.len() - 5);
        tree.insert(&key, value).expect("insert");
    });
    let before = dump(dir.path());
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::Corrupt { detail, .. }) => {
            assert!(detail.contains(&format!("{first}..={last}")), "{detail}");
        }
        Err(other) => panic!("expected a corrupt log, got {other:?}"),
        Ok(_) => panic!("a log with its last row damaged opened as healthy"),
    }
    assert_eq!(dump(dir.path()), before, "the refused open changed the log");
}

/// A stream index entry that claims fewer events of its append than it has
/// leaves a record no entry points at: `verify` names it.
#[test]
fn a_shortened_stream_entry_is_reported_at_the_record_it_no_longer_covers() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_in_rows(dir.path());
    tamper(dir.path(), |tree| {
        let mut key = b"sconv/c1\0".to_vec();
        key.extend_from_slice(&1u64.to_be_bytes());
        let mut value = tree.get(&key).expect("get").expect("the entry").to_vec();
        assert_eq!(value.len(), 16, "first seq and count");
        value[8..].copy_from_slice(&99u64.to_be_bytes());
        tree.insert(&key, value).expect("insert");
    });
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    match log.verify_chain(|_| {}) {
        Err(ChainBreak::Index { seq: 100, detail }) => {
            assert!(detail.contains("stream index"), "{detail}");
        }
        other => panic!("expected an index break at 100, got {other:?}"),
    }
    assert_eq!(log.read_stream(&conv("c1"), 1).count(), 99);
}

/// An id dropped from its row of ids, or one too many, is an index that
/// disagrees with the records: `verify` names the record or the count.
#[test]
fn a_row_of_ids_that_disagrees_with_the_records_fails_verify() {
    type Change = fn(&mut Vec<u8>);
    let changes: [(&str, Change); 2] = [
        ("an id dropped", |row| {
            row.drain(..18);
        }),
        ("an id too many", |row| {
            let mut extra = row[..18].to_vec();
            extra[..10].copy_from_slice(&[0xee; 10]);
            row.extend_from_slice(&extra);
        }),
    ];
    for (what, change) in changes {
        let dir = TempDir::new().expect("temp dir");
        closed_log_in_rows(dir.path());
        let dropped_seq = tamper_first_id_row(dir.path(), change);
        let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
        match (what, log.verify_chain(|_| {})) {
            ("an id dropped", Err(ChainBreak::Index { seq, detail })) => {
                assert_eq!(seq, dropped_seq, "{detail}");
                assert!(detail.contains("id index"), "{detail}");
            }
            (
                "an id too many",
                Err(ChainBreak::IndexCount {
                    index: "id",
                    entries,
                    records,
                }),
            ) => {
                assert_eq!((entries, records), (101, 100));
            }
            (_, other) => panic!("{what}: got {other:?}"),
        }
    }
}

/// Applies `change` to the first `t` row of the log in `dir` that holds more
/// than one id (a row holds the ids of one millisecond, so the first may hold
/// one, and without it a row would be empty, not short); returns the seq of
/// the first id the row held.
fn tamper_first_id_row(dir: &Path, change: fn(&mut Vec<u8>)) -> u64 {
    let mut first_seq = 0;
    tamper(dir, |tree| {
        let (key, value) = tree
            .scan_prefix(b"t")
            .map(|row| row.expect("read"))
            .find(|(_, value)| value.len() > 18)
            .expect("a row of several ids");
        first_seq = u64::from_be_bytes(value[10..18].try_into().expect("8 bytes"));
        let mut row = value.to_vec();
        change(&mut row);
        tree.insert(key, row).expect("insert");
    });
    first_seq
}

#[test]
fn a_removed_record_is_reported_missing() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        tree.remove(record_key(30))
            .expect("remove")
            .expect("record 30 existed");
    });

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    match log.verify_chain(|_| {}) {
        Err(ChainBreak::Missing {
            expected: 30,
            found: 31,
        }) => {}
        other => panic!("expected record 30 missing, got {other:?}"),
    }
}

#[test]
fn swapped_records_break_the_chain_at_the_first_of_them() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        let ten = tree.get(record_key(10)).expect("get").expect("record 10");
        let eleven = tree.get(record_key(11)).expect("get").expect("record 11");
        tree.insert(record_key(10), eleven).expect("insert");
        tree.insert(record_key(11), ten).expect("insert");
    });

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    match log.verify_chain(|_| {}) {
        Err(ChainBreak::HashMismatch { seq: 10 }) => {}
        other => panic!("expected a break at record 10, got {other:?}"),
    }
}

#[test]
fn a_changed_last_record_breaks_the_chain_at_the_head() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        let key = record_key(50);
        let mut value = tree.get(&key).expect("get").expect("record 50").to_vec();
        let needle = b"message number 000050";
        let at = value[32..]
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("record 50's content is in its bytes")
            + 32;
        value[at + needle.len() - 1] = b'1';
        tree.insert(&key, value).expect("insert");
    });
    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    assert_eq!(log.head(), 50);
    match log.verify_chain(|_| {}) {
        Err(ChainBreak::HashMismatch { seq: 50 }) => {}
        other => panic!("expected HashMismatch at 50, got {other:?}"),
    }
}

#[test]
fn a_removed_last_record_is_refused_at_open_without_changing_the_log() {
    let dir = TempDir::new().expect("temp dir");
    closed_log_of_fifty(dir.path());
    tamper(dir.path(), |tree| {
        tree.remove(record_key(50))
            .expect("remove")
            .expect("record 50 existed");
    });
    let before = dump(dir.path());
    match EventLog::open(dir.path(), OpenMode::MustExist) {
        Err(OpenError::Corrupt { detail, .. }) => {
            assert!(
                detail.contains("50"),
                "the refusal names the lost record: {detail}"
            );
        }
        Err(other) => panic!("expected a corrupt log, got {other:?}"),
        Ok(_) => panic!("a log with its last record cut off opened as healthy"),
    }
    // sled may rewrite its own snapshot file, but the log's contents stay as they were.
    assert_eq!(dump(dir.path()), before, "the refused open changed the log");
}

/// sled keeps a large value in a file of its own, a blob. When that file
/// cannot be written (here its directory is gone; in service, a full disk),
/// the append fails with a storage error, what was acknowledged before stays,
/// and the log still closes. sled used to keep the log buffer's writer slot
/// of the failed write taken, so every flush after it, the one at close
/// included, waited forever.
#[test]
fn an_append_whose_blob_cannot_be_written_fails_and_the_log_still_closes() {
    let dir = TempDir::new().expect("temp dir");
    let log = open(dir.path());
    log.append_blocking(conv("c1"), ExpectedVersion::Any, vec![new_message(1)])
        .expect("a small append");
    std::fs::remove_dir_all(dir.path().join(DB_DIR).join("blobs")).expect("remove the blob dir");
    let large = NewEvent::new(Event::MessageReceived(MessageReceived {
        conversation_id: "c1".into(),
        message_id: "m2".into(),
        key_id: "key_1".into(),
        user: None,
        content: "a long message ".repeat(100_000),
        agent: None,
    }));
    let failed = log.append_blocking(conv("c1"), ExpectedVersion::Any, vec![large]);
    assert!(
        matches!(failed, Err(AppendError::Storage(_))),
        "the append fails with a storage error, not {failed:?}"
    );
    let after = log.append_blocking(conv("c1"), ExpectedVersion::Any, vec![new_message(3)]);
    assert!(
        matches!(after, Err(AppendError::Storage(_))),
        "a log whose write failed refuses appends until it is reopened, not {after:?}"
    );

    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(log);
        let _ = closed_tx.send(());
    });
    closed
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the log closes within 30 s of a failed blob write");

    let log = open(dir.path());
    let stored = all(&log);
    assert_eq!(stored.len(), 1, "only the acknowledged append is stored");
    assert_eq!(content_of(&stored[0]), "message number 000001");
    log.append_blocking(conv("c1"), ExpectedVersion::Any, vec![new_message(4)])
        .expect("the reopened log takes appends");
    assert_eq!(all(&log).len(), 2);
}
