//! Where a valid event goes: the first route whose event-type pattern matches picks the topic
//! and the record key (a JSON pointer into the envelope).
//!
//! The defaults route `whitelabel_ticket_*` to `kafka.topic` keyed by `/data/ticket/id`, so
//! that every event of one ticket lands in one partition, in order. An event type no route
//! matches is refused with 400, unless a catch-all route (`*`) is configured.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::envelope::{Envelope, Key};
use crate::config::{invalid, RouteSetting, SettingsError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("event_type `{0}` matches no route; the bridge is not configured to publish it")]
    Unroutable(String),
    #[error("`{pointer}` is {problem}; the route for `{event_type}` needs it as the record key")]
    MissingKey {
        pointer: String,
        event_type: String,
        problem: &'static str,
    },
}

/// An event-type pattern: an exact name, `prefix*` (every type that starts with `prefix`),
/// or `*` (every type). Nothing else is accepted, so that a route an earlier one always
/// matches first is found for certain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    /// Parses a pattern; `Err` says why it is not one.
    pub fn parse(pattern: &str) -> Result<Pattern, String> {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err("`event_type` must not be empty (use `*` for every type)".into());
        }
        if !pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '*'))
        {
            return Err(format!(
                "`event_type` `{pattern}` may hold only letters, digits, `_ . -` and `*`"
            ));
        }
        match pattern.find('*') {
            None => Ok(Pattern::Exact(pattern.to_owned())),
            Some(at) if at == pattern.len() - 1 => Ok(Pattern::Prefix(pattern[..at].to_owned())),
            Some(_) => Err(format!(
                "`event_type` `{pattern}`: `*` may only end a pattern (`prefix*`, or `*` alone)"
            )),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == text,
            Pattern::Prefix(prefix) => text.starts_with(prefix.as_str()),
        }
    }

    /// True when every event type `other` matches is matched by `self` too.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::Exact(a), Pattern::Exact(b)) => a == b,
            (Pattern::Exact(_), Pattern::Prefix(_)) => false,
            (Pattern::Prefix(p), Pattern::Exact(b) | Pattern::Prefix(b)) => {
                b.starts_with(p.as_str())
            }
        }
    }
}

/// A parsed JSON pointer (RFC 6901).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    segments: Vec<String>,
}

impl Pointer {
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Err("the key pointer must not be empty (the whole envelope is no key)".into());
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not a JSON pointer: it must start with `/`"
            ));
        };
        let mut segments = Vec::new();
        for raw in rest.split('/') {
            let mut segment = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => segment.push('~'),
                        Some('1') => segment.push('/'),
                        _ => return Err(format!("`{text}`: `~` must be followed by 0 or 1")),
                    }
                } else {
                    segment.push(c);
                }
            }
            segments.push(segment);
        }
        Ok(Pointer {
            text: text.to_owned(),
            segments,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value at this pointer, as a key: a string, or a number's text. `Err` says what is
    /// wrong when there is none.
    fn resolve<'a>(
        &self,
        envelope: &Envelope<'a>,
        body: &'a [u8],
    ) -> Result<Cow<'a, str>, &'static str> {
        if let Some(ticket_id) = &envelope.ticket_id {
            if self.segments == ["data", "ticket", "id"] {
                // Already read and checked by the envelope parser.
                return Ok(ticket_id.clone());
            }
        }
        let Some((first, rest)) = self.segments.split_first() else {
            return Err("missing or null");
        };
        let value = match (first.as_str(), rest.is_empty()) {
            ("event_id", true) => return Ok(envelope.event_id.clone()),
            ("event_type", true) => return Ok(envelope.event_type.clone()),
            ("endpoint_id", true) => return Ok(envelope.endpoint_id.clone()),
            _ => serde_json::from_slice::<&RawValue>(body)
                .ok()
                .and_then(|root| walk(root, &self.segments)),
        };
        let value = value.ok_or("missing or null")?;
        let text = value.get();
        if text.starts_with('"') {
            let s = match serde_json::from_str::<&str>(text) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => {
                    Cow::Owned(serde_json::from_str::<String>(text).map_err(|_| "not a string")?)
                }
            };
            if s.is_empty() {
                return Err("an empty string");
            }
            Ok(s)
        } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            Ok(Cow::Borrowed(text))
        } else {
            Err("not a string or a number")
        }
    }
}

/// Follows `segments` from `value`, reading only what it needs; `None` where a step is
/// missing or null.
fn walk<'a>(mut value: &'a RawValue, segments: &[String]) -> Option<&'a RawValue> {
    for segment in segments {
        let mut de = serde_json::Deserializer::from_str(value.get());
        value = match value.get().as_bytes().first() {
            Some(b'{') => de.deserialize_map(Child(segment)).ok()??,
            Some(b'[') => {
                let index: usize = segment.parse().ok()?;
                de.deserialize_seq(Element(index)).ok()??
            }
            _ => return None,
        };
    }
    (value.get() != "null").then_some(value)
}

/// Finds one key of an object without building the object.
struct Child<'s>(&'s str);

impl<'de> Visitor<'de> for Child<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if found.is_none() && key.0 == self.0 {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Finds one element of an array.
struct Element(usize);

impl<'de> Visitor<'de> for Element {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut i = 0;
        loop {
            if i == self.0 {
                match seq.next_element::<&'de RawValue>()? {
                    Some(v) => found = Some(v),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }
}

/// One configured route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its place in the `routes` settings.
    pub index: usize,
    pub pattern: Pattern,
    pub topic: Arc<str>,
    pub key: Pointer,
    pub key_required: bool,
}

/// The topic and key of one record.
#[derive(Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    pub topic: &'a Arc<str>,
    pub key: Option<Cow<'a, str>>,
}

/// The configured routes, in order.
#[derive(Debug, Clone)]
pub struct Routes(Vec<Route>);

impl Routes {
    /// The routes of the `routes` settings, with `default_topic` for those that name none;
    /// or every reason they cannot work, each naming its route (`routes[1] (event_type ...)`).
    pub fn build(
        settings: &[RouteSetting],
        default_topic: &str,
        dead_letter_topic: Option<&str>,
    ) -> Result<Routes, Vec<SettingsError>> {
        let mut built: Vec<Route> = Vec::new();
        let mut errors = Vec::new();
        for (i, setting) in settings.iter().enumerate() {
            let name = format!("routes[{i}] (event_type `{}`)", setting.event_type);
            let route = match Route::from_setting(setting, default_topic) {
                Ok(route) => route,
                Err(reason) => {
                    errors.push(invalid("routes", format!("{name}: {reason}")));
                    continue;
                }
            };
            let earlier = built
                .iter()
                .enumerate()
                .find(|(_, e)| e.pattern.covers(&route.pattern));
            if let Some((j, _)) = earlier {
                errors.push(invalid(
                    "routes",
                    format!(
                        "{name} can never match: routes[{}] (event_type `{}`) comes first and \
                         matches everything it would",
                        built[j].index, settings[built[j].index].event_type
                    ),
                ));
                continue;
            }
            built.push(Route { index: i, ..route });
        }
        if let Some(dlt) = dead_letter_topic {
            if built.iter().any(|r| &*r.topic == dlt) {
                errors.push(invalid(
                    "kafka.dead_letter_topic",
                    "must differ from every route's topic",
                ));
            }
        }
        if errors.is_empty() {
            Ok(Routes(built))
        } else {
            Err(errors)
        }
    }

    /// Every topic a route writes to, once each.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        for r in &self.0 {
            if !topics.iter().any(|t| **t == *r.topic) {
                topics.push(r.topic.to_string());
            }
        }
        topics
    }

    /// Picks the destination of a valid envelope whose body is `body`.
    pub fn route<'a>(
        &'a self,
        envelope: &Envelope<'a>,
        body: &'a [u8],
    ) -> Result<Destination<'a>, RouteError> {
        let route = self
            .0
            .iter()
            .find(|r| r.pattern.matches(&envelope.event_type))
            .ok_or_else(|| {
                RouteError::Unroutable(envelope.event_type.chars().take(100).collect())
            })?;
        let key = match route.key.resolve(envelope, body) {
            Ok(key) => Some(key),
            Err(problem) if route.key_required => {
                return Err(RouteError::MissingKey {
                    pointer: route.key.as_str().to_owned(),
                    event_type: envelope.event_type.chars().take(100).collect(),
                    problem,
                })
            }
            Err(_) => None,
        };
        Ok(Destination {
            topic: &route.topic,
            key,
        })
    }
}

impl Route {
    /// Builds and checks one route; `default_topic` applies when it names none.
    pub fn from_setting(setting: &RouteSetting, default_topic: &str) -> Result<Route, String> {
        let pattern = Pattern::parse(&setting.event_type)?;
        let topic = setting.topic.as_deref().unwrap_or(default_topic);
        if !crate::config::valid_topic(topic) {
            return Err(format!("`topic` `{topic}`: {}", crate::config::TOPIC_RULE));
        }
        Ok(Route {
            index: 0,
            pattern,
            topic: Arc::from(topic),
            key: Pointer::parse(&setting.key)?,
            key_required: setting.key_required,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: &str = include_str!("../../tests/fixtures/whitelabel_ticket_created.json");

    fn routes(list: &[(&str, Option<&str>, &str, bool)]) -> Routes {
        Routes(
            list.iter()
                .map(|(p, t, k, req)| {
                    Route::from_setting(
                        &RouteSetting {
                            event_type: p.to_string(),
                            topic: t.map(str::to_owned),
                            key: k.to_string(),
                            key_required: *req,
                        },
                        "tamio.tickets",
                    )
                    .unwrap()
                })
                .collect(),
        )
    }

    #[test]
    fn patterns() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("whitelabel_ticket_*").matches("whitelabel_ticket_created"));
        assert!(!p("whitelabel_ticket_*").matches("whitelabel_order_created"));
        assert!(p("*").matches("anything"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exactly"));
        // A `*` anywhere but at the end is refused: the unreachable-route check could not
        // judge such a pattern.
        for bad in ["a*c", "*_created", "a**"] {
            let err = Pattern::parse(bad).unwrap_err();
            assert!(err.contains("may only end"), "{bad}: {err}");
        }
    }

    #[test]
    fn covering_patterns_make_later_routes_unreachable() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("*").covers(&p("x")));
        assert!(p("ticket_*").covers(&p("ticket_created")));
        assert!(p("ticket_*").covers(&p("ticket_c*")));
        assert!(p("ticket_*").covers(&p("ticket_*")));
        assert!(!p("ticket_c*").covers(&p("ticket_*")));
        assert!(p("a").covers(&p("a")));
        assert!(!p("ticket_*").covers(&p("order_*")));
        assert!(!p("ticket_created").covers(&p("ticket_*")));
        assert!(!p("a").covers(&p("b")));
    }

    #[test]
    fn default_route_keys_ticket_events_by_ticket_id() {
        let r = routes(&[("whitelabel_ticket_*", None, "/data/ticket/id", true)]);
        let env = Envelope::parse_bytes(CREATED.as_bytes()).unwrap();
        let d = r.route(&env, CREATED.as_bytes()).unwrap();
        assert_eq!(&**d.topic, "tamio.tickets");
        assert_eq!(
            d.key.as_deref(),
            Some("fbaddbf8-e290-4fa4-a3ed-fbb4837dabe1")
        );
        assert!(
            matches!(d.key, Some(Cow::Borrowed(_))),
            "no copy of the key"
        );
    }

    #[test]
    fn pointers_reach_any_field_and_missing_keys_are_named() {
        let r = routes(&[
            (
                "whitelabel_ticket_created",
                Some("by-client"),
                "/data/ticket/client/email",
                true,
            ),
            (
                "whitelabel_ticket_resolved",
                Some("by-reply"),
                "/data/ticket/replies/1/id",
                true,
            ),
            (
                "whitelabel_ticket_assigned",
                Some("by-missing"),
                "/data/ticket/nope",
                false,
            ),
            ("whitelabel_ticket_*", None, "/data/ticket/nope", true),
            ("*", Some("tamio.events"), "/event_id", true),
        ]);
        let body = CREATED.as_bytes();
        let env = Envelope::parse_bytes(body).unwrap();
        let d = r.route(&env, body).unwrap();
        assert_eq!(
            (&**d.topic, d.key.as_deref()),
            ("by-client", Some("client.doe@plugnpaid.com"))
        );

        let resolved = CREATED.replace("whitelabel_ticket_created", "whitelabel_ticket_resolved");
        let env = Envelope::parse_bytes(resolved.as_bytes()).unwrap();
        let d = r.route(&env, resolved.as_bytes()).unwrap();
        assert_eq!(
            d.key.as_deref(),
            Some("39634217-9aa9-4a3c-8354-ef4bc2b9b08f")
        );

        let assigned = CREATED.replace("whitelabel_ticket_created", "whitelabel_ticket_assigned");
        let env = Envelope::parse_bytes(assigned.as_bytes()).unwrap();
        assert_eq!(r.route(&env, assigned.as_bytes()).unwrap().key, None);

        let updated = CREATED.replace("whitelabel_ticket_created", "whitelabel_ticket_updated");
        let env = Envelope::parse_bytes(updated.as_bytes()).unwrap();
        let err = r.route(&env, updated.as_bytes()).unwrap_err();
        assert!(
            err.to_string()
                .contains("`/data/ticket/nope` is missing or null"),
            "{err}"
        );

        let other = CREATED.replace("whitelabel_ticket_created", "invoice_paid");
        let env = Envelope::parse_bytes(other.as_bytes()).unwrap();
        let d = r.route(&env, other.as_bytes()).unwrap();
        assert_eq!(
            (&**d.topic, d.key.as_deref()),
            ("tamio.events", Some("whev_o48n74r1vsv642vex"))
        );
    }

    #[test]
    fn unmatched_event_types_are_refused_by_name() {
        let r = routes(&[("whitelabel_ticket_*", None, "/data/ticket/id", true)]);
        let other = CREATED.replace("whitelabel_ticket_created", "invoice_paid");
        let env = Envelope::parse_bytes(other.as_bytes()).unwrap();
        let err = r.route(&env, other.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("`invoice_paid`"), "{err}");
    }

    #[test]
    fn pointer_syntax() {
        assert!(Pointer::parse("").is_err());
        assert!(Pointer::parse("data/ticket").is_err());
        assert!(Pointer::parse("/a~2b").is_err());
        assert_eq!(Pointer::parse("/a~1b/~0c").unwrap().segments, ["a/b", "~c"]);
    }
}
