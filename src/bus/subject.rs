//! NATS subjects: validation and wildcard matching, shared by both buses so
//! that a subject the embedded bus accepts is one a `nats-server` accepts, and
//! a pattern matches the same subjects on both.
//!
//! A subject is tokens separated by `.`. A subscription pattern may use two
//! wildcards, each only as a whole token: `*` matches exactly one token, `>`
//! matches one or more trailing tokens and may only be the last token. As in
//! NATS, `*` or `>` inside a longer token (`a*`, `b>c`) is plain text.
//!
//! ```
//! use switchboard::bus::subject::{matches, Pattern};
//!
//! assert!(matches("sb.conv.*.send", "sb.conv.c1.send"));
//! assert!(matches("sb.evt.>", "sb.evt.conv.c1.reply_delta"));
//! assert!(!matches("sb.evt.>", "sb.evt"));
//! assert!(Pattern::parse("sb.>.send").is_err());
//! ```

use std::fmt;

/// Why a subject, pattern or queue group name was refused. Each kind has a
/// stable [`code`](Self::code) a caller can log or match on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The subject is the empty string.
    #[error("subject is empty")]
    Empty,
    /// Two dots in a row, or a dot at the start or end.
    #[error("token {index} is empty (leading, trailing or doubled '.')")]
    EmptyToken {
        /// Zero-based position of the empty token.
        index: usize,
    },
    /// Whitespace or a control character: the NATS protocol is
    /// space-separated and line-based, so these would split or end the line.
    #[error("character {ch:?} at byte {at} is not allowed (whitespace or control character)")]
    BadCharacter {
        /// Byte offset of the character.
        at: usize,
        /// The offending character.
        ch: char,
    },
    /// `>` appears before the last token.
    #[error("'>' must be the last token, found at token {index}")]
    FullWildcardNotLast {
        /// Zero-based position of the `>` token.
        index: usize,
    },
    /// A wildcard token in a subject that must name one subject (publish,
    /// request, reply).
    #[error(
        "wildcard '{wildcard}' at token {index} is not allowed where a literal subject is required"
    )]
    WildcardInLiteral {
        /// Zero-based position of the wildcard token.
        index: usize,
        /// `*` or `>`.
        wildcard: char,
    },
    /// A queue group name that is empty.
    #[error("queue group name is empty")]
    EmptyQueueGroup,
}

impl SubjectError {
    /// A stable machine-readable code for the kind of error.
    pub fn code(&self) -> &'static str {
        match self {
            SubjectError::Empty => "empty_subject",
            SubjectError::EmptyToken { .. } => "empty_token",
            SubjectError::BadCharacter { .. } => "bad_character",
            SubjectError::FullWildcardNotLast { .. } => "full_wildcard_not_last",
            SubjectError::WildcardInLiteral { .. } => "wildcard_in_literal",
            SubjectError::EmptyQueueGroup => "empty_queue_group",
        }
    }
}

/// One token of a parsed [`Pattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more trailing tokens.
    Rest,
}

/// A validated subscription pattern, parsed once so matching a published
/// subject against many subscriptions does not re-parse them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    tokens: Vec<Token>,
}

impl Pattern {
    /// Parses and validates a subscription pattern (wildcards allowed).
    pub fn parse(pattern: &str) -> Result<Pattern, SubjectError> {
        check_characters(pattern)?;
        let mut tokens = Vec::new();
        let count = pattern.split('.').count();
        for (index, token) in pattern.split('.').enumerate() {
            let token = match token {
                "" => return Err(SubjectError::EmptyToken { index }),
                "*" => Token::One,
                ">" if index + 1 == count => Token::Rest,
                ">" => return Err(SubjectError::FullWildcardNotLast { index }),
                literal => Token::Literal(literal.to_string()),
            };
            tokens.push(token);
        }
        Ok(Pattern {
            text: pattern.to_string(),
            tokens,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern has no wildcard, so it matches exactly one subject.
    pub fn is_literal(&self) -> bool {
        self.tokens
            .iter()
            .all(|token| matches!(token, Token::Literal(_)))
    }

    /// Whether the literal `subject` is one this pattern receives. `subject`
    /// is assumed valid (see [`validate_subject`]); an invalid one simply
    /// matches nothing it should not.
    pub fn matches(&self, subject: &str) -> bool {
        let mut parts = subject.split('.');
        for token in &self.tokens {
            match token {
                Token::Rest => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Validates a literal subject: one you publish or send a request to. No
/// wildcard tokens.
pub fn validate_subject(subject: &str) -> Result<(), SubjectError> {
    // Every publish checks its subject: no allocation here. The pattern's
    // own errors come first, as `Pattern::parse` reports them.
    check_characters(subject)?;
    let count = subject.split('.').count();
    for (index, token) in subject.split('.').enumerate() {
        match token {
            "" => return Err(SubjectError::EmptyToken { index }),
            ">" if index + 1 < count => return Err(SubjectError::FullWildcardNotLast { index }),
            _ => {}
        }
    }
    match subject
        .split('.')
        .enumerate()
        .find_map(|(index, token)| match token {
            "*" => Some((index, '*')),
            ">" => Some((index, '>')),
            _ => None,
        }) {
        Some((index, wildcard)) => Err(SubjectError::WildcardInLiteral { index, wildcard }),
        None => Ok(()),
    }
}

/// Validates a subscription pattern (wildcards allowed).
pub fn validate_pattern(pattern: &str) -> Result<(), SubjectError> {
    Pattern::parse(pattern).map(|_| ())
}

/// Validates a queue group name: not empty, no whitespace or control
/// characters (dots are allowed, as in NATS).
pub fn validate_queue_group(group: &str) -> Result<(), SubjectError> {
    if group.is_empty() {
        return Err(SubjectError::EmptyQueueGroup);
    }
    check_characters(group)
}

/// Whether `pattern` receives `subject`; false when the pattern is invalid.
pub fn matches(pattern: &str, subject: &str) -> bool {
    Pattern::parse(pattern).is_ok_and(|pattern| pattern.matches(subject))
}

fn check_characters(text: &str) -> Result<(), SubjectError> {
    if text.is_empty() {
        return Err(SubjectError::Empty);
    }
    match text
        .char_indices()
        .find(|(_, ch)| ch.is_whitespace() || ch.is_control())
    {
        Some((at, ch)) => Err(SubjectError::BadCharacter { at, ch }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_subject_reports_what_the_pattern_parser_would() {
        let reference = |subject: &str| -> Result<(), SubjectError> {
            let pattern = Pattern::parse(subject)?;
            match pattern
                .tokens
                .iter()
                .enumerate()
                .find_map(|(index, token)| match token {
                    Token::Literal(_) => None,
                    Token::One => Some((index, '*')),
                    Token::Rest => Some((index, '>')),
                }) {
                Some((index, wildcard)) => Err(SubjectError::WildcardInLiteral { index, wildcard }),
                None => Ok(()),
            }
        };
        for subject in [
            "a",
            "a.b",
            "a.*",
            "a.>",
            ">",
            "*",
            "a.*..b",
            "a.>.b",
            "*.>",
            "a..",
            ".a",
            "",
            "a b",
            "a.b*",
            "a.*.>",
            ">.*",
            "sb.conv.c1.send",
        ] {
            assert_eq!(validate_subject(subject), reference(subject), "{subject:?}");
        }
    }

    #[test]
    fn matching_table() {
        // (pattern, subject, matches)
        let table = [
            ("a", "a", true),
            ("a", "b", false),
            ("a.b.c", "a.b.c", true),
            ("a.b.c", "a.b", false),
            ("a.b", "a.b.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.b.*", "a.b.c", true),
            ("*.b.*", "a.x.c", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "a", false),
            ("a.>", "b.c", false),
            (">", "a", true),
            (">", "a.b.c", true),
            ("a.*.>", "a.b.c", true),
            ("a.*.>", "a.b", false),
            ("*.>", "a.b", true),
            // A wildcard character inside a longer token is plain text.
            ("a.b*", "a.b*", true),
            ("a.b*", "a.bc", false),
            ("a.b>", "a.b>", true),
            ("a.b>", "a.bc.d", false),
            ("sb.conv.*.send", "sb.conv.c1.send", true),
            ("sb.conv.*.send", "sb.conv.c1.history", false),
            ("sb.evt.conv.c1.>", "sb.evt.conv.c1.reply_delta", true),
            ("sb.evt.conv.c1.>", "sb.evt.conv.c2.reply_delta", false),
            // Matching is case-sensitive, as in NATS.
            ("A.b", "a.b", false),
        ];
        for (pattern, subject, expected) in table {
            assert_eq!(
                matches(pattern, subject),
                expected,
                "pattern {pattern:?} against subject {subject:?}"
            );
        }
    }

    #[test]
    fn invalid_patterns_table() {
        let table: [(&str, &str); 12] = [
            ("", "empty_subject"),
            (".", "empty_token"),
            ("a.", "empty_token"),
            (".a", "empty_token"),
            ("a..b", "empty_token"),
            ("a b", "bad_character"),
            ("a.\tb", "bad_character"),
            ("a.b\r\n", "bad_character"),
            ("a.\u{0}", "bad_character"),
            (">.a", "full_wildcard_not_last"),
            ("a.>.b", "full_wildcard_not_last"),
            ("a.>.>", "full_wildcard_not_last"),
        ];
        for (pattern, code) in table {
            let error = Pattern::parse(pattern).expect_err(pattern);
            assert_eq!(error.code(), code, "{pattern:?}: {error}");
            assert!(
                !matches(pattern, "a.b"),
                "invalid {pattern:?} matches nothing"
            );
        }
    }

    #[test]
    fn error_positions() {
        assert_eq!(
            Pattern::parse("a..b"),
            Err(SubjectError::EmptyToken { index: 1 })
        );
        assert_eq!(
            Pattern::parse("ab c"),
            Err(SubjectError::BadCharacter { at: 2, ch: ' ' })
        );
        assert_eq!(
            Pattern::parse("a.>.b"),
            Err(SubjectError::FullWildcardNotLast { index: 1 })
        );
    }

    #[test]
    fn literal_subjects_refuse_wildcards() {
        assert_eq!(validate_subject("sb.conv.c1.send"), Ok(()));
        assert_eq!(validate_subject("_INBOX.abc123"), Ok(()));
        assert_eq!(validate_subject("a.b*"), Ok(()), "partial wildcard is text");
        assert_eq!(
            validate_subject("a.*.c"),
            Err(SubjectError::WildcardInLiteral {
                index: 1,
                wildcard: '*'
            })
        );
        assert_eq!(
            validate_subject("a.>"),
            Err(SubjectError::WildcardInLiteral {
                index: 1,
                wildcard: '>'
            })
        );
        assert_eq!(
            validate_subject("a..b").map_err(|e| e.code()),
            Err("empty_token")
        );
        assert_eq!(validate_pattern("a.*.>"), Ok(()));
    }

    #[test]
    fn queue_groups() {
        assert_eq!(validate_queue_group("workers"), Ok(()));
        assert_eq!(validate_queue_group("sb.workers-1"), Ok(()));
        assert_eq!(
            validate_queue_group("").map_err(|e| e.code()),
            Err("empty_queue_group")
        );
        assert_eq!(
            validate_queue_group("two words").map_err(|e| e.code()),
            Err("bad_character")
        );
    }

    #[test]
    fn literal_patterns() {
        let literal = Pattern::parse("a.b").expect("valid");
        assert!(literal.is_literal());
        assert_eq!(literal.as_str(), "a.b");
        assert!(!Pattern::parse("a.*").expect("valid").is_literal());
        assert!(!Pattern::parse("a.>").expect("valid").is_literal());
    }
}
