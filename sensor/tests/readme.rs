//! The README's main command, read from README.md itself and run as written (without `sudo`:
//! the test already runs as root) in a network namespace: it comes up and detects a scan.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Net, prerequisites, wait_for_within};

/// How long the command may take to print "now active": `cargo run --release` compiles the
/// release profile first (fat LTO), minutes on a cold target directory, seconds when warm.
const FIRST_START: Duration = Duration::from_secs(30 * 60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("sensor/ has a parent")
        .to_path_buf()
}

/// The one command of the first `sh` block under "## Try it on one machine", as words.
fn readme_main_command(readme: &str) -> Vec<String> {
    let section = readme
        .split_once("## Try it on one machine")
        .expect("README.md has a \"## Try it on one machine\" section")
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("the section starts with a ```sh block")
        .0;
    let lines: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "the block holds the one main command: {lines:?}"
    );
    lines[0].split_whitespace().map(str::to_owned).collect()
}

#[test]
fn the_readme_main_command_parses_as_a_cargo_run_of_the_sensor() {
    let readme = fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let words = readme_main_command(&readme);
    assert_eq!(words[..3], ["sudo", "cargo", "run"], "{words:?}");
    assert!(words.iter().any(|w| w == "portsentry-sensor"), "{words:?}");
}

#[test]
fn the_readme_main_command_runs_as_written_and_detects_a_scan_from_another_namespace() {
    if !prerequisites(&["ip", "nft", "bash", "timeout"]) {
        return;
    }
    let readme = fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let words = readme_main_command(&readme);
    // Root already (prerequisites): `sudo` would only re-enter root.
    let command = words
        .strip_prefix(&["sudo".to_owned()])
        .expect("the README runs the sensor with sudo");
    let mut net = Net::new(60);
    let log_path = net.path("sensor.log");
    let log = fs::File::create(&log_path).expect("log");
    // `ip netns exec` execs the command, and `cargo run` execs the sensor it built, so the
    // child is the sensor itself (Net's drop kills it).
    let child = Command::new("ip")
        .args(["netns", "exec", &net.victim])
        .args(command)
        .current_dir(workspace_root())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the README command");
    net.sensors.push(child);
    wait_for_within(FIRST_START, || {
        let log = net.log();
        assert!(
            net.sensors[0].try_wait().ok().flatten().is_none(),
            "the README command ended before it was active:\n{log}"
        );
        log.contains("adminalert: PortSentry is now active and listening.")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the README command never became active:\n{}", net.log()));

    let (victim, attacker) = net.v4.clone();
    assert!(net.connect(&victim, 111), "the decoy accepts the connect");
    net.wait_log(&format!(
        "attackalert: Connect from host: {attacker}/{attacker} to TCP port: 111"
    ));
    // As the README says: the ban follows, in the sensor's nftables table.
    wait_for_within(Duration::from_secs(10), || {
        let table = net.victim(&["nft", "list", "table", "inet", "portsentry"]);
        String::from_utf8_lossy(&table.stdout)
            .contains(&attacker)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no ban of {attacker} in nftables:\n{}", net.log()));
}
