//! switchboard-events: the event catalog, the envelope, the storage codec and the
//! durable sled event log. Depends on nothing else of switchboard; everything
//! else depends on it.
//!
//! ```no_run
//! use switchboard_events::{Event, EventLog, ExpectedVersion, NewEvent, OpenMode, StreamId};
//! use switchboard_events::catalog::ConversationStarted;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let log = EventLog::open("./data".as_ref(), OpenMode::CreateIfMissing)?;
//! let started = Event::ConversationStarted(ConversationStarted {
//!     conversation_id: "c1".into(),
//!     key_id: "key_1".into(),
//!     user: None,
//! });
//! let appended = log.append_blocking(
//!     StreamId::conversation("c1")?,
//!     ExpectedVersion::Exact(0),
//!     vec![NewEvent::new(started)],
//! )?;
//! assert_eq!(appended.first().version, 1);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod apikey;
pub mod catalog;
pub mod codec;
pub mod envelope;
pub mod forget;
pub mod log;
pub mod time;

pub use catalog::{Event, EVENT_TYPES};
pub use envelope::{Envelope, NewEvent, StreamId};
#[cfg(feature = "test-hooks")]
pub use log::PublishingHeld;
pub use log::{
    AppendError, Appended, ChainBreak, ChainReport, EventLog, ExpectedVersion, OpenError, OpenMode,
    Position, ReadError, Subscription, WhenDurable,
};
