//! Namespaced PortSentryPolicies: the controller (I/O), its pure plan, the never-widen rule
//! and the status conditions both policy kinds report.

pub mod controller;
pub mod layers;
pub mod plan;
pub mod pod_sources;
pub mod selectors;
pub mod status;
pub mod widen;

#[cfg(test)]
mod tests;
