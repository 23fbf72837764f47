//! Reading server-sent events in tests.

use futures::StreamExt;
use serde_json::Value;

use super::front::WAIT;

/// One event: its name (`message` when it has none), its JSON data and its id.
pub type SseEvent = (String, Value, Option<String>);

/// The event of one block of an SSE body (the text between blank lines),
/// unless it has no JSON data (a comment, a keep-alive, a partial block).
fn parse_block(block: &str) -> Option<SseEvent> {
    let (mut kind, mut data, mut id) = (String::from("message"), String::new(), None);
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_owned());
        }
    }
    let data = serde_json::from_str(&data).ok()?;
    Some((kind, data, id))
}

/// The events of an SSE body's text, in order.
pub fn parse(text: &str) -> Vec<SseEvent> {
    text.split("\n\n").filter_map(parse_block).collect()
}

/// Appends what `stream` sends to `text` until `done` holds for it, or until
/// the stream ends; panics when that takes longer than [`WAIT`].
pub async fn read_until(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
    done: impl Fn(&str) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(text) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(chunk) = tokio::time::timeout(left, stream.next()).await else {
            panic!("the stream stalled after {text}");
        };
        let Some(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
}
