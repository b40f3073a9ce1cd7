//! A real one-node cluster: the kubelet registers the node and runs pods from locally built
//! images on containerd + runc, the pods are reachable from outside the node through the CNI
//! bridge, CoreDNS answers for Services, and kube-router enforces NetworkPolicy.
//! Needs root and tests/build-node (see docs/testing.md).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use futures::FutureExt;
use k8s_openapi::api::{
    core::v1::{Node as NodeObject, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use portsentry_tests::{
    NODE_ADDRESS, NODE_NAME, Node, NodeOptions, POD_CIDR, shared_node, wait_for,
};
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
    let plane = node.control_plane();
    plane.ensure_namespace(namespace).await?;
    let image = node.image("busybox")?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {
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
