//! The single writer: group commit of appends, pipelined with the flush.
//!
//! Appends go through one thread. It takes every request waiting in its
//! queue, checks each against the log (versions, ids) and the requests before it
//! in the same group, and writes all of them (see [`Writes`]). A second thread,
//! the flusher, makes written groups durable: one flush for every group
//! written since its last one, then it answers them, in order. So the writer
//! writes the next group while the last one is being flushed, many concurrent
//! appenders share one fsync, and nobody is acknowledged before the bytes are
//! on disk.
//!
//! The writer takes what is queued and never waits for more. Under load,
//! appenders answered by one flush come back while the writer is busy, and
//! queue for the group after; the flusher waits a little for them when its
//! flushes cost more than the writes ([`gather`]). A lone appender's group
//! the writer thread flushes itself ([`Writer::is_lone`]), and when the log
//! is idle a lone appender skips the queue and writes, flushes and answers
//! its append on its own thread ([`append_alone`]). The writer's state sits
//! behind a mutex for that, taken once per group. A lone group is published
//! (tail, head, answers) after that mutex is let go, under a second one that
//! keeps groups published in the order they were flushed
//! ([`Durability::make_lone_durable`]).
//!
//! A group's stream index entries are not among its writes: whoever made it
//! durable writes them after answering it (see [`super::stream_index`]).
//!
//! If a write or flush fails the log stops accepting appends (every later
//! append fails with `Storage`, and so does every group not yet flushed):
//! after a failed fsync the state on disk is unknown, and the only honest
//! recovery is a restart that reads it back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::stream_index::{Run, Unindexed};
use super::tail::Tail;
use super::{keys, AppendError, Appended, ExpectedVersion, Position, ReadError};
use crate::codec;
use crate::envelope::{Envelope, NewEvent, StreamId};
use crate::time;

/// The most events one group commit takes; bounds batch memory and latency.
const MAX_GROUP_EVENTS: usize = 4096;

/// The longest the flusher waits for the writer before a flush; see [`gather`].
const MAX_GATHER_WAIT: Duration = Duration::from_micros(500);

/// Written groups that may wait for the flusher before the writer waits for
/// it: the flusher takes all waiting groups in one flush, so a few suffice.
const GROUPS_AWAITING_FLUSH: usize = 4;

/// Stream versions the writer keeps in memory before starting over.
const MAX_CACHED_STREAMS: usize = 100_000;

pub struct AppendRequest {
    pub stream: StreamId,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub reply: Reply,
    /// Told the outcome as soon as the group is written, before its flush
    /// (see [`super::EventLog::append_early`]); `reply` still waits for it.
    pub written: Option<Reply>,
}

/// Where an append's answer goes.
pub type Reply = oneshot::Sender<Result<Appended, AppendError>>;

/// Where an append's answer comes from.
pub type Answer = oneshot::Receiver<Result<Appended, AppendError>>;

impl AppendRequest {
    /// A request, and where its answer will come from.
    pub fn new(
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> (Self, Answer) {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            stream,
            expected,
            events,
            reply,
            written: None,
        };
        (request, answer)
    }
}

pub struct Writer {
    pub tree: sled::Tree,
    /// The seq the next appended record gets.
    pub next_seq: u64,
    /// The chain hash of the last record (all zeros for an empty log).
    pub last_hash: [u8; 32],
    /// Versions of recently written streams. The writer is the only writer, so
    /// a cached version is the stream's version.
    pub versions: HashMap<StreamId, u64>,
    /// Shared with the flusher.
    pub durable: Arc<Durability>,
    /// The greatest time-ordered (v7) event id in the log, or above it; see
    /// [`newest_v7_id`].
    pub newest_v7: u128,
    /// Where written groups go to be flushed while the writer thread runs
    /// (see [`append_early_alone`]).
    pub flusher: Option<std_mpsc::SyncSender<Written>>,
}

/// A group's writes, in the order they are made.
///
/// They are plain inserts, not a sled `Batch`: a batch seals and writes out
/// sled's IO buffer twice before its own writes (three buffer writes per
/// commit instead of one), and from the first batch on every sled operation
/// in the process takes a process-wide lock that each batch holds
/// exclusively. The group is atomic all the same: sled recovers a prefix of
/// the writes made before a crash; the group marker (its first and last seq)
/// comes first, each row of records (see [`Rows`]) before the index entries
/// that point into it, and the head marker last. So a crash mid-group leaves records past the head
/// marker that the group marker names, none acknowledged (that waits for the
/// flush), and opening the log removes them ([`super::repair`]). Readers never
/// look past the durable head.
#[derive(Default)]
struct Writes(Vec<(sled::IVec, sled::IVec)>);

impl Writes {
    fn insert(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.0.push((key.into(), value.into()));
    }
}

/// A group's records on their way into rows.
///
/// Consecutive records share a row until it holds [`CHUNK_BYTES`]: a sled
/// insert costs about the same for a small value as for a few kilobytes, and
/// every few inserts into a tree split a node, so a group of many small
/// records written as a few rows costs far less than a row each. A row never
/// spans two groups, so a crash leaves whole rows past the head marker. The
/// index entries that point at a row's records wait until the row is staged:
/// they never come before it.
#[derive(Default)]
struct Rows {
    first: u64,
    count: u64,
    /// The records as frames: chain hash ‖ length (u32 LE) ‖ encoding.
    frames: Vec<u8>,
    index: Vec<(sled::IVec, sled::IVec)>,
}

/// A row takes more records while it is shorter than this. sled writes a
/// node of a tree (at most 17 rows) as one item, and an item over a quarter
/// of a segment (128 KiB) as a file of its own: rows of a few KiB keep
/// nodes well below that.
const CHUNK_BYTES: usize = 4096;

impl Rows {
    fn add(&mut self, writes: &mut Writes, seq: u64, hash: &[u8; 32], record: &[u8]) {
        let frame = keys::FRAME_HEADER_LEN + record.len();
        if self.count > 0 && self.frames.len() + frame > CHUNK_BYTES {
            self.finish(writes);
        }
        if self.count == 0 {
            self.first = seq;
        }
        self.frames.reserve(frame);
        self.frames.extend_from_slice(hash);
        // A record too long for the length field is longer than a row: it
        // gets a row of its own, which stores no length.
        let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
        self.frames.extend_from_slice(&len.to_le_bytes());
        self.frames.extend_from_slice(record);
        self.count += 1;
        if frame > CHUNK_BYTES {
            self.finish(writes);
        }
    }

    /// An index entry pointing at records added already.
    fn index(&mut self, key: impl Into<sled::IVec>, value: impl Into<sled::IVec>) {
        self.index.push((key.into(), value.into()));
    }

    /// Stages the row of the records added so far, then their index entries.
    fn finish(&mut self, writes: &mut Writes) {
        if self.count == 0 {
            return;
        }
        let mut frames = std::mem::take(&mut self.frames);
        if self.count == 1 {
            // A row of one record: chain hash ‖ encoding.
            frames.drain(keys::HASH_LEN..keys::FRAME_HEADER_LEN);
            writes.insert(&keys::record(self.first), frames);
        } else {
            let last = self.first + self.count - 1;
            writes.insert(&keys::chunk(self.first, last), frames);
        }
        writes.0.append(&mut self.index);
        self.count = 0;
    }
}

/// What staging a group has learnt that the tree does not know yet.
#[derive(Default)]
struct Overlay {
    versions: HashMap<StreamId, u64>,
    ids: HashMap<Uuid, Position>,
    /// The group's new records, in seq order, with their encoded lengths.
    records: Vec<(Arc<Envelope>, usize)>,
    rows: Rows,
    /// The group's v7 ids and their seqs, for its `t` rows.
    timed_ids: Vec<(Uuid, u64)>,
    /// The group's stream index entries, one per append.
    runs: Vec<(StreamId, Run)>,
}

impl Overlay {
    /// Stages the group's `t` rows: one per millisecond its v7 ids were
    /// created in, after every row of records they point into. Time-ordered
    /// ids all land at the end of the index, where an entry each would split
    /// a node every few inserts.
    fn finish_timed_ids(&mut self, writes: &mut Writes, first_seq: u64) {
        let mut rows: std::collections::BTreeMap<[u8; 7], Vec<u8>> = Default::default();
        for (id, seq) in self.timed_ids.drain(..) {
            let row = rows.entry(keys::timed_ids_prefix(&id)).or_default();
            row.extend_from_slice(&id.as_bytes()[6..]);
            row.extend_from_slice(&seq.to_be_bytes());
        }
        for (prefix, row) in rows {
            writes.insert(&keys::timed_ids(&prefix, first_seq)[..], row);
        }
    }
}

/// A group written to the tree, waiting for the flush that makes it durable.
pub struct Written {
    /// The group's last seq; `None` when it wrote nothing.
    last_seq: Option<u64>,
    /// Its new records, in seq order, with their encoded lengths.
    records: Vec<(Arc<Envelope>, usize)>,
    /// Its stream index entries, written into the tree once it is durable.
    runs: Vec<(StreamId, Run)>,
    answers: Vec<(Reply, Result<Appended, AppendError>)>,
}

/// What the writer and the flusher share: making written groups durable,
/// publishing them to followers and answering their appenders.
pub struct Durability {
    db: sled::Db,
    tree: sled::Tree,
    /// Stream index entries of written groups, until they are in the tree.
    pub unindexed: Arc<Unindexed>,
    /// The durable head, published after each flush.
    head: watch::Sender<u64>,
    /// Where each group's records go once durable, for live followers.
    tail: Arc<Tail>,
    /// Set after a failed write or flush; the log then refuses appends.
    failed: OnceLock<String>,
    /// Groups handed to the flusher and not yet answered.
    in_flight: AtomicUsize,
    /// Whether the writer thread holds requests it has taken from the queue
    /// and not yet written; a lone appender then queues behind them.
    taken: AtomicBool,
    /// The appends the last flush answered.
    last_appends: AtomicUsize,
    /// Held while flushed groups are published (tail, head, answers, stream
    /// index), so they are published in the order they were flushed. A lone
    /// append takes it before it lets go of the writer's state, so the next
    /// group can be written and flushed while this one is published.
    publishing: Mutex<()>,
}

impl Durability {
    pub fn new(
        db: sled::Db,
        tree: sled::Tree,
        unindexed: Arc<Unindexed>,
        head: watch::Sender<u64>,
        tail: Arc<Tail>,
    ) -> Self {
        Durability {
            db,
            tree,
            unindexed,
            head,
            tail,
            failed: OnceLock::new(),
            in_flight: AtomicUsize::new(0),
            taken: AtomicBool::new(false),
            last_appends: AtomicUsize::new(1),
            publishing: Mutex::new(()),
        }
    }

    /// Flushes the group of a lone append, written under the writer's
    /// `state`, then lets go of `state` before publishing it. Waking its
    /// followers and its appender can take longer than the flush on a busy
    /// machine (the woken thread may take the CPU); the next append need not
    /// wait for that to be written and flushed.
    fn make_lone_durable<T>(&self, written: Written, state: MutexGuard<'_, T>) {
        let groups = vec![written];
        let (flushed, _) = self.flush(&groups);
        let order = self.publishing();
        drop(state);
        self.publish(groups, flushed, order);
    }

    /// Hands a written group to the flusher. Called under the writer's
    /// state, by the writer thread and early appenders alike, so groups
    /// reach the flusher in the order they were written (it publishes them
    /// in that order, and the head must not go back), and a lone appender
    /// sees the group in flight.
    fn hand_over(&self, flusher: &std_mpsc::SyncSender<Written>, written: Written) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Err(std_mpsc::SendError(group)) = flusher.send(written) {
            // The flusher is gone (it never started): nothing is durable.
            let reason = self.failed.get().cloned().unwrap_or_default();
            refuse(group.answers.into_iter().map(|(reply, _)| reply), &reason);
        }
    }

    /// Why the log refuses appends, once a write or flush failed.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.get().cloned()
    }

    pub(super) fn publishing(&self) -> MutexGuard<'_, ()> {
        // Holds no data a panic could leave half-changed.
        self.publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Flushes `groups` unless none of them wrote or the log has failed;
    /// returns the outcome and how long the flush took, if there was one.
    fn flush(&self, groups: &[Written]) -> (Result<(), String>, Option<Duration>) {
        let appends = groups.iter().map(|group| group.answers.len()).sum();
        self.last_appends.store(appends, Ordering::Relaxed);
        let mut took = None;
        let flushed = match self.failed.get() {
            Some(reason) => Err(reason.clone()),
            None if groups.iter().all(|group| group.last_seq.is_none()) => Ok(()),
            None => {
                let started = Instant::now();
                let flushed = self.db.flush();
                let elapsed = started.elapsed();
                took = Some(elapsed);
                metrics::histogram!("switchboard_log_flush_seconds").record(elapsed.as_secs_f64());
                flushed.map(drop).map_err(|error| {
                    let reason = format!("event log write failed: {error}");
                    tracing::error!(%reason, "event log refuses further appends until restart");
                    self.failed.get_or_init(|| reason).clone()
                })
            }
        };
        (flushed, took)
    }

    /// Publishes flushed groups (`order` held, see [`Durability::publishing`]):
    /// to the tail and the head, then answers their appenders and writes
    /// their stream index entries; after a failed flush, fails them.
    fn publish(
        &self,
        mut groups: Vec<Written>,
        flushed: Result<(), String>,
        order: MutexGuard<'_, ()>,
    ) {
        match flushed {
            Ok(()) => {
                let runs: Vec<_> = groups
                    .iter_mut()
                    .flat_map(|group| std::mem::take(&mut group.runs))
                    .collect();
                let through = groups.iter().filter_map(|group| group.last_seq).max();
                self.answer(groups);
                if let Some(through) = through {
                    self.index(&runs, through);
                }
            }
            Err(reason) => {
                // Deduplicated answers may name events of these very groups,
                // so no success among them can be trusted.
                for (reply, result) in groups.into_iter().flat_map(|group| group.answers) {
                    let _ = reply.send(result.and(Err(AppendError::Storage(reason.clone()))));
                }
            }
        }
        drop(order);
    }

    /// Writes the stream index entries of flushed groups, up to seq
    /// `through`, into the tree: after the answers, off the appenders' path.
    /// Calls are in seq order: groups are published one at a time, in the
    /// order they were flushed (under `publishing`).
    fn index(&self, runs: &[(StreamId, Run)], through: u64) {
        if let Err(error) = self.unindexed.index(&self.tree, runs, through) {
            let reason = format!("event log write failed: {error}");
            tracing::error!(%reason, "event log refuses further appends until restart");
            let _ = self.failed.set(reason);
        }
    }

    /// When the log closes, every group flushed: writes the stream index
    /// entries still held back, so that the next open has none to write.
    fn close(&self) {
        if self.failed.get().is_some() {
            return;
        }
        let head = *self.head.borrow();
        let indexed = self
            .unindexed
            .index_all(&self.tree, head)
            .and_then(|()| self.db.flush().map(drop));
        if let Err(error) = indexed {
            tracing::warn!(%error, "cannot write the stream index at close; the next open writes it");
        }
    }

    /// Publishes flushed groups to followers, then answers their appenders.
    fn answer(&self, groups: Vec<Written>) {
        let head = groups.iter().filter_map(|group| group.last_seq).max();
        let mut answers = Vec::with_capacity(groups.len());
        for group in groups {
            // Followers look in the tail for what the head says is durable.
            if !group.records.is_empty() {
                self.tail.push(group.records);
            }
            answers.push(group.answers);
        }
        if let Some(head) = head {
            self.head.send_replace(head);
        }
        for (reply, result) in answers.into_iter().flatten() {
            // An appender that gave up waiting is not an error of the log.
            let _ = reply.send(result);
        }
    }

    /// Whether nothing is in the writer's hands but what the caller holds:
    /// the last flush answered one append, no group awaits its flush, and
    /// the writer thread holds no request it has taken and not yet written.
    /// Both ways a lone append skips a hand-over ask this.
    fn quiet(&self) -> bool {
        self.last_appends.load(Ordering::Relaxed) == 1
            && !self.taken.load(Ordering::Relaxed)
            // Pairs with the flusher's decrement after its answers.
            && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// The flusher: flushes and answers groups until the writer closes
    /// `written`.
    fn flush_handed_over(&self, written: std_mpsc::Receiver<Written>) {
        let mut last_flush = Duration::ZERO;
        while let Ok(first) = written.recv() {
            let last_appends = self.last_appends.load(Ordering::Relaxed);
            let groups = gather(&written, first, last_appends, last_flush);
            let count = groups.len();
            let (flushed, took) = self.flush(&groups);
            if let Some(took) = took {
                last_flush = took;
            }
            let order = self.publishing();
            // Before the answers, so that an appender they wake finds the
            // log quiet and appends alone; its group is published after
            // these all the same (it waits for `order`).
            self.in_flight.fetch_sub(count, Ordering::Release);
            self.publish(groups, flushed, order);
        }
    }
}

/// The written groups for one flush: `first`, every group waiting behind it,
/// and, while they hold fewer appends than the last flush did, the groups the
/// writer writes in the next half flush (at most [`MAX_GATHER_WAIT`]).
///
/// Appenders answered by one flush come back a moment later. Flushing only
/// what has been written when the first of them is would split them into two
/// flushes; when flushes cost more than writes (small groups), that halves
/// the appends per fsync. A short wait keeps them together, and when writes
/// cost more (large groups), the wait ends first, the flush overlaps the
/// writing of the rest, and the rest makes the next flush.
fn gather(
    written: &std_mpsc::Receiver<Written>,
    first: Written,
    last_appends: usize,
    last_flush: Duration,
) -> Vec<Written> {
    let mut appends = first.answers.len();
    let mut groups = vec![first];
    let deadline = Instant::now() + (last_flush / 2).min(MAX_GATHER_WAIT);
    loop {
        for group in written.try_iter() {
            appends += group.answers.len();
            groups.push(group);
        }
        let now = Instant::now();
        if appends >= last_appends || now >= deadline {
            return groups;
        }
        match written.recv_timeout(deadline - now) {
            Ok(group) => {
                appends += group.answers.len();
                groups.push(group);
            }
            Err(_) => return groups,
        }
    }
}

/// Answers every one of `replies` with the storage failure `reason`.
fn refuse(replies: impl Iterator<Item = Reply>, reason: &str) {
    for reply in replies {
        let _ = reply.send(Err(AppendError::Storage(reason.to_owned())));
    }
}

/// The writer's state, shared by the writer thread ([`run`]) and lone
/// appenders ([`append_alone`]); whoever holds it is the only writer.
pub type Shared = Mutex<Writer>;

/// Locks the writer's state. A panic while it was held (a bug, or sled
/// panicking on a corruption) leaves it unknown: the log then refuses appends
/// (and says so: [`Durability::failure`]).
fn lock(writer: &Shared) -> Result<MutexGuard<'_, Writer>, String> {
    writer.lock().map_err(|poisoned| {
        let reason = "the event log's writer failed mid-write; restart to recover".to_owned();
        let _ = poisoned.get_ref().durable.failed.set(reason.clone());
        reason
    })
}

/// Writes every request of `requests` until it closes, with a flusher thread
/// making them durable; returns once the last written group is flushed and
/// answered.
pub fn run(writer: Arc<Shared>, mut requests: mpsc::Receiver<AppendRequest>) {
    let durable = match lock(&writer) {
        Ok(state) => state.durable.clone(),
        Err(_) => return,
    };
    let (to_flush, written) = std_mpsc::sync_channel(GROUPS_AWAITING_FLUSH);
    std::thread::scope(|scope| {
        let flusher = durable.clone();
        let flushing = std::thread::Builder::new()
            .name("event-log-flush".to_owned())
            .spawn_scoped(scope, move || flusher.flush_handed_over(written));
        if let Err(error) = flushing {
            let reason = format!("cannot start the event log's flusher: {error}");
            tracing::error!(%reason, "event log refuses appends");
            let _ = durable.failed.set(reason);
        }
        if let Ok(mut state) = lock(&writer) {
            state.flusher = Some(to_flush.clone());
        }
        while let Some(first) = requests.blocking_recv() {
            let mut events = first.events.len();
            let mut group = vec![first];
            while events < MAX_GROUP_EVENTS {
                let Ok(next) = requests.try_recv() else {
                    break;
                };
                events += next.events.len();
                group.push(next);
            }
            // So that lone appenders, which the mutex does not queue in
            // order, cannot keep these waiting for more than one flush.
            durable.taken.store(true, Ordering::Relaxed);
            let mut state = match lock(&writer) {
                Ok(state) => state,
                Err(reason) => {
                    durable.taken.store(false, Ordering::Relaxed);
                    refuse(group.into_iter().map(|request| request.reply), &reason);
                    continue;
                }
            };
            let committed = state.commit(group);
            durable.taken.store(false, Ordering::Relaxed);
            let Some(written) = committed else {
                continue;
            };
            if state.is_lone(&written, &requests) {
                durable.make_lone_durable(written, state);
                continue;
            }
            durable.hand_over(&to_flush, written);
            drop(state);
        }
        // Closing the channel lets the flusher finish what it has and stop.
        if let Ok(mut state) = lock(&writer) {
            state.flusher = None;
        }
        drop(to_flush);
    });
    durable.close();
}

/// Writes, flushes and answers `request` on the caller's thread when the log
/// is idle: the writer is quiet ([`Durability::quiet`]), nothing is queued,
/// and the writer's state is free. A lone appender so spares both thread
/// hand-overs of the queue (to the writer thread and back, a wake-up each,
/// which cost about as much as the flush itself). Gives the request back
/// when the log is not idle, for the queue.
///
/// The flush blocks the calling thread, an async caller's runtime worker
/// included: only while the log is idle, and no longer than a queued append
/// would wait for it.
pub fn append_alone(
    writer: &Shared,
    queue: &mpsc::Sender<AppendRequest>,
    request: AppendRequest,
) -> Result<(), AppendRequest> {
    let mut state = match writer.try_lock() {
        Ok(state) if state.durable.quiet() && queue.capacity() == queue.max_capacity() => state,
        _ => return Err(request),
    };
    if let Some(written) = state.commit(vec![request]) {
        let durable = state.durable.clone();
        durable.make_lone_durable(written, state);
    }
    Ok(())
}

/// Writes `request`, which wants its written answer early
/// ([`AppendRequest::written`]), on the calling thread when the writer
/// thread is not busy, and hands its group to the flusher: its appender is
/// answered at once, and the flush runs on the flusher's thread meanwhile.
/// That spares it the two thread wake-ups of the queue, which on these VMs
/// cost about as much as the flush it overlaps. Gives the request back when
/// the writer is busy or requests wait in the queue.
pub fn append_early_alone(
    writer: &Shared,
    queue: &mpsc::Sender<AppendRequest>,
    request: AppendRequest,
) -> Result<(), AppendRequest> {
    // Room for one more group: only the flusher takes groups off the
    // channel, and only holders of the state add them, so the hand-over
    // below cannot block this (async) thread.
    let mut state = match writer.try_lock() {
        Ok(state)
            if state.flusher.is_some()
                && !state.durable.taken.load(Ordering::Relaxed)
                && state.durable.in_flight.load(Ordering::Acquire) < GROUPS_AWAITING_FLUSH
                && queue.capacity() == queue.max_capacity() =>
        {
            state
        }
        _ => return Err(request),
    };
    if let Some(written) = state.commit(vec![request]) {
        let durable = state.durable.clone();
        if let Some(flusher) = &state.flusher {
            durable.hand_over(flusher, written);
        }
    }
    Ok(())
}

impl Writer {
    /// Whether `written` is a lone appender's, which the writer thread
    /// flushes itself, sparing the hand-over to the flusher: one append, as
    /// the last flush answered, with no request waiting behind it and no
    /// group before it awaiting its flush. There is nothing to overlap with
    /// its flush (a group being published still goes first: `publishing`).
    fn is_lone(&self, written: &Written, requests: &mpsc::Receiver<AppendRequest>) -> bool {
        written.answers.len() == 1 && requests.is_empty() && self.durable.quiet()
    }

    /// Writes a group, to be made durable and answered by the flusher,
    /// [`run`] or [`append_alone`]; `None` when the log has failed (the
    /// group is refused at once). A group that writes nothing (deduplicated appends,
    /// conflicts) is answered in turn all the same: a repeat may name events
    /// of a group still being flushed.
    fn commit(&mut self, group: Vec<AppendRequest>) -> Option<Written> {
        if let Some(reason) = self.durable.failed.get() {
            refuse(group.into_iter().map(|request| request.reply), reason);
            return None;
        }
        let first_new_seq = self.next_seq;
        let appends = group.len();
        let mut writes = Writes::default();
        let mut overlay = Overlay::default();
        let mut answers = Vec::with_capacity(appends);
        let mut early = Vec::new();
        for request in group {
            let result = self.stage(
                &request.stream,
                request.expected,
                request.events,
                &mut writes,
                &mut overlay,
            );
            if let Some(written) = request.written {
                early.push((written, result.clone()));
            }
            answers.push((request.reply, result));
        }
        overlay.rows.finish(&mut writes);
        overlay.finish_timed_ids(&mut writes, first_new_seq);
        let wrote = self.next_seq != first_new_seq;
        if wrote {
            // The group's seqs go first and the head marker last: see `Writes`.
            writes.0.insert(
                0,
                (
                    keys::GROUP_KEY.into(),
                    keys::group_value(first_new_seq, self.next_seq - 1)[..].into(),
                ),
            );
            writes.insert(
                keys::HEAD_KEY,
                &keys::head_value(self.next_seq - 1, &self.last_hash)[..],
            );
            let written = writes
                .0
                .into_iter()
                .try_for_each(|(key, value)| self.tree.insert(key, value).map(drop));
            if let Err(error) = written {
                let reason = format!("event log write failed: {error}");
                tracing::error!(%reason, "event log refuses further appends until restart");
                let _ = self.durable.failed.set(reason);
            }
            self.durable.unindexed.add(&overlay.runs);
            metrics::histogram!("switchboard_log_batch_size").record(appends as f64);
            if self.versions.len() + overlay.versions.len() > MAX_CACHED_STREAMS {
                crate::forget::start_over(&mut self.versions);
            }
            self.versions.extend(overlay.versions);
        }
        for (written, result) in early {
            let result = match self.durable.failed.get() {
                Some(reason) => Err(AppendError::Storage(reason.clone())),
                None => result,
            };
            // An appender that gave up waiting is not an error of the log.
            let _ = written.send(result);
        }
        Some(Written {
            last_seq: wrote.then(|| self.next_seq - 1),
            records: overlay.records,
            runs: overlay.runs,
            answers,
        })
    }

    fn stage(
        &mut self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        writes: &mut Writes,
        overlay: &mut Overlay,
    ) -> Result<Appended, AppendError> {
        if events.is_empty() {
            return Err(AppendError::Empty);
        }
        let mut ids = std::collections::HashSet::with_capacity(events.len());
        if let Some(event) = events.iter().find(|e| !ids.insert(e.id)) {
            return Err(AppendError::DuplicateInAppend { id: event.id });
        }
        let mut known = Vec::with_capacity(events.len());
        for event in &events {
            known.push(self.known_position(&event.id, overlay)?);
        }
        if known.iter().all(Option::is_some) {
            return Ok(Appended {
                positions: known.into_iter().flatten().collect(),
                deduplicated: true,
            });
        }
        if let Some((event, Some(position))) = events.iter().zip(&known).find(|(_, k)| k.is_some())
        {
            return Err(AppendError::PartialDuplicate {
                id: event.id,
                seq: position.seq,
            });
        }

        let actual = match overlay.versions.get(stream).or(self.versions.get(stream)) {
            Some(version) => *version,
            None => stream_version(&self.tree, &self.durable.unindexed, stream)
                .map_err(|e| AppendError::Storage(e.to_string()))?,
        };
        if let ExpectedVersion::Exact(expected_version) = expected {
            if expected_version != actual {
                return Err(AppendError::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual,
                });
            }
        }

        let at = time::now();
        let mut positions = Vec::with_capacity(events.len());
        for (offset, new) in (1u64..).zip(events) {
            let position = Position {
                seq: self.next_seq,
                version: actual + offset,
            };
            let envelope = Envelope {
                seq: position.seq,
                id: new.id,
                stream: stream.clone(),
                version: position.version,
                at,
                correlation_id: new.correlation_id,
                causation_id: new.causation_id,
                traceparent: new.traceparent,
                event: new.event,
            };
            let bytes = codec::encode(&envelope);
            let hash = chain_hash(&self.last_hash, &bytes);
            let rows = &mut overlay.rows;
            rows.add(writes, position.seq, &hash, &bytes);
            if envelope.id.get_version_num() == 7 {
                overlay.timed_ids.push((envelope.id, position.seq));
            } else {
                rows.index(&keys::id(&envelope.id)[..], &position.seq.to_be_bytes()[..]);
            }
            overlay.ids.insert(envelope.id, position);
            if envelope.id.get_version_num() == 7 {
                self.newest_v7 = self.newest_v7.max(envelope.id.as_u128());
            }
            overlay.records.push((Arc::new(envelope), bytes.len()));
            self.last_hash = hash;
            self.next_seq += 1;
            positions.push(position);
        }
        // One stream index entry for the whole append, written after the
        // group's flush (see `stream_index`).
        overlay.runs.push((
            stream.clone(),
            Run {
                first_version: actual + 1,
                first_seq: positions[0].seq,
                count: positions.len() as u64,
            },
        ));
        overlay
            .versions
            .insert(stream.clone(), actual + positions.len() as u64);
        Ok(Appended {
            positions,
            deduplicated: false,
        })
    }

    fn known_position(
        &self,
        id: &Uuid,
        overlay: &Overlay,
    ) -> Result<Option<Position>, AppendError> {
        if let Some(position) = overlay.ids.get(id) {
            return Ok(Some(*position));
        }
        // A v7 id past every v7 id stored cannot be stored: no index lookup.
        if id.get_version_num() == 7 && id.as_u128() > self.newest_v7 {
            return Ok(None);
        }
        let Some(seq) = super::read::indexed_seq(&self.tree, id)
            .map_err(|e| AppendError::Storage(e.to_string()))?
        else {
            return Ok(None);
        };
        let envelope = super::read::stored(&self.tree, &self.durable.tail, seq)
            .map_err(|e| AppendError::Storage(format!("record {seq}: {e}")))?
            .ok_or_else(|| {
                AppendError::Storage(format!("id index points {id} at missing seq {seq}"))
            })?;
        Ok(Some(Position {
            seq,
            version: envelope.version,
        }))
    }
}

/// Non-v7 ids [`newest_v7_id`] looks past before it gives up.
const NEWEST_V7_SCAN: usize = 10_000;

/// The greatest v7 event id in the id index, as a number (0 when there is
/// none), for the writer's fast path: a new event's v7 id is greater, since
/// v7 ids start with their creation time, so it needs no index lookup to
/// know it is new.
///
/// The `t` rows of the last millisecond hold the greatest v7 id written since
/// they exist. Logs from before them keep v7 ids under `i`, where keys sort
/// by id and v7 ids by time, so the greatest one there is the first met
/// walking down from the top, past the random (v4) and name-based (v5) ids
/// that sort above it. Those are few (alerts, ids chosen by callers); past
/// [`NEWEST_V7_SCAN`] of them the answer is `u128::MAX`, which turns the fast
/// path off — still correct, only slower.
pub fn newest_v7_id(tree: &sled::Tree) -> Result<u128, ReadError> {
    let malformed = || ReadError::Corrupt {
        seq: 0,
        detail: "an id index key is malformed".to_owned(),
    };
    let mut newest = 0;
    if let Some(last) = tree.scan_prefix([keys::TIMED_IDS]).next_back() {
        let (key, _) = last?;
        let prefix: [u8; 7] = key
            .get(..7)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(malformed)?;
        for row in tree.scan_prefix(prefix) {
            let (key, value) = row?;
            let ids = keys::parse_timed_ids(&key, &value).ok_or_else(malformed)?;
            newest = ids
                .iter()
                .map(|(id, _)| id.as_u128())
                .fold(newest, u128::max);
        }
    }
    let mut others = 0;
    for entry in tree.scan_prefix([keys::ID]).rev() {
        let (key, _) = entry?;
        let id = key
            .get(1..)
            .and_then(|bytes| Uuid::from_slice(bytes).ok())
            .ok_or_else(malformed)?;
        if id.get_version_num() == 7 {
            return Ok(newest.max(id.as_u128()));
        }
        others += 1;
        if others >= NEWEST_V7_SCAN {
            return Ok(u128::MAX);
        }
    }
    Ok(newest)
}

/// The chain hash of a record: it covers the previous record's hash and this
/// record's bytes, so changing, dropping or reordering any record breaks the chain.
pub fn chain_hash(previous: &[u8; 32], record: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(record);
    hasher.finalize().into()
}

/// The current version of a stream according to its index (0 when it has none).
pub fn stream_version(
    tree: &sled::Tree,
    unindexed: &Unindexed,
    stream: &StreamId,
) -> Result<u64, ReadError> {
    stream_version_through(tree, unindexed, stream, u64::MAX)
}

/// The version of `stream` counting only events at or before seq `head`.
pub fn stream_version_through(
    tree: &sled::Tree,
    unindexed: &Unindexed,
    stream: &StreamId,
    head: u64,
) -> Result<u64, ReadError> {
    // Entries not in the tree yet are the stream's newest.
    if let Some(version) = unindexed.last_version(stream, head) {
        return Ok(version);
    }
    // Logs written before entries waited for the flush have entries of the
    // group still being written past the head: a few at most, one append's
    // each, so all in one group.
    for entry in super::read::stream_entries_backwards(tree, stream) {
        let entry = entry?;
        if entry.first_seq() <= head {
            return Ok(entry.last_version());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Event, KeyRevoked};
    use crate::log::{EventLog, OpenMode};

    fn request(n: u64) -> (AppendRequest, Answer) {
        let event = Event::KeyRevoked(KeyRevoked {
            key_id: format!("k{n}"),
            by: "admin".into(),
            reason: None,
        });
        AppendRequest::new(
            StreamId::system(),
            ExpectedVersion::Any,
            vec![NewEvent::new(event)],
        )
    }

    #[test]
    fn an_idle_log_appends_on_the_callers_thread_and_a_busy_one_queues() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let writer = &log.shared.writer;
        let queue = log.sender().expect("an open log");

        // Idle: written, flushed and answered before `append_alone` returns.
        let (alone, mut answer) = request(1);
        assert!(append_alone(writer, &queue, alone).is_ok());
        let appended = answer
            .try_recv()
            .expect("answered on the caller's thread")
            .expect("appended");
        assert_eq!(appended.first().seq, 1);
        assert_eq!(log.head(), 1, "durable and published");

        let durable = writer.lock().expect("the writer's state").durable.clone();
        let queued = |why: &str| {
            let (busy, _answer) = request(2);
            assert!(
                append_alone(writer, &queue, busy).is_err(),
                "not queued although {why}"
            );
        };
        {
            let _writing = writer.lock().expect("the writer's state");
            queued("the writer thread is writing a group");
        }
        durable.in_flight.fetch_add(1, Ordering::Relaxed);
        queued("a group awaits its flush");
        durable.in_flight.fetch_sub(1, Ordering::Relaxed);
        durable.last_appends.store(2, Ordering::Relaxed);
        queued("the last flush answered several appends");
        durable.last_appends.store(1, Ordering::Relaxed);
        let waiting = queue.try_reserve().expect("room in the queue");
        queued("a request waits in the queue");
        drop(waiting);
        durable.taken.store(true, Ordering::Relaxed);
        queued("the writer thread has taken requests it has not written");
        durable.taken.store(false, Ordering::Relaxed);

        let (alone, mut answer) = request(3);
        assert!(append_alone(writer, &queue, alone).is_ok(), "idle again");
        let appended = answer.try_recv().expect("answered").expect("appended");
        assert_eq!(
            appended.first().seq,
            2,
            "the refused requests wrote nothing"
        );
    }

    #[test]
    fn a_lone_group_is_published_only_after_the_group_flushed_before_it() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let writer = &log.shared.writer;
        let queue = log.sender().expect("an open log");
        let durable = writer.lock().expect("the writer's state").durable.clone();

        // A group flushed earlier is still being published (its followers
        // being woken) when a lone append writes and flushes the next one.
        let earlier = durable.publishing();
        let (lone, mut answer) = request(1);
        std::thread::scope(|scope| {
            let appending = scope.spawn(|| append_alone(writer, &queue, lone).is_ok());
            // Written (its head marker is in the tree), then flushed: held
            // a while longer, it must still be neither answered nor published.
            let deadline = Instant::now() + Duration::from_secs(10);
            let written = || {
                let marker = log.shared.tree.get(keys::HEAD_KEY).expect("reads");
                marker
                    .and_then(|value| keys::parse_head(&value))
                    .map(|(seq, _)| seq)
                    == Some(1)
            };
            while !written() {
                assert!(
                    Instant::now() < deadline,
                    "the lone group was never written"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
                "answered before the group flushed before it was published"
            );
            assert_eq!(log.head(), 0, "published before the earlier group");
            drop(earlier);
            assert!(appending.join().expect("the appender"), "taken alone");
        });
        let appended = answer.try_recv().expect("answered").expect("appended");
        assert_eq!(appended.first().seq, 1);
        assert_eq!(log.head(), 1);
    }

    #[test]
    fn an_early_append_is_written_on_the_callers_thread_and_flushed_on_the_flushers() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let writer = &log.shared.writer;
        let queue = log.sender().expect("an open log");
        let early = |n: u64| {
            let (mut request, answer) = request(n);
            let (written, written_seen) = oneshot::channel();
            request.written = Some(written);
            (request, written_seen, answer)
        };

        let held = log.hold_publishing();
        let (mut request, mut written, mut answer) = early(1);
        // Taken alone once the writer thread, just started, lets go of it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while let Err(back) = append_early_alone(writer, &queue, request) {
            assert!(std::time::Instant::now() < deadline, "never taken alone");
            std::thread::sleep(Duration::from_millis(1));
            request = back;
        }
        let appended = written
            .try_recv()
            .expect("answered written on the caller's thread")
            .expect("written");
        assert_eq!(appended.first().seq, 1);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "durable while publishing was held"
        );
        drop(held);
        let durable = answer.blocking_recv().expect("answered").expect("durable");
        assert_eq!(durable, appended);
        assert_eq!(log.head(), 1);

        // A busy writer, or requests waiting in the queue: it queues.
        {
            let _writing = writer.lock().expect("the writer's state");
            let (request, _, _) = early(2);
            assert!(append_early_alone(writer, &queue, request).is_err());
        }
        let waiting = queue.try_reserve().expect("room in the queue");
        let (request, _, _) = early(3);
        assert!(append_early_alone(writer, &queue, request).is_err());
        drop(waiting);
        // No room left for its group on the way to the flusher: it queues
        // rather than block its thread.
        let durable = writer.lock().expect("the writer's state").durable.clone();
        durable
            .in_flight
            .store(GROUPS_AWAITING_FLUSH, Ordering::Release);
        let (request, _, _) = early(4);
        assert!(append_early_alone(writer, &queue, request).is_err());
        durable.in_flight.store(0, Ordering::Release);
    }

    #[tokio::test]
    async fn an_early_append_is_answered_once_written_and_durable_after_its_flush() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");

        // Publishing held (as by an earlier group's): the group can be
        // written and flushed, but is neither durable to anyone nor readable.
        let held = log.hold_publishing();
        let event = |n: u64| {
            vec![NewEvent::new(Event::KeyRevoked(KeyRevoked {
                key_id: format!("k{n}"),
                by: "admin".into(),
                reason: None,
            }))]
        };
        let early = log.append_early(StreamId::system(), ExpectedVersion::Any, event(1));
        let (appended, when_durable) = tokio::time::timeout(Duration::from_secs(10), early)
            .await
            .expect("answered once written, before its flush is published")
            .expect("written");
        assert_eq!(appended.first().seq, 1);
        assert_eq!(appended.first().version, 1);
        let waiting = tokio::spawn(when_durable.wait());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "durable before it was published");
        assert_eq!(log.head(), 0, "readable before it was durable");
        assert_eq!(log.read_range(1, 1).count(), 0);
        drop(held);
        let durable = waiting.await.expect("the waiter").expect("durable");
        assert_eq!(durable, appended);
        assert_eq!(log.head(), 1);

        // The stream's next append follows it, early or not.
        let (next, when_durable) = log
            .append_early(StreamId::system(), ExpectedVersion::Exact(1), event(2))
            .await
            .expect("written");
        assert_eq!(next.first().seq, 2);
        when_durable.wait().await.expect("durable");
        let conflict = log
            .append_early(StreamId::system(), ExpectedVersion::Exact(1), event(3))
            .await;
        assert!(
            matches!(conflict, Err(AppendError::Conflict { .. })),
            "{:?}",
            conflict.err()
        );
    }
}
