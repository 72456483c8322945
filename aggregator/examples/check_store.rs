//! Checks a window store against what was sent, through the store's own
//! `scan_rows` (so it does not depend on the store's layout): for each range of
//! window starts, the number of rows and the totals of `sum` and `count`.
//!
//! Usage: `check_store STORE_URL FROM_MS TO_MS ROWS SUM COUNT [FROM_MS TO_MS ROWS SUM COUNT]...`
//!
//! Prints one line per range, `ok rows=R sum=S count=C [from, to)` or
//! `MISMATCH ...`, and exits with status 1 if any range differs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use anyhow::{bail, Context};
use support::arg;

const USAGE: &str =
    "usage: check_store STORE_URL FROM_MS TO_MS ROWS SUM COUNT [FROM_MS TO_MS ROWS SUM COUNT]...";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url: String = arg(&args, 0, None, USAGE)?;
    if args.len() < 6 || !(args.len() - 1).is_multiple_of(5) {
        bail!("{USAGE}");
    }
    let store = tally_sink::open_store(&url, &tally_sink::StoreOptions::default())
        .await
        .with_context(|| format!("opening {url}"))?;
    let mut all_ok = true;
    for range in 0..(args.len() - 1) / 5 {
        let at = 1 + range * 5;
        let from: i64 = arg(&args, at, None, USAGE)?;
        let to: i64 = arg(&args, at + 1, None, USAGE)?;
        let rows: usize = arg(&args, at + 2, None, USAGE)?;
        let sum: i128 = arg(&args, at + 3, None, USAGE)?;
        let count: i128 = arg(&args, at + 4, None, USAGE)?;
        let found = store
            .scan_rows(from, to, &[])
            .await
            .context("scanning the store")?;
        let found_sum: i128 = found.iter().map(|row| i128::from(row.sum)).sum();
        let found_count: i128 = found.iter().map(|row| i128::from(row.count)).sum();
        if found.len() == rows && found_sum == sum && found_count == count {
            println!("ok rows={rows} sum={sum} count={count} [{from}, {to})");
        } else {
            all_ok = false;
            println!(
                "MISMATCH rows={}/{rows} sum={found_sum}/{sum} count={found_count}/{count} [{from}, {to})",
                found.len()
            );
        }
    }
    if !all_ok {
        std::process::exit(1);
    }
    Ok(())
}
