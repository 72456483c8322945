//! `tally aggregator` settings: every one a flag with an environment variable.

use std::time::Duration;

use crate::engine::EngineConfig;
use crate::error::AggregatorError;

/// Parses durations written like `10s`, `500ms`, `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{text:?}: {err}"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct AggregatorConfig {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Consumer group shared by all aggregator instances.
    #[arg(long, env = "TALLY_GROUP", default_value = "tally-aggregator")]
    pub group: String,
    /// Input topic.
    #[arg(long, env = "TALLY_TOPIC", default_value = tally_schemas::names::INCREMENTS_TOPIC)]
    pub topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = tally_schemas::names::DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Window store: sqlite://PATH or scylla://host:port[,host:port]/keyspace.
    #[arg(
        long,
        env = "TALLY_STORE",
        default_value = "sqlite://data/tally.sqlite"
    )]
    pub store: String,
    /// Tumbling window size.
    #[arg(long, env = "TALLY_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub window: Duration,
    /// How far behind the partition's newest event time a record may still arrive.
    #[arg(long, env = "TALLY_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How often changed open windows are written as provisional rows.
    #[arg(long, env = "TALLY_FLUSH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// Records stamped further than this ahead of the wall clock are dead-lettered.
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_future_skew: Duration,
    /// Deadline for one dead-letter delivery.
    #[arg(long, env = "TALLY_DLQ_DELIVERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub dlq_delivery_timeout: Duration,
    /// Consecutive failed store writes that open the circuit breaker.
    #[arg(long, env = "TALLY_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: u32,
    /// How long the circuit stays open before a probe write.
    #[arg(long, env = "TALLY_BREAKER_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub breaker_probe_interval: Duration,
    /// Longest wait between store write retries (exponential backoff with jitter).
    #[arg(long, env = "TALLY_RETRY_MAX_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub retry_max_delay: Duration,
    /// How long a revoked partition may spend writing its last rows before it is
    /// handed over uncommitted (the new owner then replays; nothing is lost).
    #[arg(long, env = "TALLY_REVOKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub revoke_timeout: Duration,
    /// Deadline for the final flush and commit on shutdown.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Keep window rows this long after their window ended (event time, so a replay
    /// cannot extend it), then drop them: ScyllaDB rows get a TTL, SQLite prunes final
    /// rows after its flushes. Checkpoints expire this long after they were saved.
    /// Default: keep everything.
    #[arg(long, env = "TALLY_RETENTION", value_parser = parse_duration)]
    pub retention: Option<Duration>,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    /// Extra librdkafka settings for the consumer and the dead-letter producer as
    /// `key=value` (e.g. `security.protocol=SSL`); repeat the flag or separate with
    /// commas. Settings the exactly-once bookkeeping relies on cannot be overridden.
    #[arg(
        long = "kafka-option",
        env = "TALLY_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_options: Vec<tally_schemas::KafkaOption>,
}

/// librdkafka settings the aggregator's guarantees rest on (manual commits after the
/// flush, one group protocol, idempotent acks=all dead letters).
const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

/// ScyllaDB settings, shared by every command that opens a store.
#[derive(clap::Args, Debug, Clone)]
pub struct ScyllaArgs {
    /// ScyllaDB keyspace replication used when the keyspace is created.
    #[arg(
        long,
        env = "TALLY_SCYLLA_REPLICATION",
        default_value = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
    )]
    pub scylla_replication: String,
    /// ScyllaDB consistency level for reads and writes.
    #[arg(long, env = "TALLY_SCYLLA_CONSISTENCY", default_value = "LOCAL_QUORUM")]
    pub scylla_consistency: String,
    /// Most ScyllaDB statements in flight per store call.
    #[arg(long, env = "TALLY_SCYLLA_CONCURRENCY", default_value_t = 256)]
    pub scylla_concurrency: usize,
    /// ScyllaDB partition bucket: a key's windows of one bucket share a partition, so a
    /// range read is one query per bucket. Pinned in the store on first use; every
    /// process must use the pinned value.
    #[arg(long, env = "TALLY_SCYLLA_BUCKET", default_value = "1d", value_parser = parse_duration)]
    pub scylla_bucket: Duration,
}

impl ScyllaArgs {
    pub fn options(&self) -> tally_sink::store::ScyllaOptions {
        tally_sink::store::ScyllaOptions {
            replication: self.scylla_replication.clone(),
            consistency: self.scylla_consistency.clone(),
            max_concurrency: self.scylla_concurrency.max(1),
        }
    }

    /// The options to open a store with, for a process with this `retention` role.
    pub fn store_options(
        &self,
        retention: tally_sink::store::Retention,
    ) -> tally_sink::StoreOptions {
        tally_sink::StoreOptions {
            scylla: self.options(),
            bucket_ms: i64::try_from(self.scylla_bucket.as_millis()).unwrap_or(i64::MAX),
            retention,
        }
    }

    /// Opens the store at `url` as a reader (`sqlite://` ignores these settings).
    pub async fn open(
        &self,
        url: &str,
    ) -> Result<std::sync::Arc<dyn tally_sink::WindowStore>, AggregatorError> {
        let options = self.store_options(tally_sink::store::Retention::AsRecorded);
        Ok(tally_sink::open_store(url, &options).await?)
    }
}

fn millis(duration: Duration, name: &str) -> Result<i64, AggregatorError> {
    i64::try_from(duration.as_millis())
        .map_err(|_| AggregatorError::Config(format!("--{name} is too large")))
}

impl AggregatorConfig {
    /// The engine settings these flags describe, validated.
    pub fn engine_config(&self) -> Result<EngineConfig, AggregatorError> {
        let window_ms = millis(self.window, "window")?;
        if window_ms <= 0 {
            return Err(AggregatorError::Config(
                "--window must be at least 1ms".into(),
            ));
        }
        if self.flush_interval.is_zero() {
            return Err(AggregatorError::Config(
                "--flush-interval must be positive".into(),
            ));
        }
        Ok(EngineConfig {
            window_ms,
            grace_ms: millis(self.grace, "grace")?,
            max_future_skew_ms: millis(self.max_future_skew, "max-future-skew")?,
        })
    }

    /// Refuses `--kafka-option`s that would break commits-after-flush or the
    /// dead-letter guarantee.
    pub fn validate_kafka_options(&self) -> Result<(), AggregatorError> {
        match tally_schemas::KafkaOption::first_protected(
            &self.kafka_options,
            PROTECTED_KAFKA_OPTIONS,
        ) {
            Some(option) => Err(AggregatorError::Config(format!(
                "--kafka-option may not set {:?}: the aggregator's guarantees depend on it",
                option.key
            ))),
            None => Ok(()),
        }
    }

    /// How this aggregator opens its store: the ScyllaDB settings, the bucket, and
    /// the retention it enforces. (The name predates the retention.)
    pub fn scylla_options(&self) -> tally_sink::StoreOptions {
        let retention_ms = self
            .retention
            .map(|retention| i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        self.scylla
            .store_options(tally_sink::store::Retention::Enforce(retention_ms))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: AggregatorConfig,
    }

    fn parse(args: &[&str]) -> AggregatorConfig {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
            .unwrap()
            .config
    }

    #[test]
    fn kafka_options_pass_unless_they_touch_the_guarantees() {
        let config = parse(&[
            "--kafka-option",
            "security.protocol=SSL,fetch.max.bytes=1048576",
        ]);
        assert_eq!(config.kafka_options.len(), 2);
        assert!(config.validate_kafka_options().is_ok());
        for key in [
            "enable.auto.commit",
            "group.id",
            "acks",
            "partition.assignment.strategy",
        ] {
            let config = parse(&["--kafka-option", &format!("{key}=x")]);
            let err = config.validate_kafka_options().unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn durations_parse_like_the_docs_say() {
        let config = parse(&[
            "--window",
            "500ms",
            "--grace",
            "0s",
            "--flush-interval",
            "2s",
        ]);
        let engine = config.engine_config().unwrap();
        assert_eq!((engine.window_ms, engine.grace_ms), (500, 0));
        assert!(parse(&["--flush-interval", "0s"]).engine_config().is_err());
    }

    #[test]
    fn retention_is_off_by_default_and_reaches_the_store_options() {
        use tally_sink::store::Retention;
        let options = parse(&[]).scylla_options();
        assert_eq!(options.retention, Retention::Enforce(None));
        assert_eq!(options.bucket_ms, 86_400_000);
        let options = parse(&["--retention", "7d", "--scylla-bucket", "1h"]).scylla_options();
        assert_eq!(options.retention, Retention::Enforce(Some(7 * 86_400_000)));
        assert_eq!(options.bucket_ms, 3_600_000);
        // Readers never enforce one.
        let reader = parse(&["--retention", "7d"])
            .scylla
            .store_options(Retention::AsRecorded);
        assert_eq!(reader.retention, Retention::AsRecorded);
    }
}
