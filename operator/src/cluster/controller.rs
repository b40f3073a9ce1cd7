//! The ClusterPortSentryPolicy controller: node-sensor DaemonSet and ConfigMap (built by
//! `nodes`), the ConfigMaps of the sidecars the webhook injected for the policy (built by
//! `inject`), expiry of the policy's cluster-scope bans, and the policy's status.
//!
//! ```text
//!  ClusterPortSentryPolicy ──┐                        ┌─ apply DaemonSet + ConfigMap (SSA), or
//!  DaemonSet, ConfigMap ─────┤                        │  delete them when nodeSelector is gone
//!  (owned, operator ns)      ├─▶ reconcile(policy) ───┼─ apply sidecar ConfigMaps in every
//!  Pod (injected ones, ──────┤   nodes::build_*,      │  namespace with a pod injected for the
//!  trimmed: arrive, leave,   │   inject::cluster_     │  policy; delete the ones no pod needs
//!  sensor readiness flips)   │                        │
//!  PortSentryBan ────────────┘   sensor_config_maps,  ├─ delete forgotten bans of the policy
//!  (operator namespace)          plan (pure)          ├─ status: Ready, Enforced, BanCapReached,
//!                                                     │  sensorsInjected/Ready, activeBans
//!                                                     └─ requeue at the next ban expiry
//! ```

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions},
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use portsentry_crds::{ClusterPortSentryPolicy, PolicyKind, PortSentryBan};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    Error, Result,
    cluster::{
        nodes::{self, NodeSensors},
        plan::{Observed, plan},
    },
    enforce::guards::ProtectedSet,
    inject, labels,
    metrics::Metrics,
    policy::{
        controller::report_failure,
        status::{self, StatusApply},
    },
    shared::Watches,
    watch::{self, WatchBackoff},
};

/// Label value of this controller in metrics.
pub const CONTROLLER: &str = crate::metrics::CONTROLLERS[1];
/// Wait after a failed reconcile.
const RETRY: Duration = Duration::from_secs(5);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// Addresses never banned; kept current by watches.
    pub guards: ProtectedSet,
    pub nodes: NodeSensors,
    /// Events of failed reconciles.
    pub recorder: Recorder,
    /// The controller's cache of cluster policies (forgetting deleted ones' metrics).
    pub policies: Store<ClusterPortSentryPolicy>,
    /// Every pod (the shared watch's store, trimmed by [`crate::shared::pod_view`]); the
    /// ones the webhook injected carry the policy's annotation.
    pub pods: Store<Pod>,
    /// The shared pod watch, to wait for `pods`' first list: an empty store would read as
    /// "no pod needs a ConfigMap".
    pub pod_watch: crate::shared::Shared<Pod>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

fn field_manager() -> PatchParams {
    PatchParams::apply(labels::MANAGER).force()
}

fn ban_to_policy(ban: &PortSentryBan) -> Option<ObjectRef<ClusterPortSentryPolicy>> {
    (ban.spec.policy.kind == PolicyKind::ClusterPortSentryPolicy)
        .then(|| ObjectRef::new(&ban.spec.policy.name))
}

/// The cluster policy a pod was injected for (its `portsentry.io/injected` annotation).
pub fn pod_to_policy(pod: &PartialObjectMeta<Pod>) -> Option<ObjectRef<ClusterPortSentryPolicy>> {
    pod.annotations()
        .get(labels::INJECTED_ANNOTATION)?
        .strip_prefix("ClusterPortSentryPolicy/")
        .map(ObjectRef::new)
}

/// Selector of the sidecar ConfigMaps: the sensor configs rendered by this operator, but not
/// the node sensors' (labelled with [`labels::CLUSTER_POLICY_LABEL`], managed next to their
/// DaemonSet).
fn sidecar_config_selector() -> String {
    format!(
        "{},!{}",
        labels::SENSOR_CONFIG_SELECTOR,
        labels::CLUSTER_POLICY_LABEL
    )
}

/// Runs the cluster-policy controller until the process ends (signals are main's: it
/// stops every task, then releases the Lease).
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    guards: ProtectedSet,
    nodes: NodeSensors,
    reporter: Reporter,
    shared: Watches,
) {
    let namespace = nodes.namespace.clone();
    let owned = watcher::Config::default().labels(labels::CLUSTER_POLICY_LABEL);
    let mut controller = Controller::new(
        Api::<ClusterPortSentryPolicy>::all(client.clone()),
        watcher::Config::default(),
    )
    .trigger_backoff(WatchBackoff::default());
    let policies = controller.store();
    if nodes.enabled {
        controller = controller
            .owns(
                Api::<DaemonSet>::namespaced(client.clone(), &namespace),
                owned.clone(),
            )
            .owns(
                Api::<ConfigMap>::namespaced(client.clone(), &namespace),
                owned,
            );
    }
    // The shared ban watch, reduced to the bans of the operator namespace.
    let ban_namespace = namespace.clone();
    let ban_events = shared
        .bans
        .subscribe()
        .await
        .touched_objects()
        .try_filter(move |ban| {
            std::future::ready(ban.namespace().as_deref() == Some(ban_namespace.as_str()))
        });
    // Injected pods of the shared pod watch (trimmed by `pod_view`: readiness is status); the
    // store serves every reconcile; their arrival, departure or sensor readiness flip
    // reconciles the cluster policy named in their annotation.
    let pods = shared.pods.store();
    let pod_events = watch::injected_pod_triggers(crate::shared::injected_events(
        shared.pods.subscribe().await,
    ));
    // A new intake CA bundle (a rotated --report-ca-file) re-renders every sensor ConfigMap.
    let ca_changes = crate::tls::ca_changes(nodes.report_ca_pem.clone());
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics,
        guards,
        nodes,
        policies,
        pods,
        pod_watch: shared.pods.clone(),
    });
    controller
        .reconcile_all_on(ca_changes)
        .watches_stream(ban_events, |ban| ban_to_policy(&ban))
        .watches_stream(pod_events, |pod| pod_to_policy(&pod))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::debug!(%object, ?action, "reconciled"),
                Err(error) => warn!(%error, "cluster policy controller"),
            }
        })
        .await;
}

async fn reconcile(policy: Arc<ClusterPortSentryPolicy>, context: Arc<Context>) -> Result<Action> {
    let key = policy.name_any();
    let started = Instant::now();
    let result = reconcile_policy(&policy, &context, &key)
        .instrument(info_span!("reconcile", cluster_policy = %key))
        .await;
    if let Err(error) = &result {
        let api = Api::<ClusterPortSentryPolicy>::all(context.client.clone());
        let previous = policy.status.as_ref();
        report_failure(&api, &context.recorder, policy.as_ref(), previous, error).await;
    }
    context.metrics.reconciled(CONTROLLER, started.elapsed());
    let live = context
        .policies
        .state()
        .iter()
        .map(|p| p.name_any())
        .collect();
    context.metrics.retain_cluster_policies(&live);
    result
}

fn error_policy(
    policy: Arc<ClusterPortSentryPolicy>,
    error: &Error,
    context: Arc<Context>,
) -> Action {
    warn!(cluster_policy = %policy.name_any(), %error, "reconcile failed");
    context.metrics.reconcile_failed(CONTROLLER, error);
    Action::requeue(RETRY)
}

/// Applies `object` when wanted, deletes `name` otherwise (gone already is fine).
async fn apply_or_delete<K>(api: &Api<K>, name: &str, object: Option<K>) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let kind = if K::kind(&()) == "DaemonSet" {
        "DaemonSet"
    } else {
        "ConfigMap"
    };
    match object {
        Some(object) => Ok(Some(
            api.patch(name, &field_manager(), &Patch::Apply(&object))
                .await
                .map_err(Error::write(kind, name))?,
        )),
        None => match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(
                    object = name,
                    "node sensor object deleted (no nodeSelector)"
                );
                Ok(None)
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
            Err(error) => Err(Error::write(kind, name)(error)),
        },
    }
}

/// One pass: build (pure), apply the node-sensor objects, expire bans, write status.
async fn reconcile_policy(
    policy: &ClusterPortSentryPolicy,
    context: &Context,
    key: &str,
) -> Result<Action> {
    let client = &context.client;
    let nodes = &context.nodes;
    let namespace = nodes.namespace.as_str();
    let name = policy.name_any();
    let object_name = nodes::object_name(&name);

    // Build and apply the node sensors.
    let report_ca_pem = nodes.report_ca_pem.borrow().clone();
    let daemon_set = if nodes.enabled {
        let target = nodes::Target {
            namespace,
            sidecar: &nodes.sidecar,
            nodes: &nodes.settings,
            report_ca_pem: report_ca_pem.as_deref(),
        };
        let config_map = nodes::build_config_map(policy, &target)?;
        let daemon_set = nodes::build_daemon_set(policy, &target)?;
        // The ConfigMap first: a new DaemonSet's pods find their config.
        apply_or_delete(
            &Api::<ConfigMap>::namespaced(client.clone(), namespace),
            &object_name,
            config_map,
        )
        .await?;
        apply_or_delete(
            &Api::<DaemonSet>::namespaced(client.clone(), namespace),
            &object_name,
            daemon_set,
        )
        .await?
    } else {
        None
    };

    let sidecars = apply_sidecar_config_maps(policy, context).await?;

    // Observe the bans and plan.
    let ban_api = Api::<PortSentryBan>::namespaced(client.clone(), namespace);
    let bans_now = ban_api.list(&ListParams::default()).await?.items;
    let guards = context
        .guards
        .for_bans(bans_now.iter().filter(|b| {
            b.spec.policy.kind == PolicyKind::ClusterPortSentryPolicy
                && b.spec.policy.name == policy.name_any()
        }))
        .await?;
    let plan = plan(&Observed {
        policy,
        bans: &bans_now,
        daemon_set: daemon_set.as_ref(),
        guards: &guards,
        node_sensors_enabled: nodes.enabled,
        pod_nftables_agent: nodes.pod_nftables_agent,
        sidecars,
        now: Timestamp::now(),
    });

    // Apply and report.
    let removed = delete_expired(&ban_api, &plan.expired).await;
    if removed > 0 {
        info!(removed, "expired cluster bans no longer remembered removed");
    }
    if !plan.lifted.is_empty() {
        context.metrics.bans_expired(plan.lifted.len());
        info!(lifted = plan.lifted.len(), "cluster bans expired");
    }
    Api::<ClusterPortSentryPolicy>::all(client.clone())
        .patch_status(&name, &field_manager(), &Patch::Apply(&plan.status))
        .await
        .map_err(Error::write(
            "ClusterPortSentryPolicy status",
            name.as_str(),
        ))?;
    for (ban, condition) in plan.ban_conditions {
        let apply = StatusApply::of::<PortSentryBan>(status::ban_status(condition));
        match ban_api
            .patch_status(&ban, &field_manager(), &Patch::Apply(&apply))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(Error::write("PortSentryBan status", ban)(error)),
        }
    }
    context
        .metrics
        .cluster_policy_state(key, plan.active_bans, plan.enforced);
    Ok(Action::requeue(plan.requeue_after))
}

/// Applies the ConfigMaps of the sidecars injected for `policy` (in each namespace with such
/// a pod) and deletes the ones it controls that no pod needs any more; returns the sidecars
/// injected for it and how many of them are ready.
async fn apply_sidecar_config_maps(
    policy: &ClusterPortSentryPolicy,
    context: &Context,
) -> Result<status::SensorCount> {
    context
        .pod_watch
        .ready()
        .await
        .map_err(|_| Error::WatchStopped("Pod"))?;
    let uid = policy
        .uid()
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    let reference = format!("ClusterPortSentryPolicy/{}", policy.name_any());
    let injected: Vec<Arc<Pod>> = context
        .pods
        .state()
        .into_iter()
        .filter(|pod| {
            // Sidecars only: node sensors' pods (labelled `=node`) count through their DaemonSet.
            crate::shared::injected(pod)
                && pod.annotations().get(labels::INJECTED_ANNOTATION) == Some(&reference)
        })
        .collect();
    let sidecars = status::count_sensors(injected.iter().map(|pod| pod.as_ref()), &reference);
    let pods: Vec<ObjectMeta> = injected.iter().map(|pod| pod.metadata.clone()).collect();
    let report_ca_pem = context.nodes.report_ca_pem.borrow().clone();
    let extras = inject::SidecarExtras {
        report_ca_pem: report_ca_pem.as_deref(),
        metrics_per_port: context.nodes.sidecar.metrics_per_port,
    };
    let wanted = inject::cluster_sensor_config_maps(policy, &pods, extras);
    let client = &context.client;
    for config_map in &wanted {
        let namespace = config_map.namespace().unwrap_or_default();
        let name = config_map.name_any();
        Api::<ConfigMap>::namespaced(client.clone(), &namespace)
            .patch(&name, &field_manager(), &Patch::Apply(config_map))
            .instrument(info_span!("apply", config_map = %format!("{namespace}/{name}")))
            .await
            .map_err(Error::write("ConfigMap", format!("{namespace}/{name}")))?;
    }
    let existing: Vec<ObjectMeta> = Api::<ConfigMap>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&sidecar_config_selector()))
        .await?
        .items
        .into_iter()
        .map(|object| object.metadata)
        .collect();
    for (namespace, name) in inject::stale_config_maps_by_namespace(&uid, &wanted, &existing) {
        let listed = existing.iter().find(|m| {
            m.namespace.as_deref() == Some(namespace.as_str()) && m.name.as_deref() == Some(&name)
        });
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: listed.and_then(|m| m.resource_version.clone()),
                uid: listed.and_then(|m| m.uid.clone()),
            }),
            ..DeleteParams::default()
        };
        match Api::<ConfigMap>::namespaced(client.clone(), &namespace)
            .delete(&name, &params)
            .await
        {
            Ok(_) => {
                info!(config_map = %format!("{namespace}/{name}"), "stale sensor ConfigMap deleted")
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => {
                return Err(Error::write("ConfigMap", format!("{namespace}/{name}"))(
                    error,
                ));
            }
        }
    }
    Ok(sidecars)
}

/// Deletes expired bans, only if unchanged since read (an extension in between wins).
async fn delete_expired(api: &Api<PortSentryBan>, expired: &[PortSentryBan]) -> usize {
    let mut removed = 0;
    for ban in expired {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: ban.resource_version(),
                uid: ban.uid(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&ban.name_any(), &params).await {
            Ok(_) => removed += 1,
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(error) => warn!(ban = %ban.name_any(), %error, "could not delete expired ban"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_reconciles_the_cluster_policy_it_was_injected_for() {
        let mut pod = PartialObjectMeta::<Pod>::default();
        pod.metadata.annotations = Some(
            [(
                labels::INJECTED_ANNOTATION.to_owned(),
                "ClusterPortSentryPolicy/edge".to_owned(),
            )]
            .into(),
        );
        assert_eq!(pod_to_policy(&pod), Some(ObjectRef::new("edge")));
        pod.metadata.annotations = Some(
            [(
                labels::INJECTED_ANNOTATION.to_owned(),
                "PortSentryPolicy/web".to_owned(),
            )]
            .into(),
        );
        assert_eq!(pod_to_policy(&pod), None);
    }
}
