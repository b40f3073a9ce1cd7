//! portsentry-sensor: PortSentry's job on one host (decoy listeners, detection engine,
//! stealth/advanced packet capture, responses, logs, metrics), with PortSentry 1.2's formats.
#![forbid(unsafe_code)]

pub mod alert;
pub mod ban_watch;
pub mod check;
pub mod config;
pub mod differences;
pub mod engine;
pub mod error;
pub mod listen;
pub mod metrics;
pub mod netlink;
pub mod nft;
pub mod packet;
pub mod pod_nft;
pub mod record_file;
pub mod reload;
pub mod report;
pub mod respond;
pub mod run;
pub mod stealth;

pub use error::{Error, Result};
