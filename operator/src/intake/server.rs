//! The HTTPS report intake, `POST /v1/reports`: TokenReview → sender, the pure checks of
//! `intake`, then the bans it judges written with server-side apply; every answer counted.
//!
//! ```text
//!  sensor ──TLS──▶ bearer ─TokenReview─▶ pod/node ─▶ rate ─▶ body ─▶ policy governs? ─▶ judge_report
//!                   401        401/403               429    413/422       403             │
//!                                                                       SSA PortSentryBan ◀┘ (200 + outcomes)
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        authentication::v1::TokenReview,
        core::v1::{Namespace, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter as EventReporter},
        reflector::Store,
    },
};
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PortSentryBan, PortSentryBanSpec, PortSentryPolicy,
    SourcePrefix,
    report::{DetectionOutcome, Report, ReportOutcome},
};
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::rustls;
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    enforce::bans,
    hooks::{self, Hooks},
    http::{self, Bodies, BodyError, Limits as HttpLimits},
    intake::checks::{
        self as intake, Authentication, BanWrite, Governing, RateLimiter, Refusal, Reporter,
    },
    intake::review::ReviewCache,
    intake::{authentic::Expected, review},
    labels,
    metrics::Metrics,
    server::Readiness,
    shared::Shared,
};

/// The path sensors post their reports to.
pub const PATH: &str = "/v1/reports";
/// Connections served at once (sensors keep theirs alive; an idle one closes in 10 s).
const MAX_CONNECTIONS: usize = 1024;
/// Report bodies of all connections read at once share this many bytes.
const BODY_BUDGET: usize = 16 * 1024 * 1024;
/// How long the intake trusts its own ban writes over the (lagging) shared store.
const RECENT: Duration = Duration::from_secs(30);
/// Own writes remembered at most (forgotten all at once beyond: the store has them by then).
const MAX_RECENT: usize = 100_000;
/// Per-policy locks kept before idle ones are dropped.
const MAX_LOCKS: usize = 1024;
/// The name of the intake's condition in `/readyz`.
pub const READY: &str = "intake";

/// The intake's serving limits (see [`crate::http`]).
pub fn serving_limits() -> HttpLimits {
    HttpLimits::new(MAX_CONNECTIONS, intake::MAX_BODY_BYTES, BODY_BUDGET)
}

/// Per-sensor rate limit: a burst of `burst` reports, refilled at `per_second`; and
/// per-address limit on TokenReviews of tokens not yet known, so a flood of bad tokens
/// costs the API server a bounded number of reviews.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub burst: u32,
    pub per_second: f64,
    /// Sensors (and client addresses) whose buckets are remembered at once.
    pub max_reporters: usize,
    /// Reviews of unknown tokens one client address may cause at once.
    pub review_burst: u32,
    /// Reviews of unknown tokens per second one client address may cause on average.
    pub review_per_second: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 5.0,
            max_reporters: 100_000,
            review_burst: 20,
            review_per_second: 2.0,
        }
    }
}

/// How the intake is to run.
#[derive(Debug)]
pub struct Settings {
    pub limits: Limits,
    /// Node sensors' pods and cluster policies' bans live there.
    pub operator_namespace: String,
    /// What the sensors the operator injects look like: only they may report.
    pub expected: Expected,
    /// When IPv6 sources are banned as their network.
    pub grouping: bans::Ipv6Grouping,
    /// Who publishes the intake's Events.
    pub reporter: EventReporter,
    pub hooks: Option<Hooks>,
}

/// Why a report got no 200: refused by a check, its body not read, or an API call failed
/// (answered 503).
#[derive(Debug)]
enum Failure {
    Refused(Refusal),
    Body(BodyError),
    Internal(Error),
}

impl From<BodyError> for Failure {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge(_) => Failure::Refused(Refusal::BodyTooLarge),
            other => Failure::Body(other),
        }
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Internal(error)
    }
}

impl From<kube::Error> for Failure {
    fn from(error: kube::Error) -> Self {
        Failure::Internal(error.into())
    }
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let (scheme, token) = value?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Status, JSON body and `Retry-After` seconds answering a refusal.
pub fn refusal_answer(refusal: &Refusal) -> (u16, String, Option<u64>) {
    let body =
        serde_json::json!({"reason": refusal.metric_reason(), "message": refusal.to_string()});
    let retry_after = match refusal {
        Refusal::RateLimited { retry_after } => {
            Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
        }
        _ => None,
    };
    (refusal.status(), body.to_string(), retry_after)
}

/// The namespace a report's bans live in: the policy's own, or the operator's for a
/// cluster policy.
pub fn ban_namespace(governing: Governing<'_>, operator_namespace: &str) -> String {
    match governing {
        Governing::Namespaced(policy) => policy.metadata.namespace.clone(),
        Governing::Cluster(_) => None,
    }
    .unwrap_or_else(|| operator_namespace.to_owned())
}

/// The PortSentryBan object a write applies, labelled with its policy (and, when confined,
/// with the one namespace it acts in: applying without it removes the label).
pub fn ban_object(write: &BanWrite, namespace: &str) -> PortSentryBan {
    let mut ban = PortSentryBan::new(&write.name, write.spec.clone());
    let mut labels = BTreeMap::from([
        (
            labels::MANAGED_BY_LABEL.to_owned(),
            labels::MANAGER.to_owned(),
        ),
        (
            labels::POLICY_LABEL.to_owned(),
            crate::names::label_value(&write.spec.policy.name),
        ),
    ]);
    if let Some(to) = &write.confined_to {
        labels.insert(labels::CONFINED_LABEL.to_owned(), to.clone());
    }
    ban.metadata = ObjectMeta {
        name: Some(write.name.clone()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels),
        ..ObjectMeta::default()
    };
    ban
}

/// Everything the intake shares between requests.
pub struct Intake {
    client: Client,
    metrics: Arc<Metrics>,
    guards: crate::enforce::guards::ProtectedSet,
    limiter: Mutex<RateLimiter>,
    /// Keyed by client address: charged only when a token must be reviewed.
    review_limiter: Mutex<RateLimiter>,
    reviews: Mutex<ReviewCache>,
    bans: Store<PortSentryBan>,
    /// The shared ban watch: says when `bans` holds its first list.
    ban_watch: Shared<PortSentryBan>,
    operator_namespace: String,
    expected: Expected,
    leader: watch::Receiver<bool>,
    recorder: Recorder,
    hooks: Option<Hooks>,
    /// Per policy ("namespace/name"), one report judged and written at a time: two reports
    /// about one source never race; reports for other policies never wait (no lock is shared
    /// across policies while API calls are made).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// This intake's own ban writes of the last [`RECENT`], by (namespace, name): the store
    /// may not show them yet.
    recent: Mutex<HashMap<(String, String), (Instant, PortSentryBanSpec)>>,
    grouping: bans::Ipv6Grouping,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("operator_namespace", &self.operator_namespace)
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// The intake; the store of `bans` (the shared ban watch) is its ban cache for the
    /// per-policy cap.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        guards: crate::enforce::guards::ProtectedSet,
        leader: watch::Receiver<bool>,
        settings: Settings,
        bans: &Shared<PortSentryBan>,
    ) -> Arc<Self> {
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), settings.reporter),
            hooks: settings.hooks,
            client,
            metrics,
            guards,
            limiter: Mutex::new(RateLimiter::new(
                settings.limits.burst,
                settings.limits.per_second,
                settings.limits.max_reporters,
            )),
            review_limiter: Mutex::new(RateLimiter::new(
                settings.limits.review_burst,
                settings.limits.review_per_second,
                settings.limits.max_reporters,
            )),
            reviews: Mutex::new(ReviewCache::default()),
            bans: bans.store(),
            ban_watch: bans.clone(),
            operator_namespace: settings.operator_namespace,
            expected: settings.expected,
            leader,
            locks: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
            grouping: settings.grouping,
        })
    }

    /// Waits until the ban cache (the per-policy cap) has had its first full list.
    pub async fn ready(&self) {
        let _ = self.ban_watch.ready().await;
    }

    /// Answers one request from `peer`, its body read with `bodies`.
    pub async fn handle(
        &self,
        peer: IpAddr,
        request: Request<Incoming>,
        bodies: &Bodies,
    ) -> Response<Full<Bytes>> {
        let received = Instant::now();
        if request.uri().path() != PATH {
            return answer(404, "not found\n".into(), "text/plain", None);
        }
        if !*self.leader.borrow() {
            return answer(503, "not the leader; retry\n".into(), "text/plain", Some(1));
        }
        if request.method() != Method::POST {
            return answer(405, "only POST\n".into(), "text/plain", None);
        }
        match self.take(peer, request, bodies, received).await {
            Ok(outcome) => {
                self.metrics.report_accepted();
                let body = serde_json::to_string(&outcome).unwrap_or_else(|_| "{}".into());
                answer(200, body, "application/json", None)
            }
            Err(Failure::Refused(refusal)) => {
                self.metrics.report_refused(refusal.metric_reason());
                debug!(%refusal, "report refused");
                let (status, body, retry_after) = refusal_answer(&refusal);
                answer(status, body, "application/json", retry_after)
            }
            Err(Failure::Body(error)) => {
                self.metrics.report_refused("body_unread");
                debug!(%error, "report body not read");
                error.answer()
            }
            Err(Failure::Internal(error)) => {
                self.metrics.report_refused("internal");
                warn!(%error, "report could not be handled");
                let body = serde_json::json!({"reason": "internal", "message": error.to_string()});
                answer(503, body.to_string(), "application/json", Some(1))
            }
        }
    }

    async fn take(
        &self,
        peer: IpAddr,
        request: Request<Incoming>,
        bodies: &Bodies,
        received: Instant,
    ) -> Result<ReportOutcome, Failure> {
        let token = bearer(
            request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
        .map(str::to_owned);
        let authentication = self.authenticate(peer, token.as_deref()).await?;
        debug!(took = ?received.elapsed(), "token reviewed");
        if let Authentication::Forged {
            namespace,
            pod,
            why,
        } = &authentication
        {
            self.pod_event(namespace, pod, &Refusal::NotInjected(why.clone()));
        }
        let reporter = intake::authenticate(authentication)?;
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&reporter.key(), Instant::now())?;
        let body = bodies.read(request).await?;
        let report = intake::parse(&body)?;
        let (namespaced, cluster) = self.find_policy(&report, &reporter).await?;
        let governing = namespaced
            .as_ref()
            .map(Governing::Namespaced)
            .or(cluster.as_ref().map(Governing::Cluster));
        if let Err(refusal) = intake::authorize(&report, &reporter, governing) {
            self.refusal_event(&reporter, &refusal);
            return Err(refusal.into());
        }
        let governing = governing.ok_or(Refusal::PolicyNotFound)?;
        let admitted = intake::Admitted { reporter, report };
        self.judge_and_write(&admitted, governing, received).await
    }

    /// A Warning Event on the sending pod for a report about a policy it may not report
    /// for (rate-limit refusals get none: a flood would become a flood of Events).
    fn refusal_event(&self, reporter: &Reporter, refusal: &Refusal) {
        if let Reporter::Pod {
            namespace, name, ..
        } = reporter
        {
            self.pod_event(namespace, name, refusal);
        }
    }

    /// A Warning Event `ReportRefused` on pod `namespace/name` saying why.
    fn pod_event(&self, namespace: &str, name: &str, refusal: &Refusal) {
        let object = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "ReportRefused".into(),
            note: Some(refusal.to_string()),
            action: "Report".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &object).await {
                debug!(%error, "could not publish the refusal event");
            }
        });
    }

    /// The lock of one policy's reports (entries no report holds are dropped as the map grows).
    fn policy_lock(&self, policy_key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() >= MAX_LOCKS {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(policy_key.to_owned()).or_default().clone()
    }

    /// This intake's writes of the last [`RECENT`] in `namespace`, by name.
    fn recent_writes(&self, namespace: &str) -> Vec<(String, PortSentryBanSpec)> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|_, (at, _)| at.elapsed() < RECENT);
        recent
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, name), (_, spec))| (name.clone(), spec.clone()))
            .collect()
    }

    fn remember_write(&self, namespace: &str, name: &str, spec: &PortSentryBanSpec) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= MAX_RECENT {
            recent.clear();
        }
        recent.insert(
            (namespace.to_owned(), name.to_owned()),
            (Instant::now(), spec.clone()),
        );
    }

    /// A Warning Event `BanRefused` on the policy naming each protected source of a report
    /// and why it is never banned (one Event per report, bounded).
    fn refused_bans_event(
        &self,
        admitted: &intake::Admitted,
        outcomes: &[DetectionOutcome],
        policy: &k8s_openapi::api::core::v1::ObjectReference,
    ) {
        let refused: Vec<String> = admitted
            .report
            .detections
            .iter()
            .zip(outcomes)
            .filter_map(|(d, o)| match o {
                DetectionOutcome::Protected(why) => Some(format!("{} ({why})", d.source)),
                _ => None,
            })
            .collect();
        if refused.is_empty() {
            return;
        }
        let note = format!(
            "{} source(s) reported by {} are protected and never banned: {}",
            refused.len(),
            admitted.reporter.key(),
            refused.join(", ")
        );
        let event = Event {
            type_: EventType::Warning,
            reason: "BanRefused".into(),
            note: Some(crate::names::bounded(&note, 1024)),
            action: "Report".into(),
            secondary: None,
        };
        let (recorder, policy) = (self.recorder.clone(), policy.clone());
        tokio::spawn(async move {
            if let Err(error) = recorder.publish(&event, &policy).await {
                debug!(%error, "could not publish the refusal event");
            }
        });
    }

    /// The sensor a token belongs to: remembered, or reviewed if `peer` may cause another
    /// review (a known sensor is never held up by a flood of bad tokens from elsewhere).
    async fn authenticate(
        &self,
        peer: IpAddr,
        token: Option<&str>,
    ) -> Result<Authentication, Failure> {
        let Some(token) = token else {
            return Ok(Authentication::Missing);
        };
        let cached = self
            .reviews
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token, Instant::now());
        if let Some(reporter) = cached {
            return Ok(Authentication::Sensor(reporter));
        }
        self.review_limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(&peer.to_string(), Instant::now())?;
        let authentication = self.review(token).await?;
        if let Authentication::Sensor(reporter) = &authentication {
            self.reviews.lock().unwrap_or_else(|p| p.into_inner()).put(
                token,
                reporter.clone(),
                Instant::now(),
            );
        }
        Ok(authentication)
    }

    async fn review(&self, token: &str) -> Result<Authentication> {
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review::request(token))
            .await?;
        let pod_token = match review::identity(reviewed.status.as_ref()) {
            review::TokenIdentity::Invalid => return Ok(Authentication::Invalid),
            review::TokenIdentity::NotAPod => return Ok(Authentication::NotASensor),
            review::TokenIdentity::Pod(pod_token) => pod_token,
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &pod_token.namespace)
            .get_opt(&pod_token.pod_name)
            .await?;
        let namespace_labels = Api::<Namespace>::all(self.client.clone())
            .get_opt(&pod_token.namespace)
            .await?
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        let node_name = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.node_name.clone());
        let node_labels = match (&node_name, pod_token.namespace == self.operator_namespace) {
            (Some(node), true) => Api::<Node>::all(self.client.clone())
                .get_opt(node)
                .await?
                .map(|n| n.labels().clone()),
            _ => None,
        };
        Ok(review::reporter(
            &pod_token,
            pod.as_ref(),
            &namespace_labels,
            &self.expected,
            node_labels.as_ref(),
        ))
    }

    async fn find_policy(
        &self,
        report: &Report,
        reporter: &Reporter,
    ) -> Result<(Option<PortSentryPolicy>, Option<ClusterPortSentryPolicy>)> {
        match (report.policy.kind, reporter) {
            (PolicyKind::PortSentryPolicy, Reporter::Pod { namespace, .. }) => {
                let found = Api::<PortSentryPolicy>::namespaced(self.client.clone(), namespace)
                    .get_opt(&report.policy.name)
                    .await?;
                Ok((found, None))
            }
            (PolicyKind::PortSentryPolicy, Reporter::Node { .. }) => Ok((None, None)),
            (PolicyKind::ClusterPortSentryPolicy, _) => {
                let found = Api::<ClusterPortSentryPolicy>::all(self.client.clone())
                    .get_opt(&report.policy.name)
                    .await?;
                Ok((None, found))
            }
        }
    }

    async fn judge_and_write(
        &self,
        admitted: &intake::Admitted,
        governing: Governing<'_>,
        received: Instant,
    ) -> Result<ReportOutcome, Failure> {
        let (policy_name, rules, object_ref) = match governing {
            Governing::Namespaced(p) => (p.name_any(), &p.spec.rules, p.object_ref(&())),
            Governing::Cluster(p) => (p.name_any(), &p.spec.rules, p.object_ref(&())),
        };
        let namespace = ban_namespace(governing, &self.operator_namespace);
        let policy_key = format!("{namespace}/{policy_name}");
        let api = Api::<PortSentryBan>::namespaced(self.client.clone(), &namespace);
        let lock = self.policy_lock(&policy_key);
        let _one_writer = lock.lock().await;
        // No API reads: the shared ban watch's store, overlaid with this intake's own writes
        // it may not show yet. A report costs at most one write per distinct source.
        let now = Timestamp::now();
        let kind = admitted.report.policy.kind;
        let state = self.bans.state();
        let mut existing: HashMap<String, PortSentryBanSpec> = HashMap::new();
        let mut stored: HashMap<String, &PortSentryBanSpec> = state
            .iter()
            .filter(|b| {
                b.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && b.spec.policy.kind == kind
                    && b.spec.policy.name == policy_name
            })
            .map(|b| (b.name_any(), &b.spec))
            .collect();
        for (name, spec) in self.recent_writes(&namespace) {
            if spec.policy.kind == kind && spec.policy.name == policy_name {
                stored.remove(&name);
                existing.insert(name, spec);
            }
        }
        let in_force = existing
            .values()
            .chain(stored.values().copied())
            .filter(|s| bans::is_active(s, now));
        let sources: Vec<SourcePrefix> = in_force.map(|s| s.source).collect();
        let active = intake::Active {
            count: sources.len(),
            sources,
            grouping: self.grouping,
        };
        let lookup = |name: &str| {
            existing
                .get(name)
                .cloned()
                .or_else(|| stored.get(name).map(|s| (*s).clone()))
        };
        let guards = self.guards.snapshot();
        let (outcomes, mut writes) =
            intake::judge_report(admitted, &policy_name, rules, &guards, lookup, active, now)?;
        for write in &mut writes {
            write.confined_to = intake::confinement(
                governing,
                &write.spec,
                &admitted.reporter,
                &self.operator_namespace,
            );
        }
        let params = PatchParams::apply(labels::MANAGER).force();
        for write in &writes {
            let ban = ban_object(write, &namespace);
            api.patch(&write.name, &params, &Patch::Apply(&ban)).await?;
            self.remember_write(&namespace, &write.name, &write.spec);
            self.metrics.ban_written(&policy_key, &write.name, received);
        }
        self.metrics.detections(&outcomes);
        self.refused_bans_event(admitted, &outcomes, &object_ref);
        if let Some(hooks) = self
            .hooks
            .as_ref()
            .filter(|_| !rules.response.webhooks.is_empty())
        {
            let targets = &rules.response.webhooks;
            for write in &writes {
                hooks.notify(
                    targets,
                    &hooks::payload(hooks::Kind::Ban, &namespace, &write.name, &write.spec),
                );
            }
            let alerts = admitted.report.detections.iter().zip(&outcomes).filter(
                |(_, o)| matches!(o, DetectionOutcome::Alerted(why) if why == "action_hook"),
            );
            for (detection, _) in alerts {
                hooks.notify(
                    targets,
                    &hooks::alert_payload(&namespace, &admitted.report.policy, detection.source),
                );
            }
        }
        if !writes.is_empty() {
            let added = writes
                .iter()
                .filter(|w| !lookup(&w.name).is_some_and(|s| bans::is_active(&s, now)))
                .count();
            self.metrics.bans_added(added);
            let sources: Vec<String> = writes.iter().map(|w| w.spec.source.to_string()).collect();
            info!(
                policy = %policy_key,
                reporter = %admitted.reporter.key(),
                took = ?received.elapsed(),
                bans = ?sources,
                "report accepted: bans written"
            );
            let note = format!(
                "{} ban(s) written on a report of {}: {}",
                writes.len(),
                admitted.reporter.key(),
                sources.join(", ")
            );
            let recorder = self.recorder.clone();
            tokio::spawn(async move {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "Banned".into(),
                    note: Some(crate::names::bounded(&note, 1024)),
                    action: "Report".into(),
                    secondary: None,
                };
                if let Err(error) = recorder.publish(&event, &object_ref).await {
                    debug!(%error, "could not publish the ban event");
                }
            });
        }
        Ok(ReportOutcome { results: outcomes })
    }
}

fn answer(
    status: u16,
    body: String,
    content_type: &'static str,
    retry_after: Option<u64>,
) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = http::answer(status, content_type, body);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

/// Serves the intake over TLS on `listener` within [`serving_limits`] until accepting
/// fails; each connection uses the latest config of `tls`.
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    intake: Arc<Intake>,
) -> std::io::Result<()> {
    http::serve(
        listener,
        Some(tls),
        serving_limits(),
        move |request, connection| {
            let intake = intake.clone();
            async move {
                intake
                    .handle(connection.peer.ip(), request, &connection.bodies)
                    .await
            }
        },
    )
    .await
}

/// The intake from start to serving on `addr`: its ban cache synced, its address bound, then
/// served (its TLS is loaded before). `readiness`'s [`READY`] condition says which step it is
/// at. Returns only with an error saying which step failed.
pub async fn run(
    addr: std::net::SocketAddr,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    intake: Arc<Intake>,
    readiness: Readiness,
) -> Result<()> {
    readiness.not_ready(READY, "ban cache not synced yet");
    intake.ready().await;
    readiness.not_ready(READY, format!("not listening on {addr} yet"));
    let listener = http::bind("report intake", addr, http::BIND_PATIENCE).await?;
    info!(%addr, "serving POST {PATH}");
    readiness.ready(READY);
    let served = serve(listener, tls, intake).await;
    let error = Error::Serve {
        server: "report intake",
        source: served
            .err()
            .unwrap_or_else(|| std::io::ErrorKind::Other.into()),
    };
    readiness.not_ready(READY, error.to_string());
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::review::REVIEW_TTL;

    #[test]
    fn only_a_bearer_authorization_carries_a_token() {
        assert_eq!(bearer(Some("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn a_reviewed_sensor_is_remembered_for_the_ttl_only() {
        let reporter = Reporter::Node {
            name: "n1".into(),
            labels: BTreeMap::new(),
        };
        let mut cache = ReviewCache::default();
        let t0 = Instant::now();
        cache.put("token-a", reporter.clone(), t0);
        assert_eq!(
            cache.get("token-a", t0 + Duration::from_secs(1)),
            Some(reporter)
        );
        assert_eq!(cache.get("token-b", t0), None);
        assert_eq!(cache.get("token-a", t0 + REVIEW_TTL), None);
    }

    #[test]
    fn a_rate_limit_answer_says_when_to_retry() {
        let (status, body, retry) = refusal_answer(&Refusal::RateLimited {
            retry_after: Duration::from_millis(200),
        });
        assert_eq!((status, retry), (429, Some(1)));
        assert!(body.contains("rate_limited"));
        let (status, _, retry) = refusal_answer(&Refusal::NotGoverned);
        assert_eq!((status, retry), (403, None));
    }

    #[test]
    fn a_ban_object_carries_its_policy_label() {
        let spec: portsentry_crds::PortSentryBanSpec = serde_json::from_value(serde_json::json!({
            "source": "203.0.113.7",
            "policy": {"kind": "PortSentryPolicy", "name": "web"},
        }))
        .unwrap();
        let ban = ban_object(
            &BanWrite {
                name: "web-v4-203-0-113-7".into(),
                spec,
                confined_to: None,
            },
            "shop",
        );
        assert_eq!(ban.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(ban.labels()[labels::POLICY_LABEL], "web");
    }
}
