//! The webhook sink: each alert event in the log is POSTed as JSON to every
//! configured URL (a Slack incoming webhook, or anything that takes JSON).
//!
//! One task per URL follows the log ([`EventLog::subscribe`]) from that URL's
//! checkpoint, picks the alert events ([`alert_text`]) and sends them one at
//! a time, in seq order. The checkpoints live beside the log in the sled tree
//! `webhooks`: key the SHA-256 (hex) of the URL, value the last seq handled,
//! u64 big-endian. The URL itself is never stored.
//!
//! What that gives:
//! - **At least once, never lost.** An event is checkpointed only once the
//!   receiver answered 2xx for it. A non-2xx answer (redirects included: a
//!   POST that became a GET delivered nothing), a connection error or a
//!   timeout (per request, 10 s by default) is retried with the same body and
//!   ids, backing off from 200 ms doubling to 30 s (at least as long as a
//!   `Retry-After` asks, within that cap), forever, and nothing later is sent
//!   meanwhile: a receiver that is down for a while gets everything, in order,
//!   once it is back. A receiver answering 4xx for good (a deleted Slack
//!   webhook answers 404) holds its URL's alerts until it is fixed or removed
//!   from the configuration; every failed attempt is logged.
//! - **Resumes across restarts.** Each start continues from the checkpoint.
//!   An event delivered but not yet checkpointed when the process died or
//!   [`WebhookHandle::stop`] cancelled its request is sent again: receivers
//!   deduplicate by the `X-Switchboard-Event-Id` (or `Idempotency-Key`)
//!   header, the event's UUID. Checkpoint writes are not fsynced one by one
//!   (sled flushes within half a second, and `stop` flushes); losing one only
//!   re-sends.
//! - **A new URL starts at the head.** A URL without a checkpoint starts at
//!   the log's head when the sink starts (and that starting point is stored
//!   at once): a new receiver gets the alerts recorded from then on, not the
//!   log's history.
//! - **Each URL on its own.** A receiver that is down delays only its own
//!   alerts.
//!
//! # Body and headers
//!
//! ```json
//! {"text": ":warning: key key_ab12 reached 80% of its day budget: $0.80 of $1.00",
//!  "event": {"seq": 42, "id": "…", "type": "budget_threshold_crossed", "data": {…}, …}}
//! ```
//!
//! `text` is what Slack shows; `event` is the envelope's wire JSON
//! ([`Envelope::to_json`]). Headers: `Content-Type: application/json`,
//! `X-Switchboard-Event-Id` and `Idempotency-Key`, both the event's UUID.
//!
//! # Secrets
//!
//! A Slack webhook URL is a credential. Nothing here logs or returns one:
//! logs and errors name a URL by scheme and host plus a short hash
//! (`https://hooks.slack.com #1a2b3c4d`), HTTP errors are logged without
//! their URL, and [`WebhookConfig`]'s `Debug` shows the same labels.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use switchboard_events::{Envelope, EventLog, ReadError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::alert_text;

/// The sled tree (beside the log) holding one checkpoint per URL.
pub const TREE: &str = "webhooks";
/// The header carrying the event's UUID, for the receiver to deduplicate by.
pub const EVENT_ID_HEADER: &str = "x-switchboard-event-id";
/// The same UUID under the name many HTTP APIs deduplicate by.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// At most this much of a refusing receiver's answer goes into the log.
const LOGGED_BODY_CHARS: usize = 200;

/// Where and how to send alerts.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `http` or `https` URLs; each gets every alert. Secrets: never logged.
    pub urls: Vec<String>,
    /// How long one request may take, answer included.
    pub timeout: Duration,
    /// The first pause before retrying a failed request; doubles per failure.
    pub backoff_min: Duration,
    /// The longest pause between two attempts.
    pub backoff_max: Duration,
}

impl Default for WebhookConfig {
    /// No URLs, 10 s per request, backoff from 200 ms to 30 s.
    fn default() -> Self {
        WebhookConfig {
            urls: Vec::new(),
            timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|url| redacted(url)).collect();
        f.debug_struct("WebhookConfig")
            .field("urls", &urls)
            .field("timeout", &self.timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .finish()
    }
}

impl WebhookConfig {
    /// What [`WebhookSink::spawn`] refuses, checked without starting
    /// anything: so a start can refuse a bad config before it opens the data dir.
    pub fn check(&self) -> Result<(), WebhookError> {
        self.checked_targets().map(drop)
    }

    fn checked_targets(&self) -> Result<Vec<Target>, WebhookError> {
        let targets = targets(&self.urls)?;
        if self.timeout.is_zero() {
            return Err(WebhookError::ZeroTimeout);
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(WebhookError::InvalidBackoff {
                min: self.backoff_min,
                max: self.backoff_max,
            });
        }
        Ok(targets)
    }
}

/// Why the sink could not start. URLs are named by their position in
/// [`WebhookConfig::urls`], never shown.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks[{index}] is not a URL: {reason}")]
    InvalidUrl { index: usize, reason: String },
    #[error("webhooks[{index}] has the scheme {scheme:?}; alerts go only to http or https URLs")]
    UnsupportedScheme { index: usize, scheme: String },
    #[error("webhooks[{index}] repeats webhooks[{first}]")]
    Duplicate { index: usize, first: usize },
    #[error("webhook backoff needs 0 < backoff_min <= backoff_max, got {min:?} and {max:?}")]
    InvalidBackoff { min: Duration, max: Duration },
    #[error("the webhook request timeout must be above zero")]
    ZeroTimeout,
    #[error("webhook HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("webhook checkpoint storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("the checkpoint of webhooks[{index}] is corrupt: {len} bytes where 8 were expected")]
    CorruptCheckpoint { index: usize, len: usize },
}

/// Starts the webhook sink; see the module doc.
///
/// ```no_run
/// # use switchboard::alerts::{WebhookConfig, WebhookError, WebhookSink};
/// # async fn example(log: switchboard_events::EventLog) -> Result<(), WebhookError> {
/// let config = WebhookConfig {
///     urls: vec!["https://hooks.slack.com/services/T000/B000/XXXX".into()],
///     ..WebhookConfig::default()
/// };
/// let webhooks = WebhookSink::spawn(log, config)?;
/// // ... serve until shutdown ...
/// webhooks.stop().await;
/// # Ok(()) }
/// ```
pub struct WebhookSink;

impl WebhookSink {
    /// Checks every URL, reads (or, for a new URL, sets to the log's head)
    /// each checkpoint and spawns one delivery task per URL on the current
    /// Tokio runtime (so call it inside one). A URL that is not http(s), a
    /// URL given twice, or a zero timeout or backoff is refused before
    /// anything starts. No URLs: a handle with nothing to stop.
    pub fn spawn(log: EventLog, config: WebhookConfig) -> Result<WebhookHandle, WebhookError> {
        let targets = config.checked_targets()?;
        let client = Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(WebhookError::Client)?;
        let tree = log.db().open_tree(TREE)?;
        let head = log.head();
        let mut checkpoints = Vec::with_capacity(targets.len());
        let mut created = false;
        for (index, target) in targets.iter().enumerate() {
            let checkpoint = match tree.get(&target.key)? {
                Some(bytes) => {
                    let checkpoint =
                        u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| {
                            WebhookError::CorruptCheckpoint {
                                index,
                                len: bytes.len(),
                            }
                        })?);
                    if checkpoint > head {
                        // The log was replaced by a shorter one: what comes next is new.
                        tracing::warn!(webhook = %target.label, checkpoint, head, "webhook checkpoint is past the log's head");
                        head
                    } else {
                        checkpoint
                    }
                }
                None => {
                    // Stored now, so alerts appended from here on reach this
                    // receiver even if the process stops before it gets one.
                    tree.insert(&target.key, &head.to_be_bytes())?;
                    created = true;
                    head
                }
            };
            checkpoints.push(checkpoint);
        }
        if created {
            tree.flush()?;
        }

        let (stop, stopped) = watch::channel(false);
        let mut deliveries = Vec::with_capacity(targets.len());
        for (target, checkpoint) in targets.into_iter().zip(checkpoints) {
            tracing::info!(webhook = %target.label, checkpoint, head, "webhook sending alerts");
            let (through, delivered) = watch::channel(checkpoint);
            let label = target.label.clone();
            let deliverer = Deliverer {
                log: log.clone(),
                client: client.clone(),
                target,
                tree: tree.clone(),
                checkpoint,
                saved: checkpoint,
                through,
                backoff_min: config.backoff_min,
                backoff_max: config.backoff_max,
            };
            deliveries.push(Delivery {
                label,
                delivered,
                task: Some(tokio::spawn(deliverer.run(stopped.clone()))),
            });
        }
        Ok(WebhookHandle {
            deliveries,
            stop,
            tree,
        })
    }
}

/// The running sink. Dropping it aborts the tasks without waiting (each
/// checkpoint stays where it was last written); [`stop`](Self::stop) ends
/// them and flushes the checkpoints.
pub struct WebhookHandle {
    deliveries: Vec<Delivery>,
    stop: watch::Sender<bool>,
    tree: sled::Tree,
}

/// One URL's task and how far it got.
struct Delivery {
    label: String,
    delivered: watch::Receiver<u64>,
    task: Option<JoinHandle<()>>,
}

impl WebhookHandle {
    /// How far the URL at `url_index` (its position in
    /// [`WebhookConfig::urls`]) has got: every alert up to this seq has been
    /// answered 2xx (later events may have been, too).
    ///
    /// Panics when `url_index` is not below the number of URLs.
    pub fn delivered_through(&self, url_index: usize) -> u64 {
        *self.deliveries[url_index].delivered.borrow()
    }

    /// Each URL's label (scheme, host and a short hash of the URL, never the
    /// URL) and how far it has got, as [`Self::delivered_through`]: for the
    /// lag gauge.
    pub fn progress(&self) -> Vec<(String, watch::Receiver<u64>)> {
        self.deliveries
            .iter()
            .map(|delivery| (delivery.label.clone(), delivery.delivered.clone()))
            .collect()
    }

    /// Stops every task at once — a request in flight is abandoned and sent
    /// again on the next start — then writes and flushes the checkpoints.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        for delivery in &mut self.deliveries {
            if let Some(task) = delivery.task.take() {
                if let Err(error) = task.await {
                    tracing::error!(%error, "a webhook task failed");
                }
            }
        }
        if let Err(error) = self.tree.flush_async().await {
            tracing::error!(%error, "flushing the webhook checkpoints failed");
        }
    }
}

impl Drop for WebhookHandle {
    fn drop(&mut self) {
        for delivery in &mut self.deliveries {
            if let Some(task) = delivery.task.take() {
                task.abort();
            }
        }
    }
}

/// A checked URL, its checkpoint key and the name it goes by in logs.
struct Target {
    url: Url,
    /// The SHA-256 (hex) of the URL: the checkpoint's key.
    key: String,
    /// Scheme, host and port, and a short hash: safe to log.
    label: String,
}

fn targets(urls: &[String]) -> Result<Vec<Target>, WebhookError> {
    let mut targets: Vec<Target> = Vec::with_capacity(urls.len());
    for (index, url) in urls.iter().enumerate() {
        let url = Url::parse(url.trim()).map_err(|error| WebhookError::InvalidUrl {
            index,
            reason: error.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(WebhookError::UnsupportedScheme {
                index,
                scheme: url.scheme().to_owned(),
            });
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(WebhookError::InvalidUrl {
                index,
                reason: "no host".to_owned(),
            });
        }
        // Parsing normalizes (`HTTPS://Hooks.Slack.com` is `https://hooks.slack.com/`),
        // so one receiver spelt two ways shares one checkpoint, and is a duplicate.
        let key = sha256_hex(url.as_str());
        if let Some(first) = targets.iter().position(|target| target.key == key) {
            return Err(WebhookError::Duplicate { index, first });
        }
        let label = label(&url, &key);
        targets.push(Target { url, key, label });
    }
    Ok(targets)
}

/// `https://hooks.slack.com #1a2b3c4d`: what identifies a URL in logs.
fn label(url: &Url, key: &str) -> String {
    let mut label = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        let _ = write!(label, ":{port}");
    }
    let _ = write!(label, " #{}", &key[..8]);
    label
}

/// [`label`] for a URL that may not parse (for `Debug`).
fn redacted(url: &str) -> String {
    match Url::parse(url.trim()) {
        Ok(parsed) => label(&parsed, &sha256_hex(parsed.as_str())),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

fn sha256_hex(text: &str) -> String {
    // The API-key hash is a plain SHA-256 of the text.
    let digest = switchboard_events::apikey::hash_key(text).0;
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Why an attempt did not deliver; each is retried after a pause.
enum Failure {
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        answer: String,
    },
    Http(reqwest::Error),
}

/// The stop signal arrived.
struct Stopped;

/// One URL's task: follows the log and delivers its alerts.
struct Deliverer {
    log: EventLog,
    client: Client,
    target: Target,
    tree: sled::Tree,
    /// The last seq handled: delivered, or not an alert.
    checkpoint: u64,
    /// The last seq written to the tree.
    saved: u64,
    through: watch::Sender<u64>,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl Deliverer {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if let Ok(()) = self.follow(&mut stop).await {
            tracing::debug!(webhook = %self.target.label, "the log has closed");
        }
        self.save();
    }

    /// Delivers from the checkpoint on until stopped, or (`Ok`) until the
    /// log has closed.
    async fn follow(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Stopped> {
        let mut backoff = self.backoff_min;
        loop {
            let mut events = self.log.subscribe(self.checkpoint + 1);
            loop {
                let next = match events.try_next() {
                    Some(next) => next,
                    None => {
                        // Caught up: note the non-alerts passed since the last write.
                        self.save();
                        tokio::select! {
                            next = events.next() => match next {
                                Some(next) => next,
                                None => return Ok(()),
                            },
                            () = stopped(stop) => return Err(Stopped),
                        }
                    }
                };
                let envelope = match next {
                    Ok(envelope) => envelope,
                    Err(error) => {
                        self.read_failed(&error, backoff);
                        pause(backoff, stop).await?;
                        backoff = (backoff * 2).min(self.backoff_max);
                        break; // subscribe again from the checkpoint
                    }
                };
                backoff = self.backoff_min;
                let delivered = match alert_text(&envelope.event) {
                    Some(text) => {
                        self.deliver(&envelope, &text, stop).await?;
                        true
                    }
                    None => false,
                };
                self.checkpoint = envelope.seq;
                self.through.send_replace(envelope.seq);
                if delivered {
                    self.save();
                }
            }
        }
    }

    fn read_failed(&self, error: &ReadError, backoff: Duration) {
        tracing::error!(
            webhook = %self.target.label,
            checkpoint = self.checkpoint,
            %error,
            retry_in = ?backoff,
            "webhook reading the log failed"
        );
    }

    /// Sends one alert until the receiver answers 2xx.
    async fn deliver(
        &self,
        envelope: &Envelope,
        text: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let body = Bytes::from(format!(
            r#"{{"text":{},"event":{}}}"#,
            serde_json::Value::from(text),
            envelope.to_json()
        ));
        let id = HeaderValue::from_str(&envelope.id.to_string())
            .expect("a UUID is a valid header value");
        let mut backoff = self.backoff_min;
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let request = self
                .client
                .post(self.target.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(EVENT_ID_HEADER, id.clone())
                .header(IDEMPOTENCY_KEY_HEADER, id.clone())
                .body(body.clone());
            let sent = tokio::select! {
                sent = send(request) => sent,
                () = stopped(stop) => return Err(Stopped),
            };
            let failure = match sent {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(webhook = %self.target.label, seq = envelope.seq, attempt, "webhook delivered after retrying");
                    }
                    return Ok(());
                }
                Err(failure) => failure,
            };
            metrics::counter!("switchboard_webhook_failures_total", "webhook" => self.target.label.clone())
                .increment(1);
            let mut pause_for = backoff;
            match failure {
                Failure::Status {
                    status,
                    retry_after,
                    answer,
                } => {
                    if let Some(asked) = retry_after {
                        pause_for = pause_for.max(asked).min(self.backoff_max);
                    }
                    tracing::warn!(
                        webhook = %self.target.label,
                        seq = envelope.seq,
                        id = %envelope.id,
                        attempt,
                        %status,
                        answer,
                        retry_in = ?pause_for,
                        "webhook refused the alert"
                    );
                }
                Failure::Http(error) => tracing::warn!(
                    webhook = %self.target.label,
                    seq = envelope.seq,
                    id = %envelope.id,
                    attempt,
                    error = %causes(&error.without_url()),
                    retry_in = ?pause_for,
                    "webhook request failed"
                ),
            }
            pause(pause_for, stop).await?;
            backoff = (backoff * 2).min(self.backoff_max);
        }
    }

    /// Writes the checkpoint if it moved. A failed write is logged and left
    /// for the next one: it can only make events be sent again.
    fn save(&mut self) {
        if self.saved == self.checkpoint {
            return;
        }
        match self
            .tree
            .insert(&self.target.key, &self.checkpoint.to_be_bytes())
        {
            Ok(_) => self.saved = self.checkpoint,
            Err(error) => tracing::error!(
                webhook = %self.target.label,
                checkpoint = self.checkpoint,
                %error,
                "writing the webhook checkpoint failed"
            ),
        }
    }
}

/// One attempt: `Ok` on a 2xx answer.
async fn send(request: reqwest::RequestBuilder) -> Result<(), Failure> {
    let response = request.send().await.map_err(Failure::Http)?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // What the receiver says helps an operator (Slack: `no_service`,
    // `invalid_payload`); an answer that cannot be read is not worth a retry.
    let answer = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(LOGGED_BODY_CHARS)
        .collect();
    Err(Failure::Status {
        status,
        retry_after,
        answer,
    })
}

/// `error sending request: client error (Connect): tcp connect error: …`:
/// reqwest's own message says little without its sources.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// Completes once a stop is asked (or the handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Sleeps for `duration` unless a stop comes first.
async fn pause(duration: Duration, stop: &mut watch::Receiver<bool>) -> Result<(), Stopped> {
    tokio::select! {
        () = tokio::time::sleep(duration) => Ok(()),
        () = stopped(stop) => Err(Stopped),
    }
}
