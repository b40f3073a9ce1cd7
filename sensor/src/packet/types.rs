//! The packet vocabulary every detection path shares: a [`Hit`] on a decoy, what a captured
//! packet adds to it ([`Captured`]: [`TcpFlags`], [`Fragment`], [`RawMode`]), and [`Examined`].

use std::{fmt, net::IpAddr};

use portsentry_crds::{ProbeKind, Protocol};

/// One probe seen on a decoy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub source: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub kind: ProbeKind,
    /// Flags and IP options of a captured packet (stealth and advanced modes).
    pub captured: Option<Captured>,
}

impl Hit {
    /// True when the probe proves the source address (a completed TCP handshake).
    pub fn verified(&self) -> bool {
        self.kind.proves_source()
    }
}

/// What a captured packet adds to a hit: its flags, whether it carried IP options, and the
/// raw mode that watches its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Captured {
    pub flags: TcpFlags,
    /// IPv4 options or IPv6 extension headers (1.2: "detection avoidance technique").
    pub ip_options: bool,
    /// The mode that detected it (`$MODE$` and the blocked file's suffix, as in 1.2).
    pub mode: RawMode,
    /// Whole packet or first fragment (see [`Fragment`]).
    pub fragment: Fragment,
}

/// TCP flags as on the wire (byte 13 of the header: CWR ECE URG ACK PSH RST SYN FIN).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
    /// The six flags PortSentry looks at.
    pub(crate) const CLASSIC: u8 = 0x3f;

    pub(crate) fn has(self, flag: u8) -> bool {
        self.0 & flag != 0
    }

    /// Only the six classic flags: FIN SYN RST PSH ACK URG.
    pub(crate) fn classic(self) -> u8 {
        self.0 & Self::CLASSIC
    }
}

impl fmt::Display for TcpFlags {
    /// PortSentry 1.2's words: `SYN: 1 FIN: 0 ACK: 0 PSH: 0 URG: 0 RST: 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bit = |flag| u8::from(self.has(flag));
        write!(
            f,
            "SYN: {} FIN: {} ACK: {} PSH: {} URG: {} RST: {}",
            bit(Self::SYN),
            bit(Self::FIN),
            bit(Self::ACK),
            bit(Self::PSH),
            bit(Self::URG),
            bit(Self::RST)
        )
    }
}

/// Whole packet or first fragment. The capture sees fragments before the kernel reassembles
/// them; only the first one carries the ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fragment {
    /// Not fragmented.
    #[default]
    Whole,
    /// The first fragment, holding the ports and, for TCP, the flags.
    First,
    /// The first fragment of a TCP segment cut before the flags (`nmap -f` sends 8 bytes of
    /// TCP header: ports and sequence number). No stack sends such a fragment except to slip
    /// past filters that look at the flags (RFC 1858's tiny-fragment attack): it is a probe.
    FlagsMissing,
}

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
