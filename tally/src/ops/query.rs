//! `tally query`: window totals of one key, one JSON object per line.

use anyhow::Context;
use uuid::Uuid;

use crate::read_api::{read_totals, resolve_range, total_json};

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    /// Window store: sqlite://PATH or scylla://host:port[,host:port]/keyspace.
    #[arg(
        long,
        env = "TALLY_STORE",
        default_value = "sqlite://data/tally.sqlite"
    )]
    pub store: String,
    #[command(flatten)]
    pub scylla: crate::scylla_args::ScyllaArgs,
    /// The key (UUID).
    #[arg(long)]
    pub key: Uuid,
    /// Earliest window start (RFC 3339 or epoch ms); default one hour ago.
    #[arg(long)]
    pub from: Option<String>,
    /// Windows starting before this (RFC 3339 or epoch ms); default now + one window.
    #[arg(long)]
    pub to: Option<String>,
    /// Window size the aggregators use (ScyllaDB reads enumerate window starts).
    #[arg(long, env = "TALLY_WINDOW", default_value = "10s", value_parser = tally_aggregator::config::parse_duration)]
    pub window: std::time::Duration,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let window_ms = i64::try_from(args.window.as_millis()).context("--window too large")?;
    let (from_ms, to_ms) = resolve_range(args.from.as_deref(), args.to.as_deref(), window_ms)
        .map_err(anyhow::Error::msg)?;
    let store = args.scylla.open(&args.store).await?;
    let totals = read_totals(&*store, args.key, from_ms, to_ms, window_ms).await?;
    for total in &totals {
        println!("{}", total_json(total));
    }
    Ok(())
}
