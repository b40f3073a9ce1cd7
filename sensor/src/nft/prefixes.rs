//! Prefix bans as disjoint address ranges with timeouts: painting overlapping prefixes into
//! pieces, cutting holes, and the interval elements of a prefix set both ways.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;

use super::{
    elems::{Elem, KernelElem},
    layout::*,
};

/// A range of addresses of one family, `first..=last` as integers (IPv4 in the low 32 bits),
/// banned with one timeout (`None`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub first: u128,
    pub last: u128,
    pub timeout: Option<Duration>,
}

/// A network as the kernel sees its sources: truncated to its prefix, IPv4-mapped IPv6 as
/// IPv4, and as the range of addresses it holds.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub net: IpNet,
    pub v6: bool,
    pub first: u128,
    pub last: u128,
}

impl Target {
    pub fn of(net: IpNet) -> Self {
        let net = match net.trunc() {
            IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
                Some(v4) => {
                    ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(IpNet::V6(v6), IpNet::V4)
                }
                None => IpNet::V6(v6),
            },
            other => other,
        };
        let (v6, first, last) = match net {
            IpNet::V4(n) => (
                false,
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (true, u128::from(n.network()), u128::from(n.broadcast())),
        };
        Target {
            net,
            v6,
            first,
            last,
        }
    }
    /// The address when the network is a single one (/32, /128).
    pub fn addr(&self) -> Option<IpAddr> {
        (self.net.prefix_len() == self.net.max_prefix_len()).then(|| self.net.addr())
    }
    pub fn piece(&self, timeout: Option<Duration>) -> Piece {
        Piece {
            first: self.first,
            last: self.last,
            timeout,
        }
    }
}

/// The highest address of a family as an integer.
pub fn top(v6: bool) -> u128 {
    if v6 { u128::MAX } else { u128::from(u32::MAX) }
}

/// The longer of two timeouts (`None`, no timeout, is the longest).
pub fn longer(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (None, _) | (_, None) => None,
        (Some(a), Some(b)) => Some(a.max(b)),
    }
}

/// Orders timeouts longest first (`None` first).
pub fn longest_first(a: Option<Duration>, b: Option<Duration>) -> std::cmp::Ordering {
    match (a, b) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(a), Some(b)) => b.cmp(&a),
    }
}

/// Lays `ranges` over each other in order, each taking only the addresses no earlier one
/// holds, so that overlapping ranges become disjoint pieces (an interval set refuses
/// overlaps): given longest timeout first, every address gets the longest timeout of the
/// ranges that hold it. Returns the pieces sorted, adjacent ones with the same timeout
/// joined (for one timeout this is `IpNet::aggregate` as ranges).
pub fn paint(ranges: impl IntoIterator<Item = Piece>) -> Vec<Piece> {
    // Addresses taken so far: disjoint ranges, first -> last.
    let mut taken: BTreeMap<u128, u128> = BTreeMap::new();
    let mut out = Vec::new();
    for r in ranges {
        let from = taken
            .range(..=r.first)
            .next_back()
            .map_or(r.first, |(first, _)| *first);
        let overlapping: Vec<(u128, u128)> = taken
            .range(from..=r.last)
            .filter(|(_, last)| **last >= r.first)
            .map(|(first, last)| (*first, *last))
            .collect();
        // The free parts of r: between the taken ranges it overlaps.
        let mut next = Some(r.first);
        for &(first, last) in &overlapping {
            let Some(at) = next else { break };
            if last < at {
                continue;
            }
            if first > at {
                out.push(Piece {
                    first: at,
                    last: first - 1,
                    timeout: r.timeout,
                });
            }
            next = last.checked_add(1).filter(|n| *n <= r.last);
        }
        if let Some(at) = next {
            out.push(Piece {
                first: at,
                last: r.last,
                timeout: r.timeout,
            });
        }
        let (mut first, mut last) = (r.first, r.last);
        for (f, l) in overlapping {
            taken.remove(&f);
            first = first.min(f);
            last = last.max(l);
        }
        taken.insert(first, last);
    }
    out.sort_by_key(|p| p.first);
    let mut joined: Vec<Piece> = Vec::with_capacity(out.len());
    for p in out {
        match joined.last_mut() {
            Some(q) if q.timeout == p.timeout && q.last.checked_add(1) == Some(p.first) => {
                q.last = p.last;
            }
            _ => joined.push(p),
        }
    }
    joined
}

/// `pieces` without the addresses `first..=last`.
pub fn subtract(pieces: &[Piece], first: u128, last: u128) -> Vec<Piece> {
    let mut out = Vec::new();
    for p in pieces {
        if p.last < first || p.first > last {
            out.push(*p);
            continue;
        }
        if p.first < first {
            out.push(Piece {
                last: first - 1,
                ..*p
            });
        }
        if p.last > last {
            out.push(Piece {
                first: last + 1,
                ..*p
            });
        }
    }
    out
}

/// Whether the kernel's pieces are the wanted ones: same ranges, timeouts close enough.
pub fn same_pieces(have: &[Piece], want: &[Piece]) -> bool {
    have.len() == want.len()
        && have.iter().zip(want).all(|(h, w)| {
            h.first == w.first && h.last == w.last && close_enough(h.timeout, w.timeout)
        })
}

/// Interval elements of sorted, disjoint pieces, laid out as `nft` does for a prefix set:
/// (with `closing_zero`) a closing element at 0 unless the first piece starts there, then
/// per piece its first address with the timeout and the mark, and, unless it runs to the
/// top, the address after its last one, flagged as the end (where two pieces touch, the end
/// of one and the start of the next share a key).
pub fn piece_elems(pieces: &[Piece], v6: bool, closing_zero: bool) -> Vec<Elem> {
    let len = if v6 { 16 } else { 4 };
    let top = top(v6);
    let elem = |v: u128, end: bool| Elem {
        key: v.to_be_bytes()[16 - len..].to_vec(),
        timeout: None,
        marked: false,
        open: false,
        end,
    };
    let mut out = Vec::with_capacity(pieces.len() * 2 + 1);
    if closing_zero && pieces.first().is_some_and(|p| p.first != 0) {
        out.push(elem(0, true));
    }
    for p in pieces {
        out.push(Elem {
            timeout: p.timeout,
            marked: true,
            open: p.last == top,
            ..elem(p.first, false)
        });
        if p.last < top {
            out.push(elem(p.last + 1, true));
        }
    }
    out
}

/// The pieces of a prefix set from its elements as the kernel lists them (in any order):
/// each opening element runs to the next higher key (an end, or the start of a touching
/// range), or to the top; its timeout is the remaining one.
pub fn pieces_of_elems(elems: &[KernelElem], v6: bool) -> Vec<Piece> {
    let key = |e: &KernelElem| -> Option<u128> {
        if v6 {
            <[u8; 16]>::try_from(e.key.as_slice())
                .ok()
                .map(u128::from_be_bytes)
        } else {
            <[u8; 4]>::try_from(e.key.as_slice())
                .ok()
                .map(|k| u128::from(u32::from_be_bytes(k)))
        }
    };
    let keys: BTreeSet<u128> = elems.iter().filter_map(key).collect();
    let mut out: Vec<Piece> = elems
        .iter()
        .filter(|e| !e.end)
        .filter_map(|e| {
            let first = key(e)?;
            let last = keys
                .range((std::ops::Bound::Excluded(first), std::ops::Bound::Unbounded))
                .next()
                .map_or(top(v6), |next| next - 1);
            Some(Piece {
                first,
                last,
                timeout: e.remaining(),
            })
        })
        .collect();
    out.sort_by_key(|p| p.first);
    out.dedup_by_key(|p| p.first);
    out
}

/// The fewest CIDR prefixes that make up `first..=last`.
pub fn nets_of_range(mut first: u128, last: u128, v6: bool) -> Vec<IpNet> {
    let width: u32 = if v6 { 128 } else { 32 };
    // Highest address of a block of 2^bits addresses, relative to its first.
    let span = |bits: u32| {
        if bits >= 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        }
    };
    let mut out = Vec::new();
    loop {
        let mut bits = first.trailing_zeros().min(width);
        while span(bits) > last - first {
            bits -= 1;
        }
        let prefix = u8::try_from(width - bits).unwrap_or(0);
        let net = if v6 {
            ipnet::Ipv6Net::new(Ipv6Addr::from(first), prefix).map(IpNet::V6)
        } else {
            ipnet::Ipv4Net::new(Ipv4Addr::from(first as u32), prefix).map(IpNet::V4)
        };
        out.extend(net.ok());
        let end = first + span(bits);
        if end >= last {
            return out;
        }
        first = end + 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{
        netlink::{Attrs, Enc},
        nft::elems::as_kernel,
    };

    /// The payloads of the elements in an NFTA_SET_ELEM_LIST_ELEMENTS value (libnftnl numbers
    /// the element nests 1, 2, ..., we send them all as 1: the kernel reads neither).
    fn element_payloads(list: &[u8]) -> Vec<Vec<u8>> {
        Attrs::new(list).map(|(_, v)| v.to_vec()).collect()
    }

    fn encoded(elems: &[Elem]) -> Vec<Vec<u8>> {
        let mut e = Enc::default();
        for el in elems {
            el.encode(&mut e);
        }
        element_payloads(&e.buf)
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    /// The pieces for `(prefix, timeout)` bans, as reconcile_nets computes them.
    fn pieces(bans: &[(&str, Option<Duration>)]) -> Vec<Piece> {
        let mut ranges: Vec<Piece> = bans
            .iter()
            .map(|(n, t)| Target::of(net(n)).piece(*t))
            .collect();
        ranges.sort_by(|a, b| longest_first(a.timeout, b.timeout));
        paint(ranges)
    }

    const HOUR: Option<Duration> = Some(Duration::from_secs(3600));

    const FIVE_MIN: Option<Duration> = Some(Duration::from_secs(300));

    #[test]
    fn ipv4_prefix_bans_encode_byte_for_byte_as_nft_sends_them() {
        // strace of `nft add element inet t p { 198.51.100.0/22 timeout 1h comment "portsentry",
        // 198.51.104.0/24 timeout 5m comment "portsentry", 240.0.0.0/4 timeout 1h comment
        // "portsentry" }` (nftables 1.0.6) into an empty `flags interval,timeout` set: the
        // value of NFTA_SET_ELEM_LIST_ELEMENTS.
        let nft = hex(concat!(
            "1800018008000300000000010c000180080001000000000030000280",
            "0c000400000000000036ee800c00018008000100c633640011000600",
            "000b706f727473656e74727900000000180003800800030000000001",
            "0c00018008000100c6336800300004800c00040000000000000493e0",
            "0c00018008000100c633680011000600000b706f727473656e747279",
            "000000001800058008000300000000010c00018008000100c6336900",
            "340006800c000400000000000036ee800c00018008000100f0000000",
            "17000600000b706f727473656e7472790001040100000000",
        ));
        let ours = piece_elems(
            &pieces(&[
                ("198.51.100.0/22", HOUR),
                ("198.51.104.0/24", FIVE_MIN),
                ("240.0.0.0/4", HOUR),
            ]),
            false,
            true,
        );
        assert_eq!(encoded(&ours), element_payloads(&nft));
    }

    #[test]
    fn ipv6_prefix_bans_encode_byte_for_byte_as_nft_sends_them() {
        // strace of `nft add element inet t p6 { 2001:db8:1:2::/64 timeout 1h comment
        // "portsentry", 2001:db8:1:3::/64 comment "portsentry" }` into an empty set.
        let nft = hex(concat!(
            "24000180080003000000000118000180140001000000000000000000",
            "00000000000000003c0002800c000400000000000036ee8018000180",
            "1400010020010db800010002000000000000000011000600000b706f",
            "727473656e7472790000000024000380080003000000000118000180",
            "1400010020010db80001000300000000000000003000048018000180",
            "1400010020010db800010003000000000000000011000600000b706f",
            "727473656e7472790000000024000580080003000000000118000180",
            "1400010020010db8000100040000000000000000",
        ));
        let ours = piece_elems(
            &pieces(&[("2001:db8:1:2::/64", HOUR), ("2001:db8:1:3::/64", None)]),
            true,
            true,
        );
        assert_eq!(encoded(&ours), element_payloads(&nft));
    }

    #[test]
    fn prefixes_with_one_timeout_merge_as_ipnet_aggregate_does() {
        let bans = [
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.128/25",
            "10.0.2.0/23",
            "10.9.0.0/16",
            "10.8.0.0/16",
            "192.0.2.0/25",
            "192.0.2.128/26",
        ];
        let painted = pieces(&bans.map(|b| (b, HOUR)));
        let nets: Vec<IpNet> = painted
            .iter()
            .flat_map(|p| nets_of_range(p.first, p.last, false))
            .collect();
        let aggregated = IpNet::aggregate(&bans.iter().map(|b| net(b)).collect());
        assert_eq!(nets, aggregated);
        assert!(painted.iter().all(|p| p.timeout == HOUR));
        assert_eq!(painted.len(), 3, "{painted:?}");
    }

    #[test]
    fn an_address_several_prefixes_cover_gets_the_longest_timeout() {
        let painted = pieces(&[("10.0.0.0/8", FIVE_MIN), ("10.1.0.0/16", HOUR)]);
        let v4 = |a: &str| u128::from(u32::from(a.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(
            painted,
            vec![
                Piece {
                    first: v4("10.0.0.0"),
                    last: v4("10.0.255.255"),
                    timeout: FIVE_MIN
                },
                Piece {
                    first: v4("10.1.0.0"),
                    last: v4("10.1.255.255"),
                    timeout: HOUR
                },
                Piece {
                    first: v4("10.2.0.0"),
                    last: v4("10.255.255.255"),
                    timeout: FIVE_MIN
                },
            ]
        );
    }

    #[test]
    fn a_prefix_inside_a_longer_banned_one_adds_no_range() {
        let painted = pieces(&[("2001:db8::/32", None), ("2001:db8:5::/48", HOUR)]);
        assert_eq!(painted, pieces(&[("2001:db8::/32", None)]));
    }

    #[test]
    fn prefix_ranges_read_back_from_kernel_elements_in_any_order() {
        let want = pieces(&[
            ("198.51.100.0/22", HOUR),
            ("198.51.104.0/24", FIVE_MIN),
            ("203.0.113.0/24", HOUR),
            ("240.0.0.0/4", HOUR),
        ]);
        let mut elems = as_kernel(&piece_elems(&want, false, true));
        elems.reverse();
        let bounds = |p: &[Piece]| p.iter().map(|p| (p.first, p.last)).collect::<Vec<_>>();
        assert_eq!(bounds(&pieces_of_elems(&elems, false)), bounds(&want));
    }

    #[test]
    fn a_range_is_listed_as_the_fewest_cidr_prefixes() {
        let v4 = |a: &str| u128::from(u32::from(a.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(
            nets_of_range(v4("10.0.0.1"), v4("10.0.0.6"), false),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"].map(net)
        );
        assert_eq!(nets_of_range(0, u128::MAX, true), vec![net("::/0")]);
        assert_eq!(
            nets_of_range(v4("240.0.0.0"), top(false), false),
            vec![net("240.0.0.0/4")]
        );
    }

    #[test]
    fn unbanning_a_prefix_cuts_it_out_of_a_larger_range() {
        let hole = Target::of(net("10.0.1.0/24"));
        let left = subtract(&pieces(&[("10.0.0.0/22", HOUR)]), hole.first, hole.last);
        let nets: Vec<IpNet> = left
            .iter()
            .flat_map(|p| nets_of_range(p.first, p.last, false))
            .collect();
        assert_eq!(nets, ["10.0.0.0/24", "10.0.2.0/23"].map(net));
        assert!(left.iter().all(|p| p.timeout == HOUR));
    }

    #[test]
    fn ipv4_mapped_ipv6_prefixes_are_banned_as_ipv4() {
        let t = Target::of(net("::ffff:198.51.100.0/118"));
        assert!(!t.v6);
        assert_eq!(t.net, net("198.51.100.0/22"));
        assert_eq!(
            Target::of(net("::ffff:203.0.113.7/128")).addr(),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(Target::of(net("10.1.2.3/8")).net, net("10.0.0.0/8"));
    }
}
