//! Property tests of everything that reads bytes from the network: the AMQP
//! content header parser, the contract's decoder and the stored-record
//! codec. Whatever a publisher sends, reading it never panics and always
//! ends in a task or a dead-letter reason; a task always turns back into
//! publishable properties and a record that reads back the same.
//!
//! The number of cases follows `PROPTEST_CASES` (scripts/test.sh runs the
//! default; raise it for a longer hunt). The same checks run under
//! cargo-fuzz from `fuzz/` where a nightly toolchain is available.

mod support;

use kairos_shared::record;
use lapin::protocol::basic::parse_properties;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use proptest::prelude::*;
use support::{encode, take};

/// A header value of any type a publisher can put on the wire, nested up to
/// a few levels. (`AMQPValue::ShortString` has no wire tag: RabbitMQ reads
/// `s` as a short integer, so no client can send one.)
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        long_bytes().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        proptest::collection::vec(any::<u8>(), 0..32)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
        integer_text().prop_map(|s| AMQPValue::LongString(LongString::from(s.into_bytes()))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::vec((header_name(), inner), 0..6)
                .prop_map(|kv| AMQPValue::FieldTable(table(kv))),
        ]
    })
}

/// Text that fits a short string (at most 255 bytes), with odd characters.
fn short_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z.]{0,20}",
        "\\PC{0,40}",
        Just(String::new()),
        Just("\u{FFFD}".to_string()),
        "[a-z]{250,255}",
    ]
    .prop_filter("fits a short string", |s| s.len() <= 255)
}

/// Decimal strings a client might send for integer headers, in and far out
/// of range.
fn integer_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("99999999999999999999999".to_string()),
        Just(" 7 ".to_string()),
        Just("-0".to_string()),
        "[0-9a-z+-]{0,12}",
    ]
}

fn long_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        "\\PC{0,64}".prop_map(String::into_bytes),
    ]
}

/// Header names: the contract's own, and anything else.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-run-at".to_string()),
        Just("x-delay-ms".to_string()),
        Just("x-max-retries".to_string()),
        Just("x-timeout-ms".to_string()),
        Just("x-attempt".to_string()),
        Just("x-error".to_string()),
        Just("x-origin-queue".to_string()),
        Just("x-death".to_string()),
        Just("x-schedule-id".to_string()),
        short_text(),
    ]
}

fn table(kv: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert(ShortString::from(k), v);
    }
    t
}

prop_compose! {
    fn properties()(
        kind in proptest::option::of(short_text()),
        id in proptest::option::of(prop_oneof![short_text(), "[ -~]{1,128}"]),
        content_type in proptest::option::of(short_text()),
        correlation_id in proptest::option::of(short_text()),
        priority in proptest::option::of(any::<u8>()),
        delivery_mode in proptest::option::of(any::<u8>()),
        expiration in proptest::option::of(short_text()),
        headers in proptest::option::of(proptest::collection::vec((header_name(), amqp_value()), 0..8)),
    ) -> BasicProperties {
        let mut p = BasicProperties::default();
        if let Some(v) = kind { p = p.with_type(ShortString::from(v)); }
        if let Some(v) = id { p = p.with_message_id(ShortString::from(v)); }
        if let Some(v) = content_type { p = p.with_content_type(ShortString::from(v)); }
        if let Some(v) = correlation_id { p = p.with_correlation_id(ShortString::from(v)); }
        if let Some(v) = priority { p = p.with_priority(v); }
        if let Some(v) = delivery_mode { p = p.with_delivery_mode(v); }
        if let Some(v) = expiration { p = p.with_expiration(ShortString::from(v)); }
        if let Some(kv) = headers { p = p.with_headers(table(kv)); }
        p
    }
}

fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("default".to_string()),
        Just(String::new()),
        short_text()
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    /// Structured messages: every property and header type, nested tables,
    /// huge and negative integers, missing or odd type and id.
    #[test]
    fn any_message_is_a_task_or_a_reason(
        key in routing_key(),
        props in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        take(&key, &props, &body);
        // The same message after a trip over the wire reads the same way.
        if let Some(wire) = encode(&props) {
            let (_, parsed) = parse_properties(&wire[..]).expect("own encoding parses");
            take(&key, &parsed, &body);
        }
    }

    /// Raw content-header bytes as a hostile publisher could send them: the
    /// parser errs or yields properties, and those decode as above.
    #[test]
    fn any_header_bytes_parse_or_err(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((body, props)) = parse_properties(&bytes[..]) {
            take("default", &props, body);
        }
    }

    /// Stored records read from Redis are bytes too: any of them decode or err.
    #[test]
    fn any_record_bytes_decode_or_err(
        id in "[ -~]{1,40}",
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = record::decode(&id, &bytes);
    }
}
