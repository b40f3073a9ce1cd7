//! A policy's status tells the truth on a real control plane: a reconcile the API server
//! refuses shows `Ready=False` with the error's reason and a Warning Event, and a policy whose
//! cause is fixed is `Ready=True` again.
//!
//! The refusal is a ResourceQuota allowing no NetworkPolicy in the namespace: the generated
//! NetworkPolicy that would enforce the policy's ban is rejected by quota admission.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::{core::v1::ResourceQuota, events::v1::Event};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Operator, OperatorSettings, Options, install_crds, shared,
    wait_for,
};
use serde_json::json;
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();
const WAIT: Duration = Duration::from_secs(60);
const QUOTA: &str = "no-network-policies";

async fn control_plane() -> &'static ControlPlane {
    let plane = shared(&CONTROL_PLANE, Options::with_controllers())
        .await
        .unwrap();
    SETUP
        .get_or_try_init(|| async {
            install_crds(&plane.client()?, Duration::from_secs(60))
                .await
                .map(|_| ())
        })
        .await
        .unwrap();
    plane
}

/// Namespace `namespace` with a quota of zero NetworkPolicies, policy `web` and one ban of
/// it; then an operator (returned: it runs until dropped).
async fn policy_whose_enforcement_is_refused(namespace: &str) -> (Client, Operator) {
    let plane = control_plane().await;
    plane.ensure_namespace(namespace).await.unwrap();
    let client = plane.client().unwrap();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": QUOTA, "namespace": namespace},
        "spec": {"hard": {"count/networkpolicies.networking.k8s.io": "0"}},
    }))
    .unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), namespace)
        .patch(QUOTA, &params, &Patch::Apply(&quota))
        .await
        .unwrap();
    let policy = json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "decoys": {"tcp": [31337]},
            "response": {"banDuration": "1h"},
        }
    });
    Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .patch("web", &params, &Patch::Apply(policy))
        .await
        .unwrap();
    let ban: PortSentryBan = serde_json::from_value(json!({
        "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryBan",
        "metadata": {"name": "web-203-0-113-9", "namespace": namespace},
        "spec": {"source": "203.0.113.9", "policy": {"kind": "PortSentryPolicy", "name": "web"}},
    }))
    .unwrap();
    Api::<PortSentryBan>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &ban)
        .await
        .unwrap();
    let operator = Operator::start(plane, OperatorSettings::new(&format!("lease-{namespace}")))
        .await
        .unwrap();
    (client, operator)
}

/// `Ready` of policy `web` in `namespace` as (status, reason, message), once it has one.
async fn ready(client: &Client, namespace: &str) -> Option<(String, String, String)> {
    let policy = Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .get("web")
        .await
        .ok()?;
    let status = policy.status?;
    let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
    Some((ready.status, ready.reason, ready.message))
}

async fn wait_ready(client: &Client, namespace: &'static str, status: &str, reason: &str) {
    let what = format!("policy web: Ready={status} ({reason})");
    wait_for(WAIT, &what, || {
        let client = client.clone();
        let (status, reason) = (status.to_owned(), reason.to_owned());
        async move {
            Ok(ready(&client, namespace)
                .await
                .is_some_and(|(s, r, _)| s == status && r == reason))
        }
        .boxed()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_policy_whose_networkpolicy_is_refused_is_ready_false_with_the_reason_and_an_event() {
    let namespace = "status-refused";
    let (client, _operator) = policy_whose_enforcement_is_refused(namespace).await;

    wait_ready(&client, namespace, "False", "WriteRejected").await;
    let (_, _, message) = ready(&client, namespace).await.unwrap();
    assert!(message.contains("NetworkPolicy"), "{message}");
    assert!(message.contains("exceeded quota"), "{message}");
    assert!(message.contains(QUOTA), "{message}");

    let events = Api::<Event>::namespaced(client.clone(), namespace);
    wait_for(
        WAIT,
        "a Warning Event WriteRejected about policy web",
        || {
            let events = events.clone();
            async move {
                Ok(events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .iter()
                    .any(|e| {
                        e.type_.as_deref() == Some("Warning")
                            && e.reason.as_deref() == Some("WriteRejected")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web")
                            && e.note
                                .as_deref()
                                .is_some_and(|n| n.contains("exceeded quota"))
                    }))
            }
            .boxed()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refused_policy_is_ready_again_once_the_cause_is_removed() {
    let namespace = "status-recovers";
    let (client, _operator) = policy_whose_enforcement_is_refused(namespace).await;
    wait_ready(&client, namespace, "False", "WriteRejected").await;

    Api::<ResourceQuota>::namespaced(client.clone(), namespace)
        .delete(QUOTA, &DeleteParams::default())
        .await
        .unwrap();

    wait_ready(&client, namespace, "True", "Reconciled").await;
}
