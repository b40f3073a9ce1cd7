//! Test harness of portsentry-k8s: a real, disposable Kubernetes control plane per suite
//! (etcd, kube-apiserver, kube-controller-manager) and helpers to drive it, no mocks.
#![forbid(unsafe_code)]

mod binaries;
mod certs;
mod control_plane;
mod http_server;
mod manifests;
mod node;
mod node_cgroup;
mod node_chart;
mod node_config;
mod node_net;
mod operator;
pub mod pod_netns;
mod process;
pub mod prometheus;
mod wait;

pub use binaries::{BUILD_HINT, Binaries, repo_root, workspace_binary};
pub use certs::CertAndKey;
pub use control_plane::{
    ControlPlane, FIELD_MANAGER, Options, PORTSENTRY_AUDIENCE, SERVICE_ACCOUNT_ISSUER, shared,
};
pub use http_server::{HttpServer, Recorded, Reply};
pub use manifests::{api_for, apply_documents, chart_crd_files, install_crds, parse_documents};
pub use node::{NODE_BUILD_HINT, NODE_NAME, Node, NodeOptions, node_bin_dir, shared_node};
pub use node_chart::{
    IMAGES_HINT, OPERATOR, RELEASE, RELEASE_NAMESPACE, image_archives, images_dir,
    injected_ready_pod, install_chart,
};
pub use node_config::{CLUSTER_DOMAIN, NODE_ADDRESS, OUTSIDE_ADDRESS, POD_CIDR, SERVICE_CIDR};
pub use operator::{
    DEFAULT_SENSOR_IMAGE, Operator, OperatorSettings, PodNet, injected_pod, post_report,
    prerequisites,
};
pub use wait::{free_port, free_port_on, wait_for, wait_result, wait_until, wait_value};
