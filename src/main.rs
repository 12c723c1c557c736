//! The binary: loads settings, starts logging, starts the embedded broker when no Kafka is
//! configured, binds the sockets and calls [`tamio_kafka_bridge::run`] until SIGTERM or SIGINT.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::mocking::MockCluster;
use tamio_kafka_bridge::config::{LogFormat, MacEncoding, Scheme, Secret, Settings};
use tamio_kafka_bridge::ingest::verify;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// Receives signed Tamio webhooks and publishes each ticket event to Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file layered over the defaults (environment variables win over both).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// How `sign` and `send` sign a body: the settings' `signature` options, as flags.
#[derive(clap::Args)]
struct Signing {
    /// The signing secret (for `standard-webhooks`, the `whsec_...` secret). Prefer the
    /// environment variable: arguments show in the process list.
    #[arg(long, env = "TAMIO_SIGN_SECRET", hide_env_values = true)]
    secret: String,
    /// The scheme: tamio, standard-webhooks or hmac-sha256.
    #[arg(long, default_value = "tamio")]
    scheme: Scheme,
    /// The signature header (schemes tamio and hmac-sha256).
    #[arg(long, default_value = "Tamio-Signature")]
    header: String,
    /// hex or base64 (scheme hmac-sha256).
    #[arg(long, default_value = "hex")]
    encoding: MacEncoding,
    /// The message id (scheme standard-webhooks; default: a random one).
    #[arg(long)]
    id: Option<String>,
    /// Unix seconds to sign at (default: now).
    #[arg(long)]
    timestamp: Option<i64>,
}

impl Signing {
    /// The signature headers of `body`, as (name, value).
    fn headers(&self, body: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
        let secret = self.secret.as_bytes();
        let t = self.timestamp.unwrap_or_else(now);
        Ok(match self.scheme {
            Scheme::Tamio => vec![(self.header.clone(), verify::header_value(secret, t, body))],
            Scheme::HmacSha256 => vec![(
                self.header.clone(),
                verify::plain_mac(secret, body, self.encoding),
            )],
            Scheme::StandardWebhooks => {
                let id = self
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("msg_{:024x}", rand::random::<u128>() >> 32));
                let signature = verify::standard_webhooks_signature(secret, &id, t, body)
                    .map_err(|reason| anyhow::anyhow!("--secret: {reason}"))?;
                vec![
                    ("webhook-id".into(), id),
                    ("webhook-timestamp".into(), t.to_string()),
                    ("webhook-signature".into(), signature),
                ]
            }
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Prints the signature of a body. Scheme tamio: the header value
    /// `t=<now>,s=<hex HMAC-SHA256>`; hmac-sha256: the MAC; standard-webhooks: the three
    /// headers, one `name: value` a line.
    Sign {
        #[command(flatten)]
        signing: Signing,
        /// The body file; standard input when absent.
        file: Option<PathBuf>,
    },
    /// Signs a JSON file and POSTs it to a bridge: a smoke test of a deployment. Prints the
    /// answer; exits 0 on a 2xx answer, 1 otherwise.
    Send {
        /// The bridge's ingress, e.g. http://127.0.0.1:8080/webhooks/tamio or https://...
        #[arg(long)]
        url: String,
        #[command(flatten)]
        signing: Signing,
        /// PEM CA certificates to check an https:// bridge's certificate against (default:
        /// the system's).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The body file; standard input when absent.
        file: Option<PathBuf>,
    },
    /// Loads and checks the settings, prints them (secrets redacted) and exits.
    CheckConfig,
}

/// An example delivery, printed ready to send in the embedded mode.
const EXAMPLE_EVENT: &str = include_str!("../tests/fixtures/whitelabel_ticket_created.json");

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sign { signing, file }) => {
            let body = read_body(file)?;
            let headers = signing.headers(&body)?;
            match signing.scheme {
                Scheme::StandardWebhooks => {
                    for (name, value) in headers {
                        println!("{name}: {value}");
                    }
                }
                _ => println!("{}", headers[0].1),
            }
            Ok(())
        }
        Some(Command::Send {
            url,
            signing,
            ca_file,
            file,
        }) => {
            let body = read_body(file)?;
            let headers = signing.headers(&body)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (status, answer) =
                runtime.block_on(send(&url, &headers, ca_file.as_deref(), body))?;
            println!("{status}\n{answer}");
            if !status.is_success() {
                std::process::exit(1);
            }
            Ok(())
        }
        Some(Command::CheckConfig) => {
            let settings = Settings::load(cli.config.as_deref())?;
            println!("{settings:#?}");
            Ok(())
        }
        None => serve(cli.config),
    }
}

fn read_body(file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
    Ok(match file {
        Some(path) => {
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
        }
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            buf
        }
    })
}

/// POSTs `body` with its signature headers over HTTP/1.1, in cleartext or over TLS; returns
/// the status and the body.
async fn send(
    url: &str,
    headers: &[(String, String)],
    ca_file: Option<&std::path::Path>,
    body: Vec<u8>,
) -> anyhow::Result<(http::StatusCode, String)> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("`{url}`: only http:// and https:// URLs are supported"),
    };
    // An IPv6 address comes bracketed: `[::1]`.
    let host = uri
        .host()
        .context("the URL has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let mut request = http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let stream: Box<dyn tamio_kafka_bridge::server::Stream> = if tls {
        Box::new(tls_connect(stream, &host, ca_file).await?)
    } else {
        Box::new(stream)
    };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
}

/// A TLS client connection to `host`, checked against `ca_file` or the system's CAs.
async fn tls_connect(
    stream: tokio::net::TcpStream,
    host: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let paths = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    let file = match ca_file {
        Some(file) => file.to_owned(),
        None => paths
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no system CA bundle found: give --ca-file")?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&file)
        .with_context(|| format!("reading {}", file.display()))?
    {
        roots.add(cert.with_context(|| format!("reading {}", file.display()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).context("the URL's host")?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, stream)
        .await
        .with_context(|| format!("TLS handshake with {host}"))
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let mut settings = Settings::load(config.as_deref())?;
    init_logging(&settings)?;

    // The embedded broker lives on this stack frame for as long as the bridge runs.
    let mut _embedded = None;
    let mut example_secret = None;
    if settings.embedded_kafka() {
        let cluster = MockCluster::new(1).context("starting the embedded broker")?;
        cluster
            .create_topic(&settings.kafka.topic, 3, 1)
            .context("creating the topic on the embedded broker")?;
        settings.kafka.brokers = cluster.bootstrap_servers();
        tracing::warn!(
            bootstrap = %settings.kafka.brokers,
            topic = %settings.kafka.topic,
            "EMBEDDED KAFKA: no kafka.brokers is set, so an in-memory broker runs inside this \
             process for trying the bridge out. It keeps nothing: every event is gone when the \
             bridge stops. Any Kafka client can read the topic at the bootstrap address in this line. \
             Set kafka.brokers (TAMIO_BRIDGE__KAFKA__BROKERS) for real use."
        );
        _embedded = Some(cluster);
        if !settings.has_secrets() && !settings.signature.allow_unsigned {
            let secret = format!("try-{:032x}", rand::random::<u128>());
            example_secret = Some(Secret::new(secret));
            with_example_secret(&mut settings, &example_secret);
        }
    }
    settings.check_signing()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| {
                format!(
                    "setting `server.listen`: cannot bind {}",
                    settings.server.listen
                )
            })?;
        let admin = TcpListener::bind(settings.admin.listen)
            .await
            .with_context(|| {
                format!(
                    "setting `admin.listen`: cannot bind {}",
                    settings.admin.listen
                )
            })?;
        if let Some(secret) = &example_secret {
            print_try_it(&settings, &listener, secret);
        }
        // Installed before serving: SIGHUP's default action would end the process.
        let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
        let files = watched_files(config.as_deref(), &settings);
        tokio::spawn(reload_on_change(
            Reloader {
                config,
                example_secret,
                brokers: settings.kafka.brokers.clone(),
                watch_interval: Duration::from_millis(settings.reload.watch_interval_ms),
            },
            files,
            hangups,
            reload_tx,
        ));
        tamio_kafka_bridge::run_with_reloads(settings, listener, admin, shutdown_signal(), reloads)
            .await?;
        Ok(())
    })
}

/// The embedded mode's one-time secret stands in while no other secret is configured.
fn with_example_secret(settings: &mut Settings, example: &Option<Secret>) {
    if let Some(secret) = example {
        if !settings.has_secrets() && !settings.signature.allow_unsigned {
            settings.signature.secrets.push(secret.clone());
        }
    }
}

/// How to load the settings again.
#[derive(Clone)]
struct Reloader {
    config: Option<PathBuf>,
    example_secret: Option<Secret>,
    /// The brokers in use (the embedded broker's address is in no setting).
    brokers: String,
    watch_interval: Duration,
}

impl Reloader {
    fn load(&self) -> Result<Settings, String> {
        Settings::load(self.config.as_deref())
            .map(|mut settings| {
                with_example_secret(&mut settings, &self.example_secret);
                settings.kafka.brokers.clone_from(&self.brokers);
                settings
            })
            .map_err(|e| e.to_string())
    }
}

/// The files whose content a reload depends on: the --config file, secret files, TLS files.
fn watched_files(config: Option<&std::path::Path>, settings: &Settings) -> Vec<PathBuf> {
    config
        .map(std::path::Path::to_owned)
        .into_iter()
        .chain(settings.reloadable_files())
        .collect()
}

/// A digest of each file's content (None when it cannot be read). Contents, not times: a
/// Kubernetes Secret volume swaps a symlink, and editors may keep a file's modification time.
fn fingerprint(files: &[PathBuf]) -> Vec<Option<[u8; 32]>> {
    use sha2::Digest;
    files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .ok()
                .map(|b| sha2::Sha256::digest(b).into())
        })
        .collect()
}

/// [`fingerprint`] on a blocking thread: reading files must not hold up a runtime thread.
async fn fingerprint_off_runtime(files: &[PathBuf]) -> Vec<Option<[u8; 32]>> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        .unwrap_or_default()
}

/// Loads the settings again on each SIGHUP, and when a watched file's content changes, and
/// hands them to the bridge, which applies what can change while it runs.
async fn reload_on_change(
    reloader: Reloader,
    mut files: Vec<PathBuf>,
    mut hangups: tokio::signal::unix::Signal,
    reloads: tokio::sync::mpsc::Sender<tamio_kafka_bridge::Reload>,
) {
    let mut seen = fingerprint_off_runtime(&files).await;
    // After a failed reload, try again at every tick until one applies: the files may be
    // half-written, or name a file that does not exist yet.
    let mut failing = false;
    let watching = !reloader.watch_interval.is_zero();
    let mut ticks = tokio::time::interval(if watching {
        reloader.watch_interval
    } else {
        Duration::from_secs(3600)
    });
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            signal = hangups.recv() => {
                if signal.is_none() {
                    return;
                }
                tracing::info!(
                    "SIGHUP received: reloading signature settings, secret files and TLS certificate"
                );
            }
            _ = ticks.tick(), if watching => {
                if !failing && fingerprint_off_runtime(&files).await == seen {
                    continue;
                }
                if !failing {
                    tracing::info!(
                        "a settings, secret or TLS file changed: reloading signature \
                         settings, secret files and TLS certificate"
                    );
                }
            }
        }
        // Taken before loading: a change made while loading shows at the next tick.
        seen = fingerprint_off_runtime(&files).await;
        let reload = {
            let reloader = reloader.clone();
            tokio::task::spawn_blocking(move || reloader.load())
                .await
                .unwrap_or_else(|e| Err(format!("loading the settings failed: {e}")))
        };
        failing = reload.is_err();
        if let Ok(settings) = &reload {
            let next = watched_files(reloader.config.as_deref(), settings);
            if next != files {
                files = next;
                seen = fingerprint_off_runtime(&files).await;
            }
        }
        if reloads.send(reload).await.is_err() {
            return;
        }
    }
}

/// Prints the one-time secret of the embedded mode and a request signed with it.
fn print_try_it(settings: &Settings, listener: &TcpListener, secret: &Secret) {
    let secret = String::from_utf8_lossy(secret.expose());
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(8080);
    let body = EXAMPLE_EVENT.trim();
    let header = verify::header_value(secret.as_bytes(), now(), body.as_bytes());
    // Over TLS, curl must trust the certificate's CA.
    let (scheme, ca) = if settings.server.tls() {
        ("https", " --cacert <your CA's PEM file>")
    } else {
        ("http", "")
    };
    tracing::warn!(
        "EMBEDDED KAFKA: no signing secret is set, so this run made a one-time secret; it is \
         printed below with a signed example request (valid for {} s)",
        settings.signature.tolerance_secs
    );
    println!(
        "\n  one-time signing secret: {secret}\n\n  try it:\n\n\
         curl -sS{ca} -X POST '{scheme}://127.0.0.1:{port}{path}' \\\n  \
         -H 'Content-Type: application/json' \\\n  \
         -H '{name}: {header}' \\\n  \
         --data-binary '{body}'\n\n  \
         sign your own body: TAMIO_SIGN_SECRET={secret} tamio-kafka-bridge sign body.json\n",
        path = settings.server.path,
        name = settings.signature.header,
    );
}

fn init_logging(settings: &Settings) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log.level))
        .context("setting `log.level`")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match settings.log.format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
