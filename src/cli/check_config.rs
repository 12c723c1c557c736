//! `check-config`: loads the settings as serving would, compiles them (every error is
//! reported, each naming its setting), and prints them as TOML that a `--config` file takes.
//! Secrets are left out: a placeholder would become a secret once pasted.

use std::path::Path;

use tamio_kafka_bridge::config::{shown_value, Settings};
use tamio_kafka_bridge::memory::Budget;
use tamio_kafka_bridge::plan::Plan;

pub fn run(config: Option<&Path>) -> anyhow::Result<()> {
    let settings = Settings::load(config)?;
    Plan::compile(&settings)?;
    print!("{}", render(&settings)?);
    Ok(())
}

/// The settings as TOML, after a comment naming what was left out.
pub fn render(settings: &Settings) -> anyhow::Result<String> {
    let mut out = String::from(
        "# The settings in force: the defaults, the --config file and the environment, as a\n\
         # --config file takes them.\n",
    );
    out.push_str(&format!(
        "# Memory at the bounds (docs/operations.md, Memory): {}\n",
        Budget::of(settings)
    ));
    let left_out = left_out(settings);
    if !left_out.is_empty() {
        out.push_str("# Not shown (set them again where they came from):\n");
        for item in left_out {
            out.push_str(&format!("#   {item}\n"));
        }
    }
    out.push('\n');
    out.push_str(&toml::to_string(settings)?);
    Ok(out)
}

/// The secrets the printed settings leave out.
fn left_out(s: &Settings) -> Vec<String> {
    let mut items = Vec::new();
    let sig = &s.signature;
    if !sig.secrets.is_empty() {
        items.push(format!(
            "signature.secrets: {} secret(s), with those of signature.secret_files",
            sig.secrets.len()
        ));
    }
    let mut ids: Vec<&String> = sig.endpoints.keys().collect();
    ids.sort();
    for id in ids {
        items.push(format!(
            "signature.endpoints.\"{id}\".secrets: {} secret(s)",
            sig.endpoints[id].secrets.len()
        ));
    }
    if !s.kafka.sasl.password.expose().is_empty()
        && s.kafka.sasl.password_file.as_os_str().is_empty()
    {
        items.push("kafka.sasl.password".to_owned());
    }
    if !s.kafka.tls.key_password.expose().is_empty() {
        items.push("kafka.tls.key_password".to_owned());
    }
    if s.dedup.redis_url.has_password() {
        items.push("the password in dedup.redis_url".to_owned());
    }
    if !s.dedup.redis_password.expose().is_empty()
        && s.dedup.redis_password_file.as_os_str().is_empty()
    {
        items.push("dedup.redis_password".to_owned());
    }
    if !s.dedup.redis_sentinel_password.expose().is_empty()
        && s.dedup.redis_sentinel_password_file.as_os_str().is_empty()
    {
        items.push("dedup.redis_sentinel_password".to_owned());
    }
    for (key, value) in &s.kafka.librdkafka {
        if shown_value(key, value) != value {
            items.push(format!("kafka.librdkafka.\"{key}\""));
        }
    }
    items
}
