//! One cluster policy's reconcile as a pure function: from what was observed (policy, bans,
//! its node sensors' DaemonSet, injected sidecars, protected addresses, time) to what to write.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::{api::apps::v1::DaemonSet, apimachinery::pkg::apis::meta::v1::Condition};
use kube::ResourceExt;
use portsentry_crds::{
    Backend, ClusterPortSentryPolicy, PolicyKind, PolicyStatus, PortSentryBan, PortSentryBanSpec,
};

use crate::{
    enforce::{bans::Guards, memory},
    labels::CONFINED_LABEL,
    policy::{
        plan::RESYNC,
        status::{self, BanEnforcement, Enforcement, StatusApply},
    },
};

/// Reason of `Enforced=True` when node sensors keep the bans in nftables.
pub const NODE_NFTABLES: &str = "NodeNftables";

/// What a reconcile of one cluster policy observed.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub policy: &'a ClusterPortSentryPolicy,
    /// Bans of the operator namespace (only this policy's are used).
    pub bans: &'a [PortSentryBan],
    /// The stored DaemonSet of the policy's node sensors, if any.
    pub daemon_set: Option<&'a DaemonSet>,
    pub guards: &'a Guards,
    /// Whether node sensors are managed by this operator.
    pub node_sensors_enabled: bool,
    /// Whether the pod nftables agent runs on the nodes.
    pub pod_nftables_agent: bool,
    /// Sidecars the webhook injected for this policy, and how many are ready.
    pub sidecars: status::SensorCount,
    pub now: Timestamp,
}

/// What a reconcile of one cluster policy writes (besides the node-sensor objects).
#[derive(Clone, Debug)]
pub struct Plan {
    /// Bans past expiry that are no longer remembered for escalation: delete them (only if
    /// unchanged since read). See [`memory::sort_out`].
    pub expired: Vec<PortSentryBan>,
    /// Bans that lifted since the last reconcile (past expiry, not yet marked `Expired`).
    pub lifted: Vec<PortSentryBan>,
    pub active_bans: usize,
    pub enforced: bool,
    /// Server-side apply body of the policy's status.
    pub status: StatusApply<PolicyStatus>,
    /// Bans whose `Enforced` condition changes: (name, new condition).
    pub ban_conditions: Vec<(String, Condition)>,
    /// When to look again: the next expiry, at most [`RESYNC`].
    pub requeue_after: Duration,
}

fn of_policy(ban: &PortSentryBan, name: &str) -> bool {
    ban.spec.policy.kind == PolicyKind::ClusterPortSentryPolicy && ban.spec.policy.name == name
}

/// True when node sensors of `policy` keep its bans in nftables.
pub fn enforces_on_nodes(policy: &ClusterPortSentryPolicy, node_sensors_enabled: bool) -> bool {
    node_sensors_enabled
        && policy.spec.node_selector.is_some()
        && policy
            .spec
            .rules
            .enforcement
            .backends
            .contains(&Backend::NodeNftables)
}

/// True when the pod nftables agents keep `policy`'s bans in its selected pods.
pub fn enforces_in_pods(policy: &ClusterPortSentryPolicy, pod_nftables_agent: bool) -> bool {
    pod_nftables_agent && wants_pod_nftables(policy)
}

fn wants_pod_nftables(policy: &ClusterPortSentryPolicy) -> bool {
    policy
        .spec
        .rules
        .enforcement
        .backends
        .contains(&Backend::PodNftables)
}

/// The `Enforced` condition of one cluster ban.
pub fn ban_condition(previous: &[Condition], state: BanEnforcement, now: Timestamp) -> Condition {
    match state {
        BanEnforcement::Enforced => status::condition(
            previous,
            status::ENFORCED,
            true,
            NODE_NFTABLES,
            "dropped by the nftables sets of the policy's node sensors".to_owned(),
            None,
            now,
        ),
        other => status::ban_condition(previous, other, now),
    }
}

/// The `Enforced` condition of a cluster ban confined to one namespace: no node drops it
/// until other reporters corroborate its evidence.
pub fn confined_ban_condition(
    previous: &[Condition],
    state: BanEnforcement,
    now: Timestamp,
) -> Condition {
    match state {
        BanEnforcement::Enforced => status::condition(
            previous,
            status::ENFORCED,
            false,
            "Uncorroborated",
            format!(
                "sidecar evidence of one namespace only: the ban acts in the namespace named by \
                 its {CONFINED_LABEL} label (quarantine) and on no node until the policy's \
                 corroboration is met"
            ),
            None,
            now,
        ),
        other => status::ban_condition(previous, other, now),
    }
}

/// Decides the status, expiries and ban conditions of one cluster policy.
pub fn plan(observed: &Observed<'_>) -> Plan {
    let policy = observed.policy;
    let name = policy.name_any();
    let now = observed.now;
    let rules = &policy.spec.rules;
    let sorted = memory::sort_out(
        observed.bans.iter().filter(|ban| of_policy(ban, &name)),
        &rules.response,
        now,
    );
    let active = &sorted.active;
    let on_nodes = enforces_on_nodes(policy, observed.node_sensors_enabled);
    let in_pods = enforces_in_pods(policy, observed.pod_nftables_agent);
    let enforced = on_nodes || in_pods;
    let (desired, ready) = observed
        .daemon_set
        .and_then(|d| d.status.as_ref())
        .map_or((0, 0), |s| {
            (s.desired_number_scheduled.max(0), s.number_ready.max(0))
        });
    let generation = policy.metadata.generation;
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut conditions = status::policy_conditions(
        &previous,
        &Enforcement::NoBackend,
        active.len(),
        rules.response.max_active_bans,
        generation,
        now,
    );
    let message = match (on_nodes, observed.node_sensors_enabled) {
        (true, _) => format!(
            "{} bans in the nftables sets of the node sensors ({ready} of {desired} ready)",
            active.len()
        ),
        _ if in_pods => format!(
            "{} bans dropped by the node agents inside the network namespace of each pod the \
             policy selects",
            active.len()
        ),
        _ if wants_pod_nftables(policy) => "PodNftables needs the pod nftables agent: install \
             the chart with nodeSensors.podNftables.enabled=true"
            .to_owned(),
        (false, false) => {
            "node sensors are disabled in this operator (--node-sensors=false); no other \
             backend enforces cluster bans"
                .to_owned()
        }
        (false, true) if policy.spec.node_selector.is_none() => {
            "no nodeSelector: no node sensors enforce this policy's bans".to_owned()
        }
        (false, true) => {
            "enforcement.backends does not name NodeNftables: node sensors detect but do not ban"
                .to_owned()
        }
    };
    let reason = if on_nodes {
        NODE_NFTABLES
    } else if in_pods {
        "PodNftables"
    } else if wants_pod_nftables(policy) {
        status::POD_NFTABLES_AGENT_OFF
    } else {
        "NoUsableBackend"
    };
    for condition in &mut conditions {
        if condition.type_ == status::ENFORCED {
            *condition = status::condition(
                &previous,
                status::ENFORCED,
                enforced,
                reason,
                message.clone(),
                generation,
                now,
            );
        }
    }
    // Node sensors scheduled plus injected sidecars; ready: node sensors ready plus sidecars
    // whose startup probe passed.
    let node_sensors = status::SensorCount {
        injected: u32::try_from(desired).unwrap_or(0),
        ready: u32::try_from(ready).unwrap_or(0),
    };
    let status = StatusApply::of::<ClusterPortSentryPolicy>(status::policy_status(
        conditions,
        active.len(),
        node_sensors.plus(observed.sidecars),
        generation,
    ));
    let (wide, confined): (Vec<&PortSentryBan>, Vec<&PortSentryBan>) = active
        .iter()
        .partition(|ban| !ban.labels().contains_key(CONFINED_LABEL));
    let protection = |ban: &PortSentryBan| {
        observed
            .guards
            .protected(&ban.spec.source, &rules.detection.ignore)
    };
    let mut ban_conditions = status::ban_condition_changes(
        wide.into_iter().map(|ban| (ban, protection(ban))),
        enforced,
        now,
        if on_nodes {
            ban_condition
        } else {
            status::pod_nftables_ban_condition
        },
    );
    // Whatever the policy's backends, a confined ban says first that it is uncorroborated.
    ban_conditions.extend(status::ban_condition_changes(
        confined.into_iter().map(|ban| (ban, protection(ban))),
        true,
        now,
        confined_ban_condition,
    ));
    let expired_conditions =
        status::expired_condition_changes(sorted.remembered.iter().copied(), now);
    let ban_conditions = [ban_conditions, expired_conditions].concat();
    let lifted = sorted
        .remembered
        .iter()
        .map(|(ban, _)| *ban)
        .chain(sorted.forgotten.iter().copied())
        .filter(|ban| !status::marked_expired(ban))
        .cloned()
        .collect();
    let requeue_after = sorted.requeue_after(now).map_or(RESYNC, |d| d.min(RESYNC));
    Plan {
        expired: sorted.forgotten.iter().copied().cloned().collect(),
        lifted,
        active_bans: active.len(),
        enforced,
        status,
        ban_conditions,
        requeue_after,
    }
}

/// The spec of a ban of cluster policy `policy` (for tests and hand-made bans alike).
pub fn ban_spec(policy: &str, source: portsentry_crds::SourcePrefix) -> PortSentryBanSpec {
    PortSentryBanSpec {
        source,
        policy: portsentry_crds::PolicyRef {
            kind: PolicyKind::ClusterPortSentryPolicy,
            name: policy.to_owned(),
        },
        first_seen: None,
        last_seen: None,
        offences: 1,
        expires_at: None,
        reason: None,
        evidence: Vec::new(),
    }
}

#[cfg(test)]
mod confinement_tests {
    use super::*;

    #[test]
    fn a_confined_ban_is_not_enforced_on_nodes_and_says_why() {
        let c = confined_ban_condition(&[], BanEnforcement::Enforced, Timestamp::UNIX_EPOCH);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "Uncorroborated")
        );
        let protected = confined_ban_condition(
            &[],
            BanEnforcement::Protected(crate::enforce::bans::Protection::Service),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(protected.reason, portsentry_crds::PROTECTED_SOURCE_REASON);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::{api::apps::v1::DaemonSetStatus, apimachinery::pkg::apis::meta::v1::Time};
    use portsentry_crds::{ClusterPortSentryPolicySpec, PolicyRules};

    use super::*;
    use crate::enforce::bans;

    const T0: i64 = 1_780_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn policy(backends: Vec<Backend>, node_selector: bool) -> ClusterPortSentryPolicy {
        let mut rules = PolicyRules::default();
        rules.enforcement.backends = backends;
        rules.response.max_active_bans = 2;
        let mut policy = ClusterPortSentryPolicy::new(
            "edge",
            ClusterPortSentryPolicySpec {
                namespace_selector: None,
                pod_selector: None,
                node_selector: node_selector
                    .then(|| [("edge".to_owned(), "true".to_owned())].into()),
                corroboration: Default::default(),
                rules,
            },
        );
        policy.metadata.generation = Some(4);
        policy
    }

    fn ban(policy: &str, source: &str, expires: Option<i64>) -> PortSentryBan {
        let mut spec = ban_spec(policy, source.parse().unwrap());
        spec.expires_at = expires.map(|s| Time(at(s)));
        let mut ban = PortSentryBan::new(&bans::ban_name(policy, &spec.source), spec);
        ban.metadata.namespace = Some("portsentry-system".into());
        ban
    }

    fn daemon_set(desired: i32, ready: i32) -> DaemonSet {
        DaemonSet {
            status: Some(DaemonSetStatus {
                desired_number_scheduled: desired,
                number_ready: ready,
                ..DaemonSetStatus::default()
            }),
            ..DaemonSet::default()
        }
    }

    fn run(
        policy: &ClusterPortSentryPolicy,
        bans: &[PortSentryBan],
        ds: Option<&DaemonSet>,
    ) -> Plan {
        plan(&Observed {
            policy,
            bans,
            daemon_set: ds,
            guards: &Guards::default(),
            node_sensors_enabled: true,
            pod_nftables_agent: false,
            sidecars: status::SensorCount::default(),
            now: at(T0),
        })
    }

    fn condition<'a>(plan: &'a Plan, type_: &str) -> &'a Condition {
        plan.status
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn node_sensors_with_the_nftables_backend_enforce_and_say_how_many_are_ready() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let plan = run(
            &policy,
            &[ban("edge", "203.0.113.7", None)],
            Some(&daemon_set(3, 2)),
        );
        assert!(plan.enforced);
        let enforced = condition(&plan, status::ENFORCED);
        assert_eq!(enforced.status, "True");
        assert_eq!(enforced.reason, NODE_NFTABLES);
        assert!(enforced.message.contains("2 of 3 ready"));
        assert_eq!(plan.status.status.sensors_injected, 3);
        assert_eq!(plan.status.status.sensors_ready, 2);
        assert_eq!(plan.status.status.observed_generation, Some(4));
    }

    #[test]
    fn injected_sidecars_count_next_to_node_sensors_as_injected_and_as_ready() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let plan = plan(&Observed {
            policy: &policy,
            bans: &[],
            daemon_set: Some(&daemon_set(3, 2)),
            guards: &Guards::default(),
            node_sensors_enabled: true,
            pod_nftables_agent: false,
            sidecars: status::SensorCount {
                injected: 4,
                ready: 1,
            },
            now: at(T0),
        });
        assert_eq!(plan.status.status.sensors_injected, 7);
        assert_eq!(plan.status.status.sensors_ready, 3);
    }

    fn run_with_pod_agent(policy: &ClusterPortSentryPolicy, agent: bool) -> Plan {
        plan(&Observed {
            policy,
            bans: &[ban("edge", "203.0.113.7", None)],
            daemon_set: None,
            guards: &Guards::default(),
            node_sensors_enabled: true,
            pod_nftables_agent: agent,
            sidecars: status::SensorCount::default(),
            now: at(T0),
        })
    }

    #[test]
    fn pod_nftables_enforces_cluster_bans_when_its_agent_runs() {
        let policy = policy(vec![Backend::PodNftables], false);
        let plan = run_with_pod_agent(&policy, true);
        assert!(plan.enforced);
        let enforced = condition(&plan, status::ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("True", "PodNftables")
        );
        assert_eq!(plan.ban_conditions[0].1.reason, "PodNftables");
    }

    #[test]
    fn pod_nftables_without_its_agent_names_the_chart_value() {
        let policy = policy(vec![Backend::PodNftables], false);
        let plan = run_with_pod_agent(&policy, false);
        assert!(!plan.enforced);
        let enforced = condition(&plan, status::ENFORCED);
        assert_eq!(enforced.reason, status::POD_NFTABLES_AGENT_OFF);
        assert!(
            enforced
                .message
                .contains("nodeSensors.podNftables.enabled=true")
        );
    }

    #[test]
    fn without_the_nftables_backend_bans_are_not_enforced() {
        let policy = policy(vec![Backend::NetworkPolicy], true);
        let plan = run(&policy, &[], None);
        assert!(!plan.enforced);
        let enforced = condition(&plan, status::ENFORCED);
        assert_eq!(enforced.status, "False");
        assert!(enforced.message.contains("NodeNftables"));
    }

    #[test]
    fn without_a_node_selector_bans_are_not_enforced() {
        let policy = policy(vec![Backend::NodeNftables], false);
        let plan = run(&policy, &[], None);
        assert!(!plan.enforced);
        assert!(
            condition(&plan, status::ENFORCED)
                .message
                .contains("nodeSelector")
        );
    }

    #[test]
    fn only_this_policys_active_bans_count_and_expired_ones_are_deleted() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let bans = [
            ban("edge", "203.0.113.7", Some(T0 + 60)),
            ban("edge", "203.0.113.8", Some(T0 - 1)),
            ban("other", "203.0.113.9", None),
        ];
        let plan = run(&policy, &bans, None);
        assert_eq!(plan.active_bans, 1);
        assert_eq!(plan.expired.len(), 1);
        assert_eq!(plan.status.status.active_bans, 1);
        assert_eq!(plan.requeue_after, Duration::from_secs(60));
    }

    #[test]
    fn expired_bans_within_the_escalation_window_are_kept_marked_expired_and_not_counted() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let mut expired = ban("edge", "203.0.113.8", Some(T0 - 1));
        expired.spec.last_seen = Some(Time(at(T0 - 61)));
        let plan = run(&policy, &[expired], None);
        assert!(plan.expired.is_empty());
        assert_eq!(plan.lifted.len(), 1);
        assert_eq!(plan.active_bans, 0);
        let reasons: Vec<&str> = plan
            .ban_conditions
            .iter()
            .map(|(_, c)| c.reason.as_str())
            .collect();
        assert_eq!(reasons, vec![status::EXPIRED]);
    }

    #[test]
    fn the_ban_cap_condition_follows_the_policys_maximum() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let bans = [
            ban("edge", "203.0.113.7", None),
            ban("edge", "203.0.113.8", None),
        ];
        let plan = run(&policy, &bans, None);
        assert_eq!(condition(&plan, status::BAN_CAP_REACHED).status, "True");
    }

    #[test]
    fn enforced_bans_say_node_nftables_and_protected_ones_say_why_not() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let bans = [
            ban("edge", "203.0.113.7", None),
            ban("edge", "127.0.0.1", None),
        ];
        let plan = run(&policy, &bans, None);
        let reasons: Vec<&str> = plan
            .ban_conditions
            .iter()
            .map(|(_, c)| c.reason.as_str())
            .collect();
        assert_eq!(reasons, vec![NODE_NFTABLES, "ProtectedSource"]);
    }

    #[test]
    fn node_sensors_disabled_in_the_operator_enforce_nothing() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let plan = plan(&Observed {
            policy: &policy,
            bans: &[],
            daemon_set: None,
            guards: &Guards::default(),
            node_sensors_enabled: false,
            pod_nftables_agent: false,
            sidecars: status::SensorCount::default(),
            now: at(T0),
        });
        assert!(!plan.enforced);
    }
}
