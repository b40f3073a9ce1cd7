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

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use portsentry_crds::Protocol;

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

/// The live view of both protocols, re-read as the module doc says.
#[derive(Debug)]
pub struct LiveSockets {
    tables: [(Table, Option<Instant>); 2],
    reads: u64,
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
        }
    }

    /// Times the kernel tables were read, for metrics and tests.
    pub fn reads(&self) -> u64 {
        self.reads
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
