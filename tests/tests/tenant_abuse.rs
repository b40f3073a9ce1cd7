//! The tenant as adversary (issue 13), on a real control plane with the built operator: forged
//! reports, bans of the cluster's infrastructure, hand-made wide bans, IPv6 rotation. For
//! each: no effect outside the tenant's namespace, the refusal visible (answer, metric,
//! Event), and a legitimate detection in the same run still bans the real scanner.
//!
//! No kubelet runs here: pods get their addresses as a kubelet would report them.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use anyhow::Result;
use futures::FutureExt;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    events::v1::Event,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    ControlPlane, DEFAULT_SENSOR_IMAGE, FIELD_MANAGER, Operator, OperatorSettings, Options,
    PORTSENTRY_AUDIENCE, injected_pod, install_crds, post_report, shared, wait_for,
};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();
const QUARANTINED: &str = "portsentry.io/quarantined";

async fn control_plane() -> Result<&'static ControlPlane> {
    let plane = shared(&CONTROL_PLANE, Options::with_controllers()).await?;
    SETUP
        .get_or_try_init(|| async {
            install_crds(&plane.client()?, Duration::from_secs(60))
                .await
                .map(|_| ())
        })
        .await?;
    Ok(plane)
}

/// Namespace `namespace` with policy `web` (selecting `app=web`, `response`) and its
/// genuine sensor pod `web-0`.
async fn tenant(plane: &ControlPlane, namespace: &str, response: Value) -> Result<()> {
    plane.ensure_namespace(namespace).await?;
    let client = plane.client()?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [1, 79, 31337]},
            "response": response,
        }
    });
    Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .patch("web", &params, &Patch::Apply(policy))
        .await?;
    let pod = injected_pod(
        namespace,
        "web-0",
        json!({"app": "web"}),
        "web",
        DEFAULT_SENSOR_IMAGE,
    );
    apply_pod(&client, pod, None).await
}

/// Applies `pod` and, when given, sets its address as a kubelet would.
async fn apply_pod(client: &Client, pod: Value, ip: Option<&str>) -> Result<()> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap().to_owned();
    let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    pods.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(pod),
    )
    .await?;
    if let Some(ip) = ip {
        let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
    }
    Ok(())
}

/// A plain pod (no sensor) `namespace/name` at `ip`.
async fn plain_pod(client: &Client, namespace: &str, name: &str, ip: &str) -> Result<()> {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}
    });
    apply_pod(client, pod, Some(ip)).await
}

fn report(sources: &[&str]) -> Vec<u8> {
    let detections: Vec<Value> = sources
        .iter()
        .map(|s| {
            json!({"source": s, "probes": [
                {"port": 31337, "protocol": "TCP", "kind": "Connect", "verified": true,
                 "observedAtMs": 1_780_000_000_000u64}
            ]})
        })
        .collect();
    serde_json::to_vec(&json!({
        "policy": {"kind": "PortSentryPolicy", "name": "web"},
        "detections": detections,
    }))
    .unwrap()
}

/// Posts a report of `sources` as pod `namespace/pod`: status and body.
async fn post_as(
    plane: &ControlPlane,
    operator: &Operator,
    namespace: &str,
    pod: &str,
    sources: &[&str],
) -> (u16, String) {
    let token = plane
        .token_for_pod(namespace, "default", pod, PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(sources),
    )
    .await
    .unwrap()
}

/// The outcomes of a 200 answer, as (outcome, detail) pairs.
fn outcomes(body: &str) -> Vec<(String, String)> {
    let value: Value = serde_json::from_str(body).unwrap();
    value["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let text = |key: &str| r[key].as_str().unwrap_or_default().to_owned();
            (text("outcome"), text("detail"))
        })
        .collect()
}

/// Waits for a Warning Event `reason` about `name` in `namespace` whose note contains `text`.
async fn wait_event(client: &Client, namespace: &str, name: &str, reason: &str, text: &str) {
    let (client, namespace, name, reason, text) = (
        client.clone(),
        namespace.to_owned(),
        name.to_owned(),
        reason.to_owned(),
        text.to_owned(),
    );
    wait_for(
        Duration::from_secs(20),
        &format!("Event {reason} on {namespace}/{name}"),
        move || {
            let (client, namespace, name, reason, text) = (
                client.clone(),
                namespace.clone(),
                name.clone(),
                reason.clone(),
                text.clone(),
            );
            async move {
                let events = Api::<Event>::namespaced(client, &namespace)
                    .list(&ListParams::default())
                    .await?;
                Ok(events.items.iter().any(|e| {
                    e.reason.as_deref() == Some(reason.as_str())
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(name.as_str())
                        && e.note.as_deref().unwrap_or_default().contains(&text)
                }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
}

async fn labelled(client: &Client, namespace: &str, name: &str) -> bool {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .unwrap()
        .labels()
        .contains_key(QUARANTINED)
}

async fn quarantine_policy(client: &Client, namespace: &str) -> Option<NetworkPolicy> {
    Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .get_opt("portsentry-quarantine")
        .await
        .unwrap()
}

async fn wait_quarantined(client: &Client, namespace: &str, name: &str) {
    let (client, namespace, name) = (client.clone(), namespace.to_owned(), name.to_owned());
    wait_for(
        Duration::from_secs(30),
        &format!("{namespace}/{name} quarantined"),
        move || {
            let (client, namespace, name) = (client.clone(), namespace.clone(), name.clone());
            async move {
                Ok(labelled(&client, &namespace, &name).await
                    && quarantine_policy(&client, &namespace).await.is_some())
            }
            .boxed()
        },
    )
    .await
    .unwrap();
}

async fn start_operator(plane: &ControlPlane, lease: &str) -> Operator {
    Operator::start(plane, OperatorSettings::new(lease))
        .await
        .unwrap()
}

#[tokio::test]
async fn forged_reports_are_refused_with_the_reason_and_the_genuine_sensor_still_bans() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-forged";
    tenant(plane, namespace, json!({"banDuration": "1h"}))
        .await
        .unwrap();
    // No sensor at all, selected by the policy.
    let bare = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                 "volumes": [{"name": "t", "projected": {"sources": [
                     {"serviceAccountToken": {"audience": "portsentry.io", "path": "token"}}]}}]}
    });
    apply_pod(&client, bare, None).await.unwrap();
    // The sensor as injected, plus an app container mounting the same token.
    let mut two = injected_pod(
        namespace,
        "two-tokens",
        json!({"app": "web"}),
        "web",
        DEFAULT_SENSOR_IMAGE,
    );
    two["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "portsentry-token", "mountPath": "/stolen"}]);
    apply_pod(&client, two, None).await.unwrap();
    // The sensor's arguments with another image.
    let wrong = injected_pod(
        namespace,
        "wrong-image",
        json!({"app": "web"}),
        "web",
        "registry.invalid/not-the-sensor:1",
    );
    apply_pod(&client, wrong, None).await.unwrap();
    let operator = start_operator(plane, "lease-abuse-forged").await;

    for (pod, why) in [
        ("bare", "no portsentry-sensor container"),
        ("two-tokens", "container app mounts a token"),
        ("wrong-image", "registry.invalid/not-the-sensor:1"),
    ] {
        let (status, body) = post_as(plane, &operator, namespace, pod, &["203.0.113.50"]).await;
        assert_eq!(status, 403, "{pod}: {body}");
        assert!(body.contains("not_injected_sensor"), "{pod}: {body}");
        assert!(body.contains(why), "{pod}: {body}");
        wait_event(&client, namespace, pod, "ReportRefused", why).await;
    }
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    assert!(
        bans.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "a forged report wrote a ban"
    );
    let refused = operator
        .metric(r#"portsentry_operator_reports_refused_total{reason="not_injected_sensor"}"#)
        .await
        .unwrap();
    assert!(refused >= 3.0, "{refused}");

    let (status, body) = post_as(plane, &operator, namespace, "web-0", &["203.0.113.50"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        outcomes(&body),
        [("banned".to_owned(), "web-v4-203-0-113-50".to_owned())]
    );
}

/// Infrastructure the cluster tells: a kube-system DNS pod and Service, a pod of the
/// operator's namespace, a Node, a Service of the tenant. Returns (dns pod, dns Service,
/// operator pod, node, tenant Service, API server) addresses.
async fn infrastructure(client: &Client, tenant: &str) -> [String; 6] {
    plane_pod_and_service(client).await;
    let dns_ip = cluster_ip(client, "kube-system", "kube-dns").await;
    plain_pod(
        client,
        "portsentry-system",
        "abuse-operator-0",
        "10.250.0.11",
    )
    .await
    .unwrap();
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "abuse-node"},
    });
    let nodes = Api::<Node>::all(client.clone());
    nodes
        .patch(
            "abuse-node",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(node),
        )
        .await
        .unwrap();
    let status =
        json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.12"}]}});
    nodes
        .patch_status("abuse-node", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "shop", "namespace": tenant},
        "spec": {"ports": [{"port": 80}]},
    });
    Api::<Service>::namespaced(client.clone(), tenant)
        .patch(
            "shop",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(service),
        )
        .await
        .unwrap();
    let shop_ip = cluster_ip(client, tenant, "shop").await;
    let apiserver_ip = cluster_ip(client, "default", "kubernetes").await;
    [
        "10.250.0.10".to_owned(),
        dns_ip,
        "10.250.0.11".to_owned(),
        "10.250.0.12".to_owned(),
        shop_ip,
        apiserver_ip,
    ]
}

/// A CoreDNS-like pod (10.250.0.10) and the `kube-dns` Service in kube-system.
async fn plane_pod_and_service(client: &Client) {
    plain_pod(client, "kube-system", "coredns-abuse", "10.250.0.10")
        .await
        .unwrap();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-dns"}},
        "spec": {"selector": {"app": "coredns-abuse"}, "ports": [{"port": 53, "protocol": "UDP"}]},
    });
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .patch(
            "kube-dns",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(service),
        )
        .await
        .unwrap();
}

async fn cluster_ip(client: &Client, namespace: &str, name: &str) -> String {
    Api::<Service>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap()
}

#[tokio::test]
async fn a_report_naming_the_clusters_infrastructure_bans_none_of_it_and_still_bans_the_scanner() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-infra";
    tenant(
        plane,
        namespace,
        json!({"banDuration": "1h", "quarantine": true}),
    )
    .await
    .unwrap();
    plain_pod(&client, namespace, "scanner", "10.250.1.20")
        .await
        .unwrap();
    plane.ensure_namespace("abuse-neighbour").await.unwrap();
    plain_pod(&client, "abuse-neighbour", "victim", "10.250.1.21")
        .await
        .unwrap();
    plane.ensure_namespace("portsentry-system").await.unwrap();
    let [dns_pod, dns, operator_pod, node, service, apiserver] =
        infrastructure(&client, namespace).await;
    let operator = start_operator(plane, "lease-abuse-infra").await;

    let sources = [
        dns_pod.as_str(),
        dns.as_str(),
        operator_pod.as_str(),
        node.as_str(),
        service.as_str(),
        apiserver.as_str(),
        "10.250.1.21",
        "10.250.1.20",
    ];
    let (status, body) = post_as(plane, &operator, namespace, "web-0", &sources).await;
    assert_eq!(status, 200, "{body}");
    let got = outcomes(&body);
    let protected = |why: &str| ("protected".to_owned(), why.to_owned());
    assert_eq!(
        got[..6],
        [
            protected("protected_namespace"),
            protected("cluster_dns"),
            protected("protected_namespace"),
            protected("node"),
            protected("service"),
            protected("apiserver"),
        ],
        "{body}"
    );
    assert_eq!(got[6].0, "banned", "{body}");
    assert_eq!(got[7].0, "banned", "{body}");

    // The scanner of the tenant's own namespace is quarantined; nobody elsewhere is.
    wait_quarantined(&client, namespace, "scanner").await;
    assert!(!labelled(&client, "kube-system", "coredns-abuse").await);
    assert!(!labelled(&client, "abuse-neighbour", "victim").await);
    assert!(quarantine_policy(&client, "kube-system").await.is_none());
    assert!(
        quarantine_policy(&client, "abuse-neighbour")
            .await
            .is_none()
    );
    wait_event(&client, namespace, "web", "BanRefused", "cluster_dns").await;
    for reason in [
        "cluster_dns",
        "protected_namespace",
        "node",
        "service",
        "apiserver",
    ] {
        let counted = operator
            .metric(&format!(
                r#"portsentry_operator_bans_refused_total{{reason="{reason}"}}"#
            ))
            .await
            .unwrap();
        assert!(counted >= 1.0, "{reason}: {counted}");
    }
}

#[tokio::test]
async fn hand_made_bans_of_a_tenant_reach_nothing_outside_its_namespace() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-wide";
    tenant(
        plane,
        namespace,
        json!({"banDuration": "1h", "quarantine": true}),
    )
    .await
    .unwrap();
    plane_pod_and_service(&client).await;
    plain_pod(&client, namespace, "scanner", "10.250.2.20")
        .await
        .unwrap();
    plane
        .ensure_namespace("abuse-wide-neighbour")
        .await
        .unwrap();
    plain_pod(&client, "abuse-wide-neighbour", "victim", "10.250.2.21")
        .await
        .unwrap();
    let operator = start_operator(plane, "lease-abuse-wide").await;
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let ban = |name: &str, source: &str| {
        serde_json::from_value::<PortSentryBan>(json!({
            "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": source, "policy": {"kind": "PortSentryPolicy", "name": "web"}},
        }))
        .unwrap()
    };
    // The whole Internet is refused by the API server itself.
    let everything = bans
        .create(&PostParams::default(), &ban("everything", "0.0.0.0/0"))
        .await;
    assert!(everything.is_err(), "{everything:?}");
    // A /8 holding kube-system's DNS pod and another tenant's pod; the DNS pod by name.
    for (name, source) in [("ten", "10.0.0.0/8"), ("dns", "10.250.0.10")] {
        bans.create(&PostParams::default(), &ban(name, source))
            .await
            .unwrap();
    }
    for name in ["ten", "dns"] {
        let (bans, owned) = (bans.clone(), name.to_owned());
        wait_for(
            Duration::from_secs(30),
            &format!("ban {name} Enforced=False ProtectedSource"),
            move || {
                let (bans, name) = (bans.clone(), owned.clone());
                async move {
                    let ban = bans.get(&name).await?;
                    Ok(ban.status.unwrap_or_default().conditions.iter().any(|c| {
                        c.type_ == "Enforced"
                            && c.status == "False"
                            && c.reason == "ProtectedSource"
                    }))
                }
                .boxed()
            },
        )
        .await
        .unwrap();
        // The refusal is visible on the ban and counted, once per ban.
        wait_event(
            &client,
            namespace,
            name,
            "BanRefused",
            "source is protected",
        )
        .await;
    }
    let counted: f64 = operator
        .metrics()
        .await
        .unwrap()
        .lines()
        .filter(|line| line.starts_with("portsentry_operator_bans_refused_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(
        counted >= 2.0,
        "hand-made protected bans counted: {counted}"
    );
    // A legitimate detection in the same run bans and quarantines the tenant's own scanner.
    let (status, body) = post_as(plane, &operator, namespace, "web-0", &["10.250.2.20"]).await;
    assert_eq!(status, 200, "{body}");
    wait_quarantined(&client, namespace, "scanner").await;
    assert!(!labelled(&client, "kube-system", "coredns-abuse").await);
    assert!(!labelled(&client, "abuse-wide-neighbour", "victim").await);
    assert!(quarantine_policy(&client, "kube-system").await.is_none());
    assert!(
        quarantine_policy(&client, "abuse-wide-neighbour")
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_scanner_rotating_through_its_ipv6_64_is_banned_as_the_network() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-v6";
    tenant(
        plane,
        namespace,
        json!({"banDuration": "1h", "maxActiveBans": 8}),
    )
    .await
    .unwrap();
    let operator = start_operator(plane, "lease-abuse-v6").await;
    let rotating: Vec<String> = (1..=40).map(|i| format!("2001:db8:64:64::{i:x}")).collect();
    let mut sources: Vec<&str> = rotating.iter().map(String::as_str).collect();
    sources.push("2001:db8:99::1");
    let (status, body) = post_as(plane, &operator, namespace, "web-0", &sources).await;
    assert_eq!(status, 200, "{body}");
    let got = outcomes(&body);
    assert!(
        got[4..40]
            .iter()
            .all(|(kind, name)| kind == "banned" && name.ends_with("-64")),
        "{body}"
    );
    assert_eq!(
        got[40],
        ("banned".to_owned(), "web-v6-2001-db8-99--1-128".to_owned())
    );
    let listed = Api::<PortSentryBan>::namespaced(client, namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let sources: Vec<String> = listed.iter().map(|b| b.spec.source.to_string()).collect();
    assert_eq!(listed.len(), 6, "{sources:?}");
    assert!(
        sources.contains(&"2001:db8:64:64::/64".to_owned()),
        "{sources:?}"
    );
}

/// Namespace `namespace` labelled `team=abuse` with a genuine sensor pod `web-0`.
async fn cluster_tenant(plane: &ControlPlane, namespace: &str) -> Result<()> {
    plane.ensure_namespace(namespace).await?;
    let client = plane.client()?;
    let labels = json!({"metadata": {"labels": {"team": "abuse"}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(namespace, &PatchParams::default(), &Patch::Merge(labels))
        .await?;
    let pod = injected_pod(
        namespace,
        "web-0",
        json!({"app": "web"}),
        "abuse-cluster",
        DEFAULT_SENSOR_IMAGE,
    );
    apply_pod(&client, pod, None).await
}

#[tokio::test]
async fn a_cluster_ban_on_one_namespaces_evidence_quarantines_elsewhere_only_once_corroborated() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    plane.ensure_namespace("portsentry-system").await.unwrap();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "ClusterPortSentryPolicy",
        "metadata": {"name": "abuse-cluster"},
        "spec": {
            "namespaceSelector": {"matchLabels": {"team": "abuse"}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [31337]},
            "response": {"banDuration": "1h", "quarantine": true},
        }
    });
    Api::<portsentry_crds::ClusterPortSentryPolicy>::all(client.clone())
        .patch(
            "abuse-cluster",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(policy),
        )
        .await
        .unwrap();
    for namespace in ["abuse-c1", "abuse-c2"] {
        cluster_tenant(plane, namespace).await.unwrap();
    }
    plane.ensure_namespace("abuse-c3").await.unwrap();
    plain_pod(&client, "abuse-c3", "scanner", "10.250.3.30")
        .await
        .unwrap();
    let operator = start_operator(plane, "lease-abuse-cluster").await;
    let body = serde_json::to_vec(&json!({
        "policy": {"kind": "ClusterPortSentryPolicy", "name": "abuse-cluster"},
        "detections": [{"source": "10.250.3.30", "probes": [
            {"port": 31337, "protocol": "TCP", "kind": "Connect", "verified": true,
             "observedAtMs": 1_780_000_000_000u64}]}],
    }))
    .unwrap();
    let post = |namespace: &'static str| {
        let (operator, body) = (&operator, body.clone());
        async move {
            let token = plane
                .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
                .await
                .unwrap();
            post_report(&operator.report_url, &operator.ca_pem, Some(&token), &body)
                .await
                .unwrap()
        }
    };
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), "portsentry-system");
    let name = "abuse-cluster-v4-10-250-3-30";

    // One namespace's sidecar: a ban confined to that namespace, nobody quarantined elsewhere.
    let (status, answer) = post("abuse-c1").await;
    assert_eq!(status, 200, "{answer}");
    let ban = bans.get(name).await.unwrap();
    assert_eq!(
        ban.labels()
            .get("portsentry.io/confined-to")
            .map(String::as_str),
        Some("abuse-c1")
    );
    let bans_c = bans.clone();
    wait_for(
        Duration::from_secs(30),
        "the confined ban Enforced=False Uncorroborated",
        move || {
            let bans = bans_c.clone();
            async move {
                let ban = bans.get(name).await?;
                Ok(ban.status.unwrap_or_default().conditions.iter().any(|c| {
                    c.type_ == "Enforced" && c.status == "False" && c.reason == "Uncorroborated"
                }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    assert!(!labelled(&client, "abuse-c3", "scanner").await);
    assert!(quarantine_policy(&client, "abuse-c3").await.is_none());

    // A second namespace's sidecar corroborates: the ban acts cluster-wide.
    let (status, answer) = post("abuse-c2").await;
    assert_eq!(status, 200, "{answer}");
    let ban = bans.get(name).await.unwrap();
    assert!(
        !ban.labels().contains_key("portsentry.io/confined-to"),
        "{:?}",
        ban.labels()
    );
    wait_quarantined(&client, "abuse-c3", "scanner").await;
}

/// A hand-made ban `name` of `source` in `namespace` for policy `web`.
fn hand_made(namespace: &str, name: &str, source: &str) -> PortSentryBan {
    serde_json::from_value(json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": source, "policy": {"kind": "PortSentryPolicy", "name": "web"}},
    }))
    .unwrap()
}

/// Waits until ban `namespace/name` says `Enforced=False ProtectedSource` naming `why`.
async fn wait_refused(client: &Client, namespace: &str, name: &str, why: &str) {
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let (name, why) = (name.to_owned(), format!("({why})"));
    wait_for(
        Duration::from_secs(30),
        &format!("ban {name} Enforced=False ProtectedSource {why}"),
        move || {
            let (bans, name, why) = (bans.clone(), name.clone(), why.clone());
            async move {
                let ban = bans.get(&name).await?;
                Ok(ban.status.unwrap_or_default().conditions.iter().any(|c| {
                    c.type_ == "Enforced"
                        && c.status == "False"
                        && c.reason == "ProtectedSource"
                        && c.message.contains(&why)
                }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn hand_made_bans_of_each_kind_of_infrastructure_are_refused_on_the_ban_with_an_event_and_a_metric()
 {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-handmade";
    tenant(plane, namespace, json!({"banDuration": "1h"}))
        .await
        .unwrap();
    plane.ensure_namespace("portsentry-system").await.unwrap();
    let [dns_pod, dns, operator_pod, node, service, apiserver] =
        infrastructure(&client, namespace).await;
    // A second API server endpoint, as an HA control plane lists it.
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "kubernetes-abuse", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.250.4.13"]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }))
    .unwrap();
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), "default")
        .patch(
            "kubernetes-abuse",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(slice),
        )
        .await
        .unwrap();
    let operator = Operator::start(
        plane,
        OperatorSettings {
            extra_args: vec!["--protected-cidr=198.51.100.0/24".to_owned()],
            ..OperatorSettings::new("lease-abuse-handmade")
        },
    )
    .await
    .unwrap();
    let cases = [
        ("kube-system-pod", dns_pod.as_str(), "protected_namespace"),
        ("cluster-dns", dns.as_str(), "cluster_dns"),
        ("operator-pod", operator_pod.as_str(), "protected_namespace"),
        ("node", node.as_str(), "node"),
        ("service", service.as_str(), "service"),
        ("apiserver-service", apiserver.as_str(), "apiserver"),
        ("apiserver-endpoint", "10.250.4.13", "apiserver"),
        ("protected-cidr", "198.51.100.7", "protected_cidr"),
    ];
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    for (name, source, _) in cases {
        bans.create(&PostParams::default(), &hand_made(namespace, name, source))
            .await
            .unwrap();
    }
    for (name, _, why) in cases {
        wait_refused(&client, namespace, name, why).await;
        wait_event(&client, namespace, name, "BanRefused", why).await;
    }
    for (_, _, why) in cases {
        let series = format!(r#"portsentry_operator_bans_refused_total{{reason="{why}"}}"#);
        let counted = operator.metric(&series).await.unwrap();
        assert!(counted >= 1.0, "{series}: {counted}");
    }
    // None of them is excepted in the generated NetworkPolicies.
    let generated = Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=portsentry-operator"))
        .await
        .unwrap();
    let text = serde_json::to_string(&generated.items).unwrap();
    for (name, source, _) in cases {
        assert!(!text.contains(&format!("\"{source}/")), "{name}: {text}");
    }
}

/// Every `Enforced` verdict (`status/reason`) ban `namespace/name` carries, in order, from
/// before it exists: a watch sees each status write, none coalesced away.
fn record_verdicts(
    client: &Client,
    namespace: &str,
    name: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use kube::runtime::watcher;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let api = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let record = seen.clone();
    tokio::spawn(async move {
        let events = watcher::watcher(api, config);
        futures::pin_mut!(events);
        while let Some(Ok(event)) = futures::StreamExt::next(&mut events).await {
            if let watcher::Event::Apply(ban) | watcher::Event::InitApply(ban) = event {
                for c in ban.status.unwrap_or_default().conditions {
                    let verdict = format!("{}/{}", c.status, c.reason);
                    let mut seen = record.lock().unwrap();
                    if c.type_ == "Enforced" && seen.last() != Some(&verdict) {
                        seen.push(verdict);
                    }
                }
            }
        }
    });
    seen
}

#[tokio::test]
async fn a_ban_made_right_after_a_service_or_node_of_its_address_is_refused_from_its_first_verdict()
{
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let namespace = "abuse-race";
    tenant(plane, namespace, json!({"banDuration": "1h"}))
        .await
        .unwrap();
    let _operator = start_operator(plane, "lease-abuse-race").await;
    // The operator runs and has judged a ban already: its protected set is loaded.
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    bans.create(
        &PostParams::default(),
        &hand_made(namespace, "warm-up", "203.0.113.60"),
    )
    .await
    .unwrap();
    let bans_w = bans.clone();
    wait_for(Duration::from_secs(30), "warm-up ban judged", move || {
        let bans = bans_w.clone();
        async move {
            let ban = bans.get("warm-up").await?;
            Ok(!ban.status.unwrap_or_default().conditions.is_empty())
        }
        .boxed()
    })
    .await
    .unwrap();

    let service_verdicts = record_verdicts(&client, namespace, "new-service");
    let node_verdicts = record_verdicts(&client, namespace, "new-node");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A Service, then at once a ban of its ClusterIP.
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "fresh", "namespace": namespace},
        "spec": {"ports": [{"port": 80}]},
    });
    let created = Api::<Service>::namespaced(client.clone(), namespace)
        .patch(
            "fresh",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(service),
        )
        .await
        .unwrap();
    let cluster_ip = created.spec.unwrap().cluster_ip.unwrap();
    bans.create(
        &PostParams::default(),
        &hand_made(namespace, "new-service", &cluster_ip),
    )
    .await
    .unwrap();
    // A Node, then at once a ban of its address.
    let nodes = Api::<Node>::all(client.clone());
    nodes
        .patch(
            "abuse-race-node",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": "abuse-race-node"},
            })),
        )
        .await
        .unwrap();
    let status =
        json!({"status": {"addresses": [{"type": "InternalIP", "address": "10.250.5.12"}]}});
    nodes
        .patch_status(
            "abuse-race-node",
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .unwrap();
    bans.create(
        &PostParams::default(),
        &hand_made(namespace, "new-node", "10.250.5.12"),
    )
    .await
    .unwrap();

    wait_refused(&client, namespace, "new-service", "service").await;
    wait_refused(&client, namespace, "new-node", "node").await;
    // Let any later verdict arrive, then: refused from the first verdict on, never enforced.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, verdicts) in [
        ("new-service", service_verdicts),
        ("new-node", node_verdicts),
    ] {
        let verdicts = verdicts.lock().unwrap().clone();
        assert_eq!(verdicts, ["False/ProtectedSource"], "{name}");
    }
}
