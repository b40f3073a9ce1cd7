//! The injected native sidecar: its settings, arguments, locked-down security context and
//! volumes (config and projected token); node sensors build on the same container.

use super::decoys::*;
use crate::labels::TOKEN_AUDIENCE;
use k8s_openapi::{
    api::core::v1::{
        Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
        HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource, ResourceRequirements,
        SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
        VolumeProjection,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// Name of the injected native sidecar.
pub const SIDECAR_NAME: &str = "portsentry-sensor";
/// Where the config volume is mounted; the config file is `portsentry.conf` in it.
pub const CONFIG_DIR: &str = "/etc/portsentry";
/// Where the projected token volume is mounted; the token file is `token` in it.
pub const TOKEN_DIR: &str = "/var/run/secrets/portsentry.io";
/// Volume names added to the pod.
pub const CONFIG_VOLUME: &str = "portsentry-config";
pub const TOKEN_VOLUME: &str = "portsentry-token";
/// The pod sysctl that lets a non-root sensor bind decoys below 1024.
pub const UNPRIVILEGED_PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";
/// Key of the config ConfigMap holding the PEM CA of the operator's intake certificate
/// (the sidecar's `--report-ca-file`).
pub const REPORT_CA_KEY: &str = "ca.crt";
/// UID/GID of the non-root sensor (distroless `nonroot`).
pub const SENSOR_UID: i64 = 65532;

/// How sidecars are built; from the operator's flags (chart values).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Sensor image, e.g. `ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0`.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// The operator's own namespace: never injected.
    pub operator_namespace: String,
    /// Where sensors POST their reports (`https://.../v1/reports`).
    pub report_url: String,
    /// Requests and limits of the sidecar.
    pub resources: ResourceRequirements,
    /// Lifetime of the projected token; the kubelet renews it at 80%.
    pub token_expiry_seconds: i64,
    /// Sidecars count `hits_total` per decoy port (`METRICS_PER_PORT="1"` in their
    /// ConfigMaps; chart value `sensor.metricsPerPort`). Off by default: anyone who can reach
    /// a sidecar's metrics port would read which ports are decoys.
    pub metrics_per_port: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0".into(),
            image_pull_policy: None,
            operator_namespace: "portsentry-system".into(),
            report_url: "https://portsentry-operator.portsentry-system.svc:8443/v1/reports".into(),
            resources: ResourceRequirements::default(),
            token_expiry_seconds: 3600,
            metrics_per_port: false,
        }
    }
}

/// The sensor's arguments: the config, one mode flag per watched kind, JSON logs, metrics.
pub fn sensor_args(decoys: &Decoys, metrics_port: u16) -> Vec<String> {
    let mut args = vec![
        "--config".to_owned(),
        format!("{CONFIG_DIR}/portsentry.conf"),
    ];
    let (tcp, udp) = if decoys.stealth {
        ("--stcp", "--sudp")
    } else {
        ("--tcp", "--udp")
    };
    if !decoys.tcp.is_empty() {
        args.push(tcp.to_owned());
    }
    if !decoys.udp.is_empty() {
        args.push(udp.to_owned());
    }
    if decoys.tcp_below.is_some() {
        args.push("--atcp".to_owned());
    }
    if decoys.udp_below.is_some() {
        args.push("--audp".to_owned());
    }
    args.extend([
        "--log-format".to_owned(),
        "json".to_owned(),
        "--metrics-addr".to_owned(),
        format!("0.0.0.0:{metrics_port}"),
    ]);
    args
}

/// The sensor's report flags: the operator's intake, the projected token, the intake's CA
/// (key `ca.crt` of the config ConfigMap) and the governing policy. None without a URL.
pub fn report_args(policy: &str, settings: &Settings) -> Vec<String> {
    if settings.report_url.trim().is_empty() {
        return Vec::new();
    }
    vec![
        "--report-url".to_owned(),
        settings.report_url.clone(),
        "--report-token-file".to_owned(),
        format!("{TOKEN_DIR}/token"),
        "--report-ca-file".to_owned(),
        format!("{CONFIG_DIR}/{REPORT_CA_KEY}"),
        "--report-policy".to_owned(),
        policy.to_owned(),
    ]
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                // What the API server defaults it to: the stored pod equals the patch.
                api_version: Some("v1".to_owned()),
            }),
            ..EnvVarSource::default()
        }),
        value: None,
    }
}

/// The locked-down security context of the sidecar (see the module doc for raw modes).
pub fn sensor_security_context(raw: bool) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(!raw),
        run_as_user: Some(if raw { 0 } else { SENSOR_UID }),
        run_as_group: Some(if raw { 0 } else { SENSOR_UID }),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: raw.then(|| vec!["NET_RAW".to_owned()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The native sidecar: an init container with `restartPolicy: Always` and a startup probe
/// on `/readyz`, so the pod's next containers start once the decoys listen.
pub fn sidecar(decoys: &Decoys, policy: &str, settings: &Settings) -> Container {
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(
            sensor_args(decoys, SENSOR_METRICS_PORT)
                .into_iter()
                .chain(report_args(policy, settings))
                .collect(),
        ),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("sensor-metrics".to_owned()),
            container_port: i32::from(SENSOR_METRICS_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
        ]),
        resources: Some(settings.resources.clone()),
        security_context: Some(sensor_security_context(decoys.raw())),
        startup_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".to_owned()),
                port: IntOrString::Int(i32::from(SENSOR_METRICS_PORT)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(1),
            timeout_seconds: Some(1),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".to_owned()),
                port: IntOrString::Int(i32::from(SENSOR_METRICS_PORT)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CONFIG_VOLUME.to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// The config volume (the ConfigMap) and the projected token volume.
pub fn volumes(config_map: &str, settings: &Settings) -> Vec<Volume> {
    vec![
        Volume {
            name: CONFIG_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.to_owned(),
                default_mode: Some(0o444),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o444),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(settings.token_expiry_seconds),
                        path: "token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        },
    ]
}
