//! An incremental decoder for server-sent events, the framing of OpenAI's
//! streaming replies.
//!
//! Network chunks split lines anywhere — inside a `data:` line, inside a
//! multi-byte character, between the `\r` and `\n` of a line end — so bytes are
//! buffered until a whole line is there, and only whole lines are decoded.
//! Only the `data` field matters for chat completions; `event`, `id`, `retry`
//! and comments are skipped.

/// Turns a byte stream into the `data` payloads of its events.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    /// Bytes received but not yet ending in a line break.
    pending: Vec<u8>,
    /// The `data` lines of the event being read, joined by `\n`.
    data: Option<String>,
    /// The last byte consumed was a `\r`: a `\n` right after it is the same line end.
    after_cr: bool,
}

/// The stream is not valid SSE text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server-sent event stream: {0}")]
pub(crate) struct SseError(String);

impl SseDecoder {
    /// Feed the next chunk; returns the data of every event it completed, in order.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(at) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.pending.extend_from_slice(&chunk[..at]);
            let line = std::mem::take(&mut self.pending);
            self.line(&line, &mut events)?;
            let crlf = chunk[at] == b'\r' && chunk.get(at + 1) == Some(&b'\n');
            if chunk[at] == b'\r' && at + 1 == chunk.len() {
                self.after_cr = true;
            }
            chunk = &chunk[at + if crlf { 2 } else { 1 }..];
        }
        self.pending.extend_from_slice(chunk);
        Ok(events)
    }

    /// The stream ended: an event still open (a server that closed without the
    /// final blank line) is delivered rather than dropped.
    pub(crate) fn finish(&mut self) -> Result<Option<String>, SseError> {
        let mut events = Vec::new();
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.line(&line, &mut events)?;
        }
        self.line(b"", &mut events)?;
        Ok(events.pop())
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return Ok(());
        }
        let line =
            std::str::from_utf8(line).map_err(|_| SseError("a line is not UTF-8".to_owned()))?;
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
        }
        // Comments (empty field name), `event`, `id`, `retry`: nothing to do.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SseDecoder;

    fn decode_in_pieces(stream: &[u8], piece: usize) -> Vec<String> {
        let mut decoder = SseDecoder::default();
        let mut events = Vec::new();
        for chunk in stream.chunks(piece) {
            events.extend(decoder.push(chunk).unwrap());
        }
        events.extend(decoder.finish().unwrap());
        events
    }

    #[test]
    fn events_survive_any_chunking() {
        let stream = "data: {\"a\":\"é\"}\r\n\r\n: keep-alive\n\nevent: x\ndata: one\ndata: two\r\rdata: [DONE]\n\n";
        let expected = ["{\"a\":\"é\"}", "one\ntwo", "[DONE]"];
        for piece in 1..=stream.len() {
            assert_eq!(
                decode_in_pieces(stream.as_bytes(), piece),
                expected,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn an_unterminated_last_event_is_delivered() {
        assert_eq!(decode_in_pieces(b"data: [DONE]", 4), ["[DONE]"]);
        assert_eq!(decode_in_pieces(b"data: [DONE]\n", 4), ["[DONE]"]);
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut decoder = SseDecoder::default();
        assert!(decoder.push(b"data: \xff\xfe\n").is_err());
    }
}
