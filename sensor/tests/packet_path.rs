//! Property: the packet path of the stealth and advanced modes (parse, then classify and
//! label) never panics, whatever bytes the capture socket hands it.
//!
//! Executions per `cargo test` run: 50,000 cases of arbitrary bytes plus 50,000 mutations
//! of valid IPv4/IPv6 TCP/UDP packets (flipped bytes, truncation) = 100,000. Raise
//! `PROPTEST_CASES` for more: a run with `PROPTEST_CASES=1000000` (2,000,000 executions)
//! passed when this was written.

use etherparse::PacketBuilder;
use portsentry_sensor::packet::{
    classify::{classify, label},
    parse::parse,
};
use proptest::prelude::*;

/// What the capture loop does with one packet, short of the engine.
fn packet_path(bytes: &[u8]) {
    if let Some(packet) = parse(bytes) {
        if let Some(kind) = classify(packet.flags) {
            assert!(!label(kind, packet.flags).is_empty());
        }
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// A valid packet: IPv4 or IPv6, TCP (with any flags) or UDP, some payload.
fn valid_packet(v6: bool, tcp: bool, flags: u8, payload: &[u8]) -> Vec<u8> {
    let builder = if v6 {
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
    } else {
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
    };
    let mut out = Vec::new();
    let written = if tcp {
        let mut builder = builder.tcp(40000, 31337, 1, 1024);
        if flags & 0x01 != 0 {
            builder = builder.fin();
        }
        if flags & 0x02 != 0 {
            builder = builder.syn();
        }
        if flags & 0x04 != 0 {
            builder = builder.rst();
        }
        if flags & 0x08 != 0 {
            builder = builder.psh();
        }
        if flags & 0x10 != 0 {
            builder = builder.ack(7);
        }
        if flags & 0x20 != 0 {
            builder = builder.urg(1);
        }
        builder.write(&mut out, payload)
    } else {
        builder.udp(5353, 161).write(&mut out, payload)
    };
    written.expect("a valid packet can be written");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(50_000)))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        packet_path(&bytes);
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        v6 in any::<bool>(),
        tcp in any::<bool>(),
        flags in any::<u8>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = valid_packet(v6, tcp, flags, &payload);
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let keep = cut % (bytes.len() + 1);
        bytes.truncate(keep.max(bytes.len() / 2));
        packet_path(&bytes);
    }

}

proptest! {
    #[test]
    fn a_valid_packet_parses_to_its_ports_and_flags(
        v6 in any::<bool>(),
        tcp in any::<bool>(),
        flags in 0u8..64,
    ) {
        let packet = parse(&valid_packet(v6, tcp, flags, b"x")).expect("a valid packet parses");
        prop_assert_eq!(packet.port, if tcp { 31337 } else { 161 });
        if tcp {
            prop_assert_eq!(packet.flags.0 & 0x3f, flags);
        }
    }
}
