//! docker-compose.yml against the code. Whether the file is valid compose (schema,
//! references, `depends_on` conditions, interpolation) is checked by a real compose
//! implementation: `scripts/test.sh` runs `docker-compose config -q`. What remains here
//! is what only this project can check:
//!
//! - every flag in a tally service's `command:` and every variable in its
//!   `environment:` is one that `tally <subcommand> --help` (the binary built from this
//!   tree) lists;
//! - Prometheus scrapes every tally process on the port it listens on (`--listen` for
//!   the edge, `--metrics-listen` for aggregators), and nothing else under their names;
//! - every file or directory the compose file mounts or builds from exists.
//!
//! The YAML is read with `yaml_serde` (merge keys applied, as compose does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{parse_yaml, read_repo_file, repo_root, tally_bin};
use yaml_serde::Value;

/// Variables a tally process reads that are not clap settings (so not in `--help`):
/// tracing's filter, and glibc's malloc tunables (read by the C library at start).
const NON_FLAG_ENV_VARS: [&str; 2] = ["RUST_LOG", "GLIBC_TUNABLES"];

fn compose() -> Value {
    parse_yaml(&read_repo_file("docker-compose.yml"), "docker-compose.yml")
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

/// The services running the tally image, by name.
fn tally_services(compose: &Value) -> BTreeMap<String, Value> {
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has `services`");
    let found: BTreeMap<String, Value> = services
        .iter()
        .filter(|(_, service)| {
            service.get("image").and_then(Value::as_str) == Some("tally:local")
                || service.get("build").is_some()
        })
        .map(|(name, service)| (text(name), service.clone()))
        .collect();
    assert!(
        found.len() >= 3,
        "expected the ingest edge and two aggregators among the tally services, found {:?}",
        found.keys().collect::<Vec<_>>()
    );
    found
}

/// `command:` as words (a list, or a string split on whitespace).
fn command(service: &Value) -> Vec<String> {
    match service.get("command") {
        Some(Value::Sequence(words)) => words.iter().map(text).collect(),
        Some(Value::String(line)) => line.split_whitespace().map(str::to_owned).collect(),
        None => Vec::new(),
        Some(other) => panic!("unexpected command {other:?}"),
    }
}

/// `environment:` as a map (compose accepts a map or a list of `NAME=value`).
fn environment(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let item = text(item);
                let (name, value) = item.split_once('=').unwrap_or((&item, ""));
                (name.to_owned(), value.to_owned())
            })
            .collect(),
        None => BTreeMap::new(),
        Some(other) => panic!("unexpected environment {other:?}"),
    }
}

/// One option of `tally <subcommand> --help`.
#[derive(Debug, Clone)]
struct HelpOption {
    env: Option<String>,
    default: Option<String>,
}

/// `--flag` → its env var and default, from the binary's own help.
fn help(subcommand: &str) -> BTreeMap<String, HelpOption> {
    let output = Command::new(tally_bin())
        .args([subcommand, "--help"])
        .output()
        .expect("running tally --help");
    assert!(output.status.success(), "tally {subcommand} --help failed");
    let text = String::from_utf8(output.stdout).expect("UTF-8 help");
    let mut options = BTreeMap::new();
    // clap prints each option as an indented line starting with `-`, continued by
    // more-indented lines; `[env: NAME=...]` and `[default: ...]` close its text.
    let mut entries: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') && line.len() - trimmed.len() <= 6 {
            entries.push(trimmed.to_owned());
        } else if let Some(last) = entries.last_mut() {
            last.push(' ');
            last.push_str(trimmed);
        }
    }
    for entry in entries {
        let Some(flag) = entry
            .split([' ', ','])
            .find(|word| word.starts_with("--"))
            .map(str::to_owned)
        else {
            continue;
        };
        let bracket = |label: &str| {
            entry.find(label).map(|start| {
                let rest = &entry[start + label.len()..];
                let end = rest.find([']', '=']).unwrap_or(rest.len());
                rest[..end].trim_matches('"').to_owned()
            })
        };
        let default = entry.find("[default: ").map(|start| {
            let rest = &entry[start + "[default: ".len()..];
            rest[..rest.find(']').unwrap_or(rest.len())]
                .trim_matches('"')
                .to_owned()
        });
        options.insert(
            flag,
            HelpOption {
                env: bracket("[env: "),
                default,
            },
        );
    }
    assert!(
        options.len() > 3,
        "could not read `tally {subcommand} --help`: {options:?}"
    );
    options
}

/// The value a service runs `flag` with: its command line, else its environment,
/// else the binary's default.
fn effective(
    flag: &str,
    words: &[String],
    env: &BTreeMap<String, String>,
    options: &BTreeMap<String, HelpOption>,
) -> Option<String> {
    let from_command = words.iter().enumerate().find_map(|(index, word)| {
        if word == flag {
            words.get(index + 1).cloned()
        } else {
            word.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    });
    let option = options
        .get(flag)
        .unwrap_or_else(|| panic!("`tally --help` lists no {flag}; this test relies on it"));
    from_command
        .or_else(|| option.env.as_ref().and_then(|name| env.get(name).cloned()))
        .or_else(|| option.default.clone())
}

/// The port of a `host:port` listen address.
fn port_of(address: &str) -> u16 {
    address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("{address:?} has no port"))
}

#[test]
fn tally_services_use_only_flags_and_env_vars_the_binary_lists() {
    let compose = compose();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, service) in tally_services(&compose) {
        let words = command(&service);
        let subcommand = words
            .first()
            .unwrap_or_else(|| panic!("{name}: no command (which tally subcommand?)"));
        let options = help(subcommand);
        let env_vars: BTreeSet<&str> = options
            .values()
            .filter_map(|option| option.env.as_deref())
            .collect();
        for word in &words[1..] {
            if let Some(flag) = word
                .strip_prefix("--")
                .map(|rest| rest.split('=').next().unwrap_or(rest))
            {
                checked += 1;
                if !options.contains_key(&format!("--{flag}")) {
                    problems.push(format!("{name}: `tally {subcommand}` has no flag --{flag}"));
                }
            }
        }
        for variable in environment(&service).keys() {
            checked += 1;
            if !env_vars.contains(variable.as_str())
                && !NON_FLAG_ENV_VARS.contains(&variable.as_str())
            {
                problems.push(format!(
                    "{name}: `tally {subcommand}` reads no env var {variable}"
                ));
            }
        }
    }
    assert!(
        checked >= 20,
        "only {checked} flags and env vars found: is the parser broken?"
    );
    assert!(
        problems.is_empty(),
        "docker-compose.yml:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn prometheus_scrapes_every_tally_process_where_it_listens() {
    let compose = compose();
    // Where each tally service serves /metrics.
    let mut listening: BTreeMap<String, u16> = BTreeMap::new();
    for (name, service) in tally_services(&compose) {
        let words = command(&service);
        let env = environment(&service);
        let subcommand = words[0].as_str();
        let flag = match subcommand {
            "ingest" => "--listen",
            "aggregator" => "--metrics-listen",
            other => panic!("{name}: unexpected tally subcommand {other}"),
        };
        let address = effective(flag, &words, &env, &help(subcommand))
            .unwrap_or_else(|| panic!("{name}: no {flag}"));
        listening.insert(name, port_of(&address));
    }

    let config = parse_yaml(&read_repo_file("prometheus.yml"), "prometheus.yml");
    let mut scraped: BTreeMap<String, Vec<(u16, String)>> = BTreeMap::new();
    for job in config
        .get("scrape_configs")
        .and_then(Value::as_sequence)
        .expect("prometheus.yml has scrape_configs")
    {
        let path = job
            .get("metrics_path")
            .map_or_else(|| "/metrics".to_owned(), text);
        for group in job
            .get("static_configs")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            for target in group
                .get("targets")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let target = text(target);
                let (host, port) = target.rsplit_once(':').expect("targets are host:port");
                scraped
                    .entry(host.to_owned())
                    .or_default()
                    .push((port.parse().expect("numeric port"), path.clone()));
            }
        }
    }

    let mut problems = Vec::new();
    for (name, port) in &listening {
        match scraped.get(name) {
            None => problems.push(format!("{name} (port {port}) is not scraped")),
            Some(targets) => {
                for (scraped_port, path) in targets {
                    if scraped_port != port || path != "/metrics" {
                        problems.push(format!(
                            "{name} serves /metrics on {port}, but is scraped at {scraped_port}{path}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "prometheus.yml vs docker-compose.yml:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_mounted_or_built_file_exists() {
    let compose = compose();
    let root = repo_root();
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    let mut referenced: Vec<(String, String)> = Vec::new();
    for (name, service) in services {
        let name = text(name);
        for volume in service
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            // Short syntax `SOURCE:TARGET[:MODE]` or long syntax `{type: bind, source}`;
            // a source starting with `.` or `/` is a bind mount, anything else a volume.
            let source = match volume {
                Value::String(short) => short.split(':').next().unwrap_or_default().to_owned(),
                long => long.get("source").map(text).unwrap_or_default(),
            };
            if source.starts_with('.') || source.starts_with('/') {
                referenced.push((name.clone(), source));
            }
        }
        if let Some(build) = service.get("build") {
            let (context, dockerfile) = match build {
                Value::String(context) => (context.clone(), "Dockerfile".to_owned()),
                build => (
                    build.get("context").map_or_else(|| ".".to_owned(), text),
                    build
                        .get("dockerfile")
                        .map_or_else(|| "Dockerfile".to_owned(), text),
                ),
            };
            referenced.push((name.clone(), format!("{context}/{dockerfile}")));
        }
    }
    assert!(
        referenced.len() >= 3,
        "found only {referenced:?}: is the parser broken?"
    );
    let missing: Vec<String> = referenced
        .iter()
        .filter(|(_, path)| !root.join(path).exists())
        .map(|(service, path)| format!("{service}: {path}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docker-compose.yml references files that do not exist:\n  {}",
        missing.join("\n  ")
    );
}
