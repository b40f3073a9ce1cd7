//! Report intake, the pure part: who may report, how much, how often, about which policy;
//! each refusal mapped to its HTTP status and a bounded metric reason.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PolicyRules, PortSentryBanSpec, PortSentryPolicy,
    SourcePrefix,
    report::{DetectionOutcome, MAX_DETECTIONS_PER_REPORT, Report},
};

use crate::{
    Result,
    enforce::bans::{self, Guards, Offence, Verdict},
    policy::widen,
};

/// Largest request body read; beyond it the request is refused with 413 unread.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most probes one detection may carry.
pub const MAX_PROBES_PER_DETECTION: usize = 1024;

/// The sender, as learned from its reviewed token (never from the body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// A sensor sidecar in a pod.
    Pod {
        namespace: String,
        name: String,
        labels: BTreeMap<String, String>,
        namespace_labels: BTreeMap<String, String>,
    },
    /// A node sensor (DaemonSet) on a node.
    Node {
        name: String,
        labels: BTreeMap<String, String>,
    },
}

impl Reporter {
    /// "namespace/pod" or "node/name": the rate-limit key and the evidence's reporter.
    pub fn key(&self) -> String {
        match self {
            Reporter::Pod {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
            Reporter::Node { name, .. } => format!("node/{name}"),
        }
    }
}

/// What the token review said about the bearer token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// No `Authorization: Bearer` header.
    Missing,
    /// The API server did not authenticate the token (wrong audience, expired, forged).
    Invalid,
    /// Authenticated, but not as a pod or node sensor.
    NotASensor,
    /// A pod's token, but the pod does not run the sensor as the operator injected it.
    Forged {
        namespace: String,
        pod: String,
        why: String,
    },
    /// Authenticated as this sensor.
    Sensor(Reporter),
}

/// Why a report was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    InvalidToken,
    NotASensor,
    /// The token's pod does not run the sensor as injected (why, in words).
    NotInjected(String),
    RateLimited {
        retry_after: Duration,
    },
    BodyTooLarge,
    TooManyDetections(usize),
    Malformed(String),
    Invalid(String),
    PolicyNotFound,
    NotGoverned,
}

impl Refusal {
    /// The HTTP status answering this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::MissingToken | Refusal::InvalidToken => 401,
            Refusal::NotASensor
            | Refusal::NotInjected(_)
            | Refusal::PolicyNotFound
            | Refusal::NotGoverned => 403,
            Refusal::BodyTooLarge | Refusal::TooManyDetections(_) => 413,
            Refusal::Malformed(_) | Refusal::Invalid(_) => 422,
            Refusal::RateLimited { .. } => 429,
        }
    }

    /// A fixed word for the `reason` label of the refused-reports metric.
    /// Every value [`Refusal::metric_reason`] gives (series created at zero).
    pub const METRIC_REASONS: [&'static str; 11] = [
        "missing_token",
        "invalid_token",
        "not_a_sensor",
        "not_injected_sensor",
        "rate_limited",
        "body_too_large",
        "too_many_detections",
        "malformed",
        "invalid",
        "policy_not_found",
        "not_governed",
    ];

    pub fn metric_reason(&self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::InvalidToken => "invalid_token",
            Refusal::NotASensor => "not_a_sensor",
            Refusal::NotInjected(_) => "not_injected_sensor",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::TooManyDetections(_) => "too_many_detections",
            Refusal::Malformed(_) => "malformed",
            Refusal::Invalid(_) => "invalid",
            Refusal::PolicyNotFound => "policy_not_found",
            Refusal::NotGoverned => "not_governed",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::MissingToken => write!(f, "no bearer token"),
            Refusal::InvalidToken => {
                write!(f, "the token was not accepted for audience portsentry.io")
            }
            Refusal::NotASensor => {
                write!(f, "the token belongs to neither a pod nor a node sensor")
            }
            Refusal::NotInjected(why) => write!(
                f,
                "the token's pod does not run the sensor as the operator injected it: {why}"
            ),
            Refusal::RateLimited { retry_after } => {
                write!(
                    f,
                    "too many reports; retry in {} ms",
                    retry_after.as_millis()
                )
            }
            Refusal::BodyTooLarge => write!(f, "the body exceeds {MAX_BODY_BYTES} bytes"),
            Refusal::TooManyDetections(n) => write!(
                f,
                "{n} detections in one report; at most {MAX_DETECTIONS_PER_REPORT}"
            ),
            Refusal::Malformed(why) => write!(f, "not a report: {why}"),
            Refusal::Invalid(why) => write!(f, "invalid report: {why}"),
            Refusal::PolicyNotFound => write!(f, "the named policy does not exist"),
            Refusal::NotGoverned => write!(f, "the named policy does not govern the sender"),
        }
    }
}

/// The sender's identity, or the refusal its authentication earns.
pub fn authenticate(authentication: Authentication) -> Result<Reporter, Refusal> {
    match authentication {
        Authentication::Missing => Err(Refusal::MissingToken),
        Authentication::Invalid => Err(Refusal::InvalidToken),
        Authentication::NotASensor => Err(Refusal::NotASensor),
        Authentication::Forged { why, .. } => Err(Refusal::NotInjected(why)),
        Authentication::Sensor(reporter) => Ok(reporter),
    }
}

/// Parses and checks a body: size, syntax, detection count, and each detection's shape.
pub fn parse(body: &[u8]) -> Result<Report, Refusal> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Refusal::BodyTooLarge);
    }
    let report: Report =
        serde_json::from_slice(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if report.detections.len() > MAX_DETECTIONS_PER_REPORT {
        return Err(Refusal::TooManyDetections(report.detections.len()));
    }
    if report.policy.name.is_empty() || report.policy.name.len() > 253 {
        return Err(Refusal::Invalid(
            "policy name must be 1 to 253 characters".into(),
        ));
    }
    for (i, detection) in report.detections.iter().enumerate() {
        if detection.probes.is_empty() {
            return Err(Refusal::Invalid(format!("detection {i} has no probes")));
        }
        if detection.probes.len() > MAX_PROBES_PER_DETECTION {
            return Err(Refusal::Invalid(format!(
                "detection {i} has more than {MAX_PROBES_PER_DETECTION} probes"
            )));
        }
        if detection.probes.iter().any(|p| p.port == 0) {
            return Err(Refusal::Invalid(format!("detection {i} names port 0")));
        }
    }
    Ok(report)
}

/// The policy a report names, as found by the caller.
#[derive(Clone, Copy, Debug)]
pub enum Governing<'a> {
    Namespaced(&'a PortSentryPolicy),
    Cluster(&'a ClusterPortSentryPolicy),
}

/// True when `policy` governs `reporter`: a namespaced policy its own pods (by selector); a
/// cluster policy the pods of its selected namespaces, and the nodes of its node selector.
pub fn governs(policy: Governing<'_>, reporter: &Reporter) -> bool {
    match (policy, reporter) {
        (
            Governing::Namespaced(policy),
            Reporter::Pod {
                namespace, labels, ..
            },
        ) => {
            policy.metadata.namespace.as_deref() == Some(namespace.as_str())
                && widen::matches(&policy.spec.pod_selector, labels).unwrap_or(false)
        }
        (Governing::Namespaced(_), Reporter::Node { .. }) => false,
        (
            Governing::Cluster(policy),
            Reporter::Pod {
                labels,
                namespace_labels,
                ..
            },
        ) => {
            let namespace_ok = policy
                .spec
                .namespace_selector
                .as_ref()
                .is_some_and(|s| widen::matches(s, namespace_labels).unwrap_or(false));
            let pod_ok = policy
                .spec
                .pod_selector
                .as_ref()
                .is_none_or(|s| widen::matches(s, labels).unwrap_or(false));
            namespace_ok && pod_ok
        }
        (Governing::Cluster(policy), Reporter::Node { labels, .. }) => policy
            .spec
            .node_selector
            .as_ref()
            .is_some_and(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v))),
    }
}

/// Checks that the policy `report` names exists (as `found`), is of the kind named, and
/// governs `reporter`.
pub fn authorize(
    report: &Report,
    reporter: &Reporter,
    found: Option<Governing<'_>>,
) -> Result<(), Refusal> {
    let found = found.ok_or(Refusal::PolicyNotFound)?;
    let kind_ok = matches!(
        (report.policy.kind, found),
        (PolicyKind::PortSentryPolicy, Governing::Namespaced(_))
            | (PolicyKind::ClusterPortSentryPolicy, Governing::Cluster(_))
    );
    if kind_ok && governs(found, reporter) {
        Ok(())
    } else {
        Err(Refusal::NotGoverned)
    }
}

/// A token bucket: `capacity` reports at once, refilled at `per_second`. Time is passed in.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(capacity: u32, per_second: f64, now: Instant) -> Self {
        Self {
            capacity: f64::from(capacity.max(1)),
            per_second: per_second.max(f64::MIN_POSITIVE),
            tokens: f64::from(capacity.max(1)),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }

    /// True when the bucket is full at `now`: forgetting it loses nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.per_second >= self.capacity
    }
}

/// One token bucket per reporter, at most `max_reporters` of them in memory.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    capacity: u32,
    per_second: f64,
    max_reporters: usize,
    buckets: HashMap<String, TokenBucket>,
}

impl RateLimiter {
    pub fn new(capacity: u32, per_second: f64, max_reporters: usize) -> Self {
        Self {
            capacity,
            per_second,
            max_reporters: max_reporters.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Admits one report from `reporter` at `now`, or refuses with the wait until the next.
    pub fn check(&mut self, reporter: &str, now: Instant) -> Result<(), Refusal> {
        if !self.buckets.contains_key(reporter) && self.buckets.len() >= self.max_reporters {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_reporters {
                let stalest = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, b)| b.updated)
                    .map(|(k, _)| k.clone());
                if let Some(key) = stalest {
                    self.buckets.remove(&key);
                }
            }
        }
        let (capacity, per_second) = (self.capacity, self.per_second);
        self.buckets
            .entry(reporter.to_owned())
            .or_insert_with(|| TokenBucket::new(capacity, per_second, now))
            .take(now)
            .map_err(|retry_after| Refusal::RateLimited { retry_after })
    }

    /// Reporters currently remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// A report admitted for judging, with its authenticated sender.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    pub reporter: Reporter,
    pub report: Report,
}

/// Runs every check in order: token (401), rate (429), size and shape (413, 422), policy (403).
pub fn admit<'a>(
    authentication: Authentication,
    body: &[u8],
    limiter: &mut RateLimiter,
    now: Instant,
    find_policy: impl FnOnce(&Report, &Reporter) -> Option<Governing<'a>>,
) -> Result<Admitted, Refusal> {
    let reporter = authenticate(authentication)?;
    limiter.check(&reporter.key(), now)?;
    let report = parse(body)?;
    authorize(&report, &reporter, find_policy(&report, &reporter))?;
    Ok(Admitted { reporter, report })
}

/// One ban to create or update with server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct BanWrite {
    pub name: String,
    pub spec: PortSentryBanSpec,
    /// The one namespace a cluster policy's ban acts in until its evidence is corroborated.
    pub confined_to: Option<String>,
}

/// Where a ban written for `governing` acts while its evidence is `spec.evidence`: `None`
/// everywhere its policy reaches; `Some(namespace)` only there. A namespaced policy's bans
/// act in its namespace by construction (`None`). A cluster policy's ban on evidence its
/// [`portsentry_crds::Corroboration`] does not accept acts only in the reporting pod's
/// namespace (a node sensor's, in the operator's).
pub fn confinement(
    governing: Governing<'_>,
    spec: &PortSentryBanSpec,
    reporter: &Reporter,
    operator_namespace: &str,
) -> Option<String> {
    let Governing::Cluster(policy) = governing else {
        return None;
    };
    let reporters = spec.evidence.iter().map(|e| e.reporter.as_str());
    if policy.spec.corroboration.holds(reporters) {
        return None;
    }
    Some(match reporter {
        Reporter::Pod { namespace, .. } => namespace.clone(),
        Reporter::Node { .. } => operator_namespace.to_owned(),
    })
}

/// The policy's bans in force when a report is judged, and how IPv6 sources group.
#[derive(Clone, Debug, Default)]
pub struct Active {
    /// Bans in force.
    pub count: usize,
    /// Their sources (for IPv6 grouping).
    pub sources: Vec<SourcePrefix>,
    pub grouping: bans::Ipv6Grouping,
}

impl From<usize> for Active {
    fn from(count: usize) -> Self {
        Self {
            count,
            ..Self::default()
        }
    }
}

/// Judges each detection of an admitted report under the policy named `policy_name` with
/// `rules`: the answer for each detection, in order, and the bans to write. `existing`
/// finds this policy's ban by name; `active_bans` counts its bans in force. Detections of
/// one source within the report fold into one write.
pub fn judge_report(
    admitted: &Admitted,
    policy_name: &str,
    rules: &PolicyRules,
    guards: &Guards,
    existing: impl Fn(&str) -> Option<PortSentryBanSpec>,
    active: impl Into<Active>,
    now: Timestamp,
) -> Result<(Vec<DetectionOutcome>, Vec<BanWrite>)> {
    let Active {
        count: mut active_bans,
        sources: mut banned,
        grouping,
    } = active.into();
    let reporter = admitted.reporter.key();
    let mut outcomes = Vec::with_capacity(admitted.report.detections.len());
    let mut writes: Vec<BanWrite> = Vec::new();
    for detection in &admitted.report.detections {
        let host = SourcePrefix::host(detection.source.to_canonical());
        // A scanner rotating through its IPv6 network is banned as the network, unless the
        // network holds something protected (then address by address).
        let source = bans::ipv6_group(&host, &banned, grouping)
            .filter(|group| guards.protected(group, &rules.detection.ignore).is_none())
            .unwrap_or(host);
        let name = bans::ban_name(policy_name, &source);
        let pending = writes.iter().position(|w| w.name == name);
        let current = match pending {
            Some(i) => Some(writes[i].spec.clone()),
            None => existing(&name),
        };
        let already_banned = current
            .as_ref()
            .is_some_and(|spec| bans::is_active(spec, now));
        let verdict = bans::judge(
            rules,
            guards,
            &source,
            &detection.probes,
            active_bans,
            already_banned,
        );
        match verdict {
            Verdict::Ban => {
                let offence = Offence {
                    policy: admitted.report.policy.clone(),
                    source,
                    reporter: &reporter,
                    probes: &detection.probes,
                    now,
                };
                let spec = bans::next_spec(&rules.response, current.as_ref(), &offence)?;
                if !already_banned {
                    active_bans += 1;
                    banned.push(source);
                }
                match pending {
                    Some(i) => writes[i].spec = spec,
                    None => writes.push(BanWrite {
                        name: name.clone(),
                        spec,
                        confined_to: None,
                    }),
                }
                outcomes.push(DetectionOutcome::Banned(name));
            }
            Verdict::Alert(why) => outcomes.push(DetectionOutcome::Alerted(why.as_str().into())),
            Verdict::Protected(why) => {
                outcomes.push(DetectionOutcome::Protected(why.as_str().into()));
            }
        }
    }
    Ok((outcomes, writes))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use portsentry_crds::{ClusterPortSentryPolicySpec, PolicyRules, PortSentryPolicySpec};
    use serde_json::json;

    use super::*;

    #[test]
    fn every_refusal_reason_is_listed_for_the_zeroed_series() {
        let all = [
            Refusal::MissingToken,
            Refusal::InvalidToken,
            Refusal::NotASensor,
            Refusal::NotInjected(String::new()),
            Refusal::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            Refusal::BodyTooLarge,
            Refusal::TooManyDetections(1),
            Refusal::Malformed(String::new()),
            Refusal::Invalid(String::new()),
            Refusal::PolicyNotFound,
            Refusal::NotGoverned,
        ];
        let reasons: Vec<&str> = all.iter().map(Refusal::metric_reason).collect();
        assert_eq!(reasons, Refusal::METRIC_REASONS);
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn pod(namespace: &str, app: &str) -> Reporter {
        Reporter::Pod {
            namespace: namespace.into(),
            name: format!("{app}-0"),
            labels: labels(&[("app", app)]),
            namespace_labels: labels(&[("team", "shop")]),
        }
    }

    fn web_policy() -> PortSentryPolicy {
        PortSentryPolicy {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            spec: PortSentryPolicySpec {
                pod_selector: LabelSelector {
                    match_labels: Some(labels(&[("app", "web")])),
                    match_expressions: None,
                },
                rules: PolicyRules::default(),
            },
            status: None,
        }
    }

    fn cluster_policy() -> ClusterPortSentryPolicy {
        ClusterPortSentryPolicy {
            metadata: ObjectMeta {
                name: Some("edge".into()),
                ..ObjectMeta::default()
            },
            spec: ClusterPortSentryPolicySpec {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(labels(&[("team", "shop")])),
                    match_expressions: None,
                }),
                pod_selector: None,
                node_selector: Some(labels(&[("edge", "true")])),
                corroboration: Default::default(),
                rules: PolicyRules::default(),
            },
            status: None,
        }
    }

    fn body(kind: &str, name: &str, detections: usize) -> Vec<u8> {
        let detection = json!({"source": "203.0.113.7", "probes": [
            {"port": 1, "protocol": "TCP", "kind": "Connect", "verified": true, "observedAtMs": 1}
        ]});
        serde_json::to_vec(&json!({
            "policy": {"kind": kind, "name": name},
            "detections": vec![detection; detections],
        }))
        .unwrap()
    }

    fn limiter() -> RateLimiter {
        RateLimiter::new(5, 1.0, 100)
    }

    fn admit_web(authentication: Authentication, body: &[u8]) -> Result<Admitted, Refusal> {
        let policy = web_policy();
        admit(
            authentication,
            body,
            &mut limiter(),
            Instant::now(),
            |_, _| Some(Governing::Namespaced(&policy)),
        )
    }

    #[test]
    fn a_governed_pod_with_a_valid_report_is_admitted() {
        let admitted = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            &body("PortSentryPolicy", "web", 2),
        )
        .unwrap();
        assert_eq!(admitted.reporter.key(), "shop/web-0");
        assert_eq!(admitted.report.detections.len(), 2);
    }

    #[test]
    fn no_token_is_401() {
        let refusal = admit_web(Authentication::Missing, b"{}").unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (401, "missing_token")
        );
    }

    #[test]
    fn a_token_of_another_audience_is_401() {
        let refusal = admit_web(Authentication::Invalid, b"{}").unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (401, "invalid_token")
        );
    }

    #[test]
    fn a_valid_token_that_is_no_sensor_is_403() {
        let refusal = admit_web(Authentication::NotASensor, b"{}").unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (403, "not_a_sensor")
        );
    }

    #[test]
    fn a_pod_the_policy_does_not_select_is_403() {
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "db")),
            &body("PortSentryPolicy", "web", 1),
        )
        .unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (403, "not_governed")
        );
    }

    #[test]
    fn a_pod_of_another_namespace_is_403() {
        let refusal = admit_web(
            Authentication::Sensor(pod("other", "web")),
            &body("PortSentryPolicy", "web", 1),
        )
        .unwrap_err();
        assert_eq!(refusal.status(), 403);
    }

    #[test]
    fn a_report_naming_the_wrong_kind_is_403() {
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            &body("ClusterPortSentryPolicy", "web", 1),
        )
        .unwrap_err();
        assert_eq!(refusal.metric_reason(), "not_governed");
    }

    #[test]
    fn an_unknown_policy_is_403() {
        let refusal = admit(
            Authentication::Sensor(pod("shop", "web")),
            &body("PortSentryPolicy", "nope", 1),
            &mut limiter(),
            Instant::now(),
            |_, _| None,
        )
        .unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (403, "policy_not_found")
        );
    }

    #[test]
    fn too_many_detections_is_413() {
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            &body("PortSentryPolicy", "web", MAX_DETECTIONS_PER_REPORT + 1),
        )
        .unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (413, "too_many_detections")
        );
    }

    #[test]
    fn an_oversized_body_is_413_before_parsing() {
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            &vec![b' '; MAX_BODY_BYTES + 1],
        )
        .unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (413, "body_too_large")
        );
    }

    #[test]
    fn json_that_is_not_a_report_is_422() {
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            br#"{"policy": 1}"#,
        )
        .unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (422, "malformed")
        );
        let refusal = admit_web(
            Authentication::Sensor(pod("shop", "web")),
            br#"{"policy": {"kind": "PortSentryPolicy", "name": "web"}, "detections": [], "extra": 1}"#,
        )
        .unwrap_err();
        assert_eq!(refusal.status(), 422);
    }

    #[test]
    fn a_detection_without_probes_or_with_port_zero_is_422() {
        let empty = br#"{"policy": {"kind": "PortSentryPolicy", "name": "web"},
            "detections": [{"source": "203.0.113.7", "probes": []}]}"#;
        let refusal = admit_web(Authentication::Sensor(pod("shop", "web")), empty).unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (422, "invalid")
        );
        let zero = br#"{"policy": {"kind": "PortSentryPolicy", "name": "web"},
            "detections": [{"source": "203.0.113.7", "probes": [
              {"port": 0, "protocol": "TCP", "kind": "Connect", "verified": true, "observedAtMs": 1}]}]}"#;
        let refusal = admit_web(Authentication::Sensor(pod("shop", "web")), zero).unwrap_err();
        assert_eq!(refusal.status(), 422);
    }

    #[test]
    fn a_flood_from_one_reporter_is_429_with_the_wait() {
        let mut limiter = RateLimiter::new(3, 2.0, 100);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("shop/web-0", t0).is_ok());
        }
        let refusal = limiter.check("shop/web-0", t0).unwrap_err();
        assert_eq!(
            (refusal.status(), refusal.metric_reason()),
            (429, "rate_limited")
        );
        assert_eq!(
            refusal,
            Refusal::RateLimited {
                retry_after: Duration::from_millis(500)
            }
        );
        assert!(
            limiter
                .check("shop/web-0", t0 + Duration::from_millis(500))
                .is_ok()
        );
    }

    #[test]
    fn one_reporter_flooding_does_not_limit_another() {
        let mut limiter = RateLimiter::new(1, 1.0, 100);
        let t0 = Instant::now();
        assert!(limiter.check("shop/a", t0).is_ok());
        assert!(limiter.check("shop/a", t0).is_err());
        assert!(limiter.check("shop/b", t0).is_ok());
    }

    #[test]
    fn the_rate_limit_is_checked_before_the_body_is_parsed() {
        let mut limiter = RateLimiter::new(1, 1.0, 100);
        let policy = web_policy();
        let t0 = Instant::now();
        let find = |_: &Report, _: &Reporter| Some(Governing::Namespaced(&policy));
        let ok = admit(
            Authentication::Sensor(pod("shop", "web")),
            &body("PortSentryPolicy", "web", 1),
            &mut limiter,
            t0,
            find,
        );
        assert!(ok.is_ok());
        let refusal = admit(
            Authentication::Sensor(pod("shop", "web")),
            b"garbage",
            &mut limiter,
            t0,
            find,
        )
        .unwrap_err();
        assert_eq!(refusal.status(), 429);
    }

    #[test]
    fn remembered_reporters_are_bounded() {
        let mut limiter = RateLimiter::new(2, 0.001, 3);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(
                limiter
                    .check(&format!("shop/pod-{i}"), t0 + Duration::from_secs(i))
                    .is_ok()
            );
            assert!(limiter.len() <= 3);
        }
    }

    #[test]
    fn a_cluster_policy_governs_pods_of_its_namespaces_and_nodes_of_its_selector() {
        let policy = cluster_policy();
        assert!(governs(Governing::Cluster(&policy), &pod("shop", "web")));
        let outsider = Reporter::Pod {
            namespace: "dev".into(),
            name: "x".into(),
            labels: BTreeMap::new(),
            namespace_labels: labels(&[("team", "dev")]),
        };
        assert!(!governs(Governing::Cluster(&policy), &outsider));
        let edge = Reporter::Node {
            name: "n1".into(),
            labels: labels(&[("edge", "true")]),
        };
        let inner = Reporter::Node {
            name: "n2".into(),
            labels: BTreeMap::new(),
        };
        assert!(governs(Governing::Cluster(&policy), &edge));
        assert!(!governs(Governing::Cluster(&policy), &inner));
        assert_eq!(edge.key(), "node/n1");
    }

    fn admitted(sources: &[&str], kind: portsentry_crds::ProbeKind) -> Admitted {
        let detections: Vec<serde_json::Value> = sources
            .iter()
            .map(|s| json!({"source": s, "probes": [
                {"port": 7, "protocol": "TCP", "kind": kind, "verified": kind == portsentry_crds::ProbeKind::Connect, "observedAtMs": 1_780_000_000_000u64}
            ]}))
            .collect();
        let body = serde_json::to_vec(&json!({
            "policy": {"kind": "PortSentryPolicy", "name": "web"},
            "detections": detections,
        }))
        .unwrap();
        Admitted {
            reporter: pod("shop", "web"),
            report: parse(&body).unwrap(),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_780_000_100).unwrap()
    }

    #[test]
    fn a_verified_detection_becomes_a_ban_write_named_for_the_source() {
        let report = admitted(&["203.0.113.7"], portsentry_crds::ProbeKind::Connect);
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(
            outcomes,
            vec![DetectionOutcome::Banned("web-v4-203-0-113-7".into())]
        );
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].spec.offences, 1);
        assert_eq!(writes[0].spec.evidence[0].reporter, "shop/web-0");
    }

    #[test]
    fn each_detection_gets_its_own_answer_in_order() {
        let report = admitted(
            &["127.0.0.1", "203.0.113.7"],
            portsentry_crds::ProbeKind::Connect,
        );
        let mut rules = PolicyRules::default();
        rules.response.max_active_bans = 1;
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &rules,
            &Guards::default(),
            |_| None,
            1,
            now(),
        )
        .unwrap();
        assert_eq!(
            outcomes,
            vec![
                DetectionOutcome::Protected("loopback".into()),
                DetectionOutcome::Alerted("cap_reached".into()),
            ]
        );
        assert!(writes.is_empty());
    }

    #[test]
    fn unverified_detections_are_alerts() {
        let report = admitted(&["203.0.113.7"], portsentry_crds::ProbeKind::Syn);
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(
            outcomes,
            vec![DetectionOutcome::Alerted("unverified".into())]
        );
        assert!(writes.is_empty());
    }

    #[test]
    fn detections_of_one_source_fold_into_one_write() {
        let report = admitted(
            &["203.0.113.7", "203.0.113.7"],
            portsentry_crds::ProbeKind::Connect,
        );
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(outcomes.len(), 2);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].spec.offences, 1);
    }

    #[test]
    fn the_cap_counts_bans_added_earlier_in_the_same_report() {
        let report = admitted(
            &["203.0.113.7", "203.0.113.8"],
            portsentry_crds::ProbeKind::Connect,
        );
        let mut rules = PolicyRules::default();
        rules.response.max_active_bans = 1;
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &rules,
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(outcomes[1], DetectionOutcome::Alerted("cap_reached".into()));
        assert_eq!(writes.len(), 1);
    }

    #[test]
    fn an_expired_ban_within_the_window_escalates() {
        let report = admitted(&["203.0.113.7"], portsentry_crds::ProbeKind::Connect);
        let (_, first) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        let old = first[0].spec.clone();
        let later = Timestamp::from_second(1_780_000_100 + 7200).unwrap();
        let (_, second) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |name| (name == "web-v4-203-0-113-7").then(|| old.clone()),
            0,
            later,
        )
        .unwrap();
        assert_eq!(second[0].spec.offences, 2);
    }

    #[test]
    fn a_scanner_rotating_through_its_64_is_banned_as_the_network_after_four_addresses() {
        let sources: Vec<String> = (1..=10).map(|i| format!("2001:db8:7:7::{i}")).collect();
        let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
        let report = admitted(&refs, portsentry_crds::ProbeKind::Connect);
        let mut rules = PolicyRules::default();
        rules.response.max_active_bans = 6;
        let (outcomes, writes) = judge_report(
            &report,
            "web",
            &rules,
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(writes.len(), 5, "{writes:?}");
        assert_eq!(writes[4].spec.source.to_string(), "2001:db8:7:7::/64");
        assert!(
            outcomes[4..]
                .iter()
                .all(|o| *o == DetectionOutcome::Banned("web-v6-2001-db8-7-7---64".into())),
            "{outcomes:?}"
        );
    }

    #[test]
    fn ipv4_mapped_sources_are_banned_as_ipv4() {
        let report = admitted(&["::ffff:203.0.113.7"], portsentry_crds::ProbeKind::Connect);
        let (outcomes, _) = judge_report(
            &report,
            "web",
            &PolicyRules::default(),
            &Guards::default(),
            |_| None,
            0,
            now(),
        )
        .unwrap();
        assert_eq!(
            outcomes,
            vec![DetectionOutcome::Banned("web-v4-203-0-113-7".into())]
        );
    }

    fn cluster_write(reporters: &[&str]) -> PortSentryBanSpec {
        let mut spec: PortSentryBanSpec = serde_json::from_value(json!({
            "source": "203.0.113.7",
            "policy": {"kind": "ClusterPortSentryPolicy", "name": "edge"},
        }))
        .unwrap();
        spec.evidence = reporters
            .iter()
            .map(|r| portsentry_crds::Evidence {
                port: 7,
                protocol: portsentry_crds::Protocol::Tcp,
                kind: portsentry_crds::ProbeKind::Connect,
                verified: true,
                reporter: (*r).into(),
                observed_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()),
            })
            .collect();
        spec
    }

    #[test]
    fn a_cluster_ban_on_one_namespaces_sidecars_is_confined_to_that_namespace() {
        let policy = cluster_policy();
        let spec = cluster_write(&["shop/web-0", "shop/web-1"]);
        assert_eq!(
            confinement(
                Governing::Cluster(&policy),
                &spec,
                &pod("shop", "web"),
                "portsentry-system"
            ),
            Some("shop".into())
        );
    }

    #[test]
    fn a_cluster_ban_corroborated_by_two_namespaces_or_a_node_sensor_acts_everywhere() {
        let policy = cluster_policy();
        for reporters in [&["shop/web-0", "dev/api-0"][..], &["node/n1"][..]] {
            let spec = cluster_write(reporters);
            assert_eq!(
                confinement(
                    Governing::Cluster(&policy),
                    &spec,
                    &pod("shop", "web"),
                    "portsentry-system"
                ),
                None
            );
        }
    }

    #[test]
    fn a_namespaced_policys_ban_is_never_confined_further() {
        let policy = web_policy();
        let spec = cluster_write(&["shop/web-0"]);
        assert_eq!(
            confinement(
                Governing::Namespaced(&policy),
                &spec,
                &pod("shop", "web"),
                "portsentry-system"
            ),
            None
        );
    }

    #[test]
    fn a_namespaced_policy_never_governs_a_node_sensor() {
        let policy = web_policy();
        let node = Reporter::Node {
            name: "n1".into(),
            labels: BTreeMap::new(),
        };
        assert!(!governs(Governing::Namespaced(&policy), &node));
    }
}
