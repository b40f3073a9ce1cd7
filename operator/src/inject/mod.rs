//! Sidecar injection as pure functions: which policy governs a pod, the RFC 6902 patch that adds
//! the `portsentry-sensor` native sidecar, and the classic `portsentry.conf` rendered from a policy.
//!
//! # Decoys below 1024: the pod sysctl, not `NET_BIND_SERVICE`
//!
//! The sidecar runs as UID 65532 with `allowPrivilegeEscalation: false`. A capability added
//! to a non-root container is only in its bounding set: container runtimes set no ambient
//! capabilities (kubernetes/kubernetes#56374, KEP-2763), and `no_new_privs` (what
//! `allowPrivilegeEscalation: false` sets) makes the kernel ignore file capabilities on
//! `execve`. So `NET_BIND_SERVICE` would not let a non-root sensor bind port 1; the only way
//! to keep it would be to run the sensor as root. The pod sysctl
//! `net.ipv4.ip_unprivileged_port_start` instead is namespaced to the pod's network
//! namespace, on Kubernetes' safe-sysctl list (allowed by the baseline and restricted Pod
//! Security Standards, no kubelet flag needed), and works for a non-root process with every
//! capability dropped. It is set only when a bound decoy is below 1024, to the lowest such
//! port (never raised when the pod already sets it lower). Its cost: the pod's other
//! containers may then bind those ports too, which is within the pod's own trust boundary.
//!
//! # Stealth: root with `NET_RAW` only
//!
//! Raw-socket modes (`stealth`, `advanced`) need `NET_RAW` in the effective set, which for
//! the same reason only UID 0 gets. Such sidecars run as UID 0 with every capability dropped
//! but `NET_RAW`, a read-only root filesystem and no privilege escalation; all others run
//! non-root with no capabilities at all.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMap, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
        ObjectFieldSelector, Pod, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
        Volume, VolumeMount,
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Resource,
    core::{Selector, SelectorExt},
};
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PolicyRules, PortRange, PortSentryPolicy, Protocol,
};
use serde_json::{Value, json};

use crate::names::{bounded, fnv1a64};

/// `"false"` as an annotation (or label) of a pod or its template opts it out of injection.
pub const INJECT_ANNOTATION: &str = "portsentry.io/inject";
/// Label set on injected pods (value `injected`): what the chart's PodMonitor selects.
pub const SENSOR_LABEL: &str = "portsentry.io/sensor";
/// Set on injected pods (value: the governing policy); re-invocation then injects nothing.
pub const INJECTED_ANNOTATION: &str = "portsentry.io/injected";
/// The ConfigMap the sidecar reads its config from (so the operator knows what to render).
pub const CONFIG_MAP_ANNOTATION: &str = "portsentry.io/sensor-config";
/// Decoys left out because a container declares the port: `"80/TCP,53/UDP"`.
pub const SKIPPED_ANNOTATION: &str = "portsentry.io/skipped-decoys";
/// Name of the injected native sidecar.
pub const SIDECAR_NAME: &str = "portsentry-sensor";
/// Audience of the sensor's projected service account token.
pub const TOKEN_AUDIENCE: &str = "portsentry.io";
/// Where the config volume is mounted; the config file is `portsentry.conf` in it.
pub const CONFIG_DIR: &str = "/etc/portsentry";
/// Where the projected token volume is mounted; the token file is `token` in it.
pub const TOKEN_DIR: &str = "/var/run/secrets/portsentry.io";
/// Volume names added to the pod.
pub const CONFIG_VOLUME: &str = "portsentry-config";
pub const TOKEN_VOLUME: &str = "portsentry-token";
/// The pod sysctl that lets a non-root sensor bind decoys below 1024.
pub const UNPRIVILEGED_PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";
/// Namespaces never injected, whatever a policy selects.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];
/// Port of the sensor's /metrics, /healthz and /readyz in the pod; never a TCP decoy.
pub const SENSOR_METRICS_PORT: u16 = 9720;
/// UID/GID of the non-root sensor (distroless `nonroot`).
pub const SENSOR_UID: i64 = 65532;

/// How sidecars are built; from the operator's flags (chart values).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Sensor image, e.g. `ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0`.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The operator's own namespace: never injected.
    pub operator_namespace: String,
    /// Where sensors POST their reports (`https://.../v1/reports`).
    pub report_url: String,
    /// Requests and limits of the sidecar.
    pub resources: ResourceRequirements,
    /// Lifetime of the projected token; the kubelet renews it at 80%.
    pub token_expiry_seconds: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0".into(),
            image_pull_policy: None,
            operator_namespace: "portsentry-system".into(),
            report_url: "https://portsentry-operator.portsentry-system.svc:8443/v1/reports".into(),
            resources: ResourceRequirements::default(),
            token_expiry_seconds: 3600,
        }
    }
}

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

/// A decoy left out because a container of the pod declares its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}

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
    Inject(Injection),
}

/// An injection: the patch, and what the caller reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    /// `PortSentryPolicy/name` or `ClusterPortSentryPolicy/name`.
    pub policy: String,
    /// The ConfigMap (in the pod's namespace) the sidecar reads.
    pub config_map: String,
    pub skipped: Vec<Skipped>,
    pub patch: json_patch::Patch,
}

/// Decides whether `pod` in `namespace` gets a sensor and builds the patch if so.
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
    let patch = build_patch(pod, &governing, &decoys, &skipped, &config_map, settings);
    Decision::Inject(Injection {
        policy: governing.reference(),
        config_map,
        skipped,
        patch,
    })
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

/// Every (port, protocol) a container or init container of the pod declares.
pub fn declared_ports(pod: &Pod) -> BTreeSet<(Protocol, u16)> {
    let Some(spec) = pod.spec.as_ref() else {
        return BTreeSet::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p: &ContainerPort| {
            let port = u16::try_from(p.container_port).ok()?;
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            Some((protocol, port))
        })
        .collect()
}

/// The decoys of a pod: what the policy names, minus declared ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoys {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
    /// Advanced (raw) modes: watch every port below these, except `exclude_*`.
    pub tcp_below: Option<u16>,
    pub udp_below: Option<u16>,
    pub exclude_tcp: BTreeSet<u16>,
    pub exclude_udp: BTreeSet<u16>,
    /// Watch `tcp`/`udp` with raw sockets instead of binding them.
    pub stealth: bool,
}

impl Decoys {
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty()
            && self.udp.is_empty()
            && self.tcp_below.is_none()
            && self.udp_below.is_none()
    }

    /// True when the sensor needs raw sockets (`NET_RAW`).
    pub fn raw(&self) -> bool {
        self.stealth || self.tcp_below.is_some() || self.udp_below.is_some()
    }

    /// The lowest port the sensor binds (connect modes), when it is below 1024.
    pub fn lowest_privileged_bind(&self) -> Option<u16> {
        if self.stealth {
            return None;
        }
        self.tcp
            .iter()
            .chain(self.udp.iter())
            .copied()
            .filter(|p| *p < 1024)
            .min()
    }
}

/// The pod's decoys given the policy and the ports its containers declare, and the decoys
/// skipped because of them (in port order). The sensor's metrics port is never a decoy.
pub fn decoys_for(
    rules: &PolicyRules,
    declared: &BTreeSet<(Protocol, u16)>,
    metrics_port: u16,
) -> (Decoys, Vec<Skipped>) {
    let wanted = |protocol: Protocol, preset: &[u16], explicit: &[PortRange]| -> BTreeSet<u16> {
        preset
            .iter()
            .copied()
            .chain(portsentry_crds::expand(explicit))
            .filter(|p| !(protocol == Protocol::Tcp && *p == metrics_port))
            .collect()
    };
    let decoys = &rules.decoys;
    let tcp = wanted(
        Protocol::Tcp,
        decoys.preset.map(|p| p.tcp()).unwrap_or_default(),
        &decoys.tcp,
    );
    let udp = wanted(
        Protocol::Udp,
        decoys.preset.map(|p| p.udp()).unwrap_or_default(),
        &decoys.udp,
    );
    let mut skipped = BTreeSet::new();
    let mut keep = |protocol: Protocol, ports: BTreeSet<u16>| -> BTreeSet<u16> {
        ports
            .into_iter()
            .filter(|port| {
                let taken = declared.contains(&(protocol, *port));
                if taken {
                    skipped.insert(Skipped {
                        port: *port,
                        protocol,
                    });
                }
                !taken
            })
            .collect()
    };
    let tcp = keep(Protocol::Tcp, tcp);
    let udp = keep(Protocol::Udp, udp);
    let advanced = decoys.advanced.clone().unwrap_or_default();
    let exclude = |protocol: Protocol, below: Option<u16>, listed: &[PortRange]| -> BTreeSet<u16> {
        let mut ports = portsentry_crds::expand(listed);
        if let Some(below) = below {
            ports.extend(
                declared
                    .iter()
                    .filter(|(p, port)| *p == protocol && *port < below)
                    .map(|(_, port)| *port),
            );
            if protocol == Protocol::Tcp && metrics_port < below {
                ports.insert(metrics_port);
            }
        }
        ports
    };
    for (protocol, below) in [
        (Protocol::Tcp, advanced.tcp_below),
        (Protocol::Udp, advanced.udp_below),
    ] {
        if let Some(below) = below {
            skipped.extend(
                declared
                    .iter()
                    .filter(|(p, port)| *p == protocol && *port < below)
                    .map(|(protocol, port)| Skipped {
                        port: *port,
                        protocol: *protocol,
                    }),
            );
        }
    }
    let result = Decoys {
        tcp,
        udp,
        tcp_below: advanced.tcp_below,
        udp_below: advanced.udp_below,
        exclude_tcp: exclude(Protocol::Tcp, advanced.tcp_below, &advanced.exclude_tcp),
        exclude_udp: exclude(Protocol::Udp, advanced.udp_below, &advanced.exclude_udp),
        stealth: decoys.stealth,
    };
    let mut skipped: Vec<Skipped> = skipped.into_iter().collect();
    skipped.sort_by_key(|s| (s.port, s.protocol));
    (result, skipped)
}

/// A port set as PortSentry's comma-separated list, adjacent ports merged into ranges.
pub fn port_list(ports: &BTreeSet<u16>) -> String {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for &port in ports {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(port) => *end = port,
            _ => ranges.push((port, port)),
        }
    }
    ranges
        .iter()
        .map(|(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

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

/// The sensor's arguments: the config, one mode flag per watched kind, JSON logs, metrics.
pub fn sensor_args(decoys: &Decoys, metrics_port: u16) -> Vec<String> {
    let mut args = vec![
        "--config".to_owned(),
        format!("{CONFIG_DIR}/portsentry.conf"),
    ];
    let (tcp, udp) = if decoys.stealth {
        ("--stcp", "--sudp")
    } else {
        ("--tcp", "--udp")
    };
    if !decoys.tcp.is_empty() {
        args.push(tcp.to_owned());
    }
    if !decoys.udp.is_empty() {
        args.push(udp.to_owned());
    }
    if decoys.tcp_below.is_some() {
        args.push("--atcp".to_owned());
    }
    if decoys.udp_below.is_some() {
        args.push("--audp".to_owned());
    }
    args.extend([
        "--log-format".to_owned(),
        "json".to_owned(),
        "--metrics-addr".to_owned(),
        format!("0.0.0.0:{metrics_port}"),
    ]);
    args
}

/// The sensor's report flags: the operator's intake, the projected token, the intake's CA
/// (key `ca.crt` of the config ConfigMap) and the governing policy. None without a URL.
pub fn report_args(policy: &str, settings: &Settings) -> Vec<String> {
    if settings.report_url.trim().is_empty() {
        return Vec::new();
    }
    vec![
        "--report-url".to_owned(),
        settings.report_url.clone(),
        "--report-token-file".to_owned(),
        format!("{TOKEN_DIR}/token"),
        "--report-ca-file".to_owned(),
        format!("{CONFIG_DIR}/{REPORT_CA_KEY}"),
        "--report-policy".to_owned(),
        policy.to_owned(),
    ]
}

/// Key of the config ConfigMap holding the PEM CA of the operator's intake certificate.
pub const REPORT_CA_KEY: &str = "ca.crt";

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

/// The skipped-decoys annotation value: `"80/TCP,53/UDP"`.
pub fn skipped_annotation(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a skipped-decoys annotation back (unknown items are left out).
pub fn parse_skipped_annotation(value: &str) -> Vec<Skipped> {
    value
        .split(',')
        .filter_map(|item| {
            let (port, protocol) = item.trim().split_once('/')?;
            let protocol = match protocol {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            Some(Skipped {
                port: port.parse().ok()?,
                protocol,
            })
        })
        .collect()
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
                    "app.kubernetes.io/managed-by".to_owned(),
                    "portsentry-operator".to_owned(),
                ),
                (
                    "app.kubernetes.io/component".to_owned(),
                    "sensor-config".to_owned(),
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

/// Every sensor ConfigMap a namespaced policy needs in its namespace: the base one (no skipped
/// decoys) always, so a pod admitted next finds it, and one per distinct skipped set among
/// `pods` the webhook injected for this policy (their [`CONFIG_MAP_ANNOTATION`] is exactly the
/// name [`config_map_name`] gives that set; other pods are ignored). Each is owned by the
/// policy (`controller: true`), so deleting the policy garbage-collects them.
pub fn sensor_config_maps(
    namespace: &str,
    policy: &PortSentryPolicy,
    pods: &[Pod],
    report_ca_pem: Option<&str>,
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
        report_ca_pem,
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
    report_ca_pem: Option<&str>,
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
            config_maps_for(namespace, &governing, owner.clone(), pods, report_ca_pem)
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
    report_ca_pem: Option<&str>,
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
                report_ca_pem,
            );
            config_map.metadata.owner_references = owner.clone().map(|o| vec![o]);
            config_map
        })
        .collect()
}

/// Label selector of every sensor ConfigMap the operator renders ([`build_config_map`]).
pub const SENSOR_CONFIG_SELECTOR: &str =
    "app.kubernetes.io/managed-by=portsentry-operator,app.kubernetes.io/component=sensor-config";

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

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                // What the API server defaults it to: the stored pod equals the patch.
                api_version: Some("v1".to_owned()),
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

/// The locked-down security context of the sidecar (see the module doc for raw modes).
pub fn sensor_security_context(raw: bool) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(!raw),
        run_as_user: Some(if raw { 0 } else { SENSOR_UID }),
        run_as_group: Some(if raw { 0 } else { SENSOR_UID }),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: raw.then(|| vec!["NET_RAW".to_owned()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The native sidecar: an init container with `restartPolicy: Always` and a startup probe
/// on `/readyz`, so the pod's next containers start once the decoys listen.
pub fn sidecar(decoys: &Decoys, policy: &str, settings: &Settings) -> Container {
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(
            sensor_args(decoys, SENSOR_METRICS_PORT)
                .into_iter()
                .chain(report_args(policy, settings))
                .collect(),
        ),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("sensor-metrics".to_owned()),
            container_port: i32::from(SENSOR_METRICS_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
        ]),
        resources: Some(settings.resources.clone()),
        security_context: Some(sensor_security_context(decoys.raw())),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".to_owned()),
                port: IntOrString::Int(i32::from(SENSOR_METRICS_PORT)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            timeout_seconds: Some(1),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_owned()),
                port: IntOrString::Int(i32::from(SENSOR_METRICS_PORT)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CONFIG_VOLUME.to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// The config volume (the ConfigMap) and the projected token volume.
pub fn volumes(config_map: &str, settings: &Settings) -> Vec<Volume> {
    serde_json::from_value(json!([
        {
            "name": CONFIG_VOLUME,
            "configMap": {"name": config_map, "defaultMode": 0o444}
        },
        {
            "name": TOKEN_VOLUME,
            "projected": {"defaultMode": 0o444, "sources": [{"serviceAccountToken": {
                "audience": TOKEN_AUDIENCE,
                "expirationSeconds": settings.token_expiry_seconds,
                "path": "token"
            }}]}
        }
    ]))
    .unwrap_or_default()
}

/// JSON Pointer escaping of one reference token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The RFC 6902 patch that injects the sensor into `pod`.
pub fn build_patch(
    pod: &Pod,
    governing: &Governing<'_>,
    decoys: &Decoys,
    skipped: &[Skipped],
    config_map: &str,
    settings: &Settings,
) -> json_patch::Patch {
    let policy = governing.reference();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops: Vec<Value> = Vec::new();
    let mut annotations = vec![
        (INJECTED_ANNOTATION, policy.clone()),
        (CONFIG_MAP_ANNOTATION, config_map.to_owned()),
    ];
    if !skipped.is_empty() {
        annotations.push((SKIPPED_ANNOTATION, skipped_annotation(skipped)));
    }
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (key, value) in annotations {
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(key)), "value": value}));
    }
    if pod.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", escape(SENSOR_LABEL)), "value": "injected"}));
    let container = to_value(&sidecar(decoys, &policy, settings));
    if spec.init_containers.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
    }
    let volumes: Vec<Value> = volumes(config_map, settings).iter().map(to_value).collect();
    if spec.volumes.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    } else {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    }
    if let Some(port) = decoys.lowest_privileged_bind() {
        let sysctl = json!({"name": UNPRIVILEGED_PORT_SYSCTL, "value": port.to_string()});
        match spec.security_context.as_ref().map(|c| c.sysctls.as_ref()) {
            None => ops.push(json!({"op": "add", "path": "/spec/securityContext", "value": {"sysctls": [sysctl]}})),
            Some(None) => ops.push(json!({"op": "add", "path": "/spec/securityContext/sysctls", "value": [sysctl]})),
            Some(Some(sysctls)) => match sysctls
                .iter()
                .position(|s| s.name == UNPRIVILEGED_PORT_SYSCTL)
            {
                None => ops.push(json!({"op": "add", "path": "/spec/securityContext/sysctls/-", "value": sysctl})),
                Some(index) => {
                    let current = sysctls[index].value.trim().parse::<u32>().unwrap_or(u32::MAX);
                    if current > u32::from(port) {
                        ops.push(json!({"op": "replace", "path": format!("/spec/securityContext/sysctls/{index}/value"), "value": port.to_string()}));
                    }
                }
            },
        }
    }
    serde_json::from_value(Value::Array(ops)).unwrap_or_else(|_| json_patch::Patch(Vec::new()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::core::v1::{PodSecurityContext, PodSpec, Sysctl};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::ResourceExt;
    use portsentry_crds::{
        AdvancedDecoys, ClusterPortSentryPolicySpec, Decoys as PolicyDecoys, PortSentryPolicySpec,
        Preset,
    };

    const NS: &str = "shop";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn rules(tcp: &[u16], udp: &[u16]) -> PolicyRules {
        PolicyRules {
            decoys: PolicyDecoys {
                tcp: tcp.iter().map(|p| PortRange::single(*p).unwrap()).collect(),
                udp: udp.iter().map(|p| PortRange::single(*p).unwrap()).collect(),
                ..PolicyDecoys::default()
            },
            ..PolicyRules::default()
        }
    }

    fn policy(
        name: &str,
        namespace: &str,
        selector: &[(&str, &str)],
        rules: PolicyRules,
    ) -> PortSentryPolicy {
        let mut policy = PortSentryPolicy::new(
            name,
            PortSentryPolicySpec {
                pod_selector: LabelSelector {
                    match_labels: Some(labels(selector)),
                    match_expressions: None,
                },
                rules,
            },
        );
        policy.metadata.namespace = Some(namespace.to_owned());
        policy
    }

    fn snapshot(policies: Vec<PortSentryPolicy>) -> Snapshot {
        Snapshot {
            policies,
            cluster_policies: Vec::new(),
            namespaces: BTreeMap::from([(NS.to_owned(), labels(&[("team", "shop")]))]),
        }
    }

    fn pod(pod_labels: &[(&str, &str)], ports: &[(i32, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some(NS.into()),
                labels: Some(labels(pod_labels)),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("nginx".into()),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(port, protocol)| ContainerPort {
                                container_port: *port,
                                protocol: Some((*protocol).to_owned()),
                                ..ContainerPort::default()
                            })
                            .collect(),
                    ),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    fn web_snapshot() -> Snapshot {
        snapshot(vec![policy(
            "web",
            NS,
            &[("app", "web")],
            rules(&[1, 8080, 31337], &[7]),
        )])
    }

    fn injection(decision: Decision) -> Injection {
        match decision {
            Decision::Inject(injection) => injection,
            Decision::Skip(skip) => panic!("expected an injection, got {skip:?}"),
        }
    }

    fn patched(pod: &Pod, injection: &Injection) -> Pod {
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, &injection.patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn injected_sidecar(pod: &Pod) -> Container {
        pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].clone()
    }

    #[test]
    fn a_pod_selected_by_a_policy_gets_a_native_sidecar_first_in_init_containers() {
        let pod = pod(&[("app", "web")], &[]);
        let injection = injection(decide(&pod, NS, &web_snapshot(), &Settings::default()));
        let after = patched(&pod, &injection);
        let sidecar = injected_sidecar(&after);
        assert_eq!(sidecar.name, SIDECAR_NAME);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(injection.policy, "PortSentryPolicy/web");
    }

    #[test]
    fn the_sidecar_is_placed_before_existing_init_containers() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.spec.as_mut().unwrap().init_containers = Some(vec![Container {
            name: "migrate".into(),
            ..Container::default()
        }]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let names: Vec<String> = after
            .spec
            .unwrap()
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, [SIDECAR_NAME, "migrate"]);
    }

    #[test]
    fn the_startup_probe_waits_for_readyz_on_the_metrics_port() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let probe = injected_sidecar(&after)
            .startup_probe
            .unwrap()
            .http_get
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/readyz"));
        assert_eq!(probe.port, IntOrString::Int(9720));
        assert!(
            injected_sidecar(&after)
                .args
                .unwrap()
                .contains(&"0.0.0.0:9720".to_owned())
        );
    }

    #[test]
    fn the_sensor_reports_to_the_operator_for_its_policy_with_the_projected_token() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let args = injected_sidecar(&after).args.unwrap();
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].clone())
        };
        assert_eq!(value("--report-url"), Some(Settings::default().report_url));
        assert_eq!(
            value("--report-token-file").as_deref(),
            Some("/var/run/secrets/portsentry.io/token")
        );
        assert_eq!(
            value("--report-ca-file").as_deref(),
            Some("/etc/portsentry/ca.crt")
        );
        assert_eq!(
            value("--report-policy").as_deref(),
            Some("PortSentryPolicy/web")
        );
    }

    #[test]
    fn without_a_report_url_the_sensor_only_detects() {
        let settings = Settings {
            report_url: String::new(),
            ..Settings::default()
        };
        assert!(report_args("PortSentryPolicy/web", &settings).is_empty());
    }

    #[test]
    fn the_config_map_carries_the_intake_ca_when_given() {
        let rules = rules(&[1], &[]);
        let with = build_config_map(
            NS,
            "portsentry-sensor-web",
            "PortSentryPolicy/web",
            &rules,
            &[],
            Some("PEM"),
        );
        assert_eq!(with.data.unwrap()[REPORT_CA_KEY], "PEM");
        let without = build_config_map(
            NS,
            "portsentry-sensor-web",
            "PortSentryPolicy/web",
            &rules,
            &[],
            None,
        );
        assert!(!without.data.unwrap().contains_key(REPORT_CA_KEY));
    }

    #[test]
    fn a_pod_no_policy_selects_is_left_alone() {
        let pod = pod(&[("app", "db")], &[]);
        assert_eq!(
            decide(&pod, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::NoPolicy)
        );
    }

    #[test]
    fn a_policy_of_another_namespace_does_not_select_the_pod() {
        let snapshot = snapshot(vec![policy("web", "other", &[], rules(&[1], &[]))]);
        let pod = pod(&[("app", "web")], &[]);
        assert_eq!(
            decide(&pod, NS, &snapshot, &Settings::default()),
            Decision::Skip(Skip::NoPolicy)
        );
    }

    #[test]
    fn system_namespaces_are_never_injected() {
        let everything = Snapshot {
            policies: SYSTEM_NAMESPACES
                .iter()
                .map(|ns| policy("all", ns, &[], rules(&[1], &[])))
                .collect(),
            ..Snapshot::default()
        };
        for namespace in SYSTEM_NAMESPACES {
            let pod = pod(&[], &[]);
            assert_eq!(
                decide(&pod, namespace, &everything, &Settings::default()),
                Decision::Skip(Skip::SystemNamespace)
            );
        }
    }

    #[test]
    fn the_operators_own_namespace_is_never_injected() {
        let settings = Settings::default();
        let snapshot = snapshot(vec![policy(
            "all",
            &settings.operator_namespace,
            &[],
            rules(&[1], &[]),
        )]);
        assert_eq!(
            decide(
                &pod(&[], &[]),
                &settings.operator_namespace,
                &snapshot,
                &settings
            ),
            Decision::Skip(Skip::OperatorNamespace)
        );
    }

    #[test]
    fn the_opt_out_annotation_is_honoured() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.metadata.annotations = Some(labels(&[(INJECT_ANNOTATION, "false")]));
        assert_eq!(
            decide(&pod, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::OptedOut)
        );
    }

    #[test]
    fn the_opt_out_label_is_honoured_too() {
        let pod = pod(&[("app", "web"), (INJECT_ANNOTATION, "false")], &[]);
        assert_eq!(
            decide(&pod, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::OptedOut)
        );
    }

    #[test]
    fn injected_pods_are_labelled_for_the_pod_monitor() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let labels = after.metadata.labels.unwrap();
        assert_eq!(labels[SENSOR_LABEL], "injected");
        assert_eq!(labels["app"], "web");
    }

    #[test]
    fn a_pod_injected_once_is_not_injected_again() {
        let pod = pod(&[("app", "web")], &[]);
        let once = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        assert_eq!(
            decide(&once, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn a_pod_carrying_the_injected_annotation_is_not_injected() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.metadata.annotations = Some(labels(&[(INJECTED_ANNOTATION, "PortSentryPolicy/web")]));
        assert_eq!(
            decide(&pod, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::AlreadyInjected)
        );
    }

    #[test]
    fn host_network_pods_are_left_to_node_sensors() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            decide(&pod, NS, &web_snapshot(), &Settings::default()),
            Decision::Skip(Skip::HostNetwork)
        );
    }

    fn owned_web_policy() -> PortSentryPolicy {
        let mut web = web_snapshot().policies.remove(0);
        web.metadata.uid = Some("0b4c6d6e-0000-4000-8000-000000000001".into());
        web
    }

    /// `pod` as the webhook admitted it under [`web_snapshot`].
    fn admitted(pod: &Pod) -> Pod {
        let injection = injection(decide(pod, NS, &web_snapshot(), &Settings::default()));
        patched(pod, &injection)
    }

    fn names(config_maps: &[ConfigMap]) -> Vec<String> {
        config_maps.iter().map(|c| c.name_any()).collect()
    }

    #[test]
    fn sensor_config_maps_always_include_the_base_one_owned_by_the_policy() {
        let config_maps = sensor_config_maps(NS, &owned_web_policy(), &[], None);
        assert_eq!(names(&config_maps), ["portsentry-sensor-web"]);
        let owner = &config_maps[0].metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("PortSentryPolicy", "web", Some(true))
        );
        assert_eq!(
            config_maps[0].labels()["app.kubernetes.io/managed-by"],
            crate::netpol::MANAGER
        );
    }

    #[test]
    fn sensor_config_maps_render_a_pods_skipped_decoys_out_of_its_config() {
        let pod = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
        let config_maps = sensor_config_maps(NS, &owned_web_policy(), &[pod], None);
        assert_eq!(config_maps.len(), 2);
        let hashed = config_maps
            .iter()
            .find(|c| c.name_any() != "portsentry-sensor-web")
            .unwrap();
        let config = &hashed.data.as_ref().unwrap()["portsentry.conf"];
        assert!(config.contains("TCP_PORTS=\"1,31337\""), "{config}");
    }

    #[test]
    fn sensor_config_maps_share_one_config_map_per_skipped_set() {
        let one = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
        let two = admitted(&pod(&[("app", "web")], &[(8080, "TCP"), (9000, "TCP")]));
        let config_maps = sensor_config_maps(NS, &owned_web_policy(), &[one, two], None);
        assert_eq!(config_maps.len(), 2);
    }

    #[test]
    fn sensor_config_maps_are_named_as_the_webhook_annotated_the_pods() {
        let pods = [
            admitted(&pod(&[("app", "web")], &[])),
            admitted(&pod(&[("app", "web")], &[(8080, "TCP")])),
            admitted(&pod(&[("app", "web")], &[(7, "UDP"), (1, "TCP")])),
        ];
        let annotated: BTreeSet<String> = pods
            .iter()
            .map(|p| p.annotations()[CONFIG_MAP_ANNOTATION].clone())
            .collect();
        let config_maps = sensor_config_maps(NS, &owned_web_policy(), &pods, None);
        assert_eq!(
            names(&config_maps).into_iter().collect::<BTreeSet<_>>(),
            annotated
        );
    }

    #[test]
    fn a_skip_specific_config_map_no_pod_uses_any_more_is_stale() {
        let policy = owned_web_policy();
        let pod = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
        let with_pod = sensor_config_maps(NS, &policy, &[pod], None);
        let existing: Vec<ObjectMeta> = with_pod.iter().map(|c| c.metadata.clone()).collect();
        let without_pod = sensor_config_maps(NS, &policy, &[], None);
        let uid = policy.metadata.uid.as_deref().unwrap();
        let stale = stale_config_maps(uid, &without_pod, &existing);
        let skip_specific: Vec<String> = names(&with_pod)
            .into_iter()
            .filter(|n| n != "portsentry-sensor-web")
            .collect();
        assert_eq!(stale, skip_specific);
        assert!(stale_config_maps(uid, &with_pod, &existing).is_empty());
    }

    fn owned_cluster_policy() -> ClusterPortSentryPolicy {
        let mut cluster = ClusterPortSentryPolicy::new(
            "edge",
            ClusterPortSentryPolicySpec {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(labels(&[("team", "shop")])),
                    match_expressions: None,
                }),
                pod_selector: None,
                node_selector: None,
                rules: rules(&[1, 8080, 31337], &[7]),
            },
        );
        cluster.metadata.uid = Some("0b4c6d6e-0000-4000-8000-00000000c1c1".into());
        cluster
    }

    /// The metadata of `pod` as the webhook admitted it under [`owned_cluster_policy`].
    fn admitted_by_cluster(pod: &Pod) -> ObjectMeta {
        let snapshot = Snapshot {
            cluster_policies: vec![owned_cluster_policy()],
            ..snapshot(Vec::new())
        };
        let injection = injection(decide(pod, NS, &snapshot, &Settings::default()));
        patched(pod, &injection).metadata
    }

    #[test]
    fn a_cluster_policy_renders_config_maps_only_in_namespaces_with_pods_it_injected() {
        let policy = owned_cluster_policy();
        let injected = admitted_by_cluster(&pod(&[], &[]));
        let mut not_injected = pod(&[], &[]).metadata;
        not_injected.namespace = Some("other".into());
        let config_maps = cluster_sensor_config_maps(&policy, &[injected, not_injected], None);
        let placed: Vec<(String, String)> = config_maps
            .iter()
            .map(|c| (c.namespace().unwrap(), c.name_any()))
            .collect();
        assert_eq!(
            placed,
            [(NS.to_owned(), "portsentry-sensor-cluster-edge".to_owned())]
        );
        assert!(cluster_sensor_config_maps(&policy, &[], None).is_empty());
    }

    #[test]
    fn a_cluster_policys_config_maps_are_owned_by_it_and_named_as_the_webhook_annotated_the_pods() {
        let policy = owned_cluster_policy();
        let pods = [
            admitted_by_cluster(&pod(&[], &[])),
            admitted_by_cluster(&pod(&[], &[(8080, "TCP")])),
        ];
        let config_maps = cluster_sensor_config_maps(&policy, &pods, Some("PEM"));
        let annotated: BTreeSet<String> = pods
            .iter()
            .map(|p| p.annotations.as_ref().unwrap()[CONFIG_MAP_ANNOTATION].clone())
            .collect();
        assert_eq!(
            names(&config_maps).into_iter().collect::<BTreeSet<_>>(),
            annotated
        );
        for config_map in &config_maps {
            let owner = &config_map.metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("ClusterPortSentryPolicy", "edge", Some(true))
            );
            assert_eq!(config_map.data.as_ref().unwrap()[REPORT_CA_KEY], "PEM");
        }
    }

    #[test]
    fn a_cluster_policys_config_maps_are_stale_where_its_last_pod_is_gone() {
        let policy = owned_cluster_policy();
        let uid = policy.metadata.uid.as_deref().unwrap();
        let plain = admitted_by_cluster(&pod(&[], &[]));
        let skipping = admitted_by_cluster(&pod(&[], &[(8080, "TCP")]));
        let mut elsewhere = plain.clone();
        elsewhere.namespace = Some("other".into());
        let before = cluster_sensor_config_maps(
            &policy,
            &[plain.clone(), skipping, elsewhere.clone()],
            None,
        );
        let existing: Vec<ObjectMeta> = before.iter().map(|c| c.metadata.clone()).collect();
        // The pod that skipped 8080 is gone: its ConfigMap is stale, the base one stays.
        let wanted = cluster_sensor_config_maps(&policy, &[plain.clone(), elsewhere], None);
        let stale = stale_config_maps_by_namespace(uid, &wanted, &existing);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, NS);
        assert_ne!(stale[0].1, "portsentry-sensor-cluster-edge");
        // The only pod of "other" is gone too: its base ConfigMap goes as well.
        let wanted = cluster_sensor_config_maps(&policy, &[plain], None);
        let stale = stale_config_maps_by_namespace(uid, &wanted, &existing);
        assert!(stale.contains(&(
            "other".to_owned(),
            "portsentry-sensor-cluster-edge".to_owned()
        )));
        assert_eq!(stale.len(), 2);
    }

    #[test]
    fn config_maps_of_other_owners_are_never_stale() {
        let policy = owned_web_policy();
        let pod = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
        let mut existing: Vec<ObjectMeta> = sensor_config_maps(NS, &policy, &[pod], None)
            .into_iter()
            .map(|c| c.metadata)
            .collect();
        // One owned by another policy, one whose owner is not its controller, one unowned.
        existing[0].owner_references.as_mut().unwrap()[0].uid = "another-uid".into();
        existing[1].owner_references.as_mut().unwrap()[0].controller = None;
        existing.push(ObjectMeta {
            name: Some("portsentry-sensor-cluster-all".into()),
            ..ObjectMeta::default()
        });
        let uid = policy.metadata.uid.as_deref().unwrap();
        assert!(stale_config_maps(uid, &[], &existing).is_empty());
    }

    #[test]
    fn a_decoy_a_container_declares_is_skipped_and_returned() {
        let pod = pod(&[("app", "web")], &[(8080, "TCP"), (7, "TCP")]);
        let injection = injection(decide(&pod, NS, &web_snapshot(), &Settings::default()));
        assert_eq!(
            injection.skipped,
            [Skipped {
                port: 8080,
                protocol: Protocol::Tcp
            }]
        );
        let after = patched(&pod, &injection);
        let annotations = after.metadata.annotations.unwrap();
        assert_eq!(annotations[SKIPPED_ANNOTATION], "8080/TCP");
        assert_eq!(annotations[CONFIG_MAP_ANNOTATION], injection.config_map);
    }

    #[test]
    fn the_config_leaves_out_skipped_decoys() {
        let config = render_sensor_config(
            &rules(&[1, 8080, 31337], &[7]),
            &[Skipped {
                port: 8080,
                protocol: Protocol::Tcp,
            }],
        );
        assert!(config.contains("TCP_PORTS=\"1,31337\"\n"), "{config}");
        assert!(config.contains("UDP_PORTS=\"7\"\n"), "{config}");
    }

    #[test]
    fn pods_skipping_different_decoys_read_different_config_maps() {
        let governing = Governing {
            kind: PolicyKind::PortSentryPolicy,
            name: "web",
            rules: &PolicyRules::default(),
        };
        let none = config_map_name(&governing, &[]);
        let some = config_map_name(
            &governing,
            &[Skipped {
                port: 80,
                protocol: Protocol::Tcp,
            }],
        );
        assert_eq!(none, "portsentry-sensor-web");
        assert!(some.starts_with("portsentry-sensor-web-") && some != none);
    }

    #[test]
    fn every_decoy_colliding_means_no_injection() {
        let snapshot = snapshot(vec![policy("web", NS, &[], rules(&[8080], &[]))]);
        let pod = pod(&[], &[(8080, "TCP")]);
        assert_eq!(
            decide(&pod, NS, &snapshot, &Settings::default()),
            Decision::Skip(Skip::NoDecoysLeft)
        );
    }

    #[test]
    fn the_projected_token_has_the_portsentry_audience_and_an_expiry() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let volumes = after.spec.unwrap().volumes.unwrap();
        let token = volumes.iter().find(|v| v.name == TOKEN_VOLUME).unwrap();
        let source = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(source.audience.as_deref(), Some(TOKEN_AUDIENCE));
        assert_eq!(source.expiration_seconds, Some(3600));
    }

    #[test]
    fn the_config_comes_from_the_policys_config_map() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let volumes = after.spec.as_ref().unwrap().volumes.clone().unwrap();
        let config = volumes.iter().find(|v| v.name == CONFIG_VOLUME).unwrap();
        assert_eq!(
            config.config_map.as_ref().unwrap().name,
            "portsentry-sensor-web"
        );
        let args = injected_sidecar(&after).args.unwrap();
        assert_eq!(
            args[..2],
            [
                "--config".to_owned(),
                "/etc/portsentry/portsentry.conf".to_owned()
            ]
        );
    }

    #[test]
    fn existing_volumes_are_kept_and_ours_appended() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "data".into(),
            ..Volume::default()
        }]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let names: Vec<String> = after
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data", CONFIG_VOLUME, TOKEN_VOLUME]);
    }

    #[test]
    fn the_sidecar_is_locked_down_without_any_capability() {
        let context = sensor_security_context(false);
        assert_eq!(context.run_as_non_root, Some(true));
        assert_eq!(context.read_only_root_filesystem, Some(true));
        assert_eq!(context.allow_privilege_escalation, Some(false));
        let capabilities = context.capabilities.unwrap();
        assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(capabilities.add, None);
        assert_eq!(context.seccomp_profile.unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn stealth_adds_net_raw_and_nothing_else() {
        let mut stealthy = rules(&[31337], &[]);
        stealthy.decoys.stealth = true;
        let snapshot = snapshot(vec![policy("web", NS, &[], stealthy)]);
        let pod = pod(&[], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &snapshot, &Settings::default())),
        );
        let sidecar = injected_sidecar(&after);
        let capabilities = sidecar.security_context.unwrap().capabilities.unwrap();
        assert_eq!(capabilities.add, Some(vec!["NET_RAW".to_owned()]));
        assert!(sidecar.args.unwrap().contains(&"--stcp".to_owned()));
    }

    #[test]
    fn advanced_decoys_exclude_declared_ports_and_run_the_raw_mode() {
        let mut advanced = rules(&[], &[]);
        advanced.decoys.advanced = Some(AdvancedDecoys {
            tcp_below: Some(1024),
            ..AdvancedDecoys::default()
        });
        let (decoys, skipped) = decoys_for(&advanced, &BTreeSet::from([(Protocol::Tcp, 80)]), 9720);
        assert!(decoys.exclude_tcp.contains(&80));
        assert_eq!(
            skipped,
            [Skipped {
                port: 80,
                protocol: Protocol::Tcp
            }]
        );
        assert!(decoys.raw());
        assert!(sensor_args(&decoys, 9720).contains(&"--atcp".to_owned()));
    }

    #[test]
    fn resources_come_from_the_settings() {
        let settings = Settings {
            resources: serde_json::from_value(
                json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}),
            )
            .unwrap(),
            ..Settings::default()
        };
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &settings)),
        );
        assert_eq!(injected_sidecar(&after).resources, Some(settings.resources));
    }

    #[test]
    fn decoys_below_1024_set_the_unprivileged_port_sysctl_to_the_lowest_one() {
        let pod = pod(&[("app", "web")], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let sysctls = after
            .spec
            .unwrap()
            .security_context
            .unwrap()
            .sysctls
            .unwrap();
        assert_eq!(
            sysctls,
            [Sysctl {
                name: UNPRIVILEGED_PORT_SYSCTL.into(),
                value: "1".into()
            }]
        );
    }

    #[test]
    fn decoys_all_above_1024_leave_the_pod_security_context_alone() {
        let snapshot = snapshot(vec![policy("web", NS, &[], rules(&[31337], &[]))]);
        let pod = pod(&[], &[]);
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &snapshot, &Settings::default())),
        );
        assert_eq!(after.spec.unwrap().security_context, None);
    }

    #[test]
    fn a_lower_sysctl_the_pod_already_sets_is_kept() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.spec.as_mut().unwrap().security_context = Some(PodSecurityContext {
            sysctls: Some(vec![Sysctl {
                name: UNPRIVILEGED_PORT_SYSCTL.into(),
                value: "0".into(),
            }]),
            ..PodSecurityContext::default()
        });
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let sysctls = after
            .spec
            .unwrap()
            .security_context
            .unwrap()
            .sysctls
            .unwrap();
        assert_eq!(sysctls[0].value, "0");
    }

    #[test]
    fn a_higher_sysctl_the_pod_sets_is_lowered_to_the_lowest_decoy() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.spec.as_mut().unwrap().security_context = Some(PodSecurityContext {
            run_as_user: Some(1000),
            sysctls: Some(vec![Sysctl {
                name: UNPRIVILEGED_PORT_SYSCTL.into(),
                value: "1024".into(),
            }]),
            ..PodSecurityContext::default()
        });
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let context = after.spec.unwrap().security_context.unwrap();
        assert_eq!(context.sysctls.unwrap()[0].value, "1");
        assert_eq!(context.run_as_user, Some(1000));
    }

    #[test]
    fn a_cluster_policy_selects_pods_of_namespaces_matching_its_namespace_selector() {
        let cluster = ClusterPortSentryPolicy::new(
            "everywhere",
            ClusterPortSentryPolicySpec {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(labels(&[("team", "shop")])),
                    match_expressions: None,
                }),
                pod_selector: None,
                node_selector: None,
                rules: rules(&[31337], &[]),
            },
        );
        let snapshot = Snapshot {
            cluster_policies: vec![cluster],
            ..snapshot(Vec::new())
        };
        let injection = injection(decide(&pod(&[], &[]), NS, &snapshot, &Settings::default()));
        assert_eq!(injection.policy, "ClusterPortSentryPolicy/everywhere");
        assert_eq!(injection.config_map, "portsentry-sensor-cluster-everywhere");
        assert_eq!(
            decide(&pod(&[], &[]), "elsewhere", &snapshot, &Settings::default()),
            Decision::Skip(Skip::NoPolicy)
        );
    }

    #[test]
    fn a_cluster_policy_without_namespace_selector_injects_nothing() {
        let cluster = ClusterPortSentryPolicy::new(
            "nodes-only",
            ClusterPortSentryPolicySpec {
                namespace_selector: None,
                pod_selector: None,
                node_selector: None,
                rules: rules(&[1], &[]),
            },
        );
        let snapshot = Snapshot {
            cluster_policies: vec![cluster],
            ..snapshot(Vec::new())
        };
        assert_eq!(
            decide(&pod(&[], &[]), NS, &snapshot, &Settings::default()),
            Decision::Skip(Skip::NoPolicy)
        );
    }

    #[test]
    fn a_namespaced_policy_wins_over_a_cluster_policy() {
        let cluster = ClusterPortSentryPolicy::new(
            "everywhere",
            ClusterPortSentryPolicySpec {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: None,
                node_selector: None,
                rules: rules(&[31337], &[]),
            },
        );
        let mut snapshot = web_snapshot();
        snapshot.cluster_policies.push(cluster);
        let injection = injection(decide(
            &pod(&[("app", "web")], &[]),
            NS,
            &snapshot,
            &Settings::default(),
        ));
        assert_eq!(injection.policy, "PortSentryPolicy/web");
    }

    #[test]
    fn presets_expand_to_their_port_lists_merged_into_ranges() {
        let mut preset = rules(&[], &[]);
        preset.decoys.preset = Some(Preset::BareBones);
        let config = render_sensor_config(&preset, &[]);
        assert!(config.contains("TCP_PORTS=\"1,11,15,110-111,143,540,635,1080,1524,2000,12345-12346,20034,32771-32774,49724,54320\"\n"), "{config}");
    }

    #[test]
    fn the_config_only_detects_and_the_operator_bans() {
        let config = render_sensor_config(&rules(&[1], &[]), &[]);
        assert!(config.contains("BLOCK_TCP=\"0\"\n") && config.contains("BLOCK_UDP=\"0\"\n"));
        assert!(!config.contains("KILL_"));
    }

    #[test]
    fn detection_settings_are_carried_into_the_config() {
        let mut custom = rules(&[1], &[]);
        custom.detection.scan_trigger = 3;
        custom.detection.ignore = vec!["10.0.0.0/8".parse().unwrap()];
        let config = render_sensor_config(&custom, &[]);
        assert!(config.contains("SCAN_TRIGGER=\"3\"\n"));
        assert!(
            config.contains("SCAN_WINDOW=\"1m\"\n") || config.contains("SCAN_WINDOW=\"60s\"\n"),
            "{config}"
        );
        assert!(render_ignore_file(&custom).contains("10.0.0.0/8\n"));
    }

    #[test]
    fn a_banner_with_quotes_and_newlines_stays_one_quoted_value() {
        let mut custom = rules(&[1], &[]);
        custom.decoys.banner = Some("go \"away\"\nnow".into());
        let config = render_sensor_config(&custom, &[]);
        assert!(
            config.contains("PORT_BANNER=\"go 'away' now\"\n"),
            "{config}"
        );
    }

    #[test]
    fn the_metrics_port_is_never_a_tcp_decoy() {
        let (decoys, _) = decoys_for(&rules(&[9720, 1], &[9720]), &BTreeSet::new(), 9720);
        assert_eq!(decoys.tcp, BTreeSet::from([1]));
        assert_eq!(decoys.udp, BTreeSet::from([9720]));
    }

    #[test]
    fn annotations_keys_with_slashes_are_escaped_in_the_patch() {
        let mut pod = pod(&[("app", "web")], &[]);
        pod.metadata.annotations = Some(labels(&[("keep", "me")]));
        let after = patched(
            &pod,
            &injection(decide(&pod, NS, &web_snapshot(), &Settings::default())),
        );
        let annotations = after.metadata.annotations.unwrap();
        assert_eq!(annotations["keep"], "me");
        assert_eq!(annotations[INJECTED_ANNOTATION], "PortSentryPolicy/web");
    }

    #[test]
    fn the_skipped_annotation_reads_back() {
        let skipped = vec![
            Skipped {
                port: 80,
                protocol: Protocol::Tcp,
            },
            Skipped {
                port: 53,
                protocol: Protocol::Udp,
            },
        ];
        assert_eq!(
            parse_skipped_annotation(&skipped_annotation(&skipped)),
            skipped
        );
    }
}
