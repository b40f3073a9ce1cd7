//! The CRD contract against a real kube-apiserver: the chart's CRDs install, the examples are
//! accepted, every schema rule rejects its bad value (naming the field) and accepts a good one.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use portsentry_crds::{
    ClusterPortSentryPolicy, PolicyKind, PolicyRef, PortSentryBan, PortSentryBanSpec,
    PortSentryPolicy,
};
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Options, apply_documents, install_crds, parse_documents,
    repo_root, shared,
};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

static CONTROL_PLANE: OnceCell<ControlPlane> = OnceCell::const_new();
static SETUP: OnceCell<()> = OnceCell::const_new();
const NAMESPACE: &str = "crd-tests";
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// The suite's control plane with the CRDs installed and the test namespace created.
async fn control_plane() -> Result<&'static ControlPlane> {
    let plane = shared(&CONTROL_PLANE, Options::default()).await?;
    SETUP
        .get_or_try_init(|| async {
            install_crds(&plane.client()?, ESTABLISHED_TIMEOUT).await?;
            plane.ensure_namespace(NAMESPACE).await
        })
        .await?;
    Ok(plane)
}

#[tokio::test]
async fn generated_crds_install_and_become_established() {
    let plane = shared(&CONTROL_PLANE, Options::default()).await.unwrap();
    let names = install_crds(&plane.client().unwrap(), ESTABLISHED_TIMEOUT)
        .await
        .unwrap();
    let expected: Vec<String> = portsentry_crds::crds()
        .iter()
        .map(|crd| crd.name_any())
        .collect();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(names, sorted, "the chart holds exactly the CRDs of crds()");
}

#[tokio::test]
async fn every_chart_example_is_accepted() {
    let plane = control_plane().await.unwrap();
    let client = plane.client().unwrap();
    let dir = repo_root().join("charts/portsentry/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    for file in files {
        let mut objects = parse_documents(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for object in &mut objects {
            if object.metadata.namespace.is_some() {
                object.metadata.namespace = Some(NAMESPACE.to_owned());
            }
        }
        let stored = apply_documents(&client, &objects, NAMESPACE)
            .await
            .unwrap_or_else(|err| panic!("{} was refused: {err:#}", file.display()));
        // What the API server stored (with schema defaults) reads back as the Rust types.
        for object in stored {
            let kind = object.types.as_ref().unwrap().kind.clone();
            let value = serde_json::to_value(&object).unwrap();
            let parsed = match kind.as_str() {
                "PortSentryPolicy" => serde_json::from_value::<PortSentryPolicy>(value).map(drop),
                "ClusterPortSentryPolicy" => {
                    serde_json::from_value::<ClusterPortSentryPolicy>(value).map(drop)
                }
                "PortSentryBan" => serde_json::from_value::<PortSentryBan>(value).map(drop),
                other => panic!("unexpected kind {other} in {}", file.display()),
            };
            parsed.unwrap_or_else(|err| {
                panic!("{kind} from {} does not read back: {err}", file.display())
            });
        }
    }
}

#[tokio::test]
async fn kubectl_explain_shows_field_docs() {
    let plane = control_plane().await.unwrap();
    // The CRD's OpenAPI is published a moment after it is Established.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let output = plane
            .kubectl()
            .unwrap()
            .args(["explain", "portsentrypolicy.spec"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if output.status.success()
            && stdout.contains("Pods of this namespace that get a sensor sidecar")
        {
            assert!(stdout.contains("decoys"), "{stdout}");
            assert!(
                stdout.contains("The decoy ports sensors listen on"),
                "{stdout}"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kubectl explain never showed the field docs; status {}, stdout:\n{stdout}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn applying_the_same_ban_twice_is_a_no_op() {
    let plane = control_plane().await.unwrap();
    let bans: Api<PortSentryBan> = Api::namespaced(plane.client().unwrap(), NAMESPACE);
    let mut ban = PortSentryBan::new(
        "ssa-twice",
        PortSentryBanSpec {
            source: "198.51.100.23".parse().unwrap(),
            policy: PolicyRef {
                kind: PolicyKind::PortSentryPolicy,
                name: "shop".to_owned(),
            },
            first_seen: None,
            last_seen: None,
            offences: 2,
            expires_at: None,
            reason: Some("scanned decoys 1, 7 and 9".to_owned()),
            evidence: Vec::new(),
        },
    );
    ban.metadata.namespace = Some(NAMESPACE.to_owned());
    let params = PatchParams::apply(FIELD_MANAGER);
    let first = bans
        .patch("ssa-twice", &params, &Patch::Apply(&ban))
        .await
        .unwrap();
    let second = bans
        .patch("ssa-twice", &params, &Patch::Apply(&ban))
        .await
        .unwrap();
    assert!(first.resource_version().is_some());
    assert_eq!(first.resource_version(), second.resource_version());
    assert_eq!(first.metadata.generation, second.metadata.generation);
    assert_eq!(second.spec, ban.spec);
}

// --- one test per validation rule: the bad value is refused naming the field, a good one
// in the same place is stored ---

static NAMES: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Policy,
    ClusterPolicy,
    Ban,
}

impl Kind {
    fn resource(self) -> ApiResource {
        match self {
            Kind::Policy => ApiResource::erase::<PortSentryPolicy>(&()),
            Kind::ClusterPolicy => ApiResource::erase::<ClusterPortSentryPolicy>(&()),
            Kind::Ban => ApiResource::erase::<PortSentryBan>(&()),
        }
    }

    /// The smallest valid spec of the kind.
    fn base_spec(self) -> Value {
        match self {
            Kind::Policy | Kind::ClusterPolicy => json!({"decoys": {"tcp": [1]}}),
            Kind::Ban => json!({
                "source": "203.0.113.7",
                "policy": {"kind": "PortSentryPolicy", "name": "shop"}
            }),
        }
    }

    fn api(self, plane: &ControlPlane) -> Result<Api<DynamicObject>> {
        let client = plane.client()?;
        Ok(match self {
            Kind::ClusterPolicy => Api::all_with(client, &self.resource()),
            Kind::Policy | Kind::Ban => Api::namespaced_with(client, NAMESPACE, &self.resource()),
        })
    }
}

/// The base spec of `kind` with each `(JSON pointer below spec, value)` set.
fn spec_with(kind: Kind, changes: &[(&str, Value)]) -> Value {
    let mut spec = kind.base_spec();
    for (pointer, value) in changes {
        let mut target = &mut spec;
        for key in pointer.trim_start_matches('/').split('/') {
            if !target.is_object() {
                *target = json!({});
            }
            target = target
                .as_object_mut()
                .map(|map| map.entry(key.to_owned()).or_insert(Value::Null))
                .unwrap_or_else(|| unreachable!());
        }
        *target = value.clone();
    }
    spec
}

async fn create(plane: &ControlPlane, kind: Kind, spec: Value) -> Result<DynamicObject> {
    let resource = kind.resource();
    let name = format!("rule-{}", NAMES.fetch_add(1, Ordering::Relaxed));
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    Ok(kind
        .api(plane)?
        .create(&PostParams::default(), &object)
        .await?)
}

/// Creates `bad` and expects a 422 whose message names `field` and says `says`; then
/// creates `good` and expects it stored.
async fn check_rule(
    kind: Kind,
    bad: &[(&str, Value)],
    good: &[(&str, Value)],
    field: &str,
    says: &str,
) -> Result<()> {
    let plane = control_plane().await?;
    match create(plane, kind, spec_with(kind, bad)).await {
        Ok(object) => bail!(
            "the API server accepted {bad:?} as {}: {}",
            object.name_any(),
            serde_json::to_string(&object.data)?
        ),
        Err(err) => {
            let status = match err.downcast_ref::<kube::Error>() {
                Some(kube::Error::Api(status)) => status.clone(),
                _ => return Err(err).context("creating the invalid object failed otherwise"),
            };
            if status.code != 422
                || !status.message.contains(field)
                || !status.message.contains(says)
            {
                bail!(
                    "expected 422 naming `{field}` and saying `{says}` for {bad:?}, got {}: {}",
                    status.code,
                    status.message
                );
            }
        }
    }
    create(plane, kind, spec_with(kind, good))
        .await
        .with_context(|| format!("the good value {good:?} was refused"))?;
    Ok(())
}

macro_rules! rule {
    ($name:ident, $kind:expr, bad: [$($bp:literal => $bv:tt),+], good: [$($gp:literal => $gv:tt),+],
     field: $field:literal, says: $says:expr) => {
        #[tokio::test]
        async fn $name() {
            check_rule(
                $kind,
                &[$(($bp, json!($bv))),+],
                &[$(($gp, json!($gv))),+],
                $field,
                $says,
            )
            .await
            .unwrap();
        }
    };
}

const PATTERN_MESSAGE: &str = "should match";
const ADDRESS_MESSAGE: &str = "must be an IPv4 or IPv6 address or CIDR";

rule!(decoy_port_zero_is_refused, Kind::Policy,
    bad: ["/decoys/tcp" => [0]], good: ["/decoys/tcp" => [1]],
    field: "spec.decoys.tcp[0]", says: "should be greater than or equal to 1");
rule!(decoy_port_above_65535_is_refused, Kind::Policy,
    bad: ["/decoys/tcp" => [22, 70000]], good: ["/decoys/tcp" => [22, 65535]],
    field: "spec.decoys.tcp[1]", says: "should be less than or equal to 65535");
rule!(reversed_port_range_is_refused, Kind::Policy,
    bad: ["/decoys/udp" => ["40-30"]], good: ["/decoys/udp" => ["30-40"]],
    field: "spec.decoys.udp[0]", says: "must have low <= high");
rule!(range_beyond_65535_is_refused, Kind::Policy,
    bad: ["/decoys/tcp" => ["65000-65536"]], good: ["/decoys/tcp" => ["65000-65535"]],
    field: "spec.decoys.tcp[0]", says: PATTERN_MESSAGE);
rule!(garbage_port_string_is_refused, Kind::Policy,
    bad: ["/decoys/tcp" => ["ssh"]], good: ["/decoys/tcp" => ["22"]],
    field: "spec.decoys.tcp[0]", says: PATTERN_MESSAGE);
rule!(bad_advanced_exclusion_is_refused, Kind::Policy,
    bad: ["/decoys/advanced" => {"tcpBelow": 1024, "excludeTcp": [80, "x-y"]}],
    good: ["/decoys/advanced" => {"tcpBelow": 1024, "excludeTcp": [80, "8000-8080"]}],
    field: "spec.decoys.advanced.excludeTcp[1]", says: PATTERN_MESSAGE);
rule!(malformed_ipv4_cidr_in_ignore_is_refused, Kind::Policy,
    bad: ["/detection/ignore" => ["10.0.0.0/33"]], good: ["/detection/ignore" => ["10.0.0.0/8"]],
    field: "spec.detection.ignore[0]", says: ADDRESS_MESSAGE);
rule!(malformed_ipv6_cidr_in_ignore_is_refused, Kind::Policy,
    bad: ["/detection/ignore" => ["192.0.2.1", "2001:db8:::/32"]],
    good: ["/detection/ignore" => ["192.0.2.1", "2001:db8::/32"]],
    field: "spec.detection.ignore[1]", says: ADDRESS_MESSAGE);
rule!(malformed_ban_source_is_refused, Kind::Ban,
    bad: ["/source" => "203.0.113.300"], good: ["/source" => "2001:db8::7"],
    field: "spec.source", says: ADDRESS_MESSAGE);
rule!(zero_duration_is_refused, Kind::Policy,
    bad: ["/detection/window" => "0s"], good: ["/detection/window" => "30s"],
    field: "spec.detection.window", says: "must be a positive duration");
rule!(garbage_duration_is_refused, Kind::Policy,
    bad: ["/response/escalation/window" => "a week"],
    good: ["/response/escalation/window" => "168h"],
    field: "spec.response.escalation.window", says: "should match");
rule!(negative_duration_is_refused, Kind::Policy,
    bad: ["/response/webhooks" => [{"url": "https://127.0.0.1:9443/hook", "timeout": "-5s"}]],
    good: ["/response/webhooks" => [{"url": "https://127.0.0.1:9443/hook", "timeout": "5s"}]],
    field: "spec.response.webhooks[0].timeout", says: "should match");
rule!(ban_duration_above_max_ban_duration_is_refused, Kind::Policy,
    bad: ["/response/banDuration" => "48h", "/response/maxBanDuration" => "24h"],
    good: ["/response/banDuration" => "24h", "/response/maxBanDuration" => "24h"],
    field: "spec.response.banDuration", says: "banDuration must not exceed maxBanDuration");
rule!(max_ban_duration_above_a_year_is_refused, Kind::Policy,
    bad: ["/response/maxBanDuration" => "8761h"], good: ["/response/maxBanDuration" => "8760h"],
    field: "spec.response.maxBanDuration", says: "must be at most 8760h");
rule!(unknown_action_is_refused, Kind::Policy,
    bad: ["/response/action" => "Kill"], good: ["/response/action" => "Alert"],
    field: "spec.response.action", says: "Unsupported value");
rule!(unknown_preset_is_refused, Kind::Policy,
    bad: ["/decoys/preset" => "paranoid"], good: ["/decoys/preset" => "aware"],
    field: "spec.decoys.preset", says: "Unsupported value");
rule!(unknown_backend_is_refused, Kind::ClusterPolicy,
    bad: ["/enforcement/backends" => ["Iptables"]], good: ["/enforcement/backends" => ["NodeNftables"]],
    field: "spec.enforcement.backends[0]", says: "Unsupported value");
rule!(unknown_evidence_protocol_is_refused, Kind::Ban,
    bad: ["/evidence" => [{"port": 22, "protocol": "SCTP", "kind": "Connect", "verified": true,
        "reporter": "shop/web-0", "observedAt": "2026-01-01T00:00:00Z"}]],
    good: ["/evidence" => [{"port": 22, "protocol": "TCP", "kind": "Connect", "verified": true,
        "reporter": "shop/web-0", "observedAt": "2026-01-01T00:00:00Z"}]],
    field: "spec.evidence[0].protocol", says: "Unsupported value");
rule!(decoys_without_any_port_are_refused, Kind::Policy,
    bad: ["/decoys" => {"stealth": true, "tcp": []}], good: ["/decoys" => {"stealth": true, "preset": "classic"}],
    field: "spec.decoys", says: "set at least one of preset, tcp, udp or advanced");
rule!(cluster_policy_decoys_without_any_port_are_refused, Kind::ClusterPolicy,
    bad: ["/decoys" => {"banner": "hello"}], good: ["/decoys" => {"banner": "hello", "udp": [7]}],
    field: "spec.decoys", says: "set at least one of preset, tcp, udp or advanced");
rule!(advanced_without_a_bound_is_refused, Kind::Policy,
    bad: ["/decoys/advanced" => {"excludeTcp": [80]}],
    good: ["/decoys/advanced" => {"udpBelow": 1024, "excludeTcp": [80]}],
    field: "spec.decoys.advanced", says: "set tcpBelow, udpBelow or both");
rule!(advanced_bound_zero_is_refused, Kind::Policy,
    bad: ["/decoys/advanced" => {"tcpBelow": 0}], good: ["/decoys/advanced" => {"tcpBelow": 1}],
    field: "spec.decoys.advanced.tcpBelow", says: "should be greater than or equal to 1");
rule!(hook_action_without_webhooks_is_refused, Kind::Policy,
    bad: ["/response/action" => "Hook"],
    good: ["/response/action" => "Hook", "/response/webhooks" => [{"url": "http://alerts.example.com/ps"}]],
    field: "spec.response.webhooks", says: "action Hook needs at least one entry in webhooks");
rule!(webhook_url_that_is_not_a_url_is_refused, Kind::Policy,
    bad: ["/response/webhooks" => [{"url": "alerts.example.com/portsentry"}]],
    good: ["/response/webhooks" => [{"url": "https://alerts.example.com/portsentry"}]],
    field: "spec.response.webhooks[0].url", says: "must be an absolute http:// or https:// URL");
rule!(webhook_url_with_another_scheme_is_refused, Kind::Policy,
    bad: ["/response/webhooks" => [{"url": "ftp://alerts.example.com/portsentry"}]],
    good: ["/response/webhooks" => [{"url": "http://127.0.0.1:8080/portsentry"}]],
    field: "spec.response.webhooks[0].url", says: "must be an absolute http:// or https:// URL");
rule!(scan_trigger_zero_is_refused, Kind::Policy,
    bad: ["/detection/scanTrigger" => 0], good: ["/detection/scanTrigger" => 1],
    field: "spec.detection.scanTrigger", says: "should be greater than or equal to 1");
rule!(max_active_bans_zero_is_refused, Kind::Policy,
    bad: ["/response/maxActiveBans" => 0], good: ["/response/maxActiveBans" => 1],
    field: "spec.response.maxActiveBans", says: "should be greater than or equal to 1");
rule!(ban_offences_zero_is_refused, Kind::Ban,
    bad: ["/offences" => 0], good: ["/offences" => 1],
    field: "spec.offences", says: "should be greater than or equal to 1");
rule!(ban_without_policy_name_is_refused, Kind::Ban,
    bad: ["/policy/name" => ""], good: ["/policy/name" => "nodes", "/policy/kind" => "ClusterPortSentryPolicy"],
    field: "spec.policy.name", says: "should be at least 1 chars long");

const WIDE_BAN_MESSAGE: &str = "a ban's prefix may be at most /8 for IPv4";
rule!(ipv4_ban_wider_than_slash_8_is_refused, Kind::Ban,
    bad: ["/source" => "0.0.0.0/0"], good: ["/source" => "10.0.0.0/8"],
    field: "spec.source", says: WIDE_BAN_MESSAGE);
rule!(ipv6_ban_wider_than_slash_32_is_refused, Kind::Ban,
    bad: ["/source" => "2001:d00::/24"], good: ["/source" => "2001:db8::/32"],
    field: "spec.source", says: WIDE_BAN_MESSAGE);
// The API server's CEL refuses IPv4-mapped IPv6 addresses outright; the operator and the
// sensors read any that get stored otherwise as IPv4 (SourcePrefix's unit tests).
rule!(ipv4_mapped_ban_source_is_refused_as_not_an_address, Kind::Ban,
    bad: ["/source" => "::ffff:0.0.0.0/96"], good: ["/source" => "203.0.113.0/24"],
    field: "spec.source", says: ADDRESS_MESSAGE);
rule!(narrow_ipv4_mapped_ban_source_is_refused_as_not_an_address, Kind::Ban,
    bad: ["/source" => "::ffff:203.0.113.0/120"], good: ["/source" => "203.0.113.0/24"],
    field: "spec.source", says: ADDRESS_MESSAGE);
rule!(webhook_timeout_above_30s_is_refused, Kind::Policy,
    bad: ["/response/webhooks" => [{"url": "https://alerts.example.com/ps", "timeout": "31s"}]],
    good: ["/response/webhooks" => [{"url": "https://alerts.example.com/ps", "timeout": "30s"}]],
    field: "spec.response.webhooks[0].timeout", says: "must be at most 30s");
