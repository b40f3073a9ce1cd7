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
    alert::{Alerts, Fields},
    capture::{self, Capture, Fragment, Received},
    classify::{self, Captured},
    config::{BlockLevel, Config},
    engine::Hit,
    listen::{self, HitSink},
    metrics::Metrics,
    nft::{NftBans, NftError},
    sockets::{LiveSockets, Table},
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
        // Flags unknown (they come in a later fragment): a probe of unknown type.
        Protocol::Tcp if packet.fragment == Fragment::FlagsMissing => ProbeKind::Unknown,
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
            mode: watch.mode_of(packet.protocol, packet.port),
            fragment: packet.fragment,
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

/// The TCP ports the kernel probe tripwire treats as decoys: every port the raw TCP modes
/// watch that no socket of `in_use` has as its local port (any address, any state).
pub fn probe_decoys(watch: &Watch, in_use: &Table) -> Vec<u16> {
    let ports = watch.ports(Protocol::Tcp);
    (1..=u16::MAX)
        .filter(|port| ports.contains(*port) && !in_use.uses_port(*port))
        .collect()
}

/// Why the kernel probe tripwire is not armed for this config and these modes (`None`: it is).
pub fn probe_tripwire_off(config: &Config, raw: &[RawMode]) -> Option<&'static str> {
    if !raw.iter().any(|mode| mode.protocol() == Protocol::Tcp) {
        Some("no raw TCP mode (-stcp, -atcp)")
    } else if !config.nft_tripwire {
        Some("NFT_TRIPWIRE is not \"1\"")
    } else if !config.ban_unverified {
        Some("BAN_UNVERIFIED is not \"1\" (a probe does not prove its source)")
    } else if config.block_tcp != BlockLevel::All {
        Some("BLOCK_TCP is not \"1\"")
    } else if config.scan_trigger > 1 {
        Some("SCAN_TRIGGER is above 1 (the kernel bans on the first probe)")
    } else {
        None
    }
}

/// Arms the kernel probe tripwire on the ports free now (see [`NftBans::install_probe_tripwire`])
/// and keeps its decoys equal to the free watched ports, re-read once a second from the
/// kernel's socket tables, so a port a service binds later stops being a decoy. (Between
/// the bind and the next re-read the kernel rule itself finds the new socket and lets the
/// packet through.) `exempt` are the networks never to ban, set before the rule exists.
pub fn arm_probe_tripwire(
    nft: Arc<NftBans>,
    watch: Watch,
    timeout: Option<Duration>,
    exempt: &[ipnet::IpNet],
    alerts: Arc<Alerts>,
    metrics: Arc<Metrics>,
) -> Result<(), NftError> {
    nft.set_tripwire_exempt(exempt)?;
    let decoys = probe_decoys(&watch, &Table::read(Protocol::Tcp));
    nft.install_probe_tripwire(&decoys, timeout)?;
    alerts.emit(
        &format!(
            "adminalert: Kernel tripwire armed: the first SYN, FIN, NULL or XMAS probe to one of {} free decoy TCP port(s) bans its source from the packet path (NFT_TRIPWIRE=\"1\", BAN_UNVERIFIED=\"1\")",
            decoys.len()
        ),
        Fields::new("probe_tripwire"),
    );
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PROBE_DECOY_SYNC);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            let (nft, watch) = (nft.clone(), watch.clone());
            let result = tokio::task::spawn_blocking(move || {
                nft.set_probe_decoys(&probe_decoys(&watch, &Table::read(Protocol::Tcp)))
            })
            .await;
            let error = match result {
                Ok(Ok(_)) => {
                    last_error = None;
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
                Err(join) => join.to_string(),
            };
            if last_error.as_deref() != Some(&error) {
                metrics.action_failure("nftables");
                alerts.emit(
                    &format!("adminalert: ERROR: cannot update the kernel tripwire's decoy ports: {error}"),
                    Fields::new("probe_tripwire_failed"),
                );
            }
            last_error = Some(error);
        }
    });
    Ok(())
}

/// How often the probe tripwire's decoy ports are brought up to date.
pub const PROBE_DECOY_SYNC: Duration = Duration::from_secs(1);

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
    fn probe_decoys_are_the_watched_tcp_ports_no_socket_uses() {
        let watch = Watch::new(
            &config("ADVANCED_PORTS_TCP=\"100\"\nADVANCED_EXCLUDE_TCP=\"22\"\n"),
            &[RawMode::Atcp],
        );
        let mut in_use = Table::default();
        // 0.0.0.0:80 listening, 10.1.1.1:50 bound.
        in_use.extend("  sl  local_address rem_address   st\n   0: 00000000:0050 00000000:0000 0A\n   1: 0101010A:0032 00000000:0000 0A\n");
        let decoys = probe_decoys(&watch, &in_use);
        assert_eq!(decoys.len(), 99 - 3);
        assert!(!decoys.contains(&22) && !decoys.contains(&80) && !decoys.contains(&50));
        assert!(decoys.contains(&1) && decoys.contains(&99));
    }

    #[test]
    fn the_probe_tripwire_needs_nft_tripwire_ban_unverified_and_block_tcp_1() {
        let base = "NFT_BAN=\"1\"\nBLOCK_TCP=\"1\"\n";
        let on = config(&format!("{base}NFT_TRIPWIRE=\"1\"\nBAN_UNVERIFIED=\"1\"\n"));
        assert_eq!(probe_tripwire_off(&on, &[RawMode::Atcp]), None);
        assert_eq!(probe_tripwire_off(&on, &[RawMode::Stcp]), None);
        assert!(probe_tripwire_off(&on, &[RawMode::Audp]).is_some());
        let unverified_off = config(&format!("{base}NFT_TRIPWIRE=\"1\"\n"));
        assert!(
            probe_tripwire_off(&unverified_off, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("BAN_UNVERIFIED"))
        );
        let tripwire_off = config(&format!("{base}BAN_UNVERIFIED=\"1\"\n"));
        assert!(
            probe_tripwire_off(&tripwire_off, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("NFT_TRIPWIRE"))
        );
    }

    #[test]
    fn the_probe_tripwire_stays_off_when_scan_trigger_asks_for_several_hits() {
        let c = config(
            "NFT_BAN=\"1\"\nBLOCK_TCP=\"1\"\nNFT_TRIPWIRE=\"1\"\nBAN_UNVERIFIED=\"1\"\nSCAN_TRIGGER=\"3\"\n",
        );
        assert!(
            probe_tripwire_off(&c, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("SCAN_TRIGGER"))
        );
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
    fn a_captured_probe_carries_its_raw_mode() {
        let port = free_port();
        match examine_tcp([127, 0, 0, 1], port, true, false) {
            Examined::Probe(hit) => assert_eq!(hit.captured.map(|c| c.mode), Some(RawMode::Stcp)),
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn port_zero_is_never_watched() {
        let watch = Watch::new(&config(""), &[RawMode::Atcp]);
        assert!(!watch.watches(Protocol::Tcp, 0));
    }
}
