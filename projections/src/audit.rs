//! audit: security and administration events (keys issued, updated, revoked;
//! failed authentication; rate-limit refusals; budget alerts; erasures; admin
//! actions), queryable by time range, key and type, with paging.
//!
//! Rows hold the whole encoded envelope, so the view answers without the log
//! (an HTTP node may hold projections but not the log). `t` at seq → envelope;
//! `k` key 0 at seq → (); `y` type 0 at seq → (). `at` and `seq` are big-endian,
//! so each index sorts by time.

use chrono::{DateTime, Utc};
use switchboard_events::{codec, Envelope};

use crate::view::{row_key, ProjectionError, Staged};

pub const NAME: &str = "audit";

fn time_part(at: &DateTime<Utc>, seq: u64) -> [u8; 16] {
    let mut part = [0u8; 16];
    // Offset so negative timestamps still sort before positive ones.
    let micros = (at.timestamp_micros() as u64) ^ (1 << 63);
    part[..8].copy_from_slice(&micros.to_be_bytes());
    part[8..].copy_from_slice(&seq.to_be_bytes());
    part
}

pub fn apply(view: &mut Staged, envelope: &Envelope) -> Result<(), ProjectionError> {
    if !envelope.event.is_audit() {
        return Ok(());
    }
    let when = time_part(&envelope.at, envelope.seq);
    view.put(row_key(b't', &[&when]), &codec::encode(envelope));
    if let Some(key_id) = envelope.event.key_id() {
        view.put(row_key(b'k', &[key_id.as_bytes(), &when]), &());
    }
    view.put(
        row_key(b'y', &[envelope.event.type_name().as_bytes(), &when]),
        &(),
    );
    Ok(())
}

/// A filter over the audit trail. Times are inclusive `since`, exclusive `until`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub key_id: Option<String>,
    pub event_type: Option<String>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
    pub limit: usize,
}

/// One page of audit events, oldest first.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub events: Vec<Envelope>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Read access to the audit view.
#[derive(Clone)]
pub struct AuditView {
    pub(crate) tree: sled::Tree,
}

impl AuditView {
    /// The events matching `query`, oldest first, at most `query.limit` of them.
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, ProjectionError> {
        if let Some(kind) = &query.event_type {
            if !switchboard_events::EVENT_TYPES.contains(&kind.as_str()) {
                return Err(ProjectionError::InvalidQuery(format!(
                    "unknown event type {kind:?}"
                )));
            }
        }
        let limit = query.limit.max(1);
        // Walk the most selective index; filter by the others.
        let prefix = match (&query.key_id, &query.event_type) {
            (Some(key_id), _) => row_key(b'k', &[key_id.as_bytes(), b""]),
            (None, Some(kind)) => row_key(b'y', &[kind.as_bytes(), b""]),
            (None, None) => vec![b't'],
        };
        let mut start = prefix.clone();
        match &query.cursor {
            Some(cursor) => {
                let raw = hex::decode(cursor)
                    .ok()
                    .filter(|raw| raw.len() == 16)
                    .ok_or_else(|| ProjectionError::InvalidQuery("malformed cursor".to_owned()))?;
                start.extend_from_slice(&raw);
                start.push(0xff); // strictly after the cursor
            }
            None => {
                if let Some(since) = &query.since {
                    start.extend_from_slice(&time_part(since, 0));
                }
            }
        }
        let until = query.until.as_ref().map(|u| time_part(u, 0));
        let mut events = Vec::new();
        let mut last = None;
        for entry in self.tree.range(start..) {
            let (key, _) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let when: [u8; 16] =
                key[prefix.len()..]
                    .try_into()
                    .map_err(|_| ProjectionError::CorruptRow {
                        projection: NAME,
                        key: hex::encode(&key),
                        detail: "malformed time part".to_owned(),
                    })?;
            if until.is_some_and(|until| when >= until) {
                break;
            }
            if events.len() == limit {
                return Ok(AuditPage {
                    events,
                    next_cursor: last.map(hex::encode),
                });
            }
            let record_key = row_key(b't', &[&when]);
            let Some(stored) = self.tree.get(&record_key)? else {
                continue;
            };
            let bytes: Vec<u8> = crate::view::decode_row(NAME, &record_key, &stored)?;
            let seq = u64::from_be_bytes(when[8..].try_into().expect("16-byte time part"));
            let envelope = codec::decode(seq, &bytes).map_err(|e| ProjectionError::CorruptRow {
                projection: NAME,
                key: hex::encode(&record_key),
                detail: e.to_string(),
            })?;
            if query
                .event_type
                .as_deref()
                .is_some_and(|t| t != envelope.event.type_name())
            {
                continue;
            }
            if query.since.is_some_and(|since| envelope.at < since) {
                continue;
            }
            last = Some(when);
            events.push(envelope);
        }
        Ok(AuditPage {
            events,
            next_cursor: None,
        })
    }
}
