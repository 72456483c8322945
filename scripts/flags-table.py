#!/usr/bin/env python3
"""Prints the README's configuration tables from `tally <cmd> --help`.

Usage: scripts/flags-table.py [path/to/tally]  (default target/debug/tally)
The test tally/tests/readme_config.rs fails when README.md misses a flag or env var.
"""
import re
import subprocess
import sys

TALLY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tally"
COMMANDS = ["ingest", "aggregator", "dev", "query", "replay", "dlq list", "dlq redrive", "verify"]

for command in COMMANDS:
    out = subprocess.run([TALLY] + command.split() + ["--help"], capture_output=True, text=True, check=True).stdout
    entries, current = [], None
    for line in out.split("\n"):
        match = re.match(r"^\s+(?:-\w, )?(--[\w-]+)(?: <[\w_]+>)?\s*(.*)$", line)
        if match:
            if current:
                entries.append(current)
            current = [match.group(1), match.group(2)]
        elif current and line.startswith("          ") and line.strip():
            current[1] += " " + line.strip()
        elif not line.strip() and current:
            entries.append(current)
            current = None
    if current:
        entries.append(current)
    print(f"\n**`tally {command}`**\n")
    print("| flag | env | default | what |\n|---|---|---|---|")
    for flag, text in entries:
        if flag in ("--help", "--version"):
            continue
        env = re.search(r"\[env: ([A-Z_]+)[=\]]", text)
        default = re.search(r"\[default: ([^\]]*)\]", text)
        what = re.sub(r"\s*\[(env|default|possible values):[^\]]*\]", "", text).strip().replace("|", "\\|")
        env_cell = f"`{env.group(1)}`" if env else ""
        default_cell = f"`{default.group(1)}`".replace("|", "\\|") if default else ""
        print(f"| `{flag}` | {env_cell} | {default_cell} | {what} |")
