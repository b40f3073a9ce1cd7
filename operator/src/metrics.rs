//! The operator's Prometheus metrics, all with bounded labels (controller names, fixed
//! reason words), never object names; and their text encoding for `/metrics`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use portsentry_crds::report::DetectionOutcome;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::{Error, Result};

/// The controllers' names, the `controller` label of reconcile metrics.
pub const CONTROLLERS: [&str; 2] = ["policy", "cluster_policy"];

/// Metric handles shared by the controllers and the servers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_duration: HistogramVec,
    reconcile_errors: IntCounterVec,
    bans_active: IntGauge,
    bans_expired: IntCounter,
    policies_not_enforced: IntGauge,
    netpol_apply_duration: Histogram,
    per_policy: Mutex<HashMap<String, PolicyCounts>>,
    reports_accepted: IntCounter,
    reports_refused: IntCounterVec,
    detections: IntCounterVec,
    bans_refused: IntCounterVec,
    bans_added: IntCounter,
    hook_deliveries: IntCounterVec,
    hook_refusals: IntCounterVec,
    injection_failures: IntCounterVec,
    report_to_enforcement: Histogram,
    /// Bans written on a report, awaiting their NetworkPolicy write: (policy, ban) → received.
    pending: Mutex<HashMap<(String, String), Instant>>,
}

/// Key prefix of cluster policies' counts (no namespace name contains a colon).
const CLUSTER_KEY: &str = "cluster:";
/// Bans awaiting enforcement remembered at most; the oldest are forgotten beyond it.
const MAX_PENDING: usize = 100_000;
/// A written ban not seen by a reconcile in this long is forgotten unmeasured.
const PENDING_FOR: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, Default)]
struct PolicyCounts {
    active_bans: i64,
    not_enforced: bool,
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("portsentry_operator".into()), None)?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconcile took.").buckets(
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciles that failed, by controller and error kind.",
            ),
            &["controller", "error"],
        )?;
        let bans_active =
            IntGauge::new("bans_active", "PortSentryBans in force, over all policies.")?;
        let bans_expired =
            IntCounter::new("bans_expired_total", "PortSentryBans lifted at expiry.")?;
        let policies_not_enforced = IntGauge::new(
            "policies_not_enforced",
            "Policies whose bans cannot be enforced safely (Enforced=False).",
        )?;
        let netpol_apply_duration = Histogram::with_opts(
            HistogramOpts::new(
                "networkpolicy_write_duration_seconds",
                "Time to write one policy's generated NetworkPolicies.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
            ]),
        )?;
        let reports_accepted = IntCounter::new(
            "reports_accepted_total",
            "Sensor reports accepted on POST /v1/reports.",
        )?;
        let reports_refused = IntCounterVec::new(
            Opts::new(
                "reports_refused_total",
                "Sensor reports refused, by bounded reason.",
            ),
            &["reason"],
        )?;
        let detections = IntCounterVec::new(
            Opts::new(
                "detections_total",
                "Detections of accepted reports, by outcome (banned, alerted, protected).",
            ),
            &["outcome"],
        )?;
        let bans_refused = IntCounterVec::new(
            Opts::new(
                "bans_refused_total",
                "Bans refused because the source is protected, by reason (loopback, node, \
                 apiserver, operator, protected_namespace, service, cluster_dns, protected_cidr...).",
            ),
            &["reason"],
        )?;
        let bans_added = IntCounter::new("bans_added_total", "PortSentryBans created on reports.")?;
        let report_to_enforcement = Histogram::with_opts(
            HistogramOpts::new(
                "report_to_enforcement_seconds",
                "Time from a report received to the NetworkPolicy write enforcing its ban.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let hook_deliveries = IntCounterVec::new(
            Opts::new(
                "hook_deliveries_total",
                "Alert hook deliveries, by result (delivered, failed, dropped).",
            ),
            &["result"],
        )?;
        let hook_refusals = IntCounterVec::new(
            Opts::new(
                "hook_refusals_total",
                "Alert hook deliveries refused because the target resolves to a forbidden address, by reason (loopback, metadata, link_local, unspecified, multicast, cluster_range, unresolved).",
            ),
            &["reason"],
        )?;
        let injection_failures = IntCounterVec::new(
            Opts::new(
                "injection_failures_total",
                "Pods admitted without their sensor because the injection patch failed, by error kind.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(injection_failures.clone()))?;
        registry.register(Box::new(hook_deliveries.clone()))?;
        registry.register(Box::new(hook_refusals.clone()))?;
        registry.register(Box::new(reports_accepted.clone()))?;
        registry.register(Box::new(reports_refused.clone()))?;
        registry.register(Box::new(detections.clone()))?;
        registry.register(Box::new(bans_refused.clone()))?;
        registry.register(Box::new(bans_added.clone()))?;
        registry.register(Box::new(report_to_enforcement.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        // Bounded label sets start at zero: a rate of errors or refusals reads 0 (a dashboard
        // panel with data, an alert that can see the first increase), not "no data".
        for controller in CONTROLLERS {
            for label in Error::METRIC_LABELS {
                reconcile_errors.with_label_values(&[controller, label]);
            }
        }
        for reason in crate::intake::checks::Refusal::METRIC_REASONS {
            reports_refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(bans_active.clone()))?;
        registry.register(Box::new(bans_expired.clone()))?;
        registry.register(Box::new(policies_not_enforced.clone()))?;
        registry.register(Box::new(netpol_apply_duration.clone()))?;
        Ok(Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            bans_active,
            bans_expired,
            policies_not_enforced,
            netpol_apply_duration,
            per_policy: Mutex::new(HashMap::new()),
            reports_accepted,
            reports_refused,
            detections,
            bans_refused,
            bans_added,
            hook_deliveries,
            hook_refusals,
            injection_failures,
            report_to_enforcement,
            pending: Mutex::new(HashMap::new()),
        })
    }

    pub fn report_accepted(&self) {
        self.reports_accepted.inc();
    }

    /// Counts a refused report; `reason` is a fixed word (`Refusal::metric_reason`).
    pub fn report_refused(&self, reason: &'static str) {
        self.reports_refused.with_label_values(&[reason]).inc();
    }

    pub fn detections(&self, outcomes: &[DetectionOutcome]) {
        for outcome in outcomes {
            let label = match outcome {
                DetectionOutcome::Banned(_) => "banned",
                DetectionOutcome::Alerted(_) => "alerted",
                DetectionOutcome::Protected(why) => {
                    // `why` is one of `Protection::as_str`'s fixed words.
                    self.bans_refused.with_label_values(&[why.as_str()]).inc();
                    "protected"
                }
            };
            self.detections.with_label_values(&[label]).inc();
        }
    }

    /// Counts a ban (hand-made or kept) refused because its source is protected.
    pub fn ban_refused(&self, why: crate::enforce::bans::Protection) {
        self.bans_refused.with_label_values(&[why.as_str()]).inc();
    }

    /// Counts an alert hook delivery: `delivered`, `failed`, `refused` (forbidden target) or
    /// `dropped` (queue full).
    pub fn hook_delivery(&self, result: &'static str) {
        self.hook_deliveries.with_label_values(&[result]).inc();
    }

    /// Counts a hook target refused for `reason` (`hooks::targets::Refusal::as_str`).
    pub fn hook_refused(&self, reason: &'static str) {
        self.hook_refusals.with_label_values(&[reason]).inc();
    }

    /// Counts a pod admitted without its sensor; `reason` is a fixed word
    /// ([`Error::metric_label`]).
    pub fn injection_failed(&self, reason: &'static str) {
        self.injection_failures.with_label_values(&[reason]).inc();
    }

    pub fn bans_added(&self, count: usize) {
        self.bans_added.inc_by(count as u64);
    }

    /// Remembers that ban `ban` of policy `policy_key` was written on a report received
    /// at `received`, until a reconcile that sees it writes (or needs no) NetworkPolicy.
    pub fn ban_written(&self, policy_key: &str, ban: &str, received: Instant) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, at| at.elapsed() < PENDING_FOR);
        }
        if pending.len() < MAX_PENDING {
            pending
                .entry((policy_key.to_owned(), ban.to_owned()))
                .or_insert(received);
        }
    }

    /// A reconcile of `policy_key` that saw the bans `seen` says whether it wrote
    /// NetworkPolicies: each pending ban it saw is measured (if written) and forgotten.
    pub fn enforcement_written(&self, policy_key: &str, seen: impl Fn(&str) -> bool, wrote: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() {
            return;
        }
        let now = Instant::now();
        pending.retain(|(policy, ban), received| {
            let done = policy == policy_key && seen(ban);
            if done && wrote {
                self.report_to_enforcement
                    .observe(now.saturating_duration_since(*received).as_secs_f64());
            }
            !done && now.saturating_duration_since(*received) < PENDING_FOR
        });
    }

    /// True when some ban of `policy_key` awaits its enforcement.
    pub fn enforcement_pending(&self, policy_key: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .any(|(policy, _)| policy == policy_key)
    }

    pub fn reconciled(&self, controller: &'static str, took: Duration) {
        self.reconcile_duration
            .with_label_values(&[controller])
            .observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self, controller: &'static str, error: &Error) {
        self.reconcile_errors
            .with_label_values(&[controller, error.metric_label()])
            .inc();
    }

    pub fn bans_expired(&self, count: usize) {
        self.bans_expired.inc_by(count as u64);
    }

    pub fn networkpolicies_written(&self, took: Duration) {
        self.netpol_apply_duration.observe(took.as_secs_f64());
    }

    /// Records one policy's state (keyed internally, exported only as totals).
    pub fn policy_state(&self, key: &str, active_bans: usize, enforced: bool) {
        self.update(|counts| {
            counts.insert(
                key.to_owned(),
                PolicyCounts {
                    active_bans: i64::try_from(active_bans).unwrap_or(i64::MAX),
                    not_enforced: !enforced,
                },
            );
        });
    }

    /// Forgets a deleted policy.
    pub fn policy_gone(&self, key: &str) {
        self.update(|counts| {
            counts.remove(key);
        });
    }

    /// Forgets every namespaced policy not in `live` (deleted ones).
    pub fn retain_policies(&self, live: &std::collections::BTreeSet<String>) {
        self.update(|counts| {
            counts.retain(|key, _| key.starts_with(CLUSTER_KEY) || live.contains(key))
        });
    }

    /// Records one cluster policy's state (kept apart from namespaced ones).
    pub fn cluster_policy_state(&self, name: &str, active_bans: usize, enforced: bool) {
        self.policy_state(&format!("{CLUSTER_KEY}{name}"), active_bans, enforced);
    }

    /// Forgets every cluster policy whose name is not in `live`.
    pub fn retain_cluster_policies(&self, live: &std::collections::BTreeSet<String>) {
        self.update(|counts| {
            counts.retain(|key, _| {
                key.strip_prefix(CLUSTER_KEY)
                    .is_none_or(|name| live.contains(name))
            })
        });
    }

    fn update(&self, change: impl FnOnce(&mut HashMap<String, PolicyCounts>)) {
        let mut counts = self
            .per_policy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut counts);
        self.bans_active
            .set(counts.values().map(|c| c.active_bans).sum());
        let not_enforced = counts.values().filter(|c| c.not_enforced).count();
        self.policies_not_enforced
            .set(i64::try_from(not_enforced).unwrap_or(i64::MAX));
    }

    /// The text exposition format served on `/metrics`.
    pub fn encode(&self) -> Result<String> {
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer)
            .map_err(|e| Error::Metrics(prometheus::Error::Msg(format!("not UTF-8: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_bans_are_summed_over_policies_without_naming_them() {
        let metrics = Metrics::new().unwrap();
        metrics.policy_state("shop/web", 3, true);
        metrics.policy_state("shop/api", 4, false);
        metrics.policy_state("shop/web", 1, true);
        let text = metrics.encode().unwrap();
        assert!(text.contains("portsentry_operator_bans_active 5"), "{text}");
        assert!(text.contains("portsentry_operator_policies_not_enforced 1"));
        assert!(!text.contains("shop/web"));
        metrics.policy_gone("shop/api");
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains("portsentry_operator_bans_active 1")
        );
    }

    #[test]
    fn cluster_policies_survive_the_namespaced_controllers_forgetting() {
        let metrics = Metrics::new().unwrap();
        metrics.policy_state("shop/web", 1, true);
        metrics.cluster_policy_state("edge", 2, true);
        metrics.retain_policies(&Default::default());
        let text = metrics.encode().unwrap();
        assert!(text.contains("portsentry_operator_bans_active 2"), "{text}");
        metrics.retain_cluster_policies(&Default::default());
        let text = metrics.encode().unwrap();
        assert!(text.contains("portsentry_operator_bans_active 0"), "{text}");
    }

    #[test]
    fn errors_are_counted_by_bounded_kind() {
        let metrics = Metrics::new().unwrap();
        metrics.reconcile_failed("policy", &Error::MissingObjectKey("metadata.uid"));
        let text = metrics.encode().unwrap();
        assert!(text.contains(
            r#"portsentry_operator_reconcile_errors_total{controller="policy",error="missing_object_key"} 1"#
        ), "{text}");
    }

    #[test]
    fn report_to_enforcement_is_measured_once_the_write_includes_the_ban() {
        let metrics = Metrics::new().unwrap();
        metrics.ban_written("shop/web", "web-v4-203-0-113-7", Instant::now());
        metrics.enforcement_written("shop/web", |_| false, true);
        assert!(metrics.enforcement_pending("shop/web"));
        metrics.enforcement_written("shop/other", |_| true, true);
        assert!(metrics.enforcement_pending("shop/web"));
        metrics.enforcement_written("shop/web", |b| b == "web-v4-203-0-113-7", true);
        assert!(!metrics.enforcement_pending("shop/web"));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("portsentry_operator_report_to_enforcement_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let metrics = Metrics::new().unwrap();
        metrics.report_refused("rate_limited");
        metrics.report_accepted();
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"portsentry_operator_reports_refused_total{reason="rate_limited"} 1"#)
        );
        assert!(text.contains("portsentry_operator_reports_accepted_total 1"));
    }

    #[test]
    fn injection_failures_are_counted_by_error_kind() {
        let metrics = Metrics::new().unwrap();
        metrics.injection_failed("serialization");
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                r#"portsentry_operator_injection_failures_total{reason="serialization"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn expiries_and_durations_are_exported() {
        let metrics = Metrics::new().unwrap();
        metrics.bans_expired(2);
        metrics.reconciled("policy", Duration::from_millis(3));
        let text = metrics.encode().unwrap();
        assert!(text.contains("portsentry_operator_bans_expired_total 2"));
        assert!(text.contains(
            r#"portsentry_operator_reconcile_duration_seconds_count{controller="policy"} 1"#
        ));
    }
}
