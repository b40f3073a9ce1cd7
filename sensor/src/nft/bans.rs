//! [`NftBans`], the sensor's nftables response: bans of addresses and prefixes, their
//! reconciliation to the engine's list, and the in-kernel tripwires, on one locked table.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use ipnet::IpNet;

use super::{
    batch::{self, Batch},
    elems::{Elem, port_interval_elems, ports_of_interval_elems},
    error::{NftError, errno_of},
    layout::*,
    prefixes::{Piece, Target, longer, longest_first, nets_of_range, paint, same_pieces, subtract},
    rules::Tripwire,
    table::{self, ElemOps, Table},
    uapi::*,
};
use crate::netlink::{NetlinkSocket, codec::NLM_F_CREATE};

/// The sensor's nftables table: timed IPv4/IPv6 ban sets, drop chains, optional tripwire.
///
/// What [`NftBans`] keeps in the kernel (shown as `nft list table inet NAME` prints it):
///
/// ```text
/// table inet NAME {
///     set bans4 { type ipv4_addr; size 65535; flags dynamic,timeout; }
///     set bans6 { type ipv6_addr; size 65535; flags dynamic,timeout; }
///     set prefix_bans4 { type ipv4_addr; size 65535; flags interval,timeout; }
///     set prefix_bans6 { type ipv6_addr; size 65535; flags interval,timeout; }
///     set decoys { type inet_service; }
///     set exempt4 { type ipv4_addr; flags interval; }
///     set exempt6 { type ipv6_addr; flags interval; }
///     chain input {
///         type filter hook input priority filter - 10; policy accept;
///         ip saddr @bans4 drop comment "portsentry: drop ipv4 bans"
///         ip6 saddr @bans6 drop comment "portsentry: drop ipv6 bans"
///         ip saddr @prefix_bans4 drop comment "portsentry: drop ipv4 prefix bans"
///         ip6 saddr @prefix_bans6 drop comment "portsentry: drop ipv6 prefix bans"
///         # with install_tripwire(ports, Some(1h)):
///         tcp dport @decoys ct state established meta iiftype != loopback ip saddr != @exempt4 update @bans4 { ip saddr timeout 1h } comment ".."
///         tcp dport @decoys ct state established meta iiftype != loopback ip6 saddr != @exempt6 update @bans6 { ip6 saddr timeout 1h } comment ".."
///         # with install_probe_tripwire(ports, Some(1h)) (set probe_decoys { type inet_service; flags interval; }):
///         tcp dport @probe_decoys tcp flags & (ack|rst) == 0 socket transparent accept comment ".."
///         tcp dport @probe_decoys tcp flags & (ack|rst) == 0 meta iiftype != loopback ip saddr != @exempt4 limit rate 50/second burst 100 packets update @bans4 { ip saddr timeout 1h } drop comment ".."
///         (the same for ip6)
///     }
///     chain forward {
///         type filter hook forward priority filter - 10; policy accept;
///         ip saddr @bans4 drop comment ".."
///         ip6 saddr @bans6 drop comment ".."
///         ip saddr @prefix_bans4 drop comment ".."
///         ip6 saddr @prefix_bans6 drop comment ".."
///     }
/// }
/// ```
///
/// Single addresses go to `bans4`/`bans6`, hash sets the tripwires add to from the packet
/// path (`update @bans4`). Prefixes go to `prefix_bans4`/`prefix_bans6`: interval sets, so a
/// network of any size is one range, `[first, last + 1)` as two elements laid out as `nft`
/// does. They are separate sets because nf_tables has no set type that is both: an interval
/// set cannot be `dynamic` and a rule cannot `update` it (the kernel answers EOPNOTSUPP,
/// checked on 6.18). Interval sets refuse overlapping ranges, so the prefixes are merged
/// into disjoint ranges first; where overlapping prefixes have different timeouts every
/// address gets the longest of them (the ranges are cut where the timeout changes).
///
/// Every batch is one nf_tables transaction: the packet path sees either the old or the new
/// state, never a half-built chain. Rules carry a comment tag; [`NftBans::reconcile`] reads the
/// rules back and rebuilds the chains (not the sets) when the tags differ from what they should
/// be, and then adds and removes set elements until the kernel holds exactly the given bans.
/// The tripwire rule does not drop the handshake-completing packet: it reaches the decoy's
/// listener, so user space still logs, records and reports the hit; later packets of the
/// source meet the drop rule first. Tripwire elements carry no comment (elements added by
/// [`NftBans::ban`] carry `comment "portsentry"`); reconcile keeps them for [`TRIPWIRE_GRACE`]
/// when the tripwire has a timeout, and removes them like any other unlisted ban after that
/// (with a tripwire without timeout their age is unknown: the engine should list them at once).
///
/// All methods take `&self` and are safe to call from several threads; each call is a few
/// netlink round trips and blocks at most a few seconds if the kernel does not answer.
/// [`NftBans::ban`] has a netlink socket of its own, opened with the table: a ban is one
/// transaction that never waits for a reconcile's dumps to finish (they hold the table's
/// socket for several round trips, longer when a loaded machine preempts them).
#[derive(Debug)]
pub struct NftBans {
    table: String,
    inner: Mutex<Table>,
    /// The ban path's own socket; only [`NftBans::ban`] takes it.
    ban_socket: Mutex<NetlinkSocket>,
}

impl NftBans {
    /// Opens a netlink socket and creates (or checks) the table `inet <table>`, its sets and chains.
    ///
    /// Idempotent: elements already in the sets are kept. A tripwire left by an earlier process
    /// is removed until [`NftBans::install_tripwire`] is called again.
    pub fn open(table: &str) -> Result<Self, NftError> {
        if table.is_empty() || table.len() > NAME_MAX || table.contains('\0') {
            return Err(NftError::InvalidName(table.to_owned()));
        }
        let nl = batch::open()?;
        let ban_socket = Mutex::new(batch::open()?);
        let bans = NftBans {
            table: table.to_owned(),
            ban_socket,
            inner: Mutex::new(Table {
                name: table.to_owned(),
                nl,
                tripwire: None,
                probe: None,
                exempt: Vec::new(),
            }),
        };
        {
            let mut inner = bans.lock();
            inner.ensure(false)?;
        }
        Ok(bans)
    }

    /// Name of the table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Puts `addr` in its family's ban set for `timeout` from now (`None`: no timeout, PortSentry's
    /// forever). An address already banned gets the new timeout. One transaction on the ban
    /// path's own socket; recreates the table first if someone deleted it.
    pub fn ban(&self, addr: IpAddr, timeout: Option<Duration>) -> Result<(), NftError> {
        let addr = addr.to_canonical();
        let ops = ElemOps {
            replace: vec![(addr, timeout)],
            ..ElemOps::default()
        };
        let first = {
            let mut socket = self
                .ban_socket
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            table::apply(&mut socket, &self.table, &ops, "ban")
        };
        match first {
            Err(NftError::Kernel { source, .. }) if errno_of(&source) == Some(ENOENT) => {
                let mut inner = self.lock();
                inner.ensure(true)?;
                inner.apply(&ops, "ban")
            }
            other => other,
        }
    }

    /// Takes `addr` out of its ban set. Not banned (or no table) is not an error.
    pub fn unban(&self, addr: IpAddr) -> Result<(), NftError> {
        let addr = addr.to_canonical();
        let mut inner = self.lock();
        let mut batch = Batch::new(&mut inner.nl);
        batch.set_elems(
            NFT_MSG_DELSETELEM,
            0,
            &self.table,
            set_of(addr),
            &[Elem::key(addr)],
        );
        match batch.commit(&mut inner.nl) {
            Err(e) if errno_of(&e) == Some(ENOENT) => Ok(()),
            other => other.map_err(|e| NftError::kernel(&self.table, "unban", e)),
        }
    }

    /// The kernel's current ban elements, both families, with their remaining timeout.
    pub fn banned(&self) -> Result<Vec<(IpAddr, Option<Duration>)>, NftError> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for set in [SET_V4, SET_V6] {
            let elems = inner.dump_elems(set, "list bans")?.unwrap_or_default();
            out.extend(
                elems
                    .into_iter()
                    .filter_map(|e| Some((e.addr()?, e.remaining()))),
            );
        }
        Ok(out)
    }

    /// Makes the kernel equal to `active`: recreates the table, sets and chains if they were
    /// deleted or flushed, adds missing bans, removes others, and resets a ban whose remaining
    /// timeout differs from the wanted one by more than [`TIMEOUT_TOLERANCE`]. Elements the
    /// tripwire added in the last [`TRIPWIRE_GRACE`] are kept (user space is about to report them).
    /// The prefix sets are emptied (see [`NftBans::reconcile_nets`] to list prefixes too). An
    /// address listed twice gets the longer timeout.
    pub fn reconcile(&self, active: &[(IpAddr, Option<Duration>)]) -> Result<(), NftError> {
        self.reconcile_keeping(active, &|_| false)
    }

    /// [`NftBans::reconcile`], keeping the unlisted addresses `keep` names: it is asked after
    /// the kernel's elements were read, so a caller whose bans run concurrently (the ban path
    /// does not wait for a reconcile) names the bans it started after choosing `active`.
    pub fn reconcile_keeping(
        &self,
        active: &[(IpAddr, Option<Duration>)],
        keep: &dyn Fn(IpAddr) -> bool,
    ) -> Result<(), NftError> {
        let nets: Vec<(IpNet, Option<Duration>)> = active
            .iter()
            .map(|(addr, timeout)| (IpNet::from(*addr), *timeout))
            .collect();
        self.reconcile_nets_keeping(&nets, keep)
    }

    /// Makes the kernel equal to `active`, addresses and networks: a /32 or /128 (an address)
    /// is reconciled in the address sets as [`NftBans::reconcile`] does, any other prefix in the
    /// prefix sets, whatever its size. Overlapping and adjacent prefixes are merged into
    /// disjoint ranges; an address several entries cover gets the longest timeout. A prefix set
    /// is left alone when its ranges and their timeouts (within [`TIMEOUT_TOLERANCE`]) are the
    /// wanted ones, and otherwise rewritten in one transaction (up to 512 ranges per family;
    /// the packet path sees the old or the new set). IPv4-mapped IPv6 prefixes are
    /// banned as the IPv4 prefixes they map.
    pub fn reconcile_nets(&self, active: &[(IpNet, Option<Duration>)]) -> Result<(), NftError> {
        self.reconcile_nets_keeping(active, &|_| false)
    }

    fn reconcile_nets_keeping(
        &self,
        active: &[(IpNet, Option<Duration>)],
        keep: &dyn Fn(IpAddr) -> bool,
    ) -> Result<(), NftError> {
        let mut inner = self.lock();
        inner.ensure(false)?;
        let mut addrs: BTreeMap<IpAddr, Option<Duration>> = BTreeMap::new();
        let mut ranges: [Vec<Piece>; 2] = [Vec::new(), Vec::new()];
        for (net, timeout) in active {
            let target = Target::of(*net);
            match target.addr() {
                Some(addr) => {
                    let entry = addrs.entry(addr).or_insert(*timeout);
                    *entry = longer(*entry, *timeout);
                }
                None => ranges[usize::from(target.v6)].push(target.piece(*timeout)),
            }
        }
        for v6 in [false, true] {
            let mut want = std::mem::take(&mut ranges[usize::from(v6)]);
            want.sort_by(|a, b| longest_first(a.timeout, b.timeout));
            let want = paint(want);
            let have = inner
                .prefix_pieces(v6, "reconcile prefixes")?
                .unwrap_or_default();
            if !same_pieces(&have, &want) {
                inner.write_prefixes(v6, &want, "reconcile prefixes")?;
            }
        }
        inner.reconcile_addrs(&addrs, keep)
    }

    /// Bans every address of `net` for `timeout` from now (`None`: no timeout) with one range
    /// in its family's prefix set, whatever the prefix's size. Addresses of `net` already in a
    /// banned prefix get the new timeout; the rest of that prefix keeps its own. A /32 or /128
    /// is an address: banned as [`NftBans::ban`] does. The set is rewritten in one
    /// transaction. Recreates the table first if someone deleted it.
    pub fn ban_prefix(&self, net: IpNet, timeout: Option<Duration>) -> Result<(), NftError> {
        let target = Target::of(net);
        if let Some(addr) = target.addr() {
            return self.ban(addr, timeout);
        }
        let op = "ban prefix";
        let mut inner = self.lock();
        let have = match inner.prefix_pieces(target.v6, op)? {
            Some(have) => have,
            None => {
                inner.ensure(true)?;
                Vec::new()
            }
        };
        let pieces = paint(std::iter::once(target.piece(timeout)).chain(have));
        match inner.write_prefixes(target.v6, &pieces, op) {
            Err(NftError::Kernel { source, .. }) if errno_of(&source) == Some(ENOENT) => {
                inner.ensure(true)?;
                inner.write_prefixes(target.v6, &pieces, op)
            }
            other => other,
        }
    }

    /// Takes every address of `net` out of the prefix sets: a larger banned prefix keeps the
    /// rest of its addresses. A /32 or /128 is also taken out of the address set. Not banned
    /// (or no table) is not an error.
    pub fn unban_prefix(&self, net: IpNet) -> Result<(), NftError> {
        let target = Target::of(net);
        if let Some(addr) = target.addr() {
            self.unban(addr)?;
        }
        let op = "unban prefix";
        let mut inner = self.lock();
        let Some(have) = inner.prefix_pieces(target.v6, op)? else {
            return Ok(());
        };
        if !have
            .iter()
            .any(|p| p.first <= target.last && p.last >= target.first)
        {
            return Ok(());
        }
        let left = subtract(&have, target.first, target.last);
        match inner.write_prefixes(target.v6, &left, op) {
            Err(NftError::Kernel { source, .. }) if errno_of(&source) == Some(ENOENT) => Ok(()),
            other => other,
        }
    }

    /// The kernel's prefix ban ranges, both families, as CIDR prefixes (a range that is no
    /// single prefix, as after [`NftBans::unban_prefix`] cut a hole, is listed as the prefixes
    /// that make it up) with their remaining timeout.
    pub fn banned_prefixes(&self) -> Result<Vec<(IpNet, Option<Duration>)>, NftError> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for v6 in [false, true] {
            for p in inner
                .prefix_pieces(v6, "list prefix bans")?
                .unwrap_or_default()
            {
                out.extend(
                    nets_of_range(p.first, p.last, v6)
                        .into_iter()
                        .map(|net| (net, p.timeout)),
                );
            }
        }
        Ok(out)
    }

    /// Installs (or replaces) the in-kernel tripwire: a TCP connection to one of `tcp_decoys`
    /// that reaches `ct state established` (a completed handshake, so the source is proven)
    /// puts the source in the ban set with `timeout` (`None`: no timeout) from the packet path.
    /// An empty port list removes the tripwire. Reconcile keeps it in place.
    pub fn install_tripwire(
        &self,
        tcp_decoys: &[u16],
        timeout: Option<Duration>,
    ) -> Result<(), NftError> {
        let mut ports = tcp_decoys.to_vec();
        ports.sort_unstable();
        ports.dedup();
        let mut inner = self.lock();
        inner.tripwire = (!ports.is_empty()).then_some(Tripwire { ports, timeout });
        inner.ensure(true)
    }

    /// Sets the networks the tripwire never bans: the ignore list, the node's own addresses, the
    /// API server, the operator (loopback traffic is always exempt). User space never bans
    /// them either; this keeps the kernel from doing it before user space is asked. Replaces
    /// the previous list; reconcile keeps it in place.
    pub fn set_tripwire_exempt(&self, nets: &[IpNet]) -> Result<(), NftError> {
        let mut inner = self.lock();
        inner.exempt = IpNet::aggregate(&nets.iter().map(IpNet::trunc).collect());
        inner.ensure(true)
    }

    /// Installs (or replaces) the probe tripwire of the raw modes (`-stcp`, `-atcp`): a TCP
    /// packet without ACK and RST (SYN, FIN, NULL, XMAS: the probes PortSentry's stealth
    /// modes detect) to one of `tcp_decoys` on which no socket exists puts the source in the
    /// ban set with `timeout` (`None`: no timeout) and is dropped, from the packet path.
    /// Such a packet does not prove its source (only call this when unverified evidence may
    /// ban). Whether a socket exists is the kernel's own lookup for that packet (nft
    /// `socket`, the one that would deliver it), so a service that starts later is never
    /// a decoy even before [`NftBans::set_probe_decoys`] takes its port out. Loopback,
    /// the exempt networks ([`NftBans::set_tripwire_exempt`]) and packets past
    /// [`PROBE_TRIPWIRE_RATE`] bans a second are left alone. The packet-capture socket
    /// still sees the probe, so user space logs and records the ban as any other. An empty
    /// port list removes the probe tripwire. Reconcile keeps it in place.
    pub fn install_probe_tripwire(
        &self,
        tcp_decoys: &[u16],
        timeout: Option<Duration>,
    ) -> Result<(), NftError> {
        let mut ports = tcp_decoys.to_vec();
        ports.sort_unstable();
        ports.dedup();
        let mut inner = self.lock();
        inner.probe = (!ports.is_empty()).then_some(Tripwire { ports, timeout });
        inner.ensure(true)
    }

    /// Replaces the probe tripwire's decoy ports (one transaction: the packet path sees the
    /// old or the new set), keeping its rules; does nothing without a probe tripwire or when
    /// the ports are unchanged. Returns whether the kernel was changed. Cheap enough to call
    /// every second: the ports go to the kernel as ranges.
    pub fn set_probe_decoys(&self, tcp_decoys: &[u16]) -> Result<bool, NftError> {
        let mut ports = tcp_decoys.to_vec();
        ports.sort_unstable();
        ports.dedup();
        let mut inner = self.lock();
        let Some(probe) = inner.probe.as_mut() else {
            return Ok(false);
        };
        if probe.ports == ports {
            return Ok(false);
        }
        probe.ports = ports;
        let elems = port_interval_elems(&probe.ports);
        let mut b = Batch::new(&mut inner.nl);
        b.msg(NFT_MSG_DELSETELEM, 0, |e| {
            e.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
            e.str(NFTA_SET_ELEM_LIST_SET, SET_PROBE_DECOYS);
        });
        b.set_elems(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            &self.table,
            SET_PROBE_DECOYS,
            &elems,
        );
        match b.commit(&mut inner.nl) {
            Ok(()) => Ok(true),
            Err(e) if errno_of(&e) == Some(ENOENT) => inner.ensure(true).map(|()| true),
            Err(e) => Err(NftError::kernel(&self.table, "set probe decoys", e)),
        }
    }

    /// The probe tripwire's decoy ports as the kernel holds them (empty without one).
    pub fn probe_decoys(&self) -> Result<Vec<u16>, NftError> {
        let mut inner = self.lock();
        let elems = inner
            .dump_elems(SET_PROBE_DECOYS, "list probe decoys")?
            .unwrap_or_default();
        Ok(ports_of_interval_elems(&elems))
    }

    /// Deletes the whole table (sets, chains, bans). Already gone is not an error.
    pub fn remove(&self) -> Result<(), NftError> {
        let mut inner = self.lock();
        delete_table(&mut inner.nl, &self.table)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves nothing half-done in user space: the kernel
        // state is re-read on every call, so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Deletes the table `inet <table>` of the calling thread's network namespace without
/// creating it first (e.g. one an earlier process left). Already gone is not an error.
pub fn remove_table(table: &str) -> Result<(), NftError> {
    delete_table(&mut batch::open()?, table)
}

fn delete_table(nl: &mut NetlinkSocket, table: &str) -> Result<(), NftError> {
    let mut batch = Batch::new(nl);
    batch.msg(NFT_MSG_DELTABLE, 0, |e| e.str(NFTA_TABLE_NAME, table));
    match batch.commit(nl) {
        Err(e) if errno_of(&e) == Some(ENOENT) => Ok(()),
        other => other.map_err(|e| NftError::kernel(table, "remove table", e)),
    }
}
