//! The PortSentryPolicy controller: lists the policy's bans, pods and the namespace's
//! NetworkPolicies, asks the pure core what to do, then applies it and writes status.
//!
//! ```text
//!  PortSentryBan ──────┐                      ┌─ delete expired bans
//!  NetworkPolicy ──────┤                      ├─ apply / delete generated NetworkPolicies (SSA)
//!  Pod ────────────────┼─▶ reconcile(policy) ─┼─ policy status: Ready, Enforced, BanCapReached
//!  PortSentryPolicy ───┘   widen::decide,     ├─ ban status: Enforced
//!  (same namespace)        outranked_by,      └─ requeue at the next ban expiry
//!                          netpol::build
//! ```

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::Selector,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{Backend, PolicyKind, PortSentryBan, PortSentryPolicy};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    bans::{self, Guards},
    metrics::Metrics,
    netpol,
    prefixes::BannedPrefixes,
    status::{self, BanEnforcement, Enforcement},
    widen,
};

/// Label value of this controller in metrics.
pub const CONTROLLER: &str = "policy";
/// Longest wait between two reconciles of one policy when nothing changes.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Wait after a failed reconcile.
pub const RETRY: Duration = Duration::from_secs(5);
/// Ban status writes in flight at once.
const BAN_STATUS_CONCURRENCY: usize = 16;

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
) {
    let controller = Controller::new(
        Api::<PortSentryPolicy>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    let (netpol_store, pod_store, rival_store) = (store.clone(), store.clone(), store.clone());
    let (bans, ban_writer) = reflector::store::<PortSentryBan>();
    let ban_events = watcher::watcher(
        Api::<PortSentryBan>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|ban| ban.managed_fields_mut().clear())
    .reflect(ban_writer)
    .touched_objects();
    let context = Arc::new(Context {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
        guards,
        policies: store,
        bans,
        bans_ready: tokio::sync::Mutex::new(()),
    });
    let managed = format!("{}={}", netpol::MANAGED_BY_LABEL, netpol::MANAGER);
    controller
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
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            move |pod| policies_in_namespace(&pod_store, pod.namespace()),
        )
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

/// One pass of the pipeline: observe, decide (pure), apply, report.
async fn reconcile_policy(
    policy: &PortSentryPolicy,
    context: &Context,
    key: &str,
) -> Result<Action> {
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
    let client = &context.client;
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), &namespace);
    let netpol_api = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace);
    let pod_api = Api::<Pod>::namespaced(client.clone(), &namespace);
    let now = Timestamp::now();

    // Observe.
    // An empty store before the first list would read as "no bans" and lift them all.
    {
        let _one_waiter = context.bans_ready.lock().await;
        context
            .bans
            .wait_until_ready()
            .await
            .map_err(|_| Error::Config("the ban watch stopped".into()))?;
    }
    let ours = |ban: &Arc<PortSentryBan>| {
        ban.namespace().as_deref() == Some(namespace.as_str())
            && ban.spec.policy.kind == PolicyKind::PortSentryPolicy
            && ban.spec.policy.name == name
    };
    let (active, expired): (Vec<Arc<PortSentryBan>>, Vec<Arc<PortSentryBan>>) = context
        .bans
        .state()
        .into_iter()
        .filter(ours)
        .partition(|ban| bans::is_active(&ban.spec, now));
    let selector = Selector::try_from(policy.spec.pod_selector.clone())
        .map_err(|e| Error::InvalidSelector(e.to_string()))?;
    let pods = pod_api
        .list(&ListParams::default().labels_from(&selector))
        .await?;
    let pod_labels: Vec<_> = pods.items.iter().map(|p| p.labels().clone()).collect();
    let network_policies = netpol_api.list(&ListParams::default()).await?;

    // Expire.
    let removed = delete_expired(&ban_api, &expired).await;
    context.metrics.bans_expired(removed);
    if removed > 0 {
        info!(removed, "expired bans removed");
        publish(
            context,
            policy,
            EventType::Normal,
            "BansExpired",
            format!("{removed} bans expired and were removed"),
        )
        .await;
    }

    // Decide.
    let guards = context
        .guards
        .read()
        .map(|g| g.clone())
        .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    let ignore = &policy.spec.rules.detection.ignore;
    let protection: Vec<Option<bans::Protection>> = active
        .iter()
        .map(|ban| guards.protected(&ban.spec.source, ignore))
        .collect();
    let enforceable = active
        .iter()
        .zip(&protection)
        .filter(|(_, p)| p.is_none())
        .map(|(ban, _)| &ban.spec.source);
    let banned = BannedPrefixes::aggregate(enforceable);
    let uses_netpol = policy
        .spec
        .rules
        .enforcement
        .backends
        .contains(&Backend::NetworkPolicy);
    let decision = widen::decide(&uid, &pod_labels, &network_policies.items);
    let neighbours: Vec<Arc<PortSentryPolicy>> = context
        .policies
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    let rivals: Vec<widen::Rival<'_>> = neighbours.iter().map(|p| rival(p)).collect();
    let outranked_by = widen::outranked_by(&rival(policy), &rivals, &pod_labels);
    let limit = policy.spec.rules.enforcement.max_prefixes_per_object as usize;
    let target = netpol::Target {
        namespace: &namespace,
        policy_name: &name,
        pod_selector: &policy.spec.pod_selector,
        owner,
    };
    let desired = match (&decision, uses_netpol && outranked_by.is_empty()) {
        (widen::Decision::Enforce, true) => netpol::build(&target, &banned, limit),
        _ => Vec::new(),
    };
    let enforcement = match decision {
        _ if !uses_netpol => Enforcement::NoBackend,
        _ if !outranked_by.is_empty() => Enforcement::Yielded { to: outranked_by },
        widen::Decision::Refuse { existing } => Enforcement::Refused { existing },
        widen::Decision::Enforce if desired.is_empty() => Enforcement::NothingToEnforce,
        widen::Decision::Enforce => Enforcement::Applied {
            objects: desired.len(),
            prefixes: banned.len(),
        },
    };

    // Apply.
    let started = Instant::now();
    for object in &desired {
        let object_name = object.metadata.name.clone().unwrap_or_default();
        let stored = network_policies
            .items
            .iter()
            .find(|np| np.metadata.name.as_deref() == Some(object_name.as_str()));
        if stored.is_some_and(|stored| netpol::up_to_date(stored, object)) {
            continue;
        }
        netpol_api
            .patch(&object_name, &field_manager(), &Patch::Apply(object))
            .await?;
    }
    let keep: BTreeSet<String> = desired
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    for stale in network_policies
        .items
        .iter()
        .filter(|np| netpol::is_controlled_by(np, &uid))
        .filter_map(|np| np.metadata.name.clone())
        .filter(|n| !keep.contains(n))
    {
        match netpol_api.delete(&stale, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    context.metrics.networkpolicies_written(started.elapsed());

    // Report.
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
        policy.spec.rules.response.max_active_bans,
        generation,
        now,
    );
    let patch = status::policy_status_patch(
        &PortSentryPolicy::api_version(&()),
        &PortSentryPolicy::kind(&()),
        &conditions,
        active.len(),
        generation,
    );
    Api::<PortSentryPolicy>::namespaced(client.clone(), &namespace)
        .patch_status(&name, &field_manager(), &Patch::Apply(&patch))
        .await?;
    if was_enforced != Some(enforcement.is_safe()) {
        let (kind, reason) = if enforcement.is_safe() {
            (EventType::Normal, "Enforced")
        } else {
            (EventType::Warning, "NotEnforced")
        };
        let note = conditions
            .iter()
            .find(|c| c.type_ == status::ENFORCED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        publish(context, policy, kind, reason, note).await;
    }
    context
        .metrics
        .policy_state(key, active.len(), enforcement.is_safe());
    write_ban_statuses(&ban_api, &active, &protection, enforcement.is_safe(), now).await?;

    let next = active
        .iter()
        .filter_map(|ban| bans::requeue_after(now, &ban.spec))
        .min()
        .map_or(RESYNC, |d| d.min(RESYNC));
    Ok(Action::requeue(next))
}

fn rival(policy: &PortSentryPolicy) -> widen::Rival<'_> {
    widen::Rival {
        name: policy.metadata.name.as_deref().unwrap_or_default(),
        created: policy.metadata.creation_timestamp.as_ref().map(|t| t.0),
        pod_selector: &policy.spec.pod_selector,
    }
}

/// Deletes expired bans, only if unchanged since read (an extension in between wins).
async fn delete_expired(api: &Api<PortSentryBan>, expired: &[Arc<PortSentryBan>]) -> usize {
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

async fn write_ban_statuses(
    api: &Api<PortSentryBan>,
    active: &[Arc<PortSentryBan>],
    protection: &[Option<bans::Protection>],
    policy_enforced: bool,
    now: Timestamp,
) -> Result<()> {
    let mut writes: Vec<(
        String,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition,
    )> = Vec::new();
    for (ban, protected) in active.iter().zip(protection) {
        let state = match protected {
            Some(why) => BanEnforcement::Protected(*why),
            None if policy_enforced => BanEnforcement::Enforced,
            None => BanEnforcement::PolicyNotEnforced,
        };
        let previous = ban
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let desired = status::ban_condition(&previous, state, now);
        if status::differs(&previous, &desired) {
            writes.push((ban.name_any(), desired));
        }
    }
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
