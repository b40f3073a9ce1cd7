//! Network-namespace helpers shared by the end-to-end suites: a victim and an attacker
//! namespace joined by veth, the sensor started in the victim, removed in a Drop guard.
#![allow(dead_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const SENSOR: &str = env!("CARGO_BIN_EXE_portsentry-sensor");

/// Returns false (after saying why) when the test cannot run here and CI is not set.
pub fn prerequisites(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
    {
        missing.push("root (network namespaces need it)".to_owned());
    }
    for tool in tools {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).exists());
        if !found {
            missing.push(format!(
                "`{tool}` (apt-get install it, or run tests/run as root)"
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!("end-to-end test needs: {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("NOT RUN: {message}");
    false
}

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

pub fn must(args: &[&str]) {
    let output = sh(args);
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A victim and an attacker namespace joined by veth; removed on drop, even on panic.
pub struct Net {
    pub victim: String,
    pub attacker: String,
    pub v4: (String, String),
    pub v6: (String, String),
    pub sensors: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Net {
    pub fn new(index: u8) -> Self {
        let id = std::process::id() % 10_000;
        let victim = format!("psv{index}v{id}");
        let attacker = format!("psv{index}a{id}");
        let net = Net {
            victim: victim.clone(),
            attacker: attacker.clone(),
            v4: (format!("10.231.{index}.1"), format!("10.231.{index}.2")),
            v6: (
                format!("fd00:231:{index}::1"),
                format!("fd00:231:{index}::2"),
            ),
            sensors: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let _ = sh(&["ip", "netns", "del", &victim]);
        let _ = sh(&["ip", "netns", "del", &attacker]);
        must(&["ip", "netns", "add", &victim]);
        must(&["ip", "netns", "add", &attacker]);
        let (va, vb) = (format!("pv{index}{id}a"), format!("pv{index}{id}b"));
        must(&[
            "ip", "link", "add", &va, "netns", &victim, "type", "veth", "peer", "name", &vb,
            "netns", &attacker,
        ]);
        for (ns, dev, v4, v6) in [
            (&victim, &va, &net.v4.0, &net.v6.0),
            (&attacker, &vb, &net.v4.1, &net.v6.1),
        ] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        net
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the sensor in the victim namespace with `config` (stderr to `sensor.log`).
    pub fn start(&mut self, config: &str, args: &[&str]) {
        self.start_named("sensor", config, args);
    }

    /// Starts a sensor whose config and log are named after `name`; waits until it is active.
    pub fn start_named(&mut self, name: &str, config: &str, args: &[&str]) {
        let conf = self.path(&format!("{name}.conf"));
        fs::write(&conf, config).expect("write config");
        let log = fs::File::create(self.path(&format!("{name}.log"))).expect("log");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.victim, SENSOR, "--config"])
            .arg(&conf)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log);
        self.sensors.push(command.spawn().expect("start sensor"));
        let log_path = self.path(&format!("{name}.log"));
        wait_for(|| {
            fs::read_to_string(&log_path)
                .ok()
                .filter(|l| l.contains("adminalert: PortSentry is now active and listening."))
        })
        .unwrap_or_else(|| {
            panic!(
                "sensor {name} never became active:\n{}",
                fs::read_to_string(&log_path).unwrap_or_default()
            )
        });
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path("sensor.log")).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) -> String {
        wait_for(|| {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
        .unwrap_or_else(|| panic!("sensor log never showed `{needle}`:\n{}", self.log()))
    }

    pub fn attacker(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.attacker];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A plain TCP connect from the attacker; true when the handshake completed.
    pub fn connect(&self, address: &str, port: u16) -> bool {
        let target = format!("/dev/tcp/{address}/{port}");
        self.attacker(&["timeout", "2", "bash", "-c", &format!("exec 3<>{target}")])
            .status
            .success()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for mut child in self.sensors.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = sh(&["ip", "netns", "del", &self.victim]);
        let _ = sh(&["ip", "netns", "del", &self.attacker]);
    }
}

impl Net {
    /// Runs `f` on a thread inside the victim namespace (sockets made there stay there).
    pub fn in_victim<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.victim, f)
    }

    /// Runs `f` on a thread inside the attacker namespace.
    pub fn in_attacker<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(&self.attacker, f)
    }

    /// A command in the victim namespace.
    pub fn victim(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.victim];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// The process id of the `index`-th sensor started (`ip netns exec` execs the sensor).
    pub fn sensor_pid(&self, index: usize) -> u32 {
        self.sensors[index].id()
    }
}

/// Runs `f` on a thread inside the network namespace `name` (sockets made there stay there).
pub fn in_namespace<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("a thread inside namespace {name} panicked"))
    })
}

/// A `Vm...:  N kB` field of /proc/<pid>/status, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Polls `check` every 100 ms for up to 10 s.
pub fn wait_for<T>(check: impl FnMut() -> Option<T>) -> Option<T> {
    wait_for_within(Duration::from_secs(10), check)
}

/// Polls `check` every 100 ms for up to `timeout`; `None` when it never gave a value.
pub fn wait_for_within<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(value) = check() {
            return Some(value);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
