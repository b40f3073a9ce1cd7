//! PortSentry's raw-socket modes `-stcp -sudp -atcp -audp`: which ports they watch, and the
//! capture loop that turns packets to those ports into unverified [`Hit`]s.
//!
//! Stealth modes watch `TCP_PORTS`/`UDP_PORTS` without binding them (they stay closed, so
//! the kernel answers with RST or ICMP); advanced modes watch every port below
//! `ADVANCED_PORTS_*` (1024 when unset, as 1.2) except `ADVANCED_EXCLUDE_*`. In every raw
//! mode a port with a real socket on it is skipped, checked per packet
//! ([`crate::sockets`]): a service started later is not a decoy, and a port the sensor
//! binds itself in a connect mode (`-tcp -stcp` together) is left to that mode, whose
//! completed handshakes prove the source. The check is the kernel's own lookup for the
//! packet's addresses and ports (see [`crate::sockets`]), so it costs microseconds and
//! never delays a ban. Each packet goes through, in order: parse,
//! destination is one of this host's addresses, port watched, TCP flags name a probe
//! ([`crate::classify`]), port not in use.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use portsentry_crds::{PortRange, ProbeKind, Protocol};

use crate::{
    capture::{self, Capture, Received},
    classify::{self, Captured},
    config::Config,
    engine::Hit,
    listen::{self, HitSink},
    metrics::Metrics,
    sockets::LiveSockets,
};

/// One raw-socket mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RawMode {
    Stcp,
    Sudp,
    Atcp,
    Audp,
}

impl RawMode {
    pub const ALL: [RawMode; 4] = [RawMode::Stcp, RawMode::Sudp, RawMode::Atcp, RawMode::Audp];

    /// PortSentry's name for it, without the dash: `stcp`, `sudp`, `atcp`, `audp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RawMode::Stcp => "stcp",
            RawMode::Sudp => "sudp",
            RawMode::Atcp => "atcp",
            RawMode::Audp => "audp",
        }
    }

    pub const fn protocol(self) -> Protocol {
        match self {
            RawMode::Stcp | RawMode::Atcp => Protocol::Tcp,
            RawMode::Sudp | RawMode::Audp => Protocol::Udp,
        }
    }

    pub const fn advanced(self) -> bool {
        matches!(self, RawMode::Atcp | RawMode::Audp)
    }
}

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
}

impl Watch {
    /// The union of what each of `modes` watches under `config`.
    pub fn new(config: &Config, modes: &[RawMode]) -> Self {
        let mut watch = Self::default();
        for mode in modes {
            let (set, listed, below, exclude) = match mode.protocol() {
                Protocol::Tcp => (
                    &mut watch.tcp,
                    &config.tcp_ports,
                    config.advanced_ports_tcp,
                    &config.advanced_exclude_tcp,
                ),
                Protocol::Udp => (
                    &mut watch.udp,
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
}

fn expand(ranges: &[PortRange]) -> impl Iterator<Item = u16> {
    portsentry_crds::expand(ranges).into_iter()
}

/// This host's addresses, re-read every 30 s and, at most once a second, when a packet
/// is addressed to one not known yet.
#[derive(Debug)]
pub struct OwnAddresses {
    addresses: Vec<IpAddr>,
    read_at: Instant,
}

impl Default for OwnAddresses {
    fn default() -> Self {
        Self::new()
    }
}

impl OwnAddresses {
    pub fn new() -> Self {
        Self {
            addresses: listen::own_addresses(),
            read_at: Instant::now(),
        }
    }

    pub fn contains(&mut self, address: IpAddr) -> bool {
        let age = self.read_at.elapsed();
        if age > Duration::from_secs(30)
            || (age > Duration::from_secs(1) && !self.addresses.contains(&address))
        {
            self.addresses = listen::own_addresses();
            self.read_at = Instant::now();
        }
        self.addresses.contains(&address)
    }
}

/// What became of one captured packet (the `outcome` label of the capture metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Examined {
    /// Not a complete TCP/UDP header (or a later fragment).
    Unparsed,
    /// Addressed to another host (forwarded or routed traffic).
    NotForThisHost,
    /// A port no raw mode watches.
    Unwatched,
    /// TCP flags of replies or established traffic (RST, SYN+ACK, PSH+ACK, ...).
    NotAProbe,
    /// A real socket serves the port now.
    PortInUse,
    Probe(Hit),
}

impl Examined {
    pub const OUTCOMES: [&'static str; 6] = [
        "unparsed",
        "not_for_this_host",
        "unwatched",
        "not_a_probe",
        "port_in_use",
        "probe",
    ];

    pub const fn as_str(&self) -> &'static str {
        match self {
            Examined::Unparsed => "unparsed",
            Examined::NotForThisHost => "not_for_this_host",
            Examined::Unwatched => "unwatched",
            Examined::NotAProbe => "not_a_probe",
            Examined::PortInUse => "port_in_use",
            Examined::Probe(_) => "probe",
        }
    }
}

/// Decides what one captured packet is (see the module doc for the order of checks).
pub fn examine(
    bytes: &[u8],
    watch: &Watch,
    own: &mut OwnAddresses,
    sockets: &mut LiveSockets,
) -> Examined {
    let Some(packet) = capture::parse(bytes) else {
        return Examined::Unparsed;
    };
    if !own.contains(packet.destination) {
        return Examined::NotForThisHost;
    }
    if !watch.watches(packet.protocol, packet.port) {
        return Examined::Unwatched;
    }
    let kind = match packet.protocol {
        Protocol::Udp => ProbeKind::Datagram,
        Protocol::Tcp => match classify::classify(packet.flags) {
            Some(kind) => kind,
            None => return Examined::NotAProbe,
        },
    };
    if sockets.serves(
        packet.protocol,
        SocketAddr::new(packet.destination, packet.port),
        SocketAddr::new(packet.source, packet.source_port),
    ) {
        return Examined::PortInUse;
    }
    Examined::Probe(Hit {
        source: packet.source,
        port: packet.port,
        protocol: packet.protocol,
        kind,
        captured: Some(Captured {
            flags: packet.flags,
            ip_options: packet.ip_options,
        }),
    })
}

/// Reads packets forever on the calling thread, feeding probes to `sink`; returns only
/// when the socket fails for good.
pub fn capture_loop(
    mut capture: Capture,
    watch: Watch,
    sink: Arc<dyn HitSink>,
    metrics: Arc<Metrics>,
) -> std::io::Error {
    let mut own = OwnAddresses::new();
    let mut sockets = LiveSockets::new();
    let mut failures = 0u32;
    loop {
        match capture.receive() {
            Ok(Received::Timeout) => {}
            Ok(Received::Packet { len, new_drops }) => {
                failures = 0;
                metrics.capture_drops(new_drops);
                let examined = examine(capture.packet(len), &watch, &mut own, &mut sockets);
                metrics.captured(examined.as_str());
                if let Examined::Probe(hit) = examined {
                    sink.hit(hit);
                }
            }
            Err(error) => {
                failures += 1;
                if failures > 100 {
                    return error;
                }
                tracing::warn!(%error, "packet capture: receive failed; retrying");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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

    /// An IPv4 TCP packet from 192.0.2.7 to `destination:port` with `flags` (SYN, ACK bits).
    fn tcp(destination: [u8; 4], port: u16, syn: bool, ack: bool) -> Vec<u8> {
        let mut builder = etherparse::PacketBuilder::ipv4([192, 0, 2, 7], destination, 64)
            .tcp(40000, port, 1, 1024);
        if syn {
            builder = builder.syn();
        }
        if ack {
            builder = builder.ack(1);
        }
        let mut out = Vec::new();
        builder.write(&mut out, &[]).expect("write");
        out
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    fn examine_tcp(destination: [u8; 4], port: u16, syn: bool, ack: bool) -> Examined {
        let watch = Watch::new(
            &config(&format!("TCP_PORTS=\"{port}\"\n")),
            &[RawMode::Stcp],
        );
        examine(
            &tcp(destination, port, syn, ack),
            &watch,
            &mut OwnAddresses::new(),
            &mut LiveSockets::new(),
        )
    }

    #[test]
    fn a_syn_to_a_free_watched_port_of_this_host_is_a_syn_probe() {
        let port = free_port();
        match examine_tcp([127, 0, 0, 1], port, true, false) {
            Examined::Probe(hit) => {
                assert_eq!((hit.port, hit.kind), (port, ProbeKind::Syn));
                assert_eq!(hit.source, IpAddr::from([192, 0, 2, 7]));
                assert!(!hit.verified());
            }
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn a_packet_to_another_host_is_not_for_this_host() {
        assert_eq!(
            examine_tcp([192, 0, 2, 1], free_port(), true, false),
            Examined::NotForThisHost
        );
    }

    #[test]
    fn a_syn_ack_reply_is_not_a_probe() {
        assert_eq!(
            examine_tcp([127, 0, 0, 1], free_port(), true, true),
            Examined::NotAProbe
        );
    }

    #[test]
    fn a_probe_to_a_port_a_service_listens_on_is_skipped() {
        let service = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = service.local_addr().expect("addr").port();
        assert_eq!(
            examine_tcp([127, 0, 0, 1], port, true, false),
            Examined::PortInUse
        );
    }

    #[test]
    fn bytes_that_are_not_a_packet_are_unparsed() {
        let watch = Watch::default();
        assert_eq!(
            examine(
                b"\x45\x00",
                &watch,
                &mut OwnAddresses::new(),
                &mut LiveSockets::new()
            ),
            Examined::Unparsed
        );
    }

    #[test]
    fn port_zero_is_never_watched() {
        let watch = Watch::new(&config(""), &[RawMode::Atcp]);
        assert!(!watch.watches(Protocol::Tcp, 0));
    }
}
