//! The operator and the sensor as the built binaries: an operator process against a control
//! plane, sensors in network namespaces (removed in `Drop`), and an HTTPS report client.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tempfile::TempDir;
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};

use crate::{
    ControlPlane,
    binaries::workspace_binary,
    wait::{free_port, free_port_on, wait_until},
};

/// True when this end-to-end test can run here (root, and `tools` on disk). With `CI=true` a
/// missing prerequisite panics; otherwise the test says what is missing and returns early.
pub fn prerequisites(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !root {
        missing.push("root (network namespaces need it)".to_owned());
    }
    for tool in tools {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).exists());
        if !found {
            missing.push(format!(
                "`{tool}` (apt-get install it, or run tests/run as root)"
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!("end-to-end test needs: {}", missing.join(", "));
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("NOT RUN: {message}");
    false
}

/// How to run one operator.
#[derive(Debug, Clone)]
pub struct OperatorSettings {
    /// Address the intake listens on (and its certificate names).
    pub report_ip: IpAddr,
    /// The operator's namespace (the Lease lives there).
    pub namespace: String,
    /// Replica name (Lease holder identity).
    pub identity: String,
    pub lease_name: String,
    /// Seconds the Lease holds without renewal (short, so takeover tests are quick).
    pub lease_duration_secs: u64,
    pub extra_args: Vec<String>,
    /// Wait in `start` until this replica leads (false: return once it serves).
    pub wait_leading: bool,
    /// Set: the operator issues its intake certificate (named `report_ip`) from its own CA,
    /// kept in this Secret of `namespace`, as in a cluster. Unset: it serves a certificate of
    /// the control plane's CA from files (`--report-ca-file` that CA).
    pub intake_ca_secret: Option<String>,
}

impl OperatorSettings {
    pub fn new(lease_name: &str) -> Self {
        Self {
            report_ip: IpAddr::from([127, 0, 0, 1]),
            namespace: "portsentry-system".into(),
            identity: "operator-0".into(),
            lease_name: lease_name.to_owned(),
            lease_duration_secs: 3,
            extra_args: Vec::new(),
            wait_leading: true,
            intake_ca_secret: None,
        }
    }
}

/// A running `portsentry-operator` with the admin kubeconfig; killed on drop.
#[derive(Debug)]
pub struct Operator {
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    kubeconfig: PathBuf,
    dir: TempDir,
    /// `https://IP:PORT/v1/reports`.
    pub report_url: String,
    pub metrics_addr: SocketAddr,
    /// PEM of the CA that signed the intake's certificate (read from the operator's Secret
    /// once it exists when the operator issues its own).
    pub ca_pem: String,
    wait_leading: bool,
    /// The operator's own intake CA: where to read it.
    intake_ca: Option<(kube::Config, String, String)>,
}

impl Operator {
    /// Starts the operator and waits until it leads (its intake answers other than 503).
    pub async fn start(plane: &ControlPlane, settings: OperatorSettings) -> Result<Self> {
        plane.ensure_namespace(&settings.namespace).await?;
        // PORTSENTRY_OPERATOR_BIN: another build (e.g. of an older commit) to compare with.
        let program = match std::env::var_os("PORTSENTRY_OPERATOR_BIN") {
            Some(path) => PathBuf::from(path),
            None => workspace_binary("portsentry-operator", "portsentry-operator")?,
        };
        let dir = tempfile::Builder::new()
            .prefix("portsentry-operator-")
            .tempdir()?;
        let cert = plane.issue_serving_cert(&[&settings.report_ip.to_string()])?;
        cert.write(dir.path(), "intake")?;
        fs::write(dir.path().join("intake-ca.crt"), plane.ca_pem())?;
        let report_port = free_port_on(settings.report_ip)?;
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let host = match settings.report_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let mut args = vec![
            format!("--metrics-addr={metrics_addr}"),
            format!(
                "--report-addr={}",
                SocketAddr::new(settings.report_ip, report_port)
            ),
            format!("--namespace={}", settings.namespace),
            format!("--instance={}", settings.identity),
            format!("--lease-name={}", settings.lease_name),
            format!("--lease-duration-secs={}", settings.lease_duration_secs),
        ];
        let report_url = format!("https://{host}:{report_port}/v1/reports");
        // What injected sidecars are told (used only with the webhook on).
        args.push(format!("--report-url={report_url}"));
        match &settings.intake_ca_secret {
            Some(secret) => args.extend([
                format!("--report-ca-secret={secret}"),
                format!("--report-dns-name={}", settings.report_ip),
            ]),
            None => args.extend(
                ["intake.crt", "intake.key", "intake-ca.crt"]
                    .iter()
                    .zip([
                        "--report-cert-file",
                        "--report-key-file",
                        "--report-ca-file",
                    ])
                    .map(|(file, flag)| format!("{flag}={}", dir.path().join(file).display())),
            ),
        }
        args.extend(settings.extra_args.iter().cloned());
        let intake_ca = match &settings.intake_ca_secret {
            Some(secret) => Some((
                plane.admin_config().clone(),
                settings.namespace.clone(),
                secret.clone(),
            )),
            None => None,
        };
        let mut operator = Self {
            child: None,
            program,
            args,
            kubeconfig: plane.kubeconfig_path().to_owned(),
            dir,
            report_url,
            metrics_addr,
            ca_pem: match intake_ca {
                Some(_) => String::new(),
                None => plane.ca_pem().to_owned(),
            },
            wait_leading: settings.wait_leading,
            intake_ca,
        };
        operator.launch().await?;
        Ok(operator)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,portsentry_operator=debug,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the operator exited ({status}):\n{}", self.log());
            }
            if self.ca_pem.is_empty()
                && let Some((config, namespace, name)) = &self.intake_ca
                && let Ok(client) = kube::Client::try_from(config.clone())
                && let Ok(Some(secret)) =
                    kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client, namespace)
                        .get_opt(name)
                        .await
                && let Some(pem) = secret.data.and_then(|d| d.get("ca.crt").cloned())
            {
                self.ca_pem = String::from_utf8(pem.0)?;
            }
            if let Ok(leading) = self.leading().await
                && (leading || !self.wait_leading)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the operator did not start leading in 60 s:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the intake says this replica leads: a GET is answered 503 by a follower and
    /// 405 by the leader (it counts as no report).
    pub async fn leading(&self) -> Result<bool> {
        let (status, _) = https_request("GET", &self.report_url, &self.ca_pem, None, b"").await?;
        Ok(status != 503)
    }

    /// The operator's memory from /proc: (resident now `VmRSS`, peak resident `VmHWM`), KiB.
    pub fn resident_kib(&self) -> Result<(u64, u64)> {
        let pid = self
            .child
            .as_ref()
            .map(Child::id)
            .context("the operator is not running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGKILLs the operator (no shutdown at all).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same flags and waits until it leads.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch().await
    }

    /// The `--report-ca-file` the operator reads when it serves its intake from files
    /// ([`OperatorSettings::intake_ca_secret`] unset): rewrite it to rotate the CA.
    pub fn intake_ca_file(&self) -> PathBuf {
        self.dir.path().join("intake-ca.crt")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("operator.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The status and body of `GET path` on the operations endpoint (`/metrics`, `/readyz`).
    pub async fn operations_get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        Ok((status, body.to_owned()))
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self.operations_get("/metrics").await?.1)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The resident memory of the process in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("the operator is not running"))?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
    }

    /// Sends SIGTERM (what the kubelet sends a pod being stopped).
    pub fn terminate(&self) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("the operator is not running"))?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit: its status, or None if it still runs.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("the operator was not started");
            };
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric line starting with `series` (`name` or `name{labels}`), or 0.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("PORTSENTRY_KEEP_TEMP").is_some_and(|v| !v.is_empty() && v != "0") {
            self.dir.disable_cleanup(true);
            eprintln!("operator files kept in {}", self.dir.path().display());
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(400).collect();
            eprintln!(
                "--- last lines of the operator log ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// The sensor image the operator injects when not told otherwise (`--sensor-image`).
pub const DEFAULT_SENSOR_IMAGE: &str = "ghcr.io/portsentry-k8s/portsentry-sensor:0.1.0";

/// A pod `name` of `namespace` with `labels`, running the sensor as the webhook injects it
/// for namespaced `policy` (native sidecar `portsentry-sensor` of `image`, its injected
/// arguments, the config and `portsentry.io` token volumes) beside an app container: what
/// the intake accepts reports from. No kubelet runs it here.
pub fn injected_pod(
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    policy: &str,
    image: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "serviceAccountName": "default",
            "initContainers": [{
                "name": "portsentry-sensor", "image": image, "restartPolicy": "Always",
                "args": ["--config", "/etc/portsentry/portsentry.conf", "--tcp",
                         "--log-format", "json", "--metrics-addr", "0.0.0.0:9095",
                         "--report-url", "https://portsentry-operator.portsentry-system.svc:8443/v1/reports",
                         "--report-token-file", "/var/run/secrets/portsentry.io/token",
                         "--report-ca-file", "/etc/portsentry/ca.crt",
                         "--report-policy", format!("PortSentryPolicy/{policy}")],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [
                    {"name": "portsentry-config", "mountPath": "/etc/portsentry", "readOnly": true},
                    {"name": "portsentry-token", "mountPath": "/var/run/secrets/portsentry.io", "readOnly": true},
                ],
            }],
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
            "volumes": [
                {"name": "portsentry-config", "configMap": {"name": format!("portsentry-{policy}")}},
                {"name": "portsentry-token", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "portsentry.io", "expirationSeconds": 3600, "path": "token"}}
                ]}},
            ],
        }
    })
}

/// POSTs `body` to `url` over HTTPS trusting `ca_pem`, with `token` as bearer if given:
/// the status and the body of the answer.
pub async fn post_report(
    url: &str,
    ca_pem: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, String)> {
    https_request("POST", url, ca_pem, token, body).await
}

async fn https_request(
    method: &str,
    url: &str,
    ca_pem: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, String)> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let uri: hyper::Uri = url.parse()?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("no host in {url}"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.clone())?, tcp)
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(uri.path())
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::copy_from_slice(body)))?)
        .await?;
    let status = response.status().as_u16();
    let text = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// A pod's network namespace (victim) with a sensor, an attacker namespace joined to it by
/// veth, and a veth to the host so the sensor reaches the operator. Removed on drop.
#[derive(Debug)]
pub struct PodNet {
    pub victim: String,
    pub attacker: String,
    /// The victim's address on the attacker link (what the attacker scans).
    pub victim_addr: String,
    pub attacker_addr: String,
    /// The host end of the host link (where the operator listens).
    pub host_addr: String,
    attacker_dev: String,
    children: Vec<Child>,
    dir: TempDir,
}

fn run(args: &[&str]) -> Result<Output> {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))
}

fn must(args: &[&str]) -> Result<()> {
    let output = run(args)?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl PodNet {
    /// Namespaces and links for test `index` (0..=250): 10.232.index.0/24 between victim
    /// and attacker, 10.233.index.0/30 between host and victim. Nothing else is touched.
    pub fn new(index: u8) -> Result<Self> {
        let id = std::process::id() % 10_000;
        let victim = format!("pso{index}v{id}");
        let attacker = format!("pso{index}a{id}");
        let net = Self {
            victim: victim.clone(),
            attacker: attacker.clone(),
            victim_addr: format!("10.232.{index}.1"),
            attacker_addr: format!("10.232.{index}.2"),
            host_addr: format!("10.233.{index}.1"),
            attacker_dev: format!("po{index}{id}b"),
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("portsentry-podnet-")
                .tempdir()?,
        };
        let _ = run(&["ip", "netns", "del", &victim]);
        let _ = run(&["ip", "netns", "del", &attacker]);
        must(&["ip", "netns", "add", &victim])?;
        must(&["ip", "netns", "add", &attacker])?;
        let (va, vb) = (format!("po{index}{id}a"), format!("po{index}{id}b"));
        let (ha, hb) = (format!("po{index}{id}h"), format!("po{index}{id}p"));
        must(&[
            "ip", "link", "add", &va, "netns", &victim, "type", "veth", "peer", "name", &vb,
            "netns", &attacker,
        ])?;
        must(&[
            "ip", "link", "add", &ha, "type", "veth", "peer", "name", &hb, "netns", &victim,
        ])?;
        for (ns, dev, address) in [
            (
                victim.as_str(),
                va.as_str(),
                format!("{}/24", net.victim_addr),
            ),
            (
                attacker.as_str(),
                vb.as_str(),
                format!("{}/24", net.attacker_addr),
            ),
            (victim.as_str(), hb.as_str(), format!("10.233.{index}.2/30")),
        ] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            must(&["ip", "-n", ns, "addr", "add", &address, "dev", dev])?;
            must(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        must(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", net.host_addr),
            "dev",
            &ha,
        ])?;
        must(&["ip", "link", "set", &ha, "up"])?;
        Ok(net)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the built sensor in the victim namespace with `config` and `args`; waits until
    /// it is active. Its stderr goes to `sensor.log`.
    pub async fn start_sensor(&mut self, config: &str, args: &[String]) -> Result<()> {
        let sensor = workspace_binary("portsentry-sensor", "portsentry-sensor")?;
        let conf = self.path("sensor.conf");
        fs::write(&conf, config)?;
        let log = fs::File::create(self.path("sensor.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.victim])
            .arg(&sensor)
            .arg("--config")
            .arg(&conf)
            .args(args)
            .env("RUST_LOG", "warn,portsentry_sensor::report=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.children.push(child);
        let active = wait_until(Duration::from_secs(20), "the sensor to be active", || {
            let log = self.sensor_log();
            async move { log.contains("PortSentry is now active and listening") }
        })
        .await;
        active.with_context(|| format!("sensor log:\n{}", self.sensor_log()))
    }

    pub fn sensor_log(&self) -> String {
        fs::read_to_string(self.path("sensor.log")).unwrap_or_default()
    }

    /// Runs `args` in the attacker namespace.
    pub fn attacker(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "netns", "exec", &self.attacker];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Gives the attacker one more address of its link (10.232.index.0/24), to scan from.
    pub fn add_attacker_address(&self, address: &str) -> Result<()> {
        let cidr = format!("{address}/24");
        must(&[
            "ip",
            "-n",
            &self.attacker,
            "addr",
            "add",
            &cidr,
            "dev",
            &self.attacker_dev,
        ])
    }

    /// A real `nmap -sT` connect scan of `ports` on the victim from the attacker.
    pub fn nmap_connect_scan(&self, ports: &str) -> Result<Output> {
        self.nmap_connect_scan_from(&self.attacker_addr, ports)
    }

    /// `nmap -sT` from one of the attacker's addresses (`-S`, bound before connecting).
    pub fn nmap_connect_scan_from(&self, source: &str, ports: &str) -> Result<Output> {
        let output = self.attacker(&[
            "nmap",
            "-sT",
            "-Pn",
            "-n",
            "--max-retries",
            "0",
            "-S",
            source,
            "-e",
            &self.attacker_dev,
            "-p",
            ports,
            &self.victim_addr,
        ])?;
        if !output.status.success() {
            bail!("nmap failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(output)
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting a namespace deletes its veth ends, and with them their peers on the host.
        let _ = run(&["ip", "netns", "del", &self.victim]);
        let _ = run(&["ip", "netns", "del", &self.attacker]);
    }
}
