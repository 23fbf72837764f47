//! The `echo` provider: exact, deterministic replies streamed word by word.

use std::time::Duration;

use switchboard_actors::provider::{
    echo_usage, estimate_usage, ChatMessage, CompletionRequest, EchoProvider, Provider, Usage,
};
use tokio::sync::mpsc;

#[tokio::test]
async fn echoes_the_last_user_message_word_by_word() {
    let messages = vec![
        ChatMessage::system("ignored"),
        ChatMessage::user("first question"),
        ChatMessage::assistant("echo: first question"),
        ChatMessage::user("hello  wide\nworld"),
    ];
    let request = CompletionRequest::new(messages.clone(), Duration::from_secs(30));
    let (deltas, mut received) = mpsc::channel(64);

    let completion = EchoProvider::new()
        .complete(request, deltas)
        .await
        .expect("echo never fails");

    let mut streamed = Vec::new();
    while let Some(delta) = received.recv().await {
        streamed.push(delta);
    }
    assert_eq!(completion.content, "echo: hello  wide\nworld");
    assert_eq!(streamed, ["echo: ", "hello  ", "wide\n", "world"]);
    assert_eq!(completion.finish_reason, "stop");
    assert_eq!(completion.model, "echo");
    assert!(completion.estimated);
    let usage = completion.usage.expect("echo counts its tokens");
    assert_eq!(
        usage,
        echo_usage(&messages, &completion.content),
        "the count is echo's own tokenizer's, deterministic"
    );
    // One token per word, framed: 4 messages of 3 + 1 (role) + 1, 2, 3 and 3
    // words, primed with 3; the reply has 4 words.
    assert_eq!(
        usage,
        Usage {
            prompt_tokens: 4 * 4 + 9 + 3,
            completion_tokens: 4
        }
    );
}

#[tokio::test]
async fn a_closed_receiver_does_not_stop_the_reply() {
    let request = CompletionRequest::new(vec![ChatMessage::user("a b c")], Duration::from_secs(30));
    let (deltas, received) = mpsc::channel(1);
    drop(received);

    let completion = EchoProvider::new()
        .complete(request, deltas)
        .await
        .expect("echo never fails");

    assert_eq!(completion.content, "echo: a b c");
}

#[test]
fn usage_estimates_follow_openais_recipe() {
    // "hello" is one token in cl100k_base; each message adds 3 + its role, the
    // reply is primed with 3.
    let usage = estimate_usage("gpt-4", &[ChatMessage::user("hello")], "hello");
    assert_eq!(usage.prompt_tokens, 3 + 1 + 1 + 3);
    assert_eq!(usage.completion_tokens, 1);
}
