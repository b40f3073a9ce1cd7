//! `portsentry-operator cleanup`, run by the chart's pre-delete hook: stops the operator, then
//! removes what it generated that would otherwise outlive it (its guard gone, nothing expires it).
//!
//! In order: the operator Deployment is scaled to zero and its pods waited for (so nothing is
//! written again behind the cleanup); the node-sensor DaemonSets it made are deleted and their
//! pods waited for (each removes its nftables table as it stops, as the pod-nftables agent does
//! when Helm then deletes it); every NetworkPolicy it generated (ban and quarantine policies)
//! is deleted; every quarantine label is removed. Sidecar ConfigMaps stay: running pods mount
//! them (their sidecars keep detecting locally until the pods are replaced).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{apps::v1::DaemonSet, apps::v1::Deployment, core::v1::ConfigMap};
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use tracing::info;

use crate::{
    Error, Result,
    labels::{GENERATED_SELECTOR, NODE_SENSOR_SELECTOR, QUARANTINE_LABEL},
};

/// What the cleanup acts on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace (its Deployment, node-sensor DaemonSets).
    pub namespace: String,
    /// The operator Deployment's name.
    pub deployment: String,
    /// Whether node sensors are enabled (the chart grants DaemonSet access only then).
    pub node_sensors: bool,
    /// How long to wait for the operator's and node sensors' pods to be gone.
    pub patience: Duration,
}

/// What was removed, by kind (`namespace/name` each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub daemon_sets: Vec<String>,
    pub network_policies: Vec<String>,
    pub quarantine_labels: Vec<String>,
}

/// The merge patch that removes the quarantine label (and nothing else) from a pod.
pub fn unquarantine_patch() -> serde_json::Value {
    json!({"metadata": {"labels": {QUARANTINE_LABEL: null}}})
}

/// The label selector `k=v,...` of a Deployment's `matchLabels` (the chart's Deployment has
/// no `matchExpressions`); an empty selector would match every pod, so it is refused.
pub fn selector_of(match_labels: &BTreeMap<String, String>) -> Result<String> {
    if match_labels.is_empty() {
        return Err(Error::InvalidSelector(
            "the operator Deployment's selector has no matchLabels; refusing to wait on every pod"
                .into(),
        ));
    }
    Ok(match_labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// Runs the cleanup; the first failing step ends it with an error naming it (the hook Job
/// then fails, and `helm uninstall` with it: nothing is half-removed without saying so).
pub async fn run(client: Client, settings: &Settings) -> Result<Removed> {
    stop_operator(&client, settings).await?;
    let mut removed = Removed::default();
    if settings.node_sensors {
        removed.daemon_sets = remove_node_sensors(&client, settings).await?;
    }
    removed.network_policies = remove_network_policies(&client).await?;
    removed.quarantine_labels = remove_quarantine_labels(&client).await?;
    Ok(removed)
}

/// Scales the operator to zero and waits until none of its pods is left.
async fn stop_operator(client: &Client, settings: &Settings) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &settings.namespace);
    let Some(deployment) = deployments.get_opt(&settings.deployment).await? else {
        info!(deployment = %settings.deployment, "operator Deployment already gone");
        return Ok(());
    };
    let match_labels = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.selector.match_labels.clone())
        .unwrap_or_default();
    let selector = selector_of(&match_labels)?;
    deployments
        .patch_scale(
            &settings.deployment,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .map_err(Error::write(
            "Deployment scale",
            format!("{}/{}", settings.namespace, settings.deployment),
        ))?;
    info!(deployment = %settings.deployment, "operator scaled to zero; waiting for its pods to stop");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    wait_gone(&pods, &selector, "the operator's pods", settings.patience).await
}

/// Deletes the operator's node-sensor DaemonSets and ConfigMaps and waits for their pods.
async fn remove_node_sensors(client: &Client, settings: &Settings) -> Result<Vec<String>> {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), &settings.namespace);
    let list = daemon_sets
        .list(&ListParams::default().labels(NODE_SENSOR_SELECTOR))
        .await?;
    let mut removed = Vec::new();
    for daemon_set in list.items {
        let name = daemon_set.name_any();
        delete(&daemon_sets, "DaemonSet", &settings.namespace, &name).await?;
        removed.push(format!("{}/{name}", settings.namespace));
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.namespace);
    for config_map in config_maps
        .list(&ListParams::default().labels(NODE_SENSOR_SELECTOR))
        .await?
        .items
    {
        delete(
            &config_maps,
            "ConfigMap",
            &settings.namespace,
            &config_map.name_any(),
        )
        .await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.namespace);
    wait_gone(
        &pods,
        NODE_SENSOR_SELECTOR,
        "the node sensors' pods",
        settings.patience,
    )
    .await?;
    Ok(removed)
}

/// Deletes every generated NetworkPolicy (ban and quarantine policies) in every namespace.
async fn remove_network_policies(client: &Client) -> Result<Vec<String>> {
    let all: Api<NetworkPolicy> = Api::all(client.clone());
    let mut removed = Vec::new();
    for policy in all
        .list(&ListParams::default().labels(GENERATED_SELECTOR))
        .await?
        .items
    {
        let (namespace, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
        let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
        delete(&api, "NetworkPolicy", &namespace, &name).await?;
        removed.push(format!("{namespace}/{name}"));
    }
    Ok(removed)
}

/// Removes the quarantine label from every pod that has it.
async fn remove_quarantine_labels(client: &Client) -> Result<Vec<String>> {
    let all: Api<Pod> = Api::all(client.clone());
    let mut removed = Vec::new();
    for pod in all
        .list(&ListParams::default().labels(QUARANTINE_LABEL))
        .await?
        .items
    {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(unquarantine_patch()),
            )
            .await
        {
            Ok(_) => removed.push(format!("{namespace}/{name}")),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(Error::write("Pod", format!("{namespace}/{name}"))(source));
            }
        }
    }
    Ok(removed)
}

/// Deletes `name`; already gone is not an error.
async fn delete<K>(api: &Api<K>, kind: &'static str, namespace: &str, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::write(kind, format!("{namespace}/{name}"))(source)),
    }
}

/// Waits until no pod matches `selector`, checking every half second, at most `patience`.
async fn wait_gone(
    pods: &Api<Pod>,
    selector: &str,
    what: &'static str,
    patience: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let left = pods.list(&ListParams::default().labels(selector)).await?;
        if left.items.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::NotGone {
                what,
                left: left.items.iter().map(ResourceExt::name_any).collect(),
                waited: patience,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_unquarantine_patch_removes_only_the_quarantine_label() {
        assert_eq!(
            unquarantine_patch(),
            json!({"metadata": {"labels": {"portsentry.io/quarantined": null}}})
        );
    }

    #[test]
    fn the_operator_pods_are_found_by_its_deployment_selector() {
        let labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "portsentry".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "ps".to_owned()),
        ]);
        assert_eq!(
            selector_of(&labels).unwrap(),
            "app.kubernetes.io/instance=ps,app.kubernetes.io/name=portsentry"
        );
    }

    #[test]
    fn an_empty_deployment_selector_is_refused_rather_than_waiting_on_every_pod() {
        assert!(matches!(
            selector_of(&BTreeMap::new()),
            Err(Error::InvalidSelector(_))
        ));
    }
}
