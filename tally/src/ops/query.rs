//! `tally query`: window totals of one key, one JSON object per line, then the total
//! of the range on a last line `{"total": {...}}`. Reads the store like the read API
//! (rows of replaced settings and past retention are not counted), without its page
//! size or maximum range: windows are streamed as they are read.

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::Context;
use tally_sink::store::{visit_windows, READ_CHUNK_ROWS};
use tally_sink::RangeTotal;
use uuid::Uuid;

use crate::read_api::{now_ms, resolve_range, rfc3339_ms, total_json, window_json, StoreView};

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
    /// Windows starting before this (RFC 3339 or epoch ms); default five minutes from now.
    #[arg(long)]
    pub to: Option<String>,
}

pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    let now = now_ms();
    let (from_ms, to_ms) = resolve_range(args.from.as_deref(), args.to.as_deref(), now)
        .map_err(|(_, message)| anyhow::Error::msg(message))?;
    let store = args.store.open().await?;
    let view = StoreView::load(&*store).await?;
    if let Some(expired) = view.expired_before(now) {
        eprintln!(
            "query: windows that ended before {} are past the store's retention and gone",
            rfc3339_ms(expired)
        );
    }
    let mut total = RangeTotal::default();
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    let mut failed = None;
    visit_windows(
        &*store,
        args.key,
        from_ms,
        to_ms,
        READ_CHUNK_ROWS,
        |row| view.keeps(row, now),
        |window| {
            total.add(&window);
            line.clear();
            window_json(&mut line, &window);
            if let Err(err) = writeln!(out, "{line}") {
                failed = Some(err);
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        },
    )
    .await?;
    if let Some(err) = failed {
        return Err(err).context("writing to stdout");
    }
    line.clear();
    line.push_str(r#"{"total":"#);
    total_json(&mut line, &total);
    line.push('}');
    writeln!(out, "{line}").context("writing to stdout")?;
    Ok(())
}
