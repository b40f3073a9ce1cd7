//! PortSentry's raw-socket modes `-stcp -sudp -atcp -audp`: which ports they watch, and the
//! capture loop that turns packets to those ports into unverified hits.
//!
//! Stealth modes watch `TCP_PORTS`/`UDP_PORTS` without binding them (they stay closed, so
//! the kernel answers with RST or ICMP); advanced modes watch every port below
//! `ADVANCED_PORTS_*` (1024 when unset, as 1.2) except `ADVANCED_EXCLUDE_*`. In every raw
//! mode a port with a real socket on it is skipped, checked per packet
//! ([`sockets`]): a service started later is not a decoy, and a port the sensor
//! binds itself in a connect mode (`-tcp -stcp` together) is left to that mode, whose
//! completed handshakes prove the source. The check is the kernel's own lookup for the
//! packet's addresses and ports (see [`sockets`]), so it costs microseconds and
//! never delays a ban. Each packet goes through, in order: parse,
//! destination is one of this host's addresses, port watched, TCP flags name a probe
//! ([`crate::packet::classify`]), port not in use.

pub mod capture;
pub mod examine;
pub mod sockets;
pub mod tripwire;
pub mod watch;

pub use capture::Capture;
pub use examine::{OwnAddresses, capture_loop, examine};
pub use tripwire::{PROBE_DECOY_SYNC, arm_probe_tripwire, probe_decoys, probe_tripwire_off};
pub use watch::{DEFAULT_ADVANCED_PORTS, PortSet, Watch};
