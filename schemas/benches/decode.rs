//! ns per decoded increment body: the strict decoder alone against the public
//! decoder (fast path, strict fallback), on canonical and non-canonical bodies.
//!
//! Run with `cargo bench -p tally-schemas --bench decode`. Each case decodes the
//! same body over and over (the body stays in cache, as a record just read from a
//! Kafka batch does); the `_fallback` cases show what the fast path costs when it
//! declines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use tally_schemas::decode_increment;
use tally_schemas::increment::{decode_canonical, decode_increment_strict};

const KEY: &str = "5f0c3b8e-9a41-4d2e-b7c6-1e2f3a4b5c6d";

fn cases() -> Vec<(&'static str, String)> {
    vec![
        // What `Increment::to_json` and the edge produce: the common case.
        ("canonical", format!(r#"{{"key":"{KEY}","value":42}}"#)),
        (
            "canonical_max_value",
            format!(r#"{{"key":"{KEY}","value":9223372036854775807}}"#),
        ),
        (
            "upper_case_key",
            format!(r#"{{"key":"{}","value":42}}"#, KEY.to_uppercase()),
        ),
        (
            "spaced_value_first",
            format!("{{ \"value\": 42, \"key\": \"{KEY}\" }}\n"),
        ),
        // Accepted, but only by the strict decoder.
        (
            "escaped_key_fallback",
            format!(r#"{{"key":"\u0035{}","value":42}}"#, &KEY[1..]),
        ),
        // Rejections: always the strict decoder's answer.
        (
            "zero_value_fallback",
            format!(r#"{{"key":"{KEY}","value":0}}"#),
        ),
        (
            "unknown_field_fallback",
            format!(r#"{{"key":"{KEY}","value":42,"extra":1}}"#),
        ),
        ("malformed_fallback", format!(r#"{{"key":"{KEY}","value":"#)),
    ]
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    for (name, body) in cases() {
        let bytes = body.as_bytes();
        // Both decoders must give the same answer for the comparison to mean anything.
        assert_eq!(
            decode_increment(bytes),
            decode_increment_strict(bytes),
            "{name}"
        );
        group.bench_function(format!("{name}/strict"), |b| {
            b.iter(|| decode_increment_strict(black_box(bytes)))
        });
        group.bench_function(format!("{name}/public"), |b| {
            b.iter(|| decode_increment(black_box(bytes)))
        });
    }
    group.bench_function("canonical/fast_path_only", |b| {
        let body = format!(r#"{{"key":"{KEY}","value":42}}"#);
        b.iter(|| decode_canonical(black_box(body.as_bytes())))
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    decode(&mut criterion);
    criterion.final_summary();
}
