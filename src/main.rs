//! The binary: loads settings, starts logging, starts the embedded broker when no Kafka is
//! configured, binds the sockets and calls [`tamio_kafka_bridge::run`] until SIGTERM or SIGINT.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use rdkafka::mocking::MockCluster;
use tamio_kafka_bridge::config::{LogFormat, Secret, Settings};
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

#[derive(Subcommand)]
enum Command {
    /// Prints the signature header value for a body: `t=<now>,s=<hex HMAC-SHA256>`.
    Sign {
        /// The signing secret.
        #[arg(long, env = "TAMIO_SIGN_SECRET", hide_env_values = true)]
        secret: String,
        /// Unix seconds to sign at (default: now).
        #[arg(long)]
        timestamp: Option<i64>,
        /// The body file; standard input when absent.
        file: Option<PathBuf>,
    },
    /// Signs a JSON file and POSTs it to a bridge: a smoke test of a deployment. Prints the
    /// answer; exits 0 on a 2xx answer, 1 otherwise.
    Send {
        /// The bridge's ingress, e.g. http://127.0.0.1:8080/webhooks/tamio (plain HTTP).
        #[arg(long)]
        url: String,
        /// The signing secret.
        #[arg(long, env = "TAMIO_SIGN_SECRET", hide_env_values = true)]
        secret: String,
        /// Name of the signature header.
        #[arg(long, default_value = "Tamio-Signature")]
        header: String,
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
        Some(Command::Sign {
            secret,
            timestamp,
            file,
        }) => {
            let body = read_body(file)?;
            println!(
                "{}",
                verify::header_value(secret.as_bytes(), timestamp.unwrap_or_else(now), &body)
            );
            Ok(())
        }
        Some(Command::Send {
            url,
            secret,
            header,
            file,
        }) => {
            let body = read_body(file)?;
            let signature = verify::header_value(secret.as_bytes(), now(), &body);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (status, answer) = runtime.block_on(send(&url, &header, &signature, body))?;
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

/// POSTs `body` with its signature over plain HTTP/1.1; returns the status and the body.
async fn send(
    url: &str,
    header: &str,
    signature: &str,
    body: Vec<u8>,
) -> anyhow::Result<(http::StatusCode, String)> {
    use http_body_util::BodyExt;
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("`{url}` is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("`{url}`: only http:// URLs are supported");
    }
    let host = uri.host().context("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(header, signature)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&answer).into_owned()))
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

/// Loads the settings again on each SIGHUP, and when a watched file's content changes, and
/// hands them to the bridge, which applies what can change while it runs.
async fn reload_on_change(
    reloader: Reloader,
    mut files: Vec<PathBuf>,
    mut hangups: tokio::signal::unix::Signal,
    reloads: tokio::sync::mpsc::Sender<tamio_kafka_bridge::Reload>,
) {
    let mut seen = fingerprint(&files);
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
                if fingerprint(&files) == seen {
                    continue;
                }
                tracing::info!(
                    "a settings, secret or TLS file changed: reloading signature settings, \
                     secret files and TLS certificate"
                );
            }
        }
        let reload = reloader.load();
        if let Ok(settings) = &reload {
            files = watched_files(reloader.config.as_deref(), settings);
        }
        seen = fingerprint(&files);
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
    let scheme = if settings.server.tls() {
        "https"
    } else {
        "http"
    };
    tracing::warn!(
        "EMBEDDED KAFKA: no signing secret is set, so this run made a one-time secret; it is \
         printed below with a signed example request (valid for {} s)",
        settings.signature.tolerance_secs
    );
    println!(
        "\n  one-time signing secret: {secret}\n\n  try it:\n\n\
         curl -sS -X POST '{scheme}://127.0.0.1:{port}{path}' \\\n  \
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
