//! A projection's view: rows in its own sled tree, staged in memory while events
//! are folded and written with the checkpoint in one batch.

use std::collections::BTreeMap;

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
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
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
        let bytes = match self.writes.get(key) {
            Some(staged) => staged.clone(),
            None => self.tree.get(key)?.map(|v| v.to_vec()),
        };
        bytes
            .map(|b| decode_row(self.projection, key, &b))
            .transpose()
    }

    pub fn put<T: Serialize>(&mut self, key: Vec<u8>, row: &T) {
        let bytes = postcard::to_stdvec(row).expect("view rows always serialize");
        self.put_encoded(key, bytes);
    }

    /// Stages `bytes`, already encoded, as the row at `key`.
    pub fn put_encoded(&mut self, key: Vec<u8>, bytes: Vec<u8>) {
        self.writes.insert(key, Some(bytes));
    }

    /// The staged row with the greatest key under `prefix`, to extend in
    /// place; `None` when no row under it is staged (stored rows are not
    /// looked at) or the greatest staged one is a deletion.
    pub fn last_staged_mut(&mut self, prefix: &[u8]) -> Option<&mut Vec<u8>> {
        self.writes
            .range_mut(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .last()
            .and_then(|(_, row)| row.as_mut())
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Deletes every row whose key starts with `prefix`, staged or stored.
    pub fn delete_prefix(&mut self, prefix: &[u8]) -> Result<(), ProjectionError> {
        let mut doomed: Vec<Vec<u8>> = self
            .writes
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for entry in self.tree.scan_prefix(prefix) {
            doomed.push(entry?.0.to_vec());
        }
        for key in doomed {
            self.writes.insert(key, None);
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
        for (key, value) in std::mem::take(&mut self.writes) {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
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
    let mut key = vec![prefix];
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}
