//! Signature verification on the raw body, before anything parses it.
//!
//! The default scheme: the header (`signature.header`, default `Tamio-Signature`) holds
//! `t=<unix seconds>,s=<hex HMAC-SHA256>`; the MAC covers the bytes `<t>.<raw body>` and is
//! keyed by the endpoint's secret. Every secret configured for all endpoints, and those of the
//! delivery's `endpoint_id`, may match (rotation); MACs are compared in constant time. Only
//! [`Verifier::verify`] makes a [`VerifiedBody`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{Secret, Signature};

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
}

impl VerifyError {
    /// The `reason` label of the signature-failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Missing(_) => "missing",
            VerifyError::Malformed { .. } => "malformed",
            VerifyError::Stale { .. } => "stale",
            VerifyError::Mismatch => "mismatch",
            VerifyError::UnknownEndpoint => "unknown_endpoint",
        }
    }
}

/// A body whose signature matched a configured secret, with the signature's timestamp.
pub struct VerifiedBody {
    bytes: Bytes,
    timestamp: i64,
    received_at: SystemTime,
}

impl VerifiedBody {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Unix seconds the sender signed the delivery at.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }

    /// When the bridge received the delivery.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// How late the sender delivered: receipt minus the signature's timestamp, at least 0.
    pub fn sender_delay_secs(&self) -> i64 {
        unix_secs(self.received_at)
            .saturating_sub(self.timestamp)
            .max(0)
    }
}

/// The parsed signature header: the timestamp as sent and the candidate MACs.
#[derive(Debug, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub timestamp_text: &'a str,
    pub timestamp: i64,
    pub macs: Vec<[u8; 32]>,
}

/// Parses `t=<unix seconds>,s=<hex>`; several `s=` entries are allowed (the sender may sign
/// with an old and a new secret at once), unknown keys are ignored.
pub fn parse_header(value: &str) -> Result<SignatureHeader<'_>, &'static str> {
    let mut timestamp = None;
    let mut macs = Vec::new();
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
                if val.is_empty() || val.len() > 12 || !val.bytes().all(|b| b.is_ascii_digit()) {
                    return Err("t= must be unix seconds");
                }
                let secs: i64 = val.parse().map_err(|_| "t= must be unix seconds")?;
                timestamp = Some((val, secs));
            }
            "s" => {
                let mut mac = [0u8; 32];
                hex::decode_to_slice(val.trim(), &mut mac)
                    .map_err(|_| "s= must be 64 hex digits (HMAC-SHA256)")?;
                macs.push(mac);
            }
            _ => {}
        }
    }
    let (timestamp_text, timestamp) = timestamp.ok_or("no t= entry")?;
    if macs.is_empty() {
        return Err("no s= entry");
    }
    Ok(SignatureHeader {
        timestamp_text,
        timestamp,
        macs,
    })
}

/// Computes the hex signature of `body` at `timestamp` with `secret`: what the sender puts
/// after `s=`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The header value for `body` signed at `timestamp` with `secret`.
pub fn header_value(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("t={timestamp},s={}", sign(secret, timestamp, body))
}

/// Checks signatures with the configured secrets.
pub struct Verifier {
    header: HeaderName,
    /// The header's name as configured, for messages.
    header_label: String,
    global: Vec<Secret>,
    endpoints: HashMap<String, Vec<Secret>>,
    tolerance_secs: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("header", &self.header)
            .field("global", &format_args!("[{} redacted]", self.global.len()))
            .field("endpoints", &self.endpoints.len())
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

impl Verifier {
    pub fn new(settings: &Signature) -> Self {
        Verifier {
            header: HeaderName::try_from(settings.header.as_str())
                .expect("validated by Settings::validate"),
            header_label: settings.header.clone(),
            global: settings.secrets.clone(),
            endpoints: settings
                .endpoints
                .iter()
                .map(|(id, e)| (id.clone(), e.secrets.clone()))
                .collect(),
            tolerance_secs: settings.tolerance_secs,
        }
    }

    /// The name of the signature header.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Verifies `body` against the signature header in `headers`, received at `received_at`.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        received_at: SystemTime,
    ) -> Result<VerifiedBody, VerifyError> {
        let now = unix_secs(received_at);
        let malformed = |reason| VerifyError::Malformed {
            header: self.header_label.clone(),
            reason,
        };
        let value = headers
            .get(&self.header)
            .ok_or_else(|| VerifyError::Missing(self.header_label.clone()))?;
        let value = value.to_str().map_err(|_| malformed("not visible ASCII"))?;
        let parsed = parse_header(value).map_err(malformed)?;

        let skew = now.saturating_sub(parsed.timestamp);
        if skew.unsigned_abs() > self.tolerance_secs {
            return Err(VerifyError::Stale {
                skew_secs: skew,
                tolerance_secs: self.tolerance_secs,
            });
        }

        let endpoint_secrets = if self.endpoints.is_empty() {
            None
        } else {
            peek_endpoint_id(&body).and_then(|id| self.endpoints.get(id.as_ref()))
        };
        let candidates = self
            .global
            .iter()
            .chain(endpoint_secrets.into_iter().flatten());

        let mut matched = false;
        let mut tried = 0;
        for secret in candidates {
            tried += 1;
            let mut mac =
                HmacSha256::new_from_slice(secret.expose()).expect("HMAC takes keys of any length");
            mac.update(parsed.timestamp_text.as_bytes());
            mac.update(b".");
            mac.update(&body);
            let expected = mac.finalize().into_bytes();
            for given in &parsed.macs {
                // Evaluate every candidate: the time taken does not tell which one matched.
                matched |= bool::from(expected.as_slice().ct_eq(given));
            }
        }
        if matched {
            Ok(VerifiedBody {
                bytes: body,
                timestamp: parsed.timestamp,
                received_at,
            })
        } else if tried == 0 {
            Err(VerifyError::UnknownEndpoint)
        } else {
            Err(VerifyError::Mismatch)
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

    fn verifier(global: &[&str], endpoints: &[(&str, &[&str])]) -> Verifier {
        Verifier::new(&Signature {
            header: "Tamio-Signature".into(),
            secrets: global.iter().map(|s| Secret::new(*s)).collect(),
            tolerance_secs: 300,
            endpoints: endpoints
                .iter()
                .map(|(id, secrets)| {
                    (
                        id.to_string(),
                        Endpoint {
                            secrets: secrets.iter().map(|s| Secret::new(*s)).collect(),
                        },
                    )
                })
                .collect(),
        })
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
            .map(|b| b.timestamp())
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
        assert_eq!(err.map(|e| e.reason()), Some("missing"));
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
        assert_eq!(check(&v, &wrong_endpoint, BODY), Err(VerifyError::Mismatch));
        let unknown = br#"{"endpoint_id":"ep-9"}"#;
        let h = header_value(b"ep1-secret", NOW, unknown);
        assert_eq!(check(&v, &h, unknown), Err(VerifyError::UnknownEndpoint));
    }

    #[test]
    fn errors_and_debug_never_show_secrets() {
        let v = verifier(&["topsecret-value"], &[("ep-1", &["endpoint-topsecret"])]);
        assert!(!format!("{v:?}").contains("topsecret"));
        let h = header_value(b"nope", NOW, BODY);
        let err = check(&v, &h, BODY).unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
    }
}
