//! A projection's view: rows in its own sled tree, staged in memory while events
//! are folded and written with the checkpoint in one batch.

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Bound;

use serde::{de::DeserializeOwned, Serialize};

/// The key of a view's checkpoint row: the seq of the last event folded into it.
/// Row keys start with a lowercase letter, so this sorts first and never collides.
pub const CHECKPOINT_KEY: &[u8] = b"!checkpoint";

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
}

/// Rows being changed by a fold, over the rows already in the tree.
pub struct Staged {
    projection: &'static str,
    tree: sled::Tree,
    writes: BTreeMap<Vec<u8>, Write>,
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

    /// Writes the staged rows and the checkpoint `seq` in one atomic batch.
    ///
    /// With no rows staged the checkpoint alone is written, as a single
    /// insert: that is atomic by itself, and a sled batch costs far more (each
    /// one seals and writes out sled's current IO buffer, twice).
    pub fn commit(&mut self, seq: u64) -> Result<(), ProjectionError> {
        if self.writes.is_empty() {
            self.tree.insert(CHECKPOINT_KEY, &seq.to_be_bytes())?;
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, write) in std::mem::take(&mut self.writes) {
            match write {
                Write::Encoded(bytes) => batch.insert(key, bytes),
                Write::Typed(row) => batch.insert(key, row.encode()),
                Write::Deleted => batch.remove(key),
            }
        }
        batch.insert(CHECKPOINT_KEY, &seq.to_be_bytes());
        self.tree.apply_batch(batch)?;
        Ok(())
    }
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

pub fn decode_row<T: DeserializeOwned>(
    projection: &'static str,
    key: &[u8],
    bytes: &[u8],
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
