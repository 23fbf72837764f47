//! The newest durable records, decoded, in memory.
//!
//! Every live follower of the log (the projections, the outbox, the budget
//! index, the webhook sink) reads each new record as soon as it is durable.
//! Read from sled, that is one tree walk and one decode per record per
//! follower, under the same lock the writer's commits take. The writer has
//! the envelopes in hand when it commits them, so after each flush it puts
//! them here, shared; a [`Subscription`](super::Subscription) takes what it
//! needs from here and reads sled only for what has already left (a follower
//! far behind, or one that started from an old position).
//!
//! The ring holds a contiguous run of seqs ending at the durable head, and at
//! most [`MAX_EVENTS`] records or [`MAX_BYTES`] of encoded records: the oldest
//! leave first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::envelope::Envelope;

/// The most records the ring keeps.
const MAX_EVENTS: usize = 16_384;
/// The most encoded bytes the ring keeps (its records take a little more in memory).
const MAX_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Default)]
pub(crate) struct Tail {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    /// The seq of `records[0]`.
    first_seq: u64,
    /// Each record with its encoded length.
    records: VecDeque<(Arc<Envelope>, usize)>,
    bytes: usize,
}

impl Tail {
    /// Adds the records of one commit, which follow the ring's last one.
    pub(crate) fn push(&self, committed: Vec<(Arc<Envelope>, usize)>) {
        let Some((first, _)) = committed.first() else {
            return;
        };
        let mut ring = self.ring.lock().expect("log tail lock");
        if ring.first_seq + ring.records.len() as u64 != first.seq {
            // Only the writer pushes, in seq order; a gap would mean a commit
            // was left out, and a ring with a gap would answer wrongly.
            ring.records.clear();
            ring.bytes = 0;
            ring.first_seq = first.seq;
        }
        for (envelope, size) in committed {
            ring.bytes += size;
            ring.records.push_back((envelope, size));
        }
        while ring.records.len() > MAX_EVENTS || ring.bytes > MAX_BYTES {
            let Some((_, size)) = ring.records.pop_front() else {
                break;
            };
            ring.bytes -= size;
            ring.first_seq += 1;
        }
    }

    /// Appends to `out` the records from `from_seq` through `to_seq` that the
    /// ring holds, if it holds `from_seq`; returns how many.
    pub(crate) fn read(
        &self,
        from_seq: u64,
        to_seq: u64,
        out: &mut VecDeque<Arc<Envelope>>,
    ) -> u64 {
        let ring = self.ring.lock().expect("log tail lock");
        if from_seq < ring.first_seq || to_seq < from_seq {
            return 0;
        }
        let start = (from_seq - ring.first_seq) as usize;
        let end = ring
            .records
            .len()
            .min((to_seq - ring.first_seq + 1) as usize);
        if start >= end {
            return 0;
        }
        out.extend(ring.records.range(start..end).map(|(e, _)| e.clone()));
        (end - start) as u64
    }

    /// The record at `seq`, if the ring holds it.
    pub(crate) fn get(&self, seq: u64) -> Option<Arc<Envelope>> {
        let ring = self.ring.lock().expect("log tail lock");
        let at = usize::try_from(seq.checked_sub(ring.first_seq)?).ok()?;
        ring.records.get(at).map(|(e, _)| e.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Event, KeyRevoked};
    use crate::envelope::StreamId;

    fn record(seq: u64) -> (Arc<Envelope>, usize) {
        let envelope = Envelope {
            seq,
            id: uuid::Uuid::now_v7(),
            stream: StreamId::system(),
            version: seq,
            at: crate::time::now(),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            event: Event::KeyRevoked(KeyRevoked {
                key_id: format!("k{seq}"),
                by: "admin".into(),
                reason: None,
            }),
        };
        (Arc::new(envelope), 1024)
    }

    fn seqs(tail: &Tail, from: u64, to: u64) -> Vec<u64> {
        let mut out = VecDeque::new();
        let n = tail.read(from, to, &mut out);
        assert_eq!(n as usize, out.len());
        out.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn it_answers_only_from_what_it_holds() {
        let tail = Tail::default();
        tail.push((5..=9).map(record).collect());
        assert_eq!(seqs(&tail, 5, 9), [5, 6, 7, 8, 9]);
        assert_eq!(seqs(&tail, 7, 100), [7, 8, 9]);
        assert_eq!(
            seqs(&tail, 4, 9),
            Vec::<u64>::new(),
            "4 has left or never came"
        );
        assert_eq!(seqs(&tail, 10, 20), Vec::<u64>::new(), "not durable yet");
        assert_eq!(seqs(&tail, 8, 7), Vec::<u64>::new());
    }

    #[test]
    fn the_oldest_leave_first_and_a_gap_starts_over() {
        let tail = Tail::default();
        let mut seq = 1;
        while seq <= MAX_EVENTS as u64 + 10 {
            tail.push((seq..seq + 10).map(record).collect());
            seq += 10;
        }
        // 16 MiB of 1 KiB records is exactly MAX_EVENTS of them.
        let last = seq - 1;
        let first = last - MAX_EVENTS as u64 + 1;
        assert_eq!(seqs(&tail, first - 1, first), Vec::<u64>::new());
        assert_eq!(seqs(&tail, first, first + 1), [first, first + 1]);
        assert_eq!(seqs(&tail, last, last), [last]);

        tail.push(vec![record(last + 5)]);
        assert_eq!(seqs(&tail, last, last + 5), Vec::<u64>::new());
        assert_eq!(seqs(&tail, last + 5, last + 5), [last + 5]);
    }
}
