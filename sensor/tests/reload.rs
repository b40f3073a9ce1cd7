//! The sensor follows its config file as the kubelet updates a ConfigMap volume: the new
//! content appears by an atomic swap of the `..data` symlink, and the running sensor rebinds
//! its decoys without a restart; a broken file leaves it running on the previous config.
//! Needs no privileges: decoys on free high ports, connections only over loopback.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const SENSOR: &str = env!("CARGO_BIN_EXE_portsentry-sensor");

/// A ConfigMap volume as the kubelet lays it out: `<dir>/..<stamp>/portsentry.conf`,
/// `..data -> ..<stamp>`, `portsentry.conf -> ..data/portsentry.conf`.
struct Volume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl Volume {
    fn new(config: &str) -> Self {
        let volume = Self {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        let first = volume.write_generation(0, config);
        symlink(&first, volume.dir.path().join("..data")).unwrap();
        symlink(
            "..data/portsentry.conf",
            volume.dir.path().join("portsentry.conf"),
        )
        .unwrap();
        volume
    }

    fn write_generation(&self, generation: u32, config: &str) -> String {
        let name = format!("..2026_11_26_00_00_{generation:02}.000000001");
        std::fs::create_dir(self.dir.path().join(&name)).unwrap();
        std::fs::write(self.dir.path().join(&name).join("portsentry.conf"), config).unwrap();
        name
    }

    /// The kubelet's update: a new timestamped folder, a `..data_tmp` symlink to it, renamed
    /// over `..data` (atomic), then the old folder removed.
    fn swap(&mut self, config: &str) {
        let old = std::fs::read_link(self.dir.path().join("..data")).unwrap();
        self.generation += 1;
        let next = self.write_generation(self.generation, config);
        let tmp = self.dir.path().join("..data_tmp");
        symlink(&next, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.path().join(old)).unwrap();
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("portsentry.conf")
    }
}

/// `N` distinct free ports of 127.0.0.1 (bound together, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

fn config(state: &Path, ports: u16) -> String {
    format!(
        "TCP_PORTS=\"{ports}\"\nUDP_PORTS=\"\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\nBLOCK_UDP=\"0\"\nHISTORY_FILE=\"{}\"\nBLOCKED_FILE=\"{}\"\n",
        state.join("history").display(),
        state.join("blocked").display(),
    )
}

/// The sensor in connect mode on the volume's config; killed on drop.
struct Sensor {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Sensor {
    fn start(volume: &Volume, metrics_port: u16) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
        let log = volume.dir.path().join("sensor.log");
        let child = Command::new(SENSOR)
            .arg("-tcp")
            .arg("--config")
            .arg(volume.config_path())
            .arg(format!("--metrics-addr={metrics}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let sensor = Self {
            child,
            metrics,
            log,
        };
        sensor.wait("the sensor to start", || {
            sensor
                .log()
                .contains("PortSentry is now active and listening")
        });
        sensor
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let mut stream = TcpStream::connect(self.metrics).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: sensor\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sensor log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

#[test]
fn a_config_map_update_moves_the_decoys_without_a_restart() {
    let [old_port, new_port, metrics] = free_ports();
    let state = tempfile::tempdir().unwrap();
    let mut volume = Volume::new(&config(state.path(), old_port));
    let sensor = Sensor::start(&volume, metrics);
    let pid = sensor.child.id();
    assert!(listening(old_port), "{}", sensor.log());
    assert!(!listening(new_port));

    volume.swap(&config(state.path(), new_port));
    sensor.wait("the new decoy to listen", || listening(new_port));
    sensor.wait("the old decoy to close", || !listening(old_port));
    assert_eq!(sensor.child.id(), pid);
    assert_eq!(
        sensor.metric(r#"portsentry_sensor_config_reloads_total{result="applied"}"#),
        Some(1.0)
    );
    assert!(
        sensor
            .log()
            .contains("reloaded: 1 decoy(s) opened, 1 closed"),
        "{}",
        sensor.log()
    );
}

#[test]
fn a_broken_config_keeps_the_running_decoys_and_names_file_line_and_key() {
    let [port, other, metrics] = free_ports();
    let state = tempfile::tempdir().unwrap();
    let mut volume = Volume::new(&config(state.path(), port));
    let sensor = Sensor::start(&volume, metrics);
    assert!(listening(port), "{}", sensor.log());

    volume.swap(&format!("TCP_PORTS=\"{other}\"\nBLOK_TCP=\"1\"\n"));
    sensor.wait("the invalid config to be counted", || {
        sensor.metric(r#"portsentry_sensor_config_reloads_total{result="invalid"}"#) == Some(1.0)
    });
    let log = sensor.log();
    assert!(
        log.contains(&format!(
            "{}:2: BLOK_TCP: unknown key",
            volume.config_path().display()
        )),
        "{log}"
    );
    assert!(
        log.contains("still running on the previous config"),
        "{log}"
    );
    assert!(listening(port), "the running decoy closed:\n{log}");
}
