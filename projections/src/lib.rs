//! switchboard-projections: the views rebuilt from the event log — history,
//! audit, costs and keys (DESIGN §4) — and their read API.
//!
//! Each projection is a pure fold `apply(&mut view, &Envelope)` over rows in its
//! own sled tree. Rows and the checkpoint (the last folded seq) are written in one
//! batch, so after a crash a view resumes from a checkpoint that matches its
//! rows. `replay` rebuilds a view from seq 1; `verify` rebuilds every view into
//! scratch space and compares it with the live one.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod audit;
pub mod costs;
pub mod history;
pub mod keys;
mod runner;
pub mod spend;
pub mod view;

pub use audit::{AuditPage, AuditQuery, AuditView};
pub use costs::{CostGroup, CostRow, CostTotals, CostsView, DayRow};
pub use history::{
    Conversation, ConversationSummary, HistoryMessage, HistoryPage, HistoryView, PageFrom, Role,
};
pub use keys::{KeyRecord, KeysView, Revocation};
pub use runner::{Projections, ViewDifference};
pub use spend::{SpendIndex, Spender, Spent};
pub use view::ProjectionError;

use switchboard_events::Envelope;
use view::Staged;

/// A view's row (key, value), or why it could not be read.
pub type RowResult = Result<(Vec<u8>, Vec<u8>), ProjectionError>;

/// The projections, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectionName {
    History,
    Audit,
    Costs,
    Keys,
}

impl ProjectionName {
    pub const ALL: [ProjectionName; 4] = [
        ProjectionName::History,
        ProjectionName::Audit,
        ProjectionName::Costs,
        ProjectionName::Keys,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionName::History => history::NAME,
            ProjectionName::Audit => audit::NAME,
            ProjectionName::Costs => costs::NAME,
            ProjectionName::Keys => keys::NAME,
        }
    }

    /// Folds one event into this projection's view.
    pub fn apply(self, view: &mut Staged, envelope: &Envelope) -> Result<(), ProjectionError> {
        match self {
            ProjectionName::History => history::apply(view, envelope),
            ProjectionName::Audit => audit::apply(view, envelope),
            ProjectionName::Costs => costs::apply(view, envelope),
            ProjectionName::Keys => keys::apply(view, envelope),
        }
    }

    /// How this projection lays out its rows: a view stored with another
    /// layout is folded again ([`view::ensure_layout`]). History's layout 2
    /// holds messages' seqs, not their content.
    pub fn layout(self) -> u8 {
        match self {
            ProjectionName::History => 2,
            ProjectionName::Audit | ProjectionName::Costs | ProjectionName::Keys => 1,
        }
    }

    /// The rows of this projection's `tree` as two views of the same log
    /// share them, in key order: what [`Projections::verify`] compares. Rows
    /// as stored, except history's message chunks ([`history::rows`]) and
    /// the layout marker, which a scratch view does not have.
    pub fn rows(self, tree: &sled::Tree) -> Box<dyn Iterator<Item = RowResult> + '_> {
        let rows: Box<dyn Iterator<Item = RowResult> + '_> = match self {
            ProjectionName::History => Box::new(history::rows(tree)),
            ProjectionName::Audit | ProjectionName::Costs | ProjectionName::Keys => {
                Box::new(tree.iter().map(|entry| {
                    let (key, value) = entry?;
                    Ok((key.to_vec(), value.to_vec()))
                }))
            }
        };
        Box::new(rows.filter(|row| !matches!(row, Ok((key, _)) if key == view::LAYOUT_KEY)))
    }

    pub fn tree_name(self) -> String {
        format!("proj.{}", self.as_str())
    }
}

impl std::fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProjectionName {
    type Err = ProjectionError;
    fn from_str(s: &str) -> Result<Self, ProjectionError> {
        ProjectionName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ProjectionError::UnknownProjection(s.to_owned()))
    }
}
