//! Native nftables response: the sensor's own inet table, timed IPv4/IPv6 ban sets, the tripwire.
//! Talks nf_tables over NETLINK_NETFILTER (no shell, no `nft`) and reconciles the kernel to the bans.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use socket2::{Domain, Protocol, Socket, Type};

/// Name of the IPv4 ban set in the sensor's table.
pub const SET_V4: &str = "bans4";
/// Name of the IPv6 ban set in the sensor's table.
pub const SET_V6: &str = "bans6";
/// Name of the IPv4 prefix ban set: an interval set, so a ban of a network of any size is
/// one range (see [`NftBans::ban_prefix`]).
pub const SET_PREFIX_V4: &str = "prefix_bans4";
/// Name of the IPv6 prefix ban set (an interval set, as [`SET_PREFIX_V4`]).
pub const SET_PREFIX_V6: &str = "prefix_bans6";
/// Name of the set of decoy TCP ports the tripwire watches.
pub const SET_DECOYS: &str = "decoys";
/// Interval set of TCP ports the probe tripwire watches (raw modes; see
/// [`NftBans::install_probe_tripwire`]).
pub const SET_PROBE_DECOYS: &str = "probe_decoys";
/// Most bans per second the probe tripwire adds (all sources together), with a burst of
/// [`PROBE_TRIPWIRE_BURST`]: as user space limits first-seen unverified alarms, so a
/// spoofed flood cannot fill the ban set from the packet path. Past it the probe goes on
/// to user space, which still sees and judges it.
pub const PROBE_TRIPWIRE_RATE: u64 = 50;
/// Burst of [`PROBE_TRIPWIRE_RATE`].
pub const PROBE_TRIPWIRE_BURST: u32 = 100;
/// Interval set of IPv4 networks the tripwire never bans (see [`NftBans::set_tripwire_exempt`]).
pub const SET_EXEMPT_V4: &str = "exempt4";
/// Interval set of IPv6 networks the tripwire never bans.
pub const SET_EXEMPT_V6: &str = "exempt6";
/// Base chain on the input hook.
pub const CHAIN_INPUT: &str = "input";
/// Base chain on the forward hook.
pub const CHAIN_FORWARD: &str = "forward";
/// Hook priority of both chains: just before the usual `filter` (0) chains.
pub const PRIORITY: i32 = -10;
/// Most elements a ban set holds (as `nft` gives dynamic sets); past it a ban fails with [`NftError::SetFull`].
pub const SET_SIZE: u32 = 65535;
/// Reconcile leaves an element alone when its remaining timeout is within this of the wanted one.
pub const TIMEOUT_TOLERANCE: Duration = Duration::from_secs(2);
/// Reconcile keeps an element the tripwire added (no user-space marker) for this long even if the
/// list does not have it yet: user space learns of the hit a moment after the kernel banned it.
pub const TRIPWIRE_GRACE: Duration = Duration::from_secs(10);

/// Comment stored on every element this module adds (`nft list` shows it).
const ELEMENT_MARK: &str = "portsentry";
/// Prefix of every rule comment; the rest of the comment says what the rule does.
const RULE_MARK: &str = "portsentry:";
/// How long to wait for the kernel's answer before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses handled per batch (keeps a batch well under the socket send buffer, which is the
/// largest message the kernel accepts).
const ADDRS_PER_BATCH: usize = 256;
/// Ranges handled per batch when a prefix set is rewritten (two elements each: well under the
/// socket send buffer). Up to this many ranges per family are replaced in one transaction.
const RANGES_PER_BATCH: usize = 512;
/// Largest name nf_tables accepts (NFT_NAME_MAXLEN, counting the trailing NUL).
const NAME_MAX: usize = 255;

/// Failure of an nftables operation; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The process may not change the firewall of its network namespace.
    #[error(
        "nftables {op} needs CAP_NET_ADMIN: run the sensor as root or add the NET_ADMIN capability \
         (Kubernetes: securityContext.capabilities.add: [NET_ADMIN])"
    )]
    Permission {
        /// What was being done.
        op: &'static str,
    },
    /// The kernel has no nf_tables (or no netlink for it).
    #[error(
        "nf_tables is not available in this kernel ({source}): load the module (modprobe nf_tables) \
         or turn the native nftables response off"
    )]
    Unavailable {
        /// The socket error.
        source: io::Error,
    },
    /// A name nf_tables would refuse.
    #[error("invalid nftables table name {0:?}: use 1 to 255 characters, no NUL")]
    InvalidName(String),
    /// The ban set has reached [`SET_SIZE`] elements.
    #[error(
        "nftables set {set} in table inet {table} is full ({SET_SIZE} elements): lower ban durations \
         or widen the ignore list; the ban was not added"
    )]
    SetFull {
        /// Table name.
        table: String,
        /// Set name.
        set: &'static str,
    },
    /// The kernel refused a request.
    #[error("the kernel refused nftables {op} on table inet {table}: {source}; {hint}")]
    Kernel {
        /// What was being done.
        op: &'static str,
        /// Table name.
        table: String,
        /// The errno the kernel answered.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// Talking to the kernel failed (socket I/O, timeout).
    #[error(
        "netlink I/O failed during nftables {op}: {source}; check that nf_tables works here (nft list tables)"
    )]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The kernel's reply could not be read.
    #[error(
        "malformed nf_tables reply during {op}: {detail}; this is a bug, please report it with the kernel version"
    )]
    Protocol {
        /// What was being done.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

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
#[derive(Debug)]
pub struct NftBans {
    table: String,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    nl: Netlink,
    tripwire: Option<Tripwire>,
    /// The probe tripwire of the raw modes (first SYN/FIN/NULL/XMAS to a free decoy port).
    probe: Option<Tripwire>,
    /// Aggregated networks the tripwire must not ban.
    exempt: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tripwire {
    ports: Vec<u16>,
    timeout: Option<Duration>,
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
        let nl = Netlink::open()?;
        let bans = NftBans {
            table: table.to_owned(),
            inner: Mutex::new(Inner {
                nl,
                tripwire: None,
                probe: None,
                exempt: Vec::new(),
            }),
        };
        {
            let mut inner = bans.lock();
            bans.ensure(&mut inner, false)?;
        }
        Ok(bans)
    }

    /// Name of the table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Puts `addr` in its family's ban set for `timeout` from now (`None`: no timeout, PortSentry's
    /// forever). An address already banned gets the new timeout. Recreates the table first if
    /// someone deleted it.
    pub fn ban(&self, addr: IpAddr, timeout: Option<Duration>) -> Result<(), NftError> {
        let addr = addr.to_canonical();
        let mut inner = self.lock();
        let ops = ElemOps {
            replace: vec![(addr, timeout)],
            ..ElemOps::default()
        };
        match self.apply(&mut inner, &ops, "ban") {
            Err(NftError::Kernel { source, .. }) if errno_of(&source) == Some(ENOENT) => {
                self.ensure(&mut inner, true)?;
                self.apply(&mut inner, &ops, "ban")
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
            other => other.map_err(|e| self.kernel("unban", e)),
        }
    }

    /// The kernel's current ban elements, both families, with their remaining timeout.
    pub fn banned(&self) -> Result<Vec<(IpAddr, Option<Duration>)>, NftError> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for set in [SET_V4, SET_V6] {
            let elems = self
                .dump_elems(&mut inner.nl, set, "list bans")?
                .unwrap_or_default();
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
        let nets: Vec<(IpNet, Option<Duration>)> = active
            .iter()
            .map(|(addr, timeout)| (IpNet::from(*addr), *timeout))
            .collect();
        self.reconcile_nets(&nets)
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
        let mut inner = self.lock();
        self.ensure(&mut inner, false)?;
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
            let have = self
                .prefix_pieces(&mut inner.nl, v6, "reconcile prefixes")?
                .unwrap_or_default();
            if !same_pieces(&have, &want) {
                self.write_prefixes(&mut inner.nl, v6, &want, "reconcile prefixes")?;
            }
        }
        self.reconcile_addrs(&mut inner, &addrs)
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
        let have = match self.prefix_pieces(&mut inner.nl, target.v6, op)? {
            Some(have) => have,
            None => {
                self.ensure(&mut inner, true)?;
                Vec::new()
            }
        };
        let pieces = paint(std::iter::once(target.piece(timeout)).chain(have));
        match self.write_prefixes(&mut inner.nl, target.v6, &pieces, op) {
            Err(NftError::Kernel { source, .. }) if errno_of(&source) == Some(ENOENT) => {
                self.ensure(&mut inner, true)?;
                self.write_prefixes(&mut inner.nl, target.v6, &pieces, op)
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
        let Some(have) = self.prefix_pieces(&mut inner.nl, target.v6, op)? else {
            return Ok(());
        };
        if !have
            .iter()
            .any(|p| p.first <= target.last && p.last >= target.first)
        {
            return Ok(());
        }
        let left = subtract(&have, target.first, target.last);
        match self.write_prefixes(&mut inner.nl, target.v6, &left, op) {
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
            for p in self
                .prefix_pieces(&mut inner.nl, v6, "list prefix bans")?
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

    /// The address half of [`NftBans::reconcile_nets`] (the table is ensured).
    fn reconcile_addrs(
        &self,
        inner: &mut Inner,
        want: &BTreeMap<IpAddr, Option<Duration>>,
    ) -> Result<(), NftError> {
        let tripwire_timeouts: Vec<Option<Duration>> = [&inner.tripwire, &inner.probe]
            .into_iter()
            .flatten()
            .map(|t| t.timeout)
            .collect();
        let mut have: BTreeMap<IpAddr, KernelElem> = BTreeMap::new();
        for set in [SET_V4, SET_V6] {
            for e in self
                .dump_elems(&mut inner.nl, set, "reconcile")?
                .unwrap_or_default()
            {
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
            if !want.contains_key(addr) && !e.fresh_from_tripwire(&tripwire_timeouts) {
                ops.remove.push(*addr);
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.apply(inner, &ops, "reconcile")
    }

    /// The ranges of one family's prefix set; `None` when the table or set does not exist.
    fn prefix_pieces(
        &self,
        nl: &mut Netlink,
        v6: bool,
        op: &'static str,
    ) -> Result<Option<Vec<Piece>>, NftError> {
        Ok(self
            .dump_elems(nl, prefix_set(v6), op)?
            .map(|elems| pieces_of_elems(&elems, v6)))
    }

    /// Replaces one family's prefix set with `pieces` (sorted, disjoint): flush and add in
    /// one transaction, or, past [`RANGES_PER_BATCH`] ranges, the flush and the first ranges
    /// in the first of several.
    fn write_prefixes(
        &self,
        nl: &mut Netlink,
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
            let mut b = Batch::new(nl);
            if i == 0 {
                // No element list: the kernel flushes the set.
                b.msg(NFT_MSG_DELSETELEM, 0, |e| {
                    e.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
                    e.str(NFTA_SET_ELEM_LIST_SET, set);
                });
            }
            let elems = piece_elems(chunk, v6, i == 0);
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.table, set, &elems);
            if let Err(e) = b.commit(nl) {
                if errno_of(&e) == Some(ENFILE) {
                    return Err(NftError::SetFull {
                        table: self.table.clone(),
                        set,
                    });
                }
                return Err(self.kernel(op, e));
            }
        }
        Ok(())
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
        self.ensure(&mut inner, true)
    }

    /// Sets the networks the tripwire never bans: the ignore list, the node's own addresses, the
    /// API server, the operator (loopback traffic is always exempt). User space never bans
    /// them either; this keeps the kernel from doing it before user space is asked. Replaces
    /// the previous list; reconcile keeps it in place.
    pub fn set_tripwire_exempt(&self, nets: &[IpNet]) -> Result<(), NftError> {
        let mut inner = self.lock();
        inner.exempt = IpNet::aggregate(&nets.iter().map(IpNet::trunc).collect());
        self.ensure(&mut inner, true)
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
        self.ensure(&mut inner, true)
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
            Err(e) if errno_of(&e) == Some(ENOENT) => self.ensure(&mut inner, true).map(|()| true),
            Err(e) => Err(self.kernel("set probe decoys", e)),
        }
    }

    /// The probe tripwire's decoy ports as the kernel holds them (empty without one).
    pub fn probe_decoys(&self) -> Result<Vec<u16>, NftError> {
        let mut inner = self.lock();
        let elems = self
            .dump_elems(&mut inner.nl, SET_PROBE_DECOYS, "list probe decoys")?
            .unwrap_or_default();
        Ok(ports_of_interval_elems(&elems))
    }

    /// Deletes the whole table (sets, chains, bans). Already gone is not an error.
    pub fn remove(&self) -> Result<(), NftError> {
        let mut inner = self.lock();
        let mut batch = Batch::new(&mut inner.nl);
        batch.msg(NFT_MSG_DELTABLE, 0, |e| e.str(NFTA_TABLE_NAME, &self.table));
        match batch.commit(&mut inner.nl) {
            Err(e) if errno_of(&e) == Some(ENOENT) => Ok(()),
            other => other.map_err(|e| self.kernel("remove table", e)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-done in user space: the kernel
        // state is re-read on every call, so a poisoned lock is safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rebuilds table, sets and chains if `force` or if the kernel's rules (or decoy ports)
    /// differ from what they should be. Set elements are never touched here.
    fn ensure(&self, inner: &mut Inner, force: bool) -> Result<(), NftError> {
        let want = wanted_rules(inner.tripwire.as_ref(), inner.probe.as_ref());
        if !force {
            let have = self.dump_rule_tags(&mut inner.nl)?;
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
            let decoys_ok = match (&inner.tripwire, &inner.probe, rules_ok) {
                (_, _, false) => false,
                (None, None, true) => true,
                (tripwire, probe, true) => {
                    let ports: BTreeSet<u16> = self
                        .dump_elems(&mut inner.nl, SET_DECOYS, "check decoys")?
                        .unwrap_or_default()
                        .iter()
                        .filter_map(KernelElem::port)
                        .collect();
                    let mut ok = ports
                        .into_iter()
                        .eq(tripwire.iter().flat_map(|t| t.ports.iter().copied()));
                    let probe_ports = ports_of_interval_elems(
                        &self
                            .dump_elems(&mut inner.nl, SET_PROBE_DECOYS, "check probe decoys")?
                            .unwrap_or_default(),
                    );
                    ok &= probe_ports
                        .into_iter()
                        .eq(probe.iter().flat_map(|t| t.ports.iter().copied()));
                    for (set, v6) in [(SET_EXEMPT_V4, false), (SET_EXEMPT_V6, true)] {
                        let mut have: Vec<(Vec<u8>, bool)> = self
                            .dump_elems(&mut inner.nl, set, "check exempt networks")?
                            .unwrap_or_default()
                            .into_iter()
                            .map(|e| (e.key, e.end))
                            .collect();
                        have.sort();
                        let mut want: Vec<(Vec<u8>, bool)> = exempt_elems(&inner.exempt, v6)
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
        let mut b = Batch::new(&mut inner.nl);
        b.msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, |e| {
            e.str(NFTA_TABLE_NAME, &self.table);
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
                e.str(NFTA_SET_TABLE, &self.table);
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
                e.str(NFTA_CHAIN_TABLE, &self.table);
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
                e.str(NFTA_RULE_TABLE, &self.table);
                e.str(NFTA_RULE_CHAIN, chain);
            });
        }
        for rule in &want {
            b.msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |e| {
                e.str(NFTA_RULE_TABLE, &self.table);
                e.str(NFTA_RULE_CHAIN, rule.chain);
                e.nest(NFTA_RULE_EXPRESSIONS, |e| rule.kind.encode(e));
                e.bytes(NFTA_RULE_USERDATA, &udata_comment(&rule.tag));
            });
        }
        for set in [SET_DECOYS, SET_EXEMPT_V4, SET_EXEMPT_V6, SET_PROBE_DECOYS] {
            // No element list: the kernel flushes the set.
            b.msg(NFT_MSG_DELSETELEM, 0, |e| {
                e.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
                e.str(NFTA_SET_ELEM_LIST_SET, set);
            });
        }
        for (set, v6) in [(SET_EXEMPT_V4, false), (SET_EXEMPT_V6, true)] {
            let elems = exempt_elems(&inner.exempt, v6);
            b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.table, set, &elems);
        }
        if let Some(t) = &inner.tripwire {
            let elems: Vec<Elem> = t.ports.iter().map(|p| Elem::port(*p)).collect();
            b.set_elems(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                &self.table,
                SET_DECOYS,
                &elems,
            );
        }
        if let Some(t) = &inner.probe {
            b.set_elems(
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                &self.table,
                SET_PROBE_DECOYS,
                &port_interval_elems(&t.ports),
            );
        }
        b.commit(&mut inner.nl)
            .map_err(|e| self.kernel("create table, sets and chains", e))
    }

    /// Applies element changes in batches; each address's changes stay in one batch (atomic).
    fn apply(&self, inner: &mut Inner, ops: &ElemOps, op: &'static str) -> Result<(), NftError> {
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
            let mut b = Batch::new(&mut inner.nl);
            for set in [SET_V4, SET_V6] {
                let mine = || chunk.iter().filter(|s| set_of(s.0) == set);
                let pre: Vec<Elem> = mine().filter(|s| s.1).map(|s| Elem::key(s.0)).collect();
                let post: Vec<Elem> = mine().filter_map(|s| s.2.clone()).collect();
                b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.table, set, &pre);
                b.set_elems(NFT_MSG_DELSETELEM, 0, &self.table, set, &pre);
                b.set_elems(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &self.table, set, &post);
            }
            if let Err(e) = b.commit(&mut inner.nl) {
                if errno_of(&e) == Some(ENFILE) {
                    let set = chunk.first().map_or(SET_V4, |s| set_of(s.0));
                    return Err(NftError::SetFull {
                        table: self.table.clone(),
                        set,
                    });
                }
                return Err(self.kernel(op, e));
            }
        }
        Ok(())
    }

    /// Rule comment tags per chain, in rule order (empty map: no table).
    fn dump_rule_tags(&self, nl: &mut Netlink) -> Result<BTreeMap<String, Vec<String>>, NftError> {
        let op = "read rules";
        let msgs = match nl.dump(NFT_MSG_GETRULE, |e| e.str(NFTA_RULE_TABLE, &self.table)) {
            Ok(m) => m,
            Err(e) if errno_of(&e) == Some(ENOENT) => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.kernel(op, e)),
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
    fn dump_elems(
        &self,
        nl: &mut Netlink,
        set: &str,
        op: &'static str,
    ) -> Result<Option<Vec<KernelElem>>, NftError> {
        let msgs = match nl.dump(NFT_MSG_GETSETELEM, |e| {
            e.str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
            e.str(NFTA_SET_ELEM_LIST_SET, set);
        }) {
            Ok(m) => m,
            Err(e) if errno_of(&e) == Some(ENOENT) => return Ok(None),
            Err(e) => return Err(self.kernel(op, e)),
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

    fn kernel(&self, op: &'static str, source: io::Error) -> NftError {
        let errno = errno_of(&source).unwrap_or(0);
        if errno == EPERM || errno == EACCES {
            return NftError::Permission { op };
        }
        if source.kind() == io::ErrorKind::WouldBlock || source.kind() == io::ErrorKind::TimedOut {
            return NftError::Io { op, source };
        }
        let hint = match errno {
            ENOENT => {
                "the table, a set or a chain is missing (deleted by someone else?): call reconcile to recreate it"
            }
            EEXIST => {
                "an object of the same name exists with other properties: delete the table (nft delete table inet NAME) and let the sensor recreate it"
            }
            EBUSY => "the object is in use or being changed concurrently: retry",
            EOPNOTSUPP => {
                "this kernel lacks an nf_tables feature used here (sets with timeouts, dynset, ct): use a kernel with CONFIG_NFT_DYNSET/NFT_CT or disable the tripwire"
            }
            ERANGE => "a timeout is too large for the kernel: use a shorter ban duration or none",
            EINVAL => {
                "the kernel rejected the request as invalid: check the kernel version (5.x or later) and report this"
            }
            _ => "check `nft list table inet NAME` and the kernel log",
        };
        NftError::Kernel {
            op,
            table: self.table.clone(),
            source,
            hint,
        }
    }
}

fn close_enough(have: Option<Duration>, want: Option<Duration>) -> bool {
    match (have, want) {
        (None, None) => true,
        (Some(h), Some(w)) => h.abs_diff(w) <= TIMEOUT_TOLERANCE,
        _ => false,
    }
}

fn prefix_set(v6: bool) -> &'static str {
    if v6 { SET_PREFIX_V6 } else { SET_PREFIX_V4 }
}

fn set_of(addr: IpAddr) -> &'static str {
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
fn millis(d: Duration) -> u64 {
    u64::try_from(d.min(MAX_TIMEOUT).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[derive(Debug, Default)]
struct ElemOps {
    add: Vec<(IpAddr, Option<Duration>)>,
    replace: Vec<(IpAddr, Option<Duration>)>,
    remove: Vec<IpAddr>,
}

impl ElemOps {
    fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.remove.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Rules

#[derive(Debug)]
struct RuleSpec {
    chain: &'static str,
    tag: String,
    kind: RuleKind,
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }
    }
    /// (offset, length) of the source address in the network header.
    fn saddr(self) -> (u32, u32) {
        match self {
            Family::V4 => (12, 4),
            Family::V6 => (8, 16),
        }
    }
    fn set(self) -> &'static str {
        match self {
            Family::V4 => SET_V4,
            Family::V6 => SET_V6,
        }
    }
    fn prefix_set(self) -> &'static str {
        prefix_set(matches!(self, Family::V6))
    }
    fn exempt_set(self) -> &'static str {
        match self {
            Family::V4 => SET_EXEMPT_V4,
            Family::V6 => SET_EXEMPT_V6,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

#[derive(Debug)]
enum RuleKind {
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

fn wanted_rules(tripwire: Option<&Tripwire>, probe: Option<&Tripwire>) -> Vec<RuleSpec> {
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
    fn encode(&self, e: &mut Enc) {
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

/// Userdata in libnftnl's TLV layout with one comment (type 0), so `nft list` prints it.
fn udata_comment(text: &str) -> Vec<u8> {
    let bytes = &text.as_bytes()[..text.len().min(200)];
    let mut v = vec![0u8, (bytes.len() + 1) as u8];
    v.extend_from_slice(bytes);
    v.push(0);
    v
}

fn udata_comment_of(mut data: &[u8]) -> Option<String> {
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

fn cstr(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Set elements

#[derive(Debug, Clone)]
struct Elem {
    key: Vec<u8>,
    timeout: Option<Duration>,
    marked: bool,
    /// Opens a range that runs to the top of the key space (no element closes it): `nft`
    /// marks such an element in its userdata (NFTNL_SET_ELEM_F_INTERVAL_OPEN), and so do we.
    open: bool,
    /// Closes an interval (interval sets: an element opens a range, the next one closes it).
    end: bool,
}

impl Elem {
    fn key(addr: IpAddr) -> Self {
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
    fn ban(addr: IpAddr, timeout: Option<Duration>) -> Self {
        Elem {
            timeout,
            marked: true,
            ..Elem::key(addr)
        }
    }
    fn port(port: u16) -> Self {
        Elem {
            key: port.to_be_bytes().to_vec(),
            timeout: None,
            marked: false,
            open: false,
            end: false,
        }
    }
    /// Attributes in libnftnl's order (flags, timeout, key, userdata): the bytes equal nft's.
    fn encode(&self, e: &mut Enc) {
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
fn exempt_elems(nets: &[IpNet], v6: bool) -> Vec<Elem> {
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
fn interval_elems(ranges: Vec<(u128, u128, usize)>) -> Vec<Elem> {
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
fn port_interval_elems(ports: &[u16]) -> Vec<Elem> {
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
fn ports_of_interval_elems(elems: &[KernelElem]) -> Vec<u16> {
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

// ---------------------------------------------------------------------------------------------
// Prefix bans: ranges of addresses in interval sets

/// A range of addresses of one family, `first..=last` as integers (IPv4 in the low 32 bits),
/// banned with one timeout (`None`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    first: u128,
    last: u128,
    timeout: Option<Duration>,
}

/// A network as the kernel sees its sources: truncated to its prefix, IPv4-mapped IPv6 as
/// IPv4, and as the range of addresses it holds.
#[derive(Debug, Clone, Copy)]
struct Target {
    net: IpNet,
    v6: bool,
    first: u128,
    last: u128,
}

impl Target {
    fn of(net: IpNet) -> Self {
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
    fn addr(&self) -> Option<IpAddr> {
        (self.net.prefix_len() == self.net.max_prefix_len()).then(|| self.net.addr())
    }
    fn piece(&self, timeout: Option<Duration>) -> Piece {
        Piece {
            first: self.first,
            last: self.last,
            timeout,
        }
    }
}

/// The highest address of a family as an integer.
fn top(v6: bool) -> u128 {
    if v6 { u128::MAX } else { u128::from(u32::MAX) }
}

/// The longer of two timeouts (`None`, no timeout, is the longest).
fn longer(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (None, _) | (_, None) => None,
        (Some(a), Some(b)) => Some(a.max(b)),
    }
}

/// Orders timeouts longest first (`None` first).
fn longest_first(a: Option<Duration>, b: Option<Duration>) -> std::cmp::Ordering {
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
fn paint(ranges: impl IntoIterator<Item = Piece>) -> Vec<Piece> {
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
fn subtract(pieces: &[Piece], first: u128, last: u128) -> Vec<Piece> {
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
fn same_pieces(have: &[Piece], want: &[Piece]) -> bool {
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
fn piece_elems(pieces: &[Piece], v6: bool, closing_zero: bool) -> Vec<Elem> {
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
fn pieces_of_elems(elems: &[KernelElem], v6: bool) -> Vec<Piece> {
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
fn nets_of_range(mut first: u128, last: u128, v6: bool) -> Vec<IpNet> {
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

/// An element as the kernel reports it.
#[derive(Debug)]
struct KernelElem {
    key: Vec<u8>,
    timeout_ms: Option<u64>,
    expiration_ms: Option<u64>,
    marked: bool,
    end: bool,
}

impl KernelElem {
    fn parse(data: &[u8]) -> Option<Self> {
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
    fn addr(&self) -> Option<IpAddr> {
        if let Ok(a) = <[u8; 4]>::try_from(self.key.as_slice()) {
            return Some(IpAddr::V4(Ipv4Addr::from(a)));
        }
        <[u8; 16]>::try_from(self.key.as_slice())
            .ok()
            .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
    }
    fn port(&self) -> Option<u16> {
        <[u8; 2]>::try_from(self.key.as_slice())
            .ok()
            .map(u16::from_be_bytes)
    }
    /// Remaining time before the kernel removes the element (`None`: never).
    fn remaining(&self) -> Option<Duration> {
        self.timeout_ms
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(self.expiration_ms.unwrap_or(t)))
    }
    /// Added by the tripwire rule (no marker, the tripwire's timeout) less than
    /// [`TRIPWIRE_GRACE`] ago.
    fn fresh_from_tripwire(&self, tripwire_timeouts: &[Option<Duration>]) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Netlink encoding (linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h)

/// Appends netlink attributes (`struct nlattr`: u16 length, u16 type, value, padding to 4).
/// nf_tables wants every integer attribute in network byte order.
#[derive(Debug, Default)]
struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    fn bytes(&mut self, ty: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }
    fn str(&mut self, ty: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.bytes(ty, &v);
    }
    fn be32(&mut self, ty: u16, value: u32) {
        self.bytes(ty, &value.to_be_bytes());
    }
    fn be64(&mut self, ty: u16, value: u64) {
        self.bytes(ty, &value.to_be_bytes());
    }
    fn nest(&mut self, ty: u16, inner: impl FnOnce(&mut Enc)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        inner(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }
    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }
    /// Starts a netlink message: `struct nlmsghdr` then `struct nfgenmsg`.
    fn header(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by `finish`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0, the kernel fills it
        self.buf.push(family); // nfgen_family
        self.buf.push(NFNETLINK_V0); // version
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }
    fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One nf_tables transaction: BATCH_BEGIN, messages (each asking for an ACK), BATCH_END.
#[derive(Debug)]
struct Batch {
    enc: Enc,
    first_seq: u32,
    /// Sequence number and command of each message that will be ACKed.
    acks: Vec<(u32, u16)>,
    seq: u32,
}

impl Batch {
    fn new(nl: &mut Netlink) -> Self {
        let first_seq = nl.next_seq();
        let mut enc = Enc::default();
        let start = enc.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            first_seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        enc.finish(start);
        Batch {
            enc,
            first_seq,
            acks: Vec::new(),
            seq: first_seq,
        }
    }
    fn msg(&mut self, cmd: u16, flags: u16, attrs: impl FnOnce(&mut Enc)) {
        self.seq = self.seq.wrapping_add(1);
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | cmd;
        let start = self.enc.header(
            ty,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.seq,
            NFPROTO_INET,
            0,
        );
        attrs(&mut self.enc);
        self.enc.finish(start);
        self.acks.push((self.seq, cmd));
    }
    /// NEWSETELEM / DELSETELEM for `elems`, split so that no message grows too large.
    fn set_elems(&mut self, cmd: u16, flags: u16, table: &str, set: &str, elems: &[Elem]) {
        for chunk in elems.chunks(512) {
            self.msg(cmd, flags, |e| {
                e.str(NFTA_SET_ELEM_LIST_TABLE, table);
                e.str(NFTA_SET_ELEM_LIST_SET, set);
                e.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |e| {
                    for el in chunk {
                        el.encode(e);
                    }
                });
            });
        }
    }
    /// Sends the batch and waits for every ACK; the first error the kernel reports is returned,
    /// naming the refused message (the kernel then has aborted the whole transaction).
    fn commit(mut self, nl: &mut Netlink) -> io::Result<()> {
        if self.acks.is_empty() {
            return Ok(());
        }
        self.seq = self.seq.wrapping_add(1);
        let start = self.enc.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.enc.finish(start);
        nl.seq = self.seq;
        nl.send(&self.enc.buf)?;
        let range = self.first_seq..=self.seq;
        let mut pending: BTreeSet<u32> = self.acks.iter().map(|a| a.0).collect();
        while !pending.is_empty() {
            for msg in nl.recv()? {
                if !range.contains(&msg.seq) {
                    continue; // a late answer to an earlier request
                }
                match msg.kind {
                    Reply::Error(0) => {
                        pending.remove(&msg.seq);
                    }
                    Reply::Error(errno) => {
                        let cmd = self.acks.iter().find(|a| a.0 == msg.seq).map(|a| a.1);
                        let os = io::Error::from_raw_os_error(errno);
                        return Err(match cmd {
                            Some(cmd) => io::Error::new(
                                os.kind(),
                                RefusedMsg {
                                    cmd: msg_name(cmd),
                                    os,
                                },
                            ),
                            None => os, // the commit itself failed
                        });
                    }
                    Reply::Done(_) | Reply::Data(_) => {}
                }
            }
        }
        Ok(())
    }
}

/// The kernel refused one message of a batch: says which, and keeps the errno.
#[derive(Debug, thiserror::Error)]
#[error("{os} (in {cmd})")]
struct RefusedMsg {
    cmd: &'static str,
    os: io::Error,
}

/// The errno of an error from [`Batch::commit`] or [`Netlink::dump`].
fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<RefusedMsg>())
            .and_then(|r| r.os.raw_os_error())
    })
}

fn msg_name(cmd: u16) -> &'static str {
    match cmd {
        NFT_MSG_NEWTABLE => "NEWTABLE",
        NFT_MSG_DELTABLE => "DELTABLE",
        NFT_MSG_NEWCHAIN => "NEWCHAIN",
        NFT_MSG_NEWRULE => "NEWRULE",
        NFT_MSG_DELRULE => "DELRULE",
        NFT_MSG_NEWSET => "NEWSET",
        NFT_MSG_NEWSETELEM => "NEWSETELEM",
        NFT_MSG_DELSETELEM => "DELSETELEM",
        _ => "nf_tables message",
    }
}

/// Iterates over netlink attributes, yielding (type without flag bits, value).
#[derive(Debug)]
struct Attrs<'a> {
    data: &'a [u8],
}

impl<'a> Attrs<'a> {
    fn new(data: &'a [u8]) -> Self {
        Attrs { data }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.data.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([self.data[0], self.data[1]]));
        let ty = u16::from_ne_bytes([self.data[2], self.data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.data.len() {
            self.data = &[];
            return None;
        }
        let value = &self.data[4..len];
        let next = (len + 3) & !3;
        self.data = self.data.get(next..).unwrap_or(&[]);
        Some((ty, value))
    }
}

fn be64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

// ---------------------------------------------------------------------------------------------
// Netlink socket

#[derive(Debug)]
struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct ReplyMsg {
    seq: u32,
    kind: Reply,
}

#[derive(Debug)]
enum Reply {
    /// NLMSG_ERROR: 0 is an ACK, otherwise a positive errno.
    Error(i32),
    /// NLMSG_DONE: end of a dump, with its status.
    Done(i32),
    /// An nf_tables message: its attributes (after nlmsghdr and nfgenmsg).
    Data(Vec<u8>),
}

impl Netlink {
    fn open() -> Result<Self, NftError> {
        // An unbound netlink socket is bound by the kernel on first send, and a message sent
        // without an address goes to the kernel (port id 0): no sockaddr_nl needed, no unsafe.
        let sock = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )
        .map_err(|source| match source.raw_os_error() {
            Some(EPERM | EACCES) => NftError::Permission {
                op: "open netlink socket",
            },
            _ => NftError::Unavailable { source },
        })?;
        sock.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|source| NftError::Io {
                op: "set socket timeout",
                source,
            })?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(Netlink {
            sock,
            seq: seed,
            buf: vec![0; 256 * 1024],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let n = (&self.sock).write(data)?;
        if n != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("netlink sent {n} of {} bytes", data.len()),
            ));
        }
        Ok(())
    }

    /// Reads one datagram and splits it into messages.
    fn recv(&mut self) -> io::Result<Vec<ReplyMsg>> {
        let n = match (&self.sock).read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from the kernel within {REPLY_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(e),
        };
        let mut data = &self.buf[..n];
        let mut out = Vec::new();
        while data.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < NLMSG_HDRLEN || len > data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let ty = u16::from_ne_bytes([data[4], data[5]]);
            let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
            let payload = &data[NLMSG_HDRLEN..len];
            let int = || {
                payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, i32::from_ne_bytes)
            };
            let kind = match ty {
                NLMSG_ERROR => Reply::Error(-int()),
                NLMSG_DONE => Reply::Done(-int()),
                NLMSG_NOOP => {
                    data = data.get((len + 3) & !3..).unwrap_or(&[]);
                    continue;
                }
                _ => Reply::Data(payload.get(NFGENMSG_LEN..).unwrap_or(&[]).to_vec()),
            };
            out.push(ReplyMsg { seq, kind });
            data = data.get((len + 3) & !3..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// A GET request with NLM_F_DUMP; returns the attributes of each answer message.
    fn dump(&mut self, cmd: u16, attrs: impl FnOnce(&mut Enc)) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.next_seq();
        let mut enc = Enc::default();
        let start = enc.header(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            NFPROTO_INET,
            0,
        );
        attrs(&mut enc);
        enc.finish(start);
        self.send(&enc.buf)?;
        let mut out = Vec::new();
        loop {
            for msg in self.recv()? {
                if msg.seq != seq {
                    continue;
                }
                match msg.kind {
                    Reply::Data(d) => out.push(d),
                    Reply::Done(0) => return Ok(out),
                    Reply::Done(errno) | Reply::Error(errno) => {
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Constants from the kernel's UAPI headers

const AF_UNSPEC: u8 = 0;
const AF_NETLINK: i32 = 16;
const NETLINK_NETFILTER: i32 = 12;

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;
const EINVAL: i32 = 22;
const ENFILE: i32 = 23;
const ERANGE: i32 = 34;
const EOPNOTSUPP: i32 = 95;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFNETLINK_V0: u8 = 0;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// NF_CT_STATE_BIT(IP_CT_ESTABLISHED).
const CT_STATE_ESTABLISHED: u32 = 1 << 1;
/// `dev->type` of loopback devices (linux/if_arp.h), as `meta iiftype` loads it (2 bytes).
const ARPHRD_LOOPBACK: u16 = 772;
/// TCP header flag bits (byte 13).
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

// enum nf_tables_msg_types
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFTA_DYNSET_SET_NAME: u16 = 1;
const NFTA_DYNSET_OP: u16 = 3;
const NFTA_DYNSET_SREG_KEY: u16 = 4;
const NFTA_DYNSET_TIMEOUT: u16 = 6;
const NFT_DYNSET_OP_UPDATE: u32 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFTYPE: u32 = 8;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_SOCKET_KEY: u16 = 1;
const NFTA_SOCKET_DREG: u16 = 2;
const NFT_SOCKET_TRANSPARENT: u32 = 0;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
const NFTA_LIMIT_FLAGS: u16 = 5;
const NFT_LIMIT_PKTS: u32 = 0;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

// Data types of nft (userspace `enum datatypes`), stored so that `nft list` prints the sets.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
// libnftnl's element userdata (NFTNL_UDATA_SET_ELEM_FLAGS, NFTNL_SET_ELEM_F_INTERVAL_OPEN).
const UDATA_SET_ELEM_FLAGS: u8 = 1;
const UDATA_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes_and_nested_flagged() {
        let mut e = Enc::default();
        e.nest(NFTA_LIST_ELEM, |e| e.str(NFTA_EXPR_NAME, "ct"));
        assert_eq!(e.buf, vec![12, 0, 0x01, 0x80, 7, 0, 1, 0, b'c', b't', 0, 0]);
        let parsed: Vec<_> = Attrs::new(&e.buf).collect();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, NFTA_LIST_ELEM);
        let inner: Vec<_> = Attrs::new(parsed[0].1).collect();
        assert_eq!(inner, vec![(NFTA_EXPR_NAME, &b"ct\0"[..])]);
    }

    fn as_kernel(elems: &[Elem]) -> Vec<KernelElem> {
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

    #[test]
    fn comments_round_trip_in_libnftnl_userdata_layout() {
        let u = udata_comment("portsentry");
        assert_eq!(&u[..2], &[0, 11]);
        assert_eq!(udata_comment_of(&u).as_deref(), Some("portsentry"));
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

    #[test]
    fn remaining_timeouts_within_tolerance_are_left_alone() {
        let s = Duration::from_secs;
        assert!(close_enough(Some(s(100)), Some(s(101))));
        assert!(!close_enough(Some(s(100)), Some(s(110))));
        assert!(!close_enough(None, Some(s(100))));
        assert!(close_enough(None, None));
    }
}
