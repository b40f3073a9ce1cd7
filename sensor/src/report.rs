//! `--report-url`: posts the engine's alarms to the operator as batched `Report`s over HTTPS,
//! retried with exponential backoff, from a bounded queue whose drops are counted.
//!
//! ```text
//!  Core::hit ──offer()──▶ bounded queue ──▶ report task: batch (≤256) ──POST /v1/reports──▶ operator
//!              (full: dropped, counted)              retry 5xx/429/transport with backoff;
//!                                                    token file re-read on every attempt
//! ```
//!
//! hyper's HTTP/1.1 client over tokio-rustls is used: both are already in the workspace's
//! lock (kube brings them), so the sensor adds no new crate and no OpenSSL.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use portsentry_crds::{
    PolicyKind, PolicyRef,
    report::{Detection, MAX_DETECTIONS_PER_REPORT, Probe, Report},
};
use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::sync::mpsc;
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};

use crate::{
    engine::Alarm,
    error::{Error, Result},
    metrics::Metrics,
};

/// Detections waiting to be sent; beyond it new ones are dropped and counted.
pub const QUEUE: usize = 4096;
/// First wait after a failed attempt; doubled per failure up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt (connect, TLS, request, answer) may take this long.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to report.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `https://host:port/v1/reports`.
    pub url: Uri,
    /// The projected service account token (audience portsentry.io), re-read per attempt.
    pub token_file: PathBuf,
    /// PEM CA bundle that signed the operator's serving certificate.
    pub ca_file: PathBuf,
    /// The policy this sensor runs for.
    pub policy: PolicyRef,
}

/// Parses `--report-policy`: `PortSentryPolicy/NAME` or `ClusterPortSentryPolicy/NAME`.
pub fn parse_policy(text: &str) -> Result<PolicyRef> {
    let (kind, name) = text
        .split_once('/')
        .ok_or_else(|| Error::Report(format!("--report-policy {text:?}: expected KIND/NAME")))?;
    let kind = match kind {
        "PortSentryPolicy" => PolicyKind::PortSentryPolicy,
        "ClusterPortSentryPolicy" => PolicyKind::ClusterPortSentryPolicy,
        other => {
            return Err(Error::Report(format!(
                "--report-policy: unknown kind {other:?} (PortSentryPolicy or ClusterPortSentryPolicy)"
            )));
        }
    };
    if name.is_empty() {
        return Err(Error::Report("--report-policy: empty name".into()));
    }
    Ok(PolicyRef {
        kind,
        name: name.to_owned(),
    })
}

/// The detection an alarm reports: its source and the probe that crossed the trigger.
pub fn detection(alarm: &Alarm, now: SystemTime) -> Detection {
    let hit = alarm.hit;
    Detection {
        source: hit.source.to_canonical(),
        probes: vec![Probe {
            port: hit.port,
            protocol: hit.protocol,
            kind: hit.kind,
            verified: hit.verified(),
            observed_at_ms: now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }],
    }
}

/// What to do after an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Accepted: the batch is done.
    Done,
    /// Worth retrying (transport error, 5xx, 429, 408), after at least this long.
    Retry(Duration),
    /// Refused for good (401, 403, 413, 422...): the batch is dropped and counted.
    GiveUp,
}

/// The next step after an attempt answered `status` (None: no answer), the `failures`-th.
pub fn next(status: Option<u16>, retry_after: Option<Duration>, failures: u32) -> Next {
    let backoff = FIRST_BACKOFF
        .checked_mul(
            1u32.checked_shl(failures.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF);
    match status {
        Some(200..=299) => Next::Done,
        None | Some(408 | 429 | 500..=599) => Next::Retry(
            retry_after
                .map_or(backoff, |r| r.max(backoff))
                .min(MAX_BACKOFF),
        ),
        Some(_) => Next::GiveUp,
    }
}

/// The handle `Core` offers alarms to.
#[derive(Clone, Debug)]
pub struct Reporter {
    queue: mpsc::Sender<Detection>,
    counters: Counters,
}

#[derive(Clone, Debug)]
struct Counters {
    /// Detections by fate: sent, dropped (queue full), refused (given up).
    detections: IntCounterVec,
    attempts_failed: IntCounter,
}

impl Reporter {
    /// Queues the alarm's detection; when the queue is full it is dropped and counted.
    pub fn offer(&self, alarm: &Alarm) {
        if self
            .queue
            .try_send(detection(alarm, SystemTime::now()))
            .is_err()
        {
            self.counters
                .detections
                .with_label_values(&["dropped"])
                .inc();
        }
    }
}

/// Starts the report task; its counters join `metrics`.
pub fn start(settings: Settings, metrics: &Metrics) -> Result<Reporter> {
    let detections = IntCounterVec::new(
        Opts::new(
            "report_detections_total",
            "Detections reported to the operator, by fate: sent, dropped (queue full), refused.",
        ),
        &["fate"],
    )?;
    let attempts_failed = IntCounter::new(
        "report_attempts_failed_total",
        "Report posts that failed and were retried or given up.",
    )?;
    metrics.register(Box::new(detections.clone()))?;
    metrics.register(Box::new(attempts_failed.clone()))?;
    let tls = Arc::new(client_tls(&settings.ca_file, false)?);
    let (queue, receiver) = mpsc::channel(QUEUE);
    let counters = Counters {
        detections,
        attempts_failed,
    };
    tokio::spawn(report_task(settings, tls, receiver, counters.clone()));
    Ok(Reporter { queue, counters })
}

/// A TLS client trusting the PEM certificates of `ca_file` (with `require_roots`, a file
/// holding none is an error).
fn client_tls(ca_file: &std::path::Path, require_roots: bool) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(ca_file)
        .map_err(|e| Error::Report(format!("--report-ca-file {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| Error::Report(format!("--report-ca-file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Report(format!("--report-ca-file: {e}")))?;
    }
    if require_roots && roots.is_empty() {
        return Err(Error::Report(format!(
            "--report-ca-file {} holds no certificate",
            ca_file.display()
        )));
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Report(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Takes what is queued (up to a report's worth) and posts it until it is done.
async fn report_task(
    settings: Settings,
    mut tls: Arc<rustls::ClientConfig>,
    mut queue: mpsc::Receiver<Detection>,
    counters: Counters,
) {
    let mut batch = Vec::with_capacity(MAX_DETECTIONS_PER_REPORT);
    while queue.recv_many(&mut batch, MAX_DETECTIONS_PER_REPORT).await > 0 {
        let report = Report {
            policy: settings.policy.clone(),
            detections: std::mem::take(&mut batch),
        };
        let count = report.detections.len() as u64;
        let fate = send(&settings, &mut tls, &report, &counters).await;
        counters.detections.with_label_values(&[fate]).inc_by(count);
    }
}

/// Posts one report, retrying with backoff: "sent" or "refused". Before each retry the CA
/// file is read again: a rotated CA (the ConfigMap's `ca.crt` updated) is trusted without a
/// restart; an unreadable or empty file keeps the previous roots.
async fn send(
    settings: &Settings,
    tls: &mut Arc<rustls::ClientConfig>,
    report: &Report,
    counters: &Counters,
) -> &'static str {
    let body = match serde_json::to_vec(report) {
        Ok(body) => Bytes::from(body),
        Err(_) => return "refused",
    };
    let mut failures = 0;
    loop {
        let answer = tokio::time::timeout(ATTEMPT_TIMEOUT, post(settings, tls, body.clone())).await;
        let (status, retry_after) = match answer {
            Ok(Ok(answer)) => (Some(answer.0), answer.1),
            Ok(Err(error)) => {
                tracing::warn!(%error, "report not delivered");
                (None, None)
            }
            Err(_) => {
                tracing::warn!("report timed out");
                (None, None)
            }
        };
        if status.is_some_and(|s| !(200..300).contains(&s)) {
            tracing::warn!(status, "report answered with an error");
        }
        failures += u32::from(!matches!(status, Some(200..=299)));
        match next(status, retry_after, failures) {
            Next::Done => return "sent",
            Next::GiveUp => {
                counters.attempts_failed.inc();
                return "refused";
            }
            Next::Retry(wait) => {
                counters.attempts_failed.inc();
                tokio::time::sleep(wait).await;
                if let Ok(fresh) = client_tls(&settings.ca_file, true) {
                    *tls = Arc::new(fresh);
                }
            }
        }
    }
}

/// One attempt: connect, TLS, POST with the current token; the status and Retry-After.
async fn post(
    settings: &Settings,
    tls: &Arc<rustls::ClientConfig>,
    body: Bytes,
) -> std::result::Result<(u16, Option<Duration>), String> {
    let host = settings
        .url
        .host()
        .ok_or("the report URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = settings.url.port_u16().unwrap_or(443);
    let token = std::fs::read_to_string(&settings.token_file).map_err(|e| {
        format!(
            "cannot read the token {}: {e}",
            settings.token_file.display()
        )
    })?;
    let server_name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let stream = TlsConnector::from(tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let path = settings
        .url
        .path_and_query()
        .map_or("/v1/reports", |p| p.as_str());
    let request = Request::post(path)
        .header(header::HOST, format!("{host}:{port}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let _ = response.into_body().collect().await;
    Ok((
        status.as_u16(),
        retry_after.filter(|_| status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_flag_names_a_kind_and_a_name() {
        let policy = parse_policy("PortSentryPolicy/web").unwrap();
        assert_eq!(
            (policy.kind, policy.name.as_str()),
            (PolicyKind::PortSentryPolicy, "web")
        );
        assert!(parse_policy("ClusterPortSentryPolicy/edge").is_ok());
        assert!(parse_policy("web").is_err());
        assert!(parse_policy("Pod/web").is_err());
        assert!(parse_policy("PortSentryPolicy/").is_err());
    }

    #[test]
    fn failures_back_off_exponentially_up_to_a_cap() {
        assert_eq!(next(None, None, 1), Next::Retry(FIRST_BACKOFF));
        assert_eq!(next(Some(503), None, 2), Next::Retry(FIRST_BACKOFF * 2));
        assert_eq!(next(None, None, 3), Next::Retry(FIRST_BACKOFF * 4));
        assert_eq!(next(None, None, 40), Next::Retry(MAX_BACKOFF));
    }

    #[test]
    fn a_rate_limit_waits_at_least_retry_after() {
        assert_eq!(
            next(Some(429), Some(Duration::from_secs(3)), 1),
            Next::Retry(Duration::from_secs(3))
        );
    }

    #[test]
    fn success_is_done_and_refusals_are_given_up() {
        assert_eq!(next(Some(200), None, 0), Next::Done);
        for status in [400, 401, 403, 413, 422] {
            assert_eq!(next(Some(status), None, 1), Next::GiveUp, "{status}");
        }
    }

    #[test]
    fn an_alarm_reports_its_source_and_probe() {
        let alarm = Alarm {
            hit: crate::packet::Hit {
                source: "::ffff:203.0.113.7".parse().unwrap(),
                port: 31337,
                protocol: portsentry_crds::Protocol::Tcp,
                kind: portsentry_crds::ProbeKind::Connect,
                captured: None,
            },
            count: 1,
            verified: true,
            total: 1,
            outcome: Err(crate::engine::NoBan::LogOnly),
        };
        let d = detection(&alarm, UNIX_EPOCH + Duration::from_millis(1234));
        assert_eq!(d.source, "203.0.113.7".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(d.probes[0].port, 31337);
        assert!(d.probes[0].verified);
        assert_eq!(d.probes[0].observed_at_ms, 1234);
    }
}
