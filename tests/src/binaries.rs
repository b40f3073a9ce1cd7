//! Where the pinned control-plane binaries are: `PORTSENTRY_CONTROL_PLANE_BIN` (set by
//! tests/run), else the cache folder tests/build-control-plane fills; etcd from Debian.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// What to do when a binary is missing; every such error ends with it.
pub const BUILD_HINT: &str = "run tests/run (or tests/build-control-plane, then set \
PORTSENTRY_CONTROL_PLANE_BIN to the folder it prints on its last line)";

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Paths of the real programs the harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The folder of kube-apiserver, kube-controller-manager, kubectl and helm.
    pub bin_dir: PathBuf,
    pub etcd: PathBuf,
}

impl Binaries {
    /// Finds the binaries; fails naming what is missing and how to get it.
    pub fn locate() -> Result<Self> {
        let bin_dir = match env::var_os("PORTSENTRY_CONTROL_PLANE_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => default_bin_dir()?,
        };
        Self::in_dir(bin_dir)
    }

    /// Like [`Self::locate`], with the pinned binaries taken from `bin_dir`.
    pub fn in_dir(bin_dir: PathBuf) -> Result<Self> {
        let etcd = env::var_os("PORTSENTRY_ETCD")
            .map(PathBuf::from)
            .or_else(|| find_on_path("etcd"))
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        if !etcd.is_file() {
            bail!(
                "etcd is missing (looked for {} and on PATH): install Debian's etcd-server \
                 (apt-get install etcd-server); {BUILD_HINT}",
                etcd.display()
            );
        }
        let found = Self { bin_dir, etcd };
        found.require("kube-apiserver")?;
        Ok(found)
    }

    /// The path of a binary of the pinned set (`kube-apiserver`, `kubectl`, `helm`, ...),
    /// or an error naming it and saying how to build it.
    pub fn require(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            bail!(
                "{name} is missing: {} does not exist; {BUILD_HINT}",
                path.display()
            )
        }
    }
}

/// The cache folder tests/build-control-plane writes, from tests/versions.env.
fn default_bin_dir() -> Result<PathBuf> {
    let versions = Versions::read()?;
    Ok(cache_root()?.join(format!(
        "control-plane-{}-helm-{}/bin",
        versions.get("KUBERNETES_VERSION")?,
        versions.get("HELM_VERSION")?
    )))
}

/// The versions pinned in tests/versions.env (the build scripts read the same file).
pub(crate) struct Versions {
    path: PathBuf,
    text: String,
}

impl Versions {
    pub(crate) fn read() -> Result<Self> {
        let path = repo_root().join("tests/versions.env");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self { path, text })
    }

    /// The value of `key` (`KEY=value` lines).
    pub(crate) fn get(&self, key: &str) -> Result<&str> {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .map(str::trim)
            .with_context(|| format!("{key} is not set in {}", self.path.display()))
    }
}

/// Where the build scripts cache what they build: `$PORTSENTRY_CACHE`, else
/// `$XDG_CACHE_HOME/portsentry-k8s`, else `~/.cache/portsentry-k8s`.
pub(crate) fn cache_root() -> Result<PathBuf> {
    Ok(
        match (
            env::var_os("PORTSENTRY_CACHE"),
            env::var_os("XDG_CACHE_HOME"),
        ) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, Some(dir)) => PathBuf::from(dir).join("portsentry-k8s"),
            (None, None) => PathBuf::from(env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/portsentry-k8s"),
        },
    )
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// A binary of this workspace (`portsentry-operator`, `portsentry-sensor`): from
/// `$CARGO_TARGET_DIR` (else `<repo>/target`), debug then release; built with
/// `cargo build -p <package> --bins` when missing from both.
pub fn workspace_binary(name: &str, package: &str) -> Result<PathBuf> {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let find = || {
        ["debug", "release"]
            .iter()
            .map(|profile| target.join(profile).join(name))
            .find(|path| path.is_file())
    };
    if let Some(path) = find() {
        return Ok(path);
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "-p", package, "--bins"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo_root())
        .status()
        .with_context(|| format!("running cargo build -p {package} --bins"))?;
    if !status.success() {
        bail!("cargo build -p {package} --bins failed ({status})");
    }
    find().with_context(|| {
        format!(
            "{name} is missing from {} after building {package}",
            target.display()
        )
    })
}
