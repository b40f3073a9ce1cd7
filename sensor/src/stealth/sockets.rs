//! Which ports are really in use, read live from the kernel's socket tables
//! (`/proc/net/tcp`, `tcp6`, `udp`, `udp6`), so a service started later is never a decoy.
//!
//! A port is in use for a packet when any socket of that protocol has it as its local
//! port, bound to the wildcard address or to the packet's destination. Every TCP state
//! counts, not only LISTEN: stray ACKs of a connection this host opened or just closed
//! (TIME_WAIT) must not look like an ACK scan. The table is re-read when it is older than
//! [`MAX_AGE`], and, before a port it lists as free is reported, when it is older than
//! [`MIN_AGE`]: a service that started a moment ago is seen, and a flood of probes costs
//! at most one read per protocol every [`MIN_AGE`].
//!
//! On the capture path [`LiveSockets::serves`] asks the kernel first, with one
//! `NETLINK_SOCK_DIAG` request for the packet's exact addresses and ports (the lookup the
//! kernel itself does to deliver it: established and TIME_WAIT sockets of that connection,
//! then listeners or bound UDP sockets on the port). It costs a few microseconds whatever the
//! number of sockets, where reading `/proc/net/tcp` walks the whole connection hash table
//! (milliseconds per read) and used to delay the first ban of a scan. The tables remain the
//! fallback when the kernel has no socket diagnostics.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use portsentry_crds::Protocol;

use crate::netlink::{Enc, NetlinkSocket, Reply, codec::NLM_F_REQUEST};

/// A table older than this is re-read before any answer.
pub const MAX_AGE: Duration = Duration::from_secs(1);
/// A table younger than this is trusted even when it says a port is free.
pub const MIN_AGE: Duration = Duration::from_millis(20);

/// Local (address, port) pairs of every socket of one protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    ports: HashMap<u16, Vec<IpAddr>>,
}

impl Table {
    /// Reads the tables of `/proc/net/<tcp|udp>` and `<tcp6|udp6>`; a missing file
    /// (no IPv6) reads as empty.
    pub fn read(protocol: Protocol) -> Self {
        let base = match protocol {
            Protocol::Tcp => "/proc/net/tcp",
            Protocol::Udp => "/proc/net/udp",
        };
        let mut table = Self::default();
        for path in [base.to_owned(), format!("{base}6")] {
            if let Ok(text) = std::fs::read_to_string(&path) {
                table.extend(&text);
            }
        }
        table
    }

    /// Adds the sockets of one `/proc/net/{tcp,udp}{,6}` text.
    pub fn extend(&mut self, text: &str) {
        for (address, port) in text.lines().skip(1).filter_map(parse_line) {
            let addresses = self.ports.entry(port).or_default();
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
    }

    /// Whether any socket of this table has `port` as its local port, on any address.
    pub fn uses_port(&self, port: u16) -> bool {
        self.ports.contains_key(&port)
    }

    /// Whether a packet to `destination:port` would reach a socket of this table.
    pub fn in_use(&self, port: u16, destination: IpAddr) -> bool {
        let destination = destination.to_canonical();
        self.ports.get(&port).is_some_and(|addresses| {
            addresses.iter().any(|local| {
                *local == destination
                    || (local.is_unspecified() && (local.is_ipv6() || destination.is_ipv4()))
            })
        })
    }
}

/// `local_address` of one line as (address, port); the header and bad lines give `None`.
/// Addresses are the kernel's 32-bit words printed in host byte order.
fn parse_line(line: &str) -> Option<(IpAddr, u16)> {
    let local = line.split_whitespace().nth(1)?;
    let (address, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let address = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(address)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (index, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(address.get(index * 8..index * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((address.to_canonical(), port))
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const ENOENT: i32 = 2;
/// `struct inet_diag_req_v2` is 56 bytes.
const REQUEST_LEN: usize = 56;

/// Body of a `SOCK_DIAG_BY_FAMILY` request (`struct inet_diag_req_v2`) asking for the socket
/// the kernel would deliver a packet from `remote` to `local` to. TCP takes the local end as
/// the socket's source; UDP (`udp_dump_one`) takes the fields the other way round.
pub fn diag_request(
    protocol: Protocol,
    local: SocketAddr,
    remote: SocketAddr,
) -> [u8; REQUEST_LEN] {
    let (local, remote) = canonical_pair(local, remote);
    let mut body = [0u8; REQUEST_LEN];
    body[0] = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let (src, dst) = match protocol {
        Protocol::Tcp => {
            body[1] = IPPROTO_TCP;
            (local, remote)
        }
        Protocol::Udp => {
            body[1] = IPPROTO_UDP;
            (remote, local)
        }
    };
    body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
    body[8..10].copy_from_slice(&src.port().to_be_bytes());
    body[10..12].copy_from_slice(&dst.port().to_be_bytes());
    for (at, address) in [(12, src.ip()), (28, dst.ip())] {
        match address {
            IpAddr::V4(a) => body[at..at + 4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => body[at..at + 16].copy_from_slice(&a.octets()),
        }
    }
    // idiag_if = 0 (any interface); cookie = INET_DIAG_NOCOOKIE.
    body[48..56].copy_from_slice(&[0xff; 8]);
    body
}

/// Both ends in one family: IPv4-mapped IPv6 addresses become IPv4 when both are.
fn canonical_pair(local: SocketAddr, remote: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (l, r) = (local.ip().to_canonical(), remote.ip().to_canonical());
    if l.is_ipv4() == r.is_ipv4() {
        (
            SocketAddr::new(l, local.port()),
            SocketAddr::new(r, remote.port()),
        )
    } else {
        (local, remote)
    }
}

/// A `NETLINK_SOCK_DIAG` socket for exact socket lookups.
#[derive(Debug)]
pub struct Diag {
    socket: NetlinkSocket,
}

impl Diag {
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            socket: NetlinkSocket::open(NETLINK_SOCK_DIAG, Duration::from_secs(1), 8192)?,
        })
    }

    /// Whether the kernel holds a socket that a `protocol` packet from `remote` to `local`
    /// reaches now. An error means the kernel cannot answer (no `inet_diag`/`udp_diag`).
    pub fn serves(
        &mut self,
        protocol: Protocol,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<bool> {
        let seq = self.socket.next_seq();
        let mut message = Enc::default();
        let start = message.begin(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq);
        message.raw(&diag_request(protocol, local, remote));
        message.finish(start);
        self.socket.send(&message.buf)?;
        loop {
            // A late answer to an earlier request that timed out is skipped.
            for answer in self.socket.recv()? {
                if answer.seq != seq {
                    continue;
                }
                return match answer.kind {
                    Reply::Data(_) | Reply::Done(_) => Ok(true),
                    // Not found; an ACK (never asked for) would mean found nothing to report.
                    Reply::Error(ENOENT | 0) => Ok(false),
                    Reply::Error(errno) => Err(io::Error::from_raw_os_error(errno)),
                };
            }
        }
    }
}

/// The live view of both protocols, re-read as the module doc says.
#[derive(Debug)]
pub struct LiveSockets {
    tables: [(Table, Option<Instant>); 2],
    reads: u64,
    /// `None` when no diagnostics socket could be opened: the tables are used instead.
    diag: Option<Diag>,
    lookups: u64,
    warned: bool,
}

impl Default for LiveSockets {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveSockets {
    pub fn new() -> Self {
        Self {
            tables: [(Table::default(), None), (Table::default(), None)],
            reads: 0,
            diag: Diag::open().ok(),
            lookups: 0,
            warned: false,
        }
    }

    /// Times the kernel tables were read, for metrics and tests.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Exact lookups the kernel answered, for tests.
    pub fn lookups(&self) -> u64 {
        self.lookups
    }

    /// Whether a `protocol` packet from `remote` to `local` reaches a real socket now: the
    /// kernel's exact lookup when it answers, else [`LiveSockets::in_use`] on the tables.
    pub fn serves(&mut self, protocol: Protocol, local: SocketAddr, remote: SocketAddr) -> bool {
        if let Some(diag) = &mut self.diag {
            match diag.serves(protocol, local, remote) {
                Ok(found) => {
                    self.lookups += 1;
                    return found;
                }
                Err(error) if !self.warned => {
                    self.warned = true;
                    tracing::warn!(%error, ?protocol, "socket diagnostics lookup failed; reading /proc/net tables instead");
                }
                Err(_) => {}
            }
        }
        self.in_use(protocol, local.port(), local.ip())
    }

    /// Whether `destination:port` is served by a real socket now.
    pub fn in_use(&mut self, protocol: Protocol, port: u16, destination: IpAddr) -> bool {
        let index = match protocol {
            Protocol::Tcp => 0,
            Protocol::Udp => 1,
        };
        let age = self.tables[index].1.map(|at| at.elapsed());
        if age.is_none_or(|age| age > MAX_AGE) {
            self.refresh(index, protocol);
        } else if self.tables[index].0.in_use(port, destination) {
            return true;
        } else if age.is_some_and(|age| age > MIN_AGE) {
            self.refresh(index, protocol);
        }
        self.tables[index].0.in_use(port, destination)
    }

    fn refresh(&mut self, index: usize, protocol: Protocol) {
        self.tables[index] = (Table::read(protocol), Some(Instant::now()));
        self.reads += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n   2: 0101E70A:9C41 0201E70A:0050 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0\n   1: 0000000000000000FFFF00000101E70A:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5 1 0 100 0 0 10 0\n";

    fn table(texts: &[&str]) -> Table {
        let mut table = Table::default();
        for text in texts {
            table.extend(text);
        }
        table
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_wildcard_listener_makes_its_port_in_use_for_ipv4() {
        assert!(table(&[TCP]).in_use(22, ip("10.231.1.1")));
    }

    #[test]
    fn a_loopback_only_listener_leaves_the_port_free_on_other_addresses() {
        let table = table(&[TCP]);
        assert!(table.in_use(25, ip("127.0.0.1")));
        assert!(!table.in_use(25, ip("10.231.1.1")));
    }

    #[test]
    fn a_connected_socket_makes_its_local_port_in_use() {
        assert!(table(&[TCP]).in_use(40001, ip("10.231.1.1")));
    }

    #[test]
    fn an_ipv6_wildcard_listener_covers_ipv4_and_ipv6() {
        let table = table(&[TCP6]);
        assert!(table.in_use(80, ip("10.231.1.1")));
        assert!(table.in_use(80, ip("fd00::1")));
    }

    #[test]
    fn an_ipv4_wildcard_listener_does_not_cover_ipv6() {
        assert!(!table(&[TCP]).in_use(22, ip("fd00::1")));
    }

    #[test]
    fn a_v4_mapped_listener_is_its_ipv4_address() {
        let table = table(&[TCP6]);
        assert!(table.in_use(443, ip("10.231.1.1")));
        assert!(!table.in_use(443, ip("10.231.1.2")));
    }

    #[test]
    fn an_unlisted_port_is_free() {
        assert!(!table(&[TCP, TCP6]).in_use(31337, ip("10.231.1.1")));
    }

    #[test]
    fn a_socket_bound_now_is_seen_by_the_live_view() {
        let mut live = LiveSockets::new();
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = free.local_addr().expect("addr").port();
        drop(free);
        assert!(!live.in_use(Protocol::Tcp, port, ip("127.0.0.1")));
        let _service = std::net::TcpListener::bind(("127.0.0.1", port)).expect("rebind");
        std::thread::sleep(MIN_AGE + Duration::from_millis(5));
        assert!(live.in_use(Protocol::Tcp, port, ip("127.0.0.1")));
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    #[test]
    fn a_tcp_request_names_the_local_end_as_source_and_udp_the_remote() {
        let tcp = diag_request(Protocol::Tcp, sa("10.0.0.1:111"), sa("192.0.2.7:40000"));
        assert_eq!((tcp[0], tcp[1]), (AF_INET, IPPROTO_TCP));
        assert_eq!(&tcp[4..8], &[0xff; 4]);
        assert_eq!(&tcp[8..12], &[0, 111, 0x9c, 0x40]);
        assert_eq!(&tcp[12..16], &[10, 0, 0, 1]);
        assert_eq!(&tcp[28..32], &[192, 0, 2, 7]);
        assert_eq!(&tcp[48..56], &[0xff; 8]);
        let udp = diag_request(Protocol::Udp, sa("10.0.0.1:111"), sa("192.0.2.7:40000"));
        assert_eq!((udp[0], udp[1]), (AF_INET, IPPROTO_UDP));
        assert_eq!(&udp[8..12], &[0x9c, 0x40, 0, 111]);
        assert_eq!(&udp[12..16], &[192, 0, 2, 7]);
        assert_eq!(&udp[28..32], &[10, 0, 0, 1]);
    }

    #[test]
    fn an_ipv6_request_carries_both_full_addresses_and_mapped_pairs_become_ipv4() {
        let v6 = diag_request(Protocol::Tcp, sa("[fd00::1]:22"), sa("[fd00::2]:5"));
        assert_eq!(v6[0], AF_INET6);
        assert_eq!(
            &v6[12..28],
            &"fd00::1".parse::<Ipv6Addr>().expect("v6").octets()
        );
        assert_eq!(v6[43], 2);
        let mapped = diag_request(
            Protocol::Tcp,
            sa("[::ffff:10.0.0.1]:22"),
            sa("[::ffff:192.0.2.7]:5"),
        );
        assert_eq!(mapped[0], AF_INET);
        assert_eq!(&mapped[12..16], &[10, 0, 0, 1]);
    }

    #[test]
    fn the_kernel_lookup_finds_a_tcp_listener_without_reading_the_tables() {
        let mut live = LiveSockets::new();
        let service = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = service.local_addr().expect("addr").port();
        let local = SocketAddr::new(ip("127.0.0.1"), port);
        assert!(live.serves(Protocol::Tcp, local, sa("127.0.0.1:40000")));
        drop(service);
        assert!(!live.serves(Protocol::Tcp, local, sa("127.0.0.1:40000")));
        assert_eq!((live.lookups(), live.reads()), (2, 0));
    }

    #[test]
    fn the_kernel_lookup_sees_a_connection_but_not_other_sources_once_nothing_listens() {
        let mut live = LiveSockets::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let local = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(local).expect("connect");
        let (_accepted, _) = listener.accept().expect("accept");
        drop(listener);
        let remote = client.local_addr().expect("client addr");
        assert!(live.serves(Protocol::Tcp, local, remote));
        let stranger = SocketAddr::new(remote.ip(), remote.port().wrapping_add(1).max(1));
        assert!(!live.serves(Protocol::Tcp, local, stranger));
        assert_eq!(live.reads(), 0);
    }

    #[test]
    fn the_kernel_lookup_finds_a_bound_udp_socket() {
        let mut live = LiveSockets::new();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let local = socket.local_addr().expect("addr");
        assert!(live.serves(Protocol::Udp, local, sa("127.0.0.1:40000")));
        drop(socket);
        assert!(!live.serves(Protocol::Udp, local, sa("127.0.0.1:40000")));
        assert_eq!(live.reads(), 0);
    }

    #[test]
    fn probes_to_a_free_port_read_the_table_at_most_once_per_min_age() {
        let mut live = LiveSockets::new();
        let started = Instant::now();
        for _ in 0..10_000 {
            live.in_use(Protocol::Udp, 9, ip("127.0.0.1"));
        }
        let bound = started.elapsed().as_millis() / MIN_AGE.as_millis() + 2;
        assert!(u128::from(live.reads()) <= bound, "{} reads", live.reads());
    }
}
