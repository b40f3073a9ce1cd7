//! The pod agent's run loop (`portsentry-sensor pod-nftables`): watches, plan, tables,
//! metrics; on SIGTERM it removes its table from every pod before it exits.
//!
//! Level-triggered: every change seen by a watch, and at least every `resync`, recomputes the
//! plan and makes each pod's table equal to it, so a flushed or deleted table, or a pod whose
//! sandbox restarted (a new namespace), has its sets back within one resync.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use portsentry_crds::{ClusterPortSentryPolicy, PortSentryBan, PortSentryPolicy};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::{
    ban_watch,
    error::{Error, Result},
    metrics::{self, Metrics},
};

use super::{
    plan::{Inputs, Skip, enterable, plan},
    tables::Tables,
};

/// How the agent runs (the `pod-nftables` subcommand's flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace: cluster policies' bans live there; its pods are left alone.
    pub operator_namespace: String,
    /// This node's name: only its pods are watched (`spec.nodeName`).
    pub node_name: String,
    /// The table kept in each pod's namespace (family inet).
    pub table: String,
    /// Reconcile every pod at least this often, changes or not.
    pub resync: Duration,
    /// Most elements one pod's table holds.
    pub max_per_pod: usize,
    /// The host's /proc (the agent runs with hostPID).
    pub proc_root: PathBuf,
    /// Prefixes never banned, one a line (PortSentry's ignore-file format), re-read per pass.
    pub ignore_file: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here.
    pub metrics_addr: Option<SocketAddr>,
}

/// The agent's metrics (registered with the sensor's, prefix `portsentry_sensor_`).
#[derive(Clone, Debug)]
struct Counters {
    pods: IntGauge,
    elements: IntGauge,
    skipped: IntGaugeVec,
    opened: IntCounter,
    errors: IntCounterVec,
    reconciles: IntCounterVec,
}

impl Counters {
    fn register(metrics: &Metrics) -> Result<Self> {
        let pods = IntGauge::new(
            "pod_nft_pods",
            "Pods of this node whose own nftables table equals their bans.",
        )?;
        let elements = IntGauge::new(
            "pod_nft_elements",
            "Ban elements (addresses and prefixes) in the pods' tables, all pods together.",
        )?;
        let skipped = IntGaugeVec::new(
            Opts::new(
                "pod_nft_bans_refused",
                "Bans left out of some pod's table (counted per pod), by reason: protected \
                 (loopback, node, API server, ignored, the pod itself, or a prefix containing \
                 one) or over_cap (past --max-bans-per-pod).",
            ),
            &["reason"],
        )?;
        let opened = IntCounter::new(
            "pod_nft_tables_opened_total",
            "Tables opened in a pod network namespace new to the agent (new pods, restarted sandboxes).",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "pod_nft_errors_total",
                "Failed agent steps, by kind (watch: the API server, nftables: a pod's table).",
            ),
            &["kind"],
        )?;
        let reconciles = IntCounterVec::new(
            Opts::new(
                "pod_nft_reconciles_total",
                "Passes over every pod's table, by result.",
            ),
            &["result"],
        )?;
        for skip in Skip::ALL {
            skipped.with_label_values(&[skip.label()]).set(0);
        }
        for kind in ["watch", "nftables"] {
            errors.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            reconciles.with_label_values(&[result]);
        }
        for collector in [
            Box::new(pods.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(elements.clone()),
            Box::new(skipped.clone()),
            Box::new(opened.clone()),
            Box::new(errors.clone()),
            Box::new(reconciles.clone()),
        ] {
            metrics.register(collector)?;
        }
        Ok(Self {
            pods,
            elements,
            skipped,
            opened,
            errors,
            reconciles,
        })
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A reflector store of `api`, its watch events waking `changed`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    errors: &IntCounterVec,
) -> reflector::Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(drain(events, changed.clone(), errors.clone()));
    store
}

async fn drain<S, T>(events: S, changed: Arc<Notify>, errors: IntCounterVec)
where
    S: Stream<Item = std::result::Result<T, watcher::Error>>,
{
    events
        .for_each(|event| {
            if let Err(error) = event {
                errors.with_label_values(&["watch"]).inc();
                tracing::warn!(%error, "watch failed; retrying");
            }
            changed.notify_one();
            futures::future::ready(())
        })
        .await;
}

/// Runs the agent until SIGTERM or SIGINT, then removes every table it keeps.
pub async fn run(settings: Settings) -> Result<()> {
    let config = kube::Config::infer().await.map_err(|e| {
        Error::PodNftables(format!(
            "no Kubernetes API configuration ({e}); run in a pod with a service account, or set KUBECONFIG"
        ))
    })?;
    let apiserver = ban_watch::apiserver_address(&config);
    let client = Client::try_from(config)
        .map_err(|e| Error::PodNftables(format!("cannot build the API client: {e}")))?;
    let metrics = Arc::new(Metrics::new()?);
    let counters = Counters::register(&metrics)?;
    if let Some(addr) = settings.metrics_addr {
        metrics::serve(addr, metrics.clone()).await?;
    }
    let changed = Arc::new(Notify::new());
    let on_node =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let errors = &counters.errors;
    let pods = watch(Api::<Pod>::all(client.clone()), on_node, &changed, errors);
    let all = watcher::Config::default;
    let policies = watch(
        Api::<PortSentryPolicy>::all(client.clone()),
        all(),
        &changed,
        errors,
    );
    let cluster_policies = watch(
        Api::<ClusterPortSentryPolicy>::all(client.clone()),
        all(),
        &changed,
        errors,
    );
    let namespaces = watch(
        Api::<Namespace>::all(client.clone()),
        all(),
        &changed,
        errors,
    );
    let bans = watch(Api::<PortSentryBan>::all(client), all(), &changed, errors);
    // Empty stores before their first list would read as "nothing selected": every table
    // would be removed. Wait for all of them.
    let ready = async {
        pods.wait_until_ready().await?;
        policies.wait_until_ready().await?;
        cluster_policies.wait_until_ready().await?;
        namespaces.wait_until_ready().await?;
        bans.wait_until_ready().await
    };
    tokio::select! {
        result = ready => result.map_err(|e| Error::PodNftables(format!("a watch stopped before its first list: {e}")))?,
        () = crate::run::shutdown_signal() => return Ok(()),
    }
    tracing::info!(node = %settings.node_name, table = %settings.table, "pod nftables agent watching");
    let mut tables = Tables::new(&settings.table, settings.proc_root.clone());
    let mut swept = false;
    let mut last_errors = BTreeSet::new();
    let shutdown = crate::run::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let never = ban_watch::protected_now(settings.ignore_file.as_deref(), apiserver);
        let pod_list: Vec<Pod> = pods.state().iter().map(|p| (**p).clone()).collect();
        let policy_list: Vec<PortSentryPolicy> =
            policies.state().iter().map(|p| (**p).clone()).collect();
        let cluster_list: Vec<ClusterPortSentryPolicy> = cluster_policies
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect();
        let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
            .state()
            .iter()
            .filter_map(|ns| {
                Some((
                    ns.metadata.name.clone()?,
                    ns.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let ban_list: Vec<PortSentryBan> = bans.state().iter().map(|b| (**b).clone()).collect();
        let inputs = Inputs {
            pods: &pod_list,
            policies: &policy_list,
            cluster_policies: &cluster_list,
            namespaces: &namespace_labels,
            bans: &ban_list,
            operator_namespace: &settings.operator_namespace,
            never: &never,
            max_per_pod: settings.max_per_pod,
        };
        let want = plan(&inputs, Timestamp::now());
        for skip in Skip::ALL {
            let count = want.skipped.get(&skip).copied().unwrap_or(0);
            counters
                .skipped
                .with_label_values(&[skip.label()])
                .set(gauge(count));
        }
        if !swept {
            // Tables an earlier agent left in pods this one does not keep one for.
            let others: BTreeSet<&str> = enterable(&pod_list, &settings.operator_namespace)
                .filter(|uid| !want.pods.contains_key(*uid))
                .collect();
            let (entered, failed) = tokio::task::block_in_place(|| tables.sweep(&others));
            for (uid, error) in failed {
                tracing::warn!(pod = %uid, %error, "cannot remove a leftover table");
            }
            tracing::info!(
                pods = entered,
                "leftover tables removed from unselected pods"
            );
            swept = true;
        }
        let outcome = tokio::task::block_in_place(|| tables.apply(&want.pods));
        counters.pods.set(gauge(outcome.enforced));
        counters.elements.set(gauge(outcome.elements));
        counters
            .opened
            .inc_by(u64::try_from(outcome.opened).unwrap_or(0));
        if outcome.opened + outcome.removed > 0 {
            tracing::info!(
                opened = outcome.opened,
                removed = outcome.removed,
                pods = outcome.enforced,
                bans = outcome.elements,
                "pod tables changed"
            );
        }
        let result = if outcome.errors.is_empty() {
            "ok"
        } else {
            "error"
        };
        counters.reconciles.with_label_values(&[result]).inc();
        let now_errors: BTreeSet<(String, String)> = outcome.errors.into_iter().collect();
        for (pod, error) in now_errors.difference(&last_errors) {
            counters.errors.with_label_values(&["nftables"]).inc();
            tracing::error!(%pod, %error, "cannot make the pod's table equal its bans; retrying");
        }
        last_errors = now_errors;
        metrics.set_ready(true);
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(settings.resync) => {}
            () = &mut shutdown => break,
        }
    }
    let failed = tokio::task::block_in_place(|| tables.remove_all());
    for (pod, error) in &failed {
        tracing::error!(%pod, %error, "cannot remove the pod's table at shutdown");
    }
    tracing::info!(failed = failed.len(), "pod tables removed; stopping");
    Ok(())
}
