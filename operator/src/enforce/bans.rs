//! Ban lifecycle arithmetic: who may never be banned, whether a detection bans, the next
//! `PortSentryBanSpec` (offences, escalation, evidence), ban names, expiry and requeue times.

use std::{net::IpAddr, time::Duration as StdDuration};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use portsentry_crds::{
    Action, Evidence, MAX_EVIDENCE, PolicyRef, PolicyRules, PortSentryBanSpec, Response,
    SourcePrefix, report::Probe,
};

use crate::{Result, names};

/// Why a source may never be banned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    Ignored,
    Node,
    ApiServer,
    Operator,
    /// A pod of kube-system, of the operator's namespace or of a chart-listed namespace.
    ProtectedNamespace,
    /// A Service ClusterIP.
    Service,
    /// The cluster DNS (its Service).
    ClusterDns,
    /// A prefix of the chart's `protectedCIDRs`.
    ProtectedCidr,
}

impl Protection {
    /// Bounded word for metrics, events and the report answer.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protection::Loopback => "loopback",
            Protection::Unspecified => "unspecified",
            Protection::LinkLocal => "link_local",
            Protection::Multicast => "multicast",
            Protection::Broadcast => "broadcast",
            Protection::Ignored => "ignored",
            Protection::Node => "node",
            Protection::ApiServer => "apiserver",
            Protection::Operator => "operator",
            Protection::ProtectedNamespace => "protected_namespace",
            Protection::Service => "service",
            Protection::ClusterDns => "cluster_dns",
            Protection::ProtectedCidr => "protected_cidr",
        }
    }
}

const SPECIAL: [(&str, Protection); 9] = [
    ("127.0.0.0/8", Protection::Loopback),
    ("::1/128", Protection::Loopback),
    ("0.0.0.0/8", Protection::Unspecified),
    ("::/128", Protection::Unspecified),
    ("169.254.0.0/16", Protection::LinkLocal),
    ("fe80::/10", Protection::LinkLocal),
    ("224.0.0.0/4", Protection::Multicast),
    ("ff00::/8", Protection::Multicast),
    ("255.255.255.255/32", Protection::Broadcast),
];

/// A prefix in both of its spellings: IPv4 and IPv4-mapped IPv6 (`::ffff:a.b.c.d`).
fn forms(net: IpNet) -> Vec<IpNet> {
    let net = net.trunc();
    match net {
        IpNet::V4(v4) => {
            let mapped = Ipv6Net::new(v4.network().to_ipv6_mapped(), 96 + v4.prefix_len());
            std::iter::once(net)
                .chain(mapped.ok().map(IpNet::V6))
                .collect()
        }
        IpNet::V6(v6) => {
            let v4 = (v6.prefix_len() >= 96)
                .then(|| v6.network().to_ipv4_mapped())
                .flatten()
                .and_then(|a| Ipv4Net::new(a, v6.prefix_len() - 96).ok());
            std::iter::once(net).chain(v4.map(IpNet::V4)).collect()
        }
    }
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    forms(a).into_iter().any(|a| {
        forms(b)
            .into_iter()
            .any(|b| a.contains(&b) || b.contains(&a))
    })
}

/// Why `source` may never be banned, if it may not: it overlaps loopback, unspecified,
/// link-local, multicast or broadcast space, an ignored prefix, or contains an address of a
/// node, the API server or the operator. IPv4-mapped IPv6 counts as the IPv4 it maps.
pub fn protected(
    source: &SourcePrefix,
    ignore: &[SourcePrefix],
    node_addrs: &[IpAddr],
    apiserver_addrs: &[IpAddr],
    operator_addrs: &[IpAddr],
) -> Option<Protection> {
    let source = source.network();
    let special = SPECIAL.iter().find_map(|(net, why)| {
        let net: IpNet = net.parse().ok()?;
        overlaps(source, net).then_some(*why)
    });
    let holds = |addrs: &[IpAddr], why| {
        addrs
            .iter()
            .any(|a| overlaps(source, IpNet::from(*a)))
            .then_some(why)
    };
    special
        .or_else(|| {
            ignore
                .iter()
                .any(|i| overlaps(source, i.network()))
                .then_some(Protection::Ignored)
        })
        .or_else(|| holds(node_addrs, Protection::Node))
        .or_else(|| holds(apiserver_addrs, Protection::ApiServer))
        .or_else(|| holds(operator_addrs, Protection::Operator))
}

/// Addresses that are never banned besides a policy's own ignore list: the cluster's
/// infrastructure, as discovered by `enforce::guards` and configured by the chart.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    pub node_addrs: Vec<IpAddr>,
    pub apiserver_addrs: Vec<IpAddr>,
    pub operator_addrs: Vec<IpAddr>,
    /// Addresses of pods of the protected namespaces.
    pub infra_pod_addrs: Vec<IpAddr>,
    /// ClusterIPs of every Service.
    pub service_addrs: Vec<IpAddr>,
    /// ClusterIPs of the cluster DNS Service.
    pub dns_addrs: Vec<IpAddr>,
    /// The chart's `protectedCIDRs`.
    pub protected_nets: Vec<IpNet>,
    /// kube-system, the operator's namespace and the chart's `protectedNamespaces`: their
    /// pods are never banned nor quarantined.
    pub protected_namespaces: std::collections::BTreeSet<String>,
    /// The cluster's pod ranges (nodes' `spec.podCIDRs` and the chart's `podCIDRs`): a
    /// source inside is a pod, which a NetworkPolicy `ipBlock` does not reliably match.
    pub pod_nets: Vec<IpNet>,
}

impl Guards {
    /// True when `source` overlaps the cluster's pod ranges: it is, or may be, a pod, or
    /// holds pod addresses (`10.0.0.0/8` around `10.244.0.0/16`). IPv4-mapped IPv6 counts
    /// as the IPv4 it maps.
    pub fn is_pod_source(&self, source: &SourcePrefix) -> bool {
        let net = source.network();
        self.pod_nets.iter().any(|pods| overlaps(net, *pods))
    }

    /// Why `source` may never be banned, if it may not (see [`protected`]); then the
    /// cluster's infrastructure: pods of protected namespaces, the DNS, Services, and the
    /// chart's protected prefixes.
    pub fn protected(&self, source: &SourcePrefix, ignore: &[SourcePrefix]) -> Option<Protection> {
        let net = source.network();
        let holds = |addrs: &[IpAddr], why| {
            addrs
                .iter()
                .any(|a| overlaps(net, IpNet::from(*a)))
                .then_some(why)
        };
        protected(
            source,
            ignore,
            &self.node_addrs,
            &self.apiserver_addrs,
            &self.operator_addrs,
        )
        .or_else(|| holds(&self.infra_pod_addrs, Protection::ProtectedNamespace))
        .or_else(|| holds(&self.dns_addrs, Protection::ClusterDns))
        .or_else(|| holds(&self.service_addrs, Protection::Service))
        .or_else(|| {
            self.protected_nets
                .iter()
                .any(|p| overlaps(net, *p))
                .then_some(Protection::ProtectedCidr)
        })
    }

    /// True when pods of `namespace` are never banned nor quarantined.
    pub fn protects_namespace(&self, namespace: &str) -> bool {
        namespace == "kube-system" || self.protected_namespaces.contains(namespace)
    }
}

/// When IPv6 sources are banned as their network: once `after` addresses of one
/// `/prefix_len` are banned by one policy, the next becomes a ban of the whole network (a
/// scanner rotating through its /64 would otherwise exhaust `maxActiveBans`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Grouping {
    pub prefix_len: u8,
    pub after: usize,
}

impl Default for Ipv6Grouping {
    fn default() -> Self {
        Self {
            prefix_len: 64,
            after: 4,
        }
    }
}

/// The network to ban instead of `source`, if any: an IPv6 address (not IPv4-mapped) whose
/// `/prefix_len` already holds `after` banned addresses of `banned` (distinct, itself not
/// counted), or is itself banned as a whole.
pub fn ipv6_group(
    source: &SourcePrefix,
    banned: &[SourcePrefix],
    grouping: Ipv6Grouping,
) -> Option<SourcePrefix> {
    let IpNet::V6(host) = source.network() else {
        return None;
    };
    if host.prefix_len() != 128 || host.addr().to_ipv4_mapped().is_some() {
        return None;
    }
    let group = Ipv6Net::new(host.addr(), grouping.prefix_len.min(128))
        .ok()?
        .trunc();
    if group.prefix_len() == 128 {
        return None;
    }
    let mut members = std::collections::BTreeSet::new();
    for ban in banned {
        match ban.network() {
            IpNet::V6(net) if net == group => return Some(SourcePrefix(IpNet::V6(group))),
            IpNet::V6(net)
                if net.prefix_len() == 128
                    && group.contains(&net.addr())
                    && net.addr() != host.addr() =>
            {
                members.insert(net.addr());
            }
            _ => {}
        }
    }
    (members.len() >= grouping.after.max(1)).then_some(SourcePrefix(IpNet::V6(group)))
}

/// Why a detection is recorded as an alert and not a ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertReason {
    /// The policy's action is `Alert`.
    ActionAlert,
    /// The policy's action is `Hook`: webhooks only.
    ActionHook,
    /// No probe proved the source and the policy does not ban on unverified evidence.
    Unverified,
    /// The policy already has `maxActiveBans` bans in force.
    CapReached,
}

impl AlertReason {
    /// Bounded word for metrics, events and the report answer.
    pub const fn as_str(self) -> &'static str {
        match self {
            AlertReason::ActionAlert => "action_alert",
            AlertReason::ActionHook => "action_hook",
            AlertReason::Unverified => "unverified",
            AlertReason::CapReached => "cap_reached",
        }
    }
}

/// What to do with one detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ban,
    Alert(AlertReason),
    Protected(Protection),
}

/// Judges a detection of `source` with `probes` under `rules`. `active_bans` counts the
/// policy's bans in force; `already_banned` says whether `source` is one of them (updating
/// an existing ban never hits the cap).
pub fn judge(
    rules: &PolicyRules,
    guards: &Guards,
    source: &SourcePrefix,
    probes: &[Probe],
    active_bans: usize,
    already_banned: bool,
) -> Verdict {
    if let Some(why) = guards.protected(source, &rules.detection.ignore) {
        return Verdict::Protected(why);
    }
    match rules.response.action {
        Action::Ban => {}
        Action::Alert => return Verdict::Alert(AlertReason::ActionAlert),
        Action::Hook => return Verdict::Alert(AlertReason::ActionHook),
    }
    if !rules.response.ban_on_unverified
        && !probes.iter().any(|p| p.verified && p.kind.proves_source())
    {
        return Verdict::Alert(AlertReason::Unverified);
    }
    if !already_banned && cap_reached(active_bans, &rules.response) {
        return Verdict::Alert(AlertReason::CapReached);
    }
    Verdict::Ban
}

/// True when a policy with `active_bans` in force may not add another.
pub fn cap_reached(active_bans: usize, response: &Response) -> bool {
    active_bans >= response.max_active_bans as usize
}

/// Ban length for the `offences`-th offence: `banDuration` doubled per earlier offence
/// (when escalation is on), never above `maxBanDuration`.
pub fn ban_duration(response: &Response, offences: u32) -> StdDuration {
    let base = response.ban_duration.as_std();
    let cap = response.max_ban_duration.as_std();
    let doublings = if response.escalation.enabled {
        offences.saturating_sub(1)
    } else {
        0
    };
    let factor = 1u32.checked_shl(doublings).filter(|f| *f != 0);
    factor
        .and_then(|f| base.checked_mul(f))
        .unwrap_or(cap)
        .min(cap)
}

/// One detection the operator accepted for banning.
#[derive(Clone, Debug)]
pub struct Offence<'a> {
    pub policy: PolicyRef,
    pub source: SourcePrefix,
    /// "namespace/pod" or "node/name", from the reporter's authenticated identity.
    pub reporter: &'a str,
    pub probes: &'a [Probe],
    pub now: Timestamp,
}

fn whole_seconds(t: Timestamp) -> Result<Timestamp> {
    Ok(Timestamp::from_second(t.as_second())?)
}

/// True when `spec` is in force at `now` (no expiry means until deleted).
pub fn is_active(spec: &PortSentryBanSpec, now: Timestamp) -> bool {
    spec.expires_at.as_ref().is_none_or(|t| t.0 > now)
}

/// Until when an offence recorded in `spec` counts towards escalation: its lastSeen (else
/// firstSeen) plus the escalation window. `None` when escalation is off or the ban records
/// no time (a hand-made ban): then nothing is remembered.
pub fn remembered_until(response: &Response, spec: &PortSentryBanSpec) -> Option<Timestamp> {
    if !response.escalation.enabled {
        return None;
    }
    let seen = spec.last_seen.as_ref().or(spec.first_seen.as_ref())?.0;
    let window = jiff::SignedDuration::try_from(response.escalation.window.as_std()).ok()?;
    Some(seen.checked_add(window).unwrap_or(Timestamp::MAX))
}

/// The spec after `offence`, given the ban that exists for the same source, if any.
///
/// - A ban still in force is refreshed (lastSeen, evidence) but neither counted again nor
///   lengthened: a batch of reports about one scan is one offence.
/// - Otherwise, an earlier offence whose lastSeen is within the escalation window counts:
///   offences grows by one and the duration doubles (capped). Outside it, the count restarts.
pub fn next_spec(
    response: &Response,
    existing: Option<&PortSentryBanSpec>,
    offence: &Offence<'_>,
) -> Result<PortSentryBanSpec> {
    let now = whole_seconds(offence.now)?;
    let fresh = evidence_of(offence, now);
    if let Some(ban) = existing.filter(|b| is_active(b, now)) {
        return Ok(PortSentryBanSpec {
            last_seen: Some(Time(now)),
            evidence: merge_evidence(&ban.evidence, fresh),
            ..ban.clone()
        });
    }
    let repeat = existing.filter(|ban| remembered_until(response, ban).is_some_and(|t| now <= t));
    let (offences, first_seen, earlier) = match repeat {
        Some(ban) => (
            ban.offences.saturating_add(1),
            ban.first_seen.clone().unwrap_or(Time(now)),
            ban.evidence.as_slice(),
        ),
        None => (1, Time(now), &[][..]),
    };
    let duration = ban_duration(response, offences);
    let expires = now.checked_add(duration)?;
    let expires = if expires.subsec_nanosecond() > 0 {
        Timestamp::from_second(expires.as_second() + 1)?
    } else {
        expires
    };
    Ok(PortSentryBanSpec {
        source: offence.source,
        policy: offence.policy.clone(),
        first_seen: Some(first_seen),
        last_seen: Some(Time(now)),
        offences,
        expires_at: Some(Time(expires)),
        reason: Some(reason(offence, offences)),
        evidence: merge_evidence(earlier, fresh),
    })
}

fn evidence_of(offence: &Offence<'_>, now: Timestamp) -> Vec<Evidence> {
    offence
        .probes
        .iter()
        .map(|p| Evidence {
            port: p.port,
            protocol: p.protocol,
            kind: p.kind,
            verified: p.verified,
            reporter: names::bounded(offence.reporter, 253),
            observed_at: Time(
                i64::try_from(p.observed_at_ms)
                    .ok()
                    .and_then(|ms| Timestamp::from_millisecond(ms).ok())
                    .and_then(|t| whole_seconds(t).ok())
                    .unwrap_or(now),
            ),
        })
        .collect()
}

/// Old and new evidence, duplicates dropped, oldest first, the newest `MAX_EVIDENCE` kept.
pub fn merge_evidence(old: &[Evidence], new: Vec<Evidence>) -> Vec<Evidence> {
    let mut all: Vec<Evidence> = old.to_vec();
    for e in new {
        if !all.contains(&e) {
            all.push(e);
        }
    }
    all.sort_by_key(|e| e.observed_at.0);
    let drop = all.len().saturating_sub(MAX_EVIDENCE);
    all.split_off(drop)
}

fn reason(offence: &Offence<'_>, offences: u32) -> String {
    let mut ports: Vec<String> = offence
        .probes
        .iter()
        .map(|p| format!("{}/{}", p.protocol.as_str(), p.port))
        .collect();
    ports.sort();
    ports.dedup();
    let shown = ports.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    let more = ports.len().saturating_sub(8);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    let text = format!(
        "offence {offences}: touched decoys {shown}{more}, reported by {}",
        offence.reporter
    );
    text.chars().take(256).collect()
}

/// Deterministic name of the ban of `source` under `policy_name`: `<policy>-v4-203-0-113-7`,
/// `<policy>-v4-198-51-100-0-24`, `<policy>-v6-2001-db8--7-128`. Always a DNS-1123 subdomain;
/// cut with a hash suffix when too long.
pub fn ban_name(policy_name: &str, source: &SourcePrefix) -> String {
    let net = source.network();
    let address = match net {
        IpNet::V4(v4) if v4.prefix_len() == 32 => format!("v4-{}", v4.addr()).replace('.', "-"),
        IpNet::V4(v4) => format!("v4-{}-{}", v4.addr(), v4.prefix_len()).replace('.', "-"),
        IpNet::V6(v6) => format!("v6-{}-{}", v6.addr(), v6.prefix_len()).replace(':', "-"),
    };
    names::bounded(&format!("{policy_name}-{address}"), names::MAX_NAME)
}

/// When to look at `spec` again: at its expiry (zero if already past); never if it has none.
pub fn requeue_after(now: Timestamp, spec: &PortSentryBanSpec) -> Option<StdDuration> {
    let expires = spec.expires_at.as_ref()?;
    let left = expires.0.duration_since(now);
    Some(if left.is_negative() {
        StdDuration::ZERO
    } else {
        left.unsigned_abs()
    })
}

/// True when `spec` has lifted at `now`.
pub fn is_expired(now: Timestamp, spec: &PortSentryBanSpec) -> bool {
    !is_active(spec, now)
}

#[cfg(test)]
mod tests {
    use portsentry_crds::{Duration, Escalation, PolicyKind, ProbeKind, Protocol};

    use super::*;

    fn prefix(text: &str) -> SourcePrefix {
        text.parse().unwrap()
    }

    fn addrs(texts: &[&str]) -> Vec<IpAddr> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn check(source: &str) -> Option<Protection> {
        protected(
            &prefix(source),
            &[prefix("192.0.2.0/24")],
            &addrs(&["10.0.0.10"]),
            &addrs(&["10.96.0.1"]),
            &addrs(&["10.244.1.5"]),
        )
    }

    #[test]
    fn an_ordinary_scanner_is_not_protected() {
        assert_eq!(check("203.0.113.7"), None);
        assert_eq!(check("2001:db8::7"), None);
    }

    #[test]
    fn loopback_unspecified_link_local_multicast_and_broadcast_are_never_banned() {
        assert_eq!(check("127.0.0.1"), Some(Protection::Loopback));
        assert_eq!(check("::1"), Some(Protection::Loopback));
        assert_eq!(check("0.0.0.0"), Some(Protection::Unspecified));
        assert_eq!(check("::"), Some(Protection::Unspecified));
        assert_eq!(check("169.254.169.254"), Some(Protection::LinkLocal));
        assert_eq!(check("fe80::1"), Some(Protection::LinkLocal));
        assert_eq!(check("239.1.2.3"), Some(Protection::Multicast));
        assert_eq!(check("ff02::1"), Some(Protection::Multicast));
        assert_eq!(check("255.255.255.255"), Some(Protection::Broadcast));
    }

    #[test]
    fn ignored_prefixes_nodes_apiserver_and_operator_are_never_banned() {
        assert_eq!(check("192.0.2.44"), Some(Protection::Ignored));
        assert_eq!(check("10.0.0.10"), Some(Protection::Node));
        assert_eq!(check("10.96.0.1"), Some(Protection::ApiServer));
        assert_eq!(check("10.244.1.5"), Some(Protection::Operator));
    }

    #[test]
    fn a_prefix_containing_a_protected_address_is_protected() {
        assert_eq!(check("10.0.0.0/24"), Some(Protection::Node));
        assert_eq!(check("0.0.0.0/0"), Some(Protection::Loopback));
        assert_eq!(check("192.0.0.0/16"), Some(Protection::Ignored));
    }

    fn with_pod_range(range: &str) -> Guards {
        Guards {
            pod_nets: vec![range.parse().unwrap()],
            ..Guards::default()
        }
    }

    #[test]
    fn a_source_inside_the_pod_ranges_is_a_pod_source() {
        let guards = with_pod_range("10.244.0.0/16");
        assert!(guards.is_pod_source(&prefix("10.244.3.7")));
        assert!(!guards.is_pod_source(&prefix("203.0.113.7")));
    }

    #[test]
    fn a_prefix_holding_pod_addresses_is_a_pod_source() {
        let guards = with_pod_range("10.244.0.0/16");
        assert!(guards.is_pod_source(&prefix("10.0.0.0/8")));
    }

    #[test]
    fn an_ipv4_mapped_pod_range_or_source_counts_as_ipv4() {
        let mapped_range = Guards {
            pod_nets: vec!["::ffff:10.244.0.0/112".parse().unwrap()],
            ..Guards::default()
        };
        assert!(mapped_range.is_pod_source(&prefix("10.244.3.7")));
        let guards = with_pod_range("10.244.0.0/16");
        assert!(guards.is_pod_source(&prefix("::ffff:10.244.3.7")));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_the_ipv4_it_maps() {
        assert_eq!(check("::ffff:127.0.0.1"), Some(Protection::Loopback));
        assert_eq!(check("::ffff:10.0.0.10"), Some(Protection::Node));
        assert_eq!(check("::ffff:203.0.113.7"), None);
    }

    fn infrastructure() -> Guards {
        Guards {
            infra_pod_addrs: addrs(&["10.244.0.7"]),
            service_addrs: addrs(&["10.96.0.10", "10.96.4.4"]),
            dns_addrs: addrs(&["10.96.0.10"]),
            protected_nets: vec!["198.51.100.0/24".parse().unwrap()],
            protected_namespaces: ["operators".to_owned()].into(),
            ..Guards::default()
        }
    }

    fn rotation(count: u16) -> Vec<SourcePrefix> {
        (1..=count)
            .map(|i| prefix(&format!("2001:db8:1:2::{i:x}")))
            .collect()
    }

    #[test]
    fn an_ipv6_address_is_banned_alone_until_enough_of_its_64_are_banned() {
        let grouping = Ipv6Grouping::default();
        let next = prefix("2001:db8:1:2::99");
        assert_eq!(ipv6_group(&next, &rotation(3), grouping), None);
        assert_eq!(
            ipv6_group(&next, &rotation(4), grouping),
            Some(prefix("2001:db8:1:2::/64"))
        );
    }

    #[test]
    fn once_the_64_is_banned_its_addresses_fold_into_it() {
        let banned = [prefix("2001:db8:1:2::/64")];
        assert_eq!(
            ipv6_group(
                &prefix("2001:db8:1:2::abcd"),
                &banned,
                Ipv6Grouping::default()
            ),
            Some(prefix("2001:db8:1:2::/64"))
        );
    }

    #[test]
    fn addresses_of_other_networks_and_the_source_itself_do_not_count() {
        let mut banned: Vec<SourcePrefix> = (1..=4u16)
            .map(|i| prefix(&format!("2001:db8:9:9::{i:x}")))
            .collect();
        banned.push(prefix("2001:db8:1:2::99"));
        assert_eq!(
            ipv6_group(
                &prefix("2001:db8:1:2::99"),
                &banned,
                Ipv6Grouping::default()
            ),
            None
        );
    }

    #[test]
    fn ipv4_and_ipv4_mapped_sources_are_never_grouped() {
        let grouping = Ipv6Grouping {
            prefix_len: 64,
            after: 1,
        };
        let v4 = [prefix("203.0.113.1"), prefix("203.0.113.2")];
        assert_eq!(ipv6_group(&prefix("203.0.113.3"), &v4, grouping), None);
        let mapped = [prefix("::ffff:203.0.113.1")];
        assert_eq!(
            ipv6_group(&prefix("::ffff:203.0.113.3"), &mapped, grouping),
            None
        );
    }

    #[test]
    fn the_group_length_is_configurable() {
        let grouping = Ipv6Grouping {
            prefix_len: 56,
            after: 2,
        };
        let banned = [prefix("2001:db8:1:2::1"), prefix("2001:db8:1:3::1")];
        assert_eq!(
            ipv6_group(&prefix("2001:db8:1:4::1"), &banned, grouping),
            Some(prefix("2001:db8:1::/56"))
        );
    }

    #[test]
    fn pods_of_protected_namespaces_services_dns_and_protected_cidrs_are_never_banned() {
        let guards = infrastructure();
        let check = |s: &str| guards.protected(&prefix(s), &[]);
        assert_eq!(check("10.244.0.7"), Some(Protection::ProtectedNamespace));
        assert_eq!(check("10.96.0.10"), Some(Protection::ClusterDns));
        assert_eq!(check("10.96.4.4"), Some(Protection::Service));
        assert_eq!(check("198.51.100.9"), Some(Protection::ProtectedCidr));
        assert_eq!(check("10.96.0.0/16"), Some(Protection::ClusterDns));
        assert_eq!(
            check("::ffff:10.244.0.7"),
            Some(Protection::ProtectedNamespace)
        );
        assert_eq!(check("10.244.0.8"), None);
    }

    #[test]
    fn kube_system_and_listed_namespaces_are_protected() {
        let guards = infrastructure();
        assert!(guards.protects_namespace("kube-system"));
        assert!(guards.protects_namespace("operators"));
        assert!(!guards.protects_namespace("shop"));
    }

    fn probe(kind: ProbeKind, verified: bool, port: u16, at_ms: u64) -> Probe {
        Probe {
            port,
            protocol: if kind == ProbeKind::Datagram {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            kind,
            verified,
            observed_at_ms: at_ms,
        }
    }

    fn connect(port: u16) -> Probe {
        probe(ProbeKind::Connect, true, port, 1_780_000_000_000)
    }

    #[test]
    fn verified_evidence_bans() {
        let v = judge(
            &PolicyRules::default(),
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[connect(1)],
            0,
            false,
        );
        assert_eq!(v, Verdict::Ban);
    }

    #[test]
    fn unverified_evidence_only_alerts_by_default() {
        let syn = probe(ProbeKind::Syn, false, 1, 0);
        let v = judge(
            &PolicyRules::default(),
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[syn],
            0,
            false,
        );
        assert_eq!(v, Verdict::Alert(AlertReason::Unverified));
        let mut rules = PolicyRules::default();
        rules.response.ban_on_unverified = true;
        let v = judge(
            &rules,
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[syn],
            0,
            false,
        );
        assert_eq!(v, Verdict::Ban);
    }

    #[test]
    fn alert_and_hook_actions_never_ban() {
        let mut rules = PolicyRules::default();
        rules.response.action = Action::Alert;
        let v = judge(
            &rules,
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[connect(1)],
            0,
            false,
        );
        assert_eq!(v, Verdict::Alert(AlertReason::ActionAlert));
        rules.response.action = Action::Hook;
        let v = judge(
            &rules,
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[connect(1)],
            0,
            false,
        );
        assert_eq!(v, Verdict::Alert(AlertReason::ActionHook));
    }

    #[test]
    fn the_cap_stops_new_bans_but_not_updates_of_existing_ones() {
        let mut rules = PolicyRules::default();
        rules.response.max_active_bans = 2;
        let g = Guards::default();
        let s = prefix("203.0.113.7");
        assert_eq!(judge(&rules, &g, &s, &[connect(1)], 1, false), Verdict::Ban);
        assert_eq!(
            judge(&rules, &g, &s, &[connect(1)], 2, false),
            Verdict::Alert(AlertReason::CapReached)
        );
        assert_eq!(judge(&rules, &g, &s, &[connect(1)], 2, true), Verdict::Ban);
    }

    #[test]
    fn protection_wins_over_everything() {
        let mut rules = PolicyRules::default();
        rules.detection.ignore = vec![prefix("203.0.113.0/24")];
        let v = judge(
            &rules,
            &Guards::default(),
            &prefix("203.0.113.7"),
            &[connect(1)],
            0,
            false,
        );
        assert_eq!(v, Verdict::Protected(Protection::Ignored));
    }

    fn response(base: u64, max: u64, window: u64) -> Response {
        Response {
            ban_duration: Duration::from_secs(base),
            max_ban_duration: Duration::from_secs(max),
            escalation: Escalation {
                enabled: true,
                window: Duration::from_secs(window),
            },
            ..Response::default()
        }
    }

    #[test]
    fn duration_doubles_per_earlier_offence_up_to_the_cap() {
        let r = response(60, 1000, 3600);
        let secs: Vec<u64> = (1..=6).map(|n| ban_duration(&r, n).as_secs()).collect();
        assert_eq!(secs, vec![60, 120, 240, 480, 960, 1000]);
        assert_eq!(ban_duration(&r, u32::MAX).as_secs(), 1000);
    }

    #[test]
    fn without_escalation_every_ban_has_the_base_duration() {
        let mut r = response(60, 1000, 3600);
        r.escalation.enabled = false;
        assert_eq!(ban_duration(&r, 5).as_secs(), 60);
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn offence<'a>(probes: &'a [Probe], now: Timestamp) -> Offence<'a> {
        Offence {
            policy: PolicyRef {
                kind: PolicyKind::PortSentryPolicy,
                name: "web".into(),
            },
            source: prefix("203.0.113.7"),
            reporter: "shop/web-0",
            probes,
            now,
        }
    }

    const T0: i64 = 1_780_000_000;

    #[test]
    fn a_first_offence_bans_for_the_base_duration() {
        let probes = [connect(1), connect(7)];
        let spec = next_spec(&response(60, 1000, 3600), None, &offence(&probes, at(T0))).unwrap();
        assert_eq!(spec.offences, 1);
        assert_eq!(spec.first_seen, Some(Time(at(T0))));
        assert_eq!(spec.last_seen, Some(Time(at(T0))));
        assert_eq!(spec.expires_at, Some(Time(at(T0 + 60))));
        assert_eq!(spec.evidence.len(), 2);
        assert_eq!(spec.evidence[0].reporter, "shop/web-0");
        assert!(spec.reason.unwrap().contains("TCP/1, TCP/7"));
    }

    #[test]
    fn a_repeat_within_the_window_after_expiry_doubles() {
        let r = response(60, 1000, 3600);
        let probes = [connect(1)];
        let first = next_spec(&r, None, &offence(&probes, at(T0))).unwrap();
        let second = next_spec(&r, Some(&first), &offence(&probes, at(T0 + 600))).unwrap();
        assert_eq!(second.offences, 2);
        assert_eq!(second.first_seen, Some(Time(at(T0))));
        assert_eq!(second.expires_at, Some(Time(at(T0 + 600 + 120))));
    }

    #[test]
    fn a_repeat_after_the_window_starts_over() {
        let r = response(60, 1000, 3600);
        let probes = [connect(1)];
        let first = next_spec(&r, None, &offence(&probes, at(T0))).unwrap();
        let later = next_spec(&r, Some(&first), &offence(&probes, at(T0 + 7200))).unwrap();
        assert_eq!(later.offences, 1);
        assert_eq!(later.first_seen, Some(Time(at(T0 + 7200))));
        assert_eq!(later.expires_at, Some(Time(at(T0 + 7200 + 60))));
    }

    #[test]
    fn an_offence_is_remembered_until_its_last_sighting_plus_the_window() {
        let r = response(60, 1000, 3600);
        let first = next_spec(&r, None, &offence(&[connect(1)], at(T0))).unwrap();
        assert_eq!(remembered_until(&r, &first), Some(at(T0 + 3600)));
        let last_moment = next_spec(&r, Some(&first), &offence(&[connect(1)], at(T0 + 3600)));
        assert_eq!(last_moment.unwrap().offences, 2);
        let mut off = r;
        off.escalation.enabled = false;
        assert_eq!(remembered_until(&off, &first), None);
    }

    #[test]
    fn repeats_double_the_ban_only_up_to_max_ban_duration() {
        let r = response(60, 100, 3600);
        let first = next_spec(&r, None, &offence(&[connect(1)], at(T0))).unwrap();
        let second = next_spec(&r, Some(&first), &offence(&[connect(1)], at(T0 + 70))).unwrap();
        assert_eq!(second.offences, 2);
        assert_eq!(second.expires_at, Some(Time(at(T0 + 70 + 100))));
    }

    #[test]
    fn reports_during_an_active_ban_refresh_it_without_counting_or_lengthening() {
        let r = response(60, 1000, 3600);
        let first = next_spec(&r, None, &offence(&[connect(1)], at(T0))).unwrap();
        let again_probes = [probe(ProbeKind::Connect, true, 9, 1_780_000_010_000)];
        let again = next_spec(&r, Some(&first), &offence(&again_probes, at(T0 + 10))).unwrap();
        assert_eq!(again.offences, 1);
        assert_eq!(again.expires_at, first.expires_at);
        assert_eq!(again.last_seen, Some(Time(at(T0 + 10))));
        assert_eq!(again.evidence.len(), 2);
    }

    #[test]
    fn evidence_keeps_only_the_newest_entries() {
        let r = response(60, 1000, 3600);
        let probes: Vec<Probe> = (1..=40u16)
            .map(|p| {
                probe(
                    ProbeKind::Connect,
                    true,
                    p,
                    1_780_000_000_000 + u64::from(p) * 1000,
                )
            })
            .collect();
        let spec = next_spec(&r, None, &offence(&probes, at(T0 + 100))).unwrap();
        assert_eq!(spec.evidence.len(), MAX_EVIDENCE);
        assert_eq!(spec.evidence.first().unwrap().port, 9);
        assert_eq!(spec.evidence.last().unwrap().port, 40);
    }

    #[test]
    fn sub_second_times_are_dropped_and_expiry_is_whole_seconds() {
        let now = Timestamp::from_millisecond(T0 * 1000 + 999).unwrap();
        let spec = next_spec(
            &response(60, 1000, 3600),
            None,
            &offence(&[connect(1)], now),
        )
        .unwrap();
        assert_eq!(spec.last_seen, Some(Time(at(T0))));
        assert_eq!(spec.expires_at, Some(Time(at(T0 + 60))));
    }

    #[test]
    fn ban_names_spell_the_source() {
        assert_eq!(
            ban_name("web", &prefix("203.0.113.7")),
            "web-v4-203-0-113-7"
        );
        assert_eq!(
            ban_name("web", &prefix("198.51.100.0/24")),
            "web-v4-198-51-100-0-24"
        );
        assert_eq!(
            ban_name("web", &prefix("2001:db8::7")),
            "web-v6-2001-db8--7-128"
        );
        assert_eq!(
            ban_name("web", &prefix("2001:db8::/32")),
            "web-v6-2001-db8---32"
        );
        assert_eq!(ban_name("web", &prefix("::1")), "web-v6---1-128");
    }

    #[test]
    fn ban_names_of_long_policies_stay_valid_and_distinct() {
        let long = "p".repeat(250);
        let a = ban_name(&long, &prefix("2001:db8::7"));
        let b = ban_name(&long, &prefix("2001:db8::8"));
        assert!(names::is_dns_subdomain(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn requeue_is_exactly_at_expiry_and_never_negative() {
        let spec = next_spec(
            &response(60, 1000, 3600),
            None,
            &offence(&[connect(1)], at(T0)),
        )
        .unwrap();
        assert_eq!(
            requeue_after(at(T0 + 15), &spec),
            Some(StdDuration::from_secs(45))
        );
        assert_eq!(requeue_after(at(T0 + 90), &spec), Some(StdDuration::ZERO));
        assert!(!is_expired(at(T0 + 59), &spec));
        assert!(is_expired(at(T0 + 60), &spec));
    }

    #[test]
    fn a_ban_without_expiry_holds_until_deleted() {
        let spec = PortSentryBanSpec {
            source: prefix("203.0.113.7"),
            policy: PolicyRef {
                kind: PolicyKind::PortSentryPolicy,
                name: "web".into(),
            },
            first_seen: None,
            last_seen: None,
            offences: 1,
            expires_at: None,
            reason: None,
            evidence: Vec::new(),
        };
        assert_eq!(requeue_after(at(T0), &spec), None);
        assert!(!is_expired(at(i64::from(i32::MAX)), &spec));
    }
}
