//! The PortSentryPolicy controller: reads bans and NetworkPolicies from watches, lists the
//! selected pods, asks the pure core (`plan`) what to do, then applies it and writes status.
//!
//! ```text
//!  PortSentryBan ──────┐                      ┌─ delete forgotten bans
//!  NetworkPolicy ──────┤                      ├─ apply / delete generated NetworkPolicies (SSA)
//!  Pod ────────────────┤                      ├─ policy status: Ready, Enforced, BanCapReached,
//!  Pod (injected: its ─┼─▶ reconcile(policy) ─┤  sensorsInjected/Ready
//!  sensor's readiness) │   widen::decide,     ├─ apply sensor ConfigMaps of injected pods (SSA)
//!  PortSentryPolicy ───┘   outranked_by,      ├─ ban status: Enforced
//!  (same namespace)        netpol::build      └─ requeue at the next ban expiry
//! ```

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Pod},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::{PartialObjectMeta, Selector},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{PolicyKind, PolicyStatus, PortSentryBan, PortSentryPolicy};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    enforce::{guards::ProtectedSet, netpol},
    inject, labels,
    metrics::Metrics,
    policy::{
        plan::{self, Observed},
        status::{self, StatusApply},
    },
    shared::Watches,
    watch::{WatchBackoff, metadata_event, pod_triggers, readiness_triggers},
};

/// Label value of this controller in metrics.
pub const CONTROLLER: &str = crate::metrics::CONTROLLERS[0];
/// Wait after a failed reconcile.
pub const RETRY: Duration = Duration::from_secs(5);
/// Ban status writes in flight at once.
const BAN_STATUS_CONCURRENCY: usize = 16;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Addresses never banned besides each policy's ignore list; kept current by watches.
    pub guards: ProtectedSet,
    /// The controller's cache of policies (precedence, forgetting deleted ones' metrics).
    pub policies: Store<PortSentryPolicy>,
    /// Every PortSentryBan, kept by a watch: no list call per reconcile.
    pub bans: Store<PortSentryBan>,
    /// The shared ban watch, to wait for `bans`' first list (any number of waiters).
    pub ban_watch: crate::shared::Shared<PortSentryBan>,
    /// The shared (trimmed) pod watch: which bans are of pod addresses, which pod quarantine
    /// would isolate.
    pub pod_watch: crate::shared::Shared<Pod>,
    /// Every NetworkPolicy, kept by the watch that re-evaluates policies when one changes:
    /// the never-widen check reads it without a list call per reconcile.
    pub network_policies: Store<NetworkPolicy>,
    /// Lets one reconcile at a time wait for the NetworkPolicy store's first list (its
    /// readiness future wakes only its latest waiter): before it, the store would read as
    /// "no NetworkPolicy selects these pods", the one reading that could widen access.
    pub network_policies_ready: tokio::sync::Mutex<()>,
    /// Alert hooks of expiries (bans' hooks are sent by the intake).
    pub hooks: Option<crate::hooks::Hooks>,
    /// PEM CA bundle of the report intake's certificate, rendered into sensor ConfigMaps.
    pub intake_ca: crate::tls::CaBundle,
    /// The pod nftables agent runs on the nodes: the `PodNftables` backend enforces.
    pub pod_nftables_agent: bool,
    /// Sidecars count hits per decoy port (`METRICS_PER_PORT="1"` in their ConfigMaps).
    pub metrics_per_port: bool,
    /// Which other policy layers the cluster serves (rediscovered every 30 s).
    pub policy_layers: Arc<tokio::sync::Mutex<crate::policy::layers::Served>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

fn field_manager() -> PatchParams {
    PatchParams::apply(labels::MANAGER).force()
}

fn policies_in_namespace(
    store: &Store<PortSentryPolicy>,
    namespace: Option<String>,
) -> Vec<ObjectRef<PortSentryPolicy>> {
    let Some(namespace) = namespace else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn ban_to_policy(ban: &PortSentryBan) -> Option<ObjectRef<PortSentryPolicy>> {
    match ban.spec.policy.kind {
        PolicyKind::PortSentryPolicy => {
            Some(ObjectRef::new(&ban.spec.policy.name).within(&ban.namespace()?))
        }
        PolicyKind::ClusterPortSentryPolicy => None,
    }
}

/// The namespaced policy a pod was injected for (its `portsentry.io/injected` annotation).
pub fn pod_to_policy(pod: &PartialObjectMeta<Pod>) -> Option<ObjectRef<PortSentryPolicy>> {
    let name = pod
        .annotations()
        .get(labels::INJECTED_ANNOTATION)?
        .strip_prefix("PortSentryPolicy/")?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// What the policy controller is told at start besides its client and watches.
#[derive(Debug)]
pub struct Settings {
    /// Alert hooks of expiries.
    pub hooks: Option<crate::hooks::Hooks>,
    /// PEM CA bundle of the report intake's certificate, rendered into sensor ConfigMaps.
    pub intake_ca: crate::tls::CaBundle,
    /// The pod nftables agent runs on the nodes: the `PodNftables` backend enforces.
    pub pod_nftables_agent: bool,
    /// Sidecars count hits per decoy port (`METRICS_PER_PORT="1"` in their ConfigMaps).
    pub metrics_per_port: bool,
}

/// Runs the controller until the process ends (signals are main's: it stops every task,
/// then releases the Lease).
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    guards: ProtectedSet,
    reporter: Reporter,
    settings: Settings,
    shared: Watches,
) {
    let Settings {
        hooks,
        intake_ca,
        pod_nftables_agent,
        metrics_per_port,
    } = settings;
    // Lists read from etcd (the default semantic), not the API server's watch cache: after
    // an API server restart a cached list can name a resourceVersion the watch then refuses
    // as expired, forever (seen in tests/tests/operator.rs).
    let controller = Controller::new(
        Api::<PortSentryPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    let (netpol_store, pod_store, rival_store) = (store.clone(), store.clone(), store.clone());
    // The shared ban watch: its store for the reconciles, its events for the triggers.
    let bans = shared.bans.store();
    let ban_events = shared.bans.subscribe().await.touched_objects();
    // Pods (of the shared, trimmed pod watch): arrivals and label changes change which pods
    // a policy selects, the departure of an injected pod may leave a skip-specific ConfigMap
    // unused; status churn (probes, restarts) never drives a reconcile (see `PodTriggers`).
    let pod_changes = pod_triggers(shared.pods.subscribe().await.map_ok(metadata_event));
    // A flip of an injected pod's sensor readiness reconciles only the policy it was
    // injected for, so `sensorsReady` follows the kubelet's probes.
    // NetworkPolicies: any change may make a policy's generated objects widen (or stop
    // widening) access, so each re-evaluates the policies of its namespace; the store is
    // what the reconcile's never-widen check reads.
    let (network_policies, netpol_writer) = reflector::store::<NetworkPolicy>();
    let netpol_events = watcher::watcher(
        Api::<NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(WatchBackoff::default())
    .modify(|np| np.managed_fields_mut().clear())
    .reflect(netpol_writer)
    .touched_objects();
    let readiness_changes = readiness_triggers(crate::shared::injected_events(
        shared.pods.subscribe().await,
    ));
    // Other policy layers: kinds rediscovered every 30 s, their objects watched; any change
    // re-evaluates every policy.
    let policy_layers: Arc<tokio::sync::Mutex<crate::policy::layers::Served>> = Arc::default();
    let layer_changes = crate::policy::layers::changes(client.clone(), policy_layers.clone());
    // A new intake CA bundle (a rotated --report-ca-file) re-renders every sensor ConfigMap.
    let ca_changes = crate::tls::ca_changes(intake_ca.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
        guards,
        policies: store,
        bans,
        ban_watch: shared.bans.clone(),
        pod_watch: shared.pods.clone(),
        network_policies,
        network_policies_ready: tokio::sync::Mutex::new(()),
        hooks,
        intake_ca,
        pod_nftables_agent,
        metrics_per_port,
        policy_layers,
    });
    // The generated NetworkPolicies need no `owns` watch of their own: the NetworkPolicy
    // watch above reconciles every policy of their namespace, their owner included.
    controller
        .trigger_backoff(WatchBackoff::default())
        .reconcile_all_on(ca_changes)
        .reconcile_all_on(layer_changes)
        .watches_stream(ban_events, |ban| ban_to_policy(&ban))
        .watches_stream(netpol_events, move |np| {
            policies_in_namespace(&netpol_store, np.namespace())
        })
        .watches(
            Api::<PortSentryPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |policy| policies_in_namespace(&rival_store, policy.namespace()),
        )
        .watches_stream(pod_changes, move |pod| {
            policies_in_namespace(&pod_store, pod.namespace())
        })
        .watches_stream(readiness_changes, |pod| pod_to_policy(&pod))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::debug!(%object, ?action, "reconciled"),
                Err(error) => warn!(%error, "policy controller"),
            }
        })
        .await;
}

async fn reconcile(policy: Arc<PortSentryPolicy>, context: Arc<Context>) -> Result<Action> {
    let key = format!(
        "{}/{}",
        policy.namespace().unwrap_or_default(),
        policy.name_any()
    );
    let started = Instant::now();
    let mut generated_current = false;
    let result = reconcile_policy(&policy, &context, &key, &mut generated_current)
        .instrument(info_span!("reconcile", policy = %key))
        .await;
    if let Err(error) = &result {
        let api = Api::<PortSentryPolicy>::namespaced(
            context.client.clone(),
            &policy.namespace().unwrap_or_default(),
        );
        let mut previous = policy.status.clone();
        // Only a withdrawal that went through changes what `Enforced` says; one that failed
        // (the API server away, say) is tried again with the retry.
        if !generated_current && let Some(withdrawn) = withdraw(&context, &policy, error).await {
            previous = status::withdrawn(
                previous.as_ref(),
                withdrawn,
                policy.metadata.generation,
                Timestamp::now(),
            )
            .or(previous);
        }
        report_failure(
            &api,
            &context.recorder,
            policy.as_ref(),
            previous.as_ref(),
            error,
        )
        .await;
    }
    context.metrics.reconciled(CONTROLLER, started.elapsed());
    forget_deleted_policies(&context);
    result
}

/// Tells the owner of `policy` that its reconcile failed: `Ready=False` with the error's
/// reason and message (the rest of its status as the last reconcile wrote it), and a Warning
/// Event when that changes what `Ready` said. Failing to say so is logged: the reconcile is
/// retried either way.
pub async fn report_failure<K>(
    api: &Api<K>,
    recorder: &Recorder,
    policy: &K,
    previous: Option<&PolicyStatus>,
    error: &Error,
) where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let message = error.to_string();
    let failed = status::failed_status(
        previous,
        error.reason(),
        message.clone(),
        policy.meta().generation,
        Timestamp::now(),
    );
    let changed = failed
        .conditions
        .iter()
        .find(|c| c.type_ == status::READY)
        .is_some_and(|ready| {
            status::differs(
                previous
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default(),
                ready,
            )
        });
    let name = policy.meta().name.clone().unwrap_or_default();
    let apply = StatusApply::of::<K>(failed);
    if let Err(error) = api
        .patch_status(&name, &field_manager(), &Patch::Apply(&apply))
        .await
    {
        warn!(%error, "could not write Ready=False");
    }
    if changed {
        let event = Event {
            type_: EventType::Warning,
            reason: error.reason().to_owned(),
            note: Some(message.chars().take(MAX_EVENT_NOTE).collect()),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&event, &policy.object_ref(&())).await {
            warn!(%error, "could not publish event");
        }
    }
}

/// Deletes the NetworkPolicies generated for `policy` after a reconcile failed before
/// bringing them up to date: a generated allow-all-except policy is only safe while the
/// never-widen check that allowed it still holds, and a failing reconcile no longer checks
/// (a default-deny or another policy layer added meanwhile would be widened). Withdrawing
/// one never widens: the check let it exist only where no other NetworkPolicy can select
/// its pods, so without it they receive what they did before it. Returns how many went, or
/// `None` when some could not be listed or deleted (logged; the retry withdraws again).
async fn withdraw(context: &Context, policy: &PortSentryPolicy, error: &Error) -> Option<usize> {
    let namespace = policy.namespace()?;
    let uid = policy.uid()?;
    let api = Api::<NetworkPolicy>::namespaced(context.client.clone(), &namespace);
    let listed = match api
        .list_metadata(&ListParams::default().labels(&netpol::label_selector(&policy.name_any())))
        .await
    {
        Ok(listed) => listed.items,
        Err(list_error) => {
            warn!(%list_error, "could not list generated NetworkPolicies to withdraw");
            return None;
        }
    };
    let mut withdrawn = 0;
    let mut complete = true;
    for object in listed {
        let controlled = object
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.controller == Some(true) && r.uid == uid);
        if !controlled {
            continue;
        }
        let name = object.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => withdrawn += 1,
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(delete_error) => {
                warn!(%delete_error, network_policy = %name, "could not withdraw");
                complete = false;
            }
        }
    }
    if withdrawn > 0 {
        warn!(withdrawn, %error, "generated NetworkPolicies withdrawn: the reconcile failed");
        let note = format!(
            "{withdrawn} generated NetworkPolicies withdrawn until the policy reconciles again: {error}"
        );
        publish(
            context,
            policy,
            EventType::Warning,
            status::WITHDRAWN,
            note.chars().take(MAX_EVENT_NOTE).collect(),
        )
        .await;
    }
    complete.then_some(withdrawn)
}

/// Longest Event note the API server accepts (events.k8s.io/v1: 1 KiB).
const MAX_EVENT_NOTE: usize = 1024;

fn error_policy(policy: Arc<PortSentryPolicy>, error: &Error, context: Arc<Context>) -> Action {
    warn!(policy = %policy.name_any(), %error, "reconcile failed");
    context.metrics.reconcile_failed(CONTROLLER, error);
    Action::requeue(RETRY)
}

fn forget_deleted_policies(context: &Context) {
    let live: BTreeSet<String> = context
        .policies
        .state()
        .iter()
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    context.metrics.retain_policies(&live);
}

/// One pass of the pipeline: observe, plan (pure), apply, report.
///
/// `generated_current` becomes true once the generated NetworkPolicies are what this pass
/// planned: a failure after that leaves them in place.
async fn reconcile_policy(
    policy: &PortSentryPolicy,
    context: &Context,
    key: &str,
    generated_current: &mut bool,
) -> Result<Action> {
    let namespace = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let client = &context.client;
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), &namespace);
    let netpol_api = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace);

    // Observe. An empty ban store before its first list would read as "no bans".
    context
        .ban_watch
        .ready()
        .await
        .map_err(|_| Error::WatchStopped("PortSentryBan"))?;
    context
        .pod_watch
        .ready()
        .await
        .map_err(|_| Error::WatchStopped("Pod"))?;
    let selector = Selector::try_from(policy.spec.pod_selector.clone())
        .map_err(|e| Error::InvalidSelector(e.to_string()))?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels_from(&selector))
        .await?;
    // Injected pods were selected by the policy at admission, so the selected pods (a full
    // list: statuses included) cover its sensors, as they cover their ConfigMaps below; a
    // pod relabelled out of the selector stops counting.
    let sensors = status::count_sensors(
        &pods.items,
        &format!("PortSentryPolicy/{}", policy.name_any()),
    );
    {
        let _one_waiter = context.network_policies_ready.lock().await;
        context
            .network_policies
            .wait_until_ready()
            .await
            .map_err(|_| Error::WatchStopped("NetworkPolicy"))?;
    }
    let network_policies: Vec<NetworkPolicy> = context
        .network_policies
        .state()
        .iter()
        .filter(|np| np.namespace().as_deref() == Some(namespace.as_str()))
        .map(|np| NetworkPolicy::clone(np))
        .collect();
    let bans_now = context.bans.state();
    let name = policy.name_any();
    let guards = context
        .guards
        .for_bans(bans_now.iter().map(AsRef::as_ref).filter(|b| {
            b.namespace().as_deref() == Some(namespace.as_str())
                && b.spec.policy.kind == PolicyKind::PortSentryPolicy
                && b.spec.policy.name == name
        }))
        .await?;
    let pods_now = context.pod_watch.store().state();
    let policies_now = context.policies.state();

    // Other policy layers that may select the pods (none served: one discovery read each).
    let layer_objects =
        crate::policy::layers::observe(client, &context.policy_layers, &namespace).await?;
    let namespace_labels = if layer_objects.is_empty() {
        Default::default()
    } else {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .get(&namespace)
            .await?
            .labels()
            .clone()
    };
    // Plan.
    let plan = plan::plan(&Observed {
        policy,
        bans: &bans_now,
        network_policies: &network_policies,
        policies: &policies_now,
        guards: &guards,
        sensors,
        pod_nftables_agent: context.pod_nftables_agent,
        layers: &layer_objects,
        pods: &pods_now,
        namespace_labels: &namespace_labels,
        now: Timestamp::now(),
    })?;

    // Apply.
    let removed = delete_expired(&ban_api, &plan.expired).await.len();
    if removed > 0 {
        info!(removed, "expired bans no longer remembered removed");
    }
    let lifted = plan.lifted.len();
    if let Some(hooks) = &context.hooks
        && !policy.spec.rules.response.webhooks.is_empty()
    {
        for ban in &plan.lifted {
            let body = crate::hooks::payload(
                crate::hooks::Kind::Expiry,
                &namespace,
                &ban.name_any(),
                &ban.spec,
            );
            hooks.notify(&policy.spec.rules.response.webhooks, &body);
        }
    }
    if lifted > 0 {
        context.metrics.bans_expired(lifted);
        info!(lifted, "bans expired");
        let note = format!("{lifted} bans expired and were lifted");
        publish(context, policy, EventType::Normal, "BansExpired", note).await;
    }
    let started = Instant::now();
    for object in &plan.apply {
        let object_name = object.metadata.name.clone().unwrap_or_default();
        netpol_api
            .patch(&object_name, &field_manager(), &Patch::Apply(object))
            .await
            .map_err(Error::write(
                "NetworkPolicy",
                format!("{namespace}/{object_name}"),
            ))?;
    }
    for stale in &plan.delete {
        match netpol_api.delete(stale, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => {
                return Err(Error::write(
                    "NetworkPolicy",
                    format!("{namespace}/{stale}"),
                )(error));
            }
        }
    }
    *generated_current = true;
    // The sensors' ConfigMaps: injected pods carry this policy's annotation and were
    // selected by it at admission, so the selected pods cover them. Each carries the intake's
    // CA bundle (`ca.crt`), which the sidecar's `--report-ca-file` reads.
    let config_map_api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let intake_ca = context.intake_ca.borrow().clone();
    let wanted_config_maps = inject::sensor_config_maps(
        &namespace,
        policy,
        &pods.items,
        inject::SidecarExtras {
            report_ca_pem: intake_ca.as_deref(),
            metrics_per_port: context.metrics_per_port,
        },
    );
    for config_map in &wanted_config_maps {
        let config_map_name = config_map.name_any();
        config_map_api
            .patch(
                &config_map_name,
                &field_manager(),
                &Patch::Apply(config_map),
            )
            .await
            .map_err(Error::write(
                "ConfigMap",
                format!("{namespace}/{config_map_name}"),
            ))?;
    }
    delete_stale_config_maps(&config_map_api, policy, &wanted_config_maps).await?;
    let wrote = !plan.apply.is_empty() || !plan.delete.is_empty();
    if context.metrics.enforcement_pending(key) {
        let name = policy.name_any();
        let seen: BTreeSet<String> = bans_now
            .iter()
            .filter(|b| {
                b.namespace().as_deref() == Some(namespace.as_str())
                    && b.spec.policy.kind == PolicyKind::PortSentryPolicy
                    && b.spec.policy.name == name
            })
            .map(|b| b.name_any())
            .collect();
        context
            .metrics
            .enforcement_written(key, |ban| seen.contains(ban), !plan.apply.is_empty());
    }
    if wrote {
        context.metrics.networkpolicies_written(started.elapsed());
        info!(
            took = ?started.elapsed(),
            applied = plan.apply.len(),
            deleted = plan.delete.len(),
            objects = plan.objects,
            prefixes = plan.prefixes,
            "generated NetworkPolicies updated"
        );
    }

    // Report.
    Api::<PortSentryPolicy>::namespaced(client.clone(), &namespace)
        .patch_status(
            &policy.name_any(),
            &field_manager(),
            &Patch::Apply(&plan.status),
        )
        .await
        .map_err(Error::write("PortSentryPolicy status", key))?;
    if let Some(enforced) = plan.enforced_changed {
        let (kind, reason) = if enforced {
            (EventType::Normal, "Enforced")
        } else {
            (EventType::Warning, "NotEnforced")
        };
        let note = plan
            .conditions
            .iter()
            .find(|c| c.type_ == status::ENFORCED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish(context, policy, kind, reason, note).await;
    }
    context
        .metrics
        .policy_state(key, plan.active_bans, plan.enforcement.is_safe());
    // One Event per refused ban, about the ban (events of one object and reason are
    // aggregated by the recorder, so one about the policy would show only the first).
    for (ban, why) in &plan.refused {
        context.metrics.ban_refused(*why);
        let event = Event {
            type_: EventType::Warning,
            reason: "BanRefused".to_owned(),
            note: Some(format!(
                "never enforced by PortSentryPolicy {}: its source is protected ({})",
                policy.name_any(),
                why.as_str()
            )),
            action: "Reconcile".to_owned(),
            secondary: Some(policy.object_ref(&())),
        };
        if let Err(error) = context.recorder.publish(&event, ban).await {
            warn!(%error, "could not publish event");
        }
    }
    write_ban_statuses(&ban_api, plan.ban_conditions).await?;
    // Namespace labels (which admin policies select by) are not watched: look again soon
    // where the cluster has other layers.
    let requeue_after = if crate::policy::layers::any_served(&context.policy_layers).await {
        plan.requeue_after.min(crate::policy::layers::REDISCOVER)
    } else {
        plan.requeue_after
    };
    Ok(Action::requeue(requeue_after))
}

/// Deletes the sensor ConfigMaps this policy controls but no longer renders (a skipped-decoy
/// set whose last pod is gone), each only if unchanged since listed.
async fn delete_stale_config_maps(
    api: &Api<ConfigMap>,
    policy: &PortSentryPolicy,
    wanted: &[ConfigMap],
) -> Result<()> {
    let uid = policy
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let existing: Vec<_> = api
        .list_metadata(&ListParams::default().labels(labels::SENSOR_CONFIG_SELECTOR))
        .await?
        .items
        .into_iter()
        .map(|object| object.metadata)
        .collect();
    for name in inject::stale_config_maps(&uid, wanted, &existing) {
        let listed = existing.iter().find(|m| m.name.as_deref() == Some(&name));
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: listed.and_then(|m| m.resource_version.clone()),
                uid: listed.and_then(|m| m.uid.clone()),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => info!(config_map = %name, "stale sensor ConfigMap deleted"),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => return Err(Error::write("ConfigMap", name)(error)),
        }
    }
    Ok(())
}

/// Deletes expired bans, only if unchanged since read (an extension in between wins).
async fn delete_expired(
    api: &Api<PortSentryBan>,
    expired: &[Arc<PortSentryBan>],
) -> Vec<Arc<PortSentryBan>> {
    let mut removed = Vec::new();
    for ban in expired {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: ban.resource_version(),
                uid: ban.uid(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&ban.name_any(), &params).await {
            Ok(_) => removed.push(ban.clone()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => warn!(ban = %ban.name_any(), %error, "could not delete expired ban"),
        }
    }
    removed
}

async fn write_ban_statuses(
    api: &Api<PortSentryBan>,
    writes: Vec<(String, Condition)>,
) -> Result<()> {
    stream::iter(writes)
        .map(|(name, condition)| async move {
            let apply = StatusApply::of::<PortSentryBan>(status::ban_status(condition));
            match api
                .patch_status(&name, &field_manager(), &Patch::Apply(&apply))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(error) => Err(Error::write("PortSentryBan status", name)(error)),
            }
        })
        .buffer_unordered(BAN_STATUS_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn publish(
    context: &Context,
    policy: &PortSentryPolicy,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = context
        .recorder
        .publish(&event, &policy.object_ref(&()))
        .await
    {
        warn!(%error, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn injected_for(policy: &str) -> PartialObjectMeta<Pod> {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.namespace = Some("shop".into());
        pod.metadata.annotations = Some(BTreeMap::from([(
            labels::INJECTED_ANNOTATION.to_owned(),
            policy.to_owned(),
        )]));
        pod
    }

    #[test]
    fn a_pod_reconciles_the_namespaced_policy_it_was_injected_for() {
        let pod = injected_for("PortSentryPolicy/web");
        assert_eq!(
            pod_to_policy(&pod),
            Some(ObjectRef::new("web").within("shop"))
        );
        let cluster = injected_for("ClusterPortSentryPolicy/web");
        assert_eq!(pod_to_policy(&cluster), None);
    }
}
