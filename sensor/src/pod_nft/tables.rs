//! The pod tables this agent keeps: one [`NftBans`] opened inside each planned pod's network
//! namespace, made equal to its plan on every pass, reopened when the pod's sandbox (its
//! namespace) is new, and removed from pods no longer planned and on shutdown.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use crate::{
    error::{Error, Result},
    nft::{NftBans, remove_table},
};

use super::{
    netns::{Netns, NetnsId, find_pods},
    plan::PodTable,
};

/// One pod's table, open in its namespace.
#[derive(Debug)]
struct Entry {
    /// A process of the pod, checked on every pass to still be in [`Entry::netns`].
    pid: u32,
    netns: NetnsId,
    nft: NftBans,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Pods whose table equals their plan now.
    pub enforced: usize,
    /// Elements in those tables together.
    pub elements: usize,
    /// Tables opened in a namespace new to the agent (a new pod, or a restarted sandbox).
    pub opened: usize,
    /// Tables removed (pods no longer selected or gone).
    pub removed: usize,
    /// Planned pods without a running process yet (their sandbox is starting).
    pub waiting: usize,
    /// Pods whose table could not be made right, with why.
    pub errors: Vec<(String, String)>,
}

/// The tables of every planned pod on this node.
#[derive(Debug)]
pub struct Tables {
    table: String,
    proc_root: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl Tables {
    /// No table yet; `table` is the name of each pod's table (family inet), `proc_root` the
    /// host's /proc (the agent runs with hostPID).
    pub fn new(table: &str, proc_root: PathBuf) -> Self {
        Tables {
            table: table.to_owned(),
            proc_root,
            entries: BTreeMap::new(),
        }
    }

    /// UIDs of the pods whose table is open.
    pub fn pods(&self) -> BTreeSet<String> {
        self.entries.keys().cloned().collect()
    }

    /// Makes every planned pod's table equal its plan (level-triggered: a deleted or flushed
    /// table, or a new sandbox, gets its sets back), and removes the tables of pods no longer
    /// planned. Blocks for a few netlink round trips per pod.
    pub fn apply(&mut self, pods: &BTreeMap<String, PodTable>) -> Outcome {
        let mut outcome = Outcome::default();
        let unplanned: Vec<String> = self
            .entries
            .keys()
            .filter(|uid| !pods.contains_key(*uid))
            .cloned()
            .collect();
        for uid in unplanned {
            if let Some(entry) = self.entries.remove(&uid) {
                match entry.nft.remove() {
                    Ok(()) => outcome.removed += 1,
                    Err(error) => outcome.errors.push((uid, error.to_string())),
                }
            }
        }
        let stale: BTreeSet<&str> = pods
            .keys()
            .filter(|uid| {
                self.entries.get(*uid).is_none_or(|entry| {
                    Netns::id_of_process(&self.proc_root, entry.pid).ok() != Some(entry.netns)
                })
            })
            .map(String::as_str)
            .collect();
        let found = find_pods(&self.proc_root, &stale);
        for uid in stale {
            let Some(pid) = found.get(uid).copied() else {
                // No process: the sandbox is starting, or the pod is gone. A table held open
                // would keep a dead namespace alive: let it go.
                self.entries.remove(uid);
                outcome.waiting += 1;
                continue;
            };
            match self.open(uid, pid) {
                Ok(true) => outcome.opened += 1,
                Ok(false) => {}
                Err(error) => {
                    self.entries.remove(uid);
                    outcome.errors.push((label(&pods[uid]), error.to_string()));
                }
            }
        }
        for (uid, want) in pods {
            let Some(entry) = self.entries.get(uid) else {
                continue;
            };
            match entry.nft.reconcile_nets(&want.elements) {
                Ok(()) => {
                    outcome.enforced += 1;
                    outcome.elements += want.elements.len();
                }
                Err(error) => outcome.errors.push((label(want), error.to_string())),
            }
        }
        outcome
    }

    /// Points the pod's entry at `pid`, opening a table in its namespace unless the entry
    /// already has that namespace. True when a table was opened.
    fn open(&mut self, uid: &str, pid: u32) -> Result<bool> {
        let netns = Netns::of_process(&self.proc_root, pid)?;
        if let Some(entry) = self.entries.get_mut(uid)
            && entry.netns == netns.id
        {
            entry.pid = pid;
            return Ok(false);
        }
        let table = self.table.clone();
        let nft = netns
            .run(move || NftBans::open(&table))?
            .map_err(|e| Error::PodNftables(e.to_string()))?;
        self.entries.insert(
            uid.to_owned(),
            Entry {
                pid,
                netns: netns.id,
                nft,
            },
        );
        Ok(true)
    }

    /// Removes every table this agent keeps (shutdown, uninstall). Returns the failures.
    pub fn remove_all(&mut self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        for (uid, entry) in std::mem::take(&mut self.entries) {
            if let Err(error) = entry.nft.remove() {
                errors.push((uid, error.to_string()));
            }
        }
        errors
    }

    /// Removes the table from the namespaces of `uids` (pods on this node the agent does not
    /// keep a table for: what an earlier agent left there). Returns how many pods were
    /// entered, and the failures.
    pub fn sweep(&self, uids: &BTreeSet<&str>) -> (usize, Vec<(String, String)>) {
        let mut entered = 0;
        let mut errors = Vec::new();
        for (uid, pid) in find_pods(&self.proc_root, uids) {
            let table = self.table.clone();
            let removed = Netns::of_process(&self.proc_root, pid)
                .map_err(Error::Io)
                .and_then(|netns| netns.run(move || remove_table(&table)))
                .and_then(|r| r.map_err(|e| Error::PodNftables(e.to_string())));
            match removed {
                Ok(()) => entered += 1,
                Err(error) => errors.push((uid, error.to_string())),
            }
        }
        (entered, errors)
    }
}

fn label(pod: &PodTable) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}
