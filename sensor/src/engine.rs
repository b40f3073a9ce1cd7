//! The detection engine: decides, per source, when decoy hits cross the scan trigger and
//! what ban follows. Pure: no I/O and no clock reads; the caller passes the time in.
//!
//! Time is a [`Duration`] since any fixed origin the caller chooses (monotonic).
//! Ban state is the sensor's single belief about who is banned: a ban is `Pending` while
//! its actions run, becomes `Active` only when they succeed ([`Engine::confirm`]), and is
//! dropped when they fail ([`Engine::abandon`]), so "already blocked" never drifts from
//! what was really done. Enforcers are reconciled to [`Engine::active_bans`].
//!
//! Bounded under spoofed floods: at most `max_sources` sources are tracked. When the table
//! is full, the eighth with the fewest hits is evicted, oldest first among equals (counted
//! in [`Engine::evictions`]). Every spoofed source of a random-source flood has one hit, so
//! a real scanner that touched two decoys outlives any number of them; an alarm that does
//! not ban keeps the source's hit total, so its next hit is known as a repeat.
//! [`AlarmGate`] then bounds the alarms of first-seen sources whose evidence proves nothing
//! (the flood itself) without ever holding back a repeat or a verified source.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use ipnet::IpNet;
use portsentry_crds::Protocol;

use crate::packet::Hit;

/// How bans last and escalate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanPolicy {
    /// Length of a first ban; `None` bans forever (PortSentry's semantics).
    pub first: Option<Duration>,
    /// Longest an escalated ban may be.
    pub max: Option<Duration>,
    /// Offences closer together than this double the next ban.
    pub escalation_window: Duration,
}

/// What the engine is told to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// PortSentry's `SCAN_TRIGGER`: 0 and 1 alarm on the first hit, N on the N-th.
    pub scan_trigger: u32,
    /// Only hits this recent count; `None` counts every hit (PortSentry).
    pub window: Option<Duration>,
    /// Count distinct (protocol, port) pairs instead of hits.
    pub distinct_ports: bool,
    /// Most sources tracked at once; the least recently seen are evicted beyond it.
    pub max_sources: usize,
    /// Whether evidence that does not prove the source may ban.
    pub ban_unverified: bool,
    /// Whether an alarm on each protocol leads to a ban (`BLOCK_x` other than 0).
    pub ban_tcp: bool,
    pub ban_udp: bool,
    pub ban: BanPolicy,
}

/// Why a source is never acted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    IgnoreList,
    Loopback,
    OwnAddress,
}

/// Why an alarm does not ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoBan {
    /// `BLOCK_x="0"`: alarms only.
    LogOnly,
    /// No completed handshake proves the source, and `BAN_UNVERIFIED` is off.
    Unverified,
    /// As many bans as `STATE_MAX_SOURCES` are active already.
    BanCapReached,
}

/// A ban the caller should now carry out, then [`Engine::confirm`] or [`Engine::abandon`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanPlan {
    /// 1 for a first offence, 2 for the next one within the escalation window, ...
    pub offence: u32,
    /// `None`: forever.
    pub duration: Option<Duration>,
}

/// A source crossed the trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alarm {
    pub hit: Hit,
    /// Hits (or distinct ports) counted when the trigger was crossed.
    pub count: u32,
    /// Whether any counted hit proved the source.
    pub verified: bool,
    /// Hits from this source while it was tracked (1: the source was never seen before).
    pub total: u32,
    pub outcome: Result<BanPlan, NoBan>,
}

/// What the engine made of a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Protected(Protection),
    /// Below the trigger: no trace, as in PortSentry.
    Counted {
        count: u32,
        needed: u32,
    },
    /// The source is banned already (or its ban is being carried out).
    AlreadyBanned,
    Alarm(Alarm),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BanStatus {
    Pending(BanPlan),
    Active {
        plan: BanPlan,
        expires_at: Option<Duration>,
    },
}

#[derive(Clone, Debug, Default)]
struct SourceState {
    /// Counted hits, oldest first: (time, protocol, port, verified).
    hits: Vec<(Duration, Protocol, u16, bool)>,
    /// Every hit while tracked, across alarms: the eviction order.
    total: u32,
    last_seen: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Offences {
    count: u32,
    last: Duration,
}

/// Per-source detection state; see the module doc.
#[derive(Debug)]
pub struct Engine {
    settings: Settings,
    ignore: Vec<IpNet>,
    own: Vec<IpAddr>,
    sources: HashMap<IpAddr, SourceState>,
    bans: HashMap<IpAddr, BanStatus>,
    offences: HashMap<IpAddr, Offences>,
    evictions: u64,
}

impl Engine {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            ignore: Vec::new(),
            own: Vec::new(),
            sources: HashMap::new(),
            bans: HashMap::new(),
            offences: HashMap::new(),
            evictions: 0,
        }
    }

    /// Applies reloaded settings to every hit from now on. `max_sources` stays as started
    /// (the state table's bound is fixed for the process); counts, offences and active bans
    /// are kept, so a ban already in force keeps the duration it was given.
    pub fn retune(&mut self, settings: Settings) {
        let max_sources = self.settings.max_sources;
        self.settings = Settings {
            max_sources,
            ..settings
        };
    }

    /// Replaces the ignore list (the ignore file was re-read).
    pub fn set_ignore(&mut self, prefixes: Vec<IpNet>) {
        self.ignore = prefixes;
    }

    /// Replaces the host's own addresses, which never trigger.
    pub fn set_own_addresses(&mut self, addresses: Vec<IpAddr>) {
        self.own = addresses.into_iter().map(|a| a.to_canonical()).collect();
    }

    /// Every prefix that must never be banned: the ignore list and the host's own addresses
    /// (loopback is refused separately). The kernel tripwire is given these as exemptions.
    pub fn exempt_prefixes(&self) -> Vec<IpNet> {
        let own = self.own.iter().map(|address| IpNet::from(*address));
        self.ignore.iter().copied().chain(own).collect()
    }

    /// Hits needed to alarm: `SCAN_TRIGGER` 0 and 1 both mean the first hit.
    pub fn needed(&self) -> u32 {
        self.settings.scan_trigger.max(1)
    }

    /// Sources with hit state kept now.
    pub fn sources_tracked(&self) -> usize {
        self.sources.len()
    }

    /// Sources evicted since start to stay within `max_sources`.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether a source is banned or being banned.
    pub fn is_banned(&self, source: IpAddr) -> bool {
        self.bans.contains_key(&source.to_canonical())
    }

    /// Why a source would never be acted on, if it is protected.
    pub fn protection(&self, source: IpAddr) -> Option<Protection> {
        let source = source.to_canonical();
        if source.is_loopback() {
            Some(Protection::Loopback)
        } else if self.own.contains(&source) {
            Some(Protection::OwnAddress)
        } else if self.ignore.iter().any(|prefix| prefix.contains(&source)) {
            Some(Protection::IgnoreList)
        } else {
            None
        }
    }

    /// Takes in one hit at time `now`.
    pub fn observe(&mut self, hit: Hit, now: Duration) -> Verdict {
        let hit = Hit {
            source: hit.source.to_canonical(),
            ..hit
        };
        if let Some(protection) = self.protection(hit.source) {
            return Verdict::Protected(protection);
        }
        if self.bans.contains_key(&hit.source) {
            return Verdict::AlreadyBanned;
        }
        let needed = self.needed();
        if !self.sources.contains_key(&hit.source) {
            self.make_room(now);
        }
        let window = self.settings.window;
        let distinct = self.settings.distinct_ports;
        let state = self.sources.entry(hit.source).or_default();
        state.last_seen = now;
        state.total = state.total.saturating_add(1);
        if let Some(window) = window {
            state
                .hits
                .retain(|(at, ..)| now.saturating_sub(*at) < window);
        }
        if distinct {
            state
                .hits
                .retain(|(_, protocol, port, _)| (*protocol, *port) != (hit.protocol, hit.port));
        }
        state
            .hits
            .push((now, hit.protocol, hit.port, hit.verified()));
        if state.hits.len() > needed as usize {
            state.hits.remove(0);
        }
        let count = state.hits.len() as u32;
        if count < needed {
            return Verdict::Counted { count, needed };
        }
        let verified = state.hits.iter().any(|(.., verified)| *verified);
        let total = state.total;
        state.hits.clear();
        let outcome = self.plan_ban(hit, verified, now);
        if let Ok(plan) = outcome {
            self.bans.insert(hit.source, BanStatus::Pending(plan));
        }
        Verdict::Alarm(Alarm {
            hit,
            count,
            verified,
            total,
            outcome,
        })
    }

    fn plan_ban(&self, hit: Hit, verified: bool, now: Duration) -> Result<BanPlan, NoBan> {
        let wants = match hit.protocol {
            Protocol::Tcp => self.settings.ban_tcp,
            Protocol::Udp => self.settings.ban_udp,
        };
        if !wants {
            return Err(NoBan::LogOnly);
        }
        if !verified && !self.settings.ban_unverified {
            return Err(NoBan::Unverified);
        }
        if self.bans.len() >= self.settings.max_sources {
            return Err(NoBan::BanCapReached);
        }
        let policy = self.settings.ban;
        let offence = match self.offences.get(&hit.source) {
            Some(previous) if now.saturating_sub(previous.last) < policy.escalation_window => {
                previous.count.saturating_add(1)
            }
            _ => 1,
        };
        let duration = policy.first.map(|first| {
            let factor = 2u32.saturating_pow(offence - 1);
            let escalated = first.checked_mul(factor).unwrap_or(Duration::MAX);
            policy.max.map_or(escalated, |max| escalated.min(max))
        });
        Ok(BanPlan { offence, duration })
    }

    /// The ban's actions succeeded at `now`: it is active, and counts as an offence.
    pub fn confirm(&mut self, source: IpAddr, now: Duration) -> Option<BanPlan> {
        let source = source.to_canonical();
        let Some(BanStatus::Pending(plan)) = self.bans.get(&source).copied() else {
            return None;
        };
        let expires_at = plan.duration.map(|duration| now.saturating_add(duration));
        self.bans
            .insert(source, BanStatus::Active { plan, expires_at });
        self.offences.insert(
            source,
            Offences {
                count: plan.offence,
                last: now,
            },
        );
        Some(plan)
    }

    /// The ban's actions failed: the source is not banned, and its next alarm retries.
    pub fn abandon(&mut self, source: IpAddr) {
        let source = source.to_canonical();
        if matches!(self.bans.get(&source), Some(BanStatus::Pending(_))) {
            self.bans.remove(&source);
        }
    }

    /// Lifts bans whose time is up and forgets stale state; returns the unbanned sources.
    pub fn expire(&mut self, now: Duration) -> Vec<IpAddr> {
        let mut lifted: Vec<IpAddr> = self
            .bans
            .iter()
            .filter_map(|(source, status)| match status {
                BanStatus::Active {
                    expires_at: Some(at),
                    ..
                } if *at <= now => Some(*source),
                _ => None,
            })
            .collect();
        lifted.sort();
        for source in &lifted {
            self.bans.remove(source);
        }
        let window = self.settings.ban.escalation_window;
        self.offences
            .retain(|_, offences| now.saturating_sub(offences.last) < window);
        if let Some(window) = self.settings.window {
            self.sources
                .retain(|_, state| now.saturating_sub(state.last_seen) < window);
        }
        lifted
    }

    /// Drops the bans of sources that are protected now (the ignore file changed); returns them.
    pub fn release_protected(&mut self) -> Vec<IpAddr> {
        let mut released: Vec<IpAddr> = self
            .bans
            .keys()
            .copied()
            .filter(|source| self.protection(*source).is_some())
            .collect();
        released.sort();
        for source in &released {
            self.bans.remove(source);
        }
        released
    }

    /// Active bans with the time each has left (`None`: forever), sorted by address.
    pub fn active_bans(&self, now: Duration) -> Vec<(IpAddr, Option<Duration>)> {
        let mut active: Vec<_> = self
            .bans
            .iter()
            .filter_map(|(source, status)| match status {
                BanStatus::Active { expires_at, .. } => {
                    Some((*source, expires_at.map(|at| at.saturating_sub(now))))
                }
                BanStatus::Pending(_) => None,
            })
            .collect();
        active.sort();
        active
    }

    /// Evicts the eighth of the sources with the fewest hits, least recently seen first
    /// among equals, when the table is full.
    fn make_room(&mut self, _now: Duration) {
        let cap = self.settings.max_sources.max(1);
        if self.sources.len() < cap {
            return;
        }
        let mut seen: Vec<(u32, Duration, IpAddr)> = self
            .sources
            .iter()
            .map(|(source, state)| (state.total, state.last_seen, *source))
            .collect();
        let evict = (cap / 8).max(1).min(seen.len());
        seen.select_nth_unstable(evict - 1);
        for (_, _, source) in &seen[..evict] {
            self.sources.remove(source);
        }
        self.evictions += evict as u64;
    }
}

/// Alarms of first-seen sources with unverified evidence carried out per second, and the
/// burst allowed: beyond them such alarms are suppressed and counted (a spoofed flood).
pub const FIRST_SIGHT_ALARMS_PER_SECOND: u32 = 50;
pub const FIRST_SIGHT_BURST: u32 = 100;

/// A token bucket for alarms whose source was seen once and proved nothing: a repeat
/// (`total > 1`) or verified alarm always passes; see the module doc.
#[derive(Clone, Debug)]
pub struct AlarmGate {
    rate: u32,
    burst: u32,
    tokens: f64,
    last: Duration,
    suppressed: u64,
}

impl Default for AlarmGate {
    fn default() -> Self {
        Self::new(FIRST_SIGHT_ALARMS_PER_SECOND, FIRST_SIGHT_BURST)
    }
}

impl AlarmGate {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate,
            burst,
            tokens: f64::from(burst),
            last: Duration::ZERO,
            suppressed: 0,
        }
    }

    /// Whether the alarm should be carried out (logged, acted on) at `now`.
    pub fn admit(&mut self, alarm: &Alarm, now: Duration) -> bool {
        if alarm.verified || alarm.total > 1 {
            return true;
        }
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Alarms suppressed since start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use portsentry_crds::ProbeKind;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn settings() -> Settings {
        Settings {
            scan_trigger: 0,
            window: None,
            distinct_ports: false,
            max_sources: 1000,
            ban_unverified: false,
            ban_tcp: true,
            ban_udp: true,
            ban: BanPolicy {
                first: None,
                max: None,
                escalation_window: 24 * HOUR,
            },
        }
    }

    fn engine(change: impl FnOnce(&mut Settings)) -> Engine {
        let mut settings = settings();
        change(&mut settings);
        Engine::new(settings)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn connect(source: &str, port: u16) -> Hit {
        Hit {
            source: ip(source),
            port,
            protocol: Protocol::Tcp,
            kind: ProbeKind::Connect,
            captured: None,
        }
    }

    fn datagram(source: &str, port: u16) -> Hit {
        Hit {
            source: ip(source),
            port,
            protocol: Protocol::Udp,
            kind: ProbeKind::Datagram,
            captured: None,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn is_alarm(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Alarm(_))
    }

    fn alarm(verdict: Verdict) -> Alarm {
        match verdict {
            Verdict::Alarm(alarm) => alarm,
            other => panic!("expected an alarm, got {other:?}"),
        }
    }

    #[test]
    fn scan_trigger_0_alarms_on_the_first_hit() {
        let mut engine = engine(|s| s.scan_trigger = 0);
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 111), secs(0))));
    }

    #[test]
    fn scan_trigger_1_alarms_on_the_first_hit() {
        let mut engine = engine(|s| s.scan_trigger = 1);
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 111), secs(0))));
    }

    #[test]
    fn scan_trigger_n_alarms_on_the_nth_hit() {
        let mut engine = engine(|s| s.scan_trigger = 3);
        assert_eq!(
            engine.observe(connect("192.0.2.1", 1), secs(0)),
            Verdict::Counted {
                count: 1,
                needed: 3
            }
        );
        assert!(!is_alarm(engine.observe(connect("192.0.2.1", 1), secs(1))));
        assert_eq!(
            alarm(engine.observe(connect("192.0.2.1", 1), secs(2))).count,
            3
        );
    }

    #[test]
    fn hits_on_different_ports_count_together() {
        let mut engine = engine(|s| s.scan_trigger = 2);
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 79), secs(0))));
    }

    #[test]
    fn sources_are_counted_separately() {
        let mut engine = engine(|s| s.scan_trigger = 2);
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(!is_alarm(engine.observe(connect("192.0.2.2", 1), secs(0))));
    }

    #[test]
    fn without_a_window_hits_never_decay() {
        let mut engine = engine(|s| s.scan_trigger = 2);
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(is_alarm(
            engine.observe(connect("192.0.2.1", 1), secs(86_400 * 30))
        ));
    }

    #[test]
    fn with_a_window_old_hits_do_not_count() {
        let mut engine = engine(|s| {
            s.scan_trigger = 2;
            s.window = Some(secs(60));
        });
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(!is_alarm(engine.observe(connect("192.0.2.1", 2), secs(61))));
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 3), secs(62))));
    }

    #[test]
    fn distinct_port_counting_ignores_repeats_on_one_port() {
        let mut engine = engine(|s| {
            s.scan_trigger = 2;
            s.distinct_ports = true;
        });
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(!is_alarm(engine.observe(connect("192.0.2.1", 1), secs(1))));
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 2), secs(2))));
    }

    #[test]
    fn the_same_port_on_tcp_and_udp_is_two_distinct_ports() {
        let mut engine = engine(|s| {
            s.scan_trigger = 2;
            s.distinct_ports = true;
            s.ban_unverified = true;
        });
        engine.observe(connect("192.0.2.1", 111), secs(0));
        assert!(is_alarm(
            engine.observe(datagram("192.0.2.1", 111), secs(1))
        ));
    }

    #[test]
    fn ignore_listed_ipv4_prefixes_never_trigger() {
        let mut engine = engine(|_| {});
        engine.set_ignore(vec!["10.0.0.0/8".parse().expect("prefix")]);
        assert_eq!(
            engine.observe(connect("10.9.8.7", 1), secs(0)),
            Verdict::Protected(Protection::IgnoreList)
        );
    }

    #[test]
    fn ignore_listed_ipv6_prefixes_never_trigger() {
        let mut engine = engine(|_| {});
        engine.set_ignore(vec!["fd00::/8".parse().expect("prefix")]);
        assert_eq!(
            engine.observe(connect("fd12::1", 1), secs(0)),
            Verdict::Protected(Protection::IgnoreList)
        );
    }

    #[test]
    fn loopback_never_triggers() {
        let mut engine = engine(|_| {});
        assert_eq!(
            engine.observe(connect("127.0.0.5", 1), secs(0)),
            Verdict::Protected(Protection::Loopback)
        );
        assert_eq!(
            engine.observe(connect("::1", 1), secs(0)),
            Verdict::Protected(Protection::Loopback)
        );
    }

    #[test]
    fn the_hosts_own_addresses_never_trigger() {
        let mut engine = engine(|_| {});
        engine.set_own_addresses(vec![ip("192.0.2.10")]);
        assert_eq!(
            engine.observe(connect("192.0.2.10", 1), secs(0)),
            Verdict::Protected(Protection::OwnAddress)
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_sources_are_treated_as_ipv4() {
        let mut engine = engine(|_| {});
        engine.set_ignore(vec!["192.0.2.0/24".parse().expect("prefix")]);
        assert_eq!(
            engine.observe(connect("::ffff:192.0.2.1", 1), secs(0)),
            Verdict::Protected(Protection::IgnoreList)
        );
    }

    #[test]
    fn a_completed_handshake_is_verified_evidence_and_bans() {
        let mut engine = engine(|_| {});
        let alarm = alarm(engine.observe(connect("192.0.2.1", 1), secs(0)));
        assert!(alarm.verified);
        assert!(alarm.outcome.is_ok());
    }

    #[test]
    fn unverified_evidence_alarms_but_does_not_ban_by_default() {
        let mut engine = engine(|_| {});
        let alarm = alarm(engine.observe(datagram("192.0.2.1", 161), secs(0)));
        assert!(!alarm.verified);
        assert_eq!(alarm.outcome, Err(NoBan::Unverified));
        assert!(!engine.is_banned(ip("192.0.2.1")));
    }

    #[test]
    fn unverified_evidence_bans_when_configured() {
        let mut engine = engine(|s| s.ban_unverified = true);
        assert!(
            alarm(engine.observe(datagram("192.0.2.1", 161), secs(0)))
                .outcome
                .is_ok()
        );
    }

    #[test]
    fn one_handshake_among_the_counted_hits_verifies_the_source() {
        let mut engine = engine(|s| s.scan_trigger = 2);
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(alarm(engine.observe(datagram("192.0.2.1", 2), secs(1))).verified);
    }

    #[test]
    fn block_level_0_alarms_without_a_ban() {
        let mut engine = engine(|s| s.ban_tcp = false);
        assert_eq!(
            alarm(engine.observe(connect("192.0.2.1", 1), secs(0))).outcome,
            Err(NoBan::LogOnly)
        );
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 1), secs(1))));
    }

    #[test]
    fn a_banned_source_is_already_blocked() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.confirm(ip("192.0.2.1"), secs(0));
        assert_eq!(
            engine.observe(connect("192.0.2.1", 2), secs(1)),
            Verdict::AlreadyBanned
        );
    }

    #[test]
    fn a_ban_being_carried_out_is_already_blocked() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert_eq!(
            engine.observe(connect("192.0.2.1", 2), secs(0)),
            Verdict::AlreadyBanned
        );
    }

    #[test]
    fn a_failed_ban_is_not_remembered_and_the_next_hit_retries() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.abandon(ip("192.0.2.1"));
        assert!(!engine.is_banned(ip("192.0.2.1")));
        assert!(engine.active_bans(secs(1)).is_empty());
        assert!(is_alarm(engine.observe(connect("192.0.2.1", 1), secs(1))));
    }

    #[test]
    fn only_confirmed_bans_are_active() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        assert!(engine.active_bans(secs(0)).is_empty());
        engine.confirm(ip("192.0.2.1"), secs(0));
        assert_eq!(engine.active_bans(secs(0)), vec![(ip("192.0.2.1"), None)]);
    }

    #[test]
    fn without_a_duration_bans_last_forever() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.confirm(ip("192.0.2.1"), secs(0));
        assert!(engine.expire(secs(10 * 365 * 86_400)).is_empty());
        assert!(engine.is_banned(ip("192.0.2.1")));
    }

    #[test]
    fn a_timed_ban_expires() {
        let mut engine = engine(|s| s.ban.first = Some(secs(60)));
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.confirm(ip("192.0.2.1"), secs(0));
        assert_eq!(
            engine.active_bans(secs(20)),
            vec![(ip("192.0.2.1"), Some(secs(40)))]
        );
        assert!(engine.expire(secs(59)).is_empty());
        assert_eq!(engine.expire(secs(60)), vec![ip("192.0.2.1")]);
        assert!(!engine.is_banned(ip("192.0.2.1")));
    }

    fn offend(engine: &mut Engine, at: u64) -> BanPlan {
        let plan = match alarm(engine.observe(connect("192.0.2.1", 1), secs(at))).outcome {
            Ok(plan) => plan,
            Err(reason) => panic!("expected a ban, got {reason:?}"),
        };
        engine.confirm(ip("192.0.2.1"), secs(at));
        plan
    }

    #[test]
    fn repeat_offences_within_the_window_double_the_ban() {
        let mut engine = engine(|s| s.ban.first = Some(secs(60)));
        assert_eq!(offend(&mut engine, 0).duration, Some(secs(60)));
        engine.expire(secs(60));
        let second = offend(&mut engine, 100);
        assert_eq!((second.offence, second.duration), (2, Some(secs(120))));
        engine.expire(secs(220));
        assert_eq!(offend(&mut engine, 300).duration, Some(secs(240)));
    }

    #[test]
    fn escalation_stops_at_the_cap() {
        let mut engine = engine(|s| {
            s.ban.first = Some(secs(60));
            s.ban.max = Some(secs(100));
        });
        offend(&mut engine, 0);
        engine.expire(secs(60));
        assert_eq!(offend(&mut engine, 100).duration, Some(secs(100)));
    }

    #[test]
    fn an_offence_after_the_memory_window_starts_over() {
        let mut engine = engine(|s| {
            s.ban.first = Some(secs(60));
            s.ban.escalation_window = secs(600);
        });
        offend(&mut engine, 0);
        engine.expire(secs(1000));
        let plan = offend(&mut engine, 1000);
        assert_eq!((plan.offence, plan.duration), (1, Some(secs(60))));
    }

    #[test]
    fn state_is_bounded_and_evictions_are_counted() {
        let mut engine = engine(|s| {
            s.scan_trigger = 5;
            s.max_sources = 16;
        });
        for n in 0..100u32 {
            let source = IpAddr::from([198, 51, (n / 256) as u8, (n % 256) as u8]);
            engine.observe(
                Hit {
                    source,
                    port: 1,
                    protocol: Protocol::Udp,
                    kind: ProbeKind::Datagram,
                    captured: None,
                },
                secs(u64::from(n)),
            );
        }
        assert!(engine.sources_tracked() <= 16);
        assert_eq!(engine.evictions(), 100 - engine.sources_tracked() as u64);
    }

    #[test]
    fn eviction_removes_the_least_recently_seen_sources() {
        let mut engine = engine(|s| {
            s.scan_trigger = 2;
            s.max_sources = 2;
        });
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.observe(connect("192.0.2.2", 1), secs(1));
        engine.observe(connect("192.0.2.3", 1), secs(2));
        assert!(is_alarm(engine.observe(connect("192.0.2.2", 1), secs(3))));
        assert_eq!(engine.evictions(), 1);
    }

    #[test]
    fn a_flood_of_spoofed_sources_does_not_delay_a_real_detection() {
        let mut engine = engine(|s| {
            s.scan_trigger = 2;
            s.max_sources = 64;
        });
        engine.observe(connect("203.0.113.5", 1), secs(0));
        for n in 0..10_000u32 {
            let source = IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            engine.observe(datagram(&source.to_string(), 1), secs(0));
        }
        let verdict = engine.observe(connect("203.0.113.5", 2), secs(1));
        assert!(engine.sources_tracked() <= 64);
        assert!(matches!(
            verdict,
            Verdict::Alarm(_) | Verdict::Counted { .. }
        ));
    }

    #[test]
    fn a_banned_source_added_to_the_ignore_list_is_released() {
        let mut engine = engine(|_| {});
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.confirm(ip("192.0.2.1"), secs(0));
        engine.observe(connect("198.51.100.1", 1), secs(0));
        engine.confirm(ip("198.51.100.1"), secs(0));
        engine.set_ignore(vec!["192.0.2.0/24".parse().expect("prefix")]);
        assert_eq!(engine.release_protected(), vec![ip("192.0.2.1")]);
        assert_eq!(
            engine.active_bans(secs(1)),
            vec![(ip("198.51.100.1"), None)]
        );
    }

    #[test]
    fn bans_beyond_the_cap_alarm_without_banning() {
        let mut engine = engine(|s| s.max_sources = 1);
        engine.observe(connect("192.0.2.1", 1), secs(0));
        engine.confirm(ip("192.0.2.1"), secs(0));
        assert_eq!(
            alarm(engine.observe(connect("192.0.2.2", 1), secs(1))).outcome,
            Err(NoBan::BanCapReached)
        );
    }

    #[test]
    fn a_scanner_with_several_hits_outlives_a_flood_of_one_hit_sources() {
        let mut engine = engine(|s| {
            s.scan_trigger = 5;
            s.max_sources = 64;
        });
        for port in 1..=3 {
            engine.observe(connect("203.0.113.5", port), secs(0));
        }
        for n in 0..10_000u32 {
            let source = IpAddr::from([10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            engine.observe(datagram(&source.to_string(), 1), secs(1));
        }
        engine.observe(connect("203.0.113.5", 4), secs(2));
        assert_eq!(
            alarm(engine.observe(connect("203.0.113.5", 5), secs(2))).count,
            5
        );
        assert!(engine.evictions() > 9_000);
    }

    #[test]
    fn an_alarm_that_does_not_ban_remembers_the_sources_hits() {
        let mut engine = engine(|_| {});
        assert_eq!(
            alarm(engine.observe(datagram("192.0.2.1", 161), secs(0))).total,
            1
        );
        assert_eq!(
            alarm(engine.observe(datagram("192.0.2.1", 162), secs(1))).total,
            2
        );
    }

    fn unverified_first_sight(total: u32) -> Alarm {
        Alarm {
            hit: datagram("192.0.2.1", 161),
            count: 1,
            verified: false,
            total,
            outcome: Err(NoBan::Unverified),
        }
    }

    #[test]
    fn the_gate_suppresses_first_sight_alarms_beyond_the_burst() {
        let mut gate = AlarmGate::new(10, 3);
        let admitted = (0..10)
            .filter(|_| gate.admit(&unverified_first_sight(1), secs(0)))
            .count();
        assert_eq!((admitted, gate.suppressed()), (3, 7));
    }

    #[test]
    fn the_gate_refills_at_its_rate() {
        let mut gate = AlarmGate::new(10, 3);
        for _ in 0..3 {
            gate.admit(&unverified_first_sight(1), secs(0));
        }
        assert!(!gate.admit(&unverified_first_sight(1), secs(0)));
        assert!(gate.admit(&unverified_first_sight(1), Duration::from_millis(150)));
    }

    #[test]
    fn the_gate_always_admits_repeat_sources() {
        let mut gate = AlarmGate::new(1, 1);
        gate.admit(&unverified_first_sight(1), secs(0));
        assert!(gate.admit(&unverified_first_sight(2), secs(0)));
        assert_eq!(gate.suppressed(), 0);
    }

    #[test]
    fn the_gate_always_admits_verified_alarms() {
        let mut gate = AlarmGate::new(1, 1);
        gate.admit(&unverified_first_sight(1), secs(0));
        let verified = Alarm {
            verified: true,
            ..unverified_first_sight(1)
        };
        assert!(gate.admit(&verified, secs(0)));
    }

    #[test]
    fn a_retuned_trigger_applies_to_the_next_hits() {
        let mut engine = engine(|s| s.scan_trigger = 3);
        assert!(matches!(
            engine.observe(connect("192.0.2.7", 1), secs(1)),
            Verdict::Counted {
                count: 1,
                needed: 3
            }
        ));
        engine.retune(Settings {
            scan_trigger: 2,
            ..settings()
        });
        assert!(matches!(
            engine.observe(connect("192.0.2.7", 2), secs(2)),
            Verdict::Alarm(_)
        ));
    }

    #[test]
    fn a_retune_keeps_the_state_bound_of_the_start() {
        let mut engine = engine(|s| s.max_sources = 2);
        engine.retune(Settings {
            max_sources: 1_000_000,
            scan_trigger: 5,
            ..settings()
        });
        for n in 0..10u8 {
            engine.observe(connect(&format!("192.0.2.{n}"), 1), secs(1));
        }
        assert!(engine.sources_tracked() <= 2);
    }

    #[test]
    fn a_retune_keeps_the_bans_in_force() {
        let mut engine = engine(|_| {});
        let source = ip("192.0.2.9");
        assert!(matches!(
            engine.observe(connect("192.0.2.9", 1), secs(1)),
            Verdict::Alarm(_)
        ));
        engine.confirm(source, secs(1));
        engine.retune(Settings {
            scan_trigger: 4,
            ..settings()
        });
        assert!(engine.is_banned(source));
    }
}
