//! Admission webhooks on the test control plane: the API server calls an HTTPS webhook at
//! `https://127.0.0.1:PORT` that trusts the cluster CA, and obeys its answer.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::{
            RuleWithOperations, ServiceReference, ValidatingWebhook,
            ValidatingWebhookConfiguration, WebhookClientConfig,
        },
        core::v1::ConfigMap,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api,
    api::{DynamicObject, ObjectMeta, PostParams},
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use portsentry_tests::{ControlPlane, HttpServer, Options, Recorded, Reply, shared, wait_value};
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
const NAMESPACE: &str = "webhook-tests";

/// Denies ConfigMaps named `deny-me`, allows everything else.
fn validate(request: &Recorded) -> Reply {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(&request.body).unwrap();
    let request: AdmissionRequest<DynamicObject> = review.try_into().unwrap();
    let mut response = AdmissionResponse::from(&request);
    if request.name == "deny-me" {
        response = response.deny("deny-me is refused by the test webhook");
    }
    (200, serde_json::to_vec(&response.into_review()).unwrap())
}

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn the_api_server_calls_an_https_webhook_on_loopback_and_obeys_it() {
    let plane = shared(&CONTROL_PLANE, Options::default()).await.unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    let cert = plane.issue_serving_cert(&["127.0.0.1"]).unwrap();
    let server = HttpServer::start(Some(&cert), validate).await.unwrap();

    let client = plane.client().unwrap();
    let webhook = ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some("portsentry-tests".to_owned()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: "configmaps.tests.portsentry.io".to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            side_effects: "None".to_owned(),
            failure_policy: Some("Fail".to_owned()),
            timeout_seconds: Some(5),
            client_config: WebhookClientConfig {
                url: Some(server.url("/validate")),
                ca_bundle: Some(ByteString(plane.ca_pem().as_bytes().to_vec())),
                service: None::<ServiceReference>,
            },
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [(
                        "kubernetes.io/metadata.name".to_owned(),
                        NAMESPACE.to_owned(),
                    )]
                    .into(),
                ),
                ..LabelSelector::default()
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".to_owned()]),
                operations: Some(vec!["CREATE".to_owned()]),
                resources: Some(vec!["configmaps".to_owned()]),
                scope: Some("Namespaced".to_owned()),
            }]),
            ..ValidatingWebhook::default()
        }]),
    };
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();

    // The API server picks up a new webhook configuration within a moment.
    let configmaps: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let message = wait_value(
        Duration::from_secs(20),
        "the webhook to be called",
        || async {
            match configmaps
                .create(&PostParams::default(), &config_map("deny-me"))
                .await
            {
                Err(kube::Error::Api(status)) => Some(status.message),
                Ok(_) => {
                    configmaps
                        .delete("deny-me", &Default::default())
                        .await
                        .unwrap();
                    None
                }
                Err(other) => panic!("creating deny-me failed otherwise: {other}"),
            }
        },
    )
    .await
    .unwrap();
    assert!(
        message.contains("deny-me is refused by the test webhook"),
        "{message}"
    );
    configmaps
        .create(&PostParams::default(), &config_map("allow-me"))
        .await
        .unwrap();
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.method == "POST"));
    assert!(requests.iter().any(|r| r.path.starts_with("/validate")));
}
