//! Policy layers beside NetworkPolicy that an allow-all-except NetworkPolicy could widen:
//! AdminNetworkPolicy/BaselineAdminNetworkPolicy, Cilium and Calico policies.
//!
//! Any NetworkPolicy selecting a pod overrides a BaselineAdminNetworkPolicy for it (and an
//! ANP `Pass` hands the decision to NetworkPolicies); Cilium and Calico add NetworkPolicy
//! allows to their own. So where one of these may select the policy's pods, the NetworkPolicy
//! backend refuses (`OtherPolicyLayers`). [`may_select`] is the pure decision: selectors are
//! evaluated where their language is Kubernetes' (ANP/BANP subjects, Cilium's
//! `endpointSelector` on pod labels); anything else (Calico's selector language, Cilium's
//! namespace pseudo-labels) is assumed to select. [`observe`] reads what the cluster serves.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams},
    core::{PartialObjectMeta, Selector, SelectorExt},
    discovery::{self, Scope},
};
use serde_json::Value;
use tokio::sync::{Mutex, mpsc};

use crate::{Result, policy::selectors::can_select_together};

/// The kinds looked for: (API group, kind).
pub const KINDS: [(&str, &str); 6] = [
    ("policy.networking.k8s.io", "AdminNetworkPolicy"),
    ("policy.networking.k8s.io", "BaselineAdminNetworkPolicy"),
    ("cilium.io", "CiliumNetworkPolicy"),
    ("cilium.io", "CiliumClusterwideNetworkPolicy"),
    ("crd.projectcalico.org", "NetworkPolicy"),
    ("crd.projectcalico.org", "GlobalNetworkPolicy"),
];

/// One object of another policy layer, as far as selection goes.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerObject {
    /// `Kind/name` or `Kind/namespace/name`, as status messages name it.
    pub name: String,
    /// Its namespace, for namespaced kinds (they select only there).
    pub namespace: Option<String>,
    pub selects: Selects,
}

/// What an object's selector says, in the terms this module can evaluate.
#[derive(Clone, Debug, PartialEq)]
pub enum Selects {
    /// Pods by namespace labels and pod labels (ANP/BANP `subject`, Cilium endpoints).
    Pods {
        namespaces: Option<LabelSelector>,
        pods: Option<LabelSelector>,
    },
    /// Not evaluated here: assumed to select every pod it can reach.
    Anything,
}

fn selector(value: &Value) -> Option<LabelSelector> {
    serde_json::from_value(value.clone()).ok()
}

/// Reads `object` of `kind` (one of [`KINDS`]).
pub fn layer_object(kind: &str, object: &DynamicObject) -> LayerObject {
    let namespace = object.namespace();
    let name = match &namespace {
        Some(ns) => format!("{kind}/{ns}/{}", object.name_any()),
        None => format!("{kind}/{}", object.name_any()),
    };
    let spec = &object.data["spec"];
    let selects = match kind {
        "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy" => {
            let subject = &spec["subject"];
            if let Some(namespaces) = subject.get("namespaces") {
                match selector(namespaces) {
                    Some(ns) => Selects::Pods {
                        namespaces: Some(ns),
                        pods: None,
                    },
                    None => Selects::Anything,
                }
            } else if let Some(pods) = subject.get("pods") {
                match (
                    selector(&pods["namespaceSelector"]),
                    selector(&pods["podSelector"]),
                ) {
                    (Some(ns), Some(p)) => Selects::Pods {
                        namespaces: Some(ns),
                        pods: Some(p),
                    },
                    _ => Selects::Anything,
                }
            } else {
                Selects::Anything
            }
        }
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            // Keys naming Cilium's pseudo-labels (namespace labels, reserved identities) are
            // not pod labels: such a selector is assumed to select.
            let plain = spec["endpointSelector"]
                .to_string()
                .split('"')
                .all(|token| !token.contains("io.cilium") && !token.contains("reserved:"));
            match selector(&spec["endpointSelector"]) {
                Some(pods) if plain => Selects::Pods {
                    namespaces: None,
                    pods: Some(strip_source_prefix(pods)),
                },
                _ => Selects::Anything,
            }
        }
        _ => Selects::Anything,
    };
    LayerObject {
        name,
        namespace,
        selects,
    }
}

/// Cilium accepts `k8s:app` for the pod label `app`.
fn strip_source_prefix(mut selector: LabelSelector) -> LabelSelector {
    let strip = |key: &str| key.strip_prefix("k8s:").unwrap_or(key).to_owned();
    if let Some(labels) = selector.match_labels.take() {
        selector.match_labels = Some(labels.into_iter().map(|(k, v)| (strip(&k), v)).collect());
    }
    for expression in selector.match_expressions.iter_mut().flatten() {
        expression.key = strip(&expression.key);
    }
    selector
}

fn matches(selector: &Option<LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels)),
    }
}

/// Whether `object` may select a pod that `pod_selector` selects in namespace `namespace`
/// (labels `namespace_labels`): one that exists or one created later.
pub fn may_select(
    object: &LayerObject,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod_selector: &LabelSelector,
) -> bool {
    if object
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        return false;
    }
    match &object.selects {
        Selects::Anything => true,
        Selects::Pods {
            namespaces,
            pods: theirs,
        } => {
            matches(namespaces, namespace_labels)
                && theirs
                    .as_ref()
                    .is_none_or(|theirs| can_select_together(&[theirs, pod_selector]))
        }
    }
}

/// The names of those of `objects` that may select a pod `pod_selector` selects in
/// `namespace` (see [`may_select`]).
pub fn selecting(
    objects: &[LayerObject],
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    pod_selector: &LabelSelector,
) -> Vec<String> {
    objects
        .iter()
        .filter(|o| may_select(o, namespace, namespace_labels, pod_selector))
        .map(|o| o.name.clone())
        .collect()
}

/// Stands for the objects of a kind the operator may not list: assumed to select.
fn unreadable(resource: &ApiResource, scope: Scope, namespace: &str) -> LayerObject {
    let namespace = matches!(scope, Scope::Namespaced).then(|| namespace.to_owned());
    LayerObject {
        name: format!(
            "{}/* (not readable: grant the operator list on {}.{})",
            resource.kind, resource.plural, resource.group
        ),
        namespace,
        selects: Selects::Anything,
    }
}

/// How long a discovery of the served kinds is trusted: a CRD installed later is seen
/// within this time.
pub const REDISCOVER: Duration = Duration::from_secs(30);

/// The kinds of [`KINDS`] the cluster served at the last discovery.
#[derive(Debug, Default)]
pub struct Served {
    at: Option<Instant>,
    kinds: Vec<(ApiResource, Scope)>,
}

async fn discover(client: &Client) -> Vec<(ApiResource, Scope)> {
    let mut kinds = Vec::new();
    for group_name in [
        "policy.networking.k8s.io",
        "cilium.io",
        "crd.projectcalico.org",
    ] {
        let Ok(group) = discovery::group(client, group_name).await else {
            continue; // not served
        };
        for (resource, capabilities) in group.recommended_resources() {
            if KINDS.contains(&(group_name, resource.kind.as_str())) {
                kinds.push((resource, capabilities.scope));
            }
        }
    }
    kinds
}

/// A served kind as discovery names it (group, version, kind).
fn key(resource: &ApiResource) -> String {
    format!("{}/{}/{}", resource.group, resource.version, resource.kind)
}

/// How long a burst of changes to other layers' objects is gathered into one trigger.
const GATHER: Duration = Duration::from_secs(1);

/// Keeps `served` current (discovery every [`REDISCOVER`]: a CRD installed after the start
/// is seen within it) and watches the objects of every served kind. Yields `()` when the
/// served kinds change or an object of one is created, changed or deleted (a burst within
/// [`GATHER`] yields once): every policy is then reconciled. Stops (and its watches with
/// it) once the stream is dropped.
pub fn changes(
    client: Client,
    served: Arc<Mutex<Served>>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let (sender, receiver) = mpsc::channel::<()>(1);
    tokio::spawn(keep_watching(client, served, sender));
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await?;
        Some(((), receiver))
    })
}

async fn keep_watching(client: Client, served: Arc<Mutex<Served>>, changed: mpsc::Sender<()>) {
    let (touched, mut touches) = mpsc::channel::<()>(1);
    let (defined, mut definitions) = mpsc::channel::<()>(1);
    let crds = tokio::spawn(watch_definitions(client.clone(), defined));
    let mut watching: BTreeMap<String, tokio::task::JoinHandle<()>> = BTreeMap::new();
    while !changed.is_closed() {
        let kinds = discover(&client).await;
        let keys: Vec<String> = kinds.iter().map(|(r, _)| key(r)).collect();
        let different = {
            let mut served = served.lock().await;
            let before: Vec<String> = served.kinds.iter().map(|(r, _)| key(r)).collect();
            served.kinds = kinds.clone();
            served.at = Some(Instant::now());
            before != keys
        };
        watching.retain(|key, task| {
            let keep = keys.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (resource, _) in kinds {
            watching.entry(key(&resource)).or_insert_with(|| {
                tokio::spawn(watch_kind(client.clone(), resource, touched.clone()))
            });
        }
        if different && changed.send(()).await.is_err() {
            break;
        }
        let next_discovery = tokio::time::sleep(REDISCOVER);
        tokio::pin!(next_discovery);
        loop {
            tokio::select! {
                () = &mut next_discovery => break,
                // A CRD of these groups came, changed or went: discover now.
                Some(()) = definitions.recv() => break,
                Some(()) = touches.recv() => {}
            }
            tokio::time::sleep(GATHER).await;
            while touches.try_recv().is_ok() {}
            if changed.send(()).await.is_err() {
                break;
            }
        }
    }
    for task in watching.values() {
        task.abort();
    }
    crds.abort();
}

/// Watches CustomResourceDefinitions (names only) and touches `defined` when one of the
/// groups of [`KINDS`] is defined, changed or removed. Without the right to watch them
/// (a hand-made role), discovery every [`REDISCOVER`] still sees new kinds.
async fn watch_definitions(client: Client, defined: mpsc::Sender<()>) {
    let api: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(client);
    let events = watcher::watcher(api, watcher::Config::default())
        .backoff(crate::watch::WatchBackoff::default());
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let ours = |name: Option<&String>| {
            name.is_some_and(|name| {
                KINDS
                    .iter()
                    .any(|(group, _)| name.ends_with(&format!(".{group}")))
            })
        };
        let touched = match &event {
            Ok(watcher::Event::Apply(crd) | watcher::Event::Delete(crd)) => {
                ours(crd.metadata.name.as_ref())
            }
            _ => false,
        };
        if touched {
            let _ = defined.try_send(());
        }
    }
}

/// Watches every object of `resource`, all namespaces; each change (or error) touches
/// `touched`.
async fn watch_kind(client: Client, resource: ApiResource, touched: mpsc::Sender<()>) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let events = watcher::watcher(api, watcher::Config::default())
        .backoff(crate::watch::WatchBackoff::default());
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        // An error counts too: what cannot be read now must be looked at again (a
        // reconcile that cannot list it fails, and withdraws its generated policies).
        if !matches!(
            event,
            Ok(watcher::Event::Init | watcher::Event::InitApply(_))
        ) {
            // Full: a touch is already pending, which covers this one.
            let _ = touched.try_send(());
        }
    }
}

/// True when the last discovery found any of [`KINDS`] served: a policy is then reconciled
/// at least every [`REDISCOVER`] (the labels of its namespace, which ANP/BANP subjects
/// select by, are not watched).
pub async fn any_served(served: &Mutex<Served>) -> bool {
    !served.lock().await.kinds.is_empty()
}

/// The objects of [`KINDS`] the cluster serves: cluster-scoped ones and those of
/// `namespace`. Served kinds are rediscovered at most every [`REDISCOVER`]; where none is
/// served this reads nothing.
pub async fn observe(
    client: &Client,
    served: &Mutex<Served>,
    namespace: &str,
) -> Result<Vec<LayerObject>> {
    let kinds = {
        let mut served = served.lock().await;
        if served.at.is_none_or(|at| at.elapsed() >= REDISCOVER) {
            served.kinds = discover(client).await;
            served.at = Some(Instant::now());
        }
        served.kinds.clone()
    };
    let mut objects = Vec::new();
    for (resource, scope) in kinds {
        let api: Api<DynamicObject> = match scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        };
        match api.list(&ListParams::default()).await {
            Ok(listed) => objects.extend(
                listed
                    .items
                    .iter()
                    .map(|object| layer_object(&resource.kind, object)),
            ),
            // Its CRD went after discovery: not served any more.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            // Not readable (the chart grants it; a hand-made role may not): what cannot be
            // read may select.
            Err(kube::Error::Api(status)) if status.code == 403 => {
                objects.push(unreadable(&resource, scope, namespace));
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(kind: &str, namespace: Option<&str>, spec: Value) -> LayerObject {
        let mut object = DynamicObject::new(
            "p",
            &ApiResource {
                group: String::new(),
                version: "v1".into(),
                api_version: "v1".into(),
                kind: kind.into(),
                plural: "x".into(),
            },
        );
        object.metadata.namespace = namespace.map(str::to_owned);
        object.data = json!({"spec": spec});
        layer_object(kind, &object)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pods(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        }
    }

    #[test]
    fn a_cilium_policy_selecting_the_pods_counts() {
        let cnp = object(
            "CiliumNetworkPolicy",
            Some("shop"),
            json!({"endpointSelector": {"matchLabels": {"k8s:app": "web"}}}),
        );
        let web = pods(&[("app", "web")]);
        assert!(may_select(&cnp, "shop", &BTreeMap::new(), &web));
        assert!(!may_select(&cnp, "other", &BTreeMap::new(), &web));
        let db = pods(&[("app", "db")]);
        assert!(!may_select(&cnp, "shop", &BTreeMap::new(), &db));
    }

    #[test]
    fn a_cilium_selector_on_namespace_pseudo_labels_is_assumed_to_select() {
        let ccnp = object(
            "CiliumClusterwideNetworkPolicy",
            None,
            json!({"endpointSelector": {"matchLabels": {"k8s:io.cilium.k8s.namespace.labels.team": "a"}}}),
        );
        assert!(may_select(
            &ccnp,
            "shop",
            &BTreeMap::new(),
            &pods(&[("app", "web")])
        ));
    }

    #[test]
    fn an_admin_policy_selects_by_namespace_labels() {
        let anp = object(
            "BaselineAdminNetworkPolicy",
            None,
            json!({"subject": {"namespaces": {"matchLabels": {"tier": "prod"}}}}),
        );
        let web = pods(&[("app", "web")]);
        assert!(may_select(&anp, "shop", &labels(&[("tier", "prod")]), &web));
        assert!(!may_select(&anp, "shop", &labels(&[("tier", "dev")]), &web));
    }

    #[test]
    fn an_admin_policy_selects_by_pod_and_namespace_labels() {
        let anp = object(
            "AdminNetworkPolicy",
            None,
            json!({"subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}}),
        );
        assert!(!may_select(
            &anp,
            "shop",
            &BTreeMap::new(),
            &pods(&[("app", "web")])
        ));
        assert!(may_select(
            &anp,
            "shop",
            &BTreeMap::new(),
            &pods(&[("app", "db")])
        ));
    }

    #[test]
    fn calico_selectors_are_assumed_to_select_in_their_namespace() {
        let calico = object(
            "NetworkPolicy",
            Some("shop"),
            json!({"selector": "app == 'db'"}),
        );
        assert!(may_select(
            &calico,
            "shop",
            &BTreeMap::new(),
            &pods(&[("app", "web")])
        ));
        assert!(!may_select(
            &calico,
            "other",
            &BTreeMap::new(),
            &LabelSelector::default()
        ));
        let global = object("GlobalNetworkPolicy", None, json!({"selector": "all()"}));
        assert!(may_select(
            &global,
            "other",
            &BTreeMap::new(),
            &LabelSelector::default()
        ));
    }

    #[test]
    fn a_layer_that_could_select_a_pod_created_later_counts() {
        let cnp = object(
            "CiliumNetworkPolicy",
            Some("shop"),
            json!({"endpointSelector": {"matchLabels": {"tier": "front"}}}),
        );
        assert!(may_select(
            &cnp,
            "shop",
            &BTreeMap::new(),
            &pods(&[("app", "web")])
        ));
    }
}
