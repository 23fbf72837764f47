//! A projection's view: rows in its own sled tree, staged in memory while events
//! are folded and written with the checkpoint all or nothing ([`Staged::commit`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{de::DeserializeOwned, Serialize};

/// The key of a view's checkpoint row: the seq of the last event folded into it.
/// Row keys start with a lowercase letter, so this sorts first and never collides.
pub const CHECKPOINT_KEY: &[u8] = b"!checkpoint";

/// The keys of a commit's redo rows start with this (then the row's index,
/// u32 big-endian); they exist only while a commit is being written.
const REDO_PREFIX: &[u8] = b"!redo";

/// The key of the marker [`start_rebuild`] writes first and
/// [`finish_rebuild`] removes last; it exists only while a view is rebuilt.
const REBUILDING_KEY: &[u8] = b"!rebuilding";

/// The key of a view's layout version (one byte), when its rows are not laid
/// out as the first version of the view had them. [`ensure_layout`] drops a
/// view of another layout, which is then folded again from seq 1.
pub const LAYOUT_KEY: &[u8] = b"!layout";

/// A redo row holds writes until it is at least this long: rows of a few KiB
/// keep sled's nodes small (see the log's `CHUNK_BYTES`).
const REDO_ROW_BYTES: usize = 4096;

/// One row of a commit's redo: some of its writes, in order.
#[derive(Serialize, serde::Deserialize)]
struct RedoRow<'a> {
    /// The checkpoint the commit writes.
    seq: u64,
    /// Whether this is the commit's last redo row.
    last: bool,
    /// Each write: the key, and the row (`None` deletes it).
    #[serde(borrow)]
    writes: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

/// Why a projection could not fold or answer.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("projection {projection}: row {key} is corrupt: {detail}")]
    CorruptRow {
        projection: &'static str,
        key: String,
        detail: String,
    },
    #[error(transparent)]
    Log(#[from] switchboard_events::ReadError),
    #[error("unknown projection {0:?} (expected history, audit, costs or keys)")]
    UnknownProjection(String),
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("the projections stopped: {0}")]
    Stopped(String),
    #[error("the catch-up was interrupted; it goes on from its last commit next time")]
    Interrupted,
}

/// Rows being changed by a fold, over the rows already in the tree.
pub struct Staged {
    projection: &'static str,
    tree: sled::Tree,
    writes: BTreeMap<Vec<u8>, Write>,
    /// Whether commits write a redo first: not for a view being rebuilt
    /// ([`Staged::rebuilding`]).
    redo: bool,
}

/// A staged row.
enum Write {
    Encoded(Vec<u8>),
    /// A row a fold changes in place ([`Staged::get_mut`]), encoded at the
    /// commit: a row changed by many events (a conversation's summary, a
    /// key's cost totals) is decoded and encoded once per commit, not once
    /// per event.
    Typed(Box<dyn TypedRow>),
    Deleted,
}

/// A row kept as its value until it is written.
trait TypedRow: Any + Send {
    fn encode(&self) -> Vec<u8>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Serialize + Any + Send> TypedRow for T {
    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("view rows always serialize")
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Staged {
    pub fn new(projection: &'static str, tree: sled::Tree) -> Self {
        Staged {
            projection,
            tree,
            writes: BTreeMap::new(),
            redo: true,
        }
    }

    /// Stages over a view that nothing reads before its fold is done: one
    /// under [`start_rebuild`], or a scratch copy. Its commits write no redo
    /// (half the bytes); a crash midway leaves rows a commit did not finish,
    /// which [`recover`] drops with the whole rebuild.
    pub fn rebuilding(projection: &'static str, tree: sled::Tree) -> Self {
        Staged {
            redo: false,
            ..Staged::new(projection, tree)
        }
    }

    /// The row at `key` as the fold has left it so far.
    pub fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, ProjectionError> {
        let decode = |bytes: &[u8]| decode_row(self.projection, key, bytes).map(Some);
        match self.writes.get(key) {
            Some(Write::Encoded(bytes)) => decode(bytes),
            Some(Write::Typed(row)) => decode(&row.encode()),
            Some(Write::Deleted) => Ok(None),
            None => match self.tree.get(key)? {
                Some(stored) => decode(&stored),
                None => Ok(None),
            },
        }
    }

    /// The row at `key` as the fold has left it so far, to change in place;
    /// `None` when there is none.
    pub fn get_mut<T>(&mut self, key: &[u8]) -> Result<Option<&mut T>, ProjectionError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
    {
        let projection = self.projection;
        if !self.writes.contains_key(key) {
            let Some(stored) = self.tree.get(key)? else {
                return Ok(None);
            };
            let row: T = decode_row(projection, key, &stored)?;
            self.writes
                .insert(key.to_vec(), Write::Typed(Box::new(row)));
        }
        let write = self.writes.get_mut(key).expect("staged just above");
        let decoded: Option<T> = match write {
            Write::Deleted => return Ok(None),
            Write::Encoded(bytes) => Some(decode_row(projection, key, bytes)?),
            // Typed as another type (no projection does that): convert.
            Write::Typed(row) if !row.as_any().is::<T>() => {
                Some(decode_row(projection, key, &row.encode())?)
            }
            Write::Typed(_) => None,
        };
        if let Some(row) = decoded {
            *write = Write::Typed(Box::new(row));
        }
        match write {
            Write::Typed(row) => Ok(row.as_any_mut().downcast_mut::<T>()),
            Write::Encoded(_) | Write::Deleted => unreachable!("made typed just above"),
        }
    }

    pub fn put<T: Serialize>(&mut self, key: Vec<u8>, row: &T) {
        let bytes = postcard::to_stdvec(row).expect("view rows always serialize");
        self.put_encoded(key, bytes);
    }

    /// Stages `row` at `key`, to be changed in place by [`Staged::get_mut`].
    pub fn put_typed<T: Serialize + Send + 'static>(&mut self, key: Vec<u8>, row: T) {
        self.writes.insert(key, Write::Typed(Box::new(row)));
    }

    /// Stages `bytes`, already encoded, as the row at `key`.
    pub fn put_encoded(&mut self, key: Vec<u8>, bytes: Vec<u8>) {
        self.writes.insert(key, Write::Encoded(bytes));
    }

    /// The staged row with the greatest key under `prefix`, to extend in
    /// place; `None` when no row under it is staged (stored rows are not
    /// looked at) or the greatest staged one is a deletion (or typed).
    pub fn last_staged_mut(&mut self, prefix: &[u8]) -> Option<&mut Vec<u8>> {
        self.writes
            .range_mut::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .last()
            .and_then(|(_, row)| match row {
                Write::Encoded(bytes) => Some(bytes),
                Write::Typed(_) | Write::Deleted => None,
            })
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, Write::Deleted);
    }

    /// Deletes every row whose key starts with `prefix`, staged or stored.
    pub fn delete_prefix(&mut self, prefix: &[u8]) -> Result<(), ProjectionError> {
        let mut doomed: Vec<Vec<u8>> = self
            .writes
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for entry in self.tree.scan_prefix(prefix) {
            doomed.push(entry?.0.to_vec());
        }
        for key in doomed {
            self.writes.insert(key, Write::Deleted);
        }
        Ok(())
    }

    /// How many rows are staged (to decide when to commit).
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Writes the staged rows and the checkpoint `seq`, all or nothing.
    ///
    /// Not as a sled `Batch`: a batch holds a process-wide lock that stops
    /// every other sled operation of the process, the log's appends among
    /// them, for as long as it takes (tens of milliseconds for a few thousand
    /// rows), and from the first batch on every sled operation takes that
    /// lock. Instead the commit writes its redo first — every write, in rows
    /// under [`REDO_PREFIX`], the last one marked — then the rows, then the
    /// checkpoint, then removes the redo. sled recovers a prefix of the writes
    /// made before a crash, so after one either the redo is incomplete and no
    /// row was written, or it is complete and [`recover`] writes it again.
    /// Readers may see some of a commit's rows before the rest: newer rows,
    /// never older ones.
    ///
    /// With no rows staged the checkpoint alone is written, as a single
    /// insert: that is atomic by itself. A view being rebuilt
    /// ([`Staged::rebuilding`]) writes no redo.
    pub fn commit(&mut self, seq: u64) -> Result<(), ProjectionError> {
        for (key, row) in commit_writes(seq, self.take_rows(), self.redo) {
            write(&self.tree, key, row)?;
        }
        Ok(())
    }

    /// The staged rows, encoded, leaving none staged.
    fn take_rows(&mut self) -> Vec<TreeWrite> {
        std::mem::take(&mut self.writes)
            .into_iter()
            .map(|(key, write)| {
                let row = match write {
                    Write::Encoded(bytes) => Some(bytes.into()),
                    Write::Typed(row) => Some(row.encode().into()),
                    Write::Deleted => None,
                };
                (key.into(), row)
            })
            .collect()
    }
}

/// A write to a tree: the key and the row, `None` to delete it.
type TreeWrite = (sled::IVec, Option<sled::IVec>);

/// Every write a commit of `rows` up to `seq` makes, in order: its redo
/// rows, the rows, the checkpoint, the removal of the redo (see
/// [`Staged::commit`]). With no rows, the checkpoint alone; without `redo`,
/// the rows and the checkpoint.
fn commit_writes(seq: u64, mut rows: Vec<TreeWrite>, redo: bool) -> Vec<TreeWrite> {
    let checkpoint = (CHECKPOINT_KEY.into(), Some(seq.to_be_bytes()[..].into()));
    if rows.is_empty() {
        return vec![checkpoint];
    }
    if !redo {
        rows.push(checkpoint);
        return rows;
    }
    let redo = redo_rows(seq, &rows);
    let mut writes = Vec::with_capacity(2 * redo.len() + rows.len() + 1);
    let keys: Vec<sled::IVec> = (0..redo.len()).map(redo_key).collect();
    writes.extend(keys.iter().cloned().zip(redo.into_iter().map(Some)));
    writes.extend(rows);
    writes.push(checkpoint);
    writes.extend(keys.into_iter().map(|key| (key, None)));
    writes
}

fn write(
    tree: &sled::Tree,
    key: impl AsRef<[u8]>,
    row: Option<impl Into<sled::IVec>>,
) -> sled::Result<()> {
    match row {
        Some(row) => tree.insert(key, row).map(drop),
        None => tree.remove(key).map(drop),
    }
}

/// The redo rows of a commit of `rows` (at least one) up to `seq`.
fn redo_rows(seq: u64, rows: &[TreeWrite]) -> Vec<sled::IVec> {
    let mut redo = Vec::new();
    let mut row = RedoRow {
        seq,
        last: false,
        writes: Vec::new(),
    };
    let mut bytes = 0;
    for (index, (key, value)) in rows.iter().enumerate() {
        row.writes.push((key, value.as_deref()));
        bytes += key.len() + value.as_ref().map_or(0, |value| value.len());
        row.last = index + 1 == rows.len();
        if bytes >= REDO_ROW_BYTES || row.last {
            let encoded = postcard::to_stdvec(&row).expect("redo rows always serialize");
            redo.push(encoded.into());
            row.writes.clear();
            bytes = 0;
        }
    }
    redo
}

fn redo_key(index: usize) -> sled::IVec {
    let index = u32::try_from(index).expect("a commit has fewer than 2^32 redo rows");
    [REDO_PREFIX, &index.to_be_bytes()].concat().into()
}

/// Begins rebuilding `tree` from seq 1: marks it, then removes every other
/// row, its checkpoint among them. Fold into it with [`Staged::rebuilding`]
/// and end with [`finish_rebuild`].
///
/// sled recovers a prefix of the writes made before a crash, so a tree that
/// still holds the marker may hold any part of the old rows and any part of
/// the new ones — rows of a commit without its checkpoint among them, which a
/// catch-up would fold again. [`recover`] drops such a tree's rows, and the
/// view is folded again from seq 1.
pub fn start_rebuild(tree: &sled::Tree) -> Result<(), ProjectionError> {
    tree.insert(REBUILDING_KEY, &[])?;
    clear_rows(tree)
}

/// Ends a rebuild begun by [`start_rebuild`], after its last commit.
pub fn finish_rebuild(tree: &sled::Tree) -> Result<(), ProjectionError> {
    tree.remove(REBUILDING_KEY)?;
    Ok(())
}

/// Removes every row but the rebuild and layout markers, reading them from
/// the tree as it goes (a view may hold millions of rows).
fn clear_rows(tree: &sled::Tree) -> Result<(), ProjectionError> {
    for key in tree.iter().keys() {
        let key = key?;
        if key != REBUILDING_KEY && key != LAYOUT_KEY {
            tree.remove(key)?;
        }
    }
    Ok(())
}

/// Makes `tree` a view of `layout`: a view whose rows are laid out otherwise
/// (written by an older switchboard) is dropped, as a rebuild would begin,
/// and folds again from seq 1. A view with no layout marker is of layout 1.
/// Returns whether it dropped the view. Call it after [`recover`].
pub fn ensure_layout(
    projection: &'static str,
    tree: &sled::Tree,
    layout: u8,
) -> Result<bool, ProjectionError> {
    let stored = match tree.get(LAYOUT_KEY)? {
        None => 1,
        Some(bytes) => match *bytes {
            [layout] => layout,
            _ => {
                return Err(ProjectionError::CorruptRow {
                    projection,
                    key: "!layout".to_owned(),
                    detail: "not 1 byte".to_owned(),
                })
            }
        },
    };
    if stored == layout {
        return Ok(false);
    }
    let folded = checkpoint(tree)? > 0;
    // Marked first, so that a crash midway is finished by `recover`.
    start_rebuild(tree)?;
    finish_rebuild(tree)?;
    tree.insert(LAYOUT_KEY, &[layout])?;
    if folded {
        tracing::warn!(
            projection,
            from = stored,
            to = layout,
            "dropped a view of an older layout; it folds again from seq 1"
        );
    }
    Ok(folded)
}

/// Finishes what a crash interrupted: a rebuild ([`start_rebuild`]: every
/// row is removed and the view starts again from seq 1), or a commit (see
/// [`Staged::commit`]): a complete redo is written again, an incomplete one
/// (no row of it was written) removed. Returns the checkpoint a finished
/// commit wrote. Call it before folding into or reading `tree`.
pub fn recover(
    projection: &'static str,
    tree: &sled::Tree,
) -> Result<Option<u64>, ProjectionError> {
    if tree.contains_key(REBUILDING_KEY)? {
        clear_rows(tree)?;
        finish_rebuild(tree)?;
        tracing::warn!(
            projection,
            "dropped a rebuild a crash interrupted; the view folds again from seq 1"
        );
        return Ok(None);
    }
    let stored = tree
        .scan_prefix(REDO_PREFIX)
        .collect::<Result<Vec<_>, sled::Error>>()?;
    if stored.is_empty() {
        return Ok(None);
    }
    let mut redo = Vec::with_capacity(stored.len());
    for (index, (key, value)) in stored.iter().enumerate() {
        // A commit writes its redo rows in order from 0: a gap ends it.
        if *key != redo_key(index) {
            break;
        }
        redo.push(decode_row::<RedoRow<'_>>(projection, key, value)?);
    }
    let complete =
        redo.last().is_some_and(|row| row.last) && redo.iter().all(|row| row.seq == redo[0].seq);
    let finished = if complete {
        let seq = redo[0].seq;
        for (key, row) in redo.iter().flat_map(|row| row.writes.iter()) {
            write(tree, key, *row)?;
        }
        tree.insert(CHECKPOINT_KEY, &seq.to_be_bytes())?;
        tracing::warn!(projection, seq, "finished a commit a crash interrupted");
        Some(seq)
    } else {
        // Cut before its last row (no row of the commit is written yet), or
        // while it was being removed (every row of the commit is written).
        tracing::warn!(
            projection,
            "dropped the incomplete redo of a commit a crash interrupted"
        );
        None
    };
    for (key, _) in stored {
        tree.remove(key)?;
    }
    Ok(finished)
}

/// The seq a view has folded up to (0 for a new view).
pub fn checkpoint(tree: &sled::Tree) -> Result<u64, ProjectionError> {
    match tree.get(CHECKPOINT_KEY)? {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| ProjectionError::CorruptRow {
                projection: "checkpoint",
                key: "!checkpoint".to_owned(),
                detail: "not 8 bytes".to_owned(),
            }),
    }
}

pub fn decode_row<'a, T: serde::Deserialize<'a>>(
    projection: &'static str,
    key: &[u8],
    bytes: &'a [u8],
) -> Result<T, ProjectionError> {
    postcard::from_bytes(bytes).map_err(|e| ProjectionError::CorruptRow {
        projection,
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

/// Concatenates key parts with a 0x00 separator (ids never contain 0x00).
pub fn row_key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let len = 1 + parts.iter().map(|part| part.len() + 1).sum::<usize>();
    let mut key = Vec::with_capacity(len);
    key.push(prefix);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged() -> Staged {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        Staged::new("test", db.open_tree("t").expect("tree"))
    }

    fn stored(view: &Staged, key: &[u8]) -> Option<u64> {
        let bytes = view.tree.get(key).expect("read")?;
        Some(decode_row("test", key, &bytes).expect("decodes"))
    }

    #[test]
    fn a_row_changed_in_place_reads_back_and_is_written_encoded_at_the_commit() {
        let mut view = staged();
        view.tree
            .insert(b"stored", postcard::to_stdvec(&5u64).unwrap())
            .unwrap();
        view.put(b"staged".to_vec(), &7u64);
        view.put_typed(b"typed".to_vec(), 9u64);

        // Each kind of row, changed in place.
        for (key, was) in [(&b"stored"[..], 5), (b"staged", 7), (b"typed", 9)] {
            let row = view.get_mut::<u64>(key).expect("get_mut").expect("a row");
            assert_eq!(*row, was);
            *row += 100;
            assert_eq!(view.get::<u64>(key).expect("get"), Some(was + 100));
        }
        assert_eq!(view.get_mut::<u64>(b"missing").expect("get_mut"), None);
        assert!(!view.writes.contains_key(&b"missing"[..]), "nothing staged");
        view.delete(b"staged".to_vec());
        assert_eq!(view.get_mut::<u64>(b"staged").expect("get_mut"), None);
        // Nothing reaches the tree before the commit.
        assert_eq!(stored(&view, b"stored"), Some(5));

        view.commit(42).expect("commit");
        assert_eq!(stored(&view, b"stored"), Some(105));
        assert_eq!(stored(&view, b"typed"), Some(109));
        assert_eq!(stored(&view, b"staged"), None);
        assert_eq!(checkpoint(&view.tree).expect("checkpoint"), 42);
        assert!(view.is_empty());
    }

    fn snapshot(tree: &sled::Tree) -> Vec<(sled::IVec, sled::IVec)> {
        tree.iter().collect::<Result<_, _>>().expect("rows")
    }

    /// A view holding `before` and then `writes`: what a crash after those
    /// writes leaves on disk.
    fn crashed_after(before: &[(sled::IVec, sled::IVec)], writes: &[TreeWrite]) -> Staged {
        let crashed = staged();
        for (key, value) in before {
            crashed.tree.insert(key, value).unwrap();
        }
        for (key, row) in writes.iter().cloned() {
            write(&crashed.tree, key, row).unwrap();
        }
        crashed
    }

    /// A crash can stop a commit after any of its writes (sled recovers a
    /// prefix of them): for each prefix, [`recover`] leaves the view as it
    /// was before the commit or as the whole commit leaves it, nothing in
    /// between and no redo behind, and as it was after once the redo is
    /// complete.
    #[test]
    fn a_commit_cut_after_any_write_recovers_to_before_or_after_it() {
        let before = staged();
        for i in 0..40u64 {
            before
                .tree
                .insert(format!("row{i:02}"), vec![i as u8; 200])
                .unwrap();
        }
        before
            .tree
            .insert(CHECKPOINT_KEY, &10u64.to_be_bytes())
            .unwrap();
        let mut commit = Staged::new("test", before.tree.clone());
        for i in 0..30u64 {
            commit.put_encoded(format!("row{i:02}").into_bytes(), vec![i as u8 + 100; 300]);
        }
        commit.put_typed(b"row35".to_vec(), 7u64);
        commit.delete(b"row39".to_vec());
        commit.put(b"zz-new".to_vec(), &"a new row");
        let writes = commit_writes(20, commit.take_rows(), true);
        let redo_rows = writes
            .iter()
            .filter(|(key, _)| key.starts_with(REDO_PREFIX))
            .count()
            / 2;
        assert!(redo_rows >= 2, "rows over several redo rows: {redo_rows}");

        let state_before = snapshot(&before.tree);
        let after = crashed_after(&state_before, &writes);
        let state_after = snapshot(&after.tree);
        assert_eq!(checkpoint(&after.tree).unwrap(), 20);
        assert_ne!(state_before, state_after);

        for cut in 0..=writes.len() {
            let crashed = crashed_after(&state_before, &writes[..cut]);
            let finished = recover("test", &crashed.tree).expect("recovers");
            let state = snapshot(&crashed.tree);
            if cut < redo_rows {
                assert_eq!(finished, None, "cut after {cut} writes");
                assert!(
                    state == state_before,
                    "cut after {cut} writes: not as before"
                );
            } else {
                assert!(state == state_after, "cut after {cut} writes: not as after");
                // The whole redo is there until its removal starts; once a
                // row of it is removed, everything it holds is written.
                let whole_redo = cut <= writes.len() - redo_rows;
                assert_eq!(finished, whole_redo.then_some(20), "cut after {cut} writes");
            }
        }
    }

    /// A crash can stop a rebuild after any of its writes: for each prefix,
    /// [`recover`] leaves the view as it was (the rebuild had not begun),
    /// empty (to be folded again from seq 1), or rebuilt — never some rows
    /// without their checkpoint.
    #[test]
    fn a_rebuild_cut_after_any_write_recovers_to_before_empty_or_rebuilt() {
        let before = staged();
        before
            .tree
            .insert(CHECKPOINT_KEY, &10u64.to_be_bytes())
            .unwrap();
        for i in 0..20u64 {
            before
                .tree
                .insert(format!("row{i:02}"), vec![i as u8; 50])
                .unwrap();
        }
        let state_before = snapshot(&before.tree);
        // What a rebuild writes: the marker, the removals, two commits
        // without redo, the marker's removal.
        let marker = || sled::IVec::from(REBUILDING_KEY);
        let mut writes: Vec<TreeWrite> = vec![(marker(), Some(sled::IVec::default()))];
        writes.extend(state_before.iter().map(|(key, _)| (key.clone(), None)));
        for (seq, rows) in [(6u64, 0..12u64), (12, 12..25)] {
            let mut commit = Staged::rebuilding("test", before.tree.clone());
            for i in rows {
                commit.put_encoded(format!("row{i:02}").into_bytes(), vec![i as u8 + 100; 30]);
            }
            writes.extend(commit_writes(seq, commit.take_rows(), commit.redo));
        }
        writes.push((marker(), None));
        assert!(!writes.iter().any(|(key, _)| key.starts_with(REDO_PREFIX)));

        let state_after = snapshot(&crashed_after(&[], &writes).tree);
        assert_eq!(state_after.len(), 26, "25 rows and the checkpoint");
        for cut in 0..=writes.len() {
            let crashed = crashed_after(&state_before, &writes[..cut]);
            assert_eq!(recover("test", &crashed.tree).expect("recovers"), None);
            let state = snapshot(&crashed.tree);
            if cut == 0 {
                assert!(
                    state == state_before,
                    "cut before the rebuild: not as before"
                );
            } else if cut < writes.len() {
                assert!(
                    state.is_empty(),
                    "cut after {cut} writes: {} rows left",
                    state.len()
                );
                assert_eq!(checkpoint(&crashed.tree).unwrap(), 0);
            } else {
                assert!(state == state_after, "the whole rebuild: not as rebuilt");
            }
        }
    }

    #[test]
    fn a_typed_row_read_as_another_type_is_converted_and_a_bad_one_is_corrupt() {
        let mut view = staged();
        // u32 and u64 share postcard's varint encoding.
        view.put_typed(b"n".to_vec(), 3u32);
        *view.get_mut::<u64>(b"n").expect("get_mut").expect("row") += 1;
        assert_eq!(view.get::<u32>(b"n").expect("get"), Some(4));

        view.put_encoded(b"bad".to_vec(), vec![0xff]);
        let error = view.get_mut::<u64>(b"bad").expect_err("not a u64");
        assert!(
            matches!(error, ProjectionError::CorruptRow { ref key, .. } if key == "bad"),
            "{error}"
        );
        // A row that fails to decode stays as it was.
        assert_eq!(
            view.last_staged_mut(b"bad").map(|row| row.clone()),
            Some(vec![0xff])
        );
    }
}
