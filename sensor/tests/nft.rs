#![allow(clippy::unwrap_used)]
//! The native nftables response against the real kernel, each test in network namespaces of its
//! own (the host firewall is never touched); state is inspected with `nft -j` from outside.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use portsentry_sensor::nft::{
    NftBans, SET_DECOYS, SET_EXEMPT_V4, SET_EXEMPT_V6, SET_PREFIX_V4, SET_PREFIX_V6,
    SET_PROBE_DECOYS, SET_V4, SET_V6,
};
use serde_json::Value;

const TABLE: &str = "portsentry-test";
const DECOY: u16 = 4001;
const OPEN: u16 = 4002;
const V4_VICTIM: &str = "10.250.0.1";
const V4_ATTACKER: &str = "10.250.0.2";
const V6_VICTIM: &str = "fd00:250::1";
const V6_ATTACKER: &str = "fd00:250::2";
/// Rules of each chain without tripwires: drop the address and the prefix bans, per family.
const DROP_RULES: usize = 4;

// ---------------------------------------------------------------------------------------------
// Harness

/// Checks root, `ip` and `nft`. Outside CI a missing prerequisite skips the test with a note;
/// with CI=true it fails.
fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (nftables and network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)");
    }
    if !runs("ip", &["-V"]) {
        missing.push("`ip` (Debian package iproute2)");
    }
    if !runs("nft", &["--version"]) {
        missing.push("`nft` (Debian package nftables)");
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("nft tests need: {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: a missing prerequisite is a failure; tests/run installs them)");
    }
    eprintln!("SKIPPED (not CI): {msg}");
    false
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        Self::named("psnft")
    }

    /// A namespace named `<prefix>-<pid>-<n>`.
    fn named(prefix: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn nft(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", self.name.as_str(), "nft"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created there (including
    /// the netlink socket of an `NftBans`) stay in this namespace when used from other threads.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .expect("thread inside the namespace panicked")
        })
    }

    fn open_bans(&self) -> NftBans {
        self.enter(|| NftBans::open(TABLE)).expect("open the table")
    }

    /// The table as `nft -j` lists it, or None when there is no such table.
    fn table(&self) -> Option<Vec<Value>> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-j", "list", "table"])
            .args(["inet", TABLE])
            .output()
            .expect("run nft");
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output is JSON");
        Some(v["nftables"].as_array().cloned().unwrap_or_default())
    }

    /// Elements of `set`: (address or port, timeout seconds, expires seconds).
    fn elements(&self, set: &str) -> Vec<(String, Option<u64>, Option<u64>)> {
        let table = self.table().expect("table exists");
        let set = table
            .iter()
            .find_map(|o| o.get("set").filter(|s| s["name"] == set))
            .unwrap_or_else(|| panic!("set {set} exists"));
        let Some(elems) = set["elem"].as_array() else {
            return Vec::new();
        };
        elems
            .iter()
            .map(|e| match e.get("elem") {
                Some(d) => (
                    scalar(&d["val"]),
                    d["timeout"].as_u64(),
                    d["expires"].as_u64(),
                ),
                None => (scalar(e), None, None),
            })
            .collect()
    }

    fn has(&self, set: &str, addr: &str) -> bool {
        self.elements(set).iter().any(|e| e.0 == addr)
    }

    /// Waits up to a second for `addr` to appear in `set` (the packet that trips the wire is
    /// processed by the victim's softirq, a moment after the attacker's connect returns).
    fn gets(&self, set: &str, addr: &str) -> bool {
        for _ in 0..20 {
            if self.has(set, addr) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Rule comments of `chain`, in order.
    fn rules(&self, chain: &str) -> Vec<String> {
        self.table()
            .expect("table exists")
            .iter()
            .filter_map(|o| o.get("rule").filter(|r| r["chain"] == chain))
            .map(|r| r["comment"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// A victim and an attacker namespace joined by a veth pair, IPv4 and IPv6.
struct Pair {
    victim: Netns,
    attacker: Netns,
}

impl Pair {
    fn new() -> Self {
        Self::named("psnft")
    }

    fn named(prefix: &str) -> Self {
        let victim = Netns::named(prefix);
        let attacker = Netns::named(prefix);
        victim.ip(&[
            "link",
            "add",
            "vv",
            "type",
            "veth",
            "peer",
            "name",
            "va",
            "netns",
            &attacker.name,
        ]);
        for (ns, dev, v4, v6) in [
            (&victim, "vv", V4_VICTIM, V6_VICTIM),
            (&attacker, "va", V4_ATTACKER, V6_ATTACKER),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        Pair { victim, attacker }
    }

    /// Listens on the decoy and the open port of `victim_addr`, inside the victim namespace.
    /// The kernel completes handshakes from the backlog; nobody needs to accept.
    fn listen(&self, victim_addr: &str) -> Vec<TcpListener> {
        let a = ip(victim_addr);
        self.victim.enter(|| {
            [DECOY, OPEN]
                .iter()
                .map(|p| TcpListener::bind(SocketAddr::new(a, *p)).expect("bind in victim"))
                .collect()
        })
    }

    /// Whether a TCP connection from the attacker to `victim_addr:port` completes within 1.5 s.
    fn connects(&self, victim_addr: &str, port: u16) -> bool {
        let to = SocketAddr::new(ip(victim_addr), port);
        self.attacker
            .enter(|| TcpStream::connect_timeout(&to, Duration::from_millis(1500)))
            .is_ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Table, sets and chains

#[test]
fn open_creates_the_table_with_both_sets_and_drop_chains_on_input_and_forward() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let _bans = ns.open_bans();
    let table = ns.table().expect("table created");
    for (set, ty) in [
        (SET_V4, "ipv4_addr"),
        (SET_V6, "ipv6_addr"),
        (SET_PREFIX_V4, "ipv4_addr"),
        (SET_PREFIX_V6, "ipv6_addr"),
        (SET_DECOYS, "inet_service"),
    ] {
        let s = table
            .iter()
            .find_map(|o| o.get("set").filter(|s| s["name"] == set))
            .unwrap_or_else(|| panic!("set {set}"));
        assert_eq!(s["type"], ty);
        if set != SET_DECOYS {
            let flags: Vec<&str> = s["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(flags.contains(&"timeout"), "{set} flags {flags:?}");
            let interval = [SET_PREFIX_V4, SET_PREFIX_V6].contains(&set);
            assert_eq!(
                flags.contains(&"interval"),
                interval,
                "{set} flags {flags:?}"
            );
        }
    }
    for (chain, hook) in [("input", "input"), ("forward", "forward")] {
        let c = table
            .iter()
            .find_map(|o| o.get("chain").filter(|c| c["name"] == chain))
            .unwrap_or_else(|| panic!("chain {chain}"));
        assert_eq!(c["hook"], hook);
        assert_eq!(c["prio"], -10);
        assert_eq!(c["type"], "filter");
        let rules = ns.rules(chain);
        assert_eq!(rules.len(), DROP_RULES, "{chain}: {rules:?}");
    }
    let listing =
        String::from_utf8_lossy(&ns.nft(&["list", "chain", "inet", TABLE, "input"]).stdout)
            .into_owned();
    assert!(listing.contains("ip saddr @bans4 drop"), "{listing}");
    assert!(listing.contains("ip6 saddr @bans6 drop"), "{listing}");
    assert!(listing.contains("ip saddr @prefix_bans4 drop"), "{listing}");
    assert!(
        listing.contains("ip6 saddr @prefix_bans6 drop"),
        "{listing}"
    );
}

#[test]
fn open_is_idempotent_and_keeps_existing_bans() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let first = ns.open_bans();
    first
        .ban(ip("192.0.2.7"), Some(Duration::from_secs(600)))
        .expect("ban");
    let before = (ns.rules("input"), ns.rules("forward"));
    let _second = ns.open_bans();
    let _third = ns.open_bans();
    assert_eq!((ns.rules("input"), ns.rules("forward")), before);
    assert!(ns.has(SET_V4, "192.0.2.7"), "the ban survived reopening");
    let tables = String::from_utf8_lossy(&ns.nft(&["list", "tables"]).stdout).into_owned();
    assert_eq!(tables.matches(TABLE).count(), 1, "{tables}");
}

// ---------------------------------------------------------------------------------------------
// Bans

#[test]
fn ban_puts_ipv4_and_ipv6_sources_in_their_sets_with_a_timeout() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.10"), Some(Duration::from_secs(600)))
        .expect("ban v4");
    bans.ban(ip("2001:db8::10"), Some(Duration::from_secs(900)))
        .expect("ban v6");
    let v4 = ns.elements(SET_V4);
    let v6 = ns.elements(SET_V6);
    assert_eq!(v4.len(), 1);
    assert_eq!(v4[0].0, "192.0.2.10");
    assert_eq!(v4[0].1, Some(600));
    assert!(v4[0].2.is_some_and(|x| (590..=600).contains(&x)), "{v4:?}");
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].0, "2001:db8::10");
    assert_eq!(v6[0].1, Some(900));
}

#[test]
fn ban_without_timeout_is_forever() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.11"), None).expect("ban");
    assert_eq!(
        ns.elements(SET_V4),
        vec![("192.0.2.11".to_owned(), None, None)]
    );
    assert_eq!(
        bans.banned().expect("banned"),
        vec![(ip("192.0.2.11"), None)]
    );
}

#[test]
fn banning_a_banned_source_again_gives_it_the_new_timeout() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    let a = ip("192.0.2.12");
    bans.ban(a, Some(Duration::from_secs(60))).expect("ban");
    bans.ban(a, Some(Duration::from_secs(3600)))
        .expect("ban again");
    assert_eq!(ns.elements(SET_V4).len(), 1);
    assert_eq!(ns.elements(SET_V4)[0].1, Some(3600));
    bans.ban(a, None).expect("ban forever");
    assert_eq!(ns.elements(SET_V4)[0].1, None);
}

#[test]
fn an_ipv4_mapped_ipv6_source_is_banned_as_ipv4() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("::ffff:192.0.2.13"), Some(Duration::from_secs(60)))
        .expect("ban");
    assert!(ns.has(SET_V4, "192.0.2.13"));
    assert!(ns.elements(SET_V6).is_empty());
}

#[test]
fn banned_reports_the_remaining_timeouts_the_kernel_holds() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.14"), Some(Duration::from_secs(100)))
        .expect("ban");
    bans.ban(ip("2001:db8::14"), None).expect("ban");
    std::thread::sleep(Duration::from_millis(1100));
    let mut got = bans.banned().expect("banned");
    got.sort();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, ip("192.0.2.14"));
    let left = got[0].1.expect("a timeout");
    assert!(
        left < Duration::from_secs(99) && left > Duration::from_secs(95),
        "{left:?}"
    );
    assert_eq!(got[1], (ip("2001:db8::14"), None));
}

#[test]
fn unban_removes_the_element_and_unbanning_twice_is_fine() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.15"), Some(Duration::from_secs(600)))
        .expect("ban");
    bans.ban(ip("2001:db8::15"), Some(Duration::from_secs(600)))
        .expect("ban");
    bans.unban(ip("192.0.2.15")).expect("unban v4");
    bans.unban(ip("2001:db8::15")).expect("unban v6");
    assert!(ns.elements(SET_V4).is_empty());
    assert!(ns.elements(SET_V6).is_empty());
    bans.unban(ip("192.0.2.15")).expect("unban again");
}

#[test]
fn ban_recreates_a_table_someone_deleted() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    ns.nft(&["delete", "table", "inet", TABLE]);
    bans.ban(ip("192.0.2.16"), Some(Duration::from_secs(60)))
        .expect("ban");
    assert!(ns.has(SET_V4, "192.0.2.16"));
    assert_eq!(ns.rules("input").len(), DROP_RULES);
}

#[test]
fn remove_deletes_the_table_and_removing_twice_is_fine() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.remove().expect("remove");
    assert!(ns.table().is_none());
    bans.remove().expect("remove again");
}

// ---------------------------------------------------------------------------------------------
// Reconcile

#[test]
fn reconcile_restores_a_flushed_set() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    let active = [
        (ip("192.0.2.20"), Some(Duration::from_secs(600))),
        (ip("2001:db8::20"), None),
    ];
    bans.reconcile(&active).expect("reconcile");
    ns.nft(&["flush", "set", "inet", TABLE, SET_V4]);
    ns.nft(&["flush", "set", "inet", TABLE, SET_V6]);
    assert!(ns.elements(SET_V4).is_empty());
    bans.reconcile(&active).expect("reconcile");
    assert_eq!(ns.elements(SET_V4)[0].0, "192.0.2.20");
    assert_eq!(ns.elements(SET_V4)[0].1, Some(600));
    assert_eq!(
        ns.elements(SET_V6),
        vec![("2001:db8::20".to_owned(), None, None)]
    );
}

#[test]
fn reconcile_restores_a_flushed_chain() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    let rules = ns.rules("input");
    ns.nft(&["flush", "chain", "inet", TABLE, "input"]);
    assert!(ns.rules("input").is_empty());
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(ns.rules("input"), rules);
}

#[test]
fn reconcile_recreates_a_deleted_table_with_its_bans() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    let active = [(ip("192.0.2.21"), Some(Duration::from_secs(300)))];
    bans.reconcile(&active).expect("reconcile");
    ns.nft(&["delete", "table", "inet", TABLE]);
    assert!(ns.table().is_none());
    bans.reconcile(&active).expect("reconcile");
    assert!(ns.has(SET_V4, "192.0.2.21"));
    assert_eq!(ns.rules("input").len(), DROP_RULES);
    assert_eq!(ns.rules("forward").len(), DROP_RULES);
}

#[test]
fn reconcile_removes_bans_not_in_the_list() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.22"), None).expect("ban");
    bans.ban(ip("2001:db8::22"), Some(Duration::from_secs(60)))
        .expect("ban");
    ns.nft(&["add", "element", "inet", TABLE, SET_V4, "{ 192.0.2.23 }"]);
    bans.reconcile(&[(ip("192.0.2.22"), None)])
        .expect("reconcile");
    assert_eq!(
        ns.elements(SET_V4),
        vec![("192.0.2.22".to_owned(), None, None)]
    );
    assert!(ns.elements(SET_V6).is_empty());
}

#[test]
fn reconcile_corrects_a_timeout_that_differs_and_leaves_close_ones_alone() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.24"), Some(Duration::from_secs(60)))
        .expect("ban");
    bans.ban(ip("192.0.2.25"), Some(Duration::from_secs(60)))
        .expect("ban");
    bans.reconcile(&[
        (ip("192.0.2.24"), Some(Duration::from_secs(3600))),
        (ip("192.0.2.25"), Some(Duration::from_millis(59_500))),
    ])
    .expect("reconcile");
    let mut e = ns.elements(SET_V4);
    e.sort();
    assert_eq!(e[0].1, Some(3600), "{e:?}");
    assert_eq!(e[1].1, Some(60), "left alone: {e:?}");
}

// ---------------------------------------------------------------------------------------------
// Enforcement and the tripwire, over a veth pair

#[test]
fn a_banned_source_cannot_connect_and_can_again_after_unban() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _l4 = pair.listen(V4_VICTIM);
    let _l6 = pair.listen(V6_VICTIM);
    let bans = pair.victim.open_bans();
    assert!(pair.connects(V4_VICTIM, OPEN), "connects before the ban");
    assert!(
        pair.connects(V6_VICTIM, OPEN),
        "connects before the ban (v6)"
    );
    bans.ban(ip(V4_ATTACKER), Some(Duration::from_secs(600)))
        .expect("ban");
    bans.ban(ip(V6_ATTACKER), Some(Duration::from_secs(600)))
        .expect("ban");
    assert!(!pair.connects(V4_VICTIM, OPEN), "dropped after the ban");
    assert!(
        !pair.connects(V6_VICTIM, OPEN),
        "dropped after the ban (v6)"
    );
    bans.unban(ip(V4_ATTACKER)).expect("unban");
    bans.unban(ip(V6_ATTACKER)).expect("unban");
    assert!(pair.connects(V4_VICTIM, OPEN), "connects after unban");
    assert!(pair.connects(V6_VICTIM, OPEN), "connects after unban (v6)");
}

#[test]
fn tripwire_bans_an_ipv4_source_that_completes_a_handshake_to_a_decoy() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY, 7], Some(Duration::from_secs(600)))
        .expect("tripwire");
    assert!(pair.connects(V4_VICTIM, OPEN), "connects before");
    assert!(!pair.victim.has(SET_V4, V4_ATTACKER), "not banned yet");
    assert!(
        pair.connects(V4_VICTIM, DECOY),
        "the decoy handshake completes"
    );
    assert!(
        pair.victim.gets(SET_V4, V4_ATTACKER),
        "banned by the kernel"
    );
    let e = pair.victim.elements(SET_V4);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].0, V4_ATTACKER);
    assert_eq!(e[0].1, Some(600));
    assert!(
        !pair.connects(V4_VICTIM, OPEN),
        "dropped after the tripwire"
    );
    assert!(
        bans.banned()
            .expect("banned")
            .iter()
            .any(|b| b.0 == ip(V4_ATTACKER))
    );
}

#[test]
fn tripwire_bans_an_ipv6_source_that_completes_a_handshake_to_a_decoy() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V6_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY], None).expect("tripwire");
    assert!(pair.connects(V6_VICTIM, OPEN), "connects before");
    assert!(
        pair.connects(V6_VICTIM, DECOY),
        "the decoy handshake completes"
    );
    assert!(
        pair.victim.gets(SET_V6, V6_ATTACKER),
        "banned by the kernel"
    );
    assert_eq!(
        pair.victim.elements(SET_V6),
        vec![(V6_ATTACKER.to_owned(), None, None)]
    );
    assert!(
        !pair.connects(V6_VICTIM, OPEN),
        "dropped after the tripwire"
    );
}

#[test]
fn a_connection_to_a_port_that_is_not_a_decoy_does_not_trip() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY], Some(Duration::from_secs(60)))
        .expect("tripwire");
    for _ in 0..3 {
        assert!(pair.connects(V4_VICTIM, OPEN));
    }
    assert!(pair.victim.elements(SET_V4).is_empty());
}

#[test]
fn reconcile_brings_back_the_tripwire_and_its_decoys_after_the_table_is_deleted() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.install_tripwire(&[111, 80, 80], Some(Duration::from_secs(3600)))
        .expect("tripwire");
    let rules = ns.rules("input");
    assert_eq!(rules.len(), DROP_RULES + 2, "{rules:?}");
    let ports = |ns: &Netns| {
        let mut p: Vec<String> = ns.elements(SET_DECOYS).into_iter().map(|e| e.0).collect();
        p.sort();
        p
    };
    assert_eq!(ports(&ns), vec!["111", "80"]);
    ns.nft(&["delete", "table", "inet", TABLE]);
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(ns.rules("input"), rules);
    assert_eq!(ports(&ns), vec!["111", "80"]);
    ns.nft(&["flush", "set", "inet", TABLE, SET_DECOYS]);
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(ports(&ns), vec!["111", "80"]);
    bans.install_tripwire(&[], None).expect("remove tripwire");
    assert_eq!(ns.rules("input").len(), DROP_RULES);
}

#[test]
fn reconcile_keeps_a_fresh_tripwire_ban_user_space_has_not_reported_yet() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY], Some(Duration::from_secs(600)))
        .expect("tripwire");
    assert!(pair.connects(V4_VICTIM, DECOY));
    assert!(
        pair.victim.gets(SET_V4, V4_ATTACKER),
        "banned by the kernel"
    );
    bans.reconcile(&[]).expect("reconcile");
    assert!(
        pair.victim.has(SET_V4, V4_ATTACKER),
        "kept within the grace"
    );
}

#[test]
fn tripwire_never_bans_a_source_in_an_exempt_network() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _l4 = pair.listen(V4_VICTIM);
    let _l6 = pair.listen(V6_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY], Some(Duration::from_secs(60)))
        .expect("tripwire");
    let exempt = [
        "10.250.0.0/24".parse().expect("net"),
        "fd00:250::2/128".parse().expect("net"),
    ];
    bans.set_tripwire_exempt(&exempt).expect("exempt");
    assert!(pair.connects(V4_VICTIM, DECOY));
    assert!(pair.connects(V6_VICTIM, DECOY));
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.victim.elements(SET_V4).is_empty());
    assert!(pair.victim.elements(SET_V6).is_empty());
    assert!(pair.connects(V4_VICTIM, OPEN), "still connects");
    bans.set_tripwire_exempt(&[]).expect("no exemptions");
    assert!(pair.connects(V4_VICTIM, DECOY));
    assert!(
        pair.victim.gets(SET_V4, V4_ATTACKER),
        "banned once not exempt"
    );
}

#[test]
fn tripwire_never_bans_the_host_itself() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_tripwire(&[DECOY], Some(Duration::from_secs(60)))
        .expect("tripwire");
    let to = SocketAddr::new(ip(V4_VICTIM), DECOY);
    let local = pair
        .victim
        .enter(|| TcpStream::connect_timeout(&to, Duration::from_millis(1500)));
    assert!(local.is_ok(), "the host reaches its own decoy");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.victim.elements(SET_V4).is_empty());
}

#[test]
fn reconcile_restores_flushed_exempt_networks() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.install_tripwire(&[DECOY], None).expect("tripwire");
    let nets = [
        "192.0.2.0/24".parse().expect("net"),
        "198.51.100.7/32".parse().expect("net"),
        "2001:db8::/32".parse().expect("net"),
    ];
    bans.set_tripwire_exempt(&nets).expect("exempt");
    let before = (ns.elements(SET_EXEMPT_V4), ns.elements(SET_EXEMPT_V6));
    assert_eq!(before.0.len(), 2, "{before:?}");
    ns.nft(&["flush", "set", "inet", TABLE, SET_EXEMPT_V4]);
    ns.nft(&["flush", "set", "inet", TABLE, SET_EXEMPT_V6]);
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(
        (ns.elements(SET_EXEMPT_V4), ns.elements(SET_EXEMPT_V6)),
        before
    );
}

// ---------------------------------------------------------------------------------------------
// Errors

#[test]
fn without_cap_net_admin_the_error_says_what_to_do() {
    if !prerequisites() {
        return;
    }
    assert!(
        runs("setpriv", &["--version"]),
        "setpriv (Debian package util-linux) is needed for this test"
    );
    let ns = Netns::new();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_nft-probe"))
        .args([TABLE, "open"])
        .output()
        .expect("run nft-probe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("needs CAP_NET_ADMIN"), "{stderr}");
    assert!(stderr.contains("NET_ADMIN"), "{stderr}");
    assert!(ns.table().is_none());
}

#[test]
fn nft_probe_bans_and_lists_from_the_command_line() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let probe = env!("CARGO_BIN_EXE_nft-probe");
    let exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", ns.name.as_str(), probe, TABLE];
        all.extend_from_slice(args);
        run("ip", &all)
    };
    exec(&["ban", "192.0.2.30", "120"]);
    exec(&["ban", "2001:db8::30", "forever"]);
    let listed = String::from_utf8_lossy(&exec(&["banned"]).stdout).into_owned();
    assert!(listed.contains("192.0.2.30 1"), "{listed}");
    assert!(listed.contains("2001:db8::30 forever"), "{listed}");
    exec(&["remove"]);
    assert!(ns.table().is_none());
}

#[test]
fn an_invalid_table_name_is_refused_before_touching_the_kernel() {
    let err = NftBans::open("").expect_err("empty name");
    assert!(
        err.to_string().contains("invalid nftables table name"),
        "{err}"
    );
    let err = NftBans::open(&"x".repeat(300)).expect_err("long name");
    assert!(err.to_string().contains("1 to 255"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The probe tripwire of the raw modes (first SYN to a free decoy port)

impl Pair {
    /// Listens on the open port only (the decoy stays free), inside the victim namespace.
    fn listen_open(&self, victim_addr: &str) -> TcpListener {
        let a = ip(victim_addr);
        self.victim
            .enter(|| TcpListener::bind(SocketAddr::new(a, OPEN)).expect("bind in victim"))
    }
}

#[test]
fn probe_tripwire_bans_and_drops_the_first_syn_to_a_free_decoy_port() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _open = pair.listen_open(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_probe_tripwire(&[DECOY, 7], Some(Duration::from_secs(600)))
        .expect("probe tripwire");
    assert!(pair.connects(V4_VICTIM, OPEN), "connects before");
    assert!(
        !pair.connects(V4_VICTIM, DECOY),
        "the SYN to the decoy gets no answer"
    );
    assert!(
        pair.victim.gets(SET_V4, V4_ATTACKER),
        "banned by the kernel"
    );
    let e = pair.victim.elements(SET_V4);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].1, Some(600));
    assert!(!pair.connects(V4_VICTIM, OPEN), "dropped after the SYN");
}

#[test]
fn probe_tripwire_bans_an_ipv6_source() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _open = pair.listen_open(V6_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_probe_tripwire(&[DECOY], None)
        .expect("probe tripwire");
    assert!(!pair.connects(V6_VICTIM, DECOY));
    assert!(
        pair.victim.gets(SET_V6, V6_ATTACKER),
        "banned by the kernel"
    );
    assert!(!pair.connects(V6_VICTIM, OPEN), "dropped after the SYN");
}

#[test]
fn probe_tripwire_lets_a_syn_through_to_a_decoy_port_a_socket_listens_on() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _listeners = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.install_probe_tripwire(&[DECOY], Some(Duration::from_secs(60)))
        .expect("probe tripwire");
    assert!(pair.connects(V4_VICTIM, DECOY), "the service answers");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.victim.elements(SET_V4).is_empty());
    assert!(pair.connects(V4_VICTIM, OPEN), "still connects");
}

#[test]
fn probe_tripwire_never_bans_a_source_in_an_exempt_network() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new();
    let _open = pair.listen_open(V4_VICTIM);
    let bans = pair.victim.open_bans();
    bans.set_tripwire_exempt(&["10.250.0.0/24".parse().expect("net")])
        .expect("exempt");
    bans.install_probe_tripwire(&[DECOY], Some(Duration::from_secs(60)))
        .expect("probe tripwire");
    assert!(!pair.connects(V4_VICTIM, DECOY), "the decoy is closed");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pair.victim.elements(SET_V4).is_empty());
    assert!(pair.connects(V4_VICTIM, OPEN), "still connects");
}

#[test]
fn set_probe_decoys_replaces_the_ports_and_reconcile_restores_them() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    let first: Vec<u16> = (1..100).collect();
    bans.install_probe_tripwire(&first, Some(Duration::from_secs(60)))
        .expect("probe tripwire");
    assert_eq!(bans.probe_decoys().expect("list"), first);
    let rules = ns.rules("input");
    assert_eq!(rules.len(), DROP_RULES + 3, "{rules:?}");
    let second: Vec<u16> = (1..50).chain(51..100).collect();
    assert!(bans.set_probe_decoys(&second).expect("set"), "changed");
    assert!(!bans.set_probe_decoys(&second).expect("set"), "unchanged");
    assert_eq!(bans.probe_decoys().expect("list"), second);
    ns.nft(&["flush", "set", "inet", TABLE, SET_PROBE_DECOYS]);
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(bans.probe_decoys().expect("list"), second);
    ns.nft(&["delete", "table", "inet", TABLE]);
    bans.reconcile(&[]).expect("reconcile");
    assert_eq!(ns.rules("input"), rules);
    assert_eq!(bans.probe_decoys().expect("list"), second);
    bans.install_probe_tripwire(&[], None).expect("remove");
    assert_eq!(ns.rules("input").len(), DROP_RULES);
}

// ---------------------------------------------------------------------------------------------
// Prefix bans (interval sets), over a veth pair whose attacker side also has addresses inside
// and outside the banned prefixes

/// Inside 198.51.100.0/22 (198.51.100.0 to 198.51.103.255).
const V4_IN_22: &str = "198.51.103.7";
/// Just past it.
const V4_PAST_22: &str = "198.51.104.7";
/// Inside 2001:db8:1:2::/64.
const V6_IN_64: &str = "2001:db8:1:2::7";
/// In the next /64.
const V6_PAST_64: &str = "2001:db8:1:3::7";

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

impl Pair {
    /// A pair (namespaces named `psnp-*`) whose attacker also holds [`V4_IN_22`],
    /// [`V4_PAST_22`], [`V6_IN_64`] and [`V6_PAST_64`], with the victim's routes back to them.
    fn with_prefix_sources() -> Self {
        let pair = Pair::named("psnp");
        for a in [V4_IN_22, V4_PAST_22] {
            pair.attacker
                .ip(&["addr", "add", &format!("{a}/32"), "dev", "va"]);
        }
        for a in [V6_IN_64, V6_PAST_64] {
            pair.attacker
                .ip(&["addr", "add", &format!("{a}/128"), "dev", "va", "nodad"]);
        }
        pair.victim
            .ip(&["route", "add", "198.51.96.0/20", "dev", "vv"]);
        pair.victim
            .ip(&["route", "add", "2001:db8:1::/48", "dev", "vv"]);
        pair
    }

    /// Whether a TCP connection from the attacker's `from` to `victim_addr:OPEN` completes
    /// within 1.5 s.
    fn connects_from(&self, from: &str, victim_addr: &str) -> bool {
        let to = SocketAddr::new(ip(victim_addr), OPEN);
        let from = SocketAddr::new(ip(from), 0);
        self.attacker
            .enter(|| {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(to),
                    socket2::Type::STREAM,
                    None,
                )?;
                s.bind(&from.into())?;
                s.connect_timeout(&to.into(), Duration::from_millis(1500))
            })
            .is_ok()
    }
}

impl Netns {
    /// Elements of the prefix set `set` as `nft -j` lists them: ("addr/len", timeout seconds).
    fn prefixes(&self, set: &str) -> Vec<(String, Option<u64>)> {
        let table = self.table().expect("table exists");
        let set = table
            .iter()
            .find_map(|o| o.get("set").filter(|s| s["name"] == set))
            .unwrap_or_else(|| panic!("set {set} exists"));
        let Some(elems) = set["elem"].as_array() else {
            return Vec::new();
        };
        elems
            .iter()
            .map(|e| {
                let (val, timeout) = match e.get("elem") {
                    Some(d) => (&d["val"], d["timeout"].as_u64()),
                    None => (e, None),
                };
                let text = match val.get("prefix") {
                    Some(p) => format!("{}/{}", scalar(&p["addr"]), p["len"]),
                    None => scalar(val),
                };
                (text, timeout)
            })
            .collect()
    }
}

#[test]
fn a_banned_ipv4_slash_22_drops_a_source_inside_it_and_not_one_outside() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::with_prefix_sources();
    let _l4 = pair.listen(V4_VICTIM);
    let bans = pair.victim.open_bans();
    assert!(pair.connects_from(V4_IN_22, V4_VICTIM), "connects before");
    bans.ban_prefix(net("198.51.100.0/22"), Some(Duration::from_secs(600)))
        .expect("ban prefix");
    assert!(!pair.connects_from(V4_IN_22, V4_VICTIM), "dropped inside");
    assert!(
        pair.connects_from(V4_PAST_22, V4_VICTIM),
        "not past the /22"
    );
    assert_eq!(
        pair.victim.prefixes(SET_PREFIX_V4),
        vec![("198.51.100.0/22".to_owned(), Some(600))]
    );
    assert!(
        pair.victim.elements(SET_V4).is_empty(),
        "no address expanded"
    );
}

#[test]
fn a_banned_ipv6_slash_64_drops_a_source_inside_it_and_not_one_outside() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::with_prefix_sources();
    let _l6 = pair.listen(V6_VICTIM);
    let bans = pair.victim.open_bans();
    assert!(pair.connects_from(V6_IN_64, V6_VICTIM), "connects before");
    bans.ban_prefix(net("2001:db8:1:2::/64"), None)
        .expect("ban prefix");
    assert!(!pair.connects_from(V6_IN_64, V6_VICTIM), "dropped inside");
    assert!(
        pair.connects_from(V6_PAST_64, V6_VICTIM),
        "not past the /64"
    );
    assert_eq!(
        pair.victim.prefixes(SET_PREFIX_V6),
        vec![("2001:db8:1:2::/64".to_owned(), None)]
    );
}

#[test]
fn unban_prefix_lets_the_sources_of_a_banned_prefix_in_again() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::with_prefix_sources();
    let _l4 = pair.listen(V4_VICTIM);
    let _l6 = pair.listen(V6_VICTIM);
    let bans = pair.victim.open_bans();
    bans.ban_prefix(net("198.51.100.0/22"), None).expect("ban");
    bans.ban_prefix(net("2001:db8:1:2::/64"), None)
        .expect("ban");
    assert!(!pair.connects_from(V4_IN_22, V4_VICTIM));
    assert!(!pair.connects_from(V6_IN_64, V6_VICTIM));
    bans.unban_prefix(net("198.51.100.0/22")).expect("unban");
    bans.unban_prefix(net("2001:db8:1:2::/64")).expect("unban");
    assert!(pair.connects_from(V4_IN_22, V4_VICTIM), "v4 after unban");
    assert!(pair.connects_from(V6_IN_64, V6_VICTIM), "v6 after unban");
    assert!(bans.banned_prefixes().expect("list").is_empty());
    bans.unban_prefix(net("198.51.100.0/22"))
        .expect("unbanning twice is fine");
}

#[test]
fn unban_prefix_of_part_of_a_banned_prefix_keeps_the_rest_banned() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("10.0.0.0/22"), Some(Duration::from_secs(600)))
        .expect("ban");
    bans.unban_prefix(net("10.0.1.0/24")).expect("unban");
    let left: Vec<IpNet> = bans
        .banned_prefixes()
        .expect("list")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(left, vec![net("10.0.0.0/24"), net("10.0.2.0/23")]);
}

#[test]
fn banning_a_prefix_inside_a_banned_one_sets_only_its_own_timeout() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("10.0.0.0/22"), Some(Duration::from_secs(600)))
        .expect("ban");
    bans.ban_prefix(net("10.0.1.0/24"), Some(Duration::from_secs(3600)))
        .expect("ban inside");
    let got = ns.prefixes(SET_PREFIX_V4);
    let nets: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nets, ["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/23"]);
    assert_eq!(got[1].1, Some(3600), "{got:?}");
    // The rest keeps what was left of its 600 s (rewritten with the remaining time).
    for outer in [&got[0], &got[2]] {
        assert!(outer.1.is_some_and(|t| t <= 600), "{got:?}");
    }
}

#[test]
fn a_prefix_running_to_the_top_of_the_address_space_is_listed_as_that_prefix() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("240.0.0.0/4"), None).expect("ban");
    bans.ban_prefix(net("ff00::/8"), None).expect("ban");
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![("240.0.0.0/4".to_owned(), None)]
    );
    assert_eq!(
        ns.prefixes(SET_PREFIX_V6),
        vec![("ff00::/8".to_owned(), None)]
    );
    assert_eq!(
        bans.banned_prefixes().expect("list"),
        vec![(net("240.0.0.0/4"), None), (net("ff00::/8"), None)]
    );
}

#[test]
fn a_host_prefix_is_banned_in_the_address_set() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("192.0.2.40/32"), None).expect("ban");
    bans.ban_prefix(net("::ffff:192.0.2.41/128"), None)
        .expect("ban");
    let mut e = ns.elements(SET_V4);
    e.sort();
    assert_eq!(
        e,
        vec![
            ("192.0.2.40".to_owned(), None, None),
            ("192.0.2.41".to_owned(), None, None)
        ]
    );
    assert!(ns.prefixes(SET_PREFIX_V4).is_empty());
}

#[test]
fn reconcile_nets_merges_overlapping_and_adjacent_prefixes_into_disjoint_ranges() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    let hour = Some(Duration::from_secs(3600));
    bans.reconcile_nets(&[
        (net("198.51.100.0/23"), hour),
        (net("198.51.101.0/24"), hour),
        (net("198.51.102.0/23"), hour),
        (net("203.0.113.0/24"), Some(Duration::from_secs(600))),
        (net("203.0.113.128/25"), hour),
        (net("2001:db8::/32"), None),
        (net("2001:db8:7::/48"), hour),
    ])
    .expect("reconcile");
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![
            ("198.51.100.0/22".to_owned(), Some(3600)),
            ("203.0.113.0/25".to_owned(), Some(600)),
            ("203.0.113.128/25".to_owned(), Some(3600)),
        ]
    );
    assert_eq!(
        ns.prefixes(SET_PREFIX_V6),
        vec![("2001:db8::/32".to_owned(), None)]
    );
}

#[test]
fn reconcile_nets_puts_addresses_in_the_address_sets_and_prefixes_in_the_prefix_sets() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.reconcile_nets(&[
        (net("192.0.2.50/32"), None),
        (net("2001:db8::50/128"), None),
        (net("198.51.100.0/22"), None),
    ])
    .expect("reconcile");
    assert_eq!(
        ns.elements(SET_V4),
        vec![("192.0.2.50".to_owned(), None, None)]
    );
    assert_eq!(
        ns.elements(SET_V6),
        vec![("2001:db8::50".to_owned(), None, None)]
    );
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![("198.51.100.0/22".to_owned(), None)]
    );
}

#[test]
fn reconcile_restores_a_flushed_prefix_set() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    let active = [
        (net("198.51.100.0/22"), Some(Duration::from_secs(600))),
        (net("2001:db8:1:2::/64"), None),
    ];
    bans.reconcile_nets(&active).expect("reconcile");
    let before = (ns.prefixes(SET_PREFIX_V4), ns.prefixes(SET_PREFIX_V6));
    ns.nft(&["flush", "set", "inet", TABLE, SET_PREFIX_V4]);
    ns.nft(&["flush", "set", "inet", TABLE, SET_PREFIX_V6]);
    assert!(ns.prefixes(SET_PREFIX_V4).is_empty());
    bans.reconcile_nets(&active).expect("reconcile");
    assert_eq!(
        (ns.prefixes(SET_PREFIX_V4), ns.prefixes(SET_PREFIX_V6)),
        before
    );
}

#[test]
fn reconcile_removes_prefixes_not_in_the_list() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("198.51.100.0/22"), None).expect("ban");
    bans.ban_prefix(net("2001:db8:1:2::/64"), None)
        .expect("ban");
    bans.reconcile_nets(&[(net("203.0.113.0/24"), None)])
        .expect("reconcile");
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![("203.0.113.0/24".to_owned(), None)]
    );
    assert!(ns.prefixes(SET_PREFIX_V6).is_empty());
    bans.reconcile(&[]).expect("reconcile addresses only");
    assert!(ns.prefixes(SET_PREFIX_V4).is_empty());
}

#[test]
fn reconcile_corrects_a_prefix_timeout_that_differs() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    bans.ban_prefix(net("198.51.100.0/22"), Some(Duration::from_secs(60)))
        .expect("ban");
    bans.reconcile_nets(&[(net("198.51.100.0/22"), Some(Duration::from_secs(3600)))])
        .expect("reconcile");
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![("198.51.100.0/22".to_owned(), Some(3600))]
    );
}

#[test]
fn a_banned_prefix_survives_a_deleted_table_through_reconcile() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    let active = [(net("198.51.100.0/22"), None)];
    bans.reconcile_nets(&active).expect("reconcile");
    ns.nft(&["delete", "table", "inet", TABLE]);
    bans.reconcile_nets(&active).expect("reconcile");
    assert_eq!(
        ns.prefixes(SET_PREFIX_V4),
        vec![("198.51.100.0/22".to_owned(), None)]
    );
    assert_eq!(ns.rules("input").len(), DROP_RULES);
}

#[test]
fn reconcile_nets_writes_more_prefixes_than_one_batch_holds() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::named("psnp");
    let bans = ns.open_bans();
    // 1200 /30s with gaps between them (not merged): three batches of ranges.
    let active: Vec<(IpNet, Option<Duration>)> = (0..1200u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i * 8);
            (IpNet::V4(ipnet::Ipv4Net::new(a, 30).unwrap()), None)
        })
        .collect();
    bans.reconcile_nets(&active).expect("reconcile");
    let mut got = bans.banned_prefixes().expect("list");
    got.sort();
    let mut want = active.clone();
    want.sort();
    assert_eq!(got, want);
}

#[test]
fn reconcile_keeps_an_unlisted_ban_the_caller_says_it_just_started() {
    if !prerequisites() {
        return;
    }
    let ns = Netns::new();
    let bans = ns.open_bans();
    bans.ban(ip("192.0.2.31"), None).expect("ban");
    bans.ban(ip("192.0.2.32"), None).expect("ban");
    let started = ip("192.0.2.31");
    bans.reconcile_keeping(&[], &|address| address == started)
        .expect("reconcile");
    assert_eq!(
        ns.elements(SET_V4),
        vec![("192.0.2.31".to_owned(), None, None)]
    );
}
