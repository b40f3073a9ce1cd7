//! The addresses never banned that the cluster tells: its nodes, the API server, Services and
//! the DNS, pods of protected namespaces; read at start and kept current in the background.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, api::ListParams};
use tracing::warn;

use crate::{Result, enforce::bans::Guards};

/// The label the cluster DNS Service carries (CoreDNS and kube-dns alike).
const DNS_LABEL: &str = "k8s-app=kube-dns";

/// What the operator is told to protect besides what it discovers (chart values).
#[derive(Clone, Debug, Default)]
pub struct GuardSettings {
    /// The operator's own addresses.
    pub operator_addrs: Vec<IpAddr>,
    /// Namespaces whose pods are never banned nor quarantined (kube-system and the
    /// operator's namespace are always among them).
    pub protected_namespaces: BTreeSet<String>,
    /// Prefixes never banned.
    pub protected_nets: Vec<IpNet>,
    /// The cluster's pod ranges as the chart gives them (`podCIDRs`), besides the nodes'
    /// `spec.podCIDRs`: CNIs that allocate pod addresses themselves (Cilium's cluster pool,
    /// Calico's IPAM) leave those empty or unused.
    pub pod_nets: Vec<IpNet>,
}

impl GuardSettings {
    /// The settings with kube-system and `operator_namespace` added to the namespaces.
    pub fn new(
        operator_addrs: Vec<IpAddr>,
        operator_namespace: &str,
        namespaces: impl IntoIterator<Item = String>,
        protected_nets: Vec<IpNet>,
    ) -> Self {
        let mut protected_namespaces: BTreeSet<String> = namespaces
            .into_iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        protected_namespaces.insert("kube-system".to_owned());
        protected_namespaces.insert(operator_namespace.to_owned());
        Self {
            operator_addrs,
            protected_namespaces,
            protected_nets,
            pod_nets: Vec::new(),
        }
    }
}

/// Parses every address in `texts`, skipping what is not an address.
fn addresses<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().filter_map(|t| t.parse().ok()).collect()
}

fn cluster_ips(services: &[Service]) -> Vec<IpAddr> {
    addresses(
        services
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ips.as_ref())
            .flatten()
            .map(String::as_str),
    )
}

/// Reads node, API server, Service, DNS and protected pods' addresses from the cluster.
pub async fn discover_guards(client: &Client, settings: &GuardSettings) -> Result<Guards> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let node_addrs = addresses(
        nodes
            .items
            .iter()
            .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
            .flatten()
            .map(|a| a.address.as_str()),
    );
    let mut pod_nets: Vec<IpNet> = nodes
        .items
        .iter()
        .filter_map(|n| n.spec.as_ref()?.pod_cidrs.as_ref())
        .flatten()
        .filter_map(|cidr| cidr.parse::<IpNet>().ok())
        .chain(settings.pod_nets.iter().copied())
        .map(|net| net.trunc())
        .collect();
    pod_nets.sort();
    pod_nets.dedup();
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?;
    let mut apiserver_addrs = cluster_ips(service.as_slice());
    apiserver_addrs.extend(addresses(
        slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .map(String::as_str),
    ));
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let dns = Api::<Service>::all(client.clone())
        .list(&ListParams::default().labels(DNS_LABEL))
        .await?;
    let mut infra_pod_addrs = Vec::new();
    for namespace in &settings.protected_namespaces {
        let pods = Api::<Pod>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?;
        infra_pod_addrs.extend(addresses(
            pods.items
                .iter()
                .filter_map(|p| p.status.as_ref())
                .flat_map(|s| {
                    s.pod_ips
                        .iter()
                        .flatten()
                        .map(|ip| ip.ip.as_str())
                        .chain(s.pod_ip.as_deref())
                }),
        ));
    }
    infra_pod_addrs.sort();
    infra_pod_addrs.dedup();
    Ok(Guards {
        node_addrs,
        apiserver_addrs,
        operator_addrs: settings.operator_addrs.clone(),
        infra_pod_addrs,
        service_addrs: cluster_ips(&services.items),
        dns_addrs: cluster_ips(&dns.items),
        protected_nets: settings.protected_nets.clone(),
        protected_namespaces: settings.protected_namespaces.clone(),
        pod_nets,
    })
}

/// Keeps `guards` current: nodes come and go, the API server may move, pods and Services
/// of the cluster change.
pub async fn refresh_guards(
    client: Client,
    guards: Arc<RwLock<Guards>>,
    settings: GuardSettings,
    every: Duration,
) {
    loop {
        match discover_guards(&client, &settings).await {
            Ok(fresh) => {
                if let Ok(mut current) = guards.write() {
                    *current = fresh;
                }
            }
            Err(error) => warn!(%error, "could not refresh protected addresses"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_system_and_the_operator_namespace_are_always_protected() {
        let settings = GuardSettings::new(
            Vec::new(),
            "portsentry-system",
            ["monitoring".to_owned(), " ".to_owned()],
            Vec::new(),
        );
        assert_eq!(
            settings.protected_namespaces,
            BTreeSet::from([
                "kube-system".to_owned(),
                "monitoring".to_owned(),
                "portsentry-system".to_owned()
            ])
        );
    }
}
