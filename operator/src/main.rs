//! `portsentry-operator`: starts the operations endpoint, the protected-address refresher
//! and the PortSentryPolicy controller; everything else lives in the library.
#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::Parser;
use kube::{Client, runtime::events::Reporter};
use portsentry_operator::{Error, Result, controller, metrics::Metrics, server};
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
    /// Name of this replica in Events (the pod name in-cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
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
    let guards = Arc::new(RwLock::new(
        controller::discover_guards(&client, &args.operator_addrs).await?,
    ));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", args.metrics_addr)))?;
    info!(addr = %args.metrics_addr, "serving /metrics");
    tokio::spawn(serve_operations(listener, metrics.clone()));
    tokio::spawn(controller::refresh_guards(
        client.clone(),
        guards.clone(),
        args.operator_addrs.clone(),
        Duration::from_secs(args.guard_refresh_secs.max(1)),
    ));
    let reporter = Reporter {
        controller: "portsentry-operator".into(),
        instance: args.instance,
    };
    controller::run(client, metrics, guards, reporter).await;
    Ok(())
}

async fn serve_operations(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    if let Err(error) = server::serve(listener, metrics).await {
        error!(%error, "operations endpoint stopped");
    }
}
