//! Offence memory: which of one policy's bans are in force, which expired ones are kept (never
//! enforced) so that a repeat offence within the escalation window escalates, which are deleted.

use std::{borrow::Borrow, time::Duration};

use jiff::Timestamp;
use portsentry_crds::{PortSentryBan, Response};

use crate::enforce::bans;

/// One policy's bans sorted by what the operator does with them at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Sorted<T> {
    /// In force: enforced, counted against `maxActiveBans`, looked at again at expiry.
    pub active: Vec<T>,
    /// Past expiry but remembered until the given instant (lastSeen + escalation window),
    /// newest first. Never enforced; kept so the next offence counts as a repeat.
    pub remembered: Vec<(T, Timestamp)>,
    /// Past expiry and no longer remembered (window passed, escalation off, or beyond the
    /// memory cap): delete them.
    pub forgotten: Vec<T>,
}

/// Sorts `bans` (all of one policy, whose rules say `response`) at `now`. At most
/// `maxActiveBans` expired bans are remembered, the most recently seen; older ones beyond
/// that are forgotten early, so memory stays bounded whatever the scan rate.
pub fn sort_out<T: Borrow<PortSentryBan>>(
    bans: impl IntoIterator<Item = T>,
    response: &Response,
    now: Timestamp,
) -> Sorted<T> {
    let mut sorted = Sorted {
        active: Vec::new(),
        remembered: Vec::new(),
        forgotten: Vec::new(),
    };
    for ban in bans {
        let spec = &ban.borrow().spec;
        if bans::is_active(spec, now) {
            sorted.active.push(ban);
        } else {
            match bans::remembered_until(response, spec).filter(|until| now <= *until) {
                Some(until) => sorted.remembered.push((ban, until)),
                None => sorted.forgotten.push(ban),
            }
        }
    }
    sorted.remembered.sort_by(|(_, a), (_, b)| b.cmp(a));
    let cap = response.max_active_bans as usize;
    if sorted.remembered.len() > cap {
        let beyond = sorted.remembered.split_off(cap);
        sorted
            .forgotten
            .extend(beyond.into_iter().map(|(ban, _)| ban));
    }
    sorted
}

impl<T: Borrow<PortSentryBan>> Sorted<T> {
    /// When to look again: at the next expiry of an active ban, or just after the next
    /// remembered ban's memory ends (whole seconds, so one second after); `None` if neither.
    pub fn requeue_after(&self, now: Timestamp) -> Option<Duration> {
        let expiries = self
            .active
            .iter()
            .filter_map(|ban| bans::requeue_after(now, &ban.borrow().spec));
        let memories = self.remembered.iter().map(|(_, until)| {
            let left = until.duration_since(now);
            let left = if left.is_negative() {
                Duration::ZERO
            } else {
                left.unsigned_abs()
            };
            left + Duration::from_secs(1)
        });
        expiries.chain(memories).min()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use portsentry_crds::{Duration as CrdDuration, PolicyKind, PolicyRef, PortSentryBanSpec};

    use super::*;

    const T0: i64 = 1_780_000_000;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    /// A ban of `source` last seen at `seen`, expiring at `expires`.
    fn ban(source: &str, seen: Option<i64>, expires: Option<i64>) -> PortSentryBan {
        PortSentryBan::new(
            source,
            PortSentryBanSpec {
                source: source.parse().unwrap(),
                policy: PolicyRef {
                    kind: PolicyKind::PortSentryPolicy,
                    name: "web".into(),
                },
                first_seen: seen.map(|s| Time(at(s))),
                last_seen: seen.map(|s| Time(at(s))),
                offences: 1,
                expires_at: expires.map(|s| Time(at(s))),
                reason: None,
                evidence: Vec::new(),
            },
        )
    }

    /// Escalation on with a one-hour window.
    fn response() -> Response {
        let mut response = Response::default();
        response.escalation.enabled = true;
        response.escalation.window = CrdDuration::from_secs(3600);
        response
    }

    fn names<'a>(bans: impl IntoIterator<Item = &'a PortSentryBan>) -> Vec<String> {
        bans.into_iter()
            .map(|b| b.spec.source.to_string())
            .collect()
    }

    #[test]
    fn a_ban_before_its_expiry_is_active() {
        let bans = [ban("203.0.113.7", Some(T0), Some(T0 + 60))];
        let sorted = sort_out(&bans, &response(), at(T0 + 59));
        assert_eq!(names(sorted.active.iter().copied()), ["203.0.113.7"]);
        assert!(sorted.remembered.is_empty() && sorted.forgotten.is_empty());
    }

    #[test]
    fn an_expired_ban_is_remembered_until_its_last_sighting_plus_the_window() {
        let bans = [ban("203.0.113.7", Some(T0), Some(T0 + 60))];
        let sorted = sort_out(&bans, &response(), at(T0 + 60));
        assert!(sorted.active.is_empty());
        assert_eq!(sorted.remembered.len(), 1);
        assert_eq!(sorted.remembered[0].1, at(T0 + 3600));
        let last_moment = sort_out(&bans, &response(), at(T0 + 3600));
        assert_eq!(last_moment.remembered.len(), 1);
    }

    #[test]
    fn an_expired_ban_is_forgotten_once_the_window_has_passed() {
        let bans = [ban("203.0.113.7", Some(T0), Some(T0 + 60))];
        let sorted = sort_out(&bans, &response(), at(T0 + 3601));
        assert!(sorted.remembered.is_empty());
        assert_eq!(names(sorted.forgotten.iter().copied()), ["203.0.113.7"]);
    }

    #[test]
    fn without_escalation_an_expired_ban_is_forgotten_at_expiry() {
        let mut response = response();
        response.escalation.enabled = false;
        let bans = [ban("203.0.113.7", Some(T0), Some(T0 + 60))];
        let sorted = sort_out(&bans, &response, at(T0 + 60));
        assert_eq!(sorted.forgotten.len(), 1);
    }

    #[test]
    fn an_expired_ban_that_records_no_sighting_is_forgotten_at_expiry() {
        let bans = [ban("203.0.113.7", None, Some(T0 + 60))];
        let sorted = sort_out(&bans, &response(), at(T0 + 60));
        assert_eq!(sorted.forgotten.len(), 1);
    }

    #[test]
    fn a_ban_without_expiry_stays_active_whatever_the_window() {
        let bans = [ban("203.0.113.7", Some(T0), None)];
        let sorted = sort_out(&bans, &response(), at(T0 + 10 * 3600));
        assert_eq!(sorted.active.len(), 1);
    }

    #[test]
    fn beyond_max_active_bans_the_least_recently_seen_expired_bans_are_forgotten_early() {
        let mut response = response();
        response.max_active_bans = 2;
        let bans = [
            ban("203.0.113.1", Some(T0 + 1), Some(T0 + 61)),
            ban("203.0.113.3", Some(T0 + 3), Some(T0 + 63)),
            ban("203.0.113.2", Some(T0 + 2), Some(T0 + 62)),
        ];
        let sorted = sort_out(&bans, &response, at(T0 + 100));
        let kept = sorted.remembered.iter().map(|(b, _)| *b);
        assert_eq!(names(kept), ["203.0.113.3", "203.0.113.2"]);
        assert_eq!(names(sorted.forgotten.iter().copied()), ["203.0.113.1"]);
    }

    #[test]
    fn requeue_is_at_the_next_expiry_or_just_after_the_next_memory_ends() {
        let bans = [
            ban("203.0.113.7", Some(T0), Some(T0 + 60)),
            ban("203.0.113.9", Some(T0 + 100), Some(T0 + 4000)),
        ];
        let remembering = sort_out(&bans, &response(), at(T0 + 3000));
        assert_eq!(
            remembering.requeue_after(at(T0 + 3000)),
            Some(Duration::from_secs(601))
        );
        let expiring = sort_out(&bans, &response(), at(T0 + 3900));
        assert_eq!(
            expiring.requeue_after(at(T0 + 3900)),
            Some(Duration::from_secs(100))
        );
        let none = sort_out(&bans[..0], &response(), at(T0));
        assert_eq!(none.requeue_after(at(T0)), None);
    }
}
