//! The answers in OpenAI's shapes: a `chat.completion`, or a turn streamed
//! as `chat.completion.chunk` events ending `data: [DONE]`.

use axum::response::sse::Event;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::OpenAiError;
use super::turn::{Reply, TurnFollower, TurnStep, Usage};

/// What every object of one response shares.
pub(super) struct ResponseShape {
    pub(super) model: String,
    pub(super) created: i64,
    pub(super) include_usage: bool,
}

impl ResponseShape {
    /// The non-streaming answer.
    pub(super) fn completion(&self, reply: &Reply) -> Value {
        let mut completion = self.object(
            "chat.completion",
            &reply.reply_id,
            json!([{
                "index": 0,
                "message": { "role": "assistant", "content": reply.content, "refusal": null },
                "logprobs": null,
                "finish_reason": reply.finish_reason,
            }]),
        );
        completion["usage"] = reply.usage.to_json();
        completion
    }

    fn object(&self, object: &str, reply_id: &str, choices: Value) -> Value {
        json!({
            "id": format!("chatcmpl-{reply_id}"),
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A `chat.completion.chunk` with one choice.
    fn chunk(&self, reply_id: &str, delta: Value, finish_reason: Option<&str>) -> Value {
        let choice = json!([{
            "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason,
        }]);
        let mut chunk = self.object("chat.completion.chunk", reply_id, choice);
        if self.include_usage {
            // As OpenAI: `usage: null` on every chunk but the usage chunk.
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The last chunk before `[DONE]` when usage was asked for: no choices.
    fn usage_chunk(&self, reply_id: &str, usage: Usage) -> Value {
        let mut chunk = self.object("chat.completion.chunk", reply_id, json!([]));
        chunk["usage"] = usage.to_json();
        chunk
    }
}

/// Streams one turn as chunks until `[DONE]`, or until the client leaves.
pub(super) async fn relay_chunks(
    mut turn: TurnFollower,
    shape: ResponseShape,
    sender: mpsc::Sender<Event>,
    closing: tokio::sync::watch::Receiver<bool>,
) {
    let mut relay = ChunkRelay::default();
    loop {
        let step = tokio::select! {
            step = turn.next() => step,
            () = sender.closed() => return,
            () = crate::http::closed(closing.clone()) => return,
        };
        let (chunks, over) = match step {
            Ok(Some(step)) => relay.chunks(&shape, step),
            Ok(None) => (relay.tail(&shape), true),
            Err(error) => (vec![error.body()], true),
        };
        let json = |chunk: Value| serde_json::to_string(&chunk).expect("JSON serializes");
        let mut events: Vec<Event> = chunks
            .into_iter()
            .map(|chunk| Event::default().data(json(chunk)))
            .collect();
        if over {
            events.push(Event::default().data("[DONE]"));
        }
        for event in events {
            if sender.send(event).await.is_err() {
                return;
            }
        }
        if over {
            return;
        }
    }
}

/// Turns a turn's steps into chunks: the role first (once the reply's id is
/// known), each delta's text, the finish reason, the usage when asked for;
/// or an error chunk.
#[derive(Default)]
struct ChunkRelay {
    reply_id: Option<String>,
    /// The text sent so far.
    streamed: String,
    /// The index of the next delta expected.
    next_index: u64,
    /// A delta was missed (the stream joined a running turn, or one was
    /// lost): no more deltas are relayed; the stored reply supplies the rest.
    gapped: bool,
    usage: Usage,
}

impl ChunkRelay {
    /// The chunks for `step`, and whether the stream is over (`[DONE]` is
    /// the relay's to add).
    fn chunks(&mut self, shape: &ResponseShape, step: TurnStep) -> (Vec<Value>, bool) {
        let mut out = Vec::new();
        match step {
            TurnStep::Delta {
                reply_id,
                index,
                text,
            } => {
                self.open(shape, &reply_id, &mut out);
                if self.gapped || index < self.next_index {
                    // Missing pieces, or a repeat.
                } else if index > self.next_index {
                    self.gapped = true;
                } else {
                    self.next_index += 1;
                    self.streamed.push_str(&text);
                    out.push(shape.chunk(&reply_id, json!({ "content": text }), None));
                }
            }
            TurnStep::Completed(reply) => {
                self.open(shape, &reply.reply_id, &mut out);
                match reply.content.strip_prefix(self.streamed.as_str()) {
                    Some("") => {}
                    Some(rest) => {
                        out.push(shape.chunk(&reply.reply_id, json!({ "content": rest }), None));
                    }
                    None => tracing::warn!(
                        reply_id = %reply.reply_id,
                        "the streamed deltas differ from the stored reply"
                    ),
                }
                let finish = Some(reply.finish_reason.as_str());
                out.push(shape.chunk(&reply.reply_id, json!({}), finish));
            }
            TurnStep::Usage(usage) => self.usage = usage,
            TurnStep::Failed { code, message } => {
                out.push(OpenAiError::turn_failed(&code, &message).body());
                return (out, true);
            }
        }
        (out, false)
    }

    /// The first chunk, with the role, before anything else of the reply.
    fn open(&mut self, shape: &ResponseShape, reply_id: &str, out: &mut Vec<Value>) {
        if self.reply_id.is_none() {
            self.reply_id = Some(reply_id.to_owned());
            let role = json!({ "role": "assistant", "content": "" });
            out.push(shape.chunk(reply_id, role, None));
        }
    }

    /// After the turn: the usage chunk, when asked for.
    fn tail(&self, shape: &ResponseShape) -> Vec<Value> {
        let reply_id = self.reply_id.as_deref().unwrap_or_default();
        match shape.include_usage {
            true => vec![shape.usage_chunk(reply_id, self.usage)],
            false => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ResponseShape {
        ResponseShape {
            model: "echo".into(),
            created: 1,
            include_usage: true,
        }
    }

    fn delta(index: u64, text: &str) -> TurnStep {
        TurnStep::Delta {
            reply_id: "r1".into(),
            index,
            text: text.into(),
        }
    }

    fn completed(content: &str) -> TurnStep {
        TurnStep::Completed(Reply {
            reply_id: "r1".into(),
            content: content.into(),
            finish_reason: "stop".into(),
            usage: Usage::default(),
        })
    }

    /// The texts of the content chunks `steps` produce, checking that the
    /// role comes first and the finish last.
    fn relay(steps: Vec<TurnStep>) -> Vec<String> {
        let shape = shape();
        let mut relay = ChunkRelay::default();
        let mut chunks = Vec::new();
        for step in steps {
            chunks.extend(relay.chunks(&shape, step).0);
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], json!("assistant"));
        let last = chunks.last().expect("chunks");
        assert_eq!(last["choices"][0]["finish_reason"], json!("stop"));
        chunks[1..chunks.len() - 1]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .expect("text")
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn deltas_pass_in_order_and_repeats_are_dropped() {
        let steps = vec![
            delta(0, "a "),
            delta(1, "b "),
            delta(1, "b "),
            delta(2, "c"),
            completed("a b c"),
        ];
        assert_eq!(relay(steps), ["a ", "b ", "c"]);
    }

    #[test]
    fn after_a_missed_delta_the_stored_reply_supplies_the_rest() {
        let steps = vec![
            delta(0, "a "),
            delta(2, "c"),
            delta(3, "d"),
            completed("a b cd"),
        ];
        assert_eq!(relay(steps), ["a ", "b cd"]);
        // A duplicate whose turn was over: no deltas at all.
        assert_eq!(relay(vec![completed("whole")]), ["whole"]);
        // Joined mid-turn: the first delta seen is not the first.
        assert_eq!(relay(vec![delta(4, "x"), completed("vwx")]), ["vwx"]);
    }

    #[test]
    fn a_failure_is_an_error_chunk_that_ends_the_stream() {
        let shape = shape();
        let mut relay = ChunkRelay::default();
        relay.chunks(&shape, delta(0, "a"));
        let failed = TurnStep::Failed {
            code: "timeout".into(),
            message: "too slow".into(),
        };
        let (chunks, over) = relay.chunks(&shape, failed);
        assert!(over);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0]["error"]["code"], json!("timeout"));
        assert_eq!(chunks[0]["error"]["type"], json!("server_error"));
    }

    #[test]
    fn the_usage_chunk_has_no_choices() {
        let shape = shape();
        let mut relay = ChunkRelay::default();
        relay.chunks(&shape, completed("x"));
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        relay.chunks(&shape, TurnStep::Usage(usage));
        let tail = relay.tail(&shape);
        assert_eq!(tail[0]["choices"], json!([]));
        assert_eq!(tail[0]["id"], json!("chatcmpl-r1"));
        assert_eq!(tail[0]["usage"]["total_tokens"], json!(7));
    }
}
