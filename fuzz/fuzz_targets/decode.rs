//! Raw bytes as a hostile publisher could put them in a content header,
//! then in a stored record: parsing errs or yields a message, and every
//! message becomes a task or a dead-letter reason, never a panic.
#![no_main]

#[path = "../../shared/tests/support/mod.rs"]
mod support;

use lapin::protocol::basic::parse_properties;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a routing key; the rest is header then body.
    let Some((&key, rest)) = data.split_first() else {
        return;
    };
    let key = match key % 3 {
        0 => "default",
        1 => "",
        _ => "emails",
    };
    if let Ok((body, props)) = parse_properties(rest) {
        support::take(key, &props, body);
    }
    let _ = kairos_shared::record::decode("fuzz", rest);
});
