//! What the sensor knows about a probe: the shared packet types, the pure parser of captured
//! packets and the classifier that names a TCP probe from its flags (no I/O here).

pub mod classify;
pub mod parse;
pub mod types;

pub use types::{Captured, Examined, Fragment, Hit, RawMode, TcpFlags};
