#![allow(clippy::unwrap_used)]
//! The pod agent's tables against the real kernel: "pods" are network namespaces with a
//! process in a cgroup named `pod<uid>` (as the kubelet's cgroupfs driver names them), found
//! by UID through /proc, entered, and given their table; a scanner namespace on the same
//! bridge connects with a banned and an unbanned source address.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use portsentry_sensor::pod_nft::{plan::PodTable, tables::Tables};
use socket2::{Domain, Socket, Type};

mod common;

const TABLE: &str = "portsentry";
const APP_PORT: u16 = 8080;
const BANNED: &str = "10.233.0.21";
const OTHER: &str = "10.233.0.22";

/// A bridge namespace (the "node"), a scanner namespace with [`BANNED`] and [`OTHER`], and
/// pods added with [`Cluster::pod`]; everything removed on drop.
struct Cluster {
    prefix: String,
    serial: u32,
    hub: String,
    scanner: String,
    cgroup: PathBuf,
    pods: Vec<FakePod>,
}

/// A "pod": its namespace, a process of it in the cgroup `pod<uid>`, a listener on
/// [`APP_PORT`].
struct FakePod {
    uid: String,
    netns: String,
    address: String,
    process: Child,
    _listener: TcpListener,
}

fn cgroup_root() -> PathBuf {
    // cgroup v2 (unified at /sys/fs/cgroup), else the v1 `pids` hierarchy.
    if Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        PathBuf::from("/sys/fs/cgroup")
    } else {
        PathBuf::from("/sys/fs/cgroup/pids")
    }
}

fn ip(args: &[&str]) {
    common::must(&[&["ip"], args].concat());
}

impl Cluster {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let serial = N.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pspn{}x{serial}", std::process::id() % 100_000);
        let hub = format!("{prefix}h");
        let scanner = format!("{prefix}s");
        let cgroup = cgroup_root().join(format!("portsentry-test-{prefix}"));
        std::fs::create_dir_all(&cgroup).unwrap();
        let cluster = Cluster {
            prefix,
            serial,
            hub: hub.clone(),
            scanner: scanner.clone(),
            cgroup,
            pods: Vec::new(),
        };
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        cluster.attach(&scanner, &[BANNED, OTHER]);
        cluster
    }

    /// A namespace `name` on the bridge with `addresses`.
    fn attach(&self, name: &str, addresses: &[&str]) {
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        let port = format!("p{}", &name[name.len().saturating_sub(6)..]);
        ip(&[
            "-n", &self.hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            name,
        ]);
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"]);
        for address in addresses {
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
        }
        ip(&["-n", name, "link", "set", "eth0", "up"]);
    }

    /// Adds pod `index` (10.233.0.1<index>), its process in cgroup `pod<uid>`, listening.
    fn pod(&mut self, index: u8) -> usize {
        // Unique across the tests running at once (all of this process): the agent finds a
        // pod by UID among every process of the host.
        let uid = format!(
            "{:08}-{index:04}-4c1e-9a2b-{:012}",
            std::process::id(),
            self.serial
        );
        let netns = format!("{}p{index}", self.prefix);
        let address = format!("10.233.0.1{index}");
        self.attach(&netns, &[&address]);
        let process = self.start_process(&uid, &netns);
        let listener = enter(&netns, || {
            TcpListener::bind(SocketAddr::new(address.parse().unwrap(), APP_PORT)).unwrap()
        });
        self.pods.push(FakePod {
            uid,
            netns,
            address,
            process,
            _listener: listener,
        });
        self.pods.len() - 1
    }

    /// A `sleep` in `netns`, moved into the cgroup of pod `uid`.
    fn start_process(&self, uid: &str, netns: &str) -> Child {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "sleep", "600"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // `ip netns exec` enters the namespace, then becomes `sleep`.
        let comm = format!("/proc/{pid}/comm");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            assert!(Instant::now() < deadline, "the pod's process never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let dir = self.cgroup.join(format!("pod{uid}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        child
    }

    /// The pod's sandbox restarted: its process ends, a new namespace gets a new process
    /// (same pod UID and address).
    fn restart(&mut self, index: usize) {
        let pod = &mut self.pods[index];
        let _ = pod.process.kill();
        let _ = pod.process.wait();
        let old = pod.netns.clone();
        let fresh = format!("{old}r");
        let address = pod.address.clone();
        let uid = pod.uid.clone();
        ip(&["netns", "del", &old]);
        self.attach(&fresh, &[&address]);
        let process = self.start_process(&uid, &fresh);
        let listener = enter(&fresh, || {
            TcpListener::bind(SocketAddr::new(address.parse().unwrap(), APP_PORT)).unwrap()
        });
        let pod = &mut self.pods[index];
        pod.netns = fresh;
        pod.process = process;
        pod._listener = listener;
    }

    /// The plan giving each pod of `indexes` the ban of [`BANNED`].
    fn plan(&self, indexes: &[usize]) -> BTreeMap<String, PodTable> {
        indexes
            .iter()
            .map(|i| {
                let pod = &self.pods[*i];
                let table = PodTable {
                    uid: pod.uid.clone(),
                    namespace: "shop".into(),
                    name: format!("web-{i}"),
                    elements: vec![(
                        format!("{BANNED}/32").parse().unwrap(),
                        Some(Duration::from_secs(600)),
                    )],
                };
                (pod.uid.clone(), table)
            })
            .collect()
    }

    /// Whether a TCP connection from `source` in the scanner namespace to pod `index`'s app
    /// port completes within 1 s.
    fn connects(&self, source: &str, index: usize) -> bool {
        let to: SocketAddr = format!("{}:{APP_PORT}", self.pods[index].address)
            .parse()
            .unwrap();
        let from: SocketAddr = format!("{source}:0").parse().unwrap();
        enter(&self.scanner, || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket.bind(&from.into()).unwrap();
            socket
                .connect_timeout(&to.into(), Duration::from_secs(1))
                .is_ok()
        })
    }

    /// `nft ARGS` inside pod `index`'s namespace.
    fn nft(&self, index: usize, args: &[&str]) -> String {
        let output = common::sh(
            &[
                &["ip", "netns", "exec", &self.pods[index].netns, "nft"],
                args,
            ]
            .concat(),
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn has_table(&self, index: usize) -> bool {
        self.nft(index, &["list", "tables"])
            .contains(&format!("inet {TABLE}"))
    }

    fn tables(&self) -> Tables {
        Tables::new(TABLE, PathBuf::from("/proc"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            let _ = pod.process.kill();
            let _ = pod.process.wait();
            let _ = std::fs::remove_dir(self.cgroup.join(format!("pod{}", pod.uid)));
            let _ = common::sh(&["ip", "netns", "del", &pod.netns]);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = common::sh(&["ip", "netns", "del", &self.scanner]);
        let _ = common::sh(&["ip", "netns", "del", &self.hub]);
    }
}

/// Runs `f` on a thread inside namespace `name`.
fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

fn ready() -> bool {
    common::prerequisites(&["ip", "nft"])
}

#[test]
fn a_banned_source_is_dropped_at_every_planned_pod_while_another_source_gets_through() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let (one, two) = (cluster.pod(1), cluster.pod(2));
    assert!(cluster.connects(BANNED, one) && cluster.connects(BANNED, two));
    let mut tables = cluster.tables();
    let outcome = tables.apply(&cluster.plan(&[one, two]));
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert_eq!((outcome.enforced, outcome.opened), (2, 2));
    for pod in [one, two] {
        assert!(
            !cluster.connects(BANNED, pod),
            "pod {pod} drops the banned source"
        );
        assert!(
            cluster.connects(OTHER, pod),
            "pod {pod} still answers another source"
        );
    }
}

#[test]
fn the_table_lives_in_the_pods_namespace_not_the_agents() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let one = cluster.pod(1);
    let mut tables = cluster.tables();
    tables.apply(&cluster.plan(&[one]));
    assert!(cluster.has_table(one));
    let here = common::sh(&["nft", "list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&here.stdout).contains(&format!("inet {TABLE}\n")),
        "the agent's own namespace has no pod table"
    );
    let listed = cluster.nft(one, &["list", "table", "inet", TABLE]);
    assert!(listed.contains(BANNED), "{listed}");
}

#[test]
fn a_flushed_or_deleted_table_is_restored_by_the_next_pass() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let one = cluster.pod(1);
    let mut tables = cluster.tables();
    let plan = cluster.plan(&[one]);
    tables.apply(&plan);
    cluster.nft(one, &["flush", "table", "inet", TABLE]);
    assert!(
        cluster.connects(BANNED, one),
        "a flushed table drops nothing"
    );
    let outcome = tables.apply(&plan);
    assert!(outcome.errors.is_empty(), "{:?}", outcome.errors);
    assert!(!cluster.connects(BANNED, one), "restored after a flush");
    cluster.nft(one, &["delete", "table", "inet", TABLE]);
    assert!(cluster.connects(BANNED, one));
    tables.apply(&plan);
    assert!(!cluster.connects(BANNED, one), "restored after a delete");
    assert!(cluster.connects(OTHER, one));
}

#[test]
fn a_pod_whose_sandbox_restarted_in_a_new_namespace_gets_its_table_there() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let one = cluster.pod(1);
    let mut tables = cluster.tables();
    let plan = cluster.plan(&[one]);
    tables.apply(&plan);
    cluster.restart(one);
    assert!(
        cluster.connects(BANNED, one),
        "the new namespace starts open"
    );
    let outcome = tables.apply(&plan);
    assert_eq!(outcome.opened, 1, "{outcome:?}");
    assert!(
        !cluster.connects(BANNED, one),
        "dropped in the new namespace"
    );
    assert!(cluster.connects(OTHER, one));
}

#[test]
fn a_pod_no_longer_planned_loses_its_table_and_remove_all_clears_the_rest() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let (one, two) = (cluster.pod(1), cluster.pod(2));
    let mut tables = cluster.tables();
    tables.apply(&cluster.plan(&[one, two]));
    let outcome = tables.apply(&cluster.plan(&[one]));
    assert_eq!(outcome.removed, 1, "{outcome:?}");
    assert!(
        !cluster.has_table(two),
        "the unselected pod's table is gone"
    );
    assert!(cluster.connects(BANNED, two));
    assert!(
        !cluster.connects(BANNED, one),
        "the selected pod still drops"
    );
    assert!(tables.remove_all().is_empty());
    assert!(!cluster.has_table(one), "shutdown removes every table");
    assert!(cluster.connects(BANNED, one));
}

#[test]
fn a_planned_pod_without_a_process_waits_and_gets_no_table() {
    if !ready() {
        return;
    }
    let cluster = Cluster::new();
    let mut tables = cluster.tables();
    let plan = BTreeMap::from([(
        "ffffffff-0000-4000-8000-000000000000".to_owned(),
        PodTable {
            uid: "ffffffff-0000-4000-8000-000000000000".into(),
            namespace: "shop".into(),
            name: "starting".into(),
            elements: Vec::new(),
        },
    )]);
    let outcome = tables.apply(&plan);
    assert_eq!((outcome.waiting, outcome.enforced), (1, 0), "{outcome:?}");
    assert!(tables.pods().is_empty());
}

#[test]
fn the_sweep_removes_a_table_an_earlier_agent_left_in_an_unselected_pod() {
    if !ready() {
        return;
    }
    let mut cluster = Cluster::new();
    let one = cluster.pod(1);
    // An earlier agent kept pod one's table and ended without removing it.
    let mut earlier = cluster.tables();
    earlier.apply(&cluster.plan(&[one]));
    drop(earlier);
    assert!(cluster.has_table(one));
    let tables = cluster.tables();
    let uid = cluster.pods[one].uid.clone();
    let (entered, errors) = tables.sweep(&[uid.as_str()].into_iter().collect());
    assert_eq!((entered, errors.len()), (1, 0), "{errors:?}");
    assert!(!cluster.has_table(one));
    assert!(cluster.connects(BANNED, one));
}
