//! The configuration files of the test node's components (containerd, CNI, kubelet, CoreDNS),
//! written into the node's temp dir: every path, socket and cgroup private to that node.

use std::{fs, path::Path};

use anyhow::{Context, Result};

/// The node's address on its link to the outside namespace (also the cluster DNS address).
pub const NODE_ADDRESS: &str = "10.237.0.2";
/// The outside namespace's address on that link (the node's default gateway).
pub const OUTSIDE_ADDRESS: &str = "10.237.0.1";
/// The prefix length of that link.
pub const LINK_PREFIX: u8 = 24;
/// The node's pod CIDR (the CNI bridge hands out addresses from it).
pub const POD_CIDR: &str = "10.238.0.0/24";
/// The cluster's pod CIDR (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.238.0.0/16";
/// The Service range of the control plane (`--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Where a node's files go inside its temp dir.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: std::path::PathBuf,
}

impl Layout {
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.root.join(name)
    }

    pub fn containerd_socket(&self) -> std::path::PathBuf {
        self.path("containerd/containerd.sock")
    }

    pub fn kubelet_root(&self) -> std::path::PathBuf {
        self.path("kubelet")
    }
}

/// containerd 1.6's config (version 2): state, sockets and CNI in the node's dir; runc with
/// the cgroupfs driver; the locally built pause image as the sandbox image; pod network
/// namespaces under the state dir (gone with the node, not left in /run/netns); no
/// oom_score_adj below containerd's own.
pub fn containerd_toml(layout: &Layout, sandbox_image: &str) -> String {
    let p = |name: &str| layout.path(name).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = "{debug}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  netns_mounts_under_state_dir = true
  # This machine's root lacks CAP_SYS_RESOURCE: a negative oom_score_adj (-998 for every
  # sandbox) is refused and runc fails. Clamped to containerd's own (0) instead.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"#,
        root = p("containerd/root"),
        state = p("containerd/state"),
        socket = layout.containerd_socket().display(),
        ttrpc = p("containerd/ttrpc.sock"),
        debug = p("containerd/debug.sock"),
        opt = p("containerd/opt"),
        cni_conf = p("cni/net.d"),
    )
}

/// The pod network: the reference `bridge` plugin (cni0, the node as gateway, masquerade
/// for traffic leaving the pod CIDR) with `host-local` addresses from [`POD_CIDR`], and
/// `portmap` for hostPorts.
pub fn cni_conflist(layout: &Layout) -> Result<String> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "portsentry",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": layout.path("cni/ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    serde_json::to_string_pretty(&conf).context("writing the CNI config")
}

/// The kubelet's config: cgroupfs driver under `cgroup_root`, the cluster DNS, a serving
/// certificate signed by the cluster CA, anonymous access allowed (the API server of the
/// tests has no kubelet client certificate; the node's port is reachable only inside the
/// namespaces of the test), and eviction thresholds that a busy build machine does not hit.
pub fn kubelet_yaml(layout: &Layout, cgroup_root: &str) -> Result<String> {
    let p = |name: &str| layout.path(name);
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_ADDRESS,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": true},
            "webhook": {"enabled": false},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "tlsCertFile": p("kubelet.crt"),
        "tlsPrivateKeyFile": p("kubelet.key"),
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": cgroup_root,
        "cgroupsPerQOS": true,
        "enforceNodeAllocatable": ["pods"],
        "clusterDNS": [NODE_ADDRESS],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": p("resolv.conf"),
        "containerRuntimeEndpoint": format!("unix://{}", layout.containerd_socket().display()),
        "failSwapOn": false,
        "protectKernelDefaults": false,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "maxPods": 30,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "registerNode": true,
    });
    serde_yaml::to_string(&config).context("writing the kubelet config")
}

/// CoreDNS serving the cluster domain from the API server on the node's address (the
/// kubelet's `clusterDNS`); `ready` on 127.0.0.1:8181 of the node. No upstream: nothing
/// outside the namespaces of the test is reachable.
pub fn corefile(kubeconfig: &Path) -> String {
    format!(
        r#".:53 {{
    bind {NODE_ADDRESS}
    errors
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} portsentry-tests
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"#,
        kubeconfig = kubeconfig.display()
    )
}

/// Writes `text` to `layout/name`, creating the folders on the way.
pub fn write(layout: &Layout, name: &str, text: &str) -> Result<()> {
    let path = layout.path(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}
