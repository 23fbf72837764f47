//! `switchboard replay` killed with SIGKILL at random moments: the views it
//! leaves behind — cleared part of the way, rebuilt part of the way — must
//! still match a rebuild of the log up to their checkpoints (`verify`), and
//! the next replay must finish the job.
//!
//! A replay marks each view, clears it, folds the log into it from seq 1
//! (commits without redo) and removes the mark; opening a view still marked
//! drops its rows. A kill inside the clear once left rows without the
//! checkpoint they were folded to, which the next catch-up folded again:
//! messages twice in a history, costs counted twice.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use switchboard_events::catalog::{
    ConversationStarted, MessageReceived, ReplyCompleted, UsageRecorded,
};
use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const CONVERSATIONS: u64 = 3_000;
const TURNS: u64 = 12;
const ROUNDS: u64 = 10;
/// Rounds that kill in the first 30% of a replay, where it clears the views.
const EARLY_ROUNDS: u64 = 6;

fn conversation(index: u64) -> Vec<NewEvent> {
    let conversation_id = format!("c{index:05}");
    let key_id = format!("key_{}", index % 7);
    let mut events = vec![Event::ConversationStarted(ConversationStarted {
        conversation_id: conversation_id.clone(),
        key_id: key_id.clone(),
        user: Some(format!("user_{}", index % 13)),
    })];
    for turn in 0..TURNS {
        let message_id = format!("m{index}-{turn}");
        events.push(Event::MessageReceived(MessageReceived {
            conversation_id: conversation_id.clone(),
            message_id: message_id.clone(),
            key_id: key_id.clone(),
            user: None,
            content: format!("question {turn} of conversation {index}: ").repeat(4),
            agent: None,
        }));
        events.push(Event::ReplyCompleted(ReplyCompleted {
            conversation_id: conversation_id.clone(),
            message_id: message_id.clone(),
            reply_id: format!("r{index}-{turn}"),
            agent: "echo".into(),
            content: format!("answer {turn} to conversation {index}. ").repeat(8),
            finish_reason: "stop".into(),
            latency_ms: 100 + turn,
        }));
        events.push(Event::UsageRecorded(UsageRecorded {
            conversation_id: conversation_id.clone(),
            message_id,
            key_id: key_id.clone(),
            user: None,
            agent: "echo".into(),
            model: format!("model_{}", index % 3),
            prompt_tokens: 20 + turn,
            completion_tokens: 40 + index % 11,
            estimated: false,
            input_price: 150,
            output_price: 600,
            cost_micros: 7 + turn,
        }));
    }
    events.into_iter().map(NewEvent::new).collect()
}

fn fill(data: &Path) -> u64 {
    let log = EventLog::open(data, OpenMode::CreateIfMissing).expect("create the log");
    for index in 0..CONVERSATIONS {
        let stream = StreamId::conversation(&format!("c{index:05}")).expect("stream");
        log.append_blocking(stream, ExpectedVersion::Any, conversation(index))
            .expect("append a conversation");
    }
    let head = log.head();
    log.db().flush().expect("flush");
    drop(log);
    head
}

fn sb(data: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .expect("run switchboard")
}

fn assert_verifies(data: &Path, after: &str) {
    let out = sb(data, &["verify", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify {after}: no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["ok"] == true,
        "verify {after}: {report}"
    );
}

/// Runs `replay` and kills it `after` its start; returns whether it had
/// already finished.
fn replay_killed_after(data: &Path, after: Duration) -> bool {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args(["replay", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start replay");
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.try_wait().expect("poll replay").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // SIGKILL: nothing of the replay's own runs after it.
    child.kill().expect("kill replay");
    child.wait().expect("reap replay");
    false
}

#[test]
fn a_replay_killed_at_any_moment_leaves_views_that_verify_and_the_next_one_finishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let head = fill(&data);
    assert_eq!(head, CONVERSATIONS * (1 + 3 * TURNS));

    let started = Instant::now();
    let out = sb(&data, &["replay", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let whole = started.elapsed();
    assert_verifies(&data, "after a whole replay");
    let costs = sb(&data, &["costs", "--by", "model", "--json"]).stdout;

    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    println!("seed {seed}; a whole replay of {head} events took {whole:?}");
    let mut killed = 0;
    for round in 0..ROUNDS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Each kill at a random moment of its own slice of a replay: most in
        // its first 30%, where it clears the views, the rest after.
        let (slice, slices, from, width) = if round < EARLY_ROUNDS {
            (round, EARLY_ROUNDS, 0.0, 0.3)
        } else {
            (round - EARLY_ROUNDS, ROUNDS - EARLY_ROUNDS, 0.3, 0.7)
        };
        let within = (slice as f64 + (seed % 1000) as f64 / 1000.0) / slices as f64;
        let fraction = from + width * within;
        let after = whole.mul_f64(fraction);
        let finished = replay_killed_after(&data, after);
        killed += u64::from(!finished);
        println!("round {round}: killed after {after:?}: finished first: {finished}");
        assert_verifies(&data, &format!("after replay was killed at {after:?}"));
    }
    assert!(
        killed >= ROUNDS / 2,
        "only {killed} of {ROUNDS} replays were killed before they finished"
    );

    let out = sb(&data, &["replay", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_verifies(&data, "after the last replay");
    assert_eq!(
        sb(&data, &["costs", "--by", "model", "--json"]).stdout,
        costs,
        "costs after the kills and a last replay"
    );
}
