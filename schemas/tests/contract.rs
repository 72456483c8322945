//! Every rule of the increment contract and its edges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tally_schemas::{decode_batch, decode_increment, BatchFormat, BatchRejection, RejectReason};

const KEY: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

fn reason_of(body: &str) -> RejectReason {
    match decode_increment(body.as_bytes()) {
        Ok(increment) => panic!("{body:?} was accepted as {increment:?}"),
        Err(err) => {
            assert!(!err.detail.is_empty(), "{body:?}: empty detail");
            err.reason
        }
    }
}

fn body(value: &str) -> String {
    format!(r#"{{"key":"{KEY}","value":{value}}}"#)
}

#[test]
fn accepts_a_plain_increment() {
    let inc = decode_increment(body("1").as_bytes()).unwrap();
    assert_eq!(inc.canonical_key(), KEY);
    assert_eq!(inc.value, 1);
}

#[test]
fn accepts_whitespace_and_either_field_order() {
    let text = format!(" \n{{ \"value\" : 7 ,\t\"key\" : \"{KEY}\" }}\r\n");
    let inc = decode_increment(text.as_bytes()).unwrap();
    assert_eq!(inc.value, 7);
    assert_eq!(inc.canonical_key(), KEY);
}

#[test]
fn value_bounds() {
    assert_eq!(reason_of(&body("0")), RejectReason::InvalidValue);
    assert_eq!(reason_of(&body("-1")), RejectReason::InvalidValue);
    assert_eq!(
        reason_of(&body("-9223372036854775808")),
        RejectReason::InvalidValue
    );
    let max = decode_increment(body("9223372036854775807").as_bytes()).unwrap();
    assert_eq!(max.value, i64::MAX);
    // 2^63 and beyond.
    assert_eq!(
        reason_of(&body("9223372036854775808")),
        RejectReason::InvalidValue
    );
    assert_eq!(
        reason_of(&body("18446744073709551616")),
        RejectReason::InvalidValue
    );
    assert_eq!(
        reason_of(&body(&"9".repeat(400))),
        RejectReason::InvalidValue
    );
}

#[test]
fn value_must_be_an_integer_literal() {
    for value in [
        "1.0",
        "1e3",
        "1E3",
        "1.5",
        "\"1\"",
        "null",
        "true",
        "[1]",
        "{\"n\":1}",
    ] {
        assert_eq!(
            reason_of(&body(value)),
            RejectReason::InvalidValue,
            "{value}"
        );
    }
}

#[test]
fn key_must_be_a_hyphenated_uuid() {
    let cases = [
        "\"not-a-uuid\"".to_owned(),
        format!("\"{{{KEY}}}\""),                // braces
        format!("\"urn:uuid:{KEY}\""),           // URN
        format!("\"{}\"", KEY.replace('-', "")), // 32 digits
        format!("\" {KEY}\""),
        format!("\"{KEY} \""),
        "\"0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4g\"".to_owned(),
        "\"0a1b2c3d4-e5f-4a6b-8c7d-9e0f1a2b3c4d\"".to_owned(),
        "\"\"".to_owned(),
        "null".to_owned(),
        "42".to_owned(),
        "[]".to_owned(),
        "{}".to_owned(),
    ];
    for key in cases {
        let text = format!(r#"{{"key":{key},"value":1}}"#);
        assert_eq!(reason_of(&text), RejectReason::InvalidKey, "{text}");
    }
}

#[test]
fn upper_case_key_is_canonicalised() {
    let text = format!(r#"{{"key":"{}","value":3}}"#, KEY.to_uppercase());
    let inc = decode_increment(text.as_bytes()).unwrap();
    assert_eq!(inc.canonical_key(), KEY);
    assert_eq!(inc.to_json(), format!(r#"{{"key":"{KEY}","value":3}}"#));
}

#[test]
fn escaped_key_text_is_decoded_first() {
    // JSON escapes are decoded before the UUID check; "\u0030" is "0".
    let text = format!(r#"{{"key":"\u0030{}","value":1}}"#, &KEY[1..]);
    assert_eq!(
        decode_increment(text.as_bytes()).unwrap().canonical_key(),
        KEY
    );
}

#[test]
fn fields_missing_extra_or_duplicated() {
    assert_eq!(reason_of("{}"), RejectReason::MissingKey);
    assert_eq!(reason_of(r#"{"value":1}"#), RejectReason::MissingKey);
    assert_eq!(
        reason_of(&format!(r#"{{"key":"{KEY}"}}"#)),
        RejectReason::MissingValue
    );
    assert_eq!(
        reason_of(&format!(r#"{{"key":"{KEY}","value":1,"extra":2}}"#)),
        RejectReason::UnknownField
    );
    assert_eq!(
        reason_of(&format!(r#"{{"key":"{KEY}","value":1,"Key":"x"}}"#)),
        RejectReason::UnknownField
    );
    assert_eq!(
        reason_of(&format!(r#"{{"key":"{KEY}","value":1,"value":2}}"#)),
        RejectReason::DuplicateField
    );
    assert_eq!(
        reason_of(&format!(r#"{{"key":"{KEY}","key":"{KEY}","value":1}}"#)),
        RejectReason::DuplicateField
    );
}

#[test]
fn malformed_json() {
    for text in [
        "",
        "   ",
        "{",
        "{\"key\"",
        "{'key': 1}",
        "nul",
        "{\"key\":\"x\",}",
        "{\"key\":\"x\",\"value\":1}}",
        "{\"value\":0,\"value\":",
    ] {
        assert_eq!(reason_of(text), RejectReason::InvalidJson, "{text:?}");
    }
    // Trailing garbage after a complete, valid object.
    assert_eq!(reason_of(&(body("1") + "x")), RejectReason::InvalidJson);
    assert_eq!(
        reason_of(&(body("1") + &body("1"))),
        RejectReason::InvalidJson
    );
    // Invalid UTF-8 is malformed JSON, wherever it is.
    let mut bytes = body("1").into_bytes();
    bytes.insert(10, 0xff);
    assert_eq!(
        decode_increment(&bytes).unwrap_err().reason,
        RejectReason::InvalidJson
    );
    assert_eq!(
        decode_increment(&[0xff, 0xfe]).unwrap_err().reason,
        RejectReason::InvalidJson
    );
}

#[test]
fn non_object_top_level() {
    for text in ["[]", "[1]", "1", "\"x\"", "true", "null"] {
        assert_eq!(reason_of(text), RejectReason::NotAnObject, "{text}");
    }
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    let deep_value = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(reason_of(&body(&deep_value)), RejectReason::InvalidValue);
    let deep_top = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(reason_of(&deep_top), RejectReason::NotAnObject);
    let deep_object = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    let reason = reason_of(&deep_object);
    assert_eq!(reason, RejectReason::UnknownField);
}

#[test]
fn batch_array_all_or_nothing() {
    let good = body("1");
    let text = format!("[{good},{good}]");
    assert_eq!(
        decode_batch(text.as_bytes(), BatchFormat::JsonArray, 10)
            .unwrap()
            .len(),
        2
    );
    let text = format!("[{good},{},{good},{}]", body("0"), body("1.5"));
    match decode_batch(text.as_bytes(), BatchFormat::JsonArray, 10) {
        Err(BatchRejection::Items(items)) => {
            let indexes: Vec<_> = items.iter().map(|i| i.index).collect();
            assert_eq!(indexes, vec![1, 3]);
            assert!(items
                .iter()
                .all(|i| i.error.reason == RejectReason::InvalidValue));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn batch_duplicate_fields_are_seen_inside_items() {
    let text = format!(r#"[{{"key":"{KEY}","value":1,"value":1}}]"#);
    match decode_batch(text.as_bytes(), BatchFormat::JsonArray, 10) {
        Err(BatchRejection::Items(items)) => {
            assert_eq!(items[0].error.reason, RejectReason::DuplicateField)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn batch_framing_errors() {
    let framing = |text: &str, format| match decode_batch(text.as_bytes(), format, 10) {
        Err(BatchRejection::Framing(err)) => err.reason,
        other => panic!("{text:?}: unexpected {other:?}"),
    };
    assert_eq!(
        framing("", BatchFormat::JsonArray),
        RejectReason::InvalidJson
    );
    assert_eq!(
        framing("[", BatchFormat::JsonArray),
        RejectReason::InvalidJson
    );
    assert_eq!(
        framing(&body("1"), BatchFormat::JsonArray),
        RejectReason::NotAnObject
    );
    // Well-formed but empty batches are their own rejection (HTTP 422 `empty_batch`).
    for (text, format) in [
        ("[]", BatchFormat::JsonArray),
        (" [ ] \n", BatchFormat::JsonArray),
        ("\n\n", BatchFormat::Ndjson),
        ("", BatchFormat::Ndjson),
    ] {
        assert_eq!(
            decode_batch(text.as_bytes(), format, 10),
            Err(BatchRejection::Empty),
            "{text:?}"
        );
    }
    let many = format!("[{}]", vec![body("1"); 11].join(","));
    assert!(matches!(
        decode_batch(many.as_bytes(), BatchFormat::JsonArray, 10),
        Err(BatchRejection::TooManyItems {
            count: 11,
            limit: 10
        })
    ));
}

#[test]
fn batch_ndjson() {
    let text = format!("{}\n\n{}\r\n{}\n", body("1"), body("2"), body("3"));
    let items = decode_batch(text.as_bytes(), BatchFormat::Ndjson, 10).unwrap();
    assert_eq!(items.iter().map(|i| i.value).collect::<Vec<_>>(), [1, 2, 3]);
    let text = format!("{}\n{{\n{}", body("1"), body("2"));
    match decode_batch(text.as_bytes(), BatchFormat::Ndjson, 10) {
        Err(BatchRejection::Items(items)) => {
            assert_eq!(items.len(), 1);
            assert_eq!(items[0].index, 1);
            assert_eq!(items[0].error.reason, RejectReason::InvalidJson);
        }
        other => panic!("unexpected {other:?}"),
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_valid_increment_round_trips(key in any::<u128>(), value in 1i64..=i64::MAX, upper in any::<bool>()) {
            let uuid = uuid::Uuid::from_u128(key);
            let text = if upper { uuid.hyphenated().to_string().to_uppercase() } else { uuid.hyphenated().to_string() };
            let body = format!(r#"{{"key":"{text}","value":{value}}}"#);
            let inc = decode_increment(body.as_bytes()).unwrap();
            prop_assert_eq!(inc.key, uuid);
            prop_assert_eq!(inc.value, value);
            prop_assert_eq!(decode_increment(inc.to_json().as_bytes()).unwrap(), inc);
        }

        #[test]
        fn non_positive_values_are_refused(value in i64::MIN..=0) {
            let text = body(&value.to_string());
            prop_assert_eq!(decode_increment(text.as_bytes()).unwrap_err().reason, RejectReason::InvalidValue);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_increment(&bytes);
            let _ = decode_batch(&bytes, BatchFormat::JsonArray, 100);
            let _ = decode_batch(&bytes, BatchFormat::Ndjson, 100);
        }
    }
}
