//! A real one-node Kubernetes cluster for the tests: the control plane with kube-scheduler,
//! containerd + runc, kubelet, kube-proxy, CoreDNS and kube-router's policy controller.
//!
//! Everything runs in a network namespace of its own (`psknode<id>`), joined by a veth link
//! to an "outside" namespace (`pskout<id>`) that routes the pod and Service ranges to the
//! node: traffic never leaves the namespaces the test created. The node's daemons also share
//! a private mount namespace (kubelet's and containerd's mounts vanish with them) and a
//! cgroup (`portsentry-node-<id>`, the kubelet's cgroup root) through which every process,
//! containers included, is killed on drop or, if the test process dies, by a watchdog.

use std::{
    env, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use crate::{
    binaries::{Versions, cache_root},
    control_plane::{ControlPlane, Options},
    node_cgroup::{self, create_cgroups},
    node_config::{self, Layout, NODE_ADDRESS, POD_CIDR},
    node_net::{NodeNet, Relay, add_outside_address, enter_netns, exchange, in_netns, run},
    process::{Component, Watchdog},
};

/// What to do when a part of the node is missing; such errors end with it.
pub const NODE_BUILD_HINT: &str = "run tests/build-node as root (it installs Debian's \
containerd, runc, containernetworking-plugins, iptables and ipset, builds kubelet, kube-proxy, \
kube-scheduler, CoreDNS and kube-router, and the node's images) and set PORTSENTRY_NODE_BIN to the folder it \
prints on its last line";

/// The node's name (its `--hostname-override`).
pub const NODE_NAME: &str = "portsentry-node";

/// How to start a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// How long the whole start may take (the kubelet's registration included).
    pub start_timeout: Duration,
    /// Where kubelet, kube-proxy, kube-scheduler, coredns and kube-router are, instead of
    /// `PORTSENTRY_NODE_BIN` or the cache folder of tests/build-node.
    pub bin_dir: Option<PathBuf>,
    /// The control plane's options (controllers are always on: a node needs them).
    pub control_plane: Options,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            start_timeout: Duration::from_secs(180),
            bin_dir: None,
            control_plane: Options::with_controllers(),
        }
    }
}

/// Starts one node per test binary on first use and hands out the same one after.
pub async fn shared_node(
    cell: &'static OnceCell<Node>,
    options: NodeOptions,
) -> Result<&'static Node> {
    cell.get_or_try_init(|| Node::start(options)).await
}

/// A running node. Dropping it kills every process of it (containers too) and removes its
/// namespaces, cgroups and temp dir; `PORTSENTRY_KEEP_TEMP=1` keeps the dir for a look.
#[derive(Debug)]
pub struct Node {
    bin_dir: PathBuf,
    layout: Layout,
    components: Vec<Component>,
    watchdog: Option<Watchdog>,
    relay: Option<Relay>,
    plane: Option<ControlPlane>,
    net: NodeNet,
    cgroup: String,
    // Declared last: removed after the processes are gone.
    dir: TempDir,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl Node {
    /// Starts the control plane and the node's daemons in its namespace, each ready (the
    /// node `Ready` in the API) before this returns. Errors name the component and carry
    /// the tail of its log.
    pub async fn start(options: NodeOptions) -> Result<Self> {
        let bin_dir = match &options.bin_dir {
            Some(dir) => dir.clone(),
            None => node_bin_dir()?,
        };
        for name in [
            "kubelet",
            "kube-proxy",
            "kube-scheduler",
            "coredns",
            "kube-router",
        ] {
            if !bin_dir.join(name).is_file() {
                bail!(
                    "{name} is missing from {}: {NODE_BUILD_HINT}",
                    bin_dir.display()
                );
            }
        }
        for program in [
            "/usr/bin/containerd",
            "/usr/bin/ctr",
            "/usr/bin/containerd-shim-runc-v2",
            "/usr/sbin/runc",
            "/usr/lib/cni/bridge",
            "/usr/sbin/iptables",
            "/usr/sbin/ipset",
            "/usr/bin/nsenter",
            "/usr/bin/unshare",
        ] {
            if !Path::new(program).is_file() {
                bail!("{program} is missing: {NODE_BUILD_HINT}");
            }
        }
        let id = format!(
            "{}{}",
            std::process::id() % 10_000,
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix("portsentry-node-")
            .tempdir()
            .context("creating the node's temp dir (is TMPDIR writable?)")?;
        let layout = Layout {
            root: dir.path().to_path_buf(),
        };
        let cgroup = format!("portsentry-node-{id}");
        let net = NodeNet::create(&id)?;
        create_cgroups(&cgroup)?;
        let mut remove = vec![dir.path().to_path_buf()];
        if keep_temp() {
            remove.clear();
        }
        let watchdog = node_cgroup::watchdog(&cgroup, &[&net.node, &net.outside], &remove)?;
        let mut node = Self {
            bin_dir,
            layout,
            components: Vec::new(),
            watchdog: Some(watchdog),
            relay: None,
            plane: None,
            net,
            cgroup,
            dir,
        };
        let deadline = Instant::now() + options.start_timeout;
        node.start_parts(options.control_plane, deadline).await?;
        Ok(node)
    }

    async fn start_parts(&mut self, plane_options: Options, deadline: Instant) -> Result<()> {
        // The namespaces' holder: the node's network namespace and a private mount namespace
        // (slave of the host's) that every daemon of the node enters.
        let procs = self.procs_file();
        let netns_path = format!("/run/netns/{}", self.net.node);
        let holder = Component::spawn(
            "namespaces",
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                r#"echo $$ > "$1" && exec nsenter --net="$2" -- unshare --mount --propagation slave -- sleep infinity"#.into(),
                "node-namespaces".into(),
                procs.clone(),
                netns_path.clone(),
            ],
            self.layout.path("namespaces.log"),
            None,
        )?;
        let holder_pid = holder.id();
        self.components.push(holder);
        self.wait(0, deadline, "its mount namespace", || {
            let own = fs::read_link("/proc/self/ns/mnt")?;
            let theirs = fs::read_link(format!("/proc/{holder_pid}/ns/mnt"))?;
            Ok(own != theirs)
        })
        .await?;

        // The control plane, started from a thread inside the node's network namespace: its
        // processes live there (the API server can reach the node's pods and Services), and
        // the relay gives the host its address 127.0.0.1:PORT.
        // Bound to every address of the node's namespace: pods reach it at the node's
        // address through the `kubernetes` Service, as in a cluster (see expose_api_server).
        let mut plane_options = plane_options;
        plane_options
            .extra_apiserver_args
            .push("--bind-address=0.0.0.0".into());
        // The kubelet by its address (logs, exec), never by a name looked up in DNS.
        plane_options
            .extra_apiserver_args
            .push("--kubelet-preferred-address-types=InternalIP".into());
        let plane = start_plane_in(&netns_path, plane_options).await?;
        let port: u16 = plane
            .server_url()
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| anyhow!("no port in {}", plane.server_url()))?;
        self.relay = Some(Relay::start(Path::new(&netns_path), port)?);
        let kubeconfig = plane.kubeconfig_path().to_path_buf();
        plane
            .issue_serving_cert(&[NODE_ADDRESS, "127.0.0.1", NODE_NAME])?
            .write(&self.layout.root, "kubelet")?;
        expose_api_server(&plane, port, deadline).await?;
        self.plane = Some(plane);

        // --- containerd, with the CNI config in place (the kubelet reports the node Ready
        // only once the runtime's network is) and the node's images imported ---
        let layout = self.layout.clone();
        node_config::write(
            &layout,
            "cni/net.d/10-portsentry.conflist",
            &node_config::cni_conflist(&layout)?,
        )?;
        let pause = self.image("pause")?;
        node_config::write(
            &layout,
            "containerd/config.toml",
            &node_config::containerd_toml(&layout, &pause),
        )?;
        let containerd = self.spawn(
            "containerd",
            Path::new("/usr/bin/containerd"),
            &[format!(
                "--config={}",
                layout.path("containerd/config.toml").display()
            )],
        )?;
        let socket = layout.containerd_socket();
        self.wait(containerd, deadline, "its socket", || {
            Ok(socket.exists() && ctr_at(&socket, &["version"]).is_ok())
        })
        .await?;
        for image in ["pause", "busybox"] {
            let archive = self.images_dir().join(format!("{image}.tar"));
            self.import_image(&archive)?;
        }

        // --- kubelet ---
        node_config::write(&layout, "resolv.conf", "")?;
        node_config::write(
            &layout,
            "kubelet-config.yaml",
            &node_config::kubelet_yaml(&layout, &format!("/{}", self.cgroup))?,
        )?;
        let kubelet = self.spawn(
            "kubelet",
            &self.bin_dir.join("kubelet"),
            &[
                format!("--config={}", layout.path("kubelet-config.yaml").display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", layout.kubelet_root().display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--node-ip={NODE_ADDRESS}"),
                "--v=2".into(),
            ],
        )?;
        let nodes: Api<NodeObject> = Api::all(self.control_plane().client()?);
        self.wait_async(kubelet, deadline, "the Node object", || async {
            Ok(nodes.get_opt(NODE_NAME).await?.is_some())
        })
        .await?;
        // No controller allocates node CIDRs here: the node's range is the CNI's.
        let pod_cidr = serde_json::json!({"spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}});
        nodes
            .patch(NODE_NAME, &PatchParams::default(), &Patch::Merge(pod_cidr))
            .await
            .context("setting the node's podCIDR")?;

        // --- kube-scheduler (the control plane of the other suites has none: they bind
        // pods themselves), kube-proxy, CoreDNS, kube-router's policy controller ---
        let scheduler = self.spawn(
            "kube-scheduler",
            &self.bin_dir.join("kube-scheduler"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--authentication-kubeconfig={}", kubeconfig.display()),
                format!("--authorization-kubeconfig={}", kubeconfig.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                "--v=2".into(),
            ],
        )?;
        let proxy = self.spawn(
            "kube-proxy",
            &self.bin_dir.join("kube-proxy"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--cluster-cidr={}", node_config::CLUSTER_CIDR),
                "--proxy-mode=iptables".into(),
                // The conntrack table is the host's: leave its size and timeouts alone.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--nodeport-addresses=primary".into(),
                "--v=2".into(),
            ],
        )?;
        node_config::write(&layout, "Corefile", &node_config::corefile(&kubeconfig))?;
        let coredns = self.spawn(
            "coredns",
            &self.bin_dir.join("coredns"),
            &[
                "-conf".into(),
                layout.path("Corefile").display().to_string(),
            ],
        )?;
        let router = self.spawn(
            "kube-router",
            &self.bin_dir.join("kube-router"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={NODE_NAME}"),
                "--run-firewall=true".into(),
                "--run-router=false".into(),
                "--run-service-proxy=false".into(),
                "--enable-cni=false".into(),
                format!("--service-cluster-ip-range={}", node_config::SERVICE_CIDR),
                "--health-port=20244".into(),
                "--metrics-port=0".into(),
                "--v=2".into(),
            ],
        )?;
        let scheduler_log = self.components[scheduler].log.clone();
        self.wait(scheduler, deadline, "its informers synced", || {
            Ok(fs::read_to_string(&scheduler_log)?.contains("Caches are synced"))
        })
        .await?;
        for (index, what, port, path) in [
            (proxy, "its /healthz", 10256, "/healthz"),
            (coredns, "its /ready", 8181, "/ready"),
            (router, "its /healthz", 20244, "/healthz"),
        ] {
            let netns = self.net.node.clone();
            self.wait(index, deadline, what, || http_ok_in(&netns, port, path))
                .await?;
        }
        self.wait_async(kubelet, deadline, "the node Ready", || async {
            Ok(nodes
                .get_opt(NODE_NAME)
                .await?
                .as_ref()
                .is_some_and(node_ready))
        })
        .await
    }

    /// Starts `program` inside the node's namespaces and cgroup; returns its index.
    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<usize> {
        let holder = self.components[0].id().to_string();
        let mut full = vec![
            "-c".to_owned(),
            r#"echo $$ > "$1" && t=$2 && shift 2 && PATH="$PATH:/usr/sbin:/sbin" exec nsenter --target="$t" --mount --net -- "$@""#.to_owned(),
            "node-launch".to_owned(),
            self.procs_file(),
            holder,
            program.display().to_string(),
        ];
        full.extend(args.iter().cloned());
        let pgid = self.components[0].id();
        let component = Component::spawn(
            name,
            Path::new("/bin/sh"),
            &full,
            self.layout.path(&format!("{name}.log")),
            Some(pgid),
        )?;
        self.components.push(component);
        Ok(self.components.len() - 1)
    }

    fn procs_file(&self) -> String {
        format!("/sys/fs/cgroup/pids/{}/cgroup.procs", self.cgroup)
    }

    /// Polls `probe` until it returns `Ok(true)`; fails when component `index` exits or at
    /// the deadline, with the last lines of its log.
    async fn wait(
        &mut self,
        index: usize,
        deadline: Instant,
        what: &str,
        probe: impl Fn() -> Result<bool>,
    ) -> Result<()> {
        loop {
            let last = match probe() {
                Ok(true) => return Ok(()),
                Ok(false) => "not yet".to_owned(),
                Err(err) => format!("{err:#}"),
            };
            self.check(index, deadline, what, &last)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_async<F, Fut>(
        &mut self,
        index: usize,
        deadline: Instant,
        what: &str,
        probe: F,
    ) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        loop {
            let last = match probe().await {
                Ok(true) => return Ok(()),
                Ok(false) => "not yet".to_owned(),
                Err(err) => format!("{err:#}"),
            };
            self.check(index, deadline, what, &last)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn check(&mut self, index: usize, deadline: Instant, what: &str, last: &str) -> Result<()> {
        let component = &mut self.components[index];
        component.ensure_running()?;
        if Instant::now() >= deadline {
            bail!(
                "{} did not get {what} in time (last: {last}); last lines of {}:\n{}",
                component.name,
                component.log.display(),
                component.tail(40)
            );
        }
        Ok(())
    }

    /// `ctr` against the node's containerd, in the `k8s.io` namespace the CRI uses.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        ctr_at(&self.layout.containerd_socket(), args)
    }

    /// Imports an image archive (`docker save` / `buildah push docker-archive:` format, as
    /// tests/build-images and tests/build-node write) into the node: no registry needed.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let path = archive.display().to_string();
        self.ctr(&["images", "import", "--snapshotter=overlayfs", &path])
            .with_context(|| format!("importing the image archive {path} into the node"))?;
        Ok(())
    }

    /// The reference of an image tests/build-node made (`pause`, `busybox`), as imported.
    pub fn image(&self, name: &str) -> Result<String> {
        let file = self.images_dir().join(format!("{name}.ref"));
        let text = fs::read_to_string(&file)
            .with_context(|| format!("reading {}: {NODE_BUILD_HINT}", file.display()))?;
        Ok(text.trim().to_owned())
    }

    fn images_dir(&self) -> PathBuf {
        self.bin_dir
            .parent()
            .map_or_else(|| self.bin_dir.join("images"), |dir| dir.join("images"))
    }

    /// The control plane (its API server runs in the node's namespace; the host reaches it
    /// at [`ControlPlane::server_url`] through a relay).
    pub fn control_plane(&self) -> &ControlPlane {
        self.plane
            .as_ref()
            .expect("a started node has a control plane")
    }

    /// The node's network namespace (`ip netns exec <it> ...`).
    pub fn netns(&self) -> &str {
        &self.net.node
    }

    /// The outside namespace: routed to the node, as a client outside the cluster is.
    pub fn outside_netns(&self) -> &str {
        &self.net.outside
    }

    /// Connects from the outside namespace to `to`, sends `request` and reads the answer
    /// until the peer closes; the inner error is the connection's (refused, timed out...).
    pub fn from_outside(
        &self,
        to: SocketAddr,
        request: &[u8],
        timeout: Duration,
    ) -> Result<std::io::Result<Vec<u8>>> {
        exchange(&self.net.outside, None, to, request, timeout)
    }

    /// As [`Node::from_outside`], from `source`: an address of the outside namespace
    /// ([`Node::add_outside_address`]), so that several clients outside the node can be told
    /// apart (one banned, another not).
    pub fn from_outside_as(
        &self,
        source: &str,
        to: SocketAddr,
        request: &[u8],
        timeout: Duration,
    ) -> Result<std::io::Result<Vec<u8>>> {
        let source = source
            .parse()
            .with_context(|| format!("source address {source}"))?;
        exchange(&self.net.outside, Some(source), to, request, timeout)
    }

    /// `GET /` over HTTP/1.0 to `address`:`port` from outside address `source`, 800 ms
    /// timeout: the response, or the connection's error (a dropped client's).
    pub fn http_get_as(&self, source: &str, address: &str, port: u16) -> std::io::Result<String> {
        let to = SocketAddr::new(address.parse().map_err(std::io::Error::other)?, port);
        self.from_outside_as(
            source,
            to,
            b"GET / HTTP/1.0\r\nHost: web\r\n\r\n",
            Duration::from_millis(800),
        )
        .map_err(std::io::Error::other)?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Gives the outside namespace one more address on its link to the node (a client or
    /// attacker of its own, in the /24 of [`crate::OUTSIDE_ADDRESS`]); adding one twice is fine.
    pub fn add_outside_address(&self, address: &str) -> Result<()> {
        add_outside_address(&self.net.outside, address)
    }

    /// Runs `args` inside the outside namespace (e.g. `nmap` as an attacker outside the
    /// cluster).
    pub fn exec_outside(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut full = vec!["ip", "netns", "exec", &self.net.outside];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `work` on a thread inside the node's network namespace (its sockets are made
    /// there: Service addresses, pod addresses and the node's ports are reachable).
    pub fn run_in_node<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        in_netns(&self.net.node, work)
    }

    /// Runs `args` inside the node's network namespace (e.g. `iptables-save`, `nslookup`).
    pub fn exec_in_node(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut full = vec!["ip", "netns", "exec", &self.net.node];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Every process in the node's cgroup now: its daemons, containerd's shims and the
    /// containers (the control plane's processes are [`ControlPlane::process_ids`]).
    pub fn process_ids(&self) -> Vec<u32> {
        node_cgroup::process_ids(&self.cgroup)
    }

    /// The node's cgroup in each cgroup v1 hierarchy (the kubelet's `cgroupRoot`).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        node_cgroup::cgroup_dirs(&self.cgroup)
    }

    /// The node's temp dir (configs, logs, kubelet and containerd state).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of every component's log (the control plane's too).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut text: String = self
            .components
            .iter()
            .map(|c| {
                format!(
                    "--- last lines of {} ---\n{}\n",
                    c.log.display(),
                    c.tail(lines)
                )
            })
            .collect();
        if let Some(plane) = &self.plane {
            text.push_str(&plane.log_tails(lines));
        }
        text
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(20));
        }
        // Kills every process of the node (its cgroup: daemons, shims, containers), removes
        // its cgroups and namespaces; the control plane and relay go after.
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.fire();
        }
        for component in self.components.iter_mut().rev() {
            component.stop();
        }
        self.relay.take();
        self.plane.take();
        if keep_temp() {
            self.dir.disable_cleanup(true);
            eprintln!("node files kept in {}", self.dir.path().display());
        }
    }
}

/// The `kubernetes` Service's address (the first of the Service range).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// Lets pods reach the API server as in a cluster: its serving certificate also names the
/// `kubernetes` Service (10.96.0.1, `kubernetes.default.svc`...) and the node's address, and
/// an EndpointSlice sends the Service to the node's address (the control plane runs with
/// `--endpoint-reconciler-type=none`, which would point it at 127.0.0.1). The API server
/// reloads the rewritten certificate files by itself; a request that verifies the new name
/// shows it did.
async fn expose_api_server(plane: &ControlPlane, port: u16, deadline: Instant) -> Result<()> {
    plane
        .issue_serving_cert(&[
            "127.0.0.1",
            "localhost",
            NODE_ADDRESS,
            KUBERNETES_SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ])?
        .write(plane.dir(), "apiserver")?;
    let mut config = plane.admin_config().clone();
    config.tls_server_name = Some("kubernetes.default.svc".into());
    let client = kube::Client::try_from(config)?;
    loop {
        let request = http::Request::get("/readyz").body(Vec::new())?;
        match client.request_text(request).await {
            Ok(_) => break,
            Err(err) if Instant::now() >= deadline => {
                bail!(
                    "the API server never served its certificate naming the kubernetes Service: {err}"
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let slice = serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kubernetes",
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "kubernetes",
                "endpointslice.kubernetes.io/managed-by": "portsentry-tests",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [NODE_ADDRESS], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(plane.client()?, "default");
    slices
        .patch(
            "kubernetes",
            &PatchParams::apply(crate::control_plane::FIELD_MANAGER),
            &Patch::Apply(slice),
        )
        .await
        .context("writing the kubernetes Service's EndpointSlice")?;
    Ok(())
}

/// Starts a control plane from a new thread that entered `netns_path`, so that its
/// processes are in that namespace; the calling thread stays where it is.
async fn start_plane_in(netns_path: &str, options: Options) -> Result<ControlPlane> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let path = netns_path.to_owned();
    std::thread::spawn(move || {
        let result = (|| {
            enter_netns(&path)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a runtime for the control plane's start")?
                .block_on(ControlPlane::start(options))
        })();
        let _ = sender.send(result);
    });
    receiver
        .await
        .map_err(|_| anyhow!("the thread starting the control plane panicked"))?
}

/// `ctr` against the containerd listening on `socket`, in the `k8s.io` namespace the CRI uses.
fn ctr_at(socket: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new("/usr/bin/ctr")
        .arg(format!("--address={}", socket.display()))
        .args(["--namespace", "k8s.io"])
        .args(args)
        .output()
        .with_context(|| format!("running ctr {args:?}"))?;
    if !output.status.success() {
        bail!(
            "ctr {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// GET http://127.0.0.1:`port``path` inside `netns`; true on a 200 answer.
fn http_ok_in(netns: &str, port: u16, path: &str) -> Result<bool> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let answer = exchange(netns, None, to, request.as_bytes(), Duration::from_secs(2))??;
    Ok(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200")
        || String::from_utf8_lossy(&answer).starts_with("HTTP/1.0 200"))
}

fn node_ready(node: &NodeObject) -> bool {
    node.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The cache folder tests/build-node writes (from tests/versions.env), or
/// `PORTSENTRY_NODE_BIN`.
pub fn node_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("PORTSENTRY_NODE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let versions = Versions::read()?;
    Ok(cache_root()?.join(format!(
        "node-{}-coredns-{}-kube-router-{}/bin",
        versions.get("KUBERNETES_VERSION")?,
        versions.get("COREDNS_VERSION")?,
        versions.get("KUBE_ROUTER_VERSION")?
    )))
}

fn keep_temp() -> bool {
    env::var_os("PORTSENTRY_KEEP_TEMP").is_some_and(|v| !v.is_empty() && v != "0")
}
