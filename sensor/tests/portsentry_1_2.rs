//! Side by side with PortSentry 1.2 (Debian's `portsentry` 1.2-14): the same config and the
//! same probes, in namespaces of their own, must give the same `attackalert:` lines and the
//! same banners. 1.2 logs through syslog: it runs in a private mount namespace whose
//! `/dev/log` is a datagram socket this test owns. Where 1.2 is not installed, the sensor is
//! compared with 1.2's lines as recorded here (and where it is, the recording is checked too).

mod common;

use std::{
    fs,
    io::Read,
    net::{TcpStream, UdpSocket},
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Net, must, prerequisites, wait_for};

const PORTSENTRY: &str = "/usr/sbin/portsentry";

/// 1.2's lines for three datagrams to UDP decoy 11 (`-udp`), recorded from 1.2-14.
const UDP_MODE: &[&str] = &[
    "attackalert: Connect from host: ATTACKER/ATTACKER to UDP port: 11",
    "attackalert: Host ATTACKER has been blocked via dropped route using command: \"DIR/block ATTACKER\"",
    "attackalert: Connect from host: ATTACKER/ATTACKER to UDP port: 11",
    "attackalert: Host: ATTACKER is already blocked. Ignoring",
    "attackalert: Connect from host: ATTACKER/ATTACKER to UDP port: 11",
    "attackalert: Host: ATTACKER is already blocked. Ignoring",
];

/// 1.2's lines for three connections to TCP decoy 79 (`-tcp`), recorded from 1.2-14.
const TCP_MODE: &[&str] = &[
    "attackalert: Connect from host: ATTACKER/ATTACKER to TCP port: 79",
    "attackalert: Host ATTACKER has been blocked via dropped route using command: \"DIR/block ATTACKER\"",
    "attackalert: Connect from host: ATTACKER/ATTACKER to TCP port: 79",
    "attackalert: Host: ATTACKER is already blocked. Ignoring",
    "attackalert: Connect from host: ATTACKER/ATTACKER to TCP port: 79",
    "attackalert: Host: ATTACKER is already blocked. Ignoring",
];

/// 1.2's lines for two datagrams to UDP port 11 in `-sudp`, recorded from 1.2-14.
const SUDP_MODE: &[&str] = &[
    "attackalert: UDP scan from host: ATTACKER/ATTACKER to UDP port: 11",
    "attackalert: Host ATTACKER has been blocked via dropped route using command: \"DIR/block ATTACKER\"",
    "attackalert: UDP scan from host: ATTACKER/ATTACKER to UDP port: 11",
    "attackalert: Host: ATTACKER/ATTACKER is already blocked Ignoring",
];

/// 1.2's lines for two SYNs to TCP port 79 in `-stcp`, recorded from 1.2-14.
const STCP_MODE: &[&str] = &[
    "attackalert: TCP SYN/Normal scan from host: ATTACKER/ATTACKER to TCP port: 79",
    "attackalert: Host ATTACKER has been blocked via dropped route using command: \"DIR/block ATTACKER\"",
    "attackalert: TCP SYN/Normal scan from host: ATTACKER/ATTACKER to TCP port: 79",
    "attackalert: Host: ATTACKER/ATTACKER is already blocked Ignoring",
];

const BANNER: &str = "** UNAUTHORIZED ACCESS PROHIBITED **";

/// How long the KILL_ROUTE script takes: an answer sooner came before the block.
const BLOCK_TAKES: Duration = Duration::from_millis(1500);

/// A config both read: 1.2 ignores `BAN_UNVERIFIED`, which lets the sensor block on UDP and
/// raw-mode evidence as 1.2 does. The KILL_ROUTE script sleeps, then succeeds without
/// blocking anything, so the later probes still arrive.
fn config(dir: &Path) -> String {
    let block = dir.join("block");
    fs::write(
        &block,
        format!("#!/bin/sh\nsleep {}\n", BLOCK_TAKES.as_secs_f32()),
    )
    .expect("write block script");
    fs::set_permissions(&block, fs::Permissions::from_mode(0o755)).expect("chmod");
    let ignore = dir.join("portsentry.ignore");
    fs::write(&ignore, "").expect("write ignore");
    format!(
        "TCP_PORTS=\"1,11,79\"\nUDP_PORTS=\"1,11,69\"\nIGNORE_FILE=\"{ignore}\"\n\
         HISTORY_FILE=\"{dir}/portsentry.history\"\nBLOCKED_FILE=\"{dir}/portsentry.blocked\"\n\
         RESOLVE_HOST=\"0\"\nBLOCK_TCP=\"1\"\nBLOCK_UDP=\"1\"\nSCAN_TRIGGER=\"0\"\n\
         KILL_ROUTE=\"{block} $TARGET$\"\nPORT_BANNER=\"{BANNER}\"\nBAN_UNVERIFIED=\"1\"\n",
        ignore = ignore.display(),
        dir = dir.display(),
        block = block.display(),
    )
}

/// `attackalert:` lines with the attacker's address and the test folder made generic.
fn normalized(lines: &[String], attacker: &str, dir: &Path) -> Vec<String> {
    lines
        .iter()
        .filter_map(|line| Some(&line[line.find("attackalert: ")?..]))
        .map(|line| {
            line.trim_end()
                .replace(&dir.display().to_string(), "DIR")
                .replace(attacker, "ATTACKER")
        })
        .collect()
}

/// A syslog daemon of the test's own: lines sent to `<dir>/dev/log`.
struct Syslog {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Syslog {
    fn bind(dev: &Path) -> Self {
        fs::create_dir_all(dev).expect("dev folder");
        let socket = UnixDatagram::bind(dev.join("log")).expect("bind log socket");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buffer) {
                let line = String::from_utf8_lossy(&buffer[..n]).into_owned();
                sink.lock().expect("lock").push(line);
            }
        });
        Self { lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }
}

/// One defender in a lab of its own: PortSentry 1.2 or the sensor.
struct Defender {
    net: Net,
    dir: PathBuf,
    syslog: Option<Syslog>,
}

impl Defender {
    /// Debian's portsentry `mode` in the victim namespace, `/dev/log` and `/etc/portsentry`
    /// replaced by this test's in a private mount namespace.
    fn portsentry_1_2(index: u8, mode: &str) -> Self {
        let net = Net::new(index);
        let dir = net.path("peer");
        let (dev, etc) = (dir.join("dev"), dir.join("etc"));
        fs::create_dir_all(&etc).expect("etc folder");
        let syslog = Syslog::bind(&dev);
        fs::write(etc.join("portsentry.conf"), config(&dir)).expect("write config");
        let (dev, etc) = (dev.display(), etc.display());
        let script = format!(
            "touch {dev}/null && mount --bind /dev/null {dev}/null && mount --rbind {dev} /dev \
             && mount --bind {etc} /etc/portsentry && exec {PORTSENTRY} {mode}"
        );
        must(&[
            "ip",
            "netns",
            "exec",
            &net.victim,
            "unshare",
            "-m",
            "sh",
            "-c",
            &script,
        ]);
        let defender = Self {
            net,
            dir,
            syslog: Some(syslog),
        };
        defender.wait_line("adminalert: PortSentry is now active and listening.");
        defender
    }

    /// The sensor with the same config, logging to stderr.
    fn sensor(index: u8, mode: &str) -> Self {
        let mut net = Net::new(index);
        let dir = net.dir.path().to_owned();
        net.start(&config(&dir), &[mode]);
        Self {
            net,
            dir,
            syslog: None,
        }
    }

    fn lines(&self) -> Vec<String> {
        match &self.syslog {
            Some(syslog) => syslog.lines(),
            None => self.net.log().lines().map(str::to_owned).collect(),
        }
    }

    fn wait_line(&self, needle: &str) {
        wait_for(|| {
            self.lines()
                .iter()
                .any(|l| l.contains(needle))
                .then_some(())
        })
        .unwrap_or_else(|| panic!("never logged `{needle}`:\n{:#?}", self.lines()));
    }

    /// Waits until `count` `attackalert:` lines were logged, then a little longer for any
    /// line that should not come; returns them normalized.
    fn attack_lines(&self, count: usize) -> Vec<String> {
        let attacker = self.net.v4.1.clone();
        let current = || normalized(&self.lines(), &attacker, &self.dir);
        wait_for(|| (current().len() >= count).then_some(()));
        std::thread::sleep(Duration::from_millis(300));
        current()
    }

    /// A datagram from the attacker to `port`; the answer and how long it took, if one came.
    fn datagram(&self, port: u16) -> Option<(String, Duration)> {
        let victim = self.net.v4.0.clone();
        self.net.in_attacker(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_millis(800)))
                .expect("timeout");
            let sent = Instant::now();
            socket
                .send_to(b"hello", (victim.as_str(), port))
                .expect("send");
            let mut buffer = [0u8; 512];
            let n = socket.recv(&mut buffer).ok()?;
            Some((
                String::from_utf8_lossy(&buffer[..n]).into_owned(),
                sent.elapsed(),
            ))
        })
    }

    /// A connection from the attacker to `port`; what the decoy wrote before closing.
    fn connect(&self, port: u16) -> String {
        let victim = self.net.v4.0.clone();
        self.net.in_attacker(move || {
            let Ok(mut stream) = TcpStream::connect((victim.as_str(), port)) else {
                return String::new();
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    }

    /// Waits until the first probe's block ran (its KILL_ROUTE takes [`BLOCK_TAKES`]).
    fn wait_blocked(&self) {
        let attacker = self.net.v4.1.clone();
        wait_for(|| {
            self.lines()
                .iter()
                .any(|l| l.contains(&format!("Host {attacker} has been blocked")))
                .then_some(())
        })
        .unwrap_or_else(|| panic!("never blocked:\n{:#?}", self.lines()));
    }
}

impl Drop for Defender {
    /// 1.2 daemonizes: its process is found in the victim namespace and ended by its pid.
    fn drop(&mut self) {
        if self.syslog.is_none() {
            return;
        }
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.net.victim])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            if fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "portsentry")
            {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
    }
}

/// Whether Debian's portsentry can be run side by side (else the recorded lines are used).
fn live_1_2() -> bool {
    let live = Path::new(PORTSENTRY).exists();
    if !live {
        eprintln!("{PORTSENTRY} is not installed: comparing with 1.2's recorded lines");
    }
    live
}

/// Runs `probe` against the sensor and, where installed, against 1.2; the sensor's lines
/// must equal 1.2's, and 1.2's the recording. Returns what each probe run returned (`None`
/// when the test cannot run here).
fn side_by_side<T>(
    index: u8,
    mode: &str,
    recorded: &[&str],
    probe: impl Fn(&Defender) -> T,
) -> Option<(T, Option<T>)> {
    if !prerequisites(&["ip", "unshare"]) {
        return None;
    }
    let sensor = Defender::sensor(index, mode);
    let ours = probe(&sensor);
    let our_lines = sensor.attack_lines(recorded.len());
    drop(sensor);
    let theirs = live_1_2().then(|| {
        let peer = Defender::portsentry_1_2(index + 1, mode);
        let theirs = probe(&peer);
        let their_lines = peer.attack_lines(recorded.len());
        assert_eq!(
            their_lines, recorded,
            "1.2 no longer logs what was recorded"
        );
        assert_eq!(
            our_lines, their_lines,
            "the sensor's lines differ from 1.2's"
        );
        theirs
    });
    assert_eq!(our_lines, recorded, "the sensor's lines differ from 1.2's");
    Some((ours, theirs))
}

#[test]
fn udp_decoy_hits_are_logged_as_1_2s_udp_mode_logs_them() {
    side_by_side(90, "-udp", UDP_MODE, |d| {
        d.datagram(11);
        d.wait_blocked();
        d.datagram(11);
        d.datagram(11);
    });
}

#[test]
fn a_udp_decoy_answers_each_alarming_datagram_with_the_banner_before_blocking() {
    let probe = |d: &Defender| {
        let first = d.datagram(11);
        d.wait_blocked();
        (first, d.datagram(11))
    };
    let Some((ours, theirs)) = side_by_side(92, "-udp", &UDP_MODE[..4], probe) else {
        return;
    };
    for (first, again) in std::iter::once(ours).chain(theirs) {
        let (text, took) = first.expect("no banner for the first datagram");
        assert_eq!(text, BANNER);
        assert!(
            took < BLOCK_TAKES,
            "the banner came after the block: {took:?}"
        );
        assert_eq!(again.map(|(text, _)| text).as_deref(), Some(BANNER));
    }
}

#[test]
fn tcp_decoy_hits_from_a_blocked_host_are_logged_as_1_2_logs_them() {
    let probe = |d: &Defender| {
        let first = d.connect(79);
        d.wait_blocked();
        [first, d.connect(79), d.connect(79)]
    };
    let Some((ours, theirs)) = side_by_side(94, "-tcp", TCP_MODE, probe) else {
        return;
    };
    for banners in std::iter::once(ours).chain(theirs) {
        assert_eq!(banners, [BANNER, BANNER, BANNER]);
    }
}

#[test]
fn sudp_hits_keep_1_2s_udp_scan_label_and_already_blocked_line() {
    side_by_side(96, "-sudp", SUDP_MODE, |d| {
        d.datagram(11);
        d.wait_blocked();
        d.datagram(11);
    });
}

#[test]
fn stcp_hits_from_a_blocked_host_are_logged_as_1_2s_stealth_mode_logs_them() {
    side_by_side(98, "-stcp", STCP_MODE, |d| {
        d.connect(79);
        d.wait_blocked();
        d.connect(79);
    });
}
