//! The storage codec: `[format version byte][postcard bytes]`.
//!
//! The position (`seq`) is not in the bytes — it is the record's key in the log —
//! so the stored form is the envelope minus `seq`. Old formats keep decoding:
//! each format version has its own record type, and [`decode`] upcasts every one
//! of them to the current [`Envelope`]. Golden fixtures under `tests/fixtures/`
//! hold the bytes of every event type at every format version.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Event;
use crate::envelope::{Envelope, StreamId};
use crate::time;

/// The format version [`encode`] writes.
pub const FORMAT_VERSION: u8 = 1;

/// Why stored bytes could not be read back as an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format version {0} (this build reads up to {FORMAT_VERSION})")]
    UnknownFormat(u8),
    #[error("malformed record: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("malformed record: {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("malformed record: {0}")]
    InvalidStream(#[from] crate::envelope::InvalidStreamId),
}

/// Format version 1, borrowed for encoding.
#[derive(Serialize)]
struct RecordV1Ref<'a> {
    id: &'a Uuid,
    stream: &'a str,
    version: u64,
    #[serde(with = "time::serde_at")]
    at: &'a DateTime<Utc>,
    correlation_id: &'a Option<Uuid>,
    causation_id: &'a Option<Uuid>,
    traceparent: &'a Option<String>,
    event: &'a Event,
}

/// Format version 1, owned for decoding (but for the stream id, which
/// [`StreamId::parse`] copies). Must serialize exactly like [`RecordV1Ref`].
#[derive(Deserialize)]
struct RecordV1<'a> {
    id: Uuid,
    stream: &'a str,
    version: u64,
    #[serde(with = "time::serde_at")]
    at: DateTime<Utc>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    traceparent: Option<String>,
    event: Event,
}

/// Encodes an envelope (all but its `seq`) at the current format version.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let record = RecordV1Ref {
        id: &envelope.id,
        stream: envelope.stream.as_str(),
        version: envelope.version,
        at: &envelope.at,
        correlation_id: &envelope.correlation_id,
        causation_id: &envelope.causation_id,
        traceparent: &envelope.traceparent,
        event: &envelope.event,
    };
    let mut bytes = vec![FORMAT_VERSION];
    postcard::to_io(&record, &mut bytes).expect("writing to a Vec cannot fail");
    bytes
}

/// Decodes stored bytes of any known format version into the current envelope.
pub fn decode(seq: u64, bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let (&format, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    match format {
        1 => {
            let (record, rest): (RecordV1<'_>, _) = postcard::take_from_bytes(body)?;
            if !rest.is_empty() {
                return Err(DecodeError::TrailingBytes(rest.len()));
            }
            Ok(Envelope {
                seq,
                id: record.id,
                stream: StreamId::parse(record.stream)?,
                version: record.version,
                at: record.at,
                correlation_id: record.correlation_id,
                causation_id: record.causation_id,
                traceparent: record.traceparent,
                event: record.event,
            })
        }
        other => Err(DecodeError::UnknownFormat(other)),
    }
}
