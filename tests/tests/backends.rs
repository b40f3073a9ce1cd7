//! Which backend enforces, said truthfully, on a real API server: bans of pod addresses are
//! never claimed by NetworkPolicy (PodNftables or quarantine is named, or nobody), a refused
//! NetworkPolicy falls back to PodNftables, a policy yields only to an older overlapping one
//! that itself enforces, and a failing reconcile withdraws its generated NetworkPolicies.
//!
//! Every operator here runs as the chart runs it with `nodeSensors.podNftables.enabled=true`
//! and `podCIDRs: [10.244.0.0/16]`; pods get addresses by a status patch (no kubelet).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use portsentry_crds::{PortSentryBan, PortSentryPolicy};
use portsentry_tests::{
    ControlPlane, Operator, OperatorSettings, Options, api_for, apply_documents, install_crds,
    parse_documents, shared, wait_for, wait_result,
};
use serde_json::json;
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();
const WAIT: Duration = Duration::from_secs(60);
/// The selector of the protected pods.
const WEB: &str = "{matchLabels: {app: web}}";

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

/// Applies `yaml` (objects of `namespace`, created first) and starts an operator.
async fn world(namespace: &str, yaml: &str) -> (Client, Operator) {
    let plane = control_plane().await;
    plane.ensure_namespace(namespace).await.unwrap();
    let client = plane.client().unwrap();
    apply(&client, namespace, &[yaml.to_owned()]).await;
    let mut settings = OperatorSettings::new(&format!("lease-{namespace}"));
    settings.extra_args = vec![
        "--pod-nftables-agent=true".into(),
        "--pod-cidr=10.244.0.0/16".into(),
    ];
    let operator = Operator::start(plane, settings).await.unwrap();
    (client, operator)
}

/// Applies the objects `documents` describe, in `namespace`.
async fn apply(client: &Client, namespace: &str, documents: &[String]) {
    apply_documents(
        client,
        &parse_documents(&documents.concat()).unwrap(),
        namespace,
    )
    .await
    .unwrap();
}

/// A pod `name` labelled `app: <app>`, given `ip` as a kubelet would.
async fn pod_with_address(client: &Client, namespace: &str, name: &str, app: &str, ip: &str) {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn policy_yaml(name: &str, selector: &str, backends: &str, response: &str) -> String {
    format!(
        r#"
apiVersion: portsentry.io/v1alpha1
kind: PortSentryPolicy
metadata: {{name: {name}}}
spec:
  podSelector: {selector}
  decoys: {{tcp: [31337]}}
  response: {response}
  enforcement: {{backends: {backends}}}
---
"#
    )
}

fn ban_yaml(policy: &str, source: &str) -> String {
    format!(
        r#"
apiVersion: portsentry.io/v1alpha1
kind: PortSentryBan
metadata: {{name: {}}}
spec: {{source: "{source}", policy: {{kind: PortSentryPolicy, name: {policy}}}}}
---
"#,
        ban_name(policy, source)
    )
}

fn ban_name(policy: &str, source: &str) -> String {
    format!("{policy}-{}", source.replace(['.', ':'], "-"))
}

/// The `Enforced` condition as (status, reason, message) of a policy or a ban.
async fn enforced<K>(api: &Api<K>, name: &str) -> Option<(String, String, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + HasConditions,
{
    let object = api.get(name).await.ok()?;
    let c = object
        .conditions()
        .into_iter()
        .find(|c| c.type_ == "Enforced")?;
    Some((c.status, c.reason, c.message))
}

trait HasConditions {
    fn conditions(self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>;
}

impl HasConditions for PortSentryPolicy {
    fn conditions(self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status.map(|s| s.conditions).unwrap_or_default()
    }
}

impl HasConditions for PortSentryBan {
    fn conditions(self) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        self.status.map(|s| s.conditions).unwrap_or_default()
    }
}

/// Waits until `name`'s `Enforced` is `status` with `reason`; returns its message.
async fn wait_enforced<K>(api: &Api<K>, name: &str, status: &str, reason: &str) -> String
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + HasConditions,
{
    let what = format!("{name}: Enforced={status} ({reason})");
    let last = wait_for(WAIT, &what, || {
        let api = api.clone();
        async move {
            Ok(enforced(&api, name)
                .await
                .is_some_and(|(s, r, _)| s == status && r == reason))
        }
        .boxed()
    })
    .await;
    if let Err(error) = last {
        panic!("{error:#}; now: {:?}", enforced(api, name).await);
    }
    enforced(api, name).await.unwrap().2
}

async fn generated(client: &Client, namespace: &str) -> Vec<String> {
    Api::<NetworkPolicy>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=portsentry-operator"))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .filter(|n| n.contains("-portsentry-"))
        .collect()
}

#[tokio::test]
async fn a_pod_source_is_not_claimed_by_network_policy_and_says_nobody_drops_it() {
    let ns = "pod-source-nobody";
    let yaml = [
        policy_yaml("web", WEB, "[NetworkPolicy]", "{}"),
        ban_yaml("web", "203.0.113.9"),
        ban_yaml("web", "10.244.9.9"),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), ns);
    wait_enforced(
        &bans,
        &ban_name("web", "203.0.113.9"),
        "True",
        "NetworkPolicy",
    )
    .await;
    let message = wait_enforced(&bans, &ban_name("web", "10.244.9.9"), "False", "PodSource").await;
    assert!(message.contains("PodNftables"), "{message}");
    assert!(message.contains("response.quarantine"), "{message}");
}

#[tokio::test]
async fn a_scanning_pod_of_the_namespace_is_claimed_by_quarantine() {
    let ns = "pod-source-quarantine";
    let plane = control_plane().await;
    plane.ensure_namespace(ns).await.unwrap();
    let client = plane.client().unwrap();
    pod_with_address(&client, ns, "scanner", "scanner", "10.244.1.7").await;
    let yaml = [
        policy_yaml("web", WEB, "[NetworkPolicy]", "{quarantine: true}"),
        ban_yaml("web", "10.244.1.7"),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), ns);
    let message = wait_enforced(&bans, &ban_name("web", "10.244.1.7"), "True", "Quarantine").await;
    assert!(message.contains(&format!("{ns}/scanner")), "{message}");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    wait_for(WAIT, "the scanner quarantined", || {
        let pods = pods.clone();
        async move {
            Ok(pods
                .get("scanner")
                .await?
                .labels()
                .get("portsentry.io/quarantined")
                == Some(&"true".to_owned()))
        }
        .boxed()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_pod_source_is_claimed_by_pod_nftables_listed_after_network_policy() {
    let ns = "pod-source-podnft";
    let yaml = [
        policy_yaml("web", WEB, "[NetworkPolicy, PodNftables]", "{}"),
        ban_yaml("web", "203.0.113.9"),
        ban_yaml("web", "10.244.1.7"),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    wait_enforced(&policies, "web", "True", "NetworkPolicyApplied").await;
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), ns);
    wait_enforced(
        &bans,
        &ban_name("web", "203.0.113.9"),
        "True",
        "NetworkPolicy",
    )
    .await;
    wait_enforced(&bans, &ban_name("web", "10.244.1.7"), "True", "PodNftables").await;
}

#[tokio::test]
async fn a_refused_network_policy_falls_back_to_pod_nftables_and_says_why() {
    let ns = "fallback";
    let yaml = [
        format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny, namespace: {ns}}}
spec: {{podSelector: {{}}, policyTypes: [Ingress]}}
---
"#
        ),
        policy_yaml("web", WEB, "[NetworkPolicy, PodNftables]", "{}"),
        ban_yaml("web", "203.0.113.9"),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    let message = wait_enforced(&policies, "web", "True", "PodNftables").await;
    assert!(
        message.contains("ExistingNetworkPolicies") && message.contains("default-deny"),
        "{message}"
    );
    let bans = Api::<PortSentryBan>::namespaced(client.clone(), ns);
    wait_enforced(
        &bans,
        &ban_name("web", "203.0.113.9"),
        "True",
        "PodNftables",
    )
    .await;
    assert!(generated(&client, ns).await.is_empty());
}

#[tokio::test]
async fn a_policy_still_yields_to_an_older_overlapping_one_that_enforces() {
    let ns = "overlap-enforcing";
    let (client, _operator) = world(ns, &policy_yaml("first", WEB, "[NetworkPolicy]", "{}")).await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    wait_enforced(&policies, "first", "True", "NoActiveBans").await;
    apply(
        &client,
        ns,
        &[
            policy_yaml("second", WEB, "[NetworkPolicy]", "{}"),
            ban_yaml("second", "203.0.113.9"),
        ],
    )
    .await;
    let message = wait_enforced(
        &policies,
        "second",
        "False",
        "OverlappingPortSentryPolicies",
    )
    .await;
    assert!(message.contains("first"), "{message}");
}

#[tokio::test]
async fn a_policy_does_not_yield_to_an_older_alerting_one() {
    let ns = "overlap-alert";
    let (client, _operator) = world(
        ns,
        &policy_yaml("watch", WEB, "[NetworkPolicy]", "{action: Alert}"),
    )
    .await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    wait_enforced(&policies, "watch", "True", "NoActiveBans").await;
    apply(
        &client,
        ns,
        &[
            policy_yaml("web", WEB, "[NetworkPolicy]", "{}"),
            ban_yaml("web", "203.0.113.9"),
        ],
    )
    .await;
    wait_enforced(&policies, "web", "True", "NetworkPolicyApplied").await;
    // The alerting one now yields to it (one generated allow-all-except policy per pod).
    let message = wait_enforced(&policies, "watch", "False", "OverlappingPortSentryPolicies").await;
    assert!(message.contains("web"), "{message}");
    assert_eq!(generated(&client, ns).await, vec!["web-portsentry-0"]);
}

#[tokio::test]
async fn a_policy_does_not_yield_to_an_older_one_that_network_policies_refuse() {
    let ns = "overlap-refused";
    let yaml = [
        format!(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: legacy-only, namespace: {ns}}}
spec: {{podSelector: {{matchLabels: {{app: legacy}}}}, policyTypes: [Ingress]}}
---
"#
        ),
        policy_yaml(
            "both",
            "{matchExpressions: [{key: app, operator: In, values: [web, legacy]}]}",
            "[NetworkPolicy]",
            "{}",
        ),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    wait_enforced(&policies, "both", "False", "ExistingNetworkPolicies").await;
    apply(
        &client,
        ns,
        &[
            policy_yaml("web", WEB, "[NetworkPolicy]", "{}"),
            ban_yaml("web", "203.0.113.9"),
        ],
    )
    .await;
    wait_enforced(&policies, "web", "True", "NetworkPolicyApplied").await;
}

/// A CiliumNetworkPolicy CRD whose preferred version (v2) is converted from its storage
/// version (v2alpha1) by a webhook that does not exist: once an object of it is stored,
/// listing it (what each reconcile does) fails.
const BROKEN_LAYER_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ciliumnetworkpolicies.cilium.io}
spec:
  group: cilium.io
  scope: Namespaced
  names: {kind: CiliumNetworkPolicy, plural: ciliumnetworkpolicies, singular: ciliumnetworkpolicy}
  conversion:
    strategy: Webhook
    webhook:
      conversionReviewVersions: [v1]
      clientConfig: {service: {namespace: default, name: nowhere, path: /convert, port: 443}}
  versions:
    - name: v2
      served: true
      storage: false
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
    - name: v2alpha1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

#[tokio::test]
async fn a_failing_reconcile_withdraws_its_generated_network_policies() {
    let ns = "withdraw";
    let yaml = [
        policy_yaml("web", WEB, "[NetworkPolicy]", "{}"),
        ban_yaml("web", "203.0.113.9"),
    ]
    .concat();
    let (client, _operator) = world(ns, &yaml).await;
    let policies = Api::<PortSentryPolicy>::namespaced(client.clone(), ns);
    wait_enforced(&policies, "web", "True", "NetworkPolicyApplied").await;
    assert_eq!(generated(&client, ns).await, vec!["web-portsentry-0"]);

    // A layer the operator cannot read: every reconcile of the policy now fails before it
    // can check that its generated policy still widens nothing.
    apply_documents(
        &client,
        &parse_documents(BROKEN_LAYER_CRD).unwrap(),
        "default",
    )
    .await
    .unwrap();
    let lock: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "cilium.io/v2alpha1", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "unreadable", "namespace": ns},
        "spec": {"endpointSelector": {"matchLabels": {"app": "db"}}},
    }))
    .unwrap();
    let cnp = wait_for_api(&client, &lock, ns).await;
    cnp.create(&PostParams::default(), &lock).await.unwrap();
    // Its watch cannot convert the object either, so no event says it came: a change of
    // the policy reconciles it now rather than at its next periodic look.
    let touch = json!({"metadata": {"annotations": {"test.portsentry.io/touched": "1"}}});
    policies
        .patch("web", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .unwrap();
    let message = wait_enforced(&policies, "web", "False", "NetworkPoliciesWithdrawn").await;
    assert!(message.contains("withdrawn"), "{message}");
    assert!(
        generated(&client, ns).await.is_empty(),
        "withdrawn, not frozen"
    );
    let ready = policies
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False", "{ready:?}");

    // Readable again: enforced again.
    cnp.delete("unreadable", &DeleteParams::default())
        .await
        .unwrap();
    wait_enforced(&policies, "web", "True", "NetworkPolicyApplied").await;
    assert_eq!(generated(&client, ns).await, vec!["web-portsentry-0"]);
}

/// The API of `object`'s kind once discovery serves it (a CRD just applied).
async fn wait_for_api(client: &Client, object: &DynamicObject, ns: &str) -> Api<DynamicObject> {
    wait_result(WAIT, "the CRD served", || async {
        Ok(Some(api_for(client, object, ns).await?))
    })
    .await
    .unwrap()
}
