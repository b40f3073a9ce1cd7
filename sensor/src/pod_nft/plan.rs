//! The pod agent's desired state as a pure function: for each pod of this node that a policy
//! with the `PodNftables` backend selects, the banned networks its own table must drop.
//!
//! Scope is the tenant boundary: a namespaced policy's bans (in its namespace, naming it)
//! reach only the pods of that namespace it selects; a cluster policy's bans (in the
//! operator's namespace) reach the pods it selects in the namespaces it selects, and a ban
//! the operator confined to one namespace (uncorroborated sidecar evidence) only that
//! namespace's. Time is an input, so the function is a specification that tests can read.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;
use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::LabelSelector};
use kube::core::{Selector, SelectorExt};
use portsentry_crds::{
    Backend, CONFINED_LABEL, ClusterPortSentryPolicy, PolicyKind, PolicyRef, PortSentryBan,
    PortSentryPolicy,
};

use crate::ban_watch::{self, Skip as BanSkip};

/// Namespaces whose pods the agent never enters, besides the operator's own: the cluster's
/// infrastructure is left as it is (the webhook never injects there either).
pub const SYSTEM_NAMESPACES: [&str; 1] = ["kube-system"];

/// Why a ban is not in a pod's table (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// Loopback, this node, the API server, an ignored prefix, the pod's own address, or a
    /// prefix containing one; or a ban the operator marked protected.
    Protected,
    /// Past the per-pod element cap.
    OverCap,
}

impl Skip {
    pub const ALL: [Skip; 2] = [Skip::Protected, Skip::OverCap];

    pub const fn label(self) -> &'static str {
        match self {
            Skip::Protected => "protected",
            Skip::OverCap => "over_cap",
        }
    }
}

/// Everything the plan is computed from, as last seen.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// Pods of this node (the watch's field selector `spec.nodeName`).
    pub pods: &'a [Pod],
    pub policies: &'a [PortSentryPolicy],
    pub cluster_policies: &'a [ClusterPortSentryPolicy],
    /// Labels of every namespace, by name (cluster policies select namespaces by label).
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub bans: &'a [PortSentryBan],
    /// The operator's namespace: cluster policies' bans live there; its pods are never entered.
    pub operator_namespace: &'a str,
    /// Never banned on any pod: loopback, unspecified, this node, the API server, the ignore
    /// list (see [`ban_watch::never_banned`]).
    pub never: &'a [IpNet],
    /// Most elements one pod's table holds; the rest are refused ([`Skip::OverCap`]).
    pub max_per_pod: usize,
}

/// One pod's table as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTable {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Banned networks (an address as /32 or /128) with their kernel timeout.
    pub elements: Vec<(IpNet, Option<Duration>)>,
}

/// The desired state of every pod table on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// By pod UID; a selected pod without bans still has its (empty) table.
    pub pods: BTreeMap<String, PodTable>,
    /// Bans left out of some pod's table, by reason, counted once per pod.
    pub skipped: BTreeMap<Skip, usize>,
}

/// The plan at `now`.
pub fn plan(inputs: &Inputs<'_>, now: Timestamp) -> Plan {
    let mut bans_of: BTreeMap<(&str, &PolicyRef), Vec<&PortSentryBan>> = BTreeMap::new();
    for ban in inputs.bans {
        let namespace = ban.metadata.namespace.as_deref().unwrap_or_default();
        bans_of
            .entry((namespace, &ban.spec.policy))
            .or_default()
            .push(ban);
    }
    let mut out = Plan::default();
    for pod in inputs.pods {
        let Some(target) = Target::of(pod, inputs.operator_namespace) else {
            continue;
        };
        let mut sources: Vec<&PortSentryBan> = Vec::new();
        let mut selected = false;
        for policy in selecting_policies(inputs.policies, &target) {
            selected = true;
            let key = PolicyRef {
                kind: PolicyKind::PortSentryPolicy,
                name: policy.to_owned(),
            };
            let bans = bans_of.get(&(target.namespace, &key));
            sources.extend(bans.into_iter().flatten());
        }
        for policy in
            selecting_cluster_policies(inputs.cluster_policies, inputs.namespaces, &target)
        {
            selected = true;
            let key = PolicyRef {
                kind: PolicyKind::ClusterPortSentryPolicy,
                name: policy.to_owned(),
            };
            let bans = bans_of.get(&(inputs.operator_namespace, &key));
            sources.extend(
                bans.into_iter()
                    .flatten()
                    .filter(|ban| confined_to(ban).is_none_or(|ns| ns == target.namespace)),
            );
        }
        if !selected {
            continue;
        }
        let never: Vec<IpNet> = inputs
            .never
            .iter()
            .copied()
            .chain(target.addresses.iter().map(|a| IpNet::from(*a)))
            .collect();
        let mut want = ban_watch::elements(sources, &never, now);
        if let Some(protected) = want.skipped.get(&BanSkip::Protected) {
            *out.skipped.entry(Skip::Protected).or_default() += protected;
        }
        if want.elements.len() > inputs.max_per_pod {
            // Keep the longest-lived bans: they are the ones a cap must not silently lose.
            want.elements
                .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let over = want.elements.split_off(inputs.max_per_pod);
            *out.skipped.entry(Skip::OverCap).or_default() += over.len();
            want.elements.sort();
        }
        out.pods.insert(
            target.uid.to_owned(),
            PodTable {
                uid: target.uid.to_owned(),
                namespace: target.namespace.to_owned(),
                name: target.name.to_owned(),
                elements: want.elements,
            },
        );
    }
    out
}

/// UIDs of the pods the agent may enter (their own network namespace, an address, not
/// finished, not infrastructure), whether or not a policy selects them.
pub fn enterable<'a>(
    pods: &'a [Pod],
    operator_namespace: &'a str,
) -> impl Iterator<Item = &'a str> {
    pods.iter()
        .filter_map(move |pod| Target::of(pod, operator_namespace).map(|t| t.uid))
}

/// A pod the agent may enter: it has its own network namespace (not hostNetwork), an address
/// (its sandbox exists), is not finished, and is not the cluster's infrastructure.
struct Target<'a> {
    uid: &'a str,
    namespace: &'a str,
    name: &'a str,
    labels: BTreeMap<String, String>,
    addresses: BTreeSet<IpAddr>,
}

impl<'a> Target<'a> {
    fn of(pod: &'a Pod, operator_namespace: &str) -> Option<Self> {
        let uid = pod.metadata.uid.as_deref()?;
        let namespace = pod.metadata.namespace.as_deref()?;
        if namespace == operator_namespace || SYSTEM_NAMESPACES.contains(&namespace) {
            return None;
        }
        let spec = pod.spec.as_ref()?;
        if spec.host_network == Some(true) {
            // The pod's namespace is the node's: never the agent's to change.
            return None;
        }
        let status = pod.status.as_ref()?;
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return None;
        }
        let addresses: BTreeSet<IpAddr> = status
            .pod_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .chain(status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()))
            .map(|ip: IpAddr| ip.to_canonical())
            .collect();
        if addresses.is_empty() {
            return None;
        }
        Some(Target {
            uid,
            namespace,
            name: pod.metadata.name.as_deref().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            addresses,
        })
    }
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    // A selector the API server accepted always converts; one that does not selects nothing.
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

fn pod_nftables(backends: &[Backend]) -> bool {
    backends.contains(&Backend::PodNftables)
}

/// Names of the namespaced policies of the pod's namespace that select it for PodNftables.
fn selecting_policies<'p>(
    policies: &'p [PortSentryPolicy],
    target: &Target<'_>,
) -> impl Iterator<Item = &'p str> {
    policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(target.namespace))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| pod_nftables(&p.spec.rules.enforcement.backends))
        .filter(|p| selects(&p.spec.pod_selector, &target.labels))
        .filter_map(|p| p.metadata.name.as_deref())
}

/// Names of the cluster policies whose namespace and pod selectors both select the pod for
/// PodNftables (no namespace selector: no pods).
fn selecting_cluster_policies<'p>(
    policies: &'p [ClusterPortSentryPolicy],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    target: &Target<'_>,
) -> Vec<&'p str> {
    let empty = BTreeMap::new();
    let namespace_labels = namespaces.get(target.namespace).unwrap_or(&empty);
    policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| pod_nftables(&p.spec.rules.enforcement.backends))
        .filter(|p| {
            p.spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| selects(s, namespace_labels))
        })
        .filter(|p| {
            p.spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| selects(s, &target.labels))
        })
        .filter_map(|p| p.metadata.name.as_deref())
        .collect()
}

/// The namespace a cluster ban is confined to, if the operator confined it.
fn confined_to(ban: &PortSentryBan) -> Option<&str> {
    ban.metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(CONFINED_LABEL))
        .map(String::as_str)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
