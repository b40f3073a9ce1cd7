//! A netlink socket to the kernel (any netlink family): sends one datagram of messages and
//! reads answers back as [`Message`]s, with a reply deadline. No `unsafe`: socket2 only.

use std::{
    io::{self, Read, Write},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use super::codec::{Message, messages};

const AF_NETLINK: i32 = 16;

/// An unbound netlink socket of one family (`NETLINK_NETFILTER`, `NETLINK_SOCK_DIAG`, ...).
///
/// An unbound netlink socket is bound by the kernel on first send, and a message sent
/// without an address goes to the kernel (port id 0): no `sockaddr_nl` needed.
#[derive(Debug)]
pub struct NetlinkSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    reply_timeout: Duration,
}

impl NetlinkSocket {
    /// Opens a socket of netlink `family`; reads wait at most `reply_timeout`, and a reply
    /// datagram may be up to `buffer` bytes.
    pub fn open(family: i32, reply_timeout: Duration, buffer: usize) -> io::Result<Self> {
        let sock = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(family)),
        )?;
        sock.set_read_timeout(Some(reply_timeout))?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs() as u32);
        Ok(Self {
            sock,
            seq: seed,
            buf: vec![0; buffer],
            reply_timeout,
        })
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Moves the sequence on to `seq` (a batch numbered its messages itself).
    pub fn skip_to(&mut self, seq: u32) {
        self.seq = seq;
    }

    /// Sends one datagram.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let n = (&self.sock).write(data)?;
        if n != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("netlink sent {n} of {} bytes", data.len()),
            ));
        }
        Ok(())
    }

    /// Reads one datagram and splits it into messages; `TimedOut` past the reply timeout.
    pub fn recv(&mut self) -> io::Result<Vec<Message>> {
        let n = match (&self.sock).read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from the kernel within {:?}", self.reply_timeout),
                ));
            }
            Err(e) => return Err(e),
        };
        messages(&self.buf[..n])
    }
}
