//! ClusterPortSentryPolicies: the controller (I/O), its pure plan, and the node sensors
//! (DaemonSet and ConfigMap) it runs for a policy with a `nodeSelector`.

pub mod controller;
pub mod nodes;
pub mod plan;
