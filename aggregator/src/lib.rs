//! The aggregator: exact event-time tumbling-window sums over Kafka partitions.
//!
//! - [`engine`]: the window engine, a pure state machine per partition (no I/O, no
//!   clock: time is passed in). Decides counted / late / future / overflow, closes
//!   windows by watermark, emits provisional and final rows and the checkpoint
//!   that a commit may carry.
//! - [`protocol`]: the commit protocol, a pure state machine (events in, commands
//!   out) that owns the engines: what to write, when to commit, revokes, resumes,
//!   lost offsets, replay planning. The consumer shell and the property test both
//!   drive it.
//! - [`consumer`]: the consumer loop that drives engines from Kafka: decode, dead
//!   letters, flush ticks, store writes through a circuit breaker, commits after
//!   the flush, rebalance handling.
//! - [`breaker`]: the store circuit breaker (pure state machine).
//! - [`config`]: `tally aggregator` flags and env vars.
//! - [`metrics`]: every `tally_aggregator_*` metric, in one place.
//! - [`error`]: the crate error type, [`AggregatorError`].

pub mod breaker;
pub mod config;
pub mod consumer;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod protocol;

pub use config::AggregatorConfig;
pub use consumer::{run, run_with_store, Health};
pub use error::AggregatorError;
