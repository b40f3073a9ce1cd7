//! The kubelet's part for an injected pod, on a control plane without one: the status it
//! writes for the pod once it runs the sensor sidecar. Shared by the injection suites
//! (`mod kubelet;`); a folder's `mod.rs` is not a test target of its own.

use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use portsentry_operator::inject;
use serde_json::json;

/// Writes pod `namespace/name`'s status as the kubelet does while its injected sidecar runs:
/// phase `Running` and the sidecar's `initContainerStatuses` entry, `ready` and `started`
/// set to `probe_passed` (a native sidecar is both once its startup probe passes).
pub async fn report_sidecar(client: &Client, namespace: &str, name: &str, probe_passed: bool) {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod = pods.get(name).await.unwrap();
    let image = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .find(|c| c.name == inject::SIDECAR_NAME)
        .and_then(|c| c.image.clone())
        .unwrap();
    let status = json!({
        "status": {
            "phase": "Running",
            "initContainerStatuses": [{
                "name": inject::SIDECAR_NAME,
                "image": image,
                "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
                "ready": probe_passed,
                "restartCount": 0,
                "started": probe_passed,
                "state": {"running": {"startedAt": Time(Timestamp::now())}},
            }],
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}
