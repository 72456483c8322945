//! `tally`: the one command. Subcommands are thin: they parse flags (each with an
//! env var), set up logging and shutdown, and call the library crates.
//!
//! - `ingest`: the HTTP edge (`tally_ingest`).
//! - `aggregator`: the consumer-group window aggregator (`tally_aggregator`), with
//!   `/metrics` and `/healthz` on `--metrics-listen`.
//! - `dev`: the embedded playground (`dev.rs`), with its live page (`ui.rs`, `/ui`).
//! - `query`, `replay`, `dlq`, `verify`: operations (`ops/`).

mod cli;
mod dev;
mod metrics_http;
mod ops;
mod read_api;
mod shutdown;
mod telemetry;
mod ui;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(&cli.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        // The playground keeps librdkafka's mock cluster on the main thread (it is
        // not Send), so it drives the runtime itself.
        Command::Dev(args) => dev::run(&runtime, args),
        command => runtime.block_on(run(command)),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ingest(args) => {
            let listener = tokio::net::TcpListener::bind(&args.config.listen)
                .await
                .with_context(|| format!("binding {}", args.config.listen))?;
            let registry = prometheus::Registry::new();
            let read_handler = match &args.store {
                Some(url) => {
                    let limits = args.read.limits()?;
                    let store = args
                        .scylla
                        .open(url)
                        .await
                        .with_context(|| format!("opening {url}"))?;
                    Some(read_api::handler(store, limits))
                }
                None => None,
            };
            tally_ingest::run_with(
                args.config,
                listener,
                registry,
                shutdown::signal_then_notify(None),
                read_handler,
            )
            .await?;
        }
        Command::Aggregator(args) => {
            let registry = prometheus::Registry::new();
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let health = tally_aggregator::Health::new(args.config.stall_timeout);
            let metrics = metrics_http::serve(
                &args.metrics_listen,
                registry.clone(),
                Some(health.clone()),
                stopped,
            )
            .await
            .with_context(|| format!("binding {}", args.metrics_listen))?;
            let result = tally_aggregator::run(
                args.config,
                registry,
                health,
                shutdown::signal_then_notify(None),
            )
            .await;
            let _ = stop.send(true);
            let _ = metrics.await;
            result?;
        }
        Command::Dev(_) => unreachable_dev(),
        Command::Query(args) => ops::query::run(args).await?,
        Command::Replay(args) => ops::replay::run(args).await?,
        Command::Dlq(args) => ops::dlq::run(args).await?,
        Command::Verify(args) => {
            let clean = ops::verify::run(args).await?;
            if !clean {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// `dev` is dispatched before the runtime starts; reaching here is a wiring bug.
fn unreachable_dev() {
    tracing::error!("tally dev must be started from main");
}
