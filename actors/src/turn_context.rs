//! The context of a turn: a conversation's completed exchanges, read from its
//! stream (readers never race the conversation's single writer).
//!
//! Every turn needs the whole conversation, and the stream only grows, so
//! reading it from the start each time makes a conversation's n-th turn cost
//! n reads and decodes. [`ContextReader`] keeps the fold of what it read last
//! per conversation — the exchanges up to a stream version — in a bounded
//! cache, and a turn folds only the events appended since. The fold of events
//! `1..=v` never changes (the log is append-only), so a cached fold plus the
//! events after `v` is exactly the fold of the whole stream; an erasure is one
//! of those events and clears the exchanges as it would from the start.
//!
//! Most turns read nothing at all. A conversation's actor, the single writer
//! of its stream, folds each append it made durable into the cached fold
//! ([`ContextReader::appended`]), where it continues the fold; a turn whose
//! message is in the fold with its `agent_routed` has every event up to it
//! there. Only a fold that missed an append (evicted meanwhile, or cached by
//! a read racing the append) catches up from the log.
//!
//! A turn sends the model only the newest exchanges (an agent's
//! `context_messages`), so a fold need not hold more: with
//! [`ContextReader::keep`] it drops, in batches, answered exchanges older
//! than the newest `keep` and failed ones, keeping every unanswered one (its
//! turn is running). A long conversation's fold then weighs what its context
//! does, and the cache holds every busy conversation instead of thrashing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_events::{Envelope, Event, EventLog, StreamId};
use uuid::Uuid;

use crate::conversation_actor::ConversationError;
use crate::provider::ChatMessage;
use crate::stream_read::fold_stream;

/// Conversations whose fold the cache keeps.
const MAX_CACHED_CONVERSATIONS: usize = 4096;
/// Bytes of content (and per-exchange overhead) the cache keeps in all.
const MAX_CACHED_BYTES: usize = 32 * 1024 * 1024;
/// The heaviest fold the cache keeps: a conversation heavier than this is
/// folded whole for each of its turns.
const MAX_CACHED_FOLD_BYTES: usize = MAX_CACHED_BYTES / 8;
/// What an exchange costs beyond its content, roughly, for the byte bound.
const EXCHANGE_OVERHEAD: usize = 128;

/// The context of one turn, read from the conversation's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnContext {
    /// Earlier completed exchanges, then the message being answered.
    pub history: Vec<ChatMessage>,
    /// The id of the message's `agent_routed` event: the cause of its reply.
    pub routed_event: Option<Uuid>,
}

/// One user message and, once answered, its reply.
#[derive(Debug, Clone)]
struct Exchange {
    message_id: Arc<str>,
    user: Arc<str>,
    reply: Option<Arc<str>>,
    ended: bool,
    /// The id of its (last) `agent_routed`.
    routed_event: Option<Uuid>,
}

impl Exchange {
    /// What it weighs in the cache's byte bound.
    fn bytes(&self) -> usize {
        EXCHANGE_OVERHEAD
            + self.message_id.len()
            + self.user.len()
            + self.reply.as_ref().map_or(0, |reply| reply.len())
    }
}

/// A stream folded into exchanges up to `version`.
#[derive(Debug, Clone)]
struct Folded {
    version: u64,
    exchanges: Vec<Exchange>,
    /// Content bytes plus overhead, for the cache's bound.
    bytes: usize,
    /// The ended exchanges kept: the newest this many (all unended ones stay).
    keep: usize,
}

impl Default for Folded {
    fn default() -> Self {
        Folded::keeping(usize::MAX)
    }
}

impl Folded {
    fn keeping(keep: usize) -> Self {
        Folded {
            version: 0,
            exchanges: Vec::new(),
            bytes: 0,
            keep,
        }
    }

    /// Drops, in batches (once the fold holds a quarter more than `keep`, 16
    /// at least), what no context will hold: answered exchanges older than
    /// the newest `keep` answered ones, and failed ones. Unended exchanges
    /// stay: their turns are running. So a long conversation's fold stays
    /// about as small as its context, and the cache holds as many busy
    /// conversations as it can.
    fn trim(&mut self) {
        let slack = (self.keep / 4).max(16);
        if self.exchanges.len() <= self.keep.saturating_add(slack) {
            return;
        }
        // The index of the oldest answered exchange kept.
        let mut answered = 0;
        let mut oldest_kept = self.exchanges.len();
        for (i, exchange) in self.exchanges.iter().enumerate().rev() {
            if answered == self.keep {
                break;
            }
            if exchange.reply.is_some() {
                answered += 1;
                oldest_kept = i;
            }
        }
        let mut dropped = 0;
        let mut i = 0;
        self.exchanges.retain(|exchange| {
            let keep = !exchange.ended || (exchange.reply.is_some() && i >= oldest_kept);
            if !keep {
                dropped += exchange.bytes();
            }
            i += 1;
            keep
        });
        self.bytes -= dropped;
    }

    fn apply(&mut self, envelope: Envelope) {
        self.apply_event(envelope.version, envelope.id, &envelope.event);
    }

    /// Folds the event at `version`, whose envelope has `id`.
    fn apply_event(&mut self, version: u64, id: Uuid, event: &Event) {
        self.version = version;
        let find = |exchanges: &mut Vec<Exchange>, id: &str| -> Option<usize> {
            exchanges.iter().rposition(|x| &*x.message_id == id)
        };
        match event {
            Event::MessageReceived(e) => {
                let exchange = Exchange {
                    message_id: e.message_id.as_str().into(),
                    user: e.content.as_str().into(),
                    reply: None,
                    ended: false,
                    routed_event: None,
                };
                self.bytes += exchange.bytes();
                self.exchanges.push(exchange);
                self.trim();
            }
            Event::AgentRouted(e) => {
                if let Some(i) = find(&mut self.exchanges, &e.message_id) {
                    self.exchanges[i].routed_event = Some(id);
                }
            }
            Event::ReplyCompleted(e) => {
                if let Some(i) = find(&mut self.exchanges, &e.message_id) {
                    if !self.exchanges[i].ended {
                        self.bytes += e.content.len();
                        self.exchanges[i].ended = true;
                        self.exchanges[i].reply = Some(e.content.as_str().into());
                    }
                }
            }
            Event::ReplyFailed(e) => {
                if let Some(i) = find(&mut self.exchanges, &e.message_id) {
                    self.exchanges[i].ended = true;
                }
            }
            Event::ConversationErased(_) => {
                self.exchanges.clear();
                self.bytes = 0;
            }
            _ => {}
        }
    }

    /// Whether `message_id` is folded with its `agent_routed`: then every
    /// event up to that one is, and its context needs nothing read.
    fn holds_routed(&self, message_id: &str) -> bool {
        self.exchanges
            .iter()
            .rev()
            .any(|exchange| &*exchange.message_id == message_id && exchange.routed_event.is_some())
    }

    /// The context of `message_id`: the completed exchanges before it (the
    /// newest `keep` of them), then it; or with `None`, the newest `keep`
    /// completed exchanges.
    fn context(
        &self,
        stream: &StreamId,
        message_id: Option<&str>,
    ) -> Result<TurnContext, ConversationError> {
        // The message answered is nearly always the last one: look from the end.
        let (before, answered) = match message_id {
            None => (&self.exchanges[..], None),
            Some(id) => {
                let at = self
                    .exchanges
                    .iter()
                    .rposition(|exchange| &*exchange.message_id == id)
                    .ok_or_else(|| {
                        ConversationError::InvalidRequest(format!(
                            "{stream} has no message {id:?} (erased?)"
                        ))
                    })?;
                (&self.exchanges[..at], Some(&self.exchanges[at]))
            }
        };
        // The newest `keep` answered exchanges before it.
        let newest: Vec<(&Arc<str>, &Arc<str>)> = before
            .iter()
            .rev()
            .filter_map(|exchange| Some((&exchange.user, exchange.reply.as_ref()?)))
            .take(self.keep)
            .collect();
        let mut history = Vec::with_capacity(2 * newest.len() + 1);
        for (user, reply) in newest.into_iter().rev() {
            history.push(ChatMessage::user(user.clone()));
            history.push(ChatMessage::assistant(reply.clone()));
        }
        let routed_event = answered.and_then(|exchange| {
            history.push(ChatMessage::user(exchange.user.clone()));
            exchange.routed_event
        });
        Ok(TurnContext {
            history,
            routed_event,
        })
    }
}

/// Where [`ContextReader::read`] found a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContextFrom {
    /// The cached fold, kept up by the conversation's actor: nothing read.
    Cache,
    /// The cached fold and the events after it, read from the log.
    LogTail,
    /// The whole stream, read from the log.
    LogWhole,
}

/// Reads turn contexts from the log, through the cache; see the module doc.
pub(crate) struct ContextReader {
    log: EventLog,
    cache: Mutex<Cache>,
    /// Ended exchanges a fold keeps ([`ContextReader::keep`]).
    keep: AtomicUsize,
    /// Reads of the log, for the tests.
    #[cfg(test)]
    reads: AtomicUsize,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<StreamId, CacheEntry>,
    /// The entries' streams by their last use, least recent first.
    by_use: BTreeMap<u64, StreamId>,
    bytes: usize,
    /// Advances with every use, for least-recently-used eviction.
    tick: u64,
}

struct CacheEntry {
    /// Folded further in place by each turn: concurrent turns of one
    /// conversation take turns.
    folded: Arc<Mutex<Folded>>,
    /// What `folded` weighed when the cache last counted it.
    bytes: usize,
    used: u64,
}

impl ContextReader {
    pub(crate) fn new(log: EventLog) -> Self {
        ContextReader {
            log,
            cache: Mutex::new(Cache::default()),
            keep: AtomicUsize::new(usize::MAX),
            #[cfg(test)]
            reads: AtomicUsize::new(0),
        }
    }

    /// Keeps only the newest `exchanges` ended exchanges of each conversation
    /// (and every unended one), not its whole history: enough for the longest
    /// context an agent sends. Applies to folds made from here on; the cache
    /// starts over.
    pub(crate) fn keep(&self, exchanges: usize) {
        self.keep.store(exchanges, Ordering::Relaxed);
        *self.cache.lock().expect("context cache lock") = Cache::default();
    }

    /// The context of `message_id` (or, with `None`, the completed history)
    /// in the conversation's stream, as far as [`ContextReader::keep`] says.
    pub(crate) async fn read(
        &self,
        conversation_id: &str,
        message_id: Option<&str>,
    ) -> Result<TurnContext, ConversationError> {
        let stream = StreamId::conversation(conversation_id)
            .map_err(|e| ConversationError::InvalidRequest(e.to_string()))?;
        if let Some(cached) = self.cached(&stream) {
            let mut folded = cached.lock().expect("cached fold lock");
            // A turn's message came through the writer, which folded it in
            // ([`ContextReader::appended`]); otherwise the few events since
            // the fold are read here.
            let current = message_id.is_some_and(|id| folded.holds_routed(id));
            let folding = if current {
                self.counted(ContextFrom::Cache);
                Ok(())
            } else {
                self.counted(ContextFrom::LogTail);
                fold_after(&self.log, &stream, &mut folded)
            };
            let bytes = folded.bytes;
            let context = folding.and_then(|()| folded.context(&stream, message_id));
            drop(folded);
            self.weigh(&stream, &cached, bytes);
            return context;
        }
        let keep = self.keep.load(Ordering::Relaxed);
        self.counted(ContextFrom::LogWhole);
        let folded =
            fold_stream(&self.log, &stream, 1, Folded::keeping(keep), Folded::apply).await?;
        let context = folded.context(&stream, message_id);
        self.remember(stream, folded);
        context
    }

    /// Folds events the conversation's single writer has just appended (and
    /// made durable), each as `(version, id, event)` in order, into the
    /// cached fold, so that the next turn need not read them back. They are
    /// folded only where they continue the fold: a fold already past them has
    /// them, and one behind them (an event it missed) is left for
    /// [`ContextReader::read`] to catch up from the log. A conversation's
    /// first events start its fold.
    pub(crate) fn appended<'a>(
        &self,
        stream: &StreamId,
        events: impl IntoIterator<Item = (u64, Uuid, &'a Event)>,
    ) {
        let mut events = events.into_iter().peekable();
        let Some(&(first, _, _)) = events.peek() else {
            return;
        };
        let Some(cached) = self.cached(stream) else {
            if first == 1 {
                let mut folded = Folded::keeping(self.keep.load(Ordering::Relaxed));
                for (version, id, event) in events {
                    folded.apply_event(version, id, event);
                }
                self.remember(stream.clone(), folded);
            }
            return;
        };
        let mut folded = cached.lock().expect("cached fold lock");
        for (version, id, event) in events {
            if version == folded.version + 1 {
                folded.apply_event(version, id, event);
            } else if version > folded.version {
                break;
            }
        }
        let bytes = folded.bytes;
        drop(folded);
        self.weigh(stream, &cached, bytes);
    }

    /// Counts where a context came from (`switchboard_turn_context_reads_total`),
    /// and, in the tests, the reads of the log.
    fn counted(&self, from: ContextFrom) {
        let label = match from {
            ContextFrom::Cache => "cache",
            ContextFrom::LogTail => "log_tail",
            ContextFrom::LogWhole => "log_whole",
        };
        metrics::counter!("switchboard_turn_context_reads_total", "from" => label).increment(1);
        #[cfg(test)]
        if from != ContextFrom::Cache {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn cached(&self, stream: &StreamId) -> Option<Arc<Mutex<Folded>>> {
        let mut cache = self.cache.lock().expect("context cache lock");
        cache.touch(stream).map(|entry| entry.folded.clone())
    }

    /// Caches a fold of a whole stream, unless a concurrent turn cached one
    /// already.
    fn remember(&self, stream: StreamId, folded: Folded) {
        if folded.bytes > MAX_CACHED_FOLD_BYTES {
            return;
        }
        let mut cache = self.cache.lock().expect("context cache lock");
        if cache.entries.contains_key(&stream) {
            return;
        }
        cache.insert(
            stream,
            CacheEntry {
                bytes: folded.bytes,
                folded: Arc::new(Mutex::new(folded)),
                used: 0,
            },
        );
        cache.bound();
    }

    /// Counts the cached fold of `stream` at its new weight, `bytes`: it may
    /// have grown past what one fold may take, or made the cache too heavy.
    fn weigh(&self, stream: &StreamId, folded: &Arc<Mutex<Folded>>, bytes: usize) {
        let mut cache = self.cache.lock().expect("context cache lock");
        let Some(entry) = cache.entries.get_mut(stream) else {
            return;
        };
        // An evicted fold and a new one cached since are not this one.
        if !Arc::ptr_eq(&entry.folded, folded) {
            return;
        }
        let before = std::mem::replace(&mut entry.bytes, bytes);
        cache.bytes = cache.bytes - before + bytes;
        if bytes > MAX_CACHED_FOLD_BYTES {
            cache.remove(stream);
        }
        cache.bound();
    }
}

impl Cache {
    /// Adds `entry` for `stream` (not cached), as used now.
    fn insert(&mut self, stream: StreamId, mut entry: CacheEntry) {
        self.tick += 1;
        entry.used = self.tick;
        self.bytes += entry.bytes;
        self.by_use.insert(self.tick, stream.clone());
        self.entries.insert(stream, entry);
    }

    /// The entry of `stream`, if cached, as used now.
    fn touch(&mut self, stream: &StreamId) -> Option<&CacheEntry> {
        let entry = self.entries.get_mut(stream)?;
        self.tick += 1;
        let last = std::mem::replace(&mut entry.used, self.tick);
        self.by_use.remove(&last);
        self.by_use.insert(self.tick, stream.clone());
        Some(entry)
    }

    fn remove(&mut self, stream: &StreamId) -> Option<CacheEntry> {
        let entry = self.entries.remove(stream)?;
        self.by_use.remove(&entry.used);
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Evicts the least recently used entries, one at a time, while there are
    /// too many entries or bytes. Each new conversation so evicts about one:
    /// evicting a quarter of the cache at once, every 1,024 new conversations,
    /// took 5–10 ms under the cache's lock, and every turn that read its
    /// context waited that long (`bench http`, 1,000 new conversations a
    /// second).
    fn bound(&mut self) {
        while self.entries.len() > MAX_CACHED_CONVERSATIONS || self.bytes > MAX_CACHED_BYTES {
            let Some((_, stream)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&stream) {
                self.bytes -= entry.bytes;
            }
        }
    }
}

/// Folds the stream's events after `folded`'s version into it.
fn fold_after(
    log: &EventLog,
    stream: &StreamId,
    folded: &mut Folded,
) -> Result<(), ConversationError> {
    for envelope in log.read_stream(stream, folded.version + 1) {
        let envelope = envelope
            .map_err(|e| ConversationError::Unavailable(format!("cannot read {stream}: {e}")))?;
        folded.apply(envelope);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_events::catalog::{
        AgentRouted, ConversationErased, MessageReceived, ReplyCompleted, ReplyFailed,
    };
    use switchboard_events::{ExpectedVersion, NewEvent, OpenMode};

    fn received(id: &str) -> Event {
        Event::MessageReceived(MessageReceived {
            conversation_id: "c1".into(),
            message_id: id.into(),
            key_id: "k".into(),
            user: None,
            content: format!("question {id}"),
            agent: None,
        })
    }

    fn routed(id: &str) -> Event {
        Event::AgentRouted(AgentRouted {
            conversation_id: "c1".into(),
            message_id: id.into(),
            agent: "echo".into(),
            rule: None,
        })
    }

    fn completed(id: &str) -> Event {
        Event::ReplyCompleted(ReplyCompleted {
            conversation_id: "c1".into(),
            message_id: id.into(),
            reply_id: format!("r-{id}"),
            agent: "echo".into(),
            content: format!("answer {id}"),
            finish_reason: "stop".into(),
            latency_ms: 1,
        })
    }

    fn failed(id: &str) -> Event {
        Event::ReplyFailed(ReplyFailed {
            conversation_id: "c1".into(),
            message_id: id.into(),
            agent: "echo".into(),
            code: "internal".into(),
            message: "no".into(),
        })
    }

    async fn append(log: &EventLog, events: Vec<Event>) -> Vec<Uuid> {
        let stream = StreamId::conversation("c1").expect("valid");
        let events: Vec<NewEvent> = events.into_iter().map(NewEvent::new).collect();
        let ids = events.iter().map(|e| e.id).collect();
        log.append(stream, ExpectedVersion::Any, events)
            .await
            .expect("appended");
        ids
    }

    /// A reader without a cache: the fold of the whole stream.
    async fn uncached(log: &EventLog, message_id: Option<&str>) -> TurnContext {
        ContextReader::new(log.clone())
            .read("c1", message_id)
            .await
            .expect("context")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cache_folds_only_new_events_and_agrees_with_a_full_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let reader = ContextReader::new(log.clone());

        let m1 = append(&log, vec![received("m1"), routed("m1")]).await;
        let first = reader.read("c1", Some("m1")).await.expect("m1");
        assert_eq!(first.history, [ChatMessage::user("question m1")]);
        assert_eq!(first.routed_event, Some(m1[1]));

        // m2 arrives while m1's turn runs; m1 ends, then m3 fails, m4 waits.
        let m2 = append(&log, vec![received("m2"), routed("m2")]).await;
        append(&log, vec![completed("m1")]).await;
        append(&log, vec![received("m3"), routed("m3"), failed("m3")]).await;
        append(&log, vec![received("m4"), routed("m4")]).await;
        for id in ["m1", "m2", "m3", "m4"] {
            let cached = reader.read("c1", Some(id)).await.expect("cached");
            assert_eq!(cached, uncached(&log, Some(id)).await, "{id}");
        }
        // The cache counts the fold it grew in place at its present weight.
        let (counted, weight, exchanges) = weights(&reader);
        assert_eq!((counted, exchanges), (weight, 4));
        let m2_context = reader.read("c1", Some("m2")).await.expect("m2");
        assert_eq!(m2_context.routed_event, Some(m2[1]));
        assert_eq!(
            reader.read("c1", Some("m4")).await.expect("m4").history,
            [
                ChatMessage::user("question m1"),
                ChatMessage::assistant("answer m1"),
                ChatMessage::user("question m4"),
            ]
        );

        // An erasure (which comes through the writer) forgets everything
        // before it.
        let erasure = Event::ConversationErased(ConversationErased {
            conversation_id: "c1".into(),
            by: "admin".into(),
        });
        append_through(&reader, &log, vec![erasure]).await;
        let gone = reader.read("c1", Some("m1")).await.expect_err("erased");
        assert_eq!(gone.code(), "invalid_request");
        append(&log, vec![received("m5")]).await;
        let after = reader.read("c1", None).await.expect("all");
        assert_eq!(after, uncached(&log, None).await);
        assert!(after.history.is_empty(), "m5 is not answered yet");
        let (counted, weight, exchanges) = weights(&reader);
        assert_eq!((counted, exchanges), (weight, 1));
    }

    /// Appends `events` to c1 and hands them to `reader` as its writer does.
    async fn append_through(reader: &ContextReader, log: &EventLog, events: Vec<Event>) {
        let stream = StreamId::conversation("c1").expect("valid");
        let new: Vec<NewEvent> = events.iter().cloned().map(NewEvent::new).collect();
        let ids: Vec<Uuid> = new.iter().map(|e| e.id).collect();
        let appended = log
            .append(stream.clone(), ExpectedVersion::Any, new)
            .await
            .expect("appended");
        let versions = appended.positions.iter().map(|p| p.version);
        reader.appended(
            &stream,
            versions
                .zip(ids)
                .zip(&events)
                .map(|((v, id), e)| (v, id, e)),
        );
    }

    fn reads(reader: &ContextReader) -> usize {
        reader.reads.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_writer_folds_in_spares_the_turns_a_read_and_agrees_with_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let reader = ContextReader::new(log.clone());

        // A new conversation's first events start its fold; each turn then
        // finds its message there and reads nothing.
        append_through(&reader, &log, vec![received("m1"), routed("m1")]).await;
        let m1 = reader.read("c1", Some("m1")).await.expect("m1");
        assert_eq!(m1, uncached(&log, Some("m1")).await);
        append_through(&reader, &log, vec![received("m2"), routed("m2")]).await;
        append_through(&reader, &log, vec![completed("m1")]).await;
        append_through(&reader, &log, vec![received("m3"), routed("m3")]).await;
        for id in ["m2", "m3"] {
            let context = reader.read("c1", Some(id)).await.expect("context");
            assert_eq!(context, uncached(&log, Some(id)).await, "{id}");
        }
        assert_eq!(reads(&reader), 0);
        let (counted, weight, exchanges) = weights(&reader);
        assert_eq!((counted, exchanges), (weight, 3));

        // An append the fold missed leaves it behind: later ones are not
        // folded past the gap, and the next turn reads the rest from the log.
        append(&log, vec![completed("m2")]).await;
        append_through(&reader, &log, vec![received("m4"), routed("m4")]).await;
        let m4 = reader.read("c1", Some("m4")).await.expect("m4");
        assert_eq!(m4, uncached(&log, Some("m4")).await);
        assert_eq!(m4.history.len(), 5, "m1 and m2 answered, then m4");
        assert_eq!(reads(&reader), 1);

        // Events a read already folded are not folded twice.
        append(&log, vec![completed("m3")]).await;
        reader.read("c1", None).await.expect("all");
        let stream = StreamId::conversation("c1").expect("valid");
        let replay = Event::ReplyCompleted(ReplyCompleted {
            content: "not this one".into(),
            ..match completed("m3") {
                Event::ReplyCompleted(e) => e,
                _ => unreachable!(),
            }
        });
        reader.appended(&stream, [(7, Uuid::now_v7(), &replay)]);
        let all = reader.read("c1", None).await.expect("all");
        assert_eq!(all, uncached(&log, None).await);

        // A conversation met past its start is not folded from the middle.
        let other = StreamId::conversation("c2").expect("valid");
        reader.appended(&other, [(3, Uuid::now_v7(), &received("x"))]);
        assert!(reader.cached(&other).is_none());
    }

    /// The weight the cache counts for `reader`'s one cached fold, the
    /// weight of that fold and its exchanges.
    fn weights(reader: &ContextReader) -> (usize, usize, usize) {
        let cache = reader.cache.lock().expect("cache");
        assert_eq!(cache.entries.len(), 1);
        let entry = cache.entries.values().next().expect("one fold");
        assert_eq!(cache.bytes, entry.bytes);
        let folded = entry.folded.lock().expect("fold");
        (entry.bytes, folded.bytes, folded.exchanges.len())
    }

    /// A reader keeping 3 exchanges holds a long conversation's newest 3
    /// answered exchanges and its unanswered ones, however it was folded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_window_holds_the_newest_answers_and_every_running_turn() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        // "early" is still running when 200 more come and go, every third failing.
        append(&log, vec![received("early"), routed("early")]).await;
        let cached = ContextReader::new(log.clone());
        cached.keep(3);
        for i in 0..200 {
            let id = format!("m{i}");
            let end = if i % 3 == 2 {
                failed(&id)
            } else {
                completed(&id)
            };
            append(&log, vec![received(&id), routed(&id), end]).await;
            // Folded a turn at a time, as the cache does.
            cached.read("c1", None).await.expect("context");
        }
        append(&log, vec![received("last"), routed("last")]).await;
        let whole = ContextReader::new(log.clone());
        whole.keep(3);
        for reader in [&cached, &whole] {
            let last = reader.read("c1", Some("last")).await.expect("last");
            let answers: Vec<ChatMessage> = ["m196", "m198", "m199"]
                .iter()
                .flat_map(|id| {
                    [
                        ChatMessage::user(format!("question {id}")),
                        ChatMessage::assistant(format!("answer {id}")),
                    ]
                })
                .chain([ChatMessage::user("question last")])
                .collect();
            assert_eq!(last.history, answers);
            // The running turn from long ago still finds its message.
            let early = reader.read("c1", Some("early")).await.expect("early");
            assert_eq!(early.history, [ChatMessage::user("question early")]);
        }
        let (counted, weight, exchanges) = weights(&cached);
        assert_eq!(counted, weight);
        assert!(exchanges <= 2 + 3 + 16, "{exchanges} exchanges kept");
        let expected: usize = cached
            .cache
            .lock()
            .expect("cache")
            .entries
            .values()
            .map(|entry| {
                let folded = entry.folded.lock().expect("fold");
                folded.exchanges.iter().map(Exchange::bytes).sum::<usize>()
            })
            .sum();
        assert_eq!(weight, expected, "the weight is what is kept");
    }

    #[test]
    fn eviction_drops_the_least_recently_used_one_at_a_time() {
        const MAX: usize = MAX_CACHED_CONVERSATIONS;
        let stream = |i: usize| StreamId::conversation(&format!("c{i}")).expect("valid");
        let entry = |bytes: usize| CacheEntry {
            folded: Arc::new(Mutex::new(Folded::default())),
            bytes,
            used: 0,
        };
        let mut cache = Cache::default();
        for i in 0..MAX {
            cache.insert(stream(i), entry(10));
            cache.bound();
        }
        assert_eq!(cache.entries.len(), MAX);
        // Used again, c0 is no longer the least recently used: c1 is.
        assert!(cache.touch(&stream(0)).is_some());
        cache.insert(stream(MAX), entry(10));
        cache.bound();
        assert_eq!((cache.entries.len(), cache.bytes), (MAX, MAX * 10));
        assert!(cache.entries.contains_key(&stream(0)));
        assert!(!cache.entries.contains_key(&stream(1)));
        assert!(cache.entries.contains_key(&stream(2)));
        assert_eq!(cache.by_use.len(), cache.entries.len());

        // Too heavy: the oldest go until the rest is light enough.
        let mut cache = Cache::default();
        let heaviest = MAX_CACHED_FOLD_BYTES;
        for i in 0..MAX_CACHED_BYTES / heaviest {
            cache.insert(stream(i), entry(heaviest));
            cache.bound();
        }
        cache.insert(stream(100), entry(2 * heaviest));
        cache.bound();
        assert_eq!(cache.bytes, MAX_CACHED_BYTES);
        assert!(!cache.entries.contains_key(&stream(0)));
        assert!(!cache.entries.contains_key(&stream(1)));
        assert!(cache.entries.contains_key(&stream(2)));
        assert_eq!(cache.by_use.len(), cache.entries.len());
    }
}
