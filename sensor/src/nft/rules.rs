//! The rules of the sensor's chains as nf_tables expressions: which rules a table with or
//! without tripwires has, each tagged with a comment, and their byte-level encoding.

use std::time::Duration;

use super::{layout::*, uapi::*};
use crate::netlink::Enc;

/// A tripwire's decoy ports (sorted, deduplicated) and the timeout of the bans it adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tripwire {
    pub ports: Vec<u16>,
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct RuleSpec {
    pub chain: &'static str,
    pub tag: String,
    pub kind: RuleKind,
}

#[derive(Debug, Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn nfproto(self) -> u8 {
        match self {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }
    }
    /// (offset, length) of the source address in the network header.
    pub fn saddr(self) -> (u32, u32) {
        match self {
            Family::V4 => (12, 4),
            Family::V6 => (8, 16),
        }
    }
    pub fn set(self) -> &'static str {
        match self {
            Family::V4 => SET_V4,
            Family::V6 => SET_V6,
        }
    }
    pub fn prefix_set(self) -> &'static str {
        prefix_set(matches!(self, Family::V6))
    }
    pub fn exempt_set(self) -> &'static str {
        match self {
            Family::V4 => SET_EXEMPT_V4,
            Family::V6 => SET_EXEMPT_V6,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

#[derive(Debug)]
pub enum RuleKind {
    /// `meta nfproto F; <saddr> @set; drop` (the address or the prefix set of F).
    Drop(Family, &'static str),
    /// `meta l4proto tcp; tcp dport @decoys; ct state established; meta nfproto F;
    /// update @set { <saddr> [timeout T] }`
    Tripwire(Family, Option<Duration>),
    /// `meta l4proto tcp; tcp dport @probe_decoys; tcp flags & (ack|rst) == 0; socket
    /// transparent; accept`: a port some socket serves is no decoy (the next rule is skipped).
    ProbeInUse,
    /// `meta l4proto tcp; tcp dport @probe_decoys; tcp flags & (ack|rst) == 0; not loopback;
    /// meta nfproto F; saddr != @exempt; limit; update @set { <saddr> [timeout T] }; drop`
    ProbeTripwire(Family, Option<Duration>),
}

pub fn wanted_rules(tripwire: Option<&Tripwire>, probe: Option<&Tripwire>) -> Vec<RuleSpec> {
    let mut v = Vec::new();
    for chain in [CHAIN_INPUT, CHAIN_FORWARD] {
        for f in [Family::V4, Family::V6] {
            v.push(RuleSpec {
                chain,
                tag: format!("{RULE_MARK} drop {} bans", f.name()),
                kind: RuleKind::Drop(f, f.set()),
            });
        }
        for f in [Family::V4, Family::V6] {
            v.push(RuleSpec {
                chain,
                tag: format!("{RULE_MARK} drop {} prefix bans", f.name()),
                kind: RuleKind::Drop(f, f.prefix_set()),
            });
        }
        if chain == CHAIN_INPUT {
            if let Some(t) = tripwire {
                for f in [Family::V4, Family::V6] {
                    let timeout = t
                        .timeout
                        .map_or_else(|| "none".to_owned(), |d| format!("{}ms", millis(d)));
                    v.push(RuleSpec {
                        chain,
                        tag: format!("{RULE_MARK} tripwire {} timeout {timeout}", f.name()),
                        kind: RuleKind::Tripwire(f, t.timeout),
                    });
                }
            }
            if let Some(t) = probe {
                v.push(RuleSpec {
                    chain,
                    tag: format!("{RULE_MARK} probe tripwire skips ports in use"),
                    kind: RuleKind::ProbeInUse,
                });
                for f in [Family::V4, Family::V6] {
                    let timeout = t
                        .timeout
                        .map_or_else(|| "none".to_owned(), |d| format!("{}ms", millis(d)));
                    v.push(RuleSpec {
                        chain,
                        tag: format!(
                            "{RULE_MARK} probe tripwire {} timeout {timeout} rate {PROBE_TRIPWIRE_RATE}/s burst {PROBE_TRIPWIRE_BURST}",
                            f.name()
                        ),
                        kind: RuleKind::ProbeTripwire(f, t.timeout),
                    });
                }
            }
        }
    }
    v
}

impl RuleKind {
    /// Encodes the expression list (the contents of NFTA_RULE_EXPRESSIONS).
    pub fn encode(&self, e: &mut Enc) {
        match *self {
            RuleKind::Drop(f, set) => {
                expr_meta(e, NFT_META_NFPROTO);
                expr_cmp(e, NFT_CMP_EQ, &[f.nfproto()]);
                expr_saddr(e, f);
                expr(e, "lookup", |e| {
                    e.str(NFTA_LOOKUP_SET, set);
                    e.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
                });
                expr(e, "immediate", |e| {
                    e.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                    e.nest(NFTA_IMMEDIATE_DATA, |e| {
                        e.nest(NFTA_DATA_VERDICT, |e| e.be32(NFTA_VERDICT_CODE, NF_DROP));
                    });
                });
            }
            RuleKind::Tripwire(f, timeout) => {
                expr_tcp_dport_in(e, SET_DECOYS);
                // ct state is a host-endian bit mask: bit (ctinfo + 1), ESTABLISHED is ctinfo 0.
                expr(e, "ct", |e| {
                    e.be32(NFTA_CT_DREG, NFT_REG_1);
                    e.be32(NFTA_CT_KEY, NFT_CT_STATE);
                });
                expr(e, "bitwise", |e| {
                    e.be32(NFTA_BITWISE_SREG, NFT_REG_1);
                    e.be32(NFTA_BITWISE_DREG, NFT_REG_1);
                    e.be32(NFTA_BITWISE_LEN, 4);
                    e.nest(NFTA_BITWISE_MASK, |e| {
                        e.bytes(NFTA_DATA_VALUE, &CT_STATE_ESTABLISHED.to_ne_bytes());
                    });
                    e.nest(NFTA_BITWISE_XOR, |e| {
                        e.bytes(NFTA_DATA_VALUE, &0u32.to_ne_bytes());
                    });
                });
                expr_cmp(e, NFT_CMP_NEQ, &0u32.to_ne_bytes());
                // Never from loopback (that includes the host's own addresses).
                expr_meta(e, NFT_META_IIFTYPE);
                expr_cmp(e, NFT_CMP_NEQ, &ARPHRD_LOOPBACK.to_ne_bytes());
                expr_meta(e, NFT_META_NFPROTO);
                expr_cmp(e, NFT_CMP_EQ, &[f.nfproto()]);
                expr_saddr(e, f);
                expr(e, "lookup", |e| {
                    e.str(NFTA_LOOKUP_SET, f.exempt_set());
                    e.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
                    e.be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
                });
                expr(e, "dynset", |e| {
                    e.str(NFTA_DYNSET_SET_NAME, f.set());
                    e.be32(NFTA_DYNSET_OP, NFT_DYNSET_OP_UPDATE);
                    e.be32(NFTA_DYNSET_SREG_KEY, NFT_REG_1);
                    if let Some(t) = timeout {
                        e.be64(NFTA_DYNSET_TIMEOUT, millis(t));
                    }
                });
            }
            RuleKind::ProbeInUse => {
                expr_probe_match(e);
                // Loads nothing useful: the expression breaks (the rule does not match) when
                // the kernel finds no socket for the packet, listeners and TIME_WAIT included.
                expr(e, "socket", |e| {
                    e.be32(NFTA_SOCKET_KEY, NFT_SOCKET_TRANSPARENT);
                    e.be32(NFTA_SOCKET_DREG, NFT_REG_1);
                });
                expr_verdict(e, NF_ACCEPT);
            }
            RuleKind::ProbeTripwire(f, timeout) => {
                expr_probe_match(e);
                expr_meta(e, NFT_META_IIFTYPE);
                expr_cmp(e, NFT_CMP_NEQ, &ARPHRD_LOOPBACK.to_ne_bytes());
                expr_meta(e, NFT_META_NFPROTO);
                expr_cmp(e, NFT_CMP_EQ, &[f.nfproto()]);
                expr_saddr(e, f);
                expr(e, "lookup", |e| {
                    e.str(NFTA_LOOKUP_SET, f.exempt_set());
                    e.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
                    e.be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
                });
                expr(e, "limit", |e| {
                    e.be64(NFTA_LIMIT_RATE, PROBE_TRIPWIRE_RATE);
                    e.be64(NFTA_LIMIT_UNIT, 1);
                    e.be32(NFTA_LIMIT_BURST, PROBE_TRIPWIRE_BURST);
                    e.be32(NFTA_LIMIT_TYPE, NFT_LIMIT_PKTS);
                    e.be32(NFTA_LIMIT_FLAGS, 0);
                });
                // The limit leaves register 1 alone: it still holds the source address.
                expr(e, "dynset", |e| {
                    e.str(NFTA_DYNSET_SET_NAME, f.set());
                    e.be32(NFTA_DYNSET_OP, NFT_DYNSET_OP_UPDATE);
                    e.be32(NFTA_DYNSET_SREG_KEY, NFT_REG_1);
                    if let Some(t) = timeout {
                        e.be64(NFTA_DYNSET_TIMEOUT, millis(t));
                    }
                });
                expr_verdict(e, NF_DROP);
            }
        }
    }
}

/// `meta l4proto tcp; tcp dport @set`.
fn expr_tcp_dport_in(e: &mut Enc, set: &str) {
    expr_meta(e, NFT_META_L4PROTO);
    expr_cmp(e, NFT_CMP_EQ, &[IPPROTO_TCP]);
    expr(e, "payload", |e| {
        e.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        e.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER);
        e.be32(NFTA_PAYLOAD_OFFSET, 2); // TCP destination port
        e.be32(NFTA_PAYLOAD_LEN, 2);
    });
    expr(e, "lookup", |e| {
        e.str(NFTA_LOOKUP_SET, set);
        e.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
    });
}

/// `meta l4proto tcp; tcp dport @probe_decoys; tcp flags & (ack|rst) == 0`.
fn expr_probe_match(e: &mut Enc) {
    expr_tcp_dport_in(e, SET_PROBE_DECOYS);
    expr(e, "payload", |e| {
        e.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        e.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_TRANSPORT_HEADER);
        e.be32(NFTA_PAYLOAD_OFFSET, 13); // TCP flags
        e.be32(NFTA_PAYLOAD_LEN, 1);
    });
    expr(e, "bitwise", |e| {
        e.be32(NFTA_BITWISE_SREG, NFT_REG_1);
        e.be32(NFTA_BITWISE_DREG, NFT_REG_1);
        e.be32(NFTA_BITWISE_LEN, 1);
        e.nest(NFTA_BITWISE_MASK, |e| {
            e.bytes(NFTA_DATA_VALUE, &[TCP_ACK | TCP_RST]);
        });
        e.nest(NFTA_BITWISE_XOR, |e| e.bytes(NFTA_DATA_VALUE, &[0]));
    });
    expr_cmp(e, NFT_CMP_EQ, &[0]);
}

fn expr_verdict(e: &mut Enc, code: u32) {
    expr(e, "immediate", |e| {
        e.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        e.nest(NFTA_IMMEDIATE_DATA, |e| {
            e.nest(NFTA_DATA_VERDICT, |e| e.be32(NFTA_VERDICT_CODE, code));
        });
    });
}

fn expr(e: &mut Enc, name: &str, data: impl FnOnce(&mut Enc)) {
    e.nest(NFTA_LIST_ELEM, |e| {
        e.str(NFTA_EXPR_NAME, name);
        e.nest(NFTA_EXPR_DATA, data);
    });
}

fn expr_meta(e: &mut Enc, key: u32) {
    expr(e, "meta", |e| {
        e.be32(NFTA_META_KEY, key);
        e.be32(NFTA_META_DREG, NFT_REG_1);
    });
}

fn expr_cmp(e: &mut Enc, op: u32, value: &[u8]) {
    expr(e, "cmp", |e| {
        e.be32(NFTA_CMP_SREG, NFT_REG_1);
        e.be32(NFTA_CMP_OP, op);
        e.nest(NFTA_CMP_DATA, |e| e.bytes(NFTA_DATA_VALUE, value));
    });
}

fn expr_saddr(e: &mut Enc, f: Family) {
    let (offset, len) = f.saddr();
    expr(e, "payload", |e| {
        e.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        e.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
        e.be32(NFTA_PAYLOAD_OFFSET, offset);
        e.be32(NFTA_PAYLOAD_LEN, len);
    });
}
