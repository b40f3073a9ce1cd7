//! `portsentry-sensor`: runs PortSentry's job on this host from a classic `portsentry.conf`
//! (`-tcp -udp -stcp -sudp -atcp -audp`, several at once), or explains a config with `check`.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand, ValueEnum};
use portsentry_sensor::{
    alert::Alerts,
    ban_watch,
    check::{Level, check},
    config::{Config, Mode},
    packet::RawMode,
    pod_nft, report,
    run::{Options, run},
};

/// Decoy-port scan sensor: PortSentry's job on this host, with IPv6, ban expiry and
/// native nftables bans.
#[derive(Debug, Parser)]
#[command(name = "portsentry-sensor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The classic PortSentry config file.
    #[arg(long, default_value = "/etc/portsentry/portsentry.conf")]
    config: PathBuf,
    /// Watch TCP_PORTS (PortSentry's `-tcp`). Without any mode flag, -tcp and -udp both run.
    #[arg(long)]
    tcp: bool,
    /// Watch UDP_PORTS (PortSentry's `-udp`).
    #[arg(long)]
    udp: bool,
    /// Stealth TCP (`-stcp`): capture SYN/FIN/NULL/XMAS/ACK/Maimon probes to TCP_PORTS
    /// without binding them. Needs root or CAP_NET_RAW.
    #[arg(long)]
    stcp: bool,
    /// Stealth UDP (`-sudp`): capture datagrams to UDP_PORTS without binding them.
    #[arg(long)]
    sudp: bool,
    /// Advanced TCP (`-atcp`): every unused TCP port below ADVANCED_PORTS_TCP.
    #[arg(long)]
    atcp: bool,
    /// Advanced UDP (`-audp`): every unused UDP port below ADVANCED_PORTS_UDP.
    #[arg(long)]
    audp: bool,
    /// Send PortSentry's log lines to syslog (/dev/log, ident portsentry, facility daemon).
    #[arg(long)]
    syslog: bool,
    /// `classic`: PortSentry's lines as they are; `json`: one JSON event a line with fields.
    #[arg(long, value_enum, default_value_t = LogFormat::Classic)]
    log_format: LogFormat,
    /// Serve /metrics, /healthz and /readyz on this address, e.g. 127.0.0.1:9720.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Post alarms to the operator's intake, e.g. https://operator:8443/v1/reports.
    #[arg(long, requires_all = ["report_token_file", "report_ca_file", "report_policy"])]
    report_url: Option<hyper::Uri>,
    /// The projected service account token (audience portsentry.io), re-read per post.
    #[arg(long, default_value = "/var/run/secrets/portsentry.io/token")]
    report_token_file: PathBuf,
    /// PEM CA bundle of the operator's serving certificate.
    #[arg(long)]
    report_ca_file: Option<PathBuf>,
    /// The policy this sensor runs for: PortSentryPolicy/NAME or ClusterPortSentryPolicy/NAME.
    #[arg(long, value_parser = portsentry_sensor::report::parse_policy)]
    report_policy: Option<portsentry_crds::PolicyRef>,
    /// Node sensors: keep this host's nftables sets equal to the PortSentryBans of
    /// --watch-bans-policy in this namespace (the operator's), read with KUBECONFIG or the
    /// pod's service account. Needs CAP_NET_ADMIN.
    #[arg(long, value_name = "NAMESPACE", requires = "watch_bans_policy")]
    watch_bans: Option<String>,
    /// The policy whose bans --watch-bans enforces: ClusterPortSentryPolicy/NAME.
    #[arg(long, value_parser = portsentry_sensor::report::parse_policy)]
    watch_bans_policy: Option<portsentry_crds::PolicyRef>,
    /// The nftables table (family inet) --watch-bans keeps; no other writer may share it.
    #[arg(long, default_value = "portsentry-cluster")]
    watch_bans_table: String,
    /// Reconcile the table to the bans at least this often, so a flushed rule comes back.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    watch_bans_resync_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Classic,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Explain in plain words what a config will really do; exit 1 on errors.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Node agent: keep a table of the bans inside the network namespace of every pod of this
    /// node that a PodNftables policy selects (needs hostPID, CAP_SYS_ADMIN, CAP_SYS_PTRACE
    /// and CAP_NET_ADMIN); removes them all on SIGTERM.
    PodNftables(PodNftablesArgs),
}

#[derive(Debug, clap::Args)]
struct PodNftablesArgs {
    /// The operator's namespace: cluster policies' bans live there; its pods are left alone.
    #[arg(long)]
    operator_namespace: String,
    /// This node's name (the downward API's spec.nodeName): only its pods are entered.
    #[arg(long)]
    node_name: String,
    /// The nftables table (family inet) kept in each pod's network namespace.
    #[arg(long, default_value = "portsentry")]
    table: String,
    /// Reconcile every pod's table at least this often: a flushed table or a restarted pod
    /// has its sets back within this.
    #[arg(long, default_value = "1000", value_name = "MILLISECONDS")]
    resync_millis: u64,
    /// Most ban elements in one pod's table; the rest are refused and counted
    /// (portsentry_sensor_pod_nft_bans_refused{reason="over_cap"}).
    #[arg(long, default_value = "4096")]
    max_bans_per_pod: usize,
    /// The host's /proc (the agent runs with hostPID).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// Prefixes never banned in any pod, one a line (PortSentry's ignore-file format).
    #[arg(long)]
    ignore_file: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

/// Accepts PortSentry's single-dash mode flags (`-tcp`, `-stcp`, ...) as clap's `--tcp`, ...
fn portsentry_args() -> Vec<String> {
    std::env::args()
        .map(|arg| match arg.as_str() {
            "-tcp" | "-udp" | "-stcp" | "-sudp" | "-atcp" | "-audp" => format!("-{arg}"),
            _ => arg,
        })
        .collect()
}

/// Logs to stderr at `RUST_LOG`'s levels (`target=level` directives; no span or field
/// filters, which would pull a regex engine into every start-up: the sensor stays small).
fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{filter::Targets, prelude::*};
    let default = match format {
        LogFormat::Classic => "warn",
        LogFormat::Json => "warn,portsentry_sensor::alert=info",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => directives.parse::<Targets>().unwrap_or_else(|error| {
            eprintln!("portsentry-sensor: RUST_LOG={directives:?} ignored: {error}");
            default.parse().unwrap_or_default()
        }),
        Err(_) => default.parse().unwrap_or_default(),
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Classic => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(portsentry_args());
    init_tracing(cli.log_format);
    match cli.command {
        Some(Command::Check { config }) => return run_check(&config),
        Some(Command::PodNftables(args)) => return run_pod_nftables(args),
        None => {}
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!(
                "portsentry-sensor: {error}\nportsentry-sensor: not starting; `portsentry-sensor check --config {}` explains the config",
                cli.config.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let raw: Vec<RawMode> = [
        (cli.stcp, RawMode::Stcp),
        (cli.sudp, RawMode::Sudp),
        (cli.atcp, RawMode::Atcp),
        (cli.audp, RawMode::Audp),
    ]
    .into_iter()
    .filter_map(|(on, mode)| on.then_some(mode))
    .collect();
    let mut modes = Vec::new();
    let none = !cli.tcp && !cli.udp && raw.is_empty();
    if cli.tcp || none {
        modes.push(Mode::Tcp);
    }
    if cli.udp || none {
        modes.push(Mode::Udp);
    }
    let alerts = if cli.syslog {
        match Alerts::syslog(std::path::Path::new("/dev/log")) {
            Ok(alerts) => alerts,
            Err(error) => {
                eprintln!("portsentry-sensor: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else if cli.log_format == LogFormat::Json {
        Alerts::json()
    } else {
        Alerts::stderr()
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let ban_watch = match (cli.watch_bans, cli.watch_bans_policy) {
        (Some(namespace), Some(policy)) => Some(ban_watch::Settings {
            namespace,
            policy,
            table: cli.watch_bans_table,
            resync: std::time::Duration::from_secs(cli.watch_bans_resync_secs.max(1)),
            ignore_file: config.ignore_file.clone(),
        }),
        _ => None,
    };
    let cluster_table = ban_watch.as_ref().map(|settings| settings.table.clone());
    let options = Options {
        config,
        modes,
        raw,
        alerts: Arc::new(alerts),
        metrics_addr: cli.metrics_addr,
        report: match (cli.report_url, cli.report_ca_file, cli.report_policy) {
            (Some(url), Some(ca_file), Some(policy)) => Some(report::Settings {
                url,
                token_file: cli.report_token_file,
                ca_file,
                policy,
            }),
            _ => None,
        },
        ban_watch,
    };
    let outcome = runtime.block_on(run(options));
    // Nothing may write the table after it is removed: stop every task first.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    if let Some(table) = cluster_table {
        remove_cluster_table(&table);
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portsentry-sensor: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A node sensor that stops (uninstall, its policy deleted, a rolling update) removes the
/// cluster bans' table: nothing else would. Its successor rebuilds it from the
/// PortSentryBans within a second of starting.
fn remove_cluster_table(table: &str) {
    match portsentry_sensor::nft::remove_table(table) {
        Ok(()) => tracing::info!(
            table,
            "removed nftables table inet {table}: this node no longer drops cluster bans"
        ),
        Err(error) => eprintln!(
            "portsentry-sensor: cannot remove nftables table inet {table}: {error} (remove it with: nft delete table inet {table})"
        ),
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("portsentry-sensor: cannot start the async runtime: {error}");
            None
        }
    }
}

fn run_pod_nftables(args: PodNftablesArgs) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let settings = pod_nft::agent::Settings {
        operator_namespace: args.operator_namespace,
        node_name: args.node_name,
        table: args.table,
        resync: std::time::Duration::from_millis(args.resync_millis.max(50)),
        max_per_pod: args.max_bans_per_pod,
        proc_root: args.proc_root,
        ignore_file: args.ignore_file,
        metrics_addr: args.metrics_addr,
    };
    match runtime.block_on(pod_nft::agent::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("portsentry-sensor: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            println!("ERROR: {error}");
            println!("The sensor would not start with this config.");
            return ExitCode::FAILURE;
        }
    };
    println!("{}: what this config will do", path.display());
    let findings = check(&config);
    for finding in &findings {
        println!("{finding}");
    }
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    let warnings = findings
        .iter()
        .filter(|f| f.level == Level::Warning)
        .count();
    println!("{errors} error(s), {warnings} warning(s)");
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
