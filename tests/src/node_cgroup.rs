//! The test node's cgroup and its cleanup: the kubelet's cgroup root in every cgroup v1
//! hierarchy, and a watchdog that kills everything in it and removes what the node made.

use std::{ffi::OsString, fs, path::Path, path::PathBuf};

use anyhow::{Context, Result};

use crate::process::Watchdog;

/// The node's cgroup in every cgroup v1 hierarchy (the kubelet's `cgroupRoot` must exist in
/// each); cpuset needs its CPUs and memory nodes copied from the parent to take tasks.
pub fn create_cgroups(name: &str) -> Result<()> {
    let root = Path::new("/sys/fs/cgroup");
    for entry in fs::read_dir(root).context("reading /sys/fs/cgroup (cgroup v1 needed)")? {
        let hierarchy = entry?.path();
        if hierarchy.file_name().is_some_and(|n| n == "unified")
            || !hierarchy.join("cgroup.procs").exists()
        {
            continue;
        }
        let dir = hierarchy.join(name);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cgroup {}", dir.display()))?;
        if hierarchy.ends_with("cpuset") {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = fs::read_to_string(hierarchy.join(file))?;
                fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// The node's cleanup: kill every process in the node's cgroup (daemons, shims,
/// containers), remove the cgroups, the namespaces and the given paths. A watchdog runs it
/// when the test process ends however it ends, or when fired by `Drop`.
const CLEANUP: &str = r#"cg=$1; shift
i=0
while [ $i -lt 100 ]; do
  pids=$(cat $(find "/sys/fs/cgroup/pids/$cg" -name cgroup.procs 2>/dev/null) 2>/dev/null)
  [ -z "$pids" ] && break
  kill -KILL $pids 2>/dev/null
  sleep 0.1
  i=$((i + 1))
done
for d in /sys/fs/cgroup/*/"$cg"; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
done
while [ "$1" != -- ]; do ip netns del "$1" 2>/dev/null; shift; done
shift
rm -rf -- "$@"
"#;

/// Starts the node's cleanup watchdog.
pub fn watchdog(cgroup: &str, netns: &[&str], remove: &[PathBuf]) -> Result<Watchdog> {
    let mut args = vec![OsString::from(cgroup)];
    args.extend(netns.iter().map(OsString::from));
    args.push("--".into());
    args.extend(remove.iter().map(|path| path.as_os_str().to_owned()));
    Watchdog::with_script(CLEANUP, &args).context("starting the node's cleanup watchdog")
}

/// Every process in cgroup `name`'s tree (the pids hierarchy).
pub fn process_ids(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![PathBuf::from(format!("/sys/fs/cgroup/pids/{name}"))];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            }
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    pids
}

/// Cgroup `name` in each hierarchy where it exists.
pub fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path().join(name))
                .filter(|dir| dir.is_dir())
                .collect()
        })
        .unwrap_or_default()
}
