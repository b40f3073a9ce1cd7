#![allow(clippy::unwrap_used)]
//! End to end, the kernel probe tripwire of the raw TCP modes (`NFT_TRIPWIRE="1"` with
//! `BAN_UNVERIFIED="1"`): the sensor runs `-atcp` in a victim network namespace with its
//! native nftables ban, and a real attacker namespace scans it with `nmap -sS`.
//!
//! Needs root, `ip`, `nmap` and `nft`. With `CI=true` a missing one is a failure; otherwise
//! the test says what is missing and passes without running.
//! Traffic goes only to addresses these tests create (10.231.x.0/24, x = 71..76).

use std::{fs, net::TcpListener};

mod common;

use common::{Net, prerequisites, wait_for};

const TOOLS: &[&str] = &["ip", "nmap", "nft"];

/// `-atcp` on every free port below 2000, banning in its own nftables table for 10 minutes.
fn config(net: &Net, extra: &str) -> String {
    format!(
        "TCP_PORTS=\"1\"\nUDP_PORTS=\"1\"\nADVANCED_PORTS_TCP=\"2000\"\nHISTORY_FILE=\"{h}\"\nBLOCKED_FILE=\"{b}\"\nIGNORE_FILE=\"{i}\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"1\"\nNFT_BAN=\"1\"\nBAN_DURATION=\"10m\"\n{extra}",
        h = net.path("history").display(),
        b = net.path("blocked").display(),
        i = net.path("ignore").display(),
    )
}

const ARMED: &str = "NFT_TRIPWIRE=\"1\"\nBAN_UNVERIFIED=\"1\"\n";

/// Starts the sensor with `extra` config and waits until it is active.
fn start(net: &mut Net, extra: &str) {
    let text = config(net, extra);
    net.start(&text, &["-atcp"]);
}

/// Runs `nmap -sS` from the attacker and returns its normal output.
fn syn_scan(net: &Net, ports: &str) -> String {
    let victim = net.v4.0.clone();
    let out = net.attacker(&[
        "nmap",
        "-sS",
        "-Pn",
        "-n",
        "--max-retries",
        "0",
        "-p",
        ports,
        &victim,
    ]);
    assert!(
        out.status.success(),
        "nmap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Ports nmap saw answer (open or closed), including those folded into "Not shown: ...".
fn answered(report: &str) -> u32 {
    let mut n = 0;
    for line in report.lines() {
        let mut words = line.split_whitespace();
        if let (Some(port), Some(state)) = (words.next(), words.next())
            && port.ends_with("/tcp")
            && (state == "open" || state == "closed")
        {
            n += 1;
        }
        if let Some(rest) = line.strip_prefix("Not shown: ") {
            for part in rest.split(", ") {
                let words: Vec<&str> = part.split_whitespace().collect();
                if let [count, state, ..] = words.as_slice()
                    && (*state == "open" || *state == "closed")
                {
                    n += count.parse::<u32>().unwrap();
                }
            }
        }
    }
    n
}

/// The victim's IPv4 ban set as `nft` lists it.
fn bans4(net: &Net) -> String {
    let out = net.victim(&["nft", "list", "set", "inet", "portsentry", "bans4"]);
    assert!(
        out.status.success(),
        "nft list set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The victim's `input` chain as `nft` lists it.
fn input_chain(net: &Net) -> String {
    let out = net.victim(&["nft", "list", "chain", "inet", "portsentry", "input"]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The probe tripwire's decoy ports as `nft -j` lists them (ranges expanded).
fn probe_decoys(net: &Net) -> Vec<u16> {
    let out = net.victim(&[
        "nft",
        "-j",
        "list",
        "set",
        "inet",
        "portsentry",
        "probe_decoys",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("set"))
        .unwrap();
    let mut ports = Vec::new();
    for e in set["elem"].as_array().cloned().unwrap_or_default() {
        match e.get("range") {
            Some(r) => ports.extend(r[0].as_u64().unwrap()..=r[1].as_u64().unwrap()),
            None => ports.push(e.as_u64().unwrap()),
        }
    }
    ports
        .into_iter()
        .map(|p| u16::try_from(p).unwrap())
        .collect()
}

#[test]
fn an_armed_tripwire_drops_a_syn_scanner_after_a_handful_of_ports() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(71);
    start(&mut net, ARMED);
    net.wait_log("adminalert: Kernel tripwire armed");
    let report = syn_scan(&net, "1-2000");
    let attacker = net.v4.1.clone();
    assert!(
        answered(&report) <= 5,
        "{} ports answered:\n{report}",
        answered(&report)
    );
    assert!(bans4(&net).contains(&attacker), "{}", bans4(&net));
}

#[test]
fn a_kernel_tripwire_ban_is_logged_and_recorded_like_other_bans() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(72);
    start(&mut net, ARMED);
    syn_scan(&net, "1-100");
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: TCP SYN/Normal scan from host: {attacker}/{attacker} to TCP port: "
    ));
    net.wait_log(&format!(
        "attackalert: Host {attacker} has been blocked via nftables"
    ));
    let history = wait_for(|| {
        fs::read_to_string(net.path("history"))
            .ok()
            .filter(|h| !h.is_empty())
    })
    .expect("a history line");
    assert!(
        history.contains(&format!("Host: {attacker}/{attacker} Port: "))
            && history.ends_with(" TCP Blocked\n"),
        "{history}"
    );
    assert_eq!(history.lines().count(), 1, "{history}");
    // 1.2's `-atcp` process writes `BLOCKED_FILE.atcp`.
    assert_eq!(
        fs::read_to_string(net.path("blocked.atcp")).unwrap(),
        history
    );
}

#[test]
fn without_ban_unverified_no_probe_bans_in_the_kernel() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(73);
    start(&mut net, "NFT_TRIPWIRE=\"1\"\n");
    net.wait_log("adminalert: Kernel tripwire not armed for the raw modes: BAN_UNVERIFIED");
    let report = syn_scan(&net, "1-100");
    let attacker = net.v4.1.clone();
    net.wait_log(&format!(
        "attackalert: Host {attacker}/{attacker} not blocked: no completed handshake proves the source"
    ));
    assert_eq!(answered(&report), 100, "{report}");
    assert!(!bans4(&net).contains(&attacker), "{}", bans4(&net));
    assert!(!input_chain(&net).contains("probe tripwire"));
}

#[test]
fn without_nft_tripwire_no_probe_rule_is_installed() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(74);
    start(&mut net, "BAN_UNVERIFIED=\"1\"\n");
    let chain = input_chain(&net);
    assert!(chain.contains("ip saddr @bans4 drop"), "{chain}");
    assert!(!chain.contains("probe tripwire"), "{chain}");
    assert!(!net.log().contains("Kernel tripwire"), "{}", net.log());
}

#[test]
fn a_port_a_service_binds_after_start_up_is_not_a_tripwire_decoy() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(75);
    start(&mut net, ARMED);
    assert!(probe_decoys(&net).contains(&1500));
    let _service = net.in_victim(|| TcpListener::bind("0.0.0.0:1500").unwrap());
    // At once, before the decoy ports are re-read: the kernel rule finds the listener.
    let victim = net.v4.0.clone();
    assert!(net.connect(&victim, 1500), "the new service answers");
    let report = syn_scan(&net, "1500");
    assert!(report.contains("1500/tcp open"), "{report}");
    let attacker = net.v4.1.clone();
    assert!(!bans4(&net).contains(&attacker), "{}", bans4(&net));
    assert!(net.connect(&victim, 1500), "not banned");
}

#[test]
fn a_port_a_service_binds_after_start_up_leaves_the_decoy_set() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(76);
    start(&mut net, ARMED);
    assert!(probe_decoys(&net).contains(&1501));
    let service = net.in_victim(|| TcpListener::bind("0.0.0.0:1501").unwrap());
    let left = wait_for(|| (!probe_decoys(&net).contains(&1501)).then_some(()));
    assert!(
        left.is_some(),
        "1501 is still a decoy: {:?}",
        probe_decoys(&net)
    );
    drop(service);
    let back = wait_for(|| probe_decoys(&net).contains(&1501).then_some(()));
    assert!(back.is_some(), "1501 did not become a decoy again");
}

#[test]
fn an_ignore_listed_scanner_is_never_banned_by_the_tripwire() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(77);
    let attacker = net.v4.1.clone();
    fs::write(net.path("ignore"), format!("{attacker}\n")).unwrap();
    start(&mut net, ARMED);
    let report = syn_scan(&net, "1-100");
    assert_eq!(answered(&report), 100, "{report}");
    assert!(!bans4(&net).contains(&attacker), "{}", bans4(&net));
}

#[test]
fn an_armed_tripwire_bans_a_scanner_that_fragments_its_syns() {
    if !prerequisites(TOOLS) {
        return;
    }
    let mut net = Net::new(78);
    start(&mut net, ARMED);
    let victim = net.v4.0.clone();
    // -f: 8-byte fragments; the kernel rule sees the reassembled SYN.
    let out = net.attacker(&[
        "nmap",
        "-sS",
        "-f",
        "-Pn",
        "-n",
        "--max-retries",
        "0",
        "-p",
        "1-100",
        &victim,
    ]);
    assert!(out.status.success());
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let attacker = net.v4.1.clone();
    assert!(answered(&report) <= 5, "{report}");
    assert!(bans4(&net).contains(&attacker), "{}", bans4(&net));
}
