//! Quarantine: a pod banned by a policy with `quarantine: true` is labelled and its egress
//! denied by a generated NetworkPolicy in its namespace, undone at expiry; a namespaced
//! policy reaches only its own namespace, never a protected one.
//!
//! Level-triggered: `desired` (pure) says which pods must be quarantined now; the loop labels
//! and unlabels pods to match, and keeps one deny-egress policy per namespace that needs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        core::v1::Pod,
        networking::v1::{NetworkPolicy, NetworkPolicySpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use portsentry_crds::{ClusterPortSentryPolicy, PolicyKind, PortSentryBan, PortSentryPolicy};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    Result,
    enforce::bans::{self, Guards},
    labels::{self, QUARANTINE_LABEL},
    shared::Watches,
    watch::WatchBackoff,
};

/// Name of the generated deny-egress policy in each namespace holding quarantined pods.
pub const POLICY_NAME: &str = "portsentry-quarantine";
/// Longest wait between two passes when nothing changes.
const RESYNC: Duration = Duration::from_secs(10);

/// (namespace, name) of a pod.
pub type PodKey = (String, String);

/// The policies that ask for quarantine, and where cluster policies' bans live.
#[derive(Clone, Debug, Default)]
pub struct Quarantining {
    /// "namespace/name" of namespaced policies with `quarantine: true`.
    pub namespaced: BTreeSet<String>,
    /// Names of cluster policies with `quarantine: true`.
    pub cluster: BTreeSet<String>,
    /// The operator's namespace: the only place a cluster policy's ban counts.
    pub operator_namespace: String,
}

/// Where a ban may quarantine: `Some(ns)` only pods of `ns`, `None` any namespace; the
/// ban is not a quarantining one at all when the outer option is `None`.
///
/// A namespaced policy's ban acts in its own namespace only. A cluster policy's ban acts
/// in any namespace, unless the intake confined it (label [`labels::CONFINED_LABEL`]) to
/// the reporting pod's namespace until other reporters corroborate it. A ban naming a
/// cluster policy outside the operator's namespace is somebody's forgery and acts nowhere.
/// Only bans of one address quarantine.
pub fn scope(ban: &PortSentryBan, quarantining: &Quarantining) -> Option<Option<String>> {
    let net = ban.spec.source.network();
    if net.prefix_len() != net.max_prefix_len() {
        return None;
    }
    let namespace = ban.namespace().unwrap_or_default();
    match ban.spec.policy.kind {
        PolicyKind::PortSentryPolicy => quarantining
            .namespaced
            .contains(&format!("{namespace}/{}", ban.spec.policy.name))
            .then_some(Some(namespace)),
        PolicyKind::ClusterPortSentryPolicy => (namespace == quarantining.operator_namespace
            && quarantining.cluster.contains(&ban.spec.policy.name))
        .then(|| ban.labels().get(labels::CONFINED_LABEL).cloned()),
    }
}

/// True when a pod may never be quarantined: pods of protected namespaces (kube-system, the
/// operator's, the chart's list) and pods on the host's network.
pub fn exempt(pod: &Pod, guards: &Guards) -> bool {
    let namespace = pod.namespace().unwrap_or_default();
    guards.protects_namespace(&namespace)
        || pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
}

/// The pods that must be quarantined at `now`: those with an address of an active
/// single-address ban of a quarantining policy, within the ban's [`scope`], never an
/// [`exempt`] pod.
pub fn desired(
    bans: &[Arc<PortSentryBan>],
    quarantining: &Quarantining,
    guards: &Guards,
    pods: &[Arc<Pod>],
    now: Timestamp,
) -> BTreeSet<PodKey> {
    let banned: Vec<_> = bans
        .iter()
        .filter(|b| bans::is_active(&b.spec, now))
        .filter_map(|b| Some((b.spec.source.network(), scope(b, quarantining)?)))
        .collect();
    pods.iter()
        .filter(|pod| !exempt(pod, guards))
        .filter(|pod| {
            let namespace = pod.namespace().unwrap_or_default();
            pod_addresses(pod).iter().any(|a| {
                banned.iter().any(|(net, scope)| {
                    net.contains(&a.to_canonical())
                        && scope.as_ref().is_none_or(|ns| *ns == namespace)
                })
            })
        })
        .filter_map(|pod| Some((pod.namespace()?, pod.name_any())))
        .collect()
}

/// The addresses of `pod` (`status.podIPs` and `status.podIP`).
pub fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Pods to label and to unlabel so that the labelled set becomes `desired`.
pub fn changes(
    desired: &BTreeSet<PodKey>,
    labelled: &BTreeSet<PodKey>,
) -> (Vec<PodKey>, Vec<PodKey>) {
    (
        desired.difference(labelled).cloned().collect(),
        labelled.difference(desired).cloned().collect(),
    )
}

/// The deny-all-egress policy for quarantined pods of `namespace`.
pub fn egress_policy(namespace: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(POLICY_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY_LABEL.to_owned(),
                labels::MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    QUARANTINE_LABEL.to_owned(),
                    "true".to_owned(),
                )])),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Egress".to_owned()]),
            egress: Some(Vec::new()),
            ingress: None,
        }),
    }
}

/// Keeps quarantine equal to `desired` until the process ends; run only by the leader.
/// Bans and pods are the shared watches' stores (pods trimmed: addresses and labels are
/// what quarantine reads); any event of theirs wakes a pass.
pub async fn run(
    client: Client,
    shared: Watches,
    guards: crate::enforce::guards::ProtectedSet,
    operator_namespace: String,
) {
    let changed = Arc::new(Notify::new());
    let policies = store::<PortSentryPolicy>(&client, changed.clone());
    let cluster_policies = store::<ClusterPortSentryPolicy>(&client, changed.clone());
    let wake = |events: futures::stream::BoxStream<'static, _>| {
        let changed = changed.clone();
        events.for_each(move |_| {
            changed.notify_one();
            std::future::ready(())
        })
    };
    let ban_events = wake(shared.bans.subscribe().await.map(|_| ()).boxed());
    let pod_events = wake(shared.pods.subscribe().await.map(|_| ()).boxed());
    let _ = policies.1.await;
    let _ = cluster_policies.1.await;
    let (bans, pods) = (shared.bans.store(), shared.pods.store());
    let passes = async {
        loop {
            let quarantining = Quarantining {
                namespaced: policies
                    .0
                    .state()
                    .iter()
                    .filter(|p| p.spec.rules.response.quarantine)
                    .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
                    .collect(),
                cluster: cluster_policies
                    .0
                    .state()
                    .iter()
                    .filter(|p| p.spec.rules.response.quarantine)
                    .map(|p| p.name_any())
                    .collect(),
                operator_namespace: operator_namespace.clone(),
            };
            let guards = guards.snapshot();
            if let Err(error) = pass(&client, &bans, &quarantining, &guards, &pods).await {
                warn!(%error, "quarantine pass failed");
            }
            let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
        }
    };
    tokio::select! {
        () = passes => {}
        () = ban_events => warn!("the shared ban watch ended"),
        () = pod_events => warn!("the shared pod watch ended"),
    }
}

type Ready = futures::future::BoxFuture<'static, ()>;

fn store<K>(client: &Client, changed: Arc<Notify>) -> (Store<K>, Ready)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let stream = watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .backoff(WatchBackoff::default())
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if event.is_ok() {
                changed.notify_one();
            }
        }
    });
    let ready = reader.clone();
    (
        reader,
        Box::pin(async move {
            let _ = ready.wait_until_ready().await;
        }),
    )
}

async fn pass(
    client: &Client,
    bans: &Store<PortSentryBan>,
    quarantining: &Quarantining,
    guards: &Guards,
    pods: &Store<Pod>,
) -> Result<()> {
    let pods_now = pods.state();
    let want = desired(
        &bans.state(),
        quarantining,
        guards,
        &pods_now,
        Timestamp::now(),
    );
    let labelled: BTreeSet<PodKey> = pods_now
        .iter()
        .filter(|p| p.labels().get(QUARANTINE_LABEL).map(String::as_str) == Some("true"))
        .filter_map(|p| Some((p.namespace()?, p.name_any())))
        .collect();
    let (add, remove) = changes(&want, &labelled);
    let params = PatchParams::default();
    for ((namespace, name), value) in add
        .iter()
        .map(|k| (k, serde_json::json!("true")))
        .chain(remove.iter().map(|k| (k, serde_json::Value::Null)))
    {
        let patch = serde_json::json!({"metadata": {"labels": {QUARANTINE_LABEL: value}}});
        match Api::<Pod>::namespaced(client.clone(), namespace)
            .patch(name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(pod = %format!("{namespace}/{name}"), quarantined = !value.is_null(), "quarantine changed")
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error.into()),
        }
    }
    let needed: BTreeSet<&str> = want.iter().map(|(ns, _)| ns.as_str()).collect();
    let existing = Api::<NetworkPolicy>::all(client.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={POLICY_NAME}")))
        .await?;
    let apply = PatchParams::apply(labels::MANAGER).force();
    for namespace in &needed {
        Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
            .patch(POLICY_NAME, &apply, &Patch::Apply(egress_policy(namespace)))
            .await?;
    }
    for stale in existing.items.iter().filter(|np| {
        np.labels()
            .get(labels::MANAGED_BY_LABEL)
            .map(String::as_str)
            == Some(labels::MANAGER)
            && !np
                .namespace()
                .is_some_and(|ns| needed.contains(ns.as_str()))
    }) {
        if let Some(namespace) = stale.namespace() {
            match Api::<NetworkPolicy>::namespaced(client.clone(), &namespace)
                .delete(POLICY_NAME, &DeleteParams::default())
                .await
            {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    use super::*;

    fn pod(namespace: &str, name: &str, ip: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                ..PodStatus::default()
            }),
        })
    }

    fn host_network_pod(namespace: &str, name: &str, ip: &str) -> Arc<Pod> {
        let mut pod = (*pod(namespace, name, ip)).clone();
        pod.spec = Some(PodSpec {
            host_network: Some(true),
            ..PodSpec::default()
        });
        Arc::new(pod)
    }

    fn ban_of(
        kind: &str,
        namespace: &str,
        policy: &str,
        source: &str,
        expires: i64,
    ) -> PortSentryBan {
        let mut ban: PortSentryBan = serde_json::from_value(serde_json::json!({
            "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
            "metadata": {"name": "b", "namespace": namespace},
            "spec": {"source": source, "policy": {"kind": kind, "name": policy}},
        }))
        .unwrap();
        ban.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(expires).unwrap(),
        ));
        ban
    }

    fn ban(namespace: &str, policy: &str, source: &str, expires: i64) -> Arc<PortSentryBan> {
        Arc::new(ban_of(
            "PortSentryPolicy",
            namespace,
            policy,
            source,
            expires,
        ))
    }

    fn cluster_ban(namespace: &str, source: &str, confined: Option<&str>) -> Arc<PortSentryBan> {
        let mut ban = ban_of("ClusterPortSentryPolicy", namespace, "edge", source, 2_000);
        if let Some(to) = confined {
            ban.metadata.labels = Some(BTreeMap::from([(
                labels::CONFINED_LABEL.to_owned(),
                to.to_owned(),
            )]));
        }
        Arc::new(ban)
    }

    fn quarantining() -> Quarantining {
        Quarantining {
            namespaced: BTreeSet::from(["shop/web".to_owned()]),
            cluster: BTreeSet::from(["edge".to_owned()]),
            operator_namespace: "portsentry-system".into(),
        }
    }

    fn guards() -> Guards {
        Guards {
            protected_namespaces: BTreeSet::from([
                "kube-system".to_owned(),
                "portsentry-system".to_owned(),
            ]),
            ..Guards::default()
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000).unwrap()
    }

    fn key(namespace: &str, name: &str) -> PodKey {
        (namespace.to_owned(), name.to_owned())
    }

    #[test]
    fn a_pod_banned_by_a_quarantining_policy_of_its_namespace_is_quarantined() {
        let pods = [
            pod("shop", "scanner", "10.244.5.5"),
            pod("shop", "ok", "10.244.5.6"),
        ];
        let bans = [ban("shop", "web", "10.244.5.5", 2_000)];
        let want = desired(&bans, &quarantining(), &guards(), &pods, now());
        assert_eq!(want, BTreeSet::from([key("shop", "scanner")]));
    }

    #[test]
    fn a_namespaced_policy_never_quarantines_a_pod_of_another_namespace() {
        let pods = [
            pod("dev", "scanner", "10.244.5.5"),
            pod("kube-system", "coredns", "10.244.0.3"),
        ];
        let bans = [
            ban("shop", "web", "10.244.5.5", 2_000),
            ban("shop", "web", "10.244.0.3", 2_000),
        ];
        assert!(desired(&bans, &quarantining(), &guards(), &pods, now()).is_empty());
    }

    #[test]
    fn a_prefix_ban_quarantines_nobody() {
        let pods = [pod("shop", "a", "10.244.5.5"), pod("shop", "b", "10.1.2.3")];
        let bans = [ban("shop", "web", "0.0.0.0/0", 2_000)];
        assert!(desired(&bans, &quarantining(), &guards(), &pods, now()).is_empty());
    }

    #[test]
    fn a_cluster_ban_quarantines_in_any_unprotected_namespace() {
        let pods = [
            pod("dev", "scanner", "10.244.5.5"),
            pod("kube-system", "coredns", "10.244.0.3"),
            pod("portsentry-system", "operator", "10.244.0.4"),
            host_network_pod("dev", "agent", "10.0.0.10"),
        ];
        let bans = [
            cluster_ban("portsentry-system", "10.244.5.5", None),
            cluster_ban("portsentry-system", "10.244.0.3", None),
            cluster_ban("portsentry-system", "10.244.0.4", None),
            cluster_ban("portsentry-system", "10.0.0.10", None),
        ];
        assert_eq!(
            desired(&bans, &quarantining(), &guards(), &pods, now()),
            BTreeSet::from([key("dev", "scanner")])
        );
    }

    #[test]
    fn a_confined_cluster_ban_quarantines_only_in_its_namespace() {
        let pods = [
            pod("dev", "scanner", "10.244.5.5"),
            pod("shop", "twin", "10.244.5.5"),
        ];
        let bans = [cluster_ban("portsentry-system", "10.244.5.5", Some("shop"))];
        assert_eq!(
            desired(&bans, &quarantining(), &guards(), &pods, now()),
            BTreeSet::from([key("shop", "twin")])
        );
    }

    #[test]
    fn a_ban_naming_a_cluster_policy_outside_the_operator_namespace_acts_nowhere() {
        let pods = [pod("dev", "scanner", "10.244.5.5")];
        let bans = [cluster_ban("shop", "10.244.5.5", None)];
        assert!(desired(&bans, &quarantining(), &guards(), &pods, now()).is_empty());
    }

    #[test]
    fn an_expired_ban_or_a_policy_without_quarantine_quarantines_nothing() {
        let pods = [pod("shop", "scanner", "10.244.5.5")];
        let expired = [ban("shop", "web", "10.244.5.5", 500)];
        assert!(desired(&expired, &quarantining(), &guards(), &pods, now()).is_empty());
        let other = [ban("shop", "api", "10.244.5.5", 2_000)];
        assert!(desired(&other, &quarantining(), &guards(), &pods, now()).is_empty());
    }

    #[test]
    fn changes_label_the_new_and_release_the_lifted() {
        let key = |n: &str| ("dev".to_owned(), n.to_owned());
        let want = BTreeSet::from([key("a"), key("b")]);
        let labelled = BTreeSet::from([key("b"), key("c")]);
        assert_eq!(changes(&want, &labelled), (vec![key("a")], vec![key("c")]));
    }

    #[test]
    fn the_quarantine_policy_denies_all_egress_of_labelled_pods() {
        let policy = egress_policy("dev");
        let spec = policy.spec.unwrap();
        assert_eq!(spec.policy_types, Some(vec!["Egress".to_owned()]));
        assert_eq!(spec.egress, Some(Vec::new()));
        assert_eq!(
            spec.pod_selector.unwrap().match_labels.unwrap()[QUARANTINE_LABEL],
            "true"
        );
    }
}
