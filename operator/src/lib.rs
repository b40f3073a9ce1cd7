//! portsentry-operator: turns sensors' reports into PortSentryBans and bans into enforcement.
//! Pure build/validate functions here; the controllers and servers are thin I/O around them.
#![forbid(unsafe_code)]

pub mod bans;
pub mod cluster;
pub mod controller;
pub mod error;
pub mod hooks;
pub mod inject;
pub mod intake;
pub mod intake_tls;
pub mod lease;
pub mod metrics;
pub mod names;
pub mod netpol;
pub mod nodes;
pub mod plan;
pub mod prefixes;
pub mod quarantine;
pub mod reports;
pub mod review;
pub mod server;
pub mod status;
pub mod webhook;
pub mod widen;

pub use error::{Error, Result};
