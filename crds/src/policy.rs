//! `PortSentryPolicy` (namespaced) and `ClusterPortSentryPolicy` (cluster-scoped): which
//! workloads get decoy sensors, what counts as a scan, and how a scanner is answered.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, PortRange, Preset, SourcePrefix};

/// Rules shared by namespaced and cluster policies.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRules {
    /// The decoy ports sensors listen on.
    pub decoys: Decoys,
    /// When evidence from one source counts as a scan.
    #[serde(default)]
    pub detection: Detection,
    /// What happens to a source once it is judged a scanner.
    #[serde(default)]
    pub response: Response,
    /// How bans are enforced.
    #[serde(default)]
    pub enforcement: Enforcement,
}

/// Protects pods of one namespace with decoy-port sensors and bans the sources that scan them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portsentry.io",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "PortSentryPolicy",
    doc = "A PortSentryPolicy: decoy-port sensors for the pods of one namespace, and bans for the sources that scan them.",
    plural = "portsentrypolicies",
    singular = "portsentrypolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "pspol",
    category = "portsentry",
    printcolumn = r#"{"name":"Sensors Ready","type":"integer","jsonPath":".status.sensorsReady"}"#,
    printcolumn = r#"{"name":"Active Bans","type":"integer","jsonPath":".status.activeBans"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PortSentryPolicySpec {
    /// Pods of this namespace that get a sensor sidecar. An empty selector selects every pod.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(flatten)]
    pub rules: PolicyRules,
}

/// Protects pods across namespaces, and optionally nodes, with sensors; its bans apply cluster-wide.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portsentry.io",
    derive = "PartialEq",
    version = "v1alpha1",
    kind = "ClusterPortSentryPolicy",
    doc = "A ClusterPortSentryPolicy: decoy-port sensors for pods across namespaces and for nodes; its bans apply cluster-wide.",
    plural = "clusterportsentrypolicies",
    singular = "clusterportsentrypolicy",
    status = "PolicyStatus",
    shortname = "cpspol",
    category = "portsentry",
    printcolumn = r#"{"name":"Sensors Ready","type":"integer","jsonPath":".status.sensorsReady"}"#,
    printcolumn = r#"{"name":"Active Bans","type":"integer","jsonPath":".status.activeBans"}"#,
    printcolumn = r#"{"name":"Enforced","type":"string","jsonPath":".status.conditions[?(@.type==\"Enforced\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPortSentryPolicySpec {
    /// Namespaces whose pods get a sensor sidecar. Absent: no pod sidecars from this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods (within the selected namespaces) that get a sensor sidecar. Absent: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Nodes that run a host-network node sensor (DaemonSet). Absent: no node sensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Evidence a ban needs before it acts cluster-wide (every node's nftables, quarantine
    /// in any namespace). Until then a ban on sidecar evidence acts only in the reporting
    /// pod's namespace.
    #[serde(default)]
    pub corroboration: Corroboration,
    #[serde(flatten)]
    pub rules: PolicyRules,
}

/// How much independent evidence makes a cluster policy's ban cluster-wide. A sidecar runs
/// in a tenant's pod and its evidence is that tenant's word; distinct namespaces, or the
/// policy's node sensors (run by the operator on the host), corroborate it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Corroboration {
    /// Sidecars in this many distinct namespaces must have reported the source.
    #[serde(default = "default_sidecars")]
    #[schemars(range(min = 1, max = 100))]
    pub sidecars: u32,
    /// Or this many distinct node sensors.
    #[serde(default = "default_node_sensors")]
    #[schemars(range(min = 1, max = 100))]
    pub node_sensors: u32,
}

fn default_sidecars() -> u32 {
    2
}

fn default_node_sensors() -> u32 {
    1
}

impl Default for Corroboration {
    fn default() -> Self {
        Self {
            sidecars: default_sidecars(),
            node_sensors: default_node_sensors(),
        }
    }
}

impl Corroboration {
    /// True when `reporters` (evidence reporters: "namespace/pod" of sidecars, "node/name" of
    /// node sensors) corroborate a ban: enough distinct node sensors, or sidecars of enough
    /// distinct namespaces. Evidence without reporters (a ban made by hand in the operator's
    /// namespace, by whoever may write there) is a cluster admin's word and counts as
    /// corroborated.
    pub fn holds<'a>(&self, reporters: impl IntoIterator<Item = &'a str>) -> bool {
        let mut nodes = std::collections::BTreeSet::new();
        let mut namespaces = std::collections::BTreeSet::new();
        let mut any = false;
        for reporter in reporters {
            any = true;
            match reporter.split_once('/') {
                Some(("node", name)) => nodes.insert(name),
                Some((namespace, _)) => namespaces.insert(namespace),
                None => false,
            };
        }
        !any || nodes.len() >= self.node_sensors as usize
            || namespaces.len() >= self.sidecars as usize
    }
}

/// Decoy ports: a preset, explicit lists, and "advanced" every-unused-port-below-N watching.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.preset) || (has(self.tcp) && size(self.tcp) > 0) || (has(self.udp) && size(self.udp) > 0) || has(self.advanced)",
    "message": "set at least one of preset, tcp, udp or advanced: a sensor without decoys detects nothing"
}]))]
pub struct Decoys {
    /// A PortSentry port-list preset (classic, aware or bareBones); `tcp` and `udp` add to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// TCP decoy ports and ranges, e.g. [1, 7, "30000-30010"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub tcp: Vec<PortRange>,
    /// UDP decoy ports and ranges, e.g. [1, 7, "30000-30010"].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub udp: Vec<PortRange>,
    /// Watch every port below a bound that nothing listens on (PortSentry's advanced modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advanced: Option<AdvancedDecoys>,
    /// Detect SYN/FIN/NULL/XMAS/ACK/Window/Maimon probes with a raw socket (needs NET_RAW).
    #[serde(default)]
    pub stealth: bool,
    /// Text written to a TCP connection on a decoy before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub banner: Option<String>,
}

/// PortSentry's advanced modes: every port below a bound, minus exclusions and ports in use.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.tcpBelow) || has(self.udpBelow)",
    "message": "set tcpBelow, udpBelow or both"
}]))]
pub struct AdvancedDecoys {
    /// Watch every TCP port below this one (PortSentry's ADVANCED_PORTS_TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tcp_below: Option<u16>,
    /// Watch every UDP port below this one (PortSentry's ADVANCED_PORTS_UDP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub udp_below: Option<u16>,
    /// TCP ports never treated as decoys (PortSentry's ADVANCED_EXCLUDE_TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub exclude_tcp: Vec<PortRange>,
    /// UDP ports never treated as decoys (PortSentry's ADVANCED_EXCLUDE_UDP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub exclude_udp: Vec<PortRange>,
}

/// When a source counts as a scanner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Detection {
    /// Distinct decoy ports one source must touch within `window` to count as a scan.
    /// 1 reacts on the first touch (PortSentry's SCAN_TRIGGER 0 and 1).
    #[serde(default = "default_scan_trigger")]
    #[schemars(range(min = 1, max = 1000))]
    pub scan_trigger: u32,
    /// How long a source's touches are remembered when counting toward `scanTrigger`.
    #[serde(default = "default_window")]
    pub window: Duration,
    /// Sources that are never treated as scanners (addresses or CIDRs, IPv4 or IPv6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub ignore: Vec<SourcePrefix>,
}

fn default_scan_trigger() -> u32 {
    1
}

fn default_window() -> Duration {
    Duration::from_secs(60)
}

impl Default for Detection {
    fn default() -> Self {
        Self {
            scan_trigger: default_scan_trigger(),
            window: default_window(),
            ignore: Vec::new(),
        }
    }
}

/// What the operator does to a source judged a scanner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Action {
    /// Record a PortSentryBan and enforce it (and call webhooks).
    #[default]
    Ban,
    /// Log, count and emit Events only.
    Alert,
    /// Call the webhooks only, like PortSentry's BLOCK_x=2 running KILL_RUN_CMD.
    Hook,
}

/// Ban length, escalation for repeat offenders, trust in unverified evidence, alert hooks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.banDuration) || !has(self.maxBanDuration) || duration(self.banDuration) <= duration(self.maxBanDuration)",
        "message": "banDuration must not exceed maxBanDuration",
        "fieldPath": ".banDuration"
    },
    {
        "rule": "!has(self.action) || self.action != 'Hook' || (has(self.webhooks) && size(self.webhooks) > 0)",
        "message": "action Hook needs at least one entry in webhooks",
        "fieldPath": ".webhooks"
    }
]))]
pub struct Response {
    /// Ban (enforce and notify), Alert (record only) or Hook (notify webhooks only).
    #[serde(default)]
    pub action: Action,
    /// Length of a first ban.
    #[serde(default = "default_ban_duration")]
    pub ban_duration: Duration,
    /// Cap on a ban's length after escalation; at most 8760h (a year).
    #[serde(default = "default_max_ban_duration")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('8760h')",
        "message": "must be at most 8760h (one year)"
    }]))]
    pub max_ban_duration: Duration,
    /// Repeat offenders: each offence within `window` doubles the ban, up to `maxBanDuration`.
    #[serde(default)]
    pub escalation: Escalation,
    /// Let unverified evidence (stealth probes, UDP: spoofable sources) ban. Off by default.
    #[serde(default)]
    pub ban_on_unverified: bool,
    /// When the scanner is a pod of this cluster, label it and cut its egress until the ban
    /// ends (a namespaced policy: pods of its own namespace only).
    #[serde(default)]
    pub quarantine: bool,
    /// Most bans this policy keeps active at once; beyond it new scanners are alerted, not banned.
    #[serde(default = "default_max_active_bans")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_active_bans: u32,
    /// HTTP(S) endpoints that receive a JSON POST for every ban and expiry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub webhooks: Vec<WebhookTarget>,
}

fn default_ban_duration() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_ban_duration() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_max_active_bans() -> u32 {
    10_000
}

impl Default for Response {
    fn default() -> Self {
        Self {
            action: Action::default(),
            ban_duration: default_ban_duration(),
            max_ban_duration: default_max_ban_duration(),
            escalation: Escalation::default(),
            ban_on_unverified: false,
            quarantine: false,
            max_active_bans: default_max_active_bans(),
            webhooks: Vec::new(),
        }
    }
}

/// Repeat-offender escalation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Escalation {
    /// Double the ban for each earlier offence within `window`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How long an offence is remembered for escalation.
    #[serde(default = "default_escalation_window")]
    pub window: Duration,
}

fn default_true() -> bool {
    true
}

fn default_escalation_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl Default for Escalation {
    fn default() -> Self {
        Self {
            enabled: true,
            window: default_escalation_window(),
        }
    }
}

/// An HTTP(S) endpoint notified of bans and expiries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookTarget {
    /// Absolute http:// or https:// URL.
    #[schemars(length(max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''",
        "message": "must be an absolute http:// or https:// URL"
    }]))]
    pub url: String,
    /// Give up on one delivery attempt after this long; at most 30s.
    #[serde(default = "default_webhook_timeout")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) <= duration('30s')",
        "message": "must be at most 30s: a hook that slow holds a delivery slot"
    }]))]
    pub timeout: Duration,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A way of turning bans into dropped traffic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Backend {
    /// Generated NetworkPolicies allowing all ingress except banned prefixes, never widening:
    /// refused (`Enforced=False`, naming them) where other NetworkPolicies or other policy
    /// layers (AdminNetworkPolicy, Cilium, Calico) may select the pods, and never claimed for
    /// bans of pod addresses (an ipBlock does not reliably match pods).
    NetworkPolicy,
    /// nftables sets on every node, kept by the node sensors (cluster policies).
    NodeNftables,
    /// nftables sets inside each selected pod's own network namespace, kept by the pod
    /// nftables agent (chart `nodeSensors.podNftables.enabled=true`): a true deny of external
    /// and in-cluster sources, whatever the CNI and whatever other policy layers exist.
    PodNftables,
}

/// Enforcement backends, tried in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    /// Backends in order of preference: the first that can enforce does, and when one
    /// cannot (safely) it falls back to the next configured backend; the `Enforced`
    /// condition of the policy and of each ban names the backend that enforces.
    #[serde(default = "default_backends")]
    #[schemars(length(min = 1, max = 3))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub backends: Vec<Backend>,
    /// Largest number of banned prefixes in one generated NetworkPolicy before sharding.
    #[serde(default = "default_max_prefixes")]
    #[schemars(range(min = 1, max = 5000))]
    pub max_prefixes_per_object: u32,
}

fn default_backends() -> Vec<Backend> {
    vec![Backend::NetworkPolicy]
}

fn default_max_prefixes() -> u32 {
    1000
}

impl Default for Enforcement {
    fn default() -> Self {
        Self {
            backends: default_backends(),
            max_prefixes_per_object: default_max_prefixes(),
        }
    }
}

/// Observed state of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Enforced` (with a reason when bans cannot be enforced safely).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Pods given a sensor by this policy.
    #[serde(default)]
    pub sensors_injected: u32,
    /// Sensors whose decoys are listening.
    #[serde(default)]
    pub sensors_ready: u32,
    /// PortSentryBans currently in force for this policy.
    #[serde(default)]
    pub active_bans: u32,
    /// Decoys left out because a container of a selected pod declares the port ("pod/port/proto").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_decoys: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_two_namespaces_of_sidecars_or_one_node_sensor_corroborate() {
        let c = Corroboration::default();
        assert!(!c.holds(["shop/web-0", "shop/web-1"]));
        assert!(c.holds(["shop/web-0", "dev/api-0"]));
        assert!(c.holds(["node/n1"]));
    }

    #[test]
    fn a_ban_without_reporters_is_an_admins_and_corroborated() {
        assert!(Corroboration::default().holds([]));
    }

    #[test]
    fn stricter_settings_need_more_distinct_reporters() {
        let c = Corroboration {
            sidecars: 3,
            node_sensors: 2,
        };
        assert!(!c.holds(["node/n1", "node/n1", "a/x", "b/y"]));
        assert!(c.holds(["node/n1", "node/n2"]));
        assert!(c.holds(["a/x", "b/y", "c/z"]));
    }
}
