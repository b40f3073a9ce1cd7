//! Connect-mode decoy listeners (PortSentry's `-tcp` / `-udp`): binds every decoy on IPv4
//! and IPv6 and turns each completed handshake or datagram into a [`Hit`].
//!
//! TCP sockets set `SO_REUSEADDR`, so a restart right after a hit (TIME_WAIT) keeps the
//! port; a port another program listens on still fails to bind and is skipped with a
//! warning naming that port. UDP sockets do not set it: on Linux it would let the decoy
//! share (and steal datagrams from) a real service's port. IPv6 sockets are v6-only, so
//! the IPv4 socket of the same port is separate. Also reads the host's own addresses.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use portsentry_crds::{ProbeKind, Protocol};
use socket2::{Domain, Socket, Type};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, UdpSocket},
};

use crate::packet::Hit;

/// IP family of a socket, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn any(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            Family::V6 => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        }
    }
}

fn socket(family: Family, kind: Type, protocol: Protocol) -> io::Result<Socket> {
    let domain = match family {
        Family::V4 => Domain::IPV4,
        Family::V6 => Domain::IPV6,
    };
    let socket = Socket::new(domain, kind, None)?;
    if family == Family::V6 {
        socket.set_only_v6(true)?;
    }
    if protocol == Protocol::Tcp {
        socket.set_reuse_address(true)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Binds a TCP decoy on the wildcard address of `family`.
pub fn bind_tcp(family: Family, port: u16) -> io::Result<std::net::TcpListener> {
    let socket = socket(family, Type::STREAM, Protocol::Tcp)?;
    socket.bind(&family.any(port).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Binds a UDP decoy on the wildcard address of `family`.
pub fn bind_udp(family: Family, port: u16) -> io::Result<std::net::UdpSocket> {
    let socket = socket(family, Type::DGRAM, Protocol::Udp)?;
    socket.bind(&family.any(port).into())?;
    Ok(socket.into())
}

/// A decoy socket that bound.
#[derive(Debug)]
pub enum Decoy {
    Tcp(u16, Family, std::net::TcpListener),
    Udp(u16, Family, std::net::UdpSocket),
}

/// A decoy that could not be bound, and why.
#[derive(Debug)]
pub struct Skipped {
    pub protocol: Protocol,
    pub port: u16,
    pub family: Family,
    pub error: io::Error,
}

/// Binds each `(protocol, port)` on IPv4 and IPv6; failures are returned, never fatal.
pub fn bind_all(decoys: &[(Protocol, u16)]) -> (Vec<Decoy>, Vec<Skipped>) {
    let mut bound = Vec::new();
    let mut skipped = Vec::new();
    for &(protocol, port) in decoys {
        for family in [Family::V4, Family::V6] {
            let result = match protocol {
                Protocol::Tcp => bind_tcp(family, port).map(|l| Decoy::Tcp(port, family, l)),
                Protocol::Udp => bind_udp(family, port).map(|s| Decoy::Udp(port, family, s)),
            };
            match result {
                Ok(decoy) => bound.push(decoy),
                Err(error) => skipped.push(Skipped {
                    protocol,
                    port,
                    family,
                    error,
                }),
            }
        }
    }
    (bound, skipped)
}

/// What listeners report hits to; answers whether the banner should be sent.
pub trait HitSink: Send + Sync + 'static {
    fn hit(&self, hit: Hit) -> bool;
}

/// Accepts connections on a TCP decoy forever: each is a hit; the banner goes out (as is,
/// no newline added, as 1.2 writes it) when the hit alarms, then the connection is closed.
pub async fn serve_tcp(
    listener: std::net::TcpListener,
    port: u16,
    banner: Option<Arc<str>>,
    sink: Arc<dyn HitSink>,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(port, %error, "accept failed on TCP decoy");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let alarmed = sink.hit(Hit {
            source: peer.ip().to_canonical(),
            port,
            protocol: Protocol::Tcp,
            kind: ProbeKind::Connect,
            captured: None,
        });
        let banner = banner.clone().filter(|_| alarmed);
        tokio::spawn(async move {
            if let Some(banner) = banner {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    stream.write_all(banner.as_bytes()),
                )
                .await;
            }
            let _ = stream.shutdown().await;
        });
    }
}

/// Most UDP banners sent a second, all decoys together (and the burst allowed).
pub const UDP_BANNERS_PER_SECOND: u32 = 10;

/// `PORT_BANNER` for the UDP decoys, with the budget they share: a datagram's source can be
/// forged, so an answer to every one would make the decoys a reflector; 1.2 answers all.
#[derive(Clone, Debug)]
pub struct UdpBanner {
    text: Arc<str>,
    budget: Arc<std::sync::Mutex<Budget>>,
}

#[derive(Debug)]
struct Budget {
    tokens: u32,
    refilled: std::time::Instant,
}

impl UdpBanner {
    pub fn new(text: Arc<str>) -> Self {
        Self {
            text,
            budget: Arc::new(std::sync::Mutex::new(Budget {
                tokens: UDP_BANNERS_PER_SECOND,
                refilled: std::time::Instant::now(),
            })),
        }
    }

    /// The banner's bytes when the budget allows one more now.
    fn take(&self) -> Option<&[u8]> {
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = budget.refilled.elapsed();
        if elapsed >= std::time::Duration::from_secs(1) {
            budget.tokens = UDP_BANNERS_PER_SECOND;
            budget.refilled = std::time::Instant::now();
        }
        budget.tokens = budget.tokens.checked_sub(1)?;
        Some(self.text.as_bytes())
    }
}

/// Receives datagrams on a UDP decoy forever: each is a hit. When the hit alarms (or comes
/// from a host banned already), the banner goes back to the source from the decoy's port
/// before the alarm is logged, as 1.2's `-udp` sends it (no newline added).
pub async fn serve_udp(
    socket: std::net::UdpSocket,
    port: u16,
    banner: Option<UdpBanner>,
    sink: Arc<dyn HitSink>,
) -> io::Result<()> {
    let socket = UdpSocket::from_std(socket)?;
    let mut buffer = [0u8; 2048];
    loop {
        match socket.recv_from(&mut buffer).await {
            Ok((_, peer)) => {
                let alarmed = sink.hit(Hit {
                    source: peer.ip().to_canonical(),
                    port,
                    protocol: Protocol::Udp,
                    kind: ProbeKind::Datagram,
                    captured: None,
                });
                if let Some(text) = banner
                    .as_ref()
                    .filter(|_| alarmed)
                    .and_then(UdpBanner::take)
                {
                    let _ = socket.try_send_to(text, peer);
                }
            }
            Err(error) => {
                tracing::debug!(port, %error, "receive failed on UDP decoy");
            }
        }
    }
}

/// The host's own addresses: IPv4 `LOCAL` routes of `/proc/net/fib_trie` and the
/// addresses of `/proc/net/if_inet6`. Unreadable files give fewer addresses, not an error.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        addresses.extend(parse_fib_trie_locals(&text).into_iter().map(IpAddr::V4));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        addresses.extend(parse_if_inet6(&text).into_iter().map(IpAddr::V6));
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Addresses followed by a `/32 host LOCAL` line in `/proc/net/fib_trie`.
pub fn parse_fib_trie_locals(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-', '`']);
        if let Ok(address) = line.trim().parse::<Ipv4Addr>() {
            last = Some(address);
        } else if line.contains("host LOCAL")
            && let Some(address) = last
        {
            found.push(address);
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The addresses of `/proc/net/if_inet6` (32 hex digits per line).
pub fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(Ipv6Addr::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::AsyncReadExt;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        hits: Mutex<Vec<Hit>>,
        alarm: bool,
    }

    impl HitSink for Recorder {
        fn hit(&self, hit: Hit) -> bool {
            self.hits.lock().expect("lock").push(hit);
            self.alarm
        }
    }

    fn free_port(protocol: Protocol) -> u16 {
        // Port 0 asks the kernel for a free port; we bind it again right after.
        match protocol {
            Protocol::Tcp => {
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
            }
            Protocol::Udp => std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()),
        }
        .expect("free port")
        .port()
    }

    #[test]
    fn a_port_in_use_is_skipped_with_its_own_number() {
        let busy = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
        let busy_port = busy.local_addr().expect("addr").port();
        let free = free_port(Protocol::Tcp);
        let (bound, skipped) = bind_all(&[(Protocol::Tcp, busy_port), (Protocol::Tcp, free)]);
        assert!(
            skipped
                .iter()
                .any(|s| s.port == busy_port && s.family == Family::V4)
        );
        assert!(
            !skipped
                .iter()
                .any(|s| s.port == free && s.family == Family::V4)
        );
        assert!(
            bound
                .iter()
                .any(|d| matches!(d, Decoy::Tcp(p, Family::V4, _) if *p == free))
        );
    }

    #[test]
    fn ipv4_and_ipv6_sockets_of_one_port_are_separate() {
        let port = free_port(Protocol::Tcp);
        let v4 = bind_tcp(Family::V4, port).expect("v4");
        let v6 = bind_tcp(Family::V6, port);
        drop(v4);
        if let Err(error) = v6 {
            // Only acceptable when the machine has no IPv6 at all.
            assert!(
                !std::path::Path::new("/proc/net/if_inet6").exists(),
                "{error}"
            );
        }
    }

    #[tokio::test]
    async fn a_completed_handshake_is_a_verified_hit_and_gets_the_banner() {
        let port = free_port(Protocol::Tcp);
        let listener = bind_tcp(Family::V4, port).expect("bind");
        let sink = Arc::new(Recorder {
            alarm: true,
            ..Recorder::default()
        });
        tokio::spawn(serve_tcp(
            listener,
            port,
            Some("GO AWAY".into()),
            sink.clone(),
        ));
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        assert_eq!(text, "GO AWAY");
        let hits = sink.hits.lock().expect("lock").clone();
        assert_eq!(hits.len(), 1);
        assert_eq!(
            (hits[0].port, hits[0].protocol, hits[0].verified()),
            (port, Protocol::Tcp, true)
        );
        assert_eq!(hits[0].source, IpAddr::from([127, 0, 0, 1]));
    }

    #[tokio::test]
    async fn no_banner_is_sent_below_the_trigger() {
        let port = free_port(Protocol::Tcp);
        let listener = bind_tcp(Family::V4, port).expect("bind");
        let sink = Arc::new(Recorder::default());
        tokio::spawn(serve_tcp(listener, port, Some("GO AWAY".into()), sink));
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        assert_eq!(text, "");
    }

    #[tokio::test]
    async fn a_datagram_is_an_unverified_hit_on_its_port() {
        let port = free_port(Protocol::Udp);
        let socket = bind_udp(Family::V4, port).expect("bind");
        let sink = Arc::new(Recorder::default());
        tokio::spawn(serve_udp(socket, port, None, sink.clone()));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
        for _ in 0..50 {
            client.send_to(b"x", ("127.0.0.1", port)).expect("send");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if !sink.hits.lock().expect("lock").is_empty() {
                break;
            }
        }
        let hits = sink.hits.lock().expect("lock").clone();
        assert_eq!(
            (hits[0].port, hits[0].protocol, hits[0].verified()),
            (port, Protocol::Udp, false)
        );
    }

    /// Sends a datagram to a UDP decoy; returns what came back and whether from the decoy's port.
    async fn datagram_answer(banner: Option<UdpBanner>, alarm: bool) -> Option<(Vec<u8>, bool)> {
        let port = free_port(Protocol::Udp);
        let socket = bind_udp(Family::V4, port).expect("bind");
        let sink = Arc::new(Recorder {
            alarm,
            ..Recorder::default()
        });
        tokio::spawn(serve_udp(socket, port, banner, sink.clone()));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("client");
        client
            .send_to(b"x", ("127.0.0.1", port))
            .await
            .expect("send");
        let mut buffer = [0u8; 256];
        let answer = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            client.recv_from(&mut buffer),
        )
        .await;
        assert!(
            !sink.hits.lock().expect("lock").is_empty(),
            "no hit recorded"
        );
        match answer {
            Ok(Ok((n, from))) => Some((buffer[..n].to_vec(), from.port() == port)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn an_alarming_datagram_gets_the_banner_from_the_decoys_port() {
        let port_banner = UdpBanner::new("GO AWAY".into());
        assert_eq!(
            datagram_answer(Some(port_banner), true).await,
            Some((b"GO AWAY".to_vec(), true))
        );
    }

    #[tokio::test]
    async fn no_udp_banner_is_sent_below_the_trigger() {
        let port_banner = UdpBanner::new("GO AWAY".into());
        assert_eq!(datagram_answer(Some(port_banner), false).await, None);
    }

    #[test]
    fn udp_banners_stop_at_the_budget_of_a_second() {
        let banner = UdpBanner::new("GO AWAY".into());
        let sent = (0..100).filter(|_| banner.take().is_some()).count();
        assert_eq!(sent, UDP_BANNERS_PER_SECOND as usize);
    }

    #[test]
    fn fib_trie_local_routes_are_own_addresses() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.2\n        /32 host LOCAL\n     |-- 10.0.0.255\n        /32 link BROADCAST\n     |-- 127.0.0.1\n        /32 host LOCAL\n";
        assert_eq!(
            parse_fib_trie_locals(text),
            vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 1)]
        );
    }

    #[test]
    fn if_inet6_lines_are_own_addresses() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo\nfd000000000000000000000000000002 02 40 00 80 veth0\n";
        assert_eq!(
            parse_if_inet6(text),
            vec![
                Ipv6Addr::LOCALHOST,
                "fd00::2".parse::<Ipv6Addr>().expect("v6")
            ]
        );
    }
}
