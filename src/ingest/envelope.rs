//! The Tamio envelope (api_version 2): parsed from a [`VerifiedBody`] without copying it,
//! and validated field by field so that a refusal names the field and the reason.
//!
//! Unknown fields are allowed: the sender adds fields over time. A key given twice is refused
//! (two values for one field leave its meaning open).

use std::borrow::Cow;

use serde::de;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::verify::VerifiedBody;

/// The envelope version this bridge understands.
pub const API_VERSION: u64 = 2;

/// Prefix of the ticket event types, whose `data.ticket.id` is required.
pub const TICKET_EVENT_PREFIX: &str = "whitelabel_ticket_";

/// The ticket event types counted by name in the delivered-events metric.
pub const KNOWN_EVENT_TYPES: [&str; 4] = [
    "whitelabel_ticket_created",
    "whitelabel_ticket_updated",
    "whitelabel_ticket_assigned",
    "whitelabel_ticket_resolved",
];

/// The label for any other event type.
pub const OTHER_EVENT_TYPE: &str = "other";

/// The `event_type` label of the delivered-events counter: the known ticket types by name,
/// any other as `other` (label values never come from request data).
pub fn event_type_label(event_type: &str) -> &'static str {
    KNOWN_EVENT_TYPES
        .iter()
        .find(|known| **known == event_type)
        .copied()
        .unwrap_or(OTHER_EVENT_TYPE)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    #[error("`{field}` {reason}")]
    Field {
        field: &'static str,
        reason: &'static str,
    },
}

fn field_err(field: &'static str, reason: &'static str) -> EnvelopeError {
    EnvelopeError::Field { field, reason }
}

/// A valid envelope, borrowing from the body.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub event_id: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    pub endpoint_id: Cow<'a, str>,
    pub api_version: u64,
    /// `data.ticket.id` where the event carries a ticket.
    pub ticket_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    api_version: Option<&'a RawValue>,
    #[serde(borrow, default)]
    object: Option<&'a RawValue>,
    #[serde(borrow, default)]
    endpoint_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
}

/// `data`, read in the same pass as the envelope: whether it is an object, and its ticket.
enum Data<'a> {
    Object { ticket: Option<Ticket<'a>> },
    NotObject,
}

/// `data.ticket`: whether it is an object, and its raw `id`.
enum Ticket<'a> {
    Object { id: Option<&'a RawValue> },
    NotObject,
}

/// Skips whatever value the visitor was given, reporting it as "not an object".
macro_rules! not_an_object {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<de::IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}

/// An object key, borrowed unless it has escapes (serde's own `Cow<str>` always copies).
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Data<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`data`")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Data<'de>, A::Error> {
                let mut ticket = None;
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    if key == "ticket" {
                        if ticket.is_some() {
                            return Err(de::Error::custom("`data` has a repeated `ticket` key"));
                        }
                        ticket = Some(map.next_value::<Option<Ticket<'de>>>()?);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(Data::Object {
                    ticket: ticket.flatten(),
                })
            }
            not_an_object!(Data::NotObject);
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Ticket<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Ticket<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`data.ticket`")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Ticket<'de>, A::Error> {
                let mut id = None;
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    if key == "id" {
                        if id.is_some() {
                            return Err(de::Error::custom("`data.ticket` has a repeated `id` key"));
                        }
                        id = Some(map.next_value::<Option<&'de RawValue>>()?);
                    } else {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                }
                Ok(Ticket::Object { id: id.flatten() })
            }
            not_an_object!(Ticket::NotObject);
        }
        d.deserialize_any(V)
    }
}

/// A JSON string, borrowed when it has no escapes.
fn string<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&'a str>(text) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
}

/// Longest identifier accepted (`event_id`, `event_type`, `endpoint_id`, the ticket id):
/// they become record headers and keys, and the duplicate filter keeps them.
pub const MAX_ID_BYTES: usize = 256;

/// Deepest nesting accepted anywhere in the body, as serde_json's own limit for parsing.
pub const MAX_DEPTH: usize = 128;

fn non_empty_string<'a>(
    raw: Option<&'a RawValue>,
    field: &'static str,
) -> Result<Cow<'a, str>, EnvelopeError> {
    let raw = raw.ok_or_else(|| field_err(field, "is missing or null"))?;
    let s = string(raw).ok_or_else(|| field_err(field, "must be a string"))?;
    if s.trim().is_empty() {
        return Err(field_err(field, "must not be empty"));
    }
    if s.len() > MAX_ID_BYTES {
        return Err(field_err(field, "must be at most 256 bytes"));
    }
    Ok(s)
}

/// True when arrays and objects nest deeper than `limit` anywhere, strings aside. serde_json
/// enforces its limit only on values it parses, not on the ones it skips.
fn nested_deeper_than(bytes: &[u8], limit: usize) -> bool {
    // Depth cannot pass the number of opening brackets: a quick count, which the compiler
    // vectorises, spares the exact scan for the usual body.
    let openings = bytes.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if openings <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

impl<'a> Envelope<'a> {
    /// Parses and validates the verified body.
    pub fn parse(body: &'a VerifiedBody) -> Result<Envelope<'a>, EnvelopeError> {
        Self::parse_bytes(body.bytes())
    }

    /// Parses raw bytes without a verified signature: for tests and benchmarks only; the
    /// request path goes through [`Envelope::parse`].
    #[doc(hidden)]
    pub fn parse_bytes(bytes: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(EnvelopeError::Json(
                "the envelope must be a JSON object".to_owned(),
            ));
        }
        if nested_deeper_than(bytes, MAX_DEPTH) {
            return Err(EnvelopeError::Json(format!(
                "arrays and objects nest deeper than {MAX_DEPTH} levels"
            )));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| EnvelopeError::Json(format!("the body is not valid UTF-8: {e}")))?;
        // One pass over the body: the envelope's fields, `data` and its ticket.
        let wire: Wire<'a> =
            serde_json::from_str(text).map_err(|e| EnvelopeError::Json(e.to_string()))?;

        let event_id = non_empty_string(wire.event_id, "event_id")?;
        let event_type = non_empty_string(wire.event_type, "event_type")?;
        let api_version = wire
            .api_version
            .ok_or_else(|| field_err("api_version", "is missing or null"))?;
        if serde_json::from_str::<u64>(api_version.get()).ok() != Some(API_VERSION) {
            return Err(field_err("api_version", "must be the number 2"));
        }
        let object = wire
            .object
            .ok_or_else(|| field_err("object", "is missing or null"))?;
        if string(object).as_deref() != Some("event") {
            return Err(field_err("object", "must be the string \"event\""));
        }
        let endpoint_id = non_empty_string(wire.endpoint_id, "endpoint_id")?;
        let data = wire
            .data
            .ok_or_else(|| field_err("data", "is missing or null"))?;
        let Data::Object { ticket } = data else {
            return Err(field_err("data", "must be an object"));
        };

        let ticket_id = if event_type.starts_with(TICKET_EVENT_PREFIX) {
            let ticket = ticket.ok_or_else(|| {
                field_err(
                    "data.ticket",
                    "is missing or null (required for ticket events)",
                )
            })?;
            let Ticket::Object { id } = ticket else {
                return Err(field_err("data.ticket", "must be an object"));
            };
            Some(non_empty_string(id, "data.ticket.id")?)
        } else {
            None
        };

        Ok(Envelope {
            event_id,
            event_type,
            endpoint_id,
            api_version: API_VERSION,
            ticket_id,
        })
    }
}

/// The ticket id of a body whose envelope was refused, when it names one at
/// `data.ticket.id`: the dead letter's key. Read only on that path.
pub fn peek_ticket_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match value.pointer("/data/ticket/id")? {
        serde_json::Value::String(id) if !id.is_empty() && id.len() <= 256 => Some(id.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: &str = include_str!("../../tests/fixtures/whitelabel_ticket_created.json");

    fn parse(s: &str) -> Result<Envelope<'_>, EnvelopeError> {
        Envelope::parse_bytes(s.as_bytes())
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(CREATED).unwrap();
        let value: serde_json::Value = serde_json::from_str(value).unwrap();
        let (parent, key) = match field.rsplit_once('.') {
            Some((p, k)) => (format!("/{}", p.replace('.', "/")), k),
            None => (String::new(), field),
        };
        let target = v.pointer_mut(&parent).unwrap().as_object_mut().unwrap();
        if value.is_null() {
            target.remove(key);
        } else {
            target.insert(key.to_owned(), value);
        }
        v.to_string()
    }

    fn refused(body: &str) -> (String, String) {
        match parse(body) {
            Err(EnvelopeError::Field { field, reason }) => (field.to_owned(), reason.to_owned()),
            other => panic!("expected a field error for {body}, got {other:?}"),
        }
    }

    #[test]
    fn fixture_parses_borrowed() {
        let env = parse(CREATED).unwrap();
        assert_eq!(env.event_id, "whev_o48n74r1vsv642vex");
        assert_eq!(env.event_type, "whitelabel_ticket_created");
        assert_eq!(env.endpoint_id, "9ab698f5-99de-4ff6-8bfc-a7dcb973d177");
        assert_eq!(
            env.ticket_id.as_deref(),
            Some("fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1")
        );
        assert!(matches!(env.event_id, Cow::Borrowed(_)));
        assert!(matches!(env.ticket_id, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = with("event_id", r#""whev_\u0041""#);
        assert_eq!(parse(&body).unwrap().event_id, "whev_A");
    }

    #[test]
    fn each_field_is_checked_and_named() {
        let cases = [
            ("event_id", "null", "event_id", "is missing or null"),
            ("event_id", "\"\"", "event_id", "must not be empty"),
            ("event_id", "7", "event_id", "must be a string"),
            ("event_type", "null", "event_type", "is missing or null"),
            ("event_type", "[]", "event_type", "must be a string"),
            ("api_version", "1", "api_version", "must be the number 2"),
            (
                "api_version",
                "\"2\"",
                "api_version",
                "must be the number 2",
            ),
            ("api_version", "null", "api_version", "is missing or null"),
            (
                "object",
                "\"ticket\"",
                "object",
                "must be the string \"event\"",
            ),
            ("endpoint_id", "\" \"", "endpoint_id", "must not be empty"),
            ("data", "[1]", "data", "must be an object"),
            ("data", "null", "data", "is missing or null"),
            (
                "data.ticket",
                "null",
                "data.ticket",
                "is missing or null (required for ticket events)",
            ),
            ("data.ticket", "\"x\"", "data.ticket", "must be an object"),
            (
                "data.ticket.id",
                "null",
                "data.ticket.id",
                "is missing or null",
            ),
            (
                "data.ticket.id",
                "\"\"",
                "data.ticket.id",
                "must not be empty",
            ),
            ("data.ticket.id", "42", "data.ticket.id", "must be a string"),
        ];
        for (field, value, named, reason) in cases {
            let body = with(field, value);
            assert_eq!(
                refused(&body),
                (named.to_owned(), reason.to_owned()),
                "{field}={value}"
            );
        }
    }

    #[test]
    fn other_event_types_need_no_ticket() {
        let body = with("event_type", "\"order_paid\"");
        let body = with_data_without_ticket(&body);
        let env = parse(&body).unwrap();
        assert_eq!(env.ticket_id, None);
    }

    fn with_data_without_ticket(body: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
        v["data"] = serde_json::json!({"order": {"id": "o-1"}});
        v.to_string()
    }

    #[test]
    fn deep_nesting_anywhere_and_long_ids_are_refused() {
        let nested = |levels: usize| {
            let value = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            CREATED.replacen('{', &format!("{{\"extra\":{value},"), 1)
        };
        // The envelope object is one level; 128 in all is accepted, 129 is not.
        assert!(parse(&nested(127)).is_ok());
        assert!(matches!(parse(&nested(128)), Err(EnvelopeError::Json(m)) if m.contains("128")));
        let in_string = format!("\"{}\"", "[".repeat(500));
        assert!(
            parse(&with("extra", &in_string)).is_ok(),
            "brackets in strings do not nest"
        );
        let long = format!("\"{}\"", "e".repeat(257));
        assert_eq!(
            refused(&with("event_id", &long)),
            ("event_id".into(), "must be at most 256 bytes".into())
        );
    }

    #[test]
    fn unknown_fields_are_allowed() {
        let body = with("brand_new_field", r#"{"nested": [1, 2, 3]}"#);
        assert!(parse(&body).is_ok());
    }

    #[test]
    fn not_json_and_hostile_json_are_refused_as_json() {
        let deep = "[".repeat(100_000);
        let huge_number = format!(
            r#"{{"event_id":"e","n":{},"event_type":"x"}}"#,
            "9".repeat(500)
        );
        for body in [
            "",
            "not json",
            "[]",
            "\"string\"",
            "{\"event_id\": ",
            &deep,
            r#"{"event_id":"a","event_id":"b"}"#,
        ] {
            assert!(
                matches!(parse(body), Err(EnvelopeError::Json(_))),
                "{:.40}",
                body
            );
        }
        // A number too large for any integer type in an unknown field is carried as it is.
        assert!(matches!(
            parse(&huge_number),
            Err(EnvelopeError::Field {
                field: "api_version",
                ..
            })
        ));
        let invalid_utf8 = b"{\"event_id\":\"\xff\xfe\"}";
        assert!(matches!(
            Envelope::parse_bytes(invalid_utf8),
            Err(EnvelopeError::Json(_))
        ));
    }
}
