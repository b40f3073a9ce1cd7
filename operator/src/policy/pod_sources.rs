//! Bans of pod addresses: the NetworkPolicy backend never claims them (an `ipBlock` does not
//! reliably match pods, and its `namespaceSelector: {}` peer admits every pod), so each says
//! which backend drops it instead (PodNftables, quarantine of the scanning pod) or that none does.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::{
    api::{core::v1::Pod, networking::v1::NetworkPolicy},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::ResourceExt;
use portsentry_crds::{Backend, PortSentryBan, PortSentryPolicy};

use crate::{
    enforce::{bans::Guards, quarantine},
    labels::QUARANTINE_LABEL,
    policy::{
        status::{self, ENFORCED},
        widen,
    },
};

/// Reason of `Enforced=False` on a ban of pod addresses that no backend of its policy drops.
pub const POD_SOURCE: &str = "PodSource";
/// Reason of `Enforced=True` on a ban whose source is a pod that quarantine isolates.
pub const QUARANTINE: &str = "Quarantine";

/// Who drops a ban of pod addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSourceBy {
    /// The node agents, inside the network namespace of each pod of the policy.
    PodNftables,
    /// Quarantine: the scanning pod (`namespace/name`) is labelled and its egress denied.
    Quarantine { pod: String },
    /// Nobody; `why` says what would.
    Nobody { why: String },
}

/// The cluster's pods by address (pods on the host's network left out: their address is a
/// node's, which is never banned).
pub fn by_address(pods: &[Arc<Pod>]) -> BTreeMap<IpAddr, &Pod> {
    let mut addresses = BTreeMap::new();
    for pod in pods {
        if pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
        {
            continue;
        }
        for address in quarantine::pod_addresses(pod) {
            addresses.insert(address.to_canonical(), &**pod);
        }
    }
    addresses
}

/// True when `ban`'s source overlaps the cluster's pod ranges or holds a pod's address (a
/// range lookup: addresses order by family, then numerically).
pub fn is_pod_source(ban: &PortSentryBan, guards: &Guards, pods: &BTreeMap<IpAddr, &Pod>) -> bool {
    let net = ban.spec.source.network();
    guards.is_pod_source(&ban.spec.source)
        || pods.range(net.network()..=net.broadcast()).next().is_some()
}

/// Egress NetworkPolicies of `pod`'s namespace that select it, besides quarantine's own: an
/// allow of theirs would survive quarantine's deny-all-egress (policies are additive).
fn egress_policies_of<'a>(pod: &Pod, network_policies: &'a [NetworkPolicy]) -> Vec<&'a str> {
    network_policies
        .iter()
        .filter(|np| np.metadata.name.as_deref() != Some(quarantine::POLICY_NAME))
        .filter(|np| np.metadata.namespace == pod.metadata.namespace)
        .filter(|np| {
            np.spec
                .as_ref()
                .is_some_and(|spec| match &spec.policy_types {
                    Some(types) => types.iter().any(|t| t == "Egress"),
                    None => spec.egress.is_some(),
                })
        })
        .filter(|np| {
            let mut labels = pod.labels().clone();
            labels.insert(QUARANTINE_LABEL.to_owned(), "true".to_owned());
            // A selector that cannot be read is taken to select: doubt must not claim.
            np.spec
                .as_ref()
                .and_then(|s| s.pod_selector.as_ref())
                .is_none_or(|selector| widen::matches(selector, &labels).unwrap_or(true))
        })
        .filter_map(|np| np.metadata.name.as_deref())
        .collect()
}

/// Who drops `ban` (of pod addresses) of `policy`, whose chosen backend is not PodNftables:
/// PodNftables when listed and its agent runs (the agents drop the bans of every policy
/// listing it), else quarantine when the policy asks for it and the source is a pod of its
/// namespace that quarantine can isolate.
pub fn enforced_by(
    ban: &PortSentryBan,
    policy: &PortSentryPolicy,
    pod_nftables_agent: bool,
    guards: &Guards,
    pods: &BTreeMap<IpAddr, &Pod>,
    network_policies: &[NetworkPolicy],
) -> PodSourceBy {
    let lists_pod_nftables = policy
        .spec
        .rules
        .enforcement
        .backends
        .contains(&Backend::PodNftables);
    if lists_pod_nftables && pod_nftables_agent {
        return PodSourceBy::PodNftables;
    }
    let pod_nftables = if lists_pod_nftables {
        "PodNftables is listed but its agent is not installed (chart \
         nodeSensors.podNftables.enabled=true)"
    } else {
        "list PodNftables among spec.enforcement.backends (chart \
         nodeSensors.podNftables.enabled=true)"
    };
    let nobody = |why: String| PodSourceBy::Nobody { why };
    if !policy.spec.rules.response.quarantine {
        return nobody(format!(
            "{pod_nftables}, or set response.quarantine to isolate a scanning pod of this namespace"
        ));
    }
    let net = ban.spec.source.network();
    let pod = (net.prefix_len() == net.max_prefix_len())
        .then(|| pods.get(&net.addr()))
        .flatten();
    let Some(pod) = pod else {
        return nobody(format!(
            "quarantine acts on the address of a pod, and no pod has this one now; {pod_nftables}"
        ));
    };
    let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    if pod.namespace() != policy.namespace() {
        return nobody(format!(
            "the source is pod {name}: a PortSentryPolicy quarantines only in its own \
             namespace (a ClusterPortSentryPolicy may quarantine there); {pod_nftables}"
        ));
    }
    if quarantine::exempt(pod, guards) {
        return nobody(format!(
            "the source is pod {name}, which is never quarantined (protected namespace or \
             host network); {pod_nftables}"
        ));
    }
    let allowing = egress_policies_of(pod, network_policies);
    if !allowing.is_empty() {
        return nobody(format!(
            "the source is pod {name}, but quarantine's deny-all-egress cannot isolate it: \
             egress NetworkPolicies {} select it and their allows stay; {pod_nftables}",
            allowing.join(", ")
        ));
    }
    PodSourceBy::Quarantine { pod: name }
}

/// The `Enforced` condition of a ban of pod addresses (`protected`: why it may never be
/// banned, if so).
pub fn condition(
    previous: &[Condition],
    protected: Option<crate::enforce::bans::Protection>,
    by: &PodSourceBy,
    now: Timestamp,
) -> Condition {
    if let Some(why) = protected {
        return status::ban_condition(previous, status::BanEnforcement::Protected(why), now);
    }
    let (enforced, reason, message) = match by {
        PodSourceBy::PodNftables => (
            true,
            "PodNftables",
            "the source is in the cluster's pod ranges: not dropped by NetworkPolicy (an ipBlock \
             does not reliably match pods) but by the node agents inside the network namespace \
             of each pod of the policy"
                .to_owned(),
        ),
        PodSourceBy::Quarantine { pod } => (
            true,
            QUARANTINE,
            format!(
                "the source is pod {pod}: quarantined (labelled {QUARANTINE_LABEL}, its egress \
                 denied by NetworkPolicy {}); NetworkPolicy does not drop pod sources",
                quarantine::POLICY_NAME
            ),
        ),
        PodSourceBy::Nobody { why } => (
            false,
            POD_SOURCE,
            format!(
                "the source is in the cluster's pod ranges, which a NetworkPolicy ipBlock does \
                 not reliably match: not blocked by the NetworkPolicy backend, nor by another: \
                 {why}"
            ),
        ),
    };
    status::condition(previous, ENFORCED, enforced, reason, message, None, now)
}
