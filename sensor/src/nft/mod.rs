//! Native nftables response: the sensor's own `inet` table, timed IPv4/IPv6 ban sets, the
//! tripwires; nf_tables spoken over `NETLINK_NETFILTER` and reconciled to the engine's bans.
//!
//! The nf_tables messages are encoded by hand here (rules in `rules.rs`, elements in
//! `elems.rs`, transactions in `batch.rs`) on the shared netlink codec of [`crate::netlink`],
//! on purpose: libnftnl/libnftables would need C bindings and `unsafe` in a crate that
//! forbids it, and the `nft` binary is not in the sensor's distroless image (nor wanted: no
//! shell, no process per ban). Every byte layout is checked against what `nft` sends
//! (tests here) and against the real kernel (`sensor/tests/nft.rs`).

mod bans;
mod batch;
mod elems;
mod error;
mod layout;
mod prefixes;
mod rules;
mod table;
mod uapi;

pub use bans::{NftBans, remove_table};
pub use error::NftError;
pub use layout::{
    CHAIN_FORWARD, CHAIN_INPUT, MAX_TIMEOUT, PRIORITY, PROBE_TRIPWIRE_BURST, PROBE_TRIPWIRE_RATE,
    SET_DECOYS, SET_EXEMPT_V4, SET_EXEMPT_V6, SET_PREFIX_V4, SET_PREFIX_V6, SET_PROBE_DECOYS,
    SET_SIZE, SET_V4, SET_V6, TIMEOUT_TOLERANCE, TRIPWIRE_GRACE,
};
