//! Source addresses and prefixes as users write them: `203.0.113.7`, `10.0.0.0/8`,
//! `2001:db8::/32`. A bare address is a host prefix (/32 or /128).

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an address or prefix was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an IPv4 or IPv6 address or CIDR: write e.g. 203.0.113.7, 10.0.0.0/8 or 2001:db8::/32"
)]
pub struct AddressError(pub String);

/// An IPv4 or IPv6 prefix; parsed from either a CIDR or a bare address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePrefix(pub IpNet);

/// CEL rule the API server applies to address-or-CIDR strings.
pub const ADDRESS_OR_CIDR_RULE: &str = "isIP(self) || isCIDR(self)";

impl SourcePrefix {
    pub fn host(address: IpAddr) -> Self {
        Self(IpNet::from(address))
    }

    /// The prefix with host bits cleared, as enforcement needs it.
    pub fn network(&self) -> IpNet {
        self.0.trunc()
    }

    pub fn contains(&self, address: &IpAddr) -> bool {
        self.0.contains(address)
    }
}

impl FromStr for SourcePrefix {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Self(net));
        }
        text.parse::<IpAddr>()
            .map(Self::host)
            .map_err(|_| AddressError(text.to_owned()))
    }
}

impl fmt::Display for SourcePrefix {
    /// Host prefixes print as bare addresses, others as CIDRs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for SourcePrefix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SourcePrefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for SourcePrefix {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SourcePrefix".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An IPv4 or IPv6 address (203.0.113.7) or CIDR (10.0.0.0/8, 2001:db8::/32).",
            "maxLength": 64,
            "x-kubernetes-validations": [{
                "rule": ADDRESS_OR_CIDR_RULE,
                "message": "must be an IPv4 or IPv6 address or CIDR, such as 203.0.113.7, 10.0.0.0/8 or 2001:db8::/32"
            }]
        })
    }
}
