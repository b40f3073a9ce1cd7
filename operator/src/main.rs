//! `portsentry-operator`: starts the operations endpoint, the webhook, the report intake,
//! leader election and (as leader) the controllers, each a supervised task; the rest is the
//! library. Any task ending stops the process (non-zero); SIGTERM releases the Lease first.
#![forbid(unsafe_code)]

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use clap::{ArgAction, Parser};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, runtime::events::Reporter};
use portsentry_crds::PortSentryBan;
use portsentry_operator::{
    Error, Result, cleanup, cluster,
    enforce::{self, quarantine},
    hooks::{HookSettings, Hooks},
    http,
    inject::webhook,
    intake::{
        self,
        server::{Intake, Limits},
    },
    labels, lease,
    metrics::Metrics,
    policy,
    server::{self, Readiness},
    shared::{self, Shared},
    tasks::Supervisor,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
/// Reconciles PortSentry policies into enforcement.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the plain-HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080", env = "PORTSENTRY_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// The operator's own addresses, never banned (repeatable; the pod IP in-cluster).
    #[arg(long = "operator-addr", env = "POD_IP", value_delimiter = ',')]
    operator_addrs: Vec<IpAddr>,
    /// Namespaces whose pods are never banned nor quarantined, besides kube-system and the
    /// operator's own (chart value `protectedNamespaces`).
    #[arg(
        long = "protected-namespace",
        env = "PORTSENTRY_PROTECTED_NAMESPACES",
        value_delimiter = ','
    )]
    protected_namespaces: Vec<String>,
    /// Prefixes never banned (chart value `protectedCIDRs`).
    #[arg(
        long = "protected-cidr",
        env = "PORTSENTRY_PROTECTED_CIDRS",
        value_delimiter = ','
    )]
    protected_cidrs: Vec<ipnet::IpNet>,
    /// The cluster's pod ranges besides the nodes' `spec.podCIDRs` (chart value `podCIDRs`):
    /// bans inside them are pod sources, which the NetworkPolicy backend does not claim.
    #[arg(long = "pod-cidr", env = "PORTSENTRY_POD_CIDRS", value_delimiter = ',')]
    pod_cidrs: Vec<ipnet::IpNet>,
    /// IPv6 sources are banned as their network of this length once enough of it is banned.
    #[arg(long, env = "PORTSENTRY_IPV6_GROUP_PREFIX", default_value = "64")]
    ipv6_group_prefix: u8,
    /// Addresses of one such network banned before the next bans the network.
    #[arg(long, env = "PORTSENTRY_IPV6_GROUP_AFTER", default_value = "4")]
    ipv6_group_after: usize,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Name of this replica in Events and the Lease (the pod name in-cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// The operator's namespace: node sensors' pods, cluster policies' bans, the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "portsentry-system")]
    namespace: String,
    /// Address of the HTTPS report intake (POST /v1/reports).
    #[arg(long, default_value = "0.0.0.0:8443", env = "PORTSENTRY_REPORT_ADDR")]
    report_addr: SocketAddr,
    /// The intake's certificate: given files, or issued by the operator's intake CA.
    #[command(flatten)]
    intake_tls: intake::tls::IntakeTlsArgs,
    /// Reports one sensor may send at once (token bucket size).
    #[arg(long, default_value = "20")]
    report_burst: u32,
    /// Reports per second one sensor may send on average.
    #[arg(long, default_value = "5")]
    report_rate: f64,
    /// TokenReviews of unknown tokens one client address may cause at once.
    #[arg(long, default_value = "20")]
    review_burst: u32,
    /// TokenReviews of unknown tokens per second one client address may cause on average.
    #[arg(long, default_value = "2")]
    review_rate: f64,
    /// Elect a leader with a Lease; only the leader runs the controller and writes.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = labels::MANAGER)]
    lease_name: String,
    /// PEM CA bundle trusted for https:// alert hooks besides the system's roots.
    #[arg(long)]
    hook_ca_file: Option<PathBuf>,
    /// Alert hook targets allowed although loopback, link-local, the metadata address or a
    /// cluster range (repeatable CIDR).
    #[arg(long = "hook-allow-cidr")]
    hook_allow_cidrs: Vec<ipnet::IpNet>,
    /// Pod or Service ranges of the cluster that hooks may not target, besides those read
    /// from ServiceCIDRs and nodes' podCIDRs (repeatable CIDR).
    #[arg(long = "hook-deny-cidr")]
    hook_deny_cidrs: Vec<ipnet::IpNet>,
    /// Seconds a Lease holds without renewal.
    #[arg(long, default_value = "15")]
    lease_duration_secs: u64,

    /// The sidecar-injection webhook (served by every replica, leader or not).
    #[command(flatten)]
    webhook: webhook::WebhookArgs,
    /// Node sensors of ClusterPortSentryPolicies (run by the leader's cluster controller).
    #[command(flatten)]
    nodes: cluster::nodes::NodeSensorArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

/// What to run instead of the operator.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Stop the operator and remove what it generated: node-sensor DaemonSets, generated
    /// NetworkPolicies, quarantine labels (the chart's pre-delete hook runs this).
    Cleanup(CleanupArgs),
}

#[derive(Debug, clap::Args)]
struct CleanupArgs {
    /// The operator Deployment (in the operator's namespace), scaled to zero first.
    #[arg(long)]
    deployment: String,
    /// Also delete the node-sensor DaemonSets (chart value `nodeSensors.enabled`).
    #[arg(long)]
    node_sensors: bool,
    /// Seconds to wait for the operator's and the node sensors' pods to stop.
    #[arg(long, default_value = "120")]
    patience_secs: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let outcome = match &args.command {
        Some(Command::Cleanup(cleanup)) => run_cleanup(&args.namespace, cleanup).await,
        None => run(args).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "stopped on an error");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the cleanup and says what it removed.
async fn run_cleanup(namespace: &str, args: &CleanupArgs) -> Result<()> {
    let client = Client::try_default().await?;
    let settings = cleanup::Settings {
        namespace: namespace.to_owned(),
        deployment: args.deployment.clone(),
        node_sensors: args.node_sensors,
        patience: Duration::from_secs(args.patience_secs),
    };
    let removed = cleanup::run(client, &settings).await?;
    info!(
        daemon_sets = ?removed.daemon_sets,
        network_policies = ?removed.network_policies,
        quarantine_labels = ?removed.quarantine_labels,
        "cleanup done: the operator is stopped and nothing it generated is left"
    );
    Ok(())
}

/// Starts every task, then waits for the first to end (an error: exit non-zero) or for
/// SIGTERM/SIGINT (stop every task, release the Lease if held, exit zero).
async fn run(args: Args) -> Result<()> {
    let client = Client::try_default().await?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut tasks = Supervisor::default();
    let (leader_tx, election) = start(&mut tasks, &args, client.clone()).await?;
    let signal = tokio::select! {
        ended = tasks.first_end() => {
            let (task, why) = ended.ok_or_else(|| Error::TaskEnded {
                task: "supervisor",
                why: "no task to run".into(),
            })?;
            error!(task, %why, "a task ended; stopping the operator");
            return Err(Error::TaskEnded {
                task,
                why: why.to_string(),
            });
        }
        _ = terminate.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    info!(signal, "stopping");
    // Stop writing before giving the Lease away: no write of ours after another's first.
    leader_tx.send_replace(false);
    tasks.stop_all().await;
    if let Some(settings) = election {
        release(client, &settings).await;
    }
    Ok(())
}

/// Releases the Lease if held, within two seconds (a failure only delays the handover).
async fn release(client: Client, settings: &lease::Settings) {
    match tokio::time::timeout(Duration::from_secs(2), lease::release(client, settings)).await {
        Ok(Ok(true)) => info!(lease = %settings.name, "lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => warn!(%error, "lease not released; it expires on its own"),
        Err(_) => warn!("lease not released in time; it expires on its own"),
    }
}

/// Spawns every task into `tasks`: the leader flag's sender and the election's settings.
async fn start(
    tasks: &mut Supervisor,
    args: &Args,
    client: Client,
) -> Result<(watch::Sender<bool>, Option<lease::Settings>)> {
    let metrics = Arc::new(Metrics::new()?);
    let readiness = Readiness::default();
    if args.webhook.webhook_addr.is_some() {
        readiness.not_ready(webhook::READY, "starting");
    }
    readiness.not_ready(intake::server::READY, "starting");
    let operations = http::bind(
        "operations endpoint",
        args.metrics_addr,
        http::BIND_PATIENCE,
    )
    .await?;
    info!(addr = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
    let (served_metrics, served_readiness) = (metrics.clone(), readiness.clone());
    tasks.spawn("operations endpoint", async move {
        server::serve(operations, served_metrics, served_readiness)
            .await
            .map_err(|source| Error::Serve {
                server: "operations endpoint",
                source,
            })
    });
    if args.webhook.webhook_addr.is_some() {
        let run = webhook::run(
            client.clone(),
            args.webhook.clone(),
            readiness.clone(),
            metrics.clone(),
        );
        tasks.spawn("injection webhook", run);
    }
    let guard_settings = enforce::guards::GuardSettings {
        pod_nets: args.pod_cidrs.clone(),
        ..enforce::guards::GuardSettings::new(
            args.operator_addrs.clone(),
            &args.namespace,
            args.protected_namespaces.clone(),
            args.protected_cidrs.clone(),
        )
    };
    let guards = enforce::guards::ProtectedSet::discover(client.clone(), guard_settings).await?;
    tasks.spawn_infallible("protected-address watches", guards.clone().follow());
    let identity = args
        .instance
        .clone()
        .unwrap_or_else(|| format!("{}-{}", labels::MANAGER, std::process::id()));
    let reporter = Reporter {
        controller: labels::MANAGER.into(),
        instance: Some(identity.clone()),
    };
    let (leader_tx, leader) = watch::channel(!args.leader_elect);
    let tls = intake::tls::load(&client, &args.intake_tls, &args.namespace).await?;
    let hook_ca = args
        .hook_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let (hooks, delivery) = Hooks::start(
        metrics.clone(),
        HookSettings {
            extra_ca_pem: hook_ca,
            allow: args.hook_allow_cidrs.clone(),
            cluster_ranges: args.hook_deny_cidrs.clone(),
            client: Some(client.clone()),
        },
    )?;
    tasks.spawn_infallible("alert hook delivery", delivery);
    // One watch of PortSentryBans for the intake (every replica) and the leader's controllers.
    let (bans, ban_watch) = Shared::watch(
        Api::<PortSentryBan>::all(client.clone()),
        shared::without_managed_fields,
    );
    let expected = {
        let sidecar = args.webhook.settings()?;
        let nodes = cluster::nodes::NodeSensorSettings::from_json(
            args.nodes
                .node_sensor_settings
                .as_deref()
                .unwrap_or_default(),
        )?;
        intake::authentic::Expected {
            operator_namespace: args.namespace.clone(),
            ..intake::authentic::Expected::new(&sidecar, &nodes.image)
        }
    };
    let intake = Intake::new(
        client.clone(),
        metrics.clone(),
        guards.clone(),
        leader.clone(),
        intake::server::Settings {
            limits: Limits {
                burst: args.report_burst,
                per_second: args.report_rate,
                review_burst: args.review_burst,
                review_per_second: args.review_rate,
                ..Limits::default()
            },
            operator_namespace: args.namespace.clone(),
            expected,
            grouping: enforce::bans::Ipv6Grouping {
                prefix_len: args.ipv6_group_prefix,
                after: args.ipv6_group_after,
            },
            reporter: reporter.clone(),
            hooks: Some(hooks.clone()),
        },
        &bans,
    );
    tasks.spawn_infallible("ban watch", ban_watch);
    let serve_intake = intake::server::run(args.report_addr, tls.config, intake, readiness);
    tasks.spawn("report intake", serve_intake);
    let election = args.leader_elect.then(|| lease::Settings {
        namespace: args.namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: Duration::from_secs(args.lease_duration_secs.max(3)),
    });
    if let Some(settings) = election.clone() {
        tasks.spawn(
            "leader election",
            lease::run(client.clone(), settings, leader_tx.clone()),
        );
    }
    let node_sensors = args.nodes.node_sensors(
        &args.namespace,
        args.webhook.settings()?,
        tls.ca_pem.clone(),
    )?;
    // One watch of pods (trimmed), run by the leader for its three consumers.
    let (pods, pod_watch) = Shared::watch(Api::<Pod>::all(client.clone()), shared::pod_view);
    tasks.spawn("pod watch", leading(leader.clone(), pod_watch));
    let watches = shared::Watches { bans, pods };
    let policy_controller = policy::controller::run(
        client.clone(),
        metrics.clone(),
        guards.clone(),
        reporter.clone(),
        policy::controller::Settings {
            hooks: Some(hooks),
            intake_ca: tls.ca_pem.clone(),
            pod_nftables_agent: args.nodes.pod_nftables_agent,
            metrics_per_port: args.webhook.sensor_metrics_per_port,
        },
        watches.clone(),
    );
    tasks.spawn(
        "policy controller",
        leading(leader.clone(), policy_controller),
    );
    tasks.spawn(
        "quarantine",
        leading(
            leader.clone(),
            quarantine::run(
                client.clone(),
                watches.clone(),
                guards.clone(),
                args.namespace.clone(),
            ),
        ),
    );
    let cluster_controller =
        cluster::controller::run(client, metrics, guards, node_sensors, reporter, watches);
    tasks.spawn("cluster controller", leading(leader, cluster_controller));
    Ok((leader_tx, election))
}

/// Runs `task` once this replica leads (it then runs until the process ends).
async fn leading(
    mut leader: watch::Receiver<bool>,
    task: impl Future<Output = ()> + Send,
) -> Result<()> {
    leader
        .wait_for(|leading| *leading)
        .await
        .map_err(|_| Error::LeadershipLost("leader election stopped"))?;
    task.await;
    Ok(())
}
