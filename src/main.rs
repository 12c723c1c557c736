//! The binary: the command line, and start-up: settings, logging, the embedded broker when
//! no Kafka is configured, the sockets, signals, then [`tamio_kafka_bridge::run_with_reloads`]
//! until SIGTERM or SIGINT. The subcommands are in `cli/`.

mod cli;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rdkafka::mocking::MockCluster;
use tamio_kafka_bridge::config::{LogFormat, Secret, Settings};
use tamio_kafka_bridge::ingest::verify;
use tamio_kafka_bridge::plan::Plan;
use tamio_kafka_bridge::reload;
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
    /// Prints the signature of a body. Scheme tamio: the header value
    /// `t=<now>,s=<hex HMAC-SHA256>`; hmac-sha256: the MAC; standard-webhooks: the three
    /// headers, one `name: value` a line.
    Sign {
        #[command(flatten)]
        signing: cli::Signing,
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
        signing: cli::Signing,
        /// PEM CA certificates to check an https:// bridge's certificate against (default:
        /// the system's).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The body file; standard input when absent.
        file: Option<PathBuf>,
    },
    /// Loads and checks the settings, prints them as TOML for a --config file (secrets left
    /// out) and exits.
    CheckConfig,
    /// Reads the dead-letter topic and puts through again what the current settings accept:
    /// each body verified again against its recorded signature, then the live pipeline.
    /// Exits 0 when everything selected was published (or already was), 2 when some stay
    /// refused, 3 when stopped before the end (run it again to resume), 1 on an error.
    Replay(cli::replay::Args),
}

/// An example delivery, printed ready to send in the embedded mode.
const EXAMPLE_EVENT: &str = include_str!("../tests/fixtures/whitelabel_ticket_created.json");

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Sign { signing, file }) => cli::sign(&signing, file),
        Some(Command::Send {
            url,
            signing,
            ca_file,
            file,
        }) => cli::send::run(&url, &signing, ca_file.as_deref(), file),
        Some(Command::CheckConfig) => cli::check_config::run(cli.config.as_deref()),
        Some(Command::Replay(args)) => match cli::replay::run(cli.config.as_deref(), args) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        None => serve(cli.config),
    };
    if let Err(err) = result {
        // Each cause once: an error whose text already holds its cause's is not repeated.
        let mut message = err.to_string();
        for cause in err.chain().skip(1) {
            let cause = cause.to_string();
            if !message.contains(&cause) {
                message = format!("{message}: {cause}");
            }
        }
        eprintln!("Error: {message}");
        std::process::exit(1);
    }
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
    let plan = Plan::compile(&settings)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener =
            tamio_kafka_bridge::server::bind(settings.server.listen).with_context(|| {
                format!(
                    "setting `server.listen`: cannot bind {}",
                    settings.server.listen
                )
            })?;
        let admin = tamio_kafka_bridge::server::bind(settings.admin.listen).with_context(|| {
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
        let brokers = settings.kafka.brokers.clone();
        let source = reload::Source {
            config,
            // Reloaded settings get what start-up gave these: the brokers in use (the
            // embedded broker's address is in no setting) and the one-time secret.
            adjust: move |s: &mut Settings| {
                with_example_secret(s, &example_secret);
                s.kafka.brokers.clone_from(&brokers);
            },
        };
        let started_with = settings.clone();
        tokio::spawn(async move { reload::watch(source, &started_with, hangups, reload_tx).await });
        tamio_kafka_bridge::run_with_reloads(plan, listener, admin, shutdown_signal(), reloads)
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

/// Prints the one-time secret of the embedded mode and a request signed with it.
fn print_try_it(settings: &Settings, listener: &TcpListener, secret: &Secret) {
    let secret = String::from_utf8_lossy(secret.expose());
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(8080);
    let body = EXAMPLE_EVENT.trim();
    let header = verify::header_value(secret.as_bytes(), cli::now(), body.as_bytes());
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
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot install the SIGTERM handler: only SIGINT stops the bridge");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
