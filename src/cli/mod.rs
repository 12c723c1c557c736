//! The subcommands beside serving: `sign` and `send` (a signed delivery, by hand or as a
//! smoke test of a deployment), `check-config` (the settings in force, as TOML) and
//! `replay` (dead letters put through again).

pub mod check_config;
pub mod replay;
pub mod send;

use std::io::Read;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tamio_kafka_bridge::config::{MacEncoding, Scheme};
use tamio_kafka_bridge::ingest::verify;

/// How `sign` and `send` sign a body: the settings' `signature` options, as flags.
#[derive(clap::Args)]
pub struct Signing {
    /// The signing secret (for `standard-webhooks`, the `whsec_...` secret). Prefer the
    /// environment variable: arguments show in the process list.
    #[arg(long, env = "TAMIO_SIGN_SECRET", hide_env_values = true)]
    pub secret: String,
    /// The scheme: tamio, standard-webhooks or hmac-sha256.
    #[arg(long, default_value = "tamio")]
    pub scheme: Scheme,
    /// The signature header (schemes tamio and hmac-sha256).
    #[arg(long, default_value = "Tamio-Signature")]
    pub header: String,
    /// hex or base64 (scheme hmac-sha256).
    #[arg(long, default_value = "hex")]
    pub encoding: MacEncoding,
    /// The message id (scheme standard-webhooks; default: a random one).
    #[arg(long)]
    pub id: Option<String>,
    /// Unix seconds to sign at (default: now).
    #[arg(long)]
    pub timestamp: Option<i64>,
}

impl Signing {
    /// The signature headers of `body`, as (name, value).
    pub fn headers(&self, body: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
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

/// `sign`: prints the signature headers of a body.
pub fn sign(signing: &Signing, file: Option<PathBuf>) -> anyhow::Result<()> {
    let body = read_body(file)?;
    let headers = signing.headers(&body)?;
    match signing.scheme {
        Scheme::StandardWebhooks => {
            for (name, value) in headers {
                println!("{name}: {value}");
            }
        }
        _ => {
            for (_, value) in headers {
                println!("{value}");
            }
        }
    }
    Ok(())
}

pub fn read_body(file: Option<PathBuf>) -> anyhow::Result<Vec<u8>> {
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

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
