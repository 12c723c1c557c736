//! The signature header parser on arbitrary text: never panics, and whatever it accepts
//! has a timestamp and at least one 32-byte MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tamio_kafka_bridge::ingest::verify::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(parsed) = parse_header(text) {
            assert!(!parsed.macs.is_empty());
            assert!(parsed.timestamp >= 0);
            assert_eq!(parsed.timestamp_text.parse::<i64>().ok(), Some(parsed.timestamp));
        }
    }
});
