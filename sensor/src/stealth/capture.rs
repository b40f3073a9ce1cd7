//! Packet capture for the stealth and advanced modes: an `AF_PACKET` socket whose kernel
//! BPF filter passes only inbound TCP/UDP over IPv4/IPv6 (parsed by [`crate::packet::parse`]).
//!
//! - The socket is `SOCK_DGRAM` (cooked): the kernel strips the link header, so the filter
//!   and parser see the IP header first on any link type (Ethernet, veth, loopback, tun).
//! - The classic-BPF program runs in the kernel and drops everything but packets addressed
//!   to this host at the link layer (`PACKET_HOST`, via the `SKF_AD_PKTTYPE` ancillary
//!   load: no outgoing copies, broadcasts or multicasts) carrying TCP or UDP (IPv4
//!   protocol 6/17; IPv6 next header 6/17, or an extension header whose chain the parser
//!   walks). It passes only the first [`SNAPLEN`] bytes: headers, no payload.
//! - The own-address check is in user space (where each packet is examined): a BPF program would
//!   have to be regenerated and re-attached each time an address is added or removed.
//! - Headers are parsed in user space by [`crate::packet::parse`].
//! - Kernel drops (receive buffer full) are read without `unsafe` from `SO_RXQ_OVFL`, the
//!   socket's cumulative drop counter that arrives as ancillary data with each packet, so
//!   losses show up with the next packet that does get through.
//!
//! No `unsafe` here: socket2 attaches the filter and nix reads the ancillary data safely.

use std::{
    io::{self, IoSliceMut},
    os::fd::AsRawFd,
    time::Duration,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, SockFilter, Socket, Type};

/// Bytes of each packet copied to user space: the largest IPv4 + TCP headers are 120,
/// the rest leaves room for IPv6 extension headers.
pub const SNAPLEN: u32 = 512;
/// Receive buffer asked for (as root `SO_RCVBUFFORCE` passes `net.core.rmem_max`).
pub const RECEIVE_BUFFER: usize = 8 << 20;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const PACKET_HOST: u32 = 0;
const SKF_AD_OFF: u32 = 0xffff_f000;
const SKF_AD_PROTOCOL: u32 = 0;
const SKF_AD_PKTTYPE: u32 = 4;
/// `BPF_LD | BPF_W | BPF_ABS`, `BPF_LD | BPF_B | BPF_ABS`, `BPF_JMP | BPF_JEQ | BPF_K`, `BPF_RET | BPF_K`.
const LD_W_ABS: u16 = 0x20;
const LD_B_ABS: u16 = 0x30;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;

/// One instruction of the filter before jump targets become offsets.
#[derive(Clone, Copy, Debug)]
enum Op {
    Load(u16, u32),
    /// Jump to `then` when A == k, else to `otherwise` (absolute indexes).
    JumpEq(u32, usize, usize),
    Return(u32),
}

/// The kernel filter as instructions (see the module doc).
pub fn filter() -> Vec<SockFilter> {
    const ACCEPT: usize = 15;
    const DROP: usize = 16;
    let program = [
        Op::Load(LD_W_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE),
        Op::JumpEq(PACKET_HOST, 2, DROP),
        Op::Load(LD_W_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL),
        Op::JumpEq(ETH_P_IP, 4, 7),
        Op::Load(LD_B_ABS, 9),
        Op::JumpEq(6, ACCEPT, 6),
        Op::JumpEq(17, ACCEPT, DROP),
        Op::JumpEq(ETH_P_IPV6, 8, DROP),
        Op::Load(LD_B_ABS, 6),
        Op::JumpEq(6, ACCEPT, 10),
        Op::JumpEq(17, ACCEPT, 11),
        Op::JumpEq(0, ACCEPT, 12),
        Op::JumpEq(43, ACCEPT, 13),
        Op::JumpEq(44, ACCEPT, 14),
        Op::JumpEq(60, ACCEPT, DROP),
        Op::Return(SNAPLEN),
        Op::Return(0),
    ];
    debug_assert_eq!(program.len(), DROP + 1);
    program
        .iter()
        .enumerate()
        .map(|(at, op)| match *op {
            Op::Load(code, k) => SockFilter::new(code, 0, 0, k),
            Op::JumpEq(k, then, otherwise) => {
                let offset = |to: usize| (to - at - 1) as u8;
                SockFilter::new(JEQ_K, offset(then), offset(otherwise), k)
            }
            Op::Return(k) => SockFilter::new(RET_K, 0, 0, k),
        })
        .collect()
}

/// An open capture socket.
#[derive(Debug)]
pub struct Capture {
    socket: Socket,
    buffer: Vec<u8>,
    control: Vec<u8>,
    drops_seen: u32,
}

/// One receive: a packet (its bytes are in [`Capture::packet`]), or a timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// `len` bytes; `new_drops` packets the kernel dropped since the last report.
    Packet {
        len: usize,
        new_drops: u64,
    },
    Timeout,
}

impl Capture {
    /// Opens the socket in the current network namespace. Needs root or `CAP_NET_RAW`.
    pub fn open(timeout: Duration) -> io::Result<Self> {
        let protocol = socket2::Protocol::from(i32::from(ETH_P_ALL.to_be()));
        let socket = Socket::new(Domain::PACKET, Type::DGRAM, Some(protocol))?;
        socket.attach_filter(&filter())?;
        if setsockopt(&socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
        }
        setsockopt(&socket, sockopt::RxqOvfl, &1).map_err(io::Error::from)?;
        socket.set_read_timeout(Some(timeout))?;
        Ok(Self {
            socket,
            buffer: vec![0; SNAPLEN as usize],
            control: nix::cmsg_space!(u32),
            drops_seen: 0,
        })
    }

    /// The receive buffer the kernel granted (it reports twice the usable size).
    pub fn receive_buffer(&self) -> io::Result<usize> {
        self.socket.recv_buffer_size()
    }

    /// Waits for the next packet (at most the timeout given to [`Capture::open`]).
    pub fn receive(&mut self) -> io::Result<Received> {
        let mut iov = [IoSliceMut::new(&mut self.buffer)];
        let message = match recvmsg::<SockaddrStorage>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut self.control),
            MsgFlags::empty(),
        ) {
            Ok(message) => message,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {
                return Ok(Received::Timeout);
            }
            Err(errno) => return Err(errno.into()),
        };
        let len = message.bytes;
        let mut total = None;
        if let Ok(cmsgs) = message.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::RxqOvfl(count) = cmsg {
                    total = Some(count);
                }
            }
        }
        let new_drops = match total {
            Some(total) => {
                let new = total.wrapping_sub(self.drops_seen);
                self.drops_seen = total;
                u64::from(new)
            }
            None => 0,
        };
        Ok(Received::Packet { len, new_drops })
    }

    /// The bytes of the last packet received (`len` from [`Received::Packet`]).
    pub fn packet(&self, len: usize) -> &[u8] {
        &self.buffer[..len.min(self.buffer.len())]
    }
}
