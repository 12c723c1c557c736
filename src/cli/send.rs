//! `send`: signs a body and POSTs it to a bridge, a smoke test of a deployment. HTTP/1.1
//! through hyper-util's client; `https://` through hyper-rustls, the bridge's certificate
//! checked against `--ca-file` or the system's CA certificates (rustls-native-certs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{read_body, Signing};

/// Signs `file` (standard input when absent), POSTs it to `url`, prints the answer; exits 1
/// unless it is a 2xx.
pub fn run(
    url: &str,
    signing: &Signing,
    ca_file: Option<&Path>,
    file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let body = read_body(file)?;
    let headers = signing.headers(&body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime.block_on(send(url, &headers, ca_file, body))?;
    println!("{status}\n{answer}");
    if !status.is_success() {
        std::process::exit(1);
    }
    Ok(())
}

/// POSTs `body` with its signature headers; returns the status and the body.
async fn send(
    url: &str,
    headers: &[(String, String)],
    ca_file: Option<&Path>,
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, String)> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    let mut request = Request::post(uri.clone()).header(CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    match uri.scheme_str() {
        Some("http") => {
            let client = Client::builder(TokioExecutor::new()).build_http();
            answer(client, request).await
        }
        Some("https") => {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls_config(ca_file)?)
                .https_only()
                .enable_http1()
                .build();
            let client = Client::builder(TokioExecutor::new()).build(connector);
            answer(client, request).await
        }
        _ => bail!("`{url}`: only http:// and https:// URLs are supported"),
    }
}

async fn answer<C: Connect + Clone + Send + Sync + 'static>(
    client: Client<C, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, String)> {
    let uri = request.uri().clone();
    let response = client
        .request(request)
        .await
        .with_context(|| format!("sending to {uri}"))?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// TLS trusting `ca_file`, or the system's CA certificates without one.
fn tls_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for cert in CertificateDer::pem_file_iter(file)
                .with_context(|| format!("reading {}", file.display()))?
            {
                roots.add(cert.with_context(|| format!("reading {}", file.display()))?)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A certificate rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                bail!("no system CA certificates found: give --ca-file");
            }
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}
