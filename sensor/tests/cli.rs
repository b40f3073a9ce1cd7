//! The `portsentry-sensor` command line as a user meets it: `check`, PortSentry's mode
//! flags, and refusing to start on a bad config. Needs no privileges.

use std::process::Command;

const SENSOR: &str = env!("CARGO_BIN_EXE_portsentry-sensor");
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/seed-portsentry.conf"
);
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/portsentry.conf");

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(SENSOR)
        .args(args)
        .output()
        .expect("run sensor");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `check` of a config file with `text`: exit code and output.
fn check_text(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("portsentry.conf");
    std::fs::write(&path, text).expect("write");
    let (code, out, _) = run(&["check", "--config", &path.display().to_string()]);
    (code, out)
}

#[test]
fn check_explains_the_fixtures_traps_and_succeeds() {
    let (code, out, _) = run(&["check", "--config", FIXTURE]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("KILL_RUN_CMD is not set: TCP alarms block NOTHING"),
        "{out}"
    );
    assert!(out.contains("KILL_ROUTE is set but NEVER runs"), "{out}");
    assert!(
        out.contains("PortSentry 1.2 would cut it at the second quote"),
        "{out}"
    );
}

#[test]
fn check_names_the_differences_from_1_2_that_apply_with_the_key_restoring_each() {
    let (code, out) = check_text(
        "TCP_PORTS=\"1,11\"\nUDP_PORTS=\"1,11\"\nBLOCK_TCP=\"1\"\nBLOCK_UDP=\"1\"\n\
         KILL_ROUTE=\"/usr/sbin/nft add element inet filter banned { $TARGET$ }\"\n",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Differs from PortSentry 1.2 (Unverified evidence)")
            && out.contains("BAN_UNVERIFIED=\"1\" restores 1.2's"),
        "{out}"
    );
    assert!(
        out.contains("Differs from PortSentry 1.2 (Own addresses)"),
        "{out}"
    );
    assert!(!out.contains("(Timed bans)"), "{out}");
}

#[test]
fn check_says_kill_route_only_blocking_is_as_slow_as_1_2_and_points_to_nft_ban() {
    let (code, out) = check_text(
        "TCP_PORTS=\"1,11\"\nBLOCK_TCP=\"1\"\nKILL_ROUTE=\"/sbin/iptables -I INPUT -s $TARGET$ -j DROP\"\n",
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("WARNING: Blocks only through KILL_ROUTE/KILL_RUN_CMD")
            && out.contains("NFT_BAN=\"1\" bans from the sensor itself"),
        "{out}"
    );
}

#[test]
fn check_passes_the_shipped_example() {
    let (code, out, _) = run(&["check", "--config", EXAMPLE]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 error(s), 0 warning(s)"), "{out}");
}

#[test]
fn check_exits_non_zero_on_a_bad_config_naming_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.conf");
    std::fs::write(&path, "TCP_PORTS=\"1\"\nBLOCK_TCP=\"7\"\n").expect("write");
    let (code, out, _) = run(&["check", "--config", &path.display().to_string()]);
    assert_ne!(code, 0);
    assert!(
        out.contains(&format!("{}:2: BLOCK_TCP:", path.display())),
        "{out}"
    );
}

#[test]
fn the_sensor_does_not_start_on_an_unknown_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.conf");
    std::fs::write(&path, "TCP_PORTS=\"40000\"\nBLOK_TCP=\"1\"\n").expect("write");
    let (code, _, err) = run(&["-tcp", "--config", &path.display().to_string()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{}:2: BLOK_TCP: unknown key", path.display())),
        "{err}"
    );
    assert!(err.contains("not starting"), "{err}");
}

#[test]
fn stealth_and_advanced_mode_flags_are_accepted_with_the_connect_flags() {
    // The config error proves the six flags themselves were accepted together.
    let (code, _, err) = run(&[
        "-tcp",
        "-udp",
        "-stcp",
        "-sudp",
        "-atcp",
        "-audp",
        "--config",
        "/nonexistent/portsentry.conf",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot read config file /nonexistent/portsentry.conf"),
        "{err}"
    );
}

#[test]
fn portsentry_mode_flags_are_accepted_together() {
    // -tcp -udp parse; the config error proves the flags themselves were accepted.
    let (code, _, err) = run(&["-tcp", "-udp", "--config", "/nonexistent/portsentry.conf"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read config file /nonexistent/portsentry.conf"),
        "{err}"
    );
}
