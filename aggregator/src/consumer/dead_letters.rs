//! Sending dead letters: one task per letter, each reporting its delivery back to
//! the protocol. How many are outstanding is bounded by the protocol
//! ([`crate::protocol::Protocol::may_read`] stops reading at its limit).

use std::sync::Arc;

use tally_sink::dlq::{DeadLetter, DeadLetterProducer};
use tally_sink::SinkError;
use tracing::{error, warn};

use super::shell::Shell;
use crate::protocol::{DeadLetterOut, Event, LetterId};

pub(crate) struct DeadLetters {
    producer: Arc<DeadLetterProducer>,
    source_topic: String,
}

impl DeadLetters {
    pub fn new(producer: DeadLetterProducer, source_topic: String) -> Self {
        DeadLetters {
            producer: Arc::new(producer),
            source_topic,
        }
    }

    pub fn send(&self, shell: &Arc<Shell>, id: LetterId, letter: DeadLetterOut) {
        let producer = Arc::clone(&self.producer);
        let source_topic = self.source_topic.clone();
        let shell = Arc::clone(shell);
        shell.runtime.clone().spawn(async move {
            let result = producer
                .send(&DeadLetter {
                    key: letter.key.as_deref(),
                    payload: letter.payload.as_deref(),
                    reason: letter.reason,
                    error: &letter.error,
                    source_topic: &source_topic,
                    source_partition: letter.partition,
                    source_offset: letter.offset,
                    source_timestamp_ms: letter.timestamp_ms,
                    redriven_from: letter.redriven_from.as_deref(),
                })
                .await;
            let event = match result {
                Ok(()) => Event::LetterAcked { id },
                Err(err) => {
                    let permanent = is_permanent(&err);
                    let kind = if permanent { "permanent" } else { "transient" };
                    shell.metrics.dlq_failures.with_label_values(&[kind]).inc();
                    if permanent {
                        error!(%err, partition = letter.partition, offset = letter.offset, "dead letter can never be delivered");
                    } else {
                        warn!(%err, partition = letter.partition, offset = letter.offset, "dead letter not acknowledged; retried at the next flush");
                    }
                    Event::LetterFailed {
                        id,
                        permanent,
                        error: err.to_string(),
                    }
                }
            };
            shell.handle_and_execute(event);
            shell.progress.notify_waiters();
        });
    }
}

/// A failure retrying cannot fix (too large for the topic, topic missing, not
/// authorised): the aggregator stops instead of retrying forever.
fn is_permanent(err: &SinkError) -> bool {
    !err.is_retryable()
}
