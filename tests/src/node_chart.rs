//! The chart on the test node: the operator and sensor images of tests/build-images imported
//! into the node's containerd, and `helm install` of charts/portsentry with them, Ready.

use std::{env, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use futures::FutureExt;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use portsentry_operator::labels::SENSOR_LABEL;

use crate::{
    Node,
    binaries::repo_root,
    wait::{wait_for, wait_value},
};

/// What to do when an image archive is missing; such errors end with it.
pub const IMAGES_HINT: &str = "run `sudo tests/build-images` (host-built release binaries, \
~2 min warm) or `sudo tests/build-images --from-source` (what tests/run does); they write \
target/images/portsentry-{operator,sensor}.tar (under $CARGO_TARGET_DIR when it is set; \
PORTSENTRY_IMAGES_DIR points elsewhere)";

/// The release's name and namespace.
pub const RELEASE: &str = "portsentry";
pub const RELEASE_NAMESPACE: &str = "portsentry-system";
/// The operator's Deployment and Service (the chart's `<fullname>-operator`).
pub const OPERATOR: &str = "portsentry-operator";

/// Where tests/build-images wrote its archives: `$PORTSENTRY_IMAGES_DIR`, else
/// `$CARGO_TARGET_DIR/images`, else `target/images` of the repository.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = env::var_os("PORTSENTRY_IMAGES_DIR") {
        return dir.into();
    }
    env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from)
        .join("images")
}

/// The archives of both images, each checked to exist.
pub fn image_archives() -> Result<[PathBuf; 2]> {
    let dir = images_dir();
    let archives =
        ["portsentry-operator", "portsentry-sensor"].map(|name| dir.join(format!("{name}.tar")));
    for archive in &archives {
        if !archive.is_file() {
            bail!("{} is missing: {IMAGES_HINT}", archive.display());
        }
    }
    Ok(archives)
}

/// Imports both images into the node and installs the chart with them (one operator
/// replica, images never pulled), then waits until the operator Deployment is available:
/// the kubelet's readiness probe on `/readyz` passed. `extra` are more `--set` values.
pub async fn install_chart(node: &Node, extra: &[&str]) -> Result<()> {
    for archive in image_archives()? {
        node.import_image(&archive)?;
    }
    let plane = node.control_plane();
    let mut helm = plane.helm()?;
    helm.args(["install", RELEASE])
        .arg(repo_root().join("charts/portsentry"))
        .args(["--namespace", RELEASE_NAMESPACE, "--create-namespace"]);
    for set in [
        "operator.replicas=1",
        "operator.logJson=false",
        "operator.image.pullPolicy=Never",
        "sensor.image.pullPolicy=Never",
    ]
    .iter()
    .chain(extra)
    {
        helm.args(["--set", set]);
    }
    let output = helm.output().context("running helm install")?;
    if !output.status.success() {
        bail!(
            "helm install failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(plane.client()?, RELEASE_NAMESPACE);
    wait_for(
        Duration::from_secs(120),
        "the operator Deployment available (its /readyz probe passed)",
        move || {
            let deployments = deployments.clone();
            async move {
                let status = deployments.get(OPERATOR).await?.status.unwrap_or_default();
                Ok(status.available_replicas == Some(1) && status.ready_replicas == Some(1))
            }
            .boxed()
        },
    )
    .await
    .map_err(|err| err.context(node.log_tails(20)))
}

/// The first Ready pod matching `selector` that the webhook injected, within `timeout`. A pod
/// admitted while the API server could not yet reach the webhook (its failurePolicy is
/// Ignore: admitted without a sensor) is deleted, so that its controller makes one that the
/// webhook injects.
pub async fn injected_ready_pod(pods: &Api<Pod>, selector: &str, timeout: Duration) -> Result<Pod> {
    wait_value(timeout, "an injected pod Ready", || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .ok()?;
            for pod in &list.items {
                if !is_injected(pod) && pod.metadata.deletion_timestamp.is_none() {
                    let _ = pods.delete(&pod.name_any(), &DeleteParams::default()).await;
                }
            }
            list.items.into_iter().find(|pod| {
                is_injected(pod)
                    && pod.metadata.deletion_timestamp.is_none()
                    && pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        }
    })
    .await
}

fn is_injected(pod: &Pod) -> bool {
    pod.labels().get(SENSOR_LABEL).map(String::as_str) == Some("injected")
}
