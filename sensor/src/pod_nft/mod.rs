//! Pod nftables: the node agent keeps a `portsentry` table of timed ban sets inside the
//! network namespace of each pod on its node that a `PodNftables` policy selects.
//!
//! ```text
//!  API server ─watch─▶ pods of this node, policies, cluster policies, namespaces, bans
//!        │                                   │
//!        └──────────────▶ plan() (pure) ─────┴─▶ per pod: find its netns in /proc, enter it
//!                                                 on a thread, NftBans there, reconcile (≤ 1 s)
//! ```

pub mod agent;
pub mod netns;
pub mod plan;
pub mod tables;
