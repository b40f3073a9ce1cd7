//! The ports the raw modes watch: the listed ports of the stealth modes and every port below
//! `ADVANCED_PORTS_*` but `ADVANCED_EXCLUDE_*` of the advanced ones, as 65,536-bit maps.

use portsentry_crds::{PortRange, Protocol};

use crate::{config::Config, packet::RawMode};

/// Default `ADVANCED_PORTS_*` when the config has none (PortSentry 1.2 assumes 1024).
pub const DEFAULT_ADVANCED_PORTS: u16 = 1024;

/// A set of ports as a 65,536-bit map.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Vec<u64>);

impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PortSet({} ports)", self.len())
    }
}

impl Default for PortSet {
    fn default() -> Self {
        Self(vec![0; 1024])
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    pub fn remove(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] &= !(1 << (port & 63));
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|word| word.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The ports the raw modes watch, per protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    tcp: PortSet,
    udp: PortSet,
    /// The part of each that a stealth mode (`-stcp`, `-sudp`) watches.
    stealth_tcp: PortSet,
    stealth_udp: PortSet,
}

impl Watch {
    /// The union of what each of `modes` watches under `config`.
    pub fn new(config: &Config, modes: &[RawMode]) -> Self {
        let mut watch = Self::default();
        for mode in modes {
            let (set, stealth, listed, below, exclude) = match mode.protocol() {
                Protocol::Tcp => (
                    &mut watch.tcp,
                    &mut watch.stealth_tcp,
                    &config.tcp_ports,
                    config.advanced_ports_tcp,
                    &config.advanced_exclude_tcp,
                ),
                Protocol::Udp => (
                    &mut watch.udp,
                    &mut watch.stealth_udp,
                    &config.udp_ports,
                    config.advanced_ports_udp,
                    &config.advanced_exclude_udp,
                ),
            };
            if mode.advanced() {
                let mut ports = PortSet::default();
                for port in 1..below.unwrap_or(DEFAULT_ADVANCED_PORTS) {
                    ports.insert(port);
                }
                for port in expand(exclude) {
                    ports.remove(port);
                }
                for port in 1..=u16::MAX {
                    if ports.contains(port) {
                        set.insert(port);
                    }
                }
            } else {
                for port in expand(listed) {
                    set.insert(port);
                    stealth.insert(port);
                }
            }
        }
        watch
    }

    pub fn watches(&self, protocol: Protocol, port: u16) -> bool {
        port != 0 && self.ports(protocol).contains(port)
    }

    pub fn ports(&self, protocol: Protocol) -> &PortSet {
        match protocol {
            Protocol::Tcp => &self.tcp,
            Protocol::Udp => &self.udp,
        }
    }

    /// The raw mode a watched port belongs to: the stealth mode when it lists the port (with
    /// `-stcp -atcp` together a listed port is the stealth mode's), else the advanced one.
    pub fn mode_of(&self, protocol: Protocol, port: u16) -> RawMode {
        match protocol {
            Protocol::Tcp if self.stealth_tcp.contains(port) => RawMode::Stcp,
            Protocol::Tcp => RawMode::Atcp,
            Protocol::Udp if self.stealth_udp.contains(port) => RawMode::Sudp,
            Protocol::Udp => RawMode::Audp,
        }
    }
}

fn expand(ranges: &[PortRange]) -> impl Iterator<Item = u16> {
    portsentry_crds::expand(ranges).into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/test.conf"), text).expect("config")
    }

    #[test]
    fn stealth_tcp_watches_exactly_tcp_ports() {
        let watch = Watch::new(&config("TCP_PORTS=\"1,79,31337\"\n"), &[RawMode::Stcp]);
        assert_eq!(watch.ports(Protocol::Tcp).len(), 3);
        assert!(watch.watches(Protocol::Tcp, 79));
        assert!(!watch.watches(Protocol::Tcp, 80));
        assert!(!watch.watches(Protocol::Udp, 79));
    }

    #[test]
    fn advanced_tcp_watches_every_port_below_the_limit_except_excludes() {
        let watch = Watch::new(
            &config("ADVANCED_PORTS_TCP=\"100\"\nADVANCED_EXCLUDE_TCP=\"22,80-89\"\n"),
            &[RawMode::Atcp],
        );
        assert_eq!(watch.ports(Protocol::Tcp).len(), 99 - 11);
        assert!(watch.watches(Protocol::Tcp, 1));
        assert!(watch.watches(Protocol::Tcp, 99));
        assert!(!watch.watches(Protocol::Tcp, 100));
        assert!(!watch.watches(Protocol::Tcp, 22));
        assert!(!watch.watches(Protocol::Tcp, 85));
    }

    #[test]
    fn advanced_mode_without_a_limit_watches_below_1024_as_1_2_does() {
        let watch = Watch::new(&config(""), &[RawMode::Audp]);
        assert_eq!(watch.ports(Protocol::Udp).len(), 1023);
    }

    #[test]
    fn several_modes_watch_the_union_of_their_ports() {
        let watch = Watch::new(
            &config("TCP_PORTS=\"31337\"\nUDP_PORTS=\"161\"\nADVANCED_PORTS_TCP=\"10\"\n"),
            &[RawMode::Stcp, RawMode::Atcp, RawMode::Sudp],
        );
        assert_eq!(watch.ports(Protocol::Tcp).len(), 10);
        assert!(watch.watches(Protocol::Udp, 161));
    }

    #[test]
    fn a_hit_names_the_raw_mode_that_watches_its_port() {
        let watch = Watch::new(
            &config(
                "TCP_PORTS=\"31337\"\nUDP_PORTS=\"161\"\nADVANCED_PORTS_TCP=\"100\"\nADVANCED_PORTS_UDP=\"100\"\n",
            ),
            &[RawMode::Stcp, RawMode::Atcp, RawMode::Sudp, RawMode::Audp],
        );
        assert_eq!(watch.mode_of(Protocol::Tcp, 31337), RawMode::Stcp);
        assert_eq!(watch.mode_of(Protocol::Tcp, 80), RawMode::Atcp);
        assert_eq!(watch.mode_of(Protocol::Udp, 161), RawMode::Sudp);
        assert_eq!(watch.mode_of(Protocol::Udp, 53), RawMode::Audp);
    }

    #[test]
    fn port_zero_is_never_watched() {
        let watch = Watch::new(&config(""), &[RawMode::Atcp]);
        assert!(!watch.watches(Protocol::Tcp, 0));
    }
}
