//! Node sensors as pure functions: the DaemonSet (hostNetwork) and the ConfigMap the operator
//! applies in its own namespace for a ClusterPortSentryPolicy with a `nodeSelector`.
//!
//! ```text
//!  ClusterPortSentryPolicy ── nodeSelector ──▶ DaemonSet portsentry-node-sensor-NAME (hostNetwork)
//!        (rules)                                  │ sensor: decoys on the node, reports to the intake,
//!          └──── inject::build_config_map ──▶ ConfigMap   --watch-bans: cluster bans ──▶ nftables
//! ```
//!
//! # Root with `NET_ADMIN` and `NET_RAW` only
//!
//! A node sensor keeps an nftables table of its own in the node's network namespace, which
//! needs `CAP_NET_ADMIN` in the process's *effective* set, and stealth/advanced decoys need
//! `CAP_NET_RAW`. As explained for sidecars in [`crate::inject`], a capability added to a
//! non-root container only reaches its bounding set (no ambient capabilities, and
//! `allowPrivilegeEscalation: false` makes the kernel ignore file capabilities), so a
//! non-root sensor could not change nftables at all. The container therefore runs as UID 0
//! with every capability dropped but those two, a read-only root filesystem, no privilege
//! escalation, not privileged, and the runtime's default seccomp profile.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        core::v1::{
            Capabilities, ConfigMap, Container, PodSpec, PodTemplateSpec, ResourceRequirements,
            SeccompProfile, SecurityContext, Toleration,
        },
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
};
use kube::Resource;
use portsentry_crds::{Backend, ClusterPortSentryPolicy, PolicyKind};
use serde::Deserialize;

use crate::{
    Error, Result, inject,
    labels::{self, CLUSTER_POLICY_LABEL, NODE_SENSOR_LABEL},
    names::{bounded, label_value},
};

/// Name of the node sensor's container.
pub const CONTAINER_NAME: &str = "portsentry-node-sensor";
/// Capabilities a node sensor keeps: nftables (`NET_ADMIN`) and raw capture (`NET_RAW`).
pub const CAPABILITIES: [&str; 2] = ["NET_ADMIN", "NET_RAW"];
/// Default ServiceAccount of node sensors (the chart names its own).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "portsentry-node-sensor";
/// How often a node sensor re-reconciles its nftables table to the bans without a change.
pub const RESYNC_SECONDS: u32 = 5;

/// How node-sensor DaemonSets are built: the chart's `nodeSensors` values (as the JSON of
/// `PORTSENTRY_NODE_SENSOR_SETTINGS`) over the sidecar's image and report settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NodeSensorSettings {
    /// Image of the node sensor; empty: the sidecar's sensor image.
    pub image: String,
    /// Image pull policy; empty: the sidecar's.
    pub image_pull_policy: String,
    /// ServiceAccount the node sensors run as (reads cluster bans, reports with its token).
    pub service_account_name: String,
    pub tolerations: Vec<Toleration>,
    pub priority_class_name: String,
    pub resources: ResourceRequirements,
}

impl NodeSensorSettings {
    /// Reads the chart's JSON; empty text gives the defaults.
    pub fn from_json(text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_str(text).map_err(|e| Error::Setting {
            setting: "PORTSENTRY_NODE_SENSOR_SETTINGS",
            detail: format!(
                "not the chart's nodeSensors values \
                 (image, serviceAccountName, tolerations, priorityClassName, resources): {e}"
            ),
        })
    }

    fn service_account(&self) -> &str {
        if self.service_account_name.trim().is_empty() {
            DEFAULT_SERVICE_ACCOUNT
        } else {
            &self.service_account_name
        }
    }
}

/// The node sensors' flags (the chart sets the first two as environment variables).
/// Flatten into the operator's arguments with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct NodeSensorArgs {
    /// Manage node-sensor DaemonSets for ClusterPortSentryPolicies with a nodeSelector.
    #[arg(long, env = "PORTSENTRY_NODE_SENSORS", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_sensors: bool,
    /// The chart's `nodeSensors` values as JSON (image, serviceAccountName, tolerations,
    /// priorityClassName, resources).
    #[arg(long, env = "PORTSENTRY_NODE_SENSOR_SETTINGS")]
    pub node_sensor_settings: Option<String>,
    /// The pod nftables agent runs on the nodes (the chart's
    /// `nodeSensors.podNftables.enabled`), so the `PodNftables` backend enforces.
    #[arg(long, env = "PORTSENTRY_POD_NFTABLES_AGENT", default_value_t = false, action = clap::ArgAction::Set)]
    pub pod_nftables_agent: bool,
}

impl NodeSensorArgs {
    /// The node sensors these flags describe, in the operator's `namespace`, with the
    /// sidecars' image and report settings and the intake's CA bundle (when known).
    pub fn node_sensors(
        &self,
        namespace: &str,
        sidecar: inject::Settings,
        report_ca_pem: crate::tls::CaBundle,
    ) -> Result<NodeSensors> {
        let settings = NodeSensorSettings::from_json(
            self.node_sensor_settings.as_deref().unwrap_or_default(),
        )?;
        Ok(NodeSensors {
            enabled: self.node_sensors,
            namespace: namespace.to_owned(),
            sidecar,
            settings,
            report_ca_pem,
            pod_nftables_agent: self.pod_nftables_agent,
        })
    }
}

/// The node sensors as the operator was told to run them.
#[derive(Clone, Debug)]
pub struct NodeSensors {
    /// False (`--node-sensors=false`): no DaemonSets are managed at all.
    pub enabled: bool,
    /// The operator's namespace: DaemonSets, ConfigMaps and cluster bans live there.
    pub namespace: String,
    pub sidecar: inject::Settings,
    pub settings: NodeSensorSettings,
    /// The intake's CA bundle, rendered into node and sidecar ConfigMaps (follows rotation).
    pub report_ca_pem: crate::tls::CaBundle,
    /// The pod nftables agent runs on the nodes: `PodNftables` enforces cluster bans in the
    /// pods the policy selects.
    pub pod_nftables_agent: bool,
}

/// Everything a node-sensor build needs besides the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Target<'a> {
    /// The operator's namespace: where the DaemonSet, ConfigMap and cluster bans live.
    pub namespace: &'a str,
    /// The sidecar settings (image, report URL, token lifetime).
    pub sidecar: &'a inject::Settings,
    pub nodes: &'a NodeSensorSettings,
    /// PEM CA the sensors trust for the intake (key `ca.crt` of the ConfigMap), when known.
    pub report_ca_pem: Option<&'a str>,
}

/// Name of a cluster policy's DaemonSet and ConfigMap (one of each, different kinds).
/// At most 63 characters, so the DaemonSet's pod names and labels stay valid.
pub fn object_name(policy: &str) -> String {
    bounded(&format!("portsentry-node-sensor-{policy}"), 63)
}

/// Name of a node sensor's own nftables table (family inet).
pub fn nft_table(policy: &str) -> String {
    bounded(&format!("portsentry-{policy}"), 200)
}

/// `ClusterPortSentryPolicy/NAME`: the sensor's `--report-policy` and `--watch-bans-policy`.
pub fn policy_reference(policy: &str) -> String {
    inject::Governing {
        kind: PolicyKind::ClusterPortSentryPolicy,
        name: policy,
        rules: &Default::default(),
    }
    .reference()
}

/// Labels of the DaemonSet's pods: the intake recognises node sensors by
/// [`NODE_SENSOR_LABEL`] in the operator namespace. Also the DaemonSet's (immutable) selector.
pub fn selector_labels(policy: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            NODE_SENSOR_LABEL.0.to_owned(),
            NODE_SENSOR_LABEL.1.to_owned(),
        ),
        (CLUSTER_POLICY_LABEL.to_owned(), label_value(policy)),
    ])
}

fn object_labels(policy: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(policy);
    labels.insert(
        labels::MANAGED_BY_LABEL.to_owned(),
        labels::MANAGER.to_owned(),
    );
    labels.insert(
        labels::NAME_LABEL.to_owned(),
        "portsentry-sensor".to_owned(),
    );
    labels
}

/// The label selector (`key=value,...`) of every object built here for `policy`.
pub fn label_selector(policy: &str) -> String {
    selector_labels(policy)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The policy as the controlling owner of its node-sensor objects (garbage-collected with
/// it; a namespaced object may be owned by a cluster-scoped one).
pub fn owner(policy: &ClusterPortSentryPolicy) -> Result<OwnerReference> {
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    Ok(OwnerReference {
        controller: Some(true),
        block_owner_deletion: Some(true),
        ..owner
    })
}

/// The security context of a node sensor: see the module doc for why it is root.
pub fn security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(false),
        run_as_user: Some(0),
        run_as_group: Some(0),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: Some(CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The node sensor's arguments: the sidecar's (config, modes, metrics, reports) plus, when
/// the policy's backends name `NodeNftables`, the watch of the policy's bans (in the operator
/// namespace) into the sensor's own nftables table.
pub fn args(policy: &ClusterPortSentryPolicy, target: &Target<'_>) -> Vec<String> {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let (decoys, _) = inject::decoys_for(
        &policy.spec.rules,
        &BTreeSet::new(),
        inject::SENSOR_METRICS_PORT,
    );
    let reference = policy_reference(name);
    let mut args = inject::sensor_args(&decoys, inject::SENSOR_METRICS_PORT);
    args.extend(inject::report_args(&reference, target.sidecar));
    if !policy
        .spec
        .rules
        .enforcement
        .backends
        .contains(&Backend::NodeNftables)
    {
        return args;
    }
    args.extend([
        "--watch-bans".to_owned(),
        target.namespace.to_owned(),
        "--watch-bans-policy".to_owned(),
        reference,
        "--watch-bans-table".to_owned(),
        nft_table(name),
        "--watch-bans-resync-secs".to_owned(),
        RESYNC_SECONDS.to_string(),
    ]);
    args
}

/// The node sensor container: the sidecar's probes, mounts and environment, run as a node
/// agent (see [`security_context`]), plus `NODE_NAME`.
pub fn container(policy: &ClusterPortSentryPolicy, target: &Target<'_>) -> Container {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let (decoys, _) = inject::decoys_for(
        &policy.spec.rules,
        &BTreeSet::new(),
        inject::SENSOR_METRICS_PORT,
    );
    let base = inject::sidecar(&decoys, &policy_reference(name), target.sidecar);
    let mut env = base.env.clone().unwrap_or_default();
    env.push(
        serde_json::from_value(serde_json::json!({
            "name": "NODE_NAME",
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}
        }))
        .unwrap_or_default(),
    );
    let image = if target.nodes.image.trim().is_empty() {
        target.sidecar.image.clone()
    } else {
        target.nodes.image.clone()
    };
    let pull = Some(target.nodes.image_pull_policy.clone())
        .filter(|p| !p.trim().is_empty())
        .or_else(|| target.sidecar.image_pull_policy.clone());
    Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(image),
        image_pull_policy: pull,
        args: Some(args(policy, target)),
        // A regular container of a DaemonSet, not a native sidecar.
        restart_policy: None,
        env: Some(env),
        resources: Some(target.nodes.resources.clone()),
        security_context: Some(security_context()),
        ..base
    }
}

/// The DaemonSet of a cluster policy's node sensors, or `None` when the policy has no
/// `nodeSelector` (its DaemonSet is then deleted).
pub fn build_daemon_set(
    policy: &ClusterPortSentryPolicy,
    target: &Target<'_>,
) -> Result<Option<DaemonSet>> {
    let Some(node_selector) = policy.spec.node_selector.clone() else {
        return Ok(None);
    };
    let name = policy
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    let object = object_name(name);
    let pod_labels = {
        let mut labels = object_labels(name);
        labels.insert(labels::SENSOR_LABEL.to_owned(), "node".to_owned());
        labels
    };
    let tolerations = Some(target.nodes.tolerations.clone()).filter(|t| !t.is_empty());
    let priority = Some(target.nodes.priority_class_name.clone()).filter(|p| !p.is_empty());
    Ok(Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(object.clone()),
            namespace: Some(target.namespace.to_owned()),
            labels: Some(object_labels(name)),
            owner_references: Some(vec![owner(policy)?]),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(name)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        labels::INJECTED_ANNOTATION.to_owned(),
                        policy_reference(name),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".to_owned()),
                    service_account_name: Some(target.nodes.service_account().to_owned()),
                    // The API server token: the ban watch reads PortSentryBans with it.
                    automount_service_account_token: Some(true),
                    node_selector: Some(node_selector),
                    tolerations,
                    priority_class_name: priority,
                    containers: vec![container(policy, target)],
                    volumes: Some(inject::volumes(&object, target.sidecar)),
                    termination_grace_period_seconds: Some(10),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    }))
}

/// The node sensors' ConfigMap: exactly what a sidecar of the same policy reads
/// ([`inject::build_config_map`], nothing skipped), owned by the policy.
pub fn build_config_map(
    policy: &ClusterPortSentryPolicy,
    target: &Target<'_>,
) -> Result<Option<ConfigMap>> {
    if policy.spec.node_selector.is_none() {
        return Ok(None);
    }
    let name = policy
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    let mut config_map = inject::build_config_map(
        target.namespace,
        &object_name(name),
        &policy_reference(name),
        &policy.spec.rules,
        &[],
        target.report_ca_pem,
    );
    let mut labels = config_map.metadata.labels.take().unwrap_or_default();
    labels.insert(CLUSTER_POLICY_LABEL.to_owned(), label_value(name));
    config_map.metadata.labels = Some(labels);
    config_map.metadata.owner_references = Some(vec![owner(policy)?]);
    Ok(Some(config_map))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use portsentry_crds::{ClusterPortSentryPolicySpec, Decoys, PolicyRules, PortRange};

    use super::*;

    fn policy(node_selector: Option<&[(&str, &str)]>) -> ClusterPortSentryPolicy {
        let mut policy = ClusterPortSentryPolicy::new(
            "edge",
            ClusterPortSentryPolicySpec {
                namespace_selector: None,
                pod_selector: None,
                node_selector: node_selector.map(|pairs| {
                    pairs
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect()
                }),
                corroboration: Default::default(),
                rules: PolicyRules {
                    enforcement: portsentry_crds::Enforcement {
                        backends: vec![Backend::NodeNftables],
                        ..Default::default()
                    },
                    decoys: Decoys {
                        tcp: vec![
                            PortRange::single(31337).unwrap(),
                            PortRange::single(40421).unwrap(),
                        ],
                        ..Decoys::default()
                    },
                    ..PolicyRules::default()
                },
            },
        );
        policy.metadata.uid = Some("uid-edge".into());
        policy
    }

    fn build(policy: &ClusterPortSentryPolicy, nodes: &NodeSensorSettings) -> DaemonSet {
        let sidecar = inject::Settings::default();
        let target = Target {
            namespace: "portsentry-system",
            sidecar: &sidecar,
            nodes,
            report_ca_pem: Some("CA"),
        };
        build_daemon_set(policy, &target).unwrap().unwrap()
    }

    fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
        daemon_set
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
    }

    fn edge() -> ClusterPortSentryPolicy {
        policy(Some(&[("node-role.example/edge", "true")]))
    }

    #[test]
    fn a_policy_without_node_selector_gets_no_daemon_set_and_no_config_map() {
        let sidecar = inject::Settings::default();
        let nodes = NodeSensorSettings::default();
        let target = Target {
            namespace: "portsentry-system",
            sidecar: &sidecar,
            nodes: &nodes,
            report_ca_pem: None,
        };
        assert!(build_daemon_set(&policy(None), &target).unwrap().is_none());
        assert!(build_config_map(&policy(None), &target).unwrap().is_none());
    }

    #[test]
    fn the_daemon_set_lives_in_the_operator_namespace_owned_by_the_policy() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        assert_eq!(
            daemon_set.metadata.name.as_deref(),
            Some("portsentry-node-sensor-edge")
        );
        assert_eq!(
            daemon_set.metadata.namespace.as_deref(),
            Some("portsentry-system")
        );
        let owner = &daemon_set.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "ClusterPortSentryPolicy");
        assert_eq!(owner.uid, "uid-edge");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn node_sensor_pods_run_on_the_host_network_with_cluster_dns() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let spec = pod_spec(&daemon_set);
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    }

    #[test]
    fn node_sensor_pods_run_only_on_the_policys_nodes() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let selector = pod_spec(&daemon_set).node_selector.clone().unwrap();
        assert_eq!(
            selector,
            BTreeMap::from([("node-role.example/edge".to_owned(), "true".to_owned())])
        );
    }

    #[test]
    fn the_container_keeps_only_net_admin_and_net_raw_on_a_read_only_root() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let context = pod_spec(&daemon_set).containers[0]
            .security_context
            .clone()
            .unwrap();
        let capabilities = context.capabilities.unwrap();
        assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            capabilities.add,
            Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()])
        );
        assert_eq!(context.read_only_root_filesystem, Some(true));
        assert_eq!(context.allow_privilege_escalation, Some(false));
        assert_eq!(context.privileged, Some(false));
    }

    #[test]
    fn the_token_is_projected_for_the_portsentry_audience() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let volumes = serde_json::to_value(pod_spec(&daemon_set).volumes.clone()).unwrap();
        let token = volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == inject::TOKEN_VOLUME)
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "portsentry.io"
        );
        let config = volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == inject::CONFIG_VOLUME)
            .unwrap();
        assert_eq!(config["configMap"]["name"], "portsentry-node-sensor-edge");
    }

    #[test]
    fn pods_carry_the_label_the_intake_knows_node_sensors_by() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let spec = daemon_set.spec.unwrap();
        let labels = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(
            labels.get(NODE_SENSOR_LABEL.0).map(String::as_str),
            Some(NODE_SENSOR_LABEL.1)
        );
        let selector = spec.selector.match_labels.unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    }

    #[test]
    fn the_sensor_reports_for_the_cluster_policy_and_watches_its_bans() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let args = pod_spec(&daemon_set).containers[0].args.clone().unwrap();
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("--report-policy"), "ClusterPortSentryPolicy/edge");
        assert_eq!(after("--watch-bans"), "portsentry-system");
        assert_eq!(after("--watch-bans-policy"), "ClusterPortSentryPolicy/edge");
        assert_eq!(after("--watch-bans-table"), "portsentry-edge");
        assert!(args.contains(&"--tcp".to_owned()));
    }

    #[test]
    fn without_the_node_nftables_backend_the_sensor_detects_but_watches_no_bans() {
        let mut policy = edge();
        policy.spec.rules.enforcement.backends = vec![Backend::NetworkPolicy];
        let daemon_set = build(&policy, &NodeSensorSettings::default());
        let args = pod_spec(&daemon_set).containers[0].args.clone().unwrap();
        assert!(!args.contains(&"--watch-bans".to_owned()));
        assert!(args.contains(&"--report-policy".to_owned()));
    }

    #[test]
    fn chart_values_set_service_account_tolerations_resources_and_image() {
        let nodes = NodeSensorSettings::from_json(
            r#"{"image":"registry.example/sensor:1","serviceAccountName":"ps-node-sensor",
                "tolerations":[{"operator":"Exists"}],"priorityClassName":"system-node-critical",
                "resources":{"requests":{"cpu":"20m","memory":"32Mi"},"limits":{"memory":"128Mi"}}}"#,
        )
        .unwrap();
        let daemon_set = build(&edge(), &nodes);
        let spec = pod_spec(&daemon_set);
        assert_eq!(spec.service_account_name.as_deref(), Some("ps-node-sensor"));
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].operator.as_deref(),
            Some("Exists")
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/sensor:1")
        );
        let requests = container
            .resources
            .as_ref()
            .unwrap()
            .requests
            .clone()
            .unwrap();
        assert_eq!(requests["cpu"].0, "20m");
    }

    #[test]
    fn without_chart_values_the_default_service_account_and_sidecar_image_are_used() {
        let daemon_set = build(&edge(), &NodeSensorSettings::default());
        let spec = pod_spec(&daemon_set);
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some(DEFAULT_SERVICE_ACCOUNT)
        );
        assert_eq!(
            spec.containers[0].image,
            Some(inject::Settings::default().image)
        );
    }

    #[test]
    fn settings_that_are_not_the_charts_values_are_refused_with_the_variable_named() {
        let error = NodeSensorSettings::from_json(r#"{"tolerations": 3}"#).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("PORTSENTRY_NODE_SENSOR_SETTINGS")
        );
    }

    #[test]
    fn the_config_map_is_the_sidecars_rendering_of_the_same_rules() {
        let policy = edge();
        let sidecar = inject::Settings::default();
        let nodes = NodeSensorSettings::default();
        let target = Target {
            namespace: "portsentry-system",
            sidecar: &sidecar,
            nodes: &nodes,
            report_ca_pem: Some("PEM"),
        };
        let config_map = build_config_map(&policy, &target).unwrap().unwrap();
        let data = config_map.data.unwrap();
        assert_eq!(
            data["portsentry.conf"],
            inject::render_sensor_config(&policy.spec.rules, &[])
        );
        assert_eq!(data[inject::REPORT_CA_KEY], "PEM");
        assert_eq!(
            config_map.metadata.owner_references.unwrap()[0].uid,
            "uid-edge"
        );
        assert_eq!(
            config_map.metadata.name.as_deref(),
            Some("portsentry-node-sensor-edge")
        );
    }

    #[test]
    fn long_policy_names_give_names_that_fit_pod_names_and_labels() {
        let long = "e".repeat(200);
        let name = object_name(&long);
        assert!(name.len() <= 63);
        assert!(crate::names::is_dns_subdomain(&name));
        assert_ne!(object_name(&format!("{long}x")), name);
    }
}
