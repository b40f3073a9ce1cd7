//! What later suites rely on, proven on a control plane with controllers: ServiceAccount
//! tokens for the portsentry.io audience, RBAC on ServiceAccount clients, garbage collection.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{
            ConfigMap, Container, Node, Pod, PodSpec, PodTemplateSpec, Secret, ServiceAccount,
        },
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
};
use portsentry_tests::{
    ControlPlane, Options, PORTSENTRY_AUDIENCE, SERVICE_ACCOUNT_ISSUER, shared, wait_for,
};
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
const NAMESPACE: &str = "plane-tests";
const SENSOR: &str = "sensor";

async fn control_plane() -> &'static ControlPlane {
    let plane = shared(&CONTROL_PLANE, Options::with_controllers())
        .await
        .unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    plane
        .ensure_service_account(NAMESPACE, SENSOR)
        .await
        .unwrap();
    plane
}

async fn review(plane: &ControlPlane, token: String, audience: &str) -> TokenReview {
    let reviews: Api<TokenReview> = Api::all(plane.client().unwrap());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
}

#[tokio::test]
async fn token_review_authenticates_a_portsentry_audience_token() {
    let plane = control_plane().await;
    let token = plane
        .token_for(NAMESPACE, SENSOR, PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let status = review(plane, token, PORTSENTRY_AUDIENCE)
        .await
        .status
        .unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    assert_eq!(status.audiences, Some(vec![PORTSENTRY_AUDIENCE.to_owned()]));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:plane-tests:sensor")
    );
    assert!(
        user.groups
            .unwrap_or_default()
            .contains(&"system:serviceaccounts:plane-tests".to_owned())
    );
}

#[tokio::test]
async fn token_review_refuses_a_token_for_another_audience() {
    let plane = control_plane().await;
    let token = plane
        .token_for(NAMESPACE, SENSOR, SERVICE_ACCOUNT_ISSUER)
        .await
        .unwrap();
    let status = review(plane, token, PORTSENTRY_AUDIENCE)
        .await
        .status
        .unwrap();
    assert_ne!(status.authenticated, Some(true), "{status:?}");
}

/// Real clusters keep `--api-audiences` to the issuer: a sensor's portsentry.io token must
/// not work as a credential for the API server itself (a leaked one grants nothing there).
#[tokio::test]
async fn a_portsentry_audience_token_is_no_credential_for_the_api_server() {
    let plane = control_plane().await;
    let token = plane
        .token_for(NAMESPACE, SENSOR, PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let client = plane.client_with_token(&token).await.unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client, NAMESPACE);
    match accounts.get(SENSOR).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
        other => panic!("a portsentry.io token was accepted by the API server: {other:?}"),
    }
}

/// The trap for the operator: a TokenReview without `audiences` checks the API server's
/// own audiences, so a sensor's portsentry.io token is refused. Always ask for portsentry.io.
#[tokio::test]
async fn token_review_without_audiences_refuses_a_portsentry_audience_token() {
    let plane = control_plane().await;
    let token = plane
        .token_for(NAMESPACE, SENSOR, PORTSENTRY_AUDIENCE)
        .await
        .unwrap();
    let reviews: Api<TokenReview> = Api::all(plane.client().unwrap());
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let status = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_ne!(status.authenticated, Some(true), "{status:?}");
}

#[tokio::test]
async fn service_account_clients_are_bound_by_rbac() {
    let plane = control_plane().await;
    let sensor = plane
        .client_for_service_account(NAMESPACE, SENSOR)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(sensor.clone(), NAMESPACE);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a ServiceAccount without a role listed secrets: {other:?}"),
    }

    let admin = plane.client().unwrap();
    let role = Role {
        metadata: ObjectMeta {
            name: Some("read-configmaps".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            verbs: vec!["list".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("sensor-reads-configmaps".to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "read-configmaps".to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: SENSOR.to_owned(),
            namespace: Some(NAMESPACE.to_owned()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin, NAMESPACE)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(sensor, NAMESPACE);
    wait_for(Duration::from_secs(10), "the RoleBinding to apply", || {
        let configmaps = configmaps.clone();
        Box::pin(async move { Ok(configmaps.list(&ListParams::default()).await.is_ok()) })
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn new_namespaces_get_a_default_service_account_from_the_controllers() {
    let plane = control_plane().await;
    let client = plane.client().unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace = k8s_openapi::api::core::v1::Namespace {
        metadata: ObjectMeta {
            name: Some("fresh".to_owned()),
            ..ObjectMeta::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client, "fresh");
    wait_for(
        Duration::from_secs(30),
        "serviceaccount fresh/default",
        || {
            let accounts = accounts.clone();
            Box::pin(async move { Ok(accounts.get_opt("default").await?.is_some()) })
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn garbage_collector_deletes_a_child_whose_owner_is_deleted() {
    let plane = control_plane().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(plane.client().unwrap(), NAMESPACE);
    let owner = configmaps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("owner".to_owned()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            },
        )
        .await
        .unwrap();
    let child = ConfigMap {
        metadata: ObjectMeta {
            name: Some("child".to_owned()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".to_owned(),
                kind: "ConfigMap".to_owned(),
                name: owner.name_any(),
                uid: owner.uid().unwrap(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    configmaps
        .create(&PostParams::default(), &child)
        .await
        .unwrap();
    configmaps
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the garbage collector to delete configmap child",
        || {
            let configmaps = configmaps.clone();
            Box::pin(async move { Ok(configmaps.get_opt("child").await?.is_none()) })
        },
    )
    .await
    .unwrap();
}

/// Node sensors (issue 6) are a DaemonSet: its controller must make one Pod per matching
/// Node. The Node is an API object only (no kubelet), which is all the controller needs.
#[tokio::test]
async fn daemonset_controller_makes_a_pod_for_each_matching_node() {
    let plane = control_plane().await;
    let client = plane.client().unwrap();
    let labels: std::collections::BTreeMap<String, String> =
        [("portsentry.io/test".to_owned(), "node-sensor".to_owned())].into();
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some("node-a".to_owned()),
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            },
        )
        .await
        .unwrap();
    let daemonset = DaemonSet {
        metadata: ObjectMeta {
            name: Some("sensor".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    node_selector: Some(labels.clone()),
                    containers: vec![Container {
                        name: "sensor".to_owned(),
                        image: Some("portsentry-sensor:test".to_owned()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    };
    Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &daemonset)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, NAMESPACE);
    wait_for(Duration::from_secs(60), "a DaemonSet pod on node-a", || {
        let pods = pods.clone();
        Box::pin(async move {
            let list = pods
                .list(&ListParams::default().labels("portsentry.io/test=node-sensor"))
                .await?;
            Ok(list.items.iter().any(|pod| targets(pod) == Some("node-a")))
        })
    })
    .await
    .unwrap();
}

/// The node a DaemonSet pod is for: the controller pins it with a required node affinity on
/// `metadata.name` (the scheduler then binds it; this control plane has no scheduler).
fn targets(pod: &Pod) -> Option<&str> {
    let terms = &pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|term| term.match_fields.iter().flatten())
        .find(|field| field.key == "metadata.name" && field.operator == "In")
        .and_then(|field| field.values.as_ref()?.first())
        .map(String::as_str)
}

#[tokio::test]
async fn pinned_helm_reaches_the_cluster_with_the_admin_kubeconfig() {
    let plane = control_plane().await;
    let output = plane
        .helm()
        .unwrap()
        .args(["list", "--all-namespaces", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm list failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let releases: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(releases, serde_json::json!([]));
    let version = plane.helm().unwrap().arg("version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains("v3.19.0"));
}
