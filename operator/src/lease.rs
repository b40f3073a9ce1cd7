//! Leader election over a coordination.k8s.io Lease: a pure decision (`decide`, `next_spec`)
//! and a loop that renews it with optimistic concurrency; only the holder writes.
//!
//! The holder gives up (and the process stops writing) when it could not renew for
//! `renew_deadline` (2/3 of the lease), before any other replica may take the lease over.
//! A holder that stops (SIGTERM) releases the Lease ([`released`], [`release`]) so another
//! replica takes it over at its next attempt, within a second, not a lease duration.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{Error, Result};

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Nobody holds it or the holder let it expire: take it over.
    TakeOver,
    /// Another replica holds it: wait.
    Follow { holder: String },
}

/// Decides, for replica `me`, what to do with `lease` (absent: not created yet), which this
/// replica has seen unchanged for `unchanged_for` by its own clock. As in client-go, expiry
/// is judged by local observation, never by comparing another replica's timestamps with
/// ours: clock skew between nodes cannot make two holders.
pub fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    unchanged_for: Duration,
    default: Duration,
) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Step::Renew;
    }
    if holder.is_empty() {
        return Step::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default, Duration::from_secs);
    if unchanged_for >= duration {
        Step::TakeOver
    } else {
        Step::Follow {
            holder: holder.to_owned(),
        }
    }
}

/// What identifies one write of a Lease: its holder and renew time.
pub fn record(spec: Option<&LeaseSpec>) -> Option<(Option<String>, Option<Timestamp>)> {
    spec.map(|s| {
        (
            s.holder_identity.clone(),
            s.renew_time.as_ref().map(|t| t.0),
        )
    })
}

/// The Lease spec to write after `step` (never called for `Follow`).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    step: &Step,
    me: &str,
    now: Timestamp,
    duration: Duration,
) -> LeaseSpec {
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let transitions = current.and_then(|c| c.lease_transitions).unwrap_or(0);
    match step {
        Step::Renew => LeaseSpec {
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds),
            holder_identity: Some(me.to_owned()),
            ..current.cloned().unwrap_or_default()
        },
        _ => LeaseSpec {
            holder_identity: Some(me.to_owned()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_duration_seconds: Some(seconds),
            lease_transitions: Some(if matches!(step, Step::Create) {
                0
            } else {
                transitions.saturating_add(1)
            }),
            ..LeaseSpec::default()
        },
    }
}

/// The Lease spec a stopping holder writes, as client-go's `ReleaseOnCancel` does: no holder
/// (so [`decide`] takes it over at once), a one-second duration, the transitions kept.
pub fn released(current: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: current.lease_transitions,
        ..LeaseSpec::default()
    }
}

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl Settings {
    /// Give up holding if not renewed within this.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Time between two attempts: at most a second, so a released Lease is taken over
    /// within one.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 5).clamp(Duration::from_millis(200), Duration::from_secs(1))
    }
}

/// The Lease record last seen and when (by our clock) it was first seen.
type Observed = Option<(Option<(Option<String>, Option<Timestamp>)>, Instant)>;

/// One read-decide-write round: true when we hold the Lease after it.
async fn round(api: &Api<Lease>, settings: &Settings, observed: &mut Observed) -> Result<bool> {
    let current = api.get_opt(&settings.name).await?;
    let now = Timestamp::now();
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    let seen = record(spec);
    let since = match observed {
        Some((last, at)) if *last == seen => *at,
        _ => {
            let at = Instant::now();
            *observed = Some((seen, at));
            at
        }
    };
    let step = decide(spec, &settings.identity, since.elapsed(), settings.duration);
    if let Step::Follow { .. } = step {
        return Ok(false);
    }
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            namespace: Some(settings.namespace.clone()),
            resource_version: current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(next_spec(
            spec,
            &step,
            &settings.identity,
            now,
            settings.duration,
        )),
    };
    let written = match step {
        Step::Create => api.create(&PostParams::default(), &lease).await,
        _ => {
            api.replace(&settings.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(_) => Ok(true),
        // Someone else wrote first (409) or created it first (409 AlreadyExists).
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Releases the Lease if this replica holds it ([`released`]); true when it did. Call it
/// only once this replica has stopped writing. A conflict (a renewal of ours still landing)
/// is read again and retried.
pub async fn release(client: Client, settings: &Settings) -> Result<bool> {
    let api = Api::<Lease>::namespaced(client, &settings.namespace);
    for _ in 0..5 {
        let Some(mut lease) = api.get_opt(&settings.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_ref() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(released(spec, Timestamp::now()));
        lease.metadata.managed_fields = None;
        match api
            .replace(&settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Ok(false)
}

/// Holds the Lease while it can: `leader` says whether we hold it. Returns an error once
/// held and then lost (or not renewed within the deadline): the caller must stop writing.
pub async fn run(client: Client, settings: Settings, leader: watch::Sender<bool>) -> Result<()> {
    let api = Api::<Lease>::namespaced(client, &settings.namespace);
    let mut renewed: Option<Instant> = None;
    let mut observed: Observed = None;
    loop {
        let attempt = Instant::now();
        let held = match tokio::time::timeout(
            settings.renew_deadline(),
            round(&api, &settings, &mut observed),
        )
        .await
        {
            Ok(Ok(held)) => Some(held),
            Ok(Err(error)) => {
                warn!(%error, "lease round failed");
                None
            }
            Err(_) => {
                warn!("lease round timed out");
                None
            }
        };
        match (held, renewed) {
            (Some(true), None) => {
                info!(identity = %settings.identity, lease = %settings.name, "became the leader");
                renewed = Some(attempt);
                leader.send_replace(true);
            }
            (Some(true), Some(_)) => renewed = Some(attempt),
            (Some(false), Some(_)) => {
                leader.send_replace(false);
                return Err(Error::LeadershipLost("another replica holds the lease"));
            }
            (None, Some(at)) if at.elapsed() >= settings.renew_deadline() => {
                leader.send_replace(false);
                return Err(Error::LeadershipLost(
                    "the lease could not be renewed in time",
                ));
            }
            _ => {}
        }
        tokio::time::sleep(settings.retry_period()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_780_000_000 + second).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(at(renewed))),
            lease_duration_seconds: Some(15),
            lease_transitions: Some(2),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_lease_is_created() {
        assert_eq!(decide(None, "a", Duration::ZERO, D), Step::Create);
    }

    #[test]
    fn the_holder_renews_and_keeps_its_acquire_time() {
        let mut lease = held_by("a", 0);
        lease.acquire_time = Some(MicroTime(at(-100)));
        assert_eq!(decide(Some(&lease), "a", Duration::ZERO, D), Step::Renew);
        let next = next_spec(Some(&lease), &Step::Renew, "a", at(5), D);
        assert_eq!(next.acquire_time, Some(MicroTime(at(-100))));
        assert_eq!(next.renew_time, Some(MicroTime(at(5))));
        assert_eq!(next.lease_transitions, Some(2));
    }

    #[test]
    fn a_lease_of_another_replica_seen_renewed_recently_is_followed() {
        assert_eq!(
            decide(Some(&held_by("a", 0)), "b", Duration::from_secs(14), D),
            Step::Follow { holder: "a".into() }
        );
    }

    #[test]
    fn a_lease_seen_unchanged_for_its_duration_or_released_is_taken_over() {
        let lease = held_by("a", 0);
        assert_eq!(decide(Some(&lease), "b", D, D), Step::TakeOver);
        let next = next_spec(Some(&lease), &Step::TakeOver, "b", at(15), D);
        assert_eq!(next.holder_identity.as_deref(), Some("b"));
        assert_eq!(next.lease_transitions, Some(3));
        let mut released = lease;
        released.holder_identity = None;
        assert_eq!(
            decide(Some(&released), "b", Duration::ZERO, D),
            Step::TakeOver
        );
    }

    #[test]
    fn a_released_lease_has_no_holder_and_is_taken_over_at_once() {
        let lease = held_by("a", 0);
        let free = released(&lease, at(3));
        assert_eq!(free.holder_identity, None);
        assert_eq!(free.lease_duration_seconds, Some(1));
        assert_eq!(free.lease_transitions, lease.lease_transitions);
        assert_eq!(free.renew_time, Some(MicroTime(at(3))));
        assert_eq!(decide(Some(&free), "b", Duration::ZERO, D), Step::TakeOver);
        let next = next_spec(Some(&free), &Step::TakeOver, "b", at(4), D);
        assert_eq!(next.holder_identity.as_deref(), Some("b"));
        assert_eq!(next.lease_transitions, Some(3));
    }

    #[test]
    fn a_renewal_is_a_new_record_even_by_the_same_holder() {
        let first = held_by("a", 0);
        let renewed = held_by("a", 5);
        assert_ne!(record(Some(&first)), record(Some(&renewed)));
        assert_eq!(record(Some(&first)), record(Some(&held_by("a", 0))));
    }

    #[test]
    fn the_holder_gives_up_before_another_may_take_over() {
        let settings = Settings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: D,
        };
        assert!(settings.renew_deadline() < settings.duration);
        assert!(settings.retry_period() < settings.renew_deadline());
        assert!(settings.retry_period() <= Duration::from_secs(1));
    }
}
