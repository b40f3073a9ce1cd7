//! The Helm chart against a real control plane: lint, server-side dry-run, promtool, and
//! `helm install` with the webhook served by the operator's own `webhook` module over HTTPS.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::{Command, Output},
    sync::mpsc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use portsentry_crds::PortSentryPolicy;
use portsentry_operator::{
    inject::{
        self, Settings,
        webhook::{self, PolicyStores, WebhookArgs},
    },
    labels,
    metrics::Metrics,
    tls,
};
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Options, free_port, repo_root, shared, wait_until, wait_value,
};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static INSTALLED: OnceCell<Installed> = OnceCell::const_new();

/// How long a test waits for the API server or the webhook to act.
const WAIT: Duration = Duration::from_secs(30);
const RELEASE: &str = "ps";
const RELEASE_NAMESPACE: &str = "portsentry-system";
const SHOP: &str = "shop";
/// Left to the second release whose webhook is down (the first one excludes it).
const DOWN: &str = "down-test";
const SENSOR_IMAGE: &str = "ghcr.io/portsentry-k8s/portsentry-sensor:test";
const CA_SECRET: &str = "ps-portsentry-operator-webhook-ca";

fn chart() -> PathBuf {
    repo_root().join("charts/portsentry")
}

fn run(mut command: Command) -> Output {
    let shown = format!("{command:?}");
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{shown} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

async fn plane() -> &'static ControlPlane {
    shared(&CONTROL_PLANE, Options::default()).await.unwrap()
}

fn settings() -> Settings {
    Settings {
        image: SENSOR_IMAGE.into(),
        image_pull_policy: Some("IfNotPresent".into()),
        operator_namespace: RELEASE_NAMESPACE.into(),
        report_url: format!(
            "https://{RELEASE}-portsentry-operator.{RELEASE_NAMESPACE}.svc:8443/v1/reports"
        ),
        resources: serde_json::from_value(json!({
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"}
        }))
        .unwrap(),
        token_expiry_seconds: 3600,
        metrics_per_port: false,
    }
}

/// The chart installed with its webhook pointed at this process, which serves it with the
/// operator's `webhook::serve` on a runtime of its own (it outlives each test's runtime).
struct Installed {
    stores: PolicyStores,
}

/// The operator's webhook (`webhook::run`: shared CA Secret, caBundle patch, policy caches,
/// HTTPS) on `port`, on a thread and runtime of its own; and caches for the tests to read.
fn start_webhook(plane: &'static ControlPlane, port: u16) -> PolicyStores {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let client = plane.client().unwrap();
            let (stores, watch) = webhook::watch_policies(client.clone());
            tokio::spawn(watch);
            sender.send(stores).unwrap();
            let args = WebhookArgs {
                webhook_addr: Some(([127, 0, 0, 1], port).into()),
                webhook_dns_names: vec!["127.0.0.1".into()],
                webhook_configuration: Some(format!("{RELEASE}-portsentry-operator")),
                webhook_ca_secret: CA_SECRET.into(),
                webhook_cert_dir: None,
                operator_namespace: RELEASE_NAMESPACE.into(),
                sensor_image: SENSOR_IMAGE.into(),
                sensor_image_pull_policy: settings().image_pull_policy,
                sensor_resources: Some(serde_json::to_string(&settings().resources).unwrap()),
                sensor_token_expiration_seconds: 3600,
                sensor_metrics_per_port: false,
                report_url: settings().report_url,
            };
            let metrics = std::sync::Arc::new(Metrics::new().unwrap());
            if let Err(error) = webhook::run(client, args, Default::default(), metrics).await {
                eprintln!("the webhook stopped: {error}");
            }
        });
    });
    receiver.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn web_policy() -> Value {
    json!({
        "apiVersion": "portsentry.io/v1alpha1",
        "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": SHOP},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [1, 8080, 31337, "40421-40422"], "udp": [31335]},
            "detection": {"scanTrigger": 1}
        }
    })
}

async fn installed() -> &'static Installed {
    INSTALLED
        .get_or_init(|| async {
            let plane = plane().await;
            let client = plane.client().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut helm = plane.helm().unwrap();
            helm.args(["install", RELEASE])
                .arg(chart())
                .args(["-n", RELEASE_NAMESPACE, "--create-namespace"])
                .args([
                    "--set",
                    &format!("webhook.url=https://127.0.0.1:{port}/mutate-pods"),
                ])
                .args(["--set", &format!("webhook.excludeNamespaces={{{DOWN}}}")]);
            run(helm);
            // The operator starts after the chart is installed, as its Deployment would.
            let stores = start_webhook(plane, port);
            plane.ensure_namespace(RELEASE_NAMESPACE).await.unwrap();
            for namespace in [SHOP, DOWN] {
                plane.ensure_namespace(namespace).await.unwrap();
            }
            wait_until(WAIT, "the chart's CRDs to be served", || {
                let api: Api<PortSentryPolicy> = Api::all(client.clone());
                async move { api.list(&Default::default()).await.is_ok() }
            })
            .await
            .unwrap();
            let policies: Api<PortSentryPolicy> = Api::namespaced(client.clone(), SHOP);
            policies
                .patch(
                    "web",
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Apply(web_policy()),
                )
                .await
                .unwrap();
            wait_until(WAIT, "the webhook to see the policy", || {
                let stores = stores.clone();
                async move {
                    stores
                        .snapshot_for(SHOP)
                        .policies
                        .iter()
                        .any(|p| p.metadata.name.as_deref() == Some("web"))
                }
            })
            .await
            .unwrap();
            // The API server picks up a new webhook configuration within a moment.
            wait_until(WAIT, "the API server to call the webhook", || {
                let client = client.clone();
                async move {
                    let pod = create_pod(
                        &client,
                        SHOP,
                        &PodOptions {
                            labels: &[("app", "web")],
                            ..PodOptions::default()
                        },
                    )
                    .await;
                    has_sidecar(&pod)
                }
            })
            .await
            .unwrap();
            Installed { stores }
        })
        .await
}

#[derive(Default)]
struct PodOptions<'a> {
    labels: &'a [(&'a str, &'a str)],
    annotations: &'a [(&'a str, &'a str)],
    ports: &'a [(i32, &'a str)],
    init_containers: Option<Vec<Container>>,
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Creates a pod (generated name) and returns it as the API server stored it.
async fn create_pod(client: &Client, namespace: &str, options: &PodOptions<'_>) -> Pod {
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some("app-".into()),
            labels: Some(map(options.labels)),
            annotations: Some(map(options.annotations)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            init_containers: options.init_containers.clone(),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.k8s.io/pause:3.10".into()),
                ports: Some(
                    options
                        .ports
                        .iter()
                        .map(|(port, protocol)| ContainerPort {
                            container_port: *port,
                            protocol: Some((*protocol).to_owned()),
                            ..ContainerPort::default()
                        })
                        .collect(),
                ),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
}

fn sidecars(pod: &Pod) -> Vec<Container> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.name == inject::SIDECAR_NAME)
        .collect()
}

fn has_sidecar(pod: &Pod) -> bool {
    !sidecars(pod).is_empty()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

#[tokio::test]
async fn helm_lint_is_clean_with_defaults_and_with_every_toggle_on() {
    let plane = plane().await;
    for sets in [
        vec![],
        vec![
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "metrics.grafanaDashboard.enabled=true",
            "webhook.certManager.enabled=true",
            "operator.podDisruptionBudget.maxUnavailable=1",
            "operator.priorityClassName=system-cluster-critical",
            "nodeSensors.podNftables.enabled=true",
        ],
    ] {
        let mut helm = plane.helm().unwrap();
        helm.args(["lint", "--strict"]).arg(chart());
        for set in sets {
            helm.args(["--set", set]);
        }
        let output = run(helm);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("0 chart(s) failed"), "{text}");
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn values_outside_the_schema_are_refused() {
    let plane = plane().await;
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "x"])
        .arg(chart())
        .args(["--set", "webhook.failurePolicy=Sometimes"]);
    let output = helm.output().unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("failurePolicy"), "{text}");
}

#[tokio::test]
async fn helm_template_output_is_accepted_by_a_server_side_dry_run() {
    let plane = plane().await;
    let namespace = "portsentry-dry-run";
    plane.ensure_namespace(namespace).await.unwrap();
    let extra = "extraObjects:\n  - apiVersion: v1\n    kind: ConfigMap\n    metadata:\n      name: \"{{ .Release.Name }}-extra\"\n";
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, extra).unwrap();
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "dry"])
        .arg(chart())
        .args(["-n", namespace, "--include-crds", "-f"])
        .arg(&values)
        .args(["--set", "metrics.grafanaDashboard.enabled=true"]);
    let rendered = run(helm).stdout;
    let manifest = dir.path().join("rendered.yaml");
    std::fs::write(&manifest, &rendered).unwrap();
    let mut kubectl = plane.kubectl().unwrap();
    kubectl
        .args([
            "apply",
            "--dry-run=server",
            "--server-side",
            "-n",
            namespace,
            "-f",
        ])
        .arg(&manifest);
    let output = run(kubectl);
    let text = String::from_utf8_lossy(&output.stdout);
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/portsentrypolicies.portsentry.io",
        "serviceaccount/dry-portsentry-operator",
        "clusterrole.rbac.authorization.k8s.io/dry-portsentry-operator",
        "role.rbac.authorization.k8s.io/dry-portsentry-operator",
        "service/dry-portsentry-operator",
        "deployment.apps/dry-portsentry-operator",
        "poddisruptionbudget.policy/dry-portsentry-operator",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/dry-portsentry-operator",
        "validatingadmissionpolicy.admissionregistration.k8s.io/dry-portsentry-operator",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/dry-portsentry-operator",
        "configmap/dry-portsentry-dashboard",
        "configmap/dry-extra",
    ] {
        assert!(text.contains(kind), "{kind} missing from:\n{text}");
    }
}

fn render_with_monitoring(plane: &ControlPlane, api_versions: &[&str]) -> String {
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "mon"]).arg(chart()).args([
        "-n",
        "monitoring",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.grafanaDashboard.enabled=true",
    ]);
    for api in api_versions {
        helm.args(["--api-versions", api]);
    }
    String::from_utf8(run(helm).stdout).unwrap()
}

#[tokio::test]
async fn the_prometheus_rule_is_rendered_only_when_the_monitoring_api_exists() {
    let plane = plane().await;
    assert!(!render_with_monitoring(plane, &[]).contains("kind: PrometheusRule"));
    assert!(
        render_with_monitoring(plane, &["monitoring.coreos.com/v1"])
            .contains("kind: PrometheusRule")
    );
}

/// Every `portsentry_*` metric named in `text`, histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("portsentry_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        if name.starts_with("portsentry_operator_") || name.starts_with("portsentry_sensor_") {
            names.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

/// True when the crate registers `name` (its registry adds the `portsentry_<crate>_` prefix):
/// some source file of the crate names it as a metric.
fn exported(name: &str) -> bool {
    let (dir, short) = if let Some(short) = name.strip_prefix("portsentry_operator_") {
        ("operator/src", short)
    } else if let Some(short) = name.strip_prefix("portsentry_sensor_") {
        ("sensor/src", short)
    } else {
        return false;
    };
    walk(&repo_root().join(dir))
        .into_iter()
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .any(|path| {
            std::fs::read_to_string(path)
                .unwrap()
                .contains(&format!("\"{short}\""))
        })
}

#[tokio::test]
async fn the_prometheus_rules_pass_promtool_and_name_only_exported_metrics() {
    let plane = plane().await;
    let promtool = PathBuf::from("/usr/bin/promtool");
    assert!(
        promtool.is_file(),
        "promtool is missing: install Debian's prometheus package (apt-get install prometheus)"
    );
    let rendered = render_with_monitoring(plane, &["monitoring.coreos.com/v1"]);
    let rule = portsentry_tests::parse_documents(&rendered)
        .unwrap()
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "PrometheusRule"))
        .unwrap();
    let groups = json!({"groups": rule.data["spec"]["groups"]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&groups).unwrap()).unwrap();
    let mut check = Command::new(&promtool);
    check.args(["check", "rules"]).arg(&file);
    let output = run(check);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
    let alerts: Vec<&str> = groups["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for alert in [
        "PortSentryScanDetected",
        "PortSentryBansNearCap",
        "PortSentryOperatorDown",
        "PortSentryReportsRefused",
        "PortSentrySensorDetectionsLost",
    ] {
        assert!(alerts.contains(&alert), "{alert} missing from {alerts:?}");
    }
    let dashboard = std::fs::read_to_string(chart().join("files/dashboard.json")).unwrap();
    let used: BTreeSet<String> = metric_names(&serde_yaml::to_string(&groups).unwrap())
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<&String> = used.iter().filter(|name| !exported(name)).collect();
    assert!(
        missing.is_empty(),
        "metrics not exported by operator or sensor: {missing:?}"
    );
}

#[tokio::test]
async fn a_pod_in_a_selected_namespace_comes_back_with_the_sensor_injected_as_specified() {
    let installed = installed().await;
    let client = plane().await.client().unwrap();
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            ..PodOptions::default()
        },
    )
    .await;
    let spec = pod.spec.clone().unwrap();
    let sidecar = spec.init_containers.clone().unwrap()[0].clone();
    assert_eq!(sidecar.name, inject::SIDECAR_NAME);
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some(SENSOR_IMAGE));
    // Exactly what the pure functions specify for this policy and pod.
    let snapshot = installed.stores.snapshot_for(SHOP);
    let policy = snapshot
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("web"))
        .unwrap();
    let (decoys, skipped) = inject::decoys_for(
        &policy.spec.rules,
        &BTreeSet::new(),
        inject::SENSOR_METRICS_PORT,
    );
    assert!(skipped.is_empty());
    let expected = inject::sidecar(&decoys, "PortSentryPolicy/web", &settings());
    assert_eq!(sidecar.args, expected.args);
    assert_eq!(
        sidecar.args.clone().unwrap(),
        [
            "--config",
            "/etc/portsentry/portsentry.conf",
            "--tcp",
            "--udp",
            "--log-format",
            "json",
            "--metrics-addr",
            "0.0.0.0:9720",
            "--report-url",
            "https://ps-portsentry-operator.portsentry-system.svc:8443/v1/reports",
            "--report-token-file",
            "/var/run/secrets/portsentry.io/token",
            "--report-ca-file",
            "/etc/portsentry/ca.crt",
            "--report-policy",
            "PortSentryPolicy/web"
        ]
    );
    assert_eq!(sidecar.security_context, expected.security_context);
    assert_eq!(sidecar.resources, expected.resources);
    assert_eq!(sidecar.env, expected.env);
    let probe = sidecar.startup_probe.unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let security = sidecar.security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.unwrap().drop,
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let volumes = spec.volumes.unwrap();
    let token = volumes
        .iter()
        .find(|v| v.name == inject::TOKEN_VOLUME)
        .unwrap();
    let token = token.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience.as_deref(), Some("portsentry.io"));
    assert_eq!(token.expiration_seconds, Some(3600));
    let config = volumes
        .iter()
        .find(|v| v.name == inject::CONFIG_VOLUME)
        .unwrap();
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        "portsentry-sensor-web"
    );
    let sysctls = spec.security_context.unwrap().sysctls.unwrap();
    assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
    assert_eq!(sysctls[0].value, "1");
    assert_eq!(
        annotation(&pod, labels::INJECTED_ANNOTATION),
        Some("PortSentryPolicy/web")
    );
    assert_eq!(
        annotation(&pod, labels::CONFIG_MAP_ANNOTATION),
        Some("portsentry-sensor-web")
    );
    assert_eq!(
        pod.metadata.labels.unwrap()[labels::SENSOR_LABEL],
        "injected"
    );
}

#[tokio::test]
async fn the_operator_patches_its_shared_ca_into_the_charts_webhook_configuration() {
    installed().await;
    let client = plane().await.client().unwrap();
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .get(CA_SECRET)
            .await
            .unwrap();
    let ca = tls::Ca::from_secret(&secret).unwrap();
    let configuration = Api::<
        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    >::all(client)
    .get(&format!("{RELEASE}-portsentry-operator"))
    .await
    .unwrap();
    let webhooks = configuration.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    assert_eq!(
        webhook.client_config.ca_bundle.as_ref().unwrap().0,
        ca.cert_pem.as_bytes()
    );
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(webhook.timeout_seconds, Some(5));
    let rule = &webhook.rules.as_ref().unwrap()[0];
    assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
    let excluded = &webhook
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(excluded.key, "kubernetes.io/metadata.name");
    assert_eq!(excluded.operator, "NotIn");
    for namespace in ["kube-system", RELEASE_NAMESPACE] {
        assert!(
            excluded
                .values
                .as_ref()
                .unwrap()
                .contains(&namespace.to_owned()),
            "{namespace}"
        );
    }
}

#[tokio::test]
async fn a_pod_the_policy_does_not_select_is_left_alone() {
    installed().await;
    let client = plane().await.client().unwrap();
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "db")],
            ..PodOptions::default()
        },
    )
    .await;
    assert!(!has_sidecar(&pod));
    assert_eq!(annotation(&pod, labels::INJECTED_ANNOTATION), None);
}

#[tokio::test]
async fn pods_in_kube_system_are_never_injected() {
    installed().await;
    let plane = plane().await;
    let client = plane.client().unwrap();
    plane.ensure_namespace("kube-system").await.unwrap();
    let everything = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": "everything", "namespace": "kube-system"},
        "spec": {"podSelector": {}, "decoys": {"tcp": [31337]}}
    });
    Api::<PortSentryPolicy>::namespaced(client.clone(), "kube-system")
        .patch(
            "everything",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(everything),
        )
        .await
        .unwrap();
    let pod = create_pod(
        &client,
        "kube-system",
        &PodOptions {
            labels: &[("app", "web")],
            ..PodOptions::default()
        },
    )
    .await;
    assert!(!has_sidecar(&pod));
}

#[tokio::test]
async fn a_pod_already_carrying_the_sensor_is_not_injected_twice() {
    installed().await;
    let client = plane().await.client().unwrap();
    let first = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            ..PodOptions::default()
        },
    )
    .await;
    assert_eq!(sidecars(&first).len(), 1);
    // Re-create it from its own spec, as `kubectl get pod -o yaml | kubectl create -f -` does.
    let mut copy = first.clone();
    copy.metadata = ObjectMeta {
        generate_name: Some("copy-".into()),
        labels: first.metadata.labels.clone(),
        annotations: first.metadata.annotations.clone(),
        ..ObjectMeta::default()
    };
    copy.status = None;
    let again = Api::<Pod>::namespaced(client, SHOP)
        .create(&PostParams::default(), &copy)
        .await
        .unwrap();
    assert_eq!(sidecars(&again).len(), 1);
    assert_eq!(
        again
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .iter()
            .filter(|v| v.name == inject::TOKEN_VOLUME)
            .count(),
        1
    );
}

#[tokio::test]
async fn a_pod_opted_out_by_annotation_is_not_injected() {
    installed().await;
    let client = plane().await.client().unwrap();
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            annotations: &[(labels::INJECT_ANNOTATION, "false")],
            ..PodOptions::default()
        },
    )
    .await;
    assert!(!has_sidecar(&pod));
}

#[tokio::test]
async fn a_decoy_a_container_declares_is_skipped_and_recorded_on_the_pod() {
    installed().await;
    let client = plane().await.client().unwrap();
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            ports: &[(8080, "TCP"), (31335, "UDP")],
            ..PodOptions::default()
        },
    )
    .await;
    assert!(has_sidecar(&pod));
    assert_eq!(
        annotation(&pod, labels::SKIPPED_ANNOTATION),
        Some("8080/TCP,31335/UDP")
    );
    let config_map = annotation(&pod, labels::CONFIG_MAP_ANNOTATION).unwrap();
    assert!(
        config_map.starts_with("portsentry-sensor-web-"),
        "{config_map}"
    );
    let volumes = pod.spec.clone().unwrap().volumes.unwrap();
    let config = volumes
        .iter()
        .find(|v| v.name == inject::CONFIG_VOLUME)
        .unwrap();
    assert_eq!(config.config_map.as_ref().unwrap().name, config_map);
    // Only UDP decoy left out: the sensor no longer watches UDP.
    let args = sidecars(&pod)[0].args.clone().unwrap();
    assert!(
        args.contains(&"--tcp".to_owned()) && !args.contains(&"--udp".to_owned()),
        "{args:?}"
    );
}

#[tokio::test]
async fn with_the_webhook_down_pods_are_refused_under_fail_and_admitted_under_ignore() {
    installed().await;
    let plane = plane().await;
    let client = plane.client().unwrap();
    // A port nothing listens on: the webhook of this second release is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let release = "ps-down";
    let install = |action: &str, policy: &str| {
        let mut helm = plane.helm().unwrap();
        helm.args([action, release])
            .arg(chart())
            .args(["-n", "portsentry-down", "--create-namespace", "--skip-crds"])
            .args([
                "--set",
                &format!("webhook.url=https://127.0.0.1:{closed}/mutate-pods"),
            ])
            .args(["--set", &format!("webhook.failurePolicy={policy}")])
            .args([
                "--set",
                &format!("webhook.caBundle={}", base64(plane.ca_pem().as_bytes())),
            ]);
        run(helm);
    };
    install("install", "Fail");
    let pods: Api<Pod> = Api::namespaced(client.clone(), DOWN);
    let pod = serde_json::from_value::<Pod>(json!({
        "metadata": {"generateName": "down-"},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]}
    }))
    .unwrap();
    let refusal = wait_value(WAIT, "the down webhook to be consulted", || async {
        match pods.create(&PostParams::default(), &pod).await {
            Err(kube::Error::Api(status)) => Some(status.message),
            Ok(_) => None,
            Err(other) => panic!("{other}"),
        }
    })
    .await
    .unwrap();
    assert!(refusal.contains("sensors.portsentry.io"), "{refusal}");
    install("upgrade", "Ignore");
    let admitted = wait_value(
        WAIT,
        "a pod admitted under failurePolicy Ignore",
        || async { pods.create(&PostParams::default(), &pod).await.ok() },
    )
    .await
    .unwrap();
    assert!(!has_sidecar(&admitted));
    let mut uninstall = plane.helm().unwrap();
    // No kubelet here runs the pre-delete cleanup Job (the uninstall suite runs it on the
    // real node).
    uninstall.args(["uninstall", release, "-n", "portsentry-down", "--no-hooks"]);
    run(uninstall);
}

/// A CA for the sensor's `--report-ca-file`: the webhook's shared CA stands in for the
/// intake's (the operator renders its real intake CA into the same key).
async fn intake_ca(client: &Client) -> String {
    let secret =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), RELEASE_NAMESPACE)
            .get(CA_SECRET)
            .await
            .unwrap();
    tls::Ca::from_secret(&secret).unwrap().cert_pem
}

fn base64(bytes: &[u8]) -> String {
    serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn the_rendered_sensor_config_map_matches_what_the_pod_mounts() {
    let installed = installed().await;
    let client = plane().await.client().unwrap();
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            ports: &[(31337, "TCP")],
            ..PodOptions::default()
        },
    )
    .await;
    let name = annotation(&pod, labels::CONFIG_MAP_ANNOTATION).unwrap();
    let skipped =
        inject::parse_skipped_annotation(annotation(&pod, labels::SKIPPED_ANNOTATION).unwrap());
    let snapshot = installed.stores.snapshot_for(SHOP);
    let policy = snapshot
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("web"))
        .unwrap();
    let config_map = inject::build_config_map(
        SHOP,
        name,
        "PortSentryPolicy/web",
        &policy.spec.rules,
        &skipped,
        Some(&intake_ca(&client).await),
    );
    let stored = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, SHOP)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&config_map),
        )
        .await
        .unwrap();
    let conf = &stored.data.unwrap()["portsentry.conf"];
    assert!(
        conf.contains("TCP_PORTS=\"1,8080,40421-40422\"\n"),
        "{conf}"
    );
    assert!(!conf.contains("31337"));
}

/// True when `tools` and root are there; otherwise says what is missing and, with
/// `CI=true`, fails.
fn network_prerequisites(tools: &[&str]) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    let why = format!(
        "needs root (network namespaces) and {tools:?}; root: {root}, missing: {missing:?}"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("not run: {why}");
    false
}

/// The sensor binary built next to this test (`cargo build -p portsentry-sensor`).
fn sensor_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("portsentry-sensor");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p portsentry-sensor` with the same CARGO_TARGET_DIR (tests/run does)",
        path.display()
    );
    path
}

/// A pod's network namespace and a scanner's, joined by veth; removed on drop.
struct PodNet {
    pod: String,
    scanner: String,
}

const POD_IP: &str = "10.232.7.1";

impl PodNet {
    fn new() -> Self {
        let id = std::process::id() % 10_000;
        let net = PodNet {
            pod: format!("pshp{id}"),
            scanner: format!("pshs{id}"),
        };
        for ns in [&net.pod, &net.scanner] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run_args(&["ip", "netns", "add", ns]);
            run_args(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let (a, b) = (format!("psh{id}a"), format!("psh{id}b"));
        run_args(&[
            "ip",
            "link",
            "add",
            &a,
            "netns",
            &net.pod,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &net.scanner,
        ]);
        run_args(&[
            "ip",
            "-n",
            &net.pod,
            "addr",
            "add",
            &format!("{POD_IP}/24"),
            "dev",
            &a,
        ]);
        run_args(&[
            "ip",
            "-n",
            &net.scanner,
            "addr",
            "add",
            "10.232.7.2/24",
            "dev",
            &b,
        ]);
        run_args(&["ip", "-n", &net.pod, "link", "set", &a, "up"]);
        run_args(&["ip", "-n", &net.scanner, "link", "set", &b, "up"]);
        net
    }

    /// A TCP connect from the scanner namespace; true when it was accepted.
    fn connect(&self, port: u16) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.scanner, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{POD_IP}/{port}"))
            .output()
            .unwrap()
            .status
            .success()
    }

    /// GET `path` of the sensor's metrics port, as the kubelet's probe does (from outside the pod).
    fn get(&self, path: &str) -> Option<String> {
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.scanner,
                "curl",
                "-sf",
                "--max-time",
                "2",
            ])
            .arg(format!(
                "http://{POD_IP}:{}{path}",
                inject::SENSOR_METRICS_PORT
            ))
            .output()
            .unwrap();
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.scanner] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn run_args(args: &[&str]) {
    let mut command = Command::new(args[0]);
    command.args(&args[1..]);
    run(command);
}

/// Kills the sensor on drop, even when the test panics.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_injected_sidecar_started_as_specified_runs_a_sensor_that_detects_a_scan() {
    if !network_prerequisites(&["ip", "setpriv", "curl", "bash"]) {
        return;
    }
    let installed = installed().await;
    let client = plane().await.client().unwrap();
    // A pod whose container declares 31337: that decoy is skipped.
    let pod = create_pod(
        &client,
        SHOP,
        &PodOptions {
            labels: &[("app", "web")],
            ports: &[(31337, "TCP")],
            ..PodOptions::default()
        },
    )
    .await;
    let sidecar = sidecars(&pod).remove(0);
    let spec = pod.spec.clone().unwrap();
    // The operator's part: render the ConfigMap the pod mounts.
    let name = annotation(&pod, labels::CONFIG_MAP_ANNOTATION).unwrap();
    let skipped = inject::parse_skipped_annotation(
        annotation(&pod, labels::SKIPPED_ANNOTATION).unwrap_or(""),
    );
    let snapshot = installed.stores.snapshot_for(SHOP);
    let policy = snapshot
        .policies
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("web"))
        .unwrap();
    let config_map = inject::build_config_map(
        SHOP,
        name,
        "PortSentryPolicy/web",
        &policy.spec.rules,
        &skipped,
        Some(&intake_ca(&client).await),
    );
    let stored = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, SHOP)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&config_map),
        )
        .await
        .unwrap();
    // The kubelet's part: mount the ConfigMap at the volume's mountPath, readable by the
    // sidecar's user, and copy the image's binary somewhere that user can run it.
    let dir = tempfile::tempdir().unwrap();
    let mount = sidecar
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.name == inject::CONFIG_VOLUME)
        .unwrap();
    let config_dir = dir.path().join(mount.mount_path.trim_start_matches('/'));
    std::fs::create_dir_all(&config_dir).unwrap();
    for (key, value) in stored.data.unwrap() {
        std::fs::write(config_dir.join(key), value).unwrap();
    }
    let binary = dir.path().join("portsentry-sensor");
    std::fs::copy(sensor_binary(), &binary).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for entry in walk(dir.path()) {
            let mode = if entry.is_dir() || entry == binary {
                0o755
            } else {
                0o644
            };
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let args: Vec<String> = sidecar
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|arg| match arg.strip_prefix(&mount.mount_path) {
            Some(rest) => format!("{}{rest}", config_dir.display()),
            None => arg,
        })
        .collect();
    let net = PodNet::new();
    // The pod's sysctls, set in its network namespace as the kubelet's runtime does.
    for sysctl in spec
        .security_context
        .and_then(|c| c.sysctls)
        .unwrap_or_default()
    {
        run_args(&[
            "ip",
            "netns",
            "exec",
            &net.pod,
            "sysctl",
            "-w",
            &format!("{}={}", sysctl.name, sysctl.value),
        ]);
    }
    let security = sidecar.security_context.clone().unwrap();
    assert_eq!(
        security.capabilities.unwrap().add,
        None,
        "this policy asks for no capability"
    );
    let uid = security.run_as_user.unwrap().to_string();
    let gid = security.run_as_group.unwrap().to_string();
    let log = dir.path().join("sensor.log");
    let mut command = Command::new("ip");
    command
        .args([
            "netns",
            "exec",
            &net.pod,
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &gid,
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&binary)
        .args(&args)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("sensor.err")).unwrap());
    let _sensor = Running(command.spawn().unwrap());
    // The startup probe.
    wait_until(Duration::from_secs(20), "the sensor to be ready", || {
        let ready = net.get("/readyz").is_some();
        async move { ready }
    })
    .await
    .unwrap_or_else(|e| {
        let errors = std::fs::read_to_string(dir.path().join("sensor.err")).unwrap_or_default();
        panic!("{e:#}: {errors}")
    });
    // Decoy 1 is below 1024: bound by a non-root sensor thanks to the pod sysctl alone.
    assert!(net.connect(1), "decoy 1 is not listening");
    assert!(net.connect(40421), "decoy 40421 is not listening");
    assert!(
        !net.connect(31337),
        "31337 is declared by the app and must not be a decoy"
    );
    wait_until(Duration::from_secs(10), "a TCP alarm counted", || {
        let metrics = net.get("/metrics").unwrap_or_default();
        let counted = metrics.lines().any(|l| {
            l.starts_with("portsentry_sensor_alarms_total{protocol=\"TCP\"}") && !l.ends_with(" 0")
        });
        async move { counted }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}:\n{}", net.get("/metrics").unwrap_or_default()));
    let errors = std::fs::read_to_string(dir.path().join("sensor.err")).unwrap_or_default();
    let logs = format!(
        "{}{errors}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        logs.contains("10.232.7.2"),
        "the scanner's address is not in the sensor's log:\n{logs}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut paths = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            paths.extend(walk(&path));
        } else {
            paths.push(path);
        }
    }
    paths
}

/// Environment variables of the chart's operator container outside `WebhookArgs`: read by
/// main.rs's own arguments, by tracing (RUST_LOG), or kept for node sensors.
const OTHER_OPERATOR_ENV: &[&str] = &[
    "RUST_LOG",
    "POD_NAME",
    "POD_IP",
    "PORTSENTRY_METRICS_ADDR",
    "PORTSENTRY_REPORT_ADDR",
    "PORTSENTRY_REPORT_SERVICE",
    "PORTSENTRY_REPORT_CA_SECRET",
    "PORTSENTRY_REPORT_DNS_NAMES",
    "PORTSENTRY_NODE_SENSORS",
    "PORTSENTRY_NODE_SENSOR_SETTINGS",
    "PORTSENTRY_POD_NFTABLES_AGENT",
    "PORTSENTRY_PROTECTED_NAMESPACES",
    "PORTSENTRY_PROTECTED_CIDRS",
    "PORTSENTRY_POD_CIDRS",
    "PORTSENTRY_IPV6_GROUP_PREFIX",
    "PORTSENTRY_IPV6_GROUP_AFTER",
];

#[tokio::test]
async fn the_charts_operator_environment_parses_as_the_webhooks_arguments() {
    use clap::{Args, Command as Cli};
    let plane = plane().await;
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "env"])
        .arg(chart())
        .args(["-n", "portsentry-system"]);
    let rendered = String::from_utf8(run(helm).stdout).unwrap();
    let deployment = portsentry_tests::parse_documents(&rendered)
        .unwrap()
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "Deployment"))
        .unwrap();
    let container = &deployment.data["spec"]["template"]["spec"]["containers"][0];
    let cli = WebhookArgs::augment_args(Cli::new("portsentry-operator").no_binary_name(true));
    let long_of: BTreeMap<String, String> = cli
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let mut argv = Vec::new();
    for env in container["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        match (long_of.get(name), env["value"].as_str()) {
            (Some(long), Some(value)) => argv.push(format!("--{long}={value}")),
            // From the downward API (POD_NAMESPACE): the kubelet fills it in.
            (Some(long), None) => argv.push(format!("--{long}=portsentry-system")),
            (None, _) => assert!(
                OTHER_OPERATOR_ENV.contains(&name),
                "the operator reads no {name}"
            ),
        }
    }
    let matches = cli.try_get_matches_from(&argv).unwrap();
    let args = <WebhookArgs as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
    let settings = args.settings().unwrap();
    assert_eq!(args.webhook_addr, Some(([0, 0, 0, 0], 9443).into()));
    assert_eq!(
        args.webhook_configuration.as_deref(),
        Some("env-portsentry-operator")
    );
    assert_eq!(args.webhook_ca_secret, "env-portsentry-operator-webhook-ca");
    assert!(
        args.webhook_dns_names
            .contains(&"env-portsentry-operator.portsentry-system.svc".to_owned())
    );
    assert_eq!(
        settings.image,
        "ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0"
    );
    assert_eq!(
        settings.report_url,
        "https://env-portsentry-operator.portsentry-system.svc:8443/v1/reports"
    );
    assert!(settings.resources.requests.unwrap().contains_key("cpu"));
    assert_eq!(settings.token_expiry_seconds, 3600);
    assert!(
        !settings.metrics_per_port,
        "decoy ports named in sidecar metrics by default"
    );
}

/// A free port of 127.0.0.1 (bound and released).

#[tokio::test]
async fn the_real_operator_binary_accepts_the_charts_arguments_and_environment() {
    let plane = plane().await;
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("portsentry-operator");
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build -p portsentry-operator` with the same CARGO_TARGET_DIR (tests/run does)",
        binary.display()
    );
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "env"])
        .arg(chart())
        .args(["-n", "portsentry-env"])
        .args([
            "--set",
            "operator.hooks.allowCidrs={127.0.0.1/32,fd00::/64}",
        ])
        .args(["--set", "operator.hooks.clusterCidrs={10.244.0.0/16}"]);
    let rendered = String::from_utf8(run(helm).stdout).unwrap();
    for flag in [
        "--hook-allow-cidr=127.0.0.1/32",
        "--hook-allow-cidr=fd00::/64",
        "--hook-deny-cidr=10.244.0.0/16",
    ] {
        assert!(rendered.contains(flag), "{flag} missing");
    }
    let deployment = portsentry_tests::parse_documents(&rendered)
        .unwrap()
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "Deployment"))
        .unwrap();
    let container = &deployment.data["spec"]["template"]["spec"]["containers"][0];
    let mut command = Command::new(&binary);
    command
        .env_clear()
        .env("KUBECONFIG", plane.kubeconfig_path());
    for arg in container["args"].as_array().unwrap() {
        command.arg(arg.as_str().unwrap());
    }
    for env in container["env"].as_array().unwrap() {
        let name = env["name"].as_str().unwrap();
        let value = match (name, env["value"].as_str()) {
            // Addresses keep their variable; the port is one free on this machine.
            (_, Some(value)) if name.ends_with("_ADDR") => {
                assert!(value.starts_with("0.0.0.0:"), "{name}={value}");
                format!("127.0.0.1:{}", free_port().unwrap())
            }
            (_, Some(value)) => value.to_owned(),
            // The downward API, as the kubelet fills it in.
            ("POD_NAME", None) => "env-portsentry-operator-0".to_owned(),
            ("POD_NAMESPACE", None) => "portsentry-env".to_owned(),
            ("POD_IP", None) => "127.0.0.1".to_owned(),
            (other, None) => panic!("{other} has no value and no downward-API stand-in"),
        };
        command.env(name, value);
    }
    let dir = tempfile::tempdir().unwrap();
    let stderr = dir.path().join("operator.err");
    command
        .stdout(std::fs::File::create(dir.path().join("operator.out")).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let mut operator = Running(command.spawn().unwrap());
    // Not a wait for a condition: the operator must still run after 3 s (clap refuses a bad
    // argument at once), so the loop only ends early if it exits.
    let deadline = Instant::now() + Duration::from_secs(3);
    let exited = loop {
        if let Some(status) = operator.0.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let errors = std::fs::read_to_string(&stderr).unwrap_or_default();
    // clap exits 2 with a usage message on an argument or variable it does not accept.
    assert!(
        exited.is_none_or(|status| status.code() != Some(2)) && !errors.contains("Usage:"),
        "the operator refused the chart's command line: {exited:?}\n{errors}"
    );
}

/// The chart's operator ServiceAccount (release `ps`).
const OPERATOR_ACCOUNT: &str = "ps-portsentry-operator";

fn render_admission_policy(plane: &ControlPlane, sets: &[&str]) -> String {
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "ps"])
        .arg(chart())
        .args(["-n", RELEASE_NAMESPACE, "--show-only"])
        .arg("templates/admission-policy.yaml");
    for set in sets {
        helm.args(["--set", set]);
    }
    let output = helm.output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn helm_template_renders_the_admission_policy_bound_to_the_operators_service_account() {
    let rendered = render_admission_policy(plane().await, &[]);
    for expected in [
        "kind: ValidatingAdmissionPolicy\n",
        "kind: ValidatingAdmissionPolicyBinding\n",
        "apiVersion: admissionregistration.k8s.io/v1\n",
        "validationActions: [Deny]",
        &format!("\"system:serviceaccount:{RELEASE_NAMESPACE}:{OPERATOR_ACCOUNT}\""),
        // The labels the operator writes, spelled as labels.rs spells them.
        &format!("'{}'", labels::QUARANTINE_LABEL),
        &format!("'{}'", labels::MANAGED_BY_LABEL),
        &format!("'{}'", labels::MANAGER),
    ] {
        assert!(
            rendered.contains(expected),
            "{expected} missing:\n{rendered}"
        );
    }
}

#[tokio::test]
async fn the_admission_policy_can_be_turned_off_for_clusters_without_it() {
    let rendered =
        render_admission_policy(plane().await, &["operator.admissionPolicy.enabled=false"]);
    assert!(
        !rendered.contains("ValidatingAdmissionPolicy"),
        "{rendered}"
    );
}

/// A client with the operator's own ServiceAccount token (TokenRequest), once the API server
/// enforces the chart's admission policy (it picks new policies up within a moment).
async fn as_the_operator() -> Client {
    static ENFORCED: OnceCell<()> = OnceCell::const_new();
    installed().await;
    let plane = plane().await;
    let client = plane
        .client_for_service_account(RELEASE_NAMESPACE, OPERATOR_ACCOUNT)
        .await
        .unwrap();
    ENFORCED
        .get_or_init(|| async {
            let admin = plane.client().unwrap();
            let probe = plain_pod(&admin).await;
            wait_until(
                WAIT,
                "the API server to enforce the admission policy",
                || {
                    let client = client.clone();
                    let name = probe.clone();
                    async move { change_image(&client, &name).await.is_err() }
                },
            )
            .await
            .unwrap();
        })
        .await;
    client
}

/// A pod of `SHOP` no policy selects (so nothing is injected), by name.
async fn plain_pod(client: &Client) -> String {
    let pod = create_pod(
        client,
        SHOP,
        &PodOptions {
            labels: &[("app", "vap")],
            ..PodOptions::default()
        },
    )
    .await;
    pod.metadata.name.unwrap()
}

async fn change_image(client: &Client, pod: &str) -> Result<Pod, kube::Error> {
    let patch =
        json!({"spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.9"}]}});
    Api::<Pod>::namespaced(client.clone(), SHOP)
        .patch(pod, &PatchParams::default(), &Patch::Strategic(patch))
        .await
}

async fn set_quarantine(client: &Client, pod: &str, value: Value) -> Result<Pod, kube::Error> {
    let patch = json!({"metadata": {"labels": {labels::QUARANTINE_LABEL: value}}});
    Api::<Pod>::namespaced(client.clone(), SHOP)
        .patch(pod, &PatchParams::default(), &Patch::Merge(patch))
        .await
}

fn refusal(result: Result<impl std::fmt::Debug, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "{status:?}");
            status.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_operators_token_cannot_change_a_pods_image() {
    let operator = as_the_operator().await;
    let admin = plane().await.client().unwrap();
    let pod = plain_pod(&admin).await;
    let message = refusal(change_image(&operator, &pod).await);
    assert!(
        message.contains("may change only the label portsentry.io/quarantined"),
        "{message}"
    );
    let stored = Api::<Pod>::namespaced(admin, SHOP).get(&pod).await.unwrap();
    assert_eq!(
        stored.spec.unwrap().containers[0].image.as_deref(),
        Some("registry.k8s.io/pause:3.10")
    );
}

#[tokio::test]
async fn the_operators_token_cannot_change_another_label_of_a_pod() {
    let operator = as_the_operator().await;
    let pod = plain_pod(&plane().await.client().unwrap()).await;
    let patch = json!({"metadata": {"labels": {"app": "other"}}});
    let result = Api::<Pod>::namespaced(operator, SHOP)
        .patch(&pod, &PatchParams::default(), &Patch::Merge(patch))
        .await;
    assert!(refusal(result).contains("portsentry.io/quarantined"));
}

#[tokio::test]
async fn the_operators_token_may_add_and_remove_the_quarantine_label() {
    let operator = as_the_operator().await;
    let pod = plain_pod(&plane().await.client().unwrap()).await;
    let added = set_quarantine(&operator, &pod, json!("true"))
        .await
        .unwrap();
    assert_eq!(
        added.metadata.labels.unwrap()[labels::QUARANTINE_LABEL],
        "true"
    );
    let removed = set_quarantine(&operator, &pod, Value::Null).await.unwrap();
    assert!(
        !removed
            .metadata
            .labels
            .unwrap()
            .contains_key(labels::QUARANTINE_LABEL)
    );
}

fn config_map(name: &str, managed: bool) -> k8s_openapi::api::core::v1::ConfigMap {
    let labels = managed.then(|| map(&[(labels::MANAGED_BY_LABEL, labels::MANAGER)]));
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels,
            ..ObjectMeta::default()
        },
        data: Some(map(&[("key", "before")])),
        ..Default::default()
    }
}

async fn edit_config_map(
    client: &Client,
    name: &str,
) -> Result<k8s_openapi::api::core::v1::ConfigMap, kube::Error> {
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), SHOP)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"key": "after"}})),
        )
        .await
}

#[tokio::test]
async fn the_operators_token_cannot_edit_a_config_map_without_its_managed_by_label() {
    let operator = as_the_operator().await;
    let admin = plane().await.client().unwrap();
    let configs = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin, SHOP);
    configs
        .create(&PostParams::default(), &config_map("tenant-config", false))
        .await
        .unwrap();
    let message = refusal(edit_config_map(&operator, "tenant-config").await);
    assert!(
        message.contains("only ConfigMaps and NetworkPolicies labelled app.kubernetes.io/managed-by=portsentry-operator"),
        "{message}"
    );
    let stored = configs.get("tenant-config").await.unwrap();
    assert_eq!(stored.data.unwrap()["key"], "before");
}

#[tokio::test]
async fn the_operators_token_may_edit_a_config_map_with_its_managed_by_label() {
    let operator = as_the_operator().await;
    let admin = plane().await.client().unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin, SHOP)
        .create(&PostParams::default(), &config_map("operator-config", true))
        .await
        .unwrap();
    let edited = edit_config_map(&operator, "operator-config").await.unwrap();
    assert_eq!(edited.data.unwrap()["key"], "after");
}

#[tokio::test]
async fn the_operators_token_cannot_take_over_a_config_map_by_adding_its_label() {
    let operator = as_the_operator().await;
    let admin = plane().await.client().unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin, SHOP)
        .create(&PostParams::default(), &config_map("taken-config", false))
        .await
        .unwrap();
    let patch = json!({"metadata": {"labels": {labels::MANAGED_BY_LABEL: labels::MANAGER}}});
    let result = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(operator, SHOP)
        .patch(
            "taken-config",
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await;
    assert!(refusal(result).contains("managed-by=portsentry-operator"));
}

fn render_cleanup(plane: &ControlPlane, sets: &[&str]) -> String {
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "ps"])
        .arg(chart())
        .args(["-n", RELEASE_NAMESPACE, "--show-only"])
        .arg("templates/cleanup.yaml");
    for set in sets {
        helm.args(["--set", set]);
    }
    let output = helm.output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_cleanup_job_is_a_pre_delete_hook_run_as_the_operator_outside_its_selector() {
    let plane = plane().await;
    let rendered = render_cleanup(plane, &[]);
    let job = portsentry_tests::parse_documents(&rendered)
        .unwrap()
        .into_iter()
        .find(|o| o.types.as_ref().is_some_and(|t| t.kind == "Job"))
        .unwrap_or_else(|| panic!("no Job in:\n{rendered}"));
    let annotations = job.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations["helm.sh/hook"], "pre-delete");
    let pod = &job.data["spec"]["template"];
    assert_eq!(pod["spec"]["serviceAccountName"], OPERATOR_ACCOUNT);
    assert_eq!(
        pod["metadata"]["annotations"][labels::INJECT_ANNOTATION],
        "false"
    );
    let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"cleanup"), "{args:?}");
    assert!(
        args.contains(&"--deployment=ps-portsentry-operator"),
        "{args:?}"
    );
    assert!(args.contains(&"--node-sensors"), "{args:?}");
    // The cleanup waits for the operator's pods: its own must not match their selector.
    let mut helm = plane.helm().unwrap();
    helm.args(["template", "ps"]).arg(chart()).args([
        "-n",
        RELEASE_NAMESPACE,
        "--show-only",
        "templates/deployment.yaml",
    ]);
    let deployment =
        portsentry_tests::parse_documents(&String::from_utf8(run(helm).stdout).unwrap())
            .unwrap()
            .remove(0);
    let selector = deployment.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .clone();
    let job_labels = pod["metadata"]["labels"].as_object().unwrap();
    assert!(
        !selector.iter().all(|(k, v)| job_labels.get(k) == Some(v)),
        "{job_labels:?} matches the operator's selector {selector:?}"
    );
}

#[tokio::test]
async fn the_cleanup_job_can_be_turned_off() {
    let rendered = render_cleanup(plane().await, &["cleanup.enabled=false"]);
    assert!(!rendered.contains("kind: Job"), "{rendered}");
}
