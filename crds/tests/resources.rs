//! The chart's example objects and the report wire type round-trip through the Rust types.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::{fs, path::Path};

use portsentry_crds::{
    Action, Backend, ClusterPortSentryPolicy, PolicyKind, PolicyRef, PortSentryBan,
    PortSentryPolicy, Preset, ProbeKind, Protocol,
    report::{Detection, Probe, Report},
};
use serde::de::DeserializeOwned;

fn example<T: DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/portsentry/examples")
        .join(name);
    serde_yaml::from_str(&fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn round_trips<T: serde::Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let text = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, value);
}

#[test]
fn the_classic_policy_example_reads_and_round_trips() {
    let policy: PortSentryPolicy = example("policy-classic.yaml");
    assert_eq!(policy.spec.rules.decoys.preset, Some(Preset::Classic));
    assert_eq!(policy.spec.rules.decoys.tcp.len(), 2);
    assert_eq!(policy.spec.rules.response.ban_duration.to_string(), "1h");
    round_trips(&policy);
}

#[test]
fn omitted_sections_take_documented_defaults() {
    let policy: PortSentryPolicy = example("policy-advanced-stealth.yaml");
    let rules = &policy.spec.rules;
    assert_eq!(rules.response.action, Action::Alert);
    assert_eq!(rules.detection.scan_trigger, 1);
    assert_eq!(rules.enforcement.backends, vec![Backend::NetworkPolicy]);
    assert!(
        !rules.response.ban_on_unverified,
        "unverified evidence must not ban by default"
    );
    round_trips(&policy);
}

#[test]
fn the_cluster_policy_example_reads_and_round_trips() {
    let policy: ClusterPortSentryPolicy = example("cluster-policy-nodes.yaml");
    assert!(policy.spec.node_selector.is_some());
    assert_eq!(
        policy.spec.rules.enforcement.backends,
        vec![Backend::NodeNftables, Backend::NetworkPolicy]
    );
    round_trips(&policy);
}

#[test]
fn the_hand_made_ban_example_reads_and_round_trips() {
    let ban: PortSentryBan = example("ban-by-hand.yaml");
    assert_eq!(ban.spec.source.to_string(), "203.0.113.7");
    assert_eq!(ban.spec.policy.kind, PolicyKind::PortSentryPolicy);
    round_trips(&ban);
}

#[test]
fn a_report_round_trips_as_json() {
    let report = Report {
        policy: PolicyRef {
            kind: PolicyKind::PortSentryPolicy,
            name: "shop".into(),
        },
        detections: vec![Detection {
            source: "2001:db8::7".parse().unwrap(),
            probes: vec![Probe {
                port: 111,
                protocol: Protocol::Tcp,
                kind: ProbeKind::Connect,
                verified: true,
                observed_at_ms: 1_700_000_000_000,
            }],
        }],
    };
    round_trips(&report);
}

#[test]
fn a_report_with_unknown_fields_is_refused() {
    let text =
        r#"{"policy":{"kind":"PortSentryPolicy","name":"shop"},"detections":[],"sensor":"x"}"#;
    assert!(serde_json::from_str::<Report>(text).is_err());
}

#[test]
fn only_a_completed_handshake_proves_a_source() {
    assert!(ProbeKind::Connect.proves_source());
    for kind in [
        ProbeKind::Datagram,
        ProbeKind::Syn,
        ProbeKind::Fin,
        ProbeKind::Null,
        ProbeKind::Xmas,
        ProbeKind::Ack,
        ProbeKind::Window,
        ProbeKind::Maimon,
        ProbeKind::Unknown,
    ] {
        assert!(!kind.proves_source(), "{kind:?}");
    }
}
