//! Folding a stretch of the log into the projections: one thread reads and
//! decodes, two fold and commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use switchboard_events::{Envelope, EventLog};

use super::{Folding, COMMIT_EVERY_EVENTS};
use crate::view::ProjectionError;
use crate::ProjectionName;

/// Folds the log into each projection from its checkpoint up to its `until`,
/// in one pass over the log.
///
/// A reading thread (scoped to this call) reads and decodes the log and hands
/// each batch to two folds through bounded channels of a few batches: history
/// (the most rows) on this thread, the other projections on a second scoped
/// thread. Commits write no sled batch (see `Staged::commit`), so nothing
/// stops the reader or the other fold while one commits. This thread's fold,
/// the busiest, hands each batch it is done with back to the reading thread,
/// which frees what it allocated faster than another thread can. Each projection
/// commits its own checkpoint; after an error in one fold the others may
/// stand further on. `progress` gets the seqs this thread folds.
///
/// Once `interrupt` is set, this thread's fold commits what it has folded
/// after the batch it is on and returns [`ProjectionError::Interrupted`];
/// the others stop at their last commit.
pub(super) fn fold_range(
    log: &EventLog,
    folding: &mut [Folding],
    progress: &mut dyn FnMut(u64),
    interrupt: Option<&AtomicBool>,
) -> Result<(), ProjectionError> {
    let active: Vec<&mut Folding> = folding
        .iter_mut()
        .filter(|f| f.checkpoint < f.until)
        .collect();
    let Some(from) = active.iter().map(|f| f.checkpoint).min() else {
        return Ok(());
    };
    let to = active.iter().map(|f| f.until).max().unwrap_or(from);
    let (mut here, mut there): (Vec<&mut Folding>, Vec<&mut Folding>) = active
        .into_iter()
        .partition(|f| f.name == ProjectionName::History);
    if here.is_empty() {
        std::mem::swap(&mut here, &mut there);
    }
    std::thread::scope(|scope| {
        let (to_here, here_batches) = mpsc::sync_channel(READ_AHEAD_BATCHES);
        let (done_here, done) = mpsc::channel();
        let mut folds = vec![to_here];
        let mut folding_there = None;
        if !there.is_empty() {
            let (to_there, there_batches) = mpsc::sync_channel(READ_AHEAD_BATCHES);
            folds.push(to_there);
            folding_there =
                Some(scope.spawn(move || {
                    fold_batches(&mut there, there_batches, None, &mut |_| {}, None)
                }));
        }
        let reading = scope.spawn(move || read_batches(log, from + 1, to, folds, done));
        let folded_here = fold_batches(
            &mut here,
            here_batches,
            Some(&done_here),
            progress,
            interrupt,
        );
        // A fold error comes first: the reading thread is ahead of the folds,
        // and stops without an error of its own when a fold has failed.
        folded_here
            .and(folding_there.map_or(Ok(()), join))
            .and(join(reading))
    })?;
    for f in folding.iter_mut() {
        let until = f.until;
        f.commit(until)?;
    }
    Ok(())
}

/// Envelopes per batch handed to the fold: large enough that the channel
/// costs nothing beside the folding, small enough that a few batches in flight
/// stay a few megabytes.
const READ_BATCH_EVENTS: usize = 4096;

/// Batches the reading thread may be ahead of the fold.
const READ_AHEAD_BATCHES: usize = 2;

/// Decoded envelopes, shared by the folds.
type Batch = Arc<Vec<Envelope>>;

/// Reads and decodes `from..=to` and sends it to each fold in batches, and
/// drops the batches a fold hands back through `done`. Stops early, without
/// an error, when a fold has stopped (its receiver is gone); a record that
/// fails to read ends the run with its error, after the records before it
/// have been sent.
fn read_batches(
    log: &EventLog,
    from: u64,
    to: u64,
    folds: Vec<mpsc::SyncSender<Batch>>,
    done: mpsc::Receiver<Batch>,
) -> Result<(), ProjectionError> {
    let mut records = log.read_range(from, to);
    loop {
        // The last holder of a batch frees its envelopes.
        for batch in done.try_iter() {
            drop(batch);
        }
        let mut batch = Vec::with_capacity(READ_BATCH_EVENTS);
        let mut failed = None;
        for record in records.by_ref().take(READ_BATCH_EVENTS) {
            match record {
                Ok(envelope) => batch.push(envelope),
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        let last = batch.len() < READ_BATCH_EVENTS;
        if !batch.is_empty() {
            let batch = Arc::new(batch);
            if folds.iter().any(|fold| fold.send(batch.clone()).is_err()) {
                return Ok(());
            }
        }
        if let Some(error) = failed {
            return Err(error.into());
        }
        if last {
            return Ok(());
        }
    }
}

/// Folds every batch received into `folding`, committing every
/// [`COMMIT_EVERY_EVENTS`] events, and calls `progress` with each folded seq.
/// Hands each folded batch to `done`, if given, to be dropped there.
/// Returns when the reading thread is done; the last commit is the caller's.
/// When `interrupt` is set, commits after the batch it is on and returns
/// [`ProjectionError::Interrupted`].
fn fold_batches(
    folding: &mut [&mut Folding],
    batches: mpsc::Receiver<Batch>,
    done: Option<&mpsc::Sender<Batch>>,
    progress: &mut dyn FnMut(u64),
    interrupt: Option<&AtomicBool>,
) -> Result<(), ProjectionError> {
    let mut since_commit = 0;
    let mut folded = None;
    for batch in batches {
        if interrupt.is_some_and(|interrupt| interrupt.load(Ordering::Relaxed)) {
            if let Some(seq) = folded {
                for f in folding.iter_mut() {
                    f.commit(seq)?;
                }
            }
            return Err(ProjectionError::Interrupted);
        }
        for envelope in batch.iter() {
            for f in folding.iter_mut() {
                f.apply(envelope)?;
            }
            since_commit += 1;
            if since_commit == COMMIT_EVERY_EVENTS {
                for f in folding.iter_mut() {
                    f.commit(envelope.seq)?;
                }
                since_commit = 0;
            }
            progress(envelope.seq);
        }
        folded = batch.last().map(|envelope| envelope.seq);
        if let Some(done) = done {
            // Once the reading thread is gone, dropped here.
            let _ = done.send(batch);
        }
    }
    Ok(())
}

/// A scoped thread's result; its panic, if it panicked, goes on here.
fn join<T>(thread: std::thread::ScopedJoinHandle<'_, T>) -> T {
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use switchboard_events::catalog::{ConversationStarted, MessageReceived};
    use switchboard_events::{Event, ExpectedVersion, NewEvent, OpenMode, ReadError, StreamId};

    use super::*;
    use crate::{ProjectionName, Projections};

    /// More than the reading thread holds ahead of the fold, so it is blocked
    /// on the channel when the fold fails, and more than a commit's worth.
    const MESSAGES: usize = READ_BATCH_EVENTS * (READ_AHEAD_BATCHES + 3);

    fn started() -> NewEvent {
        NewEvent::new(Event::ConversationStarted(ConversationStarted {
            conversation_id: "c1".into(),
            key_id: "k1".into(),
            user: None,
        }))
    }

    fn messages(count: usize) -> impl Iterator<Item = NewEvent> {
        (0..count).map(|n| {
            NewEvent::new(Event::MessageReceived(MessageReceived {
                conversation_id: "c1".into(),
                message_id: format!("m{n}"),
                key_id: "k1".into(),
                user: None,
                content: "hello".into(),
                agent: None,
            }))
        })
    }

    fn append(log: &EventLog, events: impl Iterator<Item = NewEvent>) {
        let stream = StreamId::conversation("c1").expect("a valid stream id");
        let events: Vec<NewEvent> = events.collect();
        for chunk in events.chunks(1000) {
            log.append_blocking(stream.clone(), ExpectedVersion::Any, chunk.to_vec())
                .expect("append");
        }
    }

    fn checkpoints(projections: &Projections) -> Vec<u64> {
        ProjectionName::ALL
            .into_iter()
            .map(|name| projections.checkpoint(name).expect("a checkpoint"))
            .collect()
    }

    #[test]
    fn a_failing_fold_stops_the_reading_thread_and_returns_its_error() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        append(&log, std::iter::once(started()));
        projections.catch_up(&mut |_| {}).expect("catch up");
        // The conversation's summary, which each message reads, is corrupt.
        projections
            .tree(ProjectionName::History)
            .insert(b"cc1", &[0xff; 10])
            .expect("corrupt the summary");
        append(&log, messages(MESSAGES));

        let mut progress = 0;
        let error = projections
            .catch_up(&mut |_| progress += 1)
            .expect_err("the summary does not decode");
        assert!(
            matches!(
                error,
                ProjectionError::CorruptRow {
                    projection: "history",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(progress, 0, "the first message failed");
        // History stands where it failed; the other projections, folded on
        // their own thread, stand at their last commit before the reading
        // stopped.
        let checkpoints = checkpoints(&projections);
        assert_eq!(checkpoints[0], 1, "{checkpoints:?}");
        assert!(
            checkpoints[1..]
                .iter()
                .all(|&at| at == 1 || (at - 1) % COMMIT_EVERY_EVENTS == 0),
            "{checkpoints:?}"
        );
    }

    #[test]
    fn a_record_that_does_not_decode_ends_the_fold_with_its_error() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        append(&log, std::iter::once(started()).chain(messages(MESSAGES)));
        // Past the first commit. Reaches into the log's layout: records live
        // in tree `log` in rows keyed `r` and a seq (one record: chain hash,
        // encoding) or `r`, first and last seq (each record: chain hash,
        // u32 little-endian length, encoding).
        let bad_seq = COMMIT_EVERY_EVENTS + 100;
        let records = log.db().open_tree("log").expect("the log's tree");
        let mut bound = vec![b'r'];
        bound.extend_from_slice(&bad_seq.to_be_bytes());
        bound.extend_from_slice(&u64::MAX.to_be_bytes());
        let (key, row) = records
            .range(&[b'r'][..]..=&bound[..])
            .next_back()
            .expect("a row holds the record")
            .expect("read the row");
        let first = u64::from_be_bytes(key[1..9].try_into().expect("a seq"));
        let mut corrupt = Vec::new();
        if key.len() == 9 {
            assert_eq!(first, bad_seq, "the log's layout is as this test knows it");
            corrupt.extend_from_slice(&row[..32]);
            corrupt.extend_from_slice(&[0xff; 8]);
        } else {
            let mut at = 0;
            for seq in first.. {
                if at == row.len() {
                    break;
                }
                let len = u32::from_le_bytes(row[at + 32..at + 36].try_into().expect("4 bytes"));
                let end = at + 36 + len as usize;
                if seq == bad_seq {
                    corrupt.extend_from_slice(&row[at..at + 32]);
                    corrupt.extend_from_slice(&8u32.to_le_bytes());
                    corrupt.extend_from_slice(&[0xff; 8]);
                } else {
                    corrupt.extend_from_slice(&row[at..end]);
                }
                at = end;
            }
        }
        records.insert(&key, corrupt).expect("corrupt the record");

        let mut progress = 0;
        let error = projections
            .catch_up(&mut |_| progress += 1)
            .expect_err("a record does not decode");
        assert!(
            matches!(error, ProjectionError::Log(ReadError::Decode { seq, .. }) if seq == bad_seq),
            "{error}"
        );
        assert_eq!(progress, bad_seq - 1, "every record before it is folded");
        // The commit before the bad record stands, as after a crash there.
        assert_eq!(checkpoints(&projections), [COMMIT_EVERY_EVENTS; 4]);
    }

    #[test]
    fn an_interrupted_catch_up_commits_what_it_folded_and_goes_on_next_time() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        append(&log, std::iter::once(started()).chain(messages(MESSAGES)));

        // Interrupted while folding the second batch: history commits at
        // its end and stops there.
        let interrupt = AtomicBool::new(false);
        let interrupted_at = READ_BATCH_EVENTS as u64 + 10;
        let error = projections
            .catch_up_unless(
                &mut |seq| {
                    if seq == interrupted_at {
                        interrupt.store(true, Ordering::Relaxed);
                    }
                },
                Some(&interrupt),
            )
            .expect_err("interrupted");
        assert!(matches!(error, ProjectionError::Interrupted), "{error}");
        let stopped_at = checkpoints(&projections);
        assert_eq!(
            stopped_at[0],
            2 * READ_BATCH_EVENTS as u64,
            "{stopped_at:?}"
        );
        assert!(
            stopped_at.iter().all(|&at| at < log.head()),
            "{stopped_at:?}"
        );

        // The next catch-up goes on from there, to views exactly as the log
        // gives them.
        let head = projections.catch_up(&mut |_| {}).expect("catch up");
        assert_eq!(checkpoints(&projections), [head; 4]);
        let differences = projections.verify(&mut |_| {}).expect("verify");
        assert!(differences.is_empty(), "{differences:?}");
    }
}
