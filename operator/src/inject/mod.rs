//! Sidecar injection as pure functions: which policy governs a pod, the pod with the
//! `portsentry-sensor` native sidecar and the RFC 6902 patch derived from it, and the classic
//! `portsentry.conf` rendered from a policy.
//!
//! # Decoys below 1024: the pod sysctl, not `NET_BIND_SERVICE`
//!
//! The sidecar runs as UID 65532 with `allowPrivilegeEscalation: false`. A capability added
//! to a non-root container is only in its bounding set: container runtimes set no ambient
//! capabilities (kubernetes/kubernetes#56374, KEP-2763), and `no_new_privs` (what
//! `allowPrivilegeEscalation: false` sets) makes the kernel ignore file capabilities on
//! `execve`. So `NET_BIND_SERVICE` would not let a non-root sensor bind port 1; the only way
//! to keep it would be to run the sensor as root. The pod sysctl
//! `net.ipv4.ip_unprivileged_port_start` instead is namespaced to the pod's network
//! namespace, on Kubernetes' safe-sysctl list (allowed by the baseline and restricted Pod
//! Security Standards, no kubelet flag needed), and works for a non-root process with every
//! capability dropped. It is set only when a bound decoy is below 1024, to the lowest such
//! port (never raised when the pod already sets it lower). Its cost: the pod's other
//! containers may then bind those ports too, which is within the pod's own trust boundary.
//!
//! # Stealth: root with `NET_RAW` only
//!
//! Raw-socket modes (`stealth`, `advanced`) need `NET_RAW` in the effective set, which for
//! the same reason only UID 0 gets. Such sidecars run as UID 0 with every capability dropped
//! but `NET_RAW`, a read-only root filesystem and no privilege escalation; all others run
//! non-root with no capabilities at all.

mod config;
mod decide;
mod decoys;
mod governing;
mod patch;
mod sidecar;
pub mod webhook;

pub use config::*;
pub use decide::*;
pub use decoys::*;
pub use governing::*;
pub use patch::*;
pub use sidecar::*;

#[cfg(test)]
mod tests;
