//! Source addresses and prefixes as users write them: `203.0.113.7`, `10.0.0.0/8`,
//! `2001:db8::/32`. A bare address is a host prefix (/32 or /128); an IPv4-mapped IPv6 one
//! (`::ffff:203.0.113.0/120`) is the IPv4 prefix it maps, since that is what traffic carries.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::{IpNet, Ipv4Net};
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
    /// The host prefix of `address` (an IPv4-mapped IPv6 address as its IPv4 address).
    pub fn host(address: IpAddr) -> Self {
        Self(IpNet::from(address.to_canonical()))
    }

    /// `net` with an IPv4-mapped IPv6 prefix of at least /96 (`::ffff:a.b.c.d/len`) as the
    /// IPv4 prefix it maps (`a.b.c.d/len-96`); anything else unchanged.
    pub fn canonical(net: IpNet) -> Self {
        match net {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
                .addr()
                .to_ipv4_mapped()
                .and_then(|v4| Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
                .map_or(Self(net), |v4| Self(IpNet::V4(v4))),
            other => Self(other),
        }
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
            return Ok(Self::canonical(net));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> String {
        text.parse::<SourcePrefix>().unwrap().to_string()
    }

    #[test]
    fn an_ipv4_mapped_ipv6_prefix_is_the_ipv4_prefix_it_maps() {
        assert_eq!(parsed("::ffff:203.0.113.0/120"), "203.0.113.0/24");
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_is_the_ipv4_address() {
        assert_eq!(parsed("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(
            SourcePrefix::host("::ffff:203.0.113.7".parse().unwrap()).to_string(),
            "203.0.113.7"
        );
    }

    #[test]
    fn an_ipv4_mapped_prefix_acts_on_ipv4_traffic() {
        let prefix: SourcePrefix = "::ffff:203.0.113.0/120".parse().unwrap();
        assert!(prefix.contains(&"203.0.113.200".parse().unwrap()));
        assert_eq!(prefix.network().to_string(), "203.0.113.0/24");
    }

    #[test]
    fn a_deserialized_ban_source_is_normalised_too() {
        let prefix: SourcePrefix = serde_json::from_str("\"::ffff:198.0.0.0/104\"").unwrap();
        assert_eq!(prefix.to_string(), "198.0.0.0/8");
    }

    #[test]
    fn other_ipv6_prefixes_are_kept() {
        assert_eq!(parsed("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(parsed("::ffff:0:0/80"), "::ffff:0.0.0.0/80");
    }
}
