//! Folding a stream read from the log, without holding up the async workers
//! for long.

use switchboard_events::{Envelope, EventLog, ReadError, StreamId};

use crate::conversation_actor::ConversationError;

/// Events read on the calling task before the rest goes to the blocking pool.
const INLINE_EVENTS: usize = 32;

/// Folds the events of `stream` from `from_version` on into `state`.
///
/// Each event is a blocking tree read. A short stream — a conversation's
/// first turn, or one the caches have forgotten — is read right here: on the
/// blocking pool it would cost two thread wake-ups, more than the reads
/// themselves. Past [`INLINE_EVENTS`], the rest is read on the blocking pool.
pub(crate) async fn fold_stream<S, F>(
    log: &EventLog,
    stream: &StreamId,
    from_version: u64,
    mut state: S,
    apply: F,
) -> Result<S, ConversationError>
where
    S: Send + 'static,
    F: Fn(&mut S, Envelope) + Send + 'static,
{
    let mut events = log.read_stream(stream, from_version);
    for _ in 0..INLINE_EVENTS {
        match events.next() {
            None => return Ok(state),
            Some(envelope) => apply(&mut state, envelope.map_err(|e| read_error(stream, e))?),
        }
    }
    let read = stream.clone();
    tokio::task::spawn_blocking(move || {
        for envelope in events {
            apply(&mut state, envelope.map_err(|e| read_error(&read, e))?);
        }
        Ok(state)
    })
    .await
    .map_err(|e| ConversationError::Internal(format!("reading {stream} failed: {e}")))?
}

/// A failed read of `stream` as the error of the request that needed it.
fn read_error(stream: &StreamId, error: ReadError) -> ConversationError {
    match error {
        ReadError::Storage(_) => {
            ConversationError::Unavailable(format!("cannot read {stream}: {error}"))
        }
        ReadError::Decode { .. } | ReadError::Corrupt { .. } => {
            ConversationError::Internal(format!("cannot read {stream}: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_events::catalog::AdminAction;
    use switchboard_events::{Event, ExpectedVersion, NewEvent, OpenMode};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_and_long_streams_fold_whole_and_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EventLog::open(dir.path(), OpenMode::CreateIfMissing).expect("open");
        let stream = StreamId::system();
        let events = (0..100)
            .map(|i| {
                NewEvent::new(Event::AdminAction(AdminAction {
                    actor: "test".into(),
                    action: "poke".into(),
                    target: i.to_string(),
                }))
            })
            .collect();
        log.append(stream.clone(), ExpectedVersion::Any, events)
            .await
            .expect("append");

        let versions = |from| {
            fold_stream(&log, &stream, from, Vec::new(), |seen: &mut Vec<u64>, e| {
                seen.push(e.version)
            })
        };
        // Past INLINE_EVENTS the rest comes from the blocking pool.
        assert_eq!(
            versions(1).await.expect("fold"),
            (1..=100).collect::<Vec<_>>()
        );
        assert_eq!(
            versions(91).await.expect("fold"),
            (91..=100).collect::<Vec<_>>()
        );
        assert!(versions(101).await.expect("fold").is_empty());
    }
}
