//! The NetworkPolicy backend refuses where another policy layer may select the pods, on a real
//! API server serving those layers' kinds (minimal CRDs written for the test: only the
//! fields the operator reads matter, the rest is preserved as given).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    ControlPlane, Operator, OperatorSettings, Options, apply_documents, install_crds,
    parse_documents, shared, wait_for,
};
use serde_json::json;
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
const NAMESPACE: &str = "layers";
/// Other layers are listed at each reconcile and policies requeued every 30 s where they
/// are served.
const WAIT: Duration = Duration::from_secs(90);

/// Minimal CRDs of CiliumNetworkPolicy (namespaced) and AdminNetworkPolicy (cluster).
const LAYER_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ciliumnetworkpolicies.cilium.io}
spec:
  group: cilium.io
  scope: Namespaced
  names: {kind: CiliumNetworkPolicy, plural: ciliumnetworkpolicies, singular: ciliumnetworkpolicy}
  versions:
    - name: v2
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: adminnetworkpolicies.policy.networking.k8s.io
  # A *.k8s.io group: the API server asks for the approval the real CRDs carry.
  annotations: {api-approved.kubernetes.io: "https://github.com/kubernetes-sigs/network-policy-api/pull/30"}
spec:
  group: policy.networking.k8s.io
  scope: Cluster
  names: {kind: AdminNetworkPolicy, plural: adminnetworkpolicies, singular: adminnetworkpolicy}
  versions:
    - name: v1alpha1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

async fn control_plane() -> &'static ControlPlane {
    shared(&CONTROL_PLANE, Options::with_controllers())
        .await
        .unwrap()
}

/// `Enforced` of policy `web` of `namespace` as (status, reason, message).
async fn enforced(client: &Client, namespace: &str) -> Option<(String, String, String)> {
    let policy = Api::<PortSentryPolicy>::namespaced(client.clone(), namespace)
        .get("web")
        .await
        .ok()?;
    let c = policy
        .status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Enforced")?;
    Some((c.status, c.reason, c.message))
}

/// Waits until policy `web` of `namespace` is `Enforced=status` with `reason`; its message.
async fn wait_enforced_in(client: &Client, namespace: &str, status: &str, reason: &str) -> String {
    wait_for(WAIT, &format!("Enforced={status} ({reason})"), || async {
        Ok(enforced(client, namespace)
            .await
            .is_some_and(|(s, r, _)| s == status && r == reason))
    })
    .await
    .unwrap();
    enforced(client, namespace).await.unwrap().2
}

async fn wait_enforced(client: &Client, status: &str, reason: &str) -> String {
    wait_enforced_in(client, NAMESPACE, status, reason).await
}

async fn generated(client: &Client, namespace: &str) -> usize {
    Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::test]
async fn a_cilium_policy_selecting_the_pods_refuses_the_network_policy_backend_until_deleted() {
    let plane = control_plane().await;
    let client = plane.client().unwrap();
    install_crds(&client, Duration::from_secs(60))
        .await
        .unwrap();
    apply_documents(&client, &parse_documents(LAYER_CRDS).unwrap(), "default")
        .await
        .unwrap();
    plane.ensure_namespace(NAMESPACE).await.unwrap();
    let objects = parse_documents(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web-0, namespace: {NAMESPACE}, labels: {{app: web}}}}
spec: {{containers: [{{name: web, image: busybox}}]}}
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryPolicy
metadata: {{name: web, namespace: {NAMESPACE}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  decoys: {{tcp: [31337]}}
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryBan
metadata: {{name: web-203-0-113-9, namespace: {NAMESPACE}}}
spec: {{source: 203.0.113.9, policy: {{kind: PortSentryPolicy, name: web}}}}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: db-only, namespace: {NAMESPACE}}}
spec: {{endpointSelector: {{matchLabels: {{"k8s:app": db}}}}}}
---
apiVersion: policy.networking.k8s.io/v1alpha1
kind: AdminNetworkPolicy
metadata: {{name: other-tier}}
spec: {{priority: 10, subject: {{namespaces: {{matchLabels: {{tier: other}}}}}}}}
"#
    ))
    .unwrap();
    apply_documents(&client, &objects, NAMESPACE).await.unwrap();
    let _operator = Operator::start(plane, OperatorSettings::new("lease-layers"))
        .await
        .unwrap();

    // Layers that select other pods or namespaces leave the backend enforcing.
    wait_enforced(&client, "True", "NetworkPolicyApplied").await;
    assert_eq!(generated(&client, NAMESPACE).await, 1);

    // One that selects the pods refuses it, names itself, and the generated policy goes.
    let lock: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "lock", "namespace": NAMESPACE},
        "spec": {"endpointSelector": {"matchLabels": {"k8s:app": "web"}}},
    }))
    .unwrap();
    let cnp = portsentry_tests::api_for(&client, &lock, NAMESPACE)
        .await
        .unwrap();
    cnp.create(&PostParams::default(), &lock).await.unwrap();
    let message = wait_enforced(&client, "False", "OtherPolicyLayers").await;
    assert!(
        message.contains("CiliumNetworkPolicy/layers/lock"),
        "{message}"
    );
    assert!(
        !message.contains("db-only") && !message.contains("other-tier"),
        "{message}"
    );
    assert_eq!(
        generated(&client, NAMESPACE).await,
        0,
        "no allow-all-except policy beside it"
    );
    let ban = Api::<PortSentryBan>::namespaced(client.clone(), NAMESPACE)
        .get("web-203-0-113-9")
        .await
        .unwrap();
    let condition = ban.status.unwrap().conditions;
    assert!(
        condition
            .iter()
            .any(|c| c.type_ == "Enforced" && c.status == "False"),
        "{condition:?}"
    );

    // Deleted: the backend enforces again.
    cnp.delete("lock", &DeleteParams::default()).await.unwrap();
    wait_enforced(&client, "True", "NetworkPolicyApplied").await;
    assert_eq!(generated(&client, NAMESPACE).await, 1);
}

/// A minimal CRD of Calico's namespaced NetworkPolicy.
const CALICO_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: networkpolicies.crd.projectcalico.org}
spec:
  group: crd.projectcalico.org
  scope: Namespaced
  names: {kind: NetworkPolicy, plural: networkpolicies, singular: networkpolicy}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

/// Namespace `namespace` with pod `web-0`, policy `web` listing `backends` and one ban; then
/// an operator (returned: it runs until dropped).
async fn policy_with_a_ban(namespace: &str, backends: &str) -> (Client, Operator) {
    let plane = control_plane().await;
    let client = plane.client().unwrap();
    install_crds(&client, Duration::from_secs(60))
        .await
        .unwrap();
    plane.ensure_namespace(namespace).await.unwrap();
    let objects = parse_documents(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web-0, namespace: {namespace}, labels: {{app: web}}}}
spec: {{containers: [{{name: web, image: busybox}}]}}
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryPolicy
metadata: {{name: web, namespace: {namespace}}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  decoys: {{tcp: [31337]}}
  enforcement: {{backends: {backends}}}
---
apiVersion: portsentry.io/v1alpha1
kind: PortSentryBan
metadata: {{name: web-203-0-113-9, namespace: {namespace}}}
spec: {{source: 203.0.113.9, policy: {{kind: PortSentryPolicy, name: web}}}}
"#
    ))
    .unwrap();
    apply_documents(&client, &objects, namespace).await.unwrap();
    let operator = Operator::start(plane, OperatorSettings::new(&format!("lease-{namespace}")))
        .await
        .unwrap();
    (client, operator)
}

#[tokio::test]
async fn a_calico_policy_of_a_crd_installed_after_the_start_refuses_the_backend() {
    let namespace = "late-layer";
    let (client, _operator) = policy_with_a_ban(namespace, "[NetworkPolicy]").await;
    wait_enforced_in(&client, namespace, "True", "NetworkPolicyApplied").await;

    apply_documents(&client, &parse_documents(CALICO_CRD).unwrap(), "default")
        .await
        .unwrap();
    let calico: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "tiered", "namespace": namespace},
        "spec": {"selector": "app == 'db'", "order": 100},
    }))
    .unwrap();
    let api = portsentry_tests::wait_result(WAIT, "the Calico CRD served", || async {
        Ok(Some(
            portsentry_tests::api_for(&client, &calico, namespace).await?,
        ))
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    api.create(&PostParams::default(), &calico).await.unwrap();
    // Calico's selector language is not evaluated: it may select the pods.
    let message = wait_enforced_in(&client, namespace, "False", "OtherPolicyLayers").await;
    eprintln!(
        "Calico CRD installed after the start: object created -> OtherPolicyLayers in {:?}",
        started.elapsed()
    );
    assert!(
        message.contains(&format!("NetworkPolicy/{namespace}/tiered")),
        "{message}"
    );
    assert_eq!(generated(&client, namespace).await, 0);
}

#[tokio::test]
async fn pod_nftables_without_its_agent_says_which_chart_value_to_set() {
    let namespace = "no-agent";
    let (client, _operator) = policy_with_a_ban(namespace, "[PodNftables]").await;
    let message =
        wait_enforced_in(&client, namespace, "False", "PodNftablesAgentNotInstalled").await;
    assert!(
        message.contains("nodeSensors.podNftables.enabled=true"),
        "{message}"
    );
}
