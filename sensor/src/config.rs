//! Reads a classic `portsentry.conf` exactly as PortSentry 1.2 does (plus documented
//! extension keys), refusing unknown keys and bad values with file, line and key.
//!
//! Syntax: one `KEY="value"` a line, spaces allowed around `=`, `#` starts a comment line,
//! blank lines are skipped. Values must be double-quoted (1.2 skips unquoted ones). A value
//! with inner quotes is taken whole, from the first quote to the last; [`Entry::cut_by_1_2`]
//! records what 1.2 would have read instead (it stops at the second quote).
//!
//! Extension keys (PortSentry has none of these; all optional):
//! - `BAN_DURATION` (`forever`, default, or a duration such as `1h`): how long a ban lasts.
//! - `BAN_MAX_DURATION` (duration): cap for escalated bans.
//! - `BAN_ESCALATION_WINDOW` (duration, default `24h`): offences within it double the ban.
//! - `BAN_UNVERIFIED` (`0` default / `1`): let evidence that does not prove the source (UDP) ban.
//! - `NFT_BAN` (`0`/`1`): ban natively in an nftables table of the sensor's own.
//! - `NFT_TABLE` (default `portsentry`), `NFT_TRIPWIRE` (`0`/`1`): in-kernel ban on handshake.
//! - `SCAN_WINDOW` (duration): only hits within it count toward `SCAN_TRIGGER`.
//! - `SCAN_DISTINCT_PORTS` (`0`/`1`): count distinct decoy ports instead of hits.
//! - `STATE_MAX_SOURCES` (default 65536): most sources tracked; the oldest are evicted.
//! - `HOSTS_DENY_FILE` (default `/etc/hosts.deny`): where `KILL_HOSTS_DENY` lines go.
//! - `METRICS_PER_PORT` (`0` default / `1`): `hits_total` per decoy port; off, the metrics
//!   name no decoy port (anyone who reaches the metrics port would learn them).
//!
//! A relative file path (`IGNORE_FILE`, `HISTORY_FILE`, ...) is taken next to the config file.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use portsentry_crds::{PortRange, SourcePrefix, parse_port_list};

use crate::error::{Error, Result};

/// Every key PortSentry 1.2's config knows (the fixture uses all of them).
pub const CLASSIC_KEYS: &[&str] = &[
    "TCP_PORTS",
    "UDP_PORTS",
    "ADVANCED_PORTS_TCP",
    "ADVANCED_PORTS_UDP",
    "ADVANCED_EXCLUDE_TCP",
    "ADVANCED_EXCLUDE_UDP",
    "IGNORE_FILE",
    "HISTORY_FILE",
    "BLOCKED_FILE",
    "RESOLVE_HOST",
    "BLOCK_TCP",
    "BLOCK_UDP",
    "KILL_ROUTE",
    "KILL_HOSTS_DENY",
    "KILL_RUN_CMD",
    "KILL_RUN_CMD_FIRST",
    "SCAN_TRIGGER",
    "PORT_BANNER",
];

/// Keys this sensor adds for what PortSentry lacks (see the module doc).
pub const EXTENSION_KEYS: &[&str] = &[
    "BAN_DURATION",
    "BAN_MAX_DURATION",
    "BAN_ESCALATION_WINDOW",
    "BAN_UNVERIFIED",
    "NFT_BAN",
    "NFT_TABLE",
    "NFT_TRIPWIRE",
    "SCAN_WINDOW",
    "SCAN_DISTINCT_PORTS",
    "STATE_MAX_SOURCES",
    "HOSTS_DENY_FILE",
    "METRICS_PER_PORT",
];

/// Largest `SCAN_TRIGGER` accepted: the engine keeps that many hits per source.
pub const MAX_SCAN_TRIGGER: u32 = 1000;

/// What `BLOCK_TCP` / `BLOCK_UDP` ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockLevel {
    /// `0`: log the alarm only.
    LogOnly,
    /// `1`: run every configured action.
    All,
    /// `2`: run only `KILL_RUN_CMD`.
    RunCmdOnly,
}

/// A watched protocol, as PortSentry's `-tcp` / `-udp` modes name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Tcp,
    Udp,
}

impl Mode {
    /// The word `$MODE$` becomes and the blocked file's suffix: `tcp` or `udp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Udp => "udp",
        }
    }

    pub const fn protocol(self) -> portsentry_crds::Protocol {
        match self {
            Mode::Tcp => portsentry_crds::Protocol::Tcp,
            Mode::Udp => portsentry_crds::Protocol::Udp,
        }
    }
}

/// How long a first ban lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanDuration {
    /// PortSentry's semantics: a ban is never lifted.
    Forever,
    For(Duration),
}

/// One `KEY="value"` line as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub line: usize,
    pub value: String,
    /// When the value has inner quotes: what PortSentry 1.2 reads instead (up to the second quote).
    pub cut_by_1_2: Option<String>,
}

/// A loaded config: the typed settings and the entries they came from.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub entries: BTreeMap<String, Entry>,
    pub tcp_ports: Vec<PortRange>,
    pub udp_ports: Vec<PortRange>,
    pub advanced_ports_tcp: Option<u16>,
    pub advanced_ports_udp: Option<u16>,
    pub advanced_exclude_tcp: Vec<PortRange>,
    pub advanced_exclude_udp: Vec<PortRange>,
    pub ignore_file: Option<PathBuf>,
    pub history_file: Option<PathBuf>,
    pub blocked_file: Option<PathBuf>,
    pub resolve_host: bool,
    pub block_tcp: BlockLevel,
    pub block_udp: BlockLevel,
    pub kill_route: Option<String>,
    pub kill_hosts_deny: Option<String>,
    pub kill_run_cmd: Option<String>,
    pub kill_run_cmd_first: bool,
    pub scan_trigger: u32,
    pub port_banner: Option<String>,
    pub ban_duration: BanDuration,
    pub ban_max_duration: Option<Duration>,
    pub ban_escalation_window: Duration,
    pub ban_unverified: bool,
    pub nft_ban: bool,
    pub nft_table: String,
    pub nft_tripwire: bool,
    pub scan_window: Option<Duration>,
    pub scan_distinct_ports: bool,
    pub state_max_sources: usize,
    pub hosts_deny_file: PathBuf,
    /// `hits_total` has a `port` label (opt-in: it reveals the decoy ports).
    pub metrics_per_port: bool,
}

impl Config {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let entries = read_entries(path, text)?;
        let values = Values {
            path,
            entries: &entries,
        };
        let tcp_ports = values.ports("TCP_PORTS")?;
        let udp_ports = values.ports("UDP_PORTS")?;
        let ban_duration = match values.get("BAN_DURATION") {
            None => BanDuration::Forever,
            Some(entry) if entry.value.trim().eq_ignore_ascii_case("forever") => {
                BanDuration::Forever
            }
            Some(_) => BanDuration::For(
                values
                    .positive_duration("BAN_DURATION")?
                    .unwrap_or_default(),
            ),
        };
        let state_max_sources = match values.number("STATE_MAX_SOURCES", 1, 10_000_000)? {
            Some(n) => n as usize,
            None => 65_536,
        };
        let nft_table = values
            .text("NFT_TABLE")
            .unwrap_or_else(|| "portsentry".into());
        if !nft_table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || nft_table.is_empty()
            || nft_table.len() > 64
        {
            return Err(values.bad(
                "NFT_TABLE",
                "must be 1-64 letters, digits, `_` or `-`, such as \"portsentry\"",
            ));
        }
        let config = Config {
            path: path.to_owned(),
            tcp_ports,
            udp_ports,
            advanced_ports_tcp: values.port("ADVANCED_PORTS_TCP")?,
            advanced_ports_udp: values.port("ADVANCED_PORTS_UDP")?,
            advanced_exclude_tcp: values.ports("ADVANCED_EXCLUDE_TCP")?,
            advanced_exclude_udp: values.ports("ADVANCED_EXCLUDE_UDP")?,
            ignore_file: values.path("IGNORE_FILE")?,
            history_file: values.path("HISTORY_FILE")?,
            blocked_file: values.path("BLOCKED_FILE")?,
            resolve_host: values.flag("RESOLVE_HOST")?.unwrap_or(false),
            block_tcp: values.block("BLOCK_TCP")?,
            block_udp: values.block("BLOCK_UDP")?,
            kill_route: values.text("KILL_ROUTE"),
            kill_hosts_deny: values.text("KILL_HOSTS_DENY"),
            kill_run_cmd: values.text("KILL_RUN_CMD"),
            kill_run_cmd_first: values.flag("KILL_RUN_CMD_FIRST")?.unwrap_or(false),
            scan_trigger: values
                .number("SCAN_TRIGGER", 0, u64::from(MAX_SCAN_TRIGGER))?
                .unwrap_or(0) as u32,
            port_banner: values.text("PORT_BANNER"),
            ban_duration,
            ban_max_duration: values.positive_duration("BAN_MAX_DURATION")?,
            ban_escalation_window: values
                .positive_duration("BAN_ESCALATION_WINDOW")?
                .unwrap_or(Duration::from_secs(24 * 3600)),
            ban_unverified: values.flag("BAN_UNVERIFIED")?.unwrap_or(false),
            nft_ban: values.flag("NFT_BAN")?.unwrap_or(false),
            nft_table,
            nft_tripwire: values.flag("NFT_TRIPWIRE")?.unwrap_or(false),
            scan_window: values.positive_duration("SCAN_WINDOW")?,
            scan_distinct_ports: values.flag("SCAN_DISTINCT_PORTS")?.unwrap_or(false),
            state_max_sources,
            hosts_deny_file: values
                .path("HOSTS_DENY_FILE")?
                .unwrap_or_else(|| PathBuf::from("/etc/hosts.deny")),
            metrics_per_port: values.flag("METRICS_PER_PORT")?.unwrap_or(false),
            entries: entries.clone(),
        };
        if config.nft_tripwire && !config.nft_ban {
            return Err(values.bad(
                "NFT_TRIPWIRE",
                "needs NFT_BAN=\"1\": the tripwire adds sources to the native ban set",
            ));
        }
        if let (BanDuration::For(base), Some(max)) = (config.ban_duration, config.ban_max_duration)
            && max < base
        {
            return Err(values.bad(
                "BAN_MAX_DURATION",
                "is shorter than BAN_DURATION: make the cap at least the first ban's length",
            ));
        }
        Ok(config)
    }

    /// The block level of a protocol.
    pub fn block(&self, mode: Mode) -> BlockLevel {
        match mode {
            Mode::Tcp => self.block_tcp,
            Mode::Udp => self.block_udp,
        }
    }

    /// Decoy ranges of a protocol.
    pub fn ports(&self, mode: Mode) -> &[PortRange] {
        match mode {
            Mode::Tcp => &self.tcp_ports,
            Mode::Udp => &self.udp_ports,
        }
    }

    /// The blocked file of a mode: `BLOCKED_FILE.tcp` / `.udp`, as PortSentry 1.2 names them.
    pub fn blocked_file(&self, mode: Mode) -> Option<PathBuf> {
        self.blocked_file_of(mode.as_str())
    }

    /// The blocked file of the mode named `mode` (`tcp` ... `audp`): `BLOCKED_FILE.<mode>`,
    /// as 1.2 appends its detection type (`.stcp`, `.atcp`, `.sudp`, `.audp` in raw modes).
    pub fn blocked_file_of(&self, mode: &str) -> Option<PathBuf> {
        self.blocked_file.as_ref().map(|base| {
            let mut name = base.as_os_str().to_owned();
            name.push(".");
            name.push(mode);
            PathBuf::from(name)
        })
    }
}

/// Splits the text into entries, rejecting malformed lines, unknown keys and repeats.
fn read_entries(path: &Path, text: &str) -> Result<BTreeMap<String, Entry>> {
    let mut entries = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let line_error = |message: String| Error::ConfigLine {
            path: path.to_owned(),
            line,
            message,
        };
        let Some((key, rest)) = trimmed.split_once('=') else {
            return Err(line_error(format!(
                "`{trimmed}` is not a setting: write KEY=\"value\" or start the line with # to comment it out"
            )));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(line_error(
                "a setting without a key: write KEY=\"value\"".into(),
            ));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(line_error(format!(
                "`{key}` is not a key: keys are upper-case words such as TCP_PORTS"
            )));
        }
        let value_error = |message: String| Error::ConfigValue {
            path: path.to_owned(),
            line,
            key: key.to_owned(),
            message,
        };
        if !CLASSIC_KEYS.contains(&key) && !EXTENSION_KEYS.contains(&key) {
            return Err(value_error(format!(
                "unknown key: PortSentry keys are {}; extension keys are {}",
                CLASSIC_KEYS.join(", "),
                EXTENSION_KEYS.join(", ")
            )));
        }
        let rest = rest.trim();
        if !rest.starts_with('"') {
            return Err(value_error(format!(
                "the value must be in double quotes, as PortSentry requires (it skips unquoted values): write {key}=\"{rest}\""
            )));
        }
        let last = rest.rfind('"').unwrap_or(0);
        if last == 0 {
            return Err(value_error(
                "the closing double quote is missing: end the value with \"".into(),
            ));
        }
        let after = rest[last + 1..].trim();
        if !(after.is_empty() || after.starts_with('#')) {
            return Err(value_error(format!(
                "unexpected `{after}` after the closing quote: only a # comment may follow the value"
            )));
        }
        let value = rest[1..last].to_owned();
        let cut_by_1_2 = value.find('"').map(|cut| value[..cut].to_owned());
        if let Some(previous) = entries.get::<str>(key) {
            let previous: &Entry = previous;
            return Err(value_error(format!(
                "set twice (first on line {}): PortSentry 1.2 silently uses the first one; keep one of them",
                previous.line
            )));
        }
        entries.insert(
            key.to_owned(),
            Entry {
                key: key.to_owned(),
                line,
                value,
                cut_by_1_2,
            },
        );
    }
    Ok(entries)
}

/// Typed access to the entries, with errors naming file, line and key.
struct Values<'a> {
    path: &'a Path,
    entries: &'a BTreeMap<String, Entry>,
}

impl Values<'_> {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    fn bad(&self, key: &str, message: &str) -> Error {
        let line = self.get(key).map_or(0, |entry| entry.line);
        Error::ConfigValue {
            path: self.path.to_owned(),
            line,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    fn text(&self, key: &str) -> Option<String> {
        self.get(key)
            .map(|entry| entry.value.clone())
            .filter(|value| !value.trim().is_empty())
    }

    fn ports(&self, key: &str) -> Result<Vec<PortRange>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(entry) => parse_port_list(&entry.value)
                .map_err(|error| self.bad(key, &format!("`{}`: {error}", entry.value))),
        }
    }

    fn port(&self, key: &str) -> Result<Option<u16>> {
        self.number(key, 1, 65_535)
            .map(|value| value.map(|port| port as u16))
    }

    fn number(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>> {
        let Some(entry) = self.get(key) else {
            return Ok(None);
        };
        let text = entry.value.trim();
        match text.parse::<u64>() {
            Ok(value) if (min..=max).contains(&value) => Ok(Some(value)),
            _ => Err(self.bad(
                key,
                &format!("`{text}` is not a whole number from {min} to {max}"),
            )),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key).map(|entry| entry.value.trim()) {
            None => Ok(None),
            Some("0") => Ok(Some(false)),
            Some("1") => Ok(Some(true)),
            Some(other) => {
                Err(self.bad(key, &format!("`{other}` must be \"0\" (off) or \"1\" (on)")))
            }
        }
    }

    fn block(&self, key: &str) -> Result<BlockLevel> {
        match self.get(key).map(|entry| entry.value.trim()) {
            None | Some("0") => Ok(BlockLevel::LogOnly),
            Some("1") => Ok(BlockLevel::All),
            Some("2") => Ok(BlockLevel::RunCmdOnly),
            Some(other) => Err(self.bad(
                key,
                &format!(
                    "`{other}` must be \"0\" (log only), \"1\" (run every action) or \"2\" (run KILL_RUN_CMD only)"
                ),
            )),
        }
    }

    fn path(&self, key: &str) -> Result<Option<PathBuf>> {
        match self.text(key) {
            None => Ok(None),
            Some(text) if Path::new(text.trim()).is_absolute() => {
                Ok(Some(PathBuf::from(text.trim())))
            }
            Some(text) => Ok(Some(match self.path.parent() {
                Some(dir) => dir.join(text.trim()),
                None => PathBuf::from(text.trim()),
            })),
        }
    }

    fn positive_duration(&self, key: &str) -> Result<Option<Duration>> {
        let Some(entry) = self.get(key) else {
            return Ok(None);
        };
        match entry.value.trim().parse::<portsentry_crds::Duration>() {
            Ok(duration) if !duration.as_std().is_zero() => Ok(Some(duration.as_std())),
            Ok(_) => Err(self.bad(
                key,
                "must be longer than zero (for a ban that never ends write BAN_DURATION=\"forever\")",
            )),
            Err(error) => Err(self.bad(key, &error.to_string())),
        }
    }
}

/// Reads an ignore file: one `address[/bits]` a line, `#` comments and blank lines skipped.
/// Unlike 1.2, prefixes are honoured as written (`0.0.0.0/0` is everything) and IPv6 works.
pub fn parse_ignore(path: &Path, text: &str) -> Result<Vec<IpNet>> {
    let mut prefixes = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let prefix: SourcePrefix = line.parse().map_err(|_| Error::IgnoreLine {
            path: path.to_owned(),
            line: index + 1,
            text: line.to_owned(),
        })?;
        prefixes.push(prefix.network());
    }
    Ok(prefixes)
}

/// Reads the ignore file at `path`; a missing file is `Ok(None)`.
pub fn load_ignore(path: &Path) -> Result<Option<Vec<IpNet>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_ignore(path, &text).map(Some),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::ReadIgnore {
            path: path.to_owned(),
            source,
        }),
    }
}

/// True when `address` is inside any of `prefixes`.
pub fn ignored(prefixes: &[IpNet], address: IpAddr) -> bool {
    prefixes.iter().any(|prefix| prefix.contains(&address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/portsentry/test.conf"), text)
    }

    fn error_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config should have been refused:\n{text}"),
            Err(error) => error.to_string(),
        }
    }

    const FIXTURE: &str = include_str!("../../tests/fixtures/seed-portsentry.conf");

    #[test]
    fn the_seed_fixture_loads_unchanged() {
        let config = parse(FIXTURE).expect("fixture loads");
        assert_eq!(
            portsentry_crds::expand(&config.tcp_ports).len(),
            portsentry_crds::Preset::Classic.tcp().len()
        );
        assert_eq!(config.udp_ports.len(), 32);
        assert_eq!(config.advanced_ports_tcp, Some(65355));
        assert_eq!(config.advanced_exclude_udp.len(), 4);
        assert_eq!(
            config.ignore_file.as_deref(),
            Some(Path::new("/etc/portsentry/portsentry.ignore"))
        );
        assert_eq!(config.block_tcp, BlockLevel::RunCmdOnly);
        assert_eq!(config.block_udp, BlockLevel::RunCmdOnly);
        assert!(!config.resolve_host);
        assert_eq!(config.kill_hosts_deny, None);
        assert_eq!(config.kill_run_cmd, None);
        assert_eq!(config.scan_trigger, 0);
        assert_eq!(config.ban_duration, BanDuration::Forever);
        assert!(
            config
                .port_banner
                .as_deref()
                .unwrap_or("")
                .starts_with("** UNAUTHORIZED")
        );
    }

    #[test]
    fn a_value_with_inner_quotes_is_taken_from_first_to_last_quote() {
        let config = parse(FIXTURE).expect("fixture loads");
        assert_eq!(
            config.kill_route.as_deref(),
            Some(
                "/sbin/iptables -I INPUT -s $TARGET$ -j DROP && echo \"$TARGET$:$PORT$\" >> /var/log/portsentry.block.log"
            )
        );
    }

    #[test]
    fn inner_quotes_record_what_portsentry_1_2_would_have_read() {
        let config = parse(FIXTURE).expect("fixture loads");
        let entry = &config.entries["KILL_ROUTE"];
        assert_eq!(
            entry.cut_by_1_2.as_deref(),
            Some("/sbin/iptables -I INPUT -s $TARGET$ -j DROP && echo ")
        );
    }

    #[test]
    fn spaces_around_the_equals_sign_are_accepted() {
        let config = parse("RESOLVE_HOST = \"1\"\n").expect("loads");
        assert!(config.resolve_host);
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let config =
            parse("# comment\n\n   # indented comment\nSCAN_TRIGGER=\"3\"\n").expect("loads");
        assert_eq!(config.scan_trigger, 3);
    }

    #[test]
    fn a_comment_may_follow_the_closing_quote() {
        let config = parse("SCAN_TRIGGER=\"2\" # two hits\n").expect("loads");
        assert_eq!(config.scan_trigger, 2);
    }

    #[test]
    fn port_ranges_are_expanded() {
        let config = parse("TCP_PORTS=\"1,30000-30003\"\n").expect("loads");
        assert_eq!(
            portsentry_crds::expand(&config.tcp_ports)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![1, 30000, 30001, 30002, 30003]
        );
    }

    #[test]
    fn a_line_without_equals_names_file_and_line() {
        let message = error_of("SCAN_TRIGGER=\"0\"\nTCP_PORTS 1,2\n");
        assert!(
            message.starts_with("/etc/portsentry/test.conf:2:"),
            "{message}"
        );
        assert!(message.contains("not a setting"), "{message}");
    }

    #[test]
    fn a_line_without_a_key_is_refused() {
        assert!(error_of("=\"1\"\n").contains(":1: a setting without a key"));
    }

    #[test]
    fn a_key_that_is_not_a_word_is_refused() {
        assert!(error_of("tcp ports=\"1\"\n").contains("is not a key"));
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let message = error_of("\nTCP_PORT=\"1\"\n");
        assert!(
            message.starts_with("/etc/portsentry/test.conf:2: TCP_PORT: unknown key"),
            "{message}"
        );
    }

    #[test]
    fn an_unquoted_value_is_refused() {
        assert!(
            error_of("SCAN_TRIGGER=0\n")
                .contains("SCAN_TRIGGER: the value must be in double quotes")
        );
    }

    #[test]
    fn a_missing_closing_quote_is_refused() {
        assert!(error_of("PORT_BANNER=\"hello\n").contains("closing double quote is missing"));
    }

    #[test]
    fn text_after_the_closing_quote_is_refused() {
        assert!(error_of("SCAN_TRIGGER=\"0\" 1\n").contains("after the closing quote"));
    }

    #[test]
    fn a_key_set_twice_is_refused() {
        let message = error_of("SCAN_TRIGGER=\"0\"\nSCAN_TRIGGER=\"1\"\n");
        assert!(
            message.contains(":2: SCAN_TRIGGER: set twice (first on line 1)"),
            "{message}"
        );
    }

    #[test]
    fn a_bad_port_list_is_refused_with_the_reason() {
        let message = error_of("TCP_PORTS=\"1,70000\"\n");
        assert!(message.contains("TCP_PORTS"), "{message}");
        assert!(message.contains("out of range"), "{message}");
    }

    #[test]
    fn an_empty_item_in_a_port_list_is_refused() {
        assert!(error_of("UDP_PORTS=\"1,,2\"\n").contains("UDP_PORTS"));
    }

    #[test]
    fn a_reversed_range_is_refused() {
        assert!(error_of("TCP_PORTS=\"40-30\"\n").contains("reversed"));
    }

    #[test]
    fn block_levels_other_than_0_1_2_are_refused() {
        assert!(error_of("BLOCK_TCP=\"3\"\n").contains("BLOCK_TCP: `3` must be \"0\""));
    }

    #[test]
    fn block_levels_mean_log_all_and_command_only() {
        let config = parse("BLOCK_TCP=\"1\"\nBLOCK_UDP=\"0\"\n").expect("loads");
        assert_eq!(config.block(Mode::Tcp), BlockLevel::All);
        assert_eq!(config.block(Mode::Udp), BlockLevel::LogOnly);
    }

    #[test]
    fn a_flag_other_than_0_or_1_is_refused() {
        assert!(error_of("RESOLVE_HOST=\"yes\"\n").contains("RESOLVE_HOST"));
    }

    #[test]
    fn a_scan_trigger_that_is_not_a_number_is_refused() {
        assert!(
            error_of("SCAN_TRIGGER=\"many\"\n")
                .contains("SCAN_TRIGGER: `many` is not a whole number")
        );
    }

    #[test]
    fn a_relative_file_path_is_taken_next_to_the_config_file() {
        let config = parse("HISTORY_FILE=\"portsentry.history\"\n").expect("loads");
        assert_eq!(
            config.history_file,
            Some(PathBuf::from("/etc/portsentry/portsentry.history"))
        );
    }

    #[test]
    fn a_bad_duration_is_refused() {
        assert!(error_of("BAN_DURATION=\"an hour\"\n").contains("BAN_DURATION"));
    }

    #[test]
    fn a_zero_duration_is_refused() {
        assert!(error_of("SCAN_WINDOW=\"0s\"\n").contains("longer than zero"));
    }

    #[test]
    fn ban_duration_forever_keeps_portsentry_semantics() {
        let config = parse("BAN_DURATION=\"forever\"\n").expect("loads");
        assert_eq!(config.ban_duration, BanDuration::Forever);
    }

    #[test]
    fn ban_duration_takes_go_durations() {
        let config = parse("BAN_DURATION=\"1h30m\"\n").expect("loads");
        assert_eq!(
            config.ban_duration,
            BanDuration::For(Duration::from_secs(5400))
        );
    }

    #[test]
    fn a_cap_below_the_first_ban_is_refused() {
        assert!(
            error_of("BAN_DURATION=\"1h\"\nBAN_MAX_DURATION=\"10m\"\n")
                .contains("shorter than BAN_DURATION")
        );
    }

    #[test]
    fn per_port_metrics_are_off_unless_asked_for() {
        assert!(!parse("TCP_PORTS=\"1\"\n").expect("loads").metrics_per_port);
        assert!(
            parse("METRICS_PER_PORT=\"1\"\n")
                .expect("loads")
                .metrics_per_port
        );
    }

    #[test]
    fn the_tripwire_needs_the_native_ban() {
        assert!(error_of("NFT_TRIPWIRE=\"1\"\n").contains("needs NFT_BAN"));
    }

    #[test]
    fn a_bad_nftables_table_name_is_refused() {
        assert!(error_of("NFT_TABLE=\"my table\"\n").contains("NFT_TABLE"));
    }

    #[test]
    fn blocked_files_get_the_mode_suffix_as_in_1_2() {
        let config = parse("BLOCKED_FILE=\"/var/lib/ps/portsentry.blocked\"\n").expect("loads");
        assert_eq!(
            config.blocked_file(Mode::Udp),
            Some(PathBuf::from("/var/lib/ps/portsentry.blocked.udp"))
        );
    }

    #[test]
    fn raw_mode_blocked_files_get_the_raw_mode_suffix_as_in_1_2() {
        let config = parse("BLOCKED_FILE=\"/var/lib/ps/portsentry.blocked\"\n").expect("loads");
        assert_eq!(
            config.blocked_file_of("atcp"),
            Some(PathBuf::from("/var/lib/ps/portsentry.blocked.atcp"))
        );
    }

    #[test]
    fn ignore_file_takes_ipv4_ipv6_and_prefixes() {
        let prefixes = parse_ignore(
            Path::new("/ignore"),
            "# local\n127.0.0.1\n10.0.0.0/8 # lab\n\nfd00::/8\n",
        )
        .expect("parses");
        assert!(ignored(&prefixes, "10.1.2.3".parse().expect("ip")));
        assert!(ignored(&prefixes, "fd00::5".parse().expect("ip")));
        assert!(!ignored(&prefixes, "192.0.2.1".parse().expect("ip")));
    }

    #[test]
    fn an_ignore_prefix_of_zero_bits_covers_everything() {
        let prefixes = parse_ignore(Path::new("/ignore"), "0.0.0.0/0\n").expect("parses");
        assert!(ignored(&prefixes, "203.0.113.9".parse().expect("ip")));
    }

    #[test]
    fn a_bad_ignore_line_names_file_and_line() {
        let message = parse_ignore(Path::new("/ignore"), "10.0.0.1\nnot-an-address\n")
            .expect_err("refused")
            .to_string();
        assert!(message.starts_with("ignore file /ignore:2:"), "{message}");
    }

    #[test]
    fn a_missing_ignore_file_reads_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            load_ignore(&dir.path().join("absent")).expect("no error"),
            None
        );
    }
}
