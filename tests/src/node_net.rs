//! The test node's network: its namespace and an "outside" namespace joined by a veth link,
//! work done from inside a namespace, and the relay that lets the host reach the API server.

use std::{
    fs,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};

use crate::node_config::{CLUSTER_CIDR, LINK_PREFIX, NODE_ADDRESS, OUTSIDE_ADDRESS, SERVICE_CIDR};

/// Runs `args` (a program and its arguments) and returns its output.
pub fn run(args: &[&str]) -> Result<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))
}

/// Runs `args` and fails with its stderr unless it succeeds.
pub fn must(args: &[&str]) -> Result<()> {
    let output = run(args)?;
    if !output.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `work` on a new thread that entered network namespace `netns` (sockets made there
/// stay in it); the calling thread never changes namespace.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        enter_netns(&path)?;
        work()
    })
    .join()
    .map_err(|_| anyhow!("the thread in network namespace {netns} panicked"))?
}

/// Moves the calling thread into the network namespace pinned at `path`.
pub fn enter_netns(path: &str) -> Result<()> {
    let file = fs::File::open(path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {path}"))
}

/// The node's namespace and the outside namespace, `eth0` in each, joined by a veth pair:
/// the node at [`NODE_ADDRESS`] with the outside as its default gateway, the outside routing
/// the cluster's pod and Service ranges to the node. Removed on drop.
#[derive(Debug)]
pub struct NodeNet {
    pub node: String,
    pub outside: String,
}

impl NodeNet {
    pub fn create(id: &str) -> Result<Self> {
        let net = Self {
            node: format!("psknode{id}"),
            outside: format!("pskout{id}"),
        };
        for ns in [&net.node, &net.outside] {
            let _ = run(&["ip", "netns", "del", ns]);
            must(&["ip", "netns", "add", ns])?;
            must(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (a, b) = (format!("pskn{id}a"), format!("pskn{id}b"));
        must(&[
            "ip",
            "link",
            "add",
            &a,
            "netns",
            &net.node,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &net.outside,
        ])?;
        for (ns, dev, address) in [
            (&net.node, &a, NODE_ADDRESS),
            (&net.outside, &b, OUTSIDE_ADDRESS),
        ] {
            must(&["ip", "-n", ns, "link", "set", dev, "name", "eth0"])?;
            must(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{address}/{LINK_PREFIX}"),
                "dev",
                "eth0",
            ])?;
            must(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        }
        must(&[
            "ip",
            "-n",
            &net.node,
            "route",
            "add",
            "default",
            "via",
            OUTSIDE_ADDRESS,
        ])?;
        for range in [CLUSTER_CIDR, SERVICE_CIDR] {
            must(&[
                "ip",
                "-n",
                &net.outside,
                "route",
                "add",
                range,
                "via",
                NODE_ADDRESS,
            ])?;
        }
        // Routing between eth0 and the pods' bridge, and bridged pod-to-pod traffic seen by
        // iptables (kube-proxy, kube-router): both settings are per network namespace.
        in_netns(&net.node, || {
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("enabling IPv4 forwarding in the node")?;
            fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")
                .context("net.bridge.bridge-nf-call-iptables in the node (br_netfilter)")?;
            Ok(())
        })?;
        Ok(net)
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        for ns in [&self.node, &self.outside] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Relays connections to 127.0.0.1:`port` of the host to 127.0.0.1:`port` of a network
/// namespace: the test's clients, kubectl and helm reach the API server that runs in the
/// node's namespace at the address its certificate names. Stops on drop.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(netns_path: &Path, port: u16) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = TcpListener::bind(addr).with_context(|| {
            format!(
                "binding {addr} on the host to relay to the node's API server (another \
                 process took the port the control plane picked: start the node again)"
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let path = netns_path.display().to_string();
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // The accepting thread lives in the node's namespace: its outbound connections
            // (and the copy threads it starts) are made there.
            let entered = enter_netns(&path);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            for inbound in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = inbound else { continue };
                std::thread::spawn(move || {
                    if let Ok(outbound) = TcpStream::connect(addr) {
                        pipe(inbound, outbound);
                    }
                });
            }
        });
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the API server relay thread ended before starting"))??;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies both ways between two connections until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || copy_then_close(a, b2));
    copy_then_close(b, a2);
    let _ = forward.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Opens a TCP connection to `to` from inside `netns` (from the address `source` when given:
/// bound before connecting) and sends `request`; the answer read until the peer closes, or
/// the error (a refused, reset or timed-out connection).
pub fn exchange(
    netns: &str,
    source: Option<IpAddr>,
    to: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<io::Result<Vec<u8>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = request.to_vec();
    in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(async move {
            let attempt = async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                if let Some(source) = source {
                    socket.bind(SocketAddr::new(source, 0))?;
                }
                let mut stream = socket.connect(to).await?;
                stream.write_all(&request).await?;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await?;
                Ok(answer)
            };
            tokio::time::timeout(timeout, attempt)
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
        }))
    })
}

/// Adds `address` to the outside namespace's link (an attacker or client of its own there).
pub fn add_outside_address(outside: &str, address: &str) -> Result<()> {
    let with_prefix = format!("{address}/{LINK_PREFIX}");
    let listed = run(&["ip", "-n", outside, "-4", "addr", "show", "dev", "eth0"])?;
    if String::from_utf8_lossy(&listed.stdout).contains(&format!("inet {with_prefix} ")) {
        return Ok(());
    }
    must(&[
        "ip",
        "-n",
        outside,
        "addr",
        "add",
        &with_prefix,
        "dev",
        "eth0",
    ])
}
