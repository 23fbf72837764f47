//! Timestamps: RFC 3339 UTC on the wire, integer microseconds in storage.
//!
//! Storage keeps microseconds so a stored event round-trips exactly and takes 1–9
//! bytes instead of a 30-byte string; [`now`] truncates to the same precision.

use chrono::{DateTime, SubsecRound, Utc};

/// The current time at the precision events store (microseconds).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Formats a timestamp the way every wire format of switchboard writes it.
pub fn to_rfc3339(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `#[serde(with)]` for a `DateTime<Utc>`: RFC 3339 for human-readable formats,
/// microseconds since the epoch otherwise.
pub mod serde_at {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            super::to_rfc3339(at).serialize(s)
        } else {
            at.timestamp_micros().serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            DateTime::parse_from_rfc3339(&text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(serde::de::Error::custom)
        } else {
            let micros = i64::deserialize(d)?;
            DateTime::from_timestamp_micros(micros)
                .ok_or_else(|| serde::de::Error::custom("timestamp out of range"))
        }
    }
}

/// [`serde_at`] for an optional timestamp.
pub mod serde_opt_at {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct At(#[serde(with = "super::serde_at")] DateTime<Utc>);

    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        at.map(At).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Ok(Option::<At>::deserialize(d)?.map(|At(at)| at))
    }
}
