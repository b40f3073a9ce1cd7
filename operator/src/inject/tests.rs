//! The injection's behaviour as specifications: which pods get a sensor, the patch, the
//! sidecar, its ConfigMaps and decoys.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, ContainerPort, Pod, Volume},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PolicyRules, PortRange, PortSentryPolicy, Protocol,
};
use serde_json::json;

use super::*;
use crate::labels::{
    self, CONFIG_MAP_ANNOTATION, INJECT_ANNOTATION, INJECTED_ANNOTATION, SENSOR_LABEL,
    SKIPPED_ANNOTATION, TOKEN_AUDIENCE,
};
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
        Decision::Inject(injection) => *injection,
        Decision::Skip(skip) => panic!("expected an injection, got {skip:?}"),
    }
}

fn patched(pod: &Pod, injection: &Injection) -> Pod {
    let mut value = serde_json::to_value(pod).unwrap();
    json_patch::patch(&mut value, &injection.patch(pod).unwrap()).unwrap();
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
    let config_maps = sensor_config_maps(NS, &owned_web_policy(), &[], SidecarExtras::default());
    assert_eq!(names(&config_maps), ["portsentry-sensor-web"]);
    let owner = &config_maps[0].metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("PortSentryPolicy", "web", Some(true))
    );
    assert_eq!(
        config_maps[0].labels()["app.kubernetes.io/managed-by"],
        labels::MANAGER
    );
}

#[test]
fn sensor_config_maps_render_a_pods_skipped_decoys_out_of_its_config() {
    let pod = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
    let config_maps = sensor_config_maps(NS, &owned_web_policy(), &[pod], SidecarExtras::default());
    assert_eq!(config_maps.len(), 2);
    let hashed = config_maps
        .iter()
        .find(|c| c.name_any() != "portsentry-sensor-web")
        .unwrap();
    let config = &hashed.data.as_ref().unwrap()["portsentry.conf"];
    assert!(config.contains("TCP_PORTS=\"1,31337\""), "{config}");
}

/// The `METRICS_PER_PORT` lines of each ConfigMap's `portsentry.conf`.
fn metrics_per_port_lines(config_maps: &[ConfigMap]) -> Vec<Vec<String>> {
    config_maps
        .iter()
        .map(|c| {
            c.data.as_ref().unwrap()["portsentry.conf"]
                .lines()
                .filter(|line| line.starts_with("METRICS_PER_PORT"))
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn sidecar_configs_name_no_decoy_port_in_metrics_unless_the_chart_turns_it_on() {
    let pods = [admitted(&pod(&[("app", "web")], &[(8080, "TCP")]))];
    let off = sensor_config_maps(NS, &owned_web_policy(), &pods, SidecarExtras::default());
    assert_eq!(off.len(), 2);
    assert!(metrics_per_port_lines(&off).iter().all(Vec::is_empty));
    let on = SidecarExtras {
        metrics_per_port: true,
        ..SidecarExtras::default()
    };
    let on = sensor_config_maps(NS, &owned_web_policy(), &pods, on);
    assert!(
        metrics_per_port_lines(&on)
            .iter()
            .all(|lines| lines == &["METRICS_PER_PORT=\"1\"".to_owned()])
    );
}

#[test]
fn a_cluster_policys_sidecar_configs_follow_the_same_metrics_setting() {
    let pods = [admitted_by_cluster(&pod(&[], &[]))];
    let policy = owned_cluster_policy();
    let off = cluster_sensor_config_maps(&policy, &pods, SidecarExtras::default());
    assert_eq!(metrics_per_port_lines(&off), [Vec::<String>::new()]);
    let on = SidecarExtras {
        metrics_per_port: true,
        ..SidecarExtras::default()
    };
    assert_eq!(
        metrics_per_port_lines(&cluster_sensor_config_maps(&policy, &pods, on)),
        [vec!["METRICS_PER_PORT=\"1\"".to_owned()]]
    );
}

#[test]
fn sensor_config_maps_share_one_config_map_per_skipped_set() {
    let one = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
    let two = admitted(&pod(&[("app", "web")], &[(8080, "TCP"), (9000, "TCP")]));
    let config_maps = sensor_config_maps(
        NS,
        &owned_web_policy(),
        &[one, two],
        SidecarExtras::default(),
    );
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
    let config_maps = sensor_config_maps(NS, &owned_web_policy(), &pods, SidecarExtras::default());
    assert_eq!(
        names(&config_maps).into_iter().collect::<BTreeSet<_>>(),
        annotated
    );
}

#[test]
fn a_skip_specific_config_map_no_pod_uses_any_more_is_stale() {
    let policy = owned_web_policy();
    let pod = admitted(&pod(&[("app", "web")], &[(8080, "TCP")]));
    let with_pod = sensor_config_maps(NS, &policy, &[pod], SidecarExtras::default());
    let existing: Vec<ObjectMeta> = with_pod.iter().map(|c| c.metadata.clone()).collect();
    let without_pod = sensor_config_maps(NS, &policy, &[], SidecarExtras::default());
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
            corroboration: Default::default(),
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
    let config_maps =
        cluster_sensor_config_maps(&policy, &[injected, not_injected], SidecarExtras::default());
    let placed: Vec<(String, String)> = config_maps
        .iter()
        .map(|c| (c.namespace().unwrap(), c.name_any()))
        .collect();
    assert_eq!(
        placed,
        [(NS.to_owned(), "portsentry-sensor-cluster-edge".to_owned())]
    );
    assert!(cluster_sensor_config_maps(&policy, &[], SidecarExtras::default()).is_empty());
}

#[test]
fn a_cluster_policys_config_maps_are_owned_by_it_and_named_as_the_webhook_annotated_the_pods() {
    let policy = owned_cluster_policy();
    let pods = [
        admitted_by_cluster(&pod(&[], &[])),
        admitted_by_cluster(&pod(&[], &[(8080, "TCP")])),
    ];
    let config_maps = cluster_sensor_config_maps(
        &policy,
        &pods,
        SidecarExtras {
            report_ca_pem: Some("PEM"),
            ..SidecarExtras::default()
        },
    );
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
        SidecarExtras::default(),
    );
    let existing: Vec<ObjectMeta> = before.iter().map(|c| c.metadata.clone()).collect();
    // The pod that skipped 8080 is gone: its ConfigMap is stale, the base one stays.
    let wanted = cluster_sensor_config_maps(
        &policy,
        &[plain.clone(), elsewhere],
        SidecarExtras::default(),
    );
    let stale = stale_config_maps_by_namespace(uid, &wanted, &existing);
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].0, NS);
    assert_ne!(stale[0].1, "portsentry-sensor-cluster-edge");
    // The only pod of "other" is gone too: its base ConfigMap goes as well.
    let wanted = cluster_sensor_config_maps(&policy, &[plain], SidecarExtras::default());
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
    let mut existing: Vec<ObjectMeta> =
        sensor_config_maps(NS, &policy, &[pod], SidecarExtras::default())
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
            corroboration: Default::default(),
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
            corroboration: Default::default(),
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
            corroboration: Default::default(),
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

/// Pods of every shape the patch has to fit: bare, with existing init containers, volumes,
/// annotations, a higher sysctl, declared ports (skipped decoys), no spec at all.
fn pods_of_every_shape() -> Vec<Pod> {
    let bare = pod(&[("app", "web")], &[]);
    let mut busy = pod(&[("app", "web")], &[(8080, "TCP"), (7, "UDP")]);
    busy.metadata.annotations = Some(labels(&[("example.com/owner", "team~a")]));
    let spec = busy.spec.as_mut().unwrap();
    spec.init_containers = Some(vec![
        Container {
            name: "migrate".into(),
            image: Some("migrate:1".into()),
            command: Some(vec!["/migrate".into()]),
            args: Some(vec!["--up".into()]),
            ..Container::default()
        },
        Container {
            name: "warm".into(),
            ..Container::default()
        },
    ]);
    spec.volumes = Some(vec![Volume {
        name: "data".into(),
        ..Volume::default()
    }]);
    spec.security_context = Some(PodSecurityContext {
        run_as_user: Some(1000),
        sysctls: Some(vec![
            Sysctl {
                name: "net.ipv4.ping_group_range".into(),
                value: "0 0".into(),
            },
            Sysctl {
                name: UNPRIVILEGED_PORT_SYSCTL.into(),
                value: "1024".into(),
            },
        ]),
        ..PodSecurityContext::default()
    });
    let mut unlabelled_spec_less = pod(&[], &[]);
    unlabelled_spec_less.metadata.labels = None;
    unlabelled_spec_less.spec = None;
    vec![bare, busy, unlabelled_spec_less]
}

#[test]
fn the_patch_applied_to_the_original_yields_exactly_the_injected_pod() {
    let snapshot = snapshot(vec![policy("web", NS, &[], rules(&[1, 8080, 31337], &[7]))]);
    for pod in pods_of_every_shape() {
        let injection = injection(decide(&pod, NS, &snapshot, &Settings::default()));
        assert_eq!(patched(&pod, &injection), injection.pod, "{pod:?}");
    }
}
