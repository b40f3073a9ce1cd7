//! The sensor's Prometheus metrics and its readiness flag, rendered as the text exposition.
//! Labels are bounded: ports come from the configured decoy list, actions from a fixed set.
//! By default no series names a decoy port (`hits_total{protocol}`): whoever reaches the
//! metrics port would learn which ports are traps. `METRICS_PER_PORT="1"` adds the `port` label.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use portsentry_crds::Protocol;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::{error::Result, packet::Examined};

/// Probe kinds and their `kind` label.
const PROBE_KINDS: [(portsentry_crds::ProbeKind, &str); 10] = {
    use portsentry_crds::ProbeKind as K;
    [
        (K::Connect, "connect"),
        (K::Datagram, "datagram"),
        (K::Syn, "syn"),
        (K::Fin, "fin"),
        (K::Null, "null"),
        (K::Xmas, "xmas"),
        (K::Ack, "ack"),
        (K::Window, "window"),
        (K::Maimon, "maimon"),
        (K::Unknown, "unknown"),
    ]
};

/// Action names used as the `action` label.
pub const ACTIONS: &[&str] = &["hosts_deny", "route", "command", "nftables", "record"];

/// The sensor's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    alarms: IntCounterVec,
    protected: IntCounterVec,
    bans_active: IntGauge,
    bans_added: IntCounter,
    bans_expired: IntCounter,
    sources_tracked: IntGauge,
    evictions: IntCounter,
    evictions_seen: AtomicU64,
    action_failures: IntCounterVec,
    capture_drops: IntCounter,
    alarms_suppressed: IntCounter,
    alarms_dropped: IntCounter,
    /// The `hits_total` series of each listed port, fetched once: the capture path counts
    /// every packet, and a label lookup per packet would cost more than the packet.
    hit_series: HashMap<(Protocol, u16), IntCounter>,
    /// `hits_total{port="other"}` of TCP and UDP (advanced-mode ports are not listed), or
    /// without per-port series, `hits_total{protocol}` that every hit counts in.
    other_hits: [IntCounter; 2],
    probe_series: Vec<(portsentry_crds::ProbeKind, IntCounter)>,
    captured_series: Vec<(&'static str, IntCounter)>,
    ready: AtomicBool,
}

impl Metrics {
    /// Registers every metric, hits counted per protocol only (no decoy port is named).
    pub fn new() -> Result<Self> {
        Self::build(None)
    }

    /// Registers every metric with `hits_total` per decoy port (`METRICS_PER_PORT="1"`); the
    /// series of `tcp_ports` and `udp_ports` start at zero.
    pub fn per_port(tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        Self::build(Some((tcp_ports, udp_ports)))
    }

    fn build(ports: Option<(&[u16], &[u16])>) -> Result<Self> {
        let registry = Registry::new_custom(Some("portsentry_sensor".into()), None)?;
        let labels: &[&str] = if ports.is_some() {
            &["protocol", "port"]
        } else {
            &["protocol"]
        };
        let hits = IntCounterVec::new(
            Opts::new("hits_total", "Probes seen on decoy ports"),
            labels,
        )?;
        let alarms = IntCounterVec::new(
            Opts::new("alarms_total", "Sources that crossed the scan trigger"),
            &["protocol"],
        )?;
        let protected = IntCounterVec::new(
            Opts::new(
                "protected_hits_total",
                "Hits from sources never acted on (ignore list, loopback, own address)",
            ),
            &["reason"],
        )?;
        let bans_active = IntGauge::new("bans_active", "Sources banned now")?;
        let bans_added = IntCounter::new("bans_added_total", "Bans carried out")?;
        let bans_expired = IntCounter::new("bans_expired_total", "Bans lifted on expiry")?;
        let sources_tracked =
            IntGauge::new("sources_tracked", "Sources with detection state kept")?;
        let evictions = IntCounter::new(
            "source_evictions_total",
            "Sources evicted to keep state within STATE_MAX_SOURCES",
        )?;
        let action_failures = IntCounterVec::new(
            Opts::new("action_failures_total", "Response actions that failed"),
            &["action"],
        )?;
        let probes = IntCounterVec::new(
            Opts::new(
                "probes_total",
                "Probes seen, by kind (connect, datagram, syn, fin, ...)",
            ),
            &["kind"],
        )?;
        let captured = IntCounterVec::new(
            Opts::new(
                "captured_packets_total",
                "Packets read by the stealth/advanced capture, by what became of them",
            ),
            &["outcome"],
        )?;
        let capture_drops = IntCounter::new(
            "capture_drops_total",
            "Packets the kernel dropped because the capture socket's receive buffer was full",
        )?;
        let alarms_suppressed = IntCounter::new(
            "alarms_suppressed_total",
            "Alarms of first-seen sources with unverified evidence beyond the rate limit (spoofed floods)",
        )?;
        let alarms_dropped = IntCounter::new(
            "alarms_dropped_total",
            "Alarms dropped because the response queue was full",
        )?;
        registry.register(Box::new(probes.clone()))?;
        registry.register(Box::new(captured.clone()))?;
        registry.register(Box::new(capture_drops.clone()))?;
        registry.register(Box::new(alarms_suppressed.clone()))?;
        registry.register(Box::new(alarms_dropped.clone()))?;
        let captured_series = Examined::OUTCOMES
            .iter()
            .map(|outcome| (*outcome, captured.with_label_values(&[outcome])))
            .collect();
        let probe_series = PROBE_KINDS
            .iter()
            .map(|(kind, label)| (*kind, probes.with_label_values(&[label])))
            .collect();
        registry.register(Box::new(hits.clone()))?;
        registry.register(Box::new(alarms.clone()))?;
        registry.register(Box::new(protected.clone()))?;
        registry.register(Box::new(bans_active.clone()))?;
        registry.register(Box::new(bans_added.clone()))?;
        registry.register(Box::new(bans_expired.clone()))?;
        registry.register(Box::new(sources_tracked.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(action_failures.clone()))?;
        let mut hit_series = HashMap::new();
        let (tcp_ports, udp_ports) = ports.unwrap_or_default();
        for (protocol, ports) in [(Protocol::Tcp, tcp_ports), (Protocol::Udp, udp_ports)] {
            alarms.with_label_values(&[protocol.as_str()]);
            for port in ports {
                hit_series.insert(
                    (protocol, *port),
                    hits.with_label_values(&[protocol.as_str(), &port.to_string()]),
                );
            }
        }
        let other_hits = [Protocol::Tcp, Protocol::Udp].map(|protocol| {
            let series = match ports {
                Some(_) => hits.with_label_values(&[protocol.as_str(), "other"]),
                None => hits.with_label_values(&[protocol.as_str()]),
            };
            series.reset();
            series
        });
        for action in ACTIONS {
            action_failures.with_label_values(&[action]);
        }
        Ok(Self {
            registry,
            alarms,
            protected,
            bans_active,
            bans_added,
            bans_expired,
            sources_tracked,
            evictions,
            evictions_seen: AtomicU64::new(0),
            action_failures,
            capture_drops,
            alarms_suppressed,
            alarms_dropped,
            hit_series,
            other_hits,
            probe_series,
            captured_series,
            ready: AtomicBool::new(false),
        })
    }

    /// A probe on a decoy port; ports not listed at start (advanced modes) count as `other`,
    /// so the label stays bounded.
    pub fn hit(&self, protocol: Protocol, port: u16) {
        match self.hit_series.get(&(protocol, port)) {
            Some(series) => series.inc(),
            None => self.other_hits[usize::from(protocol == Protocol::Udp)].inc(),
        }
    }

    /// A probe of a kind (the label is the kind's name in the ban evidence).
    pub fn probe(&self, kind: portsentry_crds::ProbeKind) {
        if let Some((_, series)) = self.probe_series.iter().find(|(k, _)| *k == kind) {
            series.inc();
        }
    }

    /// A packet read by the capture, with what became of it (a fixed set of outcomes).
    pub fn captured(&self, outcome: &'static str) {
        if let Some((_, series)) = self.captured_series.iter().find(|(o, _)| *o == outcome) {
            series.inc();
        }
    }

    /// Packets the kernel dropped on the capture socket.
    pub fn capture_drops(&self, dropped: u64) {
        if dropped > 0 {
            self.capture_drops.inc_by(dropped);
        }
    }

    pub fn alarm_suppressed(&self) {
        self.alarms_suppressed.inc();
    }

    pub fn alarm_dropped(&self) {
        self.alarms_dropped.inc();
    }

    pub fn alarm(&self, protocol: Protocol) {
        self.alarms.with_label_values(&[protocol.as_str()]).inc();
    }

    pub fn protected(&self, reason: &'static str) {
        self.protected.with_label_values(&[reason]).inc();
    }

    pub fn ban_added(&self) {
        self.bans_added.inc();
    }

    pub fn ban_expired(&self) {
        self.bans_expired.inc();
    }

    /// Copies the engine's gauges and eviction total in.
    pub fn sample(&self, bans_active: usize, sources: usize, evictions_total: u64) {
        self.bans_active.set(bans_active as i64);
        self.sources_tracked.set(sources as i64);
        let before = self.evictions_seen.swap(evictions_total, Ordering::Relaxed);
        self.evictions
            .inc_by(evictions_total.saturating_sub(before));
    }

    pub fn action_failure(&self, action: &'static str) {
        self.action_failures.with_label_values(&[action]).inc();
    }

    /// Failures counted so far for one action.
    pub fn action_failures(&self, action: &str) -> u64 {
        self.action_failures.with_label_values(&[action]).get()
    }

    /// Marks the sensor ready (decoys bound) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Adds a collector of another part of the sensor (the report client) to `/metrics`.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<()> {
        Ok(self.registry.register(collector)?)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }

    /// Whether the decoys are bound (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_default_no_series_names_a_decoy_port() {
        let metrics = Metrics::new().expect("metrics");
        metrics.hit(Protocol::Tcp, 31337);
        metrics.hit(Protocol::Tcp, 111);
        metrics.hit(Protocol::Udp, 161);
        let text = metrics.render();
        assert!(
            text.contains("portsentry_sensor_hits_total{protocol=\"TCP\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("portsentry_sensor_hits_total{protocol=\"UDP\"} 1"),
            "{text}"
        );
        for port in ["31337", "111", "161"] {
            assert!(!text.contains(port), "{port} revealed in\n{text}");
        }
        assert!(!text.contains("port=\""), "{text}");
    }

    #[test]
    fn per_port_series_exist_for_every_decoy_port_from_the_start_when_asked_for() {
        let metrics = Metrics::per_port(&[1, 111], &[161]).expect("metrics");
        let text = metrics.render();
        assert!(
            text.contains("portsentry_sensor_hits_total{port=\"111\",protocol=\"TCP\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("portsentry_sensor_hits_total{port=\"161\",protocol=\"UDP\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn every_required_metric_is_exposed() {
        let metrics = Metrics::per_port(&[1], &[1]).expect("metrics");
        metrics.hit(Protocol::Tcp, 1);
        metrics.alarm(Protocol::Tcp);
        metrics.ban_added();
        metrics.ban_expired();
        metrics.sample(3, 7, 5);
        metrics.action_failure("route");
        let text = metrics.render();
        for line in [
            "portsentry_sensor_hits_total{port=\"1\",protocol=\"TCP\"} 1",
            "portsentry_sensor_alarms_total{protocol=\"TCP\"} 1",
            "portsentry_sensor_bans_active 3",
            "portsentry_sensor_bans_added_total 1",
            "portsentry_sensor_bans_expired_total 1",
            "portsentry_sensor_sources_tracked 7",
            "portsentry_sensor_source_evictions_total 5",
            "portsentry_sensor_action_failures_total{action=\"route\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn hits_on_unlisted_ports_share_one_series() {
        let metrics = Metrics::per_port(&[1], &[]).expect("metrics");
        metrics.hit(Protocol::Tcp, 1);
        metrics.hit(Protocol::Tcp, 2);
        metrics.hit(Protocol::Tcp, 3);
        let text = metrics.render();
        assert!(
            text.contains("portsentry_sensor_hits_total{port=\"other\",protocol=\"TCP\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn capture_losses_and_suppressed_alarms_are_exposed() {
        let metrics = Metrics::new().expect("metrics");
        metrics.capture_drops(7);
        metrics.alarm_suppressed();
        metrics.alarm_dropped();
        metrics.captured("probe");
        let text = metrics.render();
        for line in [
            "portsentry_sensor_capture_drops_total 7",
            "portsentry_sensor_alarms_suppressed_total 1",
            "portsentry_sensor_alarms_dropped_total 1",
            "portsentry_sensor_captured_packets_total{outcome=\"probe\"} 1",
            "portsentry_sensor_captured_packets_total{outcome=\"port_in_use\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn evictions_follow_the_engines_running_total() {
        let metrics = Metrics::new().expect("metrics");
        metrics.sample(0, 0, 5);
        metrics.sample(0, 0, 8);
        assert!(
            metrics
                .render()
                .contains("portsentry_sensor_source_evictions_total 8")
        );
    }
}
