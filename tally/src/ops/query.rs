//! `tally query`: window totals of one key, one JSON object per line.

use uuid::Uuid;

use crate::read_api::{read_totals, resolve_range, total_json};

#[derive(clap::Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub store: super::StoreArgs,
    /// The key (UUID).
    #[arg(long)]
    pub key: Uuid,
    /// Earliest window start (RFC 3339 or epoch ms); default one hour ago.
    #[arg(long)]
    pub from: Option<String>,
    /// Windows starting before this (RFC 3339 or epoch ms); default now + one window.
    #[arg(long)]
    pub to: Option<String>,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let window_ms = args.store.window_ms()?;
    let (from_ms, to_ms) = resolve_range(args.from.as_deref(), args.to.as_deref(), window_ms)
        .map_err(anyhow::Error::msg)?;
    let store = args.store.open().await?;
    let totals = read_totals(&*store, args.key, from_ms, to_ms, window_ms).await?;
    for total in &totals {
        println!("{}", total_json(total));
    }
    Ok(())
}
