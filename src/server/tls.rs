//! TLS on the ingress, with rustls: the certificate chain and key come from PEM files and
//! are replaced as a whole on reload, so connections already open keep their session and new
//! ones get the new certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::check_pem_file;

/// Why a certificate or key could not be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "setting `server.tls_cert_file`: cannot read a PEM certificate chain from {path}: {reason}"
    )]
    Certificate { path: PathBuf, reason: String },
    #[error("setting `server.tls_key_file`: cannot read a PEM private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("settings `server.tls_cert_file` and `server.tls_key_file`: {0}")]
    Config(String),
}

impl From<TlsError> for crate::config::SettingsError {
    fn from(e: TlsError) -> Self {
        let (key, reason) = match e {
            TlsError::Certificate { path, reason } => (
                "server.tls_cert_file",
                format!(
                    "cannot read a PEM certificate chain from {}: {reason}",
                    path.display()
                ),
            ),
            TlsError::Key { path, reason } => (
                "server.tls_key_file",
                format!(
                    "cannot read a PEM private key from {}: {reason}",
                    path.display()
                ),
            ),
            TlsError::Config(reason) => ("server.tls_cert_file", reason),
        };
        crate::config::SettingsError::Invalid { key, reason }
    }
}

/// The ingress's TLS acceptor, replaceable while the server runs.
pub struct Tls {
    current: RwLock<(TlsAcceptor, i64)>,
}

impl Tls {
    /// Serves `certificate` until it is replaced.
    pub fn new(certificate: Certificate) -> Tls {
        Tls {
            current: RwLock::new((certificate.acceptor, certificate.not_after)),
        }
    }

    /// Serves new connections with `certificate`; open ones keep their session.
    pub fn replace(&self, certificate: Certificate) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            (certificate.acceptor, certificate.not_after);
    }

    /// When the certificate in force expires: its `notAfter`, in unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .clone()
    }
}

/// A certificate chain and key, ready to serve.
pub struct Certificate {
    acceptor: TlsAcceptor,
    /// The first certificate's `notAfter`, unix seconds.
    not_after: i64,
}

impl Certificate {
    /// Loads the chain and key of `server.tls_cert_file` and `server.tls_key_file`.
    pub fn load(cert: &Path, key: &Path) -> Result<Certificate, TlsError> {
        check_pem_file(cert, "CERTIFICATE").map_err(|reason| TlsError::Certificate {
            path: cert.to_owned(),
            reason,
        })?;
        check_pem_file(key, "PRIVATE KEY").map_err(|reason| TlsError::Key {
            path: key.to_owned(),
            reason,
        })?;
        let (acceptor, not_after) = acceptor(cert, key)?;
        Ok(Certificate {
            acceptor,
            not_after,
        })
    }
}

/// The acceptor for a certificate chain and key, and the first certificate's `notAfter`.
fn acceptor(cert: &Path, key: &Path) -> Result<(TlsAcceptor, i64), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| TlsError::Certificate {
            path: cert.to_owned(),
            reason: format!("the first certificate does not parse: {e}"),
        })?
        .1
        .validity()
        .not_after
        .timestamp();
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), not_after))
}
