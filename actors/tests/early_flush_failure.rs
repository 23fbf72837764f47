//! A message acknowledged early (`ConversationMsg::SendEarly`) whose flush
//! fails: its `Durable` says so, with a coded error, the conversation
//! refuses from then on, and a restart finds only what was durable.
//!
//! Uses sled's failpoints, which are process-wide, so this file holds one
//! test and is a test binary of its own.

mod support;

use switchboard_actors::conversation::SendCommand;
use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
use switchboard_events::{Event, EventLog, OpenMode, StreamId};

fn command(message_id: &str) -> SendCommand {
    support::send_command(message_id, "key_1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_early_whose_flush_fails_is_never_durable() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    registry
        .send("c1", command("m1"))
        .await
        .expect("stored before the failure");

    // The next IO buffer sled writes (the flush's) fails.
    sled::fail::set("buffer write", 1);
    let (ack, durable) = registry
        .send_early("c1", command("m2"))
        .await
        .expect("answered once written");
    assert!(!ack.duplicate);
    let outcome = durable.wait().await;
    let error = outcome.expect_err("durable although its flush failed");
    assert_eq!(error.code(), "unavailable", "{error}");
    let after = registry.send("c1", command("m3")).await;
    assert_eq!(
        after.as_ref().err().map(|e| e.code()),
        Some("unavailable"),
        "{after:?}"
    );
    registry.shutdown().await;
    drop(registry);
    drop(log);
    sled::fail::reset();

    let log = EventLog::open(dir.path(), OpenMode::MustExist).expect("reopen the log");
    let stream = StreamId::conversation("c1").expect("a valid id");
    let messages: Vec<String> = log
        .read_stream(&stream, 1)
        .filter_map(|envelope| match envelope.expect("reads").event {
            Event::MessageReceived(m) => Some(m.message_id),
            _ => None,
        })
        .collect();
    assert_eq!(messages, ["m1"], "only what was durable is stored");
}
