//! The never-widen property over a whole reconcile plan, against a model of NetworkPolicy
//! semantics and of the policy layers beside it written independently of the code under
//! test: random pre-existing NetworkPolicies, Cilium/Calico policies and
//! BaselineAdminNetworkPolicies, pods (some created only after the check), and bans of
//! external, pod and node addresses, some written IPv4-mapped.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{Pod as KubePod, PodStatus},
        networking::v1::{
            IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
        },
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::api::{ApiResource, DynamicObject};
use portsentry_crds::{
    PolicyKind, PolicyRef, PolicyRules, PortSentryBan, PortSentryBanSpec, PortSentryPolicy,
    PortSentryPolicySpec,
};
use proptest::prelude::*;
use serde_json::json;

use crate::{
    enforce::bans::{self, Guards},
    policy::{
        layers::{self, LayerObject},
        plan::{self, Observed},
        status::Enforcement,
    },
};

const POD_RANGE: &str = "10.244.0.0/16";
const NODES: [&str; 2] = ["192.168.0.1", "192.168.0.2"];
const EXTERNAL: [&str; 8] = [
    "203.0.113.1",
    "203.0.113.2",
    "203.0.113.3",
    "203.0.113.130",
    "198.51.100.1",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8:1::1",
];
const CIDRS: [&str; 10] = [
    "0.0.0.0/0",
    "203.0.113.0/24",
    "203.0.113.0/25",
    "198.51.100.0/30",
    "10.244.0.0/16",
    "192.168.0.0/24",
    "10.0.0.0/8",
    "::/0",
    "2001:db8::/32",
    "2001:db8::/64",
];

// ---- The model. ----

#[derive(Clone, Debug)]
struct Pod {
    namespace: &'static str,
    name: String,
    labels: BTreeMap<String, String>,
    ip: IpAddr,
}

#[derive(Clone, Debug)]
enum Source {
    /// Outside the cluster, or a node (an `ipBlock` matches both).
    Address(IpAddr),
    Pod(Pod),
}

impl Source {
    fn ip(&self) -> IpAddr {
        match self {
            Source::Address(ip) => *ip,
            Source::Pod(pod) => pod.ip,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum LayerKind {
    /// Allows unioned with NetworkPolicy allows (`fromCIDR` matches no pod).
    Cilium,
    /// The same for the model; its selector language is not evaluated by the operator.
    Calico,
    /// Denies all ingress to its subjects unless a NetworkPolicy selects them.
    Baseline,
}

#[derive(Clone, Debug)]
struct Layer {
    kind: LayerKind,
    namespace: &'static str,
    selects: BTreeMap<String, String>,
    allows: Vec<IpNet>,
}

/// matchLabels-only selectors (what the generators make); empty selects everything.
fn model_selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    selector
        .and_then(|s| s.match_labels.as_ref())
        .is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn label_match(want: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn model_peer(peer: &NetworkPolicyPeer, source: &Source, to: &Pod, sees_pods: bool) -> bool {
    if let Some(block) = &peer.ip_block {
        if matches!(source, Source::Pod(_)) && !sees_pods {
            return false;
        }
        let cidr: IpNet = block.cidr.parse().unwrap();
        let ip = source.ip();
        return cidr.contains(&ip)
            && !block
                .except
                .iter()
                .flatten()
                .any(|e| e.parse::<IpNet>().unwrap().contains(&ip));
    }
    let Source::Pod(pod) = source else {
        return false;
    };
    let namespace_ok = match &peer.namespace_selector {
        Some(_) => true, // the generators only make `{}`
        None => pod.namespace == to.namespace,
    };
    namespace_ok && model_selects(peer.pod_selector.as_ref(), &pod.labels)
}

fn model_allows(
    policies: &[NetworkPolicy],
    layers: &[Layer],
    source: &Source,
    to: &Pod,
    sees_pods: bool,
) -> bool {
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| {
            let spec = p.spec.as_ref().unwrap();
            let ingress = match &spec.policy_types {
                None => true,
                Some(types) => types.iter().any(|t| t == "Ingress"),
            };
            ingress && model_selects(spec.pod_selector.as_ref(), &to.labels)
        })
        .collect();
    let unioned: Vec<&Layer> = layers
        .iter()
        .filter(|l| l.kind != LayerKind::Baseline && l.namespace == to.namespace)
        .filter(|l| label_match(&l.selects, &to.labels))
        .collect();
    if !selecting.is_empty() || !unioned.is_empty() {
        let by_policy = selecting.iter().any(|p| {
            p.spec
                .as_ref()
                .unwrap()
                .ingress
                .iter()
                .flatten()
                .any(|rule| match &rule.from {
                    None => true,
                    Some(peers) if peers.is_empty() => true,
                    Some(peers) => peers
                        .iter()
                        .any(|peer| model_peer(peer, source, to, sees_pods)),
                })
        });
        let by_layer = unioned.iter().any(|l| {
            matches!(source, Source::Address(_))
                && l.allows.iter().any(|n| n.contains(&source.ip()))
        });
        return by_policy || by_layer;
    }
    !layers
        .iter()
        .any(|l| l.kind == LayerKind::Baseline && label_match(&l.selects, &to.labels))
}

/// A ban's source as traffic carries it: an IPv4-mapped prefix is the IPv4 one it maps.
fn model_net(ban: &str) -> IpNet {
    let net: IpNet = ban
        .parse()
        .unwrap_or_else(|_| IpNet::from(ban.parse::<IpAddr>().unwrap()));
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap(),
            None => net,
        },
        other => other.trunc(),
    }
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

// ---- Generators. ----

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        prop::option::of(prop::sample::select(vec!["a", "b", "c"])),
        prop::option::of(prop::sample::select(vec!["x", "y"])),
    )
        .prop_map(|(app, tier)| {
            let mut l = BTreeMap::new();
            if let Some(app) = app {
                l.insert("app".into(), app.into());
            }
            if let Some(tier) = tier {
                l.insert("tier".into(), tier.into());
            }
            l
        })
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    arb_labels().prop_map(|l| LabelSelector {
        match_labels: (!l.is_empty()).then_some(l),
        match_expressions: None,
    })
}

fn arb_peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        (
            prop::sample::select(CIDRS.to_vec()),
            prop::collection::vec(prop::sample::select(EXTERNAL.to_vec()), 0..3)
        )
            .prop_map(|(cidr, excepts)| {
                let net: IpNet = cidr.parse().unwrap();
                let except: Vec<String> = excepts
                    .iter()
                    .map(|e| IpNet::from(e.parse::<IpAddr>().unwrap()))
                    .filter(|e| net.contains(e) && *e != net)
                    .map(|e| e.to_string())
                    .collect();
                NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: cidr.into(),
                        except: (!except.is_empty()).then_some(except),
                    }),
                    ..NetworkPolicyPeer::default()
                }
            }),
        arb_selector().prop_map(|s| NetworkPolicyPeer {
            pod_selector: Some(s),
            ..NetworkPolicyPeer::default()
        }),
        prop::option::of(arb_selector()).prop_map(|s| NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: s,
            ..NetworkPolicyPeer::default()
        }),
    ]
}

fn arb_network_policy() -> impl Strategy<Value = NetworkPolicy> {
    let types = prop::sample::select(vec![
        None,
        Some(vec!["Ingress"]),
        Some(vec!["Egress"]),
        Some(vec!["Ingress", "Egress"]),
    ]);
    let rule = prop::option::of(prop::collection::vec(arb_peer(), 0..3))
        .prop_map(|from| NetworkPolicyIngressRule { from, ports: None });
    (
        arb_selector(),
        types,
        prop::collection::vec(rule, 0..3),
        0u32..1000,
    )
        .prop_map(|(select, types, rules, n)| NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("existing-{n}")),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(select),
                policy_types: types.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
                ingress: (!rules.is_empty()).then_some(rules),
                egress: None,
            }),
        })
}

fn arb_layer() -> impl Strategy<Value = Layer> {
    (
        prop::sample::select(vec![
            LayerKind::Cilium,
            LayerKind::Calico,
            LayerKind::Baseline,
        ]),
        prop::sample::select(vec!["shop", "other"]),
        arb_labels(),
        prop::collection::vec(prop::sample::select(CIDRS.to_vec()), 0..2),
    )
        .prop_map(|(kind, namespace, selects, allows)| Layer {
            kind,
            namespace,
            selects,
            allows: allows.iter().map(|c| c.parse().unwrap()).collect(),
        })
}

/// Bans as users (or the intake) write them: external, pod and node addresses, plain or
/// IPv4-mapped, and prefixes around them.
fn arb_ban() -> impl Strategy<Value = String> {
    let address = prop_oneof![
        prop::sample::select(EXTERNAL.to_vec()).prop_map(String::from),
        prop::sample::select(NODES.to_vec()).prop_map(String::from),
        (1u32..6).prop_map(|i| format!("10.244.0.{i}")),
        (1u32..4).prop_map(|i| format!("10.244.1.{i}")),
        (1u32..4).prop_map(|i| format!("10.244.2.{i}")),
    ];
    prop_oneof![
        (address, any::<bool>()).prop_map(|(a, mapped)| {
            if mapped && !a.contains(':') {
                format!("::ffff:{a}")
            } else {
                a
            }
        }),
        prop::sample::select(vec![
            "203.0.113.0/30",
            "::ffff:203.0.113.0/126",
            "10.244.0.0/16",
            "10.0.0.0/8",
            "192.168.0.0/24",
            "2001:db8::/64",
        ])
        .prop_map(String::from),
    ]
}

// ---- The operator's inputs, from the model. ----

fn pods(namespace: &'static str, subnet: u8, labels: Vec<BTreeMap<String, String>>) -> Vec<Pod> {
    labels
        .into_iter()
        .enumerate()
        .map(|(i, labels)| Pod {
            namespace,
            name: format!("{namespace}-{subnet}-{i}"),
            labels,
            ip: format!("10.244.{subnet}.{}", i + 1).parse().unwrap(),
        })
        .collect()
}

fn kube_pod(pod: &Pod) -> Arc<KubePod> {
    Arc::new(KubePod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.into()),
            labels: Some(pod.labels.clone()),
            ..ObjectMeta::default()
        },
        status: Some(PodStatus {
            pod_ip: Some(pod.ip.to_string()),
            ..PodStatus::default()
        }),
        ..KubePod::default()
    })
}

fn layer_object(layer: &Layer, index: usize) -> LayerObject {
    let selector = json!({"matchLabels": layer.selects});
    let (kind, namespace, spec) = match layer.kind {
        LayerKind::Cilium => (
            "CiliumNetworkPolicy",
            Some(layer.namespace),
            json!({"endpointSelector": selector, "ingress": [{"fromCIDR": layer.allows}]}),
        ),
        LayerKind::Calico => {
            let expression: Vec<String> = layer
                .selects
                .iter()
                .map(|(k, v)| format!("{k} == '{v}'"))
                .collect();
            (
                "NetworkPolicy",
                Some(layer.namespace),
                json!({"selector": expression.join(" && ")}),
            )
        }
        LayerKind::Baseline => (
            "BaselineAdminNetworkPolicy",
            None,
            json!({"subject": {"pods": {"namespaceSelector": {}, "podSelector": selector}},
                   "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}),
        ),
    };
    let mut object = DynamicObject::new(
        &format!("layer-{index}"),
        &ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: kind.into(),
            plural: "x".into(),
        },
    );
    object.metadata.namespace = namespace.map(str::to_owned);
    object.data = json!({"spec": spec});
    layers::layer_object(kind, &object)
}

fn policy(selector: LabelSelector) -> PortSentryPolicy {
    let mut rules = PolicyRules::default();
    rules.enforcement.max_prefixes_per_object = 2;
    PortSentryPolicy {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("uid-web".into()),
            generation: Some(1),
            creation_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            )),
            ..ObjectMeta::default()
        },
        spec: PortSentryPolicySpec {
            pod_selector: selector,
            rules,
        },
        status: None,
    }
}

fn ban(source: &str) -> Arc<PortSentryBan> {
    let source = source.parse().unwrap();
    let mut ban = PortSentryBan::new(
        &bans::ban_name("web", &source),
        PortSentryBanSpec {
            source,
            policy: PolicyRef {
                kind: PolicyKind::PortSentryPolicy,
                name: "web".into(),
            },
            first_seen: None,
            last_seen: None,
            offences: 1,
            expires_at: None,
            reason: None,
            evidence: Vec::new(),
        },
    );
    ban.metadata.namespace = Some("shop".into());
    Arc::new(ban)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the operator plans: no (source, pod) pair can connect that could not before,
    /// for pods that exist at the check and pods created after it, beside NetworkPolicies and
    /// other policy layers alike; a ban it says NetworkPolicy enforces cuts its sources off
    /// every selected pod, existing or later; a ban of pod addresses is never claimed by
    /// NetworkPolicy; a ban of a node is never enforced.
    #[test]
    fn reconciles_never_widen_and_claim_only_what_they_cut(
        existing in prop::collection::vec(arb_network_policy(), 0..4),
        layers in prop::collection::vec(arb_layer(), 0..3),
        shop_labels in prop::collection::vec(arb_labels(), 1..6),
        later_labels in prop::collection::vec(arb_labels(), 0..3),
        other_labels in prop::collection::vec(arb_labels(), 0..3),
        our_selector in arb_selector(),
        ban_texts in prop::collection::vec(arb_ban(), 0..5),
    ) {
        let shop = pods("shop", 0, shop_labels);
        let later = pods("shop", 2, later_labels);
        let other = pods("other", 1, other_labels);
        let policy = Arc::new(policy(our_selector.clone()));
        let bans: Vec<Arc<PortSentryBan>> = ban_texts.iter().map(|b| ban(b)).collect();
        let layer_objects: Vec<LayerObject> =
            layers.iter().enumerate().map(|(i, l)| layer_object(l, i)).collect();
        let guards = Guards {
            node_addrs: NODES.iter().map(|n| n.parse().unwrap()).collect(),
            pod_nets: vec![POD_RANGE.parse().unwrap()],
            ..Guards::default()
        };
        // The pods the operator sees: those created later are not there yet.
        let visible: Vec<Arc<KubePod>> = shop.iter().chain(&other).map(kube_pod).collect();
        let plan = plan::plan(&Observed {
            policy: &policy,
            bans: &bans,
            network_policies: &existing,
            policies: std::slice::from_ref(&policy),
            guards: &guards,
            sensors: Default::default(),
            pod_nftables_agent: false,
            layers: &layer_objects,
            pods: &visible,
            namespace_labels: &BTreeMap::new(),
            now: Timestamp::UNIX_EPOCH,
        })
        .unwrap();
        prop_assert!(plan.delete.is_empty());
        let after: Vec<NetworkPolicy> =
            existing.iter().cloned().chain(plan.apply.iter().cloned()).collect();

        let protected_pods: Vec<&Pod> = shop.iter().chain(&later).collect();
        let sources: Vec<Source> = EXTERNAL
            .iter()
            .chain(&NODES)
            .map(|a| Source::Address(a.parse().unwrap()))
            .chain(shop.iter().chain(&later).chain(&other).cloned().map(Source::Pod))
            .collect();
        for sees_pods in [true, false] {
            for source in &sources {
                for to in &protected_pods {
                    let was = model_allows(&existing, &layers, source, to, sees_pods);
                    let is = model_allows(&after, &layers, source, to, sees_pods);
                    prop_assert!(was || !is, "widened {:?} -> {}", source, to.name);
                }
            }
        }

        let selected: Vec<&Pod> = protected_pods
            .iter()
            .copied()
            .filter(|p| model_selects(Some(&our_selector), &p.labels))
            .collect();
        let pod_range: IpNet = POD_RANGE.parse().unwrap();
        let nodes: Vec<IpNet> = NODES.iter().map(|n| IpNet::from(n.parse::<IpAddr>().unwrap())).collect();
        for (text, ban) in ban_texts.iter().zip(&bans) {
            let Some((_, condition)) =
                plan.ban_conditions.iter().find(|(name, _)| *name == ban.metadata.name.clone().unwrap())
            else {
                continue; // the same source written twice: one object
            };
            let net = model_net(text);
            let of_pods = overlaps(net, pod_range);
            let of_nodes = nodes.iter().any(|n| overlaps(net, *n));
            if of_pods || of_nodes {
                prop_assert_eq!(&condition.status, "False", "{} claimed: {:?}", text, condition);
            }
            if condition.status == "True" {
                prop_assert_eq!(&condition.reason, "NetworkPolicy");
                for source in sources.iter().filter(|s| net.contains(&s.ip())) {
                    for to in &selected {
                        prop_assert!(
                            !model_allows(&after, &layers, source, to, true),
                            "{} claimed but {:?} reaches {}", text, source, to.name
                        );
                    }
                }
            }
        }
        if matches!(plan.enforcement, Enforcement::Applied { .. }) {
            // Unbanned outside sources, nodes and every pod keep reaching the selected pods.
            let cut: Vec<IpNet> = ban_texts
                .iter()
                .map(|t| model_net(t))
                .filter(|n| !nodes.iter().any(|node| overlaps(*n, *node)))
                .collect();
            for source in &sources {
                let banned = matches!(source, Source::Address(_))
                    && cut.iter().any(|n| n.contains(&source.ip()));
                for to in &selected {
                    prop_assert_eq!(
                        model_allows(&after, &layers, source, to, false),
                        !banned,
                        "{:?} -> {}", source, to.name
                    );
                }
            }
        }
    }
}
