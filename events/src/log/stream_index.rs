//! The stream index, written after the flush that makes its records durable,
//! a stream's appends gathered into one entry.
//!
//! Every append needs a stream index entry (`s` stream `0x00` version → its
//! seqs). The appends of one group are mostly to different streams, so an
//! entry each lands in as many nodes of the tree, far apart: writing them
//! took more of the writer's time than anything else it does per group,
//! and they are what the appenders wait on. So the writer does not write
//! them. It keeps each append's run of seqs in memory ([`Unindexed`]), where
//! readers find them, and whoever made a group durable writes, once its
//! appenders are answered ([`Unindexed::index`]):
//! - a stream's runs as one entry once it has [`RUNS_PER_ENTRY`] of them,
//!   keyed by the first one's version (a busy conversation's appends share
//!   an entry);
//! - every run older than [`MAX_LAG_RECORDS`] records, so that a quiet
//!   stream's runs do not wait in memory forever;
//! - then the `mindexed` marker: every record up to it has its entry in the
//!   tree.
//!
//! A closed log has written all of them ([`Unindexed::index_all`]), and so
//! has `verify` before it reads the tree's index. After a
//! crash the marker lags at most about [`MAX_LAG_RECORDS`] records (sled
//! recovers a prefix of the writes, and entries go in before the marker that
//! counts them), and opening the log writes an entry for each record past
//! it that none covers ([`catch_up`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use super::read::{self, StoredRecords};
use super::{keys, ReadError};
use crate::envelope::StreamId;

/// Runs (appends) of a stream gathered before they are written as one entry.
pub const RUNS_PER_ENTRY: usize = 16;

/// The most records a run waits behind the durable head before it is
/// written in any case: what opening the log after a crash reads again.
pub const MAX_LAG_RECORDS: u64 = 32_768;

/// One append's events in a stream: from `first_version` at `first_seq` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first_version: u64,
    pub first_seq: u64,
    pub count: u64,
}

impl Run {
    /// The version after the run's last event.
    pub fn end_version(&self) -> u64 {
        self.first_version.saturating_add(self.count)
    }
}

/// What the writer has written and the tree's stream index does not hold.
#[derive(Default)]
struct Pending {
    /// By stream, in version order (so in seq order). Some may be past the
    /// durable head: readers skip those, as they skip such records.
    runs: HashMap<StreamId, Vec<Run>>,
    /// Each stream of `runs` by the first seq of its first run.
    oldest: BTreeMap<u64, StreamId>,
    /// The `mindexed` marker as last written.
    marked: u64,
}

/// Stream index entries written by the writer and not in the tree yet.
pub struct Unindexed {
    pending: Mutex<Pending>,
    /// Held while entries are copied out, written into the tree and
    /// forgotten, so that two writes (`verify`'s and the log's) never
    /// interleave: one could otherwise put back a shorter entry over a
    /// longer one under the same key, after the runs it lacks had left
    /// `pending`.
    writing: Mutex<()>,
}

impl Unindexed {
    /// Every change holds the map whole, so one a panic interrupted is too.
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A log indexed up to seq `marked` (what [`catch_up`] left).
    pub fn new(marked: u64) -> Unindexed {
        Unindexed {
            pending: Mutex::new(Pending {
                marked,
                ..Pending::default()
            }),
            writing: Mutex::new(()),
        }
    }

    /// A written group's runs, in seq order.
    pub fn add(&self, runs: &[(StreamId, Run)]) {
        let mut pending = self.lock();
        let Pending {
            runs: map, oldest, ..
        } = &mut *pending;
        for (stream, run) in runs {
            // A stream in the map has runs: one without is removed.
            match map.get_mut(stream) {
                Some(stream_runs) => stream_runs.push(*run),
                None => {
                    oldest.insert(run.first_seq, stream.clone());
                    map.insert(stream.clone(), vec![*run]);
                }
            }
        }
    }

    /// `stream`'s runs not in the tree yet, in version order. They come
    /// after its entries in the tree, or repeat the last of them: runs
    /// leave here once their entry is there.
    pub fn of(&self, stream: &StreamId) -> Vec<Run> {
        self.lock().runs.get(stream).cloned().unwrap_or_default()
    }

    /// The version of `stream`'s last event at or before seq `head` among
    /// the runs here, if there is one.
    pub fn last_version(&self, stream: &StreamId, head: u64) -> Option<u64> {
        let pending = self.lock();
        let runs = pending.runs.get(stream)?;
        runs.iter()
            .rev()
            .find(|run| run.first_seq <= head)
            .map(|run| run.end_version() - 1)
    }

    /// After the groups up to seq `durable` are flushed and answered, with
    /// `flushed` the runs of those groups: writes the entries that are due
    /// (see the module's doc) and moves the marker.
    pub fn index(
        &self,
        tree: &sled::Tree,
        flushed: &[(StreamId, Run)],
        durable: u64,
    ) -> sled::Result<()> {
        let due: HashSet<StreamId> = {
            let pending = self.lock();
            let full = flushed.iter().map(|(stream, _)| stream).filter(|stream| {
                pending.runs.get(*stream).is_some_and(|runs| {
                    runs.len() >= RUNS_PER_ENTRY && runs[RUNS_PER_ENTRY - 1].first_seq <= durable
                })
            });
            let old = durable.saturating_sub(MAX_LAG_RECORDS);
            let aged = pending.oldest.range(..=old).map(|(_, stream)| stream);
            full.chain(aged).cloned().collect()
        };
        self.write(tree, due, durable)
    }

    /// Writes every run up to seq `durable`: when the log closes, and for a
    /// reader of the tree's index (`verify`).
    pub fn index_all(&self, tree: &sled::Tree, durable: u64) -> sled::Result<()> {
        let streams: Vec<StreamId> = self.lock().runs.keys().cloned().collect();
        self.write(tree, streams, durable)
    }

    /// Writes the entries of `streams`' runs up to seq `durable`, then moves
    /// the marker to the last seq before every run left, and forgets the
    /// runs written; one call at a time.
    fn write(
        &self,
        tree: &sled::Tree,
        streams: impl IntoIterator<Item = StreamId>,
        durable: u64,
    ) -> sled::Result<()> {
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Copied out, then written, then removed: a reader that looks here
        // first and in the tree next finds each run in one or the other.
        let entries: Vec<(StreamId, Vec<Run>)> = {
            let pending = self.lock();
            streams
                .into_iter()
                .filter_map(|stream| {
                    let runs: Vec<Run> = pending
                        .runs
                        .get(&stream)?
                        .iter()
                        .take_while(|run| run.first_seq <= durable)
                        .copied()
                        .collect();
                    (!runs.is_empty()).then_some((stream, runs))
                })
                .collect()
        };
        for (stream, runs) in &entries {
            insert(tree, stream, runs)?;
        }
        let mut pending = self.lock();
        let Pending {
            runs: map,
            oldest,
            marked,
        } = &mut *pending;
        for (stream, written) in entries {
            let Some(left) = map.get_mut(&stream) else {
                continue;
            };
            oldest.remove(&written[0].first_seq);
            left.drain(..written.len());
            match left.first() {
                Some(next) => {
                    oldest.insert(next.first_seq, stream);
                }
                None => {
                    map.remove(&stream);
                }
            }
        }
        let indexed = oldest
            .keys()
            .next()
            .map_or(durable, |first| (first - 1).min(durable));
        if indexed > *marked {
            tree.insert(keys::INDEXED_KEY, &indexed.to_be_bytes())?;
            *marked = indexed;
        }
        Ok(())
    }
}

/// One entry for `runs`, consecutive appends of `stream`.
fn insert(tree: &sled::Tree, stream: &StreamId, runs: &[Run]) -> sled::Result<()> {
    let seqs: Vec<(u64, u64)> = runs.iter().map(|run| (run.first_seq, run.count)).collect();
    tree.insert(
        keys::stream_entry(stream, runs[0].first_version),
        keys::stream_runs_value(&seqs),
    )?;
    Ok(())
}

/// At open, before any append: writes a stream index entry for each record
/// after the `mindexed` marker, up to `head`, that no entry covers, and moves
/// the marker to `head`. Returns `head`. A log without the marker was written
/// with every entry in its group commit: it is indexed up to `head`.
///
/// Every record is read and decoded before anything is written: a record
/// that does not decode fails the open and changes nothing.
pub fn catch_up(tree: &sled::Tree, head: u64) -> Result<u64, String> {
    let marker = tree
        .get(keys::INDEXED_KEY)
        .map_err(|e| e.to_string())?
        .map(|value| {
            keys::seq_value(&value).ok_or_else(|| "the stream index marker is malformed".to_owned())
        })
        .transpose()?;
    if let Some(indexed) = marker.filter(|&indexed| indexed < head) {
        let mut lost = Vec::new();
        for raw in StoredRecords::new(tree, indexed + 1, head) {
            let envelope = raw
                .and_then(|raw| raw.decode())
                .map_err(|e: ReadError| e.to_string())?;
            let covered = read::stream_entry_holding(tree, &envelope.stream, envelope.version)
                .map_err(|e| e.to_string())?
                .is_some();
            if !covered {
                let run = Run {
                    first_version: envelope.version,
                    first_seq: envelope.seq,
                    count: 1,
                };
                lost.push((envelope.stream, run));
            }
        }
        for (stream, run) in &lost {
            insert(tree, stream, &[*run]).map_err(|e| e.to_string())?;
        }
        tracing::info!(
            from = indexed + 1,
            head,
            written = lost.len(),
            "wrote the stream index entries a crash lost"
        );
    }
    if marker != Some(head) {
        tree.insert(keys::INDEXED_KEY, &head.to_be_bytes())
            .map_err(|e| e.to_string())?;
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first_version: u64, first_seq: u64) -> Run {
        Run {
            first_version,
            first_seq,
            count: 1,
        }
    }

    fn stream(name: &str) -> StreamId {
        StreamId::conversation(name).expect("a valid stream")
    }

    /// The entries in `tree` of `name`: first version and the runs' seqs.
    fn entries(tree: &sled::Tree, name: &str) -> Vec<(u64, Vec<(u64, u64)>)> {
        tree.scan_prefix(keys::stream_prefix(&stream(name)))
            .map(|entry| {
                let (key, value) = entry.expect("read");
                let version = keys::stream_entry_version(&key).expect("a version");
                (version, keys::stream_runs(&value).expect("runs"))
            })
            .collect()
    }

    fn marker(tree: &sled::Tree) -> Option<u64> {
        let value = tree.get(keys::INDEXED_KEY).expect("read")?;
        keys::seq_value(&value)
    }

    #[test]
    fn entries_wait_for_sixteen_appends_or_their_age_and_the_marker_for_the_oldest() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("log").expect("tree");
        let unindexed = Unindexed::new(0);
        let (a, b, c) = (stream("a"), stream("b"), stream("c"));
        let first = [
            (a.clone(), run(1, 1)),
            (b.clone(), run(1, 2)),
            (a.clone(), run(2, 3)),
        ];
        unindexed.add(&first);
        unindexed.index(&tree, &first, 3).expect("index");
        assert_eq!(tree.len(), 0, "nothing is due");
        assert_eq!(unindexed.last_version(&a, 3), Some(2));
        assert_eq!(
            unindexed.last_version(&a, 2),
            Some(1),
            "seq 3 is past that head"
        );

        // a's oldest run grows too old: both of its runs go in one entry;
        // b's (at seq 2) is not old yet, and holds the marker back.
        unindexed
            .index(&tree, &[], 1 + MAX_LAG_RECORDS)
            .expect("index");
        assert_eq!(entries(&tree, "a"), [(1, vec![(1, 1), (3, 1)])]);
        assert_eq!(entries(&tree, "b"), []);
        assert_eq!(marker(&tree), Some(1));
        assert_eq!(unindexed.of(&a), []);
        assert_eq!(unindexed.of(&b), [run(1, 2)]);

        // Sixteen appends of c fill an entry at once, but the seventeenth is
        // not durable yet and stays.
        let c_runs: Vec<_> = (0..17u64)
            .map(|n| (c.clone(), run(n + 1, 100 + n)))
            .collect();
        unindexed.add(&c_runs);
        unindexed.index(&tree, &c_runs, 115).expect("index");
        let expected: Vec<(u64, u64)> = (100..116).map(|seq| (seq, 1)).collect();
        assert_eq!(entries(&tree, "c"), [(1, expected)]);
        assert_eq!(unindexed.of(&c), [run(17, 116)]);
        assert_eq!(marker(&tree), Some(1), "b still waits");

        // Closing writes every durable run; the marker stops before c's last.
        unindexed.index_all(&tree, 115).expect("index all");
        assert_eq!(entries(&tree, "b"), [(1, vec![(2, 1)])]);
        assert_eq!(marker(&tree), Some(115));
        unindexed.index_all(&tree, 116).expect("index all");
        assert_eq!(entries(&tree, "c")[1], (17, vec![(116, 1)]));
        assert_eq!(marker(&tree), Some(116));
        assert_eq!(unindexed.of(&c), []);
    }
}
