//! The sensor's configuration as ConfigMaps: the classic `portsentry.conf` and ignore file
//! rendered from a policy, one ConfigMap per policy and skipped-decoy set, and which are stale.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::Resource;
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PolicyRules, PortSentryPolicy, Protocol,
};

use super::{decoys::*, governing::*, sidecar::REPORT_CA_KEY};
use crate::{
    labels::{self, CONFIG_MAP_ANNOTATION, INJECTED_ANNOTATION, SKIPPED_ANNOTATION},
    names::{bounded, fnv1a64},
};

/// A config value that the classic parser takes back as written: one line, no inner quotes.
fn quoted(value: &str) -> String {
    let clean: String = value
        .chars()
        .map(|c| match c {
            '"' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    format!("\"{}\"", clean.trim())
}

/// The classic `portsentry.conf` of a policy for a pod whose declared ports made `skipped`
/// decoys collide. The sensor only detects and logs (`BLOCK_*="0"`): the operator bans.
pub fn render_sensor_config(rules: &PolicyRules, skipped: &[Skipped]) -> String {
    let declared: BTreeSet<(Protocol, u16)> =
        skipped.iter().map(|s| (s.protocol, s.port)).collect();
    let (decoys, _) = decoys_for(rules, &declared, SENSOR_METRICS_PORT);
    render_decoys(rules, &decoys)
}

fn render_decoys(rules: &PolicyRules, decoys: &Decoys) -> String {
    let mut lines = vec![
        "# Rendered by portsentry-operator from a PortSentryPolicy. Do not edit: the operator"
            .to_owned(),
        "# rewrites it. Check it with `portsentry-sensor check --config portsentry.conf`."
            .to_owned(),
        format!("TCP_PORTS={}", quoted(&port_list(&decoys.tcp))),
        format!("UDP_PORTS={}", quoted(&port_list(&decoys.udp))),
    ];
    if let Some(below) = decoys.tcp_below {
        lines.push(format!("ADVANCED_PORTS_TCP=\"{below}\""));
        lines.push(format!(
            "ADVANCED_EXCLUDE_TCP={}",
            quoted(&port_list(&decoys.exclude_tcp))
        ));
    }
    if let Some(below) = decoys.udp_below {
        lines.push(format!("ADVANCED_PORTS_UDP=\"{below}\""));
        lines.push(format!(
            "ADVANCED_EXCLUDE_UDP={}",
            quoted(&port_list(&decoys.exclude_udp))
        ));
    }
    let detection = &rules.detection;
    lines.extend([
        "IGNORE_FILE=\"portsentry.ignore\"".to_owned(),
        "RESOLVE_HOST=\"0\"".to_owned(),
        "BLOCK_TCP=\"0\"".to_owned(),
        "BLOCK_UDP=\"0\"".to_owned(),
        format!("SCAN_TRIGGER=\"{}\"", detection.scan_trigger),
        format!("SCAN_WINDOW={}", quoted(&detection.window.to_string())),
        "SCAN_DISTINCT_PORTS=\"1\"".to_owned(),
        format!(
            "BAN_UNVERIFIED=\"{}\"",
            u8::from(rules.response.ban_on_unverified)
        ),
    ]);
    if let Some(banner) = rules
        .decoys
        .banner
        .as_deref()
        .filter(|b| !b.trim().is_empty())
    {
        lines.push(format!("PORT_BANNER={}", quoted(banner)));
    }
    lines.join("\n") + "\n"
}

/// The ignore file next to the config: the policy's `detection.ignore`, one prefix a line.
pub fn render_ignore_file(rules: &PolicyRules) -> String {
    let mut text = String::from("# Sources never treated as scanners (detection.ignore).\n");
    for prefix in &rules.detection.ignore {
        text.push_str(&prefix.network().to_string());
        text.push('\n');
    }
    text
}

/// Name of the ConfigMap a pod's sidecar reads: one per policy, and one per distinct set of
/// skipped decoys (a suffix hashing the set), so pods that skip nothing share one.
pub fn config_map_name(governing: &Governing<'_>, skipped: &[Skipped]) -> String {
    let base = match governing.kind {
        PolicyKind::PortSentryPolicy => format!("portsentry-sensor-{}", governing.name),
        PolicyKind::ClusterPortSentryPolicy => {
            format!("portsentry-sensor-cluster-{}", governing.name)
        }
    };
    if skipped.is_empty() {
        return bounded(&base, 253);
    }
    let key = skipped_annotation(skipped);
    let hash = format!("{:08x}", fnv1a64(key.as_bytes()) as u32);
    format!("{}-{hash}", bounded(&base, 253 - 9))
}

/// The ConfigMap the operator applies for a policy and a set of skipped decoys (keys
/// `portsentry.conf`, `portsentry.ignore`, and `ca.crt`: the CA the sensor trusts for reports).
pub fn build_config_map(
    namespace: &str,
    name: &str,
    policy: &str,
    rules: &PolicyRules,
    skipped: &[Skipped],
    report_ca_pem: Option<&str>,
) -> ConfigMap {
    let mut data = BTreeMap::from([
        (
            "portsentry.conf".to_owned(),
            render_sensor_config(rules, skipped),
        ),
        ("portsentry.ignore".to_owned(), render_ignore_file(rules)),
    ]);
    if let Some(ca) = report_ca_pem {
        data.insert(REPORT_CA_KEY.to_owned(), ca.to_owned());
    }
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (
                    labels::MANAGED_BY_LABEL.to_owned(),
                    labels::MANAGER.to_owned(),
                ),
                (
                    labels::COMPONENT_LABEL.to_owned(),
                    labels::SENSOR_CONFIG_COMPONENT.to_owned(),
                ),
            ])),
            annotations: Some(BTreeMap::from([
                (INJECTED_ANNOTATION.to_owned(), policy.to_owned()),
                (SKIPPED_ANNOTATION.to_owned(), skipped_annotation(skipped)),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// What the operator adds to every sidecar's ConfigMap besides its policy's rules: set by
/// the chart (the operator's flags), never by a policy's author.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SidecarExtras<'a> {
    /// PEM CA bundle of the intake's certificate (key `ca.crt`).
    pub report_ca_pem: Option<&'a str>,
    /// `METRICS_PER_PORT="1"`: `hits_total` per decoy port (chart value
    /// `sensor.metricsPerPort`). Off by default: a per-port series names a decoy port to
    /// anyone who can reach the sidecar's metrics port.
    pub metrics_per_port: bool,
}

/// Every sensor ConfigMap a namespaced policy needs in its namespace: the base one (no skipped
/// decoys) always, so a pod admitted next finds it, and one per distinct skipped set among
/// `pods` the webhook injected for this policy (their [`CONFIG_MAP_ANNOTATION`] is exactly the
/// name [`config_map_name`] gives that set; other pods are ignored). Each is owned by the
/// policy (`controller: true`), so deleting the policy garbage-collects them.
pub fn sensor_config_maps(
    namespace: &str,
    policy: &PortSentryPolicy,
    pods: &[Pod],
    extras: SidecarExtras<'_>,
) -> Vec<ConfigMap> {
    let governing = Governing {
        kind: PolicyKind::PortSentryPolicy,
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        rules: &policy.spec.rules,
    };
    config_maps_for(
        namespace,
        &governing,
        policy.controller_owner_ref(&()),
        pods.iter().map(|pod| &pod.metadata),
        extras,
    )
}

/// Every sensor ConfigMap the sidecars a cluster policy injected need: in each namespace
/// where `pods` (metadata) holds a pod the webhook injected for this policy, the base one and
/// one per distinct skipped set there, as [`sensor_config_maps`] renders them for a
/// namespaced policy, each owned by the cluster policy (a namespaced object may have a
/// cluster-scoped owner, so deleting the policy garbage-collects them).
///
/// Only namespaces with such pods get any, not every namespace the `namespaceSelector`
/// matches: that keeps the count bounded by the pods that read them (a selector matching
/// thousands of namespaces writes nothing until pods are injected there), and a pod injected
/// into a namespace that stopped matching keeps its config. The first pod of a namespace
/// waits for its mount only until the reconcile its creation triggers has applied it.
pub fn cluster_sensor_config_maps(
    policy: &ClusterPortSentryPolicy,
    pods: &[ObjectMeta],
    extras: SidecarExtras<'_>,
) -> Vec<ConfigMap> {
    let governing = Governing {
        kind: PolicyKind::ClusterPortSentryPolicy,
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        rules: &policy.spec.rules,
    };
    let reference = governing.reference();
    let mut by_namespace: BTreeMap<&str, Vec<&ObjectMeta>> = BTreeMap::new();
    for pod in pods {
        let injected = pod
            .annotations
            .as_ref()
            .and_then(|a| a.get(INJECTED_ANNOTATION));
        if let (Some(namespace), true) = (pod.namespace.as_deref(), injected == Some(&reference)) {
            by_namespace.entry(namespace).or_default().push(pod);
        }
    }
    let owner = policy.controller_owner_ref(&());
    by_namespace
        .into_iter()
        .flat_map(|(namespace, pods)| {
            config_maps_for(namespace, &governing, owner.clone(), pods, extras)
        })
        .collect()
}

/// The base ConfigMap of `governing` in `namespace` and one per distinct skipped set among
/// the `pods` the webhook injected for it, owned (as controller) by `owner`.
fn config_maps_for<'a>(
    namespace: &str,
    governing: &Governing<'_>,
    owner: Option<OwnerReference>,
    pods: impl IntoIterator<Item = &'a ObjectMeta>,
    extras: SidecarExtras<'_>,
) -> Vec<ConfigMap> {
    let reference = governing.reference();
    let mut sets: BTreeMap<String, Vec<Skipped>> =
        BTreeMap::from([(config_map_name(governing, &[]), Vec::new())]);
    for pod in pods {
        let Some(annotations) = pod.annotations.as_ref() else {
            continue;
        };
        if annotations.get(INJECTED_ANNOTATION) != Some(&reference) {
            continue;
        }
        let Some(named) = annotations.get(CONFIG_MAP_ANNOTATION) else {
            continue;
        };
        let skipped = annotations
            .get(SKIPPED_ANNOTATION)
            .map(|value| parse_skipped_annotation(value))
            .unwrap_or_default();
        // A name that does not match (an annotation edited by hand, or written by another
        // operator version) is left alone rather than guessed at.
        if config_map_name(governing, &skipped) == *named {
            sets.entry(named.clone()).or_insert(skipped);
        }
    }
    let owner = owner.map(|owner| OwnerReference {
        controller: Some(true),
        block_owner_deletion: Some(true),
        ..owner
    });
    sets.into_iter()
        .map(|(name, skipped)| {
            let mut config_map = build_config_map(
                namespace,
                &name,
                &reference,
                governing.rules,
                &skipped,
                extras.report_ca_pem,
            );
            if extras.metrics_per_port
                && let Some(config) = config_map
                    .data
                    .as_mut()
                    .and_then(|data| data.get_mut("portsentry.conf"))
            {
                config.push_str("METRICS_PER_PORT=\"1\"\n");
            }
            config_map.metadata.owner_references = owner.clone().map(|o| vec![o]);
            config_map
        })
        .collect()
}

/// Names of the `existing` sensor ConfigMaps (metadata, listed by [`SENSOR_CONFIG_SELECTOR`])
/// that the object with `owner_uid` controls but that are not `wanted` any more: skip-specific
/// ones whose last pod is gone. Another owner's ConfigMaps (other policies, cluster policies)
/// and unowned ones are never stale here.
pub fn stale_config_maps(
    owner_uid: &str,
    wanted: &[ConfigMap],
    existing: &[ObjectMeta],
) -> Vec<String> {
    let wanted: BTreeSet<&str> = wanted
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    existing
        .iter()
        .filter(|meta| {
            meta.owner_references
                .iter()
                .flatten()
                .any(|owner| owner.uid == owner_uid && owner.controller == Some(true))
        })
        .filter_map(|meta| meta.name.as_deref())
        .filter(|name| !wanted.contains(name))
        .map(str::to_owned)
        .collect()
}

/// [`stale_config_maps`] across namespaces: (namespace, name) of the `existing` sensor
/// ConfigMaps (listed cluster-wide) that `owner_uid` controls and no namespace `wanted` any
/// more. A cluster policy's ConfigMaps in a namespace whose last injected pod is gone are all
/// stale, the base one included.
pub fn stale_config_maps_by_namespace(
    owner_uid: &str,
    wanted: &[ConfigMap],
    existing: &[ObjectMeta],
) -> Vec<(String, String)> {
    let namespaces: BTreeSet<&str> = existing
        .iter()
        .filter_map(|meta| meta.namespace.as_deref())
        .collect();
    namespaces
        .into_iter()
        .flat_map(|namespace| {
            let in_namespace = |ns: Option<&str>| ns == Some(namespace);
            let wanted: Vec<ConfigMap> = wanted
                .iter()
                .filter(|c| in_namespace(c.metadata.namespace.as_deref()))
                .cloned()
                .collect();
            let existing: Vec<ObjectMeta> = existing
                .iter()
                .filter(|m| in_namespace(m.namespace.as_deref()))
                .cloned()
                .collect();
            stale_config_maps(owner_uid, &wanted, &existing)
                .into_iter()
                .map(move |name| (namespace.to_owned(), name))
        })
        .collect()
}
