//! `tests/cluster up`: the one-node cluster of the test suite, kept running for a person to
//! try the Kubernetes side: the chart installed, an example shop protected by a policy.
//!
//! It starts the node (tests/build-node's parts, the images of tests/build-images), installs
//! the chart, applies the example workload, writes the state file `tests/cluster scan` and
//! `down` read, and runs until SIGINT or SIGTERM; then every process, namespace and file of
//! the node is removed (the same `Node` type as the suites, torn down on drop).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use portsentry_tests::{
    Node, NodeOptions, OUTSIDE_ADDRESS, apply_documents, injected_ready_pod, install_chart,
    parse_documents,
};
use serde_json::json;

/// The example's namespace, app port and decoys.
const NAMESPACE: &str = "shop";
const WEB_PORT: u16 = 8080;
const DECOYS: &str = "23,79,111,31337,40421";

/// The example workload: a namespace enforcing PSS `restricted`, a PortSentryPolicy that
/// ignores the outside "monitor" address, and a busybox web Deployment (`IMAGE` replaced by
/// the node's local busybox image).
const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    pod-security.kubernetes.io/enforce: restricted
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryPolicy
metadata:
  name: web
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: web}
  decoys:
    tcp: [23, 79, 111, 31337, 40421]
  detection:
    scanTrigger: 2
    ignore: ["MONITOR/32"]
  response:
    banDuration: 10m
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
        - name: web
          image: IMAGE
          imagePullPolicy: Never
          command: ["sh", "-c", "echo 'welcome to the shop' > /www/index.html && exec httpd -f -p 8080 -h /www"]
          ports: [{containerPort: 8080}]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {drop: [ALL]}
          volumeMounts: [{name: www, mountPath: /www}]
      volumes: [{name: www, emptyDir: {}}]
      terminationGracePeriodSeconds: 1
"#;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some("up"), Some(state)) = (args.get(1).map(String::as_str), args.get(2)) else {
        bail!("usage: cluster up STATE_FILE (run through tests/cluster up | scan | down)");
    };
    up(PathBuf::from(state)).await
}

async fn up(state: PathBuf) -> Result<()> {
    eprintln!(
        "starting the node (control plane, containerd, kubelet, kube-proxy, CoreDNS, kube-router)..."
    );
    let node = Node::start(NodeOptions::default()).await?;
    eprintln!("installing the chart (operator, webhook) with the images of tests/build-images...");
    install_chart(&node, &[]).await?;
    let client = node.control_plane().client()?;
    let workload = WORKLOAD
        .replace("IMAGE", &node.image("busybox")?)
        .replace("MONITOR", OUTSIDE_ADDRESS);
    apply_documents(&client, &parse_documents(&workload)?, NAMESPACE)
        .await
        .context("applying the example workload")?;
    eprintln!("waiting for the shop's web pod (sidecar injected by the webhook) to be Ready...");
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    let pod = injected_ready_pod(&pods, "app=web", Duration::from_secs(180)).await?;
    let address = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("the Ready pod has no address")?;
    let plane = node.control_plane();
    let record = json!({
        "pid": std::process::id(),
        "outside_netns": node.outside_netns(),
        "node_netns": node.netns(),
        "kubeconfig": plane.kubeconfig_path(),
        "kubectl": plane.binaries().bin_dir.join("kubectl"),
        "namespace": NAMESPACE,
        "pod": pod.metadata.name,
        "pod_address": address,
        "web_port": WEB_PORT,
        "decoys": DECOYS,
        "monitor": OUTSIDE_ADDRESS,
    });
    std::fs::write(&state, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", state.display()))?;
    eprintln!(
        "ready: pod {NAMESPACE}/{} at {address}:{WEB_PORT}; decoys {DECOYS}\n\
         kubectl: {} --kubeconfig {} get pods -A\n\
         next: tests/cluster scan   (then tests/cluster down, or Ctrl-C here)",
        pod.metadata.name.as_deref().unwrap_or_default(),
        plane.binaries().bin_dir.join("kubectl").display(),
        plane.kubeconfig_path().display(),
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping the node and removing everything...");
    let _ = std::fs::remove_file(&state);
    drop(node);
    eprintln!("done");
    Ok(())
}
