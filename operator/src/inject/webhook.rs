//! The sidecar-injection admission webhook: `AdmissionReview` in, JSONPatch out (pure over a
//! snapshot of policies), the HTTPS endpoint `/mutate-pods`, and its caBundle.
//!
//! Its serving certificate comes from [`crate::tls`] (the shared CA, or cert-manager's files).
//!
//! A pod is never refused: one the webhook cannot decide on is admitted unchanged, the same
//! outcome as `failurePolicy: Ignore` when the webhook is down. Only a body that is no
//! AdmissionReview at all is answered as an invalid request.

use std::{future::Future, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{Namespace, Pod},
    },
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use portsentry_crds::{ClusterPortSentryPolicy, PortSentryPolicy};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, rustls};
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    inject::{self, Decision, Settings, Snapshot},
    tls::{CertFiles, shared_ca, tls_config},
};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/mutate-pods";
/// Largest request body read: an AdmissionReview of a large pod fits with room to spare.
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers one AdmissionReview (JSON bytes) with the response review, never refusing a pod.
pub fn review(
    body: &[u8],
    snapshot: &Snapshot,
    settings: &Settings,
) -> AdmissionReview<DynamicObject> {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return AdmissionResponse::invalid(format!("not an AdmissionReview of a Pod: {error}"))
                .into_review();
        }
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => {
            return AdmissionResponse::invalid("AdmissionReview without a request").into_review();
        }
    };
    mutate(&request, snapshot, settings).into_review()
}

/// The response to one pod admission request: allowed, with the injection patch if any.
pub fn mutate(
    request: &AdmissionRequest<Pod>,
    snapshot: &Snapshot,
    settings: &Settings,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.operation != Operation::Create {
        return response;
    }
    let (Some(pod), Some(namespace)) = (request.object.as_ref(), request.namespace.as_deref())
    else {
        return response;
    };
    match inject::decide(pod, namespace, snapshot, settings) {
        Decision::Skip(skip) => {
            debug!(namespace, reason = skip.reason(), "pod not injected");
            response
        }
        Decision::Inject(injection) => {
            let warnings: Vec<String> = injection
                .skipped
                .iter()
                .map(|s| {
                    format!("portsentry: decoy {s} skipped: a container of the pod declares it")
                })
                .collect();
            match response.clone().with_patch(injection.patch) {
                Ok(mut patched) => {
                    info!(namespace, policy = %injection.policy, skipped = injection.skipped.len(), "sensor injected");
                    if !warnings.is_empty() {
                        patched.warnings = Some(warnings);
                    }
                    patched
                }
                Err(error) => {
                    warn!(%error, "injection patch not serializable; pod admitted unchanged");
                    response
                }
            }
        }
    }
}

/// Live caches of what the webhook decides on; [`PolicyStores::snapshot`] copies them.
#[derive(Clone, Debug)]
pub struct PolicyStores {
    policies: Store<PortSentryPolicy>,
    cluster_policies: Store<ClusterPortSentryPolicy>,
    namespaces: Store<Namespace>,
}

impl PolicyStores {
    /// The current state as a [`Snapshot`].
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            policies: self
                .policies
                .state()
                .iter()
                .map(|p| (**p).clone())
                .collect(),
            cluster_policies: self
                .cluster_policies
                .state()
                .iter()
                .map(|p| (**p).clone())
                .collect(),
            namespaces: self
                .namespaces
                .state()
                .iter()
                .filter_map(|ns| {
                    Some((
                        ns.metadata.name.clone()?,
                        ns.metadata.labels.clone().unwrap_or_default(),
                    ))
                })
                .collect(),
        }
    }

    /// Waits until every cache has had its first full list.
    pub async fn ready(&self) {
        let _ = self.policies.wait_until_ready().await;
        let _ = self.cluster_policies.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }
}

/// Starts watching policies and namespaces: the stores, and the future that keeps them
/// current (spawn it; it runs until the process ends, retrying with backoff).
pub fn watch_policies(client: Client) -> (PolicyStores, impl Future<Output = ()> + Send + 'static) {
    use futures::StreamExt;
    let (policies, policy_writer) = reflector::store();
    let (cluster_policies, cluster_writer) = reflector::store();
    let (namespaces, namespace_writer) = reflector::store();
    let config = watcher::Config::default();
    let policy_stream = reflector::reflector(
        policy_writer,
        watcher(Api::<PortSentryPolicy>::all(client.clone()), config.clone()).default_backoff(),
    )
    .for_each(|_| std::future::ready(()));
    let cluster_stream = reflector::reflector(
        cluster_writer,
        watcher(
            Api::<ClusterPortSentryPolicy>::all(client.clone()),
            config.clone(),
        )
        .default_backoff(),
    )
    .for_each(|_| std::future::ready(()));
    let namespace_stream = reflector::reflector(
        namespace_writer,
        watcher(Api::<Namespace>::all(client), config).default_backoff(),
    )
    .for_each(|_| std::future::ready(()));
    let run = async move {
        futures::join!(policy_stream, cluster_stream, namespace_stream);
    };
    (
        PolicyStores {
            policies,
            cluster_policies,
            namespaces,
        },
        run,
    )
}

/// The JSONPatch that sets `caBundle` on every webhook of `config` (each guarded by a `test`
/// of its name, so a concurrent change of the list fails the patch instead of misplacing it).
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    ca_pem: &str,
) -> Result<json_patch::Patch> {
    let bundle = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec()))?;
    let mut ops: Vec<Value> = Vec::new();
    for (index, webhook) in config.webhooks.iter().flatten().enumerate() {
        ops.push(
            json!({"op": "test", "path": format!("/webhooks/{index}/name"), "value": webhook.name}),
        );
        ops.push(json!({"op": "add", "path": format!("/webhooks/{index}/clientConfig/caBundle"), "value": bundle}));
    }
    Ok(serde_json::from_value(Value::Array(ops))?)
}

/// Patches `ca_pem` into the MutatingWebhookConfiguration `name` (the chart's object).
pub async fn apply_ca_bundle(client: Client, name: &str, ca_pem: &str) -> Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let current = api.get(name).await?;
    let patch = ca_bundle_patch(&current, ca_pem)?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    info!(
        name,
        "caBundle patched into the MutatingWebhookConfiguration"
    );
    Ok(())
}

/// What the HTTPS handler needs: where policies come from and how sidecars are built.
#[derive(Clone, Debug)]
pub struct Webhook {
    pub stores: PolicyStores,
    pub settings: Arc<Settings>,
}

/// One HTTP answer: status and JSON body.
fn http_response(status: u16, body: &[u8], content_type: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Answers a request given its head and body (pure: for tests and for the server).
pub fn respond(head: &str, body: &[u8], snapshot: &Snapshot, settings: &Settings) -> Vec<u8> {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if path.split('?').next() != Some(PATH) {
        return http_response(404, b"not found\n", "text/plain");
    }
    if method != "POST" {
        return http_response(405, b"only POST\n", "text/plain");
    }
    match serde_json::to_vec(&review(body, snapshot, settings)) {
        Ok(json) => http_response(200, &json, "application/json"),
        Err(error) => http_response(500, error.to_string().as_bytes(), "text/plain"),
    }
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut data = Vec::with_capacity(4096);
    let mut buffer = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if data.len() > MAX_HEAD {
            return Ok(None);
        }
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if read == 0 {
            return Ok(None);
        }
        data.extend_from_slice(&buffer[..read]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let Some(length) = content_length(&head).filter(|l| *l <= MAX_BODY) else {
        return Ok(Some((head, Vec::new())));
    };
    let mut body = data[head_end..].to_vec();
    while body.len() < length {
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if read == 0 {
            break;
        }
        body.extend_from_slice(&buffer[..read]);
    }
    body.truncate(length);
    Ok(Some((head, body)))
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    webhook: &Webhook,
) -> std::io::Result<()> {
    let Some((head, body)) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let answer = if content_length(&head).is_none_or(|l| l > MAX_BODY) && head.starts_with("POST") {
        http_response(
            413,
            b"a Content-Length of at most 8 MiB is required\n",
            "text/plain",
        )
    } else {
        respond(&head, &body, &webhook.stores.snapshot(), &webhook.settings)
    };
    stream.write_all(&answer).await?;
    stream.shutdown().await
}

/// Serves `/mutate-pods` over TLS until the listener fails; one task per connection. Each
/// connection uses the latest config of `tls` (certificates rotated by cert-manager).
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    webhook: Webhook,
) -> std::io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = TlsAcceptor::from(tls.borrow().clone());
        let webhook = webhook.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => handle(stream, &webhook).await,
                Ok(Err(error)) => Err(error),
                Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            };
            if let Err(error) = result {
                debug!(%peer, %error, "webhook connection");
            }
        });
    }
}

/// The webhook's settings, as flags or environment variables (the chart sets the latter).
/// Flatten into the operator's arguments with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct WebhookArgs {
    /// Serve the injection webhook (HTTPS, /mutate-pods) here; unset: no webhook.
    #[arg(long, env = "PORTSENTRY_WEBHOOK_ADDR")]
    pub webhook_addr: Option<std::net::SocketAddr>,
    /// Names in the self-generated serving certificate (the Service's DNS names).
    #[arg(
        long = "webhook-dns-name",
        env = "PORTSENTRY_WEBHOOK_DNS_NAMES",
        value_delimiter = ','
    )]
    pub webhook_dns_names: Vec<String>,
    /// MutatingWebhookConfiguration whose caBundle is patched at start-up (self-generated certificates).
    #[arg(long, env = "PORTSENTRY_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// Secret (in the operator's namespace) holding the CA shared by the replicas.
    #[arg(
        long,
        env = "PORTSENTRY_WEBHOOK_CA_SECRET",
        default_value = "portsentry-webhook-ca"
    )]
    pub webhook_ca_secret: String,
    /// Take `tls.crt` and `tls.key` from this folder (cert-manager's Secret) instead.
    #[arg(long, env = "PORTSENTRY_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// The operator's namespace: never injected; home of the CA Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portsentry-system")]
    pub operator_namespace: String,
    /// Image of the injected sensor.
    #[arg(
        long,
        env = "PORTSENTRY_SENSOR_IMAGE",
        default_value = "ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0"
    )]
    pub sensor_image: String,
    #[arg(long, env = "PORTSENTRY_SENSOR_IMAGE_PULL_POLICY")]
    pub sensor_image_pull_policy: Option<String>,
    /// Requests and limits of the sidecar, as JSON (`{"requests":{"cpu":"10m"}}`).
    #[arg(long, env = "PORTSENTRY_SENSOR_RESOURCES")]
    pub sensor_resources: Option<String>,
    /// Lifetime of the sidecar's projected token.
    #[arg(
        long,
        env = "PORTSENTRY_SENSOR_TOKEN_EXPIRATION_SECONDS",
        default_value = "3600"
    )]
    pub sensor_token_expiration_seconds: i64,
    /// Where sensors POST their reports.
    #[arg(
        long,
        env = "PORTSENTRY_REPORT_URL",
        default_value = "https://portsentry-operator.portsentry-system.svc:8443/v1/reports"
    )]
    pub report_url: String,
}

impl WebhookArgs {
    /// The injection settings these arguments describe.
    pub fn settings(&self) -> Result<Settings> {
        let resources = match self
            .sensor_resources
            .as_deref()
            .filter(|r| !r.trim().is_empty())
        {
            Some(json) => serde_json::from_str(json).map_err(|e| Error::Setting {
                setting: "PORTSENTRY_SENSOR_RESOURCES",
                detail: format!("not resource requirements ({{\"requests\": ...}}): {e}"),
            })?,
            None => Default::default(),
        };
        Ok(Settings {
            image: self.sensor_image.clone(),
            image_pull_policy: self
                .sensor_image_pull_policy
                .clone()
                .filter(|p| !p.is_empty()),
            operator_namespace: self.operator_namespace.clone(),
            report_url: self.report_url.clone(),
            resources,
            token_expiry_seconds: self.sensor_token_expiration_seconds,
        })
    }
}

/// Patches the caBundle, retrying for a while: the chart's object may not exist yet.
async fn apply_ca_bundle_with_retry(client: &Client, name: &str, ca_pem: &str) -> Result<()> {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match apply_ca_bundle(client.clone(), name, ca_pem).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 8 => {
                warn!(%error, attempt, "caBundle not patched yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(15));
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Everything the webhook needs at start-up, then serving: the certificate (shared CA and
/// caBundle patch, or cert-manager's folder), the policy caches (waited for, so no pod is
/// admitted uninjected for want of a first list), and the HTTPS endpoint.
pub async fn run(client: Client, args: WebhookArgs) -> Result<()> {
    let Some(addr) = args.webhook_addr else {
        info!("injection webhook disabled (no --webhook-addr)");
        return Ok(());
    };
    let settings = args.settings()?;
    let (sender, receiver) = match &args.webhook_cert_dir {
        Some(dir) => (
            None,
            CertFiles::in_dir("webhook", dir).watch(CertFiles::RELOAD_EVERY)?,
        ),
        None => {
            let ca = shared_ca(
                client.clone(),
                &args.operator_namespace,
                &args.webhook_ca_secret,
            )
            .await?;
            let cert = ca.serving(&args.webhook_dns_names)?;
            if let Some(name) = &args.webhook_configuration {
                apply_ca_bundle_with_retry(&client, name, &ca.cert_pem).await?;
            }
            let (sender, receiver) = watch::channel(tls_config(&cert.cert_pem, &cert.key_pem)?);
            (Some(sender), receiver)
        }
    };
    let (stores, watch_future) = watch_policies(client);
    tokio::spawn(watch_future);
    stores.ready().await;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    info!(%addr, "serving the injection webhook on {PATH}");
    let served = serve(
        listener,
        receiver,
        Webhook {
            stores,
            settings: Arc::new(settings),
        },
    )
    .await;
    drop(sender);
    served.map_err(|source| Error::Serve {
        server: "injection webhook",
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
    use portsentry_crds::{PortRange, PortSentryPolicySpec};

    fn snapshot() -> Snapshot {
        let mut policy = PortSentryPolicy::new(
            "web",
            PortSentryPolicySpec {
                pod_selector: Default::default(),
                rules: portsentry_crds::PolicyRules {
                    decoys: portsentry_crds::Decoys {
                        tcp: vec![PortRange::single(31337).unwrap()],
                        ..Default::default()
                    },
                    ..Default::default()
                },
            },
        );
        policy.metadata.namespace = Some("shop".into());
        Snapshot {
            policies: vec![policy],
            ..Snapshot::default()
        }
    }

    fn review_json(operation: &str, namespace: &str, ports: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "0b5c6f3e-1111-2222-3333-444455556666",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": operation,
                "namespace": namespace,
                "name": "web-0",
                "userInfo": {"username": "admin"},
                "dryRun": false,
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "web-0", "namespace": namespace},
                    "spec": {"containers": [{"name": "app", "image": "nginx", "ports": ports}]}
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_selected_pod_gets_a_json_patch_and_keeps_the_request_uid() {
        let answer = review(
            &review_json("CREATE", "shop", json!([])),
            &snapshot(),
            &Settings::default(),
        );
        let response = answer.response.unwrap();
        assert!(response.allowed);
        assert_eq!(response.uid, "0b5c6f3e-1111-2222-3333-444455556666");
        let patch: Value = serde_json::from_slice(&response.patch.unwrap()).unwrap();
        assert!(patch.to_string().contains("portsentry-sensor"));
        let text = serde_json::to_string(&answer.types).unwrap();
        assert!(text.contains("admission.k8s.io/v1"), "{text}");
    }

    #[test]
    fn an_unselected_pod_is_allowed_without_a_patch() {
        let answer = review(
            &review_json("CREATE", "elsewhere", json!([])),
            &snapshot(),
            &Settings::default(),
        );
        let response = answer.response.unwrap();
        assert!(response.allowed);
        assert!(response.patch.is_none());
    }

    #[test]
    fn updates_are_never_patched() {
        let answer = review(
            &review_json("UPDATE", "shop", json!([])),
            &snapshot(),
            &Settings::default(),
        );
        assert!(answer.response.unwrap().patch.is_none());
    }

    #[test]
    fn skipped_decoys_come_back_as_warnings() {
        let ports = json!([{"containerPort": 31337, "protocol": "TCP"}]);
        let mut snap = snapshot();
        snap.policies[0]
            .spec
            .rules
            .decoys
            .tcp
            .push(PortRange::single(40000).unwrap());
        let response = review(
            &review_json("CREATE", "shop", ports),
            &snap,
            &Settings::default(),
        )
        .response
        .unwrap();
        let warnings = response.warnings.unwrap();
        assert!(warnings[0].contains("31337/TCP"), "{warnings:?}");
    }

    #[test]
    fn garbage_is_answered_as_an_invalid_request() {
        let response = review(b"{not json", &snapshot(), &Settings::default())
            .response
            .unwrap();
        assert!(!response.allowed);
    }

    #[test]
    fn only_post_to_the_mutate_path_is_served() {
        let settings = Settings::default();
        let get = respond(
            "GET /mutate-pods HTTP/1.1\r\n\r\n",
            b"",
            &snapshot(),
            &settings,
        );
        assert!(String::from_utf8_lossy(&get).starts_with("HTTP/1.1 405"));
        let other = respond("POST /other HTTP/1.1\r\n\r\n", b"", &snapshot(), &settings);
        assert!(String::from_utf8_lossy(&other).starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn the_ca_bundle_patch_sets_every_webhook_guarded_by_its_name() {
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "portsentry"},
            "webhooks": [
                {"name": "a.portsentry.io", "clientConfig": {}, "sideEffects": "None", "admissionReviewVersions": ["v1"]},
                {"name": "b.portsentry.io", "clientConfig": {}, "sideEffects": "None", "admissionReviewVersions": ["v1"]}
            ]
        }))
        .unwrap();
        let patch = ca_bundle_patch(&config, "PEM").unwrap();
        let mut value = serde_json::to_value(&config).unwrap();
        json_patch::patch(&mut value, &patch).unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(value).unwrap();
        let webhooks: Vec<MutatingWebhook> = patched.webhooks.unwrap();
        assert!(
            webhooks
                .iter()
                .all(|w| w.client_config.ca_bundle == Some(ByteString(b"PEM".to_vec())))
        );
    }

    #[test]
    fn sidecar_resources_are_read_from_json() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        let cli = Cli::parse_from([
            "operator",
            "--webhook-addr=0.0.0.0:9443",
            "--sensor-resources={\"limits\":{\"memory\":\"64Mi\"}}",
        ]);
        let settings = cli.webhook.settings().unwrap();
        assert!(settings.resources.limits.unwrap().contains_key("memory"));
    }

    #[test]
    fn the_arguments_flatten_next_to_mains_own_namespace_argument() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Main {
            #[arg(long, env = "POD_NAMESPACE", default_value = "portsentry-system")]
            namespace: String,
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        Main::command().debug_assert();
        let main = Main::parse_from(["operator", "--namespace=a", "--operator-namespace=a"]);
        assert_eq!(main.namespace, main.webhook.operator_namespace);
    }
}
