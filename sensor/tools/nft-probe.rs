//! `nft-probe`: one `NftBans` operation from the command line, for tests and for operators
//! inspecting or cleaning the sensor's nftables table (e.g. `ip netns exec NS nft-probe ...`).

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use portsentry_sensor::nft::{NftBans, NftError};

const USAGE: &str = "usage: nft-probe TABLE COMMAND [ARGS]
  open                          create or check the table, sets and chains
  ban ADDR SECS|forever         ban ADDR for SECS seconds (or without timeout)
  unban ADDR                    lift the ban on ADDR
  banned                        print `ADDR SECS|forever` per element (remaining time)
  reconcile [ADDR=SECS|forever]...  make the kernel hold exactly these bans
  tripwire PORT[,PORT]... SECS|forever  install the in-kernel tripwire on TCP decoys
  exempt [NET[,NET]...]         networks the tripwire never bans
  remove                        delete the table";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nft-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let [table, command, rest @ ..] = args else {
        return Err(USAGE.to_owned());
    };
    let bans = NftBans::open(table).map_err(err)?;
    match (command.as_str(), rest) {
        ("open", []) => Ok(()),
        ("ban", [addr, timeout]) => bans.ban(ip(addr)?, duration(timeout)?).map_err(err),
        ("unban", [addr]) => bans.unban(ip(addr)?).map_err(err),
        ("banned", []) => {
            for (addr, remaining) in bans.banned().map_err(err)? {
                match remaining {
                    Some(d) => println!("{addr} {:.3}", d.as_secs_f64()),
                    None => println!("{addr} forever"),
                }
            }
            Ok(())
        }
        ("reconcile", list) => {
            let mut active = Vec::new();
            for item in list {
                let (addr, timeout) = item
                    .split_once('=')
                    .ok_or_else(|| format!("expected ADDR=SECS|forever, got {item:?}"))?;
                active.push((ip(addr)?, duration(timeout)?));
            }
            bans.reconcile(&active).map_err(err)
        }
        ("tripwire", [ports, timeout]) => {
            let ports = ports
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse::<u16>().map_err(|e| format!("bad port {p:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            bans.install_tripwire(&ports, duration(timeout)?)
                .map_err(err)
        }
        ("exempt", nets) => {
            let nets = nets
                .iter()
                .flat_map(|n| n.split(','))
                .filter(|n| !n.is_empty())
                .map(|n| n.parse().map_err(|e| format!("bad network {n:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            bans.set_tripwire_exempt(&nets).map_err(err)
        }
        ("remove", []) => bans.remove().map_err(err),
        _ => Err(USAGE.to_owned()),
    }
}

fn err(e: NftError) -> String {
    e.to_string()
}

fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|e| format!("bad address {s:?}: {e}"))
}

fn duration(s: &str) -> Result<Option<Duration>, String> {
    if s == "forever" {
        return Ok(None);
    }
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .map(Some)
        .ok_or_else(|| format!("bad duration {s:?}: seconds > 0 or `forever`"))
}
