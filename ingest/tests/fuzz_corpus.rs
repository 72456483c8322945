//! The fuzz targets' seed corpus (`fuzz/corpus/`), replayed in the ordinary test run:
//! every seed goes through the same harness and the same checks as under `cargo fuzz`
//! (`tally_ingest::offline`), so the harness, its checks and the corpus cannot rot
//! between fuzz runs. The fuzz run itself is `scripts/fuzz.sh` (called by
//! `scripts/test.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use tally_ingest::offline::{self, OfflineEdge};

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn decoder_seeds_pass_the_decoder_checks() {
    let seeds = seeds("decoders");
    assert!(seeds.len() >= 20, "only {} decoder seeds", seeds.len());
    let (mut accepted, mut refused) = (0, 0);
    for (name, body) in &seeds {
        if let Err(problem) = offline::check_decoders(body) {
            panic!("seed {name}: {problem}");
        }
        match tally_schemas::decode_increment(body) {
            Ok(_) => accepted += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        accepted >= 3 && refused >= 10,
        "{accepted} accepted, {refused} refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_seeds_get_well_formed_answers() {
    let seeds = seeds("http_request");
    assert!(seeds.len() >= 30, "only {} HTTP seeds", seeds.len());
    let mut statuses = BTreeSet::new();
    for (name, input) in &seeds {
        // One edge per seed: the stand-in's mode is per edge.
        let edge = OfflineEdge::new(offline::fuzz_config()).unwrap();
        let (mode, input) = offline::split_stand_in_mode(input);
        edge.set_stand_in(mode);
        let exchange = edge.exchange(input).await;
        if let Err(problem) = exchange.check() {
            panic!(
                "seed {name}: {problem}\noutput: {:?}",
                String::from_utf8_lossy(&exchange.output)
            );
        }
        let text = String::from_utf8_lossy(&exchange.output);
        // Answers follow each other without a separator: find their status lines.
        for (start, _) in text.match_indices("HTTP/1.1 ") {
            statuses.insert(text[start + 9..start + 12].to_owned());
        }
    }
    // The corpus reaches every kind of answer the edge gives without a real broker.
    for status in [
        "200", "202", "400", "404", "405", "408", "413", "415", "422", "431", "503",
    ] {
        assert!(
            statuses.contains(status),
            "no seed is answered {status}: {statuses:?}"
        );
    }
}

/// The checks are not vacuous: broken answers are caught.
#[test]
fn the_answer_checks_catch_broken_answers() {
    let exchange = |output: &[u8], methods: Vec<http::Method>| offline::Exchange {
        output: output.to_vec(),
        methods,
    };
    let get = || vec![http::Method::GET];
    let good = b"HTTP/1.1 200 OK\r\nx-request-id: a\r\ncontent-length: 2\r\n\r\n{}";
    assert_eq!(exchange(good, get()).check(), Ok(1));
    for (output, methods, why) in [
        (&b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..], vec![], "bare 400 from hyper"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", get(), "no request id"),
        (b"HTTP/1.1 200 OK\r\nx-request-id: a\r\ncontent-length: 5\r\n\r\n{}", get(), "truncated body"),
        (b"HTTP/1.1 500 Internal Server Error\r\nx-request-id: a\r\ncontent-length: 2\r\n\r\n{}", get(), "500"),
        (b"HTTP/1.1 404 Not Found\r\nx-request-id: a\r\ncontent-length: 2\r\n\r\n{}", get(), "error without code"),
        (b"", get(), "unanswered request"),
        (b"HTTP/1.1 200 OK\r\nx-request-id: a\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n", vec![http::Method::GET, http::Method::GET], "answer after close"),
    ] {
        assert!(exchange(output, methods).check().is_err(), "{why}");
    }
    assert!(offline::check_decoders(b"{}").is_ok());
}
