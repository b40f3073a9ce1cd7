//! Names a TCP probe from its flags as PortSentry 1.2's `ReportPacketType` does, plus the
//! ACK, Window and Maimon probes 1.2 ignores; pure, so it is tested as a specification.
//!
//! Only the six classic flags count (1.2's `struct tcphdr` has no ECE/CWR bits): a SYN
//! with ECN bits is still a SYN. Packets with RST, and ACK packets other than a bare ACK
//! or FIN+ACK (SYN+ACK, PSH+ACK: replies and established traffic), are not probes.
//! nmap's ACK (`-sA`) and Window (`-sW`) scans send the same bare ACK and differ only in
//! how nmap reads the reply, so both get [`ProbeKind::Ack`] and the label
//! `TCP ACK/Window scan`; [`ProbeKind::Window`] is never produced from a packet.

use portsentry_crds::ProbeKind;

use super::types::{Captured, Fragment, TcpFlags};

/// The words of the alarm line of a captured TCP probe: [`label`], except for a first
/// fragment cut before the flags (`nmap -f`), whose flags are unknown: `TCP fragmented scan`.
pub fn captured_label(kind: ProbeKind, captured: &Captured) -> String {
    match captured.fragment {
        Fragment::FlagsMissing => "TCP fragmented scan".into(),
        _ => label(kind, captured.flags),
    }
}

/// What the flags of a packet to a watched port say it is; `None`: not a probe.
pub fn classify(flags: TcpFlags) -> Option<ProbeKind> {
    const F: u8 = TcpFlags::FIN;
    const S: u8 = TcpFlags::SYN;
    const R: u8 = TcpFlags::RST;
    const P: u8 = TcpFlags::PSH;
    const A: u8 = TcpFlags::ACK;
    const U: u8 = TcpFlags::URG;
    let classic = flags.classic();
    if classic & R != 0 {
        return None;
    }
    if classic & A != 0 {
        return match classic {
            A => Some(ProbeKind::Ack),
            x if x == F | A => Some(ProbeKind::Maimon),
            _ => None,
        };
    }
    Some(match classic {
        0 => ProbeKind::Null,
        x if x & (F | U | P) == F | U | P => ProbeKind::Xmas,
        F => ProbeKind::Fin,
        S => ProbeKind::Syn,
        _ => ProbeKind::Unknown,
    })
}

/// The words of an alarm line for a TCP probe, exactly as 1.2 writes its four (with the
/// leading space of ` TCP NULL scan`), and in the same style for the kinds it lacks.
pub fn label(kind: ProbeKind, flags: TcpFlags) -> String {
    match kind {
        ProbeKind::Syn => "TCP SYN/Normal scan".into(),
        ProbeKind::Fin => "TCP FIN scan".into(),
        ProbeKind::Null => " TCP NULL scan".into(),
        ProbeKind::Xmas => "TCP XMAS scan".into(),
        ProbeKind::Ack | ProbeKind::Window => "TCP ACK/Window scan".into(),
        ProbeKind::Maimon => "TCP Maimon scan".into(),
        ProbeKind::Connect => "Connect".into(),
        ProbeKind::Datagram => "UDP scan".into(),
        ProbeKind::Unknown => format!("Unknown Type: TCP Packet Flags: {flags}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u8 = TcpFlags::FIN;
    const S: u8 = TcpFlags::SYN;
    const R: u8 = TcpFlags::RST;
    const P: u8 = TcpFlags::PSH;
    const A: u8 = TcpFlags::ACK;
    const U: u8 = TcpFlags::URG;

    fn kind(bits: u8) -> Option<ProbeKind> {
        classify(TcpFlags(bits))
    }

    fn label_of(bits: u8) -> Option<String> {
        kind(bits).map(|k| label(k, TcpFlags(bits)))
    }

    #[test]
    fn a_bare_syn_is_a_syn_normal_scan() {
        assert_eq!(label_of(S).as_deref(), Some("TCP SYN/Normal scan"));
        assert_eq!(kind(S), Some(ProbeKind::Syn));
    }

    #[test]
    fn a_syn_with_ecn_bits_is_still_a_syn() {
        assert_eq!(
            kind(S | TcpFlags::ECE | TcpFlags::CWR),
            Some(ProbeKind::Syn)
        );
    }

    #[test]
    fn a_bare_fin_is_a_fin_scan() {
        assert_eq!(label_of(F).as_deref(), Some("TCP FIN scan"));
    }

    #[test]
    fn no_flags_is_a_null_scan_with_1_2s_leading_space() {
        assert_eq!(label_of(0).as_deref(), Some(" TCP NULL scan"));
    }

    #[test]
    fn fin_urg_psh_is_an_xmas_scan() {
        assert_eq!(label_of(F | U | P).as_deref(), Some("TCP XMAS scan"));
    }

    #[test]
    fn fin_urg_psh_with_syn_is_still_xmas_as_in_1_2() {
        assert_eq!(kind(F | U | P | S), Some(ProbeKind::Xmas));
    }

    #[test]
    fn other_combinations_without_ack_are_unknown_with_1_2s_flag_list() {
        assert_eq!(
            label_of(S | F).as_deref(),
            Some("Unknown Type: TCP Packet Flags: SYN: 1 FIN: 1 ACK: 0 PSH: 0 URG: 0 RST: 0")
        );
        assert_eq!(kind(F | P), Some(ProbeKind::Unknown));
    }

    #[test]
    fn a_bare_ack_is_an_ack_or_window_scan() {
        assert_eq!(label_of(A).as_deref(), Some("TCP ACK/Window scan"));
        assert_eq!(kind(A), Some(ProbeKind::Ack));
    }

    #[test]
    fn fin_ack_is_a_maimon_scan() {
        assert_eq!(label_of(F | A).as_deref(), Some("TCP Maimon scan"));
    }

    #[test]
    fn replies_and_established_traffic_are_not_probes() {
        for bits in [S | A, P | A, A | U, S | F | A, P | A | F] {
            assert_eq!(kind(bits), None, "flags {bits:#04x}");
        }
    }

    #[test]
    fn anything_with_rst_is_not_a_probe() {
        for bits in [R, R | A, R | S, R | F | U | P] {
            assert_eq!(kind(bits), None, "flags {bits:#04x}");
        }
    }

    #[test]
    fn every_flag_byte_has_a_verdict() {
        for bits in 0..=u8::MAX {
            if let Some(kind) = kind(bits) {
                assert!(!label(kind, TcpFlags(bits)).is_empty());
            }
        }
    }
}
