//! `portsentry-sensor check`: says in plain words what a config will really do, including
//! the traps PortSentry users fall into, and where PortSentry 1.2 would read it differently.

use std::{collections::BTreeMap, fmt, path::Path};

use portsentry_crds::PortRange;

use crate::config::{BanDuration, BlockLevel, Config, Mode, load_ignore};

/// How serious a finding is; any `Error` makes `check` exit non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// One statement about the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Info => "  ",
            Level::Warning => "WARNING: ",
            Level::Error => "ERROR: ",
        };
        write!(f, "{tag}{}", self.text)
    }
}

/// What the ignore file looked like when checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IgnoreStatus {
    Unset,
    Missing,
    Prefixes(usize),
    Invalid(String),
}

/// Reads the ignore file and the record directories, then explains the config.
pub fn check(config: &Config) -> Vec<Finding> {
    let ignore = match &config.ignore_file {
        None => IgnoreStatus::Unset,
        Some(path) => match load_ignore(path) {
            Ok(None) => IgnoreStatus::Missing,
            Ok(Some(prefixes)) => IgnoreStatus::Prefixes(prefixes.len()),
            Err(error) => IgnoreStatus::Invalid(error.to_string()),
        },
    };
    let mut findings = explain(config, &ignore);
    for (key, path) in [
        ("HISTORY_FILE", &config.history_file),
        ("BLOCKED_FILE", &config.blocked_file),
    ] {
        if let Some(dir) = path.as_deref().and_then(Path::parent)
            && !dir.is_dir()
        {
            findings.push(error(format!(
                "{key}: directory {} does not exist: create it (mkdir -p {}) or point {key} elsewhere; the sensor will not start",
                dir.display(),
                dir.display()
            )));
        }
    }
    findings
}

fn info(text: String) -> Finding {
    Finding {
        level: Level::Info,
        text,
    }
}

fn warning(text: String) -> Finding {
    Finding {
        level: Level::Warning,
        text,
    }
}

fn error(text: String) -> Finding {
    Finding {
        level: Level::Error,
        text,
    }
}

fn list(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The pure part of the check: explains `config` given the state of its ignore file.
pub fn explain(config: &Config, ignore: &IgnoreStatus) -> Vec<Finding> {
    let mut out = Vec::new();
    for (mode, key) in [(Mode::Tcp, "TCP_PORTS"), (Mode::Udp, "UDP_PORTS")] {
        decoys(config, mode, key, &mut out);
    }
    let needed = config.scan_trigger.max(1);
    let mut trigger = if needed == 1 {
        format!(
            "SCAN_TRIGGER={}: a source alarms on its first hit",
            config.scan_trigger
        )
    } else {
        format!(
            "SCAN_TRIGGER={needed}: a source alarms on its {needed}th {} (decoys count together); fewer leave no trace",
            if config.scan_distinct_ports {
                "distinct decoy port"
            } else {
                "hit"
            }
        )
    };
    match config.scan_window {
        Some(window) if needed > 1 => trigger.push_str(&format!(
            ", counting only the last {}",
            portsentry_crds::Duration(window)
        )),
        _ if needed > 1 => trigger.push_str(", and hits are never forgotten (as in PortSentry)"),
        _ => {}
    }
    out.push(info(trigger));
    out.push(info(
        "Loopback and this host's own addresses never alarm (1.2 would block them unless listed in the ignore file)".into(),
    ));
    for mode in [Mode::Tcp, Mode::Udp] {
        blocking(config, mode, &mut out);
    }
    bans(config, &mut out);
    shell_only_blocking(config, &mut out);
    for entry in config.entries.values() {
        if let Some(cut) = &entry.cut_by_1_2 {
            out.push(warning(format!(
                "{key} (line {line}) has double quotes inside its value. This sensor uses all of it: `{value}`. PortSentry 1.2 would cut it at the second quote and run `{cut}` instead{extra}",
                key = entry.key,
                line = entry.line,
                value = entry.value,
                extra = if entry.key == "KILL_ROUTE" {
                    " (the rest of the command never runs)"
                } else {
                    ""
                }
            )));
        }
    }
    raw_modes(config, &mut out);
    match ignore {
        IgnoreStatus::Unset => out.push(info("IGNORE_FILE is not set: only loopback and this host's addresses are never blocked".into())),
        IgnoreStatus::Missing => out.push(warning(format!(
            "IGNORE_FILE {} does not exist: nothing else is exempt from blocking (1.2 would block regardless). Create it with one address or CIDR a line (e.g. your admin network); it is re-read when it changes",
            config.ignore_file.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
        ))),
        IgnoreStatus::Prefixes(n) => out.push(info(format!("IGNORE_FILE lists {n} address(es)/prefix(es) that are never blocked; it is re-read when it changes"))),
        IgnoreStatus::Invalid(message) => out.push(error(format!("{message}: the sensor will not start"))),
    }
    match &config.history_file {
        Some(path) => out.push(info(format!(
            "Blocked hosts are appended to {} in PortSentry's format (fail2ban's portsentry filter reads it)",
            path.display()
        ))),
        None => out.push(info("HISTORY_FILE is not set: no history is kept".into())),
    }
    if let Some(banner) = &config.port_banner {
        out.push(info(format!(
            "PORT_BANNER: TCP scanners that trip the alarm are sent \"{banner}\" before the connection closes, and an alarming UDP datagram is answered with it from the decoy's port"
        )));
    }
    if config.resolve_host {
        out.push(info("RESOLVE_HOST=1: alarm lines name the host by reverse DNS (the ban never waits more than 2s for it)".into()));
    }
    out.extend(crate::differences::applying(config).map(|d| info(d.finding())));
    out
}

/// A config that blocks only through shell commands: the fork and exec of each is what a
/// scanner outruns, with this sensor as with 1.2 (tests/bench/kill-route-scan measures it).
fn shell_only_blocking(config: &Config, out: &mut Vec<Finding>) {
    let runs_shell = [Mode::Tcp, Mode::Udp]
        .iter()
        .any(|mode| match config.block(*mode) {
            BlockLevel::LogOnly => false,
            BlockLevel::RunCmdOnly => config.kill_run_cmd.is_some(),
            BlockLevel::All => config.kill_route.is_some() || config.kill_run_cmd.is_some(),
        });
    if runs_shell && !config.nft_ban {
        out.push(warning(
            "Blocks only through KILL_ROUTE/KILL_RUN_CMD: every ban waits for /bin/sh to fork and run your command, and that is the bottleneck: a connect scan (nmap -sT -p 1-1000) still saw a median of 173 ports answer before the drop took effect, as under PortSentry 1.2 (170). NFT_BAN=\"1\" bans from the sensor itself, without a shell (12 ports; docs/benchmarks.md); KILL_ROUTE can stay for whatever else it does".into(),
        ));
    }
}

fn decoys(config: &Config, mode: Mode, key: &str, out: &mut Vec<Finding>) {
    let ranges = config.ports(mode);
    let word = mode.protocol().as_str();
    if ranges.is_empty() {
        out.push(info(format!(
            "{key} is empty: no {word} decoys (-{} watches nothing)",
            mode.as_str()
        )));
        return;
    }
    let ports = portsentry_crds::expand(ranges);
    let hit = match mode {
        Mode::Tcp => "a completed handshake",
        Mode::Udp => "any datagram",
    };
    out.push(info(format!(
        "Watches {} {word} port(s) on IPv4 and IPv6 ({}): {hit} on any of them is a hit",
        ports.len(),
        list(ranges)
    )));
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for range in ranges {
        for port in range.ports() {
            *seen.entry(port).or_default() += 1;
        }
    }
    let twice: Vec<String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(port, _)| port.to_string())
        .collect();
    if !twice.is_empty() {
        out.push(warning(format!(
            "{key} lists port(s) {} more than once: each is watched once; remove the repeats",
            twice.join(",")
        )));
    }
    for range in ranges.iter().filter(|r| r.start() != r.end()) {
        out.push(warning(format!(
            "{key} range {range}: this sensor watches all {} ports; PortSentry 1.2 would read it as port {} only",
            range.end() - range.start() + 1,
            range.start()
        )));
    }
    let items = ranges.len();
    if items > 64 {
        out.push(warning(format!(
            "{key} has {items} entries: PortSentry 1.2 silently uses only the first 64; this sensor watches all of them"
        )));
    }
    if ports.iter().any(|port| *port < 1024) {
        out.push(info(format!(
            "{key} includes ports below 1024: binding them needs root or CAP_NET_BIND_SERVICE; a port already in use is skipped with a warning"
        )));
    }
}

fn blocking(config: &Config, mode: Mode, out: &mut Vec<Finding>) {
    let key = match mode {
        Mode::Tcp => "BLOCK_TCP",
        Mode::Udp => "BLOCK_UDP",
    };
    let word = mode.protocol().as_str();
    match config.block(mode) {
        BlockLevel::LogOnly => out.push(info(format!(
            "{key}=0: {word} alarms are logged only; nothing runs and no history line is written (1.2 writes a \"Blocked\" history line anyway, which makes fail2ban ban the host)"
        ))),
        BlockLevel::RunCmdOnly => {
            match &config.kill_run_cmd {
                Some(cmd) => out.push(info(format!(
                    "{key}=2: on a {word} alarm only KILL_RUN_CMD runs: `{cmd}`"
                ))),
                None => out.push(warning(format!(
                    "{key}=2 means \"run KILL_RUN_CMD only\", and KILL_RUN_CMD is not set: {word} alarms block NOTHING. Set {key}=\"1\" to run the other actions"
                ))),
            }
            for (other, set) in [
                ("KILL_ROUTE", config.kill_route.is_some()),
                ("KILL_HOSTS_DENY", config.kill_hosts_deny.is_some()),
                ("NFT_BAN", config.nft_ban),
            ] {
                if set {
                    out.push(warning(format!(
                        "{key}=2: {other} is set but NEVER runs for {word} alarms (only KILL_RUN_CMD does); use {key}=\"1\" to run it"
                    )));
                }
            }
        }
        BlockLevel::All => {
            let mut steps = Vec::new();
            if let Some(text) = &config.kill_hosts_deny {
                steps.push(format!(
                    "append `{text}` to {}",
                    config.hosts_deny_file.display()
                ));
            }
            if let Some(cmd) = &config.kill_route {
                steps.push(format!("run KILL_ROUTE `{cmd}`"));
            }
            if config.nft_ban {
                steps.push(format!(
                    "add the source to the nftables table inet {} (native, no shell)",
                    config.nft_table
                ));
            }
            if let Some(cmd) = &config.kill_run_cmd {
                let step = format!("run KILL_RUN_CMD `{cmd}`");
                if config.kill_run_cmd_first {
                    steps.insert(0, step);
                } else {
                    steps.push(step);
                }
            }
            if steps.is_empty() {
                out.push(warning(format!(
                    "{key}=1 but no KILL_HOSTS_DENY, KILL_ROUTE, KILL_RUN_CMD or NFT_BAN is set: {word} alarms block nothing"
                )));
            } else {
                out.push(info(format!(
                    "{key}=1: on a {word} alarm: {}. A host counts as blocked only if every step succeeds",
                    steps.join(", then ")
                )));
            }
        }
    }
    if mode == Mode::Udp && config.block(mode) != BlockLevel::LogOnly && !config.ban_unverified {
        out.push(warning(format!(
            "{key}={}: a UDP datagram does not prove its source (anyone can forge it to make you block, say, your DNS server), so UDP alarms do not block unless BAN_UNVERIFIED=\"1\" (PortSentry 1.2 blocks on them)",
            match config.block(mode) {
                BlockLevel::All => 1,
                _ => 2,
            }
        )));
    }
}

/// What the stealth and advanced modes (`-stcp -sudp -atcp -audp`) would do with this config.
fn raw_modes(config: &Config, out: &mut Vec<Finding>) {
    out.push(info(
        "Stealth and advanced modes (-stcp -sudp -atcp -audp) capture packets: they need root or CAP_NET_RAW (in a pod: the NET_RAW capability) and fail at start without it. They bind nothing (the ports stay closed), skip any port a real socket uses (checked per packet), and their probes do not prove the source address".into(),
    ));
    for (key, value, exclude, word) in [
        (
            "ADVANCED_PORTS_TCP",
            config.advanced_ports_tcp,
            &config.advanced_exclude_tcp,
            "TCP",
        ),
        (
            "ADVANCED_PORTS_UDP",
            config.advanced_ports_udp,
            &config.advanced_exclude_udp,
            "UDP",
        ),
    ] {
        let Some(port) = value else { continue };
        let excluded = if exclude.is_empty() {
            String::new()
        } else {
            format!(" and {}", list(exclude))
        };
        out.push(info(format!(
            "{key}={port}: -{} watches every {word} port below {port} except ports in use{excluded}",
            if word == "TCP" { "atcp" } else { "audp" }
        )));
        if port > 1024 {
            let mut text = format!(
                "{key}={port}: above 1024 an advanced mode alarms on ANY connection to an unused port below {port}, such as a client's innocent attempt to reach a service that is down; keep it at 1024 or list such ports in the exclude key"
            );
            if port > 32768 {
                text.push_str(". It also covers this host's ephemeral ports (32768 and up): late packets of this host's own closed outgoing connections can look like probes");
            }
            out.push(warning(text));
        }
    }
    if config.ban_unverified {
        out.push(warning(
            "BAN_UNVERIFIED=1: stealth, advanced and UDP alarms block too, but their source address can be forged: anyone can make this host block an address of their choosing (your gateway, your DNS server). List such addresses in IGNORE_FILE, or set BAN_UNVERIFIED=\"0\" to block only on completed handshakes".into(),
        ));
    }
}

fn bans(config: &Config, out: &mut Vec<Finding>) {
    let any_block =
        config.block_tcp != BlockLevel::LogOnly || config.block_udp != BlockLevel::LogOnly;
    if !any_block {
        return;
    }
    match config.ban_duration {
        BanDuration::Forever => out.push(info(
            "Bans last forever (PortSentry's semantics; set BAN_DURATION, e.g. \"1h\", to lift them)".into(),
        )),
        BanDuration::For(first) => {
            let cap = config
                .ban_max_duration
                .map(|d| format!("up to {}", portsentry_crds::Duration(d)))
                .unwrap_or_else(|| "without a cap (set BAN_MAX_DURATION)".into());
            out.push(info(format!(
                "Bans last {}; each repeat offence within {} doubles it, {cap}",
                portsentry_crds::Duration(first),
                portsentry_crds::Duration(config.ban_escalation_window)
            )));
            if config.kill_route.is_some() || config.kill_hosts_deny.is_some() || config.kill_run_cmd.is_some() {
                out.push(warning(
                    "BAN_DURATION is set but KILL_ROUTE/KILL_HOSTS_DENY/KILL_RUN_CMD cannot be undone by the sensor: on expiry only the native nftables ban is lifted".into(),
                ));
            }
        }
    }
    if config.nft_tripwire {
        out.push(info(
            "NFT_TRIPWIRE=1: the kernel adds a source to the ban set itself when a TCP handshake to a decoy completes (before this program even hears of it), for BAN_DURATION".into(),
        ));
        if config.ban_unverified && config.block_tcp == BlockLevel::All && config.scan_trigger <= 1
        {
            out.push(info(
                "NFT_TRIPWIRE=1 with BAN_UNVERIFIED=1: in -stcp/-atcp the kernel also bans on the first SYN, FIN, NULL or XMAS probe to a decoy port no socket uses (at most 50 bans a second)".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/t.conf"), text).expect("config")
    }

    fn texts(config: &Config, level: Level) -> Vec<String> {
        explain(config, &IgnoreStatus::Unset)
            .into_iter()
            .filter(|f| f.level == level)
            .map(|f| f.text)
            .collect()
    }

    fn warns(config: &Config, needle: &str) -> bool {
        texts(config, Level::Warning)
            .iter()
            .any(|t| t.contains(needle))
    }

    const FIXTURE: &str = include_str!("../../tests/fixtures/seed-portsentry.conf");

    #[test]
    fn block_2_without_kill_run_cmd_blocks_nothing() {
        assert!(warns(
            &config(FIXTURE),
            "BLOCK_TCP=2 means \"run KILL_RUN_CMD only\", and KILL_RUN_CMD is not set: TCP alarms block NOTHING"
        ));
    }

    #[test]
    fn block_2_says_kill_route_never_runs() {
        assert!(warns(&config(FIXTURE), "KILL_ROUTE is set but NEVER runs"));
    }

    #[test]
    fn the_inner_quote_cut_of_1_2_is_reported() {
        assert!(warns(
            &config(FIXTURE),
            "PortSentry 1.2 would cut it at the second quote and run `/sbin/iptables -I INPUT -s $TARGET$ -j DROP && echo `"
        ));
    }

    #[test]
    fn advanced_ports_say_what_the_advanced_mode_watches() {
        let config = config("ADVANCED_PORTS_TCP=\"1024\"\nADVANCED_EXCLUDE_TCP=\"113,139\"\n");
        assert!(texts(&config, Level::Info).iter().any(|t| t
            == "ADVANCED_PORTS_TCP=1024: -atcp watches every TCP port below 1024 except ports in use and 113,139"));
        assert!(texts(&config, Level::Warning).is_empty());
    }

    #[test]
    fn advanced_ports_above_the_ephemeral_start_warn_about_this_hosts_own_connections() {
        assert!(warns(
            &config(FIXTURE),
            "covers this host's ephemeral ports"
        ));
    }

    #[test]
    fn stealth_modes_say_they_need_net_raw() {
        assert!(
            texts(&config(""), Level::Info)
                .iter()
                .any(|t| t.contains("need root or CAP_NET_RAW"))
        );
    }

    #[test]
    fn ban_unverified_warns_that_sources_can_be_forged() {
        assert!(warns(
            &config("BAN_UNVERIFIED=\"1\"\n"),
            "their source address can be forged"
        ));
    }

    #[test]
    fn advanced_ports_above_1024_are_warned_about() {
        assert!(warns(
            &config(FIXTURE),
            "above 1024 an advanced mode alarms on ANY connection"
        ));
    }

    #[test]
    fn ports_listed_twice_are_warned_about() {
        assert!(warns(
            &config("TCP_PORTS=\"1,7,1\"\n"),
            "lists port(s) 1 more than once"
        ));
    }

    #[test]
    fn more_than_64_ports_warn_of_1_2s_cap() {
        let ports: Vec<String> = (1..=65).map(|p| p.to_string()).collect();
        assert!(warns(
            &config(&format!("TCP_PORTS=\"{}\"\n", ports.join(","))),
            "only the first 64"
        ));
    }

    #[test]
    fn a_range_warns_that_1_2_reads_only_its_start() {
        assert!(warns(
            &config("TCP_PORTS=\"5-11\"\n"),
            "read it as port 5 only"
        ));
    }

    #[test]
    fn a_missing_ignore_file_is_warned_about() {
        let config = config("IGNORE_FILE=\"/nonexistent/portsentry.ignore\"\n");
        let findings = check(&config);
        assert!(findings.iter().any(|f| {
            f.level == Level::Warning
                && f.text
                    .contains("/nonexistent/portsentry.ignore does not exist")
        }));
    }

    #[test]
    fn a_bad_ignore_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ignore");
        std::fs::write(&path, "bogus\n").expect("write");
        let config = config(&format!("IGNORE_FILE=\"{}\"\n", path.display()));
        assert!(check(&config).iter().any(|f| f.level == Level::Error));
    }

    #[test]
    fn a_missing_history_directory_is_an_error() {
        let config = config("HISTORY_FILE=\"/nonexistent-dir/portsentry.history\"\n");
        assert!(
            check(&config)
                .iter()
                .any(|f| f.level == Level::Error && f.text.contains("HISTORY_FILE"))
        );
    }

    #[test]
    fn block_0_says_no_history_line_is_written() {
        assert!(
            texts(&config("BLOCK_TCP=\"0\"\n"), Level::Info)
                .iter()
                .any(|t| t.contains("no history line is written"))
        );
    }

    #[test]
    fn block_1_lists_actions_in_portsentrys_order() {
        let config = config(
            "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/r\"\nKILL_HOSTS_DENY=\"ALL: $TARGET$\"\nKILL_RUN_CMD=\"/c\"\n",
        );
        assert!(texts(&config, Level::Info).iter().any(|t| t.contains("append `ALL: $TARGET$` to /etc/hosts.deny, then run KILL_ROUTE `/r`, then run KILL_RUN_CMD `/c`")));
    }

    #[test]
    fn udp_blocking_without_ban_unverified_is_warned_about() {
        assert!(warns(
            &config("BLOCK_UDP=\"1\"\nKILL_ROUTE=\"/r\"\n"),
            "UDP alarms do not block unless BAN_UNVERIFIED"
        ));
    }

    #[test]
    fn timed_bans_warn_that_shell_actions_are_not_undone() {
        assert!(warns(
            &config("BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/r\"\nBAN_DURATION=\"1h\"\n"),
            "cannot be undone"
        ));
    }

    #[test]
    fn the_shipped_example_config_is_clean() {
        let config = Config::parse(
            Path::new("sensor/examples/portsentry.conf"),
            include_str!("../examples/portsentry.conf"),
        )
        .expect("example loads");
        let findings = explain(&config, &IgnoreStatus::Unset);
        assert!(
            findings.iter().all(|f| f.level == Level::Info),
            "{findings:#?}"
        );
        assert!(config.nft_ban && config.kill_route.is_none());
        assert!(matches!(config.ban_duration, BanDuration::For(_)));
    }

    #[test]
    fn blocking_only_through_kill_route_names_the_fork_as_the_bottleneck_and_nft_ban_as_the_cure() {
        assert!(warns(
            &config(
                "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/sbin/iptables -I INPUT -s $TARGET$ -j DROP\"\n"
            ),
            "Blocks only through KILL_ROUTE/KILL_RUN_CMD: every ban waits for /bin/sh to fork"
        ));
    }

    #[test]
    fn block_2_with_kill_run_cmd_alone_is_shell_only_blocking() {
        assert!(warns(
            &config("BLOCK_TCP=\"2\"\nBLOCK_UDP=\"0\"\nKILL_RUN_CMD=\"/c $TARGET$\"\n"),
            "NFT_BAN=\"1\" bans from the sensor itself"
        ));
    }

    #[test]
    fn kill_route_beside_nft_ban_is_not_shell_only_blocking() {
        assert!(!warns(
            &config("BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/r\"\nNFT_BAN=\"1\"\n"),
            "Blocks only through KILL_ROUTE"
        ));
    }

    #[test]
    fn check_names_each_difference_from_1_2_that_applies_with_its_key() {
        let findings = texts(&config(FIXTURE), Level::Info);
        for needle in [
            "Differs from PortSentry 1.2 (History when nothing was blocked)",
            "Differs from PortSentry 1.2 (Inner quotes)",
            "Differs from PortSentry 1.2 (Own addresses)",
        ] {
            assert!(
                findings.iter().any(|f| f.starts_with(needle)),
                "{needle}: {findings:#?}"
            );
        }
        assert!(
            !findings
                .iter()
                .any(|f| f.starts_with("Differs from PortSentry 1.2 (Timed bans)")),
            "{findings:#?}"
        );
    }

    #[test]
    fn check_names_the_key_that_restores_1_2s_blocking_on_unverified_evidence() {
        let findings = texts(&config("BLOCK_UDP=\"1\"\nKILL_ROUTE=\"/r\"\n"), Level::Info);
        assert!(
            findings.iter().any(|f| f
                .starts_with("Differs from PortSentry 1.2 (Unverified evidence)")
                && f.ends_with("BAN_UNVERIFIED=\"1\" restores 1.2's")),
            "{findings:#?}"
        );
    }

    #[test]
    fn the_fixture_has_no_errors() {
        assert!(texts(&config(FIXTURE), Level::Error).is_empty());
    }
}
