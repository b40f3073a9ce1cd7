//! libFuzzer target: the stealth/advanced packet path (parse, classify, label) on any
//! bytes must never panic. Run with `cargo +nightly fuzz run packet_path`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portsentry_sensor::packet::{
    classify::{classify, label},
    parse::parse,
};

fuzz_target!(|bytes: &[u8]| {
    if let Some(packet) = parse(bytes)
        && let Some(kind) = classify(packet.flags)
    {
        assert!(!label(kind, packet.flags).is_empty());
    }
});
