//! The PortSentryPolicy controller: reads bans from a watch, lists pods and NetworkPolicies,
//! asks the pure core (`plan`) what to do, then applies it and writes status.
//!
//! ```text
//!  PortSentryBan ──────┐                      ┌─ delete expired bans
//!  NetworkPolicy ──────┤                      ├─ apply / delete generated NetworkPolicies (SSA)
//!  Pod ────────────────┼─▶ reconcile(policy) ─┼─ policy status: Ready, Enforced, BanCapReached
//!  PortSentryPolicy ───┘   widen::decide,     ├─ apply sensor ConfigMaps of injected pods (SSA)
//!  (same namespace)        outranked_by,      ├─ ban status: Enforced
//!                          netpol::build      └─ requeue at the next ban expiry
//! ```

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::{PartialObjectMeta, Selector},
    runtime::{
        Controller, PredicateConfig, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        predicates,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{PolicyKind, PortSentryBan, PortSentryPolicy};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    bans::Guards,
    inject,
    metrics::Metrics,
    netpol,
    plan::{self, Observed},
    status,
};

/// Label value of this controller in metrics.
pub const CONTROLLER: &str = "policy";
/// Wait after a failed reconcile.
pub const RETRY: Duration = Duration::from_secs(5);
/// Ban status writes in flight at once.
const BAN_STATUS_CONCURRENCY: usize = 16;

/// Backoff of every watch: 250 ms doubling to at most 4 s. The default's 30 s ceiling,
/// reached during a short API server outage, would leave a watch asleep for half a minute
/// after the API server is back (measured in tests/tests/operator.rs).
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    pub const FIRST: Duration = Duration::from_millis(250);
    pub const MAX: Duration = Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Addresses never banned besides each policy's ignore list; refreshed in the background.
    pub guards: Arc<RwLock<Guards>>,
    /// The controller's cache of policies (precedence, forgetting deleted ones' metrics).
    pub policies: Store<PortSentryPolicy>,
    /// Every PortSentryBan, kept by a watch: no list call per reconcile.
    pub bans: Store<PortSentryBan>,
    /// Lets one reconcile at a time wait for the ban store's first list: the store's
    /// readiness future wakes only its latest waiter, so concurrent waiters would hang.
    pub bans_ready: tokio::sync::Mutex<()>,
    /// Alert hooks of expiries (bans' hooks are sent by the intake).
    pub hooks: Option<crate::hooks::Hooks>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

fn field_manager() -> PatchParams {
    PatchParams::apply(netpol::MANAGER).force()
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

/// Runs the controller until a termination signal.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    guards: Arc<RwLock<Guards>>,
    reporter: Reporter,
    hooks: Option<crate::hooks::Hooks>,
) {
    // Lists read from etcd (the default semantic), not the API server's watch cache: after
    // an API server restart a cached list can name a resourceVersion the watch then refuses
    // as expired, forever (seen in tests/tests/operator.rs).
    let controller = Controller::new(
        Api::<PortSentryPolicy>::all(client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    let (netpol_store, pod_store, rival_store) = (store.clone(), store.clone(), store.clone());
    let (bans, ban_writer) = reflector::store::<PortSentryBan>();
    let ban_events = watcher::watcher(
        Api::<PortSentryBan>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(WatchBackoff::default())
    .modify(|ban| ban.managed_fields_mut().clear())
    .reflect(ban_writer)
    .touched_objects();
    // Only label changes of pods can change which pods a policy selects: status churn of
    // pods (probes, restarts) must not drive reconciles. Metadata is enough for labels.
    let pod_label_changes = watcher::watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(WatchBackoff::default())
    .touched_objects()
    .predicate_filter(predicates::labels, PredicateConfig::default());
    let context = Arc::new(Context {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
        guards,
        policies: store,
        bans,
        bans_ready: tokio::sync::Mutex::new(()),
        hooks,
    });
    let managed = format!("{}={}", netpol::MANAGED_BY_LABEL, netpol::MANAGER);
    controller
        .trigger_backoff(WatchBackoff::default())
        .owns(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default().labels(&managed),
        )
        .watches_stream(ban_events, |ban| ban_to_policy(&ban))
        .watches(
            Api::<NetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |np| policies_in_namespace(&netpol_store, np.namespace()),
        )
        .watches(
            Api::<PortSentryPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |policy| policies_in_namespace(&rival_store, policy.namespace()),
        )
        .watches_stream(pod_label_changes, move |pod| {
            policies_in_namespace(&pod_store, pod.namespace())
        })
        .shutdown_on_signal()
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
    let result = reconcile_policy(&policy, &context, &key)
        .instrument(info_span!("reconcile", policy = %key))
        .await;
    context.metrics.reconciled(CONTROLLER, started.elapsed());
    forget_deleted_policies(&context);
    result
}

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
async fn reconcile_policy(
    policy: &PortSentryPolicy,
    context: &Context,
    key: &str,
) -> Result<Action> {
    let namespace = policy
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let client = &context.client;
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), &namespace);
    let netpol_api = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace);

    // Observe. An empty ban store before its first list would read as "no bans".
    {
        let _one_waiter = context.bans_ready.lock().await;
        context
            .bans
            .wait_until_ready()
            .await
            .map_err(|_| Error::Config("the ban watch stopped".into()))?;
    }
    let selector = Selector::try_from(policy.spec.pod_selector.clone())
        .map_err(|e| Error::InvalidSelector(e.to_string()))?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels_from(&selector))
        .await?;
    let selected_pods: Vec<_> = pods.items.iter().map(|p| p.labels().clone()).collect();
    let network_policies = netpol_api.list(&ListParams::default()).await?.items;
    let guards = context
        .guards
        .read()
        .map(|g| g.clone())
        .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    let bans_now = context.bans.state();
    let policies_now = context.policies.state();

    // Plan.
    let plan = plan::plan(&Observed {
        policy,
        bans: &bans_now,
        selected_pods: &selected_pods,
        network_policies: &network_policies,
        policies: &policies_now,
        guards: &guards,
        now: Timestamp::now(),
    })?;

    // Apply.
    let removed_bans = delete_expired(&ban_api, &plan.expired).await;
    let removed = removed_bans.len();
    if let Some(hooks) = &context.hooks
        && !policy.spec.rules.response.webhooks.is_empty()
    {
        for ban in &removed_bans {
            let body = crate::hooks::payload(
                crate::hooks::Kind::Expiry,
                &namespace,
                &ban.name_any(),
                &ban.spec,
            );
            hooks.notify(&policy.spec.rules.response.webhooks, &body);
        }
    }
    if removed > 0 {
        context.metrics.bans_expired(removed);
        info!(removed, "expired bans removed");
        let note = format!("{removed} bans expired and were removed");
        publish(context, policy, EventType::Normal, "BansExpired", note).await;
    }
    let started = Instant::now();
    for object in &plan.apply {
        let object_name = object.metadata.name.clone().unwrap_or_default();
        netpol_api
            .patch(&object_name, &field_manager(), &Patch::Apply(object))
            .await?;
    }
    for stale in &plan.delete {
        match netpol_api.delete(stale, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    // The sensors' ConfigMaps: injected pods carry this policy's annotation and were
    // selected by it at admission, so the selected pods cover them. No intake CA is shared
    // with the controller (the intake serves its own certificate), so none is written.
    let config_map_api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    for config_map in inject::sensor_config_maps(&namespace, policy, &pods.items, None) {
        let config_map_name = config_map.name_any();
        config_map_api
            .patch(
                &config_map_name,
                &field_manager(),
                &Patch::Apply(&config_map),
            )
            .await?;
    }
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
        .await?;
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
    write_ban_statuses(&ban_api, plan.ban_conditions).await?;
    Ok(Action::requeue(plan.requeue_after))
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
            let patch = serde_json::json!({
                "apiVersion": PortSentryBan::api_version(&()),
                "kind": PortSentryBan::kind(&()),
                "status": {"conditions": [condition]},
            });
            match api
                .patch_status(&name, &field_manager(), &Patch::Apply(&patch))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                Err(error) => Err(Error::from(error)),
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

/// Parses every address in `texts`, skipping what is not an address.
fn addresses<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().filter_map(|t| t.parse().ok()).collect()
}

/// Reads node and API server addresses from the cluster.
pub async fn discover_guards(client: &Client, operator_addrs: &[IpAddr]) -> Result<Guards> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let node_addrs = addresses(
        nodes
            .items
            .iter()
            .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
            .flatten()
            .map(|a| a.address.as_str()),
    );
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?;
    let mut apiserver_addrs = addresses(
        service
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ips.as_ref())
            .flatten()
            .map(String::as_str),
    );
    apiserver_addrs.extend(addresses(
        slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .map(String::as_str),
    ));
    Ok(Guards {
        node_addrs,
        apiserver_addrs,
        operator_addrs: operator_addrs.to_vec(),
    })
}

/// Keeps `guards` current: nodes come and go, the API server may move.
pub async fn refresh_guards(
    client: Client,
    guards: Arc<RwLock<Guards>>,
    operator_addrs: Vec<IpAddr>,
    every: Duration,
) {
    loop {
        match discover_guards(&client, &operator_addrs).await {
            Ok(fresh) => {
                if let Ok(mut current) = guards.write() {
                    *current = fresh;
                }
            }
            Err(error) => warn!(%error, "could not refresh protected addresses"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::utils::Backoff;

    #[test]
    fn watch_backoff_doubles_to_a_low_ceiling_and_resets() {
        let mut backoff = WatchBackoff::default();
        let waits: Vec<Duration> = backoff.by_ref().take(6).collect();
        assert_eq!(waits[0], WatchBackoff::FIRST);
        assert_eq!(waits[1], WatchBackoff::FIRST * 2);
        assert_eq!(waits[5], WatchBackoff::MAX);
        backoff.reset();
        assert_eq!(backoff.next(), Some(WatchBackoff::FIRST));
    }
}
