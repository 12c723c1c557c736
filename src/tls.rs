//! TLS on the ingress, with rustls: the certificate chain and key come from PEM files and
//! are replaced as a whole on reload, so connections already open keep their session and new
//! ones get the new certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

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

/// The ingress's TLS acceptor, replaceable while the server runs.
pub struct Tls {
    current: RwLock<(TlsAcceptor, i64)>,
}

impl Tls {
    /// Loads the certificate chain and key.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        Ok(Tls {
            current: RwLock::new(acceptor(cert, key)?),
        })
    }

    /// When the certificate in force expires: its `notAfter`, in unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
    }

    /// Loads the files again and, when they are usable, serves new connections with them.
    /// On error the certificate in force stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let next = acceptor(cert, key)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
        Ok(())
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
