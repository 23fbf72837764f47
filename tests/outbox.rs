//! The outbox (DESIGN §6) against a real `nats-server`: stored events reach
//! their subjects in seq order with `Nats-Msg-Id`, a restarted outbox resumes
//! from its checkpoint, and a NATS restart under load leaves a JetStream
//! stream with exactly one message per (event, subject).

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use switchboard::bus::{
    subject, Bus, Headers, LocalBus, LocalBusConfig, Message, NatsBus, Subscription, NATS_MSG_ID,
};
use switchboard::outbox::{
    routes, spawn_front_feed, Delta, DeltaQueue, Outbox, OutboxHandle, TRUNCATED_HEADER,
};
use switchboard_events::catalog::{
    BudgetExceeded, BudgetPeriod, BudgetScope, ConversationErased, ConversationStarted, KeyRevoked,
    LimitKind, MessageReceived, RateLimited, UsageRecorded,
};
use switchboard_events::{
    Envelope, Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId,
};
use tempfile::TempDir;

use support::nats::NatsServer;

/// How long any one wait may take on a busy 2-core CI machine.
const WAIT: Duration = Duration::from_secs(20);
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// A bus on its own connection, connected.
async fn connect(server: &NatsServer) -> Bus {
    let bus = NatsBus::connect(&server.url())
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", server.url()));
    within("the connection", async {
        while !bus.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    bus.into()
}

/// A subscription that is in place on the server when this returns.
async fn subscribe(bus: &Bus, pattern: &str) -> Subscription {
    let subscription = bus.subscribe(pattern).await.expect("subscribe");
    bus.flush().await.expect("flush the subscription");
    subscription
}

async fn next(subscription: &mut Subscription) -> Message {
    within("a message", subscription.recv())
        .await
        .expect("the subscription is open")
}

fn open_log(dir: &TempDir) -> EventLog {
    EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log")
}

fn start(log: &EventLog, bus: &Bus) -> OutboxHandle {
    Outbox::start(log.clone(), bus.clone(), "sb").expect("start the outbox")
}

/// [`start`], publishing the deltas queued on `queue` too.
fn start_with_deltas(log: &EventLog, bus: &Bus, queue: &DeltaQueue) -> OutboxHandle {
    Outbox::new(log.clone(), bus.clone(), "sb")
        .with_deltas(queue.clone())
        .spawn()
        .expect("start the outbox")
}

async fn append(log: &EventLog, stream: StreamId, event: NewEvent) -> u64 {
    log.append(stream, ExpectedVersion::Any, vec![event])
        .await
        .expect("append")
        .last()
        .seq
}

async fn published(outbox: &OutboxHandle, seq: u64) {
    within("the outbox", outbox.wait_for(seq))
        .await
        .expect("the outbox runs");
}

fn conv(id: &str) -> StreamId {
    StreamId::conversation(id).expect("valid conversation id")
}

fn key(id: &str) -> StreamId {
    StreamId::key(id).expect("valid key id")
}

fn started(conversation_id: &str, key_id: &str) -> NewEvent {
    NewEvent::new(Event::ConversationStarted(ConversationStarted {
        conversation_id: conversation_id.into(),
        key_id: key_id.into(),
        user: None,
    }))
}

fn message(conversation_id: &str, n: u64) -> NewEvent {
    NewEvent::new(Event::MessageReceived(MessageReceived {
        conversation_id: conversation_id.into(),
        message_id: format!("m{n}"),
        key_id: "key_1".into(),
        user: None,
        content: format!("message {n}"),
        agent: None,
    }))
}

fn usage(conversation_id: &str, key_id: &str, n: u64) -> NewEvent {
    NewEvent::new(Event::UsageRecorded(UsageRecorded {
        conversation_id: conversation_id.into(),
        message_id: format!("m{n}"),
        key_id: key_id.into(),
        user: Some("alice".into()),
        agent: "echo".into(),
        model: "echo".into(),
        prompt_tokens: 3,
        completion_tokens: 5,
        estimated: true,
        input_price: 0,
        output_price: 0,
        cost_micros: 0,
    }))
}

fn rate_limited(key_id: &str) -> NewEvent {
    NewEvent::new(Event::RateLimited(RateLimited {
        key_id: key_id.into(),
        limit: LimitKind::Rpm,
        count: 2,
        retry_after_ms: 900,
    }))
}

fn budget_exceeded(scope: BudgetScope, subject_id: &str) -> NewEvent {
    NewEvent::new(Event::BudgetExceeded(BudgetExceeded {
        scope,
        subject_id: subject_id.into(),
        period: BudgetPeriod::Day,
        spent_micros: 101,
        budget_micros: 100,
    }))
}

fn every_event(log: &EventLog) -> Vec<Envelope> {
    log.read_from(1)
        .map(|envelope| envelope.expect("decodes"))
        .collect()
}

/// Receives the messages the outbox promises for `envelopes` on subjects
/// matching `pattern`, in seq order, and checks each.
async fn expect_in_order(subscription: &mut Subscription, envelopes: &[Envelope], pattern: &str) {
    for envelope in envelopes {
        for route in routes("sb", envelope) {
            if !subject::matches(pattern, &route.subject) {
                continue;
            }
            let message = next(subscription).await;
            assert_eq!(message.subject, route.subject, "seq {}", envelope.seq);
            assert_eq!(
                message.headers.get(NATS_MSG_ID),
                Some(route.msg_id.as_str())
            );
            assert_eq!(
                message.headers.get("Content-Type"),
                Some("application/json")
            );
            assert_eq!(
                message.headers.get("traceparent"),
                envelope.traceparent.as_deref()
            );
            let decoded: Envelope =
                serde_json::from_slice(&message.payload).expect("the body is an envelope");
            assert_eq!(&decoded, envelope);
        }
    }
}

#[tokio::test]
async fn stored_events_reach_their_subjects_in_seq_order() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    let client = connect(&server).await;
    let mut everything = subscribe(&client, "sb.>").await;

    // Some events before the outbox starts (catch-up), some after (live).
    let mut traced = message("c1", 1);
    traced.traceparent = Some(TRACEPARENT.into());
    append(&log, conv("c1"), started("c1", "key_1")).await;
    append(&log, conv("c1"), traced).await;
    append(&log, conv("c1"), usage("c1", "key_1", 1)).await;
    let outbox = start(&log, &bus);
    append(&log, key("key_1"), rate_limited("key_1")).await;
    append(
        &log,
        key("key_1"),
        budget_exceeded(BudgetScope::Key, "key_1"),
    )
    .await;
    append(
        &log,
        StreamId::system(),
        budget_exceeded(BudgetScope::User, "alice"),
    )
    .await;
    let erased = NewEvent::new(Event::ConversationErased(ConversationErased {
        conversation_id: "c1".into(),
        by: "admin".into(),
    }));
    let head = append(&log, conv("c1"), erased).await;
    published(&outbox, head).await;

    let envelopes = every_event(&log);
    let expected: Vec<String> = envelopes
        .iter()
        .flat_map(|envelope| routes("sb", envelope))
        .map(|route| route.subject)
        .collect();
    // The contract of DESIGN §6, spelled out rather than recomputed.
    assert_eq!(
        expected,
        [
            "sb.evt.conv.c1.conversation_started",
            "sb.evt.conv.c1.message_received",
            "sb.evt.usage.key_1",
            "sb.evt.conv.c1.usage_recorded",
            "sb.evt.audit.rate_limited",
            "sb.alert.rate_limit.key_1",
            "sb.evt.audit.budget_exceeded",
            "sb.alert.budget.key_1",
            "sb.evt.audit.budget_exceeded",
            "sb.alert.budget.user.alice",
            "sb.evt.conv.c1.conversation_erased",
            "sb.evt.audit.conversation_erased",
        ]
    );
    expect_in_order(&mut everything, &envelopes, "sb.>").await;
    assert_eq!(
        envelopes[0].id.to_string(),
        routes("sb", &envelopes[0])[0].msg_id
    );
    outbox.stop().await;
}

#[tokio::test]
async fn a_restarted_outbox_resumes_from_its_checkpoint() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    let client = connect(&server).await;

    for n in 1..=3 {
        append(&log, conv("c1"), message("c1", n)).await;
    }
    let outbox = start(&log, &bus);
    published(&outbox, 3).await;
    outbox.stop().await;

    let mut events = subscribe(&client, "sb.evt.>").await;
    for n in 4..=6 {
        append(&log, conv("c1"), message("c1", n)).await;
    }
    let outbox = start(&log, &bus);
    assert_eq!(outbox.published_through(), 3, "the checkpoint was kept");
    published(&outbox, 6).await;
    // Publishing is in seq order on one connection: had 1..=3 gone out again,
    // they would arrive before 4.
    let envelopes = every_event(&log);
    expect_in_order(&mut events, &envelopes[3..], "sb.evt.>").await;
    outbox.stop().await;
}

#[tokio::test]
async fn stop_publishes_what_is_already_in_the_log() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    let client = connect(&server).await;
    let mut events = subscribe(&client, "sb.evt.>").await;

    for n in 1..=50 {
        append(&log, conv("c1"), message("c1", n)).await;
    }
    start(&log, &bus).stop().await;
    expect_in_order(&mut events, &every_event(&log), "sb.evt.>").await;
    let again = start(&log, &bus);
    assert_eq!(again.published_through(), 50, "stop checkpointed the head");
    again.stop().await;
}

/// An event over the bus's maximum payload reaches subscribers as a stub
/// that says so and where it sits in the log; the events around it go out
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_big_for_the_bus_goes_out_as_a_stub() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus: Bus = LocalBus::with_config(LocalBusConfig {
        max_payload: 4096,
        ..LocalBusConfig::default()
    })
    .into();
    let mut subscription = subscribe(&bus, "sb.evt.conv.big.>").await;
    let outbox = start(&log, &bus);
    append(&log, conv("big"), started("big", "key_1")).await;
    let mut huge = message("big", 1);
    if let Event::MessageReceived(m) = &mut huge.event {
        m.content = "x".repeat(10_000);
    }
    let huge_seq = append(&log, conv("big"), huge).await;
    let last = append(&log, conv("big"), message("big", 2)).await;
    published(&outbox, last).await;

    let envelopes = every_event(&log);
    for envelope in &envelopes {
        let received = next(&mut subscription).await;
        let body: serde_json::Value = serde_json::from_slice(&received.payload).expect("JSON");
        assert_eq!(body["seq"], serde_json::json!(envelope.seq));
        assert_eq!(
            received.headers.get(NATS_MSG_ID),
            Some(envelope.id.to_string().as_str())
        );
        if envelope.seq == huge_seq {
            assert_eq!(received.headers.get(TRUNCATED_HEADER), Some("true"));
            assert_eq!(body["truncated"], serde_json::json!(true));
            assert_eq!(body["data"], serde_json::Value::Null);
            assert_eq!(body["type"], serde_json::json!("message_received"));
            assert!(
                body["size"].as_u64().is_some_and(|size| size > 10_000),
                "{body}"
            );
        } else {
            assert_eq!(received.headers.get(TRUNCATED_HEADER), None);
            assert_eq!(
                body,
                serde_json::from_str::<serde_json::Value>(&envelope.to_json()).expect("JSON")
            );
        }
    }
    outbox.stop().await;
}

#[tokio::test]
async fn the_front_feed_publishes_conversation_events_from_the_head_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    // Before the feed: not fed (a stream reads it from the log).
    append(&log, conv("c1"), started("c1", "key_1")).await;
    let front = Bus::from(LocalBus::new());
    let mut everything = subscribe(&front, "sb.>").await;
    let feed = spawn_front_feed(&log, front.clone(), "sb", DeltaQueue::new());
    // Not conversation events: not fed.
    append(&log, key("key_1"), rate_limited("key_1")).await;
    let usage_seq = append(&log, conv("c1"), usage("c1", "key_1", 1)).await;
    let message_seq = append(&log, conv("c1"), message("c1", 2)).await;
    let stored = every_event(&log);
    for (seq, subject) in [
        (usage_seq, "sb.evt.conv.c1.usage_recorded"),
        (message_seq, "sb.evt.conv.c1.message_received"),
    ] {
        let envelope = &stored[seq as usize - 1];
        let fed = next(&mut everything).await;
        assert_eq!(fed.subject, subject);
        let route = routes("sb", envelope)
            .into_iter()
            .find(|route| route.subject == subject)
            .expect("a conversation subject");
        assert_eq!(fed.headers.get(NATS_MSG_ID), Some(route.msg_id.as_str()));
        let body: serde_json::Value = serde_json::from_slice(&fed.payload).expect("JSON");
        assert_eq!(body["seq"], seq);
    }
    // Nothing else came.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), everything.recv())
            .await
            .is_err(),
        "only the conversation events after the head are fed"
    );
    feed.abort();
}

/// A reply delta of conversation c1 for the message at `message_seq`.
fn delta(message_seq: u64, text: &str) -> Delta {
    Delta {
        message_seq,
        subject: "sb.evt.conv.c1.reply_delta".to_owned(),
        headers: Headers::new(),
        payload: text.to_owned().into(),
    }
}

/// What `events` (following `sb.evt.conv.c1.>`) receives next: the event's
/// seq and type, or a delta's text.
async fn next_of_c1(events: &mut Subscription) -> String {
    let message = next(events).await;
    if message.subject.ends_with(".reply_delta") {
        return String::from_utf8(message.payload.to_vec()).expect("UTF-8");
    }
    let body: serde_json::Value = serde_json::from_slice(&message.payload).expect("JSON");
    format!("{} {}", body["seq"], body["type"].as_str().expect("a type"))
}

/// With a follower of `log` publishing the events of c1 and `queue`'s
/// deltas where `events` hears them: a delta goes out after its message,
/// whether queued before the message is stored or after it went out, and
/// before the next event.
async fn deltas_go_out_after_their_message_and_before_what_follows(
    log: &EventLog,
    events: &mut Subscription,
    queue: &DeltaQueue,
) {
    let head = log.head();
    assert!(queue.push(delta(head + 2, "early")), "queued");
    let first = append(log, conv("c1"), usage("c1", "key_1", 1)).await;
    let message = append(log, conv("c1"), message("c1", 2)).await;
    assert_eq!((first, message), (head + 1, head + 2));
    assert_eq!(
        next_of_c1(events).await,
        format!("{first} usage_recorded"),
        "the delta waits for its message"
    );
    assert_eq!(
        next_of_c1(events).await,
        format!("{message} message_received")
    );
    assert_eq!(next_of_c1(events).await, "early");
    // Queued while the follower waits for the log: out at once.
    assert!(queue.push(delta(message, "idle")));
    assert_eq!(next_of_c1(events).await, "idle");
    // Queued just before the next event: out before it.
    assert!(queue.push(delta(message, "last")));
    let after = append(log, conv("c1"), usage("c1", "key_1", 3)).await;
    assert_eq!(next_of_c1(events).await, "last");
    assert_eq!(next_of_c1(events).await, format!("{after} usage_recorded"));
    assert!(queue.is_empty());
}

/// A log and a queue of deltas for an outbox on a nats-server, and a
/// subscriber to c1's events there.
struct OnNats {
    log: EventLog,
    bus: Bus,
    events: Subscription,
    queue: DeltaQueue,
    _client: Bus,
    _dir: TempDir,
    _server: NatsServer,
}

async fn on_nats() -> OnNats {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let (bus, client) = (connect(&server).await, connect(&server).await);
    let events = subscribe(&client, "sb.evt.conv.c1.>").await;
    OnNats {
        log,
        bus,
        events,
        queue: DeltaQueue::new(),
        _client: client,
        _dir: dir,
        _server: server,
    }
}

#[tokio::test]
async fn the_outbox_publishes_each_queued_delta_after_its_message_and_before_what_follows() {
    let mut on = on_nats().await;
    let outbox = start_with_deltas(&on.log, &on.bus, &on.queue);
    deltas_go_out_after_their_message_and_before_what_follows(&on.log, &mut on.events, &on.queue)
        .await;
    outbox.stop().await;
}

/// Deltas queued while the outbox is away (here: not started yet, as at a
/// start-up behind the log) go out in their place once it catches up.
#[tokio::test]
async fn deltas_queued_while_the_outbox_is_behind_go_out_in_their_place_as_it_catches_up() {
    let mut on = on_nats().await;
    let (log, queue) = (&on.log, &on.queue);
    let first = append(log, conv("c1"), message("c1", 1)).await;
    let second = append(log, conv("c1"), message("c1", 2)).await;
    let after = append(log, conv("c1"), usage("c1", "key_1", 3)).await;
    for (seq, text) in [(second, "b1"), (first, "a1"), (second, "b2"), (first, "a2")] {
        assert!(queue.push(delta(seq, text)));
    }
    let outbox = start_with_deltas(log, &on.bus, queue);
    let mut heard = Vec::new();
    for _ in 0..7 {
        heard.push(next_of_c1(&mut on.events).await);
    }
    assert_eq!(
        heard,
        [
            format!("{first} message_received"),
            "a1".to_owned(),
            "a2".to_owned(),
            format!("{second} message_received"),
            "b1".to_owned(),
            "b2".to_owned(),
            format!("{after} usage_recorded"),
        ]
    );
    assert!(queue.is_empty());
    outbox.stop().await;
}

#[tokio::test]
async fn the_front_feed_publishes_each_queued_delta_after_its_message_and_before_what_follows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    append(&log, conv("c1"), started("c1", "key_1")).await;
    let front = Bus::from(LocalBus::new());
    let mut events = subscribe(&front, "sb.evt.conv.c1.>").await;
    let queue = DeltaQueue::new();
    let feed = spawn_front_feed(&log, front, "sb", queue.clone());
    deltas_go_out_after_their_message_and_before_what_follows(&log, &mut events, &queue).await;
    feed.abort();
}

#[tokio::test]
async fn ids_that_are_not_subject_tokens_are_encoded() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    let client = connect(&server).await;
    let mut everything = subscribe(&client, "sb.>").await;

    // Stream names allow '.', and event data is free text.
    append(&log, conv("c.1"), started("c.1 *>", "team.alpha")).await;
    append(&log, conv("empty"), started("", "key_1")).await;
    append(&log, key("team.alpha"), usage("c.1", "team.alpha", 1)).await;
    append(&log, key("team.alpha"), rate_limited("team.alpha")).await;
    append(
        &log,
        StreamId::system(),
        budget_exceeded(BudgetScope::User, "bob@example.com"),
    )
    .await;
    let revoked = NewEvent::new(Event::KeyRevoked(KeyRevoked {
        key_id: "team.alpha".into(),
        by: "admin".into(),
        reason: None,
    }));
    append(&log, key("team.alpha"), revoked).await;
    let head = append(&log, conv("c2"), started("c2", "key_1")).await;
    let outbox = start(&log, &bus);
    published(&outbox, head).await;

    let mut received = Vec::new();
    for _ in 0..9 {
        let message = next(&mut everything).await;
        assert_eq!(subject::validate_subject(&message.subject), Ok(()));
        received.push(message.subject);
    }
    assert_eq!(
        received,
        [
            "sb.evt.conv.c%2E1%20%2A%3E.conversation_started",
            "sb.evt.conv.%.conversation_started",
            "sb.evt.usage.team%2Ealpha",
            "sb.evt.conv.c%2E1.usage_recorded",
            "sb.evt.audit.rate_limited",
            "sb.alert.rate_limit.team%2Ealpha",
            "sb.evt.audit.budget_exceeded",
            "sb.alert.budget.user.bob@example%2Ecom",
            "sb.evt.audit.key_revoked",
        ]
    );
    // Nothing was held up by them.
    let last = next(&mut everything).await;
    assert_eq!(last.subject, "sb.evt.conv.c2.conversation_started");
    outbox.stop().await;
}

/// A JetStream stream `SB_EVT` capturing `sb.evt.>`, deduplicating by
/// `Nats-Msg-Id` over 10 minutes.
async fn event_stream(server: &NatsServer) -> jetstream::stream::Stream {
    let client = async_nats::connect(server.url())
        .await
        .expect("connect the JetStream client");
    jetstream::new(client)
        .create_stream(jetstream::stream::Config {
            name: "SB_EVT".into(),
            subjects: vec!["sb.evt.>".into()],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .expect("create the stream")
}

fn confirmed_by_stream(log: &EventLog, bus: &Bus) -> OutboxHandle {
    Outbox::new(log.clone(), bus.clone(), "sb")
        .confirm_with_jetstream("sb.evt.>")
        .expect("a valid pattern")
        .spawn()
        .expect("start the outbox")
}

/// Asserts the stream holds exactly one message per (event, `sb.evt.`
/// subject) of the log: nothing lost, nothing twice.
async fn assert_stream_holds_the_log(stream: &mut jetstream::stream::Stream, log: &EventLog) {
    let expected: HashSet<String> = every_event(log)
        .iter()
        .flat_map(|envelope| routes("sb", envelope))
        .filter(|route| route.subject.starts_with("sb.evt."))
        .map(|route| route.msg_id)
        .collect();
    let state = within("the stream's info", async {
        loop {
            match stream.info().await {
                Ok(info) => break info.state.clone(),
                // Right after a restart, JetStream may not answer yet.
                Err(error) => {
                    eprintln!("stream info: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    let mut stored = HashSet::new();
    for sequence in state.first_sequence..=state.last_sequence {
        let message = within("a stored message", stream.get_raw_message(sequence))
            .await
            .expect("read a stored message");
        let id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap_or_else(|| panic!("a stored message has an id: {message:?}"))
            .to_string();
        assert!(stored.insert(id.clone()), "{id} stored twice");
    }
    // Each missing id with its event's seq, to see where in the run it was.
    let missing: Vec<String> = expected
        .difference(&stored)
        .map(|id| {
            let event_id = id.split(':').next().unwrap_or(id);
            let seq = event_id
                .parse()
                .ok()
                .and_then(|uuid| log.seq_of(&uuid).ok().flatten());
            format!("{id} (seq {seq:?})")
        })
        .collect();
    let extra: Vec<_> = stored.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "log head {}; missing from the stream: {missing:?}; unexpected: {extra:?}",
        log.head()
    );
    assert_eq!(state.messages, expected.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_while_nats_is_away_are_published_when_it_is_back() {
    let mut server = NatsServer::start();
    let mut stream = event_stream(&server).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    tokio::task::block_in_place(|| server.stop());

    for n in 1..=10 {
        append(&log, conv("c1"), message("c1", n)).await;
    }
    let outbox = confirmed_by_stream(&log, &bus);
    assert_eq!(outbox.published_through(), 0);
    // Stopping cannot publish anything, and gives up rather than hang.
    within("a stop while NATS is away", outbox.stop()).await;

    let outbox = confirmed_by_stream(&log, &bus);
    assert_eq!(outbox.published_through(), 0, "nothing was checkpointed");
    tokio::task::block_in_place(|| server.restart());
    published(&outbox, 10).await;
    outbox.stop().await;
    assert_stream_holds_the_log(&mut stream, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_load_loses_and_duplicates_nothing() {
    let mut server = NatsServer::start();
    let mut stream = event_stream(&server).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = open_log(&dir);
    let bus = connect(&server).await;
    let outbox = confirmed_by_stream(&log, &bus);

    let appending = Arc::new(AtomicBool::new(true));
    let appender = {
        let (log, appending) = (log.clone(), appending.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while appending.load(Ordering::Relaxed) {
                n += 1;
                let conversation = format!("c{}", n % 4);
                let event = match n % 5 {
                    0 => usage(&conversation, "key_1", n),
                    _ => message(&conversation, n),
                };
                append(&log, conv(&conversation), event).await;
            }
        })
    };

    published(&outbox, 20).await;
    tokio::task::block_in_place(|| server.restart());
    // The outbox is back on its feet well after the restart.
    published(&outbox, log.head() + 50).await;
    appending.store(false, Ordering::Relaxed);
    within("the appender", appender)
        .await
        .expect("the appender ends");
    published(&outbox, log.head()).await;
    outbox.stop().await;
    assert_stream_holds_the_log(&mut stream, &log).await;
}
