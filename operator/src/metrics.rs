//! The operator's Prometheus metrics, all with bounded labels (controller names, fixed
//! reason words), never object names; and their text encoding for `/metrics`.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::{Error, Result};

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
}

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
            IntCounter::new("bans_expired_total", "PortSentryBans removed at expiry.")?;
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
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
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
        })
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

    /// Forgets every policy not in `live` (deleted ones).
    pub fn retain_policies(&self, live: &std::collections::BTreeSet<String>) {
        self.update(|counts| counts.retain(|key, _| live.contains(key)));
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
        String::from_utf8(buffer).map_err(|e| Error::Config(format!("metrics are not UTF-8: {e}")))
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
    fn errors_are_counted_by_bounded_kind() {
        let metrics = Metrics::new().unwrap();
        metrics.reconcile_failed("policy", &Error::MissingObjectKey("metadata.uid"));
        let text = metrics.encode().unwrap();
        assert!(text.contains(
            r#"portsentry_operator_reconcile_errors_total{controller="policy",error="missing_object_key"} 1"#
        ), "{text}");
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
