//! Which policy governs a pod: the first namespaced policy of its namespace that selects it,
//! else the first cluster policy whose namespace and pod selectors both match.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::{Selector, SelectorExt};
use portsentry_crds::{ClusterPortSentryPolicy, PolicyKind, PolicyRules, PortSentryPolicy};

/// The policies the webhook decides on, as last seen.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub policies: Vec<PortSentryPolicy>,
    pub cluster_policies: Vec<ClusterPortSentryPolicy>,
    /// Labels of every namespace, by name (cluster policies select namespaces by label).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// The policy that governs a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Governing<'a> {
    pub kind: PolicyKind,
    pub name: &'a str,
    pub rules: &'a PolicyRules,
}

impl Governing<'_> {
    /// `PortSentryPolicy/name` or `ClusterPortSentryPolicy/name`: the injected annotation.
    pub fn reference(&self) -> String {
        let kind = match self.kind {
            PolicyKind::PortSentryPolicy => "PortSentryPolicy",
            PolicyKind::ClusterPortSentryPolicy => "ClusterPortSentryPolicy",
        };
        format!("{kind}/{}", self.name)
    }
}

fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    // A selector the API server accepted always converts; one that does not selects nothing.
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The policy that governs a pod: the first (by name) namespaced policy of its namespace that
/// selects it, else the first cluster policy whose namespace and pod selectors both match.
pub fn governing_policy<'a>(
    pod: &Pod,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    snapshot: &'a Snapshot,
) -> Option<Governing<'a>> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut namespaced: Vec<&PortSentryPolicy> = snapshot
        .policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| selects(&p.spec.pod_selector, &labels))
        .collect();
    namespaced.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    if let Some(policy) = namespaced.first() {
        return Some(Governing {
            kind: PolicyKind::PortSentryPolicy,
            name: policy.metadata.name.as_deref().unwrap_or_default(),
            rules: &policy.spec.rules,
        });
    }
    let mut cluster: Vec<&ClusterPortSentryPolicy> = snapshot
        .cluster_policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
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
                .is_none_or(|s| selects(s, &labels))
        })
        .collect();
    cluster.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    cluster.first().map(|policy| Governing {
        kind: PolicyKind::ClusterPortSentryPolicy,
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        rules: &policy.spec.rules,
    })
}
