//! Durations as Kubernetes writes them (`30s`, `15m`, `1h30m`): Go's duration syntax, which
//! is also what the API server's CEL `duration()` parses, so schema and code agree.

use std::{fmt, str::FromStr, time::Duration as StdDuration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration: write a number with a unit, such as 30s, 15m or 1h30m")]
    Syntax(String),
    #[error("`{0}` is too long to represent")]
    Overflow(String),
}

/// A span of time in Go/Kubernetes syntax. Sub-nanosecond digits are dropped as Go does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

/// Schema pattern matching Go's duration syntax for non-negative values.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub const fn as_std(self) -> StdDuration {
        self.0
    }
}

impl From<StdDuration> for Duration {
    fn from(value: StdDuration) -> Self {
        Self(value)
    }
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || DurationError::Syntax(text.to_owned());
        if text.is_empty() {
            return Err(syntax());
        }
        if text == "0" {
            return Ok(Self::default());
        }
        let mut rest = text;
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(syntax)?;
            let (number, after) = rest.split_at(number_len);
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let scale = unit_nanos(unit).ok_or_else(syntax)?;
            let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
            if whole.is_empty() || fraction.contains('.') || number.ends_with('.') {
                return Err(syntax());
            }
            let whole: u128 = whole
                .parse()
                .map_err(|_| DurationError::Overflow(text.to_owned()))?;
            let mut nanos = whole
                .checked_mul(scale)
                .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
            let mut place = scale;
            for digit in fraction.bytes() {
                place /= 10;
                nanos += u128::from(digit - b'0') * place;
            }
            total = total
                .checked_add(nanos)
                .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
            rest = after;
        }
        let secs = u64::try_from(total / 1_000_000_000)
            .map_err(|_| DurationError::Overflow(text.to_owned()))?;
        // The remainder is below 10^9, so it always fits.
        let subsec = (total % 1_000_000_000) as u32;
        Ok(Self(StdDuration::new(secs, subsec)))
    }
}

impl fmt::Display for Duration {
    /// Writes the shortest Go-style form: `1h30m`, `45s`, `250ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos();
        if secs == 0 && nanos == 0 {
            return f.write_str("0s");
        }
        if secs == 0 {
            return if nanos % 1_000_000 == 0 {
                write!(f, "{}ms", nanos / 1_000_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || nanos > 0 {
            if nanos > 0 {
                let fraction = format!("{nanos:09}");
                write!(f, "{s}.{}s", fraction.trim_end_matches('0'))?;
            } else {
                write!(f, "{s}s")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as 30s, 15m or 1h30m.",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": "duration(self) > duration('0s')",
                "message": "must be a positive duration such as 30s, 15m or 1h30m"
            }]
        })
    }
}
