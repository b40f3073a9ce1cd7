//! Alert hooks: a JSON POST to each of a policy's webhook targets per ban, expiry and
//! hook-only alert, retried with backoff under the target's timeout, off the enforcement path.
//!
//! `notify` only queues (a full queue drops and counts); a worker delivers, at most
//! `CONCURRENCY` posts at once. A failing hook is counted and logged, never awaited by anyone.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use portsentry_crds::{PortSentryBanSpec, WebhookTarget};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};
use tracing::{debug, warn};

use crate::{Error, Result, metrics::Metrics};

/// Deliveries waiting; beyond it new ones are dropped and counted.
pub const QUEUE: usize = 4096;
/// Posts in flight at once.
pub const CONCURRENCY: usize = 32;
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

#[derive(Debug)]
struct Delivery {
    target: WebhookTarget,
    body: Bytes,
}

/// The handle that queues deliveries.
#[derive(Clone, Debug)]
pub struct Hooks {
    queue: mpsc::Sender<Delivery>,
    metrics: Arc<Metrics>,
}

impl Hooks {
    /// The handle and its delivery worker (run it: it ends only when every handle is
    /// gone); `extra_ca_pem` is trusted besides the system's roots.
    pub fn start(
        metrics: Arc<Metrics>,
        extra_ca_pem: Option<&str>,
    ) -> Result<(Self, impl Future<Output = ()> + Send + 'static)> {
        let tls = Arc::new(client_tls(extra_ca_pem)?);
        let (queue, receiver) = mpsc::channel(QUEUE);
        let worker = deliver_all(receiver, tls, metrics.clone());
        Ok((Self { queue, metrics }, worker))
    }

    /// Queues `payload` for every target; never waits.
    pub fn notify(&self, targets: &[WebhookTarget], payload: &Value) {
        let body = Bytes::from(payload.to_string());
        for target in targets {
            let delivery = Delivery {
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

async fn deliver_all(
    mut queue: mpsc::Receiver<Delivery>,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(delivery) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tls, metrics) = (tls.clone(), metrics.clone());
        tokio::spawn(async move {
            let delivered = deliver(&delivery, &tls).await;
            metrics.hook_delivery(if delivered { "delivered" } else { "failed" });
            drop(slot);
        });
    }
}

/// Up to `ATTEMPTS` posts, each bounded by the target's timeout: true once one got a 2xx.
async fn deliver(delivery: &Delivery, tls: &Arc<rustls::ClientConfig>) -> bool {
    let timeout = delivery.target.timeout.as_std();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(retry_wait(attempt)).await;
        }
        let status = match tokio::time::timeout(timeout, post(delivery, tls)).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(error)) => {
                debug!(url = %delivery.target.url, %error, attempt, "alert hook attempt failed");
                None
            }
            Err(_) => {
                debug!(url = %delivery.target.url, attempt, "alert hook attempt timed out");
                None
            }
        };
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return true;
        }
        if !retryable(status) {
            break;
        }
    }
    warn!(url = %delivery.target.url, "alert hook failed");
    false
}

async fn post(
    delivery: &Delivery,
    tls: &Arc<rustls::ClientConfig>,
) -> std::result::Result<u16, String> {
    let uri: Uri = delivery.target.url.parse().map_err(|e| format!("{e}"))?;
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
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request = Request::post(path)
        .header(header::HOST, format!("{host}:{port}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(delivery.body.clone()))
        .map_err(|e| e.to_string())?;
    let status = if https {
        let name = ServerName::try_from(host).map_err(|e| e.to_string())?;
        let stream = TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    Ok(status)
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> std::result::Result<u16, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
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
    fn retries_back_off_and_only_for_transient_answers() {
        assert_eq!(retry_wait(2), FIRST_RETRY);
        assert_eq!(retry_wait(3), FIRST_RETRY * 2);
        assert!(retryable(None) && retryable(Some(503)) && retryable(Some(429)));
        assert!(!retryable(Some(400)) && !retryable(Some(404)));
    }
}
