//! Property test of the stream index, which the log writes after each flush
//! and a stream's appends share (see `events/src/log/stream_index.rs`): for
//! random appends to a few streams, with the log closed and reopened, and
//! entries lost as a crash loses them, every stream reads back exactly its
//! events from any version, its version is right, and `verify` passes.

use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;
use switchboard_events::catalog::AdminAction;
use switchboard_events::log::DB_DIR;
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};

const STREAMS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// `count` events to stream `stream`.
    Append { stream: usize, count: u64 },
    /// Reads stream `stream` from version `from` (scaled to its length).
    Read { stream: usize, from: u8 },
    /// Closes and reopens the log.
    Reopen,
    /// Closes the log and removes every stream index entry holding a seq
    /// past the first `keep`‰ of the log, moving the marker back before the
    /// first record left without one, as a crash leaves them; then reopens.
    Crash { keep: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..STREAMS, 1..4u64).prop_map(|(stream, count)| Op::Append { stream, count }),
        3 => (0..STREAMS, any::<u8>()).prop_map(|(stream, from)| Op::Read { stream, from }),
        1 => Just(Op::Reopen),
        1 => (0..1000u16).prop_map(|keep| Op::Crash { keep }),
    ]
}

fn stream(n: usize) -> StreamId {
    StreamId::conversation(&format!("c{n}")).expect("a valid stream")
}

fn event(n: u64) -> NewEvent {
    NewEvent::new(Event::AdminAction(AdminAction {
        actor: "test".into(),
        action: "poke".into(),
        target: n.to_string(),
    }))
}

fn open(dir: &Path) -> EventLog {
    EventLog::open(dir, OpenMode::CreateIfMissing).expect("open the log")
}

/// What a crash can leave of the index of the closed log in `dir`: entries
/// holding a seq past `kept` gone, and the marker before the first record
/// left without an entry.
fn lose_entries_past(dir: &Path, kept: u64) {
    let db = sled::open(dir.join(DB_DIR)).expect("open sled directly");
    let tree = db.open_tree("log").expect("the log tree");
    let mut marker = kept;
    for entry in tree.scan_prefix(b"s") {
        let (key, value) = entry.expect("read");
        let seqs: Vec<(u64, u64)> = if value.len() == 8 {
            vec![(
                u64::from_be_bytes(value[..].try_into().expect("8 bytes")),
                1,
            )]
        } else {
            value
                .chunks_exact(16)
                .map(|run| {
                    let seq = u64::from_be_bytes(run[..8].try_into().expect("8 bytes"));
                    let count = u64::from_be_bytes(run[8..].try_into().expect("8 bytes"));
                    (seq, count)
                })
                .collect()
        };
        if seqs.iter().any(|&(seq, count)| seq + count - 1 > kept) {
            marker = marker.min(seqs[0].0 - 1);
            tree.remove(key).expect("remove");
        }
    }
    tree.insert(b"mindexed", &marker.to_be_bytes())
        .expect("insert");
    db.flush().expect("flush");
}

fn check_read(log: &EventLog, model: &[u64], n: usize, from: u64) {
    let read: Vec<u64> = log
        .read_stream(&stream(n), from)
        .map(|envelope| envelope.expect("a stream record reads").seq)
        .collect();
    let skip = (from.max(1) - 1).min(model.len() as u64) as usize;
    assert_eq!(read, model[skip..], "stream c{n} from version {from}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn streams_read_back_their_events_through_closes_and_crashes(
        ops in proptest::collection::vec(op(), 1..120)
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = Some(open(dir.path()));
        // Each stream's seqs, in version order.
        let mut model: HashMap<usize, Vec<u64>> = HashMap::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Append { stream: n, count } => {
                    let seqs = model.entry(n).or_default();
                    let events = (0..count).map(|i| event(next + i)).collect();
                    let appended = log
                        .as_ref()
                        .expect("open")
                        .append_blocking(
                            stream(n),
                            ExpectedVersion::Exact(seqs.len() as u64),
                            events,
                        )
                        .expect("append");
                    for position in &appended.positions {
                        prop_assert_eq!(position.version, seqs.len() as u64 + 1);
                        seqs.push(position.seq);
                    }
                    next += count;
                }
                Op::Read { stream: n, from } => {
                    let seqs = model.get(&n).cloned().unwrap_or_default();
                    let from = u64::from(from) * (seqs.len() as u64 + 2) / 255;
                    check_read(log.as_ref().expect("open"), &seqs, n, from);
                }
                Op::Reopen => {
                    drop(log.take());
                    log = Some(open(dir.path()));
                }
                Op::Crash { keep } => {
                    drop(log.take());
                    lose_entries_past(dir.path(), next * u64::from(keep) / 1000);
                    log = Some(open(dir.path()));
                }
            }
        }
        let log = log.expect("open");
        for n in 0..STREAMS {
            let seqs = model.get(&n).cloned().unwrap_or_default();
            check_read(&log, &seqs, n, 1);
            let version = log.stream_version(&stream(n)).expect("version");
            prop_assert_eq!(version, seqs.len() as u64);
        }
        prop_assert_eq!(log.verify_chain(|_| {}).expect("verifies").records, next);
    }
}
