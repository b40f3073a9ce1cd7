//! Where an alert hook may not point: loopback, link-local, the cloud metadata address and the
//! cluster's own pod and service ranges, unless the operator is told to allow a CIDR.
//!
//! Hook URLs are written by tenants, so a hook is a request the operator makes on their
//! behalf from inside the cluster. Every address the host resolves to is checked at delivery
//! time and the connection goes to a checked address, so DNS rebinding cannot slip past.

use std::{
    net::{IpAddr, SocketAddr},
    sync::RwLock,
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::api::{core::v1::Node, networking::v1::ServiceCIDR};
use kube::{Api, Client, api::ListParams};
use tracing::warn;

/// How often the cluster's pod and service ranges are read again.
pub const RANGE_REFRESH: Duration = Duration::from_secs(60);

/// Why a hook target was refused; `as_str` is the metric's `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    /// 169.254.169.254 (and AWS's IPv6 fd00:ec2::254): cloud credentials live there.
    Metadata,
    LinkLocal,
    Unspecified,
    Multicast,
    /// A pod or Service range of this cluster.
    ClusterRange,
    /// The host name resolved to no address.
    Unresolved,
}

impl Refusal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::Loopback => "loopback",
            Refusal::Metadata => "metadata",
            Refusal::LinkLocal => "link_local",
            Refusal::Unspecified => "unspecified",
            Refusal::Multicast => "multicast",
            Refusal::ClusterRange => "cluster_range",
            Refusal::Unresolved => "unresolved",
        }
    }
}

/// The address rules of hook targets.
#[derive(Debug, Default)]
pub struct TargetRules {
    /// Allowed although a rule refuses them (`--hook-allow-cidr`).
    allow: Vec<IpNet>,
    /// The cluster's pod and service ranges (read from the cluster, plus `--hook-deny-cidr`).
    cluster: RwLock<Vec<IpNet>>,
    /// Ranges given on the command line, kept across refreshes.
    configured: Vec<IpNet>,
}

impl TargetRules {
    pub fn new(allow: Vec<IpNet>, cluster_ranges: Vec<IpNet>) -> Self {
        Self {
            allow,
            cluster: RwLock::new(cluster_ranges.clone()),
            configured: cluster_ranges,
        }
    }

    /// Why `address` may not be a hook target, or `None` when it may.
    pub fn refusal(&self, address: IpAddr) -> Option<Refusal> {
        let address = address.to_canonical();
        if self.allow.iter().any(|net| net.contains(&address)) {
            return None;
        }
        if let Some(refusal) = special(address) {
            return Some(refusal);
        }
        let cluster = self.cluster.read().unwrap_or_else(|e| e.into_inner());
        cluster
            .iter()
            .any(|net| net.contains(&address))
            .then_some(Refusal::ClusterRange)
    }

    /// The first refusal among every address a host resolved to (none resolved is one).
    pub fn check_all(&self, addresses: &[SocketAddr]) -> Option<Refusal> {
        if addresses.is_empty() {
            return Some(Refusal::Unresolved);
        }
        addresses.iter().find_map(|a| self.refusal(a.ip()))
    }

    /// Replaces the cluster's ranges with `discovered` plus the configured ones.
    pub fn set_cluster_ranges(&self, discovered: Vec<IpNet>) {
        let mut ranges = discovered;
        ranges.extend(self.configured.iter().copied());
        *self.cluster.write().unwrap_or_else(|e| e.into_inner()) = ranges;
    }
}

/// The rules that need no cluster knowledge.
fn special(address: IpAddr) -> Option<Refusal> {
    match address {
        IpAddr::V4(v4) if v4.octets() == [169, 254, 169, 254] => Some(Refusal::Metadata),
        IpAddr::V6(v6) if v6.segments() == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] => {
            Some(Refusal::Metadata)
        }
        a if a.is_loopback() => Some(Refusal::Loopback),
        a if a.is_unspecified() => Some(Refusal::Unspecified),
        a if a.is_multicast() => Some(Refusal::Multicast),
        IpAddr::V4(v4) if v4.is_link_local() || v4.is_broadcast() => Some(Refusal::LinkLocal),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Refusal::LinkLocal),
        _ => None,
    }
}

/// The cluster's Service ranges (ServiceCIDR objects) and pod ranges (nodes' podCIDRs).
pub async fn discover_cluster_ranges(client: &Client) -> kube::Result<Vec<IpNet>> {
    let mut ranges = Vec::new();
    let cidrs = Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    for cidr in &cidrs.items {
        let listed = cidr.spec.as_ref().and_then(|s| s.cidrs.as_ref());
        ranges.extend(
            listed
                .into_iter()
                .flatten()
                .filter_map(|c| c.parse::<IpNet>().ok()),
        );
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    for node in &nodes.items {
        let spec = node.spec.as_ref();
        let pods = spec.and_then(|s| s.pod_cidrs.as_ref());
        ranges.extend(
            pods.into_iter()
                .flatten()
                .filter_map(|c| c.parse::<IpNet>().ok()),
        );
    }
    Ok(ranges)
}

/// Keeps `rules`' cluster ranges current (every [`RANGE_REFRESH`]); a failed read keeps the
/// previous ones.
pub async fn refresh_cluster_ranges(client: Client, rules: std::sync::Arc<TargetRules>) {
    loop {
        match discover_cluster_ranges(&client).await {
            Ok(ranges) => rules.set_cluster_ranges(ranges),
            Err(error) => warn!(%error, "could not read the cluster's pod and service ranges"),
        }
        tokio::time::sleep(RANGE_REFRESH).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], cluster: &[&str]) -> TargetRules {
        let nets = |texts: &[&str]| texts.iter().map(|t| t.parse().unwrap()).collect();
        TargetRules::new(nets(allow), nets(cluster))
    }

    fn refusal(rules: &TargetRules, address: &str) -> Option<Refusal> {
        rules.refusal(address.parse().unwrap())
    }

    #[test]
    fn loopback_is_refused_in_both_families() {
        let rules = rules(&[], &[]);
        assert_eq!(refusal(&rules, "127.0.0.1"), Some(Refusal::Loopback));
        assert_eq!(refusal(&rules, "127.8.9.10"), Some(Refusal::Loopback));
        assert_eq!(refusal(&rules, "::1"), Some(Refusal::Loopback));
    }

    #[test]
    fn the_metadata_address_is_refused_by_name() {
        let rules = rules(&[], &[]);
        assert_eq!(refusal(&rules, "169.254.169.254"), Some(Refusal::Metadata));
        assert_eq!(refusal(&rules, "fd00:ec2::254"), Some(Refusal::Metadata));
    }

    #[test]
    fn link_local_is_refused_in_both_families() {
        let rules = rules(&[], &[]);
        assert_eq!(refusal(&rules, "169.254.1.1"), Some(Refusal::LinkLocal));
        assert_eq!(refusal(&rules, "fe80::1"), Some(Refusal::LinkLocal));
    }

    #[test]
    fn unspecified_and_multicast_are_refused() {
        let rules = rules(&[], &[]);
        assert_eq!(refusal(&rules, "0.0.0.0"), Some(Refusal::Unspecified));
        assert_eq!(refusal(&rules, "::"), Some(Refusal::Unspecified));
        assert_eq!(refusal(&rules, "224.0.0.1"), Some(Refusal::Multicast));
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_ipv4() {
        let rules = rules(&[], &[]);
        assert_eq!(refusal(&rules, "::ffff:127.0.0.1"), Some(Refusal::Loopback));
        assert_eq!(
            refusal(&rules, "::ffff:169.254.169.254"),
            Some(Refusal::Metadata)
        );
    }

    #[test]
    fn the_clusters_pod_and_service_ranges_are_refused() {
        let rules = rules(&[], &["10.96.0.0/16"]);
        rules.set_cluster_ranges(vec!["10.244.0.0/24".parse().unwrap()]);
        assert_eq!(refusal(&rules, "10.96.0.10"), Some(Refusal::ClusterRange));
        assert_eq!(refusal(&rules, "10.244.0.7"), Some(Refusal::ClusterRange));
        assert_eq!(refusal(&rules, "10.245.0.7"), None);
    }

    #[test]
    fn public_addresses_are_allowed() {
        let rules = rules(&[], &["10.96.0.0/16"]);
        assert_eq!(refusal(&rules, "203.0.113.7"), None);
        assert_eq!(refusal(&rules, "2001:db8::7"), None);
    }

    #[test]
    fn an_allowed_cidr_overrides_every_rule() {
        let rules = rules(&["127.0.0.1/32", "10.96.0.0/24"], &["10.96.0.0/16"]);
        assert_eq!(refusal(&rules, "127.0.0.1"), None);
        assert_eq!(refusal(&rules, "127.0.0.2"), Some(Refusal::Loopback));
        assert_eq!(refusal(&rules, "10.96.0.10"), None);
        assert_eq!(refusal(&rules, "10.96.1.10"), Some(Refusal::ClusterRange));
    }

    #[test]
    fn one_refused_address_among_the_resolved_ones_refuses_the_host() {
        let rules = rules(&[], &[]);
        let resolved: Vec<SocketAddr> = vec![
            "203.0.113.7:443".parse().unwrap(),
            "127.0.0.1:443".parse().unwrap(),
        ];
        assert_eq!(rules.check_all(&resolved), Some(Refusal::Loopback));
        assert_eq!(rules.check_all(&resolved[..1]), None);
        assert_eq!(rules.check_all(&[]), Some(Refusal::Unresolved));
    }
}
