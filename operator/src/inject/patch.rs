//! The pod as admitted with the sensor, built as a typed `Pod` (annotations, label, sidecar
//! first in init containers, volumes, the unprivileged-port sysctl), and the RFC 6902 patch
//! derived from it with `json_patch::diff`.
//!
//! Both sides of the diff are serialized from k8s-openapi types, so fields of the request the
//! types do not know (none at the pinned API version, `v1_33`) appear on neither side and are
//! left as they are. `json_patch::diff` compares arrays by position: putting the sidecar first
//! rewrites existing init containers one index later, which yields the same pod.

use k8s_openapi::api::core::v1::{Pod, PodSecurityContext, Sysctl};

use super::{decoys::*, governing::*, sidecar::*};
use crate::{
    Result,
    labels::{CONFIG_MAP_ANNOTATION, INJECTED_ANNOTATION, SENSOR_LABEL, SKIPPED_ANNOTATION},
};

/// `pod` with the sensor injected: what the API server stores once the patch is applied.
pub fn injected_pod(
    pod: &Pod,
    governing: &Governing<'_>,
    decoys: &Decoys,
    skipped: &[Skipped],
    config_map: &str,
    settings: &Settings,
) -> Pod {
    let policy = governing.reference();
    let mut injected = pod.clone();
    let annotations = injected.metadata.annotations.get_or_insert_default();
    annotations.insert(INJECTED_ANNOTATION.to_owned(), policy.clone());
    annotations.insert(CONFIG_MAP_ANNOTATION.to_owned(), config_map.to_owned());
    if !skipped.is_empty() {
        annotations.insert(SKIPPED_ANNOTATION.to_owned(), skipped_annotation(skipped));
    }
    injected
        .metadata
        .labels
        .get_or_insert_default()
        .insert(SENSOR_LABEL.to_owned(), "injected".to_owned());
    let spec = injected.spec.get_or_insert_default();
    spec.init_containers
        .get_or_insert_default()
        .insert(0, sidecar(decoys, &policy, settings));
    spec.volumes
        .get_or_insert_default()
        .extend(volumes(config_map, settings));
    if let Some(port) = decoys.lowest_privileged_bind() {
        lower_unprivileged_port_start(spec.security_context.get_or_insert_default(), port);
    }
    injected
}

/// Sets the unprivileged-port sysctl to `port`, unless the pod already sets it lower.
fn lower_unprivileged_port_start(context: &mut PodSecurityContext, port: u16) {
    let sysctls = context.sysctls.get_or_insert_default();
    match sysctls
        .iter_mut()
        .find(|s| s.name == UNPRIVILEGED_PORT_SYSCTL)
    {
        // A value that is no number is no lower bound worth keeping.
        Some(sysctl) => {
            if sysctl.value.trim().parse::<u32>().unwrap_or(u32::MAX) > u32::from(port) {
                sysctl.value = port.to_string();
            }
        }
        None => sysctls.push(Sysctl {
            name: UNPRIVILEGED_PORT_SYSCTL.to_owned(),
            value: port.to_string(),
        }),
    }
}

/// The RFC 6902 patch that turns `original` into `injected`; fails only if either pod does
/// not serialize to JSON.
pub fn patch_between(original: &Pod, injected: &Pod) -> Result<json_patch::Patch> {
    let from = serde_json::to_value(original)?;
    let to = serde_json::to_value(injected)?;
    Ok(json_patch::diff(&from, &to))
}
