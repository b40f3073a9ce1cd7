//! `helm uninstall` leaves none of portsentry's enforcement behind, on the real node: the
//! chart's pre-delete hook (`portsentry-operator cleanup`, a Job the kubelet runs) stops the
//! operator and removes the generated NetworkPolicies, the quarantine labels and the
//! node-sensor DaemonSets (whose pods remove the node's nftables table); the pod-nftables
//! agent, deleted by Helm next, removes its tables from the pods. The user's policies stay.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::{Duration, Instant};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_operator::labels::{GENERATED_SELECTOR, QUARANTINE_LABEL};
use portsentry_tests::{
    Node, NodeOptions, OUTSIDE_ADDRESS, RELEASE, RELEASE_NAMESPACE, apply_documents,
    injected_ready_pod, install_chart, parse_documents,
    pod_netns::{POD_TABLE, pod_table},
    wait_value,
};

const NAMESPACE: &str = "shop";
const WEB_PORT: u16 = 8080;
const PAGE: &str = "hello from the pod";
/// An outside address banned by hand (the NetworkPolicy backend enforces it).
const OUTSIDER: &str = "10.237.0.80";
/// An outside address banned by the cluster policy's node sensors.
const NODE_BANNED: &str = "10.237.0.81";
/// The node sensors' table of cluster policy `nodes`.
const NODE_TABLE: &str = "portsentry-nodes";

/// The shop: a policy with quarantine whose bans NetworkPolicy enforces (PodNftables for pod
/// sources), its web Deployment, a scanner pod it does not select; a cluster policy whose
/// node sensors drop its bans on the node. `IMAGE` is replaced by the node's busybox.
const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  decoys: {tcp: [31337]}
  response: {quarantine: true}
  enforcement: {backends: [NetworkPolicy, PodNftables]}
---
apiVersion: portsentry.io/v1alpha1
kind: ClusterPortSentryPolicy
metadata: {name: nodes}
spec:
  nodeSelector: {kubernetes.io/os: linux}
  decoys: {tcp: [40999]}
  enforcement: {backends: [NodeNftables]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: IMAGE
          imagePullPolicy: Never
          command: ["sh", "-c", "mkdir -p /tmp/www && echo 'hello from the pod' > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
          ports: [{containerPort: 8080}]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
      terminationGracePeriodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: scanner, namespace: shop, labels: {app: scanner}}
spec:
  containers:
    - name: scanner
      image: IMAGE
      imagePullPolicy: Never
      command: ["sleep", "3600"]
  terminationGracePeriodSeconds: 0
"#;

fn ban(name: &str, namespace: &str, source: &str, kind: &str, policy: &str) -> PortSentryBan {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "portsentry.io/v1alpha1",
        "kind": "PortSentryBan",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": source,
            "policy": {"kind": kind, "name": policy},
            "offences": 1,
            "expiresAt": "2030-01-01T00:00:00Z",
        },
    }))
    .unwrap()
}

fn get_from(node: &Node, source: &str, address: &str) -> std::io::Result<String> {
    node.http_get_as(source, address, WEB_PORT)
}

fn node_table(node: &Node) -> Option<String> {
    let output = node
        .exec_in_node(&["nft", "list", "table", "inet", NODE_TABLE])
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn generated_policies(node: &Node) -> Vec<String> {
    let all: Api<NetworkPolicy> = Api::all(node.control_plane().client().unwrap());
    all.list(&ListParams::default().labels(GENERATED_SELECTOR))
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect()
}

#[tokio::test]
async fn helm_uninstall_removes_generated_policies_quarantine_labels_and_nftables_tables_and_keeps_user_policies()
 {
    let node = Node::start(NodeOptions::default()).await.unwrap();
    install_chart(&node, &["nodeSensors.podNftables.enabled=true"])
        .await
        .unwrap();
    let client = node.control_plane().client().unwrap();
    let workload = WORKLOAD.replace("IMAGE", &node.image("busybox").unwrap());
    apply_documents(&client, &parse_documents(&workload).unwrap(), NAMESPACE)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let web = injected_ready_pod(&pods, "app=web", Duration::from_secs(180))
        .await
        .map_err(|err| err.context(node.log_tails(20)))
        .unwrap();
    let web_address = web.status.as_ref().unwrap().pod_ip.clone().unwrap();
    let scanner_address = wait_value(
        Duration::from_secs(120),
        "the scanner pod's address",
        || {
            let pods = pods.clone();
            async move { pods.get("scanner").await.ok()?.status?.pod_ip }
        },
    )
    .await
    .unwrap();

    // Enforcement in place: a NetworkPolicy for the outsider, the scanner pod quarantined
    // (labelled, egress denied) and in the web pod's own table, the node's table.
    let bans: Api<PortSentryBan> = Api::namespaced(client.clone(), NAMESPACE);
    for ban in [
        ban("outsider", NAMESPACE, OUTSIDER, "PortSentryPolicy", "web"),
        ban(
            "scanner",
            NAMESPACE,
            &scanner_address,
            "PortSentryPolicy",
            "web",
        ),
    ] {
        bans.create(&PostParams::default(), &ban).await.unwrap();
    }
    Api::<PortSentryBan>::namespaced(client.clone(), RELEASE_NAMESPACE)
        .create(
            &PostParams::default(),
            &ban(
                "node-banned",
                RELEASE_NAMESPACE,
                NODE_BANNED,
                "ClusterPortSentryPolicy",
                "nodes",
            ),
        )
        .await
        .unwrap();
    node.add_outside_address(OUTSIDER).unwrap();
    let in_force = wait_value(
        Duration::from_secs(120),
        "every kind of enforcement in force",
        || {
            let (pods, node, web) = (pods.clone(), &node, &web);
            let (scanner_address, web_address) = (&scanner_address, &web_address);
            async move {
                let policies = generated_policies(node).await;
                let quarantined = pods
                    .get("scanner")
                    .await
                    .ok()?
                    .labels()
                    .get(QUARANTINE_LABEL)
                    .is_some_and(|v| v == "true");
                let pod_table =
                    pod_table(web).is_some_and(|t| t.contains(scanner_address.as_str()));
                let node_table = node_table(node).is_some_and(|t| t.contains(NODE_BANNED));
                let outsider_dropped = get_from(node, OUTSIDER, web_address).is_err();
                (policies.len() >= 2 && quarantined && pod_table && node_table && outsider_dropped)
                    .then_some(policies)
            }
        },
    )
    .await;
    let policies = in_force
        .map_err(|err| err.context(node.log_tails(30)))
        .unwrap();
    assert!(
        policies.contains(&format!("{NAMESPACE}/portsentry-quarantine")),
        "{policies:?}"
    );

    // helm uninstall: the hook Job runs on the kubelet before anything is deleted.
    let started = Instant::now();
    let output = node
        .control_plane()
        .helm()
        .unwrap()
        .args(["uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE])
        .args(["--wait", "--timeout", "5m"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm uninstall failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        node.log_tails(30)
    );
    eprintln!("helm uninstall --wait took {:?}", started.elapsed());

    assert_eq!(generated_policies(&node).await, Vec::<String>::new());
    let scanner = pods.get("scanner").await.unwrap();
    assert!(
        !scanner.labels().contains_key(QUARANTINE_LABEL),
        "{:?}",
        scanner.labels()
    );
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    assert!(
        daemon_sets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert_eq!(
        node_table(&node),
        None,
        "the node sensor removed {NODE_TABLE}"
    );
    // The pod-nftables agent's pods stop after Helm deleted their DaemonSet.
    let tables_gone = wait_value(
        Duration::from_secs(60),
        "the web pod's table removed",
        || {
            let web = &web;
            async move { pod_table(web).is_none().then_some(()) }
        },
    )
    .await;
    assert!(
        tables_gone.is_ok(),
        "inet {POD_TABLE} still in the web pod: {:?}",
        pod_table(&web)
    );
    let page = get_from(&node, OUTSIDER, &web_address);
    assert!(
        page.as_ref().is_ok_and(|p| p.contains(PAGE)),
        "the outsider is served again: {page:?}"
    );
    // What users made stays: their policies and bans.
    assert!(
        Api::<PortSentryPolicy>::namespaced(client.clone(), NAMESPACE)
            .get_opt("web")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        bans.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    assert!(
        get_from(&node, OUTSIDE_ADDRESS, &web_address).is_ok(),
        "another client is served"
    );
}
