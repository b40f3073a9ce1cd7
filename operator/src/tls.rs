//! The operator's TLS: its CA (shared by the replicas through a Secret), serving certificates
//! it signs, certificate files reloaded on rotation, and CA bundles that follow a rotation.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tracing::{info, warn};

use crate::{Error, Result, labels};

/// A serving certificate and the CA that signed it, all PEM.
#[derive(Clone, Debug)]
pub struct ServingCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The webhook's CA: its certificate (the caBundle) and key, PEM. Shared by the replicas
/// through a Secret so that every replica's serving certificate is trusted by one caBundle.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

fn cert_error(what: &str, error: impl std::fmt::Display) -> Error {
    Error::Certificate {
        what: format!("webhook certificate: {what}"),
        detail: error.to_string(),
    }
}

/// Fixed CA parameters: a replica rebuilds the issuer from the shared key alone.
fn ca_params() -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error("CA parameters", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "portsentry-webhook-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Ca {
    /// A fresh CA.
    pub fn generate() -> Result<Self> {
        let key = KeyPair::generate().map_err(|e| cert_error("CA key", e))?;
        let cert = ca_params()?
            .self_signed(&key)
            .map_err(|e| cert_error("self-signing the CA", e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A serving certificate for `names` (DNS names or IPs), signed by this CA.
    pub fn serving(&self, names: &[String]) -> Result<ServingCert> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| cert_error("CA key", e))?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| cert_error("serving parameters", e))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names
                .first()
                .cloned()
                .unwrap_or_else(|| "portsentry-webhook".into()),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(|e| cert_error("serving key", e))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| cert_error("signing the serving certificate", e))?;
        Ok(ServingCert {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The Secret that shares this CA between replicas.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [(
                        labels::MANAGED_BY_LABEL.to_owned(),
                        labels::MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            string_data: Some(
                [
                    (CA_CERT_KEY.to_owned(), self.cert_pem.clone()),
                    (CA_KEY_KEY.to_owned(), self.key_pem.clone()),
                ]
                .into(),
            ),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }
    }

    /// Reads a CA back from its Secret.
    pub fn from_secret(secret: &Secret) -> Result<Self> {
        let field = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or_else(|| cert_error("CA Secret", format!("no `{key}`")))
        };
        Ok(Self {
            cert_pem: field(CA_CERT_KEY)?,
            key_pem: field(CA_KEY_KEY)?,
        })
    }
}

/// A fresh CA and a serving certificate signed by it for `names`, such as
/// `portsentry-operator.portsentry-system.svc` (tests, single replicas).
pub fn self_signed(names: &[String]) -> Result<ServingCert> {
    Ca::generate()?.serving(names)
}

/// The CA in Secret `namespace/name`, created by whichever replica comes first.
pub async fn shared_ca(client: Client, namespace: &str, name: &str) -> Result<Ca> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = secrets.get_opt(name).await? {
        return Ca::from_secret(&secret);
    }
    let ca = Ca::generate()?;
    match secrets
        .create(&PostParams::default(), &ca.to_secret(namespace, name))
        .await
    {
        Ok(_) => {
            info!(namespace, name, "shared CA created");
            Ok(ca)
        }
        // Another replica won the race: use its CA.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Ca::from_secret(&secrets.get(name).await?)
        }
        Err(error) => Err(error.into()),
    }
}

/// A rustls server config (HTTP/1.1 only) from PEM, e.g. a cert-manager Secret's
/// `tls.crt` and `tls.key` mounted as files.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| cert_error("reading the certificate PEM", e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| cert_error("reading the key PEM", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| cert_error("TLS versions", e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| cert_error("TLS certificate and key", e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A PEM certificate and key kept in files (a mounted Secret, which the kubelet rewrites when
/// cert-manager renews it): read at start, then re-read by [`CertFiles::watch`].
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// What serves it, for logs: `webhook`, `report intake`.
    pub what: &'static str,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl CertFiles {
    /// How often [`CertFiles::watch`] re-reads the files.
    pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

    /// `tls.crt` and `tls.key` of a folder (cert-manager's Secret mounted).
    pub fn in_dir(what: &'static str, dir: &std::path::Path) -> Self {
        Self {
            what,
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    /// The PEM texts of the certificate and the key.
    pub fn read(&self) -> Result<(String, String)> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map_err(|e| cert_error(&format!("reading {}", path.display()), e))
        };
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    /// The TLS config of the files now, and a receiver of every later one: a task (spawned
    /// here; it ends when every receiver is gone) re-reads the files every `every` and
    /// publishes a changed pair that loads. A pair that does not load (a half-written
    /// rotation) is logged and the previous certificate kept. Serve each connection with the
    /// receiver's latest config (`inject::webhook::serve` does) and a rotated certificate is served without
    /// a restart.
    pub fn watch(self, every: Duration) -> Result<watch::Receiver<Arc<rustls::ServerConfig>>> {
        let pair = self.read()?;
        let (sender, receiver) = watch::channel(tls_config(&pair.0, &pair.1)?);
        // Detached on purpose: it ends when every receiver (every server) is gone, and a pair
        // that fails to load only keeps the previous certificate; it cannot fail otherwise.
        tokio::spawn(self.reload(pair, sender, every));
        Ok(receiver)
    }

    async fn reload(
        self,
        mut current: (String, String),
        sender: watch::Sender<Arc<rustls::ServerConfig>>,
        every: Duration,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = sender.closed() => return,
            }
            match self
                .read()
                .and_then(|pair| tls_config(&pair.0, &pair.1).map(|c| (pair, c)))
            {
                Ok((pair, config)) if pair != current => {
                    info!(what = self.what, cert = %self.cert.display(), "certificate reloaded");
                    current = pair;
                    if sender.send(config).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    warn!(what = self.what, %error, "certificate not reloaded; serving the previous one")
                }
            }
        }
    }
}

/// The PEM bundle sensors trust the intake with, as it is now and as it changes (None:
/// unknown). Readers take `borrow()` at use; `changed()` says when to render ConfigMaps again.
pub type CaBundle = watch::Receiver<Option<String>>;

/// A [`CaBundle`] that never changes (the self-issued CA, tests).
pub fn fixed_ca_bundle(pem: Option<String>) -> CaBundle {
    // The sender may go: receivers keep the value and never see a change.
    watch::channel(pem).1
}

/// A stream that yields once per change of `bundle`: feed it to a controller's
/// `reconcile_all_on` so every policy renders its ConfigMaps with the new bundle.
pub fn ca_changes(bundle: CaBundle) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(bundle, |mut bundle| async move {
        bundle.changed().await.ok()?;
        Some(((), bundle))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::ByteString;

    use super::*;

    #[test]
    fn replicas_sharing_the_ca_secret_sign_with_the_same_ca() {
        let ca = Ca::generate().unwrap();
        let secret = ca.to_secret("portsentry-system", "portsentry-webhook-ca");
        // What the API server stores: stringData becomes data.
        let stored = Secret {
            data: Some(
                secret
                    .string_data
                    .clone()
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..secret
        };
        let again = Ca::from_secret(&stored).unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem);
        let one = ca.serving(&["a.svc".into()]).unwrap();
        let two = again.serving(&["a.svc".into()]).unwrap();
        assert_eq!(one.ca_pem, two.ca_pem);
        assert_ne!(one.cert_pem, two.cert_pem);
    }

    #[test]
    fn the_self_signed_certificate_loads_into_a_tls_config() {
        let cert = self_signed(&["portsentry-operator.portsentry-system.svc".into()]).unwrap();
        assert!(cert.ca_pem.contains("BEGIN CERTIFICATE"));
        assert_ne!(cert.ca_pem, cert.cert_pem);
        let config = tls_config(&cert.cert_pem, &cert.key_pem).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[tokio::test]
    async fn every_change_of_the_bundle_asks_for_one_pass_over_the_policies() {
        use futures::StreamExt;
        let (sender, receiver) = watch::channel(Some("first".to_owned()));
        let mut changes = Box::pin(ca_changes(receiver));
        sender.send(Some("second".to_owned())).unwrap();
        assert_eq!(changes.next().await, Some(()));
        drop(sender);
        assert_eq!(changes.next().await, None);
    }
}
