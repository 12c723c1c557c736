//! Where a valid event goes: its topic and its record key.
//!
//! Ticket events (`whitelabel_ticket_*`) go to `kafka.topic`, keyed by `data.ticket.id`, so
//! that every event of one ticket lands in one partition, in order. Other event types are
//! refused with 400: this bridge publishes the ticket family only, and a record without a
//! ticket key would break the topic's per-ticket ordering contract.

use std::borrow::Cow;

use super::envelope::{Envelope, TICKET_EVENT_PREFIX};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("event_type `{0}` is not routed: this bridge publishes `{TICKET_EVENT_PREFIX}*` events only")]
    Unroutable(String),
}

/// The topic and key of one record.
#[derive(Debug, PartialEq, Eq)]
pub struct Destination<'a> {
    pub topic: &'a str,
    pub key: Cow<'a, str>,
}

/// Picks the destination of `envelope` given the configured ticket topic.
pub fn route<'a>(
    envelope: &'a Envelope<'_>,
    topic: &'a str,
) -> Result<Destination<'a>, RouteError> {
    match &envelope.ticket_id {
        Some(id) if envelope.event_type.starts_with(TICKET_EVENT_PREFIX) => Ok(Destination {
            topic,
            key: Cow::Borrowed(id.as_ref()),
        }),
        _ => Err(RouteError::Unroutable(
            envelope.event_type.chars().take(100).collect(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope<'a>(event_type: &'a str, ticket: Option<&'a str>) -> Envelope<'a> {
        Envelope {
            event_id: "e".into(),
            event_type: event_type.into(),
            endpoint_id: "ep".into(),
            api_version: 2,
            ticket_id: ticket.map(Cow::Borrowed),
        }
    }

    #[test]
    fn ticket_events_are_keyed_by_ticket_id() {
        let env = envelope("whitelabel_ticket_updated", Some("t-1"));
        let d = route(&env, "tamio.tickets").unwrap();
        assert_eq!(
            d,
            Destination {
                topic: "tamio.tickets",
                key: "t-1".into()
            }
        );
    }

    #[test]
    fn other_event_types_are_refused_by_name() {
        let env = envelope("order_paid", None);
        let err = route(&env, "tamio.tickets").unwrap_err();
        assert!(err.to_string().contains("`order_paid`"), "{err}");
    }
}
