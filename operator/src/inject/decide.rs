//! The admission decision: whether a pod gets a sensor (system and operator namespaces,
//! opt-outs, host network, no policy, no decoy left) and, if so, its injection.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::{
    config::config_map_name,
    decoys::*,
    governing::*,
    patch::{injected_pod, patch_between},
    sidecar::*,
};
use crate::{
    Result,
    labels::{INJECT_ANNOTATION, INJECTED_ANNOTATION},
};

/// Namespaces never injected, whatever a policy selects.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// Why a pod is left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    SystemNamespace,
    OperatorNamespace,
    OptedOut,
    AlreadyInjected,
    HostNetwork,
    NoPolicy,
    /// Every decoy of the policy collides with a declared port.
    NoDecoysLeft,
}

impl Skip {
    /// A short reason for logs and the admission response's warnings.
    pub fn reason(self) -> &'static str {
        match self {
            Skip::SystemNamespace => "system namespace",
            Skip::OperatorNamespace => "the operator's own namespace",
            Skip::OptedOut => "opted out with portsentry.io/inject=false",
            Skip::AlreadyInjected => "already injected",
            Skip::HostNetwork => "host-network pod (node sensors cover nodes)",
            Skip::NoPolicy => "no policy selects it",
            Skip::NoDecoysLeft => "every decoy collides with a declared container port",
        }
    }
}

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Skip(Skip),
    /// Boxed: the injected pod is large next to a skip reason.
    Inject(Box<Injection>),
}

/// An injection: the pod as it is to be admitted, and what the caller reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    /// `PortSentryPolicy/name` or `ClusterPortSentryPolicy/name`.
    pub policy: String,
    /// The ConfigMap (in the pod's namespace) the sidecar reads.
    pub config_map: String,
    pub skipped: Vec<Skipped>,
    /// The admitted pod with the sensor injected.
    pub pod: Pod,
}

impl Injection {
    /// The RFC 6902 patch that turns `original` (the pod this injection was decided on)
    /// into [`Injection::pod`].
    pub fn patch(&self, original: &Pod) -> Result<json_patch::Patch> {
        patch_between(original, &self.pod)
    }
}

/// Decides whether `pod` in `namespace` gets a sensor and builds the injected pod if so.
pub fn decide(pod: &Pod, namespace: &str, snapshot: &Snapshot, settings: &Settings) -> Decision {
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Decision::Skip(Skip::SystemNamespace);
    }
    if namespace == settings.operator_namespace {
        return Decision::Skip(Skip::OperatorNamespace);
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if annotations.contains_key(INJECTED_ANNOTATION) || has_sidecar(pod) {
        return Decision::Skip(Skip::AlreadyInjected);
    }
    let opted_out = |map: Option<&BTreeMap<String, String>>| {
        map.and_then(|m| m.get(INJECT_ANNOTATION))
            .is_some_and(|v| matches!(v.trim(), "false" | "disabled"))
    };
    if opted_out(Some(&annotations)) || opted_out(pod.metadata.labels.as_ref()) {
        return Decision::Skip(Skip::OptedOut);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network == Some(true) {
        return Decision::Skip(Skip::HostNetwork);
    }
    let empty = BTreeMap::new();
    let namespace_labels = snapshot.namespaces.get(namespace).unwrap_or(&empty);
    let Some(governing) = governing_policy(pod, namespace, namespace_labels, snapshot) else {
        return Decision::Skip(Skip::NoPolicy);
    };
    let declared = declared_ports(pod);
    let (decoys, skipped) = decoys_for(governing.rules, &declared, SENSOR_METRICS_PORT);
    if decoys.is_empty() {
        return Decision::Skip(Skip::NoDecoysLeft);
    }
    let config_map = config_map_name(&governing, &skipped);
    let injected = injected_pod(pod, &governing, &decoys, &skipped, &config_map, settings);
    Decision::Inject(Box::new(Injection {
        policy: governing.reference(),
        config_map,
        skipped,
        pod: injected,
    }))
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.name == SIDECAR_NAME)
    })
}
