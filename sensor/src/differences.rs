//! Every deliberate difference from PortSentry 1.2, as data: what 1.2 does, what the sensor
//! does, why, and the key that restores 1.2's behaviour. `check` names those that apply to a
//! config; docs/sensor.md shows them as one table (a test keeps the two equal).

use crate::config::{BanDuration, BlockLevel, Config, Mode};

/// One deliberate difference from PortSentry 1.2.
#[derive(Debug)]
pub struct Difference {
    pub topic: &'static str,
    pub portsentry_1_2: &'static str,
    pub ours: &'static str,
    pub why: &'static str,
    /// The key (and value) that restores 1.2's behaviour, where one exists.
    pub restore: Option<&'static str>,
    /// Whether the difference shows with this config.
    applies: fn(&Config) -> bool,
}

fn blocks(config: &Config) -> bool {
    [Mode::Tcp, Mode::Udp]
        .iter()
        .any(|mode| config.block(*mode) != BlockLevel::LogOnly)
}

/// Some `BLOCK_x` blocks nothing: 0, or 2 without `KILL_RUN_CMD`.
fn blocks_nothing_somewhere(config: &Config) -> bool {
    [Mode::Tcp, Mode::Udp]
        .iter()
        .any(|mode| match config.block(*mode) {
            BlockLevel::LogOnly => true,
            BlockLevel::RunCmdOnly => config.kill_run_cmd.is_none(),
            BlockLevel::All => false,
        })
}

fn runs_commands(config: &Config) -> bool {
    blocks(config) && (config.kill_route.is_some() || config.kill_run_cmd.is_some())
}

/// The differences, in the order of docs/sensor.md's table.
pub const DIFFERENCES: &[Difference] = &[
    Difference {
        topic: "Unverified evidence",
        portsentry_1_2: "blocks on a UDP datagram and on stealth and advanced probes",
        ours: "alarms and logs `not blocked: no completed handshake proves the source`, but does not block",
        why: "such a source address can be forged: anyone could make the host block its gateway or DNS server",
        restore: Some("BAN_UNVERIFIED=\"1\""),
        applies: |c| blocks(c) && !c.ban_unverified,
    },
    Difference {
        topic: "History when nothing was blocked",
        portsentry_1_2: "writes a `... Blocked` history line with `BLOCK_x=\"0\"`, and with `BLOCK_x=\"2\"` without `KILL_RUN_CMD`",
        ours: "writes no history or blocked line when no action ran",
        why: "fail2ban's portsentry filter reads that file and would ban hosts the config said not to block",
        restore: None,
        applies: blocks_nothing_somewhere,
    },
    Difference {
        topic: "Failed actions",
        portsentry_1_2: "logs a failed `KILL_ROUTE`/`KILL_RUN_CMD` as success and records the host as blocked",
        ours: "logs the failure and `Could not block host`; the host is not recorded, and its next hit tries again",
        why: "a host recorded as blocked but not blocked is never blocked again",
        restore: None,
        applies: runs_commands,
    },
    Difference {
        topic: "Inner quotes",
        portsentry_1_2: "cuts a value at its second double quote (`KILL_ROUTE=\"... echo \"x\" ...\"` runs `... echo `)",
        ours: "uses the whole value between the first and the last quote",
        why: "the cut command silently blocks nothing; `check` shows what 1.2 would run",
        restore: None,
        applies: |c| c.entries.values().any(|e| e.cut_by_1_2.is_some()),
    },
    Difference {
        topic: "Own addresses",
        portsentry_1_2: "blocks loopback and the host's own addresses unless the ignore file lists them",
        ours: "never alarms on loopback or any address of the host (re-read every 30 s)",
        why: "a host that blocks itself cuts its own services off",
        restore: None,
        applies: |_| true,
    },
    Difference {
        topic: "Ignore prefixes",
        portsentry_1_2: "IPv4 only; `0.0.0.0/0` acts as `/32`",
        ours: "every `addr/bits` is honoured with its mask, IPv4 and IPv6; the file is re-read when it changes",
        why: "an entry should mean what it says",
        restore: None,
        applies: |c| c.ignore_file.is_some(),
    },
    Difference {
        topic: "Port lists",
        portsentry_1_2: "uses only the first 64 ports of a list; reads `5-11` as port 5; a port it cannot bind shifts later ports' numbers",
        ours: "watches every listed port and range; a port in use is skipped and named",
        why: "1.2's truncation is silent",
        restore: None,
        applies: |c| {
            [Mode::Tcp, Mode::Udp].iter().any(|mode| {
                let ranges = c.ports(*mode);
                ranges.len() > 64 || ranges.iter().any(|r| r.start() != r.end())
            })
        },
    },
    Difference {
        topic: "One process for every mode",
        portsentry_1_2: "a process per mode: a host that hits TCP and UDP decoys is blocked twice, with two history lines",
        ours: "one process and one ban per host; `$MODE$` and `BLOCKED_FILE.<mode>` still name the detecting mode",
        why: "one belief about who is banned",
        restore: None,
        applies: blocks,
    },
    Difference {
        topic: "UDP banner",
        portsentry_1_2: "answers every alarming datagram with `PORT_BANNER`",
        ours: "answers at most 10 datagrams a second in all",
        why: "a datagram's source can be forged: unlimited answers would make the decoys a reflector",
        restore: None,
        applies: |c| c.port_banner.is_some() && !c.ports(Mode::Udp).is_empty(),
    },
    Difference {
        topic: "Alarms under a flood",
        portsentry_1_2: "logs every alarm",
        ours: "logs at most 50 alarms a second of first-seen sources without a completed handshake, and says how many it left out",
        why: "a spoofed-source flood would otherwise flood the log",
        restore: None,
        applies: |_| true,
    },
    Difference {
        topic: "Scan trigger state",
        portsentry_1_2: "counts hits in one ring of the last 50 hits of all sources",
        ours: "counts per source, up to `STATE_MAX_SOURCES` sources",
        why: "in 1.2 other sources' hits push a slow scanner's out of the ring",
        restore: None,
        applies: |c| c.scan_trigger > 1,
    },
    Difference {
        topic: "Timed bans",
        portsentry_1_2: "bans forever",
        ours: "lifts a native ban after `BAN_DURATION`, doubling it for repeat offences",
        why: "addresses change hands",
        restore: Some("BAN_DURATION=\"forever\""),
        applies: |c| matches!(c.ban_duration, BanDuration::For(_)),
    },
];

/// The differences that show with `config`.
pub fn applying(config: &Config) -> impl Iterator<Item = &'static Difference> {
    DIFFERENCES.iter().filter(move |d| (d.applies)(config))
}

impl Difference {
    /// The row of docs/sensor.md's table.
    pub fn table_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} |",
            self.topic,
            self.portsentry_1_2,
            self.ours,
            self.why,
            self.restore
                .map_or("none".to_owned(), |key| format!("`{key}`"))
        )
    }

    /// What `check` says of it.
    pub fn finding(&self) -> String {
        let restore = match self.restore {
            Some(key) => format!("{key} restores 1.2's"),
            None => "no key restores 1.2's".to_owned(),
        };
        format!(
            "Differs from PortSentry 1.2 ({}): {}; 1.2 {}. Why: {}; {restore}",
            self.topic, self.ours, self.portsentry_1_2, self.why
        )
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/t.conf"), text).expect("config")
    }

    fn topics(text: &str) -> Vec<&'static str> {
        applying(&config(text)).map(|d| d.topic).collect()
    }

    #[test]
    fn docs_sensor_md_shows_every_difference_as_one_table_row() {
        let docs = include_str!("../../docs/sensor.md");
        for difference in DIFFERENCES {
            let row = difference.table_row();
            assert!(docs.contains(&row), "docs/sensor.md lacks the row:\n{row}");
        }
    }

    #[test]
    fn blocking_without_ban_unverified_differs_on_unverified_evidence() {
        assert!(topics("BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/r\"\n").contains(&"Unverified evidence"));
        assert!(
            !topics("BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/r\"\nBAN_UNVERIFIED=\"1\"\n")
                .contains(&"Unverified evidence")
        );
    }

    #[test]
    fn block_2_without_kill_run_cmd_differs_on_history() {
        let text = "BLOCK_TCP=\"2\"\nBLOCK_UDP=\"1\"\nKILL_ROUTE=\"/r\"\n";
        assert!(topics(text).contains(&"History when nothing was blocked"));
        let text = "BLOCK_TCP=\"2\"\nBLOCK_UDP=\"2\"\nKILL_RUN_CMD=\"/c\"\n";
        assert!(!topics(text).contains(&"History when nothing was blocked"));
    }

    #[test]
    fn a_value_with_inner_quotes_differs() {
        let text = "KILL_ROUTE=\"/sbin/iptables -I INPUT -s $TARGET$ -j DROP && echo \"x\"\"\n";
        assert!(topics(text).contains(&"Inner quotes"));
        assert!(!topics("KILL_ROUTE=\"/r\"\n").contains(&"Inner quotes"));
    }

    #[test]
    fn own_addresses_always_differ() {
        assert!(topics("").contains(&"Own addresses"));
    }

    #[test]
    fn an_ignore_file_differs_on_prefixes() {
        assert!(topics("IGNORE_FILE=\"/i\"\n").contains(&"Ignore prefixes"));
    }

    #[test]
    fn a_timed_ban_names_the_key_that_restores_forever() {
        let findings: Vec<String> = applying(&config("BAN_DURATION=\"1h\"\n"))
            .map(Difference::finding)
            .collect();
        assert!(
            findings.iter().any(|f| f.contains("(Timed bans)")
                && f.contains("BAN_DURATION=\"forever\" restores 1.2's")),
            "{findings:#?}"
        );
    }
}
