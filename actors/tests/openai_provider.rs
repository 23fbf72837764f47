//! The `openai` provider against a fake OpenAI-compatible server over real HTTP:
//! each server behaviour maps to the right completion or error kind.

mod support;

use std::time::Duration;

use serde_json::json;
use switchboard_actors::provider::{
    ChatMessage, Completion, CompletionRequest, OpenAiProvider, Provider, ProviderError, Usage,
};
use tokio::sync::mpsc;

use support::fake_openai::{Behaviour, FakeOpenAi, REPLY, USAGE};

/// Generous: these tests are about outcomes, not speed.
const GENEROUS: Duration = Duration::from_secs(30);

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are terse."),
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And of Italy?"),
    ]
}

fn provider(fake: &FakeOpenAi, api_key: Option<&str>) -> OpenAiProvider {
    OpenAiProvider::new(&fake.base_url(), "gpt-4o-mini", api_key.map(str::to_owned))
        .expect("valid config")
}

/// Run one completion, collecting the deltas it streamed.
async fn complete(
    provider: &OpenAiProvider,
    request: CompletionRequest,
) -> (Result<Completion, ProviderError>, Vec<String>) {
    let (deltas, mut received) = mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(delta) = received.recv().await {
            all.push(delta);
        }
        all
    });
    let result = provider.complete(request, deltas).await;
    let deltas = collector.await.expect("collector does not panic");
    (result, deltas)
}

async fn complete_with(behaviour: Behaviour) -> (Result<Completion, ProviderError>, Vec<String>) {
    let fake = FakeOpenAi::start(behaviour).await;
    let request = CompletionRequest::new(conversation(), GENEROUS);
    complete(&provider(&fake, None), request).await
}

#[tokio::test]
async fn streams_the_reply_and_uses_reported_usage() {
    let fake = FakeOpenAi::start(Behaviour::Normal).await;
    let provider = provider(&fake, Some("sk-test-secret"));
    let mut request = CompletionRequest::new(conversation(), GENEROUS);
    request.max_tokens = Some(64);

    let (result, deltas) = complete(&provider, request).await;
    let completion = result.expect("a normal reply completes");

    assert_eq!(deltas, REPLY, "deltas arrive one by one, in order");
    assert_eq!(completion.content, REPLY.concat());
    assert_eq!(deltas.concat(), completion.content);
    assert_eq!(completion.finish_reason, "stop");
    assert_eq!(completion.model, "gpt-4o-mini");
    let (prompt_tokens, completion_tokens) = USAGE;
    assert_eq!(
        completion.usage,
        Some(Usage {
            prompt_tokens,
            completion_tokens
        })
    );
    assert!(!completion.estimated, "the server reported usage");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.authorization.as_deref(), Some("Bearer sk-test-secret"));
    assert_eq!(sent.body["stream"], json!(true));
    assert_eq!(sent.body["stream_options"]["include_usage"], json!(true));
    assert_eq!(sent.body["model"], json!("gpt-4o-mini"));
    assert_eq!(sent.body["max_tokens"], json!(64));
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ]),
        "the whole history goes as context, oldest first"
    );
}

#[tokio::test]
async fn sends_no_authorization_without_a_key_and_honours_the_requested_model() {
    let fake = FakeOpenAi::start(Behaviour::Normal).await;
    let mut request = CompletionRequest::new(conversation(), GENEROUS);
    request.model = Some("llama3.2".to_owned());

    let (result, _) = complete(&provider(&fake, None), request).await;

    assert_eq!(result.expect("completes").model, "llama3.2");
    let sent = &fake.requests()[0];
    assert_eq!(sent.authorization, None);
    assert_eq!(sent.body["model"], json!("llama3.2"));
    assert!(sent.body.get("max_tokens").is_none());
}

#[tokio::test]
async fn counts_tokens_when_the_server_reports_none() {
    let (result, deltas) = complete_with(Behaviour::NoUsage).await;
    let completion = result.expect("a reply without usage still completes");

    assert_eq!(deltas.concat(), completion.content);
    assert_eq!(completion.content, REPLY.concat());
    assert!(completion.estimated);
    let usage = completion.usage.expect("estimated usage");
    assert!(
        usage.prompt_tokens > 0 && usage.completion_tokens > 0,
        "{usage:?}"
    );
}

#[tokio::test]
async fn a_server_error_is_upstream_with_its_message() {
    let (result, deltas) = complete_with(Behaviour::ServerError).await;
    let error = result.expect_err("500 fails");

    assert!(deltas.is_empty());
    assert_eq!(
        error,
        ProviderError::Upstream {
            status: 500,
            message: "The server had an error while processing your request.".to_owned(),
        }
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn too_many_requests_is_rate_limited_with_retry_after() {
    let (result, _) = complete_with(Behaviour::RateLimited).await;
    let error = result.expect_err("429 fails");

    assert_eq!(
        error,
        ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn a_bad_request_is_rejected_and_not_retried() {
    let (result, _) = complete_with(Behaviour::BadRequest).await;
    let error = result.expect_err("400 fails");

    assert_eq!(
        error,
        ProviderError::Rejected {
            status: 400,
            message: "The model `nope` does not exist".to_owned(),
        }
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_dropped_stream_is_interrupted_with_the_partial_reply() {
    let (result, deltas) = complete_with(Behaviour::DropAfter(2)).await;
    let error = result.expect_err("a cut stream fails");

    assert_eq!(deltas, REPLY[..2]);
    assert_eq!(
        error,
        ProviderError::Interrupted {
            partial: REPLY[..2].concat(),
            usage: None,
        }
    );
    assert!(error.is_transient());
}

#[tokio::test]
async fn a_stream_ending_without_finish_or_done_is_interrupted() {
    let (result, deltas) = complete_with(Behaviour::EndAfter(3)).await;

    assert_eq!(deltas, REPLY[..3]);
    assert_eq!(
        result.expect_err("an unfinished reply fails"),
        ProviderError::Interrupted {
            partial: REPLY[..3].concat(),
            usage: None,
        }
    );
}

#[tokio::test]
async fn a_malformed_chunk_is_a_protocol_error() {
    let (result, deltas) = complete_with(Behaviour::MalformedChunk).await;
    let error = result.expect_err("bad JSON fails");

    assert_eq!(deltas, REPLY[..1]);
    assert!(matches!(error, ProviderError::Protocol(_)), "{error:?}");
    assert!(!error.is_transient());
}

#[tokio::test]
async fn an_error_inside_the_stream_is_upstream() {
    let (result, _) = complete_with(Behaviour::ErrorInStream).await;

    assert_eq!(
        result.expect_err("an in-stream error fails"),
        ProviderError::Upstream {
            status: 502,
            message: "the model crashed".to_owned(),
        }
    );
}

#[tokio::test]
async fn a_server_ignoring_stream_true_still_works() {
    let (result, deltas) = complete_with(Behaviour::PlainJson).await;
    let completion = result.expect("a plain completion is accepted");

    assert_eq!(completion.content, REPLY.concat());
    assert_eq!(deltas, [REPLY.concat()]);
    assert_eq!(completion.finish_reason, "stop");
    assert!(!completion.estimated);
}

#[tokio::test]
async fn a_plain_200_carrying_an_error_is_that_error_not_an_empty_reply() {
    let (result, deltas) = complete_with(Behaviour::PlainJsonError).await;
    let error = result.expect_err("an error object is no completion");
    assert!(
        matches!(&error, ProviderError::Upstream { status: 503, message } if message.contains("overloaded")),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert!(deltas.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_never_answers_times_out() {
    let fake = FakeOpenAi::start(Behaviour::Hang).await;
    // Overall timeout first: the idle timeout is far longer.
    let provider = provider(&fake, None).with_idle_timeout(Duration::from_secs(3600));
    let request = CompletionRequest::new(conversation(), Duration::from_secs(5));

    let (result, deltas) = complete(&provider, request).await;

    assert_eq!(result.expect_err("no answer fails"), ProviderError::Timeout);
    assert!(deltas.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_stalls_hits_the_idle_timeout() {
    let fake = FakeOpenAi::start(Behaviour::StallAfter(2)).await;
    let provider = provider(&fake, None).with_idle_timeout(Duration::from_secs(5));
    let request = CompletionRequest::new(conversation(), Duration::from_secs(3600));

    let (result, deltas) = complete(&provider, request).await;

    let error = result.expect_err("a stalled stream fails");
    assert_eq!(error, ProviderError::Timeout);
    assert!(error.is_transient());
    // Whatever arrived before the stall was streamed, in order.
    assert!(REPLY.concat().starts_with(&deltas.concat()));
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let provider = OpenAiProvider::new(&format!("http://{addr}/v1"), "m", None).expect("config");

    let (result, _) = complete(&provider, CompletionRequest::new(conversation(), GENEROUS)).await;

    let error = result.expect_err("nobody listens");
    assert!(matches!(error, ProviderError::Connect(_)), "{error:?}");
    assert!(error.is_transient());
}

#[tokio::test]
async fn the_api_key_is_never_shown() {
    let fake = FakeOpenAi::start(Behaviour::Normal).await;
    let provider = provider(&fake, Some("sk-very-secret"));

    let shown = format!("{provider:?}");

    assert!(!shown.contains("sk-very-secret"), "{shown}");
    assert!(shown.contains("<redacted>"));
}
