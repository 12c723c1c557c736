//! The signature header parsers of every scheme on arbitrary text: none panics, and whatever
//! they accept has the parts the scheme needs (a timestamp and at least one 32-byte MAC for
//! `tamio`, at least one MAC for `standard-webhooks`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tamio_kafka_bridge::config::MacEncoding;
use tamio_kafka_bridge::ingest::verify::{
    parse_header, parse_plain_mac, parse_standard_signatures, standard_webhooks_key,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(parsed) = parse_header(text) {
            assert!(!parsed.macs.is_empty());
            assert!(parsed.timestamp >= 0);
            assert_eq!(parsed.timestamp_text.parse::<i64>().ok(), Some(parsed.timestamp));
        }
        if let Ok(macs) = parse_standard_signatures(text) {
            assert!(!macs.is_empty());
        }
        let _ = parse_plain_mac(text, MacEncoding::Hex);
        let _ = parse_plain_mac(text, MacEncoding::Base64);
    }
    if let Ok(key) = standard_webhooks_key(data) {
        assert!(!key.is_empty());
    }
});
