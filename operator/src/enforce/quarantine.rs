//! Quarantine: a pod of the cluster banned by a policy with `quarantine: true` is labelled
//! and its egress denied by a generated NetworkPolicy in its namespace, undone at expiry.
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
use portsentry_crds::{PolicyKind, PortSentryBan, PortSentryPolicy};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    Result,
    enforce::bans,
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

/// The pods that must be quarantined at `now`: those with an address inside an active ban
/// of a policy that asks for quarantine (`quarantining` holds "namespace/name" of such
/// namespaced policies).
pub fn desired(
    bans: &[Arc<PortSentryBan>],
    quarantining: &BTreeSet<String>,
    pods: &[Arc<Pod>],
    now: Timestamp,
) -> BTreeSet<PodKey> {
    let banned: Vec<_> = bans
        .iter()
        .filter(|b| b.spec.policy.kind == PolicyKind::PortSentryPolicy)
        .filter(|b| {
            quarantining.contains(&format!(
                "{}/{}",
                b.namespace().unwrap_or_default(),
                b.spec.policy.name
            ))
        })
        .filter(|b| bans::is_active(&b.spec, now))
        .map(|b| b.spec.source.network())
        .collect();
    pods.iter()
        .filter(|pod| {
            pod_addresses(pod)
                .iter()
                .any(|a| banned.iter().any(|net| net.contains(&a.to_canonical())))
        })
        .filter_map(|pod| Some((pod.namespace()?, pod.name_any())))
        .collect()
}

fn pod_addresses(pod: &Pod) -> Vec<IpAddr> {
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
pub async fn run(client: Client, shared: Watches) {
    let changed = Arc::new(Notify::new());
    let policies = store::<PortSentryPolicy>(&client, changed.clone());
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
    let (bans, pods) = (shared.bans.store(), shared.pods.store());
    let passes = async {
        loop {
            if let Err(error) = pass(&client, &bans, &policies.0, &pods).await {
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
    policies: &Store<PortSentryPolicy>,
    pods: &Store<Pod>,
) -> Result<()> {
    let quarantining: BTreeSet<String> = policies
        .state()
        .iter()
        .filter(|p| p.spec.rules.response.quarantine)
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    let pods_now = pods.state();
    let want = desired(&bans.state(), &quarantining, &pods_now, Timestamp::now());
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
    use k8s_openapi::api::core::v1::PodStatus;

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

    fn ban(namespace: &str, policy: &str, source: &str, expires: i64) -> Arc<PortSentryBan> {
        let mut ban: PortSentryBan = serde_json::from_value(serde_json::json!({
            "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
            "metadata": {"name": "b", "namespace": namespace},
            "spec": {"source": source, "policy": {"kind": "PortSentryPolicy", "name": policy}},
        }))
        .unwrap();
        ban.spec.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(expires).unwrap(),
        ));
        Arc::new(ban)
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000).unwrap()
    }

    #[test]
    fn a_pod_banned_by_a_quarantining_policy_is_quarantined() {
        let quarantining = BTreeSet::from(["shop/web".to_owned()]);
        let pods = [
            pod("dev", "scanner", "10.244.5.5"),
            pod("dev", "ok", "10.244.5.6"),
        ];
        let bans = [ban("shop", "web", "10.244.5.5", 2_000)];
        let want = desired(&bans, &quarantining, &pods, now());
        assert_eq!(
            want,
            BTreeSet::from([("dev".to_owned(), "scanner".to_owned())])
        );
    }

    #[test]
    fn an_expired_ban_or_a_policy_without_quarantine_quarantines_nothing() {
        let pods = [pod("dev", "scanner", "10.244.5.5")];
        let quarantining = BTreeSet::from(["shop/web".to_owned()]);
        let expired = [ban("shop", "web", "10.244.5.5", 500)];
        assert!(desired(&expired, &quarantining, &pods, now()).is_empty());
        let other = [ban("shop", "api", "10.244.5.5", 2_000)];
        assert!(desired(&other, &quarantining, &pods, now()).is_empty());
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
