//! The Tally message contract, shared by every stage. No I/O lives here.
//!
//! - [`increment`]: the increment body (`{"key": UUID, "value": 1..=2^63-1}`), its one
//!   strict decoder (used by the HTTP edge and by the aggregator for records produced
//!   directly to Kafka) and the batch decoders for `POST /increments`.
//! - [`reason`]: why an increment or record is rejected; each reason maps to an HTTP
//!   status family and to a stable dead-letter `dlq.reason` code.
//! - [`names`]: topic names, Kafka header names and the dead-letter header names.
//! - [`checkpoint`]: the per-partition replay state that travels with an offset commit.
//! - [`settings`]: the window size and grace that decide sums, pinned in the store
//!   and in every checkpoint, and their change history.
//! - [`kafka_option`]: `--kafka-option key=value` extra librdkafka settings (values
//!   redacted in `Debug`).
//!
//! `increment.schema.json` (beside this crate's `Cargo.toml`) is the JSON Schema for
//! producers that write to Kafka directly.

pub mod checkpoint;
pub mod increment;
pub mod kafka_option;
pub mod names;
pub mod reason;
pub mod settings;

pub use checkpoint::{Checkpoint, CheckpointDecodeError};
pub use increment::{
    decode_batch, decode_increment, BatchFormat, BatchRejection, Increment, InvalidIncrement,
    ItemRejection,
};
pub use kafka_option::KafkaOption;
pub use reason::RejectReason;
pub use settings::{PinnedSettings, SettingsEpoch, SettingsError, SettingsMismatch, SumSettings};
