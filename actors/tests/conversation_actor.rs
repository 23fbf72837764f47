//! Conversation actors and their registry against a real sled log: concurrent
//! sends, deduplication, passivation by cap and by idle time, bad ids, and
//! recovery after a restart.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_actors::conversation::SendCommand;
use switchboard_actors::conversation_actor::{Ack, ConversationRegistry, RegistryConfig};
use switchboard_events::{Envelope, Event, EventLog, OpenMode, StreamId};

/// A send from one of several clients; they share one API key, since only the
/// key that started a conversation may send into it.
fn command(sender: usize, message_id: &str) -> SendCommand {
    SendCommand {
        user: Some(format!("user_{sender}")),
        ..support::send_command(message_id, "key_shared")
    }
}

fn open(dir: &tempfile::TempDir) -> EventLog {
    EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log")
}

fn stream_of(log: &EventLog, conversation_id: &str) -> Vec<Envelope> {
    let stream = StreamId::conversation(conversation_id).expect("valid id");
    log.read_stream(&stream, 1)
        .map(|e| e.expect("decodes"))
        .collect()
}

/// Checks a stream's shape: `conversation_started` once, then per message a
/// `message_received` followed by its `agent_routed`. Returns the message ids
/// with the seq of their `message_received`, in stream order.
fn messages_in(log: &EventLog, conversation_id: &str) -> Vec<(String, u64)> {
    let stream = stream_of(log, conversation_id);
    assert!(
        matches!(
            stream.first().map(|e| &e.event),
            Some(Event::ConversationStarted(_))
        ),
        "{conversation_id} starts with conversation_started"
    );
    for (i, envelope) in stream.iter().enumerate() {
        assert_eq!(
            envelope.version,
            i as u64 + 1,
            "{conversation_id}: gapless versions"
        );
    }
    let rest = &stream[1..];
    assert_eq!(
        rest.len() % 2,
        0,
        "{conversation_id}: received/routed pairs"
    );
    rest.chunks(2)
        .map(|pair| match (&pair[0].event, &pair[1].event) {
            (Event::MessageReceived(received), Event::AgentRouted(routed)) => {
                assert_eq!(received.message_id, routed.message_id);
                assert_eq!(received.conversation_id, conversation_id);
                assert_eq!(
                    received.content,
                    format!("content of {}", received.message_id)
                );
                (received.message_id.clone(), pair[0].seq)
            }
            other => panic!("{conversation_id}: unexpected pair {other:?}"),
        })
        .collect()
}

/// Polls `condition` until it holds, for at most 10 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "{what} within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const CONVERSATIONS: usize = 50;
const SENDERS: usize = 50;
const PER_SENDER: usize = 20;

/// Sender `s`'s `k`-th message goes to one of five conversations, so every
/// conversation hears from five senders, interleaved.
fn target(sender: usize, k: usize) -> String {
    format!("c{:02}", (sender + k % 5) % CONVERSATIONS)
}

fn message_id(sender: usize, k: usize) -> String {
    format!("s{sender:02}-m{k:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_acked_once_in_order_and_resends_are_deduplicated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());

    let send_all = |resend: bool| {
        let mut tasks = tokio::task::JoinSet::new();
        for sender in 0..SENDERS {
            let registry = registry.clone();
            tasks.spawn(async move {
                let mut acks = Vec::with_capacity(PER_SENDER);
                for k in 0..PER_SENDER {
                    let (conversation, id) = (target(sender, k), message_id(sender, k));
                    let ack = registry
                        .send(&conversation, command(sender, &id))
                        .await
                        .unwrap_or_else(|e| {
                            panic!("{id} to {conversation} (resend {resend}): {e}")
                        });
                    assert_eq!(ack.conversation_id, conversation);
                    assert_eq!(ack.message_id, id);
                    assert_eq!(ack.duplicate, resend, "{id}");
                    acks.push(ack);
                }
                acks
            });
        }
        tasks
    };

    let mut acks: HashMap<String, Ack> = HashMap::new();
    let mut sends = send_all(false);
    while let Some(sent) = sends.join_next().await {
        for ack in sent.expect("sender task") {
            acks.insert(ack.message_id.clone(), ack);
        }
    }
    assert_eq!(acks.len(), SENDERS * PER_SENDER);
    let seqs: HashSet<u64> = acks.values().map(|a| a.seq).collect();
    assert_eq!(seqs.len(), acks.len(), "every ack has its own seq");

    let mut stored = 0;
    for c in 0..CONVERSATIONS {
        let conversation = format!("c{c:02}");
        let messages = messages_in(&log, &conversation);
        stored += messages.len();
        let mut last_k_of_sender: HashMap<usize, usize> = HashMap::new();
        for (id, seq) in messages {
            assert_eq!(
                acks[&id].seq, seq,
                "{id}: the ack names its message_received"
            );
            assert_eq!(acks[&id].conversation_id, conversation);
            let sender: usize = id[1..3].parse().expect("sender");
            let k: usize = id[5..].parse().expect("k");
            if let Some(previous) = last_k_of_sender.insert(sender, k) {
                assert!(
                    previous < k,
                    "{conversation}: sender {sender} in send order"
                );
            }
        }
    }
    assert_eq!(
        stored,
        SENDERS * PER_SENDER,
        "every message stored exactly once"
    );

    let head = log.head();
    let mut resends = send_all(true);
    while let Some(resent) = resends.join_next().await {
        for ack in resent.expect("resender task") {
            assert_eq!(ack.seq, acks[&ack.message_id].seq, "{}", ack.message_id);
        }
    }
    assert_eq!(log.head(), head, "resends append nothing");
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_cap_passivates_least_recently_used_actors_and_they_come_back_whole() {
    const MAX_LIVE: usize = 10;
    const TOTAL: usize = 100;
    const TASKS: usize = 8; // fewer than MAX_LIVE, so an idle actor can always go
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(
        log.clone(),
        RegistryConfig {
            max_live: MAX_LIVE,
            idle_passivate: Duration::from_secs(3600),
        },
    );

    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let registry = registry.clone();
        tasks.spawn(async move {
            let mine: Vec<String> = (task..TOTAL)
                .step_by(TASKS)
                .map(|c| format!("p{c:03}"))
                .collect();
            let sample = |registry: &ConversationRegistry| {
                let live = registry.live_count();
                assert!(live <= MAX_LIVE, "{live} live actors, cap {MAX_LIVE}");
            };
            let mut first_acks = Vec::new();
            for conversation in &mine {
                let ack = registry
                    .send(conversation, command(task, "a"))
                    .await
                    .expect("first send");
                assert!(!ack.duplicate);
                sample(&registry);
                first_acks.push(ack);
            }
            // By now most of these actors were passivated: each comes back from the log.
            for (conversation, first) in mine.iter().zip(&first_acks) {
                let second = registry
                    .send(conversation, command(task, "b"))
                    .await
                    .expect("second send");
                assert!(!second.duplicate && second.seq > first.seq);
                sample(&registry);
                let resent = registry
                    .send(conversation, command(task, "a"))
                    .await
                    .expect("resend");
                assert_eq!((resent.seq, resent.duplicate), (first.seq, true));
                sample(&registry);
            }
            first_acks
        });
    }
    let mut conversations = 0;
    while let Some(done) = tasks.join_next().await {
        conversations += done.expect("task").len();
    }
    assert_eq!(conversations, TOTAL);

    for c in 0..TOTAL {
        let conversation = format!("p{c:03}");
        let ids: Vec<String> = messages_in(&log, &conversation)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, ["a", "b"], "{conversation} intact");
    }
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actors_are_passivated_and_recover_their_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(
        log.clone(),
        RegistryConfig {
            max_live: 1000,
            idle_passivate: Duration::from_millis(200),
        },
    );
    let mut first = Vec::new();
    for c in 0..5 {
        let ack = registry
            .send(&format!("i{c}"), command(c, "m1"))
            .await
            .expect("send");
        first.push(ack);
    }
    eventually("every idle actor passivated", || registry.live_count() == 0).await;

    for (c, ack) in first.iter().enumerate() {
        let resent = registry
            .send(&format!("i{c}"), command(c, "m1"))
            .await
            .expect("resend");
        assert_eq!((resent.seq, resent.duplicate), (ack.seq, true));
        let next = registry
            .send(&format!("i{c}"), command(c, "m2"))
            .await
            .expect("next");
        assert!(!next.duplicate);
    }
    eventually("passivated again", || registry.live_count() == 0).await;
    registry.shutdown().await;
}

/// The same with tokio's paused clock: idleness is measured in tokio time, so
/// an hour of idleness passes without an hour of waiting.
#[tokio::test(start_paused = true)]
async fn idleness_is_measured_in_tokio_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(
        log.clone(),
        RegistryConfig {
            max_live: 1000,
            idle_passivate: Duration::from_secs(3600),
        },
    );
    let first = registry.send("t1", command(1, "m1")).await.expect("send");
    tokio::time::sleep(Duration::from_secs(3600 + 60)).await;
    for _ in 0..100 {
        if registry.live_count() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(registry.live_count(), 0, "passivated after an hour idle");
    let resent = registry.send("t1", command(1, "m1")).await.expect("resend");
    assert_eq!((resent.seq, resent.duplicate), (first.seq, true));
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_conversation_ids_are_refused_and_append_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    let too_long = "x".repeat(129);
    for id in [
        "",
        "a b",
        "a/b",
        "a.b",
        "a:b",
        "ü",
        "c1\n",
        too_long.as_str(),
    ] {
        let refused = registry
            .send(id, command(1, "m1"))
            .await
            .expect_err("invalid id");
        assert_eq!(refused.code(), "invalid_request", "{id:?}: {refused}");
    }
    let refused = registry
        .send("c1", command(1, ""))
        .await
        .expect_err("empty message id");
    assert_eq!(refused.code(), "invalid_request");
    assert_eq!(log.head(), 0, "nothing appended");
    assert_eq!(registry.live_count(), 0, "no actor spawned");

    let longest = "A-z_9".repeat(26)[..128].to_owned();
    let ack = registry
        .send(&longest, command(1, "m1"))
        .await
        .expect("128 characters are fine");
    assert_eq!(ack.conversation_id, longest);
    registry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_resends_get_their_first_acks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    let mut acks = Vec::new();
    for k in 0..30 {
        let conversation = format!("r{}", k % 3);
        let id = format!("m{k}");
        let ack = registry
            .send(&conversation, command(k, &id))
            .await
            .expect("send");
        acks.push((conversation, id, ack));
    }
    registry.shutdown().await;
    let refused = registry
        .send("r0", command(0, "late"))
        .await
        .expect_err("shut down");
    assert_eq!(refused.code(), "unavailable");
    let head = log.head();
    drop(registry);
    drop(log);

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen");
    let registry = Arc::new(ConversationRegistry::new(
        log.clone(),
        RegistryConfig::default(),
    ));
    for (k, (conversation, id, ack)) in acks.iter().enumerate() {
        let resent = registry
            .send(conversation, command(k, id))
            .await
            .expect("resend");
        assert_eq!(resent.seq, ack.seq, "{id}");
        assert!(resent.duplicate, "{id}");
    }
    assert_eq!(log.head(), head, "resends append nothing");
    for c in 0..3 {
        let conversation = format!("r{c}");
        let ack = registry
            .send(&conversation, command(c, "after-restart"))
            .await
            .expect("new message");
        assert!(!ack.duplicate);
        let ids: Vec<String> = messages_in(&log, &conversation)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids.len(), 11);
        assert_eq!(ids.last().map(String::as_str), Some("after-restart"));
    }
    registry.shutdown().await;
}

#[tokio::test]
async fn erasing_appends_one_conversation_erased_until_new_content_arrives() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open(&dir);
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    let unknown = registry
        .erase("nobody", "admin")
        .await
        .expect_err("nothing to erase");
    assert_eq!(unknown.code(), "not_found");

    registry.send("e1", command(0, "m1")).await.expect("acked");
    let first = registry.erase("e1", "admin").await.expect("erased");
    let seq = first.seq.expect("appended now");
    let again = registry.erase("e1", "admin").await.expect("answered");
    assert_eq!(again.seq, None, "nothing new to erase");

    // New content after the erasure can be erased in turn.
    registry.send("e1", command(0, "m2")).await.expect("acked");
    let later = registry.erase("e1", "admin").await.expect("erased");
    assert!(later.seq.expect("appended") > seq);

    let erasures: Vec<String> = stream_of(&log, "e1")
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ConversationErased(erased) => Some(erased.by),
            _ => None,
        })
        .collect();
    assert_eq!(erasures, ["admin", "admin"]);
    assert_eq!(
        registry
            .erase("bad.id", "admin")
            .await
            .expect_err("bad id")
            .code(),
        "invalid_request"
    );
    registry.shutdown().await;
}
