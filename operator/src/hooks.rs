//! Alert hooks: a JSON POST to each of a policy's webhook targets per ban, expiry and
//! hook-only alert, retried with backoff under the target's timeout, off the enforcement path.
//!
//! `notify` only queues (a full queue drops and counts); a worker delivers, at most
//! `CONCURRENCY` posts at once and `PER_POLICY` of one policy. A failing hook is counted and
//! logged, never awaited by anyone; a target refused by [`targets`] is an Event on its policy.

pub mod targets;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use portsentry_crds::{PortSentryBanSpec, WebhookTarget};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};
use tracing::{debug, warn};

use self::targets::{Refusal, TargetRules};
use crate::{Error, Result, labels, metrics::Metrics};

/// Deliveries waiting; beyond it new ones are dropped and counted.
pub const QUEUE: usize = 4096;
/// Posts in flight at once.
pub const CONCURRENCY: usize = 32;
/// Posts of one policy in flight at once: one policy's slow hooks leave the others' slots.
pub const PER_POLICY: usize = 4;
/// Deliveries of one policy waiting for a slot; beyond it its new ones are dropped.
pub const PER_POLICY_WAITING: usize = 256;
/// The longest a delivery attempt may take, whatever the policy says (the CRD caps it too).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a hook's answer read (the rest is dropped with the connection).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Attempts per delivery, and the wait before the second (doubled after).
pub const ATTEMPTS: u32 = 3;
pub const FIRST_RETRY: Duration = Duration::from_millis(500);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ban,
    Expiry,
    /// A detection under `action: Hook`: no ban, only the hooks.
    Alert,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Ban => "ban",
            Kind::Expiry => "expiry",
            Kind::Alert => "alert",
        }
    }
}

/// The JSON body of a hook (the cluster's KILL_RUN_CMD).
pub fn payload(kind: Kind, namespace: &str, ban: &str, spec: &PortSentryBanSpec) -> Value {
    json!({
        "event": kind.as_str(),
        "namespace": namespace,
        "ban": ban,
        "source": spec.source.to_string(),
        "policy": {"kind": spec.policy.kind, "name": spec.policy.name},
        "offences": spec.offences,
        "expiresAt": spec.expires_at.as_ref().map(|t| t.0.to_string()),
        "reason": spec.reason,
    })
}

/// The JSON body of a hook-only alert (`action: Hook`): no ban exists.
pub fn alert_payload(
    namespace: &str,
    policy: &portsentry_crds::PolicyRef,
    source: std::net::IpAddr,
) -> Value {
    json!({
        "event": Kind::Alert.as_str(),
        "namespace": namespace,
        "source": source.to_canonical().to_string(),
        "policy": {"kind": policy.kind, "name": policy.name},
    })
}

/// Wait before attempt `attempt` (2, 3, ...): 500 ms, 1 s, 2 s...
pub fn retry_wait(attempt: u32) -> Duration {
    FIRST_RETRY * 2u32.saturating_pow(attempt.saturating_sub(2))
}

/// True when an answer is worth retrying (no answer, 408, 429, 5xx).
pub fn retryable(status: Option<u16>) -> bool {
    matches!(status, None | Some(408 | 429 | 500..=599))
}

/// The policy a delivery is for, as its payload names it (`policy.kind`, `policy.name`,
/// and `namespace` for a namespaced policy): the unit of fair sharing and of Events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl PolicyKey {
    pub fn of_payload(payload: &Value) -> Self {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let kind = text(&payload["policy"]["kind"]);
        let namespace = (kind != "ClusterPortSentryPolicy").then(|| text(&payload["namespace"]));
        Self {
            kind,
            namespace,
            name: text(&payload["policy"]["name"]),
        }
    }

    fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("portsentry.io/v1alpha1".into()),
            kind: Some(self.kind.clone()),
            namespace: self.namespace.clone(),
            name: Some(self.name.clone()),
            ..ObjectReference::default()
        }
    }
}

#[derive(Debug)]
struct Delivery {
    policy: PolicyKey,
    target: WebhookTarget,
    body: Bytes,
}

/// How hooks are delivered, from the operator's flags.
#[derive(Default)]
pub struct HookSettings {
    /// PEM trusted for https:// hooks besides the system's roots.
    pub extra_ca_pem: Option<String>,
    /// Targets allowed although an address rule refuses them (`--hook-allow-cidr`).
    pub allow: Vec<IpNet>,
    /// The cluster's pod and service ranges besides those read from the cluster.
    pub cluster_ranges: Vec<IpNet>,
    /// Publishes refusals as Events and reads the cluster's ranges; none in unit tests.
    pub client: Option<Client>,
}

impl std::fmt::Debug for HookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookSettings")
            .field("allow", &self.allow)
            .field("cluster_ranges", &self.cluster_ranges)
            .field("client", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// What every delivery task shares.
struct Shared {
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    rules: Arc<TargetRules>,
    recorder: Option<Recorder>,
}

/// The handle that queues deliveries.
#[derive(Clone, Debug)]
pub struct Hooks {
    queue: mpsc::Sender<Delivery>,
    metrics: Arc<Metrics>,
}

impl Hooks {
    /// The handle and its worker: delivery and, with a client, the refresh of the cluster's
    /// ranges (run it: it ends only when every handle is gone).
    pub fn start(
        metrics: Arc<Metrics>,
        settings: HookSettings,
    ) -> Result<(Self, impl Future<Output = ()> + Send + 'static)> {
        let tls = Arc::new(client_tls(settings.extra_ca_pem.as_deref())?);
        let rules = Arc::new(TargetRules::new(settings.allow, settings.cluster_ranges));
        let refresh = settings
            .client
            .clone()
            .map(|client| targets::refresh_cluster_ranges(client, rules.clone()));
        let recorder = settings.client.map(|client| {
            let reporter = Reporter {
                controller: labels::MANAGER.into(),
                instance: None,
            };
            Recorder::new(client, reporter)
        });
        let shared = Arc::new(Shared {
            tls,
            metrics: metrics.clone(),
            rules,
            recorder,
        });
        let (queue, receiver) = mpsc::channel(QUEUE);
        let worker = async move {
            let refresh = async move {
                match refresh {
                    Some(refresh) => refresh.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = deliver_all(receiver, shared) => {}
                () = refresh => {}
            }
        };
        Ok((Self { queue, metrics }, worker))
    }

    /// Queues `payload` for every target; never waits.
    pub fn notify(&self, targets: &[WebhookTarget], payload: &Value) {
        let body = Bytes::from(payload.to_string());
        let policy = PolicyKey::of_payload(payload);
        for target in targets {
            let delivery = Delivery {
                policy: policy.clone(),
                target: target.clone(),
                body: body.clone(),
            };
            if self.queue.try_send(delivery).is_err() {
                self.metrics.hook_delivery("dropped");
            }
        }
    }
}

fn hook_ca_error(detail: String) -> Error {
    Error::Certificate {
        what: "--hook-ca-file (a PEM CA bundle)".into(),
        detail,
    }
}

fn client_tls(extra_ca_pem: Option<&str>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(pem) = extra_ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| hook_ca_error(e.to_string()))?;
            roots.add(cert).map_err(|e| hook_ca_error(e.to_string()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Certificate {
        what: "alert hooks' TLS client".into(),
        detail: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One policy's share of the delivery slots.
#[derive(Debug)]
struct Lane {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

async fn deliver_all(mut queue: mpsc::Receiver<Delivery>, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut lanes: HashMap<PolicyKey, Arc<Lane>> = HashMap::new();
    while let Some(delivery) = queue.recv().await {
        if lanes.len() > 1024 {
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
        }
        let lane = lanes.entry(delivery.policy.clone()).or_insert_with(|| {
            Arc::new(Lane {
                slots: Arc::new(Semaphore::new(PER_POLICY)),
                waiting: AtomicUsize::new(0),
            })
        });
        if lane.waiting.fetch_add(1, Ordering::Relaxed) >= PER_POLICY_WAITING {
            lane.waiting.fetch_sub(1, Ordering::Relaxed);
            shared.metrics.hook_delivery("dropped");
            continue;
        }
        let (lane, slots, shared) = (lane.clone(), slots.clone(), shared.clone());
        tokio::spawn(async move {
            // The policy's own slot first: waiting for it holds none of the shared ones.
            let Ok(own) = lane.slots.clone().acquire_owned().await else {
                return;
            };
            let Ok(slot) = slots.acquire_owned().await else {
                return;
            };
            lane.waiting.fetch_sub(1, Ordering::Relaxed);
            let result = deliver(&delivery, &shared).await;
            shared.metrics.hook_delivery(result);
            drop((slot, own));
        });
    }
}

/// Up to `ATTEMPTS` posts, each bounded by the target's timeout (at most [`MAX_TIMEOUT`]):
/// `delivered` once one got a 2xx, `refused` when the target's address is not allowed.
async fn deliver(delivery: &Delivery, shared: &Shared) -> &'static str {
    let timeout = delivery.target.timeout.as_std().min(MAX_TIMEOUT);
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(retry_wait(attempt)).await;
        }
        let status = match tokio::time::timeout(timeout, post(delivery, shared)).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(Failure::Refused(refusal))) => {
                refuse(delivery, shared, refusal).await;
                return "refused";
            }
            Ok(Err(Failure::Other(error))) => {
                debug!(url = %delivery.target.url, %error, attempt, "alert hook attempt failed");
                None
            }
            Err(_) => {
                debug!(url = %delivery.target.url, attempt, "alert hook attempt timed out");
                None
            }
        };
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return "delivered";
        }
        if !retryable(status) {
            break;
        }
    }
    warn!(url = %delivery.target.url, "alert hook failed");
    "failed"
}

/// Counts a refused target and tells the policy's owner with a Warning Event.
async fn refuse(delivery: &Delivery, shared: &Shared, refusal: Refusal) {
    shared.metrics.hook_refused(refusal.as_str());
    warn!(url = %delivery.target.url, reason = refusal.as_str(), "alert hook target refused");
    let Some(recorder) = &shared.recorder else {
        return;
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "HookRefused".into(),
        note: Some(format!(
            "alert hook {} refused: it resolves to a {} address; hooks may not reach \
             loopback, link-local, metadata or the cluster's pod/service addresses unless \
             the operator allows the CIDR (chart value operator.hooks.allowCidrs)",
            delivery.target.url,
            refusal.as_str().replace('_', "-"),
        )),
        action: "Notify".into(),
        secondary: None,
    };
    if let Err(error) = recorder
        .publish(&event, &delivery.policy.object_ref())
        .await
    {
        warn!(%error, "could not publish event");
    }
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// The target's host resolves to an address the rules refuse: never retried.
    Refused(Refusal),
    Other(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Other(error.to_string())
    }
}

/// Connects to one of `addresses` (each already checked): never to a fresh resolution.
async fn connect(addresses: &[SocketAddr]) -> std::result::Result<tokio::net::TcpStream, Failure> {
    let mut last = Failure::Other("no address".into());
    for address in addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error.into(),
        }
    }
    Err(last)
}

async fn post(delivery: &Delivery, shared: &Shared) -> std::result::Result<u16, Failure> {
    let uri: Uri = delivery.target.url.parse()?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("not an http(s) URL".into()),
    };
    let host = uri
        .host()
        .ok_or("no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .collect();
    if let Some(refusal) = shared.rules.check_all(&addresses) {
        return Err(Failure::Refused(refusal));
    }
    let tcp = connect(&addresses).await?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = Request::post(path)
        .header(header::HOST, format!("{host}:{port}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(delivery.body.clone()))?;
    let status = if https {
        let name = ServerName::try_from(host)?;
        let stream = TlsConnector::from(shared.tls.clone())
            .connect(name, tcp)
            .await?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    Ok(status)
}

/// Sends `request` and reads at most [`MAX_RESPONSE`] bytes of the answer's body.
async fn send<I>(io: I, request: Request<Full<Bytes>>) -> std::result::Result<u16, Failure>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let _ = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await;
    // An answer longer than the cap is not read on: its connection goes now.
    connection.abort();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_names_the_event_ban_and_source() {
        let spec: PortSentryBanSpec = serde_json::from_value(json!({
            "source": "203.0.113.7",
            "policy": {"kind": "PortSentryPolicy", "name": "web"},
            "offences": 2,
        }))
        .unwrap();
        let body = payload(Kind::Ban, "shop", "web-v4-203-0-113-7", &spec);
        assert_eq!(body["event"], "ban");
        assert_eq!(body["source"], "203.0.113.7");
        assert_eq!(body["policy"]["name"], "web");
        assert_eq!(body["offences"], 2);
        assert_eq!(payload(Kind::Expiry, "shop", "x", &spec)["event"], "expiry");
    }

    #[test]
    fn a_delivery_belongs_to_the_policy_its_payload_names() {
        let spec: PortSentryBanSpec = serde_json::from_value(json!({
            "source": "203.0.113.7",
            "policy": {"kind": "PortSentryPolicy", "name": "web"},
        }))
        .unwrap();
        let key = PolicyKey::of_payload(&payload(Kind::Ban, "shop", "b", &spec));
        assert_eq!(key.namespace.as_deref(), Some("shop"));
        assert_eq!(
            (key.kind.as_str(), key.name.as_str()),
            ("PortSentryPolicy", "web")
        );
        let cluster = PolicyKey::of_payload(&json!({
            "namespace": "portsentry-system",
            "policy": {"kind": "ClusterPortSentryPolicy", "name": "nodes"},
        }));
        assert_eq!(cluster.namespace, None);
    }

    /// A loopback HTTP target: `answer` is written after each request's headers are read
    /// (`None`: the connection is held without an answer). Accepted connections are counted
    /// on `accepted`.
    async fn target(answer: Option<Vec<u8>>, accepted: mpsc::UnboundedSender<()>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = accepted.send(());
                let Some(answer) = answer.clone() else {
                    held.push(stream);
                    continue;
                };
                tokio::spawn(async move {
                    let mut buffer = vec![0; 4096];
                    let _ = stream.read(&mut buffer).await;
                    let _ = stream.write_all(&answer).await;
                });
            }
        });
        url
    }

    fn hooks_allowing_loopback() -> Hooks {
        let settings = HookSettings {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            ..HookSettings::default()
        };
        let (hooks, worker) = Hooks::start(Arc::new(Metrics::new().unwrap()), settings).unwrap();
        tokio::spawn(worker);
        hooks
    }

    fn webhook(url: &str, timeout: &str) -> WebhookTarget {
        serde_json::from_value(json!({"url": url, "timeout": timeout})).unwrap()
    }

    fn alert(namespace: &str) -> Value {
        alert_payload(
            namespace,
            &serde_json::from_value(json!({"kind": "PortSentryPolicy", "name": "web"})).unwrap(),
            "203.0.113.7".parse().unwrap(),
        )
    }

    #[tokio::test]
    async fn one_policys_stuck_hooks_leave_the_shared_slots_to_the_others() {
        let (stuck_tx, mut stuck) = mpsc::unbounded_channel();
        let (fine_tx, mut fine) = mpsc::unbounded_channel();
        let stuck_url = target(None, stuck_tx).await;
        let fine_url = target(
            Some(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
            fine_tx,
        )
        .await;
        let hooks = hooks_allowing_loopback();
        let stuck_target = [webhook(&stuck_url, "30s")];
        for _ in 0..CONCURRENCY * 2 {
            hooks.notify(&stuck_target, &alert("noisy"));
        }
        // The noisy policy's own slots fill; the other policy's delivery still goes at once.
        for _ in 0..PER_POLICY {
            tokio::time::timeout(Duration::from_secs(5), stuck.recv())
                .await
                .unwrap();
        }
        hooks.notify(&[webhook(&fine_url, "5s")], &alert("quiet"));
        tokio::time::timeout(Duration::from_secs(5), fine.recv())
            .await
            .expect("the quiet policy's hook waited for the noisy one's")
            .unwrap();
        assert!(
            stuck.try_recv().is_err(),
            "more than PER_POLICY posts of one policy at once"
        );
    }

    #[tokio::test]
    async fn a_huge_answer_is_read_only_to_the_cap() {
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        // Claims 1 GiB and sends 1 MiB of it: the client stops at MAX_RESPONSE and goes.
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n".to_vec();
        answer.extend(std::iter::repeat_n(b'x', 1 << 20));
        let url = target(Some(answer), accepted_tx).await;
        let metrics = Arc::new(Metrics::new().unwrap());
        let settings = HookSettings {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            ..HookSettings::default()
        };
        let (hooks, worker) = Hooks::start(metrics.clone(), settings).unwrap();
        tokio::spawn(worker);
        hooks.notify(&[webhook(&url, "20s")], &alert("shop"));
        accepted.recv().await.unwrap();
        let delivered = r#"portsentry_operator_hook_deliveries_total{result="delivered"} 1"#;
        let started = std::time::Instant::now();
        while !metrics.encode().unwrap().contains(delivered) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never delivered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn retries_back_off_and_only_for_transient_answers() {
        assert_eq!(retry_wait(2), FIRST_RETRY);
        assert_eq!(retry_wait(3), FIRST_RETRY * 2);
        assert!(retryable(None) && retryable(Some(503)) && retryable(Some(429)));
        assert!(!retryable(Some(400)) && !retryable(Some(404)));
    }
}
