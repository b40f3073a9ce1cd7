//! PortSentry's `attackalert:` / `adminalert:` log lines, written exactly as 1.2 writes them,
//! to stderr (default), to syslog (`/dev/log`, ident `portsentry`, facility daemon) or as JSON.
//!
//! Every line is also a `tracing` event with structured fields (`source`, `port`,
//! `protocol`, ...) on target `portsentry_sensor::alert`; with `--log-format json` those
//! events are the output, otherwise the classic line is written as is.

use std::{
    fmt,
    io::Write,
    net::IpAddr,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::Mutex,
};

use portsentry_crds::Protocol;

use crate::error::{Error, Result};

/// Facility daemon (3) times 8 plus severity notice (5), as 1.2's `syslog(LOG_NOTICE)`.
const SYSLOG_PRIORITY: u8 = 3 * 8 + 5;

/// Where alert lines go.
#[derive(Debug)]
enum Sink {
    Stderr,
    Json,
    Syslog { path: PathBuf, socket: UnixDatagram },
}

/// The sensor's PortSentry-format log.
#[derive(Debug)]
pub struct Alerts {
    sink: Mutex<Sink>,
}

impl Alerts {
    /// Classic lines on stderr.
    pub fn stderr() -> Self {
        Self {
            sink: Mutex::new(Sink::Stderr),
        }
    }

    /// Lines as JSON `tracing` events (the subscriber decides where they go).
    pub fn json() -> Self {
        Self {
            sink: Mutex::new(Sink::Json),
        }
    }

    /// Classic lines to the syslog socket at `path` (normally `/dev/log`).
    pub fn syslog(path: &Path) -> Result<Self> {
        let socket = connect_syslog(path)?;
        Ok(Self {
            sink: Mutex::new(Sink::Syslog {
                path: path.to_owned(),
                socket,
            }),
        })
    }

    /// Writes one line, with structured fields for `tracing`.
    pub fn emit(&self, line: &str, fields: Fields) {
        let mut sink = match self.sink.lock() {
            Ok(sink) => sink,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &mut *sink {
            Sink::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
                fields.trace(line, tracing::Level::DEBUG);
            }
            Sink::Json => fields.trace(line, tracing::Level::INFO),
            Sink::Syslog { path, socket } => {
                let message = syslog_message(line);
                if socket.send(message.as_bytes()).is_err() {
                    // The syslog daemon restarted: reconnect once, else fall back to stderr.
                    match connect_syslog(path) {
                        Ok(fresh) if fresh.send(message.as_bytes()).is_ok() => *socket = fresh,
                        _ => {
                            let _ = writeln!(std::io::stderr().lock(), "{line}");
                        }
                    }
                }
                fields.trace(line, tracing::Level::DEBUG);
            }
        }
    }
}

fn connect_syslog(path: &Path) -> Result<UnixDatagram> {
    let socket = UnixDatagram::unbound().map_err(|source| Error::Syslog {
        path: path.to_owned(),
        source,
    })?;
    socket.connect(path).map_err(|source| Error::Syslog {
        path: path.to_owned(),
        source,
    })?;
    Ok(socket)
}

/// An RFC 3164 message as glibc's `syslog()` sends it: `<29>Nov 26 13:45:00 portsentry[42]: line`.
pub fn syslog_message(line: &str) -> String {
    let stamp = jiff::Zoned::now().strftime("%b %e %H:%M:%S").to_string();
    format!(
        "<{SYSLOG_PRIORITY}>{stamp} portsentry[{}]: {line}",
        std::process::id()
    )
}

/// Structured fields of a line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fields {
    pub kind: &'static str,
    pub source: Option<IpAddr>,
    pub port: Option<u16>,
    pub protocol: Option<Protocol>,
}

impl Fields {
    pub fn new(kind: &'static str) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    pub fn source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub fn port(mut self, protocol: Protocol, port: u16) -> Self {
        self.protocol = Some(protocol);
        self.port = Some(port);
        self
    }

    fn trace(self, line: &str, level: tracing::Level) {
        let source = self.source.map(|s| s.to_string());
        let protocol = self.protocol.map(Protocol::as_str);
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(
                    target: "portsentry_sensor::alert",
                    $level,
                    kind = self.kind,
                    source = source.as_deref(),
                    port = self.port,
                    protocol = protocol,
                    "{line}"
                )
            };
        }
        if level == tracing::Level::INFO {
            event!(tracing::Level::INFO);
        } else {
            event!(tracing::Level::DEBUG);
        }
    }
}

/// Host as PortSentry prints it: `hostname/address` (both the address without resolution).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostName {
    pub name: String,
    pub address: IpAddr,
}

impl HostName {
    pub fn unresolved(address: IpAddr) -> Self {
        Self {
            name: address.to_string(),
            address,
        }
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.address)
    }
}

/// The exact texts of PortSentry's lines (and this sensor's additions, in the same style).
pub mod lines {
    use super::*;

    /// Connect-mode alarm, as 1.2's `-tcp` and `-udp` write it:
    /// `attackalert: Connect from host: h/a to TCP port: p` (or `to UDP port: p`).
    pub fn alarm(host: &HostName, protocol: Protocol, port: u16) -> String {
        format!(
            "attackalert: Connect from host: {host} to {} port: {port}",
            protocol.as_str()
        )
    }

    /// Raw-mode UDP alarm, as 1.2's `-sudp` and `-audp` write it:
    /// `attackalert: UDP scan from host: h/a to UDP port: p`.
    pub fn udp_probe_alarm(host: &HostName, port: u16) -> String {
        format!("attackalert: UDP scan from host: {host} to UDP port: {port}")
    }

    /// Stealth/advanced TCP alarm: `attackalert: TCP FIN scan from host: h/a to TCP port: p`
    /// (the label from [`crate::packet::classify::label`], 1.2's order of words).
    pub fn probe_alarm(label: &str, host: &HostName, port: u16) -> String {
        format!("attackalert: {label} from host: {host} to TCP port: {port}")
    }

    /// 1.2's warning after the alarm line of a packet with IP options.
    pub fn ip_options(host: &HostName, protocol: Protocol, port: u16) -> String {
        format!(
            "attackalert: Packet from host: {host} to {} port: {port} has IP options set (detection avoidance technique).",
            protocol.as_str()
        )
    }

    pub fn stealth_listening(protocol: Protocol, port: u16) -> String {
        format!(
            "adminalert: Going into stealth listen mode on {} port: {port}",
            protocol.as_str()
        )
    }

    pub fn advanced_monitoring(protocol: Protocol, below: u16) -> String {
        format!(
            "adminalert: Advanced mode will monitor first {below} {} ports",
            protocol.as_str()
        )
    }

    pub fn advanced_exclude(protocol: Protocol, port: u16) -> String {
        format!(
            "adminalert: Advanced mode will manually exclude {} port: {port}",
            protocol.as_str()
        )
    }

    /// A connect mode's hit from a host it has blocked, after the alarm line (1.2's `-tcp`, `-udp`).
    pub fn already_blocked(address: IpAddr) -> String {
        format!("attackalert: Host: {address} is already blocked. Ignoring")
    }

    /// A raw mode's hit from a host it has blocked, after the alarm line: 1.2's stealth and
    /// advanced modes name the host as `h/a` and write no period.
    pub fn probe_already_blocked(host: &HostName) -> String {
        format!("attackalert: Host: {host} is already blocked Ignoring")
    }

    pub fn route(address: IpAddr, command: &str) -> String {
        format!(
            "attackalert: Host {address} has been blocked via dropped route using command: \"{command}\""
        )
    }

    pub fn wrappers(address: IpAddr, text: &str) -> String {
        format!("attackalert: Host {address} has been blocked via wrappers with string: \"{text}\"")
    }

    pub fn external(address: IpAddr, command: &str) -> String {
        format!(
            "attackalert: External command run for host: {address} using command: \"{command}\""
        )
    }

    pub fn could_not_block(host: &HostName) -> String {
        format!("attackalert: ERROR: Could not block host {host} !!")
    }

    pub fn action_failed(what: &str, address: IpAddr, reason: &str) -> String {
        format!("adminalert: ERROR: {what} failed for host: {address}: {reason}")
    }

    pub fn native_ban(
        address: IpAddr,
        table: &str,
        duration: Option<std::time::Duration>,
    ) -> String {
        match duration {
            Some(d) => format!(
                "attackalert: Host {address} has been blocked via nftables table {table} for {}",
                portsentry_crds::Duration(d)
            ),
            None => format!(
                "attackalert: Host {address} has been blocked via nftables table {table} until restart or unban"
            ),
        }
    }

    pub fn expired(address: IpAddr) -> String {
        format!("attackalert: Host {address} ban expired. Unblocked")
    }

    pub fn not_banned(host: &HostName, why: &str) -> String {
        format!("attackalert: Host {host} not blocked: {why}")
    }

    pub fn listening(protocol: Protocol, port: u16) -> String {
        format!(
            "adminalert: Going into listen mode on {} port: {port}",
            protocol.as_str()
        )
    }

    pub fn cannot_bind(protocol: Protocol, port: u16, family: &str, reason: &str) -> String {
        format!(
            "adminalert: ERROR: could not bind {} socket: {port} ({family}: {reason}). Attempting to continue",
            protocol.as_str()
        )
    }

    pub fn active() -> String {
        "adminalert: PortSentry is now active and listening.".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::{lines::*, *};

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_tcp_alarm_reads_as_portsentry_writes_it() {
        assert_eq!(
            alarm(
                &HostName::unresolved(ip("192.168.2.12")),
                Protocol::Tcp,
                111
            ),
            "attackalert: Connect from host: 192.168.2.12/192.168.2.12 to TCP port: 111"
        );
    }

    #[test]
    fn a_connect_mode_udp_alarm_reads_as_1_2s_udp_mode_writes_it() {
        let host = HostName {
            name: "scanner.example".into(),
            address: ip("2001:db8::7"),
        };
        assert_eq!(
            alarm(&host, Protocol::Udp, 161),
            "attackalert: Connect from host: scanner.example/2001:db8::7 to UDP port: 161"
        );
    }

    #[test]
    fn a_raw_mode_udp_alarm_reads_as_1_2s_sudp_and_audp_write_it() {
        assert_eq!(
            udp_probe_alarm(&HostName::unresolved(ip("10.251.0.2")), 11),
            "attackalert: UDP scan from host: 10.251.0.2/10.251.0.2 to UDP port: 11"
        );
    }

    #[test]
    fn a_raw_modes_already_blocked_line_reads_as_1_2_writes_it() {
        assert_eq!(
            probe_already_blocked(&HostName::unresolved(ip("10.251.0.2"))),
            "attackalert: Host: 10.251.0.2/10.251.0.2 is already blocked Ignoring"
        );
    }

    #[test]
    fn action_lines_read_as_portsentry_writes_them() {
        let a = ip("192.0.2.1");
        assert_eq!(
            route(a, "/sbin/route add -host 192.0.2.1 reject"),
            "attackalert: Host 192.0.2.1 has been blocked via dropped route using command: \"/sbin/route add -host 192.0.2.1 reject\""
        );
        assert_eq!(
            wrappers(a, "ALL: 192.0.2.1"),
            "attackalert: Host 192.0.2.1 has been blocked via wrappers with string: \"ALL: 192.0.2.1\""
        );
        assert_eq!(
            external(a, "/bin/true"),
            "attackalert: External command run for host: 192.0.2.1 using command: \"/bin/true\""
        );
        assert_eq!(
            already_blocked(a),
            "attackalert: Host: 192.0.2.1 is already blocked. Ignoring"
        );
    }

    #[test]
    fn a_stealth_alarm_puts_the_label_first_as_1_2_does() {
        assert_eq!(
            probe_alarm("TCP FIN scan", &HostName::unresolved(ip("10.0.0.2")), 79),
            "attackalert: TCP FIN scan from host: 10.0.0.2/10.0.0.2 to TCP port: 79"
        );
    }

    #[test]
    fn ip_options_read_as_1_2_writes_them() {
        assert_eq!(
            ip_options(&HostName::unresolved(ip("10.0.0.2")), Protocol::Tcp, 79),
            "attackalert: Packet from host: 10.0.0.2/10.0.0.2 to TCP port: 79 has IP options set (detection avoidance technique)."
        );
    }

    #[test]
    fn admin_lines_read_as_portsentry_writes_them() {
        assert_eq!(
            listening(Protocol::Tcp, 1),
            "adminalert: Going into listen mode on TCP port: 1"
        );
        assert_eq!(
            active(),
            "adminalert: PortSentry is now active and listening."
        );
    }

    #[test]
    fn syslog_messages_carry_priority_daemon_notice_and_ident() {
        let message = syslog_message("adminalert: x");
        assert!(message.starts_with("<29>"), "{message}");
        assert!(
            message.ends_with(&format!(
                " portsentry[{}]: adminalert: x",
                std::process::id()
            )),
            "{message}"
        );
    }

    #[test]
    fn syslog_lines_reach_a_datagram_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).expect("bind");
        let alerts = Alerts::syslog(&path).expect("connect");
        alerts.emit(&active(), Fields::new("active"));
        let mut buffer = [0u8; 512];
        let n = server.recv(&mut buffer).expect("receive");
        let got = String::from_utf8_lossy(&buffer[..n]);
        assert!(
            got.ends_with("adminalert: PortSentry is now active and listening."),
            "{got}"
        );
    }
}
