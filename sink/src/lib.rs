//! Where window sums go: the store trait, its backends, and the dead-letter producer.
//!
//! - [`row`]: [`WindowRow`], one row per (key, window_start, partition), and its
//!   completeness version.
//! - [`store`]: the [`WindowStore`] trait, store addressing (`sqlite://`, `scylla://`)
//!   and [`open_store`].
//! - [`sqlite`]: the embedded backend (SQLite file, WAL, version-guarded upserts).
//! - [`scylla_store`]: the ScyllaDB backend (prepared statements, write timestamp = version).
//! - [`scylla_session`]: how it reaches a production cluster (auth, TLS, local DC).
//! - [`dlq`]: the dead-letter producer (idempotent, acks=all).
//! - [`error`]: [`SinkError`], which separates bad data from infrastructure failure.

pub mod dlq;
pub mod error;
pub mod row;
pub mod scylla_session;
pub mod scylla_store;
pub mod sqlite;
pub mod store;

pub use dlq::{DeadLetter, DeadLetterProducer, DeliveryFailure, Undeliverable};
pub use error::SinkError;
pub use row::{RangeTotal, WindowRow, WindowTotal};
pub use scylla_store::ScyllaStore;
pub use sqlite::SqliteStore;
pub use store::{
    load_retention, load_settings, open_store, pin_settings, CheckpointScope, Retention,
    ScyllaOptions, StoreOptions, StoreUrl, WindowStore,
};
