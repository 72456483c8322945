//! `tally dev`: the embedded playground. One process runs librdkafka's mock cluster
//! (real Kafka protocol on localhost, reachable by any client), the ingest edge, one
//! aggregator and the SQLite store, and prints where everything is.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use rdkafka::mocking::MockCluster;
use tally_schemas::names::{DLQ_TOPIC, INCREMENTS_TOPIC, REDRIVE_JOURNAL_TOPIC};
use tokio::sync::watch;

use crate::cli::DevArgs;

/// Parses a library's flag struct from explicit arguments plus the environment, so
/// the playground honours the same env vars as the standalone commands.
#[derive(Parser)]
struct Flags<T: clap::Args> {
    #[command(flatten)]
    inner: T,
}

fn flags<T: clap::Args>(args: &[&str]) -> anyhow::Result<T> {
    let argv = std::iter::once("tally").chain(args.iter().copied());
    Ok(Flags::<T>::try_parse_from(argv)?.inner)
}

pub fn run(runtime: &tokio::runtime::Runtime, args: DevArgs) -> anyhow::Result<()> {
    // The mock cluster lives on this thread for the whole run and is dropped last.
    let cluster =
        MockCluster::new(args.brokers).context("starting the in-process Kafka cluster")?;
    cluster
        .create_topic(INCREMENTS_TOPIC, args.partitions, 1)
        .context("creating the increments topic")?;
    cluster
        .create_topic(DLQ_TOPIC, 1, 1)
        .context("creating the dead-letter topic")?;
    // The mock cluster cannot create topics on request, so `tally dlq redrive` could
    // not create its journal here.
    cluster
        .create_topic(REDRIVE_JOURNAL_TOPIC, 1, 1)
        .context("creating the re-drive journal topic")?;
    let bootstrap = cluster.bootstrap_servers();
    let result = runtime.block_on(serve(&args, &bootstrap));
    drop(cluster);
    result
}

async fn serve(args: &DevArgs, bootstrap: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let db_path = args.data_dir.join("tally.sqlite");
    set_aside_previous_store(&db_path)?;
    let store_url = format!("sqlite://{}", db_path.display());
    let window = humantime::format_duration(args.window).to_string();

    let ingest_config: tally_ingest::IngestConfig =
        flags(&["--listen", &args.listen, "--brokers", bootstrap])?;
    let aggregator_config: tally_aggregator::AggregatorConfig = flags(&[
        "--brokers",
        bootstrap,
        "--store",
        &store_url,
        "--group",
        "tally-dev",
        "--window",
        &window,
    ])?;
    let store = tally_sink::open_store(&store_url, &aggregator_config.scylla_options())
        .await
        .with_context(|| format!("opening {store_url}"))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    let registry = prometheus::Registry::new();
    let (stop, stopping) = watch::channel(false);

    let read_handler = crate::read_api::handler(
        store.clone(),
        crate::read_api::ReadArgs::default().limits()?,
    );
    let ingest = tokio::spawn(tally_ingest::run_with(
        ingest_config,
        listener,
        registry.clone(),
        crate::shutdown::stopped(stopping.clone()),
        Some(read_handler),
    ));
    let health = tally_aggregator::Health::new(aggregator_config.stall_timeout);
    let aggregator = tokio::spawn(tally_aggregator::run_with_store(
        aggregator_config,
        Arc::clone(&store),
        registry,
        health,
        crate::shutdown::stopped(stopping.clone()),
    ));

    println!("ingest: http://{address}");
    println!("kafka: {bootstrap}");
    println!("store: {store_url}");
    println!("metrics: http://{address}/metrics");
    println!("ui: http://{address}/ui");
    let mut ingest = ingest;
    let mut aggregator = aggregator;
    tokio::select! {
        ready = wait_until_ready(address) => {
            ready?;
            println!("ready");
        }
        result = &mut ingest => return task_ended("ingest", result),
        result = &mut aggregator => return task_ended("aggregator", result),
    }

    tokio::select! {
        () = crate::shutdown::signal_then_notify(Some(stop.clone())) => {}
        result = &mut ingest => {
            let _ = stop.send(true);
            let _ = aggregator.await;
            return task_ended("ingest", result);
        }
        result = &mut aggregator => {
            let _ = stop.send(true);
            let _ = ingest.await;
            return task_ended("aggregator", result);
        }
    }
    let _ = stop.send(true);
    let ingest_result = ingest.await.context("ingest task")?;
    let aggregator_result = aggregator.await.context("aggregator task")?;
    ingest_result?;
    aggregator_result?;
    Ok(())
}

/// The in-process Kafka log is new on every start, so rows of an earlier run belong
/// to a log that no longer exists (and their offsets would outrank the new log's in
/// the version guard). Keep them, but out of the way: `tally-previous.sqlite`.
fn set_aside_previous_store(db_path: &std::path::Path) -> anyhow::Result<()> {
    if !db_path.exists() {
        return Ok(());
    }
    let previous = db_path.with_file_name("tally-previous.sqlite");
    for suffix in ["", "-wal", "-shm"] {
        let from = std::path::PathBuf::from(format!("{}{suffix}", db_path.display()));
        let to = std::path::PathBuf::from(format!("{}{suffix}", previous.display()));
        if from.exists() {
            std::fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        } else if to.exists() {
            std::fs::remove_file(&to).with_context(|| format!("removing {}", to.display()))?;
        }
    }
    eprintln!(
        "tally dev: the in-process Kafka log starts empty, so the store does too; the previous run's rows are in {}",
        previous.display()
    );
    Ok(())
}

/// A component stopped on its own before shutdown was asked for.
fn task_ended<E: Into<anyhow::Error>>(
    name: &str,
    result: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(())) => anyhow::bail!("{name} stopped unexpectedly"),
        Ok(Err(err)) => Err(err.into().context(format!("{name} failed"))),
        Err(err) => Err(anyhow::Error::new(err).context(format!("{name} task"))),
    }
}

/// Waits until the edge answers `/readyz` with 200 (the broker is reachable).
async fn wait_until_ready(address: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let probe = async {
            let mut stream = tokio::net::TcpStream::connect(address).await?;
            stream
                .write_all(b"GET /readyz HTTP/1.1\r\nhost: tally\r\nconnection: close\r\n\r\n")
                .await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            Ok::<_, std::io::Error>(head.ends_with(b"200"))
        };
        if let Ok(Ok(true)) = tokio::time::timeout(std::time::Duration::from_secs(5), probe).await {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the playground's ingest edge did not become ready within a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
