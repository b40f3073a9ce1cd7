//! Decoy port lists: single ports and inclusive ranges, written `1`, `"7"` or `"30000-30010"`.
//! Parsing and normalisation shared by the CRDs, the classic config reader and the sensor.

use std::{collections::BTreeSet, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Why a port or port range was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("empty port: write a number from 1 to 65535 or a range such as 30000-30010")]
    Empty,
    #[error("`{0}` is not a port: write a number from 1 to 65535 or a range such as 30000-30010")]
    NotANumber(String),
    #[error("port {0} is out of range: ports go from 1 to 65535")]
    OutOfRange(u64),
    #[error("range {start}-{end} is reversed: write the lower port first ({end}-{start})")]
    Reversed { start: u16, end: u16 },
}

/// An inclusive range of ports; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// A range from `start` to `end` inclusive. Port 0 and reversed ranges are refused.
    pub fn new(start: u16, end: u16) -> Result<Self, PortError> {
        if start == 0 {
            return Err(PortError::OutOfRange(0));
        }
        if start > end {
            return Err(PortError::Reversed { start, end });
        }
        Ok(Self { start, end })
    }

    /// A range holding one port. Port 0 is refused.
    pub fn single(port: u16) -> Result<Self, PortError> {
        Self::new(port, port)
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// Every port of the range, in order.
    pub fn ports(&self) -> impl Iterator<Item = u16> + use<> {
        self.start..=self.end
    }
}

fn parse_port(text: &str) -> Result<u16, PortError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(PortError::Empty);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortError::NotANumber(text.to_owned()));
    }
    let value: u64 = text
        .parse()
        .map_err(|_| PortError::NotANumber(text.to_owned()))?;
    match u16::try_from(value) {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(PortError::OutOfRange(value)),
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('-') {
            Some((start, end)) => Self::new(parse_port(start)?, parse_port(end)?),
            None => Self::single(parse_port(text)?),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Parses a PortSentry-style comma-separated list (`"1,7,9,30000-30010"`). Empty items
/// between commas are refused rather than skipped.
pub fn parse_port_list(text: &str) -> Result<Vec<PortRange>, PortError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    text.split(',').map(str::parse).collect()
}

/// The distinct ports that a list of ranges covers, in order.
pub fn expand(ranges: &[PortRange]) -> BTreeSet<u16> {
    ranges.iter().flat_map(PortRange::ports).collect()
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            serializer.serialize_u16(self.start)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortRange;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535) or a range string such as \"30000-30010\"")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<PortRange, E> {
                let port =
                    u16::try_from(value).map_err(|_| E::custom(PortError::OutOfRange(value)))?;
                PortRange::single(port).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<PortRange, E> {
                let value =
                    u64::try_from(value).map_err(|_| E::custom(PortError::OutOfRange(0)))?;
                self.visit_u64(value)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<PortRange, E> {
                value.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A port 1-65535 without leading zeros, as a regular expression fragment.
macro_rules! port_regex {
    () => {
        "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
    };
}

/// Schema pattern for the string form: one port or a range `low-high`, each 1-65535 without
/// leading zeros.
pub const PORT_RANGE_PATTERN: &str = concat!("^", port_regex!(), "(-", port_regex!(), ")?$");

/// CEL rule applied by the API server to each item: a range `low-high` must have low <= high.
///
/// Format and bounds are checked by the schema (`minimum`/`maximum` for numbers,
/// [`PORT_RANGE_PATTERN`] for strings), because the API server sizes an int-or-string
/// value as if it could be the whole request (~3 MiB): any CEL string function on it
/// (`matches`, `split`, even `==` on `type(self)`) is estimated at ~300k per item, and
/// 1024 items blow the per-rule cost budget. So this rule only uses constant-cost
/// operations: `type(self) in [int]`, `size`, `charAt` and `int` of one character. It
/// finds the `-` at index `d`, and compares the two halves by length, then digit by digit
/// (the pattern forbids leading zeros, so a shorter number is a smaller one).
pub const PORT_RANGE_RULE: &str = "type(self) in [int] || [1, 2, 3, 4, 5].all(d, \
d >= size(self) || self.charAt(d) != '-' || d < size(self) - d - 1 || \
(d == size(self) - d - 1 && [0, 1, 2, 3, 4].all(k, k >= d || \
[0, 1, 2, 3, 4].exists(j, j < k && int(self.charAt(j)) != int(self.charAt(d + 1 + j))) || \
int(self.charAt(k)) <= int(self.charAt(d + 1 + k)))))";

impl JsonSchema for PortRange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRange".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A port (1-65535) or an inclusive range written \"low-high\", such as 30000-30010.",
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "maxLength": 11,
            "pattern": PORT_RANGE_PATTERN,
            "x-kubernetes-validations": [{
                "rule": PORT_RANGE_RULE,
                "message": "a range \"low-high\" must have low <= high, such as \"30000-30010\""
            }]
        })
    }
}
