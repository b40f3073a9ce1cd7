//! The generated NetworkPolicies of one policy: allow ingress from everywhere except the
//! banned prefixes (sharded into disjoint blocks) and from every pod of the cluster.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
};

use crate::{
    enforce::prefixes::{self, BannedPrefixes, Block},
    labels::{MANAGED_BY_LABEL, MANAGER, POLICY_LABEL},
    names,
};

/// What the generated objects protect and who owns them.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub policy_name: &'a str,
    pub pod_selector: &'a LabelSelector,
    /// The policy as owner; made a controlling, deletion-blocking reference here.
    pub owner: OwnerReference,
}

/// Name of shard `index` of a policy's generated objects: `<policy>-portsentry-<index>`.
pub fn object_name(policy_name: &str, index: usize) -> String {
    let suffix = format!("-portsentry-{index}");
    let head = names::bounded(policy_name, names::MAX_NAME - suffix.len());
    format!("{head}{suffix}")
}

/// Labels of every generated object of a policy; also the selector to find them.
pub fn labels(policy_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
        (POLICY_LABEL.to_owned(), names::label_value(policy_name)),
    ])
}

/// The label selector string matching [`labels`], for list and watch calls.
pub fn label_selector(policy_name: &str) -> String {
    labels(policy_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// True when `policy` is controlled by the object with `owner_uid`.
pub fn is_controlled_by(policy: &NetworkPolicy, owner_uid: &str) -> bool {
    policy
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// True when `stored` already says what `desired` says (spec, our labels, our owner), so
/// writing `desired` would change nothing.
pub fn up_to_date(stored: &NetworkPolicy, desired: &NetworkPolicy) -> bool {
    let labels_ok = desired
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| stored.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    let owners_ok = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .all(|want| {
            stored
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|have| have == want)
        });
    stored.spec == desired.spec && labels_ok && owners_ok
}

/// The NetworkPolicies enforcing `banned` for `target`, at most `max_prefixes_per_object`
/// banned prefixes each. No bans: no objects (the pods are left as they were).
pub fn build(
    target: &Target<'_>,
    banned: &BannedPrefixes,
    max_prefixes_per_object: usize,
) -> Vec<NetworkPolicy> {
    if banned.is_empty() {
        return Vec::new();
    }
    prefixes::shard(banned, max_prefixes_per_object)
        .iter()
        .enumerate()
        .map(|(index, blocks)| object(target, index, blocks))
        .collect()
}

fn object(target: &Target<'_>, index: usize, blocks: &[Block]) -> NetworkPolicy {
    let owner = OwnerReference {
        controller: Some(true),
        block_owner_deletion: Some(true),
        ..target.owner.clone()
    };
    let mut from: Vec<NetworkPolicyPeer> = blocks
        .iter()
        .map(|block| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: block.cidr.to_string(),
                except: (!block.except.is_empty())
                    .then(|| block.except.iter().map(ToString::to_string).collect()),
            }),
            ..NetworkPolicyPeer::default()
        })
        .collect();
    // Pod-to-pod traffic keeps working on CNIs whose ipBlock never matches pod IPs.
    from.push(NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        ..NetworkPolicyPeer::default()
    });
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(object_name(target.policy_name, index)),
            namespace: Some(target.namespace.to_owned()),
            labels: Some(labels(target.policy_name)),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(target.pod_selector.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: None,
            }]),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use portsentry_crds::SourcePrefix;

    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "portsentry.io/v1alpha1".into(),
            kind: "PortSentryPolicy".into(),
            name: "web".into(),
            uid: "0b3b7c1e-0000-4000-8000-000000000001".into(),
            ..OwnerReference::default()
        }
    }

    fn selector() -> LabelSelector {
        LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..LabelSelector::default()
        }
    }

    fn banned(texts: &[&str]) -> BannedPrefixes {
        let sources: Vec<SourcePrefix> = texts.iter().map(|t| t.parse().unwrap()).collect();
        BannedPrefixes::aggregate(&sources)
    }

    fn build_web(bans: &BannedPrefixes, limit: usize) -> Vec<NetworkPolicy> {
        let selector = selector();
        let target = Target {
            namespace: "shop",
            policy_name: "web",
            pod_selector: &selector,
            owner: owner(),
        };
        build(&target, bans, limit)
    }

    fn peers(policy: &NetworkPolicy) -> &[NetworkPolicyPeer] {
        let spec = policy.spec.as_ref().unwrap();
        spec.ingress.as_ref().unwrap()[0].from.as_deref().unwrap()
    }

    #[test]
    fn no_bans_generate_no_objects() {
        assert!(build_web(&BannedPrefixes::default(), 1000).is_empty());
    }

    #[test]
    fn one_policy_allows_all_except_bans_and_every_pod() {
        let objects = build_web(&banned(&["203.0.113.7", "2001:db8::7"]), 1000);
        assert_eq!(objects.len(), 1);
        let json = serde_json::to_value(&objects[0]).unwrap();
        assert_eq!(
            json["spec"],
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [
                    {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.7/32"]}},
                    {"ipBlock": {"cidr": "::/0", "except": ["2001:db8::7/128"]}},
                    {"namespaceSelector": {}}
                ]}]
            })
        );
    }

    #[test]
    fn an_ipv4_mapped_ban_is_excepted_from_ipv4_traffic() {
        let ban: portsentry_crds::PortSentryBanSpec = serde_json::from_value(serde_json::json!({
            "source": "::ffff:203.0.113.0/120",
            "policy": {"kind": "PortSentryPolicy", "name": "web"}
        }))
        .unwrap();
        let objects = build_web(&BannedPrefixes::aggregate([&ban.source]), 1000);
        let json = serde_json::to_value(&objects[0]).unwrap();
        assert_eq!(
            json["spec"]["ingress"][0]["from"][0],
            serde_json::json!({"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}})
        );
    }

    #[test]
    fn objects_are_named_labelled_and_owned_by_the_policy() {
        let objects = build_web(&banned(&["203.0.113.7"]), 1000);
        let meta = &objects[0].metadata;
        assert_eq!(meta.name.as_deref(), Some("web-portsentry-0"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], "portsentry-operator");
        assert_eq!(labels[POLICY_LABEL], "web");
        let refs = meta.owner_references.as_ref().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].controller, Some(true));
        assert_eq!(refs[0].block_owner_deletion, Some(true));
        assert!(is_controlled_by(&objects[0], &owner().uid));
        assert!(!is_controlled_by(&objects[0], "someone-else"));
    }

    #[test]
    fn a_stored_object_equal_to_the_desired_one_is_up_to_date() {
        let desired = build_web(&banned(&["203.0.113.7"]), 1000).remove(0);
        let mut stored = desired.clone();
        stored.metadata.uid = Some("x".into());
        stored.metadata.resource_version = Some("42".into());
        assert!(up_to_date(&stored, &desired));
        let newer = build_web(&banned(&["203.0.113.7", "203.0.113.9"]), 1000).remove(0);
        assert!(!up_to_date(&stored, &newer));
        stored.metadata.labels = None;
        assert!(!up_to_date(&stored, &desired));
    }

    #[test]
    fn names_stay_valid_for_the_longest_policy_names() {
        let long = "p".repeat(253);
        let name = object_name(&long, 12);
        assert!(name.len() <= 253);
        assert!(name.ends_with("-portsentry-12"));
        assert!(crate::names::is_dns_subdomain(&name));
        assert!(labels(&long)[POLICY_LABEL].len() <= 63);
    }

    #[test]
    fn label_selector_matches_the_labels() {
        assert_eq!(
            label_selector("web"),
            "app.kubernetes.io/managed-by=portsentry-operator,portsentry.io/policy=web"
        );
    }

    #[test]
    fn a_whole_family_banned_drops_its_ip_block() {
        let objects = build_web(&banned(&["::/0", "192.0.2.1"]), 1000);
        let cidrs: Vec<_> = peers(&objects[0])
            .iter()
            .filter_map(|p| p.ip_block.as_ref().map(|b| b.cidr.clone()))
            .collect();
        assert_eq!(cidrs, vec!["0.0.0.0/0".to_owned()]);
    }

    #[test]
    fn shards_get_consecutive_names_and_each_keeps_pods_allowed() {
        let sources: Vec<String> = (1..=30)
            .map(|i| format!("198.51.{}.{}", i * 7, i))
            .collect();
        let texts: Vec<&str> = sources.iter().map(String::as_str).collect();
        let objects = build_web(&banned(&texts), 4);
        assert!(objects.len() >= 8);
        for (i, object) in objects.iter().enumerate() {
            assert_eq!(
                object.metadata.name.as_deref(),
                Some(format!("web-portsentry-{i}").as_str())
            );
            assert!(peers(object).iter().any(|p| p.namespace_selector.is_some()));
        }
    }

    fn many_bans(count: u32) -> BannedPrefixes {
        // Every other address, so nothing merges; a quarter of them IPv6.
        let sources: Vec<SourcePrefix> = (0..count)
            .map(|i| {
                if i % 4 == 0 {
                    let v6 =
                        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (i >> 16) as u16, (i * 2) as u16);
                    SourcePrefix::host(IpAddr::V6(v6))
                } else {
                    SourcePrefix::host(IpAddr::V4(Ipv4Addr::from(0xc633_0000 + i * 2)))
                }
            })
            .collect();
        BannedPrefixes::aggregate(&sources)
    }

    #[test]
    fn ten_thousand_bans_stay_far_below_one_mebibyte_per_object_at_the_largest_limit() {
        let bans = many_bans(10_000);
        assert_eq!(bans.len(), 10_000);
        for limit in [1000, 5000] {
            let objects = build_web(&bans, limit);
            let mut total = 0;
            for object in &objects {
                let size = serde_json::to_vec(object).unwrap().len();
                assert!(size < 512 * 1024, "{size} bytes with limit {limit}");
                let count: usize = peers(object)
                    .iter()
                    .filter_map(|p| p.ip_block.as_ref())
                    .map(|b| b.except.as_ref().map_or(0, Vec::len))
                    .sum();
                assert!(count <= limit);
                total += count;
            }
            assert_eq!(total, 10_000);
        }
    }
}
