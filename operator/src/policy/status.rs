//! Status as users read it: the `Ready`, `Enforced` and `BanCapReached` conditions of a
//! policy (`Ready=False` with the error's reason when a reconcile fails) and the `Enforced`
//! condition of a ban, kept stable so unchanged state writes nothing; the policy's sensor
//! counts (`sensorsInjected`, `sensorsReady`) read from its pods; the typed apply bodies.

use jiff::Timestamp;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{Resource, ResourceExt};
use portsentry_crds::{BanStatus, PolicyStatus, PortSentryBan};
use serde::Serialize;

use crate::{enforce::bans::Protection, inject, labels, policy::widen};

pub const READY: &str = "Ready";
pub const ENFORCED: &str = "Enforced";
pub const BAN_CAP_REACHED: &str = "BanCapReached";

/// What enforcement came to for one policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Generated NetworkPolicies hold the bans.
    Applied { objects: usize, prefixes: usize },
    /// Safe to enforce, but no ban is in force.
    NothingToEnforce,
    /// Other NetworkPolicies select the pods; enforcing would widen them.
    Refused { existing: Vec<String> },
    /// Older PortSentryPolicies protect some of the same pods; they enforce there.
    Yielded { to: Vec<String> },
    /// Policies of another layer (AdminNetworkPolicy, Cilium, Calico) may select the pods;
    /// an allow-all-except NetworkPolicy could widen what they restrict.
    OtherLayers { objects: Vec<String> },
    /// The NetworkPolicy backend could not enforce (`instead_of`: its refusal), so the
    /// next backend does: the node agents drop the bans inside each selected pod's own
    /// network namespace.
    PodNftables {
        prefixes: usize,
        instead_of: Option<String>,
    },
    /// None of the policy's backends can enforce for this kind of policy.
    NoBackend,
    /// The policy asks for PodNftables (and nothing before it enforces), but the node agent
    /// is not installed.
    PodNftablesAgentOff { instead_of: Option<String> },
}

/// The message of a refusal that a later backend made up for, as `instead_of` says it.
pub fn fallback_note(reason: &str, message: &str) -> String {
    format!("NetworkPolicy refused ({reason}: {message})")
        .chars()
        .take(512)
        .collect()
}

impl Enforcement {
    /// True when the policy's bans drop traffic (or would, had it any).
    pub fn is_safe(&self) -> bool {
        matches!(
            self,
            Enforcement::Applied { .. }
                | Enforcement::NothingToEnforce
                | Enforcement::PodNftables { .. }
        )
    }
}

/// A condition; its transition time is kept from `previous` when its status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Reason of `Enforced=True` when generated NetworkPolicies hold the bans.
pub const NETWORK_POLICY_APPLIED: &str = "NetworkPolicyApplied";
/// Reason of `Enforced=True` when the NetworkPolicy backend would enforce but no ban is in
/// force.
pub const NO_ACTIVE_BANS: &str = "NoActiveBans";

/// Reason of `Enforced=False` when the policy relies on PodNftables and the agent is off.
pub const POD_NFTABLES_AGENT_OFF: &str = "PodNftablesAgentNotInstalled";

/// Reason of `Enforced=False` when another policy layer may select the pods.
pub const OTHER_POLICY_LAYERS: &str = "OtherPolicyLayers";

/// Why the NetworkPolicy backend refuses beside other policy layers, naming (some of) them.
pub fn other_layers_message(objects: &[String]) -> String {
    let shown: Vec<&str> = objects.iter().take(10).map(String::as_str).collect();
    let more = objects.len().saturating_sub(shown.len());
    let mut message = format!(
        "not enforcing with NetworkPolicy: policies of another layer may select these pods, and \
         an allow-all-except NetworkPolicy could widen what they restrict: {}",
        shown.join(", ")
    );
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    message
}

fn with_fallback(message: String, instead_of: &Option<String>) -> String {
    match instead_of {
        Some(refusal) => format!("{message}; {refusal}"),
        None => message,
    }
}

/// The conditions of a policy after a reconcile.
pub fn policy_conditions(
    previous: &[Condition],
    enforcement: &Enforcement,
    active_bans: usize,
    max_active_bans: u32,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let (enforced, reason, message) = match enforcement {
        Enforcement::Applied { objects, prefixes } => (
            true,
            NETWORK_POLICY_APPLIED,
            format!("{prefixes} banned prefixes in {objects} generated NetworkPolicies"),
        ),
        Enforcement::NothingToEnforce => (
            true,
            NO_ACTIVE_BANS,
            "no ban is in force; generated NetworkPolicies appear with the first".to_owned(),
        ),
        Enforcement::Refused { existing } => (
            false,
            widen::EXISTING_NETWORK_POLICIES,
            widen::refusal_message(existing),
        ),
        Enforcement::Yielded { to } => (
            false,
            widen::OVERLAPPING_POLICIES,
            format!(
                "not enforcing: older PortSentryPolicies protect some of the same pods and enforce there: {}",
                to.join(", ")
            )
            .chars()
            .take(1024)
            .collect(),
        ),
        Enforcement::PodNftables {
            prefixes,
            instead_of,
        } => (
            true,
            "PodNftables",
            with_fallback(
                format!(
                    "{prefixes} banned prefixes dropped by the node agents inside the network \
                     namespace of each selected pod"
                ),
                instead_of,
            ),
        ),
        Enforcement::OtherLayers { objects } => (
            false,
            OTHER_POLICY_LAYERS,
            other_layers_message(objects),
        ),
        Enforcement::NoBackend => (
            false,
            "NoUsableBackend",
            "none of spec.enforcement.backends can enforce bans of this policy".to_owned(),
        ),
        Enforcement::PodNftablesAgentOff { instead_of } => (
            false,
            POD_NFTABLES_AGENT_OFF,
            with_fallback(
                "PodNftables needs the pod nftables agent: install the chart with \
                 nodeSensors.podNftables.enabled=true"
                    .to_owned(),
                instead_of,
            ),
        ),
    };
    let cap = active_bans >= max_active_bans as usize;
    vec![
        condition(
            previous,
            READY,
            true,
            "Reconciled",
            "bans and enforcement are up to date".into(),
            generation,
            now,
        ),
        condition(
            previous, ENFORCED, enforced, reason, message, generation, now,
        ),
        condition(
            previous,
            BAN_CAP_REACHED,
            cap,
            if cap {
                "MaxActiveBans"
            } else {
                "BelowMaxActiveBans"
            },
            format!("{active_bans} of at most {max_active_bans} bans in force"),
            generation,
            now,
        ),
    ]
}

/// The server-side apply body of a `K`'s status: its `apiVersion`, `kind` and the status
/// fields this operator owns, nothing of its spec or metadata.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusApply<S> {
    pub api_version: String,
    pub kind: String,
    pub status: S,
}

impl<S> StatusApply<S> {
    /// The apply body of `status` for an object of kind `K`.
    pub fn of<K: Resource<DynamicType = ()>>(status: S) -> Self {
        Self {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            status,
        }
    }
}

/// A policy's status after a reconcile: only the fields this operator owns (the webhook's
/// `skippedDecoys` is left out, so the apply neither claims nor clears it).
pub fn policy_status(
    conditions: Vec<Condition>,
    active_bans: usize,
    sensors: SensorCount,
    generation: Option<i64>,
) -> PolicyStatus {
    PolicyStatus {
        observed_generation: generation,
        conditions,
        sensors_injected: sensors.injected,
        sensors_ready: sensors.ready,
        active_bans: u32::try_from(active_bans).unwrap_or(u32::MAX),
        skipped_decoys: Vec::new(),
    }
}

/// A policy's status after a failed reconcile: what it said before (the last reconcile's
/// counts and `Enforced`, still true of what was written), with `Ready=False`, `reason` (a
/// fixed word, [`crate::Error::reason`]) and `message` (the error, saying what to do).
pub fn failed_status(
    previous: Option<&PolicyStatus>,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> PolicyStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.skipped_decoys = Vec::new();
    let ready = condition(
        &status.conditions,
        READY,
        false,
        reason,
        message.chars().take(MAX_MESSAGE).collect(),
        generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(0, ready);
    status
}

/// Reason of `Enforced=False` while a failing policy's generated NetworkPolicies are
/// withdrawn (and of the Warning Event saying so).
pub const WITHDRAWN: &str = "NetworkPoliciesWithdrawn";

/// `previous` with `Enforced=False` ([`WITHDRAWN`]) where it said the generated
/// NetworkPolicies enforce, or where `withdrawn` of them were just deleted because the
/// reconcile failed; `None` when nothing it says changes (PodNftables enforces without them,
/// or the NetworkPolicy backend was refused anyway).
pub fn withdrawn(
    previous: Option<&PolicyStatus>,
    withdrawn: usize,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<PolicyStatus> {
    let mut status = previous.cloned().unwrap_or_default();
    let by_network_policy = status.conditions.iter().any(|c| {
        c.type_ == ENFORCED && matches!(c.reason.as_str(), NETWORK_POLICY_APPLIED | NO_ACTIVE_BANS)
    });
    if !by_network_policy && withdrawn == 0 {
        return None;
    }
    let enforced = condition(
        &status.conditions,
        ENFORCED,
        false,
        WITHDRAWN,
        format!(
            "the reconcile failed (see Ready): {withdrawn} generated NetworkPolicies withdrawn \
             rather than left unchecked; bans are enforced again once it succeeds"
        ),
        generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != ENFORCED);
    status.conditions.push(enforced);
    Some(status)
}

/// Longest condition message written (the API allows 32768; a user reads the first lines).
const MAX_MESSAGE: usize = 1024;

/// The status of a ban: its one `Enforced` condition.
pub fn ban_status(enforced: Condition) -> BanStatus {
    BanStatus {
        conditions: vec![enforced],
    }
}

/// A policy's sensors as its status counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SensorCount {
    /// Pods given a sensor by the policy (`sensorsInjected`).
    pub injected: u32,
    /// Sensors whose decoys are listening (`sensorsReady`).
    pub ready: u32,
}

impl SensorCount {
    /// Both counts of `self` and `other` together (node sensors plus sidecars).
    pub fn plus(self, other: SensorCount) -> SensorCount {
        SensorCount {
            injected: self.injected.saturating_add(other.injected),
            ready: self.ready.saturating_add(other.ready),
        }
    }
}

/// True when the sensor injected into `pod` is ready: the kubelet marks the native sidecar
/// ([`inject::SIDECAR_NAME`]) ready once its startup probe on `/readyz` passes, i.e. once its
/// decoys listen. A pod being deleted, or finished (`Succeeded`, `Failed`), has no ready
/// sensor whatever its last container status says: the sensor is going or gone.
pub fn sensor_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return false;
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .any(|c| c.name == inject::SIDECAR_NAME && c.ready)
}

/// The sensors of the policy `reference` (`PortSentryPolicy/<name>` or
/// `ClusterPortSentryPolicy/<name>`, as [`labels::INJECTED_ANNOTATION`] names it) among `pods`:
/// the pods injected for it, and those of them whose sensor is ready ([`sensor_ready`]).
/// Pods of other policies and pods without a sensor are not counted.
pub fn count_sensors<'a>(pods: impl IntoIterator<Item = &'a Pod>, reference: &str) -> SensorCount {
    pods.into_iter()
        .filter(|pod| {
            pod.annotations()
                .get(labels::INJECTED_ANNOTATION)
                .map(String::as_str)
                == Some(reference)
        })
        .fold(SensorCount::default(), |count, pod| SensorCount {
            injected: count.injected.saturating_add(1),
            ready: count.ready.saturating_add(u32::from(sensor_ready(pod))),
        })
}

/// Whether one ban drops traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanEnforcement {
    Enforced,
    /// The source may never be banned (loopback, node, ignore list...).
    Protected(Protection),
    /// Its policy cannot enforce (see the policy's `Enforced` condition).
    PolicyNotEnforced,
    /// Past its expiry; kept, never enforced, until the given instant so that a repeat
    /// offence escalates.
    Expired {
        remembered_until: Timestamp,
    },
}

/// Reason of `Enforced=False` on a ban past its expiry that is kept for escalation.
pub const EXPIRED: &str = "Expired";

/// The `Enforced` condition of a ban.
pub fn ban_condition(previous: &[Condition], state: BanEnforcement, now: Timestamp) -> Condition {
    let (status, reason, message) = match state {
        BanEnforcement::Enforced => (
            true,
            "NetworkPolicy",
            "dropped by the policy's generated NetworkPolicies".to_owned(),
        ),
        BanEnforcement::Protected(why) => (
            false,
            portsentry_crds::PROTECTED_SOURCE_REASON,
            format!("never enforced: the source is protected ({})", why.as_str()),
        ),
        BanEnforcement::PolicyNotEnforced => (
            false,
            "PolicyNotEnforced",
            "the policy cannot enforce bans; see its Enforced condition".to_owned(),
        ),
        BanEnforcement::Expired { remembered_until } => (
            false,
            EXPIRED,
            format!(
                "lifted at expiresAt; kept until {remembered_until} (lastSeen + \
                 escalation.window), then deleted: a new offence before then escalates"
            ),
        ),
    };
    condition(previous, ENFORCED, status, reason, message, None, now)
}

/// The `Enforced` condition of a ban of a policy whose bans the pod nftables agents drop.
pub fn pod_nftables_ban_condition(
    previous: &[Condition],
    state: BanEnforcement,
    now: Timestamp,
) -> Condition {
    match state {
        BanEnforcement::Enforced => condition(
            previous,
            ENFORCED,
            true,
            "PodNftables",
            "dropped by the node agents inside the network namespace of each pod of the policy"
                .to_owned(),
            None,
            now,
        ),
        other => ban_condition(previous, other, now),
    }
}

/// True when writing `desired` would change what `previous` says.
pub fn differs(previous: &[Condition], desired: &Condition) -> bool {
    !previous.iter().any(|c| {
        c.type_ == desired.type_
            && c.status == desired.status
            && c.reason == desired.reason
            && c.message == desired.message
    })
}

/// The `Enforced` conditions to write: for each ban (with the protection that keeps it from
/// being enforced, if any), `condition`'s verdict where it differs from what the ban has.
pub fn ban_condition_changes<'a>(
    bans: impl Iterator<Item = (&'a PortSentryBan, Option<Protection>)>,
    enforced: bool,
    now: Timestamp,
    condition: fn(&[Condition], BanEnforcement, Timestamp) -> Condition,
) -> Vec<(String, Condition)> {
    bans.filter_map(|(ban, protected)| {
        let state = match protected {
            Some(why) => BanEnforcement::Protected(why),
            None if enforced => BanEnforcement::Enforced,
            None => BanEnforcement::PolicyNotEnforced,
        };
        change(ban, state, now, condition)
    })
    .collect()
}

/// `condition`'s verdict on `ban` in `state`, named, if it differs from what the ban has.
fn change(
    ban: &PortSentryBan,
    state: BanEnforcement,
    now: Timestamp,
    condition: fn(&[Condition], BanEnforcement, Timestamp) -> Condition,
) -> Option<(String, Condition)> {
    let previous = ban
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let desired = condition(previous, state, now);
    differs(previous, &desired).then(|| (ban.name_any(), desired))
}

/// True when `ban`'s `Enforced` condition already says it expired.
pub fn marked_expired(ban: &PortSentryBan) -> bool {
    ban.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == ENFORCED && c.reason == EXPIRED)
    })
}

/// The `Enforced=False` `Expired` conditions to write on expired bans kept until the given
/// instants, where they differ from what the bans have.
pub fn expired_condition_changes<'a>(
    bans: impl Iterator<Item = (&'a PortSentryBan, Timestamp)>,
    now: Timestamp,
) -> Vec<(String, Condition)> {
    bans.filter_map(|(ban, remembered_until)| {
        let state = BanEnforcement::Expired { remembered_until };
        change(ban, state, now, ban_condition)
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use portsentry_crds::PortSentryPolicy;
    use serde_json::json;

    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn applied_enforcement_is_enforced_true() {
        let c = policy_conditions(
            &[],
            &Enforcement::Applied {
                objects: 2,
                prefixes: 1500,
            },
            1500,
            10_000,
            Some(3),
            at(100),
        );
        let enforced = find(&c, ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("True", "NetworkPolicyApplied")
        );
        assert_eq!(enforced.observed_generation, Some(3));
        assert_eq!(find(&c, READY).status, "True");
        assert_eq!(find(&c, BAN_CAP_REACHED).status, "False");
    }

    #[test]
    fn refusal_is_enforced_false_with_reason_existing_network_policies() {
        let refused = Enforcement::Refused {
            existing: vec!["allow-lb".into()],
        };
        let c = policy_conditions(&[], &refused, 1, 10, None, at(100));
        let enforced = find(&c, ENFORCED);
        assert_eq!(enforced.status, "False");
        assert_eq!(enforced.reason, "ExistingNetworkPolicies");
        assert!(enforced.message.contains("allow-lb"));
    }

    #[test]
    fn yielding_to_an_older_policy_is_enforced_false_naming_it() {
        let yielded = Enforcement::Yielded {
            to: vec!["web".into()],
        };
        let c = policy_conditions(&[], &yielded, 0, 10, None, at(100));
        let enforced = find(&c, ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("False", "OverlappingPortSentryPolicies")
        );
        assert!(enforced.message.ends_with(": web"));
    }

    #[test]
    fn reaching_the_cap_sets_ban_cap_reached() {
        let c = policy_conditions(&[], &Enforcement::NothingToEnforce, 10, 10, None, at(100));
        assert_eq!(find(&c, BAN_CAP_REACHED).status, "True");
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = policy_conditions(&[], &Enforcement::NothingToEnforce, 0, 10, None, at(100));
        let same = policy_conditions(
            &first,
            &Enforcement::Applied {
                objects: 1,
                prefixes: 1,
            },
            1,
            10,
            None,
            at(200),
        );
        assert_eq!(find(&same, ENFORCED).last_transition_time, Time(at(100)));
        let flipped = policy_conditions(
            &same,
            &Enforcement::Refused {
                existing: vec!["x".into()],
            },
            1,
            10,
            None,
            at(300),
        );
        assert_eq!(find(&flipped, ENFORCED).last_transition_time, Time(at(300)));
    }

    #[test]
    fn status_patch_carries_only_owned_fields() {
        let c = policy_conditions(&[], &Enforcement::NothingToEnforce, 0, 10, Some(1), at(100));
        let apply = StatusApply::of::<PortSentryPolicy>(policy_status(
            c,
            0,
            SensorCount::default(),
            Some(1),
        ));
        let patch = serde_json::to_value(&apply).unwrap();
        let status = patch["status"].as_object().unwrap();
        let mut keys: Vec<&str> = status.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "activeBans",
                "conditions",
                "observedGeneration",
                "sensorsInjected",
                "sensorsReady"
            ]
        );
        assert_eq!(patch["kind"], "PortSentryPolicy");
    }

    fn reconciled(generation: i64) -> PolicyStatus {
        let applied = Enforcement::Applied {
            objects: 1,
            prefixes: 2,
        };
        let c = policy_conditions(&[], &applied, 2, 10, Some(generation), at(100));
        policy_status(
            c,
            2,
            SensorCount {
                injected: 3,
                ready: 3,
            },
            Some(generation),
        )
    }

    #[test]
    fn a_failed_reconcile_is_ready_false_with_the_errors_reason_and_message() {
        let failed = failed_status(
            Some(&reconciled(1)),
            "WriteRejected",
            "could not write NetworkPolicy shop/portsentry-web-0: exceeded quota".into(),
            Some(2),
            at(200),
        );
        let ready = find(&failed.conditions, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "WriteRejected")
        );
        assert!(ready.message.contains("exceeded quota"));
        assert_eq!(ready.observed_generation, Some(2));
        assert_eq!(ready.last_transition_time, Time(at(200)));
    }

    #[test]
    fn a_failed_reconcile_keeps_what_the_last_one_wrote() {
        let before = reconciled(1);
        let failed = failed_status(
            Some(&before),
            "KubernetesApiError",
            "x".into(),
            Some(1),
            at(200),
        );
        assert_eq!(failed.conditions.len(), 3);
        assert_eq!(
            find(&failed.conditions, ENFORCED),
            find(&before.conditions, ENFORCED)
        );
        assert_eq!(
            (failed.active_bans, failed.sensors_ready),
            (before.active_bans, before.sensors_ready)
        );
    }

    #[test]
    fn a_policy_failing_before_its_first_status_gets_ready_false_alone() {
        let failed = failed_status(None, "InvalidSelector", "bad".into(), Some(1), at(100));
        assert_eq!(failed.conditions.len(), 1);
        assert_eq!(failed.conditions[0].type_, READY);
    }

    fn status_enforced_by(reason: &str) -> PolicyStatus {
        PolicyStatus {
            conditions: vec![condition(
                &[],
                ENFORCED,
                true,
                reason,
                String::new(),
                Some(1),
                at(50),
            )],
            ..PolicyStatus::default()
        }
    }

    #[test]
    fn withdrawn_network_policies_make_enforced_false() {
        let before = status_enforced_by(NETWORK_POLICY_APPLIED);
        let after = withdrawn(Some(&before), 2, Some(1), at(100)).unwrap();
        let enforced = find(&after.conditions, ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("False", WITHDRAWN)
        );
        assert!(enforced.message.contains("2 generated NetworkPolicies"));
    }

    #[test]
    fn a_failure_under_pod_nftables_leaves_enforced_alone() {
        let before = status_enforced_by("PodNftables");
        assert_eq!(withdrawn(Some(&before), 0, Some(1), at(100)), None);
    }

    #[test]
    fn a_long_error_is_cut_in_the_condition_message() {
        let failed = failed_status(None, "WriteRejected", "x".repeat(40_000), None, at(100));
        assert_eq!(failed.conditions[0].message.chars().count(), MAX_MESSAGE);
    }

    #[test]
    fn a_ban_status_apply_carries_its_kind_and_only_the_condition() {
        let c = ban_condition(&[], BanEnforcement::Enforced, at(100));
        let apply = StatusApply::of::<PortSentryBan>(ban_status(c));
        let patch = serde_json::to_value(&apply).unwrap();
        assert_eq!(
            (patch["apiVersion"].as_str(), patch["kind"].as_str()),
            (Some("portsentry.io/v1alpha1"), Some("PortSentryBan"))
        );
        assert_eq!(patch["status"]["conditions"][0]["type"], ENFORCED);
        assert_eq!(patch.as_object().unwrap().len(), 3);
    }

    #[test]
    fn an_unchanged_ban_condition_needs_no_write() {
        let c = ban_condition(&[], BanEnforcement::Enforced, at(100));
        assert!(!differs(
            std::slice::from_ref(&c),
            &ban_condition(std::slice::from_ref(&c), BanEnforcement::Enforced, at(200))
        ));
        let protected = ban_condition(
            std::slice::from_ref(&c),
            BanEnforcement::Protected(Protection::Node),
            at(200),
        );
        assert!(differs(&[c], &protected));
        assert!(protected.message.contains("node"));
    }

    /// A pod the webhook injected for `policy`, its init container statuses `statuses`
    /// (name, ready, started) and phase `phase`.
    fn injected_pod(policy: &str, statuses: &[(&str, bool, bool)], phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u1",
                "annotations": {labels::INJECTED_ANNOTATION: policy},
            },
            "status": {
                "phase": phase,
                "initContainerStatuses": statuses.iter().map(|(name, ready, started)| json!({
                    "name": name, "image": "sensor:1", "imageID": "", "ready": ready,
                    "restartCount": 0, "started": started,
                })).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    const WEB: &str = "PortSentryPolicy/web";

    #[test]
    fn a_ready_sidecar_makes_a_ready_sensor() {
        let pod = injected_pod(WEB, &[(inject::SIDECAR_NAME, true, true)], "Running");
        assert!(sensor_ready(&pod));
    }

    #[test]
    fn a_sidecar_not_yet_started_is_not_a_ready_sensor() {
        let pod = injected_pod(WEB, &[(inject::SIDECAR_NAME, false, false)], "Pending");
        assert!(!sensor_ready(&pod));
    }

    #[test]
    fn a_pod_without_a_status_for_the_sidecar_has_no_ready_sensor() {
        let pod = injected_pod(WEB, &[], "Pending");
        assert!(!sensor_ready(&pod));
        let mut no_status = pod;
        no_status.status = None;
        assert!(!sensor_ready(&no_status));
    }

    #[test]
    fn another_containers_readiness_does_not_make_the_sensor_ready() {
        let pod = injected_pod(
            WEB,
            &[
                ("istio-proxy", true, true),
                (inject::SIDECAR_NAME, false, true),
            ],
            "Running",
        );
        assert!(!sensor_ready(&pod));
    }

    #[test]
    fn a_terminating_pod_has_no_ready_sensor() {
        let mut pod = injected_pod(WEB, &[(inject::SIDECAR_NAME, true, true)], "Running");
        pod.metadata.deletion_timestamp = Some(Time(at(100)));
        assert!(!sensor_ready(&pod));
    }

    #[test]
    fn a_finished_pod_has_no_ready_sensor() {
        for phase in ["Succeeded", "Failed"] {
            let pod = injected_pod(WEB, &[(inject::SIDECAR_NAME, true, true)], phase);
            assert!(!sensor_ready(&pod), "{phase}");
        }
    }

    #[test]
    fn sensors_count_only_for_the_policy_that_injected_them() {
        let ready = injected_pod(WEB, &[(inject::SIDECAR_NAME, true, true)], "Running");
        let starting = injected_pod(WEB, &[(inject::SIDECAR_NAME, false, false)], "Pending");
        let other = injected_pod(
            "ClusterPortSentryPolicy/web",
            &[(inject::SIDECAR_NAME, true, true)],
            "Running",
        );
        let mut plain = ready.clone();
        plain.metadata.annotations = None;
        assert_eq!(
            count_sensors([&ready, &starting, &other, &plain], WEB),
            SensorCount {
                injected: 2,
                ready: 1
            }
        );
    }
}
