//! Node sensors' enforcement: watch one cluster policy's PortSentryBans in the operator's
//! namespace and keep this node's nftables sets equal to them (level-triggered, every few seconds).
//!
//! ```text
//!  API server ──watch PortSentryBans (namespace)──▶ store ─┐  on change or every resync:
//!  ignore file, own addresses, API server address ─────────┼─▶ desired() (pure) ─▶ NftBans::reconcile
//!                                                          └─ metrics: enforced, skipped, errors
//! ```
//!
//! Elements are leased (at most 10 to 20 minutes, refreshed while the sensor runs), so a node
//! whose sensor is gone stops dropping on its own. Never installed: loopback and unspecified
//! addresses, this node's own addresses, the API server the sensor talks to, and the ignore
//! file's prefixes; nor is a prefix ban that contains one of them (it is refused as a whole,
//! as the operator refuses it). A ban of one address goes to the address sets, a prefix ban
//! of any size to the prefix (interval) sets as one range ([`NftBans::reconcile_nets`]).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use ipnet::IpNet;
use jiff::Timestamp;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use portsentry_crds::{PolicyRef, PortSentryBan};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::{
    config::load_ignore,
    error::{Error, Result},
    listen,
    metrics::Metrics,
    nft::NftBans,
};

/// Kernel elements are leased for one to two of these windows (see [`kernel_lease`]).
pub const LEASE: Duration = Duration::from_secs(600);
/// Never banned whatever the bans say.
const ALWAYS_PROTECTED: [&str; 4] = ["127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128"];

/// How the ban watch runs (`--watch-bans` and its companions).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's namespace, where cluster policies' bans live.
    pub namespace: String,
    /// Only bans of this policy are enforced.
    pub policy: PolicyRef,
    /// The sensor's own nftables table (family inet).
    pub table: String,
    /// Reconcile at least this often, changes or not.
    pub resync: Duration,
    /// The sensor config's ignore file, re-read on every pass.
    pub ignore_file: Option<PathBuf>,
}

/// Why a ban is not in the kernel sets (a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// Loopback, this node, the API server or an ignored prefix, or a prefix containing one;
    /// or a ban the operator marked protected (`Enforced=False`, `ProtectedSource`) or
    /// confined to one namespace (uncorroborated evidence).
    Protected,
}

impl Skip {
    pub const ALL: [Skip; 1] = [Skip::Protected];

    pub const fn label(self) -> &'static str {
        match self {
            Skip::Protected => "protected",
        }
    }
}

/// What the kernel sets should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Banned networks (an address as a /32 or /128) with their kernel timeout: the ban's
    /// remaining time, at most the lease.
    pub elements: Vec<(IpNet, Option<Duration>)>,
    /// Active bans of the policy left out, by reason.
    pub skipped: BTreeMap<Skip, usize>,
}

/// The networks never banned: loopback and unspecified, plus `extra` (own addresses, the
/// API server, the ignore list).
pub fn never_banned(extra: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    ALWAYS_PROTECTED
        .iter()
        .filter_map(|n| n.parse().ok())
        .chain(extra)
        .collect()
}

/// The kernel set contents for the active bans of `policy` among `bans` at `now`, leaving
/// out whatever overlaps `never`: a ban inside a protected network, and a prefix ban that
/// contains a protected address (refused as a whole, never installed minus the hole).
pub fn desired<'a>(
    bans: impl IntoIterator<Item = &'a PortSentryBan>,
    policy: &PolicyRef,
    never: &[IpNet],
    now: Timestamp,
) -> Desired {
    let mut confined = 0;
    let mine = bans
        .into_iter()
        .filter(|ban| ban.spec.policy == *policy)
        .filter(|ban| {
            // Evidence not yet corroborated acts only in one namespace, never on a node.
            let wide = portsentry_crds::cluster_wide(ban) || portsentry_crds::refused(ban);
            confined += usize::from(!wide);
            wide
        });
    let mut want = elements(mine, never, now);
    if confined > 0 {
        *want.skipped.entry(Skip::Protected).or_default() += confined;
    }
    want
}

/// The kernel set contents for `bans` (whatever their policy) at `now`: expired bans and
/// bans the operator refused (`ProtectedSource`) are left out, and so is whatever overlaps
/// `never` (a ban inside a protected network, and a prefix ban that contains a protected
/// address: refused as a whole, never installed minus the hole). Each element's timeout is
/// the ban's remaining time, at most the [`kernel_lease`].
pub fn elements<'a>(
    bans: impl IntoIterator<Item = &'a PortSentryBan>,
    never: &[IpNet],
    now: Timestamp,
) -> Desired {
    let mut want: BTreeMap<IpNet, Option<Duration>> = BTreeMap::new();
    let mut skipped: BTreeMap<Skip, usize> = BTreeMap::new();
    for ban in bans {
        // The operator's word: protected infrastructure.
        if portsentry_crds::refused(ban) {
            *skipped.entry(Skip::Protected).or_default() += 1;
            continue;
        }
        let remaining = match &ban.spec.expires_at {
            None => None,
            Some(at) => match at.0.duration_since(now) {
                left if left.is_positive() => Some(left.unsigned_abs()),
                _ => continue,
            },
        };
        // IPv4-mapped sources arrive as IPv4 (normalised where SourcePrefix is parsed).
        let net = ban.spec.source.network();
        let overlaps = |n: &IpNet| n.contains(&net.network()) || net.contains(&n.network());
        if never.iter().any(overlaps) {
            *skipped.entry(Skip::Protected).or_default() += 1;
            continue;
        }
        // Two bans of one network: the longer one wins. Overlapping networks are merged by
        // NftBans (each address gets the longest timeout).
        let entry = want.entry(net).or_insert(remaining);
        *entry = match (*entry, remaining) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
    }
    let lease = kernel_lease(now);
    Desired {
        elements: want
            .into_iter()
            .map(|(net, left)| (net, Some(left.map_or(lease, |l| l.min(lease)))))
            .collect(),
        skipped,
    }
}

/// The longest timeout an element gets: until the end of the next [`LEASE`] window after
/// the current one (10 to 20 minutes). Reconciles within one window want the same expiry
/// instant, so nothing is rewritten; each new window extends every element once. A node
/// whose sensor is gone (DaemonSet deleted, node unselected) thus drops nobody for longer
/// than two windows, while a running sensor keeps its bans, however long, in force.
pub fn kernel_lease(now: Timestamp) -> Duration {
    let lease = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    let now = now.as_millisecond();
    let horizon = (now.div_euclid(lease) + 2) * lease;
    Duration::from_millis(u64::try_from(horizon - now).unwrap_or(0))
}

/// The ban watch's metrics (registered with the sensor's).
#[derive(Clone, Debug)]
struct Counters {
    enforced: IntGauge,
    skipped: IntGaugeVec,
    errors: IntCounterVec,
    reconciles: IntCounterVec,
}

impl Counters {
    fn register(metrics: &Metrics) -> Result<Self> {
        let enforced = IntGauge::new(
            "node_bans_enforced",
            "Cluster bans (addresses and prefixes) in this node sensor's nftables sets.",
        )?;
        let skipped = IntGaugeVec::new(
            Opts::new(
                "node_bans_skipped",
                "Active cluster bans left out of the nftables sets, by reason.",
            ),
            &["reason"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "node_ban_errors_total",
                "Failed ban-watch steps, by kind (watch: the API server, nftables: the kernel).",
            ),
            &["kind"],
        )?;
        let reconciles = IntCounterVec::new(
            Opts::new(
                "node_ban_reconciles_total",
                "Reconciles of the nftables sets to the cluster bans, by result.",
            ),
            &["result"],
        )?;
        for skip in Skip::ALL {
            skipped.with_label_values(&[skip.label()]).set(0);
        }
        for kind in ["watch", "nftables"] {
            errors.with_label_values(&[kind]);
        }
        metrics.register(Box::new(enforced.clone()))?;
        metrics.register(Box::new(skipped.clone()))?;
        metrics.register(Box::new(errors.clone()))?;
        metrics.register(Box::new(reconciles.clone()))?;
        Ok(Self {
            enforced,
            skipped,
            errors,
            reconciles,
        })
    }
}

/// The API server's address when its URL names one by IP: never banned.
pub fn apiserver_address(config: &kube::Config) -> Option<IpAddr> {
    config
        .cluster_url
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Connects to the API server (KUBECONFIG, else in-cluster), opens the nftables table and
/// starts the watch and reconcile tasks. Fails when either cannot be had: a node sensor
/// that cannot enforce must say so at start.
pub async fn start(settings: Settings, metrics: &Metrics) -> Result<()> {
    let config = kube::Config::infer().await.map_err(|e| {
        Error::BanWatch(format!(
            "no Kubernetes API configuration ({e}); run in a pod with a service account, or set KUBECONFIG"
        ))
    })?;
    let apiserver = apiserver_address(&config);
    let client = Client::try_from(config)
        .map_err(|e| Error::BanWatch(format!("cannot build the API client: {e}")))?;
    let nft = NftBans::open(&settings.table).map_err(|e| Error::Enforcer(e.to_string()))?;
    let counters = Counters::register(metrics)?;
    let api = Api::<PortSentryBan>::namespaced(client, &settings.namespace);
    let (store, writer) = reflector::store();
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    let watch_errors = counters.errors.clone();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        events
            .for_each(|event| {
                if let Err(error) = event {
                    watch_errors.with_label_values(&["watch"]).inc();
                    tracing::warn!(%error, "watching PortSentryBans failed; retrying");
                }
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    let span = tracing::info_span!(
        "ban_watch",
        namespace = %settings.namespace,
        policy = %settings.policy.name,
        table = %settings.table
    );
    tokio::spawn(
        reconcile_task(settings, store, changed, Arc::new(nft), apiserver, counters)
            .instrument(span),
    );
    Ok(())
}

/// What never gets banned right now: loopback, own addresses, the API server, the ignore
/// file (re-read on every call).
pub fn protected_now(ignore_file: Option<&Path>, apiserver: Option<IpAddr>) -> Vec<IpNet> {
    let ignore = ignore_file
        .and_then(|path| match load_ignore(path) {
            Ok(list) => list,
            Err(error) => {
                tracing::warn!(%error, "ignore file unreadable; only loopback, own and API server addresses are protected");
                None
            }
        })
        .unwrap_or_default();
    never_banned(
        listen::own_addresses()
            .into_iter()
            .chain(apiserver)
            .map(IpNet::from)
            .chain(ignore),
    )
}

async fn reconcile_task(
    settings: Settings,
    store: reflector::Store<PortSentryBan>,
    changed: Arc<Notify>,
    nft: Arc<NftBans>,
    apiserver: Option<IpAddr>,
    counters: Counters,
) {
    // An empty store before the first list would read as "no bans" and empty the sets.
    if store.wait_until_ready().await.is_err() {
        tracing::error!("the ban watch stopped before its first list");
        return;
    }
    tracing::info!("watching cluster bans");
    let mut last_error: Option<String> = None;
    let mut last_count: Option<usize> = None;
    loop {
        let bans = store.state();
        let never = protected_now(settings.ignore_file.as_deref(), apiserver);
        let want = desired(
            bans.iter().map(AsRef::as_ref),
            &settings.policy,
            &never,
            Timestamp::now(),
        );
        for skip in Skip::ALL {
            let count = want.skipped.get(&skip).copied().unwrap_or(0);
            counters
                .skipped
                .with_label_values(&[skip.label()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let count = want.elements.len();
        let kernel = nft.clone();
        let result =
            tokio::task::spawn_blocking(move || kernel.reconcile_nets(&want.elements)).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(join) => Some(join.to_string()),
        };
        match error {
            None => {
                counters.reconciles.with_label_values(&["ok"]).inc();
                counters
                    .enforced
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
                if last_count != Some(count) {
                    tracing::info!(bans = count, "nftables sets equal the cluster bans");
                    last_count = Some(count);
                }
                last_error = None;
            }
            Some(text) => {
                counters.reconciles.with_label_values(&["error"]).inc();
                counters.errors.with_label_values(&["nftables"]).inc();
                if last_error.as_deref() != Some(&text) {
                    tracing::error!(error = %text, "cannot reconcile the nftables sets to the cluster bans; retrying");
                }
                last_error = Some(text);
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(settings.resync) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portsentry_crds::{PolicyKind, PortSentryBanSpec};

    use super::*;

    const T0: i64 = 1_780_000_000;

    fn edge() -> PolicyRef {
        PolicyRef {
            kind: PolicyKind::ClusterPortSentryPolicy,
            name: "edge".into(),
        }
    }

    fn ban(policy: PolicyRef, source: &str, expires: Option<i64>) -> PortSentryBan {
        PortSentryBan::new(
            "b",
            PortSentryBanSpec {
                source: source.parse().unwrap(),
                policy,
                first_seen: None,
                last_seen: None,
                offences: 1,
                expires_at: expires.map(|s| Time(Timestamp::from_second(s).unwrap())),
                reason: None,
                evidence: Vec::new(),
            },
        )
    }

    #[test]
    fn bans_the_operator_refused_or_confined_to_one_namespace_are_never_installed() {
        let mut refused = ban(edge(), "10.96.0.10", None);
        refused.status = Some(portsentry_crds::BanStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Enforced".into(),
                status: "False".into(),
                reason: portsentry_crds::PROTECTED_SOURCE_REASON.into(),
                message: "never enforced: the source is protected (service)".into(),
                last_transition_time: Time(Timestamp::from_second(T0).unwrap()),
                observed_generation: None,
            }],
        });
        let mut confined = ban(edge(), "203.0.113.8", None);
        confined.metadata.labels = Some(BTreeMap::from([(
            portsentry_crds::CONFINED_LABEL.to_owned(),
            "shop".to_owned(),
        )]));
        let wide = ban(edge(), "203.0.113.9", None);
        let want = run(&[refused, confined, wide], &[]);
        assert_eq!(
            want.elements.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec!["203.0.113.9/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(want.skipped[&Skip::Protected], 2);
    }

    fn run(bans: &[PortSentryBan], never: &[IpNet]) -> Desired {
        desired(
            bans.iter(),
            &edge(),
            &never_banned(never.iter().copied()),
            Timestamp::from_second(T0).unwrap(),
        )
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// An address as the /32 or /128 element it becomes.
    fn host(text: &str) -> IpNet {
        IpNet::from(addr(text))
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn active_bans_of_the_policy_become_elements_with_their_remaining_time() {
        let bans = [
            ban(edge(), "203.0.113.7", Some(T0 + 90)),
            ban(edge(), "2001:db8::7", None),
        ];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![
                (host("203.0.113.7"), Some(Duration::from_secs(90))),
                (host("2001:db8::7"), Some(lease())),
            ]
        );
    }

    fn lease() -> Duration {
        kernel_lease(Timestamp::from_second(T0).unwrap())
    }

    #[test]
    fn bans_without_expiry_are_leased_for_one_to_two_windows() {
        let at = |s: i64| kernel_lease(Timestamp::from_second(s).unwrap());
        for s in [T0, T0 + 1, T0 + 599, T0 + 1234] {
            assert!(at(s) > LEASE && at(s) <= LEASE * 2, "{:?}", at(s));
        }
    }

    #[test]
    fn reconciles_within_one_window_want_the_same_expiry_instant() {
        let start = T0 - T0.rem_euclid(600);
        let at = |s: i64| kernel_lease(Timestamp::from_second(s).unwrap());
        assert_eq!(
            at(start + 10) + Duration::from_secs(10),
            at(start + 20) + Duration::from_secs(20)
        );
        assert_eq!(at(start + 600), LEASE * 2);
    }

    #[test]
    fn a_ban_ending_before_the_lease_keeps_its_own_end() {
        let bans = [ban(edge(), "203.0.113.7", Some(T0 + 5))];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![(host("203.0.113.7"), Some(Duration::from_secs(5)))]
        );
    }

    #[test]
    fn expired_bans_are_left_out() {
        let bans = [ban(edge(), "203.0.113.7", Some(T0 - 1))];
        assert!(run(&bans, &[]).elements.is_empty());
    }

    #[test]
    fn bans_of_other_policies_are_left_out() {
        let other = PolicyRef {
            kind: PolicyKind::ClusterPortSentryPolicy,
            name: "other".into(),
        };
        let namespaced = PolicyRef {
            kind: PolicyKind::PortSentryPolicy,
            name: "edge".into(),
        };
        let bans = [
            ban(other, "203.0.113.7", None),
            ban(namespaced, "203.0.113.8", None),
        ];
        assert!(run(&bans, &[]).elements.is_empty());
    }

    #[test]
    fn loopback_is_never_installed() {
        let bans = [
            ban(edge(), "127.0.0.1", None),
            ban(edge(), "::1", None),
            ban(edge(), "127.0.0.0/30", None),
        ];
        let want = run(&bans, &[]);
        assert!(want.elements.is_empty());
        assert_eq!(want.skipped.get(&Skip::Protected), Some(&3));
    }

    #[test]
    fn own_addresses_and_ignored_prefixes_are_never_installed() {
        let bans = [
            ban(edge(), "10.0.0.10", None),
            ban(edge(), "192.168.7.9", None),
            ban(edge(), "192.168.0.0/16", None),
            ban(edge(), "203.0.113.7", None),
        ];
        let never = [
            "10.0.0.10/32".parse().unwrap(),
            "192.168.7.0/24".parse().unwrap(),
        ];
        let want = run(&bans, &never);
        assert_eq!(want.elements, vec![(host("203.0.113.7"), Some(lease()))]);
        assert_eq!(want.skipped.get(&Skip::Protected), Some(&3));
    }

    #[test]
    fn a_prefix_containing_the_nodes_own_address_is_refused_as_a_whole() {
        let bans = [
            ban(edge(), "198.51.100.0/22", None),
            ban(edge(), "203.0.113.0/24", None),
        ];
        let want = run(&bans, &[host("198.51.102.9")]);
        assert_eq!(want.elements, vec![(net("203.0.113.0/24"), Some(lease()))]);
        assert_eq!(want.skipped.get(&Skip::Protected), Some(&1));
    }

    #[test]
    fn an_ipv6_prefix_containing_the_api_server_is_refused_as_a_whole() {
        let bans = [ban(edge(), "fd00:10::/64", None)];
        let want = run(&bans, &[host("fd00:10::1")]);
        assert!(want.elements.is_empty());
        assert_eq!(want.skipped.get(&Skip::Protected), Some(&1));
    }

    #[test]
    fn a_prefix_containing_loopback_is_refused() {
        let bans = [
            ban(edge(), "0.0.0.0/0", None),
            ban(edge(), "::/0", None),
            ban(edge(), "127.0.0.0/8", None),
        ];
        let want = run(&bans, &[]);
        assert!(want.elements.is_empty());
        assert_eq!(want.skipped.get(&Skip::Protected), Some(&3));
    }

    #[test]
    fn prefixes_of_any_size_are_installed_as_prefixes() {
        let bans = [
            ban(edge(), "198.51.100.0/30", None),
            ban(edge(), "198.51.0.0/16", Some(T0 + 60)),
            ban(edge(), "10.0.0.0/8", None),
            ban(edge(), "2001:db8:1:2::/64", None),
            ban(edge(), "2001:db8::/32", None),
        ];
        let want = run(&bans, &[]);
        assert_eq!(
            want.elements,
            vec![
                (net("10.0.0.0/8"), Some(lease())),
                (net("198.51.0.0/16"), Some(Duration::from_secs(60))),
                (net("198.51.100.0/30"), Some(lease())),
                (net("2001:db8::/32"), Some(lease())),
                (net("2001:db8:1:2::/64"), Some(lease())),
            ]
        );
        assert!(want.skipped.is_empty(), "{:?}", want.skipped);
    }

    #[test]
    fn a_prefix_ban_is_truncated_to_its_network() {
        let bans = [ban(edge(), "198.51.100.77/22", None)];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![(net("198.51.100.0/22"), Some(lease()))]
        );
    }

    #[test]
    fn the_longer_of_two_bans_of_one_source_wins() {
        let bans = [
            ban(edge(), "203.0.113.7", Some(T0 + 10)),
            ban(edge(), "203.0.113.7", Some(T0 + 50)),
            ban(edge(), "198.51.100.0/22", Some(T0 + 30)),
            ban(edge(), "198.51.100.0/22", None),
        ];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![
                (net("198.51.100.0/22"), Some(lease())),
                (host("203.0.113.7"), Some(Duration::from_secs(50))),
            ]
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_prefixes_are_installed_as_ipv4() {
        let bans = [ban(edge(), "::ffff:198.51.100.0/118", None)];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![(net("198.51.100.0/22"), Some(lease()))]
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_bans_are_installed_as_ipv4() {
        let bans = [ban(edge(), "::ffff:203.0.113.7", None)];
        assert_eq!(
            run(&bans, &[]).elements,
            vec![(host("203.0.113.7"), Some(lease()))]
        );
    }

    #[test]
    fn the_api_servers_address_is_read_from_an_ip_url() {
        let mut config = kube::Config::new("https://10.96.0.1:443".parse().unwrap());
        assert_eq!(apiserver_address(&config), Some(addr("10.96.0.1")));
        config.cluster_url = "https://kubernetes.default.svc".parse().unwrap();
        assert_eq!(apiserver_address(&config), None);
        config.cluster_url = "https://[fd00::1]:6443".parse().unwrap();
        assert_eq!(apiserver_address(&config), Some(addr("fd00::1")));
    }
}
