//! The sensor's one error type: every way reading the config, binding decoys or running a
//! response can fail, each message saying what to do about it.

use std::{io, path::PathBuf};

/// `Result` with the sensor's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the sensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source} (check the path given to --config)")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {message}")]
    ConfigLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {key}: {message}")]
    ConfigValue {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    #[error(
        "ignore file {path}:{line}: `{text}` is not an IPv4/IPv6 address or CIDR (write e.g. 192.0.2.7, 10.0.0.0/8 or fd00::/8)"
    )]
    IgnoreLine {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("cannot read ignore file {path}: {source}")]
    ReadIgnore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot write {what} file {path}: {source} (check that its directory exists and is writable)"
    )]
    WriteRecord {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to write {what} file {path}: {reason} (the sensor writes it as root: point the setting at a regular file in a directory only root can write)"
    )]
    UnsafeRecord {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "no decoy could be bound: {0} (free the ports or choose others in TCP_PORTS/UDP_PORTS)"
    )]
    NothingBound(String),
    #[error("cannot serve metrics on {addr}: {source} (choose another --metrics-addr)")]
    Metrics {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot register metric: {0}")]
    Prometheus(#[from] prometheus::Error),
    #[error(
        "cannot open syslog socket {path}: {source} (is a syslog daemon listening? drop --syslog to log to stderr)"
    )]
    Syslog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action} failed: {message}")]
    Action {
        action: &'static str,
        message: String,
    },
    #[error(
        "cannot capture packets for the stealth/advanced modes: {0} (they need root or CAP_NET_RAW; without it run only -tcp and/or -udp)"
    )]
    Capture(String),
    #[error("native nftables ban: {0}")]
    Enforcer(String),
    #[error("reporting to the operator: {0}")]
    Report(String),
    #[error("watching cluster bans (--watch-bans): {0}")]
    BanWatch(String),
    #[error("pod nftables agent: {0}")]
    PodNftables(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}
