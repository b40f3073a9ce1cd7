//! The pure parser of what the capture socket reads: an IP packet (no link header) to the
//! addresses, ports, TCP flags, IP options and fragment state of a [`Packet`].
//!
//! Headers are parsed with `etherparse` (`LaxSlicedPacket::from_ip`): a maintained,
//! allocation-free, `no_std`-capable parser with IPv6 extension-header walking and
//! explicit errors for every truncation; the lax variant accepts the snapped (cut) payload.

use std::net::IpAddr;

use etherparse::{IpNumber, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use portsentry_crds::Protocol;

use super::types::{Fragment, TcpFlags};

/// What the parser found in one captured packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub source_port: u16,
    /// Destination port.
    pub port: u16,
    /// TCP flags; empty for UDP.
    pub flags: TcpFlags,
    /// IPv4 options (header longer than 20 bytes) or IPv6 extension headers.
    pub ip_options: bool,
    /// Whether this is a whole packet or the first fragment of one.
    pub fragment: Fragment,
}

/// Parses an IP packet (cooked capture: no link header). `None` for anything but a TCP or
/// UDP packet with complete headers, or the first fragment of one (which has at least the
/// ports; see [`Fragment`]). Later fragments carry no ports and are not parsed.
pub fn parse(bytes: &[u8]) -> Option<Packet> {
    let packet = LaxSlicedPacket::from_ip(bytes).ok()?;
    let (source, destination, ip_options) = match packet.net.as_ref()? {
        LaxNetSlice::Ipv4(ipv4) => {
            let header = ipv4.header();
            (
                IpAddr::V4(header.source_addr()),
                IpAddr::V4(header.destination_addr()),
                header.ihl() > 5,
            )
        }
        LaxNetSlice::Ipv6(ipv6) => {
            let header = ipv6.header();
            (
                IpAddr::V6(header.source_addr()),
                IpAddr::V6(header.destination_addr()),
                !ipv6.extensions().is_empty(),
            )
        }
        LaxNetSlice::Arp(_) => return None,
    };
    let (protocol, source_port, port, flags, fragment) = match packet.transport.as_ref() {
        Some(TransportSlice::Tcp(tcp)) => (
            Protocol::Tcp,
            tcp.source_port(),
            tcp.destination_port(),
            TcpFlags(*tcp.slice().get(13)?),
            Fragment::Whole,
        ),
        Some(TransportSlice::Udp(udp)) => (
            Protocol::Udp,
            udp.source_port(),
            udp.destination_port(),
            TcpFlags::default(),
            Fragment::Whole,
        ),
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => return None,
        None => first_fragment(bytes, &packet)?,
    };
    Some(Packet {
        source: source.to_canonical(),
        destination: destination.to_canonical(),
        protocol,
        source_port,
        port,
        flags,
        ip_options,
        fragment,
    })
}

/// Protocol, ports, flags of the first fragment of a TCP or UDP packet; `None` for anything
/// else (whole packets are parsed by etherparse, later fragments have no transport header).
fn first_fragment(
    bytes: &[u8],
    packet: &LaxSlicedPacket,
) -> Option<(Protocol, u16, u16, TcpFlags, Fragment)> {
    let (payload, first) = match packet.net.as_ref()? {
        LaxNetSlice::Ipv4(ip) => (ip.payload(), ip.header().fragments_offset().value() == 0),
        LaxNetSlice::Ipv6(ip) => (ip.payload(), ipv6_fragment_offset(bytes) == Some(0)),
        LaxNetSlice::Arp(_) => return None,
    };
    if !payload.fragmented || !first {
        return None;
    }
    let bytes = payload.payload;
    let source_port = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match payload.ip_number {
        IpNumber::TCP => Some(match bytes.get(13) {
            Some(flags) => (
                Protocol::Tcp,
                source_port,
                port,
                TcpFlags(*flags),
                Fragment::First,
            ),
            None => (
                Protocol::Tcp,
                source_port,
                port,
                TcpFlags::default(),
                Fragment::FlagsMissing,
            ),
        }),
        IpNumber::UDP => Some((
            Protocol::Udp,
            source_port,
            port,
            TcpFlags::default(),
            Fragment::First,
        )),
        _ => None,
    }
}

/// The fragment offset of an IPv6 packet's Fragment header (`None` without one or when the
/// extension chain is cut short). Walked here, bounds-checked, rather than with etherparse
/// 0.19's extension iterator: on a truncated chain from lax parsing that iterator reads past
/// its slice (`get_unchecked`; found by the packet-path property test).
fn ipv6_fragment_offset(bytes: &[u8]) -> Option<u16> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AUTHENTICATION: u8 = 51;
    const DESTINATION_OPTIONS: u8 = 60;
    let mut next = *bytes.get(6)?;
    let mut at = 40usize;
    loop {
        let header = bytes.get(at..at + 8)?;
        let length = match next {
            FRAGMENT => return Some(u16::from_be_bytes([header[2], header[3]]) >> 3),
            HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS => (usize::from(header[1]) + 1) * 8,
            AUTHENTICATION => (usize::from(header[1]) + 2) * 4,
            _ => return None,
        };
        next = header[0];
        at += length;
    }
}

#[cfg(test)]
mod tests {
    use crate::stealth::capture::SNAPLEN;
    use etherparse::PacketBuilder;

    use super::*;

    fn tcp4(flags: u8, options: bool) -> Vec<u8> {
        let mut ip = etherparse::Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::TCP,
            [10, 0, 0, 2],
            [10, 0, 0, 1],
        )
        .expect("header");
        if options {
            ip.options = [1, 1, 1, 0][..].try_into().expect("options");
        }
        let builder = PacketBuilder::ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .tcp(40000, 31337, 1, 1024);
        let builder = match flags {
            0x02 => builder.syn(),
            0x01 => builder.fin(),
            _ => builder,
        };
        let mut out = Vec::new();
        builder.write(&mut out, &[]).expect("write");
        out
    }

    /// The first IPv4 fragment of a TCP SYN to 31337 whose payload holds `tcp_bytes` bytes
    /// of the TCP header (`nmap -f` sends 8), more fragments to follow.
    fn first_tcp_fragment(tcp_bytes: usize) -> Vec<u8> {
        let mut whole = tcp4(0x02, false);
        whole.truncate(20 + tcp_bytes);
        let total = whole.len() as u16;
        whole[2..4].copy_from_slice(&total.to_be_bytes());
        whole[6] = 0x20; // more fragments, offset 0
        whole[10..12].copy_from_slice(&[0, 0]);
        let checksum = etherparse::Ipv4HeaderSlice::from_slice(&whole[..20])
            .expect("header")
            .to_header()
            .calc_header_checksum();
        whole[10..12].copy_from_slice(&checksum.to_be_bytes());
        whole
    }

    #[test]
    fn a_first_fragment_cut_before_the_tcp_flags_gives_the_ports_and_says_so() {
        let packet = parse(&first_tcp_fragment(8)).expect("parsed");
        assert_eq!((packet.protocol, packet.port), (Protocol::Tcp, 31337));
        assert_eq!(packet.source_port, 40000);
        assert_eq!(packet.fragment, Fragment::FlagsMissing);
    }

    #[test]
    fn a_first_fragment_that_holds_the_flags_gives_them() {
        let packet = parse(&first_tcp_fragment(16)).expect("parsed");
        assert_eq!(packet.flags, TcpFlags(TcpFlags::SYN));
        assert_eq!(packet.fragment, Fragment::First);
    }

    #[test]
    fn a_later_fragment_is_not_parsed() {
        let mut later = first_tcp_fragment(8);
        later[6..8].copy_from_slice(&1u16.to_be_bytes()); // offset 8 bytes, last fragment
        assert_eq!(parse(&later), None);
    }

    /// An IPv6 TCP SYN to 31337 cut after `tcp_bytes` bytes of TCP header behind a Fragment
    /// header with `offset` (in 8-byte units) and more fragments to follow.
    fn ipv6_tcp_fragment(offset: u16, tcp_bytes: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&31337u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = TcpFlags::SYN;
        tcp.truncate(tcp_bytes);
        let mut packet = vec![0u8; 40];
        packet[0] = 0x60;
        packet[4..6].copy_from_slice(&((8 + tcp.len()) as u16).to_be_bytes());
        packet[6] = 44; // Fragment header
        packet[7] = 64;
        packet[8..24].copy_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        packet[24..40].copy_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        packet.extend_from_slice(&[6, 0]); // next header TCP
        packet.extend_from_slice(&((offset << 3) | 1).to_be_bytes()); // more fragments
        packet.extend_from_slice(&7u32.to_be_bytes()); // identification
        packet.extend_from_slice(&tcp);
        packet
    }

    #[test]
    fn an_ipv6_first_fragment_cut_before_the_tcp_flags_gives_the_ports_and_says_so() {
        let packet = parse(&ipv6_tcp_fragment(0, 8)).expect("parsed");
        assert_eq!((packet.protocol, packet.port), (Protocol::Tcp, 31337));
        assert_eq!(packet.fragment, Fragment::FlagsMissing);
    }

    #[test]
    fn an_ipv6_later_fragment_is_not_parsed() {
        assert_eq!(parse(&ipv6_tcp_fragment(1, 8)), None);
    }

    #[test]
    fn an_ipv6_extension_chain_cut_short_is_not_parsed_and_never_read_past() {
        let whole = ipv6_tcp_fragment(0, 8);
        for cut in 0..whole.len() {
            let _ = parse(&whole[..cut]);
        }
        let mut chain = whole[..40].to_vec();
        chain[6] = 0; // hop-by-hop header claiming 2 KiB more than there is
        chain.extend_from_slice(&[44, 255, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ipv6_fragment_offset(&chain), None);
    }

    #[test]
    fn a_whole_packet_is_not_a_fragment() {
        assert_eq!(
            parse(&tcp4(0x02, false)).expect("parsed").fragment,
            Fragment::Whole
        );
    }

    #[test]
    fn an_ipv4_syn_gives_addresses_ports_and_flags() {
        let packet = parse(&tcp4(0x02, false)).expect("parsed");
        assert_eq!(packet.source, IpAddr::from([10, 0, 0, 2]));
        assert_eq!(packet.destination, IpAddr::from([10, 0, 0, 1]));
        assert_eq!(
            (packet.protocol, packet.source_port, packet.port),
            (Protocol::Tcp, 40000, 31337)
        );
        assert_eq!(packet.flags, TcpFlags(TcpFlags::SYN));
        assert!(!packet.ip_options);
    }

    #[test]
    fn ipv4_options_are_flagged() {
        assert!(parse(&tcp4(0x01, true)).expect("parsed").ip_options);
    }

    #[test]
    fn an_ipv6_udp_datagram_behind_a_destination_options_header_is_parsed() {
        let mut out = Vec::new();
        let source: [u8; 16] = "fd00::2"
            .parse::<std::net::Ipv6Addr>()
            .expect("v6")
            .octets();
        let destination: [u8; 16] = "fd00::1"
            .parse::<std::net::Ipv6Addr>()
            .expect("v6")
            .octets();
        let udp = etherparse::UdpHeader::without_ipv4_checksum(5353, 161, 0).expect("udp");
        let options =
            etherparse::Ipv6RawExtHeader::new_raw(etherparse::IpNumber::UDP, &[0; 6]).expect("ext");
        let ip = etherparse::Ipv6Header {
            payload_length: (options.header_len() + udp.header_len()) as u16,
            next_header: etherparse::IpNumber::IPV6_DESTINATION_OPTIONS,
            hop_limit: 64,
            source,
            destination,
            ..Default::default()
        };
        ip.write(&mut out).expect("ip");
        options.write(&mut out).expect("ext");
        udp.write(&mut out).expect("udp");
        let packet = parse(&out).expect("parsed");
        assert_eq!((packet.protocol, packet.port), (Protocol::Udp, 161));
        assert_eq!(packet.source, "fd00::2".parse::<IpAddr>().expect("v6"));
        assert!(packet.ip_options);
    }

    #[test]
    fn a_header_cut_short_is_not_a_packet() {
        let bytes = tcp4(0x02, false);
        assert_eq!(parse(&bytes[..30]), None);
    }

    #[test]
    fn a_snapped_packet_with_whole_headers_still_parses() {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .udp(1, 53)
            .write(&mut out, &[0; 2000])
            .expect("write");
        out.truncate(SNAPLEN as usize);
        assert_eq!(parse(&out).map(|p| p.port), Some(53));
    }
}
