//! ScyllaDB settings for the commands that open a store besides the aggregator
//! (ingest's read side, `query`, `replay`, `verify`), with the aggregator's defaults.

use std::sync::Arc;

use anyhow::Context;
use tally_sink::store::ScyllaOptions;
use tally_sink::WindowStore;

#[derive(clap::Args, Debug, Clone)]
pub struct ScyllaArgs {
    /// ScyllaDB keyspace replication used if the keyspace has to be created.
    #[arg(
        long,
        env = "TALLY_SCYLLA_REPLICATION",
        default_value = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
    )]
    pub scylla_replication: String,
    /// ScyllaDB consistency level.
    #[arg(long, env = "TALLY_SCYLLA_CONSISTENCY", default_value = "LOCAL_QUORUM")]
    pub scylla_consistency: String,
}

impl ScyllaArgs {
    /// Opens the store at `url` (`sqlite://` ignores the ScyllaDB settings).
    pub async fn open(&self, url: &str) -> anyhow::Result<Arc<dyn WindowStore>> {
        let options = ScyllaOptions {
            replication: self.scylla_replication.clone(),
            consistency: self.scylla_consistency.clone(),
            ..ScyllaOptions::default()
        };
        tally_sink::open_store(url, &options)
            .await
            .with_context(|| format!("opening {url}"))
    }
}
