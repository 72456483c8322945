//! The sink's one error type.

/// Errors from stores and the dead-letter producer.
///
/// `is_retryable` separates transient infrastructure failures (retry with backoff,
/// open the circuit breaker, pause partitions, commit nothing) from permanent ones
/// (bad configuration, schema mismatch: stop the process loudly).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store URL or a setting is wrong; retrying cannot help.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The store's schema does not match what this build writes; retrying cannot help.
    #[error("store schema mismatch: {0}")]
    Schema(String),
    /// The store is unreachable, timed out, overloaded or refused for now.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The Kafka producer for dead letters failed transiently (broker down, timeout).
    #[error("dead-letter producer failed: {0}")]
    DeadLetter(String),
    /// The dead letter can never be delivered as it is (too large for the topic, topic
    /// missing, not authorised, producer unusable): retrying the same send cannot help.
    #[error("dead letter undeliverable ({}): {detail}", kind.code())]
    DeadLetterUndeliverable {
        kind: crate::dlq::Undeliverable,
        detail: String,
    },
    /// A row read back from the store cannot be represented (corrupt or foreign data).
    #[error("unreadable row in store: {0}")]
    BadRow(String),
}

impl SinkError {
    /// True when the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_) | SinkError::DeadLetter(_))
    }

    /// For a dead letter that can never be delivered, why (a bounded metric label via
    /// [`Undeliverable::code`](crate::dlq::Undeliverable::code)); `None` otherwise.
    pub fn undeliverable(&self) -> Option<crate::dlq::Undeliverable> {
        match self {
            SinkError::DeadLetterUndeliverable { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
