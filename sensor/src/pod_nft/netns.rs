//! Getting into a pod's network namespace: its processes found by pod UID in
//! `/proc/<pid>/cgroup`, its namespace opened at `/proc/<pid>/ns/net`, entered on a thread.
//!
//! Only that short-lived thread calls `setns`; the netlink sockets it opens there keep their
//! namespace for life, so every later call on them, from any thread, acts inside the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// A network namespace's identity (device and inode of its nsfs file): a restarted pod
/// sandbox is a new namespace with a new identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    fn of(file: &File) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(NetnsId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// True when a `/proc/<pid>/cgroup` text places the process in the cgroup of pod `uid`:
/// `…/pod<uid>/…` with the cgroupfs driver, `…-pod<uid with _>.slice/…` with systemd's.
pub fn in_pod_cgroup(cgroup: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("pod{}", uid.replace('-', "_"));
    cgroup
        .lines()
        .any(|line| line.contains(&cgroupfs) || line.contains(&systemd))
}

/// One process of each pod of `uids` found under `proc_root` (the lowest PID: the sandbox's
/// pause process when it is there), by pod UID. Pods without a live process are absent.
pub fn find_pods(proc_root: &Path, uids: &BTreeSet<&str>) -> BTreeMap<String, u32> {
    let mut found: BTreeMap<String, u32> = BTreeMap::new();
    if uids.is_empty() {
        return found;
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read: it is simply not found.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for uid in uids {
            if in_pod_cgroup(&cgroup, uid) {
                let slot = found.entry((*uid).to_owned()).or_insert(pid);
                *slot = (*slot).min(pid);
            }
        }
    }
    found
}

/// A pod's network namespace, held open.
#[derive(Debug)]
pub struct Netns {
    pub id: NetnsId,
    pub path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens `/proc/<pid>/ns/net` under `proc_root` (needs CAP_SYS_PTRACE for another
    /// user's process, and hostPID to see the pod's processes at all).
    pub fn of_process(proc_root: &Path, pid: u32) -> io::Result<Self> {
        Self::open(proc_root.join(pid.to_string()).join("ns/net"))
    }

    /// Opens a namespace file, e.g. `/run/netns/NAME` or `/proc/<pid>/ns/net`.
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let file = File::open(&path)?;
        Ok(Netns {
            id: NetnsId::of(&file)?,
            path,
            file,
        })
    }

    /// The identity of the namespace a process is in now, without holding it.
    pub fn id_of_process(proc_root: &Path, pid: u32) -> io::Result<NetnsId> {
        NetnsId::of(&File::open(proc_root.join(pid.to_string()).join("ns/net"))?)
    }

    /// Runs `work` on a new thread that has entered this namespace (needs CAP_SYS_ADMIN),
    /// and returns what it returned. The calling thread's namespace is never changed.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("pod-netns".into())
                .spawn_scoped(scope, || {
                    setns(&self.file, CloneFlags::CLONE_NEWNET)
                        .map_err(|errno| {
                            Error::PodNftables(format!(
                                "cannot enter the network namespace {}: {errno} (the agent needs CAP_SYS_ADMIN)",
                                self.path.display()
                            ))
                        })
                        .map(|()| work())
                })
                .map_err(Error::Io)?;
            thread.join().unwrap_or_else(|_| {
                Err(Error::PodNftables(
                    "the thread in the pod's network namespace panicked".into(),
                ))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c2a9e-5b7d-4c1e-9a2b-0d4e6f8a1b2c";

    #[test]
    fn cgroupfs_paths_name_the_pod_uid() {
        let text = "0::/kubepods/besteffort/pod3f1c2a9e-5b7d-4c1e-9a2b-0d4e6f8a1b2c/0123abcd\n";
        assert!(in_pod_cgroup(text, UID));
    }

    #[test]
    fn systemd_paths_name_the_pod_uid_with_underscores() {
        let text = "0::/kubepods.slice/kubepods-burstable.slice/\
            kubepods-burstable-pod3f1c2a9e_5b7d_4c1e_9a2b_0d4e6f8a1b2c.slice/cri-containerd-0123.scope\n";
        assert!(in_pod_cgroup(text, UID));
    }

    #[test]
    fn cgroup_v1_lines_are_each_looked_at() {
        let text =
            "9:name=systemd:/\n4:memory:/kubepods/pod3f1c2a9e-5b7d-4c1e-9a2b-0d4e6f8a1b2c/c1\n";
        assert!(in_pod_cgroup(text, UID));
    }

    #[test]
    fn other_pods_and_host_processes_are_not_the_pod() {
        let other = "0::/kubepods/besteffort/pod11111111-5b7d-4c1e-9a2b-0d4e6f8a1b2c/c1\n";
        assert!(!in_pod_cgroup(other, UID));
        assert!(!in_pod_cgroup("0::/system.slice/containerd.service\n", UID));
        assert!(!in_pod_cgroup("0::/kubepods/pod\n", ""));
    }
}
