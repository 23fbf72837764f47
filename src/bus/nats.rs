//! The NATS bus: a thin layer over an async-nats client that checks subjects
//! and headers the way the embedded bus does and maps async-nats errors onto
//! [`BusError`].
//!
//! The client reconnects on its own when the server goes away: publishes
//! and requests made meanwhile wait in its queue, and subscriptions are
//! restored on reconnect, so a [`NatsBus`] outlives a server restart.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind};
use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, HeaderMap};
use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{BusError, Headers, Message, Subscription, SubscriptionInner};

/// What async-nats assumes the server accepts until the server says.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// How long [`NatsBus::flush`] waits for the server, reconnects included.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A bus over a NATS connection. Clones share the connection.
#[derive(Clone, Debug)]
pub struct NatsBus {
    client: Client,
    /// Slow-consumer events seen by the connection's event callback.
    dropped: Arc<AtomicU64>,
    /// The server's max payload once known (0: ask the client), so a
    /// publish does not clone the server's whole INFO to learn it.
    max_payload: Arc<AtomicUsize>,
}

/// The first token of the service's own reply subjects. Not NATS's default
/// `_INBOX`, so that a deployment can let applications subscribe to
/// `_INBOX.>` for their replies without letting them read the service's:
/// the HTTP front's requests to the core travel over the service's own
/// connection, and their replies hold raw keys issued, histories and audit
/// pages (deploy/nats.conf).
pub const SERVICE_INBOX_PREFIX: &str = "_INBOX_switchboard";

impl NatsBus {
    /// Connects to `url` (e.g. `nats://127.0.0.1:4222`); servers the
    /// server announces (a cluster's other members) are used on reconnect.
    ///
    /// Returns without waiting for the server: the client connects in the
    /// background and keeps retrying, on start-up as after any disconnect,
    /// and work submitted meanwhile is queued. Only a URL that cannot be
    /// parsed is an error here.
    pub async fn connect(url: &str) -> Result<NatsBus, BusError> {
        let dropped = Arc::new(AtomicU64::new(0));
        let max_payload = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&dropped);
        let known_payload = Arc::clone(&max_payload);
        let mut options = ConnectOptions::new()
            .name("switchboard")
            .custom_inbox_prefix(SERVICE_INBOX_PREFIX)
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let counter = Arc::clone(&counter);
                // A (re)connection may be to a server with other limits.
                if matches!(event, Event::Connected) {
                    known_payload.store(0, Ordering::Relaxed);
                }
                async move { log_event(&event, &counter) }
            });
        // async-nats does not send a URL's own credentials
        // (`nats://user:password@host`, `nats://token@host`): pass them on.
        if let Ok(addr) = url.parse::<async_nats::ServerAddr>() {
            match (addr.username(), addr.password()) {
                (Some(user), Some(password)) => {
                    options = options.user_and_password(user.to_owned(), password.to_owned());
                }
                (Some(token), None) => options = options.token(token.to_owned()),
                _ => {}
            }
        }
        NatsBus::connect_with(url, options, dropped, max_payload).await
    }

    /// Connects with the caller's options (authentication, TLS, ...). The
    /// options' event callback, if any, is kept, so
    /// [`dropped_messages`](Self::dropped_messages) stays 0 here unless the
    /// caller counts slow consumers itself.
    pub async fn connect_with_options(
        url: &str,
        options: ConnectOptions,
    ) -> Result<NatsBus, BusError> {
        NatsBus::connect_with(url, options, Arc::default(), Arc::default()).await
    }

    async fn connect_with(
        url: &str,
        options: ConnectOptions,
        dropped: Arc<AtomicU64>,
        max_payload: Arc<AtomicUsize>,
    ) -> Result<NatsBus, BusError> {
        let client = options
            .connect(url)
            .await
            .map_err(|source| BusError::Connect {
                url: redact_url(url),
                source,
            })?;
        Ok(NatsBus {
            client,
            dropped,
            max_payload,
        })
    }

    /// Wraps a client connected elsewhere.
    pub fn from_client(client: Client) -> NatsBus {
        NatsBus {
            client,
            dropped: Arc::default(),
            max_payload: Arc::default(),
        }
    }

    /// The underlying client, for what the bus does not cover (JetStream,
    /// the service API).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the client is connected to a server right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Slow-consumer events seen so far (see [`super::Bus::dropped_messages`]).
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(super) async fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        super::literal_subject(subject)?;
        super::check_outgoing(&headers, &payload, self.max_payload())?;
        let size = headers.wire_len() + payload.len();
        let outcome = if headers.is_empty() {
            self.client.publish(subject.to_string(), payload).await
        } else {
            self.client
                .publish_with_headers(subject.to_string(), to_header_map(&headers), payload)
                .await
        };
        outcome.map_err(|error| match error.kind() {
            // The client checks against its own copy of the limit, which
            // can differ from ours for a moment around a (re)connect.
            PublishErrorKind::MaxPayloadExceeded => BusError::PayloadTooLarge {
                size,
                max: self.max_payload(),
            },
            _ => disconnected("publish", error),
        })
    }

    pub(super) async fn subscribe(
        &self,
        pattern: &str,
        group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        super::pattern(pattern)?;
        let subscriber = match group {
            None => self.client.subscribe(pattern.to_string()).await,
            Some(group) => {
                self.client
                    .queue_subscribe(pattern.to_string(), group.to_string())
                    .await
            }
        }
        .map_err(|error| disconnected("subscribe", error))?;
        Ok(Subscription {
            pattern: pattern.to_string(),
            inner: SubscriptionInner::Nats(NatsSubscription { subscriber }),
        })
    }

    pub(super) async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        super::literal_subject(subject)?;
        super::check_outgoing(&headers, &payload, self.max_payload())?;
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if !headers.is_empty() {
            request = request.headers(to_header_map(&headers));
        }
        let timed_out = || BusError::Timeout {
            subject: subject.to_string(),
            timeout,
        };
        // The client's own timeout covers waiting for the reply; the outer
        // one also covers queueing the request while the client reconnects.
        let reply = tokio::time::timeout(
            timeout,
            self.client.send_request(subject.to_string(), request),
        )
        .await
        .map_err(|_| timed_out())?;
        match reply {
            Ok(message) => Ok(from_nats(message)),
            Err(error) => Err(match error.kind() {
                RequestErrorKind::TimedOut => timed_out(),
                RequestErrorKind::NoResponders => BusError::NoResponders {
                    subject: subject.to_string(),
                },
                RequestErrorKind::Other => disconnected("request", error),
            }),
        }
    }

    /// Writes out everything queued, then waits for the server to have
    /// processed it: async-nats's own `flush` only empties the socket
    /// buffer, so this sends a message to a fresh inbox of this connection
    /// and waits for it to come back. The server handles one connection's
    /// commands in order, so once it is back, every earlier publish,
    /// subscribe and unsubscribe has taken effect on the server.
    pub(super) async fn flush(&self) -> Result<(), BusError> {
        let inbox = self.client.new_inbox();
        let barrier = async {
            let mut echo = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|error| disconnected("flush", error))?;
            self.client
                .publish(inbox.clone(), Bytes::new())
                .await
                .map_err(|error| disconnected("flush", error))?;
            self.client
                .flush()
                .await
                .map_err(|error| disconnected("flush", error))?;
            match echo.next().await {
                Some(_) => Ok(()),
                None => Err(BusError::Disconnected {
                    operation: "flush",
                    source: "the connection closed".into(),
                }),
            }
        };
        tokio::time::timeout(FLUSH_TIMEOUT, barrier)
            .await
            .map_err(|_| BusError::Timeout {
                subject: inbox,
                timeout: FLUSH_TIMEOUT,
            })?
    }

    /// The server's limit on headers + payload. Before the first connect it
    /// is not known yet; then assume the default, as async-nats does.
    fn max_payload(&self) -> usize {
        match self.max_payload.load(Ordering::Relaxed) {
            0 => match self.client.server_info().max_payload {
                0 => DEFAULT_MAX_PAYLOAD,
                known => {
                    self.max_payload.store(known, Ordering::Relaxed);
                    known
                }
            },
            known => known,
        }
    }
}

/// The subscription end of a [`NatsBus`] subscription.
#[derive(Debug)]
pub(super) struct NatsSubscription {
    subscriber: async_nats::Subscriber,
}

impl NatsSubscription {
    /// Unsubscribes, leaving the messages already on their way to be read;
    /// the stream ends after them.
    pub(super) async fn drain(&mut self) -> Result<(), BusError> {
        self.subscriber
            .drain()
            .await
            .map_err(|error| disconnected("drain", error))
    }

    pub(super) async fn unsubscribe(mut self) -> Result<(), BusError> {
        self.subscriber
            .unsubscribe()
            .await
            .map_err(|error| disconnected("unsubscribe", error))
    }
}

impl Stream for NatsSubscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        Pin::new(&mut self.subscriber)
            .poll_next(cx)
            .map(|message| message.map(from_nats))
    }
}

fn to_header_map(headers: &Headers) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers.iter() {
        map.append(name, value);
    }
    map
}

fn from_header_map(map: &HeaderMap) -> Headers {
    let mut headers = Headers::new();
    for (name, values) in map.iter() {
        for value in values {
            headers.append(name.to_string(), value.as_str());
        }
    }
    headers
}

fn from_nats(message: async_nats::Message) -> Message {
    Message {
        subject: message.subject.to_string(),
        reply: message.reply.map(|reply| reply.to_string()),
        headers: message
            .headers
            .as_ref()
            .map(from_header_map)
            .unwrap_or_default(),
        payload: message.payload,
    }
}

fn disconnected(
    operation: &'static str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> BusError {
    BusError::Disconnected {
        operation,
        source: Box::new(error),
    }
}

fn log_event(event: &Event, dropped: &AtomicU64) {
    match event {
        Event::Connected => tracing::info!("NATS connected"),
        Event::Disconnected => {
            // Each disconnection is followed by reconnection attempts.
            metrics::counter!("switchboard_nats_reconnects_total").increment(1);
            tracing::warn!("NATS disconnected; reconnecting");
        }
        Event::SlowConsumer(sid) => {
            if dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    sid,
                    "slow consumer: subscription buffer full, dropping messages"
                );
            }
        }
        other => tracing::warn!(event = %other, "NATS client event"),
    }
}

/// `url` without its user info (`nats://user:secret@host` → `nats://host`),
/// for logs and messages: a NATS URL may carry a password.
/// A list of servers (`nats://u:p@h1,nats://u:p@h2`) is redacted server by
/// server; a password may hold `/`, so the user info ends at the last `@`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|server| match server.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{host}")
            }
            None => server
                .rsplit_once('@')
                .map_or(server, |(_, host)| host)
                .to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn user_info_is_left_out() {
        assert_eq!(
            redact_url("nats://svc:s3cret@nats:4222"),
            "nats://nats:4222"
        );
        assert_eq!(redact_url("nats://tok@nats:4222/x"), "nats://nats:4222/x");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("svc:pw@host:4222"), "host:4222");
        assert_eq!(
            redact_url("nats://u:p1@h1:4222,nats://u:p2@h2:4222"),
            "nats://h1:4222,nats://h2:4222"
        );
        assert_eq!(redact_url("nats://u:a/b@h:4222"), "nats://h:4222");
    }
}
