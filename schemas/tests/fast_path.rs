//! The decode fast path against the strict decoder.
//!
//! The fast path (`decode_canonical`) may only ever say "this is increment X" for
//! bodies the strict decoder accepts as exactly X, and otherwise decline; the public
//! `decode_increment` must answer exactly as the strict decoder does on every input
//! (acceptance, decoded value, rejection reason and detail). The generators below
//! are biased towards bodies that are almost canonical (the ones a hand-written
//! recogniser is likely to get wrong), not only random bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use tally_schemas::decode_increment;
use tally_schemas::increment::{decode_canonical, decode_increment_strict};
use uuid::Uuid;

/// The property itself: the fast path is never wrong and the public decoder is the
/// strict decoder. Returns which of the three cases the input fell into.
fn check_agreement(bytes: &[u8]) -> Result<Case, TestCaseError> {
    let strict = decode_increment_strict(bytes);
    let fast = decode_canonical(bytes);
    if let Some(increment) = fast {
        prop_assert_eq!(
            &strict,
            &Ok(increment),
            "fast path accepted {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    prop_assert_eq!(
        decode_increment(bytes),
        strict.clone(),
        "public decoder differs from the strict one on {:?}",
        String::from_utf8_lossy(bytes)
    );
    Ok(match (fast, strict) {
        (Some(_), _) => Case::Fast,
        (None, Ok(_)) => Case::AcceptedByFallback,
        (None, Err(_)) => Case::Rejected,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Case {
    Fast,
    AcceptedByFallback,
    Rejected,
}

/// Whitespace between tokens: mostly JSON's own (the fast path's set), sometimes
/// characters that look like whitespace but are not JSON whitespace.
fn whitespace() -> impl Strategy<Value = String> {
    let json = prop_oneof![
        6 => Just(""),
        2 => Just(" "),
        1 => Just("\t"),
        1 => Just("\n"),
        1 => Just("\r"),
        1 => Just("\r\n"),
    ];
    let foreign = prop_oneof![
        Just("\u{0c}"),   // form feed
        Just("\u{0b}"),   // vertical tab
        Just("\u{a0}"),   // no-break space
        Just("\u{feff}"), // byte-order mark
    ];
    prop_oneof![
        40 => proptest::collection::vec(json, 0..3).prop_map(|pieces| pieces.concat()),
        1 => (foreign, " ?").prop_map(|(odd, space)| format!("{odd}{space}")),
    ]
}

#[derive(Debug, Clone, Copy)]
enum KeyForm {
    Lower,
    Upper,
    Mixed,
    /// One character written as a JSON `\u` escape: valid, not for the fast path.
    Escaped,
    NoHyphens,
    Braces,
    Urn,
    BadCharacter,
    Short,
    Long,
    HyphenMoved,
}

/// A UUID's text in the forms producers write, right and almost right.
fn key_text() -> impl Strategy<Value = String> {
    let form = prop_oneof![
        24 => Just(KeyForm::Lower),
        6 => Just(KeyForm::Upper),
        6 => Just(KeyForm::Mixed),
        12 => Just(KeyForm::Escaped),
        1 => Just(KeyForm::NoHyphens),
        1 => Just(KeyForm::Braces),
        1 => Just(KeyForm::Urn),
        1 => Just(KeyForm::BadCharacter),
        1 => Just(KeyForm::Short),
        1 => Just(KeyForm::Long),
        1 => Just(KeyForm::HyphenMoved),
    ];
    (any::<u128>(), form, any::<u64>()).prop_map(|(bits, form, noise)| {
        let lower = Uuid::from_u128(bits).hyphenated().to_string();
        let at = (noise % 36) as usize;
        match form {
            KeyForm::Lower => lower,
            KeyForm::Upper => lower.to_uppercase(),
            KeyForm::Mixed => lower
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if (noise >> (i % 64)) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
            KeyForm::Escaped => {
                let c = lower.as_bytes()[at];
                format!("{}\\u{:04x}{}", &lower[..at], c, &lower[at + 1..])
            }
            KeyForm::NoHyphens => lower.replace('-', ""),
            KeyForm::Braces => format!("{{{lower}}}"),
            KeyForm::Urn => format!("urn:uuid:{lower}"),
            KeyForm::BadCharacter => {
                let replacement = ["g", "-", "G", " ", "\\\"", "é", "\\n"][(noise % 7) as usize];
                format!("{}{}{}", &lower[..at], replacement, &lower[at + 1..])
            }
            KeyForm::Short => lower[..35].to_owned(),
            KeyForm::Long => format!("{lower}0"),
            KeyForm::HyphenMoved => format!("{}-{}", &lower[..8], &lower[9..]),
        }
    })
}

/// The `key` field's JSON value: mostly a string.
fn key_json() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => key_text().prop_map(|text| format!("\"{text}\"")),
        1 => Just("null".to_owned()),
        1 => Just("42".to_owned()),
        1 => Just("[]".to_owned()),
        1 => key_text().prop_map(|text| format!("{{\"k\":\"{text}\"}}")),
        1 => key_text().prop_map(|text| format!("\"{text}")), // unterminated
    ]
}

/// The `value` field's JSON value: integers of every length near the limits, and
/// the number forms the contract refuses.
fn value_json() -> impl Strategy<Value = String> {
    let boundaries = prop_oneof![
        Just("9223372036854775807"),
        Just("9223372036854775808"),
        Just("9223372036854775806"),
        Just("9999999999999999999"),
        Just("10000000000000000000"),
        Just("1000000000000000000"),
        Just("18446744073709551615"),
        Just("18446744073709551616"),
        Just("0"),
        Just("-0"),
        Just("00"),
        Just("01"),
    ];
    let not_integers = prop_oneof![
        Just("1.0"),
        Just("1e3"),
        Just("1E3"),
        Just("1e-0"),
        Just("1."),
        Just("+1"),
        Just("\"1\""),
        Just("null"),
        Just("true"),
        Just("[1]"),
        Just("0x1f"),
        Just("1_000"),
        Just("Infinity"),
    ];
    prop_oneof![
        24 => (1i64..=i64::MAX).prop_map(|v| v.to_string()),
        12 => (1i64..=1000).prop_map(|v| v.to_string()),
        2 => "[0-9]{1,45}", // any digits: leading zeros, 20+ digits
        1 => (1usize..30, "[1-9][0-9]{0,20}").prop_map(|(zeros, digits)| format!("{}{digits}", "0".repeat(zeros))),
        2 => boundaries.prop_map(str::to_owned),
        1 => (i64::MIN..=0).prop_map(|v| v.to_string()),
        1 => not_integers.prop_map(str::to_owned),
        1 => "[0-9]{1,5}[.eE][0-9]{1,3}",
    ]
}

/// One member of the object: mostly `key` or `value`, sometimes an escaped,
/// misspelt or extra name.
fn member() -> impl Strategy<Value = String> {
    let name_key = prop_oneof![
        30 => Just("\"key\""),
        6 => Just("\"k\\u0065y\""),
        1 => Just("\"Key\""),
        1 => Just("\"key \""),
        1 => Just("key"),
    ];
    let name_value = prop_oneof![
        30 => Just("\"value\""),
        6 => Just("\"valu\\u0065\""),
        1 => Just("\"VALUE\""),
        1 => Just("\"values\""),
    ];
    let colon = prop_oneof![30 => Just(":"), 1 => Just("="), 1 => Just("::"), 1 => Just("")];
    prop_oneof![
        10 => (name_key, whitespace(), colon.clone(), whitespace(), key_json())
            .prop_map(|(n, a, c, b, v)| format!("{n}{a}{c}{b}{v}")),
        10 => (name_value, whitespace(), colon.clone(), whitespace(), value_json())
            .prop_map(|(n, a, c, b, v)| format!("{n}{a}{c}{b}{v}")),
        1 => (whitespace(), colon, value_json()).prop_map(|(a, c, v)| format!("\"extra\"{a}{c}{v}")),
    ]
}

/// A body assembled from members, separators, braces and surrounding bytes. Most
/// have one `key` and one `value` member in either order; the rest any list of
/// members (missing, duplicated, extra).
fn near_canonical_body() -> impl Strategy<Value = Vec<u8>> {
    let key_and_value = (member_of("key"), member_of("value"), any::<bool>()).prop_map(
        |(key, value, value_first)| {
            if value_first {
                vec![value, key]
            } else {
                vec![key, value]
            }
        },
    );
    let members = prop_oneof![
        4 => key_and_value,
        1 => proptest::collection::vec(member(), 0..5),
    ];
    let separator = prop_oneof![30 => Just(","), 1 => Just(",,"), 1 => Just(";"), 1 => Just("")];
    let open = prop_oneof![30 => Just("{"), 1 => Just("["), 1 => Just(""), 1 => Just("{{")];
    let close = prop_oneof![
        30 => Just("}"),
        1 => Just("]"),
        1 => Just(""),
        1 => Just("}}"),
        1 => Just(",}"),
    ];
    let trailing = prop_oneof![
        30 => whitespace(),
        1 => Just("x".to_owned()),
        1 => Just("\u{0}".to_owned()),
        1 => Just("{}".to_owned()),
        1 => Just("{\"key\":1}".to_owned()),
    ];
    (
        whitespace(),
        open,
        members,
        (whitespace(), separator, whitespace()),
        whitespace(),
        close,
        trailing,
    )
        .prop_map(
            |(lead, open, members, (a, separator, b), before_close, close, trailing)| {
                let separator = format!("{a}{separator}{b}");
                format!(
                    "{lead}{open}{}{before_close}{close}{trailing}",
                    members.join(&separator)
                )
                .into_bytes()
            },
        )
}

/// A well-named `key` or `value` member with JSON whitespace around its colon.
fn member_of(name: &'static str) -> impl Strategy<Value = String> {
    let json = if name == "key" {
        key_json().boxed()
    } else {
        value_json().boxed()
    };
    (whitespace(), whitespace(), json).prop_map(move |(a, b, v)| format!("\"{name}\"{a}:{b}{v}"))
}

/// A canonical body with a few random byte edits (insert, delete, replace), from an
/// alphabet of JSON-significant bytes and arbitrary ones.
fn mutated_canonical_body() -> impl Strategy<Value = Vec<u8>> {
    let alphabet: &'static [u8] = b"{}[]\":,.-+eE0123456789abcdefABCDEFgxz \t\n\r\\u\x0c\x00\xff";
    let edit = (
        0..3u8,
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        any::<bool>(),
    );
    (
        any::<u128>(),
        1i64..=i64::MAX,
        proptest::collection::vec(edit, 1..4),
    )
        .prop_map(move |(bits, value, edits)| {
            let mut bytes = format!(
                r#"{{"key":"{}","value":{value}}}"#,
                Uuid::from_u128(bits).hyphenated()
            )
            .into_bytes();
            for (kind, at, pick, raw, from_alphabet) in edits {
                let byte = if from_alphabet {
                    alphabet[pick.index(alphabet.len())]
                } else {
                    raw
                };
                match kind {
                    0 => {
                        let at = at.index(bytes.len() + 1);
                        bytes.insert(at, byte);
                    }
                    1 if !bytes.is_empty() => {
                        let at = at.index(bytes.len());
                        bytes.remove(at);
                    }
                    _ if !bytes.is_empty() => {
                        let at = at.index(bytes.len());
                        bytes[at] = byte;
                    }
                    _ => {}
                }
            }
            bytes
        })
}

/// Canonical bodies as producers write them, with JSON whitespace and either order.
fn canonical_body() -> impl Strategy<Value = (Vec<u8>, Uuid, i64)> {
    let json_ws = proptest::collection::vec(
        prop_oneof![Just(""), Just(" "), Just("\t"), Just("\n"), Just("\r")],
        8,
    );
    (
        any::<u128>(),
        1i64..=i64::MAX,
        0..3u8,
        any::<bool>(),
        json_ws,
    )
        .prop_map(|(bits, value, case, value_first, ws)| {
            let uuid = Uuid::from_u128(bits);
            let lower = uuid.hyphenated().to_string();
            let text = match case {
                0 => lower,
                1 => lower.to_uppercase(),
                _ => lower
                    .char_indices()
                    .map(|(i, c)| {
                        if i % 3 == 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect(),
            };
            let key = format!("\"key\"{}:{}\"{text}\"", ws[2], ws[3]);
            let value_member = format!("\"value\"{}:{}{value}", ws[4], ws[5]);
            let (first, second) = if value_first {
                (value_member, key)
            } else {
                (key, value_member)
            };
            let body = format!(
                "{}{{{}{first}{},{second}{}}}{}",
                ws[0], ws[1], ws[6], ws[7], ws[0]
            );
            (body.into_bytes(), uuid, value)
        })
}

proptest! {
    #![proptest_config(Config::with_cases(4096))]

    #[test]
    fn agrees_on_near_canonical_bodies(bytes in near_canonical_body()) {
        check_agreement(&bytes)?;
    }

    #[test]
    fn agrees_on_mutated_canonical_bodies(bytes in mutated_canonical_body()) {
        check_agreement(&bytes)?;
    }

    #[test]
    fn agrees_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        check_agreement(&bytes)?;
    }

    #[test]
    fn canonical_bodies_take_the_fast_path((bytes, key, value) in canonical_body()) {
        prop_assert_eq!(
            decode_canonical(&bytes),
            Some(tally_schemas::Increment { key, value }),
            "{:?}", String::from_utf8_lossy(&bytes)
        );
        prop_assert_eq!(check_agreement(&bytes)?, Case::Fast);
    }
}

/// The generators are only worth something if they reach all three outcomes often:
/// bodies the fast path takes, bodies only the strict decoder accepts, rejections.
#[test]
fn near_canonical_generators_reach_every_outcome() {
    let mut runner = TestRunner::deterministic();
    let count = |strategy: BoxedStrategy<Vec<u8>>, runner: &mut TestRunner| {
        let mut seen = std::collections::HashMap::new();
        for _ in 0..4000 {
            let bytes = strategy.new_tree(runner).unwrap().current();
            let case = check_agreement(&bytes).unwrap();
            *seen.entry(case).or_insert(0usize) += 1;
        }
        seen
    };
    let near = count(near_canonical_body().boxed(), &mut runner);
    for case in [Case::Fast, Case::AcceptedByFallback, Case::Rejected] {
        let n = near.get(&case).copied().unwrap_or(0);
        assert!(
            n >= 200,
            "only {n} of 4000 near-canonical bodies were {case:?}: {near:?}"
        );
    }
    let mutated = count(mutated_canonical_body().boxed(), &mut runner);
    for case in [Case::Fast, Case::Rejected] {
        let n = mutated.get(&case).copied().unwrap_or(0);
        assert!(
            n >= 200,
            "only {n} of 4000 mutated bodies were {case:?}: {mutated:?}"
        );
    }
    eprintln!("near-canonical: {near:?}; mutated: {mutated:?}");
}

/// Hand-picked edges: what the fast path takes, and what it must leave to the
/// strict decoder (which then accepts or rejects as the contract says).
#[test]
fn fast_path_edges() {
    const KEY: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let taken = [
        format!(r#"{{"key":"{KEY}","value":1}}"#),
        format!(
            r#"{{"key":"{}","value":9223372036854775807}}"#,
            KEY.to_uppercase()
        ),
        format!(" \r\n{{ \"value\" : 7 ,\t\"key\" : \"{KEY}\" }}\n"),
    ];
    for body in &taken {
        assert!(decode_canonical(body.as_bytes()).is_some(), "{body}");
        assert_eq!(
            check_agreement(body.as_bytes()).unwrap(),
            Case::Fast,
            "{body}"
        );
    }
    let accepted_by_fallback = [
        format!(r#"{{"key":"\u0030{}","value":1}}"#, &KEY[1..]),
        format!(r#"{{"k\u0065y":"{KEY}","value":1}}"#),
        format!(r#"{{"key":"{KEY}","valu\u0065":1}}"#),
    ];
    for body in &accepted_by_fallback {
        assert_eq!(decode_canonical(body.as_bytes()), None, "{body}");
        assert_eq!(
            check_agreement(body.as_bytes()).unwrap(),
            Case::AcceptedByFallback,
            "{body}"
        );
    }
    let rejected = [
        format!(r#"{{"key":"{KEY}","value":0}}"#),
        format!(r#"{{"key":"{KEY}","value":01}}"#),
        format!(r#"{{"key":"{KEY}","value":9223372036854775808}}"#),
        format!(r#"{{"key":"{KEY}","value":99999999999999999999}}"#),
        format!(r#"{{"key":"{KEY}","value":1.0}}"#),
        format!(r#"{{"key":"{KEY}","value":1e3}}"#),
        format!(r#"{{"key":"{KEY}","value":-1}}"#),
        format!(r#"{{"key":"{KEY}","value":1,"value":1}}"#),
        format!(r#"{{"key":"{KEY}","key":"{KEY}","value":1}}"#),
        format!(r#"{{"key":"{KEY}","value":1}}x"#),
        format!(r#"{{"key":"{KEY}","value":1}} {{}}"#),
        format!("\u{0c}{{\"key\":\"{KEY}\",\"value\":1}}"),
        format!("{{\"key\":\"{KEY}\",\"value\":1}}\u{0b}"),
        format!(r#"{{"key":"{}","value":1}}"#, KEY.replace('-', "")),
        format!(r#"{{"key":"{{{KEY}}}","value":1}}"#),
        format!(r#"{{"key":"{KEY}","value":1,}}"#),
        format!(r#"{{"key":"{KEY}"}}"#),
    ];
    for body in &rejected {
        assert_eq!(decode_canonical(body.as_bytes()), None, "{body}");
        assert_eq!(
            check_agreement(body.as_bytes()).unwrap(),
            Case::Rejected,
            "{body}"
        );
    }
}
