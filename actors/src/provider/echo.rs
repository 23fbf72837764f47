//! The `echo` provider: deterministic replies for tests, demos and benchmarks,
//! with no model server and no network.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{
    send_delta, ChatMessage, Completion, CompletionRequest, Provider, ProviderError, Role, Usage,
};

/// Replies `echo: <content of the last user message>`, streamed word by word.
///
/// Each delta is one word with the whitespace that follows it, so the deltas
/// concatenate to the reply exactly. Usage is counted with echo's own
/// tokenizer, one token per word ([`echo_usage`]), and marked estimated.
///
/// By default the words come all at once, like a model that answers faster
/// than anyone reads; [`EchoProvider::with_word_delay`] paces them like a
/// model generating tokens.
#[derive(Debug, Clone, Default)]
pub struct EchoProvider {
    word_delay: Duration,
}

impl EchoProvider {
    /// The model name echo reports (there is only one).
    pub const MODEL: &'static str = "echo";

    /// An echo provider that streams its words as fast as they are taken.
    pub fn new() -> Self {
        EchoProvider::default()
    }

    /// An echo provider that waits `delay` before each word after the first.
    pub fn with_word_delay(delay: Duration) -> Self {
        EchoProvider { word_delay: delay }
    }
}

#[async_trait]
impl Provider for EchoProvider {
    fn kind(&self) -> &'static str {
        "echo"
    }

    fn model(&self) -> &str {
        Self::MODEL
    }

    async fn complete(
        &self,
        request: CompletionRequest,
        deltas: mpsc::Sender<String>,
    ) -> Result<Completion, ProviderError> {
        let CompletionRequest {
            model,
            messages,
            timeout,
            ..
        } = request;
        let model = model.unwrap_or_else(|| Self::MODEL.to_owned());
        let last_user = messages
            .iter()
            .rev()
            .find(|message| message.role == Role::User)
            .map_or("", |message| &*message.content);
        let content = format!("echo: {last_user}");

        // Streaming can only be slow if the receiver is; the timeout still holds.
        let stream = async {
            for (i, word) in words_with_trailing_space(&content).enumerate() {
                if i > 0 && !self.word_delay.is_zero() {
                    tokio::time::sleep(self.word_delay).await;
                }
                send_delta(&deltas, word.to_owned()).await;
            }
        };
        tokio::time::timeout(timeout, stream)
            .await
            .map_err(|_| ProviderError::Timeout)?;

        let usage = echo_usage(&messages, &content);
        Ok(Completion {
            content,
            finish_reason: "stop".to_owned(),
            model,
            usage: Some(usage),
            estimated: true,
        })
    }
}

/// Echo's token count: its tokenizer makes one token of each word (a run of
/// non-whitespace), framed like OpenAI's chat recipe in
/// [`super::estimate_usage`] — each message costs 3 tokens plus 1 for its role
/// and its content's words, and the reply is primed with 3 more.
///
/// Echo is no model, so no tokenizer is "right" for it; counting words keeps
/// its usage deterministic and proportional to the text, and costs a scan
/// instead of a BPE encoding of the whole history on every turn.
pub fn echo_usage(messages: &[ChatMessage], completion: &str) -> Usage {
    let prompt_tokens = messages
        .iter()
        .map(|message| 3 + 1 + count_words(&message.content))
        .sum::<u64>()
        + 3;
    Usage {
        prompt_tokens,
        completion_tokens: count_words(completion),
    }
}

/// The words of `text` as `text.split_whitespace().count()` counts them.
/// ASCII text (nearly all of it) is counted as word starts — a non-space
/// byte after a space — in blocks of 255 byte pairs whose sums fit a `u8`,
/// which the compiler vectorizes, noting on the way whether any byte is not
/// ASCII (then it counts again, the slow way): every turn counts the whole
/// history again.
fn count_words(text: &str) -> u64 {
    // What `char::is_whitespace` takes for whitespace in ASCII.
    let space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r');
    let bytes = text.as_bytes();
    let Some(&first) = bytes.first() else {
        return 0;
    };
    let mut words = u64::from(!space(first));
    let mut high = first;
    for (before, after) in bytes.chunks(255).zip(bytes[1..].chunks(255)) {
        let (starts, bits) = before
            .iter()
            .zip(after)
            .fold((0u8, 0u8), |(sum, bits), (&b, &a)| {
                (sum + u8::from(space(b) & !space(a)), bits | a)
            });
        words += u64::from(starts);
        high |= bits;
    }
    if !high.is_ascii() {
        return text.split_whitespace().count() as u64;
    }
    words
}

/// Split `text` into pieces that each end after a run of whitespace (or at the
/// end): `"a  b\nc"` → `["a  ", "b\n", "c"]`. Leading whitespace joins the
/// first piece. The pieces concatenate to `text`.
pub(crate) fn words_with_trailing_space(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut seen_word = false;
        let mut in_space = false;
        let mut end = rest.len();
        for (at, ch) in rest.char_indices() {
            if ch.is_whitespace() {
                in_space = seen_word || in_space;
            } else if in_space {
                end = at;
                break;
            } else {
                seen_word = true;
            }
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{count_words, words_with_trailing_space};

    proptest! {
        #[test]
        fn words_are_counted_as_split_whitespace_counts_them(
            text in "[a-z \t\n\r\x0b\x0c\x1f!.é\u{a0}\u{85}\u{3000}]{0,40}",
        ) {
            prop_assert_eq!(count_words(&text), text.split_whitespace().count() as u64);
            let ascii: String = text.chars().filter(char::is_ascii).collect();
            prop_assert_eq!(count_words(&ascii), ascii.split_whitespace().count() as u64);
        }

        /// Long enough to span several blocks of 255 byte pairs.
        #[test]
        fn long_ascii_texts_are_counted_across_blocks(
            text in "[a-z \t\n\r\x0b\x0c\x1f!.]{200,1200}",
        ) {
            prop_assert_eq!(count_words(&text), text.split_whitespace().count() as u64);
        }
    }

    fn split(text: &str) -> Vec<&str> {
        words_with_trailing_space(text).collect()
    }

    #[test]
    fn words_keep_their_following_whitespace() {
        assert_eq!(split("echo: hi there"), ["echo: ", "hi ", "there"]);
        assert_eq!(split("a  b\nc "), ["a  ", "b\n", "c "]);
        assert_eq!(split("  lead"), ["  lead"]);
        assert_eq!(split(""), Vec::<&str>::new());
        assert_eq!(split("héllo wörld"), ["héllo ", "wörld"]);
    }
}
