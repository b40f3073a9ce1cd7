//! The kernel probe tripwire of the raw TCP modes: whether a config arms it, which free ports
//! are its decoys, and the task that keeps those decoys equal to the ports no socket uses.

use std::{sync::Arc, time::Duration};

use portsentry_crds::Protocol;

use super::{sockets::Table, watch::Watch};
use crate::{
    alert::{Alerts, Fields},
    config::{BlockLevel, Config},
    metrics::Metrics,
    nft::{NftBans, NftError},
    packet::RawMode,
};

/// The TCP ports the kernel probe tripwire treats as decoys: every port the raw TCP modes
/// watch that no socket of `in_use` has as its local port (any address, any state).
pub fn probe_decoys(watch: &Watch, in_use: &Table) -> Vec<u16> {
    let ports = watch.ports(Protocol::Tcp);
    (1..=u16::MAX)
        .filter(|port| ports.contains(*port) && !in_use.uses_port(*port))
        .collect()
}

/// Why the kernel probe tripwire is not armed for this config and these modes (`None`: it is).
pub fn probe_tripwire_off(config: &Config, raw: &[RawMode]) -> Option<&'static str> {
    if !raw.iter().any(|mode| mode.protocol() == Protocol::Tcp) {
        Some("no raw TCP mode (-stcp, -atcp)")
    } else if !config.nft_tripwire {
        Some("NFT_TRIPWIRE is not \"1\"")
    } else if !config.ban_unverified {
        Some("BAN_UNVERIFIED is not \"1\" (a probe does not prove its source)")
    } else if config.block_tcp != BlockLevel::All {
        Some("BLOCK_TCP is not \"1\"")
    } else if config.scan_trigger > 1 {
        Some("SCAN_TRIGGER is above 1 (the kernel bans on the first probe)")
    } else {
        None
    }
}

/// Arms the kernel probe tripwire on the ports free now (see [`NftBans::install_probe_tripwire`])
/// and keeps its decoys equal to the free watched ports, re-read once a second from the
/// kernel's socket tables, so a port a service binds later stops being a decoy. (Between
/// the bind and the next re-read the kernel rule itself finds the new socket and lets the
/// packet through.) `exempt` are the networks never to ban, set before the rule exists.
pub fn arm_probe_tripwire(
    nft: Arc<NftBans>,
    watch: Watch,
    timeout: Option<Duration>,
    exempt: &[ipnet::IpNet],
    alerts: Arc<Alerts>,
    metrics: Arc<Metrics>,
) -> Result<(), NftError> {
    nft.set_tripwire_exempt(exempt)?;
    let decoys = probe_decoys(&watch, &Table::read(Protocol::Tcp));
    nft.install_probe_tripwire(&decoys, timeout)?;
    alerts.emit(
        &format!(
            "adminalert: Kernel tripwire armed: the first SYN, FIN, NULL or XMAS probe to one of {} free decoy TCP port(s) bans its source from the packet path (NFT_TRIPWIRE=\"1\", BAN_UNVERIFIED=\"1\")",
            decoys.len()
        ),
        Fields::new("probe_tripwire"),
    );
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(PROBE_DECOY_SYNC);
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            let (nft, watch) = (nft.clone(), watch.clone());
            let result = tokio::task::spawn_blocking(move || {
                nft.set_probe_decoys(&probe_decoys(&watch, &Table::read(Protocol::Tcp)))
            })
            .await;
            let error = match result {
                Ok(Ok(_)) => {
                    last_error = None;
                    continue;
                }
                Ok(Err(error)) => error.to_string(),
                Err(join) => join.to_string(),
            };
            if last_error.as_deref() != Some(&error) {
                metrics.action_failure("nftables");
                alerts.emit(
                    &format!("adminalert: ERROR: cannot update the kernel tripwire's decoy ports: {error}"),
                    Fields::new("probe_tripwire_failed"),
                );
            }
            last_error = Some(error);
        }
    });
    Ok(())
}

/// How often the probe tripwire's decoy ports are brought up to date.
pub const PROBE_DECOY_SYNC: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("/test.conf"), text).expect("config")
    }

    #[test]
    fn probe_decoys_are_the_watched_tcp_ports_no_socket_uses() {
        let watch = Watch::new(
            &config("ADVANCED_PORTS_TCP=\"100\"\nADVANCED_EXCLUDE_TCP=\"22\"\n"),
            &[RawMode::Atcp],
        );
        let mut in_use = Table::default();
        // 0.0.0.0:80 listening, 10.1.1.1:50 bound.
        in_use.extend("  sl  local_address rem_address   st\n   0: 00000000:0050 00000000:0000 0A\n   1: 0101010A:0032 00000000:0000 0A\n");
        let decoys = probe_decoys(&watch, &in_use);
        assert_eq!(decoys.len(), 99 - 3);
        assert!(!decoys.contains(&22) && !decoys.contains(&80) && !decoys.contains(&50));
        assert!(decoys.contains(&1) && decoys.contains(&99));
    }

    #[test]
    fn the_probe_tripwire_needs_nft_tripwire_ban_unverified_and_block_tcp_1() {
        let base = "NFT_BAN=\"1\"\nBLOCK_TCP=\"1\"\n";
        let on = config(&format!("{base}NFT_TRIPWIRE=\"1\"\nBAN_UNVERIFIED=\"1\"\n"));
        assert_eq!(probe_tripwire_off(&on, &[RawMode::Atcp]), None);
        assert_eq!(probe_tripwire_off(&on, &[RawMode::Stcp]), None);
        assert!(probe_tripwire_off(&on, &[RawMode::Audp]).is_some());
        let unverified_off = config(&format!("{base}NFT_TRIPWIRE=\"1\"\n"));
        assert!(
            probe_tripwire_off(&unverified_off, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("BAN_UNVERIFIED"))
        );
        let tripwire_off = config(&format!("{base}BAN_UNVERIFIED=\"1\"\n"));
        assert!(
            probe_tripwire_off(&tripwire_off, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("NFT_TRIPWIRE"))
        );
    }

    #[test]
    fn the_probe_tripwire_stays_off_when_scan_trigger_asks_for_several_hits() {
        let c = config(
            "NFT_BAN=\"1\"\nBLOCK_TCP=\"1\"\nNFT_TRIPWIRE=\"1\"\nBAN_UNVERIFIED=\"1\"\nSCAN_TRIGGER=\"3\"\n",
        );
        assert!(
            probe_tripwire_off(&c, &[RawMode::Atcp])
                .is_some_and(|why| why.contains("SCAN_TRIGGER"))
        );
    }
}
