//! openapi.yaml and the ingest router must not drift apart. Against a running
//! `tally dev` this checks that:
//!
//! - every documented path + method is served: GETs answer a documented 2xx; POSTs,
//!   given each documented media type's `example` (a valid body), answer a documented
//!   2xx; JSON answers match the documented schema (required fields, types, enums);
//! - a 422 for a single increment and for a batch match their documented schemas (the
//!   batch one the `BatchError` shape naming the invalid items), and so do 400 and 415;
//! - undocumented methods on documented paths get `405` with an `Allow` header naming
//!   exactly the documented methods, unknown paths get `404`;
//! - every route the router knows (the `route` label of its latency histogram) is a
//!   documented path.
//!
//! Without a server it checks that every status and error code of the table in
//! ingest/src/lib.rs is documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{http, parse_prometheus, read_repo_file, DevProcess, HttpResponse};
use serde_json::Value;

const METHODS: [&str; 6] = ["get", "post", "put", "delete", "patch", "head"];

fn spec() -> Value {
    let spec: Value =
        yaml_serde::from_str(&read_repo_file("openapi.yaml")).expect("openapi.yaml parses");
    let version = spec
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        version.starts_with("3.1"),
        "openapi.yaml must be OpenAPI 3.1, is {version:?}"
    );
    spec
}

/// Follows `$ref`s (`#/...` JSON pointers into the spec).
fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    let mut current = value;
    for _ in 0..16 {
        match current.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference
                    .strip_prefix('#')
                    .unwrap_or_else(|| panic!("only local $refs are supported: {reference}"));
                current = spec
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("$ref {reference} points nowhere"));
            }
            None => return current,
        }
    }
    panic!("$ref chain too long at {value}");
}

fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let paths = spec.get("paths").and_then(Value::as_object).expect("paths");
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                operations.push((path.clone(), method.to_owned(), operation.clone()));
            }
        }
    }
    assert!(
        !operations.is_empty(),
        "openapi.yaml documents no operation"
    );
    operations
}

/// The documented response object for a status (or `default`), resolved.
fn documented_response<'a>(
    spec: &'a Value,
    operation: &'a Value,
    status: u16,
) -> Option<&'a Value> {
    let responses = operation.get("responses")?;
    responses
        .get(status.to_string())
        .or_else(|| responses.get(format!("{}XX", status / 100)))
        .or_else(|| responses.get("default"))
        .map(|response| resolve(spec, response))
}

// ---- a small JSON Schema checker (the keywords openapi.yaml uses) ----------------------

fn type_matches(kind: &str, instance: &Value) -> bool {
    match kind {
        "object" => instance.is_object(),
        "array" => instance.is_array(),
        "string" => instance.is_string(),
        "integer" => instance.is_i64() || instance.is_u64(),
        "number" => instance.is_number(),
        "boolean" => instance.is_boolean(),
        "null" => instance.is_null(),
        other => panic!("unknown schema type {other}"),
    }
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_date_time(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && (bytes[10] == b'T' || bytes[10] == b't')
        && bytes[13] == b':'
        && (text.ends_with('Z') || text.ends_with('z') || text[19..].contains(['+', '-']))
}

/// Appends a message for every way `instance` breaks `schema`.
fn validate(spec: &Value, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for part in all {
            validate(spec, part, instance, at, errors);
        }
    }
    for (keyword, exactly_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(options) = schema.get(keyword).and_then(Value::as_array) {
            let mut branch_errors = Vec::new();
            let passing = options
                .iter()
                .filter(|option| {
                    let mut errs = Vec::new();
                    validate(spec, option, instance, at, &mut errs);
                    let ok = errs.is_empty();
                    branch_errors.extend(errs);
                    ok
                })
                .count();
            if passing == 0 || (exactly_one && passing > 1) {
                errors.push(format!(
                    "{at}: {passing} of the {keyword} branches match: {branch_errors:?}"
                ));
            }
        }
    }
    if let Some(expected) = schema.get("const") {
        if expected != instance {
            errors.push(format!("{at}: expected {expected}, found {instance}"));
        }
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(instance) {
            errors.push(format!("{at}: {instance} is not one of {options:?}"));
        }
    }
    if let Some(kind) = schema.get("type") {
        let ok = match kind {
            Value::String(kind) => type_matches(kind, instance),
            Value::Array(kinds) => kinds
                .iter()
                .any(|k| type_matches(k.as_str().unwrap(), instance)),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: expected type {kind}, found {instance}"));
            return;
        }
    }
    if let (Some(format), Some(text)) = (
        schema.get("format").and_then(Value::as_str),
        instance.as_str(),
    ) {
        let ok = match format {
            "uuid" => is_uuid(text),
            "date-time" => is_date_time(text),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {text:?} is not a {format}"));
        }
    }
    if let (Some(minimum), Some(number)) = (
        schema.get("minimum").and_then(Value::as_f64),
        instance.as_f64(),
    ) {
        if number < minimum {
            errors.push(format!("{at}: {number} < minimum {minimum}"));
        }
    }
    if let Some(object) = instance.as_object() {
        for required in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = required.as_str().unwrap();
            if !object.contains_key(name) {
                errors.push(format!("{at}: required field `{name}` is missing"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        if let Some(properties) = properties {
            for (name, property) in properties {
                if let Some(value) = object.get(name) {
                    validate(spec, property, value, &format!("{at}.{name}"), errors);
                }
            }
        }
        if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
            for name in object.keys() {
                if !properties.is_some_and(|p| p.contains_key(name)) {
                    errors.push(format!("{at}: field `{name}` is not documented"));
                }
            }
        }
    }
    if let Some(items) = instance.as_array() {
        if let Some(item_schema) = schema.get("items") {
            for (index, item) in items.iter().enumerate() {
                validate(spec, item_schema, item, &format!("{at}[{index}]"), errors);
            }
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > max {
                errors.push(format!("{at}: more than {max} items"));
            }
        }
    }
}

/// Asserts the answer is documented for the operation and, when JSON, matches the
/// documented schema. Returns the documented schema (resolved) if any.
fn check_documented(spec: &Value, label: &str, operation: &Value, response: &HttpResponse) {
    let documented = documented_response(spec, operation, response.status).unwrap_or_else(|| {
        panic!(
            "{label} answered {} ({}), which openapi.yaml does not document for it",
            response.status,
            response.text()
        )
    });
    if documented
        .get("headers")
        .and_then(|headers| headers.get("x-request-id"))
        .is_some()
    {
        assert!(
            response.header("x-request-id").is_some(),
            "{label}: documented x-request-id header missing"
        );
    }
    let Some(content) = documented.get("content").and_then(Value::as_object) else {
        return;
    };
    let actual_type = response
        .header("content-type")
        .unwrap_or_default()
        .to_owned();
    let actual_base = actual_type.split(';').next().unwrap_or_default().trim();
    let (media, media_object) = content
        .iter()
        .find(|(media, _)| media.split(';').next().unwrap_or_default().trim() == actual_base)
        .unwrap_or_else(|| {
            panic!(
                "{label} answered {} with content type {actual_type:?}; documented: {:?}",
                response.status,
                content.keys().collect::<Vec<_>>()
            )
        });
    if media.starts_with("application/json") {
        let schema = media_object
            .get("schema")
            .expect("documented JSON content has a schema");
        let mut errors = Vec::new();
        validate(spec, schema, &response.json(), "body", &mut errors);
        assert!(
            errors.is_empty(),
            "{label} answered {} with a body that does not match the documented schema:\n  {}\nbody: {}",
            response.status,
            errors.join("\n  "),
            response.text()
        );
    }
}

/// Request path for a documented path: `{param}`s filled from the parameter's example
/// or a fixed UUID.
fn concrete_path(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("closed path parameter") + open;
        out.push_str("7c9e6679-7425-40de-944b-e07fc1f66afe");
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The query string for an operation's required query parameters, from their
/// `example`s (an array example repeats the parameter, as `style: form, explode: true`
/// does): `?key=…&key=…`, or empty.
fn required_query(spec: &Value, operation: &Value) -> String {
    let mut pairs = Vec::new();
    for parameter in operation
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let parameter = resolve(spec, parameter);
        if parameter.get("in").and_then(Value::as_str) != Some("query")
            || parameter.get("required") != Some(&Value::Bool(true))
        {
            continue;
        }
        let name = parameter["name"].as_str().expect("parameter name");
        let example = parameter
            .get("example")
            .unwrap_or_else(|| panic!("required query parameter {name} needs an example"));
        let values: Vec<&Value> = match example {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for value in values {
            let text = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            pairs.push(format!("{name}={text}"));
        }
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// The body to send for a documented media type: its `example`, JSON-encoded unless
/// it is a string.
fn example_body(label: &str, media: &str, media_object: &Value) -> Vec<u8> {
    let example = media_object
        .get("example")
        .or_else(|| {
            media_object
                .get("examples")
                .and_then(Value::as_object)
                .and_then(|examples| examples.values().next())
                .and_then(|example| example.get("value"))
        })
        .unwrap_or_else(|| {
            panic!(
                "{label} {media}: the request body needs an example (a valid body) for this test"
            )
        });
    match example {
        Value::String(text) => text.clone().into_bytes(),
        other => serde_json::to_vec(other).unwrap(),
    }
}

/// The router's name for a documented path: its last literal segment
/// (`/v1/windows/{key}` → `windows`), which is how the ingest metrics label routes.
fn route_label(path: &str) -> String {
    path.split('/')
        .rfind(|segment| !segment.is_empty() && !segment.starts_with('{'))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn spec_documents_every_status_and_error_code_of_the_edge() {
    let spec = spec();
    let documented: BTreeSet<u16> = operations(&spec)
        .iter()
        .flat_map(|(_, _, operation)| {
            operation
                .get("responses")
                .and_then(Value::as_object)
                .map(|responses| {
                    responses
                        .keys()
                        .filter_map(|k| k.parse().ok())
                        .collect::<Vec<u16>>()
                })
                .unwrap_or_default()
        })
        .collect();
    let codes: BTreeSet<String> = spec
        .pointer("/components/schemas/ErrorCode/enum")
        .and_then(Value::as_array)
        .expect("components.schemas.ErrorCode.enum lists the stable codes")
        .iter()
        .map(|code| code.as_str().unwrap().to_owned())
        .collect();
    let lib = read_repo_file("ingest/src/lib.rs");
    let mut rows = 0;
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | ") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let Ok(status) = cells[0].parse::<u16>() else {
            continue;
        };
        rows += 1;
        if status == 405 {
            // No documented operation can answer 405: it is the answer for the
            // methods the spec does not list, documented as a shared response.
            assert!(
                spec.pointer("/components/responses/MethodNotAllowed")
                    .is_some(),
                "405 is not documented (components.responses.MethodNotAllowed)"
            );
        } else {
            assert!(
                documented.contains(&status),
                "ingest/src/lib.rs answers {status}, openapi.yaml documents none"
            );
        }
        // Every `code` named in the row's error column is a documented code.
        // (Backticked words that are not snake_case codes, e.g. type names, are prose.)
        let named = cells.get(1).unwrap_or(&"").split('`').skip(1).step_by(2);
        for code in named.filter(|word| word.chars().all(|c| c.is_ascii_lowercase() || c == '_')) {
            assert!(
                codes.contains(code),
                "error code `{code}` ({status}) is not in components.schemas.ErrorCode"
            );
        }
    }
    assert!(
        rows >= 8,
        "could not read the status table of ingest/src/lib.rs ({rows} rows)"
    );
    // The rule codes of the increment contract are documented too.
    for code in [
        "invalid_key",
        "invalid_value",
        "unknown_field",
        "duplicate_field",
        "missing_key",
        "missing_value",
        "not_an_object",
    ] {
        assert!(codes.contains(code), "rule code {code} is not in ErrorCode");
    }
    assert!(
        spec.pointer("/components/securitySchemes/bearerAuth/scheme")
            .and_then(Value::as_str)
            == Some("bearer"),
        "bearer auth scheme"
    );
}

#[test]
fn spec_and_router_agree() {
    let spec = spec();
    let dev = DevProcess::start();
    let operations = operations(&spec);

    // 1. Every documented operation is served with a documented, successful answer.
    for (path, method, operation) in &operations {
        let label = format!("{} {path}", method.to_uppercase());
        let target = format!(
            "{}{}",
            concrete_path(path),
            required_query(&spec, operation)
        );
        let mut requests: Vec<(Option<String>, Vec<u8>)> = Vec::new();
        match operation
            .get("requestBody")
            .map(|body| resolve(&spec, body))
        {
            Some(body) => {
                let content = body
                    .get("content")
                    .and_then(Value::as_object)
                    .expect("requestBody.content");
                for (media, media_object) in content {
                    requests.push((
                        Some(media.clone()),
                        example_body(&label, media, media_object),
                    ));
                }
            }
            None => requests.push((None, Vec::new())),
        }
        for (media, body) in requests {
            let headers: Vec<(&str, &str)> =
                media.iter().map(|m| ("Content-Type", m.as_str())).collect();
            let label = format!("{label} ({})", media.as_deref().unwrap_or("no body"));
            // A documented 503 (broker briefly slow on a busy machine) is retried, bounded.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let response = loop {
                let response = http(dev.ingest, &method.to_uppercase(), &target, &headers, &body);
                if response.status != 503 || std::time::Instant::now() >= deadline {
                    break response;
                }
                check_documented(&spec, &label, operation, &response);
                std::thread::sleep(std::time::Duration::from_millis(500));
            };
            assert!(
                response.status != 404 && response.status != 405,
                "{label} is documented but answered {}: {}",
                response.status,
                response.text()
            );
            check_documented(&spec, &label, operation, &response);
            assert!(
                (200..300).contains(&response.status),
                "{label} with a valid request answered {}: {}\n{}",
                response.status,
                response.text(),
                dev.stderr_tail()
            );
        }
    }

    // Both documented time forms of `from`/`to` are accepted.
    let windows = operations
        .iter()
        .find(|(path, method, _)| path.starts_with("/v1/windows/") && method == "get")
        .expect("GET /v1/windows/{key} is documented");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    for query in [
        format!("?from={}&to={}", now_ms - 3_600_000, now_ms + 60_000),
        "?from=2026-01-01T00:00:00Z&to=2026-01-31T00:00:00Z".to_owned(),
        // Form-urlencoded, as most clients send it.
        "?from=2026-01-01T00%3A00%3A00%2B01%3A00&to=2026-01-02T00%3A00%3A00Z&limit=5".to_owned(),
    ] {
        let target = format!("{}{query}", concrete_path(&windows.0));
        let response = http(dev.ingest, "GET", &target, &[], b"");
        assert_eq!(response.status, 200, "GET {target}: {}", response.text());
        check_documented(&spec, &format!("GET {target}"), &windows.2, &response);
    }
    for (query, code) in [
        ("?from=yesterday", "invalid_time"),
        ("?from=-10", "invalid_time"),
        ("?to=253402300800000", "invalid_time"),
        (
            "?from=2020-01-01T00:00:00Z&to=2030-01-01T00:00:00Z",
            "range_too_long",
        ),
        ("?limit=0", "invalid_limit"),
        ("?cursor=x", "invalid_cursor"),
        ("?colour=blue", "invalid_query"),
    ] {
        let bad = format!("{}{query}", concrete_path(&windows.0));
        let response = http(dev.ingest, "GET", &bad, &[], b"");
        assert_eq!(response.status, 400, "GET {bad}: {}", response.text());
        assert_eq!(response.json()["error"], code, "GET {bad}");
        check_documented(&spec, &format!("GET {bad}"), &windows.2, &response);
    }
    let several = operations
        .iter()
        .find(|(path, method, _)| path == "/v1/windows" && method == "get")
        .expect("GET /v1/windows is documented");
    for (query, status) in [
        (
            "?key=7c9e6679-7425-40de-944b-e07fc1f66afe&key=0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            200,
        ),
        ("?from=2026-01-01T00:00:00Z", 400),
        ("?key=nope", 400),
    ] {
        let target = format!("/v1/windows{query}");
        let response = http(dev.ingest, "GET", &target, &[], b"");
        assert_eq!(response.status, status, "GET {target}: {}", response.text());
        check_documented(&spec, &format!("GET {target}"), &several.2, &response);
    }

    // 2. Documented error answers match their schemas.
    let find = |path: &str, method: &str| -> &Value {
        &operations
            .iter()
            .find(|(p, m, _)| p == path && m == method)
            .unwrap_or_else(|| panic!("{method} {path} is not documented"))
            .2
    };
    let single = find("/increment", "post");
    let json = [("Content-Type", "application/json")];
    let response = http(
        dev.ingest,
        "POST",
        "/increment",
        &json,
        br#"{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":0}"#,
    );
    assert_eq!(response.status, 422, "value 0: {}", response.text());
    check_documented(&spec, "POST /increment (value 0)", single, &response);
    assert_eq!(response.json()["error"], "invalid_value");
    let response = http(dev.ingest, "POST", "/increment", &json, b"{\"key\":");
    assert_eq!(response.status, 400, "malformed JSON: {}", response.text());
    check_documented(&spec, "POST /increment (malformed)", single, &response);
    let response = http(
        dev.ingest,
        "POST",
        "/increment",
        &[("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(response.status, 415, "text/plain: {}", response.text());
    check_documented(&spec, "POST /increment (text/plain)", single, &response);

    let batch = find("/increments", "post");
    let body = br#"[{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":1},{"key":"not-a-uuid","value":1},{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":1.5}]"#;
    let response = http(dev.ingest, "POST", "/increments", &json, body);
    assert_eq!(
        response.status,
        422,
        "batch with invalid items: {}",
        response.text()
    );
    check_documented(&spec, "POST /increments (invalid items)", batch, &response);
    // The batch 422 is the BatchError shape, one of the documented 422 branches.
    let batch_error = spec
        .pointer("/components/schemas/BatchError")
        .expect("BatchError schema");
    let documented_422 =
        serde_json::to_string(documented_response(&spec, batch, 422).unwrap()).unwrap();
    assert!(
        documented_422.contains("#/components/schemas/BatchError"),
        "the batch 422 must document BatchError"
    );
    let mut errors = Vec::new();
    validate(&spec, batch_error, &response.json(), "body", &mut errors);
    assert!(
        errors.is_empty(),
        "batch 422 does not match BatchError: {errors:?}\n{}",
        response.text()
    );
    let indices: Vec<u64> = response.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["index"].as_u64().unwrap())
        .collect();
    assert_eq!(
        indices,
        [1, 2],
        "the 422 names the invalid items: {}",
        response.text()
    );

    // 3. Undocumented methods are 405 with the documented methods in `Allow`; unknown
    //    paths are 404.
    let paths: BTreeSet<&String> = operations.iter().map(|(path, _, _)| path).collect();
    for path in &paths {
        let documented: BTreeSet<String> = operations
            .iter()
            .filter(|(p, _, _)| p == *path)
            .map(|(_, method, _)| method.to_uppercase())
            .collect();
        let target = concrete_path(path);
        for method in METHODS.map(str::to_uppercase) {
            if documented.contains(&method) {
                continue;
            }
            let response = http(
                dev.ingest,
                &method,
                &target,
                &[("Content-Type", "application/json")],
                b"{}",
            );
            assert_eq!(
                response.status,
                405,
                "{method} {path} is not documented but answered {}: {}",
                response.status,
                response.text()
            );
            if method == "HEAD" {
                continue; // No body; HEAD is left out of the Allow comparison below.
            }
            let allowed: BTreeSet<String> = response
                .header("allow")
                .unwrap_or_default()
                .split(',')
                .map(|m| m.trim().to_uppercase())
                .filter(|m| !m.is_empty() && m != "HEAD")
                .collect();
            let documented: BTreeSet<String> = documented
                .iter()
                .filter(|m| *m != "HEAD")
                .cloned()
                .collect();
            assert_eq!(
                allowed, documented,
                "{method} {path}: Allow header vs documented methods"
            );
            let mut errors = Vec::new();
            let schema = spec
                .pointer("/components/responses/MethodNotAllowed/content/application~1json/schema")
                .expect("MethodNotAllowed schema");
            validate(&spec, schema, &response.json(), "body", &mut errors);
            assert!(errors.is_empty(), "{method} {path} 405 body: {errors:?}");
        }
    }
    for (method, target) in [
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("GET", "/increment/"),
        ("GET", "/v1/windowsx"),
        ("GET", "/"),
    ] {
        let response = http(dev.ingest, method, target, &[], b"");
        assert_eq!(
            response.status,
            404,
            "{method} {target} is not documented but answered {}: {}",
            response.status,
            response.text()
        );
        let schema = spec
            .pointer("/components/responses/NotFound/content/application~1json/schema")
            .expect("NotFound schema");
        let mut errors = Vec::new();
        validate(&spec, schema, &response.json(), "body", &mut errors);
        assert!(errors.is_empty(), "{method} {target} 404 body: {errors:?}");
    }

    // 4. Every route the router has is documented (and the other way round).
    let scrape = parse_prometheus(&dev.scrape());
    let router_routes: BTreeSet<String> = scrape
        .samples
        .keys()
        .filter(|series| series.starts_with("tally_ingest_request_duration_seconds_count{"))
        .filter_map(|series| {
            series
                .split("route=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(str::to_owned)
        })
        .filter(|route| route != "unknown")
        .collect();
    let documented_routes: BTreeSet<String> = paths.iter().map(|path| route_label(path)).collect();
    assert!(
        !router_routes.is_empty(),
        "no route labels in the ingest latency histogram"
    );
    assert_eq!(
        router_routes, documented_routes,
        "routes the router serves (left) vs paths openapi.yaml documents (right)"
    );
}
