//! End to end, host mode: the built sensor runs in a victim network namespace, a real
//! attacker namespace (joined by veth) scans it with nmap and plain connects.
//!
//! Needs root, `ip`, `nmap`, `nft` and `fail2ban-regex`. With `CI=true` a missing one is a
//! failure; otherwise the test says what is missing and passes without running.
//! Traffic goes only to addresses these tests create (10.231.x.0/24, fd00:231:x::/64).

use std::{fs, path::Path};

const FIXTURE: &str = include_str!("../../tests/fixtures/seed-portsentry.conf");

mod common;

use common::{Net, must, prerequisites, sh, wait_for};

fn base_config(net: &Net) -> String {
    format!(
        "TCP_PORTS=\"1,79,111,31337,40421\"\nUDP_PORTS=\"161,31335\"\nHISTORY_FILE=\"{h}\"\nBLOCKED_FILE=\"{b}\"\nIGNORE_FILE=\"{i}\"\nSCAN_TRIGGER=\"0\"\nPORT_BANNER=\"GO AWAY\"\n",
        h = net.path("history").display(),
        b = net.path("blocked").display(),
        i = net.path("ignore").display(),
    )
}

/// The fixture's own KILL_ROUTE line, its log pointed at `log`, and (this machine has no
/// iptables) its iptables drop written as the same drop in an nftables table.
fn fixture_kill_route(log: &Path) -> String {
    let line = FIXTURE
        .lines()
        .find(|line| line.starts_with("KILL_ROUTE="))
        .expect("fixture has KILL_ROUTE");
    line.replace("/var/log/portsentry.block.log", &log.display().to_string())
        .replace(
            "/sbin/iptables -I INPUT -s $TARGET$ -j DROP",
            "nft add rule inet killroute input ip saddr $TARGET$ drop",
        )
}

#[test]
fn an_nmap_connect_scan_alarms_records_history_and_runs_the_fixtures_kill_route() {
    if !prerequisites(&["ip", "nmap", "nft"]) {
        return;
    }
    let mut net = Net::new(1);
    let mut full = vec!["ip", "netns", "exec", &net.victim];
    let table = ["nft", "add", "table", "inet", "killroute"];
    full.extend_from_slice(&table);
    must(&full);
    must(&[
        "ip",
        "netns",
        "exec",
        &net.victim,
        "nft",
        "add",
        "chain",
        "inet",
        "killroute",
        "input",
        "{ type filter hook input priority 0 ; }",
    ]);
    let route_log = net.path("block.log");
    let config = format!(
        "{}BLOCK_TCP=\"1\"\nBLOCK_UDP=\"0\"\n{}\n",
        base_config(&net),
        fixture_kill_route(&route_log)
    );
    net.start(&config, &["-tcp"]);
    let out = net.attacker(&[
        "nmap",
        "-sT",
        "-Pn",
        "-n",
        "-p",
        "1,79,111,31337,40421",
        "--max-retries",
        "0",
        &net.v4.0,
    ]);
    assert!(
        out.status.success(),
        "nmap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attacker = net.v4.1.clone();
    let log = net.wait_log(&format!("has been blocked via dropped route using command: \"nft add rule inet killroute input ip saddr {attacker} drop"));
    assert!(
        log.lines().any(|l| l.starts_with(&format!(
            "attackalert: Connect from host: {attacker}/{attacker} to TCP port: "
        ))),
        "{log}"
    );
    let history = wait_for(|| {
        fs::read_to_string(net.path("history"))
            .ok()
            .filter(|h| !h.is_empty())
    })
    .expect("history line written");
    let line = history.lines().next().unwrap_or_default();
    let (epoch, rest) = line.split_once(" - ").expect("epoch - rest");
    assert!(epoch.parse::<u64>().is_ok(), "{line}");
    assert!(
        rest.contains(&format!(" Host: {attacker}/{attacker} Port: "))
            && rest.ends_with(" TCP Blocked"),
        "{line}"
    );
    let route = fs::read_to_string(&route_log).expect("KILL_ROUTE wrote its log");
    assert!(route.starts_with(&format!("{attacker}:")), "{route}");
    assert!(
        !net.connect(&net.v4.0, 31337),
        "the KILL_ROUTE drop should stop the attacker's next connect"
    );
}

#[test]
fn the_history_file_is_parsed_by_fail2bans_portsentry_filter() {
    if !prerequisites(&["ip", "fail2ban-regex"]) {
        return;
    }
    let mut net = Net::new(2);
    let config = format!(
        "{}BLOCK_TCP=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\n",
        base_config(&net)
    );
    net.start(&config, &["-tcp"]);
    assert!(net.connect(&net.v4.0, 31337));
    assert!(net.connect(&net.v6.0, 40421));
    let history = wait_for(|| {
        fs::read_to_string(net.path("history"))
            .ok()
            .filter(|h| h.lines().count() >= 2)
    })
    .expect("two history lines");
    let lines = history.lines().count();
    let output = sh(&[
        "fail2ban-regex",
        &net.path("history").display().to_string(),
        "/etc/fail2ban/filter.d/portsentry.conf",
    ]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    let matched = report
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .unwrap_or_else(|| panic!("no Lines: summary in\n{report}"));
    assert!(
        matched.contains(&format!(
            "Lines: {lines} lines, 0 ignored, {lines} matched, 0 missed"
        )),
        "fail2ban matched fewer lines than written:\n{history}\n{report}"
    );
}

#[test]
fn an_ipv6_attacker_is_detected_and_blocked() {
    if !prerequisites(&["ip", "nmap", "curl"]) {
        return;
    }
    let mut net = Net::new(3);
    let config = format!(
        "{}BLOCK_TCP=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\n",
        base_config(&net)
    );
    net.start(&config, &["-tcp", "--metrics-addr", "127.0.0.1:9720"]);
    let out = net.attacker(&["nmap", "-6", "-sT", "-Pn", "-n", "-p", "31337", &net.v6.0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attacker = net.v6.1.clone();
    net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to TCP port: 31337"
    ));
    net.wait_log(&format!(
        "attackalert: External command run for host: {attacker} using command: \"/bin/true\""
    ));
    let history = wait_for(|| {
        fs::read_to_string(net.path("history"))
            .ok()
            .filter(|h| !h.is_empty())
    })
    .expect("history line");
    assert!(
        history.contains(&format!(
            "Host: {attacker}/{attacker} Port: 31337 TCP Blocked"
        )),
        "{history}"
    );
    let expected = [
        // No series names a decoy port unless METRICS_PER_PORT="1".
        "portsentry_sensor_hits_total{protocol=\"TCP\"} 1",
        "portsentry_sensor_alarms_total{protocol=\"TCP\"} 1",
        "portsentry_sensor_bans_added_total 1",
        "portsentry_sensor_bans_active 1",
    ];
    let mut text = String::new();
    let seen = wait_for(|| {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &net.victim,
            "curl",
            "-sf",
            "http://127.0.0.1:9720/metrics",
        ]);
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        expected
            .iter()
            .all(|line| text.contains(line))
            .then_some(())
    });
    assert!(seen.is_some(), "metrics never showed {expected:?}:\n{text}");
    let ready = sh(&[
        "ip",
        "netns",
        "exec",
        &net.victim,
        "curl",
        "-sf",
        "http://127.0.0.1:9720/readyz",
    ]);
    assert!(ready.status.success(), "/readyz did not answer 200");
}

#[test]
fn an_ignore_listed_attacker_is_never_banned() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut net = Net::new(4);
    fs::write(net.path("ignore"), format!("# lab\n{}/24\n", net.v4.0)).expect("ignore file");
    let config = format!(
        "{}BLOCK_TCP=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\n",
        base_config(&net)
    );
    net.start(&config, &["-tcp"]);
    for port in [1, 79, 31337] {
        assert!(net.connect(&net.v4.0, port));
    }
    // A non-ignored source right after proves the sensor was processing hits.
    assert!(net.connect(&net.v6.0, 111));
    net.wait_log("attackalert: Connect from host: fd00:231:4::2/");
    let log = net.log();
    assert!(
        !log.contains(&net.v4.1),
        "ignore-listed attacker appeared in the log:\n{log}"
    );
    let history = fs::read_to_string(net.path("history")).unwrap_or_default();
    assert!(!history.contains(&format!("{}/", net.v4.1)), "{history}");
}

#[test]
fn an_nmap_udp_scan_alarms_but_unverified_evidence_does_not_block() {
    if !prerequisites(&["ip", "nmap"]) {
        return;
    }
    let mut net = Net::new(5);
    let config = format!(
        "{}BLOCK_UDP=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\n",
        base_config(&net)
    );
    net.start(&config, &["-udp"]);
    let out = net.attacker(&["nmap", "-sU", "-Pn", "-n", "-p", "161,31335", &net.v4.0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to UDP port: "
    ));
    net.wait_log(&format!("attackalert: Host {attacker}/{attacker} not blocked: no completed handshake proves the source"));
    assert_eq!(
        fs::read_to_string(net.path("history")).unwrap_or_default(),
        ""
    );
}

#[test]
fn ports_already_in_use_are_skipped_and_named() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut net = Net::new(6);
    // Another program (a first sensor) holds TCP 79 in the victim namespace.
    net.start_named("holder", "TCP_PORTS=\"79\"\n", &["-tcp"]);
    let config = format!("{}BLOCK_TCP=\"0\"\n", base_config(&net));
    net.start(&config, &["-tcp"]);
    let log = net.log();
    assert!(
        log.contains("adminalert: ERROR: could not bind TCP socket: 79 (IPv4:"),
        "{log}"
    );
    assert!(
        log.contains("adminalert: ERROR: could not bind TCP socket: 79 (IPv6:"),
        "{log}"
    );
    assert!(
        !log.contains("adminalert: Going into listen mode on TCP port: 79\n"),
        "{log}"
    );
    for port in [1, 111, 31337, 40421] {
        assert!(
            log.contains(&format!(
                "adminalert: Going into listen mode on TCP port: {port}\n"
            )),
            "{log}"
        );
    }
    assert!(net.connect(&net.v4.0, 40421));
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to TCP port: 40421"
    ));
}

#[test]
fn the_native_ban_drops_the_attacker_expires_and_survives_a_flush() {
    if !prerequisites(&["ip", "nft"]) {
        return;
    }
    let mut net = Net::new(7);
    let config = format!(
        "{}BLOCK_TCP=\"1\"\nNFT_BAN=\"1\"\nNFT_TABLE=\"portsentry\"\nBAN_DURATION=\"6s\"\n",
        base_config(&net)
    );
    net.start(&config, &["-tcp"]);
    assert!(net.connect(&net.v4.0, 31337));
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: Host {attacker} has been blocked via nftables table portsentry for 6s"
    ));
    assert!(
        !net.connect(&net.v4.0, 40421),
        "banned attacker still connects"
    );
    must(&[
        "ip",
        "netns",
        "exec",
        &net.victim,
        "nft",
        "flush",
        "set",
        "inet",
        "portsentry",
        "bans4",
    ]);
    let restored = wait_for(|| {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &net.victim,
            "nft",
            "list",
            "set",
            "inet",
            "portsentry",
            "bans4",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .contains(&attacker)
            .then_some(())
    });
    assert!(restored.is_some(), "flushed ban was not restored");
    net.wait_log(&format!(
        "attackalert: Host {attacker} ban expired. Unblocked"
    ));
    assert!(
        wait_for(|| net.connect(&net.v4.0, 40421).then_some(())).is_some(),
        "attacker still dropped after the ban expired"
    );
}

/// Ports nmap's grepable output reports as open or closed (answered before any drop).
fn revealed(grepable: &str) -> usize {
    grepable
        .lines()
        .filter_map(|line| line.split_once("Ports: ").map(|(_, ports)| ports))
        .flat_map(|ports| ports.split(", "))
        .filter(|port| port.contains("/open/") || port.contains("/closed/"))
        .count()
}

#[test]
fn the_kernel_tripwire_stops_a_connect_scan_after_a_few_ports() {
    if !prerequisites(&["ip", "nmap", "nft"]) {
        return;
    }
    let mut net = Net::new(8);
    let tcp_ports = FIXTURE
        .lines()
        .find(|line| line.starts_with("TCP_PORTS="))
        .expect("fixture TCP_PORTS");
    let config = format!(
        "{tcp_ports}\nHISTORY_FILE=\"{}\"\nBLOCK_TCP=\"1\"\nNFT_BAN=\"1\"\nNFT_TABLE=\"portsentry\"\nNFT_TRIPWIRE=\"1\"\nBAN_DURATION=\"5m\"\n",
        net.path("history").display()
    );
    net.start(&config, &["-tcp"]);
    let out = net.attacker(&[
        "nmap",
        "-sT",
        "-Pn",
        "-n",
        "-p",
        "1-1000",
        "--max-retries",
        "0",
        "--max-rtt-timeout",
        "100ms",
        "--min-rate",
        "2000",
        "-oG",
        "-",
        &net.v4.0,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let count = revealed(&report);
    eprintln!("tripwire: {count} of 1000 ports answered before the ban");
    // PortSentry 1.2 with an nft KILL_ROUTE lets a median 263 of these 1000 ports answer.
    assert!(
        count <= 26,
        "{count} ports answered before the ban took effect:\n{report}"
    );
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to TCP port: "
    ));
}

#[test]
fn the_kernel_tripwire_never_bans_an_ignore_listed_attacker() {
    if !prerequisites(&["ip", "nft"]) {
        return;
    }
    let mut net = Net::new(40);
    fs::write(net.path("ignore"), format!("{}/32\n", net.v4.1)).expect("ignore file");
    let config = format!(
        "TCP_PORTS=\"111,31337\"\nIGNORE_FILE=\"{}\"\nHISTORY_FILE=\"{}\"\nBLOCK_TCP=\"1\"\nNFT_BAN=\"1\"\nNFT_TABLE=\"portsentry\"\nNFT_TRIPWIRE=\"1\"\nBAN_DURATION=\"5m\"\n",
        net.path("ignore").display(),
        net.path("history").display()
    );
    net.start(&config, &["-tcp"]);
    // Completed handshakes to decoys: the tripwire would ban a source that is not exempt.
    assert!(net.connect(&net.v4.0, 111));
    assert!(net.connect(&net.v4.0, 31337));
    // The IPv6 address of the same attacker is not ignore-listed: it is banned, which
    // proves the tripwire was armed.
    assert!(net.connect(&net.v6.0, 111));
    let banned_v6 = wait_for(|| (!net.connect(&net.v6.0, 31337)).then_some(()));
    assert!(
        banned_v6.is_some(),
        "the tripwire never banned the IPv6 source"
    );
    assert!(
        net.connect(&net.v4.0, 31337),
        "the ignore-listed IPv4 attacker was banned by the kernel tripwire"
    );
    let set = sh(&[
        "ip",
        "netns",
        "exec",
        &net.victim,
        "nft",
        "list",
        "set",
        "inet",
        "portsentry",
        "bans4",
    ]);
    assert!(
        !String::from_utf8_lossy(&set.stdout).contains(&net.v4.1),
        "ignore-listed source is in the ban set"
    );
}

#[test]
fn a_reloaded_scan_trigger_judges_the_next_scanner_without_a_restart() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut net = Net::new(41);
    let config = format!("{}BLOCK_TCP=\"0\"\nBLOCK_UDP=\"0\"\n", base_config(&net));
    net.start(&config, &["-tcp"]);
    fs::write(
        net.path("sensor.conf"),
        config.replace("SCAN_TRIGGER=\"0\"", "SCAN_TRIGGER=\"2\""),
    )
    .expect("rewrite config");
    net.wait_log("SCAN_TRIGGER applied to the next hits");
    assert!(net.connect(&net.v4.0, 79));
    assert!(net.connect(&net.v4.0, 111));
    let attacker = &net.v4.1;
    let log = net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to TCP port: 111"
    ));
    assert!(
        !log.contains("to TCP port: 79"),
        "the first hit alarmed although SCAN_TRIGGER is 2 now:\n{log}"
    );
    assert!(
        net.sensors[0].try_wait().expect("sensor status").is_none(),
        "the sensor exited:\n{log}"
    );
}

#[test]
fn a_reloaded_kill_run_cmd_blocks_the_next_scanner_without_a_restart() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let mut net = Net::new(42);
    let config = format!("{}BLOCK_TCP=\"0\"\nBLOCK_UDP=\"0\"\n", base_config(&net));
    net.start(&config, &["-tcp"]);
    let ran = net.path("kill-run-cmd");
    fs::write(
        net.path("sensor.conf"),
        config.replace(
            "BLOCK_TCP=\"0\"",
            &format!(
                "BLOCK_TCP=\"2\"\nKILL_RUN_CMD=\"echo $TARGET$ $PORT$ >> {}\"",
                ran.display()
            ),
        ),
    )
    .expect("rewrite config");
    net.wait_log("BLOCK_TCP, KILL_RUN_CMD applied to the next hits");
    assert!(net.connect(&net.v4.0, 79));
    let attacker = &net.v4.1;
    let log = net.wait_log(&format!(
        "attackalert: External command run for host: {attacker} using command"
    ));
    assert_eq!(
        fs::read_to_string(&ran).expect("the reloaded KILL_RUN_CMD ran"),
        format!("{attacker} 79\n"),
        "{log}"
    );
    assert!(
        !log.contains("take effect at the next restart"),
        "a response key was left for a restart:\n{log}"
    );
}
