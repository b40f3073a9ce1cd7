//! The sidecar-injection admission webhook: `AdmissionReview` in, JSONPatch out (pure over a
//! snapshot of policies), the HTTPS endpoint `/mutate-pods`, and its caBundle.
//!
//! Its serving certificate comes from [`crate::tls`] (the shared CA, or cert-manager's files).
//!
//! A pod is never refused: one the webhook cannot decide on is admitted unchanged, the same
//! outcome as `failurePolicy: Ignore` when the webhook is down. Only a body that is no
//! AdmissionReview at all is answered as an invalid request.

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper::{Method, Request, StatusCode, body::Incoming};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        core::v1::{Namespace, Pod},
    },
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    core::{
        DynamicObject, Selector, SelectorExt,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{ClusterPortSentryPolicy, PortSentryPolicy};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    Error, Result,
    http::{self, Answer, Bodies, Limits},
    inject::{
        decide::{self, Decision, Injection},
        governing::Snapshot,
        sidecar::Settings,
    },
    metrics::Metrics,
    server::Readiness,
    tls::{CertFiles, shared_ca, tls_config},
};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/mutate-pods";
/// Largest request body read: an AdmissionReview of a large pod fits with room to spare
/// (the API server itself takes request bodies of at most 3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;
/// Bodies of all connections read at once share this many bytes.
const BODY_BUDGET: usize = 32 * 1024 * 1024;
/// Connections served at once: the API servers' (kept alive) with ample room.
const MAX_CONNECTIONS: usize = 512;
/// The name of the webhook's condition in `/readyz`.
pub const READY: &str = "webhook";

/// The webhook's serving limits (see [`crate::http`]).
pub fn limits() -> Limits {
    Limits::new(MAX_CONNECTIONS, MAX_BODY, BODY_BUDGET)
}

/// Answers one AdmissionReview (JSON bytes) with the response review, never refusing a pod;
/// `snapshot` gives what decides on a pod of the namespace it is called with.
pub fn review(
    body: &[u8],
    snapshot: impl FnOnce(&str) -> Snapshot,
    settings: &Settings,
    metrics: &Metrics,
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
    let snapshot = snapshot(request.namespace.as_deref().unwrap_or_default());
    mutate(&request, &snapshot, settings, metrics).into_review()
}

/// The response to one pod admission request: allowed, with the injection patch if any.
pub fn mutate(
    request: &AdmissionRequest<Pod>,
    snapshot: &Snapshot,
    settings: &Settings,
    metrics: &Metrics,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.operation != Operation::Create {
        return response;
    }
    let (Some(pod), Some(namespace)) = (request.object.as_ref(), request.namespace.as_deref())
    else {
        return response;
    };
    match decide::decide(pod, namespace, snapshot, settings) {
        Decision::Skip(skip) => {
            debug!(namespace, reason = skip.reason(), "pod not injected");
            response
        }
        Decision::Inject(injection) => {
            let patch = injection.patch(pod);
            injected(response, &injection, patch, metrics)
        }
    }
}

/// The response carrying `patch`, with a warning per skipped decoy. A patch that could not be
/// built or encoded admits the pod unchanged, with a warning saying so and a count in
/// `injection_failures_total`: never a silently empty patch.
pub fn injected(
    response: AdmissionResponse,
    injection: &Injection,
    patch: Result<json_patch::Patch>,
    metrics: &Metrics,
) -> AdmissionResponse {
    let encoded = patch.and_then(|patch| {
        response
            .clone()
            .with_patch(patch)
            .map_err(|e| Error::Serialization(serde::ser::Error::custom(e)))
    });
    let mut patched = match encoded {
        Ok(patched) => patched,
        Err(error) => {
            warn!(%error, policy = %injection.policy, "injection patch failed; pod admitted without a sensor");
            metrics.injection_failed(error.metric_label());
            let mut unchanged = response;
            unchanged.warnings = Some(vec![format!(
                "portsentry: no sensor injected for {}: {error}",
                injection.policy
            )]);
            return unchanged;
        }
    };
    info!(policy = %injection.policy, skipped = injection.skipped.len(), "sensor injected");
    if !injection.skipped.is_empty() {
        patched.warnings = Some(
            injection
                .skipped
                .iter()
                .map(|s| {
                    format!("portsentry: decoy {s} skipped: a container of the pod declares it")
                })
                .collect(),
        );
    }
    patched
}

/// Live caches of what the webhook decides on; [`PolicyStores::snapshot_for`] reads them.
#[derive(Clone, Debug)]
pub struct PolicyStores {
    policies: Store<PortSentryPolicy>,
    cluster_policies: Store<ClusterPortSentryPolicy>,
    namespaces: Store<Namespace>,
}

impl PolicyStores {
    /// What decides on a pod of `namespace`, copied from the caches: that namespace's
    /// policies, the cluster policies selecting it, and its labels. Nothing else is cloned
    /// (a request costs the policies that may govern it, not every policy and namespace).
    pub fn snapshot_for(&self, namespace: &str) -> Snapshot {
        let labels = self
            .namespaces
            .get(&ObjectRef::new(namespace))
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        let selects_namespace =
            |policy: &ClusterPortSentryPolicy| {
                policy.spec.namespace_selector.as_ref().is_some_and(|s| {
                    Selector::try_from(s.clone()).is_ok_and(|s| s.matches(&labels))
                })
            };
        Snapshot {
            policies: self
                .policies
                .state()
                .iter()
                .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
                .map(|p| (**p).clone())
                .collect(),
            cluster_policies: self
                .cluster_policies
                .state()
                .iter()
                .filter(|p| selects_namespace(p))
                .map(|p| (**p).clone())
                .collect(),
            namespaces: BTreeMap::from([(namespace.to_owned(), labels.clone())]),
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
/// current (run it; it never ends, retrying with backoff).
pub fn watch_policies(client: Client) -> (PolicyStores, impl Future<Output = ()> + Send + 'static) {
    use futures::StreamExt;
    let (policies, policy_writer) = reflector::store();
    let (cluster_policies, cluster_writer) = reflector::store();
    let (namespaces, namespace_writer) = reflector::store();
    let config = watcher::Config::default();
    let policy_stream = reflector::reflector(
        policy_writer,
        watcher(Api::<PortSentryPolicy>::all(client.clone()), config.clone())
            .default_backoff()
            .modify(|p| p.meta_mut().managed_fields = None),
    )
    .for_each(|_| std::future::ready(()));
    let cluster_stream = reflector::reflector(
        cluster_writer,
        watcher(
            Api::<ClusterPortSentryPolicy>::all(client.clone()),
            config.clone(),
        )
        .default_backoff()
        .modify(|p| p.meta_mut().managed_fields = None),
    )
    .for_each(|_| std::future::ready(()));
    // Only a namespace's labels are read: keep nothing else of it.
    let namespace_stream = reflector::reflector(
        namespace_writer,
        watcher(Api::<Namespace>::all(client), config)
            .default_backoff()
            .modify(|ns| {
                let labels = ns.metadata.labels.take();
                *ns = Namespace {
                    metadata: kube::api::ObjectMeta {
                        name: ns.metadata.name.take(),
                        resource_version: ns.metadata.resource_version.take(),
                        labels,
                        ..Default::default()
                    },
                    ..Default::default()
                };
            }),
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
    pub metrics: Arc<Metrics>,
}

impl Webhook {
    /// Answers one request: `POST /mutate-pods` with an AdmissionReview.
    pub async fn handle(&self, request: Request<Incoming>, bodies: &Bodies) -> Answer {
        if let Some(refusal) = refuse(request.method(), request.uri().path()) {
            return refusal;
        }
        let body = match bodies.read(request).await {
            Ok(body) => body,
            Err(refusal) => return refusal.answer(),
        };
        let answer = review(
            &body,
            |namespace| self.stores.snapshot_for(namespace),
            &self.settings,
            &self.metrics,
        );
        match serde_json::to_vec(&answer) {
            Ok(json) => http::answer(StatusCode::OK, "application/json", Bytes::from(json)),
            Err(error) => http::text(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    }
}

/// The answer to a request that is no `POST` of [`PATH`], if it is not.
pub fn refuse(method: &Method, path: &str) -> Option<Answer> {
    if path != PATH {
        return Some(http::text(StatusCode::NOT_FOUND, "not found\n"));
    }
    (method != Method::POST).then(|| http::text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n"))
}

/// Serves `/mutate-pods` over TLS on `listener` within [`limits`] until accepting fails;
/// each connection uses the latest config of `tls` (certificates rotated by cert-manager).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: watch::Receiver<Arc<tokio_rustls::rustls::ServerConfig>>,
    webhook: Webhook,
) -> std::io::Result<()> {
    let webhook = Arc::new(webhook);
    http::serve(listener, Some(tls), limits(), move |request, connection| {
        let webhook = webhook.clone();
        async move { webhook.handle(request, &connection.bodies).await }
    })
    .await
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
    /// Sidecars count hits per decoy port (`METRICS_PER_PORT="1"`): off by default, since a
    /// per-port series names a decoy to anyone who reaches the sidecar's metrics port.
    #[arg(
        long,
        env = "PORTSENTRY_SENSOR_METRICS_PER_PORT",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub sensor_metrics_per_port: bool,
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
            metrics_per_port: self.sensor_metrics_per_port,
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
/// admitted uninjected for want of a first list), and the HTTPS endpoint. `readiness`'s
/// [`READY`] condition says which step it is at and is met once it serves. Returns at once
/// when disabled (no address); else only with an error saying which step failed.
pub async fn run(
    client: Client,
    args: WebhookArgs,
    readiness: Readiness,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let Some(addr) = args.webhook_addr else {
        info!("injection webhook disabled (no --webhook-addr)");
        readiness.ready(READY);
        return Ok(());
    };
    readiness.not_ready(READY, "loading its certificate");
    let settings = args.settings()?;
    let (_sender, receiver) = match &args.webhook_cert_dir {
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
                readiness.not_ready(READY, "patching the caBundle");
                apply_ca_bundle_with_retry(&client, name, &ca.cert_pem).await?;
            }
            let (sender, receiver) = watch::channel(tls_config(&cert.cert_pem, &cert.key_pem)?);
            (Some(sender), receiver)
        }
    };
    let (stores, watching) = watch_policies(client);
    let serving = async {
        readiness.not_ready(READY, "policy and namespace caches not synced yet");
        stores.ready().await;
        readiness.not_ready(READY, format!("not listening on {addr} yet"));
        let listener = http::bind("injection webhook", addr, http::BIND_PATIENCE).await?;
        info!(%addr, "serving the injection webhook on {PATH}");
        readiness.ready(READY);
        let webhook = Webhook {
            stores: stores.clone(),
            settings: Arc::new(settings),
            metrics,
        };
        serve(listener, receiver, webhook)
            .await
            .map_err(|source| Error::Serve {
                server: "injection webhook",
                source,
            })
    };
    let result = tokio::select! {
        () = watching => Err(Error::WatchStopped("webhook policy and namespace")),
        result = serving => result,
    };
    if let Err(error) = &result {
        readiness.not_ready(READY, error.to_string());
    }
    result
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
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": namespace},
            "spec": {"containers": [{"name": "app", "image": "nginx", "ports": ports}]}
        });
        review_of(operation, namespace, pod)
    }

    /// An AdmissionReview of `operation` on the pod `object` in `namespace`.
    fn review_of(operation: &str, namespace: &str, object: Value) -> Vec<u8> {
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
                "object": object
            }
        }))
        .unwrap()
    }

    /// The pod of a review made by [`review_json`].
    fn pod_of(review: &[u8]) -> Value {
        serde_json::from_slice::<Value>(review).unwrap()["request"]["object"].clone()
    }

    #[test]
    fn a_pod_that_already_has_the_sidecar_is_not_patched_twice() {
        let (settings, metrics) = (Settings::default(), Metrics::new().unwrap());
        let first = review_json("CREATE", "shop", json!([]));
        let answer = review(&first, |_| snapshot(), &settings, &metrics);
        let patch: json_patch::Patch =
            serde_json::from_slice(&answer.response.unwrap().patch.unwrap()).unwrap();
        let mut injected = pod_of(&first);
        json_patch::patch(&mut injected, &patch).unwrap();
        let mut sidecar_only = injected.clone();
        sidecar_only["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        for pod in [injected, sidecar_only] {
            let again = review(
                &review_of("CREATE", "shop", pod.clone()),
                |_| snapshot(),
                &settings,
                &metrics,
            );
            let response = again.response.unwrap();
            assert!(response.allowed);
            assert_eq!(response.patch, None, "{pod}");
        }
    }

    #[test]
    fn a_patch_that_cannot_be_built_admits_the_pod_with_a_warning_and_a_count() {
        let (settings, metrics) = (Settings::default(), Metrics::new().unwrap());
        let review: AdmissionReview<Pod> =
            serde_json::from_slice(&review_json("CREATE", "shop", json!([]))).unwrap();
        let request: AdmissionRequest<Pod> = review.try_into().unwrap();
        let pod = request.object.as_ref().unwrap();
        let Decision::Inject(injection) = decide::decide(pod, "shop", &snapshot(), &settings)
        else {
            panic!("the pod is selected by the policy `web`");
        };
        let failure = serde_json::from_str::<Value>("{\"spec\":").unwrap_err();
        let response = injected(
            AdmissionResponse::from(&request),
            &injection,
            Err(Error::Serialization(failure)),
            &metrics,
        );
        assert!(response.allowed);
        assert_eq!(response.patch, None);
        let warnings = response.warnings.unwrap();
        assert!(
            warnings[0].starts_with("portsentry: no sensor injected for PortSentryPolicy/web"),
            "{warnings:?}"
        );
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                r#"portsentry_operator_injection_failures_total{reason="serialization"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_selected_pod_gets_a_json_patch_and_keeps_the_request_uid() {
        let answer = review(
            &review_json("CREATE", "shop", json!([])),
            |_| snapshot(),
            &Settings::default(),
            &Metrics::new().unwrap(),
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
            |_| snapshot(),
            &Settings::default(),
            &Metrics::new().unwrap(),
        );
        let response = answer.response.unwrap();
        assert!(response.allowed);
        assert!(response.patch.is_none());
    }

    #[test]
    fn updates_are_never_patched() {
        let answer = review(
            &review_json("UPDATE", "shop", json!([])),
            |_| snapshot(),
            &Settings::default(),
            &Metrics::new().unwrap(),
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
            |_| snap,
            &Settings::default(),
            &Metrics::new().unwrap(),
        )
        .response
        .unwrap();
        let warnings = response.warnings.unwrap();
        assert!(warnings[0].contains("31337/TCP"), "{warnings:?}");
    }

    #[test]
    fn garbage_is_answered_as_an_invalid_request() {
        let response = review(
            b"{not json",
            |_| snapshot(),
            &Settings::default(),
            &Metrics::new().unwrap(),
        )
        .response
        .unwrap();
        assert!(!response.allowed);
    }

    #[test]
    fn only_post_to_the_mutate_path_is_served() {
        let get = refuse(&Method::GET, PATH).unwrap();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
        let other = refuse(&Method::POST, "/other").unwrap();
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
        assert!(refuse(&Method::POST, PATH).is_none());
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
    fn sidecars_count_hits_per_decoy_port_only_when_the_operator_is_told_to() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            webhook: WebhookArgs,
        }
        let default = Cli::parse_from(["operator"]).webhook.settings().unwrap();
        assert!(!default.metrics_per_port);
        let on = Cli::parse_from(["operator", "--sensor-metrics-per-port=true"]);
        assert!(on.webhook.settings().unwrap().metrics_per_port);
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
