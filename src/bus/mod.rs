//! The message bus (DESIGN §9): NATS subject semantics over one of two
//! transports.
//!
//! - [`NatsBus`] speaks to a real `nats-server` through async-nats.
//! - [`LocalBus`] is embedded: the same semantics inside one process, so
//!   `switchboard serve` runs with nothing else installed.
//!
//! Code that uses the bus holds a [`Bus`] and does not care which one it is.
//! Both give: literal subjects with `*` and `>` wildcards in subscriptions
//! ([`subject`]), queue groups (each message to one member of each group, and
//! to every plain subscriber), request/reply with a timeout and a prompt
//! [`BusError::NoResponders`] when nobody listens, and [`Headers`] passed
//! through unchanged. `tests/bus_contract.rs` runs one suite against both.
//!
//! What neither promises, as in NATS: delivery to a subscriber that does not
//! keep up. Each subscription buffers a bounded number of messages; when the
//! buffer is full further messages to it are dropped and counted
//! ([`Bus::dropped_messages`]), and the publisher never waits.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), switchboard::bus::BusError> {
//! use std::time::Duration;
//! use switchboard::bus::{Bus, Headers, LocalBus};
//!
//! let bus = Bus::from(LocalBus::new());
//! let mut requests = bus.queue_subscribe("sb.conv.*.send", "core").await?;
//! let responder = bus.clone();
//! tokio::spawn(async move {
//!     while let Some(request) = requests.recv().await {
//!         let _ = responder.respond(&request, Headers::new(), "ack").await;
//!     }
//! });
//! let reply = bus
//!     .request("sb.conv.c1.send", Headers::new(), "hi", Duration::from_secs(5))
//!     .await?;
//! assert_eq!(&reply.payload[..], b"ack");
//! # Ok(())
//! # }
//! ```

mod headers;
mod local;
mod nats;
pub mod subject;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use headers::{HeaderError, Headers, NATS_MSG_ID};
pub use local::{LocalBus, LocalBusConfig};
pub use nats::{redact_url, NatsBus, SERVICE_INBOX_PREFIX};
pub use subject::SubjectError;

/// A message as a subscriber receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published to (never a wildcard).
    pub subject: String,
    /// Where a reply goes, when the message is a request; see
    /// [`Bus::respond`].
    pub reply: Option<String>,
    /// Headers as the publisher set them (empty when it set none).
    pub headers: Headers,
    /// The body, byte for byte.
    pub payload: Bytes,
}

/// What can go wrong on the bus. Each kind has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The subject (or subscription pattern) is not valid; nothing was sent.
    #[error("invalid subject {subject:?}: {source}")]
    InvalidSubject {
        /// The refused subject.
        subject: String,
        /// What is wrong with it.
        #[source]
        source: SubjectError,
    },
    /// The queue group name is not valid; nothing was subscribed.
    #[error("invalid queue group {group:?}: {source}")]
    InvalidQueueGroup {
        /// The refused name.
        group: String,
        /// What is wrong with it.
        #[source]
        source: SubjectError,
    },
    /// A header name or value cannot go on the wire; nothing was sent.
    #[error(transparent)]
    InvalidHeader(#[from] HeaderError),
    /// Headers and payload together exceed the maximum payload (the
    /// server's `max_payload`, 1 MiB by default); nothing was sent.
    #[error("message of {size} bytes exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge {
        /// Header and payload bytes of the refused message.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Nobody subscribes to the request's subject. Reported at once, not
    /// after the timeout.
    #[error("no responders on {subject}")]
    NoResponders {
        /// The request's subject.
        subject: String,
    },
    /// Someone subscribes to the request's subject, but no reply came in
    /// time.
    #[error("request on {subject} timed out after {timeout:?}")]
    Timeout {
        /// The request's subject.
        subject: String,
        /// How long the request waited.
        timeout: Duration,
    },
    /// [`Bus::respond`] to a message that is not a request.
    #[error("message on {subject} has no reply subject")]
    NoReplySubject {
        /// The subject of the message that was answered.
        subject: String,
    },
    /// The NATS URL or options were refused before any connection attempt.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL given.
        url: String,
        /// Why async-nats refused it.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The connection to NATS is closed or failing; the operation did not
    /// complete. (While NATS is merely away, the client queues work and
    /// reconnects; this is for failures it cannot ride out.)
    #[error("bus disconnected during {operation}: {source}")]
    Disconnected {
        /// What was being done: `publish`, `subscribe`, `request`, ...
        operation: &'static str,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BusError {
    /// A stable machine-readable code for the kind of error.
    pub fn code(&self) -> &'static str {
        match self {
            BusError::InvalidSubject { .. } => "invalid_subject",
            BusError::InvalidQueueGroup { .. } => "invalid_queue_group",
            BusError::InvalidHeader(_) => "invalid_header",
            BusError::PayloadTooLarge { .. } => "payload_too_large",
            BusError::NoResponders { .. } => "no_responders",
            BusError::Timeout { .. } => "timeout",
            BusError::NoReplySubject { .. } => "no_reply_subject",
            BusError::Connect { .. } => "connect",
            BusError::Disconnected { .. } => "disconnected",
        }
    }
}

/// A bus: the embedded one or NATS.
///
/// An enum rather than a trait object because DESIGN §9 names exactly two
/// transports and the choice is made once, at start-up, from configuration;
/// callers get plain `async fn`s without generics or boxing. Cloning is cheap
/// and clones share the connection (or the embedded registry).
///
/// Ordering: messages from one `Bus` handle to one subscription arrive in the
/// order they were published. A subscription made through a handle is in
/// place for publishes made afterwards through the same handle. For a
/// publisher on another NATS connection (another process), it is in place
/// once [`flush`](Self::flush) on the subscribing handle has returned.
#[derive(Clone, Debug)]
pub enum Bus {
    /// The in-process bus.
    Local(LocalBus),
    /// A NATS connection.
    Nats(NatsBus),
}

impl From<LocalBus> for Bus {
    fn from(bus: LocalBus) -> Bus {
        Bus::Local(bus)
    }
}

impl From<NatsBus> for Bus {
    fn from(bus: NatsBus) -> Bus {
        Bus::Nats(bus)
    }
}

impl Bus {
    /// Whether messages reach the server now: always for the embedded bus.
    pub fn is_connected(&self) -> bool {
        match self {
            Bus::Local(_) => true,
            Bus::Nats(nats) => nats.is_connected(),
        }
    }

    /// Publishes a message to a literal subject (no wildcards). Returns once
    /// the message is handed to the transport, without waiting for
    /// subscribers; see [`flush`](Self::flush).
    pub async fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), BusError> {
        let payload = payload.into();
        match self {
            Bus::Local(bus) => bus.publish(subject, headers, payload),
            Bus::Nats(bus) => bus.publish(subject, headers, payload).await,
        }
    }

    /// Whether a message published on `subject` now would reach anyone:
    /// on the embedded bus, whether a subscription matches it; on NATS
    /// always `true` (only the server knows). For publishers that would
    /// rather not build a message nobody takes.
    pub fn has_subscriber(&self, subject: &str) -> bool {
        match self {
            Bus::Local(bus) => bus.has_subscriber(subject),
            Bus::Nats(_) => true,
        }
    }

    /// Subscribes to a subject or pattern (`*`, `>`). Every plain
    /// subscription receives every matching message. Dropping the
    /// [`Subscription`] unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, BusError> {
        match self {
            Bus::Local(bus) => bus.subscribe(pattern, None),
            Bus::Nats(bus) => bus.subscribe(pattern, None).await,
        }
    }

    /// Subscribes as a member of queue group `group`: each matching message
    /// goes to exactly one member of the group (whatever pattern each member
    /// used), while plain subscribers still get their own copy.
    pub async fn queue_subscribe(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, BusError> {
        subject::validate_queue_group(group).map_err(|source| BusError::InvalidQueueGroup {
            group: group.to_string(),
            source,
        })?;
        match self {
            Bus::Local(bus) => bus.subscribe(pattern, Some(group)),
            Bus::Nats(bus) => bus.subscribe(pattern, Some(group)).await,
        }
    }

    /// Sends a request and waits up to `timeout` for the first reply.
    ///
    /// Fails with [`BusError::NoResponders`] at once when no subscription
    /// matches `subject`, and with [`BusError::Timeout`] when one does but no
    /// reply arrives in time.
    pub async fn request(
        &self,
        subject: &str,
        headers: Headers,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, BusError> {
        let payload = payload.into();
        match self {
            Bus::Local(bus) => bus.request(subject, headers, payload, timeout).await,
            Bus::Nats(bus) => bus.request(subject, headers, payload, timeout).await,
        }
    }

    /// Answers a request: publishes to its reply subject.
    pub async fn respond(
        &self,
        request: &Message,
        headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<(), BusError> {
        let reply = request
            .reply
            .as_deref()
            .ok_or_else(|| BusError::NoReplySubject {
                subject: request.subject.clone(),
            })?;
        self.publish(reply, headers, payload).await
    }

    /// Waits until the server has processed everything sent so far through
    /// this handle: publishes, subscribes and unsubscribes (a round trip to
    /// the NATS server, waiting through a reconnect for up to 10 seconds,
    /// then [`BusError::Timeout`]). The embedded bus acts on each call at
    /// once, so there it returns immediately.
    pub async fn flush(&self) -> Result<(), BusError> {
        match self {
            Bus::Local(_) => Ok(()),
            Bus::Nats(bus) => bus.flush().await,
        }
    }

    /// Messages dropped so far because a subscriber's buffer was full (slow
    /// consumers). Exact on the embedded bus; on NATS it counts the client's
    /// slow-consumer events, which may miss some under heavy loss.
    pub fn dropped_messages(&self) -> u64 {
        match self {
            Bus::Local(bus) => bus.dropped_messages(),
            Bus::Nats(bus) => bus.dropped_messages(),
        }
    }
}

/// A stream of the messages for one subscription. Dropping it unsubscribes;
/// [`unsubscribe`](Self::unsubscribe) does the same but, on NATS, returns
/// only once the unsubscribe is queued ahead of later publishes.
#[derive(Debug)]
pub struct Subscription {
    pattern: String,
    inner: SubscriptionInner,
}

#[derive(Debug)]
enum SubscriptionInner {
    Local(local::LocalSubscription),
    Nats(nats::NatsSubscription),
}

impl Subscription {
    /// The subject or pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The next message; `None` once the subscription has ended (after an
    /// unsubscribe, or when the NATS client is closed).
    pub async fn recv(&mut self) -> Option<Message> {
        futures::StreamExt::next(self).await
    }

    /// Stops delivery but keeps what was already delivered: the stream
    /// yields the messages buffered (and, on NATS, those the server sent
    /// before it took the unsubscribe in), then ends.
    pub async fn drain(&mut self) -> Result<(), BusError> {
        match &mut self.inner {
            SubscriptionInner::Local(subscription) => {
                subscription.drain();
                Ok(())
            }
            SubscriptionInner::Nats(subscription) => subscription.drain().await,
        }
    }

    /// Stops delivery. Messages already buffered are discarded.
    pub async fn unsubscribe(self) -> Result<(), BusError> {
        match self.inner {
            SubscriptionInner::Local(subscription) => {
                drop(subscription);
                Ok(())
            }
            SubscriptionInner::Nats(subscription) => subscription.unsubscribe().await,
        }
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        match &mut self.inner {
            SubscriptionInner::Local(subscription) => Pin::new(subscription).poll_next(cx),
            SubscriptionInner::Nats(subscription) => Pin::new(subscription).poll_next(cx),
        }
    }
}

/// Checks that `subject` names one subject (no wildcards).
fn literal_subject(subject: &str) -> Result<(), BusError> {
    subject::validate_subject(subject).map_err(|source| BusError::InvalidSubject {
        subject: subject.to_string(),
        source,
    })
}

/// Parses a subscription pattern.
fn pattern(pattern: &str) -> Result<subject::Pattern, BusError> {
    subject::Pattern::parse(pattern).map_err(|source| BusError::InvalidSubject {
        subject: pattern.to_string(),
        source,
    })
}

/// Checks headers and size of an outgoing message against `max_payload`
/// (0: unknown, not checked here).
fn check_outgoing(headers: &Headers, payload: &Bytes, max_payload: usize) -> Result<(), BusError> {
    headers.validate()?;
    let size = headers.wire_len() + payload.len();
    if max_payload > 0 && size > max_payload {
        return Err(BusError::PayloadTooLarge {
            size,
            max: max_payload,
        });
    }
    Ok(())
}
