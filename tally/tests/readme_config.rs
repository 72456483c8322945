//! The README's configuration tables must name every flag and env var the binary has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const COMMANDS: [&[&str]; 8] = [
    &["ingest"],
    &["aggregator"],
    &["dev"],
    &["query"],
    &["replay"],
    &["dlq", "list"],
    &["dlq", "redrive"],
    &["verify"],
];

#[test]
fn readme_documents_every_flag_and_env_var() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut missing = Vec::new();
    let mut checked = 0;
    for command in COMMANDS {
        let output = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(command)
            .arg("--help")
            .output()
            .unwrap();
        assert!(output.status.success());
        let help = String::from_utf8(output.stdout).unwrap();
        let section = format!("**`tally {}`**", command.join(" "));
        let Some(start) = readme.find(&section) else {
            missing.push(section);
            continue;
        };
        let table = &readme[start..];
        let table = &table[..table[section.len()..]
            .find("**`tally ")
            .map_or(table.len(), |i| i + section.len())];
        for word in help.split_whitespace() {
            let flag = word.trim_end_matches(',');
            if flag.starts_with("--") && flag.len() > 2 && flag != "--help" && flag != "--version" {
                checked += 1;
                if !table.contains(&format!("`{flag}`")) {
                    missing.push(format!("{section} {flag}"));
                }
            }
        }
        for env in help.split("[env: ").skip(1) {
            let name: String = env
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            checked += 1;
            if !table.contains(&format!("`{name}`")) {
                missing.push(format!("{section} env {name}"));
            }
        }
    }
    assert!(
        checked > 80,
        "parsed only {checked} flags/env vars from --help"
    );
    assert!(
        missing.is_empty(),
        "README.md lacks: {missing:#?} (regenerate with scripts/flags-table.py)"
    );
}
