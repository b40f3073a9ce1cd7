//! Sidecars a ClusterPortSentryPolicy injects, end to end through the operator process
//! (webhook + cluster controller) and the chart, against a real control plane with its
//! controllers (the garbage collector included): pods created in a namespace the policy's
//! `namespaceSelector` selects come back injected, the cluster controller renders the
//! ConfigMaps their sidecars mount in that namespace (with the intake's CA), removes a
//! skip-specific one as soon as the last pod needing it is deleted, and the garbage collector
//! takes them all with the policy. And the sidecar, run as its pod spec says with that
//! ConfigMap, gets an `nmap` scanner a cluster-scope ban.
//!
//! The scan test needs root, `ip`, `nmap`, `setpriv`, `curl` and `sysctl`; with `CI=true` a
//! missing one fails it. Its traffic stays inside the network namespaces it creates
//! (10.232.191.0/24, 10.233.191.0/30).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{ClusterPortSentryPolicy, PolicyKind, PortSentryBan, Protocol};
use portsentry_operator::{
    inject::{self, Governing, Skipped},
    labels,
};
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Operator, OperatorSettings, Options, PodNet, free_port,
    install_crds, prerequisites, repo_root, shared, wait_until, wait_value,
};
use serde_json::json;
use tokio::sync::OnceCell;

mod kubelet;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();

/// The operator's namespace (and the chart's release namespace).
/// How long a suite waits for the operator (or the API server) to act.
const WAIT: Duration = Duration::from_secs(45);
const SYSTEM: &str = "pscl-system";
const RELEASE: &str = "pscl";
/// The namespace label the test policies select on.
const PROTECT_LABEL: &str = "pscl.portsentry.io/protect";

async fn plane() -> &'static ControlPlane {
    let plane = shared(&CONTROL_PLANE, Options::with_controllers())
        .await
        .unwrap();
    SETUP
        .get_or_try_init(|| async {
            install_crds(&plane.client()?, Duration::from_secs(60))
                .await
                .map(|_| ())
        })
        .await
        .unwrap();
    plane.ensure_namespace(SYSTEM).await.unwrap();
    plane
}

/// The chart installed with its webhook URL at this machine; uninstalled on drop, so no
/// later test's pod creation calls a webhook that is gone.
struct Release {
    plane: &'static ControlPlane,
}

impl Release {
    fn install(plane: &'static ControlPlane, webhook_port: u16) -> Self {
        let mut helm = plane.helm().unwrap();
        helm.args(["install", RELEASE])
            .arg(repo_root().join("charts/portsentry"))
            .args(["-n", SYSTEM, "--create-namespace"])
            .args([
                "--set",
                &format!("webhook.url=https://127.0.0.1:{webhook_port}/mutate-pods"),
            ]);
        let output = helm.output().unwrap();
        assert!(
            output.status.success(),
            "helm install failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self { plane }
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Ok(mut helm) = self.plane.helm() {
            // No kubelet here runs the pre-delete cleanup Job (the uninstall suite does).
            let _ = helm
                .args(["uninstall", RELEASE, "-n", SYSTEM, "--no-hooks"])
                .output();
        }
    }
}

/// The chart (released as [`RELEASE`]) and the operator serving its webhook, leading.
async fn operator_with_webhook(plane: &'static ControlPlane, lease: &str) -> (Release, Operator) {
    let webhook_port = free_port().unwrap();
    let release = Release::install(plane, webhook_port);
    let mut settings = OperatorSettings::new(lease);
    settings.namespace = SYSTEM.into();
    settings.intake_ca_secret = Some(format!("{lease}-intake-ca"));
    settings.extra_args = vec![
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        "--webhook-dns-name=127.0.0.1".into(),
        format!("--webhook-configuration={RELEASE}-portsentry-operator"),
        format!("--webhook-ca-secret={lease}-webhook-ca"),
        format!("--operator-namespace={SYSTEM}"),
        "--sensor-image=ghcr.io/portsentry-k8s/portsentry-sensor:test".into(),
        "--node-sensors=false".into(),
    ];
    let operator = Operator::start(plane, settings).await.unwrap();
    (release, operator)
}

/// Namespace `name` labelled [`PROTECT_LABEL`]`=name`, with its `default` service account,
/// and cluster policy `name` selecting it (decoys 1, 79, 111, 31337, 40421).
async fn protected_namespace(plane: &ControlPlane, name: &str) -> ClusterPortSentryPolicy {
    let client = plane.client().unwrap();
    let namespace = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {PROTECT_LABEL: name}},
    });
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(namespace),
        )
        .await
        .unwrap();
    plane.ensure_service_account(name, "default").await.unwrap();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "ClusterPortSentryPolicy",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {PROTECT_LABEL: name}},
            "decoys": {"tcp": [1, 79, 111, 31337, 40421]},
            "response": {"banDuration": "1h"},
        }
    });
    Api::<ClusterPortSentryPolicy>::all(client)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(policy),
        )
        .await
        .unwrap()
}

/// Pod `name` whose app container declares `ports` (TCP).
fn pod(name: &str, ports: &[u16]) -> Pod {
    let ports: Vec<_> = ports
        .iter()
        .map(|port| json!({"containerPort": port, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "registry.invalid/app:1", "ports": ports}]
        }
    }))
    .unwrap()
}

fn injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == inject::SIDECAR_NAME))
}

/// Creates `pod` in `namespace` through the webhook once it injects (dry runs until the
/// caBundle is patched and its caches hold the policy and the namespace's labels).
async fn create_injected(client: &Client, namespace: &str, pod: Pod) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    wait_value(WAIT, "the webhook to inject a dry-run pod", || {
        let (pods, pod, dry_run) = (pods.clone(), pod.clone(), dry_run.clone());
        async move { injected(&pods.create(&dry_run, &pod).await.ok()?).then_some(()) }
    })
    .await
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert!(
        injected(&created),
        "{} came back without a sensor",
        pod.name_any()
    );
    created
}

/// The name of the ConfigMap the pod's sensor mounts.
fn mounted_config_map(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .find(|v| v.name == inject::CONFIG_VOLUME)
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .unwrap()
}

/// ConfigMap `namespace/name` once it has `ca.crt`.
async fn config_map_with_ca(client: &Client, namespace: &str, name: &str) -> ConfigMap {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    wait_value(WAIT, &format!("ConfigMap {name} with ca.crt"), || {
        let api = api.clone();
        async move {
            let config_map = api.get_opt(name).await.ok()??;
            config_map
                .data
                .as_ref()?
                .contains_key(inject::REPORT_CA_KEY)
                .then_some(config_map)
        }
    })
    .await
    .unwrap()
}

/// Waits until ConfigMap `namespace/name` is gone.
async fn config_map_gone(client: &Client, namespace: &str, name: &str) {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    wait_value(WAIT, &format!("ConfigMap {name} to be deleted"), || {
        let api = api.clone();
        async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_pod_a_cluster_policy_injects_finds_its_config_map_rendered_with_the_intake_ca() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let (_release, operator) = operator_with_webhook(plane, "pscl-render").await;
    let name = "pscl-render";
    let policy = protected_namespace(plane, name).await;

    let pod = create_injected(&client, name, pod("web-0", &[])).await;
    let reference = format!("ClusterPortSentryPolicy/{name}");
    assert_eq!(pod.annotations()[labels::INJECTED_ANNOTATION], reference);
    let mounted = mounted_config_map(&pod);
    assert_eq!(mounted, format!("portsentry-sensor-cluster-{name}"));

    let config_map = config_map_with_ca(&client, name, &mounted).await;
    let data: &BTreeMap<String, String> = config_map.data.as_ref().unwrap();
    assert_eq!(data[inject::REPORT_CA_KEY], operator.ca_pem);
    assert_eq!(
        data["portsentry.conf"],
        inject::render_sensor_config(&policy.spec.rules, &[])
    );
    let owner = &config_map.owner_references()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            Some(owner.uid.as_str()),
            owner.controller
        ),
        (
            "ClusterPortSentryPolicy",
            name,
            policy.metadata.uid.as_deref(),
            Some(true)
        )
    );
    let policies = Api::<ClusterPortSentryPolicy>::all(client.clone());
    wait_value(WAIT, "sensorsInjected to count the pod", || {
        let policies = policies.clone();
        async move {
            let status = policies.get(name).await.ok()?.status?;
            (status.sensors_injected == 1).then_some(())
        }
    })
    .await
    .unwrap();
    let managers: Vec<_> = config_map
        .managed_fields()
        .iter()
        .filter_map(|f| f.manager.clone())
        .collect();
    assert_eq!(managers, ["portsentry-operator"]);
}

#[tokio::test]
async fn deleting_the_pod_that_needed_a_skip_specific_config_map_removes_it_without_a_policy_edit()
{
    let plane = plane().await;
    let client = plane.client().unwrap();
    let (_release, _operator) = operator_with_webhook(plane, "pscl-stale").await;
    let name = "pscl-stale";
    let policy = protected_namespace(plane, name).await;
    let plain = create_injected(&client, name, pod("web-0", &[])).await;
    // Its app declares 31337/TCP: that decoy is skipped and its sensor reads a ConfigMap of
    // its own.
    let skipping = create_injected(&client, name, pod("web-skips", &[31337])).await;
    let skipped = [Skipped {
        port: 31337,
        protocol: Protocol::Tcp,
    }];
    let skip_specific = inject::config_map_name(
        &Governing {
            kind: PolicyKind::ClusterPortSentryPolicy,
            name,
            rules: &policy.spec.rules,
        },
        &skipped,
    );
    assert_eq!(mounted_config_map(&skipping), skip_specific);
    let config_map = config_map_with_ca(&client, name, &skip_specific).await;
    assert_eq!(
        config_map.data.as_ref().unwrap()["portsentry.conf"],
        inject::render_sensor_config(&policy.spec.rules, &skipped)
    );
    config_map_with_ca(&client, name, &mounted_config_map(&plain)).await;

    // Only the pod goes; the policy is not touched (its resync is minutes away).
    Api::<Pod>::namespaced(client.clone(), name)
        .delete("web-skips", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    config_map_gone(&client, name, &skip_specific).await;
    assert!(
        Api::<ConfigMap>::namespaced(client.clone(), name)
            .get_opt(&mounted_config_map(&plain))
            .await
            .unwrap()
            .is_some(),
        "the base ConfigMap web-0 still mounts was deleted"
    );
}

#[tokio::test]
async fn deleting_the_cluster_policy_garbage_collects_its_config_maps() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let (_release, operator) = operator_with_webhook(plane, "pscl-gc").await;
    let name = "pscl-gc";
    protected_namespace(plane, name).await;
    let pod = create_injected(&client, name, pod("web-0", &[])).await;
    let mounted = mounted_config_map(&pod);
    config_map_with_ca(&client, name, &mounted).await;

    // The garbage collector of the control plane's controller-manager removes it, not the
    // operator: it is stopped first. The ConfigMap's owner is the cluster-scoped policy.
    let log = operator.log();
    drop(operator);
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), name);
    let what = format!("the garbage collector to delete ConfigMap {mounted}");
    wait_until(Duration::from_secs(60), &what, || {
        let (config_maps, mounted) = (config_maps.clone(), mounted.clone());
        async move { config_maps.get_opt(&mounted).await.unwrap().is_none() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; operator log:\n{log}"));
}

/// `sensorsInjected` and `sensorsReady` of cluster policy `name`, once it has a status.
async fn sensor_counts(client: &Client, name: &str) -> Option<(u32, u32)> {
    let status = Api::<ClusterPortSentryPolicy>::all(client.clone())
        .get(name)
        .await
        .ok()?
        .status?;
    Some((status.sensors_injected, status.sensors_ready))
}

#[tokio::test]
async fn a_cluster_policy_counts_its_injected_sensor_ready_once_the_sidecar_is_ready() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let (_release, _operator) = operator_with_webhook(plane, "pscl-ready").await;
    let name = "pscl-ready";
    protected_namespace(plane, name).await;
    create_injected(&client, name, pod("web-0", &[])).await;
    wait_value(WAIT, "sensorsInjected 1, sensorsReady 0", || async {
        (sensor_counts(&client, name).await? == (1, 0)).then_some(())
    })
    .await
    .unwrap();

    // The kubelet's part: the sidecar runs and its startup probe passes. Only the pod's
    // status changes (the policy's resync is minutes away).
    kubelet::report_sidecar(&client, name, "web-0", true).await;
    wait_value(WAIT, "sensorsReady 1", || async {
        (sensor_counts(&client, name).await? == (1, 1)).then_some(())
    })
    .await
    .unwrap();
}

/// A process killed on drop, even when the test panics.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` of the sensor's metrics port from inside the pod's network namespace.
fn sensor_get(net: &PodNet, path: &str) -> Option<String> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.victim,
            "curl",
            "-sf",
            "--max-time",
            "2",
        ])
        .arg(format!(
            "http://127.0.0.1:{}{path}",
            inject::SENSOR_METRICS_PORT
        ))
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `path` and everything under it readable (and folders enterable) by any user, as the
/// kubelet's volumes are for the sidecar's user.
fn open_up(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            open_up(&entry.unwrap().path());
        }
    }
}

/// The kubelet's part for the injected sidecar of `pod`: its volumes filled (the ConfigMap
/// `config` as stored, a TokenRequest token bound to the pod), its pod sysctls set in `net`,
/// and the sensor binary run with the sidecar's args (mount paths mapped to those folders)
/// as the sidecar's user, with no capabilities.
async fn run_sidecar(
    plane: &ControlPlane,
    net: &PodNet,
    pod: &Pod,
    config: &BTreeMap<String, String>,
    root: &Path,
) -> Running {
    let spec = pod.spec.clone().unwrap();
    let sidecar = spec
        .init_containers
        .clone()
        .unwrap()
        .into_iter()
        .find(|c| c.name == inject::SIDECAR_NAME)
        .unwrap();
    let token_source = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == inject::TOKEN_VOLUME)
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| {
            p.sources
                .iter()
                .flatten()
                .find_map(|s| s.service_account_token.clone())
        })
        .unwrap();
    let token = plane
        .token_for_pod(
            &pod.namespace().unwrap(),
            spec.service_account_name.as_deref().unwrap(),
            &pod.name_any(),
            token_source.audience.as_deref().unwrap(),
        )
        .await
        .unwrap();
    let mut mounts = Vec::new();
    for mount in sidecar.volume_mounts.clone().unwrap() {
        let dir = root.join(mount.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        if mount.name == inject::CONFIG_VOLUME {
            for (key, value) in config {
                std::fs::write(dir.join(key), value).unwrap();
            }
        } else if mount.name == inject::TOKEN_VOLUME {
            std::fs::write(dir.join(&token_source.path), &token).unwrap();
        }
        mounts.push((mount.mount_path.clone(), dir));
    }
    let binary = root.join("portsentry-sensor");
    std::fs::copy(
        portsentry_tests::workspace_binary("portsentry-sensor", "portsentry-sensor").unwrap(),
        &binary,
    )
    .unwrap();
    open_up(root);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let args: Vec<String> = sidecar
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|arg| {
            mounts
                .iter()
                .find_map(|(path, dir)| {
                    arg.strip_prefix(path.as_str())
                        .map(|rest| format!("{}{rest}", dir.display()))
                })
                .unwrap_or(arg)
        })
        .collect();
    for sysctl in spec
        .security_context
        .clone()
        .and_then(|c| c.sysctls)
        .unwrap_or_default()
    {
        let setting = format!("{}={}", sysctl.name, sysctl.value);
        let status = Command::new("ip")
            .args(["netns", "exec", &net.victim, "sysctl", "-qw", &setting])
            .status()
            .unwrap();
        assert!(status.success(), "sysctl {setting}");
    }
    let security = sidecar.security_context.clone().unwrap();
    Running(
        Command::new("ip")
            .args(["netns", "exec", &net.victim, "setpriv"])
            .arg(format!("--reuid={}", security.run_as_user.unwrap()))
            .arg(format!("--regid={}", security.run_as_group.unwrap()))
            .args([
                "--clear-groups",
                "--no-new-privs",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .arg(&binary)
            .args(&args)
            .stdout(std::fs::File::create(root.join("sensor.log")).unwrap())
            .stderr(std::fs::File::create(root.join("sensor.err")).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn a_sidecar_a_cluster_policy_injected_gets_a_scanner_a_cluster_scope_ban() {
    if !prerequisites(&["ip", "nmap", "setpriv", "curl", "sysctl"]) {
        return;
    }
    let plane = plane().await;
    let client = plane.client().unwrap();
    let name = "pscl-scan";
    let net = PodNet::new(191).unwrap();
    let webhook_port = free_port().unwrap();
    let _release = Release::install(plane, webhook_port);
    let mut settings = OperatorSettings::new(name);
    settings.namespace = SYSTEM.into();
    settings.report_ip = net.host_addr.parse().unwrap();
    settings.intake_ca_secret = Some(format!("{name}-intake-ca"));
    settings.extra_args = vec![
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        "--webhook-dns-name=127.0.0.1".into(),
        format!("--webhook-configuration={RELEASE}-portsentry-operator"),
        format!("--webhook-ca-secret={name}-webhook-ca"),
        format!("--operator-namespace={SYSTEM}"),
        "--node-sensors=false".into(),
    ];
    let _operator = Operator::start(plane, settings).await.unwrap();
    protected_namespace(plane, name).await;
    let pod = create_injected(&client, name, pod("web-0", &[])).await;
    let config_map = config_map_with_ca(&client, name, &mounted_config_map(&pod)).await;
    let root = tempfile::Builder::new()
        .prefix("pscl-pod-")
        .tempdir()
        .unwrap();
    let _sensor = run_sidecar(
        plane,
        &net,
        &pod,
        config_map.data.as_ref().unwrap(),
        root.path(),
    )
    .await;
    let sensor_logs = || {
        ["sensor.log", "sensor.err"]
            .map(|f| std::fs::read_to_string(root.path().join(f)).unwrap_or_default())
            .concat()
    };
    // The startup probe.
    wait_until(Duration::from_secs(20), "the sensor to be ready", || {
        let ready = sensor_get(&net, "/readyz").is_some();
        async move { ready }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; sensor log:\n{}", sensor_logs()));

    net.nmap_connect_scan("1,79,111,31337,40421").unwrap();
    // A cluster-scope ban: in the operator's namespace, of the cluster policy.
    let source = net.attacker_addr.parse().unwrap();
    let ban_name = portsentry_operator::enforce::bans::ban_name(name, &source);
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), SYSTEM);
    let ban = wait_value(WAIT, &format!("PortSentryBan {SYSTEM}/{ban_name}"), || {
        let (bans, name) = (bans.clone(), ban_name.clone());
        async move { bans.get_opt(&name).await.unwrap() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; sensor log:\n{}", sensor_logs()));
    assert_eq!(
        (ban.spec.policy.kind, ban.spec.policy.name.as_str()),
        (PolicyKind::ClusterPortSentryPolicy, name)
    );
    assert!(
        ban.spec
            .evidence
            .iter()
            .all(|e| e.reporter == format!("{name}/web-0"))
    );
}
