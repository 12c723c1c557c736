//! The envelope parser and the default route on arbitrary bytes: never panics; an accepted
//! envelope has the fields the rules require, and a ticket event routes to a non-empty key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tamio_kafka_bridge::config::Settings;
use tamio_kafka_bridge::ingest::envelope::Envelope;
use tamio_kafka_bridge::ingest::route::Routes;

fn routes() -> &'static Routes {
    static ROUTES: OnceLock<Routes> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let settings = Settings::load_from(None, Vec::new()).unwrap();
        Routes::build(&settings.routes, &settings.kafka.topic, None).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::parse_bytes(data) {
        assert!(!envelope.event_id.trim().is_empty());
        assert!(!envelope.event_type.trim().is_empty());
        assert!(!envelope.endpoint_id.trim().is_empty());
        assert_eq!(envelope.api_version, 2);
        if let Ok(destination) = routes().route(&envelope, data) {
            assert!(destination.key.is_some_and(|k| !k.is_empty()));
            assert!(envelope.ticket_id.is_some());
        }
    }
});
