//! One policy's reconcile as a pure function: from what was observed (policy, bans, pods,
//! NetworkPolicies, neighbouring policies, protected addresses, time) to what to write.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{ObjectReference, Pod},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{Resource, ResourceExt};
use portsentry_crds::{Action, Backend, PolicyKind, PolicyStatus, PortSentryBan, PortSentryPolicy};

use crate::{
    Error, Result,
    enforce::bans::{self, Guards},
    enforce::memory,
    enforce::netpol,
    enforce::prefixes::BannedPrefixes,
    policy::layers::{self, LayerObject},
    policy::pod_sources,
    policy::status::{self, Enforcement, StatusApply},
    policy::widen,
};

/// Longest wait between two reconciles of one policy when nothing changes.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Everything a reconcile of one PortSentryPolicy looks at.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub policy: &'a PortSentryPolicy,
    /// Bans of any policy (only this policy's, in its namespace, are used).
    pub bans: &'a [Arc<PortSentryBan>],
    /// Every NetworkPolicy of the namespace, ours included.
    pub network_policies: &'a [NetworkPolicy],
    /// PortSentryPolicies (any namespace; only the policy's own is used), itself included.
    pub policies: &'a [Arc<PortSentryPolicy>],
    pub guards: &'a Guards,
    /// The sensors injected for the policy, and how many are ready.
    pub sensors: status::SensorCount,
    /// The pod nftables agent runs on the nodes (chart `nodeSensors.podNftables.enabled`):
    /// the `PodNftables` backend can enforce.
    pub pod_nftables_agent: bool,
    /// Every pod of the cluster (as the shared watch trims them): which bans are of pod
    /// addresses, and which pod quarantine would isolate.
    pub pods: &'a [Arc<Pod>],
    /// Objects of other policy layers in the namespace or cluster-wide (see
    /// [`crate::policy::layers`]), and the labels of the namespace they select by.
    pub layers: &'a [LayerObject],
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub now: Timestamp,
}

/// What a reconcile writes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Bans past expiry that are no longer remembered for escalation: delete them (only if
    /// unchanged since read). See [`memory::sort_out`].
    pub expired: Vec<Arc<PortSentryBan>>,
    /// Bans that lifted since the last reconcile (past expiry, not yet marked `Expired`):
    /// notify their expiry once.
    pub lifted: Vec<Arc<PortSentryBan>>,
    /// Generated NetworkPolicies that are missing or differ: apply them.
    pub apply: Vec<NetworkPolicy>,
    /// Generated NetworkPolicies no longer wanted: delete them.
    pub delete: Vec<String>,
    /// Number of generated objects wanted, and banned prefixes they hold.
    pub objects: usize,
    pub prefixes: usize,
    pub enforcement: Enforcement,
    pub active_bans: usize,
    pub conditions: Vec<Condition>,
    /// Server-side apply body of the policy's status.
    pub status: StatusApply<PolicyStatus>,
    /// Bans refused since the last reconcile because their source is protected: (the ban,
    /// why); each gets a Warning Event.
    pub refused: Vec<(ObjectReference, bans::Protection)>,
    /// Bans whose `Enforced` condition changes: (name, new condition).
    pub ban_conditions: Vec<(String, Condition)>,
    /// `Some(now enforced)` when the policy's Enforced condition flips (or is first set).
    pub enforced_changed: Option<bool>,
    /// When to look again: the next expiry, at most [`RESYNC`].
    pub requeue_after: Duration,
}

/// What the NetworkPolicy backend would come to for `policy` on its own (before precedence
/// between PortSentryPolicies): refused by other policy layers or NetworkPolicies, or not.
fn network_policy_alone(
    policy: &PortSentryPolicy,
    namespace: &str,
    observed: &Observed<'_>,
) -> Option<Enforcement> {
    let other_layers = layers::selecting(
        observed.layers,
        namespace,
        observed.namespace_labels,
        &policy.spec.pod_selector,
    );
    if !other_layers.is_empty() {
        return Some(Enforcement::OtherLayers {
            objects: other_layers,
        });
    }
    let generated_by: Vec<&str> = observed
        .policies
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter_map(|p| p.metadata.uid.as_deref())
        .chain(policy.metadata.uid.as_deref())
        .collect();
    match widen::decide(
        &generated_by,
        &policy.spec.pod_selector,
        observed.network_policies,
    ) {
        widen::Decision::Refuse { existing } => Some(Enforcement::Refused { existing }),
        widen::Decision::Enforce => None,
    }
}

/// `policy` as a rival in precedence: whether, on its own, it would generate NetworkPolicies
/// (its NetworkPolicy backend unrefused and listed before any other that enforces).
fn rival<'a>(
    policy: &'a PortSentryPolicy,
    namespace: &str,
    observed: &Observed<'_>,
) -> widen::Rival<'a> {
    let refused = network_policy_alone(policy, namespace, observed).is_some();
    let generates = policy
        .spec
        .rules
        .enforcement
        .backends
        .iter()
        .find_map(|backend| match backend {
            Backend::NetworkPolicy if !refused => Some(true),
            Backend::PodNftables if observed.pod_nftables_agent => Some(false),
            _ => None,
        })
        .unwrap_or(false);
    widen::Rival {
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        created: policy.metadata.creation_timestamp.as_ref().map(|t| t.0),
        pod_selector: &policy.spec.pod_selector,
        bans: policy.spec.rules.response.action == Action::Ban,
        generates,
    }
}

/// Decides everything one reconcile of `observed.policy` writes.
pub fn plan(observed: &Observed<'_>) -> Result<Plan> {
    let policy = observed.policy;
    let namespace = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = policy.name_any();
    let uid = policy
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let now = observed.now;
    let rules = &policy.spec.rules;

    let sorted = memory::sort_out(
        observed
            .bans
            .iter()
            .filter(|ban| {
                ban.namespace().as_deref() == Some(namespace.as_str())
                    && ban.spec.policy.kind == PolicyKind::PortSentryPolicy
                    && ban.spec.policy.name == name
            })
            .cloned(),
        &rules.response,
        now,
    );
    let active = &sorted.active;
    let protection: Vec<Option<bans::Protection>> = active
        .iter()
        .map(|ban| {
            observed
                .guards
                .protected(&ban.spec.source, &rules.detection.ignore)
        })
        .collect();
    let banned = BannedPrefixes::aggregate(
        active
            .iter()
            .zip(&protection)
            .filter(|(_, p)| p.is_none())
            .map(|(ban, _)| &ban.spec.source),
    );

    let neighbours: Vec<widen::Rival<'_>> = observed
        .policies
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .map(|p| rival(p, &namespace, observed))
        .collect();
    let outranked_by = widen::outranked_by(&rival(policy, &namespace, observed), &neighbours);
    let network_policy = match network_policy_alone(policy, &namespace, observed) {
        Some(refusal) => refusal,
        None if !outranked_by.is_empty() => Enforcement::Yielded { to: outranked_by },
        None if banned.is_empty() => Enforcement::NothingToEnforce,
        None => Enforcement::Applied {
            objects: 0,
            prefixes: banned.len(),
        },
    };
    let enforcement = choose_backend(
        &rules.enforcement.backends,
        network_policy,
        banned.len(),
        observed.pod_nftables_agent,
    );
    let desired = if matches!(enforcement, Enforcement::Applied { .. }) {
        let target = netpol::Target {
            namespace: &namespace,
            policy_name: &name,
            pod_selector: &policy.spec.pod_selector,
            owner,
        };
        netpol::build(
            &target,
            &banned,
            rules.enforcement.max_prefixes_per_object as usize,
        )
    } else {
        Vec::new()
    };
    let enforcement = match enforcement {
        Enforcement::Applied { prefixes, .. } => Enforcement::Applied {
            objects: desired.len(),
            prefixes,
        },
        other => other,
    };

    let ours: Vec<&NetworkPolicy> = observed
        .network_policies
        .iter()
        .filter(|np| netpol::is_controlled_by(np, &uid))
        .collect();
    let stored = |name: &Option<String>| ours.iter().find(|np| np.metadata.name == *name).copied();
    let apply: Vec<NetworkPolicy> = desired
        .iter()
        .filter(|d| !stored(&d.metadata.name).is_some_and(|s| netpol::up_to_date(s, d)))
        .cloned()
        .collect();
    let delete: Vec<String> = ours
        .iter()
        .filter_map(|np| np.metadata.name.clone())
        .filter(|n| !desired.iter().any(|d| d.metadata.name.as_ref() == Some(n)))
        .collect();

    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let was_enforced = previous
        .iter()
        .find(|c| c.type_ == status::ENFORCED)
        .map(|c| c.status == "True");
    let generation = policy.metadata.generation;
    let conditions = status::policy_conditions(
        &previous,
        &enforcement,
        active.len(),
        rules.response.max_active_bans,
        generation,
        now,
    );
    let status = StatusApply::of::<PortSentryPolicy>(status::policy_status(
        conditions.clone(),
        active.len(),
        observed.sensors,
        generation,
    ));

    let enforced = enforcement.is_safe();
    // Bans of pod addresses are never claimed by the NetworkPolicy backend: each says who
    // drops it, if anyone (PodNftables as the chosen backend claims them with the rest).
    let by_pod_nftables = matches!(enforcement, Enforcement::PodNftables { .. });
    let pods_by_address = if active.is_empty() {
        Default::default()
    } else {
        pod_sources::by_address(observed.pods)
    };
    let (pod_bans, others): (Vec<_>, Vec<_>) = active
        .iter()
        .map(|ban| &**ban)
        .zip(protection.iter().copied())
        .partition(|(ban, _)| {
            !by_pod_nftables && pod_sources::is_pod_source(ban, observed.guards, &pods_by_address)
        });
    let mut ban_conditions = status::ban_condition_changes(
        others.into_iter(),
        enforced,
        now,
        if by_pod_nftables {
            status::pod_nftables_ban_condition
        } else {
            status::ban_condition
        },
    );
    ban_conditions.extend(pod_bans.into_iter().filter_map(|(ban, protected)| {
        let by = pod_sources::enforced_by(
            ban,
            policy,
            observed.pod_nftables_agent,
            observed.guards,
            &pods_by_address,
            observed.network_policies,
        );
        let previous = ban
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let desired = pod_sources::condition(previous, protected, &by, now);
        status::differs(previous, &desired).then(|| (ban.name_any(), desired))
    }));
    let expired_conditions = status::expired_condition_changes(
        sorted
            .remembered
            .iter()
            .map(|(ban, until)| (&**ban, *until)),
        now,
    );
    // Bans newly marked protected (a hand-made ban of an infrastructure address, say): each
    // gets one Warning Event and one count, when its condition changes.
    let refused = active
        .iter()
        .zip(&protection)
        .filter_map(|(ban, why)| Some((ban, (*why)?)))
        .filter(|(ban, _)| {
            ban_conditions.iter().any(|(changed, condition)| {
                *changed == ban.name_any()
                    && condition.reason == portsentry_crds::PROTECTED_SOURCE_REASON
            })
        })
        .map(|(ban, why)| (ban.object_ref(&()), why))
        .collect();
    let ban_conditions = [ban_conditions, expired_conditions].concat();
    let lifted = sorted
        .remembered
        .iter()
        .map(|(ban, _)| ban)
        .chain(&sorted.forgotten)
        .filter(|ban| !status::marked_expired(ban))
        .cloned()
        .collect();
    let requeue_after = sorted.requeue_after(now).map_or(RESYNC, |d| d.min(RESYNC));

    Ok(Plan {
        expired: sorted.forgotten.clone(),
        lifted,
        apply,
        delete,
        objects: desired.len(),
        prefixes: banned.len(),
        enforced_changed: (was_enforced != Some(enforced)).then_some(enforced),
        enforcement,
        active_bans: active.len(),
        conditions,
        status,
        ban_conditions,
        refused,
        requeue_after,
    })
}

/// The first of `backends` (in the policy's order) that can enforce: NetworkPolicy when
/// `network_policy` (its verdict: applied, or why not) is safe, then PodNftables when its
/// agent runs. NodeNftables never serves a namespaced policy. With none, the first refusal.
fn choose_backend(
    backends: &[Backend],
    network_policy: Enforcement,
    prefixes: usize,
    pod_nftables_agent: bool,
) -> Enforcement {
    let mut refused: Option<Enforcement> = None;
    for backend in backends {
        match backend {
            Backend::NetworkPolicy => {
                if network_policy.is_safe() {
                    return network_policy;
                }
                refused.get_or_insert(network_policy.clone());
            }
            Backend::PodNftables => {
                let instead_of = refused.as_ref().map(refusal_note);
                if pod_nftables_agent {
                    return Enforcement::PodNftables {
                        prefixes,
                        instead_of,
                    };
                }
                refused.get_or_insert(Enforcement::PodNftablesAgentOff { instead_of });
            }
            Backend::NodeNftables => {}
        }
    }
    refused.unwrap_or(Enforcement::NoBackend)
}

/// How a refused NetworkPolicy attempt reads in the status of the backend that took over.
fn refusal_note(refusal: &Enforcement) -> String {
    match refusal {
        Enforcement::Refused { existing } => status::fallback_note(
            widen::EXISTING_NETWORK_POLICIES,
            &widen::refusal_message(existing),
        ),
        Enforcement::Yielded { to } => status::fallback_note(
            widen::OVERLAPPING_POLICIES,
            &format!("older overlapping policies: {}", to.join(", ")),
        ),
        Enforcement::OtherLayers { objects } => status::fallback_note(
            status::OTHER_POLICY_LAYERS,
            &status::other_layers_message(objects),
        ),
        _ => "NetworkPolicy could not enforce".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
    use portsentry_crds::{
        PolicyRef, PolicyRules, PolicyStatus, PortSentryBanSpec, PortSentryPolicySpec,
    };

    use super::*;

    const T0: i64 = 1_780_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn policy(name: &str, created: i64) -> Arc<PortSentryPolicy> {
        let mut rules = PolicyRules::default();
        rules.enforcement.max_prefixes_per_object = 2;
        Arc::new(PortSentryPolicy {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                uid: Some(format!("uid-{name}")),
                generation: Some(1),
                creation_timestamp: Some(Time(at(created))),
                ..ObjectMeta::default()
            },
            spec: PortSentryPolicySpec {
                pod_selector: LabelSelector {
                    match_labels: Some(labels(&[("app", "web")])),
                    match_expressions: None,
                },
                rules,
            },
            status: None,
        })
    }

    fn ban(policy: &str, source: &str, expires: Option<i64>) -> Arc<PortSentryBan> {
        let source = source.parse().unwrap();
        let mut ban = PortSentryBan::new(
            &bans::ban_name(policy, &source),
            PortSentryBanSpec {
                source,
                policy: PolicyRef {
                    kind: PolicyKind::PortSentryPolicy,
                    name: policy.into(),
                },
                first_seen: None,
                last_seen: None,
                offences: 1,
                expires_at: expires.map(|s| Time(at(s))),
                reason: None,
                evidence: Vec::new(),
            },
        );
        ban.metadata.namespace = Some("shop".into());
        Arc::new(ban)
    }

    struct World {
        policy: Arc<PortSentryPolicy>,
        bans: Vec<Arc<PortSentryBan>>,
        network_policies: Vec<NetworkPolicy>,
        policies: Vec<Arc<PortSentryPolicy>>,
        guards: Guards,
        sensors: status::SensorCount,
        pod_nftables_agent: bool,
        layers: Vec<LayerObject>,
        pods: Vec<Arc<Pod>>,
    }

    impl World {
        fn new(bans: Vec<Arc<PortSentryBan>>) -> Self {
            let policy = policy("web", T0 - 1000);
            Self {
                policies: vec![policy.clone()],
                policy,
                bans,
                network_policies: Vec::new(),
                guards: Guards::default(),
                sensors: status::SensorCount::default(),
                pod_nftables_agent: false,
                layers: Vec::new(),
                pods: Vec::new(),
            }
        }

        fn plan(&self, now: i64) -> Plan {
            plan(&Observed {
                policy: &self.policy,
                bans: &self.bans,
                network_policies: &self.network_policies,
                policies: &self.policies,
                guards: &self.guards,
                sensors: self.sensors,
                pod_nftables_agent: self.pod_nftables_agent,
                layers: &self.layers,
                pods: &self.pods,
                namespace_labels: &BTreeMap::new(),
                now: at(now),
            })
            .unwrap()
        }
    }

    /// An object of another policy layer whose selector is not evaluated (as Calico's).
    fn layer(name: &str) -> LayerObject {
        LayerObject {
            name: name.into(),
            namespace: None,
            selects: layers::Selects::Anything,
        }
    }

    fn excepts(plan: &Plan) -> Vec<String> {
        plan.apply
            .iter()
            .flat_map(|np| {
                np.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0]
                    .from
                    .clone()
                    .unwrap()
            })
            .filter_map(|peer| peer.ip_block)
            .flat_map(|block| block.except.unwrap_or_default())
            .collect()
    }

    #[test]
    fn active_bans_of_the_policy_are_enforced_and_others_ignored() {
        let world = World::new(vec![
            ban("web", "203.0.113.7", Some(T0 + 60)),
            ban("web", "2001:db8::7", None),
            ban("api", "198.51.100.1", None),
        ]);
        let plan = world.plan(T0);
        assert_eq!(excepts(&plan), vec!["203.0.113.7/32", "2001:db8::7/128"]);
        assert_eq!(plan.active_bans, 2);
        assert_eq!(
            plan.enforcement,
            Enforcement::Applied {
                objects: 1,
                prefixes: 2
            }
        );
        assert_eq!(plan.enforced_changed, Some(true));
        assert_eq!(plan.ban_conditions.len(), 2);
    }

    /// A ban last seen at `seen` (the default policy remembers offences for 7 days).
    fn seen_ban(source: &str, seen: i64, expires: i64) -> Arc<PortSentryBan> {
        let mut ban = (*ban("web", source, Some(expires))).clone();
        ban.spec.last_seen = Some(Time(at(seen)));
        Arc::new(ban)
    }

    const WEEK: i64 = 7 * 24 * 3600;

    /// `ban` as the operator left it after marking it expired at `now`.
    fn marked_expired(ban: &PortSentryBan, now: i64) -> Arc<PortSentryBan> {
        let world = World::new(vec![Arc::new(ban.clone())]);
        let (_, condition) = world.plan(now).ban_conditions.remove(0);
        let mut ban = ban.clone();
        ban.status = Some(portsentry_crds::BanStatus {
            conditions: vec![condition],
        });
        Arc::new(ban)
    }

    #[test]
    fn expired_bans_past_the_escalation_window_are_deleted_and_left_out() {
        let world = World::new(vec![
            seen_ban("203.0.113.7", T0 - WEEK - 61, T0 - WEEK - 1),
            ban("web", "203.0.113.9", Some(T0 + 60)),
        ]);
        let plan = world.plan(T0);
        assert_eq!(plan.expired.len(), 1);
        assert_eq!(excepts(&plan), vec!["203.0.113.9/32"]);
    }

    #[test]
    fn expired_bans_that_record_no_sighting_are_deleted_at_expiry() {
        let world = World::new(vec![ban("web", "203.0.113.7", Some(T0 - 1))]);
        assert_eq!(world.plan(T0).expired.len(), 1);
    }

    #[test]
    fn expired_bans_within_the_escalation_window_are_kept_but_never_enforced() {
        let world = World::new(vec![
            seen_ban("203.0.113.7", T0 - 61, T0 - 1),
            ban("web", "203.0.113.9", Some(T0 + 60)),
        ]);
        let plan = world.plan(T0);
        assert!(plan.expired.is_empty());
        assert_eq!(excepts(&plan), vec!["203.0.113.9/32"]);
        assert_eq!(plan.active_bans, 1);
    }

    #[test]
    fn a_kept_expired_ban_says_enforced_false_expired_and_until_when() {
        let world = World::new(vec![seen_ban("203.0.113.7", T0 - 61, T0 - 1)]);
        let plan = world.plan(T0);
        let (name, condition) = &plan.ban_conditions[0];
        assert_eq!(name, "web-v4-203-0-113-7");
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", status::EXPIRED)
        );
        assert!(condition.message.contains(&at(T0 - 61 + WEEK).to_string()));
    }

    #[test]
    fn a_ban_is_notified_as_lifted_once_when_it_expires() {
        let expired = seen_ban("203.0.113.7", T0 - 61, T0 - 1);
        let first = World::new(vec![expired.clone()]).plan(T0);
        assert_eq!(first.lifted.len(), 1);
        let marked = marked_expired(&expired, T0);
        let later = World::new(vec![marked]).plan(T0 + 10);
        assert!(later.lifted.is_empty() && later.ban_conditions.is_empty());
    }

    #[test]
    fn a_ban_deleted_at_expiry_is_notified_as_lifted() {
        let world = World::new(vec![ban("web", "203.0.113.7", Some(T0 - 1))]);
        assert_eq!(world.plan(T0).lifted.len(), 1);
    }

    #[test]
    fn a_kept_expired_ban_is_deleted_without_a_second_notice_when_the_window_passes() {
        let expired = seen_ban("203.0.113.7", T0 - 61, T0 - 1);
        let marked = marked_expired(&expired, T0);
        let plan = World::new(vec![marked]).plan(T0 - 61 + WEEK + 1);
        assert_eq!(plan.expired.len(), 1);
        assert!(plan.lifted.is_empty());
    }

    #[test]
    fn requeue_is_just_after_a_kept_expired_bans_window_ends() {
        let world = World::new(vec![seen_ban("203.0.113.7", T0 - 61, T0 - 1)]);
        let plan = world.plan(T0 - 61 + WEEK - 30);
        assert_eq!(plan.requeue_after, Duration::from_secs(31));
    }

    #[test]
    fn requeue_is_at_the_next_expiry_or_the_resync() {
        let world = World::new(vec![
            ban("web", "203.0.113.7", Some(T0 + 90)),
            ban("web", "203.0.113.9", Some(T0 + 30)),
        ]);
        assert_eq!(world.plan(T0).requeue_after, Duration::from_secs(30));
        let forever = World::new(vec![ban("web", "203.0.113.7", None)]);
        assert_eq!(forever.plan(T0).requeue_after, RESYNC);
    }

    #[test]
    fn protected_sources_are_never_enforced_and_say_so() {
        let mut world = World::new(vec![
            ban("web", "10.0.0.10", None),
            ban("web", "127.0.0.1", None),
        ]);
        world.guards.node_addrs = vec!["10.0.0.10".parse().unwrap()];
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty());
        assert_eq!(plan.enforcement, Enforcement::NothingToEnforce);
        let reasons: Vec<&str> = plan
            .ban_conditions
            .iter()
            .map(|(_, c)| c.reason.as_str())
            .collect();
        assert_eq!(reasons, vec!["ProtectedSource", "ProtectedSource"]);
    }

    #[test]
    fn a_newly_protected_ban_is_reported_once_as_refused() {
        let mut world = World::new(vec![ban("web", "127.0.0.1", None)]);
        let first = world.plan(T0);
        assert_eq!(first.refused.len(), 1);
        assert_eq!(first.refused[0].1, bans::Protection::Loopback);
        let mut marked = (*world.bans[0]).clone();
        marked.status = Some(status::ban_status(first.ban_conditions[0].1.clone()));
        world.bans = vec![Arc::new(marked)];
        assert!(
            world.plan(T0 + 5).refused.is_empty(),
            "no second event or count"
        );
    }

    #[test]
    fn another_ingress_policy_on_the_pods_removes_ours_and_reports_it() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        let ours = world.plan(T0).apply;
        world.network_policies = ours;
        world.network_policies.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("allow-lb".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::networking::v1::NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
        });
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty());
        assert_eq!(plan.delete, vec!["web-portsentry-0".to_owned()]);
        assert_eq!(
            plan.enforcement,
            Enforcement::Refused {
                existing: vec!["allow-lb".into()]
            }
        );
        assert_eq!(plan.ban_conditions[0].1.reason, "PolicyNotEnforced");
    }

    fn with_other_ingress_policy(world: &mut World) {
        world.network_policies.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("default-deny".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::networking::v1::NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
        });
    }

    fn set_backends(world: &mut World, backends: Vec<Backend>) {
        let mut policy = (*world.policy).clone();
        policy.spec.rules.enforcement.backends = backends;
        world.policy = Arc::new(policy);
        world.policies = vec![world.policy.clone()];
    }

    #[test]
    fn a_refused_network_policy_falls_back_to_pod_nftables_and_says_why() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        set_backends(
            &mut world,
            vec![Backend::NetworkPolicy, Backend::PodNftables],
        );
        with_other_ingress_policy(&mut world);
        world.pod_nftables_agent = true;
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty(), "no NetworkPolicy is generated");
        let Enforcement::PodNftables {
            prefixes,
            instead_of,
        } = &plan.enforcement
        else {
            panic!("expected PodNftables, got {:?}", plan.enforcement);
        };
        assert_eq!(*prefixes, 1);
        assert!(instead_of.as_deref().unwrap().contains("default-deny"));
        let enforced = plan.conditions.iter().find(|c| c.type_ == status::ENFORCED);
        let enforced = enforced.unwrap();
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("True", "PodNftables")
        );
        assert_eq!(plan.ban_conditions[0].1.reason, "PodNftables");
    }

    #[test]
    fn a_pod_source_is_not_claimed_by_the_network_policy_backend() {
        let mut world = World::new(vec![
            ban("web", "10.244.1.7", None),
            ban("web", "203.0.113.7", None),
        ]);
        world.guards.pod_nets = vec!["10.244.0.0/16".parse().unwrap()];
        let plan = world.plan(T0);
        let reason_of = |name: &str| {
            plan.ban_conditions
                .iter()
                .find(|(n, _)| n.contains(name))
                .map(|(_, c)| (c.status.clone(), c.reason.clone()))
                .unwrap()
        };
        assert_eq!(
            reason_of("10-244-1-7"),
            ("False".into(), pod_sources::POD_SOURCE.into())
        );
        assert_eq!(
            reason_of("203-0-113-7"),
            ("True".into(), "NetworkPolicy".into())
        );
    }

    fn pod(namespace: &str, name: &str, ip: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(labels(&[("app", "scanner")])),
                ..ObjectMeta::default()
            },
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            }),
            ..Pod::default()
        })
    }

    fn ban_condition_of(plan: &Plan, source: &str) -> (String, String, String) {
        let name = source.replace(['.', ':'], "-");
        plan.ban_conditions
            .iter()
            .find(|(n, _)| n.ends_with(&name))
            .map(|(_, c)| (c.status.clone(), c.reason.clone(), c.message.clone()))
            .unwrap()
    }

    fn with_quarantine(world: &mut World) {
        let mut policy = (*world.policy).clone();
        policy.spec.rules.response.quarantine = true;
        world.policy = Arc::new(policy);
        world.policies = vec![world.policy.clone()];
    }

    #[test]
    fn a_pod_address_outside_the_known_pod_ranges_is_still_a_pod_source() {
        let mut world = World::new(vec![ban("web", "10.0.7.7", None)]);
        world.pods = vec![pod("shop", "scanner", "10.0.7.7")];
        let (status, reason, _) = ban_condition_of(&world.plan(T0), "10.0.7.7");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "PodSource"));
    }

    #[test]
    fn a_prefix_holding_a_pods_address_is_a_pod_source() {
        let mut world = World::new(vec![
            ban("web", "10.0.7.0/24", None),
            ban("web", "10.0.8.0/24", None),
        ]);
        world.pods = vec![pod("shop", "scanner", "10.0.7.7")];
        let plan = world.plan(T0);
        let reason = |prefix: &str| {
            plan.ban_conditions
                .iter()
                .find(|(n, _)| n.contains(prefix))
                .map(|(_, c)| c.reason.clone())
                .unwrap()
        };
        assert_eq!(reason("10-0-7-0"), "PodSource");
        assert_eq!(reason("10-0-8-0"), "NetworkPolicy");
    }

    #[test]
    fn a_pod_source_beside_network_policy_is_claimed_by_a_listed_pod_nftables() {
        let mut world = World::new(vec![
            ban("web", "10.244.1.7", None),
            ban("web", "203.0.113.7", None),
        ]);
        set_backends(
            &mut world,
            vec![Backend::NetworkPolicy, Backend::PodNftables],
        );
        world.pod_nftables_agent = true;
        world.guards.pod_nets = vec!["10.244.0.0/16".parse().unwrap()];
        let plan = world.plan(T0);
        assert!(matches!(plan.enforcement, Enforcement::Applied { .. }));
        let (status, reason, _) = ban_condition_of(&plan, "10.244.1.7");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "PodNftables"));
        let (_, reason, _) = ban_condition_of(&plan, "203.0.113.7");
        assert_eq!(reason, "NetworkPolicy");
    }

    #[test]
    fn a_scanning_pod_of_the_namespace_is_claimed_by_quarantine() {
        let mut world = World::new(vec![ban("web", "10.244.1.7", None)]);
        with_quarantine(&mut world);
        world.pods = vec![pod("shop", "scanner", "10.244.1.7")];
        let (status, reason, message) = ban_condition_of(&world.plan(T0), "10.244.1.7");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Quarantine"));
        assert!(message.contains("shop/scanner"), "{message}");
    }

    #[test]
    fn a_scanning_pod_of_another_namespace_is_not_claimed_by_quarantine() {
        let mut world = World::new(vec![ban("web", "10.244.1.7", None)]);
        with_quarantine(&mut world);
        world.pods = vec![pod("lab", "scanner", "10.244.1.7")];
        let (status, reason, message) = ban_condition_of(&world.plan(T0), "10.244.1.7");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "PodSource"));
        assert!(message.contains("lab/scanner"), "{message}");
    }

    #[test]
    fn quarantine_does_not_claim_a_pod_another_egress_policy_selects() {
        let mut world = World::new(vec![ban("web", "10.244.1.7", None)]);
        with_quarantine(&mut world);
        world.pods = vec![pod("shop", "scanner", "10.244.1.7")];
        world.network_policies.push(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("allow-egress".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::networking::v1::NetworkPolicySpec {
                pod_selector: Some(LabelSelector::default()),
                policy_types: Some(vec!["Egress".into()]),
                egress: Some(vec![Default::default()]),
                ..Default::default()
            }),
        });
        let (status, _, message) = ban_condition_of(&world.plan(T0), "10.244.1.7");
        assert_eq!(status, "False");
        assert!(message.contains("allow-egress"), "{message}");
    }

    #[test]
    fn pod_nftables_claims_a_pod_source() {
        let mut world = World::new(vec![ban("web", "10.244.1.7", None)]);
        set_backends(&mut world, vec![Backend::PodNftables]);
        world.pod_nftables_agent = true;
        world.guards.pod_nets = vec!["10.244.0.0/16".parse().unwrap()];
        let plan = world.plan(T0);
        assert_eq!(plan.ban_conditions[0].1.reason, "PodNftables");
        assert_eq!(plan.ban_conditions[0].1.status, "True");
    }

    #[test]
    fn another_policy_layer_on_the_pods_refuses_network_policy_and_names_it() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        world.layers = vec![layer("CiliumNetworkPolicy/shop/lock")];
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty(), "no NetworkPolicy is generated");
        let enforced = plan.conditions.iter().find(|c| c.type_ == status::ENFORCED);
        let enforced = enforced.unwrap();
        assert_eq!(enforced.status, "False");
        assert_eq!(enforced.reason, "OtherPolicyLayers");
        assert!(enforced.message.contains("CiliumNetworkPolicy/shop/lock"));
    }

    #[test]
    fn another_policy_layer_falls_back_to_pod_nftables() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        set_backends(
            &mut world,
            vec![Backend::NetworkPolicy, Backend::PodNftables],
        );
        world.pod_nftables_agent = true;
        world.layers = vec![layer("AdminNetworkPolicy/deny-all")];
        let plan = world.plan(T0);
        assert!(matches!(plan.enforcement, Enforcement::PodNftables { .. }));
    }

    #[test]
    fn the_first_backend_that_can_enforce_wins() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        set_backends(
            &mut world,
            vec![Backend::NetworkPolicy, Backend::PodNftables],
        );
        world.pod_nftables_agent = true;
        let plan = world.plan(T0);
        assert!(matches!(plan.enforcement, Enforcement::Applied { .. }));
        assert_eq!(plan.ban_conditions[0].1.reason, "NetworkPolicy");
    }

    #[test]
    fn pod_nftables_without_its_agent_is_not_enforced_and_names_the_chart_value() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        set_backends(&mut world, vec![Backend::PodNftables]);
        let plan = world.plan(T0);
        assert_eq!(
            plan.enforcement,
            Enforcement::PodNftablesAgentOff { instead_of: None }
        );
        let enforced = plan.conditions.iter().find(|c| c.type_ == status::ENFORCED);
        let enforced = enforced.unwrap();
        assert_eq!(enforced.status, "False");
        assert_eq!(enforced.reason, status::POD_NFTABLES_AGENT_OFF);
        assert!(
            enforced
                .message
                .contains("nodeSensors.podNftables.enabled=true")
        );
        assert_eq!(plan.ban_conditions[0].1.reason, "PolicyNotEnforced");
    }

    #[test]
    fn a_refused_network_policy_with_no_other_backend_reports_the_refusal() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        with_other_ingress_policy(&mut world);
        world.pod_nftables_agent = true;
        assert!(matches!(
            world.plan(T0).enforcement,
            Enforcement::Refused { .. }
        ));
    }

    #[test]
    fn unchanged_generated_objects_are_not_written_again() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        world.network_policies = world.plan(T0).apply;
        let plan = world.plan(T0 + 5);
        assert!(plan.apply.is_empty() && plan.delete.is_empty());
        assert_eq!(plan.objects, 1);
    }

    #[test]
    fn fewer_bans_shrink_the_shards_and_delete_the_rest() {
        let mut world = World::new(vec![
            ban("web", "203.0.113.1", None),
            ban("web", "198.51.100.1", None),
            ban("web", "192.0.2.1", None),
            ban("web", "2001:db8::1", None),
        ]);
        let first = world.plan(T0);
        assert!(first.objects >= 2);
        world.network_policies = first.apply;
        world.bans.truncate(1);
        let plan = world.plan(T0);
        assert_eq!(plan.objects, 1);
        assert_eq!(plan.delete.len(), first.objects - 1);
    }

    #[test]
    fn a_younger_policy_on_the_same_pods_yields() {
        let mut world = World::new(vec![ban("late", "203.0.113.7", None)]);
        let older = world.policy.clone();
        world.policy = policy("late", T0);
        world.policies = vec![older, world.policy.clone()];
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty());
        assert_eq!(
            plan.enforcement,
            Enforcement::Yielded {
                to: vec!["web".into()]
            }
        );
    }

    /// `world` with an older policy `old` on the same pods, changed by `change`.
    fn with_older_policy(world: &mut World, change: impl FnOnce(&mut PortSentryPolicy)) {
        let mut older = (*policy("old", T0 - 5000)).clone();
        change(&mut older);
        world.policies = vec![Arc::new(older), world.policy.clone()];
    }

    #[test]
    fn an_older_alerting_policy_takes_no_bans_from_a_younger_one() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        with_older_policy(&mut world, |old| {
            old.spec.rules.response.action = Action::Alert;
        });
        assert!(matches!(
            world.plan(T0).enforcement,
            Enforcement::Applied { .. }
        ));
    }

    #[test]
    fn an_older_policy_enforcing_with_pod_nftables_takes_no_bans_from_a_younger_one() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        world.pod_nftables_agent = true;
        with_older_policy(&mut world, |old| {
            old.spec.rules.enforcement.backends = vec![Backend::PodNftables];
        });
        assert!(matches!(
            world.plan(T0).enforcement,
            Enforcement::Applied { .. }
        ));
    }

    #[test]
    fn an_older_policy_refused_by_another_layer_takes_no_bans_from_a_younger_one() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        with_older_policy(&mut world, |old| {
            old.spec.pod_selector = LabelSelector {
                match_labels: Some(labels(&[("role", "legacy")])),
                match_expressions: None,
            };
        });
        // A Cilium policy on legacy database pods: it may select the older policy's pods,
        // never the younger one's (app=web).
        world.layers = vec![LayerObject {
            name: "CiliumNetworkPolicy/shop/legacy-db".into(),
            namespace: Some("shop".into()),
            selects: layers::Selects::Pods {
                namespaces: None,
                pods: Some(LabelSelector {
                    match_labels: Some(labels(&[("role", "legacy"), ("app", "db")])),
                    match_expressions: None,
                }),
            },
        }];
        assert!(matches!(
            world.plan(T0).enforcement,
            Enforcement::Applied { .. }
        ));
    }

    #[test]
    fn an_older_policy_that_enforces_with_network_policy_still_takes_precedence() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        with_older_policy(&mut world, |_| {});
        assert_eq!(
            world.plan(T0).enforcement,
            Enforcement::Yielded {
                to: vec!["old".into()]
            }
        );
    }

    #[test]
    fn an_unchanged_enforced_state_raises_no_event() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        let first = world.plan(T0);
        let mut policy = (*world.policy).clone();
        policy.status = Some(PolicyStatus {
            conditions: first.conditions.clone(),
            ..PolicyStatus::default()
        });
        world.policy = Arc::new(policy);
        assert_eq!(world.plan(T0 + 1).enforced_changed, None);
    }

    #[test]
    fn a_policy_without_the_networkpolicy_backend_enforces_nothing() {
        let mut world = World::new(vec![ban("web", "203.0.113.7", None)]);
        let mut policy = (*world.policy).clone();
        policy.spec.rules.enforcement.backends = vec![Backend::NodeNftables];
        world.policy = Arc::new(policy);
        let plan = world.plan(T0);
        assert!(plan.apply.is_empty());
        assert_eq!(plan.enforcement, Enforcement::NoBackend);
    }

    #[test]
    fn the_status_counts_the_policys_injected_and_ready_sensors() {
        let mut world = World::new(Vec::new());
        world.sensors = status::SensorCount {
            injected: 3,
            ready: 2,
        };
        let plan = world.plan(T0);
        assert_eq!(plan.status.status.sensors_injected, 3);
        assert_eq!(plan.status.status.sensors_ready, 2);
    }
}
