//! The addresses never banned that the cluster tells: its nodes, the API server, Services and
//! the DNS, pods of protected namespaces; kept current by watches, read afresh on demand.
//!
//! ```text
//!  watch Nodes, Services, EndpointSlices (default/kubernetes), Pods (protected namespaces)
//!     └─▶ stores ─▶ assemble (pure) ─▶ current Guards ◀── snapshot(): intake, quarantine
//!  list the same (consistent read) ─▶ assemble ─▶ since(t): a decision on a ban first seen
//!                                                at t reads a set at least as new as it
//! ```

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Instant,
};

use futures::{FutureExt, StreamExt, stream::BoxStream};
use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use portsentry_crds::PortSentryBan;
use tracing::warn;

use crate::{Result, enforce::bans::Guards, watch::WatchBackoff};

/// The label the cluster DNS Service carries (CoreDNS and kube-dns alike).
const DNS_KEY: &str = "k8s-app";
const DNS_VALUE: &str = "kube-dns";
/// The label of the API server's EndpointSlices (Service `default/kubernetes`).
const APISERVER_SLICES: &str = "kubernetes.io/service-name=kubernetes";

/// What the operator is told to protect besides what it discovers (chart values).
#[derive(Clone, Debug, Default)]
pub struct GuardSettings {
    /// The operator's own addresses.
    pub operator_addrs: Vec<IpAddr>,
    /// Namespaces whose pods are never banned nor quarantined (kube-system and the
    /// operator's namespace are always among them).
    pub protected_namespaces: BTreeSet<String>,
    /// Prefixes never banned.
    pub protected_nets: Vec<IpNet>,
    /// The cluster's pod ranges as the chart gives them (`podCIDRs`), besides the nodes'
    /// `spec.podCIDRs`: CNIs that allocate pod addresses themselves (Cilium's cluster pool,
    /// Calico's IPAM) leave those empty or unused.
    pub pod_nets: Vec<IpNet>,
}

impl GuardSettings {
    /// The settings with kube-system and `operator_namespace` added to the namespaces.
    pub fn new(
        operator_addrs: Vec<IpAddr>,
        operator_namespace: &str,
        namespaces: impl IntoIterator<Item = String>,
        protected_nets: Vec<IpNet>,
    ) -> Self {
        let mut protected_namespaces: BTreeSet<String> = namespaces
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        protected_namespaces.insert("kube-system".to_owned());
        protected_namespaces.insert(operator_namespace.to_owned());
        Self {
            operator_addrs,
            protected_namespaces,
            protected_nets,
            pod_nets: Vec::new(),
        }
    }
}

/// Parses every address in `texts`, skipping what is not an address.
fn addresses<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().filter_map(|t| t.parse().ok()).collect()
}

fn cluster_ips<'a>(services: impl IntoIterator<Item = &'a Service>) -> Vec<IpAddr> {
    addresses(
        services
            .into_iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ips.as_ref())
            .flatten()
            .map(String::as_str),
    )
}

fn named(service: &Service, namespace: &str, name: &str) -> bool {
    service.metadata.namespace.as_deref() == Some(namespace)
        && service.metadata.name.as_deref() == Some(name)
}

/// The protected set from the cluster's objects (pure): every Node, every Service (the API
/// server's `default/kubernetes` and the DNS, labelled `k8s-app=kube-dns`, among them), the
/// API server's EndpointSlices, and pods (those outside the protected namespaces are skipped).
pub fn assemble<'a>(
    settings: &GuardSettings,
    nodes: impl IntoIterator<Item = &'a Node>,
    services: impl IntoIterator<Item = &'a Service>,
    apiserver_slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Guards {
    let nodes: Vec<&Node> = nodes.into_iter().collect();
    let services: Vec<&Service> = services.into_iter().collect();
    let node_addrs = addresses(
        nodes
            .iter()
            .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
            .flatten()
            .map(|a| a.address.as_str()),
    );
    let mut pod_nets: Vec<IpNet> = nodes
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidrs.as_ref())
        .flatten()
        .filter_map(|cidr| cidr.parse::<IpNet>().ok())
        .chain(settings.pod_nets.iter().copied())
        .map(|net| net.trunc())
        .collect();
    pod_nets.sort();
    pod_nets.dedup();
    let mut apiserver_addrs = cluster_ips(
        services
            .iter()
            .copied()
            .filter(|s| named(s, "default", "kubernetes")),
    );
    apiserver_addrs.extend(addresses(
        apiserver_slices
            .into_iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .map(String::as_str),
    ));
    let dns_addrs = cluster_ips(
        services
            .iter()
            .copied()
            .filter(|s| s.labels().get(DNS_KEY).map(String::as_str) == Some(DNS_VALUE)),
    );
    let mut infra_pod_addrs = addresses(
        pods.into_iter()
            .filter(|p| {
                p.metadata
                    .namespace
                    .as_ref()
                    .is_some_and(|n| settings.protected_namespaces.contains(n))
            })
            .filter_map(|p| p.status.as_ref())
            .flat_map(|s| {
                s.pod_ips
                    .iter()
                    .flatten()
                    .map(|ip| ip.ip.as_str())
                    .chain(s.pod_ip.as_deref())
            }),
    );
    infra_pod_addrs.sort();
    infra_pod_addrs.dedup();
    Guards {
        node_addrs,
        apiserver_addrs,
        operator_addrs: settings.operator_addrs.clone(),
        infra_pod_addrs,
        service_addrs: cluster_ips(services.iter().copied()),
        dns_addrs,
        protected_nets: settings.protected_nets.clone(),
        protected_namespaces: settings.protected_namespaces.clone(),
        pod_nets,
    }
}

/// Reads node, API server, Service, DNS and protected pods' addresses from the cluster (lists
/// read from etcd: everything created before the call is in them).
pub async fn discover_guards(client: &Client, settings: &GuardSettings) -> Result<Guards> {
    let all = ListParams::default();
    let nodes = Api::<Node>::all(client.clone()).list(&all).await?;
    let services = Api::<Service>::all(client.clone()).list(&all).await?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(APISERVER_SLICES))
        .await?;
    let mut pods = Vec::new();
    for namespace in &settings.protected_namespaces {
        let listed = Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&all)
            .await?;
        pods.extend(listed.items);
    }
    Ok(assemble(
        settings,
        &nodes.items,
        &services.items,
        &slices.items,
        &pods,
    ))
}

/// The protected set the decisions read: kept current by watches ([`ProtectedSet::follow`]),
/// and read afresh before a decision that must not miss an object just created
/// ([`ProtectedSet::since`]). Cheap to clone (shared).
#[derive(Clone)]
pub struct ProtectedSet {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<Guards>,
    client: Client,
    settings: GuardSettings,
    /// The last consistent read: when it started and what it found. Its lock makes reads
    /// single-flight: one at a time, and one serves every caller it started after.
    fresh: tokio::sync::Mutex<Option<(Instant, Guards)>>,
}

impl std::fmt::Debug for ProtectedSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectedSet")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl ProtectedSet {
    /// The set read from the cluster now; fails if the cluster cannot be read.
    pub async fn discover(client: Client, settings: GuardSettings) -> Result<Self> {
        let started = Instant::now();
        let guards = discover_guards(&client, &settings).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                current: RwLock::new(guards.clone()),
                client,
                settings,
                fresh: tokio::sync::Mutex::new(Some((started, guards))),
            }),
        })
    }

    /// The set as the watches last saw it.
    pub fn snapshot(&self) -> Guards {
        self.inner
            .current
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn replace(&self, guards: Guards) {
        match self.inner.current.write() {
            Ok(mut current) => *current = guards,
            Err(poisoned) => *poisoned.into_inner() = guards,
        }
    }

    /// The set as read from the cluster by a read that started at or after `since`: a ban
    /// first seen at `since` is judged against every Node, Service and pod created before
    /// it, whatever the watches have delivered yet. One read at a time; callers it started
    /// after share it.
    pub async fn since(&self, since: Instant) -> Result<Guards> {
        let mut fresh = self.inner.fresh.lock().await;
        if let Some((started, guards)) = fresh.as_ref()
            && *started >= since
        {
            return Ok(guards.clone());
        }
        let started = Instant::now();
        let guards = discover_guards(&self.inner.client, &self.inner.settings).await?;
        self.replace(guards.clone());
        *fresh = Some((started, guards.clone()));
        Ok(guards)
    }

    /// The set to judge `bans` against: the watches' view when each of them carries the
    /// verdict of an earlier judgement (a status condition); else one read after they were
    /// seen, so a ban made right after a Service (or Node, or pod) of its address is refused.
    pub async fn for_bans<'a>(
        &self,
        bans: impl IntoIterator<Item = &'a PortSentryBan>,
    ) -> Result<Guards> {
        let seen = Instant::now();
        let judged = |ban: &PortSentryBan| {
            ban.status
                .as_ref()
                .is_some_and(|status| !status.conditions.is_empty())
        };
        if bans.into_iter().all(judged) {
            Ok(self.snapshot())
        } else {
            self.since(seen).await
        }
    }

    /// Keeps the set current from watches of Nodes, Services, the API server's
    /// EndpointSlices and the protected namespaces' pods: each change is in the set within
    /// the watch's delivery (milliseconds), not at the next poll. Runs until the process ends.
    pub async fn follow(self) {
        let client = self.inner.client.clone();
        let settings = self.inner.settings.clone();
        let (nodes, node_writer) = reflector::store::<Node>();
        let (services, service_writer) = reflector::store::<Service>();
        let (slices, slice_writer) = reflector::store::<EndpointSlice>();
        let mut streams = vec![
            changes(0, Api::all(client.clone()), None, trim_node, node_writer),
            changes(
                1,
                Api::all(client.clone()),
                None,
                trim_service,
                service_writer,
            ),
            changes(
                2,
                Api::namespaced(client.clone(), "default"),
                Some(APISERVER_SLICES),
                trim_slice,
                slice_writer,
            ),
        ];
        let mut pod_stores: Vec<Store<Pod>> = Vec::new();
        for namespace in &settings.protected_namespaces {
            let (store, writer) = reflector::store::<Pod>();
            let api = Api::namespaced(client.clone(), namespace);
            streams.push(changes(streams.len(), api, None, trim_pod, writer));
            pod_stores.push(store);
        }
        let mut listed = vec![false; streams.len()];
        let mut events = futures::stream::select_all(streams);
        while let Some(first) = events.next().await {
            let mut changed = note(&mut listed, first);
            // Take every event already delivered before assembling once.
            while let Some(Some(more)) = events.next().now_or_never() {
                changed |= note(&mut listed, more);
            }
            if !changed || !listed.iter().all(|l| *l) {
                continue;
            }
            let (nodes, services, slices) = (nodes.state(), services.state(), slices.state());
            let pods: Vec<Arc<Pod>> = pod_stores.iter().flat_map(Store::state).collect();
            self.replace(assemble(
                &settings,
                nodes.iter().map(AsRef::as_ref),
                services.iter().map(AsRef::as_ref),
                slices.iter().map(AsRef::as_ref),
                pods.iter().map(AsRef::as_ref),
            ));
        }
    }
}

/// What one event of a watch means for the set.
enum Seen {
    /// The watch's (re)list is in its store (which the set may now read).
    Listed(usize),
    Changed,
    Nothing,
}

/// Marks a listed watch; true when the stores changed.
fn note(listed: &mut [bool], seen: Seen) -> bool {
    match seen {
        Seen::Listed(index) => {
            if let Some(flag) = listed.get_mut(index) {
                *flag = true;
            }
            true
        }
        Seen::Changed => true,
        Seen::Nothing => false,
    }
}

/// The watch of `api` (objects labelled `selector`), trimmed into `writer`'s store, as what
/// each event means for the set.
fn changes<K>(
    index: usize,
    api: Api<K>,
    selector: Option<&str>,
    trim: fn(&mut K),
    writer: reflector::store::Writer<K>,
) -> BoxStream<'static, Seen>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let config = match selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    watcher::watcher(api, config)
        .backoff(WatchBackoff::default())
        .modify(trim)
        .reflect(writer)
        .map(move |event| match event {
            Ok(watcher::Event::InitDone) => Seen::Listed(index),
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Seen::Changed,
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Seen::Nothing,
            Err(error) => {
                warn!(%error, kind = %K::kind(&()), "protected-address watch; retrying");
                Seen::Nothing
            }
        })
        .boxed()
}

/// Keeps of `meta` what a store needs (name, namespace) and, if `labels`, the labels.
fn trim_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, labels: bool) {
    let kept = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        labels: if labels { meta.labels.take() } else { None },
        ..Default::default()
    };
    *meta = kept;
}

fn trim_node(node: &mut Node) {
    trim_meta(&mut node.metadata, false);
    node.spec = node
        .spec
        .take()
        .map(|spec| k8s_openapi::api::core::v1::NodeSpec {
            pod_cidrs: spec.pod_cidrs,
            ..Default::default()
        });
    node.status = node
        .status
        .take()
        .map(|status| k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses,
            ..Default::default()
        });
}

fn trim_service(service: &mut Service) {
    trim_meta(&mut service.metadata, true);
    service.spec = service
        .spec
        .take()
        .map(|spec| k8s_openapi::api::core::v1::ServiceSpec {
            cluster_ips: spec.cluster_ips,
            ..Default::default()
        });
    service.status = None;
}

fn trim_slice(slice: &mut EndpointSlice) {
    trim_meta(&mut slice.metadata, false);
    for endpoint in &mut slice.endpoints {
        *endpoint = k8s_openapi::api::discovery::v1::Endpoint {
            addresses: std::mem::take(&mut endpoint.addresses),
            ..Default::default()
        };
    }
    slice.ports = None;
}

fn trim_pod(pod: &mut Pod) {
    trim_meta(&mut pod.metadata, false);
    pod.spec = None;
    pod.status = pod
        .status
        .take()
        .map(|status| k8s_openapi::api::core::v1::PodStatus {
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..Default::default()
        });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn kube_system_and_the_operator_namespace_are_always_protected() {
        let settings = GuardSettings::new(
            Vec::new(),
            "portsentry-system",
            ["monitoring".to_owned(), " ".to_owned()],
            Vec::new(),
        );
        assert_eq!(
            settings.protected_namespaces,
            BTreeSet::from([
                "kube-system".to_owned(),
                "monitoring".to_owned(),
                "portsentry-system".to_owned()
            ])
        );
    }

    fn object<K: serde::de::DeserializeOwned>(value: serde_json::Value) -> K {
        serde_json::from_value(value).unwrap()
    }

    /// A cluster: a node, the API server's Service and slice, the DNS, a tenant's Service, a
    /// pod of kube-system and one of a tenant.
    fn cluster() -> (Vec<Node>, Vec<Service>, Vec<EndpointSlice>, Vec<Pod>) {
        let nodes = vec![object(json!({
            "metadata": {"name": "n1", "labels": {"a": "b"}, "resourceVersion": "7"},
            "spec": {"podCIDRs": ["10.244.0.0/24"], "providerID": "x"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"},
                                     {"type": "Hostname", "address": "n1"}],
                       "phase": "Running"},
        }))];
        let service = |namespace: &str, name: &str, ip: &str, labels: serde_json::Value| {
            object::<Service>(json!({
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80}]},
            }))
        };
        let services = vec![
            service("default", "kubernetes", "10.96.0.1", json!({})),
            service(
                "kube-system",
                "kube-dns",
                "10.96.0.10",
                json!({"k8s-app": "kube-dns"}),
            ),
            service("shop", "web", "10.96.7.7", json!({})),
        ];
        let slices = vec![object(json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["192.0.2.1"], "conditions": {"ready": true}}],
            "ports": [{"port": 6443}],
        }))];
        let pod = |namespace: &str, ip: &str| {
            object::<Pod>(json!({
                "metadata": {"name": "p", "namespace": namespace},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
                "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
            }))
        };
        let pods = vec![pod("kube-system", "10.244.0.5"), pod("shop", "10.244.0.6")];
        (nodes, services, slices, pods)
    }

    fn settings() -> GuardSettings {
        GuardSettings::new(Vec::new(), "portsentry-system", [], Vec::new())
    }

    fn protection(guards: &Guards, address: &str) -> Option<&'static str> {
        guards
            .protected(&address.parse().unwrap(), &[])
            .map(|why| why.as_str())
    }

    #[test]
    fn the_set_holds_nodes_the_api_server_services_the_dns_and_protected_pods_only() {
        let (nodes, services, slices, pods) = cluster();
        let guards = assemble(&settings(), &nodes, &services, &slices, &pods);
        assert_eq!(protection(&guards, "192.0.2.10"), Some("node"));
        assert_eq!(protection(&guards, "192.0.2.1"), Some("apiserver"));
        assert_eq!(protection(&guards, "10.96.0.1"), Some("apiserver"));
        assert_eq!(protection(&guards, "10.96.0.10"), Some("cluster_dns"));
        assert_eq!(protection(&guards, "10.96.7.7"), Some("service"));
        assert_eq!(
            protection(&guards, "10.244.0.5"),
            Some("protected_namespace")
        );
        assert_eq!(protection(&guards, "10.244.0.6"), None);
        assert_eq!(
            guards.pod_nets,
            vec!["10.244.0.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn what_the_watches_keep_of_each_object_is_everything_the_set_reads() {
        let (mut nodes, mut services, mut slices, mut pods) = cluster();
        let whole = assemble(&settings(), &nodes, &services, &slices, &pods);
        nodes.iter_mut().for_each(trim_node);
        services.iter_mut().for_each(trim_service);
        slices.iter_mut().for_each(trim_slice);
        pods.iter_mut().for_each(trim_pod);
        let trimmed = assemble(&settings(), &nodes, &services, &slices, &pods);
        assert_eq!(format!("{trimmed:?}"), format!("{whole:?}"));
        assert!(nodes[0].metadata.labels.is_none());
        assert!(services[0].spec.as_ref().unwrap().ports.is_none());
    }
}
