//! The control plane's throw-away PKI: one CA, the API server's serving certificate, an
//! admin client certificate (`O=system:masters`) and the ServiceAccount token signing key.

use std::{fs, path::Path};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM and as DER (the key in PKCS#8).
#[derive(Debug, Clone)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl CertAndKey {
    /// Writes `<stem>.crt` and `<stem>.key` into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<()> {
        fs::write(dir.join(format!("{stem}.crt")), &self.cert_pem)
            .with_context(|| format!("writing {stem}.crt into {}", dir.display()))?;
        fs::write(dir.join(format!("{stem}.key")), &self.key_pem)
            .with_context(|| format!("writing {stem}.key into {}", dir.display()))?;
        Ok(())
    }
}

/// A certificate authority that signs serving and client certificates for the tests.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .context("building the CA certificate parameters")?;
        params
            .distinguished_name
            .push(DnType::CommonName, "portsentry-tests-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = params
            .self_signed(&key)
            .context("self-signing the CA certificate")?;
        let key_pem = key.serialize_pem();
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// A TLS serving certificate for `names` (IP addresses or DNS names), e.g.
    /// `["127.0.0.1", "localhost"]`, signed by this CA.
    pub fn serving(&self, names: &[&str]) -> Result<CertAndKey> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone())
            .with_context(|| format!("building serving certificate parameters for {names:?}"))?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(params)
    }

    /// A client certificate for user `name` in `groups` (the API server reads CN as the
    /// user name and each O as a group).
    pub fn client(&self, name: &str, groups: &[&str]) -> Result<CertAndKey> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .context("building client certificate parameters")?;
        params.distinguished_name.push(DnType::CommonName, name);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<CertAndKey> {
        let key = KeyPair::generate().context("generating a certificate key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a certificate with the test CA")?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// An ECDSA P-256 key pair for signing ServiceAccount tokens (ES256), as PKCS#8 and SPKI PEM.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub private_pem: String,
    pub public_pem: String,
}

impl SigningKey {
    pub fn new() -> Result<Self> {
        let key = KeyPair::generate().context("generating the ServiceAccount signing key")?;
        Ok(Self {
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        })
    }
}
