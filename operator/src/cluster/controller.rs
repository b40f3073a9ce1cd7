//! The ClusterPortSentryPolicy controller: node-sensor DaemonSet and ConfigMap (built by
//! `nodes`), the ConfigMaps of the sidecars the webhook injected for the policy (built by
//! `inject`), expiry of the policy's cluster-scope bans, and the policy's status.
//!
//! ```text
//!  ClusterPortSentryPolicy ──┐                        ┌─ apply DaemonSet + ConfigMap (SSA), or
//!  DaemonSet, ConfigMap ─────┤                        │  delete them when nodeSelector is gone
//!  (owned, operator ns)      ├─▶ reconcile(policy) ───┼─ apply sidecar ConfigMaps in every
//!  Pod (injected ones, ──────┤   nodes::build_*,      │  namespace with a pod injected for the
//!  trimmed: arrive, leave,   │   inject::cluster_     │  policy; delete the ones no pod needs
//!  sensor readiness flips)   │                        │
//!  PortSentryBan ────────────┘   sensor_config_maps,  ├─ delete expired bans of the policy
//!  (operator namespace)          plan (pure)          ├─ status: Ready, Enforced, BanCapReached,
//!                                                     │  sensorsInjected/Ready, activeBans
//!                                                     └─ requeue at the next ban expiry
//! ```

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{
    Backend, ClusterPortSentryPolicy, PolicyKind, PortSentryBan, PortSentryBanSpec,
};
use serde_json::Value;
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    bans::{self, Guards},
    controller::{self as policy_controller, WatchBackoff},
    inject,
    metrics::Metrics,
    netpol,
    nodes::{self, NodeSensorSettings},
    plan::RESYNC,
    status::{self, BanEnforcement, Enforcement},
};

/// Label value of this controller in metrics.
pub const CONTROLLER: &str = "cluster_policy";
/// Wait after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);
/// Reason of `Enforced=True` when node sensors keep the bans in nftables.
pub const NODE_NFTABLES: &str = "NodeNftables";

/// The node sensors as the operator was told to run them.
#[derive(Clone, Debug)]
pub struct NodeSensors {
    /// False (`--node-sensors=false`): no DaemonSets are managed at all.
    pub enabled: bool,
    /// The operator's namespace: DaemonSets, ConfigMaps and cluster bans live there.
    pub namespace: String,
    pub sidecar: inject::Settings,
    pub settings: NodeSensorSettings,
    /// The intake's CA bundle, rendered into node and sidecar ConfigMaps (follows rotation).
    pub report_ca_pem: crate::intake_tls::CaBundle,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub guards: Arc<RwLock<Guards>>,
    pub nodes: NodeSensors,
    /// The controller's cache of cluster policies (forgetting deleted ones' metrics).
    pub policies: Store<ClusterPortSentryPolicy>,
    /// Every pod the webhook injected (label `portsentry.io/sensor=injected`), trimmed to
    /// its sensor annotations and sidecar readiness ([`status::sensor_view`]).
    pub pods: Store<Pod>,
    /// One reconcile at a time waits for the pod store's first list (see the policy
    /// controller's `bans_ready`): an empty store would read as "no pod needs a ConfigMap".
    pub pods_ready: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

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
    /// Sidecars the webhook injected for this policy, and how many are ready.
    pub sidecars: status::SensorCount,
    pub now: Timestamp,
}

/// What a reconcile of one cluster policy writes (besides the node-sensor objects).
#[derive(Clone, Debug)]
pub struct Plan {
    /// Bans past expiry: delete them (only if unchanged since read).
    pub expired: Vec<PortSentryBan>,
    pub active_bans: usize,
    pub enforced: bool,
    /// Server-side apply body of the policy's status.
    pub status: Value,
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

/// Decides the status, expiries and ban conditions of one cluster policy.
pub fn plan(observed: &Observed<'_>) -> Plan {
    let policy = observed.policy;
    let name = policy.name_any();
    let now = observed.now;
    let rules = &policy.spec.rules;
    let (active, expired): (Vec<&PortSentryBan>, Vec<&PortSentryBan>) = observed
        .bans
        .iter()
        .filter(|ban| of_policy(ban, &name))
        .partition(|ban| bans::is_active(&ban.spec, now));
    let enforced = enforces_on_nodes(policy, observed.node_sensors_enabled);
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
    let message = match (enforced, observed.node_sensors_enabled) {
        (true, _) => format!(
            "{} bans in the nftables sets of the node sensors ({ready} of {desired} ready)",
            active.len()
        ),
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
    let reason = if enforced {
        NODE_NFTABLES
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
    let status = status::policy_status_patch(
        &ClusterPortSentryPolicy::api_version(&()),
        &ClusterPortSentryPolicy::kind(&()),
        &conditions,
        active.len(),
        node_sensors.plus(observed.sidecars),
        generation,
    );
    let ban_conditions = status::ban_condition_changes(
        active.iter().map(|ban| {
            let protected = observed
                .guards
                .protected(&ban.spec.source, &rules.detection.ignore);
            (*ban, protected)
        }),
        enforced,
        now,
        ban_condition,
    );
    let requeue_after = active
        .iter()
        .filter_map(|ban| bans::requeue_after(now, &ban.spec))
        .min()
        .map_or(RESYNC, |d| d.min(RESYNC));
    Plan {
        expired: expired.into_iter().cloned().collect(),
        active_bans: active.len(),
        enforced,
        status,
        ban_conditions,
        requeue_after,
    }
}

fn field_manager() -> PatchParams {
    PatchParams::apply(netpol::MANAGER).force()
}

fn ban_to_policy(ban: &PortSentryBan) -> Option<ObjectRef<ClusterPortSentryPolicy>> {
    (ban.spec.policy.kind == PolicyKind::ClusterPortSentryPolicy)
        .then(|| ObjectRef::new(&ban.spec.policy.name))
}

/// The cluster policy a pod was injected for (its `portsentry.io/injected` annotation).
pub fn pod_to_policy(pod: &PartialObjectMeta<Pod>) -> Option<ObjectRef<ClusterPortSentryPolicy>> {
    pod.annotations()
        .get(inject::INJECTED_ANNOTATION)?
        .strip_prefix("ClusterPortSentryPolicy/")
        .map(ObjectRef::new)
}

/// Selector of the pods the webhook injected (node sensors are labelled `=node`).
pub const INJECTED_PODS: &str = "portsentry.io/sensor=injected";

/// Selector of the sidecar ConfigMaps: the sensor configs rendered by this operator, but not
/// the node sensors' (labelled with [`nodes::CLUSTER_POLICY_LABEL`], managed next to their
/// DaemonSet).
fn sidecar_config_selector() -> String {
    format!(
        "{},!{}",
        inject::SENSOR_CONFIG_SELECTOR,
        nodes::CLUSTER_POLICY_LABEL
    )
}

/// Runs the cluster-policy controller until a termination signal.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    guards: Arc<RwLock<Guards>>,
    nodes: NodeSensors,
) {
    let namespace = nodes.namespace.clone();
    let owned = watcher::Config::default().labels(nodes::CLUSTER_POLICY_LABEL);
    let mut controller = Controller::new(
        Api::<ClusterPortSentryPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .trigger_backoff(WatchBackoff::default());
    let policies = controller.store();
    if nodes.enabled {
        controller = controller
            .owns(
                Api::<DaemonSet>::namespaced(client.clone(), &namespace),
                owned.clone(),
            )
            .owns(
                Api::<ConfigMap>::namespaced(client.clone(), &namespace),
                owned,
            );
    }
    let ban_events = watcher::watcher(
        Api::<PortSentryBan>::namespaced(client.clone(), &namespace),
        watcher::Config::default(),
    )
    .backoff(WatchBackoff::default())
    .touched_objects();
    // Injected pods only, kept in a store for the reconciles; their arrival, departure or
    // sensor readiness flip reconciles the cluster policy named in their annotation.
    // Full pods (readiness is status), label-bounded and trimmed by `sensor_view`: one watch
    // serves every reconcile and the triggers, where a list per reconcile would cost a call.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let pod_events = policy_controller::injected_pod_triggers(
        watcher::watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(INJECTED_PODS),
        )
        .modify(status::sensor_view)
        .reflect(pod_writer),
    );
    // A new intake CA bundle (a rotated --report-ca-file) re-renders every sensor ConfigMap.
    let ca_changes = crate::intake_tls::ca_changes(nodes.report_ca_pem.clone());
    let context = Arc::new(Context {
        client,
        metrics,
        guards,
        nodes,
        policies,
        pods,
        pods_ready: tokio::sync::Mutex::new(()),
    });
    controller
        .reconcile_all_on(ca_changes)
        .watches_stream(ban_events, |ban| ban_to_policy(&ban))
        .watches_stream(pod_events, |pod| pod_to_policy(&pod))
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::debug!(%object, ?action, "reconciled"),
                Err(error) => warn!(%error, "cluster policy controller"),
            }
        })
        .await;
}

async fn reconcile(policy: Arc<ClusterPortSentryPolicy>, context: Arc<Context>) -> Result<Action> {
    let key = policy.name_any();
    let started = Instant::now();
    let result = reconcile_policy(&policy, &context, &key)
        .instrument(info_span!("reconcile", cluster_policy = %key))
        .await;
    context.metrics.reconciled(CONTROLLER, started.elapsed());
    let live = context
        .policies
        .state()
        .iter()
        .map(|p| p.name_any())
        .collect();
    context.metrics.retain_cluster_policies(&live);
    result
}

fn error_policy(
    policy: Arc<ClusterPortSentryPolicy>,
    error: &Error,
    context: Arc<Context>,
) -> Action {
    warn!(cluster_policy = %policy.name_any(), %error, "reconcile failed");
    context.metrics.reconcile_failed(CONTROLLER, error);
    Action::requeue(RETRY)
}

/// Applies `object` when wanted, deletes `name` otherwise (gone already is fine).
async fn apply_or_delete<K>(api: &Api<K>, name: &str, object: Option<K>) -> Result<Option<K>>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match object {
        Some(object) => Ok(Some(
            api.patch(name, &field_manager(), &Patch::Apply(&object))
                .await?,
        )),
        None => match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(
                    object = name,
                    "node sensor object deleted (no nodeSelector)"
                );
                Ok(None)
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(error) => Err(error.into()),
        },
    }
}

/// One pass: build (pure), apply the node-sensor objects, expire bans, write status.
async fn reconcile_policy(
    policy: &ClusterPortSentryPolicy,
    context: &Context,
    key: &str,
) -> Result<Action> {
    let client = &context.client;
    let nodes = &context.nodes;
    let namespace = nodes.namespace.as_str();
    let name = policy.name_any();
    let object_name = nodes::object_name(&name);

    // Build and apply the node sensors.
    let report_ca_pem = nodes.report_ca_pem.borrow().clone();
    let daemon_set = if nodes.enabled {
        let target = nodes::Target {
            namespace,
            sidecar: &nodes.sidecar,
            nodes: &nodes.settings,
            report_ca_pem: report_ca_pem.as_deref(),
        };
        let config_map = nodes::build_config_map(policy, &target)?;
        let daemon_set = nodes::build_daemon_set(policy, &target)?;
        // The ConfigMap first: a new DaemonSet's pods find their config.
        apply_or_delete(
            &Api::<ConfigMap>::namespaced(client.clone(), namespace),
            &object_name,
            config_map,
        )
        .await?;
        apply_or_delete(
            &Api::<DaemonSet>::namespaced(client.clone(), namespace),
            &object_name,
            daemon_set,
        )
        .await?
    } else {
        None
    };

    let sidecars = apply_sidecar_config_maps(policy, context).await?;

    // Observe the bans and plan.
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let bans_now = ban_api.list(&ListParams::default()).await?.items;
    let guards = context
        .guards
        .read()
        .map(|g| g.clone())
        .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    let plan = plan(&Observed {
        policy,
        bans: &bans_now,
        daemon_set: daemon_set.as_ref(),
        guards: &guards,
        node_sensors_enabled: nodes.enabled,
        sidecars,
        now: Timestamp::now(),
    });

    // Apply and report.
    let removed = delete_expired(&ban_api, &plan.expired).await;
    if removed > 0 {
        context.metrics.bans_expired(removed);
        info!(removed, "expired cluster bans removed");
    }
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .patch_status(&name, &field_manager(), &Patch::Apply(&plan.status))
        .await?;
    for (ban, condition) in plan.ban_conditions {
        let patch = serde_json::json!({
            "apiVersion": PortSentryBan::api_version(&()),
            "kind": PortSentryBan::kind(&()),
            "status": {"conditions": [condition]},
        });
        match ban_api
            .patch_status(&ban, &field_manager(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    context
        .metrics
        .cluster_policy_state(key, plan.active_bans, plan.enforced);
    Ok(Action::requeue(plan.requeue_after))
}

/// Applies the ConfigMaps of the sidecars injected for `policy` (in each namespace with such
/// a pod) and deletes the ones it controls that no pod needs any more; returns the sidecars
/// injected for it and how many of them are ready.
async fn apply_sidecar_config_maps(
    policy: &ClusterPortSentryPolicy,
    context: &Context,
) -> Result<status::SensorCount> {
    {
        let _one_waiter = context.pods_ready.lock().await;
        context
            .pods
            .wait_until_ready()
            .await
            .map_err(|_| Error::Config("the injected-pod watch stopped".into()))?;
    }
    let uid = policy
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let reference = format!("ClusterPortSentryPolicy/{}", policy.name_any());
    let injected: Vec<Arc<Pod>> = context
        .pods
        .state()
        .into_iter()
        .filter(|pod| pod.annotations().get(inject::INJECTED_ANNOTATION) == Some(&reference))
        .collect();
    let sidecars = status::count_sensors(injected.iter().map(|pod| pod.as_ref()), &reference);
    let pods: Vec<ObjectMeta> = injected.iter().map(|pod| pod.metadata.clone()).collect();
    let report_ca_pem = context.nodes.report_ca_pem.borrow().clone();
    let wanted = inject::cluster_sensor_config_maps(policy, &pods, report_ca_pem.as_deref());
    let client = &context.client;
    for config_map in &wanted {
        let namespace = config_map.namespace().unwrap_or_default();
        let name = config_map.name_any();
        Api::<ConfigMap>::namespaced(client.clone(), &namespace)
            .patch(&name, &field_manager(), &Patch::Apply(config_map))
            .instrument(info_span!("apply", config_map = %format!("{namespace}/{name}")))
            .await?;
    }
    let existing: Vec<ObjectMeta> = Api::<ConfigMap>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&sidecar_config_selector()))
        .await?
        .items
        .into_iter()
        .map(|object| object.metadata)
        .collect();
    for (namespace, name) in inject::stale_config_maps_by_namespace(&uid, &wanted, &existing) {
        let listed = existing.iter().find(|m| {
            m.namespace.as_deref() == Some(namespace.as_str()) && m.name.as_deref() == Some(&name)
        });
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: listed.and_then(|m| m.resource_version.clone()),
                uid: listed.and_then(|m| m.uid.clone()),
            }),
            ..DeleteParams::default()
        };
        match Api::<ConfigMap>::namespaced(client.clone(), &namespace)
            .delete(&name, &params)
            .await
        {
            Ok(_) => {
                info!(config_map = %format!("{namespace}/{name}"), "stale sensor ConfigMap deleted")
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(sidecars)
}

/// Deletes expired bans, only if unchanged since read (an extension in between wins).
async fn delete_expired(api: &Api<PortSentryBan>, expired: &[PortSentryBan]) -> usize {
    let mut removed = 0;
    for ban in expired {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: ban.resource_version(),
                uid: ban.uid(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&ban.name_any(), &params).await {
            Ok(_) => removed += 1,
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => warn!(ban = %ban.name_any(), %error, "could not delete expired ban"),
        }
    }
    removed
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
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::{api::apps::v1::DaemonSetStatus, apimachinery::pkg::apis::meta::v1::Time};
    use portsentry_crds::{ClusterPortSentryPolicySpec, PolicyRules};

    use super::*;

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
            sidecars: status::SensorCount::default(),
            now: at(T0),
        })
    }

    fn condition<'a>(plan: &'a Plan, type_: &str) -> &'a Value {
        plan.status["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
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
        assert_eq!(enforced["status"], "True");
        assert_eq!(enforced["reason"], NODE_NFTABLES);
        assert!(
            enforced["message"]
                .as_str()
                .unwrap()
                .contains("2 of 3 ready")
        );
        assert_eq!(plan.status["status"]["sensorsInjected"], 3);
        assert_eq!(plan.status["status"]["sensorsReady"], 2);
        assert_eq!(plan.status["status"]["observedGeneration"], 4);
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
            sidecars: status::SensorCount {
                injected: 4,
                ready: 1,
            },
            now: at(T0),
        });
        assert_eq!(plan.status["status"]["sensorsInjected"], 7);
        assert_eq!(plan.status["status"]["sensorsReady"], 3);
    }

    #[test]
    fn a_pod_reconciles_the_cluster_policy_it_was_injected_for() {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.annotations = Some(
            [(
                inject::INJECTED_ANNOTATION.to_owned(),
                "ClusterPortSentryPolicy/edge".to_owned(),
            )]
            .into(),
        );
        assert_eq!(pod_to_policy(&pod), Some(ObjectRef::new("edge")));
        pod.metadata.annotations = Some(
            [(
                inject::INJECTED_ANNOTATION.to_owned(),
                "PortSentryPolicy/web".to_owned(),
            )]
            .into(),
        );
        assert_eq!(pod_to_policy(&pod), None);
    }

    #[test]
    fn without_the_nftables_backend_bans_are_not_enforced() {
        let policy = policy(vec![Backend::NetworkPolicy], true);
        let plan = run(&policy, &[], None);
        assert!(!plan.enforced);
        let enforced = condition(&plan, status::ENFORCED);
        assert_eq!(enforced["status"], "False");
        assert!(
            enforced["message"]
                .as_str()
                .unwrap()
                .contains("NodeNftables")
        );
    }

    #[test]
    fn without_a_node_selector_bans_are_not_enforced() {
        let policy = policy(vec![Backend::NodeNftables], false);
        let plan = run(&policy, &[], None);
        assert!(!plan.enforced);
        assert!(
            condition(&plan, status::ENFORCED)["message"]
                .as_str()
                .unwrap()
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
        assert_eq!(plan.status["status"]["activeBans"], 1);
        assert_eq!(plan.requeue_after, Duration::from_secs(60));
    }

    #[test]
    fn the_ban_cap_condition_follows_the_policys_maximum() {
        let policy = policy(vec![Backend::NodeNftables], true);
        let bans = [
            ban("edge", "203.0.113.7", None),
            ban("edge", "203.0.113.8", None),
        ];
        let plan = run(&policy, &bans, None);
        assert_eq!(condition(&plan, status::BAN_CAP_REACHED)["status"], "True");
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
            sidecars: status::SensorCount::default(),
            now: at(T0),
        });
        assert!(!plan.enforced);
    }
}
