//! The real ingest edge for benchmarks: starts an in-process librdkafka mock cluster
//! (3 brokers, topic `increments` with 6 partitions, replication 3) and serves
//! `tally_ingest::run` on the given address until SIGINT/SIGTERM. Every 202 still waits
//! for the mock brokers' acknowledgement (acks=all, idempotent producer).
//!
//! `cargo run --release -p tally-ingest --example bench_ingest -- 127.0.0.1:18082 [linger]`
//! Set `KAFKA_BROKERS` to use an external broker instead of the mock cluster.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use tally_ingest::IngestConfig;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:18082".to_owned());
    let linger = match args.next() {
        Some(text) => humantime::parse_duration(&text)?,
        None => IngestConfig::default().linger,
    };

    // Kept alive for the whole run: dropping it stops the brokers.
    let (_mock_cluster, brokers) = match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) => (None, brokers),
        Err(_) => {
            let cluster = MockCluster::new(3)?;
            cluster.create_topic("increments", 6, 3)?;
            let brokers = cluster.bootstrap_servers();
            (Some(cluster), brokers)
        }
    };
    let config = IngestConfig {
        brokers: brokers.clone(),
        linger,
        delivery_timeout: Duration::from_secs(5),
        ..IngestConfig::default()
    };
    let listener = TcpListener::bind(&address).await?;
    println!(
        "ingest listening on http://{} (brokers {brokers}, linger {})",
        listener.local_addr()?,
        humantime::format_duration(linger)
    );
    let mut terminate = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    tally_ingest::run(config, listener, prometheus::Registry::new(), shutdown).await?;
    Ok(())
}
