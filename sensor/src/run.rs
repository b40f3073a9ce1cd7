//! Host mode wired together: binds the decoys, captures packets for the raw modes, feeds
//! hits to the engine, bans at once, runs the rest of the responses in order on one task,
//! and keeps state fresh.
//!
//! ```text
//! listeners ----------+                   native ban, on the hit's own thread
//!                     +--hit--> Core (engine; alarm gate; ban) --alarm--> respond task --> Responder
//! capture thread -----+                   ^                                               |
//!      maintenance (1 s): expire, reconcile enforcer, re-read ignore file, metrics, flood summary
//! ```
//!
//! The decision and the native ban are the first things done with a hit, on the thread
//! that received it (the listener's runtime worker, the capture thread): no channel, task
//! or thread hand-off in front of the ban, each of which waits for the scheduler.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use portsentry_crds::Protocol;
use tokio::sync::mpsc;

use crate::{
    alert::{Alerts, Fields, HostName, lines},
    config::{BanDuration, BlockLevel, Config, Mode, load_ignore},
    engine::{Alarm, AlarmGate, BanPolicy, Engine, NoBan, Protection, Settings, Verdict},
    error::{Error, Result},
    listen::{self, Decoy, HitSink},
    metrics::{self, Metrics},
    packet::{Hit, RawMode, classify},
    reload,
    respond::{Detection, EarlyBan, Enforcer, Outcome, Responder},
    stealth::{self, Capture, DEFAULT_ADVANCED_PORTS, Watch},
};

/// Alarms waiting for their responses; beyond this, new alarms are logged but not acted on.
const ALARM_QUEUE: usize = 4096;

/// What the respond task logs and answers, one at a time in arrival order (so a hit from a
/// host whose ban is under way is logged after that ban's lines, as 1.2 logs it).
#[derive(Debug)]
enum Job {
    /// An alarm, its native ban done already on the hit's thread.
    Alarm(Box<Queued>),
    /// A hit from a source banned already: its alarm line, then 1.2's "already blocked".
    AlreadyBlocked(Hit),
}

/// How the sensor is to run.
#[derive(Debug)]
pub struct Options {
    pub config: Config,
    /// Connect modes (`-tcp`, `-udp`).
    pub modes: Vec<Mode>,
    /// Raw-socket modes (`-stcp`, `-sudp`, `-atcp`, `-audp`).
    pub raw: Vec<RawMode>,
    pub alerts: Arc<Alerts>,
    pub metrics_addr: Option<SocketAddr>,
    /// `--report-url`: post alarms to the operator.
    pub report: Option<crate::report::Settings>,
    /// `--watch-bans`: keep nftables equal to cluster bans (node sensors).
    pub ban_watch: Option<crate::ban_watch::Settings>,
}

/// The engine's settings for a config.
pub fn settings(config: &Config) -> Settings {
    Settings {
        scan_trigger: config.scan_trigger,
        window: config.scan_window,
        distinct_ports: config.scan_distinct_ports,
        max_sources: config.state_max_sources,
        ban_unverified: config.ban_unverified,
        ban_tcp: config.block_tcp != BlockLevel::LogOnly,
        ban_udp: config.block_udp != BlockLevel::LogOnly,
        ban: BanPolicy {
            first: match config.ban_duration {
                BanDuration::Forever => None,
                BanDuration::For(duration) => Some(duration),
            },
            max: config.ban_max_duration,
            escalation_window: config.ban_escalation_window,
        },
    }
}

/// An alarm for the respond task, with the native ban already done on the hit's thread.
#[derive(Debug)]
struct Queued {
    alarm: Alarm,
    early: EarlyBan,
}

/// Shared state the listeners report to.
#[derive(Debug)]
struct Core {
    engine: Mutex<Engine>,
    origin: Instant,
    metrics: Arc<Metrics>,
    responder: Arc<Responder>,
    alarms: mpsc::Sender<Job>,
    alerts: Arc<Alerts>,
    gate: Mutex<AlarmGate>,
    suppressed: AtomicU64,
    dropped: AtomicU64,
    report: Option<crate::report::Reporter>,
}

impl Core {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a config reload retunes: the engine's detection settings and the responses.
struct Live {
    core: Arc<Core>,
    responder: Arc<Responder>,
}

impl reload::Retune for Live {
    fn retune(&self, config: &Config) {
        self.core.engine().retune(settings(config));
        self.responder.retune(config);
    }
}

impl HitSink for Core {
    fn hit(&self, hit: Hit) -> bool {
        let verdict = self.engine().observe(hit, self.now());
        if let Verdict::Alarm(alarm) = verdict {
            return self.alarm(alarm);
        }
        self.metrics.hit(hit.protocol, hit.port);
        self.metrics.probe(hit.kind);
        match verdict {
            Verdict::Protected(protection) => {
                self.metrics.protected(match protection {
                    Protection::IgnoreList => "ignore_list",
                    Protection::Loopback => "loopback",
                    Protection::OwnAddress => "own_address",
                });
                tracing::debug!(source = %hit.source, port = hit.port, ?protection, "hit from a protected source");
                false
            }
            Verdict::Counted { count, needed } => {
                tracing::debug!(source = %hit.source, port = hit.port, count, needed, "hit below the scan trigger");
                false
            }
            Verdict::AlreadyBanned => {
                // Logged by the respond task; 1.2 shows such a host the banner too. These
                // lines never take more than half the queue, so they cannot crowd out alarms.
                if self.alarms.capacity() <= ALARM_QUEUE / 2
                    || self.alarms.try_send(Job::AlreadyBlocked(hit)).is_err()
                {
                    self.metrics.alarm_dropped();
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Verdict::Alarm(alarm) => self.alarm(alarm),
        }
    }
}

impl Core {
    /// An alarm: admitted, banned at once on this thread (the engine's lock released), then
    /// queued for logging and the other actions; the bookkeeping comes after the ban.
    fn alarm(&self, alarm: Alarm) -> bool {
        let hit = alarm.hit;
        let admitted = self
            .gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&alarm, self.now());
        let permit = if admitted {
            self.alarms.try_reserve().ok()
        } else {
            None
        };
        let early = match (&permit, alarm.outcome) {
            (Some(_), Ok(plan)) => {
                self.responder
                    .ban_now(hit.source, detection(&hit), hit.port, plan.duration)
            }
            _ => EarlyBan::default(),
        };
        self.metrics.hit(hit.protocol, hit.port);
        self.metrics.probe(hit.kind);
        self.metrics.alarm(hit.protocol);
        if let Some(report) = &self.report {
            report.offer(&alarm);
        }
        if !admitted {
            self.engine().abandon(hit.source);
            self.metrics.alarm_suppressed();
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match permit {
            Some(permit) => permit.send(Job::Alarm(Box::new(Queued { alarm, early }))),
            None => {
                self.engine().abandon(hit.source);
                self.metrics.alarm_dropped();
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = %hit.source, "alarm queue full: alarm dropped, source not banned");
            }
        }
        true
    }
}

/// Name for log lines: reverse DNS through NSS (`getent hosts`) when asked, else the address.
async fn host_name(address: IpAddr, resolve: bool) -> HostName {
    if !resolve {
        return HostName::unresolved(address);
    }
    let lookup = tokio::process::Command::new("getent")
        .arg("hosts")
        .arg(address.to_string())
        .kill_on_drop(true)
        .output();
    let name = match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(output)) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .nth(1)
            .map(str::to_owned),
        _ => None,
    };
    HostName {
        name: name.unwrap_or_else(|| address.to_string()),
        address,
    }
}

fn mode_of(protocol: Protocol) -> Mode {
    match protocol {
        Protocol::Tcp => Mode::Tcp,
        Protocol::Udp => Mode::Udp,
    }
}

/// Logs a hit's alarm line in the words of the mode that saw it (1.2's `Connect from host`
/// in the connect modes, the probe's label in the raw modes), and 1.2's IP-options line.
fn log_hit(core: &Core, host: &HostName, hit: &Hit) {
    let line = match (hit.protocol, hit.captured) {
        (Protocol::Tcp, Some(captured)) => lines::probe_alarm(
            &classify::captured_label(hit.kind, &captured),
            host,
            hit.port,
        ),
        (Protocol::Udp, Some(_)) => lines::udp_probe_alarm(host, hit.port),
        (_, None) => lines::alarm(host, hit.protocol, hit.port),
    };
    core.alerts.emit(
        &line,
        Fields::new("alarm")
            .source(hit.source)
            .port(hit.protocol, hit.port),
    );
    if hit.captured.is_some_and(|c| c.ip_options) {
        core.alerts.emit(
            &lines::ip_options(host, hit.protocol, hit.port),
            Fields::new("ip_options")
                .source(hit.source)
                .port(hit.protocol, hit.port),
        );
    }
}

/// A further hit from a banned host, as 1.2 logs it: the alarm line, then
/// `Host: a is already blocked. Ignoring` (raw modes: `Host: h/a is already blocked Ignoring`).
async fn log_already_blocked(core: &Core, hit: Hit, resolve: bool) {
    let host = host_name(hit.source, resolve).await;
    log_hit(core, &host, &hit);
    let fields = Fields::new("already_blocked")
        .source(hit.source)
        .port(hit.protocol, hit.port);
    if !core.engine().is_banned(hit.source) {
        // The ban under way when this hit came failed (or expired) since.
        let why = "its ban is no longer in force; the next hit is judged afresh";
        core.alerts.emit(&lines::not_banned(&host, why), fields);
        return;
    }
    let line = match hit.captured {
        Some(_) => lines::probe_already_blocked(&host),
        None => lines::already_blocked(hit.source),
    };
    core.alerts.emit(&line, fields);
}

/// `$MODE$` and the blocked file of a hit: the raw mode that captured it, else the connect mode.
fn detection(hit: &Hit) -> Detection {
    match hit.captured {
        Some(captured) => captured.mode.into(),
        None => mode_of(hit.protocol).into(),
    }
}

/// Logs each alarm and carries out its response, one at a time, in arrival order.
async fn respond_task(
    mut jobs: mpsc::Receiver<Job>,
    core: Arc<Core>,
    responder: Arc<Responder>,
    resolve: bool,
) {
    // The native ban went in on the hit's thread (Core::alarm): name resolution, log lines
    // and history files come after it.
    while let Some(job) = jobs.recv().await {
        let Queued { alarm, early } = match job {
            Job::Alarm(queued) => *queued,
            Job::AlreadyBlocked(hit) => {
                log_already_blocked(&core, hit, resolve).await;
                continue;
            }
        };
        let hit = alarm.hit;
        let mode = detection(&hit);
        let host = host_name(hit.source, resolve).await;
        log_hit(&core, &host, &hit);
        let plan = match alarm.outcome {
            Ok(plan) => plan,
            Err(NoBan::LogOnly) => continue,
            Err(reason) => {
                let why = match reason {
                    NoBan::Unverified => {
                        "no completed handshake proves the source (set BAN_UNVERIFIED=\"1\" to block on such evidence)"
                    }
                    _ => "as many bans as STATE_MAX_SOURCES are active",
                };
                core.alerts.emit(
                    &lines::not_banned(&host, why),
                    Fields::new("not_banned").source(hit.source),
                );
                continue;
            }
        };
        let outcome = responder
            .block_after(&host, mode, hit.port, plan.duration, early)
            .await;
        match outcome {
            Outcome::Blocked => {
                core.engine().confirm(hit.source, core.now());
                core.metrics.ban_added();
            }
            Outcome::NothingToRun => {
                core.engine().abandon(hit.source);
                core.alerts.emit(
                    &lines::not_banned(&host, "no action is configured for this BLOCK level (see `portsentry-sensor check`)"),
                    Fields::new("not_banned").source(hit.source),
                );
            }
            Outcome::Failed => core.engine().abandon(hit.source),
        }
    }
}

/// File identity used to notice that the ignore file changed.
fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Once a second: lift expired bans, reconcile the enforcer, refresh metrics; re-read the
/// ignore file when it changes and the host's addresses every 30 s.
async fn maintenance_task(
    core: Arc<Core>,
    responder: Arc<Responder>,
    config: Config,
    tripwire: Option<Arc<crate::nft::NftBans>>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut ignore_stamp = config.ignore_file.as_deref().and_then(stamp);
    let mut last_reconcile_error: Option<String> = None;
    let mut tick: u64 = 0;
    loop {
        ticker.tick().await;
        tick += 1;
        summarize_flood(&core);
        let now = core.now();
        let (expired, active, tracked, evictions) = {
            let mut engine = core.engine();
            let expired = engine.expire(now);
            (
                expired,
                engine.active_bans(now),
                engine.sources_tracked(),
                engine.evictions(),
            )
        };
        for address in expired {
            responder.lift(address).await;
            core.metrics.ban_expired();
        }
        core.metrics.sample(active.len(), tracked, evictions);
        // Bans the hit path started after `active` was read are pending in the engine.
        let engine = core.clone();
        let started = move |address| engine.engine().is_banned(address);
        match responder.reconcile(active, started).await {
            Ok(()) => last_reconcile_error = None,
            Err(error) => {
                let text = error.to_string();
                if last_reconcile_error.as_deref() != Some(&text) {
                    core.metrics.action_failure("nftables");
                    core.alerts.emit(
                        &format!("adminalert: ERROR: cannot reconcile bans: {text}"),
                        Fields::new("reconcile_failed"),
                    );
                }
                last_reconcile_error = Some(text);
            }
        }
        if let Some(path) = &config.ignore_file {
            let current = stamp(path);
            if current != ignore_stamp {
                ignore_stamp = current;
                match load_ignore(path) {
                    Ok(list) => {
                        let list = list.unwrap_or_default();
                        core.alerts.emit(
                            &format!(
                                "adminalert: Ignore file {} re-read: {} entries",
                                path.display(),
                                list.len()
                            ),
                            Fields::new("ignore_reloaded"),
                        );
                        let released = {
                            let mut engine = core.engine();
                            engine.set_ignore(list);
                            engine.release_protected()
                        };
                        update_tripwire_exemptions(&core, tripwire.as_ref()).await;
                        for address in released {
                            responder.lift(address).await;
                        }
                    }
                    Err(error) => core.alerts.emit(
                        &format!("adminalert: ERROR: {error}; keeping the previous ignore list"),
                        Fields::new("ignore_invalid"),
                    ),
                }
            }
        }
        if tick % 30 == 0 {
            core.engine().set_own_addresses(listen::own_addresses());
            update_tripwire_exemptions(&core, tripwire.as_ref()).await;
        }
    }
}

/// Says once a second how many alarms were suppressed or dropped, instead of one line each.
fn summarize_flood(core: &Core) {
    let suppressed = core.suppressed.swap(0, Ordering::Relaxed);
    let dropped = core.dropped.swap(0, Ordering::Relaxed);
    if suppressed + dropped > 0 {
        core.alerts.emit(
            &format!(
                "adminalert: WARNING: {suppressed} alarm(s) of first-seen sources without a completed handshake were not logged in the last second (limit {} a second: source addresses are probably spoofed) and {dropped} alarm(s) were dropped with the response queue full; repeat and verified sources are always logged",
                crate::engine::FIRST_SIGHT_ALARMS_PER_SECOND
            ),
            Fields::new("alarms_suppressed"),
        );
    }
}

/// Opens the packet capture and starts the raw modes on a thread of their own; the
/// receiver hears why the capture stopped if it ever does.
fn start_capture(
    config: &Config,
    raw: &[RawMode],
    core: &Arc<Core>,
) -> Result<tokio::sync::oneshot::Receiver<String>> {
    let capture =
        Capture::open(Duration::from_secs(1)).map_err(|error| Error::Capture(error.to_string()))?;
    let watch = Watch::new(config, raw);
    for mode in raw {
        let protocol = mode.protocol();
        if mode.advanced() {
            let (below, exclude) = match protocol {
                Protocol::Tcp => (config.advanced_ports_tcp, &config.advanced_exclude_tcp),
                Protocol::Udp => (config.advanced_ports_udp, &config.advanced_exclude_udp),
            };
            core.alerts.emit(
                &lines::advanced_monitoring(protocol, below.unwrap_or(DEFAULT_ADVANCED_PORTS)),
                Fields::new("listening"),
            );
            for port in portsentry_crds::expand(exclude) {
                core.alerts.emit(
                    &lines::advanced_exclude(protocol, port),
                    Fields::new("listening").port(protocol, port),
                );
            }
        } else {
            for port in portsentry_crds::expand(config.ports(mode_of(protocol))) {
                core.alerts.emit(
                    &lines::stealth_listening(protocol, port),
                    Fields::new("listening").port(protocol, port),
                );
            }
        }
    }
    if let Ok(size) = capture.receive_buffer() {
        tracing::info!(bytes = size, "packet capture receive buffer");
    }
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    let sink: Arc<dyn HitSink> = core.clone();
    let metrics = core.metrics.clone();
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || {
            let error = stealth::capture_loop(capture, watch, sink, metrics);
            let _ = stopped_tx.send(error.to_string());
        })
        .map_err(|error| Error::Capture(format!("cannot start the capture thread: {error}")))?;
    Ok(stopped_rx)
}

/// Gives the kernel tripwire the prefixes it must never ban (ignore list, own addresses),
/// so an ignore-listed host is not banned from the packet path before user space can refuse.
async fn update_tripwire_exemptions(core: &Core, tripwire: Option<&Arc<crate::nft::NftBans>>) {
    let Some(nft) = tripwire.cloned() else {
        return;
    };
    let exempt = core.engine().exempt_prefixes();
    let result = tokio::task::spawn_blocking(move || nft.set_tripwire_exempt(&exempt)).await;
    let error = match result {
        Ok(Ok(())) => return,
        Ok(Err(error)) => error.to_string(),
        Err(join) => join.to_string(),
    };
    core.metrics.action_failure("nftables");
    core.alerts.emit(
        &format!("adminalert: ERROR: cannot update the tripwire's exemptions: {error}"),
        Fields::new("tripwire_exempt_failed"),
    );
}

/// What a reload may not change without a restart. NFT_TRIPWIRE pins everything even when
/// the start left the tripwire unarmed (say, BLOCK_TCP="0"): a reload enabling blocking
/// would otherwise run without the tripwire the config asks for, and say nothing.
fn pinned_at_start(config: &Config, raw: &[RawMode], tripwire_armed: bool) -> reload::Pinned {
    if tripwire_armed || config.nft_tripwire {
        reload::Pinned::Everything
    } else if !raw.is_empty() {
        reload::Pinned::Ports
    } else {
        reload::Pinned::Nothing
    }
}

/// Opens the native nftables enforcer when the config asks for it.
fn open_enforcer(config: &Config) -> Result<Option<Arc<crate::nft::NftBans>>> {
    if !config.nft_ban {
        return Ok(None);
    }
    crate::nft::NftBans::open(&config.nft_table)
        .map(|bans| Some(Arc::new(bans)))
        .map_err(|error| Error::Enforcer(format!("{error} (NFT_BAN=\"1\" needs root or CAP_NET_ADMIN; set NFT_BAN=\"0\" to run without it)")))
}

/// Runs the sensor until SIGINT or SIGTERM.
pub async fn run(options: Options) -> Result<()> {
    let Options {
        config,
        modes,
        raw,
        alerts,
        metrics_addr,
        report,
        ban_watch,
    } = options;
    let ignore = match &config.ignore_file {
        Some(path) => match load_ignore(path)? {
            Some(list) => list,
            None => {
                alerts.emit(
                    &format!("adminalert: WARNING: ignore file {} does not exist: nothing but loopback and this host's addresses is exempt; it is read when it appears", path.display()),
                    Fields::new("ignore_missing"),
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let decoys: Vec<(Protocol, u16)> = modes
        .iter()
        .flat_map(|mode| {
            portsentry_crds::expand(config.ports(*mode))
                .into_iter()
                .map(move |port| (mode.protocol(), port))
        })
        .collect();
    let ports_of = |protocol: Protocol| -> Vec<u16> {
        let mut ports: Vec<u16> = decoys
            .iter()
            .filter(|(p, _)| *p == protocol)
            .map(|(_, port)| *port)
            .collect();
        if raw
            .iter()
            .any(|m| !m.advanced() && m.protocol() == protocol)
        {
            ports.extend(portsentry_crds::expand(config.ports(mode_of(protocol))));
        }
        ports.sort_unstable();
        ports.dedup();
        ports
    };
    let metrics = Arc::new(if config.metrics_per_port {
        Metrics::per_port(&ports_of(Protocol::Tcp), &ports_of(Protocol::Udp))?
    } else {
        Metrics::new()?
    });
    if let Some(addr) = metrics_addr {
        metrics::serve(addr, metrics.clone()).await?;
    }
    let report = report
        .map(|settings| crate::report::start(settings, &metrics))
        .transpose()?;
    if let Some(settings) = ban_watch {
        crate::ban_watch::start(settings, &metrics).await?;
    }
    let nft = open_enforcer(&config)?;
    let enforcer: Option<Arc<dyn Enforcer>> = nft.clone().map(|n| n as Arc<dyn Enforcer>);
    let responder = Arc::new(
        Responder::new(&config, enforcer, alerts.clone(), metrics.clone())?
            .with_raw_modes(&config, &raw)?,
    );

    let mut engine = Engine::new(settings(&config));
    engine.set_ignore(ignore);
    engine.set_own_addresses(listen::own_addresses());
    let (alarm_tx, alarm_rx) = mpsc::channel(ALARM_QUEUE);
    let core = Arc::new(Core {
        engine: Mutex::new(engine),
        origin: Instant::now(),
        metrics: metrics.clone(),
        responder: responder.clone(),
        alarms: alarm_tx,
        alerts: alerts.clone(),
        gate: Mutex::new(AlarmGate::default()),
        suppressed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        report,
    });

    let (bound, skipped) = listen::bind_all(&decoys);
    for skip in &skipped {
        alerts.emit(
            &lines::cannot_bind(
                skip.protocol,
                skip.port,
                skip.family.as_str(),
                &skip.error.to_string(),
            ),
            Fields::new("cannot_bind").port(skip.protocol, skip.port),
        );
    }
    if bound.is_empty() && raw.is_empty() {
        return Err(Error::NothingBound(format!(
            "{} decoy(s) configured for modes {:?}",
            decoys.len(),
            modes
        )));
    }
    let banner: Option<Arc<str>> = config.port_banner.as_deref().map(Arc::from);
    let mut tcp_bound = Vec::new();
    let mut udp_bound = Vec::new();
    let mut listeners = reload::Listeners::new(core.clone(), banner);
    for decoy in bound {
        let (protocol, port, seen) = match &decoy {
            Decoy::Tcp(port, ..) => (Protocol::Tcp, *port, &mut tcp_bound),
            Decoy::Udp(port, ..) => (Protocol::Udp, *port, &mut udp_bound),
        };
        if !seen.contains(&port) {
            alerts.emit(
                &lines::listening(protocol, port),
                Fields::new("listening").port(protocol, port),
            );
            seen.push(port);
        }
        listeners.spawn(decoy);
    }
    let mut tripwire = None;
    if let Some(nft) = &nft
        && config.nft_tripwire
        && config.block_tcp == BlockLevel::All
        && modes.contains(&Mode::Tcp)
    {
        tcp_bound.sort_unstable();
        let first = settings(&config).ban.first;
        // Exemptions first, so the tripwire never has a moment without them.
        nft.set_tripwire_exempt(&core.engine().exempt_prefixes())
            .map_err(|error| Error::Enforcer(error.to_string()))?;
        // Only ports this sensor really holds: a skipped port may be a real service.
        nft.install_tripwire(&tcp_bound, first)
            .map_err(|error| Error::Enforcer(error.to_string()))?;
        tripwire = Some(nft.clone());
    }
    let capture_stopped = if raw.is_empty() {
        None
    } else {
        Some(start_capture(&config, &raw, &core)?)
    };
    // The raw TCP modes' kernel tripwire: bans on the first probe to a free decoy port
    // (armed once the capture runs, so user space sees and records every probe it bans).
    match (&nft, stealth::probe_tripwire_off(&config, &raw)) {
        (Some(nft), None) => {
            let exempt = core.engine().exempt_prefixes();
            let (watch, first) = (Watch::new(&config, &raw), settings(&config).ban.first);
            let (alerts, metrics) = (alerts.clone(), metrics.clone());
            stealth::arm_probe_tripwire(nft.clone(), watch, first, &exempt, alerts, metrics)
                .map_err(|error| Error::Enforcer(error.to_string()))?;
            tripwire = Some(nft.clone());
        }
        (Some(_), Some(why)) if config.nft_tripwire && !raw.is_empty() => alerts.emit(
            &format!("adminalert: Kernel tripwire not armed for the raw modes: {why}"),
            Fields::new("probe_tripwire_off"),
        ),
        _ => {}
    }
    // The config file is followed: a changed ConfigMap rebinds the decoys and retunes
    // detection and responses without a restart.
    let pinned = pinned_at_start(&config, &raw, tripwire.is_some());
    reload::start(
        reload::Reload {
            path: config.path.clone(),
            config: config.clone(),
            modes: modes.clone(),
            pinned,
            listeners,
            retune: Arc::new(Live {
                core: core.clone(),
                responder: responder.clone(),
            }),
            alerts: alerts.clone(),
        },
        &metrics,
    )?;
    tokio::spawn(respond_task(
        alarm_rx,
        core.clone(),
        responder.clone(),
        config.resolve_host,
    ));
    tokio::spawn(maintenance_task(
        core.clone(),
        responder,
        config.clone(),
        tripwire,
    ));
    metrics.set_ready(true);
    alerts.emit(&lines::active(), Fields::new("active"));
    if let Some(stopped) = capture_stopped {
        tokio::select! {
            _ = shutdown_signal() => {}
            reason = stopped => {
                let reason = reason.unwrap_or_else(|_| "the capture thread ended".into());
                return Err(Error::Capture(format!("packet capture stopped: {reason}")));
            }
        }
    } else {
        shutdown_signal().await;
    }
    alerts.emit(
        "adminalert: PortSentry is shutting down.",
        Fields::new("shutdown"),
    );
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use reload::Pinned;

    fn config(text: &str) -> Config {
        Config::parse(
            std::path::Path::new("/etc/portsentry/portsentry.conf"),
            text,
        )
        .unwrap()
    }

    #[test]
    fn connect_modes_alone_pin_nothing() {
        assert_eq!(pinned_at_start(&config(""), &[], false), Pinned::Nothing);
    }

    #[test]
    fn raw_modes_pin_the_port_lists() {
        assert_eq!(
            pinned_at_start(&config(""), &[RawMode::Stcp], false),
            Pinned::Ports
        );
    }

    #[test]
    fn an_armed_tripwire_pins_everything() {
        assert_eq!(pinned_at_start(&config(""), &[], true), Pinned::Everything);
    }

    #[test]
    fn a_tripwire_asked_for_but_left_unarmed_still_pins_everything() {
        let asks = config("NFT_BAN=\"1\"\nNFT_TRIPWIRE=\"1\"\nBLOCK_TCP=\"0\"\n");
        assert_eq!(pinned_at_start(&asks, &[], false), Pinned::Everything);
    }
}
