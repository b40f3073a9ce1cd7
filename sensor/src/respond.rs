//! Responses to an alarm with PortSentry's `BLOCK_*` semantics: hosts.deny, route, command
//! (in 1.2's order), an optional native enforcer, and the history and blocked files.
//!
//! - `BLOCK_x="0"`: the alarm is logged; nothing runs and **no history line is written**.
//!   1.2 writes "... Blocked" anyway, and fail2ban's portsentry filter reads that file, so
//!   reproducing it would ban hosts the config said not to block (2.x fixed it too).
//! - `BLOCK_x="1"`: `KILL_HOSTS_DENY`, `KILL_ROUTE`, the native ban, then `KILL_RUN_CMD`
//!   (`KILL_RUN_CMD_FIRST="1"` runs the command first).
//! - `BLOCK_x="2"`: `KILL_RUN_CMD` only.
//!
//! A host is recorded as blocked (history/blocked lines, "already blocked" state) only when
//! at least one action ran and every action succeeded; 1.2 records failures as success.
//! `$TARGET$`, `$PORT$`, `$MODE$` are replaced by a parsed address, a number and the name of
//! the mode that detected the hit, as 1.2 names it (`tcp`, `udp`, `stcp`, `atcp`, `sudp`,
//! `audp`): nothing an attacker sends reaches the shell. Each mode has its own blocked file,
//! `BLOCKED_FILE.<mode>` (1.2 runs a process per mode, each appending its mode name); the
//! history line says `TCP` or `UDP` in every mode, as 1.2's does.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use portsentry_crds::Protocol;

use crate::{
    alert::{Alerts, Fields, HostName, lines},
    config::{BlockLevel, Config, Mode},
    error::{Error, Result},
    metrics::Metrics,
    packet::RawMode,
    record_file,
};

/// The PortSentry mode that detected a hit: a connect mode (`-tcp`, `-udp`) or a raw-socket
/// mode (`-stcp`, `-atcp`, `-sudp`, `-audp`). A plain [`Mode`] converts into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Detection {
    Connect(Mode),
    Raw(RawMode),
}

impl Detection {
    /// What `$MODE$` becomes and the blocked file's suffix: 1.2's detection type.
    pub const fn as_str(self) -> &'static str {
        match self {
            Detection::Connect(mode) => mode.as_str(),
            Detection::Raw(mode) => mode.as_str(),
        }
    }

    /// The protocol's mode, whose `BLOCK_TCP` / `BLOCK_UDP` applies.
    pub const fn mode(self) -> Mode {
        match self {
            Detection::Connect(mode) => mode,
            Detection::Raw(RawMode::Stcp | RawMode::Atcp) => Mode::Tcp,
            Detection::Raw(RawMode::Sudp | RawMode::Audp) => Mode::Udp,
        }
    }
}

impl From<Mode> for Detection {
    fn from(mode: Mode) -> Self {
        Detection::Connect(mode)
    }
}

impl From<RawMode> for Detection {
    fn from(mode: RawMode) -> Self {
        Detection::Raw(mode)
    }
}

/// Longest a KILL_ROUTE / KILL_RUN_CMD may run before it is killed and counted as failed.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Something that drops a banned source's traffic and can be reconciled to a list of bans.
pub trait Enforcer: Send + Sync + std::fmt::Debug {
    /// Short name for logs, e.g. the nftables table.
    fn name(&self) -> String;
    fn ban(&self, address: IpAddr, timeout: Option<Duration>) -> Result<()>;
    fn unban(&self, address: IpAddr) -> Result<()>;
    /// Makes the enforced state equal to `active` (restores what someone else removed).
    fn reconcile(&self, active: &[(IpAddr, Option<Duration>)]) -> Result<()>;
}

impl Enforcer for crate::nft::NftBans {
    fn name(&self) -> String {
        self.table().to_owned()
    }

    fn ban(&self, address: IpAddr, timeout: Option<Duration>) -> Result<()> {
        crate::nft::NftBans::ban(self, address, timeout).map_err(|e| Error::Enforcer(e.to_string()))
    }

    fn unban(&self, address: IpAddr) -> Result<()> {
        crate::nft::NftBans::unban(self, address).map_err(|e| Error::Enforcer(e.to_string()))
    }

    fn reconcile(&self, active: &[(IpAddr, Option<Duration>)]) -> Result<()> {
        crate::nft::NftBans::reconcile(self, active).map_err(|e| Error::Enforcer(e.to_string()))
    }
}

/// Replaces `$TARGET$`, `$PORT$` and `$MODE$` with validated values.
pub fn substitute(template: &str, target: IpAddr, port: u16, mode: impl Into<Detection>) -> String {
    template
        .replace("$TARGET$", &target.to_string())
        .replace("$PORT$", &port.to_string())
        .replace("$MODE$", mode.into().as_str())
}

/// A history/blocked line: `%ld - %02d/%02d/%04d %02d:%02d:%02d Host: %s/%s Port: %d %s Blocked`,
/// with the local time of `at`.
pub fn record_line(at: &jiff::Zoned, host: &HostName, port: u16, protocol: Protocol) -> String {
    format!(
        "{} - {:02}/{:02}/{:04} {:02}:{:02}:{:02} Host: {host} Port: {port} {} Blocked",
        at.timestamp().as_second(),
        at.month(),
        at.day(),
        at.year(),
        at.hour(),
        at.minute(),
        at.second(),
        protocol.as_str()
    )
}

/// What became of an alarm's ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every action ran and succeeded: the host is blocked.
    Blocked,
    /// No action is configured for this block level.
    NothingToRun,
    /// An action failed: the host is not recorded as blocked.
    Failed,
}

/// The configured responses: what a ban runs, in which order, and where it is recorded.
/// A config reload swaps them ([`Responder::retune`]).
#[derive(Clone, Debug)]
struct Actions {
    block_tcp: BlockLevel,
    block_udp: BlockLevel,
    kill_route: Option<String>,
    kill_hosts_deny: Option<String>,
    hosts_deny_file: PathBuf,
    kill_run_cmd: Option<String>,
    run_cmd_first: bool,
    history_file: Option<PathBuf>,
}

impl Actions {
    fn of(config: &Config) -> Self {
        Self {
            block_tcp: config.block_tcp,
            block_udp: config.block_udp,
            kill_route: config.kill_route.clone(),
            kill_hosts_deny: config.kill_hosts_deny.clone(),
            hosts_deny_file: config.hosts_deny_file.clone(),
            kill_run_cmd: config.kill_run_cmd.clone(),
            run_cmd_first: config.kill_run_cmd_first,
            history_file: config.history_file.clone(),
        }
    }
}

/// Runs the configured actions and keeps the history and blocked files.
#[derive(Debug)]
pub struct Responder {
    actions: Mutex<Actions>,
    blocked_files: BTreeMap<Detection, PathBuf>,
    /// Lines of the hosts blocked now, per mode, to rewrite blocked files on expiry.
    blocked: Mutex<BTreeMap<IpAddr, (Detection, String)>>,
    enforcer: Option<Arc<dyn Enforcer>>,
    alerts: Arc<Alerts>,
    metrics: Arc<Metrics>,
}

enum Action {
    HostsDeny(String),
    Route(String),
    Native,
    Command(String),
}

/// Whether the native ban may go in before everything else: the plan has one and no
/// command precedes it (`KILL_RUN_CMD_FIRST` keeps the command first, as 1.2 does).
/// hosts.deny and KILL_ROUTE only add blocks, so banning before them changes nothing.
fn native_first(actions: &[Action]) -> bool {
    for action in actions {
        match action {
            Action::Native => return true,
            Action::Command(_) => return false,
            Action::HostsDeny(_) | Action::Route(_) => {}
        }
    }
    false
}

/// The result of a native ban done before the alarm was logged (see [`Responder::ban_early`]),
/// with the actions it was planned by, so that a reload in between cannot split a response.
#[derive(Debug, Default)]
pub struct EarlyBan {
    result: Option<Result<()>>,
    planned_by: Option<Actions>,
}

impl EarlyBan {
    /// Whether the ban was attempted early and went in.
    pub fn done(&self) -> bool {
        matches!(self.result, Some(Ok(())))
    }
}

impl Responder {
    /// Builds the responder; empties the blocked files of the connect modes (`.tcp`, `.udp`)
    /// as 1.2 does at start-up. [`Responder::with_raw_modes`] adds the raw modes' files.
    pub fn new(
        config: &Config,
        enforcer: Option<Arc<dyn Enforcer>>,
        alerts: Arc<Alerts>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let mut blocked_files = BTreeMap::new();
        for mode in [Mode::Tcp, Mode::Udp] {
            add_blocked_file(&mut blocked_files, config, mode.into())?;
        }
        Ok(Self {
            actions: Mutex::new(Actions::of(config)),
            blocked_files,
            blocked: Mutex::new(BTreeMap::new()),
            enforcer,
            alerts,
            metrics,
        })
    }

    /// Adds (and empties, as 1.2 does at start-up) the blocked files of the raw `modes`
    /// running in this process: `BLOCKED_FILE.stcp` and so on.
    pub fn with_raw_modes(mut self, config: &Config, modes: &[RawMode]) -> Result<Self> {
        for mode in modes {
            add_blocked_file(&mut self.blocked_files, config, (*mode).into())?;
        }
        Ok(self)
    }

    /// Answers the next alarms with `config`'s blocking and kill actions and records them in
    /// its history file (a reloaded config); a response under way finishes as it began.
    pub fn retune(&self, config: &Config) {
        *self.actions.lock().unwrap_or_else(|p| p.into_inner()) = Actions::of(config);
    }

    fn actions(&self) -> Actions {
        self.actions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn plan(
        &self,
        configured: &Actions,
        mode: Detection,
        target: IpAddr,
        port: u16,
    ) -> Vec<Action> {
        let level = match mode.mode() {
            Mode::Tcp => configured.block_tcp,
            Mode::Udp => configured.block_udp,
        };
        let command = configured
            .kill_run_cmd
            .as_deref()
            .map(|cmd| Action::Command(substitute(cmd, target, port, mode)));
        let mut actions = Vec::new();
        match level {
            BlockLevel::LogOnly => {}
            BlockLevel::RunCmdOnly => actions.extend(command),
            BlockLevel::All => {
                if let Some(text) = &configured.kill_hosts_deny {
                    actions.push(Action::HostsDeny(substitute(text, target, port, mode)));
                }
                if let Some(cmd) = &configured.kill_route {
                    actions.push(Action::Route(substitute(cmd, target, port, mode)));
                }
                if self.enforcer.is_some() {
                    actions.push(Action::Native);
                }
                match command {
                    Some(command) if configured.run_cmd_first => actions.insert(0, command),
                    Some(command) => actions.push(command),
                    None => {}
                }
            }
        }
        actions
    }

    /// Puts the native ban in the kernel at once, before the alarm is logged, the host name
    /// resolved or any file written, when the plan for `mode` has one and no
    /// `KILL_RUN_CMD_FIRST` command must run before it. [`Responder::block_after`] reports
    /// its result in the plan's order.
    pub async fn ban_early(
        &self,
        target: IpAddr,
        mode: impl Into<Detection>,
        port: u16,
        duration: Option<Duration>,
    ) -> EarlyBan {
        let configured = self.actions();
        if !native_first(&self.plan(&configured, mode.into(), target, port)) {
            return EarlyBan {
                result: None,
                planned_by: Some(configured),
            };
        }
        EarlyBan {
            result: Some(self.native_ban(target, duration).await),
            planned_by: Some(configured),
        }
    }

    /// Carries out a planned ban of `host` for a hit on `port`; records it when it worked.
    pub async fn block(
        &self,
        host: &HostName,
        mode: impl Into<Detection>,
        port: u16,
        duration: Option<Duration>,
    ) -> Outcome {
        self.block_after(host, mode, port, duration, EarlyBan::default())
            .await
    }

    /// [`Responder::block`], with the native ban already done by [`Responder::ban_early`].
    pub async fn block_after(
        &self,
        host: &HostName,
        mode: impl Into<Detection>,
        port: u16,
        duration: Option<Duration>,
        early: EarlyBan,
    ) -> Outcome {
        let mode = mode.into();
        let target = host.address;
        let configured = early.planned_by.unwrap_or_else(|| self.actions());
        let actions = self.plan(&configured, mode, target, port);
        if actions.is_empty() {
            return Outcome::NothingToRun;
        }
        let mut early = early.result;
        let mut failed = false;
        for action in actions {
            let (name, result) = match &action {
                Action::HostsDeny(text) => (
                    "hosts_deny",
                    record_file::append_line(&configured.hosts_deny_file, "hosts.deny", text),
                ),
                Action::Route(cmd) => ("route", run_shell(cmd).await),
                Action::Command(cmd) => ("command", run_shell(cmd).await),
                Action::Native => match early.take() {
                    Some(result) => ("nftables", result),
                    None => ("nftables", self.native_ban(target, duration).await),
                },
            };
            match result {
                Ok(()) => {
                    let line = match &action {
                        Action::HostsDeny(text) => lines::wrappers(target, text),
                        Action::Route(cmd) => lines::route(target, cmd),
                        Action::Command(cmd) => lines::external(target, cmd),
                        Action::Native => lines::native_ban(
                            target,
                            &self.enforcer.as_ref().map(|e| e.name()).unwrap_or_default(),
                            duration,
                        ),
                    };
                    self.alerts.emit(&line, Fields::new(name).source(target));
                }
                Err(error) => {
                    failed = true;
                    self.metrics.action_failure(name);
                    self.alerts.emit(
                        &lines::action_failed(name, target, &error.to_string()),
                        Fields::new("action_failed").source(target),
                    );
                }
            }
        }
        if failed {
            self.alerts.emit(
                &lines::could_not_block(host),
                Fields::new("could_not_block").source(target),
            );
            return Outcome::Failed;
        }
        if let Err(error) = self.record(host, mode, port, configured.history_file.as_ref()) {
            self.metrics.action_failure("record");
            self.alerts.emit(
                &format!("adminalert: ERROR: {error}"),
                Fields::new("record_failed").source(target),
            );
        }
        Outcome::Blocked
    }

    async fn native_ban(&self, target: IpAddr, duration: Option<Duration>) -> Result<()> {
        let Some(enforcer) = self.enforcer.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || enforcer.ban(target, duration))
            .await
            .map_err(|e| Error::Enforcer(e.to_string()))?
    }

    /// Appends the history line and the mode's blocked line for a host just blocked.
    fn record(
        &self,
        host: &HostName,
        mode: Detection,
        port: u16,
        history_file: Option<&PathBuf>,
    ) -> Result<()> {
        let line = record_line(&jiff::Zoned::now(), host, port, mode.mode().protocol());
        if let Some(path) = history_file {
            record_file::append_line(path, "history", &line)?;
        }
        if let Some(path) = self.blocked_files.get(&mode) {
            record_file::append_line(path, "blocked", &line)?;
        }
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        blocked.insert(host.address, (mode, line));
        Ok(())
    }

    /// Lifts an expired ban: the native enforcer drops it, the blocked file forgets it.
    pub async fn lift(&self, address: IpAddr) {
        if let Some(enforcer) = self.enforcer.clone() {
            let result = tokio::task::spawn_blocking(move || enforcer.unban(address))
                .await
                .map_err(|e| Error::Enforcer(e.to_string()))
                .and_then(|r| r);
            if let Err(error) = result {
                self.metrics.action_failure("nftables");
                self.alerts.emit(
                    &lines::action_failed("nftables unban", address, &error.to_string()),
                    Fields::new("action_failed").source(address),
                );
            }
        }
        self.alerts.emit(
            &lines::expired(address),
            Fields::new("expired").source(address),
        );
        let remaining: Vec<(Detection, String)> = {
            let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
            blocked.remove(&address);
            blocked.values().cloned().collect()
        };
        for (mode, path) in &self.blocked_files {
            let text: String = remaining
                .iter()
                .filter(|(m, _)| m == mode)
                .map(|(_, line)| format!("{line}\n"))
                .collect();
            if let Err(source) = record_file::replace(path, "blocked", &text) {
                self.alerts.emit(
                    &format!(
                        "adminalert: ERROR: cannot rewrite blocked file {}: {source}",
                        path.display()
                    ),
                    Fields::new("record_failed"),
                );
            }
        }
    }

    /// Brings the native enforcer in line with `active`, if there is one.
    pub async fn reconcile(&self, active: Vec<(IpAddr, Option<Duration>)>) -> Result<()> {
        let Some(enforcer) = self.enforcer.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || enforcer.reconcile(&active))
            .await
            .map_err(|e| Error::Enforcer(e.to_string()))?
    }
}

/// Empties (creates) the blocked file of `mode`, if the config names one, and keeps its path.
fn add_blocked_file(
    files: &mut BTreeMap<Detection, PathBuf>,
    config: &Config,
    mode: Detection,
) -> Result<()> {
    if let Some(path) = config.blocked_file_of(mode.as_str()) {
        record_file::replace(&path, "blocked", "")?;
        files.insert(mode, path);
    }
    Ok(())
}

/// Runs `/bin/sh -c command` (as 1.2's `system()`), failing on a non-zero exit or timeout.
pub async fn run_shell(command: &str) -> Result<()> {
    let fail = |message: String| Error::Action {
        action: "command",
        message,
    };
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot start /bin/sh: {e}")))?;
    let output = tokio::time::timeout(ACTION_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            fail(format!(
                "`{command}` still running after {ACTION_TIMEOUT:?}; killed"
            ))
        })?
        .map_err(|e| fail(format!("`{command}`: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    Err(fail(format!(
        "`{command}` exited with {}{}{}",
        output.status,
        if stderr.is_empty() { "" } else { ": " },
        stderr.chars().take(200).collect::<String>()
    )))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn substitution_replaces_target_port_and_mode() {
        assert_eq!(
            substitute(
                "/x $TARGET$ $PORT$ $MODE$ $TARGET$",
                ip("192.0.2.1"),
                111,
                Mode::Udp
            ),
            "/x 192.0.2.1 111 udp 192.0.2.1"
        );
    }

    #[test]
    fn mode_becomes_the_raw_modes_name_as_in_1_2() {
        for (mode, name) in [
            (RawMode::Stcp, "stcp"),
            (RawMode::Atcp, "atcp"),
            (RawMode::Sudp, "sudp"),
            (RawMode::Audp, "audp"),
        ] {
            assert_eq!(substitute("$MODE$", ip("192.0.2.1"), 1, mode), name);
        }
    }

    #[test]
    fn a_raw_mode_answers_to_its_protocols_block_level() {
        assert_eq!(Detection::from(RawMode::Atcp).mode(), Mode::Tcp);
        assert_eq!(Detection::from(RawMode::Sudp).mode(), Mode::Udp);
    }

    #[test]
    fn substitution_writes_ipv6_targets_in_canonical_form() {
        assert_eq!(
            substitute("$TARGET$", ip("2001:0db8:0000::0001"), 1, Mode::Tcp),
            "2001:db8::1"
        );
    }

    #[test]
    fn substituted_values_carry_no_shell_syntax() {
        let out = substitute(
            "$TARGET$:$PORT$:$MODE$",
            ip("::ffff:192.0.2.1"),
            65535,
            Mode::Tcp,
        );
        assert!(
            out.chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.' || c.is_ascii_lowercase()),
            "{out}"
        );
    }

    #[test]
    fn a_record_line_has_portsentrys_exact_format() {
        let at: jiff::Zoned = "1999-11-10T20:18:49-06:00[America/Chicago]"
            .parse()
            .expect("time");
        assert_eq!(
            record_line(
                &at,
                &HostName::unresolved(ip("192.168.2.12")),
                111,
                Protocol::Tcp
            ),
            "942286729 - 11/10/1999 20:18:49 Host: 192.168.2.12/192.168.2.12 Port: 111 TCP Blocked"
        );
    }

    #[test]
    fn a_record_line_pads_single_digit_fields() {
        let at: jiff::Zoned = "2026-01-02T03:04:05+00:00[UTC]".parse().expect("time");
        let line = record_line(&at, &HostName::unresolved(ip("fd00::2")), 7, Protocol::Udp);
        assert_eq!(
            line,
            format!(
                "{} - 01/02/2026 03:04:05 Host: fd00::2/fd00::2 Port: 7 UDP Blocked",
                at.timestamp().as_second()
            )
        );
    }

    fn config(dir: &Path, body: &str) -> Config {
        let text = format!(
            "HISTORY_FILE=\"{d}/history\"\nBLOCKED_FILE=\"{d}/blocked\"\nHOSTS_DENY_FILE=\"{d}/hosts.deny\"\n{body}",
            d = dir.display()
        );
        Config::parse(Path::new("/test.conf"), &text).expect("config")
    }

    fn responder(config: &Config) -> Responder {
        Responder::new(
            config,
            None,
            Arc::new(Alerts::stderr()),
            Arc::new(Metrics::new().expect("metrics")),
        )
        .expect("responder")
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[tokio::test]
    async fn block_1_runs_hosts_deny_route_then_command_in_that_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("order");
        let config = config(
            dir.path(),
            &format!(
                "BLOCK_TCP=\"1\"\nKILL_HOSTS_DENY=\"ALL: $TARGET$\"\nKILL_ROUTE=\"echo route $TARGET$ >> {l}\"\nKILL_RUN_CMD=\"test -s {h} && echo cmd $PORT$ $MODE$ >> {l}\"\n",
                l = log.display(),
                h = dir.path().join("hosts.deny").display()
            ),
        );
        let outcome = responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 111, None)
            .await;
        assert_eq!(outcome, Outcome::Blocked);
        assert_eq!(read(dir.path().join("hosts.deny")), "ALL: 192.0.2.9\n");
        assert_eq!(read(log), "route 192.0.2.9\ncmd 111 tcp\n");
    }

    #[test]
    fn the_native_ban_goes_first_unless_a_command_must_run_before_it() {
        let native = || Action::Native;
        let route = || Action::Route("r".into());
        let command = || Action::Command("c".into());
        assert!(native_first(&[route(), native(), command()]));
        assert!(native_first(&[Action::HostsDeny("h".into()), native()]));
        assert!(!native_first(&[command(), route(), native()]));
        assert!(!native_first(&[route(), command()]));
        assert!(!native_first(&[]));
    }

    #[tokio::test]
    async fn an_early_ban_is_reported_in_the_plans_order_and_not_run_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/bin/true\"\n");
        let responder = responder(&config);
        let host = HostName::unresolved(ip("192.0.2.9"));
        // No enforcer: nothing to ban early, block_after runs the plan as block does.
        let early = responder.ban_early(host.address, Mode::Tcp, 1, None).await;
        assert!(!early.done());
        let outcome = responder
            .block_after(&host, Mode::Tcp, 1, None, early)
            .await;
        assert_eq!(outcome, Outcome::Blocked);
        assert_eq!(read(dir.path().join("history")).lines().count(), 1);
    }

    #[tokio::test]
    async fn kill_run_cmd_first_runs_the_command_before_the_route() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("order");
        let config = config(
            dir.path(),
            &format!(
                "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"echo route >> {l}\"\nKILL_RUN_CMD=\"echo cmd >> {l}\"\nKILL_RUN_CMD_FIRST=\"1\"\n",
                l = log.display()
            ),
        );
        responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        assert_eq!(read(log), "cmd\nroute\n");
    }

    #[tokio::test]
    async fn block_2_runs_only_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("order");
        let config = config(
            dir.path(),
            &format!(
                "BLOCK_UDP=\"2\"\nKILL_HOSTS_DENY=\"ALL: $TARGET$\"\nKILL_ROUTE=\"echo route >> {l}\"\nKILL_RUN_CMD=\"echo cmd >> {l}\"\n",
                l = log.display()
            ),
        );
        let outcome = responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Udp, 1, None)
            .await;
        assert_eq!(outcome, Outcome::Blocked);
        assert_eq!(read(log), "cmd\n");
        assert_eq!(read(dir.path().join("hosts.deny")), "");
    }

    #[tokio::test]
    async fn block_2_without_a_command_blocks_nothing_and_records_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), "BLOCK_TCP=\"2\"\nKILL_ROUTE=\"/bin/true\"\n");
        let outcome = responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        assert_eq!(outcome, Outcome::NothingToRun);
        assert_eq!(read(dir.path().join("history")), "");
    }

    #[tokio::test]
    async fn a_retuned_responder_answers_the_next_alarm_with_the_new_actions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("order");
        let before = config(dir.path(), "BLOCK_TCP=\"0\"\nKILL_RUN_CMD=\"/bin/true\"\n");
        let responder = responder(&before);
        let host = HostName::unresolved(ip("192.0.2.9"));
        assert_eq!(
            responder.block(&host, Mode::Tcp, 1, None).await,
            Outcome::NothingToRun
        );
        // The reloaded config also moves the history file.
        let moved = tempfile::tempdir().expect("tempdir");
        let after = config(
            moved.path(),
            &format!(
                "BLOCK_TCP=\"2\"\nKILL_RUN_CMD=\"echo cmd $TARGET$ >> {l}\"\n",
                l = log.display()
            ),
        );
        responder.retune(&after);
        assert_eq!(
            responder.block(&host, Mode::Tcp, 1, None).await,
            Outcome::Blocked
        );
        assert_eq!(read(log), "cmd 192.0.2.9\n");
        assert_eq!(read(moved.path().join("history")).lines().count(), 1);
        assert_eq!(read(dir.path().join("history")), "");
    }

    #[tokio::test]
    async fn a_reload_between_the_early_ban_and_the_rest_does_not_split_the_response() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("order");
        let before = config(
            dir.path(),
            &format!(
                "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"echo route >> {}\"\n",
                log.display()
            ),
        );
        let responder = responder(&before);
        let host = HostName::unresolved(ip("192.0.2.9"));
        let early = responder.ban_early(host.address, Mode::Tcp, 1, None).await;
        responder.retune(&config(dir.path(), "BLOCK_TCP=\"0\"\n"));
        assert_eq!(
            responder
                .block_after(&host, Mode::Tcp, 1, None, early)
                .await,
            Outcome::Blocked
        );
        assert_eq!(read(log), "route\n");
    }

    #[tokio::test]
    async fn block_0_runs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), "BLOCK_TCP=\"0\"\nKILL_RUN_CMD=\"/bin/true\"\n");
        let outcome = responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        assert_eq!(outcome, Outcome::NothingToRun);
    }

    #[tokio::test]
    async fn a_failed_action_is_not_recorded_as_blocked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/bin/false\"\n");
        let responder = responder(&config);
        let outcome = responder
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        assert_eq!(outcome, Outcome::Failed);
        assert_eq!(read(dir.path().join("history")), "");
        assert_eq!(responder.metrics.action_failures("route"), 1);
    }

    #[tokio::test]
    async fn a_missing_command_is_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(
            dir.path(),
            "BLOCK_TCP=\"2\"\nKILL_RUN_CMD=\"/nonexistent/portsentry-script $TARGET$\"\n",
        );
        let outcome = responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        assert_eq!(outcome, Outcome::Failed);
    }

    #[tokio::test]
    async fn a_block_writes_history_and_the_modes_blocked_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path(), "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/bin/true\"\n");
        responder(&config)
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 143, None)
            .await;
        let history = read(dir.path().join("history"));
        assert!(
            history.ends_with(" Host: 192.0.2.9/192.0.2.9 Port: 143 TCP Blocked\n"),
            "{history}"
        );
        assert_eq!(read(dir.path().join("blocked.tcp")), history);
        assert_eq!(read(dir.path().join("blocked.udp")), "");
    }

    #[tokio::test]
    async fn a_raw_mode_block_writes_its_own_blocked_file_and_a_tcp_history_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(
            dir.path(),
            &format!(
                "BLOCK_TCP=\"1\"\nKILL_RUN_CMD=\"echo $MODE$ >> {}/mode\"\n",
                dir.path().display()
            ),
        );
        responder(&config)
            .with_raw_modes(&config, &[RawMode::Atcp])
            .expect("raw modes")
            .block(
                &HostName::unresolved(ip("192.0.2.9")),
                RawMode::Atcp,
                143,
                None,
            )
            .await;
        let history = read(dir.path().join("history"));
        assert!(
            history.ends_with(" Host: 192.0.2.9/192.0.2.9 Port: 143 TCP Blocked\n"),
            "{history}"
        );
        assert_eq!(read(dir.path().join("blocked.atcp")), history);
        assert_eq!(read(dir.path().join("blocked.tcp")), "");
        assert_eq!(read(dir.path().join("mode")), "atcp\n");
    }

    #[tokio::test]
    async fn raw_mode_blocked_files_are_emptied_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("blocked.stcp"), "old\n").expect("write");
        let config = config(dir.path(), "");
        let _responder = responder(&config)
            .with_raw_modes(&config, &[RawMode::Stcp])
            .expect("raw modes");
        assert_eq!(read(dir.path().join("blocked.stcp")), "");
        assert!(!dir.path().join("blocked.atcp").exists());
    }

    #[tokio::test]
    async fn blocked_files_are_emptied_at_start_and_forget_lifted_bans() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("blocked.tcp"), "old\n").expect("write");
        let config = config(dir.path(), "BLOCK_TCP=\"1\"\nKILL_ROUTE=\"/bin/true\"\n");
        let responder = responder(&config);
        assert_eq!(read(dir.path().join("blocked.tcp")), "");
        responder
            .block(&HostName::unresolved(ip("192.0.2.9")), Mode::Tcp, 1, None)
            .await;
        responder
            .block(&HostName::unresolved(ip("192.0.2.10")), Mode::Tcp, 1, None)
            .await;
        responder.lift(ip("192.0.2.9")).await;
        let blocked = read(dir.path().join("blocked.tcp"));
        assert!(!blocked.contains("192.0.2.9/"), "{blocked}");
        assert!(blocked.contains("192.0.2.10/"), "{blocked}");
        assert_eq!(read(dir.path().join("history")).lines().count(), 2);
    }
}
