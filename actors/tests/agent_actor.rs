//! The agent actor against the echo provider and a fake OpenAI-compatible
//! server over real HTTP: every turn ends in `reply_completed` (with
//! `usage_recorded`) or `reply_failed`, transient errors are retried, the
//! circuit opens and fails fast, and the concurrency cap holds.
//!
//! Backoffs are a millisecond or so; nothing asserts how long anything took.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ractor::{Actor, ActorRef};
use switchboard_actors::agent::circuit::{CircuitState, CircuitTransition};
use switchboard_actors::agent::{
    request_turn, Agent, AgentActor, AgentConfig, AgentMsg, CircuitAlert, Price, TurnOutcome,
    TurnRequest,
};
use switchboard_actors::provider::{
    echo_usage, estimate_usage, ChatMessage, Completion, CompletionRequest, EchoProvider,
    OpenAiProvider, Provider, ProviderError, Usage,
};
use switchboard_events::Event;
use tokio::sync::mpsc;
use uuid::Uuid;

use support::fake_openai::{Behaviour, FakeOpenAi, REPLY, USAGE};

const MODEL: &str = "gpt-4o-mini";
/// gpt-4o's list price: $2.50 in, $10.00 out per million tokens.
const GPT_4O: Price = Price::new(2_500_000, 10_000_000);

/// Fast retries, a generous timeout, a circuit that does not get in the way.
fn config(name: &str) -> AgentConfig {
    AgentConfig {
        max_retries: 2,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(500),
        timeout: Duration::from_secs(30),
        circuit_failure_threshold: 100,
        prices: GPT_4O,
        ..AgentConfig::new(name)
    }
}

fn history() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are terse."),
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And of Italy?"),
    ]
}

fn request(message_id: &str) -> TurnRequest {
    let mut request = TurnRequest::new("c1", message_id, "key_1", history());
    request.user = Some("ada".into());
    request
}

fn openai(fake: &FakeOpenAi) -> Arc<dyn Provider> {
    Arc::new(OpenAiProvider::new(&fake.base_url(), MODEL, None).expect("valid config"))
}

struct Spawned {
    actor: ActorRef<AgentMsg>,
    alerts: mpsc::UnboundedReceiver<CircuitAlert>,
}

async fn spawn(config: AgentConfig, provider: Arc<dyn Provider>) -> Spawned {
    let (alerts_tx, alerts) = mpsc::unbounded_channel();
    let agent = Agent::new(config, provider).with_alerts(alerts_tx);
    let (actor, _) = Actor::spawn(None, AgentActor, Arc::new(agent))
        .await
        .expect("the agent actor starts");
    Spawned { actor, alerts }
}

async fn turn(actor: &ActorRef<AgentMsg>, request: TurnRequest) -> TurnOutcome {
    request_turn(actor, "assistant", request).await
}

/// Run a turn while collecting the deltas it streams.
async fn turn_streaming(
    actor: &ActorRef<AgentMsg>,
    mut request: TurnRequest,
) -> (TurnOutcome, String) {
    let (deltas, mut received) = mpsc::channel(2);
    request.deltas = Some(deltas);
    let collector = tokio::spawn(async move {
        let mut all = String::new();
        while let Some(delta) = received.recv().await {
            all.push_str(&delta);
        }
        all
    });
    let outcome = turn(actor, request).await;
    let streamed = collector.await.expect("the collector does not panic");
    (outcome, streamed)
}

async fn circuit(actor: &ActorRef<AgentMsg>) -> CircuitState {
    match actor
        .call(AgentMsg::Circuit, None)
        .await
        .expect("the agent runs")
    {
        ractor::rpc::CallResult::Success(state) => state,
        other => panic!("no circuit state: {other:?}"),
    }
}

fn type_names(outcome: &TurnOutcome) -> Vec<&'static str> {
    outcome.events.iter().map(|e| e.event.type_name()).collect()
}

fn failure_code(outcome: &TurnOutcome) -> &str {
    &outcome
        .failed()
        .unwrap_or_else(|| panic!("the turn failed: {outcome:?}"))
        .code
}

fn transitions(alerts: &mut mpsc::UnboundedReceiver<CircuitAlert>) -> Vec<CircuitTransition> {
    let mut all = Vec::new();
    while let Ok(alert) = alerts.try_recv() {
        assert_eq!(alert.agent, "assistant");
        all.push(alert.transition);
    }
    all
}

#[tokio::test]
async fn echo_turn_completes_with_counted_usage_and_its_context() {
    let prices = Price::new(150_000, 600_000);
    let agent = spawn(
        AgentConfig {
            prices,
            ..config("echo")
        },
        Arc::new(EchoProvider::new()),
    )
    .await;
    let mut request = request("m1");
    let correlation = Uuid::now_v7();
    let causation = Uuid::now_v7();
    request.correlation_id = Some(correlation);
    request.causation_id = Some(causation);
    request.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    let reply_id = request.reply_id.clone();

    let (outcome, streamed) = turn_streaming(&agent.actor, request).await;

    assert_eq!(type_names(&outcome), ["reply_completed", "usage_recorded"]);
    let completed = outcome.completed().expect("completed");
    assert_eq!(completed.content, "echo: And of Italy?");
    assert_eq!(streamed, completed.content, "the deltas make up the reply");
    assert_eq!(completed.agent, "echo");
    assert_eq!(completed.reply_id, reply_id);
    assert_eq!(completed.finish_reason, "stop");
    assert_eq!(
        (
            completed.conversation_id.as_str(),
            completed.message_id.as_str()
        ),
        ("c1", "m1")
    );

    let usage = outcome.usage().expect("charged");
    let counted = echo_usage(&history(), &completed.content);
    assert!(usage.estimated, "echo counts its usage itself: estimated");
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (counted.prompt_tokens, counted.completion_tokens)
    );
    assert_eq!(usage.model, "echo");
    assert_eq!(usage.key_id, "key_1");
    assert_eq!(usage.user.as_deref(), Some("ada"));
    assert_eq!((usage.input_price, usage.output_price), (150_000, 600_000));
    assert_eq!(usage.cost_micros, prices.cost_micros(counted));
    assert!(usage.cost_micros > 0);

    let [reply_event, usage_event] = &outcome.events[..] else {
        panic!("two events");
    };
    assert_eq!(reply_event.causation_id, Some(causation));
    assert_eq!(usage_event.causation_id, Some(reply_event.id));
    for event in &outcome.events {
        assert_eq!(event.correlation_id, Some(correlation));
        assert!(event.traceparent.is_some());
    }
}

#[tokio::test]
async fn openai_turn_is_charged_the_reported_usage() {
    let fake = FakeOpenAi::start(Behaviour::Normal).await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let (outcome, streamed) = turn_streaming(&agent.actor, request("m1")).await;

    let completed = outcome.completed().expect("completed");
    assert_eq!(completed.content, REPLY.concat());
    assert_eq!(streamed, completed.content);
    let usage = outcome.usage().expect("charged");
    assert!(!usage.estimated, "the server reported usage");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), USAGE);
    assert_eq!(usage.model, MODEL);
    // 17 × 2.5 + 5 × 10 = 92.5 micro-USD, rounded up.
    assert_eq!(usage.cost_micros, 93);
    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["messages"].as_array().map(Vec::len),
        Some(4),
        "the history is the context"
    );
}

#[tokio::test]
async fn a_server_without_usage_is_counted_and_marked_estimated() {
    let fake = FakeOpenAi::start(Behaviour::NoUsage).await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let outcome = turn(&agent.actor, request("m1")).await;

    let usage = outcome.usage().expect("charged");
    assert!(usage.estimated);
    let counted = estimate_usage(MODEL, &history(), &REPLY.concat());
    assert_eq!(
        (usage.prompt_tokens, usage.completion_tokens),
        (counted.prompt_tokens, counted.completion_tokens)
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_reply_completes() {
    let fake = FakeOpenAi::start_script(vec![
        Behaviour::ServerError,
        Behaviour::ServerError,
        Behaviour::Normal,
    ])
    .await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(type_names(&outcome), ["reply_completed", "usage_recorded"]);
    assert_eq!(fake.request_count(), 3, "two failures, then the reply");
    assert_eq!(
        outcome.usage().map(|u| u.cost_micros),
        Some(93),
        "one charge"
    );
}

#[tokio::test]
async fn persistent_errors_fail_the_turn_then_open_the_circuit() {
    let fake = FakeOpenAi::start(Behaviour::ServerError).await;
    let mut agent = spawn(
        AgentConfig {
            max_retries: 2,
            circuit_failure_threshold: 3,
            circuit_open_for: Duration::from_secs(600),
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    let first = turn(&agent.actor, request("m1")).await;
    assert_eq!(
        type_names(&first),
        ["reply_failed"],
        "no usage for a reply never streamed"
    );
    assert_eq!(failure_code(&first), "upstream");
    assert_eq!(fake.request_count(), 3, "one try and two retries");
    assert_eq!(
        transitions(&mut agent.alerts),
        [CircuitTransition::Opened {
            consecutive_failures: 3
        }]
    );
    assert_eq!(circuit(&agent.actor).await, CircuitState::Open);

    let second = turn(&agent.actor, request("m2")).await;
    assert_eq!(failure_code(&second), "unavailable");
    assert_eq!(fake.request_count(), 3, "an open circuit calls nobody");
}

#[tokio::test]
async fn the_circuit_lets_a_trial_through_and_closes_when_it_succeeds() {
    let fake = FakeOpenAi::start_script(vec![Behaviour::ServerError, Behaviour::Normal]).await;
    let open_for = Duration::from_millis(100);
    let mut agent = spawn(
        AgentConfig {
            max_retries: 0,
            circuit_failure_threshold: 1,
            circuit_open_for: open_for,
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    assert_eq!(
        failure_code(&turn(&agent.actor, request("m1")).await),
        "upstream"
    );
    tokio::time::sleep(open_for * 2).await;
    let trial = turn(&agent.actor, request("m2")).await;
    assert!(
        trial.completed().is_some(),
        "the trial went through: {trial:?}"
    );
    assert_eq!(circuit(&agent.actor).await, CircuitState::Closed);
    assert_eq!(
        transitions(&mut agent.alerts),
        [
            CircuitTransition::Opened {
                consecutive_failures: 1
            },
            CircuitTransition::HalfOpened,
            CircuitTransition::Closed,
        ]
    );
}

#[tokio::test]
async fn rate_limits_are_retried_after_the_wait_the_server_asks_for() {
    let fake =
        FakeOpenAi::start_script(vec![Behaviour::RateLimitedMs(20), Behaviour::Normal]).await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert!(outcome.completed().is_some(), "{outcome:?}");
    assert_eq!(fake.request_count(), 2);
}

#[tokio::test]
async fn a_retry_after_beyond_the_longest_backoff_is_not_waited_for() {
    // The fake says `Retry-After: 2` (seconds); this agent never waits 500 ms.
    let fake = FakeOpenAi::start(Behaviour::RateLimited).await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(failure_code(&outcome), "rate_limited");
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn a_rejected_request_is_not_retried_and_does_not_trip_the_circuit() {
    let fake = FakeOpenAi::start(Behaviour::BadRequest).await;
    let agent = spawn(
        AgentConfig {
            circuit_failure_threshold: 1,
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(failure_code(&outcome), "rejected");
    assert_eq!(fake.request_count(), 1);
    assert_eq!(circuit(&agent.actor).await, CircuitState::Closed);
}

#[tokio::test]
async fn a_silent_server_times_out_and_is_retried() {
    let fake = FakeOpenAi::start(Behaviour::Hang).await;
    let agent = spawn(
        AgentConfig {
            timeout: Duration::from_millis(200),
            max_retries: 1,
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(type_names(&outcome), ["reply_failed"]);
    assert_eq!(failure_code(&outcome), "timeout");
    assert_eq!(
        fake.request_count(),
        2,
        "nothing was streamed, so it was retried"
    );
}

#[tokio::test]
async fn a_stall_after_streaming_times_out_without_retry_and_charges_the_partial() {
    let fake = FakeOpenAi::start(Behaviour::StallAfter(2)).await;
    let agent = spawn(
        AgentConfig {
            timeout: Duration::from_millis(300),
            max_retries: 3,
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    let (outcome, streamed) = turn_streaming(&agent.actor, request("m1")).await;

    assert_eq!(type_names(&outcome), ["reply_failed", "usage_recorded"]);
    assert_eq!(failure_code(&outcome), "timeout");
    assert_eq!(streamed, "Hello from");
    assert_eq!(
        fake.request_count(),
        1,
        "a retry would stream the reply twice"
    );
    let usage = outcome.usage().expect("the partial is charged");
    assert!(usage.estimated);
    assert_eq!(
        usage.completion_tokens,
        estimate_usage(MODEL, &[], "Hello from").completion_tokens
    );
}

#[tokio::test]
async fn a_stream_cut_mid_reply_fails_and_charges_what_was_streamed() {
    let fake = FakeOpenAi::start(Behaviour::DropAfter(2)).await;
    let agent = spawn(config("assistant"), openai(&fake)).await;

    let (outcome, streamed) = turn_streaming(&agent.actor, request("m1")).await;

    assert_eq!(type_names(&outcome), ["reply_failed", "usage_recorded"]);
    assert_eq!(failure_code(&outcome), "interrupted");
    assert_eq!(streamed, "Hello from");
    assert_eq!(fake.request_count(), 1, "no retry after deltas");

    let usage = outcome.usage().expect("the partial is charged");
    let counted = estimate_usage(MODEL, &history(), "Hello from");
    assert!(
        usage.estimated,
        "the server reported no usage before the cut"
    );
    assert_eq!(
        Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens
        },
        counted
    );
    assert_eq!(usage.cost_micros, GPT_4O.cost_micros(counted));
    assert_eq!(
        outcome.events[1].causation_id,
        Some(outcome.events[0].id),
        "the charge is marked as caused by the failure"
    );
}

#[tokio::test]
async fn no_more_than_max_concurrency_calls_are_in_flight() {
    let fake = FakeOpenAi::start(Behaviour::Gate(2)).await;
    let agent = spawn(
        AgentConfig {
            max_concurrency: 2,
            ..config("assistant")
        },
        openai(&fake),
    )
    .await;

    let turns = (0..6).map(|n| {
        let actor = agent.actor.clone();
        tokio::spawn(async move { turn(&actor, request(&format!("m{n}"))).await })
    });
    for outcome in futures::future::join_all(turns).await {
        let outcome = outcome.expect("the turn task does not panic");
        assert!(outcome.completed().is_some(), "{outcome:?}");
    }

    assert_eq!(fake.request_count(), 6);
    assert_eq!(
        fake.max_in_flight(),
        2,
        "the cap is reached (turns run concurrently) and never passed"
    );
}

#[tokio::test]
async fn a_stopped_agent_answers_with_a_coded_failure() {
    let agent = spawn(config("assistant"), Arc::new(EchoProvider::new())).await;
    agent.actor.stop(None);
    while agent.actor.get_status() != ractor::ActorStatus::Stopped {
        tokio::task::yield_now().await;
    }

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(failure_code(&outcome), "unavailable");
    assert_eq!(outcome.failed().map(|f| f.message_id.as_str()), Some("m1"));
}

/// A provider with a bug.
#[derive(Debug)]
struct Panicking;

#[async_trait]
impl Provider for Panicking {
    fn kind(&self) -> &'static str {
        "panicking"
    }

    fn model(&self) -> &str {
        "none"
    }

    async fn complete(
        &self,
        _request: CompletionRequest,
        _deltas: mpsc::Sender<String>,
    ) -> Result<Completion, ProviderError> {
        panic!("a provider bug");
    }
}

#[tokio::test]
async fn a_panicking_provider_ends_the_turn_with_internal() {
    let agent = spawn(config("assistant"), Arc::new(Panicking)).await;

    let outcome = turn(&agent.actor, request("m1")).await;

    assert_eq!(failure_code(&outcome), "internal");
    let second = turn(&agent.actor, request("m2")).await;
    assert_eq!(failure_code(&second), "internal", "the agent still answers");
    assert!(matches!(outcome.events[0].event, Event::ReplyFailed(_)));
}
