//! `PortSentryBan`: one object per (scope, source). Made by the operator from reports or by
//! hand with kubectl; enforced the same either way; deleting it unbans.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SourcePrefix;

/// Label on a cluster policy's ban that acts only in one namespace (its value): written by
/// the operator while sidecar evidence is uncorroborated; node sensors never enforce it.
pub const CONFINED_LABEL: &str = "portsentry.io/confined-to";
/// `reason` of a ban's `Enforced=False` condition when its source is protected
/// infrastructure: no backend (node sensors included) enforces it.
pub const PROTECTED_SOURCE_REASON: &str = "ProtectedSource";

/// True when `ban` must be enforced by no backend: the operator marked its source protected.
pub fn refused(ban: &PortSentryBan) -> bool {
    ban.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == "Enforced" && c.status == "False" && c.reason == PROTECTED_SOURCE_REASON
        })
    })
}

/// True when `ban` may act cluster-wide (on every node): not [`refused`], not confined.
pub fn cluster_wide(ban: &PortSentryBan) -> bool {
    !refused(ban)
        && !ban
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CONFINED_LABEL))
}

/// Most evidence entries a ban keeps (the newest win).
pub const MAX_EVIDENCE: usize = 32;

/// CEL rule on a ban's spec: its source is no wider than /8 (IPv4) or /32 (IPv6). (The API
/// server's `isCIDR` refuses IPv4-mapped IPv6 prefixes, so `::ffff:0.0.0.0/96` never gets here.)
pub const WIDEST_BAN_RULE: &str = "!isCIDR(self.source) || cidr(self.source).prefixLength() \
    >= (cidr(self.source).ip().family() == 4 ? 8 : 32)";
/// What the API server answers when [`WIDEST_BAN_RULE`] fails.
pub const WIDEST_BAN_MESSAGE: &str = "spec.source is too wide: a ban's prefix may be at most /8 for IPv4 \
    and /32 for IPv6; ban narrower prefixes";

/// A source banned for scanning decoy ports.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portsentry.io",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "PortSentryBan",
    doc = "A PortSentryBan: one source banned for scanning decoy ports. Delete it to unban.",
    plural = "portsentrybans",
    singular = "portsentryban",
    namespaced,
    status = "BanStatus",
    shortname = "psban",
    category = "portsentry",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policy.name"}"#,
    printcolumn = r#"{"name":"Offences","type":"integer","jsonPath":".spec.offences"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": WIDEST_BAN_RULE,
    "message": WIDEST_BAN_MESSAGE,
    "fieldPath": ".source"
}]))]
pub struct PortSentryBanSpec {
    /// The banned address (203.0.113.7) or prefix (198.51.100.0/24, 2001:db8::/48).
    pub source: SourcePrefix,
    /// The policy whose pods this ban protects; a cluster policy's ban applies cluster-wide.
    pub policy: PolicyRef,
    /// When the source was first seen scanning in this run of offences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<Time>,
    /// When the source was last seen scanning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// Offences so far within the policy's escalation window; each doubles the ban.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub offences: u32,
    /// When the ban lifts. Absent: it holds until the object is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Why the source was banned, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub reason: Option<String>,
    /// The newest probes that led to the ban (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub evidence: Vec<Evidence>,
}

fn one() -> u32 {
    1
}

/// Names the policy a ban belongs to.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRef {
    /// PortSentryPolicy (same namespace as the ban) or ClusterPortSentryPolicy.
    pub kind: PolicyKind,
    /// Name of the policy.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The kind of policy a ban or report refers to.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum PolicyKind {
    PortSentryPolicy,
    ClusterPortSentryPolicy,
}

/// Transport protocol of a probe.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// PortSentry's word for the protocol in log and history lines.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// What a probe looked like.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum ProbeKind {
    /// A completed TCP handshake (verified source).
    Connect,
    /// A UDP datagram.
    Datagram,
    Syn,
    Fin,
    Null,
    Xmas,
    Ack,
    Window,
    Maimon,
    /// Any other TCP flag combination.
    Unknown,
}

impl ProbeKind {
    /// True only for evidence that proves the source address: a completed handshake.
    pub const fn proves_source(self) -> bool {
        matches!(self, ProbeKind::Connect)
    }
}

/// One probe that counted toward a ban.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// Decoy port touched.
    #[schemars(range(min = 1))]
    pub port: u16,
    pub protocol: Protocol,
    pub kind: ProbeKind,
    /// True when the source address is proven (completed TCP handshake).
    pub verified: bool,
    /// The sensor that saw it: "namespace/pod" or "node/name".
    #[schemars(length(max = 253))]
    pub reporter: String,
    /// When the sensor saw it.
    pub observed_at: Time,
}

/// Observed state of a ban.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BanStatus {
    /// `Enforced`: whether (and by which backend) the ban drops traffic now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
