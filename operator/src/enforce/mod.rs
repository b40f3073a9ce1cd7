//! Bans and their enforcement: ban arithmetic and names, offence memory, banned prefixes
//! merged and sharded, the generated NetworkPolicies, and quarantine of banned pods.

pub mod bans;
pub mod guards;
pub mod memory;
pub mod netpol;
pub mod prefixes;
pub mod quarantine;
