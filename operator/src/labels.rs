//! Every label, annotation, selector and token audience the operator writes or reads, each
//! spelled once: objects are found again by these strings, so a second spelling would lose them.

/// The literal strings that selectors below are built from with `concat!`.
macro_rules! manager {
    () => {
        "portsentry-operator"
    };
}
macro_rules! managed_by {
    () => {
        "app.kubernetes.io/managed-by"
    };
}
macro_rules! component {
    () => {
        "app.kubernetes.io/component"
    };
}
macro_rules! sensor_config {
    () => {
        "sensor-config"
    };
}
macro_rules! sensor {
    () => {
        "portsentry.io/sensor"
    };
}

/// The operator's name: its field manager, the value of [`MANAGED_BY_LABEL`] on what it
/// creates, its event reporter, and the default name of its Lease and Service.
pub const MANAGER: &str = manager!();
/// Label naming what manages an object (value [`MANAGER`] on the operator's objects).
pub const MANAGED_BY_LABEL: &str = managed_by!();
/// Label naming an object's part in the application (`sensor-config`, `node-sensor`).
pub const COMPONENT_LABEL: &str = component!();
/// Label naming the application an object belongs to.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// [`COMPONENT_LABEL`] of sensor ConfigMaps rendered by the operator.
pub const SENSOR_CONFIG_COMPONENT: &str = sensor_config!();
/// Label marking the node-sensor DaemonSet's pods (in the operator's namespace).
pub const NODE_SENSOR_LABEL: (&str, &str) = (COMPONENT_LABEL, NODE_SENSOR_COMPONENT);
/// [`COMPONENT_LABEL`] of the node sensors' objects.
pub const NODE_SENSOR_COMPONENT: &str = "node-sensor";

/// Label naming the namespaced policy a generated NetworkPolicy belongs to (bounded value).
pub const POLICY_LABEL: &str = "portsentry.io/policy";
/// Label naming the cluster policy a node sensor object belongs to (bounded value).
pub const CLUSTER_POLICY_LABEL: &str = "portsentry.io/cluster-policy";
/// Label on a cluster policy's ban written on uncorroborated sidecar evidence: its value, the
/// reporting pod's namespace, is the only place it acts (node sensors skip such bans).
pub const CONFINED_LABEL: &str = portsentry_crds::CONFINED_LABEL;
/// Label (value `true`) on a pod quarantined after its policy banned it.
pub const QUARANTINE_LABEL: &str = "portsentry.io/quarantined";

/// `"false"` as an annotation (or label) of a pod or its template opts it out of injection.
pub const INJECT_ANNOTATION: &str = "portsentry.io/inject";
/// Label set on injected pods (value `injected`; node sensors `node`): what the chart's
/// PodMonitor selects.
pub const SENSOR_LABEL: &str = sensor!();
/// Set on injected pods (value: the governing policy); re-invocation then injects nothing.
pub const INJECTED_ANNOTATION: &str = "portsentry.io/injected";
/// The ConfigMap the sidecar reads its config from (so the operator knows what to render).
pub const CONFIG_MAP_ANNOTATION: &str = "portsentry.io/sensor-config";
/// Decoys left out because a container declares the port: `"80/TCP,53/UDP"`.
pub const SKIPPED_ANNOTATION: &str = "portsentry.io/skipped-decoys";

/// Selector of the pods the webhook injected (node sensors are labelled `=node`).
pub const INJECTED_PODS: &str = concat!(sensor!(), "=injected");
/// Label selector of every sensor ConfigMap the operator renders.
pub const SENSOR_CONFIG_SELECTOR: &str = concat!(
    managed_by!(),
    "=",
    manager!(),
    ",",
    component!(),
    "=",
    sensor_config!()
);

/// Label selector of everything the operator generates (what `cleanup` removes).
pub const GENERATED_SELECTOR: &str = concat!(managed_by!(), "=", manager!());
/// Label selector of the node sensors' DaemonSets, ConfigMaps and pods.
pub const NODE_SENSOR_SELECTOR: &str = concat!(
    managed_by!(),
    "=",
    manager!(),
    ",",
    component!(),
    "=node-sensor"
);

/// Audience of the sensors' projected service account tokens, which the intake's
/// TokenReviews ask the API server to check.
pub const TOKEN_AUDIENCE: &str = "portsentry.io";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_built_from_the_labels_they_select_on() {
        assert_eq!(INJECTED_PODS, format!("{SENSOR_LABEL}=injected"));
        assert_eq!(
            SENSOR_CONFIG_SELECTOR,
            format!("{MANAGED_BY_LABEL}={MANAGER},{COMPONENT_LABEL}={SENSOR_CONFIG_COMPONENT}")
        );
        assert_eq!(GENERATED_SELECTOR, format!("{MANAGED_BY_LABEL}={MANAGER}"));
        assert_eq!(
            NODE_SENSOR_SELECTOR,
            format!("{MANAGED_BY_LABEL}={MANAGER},{COMPONENT_LABEL}={NODE_SENSOR_COMPONENT}")
        );
    }
}
