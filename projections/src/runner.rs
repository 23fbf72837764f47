//! Running the projections: catching up, tailing the log live, replaying and
//! verifying.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_events::{Envelope, EventLog};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::view::{self, ProjectionError, Staged};
use crate::{AuditView, CostsView, HistoryView, KeysView, ProjectionName, RowResult};

mod range;
use range::fold_range;

/// Rows staged before a commit while folding a stretch of the log.
const COMMIT_EVERY_EVENTS: u64 = 8192;

/// Live commits of at most this many rows are written on the fold's task;
/// larger ones on a blocking thread ([`Projections::run_live`]).
const INLINE_COMMIT_ROWS: usize = 64;

/// While nobody waits for them, live commits come at most this often: under
/// load the log's head moves with every group commit, and committing the
/// views every time costs more than the folding. A reader that waits
/// ([`Projections::wait_for`]) gets a commit at once, and so does a change of
/// the keys view, which authentication reads without waiting; every other
/// reader waits. So the interval decides how much is folded again after a
/// crash and how often a busy conversation's summary row is rewritten.
const LIVE_COMMIT_INTERVAL: Duration = Duration::from_millis(250);

/// A live fold commits once it has staged this many rows, however soon
/// after the last commit. A commit writes its rows all at once, on one thread,
/// into the database the log shares, so its rows also go into the log's next
/// flush: every append waiting for that flush waits for them too. At 1,000
/// completions a second an interval's rows were about 770, written in 5–10 ms
/// and slowing the flushes meanwhile, four times a second; it set the p99 of
/// every proxied completion (`bench http`). A commit of this many takes about
/// a millisecond. The price: under load over many conversations, small
/// commits write a conversation's summary row and start a new message chunk
/// more often (`bench nats`, 64 clients over 1,000 conversations: acks per
/// second a few percent lower on average, within the machine's noise).
const LIVE_COMMIT_ROWS: usize = 128;

/// The four projections of one log.
#[derive(Clone)]
pub struct Projections {
    log: EventLog,
    trees: Vec<(ProjectionName, sled::Tree)>,
    /// The seq every projection has folded up to.
    caught_up: watch::Sender<u64>,
    /// The seq the live fold has folded up to, committed or not.
    live_folded: Arc<AtomicU64>,
    /// Woken by a reader waiting for a seq the views have not committed yet,
    /// so [`Projections::run_live`] commits what it has folded at once.
    wanted: Arc<Notify>,
    /// Why [`Projections::run_live`] stopped with an error, once it has.
    failure: Arc<std::sync::OnceLock<String>>,
}

/// A live view that differs from its rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewDifference {
    pub projection: ProjectionName,
    pub detail: String,
}

impl std::fmt::Display for ViewDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "projection {}: {}", self.projection, self.detail)
    }
}

/// One projection being folded: its staged rows, where it stands and where it
/// stops.
struct Folding {
    name: ProjectionName,
    staged: Staged,
    checkpoint: u64,
    until: u64,
}

/// The rows `folding` has staged and not committed.
fn staged_rows(folding: &[Folding]) -> usize {
    folding.iter().map(|f| f.staged.len()).sum()
}

impl Folding {
    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError> {
        if envelope.seq > self.checkpoint && envelope.seq <= self.until {
            self.name.apply(&mut self.staged, envelope)?;
        }
        Ok(())
    }

    fn commit(&mut self, seq: u64) -> Result<(), ProjectionError> {
        let seq = seq.min(self.until);
        if seq > self.checkpoint {
            self.staged.commit(seq)?;
            self.checkpoint = seq;
        }
        Ok(())
    }
}

impl Projections {
    /// Opens the projections' trees beside `log`. Nothing is folded yet: call
    /// [`Projections::catch_up`] or [`Projections::run_live`].
    pub fn open(log: &EventLog) -> Result<Projections, ProjectionError> {
        let trees = ProjectionName::ALL
            .into_iter()
            .map(|name| {
                let tree = log.db().open_tree(name.tree_name())?;
                view::recover(name.as_str(), &tree)?;
                view::ensure_layout(name.as_str(), &tree, name.layout())?;
                Ok((name, tree))
            })
            .collect::<Result<Vec<_>, ProjectionError>>()?;
        let projections = Projections {
            log: log.clone(),
            trees,
            caught_up: watch::Sender::new(0),
            live_folded: Arc::new(AtomicU64::new(0)),
            wanted: Arc::new(Notify::new()),
            failure: Arc::new(std::sync::OnceLock::new()),
        };
        projections
            .caught_up
            .send_replace(projections.min_checkpoint()?);
        Ok(projections)
    }

    fn tree(&self, name: ProjectionName) -> &sled::Tree {
        &self
            .trees
            .iter()
            .find(|(n, _)| *n == name)
            .expect("every projection has a tree")
            .1
    }

    pub fn history(&self) -> HistoryView {
        HistoryView {
            tree: self.tree(ProjectionName::History).clone(),
            log: self.log.clone(),
        }
    }

    pub fn audit(&self) -> AuditView {
        AuditView {
            tree: self.tree(ProjectionName::Audit).clone(),
        }
    }

    pub fn costs(&self) -> CostsView {
        CostsView {
            tree: self.tree(ProjectionName::Costs).clone(),
        }
    }

    pub fn keys(&self) -> KeysView {
        KeysView {
            tree: self.tree(ProjectionName::Keys).clone(),
        }
    }

    /// The seq every projection has folded (and committed) up to.
    pub fn caught_up_to(&self) -> u64 {
        *self.caught_up.borrow()
    }

    /// The seq a projection has folded up to.
    pub fn checkpoint(&self, name: ProjectionName) -> Result<u64, ProjectionError> {
        view::checkpoint(self.tree(name))
    }

    /// The seq a projection has folded up to, committed or not: its
    /// checkpoint, or where [`Projections::run_live`] stands if further. A
    /// live fold commits within [`LIVE_COMMIT_INTERVAL`], and at once for a
    /// reader that waits, so this, not the checkpoint, is what readers are
    /// behind by.
    pub fn folded_to(&self, name: ProjectionName) -> Result<u64, ProjectionError> {
        let live = self.live_folded.load(Ordering::Relaxed);
        Ok(self.checkpoint(name)?.max(live))
    }

    fn min_checkpoint(&self) -> Result<u64, ProjectionError> {
        let mut min = u64::MAX;
        for name in ProjectionName::ALL {
            min = min.min(self.checkpoint(name)?);
        }
        Ok(min)
    }

    /// Waits until every projection has folded `seq` (read-your-writes for
    /// queries after an append).
    pub async fn wait_for(&self, seq: u64) {
        let mut caught_up = self.caught_up.subscribe();
        if *caught_up.borrow_and_update() >= seq {
            return;
        }
        // The live fold may be holding back a commit; ask for it. A permit is
        // stored when the fold is busy, so the request is not lost.
        self.wanted.notify_one();
        // The sender lives in `self`, so this cannot fail while we wait.
        let _ = caught_up.wait_for(|at| *at >= seq).await;
    }

    /// The folds of `only` from their checkpoints up to `until`, staging
    /// with `staged` ([`Staged::new`], or [`Staged::rebuilding`] for a
    /// replay).
    fn folding(
        &self,
        only: &[ProjectionName],
        until: u64,
        staged: fn(&'static str, sled::Tree) -> Staged,
    ) -> Result<Vec<Folding>, ProjectionError> {
        only.iter()
            .map(|&name| {
                let tree = self.tree(name).clone();
                Ok(Folding {
                    name,
                    checkpoint: view::checkpoint(&tree)?,
                    staged: staged(name.as_str(), tree),
                    until,
                })
            })
            .collect()
    }

    /// Folds every projection from its checkpoint up to the log's head.
    /// `progress` gets each folded seq. Returns the head.
    pub fn catch_up(&self, progress: &mut dyn FnMut(u64)) -> Result<u64, ProjectionError> {
        self.catch_up_unless(progress, None)
    }

    /// [`Projections::catch_up`] that stops early once `interrupt` is set:
    /// it commits what it has folded (within a batch of a few thousand
    /// events) and returns [`ProjectionError::Interrupted`]; the next catch
    /// up goes on from there.
    pub fn catch_up_unless(
        &self,
        progress: &mut dyn FnMut(u64),
        interrupt: Option<&AtomicBool>,
    ) -> Result<u64, ProjectionError> {
        let head = self.log.head();
        let mut folding = self.folding(&ProjectionName::ALL, head, Staged::new)?;
        fold_range(&self.log, &mut folding, progress, interrupt)?;
        self.caught_up.send_replace(head);
        Ok(head)
    }

    /// Rebuilds `only` (or every projection) from seq 1.
    pub fn replay(
        &self,
        only: Option<ProjectionName>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, ProjectionError> {
        let names: Vec<ProjectionName> = match only {
            Some(name) => vec![name],
            None => ProjectionName::ALL.to_vec(),
        };
        for name in &names {
            view::start_rebuild(self.tree(*name))?;
        }
        let head = self.log.head();
        let mut folding = self.folding(&names, head, Staged::rebuilding)?;
        fold_range(&self.log, &mut folding, progress, None)?;
        for name in &names {
            view::finish_rebuild(self.tree(*name))?;
        }
        self.caught_up.send_replace(self.min_checkpoint()?);
        Ok(head)
    }

    /// Tails the log, folding each event as it becomes durable, until `shutdown`
    /// completes. Once it has caught up with the log it commits — at once when
    /// a reader waits ([`Projections::wait_for`]), otherwise at most every
    /// [`LIVE_COMMIT_INTERVAL`] — and while it has not, at least every 8192
    /// events; and whenever [`LIVE_COMMIT_ROWS`] rows are staged. What is
    /// folded but not yet committed is folded again after a crash, like
    /// anything after a checkpoint.
    ///
    /// An error ends the fold for good; [`Projections::failure`] says why
    /// from then on, so that readers can refuse instead of serving views
    /// that no longer change (a revoked key that still passes).
    pub async fn run_live(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ProjectionError> {
        let result = self.fold_live(shutdown, LIVE_COMMIT_INTERVAL).await;
        if let Err(error) = &result {
            let _ = self.failure.set(error.to_string());
        }
        result
    }

    /// Why the live fold stopped, if it stopped with an error.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// [`Projections::run_live`] committing at most every `interval` unless
    /// readers wait or rows pile up.
    async fn fold_live(
        &self,
        shutdown: impl Future<Output = ()>,
        interval: Duration,
    ) -> Result<(), ProjectionError> {
        let mut folding = self.folding(&ProjectionName::ALL, u64::MAX, Staged::new)?;
        let from = folding.iter().map(|f| f.checkpoint).min().unwrap_or(0) + 1;
        let mut subscription = self.log.subscribe(from);
        tokio::pin!(shutdown);
        // The last folded seq, while it is not committed.
        let mut pending: Option<u64> = None;
        let mut last_commit = Instant::now();
        loop {
            let due = last_commit + interval;
            let first = tokio::select! {
                next = subscription.next() => match next {
                    Some(envelope) => envelope?,
                    None => {
                        self.commit_live(&mut folding, pending.take()).await?;
                        return Ok(());
                    }
                },
                () = self.wanted.notified(), if pending.is_some() => {
                    self.commit_live(&mut folding, pending.take()).await?;
                    last_commit = Instant::now();
                    continue;
                }
                () = tokio::time::sleep_until(due), if pending.is_some() => {
                    self.commit_live(&mut folding, pending.take()).await?;
                    last_commit = Instant::now();
                    continue;
                }
                () = &mut shutdown => {
                    self.commit_live(&mut folding, pending.take()).await?;
                    return Ok(());
                }
            };
            let mut last = first.seq;
            for f in &mut folding {
                f.apply(&first)?;
            }
            let mut folded = 1;
            while folded < COMMIT_EVERY_EVENTS && staged_rows(&folding) < LIVE_COMMIT_ROWS {
                let Some(envelope) = subscription.try_next() else {
                    break;
                };
                let envelope = envelope?;
                for f in &mut folding {
                    f.apply(&envelope)?;
                }
                last = envelope.seq;
                folded += 1;
            }
            pending = Some(last);
            self.live_folded.store(last, Ordering::Relaxed);
            // Each `wait_for` holds a receiver while it waits.
            let readers_wait = self.caught_up.receiver_count() > 0;
            let keys_changed = folding
                .iter()
                .any(|f| f.name == ProjectionName::Keys && !f.staged.is_empty());
            if readers_wait
                || keys_changed
                || folded >= COMMIT_EVERY_EVENTS
                || staged_rows(&folding) >= LIVE_COMMIT_ROWS
                || Instant::now() >= due
            {
                self.commit_live(&mut folding, pending.take()).await?;
                last_commit = Instant::now();
            }
        }
    }

    /// Commits every projection up to `pending`, if set, and tells the readers
    /// waiting for it. A commit of more than [`INLINE_COMMIT_ROWS`] rows runs
    /// on a blocking thread: thousands of rows take milliseconds, which on a
    /// runtime worker would hold up every task queued behind it.
    async fn commit_live(
        &self,
        folding: &mut Vec<Folding>,
        pending: Option<u64>,
    ) -> Result<(), ProjectionError> {
        let Some(last) = pending else {
            return Ok(());
        };
        if staged_rows(folding) <= INLINE_COMMIT_ROWS {
            for f in folding.iter_mut() {
                f.commit(last)?;
            }
        } else {
            let mut moved = std::mem::take(folding);
            let (moved, committed) = tokio::task::spawn_blocking(move || {
                let committed = moved.iter_mut().try_for_each(|f| f.commit(last));
                (moved, committed)
            })
            .await
            .map_err(|error| match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => ProjectionError::Stopped(error.to_string()),
            })?;
            *folding = moved;
            committed?;
        }
        self.caught_up.send_replace(last);
        Ok(())
    }

    /// Rebuilds every projection into scratch space, up to the live view's
    /// checkpoint, and compares the rows. Returns the differences (empty when the
    /// live views are exactly what the log gives). The live views are not changed.
    pub fn verify(
        &self,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<ViewDifference>, ProjectionError> {
        let scratch_dir = scratch_path();
        // The views hold conversations' content: readable by this user only.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&scratch_dir)
                .map_err(|e| ProjectionError::Storage(sled::Error::Io(e)))?;
        }
        let scratch = sled::Config::new()
            .path(&scratch_dir)
            .temporary(true)
            .open()?;
        let mut folding = Vec::new();
        let mut scratch_trees = Vec::new();
        for name in ProjectionName::ALL {
            let tree = scratch.open_tree(name.tree_name())?;
            scratch_trees.push((name, tree.clone()));
            folding.push(Folding {
                name,
                // A scratch copy, dropped after the comparison.
                staged: Staged::rebuilding(name.as_str(), tree),
                checkpoint: 0,
                // Exactly as far as the live view has folded.
                until: self.checkpoint(name)?,
            });
        }
        fold_range(&self.log, &mut folding, progress, None)?;
        let mut differences = Vec::new();
        for (name, scratch_tree) in &scratch_trees {
            if let Some(detail) =
                compare_rows(name.rows(self.tree(*name)), name.rows(scratch_tree))?
            {
                differences.push(ViewDifference {
                    projection: *name,
                    detail,
                });
            }
        }
        drop(scratch);
        let _ = std::fs::remove_dir_all(&scratch_dir);
        Ok(differences)
    }
}

fn scratch_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "switchboard-verify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ))
}

/// The first difference between two views' rows ([`ProjectionName::rows`]),
/// described; `None` if equal.
fn compare_rows(
    mut live_rows: impl Iterator<Item = RowResult>,
    mut rebuilt_rows: impl Iterator<Item = RowResult>,
) -> Result<Option<String>, ProjectionError> {
    loop {
        match (
            live_rows.next().transpose()?,
            rebuilt_rows.next().transpose()?,
        ) {
            (None, None) => return Ok(None),
            (Some((key, _)), None) => {
                return Ok(Some(format!(
                    "live view has an extra row {}",
                    show_key(&key)
                )))
            }
            (None, Some((key, _))) => {
                return Ok(Some(format!("live view lacks row {}", show_key(&key))))
            }
            (Some((live_key, live_value)), Some((key, value))) => {
                if live_key != key {
                    let (first, what) = if live_key < key {
                        (live_key, "has an extra row")
                    } else {
                        (key, "lacks row")
                    };
                    return Ok(Some(format!("live view {what} {}", show_key(&first))));
                }
                if live_value != value {
                    return Ok(Some(format!(
                        "row {} differs from its rebuild",
                        show_key(&key)
                    )));
                }
            }
        }
    }
}

fn show_key(key: &[u8]) -> String {
    key.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use switchboard_events::catalog::MessageReceived;
    use switchboard_events::{Event, ExpectedVersion, NewEvent, OpenMode, StreamId};

    use super::*;

    /// With no reader waiting and the interval an hour off, a live fold
    /// commits once [`LIVE_COMMIT_ROWS`] rows are staged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_fold_commits_once_enough_rows_are_staged() {
        let dir = tempfile::tempdir().expect("temporary dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open the log");
        let projections = Projections::open(&log).expect("open the projections");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let live = projections.clone();
        let task = tokio::spawn(async move {
            let never = Duration::from_secs(3600);
            live.fold_live(async { drop(stopped.await) }, never).await
        });
        // A message of its own conversation stages at least one history row.
        for n in 0..LIVE_COMMIT_ROWS * 2 {
            let conversation = format!("c{n}");
            let message = Event::MessageReceived(MessageReceived {
                conversation_id: conversation.clone(),
                message_id: "m1".into(),
                key_id: "k1".into(),
                user: None,
                content: "hello".into(),
                agent: None,
            });
            let stream = StreamId::conversation(&conversation).expect("a valid stream id");
            log.append(stream, ExpectedVersion::Any, vec![NewEvent::new(message)])
                .await
                .expect("append");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let committed = loop {
            let committed = projections
                .checkpoint(ProjectionName::History)
                .expect("checkpoint");
            if committed > 0 || std::time::Instant::now() > deadline {
                break committed;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(
            committed > 0,
            "nothing of {} messages committed in 30 s",
            log.head()
        );
        stop.send(()).expect("the live fold is running");
        task.await.expect("join").expect("live fold");
        assert_eq!(
            projections
                .checkpoint(ProjectionName::History)
                .expect("checkpoint"),
            log.head()
        );
    }
}
