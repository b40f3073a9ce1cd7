//! The operator's resident memory with 5,000 pods on a real API server (a measurement: the
//! target has `test = false` in tests/Cargo.toml, so `tests/run` does not run it): 5 namespaces of 1,000 pods, each selected by a PortSentryPolicy; the
//! operator starts once they exist, syncs its watches and reconciles every policy; then its
//! `VmRSS` is read each second for 15 s and the last and peak (`VmHWM`) values are printed.
//!
//! ```text
//! sudo -E CI=true cargo test -p portsentry-tests --test operator_memory -- --nocapture
//! ```
//! `PORTSENTRY_OPERATOR_BIN=<path>` measures another build (e.g. an older commit's).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use portsentry_crds::PortSentryPolicy;
use portsentry_tests::{
    ControlPlane, FIELD_MANAGER, Operator, OperatorSettings, Options, install_crds, prerequisites,
    wait_for,
};
use serde_json::json;

const NAMESPACES: usize = 5;
const PODS_PER_NAMESPACE: usize = 1_000;

/// A pod as a Deployment's ReplicaSet makes it: labels, annotations, one container with
/// ports, env, probes and resources.
fn pod(namespace: &str, index: usize) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("web-{index:04}"), "namespace": namespace,
            "labels": {"app": "web", "pod-template-hash": "5d8f7c9b6", "tier": "frontend"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
        },
        "spec": {
            "serviceAccountName": "default",
            "containers": [{
                "name": "app", "image": "registry.invalid/shop/web:1.27.3",
                "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "metrics"}],
                "env": (0..8).map(|i| json!({"name": format!("SETTING_{i}"), "value": format!("value-{i}")})).collect::<Vec<_>>(),
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            }],
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn operator_resident_memory_with_5000_pods() {
    if !prerequisites(&[]) {
        return;
    }
    let plane = ControlPlane::start(Options::default()).await.unwrap();
    let client = plane.client().unwrap();
    install_crds(&client, Duration::from_secs(60))
        .await
        .unwrap();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let started = Instant::now();
    for n in 0..NAMESPACES {
        let namespace = format!("shop-{n}");
        plane.ensure_namespace(&namespace).await.unwrap();
        let policy = json!({
            "apiVersion": "portsentry.io/v1alpha1", "kind": "PortSentryPolicy",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "decoys": {"tcp": [31337]}},
        });
        Api::<PortSentryPolicy>::namespaced(client.clone(), &namespace)
            .patch("web", &params, &Patch::Apply(policy))
            .await
            .unwrap();
        let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
        futures::stream::iter(0..PODS_PER_NAMESPACE)
            .map(|i| {
                let (pods, pod) = (pods.clone(), pod(&namespace, i));
                async move { pods.create(&PostParams::default(), &pod).await.map(|_| ()) }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .unwrap();
    }
    eprintln!(
        "{} pods created in {:?}",
        NAMESPACES * PODS_PER_NAMESPACE,
        started.elapsed()
    );

    let operator = Operator::start(&plane, OperatorSettings::new("memory"))
        .await
        .unwrap();
    let policies = Api::<PortSentryPolicy>::all(client.clone());
    wait_for(Duration::from_secs(300), "every policy reconciled", || {
        let policies = policies.clone();
        async move {
            let list = policies.list(&Default::default()).await?;
            Ok(list.items.len() == NAMESPACES
                && list.items.iter().all(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                    })
                }))
        }
        .boxed()
    })
    .await
    .unwrap();
    let mut samples = Vec::new();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(operator.resident_kib().unwrap());
    }
    let (rss, peak) = *samples.last().unwrap();
    println!(
        "operator with {} pods: VmRSS {:.1} MiB after sync (VmHWM peak {:.1} MiB)",
        NAMESPACES * PODS_PER_NAMESPACE,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
