//! Agent providers: what an agent calls to turn a conversation into a reply.
//!
//! A [`Provider`] takes the conversation as chat messages, streams the reply's
//! pieces into a channel as they arrive (they become `reply_delta` events) and
//! returns the whole reply with its token usage (which becomes `usage_recorded`).
//! Failures come back as a [`ProviderError`] whose kind tells the agent actor
//! what to do: retry with backoff ([`ProviderError::is_transient`]), wait for
//! `retry_after`, or give up and end the turn with `reply_failed`.
//!
//! Two providers exist (DESIGN §5): [`EchoProvider`], deterministic and offline,
//! and [`OpenAiProvider`], for any OpenAI-compatible chat-completions server.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

mod echo;
mod openai;
mod sse;

pub use echo::{echo_usage, EchoProvider};
pub use openai::{OpenAiConfigError, OpenAiProvider, DEFAULT_IDLE_TIMEOUT};

/// Who said a chat message, in OpenAI's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model (an agent's system prompt).
    System,
    /// A message from the person (or service) in the conversation.
    User,
    /// An earlier reply of an agent.
    Assistant,
}

impl Role {
    /// The wire name: `system`, `user` or `assistant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of the context sent to a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said. Shared: every turn of a conversation sends its whole
    /// history again, and the turn's context holds it without copying it.
    pub content: Arc<str>,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: Role, content: impl Into<Arc<str>>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<Arc<str>>) -> Self {
        Self::new(Role::System, content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<Arc<str>>) -> Self {
        Self::new(Role::User, content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<Arc<str>>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// What an agent asks its provider for: one reply to a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionRequest {
    /// The model to ask; `None` uses the model the provider was configured with.
    pub model: Option<String>,
    /// The conversation so far, oldest first; the last `user` message is the one
    /// being answered, the ones before it are context.
    pub messages: Vec<ChatMessage>,
    /// Upper bound on the reply's length in tokens, when the agent sets one.
    pub max_tokens: Option<u32>,
    /// The whole call — connecting, waiting and streaming — must end within this.
    pub timeout: Duration,
}

impl CompletionRequest {
    /// A request for the provider's own model, without a token cap.
    pub fn new(messages: Vec<ChatMessage>, timeout: Duration) -> Self {
        CompletionRequest {
            model: None,
            messages,
            max_tokens: None,
            timeout,
        }
    }
}

/// Tokens a completion used. Integers, as everything countable in events is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the context sent (all messages).
    pub prompt_tokens: u64,
    /// Tokens of the reply.
    pub completion_tokens: u64,
}

/// A finished reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The whole reply; equal to the concatenation of the deltas streamed.
    pub content: String,
    /// Why the model stopped: `stop`, `length`, `content_filter`, … as the server
    /// said it (`stop` when a server ends a complete stream without saying).
    pub finish_reason: String,
    /// The model that was asked (the request's, or the provider's default).
    pub model: String,
    /// Token counts. The built-in providers always fill it: with the server's
    /// figures when it reports them, else with a tokenizer count.
    pub usage: Option<Usage>,
    /// True when `usage` was counted here rather than reported by the server.
    pub estimated: bool,
}

/// Why a provider call failed, in kinds the agent actor can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The call, or the wait for the next piece of the stream, took too long.
    /// Deltas streamed before it stay streamed; a retry streams afresh.
    #[error("the model server did not answer in time")]
    Timeout,
    /// HTTP 429: the server asks us to slow down, possibly saying for how long.
    #[error("rate limited by the model server{}", retry_after_text(.retry_after))]
    RateLimited {
        /// From `Retry-After` (or `retry-after-ms`), when the server sent one.
        retry_after: Option<Duration>,
    },
    /// HTTP 5xx, or an error the server reported inside the stream.
    #[error("model server error {status}: {message}")]
    Upstream {
        /// The HTTP status (502 for an error reported inside a 200 stream).
        status: u16,
        /// The server's own message (OpenAI's `error.message` when present).
        message: String,
    },
    /// HTTP 4xx other than 429: the request itself is wrong (bad key, unknown
    /// model, context too long). Retrying the same request will not help.
    #[error("model server rejected the request ({status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The server's own message (OpenAI's `error.message` when present).
        message: String,
    },
    /// The stream stopped mid-reply: the connection dropped or ended before the
    /// reply was finished.
    #[error("the reply stream was cut after {} bytes", .partial.len())]
    Interrupted {
        /// What had arrived (and was streamed as deltas) before the cut.
        partial: String,
        /// Usage, if the server had already reported it (rarely).
        usage: Option<Usage>,
    },
    /// The server answered something that is not the chat-completions protocol
    /// (malformed SSE or JSON).
    #[error("model server protocol error: {0}")]
    Protocol(String),
    /// The server could not be reached.
    #[error("cannot reach the model server: {0}")]
    Connect(String),
}

fn retry_after_text(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(wait) => format!(" (retry after {} ms)", wait.as_millis()),
        None => String::new(),
    }
}

impl ProviderError {
    /// Whether the same request may succeed if tried again later: timeouts,
    /// 429, 5xx, connection failures and cut streams. `Rejected` and `Protocol`
    /// are not: the request or the server is wrong, and waiting changes nothing.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Timeout
            | ProviderError::RateLimited { .. }
            | ProviderError::Upstream { .. }
            | ProviderError::Interrupted { .. }
            | ProviderError::Connect(_) => true,
            ProviderError::Rejected { .. } | ProviderError::Protocol(_) => false,
        }
    }

    /// The `status` label of `switchboard_upstream_errors_total`: the HTTP
    /// status when the server answered one (`429`, `503`, …), otherwise the
    /// kind (`timeout`, `interrupted`, `protocol`, `connect`).
    pub fn status_label(&self) -> String {
        match self {
            ProviderError::RateLimited { .. } => "429".to_owned(),
            ProviderError::Upstream { status, .. } | ProviderError::Rejected { status, .. } => {
                status.to_string()
            }
            other => other.code().to_owned(),
        }
    }

    /// A stable snake_case name of the kind, for `reply_failed.code` and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Timeout => "timeout",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Upstream { .. } => "upstream",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::Interrupted { .. } => "interrupted",
            ProviderError::Protocol(_) => "protocol",
            ProviderError::Connect(_) => "connect",
        }
    }
}

/// Something that produces replies. Object-safe: agents hold `Arc<dyn Provider>`.
///
/// ```
/// use std::time::Duration;
/// use switchboard_actors::provider::{ChatMessage, CompletionRequest, EchoProvider, Provider};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let provider: Box<dyn Provider> = Box::new(EchoProvider::new());
/// let (deltas, mut received) = tokio::sync::mpsc::channel(64);
/// let request = CompletionRequest::new(vec![ChatMessage::user("hi there")], Duration::from_secs(5));
/// let completion = provider.complete(request, deltas).await.unwrap();
/// assert_eq!(completion.content, "echo: hi there");
/// assert_eq!(received.recv().await.as_deref(), Some("echo: "));
/// # });
/// ```
#[async_trait]
pub trait Provider: Send + Sync + fmt::Debug {
    /// The provider's kind as written in config: `echo`, `openai`.
    fn kind(&self) -> &'static str;

    /// The model used when a request names none.
    fn model(&self) -> &str;

    /// Produce one reply, sending each piece to `deltas` as it arrives, in order.
    ///
    /// The deltas concatenate to the returned `content` (or to `partial` of an
    /// `Interrupted` error). A closed `deltas` receiver does not stop the call:
    /// the reply is still completed and returned. `deltas` is dropped when the
    /// call returns, so a receiver loop ends by itself.
    async fn complete(
        &self,
        request: CompletionRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<Completion, ProviderError>;
}

/// Count the tokens of a call the way OpenAI bills chat completions, for servers
/// that report no usage.
///
/// Uses the model's tiktoken encoding when tiktoken knows the model (`o200k_base`
/// for gpt-4o and o-series, `cl100k_base` for gpt-4 and gpt-3.5) and
/// `cl100k_base` otherwise — for Llama, Qwen and friends it is an estimate of
/// the right order, not their exact count. Each message costs 3 tokens of
/// framing plus its role and content, and the reply is primed with 3 more
/// (OpenAI's published recipe). The encodings are compiled into the binary:
/// nothing is fetched at run time. The first call loads the tables (tens of
/// milliseconds); call it off the async threads (`spawn_blocking`) when that matters.
pub fn estimate_usage(model: &str, messages: &[ChatMessage], completion: &str) -> Usage {
    Usage {
        // The reply is primed with 3 tokens.
        prompt_tokens: messages_tokens(model, messages) + 3,
        completion_tokens: encoding_for(model)
            .encode_with_special_tokens(completion)
            .len() as u64,
    }
}

/// What `messages` cost in a prompt, as [`estimate_usage`] counts them: for
/// each, 3 tokens of framing, its role and its content.
pub fn messages_tokens(model: &str, messages: &[ChatMessage]) -> u64 {
    let bpe = encoding_for(model);
    let count = |text: &str| bpe.encode_with_special_tokens(text).len() as u64;
    messages
        .iter()
        .map(|message| 3 + count(message.role.as_str()) + count(&message.content))
        .sum()
}

/// Keeps, of the earlier messages of `context` (whole exchanges: a user
/// message and its reply, oldest first, then the message answered), the
/// newest exchanges whose messages take at most `max_tokens` tokens
/// ([`messages_tokens`]). Blocking, as [`estimate_usage`] is.
pub fn trim_to_tokens(model: &str, context: &mut Vec<ChatMessage>, max_tokens: u64) {
    let earlier = context.len().saturating_sub(1);
    let mut kept = 0;
    let mut tokens = 0u64;
    while kept + 2 <= earlier {
        let cost = messages_tokens(model, &context[earlier - kept - 2..earlier - kept]);
        if tokens.saturating_add(cost) > max_tokens {
            break;
        }
        tokens += cost;
        kept += 2;
    }
    context.drain(..earlier - kept);
}

/// Runs `count` on a blocking thread, so loading the tokenizer's tables or
/// encoding a long history does not stall the actors sharing this async
/// thread; its panic goes on here.
async fn counting<T: Send + 'static>(count: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(count).await {
        Ok(counted) => counted,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// [`estimate_usage`] on a blocking thread.
pub(crate) async fn estimate_usage_blocking(
    model: String,
    messages: Vec<ChatMessage>,
    completion: String,
) -> Usage {
    counting(move || estimate_usage(&model, &messages, &completion)).await
}

/// [`trim_to_tokens`] on a blocking thread, unless `context` holds no whole
/// exchange to trim.
pub(crate) async fn trim_to_tokens_blocking(
    model: String,
    mut context: Vec<ChatMessage>,
    max_tokens: u64,
) -> Vec<ChatMessage> {
    if context.len() < 3 {
        return context;
    }
    counting(move || {
        trim_to_tokens(&model, &mut context, max_tokens);
        context
    })
    .await
}

fn encoding_for(model: &str) -> &'static tiktoken_rs::CoreBPE {
    use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};
    match get_tokenizer(model) {
        Some(Tokenizer::O200kBase) => tiktoken_rs::o200k_base_singleton(),
        _ => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// Send a delta unless nobody listens any more; a gone listener is not an error
/// (the reply is still completed and stored).
pub(crate) async fn send_delta(deltas: &mpsc::Sender<String>, delta: String) {
    let _ = deltas.send(delta).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(n: usize) -> [ChatMessage; 2] {
        [
            ChatMessage::user(format!("question {n}: {}", "why ".repeat(n))),
            ChatMessage::assistant(format!("answer {n}")),
        ]
    }

    fn cost(messages: &[ChatMessage]) -> u64 {
        messages_tokens("gpt-4o", messages)
    }

    #[test]
    fn trimming_to_tokens_keeps_the_newest_whole_exchanges_that_fit() {
        let mut context: Vec<ChatMessage> = (1..=3).flat_map(exchange).collect();
        context.push(ChatMessage::user("now"));
        let newest = cost(&exchange(3));
        let two = newest + cost(&exchange(2));
        for (max, kept) in [
            (0, 0),
            (newest - 1, 0),
            (newest, 2),
            (two - 1, 2),
            (two, 4),
            (u64::MAX, 6),
        ] {
            let mut trimmed = context.clone();
            trim_to_tokens("gpt-4o", &mut trimmed, max);
            assert_eq!(trimmed, context[6 - kept..], "at most {max} tokens");
        }
        // The message answered alone stays whatever the cap.
        let mut alone = vec![ChatMessage::user("now")];
        trim_to_tokens("gpt-4o", &mut alone, 0);
        assert_eq!(alone, [ChatMessage::user("now")]);
    }
}
