//! nf_tables messages over the shared netlink socket: the `nfgenmsg` header, one batch per
//! transaction (every message ACKed, the first refusal named), and dump requests.

use std::{collections::BTreeSet, io};

use super::{
    elems::Elem,
    error::{NftError, RefusedMsg},
    uapi::*,
};
use crate::netlink::{
    Enc, NetlinkSocket, Reply,
    codec::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST},
};

/// How long to wait for the kernel's answer before giving up.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the `NETLINK_NETFILTER` socket, naming what to do when that is not allowed.
pub fn open() -> Result<NetlinkSocket, NftError> {
    NetlinkSocket::open(NETLINK_NETFILTER, REPLY_TIMEOUT, 256 * 1024).map_err(|source| match source
        .raw_os_error()
    {
        Some(EPERM | EACCES) => NftError::Permission {
            op: "open netlink socket",
        },
        _ => NftError::Unavailable { source },
    })
}

/// Starts a netlink message with the nf_tables header (`struct nfgenmsg`).
fn nf_header(enc: &mut Enc, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
    let start = enc.begin(ty, flags, seq);
    enc.raw(&[family, NFNETLINK_V0]);
    enc.raw(&res_id.to_be_bytes());
    start
}

/// One nf_tables transaction: BATCH_BEGIN, messages (each asking for an ACK), BATCH_END.
#[derive(Debug)]
pub struct Batch {
    enc: Enc,
    first_seq: u32,
    /// Sequence number and command of each message that will be ACKed.
    acks: Vec<(u32, u16)>,
    seq: u32,
}

impl Batch {
    pub fn new(nl: &mut NetlinkSocket) -> Self {
        let first_seq = nl.next_seq();
        let mut enc = Enc::default();
        let start = nf_header(
            &mut enc,
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
    pub fn msg(&mut self, cmd: u16, flags: u16, attrs: impl FnOnce(&mut Enc)) {
        self.seq = self.seq.wrapping_add(1);
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | cmd;
        let start = nf_header(
            &mut self.enc,
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
    pub fn set_elems(&mut self, cmd: u16, flags: u16, table: &str, set: &str, elems: &[Elem]) {
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
    pub fn commit(mut self, nl: &mut NetlinkSocket) -> io::Result<()> {
        if self.acks.is_empty() {
            return Ok(());
        }
        self.seq = self.seq.wrapping_add(1);
        let start = nf_header(
            &mut self.enc,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.enc.finish(start);
        nl.skip_to(self.seq);
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

/// A GET request with NLM_F_DUMP; returns the attributes of each answer message.
pub fn dump(
    nl: &mut NetlinkSocket,
    cmd: u16,
    attrs: impl FnOnce(&mut Enc),
) -> io::Result<Vec<Vec<u8>>> {
    let seq = nl.next_seq();
    let mut enc = Enc::default();
    let start = nf_header(
        &mut enc,
        (NFNL_SUBSYS_NFTABLES << 8) | cmd,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_INET,
        0,
    );
    attrs(&mut enc);
    enc.finish(start);
    nl.send(&enc.buf)?;
    let mut out = Vec::new();
    loop {
        for msg in nl.recv()? {
            if msg.seq != seq {
                continue;
            }
            match msg.kind {
                Reply::Data(d) => out.push(d.get(NFGENMSG_LEN..).unwrap_or(&[]).to_vec()),
                Reply::Done(0) => return Ok(out),
                Reply::Done(errno) | Reply::Error(errno) => {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
        }
    }
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
