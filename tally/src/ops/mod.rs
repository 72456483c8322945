//! Operations subcommands: `query`, `replay`, `dlq`, `verify`.

pub mod dlq;
pub mod query;
pub mod replay;
pub mod verify;

use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Where the records are: how to reach Kafka, and the input topic.
#[derive(clap::Args, Debug)]
pub struct TopicArgs {
    #[command(flatten)]
    pub brokers: Brokers,
    /// Input topic.
    #[arg(long, env = "TALLY_TOPIC", default_value = tally_schemas::names::INCREMENTS_TOPIC)]
    pub topic: String,
}

/// How to reach Kafka: bootstrap servers plus the operator's extra settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Brokers {
    /// Kafka bootstrap servers.
    #[arg(
        long = "brokers",
        env = "KAFKA_BROKERS",
        default_value = "localhost:9092"
    )]
    pub servers: String,
    /// Extra librdkafka settings as `key=value` (e.g. `security.protocol=SSL`); repeat
    /// the flag or separate with commas.
    #[arg(
        long = "kafka-option",
        env = "TALLY_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub options: Vec<tally_schemas::KafkaOption>,
}

impl Brokers {
    /// A client configuration with the extras applied first, then the servers.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for option in &self.options {
            config.set(option.key.as_str(), option.value.as_str());
        }
        config.set("bootstrap.servers", &self.servers);
        config
    }
}

/// Where the window rows are. (The window size is the one pinned in the store.)
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Window store: sqlite://PATH or scylla://host:port[,host:port]/keyspace.
    #[arg(
        long,
        env = "TALLY_STORE",
        default_value = "sqlite://data/tally.sqlite"
    )]
    pub store: String,
    #[command(flatten)]
    pub scylla: tally_aggregator::config::ScyllaArgs,
}

impl StoreArgs {
    pub async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn tally_sink::WindowStore>> {
        self.scylla
            .open(&self.store)
            .await
            .with_context(|| format!("opening {}", self.store))
    }
}

/// Kafka operations here are one-shot admin calls; this bounds each of them.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

/// A consumer that never joins a group or commits on its own (admin reads/commits).
pub fn admin_consumer(brokers: &Brokers, group: &str) -> anyhow::Result<BaseConsumer> {
    brokers
        .config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .with_context(|| format!("creating a Kafka consumer for {}", brokers.servers))
}

/// The partition ids of `topic`.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .with_context(|| format!("reading metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "topic {topic} has no partitions (does it exist?)"
    );
    Ok(partitions)
}
