//! portsentry-operator: turns sensors' reports into PortSentryBans and bans into enforcement.
//! Pure build/validate functions here; the controllers and servers are thin I/O around them.
//!
//! ```text
//!  intake/   sensors' reports in: TokenReview, checks, bans written (HTTPS /v1/reports)
//!  policy/   PortSentryPolicy controller: plan (pure), status, never-widen rule
//!  cluster/  ClusterPortSentryPolicy controller: plan (pure), node-sensor DaemonSets
//!  enforce/  bans and how they are enforced: ban arithmetic, NetworkPolicies, quarantine
//!  inject/   sidecar injection: the pure decision and patch, the admission webhook
//!  cleanup   what the chart's pre-delete hook runs: stop the operator, remove what it generated
//!  shared:   labels (every label/annotation/audience string), tls (CA, certificates),
//!            watch (backoff, pod triggers), shared (one watch per kind, trimmed pods),
//!            names, metrics, hooks, lease, server, error
//! ```
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod cluster;
pub mod enforce;
pub mod error;
pub mod hooks;
pub mod http;
pub mod inject;
pub mod intake;
pub mod labels;
pub mod lease;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod server;
pub mod shared;
pub mod tasks;
pub mod tls;
pub mod watch;

pub use error::{Error, Result};
