//! README's one-machine try-out works as written: `tests/cluster up`, `scan` and `down` (as
//! root, with the parts of tests/build-node and the images of tests/build-images).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::process::Command;

fn cluster(command: &str) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/cluster");
    let output = Command::new(script).arg(command).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn up_scan_down_shows_the_ban_and_the_refused_attacker_and_leaves_nothing_behind() {
    let (up, text) = cluster("up");
    assert!(up, "tests/cluster up failed:\n{text}");
    let (scanned, report) = cluster("scan");
    let (down, text) = cluster("down");
    assert!(scanned, "tests/cluster scan failed:\n{report}");
    assert!(report.contains("PortSentryBan"), "{report}");
    assert!(report.contains("except [\"10.237.0.66/32\"]"), "{report}");
    assert!(
        report.contains("the attacker's next request fails; another client (10.237.0.1) still gets: welcome to the shop"),
        "{report}"
    );
    assert!(
        down && text.contains("down"),
        "tests/cluster down failed:\n{text}"
    );
    assert!(!std::path::Path::new("/run/portsentry-cluster.json").exists());
}
