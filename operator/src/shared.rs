//! One watch per kind, shared: a reflector store every consumer reads, and the watch's events
//! fanned out to every subscriber; pods trimmed to what the consumers read ([`pod_view`]).
//!
//! ```text
//!  watch(K) ─▶ trim ─▶ reflector ─▶ Store<K> ─────────── read by every consumer
//!                                 └▶ events ─┬─▶ subscriber (policy controller triggers)
//!                                            ├─▶ subscriber (cluster controller triggers)
//!                                            └─▶ subscriber (quarantine wake-ups)
//! ```
//! A subscriber joining late first gets the store as a relist (Init, InitApply each, InitDone),
//! then the live events; an event racing its joining may come twice, which every consumer
//! (level-triggered) takes as a no-op.

use std::{collections::BTreeMap, sync::Arc};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{ContainerStatus, Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Mutex, mpsc};
use tracing::warn;

use portsentry_crds::PortSentryBan;

use crate::{inject, labels, watch::WatchBackoff};

/// Events one subscriber may lag behind before the watch waits for it.
const BUFFER: usize = 1024;

type Subscribers<K> = Arc<Mutex<Vec<mpsc::Sender<watcher::Event<K>>>>>;

/// The one watch of kind `K`: its store and its subscribers.
pub struct Shared<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    subscribers: Subscribers<K>,
    /// True once the first list is in the store. Every waiter waits on this, never on
    /// `Store::wait_until_ready`: kube-runtime's readiness future wakes only the waiter that
    /// polled it last, so two consumers waiting at once could leave one asleep for good.
    ready: tokio::sync::watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()>> Clone for Shared<K> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            subscribers: self.subscribers.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> std::fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("kind", &K::kind(&()))
            .finish_non_exhaustive()
    }
}

impl<K> Shared<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    /// The shared watch of `api`, each object trimmed by `trim` before it is stored or sent;
    /// run the future (it ends only if every consumer is gone).
    pub fn watch(
        api: Api<K>,
        trim: fn(&mut K),
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store::<K>();
        let subscribers: Subscribers<K> = Arc::default();
        let events = watcher::watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::default())
            .modify(trim)
            .reflect(writer);
        let fan_out = subscribers.clone();
        let (listed, ready) = tokio::sync::watch::channel(false);
        let reader = store.clone();
        let run = async move {
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                let events: Vec<watcher::Event<K>> = match event {
                    Err(error) => {
                        warn!(%error, kind = %K::kind(&()), "shared watch; retrying");
                        continue;
                    }
                    // A (re)list reaches the store only at its end, when the reflector swaps
                    // it in; forwarded object by object before that, a consumer woken by an
                    // object would read a store without it. So the whole list goes out
                    // once the store holds it, read back from the store.
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                    Ok(watcher::Event::InitDone) => {
                        listed.send_replace(true);
                        relist(&reader).collect()
                    }
                    Ok(event) => vec![event],
                };
                let mut subscribers = fan_out.lock().await;
                let mut open = Vec::with_capacity(subscribers.len());
                'subscribers: for subscriber in subscribers.drain(..) {
                    for event in &events {
                        if subscriber.send(event.clone()).await.is_err() {
                            continue 'subscribers;
                        }
                    }
                    open.push(subscriber);
                }
                *subscribers = open;
            }
        };
        let shared = Self {
            store,
            subscribers,
            ready,
        };
        (shared, run)
    }

    /// The store every consumer reads (empty until the first list: see [`Shared::subscribe`]).
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Waits until the store holds the first list; Err if the watch future was dropped
    /// first (then nothing more ever arrives). Any number of callers may wait at once.
    pub async fn ready(&self) -> Result<(), WatchEnded> {
        self.ready
            .clone()
            .wait_for(|listed| *listed)
            .await
            .map(|_| ())
            .map_err(|_| WatchEnded(K::kind(&()).into_owned()))
    }

    /// Waits for the first list, then streams every object in the store as a relist and every
    /// event after it, as a watch of its own would.
    pub async fn subscribe(
        &self,
    ) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static {
        // Err only if the watch future was dropped: then the stream below just ends.
        let _ = self.ready().await;
        let (sender, receiver) = mpsc::channel(BUFFER);
        let mut subscribers = self.subscribers.lock().await;
        let now = relist(&self.store).collect::<Vec<_>>();
        subscribers.push(sender);
        drop(subscribers);
        stream::iter(now)
            .chain(stream::unfold(receiver, |mut receiver| async move {
                receiver.recv().await.map(|event| (event, receiver))
            }))
            .map(Ok)
    }
}

/// The store's content as a watch's relist: `Init`, each object, `InitDone`.
fn relist<K>(store: &Store<K>) -> impl Iterator<Item = watcher::Event<K>> + use<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    std::iter::once(watcher::Event::Init)
        .chain(
            store
                .state()
                .into_iter()
                .map(|object| watcher::Event::InitApply(K::clone(&object))),
        )
        .chain(std::iter::once(watcher::Event::InitDone))
}

/// Drops what no consumer of a watched object reads: its managed fields.
pub fn without_managed_fields<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
}

/// Trims a pod, in place, to what the controllers, the pod triggers and quarantine read: its
/// name, namespace, uid, resourceVersion, deletionTimestamp and labels, its sensor
/// annotations, its phase and addresses, and its sidecar's name, `ready` and `started`.
/// What the shared store then holds per pod is a few hundred bytes, whatever its spec.
pub fn pod_view(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| {
            [
                labels::INJECTED_ANNOTATION,
                labels::CONFIG_MAP_ANNOTATION,
                labels::SKIPPED_ANNOTATION,
            ]
            .contains(&key.as_str())
        })
        .collect();
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        deletion_timestamp: meta.deletion_timestamp,
        labels: meta.labels,
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    };
    // Quarantine never touches pods on the host's network.
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        host_network: spec.host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| {
        let sidecar: Vec<ContainerStatus> = status
            .init_container_statuses
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.name == inject::SIDECAR_NAME)
            .map(|c| ContainerStatus {
                name: c.name,
                ready: c.ready,
                started: c.started,
                ..ContainerStatus::default()
            })
            .collect();
        PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            init_container_statuses: (!sidecar.is_empty()).then_some(sidecar),
            ..PodStatus::default()
        }
    });
}

/// True when the webhook injected a sensor into `pod` (its label, as [`labels::INJECTED_PODS`]
/// selects).
pub fn injected(pod: &Pod) -> bool {
    labels::INJECTED_PODS
        .split_once('=')
        .is_some_and(|(key, value)| pod.labels().get(key).map(String::as_str) == Some(value))
}

/// `events` of a pod watch reduced to the pods the webhook injected ([`injected`]), as a
/// watch selecting their label would send them.
pub fn injected_events<S>(events: S) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send + 'static,
{
    events.filter(|event| {
        std::future::ready(match event {
            Ok(
                watcher::Event::Apply(pod)
                | watcher::Event::InitApply(pod)
                | watcher::Event::Delete(pod),
            ) => injected(pod),
            _ => true,
        })
    })
}

/// The shared watch of a kind ended before its first list.
#[derive(Debug, thiserror::Error)]
#[error("the shared {0} watch ended before its first list")]
pub struct WatchEnded(pub String);

/// The watches the leader's controllers share with each other (and bans with the intake).
#[derive(Clone, Debug)]
pub struct Watches {
    /// Every PortSentryBan, without managed fields.
    pub bans: Shared<PortSentryBan>,
    /// Every pod, trimmed by [`pod_view`].
    pub pods: Shared<Pod>,
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodIP;
    use serde_json::json;

    use super::*;
    use crate::policy::status::count_sensors;

    const WEB: &str = "PortSentryPolicy/web";

    /// An injected pod as the API server sends it: spec, statuses of two init containers,
    /// annotations besides the sensor's.
    fn full_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "web", labels::SENSOR_LABEL: "injected"},
                "annotations": {
                    labels::INJECTED_ANNOTATION: WEB,
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                },
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"containers": [{"name": "app", "image": "web:1"}]},
            "status": {
                "phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}],
                "initContainerStatuses": [
                    {"name": "init-db", "image": "db:1", "imageID": "", "ready": true, "restartCount": 0},
                    {"name": inject::SIDECAR_NAME, "image": "sensor:1", "imageID": "", "ready": true,
                     "restartCount": 0, "started": true},
                ],
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_pod_view_keeps_what_sensor_counts_read() {
        let mut pod = full_pod();
        let before = count_sensors([&pod], WEB);
        pod_view(&mut pod);
        assert_eq!(count_sensors([&pod], WEB), before);
        assert_eq!(before.ready, 1);
    }

    #[test]
    fn the_pod_view_keeps_labels_and_addresses_for_selectors_and_quarantine() {
        let mut pod = full_pod();
        pod_view(&mut pod);
        assert_eq!(pod.labels()["app"], "web");
        let status = pod.status.unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(
            status.pod_ips,
            Some(vec![PodIP {
                ip: "10.244.1.5".into()
            }])
        );
    }

    #[test]
    fn the_pod_view_keeps_host_network_for_quarantine() {
        let mut pod = full_pod();
        pod.spec.get_or_insert_default().host_network = Some(true);
        pod_view(&mut pod);
        assert_eq!(pod.spec.unwrap().host_network, Some(true));
    }

    #[test]
    fn the_pod_view_drops_spec_managed_fields_other_annotations_and_containers() {
        let mut pod = full_pod();
        pod_view(&mut pod);
        let spec = pod.spec.clone().unwrap();
        assert!(spec.containers.is_empty() && spec.init_containers.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        assert_eq!(
            pod.annotations().keys().collect::<Vec<_>>(),
            [labels::INJECTED_ANNOTATION]
        );
        let statuses = pod.status.unwrap().init_container_statuses.unwrap();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].image, "");
    }

    #[test]
    fn only_pods_with_the_injected_label_count_as_injected() {
        let mut pod = full_pod();
        assert!(injected(&pod));
        pod.metadata.labels = Some([(labels::SENSOR_LABEL.to_owned(), "node".to_owned())].into());
        assert!(!injected(&pod));
        pod.metadata.labels = None;
        assert!(!injected(&pod));
    }

    #[test]
    fn injected_events_pass_list_boundaries_and_injected_pods_only() {
        let mut plain = full_pod();
        plain.metadata.labels = None;
        let events = stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(full_pod())),
            Ok(watcher::Event::InitApply(plain.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(plain)),
            Ok(watcher::Event::Delete(full_pod())),
        ]);
        let kept: Vec<_> = futures::executor::block_on(injected_events(events).collect::<Vec<_>>())
            .into_iter()
            .map(|event| match event.unwrap() {
                watcher::Event::Init => "init",
                watcher::Event::InitApply(_) => "list",
                watcher::Event::InitDone => "done",
                watcher::Event::Delete(_) => "delete",
                watcher::Event::Apply(_) => "apply",
            })
            .collect();
        assert_eq!(kept, ["init", "list", "done", "delete"]);
    }
}
