//! Set elements as nf_tables encodes them: timed address bans, ports, and interval sets laid
//! out as `nft` does; and elements as the kernel lists them back ([`KernelElem`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;

use super::{layout::*, uapi::*};
use crate::netlink::{Attrs, Enc};

#[derive(Debug, Clone)]
pub struct Elem {
    pub key: Vec<u8>,
    pub timeout: Option<Duration>,
    pub marked: bool,
    /// Opens a range that runs to the top of the key space (no element closes it): `nft`
    /// marks such an element in its userdata (NFTNL_SET_ELEM_F_INTERVAL_OPEN), and so do we.
    pub open: bool,
    /// Closes an interval (interval sets: an element opens a range, the next one closes it).
    pub end: bool,
}

impl Elem {
    pub fn key(addr: IpAddr) -> Self {
        let key = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        Elem {
            key,
            timeout: None,
            marked: false,
            open: false,
            end: false,
        }
    }
    pub fn ban(addr: IpAddr, timeout: Option<Duration>) -> Self {
        Elem {
            timeout,
            marked: true,
            ..Elem::key(addr)
        }
    }
    pub fn port(port: u16) -> Self {
        Elem {
            key: port.to_be_bytes().to_vec(),
            timeout: None,
            marked: false,
            open: false,
            end: false,
        }
    }
    /// Attributes in libnftnl's order (flags, timeout, key, userdata): the bytes equal nft's.
    pub fn encode(&self, e: &mut Enc) {
        e.nest(NFTA_LIST_ELEM, |e| {
            if self.end {
                e.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            if let Some(t) = self.timeout {
                e.be64(NFTA_SET_ELEM_TIMEOUT, millis(t));
            }
            e.nest(NFTA_SET_ELEM_KEY, |e| e.bytes(NFTA_DATA_VALUE, &self.key));
            let mut udata = Vec::new();
            if self.marked {
                udata = udata_comment(ELEMENT_MARK);
            }
            if self.open {
                // libnftnl's NFTNL_UDATA_SET_ELEM_FLAGS TLV: a host-endian u32.
                udata.extend_from_slice(&[UDATA_SET_ELEM_FLAGS, 4]);
                udata.extend_from_slice(&UDATA_SET_ELEM_F_INTERVAL_OPEN.to_ne_bytes());
            }
            if !udata.is_empty() {
                e.bytes(NFTA_SET_ELEM_USERDATA, &udata);
            }
        });
    }
}

/// Interval elements for the `v6` (or IPv4) networks of `nets` (aggregated, so sorted and
/// disjoint), laid out as `nft` does: a closing element at 0 unless the first range starts
/// there, then per range its first address and, unless it runs to the top, the address after
/// its last one, flagged as the end.
pub fn exempt_elems(nets: &[IpNet], v6: bool) -> Vec<Elem> {
    let ranges: Vec<(u128, u128, usize)> = nets
        .iter()
        .filter_map(|n| match (n, v6) {
            (IpNet::V4(n), false) => Some((
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
                4,
            )),
            (IpNet::V6(n), true) => Some((u128::from(n.network()), u128::from(n.broadcast()), 16)),
            _ => None,
        })
        .collect();
    interval_elems(ranges)
}

/// Interval elements of sorted, disjoint `(first, last, key length)` ranges (see
/// [`exempt_elems`] for the layout).
pub fn interval_elems(ranges: Vec<(u128, u128, usize)>) -> Vec<Elem> {
    let key = |v: u128, len: usize| v.to_be_bytes()[16 - len..].to_vec();
    let elem = |v: u128, len: usize, end: bool| Elem {
        key: key(v, len),
        timeout: None,
        marked: false,
        open: false,
        end,
    };
    let mut out = Vec::new();
    if let Some(&(first, _, len)) = ranges.first() {
        if first != 0 {
            out.push(elem(0, len, true));
        }
    }
    for (start, last, len) in ranges {
        out.push(elem(start, len, false));
        let top = match len {
            2 => u128::from(u16::MAX),
            4 => u128::from(u32::MAX),
            _ => u128::MAX,
        };
        if last < top {
            out.push(elem(last + 1, len, true));
        }
    }
    out
}

/// Interval elements of a set of ports (sorted, deduplicated): consecutive ports make one range.
pub fn port_interval_elems(ports: &[u16]) -> Vec<Elem> {
    let mut ranges: Vec<(u128, u128, usize)> = Vec::new();
    for &port in ports {
        let port = u128::from(port);
        match ranges.last_mut() {
            Some(last) if last.1 + 1 == port => last.1 = port,
            _ => ranges.push((port, port, 2)),
        }
    }
    interval_elems(ranges)
}

/// The ports an interval set of ports holds, from its elements as the kernel lists them
/// (in any order: each opening element runs to the next element above it, which closes it).
pub fn ports_of_interval_elems(elems: &[KernelElem]) -> Vec<u16> {
    let mut bounds: Vec<(u32, bool)> = elems
        .iter()
        .filter_map(|e| Some((u32::from(e.port()?), e.end)))
        .collect();
    bounds.sort_unstable();
    let mut out = Vec::new();
    for (i, &(start, end)) in bounds.iter().enumerate() {
        if end {
            continue;
        }
        let stop = bounds.get(i + 1).map_or(u32::from(u16::MAX) + 1, |b| b.0);
        out.extend((start..stop).filter_map(|p| u16::try_from(p).ok()));
    }
    out
}

/// An element as the kernel reports it.
#[derive(Debug)]
pub struct KernelElem {
    pub key: Vec<u8>,
    pub timeout_ms: Option<u64>,
    pub expiration_ms: Option<u64>,
    pub marked: bool,
    pub end: bool,
}

impl KernelElem {
    pub fn parse(data: &[u8]) -> Option<Self> {
        let mut e = KernelElem {
            key: Vec::new(),
            timeout_ms: None,
            expiration_ms: None,
            marked: false,
            end: false,
        };
        let mut has_key = false;
        for (ty, v) in Attrs::new(data) {
            match ty {
                NFTA_SET_ELEM_KEY => {
                    for (ty, k) in Attrs::new(v) {
                        if ty == NFTA_DATA_VALUE {
                            e.key = k.to_vec();
                            has_key = true;
                        }
                    }
                }
                NFTA_SET_ELEM_TIMEOUT => e.timeout_ms = be64(v),
                NFTA_SET_ELEM_EXPIRATION => e.expiration_ms = be64(v),
                NFTA_SET_ELEM_FLAGS => {
                    e.end = <[u8; 4]>::try_from(v)
                        .is_ok_and(|f| u32::from_be_bytes(f) & NFT_SET_ELEM_INTERVAL_END != 0)
                }
                NFTA_SET_ELEM_USERDATA => {
                    e.marked = udata_comment_of(v).is_some_and(|c| c == ELEMENT_MARK)
                }
                _ => {}
            }
        }
        has_key.then_some(e)
    }
    pub fn addr(&self) -> Option<IpAddr> {
        if let Ok(a) = <[u8; 4]>::try_from(self.key.as_slice()) {
            return Some(IpAddr::V4(Ipv4Addr::from(a)));
        }
        <[u8; 16]>::try_from(self.key.as_slice())
            .ok()
            .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
    }
    pub fn port(&self) -> Option<u16> {
        <[u8; 2]>::try_from(self.key.as_slice())
            .ok()
            .map(u16::from_be_bytes)
    }
    /// Remaining time before the kernel removes the element (`None`: never).
    pub fn remaining(&self) -> Option<Duration> {
        self.timeout_ms
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(self.expiration_ms.unwrap_or(t)))
    }
    /// Added by the tripwire rule (no marker, the tripwire's timeout) less than
    /// [`TRIPWIRE_GRACE`] ago.
    pub fn fresh_from_tripwire(&self, tripwire_timeouts: &[Option<Duration>]) -> bool {
        let (Some(t), Some(x)) = (self.timeout_ms, self.expiration_ms) else {
            return false;
        };
        !self.marked
            && tripwire_timeouts
                .iter()
                .flatten()
                .any(|tw| t == millis(*tw))
            && Duration::from_millis(t.saturating_sub(x)) < TRIPWIRE_GRACE
    }
}

fn be64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// The elements as the kernel would list them back (no timeouts, no comments).
#[cfg(test)]
pub fn as_kernel(elems: &[Elem]) -> Vec<KernelElem> {
    elems
        .iter()
        .map(|e| KernelElem {
            key: e.key.clone(),
            timeout_ms: None,
            expiration_ms: None,
            marked: false,
            end: e.end,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn probe_decoy_ports_go_to_the_kernel_as_ranges_laid_out_as_nft_does() {
        let elems = port_interval_elems(&[1, 2, 3, 5, 7, 8]);
        let laid: Vec<(u16, bool)> = elems
            .iter()
            .map(|e| (u16::from_be_bytes([e.key[0], e.key[1]]), e.end))
            .collect();
        assert_eq!(
            laid,
            vec![
                (0, true),
                (1, false),
                (4, true),
                (5, false),
                (6, true),
                (7, false),
                (9, true)
            ]
        );
    }

    #[test]
    fn probe_decoy_ranges_read_back_as_the_same_ports_in_any_order() {
        let ports: Vec<u16> = (1..113).chain(114..139).chain(140..2000).collect();
        let mut elems = as_kernel(&port_interval_elems(&ports));
        elems.reverse();
        assert_eq!(ports_of_interval_elems(&elems), ports);
    }

    #[test]
    fn a_probe_decoy_range_may_run_to_port_65535() {
        let ports: Vec<u16> = (65000..=65535).collect();
        let elems = port_interval_elems(&ports);
        assert_eq!(elems.len(), 2, "closing 0 and the open start: {elems:?}");
        assert_eq!(ports_of_interval_elems(&as_kernel(&elems)), ports);
    }

    #[test]
    fn a_fresh_tripwire_element_is_recognised_by_its_timeout_and_missing_marker() {
        let e = KernelElem {
            key: vec![10, 0, 0, 1],
            timeout_ms: Some(60_000),
            expiration_ms: Some(58_000),
            marked: false,
            end: false,
        };
        assert!(e.fresh_from_tripwire(&[Some(Duration::from_secs(60))]));
        assert!(!e.fresh_from_tripwire(&[Some(Duration::from_secs(61))]));
        assert!(!e.fresh_from_tripwire(&[]));
        let old = KernelElem {
            expiration_ms: Some(40_000),
            ..e
        };
        assert!(!old.fresh_from_tripwire(&[Some(Duration::from_secs(60))]));
    }
}
