//! The turn coordinator over a real sled log, the echo agent and an OpenAI
//! agent against the fake server: every acknowledged message ends with one
//! reply event in its stream, written by the conversation's actor.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use serde_json::{json, Value};
use switchboard_actors::agent::{Agent, AgentActor, AgentConfig, AgentMsg};
use switchboard_actors::conversation::{ConversationState, SendCommand, SendPlan};
use switchboard_actors::conversation_actor::{ConversationRegistry, RegistryConfig};
use switchboard_actors::provider::{
    messages_tokens, ChatMessage, EchoProvider, OpenAiProvider, Provider, Role,
};
use switchboard_actors::router::Router;
use switchboard_actors::turns::{SendInput, TurnCoordinator, LOST_TURN_CODE};
use switchboard_events::{Envelope, Event, EventLog, OpenMode, StreamId};
use tempfile::TempDir;
use tokio::sync::mpsc;

use support::fake_openai::{Behaviour, FakeOpenAi, REPLY};

struct Harness {
    _dir: TempDir,
    log: EventLog,
    registry: ConversationRegistry,
    turns: TurnCoordinator,
}

impl Harness {
    async fn shutdown(self) {
        self.turns.drain().await;
        self.registry.shutdown().await;
    }

    fn stream(&self, conversation_id: &str) -> Vec<Envelope> {
        stream(&self.log, conversation_id)
    }
}

fn stream(log: &EventLog, conversation_id: &str) -> Vec<Envelope> {
    let stream = StreamId::conversation(conversation_id).expect("valid id");
    log.read_stream(&stream, 1)
        .map(|e| e.expect("decodes"))
        .collect()
}

fn types(events: &[Envelope]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.type_name()).collect()
}

async fn spawn_agent(name: &str, provider: Arc<dyn Provider>) -> ActorRef<AgentMsg> {
    let config = AgentConfig {
        max_retries: 1,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(5),
        timeout: Duration::from_secs(30),
        circuit_failure_threshold: 1_000,
        ..AgentConfig::new(name)
    };
    let (actor, _) = Actor::spawn(None, AgentActor, Arc::new(Agent::new(config, provider)))
        .await
        .expect("the agent starts");
    actor
}

/// `echo` by default; `assistant` (the fake, if given) for messages that
/// mention "assistant" or name it.
async fn harness(fake: Option<&FakeOpenAi>) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
    harness_on(dir, log, fake).await
}

async fn harness_on(dir: TempDir, log: EventLog, fake: Option<&FakeOpenAi>) -> Harness {
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    let mut agents = HashMap::new();
    agents.insert(
        "echo".to_owned(),
        // Paced, so its words arrive apart and stream one by one.
        spawn_agent(
            "echo",
            Arc::new(EchoProvider::with_word_delay(Duration::from_millis(5))),
        )
        .await,
    );
    let mut rules = Vec::new();
    if let Some(fake) = fake {
        let provider = OpenAiProvider::new(&fake.base_url(), "gpt-4o-mini", None).expect("valid");
        agents.insert(
            "assistant".to_owned(),
            spawn_agent("assistant", Arc::new(provider)).await,
        );
        rules.push((r"(?i)\bassistant\b".to_owned(), "assistant".to_owned()));
    }
    let router = Router::new(rules, "echo").expect("valid rules");
    let turns =
        TurnCoordinator::new(registry.clone(), router, agents, log.clone()).expect("agents known");
    Harness {
        _dir: dir,
        log,
        registry,
        turns,
    }
}

fn input(content: &str) -> SendInput {
    SendInput {
        key_id: "key_1".into(),
        user: Some("ada".into()),
        content: content.into(),
        ..SendInput::default()
    }
}

fn reply_events<'a>(events: &'a [Envelope], message_id: &str) -> Vec<&'a Envelope> {
    events
        .iter()
        .filter(|e| match &e.event {
            Event::ReplyCompleted(r) => r.message_id == message_id,
            Event::ReplyFailed(r) => r.message_id == message_id,
            _ => false,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_echo_is_acked_streamed_and_answered_in_its_stream() {
    let h = harness(None).await;
    let (deltas, mut received) = mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(delta) = received.recv().await {
            all.push(delta);
        }
        all
    });
    let mut send = input("hello there world");
    send.deltas = Some(deltas);
    let ack = h.turns.send("c1", send).await.expect("acked");
    assert!(!ack.duplicate);
    assert!(
        uuid::Uuid::parse_str(&ack.message_id).is_ok(),
        "a generated UUID"
    );
    h.turns.wait_idle().await;

    let events = h.stream("c1");
    assert_eq!(
        types(&events),
        [
            "conversation_started",
            "message_received",
            "agent_routed",
            "reply_completed",
            "usage_recorded"
        ]
    );
    assert_eq!(events[1].seq, ack.seq);
    let Event::ReplyCompleted(reply) = &events[3].event else {
        unreachable!()
    };
    assert_eq!(reply.content, "echo: hello there world");
    assert_eq!(reply.message_id, ack.message_id);
    assert_eq!(
        events[3].causation_id,
        Some(events[2].id),
        "caused by agent_routed"
    );

    let deltas = collector.await.expect("collector");
    assert!(deltas.len() > 1, "streamed word by word: {deltas:?}");
    for (i, delta) in deltas.iter().enumerate() {
        assert_eq!(delta.index, i as u64);
        assert_eq!(delta.reply_id, reply.reply_id);
        assert_eq!(
            (delta.conversation_id.as_str(), delta.message_id.as_str()),
            ("c1", ack.message_id.as_str())
        );
    }
    let streamed: String = deltas.iter().map(|d| d.delta.as_str()).collect();
    assert_eq!(streamed, reply.content);
    assert_eq!(
        h.turns.context("c1").await.expect("context"),
        [
            switchboard_actors::provider::ChatMessage::user("hello there world"),
            switchboard_actors::provider::ChatMessage::assistant("echo: hello there world"),
        ]
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_over_many_conversations_each_get_exactly_one_reply() {
    let h = harness(None).await;
    let mut sends = Vec::new();
    for n in 0..200 {
        let turns = h.turns.clone();
        sends.push(tokio::spawn(async move {
            let mut send = input(&format!("message {n}"));
            send.message_id = Some(format!("m{n}"));
            turns.send(&format!("c{}", n % 20), send).await
        }));
    }
    for send in sends {
        let ack = send.await.expect("no panic").expect("acked");
        assert!(!ack.duplicate);
    }
    h.turns.wait_idle().await;
    for c in 0..20 {
        let events = h.stream(&format!("c{c}"));
        for n in (c..200).step_by(20) {
            let replies = reply_events(&events, &format!("m{n}"));
            assert_eq!(replies.len(), 1, "m{n} in c{c}");
            let Event::ReplyCompleted(reply) = &replies[0].event else {
                panic!("m{n} failed: {:?}", replies[0].event);
            };
            assert_eq!(reply.content, format!("echo: message {n}"));
        }
        let usage = events
            .iter()
            .filter(|e| matches!(e.event, Event::UsageRecorded(_)))
            .count();
        assert_eq!(usage, 10);
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_is_a_duplicate_and_starts_no_second_turn() {
    let h = harness(None).await;
    let send = || SendInput {
        message_id: Some("m1".into()),
        ..input("once only")
    };
    let first = h.turns.send("c1", send()).await.expect("acked");
    // Once while the first turn may still run, once after it ended.
    let again = h.turns.send("c1", send()).await.expect("acked");
    h.turns.wait_idle().await;
    let after = h.turns.send("c1", send()).await.expect("acked");
    h.turns.wait_idle().await;
    for ack in [&again, &after] {
        assert_eq!((ack.seq, ack.duplicate), (first.seq, true));
    }
    let events = h.stream("c1");
    assert_eq!(reply_events(&events, "m1").len(), 1);
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == "usage_recorded")
            .count(),
        1
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_routing_to_a_failing_model_ends_the_turn_with_reply_failed() {
    let fake = FakeOpenAi::start(Behaviour::ServerError).await;
    let h = harness(Some(&fake)).await;
    let ack = h
        .turns
        .send("c1", input("ask the assistant"))
        .await
        .expect("acked");
    h.turns.wait_idle().await;
    let events = h.stream("c1");
    assert_eq!(
        types(&events),
        [
            "conversation_started",
            "message_received",
            "agent_routed",
            "reply_failed"
        ]
    );
    let Event::AgentRouted(routed) = &events[2].event else {
        unreachable!()
    };
    assert_eq!(routed.agent, "assistant");
    assert!(routed.rule.is_some());
    let Event::ReplyFailed(failed) = &events[3].event else {
        unreachable!()
    };
    assert_eq!(
        (
            failed.message_id.as_str(),
            failed.agent.as_str(),
            failed.code.as_str()
        ),
        (ack.message_id.as_str(), "assistant", "upstream")
    );
    assert_eq!(fake.request_count(), 2, "one retry");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_agent_is_an_invalid_request_and_stores_nothing() {
    let h = harness(None).await;
    let mut send = input("hi");
    send.agent = Some("nobody".into());
    let refused = h.turns.send("c1", send).await.expect_err("unknown agent");
    assert_eq!(refused.code(), "invalid_request");
    assert!(refused.message().contains("nobody"), "{refused}");
    let refused = h
        .turns
        .send("bad id!", input("hi"))
        .await
        .expect_err("bad id");
    assert_eq!(refused.code(), "invalid_request");
    assert_eq!(h.log.head(), 0, "nothing appended");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_turn_carries_the_first_exchange_as_context() {
    // The second turn fails (500 twice: the first try and its retry).
    let fake = FakeOpenAi::start_script(vec![
        Behaviour::Normal,
        Behaviour::ServerError,
        Behaviour::ServerError,
        Behaviour::Normal,
    ])
    .await;
    let h = harness(Some(&fake)).await;
    for content in ["Hi assistant, what is 2+2?", "this one fails", "and 3+3?"] {
        let mut send = input(content);
        send.agent = Some("assistant".into());
        h.turns.send("c1", send).await.expect("acked");
        h.turns.wait_idle().await;
    }

    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(
        requests[0].body["messages"],
        json!([{"role": "user", "content": "Hi assistant, what is 2+2?"}])
    );
    // The failed turn is left out of the context.
    assert_eq!(
        requests[3].body["messages"],
        json!([
            {"role": "user", "content": "Hi assistant, what is 2+2?"},
            {"role": "assistant", "content": REPLY.concat()},
            {"role": "user", "content": "and 3+3?"},
        ])
    );
    let events = h.stream("c1");
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == "reply_completed")
            .count(),
        2
    );
    h.shutdown().await;
}

/// A send answered early (`send_early`) starts its turn before its message
/// is durable. Publishing held back, the message is written but not in the
/// log anyone reads; with the context cache forgotten, the turn must wait
/// until the message is durable to read its context, and must not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_started_before_its_message_is_durable_reads_its_context_once_it_is() {
    let fake = FakeOpenAi::start_script(vec![Behaviour::Normal, Behaviour::Normal]).await;
    let h = harness(Some(&fake)).await;
    let mut first = input("Hi assistant, one");
    first.agent = Some("assistant".into());
    h.turns.send("c1", first).await.expect("acked");
    h.turns.wait_idle().await;

    let held = h.log.hold_publishing();
    let mut second = input("and two");
    second.agent = Some("assistant".into());
    let (ack, turn, durable) = h
        .turns
        .send_early("c1", second)
        .await
        .expect("answered once written");
    assert!(!ack.duplicate);
    h.turns.keep_context(16);
    turn.start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = tokio::spawn(durable.clone().wait());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "durable while publishing was held");
    assert_eq!(
        fake.requests().len(),
        1,
        "the model asked without the message"
    );
    assert_eq!(h.stream("c1").len(), 5, "readable before it was durable");
    drop(held);
    durable.wait().await.expect("durable");
    h.turns.wait_idle().await;

    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "the second turn asked the model");
    assert_eq!(
        requests[1].body["messages"],
        json!([
            {"role": "user", "content": "Hi assistant, one"},
            {"role": "assistant", "content": REPLY.concat()},
            {"role": "user", "content": "and two"},
        ])
    );
    let events = h.stream("c1");
    let ends = reply_events(&events, &ack.message_id);
    assert_eq!(ends.len(), 1, "{:?}", types(&events));
    assert!(matches!(ends[0].event, Event::ReplyCompleted(_)));
    assert!(ends[0].seq > ack.seq);
    assert!(
        matches!(events.iter().find(|e| e.seq == ack.seq).map(|e| &e.event),
        Some(Event::MessageReceived(m)) if m.message_id == ack.message_id)
    );

    // A resend is answered as a duplicate, durable already, with no turn.
    let mut again = input("and two");
    again.message_id = Some(ack.message_id.clone());
    let (resent, turn, durable) = h.turns.send_early("c1", again).await.expect("acked");
    assert!(resent.duplicate);
    assert_eq!(resent.seq, ack.seq);
    drop(turn);
    durable.wait().await.expect("durable");
    h.turns.wait_idle().await;
    assert_eq!(fake.requests().len(), 2);
    h.shutdown().await;
}

/// An agent's name, and what it changes of the default config.
type NamedConfig<'a> = (&'a str, fn(&mut AgentConfig));

/// What the fake OpenAI server (as `model`) is sent when a conversation says
/// "one", "two" and "three" to the first of two agents, then "four" to the
/// second (each agent's defaults changed by its function); and how many
/// replies the conversation holds then.
async fn contexts_sent(model: &str, agents: [NamedConfig<'_>; 2]) -> (Vec<Value>, usize) {
    let fake = FakeOpenAi::start(Behaviour::Normal).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
    let registry = ConversationRegistry::new(log.clone(), RegistryConfig::default());
    let mut actors = HashMap::new();
    for (name, configure) in agents {
        let provider = OpenAiProvider::new(&fake.base_url(), model, None).expect("valid");
        let mut config = AgentConfig::new(name);
        configure(&mut config);
        let (actor, _) = Actor::spawn(
            None,
            AgentActor,
            Arc::new(Agent::new(config, Arc::new(provider))),
        )
        .await
        .expect("the agent starts");
        actors.insert(name.to_owned(), actor);
    }
    let router = Router::new(Vec::new(), agents[0].0).expect("valid rules");
    let turns =
        TurnCoordinator::new(registry.clone(), router, actors, log.clone()).expect("agents known");
    for content in ["one", "two", "three"] {
        turns.send("c1", input(content)).await.expect("acked");
        turns.wait_idle().await;
    }
    let mut last = input("four");
    last.agent = Some(agents[1].0.into());
    turns.send("c1", last).await.expect("acked");
    turns.wait_idle().await;

    let sent = fake
        .requests()
        .iter()
        .map(|r| r.body["messages"].clone())
        .collect();
    let replies = stream(&log, "c1")
        .iter()
        .filter(|e| matches!(e.event, Event::ReplyCompleted(_)))
        .count();
    turns.drain().await;
    registry.shutdown().await;
    (sent, replies)
}

/// The four requests of [`contexts_sent`] when the first agent keeps the
/// newest exchange and the second none.
fn newest_exchange_then_none() -> Vec<Value> {
    let reply = REPLY.concat();
    vec![
        json!([{"role": "user", "content": "one"}]),
        json!([
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "two"},
        ]),
        json!([
            {"role": "user", "content": "two"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "three"},
        ]),
        json!([{"role": "user", "content": "four"}]),
    ]
}

/// An agent with `context_messages` 2 sends the model the last exchange and
/// the message; one with 0, the message alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_is_the_newest_exchanges_the_agent_allows() {
    let (sent, replies) = contexts_sent(
        "gpt-4o-mini",
        [
            ("short", |config| config.context_messages = 2),
            ("none", |config| config.context_messages = 0),
        ],
    )
    .await;
    assert_eq!(sent, newest_exchange_then_none());
    // The conversation itself keeps everything.
    assert_eq!(replies, 4);
}

/// `context_tokens` trims further than `context_messages`: of the allowed
/// exchanges, the newest whole ones whose tokens fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_is_the_newest_exchanges_within_the_agents_tokens() {
    const MODEL: &str = "gpt-4o-mini";
    // What an exchange's two messages cost, as the agent counts them.
    fn exchange(user: &str) -> u64 {
        let messages = [
            ChatMessage::new(Role::User, user),
            ChatMessage::new(Role::Assistant, REPLY.concat()),
        ];
        messages_tokens(MODEL, &messages)
    }
    let (sent, _) = contexts_sent(
        MODEL,
        [
            // Room for the newest of two exchanges, not for both.
            ("tight", |config| {
                config.context_tokens = Some(exchange("one") + exchange("two") - 1)
            }),
            ("zero", |config| config.context_tokens = Some(0)),
        ],
    )
    .await;
    assert_eq!(sent, newest_exchange_then_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_turn_is_never_taken_for_a_lost_one() {
    let h = harness(None).await;
    // Remembering one conversation only, the coordinator looks at c1 again
    // while its turn runs (echo paces its 60 words, 5 ms apart).
    h.turns.remember_recovered(1);
    let long = vec!["word"; 60].join(" ");
    let running = h.turns.send("c1", input(&long)).await.expect("acked");
    h.turns.send("c2", input("hi")).await.expect("acked");
    assert_eq!(h.turns.finish_pending("c1").await.expect("looked"), 0);
    h.turns.wait_idle().await;
    let events = h.stream("c1");
    let ends = reply_events(&events, &running.message_id);
    assert_eq!(
        types(&ends.into_iter().cloned().collect::<Vec<_>>()),
        ["reply_completed"]
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_lost_in_a_crash_are_failed_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
    // What a process that died after the ack leaves behind: two messages, no replies.
    let stream_id = StreamId::conversation("c1").expect("valid");
    for message_id in ["m1", "m2"] {
        let state = ConversationState::recover("c1", stream(&log, "c1"));
        let SendPlan::Append { expected, events } = state.plan_send(&SendCommand {
            message_id: message_id.into(),
            key_id: "key_1".into(),
            user: None,
            content: format!("lost {message_id}"),
            requested_agent: None,
            agent: "echo".into(),
            rule: None,
            correlation_id: None,
            traceparent: None,
        }) else {
            panic!("new message");
        };
        log.append(stream_id.clone(), expected, events)
            .await
            .expect("append");
    }

    let h = harness_on(dir, log, None).await;
    // One conversation that cannot be looked at (listed first, it fails at
    // once) does not keep the others' lost turns open.
    let failed = h
        .turns
        .finish_all_pending(["bad.id".to_owned(), "c1".to_owned(), "c2".to_owned()])
        .await
        .expect_err("bad.id cannot be recovered");
    assert_eq!(failed.code(), "invalid_request", "{failed}");
    let ended = h
        .turns
        .finish_all_pending(["c1".to_owned(), "c2".to_owned()])
        .await
        .expect("recovered");
    assert_eq!(ended, 0, "the first pass ended them");
    assert_eq!(h.turns.finish_pending("c1").await.expect("again"), 0);
    let events = h.stream("c1");
    for message_id in ["m1", "m2"] {
        let replies = reply_events(&events, message_id);
        assert_eq!(replies.len(), 1, "{message_id}");
        let Event::ReplyFailed(failed) = &replies[0].event else {
            panic!("expected reply_failed: {:?}", replies[0].event);
        };
        assert_eq!(
            (failed.code.as_str(), failed.agent.as_str()),
            (LOST_TURN_CODE, "echo")
        );
    }
    // A new message after recovery runs normally; the lost ones stay failed.
    let ack = h.turns.send("c1", input("fresh")).await.expect("acked");
    h.turns.wait_idle().await;
    let events = h.stream("c1");
    assert_eq!(reply_events(&events, &ack.message_id).len(), 1);
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == "reply_failed")
            .count(),
        2
    );

    // A second coordinator over the same log (another start) finds nothing to fail.
    let h2 = {
        let registry = ConversationRegistry::new(h.log.clone(), RegistryConfig::default());
        let agents = HashMap::from([(
            "echo".to_owned(),
            spawn_agent("echo", Arc::new(EchoProvider::new())).await,
        )]);
        let router = Router::new(vec![], "echo").expect("valid");
        (
            TurnCoordinator::new(registry.clone(), router, agents, h.log.clone()).expect("known"),
            registry,
        )
    };
    assert_eq!(h2.0.finish_pending("c1").await.expect("recovered"), 0);
    h2.1.shutdown().await;
    assert_eq!(h.stream("c1").len(), events.len());
    h.shutdown().await;
}
