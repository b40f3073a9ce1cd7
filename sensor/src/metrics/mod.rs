//! The sensor's Prometheus metrics ([`registry`]) and the HTTP endpoints that expose them
//! with its health and readiness ([`endpoint`], hyper with connection and time limits).

pub mod endpoint;
pub mod registry;

pub use endpoint::{Limits, serve};
pub use registry::{ACTIONS, Metrics};
