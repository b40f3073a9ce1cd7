//! Config reload: the sensor follows its config file (in a pod, the ConfigMap the operator
//! renders) without a restart.
//!
//! ```text
//!  every INTERVAL: read --config ──same bytes──▶ nothing
//!                        │ changed
//!                        ▼
//!                  Config::parse ──error──▶ keep running on the old config; log file:line: key,
//!                        │ ok               reloads_total{result="invalid"}
//!                        ▼
//!                  delta(old decoys, new decoys) ──▶ close removed listeners, bind added ones
//!                  detection or response keys changed ──▶ engine and responder retuned
//!                  keys not applied live ──▶ logged: they take effect at the next restart
//! ```
//!
//! The kubelet updates a ConfigMap volume by swapping a `..data` symlink, so inotify on the
//! file itself misses updates: the content is polled instead (a small file, every 2 s).
//! Live: the connect-mode decoys ([`DECOY_KEYS`]) unless raw modes or the kernel tripwire
//! pinned the port lists at start; the detection settings ([`DETECTION_KEYS`]: trigger,
//! window, ban durations and escalation, trust switch) and the responses ([`RESPONSE_KEYS`]:
//! BLOCK_* levels, KILL_* actions, history file) unless the config asks for the kernel
//! tripwire, which is armed from them. The ignore file is re-read by the maintenance task when it changes. Everything else
//! (native nftables, tripwire, blocked files, state bound, banner of running listeners, raw
//! modes' ranges) is reported as needing a restart.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use portsentry_crds::Protocol;
use prometheus::{IntCounterVec, Opts};
use tokio::task::JoinHandle;

use crate::{
    alert::{Alerts, Fields, lines},
    config::{Config, Mode},
    error::Result,
    listen::{self, Decoy, HitSink},
    metrics::Metrics,
};

/// How often the config file is read for changes.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Decoy keys a reload applies without a restart: listeners are opened and closed.
pub const DECOY_KEYS: &[&str] = &["TCP_PORTS", "UDP_PORTS"];

/// Detection keys a reload applies without a restart: the engine judges the next hits by them.
pub const DETECTION_KEYS: &[&str] = &[
    "SCAN_TRIGGER",
    "SCAN_WINDOW",
    "SCAN_DISTINCT_PORTS",
    "BAN_UNVERIFIED",
    "BAN_DURATION",
    "BAN_MAX_DURATION",
    "BAN_ESCALATION_WINDOW",
];

/// Response keys a reload applies without a restart: the next alarms are answered by them.
pub const RESPONSE_KEYS: &[&str] = &[
    "BLOCK_TCP",
    "BLOCK_UDP",
    "KILL_ROUTE",
    "KILL_HOSTS_DENY",
    "HOSTS_DENY_FILE",
    "KILL_RUN_CMD",
    "KILL_RUN_CMD_FIRST",
    "HISTORY_FILE",
];

/// What the start fixed, so that only a restart changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Every live key is live.
    Nothing,
    /// The port lists: raw modes watch them in the capture thread, or the kernel tripwire
    /// holds the decoy ports it was armed with (a port closed live would stay in it and ban
    /// clients of whatever binds the port next).
    Ports,
    /// Everything: the config asks for the kernel tripwire, which is armed from the port
    /// lists, the ban settings and the block levels and bans in the packet path by them.
    Everything,
}

impl Pinned {
    /// Whether a change of `key` applies without a restart.
    fn live(self, key: &str) -> bool {
        let tuning = DETECTION_KEYS.contains(&key) || RESPONSE_KEYS.contains(&key);
        match self {
            Self::Nothing => tuning || DECOY_KEYS.contains(&key),
            Self::Ports => tuning,
            Self::Everything => false,
        }
    }
}

/// The running engine and responder, as a reload sees them.
pub trait Retune: Send + Sync {
    /// Judges the next hits by `config`'s detection settings and answers the next alarms
    /// with its responses.
    fn retune(&self, config: &Config);
}

/// A decoy: protocol and port.
pub type Key = (Protocol, u16);

/// The connect-mode decoys `config` asks for under `modes`.
pub fn connect_decoys(config: &Config, modes: &[Mode]) -> BTreeSet<Key> {
    modes
        .iter()
        .flat_map(|mode| {
            portsentry_crds::expand(config.ports(*mode))
                .into_iter()
                .map(move |port| (mode.protocol(), port))
        })
        .collect()
}

/// What a reload changes in the listeners.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub bind: Vec<Key>,
    pub close: Vec<Key>,
}

/// Listeners to open and to close to go from decoys `old` to `new`.
pub fn delta(old: &BTreeSet<Key>, new: &BTreeSet<Key>) -> Delta {
    Delta {
        bind: new.difference(old).copied().collect(),
        close: old.difference(new).copied().collect(),
    }
}

/// Keys whose value differs between `old` and `new` (added, removed or changed).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let value = |config: &Config, key: &str| config.entries.get(key).map(|e| e.value.clone());
    let keys: BTreeSet<&String> = old.entries.keys().chain(new.entries.keys()).collect();
    keys.into_iter()
        .filter(|key| value(old, key) != value(new, key))
        .cloned()
        .collect()
}

/// Changed keys only a restart applies, given what the start `pinned`.
pub fn restart_keys(old: &Config, new: &Config, pinned: Pinned) -> Vec<String> {
    changed_keys(old, new)
        .into_iter()
        .filter(|key| !pinned.live(key))
        .collect()
}

/// A fingerprint of the file's bytes: a changed file is one with another fingerprint.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The decoys' listener tasks, by decoy: a reload aborts a task to close its socket.
pub struct Listeners {
    tasks: BTreeMap<Key, Vec<JoinHandle<()>>>,
    sink: Arc<dyn HitSink>,
    banner: Option<Arc<str>>,
    udp_banner: Option<listen::UdpBanner>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("served", &self.served())
            .finish_non_exhaustive()
    }
}

impl Listeners {
    pub fn new(sink: Arc<dyn HitSink>, banner: Option<Arc<str>>) -> Self {
        Self {
            tasks: BTreeMap::new(),
            sink,
            udp_banner: banner.clone().map(listen::UdpBanner::new),
            banner,
        }
    }

    /// Serves `decoy` on a task of its own.
    pub fn spawn(&mut self, decoy: Decoy) {
        let sink = self.sink.clone();
        let (key, task) = match decoy {
            Decoy::Tcp(port, _, listener) => {
                let banner = self.banner.clone();
                let task = tokio::spawn(async move {
                    if let Err(error) = listen::serve_tcp(listener, port, banner, sink).await {
                        tracing::error!(port, %error, "TCP decoy stopped");
                    }
                });
                ((Protocol::Tcp, port), task)
            }
            Decoy::Udp(port, _, socket) => {
                let banner = self.udp_banner.clone();
                let task = tokio::spawn(async move {
                    if let Err(error) = listen::serve_udp(socket, port, banner, sink).await {
                        tracing::error!(port, %error, "UDP decoy stopped");
                    }
                });
                ((Protocol::Udp, port), task)
            }
        };
        self.tasks.entry(key).or_default().push(task);
    }

    /// Stops serving `key`: its sockets close.
    pub fn close(&mut self, key: Key) {
        for task in self.tasks.remove(&key).unwrap_or_default() {
            task.abort();
        }
    }

    /// The decoys being served.
    pub fn served(&self) -> BTreeSet<Key> {
        self.tasks.keys().copied().collect()
    }
}

/// What the reload task follows and acts on.
pub struct Reload {
    pub path: PathBuf,
    pub config: Config,
    /// Connect modes: the decoys a reload rebinds.
    pub modes: Vec<Mode>,
    /// What the start fixed: changes to it need a restart.
    pub pinned: Pinned,
    pub listeners: Listeners,
    pub retune: Arc<dyn Retune>,
    pub alerts: Arc<Alerts>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload")
            .field("path", &self.path)
            .field("modes", &self.modes)
            .field("pinned", &self.pinned)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

/// `reloads_total{result}` with result `applied`, `invalid` or `unreadable`.
fn reload_counter(metrics: &Metrics) -> Result<IntCounterVec> {
    let counter = IntCounterVec::new(
        Opts::new(
            "config_reloads_total",
            "Config file changes seen, by result (applied, invalid: kept the previous config, unreadable)",
        ),
        &["result"],
    )?;
    for result in ["applied", "invalid", "unreadable"] {
        counter.with_label_values(&[result]);
    }
    metrics.register(Box::new(counter.clone()))?;
    Ok(counter)
}

/// Starts following the config file (spawned; runs until the process ends).
pub fn start(reload: Reload, metrics: &Metrics) -> Result<()> {
    let counter = reload_counter(metrics)?;
    tokio::spawn(follow(reload, counter));
    Ok(())
}

async fn follow(mut reload: Reload, counter: IntCounterVec) {
    // Read once more at start: a change between the first load and now is then applied.
    let mut last = None;
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let bytes = match tokio::fs::read(&reload.path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                // Mid-swap or removed: the old config stays; say so once per change.
                if last.take().is_some() {
                    counter.with_label_values(&["unreadable"]).inc();
                    reload.alerts.emit(
                        &format!(
                            "adminalert: WARNING: cannot read config file {}: {error}; keeping the running config",
                            reload.path.display()
                        ),
                        Fields::new("config_unreadable"),
                    );
                }
                continue;
            }
        };
        let now = fingerprint(&bytes);
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        let text = String::from_utf8_lossy(&bytes);
        match Config::parse(&reload.path, &text) {
            // Same settings written again (comments, order, a fresh ConfigMap generation).
            Ok(config) if config.entries == reload.config.entries => {}
            Ok(config) => {
                counter.with_label_values(&["applied"]).inc();
                apply(&mut reload, config);
            }
            Err(error) => {
                counter.with_label_values(&["invalid"]).inc();
                reload.alerts.emit(
                    &format!(
                        "adminalert: ERROR: config not reloaded: {error}; still running on the previous config"
                    ),
                    Fields::new("config_invalid"),
                );
            }
        }
    }
}

/// Rebinds the connect-mode decoys to `config` and reports what only a restart applies.
fn apply(reload: &mut Reload, config: Config) {
    let wanted = if reload.pinned != Pinned::Nothing {
        reload.listeners.served()
    } else {
        connect_decoys(&config, &reload.modes)
    };
    let change = delta(&reload.listeners.served(), &wanted);
    for key in &change.close {
        reload.listeners.close(*key);
    }
    let (bound, skipped) = listen::bind_all(&change.bind);
    for skip in &skipped {
        reload.alerts.emit(
            &lines::cannot_bind(
                skip.protocol,
                skip.port,
                skip.family.as_str(),
                &skip.error.to_string(),
            ),
            Fields::new("cannot_bind").port(skip.protocol, skip.port),
        );
    }
    let mut opened = BTreeSet::new();
    for decoy in bound {
        let key = match &decoy {
            Decoy::Tcp(port, ..) => (Protocol::Tcp, *port),
            Decoy::Udp(port, ..) => (Protocol::Udp, *port),
        };
        if opened.insert(key) {
            reload.alerts.emit(
                &lines::listening(key.0, key.1),
                Fields::new("listening").port(key.0, key.1),
            );
        }
        reload.listeners.spawn(decoy);
    }
    let changed = changed_keys(&reload.config, &config);
    let retuned: Vec<&str> = changed
        .iter()
        .map(String::as_str)
        .filter(|key| !DECOY_KEYS.contains(key) && reload.pinned.live(key))
        .collect();
    if !retuned.is_empty() {
        reload.retune.retune(&config);
    }
    let restart = restart_keys(&reload.config, &config, reload.pinned);
    let retuned = if retuned.is_empty() {
        String::new()
    } else {
        format!("; {} applied to the next hits", retuned.join(", "))
    };
    reload.alerts.emit(
        &format!(
            "adminalert: Config file {} reloaded: {} decoy(s) opened, {} closed{retuned}",
            reload.path.display(),
            opened.len(),
            change.close.len()
        ),
        Fields::new("config_reloaded"),
    );
    if !restart.is_empty() {
        reload.alerts.emit(
            &format!(
                "adminalert: WARNING: changed {} take effect at the next restart",
                restart.join(", ")
            ),
            Fields::new("config_restart_needed"),
        );
    }
    reload.config = config;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/etc/portsentry/portsentry.conf"), text).unwrap()
    }

    #[test]
    fn the_delta_opens_added_decoys_and_closes_removed_ones() {
        let old = connect_decoys(
            &config("TCP_PORTS=\"1,31337\"\nUDP_PORTS=\"7\"\n"),
            &[Mode::Tcp, Mode::Udp],
        );
        let new = connect_decoys(
            &config("TCP_PORTS=\"31337,40000-40001\"\nUDP_PORTS=\"7\"\n"),
            &[Mode::Tcp, Mode::Udp],
        );
        assert_eq!(
            delta(&old, &new),
            Delta {
                bind: vec![(Protocol::Tcp, 40000), (Protocol::Tcp, 40001)],
                close: vec![(Protocol::Tcp, 1)],
            }
        );
        assert_eq!(delta(&new, &new), Delta::default());
    }

    #[test]
    fn only_the_modes_running_have_decoys() {
        let decoys = connect_decoys(&config("TCP_PORTS=\"1\"\nUDP_PORTS=\"7\"\n"), &[Mode::Udp]);
        assert_eq!(decoys, BTreeSet::from([(Protocol::Udp, 7)]));
    }

    #[test]
    fn keys_other_than_decoys_detection_and_responses_are_reported_as_needing_a_restart() {
        let old = config("TCP_PORTS=\"1\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\n");
        let new = config(
            "TCP_PORTS=\"2\"\nSCAN_TRIGGER=\"2\"\nRESOLVE_HOST=\"0\"\nBLOCK_TCP=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\nSTATE_MAX_SOURCES=\"10\"\n",
        );
        assert_eq!(
            restart_keys(&old, &new, Pinned::Nothing),
            ["RESOLVE_HOST", "STATE_MAX_SOURCES"]
        );
    }

    #[test]
    fn pinned_ports_leave_detection_and_responses_live() {
        let old = config("TCP_PORTS=\"1\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\n");
        let new = config("TCP_PORTS=\"2\"\nSCAN_TRIGGER=\"2\"\nBLOCK_TCP=\"1\"\n");
        assert_eq!(restart_keys(&old, &new, Pinned::Ports), ["TCP_PORTS"]);
    }

    #[test]
    fn a_start_pinning_everything_reports_every_changed_key_as_needing_a_restart() {
        let old = config("TCP_PORTS=\"1\"\nSCAN_TRIGGER=\"0\"\nBLOCK_TCP=\"0\"\n");
        let new = config("TCP_PORTS=\"2\"\nSCAN_TRIGGER=\"2\"\nBLOCK_TCP=\"1\"\n");
        assert_eq!(
            restart_keys(&old, &new, Pinned::Everything),
            ["BLOCK_TCP", "SCAN_TRIGGER", "TCP_PORTS"]
        );
    }

    /// Records the scan triggers it was retuned to.
    #[derive(Default)]
    struct Triggers(std::sync::Mutex<Vec<u32>>);

    impl Retune for Triggers {
        fn retune(&self, config: &Config) {
            self.0.lock().unwrap().push(config.scan_trigger);
        }
    }

    #[tokio::test]
    async fn a_reload_retunes_the_engine_when_a_detection_key_changes() {
        let triggers = Arc::new(Triggers::default());
        let mut reload = reload_of(config("SCAN_TRIGGER=\"0\"\n"), Pinned::Nothing);
        reload.retune = triggers.clone();
        apply(&mut reload, config("SCAN_TRIGGER=\"3\"\n"));
        assert_eq!(*triggers.0.lock().unwrap(), [3]);
    }

    #[tokio::test]
    async fn a_reload_retunes_the_responses_when_a_kill_action_changes() {
        let triggers = Arc::new(Triggers::default());
        let mut reload = reload_of(config("SCAN_TRIGGER=\"1\"\n"), Pinned::Ports);
        reload.retune = triggers.clone();
        apply(
            &mut reload,
            config("SCAN_TRIGGER=\"1\"\nKILL_RUN_CMD=\"/bin/true\"\n"),
        );
        assert_eq!(*triggers.0.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn a_reload_leaves_the_engine_alone_when_no_detection_key_changes() {
        let triggers = Arc::new(Triggers::default());
        let mut reload = reload_of(config("SCAN_TRIGGER=\"2\"\n"), Pinned::Nothing);
        reload.retune = triggers.clone();
        apply(
            &mut reload,
            config("SCAN_TRIGGER=\"2\"\nRESOLVE_HOST=\"0\"\n"),
        );
        assert!(triggers.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_armed_tripwire_leaves_the_engine_for_a_restart() {
        let triggers = Arc::new(Triggers::default());
        let mut reload = reload_of(config("SCAN_TRIGGER=\"0\"\n"), Pinned::Everything);
        reload.retune = triggers.clone();
        apply(&mut reload, config("SCAN_TRIGGER=\"3\"\n"));
        assert!(triggers.0.lock().unwrap().is_empty());
    }

    struct NoSink;

    impl HitSink for NoSink {
        fn hit(&self, _: crate::packet::Hit) -> bool {
            false
        }
    }

    fn reload_of(config: Config, pinned: Pinned) -> Reload {
        Reload {
            path: config.path.clone(),
            config,
            modes: vec![Mode::Tcp],
            pinned,
            listeners: Listeners::new(Arc::new(NoSink), None),
            retune: Arc::new(Triggers::default()),
            alerts: Arc::new(Alerts::stderr()),
        }
    }

    /// A port nothing listens on now (bound and released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn a_reload_binds_the_new_port_list() {
        let port = free_port();
        let mut reload = reload_of(config("TCP_PORTS=\"\"\n"), Pinned::Nothing);
        apply(&mut reload, config(&format!("TCP_PORTS=\"{port}\"\n")));
        assert_eq!(
            reload.listeners.served(),
            BTreeSet::from([(Protocol::Tcp, port)])
        );
        assert_eq!(reload.config.tcp_ports.len(), 1);
    }

    #[tokio::test]
    async fn pinned_port_lists_are_left_for_a_restart() {
        let port = free_port();
        let mut reload = reload_of(config("TCP_PORTS=\"\"\n"), Pinned::Ports);
        apply(&mut reload, config(&format!("TCP_PORTS=\"{port}\"\n")));
        assert!(reload.listeners.served().is_empty());
    }

    #[test]
    fn the_fingerprint_changes_with_the_content_only() {
        assert_eq!(
            fingerprint(b"TCP_PORTS=\"1\""),
            fingerprint(b"TCP_PORTS=\"1\"")
        );
        assert_ne!(
            fingerprint(b"TCP_PORTS=\"1\""),
            fingerprint(b"TCP_PORTS=\"2\"")
        );
    }
}
