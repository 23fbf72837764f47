//! Crash safety of the event log and the projections, with real SIGKILLs.
//!
//! The test re-executes its own binary as a child that appends events with
//! several concurrent appenders and prints each acknowledged one. It kills the
//! child with SIGKILL at random moments, several rounds on the same data dir.
//! Every round the child starts again from event 0 with the same event ids, as a
//! client resending unacknowledged work would, so the log must deduplicate what
//! it already has. After every kill the test checks, on the reopened dir: every
//! acknowledged event is present exactly once at the position it was acked at,
//! every stream reads back its records in order, the hash chain and the
//! indexes verify, and the projections catch up to exactly what a rebuild
//! gives.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_events::catalog::{MessageReceived, UsageRecorded};
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};
use switchboard_projections::Projections;
use uuid::Uuid;

const CHILD_ENV: &str = "SWITCHBOARD_CRASH_CHILD_DIR";
const APPENDERS: u64 = 8;
const ROUNDS: usize = 6;

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(Path::new(&dir)),
        None => parent(),
    }
}

/// The id of the i-th event: fixed, so a restarted child resends the same ids.
fn event_id(i: u64) -> Uuid {
    Uuid::from_u128(0x5b00_0000_0000_7000_8000_0000_0000_0000 | u128::from(i))
}

fn event(i: u64) -> (StreamId, Event) {
    let conversation_id = format!("c{}", i % 50);
    let stream = StreamId::conversation(&conversation_id).expect("valid id");
    let event = if i.is_multiple_of(2) {
        Event::MessageReceived(MessageReceived {
            conversation_id,
            message_id: format!("m{i}"),
            key_id: format!("key_{}", i % 3),
            user: None,
            content: format!("message number {i}"),
            agent: None,
        })
    } else {
        Event::UsageRecorded(UsageRecorded {
            conversation_id,
            message_id: format!("m{}", i - 1),
            key_id: format!("key_{}", i % 3),
            user: Some(format!("user_{}", i % 2)),
            agent: "echo".into(),
            model: format!("model_{}", i % 4),
            prompt_tokens: i % 97,
            completion_tokens: i % 89,
            estimated: i.is_multiple_of(5),
            input_price: 150,
            output_price: 600,
            cost_micros: i % 1000,
        })
    };
    (stream, event)
}

fn child(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let log = EventLog::open(dir, OpenMode::CreateIfMissing).expect("open log");
        let projections = Projections::open(&log).expect("open projections");
        let live = projections.clone();
        tokio::spawn(async move { live.run_live(std::future::pending()).await });
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for appender in 0..APPENDERS {
            let log = log.clone();
            let stdout = stdout.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = appender;
                loop {
                    let (stream, event) = event(i);
                    let appended = log
                        .append(
                            stream,
                            ExpectedVersion::Any,
                            vec![NewEvent::with_id(event_id(i), event)],
                        )
                        .await
                        .expect("append");
                    let mut out = stdout.lock().expect("stdout lock");
                    writeln!(out, "ack {i} {} .", appended.first().seq).expect("write ack");
                    out.flush().expect("flush ack");
                    drop(out);
                    i += APPENDERS;
                }
            }));
        }
        for task in tasks {
            task.await.expect("appender");
        }
    });
}

/// A small xorshift generator: random kill moments without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn parent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("own executable");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("crash test: seed {seed}");
    // Every acknowledged event: its index → the seq it was acknowledged at.
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let kill_after = Duration::from_millis(300 + next_random(&mut seed) % 1200);
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => lines.push(line),
                    Err(_) => break,
                }
            }
            lines
        });
        let started = Instant::now();
        while started.elapsed() < kill_after {
            std::thread::sleep(Duration::from_millis(10));
            if let Some(status) = child.try_wait().expect("child status") {
                panic!("round {round}: child exited on its own with {status}");
            }
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        let lines = reader.join().expect("reader thread");

        let mut this_round = 0;
        for line in &lines {
            // A line cut by the kill lacks its final "." and is not an ack.
            let parts: Vec<&str> = line.split(' ').collect();
            let ["ack", i, seq, "."] = parts[..] else {
                continue;
            };
            let (i, seq): (u64, u64) = (i.parse().expect("index"), seq.parse().expect("seq"));
            if let Some(previous) = acked.insert(i, seq) {
                assert_eq!(
                    previous, seq,
                    "round {round}: event {i} was acked at seq {previous} before and at {seq} now"
                );
            }
            this_round += 1;
        }
        assert!(
            this_round > 0,
            "round {round}: the child acknowledged nothing in {kill_after:?}"
        );
        check(dir.path(), &acked, round);
        println!(
            "round {round}: killed after {kill_after:?}, {this_round} acks this round, {} distinct acked events, all present once",
            acked.len()
        );
    }
    println!("crash test: ok");
}

fn check(dir: &Path, acked: &HashMap<u64, u64>, round: usize) {
    let log = EventLog::open(dir, OpenMode::MustExist).expect("reopen after SIGKILL");
    let head = log.head();
    let mut seen: HashMap<Uuid, u64> = HashMap::new();
    let mut expected_seq = 1;
    for envelope in log.read_from(1) {
        let envelope = envelope.expect("every stored record decodes");
        assert_eq!(envelope.seq, expected_seq, "round {round}: gap in seq");
        expected_seq += 1;
        if let Some(first) = seen.insert(envelope.id, envelope.seq) {
            panic!(
                "round {round}: event {} stored twice, at {first} and {}",
                envelope.id, envelope.seq
            );
        }
    }
    assert_eq!(
        expected_seq - 1,
        head,
        "round {round}: head disagrees with the records"
    );
    for (&i, &seq) in acked {
        assert_eq!(
            seen.get(&event_id(i)),
            Some(&seq),
            "round {round}: acknowledged event {i} (seq {seq}) is not where it was acked"
        );
    }
    // Each conversation reads back by stream what the log holds for it, in
    // order: the stream index entries a kill lost are written again at open.
    let mut streams: HashMap<StreamId, Vec<u64>> = HashMap::new();
    for envelope in log.read_from(1) {
        let envelope = envelope.expect("decodes");
        let seqs = streams.entry(envelope.stream.clone()).or_default();
        seqs.push(envelope.seq);
        assert_eq!(
            envelope.version,
            seqs.len() as u64,
            "round {round}: record {} has the wrong version",
            envelope.seq
        );
    }
    for (stream, seqs) in &streams {
        let read: Vec<u64> = log
            .read_stream(stream, 1)
            .map(|envelope| envelope.expect("stream record reads").seq)
            .collect();
        assert_eq!(&read, seqs, "round {round}: {stream} reads back otherwise");
        let version = log.stream_version(stream).expect("version");
        assert_eq!(version, seqs.len() as u64, "round {round}: {stream}");
    }
    let report = log
        .verify_chain(|_| {})
        .expect("the hash chain verifies after SIGKILL");
    assert_eq!(report.records, head);

    let projections = Projections::open(&log).expect("projections reopen");
    projections
        .catch_up(&mut |_| {})
        .expect("projections catch up");
    let differences = projections.verify(&mut |_| {}).expect("verify runs");
    assert!(
        differences.is_empty(),
        "round {round}: projections differ from their rebuild: {differences:?}"
    );
    // The costs view holds exactly the usage that is in the log.
    let mut cost_in_log = 0;
    for envelope in log.read_from(1) {
        if let Event::UsageRecorded(usage) = envelope.expect("decodes").event {
            cost_in_log += usage.cost_micros;
        }
    }
    let cost_in_view: u64 = (0..3)
        .map(|k| {
            projections
                .costs()
                .key_totals(&format!("key_{k}"))
                .expect("key totals")
                .cost_micros
        })
        .sum();
    assert_eq!(
        cost_in_view, cost_in_log,
        "round {round}: costs view disagrees with the log"
    );
}
