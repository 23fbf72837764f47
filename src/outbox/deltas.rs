//! Reply deltas on their way to a bus, in their place among the stored
//! events.
//!
//! A turn streams as soon as its message is written, before the message is
//! durable, and so before the log's follower on a bus (the outbox on NATS,
//! the front's feed on the HTTP front's bus) has published its
//! `message_received`. Published straight away, a delta could reach a
//! subscriber before its message, or tell of a message a crash then lost.
//! Waiting for the follower in the turn instead would hold up the turn's end
//! by the follower's pace (the outbox gathers its publishes for up to a
//! millisecond).
//!
//! So the gateway queues each delta here with the seq of its turn's message,
//! and the follower publishes it between the events: once it has published
//! that message, and before the next event it publishes. A turn's end is
//! stored after its deltas are queued, so it goes out after them. Deltas are
//! live only: a follower that is away (NATS down) keeps at most
//! [`DELTAS_QUEUED_MAX`] of them, and later ones are dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::bus::{Bus, Headers};

/// Deltas a queue keeps for a follower that is not publishing, at most.
pub const DELTAS_QUEUED_MAX: usize = 16 * 1024;

/// One reply delta for a bus.
#[derive(Debug, Clone)]
pub struct Delta {
    /// The seq of the turn's `message_received`: the delta goes out after it.
    pub message_seq: u64,
    pub subject: String,
    pub headers: Headers,
    pub payload: Bytes,
}

/// Deltas waiting for a log follower. Cheap to clone: clones share the queue.
#[derive(Clone, Default)]
pub struct DeltaQueue {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    queued: Mutex<Queued>,
    pushed: Notify,
}

#[derive(Default)]
struct Queued {
    /// By message seq, then by arrival, so a turn's deltas stay in order.
    deltas: BTreeMap<(u64, u64), Delta>,
    arrivals: u64,
    /// Full, and said so in the log (once per filling).
    full: bool,
}

impl DeltaQueue {
    pub fn new() -> DeltaQueue {
        DeltaQueue::default()
    }

    /// Queues `delta` for its follower; `false` when the queue is full and
    /// the delta was dropped.
    pub fn push(&self, delta: Delta) -> bool {
        {
            let mut queued = self.inner.queued.lock().expect("delta queue lock");
            if queued.deltas.len() >= DELTAS_QUEUED_MAX {
                if !queued.full {
                    queued.full = true;
                    tracing::warn!(
                        queued = DELTAS_QUEUED_MAX,
                        "reply deltas dropped: the bus's follower of the log is not publishing"
                    );
                }
                return false;
            }
            let arrival = queued.arrivals;
            queued.arrivals += 1;
            queued.deltas.insert((delta.message_seq, arrival), delta);
        }
        self.inner.pushed.notify_one();
        true
    }

    /// Takes the deltas of the messages up to seq `through`: by message,
    /// each message's in the order they came.
    pub fn take_through(&self, through: u64) -> Vec<Delta> {
        let mut queued = self.inner.queued.lock().expect("delta queue lock");
        let Some((&(first, _), _)) = queued.deltas.first_key_value() else {
            return Vec::new();
        };
        if first > through {
            return Vec::new();
        }
        let later = match through.checked_add(1) {
            Some(next) => queued.deltas.split_off(&(next, 0)),
            None => BTreeMap::new(),
        };
        let taken = std::mem::replace(&mut queued.deltas, later);
        queued.full = false;
        taken.into_values().collect()
    }

    /// Publishes on `bus` the deltas of the messages up to seq `through`
    /// (which the follower has published), best effort: deltas are live
    /// only.
    pub async fn publish_through(&self, bus: &Bus, through: u64) {
        for delta in self.take_through(through) {
            if let Err(error) = bus
                .publish(&delta.subject, delta.headers, delta.payload)
                .await
            {
                tracing::debug!(subject = delta.subject, %error, "a reply delta was not published");
            }
        }
    }

    /// Completes once a delta was queued since the last call (or since the
    /// queue was made, for the first call).
    pub async fn pushed(&self) {
        self.inner.pushed.notified().await;
    }

    /// How many deltas are queued.
    pub fn len(&self) -> usize {
        self.inner
            .queued
            .lock()
            .expect("delta queue lock")
            .deltas
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(message_seq: u64, text: &str) -> Delta {
        Delta {
            message_seq,
            subject: "sb.evt.conv.c1.reply_delta".to_owned(),
            headers: Headers::new(),
            payload: Bytes::from(text.to_owned()),
        }
    }

    fn texts(deltas: Vec<Delta>) -> Vec<String> {
        deltas
            .into_iter()
            .map(|d| String::from_utf8(d.payload.to_vec()).expect("UTF-8"))
            .collect()
    }

    #[test]
    fn deltas_are_taken_once_their_message_is_through_each_turns_in_order() {
        let queue = DeltaQueue::new();
        for (seq, text) in [(7, "b0"), (5, "a0"), (7, "b1"), (5, "a1"), (9, "c0")] {
            assert!(queue.push(delta(seq, text)));
        }
        assert!(queue.take_through(4).is_empty());
        assert_eq!(texts(queue.take_through(5)), ["a0", "a1"]);
        assert_eq!(texts(queue.take_through(8)), ["b0", "b1"]);
        assert_eq!(queue.len(), 1);
        assert_eq!(texts(queue.take_through(u64::MAX)), ["c0"]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_full_queue_drops_new_deltas_until_it_is_taken_from() {
        let queue = DeltaQueue::new();
        for n in 0..DELTAS_QUEUED_MAX {
            assert!(queue.push(delta(10, &n.to_string())));
        }
        assert!(!queue.push(delta(3, "dropped")));
        assert_eq!(queue.take_through(10).len(), DELTAS_QUEUED_MAX);
        assert!(queue.push(delta(11, "kept")));
        assert_eq!(texts(queue.take_through(11)), ["kept"]);
    }

    #[tokio::test]
    async fn a_push_wakes_the_follower_even_before_it_waits() {
        let queue = DeltaQueue::new();
        queue.push(delta(1, "x"));
        tokio::time::timeout(std::time::Duration::from_secs(5), queue.pushed())
            .await
            .expect("the push was noted");
    }
}
