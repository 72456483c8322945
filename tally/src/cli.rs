//! The `tally` command line: subcommands and their flags (each with an env var).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::telemetry::LogArgs;

#[derive(Parser, Debug)]
#[command(
    name = "tally",
    version,
    about = "Exact per-key window sums from Kafka into ScyllaDB"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP ingest edge.
    Ingest(IngestArgs),
    /// Run a window aggregator (one member of the consumer group).
    Aggregator(AggregatorArgs),
    /// Run the whole pipeline on this machine: in-process Kafka, SQLite, ingest, aggregator.
    Dev(DevArgs),
    /// Print the window totals of one key (one JSON object per window).
    Query(crate::ops::query::QueryArgs),
    /// Rebuild windows from a time or from offsets (with the aggregators stopped).
    Replay(crate::ops::replay::ReplayArgs),
    /// List or re-drive dead letters.
    Dlq(crate::ops::dlq::DlqArgs),
    /// Recompute the sums from the topic and diff them against the store (exit 1 on any difference).
    Verify(crate::ops::verify::VerifyArgs),
}

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    #[command(flatten)]
    pub config: tally_ingest::IngestConfig,
    /// Window store to answer `GET /v1/windows/{key}` and `GET /v1/windows?key=` from
    /// (the read side); without it those routes answer 404.
    #[arg(long, env = "TALLY_STORE")]
    pub store: Option<String>,
    #[command(flatten)]
    pub read: crate::read_api::ReadArgs,
    #[command(flatten)]
    pub scylla: tally_aggregator::config::ScyllaArgs,
}

#[derive(clap::Args, Debug)]
pub struct AggregatorArgs {
    #[command(flatten)]
    pub config: tally_aggregator::AggregatorConfig,
    /// Address for `/metrics` and `/healthz`.
    #[arg(long, env = "TALLY_METRICS_LISTEN", default_value = "127.0.0.1:9091")]
    pub metrics_listen: String,
}

#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Address of the ingest edge (also serves /metrics for the whole playground).
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Directory for the SQLite store.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "tally-data")]
    pub data_dir: PathBuf,
    /// Partitions of the `increments` topic in the in-process cluster.
    #[arg(long, env = "TALLY_DEV_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Brokers in the in-process cluster.
    #[arg(long, env = "TALLY_DEV_BROKERS", default_value_t = 3)]
    pub brokers: i32,
    /// Tumbling window size.
    #[arg(long, env = "TALLY_WINDOW", default_value = "10s", value_parser = tally_aggregator::config::parse_duration)]
    pub window: std::time::Duration,
}
