//! Settings: one strict, documented type, loaded in layers (the built-in
//! `config/default.toml`, an optional file, then `TAMIO_BRIDGE__SECTION__KEY` variables) and
//! checked as a whole before anything starts.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

/// The defaults, compiled in so that the binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "TAMIO_BRIDGE";

impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        SettingsError::Load(scrub(&e.to_string()))
    }
}

/// The variable holding `signature.secrets`, comma-separated.
const SECRETS_ENV: &str = "TAMIO_BRIDGE__SIGNATURE__SECRETS";

/// The variable holding `signature.secret_files`, comma-separated.
const SECRET_FILES_ENV: &str = "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES";

/// Every setting of the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The webhook ingress.
    pub server: Server,
    /// The admin listener: metrics and health.
    pub admin: Admin,
    /// The Kafka producer.
    pub kafka: Kafka,
    /// Signature verification.
    pub signature: Signature,
    /// Duplicate suppression by event id.
    pub dedup: Dedup,
    /// When settings are loaded again while the bridge runs.
    pub reload: ReloadSettings,
    /// Event type -> topic and key, matched in order.
    pub routes: Vec<RouteSetting>,
    /// Logging.
    pub log: Log,
    /// Traces of deliveries, exported over OTLP.
    pub tracing: Tracing,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Address the webhook ingress listens on.
    pub listen: SocketAddr,
    /// The one path that accepts deliveries.
    pub path: String,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Deadline for a whole request, Kafka's acknowledgement included.
    pub request_timeout_ms: u64,
    /// Time from a connection's accept to its first request's head, TLS handshake included.
    pub header_read_timeout_ms: u64,
    /// Time a connection may stay open with no request in progress (HTTP/1 keep-alive and
    /// HTTP/2 alike).
    pub idle_timeout_ms: u64,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams in progress at once across connections, beyond one per connection.
    pub http2_max_pending_streams: usize,
    /// Period of the PINGs sent to HTTP/2 peers; 0 sends none.
    pub http2_keepalive_interval_ms: u64,
    /// Time a PING may go unanswered before its connection is closed.
    pub http2_keepalive_timeout_ms: u64,
    /// Requests processed at once; above it, 503 at once.
    pub max_in_flight: usize,
    /// Connections open at once.
    pub max_connections: usize,
    /// Time allowed for requests in flight to finish on shutdown.
    pub drain_timeout_ms: u64,
    /// Time an answer may wait for the client to take it before the connection is closed.
    pub write_timeout_ms: u64,
    /// Largest request head (HTTP/1 request line and headers; HTTP/2 decoded header list).
    pub max_header_bytes: usize,
    /// Bytes of request bodies held in memory at once, from their first byte until their
    /// record is delivered.
    pub body_memory_bytes: usize,
    /// Bytes a second a body must arrive at, on average, once `body_rate_grace_ms` has
    /// passed; 0 turns the check off.
    pub min_body_rate_bytes_per_sec: u64,
    /// Time a body may take before the minimum rate applies.
    pub body_rate_grace_ms: u64,
    /// PEM certificate chain for TLS on the ingress; empty serves plain HTTP.
    pub tls_cert_file: PathBuf,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: PathBuf,
}

impl Server {
    /// True when the ingress serves TLS.
    pub fn tls(&self) -> bool {
        !self.tls_cert_file.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address of /metrics, /healthz and /readyz.
    pub listen: SocketAddr,
}

#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kafka {
    /// Bootstrap servers, comma-separated; empty starts the embedded broker.
    pub brokers: String,
    /// Topic every ticket event is written to.
    pub topic: String,
    /// librdkafka's `message.timeout.ms`.
    pub delivery_timeout_ms: u64,
    /// Period of the readiness probe.
    pub readiness_interval_ms: u64,
    /// Deadline of one readiness probe.
    pub readiness_timeout_ms: u64,
    /// Deadline of the final flush on shutdown.
    pub flush_timeout_ms: u64,
    /// librdkafka's `queue.buffering.max.messages`.
    pub queue_max_messages: u32,
    /// librdkafka's `queue.buffering.max.kbytes`.
    pub queue_max_kbytes: u32,
    /// Topic for signed deliveries with an invalid envelope; empty is off.
    pub dead_letter_topic: String,
    /// Add the CloudEvents Kafka binding headers to records.
    pub cloudevents: bool,
    /// Write deliveries in Kafka transactions committed together, and answer each only once
    /// its transaction is committed (200) or aborted (503).
    #[serde(default)]
    pub exactly_once: bool,
    /// The transactional id of this replica's producer with `exactly_once`; empty:
    /// `tamio-kafka-bridge-` and the host name.
    #[serde(default)]
    pub transactional_id: String,
    /// With `exactly_once`, how long a transaction stays open for more deliveries once it
    /// holds one.
    #[serde(default = "default_transaction_linger_ms")]
    pub transaction_linger_ms: u64,
    /// TLS to the brokers.
    pub tls: KafkaTls,
    /// SASL authentication to the brokers.
    pub sasl: KafkaSasl,
    /// Options passed through to librdkafka.
    #[serde(default, serialize_with = "shown_options")]
    pub librdkafka: BTreeMap<String, String>,
}

#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTls {
    /// Connect to the brokers over TLS.
    pub enabled: bool,
    /// PEM CA certificates the brokers' certificates are checked against; empty: the
    /// system's.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that require one.
    pub cert_file: PathBuf,
    /// PEM private key of `cert_file`.
    pub key_file: PathBuf,
    /// Password of `key_file`, when it is encrypted.
    pub key_password: Secret,
}

/// SASL mechanisms the producer can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSasl {
    /// "PLAIN", "SCRAM-SHA-256" or "SCRAM-SHA-512"; absent: no SASL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<SaslMechanism>,
    pub username: String,
    pub password: Secret,
    /// A file holding the password (its surrounding whitespace is ignored), instead of
    /// `password`.
    pub password_file: PathBuf,
}

fn default_transaction_linger_ms() -> u64 {
    5
}

impl Kafka {
    /// The transactional id of this replica's producer with `exactly_once`.
    pub fn transactional_id(&self) -> String {
        if !self.transactional_id.is_empty() {
            return self.transactional_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_else(|| "bridge".to_owned());
        format!("tamio-kafka-bridge-{host}")
    }

    /// librdkafka's `security.protocol` for these settings.
    pub fn security_protocol(&self) -> &'static str {
        match (self.tls.enabled, self.sasl.mechanism.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSetting {
    /// Event-type pattern; `*` matches any run of characters.
    pub event_type: String,
    /// Topic; `kafka.topic` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// JSON pointer to the record key within the envelope.
    pub key: String,
    /// Refuse events without that key (400) instead of publishing them without a key.
    #[serde(default)]
    pub key_required: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadSettings {
    /// How often the settings file, secret files and TLS files are checked for a change,
    /// which reloads as SIGHUP does; 0 is off (SIGHUP only).
    pub watch_interval_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    /// How long an acknowledged event id is remembered; 0 is off.
    pub window_secs: u64,
    /// Most event ids remembered at once in this process.
    pub max_entries: usize,
    /// Where claims on ids live: this process's memory, or a Redis every replica shares.
    pub store: DedupStore,
    /// The shared store: `redis://` or `rediss://` (TLS), `[user[:password]@]host[:port][/db]`;
    /// `redis+sentinel://` (or `rediss+`) `[user[:password]@]host:port[,host:port...]/<master>[/db]`
    /// for the sentinels of a master; `redis+cluster://` (or `rediss+`)
    /// `[user[:password]@]host:port[,host:port...]` for a cluster's seed nodes.
    pub redis_url: RedisUrl,
    /// The Redis password, when it is not in the URL.
    pub redis_password: Secret,
    /// A file holding the Redis password (one line), instead of `redis_password`.
    pub redis_password_file: PathBuf,
    /// The sentinels' own password, for a Sentinel setup that requires one.
    pub redis_sentinel_password: Secret,
    /// A file holding it (one line), instead.
    pub redis_sentinel_password_file: PathBuf,
    /// Prefix of the keys the bridge writes in Redis.
    pub key_prefix: String,
    /// Longest a Redis command may take before it counts as a store error (and is tried
    /// again).
    pub redis_timeout_ms: u64,
    /// The store is marked down when no command has succeeded for this long.
    pub redis_down_after_ms: u64,
    /// What a delivery gets while the shared store cannot be used: `local` (claims in this
    /// process's memory only) or `refuse` (503).
    pub on_store_error: OnStoreError,
}

/// Where duplicate claims live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupStore {
    Memory,
    Redis,
}

/// What a delivery gets while the shared store cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Claims in this process's memory only: nothing refused, duplicates across replicas
    /// possible meanwhile.
    Local,
    /// Answer 503: no delivery without the shared claim.
    Refuse,
}

/// A Redis URL. Its password, if it holds one, never appears in `Debug` output, logs or the
/// settings `check-config` prints.
#[derive(Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> Self {
        RedisUrl(url.into())
    }

    /// The URL, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when the URL carries a password.
    pub fn has_password(&self) -> bool {
        self.shown() != self.0
    }

    /// The URL without its password: `redis://user@host`.
    pub fn shown(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return self.0.clone();
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                let user = if user.is_empty() {
                    String::new()
                } else {
                    format!("{user}@")
                };
                format!("{scheme}://{user}{host}{path}")
            }
            None => self.0.clone(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shown())
    }
}

/// How a delivery is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// The sender's own: `t=<unix seconds>,s=<hex HMAC-SHA256 of "<t>.<body>">`.
    Tamio,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature` headers,
    /// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`, `whsec_` secrets.
    StandardWebhooks,
    /// A bare HMAC-SHA256 of the body in one header, hex or base64.
    HmacSha256,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tamio => "tamio",
            Scheme::StandardWebhooks => "standard-webhooks",
            Scheme::HmacSha256 => "hmac-sha256",
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Scheme::Tamio, Scheme::StandardWebhooks, Scheme::HmacSha256]
            .into_iter()
            .find(|scheme| scheme.as_str() == s)
            .ok_or_else(|| "expected tamio, standard-webhooks or hmac-sha256".to_owned())
    }
}

impl std::str::FromStr for MacEncoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hex" => Ok(MacEncoding::Hex),
            "base64" => Ok(MacEncoding::Base64),
            _ => Err("expected hex or base64".to_owned()),
        }
    }
}

/// How the `hmac-sha256` scheme writes its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MacEncoding {
    Hex,
    Base64,
}

#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// The scheme of `secrets`, and of endpoints that do not name their own.
    pub scheme: Scheme,
    /// Header that carries the signature (schemes `tamio` and `hmac-sha256`).
    pub header: String,
    /// Encoding of the MAC (scheme `hmac-sha256`).
    pub encoding: MacEncoding,
    /// Secrets accepted for every endpoint.
    #[serde(default, serialize_with = "no_secrets")]
    pub secrets: Vec<Secret>,
    /// Files holding secrets accepted for every endpoint, one per line; re-read on SIGHUP.
    #[serde(default)]
    pub secret_files: Vec<PathBuf>,
    /// Largest accepted distance between the signature's timestamp and now.
    pub tolerance_secs: u64,
    /// With no secret configured, accept deliveries without checking any signature.
    pub allow_unsigned: bool,
    /// Secrets for single endpoints, keyed by `endpoint_id`.
    #[serde(default, serialize_with = "sorted")]
    pub endpoints: HashMap<String, Endpoint>,
}

#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// This endpoint's scheme; `signature.scheme` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// This endpoint's signature header; `signature.header` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// This endpoint's MAC encoding; `signature.encoding` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<MacEncoding>,
    /// Secrets accepted for this endpoint (besides `signature.secrets`).
    #[serde(default, serialize_with = "no_secrets")]
    pub secrets: Vec<Secret>,
    /// Files holding this endpoint's secrets, one per line; re-read on SIGHUP.
    #[serde(default)]
    pub secret_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// "text" or "json".
    pub format: LogFormat,
    /// tracing EnvFilter directives.
    pub level: String,
}

/// Traces of deliveries (OpenTelemetry, OTLP over HTTP/protobuf). The standard `OTEL_*`
/// variables win over these when set.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's base URL (`/v1/traces` is appended); empty exports nothing
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is).
    pub endpoint: String,
    /// Headers sent with each export, e.g. an API key (`OTEL_EXPORTER_OTLP_HEADERS`); their
    /// values are redacted everywhere.
    #[serde(serialize_with = "redacted_values")]
    pub headers: BTreeMap<String, String>,
    /// `service.name` of the spans (`OTEL_SERVICE_NAME`).
    pub service_name: String,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    /// `parentbased_always_off` or `parentbased_traceidratio` (`OTEL_TRACES_SAMPLER`).
    pub sampler: String,
    /// The ratio of the `traceidratio` samplers, 0 to 1 (`OTEL_TRACES_SAMPLER_ARG`).
    pub sampler_arg: String,
    /// Spans waiting for export at most; beyond, new ones are dropped and counted.
    pub max_queue_spans: usize,
    /// Bytes of spans waiting for export or being exported at most; beyond, new ones are
    /// dropped and counted. Spans of refused requests take at most half.
    pub max_queue_bytes: usize,
    /// Longest one export may take before its spans count as dropped.
    pub export_timeout_ms: u64,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("service_name", &self.service_name)
            .field("sampler", &self.sampler)
            .field("sampler_arg", &self.sampler_arg)
            .field("max_queue_spans", &self.max_queue_spans)
            .field("max_queue_bytes", &self.max_queue_bytes)
            .field("export_timeout_ms", &self.export_timeout_ms)
            .finish()
    }
}

fn redacted_values<S: Serializer>(
    headers: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(headers.keys().map(|k| (k, "[redacted]")))
}

/// A signing secret. Its bytes never appear in `Debug` output, logs, error messages or the
/// settings printed by `check-config` (where it is an empty string).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("")
    }
}

/// Secret lists are printed empty: a printed placeholder would be a secret once pasted.
fn no_secrets<S: Serializer>(_: &[Secret], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(std::iter::empty::<&str>())
}

/// The pass-through options without those whose values are credentials.
fn shown_options<S: Serializer>(
    options: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        options
            .iter()
            .filter(|(k, v)| shown_value(k, v) == v.as_str()),
    )
}

/// Endpoints in the order of their ids.
fn sorted<S: Serializer, V: Serialize>(map: &HashMap<String, V>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().collect::<BTreeMap<_, _>>())
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret's bytes, for keying the HMAC.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Parts of librdkafka option names whose values are credentials.
const SECRET_OPTION_PARTS: &[&str] = &[
    "password",
    "secret",
    "pem",
    "key",
    "oauthbearer",
    "jaas",
    "token",
];

/// `value`, or `[redacted]` when `key` names a credential.
pub fn shown_value<'a>(key: &str, value: &'a str) -> &'a str {
    if SECRET_OPTION_PARTS.iter().any(|part| key.contains(part)) {
        "[redacted]"
    } else {
        value
    }
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let librdkafka: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(k, v)| (k.as_str(), shown_value(k, v)))
            .collect();
        let sasl = self.sasl.mechanism.map(|m| {
            (
                m.as_str(),
                self.sasl.username.as_str(),
                if self.sasl.password_file.as_os_str().is_empty() {
                    "password [redacted]".to_owned()
                } else {
                    format!("password_file {}", self.sasl.password_file.display())
                },
            )
        });
        f.debug_struct("Kafka")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol())
            .field("tls_ca_file", &self.tls.ca_file)
            .field("tls_cert_file", &self.tls.cert_file)
            .field("tls_key_file", &self.tls.key_file)
            .field("sasl", &sasl)
            .field("topic", &self.topic)
            .field("delivery_timeout_ms", &self.delivery_timeout_ms)
            .field("readiness_interval_ms", &self.readiness_interval_ms)
            .field("readiness_timeout_ms", &self.readiness_timeout_ms)
            .field("flush_timeout_ms", &self.flush_timeout_ms)
            .field("queue_max_messages", &self.queue_max_messages)
            .field("queue_max_kbytes", &self.queue_max_kbytes)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("cloudevents", &self.cloudevents)
            .field("exactly_once", &self.exactly_once)
            .field("transactional_id", &self.transactional_id)
            .field("transaction_linger_ms", &self.transaction_linger_ms)
            .field("librdkafka", &librdkafka)
            .finish()
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut endpoints: Vec<(&String, usize)> = self
            .endpoints
            .iter()
            .map(|(id, e)| (id, e.secrets.len()))
            .collect();
        endpoints.sort();
        f.debug_struct("Signature")
            .field("scheme", &self.scheme)
            .field("header", &self.header)
            .field("encoding", &self.encoding)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("secret_files", &self.secret_files)
            .field("tolerance_secs", &self.tolerance_secs)
            .field("allow_unsigned", &self.allow_unsigned)
            .field("endpoints", &endpoints)
            .finish()
    }
}

/// Reads a file of secrets: one per line, surrounding whitespace and blank lines ignored
/// (Kubernetes mounts a Secret's key as such a file). The error never quotes the content.
fn read_secrets(path: &Path) -> Result<Vec<Secret>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let secrets: Vec<Secret> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(Secret::new)
        .collect();
    if secrets.is_empty() {
        return Err(format!("{} holds no secret", path.display()));
    }
    Ok(secrets)
}

/// Reads a password from `file`, when it is set, into `password`, which must be empty:
/// `settings` names the two (the inline setting, the file's).
fn read_password_file(
    password: &mut Secret,
    file: &Path,
    settings: (&'static str, &'static str),
) -> Result<(), SettingsError> {
    let (inline, key) = settings;
    if file.as_os_str().is_empty() {
        return Ok(());
    }
    if !password.expose().is_empty() {
        return Err(invalid(
            key,
            format!("set either {inline} or {key}, not both"),
        ));
    }
    let mut read = read_secrets(file).map_err(|r| invalid(key, r))?;
    if read.len() != 1 {
        return Err(invalid(
            key,
            format!("{} must hold one line", file.display()),
        ));
    }
    *password = read.remove(0);
    Ok(())
}

/// Checks that `path` is a readable PEM file holding a `-----BEGIN ...{label}-----` block.
pub fn check_pem_file(path: &Path, label: &str) -> Result<(), String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&text);
    let found = text.lines().any(|l| {
        let l = l.trim();
        l.starts_with("-----BEGIN ") && l.ends_with(&format!("{label}-----"))
    });
    if found {
        Ok(())
    } else {
        Err(format!("{} holds no PEM `{label}` block", path.display()))
    }
}

/// A settings error's text without the values it quotes: a TOML parse error shows the
/// offending line and a type error the offending string, either of which may be a secret.
/// What remains names the file, the line and column, the key and the kind of mistake.
fn scrub(message: &str) -> String {
    let mut out = Vec::new();
    for line in message.lines() {
        let trimmed = line.trim_start();
        // The source excerpt and its caret line: `3 | secrets = [...`, `  |     ^`.
        let excerpt = trimmed
            .split_once('|')
            .is_some_and(|(gutter, _)| gutter.trim().chars().all(|c| c.is_ascii_digit()));
        if excerpt {
            continue;
        }
        out.push(redact_quoted(line));
    }
    out.join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Replaces what follows `string "` / `str "` up to the closing quote with `[redacted]`.
fn redact_quoted(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = ["string \"", "str \"", "string `", "str `"]
        .iter()
        .filter_map(|marker| rest.find(marker).map(|i| (i, marker.len())))
        .min()
    {
        let (start, len) = at;
        let quote = rest.as_bytes()[start + len - 1] as char;
        out.push_str(&rest[..start + len]);
        let after = &rest[start + len..];
        match after.find(quote) {
            Some(end) => {
                out.push_str("[redacted]");
                out.push(quote);
                rest = &after[end + 1..];
            }
            None => {
                out.push_str("[redacted]");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Why the settings could not be used. The message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The sources could not be read or do not fit the types; the text is scrubbed of the
    /// values it quoted (see [`scrub`]), and carries no source error that would not be.
    #[error("cannot load settings: {0}")]
    Load(String),
    #[error("setting `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

pub const TOPIC_RULE: &str = "a Kafka topic name has 1 to 249 of the characters a-z A-Z 0-9 . _ -";

pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The first of `checks` whose value is 0, refused as "must be above 0".
fn above_zero(checks: &[(&'static str, u64)]) -> Result<(), SettingsError> {
    match checks.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(invalid(key, "must be above 0")),
        None => Ok(()),
    }
}

pub fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Settings {
    /// Loads the defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let mut env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        // Split here rather than by config-rs, whose list parsing would first turn a secret
        // such as `12345678` or `true` into a number or a boolean.
        let env_secrets = env.remove(SECRETS_ENV);
        let env_secret_files = env.remove(SECRET_FILES_ENV);
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        if let Some(list) = env_secrets {
            settings.signature.secrets = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect();
        }
        if let Some(list) = env_secret_files {
            settings.signature.secret_files = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
        }
        settings.read_secret_files()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Adds the secrets of every `secret_files` entry to the matching `secrets` list, and
    /// reads `kafka.sasl.password_file`. Errors name the setting and the file, never a
    /// file's content.
    fn read_secret_files(&mut self) -> Result<(), SettingsError> {
        let sig = &mut self.signature;
        for path in &sig.secret_files {
            sig.secrets
                .extend(read_secrets(path).map_err(|r| invalid("signature.secret_files", r))?);
        }
        for (id, endpoint) in &mut sig.endpoints {
            for path in &endpoint.secret_files {
                let read = read_secrets(path).map_err(|r| SettingsError::Invalid {
                    key: "signature.endpoints",
                    reason: format!("endpoint `{id}`: secret_files: {r}"),
                })?;
                endpoint.secrets.extend(read);
            }
        }
        let dedup = &mut self.dedup;
        read_password_file(
            &mut dedup.redis_password,
            &dedup.redis_password_file,
            ("dedup.redis_password", "dedup.redis_password_file"),
        )?;
        read_password_file(
            &mut dedup.redis_sentinel_password,
            &dedup.redis_sentinel_password_file,
            (
                "dedup.redis_sentinel_password",
                "dedup.redis_sentinel_password_file",
            ),
        )?;
        let sasl = &mut self.kafka.sasl;
        read_password_file(
            &mut sasl.password,
            &sasl.password_file,
            ("kafka.sasl.password", "kafka.sasl.password_file"),
        )?;
        Ok(())
    }

    /// Checks that cannot be expressed in the types.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.validate_server()?;
        self.validate_kafka()?;
        if self.routes.is_empty() {
            return Err(invalid("routes", "at least one route is needed"));
        }
        self.validate_signature()?;
        self.validate_dedup()?;
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), SettingsError> {
        let s = &self.server;
        if !s.path.starts_with('/') {
            return Err(invalid("server.path", "must start with `/`"));
        }
        above_zero(&[
            ("server.max_body_bytes", s.max_body_bytes as u64),
            ("server.request_timeout_ms", s.request_timeout_ms),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            (
                "server.http2_max_concurrent_streams",
                u64::from(s.http2_max_concurrent_streams),
            ),
            (
                "server.http2_keepalive_timeout_ms",
                s.http2_keepalive_timeout_ms,
            ),
            ("server.max_in_flight", s.max_in_flight as u64),
            ("server.max_connections", s.max_connections as u64),
            ("server.write_timeout_ms", s.write_timeout_ms),
        ])?;
        if s.max_header_bytes < 8192 {
            return Err(invalid(
                "server.max_header_bytes",
                "must be at least 8192 (HTTP/1's smallest read buffer)",
            ));
        }
        if s.body_memory_bytes < s.max_body_bytes {
            return Err(invalid(
                "server.body_memory_bytes",
                "must be at least server.max_body_bytes, or the largest body could never be read",
            ));
        }
        if s.listen == self.admin.listen && s.listen.port() != 0 {
            return Err(invalid("admin.listen", "must differ from server.listen"));
        }
        if s.tls() == s.tls_key_file.as_os_str().is_empty() {
            return Err(invalid(
                "server.tls_key_file",
                "server.tls_cert_file and server.tls_key_file are set together or not at all",
            ));
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), SettingsError> {
        let k = &self.kafka;
        if !valid_topic(&k.topic) {
            return Err(invalid("kafka.topic", TOPIC_RULE));
        }
        if k.exactly_once && self.embedded_kafka() {
            return Err(invalid(
                "kafka.exactly_once",
                "needs Kafka brokers (kafka.brokers): the embedded broker has no transactions",
            ));
        }
        if k.exactly_once && (self.dedup.window_secs == 0 || self.dedup.max_entries == 0) {
            return Err(invalid(
                "kafka.exactly_once",
                "needs duplicate suppression (dedup.window_secs and dedup.max_entries above \
                 0): a delivery answered 503 while its transaction committed is answered as a \
                 duplicate on the sender's retry, which without it would be written again",
            ));
        }
        if k.transaction_linger_ms > 1000 {
            return Err(invalid(
                "kafka.transaction_linger_ms",
                "must be at most 1000: every delivery waits for it",
            ));
        }
        if !k.dead_letter_topic.is_empty() {
            if !valid_topic(&k.dead_letter_topic) {
                return Err(invalid("kafka.dead_letter_topic", TOPIC_RULE));
            }
            if k.dead_letter_topic == k.topic {
                return Err(invalid(
                    "kafka.dead_letter_topic",
                    "must differ from kafka.topic",
                ));
            }
        }
        above_zero(&[
            ("kafka.queue_max_messages", u64::from(k.queue_max_messages)),
            ("kafka.queue_max_kbytes", u64::from(k.queue_max_kbytes)),
            ("kafka.delivery_timeout_ms", k.delivery_timeout_ms),
        ])?;
        if k.delivery_timeout_ms >= self.server.request_timeout_ms {
            return Err(invalid(
                "kafka.delivery_timeout_ms",
                format!(
                    "must be below server.request_timeout_ms ({}), so that a failed delivery is \
                     reported to the sender before its request's deadline",
                    self.server.request_timeout_ms
                ),
            ));
        }
        above_zero(&[
            ("kafka.readiness_interval_ms", k.readiness_interval_ms),
            ("kafka.readiness_timeout_ms", k.readiness_timeout_ms),
        ])
    }

    fn validate_signature(&self) -> Result<(), SettingsError> {
        let sig = &self.signature;
        above_zero(&[("signature.tolerance_secs", sig.tolerance_secs)])?;
        if sig.secrets.iter().any(|s| s.expose().is_empty()) {
            return Err(invalid("signature.secrets", "a secret must not be empty"));
        }
        for (id, endpoint) in &sig.endpoints {
            let bad = |reason: &str| SettingsError::Invalid {
                key: "signature.endpoints",
                reason: format!("endpoint `{id}`: {reason}"),
            };
            if id.is_empty() {
                return Err(invalid(
                    "signature.endpoints",
                    "an endpoint id must not be empty",
                ));
            }
            if endpoint.secrets.is_empty() || endpoint.secrets.iter().any(|s| s.expose().is_empty())
            {
                return Err(bad("needs at least one non-empty secret"));
            }
            let scheme = endpoint.scheme.unwrap_or(sig.scheme);
            if scheme == Scheme::StandardWebhooks && endpoint.header.is_some() {
                return Err(bad(
                    "header has no effect with scheme standard-webhooks, whose headers are \
                     webhook-id, webhook-timestamp and webhook-signature",
                ));
            }
            if scheme != Scheme::HmacSha256 && endpoint.encoding.is_some() {
                return Err(bad("encoding applies to scheme hmac-sha256 only"));
            }
        }
        Ok(())
    }

    fn validate_dedup(&self) -> Result<(), SettingsError> {
        let d = &self.dedup;
        above_zero(&[("dedup.redis_timeout_ms", d.redis_timeout_ms)])?;
        if d.redis_down_after_ms < d.redis_timeout_ms {
            return Err(invalid(
                "dedup.redis_down_after_ms",
                "must be at least dedup.redis_timeout_ms: one slow command does not mark the \
                 store down",
            ));
        }
        let has_password = !d.redis_password.expose().is_empty();
        match d.store {
            DedupStore::Redis => {
                let url = d.redis_url.expose();
                let schemes = [
                    "redis://",
                    "rediss://",
                    "redis+sentinel://",
                    "rediss+sentinel://",
                    "redis+cluster://",
                    "rediss+cluster://",
                ];
                if !schemes.iter().any(|s| url.starts_with(s)) {
                    return Err(invalid(
                        "dedup.redis_url",
                        "must be a redis://, rediss://, redis+sentinel:// or redis+cluster:// \
                         URL (rediss+ for TLS) with dedup.store = \"redis\"",
                    ));
                }
                if d.window_secs == 0 || d.max_entries == 0 {
                    return Err(invalid(
                        "dedup.store",
                        "\"redis\" needs duplicate suppression on: dedup.window_secs and \
                         dedup.max_entries above 0",
                    ));
                }
                if d.redis_url.has_password() && has_password {
                    return Err(invalid(
                        "dedup.redis_password",
                        "the password is in dedup.redis_url already: give it once",
                    ));
                }
            }
            DedupStore::Memory if !d.redis_url.is_empty() || has_password => {
                return Err(invalid(
                    "dedup.store",
                    "dedup.redis_url is set but the store is \"memory\": set dedup.store = \"redis\"",
                ));
            }
            DedupStore::Memory => {}
        }
        Ok(())
    }

    /// The dead-letter topic, when one is configured.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        Some(self.kafka.dead_letter_topic.as_str()).filter(|t| !t.is_empty())
    }

    /// True when no broker is configured and the embedded one is to be started.
    pub fn embedded_kafka(&self) -> bool {
        self.kafka.brokers.trim().is_empty()
    }

    /// Refuses settings that would accept unsigned deliveries without saying so: no secret
    /// at all, and `signature.allow_unsigned` not set.
    pub fn check_signing(&self) -> Result<(), SettingsError> {
        if !self.has_secrets() && !self.signature.allow_unsigned {
            return Err(invalid(
                "signature.secrets",
                "no signing secret is configured, and the bridge refuses unsigned deliveries. \
                 Set TAMIO_BRIDGE__SIGNATURE__SECRETS, or signature.secrets, \
                 signature.secret_files or signature.endpoints in the --config file (or, to \
                 accept deliveries without any signature, signature.allow_unsigned = true)",
            ));
        }
        Ok(())
    }

    /// The files a reload reads, besides the `--config` file: secret files and the ingress's
    /// TLS certificate and key.
    pub fn reloadable_files(&self) -> Vec<PathBuf> {
        let sig = &self.signature;
        let mut files: Vec<PathBuf> = sig
            .secret_files
            .iter()
            .chain(sig.endpoints.values().flat_map(|e| &e.secret_files))
            .cloned()
            .collect();
        if self.server.tls() {
            files.push(self.server.tls_cert_file.clone());
            files.push(self.server.tls_key_file.clone());
        }
        files.extend(self.kafka_tls_files());
        files.sort();
        files.dedup();
        files
    }

    /// The files of `kafka.tls` (CA, client certificate and key) set while TLS is on: a
    /// change to their content renews the Kafka clients, which read them when built.
    pub fn kafka_tls_files(&self) -> Vec<PathBuf> {
        let tls = &self.kafka.tls;
        if !tls.enabled {
            return Vec::new();
        }
        [&tls.ca_file, &tls.cert_file, &tls.key_file]
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
            .collect()
    }

    /// True when at least one secret is configured.
    pub fn has_secrets(&self) -> bool {
        !self.signature.secrets.is_empty() || !self.signature.endpoints.is_empty()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.server.path, "/webhooks/tamio");
        assert_eq!(s.admin.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(s.kafka.topic, "tamio.tickets");
        assert_eq!(s.signature.header, "Tamio-Signature");
        assert_eq!(s.signature.tolerance_secs, 300);
        assert!(s.embedded_kafka());
        assert!(!s.has_secrets());
    }

    #[test]
    fn every_section_names_the_setting_it_refuses() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("TAMIO_BRIDGE__SERVER__PATH", "webhooks")], "server.path"),
            (
                &[("TAMIO_BRIDGE__SERVER__IDLE_TIMEOUT_MS", "0")],
                "server.idle_timeout_ms",
            ),
            (
                &[("TAMIO_BRIDGE__SERVER__WRITE_TIMEOUT_MS", "0")],
                "server.write_timeout_ms",
            ),
            (
                &[("TAMIO_BRIDGE__SERVER__MAX_HEADER_BYTES", "100")],
                "server.max_header_bytes",
            ),
            (
                &[("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", "/k.pem")],
                "server.tls_key_file",
            ),
            (
                &[("TAMIO_BRIDGE__SERVER__TLS_CERT_FILE", "/c.pem")],
                "server.tls_key_file",
            ),
            (
                &[("TAMIO_BRIDGE__ADMIN__LISTEN", "0.0.0.0:8080")],
                "admin.listen",
            ),
            (&[("TAMIO_BRIDGE__KAFKA__TOPIC", "a b")], "kafka.topic"),
            (
                &[("TAMIO_BRIDGE__KAFKA__EXACTLY_ONCE", "true")],
                "kafka.exactly_once",
            ),
            (
                &[("TAMIO_BRIDGE__KAFKA__QUEUE_MAX_KBYTES", "0")],
                "kafka.queue_max_kbytes",
            ),
            (
                &[("TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS", "9500")],
                "kafka.delivery_timeout_ms",
            ),
            (
                &[("TAMIO_BRIDGE__KAFKA__READINESS_TIMEOUT_MS", "0")],
                "kafka.readiness_timeout_ms",
            ),
            (
                &[("TAMIO_BRIDGE__SIGNATURE__TOLERANCE_SECS", "0")],
                "signature.tolerance_secs",
            ),
            (
                &[("TAMIO_BRIDGE__DEDUP__REDIS_TIMEOUT_MS", "0")],
                "dedup.redis_timeout_ms",
            ),
            (
                &[("TAMIO_BRIDGE__DEDUP__REDIS_URL", "redis://h:1")],
                "dedup.store",
            ),
            (
                &[("TAMIO_BRIDGE__DEDUP__STORE", "redis")],
                "dedup.redis_url",
            ),
            (&[("TAMIO_BRIDGE__LOG__LEVEL", " ")], "log.level"),
        ];
        for (pairs, key) in cases {
            match Settings::load_from(None, env(pairs)) {
                Err(SettingsError::Invalid { key: refused, .. }) => {
                    assert_eq!(refused, *key, "{pairs:?}")
                }
                other => panic!("{pairs:?}: expected {key} refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn environment_overrides_and_splits_secret_lists() {
        let s = Settings::load_from(
            None,
            env(&[
                ("TAMIO_BRIDGE__KAFKA__BROKERS", "127.0.0.1:9092"),
                (
                    "TAMIO_BRIDGE__SIGNATURE__SECRETS",
                    "old-secret,new-secret,12345",
                ),
                ("TAMIO_BRIDGE__SERVER__MAX_BODY_BYTES", "2048"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(
            s.signature.secrets,
            vec![
                Secret::new("old-secret"),
                Secret::new("new-secret"),
                Secret::new("12345")
            ]
        );
        assert_eq!(s.server.max_body_bytes, 2048);
    }

    #[test]
    fn a_single_secret_that_looks_like_a_number_stays_a_secret() {
        for value in ["12345678", "true", "1e9", "nan"] {
            let s = Settings::load_from(None, env(&[("TAMIO_BRIDGE__SIGNATURE__SECRETS", value)]))
                .unwrap();
            assert_eq!(s.signature.secrets, vec![Secret::new(value)]);
        }
        let s = Settings::load_from(None, env(&[("TAMIO_BRIDGE__KAFKA__CLOUDEVENTS", "false")]))
            .unwrap();
        assert!(
            !s.kafka.cloudevents,
            "booleans still come from the environment"
        );
    }

    #[test]
    fn file_layers_over_defaults_with_endpoint_secrets() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            r#"
[kafka]
brokers = "b1:9092,b2:9092"
[kafka.librdkafka]
"linger.ms" = "20"
[signature.endpoints."9ab698f5-99de-4ff6-8bfc-a7dcb973d177"]
secrets = ["Endpoint-Secret"]
"#
        )
        .unwrap();
        let path = f.path().with_extension("toml");
        std::fs::copy(f.path(), &path).unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.kafka.brokers, "b1:9092,b2:9092");
        assert_eq!(
            s.kafka.librdkafka.get("linger.ms").map(String::as_str),
            Some("20")
        );
        let endpoint = &s.signature.endpoints["9ab698f5-99de-4ff6-8bfc-a7dcb973d177"];
        assert_eq!(endpoint.secrets, vec![Secret::new("Endpoint-Secret")]);
        assert_eq!(s.server.path, "/webhooks/tamio", "defaults stay underneath");
    }

    #[test]
    fn bad_settings_name_the_key() {
        let cases = [
            (
                "TAMIO_BRIDGE__SERVER__LISTEN",
                "not-an-address",
                "server.listen",
            ),
            ("TAMIO_BRIDGE__SERVER__PATH", "webhooks", "server.path"),
            ("TAMIO_BRIDGE__KAFKA__TOPIC", "bad topic!", "kafka.topic"),
            (
                "TAMIO_BRIDGE__KAFKA__DELIVERY_TIMEOUT_MS",
                "60000",
                "kafka.delivery_timeout_ms",
            ),
            ("TAMIO_BRIDGE__LOG__FORMAT", "xml", "log.format"),
            ("TAMIO_BRIDGE__SERVER__NO_SUCH_KEY", "1", "no_such_key"),
        ];
        for (key, value, named) in cases {
            let err = Settings::load_from(None, env(&[(key, value)])).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(named),
                "{key}={value}: `{msg}` should name `{named}`"
            );
        }
    }

    fn load_file(text: &str) -> Result<Settings, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load_from(Some(&path), env(&[]))
    }

    #[test]
    fn routes_from_a_file_replace_the_default_ones() {
        let s = load_file(
            r#"
[[routes]]
event_type = "whitelabel_ticket_*"
key = "/data/ticket/id"
key_required = true

[[routes]]
event_type = "*"
topic = "tamio.events"
key = "/event_id"
"#,
        )
        .unwrap();
        assert_eq!(s.routes.len(), 2);
        assert_eq!(s.routes[1].topic.as_deref(), Some("tamio.events"));
        assert!(!s.routes[1].key_required);
        let defaults = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(defaults.routes.len(), 1);
        assert_eq!(defaults.routes[0].key, "/data/ticket/id");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut s = Settings::load_from(
            None,
            env(&[("TAMIO_BRIDGE__SIGNATURE__SECRETS", "hunter2-very-secret")]),
        )
        .unwrap();
        s.kafka
            .librdkafka
            .insert("sasl.password".into(), "hunter2-kafka".into());
        s.kafka
            .librdkafka
            .insert("ssl.key.pem".into(), "hunter2-pem".into());
        s.kafka.librdkafka.insert("linger.ms".into(), "7".into());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("1 redacted"), "{shown}");
        assert!(shown.contains("\"linger.ms\": \"7\""), "{shown}");
    }

    #[test]
    fn secret_files_hold_one_secret_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let global = dir.path().join("global");
        let endpoint = dir.path().join("endpoint");
        std::fs::write(&global, "  first-secret \n\nsecond-secret\n").unwrap();
        std::fs::write(&endpoint, "endpoint-secret").unwrap();
        let s = load_file(&format!(
            "[signature]\nsecrets = ['inline']\nsecret_files = ['{}']\n\
             [signature.endpoints.ep-1]\nsecret_files = ['{}']\n",
            global.display(),
            endpoint.display()
        ))
        .unwrap();
        assert_eq!(
            s.signature.secrets,
            vec![
                Secret::new("inline"),
                Secret::new("first-secret"),
                Secret::new("second-secret")
            ]
        );
        assert_eq!(
            s.signature.endpoints["ep-1"].secrets,
            vec![Secret::new("endpoint-secret")]
        );
        assert!(s.has_secrets());

        let env_files = Settings::load_from(
            None,
            env(&[(
                "TAMIO_BRIDGE__SIGNATURE__SECRET_FILES",
                &format!("{},{}", global.display(), endpoint.display()),
            )]),
        )
        .unwrap();
        assert_eq!(env_files.signature.secrets.len(), 3);

        let blank = dir.path().join("blank");
        std::fs::write(&blank, "\n  \n").unwrap();
        for (file, says) in [
            (&blank, "holds no secret"),
            (&dir.path().join("nope"), "cannot read"),
        ] {
            let err = load_file(&format!(
                "[signature]\nsecret_files = ['{}']\n",
                file.display()
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("signature.secret_files") && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn no_secret_is_refused_unless_unsigned_is_allowed() {
        let none = Settings::load_from(None, env(&[])).unwrap();
        let err = none.check_signing().unwrap_err().to_string();
        assert!(
            err.contains("signature.secrets") && err.contains("allow_unsigned"),
            "{err}"
        );
        let allowed = Settings::load_from(
            None,
            env(&[("TAMIO_BRIDGE__SIGNATURE__ALLOW_UNSIGNED", "true")]),
        )
        .unwrap();
        assert!(allowed.check_signing().is_ok());
    }

    #[test]
    fn kafka_password_file_is_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2-from-file\n").unwrap();
        let s = load_file(&format!(
            "[kafka.sasl]\nmechanism = 'SCRAM-SHA-512'\nusername = 'u'\npassword_file = '{}'\n",
            file.display()
        ))
        .unwrap();
        assert_eq!(s.kafka.sasl.password, Secret::new("hunter2-from-file"));
        assert!(!format!("{s:?}").contains("hunter2"));
        let err = load_file(&format!(
            "[kafka.sasl]\nmechanism = 'PLAIN'\nusername = 'u'\npassword = 'x'\npassword_file = '{}'\n",
            file.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("kafka.sasl.password_file"), "{err}");
    }

    #[test]
    fn load_errors_never_quote_a_value() {
        for text in [
            "[signature]\nsecrets = [\"hunter2-leak\"\n",
            "[signature]\nsecrets = \"hunter2-leak\"\n",
            "[signature]\nsecrets = [\"hunter2-leak\"]]\n",
            "[signature.endpoints.ep-1]\nsecrets = \"hunter2-leak\"\n",
        ] {
            let err = load_file(text).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{text:?}: {err}");
            assert!(err.contains("cannot load settings"), "{err}");
        }
        let err = Settings::load_from(
            None,
            env(&[(
                "TAMIO_BRIDGE__SIGNATURE__ENDPOINTS__EP__SECRETS",
                "hunter2-leak",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            redact_quoted(r#"invalid type: string "x", expected a sequence for key `a`"#),
            r#"invalid type: string "[redacted]", expected a sequence for key `a`"#
        );
    }
}
