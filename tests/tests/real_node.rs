//! A real one-node cluster: the kubelet registers the node and runs pods from locally built
//! images on containerd + runc, the pods are reachable from outside the node through the CNI
//! bridge, CoreDNS answers for Services, and kube-router enforces NetworkPolicy.
//! Then the chart on it, from the images of tests/build-images: the operator Ready by its
//! probe, the webhook injecting the native sidecar under PSS `restricted`, and an nmap scan
//! from outside dropped at the pod (kube-router) and at the node (the node sensor's nftables).
//! Needs root, tests/build-node and tests/build-images (see docs/testing.md).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use futures::FutureExt;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Namespace, Node as NodeObject, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use portsentry_crds::{ClusterPortSentryPolicy, PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    NODE_ADDRESS, NODE_NAME, Node, NodeOptions, OPERATOR, OUTSIDE_ADDRESS, POD_CIDR,
    RELEASE_NAMESPACE, install_chart,
    pod_netns::{POD_TABLE, nft_in_pod, pod_process, pod_table},
    prometheus, shared_node, wait_for, wait_value,
};
use std::time::Instant;
use tokio::sync::OnceCell;

static NODE: OnceCell<Node> = OnceCell::const_new();

async fn node() -> &'static Node {
    shared_node(&NODE, NodeOptions::default())
        .await
        .expect("starting the test node")
}

const WEB_PORT: u16 = 8080;
const PAGE: &str = "hello from the pod";

/// A pod of the busybox image serving [`PAGE`] over HTTP on [`WEB_PORT`], labelled
/// `app=web`; returns its address once it is Ready (its TCP readiness probe passed).
async fn web_pod(node: &Node, namespace: &str) -> Result<String> {
    web_pod_with(node, namespace, false).await
}

/// [`web_pod`], in the node's own network namespace when `host_network` (a node service).
async fn web_pod_with(node: &Node, namespace: &str, host_network: bool) -> Result<String> {
    let plane = node.control_plane();
    plane.ensure_namespace(namespace).await?;
    let image = node.image("busybox")?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {
            "hostNetwork": host_network,
            "containers": [{
                "name": "web",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", format!(
                    "mkdir -p /tmp/www && echo '{PAGE}' > /tmp/www/index.html && \
                     exec httpd -f -p {WEB_PORT} -h /tmp/www"
                )],
                "ports": [{"containerPort": WEB_PORT}],
                "readinessProbe": {
                    "tcpSocket": {"port": WEB_PORT},
                    "periodSeconds": 1,
                },
            }],
            "terminationGracePeriodSeconds": 0,
        }
    }))?;
    let pods: Api<Pod> = Api::namespaced(plane.client()?, namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .context("creating the web pod")?;
    let check = pods.clone();
    wait_for(Duration::from_secs(90), "the web pod Ready", move || {
        let pods = check.clone();
        async move { Ok(pods.get("web").await.is_ok_and(|pod| pod_ready(&pod))) }.boxed()
    })
    .await
    .map_err(|err| err.context(node.log_tails(15)))?;
    pods.get("web")
        .await?
        .status
        .and_then(|status| status.pod_ip)
        .context("the Ready web pod has no address")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// An HTTP GET of `/` from the outside namespace to `address`:[`WEB_PORT`] (1 s timeout):
/// the page, or the connection's error.
fn get_from_outside(node: &Node, address: &str) -> Result<std::io::Result<String>> {
    let to: SocketAddr = format!("{address}:{WEB_PORT}").parse()?;
    let answer = node.from_outside(
        to,
        b"GET / HTTP/1.0\r\nHost: web\r\n\r\n",
        Duration::from_secs(1),
    )?;
    Ok(answer.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
}

#[tokio::test]
async fn the_kubelet_registers_the_node_ready_on_containerd() {
    let node = node().await;
    let nodes: Api<NodeObject> = Api::all(node.control_plane().client().unwrap());
    let object = nodes.get(NODE_NAME).await.unwrap();
    let status = object.status.unwrap();
    let ready = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready.status, "True", "{ready:?}");
    let info = status.node_info.unwrap();
    assert_eq!(info.kubelet_version, "v1.33.13");
    assert!(
        info.container_runtime_version
            .starts_with("containerd://1.6"),
        "{}",
        info.container_runtime_version
    );
    let addresses: Vec<String> = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.address)
        .collect();
    assert!(
        addresses.contains(&NODE_ADDRESS.to_owned()),
        "{addresses:?}"
    );
    assert_eq!(object.spec.unwrap().pod_cidr.as_deref(), Some(POD_CIDR));
}

#[tokio::test]
async fn a_pod_of_a_local_image_gets_an_address_and_answers_from_outside_the_node() {
    let node = node().await;
    let address = web_pod(node, "reachable").await.unwrap();
    let cidr: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
    assert!(
        cidr.contains(&address.parse::<std::net::Ipv4Addr>().unwrap()),
        "{address} is not in {POD_CIDR}"
    );
    let page = get_from_outside(node, &address)
        .unwrap()
        .expect("the pod answers a connection from outside the node");
    assert!(page.contains(PAGE), "{page}");
}

#[tokio::test]
async fn a_network_policy_denying_ingress_drops_outside_connections_until_deleted() {
    let node = node().await;
    let namespace = "deny-ingress";
    let address = web_pod(node, namespace).await.unwrap();
    let reachable = || {
        get_from_outside(node, &address)
            .unwrap()
            .is_ok_and(|page| page.contains(PAGE))
    };
    assert!(reachable(), "the pod answers before any policy");

    let client: Client = node.control_plane().client().unwrap();
    let policies: Api<NetworkPolicy> = Api::namespaced(client, namespace);
    let deny: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny-ingress", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]},
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &deny)
        .await
        .unwrap();
    let Some(denied_within) = wait_until(Duration::from_secs(60), || !reachable()).await else {
        panic!(
            "kube-router never dropped the outside connection:\n{}",
            node.log_tails(20)
        );
    };
    eprintln!("NetworkPolicy created -> first failed connection from outside: {denied_within:?}");
    let failure = get_from_outside(node, &address).unwrap();
    assert!(failure.is_err(), "the connection fails: {failure:?}");

    policies
        .delete("deny-ingress", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), reachable)
            .await
            .is_some(),
        "the pod never answered again after the policy was deleted"
    );
}

#[tokio::test]
async fn cluster_dns_answers_for_the_api_servers_service() {
    let node = node().await;
    let name = "kubernetes.default.svc.cluster.local";
    let resolved = wait_until(Duration::from_secs(30), || {
        node.exec_in_node(&["busybox", "nslookup", name, NODE_ADDRESS])
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("10.96.0.1"))
    })
    .await;
    let last = node
        .exec_in_node(&["busybox", "nslookup", name, NODE_ADDRESS])
        .unwrap();
    assert!(
        resolved.is_some(),
        "CoreDNS at {NODE_ADDRESS} did not resolve {name} to 10.96.0.1: {}{}",
        String::from_utf8_lossy(&last.stdout),
        String::from_utf8_lossy(&last.stderr)
    );
}

#[tokio::test]
async fn a_pod_resolves_and_reaches_the_api_server_through_the_kubernetes_service() {
    let node = node().await;
    let plane = node.control_plane();
    let namespace = "api-access";
    plane.ensure_namespace(namespace).await.unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "client", "namespace": namespace},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "client",
                "image": node.image("busybox").unwrap(),
                "imagePullPolicy": "Never",
                "command": ["sh", "-c",
                    "nslookup kubernetes.default.svc.cluster.local && \
                     echo | nc -w 3 10.96.0.1 443 >/dev/null && echo connected"],
            }],
        }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(plane.client().unwrap(), namespace);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let check = pods.clone();
    let ended = wait_for(
        Duration::from_secs(90),
        "the client pod to end",
        move || {
            let pods = check.clone();
            async move {
                let phase = pods.get("client").await?.status.and_then(|s| s.phase);
                Ok(matches!(phase.as_deref(), Some("Succeeded" | "Failed")))
            }
            .boxed()
        },
    )
    .await;
    let logs = pods.logs("client", &Default::default()).await;
    ended.unwrap();
    let logs = logs.expect("the kubelet serves the pod's logs through the API server");
    let phase = pods.get("client").await.unwrap().status.unwrap().phase;
    assert_eq!(phase.as_deref(), Some("Succeeded"), "{logs}");
    assert!(logs.contains("10.96.0.1"), "DNS answer: {logs}");
    assert!(logs.trim_end().ends_with("connected"), "nc: {logs}");
}

#[tokio::test]
async fn the_api_server_answers_at_the_kubernetes_service_with_a_certificate_naming_it() {
    let node = node().await;
    let mut config = node.control_plane().admin_config().clone();
    config.cluster_url = "https://10.96.0.1:443".parse().unwrap();
    // From the node's namespace, where kube-proxy's rules send the Service to the API
    // server; the client verifies the certificate against the address 10.96.0.1.
    let answer = node
        .run_in_node(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = Client::try_from(config)?;
                let request = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client.request_text(request).await?)
            })
        })
        .unwrap();
    assert_eq!(answer.trim(), "ok");
}

#[tokio::test]
async fn a_dropped_node_leaves_no_process_cgroup_mount_or_namespace_behind() {
    let node = Node::start(NodeOptions::default()).await.unwrap();
    web_pod(&node, "teardown").await.unwrap();
    let pids = node.process_ids();
    let plane_pids = node.control_plane().process_ids();
    let cgroups = node.cgroup_dirs();
    let namespaces = [node.netns().to_owned(), node.outside_netns().to_owned()];
    let dir = node.dir().to_path_buf();
    assert!(pids.len() > 8, "daemons, shim, pause and web run: {pids:?}");
    assert!(!cgroups.is_empty());

    drop(node);

    let alive: Vec<String> = pids
        .iter()
        .chain(&plane_pids)
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        // A zombie has ended: only its exit status waits for the reaper (PID 1 here, to
        // which the shims and containers are re-parented).
        .filter(|stat| {
            !stat
                .split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    let left: Vec<_> = cgroups.iter().filter(|dir| dir.exists()).collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in &namespaces {
        assert!(!listed.contains(name.as_str()), "{name} left in: {listed}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir_text = dir.display().to_string();
    assert!(!mounts.contains(&dir_text), "mounts under {dir_text} left");
    if std::env::var_os("PORTSENTRY_KEEP_TEMP").is_none() {
        assert!(!dir.exists(), "{dir_text} left");
    }
}

// --- The chart on the node: the operator, the injected sidecar, a ban dropped at the pod ---

static CHART: OnceCell<()> = OnceCell::const_new();
static SHOP_POD: OnceCell<Pod> = OnceCell::const_new();

/// The node with the chart installed from the images of tests/build-images (once).
async fn chart_node() -> &'static Node {
    let node = node().await;
    CHART
        .get_or_try_init(|| install_chart(node, &["nodeSensors.podNftables.enabled=true"]))
        .await
        .expect("installing the chart on the node");
    node
}

/// The protected namespace: Pod Security `restricted` enforced.
const SHOP: &str = "shop";
/// The decoys of the shop's policy: three below 1024.
const DECOYS: &str = "23,79,111,31337,40421";
/// The outside address the shop's policy ignores (a monitoring host): it may touch decoys.
const MONITOR: &str = OUTSIDE_ADDRESS;

/// The `shop` namespace (PSS restricted), a PortSentryPolicy selecting `app=web` and a
/// Deployment `web` (busybox httpd on [`WEB_PORT`], restricted-compliant); its pod once
/// Ready, injected by the operator's webhook.
async fn shop_pod() -> &'static Pod {
    let node = chart_node().await;
    SHOP_POD.get_or_try_init(|| async {
        let plane = node.control_plane();
        let client = plane.client()?;
        restricted_namespace(&client, SHOP).await?;
        let policy: PortSentryPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "portsentry.io/v1alpha1",
            "kind": "PortSentryPolicy",
            "metadata": {"name": "web", "namespace": SHOP},
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "decoys": {"tcp": DECOYS.split(',').map(|p| p.parse::<u16>().unwrap()).collect::<Vec<_>>()},
                "detection": {"scanTrigger": 2, "ignore": [format!("{MONITOR}/32")]},
            },
        }))?;
        Api::<PortSentryPolicy>::namespaced(client.clone(), SHOP)
            .create(&PostParams::default(), &policy)
            .await
            .context("creating the PortSentryPolicy")?;
        let deployment = restricted_web(node, SHOP, 1)?;
        Api::<Deployment>::namespaced(client.clone(), SHOP)
            .create(&PostParams::default(), &deployment)
            .await
            .context("creating the web Deployment")?;
        let pods: Api<Pod> = Api::namespaced(client, SHOP);
        let ready = portsentry_tests::injected_ready_pod(&pods, "app=web", Duration::from_secs(120)).await;
        ready.map_err(|err| err.context(node.log_tails(20)))
    })
    .await
    .expect("the protected web Deployment")
}

/// Creates namespace `name` with Pod Security `restricted` enforced.
async fn restricted_namespace(client: &Client, name: &str) -> Result<()> {
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }},
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .context("creating the restricted namespace")?;
    Ok(())
}

/// A Deployment `web` of `replicas` pods labelled `app=web` in `namespace`: busybox httpd on
/// [`WEB_PORT`] serving [`PAGE`], compliant with PSS `restricted`.
fn restricted_web(node: &Node, namespace: &str, replicas: i32) -> Result<Deployment> {
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "web",
                        "image": node.image("busybox")?,
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", format!(
                            "echo '{PAGE}' > /www/index.html && exec httpd -f -p {WEB_PORT} -h /www"
                        )],
                        "ports": [{"containerPort": WEB_PORT}],
                        "readinessProbe": {"tcpSocket": {"port": WEB_PORT}, "periodSeconds": 1},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "www", "mountPath": "/www"}],
                    }],
                    "volumes": [{"name": "www", "emptyDir": {}}],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        },
    }))?;
    Ok(deployment)
}

fn pod_address(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|status| status.pod_ip.clone())
        .expect("a Ready pod has an address")
}

/// An HTTP GET of the web pod from `source` (an address of the outside namespace).
fn get_from(node: &Node, source: &str, address: &str) -> std::io::Result<String> {
    node.http_get_as(source, address, WEB_PORT)
}

/// `nmap -sT` of `ports` on `target` from `attacker`, started (not waited for).
fn nmap_from(node: &Node, attacker: &str, target: &str, ports: &str) -> std::process::Child {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            node.outside_netns(),
            "nmap",
            "-sT",
            "-Pn",
            "-n",
        ])
        .args([
            "--max-retries",
            "0",
            "-S",
            attacker,
            "-e",
            "eth0",
            "-p",
            ports,
            target,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting nmap (Debian package nmap)")
}

/// The PortSentryBan of `source` in the shop, once it exists.
async fn ban_of(node: &Node, source: &str) -> Option<PortSentryBan> {
    ban_in(node, SHOP, source).await
}

/// The PortSentryBan of `source` in `namespace`, once it exists.
async fn ban_in(node: &Node, namespace: &str, source: &str) -> Option<PortSentryBan> {
    let bans: Api<PortSentryBan> = Api::namespaced(node.control_plane().client().ok()?, namespace);
    let list = bans.list(&ListParams::default()).await.ok()?;
    list.items.into_iter().find(|ban| {
        let banned = ban.spec.source.to_string();
        banned == source || banned == format!("{source}/32")
    })
}

/// Whether a NetworkPolicy of the shop excepts `source` from what its pods may receive.
async fn policy_excepts(node: &Node, source: &str) -> bool {
    let Ok(client) = node.control_plane().client() else {
        return false;
    };
    let policies: Api<NetworkPolicy> = Api::namespaced(client, SHOP);
    let Ok(list) = policies.list(&ListParams::default()).await else {
        return false;
    };
    let text = serde_json::to_string(&list.items).unwrap_or_default();
    text.contains(&format!("\"{source}/32\""))
}

#[tokio::test]
async fn helm_install_brings_the_operator_deployment_ready_by_its_readyz_probe() {
    let node = chart_node().await;
    let pods: Api<Pod> = Api::namespaced(node.control_plane().client().unwrap(), RELEASE_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap();
    let [pod] = list.items.as_slice() else {
        panic!(
            "one operator pod: {:?}",
            list.items
                .iter()
                .map(|p| p.metadata.name.clone())
                .collect::<Vec<_>>()
        )
    };
    assert!(pod_ready(pod), "{:?}", pod.status);
    let probe = pod.spec.as_ref().unwrap().containers[0]
        .readiness_probe
        .clone()
        .and_then(|probe| probe.http_get)
        .expect("an HTTP readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let image = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .image;
    assert!(image.contains("portsentry-operator"), "{image}");
}

#[tokio::test]
async fn the_api_server_calls_the_webhook_through_its_service_and_the_pod_gets_the_native_sidecar()
{
    let node = chart_node().await;
    let client = node.control_plane().client().unwrap();
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(client);
    let hook = hooks.get(OPERATOR).await.unwrap();
    let config = &hook.webhooks.unwrap()[0].client_config;
    assert!(
        config.url.is_none(),
        "the API server is sent to the Service, not a URL"
    );
    let service = config.service.as_ref().expect("a Service reference");
    assert_eq!(
        (service.namespace.as_str(), service.name.as_str()),
        (RELEASE_NAMESPACE, OPERATOR)
    );

    let pod = shop_pod().await;
    let init = pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .clone()
        .unwrap_or_default();
    let sidecar = init
        .iter()
        .find(|c| c.name == "portsentry-sensor")
        .unwrap_or_else(|| panic!("no sidecar injected: {init:?}"));
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    assert!(
        sidecar
            .image
            .as_deref()
            .unwrap_or_default()
            .contains("portsentry-sensor")
    );
}

#[tokio::test]
async fn the_kubelet_starts_the_sidecar_before_the_app_once_its_startup_probe_passed() {
    let pod = shop_pod().await;
    let status = pod.status.as_ref().unwrap();
    let sensor = status
        .init_container_statuses
        .as_ref()
        .and_then(|all| all.iter().find(|c| c.name == "portsentry-sensor"))
        .expect("the sidecar's status");
    assert_eq!(
        sensor.started,
        Some(true),
        "startup probe passed: {sensor:?}"
    );
    assert!(sensor.ready, "{sensor:?}");
    let started = |state: &Option<k8s_openapi::api::core::v1::ContainerState>| {
        state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone())
            .expect("running")
    };
    let app = &status.container_statuses.as_ref().unwrap()[0];
    assert!(
        started(&sensor.state).0 <= started(&app.state).0,
        "sidecar started {:?}, app {:?}",
        sensor.state,
        app.state
    );
    assert_eq!(sensor.restart_count, 0, "{sensor:?}");
}

#[tokio::test]
async fn decoys_below_1024_listen_under_the_pod_sysctl_in_a_restricted_namespace() {
    let node = chart_node().await;
    let pod = shop_pod().await;
    let sysctls = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.security_context.as_ref())
        .and_then(|context| context.sysctls.clone())
        .unwrap_or_default();
    let start = sysctls
        .iter()
        .find(|s| s.name == "net.ipv4.ip_unprivileged_port_start")
        .unwrap_or_else(|| panic!("no unprivileged-port sysctl: {sysctls:?}"));
    assert!(start.value.parse::<u16>().unwrap() <= 23, "{start:?}");
    // The sensor runs as UID 65532 without capabilities; the decoy answers (from the
    // address the policy ignores, so no ban).
    let to: SocketAddr = format!("{}:23", pod_address(pod)).parse().unwrap();
    let answer = node
        .from_outside_as(MONITOR, to, b"", Duration::from_secs(2))
        .unwrap();
    assert!(answer.is_ok(), "decoy 23 does not answer: {answer:?}");

    // The namespace really enforces `restricted`: a root pod is refused.
    let pods: Api<Pod> = Api::namespaced(node.control_plane().client().unwrap(), SHOP);
    let root: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "root", "namespace": SHOP},
        "spec": {"containers": [{"name": "c", "image": node.image("busybox").unwrap()}]},
    }))
    .unwrap();
    let refused = pods.create(&PostParams::default(), &root).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("restricted")),
        "{refused:?}"
    );
}

/// One attack: `nmap` of `decoys` on `address` from `attacker`, then HTTP requests to
/// `address`:[`WEB_PORT`] from it until one fails. Returns nmap start → the start of the
/// first failed request, and its error.
async fn scan_until_dropped(
    node: &Node,
    attacker: &str,
    address: &str,
    decoys: &str,
) -> (Duration, std::io::Error) {
    scan_until_dropped_at(node, attacker, address, address, decoys).await
}

/// [`scan_until_dropped`] with the scan at `scanned` and the requests to `checked` (another
/// pod of the same policy).
async fn scan_until_dropped_at(
    node: &Node,
    attacker: &str,
    scanned: &str,
    checked: &str,
    decoys: &str,
) -> (Duration, std::io::Error) {
    node.add_outside_address(attacker).unwrap();
    let before = get_from(node, attacker, checked);
    assert!(
        before.is_ok_and(|page| page.contains(PAGE)),
        "{attacker} reaches the pod before its scan"
    );
    let start = Instant::now();
    let mut nmap = nmap_from(node, attacker, scanned, decoys);
    let dropped = loop {
        let attempt = start.elapsed();
        if let Err(error) = get_from(node, attacker, checked) {
            break Some((attempt, error));
        }
        if start.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = nmap.kill();
    let scan = nmap.wait_with_output().expect("nmap's output");
    dropped.unwrap_or_else(|| {
        panic!(
            "{attacker} still reaches the pod 60 s after its scan; nmap: {}{}\n{}",
            String::from_utf8_lossy(&scan.stdout),
            String::from_utf8_lossy(&scan.stderr),
            node.log_tails(20)
        )
    })
}

#[tokio::test]
async fn an_nmap_scan_from_outside_is_dropped_at_the_pod_for_the_attacker_only_until_the_ban_is_deleted()
 {
    let node = chart_node().await;
    let address = pod_address(shop_pod().await);
    let attacker = "10.237.0.3";
    let (after, error) = scan_until_dropped(node, attacker, &address, DECOYS).await;
    eprintln!("nmap start -> first failed connection at the pod: {after:?} ({error})");

    let ban = ban_of(node, attacker)
        .await
        .expect("a PortSentryBan of the attacker");
    assert!(
        policy_excepts(node, attacker).await,
        "the generated NetworkPolicy excepts the attacker"
    );
    for _ in 0..3 {
        assert!(
            get_from(node, attacker, &address).is_err(),
            "the attacker stays dropped"
        );
        let other = get_from(node, MONITOR, &address);
        assert!(
            other.as_ref().is_ok_and(|page| page.contains(PAGE)),
            "another source still gets through: {other:?}"
        );
    }

    let bans: Api<PortSentryBan> = Api::namespaced(node.control_plane().client().unwrap(), SHOP);
    bans.delete(&ban.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let restored = wait_until(Duration::from_secs(60), || {
        get_from(node, attacker, &address).is_ok()
    })
    .await;
    assert!(
        restored.is_some(),
        "the attacker never got through again after the ban was deleted"
    );
    eprintln!("ban deleted -> attacker gets through again: {restored:?}");
}

#[tokio::test]
async fn nmap_start_to_dropped_at_the_pod_latency_over_ten_attackers() {
    let node = chart_node().await;
    let address = pod_address(shop_pod().await);
    let mut times = Vec::new();
    for run in 0..10 {
        let attacker = format!("10.237.0.{}", 20 + run);
        let (after, error) = scan_until_dropped(node, &attacker, &address, DECOYS).await;
        eprintln!("run {run}: {attacker}: {after:?} ({})", error.kind());
        times.push(after);
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() - 1];
    eprintln!(
        "nmap start -> first connection dropped at the pod, {} runs: p50 {p50:?}, p99 (max) {p99:?}",
        times.len()
    );
    assert!(
        p99 < Duration::from_secs(10),
        "slower than a 10 s polling bouncer's worst case"
    );
}

/// The decoys of the node sensors (on the node's address).
const NODE_DECOYS: &str = "2323,31338,40422";

#[tokio::test]
async fn a_node_scanner_is_dropped_by_the_node_sensor_daemonsets_nftables_only_for_itself() {
    let node = chart_node().await;
    let client = node.control_plane().client().unwrap();
    // A node service: a host-network pod answering at the node's address.
    let address = web_pod_with(node, "node-service", true).await.unwrap();
    assert_eq!(address, NODE_ADDRESS);
    let policy: ClusterPortSentryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "portsentry.io/v1alpha1",
        "kind": "ClusterPortSentryPolicy",
        "metadata": {"name": "nodes"},
        "spec": {
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "decoys": {"tcp": NODE_DECOYS.split(',').map(|p| p.parse::<u16>().unwrap()).collect::<Vec<_>>()},
            "detection": {"scanTrigger": 2, "ignore": [format!("{MONITOR}/32")]},
            "enforcement": {"backends": ["NodeNftables"]},
        },
    }))
    .unwrap();
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let ready = wait_value(
        Duration::from_secs(120),
        "the node-sensor DaemonSet ready",
        || {
            let sets = sets.clone();
            async move {
                let set = sets.get("portsentry-node-sensor-nodes").await.ok()?;
                let status = set.status?;
                (status.number_ready == 1).then_some(set.spec?.template.spec?)
            }
        },
    )
    .await;
    let spec = ready
        .map_err(|err| err.context(node.log_tails(20)))
        .unwrap();
    assert_eq!(spec.host_network, Some(true));

    let attacker = "10.237.0.4";
    let (after, error) = scan_until_dropped(node, attacker, NODE_ADDRESS, NODE_DECOYS).await;
    eprintln!(
        "node scan: nmap start -> first failed connection to the node service: {after:?} ({error})"
    );
    let table = node
        .exec_in_node(&["nft", "list", "table", "inet", "portsentry-nodes"])
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(attacker),
        "the attacker is in the node sensor's nftables set: {table}"
    );
    let other = get_from(node, MONITOR, NODE_ADDRESS);
    assert!(
        other.as_ref().is_ok_and(|page| page.contains(PAGE)),
        "another source still reaches the node: {other:?}"
    );
}

#[tokio::test]
async fn with_a_restrictive_policy_already_there_the_operator_refuses_to_widen_and_it_still_drops()
{
    let node = chart_node().await;
    let namespace = "guarded";
    let address = web_pod(node, namespace).await.unwrap();
    let client = node.control_plane().client().unwrap();
    // The owner's policy: only the monitor may reach the web pods.
    let only_monitor: NetworkPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-monitor", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{MONITOR}/32")}}]}],
        },
    }))
    .unwrap();
    Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &only_monitor)
        .await
        .unwrap();
    let outsider = "10.237.0.5";
    node.add_outside_address(outsider).unwrap();
    let denied = wait_until(Duration::from_secs(60), || {
        get_from(node, outsider, &address).is_err()
    })
    .await;
    assert!(denied.is_some(), "kube-router enforces the owner's policy");

    let policy: PortSentryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "portsentry.io/v1alpha1",
        "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "decoys": {"tcp": [31337]}},
    }))
    .unwrap();
    let policies: Api<PortSentryPolicy> = Api::namespaced(client.clone(), namespace);
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let ban: PortSentryBan = serde_json::from_value(serde_json::json!({
        "apiVersion": "portsentry.io/v1alpha1",
        "kind": "PortSentryBan",
        "metadata": {"name": "by-hand", "namespace": namespace},
        "spec": {
            "source": "10.237.0.6",
            "policy": {"kind": "PortSentryPolicy", "name": "web"},
            "offences": 1,
            "expiresAt": "2030-01-01T00:00:00Z",
        },
    }))
    .unwrap();
    Api::<PortSentryBan>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &ban)
        .await
        .unwrap();
    let refused = wait_value(
        Duration::from_secs(60),
        "Enforced=False on the policy",
        || {
            let policies = policies.clone();
            async move {
                let status = policies.get("web").await.ok()?.status?;
                status
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Enforced" && c.status == "False")
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(refused.reason, "ExistingNetworkPolicies", "{refused:?}");
    let names: Vec<String> = Api::<NetworkPolicy>::namespaced(client, namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(
        names,
        ["only-monitor"],
        "no generated policy widens the pods"
    );
    for _ in 0..3 {
        assert!(
            get_from(node, outsider, &address).is_err(),
            "what the owner's policy denies stays dropped"
        );
        let monitor = get_from(node, MONITOR, &address);
        assert!(
            monitor.as_ref().is_ok_and(|page| page.contains(PAGE)),
            "{monitor:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Polls `condition` every 250 ms until it holds (how long it took) or `timeout` passes.
async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

// --- PodNftables: bans dropped inside each protected pod's own network namespace ---

/// A namespace where every ingress is denied but the app and decoy ports (so the
/// NetworkPolicy backend could never enforce there), protected by a PortSentryPolicy whose
/// backends are NetworkPolicy then PodNftables (so it falls back), with two pods.
const FORTRESS: &str = "fortress";
const FORTRESS_DECOYS: &str = "31337,40421,40423";
/// The table the pod agent keeps in each pod's network namespace.
static FORTRESS_READY: OnceCell<()> = OnceCell::const_new();

/// The fortress's two Ready pods, in name order (set up once).
async fn fortress_pods() -> Vec<Pod> {
    let node = chart_node().await;
    FORTRESS_READY
        .get_or_try_init(|| async {
            let client = node.control_plane().client()?;
            restricted_namespace(&client, FORTRESS).await?;
            let decoys: Vec<u16> = FORTRESS_DECOYS
                .split(',')
                .map(|p| p.parse().unwrap())
                .collect();
            let ports: Vec<serde_json::Value> = decoys
                .iter()
                .chain([WEB_PORT].iter())
                .map(|port| serde_json::json!({"port": port}))
                .collect();
            for policy in [
                serde_json::json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "default-deny", "namespace": FORTRESS},
                    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
                }),
                serde_json::json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "allow-web", "namespace": FORTRESS},
                    "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                             "policyTypes": ["Ingress"], "ingress": [{"ports": ports}]},
                }),
            ] {
                let policy: NetworkPolicy = serde_json::from_value(policy)?;
                Api::<NetworkPolicy>::namespaced(client.clone(), FORTRESS)
                    .create(&PostParams::default(), &policy)
                    .await?;
            }
            let policy: PortSentryPolicy = serde_json::from_value(serde_json::json!({
                "apiVersion": "portsentry.io/v1alpha1",
                "kind": "PortSentryPolicy",
                "metadata": {"name": "web", "namespace": FORTRESS},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "decoys": {"tcp": decoys},
                    "detection": {"scanTrigger": 2, "ignore": [format!("{MONITOR}/32")]},
                    "enforcement": {"backends": ["NetworkPolicy", "PodNftables"]},
                },
            }))?;
            Api::<PortSentryPolicy>::namespaced(client.clone(), FORTRESS)
                .create(&PostParams::default(), &policy)
                .await?;
            Api::<Deployment>::namespaced(client.clone(), FORTRESS)
                .create(&PostParams::default(), &restricted_web(node, FORTRESS, 2)?)
                .await?;
            anyhow::Ok(())
        })
        .await
        .expect("the fortress namespace");
    ready_fortress_pods(node, 2).await
}

/// The fortress's Ready `app=web` pods once there are `count`, with their table in place
/// (the agent entered them), in name order.
async fn ready_fortress_pods(node: &Node, count: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(node.control_plane().client().unwrap(), FORTRESS);
    let ready = wait_value(
        Duration::from_secs(120),
        "the fortress pods Ready with their tables",
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=web"))
                    .await
                    .ok()?;
                let mut ready: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
                    .collect();
                ready.sort_by_key(ResourceExt::name_any);
                (ready.len() == count && ready.iter().all(|p| pod_table(p).is_some()))
                    .then_some(ready)
            }
        },
    )
    .await;
    ready
        .map_err(|err| err.context(node.log_tails(30)))
        .unwrap()
}

/// An HTTP GET of `address`:[`WEB_PORT`] from inside `pod`'s network namespace (an
/// in-cluster client or scanner), 800 ms timeout.
fn get_from_pod(pod_pid: u32, address: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let to: SocketAddr = format!("{address}:{WEB_PORT}").parse().unwrap();
    let netns = format!("/proc/{pod_pid}/ns/net");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let timeout = Duration::from_millis(800);
        let mut stream = std::net::TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")?;
        let mut page = String::new();
        stream.read_to_string(&mut page)?;
        Ok(page)
    })
    .join()
    .unwrap()
}

async fn delete_ban(node: &Node, namespace: &str, ban: &PortSentryBan) {
    let bans: Api<PortSentryBan> =
        Api::namespaced(node.control_plane().client().unwrap(), namespace);
    bans.delete(&ban.name_any(), &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn pod_nftables_drops_an_outside_scanner_at_every_pod_of_the_policy_despite_default_deny_until_the_ban_is_deleted()
 {
    let node = chart_node().await;
    let pods = fortress_pods().await;
    let (one, two) = (pod_address(&pods[0]), pod_address(&pods[1]));
    let attacker = "10.237.0.40";
    let (after, error) = scan_until_dropped_at(node, attacker, &one, &two, FORTRESS_DECOYS).await;
    eprintln!("nmap start at pod 1 -> dropped at pod 2 (PodNftables): {after:?} ({error})");
    let ban = ban_in(node, FORTRESS, attacker)
        .await
        .expect("the operator made a PortSentryBan of the attacker");
    assert!(
        pod_table(&pods[1]).is_some_and(|t| t.contains(attacker)),
        "the attacker is in pod 2's own table"
    );
    let names: Vec<String> =
        Api::<NetworkPolicy>::namespaced(node.control_plane().client().unwrap(), FORTRESS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
    assert_eq!(
        names,
        ["allow-web", "default-deny"],
        "no NetworkPolicy was generated: the drop is PodNftables'"
    );
    // The policy says which backend enforces, and why not the first.
    let policy =
        Api::<PortSentryPolicy>::namespaced(node.control_plane().client().unwrap(), FORTRESS)
            .get("web")
            .await
            .unwrap();
    let enforced = policy
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Enforced")
        .expect("an Enforced condition");
    assert_eq!(
        (enforced.status.as_str(), enforced.reason.as_str()),
        ("True", "PodNftables"),
        "{enforced:?}"
    );
    assert!(
        enforced.message.contains("NetworkPolicy refused")
            && enforced.message.contains("default-deny"),
        "{}",
        enforced.message
    );
    for address in [&one, &two] {
        assert!(
            get_from(node, attacker, address).is_err(),
            "dropped at {address}"
        );
        let other = get_from(node, MONITOR, address);
        assert!(
            other.as_ref().is_ok_and(|page| page.contains(PAGE)),
            "another source still reaches {address}: {other:?}"
        );
    }
    delete_ban(node, FORTRESS, &ban).await;
    for address in [&one, &two] {
        let restored = wait_until(Duration::from_secs(30), || {
            get_from(node, attacker, address).is_ok()
        })
        .await;
        assert!(
            restored.is_some(),
            "{attacker} never reached {address} again"
        );
        eprintln!("ban deleted -> {attacker} reaches {address} again: {restored:?}");
    }
}

#[tokio::test]
async fn pod_nftables_drops_an_in_cluster_scanner_pod_at_every_pod_of_the_policy() {
    let node = chart_node().await;
    let pods = fortress_pods().await;
    let (one, two) = (pod_address(&pods[0]), pod_address(&pods[1]));
    let plane = node.control_plane();
    plane.ensure_namespace("scanners").await.unwrap();
    let scanner: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "scanner", "namespace": "scanners"},
        "spec": {
            "containers": [{"name": "c", "image": node.image("busybox").unwrap(),
                            "imagePullPolicy": "Never", "command": ["sleep", "3600"]}],
            "terminationGracePeriodSeconds": 0,
        },
    }))
    .unwrap();
    let scanners: Api<Pod> = Api::namespaced(plane.client().unwrap(), "scanners");
    scanners
        .create(&PostParams::default(), &scanner)
        .await
        .unwrap();
    let scanner = wait_value(Duration::from_secs(90), "the scanner pod running", || {
        let scanners = scanners.clone();
        async move {
            let pod = scanners.get("scanner").await.ok()?;
            let running = pod.status.as_ref()?.phase.as_deref() == Some("Running");
            (running && pod_process(&pod).is_some()).then_some(pod)
        }
    })
    .await
    .unwrap();
    let source = pod_address(&scanner);
    let pid = pod_process(&scanner).unwrap();
    assert!(
        get_from_pod(pid, &two).is_ok_and(|page| page.contains(PAGE)),
        "the scanner pod reaches pod 2 before its scan"
    );
    let start = Instant::now();
    let nmap = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["nmap", "-sT", "-Pn", "-n", "--max-retries", "0", "-p"])
        .args([FORTRESS_DECOYS, one.as_str()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dropped = wait_until(Duration::from_secs(60), || get_from_pod(pid, &two).is_err()).await;
    let mut nmap = nmap;
    let _ = nmap.kill();
    let _ = nmap.wait();
    assert!(
        dropped.is_some(),
        "the scanner pod ({source}) still reaches pod 2 60 s after its scan\n{}",
        node.log_tails(20)
    );
    eprintln!(
        "in-cluster scanner: nmap start at pod 1 -> dropped at pod 2: {:?}",
        start.elapsed()
    );
    assert!(get_from_pod(pid, &one).is_err(), "dropped at pod 1 too");
    let ban = ban_in(node, FORTRESS, &source)
        .await
        .expect("a PortSentryBan of the scanner pod");
    let other = get_from(node, MONITOR, &two);
    assert!(
        other.as_ref().is_ok_and(|page| page.contains(PAGE)),
        "{other:?}"
    );
    delete_ban(node, FORTRESS, &ban).await;
    let restored = wait_until(Duration::from_secs(30), || get_from_pod(pid, &two).is_ok()).await;
    assert!(
        restored.is_some(),
        "the scanner pod never got through again"
    );
}

#[tokio::test]
async fn pod_nftables_start_to_dropped_at_the_second_pod_latency_over_ten_attackers() {
    let node = chart_node().await;
    let pods = fortress_pods().await;
    let (one, two) = (pod_address(&pods[0]), pod_address(&pods[1]));
    let mut times = Vec::new();
    for run in 0..10 {
        let attacker = format!("10.237.0.{}", 100 + run);
        let (after, error) =
            scan_until_dropped_at(node, &attacker, &one, &two, FORTRESS_DECOYS).await;
        eprintln!("run {run}: {attacker}: {after:?} ({})", error.kind());
        times.push(after);
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() - 1];
    eprintln!(
        "PodNftables: nmap start at pod 1 -> first connection dropped at pod 2, {} runs: p50 {p50:?}, p99 (max) {p99:?}",
        times.len()
    );
    assert!(p99 < Duration::from_secs(10), "{times:?}");
}

#[tokio::test]
async fn pod_nftables_restores_a_flushed_table_and_enforces_in_a_replacement_pod() {
    let node = chart_node().await;
    let pods = fortress_pods().await;
    let client = node.control_plane().client().unwrap();
    let banned = "10.237.0.61";
    node.add_outside_address(banned).unwrap();
    let ban: PortSentryBan = serde_json::from_value(serde_json::json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": "by-hand", "namespace": FORTRESS},
        "spec": {"source": banned, "policy": {"kind": "PortSentryPolicy", "name": "web"},
                 "offences": 1, "expiresAt": "2030-01-01T00:00:00Z"},
    }))
    .unwrap();
    let bans: Api<PortSentryBan> = Api::namespaced(client.clone(), FORTRESS);
    bans.create(&PostParams::default(), &ban).await.unwrap();
    let two = pod_address(&pods[1]);
    let dropped = wait_until(Duration::from_secs(30), || {
        get_from(node, banned, &two).is_err()
    })
    .await;
    assert!(
        dropped.is_some(),
        "a ban made by hand is dropped at the pod"
    );

    let mut restores = Vec::new();
    for _ in 0..5 {
        let flushed = nft_in_pod(&pods[1], &["flush", "table", "inet", POD_TABLE]).unwrap();
        assert!(flushed.status.success(), "{flushed:?}");
        let start = Instant::now();
        let mut back = None;
        while start.elapsed() < Duration::from_secs(10) {
            // `flush table` empties the chains but keeps the sets' elements: back means the
            // drop rule matching the address set is there again.
            if pod_table(&pods[1]).is_some_and(|t| t.contains(banned) && t.contains("@bans4")) {
                back = Some(start.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let back = back.expect("the flushed table never got its ban back");
        assert!(get_from(node, banned, &two).is_err(), "dropped again");
        eprintln!("flushed table -> ban back in the pod's kernel table: {back:?}");
        restores.push(back);
    }
    assert!(
        restores.iter().all(|t| *t < Duration::from_millis(1500)),
        "{restores:?}"
    );

    // The pod is replaced (a new sandbox, a new network namespace): the new pod gets the ban.
    let pods_api: Api<Pod> = Api::namespaced(client, FORTRESS);
    pods_api
        .delete(&pods[1].name_any(), &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    let fresh = ready_fortress_pods(node, 2).await;
    let replacement = fresh
        .iter()
        .find(|p| p.metadata.uid != pods[1].metadata.uid && p.metadata.uid != pods[0].metadata.uid)
        .expect("a replacement pod");
    assert!(
        pod_table(replacement).is_some_and(|t| t.contains(banned)),
        "the replacement pod's own table holds the ban"
    );
    assert!(get_from(node, banned, &pod_address(replacement)).is_err());
    eprintln!(
        "pod deleted -> replacement Ready with the ban in its table: {:?}",
        deleted.elapsed()
    );
    bans.delete("by-hand", &DeleteParams::default())
        .await
        .unwrap();
}

// --- Prometheus: the chart's scrape settings, alert rules and dashboard on a real server ---

/// The chart's monitoring objects as `helm template` renders them for this release (the
/// cluster serving monitoring.coreos.com/v1, as with prometheus-operator installed).
fn rendered_monitoring(node: &Node) -> Vec<serde_json::Value> {
    let output = node
        .control_plane()
        .helm()
        .unwrap()
        .args(["template", portsentry_tests::RELEASE])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/portsentry"))
        .args(["--namespace", RELEASE_NAMESPACE])
        .args(["--api-versions", "monitoring.coreos.com/v1"])
        .args(["--set", "metrics.serviceMonitor.enabled=true"])
        .args(["--set", "metrics.prometheusRule.enabled=true"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    portsentry_tests::parse_documents(&String::from_utf8_lossy(&output.stdout))
        .unwrap()
        .into_iter()
        .map(|object| serde_json::to_value(object).unwrap())
        .collect()
}

/// Every panel query of the shipped Grafana dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/portsentry/files/dashboard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            walk(&panel["panels"], out);
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let title = panel["title"].as_str().unwrap_or_default().to_owned();
                    out.push((title, expr.to_owned()));
                }
            }
        }
    }
    let mut queries = Vec::new();
    walk(&dashboard["panels"], &mut queries);
    assert!(!queries.is_empty(), "the dashboard has panel queries");
    queries
}

/// Prometheus scrapes the operator (ServiceMonitor) and the injected sidecar (PodMonitor) at
/// their pods' addresses with the labels prometheus-operator gives them, with the chart's
/// rules; the scan alert fires after an nmap scan; every dashboard panel query then parses
/// and returns data. Intervals are 1 s instead of the chart's 30 s (the only change to what
/// is rendered). Debian's Prometheus has no Kubernetes discovery: the targets are found by
/// the test from the monitors' selectors and port names (`prometheus::scrape_jobs`).
#[tokio::test]
async fn prometheus_scrapes_the_chart_targets_fires_the_scan_alert_and_every_dashboard_panel_has_data()
 {
    let node = chart_node().await;
    let address = pod_address(shop_pod().await);
    let documents = rendered_monitoring(node);
    let client = node.control_plane().client().unwrap();
    let jobs = prometheus::scrape_jobs(&documents, &client, "1s")
        .await
        .unwrap();
    let rules = prometheus::rule_file(&documents).unwrap();
    let server = prometheus::Prometheus::start(node.netns(), jobs, &rules, "1s").unwrap();

    // Both kinds of target are up.
    let up = wait_until(Duration::from_secs(60), || {
        let up = server.query("up == 1").unwrap_or_default();
        let jobs: Vec<&str> = up
            .iter()
            .filter_map(|s| s["metric"]["job"].as_str())
            .collect();
        // The scanned pod's own sidecar, not just any sidecar of the node.
        let shop_sidecar = up.iter().any(|s| {
            s["metric"]["namespace"] == SHOP
                && s["metric"]["job"]
                    .as_str()
                    .is_some_and(|j| j.ends_with("-sensors"))
        });
        jobs.contains(&OPERATOR) && shop_sidecar
    })
    .await;
    assert!(
        up.is_some(),
        "operator and sidecar targets up; targets: {}\n{}",
        server
            .get("/api/v1/targets")
            .map(|(_, b)| b)
            .unwrap_or_default(),
        server.log_tail()
    );

    // A scan fires PortSentryScanDetected for the shop's pod.
    let attacker = "10.237.0.70";
    let (after, _) = scan_until_dropped(node, attacker, &address, DECOYS).await;
    eprintln!("scan dropped after {after:?}");
    let fired = wait_until(Duration::from_secs(60), || {
        server.alerts().unwrap_or_default().iter().any(|alert| {
            alert["labels"]["alertname"] == "PortSentryScanDetected"
                && alert["labels"]["namespace"] == SHOP
                && alert["state"] == "firing"
        })
    })
    .await;
    assert!(
        fired.is_some(),
        "PortSentryScanDetected never fired: {:?}\nalarms: {:?}\nup: {:?}\n{}",
        server.alerts(),
        server.query("portsentry_sensor_alarms_total"),
        server.query("up"),
        server.log_tail()
    );
    eprintln!("scan dropped -> PortSentryScanDetected firing: {fired:?}");

    // Every dashboard panel has data (rates need two scrapes after the scan).
    let queries = dashboard_queries();
    let mut empty = Vec::new();
    let all = wait_until(Duration::from_secs(30), || {
        empty = queries
            .iter()
            .filter(|(_, expr)| server.query(expr).map_or(true, |r| r.is_empty()))
            .map(|(title, expr)| format!("{title}: {expr}"))
            .collect();
        empty.is_empty()
    })
    .await;
    for (title, expr) in &queries {
        server
            .query(expr)
            .unwrap_or_else(|e| panic!("panel {title}: Prometheus refuses {expr}: {e}"));
    }
    assert!(all.is_some(), "panels without data: {empty:#?}");
}
