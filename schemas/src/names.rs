//! Topic and header names. Every stage uses these constants, never string literals.

/// The input topic that ingest produces to and aggregators consume.
pub const INCREMENTS_TOPIC: &str = "increments";
/// Dead letters: records that can never be counted, with the reason in headers.
pub const DLQ_TOPIC: &str = "increments.dlq";

/// Request id: accepted from or generated at the HTTP edge, carried as a Kafka header.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Set on a record that `tally dlq redrive` put back on the input topic: the dead
/// letter's `PARTITION:OFFSET` in the dead-letter topic.
pub const REDRIVEN_HEADER: &str = "tally.redriven-from";
/// Also set on a re-driven record: its source record, `TOPIC/PARTITION/OFFSET` (how a
/// later re-drive finds it after an interrupted run).
pub const REDRIVE_SOURCE_HEADER: &str = "tally.redrive.source";
/// Also set on a re-driven record: the id of the `tally dlq redrive` run.
pub const REDRIVE_RUN_HEADER: &str = "tally.redrive.run";
/// The re-drive journal (one partition, never deleted): which source records
/// `tally dlq redrive` claimed and put back.
pub const REDRIVE_JOURNAL_TOPIC: &str = "increments.dlq.redrive";

pub const DLQ_REASON_HEADER: &str = "dlq.reason";
pub const DLQ_ERROR_HEADER: &str = "dlq.error";
pub const DLQ_SOURCE_TOPIC_HEADER: &str = "dlq.source.topic";
pub const DLQ_SOURCE_PARTITION_HEADER: &str = "dlq.source.partition";
pub const DLQ_SOURCE_OFFSET_HEADER: &str = "dlq.source.offset";
pub const DLQ_SOURCE_TIMESTAMP_HEADER: &str = "dlq.source.timestamp";
