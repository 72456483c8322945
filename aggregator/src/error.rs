//! The aggregator's one error type.

use tally_sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// A flag or setting is invalid; fix the configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Kafka refused or failed an operation (client creation, subscribe, commit).
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The store or the dead-letter producer failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The aggregator stopped without committing because it could not continue
    /// exactly (e.g. the store checkpoint of an assigned partition was unreadable);
    /// a restart replays from the last commit.
    #[error("aggregator stopped: {0}")]
    Fatal(String),
    /// Metric registration failed (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl AggregatorError {
    /// True when retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AggregatorError::Config(_) | AggregatorError::Metrics(_) => false,
            AggregatorError::Kafka(_) | AggregatorError::Fatal(_) => true,
            AggregatorError::Sink(err) => err.is_retryable(),
        }
    }
}
