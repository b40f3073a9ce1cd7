//! The operator end to end against a real control plane (with controllers): the built operator
//! and sensor binaries, sensors in network namespaces, real `nmap -sT`, reports over HTTPS.
//!
//! Network tests need root, `ip` and `nmap`; with `CI=true` a missing one fails the test.
//! Traffic goes only to addresses inside the namespaces these tests create (10.232.x.0/24).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    ControlPlane, DEFAULT_SENSOR_IMAGE, FIELD_MANAGER, Operator, OperatorSettings, Options,
    PORTSENTRY_AUDIENCE, PodNet, injected_pod, install_crds, post_report, prerequisites, shared,
    wait_for, wait_result,
};
use serde_json::json;
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();
const DECOYS: &str = "1,79,111,31337,40421";

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

/// A namespace with policy `web` (selecting `app=web`, bans lasting `ban`, `ignore` never
/// banned) and two pods: `web-0` (selected) and `db-0` (not).
async fn namespace_with_policy(
    plane: &ControlPlane,
    namespace: &str,
    ban: &str,
    ignore: &[&str],
) -> Result<()> {
    let response = json!({"banDuration": ban, "maxActiveBans": 100000});
    namespace_with_policy_responding(plane, namespace, response, ignore).await
}

/// Like [`namespace_with_policy`], with the policy's whole `response`.
async fn namespace_with_policy_responding(
    plane: &ControlPlane,
    namespace: &str,
    response: serde_json::Value,
    ignore: &[&str],
) -> Result<()> {
    plane.ensure_namespace(namespace).await?;
    let client = plane.client()?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [1, 79, 111, 31337, 40421]},
            "detection": {"ignore": ignore},
            "response": response,
        }
    });
    Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .patch("web", &params, &Patch::Apply(policy))
        .await?;
    for (name, app) in [("web-0", "web"), ("db-0", "db")] {
        let pod = injected_pod(
            namespace,
            name,
            json!({"app": app}),
            "web",
            DEFAULT_SENSOR_IMAGE,
        );
        Api::<Pod>::namespaced(client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(pod))
            .await?;
    }
    Ok(())
}

fn report(sources: &[String]) -> Vec<u8> {
    let detections: Vec<_> = sources
        .iter()
        .map(|s| json!({"source": s, "probes": [
            {"port": 31337, "protocol": "TCP", "kind": "Connect", "verified": true, "observedAtMs": 1_780_000_000_000u64}
        ]}))
        .collect();
    serde_json::to_vec(&json!({
        "policy": {"kind": "PortSentryPolicy", "name": "web"},
        "detections": detections,
    }))
    .unwrap()
}

/// Every `except` prefix of the generated NetworkPolicies of `namespace`.
async fn excepted(client: &Client, namespace: &str) -> Result<Vec<IpNet>> {
    let list = Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=portsentry-operator"))
        .await?;
    Ok(list
        .items
        .iter()
        .filter_map(|np| np.spec.as_ref()?.ingress.as_ref())
        .flatten()
        .filter_map(|rule| rule.from.as_ref())
        .flatten()
        .filter_map(|peer| peer.ip_block.as_ref()?.except.as_ref())
        .flatten()
        .filter_map(|text| text.parse().ok())
        .collect())
}

fn holds(prefixes: &[IpNet], address: IpAddr) -> bool {
    prefixes.iter().any(|p| p.contains(&address))
}

async fn wait_enforced(
    client: &Client,
    namespace: &str,
    address: IpAddr,
    want: bool,
) -> Result<()> {
    let client = client.clone();
    let namespace = namespace.to_owned();
    wait_for(
        Duration::from_secs(30),
        &format!(
            "{address} {} the NetworkPolicy",
            if want { "in" } else { "out of" }
        ),
        move || {
            let (client, namespace) = (client.clone(), namespace.clone());
            async move { Ok(holds(&excepted(&client, &namespace).await?, address) == want) }.boxed()
        },
    )
    .await
}

fn web_ban_name(address: &str) -> String {
    format!("web-v4-{}", address.replace('.', "-"))
}

/// Starts the built sensor in `net`'s victim namespace as pod `web-0` of `namespace` would
/// run it: connect mode on the decoys, no local bans, reporting to `operator` with a token
/// bound to the pod (audience portsentry.io).
async fn start_reporting_sensor(
    plane: &ControlPlane,
    net: &mut PodNet,
    operator: &Operator,
    namespace: &str,
) -> Result<()> {
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await?;
    std::fs::write(net.path("token"), &token)?;
    std::fs::write(net.path("ca.crt"), &operator.ca_pem)?;
    let config = format!(
        "TCP_PORTS=\"{DECOYS}\"\nUDP_PORTS=\"\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\nBLOCK_UDP=\"0\"\nHISTORY_FILE=\"{h}\"\nBLOCKED_FILE=\"{b}\"\n",
        h = net.path("history").display(),
        b = net.path("blocked").display(),
    );
    let args = vec![
        "-tcp".to_owned(),
        format!("--report-url={}", operator.report_url),
        format!("--report-token-file={}", net.path("token").display()),
        format!("--report-ca-file={}", net.path("ca.crt").display()),
        "--report-policy=PortSentryPolicy/web".to_owned(),
    ];
    net.start_sensor(&config, &args).await
}

#[tokio::test]
async fn an_nmap_scan_of_a_pods_sensor_becomes_a_ban_enforced_until_it_expires() {
    if !prerequisites(&["ip", "nmap"]) {
        return;
    }
    let plane = control_plane().await.unwrap();
    let namespace = "e2e-scan";
    namespace_with_policy(plane, namespace, "20s", &[])
        .await
        .unwrap();
    let mut net = PodNet::new(1).unwrap();
    let mut settings = OperatorSettings::new("lease-e2e-scan");
    settings.report_ip = net.host_addr.parse().unwrap();
    let operator = Operator::start(plane, settings).await.unwrap();
    start_reporting_sensor(plane, &mut net, &operator, namespace)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let attacker: IpAddr = net.attacker_addr.parse().unwrap();
    let before = operator
        .metric("portsentry_operator_report_to_enforcement_seconds_count")
        .await
        .unwrap();

    let scanned = Instant::now();
    net.nmap_connect_scan(DECOYS).unwrap();
    wait_enforced(&client, namespace, attacker, true)
        .await
        .with_context(|| format!("sensor log:\n{}", net.sensor_log()))
        .unwrap();
    let enforced_after = scanned.elapsed();
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let ban = bans.get(&web_ban_name(&net.attacker_addr)).await.unwrap();
    assert_eq!(ban.spec.source.to_string(), attacker.to_string());
    assert_eq!(ban.spec.offences, 1);
    assert!(
        ban.spec
            .evidence
            .iter()
            .all(|e| e.reporter == format!("{namespace}/web-0"))
    );
    let after = operator
        .metric("portsentry_operator_report_to_enforcement_seconds_count")
        .await
        .unwrap();
    assert!(after > before, "report→enforcement histogram did not move");
    assert!(
        operator
            .metric("portsentry_operator_bans_added_total")
            .await
            .unwrap()
            >= 1.0
    );
    eprintln!("first decoy hit (nmap start) to NetworkPolicy stored: {enforced_after:?}");

    // Expiry, on time: not before expiresAt, and soon after it.
    let expires = ban.spec.expires_at.clone().unwrap().0;
    wait_enforced(&client, namespace, attacker, false)
        .await
        .unwrap();
    let lifted = jiff::Timestamp::now();
    let late = lifted.duration_since(expires);
    assert!(!late.is_negative(), "lifted {late:?} before expiry");
    assert!(late.as_secs_f64() < 5.0, "lifted {late:?} after expiry");
    // Kept for escalation (the default window is 7 days), and saying so.
    wait_marked_expired(&bans, &ban.name_any()).await.unwrap();
}

/// Waits until ban `name` says `Enforced=False`, reason `Expired` (kept, not enforced).
async fn wait_marked_expired(bans: &Api<PortSentryBan>, name: &str) -> Result<PortSentryBan> {
    let (bans, name) = (bans.clone(), name.to_owned());
    wait_result(
        Duration::from_secs(10),
        &format!("ban {name} kept and marked Expired"),
        move || {
            let (bans, name) = (bans.clone(), name.clone());
            async move {
                let ban = bans.get_opt(&name).await?;
                Ok(ban.filter(|ban| {
                    ban.status.as_ref().is_some_and(|s| {
                        s.conditions.iter().any(|c| {
                            c.type_ == "Enforced" && c.status == "False" && c.reason == "Expired"
                        })
                    })
                }))
            }
        },
    )
    .await
}

/// An operator on loopback for the refusal tests, and a namespace with its policy.
async fn operator_for(namespace: &str, extra: &[&str]) -> (&'static ControlPlane, Operator) {
    let plane = control_plane().await.unwrap();
    namespace_with_policy(plane, namespace, "1h", &["192.0.2.0/24"])
        .await
        .unwrap();
    let mut settings = OperatorSettings::new(&format!("lease-{namespace}"));
    settings.extra_args = extra.iter().map(|a| (*a).to_owned()).collect();
    let operator = Operator::start(plane, settings).await.unwrap();
    (plane, operator)
}

#[tokio::test]
async fn a_report_without_a_token_is_refused_with_401() {
    let (_plane, operator) = operator_for("refuse-no-token", &[]).await;
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        None,
        &report(&["203.0.113.7".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        operator
            .metric(r#"portsentry_operator_reports_refused_total{reason="missing_token"}"#)
            .await
            .unwrap(),
        1.0
    );
}

#[tokio::test]
async fn a_token_of_another_audience_is_refused_with_401() {
    let (plane, operator) = operator_for("refuse-audience", &[]).await;
    let token = plane
        .token_for_pod(
            "refuse-audience",
            "default",
            "web-0",
            "https://kubernetes.default.svc.cluster.local",
        )
        .await
        .unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&["203.0.113.7".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_token"), "{body}");
}

#[tokio::test]
async fn a_token_of_a_pod_the_policy_does_not_govern_is_refused_with_403() {
    let (plane, operator) = operator_for("refuse-governed", &[]).await;
    let token = plane
        .token_for_pod("refuse-governed", "default", "db-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&["203.0.113.7".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not_governed"), "{body}");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(
        plane.client().unwrap(),
        "refuse-governed",
    );
    wait_for(
        Duration::from_secs(10),
        "a ReportRefused Event on pod db-0",
        || {
            let events = events.clone();
            async move {
                Ok(events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("ReportRefused")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("db-0")
                    }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    let bans = Api::<PortSentryBan>::namespaced(plane.client().unwrap(), "refuse-governed");
    assert!(
        bans.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn a_flood_of_reports_from_one_sensor_is_refused_with_429() {
    let (plane, operator) =
        operator_for("refuse-flood", &["--report-burst=5", "--report-rate=1"]).await;
    let token = plane
        .token_for_pod("refuse-flood", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..12 {
        let (status, _) = post_report(
            &operator.report_url,
            &operator.ca_pem,
            Some(&token),
            &report(&[format!("203.0.113.{}", 10 + i)]),
        )
        .await
        .unwrap();
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(ok >= 5 && limited >= 5, "{statuses:?}");
    assert_eq!(ok + limited, statuses.len(), "{statuses:?}");
    assert_eq!(
        operator
            .metric(r#"portsentry_operator_reports_refused_total{reason="rate_limited"}"#)
            .await
            .unwrap(),
        limited as f64
    );
}

#[tokio::test]
async fn a_flood_of_bad_tokens_costs_a_bounded_number_of_reviews_and_never_holds_up_a_known_sensor()
{
    let (plane, operator) = operator_for(
        "refuse-bad-tokens",
        &["--review-burst=5", "--review-rate=0.1"],
    )
    .await;
    let token = plane
        .token_for_pod("refuse-bad-tokens", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let known = |i: u32| {
        let url = operator.report_url.clone();
        let ca = operator.ca_pem.clone();
        let token = token.clone();
        async move {
            post_report(
                &url,
                &ca,
                Some(&token),
                &report(&[format!("203.0.113.{i}")]),
            )
            .await
            .unwrap()
            .0
        }
    };
    assert_eq!(known(20).await, 200, "the sensor's token is reviewed once");
    let mut statuses = Vec::new();
    for i in 0..20 {
        let forged = format!("forged.token.{i}");
        let (status, _) = post_report(
            &operator.report_url,
            &operator.ca_pem,
            Some(&forged),
            &report(&["203.0.113.99".to_owned()]),
        )
        .await
        .unwrap();
        statuses.push(status);
    }
    let reviewed = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(reviewed >= 1 && limited >= 10, "{statuses:?}");
    assert_eq!(reviewed + limited, statuses.len(), "{statuses:?}");
    assert_eq!(known(21).await, 200, "a known sensor is not held up");
    assert_eq!(
        operator
            .metric(r#"portsentry_operator_reports_refused_total{reason="rate_limited"}"#)
            .await
            .unwrap(),
        limited as f64
    );
}

#[tokio::test]
async fn an_ignore_listed_attacker_is_never_banned() {
    let (plane, operator) = operator_for("ignore-listed", &[]).await;
    let token = plane
        .token_for_pod("ignore-listed", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let sources = vec![
        "192.0.2.9".to_owned(),
        "127.0.0.1".to_owned(),
        "10.96.0.1".to_owned(),
    ];
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&sources),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let outcome: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reasons: Vec<&str> = outcome["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["ignored", "loopback", "apiserver"], "{body}");
    let bans = Api::<PortSentryBan>::namespaced(plane.client().unwrap(), "ignore-listed");
    assert!(
        bans.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // The sensor ConfigMap injected pods mount is created by the operator for the policy.
    let config_maps = Api::<ConfigMap>::namespaced(plane.client().unwrap(), "ignore-listed");
    wait_for(
        Duration::from_secs(30),
        "ConfigMap portsentry-sensor-web with portsentry.conf",
        move || {
            let config_maps = config_maps.clone();
            async move {
                Ok(config_maps
                    .get_opt("portsentry-sensor-web")
                    .await?
                    .and_then(|c| c.data)
                    .is_some_and(|d| d.contains_key("portsentry.conf")))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_preexisting_restrictive_networkpolicy_is_never_widened() {
    let (plane, operator) = operator_for("never-widen", &[]).await;
    let client = plane.client().unwrap();
    let restrictive = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "only-frontend", "namespace": "never-widen"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}]
        }
    });
    let netpols = Api::<NetworkPolicy>::namespaced(client.clone(), "never-widen");
    netpols
        .patch(
            "only-frontend",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(restrictive),
        )
        .await
        .unwrap();
    let token = plane
        .token_for_pod("never-widen", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&["203.0.113.7".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), "never-widen");
    wait_for(
        Duration::from_secs(30),
        "Enforced=False ExistingNetworkPolicies",
        || {
            let policies = policies.clone();
            async move {
                let policy = policies.get("web").await?;
                Ok(policy
                    .status
                    .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Enforced"))
                    .is_some_and(|c| {
                        c.status == "False"
                            && c.reason == "ExistingNetworkPolicies"
                            && c.message.contains("only-frontend")
                    }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    let all = netpols.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = all.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(
        names,
        ["only-frontend"],
        "a generated policy would widen ingress"
    );
}

#[tokio::test]
async fn an_operator_killed_mid_way_and_restarted_loses_and_duplicates_nothing() {
    if !prerequisites(&["ip", "nmap"]) {
        return;
    }
    let plane = control_plane().await.unwrap();
    let namespace = "e2e-kill";
    namespace_with_policy(plane, namespace, "1h", &[])
        .await
        .unwrap();
    let mut net = PodNet::new(2).unwrap();
    let mut settings = OperatorSettings::new("lease-e2e-kill");
    settings.report_ip = net.host_addr.parse().unwrap();
    let mut operator = Operator::start(plane, settings).await.unwrap();
    start_reporting_sensor(plane, &mut net, &operator, namespace)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let attacker: IpAddr = net.attacker_addr.parse().unwrap();

    // The scan lands while the operator is down: the sensor keeps its report and retries.
    operator.kill();
    net.nmap_connect_scan(DECOYS).unwrap();
    wait_for(
        Duration::from_secs(20),
        "the sensor to fail a report while the operator is down",
        || {
            let log = net.sensor_log();
            async move { Ok(log.contains("report not delivered")) }
        },
    )
    .await
    .unwrap();
    operator.restart().await.unwrap();
    wait_enforced(&client, namespace, attacker, true)
        .await
        .with_context(|| format!("sensor log:\n{}", net.sensor_log()))
        .unwrap();

    // Killed again with the ban in force; a restart keeps it exactly as it was.
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let before = bans.get(&web_ban_name(&net.attacker_addr)).await.unwrap();
    operator.kill();
    operator.restart().await.unwrap();
    let policy_reconciles =
        r#"portsentry_operator_reconcile_duration_seconds_count{controller="policy"}"#;
    wait_for(
        Duration::from_secs(30),
        "the restarted operator to reconcile the policy",
        || async { Ok(operator.metric(policy_reconciles).await? >= 1.0) },
    )
    .await
    .unwrap();
    wait_enforced(&client, namespace, attacker, true)
        .await
        .unwrap();
    let all = bans.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        all.len(),
        1,
        "{:?}",
        all.iter().map(|b| b.name_any()).collect::<Vec<_>>()
    );
    assert_eq!(all[0].spec.offences, 1);
    assert_eq!(all[0].spec.expires_at, before.spec.expires_at);
    let generated = excepted(&client, namespace).await.unwrap();
    assert_eq!(
        generated.iter().filter(|p| p.contains(&attacker)).count(),
        1,
        "{generated:?}"
    );
}

#[tokio::test]
async fn watches_recover_after_an_apiserver_restart() {
    let plane = control_plane().await.unwrap();
    namespace_with_policy(plane, "apiserver-restart", "1h", &["192.0.2.0/24"])
        .await
        .unwrap();
    // The chart's lease (15 s) outlasts the outage; the tests' 3 s lease would not, and a
    // replica that cannot renew in time steps down by exiting (another replica leads).
    let mut settings = OperatorSettings::new("lease-apiserver-restart");
    settings.lease_duration_secs = 15;
    let operator = Operator::start(plane, settings).await.unwrap();
    plane
        .restart_apiserver(Duration::from_secs(2))
        .await
        .unwrap();
    let token = plane
        .token_for_pod("apiserver-restart", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = post_report(
            &operator.report_url,
            &operator.ca_pem,
            Some(&token),
            &report(&["203.0.113.77".into()]),
        )
        .await
        .unwrap();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Only the watch of bans (resumed after the restart) can bring the new ban to the controller.
    if let Err(error) = wait_enforced(
        &client,
        "apiserver-restart",
        "203.0.113.77".parse().unwrap(),
        true,
    )
    .await
    {
        panic!("{error}; the operator's log:\n{}", operator.log());
    }
}

#[tokio::test]
async fn ten_thousand_bans_in_one_policy_are_sharded_in_objects_under_one_mebibyte() {
    let (plane, operator) = operator_for("ten-thousand", &[]).await;
    let client = plane.client().unwrap();
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), "ten-thousand");
    // Every other address of 100.64.0.0/10: no two bans merge into one prefix.
    let addresses: Vec<Ipv4Addr> = (0..10_000u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 2 * i))
        .collect();
    let started = Instant::now();
    futures::stream::iter(addresses.clone())
        .map(|address| {
            let bans = bans.clone();
            async move {
                let name = web_ban_name(&address.to_string());
                let ban = json!({
                    "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
                    "metadata": {"name": name, "namespace": "ten-thousand"},
                    "spec": {"source": address.to_string(), "policy": {"kind": "PortSentryPolicy", "name": "web"}},
                });
                let ban: PortSentryBan = serde_json::from_value(ban).unwrap();
                bans.create(&PostParams::default(), &ban).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .unwrap();
    eprintln!("10,000 bans created in {:?}", started.elapsed());
    let netpols = Api::<NetworkPolicy>::namespaced(client.clone(), "ten-thousand");
    let wanted: BTreeSet<Ipv4Addr> = addresses.iter().copied().collect();
    let since = Instant::now();
    wait_for(Duration::from_secs(180), "all 10,000 bans enforced", || {
        let client = client.clone();
        let wanted = wanted.clone();
        async move {
            let prefixes = excepted(&client, "ten-thousand").await?;
            Ok(wanted.iter().all(|a| holds(&prefixes, IpAddr::V4(*a))))
        }
        .boxed()
    })
    .await
    .unwrap();
    eprintln!(
        "10,000 bans enforced {:?} after the last was created",
        since.elapsed()
    );
    let generated = netpols
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=portsentry-operator"))
        .await
        .unwrap()
        .items;
    assert!(
        generated.len() > 1,
        "10,000 prefixes in one object: not sharded"
    );
    for object in &generated {
        let size = serde_json::to_vec(object).unwrap().len();
        assert!(size < 1024 * 1024, "{} is {size} bytes", object.name_any());
    }
    eprintln!("{} NetworkPolicies", generated.len());

    // Full resync after a restart: leader again, 10,000 bans listed, the policy reconciled.
    let mut operator = operator;
    let restarted = Instant::now();
    operator.restart().await.unwrap();
    loop {
        let reconciled = operator
            .metric(r#"portsentry_operator_reconcile_duration_seconds_count{controller="policy"}"#)
            .await
            .unwrap_or(0.0);
        if reconciled >= 1.0 {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(120), "no resync");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "full resync of 10,000 bans after a restart: {:?}",
        restarted.elapsed()
    );
    let after = excepted(&client, "ten-thousand").await.unwrap();
    assert!(wanted.iter().all(|a| holds(&after, IpAddr::V4(*a))));
}

#[tokio::test]
async fn report_to_networkpolicy_latency_is_recorded_per_report() {
    let (plane, operator) =
        operator_for("latency", &["--report-burst=1000", "--report-rate=1000"]).await;
    let token = plane
        .token_for_pod("latency", "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let mut took = Vec::new();
    for i in 0..40u8 {
        let address: IpAddr = format!("198.51.100.{}", 2 * i + 1).parse().unwrap();
        let started = Instant::now();
        let (status, body) = post_report(
            &operator.report_url,
            &operator.ca_pem,
            Some(&token),
            &report(&[address.to_string()]),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        loop {
            if holds(&excepted(&client, "latency").await.unwrap(), address) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{address} never enforced"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    let p50 = took[took.len() / 2];
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    eprintln!(
        "report → NetworkPolicy stored over {} reports: p50 {p50:?}, p99 {p99:?}",
        took.len()
    );
    // The operator records the span right after the NetworkPolicy write the test has just
    // seen, so the last observation can trail the test's poll by a moment.
    let mut count = 0.0;
    for _ in 0..100 {
        count = operator
            .metric("portsentry_operator_report_to_enforcement_seconds_count")
            .await
            .unwrap();
        if count >= 40.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(count >= 40.0, "histogram count {count}");
}

#[tokio::test]
async fn first_decoy_hit_to_networkpolicy_latency_over_many_nmap_scans() {
    if !prerequisites(&["ip", "nmap"]) {
        return;
    }
    let plane = control_plane().await.unwrap();
    let namespace = "e2e-latency";
    namespace_with_policy(plane, namespace, "1h", &[])
        .await
        .unwrap();
    let mut net = PodNet::new(3).unwrap();
    let mut settings = OperatorSettings::new("lease-e2e-latency");
    settings.report_ip = net.host_addr.parse().unwrap();
    settings.extra_args = vec!["--report-burst=1000".into(), "--report-rate=1000".into()];
    let operator = Operator::start(plane, settings).await.unwrap();
    start_reporting_sensor(plane, &mut net, &operator, namespace)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let mut took = Vec::new();
    for i in 0..30u8 {
        let source = format!("10.232.3.{}", 10 + i);
        net.add_attacker_address(&source).unwrap();
        let address: IpAddr = source.parse().unwrap();
        let started = Instant::now();
        net.nmap_connect_scan_from(&source, "31337").unwrap();
        loop {
            if holds(&excepted(&client, namespace).await.unwrap(), address) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{address} never enforced; sensor log:\n{}",
                net.sensor_log()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        took.push(started.elapsed());
    }
    took.sort();
    let p50 = took[took.len() / 2];
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    eprintln!(
        "nmap -sT start → NetworkPolicy stored over {} scans: p50 {p50:?}, p99 {p99:?}, max {:?}",
        took.len(),
        took[took.len() - 1]
    );
    let bans = Api::<PortSentryBan>::namespaced(client, namespace);
    assert_eq!(
        bans.list(&ListParams::default()).await.unwrap().items.len(),
        30
    );
}

#[tokio::test]
async fn alert_hooks_get_each_ban_and_expiry_and_a_dead_hook_never_delays_enforcement() {
    let plane = control_plane().await.unwrap();
    let namespace = "alert-hooks";
    let cert = plane.issue_serving_cert(&["127.0.0.1"]).unwrap();
    let live = portsentry_tests::HttpServer::start(Some(&cert), |_| (200, b"{}".to_vec()))
        .await
        .unwrap();
    // A hook that accepts connections and never answers: every attempt times out.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = dead.accept().await {
            held.push(stream);
        }
    });
    let response = json!({
        "banDuration": "6s",
        "webhooks": [{"url": live.url("/hook"), "timeout": "2s"}, {"url": dead_url, "timeout": "1s"}],
    });
    namespace_with_policy_responding(plane, namespace, response, &[])
        .await
        .unwrap();
    let mut settings = OperatorSettings::new("lease-alert-hooks");
    settings.extra_args = vec![
        format!("--hook-ca-file={}", plane.dir().join("ca.crt").display()),
        // The test's hooks listen on loopback, which hooks may not target by default.
        "--hook-allow-cidr=127.0.0.1/32".to_owned(),
    ];
    let operator = Operator::start(plane, settings).await.unwrap();
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let client = plane.client().unwrap();
    let source: IpAddr = "203.0.113.50".parse().unwrap();
    let started = Instant::now();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&[source.to_string()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_enforced(&client, namespace, source, true)
        .await
        .unwrap();
    let enforced = started.elapsed();
    assert!(
        enforced < Duration::from_secs(1),
        "enforcement took {enforced:?}: delayed by a hook?"
    );

    let events = |kind: &'static str| {
        live.requests()
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .filter(|b| b["event"] == kind && b["source"] == "203.0.113.50")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while events("ban") < 1 || events("expiry") < 1 {
        assert!(Instant::now() < deadline, "hook saw {:?}", live.requests());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!((events("ban"), events("expiry")), (1, 1));
    wait_enforced(&client, namespace, source, false)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let failed = operator
            .metric(r#"portsentry_operator_hook_deliveries_total{result="failed"}"#)
            .await
            .unwrap();
        if failed >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead hook failures counted: {failed}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        operator
            .metric(r#"portsentry_operator_hook_deliveries_total{result="delivered"}"#)
            .await
            .unwrap()
            >= 2.0
    );
    silent.abort();
}

#[tokio::test]
async fn a_hook_aimed_at_loopback_is_refused_with_an_event_while_an_allowed_hook_is_delivered() {
    let plane = control_plane().await.unwrap();
    let namespace = "hostile-hooks";
    let live = portsentry_tests::HttpServer::start(None, |_| (200, b"{}".to_vec()))
        .await
        .unwrap();
    // A real listener on 127.0.0.2 (loopback, not allowed): it must never see a connection.
    let forbidden = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let forbidden_url = format!("http://{}/steal", forbidden.local_addr().unwrap());
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    let watcher = tokio::spawn(async move {
        while forbidden.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let response = json!({
        "banDuration": "1h",
        "webhooks": [{"url": forbidden_url, "timeout": "2s"}, {"url": live.url("/hook"), "timeout": "2s"}],
    });
    namespace_with_policy_responding(plane, namespace, response, &[])
        .await
        .unwrap();
    let mut settings = OperatorSettings::new("lease-hostile-hooks");
    settings.extra_args = vec!["--hook-allow-cidr=127.0.0.1/32".to_owned()];
    let operator = Operator::start(plane, settings).await.unwrap();
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&["203.0.113.60".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    let wait = Duration::from_secs(30);
    wait_for(wait, "the allowed hook to get the ban", || {
        let requests = live.requests();
        async move {
            Ok(requests
                .iter()
                .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
                .any(|b| b["event"] == "ban" && b["source"] == "203.0.113.60"))
        }
    })
    .await
    .unwrap();
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(plane.client().unwrap(), namespace);
    wait_for(wait, "a HookRefused Event on policy web", || {
        let events = events.clone();
        async move {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("HookRefused")
                        && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                            == Some("PortSentryPolicy")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
                        && e.note.as_deref().is_some_and(|n| n.contains("loopback"))
                }))
        }
    })
    .await
    .unwrap();
    assert!(
        operator
            .metric(r#"portsentry_operator_hook_refusals_total{reason="loopback"}"#)
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(reached.load(Ordering::SeqCst), 0);
    watcher.abort();
}

#[tokio::test]
async fn of_two_replicas_only_the_lease_holder_writes_and_the_other_takes_over_when_it_dies() {
    let plane = control_plane().await.unwrap();
    let namespace = "two-replicas";
    namespace_with_policy(plane, namespace, "1h", &[])
        .await
        .unwrap();
    let mut first = Operator::start(plane, OperatorSettings::new("lease-two-replicas"))
        .await
        .unwrap();
    let mut settings = OperatorSettings::new("lease-two-replicas");
    settings.identity = "operator-1".into();
    settings.wait_leading = false;
    let second = Operator::start(plane, settings).await.unwrap();
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    for _ in 0..20 {
        assert!(first.leading().await.unwrap());
        assert!(!second.leading().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = post_report(
        &second.report_url,
        &second.ca_pem,
        Some(&token),
        &report(&["203.0.113.61".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "a follower must not write");
    let client = plane.client().unwrap();
    let leases = Api::<Lease>::namespaced(client.clone(), "portsentry-system");
    let holder = |lease: Lease| lease.spec.unwrap().holder_identity.unwrap();
    assert_eq!(
        holder(leases.get("lease-two-replicas").await.unwrap()),
        "operator-0"
    );

    first.kill();
    let killed = Instant::now();
    while !second.leading().await.unwrap() {
        assert!(killed.elapsed() < Duration::from_secs(15), "no takeover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took_over = killed.elapsed();
    assert!(
        took_over >= Duration::from_secs(1),
        "took over {took_over:?} after the kill: before the lease expired?"
    );
    eprintln!("takeover {took_over:?} after the leader was killed (lease 3 s)");
    assert_eq!(
        holder(leases.get("lease-two-replicas").await.unwrap()),
        "operator-1"
    );
    let (status, body) = post_report(
        &second.report_url,
        &second.ca_pem,
        Some(&token),
        &report(&["203.0.113.62".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_enforced(&client, namespace, "203.0.113.62".parse().unwrap(), true)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_banned_pod_of_the_policys_namespace_is_quarantined_until_its_ban_expires() {
    let plane = control_plane().await.unwrap();
    let namespace = "quarantine";
    let response = json!({"banDuration": "6s", "quarantine": true});
    namespace_with_policy_responding(plane, namespace, response, &[])
        .await
        .unwrap();
    // A namespaced policy quarantines pods of its own namespace only (issue 13): the scanner
    // is a pod of the policy's namespace.
    let client = plane.client().unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let scanner = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "scanner", "namespace": namespace},
        "spec": {"containers": [{"name": "nmap", "image": "registry.invalid/nmap:1"}]}
    });
    pods.patch(
        "scanner",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(scanner),
    )
    .await
    .unwrap();
    // No kubelet here: the pod's address is set as a kubelet would report it.
    let status = json!({"status": {"podIP": "10.244.5.5", "podIPs": [{"ip": "10.244.5.5"}]}});
    pods.patch_status("scanner", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let operator = Operator::start(plane, OperatorSettings::new("lease-quarantine"))
        .await
        .unwrap();
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &report(&["10.244.5.5".into()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let quarantined = |want: bool| {
        let (pods, client) = (pods.clone(), client.clone());
        move || {
            let (pods, client) = (pods.clone(), client.clone());
            async move {
                let labelled = pods
                    .get("scanner")
                    .await?
                    .labels()
                    .get("portsentry.io/quarantined")
                    .is_some();
                let policy = Api::<NetworkPolicy>::namespaced(client, namespace)
                    .get_opt("portsentry-quarantine")
                    .await?;
                let denies_egress = policy.and_then(|p| p.spec).is_some_and(|s| {
                    s.policy_types == Some(vec!["Egress".to_owned()])
                        && s.egress.unwrap_or_default().is_empty()
                });
                Ok(labelled == want && denies_egress == want)
            }
            .boxed()
        }
    };
    wait_for(
        Duration::from_secs(20),
        "the scanner pod quarantined",
        quarantined(true),
    )
    .await
    .unwrap();
    wait_for(
        Duration::from_secs(30),
        "the quarantine lifted at expiry",
        quarantined(false),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_replica_whose_webhook_cannot_bind_is_not_ready_and_exits_non_zero() {
    let plane = control_plane().await.unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut settings = OperatorSettings::new("lease-webhook-taken");
    settings.identity = "operator-taken".into();
    settings.wait_leading = false;
    settings.extra_args = vec![
        format!("--webhook-addr=127.0.0.1:{port}"),
        "--webhook-dns-name=127.0.0.1".into(),
        "--webhook-ca-secret=taken-webhook-ca".into(),
    ];
    let mut operator = Operator::start(plane, settings).await.unwrap();
    let mut named = false;
    let status = loop {
        if let Some(status) = operator.wait_exit(Duration::ZERO).await.unwrap() {
            break status;
        }
        if let Ok((code, body)) = operator.operations_get("/readyz").await {
            assert_eq!(code, 503, "ready though its webhook is not serving: {body}");
            named |= body.contains(&format!("webhook: not listening on 127.0.0.1:{port}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(named, "/readyz never named the webhook's address");
    assert!(!status.success(), "exited {status} with its webhook down");
    assert!(
        operator.log().contains("injection webhook"),
        "the log does not say which task ended:\n{}",
        operator.log()
    );
    drop(taken);
}

#[tokio::test]
async fn a_sigtermed_leader_releases_its_lease_and_the_other_replica_leads_within_two_seconds() {
    let plane = control_plane().await.unwrap();
    let lease = "lease-handover";
    let mut first = Operator::start(plane, OperatorSettings::new(lease))
        .await
        .unwrap();
    let mut settings = OperatorSettings::new(lease);
    settings.identity = "operator-1".into();
    settings.wait_leading = false;
    let second = Operator::start(plane, settings).await.unwrap();
    let leases = Api::<Lease>::namespaced(plane.client().unwrap(), "portsentry-system");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get(lease).await.unwrap()).as_deref(),
        Some("operator-0")
    );

    first.terminate().unwrap();
    let terminated = Instant::now();
    while holder(leases.get(lease).await.unwrap()).as_deref() != Some("operator-1") {
        assert!(
            terminated.elapsed() < Duration::from_secs(10),
            "no handover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handover = terminated.elapsed();
    eprintln!("lease handed over {handover:?} after SIGTERM to the leader (lease 3 s)");
    assert!(
        handover < Duration::from_secs(2),
        "handover took {handover:?}"
    );
    let status = first.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(second.leading().await.unwrap());
}

const REPEAT_OFFENDER: &str = "198.51.100.77";

/// A namespace whose policy bans for `ban`, escalates within `window` up to `max`, and an
/// operator for it; returns the operator, the ban API and a token of the policy's pod.
async fn escalating(
    namespace: &str,
    ban: &str,
    max: &str,
    window: &str,
) -> (Operator, Api<PortSentryBan>, String) {
    let plane = control_plane().await.unwrap();
    let response = json!({
        "banDuration": ban, "maxBanDuration": max,
        "escalation": {"enabled": true, "window": window},
    });
    namespace_with_policy_responding(plane, namespace, response, &[])
        .await
        .unwrap();
    let operator = Operator::start(plane, OperatorSettings::new(&format!("lease-{namespace}")))
        .await
        .unwrap();
    let token = plane
        .token_for_pod(namespace, "default", "web-0", PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let bans = Api::<PortSentryBan>::namespaced(plane.client().unwrap(), namespace);
    (operator, bans, token)
}

/// Reports the repeat offender, waits until the NetworkPolicy excepts it, returns its ban.
async fn offend(operator: &Operator, token: &str, namespace: &str) -> PortSentryBan {
    let client = control_plane().await.unwrap().client().unwrap();
    let (status, body) = post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(token),
        &report(&[REPEAT_OFFENDER.to_owned()]),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let source: IpAddr = REPEAT_OFFENDER.parse().unwrap();
    wait_enforced(&client, namespace, source, true)
        .await
        .unwrap();
    Api::<PortSentryBan>::namespaced(client, namespace)
        .get(&web_ban_name(REPEAT_OFFENDER))
        .await
        .unwrap()
}

/// Seconds from the ban's lastSeen to its expiresAt.
fn ban_seconds(ban: &PortSentryBan) -> i64 {
    let seen = ban.spec.last_seen.as_ref().unwrap().0;
    let expires = ban.spec.expires_at.as_ref().unwrap().0;
    expires.duration_since(seen).as_secs()
}

/// Waits until the NetworkPolicy lets the repeat offender in again, then until its ban says
/// it expired (kept for escalation).
async fn serve_out(namespace: &str, bans: &Api<PortSentryBan>) -> PortSentryBan {
    let client = control_plane().await.unwrap().client().unwrap();
    let source: IpAddr = REPEAT_OFFENDER.parse().unwrap();
    wait_enforced(&client, namespace, source, false)
        .await
        .unwrap();
    wait_marked_expired(bans, &web_ban_name(REPEAT_OFFENDER))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_repeat_offence_within_the_window_after_expiry_doubles_the_ban() {
    let namespace = "escalation";
    let (operator, bans, token) = escalating(namespace, "4s", "1h", "1h").await;
    let first = offend(&operator, &token, namespace).await;
    assert_eq!((first.spec.offences, ban_seconds(&first)), (1, 4));
    let kept = serve_out(namespace, &bans).await;
    assert_eq!(kept.spec.offences, 1);
    let listed = control_plane()
        .await
        .unwrap()
        .kubectl()
        .unwrap()
        .args(["get", "psban", "-n", namespace])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    eprintln!("kubectl get psban after expiry:\n{listed}");
    let row = listed
        .lines()
        .find(|l| l.contains(REPEAT_OFFENDER))
        .unwrap_or_else(|| panic!("the expired ban is not listed:\n{listed}"));
    assert!(row.contains("False") && row.contains("Expired"), "{row}");

    let second = offend(&operator, &token, namespace).await;
    assert_eq!((second.spec.offences, ban_seconds(&second)), (2, 8));
    assert_eq!(second.spec.first_seen, first.spec.first_seen);
    let kept = serve_out(namespace, &bans).await;
    assert_eq!(kept.spec.offences, 2);
}

#[tokio::test]
async fn a_repeat_offence_is_never_banned_longer_than_max_ban_duration() {
    let namespace = "escalation-cap";
    let (operator, bans, token) = escalating(namespace, "4s", "6s", "1h").await;
    let first = offend(&operator, &token, namespace).await;
    assert_eq!((first.spec.offences, ban_seconds(&first)), (1, 4));
    serve_out(namespace, &bans).await;
    let second = offend(&operator, &token, namespace).await;
    assert_eq!((second.spec.offences, ban_seconds(&second)), (2, 6));
}

#[tokio::test]
async fn an_offence_after_the_window_is_forgotten_and_counts_as_a_first_one() {
    let namespace = "escalation-window";
    let (operator, bans, token) = escalating(namespace, "3s", "1h", "10s").await;
    let first = offend(&operator, &token, namespace).await;
    assert_eq!((first.spec.offences, ban_seconds(&first)), (1, 3));
    serve_out(namespace, &bans).await;
    // Deleted just after lastSeen + window.
    let name = web_ban_name(REPEAT_OFFENDER);
    let gone = {
        let (bans, name) = (bans.clone(), name.clone());
        move || {
            let (bans, name) = (bans.clone(), name.clone());
            async move { Ok(bans.get_opt(&name).await?.is_none()) }.boxed()
        }
    };
    wait_for(
        Duration::from_secs(20),
        "the ban deleted after its window",
        gone,
    )
    .await
    .unwrap();
    let forgotten_at = jiff::Timestamp::now();
    let window_end = first.spec.last_seen.as_ref().unwrap().0 + jiff::SignedDuration::from_secs(10);
    assert!(
        forgotten_at >= window_end,
        "deleted at {forgotten_at}, before the window ended at {window_end}"
    );
    let again = offend(&operator, &token, namespace).await;
    assert_eq!((again.spec.offences, ban_seconds(&again)), (1, 3));
    assert_ne!(again.spec.first_seen, first.spec.first_seen);
}
