//! A real, disposable control plane: etcd + kube-apiserver (+ kube-controller-manager) on
//! free loopback ports in a temp dir, torn down on drop or, failing that, by a watchdog.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::OnceCell,
};

use crate::{
    binaries::Binaries,
    certs::{Ca, CertAndKey, SigningKey},
    process::{Component, Watchdog, kill_group, log_tail},
    wait::free_port,
};

/// The issuer and default audience of ServiceAccount tokens minted by the test API server.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience sensors use when they report to the operator.
pub const PORTSENTRY_AUDIENCE: &str = portsentry_operator::labels::TOKEN_AUDIENCE;
/// The field manager the harness applies with.
pub const FIELD_MANAGER: &str = "portsentry-tests";

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Also run kube-controller-manager (garbage collection, DaemonSets, ServiceAccounts...).
    pub controllers: bool,
    /// How long each component may take to become ready.
    pub start_timeout: Duration,
    /// Extra `--flag=value` arguments for kube-apiserver.
    pub extra_apiserver_args: Vec<String>,
    /// Where the pinned binaries are, instead of `PORTSENTRY_CONTROL_PLANE_BIN` or the cache.
    pub bin_dir: Option<PathBuf>,
    /// `--api-audiences`: the audiences the API server accepts as credentials for itself.
    pub api_audiences: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            controllers: false,
            start_timeout: Duration::from_secs(120),
            extra_apiserver_args: Vec::new(),
            bin_dir: None,
            api_audiences: vec![SERVICE_ACCOUNT_ISSUER.to_owned()],
        }
    }
}

impl Options {
    /// etcd, kube-apiserver and kube-controller-manager.
    pub fn with_controllers() -> Self {
        Self {
            controllers: true,
            ..Self::default()
        }
    }
}

/// A running control plane. Dropping it kills its processes and removes its temp dir; set
/// `PORTSENTRY_KEEP_TEMP=1` to keep the dir (certificates, kubeconfig, logs) for a look.
#[derive(Debug)]
pub struct ControlPlane {
    binaries: Binaries,
    server_url: String,
    ca: Ca,
    admin_config: Config,
    kubeconfig: PathBuf,
    /// Behind a lock so that a shared (`&'static`) control plane can restart a component.
    components: Mutex<Vec<Component>>,
    pgid: u32,
    watchdog: Option<Watchdog>,
    // Declared last: removed after the processes are gone.
    etcd_data: TempDir,
    dir: TempDir,
}

/// Starts one control plane per test binary on first use and hands out the same one after.
/// Keep the cell in a `static` of the suite: `static CP: OnceCell<ControlPlane> = OnceCell::const_new();`.
pub async fn shared(
    cell: &'static OnceCell<ControlPlane>,
    options: Options,
) -> Result<&'static ControlPlane> {
    cell.get_or_try_init(|| ControlPlane::start(options)).await
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver (and kube-controller-manager when asked), each ready
    /// before this returns. Errors name the component and carry the tail of its log.
    /// A free port taken by someone else before a component bound it is retried twice.
    pub async fn start(options: Options) -> Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(&options).await {
                Err(err)
                    if attempt < 3 && format!("{err:#}").contains("address already in use") =>
                {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(options: &Options) -> Result<Self> {
        let binaries = match &options.bin_dir {
            Some(dir) => Binaries::in_dir(dir.clone())?,
            None => Binaries::locate()?,
        };
        let apiserver_bin = binaries.require("kube-apiserver")?;
        let kcm_bin = if options.controllers {
            Some(binaries.require("kube-controller-manager")?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("portsentry-control-plane-")
            .tempdir()
            .context("creating the control plane's temp dir (is TMPDIR writable?)")?;
        // etcd fsyncs on every write and 3.4 has no --unsafe-no-fsync: keep its data in RAM.
        let shm = Path::new("/dev/shm");
        let etcd_data = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("portsentry-etcd-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new()
                .prefix("portsentry-etcd-")
                .tempdir()
        }
        .context("creating etcd's data dir")?;
        let root = dir.path().to_path_buf();

        // --- PKI ---
        let ca = Ca::new()?;
        std::fs::write(root.join("ca.crt"), &ca.cert_pem)?;
        std::fs::write(root.join("ca.key"), &ca.key_pem)?;
        ca.serving(&["127.0.0.1", "localhost"])?
            .write(&root, "apiserver")?;
        ca.serving(&["127.0.0.1", "localhost"])?
            .write(&root, "controller-manager")?;
        ca.client("portsentry-tests-admin", &["system:masters"])?
            .write(&root, "admin")?;
        let sa_key = SigningKey::new()?;
        std::fs::write(root.join("sa.key"), &sa_key.private_pem)?;
        std::fs::write(root.join("sa.pub"), &sa_key.public_pem)?;

        // --- etcd ---
        let (etcd_port, peer_port) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Component::spawn(
            "etcd",
            &binaries.etcd,
            &[
                "--name=portsentry-tests".to_owned(),
                format!("--data-dir={}", etcd_data.path().display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=portsentry-tests={peer_url}"),
                "--initial-cluster-state=new".to_owned(),
                "--logger=zap".to_owned(),
                "--log-outputs=stderr".to_owned(),
            ],
            root.join("etcd.log"),
            None,
        )?;
        let pgid = etcd.id();
        let mut remove = vec![etcd_data.path()];
        if !keep_temp() {
            remove.push(dir.path());
        }
        let watchdog = Watchdog::spawn(pgid, &remove)?;

        let mut plane = Self {
            binaries,
            server_url: String::new(),
            ca,
            admin_config: Config::new("https://127.0.0.1".parse()?),
            kubeconfig: root.join("admin.kubeconfig"),
            components: Mutex::new(vec![etcd]),
            pgid,
            watchdog: Some(watchdog),
            etcd_data,
            dir,
        };
        let deadline = Instant::now() + options.start_timeout;
        plane
            .wait_ready(0, deadline, || etcd_healthy(etcd_port))
            .await?;

        // --- kube-apiserver ---
        let port = free_port()?;
        plane.server_url = format!("https://127.0.0.1:{port}");
        let path = |name: &str| root.join(name).display().to_string();
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--secure-port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            // The `kubernetes` Service would point at 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--cert-dir={}", path("apiserver-certs")),
            format!("--tls-cert-file={}", path("apiserver.crt")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--client-ca-file={}", path("ca.crt")),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            format!("--api-audiences={}", options.api_audiences.join(",")),
            "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
        ];
        args.extend(options.extra_apiserver_args.iter().cloned());
        plane.add_component("kube-apiserver", &apiserver_bin, &args)?;
        plane.write_admin_kubeconfig()?;
        plane.admin_config = config_from_kubeconfig_file(&plane.kubeconfig).await?;
        let config = plane.admin_config.clone();
        plane
            .wait_ready(1, deadline, || get_ok(config.clone(), "/readyz"))
            .await?;

        // --- kube-controller-manager ---
        if let Some(kcm_bin) = kcm_bin {
            let kcm_port = free_port()?;
            let kubeconfig = plane.kubeconfig.display().to_string();
            let args = vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--controllers=*".to_owned(),
                "--use-service-account-credentials=false".to_owned(),
                "--leader-elect=false".to_owned(),
                format!("--service-account-private-key-file={}", path("sa.key")),
                format!("--root-ca-file={}", path("ca.crt")),
                format!("--cluster-signing-cert-file={}", path("ca.crt")),
                format!("--cluster-signing-key-file={}", path("ca.key")),
                format!("--secure-port={kcm_port}"),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--tls-cert-file={}", path("controller-manager.crt")),
                format!("--tls-private-key-file={}", path("controller-manager.key")),
                "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
                "--profiling=false".to_owned(),
            ];
            plane.add_component("kube-controller-manager", &kcm_bin, &args)?;
            let mut kcm_config = plane.admin_config.clone();
            kcm_config.cluster_url = format!("https://127.0.0.1:{kcm_port}").parse()?;
            plane
                .wait_ready(2, deadline, || get_ok(kcm_config.clone(), "/healthz"))
                .await?;
            // The ServiceAccount controller makes `default` in every namespace: proof the
            // controllers are running, and what Pods need before they can be created.
            let admin = plane.admin_config.clone();
            plane
                .wait_ready(2, deadline, || {
                    default_service_account_exists(admin.clone())
                })
                .await?;
        }
        install_panic_hook(&plane);
        Ok(plane)
    }

    fn components(&self) -> MutexGuard<'_, Vec<Component>> {
        self.components
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Kills kube-apiserver, waits `downtime`, starts it again with the same flags (same
    /// port, same etcd: nothing is lost) and waits for `/readyz`. For tests of clients that
    /// must survive an API server restart (watches resuming).
    pub async fn restart_apiserver(&self, downtime: Duration) -> Result<()> {
        let index = self.component_index("kube-apiserver")?;
        self.components()[index].stop();
        tokio::time::sleep(downtime).await;
        self.components()[index].restart()?;
        let config = self.admin_config.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        self.wait_ready(index, deadline, || get_ok(config.clone(), "/readyz"))
            .await
    }

    fn component_index(&self, name: &str) -> Result<usize> {
        self.components()
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| anyhow!("this control plane runs no {name}"))
    }

    fn add_component(&mut self, name: &str, program: &Path, args: &[String]) -> Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let component = Component::spawn(name, program, args, log, Some(self.pgid))?;
        self.components().push(component);
        Ok(())
    }

    /// Polls `probe` until it returns `Ok(true)`; fails when the component exits or at the
    /// deadline, with the last lines of its log.
    async fn wait_ready<F, Fut>(&self, index: usize, deadline: Instant, probe: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<bool>>,
    {
        loop {
            self.components()[index].ensure_running()?;
            let last = match probe().await {
                Ok(true) => return Ok(()),
                Ok(false) => "not ready yet".to_owned(),
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                let components = self.components();
                let component = &components[index];
                bail!(
                    "{} did not become ready in time (last probe: {last}); last lines of {}:\n{}",
                    component.name,
                    component.log.display(),
                    component.tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn write_admin_kubeconfig(&self) -> Result<()> {
        let root = self.dir.path();
        let text = kubeconfig_yaml(
            &self.server_url,
            &root.join("ca.crt"),
            serde_json::json!({
                "client-certificate": root.join("admin.crt"),
                "client-key": root.join("admin.key"),
            }),
        )?;
        std::fs::write(&self.kubeconfig, text)
            .with_context(|| format!("writing {}", self.kubeconfig.display()))
    }

    /// A new client for the admin (`O=system:masters`). Each call makes its own client, so
    /// every test's tokio runtime gets one bound to it.
    pub fn client(&self) -> Result<Client> {
        Client::try_from(self.admin_config.clone()).context("building the admin client")
    }

    /// The admin's client configuration.
    pub fn admin_config(&self) -> &Config {
        &self.admin_config
    }

    /// `https://127.0.0.1:PORT` of the API server.
    pub fn server_url(&self) -> &str {
        &self.server_url
    }

    /// The admin kubeconfig file (for kubectl and helm).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA that signed the API server's certificate (and trusts client certificates).
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// A serving certificate signed by the cluster CA, e.g. for an admission webhook at
    /// `https://127.0.0.1:PORT` whose `caBundle` is [`Self::ca_pem`].
    pub fn issue_serving_cert(&self, names: &[&str]) -> Result<CertAndKey> {
        self.ca.serving(names)
    }

    /// A client authenticated by a client certificate as `user` in `groups` (RBAC applies).
    pub async fn client_for_user(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let cert = self.ca.client(user, groups)?;
        let stem = format!("user-{}", sanitize(user));
        cert.write(self.dir.path(), &stem)?;
        let root = self.dir.path();
        let text = kubeconfig_yaml(
            &self.server_url,
            &root.join("ca.crt"),
            serde_json::json!({
                "client-certificate": root.join(format!("{stem}.crt")),
                "client-key": root.join(format!("{stem}.key")),
            }),
        )?;
        client_from_kubeconfig_yaml(&text).await
    }

    /// The temp dir holding certificates, kubeconfig and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Log file of a component (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.path().join(format!("{component}.log"))
    }

    /// The last lines of every component's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components()
            .iter()
            .map(|c| {
                format!(
                    "--- last lines of {} ---\n{}\n",
                    c.log.display(),
                    c.tail(lines)
                )
            })
            .collect()
    }

    /// Process ids of the running components (etcd first).
    pub fn process_ids(&self) -> Vec<u32> {
        self.components().iter().map(Component::id).collect()
    }

    /// etcd's data dir (kept in /dev/shm when there is one).
    pub fn etcd_data_dir(&self) -> &Path {
        self.etcd_data.path()
    }

    /// The pinned binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// `kubectl --kubeconfig <admin>`, ready for more arguments.
    pub fn kubectl(&self) -> Result<Command> {
        let mut command = Command::new(self.binaries.require("kubectl")?);
        command.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        Ok(command)
    }

    /// `helm` with the admin kubeconfig and its caches and config kept in the temp dir.
    pub fn helm(&self) -> Result<Command> {
        let mut command = Command::new(self.binaries.require("helm")?);
        let home = self.dir.path().join("helm");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        Ok(command)
    }

    /// Creates (or keeps) a namespace. Without controllers no `default` ServiceAccount
    /// appears by itself, so it is created here too: Pods need it to be admitted.
    pub async fn ensure_namespace(&self, name: &str) -> Result<()> {
        let client = self.client()?;
        let params = PatchParams::apply(FIELD_MANAGER);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        });
        namespaces
            .patch(name, &params, &Patch::Apply(body))
            .await
            .with_context(|| format!("applying namespace {name}"))?;
        self.ensure_service_account(name, "default").await
    }

    /// Creates (or keeps) a ServiceAccount.
    pub async fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client()?, namespace);
        let body = serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace}
        });
        accounts
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(body),
            )
            .await
            .with_context(|| format!("applying serviceaccount {namespace}/{name}"))?;
        Ok(())
    }

    /// A token for ServiceAccount `namespace/name` with `audience`, minted by TokenRequest.
    pub async fn token_for(&self, namespace: &str, name: &str, audience: &str) -> Result<String> {
        self.request_token(namespace, name, vec![audience.to_owned()])
            .await
    }

    /// A token for ServiceAccount `namespace/service_account` with `audience`, bound to the
    /// existing Pod `namespace/pod` (TokenReview then names the pod, as for a projected token).
    pub async fn token_for_pod(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        audience: &str,
    ) -> Result<String> {
        let pods: Api<Pod> = Api::namespaced(self.client()?, namespace);
        let uid = pods
            .get(pod)
            .await
            .with_context(|| format!("reading pod {namespace}/{pod} (a bound token needs it)"))?
            .metadata
            .uid
            .ok_or_else(|| anyhow!("pod {namespace}/{pod} has no uid"))?;
        let bound = BoundObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.to_owned()),
            uid: Some(uid),
        };
        self.request_token_bound(
            namespace,
            service_account,
            vec![audience.to_owned()],
            Some(bound),
        )
        .await
    }

    async fn request_token(
        &self,
        namespace: &str,
        name: &str,
        audiences: Vec<String>,
    ) -> Result<String> {
        self.request_token_bound(namespace, name, audiences, None)
            .await
    }

    async fn request_token_bound(
        &self,
        namespace: &str,
        name: &str,
        audiences: Vec<String>,
        bound_object_ref: Option<BoundObjectReference>,
    ) -> Result<String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client()?, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences,
                expiration_seconds: Some(3600),
                bound_object_ref,
            },
            ..TokenRequest::default()
        };
        let response = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!(
                    "TokenRequest for serviceaccount {namespace}/{name} (does it exist? \
                     ensure_service_account creates it)"
                )
            })?;
        response
            .status
            .map(|status| status.token)
            .ok_or_else(|| anyhow!("TokenRequest for {namespace}/{name} returned no token"))
    }

    /// A client that authenticates as ServiceAccount `namespace/name` with a bearer token
    /// for the API server's own audience (RBAC applies to it).
    pub async fn client_for_service_account(&self, namespace: &str, name: &str) -> Result<Client> {
        let token = self.request_token(namespace, name, Vec::new()).await?;
        self.client_with_token(&token).await
    }

    /// A client that presents `token` as its bearer token.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let text = kubeconfig_yaml(
            &self.server_url,
            &self.dir.path().join("ca.crt"),
            serde_json::json!({ "token": token }),
        )?;
        client_from_kubeconfig_yaml(&text).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(20));
        }
        kill_group(self.pgid);
        let components = self
            .components
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for component in components.iter_mut().rev() {
            component.stop();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.fire();
        }
        if keep_temp() {
            self.dir.disable_cleanup(true);
            eprintln!("control plane files kept in {}", self.dir.path().display());
        }
    }
}

/// Prints the tail of every component's log when a test panics: a shared control plane
/// lives in a `static` and is never dropped, so `Drop` cannot do it.
fn install_panic_hook(plane: &ControlPlane) {
    let logs: Arc<Vec<PathBuf>> =
        Arc::new(plane.components().iter().map(|c| c.log.clone()).collect());
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        for log in logs.iter() {
            if log.exists() {
                eprintln!(
                    "--- last lines of {} ---\n{}",
                    log.display(),
                    log_tail(log, 20)
                );
            }
        }
    }));
}

fn keep_temp() -> bool {
    env::var_os("PORTSENTRY_KEEP_TEMP").is_some_and(|v| !v.is_empty() && v != "0")
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: serde_json::Value) -> Result<String> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "portsentry-tests", "cluster": {
            "server": server, "certificate-authority": ca
        }}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "portsentry-tests", "context": {
            "cluster": "portsentry-tests", "user": "user", "namespace": "default"
        }}],
        "current-context": "portsentry-tests",
    });
    serde_yaml::to_string(&config).context("writing a kubeconfig")
}

async fn config_from_kubeconfig_file(path: &Path) -> Result<Config> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading the kubeconfig {}", path.display()))
}

async fn client_from_kubeconfig_yaml(text: &str) -> Result<Client> {
    let kubeconfig = Kubeconfig::from_yaml(text).context("parsing a generated kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading a generated kubeconfig")?;
    Client::try_from(config).context("building a client")
}

/// GET `path` on an HTTPS endpoint with the admin's credentials; true on `ok`.
async fn get_ok(config: Config, path: &str) -> Result<bool> {
    let client = Client::try_from(config)?;
    let request = http::Request::get(path).body(Vec::new())?;
    let body = client.request_text(request).await?;
    Ok(body.trim() == "ok")
}

/// etcd's `/health` over plain HTTP on loopback (no HTTP client needed for one request).
async fn etcd_healthy(port: u16) -> Result<bool> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response.contains("\"health\":\"true\""))
}

async fn default_service_account_exists(config: Config) -> Result<bool> {
    let accounts: Api<ServiceAccount> = Api::namespaced(Client::try_from(config)?, "default");
    Ok(accounts.get_opt("default").await?.is_some())
}
