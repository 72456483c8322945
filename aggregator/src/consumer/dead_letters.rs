//! Sending dead letters: one task per letter, each reporting its delivery back to
//! the protocol. How many are outstanding is bounded by the protocol
//! ([`crate::protocol::Protocol::may_read`] stops reading at its limit).

use std::sync::Arc;

use tally_sink::dlq::{DeadLetter, DeadLetterProducer};
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
                    // Too large, topic missing, not authorised: retrying would block
                    // the partition forever, so the protocol stops the aggregator.
                    let undeliverable = err.undeliverable();
                    let kind = undeliverable.map_or("transient", |kind| kind.code());
                    shell.metrics.dlq_failures.with_label_values(&[kind]).inc();
                    if undeliverable.is_some() {
                        error!(%err, kind, partition = letter.partition, offset = letter.offset, "dead letter can never be delivered");
                    } else {
                        warn!(%err, partition = letter.partition, offset = letter.offset, "dead letter not acknowledged; retried at the next flush");
                    }
                    Event::LetterFailed {
                        id,
                        permanent: undeliverable.is_some() || !err.is_retryable(),
                        error: err.to_string(),
                    }
                }
            };
            shell.handle_and_execute(event);
            shell.progress.notify_waiters();
        });
    }
}
