//! The sensor's table in the kernel as one connection sees it: creating or repairing its
//! sets and chains, applying element changes in batches, and reading elements and rules back.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;

use super::{
    batch::{Batch, dump},
    elems::{Elem, KernelElem, exempt_elems, port_interval_elems, ports_of_interval_elems},
    error::{NftError, errno_of},
    layout::*,
    prefixes::{Piece, piece_elems, pieces_of_elems},
    rules::{Tripwire, wanted_rules},
    uapi::*,
};
use crate::netlink::{
    Attrs, NetlinkSocket,
    codec::{NLM_F_APPEND, NLM_F_CREATE},
};

/// One connection to the table `inet <name>` and what it should hold besides bans.
#[derive(Debug)]
pub struct Table {
    pub name: String,
    pub nl: NetlinkSocket,
    pub tripwire: Option<Tripwire>,
    /// The probe tripwire of the raw modes (first SYN/FIN/NULL/XMAS to a free decoy port).
    pub probe: Option<Tripwire>,
    /// Aggregated networks the tripwire must not ban.
    pub exempt: Vec<IpNet>,
}

#[derive(Debug, Default)]
pub struct ElemOps {
    pub add: Vec<(IpAddr, Option<Duration>)>,
    pub replace: Vec<(IpAddr, Option<Duration>)>,
    pub remove: Vec<IpAddr>,
}

impl ElemOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.remove.is_empty()
    }
}

impl Table {
    /// Rebuilds table, sets and chains if `force` or if the kernel's rules (or decoy ports)
    /// differ from what they should be. Set elements are never touched here.
    pub fn ensure(&mut self, force: bool) -> Result<(), NftError> {
        let want = wanted_rules(self.tripwire.as_ref(), self.probe.as_ref());
        if !force {
            let have = self.dump_rule_tags()?;
            let mut rules_ok = true;
            for chain in [CHAIN_INPUT, CHAIN_FORWARD] {
                let w: Vec<&str> = want
                    .iter()
                    .filter(|r| r.chain == chain)
                    .map(|r| r.tag.as_str())
                    .collect();
                let h: Vec<&str> = have
                    .get(chain)
                    .map(|v| v.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                rules_ok &= w == h && have.contains_key(chain);
            }
            let (tripwire, probe) = (self.tripwire.clone(), self.probe.clone());
            let decoys_ok = match (&tripwire, &probe, rules_ok) {
                (_, _, false) => false,
                (None, None, true) => true,
                (tripwire, probe, true) => {
                    let ports: BTreeSet<u16> = self
                        .dump_elems(SET_DECOYS, "check decoys")?
                        .unwrap_or_default()
                        .iter()
                        .filter_map(KernelElem::port)
                        .collect();
                    let mut ok = ports
                        .into_iter()
                        .eq(tripwire.iter().flat_map(|t| t.ports.iter().copied()));
                    let probe_ports = ports_of_interval_elems(
                        &self
                            .dump_elems(SET_PROBE_DECOYS, "check probe decoys")?
                            .unwrap_or_default(),
                    );
                    ok &= probe_ports
                        .into_iter()
                        .eq(probe.iter().flat_map(|t| t.ports.iter().copied()));
                    for (set, v6) in [(SET_EXEMPT_V4, false), (SET_EXEMPT_V6, true)] {
                        let mut have: Vec<(Vec<u8>, bool)> = self
                            .dump_elems(set, "check exempt networks")?
                            .unwrap_or_default()
                            .into_iter()
                            .map(|e| (e.key, e.end))
                            .collect();
                        have.sort();
                        let mut want: Vec<(Vec<u8>, bool)> = exempt_elems(&self.exempt, v6)
                            .into_iter()
                            .map(|e| (e.key, e.end))
                            .collect();
                        want.sort();
                        ok &= have == want;
                    }
                    ok
                }
            };
            if rules_ok && decoys_ok {
                return Ok(());
            }
        }
        let mut b = Batch::new(&mut self.nl);
        b.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, |e| {
            e.str(NFTA_TABLE_NAME, &self.name);
            e.be32(NFTA_TABLE_FLAGS, 0);
        });
        for (id, set, ktype, klen, flags) in [
            (1, SET_V4, TYPE_IPADDR, 4, NFT_SET_TIMEOUT | NFT_SET_EVAL),
            (2, SET_V6, TYPE_IP6ADDR, 16, NFT_SET_TIMEOUT | NFT_SET_EVAL),
            (3, SET_DECOYS, TYPE_INET_SERVICE, 2, 0),
            (4, SET_EXEMPT_V4, TYPE_IPADDR, 4, NFT_SET_INTERVAL),
            (5, SET_EXEMPT_V6, TYPE_IP6ADDR, 16, NFT_SET_INTERVAL),
            (6, SET_PROBE_DECOYS, TYPE_INET_SERVICE, 2, NFT_SET_INTERVAL),
            (
                7,
                SET_PREFIX_V4,
                TYPE_IPADDR,
                4,
                NFT_SET_INTERVAL | NFT_SET_TIMEOUT,
            ),
            (
                8,
                SET_PREFIX_V6,
                TYPE_IP6ADDR,
                16,
                NFT_SET_INTERVAL | NFT_SET_TIMEOUT,
            ),
        ] {
            b.msg(NFT_MSG_NEWSET, NLM_F_CREATE, |e| {
                e.str(NFTA_SET_TABLE, &self.name);
                e.str(NFTA_SET_NAME, set);
                // Required by the kernel; names the set within this transaction.
                e.be32(NFTA_SET_ID, id);
                e.be32(NFTA_SET_FLAGS, flags);
                e.be32(NFTA_SET_KEY_TYPE, ktype);
                e.be32(NFTA_SET_KEY_LEN, klen);
                if flags & NFT_SET_TIMEOUT != 0 {
                    e.nest(NFTA_SET_DESC, |e| e.be32(NFTA_SET_DESC_SIZE, SET_SIZE));
                }
            });
        }
        for (chain, hook) in [
            (CHAIN_INPUT, NF_INET_LOCAL_IN),
            (CHAIN_FORWARD, NF_INET_FORWARD),
        ] {
            b.msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |e| {
                e.str(NFTA_CHAIN_TABLE, &self.name);
                e.str(NFTA_CHAIN_NAME, chain);
                e.nest(NFTA_CHAIN_HOOK, |e| {
                    e.be32(NFTA_HOOK_HOOKNUM, hook);
                    e.be32(NFTA_HOOK_PRIORITY, PRIORITY as u32);
                });
                e.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                e.str(NFTA_CHAIN_TYPE, "filter");
            });
            // No rule handle: the kernel deletes every rule of the chain (a flush).
            b.msg(NFT_MSG_DELRULE, 0, |e| {
                e.str(NFTA_RULE_TABLE, &self.name);
                e.str(NFTA_RULE_CHAIN, chain);
            });
        }
        for rule in &want {
            b.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |e| {
                e.str(NFTA_RULE_TABLE, &self.name);
                e.str(NFTA_RULE_CHAIN, rule.chain);
                e.nest(NFTA_RULE_EXPRESSIONS, |e| rule.kind.encode(e));
                e.bytes(NFTA_RULE_USERDATA, &udata_comment(&rule.tag));
            });
        }
        for set in [SET_DECOYS, SET_EXEMPT_V4, SET_EXEMPT_V6, SET_PROBE_DECOYS] {
            // No element list: the kernel flushes the set.
            b.msg(NFT_MSG_DELSETELEM, 0, |e| {
                e.str(NFTA_SET_ELEM_LIST_TABLE, &self.name);
                e.str(NFTA_SET_ELEM_LIST_SET, set);
            });
        }
        for (set, v6) in [(SET_EXEMPT_V4, false), (SET_EXEMPT_V6, true)] {
            let elems = exempt_elems(&self.exempt, v6);
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.name, set, &elems);
        }
        if let Some(t) = &self.tripwire {
            let elems: Vec<Elem> = t.ports.iter().map(|p| Elem::port(*p)).collect();
            b.set_elems(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                &self.name,
                SET_DECOYS,
                &elems,
            );
        }
        if let Some(t) = &self.probe {
            b.set_elems(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                &self.name,
                SET_PROBE_DECOYS,
                &port_interval_elems(&t.ports),
            );
        }
        b.commit(&mut self.nl)
            .map_err(|e| NftError::kernel(&self.name, "create table, sets and chains", e))
    }

    /// Applies element changes in batches on this table's socket; see [`apply`].
    pub fn apply(&mut self, ops: &ElemOps, op: &'static str) -> Result<(), NftError> {
        apply(&mut self.nl, &self.name, ops, op)
    }

    /// The address half of [`NftBans::reconcile_nets`] (the table is ensured). An unwanted
    /// element is kept when `keep` says so, asked after the elements were read (a ban the
    /// caller started after choosing `want`).
    pub fn reconcile_addrs(
        &mut self,
        want: &BTreeMap<IpAddr, Option<Duration>>,
        keep: &dyn Fn(IpAddr) -> bool,
    ) -> Result<(), NftError> {
        let tripwire_timeouts: Vec<Option<Duration>> = [&self.tripwire, &self.probe]
            .into_iter()
            .flatten()
            .map(|t| t.timeout)
            .collect();
        let mut have: BTreeMap<IpAddr, KernelElem> = BTreeMap::new();
        for set in [SET_V4, SET_V6] {
            for e in self.dump_elems(set, "reconcile")?.unwrap_or_default() {
                if let Some(addr) = e.addr() {
                    have.insert(addr, e);
                }
            }
        }
        let mut ops = ElemOps::default();
        for (addr, timeout) in want {
            match have.get(addr) {
                None => ops.add.push((*addr, *timeout)),
                Some(e) if !close_enough(e.remaining(), *timeout) => {
                    ops.replace.push((*addr, *timeout))
                }
                Some(_) => {}
            }
        }
        for (addr, e) in &have {
            if !want.contains_key(addr)
                && !e.fresh_from_tripwire(&tripwire_timeouts)
                && !keep(*addr)
            {
                ops.remove.push(*addr);
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.apply(&ops, "reconcile")
    }

    /// The ranges of one family's prefix set; `None` when the table or set does not exist.
    pub fn prefix_pieces(
        &mut self,
        v6: bool,
        op: &'static str,
    ) -> Result<Option<Vec<Piece>>, NftError> {
        Ok(self
            .dump_elems(prefix_set(v6), op)?
            .map(|elems| pieces_of_elems(&elems, v6)))
    }

    /// Replaces one family's prefix set with `pieces` (sorted, disjoint): flush and add in
    /// one transaction, or, past [`RANGES_PER_BATCH`] ranges, the flush and the first ranges
    /// in the first of several.
    pub fn write_prefixes(
        &mut self,
        v6: bool,
        pieces: &[Piece],
        op: &'static str,
    ) -> Result<(), NftError> {
        let set = prefix_set(v6);
        let chunks: Vec<&[Piece]> = if pieces.is_empty() {
            vec![&[]]
        } else {
            pieces.chunks(RANGES_PER_BATCH).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut b = Batch::new(&mut self.nl);
            if i == 0 {
                // No element list: the kernel flushes the set.
                b.msg(NFT_MSG_DELSETELEM, 0, |e| {
                    e.str(NFTA_SET_ELEM_LIST_TABLE, &self.name);
                    e.str(NFTA_SET_ELEM_LIST_SET, set);
                });
            }
            let elems = piece_elems(chunk, v6, i == 0);
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.name, set, &elems);
            if let Err(e) = b.commit(&mut self.nl) {
                if errno_of(&e) == Some(ENFILE) {
                    return Err(NftError::SetFull {
                        table: self.name.clone(),
                        set,
                    });
                }
                return Err(NftError::kernel(&self.name, op, e));
            }
        }
        Ok(())
    }

    /// Rule comment tags per chain, in rule order (empty map: no table).
    pub fn dump_rule_tags(&mut self) -> Result<BTreeMap<String, Vec<String>>, NftError> {
        let op = "read rules";
        let msgs = match dump(&mut self.nl, NFT_MSG_GETRULE, |e| {
            e.str(NFTA_RULE_TABLE, &self.name)
        }) {
            Ok(m) => m,
            Err(e) if errno_of(&e) == Some(ENOENT) => return Ok(BTreeMap::new()),
            Err(e) => return Err(NftError::kernel(&self.name, op, e)),
        };
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in msgs {
            let mut chain = None;
            let mut tag = String::new();
            for (ty, data) in Attrs::new(&m) {
                match ty {
                    NFTA_RULE_CHAIN => chain = Some(cstr(data)),
                    NFTA_RULE_USERDATA => tag = udata_comment_of(data).unwrap_or_default(),
                    _ => {}
                }
            }
            let chain = chain.ok_or_else(|| NftError::Protocol {
                op,
                detail: "rule without chain name".into(),
            })?;
            out.entry(chain).or_default().push(tag);
        }
        Ok(out)
    }

    /// Elements of `set`; `None` when the table or set does not exist.
    pub fn dump_elems(
        &mut self,
        set: &str,
        op: &'static str,
    ) -> Result<Option<Vec<KernelElem>>, NftError> {
        let msgs = match dump(&mut self.nl, NFT_MSG_GETSETELEM, |e| {
            e.str(NFTA_SET_ELEM_LIST_TABLE, &self.name);
            e.str(NFTA_SET_ELEM_LIST_SET, set);
        }) {
            Ok(m) => m,
            Err(e) if errno_of(&e) == Some(ENOENT) => return Ok(None),
            Err(e) => return Err(NftError::kernel(&self.name, op, e)),
        };
        let mut out = Vec::new();
        for m in msgs {
            for (ty, list) in Attrs::new(&m) {
                if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
                    continue;
                }
                for (ty, elem) in Attrs::new(list) {
                    if ty != NFTA_LIST_ELEM {
                        continue;
                    }
                    out.push(KernelElem::parse(elem).ok_or_else(|| NftError::Protocol {
                        op,
                        detail: format!("set element without key in {set}"),
                    })?);
                }
            }
        }
        Ok(Some(out))
    }
}

/// Applies element changes to the ban sets of `table` in batches over `nl` (any socket: the
/// ban path has one of its own); each address's changes stay in one batch (atomic).
pub fn apply(
    nl: &mut NetlinkSocket,
    table: &str,
    ops: &ElemOps,
    op: &'static str,
) -> Result<(), NftError> {
    // Per address: `pre` makes sure the element exists (add without NLM_F_EXCL is a no-op for
    // an existing element), so the following delete cannot fail with ENOENT even if the
    // element expired a moment ago; `post` adds it back with the wanted timeout.
    let mut steps: Vec<(IpAddr, bool, Option<Elem>)> = Vec::new(); // (addr, pre+del, post)
    for (a, t) in &ops.add {
        steps.push((*a, false, Some(Elem::ban(*a, *t))));
    }
    for (a, t) in &ops.replace {
        steps.push((*a, true, Some(Elem::ban(*a, *t))));
    }
    for a in &ops.remove {
        steps.push((*a, true, None));
    }
    for chunk in steps.chunks(ADDRS_PER_BATCH) {
        let mut b = Batch::new(nl);
        for set in [SET_V4, SET_V6] {
            let mine = || chunk.iter().filter(|s| set_of(s.0) == set);
            let pre: Vec<Elem> = mine().filter(|s| s.1).map(|s| Elem::key(s.0)).collect();
            let post: Vec<Elem> = mine().filter_map(|s| s.2.clone()).collect();
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, table, set, &pre);
            b.set_elems(NFT_MSG_DELSETELEM, 0, table, set, &pre);
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, table, set, &post);
        }
        if let Err(e) = b.commit(nl) {
            if errno_of(&e) == Some(ENFILE) {
                let set = chunk.first().map_or(SET_V4, |s| set_of(s.0));
                return Err(NftError::SetFull {
                    table: table.to_owned(),
                    set,
                });
            }
            return Err(NftError::kernel(table, op, e));
        }
    }
    Ok(())
}
