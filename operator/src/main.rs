//! `portsentry-operator`: starts the operations endpoint, the report intake, leader election,
//! the protected-address refresher and (as leader) the controller; the rest is the library.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::{ArgAction, Parser};
use kube::{Client, runtime::events::Reporter};
use portsentry_operator::{
    Error, Result, cluster,
    enforce::{self, quarantine},
    hooks::{HookSettings, Hooks},
    inject::webhook,
    intake::{
        self,
        server::{Intake, Limits},
    },
    labels, lease,
    metrics::Metrics,
    policy, server,
};
use tokio::sync::watch;
use tracing::{error, info};
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
    /// How often node and API server addresses are re-read.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    guard_refresh_secs: u64,
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
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!(%error, "operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new()?);
    tokio::spawn(serve_webhook(
        client.clone(),
        args.webhook.clone(),
        metrics.clone(),
    ));
    let guards = Arc::new(RwLock::new(
        enforce::guards::discover_guards(&client, &args.operator_addrs).await?,
    ));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", args.metrics_addr)))?;
    info!(addr = %args.metrics_addr, "serving /metrics");
    tokio::spawn(serve_operations(listener, metrics.clone()));
    tokio::spawn(enforce::guards::refresh_guards(
        client.clone(),
        guards.clone(),
        args.operator_addrs.clone(),
        Duration::from_secs(args.guard_refresh_secs.max(1)),
    ));
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
            std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
        })
        .transpose()?;
    let hooks = Hooks::start(
        metrics.clone(),
        HookSettings {
            extra_ca_pem: hook_ca,
            allow: args.hook_allow_cidrs.clone(),
            cluster_ranges: args.hook_deny_cidrs.clone(),
            client: Some(client.clone()),
        },
    )?;
    let node_sensors = args.nodes.node_sensors(
        &args.namespace,
        args.webhook.settings()?,
        tls.ca_pem.clone(),
    )?;
    let (intake, ban_watch) = Intake::new(
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
            reporter: reporter.clone(),
            hooks: Some(hooks.clone()),
        },
    );
    tokio::spawn(ban_watch);
    let report_listener = tokio::net::TcpListener::bind(args.report_addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", args.report_addr)))?;
    info!(addr = %args.report_addr, "serving POST {}", intake::server::PATH);
    tokio::spawn(serve_reports(report_listener, tls.config, intake));
    let election = async {
        if args.leader_elect {
            let settings = lease::Settings {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(args.lease_duration_secs.max(3)),
            };
            lease::run(client.clone(), settings, leader_tx).await
        } else {
            std::future::pending().await
        }
    };
    let lead = async {
        let mut leader = leader.clone();
        leader
            .wait_for(|leading| *leading)
            .await
            .map_err(|_| Error::Config("leader election stopped".into()))?;
        tokio::select! {
            () = policy::controller::run(
                client.clone(),
                metrics.clone(),
                guards.clone(),
                reporter,
                Some(hooks),
                tls.ca_pem.clone(),
            ) => {}
            () = quarantine::run(client.clone()) => {}
            () = cluster::controller::run(client.clone(), metrics.clone(), guards.clone(), node_sensors) => {}
        }
        Ok(())
    };
    tokio::select! {
        result = election => result,
        result = lead => result,
    }
}

async fn serve_webhook(client: Client, args: webhook::WebhookArgs, metrics: Arc<Metrics>) {
    if let Err(error) = webhook::run(client, args, metrics).await {
        error!(%error, "injection webhook stopped");
    }
}

async fn serve_reports(
    listener: tokio::net::TcpListener,
    tls: watch::Receiver<Arc<tokio_rustls::rustls::ServerConfig>>,
    intake: Arc<Intake>,
) {
    if let Err(error) = intake::server::serve(listener, tls, intake).await {
        error!(%error, "report intake stopped");
    }
}

async fn serve_operations(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    if let Err(error) = server::serve(listener, metrics).await {
        error!(%error, "operations endpoint stopped");
    }
}
