//! The embedded bus: NATS subject semantics inside one process.
//!
//! One registry of subscriptions behind a mutex. A publish takes the lock,
//! finds the matching subscriptions and `try_send`s the message into each
//! one's bounded channel; it never awaits while holding the lock, so it never
//! blocks on a subscriber, and because publishes are serialized by the lock
//! every subscriber sees them in one order.
//!
//! Slow consumers: a subscription whose buffer is full loses the message, the
//! bus counts it ([`LocalBus::dropped_messages`]) and logs the first loss per
//! subscription, as a NATS client does when its subscription buffer fills.
//! A queue group message goes to a member with room, and is dropped only
//! when every member's buffer is full.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::subject::Pattern;
use super::{BusError, Headers, Message, Subscription, SubscriptionInner};

/// Limits of a [`LocalBus`]; the defaults are NATS's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalBusConfig {
    /// Messages a subscription buffers before further ones are dropped
    /// (async-nats's default: 65,536). Memory is used only for messages
    /// actually waiting.
    pub subscription_capacity: usize,
    /// Largest headers + payload accepted (nats-server's default: 1 MiB).
    pub max_payload: usize,
}

impl Default for LocalBusConfig {
    fn default() -> LocalBusConfig {
        LocalBusConfig {
            subscription_capacity: 65_536,
            max_payload: 1024 * 1024,
        }
    }
}

/// The in-process bus. Clones share one registry: a message published
/// through any clone reaches subscriptions made through any other.
#[derive(Clone, Debug)]
pub struct LocalBus {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    registry: Mutex<Registry>,
    config: LocalBusConfig,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    next_inbox: u64,
    /// Subscriptions without wildcards, by subject: one lookup per publish.
    literal: HashMap<String, Vec<Entry>>,
    /// Subscriptions with wildcards, tried one by one on every publish.
    wildcard: Vec<Entry>,
    /// Reply inboxes of requests in flight; the first reply wins.
    inboxes: HashMap<String, oneshot::Sender<Message>>,
    /// Rotates which member of a queue group is offered a message first.
    queue_turn: usize,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    pattern: Pattern,
    group: Option<String>,
    sender: mpsc::Sender<Message>,
    /// Set on the first message this subscription lost, so the loss is
    /// logged once rather than per message.
    lossy: bool,
}

impl Default for LocalBus {
    fn default() -> LocalBus {
        LocalBus::new()
    }
}

impl LocalBus {
    /// A bus with NATS's default limits.
    pub fn new() -> LocalBus {
        LocalBus::with_config(LocalBusConfig::default())
    }

    /// A bus with the given limits (a capacity of 0 is taken as 1).
    pub fn with_config(config: LocalBusConfig) -> LocalBus {
        LocalBus {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::default()),
                config: LocalBusConfig {
                    subscription_capacity: config.subscription_capacity.max(1),
                    ..config
                },
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Messages lost so far because a subscriber's buffer was full.
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    pub(super) fn publish(
        &self,
        subject: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<(), BusError> {
        super::literal_subject(subject)?;
        super::check_outgoing(&headers, &payload, self.shared.config.max_payload)?;
        self.deliver(Message {
            subject: subject.to_string(),
            reply: None,
            headers,
            payload,
        });
        Ok(())
    }

    /// Whether a subscription matches `subject` (a request's inbox aside).
    pub(super) fn has_subscriber(&self, subject: &str) -> bool {
        let registry = self.shared.lock();
        registry.literal.get(subject).is_some_and(|e| !e.is_empty())
            || registry.wildcard.iter().any(|e| e.pattern.matches(subject))
    }

    pub(super) fn subscribe(
        &self,
        pattern: &str,
        group: Option<&str>,
    ) -> Result<Subscription, BusError> {
        let parsed = super::pattern(pattern)?;
        let (sender, receiver) = mpsc::channel(self.shared.config.subscription_capacity);
        let literal_key = parsed.is_literal().then(|| parsed.as_str().to_string());
        let mut registry = self.shared.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        let entry = Entry {
            id,
            pattern: parsed,
            group: group.map(str::to_string),
            sender,
            lossy: false,
        };
        match &literal_key {
            Some(subject) => registry
                .literal
                .entry(subject.clone())
                .or_default()
                .push(entry),
            None => registry.wildcard.push(entry),
        }
        drop(registry);
        Ok(Subscription {
            pattern: pattern.to_string(),
            inner: SubscriptionInner::Local(LocalSubscription {
                receiver,
                registration: Some(Registration {
                    shared: Arc::downgrade(&self.shared),
                    id,
                    literal_key,
                }),
            }),
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
        super::check_outgoing(&headers, &payload, self.shared.config.max_payload)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        // The inbox exists before the request goes out, so even an
        // immediate reply finds it.
        let inbox = {
            let mut registry = self.shared.lock();
            let inbox = format!("_INBOX.local.{}", registry.next_inbox);
            registry.next_inbox += 1;
            registry.inboxes.insert(inbox.clone(), reply_tx);
            inbox
        };
        let _inbox = InboxGuard {
            shared: &self.shared,
            inbox: inbox.clone(),
        };
        let matched = self.deliver(Message {
            subject: subject.to_string(),
            reply: Some(inbox),
            headers,
            payload,
        });
        if matched == 0 {
            return Err(BusError::NoResponders {
                subject: subject.to_string(),
            });
        }
        match tokio::time::timeout(timeout, reply_rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // The sender only goes away with the inbox, which this call owns;
            // treat it like no reply at all.
            Ok(Err(_)) | Err(_) => Err(BusError::Timeout {
                subject: subject.to_string(),
                timeout,
            }),
        }
    }

    /// Hands `message` to every matching subscription (one member per queue
    /// group) and returns how many subscriptions matched, whether or not
    /// they had room.
    fn deliver(&self, message: Message) -> usize {
        let mut guard = self.shared.lock();
        let registry = &mut *guard;
        let mut matched = 0;
        if let Some(reply) = registry.inboxes.remove(&message.subject) {
            matched += 1;
            // The requester may have given up meanwhile; then nobody wants it.
            let _ = reply.send(message.clone());
        }

        let subject = message.subject.as_str();
        let literal = registry.literal.get_mut(subject).into_iter().flatten();
        let wildcard = registry
            .wildcard
            .iter_mut()
            .filter(|entry| entry.pattern.matches(subject));
        let mut groups: Vec<(String, Vec<&mut Entry>)> = Vec::new();
        for entry in literal.chain(wildcard) {
            matched += 1;
            match entry.group.clone() {
                None => {
                    if !offer(entry, &message) {
                        self.shared.count_drop(entry);
                    }
                }
                Some(group) => match groups.iter_mut().find(|(name, _)| *name == group) {
                    Some((_, members)) => members.push(entry),
                    None => groups.push((group, vec![entry])),
                },
            }
        }

        let turn = registry.queue_turn;
        registry.queue_turn = registry.queue_turn.wrapping_add(1);
        for (_, mut members) in groups {
            let count = members.len();
            let first = turn % count;
            let delivered = (0..count).any(|step| offer(members[(first + step) % count], &message));
            if !delivered {
                self.shared.count_drop(members[first]);
            }
        }
        matched
    }
}

impl Shared {
    /// The registry, even if a thread panicked while holding it: every
    /// update to it is a single insert or remove, so it is never left
    /// half-changed.
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count_drop(&self, entry: &mut Entry) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if !entry.lossy {
            entry.lossy = true;
            tracing::warn!(
                pattern = entry.pattern.as_str(),
                capacity = self.config.subscription_capacity,
                "slow consumer: subscription buffer full, dropping messages"
            );
        }
    }
}

/// Tries to hand a copy of `message` to one subscription without waiting.
/// A closed subscription (its receiver is being dropped) is not a loss.
fn offer(entry: &mut Entry, message: &Message) -> bool {
    match entry.sender.try_send(message.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => false,
        Err(mpsc::error::TrySendError::Closed(_)) => true,
    }
}

/// The receiving end of a [`LocalBus`] subscription.
#[derive(Debug)]
pub(super) struct LocalSubscription {
    receiver: mpsc::Receiver<Message>,
    /// `None` once drained.
    registration: Option<Registration>,
}

impl LocalSubscription {
    /// Takes no more messages; those already delivered are still read, then
    /// the stream ends (the registry held the only sender).
    pub(super) fn drain(&mut self) {
        self.registration = None;
    }
}

impl Stream for LocalSubscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.receiver.poll_recv(cx)
    }
}

/// Removes its subscription from the registry when dropped, so a request
/// made right after the drop already sees no responder.
#[derive(Debug)]
struct Registration {
    shared: Weak<Shared>,
    id: u64,
    literal_key: Option<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut registry = shared.lock();
        match &self.literal_key {
            Some(subject) => {
                if let Some(entries) = registry.literal.get_mut(subject) {
                    entries.retain(|entry| entry.id != self.id);
                    if entries.is_empty() {
                        registry.literal.remove(subject);
                    }
                }
            }
            None => registry.wildcard.retain(|entry| entry.id != self.id),
        }
    }
}

/// Removes a request's inbox when the request ends, however it ends
/// (reply, timeout, or the caller dropping the future).
struct InboxGuard<'a> {
    shared: &'a Shared,
    inbox: String,
}

impl Drop for InboxGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().inboxes.remove(&self.inbox);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    fn small_bus(capacity: usize) -> Bus {
        Bus::from(LocalBus::with_config(LocalBusConfig {
            subscription_capacity: capacity,
            ..LocalBusConfig::default()
        }))
    }

    #[tokio::test]
    async fn slow_consumer_loses_messages_and_publisher_never_blocks() {
        let bus = small_bus(4);
        let mut slow = bus.subscribe("load").await.expect("subscribe");
        for n in 0..10u8 {
            bus.publish("load", Headers::new(), vec![n])
                .await
                .expect("publish never waits for the subscriber");
        }
        assert_eq!(bus.dropped_messages(), 6);
        // The first four, in order; the rest were dropped.
        for n in 0..4u8 {
            let message = slow.recv().await.expect("buffered");
            assert_eq!(&message.payload[..], [n]);
        }
        // Once there is room again, delivery resumes.
        bus.publish("load", Headers::new(), vec![99])
            .await
            .expect("publish");
        assert_eq!(&slow.recv().await.expect("delivered").payload[..], [99]);
    }

    #[tokio::test]
    async fn queue_group_skips_a_full_member() {
        let bus = small_bus(1);
        let mut a = bus.queue_subscribe("job", "workers").await.expect("sub");
        let mut b = bus.queue_subscribe("job", "workers").await.expect("sub");
        bus.publish("job", Headers::new(), "1").await.expect("pub");
        bus.publish("job", Headers::new(), "2").await.expect("pub");
        // Both members are now full; the third message has nowhere to go.
        bus.publish("job", Headers::new(), "3").await.expect("pub");
        assert_eq!(bus.dropped_messages(), 1);
        let mut got = vec![
            a.recv().await.expect("a has one").payload,
            b.recv().await.expect("b has one").payload,
        ];
        got.sort();
        assert_eq!(got, [Bytes::from("1"), Bytes::from("2")]);
    }

    #[tokio::test]
    async fn dropped_subscription_leaves_the_registry() {
        let local = LocalBus::new();
        let bus = Bus::from(local.clone());
        let literal = bus.subscribe("a.b").await.expect("sub");
        let wildcard = bus.subscribe("a.*").await.expect("sub");
        drop(literal);
        drop(wildcard);
        let registry = local.shared.lock();
        assert!(registry.literal.is_empty());
        assert!(registry.wildcard.is_empty());
    }

    #[tokio::test]
    async fn has_subscriber_follows_the_subscriptions() {
        let bus = Bus::from(LocalBus::new());
        assert!(!bus.has_subscriber("a.b.c"));
        let literal = bus.subscribe("a.b.c").await.expect("sub");
        assert!(bus.has_subscriber("a.b.c"));
        assert!(!bus.has_subscriber("a.b.d"));
        drop(literal);
        assert!(!bus.has_subscriber("a.b.c"));
        let _wildcard = bus.queue_subscribe("a.*.>", "g").await.expect("sub");
        assert!(bus.has_subscriber("a.b.d"));
        assert!(!bus.has_subscriber("a.b"));
    }

    #[tokio::test]
    async fn finished_requests_leave_no_inbox() {
        let local = LocalBus::new();
        let bus = Bus::from(local.clone());
        let _silent = bus.subscribe("silent").await.expect("sub");
        let outcome = bus
            .request("silent", Headers::new(), "", Duration::from_millis(10))
            .await;
        assert!(matches!(outcome, Err(BusError::Timeout { .. })));
        let outcome = bus
            .request("nobody", Headers::new(), "", Duration::from_millis(10))
            .await;
        assert!(matches!(outcome, Err(BusError::NoResponders { .. })));
        assert!(local.shared.lock().inboxes.is_empty());
    }
}
