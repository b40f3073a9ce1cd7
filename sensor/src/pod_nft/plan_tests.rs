#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::*;

const T0: i64 = 1_780_000_000;
const OPERATOR: &str = "portsentry-system";

fn now() -> Timestamp {
    Timestamp::from_second(T0).unwrap()
}

fn pod(namespace: &str, name: &str, ip: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                     "labels": {"app": app}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
    .unwrap()
}

fn policy(namespace: &str, name: &str, app: &str, backends: &[&str]) -> PortSentryPolicy {
    serde_json::from_value(json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "decoys": {"tcp": [31337]},
                 "enforcement": {"backends": backends}},
    }))
    .unwrap()
}

fn cluster_policy(name: &str, tier: &str, app: Option<&str>) -> ClusterPortSentryPolicy {
    let mut spec = json!({
        "namespaceSelector": {"matchLabels": {"tier": tier}},
        "decoys": {"tcp": [31337]},
        "enforcement": {"backends": ["PodNftables"]},
    });
    if let Some(app) = app {
        spec["podSelector"] = json!({"matchLabels": {"app": app}});
    }
    serde_json::from_value(json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "ClusterPortSentryPolicy",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn ban(namespace: &str, kind: &str, policy: &str, source: &str) -> PortSentryBan {
    serde_json::from_value(json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": format!("b-{source}").replace(['/', ':'], "-"), "namespace": namespace},
        "spec": {"source": source, "policy": {"kind": kind, "name": policy}, "offences": 1,
                 "expiresAt": "2026-12-31T00:00:00Z"},
    }))
    .unwrap()
}

fn tenant_ban(namespace: &str, policy: &str, source: &str) -> PortSentryBan {
    ban(namespace, "PortSentryPolicy", policy, source)
}

fn cluster_ban(policy: &str, source: &str) -> PortSentryBan {
    ban(OPERATOR, "ClusterPortSentryPolicy", policy, source)
}

/// The world the tests plan for: pods, policies, namespace labels and bans.
#[derive(Default)]
struct World {
    pods: Vec<Pod>,
    policies: Vec<PortSentryPolicy>,
    cluster_policies: Vec<ClusterPortSentryPolicy>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    bans: Vec<PortSentryBan>,
    never: Vec<IpNet>,
    max_per_pod: Option<usize>,
}

impl World {
    fn plan(&self) -> Plan {
        let never = ban_watch::never_banned(self.never.iter().copied());
        plan(
            &Inputs {
                pods: &self.pods,
                policies: &self.policies,
                cluster_policies: &self.cluster_policies,
                namespaces: &self.namespaces,
                bans: &self.bans,
                operator_namespace: OPERATOR,
                never: &never,
                max_per_pod: self.max_per_pod.unwrap_or(4096),
            },
            now(),
        )
    }

    fn label_namespace(&mut self, namespace: &str, tier: &str) {
        self.namespaces.insert(
            namespace.to_owned(),
            BTreeMap::from([("tier".to_owned(), tier.to_owned())]),
        );
    }
}

/// The banned networks of each planned pod, by "namespace/name".
fn banned(plan: &Plan) -> BTreeMap<String, Vec<String>> {
    plan.pods
        .values()
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                p.elements.iter().map(|(n, _)| n.to_string()).collect(),
            )
        })
        .collect()
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(pod, nets)| {
            (
                (*pod).to_owned(),
                nets.iter().map(|n| (*n).to_owned()).collect(),
            )
        })
        .collect()
}

#[test]
fn a_tenants_ban_never_reaches_another_namespaces_pods() {
    let world = World {
        pods: vec![
            pod("shop", "web-1", "10.244.0.11", "web"),
            pod("bank", "web-1", "10.244.0.21", "web"),
        ],
        policies: vec![
            policy("shop", "web", "web", &["PodNftables"]),
            policy("bank", "web", "web", &["PodNftables"]),
        ],
        bans: vec![tenant_ban("shop", "web", "203.0.113.7")],
        ..World::default()
    };
    assert_eq!(
        banned(&world.plan()),
        expect(&[("bank/web-1", &[]), ("shop/web-1", &["203.0.113.7/32"])])
    );
}

#[test]
fn a_namespaced_ban_reaches_every_pod_its_policy_selects_and_no_other() {
    let world = World {
        pods: vec![
            pod("shop", "web-1", "10.244.0.11", "web"),
            pod("shop", "web-2", "10.244.0.12", "web"),
            pod("shop", "db-1", "10.244.0.13", "db"),
        ],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![tenant_ban("shop", "web", "203.0.113.7")],
        ..World::default()
    };
    assert_eq!(
        banned(&world.plan()),
        expect(&[
            ("shop/web-1", &["203.0.113.7/32"]),
            ("shop/web-2", &["203.0.113.7/32"]),
        ])
    );
}

#[test]
fn a_ban_naming_another_policy_of_the_namespace_is_not_this_policys() {
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![
            policy("shop", "web", "web", &["PodNftables"]),
            policy("shop", "db", "db", &["PodNftables"]),
        ],
        bans: vec![tenant_ban("shop", "db", "203.0.113.7")],
        ..World::default()
    };
    assert_eq!(banned(&world.plan()), expect(&[("shop/web-1", &[])]));
}

#[test]
fn a_ban_in_another_namespace_naming_a_same_named_policy_is_ignored() {
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![tenant_ban("evil", "web", "203.0.113.7")],
        ..World::default()
    };
    assert_eq!(banned(&world.plan()), expect(&[("shop/web-1", &[])]));
}

#[test]
fn policies_without_the_pod_nftables_backend_select_no_pod() {
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["NetworkPolicy"])],
        bans: vec![tenant_ban("shop", "web", "203.0.113.7")],
        ..World::default()
    };
    assert!(world.plan().pods.is_empty());
}

#[test]
fn a_cluster_policys_bans_reach_the_pods_it_selects_in_the_namespaces_it_selects() {
    let mut world = World {
        pods: vec![
            pod("shop", "web-1", "10.244.0.11", "web"),
            pod("shop", "db-1", "10.244.0.12", "db"),
            pod("bank", "web-1", "10.244.0.21", "web"),
            pod("lab", "web-1", "10.244.0.31", "web"),
        ],
        cluster_policies: vec![cluster_policy("edge", "prod", Some("web"))],
        bans: vec![cluster_ban("edge", "198.51.100.0/24")],
        ..World::default()
    };
    world.label_namespace("shop", "prod");
    world.label_namespace("bank", "prod");
    world.label_namespace("lab", "test");
    assert_eq!(
        banned(&world.plan()),
        expect(&[
            ("bank/web-1", &["198.51.100.0/24"]),
            ("shop/web-1", &["198.51.100.0/24"]),
        ])
    );
}

#[test]
fn a_cluster_ban_outside_the_operators_namespace_is_ignored() {
    let mut world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        cluster_policies: vec![cluster_policy("edge", "prod", None)],
        bans: vec![ban(
            "shop",
            "ClusterPortSentryPolicy",
            "edge",
            "203.0.113.7",
        )],
        ..World::default()
    };
    world.label_namespace("shop", "prod");
    assert_eq!(banned(&world.plan()), expect(&[("shop/web-1", &[])]));
}

#[test]
fn a_cluster_ban_confined_to_one_namespace_reaches_only_that_namespaces_pods() {
    let mut confined = cluster_ban("edge", "203.0.113.7");
    confined.metadata.labels = Some(BTreeMap::from([(
        CONFINED_LABEL.to_owned(),
        "shop".to_owned(),
    )]));
    let mut world = World {
        pods: vec![
            pod("shop", "web-1", "10.244.0.11", "web"),
            pod("bank", "web-1", "10.244.0.21", "web"),
        ],
        cluster_policies: vec![cluster_policy("edge", "prod", None)],
        bans: vec![confined],
        ..World::default()
    };
    world.label_namespace("shop", "prod");
    world.label_namespace("bank", "prod");
    assert_eq!(
        banned(&world.plan()),
        expect(&[("bank/web-1", &[]), ("shop/web-1", &["203.0.113.7/32"])])
    );
}

#[test]
fn a_pod_two_policies_select_gets_the_bans_of_both() {
    let mut world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy(
            "shop",
            "web",
            "web",
            &["NetworkPolicy", "PodNftables"],
        )],
        cluster_policies: vec![cluster_policy("edge", "prod", None)],
        bans: vec![
            tenant_ban("shop", "web", "203.0.113.7"),
            cluster_ban("edge", "198.51.100.9"),
        ],
        ..World::default()
    };
    world.label_namespace("shop", "prod");
    assert_eq!(
        banned(&world.plan()),
        expect(&[("shop/web-1", &["198.51.100.9/32", "203.0.113.7/32"])])
    );
}

#[test]
fn host_network_system_and_operator_pods_are_never_entered() {
    let mut host = pod("shop", "node-agent", "10.0.0.5", "web");
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut world = World {
        pods: vec![
            host,
            pod("kube-system", "coredns", "10.244.0.2", "web"),
            pod(OPERATOR, "operator", "10.244.0.3", "web"),
        ],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        cluster_policies: vec![cluster_policy("edge", "all", None)],
        ..World::default()
    };
    for namespace in ["shop", "kube-system", OPERATOR] {
        world.label_namespace(namespace, "all");
    }
    assert!(world.plan().pods.is_empty());
}

#[test]
fn pods_without_an_address_or_finished_are_left_alone() {
    let mut pending = pod("shop", "web-1", "10.244.0.11", "web");
    let status = pending.status.as_mut().unwrap();
    status.pod_ip = None;
    status.pod_ips = None;
    let mut done = pod("shop", "web-2", "10.244.0.12", "web");
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    let world = World {
        pods: vec![pending, done],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        ..World::default()
    };
    assert!(world.plan().pods.is_empty());
}

#[test]
fn the_pods_own_address_and_the_nodes_are_never_installed() {
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![
            tenant_ban("shop", "web", "10.244.0.11"),
            tenant_ban("shop", "web", "10.244.0.0/24"),
            tenant_ban("shop", "web", "10.0.0.5"),
            tenant_ban("shop", "web", "127.0.0.1"),
            tenant_ban("shop", "web", "203.0.113.7"),
        ],
        never: vec!["10.0.0.5/32".parse().unwrap()],
        ..World::default()
    };
    let plan = world.plan();
    assert_eq!(
        banned(&plan),
        expect(&[("shop/web-1", &["203.0.113.7/32"])])
    );
    assert_eq!(plan.skipped.get(&Skip::Protected), Some(&4));
}

#[test]
fn a_prefix_containing_an_ignored_address_is_refused_whole() {
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![tenant_ban("shop", "web", "192.0.2.0/24")],
        never: vec!["192.0.2.77/32".parse().unwrap()],
        ..World::default()
    };
    let plan = world.plan();
    assert_eq!(banned(&plan), expect(&[("shop/web-1", &[])]));
    assert_eq!(plan.skipped.get(&Skip::Protected), Some(&1));
}

#[test]
fn past_the_cap_the_longest_lived_bans_stay_and_the_rest_are_counted() {
    let mut short = tenant_ban("shop", "web", "203.0.113.1");
    short.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(T0 + 30).unwrap(),
    ));
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![
            short,
            tenant_ban("shop", "web", "203.0.113.2"),
            tenant_ban("shop", "web", "203.0.113.3"),
        ],
        max_per_pod: Some(2),
        ..World::default()
    };
    let plan = world.plan();
    assert_eq!(
        banned(&plan),
        expect(&[("shop/web-1", &["203.0.113.2/32", "203.0.113.3/32"])])
    );
    assert_eq!(plan.skipped.get(&Skip::OverCap), Some(&1));
}

#[test]
fn elements_expire_with_their_ban() {
    let mut soon = tenant_ban("shop", "web", "203.0.113.1");
    soon.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(T0 + 90).unwrap(),
    ));
    let mut gone = tenant_ban("shop", "web", "203.0.113.2");
    gone.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::from_second(T0 - 1).unwrap(),
    ));
    let world = World {
        pods: vec![pod("shop", "web-1", "10.244.0.11", "web")],
        policies: vec![policy("shop", "web", "web", &["PodNftables"])],
        bans: vec![soon, gone],
        ..World::default()
    };
    let table = &world.plan().pods["uid-shop-web-1"];
    assert_eq!(
        table.elements,
        vec![(
            "203.0.113.1/32".parse().unwrap(),
            Some(Duration::from_secs(90))
        )]
    );
}
