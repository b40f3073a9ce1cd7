//! The operator's watches as the controllers share them: the backoff every watch retries
//! with, and the pod watches reduced to the pods whose policy must reconcile (triggers).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use futures::{Stream, TryStreamExt, stream};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};

use crate::{labels, policy::status};

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
        labels::INJECTED_ANNOTATION,
        labels::CONFIG_MAP_ANNOTATION,
        labels::SKIPPED_ANNOTATION,
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
        .and_then(|a| a.get(labels::INJECTED_ANNOTATION))
        .map(|value| BTreeMap::from([(labels::INJECTED_ANNOTATION.to_owned(), value.clone())]));
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
    pod.annotations().contains_key(labels::INJECTED_ANNOTATION)
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
pub fn metadata_event(event: watcher::Event<Pod>) -> watcher::Event<PartialObjectMeta<Pod>> {
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
                BTreeMap::from([(labels::INJECTED_ANNOTATION.to_owned(), policy.to_owned())])
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
            fired[0].annotations()[labels::INJECTED_ANNOTATION],
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
                    "name": crate::inject::SIDECAR_NAME, "image": "sensor:1", "imageID": "",
                    "ready": ready, "restartCount": 0, "started": ready,
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("pod-{uid}"), "namespace": "shop", "uid": uid,
                "resourceVersion": version,
                "annotations": {labels::INJECTED_ANNOTATION: "PortSentryPolicy/web"},
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
            fired[0].annotations()[labels::INJECTED_ANNOTATION],
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
}
