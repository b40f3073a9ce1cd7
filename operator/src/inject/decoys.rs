//! A pod's decoys: the ports its policy names minus the ports its containers declare (those
//! are skipped, and said so in an annotation), and the sensor's own metrics port.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ContainerPort, Pod};
use portsentry_crds::{PolicyRules, PortRange, Protocol};

/// Port of the sensor's /metrics, /healthz and /readyz in the pod; never a TCP decoy.
pub const SENSOR_METRICS_PORT: u16 = 9720;

/// A decoy left out because a container of the pod declares its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.as_str())
    }
}

/// Every (port, protocol) a container or init container of the pod declares.
pub fn declared_ports(pod: &Pod) -> BTreeSet<(Protocol, u16)> {
    let Some(spec) = pod.spec.as_ref() else {
        return BTreeSet::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p: &ContainerPort| {
            let port = u16::try_from(p.container_port).ok()?;
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            Some((protocol, port))
        })
        .collect()
}

/// The decoys of a pod: what the policy names, minus declared ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoys {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
    /// Advanced (raw) modes: watch every port below these, except `exclude_*`.
    pub tcp_below: Option<u16>,
    pub udp_below: Option<u16>,
    pub exclude_tcp: BTreeSet<u16>,
    pub exclude_udp: BTreeSet<u16>,
    /// Watch `tcp`/`udp` with raw sockets instead of binding them.
    pub stealth: bool,
}

impl Decoys {
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty()
            && self.udp.is_empty()
            && self.tcp_below.is_none()
            && self.udp_below.is_none()
    }

    /// True when the sensor needs raw sockets (`NET_RAW`).
    pub fn raw(&self) -> bool {
        self.stealth || self.tcp_below.is_some() || self.udp_below.is_some()
    }

    /// The lowest port the sensor binds (connect modes), when it is below 1024.
    pub fn lowest_privileged_bind(&self) -> Option<u16> {
        if self.stealth {
            return None;
        }
        self.tcp
            .iter()
            .chain(self.udp.iter())
            .copied()
            .filter(|p| *p < 1024)
            .min()
    }
}

/// The pod's decoys given the policy and the ports its containers declare, and the decoys
/// skipped because of them (in port order). The sensor's metrics port is never a decoy.
pub fn decoys_for(
    rules: &PolicyRules,
    declared: &BTreeSet<(Protocol, u16)>,
    metrics_port: u16,
) -> (Decoys, Vec<Skipped>) {
    let wanted = |protocol: Protocol, preset: &[u16], explicit: &[PortRange]| -> BTreeSet<u16> {
        preset
            .iter()
            .copied()
            .chain(portsentry_crds::expand(explicit))
            .filter(|p| !(protocol == Protocol::Tcp && *p == metrics_port))
            .collect()
    };
    let decoys = &rules.decoys;
    let tcp = wanted(
        Protocol::Tcp,
        decoys.preset.map(|p| p.tcp()).unwrap_or_default(),
        &decoys.tcp,
    );
    let udp = wanted(
        Protocol::Udp,
        decoys.preset.map(|p| p.udp()).unwrap_or_default(),
        &decoys.udp,
    );
    let mut skipped = BTreeSet::new();
    let mut keep = |protocol: Protocol, ports: BTreeSet<u16>| -> BTreeSet<u16> {
        ports
            .into_iter()
            .filter(|port| {
                let taken = declared.contains(&(protocol, *port));
                if taken {
                    skipped.insert(Skipped {
                        port: *port,
                        protocol,
                    });
                }
                !taken
            })
            .collect()
    };
    let tcp = keep(Protocol::Tcp, tcp);
    let udp = keep(Protocol::Udp, udp);
    let advanced = decoys.advanced.clone().unwrap_or_default();
    let exclude = |protocol: Protocol, below: Option<u16>, listed: &[PortRange]| -> BTreeSet<u16> {
        let mut ports = portsentry_crds::expand(listed);
        if let Some(below) = below {
            ports.extend(
                declared
                    .iter()
                    .filter(|(p, port)| *p == protocol && *port < below)
                    .map(|(_, port)| *port),
            );
            if protocol == Protocol::Tcp && metrics_port < below {
                ports.insert(metrics_port);
            }
        }
        ports
    };
    for (protocol, below) in [
        (Protocol::Tcp, advanced.tcp_below),
        (Protocol::Udp, advanced.udp_below),
    ] {
        if let Some(below) = below {
            skipped.extend(
                declared
                    .iter()
                    .filter(|(p, port)| *p == protocol && *port < below)
                    .map(|(protocol, port)| Skipped {
                        port: *port,
                        protocol: *protocol,
                    }),
            );
        }
    }
    let result = Decoys {
        tcp,
        udp,
        tcp_below: advanced.tcp_below,
        udp_below: advanced.udp_below,
        exclude_tcp: exclude(Protocol::Tcp, advanced.tcp_below, &advanced.exclude_tcp),
        exclude_udp: exclude(Protocol::Udp, advanced.udp_below, &advanced.exclude_udp),
        stealth: decoys.stealth,
    };
    let mut skipped: Vec<Skipped> = skipped.into_iter().collect();
    skipped.sort_by_key(|s| (s.port, s.protocol));
    (result, skipped)
}

/// A port set as PortSentry's comma-separated list, adjacent ports merged into ranges.
pub fn port_list(ports: &BTreeSet<u16>) -> String {
    let mut ranges: Vec<(u16, u16)> = Vec::new();
    for &port in ports {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(port) => *end = port,
            _ => ranges.push((port, port)),
        }
    }
    ranges
        .iter()
        .map(|(start, end)| {
            if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The skipped-decoys annotation value: `"80/TCP,53/UDP"`.
pub fn skipped_annotation(skipped: &[Skipped]) -> String {
    skipped
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a skipped-decoys annotation back (unknown items are left out).
pub fn parse_skipped_annotation(value: &str) -> Vec<Skipped> {
    value
        .split(',')
        .filter_map(|item| {
            let (port, protocol) = item.trim().split_once('/')?;
            let protocol = match protocol {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            Some(Skipped {
                port: port.parse().ok()?,
                protocol,
            })
        })
        .collect()
}
