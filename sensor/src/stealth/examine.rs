//! What each captured packet is (parse, destination is this host, port watched, flags name
//! a probe, no socket serves the port), and the capture loop that feeds probes to the engine.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use portsentry_crds::{ProbeKind, Protocol};

use super::{
    capture::{Capture, Received},
    sockets::LiveSockets,
    watch::Watch,
};
use crate::{
    listen::{self, HitSink},
    metrics::Metrics,
    packet::{Captured, Examined, Fragment, Hit, classify, parse},
};

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

/// Decides what one captured packet is (see the module doc for the order of checks).
pub fn examine(
    bytes: &[u8],
    watch: &Watch,
    own: &mut OwnAddresses,
    sockets: &mut LiveSockets,
) -> Examined {
    let Some(packet) = parse::parse(bytes) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, packet::RawMode};
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/test.conf"), text).expect("config")
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
    fn a_captured_probe_carries_its_raw_mode() {
        let port = free_port();
        match examine_tcp([127, 0, 0, 1], port, true, false) {
            Examined::Probe(hit) => assert_eq!(hit.captured.map(|c| c.mode), Some(RawMode::Stcp)),
            other => panic!("expected a probe, got {other:?}"),
        }
    }
}
