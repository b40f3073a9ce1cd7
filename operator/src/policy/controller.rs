//! The PortSentryPolicy controller: reads bans and NetworkPolicies from watches, lists the
//! selected pods, asks the pure core (`plan`) what to do, then applies it and writes status.
//!
//! ```text
//!  PortSentryBan ──────┐                      ┌─ delete expired bans
//!  NetworkPolicy ──────┤                      ├─ apply / delete generated NetworkPolicies (SSA)
//!  Pod ────────────────┤                      ├─ policy status: Ready, Enforced, BanCapReached,
//!  Pod (injected: its ─┼─▶ reconcile(policy) ─┤  sensorsInjected/Ready
//!  sensor's readiness) │   widen::decide,     ├─ apply sensor ConfigMaps of injected pods (SSA)
//!  PortSentryPolicy ───┘   outranked_by,      ├─ ban status: Enforced
//!  (same namespace)        netpol::build      └─ requeue at the next ban expiry
//! ```

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
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
use portsentry_crds::{PolicyKind, PortSentryBan, PortSentryPolicy};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    bans::Guards,
    cluster, inject,
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
    /// Every NetworkPolicy, kept by the watch that re-evaluates policies when one changes:
    /// the never-widen check reads it without a list call per reconcile.
    pub network_policies: Store<NetworkPolicy>,
    /// As `bans_ready`, for the NetworkPolicy store: before its first list it would read as
    /// "no NetworkPolicy selects these pods", the one reading that could widen access.
    pub network_policies_ready: tokio::sync::Mutex<()>,
    /// Alert hooks of expiries (bans' hooks are sent by the intake).
    pub hooks: Option<crate::hooks::Hooks>,
    /// PEM CA bundle of the report intake's certificate, rendered into sensor ConfigMaps.
    pub intake_ca: crate::intake_tls::CaBundle,
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

/// Which events of a pod watch (metadata) should reconcile the pod's policy: a pod's arrival,
/// a change of its labels or of its sensor annotations, and the departure of a pod the webhook
/// injected (a ConfigMap only it used is stale now), including pods deleted while the watch
/// was down, found missing from the relist. Status churn (probes, restarts, conditions) moves
/// nothing a policy reads from pods and never triggers.
#[derive(Debug, Default)]
pub struct PodTriggers {
    /// Every pod seen, by uid: its fingerprint and the metadata a trigger mapper reads
    /// (name, namespace, uid, the injected annotation).
    seen: HashMap<String, (u64, PartialObjectMeta<Pod>)>,
    relisted: Relist,
}

impl PodTriggers {
    /// The pods whose reconcile `event` calls for.
    pub fn on(
        &mut self,
        event: watcher::Event<PartialObjectMeta<Pod>>,
    ) -> Vec<PartialObjectMeta<Pod>> {
        match event {
            watcher::Event::Init => {
                self.relisted.begin();
                Vec::new()
            }
            watcher::Event::InitApply(pod) => {
                self.relisted.saw(pod.uid());
                self.applied(&pod)
            }
            watcher::Event::Apply(pod) => self.applied(&pod),
            watcher::Event::InitDone => {
                let gone = self.relisted.missing(&self.seen);
                gone.into_iter()
                    .filter_map(|uid| self.seen.remove(&uid))
                    .map(|(_, pod)| pod)
                    .filter(injected)
                    .collect()
            }
            watcher::Event::Delete(pod) => {
                let uid = pod.uid().unwrap_or_default();
                let pod = self
                    .seen
                    .remove(&uid)
                    .map_or_else(|| trimmed(&pod.metadata), |(_, known)| known);
                if injected(&pod) {
                    vec![pod]
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn applied(&mut self, pod: &PartialObjectMeta<Pod>) -> Vec<PartialObjectMeta<Pod>> {
        let fingerprint = fingerprint(pod);
        let uid = pod.uid().unwrap_or_default();
        let changed = self
            .seen
            .get(&uid)
            .is_none_or(|(known, _)| *known != fingerprint);
        if !changed {
            return Vec::new();
        }
        let pod = trimmed(&pod.metadata);
        self.seen.insert(uid, (fingerprint, pod.clone()));
        vec![pod]
    }
}

/// The uids listed since a watch's relist began: at its end, the known pods not listed were
/// deleted while the watch was down.
#[derive(Debug, Default)]
struct Relist(Option<HashSet<String>>);

impl Relist {
    fn begin(&mut self) {
        self.0 = Some(HashSet::new());
    }

    fn saw(&mut self, uid: Option<String>) {
        if let (Some(listed), Some(uid)) = (self.0.as_mut(), uid) {
            listed.insert(uid);
        }
    }

    /// Uids of `known` the relist did not list (none when no relist was under way).
    fn missing<V>(&mut self, known: &HashMap<String, V>) -> Vec<String> {
        let Some(listed) = self.0.take() else {
            return Vec::new();
        };
        known
            .keys()
            .filter(|uid| !listed.contains(*uid))
            .cloned()
            .collect()
    }
}

/// Hash of what a policy reads from a pod's metadata: labels and the sensor annotations.
fn fingerprint(pod: &PartialObjectMeta<Pod>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod.metadata.labels.hash(&mut hasher);
    for key in [
        inject::INJECTED_ANNOTATION,
        inject::CONFIG_MAP_ANNOTATION,
        inject::SKIPPED_ANNOTATION,
    ] {
        pod.annotations().get(key).hash(&mut hasher);
    }
    hasher.finish()
}

/// The part of a pod's metadata the trigger mappers read.
fn trimmed(pod: &ObjectMeta) -> PartialObjectMeta<Pod> {
    let injected = pod
        .annotations
        .as_ref()
        .and_then(|a| a.get(inject::INJECTED_ANNOTATION))
        .map(|value| BTreeMap::from([(inject::INJECTED_ANNOTATION.to_owned(), value.clone())]));
    let mut meta = PartialObjectMeta::<Pod>::default();
    *meta.meta_mut() = ObjectMeta {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        uid: pod.uid.clone(),
        annotations: injected,
        ..ObjectMeta::default()
    };
    meta
}

fn injected(pod: &PartialObjectMeta<Pod>) -> bool {
    pod.annotations().contains_key(inject::INJECTED_ANNOTATION)
}

/// Which events of a watch of injected pods (full pods: readiness is in their status) should
/// reconcile the pod's policy because its sensor's readiness flipped ([`status::sensor_ready`]):
/// a pod whose sensor became ready, or stopped being ready (unready, terminating, finished,
/// deleted, or missing from a relist). A pod not seen before counts as not ready, so one first
/// seen ready triggers (its arrival may have been counted before its probe passed) and one
/// first seen not ready leaves its arrival to [`PodTriggers`]. Probe and status churn that
/// leaves readiness as it was never triggers. Holds the pods whose sensor is ready, by uid.
#[derive(Debug, Default)]
pub struct ReadinessTriggers {
    /// Pods whose sensor was ready when last seen, by uid: what a trigger mapper reads.
    ready: HashMap<String, PartialObjectMeta<Pod>>,
    relisted: Relist,
}

impl ReadinessTriggers {
    /// The pods whose reconcile `event` calls for.
    pub fn on(&mut self, event: &watcher::Event<Pod>) -> Vec<PartialObjectMeta<Pod>> {
        match event {
            watcher::Event::Init => {
                self.relisted.begin();
                Vec::new()
            }
            watcher::Event::InitApply(pod) => {
                self.relisted.saw(pod.uid());
                self.applied(pod)
            }
            watcher::Event::Apply(pod) => self.applied(pod),
            watcher::Event::InitDone => {
                let gone = self.relisted.missing(&self.ready);
                gone.into_iter()
                    .filter_map(|uid| self.ready.remove(&uid))
                    .collect()
            }
            watcher::Event::Delete(pod) => self
                .ready
                .remove(&pod.uid().unwrap_or_default())
                .into_iter()
                .collect(),
        }
    }

    fn applied(&mut self, pod: &Pod) -> Vec<PartialObjectMeta<Pod>> {
        let uid = pod.uid().unwrap_or_default();
        let was = self.ready.contains_key(&uid);
        match (was, status::sensor_ready(pod)) {
            (false, true) => {
                let meta = trimmed(&pod.metadata);
                self.ready.insert(uid, meta.clone());
                vec![meta]
            }
            (true, false) => self.ready.remove(&uid).into_iter().collect(),
            _ => Vec::new(),
        }
    }
}

/// Both triggers of one watch of injected pods (full pods): [`PodTriggers`] on their metadata
/// (arrival, annotations, departure) and [`ReadinessTriggers`] on their sensor; a pod both
/// call for is passed on once.
#[derive(Debug, Default)]
pub struct InjectedPodTriggers {
    metadata: PodTriggers,
    readiness: ReadinessTriggers,
}

impl InjectedPodTriggers {
    /// The pods whose reconcile `event` calls for.
    pub fn on(&mut self, event: watcher::Event<Pod>) -> Vec<PartialObjectMeta<Pod>> {
        let mut fired = self.readiness.on(&event);
        for pod in self.metadata.on(metadata_event(event)) {
            if !fired.iter().any(|f| f.uid() == pod.uid()) {
                fired.push(pod);
            }
        }
        fired
    }
}

/// `event` with each pod reduced to its metadata.
fn metadata_event(event: watcher::Event<Pod>) -> watcher::Event<PartialObjectMeta<Pod>> {
    let meta = |pod: Pod| {
        let mut meta = PartialObjectMeta::<Pod>::default();
        *meta.meta_mut() = pod.metadata;
        meta
    };
    match event {
        watcher::Event::Apply(pod) => watcher::Event::Apply(meta(pod)),
        watcher::Event::Delete(pod) => watcher::Event::Delete(meta(pod)),
        watcher::Event::InitApply(pod) => watcher::Event::InitApply(meta(pod)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The namespaced policy a pod was injected for (its `portsentry.io/injected` annotation).
pub fn pod_to_policy(pod: &PartialObjectMeta<Pod>) -> Option<ObjectRef<PortSentryPolicy>> {
    let name = pod
        .annotations()
        .get(inject::INJECTED_ANNOTATION)?
        .strip_prefix("PortSentryPolicy/")?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// A watch of injected pods reduced to the pods whose sensor's readiness flipped
/// ([`ReadinessTriggers`]).
pub fn readiness_triggers(
    events: impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send + 'static {
    let mut triggers = ReadinessTriggers::default();
    events
        .backoff(WatchBackoff::default())
        .map_ok(move |event| stream::iter(triggers.on(&event).into_iter().map(Ok)))
        .try_flatten()
}

/// A watch of injected pods reduced to the pods whose reconcile it calls for
/// ([`InjectedPodTriggers`]).
pub fn injected_pod_triggers(
    events: impl Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send + 'static {
    let mut triggers = InjectedPodTriggers::default();
    events
        .backoff(WatchBackoff::default())
        .map_ok(move |event| stream::iter(triggers.on(event).into_iter().map(Ok)))
        .try_flatten()
}

/// A metadata watch of pods reduced to the pods whose reconcile it calls for ([`PodTriggers`]).
pub fn pod_triggers(
    events: impl Stream<Item = Result<watcher::Event<PartialObjectMeta<Pod>>, watcher::Error>>
    + Send
    + 'static,
) -> impl Stream<Item = Result<PartialObjectMeta<Pod>, watcher::Error>> + Send + 'static {
    let mut triggers = PodTriggers::default();
    events
        .backoff(WatchBackoff::default())
        .map_ok(move |event| stream::iter(triggers.on(event).into_iter().map(Ok)))
        .try_flatten()
}

/// Runs the controller until a termination signal.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    guards: Arc<RwLock<Guards>>,
    reporter: Reporter,
    hooks: Option<crate::hooks::Hooks>,
    intake_ca: crate::intake_tls::CaBundle,
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
    // Pods (metadata only): arrivals and label changes change which pods a policy selects,
    // the departure of an injected pod may leave a skip-specific ConfigMap unused; status
    // churn (probes, restarts) never drives a reconcile (see `PodTriggers`).
    let pod_changes = pod_triggers(watcher::watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default(),
    ));
    // Injected pods (full: readiness is status), a flip of a sensor's readiness reconciling
    // only the policy it was injected for, so `sensorsReady` follows the kubelet's probes.
    // A second, label-bounded watch rather than the all-pods watch widened to full pods: only
    // injected pods' status is read, and nothing is stored but one entry per ready sensor.
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
    let readiness_changes = readiness_triggers(
        watcher::watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(cluster::INJECTED_PODS),
        )
        .modify(status::sensor_view),
    );
    // A new intake CA bundle (a rotated --report-ca-file) re-renders every sensor ConfigMap.
    let ca_changes = crate::intake_tls::ca_changes(intake_ca.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        metrics,
        recorder: Recorder::new(client.clone(), reporter),
        guards,
        policies: store,
        bans,
        bans_ready: tokio::sync::Mutex::new(()),
        network_policies,
        network_policies_ready: tokio::sync::Mutex::new(()),
        hooks,
        intake_ca,
    });
    // The generated NetworkPolicies need no `owns` watch of their own: the NetworkPolicy
    // watch above reconciles every policy of their namespace, their owner included.
    controller
        .trigger_backoff(WatchBackoff::default())
        .reconcile_all_on(ca_changes)
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
            .map_err(|_| Error::Config("the NetworkPolicy watch stopped".into()))?;
    }
    let network_policies: Vec<NetworkPolicy> = context
        .network_policies
        .state()
        .iter()
        .filter(|np| np.namespace().as_deref() == Some(namespace.as_str()))
        .map(|np| NetworkPolicy::clone(np))
        .collect();
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
        sensors,
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
    // selected by it at admission, so the selected pods cover them. Each carries the intake's
    // CA bundle (`ca.crt`), which the sidecar's `--report-ca-file` reads.
    let config_map_api = Api::<ConfigMap>::namespaced(client.clone(), &namespace);
    let intake_ca = context.intake_ca.borrow().clone();
    let wanted_config_maps =
        inject::sensor_config_maps(&namespace, policy, &pods.items, intake_ca.as_deref());
    for config_map in &wanted_config_maps {
        let config_map_name = config_map.name_any();
        config_map_api
            .patch(
                &config_map_name,
                &field_manager(),
                &Patch::Apply(config_map),
            )
            .await?;
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
        .list_metadata(&ListParams::default().labels(inject::SENSOR_CONFIG_SELECTOR))
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
            Err(error) => return Err(error.into()),
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

    fn pod_meta(
        uid: &str,
        labels: &[(&str, &str)],
        injected: Option<&str>,
    ) -> PartialObjectMeta<Pod> {
        let mut pod = PartialObjectMeta::<Pod>::default();
        *pod.meta_mut() = ObjectMeta {
            name: Some(format!("pod-{uid}")),
            namespace: Some("shop".into()),
            uid: Some(uid.into()),
            resource_version: Some("1".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            annotations: injected.map(|policy| {
                BTreeMap::from([(inject::INJECTED_ANNOTATION.to_owned(), policy.to_owned())])
            }),
            ..ObjectMeta::default()
        };
        pod
    }

    fn names(pods: &[PartialObjectMeta<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn a_new_pod_triggers_and_status_churn_does_not() {
        let mut triggers = PodTriggers::default();
        let pod = pod_meta("a", &[("app", "web")], None);
        assert_eq!(
            names(&triggers.on(watcher::Event::Apply(pod.clone()))),
            ["pod-a"]
        );
        let mut churned = pod;
        churned.metadata.resource_version = Some("2".into());
        assert!(triggers.on(watcher::Event::Apply(churned)).is_empty());
    }

    #[test]
    fn a_label_change_triggers() {
        let mut triggers = PodTriggers::default();
        triggers.on(watcher::Event::Apply(pod_meta(
            "a",
            &[("app", "web")],
            None,
        )));
        let relabelled = pod_meta("a", &[("app", "api")], None);
        assert_eq!(
            names(&triggers.on(watcher::Event::Apply(relabelled))),
            ["pod-a"]
        );
    }

    #[test]
    fn deleting_an_injected_pod_triggers_with_its_policy_annotation() {
        let mut triggers = PodTriggers::default();
        let pod = pod_meta("a", &[], Some("ClusterPortSentryPolicy/edge"));
        triggers.on(watcher::Event::Apply(pod.clone()));
        let fired = triggers.on(watcher::Event::Delete(pod));
        assert_eq!(names(&fired), ["pod-a"]);
        assert_eq!(
            fired[0].annotations()[inject::INJECTED_ANNOTATION],
            "ClusterPortSentryPolicy/edge"
        );
    }

    #[test]
    fn deleting_a_pod_without_a_sensor_does_not_trigger() {
        let mut triggers = PodTriggers::default();
        let pod = pod_meta("a", &[("app", "web")], None);
        triggers.on(watcher::Event::Apply(pod.clone()));
        assert!(triggers.on(watcher::Event::Delete(pod)).is_empty());
    }

    #[test]
    fn an_injected_pod_missing_from_a_relist_triggers_as_deleted() {
        let mut triggers = PodTriggers::default();
        let kept = pod_meta("a", &[], Some("PortSentryPolicy/web"));
        let gone = pod_meta("b", &[], Some("PortSentryPolicy/web"));
        triggers.on(watcher::Event::Apply(kept.clone()));
        triggers.on(watcher::Event::Apply(gone));
        assert!(triggers.on(watcher::Event::Init).is_empty());
        assert!(triggers.on(watcher::Event::InitApply(kept)).is_empty());
        assert_eq!(names(&triggers.on(watcher::Event::InitDone)), ["pod-b"]);
    }

    /// An injected pod of `PortSentryPolicy/web` whose sidecar is `ready` (or has no status
    /// yet: `None`), at resourceVersion `version`.
    fn injected_pod(uid: &str, ready: Option<bool>, version: &str) -> Pod {
        let statuses: Vec<_> = ready
            .into_iter()
            .map(|ready| {
                serde_json::json!({
                    "name": inject::SIDECAR_NAME, "image": "sensor:1", "imageID": "",
                    "ready": ready, "restartCount": 0, "started": ready,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("pod-{uid}"), "namespace": "shop", "uid": uid,
                "resourceVersion": version,
                "annotations": {inject::INJECTED_ANNOTATION: "PortSentryPolicy/web"},
            },
            "status": {"phase": "Running", "initContainerStatuses": statuses},
        }))
        .unwrap()
    }

    #[test]
    fn a_sensor_becoming_ready_triggers_its_pod() {
        let mut triggers = ReadinessTriggers::default();
        triggers.on(&watcher::Event::Apply(injected_pod("a", Some(false), "1")));
        let fired = triggers.on(&watcher::Event::Apply(injected_pod("a", Some(true), "2")));
        assert_eq!(names(&fired), ["pod-a"]);
        assert_eq!(
            fired[0].annotations()[inject::INJECTED_ANNOTATION],
            "PortSentryPolicy/web"
        );
    }

    #[test]
    fn probe_churn_that_leaves_readiness_as_it_was_does_not_trigger() {
        let mut triggers = ReadinessTriggers::default();
        triggers.on(&watcher::Event::Apply(injected_pod("a", Some(true), "1")));
        let mut restarted = injected_pod("a", Some(true), "2");
        restarted
            .status
            .as_mut()
            .unwrap()
            .init_container_statuses
            .as_mut()
            .unwrap()[0]
            .restart_count = 1;
        assert!(triggers.on(&watcher::Event::Apply(restarted)).is_empty());
    }

    #[test]
    fn a_sensor_no_longer_ready_triggers_its_pod() {
        let mut triggers = ReadinessTriggers::default();
        triggers.on(&watcher::Event::Apply(injected_pod("a", Some(true), "1")));
        let fired = triggers.on(&watcher::Event::Apply(injected_pod("a", Some(false), "2")));
        assert_eq!(names(&fired), ["pod-a"]);
    }

    #[test]
    fn a_pod_first_seen_without_a_ready_sensor_does_not_trigger() {
        let mut triggers = ReadinessTriggers::default();
        assert!(
            triggers
                .on(&watcher::Event::Apply(injected_pod("a", None, "1")))
                .is_empty()
        );
    }

    #[test]
    fn a_pod_first_seen_with_a_ready_sensor_triggers() {
        let mut triggers = ReadinessTriggers::default();
        let fired = triggers.on(&watcher::Event::InitApply(injected_pod(
            "a",
            Some(true),
            "1",
        )));
        assert_eq!(names(&fired), ["pod-a"]);
    }

    #[test]
    fn deleting_a_pod_whose_sensor_was_ready_triggers() {
        let mut triggers = ReadinessTriggers::default();
        let pod = injected_pod("a", Some(true), "1");
        triggers.on(&watcher::Event::Apply(pod.clone()));
        assert_eq!(names(&triggers.on(&watcher::Event::Delete(pod))), ["pod-a"]);
    }

    #[test]
    fn a_ready_pod_missing_from_a_relist_triggers_as_no_longer_ready() {
        let mut triggers = ReadinessTriggers::default();
        let kept = injected_pod("a", Some(true), "1");
        triggers.on(&watcher::Event::Apply(kept.clone()));
        triggers.on(&watcher::Event::Apply(injected_pod("b", Some(true), "1")));
        assert!(triggers.on(&watcher::Event::Init).is_empty());
        assert!(triggers.on(&watcher::Event::InitApply(kept)).is_empty());
        assert_eq!(names(&triggers.on(&watcher::Event::InitDone)), ["pod-b"]);
    }

    #[test]
    fn a_pod_arriving_with_a_ready_sensor_triggers_once_on_the_injected_pod_watch() {
        let mut triggers = InjectedPodTriggers::default();
        let fired = triggers.on(watcher::Event::Apply(injected_pod("a", Some(true), "1")));
        assert_eq!(names(&fired), ["pod-a"]);
    }

    #[test]
    fn the_injected_pod_watch_triggers_on_a_readiness_flip_alone() {
        let mut triggers = InjectedPodTriggers::default();
        triggers.on(watcher::Event::Apply(injected_pod("a", Some(false), "1")));
        let fired = triggers.on(watcher::Event::Apply(injected_pod("a", Some(true), "2")));
        assert_eq!(names(&fired), ["pod-a"]);
    }

    #[test]
    fn a_pod_reconciles_the_namespaced_policy_it_was_injected_for() {
        let pod = pod_meta("a", &[], Some("PortSentryPolicy/web"));
        assert_eq!(
            pod_to_policy(&pod),
            Some(ObjectRef::new("web").within("shop"))
        );
        let cluster = pod_meta("a", &[], Some("ClusterPortSentryPolicy/web"));
        assert_eq!(pod_to_policy(&cluster), None);
    }
}
