//! Node sensors end to end against a real control plane (with controllers): a
//! ClusterPortSentryPolicy with a nodeSelector becomes a DaemonSet and a ConfigMap; two
//! "nodes" (network namespaces) run the built sensor exactly as the DaemonSet's pod says; an
//! nmap scan of node 1 becomes a cluster ban that node 2's nftables drops.
//!
//! The test plays the parts no process of this control plane plays: the scheduler (it binds
//! the DaemonSet's pods to their nodes) and the kubelet (it mounts the ConfigMap and the
//! projected token where the pod's volumes say, and starts the container's args with only
//! its capabilities). The one stand-in: the API server is reached through `KUBECONFIG` (a
//! token of the node-sensor ServiceAccount bound to the pod) instead of the in-cluster files,
//! whose paths are fixed. Nodes reach the API server and the intake (both on the host's
//! loopback) through forwarders listening on the same loopback port inside each namespace.
//!
//! Needs root, `ip`, `nmap`, `nft` and `setpriv`; with `CI=true` a missing one fails the test.
//! Traffic goes only to addresses inside the namespaces this test creates (10.236.0.0/24).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::FutureExt;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Binding, ConfigMap, Node, ObjectReference, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{ClusterPortSentryPolicy, PortSentryBan};
use portsentry_operator::{cluster::nodes, inject};
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Operator, OperatorSettings, Options, PORTSENTRY_AUDIENCE,
    SERVICE_ACCOUNT_ISSUER, apply_documents, install_crds, parse_documents, prerequisites,
    repo_root, shared, wait_for, workspace_binary,
};
use serde_json::json;
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
const NAMESPACE: &str = "portsentry-system";
const RELEASE: &str = "psnode";
const POLICY: &str = "edge";
const NODE_LABEL: &str = "portsentry.io/psnode-e2e";
const DECOYS: [u16; 5] = [1, 79, 111, 31337, 40421];
/// A real service on node 2 (not a decoy): what the attacker's next connection tries.
const SERVICE_PORT: u16 = 8080;
const ATTACKER: &str = "10.236.0.100";

async fn control_plane() -> Result<&'static ControlPlane> {
    let plane = shared(&CONTROL_PLANE, Options::with_controllers()).await?;
    install_crds(&plane.client()?, Duration::from_secs(60)).await?;
    Ok(plane)
}

fn run(args: &[&str]) -> Result<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))
}

fn must(args: &[&str]) -> Result<()> {
    let output = run(args)?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs `work` on a thread that entered network namespace `netns` (sockets made there stay
/// in it); the test's own threads never change namespace.
fn in_netns<T: Send + 'static>(
    netns: &str,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(work()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread in {netns} panicked"))?
}

/// A listener inside `netns` on `addr` whose connections are relayed to `to` on the host
/// (the API server, the intake): a pod's cluster network, as far as the sensor can tell.
async fn forward(netns: &str, addr: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = in_netns(netns, move || {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(())
}

/// Two node namespaces and an attacker namespace on one bridge (in the attacker's
/// namespace): node 1 10.236.0.1, node 2 10.236.0.2, attacker 10.236.0.100. Removed on drop.
#[derive(Debug)]
struct Nodes {
    names: [String; 2],
    attacker: String,
    addrs: [String; 2],
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Nodes {
    fn new() -> Result<Self> {
        let id = std::process::id() % 10_000;
        let nodes = Self {
            names: [format!("psn1n{id}"), format!("psn2n{id}")],
            attacker: format!("psnan{id}"),
            addrs: ["10.236.0.1".into(), "10.236.0.2".into()],
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("portsentry-nodes-")
                .tempdir()?,
        };
        for ns in nodes.names.iter().chain([&nodes.attacker]) {
            let _ = run(&["ip", "netns", "del", ns]);
            must(&["ip", "netns", "add", ns])?;
            must(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let attacker = nodes.attacker.as_str();
        must(&["ip", "-n", attacker, "link", "add", "br0", "type", "bridge"])?;
        must(&["ip", "-n", attacker, "link", "set", "br0", "up"])?;
        must(&[
            "ip",
            "-n",
            attacker,
            "addr",
            "add",
            &format!("{ATTACKER}/24"),
            "dev",
            "br0",
        ])?;
        for (index, (ns, addr)) in nodes.names.iter().zip(&nodes.addrs).enumerate() {
            let (inner, outer) = (format!("psn{index}{id}a"), format!("psn{index}{id}b"));
            must(&[
                "ip", "link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer,
                "netns", attacker,
            ])?;
            must(&["ip", "-n", attacker, "link", "set", &outer, "master", "br0"])?;
            must(&["ip", "-n", attacker, "link", "set", &outer, "up"])?;
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ])?;
            must(&["ip", "-n", ns, "link", "set", &inner, "up"])?;
        }
        Ok(nodes)
    }

    fn dir(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}", node + 1))
    }

    fn log(&self, node: usize) -> String {
        fs::read_to_string(self.dir(node).join("sensor.log")).unwrap_or_default()
    }

    /// Can the attacker open a TCP connection to `port` of node `node` (1 s timeout)?
    fn attacker_connects(&self, node: usize, port: u16) -> Result<bool> {
        let to: SocketAddr = format!("{}:{port}", self.addrs[node]).parse()?;
        in_netns(&self.attacker, move || {
            Ok(TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
        })
    }

    /// A real `nmap -sT` connect scan of `ports` on node `node` from the attacker.
    fn nmap(&self, node: usize, ports: &str) -> Result<Output> {
        let output = run(&[
            "ip",
            "netns",
            "exec",
            &self.attacker,
            "nmap",
            "-sT",
            "-Pn",
            "-n",
            "--max-retries",
            "0",
            "-p",
            ports,
            &self.addrs[node],
        ])?;
        if !output.status.success() {
            bail!("nmap failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(output)
    }

    /// `nft` in node `node`'s namespace.
    fn nft(&self, node: usize, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "netns", "exec", &self.names[node], "nft"];
        full.extend_from_slice(args);
        run(&full)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for node in 0..2 {
                eprintln!(
                    "--- sensor log of node {} ---\n{}",
                    node + 1,
                    self.log(node)
                );
            }
        }
        for ns in self.names.iter().chain([&self.attacker]) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// The chart's node-sensor part: applies its ServiceAccount, Role and RoleBinding, and
/// returns the account's name and the operator's `PORTSENTRY_NODE_SENSOR_SETTINGS`.
async fn install_chart_node_sensors(plane: &ControlPlane) -> Result<(String, String)> {
    let mut helm = plane.helm()?;
    helm.args(["template", RELEASE])
        .arg(repo_root().join("charts/portsentry"))
        .args([
            "-n",
            NAMESPACE,
            "--show-only",
            "templates/node-sensor-rbac.yaml",
            "--show-only",
            "templates/deployment.yaml",
        ]);
    let output = helm.output()?;
    if !output.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&output.stderr));
    }
    let objects = parse_documents(&String::from_utf8(output.stdout)?)?;
    let kind = |o: &kube::api::DynamicObject| o.types.as_ref().map(|t| t.kind.clone());
    let rbac: Vec<_> = objects
        .iter()
        .filter(|o| kind(o).as_deref() != Some("Deployment"))
        .cloned()
        .collect();
    apply_documents(&plane.client()?, &rbac, NAMESPACE).await?;
    let account = rbac
        .iter()
        .find(|o| kind(o).as_deref() == Some("ServiceAccount"))
        .map(|o| o.name_any())
        .context("the chart renders no node-sensor ServiceAccount")?;
    let deployment = objects
        .iter()
        .find(|o| kind(o).as_deref() == Some("Deployment"))
        .context("the chart renders no operator Deployment")?;
    let settings = deployment.data["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "PORTSENTRY_NODE_SENSOR_SETTINGS")
        .and_then(|e| e["value"].as_str())
        .context("the chart gives the operator no PORTSENTRY_NODE_SENSOR_SETTINGS")?
        .to_owned();
    Ok((account, settings))
}

async fn apply_policy(
    client: &Client,
    name: &str,
    node_selector: Option<serde_json::Value>,
) -> Result<()> {
    let mut spec = json!({
        "decoys": {"tcp": DECOYS},
        "response": {"banDuration": "10m"},
        "enforcement": {"backends": ["NodeNftables"]},
    });
    if let Some(selector) = node_selector {
        spec["nodeSelector"] = selector;
    }
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "ClusterPortSentryPolicy",
        "metadata": {"name": name},
        "spec": spec,
    });
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(policy),
        )
        .await?;
    Ok(())
}

/// A Node object (no kubelet) labelled `NODE_LABEL=label`.
async fn create_node(client: &Client, name: &str, label: &str) -> Result<()> {
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {NODE_LABEL: label}},
    });
    Api::<Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(node),
        )
        .await?;
    Ok(())
}

/// The node a DaemonSet pod is for: the controller pins it with a required node affinity
/// on `metadata.name`.
fn target_node(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|term| term.match_fields.iter().flatten())
        .find(|field| field.key == "metadata.name" && field.operator == "In")
        .and_then(|field| field.values.as_ref()?.first().cloned())
}

/// The scheduler's part: waits for the DaemonSet's pod for each node and binds it there.
async fn bind_daemon_set_pods(client: &Client, node_names: &[String]) -> Result<Vec<Pod>> {
    bind_policy_daemon_set_pods(client, POLICY, node_names).await
}

/// [`bind_daemon_set_pods`] for the DaemonSet of cluster policy `policy`.
async fn bind_policy_daemon_set_pods(
    client: &Client,
    policy: &str,
    node_names: &[String],
) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let selector = nodes::label_selector(policy);
    let mut bound = Vec::new();
    for node in node_names {
        let found = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (pods_c, selector_c, node_c, found_c) =
            (pods.clone(), selector.clone(), node.clone(), found.clone());
        wait_for(
            Duration::from_secs(60),
            &format!("the DaemonSet's pod for {node}"),
            move || {
                let (pods, selector, node, found) = (
                    pods_c.clone(),
                    selector_c.clone(),
                    node_c.clone(),
                    found_c.clone(),
                );
                async move {
                    let list = pods.list(&ListParams::default().labels(&selector)).await?;
                    let pod = list
                        .items
                        .into_iter()
                        .find(|p| target_node(p).as_deref() == Some(node.as_str()));
                    let ok = pod.is_some();
                    *found.lock().unwrap() = pod;
                    Ok(ok)
                }
                .boxed()
            },
        )
        .await?;
        let pod = found.lock().unwrap().take().unwrap();
        let name = pod.name_any();
        let binding = Binding {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            },
        };
        pods.create_subresource::<Binding, serde_json::Value>(
            "binding",
            &name,
            &PostParams::default(),
            &binding,
        )
        .await
        .with_context(|| format!("binding {name} to {node}"))?;
        bound.push(pods.get(&name).await?);
    }
    Ok(bound)
}

/// The kubelet's part for one node: mount the ConfigMap and the projected token where the
/// pod's volumes say (under the node's dir), give the API token through `KUBECONFIG`, and
/// start the container's args in the node's namespace with only its capabilities.
async fn start_node_sensor(
    plane: &ControlPlane,
    nodes: &mut Nodes,
    node: usize,
    pod: &Pod,
    config_map: &ConfigMap,
) -> Result<()> {
    let spec = pod.spec.clone().context("pod without spec")?;
    let container = spec.containers[0].clone();
    let account = spec.service_account_name.clone().unwrap_or_default();
    let dir = nodes.dir(node);
    let mut mounts = Vec::new();
    for mount in container.volume_mounts.clone().unwrap_or_default() {
        let local = dir.join(mount.mount_path.trim_start_matches('/'));
        fs::create_dir_all(&local)?;
        if mount.name == inject::CONFIG_VOLUME {
            for (key, value) in config_map.data.clone().unwrap_or_default() {
                fs::write(local.join(key), value)?;
            }
        } else if mount.name == inject::TOKEN_VOLUME {
            let token = plane
                .token_for_pod(NAMESPACE, &account, &pod.name_any(), PORTSENTRY_AUDIENCE)
                .await?;
            fs::write(local.join("token"), token)?;
        }
        mounts.push((mount.mount_path.clone(), local));
    }
    let api_token = plane
        .token_for_pod(NAMESPACE, &account, &pod.name_any(), SERVICE_ACCOUNT_ISSUER)
        .await?;
    let kubeconfig = dir.join("kubeconfig");
    fs::write(dir.join("ca.crt"), plane.ca_pem())?;
    fs::write(
        &kubeconfig,
        serde_yaml::to_string(&json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {"server": plane.server_url(), "certificate-authority": dir.join("ca.crt")}}],
            "users": [{"name": "u", "user": {"token": api_token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }))?,
    )?;
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|arg| {
            mounts
                .iter()
                .find_map(|(path, local)| {
                    arg.strip_prefix(path.as_str())
                        .map(|rest| format!("{}{rest}", local.display()))
                })
                .unwrap_or(arg)
        })
        .collect();
    // The API server and the intake, reached on the same loopback ports inside the node.
    let apiserver: SocketAddr = plane.server_url().trim_start_matches("https://").parse()?;
    forward(&nodes.names[node], apiserver, apiserver).await?;
    let report_url = args
        .iter()
        .position(|a| a == "--report-url")
        .and_then(|at| args.get(at + 1))
        .context("the node sensor does not report")?;
    let intake: SocketAddr = report_url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("the test reaches only a loopback intake, not {report_url}"))?;
    forward(&nodes.names[node], intake, intake).await?;
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|c| c.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    let keep: String = std::iter::once("-all".to_owned())
        .chain(
            capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    let sensor = workspace_binary("portsentry-sensor", "portsentry-sensor")?;
    let binary = dir.join("portsentry-sensor");
    fs::copy(&sensor, &binary)?;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))?;
    let log = fs::File::create(dir.join("sensor.log"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", &nodes.names[node], "setpriv"])
        .arg(format!("--bounding-set={keep}"))
        .arg(format!("--inh-caps={keep}"))
        .arg("--no-new-privs")
        .arg(&binary)
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env(
            "RUST_LOG",
            "warn,portsentry_sensor::alert=info,portsentry_sensor::ban_watch=info,portsentry_sensor::report=debug",
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    nodes.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = nodes.log(node);
        if text.contains("PortSentry is now active") && text.contains("watching cluster bans") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {} sensor never became active:\n{text}", node + 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain TCP service on `addr` inside `netns`, accepting and closing connections.
fn serve(netns: &str, addr: SocketAddr) -> Result<()> {
    let listener = in_netns(netns, move || TcpListener::bind(addr))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    Ok(())
}

async fn wait_connects(nodes: &Nodes, node: usize, port: u16, want: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if nodes.attacker_connects(node, port).unwrap() == want {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cluster_bans_of(bans: &[PortSentryBan], source: &str) -> Vec<String> {
    bans.iter()
        .filter(|b| {
            b.spec.source.to_string() == source
                && b.spec.policy.name == POLICY
                && b.spec.policy.kind == portsentry_crds::PolicyKind::ClusterPortSentryPolicy
        })
        .map(|b| b.name_any())
        .collect()
}

async fn wait_ban(client: &Client) -> String {
    let api = Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE);
    let found = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let found_c = found.clone();
    wait_for(
        Duration::from_secs(30),
        "a cluster-scope PortSentryBan of the attacker",
        move || {
            let (api, found) = (api.clone(), found_c.clone());
            async move {
                let list = api.list(&ListParams::default()).await?;
                let names = cluster_bans_of(&list.items, ATTACKER);
                let ok = !names.is_empty();
                if let Some(name) = names.into_iter().next() {
                    *found.lock().unwrap() = name;
                }
                Ok(ok)
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    found.lock().unwrap().clone()
}

fn node_sensor_metric(nodes: &Nodes, node: usize, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let to: SocketAddr = format!("127.0.0.1:{}", inject::SENSOR_METRICS_PORT)
        .parse()
        .ok()?;
    let text = in_netns(&nodes.names[node], move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: sensor\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
    .ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Waits until the DaemonSet and ConfigMap of `policy` both exist (`present`) or are both gone.
async fn wait_node_sensor_objects(
    client: &Client,
    policy: &str,
    present: bool,
    what: &str,
) -> Result<()> {
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let name = nodes::object_name(policy);
    wait_for(
        Duration::from_secs(60),
        &format!("the node-sensor DaemonSet and ConfigMap of {policy} {what}"),
        move || {
            let (ds_api, cm_api, name) = (daemon_sets.clone(), config_maps.clone(), name.clone());
            async move {
                let daemon_set = ds_api.get_opt(&name).await?.is_some();
                let config_map = cm_api.get_opt(&name).await?.is_some();
                Ok(daemon_set == present && config_map == present)
            }
            .boxed()
        },
    )
    .await
}

fn security(container: &k8s_openapi::api::core::v1::Container) -> serde_json::Value {
    serde_json::to_value(container.security_context.clone()).unwrap()
}

#[tokio::test]
async fn a_scan_of_one_node_is_dropped_by_every_node_sensor_until_the_ban_is_deleted() {
    if !prerequisites(&["ip", "nmap", "nft", "setpriv"]) {
        return;
    }
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    // The operator runs with the chart's node-sensor settings; the chart's RBAC is applied.
    let (account, settings) = install_chart_node_sensors(plane).await.unwrap();
    let mut operator_settings = OperatorSettings::new("psnode-operator");
    operator_settings.namespace = NAMESPACE.into();
    operator_settings
        .extra_args
        .push(format!("--node-sensor-settings={settings}"));
    let operator = Operator::start(plane, operator_settings).await.unwrap();
    let node_names: Vec<String> = vec!["psnode-1".into(), "psnode-2".into()];
    for name in &node_names {
        create_node(&client, name, "true").await.unwrap();
    }
    apply_policy(&client, POLICY, Some(json!({NODE_LABEL: "true"})))
        .await
        .unwrap();
    let policy = Api::<ClusterPortSentryPolicy>::all(client.clone())
        .get(POLICY)
        .await
        .unwrap();

    // The DaemonSet and the ConfigMap, as the API server stored them.
    let object = nodes::object_name(POLICY);
    let daemon_sets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let (ds_api, cm_api, name) = (daemon_sets.clone(), config_maps.clone(), object.clone());
    wait_for(
        Duration::from_secs(30),
        "the node-sensor DaemonSet and ConfigMap",
        move || {
            let (ds_api, cm_api, name) = (ds_api.clone(), cm_api.clone(), name.clone());
            async move {
                Ok(
                    ds_api.get_opt(&name).await?.is_some()
                        && cm_api.get_opt(&name).await?.is_some(),
                )
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    let daemon_set = daemon_sets.get(&object).await.unwrap();
    let config_map = config_maps.get(&object).await.unwrap();
    let owner = &daemon_set.metadata.owner_references.clone().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ClusterPortSentryPolicy", policy.uid().unwrap().as_str())
    );
    assert_eq!(
        config_map.metadata.owner_references.clone().unwrap()[0].uid,
        policy.uid().unwrap()
    );
    let pod_spec = daemon_set.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod_spec.host_network, Some(true));
    assert_eq!(
        pod_spec.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet")
    );
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some(account.as_str())
    );
    assert_eq!(
        pod_spec.node_selector.clone().unwrap(),
        BTreeMap::from([(NODE_LABEL.to_owned(), "true".to_owned())])
    );
    assert_eq!(
        pod_spec.tolerations.clone().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    assert_eq!(
        pod_spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let container = &pod_spec.containers[0];
    let context = security(container);
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        context["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(
        container.resources.clone().unwrap().requests.unwrap()["cpu"].0,
        "20m"
    );
    let volumes = serde_json::to_value(pod_spec.volumes.clone()).unwrap();
    assert!(
        volumes
            .to_string()
            .contains(r#""audience":"portsentry.io""#),
        "{volumes}"
    );
    let data = config_map.data.clone().unwrap();
    assert_eq!(
        data["portsentry.conf"],
        inject::render_sensor_config(&policy.spec.rules, &[])
    );
    assert!(
        data.get(inject::REPORT_CA_KEY)
            .is_some_and(|ca| ca.contains("BEGIN CERTIFICATE")),
        "the ConfigMap carries no intake CA: {data:?}"
    );

    // Two nodes, each running the sensor exactly as its DaemonSet pod says.
    let pods = bind_daemon_set_pods(&client, &node_names).await.unwrap();
    let mut nodes = Nodes::new().unwrap();
    for (index, pod) in pods.iter().enumerate() {
        start_node_sensor(plane, &mut nodes, index, pod, &config_map)
            .await
            .unwrap();
    }
    serve(
        &nodes.names[1],
        format!("{}:{SERVICE_PORT}", nodes.addrs[1])
            .parse()
            .unwrap(),
    )
    .unwrap();
    assert!(
        nodes.attacker_connects(1, SERVICE_PORT).unwrap(),
        "node 2's service is unreachable before any scan"
    );

    // A scan of node 1 becomes a cluster ban; node 2 drops the attacker.
    let ports = DECOYS.map(|p| p.to_string()).join(",");
    let scanned = Instant::now();
    nodes.nmap(0, &ports).unwrap();
    let ban = wait_ban(&client).await;
    let banned_after = scanned.elapsed();
    let table = nodes::nft_table(POLICY);
    let in_kernel = loop {
        let listed = nodes
            .nft(1, &["list", "set", "inet", &table, "bans4"])
            .unwrap();
        if String::from_utf8_lossy(&listed.stdout).contains(ATTACKER) {
            break scanned.elapsed();
        }
        assert!(
            scanned.elapsed() < Duration::from_secs(30),
            "node 2 never banned {ATTACKER}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        false,
        "node 2 to drop the banned attacker",
    )
    .await;
    eprintln!(
        "scan of node 1 -> cluster ban stored: {banned_after:?}; -> in node 2's nftables set: {in_kernel:?}"
    );
    let stored = Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE)
        .get(&ban)
        .await
        .unwrap();
    assert!(
        stored
            .spec
            .evidence
            .iter()
            .any(|e| e.reporter == format!("node/{}", node_names[0]) && e.verified),
        "the ban's evidence does not name node 1's sensor: {:?}",
        stored.spec.evidence
    );
    let listed = nodes.nft(1, &["list", "table", "inet", &table]).unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(ATTACKER),
        "node 2's table holds no ban of {ATTACKER}:\n{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    assert_eq!(
        node_sensor_metric(&nodes, 1, "portsentry_sensor_node_bans_enforced"),
        Some(1.0)
    );
    let status_api = Api::<ClusterPortSentryPolicy>::all(client.clone());
    wait_for(
        Duration::from_secs(30),
        "the policy's status to count the ban and the sensors",
        move || {
            let api = status_api.clone();
            async move {
                let status = api.get(POLICY).await?.status.unwrap_or_default();
                let enforced = status.conditions.iter().any(|c| {
                    c.type_ == "Enforced" && c.status == "True" && c.reason == "NodeNftables"
                });
                Ok(enforced && status.active_bans == 1 && status.sensors_injected == 2)
            }
            .boxed()
        },
    )
    .await
    .unwrap();

    // kubectl delete unbans on every node.
    let deleted = plane
        .kubectl()
        .unwrap()
        .args(["delete", "portsentryban", "-n", NAMESPACE, &ban])
        .output()
        .unwrap();
    assert!(deleted.status.success(), "{deleted:?}");
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        true,
        "node 2 to let the unbanned attacker in",
    )
    .await;

    // A hand-made ban is enforced the same, and a flushed or deleted table comes back.
    let hand = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": "by-hand", "namespace": NAMESPACE},
        "spec": {"source": ATTACKER, "policy": {"kind": "ClusterPortSentryPolicy", "name": POLICY}},
    });
    Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE)
        .patch(
            "by-hand",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(hand),
        )
        .await
        .unwrap();
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        false,
        "node 2 to drop a hand-made ban",
    )
    .await;
    // Without expiresAt it holds until deleted, yet its kernel element is leased (so a node
    // whose sensor is gone stops dropping): it carries a timeout.
    let set = nodes
        .nft(1, &["list", "set", "inet", &table, "bans4"])
        .unwrap();
    let set = String::from_utf8_lossy(&set.stdout).into_owned();
    assert!(
        set.lines()
            .any(|l| l.contains(ATTACKER) && l.contains("expires")),
        "the hand-made ban's element has no lease:\n{set}"
    );
    let flushed = nodes.nft(1, &["flush", "table", "inet", &table]).unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    let started = Instant::now();
    assert!(
        nodes.attacker_connects(1, SERVICE_PORT).unwrap(),
        "a flushed table still dropped the attacker"
    );
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        false,
        "the flushed rules to come back",
    )
    .await;
    eprintln!("flushed rules restored after {:?}", started.elapsed());
    let removed = nodes.nft(1, &["delete", "table", "inet", &table]).unwrap();
    assert!(removed.status.success(), "{removed:?}");
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        false,
        "the deleted table to come back",
    )
    .await;
    Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE)
        .delete("by-hand", &DeleteParams::default())
        .await
        .unwrap();
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        true,
        "node 2 to forget the hand-made ban",
    )
    .await;

    // A ban past its expiry is kept for escalation (Enforced=False, Expired) but never
    // dropped by a node.
    let now = jiff::Timestamp::now();
    let expires = jiff::Timestamp::from_second(now.as_second() + 6).unwrap();
    let expiring = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": "expiring", "namespace": NAMESPACE},
        "spec": {"source": ATTACKER, "policy": {"kind": "ClusterPortSentryPolicy", "name": POLICY},
                 "lastSeen": jiff::Timestamp::from_second(now.as_second()).unwrap().to_string(),
                 "expiresAt": expires.to_string()},
    });
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE);
    ban_api
        .patch(
            "expiring",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(expiring),
        )
        .await
        .unwrap();
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        false,
        "node 2 to drop an expiring ban",
    )
    .await;
    wait_connects(
        &nodes,
        1,
        SERVICE_PORT,
        true,
        "node 2 to let the attacker in at expiry",
    )
    .await;
    assert!(jiff::Timestamp::now() >= expires, "let in before expiry");
    let kept = ban_api.clone();
    wait_for(
        Duration::from_secs(10),
        "the expired ban kept and marked Expired",
        move || {
            let api = kept.clone();
            async move {
                let ban = api.get("expiring").await?;
                Ok(ban.status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Enforced" && c.reason == "Expired")
                }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    ban_api
        .delete("expiring", &DeleteParams::default())
        .await
        .unwrap();

    // Without a nodeSelector, the node sensors go.
    apply_policy(&client, POLICY, None).await.unwrap();
    let (ds_api, cm_api, name) = (daemon_sets.clone(), config_maps.clone(), object.clone());
    wait_for(
        Duration::from_secs(30),
        "the DaemonSet and ConfigMap to go with the nodeSelector",
        move || {
            let (ds_api, cm_api, name) = (ds_api.clone(), cm_api.clone(), name.clone());
            async move {
                Ok(
                    ds_api.get_opt(&name).await?.is_none()
                        && cm_api.get_opt(&name).await?.is_none(),
                )
            }
            .boxed()
        },
    )
    .await
    .unwrap();
    drop(operator);
    drop(nodes);
}

#[tokio::test]
async fn deleting_a_cluster_policy_garbage_collects_its_node_sensors() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    let (_, settings) = install_chart_node_sensors(plane).await.unwrap();
    let mut operator_settings = OperatorSettings::new("psnode-gc-operator");
    operator_settings.namespace = NAMESPACE.into();
    operator_settings
        .extra_args
        .push(format!("--node-sensor-settings={settings}"));
    let _operator = Operator::start(plane, operator_settings).await.unwrap();
    let policy = "gc-edge";
    apply_policy(&client, policy, Some(json!({NODE_LABEL: "gc"})))
        .await
        .unwrap();
    wait_node_sensor_objects(&client, policy, true, "to appear")
        .await
        .unwrap();
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .delete(policy, &DeleteParams::default())
        .await
        .unwrap();
    wait_node_sensor_objects(
        &client,
        policy,
        false,
        "to be garbage-collected with the policy",
    )
    .await
    .unwrap();
}

/// A Pod standing in for a node sensor: the node-sensor label in the operator namespace,
/// placed on `node` (its `nodeName` set, as after scheduling).
async fn node_sensor_pod(client: &Client, name: &str, node: &str, account: &str) -> Result<()> {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/component": "node-sensor"}},
        "spec": {"nodeName": node, "hostNetwork": true, "serviceAccountName": account,
                 "containers": [{"name": "sensor", "image": "registry.invalid/sensor:1"}]},
    });
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Apply(pod))
        .await?;
    Ok(())
}

fn cluster_report(policy: &str, source: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "policy": {"kind": "ClusterPortSentryPolicy", "name": policy},
        "detections": [{"source": source, "probes": [
            {"port": 31337, "protocol": "TCP", "kind": "Connect", "verified": true,
             "observedAtMs": 1_780_000_000_000u64}
        ]}],
    }))
    .unwrap()
}

#[tokio::test]
async fn a_node_sensor_reports_only_for_nodes_its_cluster_policy_selects() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    let (account, settings) = install_chart_node_sensors(plane).await.unwrap();
    let mut operator_settings = OperatorSettings::new("psnode-intake-operator");
    operator_settings.namespace = NAMESPACE.into();
    operator_settings
        .extra_args
        .push(format!("--node-sensor-settings={settings}"));
    let operator = Operator::start(plane, operator_settings).await.unwrap();
    let policy = "intake-edge";
    apply_policy(&client, policy, Some(json!({NODE_LABEL: "intake"})))
        .await
        .unwrap();
    create_node(&client, "psnode-selected", "intake")
        .await
        .unwrap();
    create_node(&client, "psnode-outside", "elsewhere")
        .await
        .unwrap();
    let post = |pod: String| {
        let (operator, account) = (&operator, account.clone());
        async move {
            let token = plane
                .token_for_pod(NAMESPACE, &account, &pod, PORTSENTRY_AUDIENCE)
                .await
                .unwrap();
            portsentry_tests::post_report(
                &operator.report_url,
                &operator.ca_pem,
                Some(&token),
                &cluster_report(policy, "203.0.113.77"),
            )
            .await
            .unwrap()
        }
    };

    // A node-sensor pod on a node without the policy's label, made by hand (the DaemonSet
    // runs none there): refused, nothing banned. Since issue 13 only the DaemonSet's own
    // pods may report for a node, so the refusal says so before governance is asked.
    node_sensor_pod(&client, "psnode-sensor-outside", "psnode-outside", &account)
        .await
        .unwrap();
    let (status, body) = post("psnode-sensor-outside".into()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not_injected_sensor"), "{body}");
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE);
    let listed = bans.list(&ListParams::default()).await.unwrap().items;
    assert!(cluster_bans_of_policy(&listed, policy).is_empty());

    // The DaemonSet's pod on a selected node: accepted, a cluster ban in the operator
    // namespace, reporter the node.
    let selected = bind_policy_daemon_set_pods(&client, policy, &["psnode-selected".into()])
        .await
        .unwrap();
    let (status, body) = post(selected[0].name_any()).await;
    assert_eq!(status, 200, "{body}");
    let listed = bans.list(&ListParams::default()).await.unwrap().items;
    let ours = cluster_bans_of_policy(&listed, policy);
    assert_eq!(ours.len(), 1, "{listed:?}");
    assert_eq!(ours[0].spec.source.to_string(), "203.0.113.77");
    assert_eq!(ours[0].spec.evidence[0].reporter, "node/psnode-selected");
}

fn cluster_bans_of_policy<'a>(bans: &'a [PortSentryBan], policy: &str) -> Vec<&'a PortSentryBan> {
    bans.iter()
        .filter(|b| {
            b.spec.policy.name == policy
                && b.spec.policy.kind == portsentry_crds::PolicyKind::ClusterPortSentryPolicy
        })
        .collect()
}
