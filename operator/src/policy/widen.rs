//! The never-widen rule: a generated allow-all-except-bans policy is only safe when no other
//! NetworkPolicy can select the same pods for ingress (policies are additive and allow-only).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::networking::v1::NetworkPolicy, apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::core::{Selector, SelectorExt};

use crate::{Error, Result, enforce::netpol, policy::selectors::can_select_together};

/// Reason of `Enforced=False` when other NetworkPolicies select the protected pods.
pub const EXISTING_NETWORK_POLICIES: &str = "ExistingNetworkPolicies";

/// Whether the generated policies may be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No other ingress policy can select the pods: enforcing only narrows.
    Enforce,
    /// These NetworkPolicies (sorted names) can select the pods for ingress; enforcing
    /// would widen them.
    Refuse { existing: Vec<String> },
}

/// True when `labels` satisfy `selector`.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool> {
    let selector =
        Selector::try_from(selector.clone()).map_err(|e| Error::InvalidSelector(e.to_string()))?;
    Ok(selector.matches(labels))
}

/// True when `policy` restricts ingress: `policyTypes` names Ingress, or is absent (Ingress
/// is then implied, whatever the rules say).
pub fn restricts_ingress(policy: &NetworkPolicy) -> bool {
    match policy.spec.as_ref().and_then(|s| s.policy_types.as_ref()) {
        Some(types) if !types.is_empty() => types.iter().any(|t| t == "Ingress"),
        _ => true,
    }
}

/// True when `policy` can select a pod that `pod_selector` selects, one that exists or one
/// created later (a policy without a pod selector selects every pod).
pub fn can_select_with(policy: &NetworkPolicy, pod_selector: &LabelSelector) -> bool {
    let every = LabelSelector::default();
    let theirs = policy
        .spec
        .as_ref()
        .and_then(|s| s.pod_selector.as_ref())
        .unwrap_or(&every);
    can_select_together(&[theirs, pod_selector])
}

/// Decides whether a policy protecting the pods `pod_selector` selects may enforce, given
/// every NetworkPolicy of its namespace. Any policy restricting ingress that can select one
/// of those pods, now or once created (the generated policy covers a new pod the moment it
/// exists), refuses; those generated for the PortSentryPolicies `generated_by` (the uids of
/// the namespace's, this one's among them) do not count: which of those enforces where is
/// decided by precedence ([`outranked_by`]), not by which objects exist yet.
pub fn decide(
    generated_by: &[&str],
    pod_selector: &LabelSelector,
    network_policies: &[NetworkPolicy],
) -> Decision {
    let mut existing: Vec<String> = network_policies
        .iter()
        .filter(|np| {
            !generated_by
                .iter()
                .any(|uid| netpol::is_controlled_by(np, uid))
        })
        .filter(|np| restricts_ingress(np))
        .filter(|np| can_select_with(np, pod_selector))
        .map(|np| np.metadata.name.clone().unwrap_or_default())
        .collect();
    if existing.is_empty() {
        return Decision::Enforce;
    }
    existing.sort();
    existing.dedup();
    Decision::Refuse { existing }
}

/// Reason of `Enforced=False` when an older PortSentryPolicy protects some of the same pods.
pub const OVERLAPPING_POLICIES: &str = "OverlappingPortSentryPolicies";

/// A PortSentryPolicy of the namespace, as far as precedence between policies goes.
#[derive(Clone, Debug)]
pub struct Rival<'a> {
    pub name: &'a str,
    pub created: Option<jiff::Timestamp>,
    pub pod_selector: &'a LabelSelector,
    /// Its response action is `Ban` (not `Alert` or `Hook`): it precedes those that only
    /// record or notify, whatever their age.
    pub bans: bool,
    /// Left alone, it would enforce with generated NetworkPolicies: the NetworkPolicy backend
    /// comes before any other that enforces in its `backends`, and is neither refused
    /// (other NetworkPolicies, other policy layers) nor missing.
    pub generates: bool,
}

impl Rival<'_> {
    /// Banning policies first, then older first, then by name: a total order every
    /// reconcile agrees on.
    fn precedes(&self, other: &Rival<'_>) -> bool {
        if self.bans != other.bans {
            return self.bans;
        }
        match (self.created, other.created) {
            (Some(a), Some(b)) if a != b => a < b,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            _ => self.name < other.name,
        }
    }

    fn overlaps(&self, other: &Rival<'_>) -> bool {
        can_select_together(&[self.pod_selector, other.pod_selector])
    }
}

/// The policies `ours` yields to: those that precede it, can select one of its pods (now or
/// once created), and themselves enforce with generated NetworkPolicies there. Two
/// generated allow-all-except policies on one pod would re-allow each other's bans, so only
/// the first in precedence enforces there; a policy that enforces nothing with
/// NetworkPolicy (refused, listing another backend first, or itself yielding) takes no bans
/// from anyone. Deciding by the policies themselves (not by which generated objects exist
/// yet) keeps the outcome stable.
pub fn outranked_by(ours: &Rival<'_>, rivals: &[Rival<'_>]) -> Vec<String> {
    let mut ordered: Vec<&Rival<'_>> = rivals.iter().filter(|r| r.name != ours.name).collect();
    ordered.sort_by(|a, b| {
        if a.precedes(b) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    // Which of them enforce with NetworkPolicies, in precedence order: one that yields
    // itself generates nothing.
    let mut enforcing: Vec<&Rival<'_>> = Vec::new();
    for rival in ordered {
        if rival.generates && !enforcing.iter().any(|e| e.overlaps(rival)) {
            enforcing.push(rival);
        }
    }
    let mut names: Vec<String> = enforcing
        .iter()
        .filter(|r| r.precedes(ours) && r.overlaps(ours))
        .map(|r| r.name.to_owned())
        .collect();
    names.sort();
    names
}

/// The condition message naming the policies in the way, bounded in length.
pub fn refusal_message(existing: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut message = format!(
        "not enforcing: other NetworkPolicies select these pods for ingress and an allow-all-except-bans policy would widen them: {}",
        existing
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if existing.len() > SHOWN {
        message.push_str(&format!(" and {} more", existing.len() - SHOWN));
    }
    message
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::networking::v1::NetworkPolicySpec,
        apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta, OwnerReference},
    };

    use super::*;

    const OURS: &str = "uid-ours";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: (!pairs.is_empty()).then(|| labels(pairs)),
            match_expressions: None,
        }
    }

    fn np(name: &str, select: LabelSelector, types: Option<&[&str]>) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(select),
                policy_types: types.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
                ..NetworkPolicySpec::default()
            }),
        }
    }

    #[test]
    fn no_other_policies_means_enforce() {
        assert_eq!(
            decide(&[OURS], &selector(&[("app", "web")]), &[]),
            Decision::Enforce
        );
    }

    #[test]
    fn an_ingress_policy_selecting_a_protected_pod_refuses_naming_it() {
        let others = [np(
            "allow-lb",
            selector(&[("app", "web")]),
            Some(&["Ingress"]),
        )];
        assert_eq!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Refuse {
                existing: vec!["allow-lb".into()]
            }
        );
    }

    #[test]
    fn a_policy_without_policy_types_restricts_ingress() {
        let others = [np("legacy", selector(&[("app", "web")]), None)];
        assert!(matches!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn an_egress_only_policy_does_not_matter() {
        let others = [np("egress", selector(&[("app", "web")]), Some(&["Egress"]))];
        assert_eq!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Enforce
        );
    }

    #[test]
    fn a_policy_selecting_other_pods_does_not_matter() {
        let others = [np("db", selector(&[("app", "db")]), Some(&["Ingress"]))];
        assert_eq!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Enforce
        );
    }

    #[test]
    fn a_default_deny_selecting_every_pod_refuses() {
        let others = [np(
            "default-deny",
            LabelSelector::default(),
            Some(&["Ingress"]),
        )];
        assert!(matches!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn match_expressions_are_honoured() {
        let select = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "In".into(),
                values: Some(vec!["front".into()]),
            }]),
        };
        let others = [np("front", select, Some(&["Ingress"]))];
        assert!(matches!(
            decide(&[OURS], &selector(&[("tier", "front")]), &others),
            Decision::Refuse { .. }
        ));
        assert_eq!(
            decide(&[OURS], &selector(&[("tier", "back")]), &others),
            Decision::Enforce
        );
    }

    #[test]
    fn a_policy_that_could_select_a_pod_created_later_refuses() {
        let others = [np(
            "front",
            selector(&[("tier", "front")]),
            Some(&["Ingress"]),
        )];
        assert!(matches!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn an_unreadable_selector_is_taken_to_select_everything() {
        let select = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Sometimes".into(),
                values: None,
            }]),
        };
        let others = [np("odd", select, Some(&["Ingress"]))];
        assert!(matches!(
            decide(&[OURS], &selector(&[("app", "web")]), &others),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn our_own_generated_policies_do_not_count() {
        let mut ours = np(
            "web-portsentry-0",
            selector(&[("app", "web")]),
            Some(&["Ingress"]),
        );
        ours.metadata.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            uid: OURS.into(),
            ..OwnerReference::default()
        }]);
        assert_eq!(
            decide(&[OURS], &selector(&[("app", "web")]), &[ours]),
            Decision::Enforce
        );
    }

    #[test]
    fn policies_generated_for_other_portsentry_policies_do_not_count() {
        let mut theirs = np(
            "other-portsentry-0",
            selector(&[("app", "web")]),
            Some(&["Ingress"]),
        );
        theirs.metadata.owner_references = Some(vec![OwnerReference {
            controller: Some(true),
            uid: "uid-other".into(),
            ..OwnerReference::default()
        }]);
        let web = selector(&[("app", "web")]);
        assert_eq!(
            decide(&[OURS, "uid-other"], &web, std::slice::from_ref(&theirs)),
            Decision::Enforce
        );
        assert!(matches!(
            decide(&[OURS], &web, &[theirs]),
            Decision::Refuse { .. }
        ));
    }

    #[test]
    fn refusal_message_is_bounded() {
        let names: Vec<String> = (0..50).map(|i| format!("policy-{i}")).collect();
        let message = refusal_message(&names);
        assert!(message.contains("policy-0"));
        assert!(message.ends_with("and 40 more"));
    }

    fn rival<'a>(name: &'a str, created: i64, selector: &'a LabelSelector) -> Rival<'a> {
        Rival {
            name,
            created: Some(jiff::Timestamp::from_second(created).unwrap()),
            pod_selector: selector,
            bans: true,
            generates: true,
        }
    }

    #[test]
    fn an_older_policy_on_the_same_pods_takes_precedence() {
        let web = selector(&[("app", "web")]);
        let old = rival("old", 100, &web);
        let new = rival("new", 200, &web);
        let all = [old.clone(), new.clone()];
        assert_eq!(outranked_by(&new, &all), vec!["old".to_owned()]);
        assert!(outranked_by(&old, &all).is_empty());
    }

    #[test]
    fn policies_created_in_the_same_second_are_ordered_by_name() {
        let web = selector(&[("app", "web")]);
        let (a, b) = (rival("a", 100, &web), rival("b", 100, &web));
        let all = [a.clone(), b.clone()];
        assert_eq!(outranked_by(&b, &all), vec!["a".to_owned()]);
        assert!(outranked_by(&a, &all).is_empty());
    }

    #[test]
    fn policies_on_disjoint_pods_do_not_rank() {
        let (web, db) = (selector(&[("app", "web")]), selector(&[("app", "db")]));
        let all = [rival("db", 100, &db), rival("web", 200, &web)];
        assert!(outranked_by(&all[1], &all).is_empty());
    }

    #[test]
    fn policies_that_could_share_a_pod_created_later_rank() {
        let (web, front) = (selector(&[("app", "web")]), selector(&[("tier", "front")]));
        let all = [rival("front", 100, &front), rival("web", 200, &web)];
        assert_eq!(outranked_by(&all[1], &all), vec!["front".to_owned()]);
    }

    #[test]
    fn an_older_policy_that_generates_nothing_takes_no_precedence() {
        let web = selector(&[("app", "web")]);
        let mut refused = rival("refused", 100, &web);
        refused.generates = false;
        let new = rival("new", 200, &web);
        assert!(outranked_by(&new, &[refused, new.clone()]).is_empty());
    }

    #[test]
    fn an_older_alerting_policy_yields_to_a_younger_banning_one() {
        let web = selector(&[("app", "web")]);
        let mut alert = rival("alert", 100, &web);
        alert.bans = false;
        let ban = rival("ban", 200, &web);
        let all = [alert.clone(), ban.clone()];
        assert!(outranked_by(&ban, &all).is_empty());
        assert_eq!(outranked_by(&alert, &all), vec!["ban".to_owned()]);
    }

    #[test]
    fn a_policy_that_itself_yields_takes_no_precedence() {
        // `first` and `third` select disjoint pods; `second` overlaps both and yields to
        // `first`, so it generates nothing and `third` enforces.
        let (a, ab, b) = (
            selector(&[("app", "a")]),
            LabelSelector::default(),
            selector(&[("app", "b")]),
        );
        let all = [
            rival("first", 100, &a),
            rival("second", 200, &ab),
            rival("third", 300, &b),
        ];
        assert_eq!(outranked_by(&all[1], &all), vec!["first".to_owned()]);
        assert!(outranked_by(&all[2], &all).is_empty());
    }
}
