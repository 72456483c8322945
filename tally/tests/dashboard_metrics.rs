//! The Grafana dashboard (and any Prometheus rule file) may only name metrics the code
//! really exports, and a dashboard must have something to graph from the first second.
//! This starts the real `tally dev` and, before sending any request, scrapes
//! `/metrics` once: every metric referenced by a dashboard expression must be there
//! (bounded label sets at 0), except the per-partition series, which must appear for
//! every partition once the partitions are assigned. Then one valid and one invalid
//! increment move the counters. Histogram series are matched exactly: `x_bucket`,
//! `x_sum` and `x_count` exist, a bare `x` does not. Finally it sends SIGTERM and
//! expects a clean exit (status 0) within a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{http, parse_prometheus, parse_yaml, read_repo_file, repo_root, DevProcess, Scrape};

/// PromQL words that are not metric names (functions are recognised by the `(` after them).
const KEYWORDS: [&str; 14] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
];

/// Every metric name a PromQL expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    // `{__name__="x"}` selects by name.
    let mut rest = expr;
    while let Some(start) = rest.find("__name__") {
        let after = rest[start + "__name__".len()..].trim_start();
        if let Some(value) = after.strip_prefix('=').map(str::trim_start) {
            if let Some(quoted) = value.strip_prefix('"') {
                if let Some(end) = quoted.find('"') {
                    names.insert(quoted[..end].to_owned());
                }
            }
        }
        rest = &rest[start + 1..];
    }
    // Drop strings, label matchers, ranges and the label lists of by/without/on/....
    let chars: Vec<char> = expr.chars().collect();
    let mut cleaned = String::new();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        match c {
            '"' | '\'' | '`' => {
                index += 1;
                while index < chars.len() && chars[index] != c {
                    if chars[index] == '\\' {
                        index += 1;
                    }
                    index += 1;
                }
                cleaned.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while index < chars.len() && chars[index] != close {
                    if chars[index] == '"' {
                        index += 1;
                        while index < chars.len() && chars[index] != '"' {
                            index += 1;
                        }
                    }
                    index += 1;
                }
                cleaned.push(' ');
            }
            _ => cleaned.push(c),
        }
        index += 1;
    }
    let tokens = tokenize(&cleaned);
    let mut position = 0;
    while position < tokens.len() {
        let token = &tokens[position];
        let next = tokens.get(position + 1).map(String::as_str);
        if matches!(
            token.as_str(),
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        ) && next == Some("(")
        {
            // Skip the label list.
            while position < tokens.len() && tokens[position] != ")" {
                position += 1;
            }
        } else if is_identifier(token)
            && next != Some("(")
            // `sum by (l) (...)`: an aggregation operator, not a metric.
            && !matches!(next, Some("by" | "without"))
            && !KEYWORDS.contains(&token.to_ascii_lowercase().as_str())
        {
            names.insert(token.clone());
        }
        position += 1;
    }
    names
}

fn is_identifier(token: &str) -> bool {
    let mut chars = token.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Identifiers, numbers/durations (one token each), `$variables` (one token) and single
/// punctuation characters.
fn tokenize(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        if c.is_whitespace() {
            index += 1;
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$' || c == '.' {
            let start = index;
            while index < chars.len()
                && (chars[index].is_ascii_alphanumeric()
                    || matches!(chars[index], '_' | ':' | '$' | '.'))
            {
                index += 1;
            }
            let token: String = chars[start..index].iter().collect();
            // Numbers, durations and Grafana variables are never metric names.
            if !(token.starts_with(|c: char| c.is_ascii_digit() || c == '.') || token.contains('$'))
            {
                tokens.push(token);
            } else {
                tokens.push("#".to_owned());
            }
        } else {
            tokens.push(c.to_string());
            index += 1;
        }
    }
    tokens
}

/// Every string under a key `expr` (panel targets, nested rows, anywhere), plus
/// `label_values(metric, label)` template queries.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    ("query" | "definition", serde_json::Value::String(query))
                        if query.contains("label_values(") || query.contains("query_result(") =>
                    {
                        out.push(template_query_expr(query));
                    }
                    _ => collect_exprs(inner, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_exprs(item, out);
            }
        }
        _ => {}
    }
}

/// `label_values(m{...}, label)` → `m{...}`; `query_result(expr)` → `expr`.
fn template_query_expr(query: &str) -> String {
    if let Some(inner) = query.trim().strip_prefix("query_result(") {
        return inner.trim_end().trim_end_matches(')').to_owned();
    }
    let inner = query
        .trim()
        .trim_start_matches("label_values(")
        .trim_end_matches(')');
    // The label is after the last top-level comma (a matcher may contain commas).
    let mut depth = 0;
    let mut cut = inner.len();
    for (position, c) in inner.char_indices() {
        match c {
            '{' | '(' => depth += 1,
            '}' | ')' => depth -= 1,
            ',' if depth == 0 => cut = position,
            _ => {}
        }
    }
    inner[..cut].to_owned()
}

/// (where, expression) for every dashboard JSON and every Prometheus rule file.
fn referenced_expressions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let dashboards = repo_root().join("grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dashboards)
        .unwrap_or_else(|err| panic!("{}: {err}", dashboards.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no dashboard JSON in {}",
        dashboards.display()
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
        let mut exprs = Vec::new();
        collect_exprs(&json, &mut exprs);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        found.extend(exprs.into_iter().map(|expr| (name.clone(), expr)));
    }
    // prometheus.yml: recording and alerting rules, if any.
    let config = parse_yaml(&read_repo_file("prometheus.yml"), "prometheus.yml");
    let rule_files = config
        .get("rule_files")
        .and_then(yaml_serde::Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    for file in rule_files {
        let file = file.as_str().expect("rule file paths");
        // Compose mounts the repo's files under /etc/prometheus/.
        let relative = file.trim_start_matches("/etc/prometheus/");
        let text = read_repo_file(relative);
        let rules = parse_yaml(&text, relative);
        for group in rules
            .get("groups")
            .and_then(|g| g.as_sequence())
            .into_iter()
            .flatten()
        {
            for rule in group
                .get("rules")
                .and_then(|r| r.as_sequence())
                .into_iter()
                .flatten()
            {
                if let Some(expr) = rule.get("expr").and_then(|e| e.as_str()) {
                    found.push((relative.to_owned(), expr.to_owned()));
                }
            }
        }
    }
    found
}

#[test]
fn promql_metric_name_extraction() {
    let names = |expr: &str| metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{route=~"x|y"}[$__rate_interval])))"#
        ),
        ["a_seconds_bucket"]
    );
    assert_eq!(
        names("sum(rate(x_sum[5m])) / sum(rate(x_count[5m])) > bool 0.5"),
        ["x_count", "x_sum"]
    );
    assert_eq!(names("max by (instance) (g) or on(job) vector(0)"), ["g"]);
    assert_eq!(
        names("sum without (le) (h) * ignoring(a) group_left(b) k"),
        ["h", "k"]
    );
    assert_eq!(
        names(r#"{__name__="named_metric", job="j"}"#),
        ["named_metric"]
    );
    assert_eq!(names("up offset 5m"), ["up"]);
    assert_eq!(names("rate(c_total[1m] @ 1609746000)"), ["c_total"]);
    assert_eq!(
        template_query_expr("label_values(m{a=\"b\",c=\"d\"}, instance)"),
        "m{a=\"b\",c=\"d\"}"
    );
}

/// Families labelled by partition: their series exist once the partition is assigned
/// (the consumer creates them then), not at process start.
const PARTITION_FAMILIES: [&str; 6] = [
    "tally_aggregator_consumer_lag",
    "tally_aggregator_commit_lag",
    "tally_aggregator_late_records_total",
    "tally_aggregator_watermark_lag_seconds_bucket",
    "tally_aggregator_watermark_lag_seconds_sum",
    "tally_aggregator_watermark_lag_seconds_count",
];

/// Partitions of the playground's topic in this test.
const PARTITIONS: usize = 3;

/// Names in `referenced` that `scrape` lacks, each with the dashboard expressions
/// naming it (and a hint when a histogram was selected by its bare name).
fn missing_report(
    referenced: &BTreeSet<String>,
    sources: &[(String, String, String)],
    scrape: &Scrape,
    allowed_missing: &[&str],
) -> Option<String> {
    let missing: Vec<&String> = referenced
        .iter()
        .filter(|name| !scrape.sample_names.contains(*name))
        .filter(|name| !allowed_missing.contains(&name.as_str()))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut report = String::new();
    for name in &missing {
        for (source_name, file, expr) in sources {
            if source_name == *name {
                report.push_str(&format!("\n  {name}  ({file}: {expr})"));
            }
        }
        if let Some(kind) = scrape.families.get(*name) {
            report.push_str(&format!(
                "\n    `{name}` is a {kind} family: select {name}_bucket / _sum / _count instead"
            ));
        }
    }
    Some(format!(
        "{report}\n\nexported families: {:?}",
        scrape.families.keys().collect::<Vec<_>>()
    ))
}

/// `tally dev`, idle and freshly started: the first scrape, before any request, holds
/// every metric the dashboard names (at 0) except the per-partition ones, which appear
/// (for every partition) once the partitions are assigned. Then one valid and one
/// invalid increment move the counters from 0 to 1.
#[test]
fn dashboard_uses_only_exported_metrics_from_the_first_scrape() {
    let expressions = referenced_expressions();
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    let mut sources: Vec<(String, String, String)> = Vec::new();
    for (file, expr) in &expressions {
        for name in metric_names(expr) {
            sources.push((name.clone(), file.clone(), expr.clone()));
            referenced.insert(name);
        }
    }
    assert!(
        referenced.len() >= 15 && referenced.iter().any(|name| name.ends_with("_bucket")),
        "the expression parser found too few metric names ({referenced:?}) in {} expressions; is it broken?",
        expressions.len()
    );

    let partitions = PARTITIONS.to_string();
    let dev = DevProcess::start_with(&["--partitions", &partitions]);

    // 1. The first scrape, no increment sent: everything but the per-partition series.
    let first = parse_prometheus(&dev.scrape());
    if let Some(report) = missing_report(&referenced, &sources, &first, &PARTITION_FAMILIES) {
        panic!(
            "a freshly started, idle `tally dev` does not export metrics the dashboard / prometheus.yml reference:{report}\n{}",
            dev.stderr_tail()
        );
    }
    // The bounded label sets are there at 0, not missing until their first event.
    for series in [
        r#"tally_ingest_rejections_total{reason="invalid_json"}"#,
        r#"tally_ingest_rejections_total{reason="unknown_field"}"#,
        r#"tally_ingest_rejections_total{reason="rate_limited"}"#,
        r#"tally_ingest_requests_total{route="increment",status="422"}"#,
        r#"tally_ingest_requests_total{route="increments",status="503"}"#,
        r#"tally_ingest_produce_errors_total{kind="queue_full"}"#,
        r#"tally_ingest_records_accepted_total"#,
        r#"tally_aggregator_records_total{outcome="counted"}"#,
        r#"tally_aggregator_records_total{outcome="late"}"#,
        r#"tally_aggregator_dlq_writes_total{reason="late"}"#,
        r#"tally_aggregator_dlq_writes_total{reason="invalid_json"}"#,
        r#"tally_aggregator_rows_written_total{kind="final"}"#,
        r#"tally_aggregator_commits_total{result="error"}"#,
        r#"tally_aggregator_store_errors_total"#,
    ] {
        assert_eq!(
            first.value_of(series),
            Some(0.0),
            "{series} should be exported at 0 before any traffic"
        );
    }

    // 2. Per-partition series: wait (bounded) for the assignment, then for every
    //    partition's series of every per-partition family the dashboard names.
    let assigned = "tally_aggregator_assigned_partitions";
    dev.wait_for_sample(assigned, PARTITIONS as f64, Duration::from_secs(30));
    let partition_families: Vec<&str> = PARTITION_FAMILIES
        .into_iter()
        .filter(|name| referenced.contains(*name))
        .collect();
    assert!(
        partition_families.len() >= 4,
        "the dashboard should graph lag, commit lag, late letters and watermark lag per partition: {partition_families:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let scrape = parse_prometheus(&dev.scrape());
        let absent: Vec<String> = partition_families
            .iter()
            .flat_map(|name| (0..PARTITIONS).map(move |partition| (*name, partition)))
            .filter(|(name, partition)| {
                !scrape.has_labelled(name, "partition", &partition.to_string())
            })
            .map(|(name, partition)| format!("{name}{{partition=\"{partition}\"}}"))
            .collect();
        if absent.is_empty() {
            if let Some(report) = missing_report(&referenced, &sources, &scrape, &[]) {
                panic!("after assignment, still missing:{report}");
            }
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "{PARTITIONS} partitions are assigned but these per-partition series are absent \
                 (the consumer should create them on assignment, AggregatorMetrics::track_partition): \
                 {absent:?}\n{}",
                dev.stderr_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // 3. Traffic moves the zeros.
    let key = "7c9e6679-7425-40de-944b-e07fc1f66afe";
    let accepted = http(
        dev.ingest,
        "POST",
        "/increment",
        &[("Content-Type", "application/json")],
        format!(r#"{{"key":"{key}","value":5}}"#).as_bytes(),
    );
    assert_eq!(accepted.status, 202, "valid increment: {}", accepted.text());
    let refused = http(
        dev.ingest,
        "POST",
        "/increment",
        &[("Content-Type", "application/json")],
        format!(r#"{{"key":"{key}","value":5,"extra":1}}"#).as_bytes(),
    );
    assert_eq!(refused.status, 422, "invalid increment: {}", refused.text());

    let counted = r#"tally_aggregator_records_total{outcome="counted"}"#;
    let text = dev.wait_for_sample(counted, 1.0, Duration::from_secs(30));
    let scrape = parse_prometheus(&text);
    assert_eq!(
        scrape.value_of(counted),
        Some(1.0),
        "exactly one increment was sent"
    );
    assert_eq!(
        scrape.value_of(r#"tally_ingest_rejections_total{reason="unknown_field"}"#),
        Some(1.0)
    );
    assert_eq!(
        scrape.value_of(r#"tally_ingest_rejections_total{reason="invalid_json"}"#),
        Some(0.0)
    );

    let status = dev.terminate(Duration::from_secs(45));
    assert!(
        status.success(),
        "tally dev exited with {status} after SIGTERM, expected 0"
    );
}
