//! What the sensor's table holds: names of its sets and chains, their sizes and priority,
//! and how timeouts are compared and sent to the kernel.

use std::{net::IpAddr, time::Duration};

/// Name of the IPv4 ban set in the sensor's table.
pub const SET_V4: &str = "bans4";
/// Name of the IPv6 ban set in the sensor's table.
pub const SET_V6: &str = "bans6";
/// Name of the IPv4 prefix ban set: an interval set, so a ban of a network of any size is
/// one range (see `NftBans::ban_prefix`).
pub const SET_PREFIX_V4: &str = "prefix_bans4";
/// Name of the IPv6 prefix ban set (an interval set, as [`SET_PREFIX_V4`]).
pub const SET_PREFIX_V6: &str = "prefix_bans6";
/// Name of the set of decoy TCP ports the tripwire watches.
pub const SET_DECOYS: &str = "decoys";
/// Interval set of TCP ports the probe tripwire watches (raw modes; see
/// `NftBans::install_probe_tripwire`).
pub const SET_PROBE_DECOYS: &str = "probe_decoys";
/// Most bans per second the probe tripwire adds (all sources together), with a burst of
/// [`PROBE_TRIPWIRE_BURST`]: as user space limits first-seen unverified alarms, so a
/// spoofed flood cannot fill the ban set from the packet path. Past it the probe goes on
/// to user space, which still sees and judges it.
pub const PROBE_TRIPWIRE_RATE: u64 = 50;
/// Burst of [`PROBE_TRIPWIRE_RATE`].
pub const PROBE_TRIPWIRE_BURST: u32 = 100;
/// Interval set of IPv4 networks the tripwire never bans (see `NftBans::set_tripwire_exempt`).
pub const SET_EXEMPT_V4: &str = "exempt4";
/// Interval set of IPv6 networks the tripwire never bans.
pub const SET_EXEMPT_V6: &str = "exempt6";
/// Base chain on the input hook.
pub const CHAIN_INPUT: &str = "input";
/// Base chain on the forward hook.
pub const CHAIN_FORWARD: &str = "forward";
/// Hook priority of both chains: just before the usual `filter` (0) chains.
pub const PRIORITY: i32 = -10;
/// Most elements a ban set holds (as `nft` gives dynamic sets); past it a ban fails with `NftError::SetFull`.
pub const SET_SIZE: u32 = 65535;
/// Reconcile leaves an element alone when its remaining timeout is within this of the wanted one.
pub const TIMEOUT_TOLERANCE: Duration = Duration::from_secs(2);
/// Reconcile keeps an element the tripwire added (no user-space marker) for this long even if the
/// list does not have it yet: user space learns of the hit a moment after the kernel banned it.
pub const TRIPWIRE_GRACE: Duration = Duration::from_secs(10);

/// Comment stored on every element this module adds (`nft list` shows it).
pub const ELEMENT_MARK: &str = "portsentry";
/// Prefix of every rule comment; the rest of the comment says what the rule does.
pub const RULE_MARK: &str = "portsentry:";
/// Addresses handled per batch (keeps a batch well under the socket send buffer, which is the
/// largest message the kernel accepts).
pub const ADDRS_PER_BATCH: usize = 256;
/// Ranges handled per batch when a prefix set is rewritten (two elements each: well under the
/// socket send buffer). Up to this many ranges per family are replaced in one transaction.
pub const RANGES_PER_BATCH: usize = 512;
/// Largest name nf_tables accepts (NFT_NAME_MAXLEN, counting the trailing NUL).
pub const NAME_MAX: usize = 255;

pub fn close_enough(have: Option<Duration>, want: Option<Duration>) -> bool {
    match (have, want) {
        (None, None) => true,
        (Some(h), Some(w)) => h.abs_diff(w) <= TIMEOUT_TOLERANCE,
        _ => false,
    }
}

pub fn prefix_set(v6: bool) -> &'static str {
    if v6 { SET_PREFIX_V6 } else { SET_PREFIX_V4 }
}

pub fn set_of(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => SET_V4,
        IpAddr::V6(_) => SET_V6,
    }
}

/// Longest timeout sent to the kernel, 10^13 ms (about 317 years): nf_tables refuses
/// (ERANGE) timeouts from about 1.8 * 10^13 ms on, so longer ones are clamped to this.
pub const MAX_TIMEOUT: Duration = Duration::from_millis(10_000_000_000_000);

/// Timeout in milliseconds as nf_tables wants it: at least 1 ms (0 would mean "no timeout"),
/// at most [`MAX_TIMEOUT`].
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_TIMEOUT).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Userdata in libnftnl's TLV layout with one comment (type 0), so `nft list` prints it.
pub fn udata_comment(text: &str) -> Vec<u8> {
    let bytes = &text.as_bytes()[..text.len().min(200)];
    let mut v = vec![0u8, (bytes.len() + 1) as u8];
    v.extend_from_slice(bytes);
    v.push(0);
    v
}

pub fn udata_comment_of(mut data: &[u8]) -> Option<String> {
    while data.len() >= 2 {
        let (ty, len) = (data[0], usize::from(data[1]));
        let value = data.get(2..2 + len)?;
        if ty == 0 {
            return Some(cstr(value));
        }
        data = &data[2 + len..];
    }
    None
}

pub fn cstr(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_timeouts_within_tolerance_are_left_alone() {
        let s = Duration::from_secs;
        assert!(close_enough(Some(s(100)), Some(s(101))));
        assert!(!close_enough(Some(s(100)), Some(s(110))));
        assert!(!close_enough(None, Some(s(100))));
        assert!(close_enough(None, None));
    }

    #[test]
    fn comments_round_trip_in_libnftnl_userdata_layout() {
        let u = udata_comment("portsentry");
        assert_eq!(&u[..2], &[0, 11]);
        assert_eq!(udata_comment_of(&u).as_deref(), Some("portsentry"));
    }
}
