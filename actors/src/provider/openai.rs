//! The `openai` provider: any OpenAI-compatible chat-completions server
//! (OpenAI, vLLM, Ollama, llama.cpp), streamed over SSE.
//!
//! One call is one `POST {base_url}/chat/completions` with `stream: true` and
//! `stream_options.include_usage`, so the server streams the reply in
//! `chat.completion.chunk` objects and ends with a usage chunk and `[DONE]`.
//! Servers that ignore `include_usage` get their tokens counted here instead
//! (`estimated: true`), because every completed turn must record its usage.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::sse::SseDecoder;
use super::{
    estimate_usage_blocking, send_delta, ChatMessage, Completion, CompletionRequest, Provider,
    ProviderError, Usage,
};

/// How long to wait for the first byte and between two pieces of a stream when
/// nothing else is said. Generous: a CPU-bound local model may think a while
/// before its first token. The request's own timeout bounds the whole call.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Error bodies and protocol errors are quoted up to this many characters.
const QUOTE_LIMIT: usize = 512;

/// The longest wait a model server's `Retry-After` is taken at (a day); a
/// larger one is read as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A client of one OpenAI-compatible server and model.
///
/// The API key is sent as `Authorization: Bearer …` and kept only inside a
/// header value marked sensitive: it appears in no `Debug` output, log or error.
///
/// ```
/// use switchboard_actors::provider::{OpenAiProvider, Provider};
///
/// let provider = OpenAiProvider::new("http://127.0.0.1:11434/v1", "llama3.2", None).unwrap();
/// assert_eq!(provider.model(), "llama3.2");
/// ```
#[derive(Clone)]
pub struct OpenAiProvider {
    endpoint: reqwest::Url,
    model: String,
    authorization: Option<HeaderValue>,
    idle_timeout: Duration,
    client: reqwest::Client,
}

/// An [`OpenAiProvider`] could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiConfigError {
    /// `base_url` is not an absolute `http` or `https` URL.
    #[error("base_url {base_url:?} is not an http(s) URL: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        base_url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key holds characters that cannot go in an HTTP header.
    /// (The key itself is deliberately not part of this error.)
    #[error("the API key contains characters not allowed in an HTTP header")]
    InvalidApiKey,
    /// The HTTP client (TLS setup) could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl OpenAiProvider {
    /// A provider for `model` on the server at `base_url` (the part before
    /// `/chat/completions`, e.g. `https://api.openai.com/v1`).
    pub fn new(
        base_url: &str,
        model: impl Into<String>,
        api_key: Option<String>,
    ) -> Result<Self, OpenAiConfigError> {
        let invalid = |reason: String| OpenAiConfigError::InvalidBaseUrl {
            base_url: base_url.to_owned(),
            reason,
        };
        let endpoint = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint).map_err(|e| invalid(e.to_string()))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(invalid(format!("scheme {:?}", endpoint.scheme())));
        }
        let authorization = api_key
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| OpenAiConfigError::InvalidApiKey)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| OpenAiConfigError::Client(error_chain(&e)))?;
        Ok(OpenAiProvider {
            endpoint,
            model: model.into(),
            authorization,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            client,
        })
    }

    /// Wait at most `idle` for the response to start and between two pieces of
    /// the stream; a server that stalls longer fails the call with `Timeout`.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    async fn call(
        &self,
        model: String,
        messages: Vec<ChatMessage>,
        max_tokens: Option<u32>,
        deltas: &mpsc::Sender<String>,
    ) -> Result<Completion, ProviderError> {
        let mut body = json!({
            "model": model,
            "messages": messages,
            "stream": true,
            "stream_options": { "include_usage": true },
        });
        if let Some(max_tokens) = max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(ACCEPT, "text/event-stream")
            .json(&body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        tracing::debug!(endpoint = %self.endpoint, %model, messages = messages.len(), "chat completion");

        let response = timeout(self.idle_timeout, request.send())
            .await
            .map_err(|_| ProviderError::Timeout)?
            .map_err(send_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.error_response(response).await);
        }
        let is_plain_json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/json"));
        let reply = if is_plain_json {
            self.read_plain(response, deltas).await?
        } else {
            self.read_stream(response, deltas).await?
        };

        let (usage, estimated) = match reply.usage {
            Some(usage) => (usage, false),
            None => {
                let usage =
                    estimate_usage_blocking(model.clone(), messages, reply.content.clone()).await;
                (usage, true)
            }
        };
        Ok(Completion {
            content: reply.content,
            finish_reason: reply.finish_reason.unwrap_or_else(|| "stop".to_owned()),
            model,
            usage: Some(usage),
            estimated,
        })
    }

    /// Read an SSE reply, streaming each content piece as it is parsed.
    async fn read_stream(
        &self,
        response: reqwest::Response,
        deltas: &mpsc::Sender<String>,
    ) -> Result<Reply, ProviderError> {
        let mut reply = Reply::default();
        let mut decoder = SseDecoder::default();
        let mut body = response.bytes_stream();
        let protocol = |e: super::sse::SseError| ProviderError::Protocol(e.to_string());
        loop {
            let next = timeout(self.idle_timeout, body.next())
                .await
                .map_err(|_| ProviderError::Timeout)?;
            let ended = next.is_none();
            let events = match next {
                Some(Ok(bytes)) => decoder.push(&bytes).map_err(protocol)?,
                Some(Err(cut)) => {
                    tracing::debug!(error = %error_chain(&cut), "reply stream cut");
                    return Err(reply.interrupted());
                }
                None => decoder.finish().map_err(protocol)?.into_iter().collect(),
            };
            for data in events {
                if reply.take_event(&data, deltas).await? == Progress::Done {
                    return Ok(reply);
                }
            }
            if ended {
                break;
            }
        }
        // The body ended without `[DONE]`: complete only if the model had finished.
        if reply.finish_reason.is_some() {
            Ok(reply)
        } else {
            Err(reply.interrupted())
        }
    }

    /// Read a non-streamed `chat.completion` from a server that ignored
    /// `stream: true`; the whole reply is one delta.
    async fn read_plain(
        &self,
        response: reqwest::Response,
        deltas: &mpsc::Sender<String>,
    ) -> Result<Reply, ProviderError> {
        let bytes = timeout(self.idle_timeout, response.bytes())
            .await
            .map_err(|_| ProviderError::Timeout)?
            .map_err(|_| ProviderError::Interrupted {
                partial: String::new(),
                usage: None,
            })?;
        let completion: WireCompletion = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::Protocol(format!(
                "malformed completion ({e}): {}",
                quote(&String::from_utf8_lossy(&bytes))
            ))
        })?;
        // Some gateways answer 200 with an error object, as the stream does.
        if let Some(error) = completion.error {
            let (status, message) = error.status_and_message();
            return Err(error_for_status(status, message, None));
        }
        let Some(choice) = completion.choices.into_iter().next() else {
            return Err(ProviderError::Protocol(format!(
                "a completion without choices: {}",
                quote(&String::from_utf8_lossy(&bytes))
            )));
        };
        let content = choice.message.and_then(|m| m.content).unwrap_or_default();
        let finish_reason = choice.finish_reason;
        if !content.is_empty() {
            send_delta(deltas, content.clone()).await;
        }
        Ok(Reply {
            content,
            finish_reason,
            usage: completion.usage.map(Usage::from),
        })
    }

    /// Map a non-2xx response to its error kind, with the server's message.
    async fn error_response(&self, response: reqwest::Response) -> ProviderError {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body = match timeout(self.idle_timeout, response.bytes()).await {
            Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            _ => String::new(),
        };
        let message = error_message(&body).unwrap_or_else(|| {
            if body.trim().is_empty() {
                status.canonical_reason().unwrap_or("no message").to_owned()
            } else {
                quote(body.trim())
            }
        });
        tracing::debug!(status = status.as_u16(), %message, "model server refused");
        error_for_status(status.as_u16(), message, retry_after)
    }
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("endpoint", &self.endpoint.as_str())
            .field("model", &self.model)
            .field(
                "api_key",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(
        &self,
        request: CompletionRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<Completion, ProviderError> {
        let CompletionRequest {
            model,
            messages,
            max_tokens,
            timeout: overall,
        } = request;
        let model = model.unwrap_or_else(|| self.model.clone());
        timeout(overall, self.call(model, messages, max_tokens, &deltas))
            .await
            .map_err(|_| ProviderError::Timeout)?
    }
}

/// The reply as it accumulates from the stream.
#[derive(Debug, Default)]
struct Reply {
    content: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

impl Reply {
    /// Take one SSE `data` payload: a chunk, an in-stream error, or `[DONE]`.
    async fn take_event(
        &mut self,
        data: &str,
        deltas: &mpsc::Sender<String>,
    ) -> Result<Progress, ProviderError> {
        if data.trim() == "[DONE]" {
            return Ok(Progress::Done);
        }
        let chunk: WireChunk = serde_json::from_str(data).map_err(|e| {
            ProviderError::Protocol(format!("malformed chunk ({e}): {}", quote(data)))
        })?;
        if let Some(error) = chunk.error {
            let (status, message) = error.status_and_message();
            return Err(error_for_status(status, message, None));
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage.into());
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(piece) = choice.delta.and_then(|delta| delta.content) {
                if !piece.is_empty() {
                    self.content.push_str(&piece);
                    send_delta(deltas, piece).await;
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        Ok(Progress::More)
    }

    fn interrupted(&mut self) -> ProviderError {
        ProviderError::Interrupted {
            partial: std::mem::take(&mut self.content),
            usage: self.usage,
        }
    }
}

/// The kind of error an HTTP status (or an in-stream error code) stands for.
fn error_for_status(status: u16, message: String, retry_after: Option<Duration>) -> ProviderError {
    match status {
        429 => ProviderError::RateLimited { retry_after },
        // Request timeout and conflict (a lock timed out): passing, as
        // OpenAI's own clients treat them.
        408 | 409 => ProviderError::Upstream { status, message },
        400..=499 => ProviderError::Rejected { status, message },
        _ => ProviderError::Upstream { status, message },
    }
}

/// `retry-after-ms` (OpenAI, more precise) or `Retry-After` in seconds, at
/// most [`MAX_RETRY_AFTER`]. The HTTP-date form of `Retry-After` is not used
/// by model servers and is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name: &str, per_second: f64| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<f64>().ok())
            .filter(|value| value.is_finite() && *value >= 0.0)
            .map(|value| (value / per_second).min(MAX_RETRY_AFTER.as_secs_f64()))
    };
    seconds("retry-after-ms", 1000.0)
        .or_else(|| seconds(RETRY_AFTER.as_str(), 1.0))
        .map(Duration::from_secs_f64)
}

/// OpenAI's `{"error":{"message",…}}`, or the `{"error":"…"}` some servers send.
fn error_message(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let error = value.get("error")?;
    let message = match error {
        serde_json::Value::String(message) => message.as_str(),
        other => other.get("message")?.as_str()?,
    };
    Some(quote(message))
}

fn send_error(error: reqwest::Error) -> ProviderError {
    if error.is_timeout() && !error.is_connect() {
        ProviderError::Timeout
    } else {
        ProviderError::Connect(error_chain(&error))
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest hides the
/// useful part — "connection refused" — in the source chain).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[derive(Debug, Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireCompletion {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Debug, Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl From<WireUsage> for Usage {
    fn from(usage: WireUsage) -> Self {
        Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }
    }
}

/// An error inside a 200 stream: OpenAI's object, or a bare string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireError {
    Object {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        code: Option<serde_json::Value>,
    },
    Text(String),
}

impl WireError {
    /// The status the error names (vLLM puts an HTTP code in `code`), else 502:
    /// the server failed after it had started answering.
    fn status_and_message(self) -> (u16, String) {
        match self {
            WireError::Object { message, code } => {
                let status = code
                    .and_then(|code| code.as_u64())
                    .and_then(|code| u16::try_from(code).ok())
                    .filter(|code| (400..=599).contains(code))
                    .unwrap_or(502);
                let message = message.unwrap_or_else(|| "error in the reply stream".to_owned());
                (status, quote(&message))
            }
            WireError::Text(message) => (502, quote(&message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(1500)));
        headers.clear();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
        // Too large for a Duration: capped, not a panic.
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            "retry-after-ms",
            HeaderValue::from_static("99999999999999999999999"),
        );
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn error_messages_of_both_shapes() {
        let openai = r#"{"error":{"message":"bad model","type":"invalid_request_error","code":"model_not_found"}}"#;
        assert_eq!(error_message(openai).as_deref(), Some("bad model"));
        assert_eq!(
            error_message(r#"{"error":"model not loaded"}"#).as_deref(),
            Some("model not loaded")
        );
        assert_eq!(error_message("<html>"), None);
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert!(matches!(
            error_for_status(503, "x".into(), None),
            ProviderError::Upstream { status: 503, .. }
        ));
        assert!(matches!(
            error_for_status(401, "x".into(), None),
            ProviderError::Rejected { status: 401, .. }
        ));
        assert!(matches!(
            error_for_status(429, "x".into(), None),
            ProviderError::RateLimited { retry_after: None }
        ));
        for transient in [408, 409] {
            assert!(matches!(
                error_for_status(transient, "x".into(), None),
                ProviderError::Upstream { .. }
            ));
        }
    }

    #[test]
    fn base_url_must_be_http() {
        assert!(OpenAiProvider::new("ftp://x/v1", "m", None).is_err());
        assert!(OpenAiProvider::new("not a url", "m", None).is_err());
        let provider = OpenAiProvider::new("http://127.0.0.1:1/v1/", "m", None).unwrap();
        assert_eq!(
            provider.endpoint(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
    }
}
