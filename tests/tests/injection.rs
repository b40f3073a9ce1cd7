//! Injection end to end through the operator process (webhook + intake + controller) against
//! a real control plane (with controllers): the injected sidecar run exactly as its pod spec
//! says, the operator's own intake certificate verified with the ConfigMap's `ca.crt`, and
//! the sensor ConfigMaps the controller keeps and removes.
//!
//! Network tests need root, `ip`, `nmap`, `setpriv`, `curl` and `sysctl`; with `CI=true` a
//! missing one fails the test. Traffic goes only to addresses inside the network namespaces
//! these tests create (10.232.181-182.0/24, 10.233.181-182.0/30).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use futures::FutureExt;
use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{PolicyKind, PortSentryBan, PortSentryPolicy};
use portsentry_operator::{
    inject::{self, Governing, Skipped},
    labels, tls,
};
use portsentry_tests::{
    ControlPlane, DEFAULT_SENSOR_IMAGE, FIELD_MANAGER, Operator, OperatorSettings, Options, PodNet,
    free_port, injected_pod, install_crds, prerequisites, repo_root, shared, wait_for, wait_until,
    wait_value,
};
use serde_json::json;
use tokio::sync::OnceCell;

mod kubelet;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();

/// The operator's namespace (and the chart's release namespace).
/// How long a suite waits for the operator (or the API server) to act.
const WAIT: Duration = Duration::from_secs(45);
const SYSTEM: &str = "psinj-system";
const RELEASE: &str = "psinj";
const DECOYS: &str = "1,79,111,31337,40421";

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

/// Namespace `namespace` with policy `web` selecting `app=web` on [`DECOYS`], banning on the
/// first verified scan, and its `default` service account.
async fn namespace_with_policy(plane: &ControlPlane, namespace: &str) -> PortSentryPolicy {
    plane.ensure_namespace(namespace).await.unwrap();
    plane
        .ensure_service_account(namespace, "default")
        .await
        .unwrap();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [1, 79, 111, 31337, 40421]},
            "response": {"banDuration": "1h"},
        }
    });
    Api::<PortSentryPolicy>::namespaced(plane.client().unwrap(), namespace)
        .patch(
            "web",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(policy),
        )
        .await
        .unwrap()
}

fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}, "annotations": annotations},
        "spec": {
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}]
        }
    }))
    .unwrap()
}

/// The data of ConfigMap `namespace/name` once it has `ca.crt`.
async fn config_map_with_ca(
    client: &Client,
    namespace: &str,
    name: &str,
) -> std::collections::BTreeMap<String, String> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    wait_value(WAIT, &format!("ConfigMap {name} with ca.crt"), || {
        let api = api.clone();
        async move {
            let data = api.get_opt(name).await.ok()??.data?;
            data.contains_key(inject::REPORT_CA_KEY).then_some(data)
        }
    })
    .await
    .unwrap()
}

/// Every `except` prefix of the generated NetworkPolicies of `namespace`.
async fn excepted(client: &Client, namespace: &str) -> Vec<IpNet> {
    Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=portsentry-operator"))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|np| np.spec.as_ref()?.ingress.as_ref())
        .flatten()
        .filter_map(|rule| rule.from.as_ref())
        .flatten()
        .filter_map(|peer| peer.ip_block.as_ref()?.except.as_ref())
        .flatten()
        .filter_map(|text| text.parse().ok())
        .collect()
}

/// A process killed on drop, even when the test panics.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The chart installed with its webhook URL at this machine; uninstalled on drop, so no
/// later test's pod creation calls a webhook that is gone.
struct Release {
    plane: &'static ControlPlane,
    /// The port the chart's webhook URL names.
    webhook_port: u16,
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
        Self {
            plane,
            webhook_port,
        }
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

/// The chart (released as [`RELEASE`]) and an operator serving its webhook, leading under
/// Lease `lease`, its intake at `report_ip` (certificate from `psinj-intake-ca`).
async fn operator_with_webhook(
    plane: &'static ControlPlane,
    lease: &str,
    report_ip: IpAddr,
) -> (Release, Operator) {
    let webhook_port = free_port().unwrap();
    let release = Release::install(plane, webhook_port);
    let mut settings = OperatorSettings::new(lease);
    settings.namespace = SYSTEM.into();
    settings.report_ip = report_ip;
    settings.intake_ca_secret = Some("psinj-intake-ca".into());
    settings.extra_args = vec![
        format!("--webhook-addr=127.0.0.1:{webhook_port}"),
        "--webhook-dns-name=127.0.0.1".into(),
        format!("--webhook-configuration={RELEASE}-portsentry-operator"),
        "--webhook-ca-secret=psinj-webhook-ca".into(),
        format!("--operator-namespace={SYSTEM}"),
        "--sensor-image=ghcr.io/portsentry-k8s/portsentry-sensor:test".into(),
    ];
    let operator = Operator::start(plane, settings).await.unwrap();
    (release, operator)
}

fn injected(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == inject::SIDECAR_NAME))
}

/// Pod `name` (`app=web`) created in `namespace` through the operator's webhook: the API
/// server calls it once its caBundle is patched and its caches hold the policy (dry runs
/// until then).
async fn create_injected(client: &Client, namespace: &str, name: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    wait_value(WAIT, "the webhook to inject a dry-run pod", || {
        let pods = pods.clone();
        async move {
            let params = PostParams {
                dry_run: true,
                ..PostParams::default()
            };
            let pod = pods.create(&params, &pod(name, json!({}))).await.ok()?;
            injected(&pod).then_some(())
        }
    })
    .await
    .unwrap();
    let created = pods
        .create(&PostParams::default(), &pod(name, json!({})))
        .await
        .unwrap();
    assert!(injected(&created), "{name} came back without a sensor");
    created
}

/// The sensor binary built next to this test (`cargo build --workspace --bins`).
fn sensor_binary() -> PathBuf {
    let path =
        portsentry_tests::workspace_binary("portsentry-sensor", "portsentry-sensor").unwrap();
    assert!(path.is_file(), "{} is missing", path.display());
    path
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

#[tokio::test]
async fn an_injected_sidecar_run_as_its_pod_spec_says_gets_an_nmap_scanner_banned_by_the_operator()
{
    if !prerequisites(&["ip", "nmap", "setpriv", "curl", "sysctl"]) {
        return;
    }
    let plane = plane().await;
    let client = plane.client().unwrap();
    let namespace = "psinj-inject";
    let net = PodNet::new(181).unwrap();
    let (_release, operator) =
        operator_with_webhook(plane, "psinj-lease-inject", net.host_addr.parse().unwrap()).await;
    namespace_with_policy(plane, namespace).await;

    let pod = create_injected(&client, namespace, "web-0").await;
    let spec = pod.spec.clone().unwrap();
    let sidecar = spec
        .init_containers
        .clone()
        .unwrap()
        .into_iter()
        .find(|c| c.name == inject::SIDECAR_NAME)
        .unwrap();

    // The kubelet's part. The config volume: the ConfigMap the pod names, as the API server
    // has it (rendered by the operator's controller, with the intake's CA).
    let volumes = spec.volumes.clone().unwrap();
    let config_map_name = volumes
        .iter()
        .find(|v| v.name == inject::CONFIG_VOLUME)
        .and_then(|v| v.config_map.as_ref())
        .map(|c| c.name.clone())
        .unwrap();
    let data = config_map_with_ca(&client, namespace, &config_map_name).await;
    assert_eq!(data[inject::REPORT_CA_KEY], operator.ca_pem);
    // The token volume: a token of the pod's service account, bound to the pod, with the
    // projected source's audience, at the source's path.
    let projected = volumes
        .iter()
        .find(|v| v.name == inject::TOKEN_VOLUME)
        .and_then(|v| v.projected.as_ref())
        .unwrap();
    let token_source = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.clone())
        .unwrap();
    let audience = token_source.audience.clone().unwrap();
    assert_eq!(audience, "portsentry.io");
    let service_account = spec.service_account_name.clone().unwrap();
    let token = plane
        .token_for_pod(namespace, &service_account, "web-0", &audience)
        .await
        .unwrap();
    let root = tempfile::Builder::new()
        .prefix("psinj-pod-")
        .tempdir()
        .unwrap();
    let mut mounts = Vec::new();
    for mount in sidecar.volume_mounts.clone().unwrap() {
        let dir = root.path().join(mount.mount_path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        if mount.name == inject::CONFIG_VOLUME {
            for (key, value) in &data {
                std::fs::write(dir.join(key), value).unwrap();
            }
        } else if mount.name == inject::TOKEN_VOLUME {
            std::fs::write(dir.join(&token_source.path), &token).unwrap();
        }
        mounts.push((mount.mount_path.clone(), dir));
    }
    let binary = root.path().join("portsentry-sensor");
    std::fs::copy(sensor_binary(), &binary).unwrap();
    open_up(root.path());
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
    assert!(
        args.iter().any(|a| a == &operator.report_url),
        "the sidecar reports elsewhere: {args:?}"
    );
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
    let log = root.path().join("sensor.log");
    let sensor = Running(
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
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(root.path().join("sensor.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let sensor_logs = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(root.path().join("sensor.err")).unwrap_or_default()
        )
    };
    // The startup probe.
    wait_until(Duration::from_secs(20), "the sensor to be ready", || {
        let ready = sensor_get(&net, "/readyz").is_some();
        async move { ready }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; sensor log:\n{}", sensor_logs()));

    // The attack, and the ban it earns.
    let scanned = Instant::now();
    net.nmap_connect_scan(DECOYS).unwrap();
    let attacker: IpAddr = net.attacker_addr.parse().unwrap();
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let ban_name = format!("web-v4-{}", net.attacker_addr.replace('.', "-"));
    let ban = wait_value(WAIT, &format!("PortSentryBan {ban_name}"), || {
        let (bans, name) = (bans.clone(), ban_name.clone());
        async move { bans.get_opt(&name).await.unwrap() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}; sensor log:\n{}", sensor_logs()));
    let banned_after = scanned.elapsed();
    assert_eq!(ban.spec.source.to_string(), attacker.to_string());
    assert!(
        ban.spec
            .evidence
            .iter()
            .all(|e| e.reporter == format!("{namespace}/web-0"))
    );
    let (client2, ns) = (client.clone(), namespace.to_owned());
    wait_for(
        Duration::from_secs(30),
        "the attacker's prefix in the generated NetworkPolicy",
        move || {
            let (client, ns) = (client2.clone(), ns.clone());
            async move {
                Ok(excepted(&client, &ns)
                    .await
                    .iter()
                    .any(|p| p.contains(&attacker)))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    eprintln!(
        "injected sidecar: nmap start to PortSentryBan {banned_after:?}, to NetworkPolicy {:?}",
        scanned.elapsed()
    );
    drop(sensor);
}

/// The sensor's `name` counter (no labels) read from its metrics port, or 0.
fn sensor_counter(net: &PodNet, name: &str) -> f64 {
    sensor_get(net, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An operator issuing its own intake certificate; namespace `namespace` with policy `web`
/// and pod `web-0`, whose ConfigMap carries the intake CA (returned); and a sensor in
/// `PodNet::new(index)` reporting as that pod but trusting another CA, scanned by `nmap`,
/// once it has failed to report twice.
async fn sensor_refusing_the_intake(namespace: &str, index: u8) -> (Operator, PodNet, String) {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let mut net = PodNet::new(index).unwrap();
    let mut settings = OperatorSettings::new(&format!("psinj-lease-{namespace}"));
    settings.namespace = SYSTEM.into();
    settings.report_ip = net.host_addr.parse().unwrap();
    settings.intake_ca_secret = Some("psinj-intake-ca".into());
    let operator = Operator::start(plane, settings).await.unwrap();
    namespace_with_policy(plane, namespace).await;
    // The reporting pod runs the sensor as the webhook injects it: the intake refuses
    // reports from any other pod.
    let reporter: Pod = serde_json::from_value(injected_pod(
        namespace,
        "web-0",
        json!({"app": "web"}),
        "web",
        DEFAULT_SENSOR_IMAGE,
    ))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &reporter)
        .await
        .unwrap();
    let data = config_map_with_ca(&client, namespace, "portsentry-sensor-web").await;
    let intake_ca = data[inject::REPORT_CA_KEY].clone();
    assert_eq!(intake_ca, operator.ca_pem);
    let token = plane
        .token_for_pod(namespace, "default", "web-0", "portsentry.io")
        .await
        .unwrap();
    std::fs::write(net.path("token"), token).unwrap();
    std::fs::write(net.path("ca.crt"), tls::Ca::generate().unwrap().cert_pem).unwrap();
    let config = format!(
        "TCP_PORTS=\"{DECOYS}\"\nUDP_PORTS=\"\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\nBLOCK_UDP=\"0\"\nHISTORY_FILE=\"{h}\"\nBLOCKED_FILE=\"{b}\"\n",
        h = net.path("history").display(),
        b = net.path("blocked").display(),
    );
    let args = vec![
        "-tcp".to_owned(),
        format!("--metrics-addr=127.0.0.1:{}", inject::SENSOR_METRICS_PORT),
        format!("--report-url={}", operator.report_url),
        format!("--report-token-file={}", net.path("token").display()),
        format!("--report-ca-file={}", net.path("ca.crt").display()),
        "--report-policy=PortSentryPolicy/web".to_owned(),
    ];
    net.start_sensor(&config, &args).await.unwrap();
    net.nmap_connect_scan(DECOYS).unwrap();
    wait_until(
        Duration::from_secs(30),
        "two failed report attempts",
        || {
            let failed = sensor_counter(&net, "portsentry_sensor_report_attempts_failed_total");
            async move { failed >= 2.0 }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}; sensor log:\n{}", net.sensor_log()));
    (operator, net, intake_ca)
}

#[tokio::test]
async fn a_sensor_trusting_another_ca_refuses_the_operators_intake_and_bans_nothing() {
    if !prerequisites(&["ip", "nmap", "curl"]) {
        return;
    }
    let namespace = "psinj-refuse";
    let (_operator, net, _) = sensor_refusing_the_intake(namespace, 182).await;
    let metrics = sensor_get(&net, "/metrics").unwrap_or_default();
    let sent = metrics.lines().any(|l| {
        l.starts_with("portsentry_sensor_report_detections_total{fate=\"sent\"}")
            && !l.ends_with(" 0")
    });
    assert!(!sent, "a report went through:\n{metrics}");
    let log = net.sensor_log();
    assert!(
        log.to_lowercase().contains("certificate"),
        "the sensor does not say the certificate was refused:\n{log}"
    );
    let client = plane().await.client().unwrap();
    let bans = Api::<PortSentryBan>::namespaced(client, namespace)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(bans.items.is_empty(), "a ban without a verified report");
}

#[tokio::test]
async fn a_sensor_given_the_config_maps_ca_after_refusing_delivers_its_held_report() {
    if !prerequisites(&["ip", "nmap", "curl"]) {
        return;
    }
    let namespace = "psinj-rotate";
    // The operator is kept running to the end; only its intake is used.
    let (_operator, net, intake_ca) = sensor_refusing_the_intake(namespace, 183).await;
    // The ConfigMap's CA lands in the file (as a rotated ca.crt would), atomically.
    let next = net.path("ca.crt.next");
    std::fs::write(&next, &intake_ca).unwrap();
    std::fs::rename(&next, net.path("ca.crt")).unwrap();
    let bans = Api::<PortSentryBan>::namespaced(plane().await.client().unwrap(), namespace);
    let ban_name = format!("web-v4-{}", net.attacker_addr.replace('.', "-"));
    wait_value(WAIT, "the held report to become a ban", || {
        let (bans, name) = (bans.clone(), ban_name.clone());
        async move { bans.get_opt(&name).await.ok()? }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_skip_specific_config_map_is_deleted_as_soon_as_the_last_pod_using_it_is() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let namespace = "psinj-stale";
    let mut settings = OperatorSettings::new("psinj-lease-stale");
    settings.namespace = SYSTEM.into();
    let _operator = Operator::start(plane, settings).await.unwrap();
    let policy = namespace_with_policy(plane, namespace).await;
    // A pod as the webhook admits it when its app declares 31337/TCP.
    let skipped = [Skipped {
        port: 31337,
        protocol: portsentry_crds::Protocol::Tcp,
    }];
    let governing = Governing {
        kind: PolicyKind::PortSentryPolicy,
        name: "web",
        rules: &policy.spec.rules,
    };
    let skip_specific = inject::config_map_name(&governing, &skipped);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &pod(
            "web-skips",
            json!({
                labels::INJECTED_ANNOTATION: governing.reference(),
                labels::CONFIG_MAP_ANNOTATION: skip_specific,
                labels::SKIPPED_ANNOTATION: inject::skipped_annotation(&skipped),
            }),
        ),
    )
    .await
    .unwrap();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let data = config_map_with_ca(&client, namespace, &skip_specific).await;
    assert!(!data["portsentry.conf"].contains("31337"));

    // Only the pod goes: its deletion reconciles the policy (whose resync is minutes away).
    pods.delete("web-skips", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_value(WAIT, "the skip-specific ConfigMap to be deleted", || {
        let config_maps = config_maps.clone();
        let name = skip_specific.clone();
        async move {
            config_maps
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await
    .unwrap();
    assert!(
        config_maps
            .get_opt("portsentry-sensor-web")
            .await
            .unwrap()
            .is_some(),
        "the base ConfigMap pods admitted next need was deleted"
    );
}

/// `sensorsInjected` and `sensorsReady` of policy `namespace/name`, once it has a status.
async fn sensor_counts(client: &Client, namespace: &str, name: &str) -> Option<(u32, u32)> {
    let status = Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .ok()?
        .status?;
    Some((status.sensors_injected, status.sensors_ready))
}

#[tokio::test]
async fn a_policy_counts_its_injected_sensor_ready_once_the_sidecar_is_ready() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let namespace = "psinj-ready";
    let (_release, _operator) =
        operator_with_webhook(plane, "psinj-lease-ready", IpAddr::from([127, 0, 0, 1])).await;
    namespace_with_policy(plane, namespace).await;
    create_injected(&client, namespace, "web-0").await;
    wait_value(WAIT, "sensorsInjected 1, sensorsReady 0", || async {
        (sensor_counts(&client, namespace, "web").await? == (1, 0)).then_some(())
    })
    .await
    .unwrap();

    // The kubelet's part: the sidecar runs and its startup probe passes. Only the pod's
    // status changes (the policy's resync is minutes away).
    kubelet::report_sidecar(&client, namespace, "web-0", true).await;
    wait_value(WAIT, "sensorsReady 1", || async {
        (sensor_counts(&client, namespace, "web").await? == (1, 1)).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_rotated_intake_ca_file_reaches_the_sensor_config_map_without_a_restart() {
    let plane = plane().await;
    let client = plane.client().unwrap();
    let namespace = "psinj-ca-rotation";
    let mut settings = OperatorSettings::new("psinj-lease-ca-rotation");
    settings.namespace = SYSTEM.into();
    settings.extra_args = vec!["--report-tls-reload-secs=1".into()];
    let operator = Operator::start(plane, settings).await.unwrap();
    namespace_with_policy(plane, namespace).await;
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod("web-0", json!({})))
        .await
        .unwrap();
    let data = config_map_with_ca(&client, namespace, "portsentry-sensor-web").await;
    assert_eq!(data[inject::REPORT_CA_KEY], operator.ca_pem);

    let rotated = tls::Ca::generate().unwrap().cert_pem;
    std::fs::write(operator.intake_ca_file(), &rotated).unwrap();
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    wait_value(WAIT, "the rotated CA in the sensor ConfigMap", || {
        let (api, rotated) = (api.clone(), rotated.clone());
        async move {
            let data = api.get_opt("portsentry-sensor-web").await.ok()??.data?;
            (data.get(inject::REPORT_CA_KEY) == Some(&rotated)).then_some(())
        }
    })
    .await
    .unwrap();
}

/// A TLS client config trusting `ca_pem` (PEM).
fn trusting(ca_pem: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// One misbehaving client of `port` (127.0.0.1), kind `index % 4`: a TCP connection that
/// sends nothing; a TLS connection that sends nothing; a request promising 100 MB then
/// trickling a byte a second; a request promising `promise` bytes (under the cap) then
/// trickling. It runs until aborted.
async fn misbehave(
    port: u16,
    index: usize,
    tls: std::sync::Arc<rustls::ClientConfig>,
    promise: usize,
) {
    use tokio::io::AsyncWriteExt;
    let Ok(tcp) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return;
    };
    if index % 4 == 0 {
        return std::future::pending::<()>().await;
    }
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let Ok(mut stream) = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    else {
        return;
    };
    let length = match index % 4 {
        1 => return std::future::pending::<()>().await,
        2 => 100_000_000,
        _ => promise,
    };
    let head = format!(
        "POST /mutate-pods HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    while stream.write_all(b" ").await.is_ok() && stream.flush().await.is_ok() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn hundreds_of_idle_and_trickling_connections_leave_admission_and_reports_working_in_bounded_memory()
 {
    let plane = plane().await;
    let namespace = "psinj-slow";
    namespace_with_policy(plane, namespace).await;
    let (release, operator) =
        operator_with_webhook(plane, "psinj-lease-slow", IpAddr::from([127, 0, 0, 1])).await;
    let client = plane.client().unwrap();
    create_injected(&client, namespace, "web-before").await;
    let before = operator.rss_kib().unwrap();
    let webhook_ca = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), SYSTEM)
        .get("psinj-webhook-ca")
        .await
        .unwrap()
        .data
        .unwrap()[tls::CA_CERT_KEY]
        .clone();
    let webhook_tls = trusting(&String::from_utf8(webhook_ca.0).unwrap());
    let intake_tls = trusting(&operator.ca_pem);
    let intake_port: u16 = operator
        .report_url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..200 {
        clients.spawn(misbehave(
            release.webhook_port,
            index,
            webhook_tls.clone(),
            4_000_000,
        ));
        clients.spawn(misbehave(intake_port, index, intake_tls.clone(), 900_000));
    }
    // Every client connected and the tricklers a few bytes in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded = operator.rss_kib().unwrap();

    let admitted = Instant::now();
    let pod = create_injected(&client, namespace, "web-during").await;
    let admission = admitted.elapsed();
    let token = plane
        .token_for_pod(namespace, "default", "web-during", labels::TOKEN_AUDIENCE)
        .await
        .unwrap();
    let report = json!({
        "policy": {"kind": "PortSentryPolicy", "name": "web"},
        "detections": [{"source": "203.0.113.91", "probes": [
            {"port": 31337, "protocol": "TCP", "kind": "Connect", "verified": true, "observedAtMs": 1_780_000_000_000u64}
        ]}],
    });
    let (status, body) = portsentry_tests::post_report(
        &operator.report_url,
        &operator.ca_pem,
        Some(&token),
        &serde_json::to_vec(&report).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "the report got no answer under load: {body}");
    assert!(injected(&pod));
    let after = operator.rss_kib().unwrap();
    clients.abort_all();
    eprintln!(
        "400 slow connections: admission took {admission:?}; operator RSS {} MiB before, {} MiB loaded, {} MiB after a pod and a report",
        before / 1024,
        loaded / 1024,
        after / 1024
    );
    assert!(
        loaded.max(after) < 128 * 1024,
        "the operator grew to {} MiB",
        loaded.max(after) / 1024
    );
}
