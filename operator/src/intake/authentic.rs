//! Whether a reporting pod runs the sensor as the operator injected it (pure): the sensor
//! container, its image, arguments and environment, and who else mounts a report token.
//!
//! A `portsentry.io` token proves only which pod asked for it, and any pod may ask. So a
//! report counts only when the pod's one holder of such a token is the injected sensor (or,
//! in the operator's namespace, the node-sensor DaemonSet's container).

use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Volume, VolumeMount};

use crate::{
    cluster::nodes,
    inject::{self, CONFIG_DIR, REPORT_CA_KEY, SIDECAR_NAME, TOKEN_DIR},
    labels::TOKEN_AUDIENCE,
};

/// What an injected sensor looks like, from the operator's own settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The sidecar's image (`repo:tag` or `repo@sha256:...`).
    pub image: String,
    /// The node sensors' image.
    pub node_image: String,
    /// The operator's namespace (node sensors run there, `--watch-bans` names it).
    pub operator_namespace: String,
}

impl Expected {
    /// The expectation matching sidecars built with `settings` and node sensors built with
    /// `node_image` (empty: the sidecar's image).
    pub fn new(settings: &inject::Settings, node_image: &str) -> Self {
        Self {
            image: settings.image.clone(),
            node_image: if node_image.trim().is_empty() {
                settings.image.clone()
            } else {
                node_image.to_owned()
            },
            operator_namespace: settings.operator_namespace.clone(),
        }
    }
}

/// Why a pod is not a sensor the operator injected (the 403's precise reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forgery {
    /// No container named like the sensor.
    NoSensor,
    /// The sensor container runs another image.
    WrongImage { found: String },
    /// The sensor's image digest is not the configured one.
    WrongDigest { found: String },
    /// The sensor's command was replaced.
    Command,
    /// An argument the operator never injects.
    Argument(String),
    /// An environment variable the operator never injects.
    Environment(String),
    /// The sensor container does not mount the report token at its place.
    TokenNotInSensor,
    /// Another container mounts a token of the `portsentry.io` audience.
    TokenInOtherContainer(String),
    /// A pod of the operator's namespace that its node-sensor DaemonSet does not own.
    NotTheDaemonSet,
}

impl fmt::Display for Forgery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forgery::NoSensor => write!(f, "the pod runs no {SIDECAR_NAME} container"),
            Forgery::WrongImage { found } => {
                write!(
                    f,
                    "the sensor container runs image {found}, not the configured sensor image"
                )
            }
            Forgery::WrongDigest { found } => {
                write!(
                    f,
                    "the sensor container's image is {found}, not the configured digest"
                )
            }
            Forgery::Command => write!(f, "the sensor container's command is not the image's"),
            Forgery::Argument(arg) => {
                write!(
                    f,
                    "the sensor container has an argument the operator never injects: {arg}"
                )
            }
            Forgery::Environment(name) => write!(
                f,
                "the sensor container has an environment variable the operator never injects: {name}"
            ),
            Forgery::TokenNotInSensor => write!(
                f,
                "the sensor container does not mount the {TOKEN_AUDIENCE} token at {TOKEN_DIR}"
            ),
            Forgery::TokenInOtherContainer(name) => write!(
                f,
                "container {name} mounts a token of audience {TOKEN_AUDIENCE}: only the sensor may"
            ),
            Forgery::NotTheDaemonSet => {
                write!(
                    f,
                    "the pod is not owned by a node-sensor DaemonSet of the operator"
                )
            }
        }
    }
}

/// Environment variables the operator injects into sensors.
const INJECTED_ENV: [&str; 4] = ["POD_NAME", "POD_NAMESPACE", "POD_IP", "NODE_NAME"];
/// Flags without a value the operator injects (decoy modes).
const MODE_FLAGS: [&str; 6] = ["--tcp", "--udp", "--stcp", "--sudp", "--atcp", "--audp"];

/// Checks the sensor's arguments against what [`inject::sensor_args`], [`inject::report_args`]
/// and (for node sensors) `cluster::nodes::args` produce. The report URL is not compared (a
/// report that arrived was sent here; replicas in tests listen on different ones); the CA the
/// sensor trusts must be the config volume's, so its token goes only to the operator's intake.
fn check_args(args: &[String], expected: &Expected, node: bool) -> Result<(), Forgery> {
    let config = format!("{CONFIG_DIR}/portsentry.conf");
    let token = format!("{TOKEN_DIR}/token");
    let ca = format!("{CONFIG_DIR}/{REPORT_CA_KEY}");
    let mut seen_url = false;
    let mut words = args.iter();
    while let Some(flag) = words.next() {
        if MODE_FLAGS.contains(&flag.as_str()) {
            continue;
        }
        let bad = || Forgery::Argument(crate::names::bounded(flag, 100));
        let fixed: Option<&str> = match flag.as_str() {
            "--config" => Some(&config),
            "--log-format" => Some("json"),
            "--report-token-file" => Some(&token),
            "--report-ca-file" => Some(&ca),
            "--watch-bans" if node => Some(&expected.operator_namespace),
            "--metrics-addr" | "--report-policy" | "--report-url" => None,
            "--watch-bans-policy" | "--watch-bans-table" | "--watch-bans-resync-secs" if node => {
                None
            }
            _ => return Err(bad()),
        };
        let value = words.next().ok_or_else(bad)?;
        if fixed.is_some_and(|want| want != value) {
            return Err(Forgery::Argument(crate::names::bounded(
                &format!("{flag} {value}"),
                200,
            )));
        }
        seen_url |= flag == "--report-url";
    }
    if seen_url {
        Ok(())
    } else {
        Err(Forgery::Argument("no --report-url".into()))
    }
}

fn check_image(container: &Container, want: &str, pod: &Pod) -> Result<(), Forgery> {
    let found = container.image.clone().unwrap_or_default();
    if found != want {
        return Err(Forgery::WrongImage { found });
    }
    // With a configured digest, the image the kubelet ran (when it says) must carry it.
    if let Some((_, digest)) = want.split_once('@') {
        let ran = pod
            .status
            .as_ref()
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .find(|s| s.name == container.name)
            .map(|s| s.image_id.clone())
            .filter(|id| !id.is_empty());
        if let Some(id) = ran.filter(|id| !id.ends_with(digest)) {
            return Err(Forgery::WrongDigest { found: id });
        }
    }
    Ok(())
}

/// Names of the pod's volumes that project a token of the `portsentry.io` audience.
fn token_volumes(spec: &PodSpec) -> Vec<&str> {
    let projects = |v: &Volume| {
        v.projected.as_ref().is_some_and(|p| {
            p.sources.iter().flatten().any(|s| {
                s.service_account_token
                    .as_ref()
                    .is_some_and(|t| t.audience.as_deref() == Some(TOKEN_AUDIENCE))
            })
        })
    };
    spec.volumes
        .iter()
        .flatten()
        .filter(|v| projects(v))
        .map(|v| v.name.as_str())
        .collect()
}

/// Every container of the pod (init, regular, ephemeral) with its mounts.
fn all_mounts(spec: &PodSpec) -> Vec<(&str, &[VolumeMount])> {
    fn of(c: &Container) -> (&str, &[VolumeMount]) {
        (
            c.name.as_str(),
            c.volume_mounts.as_deref().unwrap_or_default(),
        )
    }
    spec.init_containers
        .iter()
        .flatten()
        .map(of)
        .chain(spec.containers.iter().map(of))
        .chain(spec.ephemeral_containers.iter().flatten().map(|c| {
            (
                c.name.as_str(),
                c.volume_mounts.as_deref().unwrap_or_default(),
            )
        }))
        .collect()
}

fn check_container(
    pod: &Pod,
    spec: &PodSpec,
    sensor: &Container,
    image: &str,
    expected: &Expected,
    node: bool,
) -> Result<(), Forgery> {
    check_image(sensor, image, pod)?;
    let config_from_config_map = sensor.volume_mounts.iter().flatten().any(|m| {
        m.mount_path == CONFIG_DIR
            && spec
                .volumes
                .iter()
                .flatten()
                .any(|v| v.name == m.name && v.config_map.is_some())
    });
    if !config_from_config_map {
        return Err(Forgery::Argument(format!(
            "{CONFIG_DIR} is not mounted from a ConfigMap"
        )));
    }
    if sensor.command.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(Forgery::Command);
    }
    check_args(sensor.args.as_deref().unwrap_or_default(), expected, node)?;
    if sensor.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(Forgery::Environment("envFrom".into()));
    }
    if let Some(env) = sensor
        .env
        .iter()
        .flatten()
        .find(|e| !INJECTED_ENV.contains(&e.name.as_str()))
    {
        return Err(Forgery::Environment(crate::names::bounded(&env.name, 100)));
    }
    let tokens = token_volumes(spec);
    let mounts_token =
        |mounts: &[VolumeMount]| mounts.iter().any(|m| tokens.contains(&m.name.as_str()));
    if let Some((name, _)) = all_mounts(spec)
        .into_iter()
        .find(|(name, mounts)| *name != sensor.name && mounts_token(mounts))
    {
        return Err(Forgery::TokenInOtherContainer(crate::names::bounded(
            name, 100,
        )));
    }
    let at_place = sensor.volume_mounts.iter().flatten().any(|m| {
        tokens.contains(&m.name.as_str()) && m.mount_path == TOKEN_DIR && m.sub_path.is_none()
    });
    if at_place {
        Ok(())
    } else {
        Err(Forgery::TokenNotInSensor)
    }
}

/// Checks that `pod` runs the sensor sidecar as injected: the `portsentry-sensor` container
/// (native sidecar or regular) with the configured image, no command, only injected
/// arguments and environment, the token mounted at its place; and no other container
/// mounting a `portsentry.io` token.
pub fn check_sidecar(pod: &Pod, expected: &Expected) -> Result<(), Forgery> {
    let spec = pod.spec.as_ref().ok_or(Forgery::NoSensor)?;
    let sensor = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == SIDECAR_NAME)
        .ok_or(Forgery::NoSensor)?;
    check_container(pod, spec, sensor, &expected.image, expected, false)
}

/// Checks that `pod` is a node sensor of the operator: owned by a node-sensor DaemonSet
/// (by name) and running its container as built, with nothing else holding the token.
pub fn check_node_sensor(pod: &Pod, expected: &Expected) -> Result<(), Forgery> {
    let owned = pod.metadata.owner_references.iter().flatten().any(|o| {
        o.kind == "DaemonSet"
            && o.api_version == "apps/v1"
            && o.controller == Some(true)
            && o.name.starts_with(&nodes::object_name(""))
    });
    if !owned {
        return Err(Forgery::NotTheDaemonSet);
    }
    let spec = pod.spec.as_ref().ok_or(Forgery::NoSensor)?;
    let sensor = spec
        .containers
        .iter()
        .find(|c| c.name == nodes::CONTAINER_NAME)
        .ok_or(Forgery::NoSensor)?;
    check_container(pod, spec, sensor, &expected.node_image, expected, true)
}

/// Pods as the operator builds them, for this module's and the intake's tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeSet;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use portsentry_crds::{ClusterPortSentryPolicy, PolicyRules};

    use super::*;

    pub fn settings() -> inject::Settings {
        inject::Settings {
            image: "registry.example/portsentry-sensor:1".into(),
            report_url: "https://portsentry-operator.portsentry-system.svc:8443/v1/reports".into(),
            ..inject::Settings::default()
        }
    }

    pub fn expected() -> Expected {
        Expected::new(&settings(), "")
    }

    /// A pod as the webhook injects it: sidecar, config and token volumes, one app container.
    pub fn injected() -> Pod {
        let settings = settings();
        let (decoys, _) = inject::decoys_for(
            &PolicyRules::default(),
            &BTreeSet::new(),
            inject::SENSOR_METRICS_PORT,
        );
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                init_containers: Some(vec![inject::sidecar(
                    &decoys,
                    "PortSentryPolicy/web",
                    &settings,
                )]),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("registry.example/app:1".into()),
                    ..Container::default()
                }],
                volumes: Some(inject::volumes("portsentry-web", &settings)),
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    pub fn node_pod(owned: bool) -> Pod {
        let policy: ClusterPortSentryPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "portsentry.io/v1alpha1", "kind": "ClusterPortSentryPolicy",
            "metadata": {"name": "edge", "uid": "u1"},
            "spec": {"nodeSelector": {"edge": "true"}, "decoys": {"tcp": [31337]},
                     "enforcement": {"backends": ["NodeNftables"]}},
        }))
        .unwrap();
        let settings = settings();
        let node_settings = nodes::NodeSensorSettings::default();
        let target = nodes::Target {
            namespace: "portsentry-system",
            sidecar: &settings,
            nodes: &node_settings,
            report_ca_pem: None,
        };
        let daemon_set = nodes::build_daemon_set(&policy, &target).unwrap().unwrap();
        let template = daemon_set.spec.unwrap().template;
        Pod {
            metadata: ObjectMeta {
                namespace: Some("portsentry-system".into()),
                owner_references: owned.then(|| {
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "DaemonSet".into(),
                        name: nodes::object_name("edge"),
                        uid: "ds".into(),
                        controller: Some(true),
                        block_owner_deletion: None,
                    }]
                }),
                ..template.metadata.unwrap_or_default()
            },
            spec: template.spec,
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ContainerStatus, EphemeralContainer, PodStatus, ProjectedVolumeSource,
        ServiceAccountTokenProjection, VolumeProjection,
    };

    use super::{fixtures::*, *};

    fn spec(pod: &mut Pod) -> &mut PodSpec {
        pod.spec.as_mut().unwrap()
    }

    fn sensor(pod: &mut Pod) -> &mut Container {
        &mut spec(pod).init_containers.as_mut().unwrap()[0]
    }

    fn token_mount(name: &str) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: "/stolen".into(),
            ..VolumeMount::default()
        }
    }

    #[test]
    fn an_injected_sidecar_is_authentic() {
        assert_eq!(check_sidecar(&injected(), &expected()), Ok(()));
    }

    #[test]
    fn a_pod_without_the_sensor_is_refused() {
        let mut pod = injected();
        spec(&mut pod).init_containers = None;
        assert_eq!(check_sidecar(&pod, &expected()), Err(Forgery::NoSensor));
    }

    #[test]
    fn a_sensor_of_another_image_is_refused() {
        let mut pod = injected();
        sensor(&mut pod).image = Some("evil.example/portsentry-sensor:1".into());
        assert!(matches!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::WrongImage { .. })
        ));
    }

    #[test]
    fn with_a_configured_digest_the_image_the_kubelet_ran_must_carry_it() {
        let mut settings = settings();
        settings.image = "registry.example/portsentry-sensor@sha256:aaaa".into();
        let expected = Expected::new(&settings, "");
        let mut pod = injected();
        sensor(&mut pod).image = Some(settings.image.clone());
        assert_eq!(check_sidecar(&pod, &expected), Ok(()));
        pod.status = Some(PodStatus {
            init_container_statuses: Some(vec![ContainerStatus {
                name: SIDECAR_NAME.into(),
                image_id: "registry.example/portsentry-sensor@sha256:bbbb".into(),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        assert!(matches!(
            check_sidecar(&pod, &expected),
            Err(Forgery::WrongDigest { .. })
        ));
    }

    #[test]
    fn a_replaced_command_or_an_extra_argument_is_refused() {
        let mut pod = injected();
        sensor(&mut pod).command = Some(vec!["/bin/sh".into()]);
        assert_eq!(check_sidecar(&pod, &expected()), Err(Forgery::Command));
        let mut pod = injected();
        sensor(&mut pod)
            .args
            .as_mut()
            .unwrap()
            .extend(["--ignore-file".into(), "/tmp/x".into()]);
        assert!(matches!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::Argument(_))
        ));
    }

    #[test]
    fn an_extra_environment_variable_is_refused() {
        let mut pod = injected();
        sensor(&mut pod)
            .env
            .as_mut()
            .unwrap()
            .push(k8s_openapi::api::core::v1::EnvVar {
                name: "LD_PRELOAD".into(),
                ..Default::default()
            });
        assert_eq!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::Environment("LD_PRELOAD".into()))
        );
    }

    #[test]
    fn a_second_container_mounting_the_token_is_refused() {
        let mut pod = injected();
        spec(&mut pod).containers[0].volume_mounts = Some(vec![token_mount(inject::TOKEN_VOLUME)]);
        assert_eq!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::TokenInOtherContainer("app".into()))
        );
    }

    #[test]
    fn a_second_token_volume_of_the_audience_in_another_container_is_refused() {
        let mut pod = injected();
        spec(&mut pod).volumes.as_mut().unwrap().push(Volume {
            name: "mine".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.into()),
                        expiration_seconds: None,
                        path: "token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: None,
            }),
            ..Volume::default()
        });
        spec(&mut pod).ephemeral_containers = Some(vec![EphemeralContainer {
            name: "debug".into(),
            volume_mounts: Some(vec![token_mount("mine")]),
            ..EphemeralContainer::default()
        }]);
        assert_eq!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::TokenInOtherContainer("debug".into()))
        );
    }

    #[test]
    fn a_sensor_without_the_token_at_its_place_is_refused() {
        let mut pod = injected();
        sensor(&mut pod)
            .volume_mounts
            .as_mut()
            .unwrap()
            .retain(|m| m.name != inject::TOKEN_VOLUME);
        assert_eq!(
            check_sidecar(&pod, &expected()),
            Err(Forgery::TokenNotInSensor)
        );
    }

    #[test]
    fn a_node_sensor_of_the_daemon_set_is_authentic() {
        assert_eq!(check_node_sensor(&node_pod(true), &expected()), Ok(()));
    }

    #[test]
    fn a_node_sensor_pod_not_owned_by_the_daemon_set_is_refused() {
        assert_eq!(
            check_node_sensor(&node_pod(false), &expected()),
            Err(Forgery::NotTheDaemonSet)
        );
    }
}
