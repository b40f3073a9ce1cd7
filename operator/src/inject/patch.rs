//! The RFC 6902 patch that adds the sidecar to a pod: annotations, label, init container,
//! volumes and, for decoys below 1024, the unprivileged-port sysctl.

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::{decoys::*, governing::*, sidecar::*};
use crate::labels::{CONFIG_MAP_ANNOTATION, INJECTED_ANNOTATION, SENSOR_LABEL, SKIPPED_ANNOTATION};

/// JSON Pointer escaping of one reference token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The RFC 6902 patch that injects the sensor into `pod`.
pub fn build_patch(
    pod: &Pod,
    governing: &Governing<'_>,
    decoys: &Decoys,
    skipped: &[Skipped],
    config_map: &str,
    settings: &Settings,
) -> json_patch::Patch {
    let policy = governing.reference();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops: Vec<Value> = Vec::new();
    let mut annotations = vec![
        (INJECTED_ANNOTATION, policy.clone()),
        (CONFIG_MAP_ANNOTATION, config_map.to_owned()),
    ];
    if !skipped.is_empty() {
        annotations.push((SKIPPED_ANNOTATION, skipped_annotation(skipped)));
    }
    if pod.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
    }
    for (key, value) in annotations {
        ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(key)), "value": value}));
    }
    if pod.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {}}));
    }
    ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", escape(SENSOR_LABEL)), "value": "injected"}));
    let container = to_value(&sidecar(decoys, &policy, settings));
    if spec.init_containers.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}));
    }
    let volumes: Vec<Value> = volumes(config_map, settings).iter().map(to_value).collect();
    if spec.volumes.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    } else {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    }
    if let Some(port) = decoys.lowest_privileged_bind() {
        let sysctl = json!({"name": UNPRIVILEGED_PORT_SYSCTL, "value": port.to_string()});
        match spec.security_context.as_ref().map(|c| c.sysctls.as_ref()) {
            None => ops.push(json!({"op": "add", "path": "/spec/securityContext", "value": {"sysctls": [sysctl]}})),
            Some(None) => ops.push(json!({"op": "add", "path": "/spec/securityContext/sysctls", "value": [sysctl]})),
            Some(Some(sysctls)) => match sysctls
                .iter()
                .position(|s| s.name == UNPRIVILEGED_PORT_SYSCTL)
            {
                None => ops.push(json!({"op": "add", "path": "/spec/securityContext/sysctls/-", "value": sysctl})),
                Some(index) => {
                    let current = sysctls[index].value.trim().parse::<u32>().unwrap_or(u32::MAX);
                    if current > u32::from(port) {
                        ops.push(json!({"op": "replace", "path": format!("/spec/securityContext/sysctls/{index}/value"), "value": port.to_string()}));
                    }
                }
            },
        }
    }
    serde_json::from_value(Value::Array(ops)).unwrap_or_else(|_| json_patch::Patch(Vec::new()))
}
