//! Issue 11.5: the published schemas (`schemas/increment.schema.json`, `openapi.yaml`)
//! say what the decoder really does where JSON Schema alone would say otherwise: a
//! `value` such as `1.0` satisfies `type: integer` but is refused, and an empty batch is
//! refused (`minItems: 1`, `422 empty_batch`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use tally_schemas::{decode_batch, decode_increment, BatchFormat, BatchRejection, RejectReason};

/// Numbers JSON Schema's `integer` admits (or strings a lax client might send) that
/// the contract refuses; each must be named in both documents.
const REFUSED_VALUES: [&str; 8] = [
    "1.0",
    "10.00",
    "1e3",
    "1E0",
    "\"1\"",
    "0",
    "-1",
    "9223372036854775808",
];

fn repo_file(path: &str) -> String {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("{full}: {error}"))
}

fn body(value: &str) -> String {
    format!(r#"{{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":{value}}}"#)
}

/// The `value` property of the increment schema in both documents.
fn value_schemas() -> Vec<(&'static str, Value)> {
    let json_schema: Value =
        serde_json::from_str(&repo_file("schemas/increment.schema.json")).unwrap();
    let openapi: Value = yaml_serde::from_str(&repo_file("openapi.yaml")).unwrap();
    vec![
        (
            "schemas/increment.schema.json",
            json_schema["properties"]["value"].clone(),
        ),
        (
            "openapi.yaml",
            openapi["components"]["schemas"]["Increment"]["properties"]["value"].clone(),
        ),
    ]
}

#[test]
fn the_stricter_integer_rule_is_documented_with_what_it_refuses() {
    for (document, value) in value_schemas() {
        assert_eq!(value["type"], "integer", "{document}");
        let description = value["description"].as_str().unwrap_or_default();
        for refused in REFUSED_VALUES {
            let shown = format!("`{refused}`");
            assert!(
                description.contains(&shown),
                "{document}: the description of `value` does not name {shown} as refused"
            );
        }
        for example in value["examples"].as_array().expect("examples of `value`") {
            let accepted = decode_increment(body(&example.to_string()).as_bytes());
            assert!(accepted.is_ok(), "{document}: example {example} is refused");
        }
    }
    for refused in REFUSED_VALUES {
        let verdict = decode_increment(body(refused).as_bytes());
        assert_eq!(
            verdict.map_err(|error| error.reason),
            Err(RejectReason::InvalidValue),
            "value {refused}"
        );
    }
}

#[test]
fn an_empty_batch_is_refused_by_schema_and_decoder_alike() {
    let openapi: Value = yaml_serde::from_str(&repo_file("openapi.yaml")).unwrap();
    let batch = &openapi["paths"]["/increments"]["post"]["requestBody"]["content"];
    assert_eq!(batch["application/json"]["schema"]["minItems"], 1);
    let codes = openapi["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap();
    assert!(codes.contains(&Value::from("empty_batch")));
    assert_eq!(
        decode_batch(b"[]", BatchFormat::JsonArray, 10),
        Err(BatchRejection::Empty)
    );
    assert_eq!(
        decode_batch(b"\n\n", BatchFormat::Ndjson, 10),
        Err(BatchRejection::Empty)
    );
}

/// The codes the fuzz checks accept (`offline::ERROR_CODES`) are exactly the codes
/// `openapi.yaml` documents.
#[test]
fn every_error_code_is_documented() {
    let openapi: Value = yaml_serde::from_str(&repo_file("openapi.yaml")).unwrap();
    let documented: std::collections::BTreeSet<&str> = openapi["components"]["schemas"]
        ["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|code| code.as_str().unwrap())
        .collect();
    let known: std::collections::BTreeSet<&str> =
        tally_ingest::offline::ERROR_CODES.iter().copied().collect();
    assert_eq!(documented, known);
}
