//! The report intake's serving certificate, and the CA bundle in-cluster sensors verify it
//! with (rendered into every sensor ConfigMap as `ca.crt`).
//!
//! ```text
//!  --report-cert-file/--report-key-file given ──▶ serve them, re-read every minute (a renewed
//!  (cert-manager's Secret mounted)                 certificate is served without a restart);
//!                                                  sensors get --report-ca-file (its `ca.crt`),
//!                                                  re-read every minute too: a new CA reaches
//!                                                  every sensor ConfigMap
//!
//!  otherwise ──▶ CA in Secret --report-ca-secret ──▶ certificate for the intake Service:
//!               (the first replica creates it,      <svc>, <svc>.<ns>, <svc>.<ns>.svc,
//!                the others read it)                <svc>.<ns>.svc.cluster.local, extra SANs
//! ```
//!
//! The certificate code is the operator's ([`crate::tls`]), shared with the webhook; only the
//! names and the choice of source live here.

use std::{path::PathBuf, sync::Arc, time::Duration};

use kube::Client;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tracing::{info, warn};

use crate::{
    Error, Result, labels,
    tls::{self, CaBundle, fixed_ca_bundle},
};

/// Where the intake's certificate comes from, as flags or environment variables.
/// Flatten into the operator's arguments with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct IntakeTlsArgs {
    /// PEM serving certificate of the intake (e.g. cert-manager's `tls.crt`); without it the
    /// operator issues one from its own CA.
    #[arg(long, requires = "report_key_file")]
    pub report_cert_file: Option<PathBuf>,
    /// PEM private key of `--report-cert-file`.
    #[arg(long, requires = "report_cert_file")]
    pub report_key_file: Option<PathBuf>,
    /// PEM CA bundle that signed `--report-cert-file` (cert-manager's `ca.crt`): handed to
    /// sensors in their ConfigMaps. Without it, given files, sensors cannot verify the intake.
    #[arg(long, requires = "report_cert_file")]
    pub report_ca_file: Option<PathBuf>,
    /// How often `--report-cert-file`, `--report-key-file` and `--report-ca-file` are re-read,
    /// in seconds (a rotated Secret reaches its mounted files within the kubelet's sync period,
    /// about a minute, so re-reading much faster gains little).
    #[arg(
        long,
        env = "PORTSENTRY_REPORT_TLS_RELOAD_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub report_tls_reload_secs: u64,
    /// Name of the Service in front of the intake, in the operator's namespace: its DNS names
    /// go into the self-issued certificate.
    #[arg(
        long,
        env = "PORTSENTRY_REPORT_SERVICE",
        default_value = labels::MANAGER
    )]
    pub report_service: String,
    /// More names (DNS names or IP addresses) for the self-issued certificate (repeatable).
    #[arg(
        long = "report-dns-name",
        env = "PORTSENTRY_REPORT_DNS_NAMES",
        value_delimiter = ','
    )]
    pub report_dns_names: Vec<String>,
    /// Secret (in the operator's namespace) holding the intake CA shared by the replicas.
    #[arg(
        long,
        env = "PORTSENTRY_REPORT_CA_SECRET",
        default_value = "portsentry-intake-ca"
    )]
    pub report_ca_secret: String,
}

/// The intake's TLS configuration (the latest: certificate files are reloaded) and the PEM
/// bundle sensors trust it with.
#[derive(Clone, Debug)]
pub struct IntakeTls {
    pub config: watch::Receiver<Arc<rustls::ServerConfig>>,
    pub ca_pem: CaBundle,
}

/// A bundle of one or more PEM certificates, or why not: what a CA file must hold.
fn ca_bundle(path: &PathBuf) -> Result<String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate {
            what: path.display().to_string(),
            detail: format!("not a PEM certificate bundle: {e}"),
        })?;
    if certificates.is_empty() {
        return Err(Error::Certificate {
            what: path.display().to_string(),
            detail: "no PEM certificate in it (--report-ca-file wants the CA's ca.crt)".into(),
        });
    }
    Ok(pem)
}

/// The CA bundle in `path` now, then re-read every `every` by a task (ending when every
/// receiver is gone): a changed bundle that parses is published; one that does not (a
/// half-written rotation) is logged and the previous one kept.
pub fn follow_ca_file(path: PathBuf, every: Duration) -> Result<CaBundle> {
    let (sender, receiver) = watch::channel(Some(ca_bundle(&path)?));
    // Detached on purpose: it ends when every receiver is gone, and a bundle that fails to
    // parse only keeps the previous one; it cannot fail otherwise.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = sender.closed() => return,
            }
            match ca_bundle(&path) {
                Ok(pem) => {
                    sender.send_if_modified(|current| {
                        let changed = current.as_deref() != Some(pem.as_str());
                        if changed {
                            info!(file = %path.display(), "intake CA bundle reloaded; sensor ConfigMaps follow");
                            *current = Some(pem);
                        }
                        changed
                    });
                }
                Err(error) => {
                    warn!(%error, "intake CA bundle not reloaded; sensors keep the previous one")
                }
            }
        }
    });
    Ok(receiver)
}

/// The cluster DNS suffix the Service's fully qualified name ends with.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The names of the self-issued certificate: the Service's in-cluster DNS names, then `extra`
/// (blank and repeated names left out; the first name is the certificate's common name).
pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        format!("{service}.{namespace}"),
        service.to_owned(),
    ];
    for name in extra.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    }
    names
}

fn read(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })
}

/// The intake's certificate from `--report-cert-file` (re-read every
/// `--report-tls-reload-secs`, with [`tls::CertFiles`]), or issued by the shared CA in Secret
/// `namespace/--report-ca-secret` (created when missing) for the Service's names.
pub async fn load(client: &Client, args: &IntakeTlsArgs, namespace: &str) -> Result<IntakeTls> {
    if let (Some(cert), Some(key)) = (&args.report_cert_file, &args.report_key_file) {
        let files = tls::CertFiles {
            what: "report intake",
            cert: cert.clone(),
            key: key.clone(),
        };
        let every = Duration::from_secs(args.report_tls_reload_secs);
        let config = files.watch(every)?;
        let ca_pem = match &args.report_ca_file {
            Some(path) => follow_ca_file(path.clone(), every)?,
            None => {
                warn!(
                    "the intake serves --report-cert-file without --report-ca-file: sensor ConfigMaps get no ca.crt and injected sensors cannot verify the intake"
                );
                fixed_ca_bundle(None)
            }
        };
        return Ok(IntakeTls { config, ca_pem });
    }
    let ca = tls::shared_ca(client.clone(), namespace, &args.report_ca_secret).await?;
    let names = service_names(&args.report_service, namespace, &args.report_dns_names);
    let cert = ca.serving(&names)?;
    info!(
        secret = %args.report_ca_secret,
        names = ?names,
        "report intake serves a certificate of the operator's intake CA"
    );
    // Nothing rotates a self-issued certificate: the sender may go.
    let (_, config) = watch::channel(tls::tls_config(&cert.cert_pem, &cert.key_pem)?);
    Ok(IntakeTls {
        config,
        ca_pem: fixed_ca_bundle(Some(cert.ca_pem)),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use clap::Parser;
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tls: IntakeTlsArgs,
    }

    #[test]
    fn the_certificate_names_the_services_in_cluster_dns_names_then_the_extra_ones() {
        let names = service_names(
            "ps-portsentry-operator",
            "portsentry-system",
            &[
                "10.0.0.7".into(),
                " ".into(),
                "ps-portsentry-operator".into(),
            ],
        );
        assert_eq!(
            names,
            [
                "ps-portsentry-operator.portsentry-system.svc",
                "ps-portsentry-operator.portsentry-system.svc.cluster.local",
                "ps-portsentry-operator.portsentry-system",
                "ps-portsentry-operator",
                "10.0.0.7",
            ]
        );
    }

    #[test]
    fn a_ca_file_needs_the_certificate_it_signed() {
        assert!(Cli::try_parse_from(["operator", "--report-ca-file=/ca.crt"]).is_err());
        let cli = Cli::try_parse_from([
            "operator",
            "--report-cert-file=/tls.crt",
            "--report-key-file=/tls.key",
            "--report-ca-file=/ca.crt",
        ])
        .unwrap();
        assert_eq!(cli.tls.report_ca_secret, "portsentry-intake-ca");
    }

    /// A TLS handshake between a client trusting `ca_pem` for `name` and a server with
    /// `server`; whether it completed.
    fn handshake(server: Arc<rustls::ServerConfig>, ca_pem: &str, name: &str) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        // Shuttle records in memory until both sides are done or one fails.
        for _ in 0..10 {
            let mut buffer = Vec::new();
            client.write_tls(&mut buffer).unwrap();
            if server.read_tls(&mut buffer.as_slice()).is_ok()
                && server.process_new_packets().is_err()
            {
                return false;
            }
            let mut buffer = Vec::new();
            server.write_tls(&mut buffer).unwrap();
            if client.read_tls(&mut buffer.as_slice()).is_ok()
                && client.process_new_packets().is_err()
            {
                return false;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return true;
            }
        }
        false
    }

    #[test]
    fn a_client_trusting_the_ca_accepts_the_intake_certificate_by_its_service_name() {
        let ca = tls::Ca::generate().unwrap();
        let names = service_names("portsentry-operator", "portsentry-system", &[]);
        let cert = ca.serving(&names).unwrap();
        let server = tls::tls_config(&cert.cert_pem, &cert.key_pem).unwrap();
        assert!(handshake(
            server.clone(),
            &ca.cert_pem,
            "portsentry-operator.portsentry-system.svc"
        ));
        assert!(handshake(
            server,
            &ca.cert_pem,
            "portsentry-operator.portsentry-system.svc.cluster.local"
        ));
    }

    #[test]
    fn a_client_trusting_another_ca_or_asking_another_name_refuses_it() {
        let ca = tls::Ca::generate().unwrap();
        let names = service_names("portsentry-operator", "portsentry-system", &[]);
        let cert = ca.serving(&names).unwrap();
        let server = tls::tls_config(&cert.cert_pem, &cert.key_pem).unwrap();
        let other = tls::Ca::generate().unwrap();
        assert!(!handshake(
            server.clone(),
            &other.cert_pem,
            "portsentry-operator.portsentry-system.svc"
        ));
        assert!(!handshake(
            server,
            &ca.cert_pem,
            "elsewhere.portsentry-system.svc"
        ));
    }

    /// A folder of its own under the system's temporary directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn a_rewritten_certificate_file_is_served_without_a_restart() {
        let dir = TempDir::new("portsentry-intake-rotation");
        let names = service_names("portsentry-operator", "portsentry-system", &[]);
        let name = names[0].as_str();
        let (first_ca, second_ca) = (tls::Ca::generate().unwrap(), tls::Ca::generate().unwrap());
        let write = |ca: &tls::Ca| {
            let cert = ca.serving(&names).unwrap();
            std::fs::write(dir.0.join("tls.crt"), &cert.cert_pem).unwrap();
            std::fs::write(dir.0.join("tls.key"), &cert.key_pem).unwrap();
        };
        write(&first_ca);
        let mut served = tls::CertFiles::in_dir("report intake", &dir.0)
            .watch(Duration::from_millis(20))
            .unwrap();
        assert!(handshake(served.borrow().clone(), &first_ca.cert_pem, name));

        write(&second_ca);
        served.changed().await.unwrap();
        let now = served.borrow().clone();
        assert!(handshake(now.clone(), &second_ca.cert_pem, name));
        assert!(!handshake(now, &first_ca.cert_pem, name));
    }

    #[tokio::test]
    async fn a_rewritten_ca_file_is_published_to_the_sensor_config_maps() {
        let dir = TempDir::new("portsentry-intake-ca-rotation");
        let path = dir.0.join("ca.crt");
        let (first, second) = (tls::Ca::generate().unwrap(), tls::Ca::generate().unwrap());
        std::fs::write(&path, &first.cert_pem).unwrap();
        let mut bundle = follow_ca_file(path.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(bundle.borrow().as_deref(), Some(first.cert_pem.as_str()));

        std::fs::write(&path, &second.cert_pem).unwrap();
        bundle.changed().await.unwrap();
        assert_eq!(bundle.borrow().as_deref(), Some(second.cert_pem.as_str()));
    }

    #[tokio::test]
    async fn a_half_written_ca_file_keeps_the_previous_bundle() {
        let dir = TempDir::new("portsentry-intake-ca-half");
        let path = dir.0.join("ca.crt");
        let ca = tls::Ca::generate().unwrap();
        std::fs::write(&path, &ca.cert_pem).unwrap();
        let mut bundle = follow_ca_file(path.clone(), Duration::from_millis(20)).unwrap();

        std::fs::write(&path, &ca.cert_pem[..ca.cert_pem.len() / 2]).unwrap();
        let changed = tokio::time::timeout(Duration::from_millis(300), bundle.changed()).await;
        assert!(changed.is_err(), "a broken bundle was published");
        assert_eq!(bundle.borrow().as_deref(), Some(ca.cert_pem.as_str()));
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_at_start_naming_the_file() {
        let dir = TempDir::new("portsentry-intake-ca-empty");
        let path = dir.0.join("ca.crt");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = ca_bundle(&path).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}
