//! The netlink wire format (linux/netlink.h): messages (`struct nlmsghdr`) and attributes
//! (`struct nlattr`), encoded into a buffer and split back out of a received datagram.

use std::io;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLA_F_NESTED: u16 = 0x8000;
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// Appends netlink messages and attributes (`struct nlattr`: u16 length, u16 type, value,
/// padding to 4). Integer attributes are written as given (nf_tables wants big endian).
#[derive(Debug, Default)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    /// Raw bytes inside the current message (a fixed header such as `struct nfgenmsg`).
    pub fn raw(&mut self, value: &[u8]) {
        self.buf.extend_from_slice(value);
    }
    pub fn bytes(&mut self, ty: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }
    pub fn str(&mut self, ty: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.bytes(ty, &v);
    }
    pub fn be32(&mut self, ty: u16, value: u32) {
        self.bytes(ty, &value.to_be_bytes());
    }
    pub fn be64(&mut self, ty: u16, value: u64) {
        self.bytes(ty, &value.to_be_bytes());
    }
    pub fn nest(&mut self, ty: u16, inner: impl FnOnce(&mut Enc)) {
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
    /// Starts a message (`struct nlmsghdr`); returns its start for [`Enc::finish`].
    pub fn begin(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by `finish`
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0, the kernel fills it
        start
    }
    /// Ends the message begun at `start`: writes its length.
    pub fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One message received from the kernel.
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub seq: u32,
    pub kind: Reply,
}

/// What a received message is.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// NLMSG_ERROR: 0 is an ACK, otherwise a positive errno.
    Error(i32),
    /// NLMSG_DONE: end of a dump, with its status.
    Done(i32),
    /// Any other message: its payload after `struct nlmsghdr`.
    Data(Vec<u8>),
}

/// Splits a received datagram into its messages (NLMSG_NOOP skipped).
pub fn messages(mut data: &[u8]) -> io::Result<Vec<Message>> {
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
            NLMSG_ERROR => Some(Reply::Error(-int())),
            NLMSG_DONE => Some(Reply::Done(-int())),
            NLMSG_NOOP => None,
            _ => Some(Reply::Data(payload.to_vec())),
        };
        if let Some(kind) = kind {
            out.push(Message { seq, kind });
        }
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Iterates over netlink attributes, yielding (type without flag bits, value).
#[derive(Debug)]
pub struct Attrs<'a> {
    data: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub fn new(data: &'a [u8]) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes_and_nested_flagged() {
        let mut e = Enc::default();
        e.nest(1, |e| e.str(1, "ct"));
        assert_eq!(e.buf, vec![12, 0, 0x01, 0x80, 7, 0, 1, 0, b'c', b't', 0, 0]);
        let parsed: Vec<_> = Attrs::new(&e.buf).collect();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, 1);
        let inner: Vec<_> = Attrs::new(parsed[0].1).collect();
        assert_eq!(inner, vec![(1, &b"ct\0"[..])]);
    }

    #[test]
    fn a_datagram_splits_into_its_messages_skipping_noops() {
        let mut e = Enc::default();
        for (ty, seq, body) in [
            (NLMSG_NOOP, 1, 0i32),
            (NLMSG_ERROR, 2, -2),
            (NLMSG_DONE, 3, 0),
            (20, 4, 7),
        ] {
            let start = e.begin(ty, 0, seq);
            e.raw(&body.to_ne_bytes());
            e.finish(start);
        }
        let got = messages(&e.buf).expect("messages");
        assert_eq!(
            got,
            [
                Message {
                    seq: 2,
                    kind: Reply::Error(2)
                },
                Message {
                    seq: 3,
                    kind: Reply::Done(0)
                },
                Message {
                    seq: 4,
                    kind: Reply::Data(7i32.to_ne_bytes().to_vec())
                },
            ]
        );
    }

    #[test]
    fn a_message_longer_than_the_datagram_is_an_error() {
        let mut e = Enc::default();
        let start = e.begin(20, 0, 1);
        e.finish(start);
        e.buf[0] = 200;
        assert!(messages(&e.buf).is_err());
    }
}
