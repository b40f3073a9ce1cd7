//! The one netlink codec and socket of the sensor, shared by the nftables response
//! (`nft`) and the socket-diagnostics lookups of the raw modes (`stealth::sockets`).

pub mod codec;
pub mod socket;

pub use codec::{Attrs, Enc, Message, Reply};
pub use socket::NetlinkSocket;
