//! Signature verification on the raw body, before anything parses it.
//!
//! Three schemes, chosen in settings for all endpoints and per endpoint (an endpoint is
//! found by the body's `endpoint_id`):
//! - `tamio`, the sender's own: the header (`signature.header`, default `Tamio-Signature`)
//!   holds `t=<unix seconds>,s=<hex HMAC-SHA256>`; the MAC covers `<t>.<raw body>`.
//! - `standard-webhooks`: `webhook-id`, `webhook-timestamp` and `webhook-signature`
//!   (space-separated `v1,<base64 MAC>` entries); the MAC covers `<id>.<timestamp>.<raw body>`
//!   and is keyed by the base64-decoded part of a `whsec_` secret.
//! - `hmac-sha256`: one header holding the MAC of the raw body, hex or base64, optionally
//!   prefixed `sha256=`. It carries no timestamp: replays are stopped by duplicate
//!   suppression only.
//!
//! Every secret of the scheme may match (rotation), MACs are compared in constant time, and
//! only [`Verifier::verify`] makes a [`VerifiedBody`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{invalid, MacEncoding, Scheme, Secret, SettingsError, Signature};
pub use crate::publish::record::Proof;
use crate::publish::record::{WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP};

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery's signature was refused. Never carries a secret or a MAC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the {0} header is missing")]
    Missing(String),
    #[error("the {header} header is malformed: {reason}")]
    Malformed {
        header: String,
        reason: &'static str,
    },
    #[error("the signature timestamp is {skew_secs} s away from now, beyond the tolerance of {tolerance_secs} s")]
    Stale { skew_secs: i64, tolerance_secs: u64 },
    #[error("the signature does not match the body with any configured secret")]
    Mismatch,
    /// Worded as a mismatch: an unsigned caller must not learn which endpoint ids exist.
    #[error("the signature does not match the body with any configured secret")]
    UnknownEndpoint,
    /// Any of the above, with one wording for all: where endpoints have secrets (and schemes)
    /// of their own, the detail would tell an unsigned caller which endpoint ids exist and
    /// how each signs. The reason still reaches metrics and logs.
    #[error(
        "the signature headers are missing or malformed, the timestamp is outside the \
         tolerance, or the signature does not match the body with any configured secret"
    )]
    Undisclosed(SignatureFailure),
}

/// Why a signature was refused: the `reason` label of the signature-failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFailure {
    Missing,
    Malformed,
    Stale,
    Mismatch,
    UnknownEndpoint,
}

impl SignatureFailure {
    pub const ALL: [SignatureFailure; 5] = [
        SignatureFailure::Missing,
        SignatureFailure::Malformed,
        SignatureFailure::Stale,
        SignatureFailure::Mismatch,
        SignatureFailure::UnknownEndpoint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SignatureFailure::Missing => "missing",
            SignatureFailure::Malformed => "malformed",
            SignatureFailure::Stale => "stale",
            SignatureFailure::Mismatch => "mismatch",
            SignatureFailure::UnknownEndpoint => "unknown_endpoint",
        }
    }
}

impl VerifyError {
    /// What kind of failure this is, whatever the answer discloses.
    pub fn reason(&self) -> SignatureFailure {
        match self {
            VerifyError::Missing(_) => SignatureFailure::Missing,
            VerifyError::Malformed { .. } => SignatureFailure::Malformed,
            VerifyError::Stale { .. } => SignatureFailure::Stale,
            VerifyError::Mismatch => SignatureFailure::Mismatch,
            VerifyError::UnknownEndpoint => SignatureFailure::UnknownEndpoint,
            VerifyError::Undisclosed(reason) => *reason,
        }
    }

    /// How far the check got: when several schemes apply, the furthest failure is reported.
    fn progress(&self) -> u8 {
        match self {
            VerifyError::UnknownEndpoint | VerifyError::Undisclosed(_) => 0,
            VerifyError::Missing(_) => 1,
            VerifyError::Malformed { .. } => 2,
            VerifyError::Stale { .. } => 3,
            VerifyError::Mismatch => 4,
        }
    }
}

/// A body whose signature matched a configured secret (or, with `allow_unsigned` and no
/// secret, any body), with what the signature said.
pub struct VerifiedBody {
    bytes: Bytes,
    signed_at: Option<i64>,
    received_at: SystemTime,
    scheme: Option<Scheme>,
    proof: Proof,
}

/// The most MACs one signature header may offer (one per secret the sender signs with).
pub const MAX_MACS: usize = 16;

/// The candidate MACs of a signature header, without a heap allocation.
#[derive(Clone, PartialEq, Eq)]
pub struct Macs {
    macs: [[u8; 32]; MAX_MACS],
    len: usize,
}

impl Macs {
    fn new() -> Macs {
        Macs {
            macs: [[0; 32]; MAX_MACS],
            len: 0,
        }
    }

    fn push(&mut self, mac: [u8; 32]) -> Result<(), &'static str> {
        let slot = self
            .macs
            .get_mut(self.len)
            .ok_or("more than 16 signatures")?;
        *slot = mac;
        self.len += 1;
        Ok(())
    }
}

impl std::ops::Deref for Macs {
    type Target = [[u8; 32]];

    fn deref(&self) -> &[[u8; 32]] {
        &self.macs[..self.len]
    }
}

impl fmt::Debug for Macs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Macs({})", self.len)
    }
}

impl VerifiedBody {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Unix seconds the sender signed the delivery at, for schemes with a timestamp.
    pub fn signed_at(&self) -> Option<i64> {
        self.signed_at
    }

    /// When the bridge received the delivery.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// The scheme whose signature matched; None when deliveries are accepted unsigned.
    pub fn scheme(&self) -> Option<Scheme> {
        self.scheme
    }

    /// Which request headers carried the signature, for the record to carry them.
    pub fn proof(&self) -> &Proof {
        &self.proof
    }

    /// How late the sender delivered: receipt minus the signature's timestamp, at least 0.
    pub fn sender_delay_secs(&self) -> Option<i64> {
        self.signed_at
            .map(|t| unix_secs(self.received_at).saturating_sub(t).max(0))
    }
}

/// The parsed signature header: the timestamp as sent and the candidate MACs.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub timestamp_text: &'a str,
    pub timestamp: i64,
    pub macs: Macs,
}

/// Parses unix seconds: 1 to 12 ASCII digits.
fn parse_unix_secs(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses `t=<unix seconds>,s=<hex>`; several `s=` entries are allowed (the sender may sign
/// with an old and a new secret at once), unknown keys are ignored.
pub fn parse_header(value: &str) -> Result<SignatureHeader<'_>, &'static str> {
    let mut timestamp = None;
    let mut macs = Macs::new();
    let mut skipped = false;
    for part in value.split(',') {
        let part = part.trim();
        let Some((key, val)) = part.split_once('=') else {
            return Err("expected comma-separated key=value pairs");
        };
        match key.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err("more than one t= entry");
                }
                let val = val.trim();
                let secs = parse_unix_secs(val).ok_or("t= must be unix seconds")?;
                timestamp = Some((val, secs));
            }
            "s" => {
                // An entry that is no HMAC-SHA256 (another algorithm, say) cannot match; it is
                // skipped, and only a header without any usable entry is malformed.
                let mut mac = [0u8; 32];
                if hex::decode_to_slice(val.trim(), &mut mac).is_ok() {
                    macs.push(mac)?;
                } else {
                    skipped = true;
                }
            }
            _ => {}
        }
    }
    let (timestamp_text, timestamp) = timestamp.ok_or("no t= entry")?;
    if macs.is_empty() {
        return Err(if skipped {
            "s= must be 64 hex digits (HMAC-SHA256)"
        } else {
            "no s= entry"
        });
    }
    Ok(SignatureHeader {
        timestamp_text,
        timestamp,
        macs,
    })
}

/// Parses a `webhook-signature` value: space-separated `<version>,<base64>` entries, of which
/// the `v1` ones (HMAC-SHA256) count; other versions are ignored.
pub fn parse_standard_signatures(value: &str) -> Result<Macs, &'static str> {
    let mut macs = Macs::new();
    let mut skipped = false;
    for entry in value.split(' ').filter(|e| !e.is_empty()) {
        let Some((version, mac)) = entry.split_once(',') else {
            return Err("expected space-separated v1,<base64> entries");
        };
        if version != "v1" {
            continue;
        }
        // As the reference libraries do, an entry that cannot be a MAC cannot match; only a
        // header without any usable one is malformed.
        match decode_base64_mac(mac) {
            Some(mac) => macs.push(mac)?,
            None => skipped = true,
        }
    }
    if macs.is_empty() {
        return Err(if skipped {
            "a v1 entry is not base64 of 32 bytes"
        } else {
            "no v1,<base64> entry"
        });
    }
    Ok(macs)
}

fn decode_base64_mac(text: &str) -> Option<[u8; 32]> {
    let mut mac = [0u8; 32];
    // 32 bytes are 44 base64 characters; a longer text cannot be one MAC.
    if text.len() > 44 {
        return None;
    }
    let mut buf = [0u8; 33];
    match BASE64.decode_slice(text, &mut buf) {
        Ok(32) => {
            mac.copy_from_slice(&buf[..32]);
            Some(mac)
        }
        _ => None,
    }
}

/// Parses the header of the `hmac-sha256` scheme: the MAC, optionally prefixed `sha256=`.
pub fn parse_plain_mac(value: &str, encoding: MacEncoding) -> Result<[u8; 32], &'static str> {
    let text = value.trim();
    let text = text.strip_prefix("sha256=").unwrap_or(text);
    match encoding {
        MacEncoding::Hex => {
            let mut mac = [0u8; 32];
            hex::decode_to_slice(text, &mut mac)
                .map_err(|_| "expected 64 hex digits (HMAC-SHA256)")?;
            Ok(mac)
        }
        MacEncoding::Base64 => {
            decode_base64_mac(text).ok_or("expected base64 of 32 bytes (HMAC-SHA256)")
        }
    }
}

/// The key bytes of a Standard Webhooks secret: base64 after the `whsec_` prefix.
pub fn standard_webhooks_key(secret: &[u8]) -> Result<Vec<u8>, &'static str> {
    let encoded = secret
        .strip_prefix(b"whsec_")
        .ok_or("a standard-webhooks secret starts with `whsec_`")?;
    match BASE64.decode(encoded) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err("a standard-webhooks secret is `whsec_` followed by base64"),
    }
}

/// HMAC-SHA256 keyed with `key`, of any length: a key longer than SHA-256's 64-byte block
/// is hashed first and a shorter one padded with zeros (RFC 2104), which is what makes every
/// key valid.
fn keyed(key: &[u8]) -> HmacSha256 {
    use hmac::digest::KeyInit;
    use sha2::Digest;
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <HmacSha256 as KeyInit>::new(&block.into())
}

#[cfg(test)]
thread_local! {
    /// MACs computed on this thread, for the tests of constant work.
    static MACS_COMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn mac_with(key: &HmacSha256, parts: &[&[u8]]) -> [u8; 32] {
    #[cfg(test)]
    MACS_COMPUTED.with(|n| n.set(n.get() + 1));
    let mut mac = key.clone();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn mac_of(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac_with(&keyed(key), parts)
}

/// Computes the hex signature of `body` at `timestamp` with `secret`: what the sender puts
/// after `s=`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    hex::encode(mac_of(
        secret,
        &[timestamp.to_string().as_bytes(), b".", body],
    ))
}

/// The header value for `body` signed at `timestamp` with `secret`.
pub fn header_value(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},s={}", sign(secret, timestamp, body))
}

/// The `webhook-signature` value (`v1,<base64>`) of a Standard Webhooks delivery.
pub fn standard_webhooks_signature(
    secret: &[u8],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, &'static str> {
    let key = standard_webhooks_key(secret)?;
    let mac = mac_of(
        &key,
        &[
            id.as_bytes(),
            b".",
            timestamp.to_string().as_bytes(),
            b".",
            body,
        ],
    );
    Ok(format!("v1,{}", BASE64.encode(mac)))
}

/// The `hmac-sha256` scheme's header value: the MAC of `body`, hex or base64.
pub fn plain_mac(secret: &[u8], body: &[u8], encoding: MacEncoding) -> String {
    let mac = mac_of(secret, &[body]);
    match encoding {
        MacEncoding::Hex => hex::encode(mac),
        MacEncoding::Base64 => BASE64.encode(mac),
    }
}

/// An HMAC keyed with one secret (its key schedule done once); never shown.
struct Key(HmacSha256);

/// One scheme with the secrets that may sign under it.
struct Keyring {
    kind: Kind,
    keys: Vec<Key>,
}

enum Kind {
    Tamio {
        header: HeaderName,
        label: String,
    },
    StandardWebhooks,
    HmacSha256 {
        header: HeaderName,
        label: String,
        encoding: MacEncoding,
    },
}

/// What a matching signature said: its timestamp and the headers that carry it.
type Matched = (Option<i64>, Proof);

impl Keyring {
    /// The keyring of `secrets` under `scheme`; `Err` says why they cannot be used.
    fn new(
        scheme: Scheme,
        header: &str,
        encoding: MacEncoding,
        secrets: &[Secret],
    ) -> Result<Keyring, String> {
        let name = || {
            HeaderName::try_from(header)
                .ok()
                .filter(|_| !header.trim().is_empty())
                .ok_or_else(|| "must be a valid HTTP header name".to_owned())
        };
        let kind = match scheme {
            Scheme::Tamio => Kind::Tamio {
                header: name()?,
                label: header.to_owned(),
            },
            Scheme::StandardWebhooks => Kind::StandardWebhooks,
            Scheme::HmacSha256 => Kind::HmacSha256 {
                header: name()?,
                label: header.to_owned(),
                encoding,
            },
        };
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| match scheme {
                Scheme::StandardWebhooks => standard_webhooks_key(s.expose())
                    .map(|key| Key(keyed(&key)))
                    .map_err(|reason| {
                        format!("secret #{} (of {}): {reason}", i + 1, secrets.len())
                    }),
                _ => Ok(Key(keyed(s.expose()))),
            })
            .collect::<Result<Vec<Key>, String>>()?;
        Ok(Keyring { kind, keys })
    }

    fn scheme(&self) -> Scheme {
        match self.kind {
            Kind::Tamio { .. } => Scheme::Tamio,
            Kind::StandardWebhooks => Scheme::StandardWebhooks,
            Kind::HmacSha256 { .. } => Scheme::HmacSha256,
        }
    }

    /// True when any key's MAC over `parts` equals any of `given`. Every pair is compared,
    /// so the time taken does not tell which one matched. Adds the MACs computed to `work`.
    fn any_key(&self, parts: &[&[u8]], given: &[[u8; 32]], work: &mut usize) -> bool {
        let mut matched = false;
        *work += self.keys.len();
        for key in &self.keys {
            let expected = mac_with(&key.0, parts);
            for mac in given {
                matched |= bool::from(expected.as_slice().ct_eq(mac));
            }
        }
        matched
    }

    fn check(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
        tolerance_secs: u64,
        work: &mut usize,
    ) -> Result<Matched, VerifyError> {
        let fresh = |timestamp: i64| {
            let skew = now.saturating_sub(timestamp);
            if skew.unsigned_abs() > tolerance_secs {
                Err(VerifyError::Stale {
                    skew_secs: skew,
                    tolerance_secs,
                })
            } else {
                Ok(())
            }
        };
        match &self.kind {
            Kind::Tamio { header, label } => {
                let text = header_text(headers, header, label)?;
                let parsed = parse_header(text).map_err(|r| malformed(label, r))?;
                fresh(parsed.timestamp)?;
                let parts: [&[u8]; 3] = [parsed.timestamp_text.as_bytes(), b".", body];
                if !self.any_key(&parts, &parsed.macs, work) {
                    return Err(VerifyError::Mismatch);
                }
                Ok((Some(parsed.timestamp), Proof::Header(header.clone())))
            }
            Kind::StandardWebhooks => {
                let id = header_text(headers, &WEBHOOK_ID, "webhook-id")?;
                let ts = header_text(headers, &WEBHOOK_TIMESTAMP, "webhook-timestamp")?;
                let sig = header_text(headers, &WEBHOOK_SIGNATURE, "webhook-signature")?;
                if id.is_empty() {
                    return Err(malformed("webhook-id", "empty"));
                }
                let timestamp = parse_unix_secs(ts)
                    .ok_or_else(|| malformed("webhook-timestamp", "must be unix seconds"))?;
                let macs = parse_standard_signatures(sig)
                    .map_err(|r| malformed("webhook-signature", r))?;
                fresh(timestamp)?;
                let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
                if !self.any_key(&parts, &macs, work) {
                    return Err(VerifyError::Mismatch);
                }
                Ok((Some(timestamp), Proof::StandardWebhooks))
            }
            Kind::HmacSha256 {
                header,
                label,
                encoding,
            } => {
                let text = header_text(headers, header, label)?;
                let mac = parse_plain_mac(text, *encoding).map_err(|r| malformed(label, r))?;
                if !self.any_key(&[body], &[mac], work) {
                    return Err(VerifyError::Mismatch);
                }
                Ok((None, Proof::Header(header.clone())))
            }
        }
    }
}

fn malformed(header: &str, reason: &'static str) -> VerifyError {
    VerifyError::Malformed {
        header: header.to_owned(),
        reason,
    }
}

/// The header's text; missing, or not visible ASCII, is an error.
fn header_text<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    label: &str,
) -> Result<&'h str, VerifyError> {
    headers
        .get(name)
        .ok_or_else(|| VerifyError::Missing(label.to_owned()))?
        .to_str()
        .map_err(|_| malformed(label, "not visible ASCII"))
}

/// Checks signatures with the configured secrets.
pub struct Verifier {
    /// No secret is configured and `allow_unsigned` is set: every body is accepted.
    unsigned: bool,
    global: Option<Keyring>,
    endpoints: HashMap<String, Keyring>,
    tolerance_secs: u64,
    /// Where endpoints have secrets of their own: the most MACs any delivery can be checked
    /// with (the secrets for every endpoint plus the largest endpoint's). A refused delivery
    /// always costs that many passes over its body, so that the time of a refusal tells
    /// nobody whether its `endpoint_id` is known, how it signs, or how far the check got.
    constant_work: Option<(usize, HmacSha256)>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("unsigned", &self.unsigned)
            .field(
                "global",
                &self
                    .global
                    .as_ref()
                    .map(|r| format!("{} [{} redacted]", r.scheme().as_str(), r.keys.len())),
            )
            .field("endpoints", &self.endpoints.len())
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl Verifier {
    /// The verifier of the `signature` settings, or every reason it cannot be built, each
    /// naming its setting.
    pub fn build(settings: &Signature) -> Result<Verifier, Vec<SettingsError>> {
        let mut errors = Vec::new();
        let global = if settings.secrets.is_empty() {
            // The header is still checked: an endpoint may fall back to it.
            if HeaderName::try_from(&settings.header).is_err() || settings.header.trim().is_empty()
            {
                errors.push(invalid(
                    "signature.header",
                    "must be a valid HTTP header name",
                ));
            }
            None
        } else {
            match Keyring::new(
                settings.scheme,
                &settings.header,
                settings.encoding,
                &settings.secrets,
            ) {
                Ok(ring) => Some(ring),
                Err(reason) => {
                    let key = if reason.starts_with("must be") {
                        "signature.header"
                    } else {
                        "signature.secrets"
                    };
                    errors.push(invalid(key, reason));
                    None
                }
            }
        };
        let mut endpoints = HashMap::new();
        let mut ids: Vec<&String> = settings.endpoints.keys().collect();
        ids.sort();
        for id in ids {
            let e = &settings.endpoints[id];
            let ring = Keyring::new(
                e.scheme.unwrap_or(settings.scheme),
                e.header.as_deref().unwrap_or(&settings.header),
                e.encoding.unwrap_or(settings.encoding),
                &e.secrets,
            );
            match ring {
                Ok(ring) => {
                    endpoints.insert(id.clone(), ring);
                }
                Err(reason) => {
                    let reason = if reason.starts_with("must be") {
                        format!("header {reason}")
                    } else {
                        reason
                    };
                    errors.push(invalid(
                        "signature.endpoints",
                        format!("endpoint `{id}`: {reason}"),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let most = global.as_ref().map_or(0, |g| g.keys.len())
            + endpoints.values().map(|e| e.keys.len()).max().unwrap_or(0);
        let constant_work = (!endpoints.is_empty()).then(|| (most, keyed(b"no secret")));
        Ok(Verifier {
            unsigned: settings.allow_unsigned && global.is_none() && endpoints.is_empty(),
            global,
            endpoints,
            tolerance_secs: settings.tolerance_secs,
            constant_work,
        })
    }

    /// The request headers that may carry a `tamio` or `hmac-sha256` signature, once each:
    /// a record's `signature` header came from one of them.
    pub fn signature_headers(&self) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = Vec::new();
        for ring in self.global.iter().chain(self.endpoints.values()) {
            if let Kind::Tamio { header, .. } | Kind::HmacSha256 { header, .. } = &ring.kind {
                if !names.contains(header) {
                    names.push(header.clone());
                }
            }
        }
        names
    }

    /// True when deliveries are accepted without a signature.
    pub fn accepts_unsigned(&self) -> bool {
        self.unsigned
    }

    /// Verifies `body` against the signature headers in `headers`, received at
    /// `received_at`. The secrets for every endpoint are tried under `signature.scheme`, then
    /// those of the body's `endpoint_id` under that endpoint's scheme.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        received_at: SystemTime,
    ) -> Result<VerifiedBody, VerifyError> {
        if self.unsigned {
            return Ok(VerifiedBody {
                bytes: body,
                signed_at: None,
                received_at,
                scheme: None,
                proof: Proof::Unsigned,
            });
        }
        let now = unix_secs(received_at);
        let endpoint = if self.endpoints.is_empty() {
            None
        } else {
            peek_endpoint_id(&body).and_then(|id| self.endpoints.get(id.as_ref()))
        };
        let mut furthest = VerifyError::UnknownEndpoint;
        let mut work = 0;
        for ring in self.global.iter().chain(endpoint) {
            match ring.check(headers, &body, now, self.tolerance_secs, &mut work) {
                Ok((signed_at, proof)) => {
                    return Ok(VerifiedBody {
                        bytes: body,
                        signed_at,
                        received_at,
                        scheme: Some(ring.scheme()),
                        proof,
                    })
                }
                Err(e) if e.progress() > furthest.progress() => furthest = e,
                Err(_) => {}
            }
        }
        match &self.constant_work {
            None => Err(furthest),
            Some((most, key)) => {
                for _ in work..*most {
                    std::hint::black_box(mac_with(key, &[&body]));
                }
                Err(VerifyError::Undisclosed(furthest.reason()))
            }
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Reads only `endpoint_id` from an unverified body, to choose the endpoint's secrets. Any
/// parse failure means "no endpoint": the verification then fails as a mismatch, so an
/// unauthenticated sender learns nothing about the body's validity.
fn peek_endpoint_id(body: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        endpoint_id: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Peek<'_>>(body)
        .ok()
        .and_then(|p| p.endpoint_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;

    const BODY: &[u8] = br#"{"event_id":"whev_1","endpoint_id":"ep-1"}"#;
    const NOW: i64 = 1_700_000_000;

    fn settings(global: &[&str], endpoints: &[(&str, &[&str])]) -> Signature {
        Signature {
            scheme: Scheme::Tamio,
            header: "Tamio-Signature".into(),
            encoding: MacEncoding::Hex,
            secrets: global.iter().map(|s| Secret::new(*s)).collect(),
            secret_files: Vec::new(),
            tolerance_secs: 300,
            allow_unsigned: false,
            endpoints: endpoints
                .iter()
                .map(|(id, secrets)| {
                    (
                        id.to_string(),
                        Endpoint {
                            scheme: None,
                            header: None,
                            encoding: None,
                            secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
                            secret_files: Vec::new(),
                        },
                    )
                })
                .collect(),
        }
    }

    fn verifier(global: &[&str], endpoints: &[(&str, &[&str])]) -> Verifier {
        Verifier::build(&settings(global, endpoints)).unwrap()
    }

    fn at(unix: i64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(unix as u64)
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("tamio-signature", value.parse().unwrap());
        h
    }

    fn check(v: &Verifier, value: &str, body: &[u8]) -> Result<i64, VerifyError> {
        v.verify(&headers(value), Bytes::copy_from_slice(body), at(NOW))
            .map(|b| b.signed_at().unwrap_or(-1))
    }

    #[test]
    fn every_refusal_costs_the_same_macs_where_endpoints_have_secrets() {
        let v = verifier(&["global"], &[("ep-1", &["a", "b", "c"]), ("ep-2", &["d"])]);
        let macs = |value: Option<&str>, body: &[u8]| {
            MACS_COMPUTED.with(|n| n.set(0));
            let h = value.map(headers).unwrap_or_default();
            let result = v.verify(&h, Bytes::copy_from_slice(body), at(NOW));
            (result.is_ok(), MACS_COMPUTED.with(|n| n.get()))
        };
        let forged = header_value(b"guess", NOW, BODY);
        let stale = header_value(b"a", NOW - 3600, BODY);
        let unknown = br#"{"event_id":"whev_1","endpoint_id":"ep-unknown"}"#;
        // The global secret and the largest endpoint's three, whatever went wrong.
        for (name, value, body) in [
            ("known endpoint, no match", Some(forged.as_str()), BODY),
            ("unknown endpoint", Some(forged.as_str()), &unknown[..]),
            ("no header", None, BODY),
            ("malformed header", Some("t=x"), BODY),
            ("stale", Some(stale.as_str()), BODY),
            ("not JSON", Some(forged.as_str()), &b"not json"[..]),
        ] {
            assert_eq!(macs(value, body), (false, 4), "{name}");
        }
        let good = header_value(b"b", NOW, BODY);
        assert!(macs(Some(&good), BODY).0);

        // With only the secrets for every endpoint the answer already says what was wrong,
        // and a header that is missing costs no MAC.
        let v = verifier(&["global"], &[]);
        MACS_COMPUTED.with(|n| n.set(0));
        assert!(v
            .verify(&HeaderMap::new(), Bytes::from_static(BODY), at(NOW))
            .is_err());
        assert_eq!(MACS_COMPUTED.with(|n| n.get()), 0);
    }

    #[test]
    fn known_answers_from_an_independent_implementation() {
        // Computed with Python's hmac module over the bytes `<t>.<body>`.
        assert_eq!(
            sign(b"key", 1, b"abc"),
            "90ebc65a2174297bcabd31e7cdb290734ffd97b67d17c09a380b0d4828d3d90c"
        );
        assert_eq!(
            header_value(b"whsec-demo", 1671472527, br#"{"a":1}"#),
            "t=1671472527,s=a170e2feed4ec30de9032811384d9fabd63d48250a7c9722b45dfe204cbb87f6"
        );
    }

    #[test]
    fn accepts_any_configured_secret() {
        let v = verifier(&["old", "new"], &[]);
        for secret in ["old", "new"] {
            let h = header_value(secret.as_bytes(), NOW, BODY);
            assert_eq!(check(&v, &h, BODY), Ok(NOW));
        }
        let h = header_value(b"other", NOW, BODY);
        assert_eq!(check(&v, &h, BODY), Err(VerifyError::Mismatch));
    }

    #[test]
    fn one_of_several_signatures_may_match() {
        let v = verifier(&["new"], &[]);
        let h = format!(
            "t={NOW},s={},s={}",
            sign(b"old", NOW, BODY),
            sign(b"new", NOW, BODY)
        );
        assert_eq!(check(&v, &h, BODY), Ok(NOW));
    }

    #[test]
    fn tampered_body_or_timestamp_is_a_mismatch() {
        let v = verifier(&["s3cret"], &[]);
        let h = header_value(b"s3cret", NOW, BODY);
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 1;
        assert_eq!(check(&v, &h, &tampered), Err(VerifyError::Mismatch));
        let moved = h.replace(&format!("t={NOW}"), &format!("t={}", NOW - 1));
        assert_eq!(check(&v, &moved, BODY), Err(VerifyError::Mismatch));
    }

    #[test]
    fn stale_either_way() {
        let v = verifier(&["s"], &[]);
        for t in [NOW - 301, NOW + 301] {
            let h = header_value(b"s", t, BODY);
            assert!(matches!(
                check(&v, &h, BODY),
                Err(VerifyError::Stale { .. })
            ));
        }
        for t in [NOW - 300, NOW + 300] {
            let h = header_value(b"s", t, BODY);
            assert_eq!(check(&v, &h, BODY), Ok(t));
        }
    }

    #[test]
    fn missing_and_malformed_headers() {
        let v = verifier(&["s"], &[]);
        let err = v
            .verify(&HeaderMap::new(), Bytes::from_static(BODY), at(NOW))
            .err();
        assert_eq!(err.map(|e| e.reason().as_str()), Some("missing"));
        for bad in [
            "",
            "garbage",
            "t=abc,s=00",
            &format!("t={NOW}"),
            &format!("s={}", "0".repeat(64)),
            &format!("t={NOW},s=zz"),
            &format!("t={NOW},s={}", "0".repeat(63)),
            &format!("t={NOW},t={NOW},s={}", "0".repeat(64)),
            &format!("t=-5,s={}", "0".repeat(64)),
        ] {
            let r = check(&v, bad, BODY);
            assert!(
                matches!(r, Err(VerifyError::Malformed { .. })),
                "{bad:?} gave {r:?}"
            );
        }
    }

    #[test]
    fn endpoint_secrets_apply_to_their_endpoint_only() {
        let v = verifier(&[], &[("ep-1", &["ep1-secret"]), ("ep-2", &["ep2-secret"])]);
        let ok = header_value(b"ep1-secret", NOW, BODY);
        assert_eq!(check(&v, &ok, BODY), Ok(NOW));
        let wrong_endpoint = header_value(b"ep2-secret", NOW, BODY);
        assert_eq!(
            check(&v, &wrong_endpoint, BODY).map_err(|e| e.reason().as_str()),
            Err("mismatch")
        );
        let unknown = br#"{"endpoint_id":"ep-9"}"#;
        let h = header_value(b"ep1-secret", NOW, unknown);
        let err = check(&v, &h, unknown).unwrap_err();
        assert_eq!(err.reason().as_str(), "unknown_endpoint");
        // A known endpoint without a signature is told exactly what an unknown one is.
        let missing = v
            .verify(&HeaderMap::new(), Bytes::from_static(BODY), at(NOW))
            .err()
            .expect("refused");
        assert_eq!(missing.reason().as_str(), "missing");
        assert_eq!(missing.to_string(), err.to_string());
    }

    #[test]
    fn errors_and_debug_never_show_secrets() {
        let v = verifier(&["topsecret-value"], &[("ep-1", &["endpoint-topsecret"])]);
        assert!(!format!("{v:?}").contains("topsecret"));
        let h = header_value(b"nope", NOW, BODY);
        let err = check(&v, &h, BODY).unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
    }

    fn check_with(v: &Verifier, headers: &[(&str, &str)], body: &[u8]) -> Result<i64, VerifyError> {
        let mut h = HeaderMap::new();
        for (name, value) in headers {
            h.insert(HeaderName::try_from(*name).unwrap(), value.parse().unwrap());
        }
        v.verify(&h, Bytes::copy_from_slice(body), at(NOW))
            .map(|b| b.signed_at().unwrap_or(-1))
    }

    // The example of the Standard Webhooks specification's reference libraries.
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: i64 = 1614265330;
    const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn standard_webhooks_known_answer() {
        assert_eq!(
            standard_webhooks_signature(SW_SECRET.as_bytes(), SW_ID, SW_TS, SW_BODY).unwrap(),
            SW_SIG
        );
    }

    fn standard_webhooks_verifier() -> Verifier {
        let mut s = settings(&[SW_SECRET], &[]);
        s.scheme = Scheme::StandardWebhooks;
        Verifier::build(&s).unwrap()
    }

    #[test]
    fn standard_webhooks_accepts_and_rejects() {
        let v = standard_webhooks_verifier();
        let sig = standard_webhooks_signature(SW_SECRET.as_bytes(), SW_ID, NOW, BODY).unwrap();
        let ts = NOW.to_string();
        let good = [
            ("webhook-id", SW_ID),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        assert_eq!(check_with(&v, &good, BODY), Ok(NOW));
        // Several entries, other versions ignored.
        let several = format!("v1a,AAAA v1,{} {sig}", BASE64.encode([7u8; 32]));
        let mut h = good;
        h[2].1 = &several;
        assert_eq!(check_with(&v, &h, BODY), Ok(NOW));
        // Tampered body, id or timestamp.
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 1;
        assert_eq!(check_with(&v, &good, &tampered), Err(VerifyError::Mismatch));
        let mut h = good;
        h[0].1 = "msg_other";
        assert_eq!(check_with(&v, &h, BODY), Err(VerifyError::Mismatch));
        let earlier = (NOW - 1).to_string();
        let mut h = good;
        h[1].1 = &earlier;
        assert_eq!(check_with(&v, &h, BODY), Err(VerifyError::Mismatch));
        // Missing, malformed, stale.
        assert_eq!(
            check_with(&v, &good[..2], BODY),
            Err(VerifyError::Missing("webhook-signature".into()))
        );
        for bad in ["v2,abc", "v1,not-base64!", "v1", "v1,AAAA"] {
            let mut h = good;
            h[2].1 = bad;
            assert_eq!(
                check_with(&v, &h, BODY).map_err(|e| e.reason().as_str()),
                Err("malformed"),
                "{bad}"
            );
        }
        let old = (NOW - 301).to_string();
        let sig_old =
            standard_webhooks_signature(SW_SECRET.as_bytes(), SW_ID, NOW - 301, BODY).unwrap();
        let h = [
            ("webhook-id", SW_ID),
            ("webhook-timestamp", old.as_str()),
            ("webhook-signature", sig_old.as_str()),
        ];
        assert_eq!(
            check_with(&v, &h, BODY).map_err(|e| e.reason().as_str()),
            Err("stale")
        );
    }

    #[test]
    fn standard_webhooks_secrets_must_be_whsec_base64() {
        assert!(standard_webhooks_key(b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(standard_webhooks_key(b"whsec_***").is_err());
        assert!(standard_webhooks_key(b"whsec_").is_err());
        assert_eq!(standard_webhooks_key(b"whsec_AAEC").unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn plain_hmac_hex_and_base64_with_a_configurable_header() {
        // Computed with Python: hmac.new(b"key", b"abc", "sha256").
        assert_eq!(
            plain_mac(b"key", b"abc", MacEncoding::Hex),
            "9c196e32dc0175f86f4b1cb89289d6619de6bee699e4c378e68309ed97a1a6ab"
        );
        for encoding in [MacEncoding::Hex, MacEncoding::Base64] {
            let mut s = settings(&["plain-secret"], &[]);
            s.scheme = Scheme::HmacSha256;
            s.header = "X-Hub-Signature-256".into();
            s.encoding = encoding;
            let v = Verifier::build(&s).unwrap();
            let mac = plain_mac(b"plain-secret", BODY, encoding);
            let h = [("x-hub-signature-256", mac.as_str())];
            assert_eq!(check_with(&v, &h, BODY), Ok(-1), "no timestamp");
            let prefixed = format!("sha256={mac}");
            assert_eq!(
                check_with(&v, &[("x-hub-signature-256", &prefixed)], BODY),
                Ok(-1)
            );
            let mut tampered = BODY.to_vec();
            tampered[3] ^= 1;
            assert_eq!(check_with(&v, &h, &tampered), Err(VerifyError::Mismatch));
            let other = plain_mac(b"other", BODY, encoding);
            assert_eq!(
                check_with(&v, &[("x-hub-signature-256", &other)], BODY),
                Err(VerifyError::Mismatch)
            );
            assert_eq!(
                check_with(&v, &[("x-hub-signature-256", "zz")], BODY)
                    .map_err(|e| e.reason().as_str()),
                Err("malformed")
            );
            assert_eq!(
                check_with(&v, &[("tamio-signature", &mac)], BODY).map_err(|e| e.reason().as_str()),
                Err("missing")
            );
        }
    }

    #[test]
    fn each_endpoint_verifies_under_its_own_scheme() {
        let mut s = settings(&["global-secret"], &[("ep-1", &[SW_SECRET])]);
        s.endpoints.get_mut("ep-1").unwrap().scheme = Some(Scheme::StandardWebhooks);
        let v = Verifier::build(&s).unwrap();
        let sig = standard_webhooks_signature(SW_SECRET.as_bytes(), SW_ID, NOW, BODY).unwrap();
        let ts = NOW.to_string();
        let sw = [
            ("webhook-id", SW_ID),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", sig.as_str()),
        ];
        assert_eq!(check_with(&v, &sw, BODY), Ok(NOW));
        // The global secret still signs in the global scheme.
        let tamio = header_value(b"global-secret", NOW, BODY);
        assert_eq!(
            check_with(&v, &[("tamio-signature", &tamio)], BODY),
            Ok(NOW)
        );
        // The endpoint's secret in the global scheme is not accepted.
        let wrong = header_value(SW_SECRET.as_bytes(), NOW, BODY);
        assert_eq!(
            check_with(&v, &[("tamio-signature", &wrong)], BODY).map_err(|e| e.reason().as_str()),
            Err("mismatch")
        );
    }

    #[test]
    fn entries_that_cannot_be_macs_are_skipped_beside_a_usable_one() {
        let v = verifier(&["s"], &[]);
        let good = sign(b"s", NOW, BODY);
        let h = format!("t={NOW},s=not-hex,s={good}");
        assert_eq!(check(&v, &h, BODY), Ok(NOW));
        let sw = standard_webhooks_verifier();
        let sig = standard_webhooks_signature(SW_SECRET.as_bytes(), SW_ID, NOW, BODY).unwrap();
        let value = format!("v1,AAAA {sig}");
        let ts = NOW.to_string();
        let h = [
            ("webhook-id", SW_ID),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", value.as_str()),
        ];
        assert_eq!(check_with(&sw, &h, BODY), Ok(NOW));
    }

    #[test]
    fn allow_unsigned_applies_only_without_secrets() {
        let mut s = settings(&[], &[]);
        s.allow_unsigned = true;
        let v = Verifier::build(&s).unwrap();
        assert!(v.accepts_unsigned());
        let body = v
            .verify(&HeaderMap::new(), Bytes::from_static(BODY), at(NOW))
            .unwrap();
        assert_eq!(body.scheme(), None);
        assert!(body.proof().is_empty());
        let mut s = settings(&["s"], &[]);
        s.allow_unsigned = true;
        let v = Verifier::build(&s).unwrap();
        assert!(!v.accepts_unsigned());
        assert_eq!(
            check_with(&v, &[], BODY).map_err(|e| e.reason().as_str()),
            Err("missing")
        );
    }
}
