//! `replay`: puts dead letters through again once their cause is fixed, with a progress bar
//! on a terminal (log lines otherwise), a summary table or JSON, and an exit status.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::route::Pattern;
use tamio_kafka_bridge::plan::Plan;
use tamio_kafka_bridge::replay::{Bound, Counts, Options, Selection, Summary};

#[derive(clap::Args)]
pub struct Args {
    /// The dead-letter topic (default: `kafka.dead_letter_topic`).
    #[arg(long)]
    topic: Option<String>,
    /// The consumer group that keeps the replay's position (default: one named after the
    /// topic and the filters, so that the same command resumes where it stopped).
    #[arg(long)]
    group: Option<String>,
    /// Only dead letters of this endpoint (repeatable).
    #[arg(long = "endpoint-id", value_name = "ID")]
    endpoint_ids: Vec<String>,
    /// Only these event types: an exact type, `prefix*` or `*`, as in routes.
    #[arg(long, value_name = "PATTERN", value_parser = parse_pattern)]
    event_type: Option<Pattern>,
    /// Only dead letters refused for this reason, the `error_kind` header, e.g.
    /// unroutable_event, invalid_envelope (repeatable).
    #[arg(long = "error-kind", value_name = "KIND")]
    error_kinds: Vec<String>,
    /// From this time (RFC 3339, the dead letter's `received_at`) or these offsets
    /// (`partition:offset,...`), inclusive.
    #[arg(long, value_parser = Bound::parse)]
    since: Option<Bound>,
    /// Up to this time or these offsets, exclusive.
    #[arg(long, value_parser = Bound::parse)]
    until: Option<Bound>,
    /// Print what would be published and what would stay, grouped by reason; write and
    /// commit nothing.
    #[arg(long)]
    dry_run: bool,
    /// `text` (a table) or `json` (the summary, for scripts), on standard output.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// Records in flight at once (never two of one ticket).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    Pattern::parse(text)
}

/// Runs the replay; the exit status is the summary's (0, 2 or 3; 1 is an error).
pub fn run(config: Option<&Path>, args: Args) -> anyhow::Result<i32> {
    let settings = Settings::load(config)?;
    let interactive = std::io::stderr().is_terminal() && args.output == "text";
    // A progress bar takes the terminal's last line: logs below warnings would tear it.
    let mut log_settings = settings.clone();
    if interactive && std::env::var_os("RUST_LOG").is_none() {
        log_settings.log.level = "warn".into();
    }
    crate::init_logging(&log_settings)?;
    if settings.embedded_kafka() {
        anyhow::bail!(
            "setting `kafka.brokers` is empty: replay reads the dead-letter topic of a real Kafka"
        );
    }
    let output = args.output.clone();
    let options = options(args, &settings)?;
    let plan = Plan::compile(&settings)?;

    let bar = interactive.then(spinner);
    let mut last_line = Instant::now();
    let progress = |counts: &Counts| match &bar {
        Some(bar) => {
            bar.set_position(counts.read);
            bar.set_message(line(counts));
        }
        None => {
            if last_line.elapsed() >= Duration::from_secs(5) {
                last_line = Instant::now();
                tracing::info!(
                    read = counts.read,
                    selected = counts.selected,
                    published = counts.published,
                    duplicate = counts.duplicate,
                    would_publish = counts.would_publish,
                    refused = counts.refused_total(),
                    "replay progress"
                );
            }
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(tamio_kafka_bridge::replay(
        plan,
        options,
        progress,
        stop_signal(),
    ));
    // A Kafka lookup a stop left behind (on a blocking thread) is not waited for: what the
    // replay wrote was flushed and committed before its summary.
    runtime.shutdown_background();
    let summary = summary?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let text = match output.as_str() {
        "json" => serde_json::to_string_pretty(&summary)? + "\n",
        _ => table(&summary),
    };
    // A terminal that dropped takes no summary: the exit status still tells.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(summary.exit_code())
}

/// The replay's options from the command line: the dead-letter topic (`--topic`, or the
/// configured one), the selection, and the group (`--group`, or one named after the topic
/// and the filters, so that the same command resumes where it stopped).
fn options(args: Args, settings: &Settings) -> anyhow::Result<Options> {
    let topic = match (&args.topic, settings.dead_letter_topic()) {
        (Some(t), _) => t.clone(),
        (None, Some(t)) => t.to_owned(),
        (None, None) => {
            anyhow::bail!("no dead-letter topic: set `kafka.dead_letter_topic` or pass --topic")
        }
    };
    let selection = Selection {
        endpoint_ids: args.endpoint_ids,
        event_type: args.event_type,
        error_kinds: args.error_kinds,
        since: args.since,
        until: args.until,
    };
    let group = args.group.unwrap_or_else(|| {
        let digest = Sha256::digest(format!("{topic}\n{}", selection.fingerprint()));
        format!("tamio-kafka-bridge-replay-{}", &hex::encode(digest)[..12])
    });
    Ok(Options {
        topic,
        group,
        selection,
        dry_run: args.dry_run,
        concurrency: args.concurrency,
    })
}

/// The progress bar of a replay run on a terminal.
fn spinner() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {pos} read, {per_sec}: {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Ctrl-C, SIGTERM, or SIGHUP (the terminal or SSH session that ran the command dropped):
/// each ends the replay the same way, committing what is finished.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!(
            "cannot install the SIGTERM and SIGHUP handlers: only SIGINT stops the replay"
        );
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = hangup.recv() => tracing::info!("SIGHUP received: the terminal dropped"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn line(c: &Counts) -> String {
    let mut text = if c.would_publish > 0 {
        format!("{} would be published", c.would_publish)
    } else {
        format!(
            "{} published, {} already published",
            c.published, c.duplicate
        )
    };
    for (reason, n) in &c.refused {
        text.push_str(&format!(", {n} {reason}"));
    }
    text
}

/// The summary as a table for a person.
fn table(s: &Summary) -> String {
    let c = &s.counts;
    let mut out = String::new();
    let mut row = |name: &str, value: String| out.push_str(&format!("  {name:<24} {value}\n"));
    let title = if s.dry_run {
        "dry run (nothing written)"
    } else {
        "replay"
    };
    row(title, format!("{} (group {})", s.topic, s.group));
    row("read", c.read.to_string());
    row("selected", c.selected.to_string());
    if s.dry_run {
        row("would be published", c.would_publish.to_string());
        for (topic, n) in &s.would_publish_to {
            row(&format!("  to {topic}"), n.to_string());
        }
    } else {
        row("published", c.published.to_string());
        row("already published", c.duplicate.to_string());
    }
    row("stay (still refused)", c.refused_total().to_string());
    for (reason, n) in &c.refused {
        row(&format!("  {reason}"), n.to_string());
    }
    row(
        "rate",
        format!(
            "{:.0} records/s over {:.1} s",
            s.records_per_sec, s.elapsed_secs
        ),
    );
    row(
        "complete",
        match (&s.stopped, s.crowded.is_empty()) {
            (Some(why), _) => format!("no: {why}; run the same command again to resume"),
            (None, false) => format!(
                "no: partitions {:?} keep more letters that stay than one run can track; fix \
                 their cause, then run the same command again",
                s.crowded
            ),
            (None, true) => "yes: every partition read to its end".to_owned(),
        },
    );
    let to_do: usize = s.to_do.values().sum();
    if to_do > 0 && !s.dry_run {
        row(
            "left for the next run",
            format!("{to_do}: the same command takes up exactly these once their cause is fixed"),
        );
    }
    if !s.positions.is_empty() {
        let at: Vec<String> = s
            .positions
            .iter()
            .map(|(p, o)| format!("{p}:{o}"))
            .collect();
        row("group position", at.join(","));
    }
    if !s.stayed.is_empty() {
        out.push_str(
            "\nstaying in the dead-letter topic (partition:offset event_id reason: detail):\n",
        );
        for stayed in s.stayed.iter().take(50) {
            out.push_str(&format!(
                "  {}:{} {} {}: {}\n",
                stayed.partition,
                stayed.offset,
                stayed.event_id.as_deref().unwrap_or("-"),
                stayed.reason,
                stayed.detail
            ));
        }
        if s.stayed.len() > 50 {
            out.push_str(&format!(
                "  ... and {} more (--output json lists up to 1,000)\n",
                c.refused_total() - 50
            ));
        }
    }
    out
}
