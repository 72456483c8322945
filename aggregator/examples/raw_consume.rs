//! The baseline of the end-to-end aggregator benchmark (`scripts/bench-aggregator.sh`):
//! a consumer that reads a topic from the beginning in a fresh group and does nothing
//! with the records, timed until it has seen RECORDS of them.
//!
//! Usage: `raw_consume BROKERS TOPIC GROUP RECORDS [stream|base]`
//!
//! `stream` (default): an rdkafka `StreamConsumer` awaited in a loop on a
//! multi-threaded tokio runtime — the same client type, runtime and consumer
//! settings as `tally aggregator` (`aggregator/src/consumer.rs`), so the ratio
//! between the two measures what the aggregator's own work costs.
//! `base`: a `BaseConsumer` polled on the main thread (the cheapest way to read
//! with librdkafka), for reference.
//!
//! Prints one line on stdout:
//! `records=N first_record_after=T0 seconds=T rate=R bytes=B` where T is the time
//! from the first record to the N-th (startup and group join excluded, as for the
//! aggregator in the script) and R = records read in that time / T.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

/// Parses the statistics like the aggregator's context does, then drops them.
struct Quiet;

impl ClientContext for Quiet {
    fn stats(&self, _statistics: Statistics) {}
}

impl ConsumerContext for Quiet {}

/// The consumer settings of `tally aggregator`, from the library itself.
fn config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = tally_aggregator::consumer::consumer_config(brokers, group, &[]);
    // The aggregator assigns explicit positions; this plain subscriber starts a new
    // group at the beginning instead.
    config.set("auto.offset.reset", "earliest");
    // Extra settings for experiments, e.g. RAW_CONSUME_EXTRA="fetch.max.bytes=1048576".
    if let Ok(extra) = std::env::var("RAW_CONSUME_EXTRA") {
        for pair in extra.split_whitespace() {
            if let Some((name, value)) = pair.split_once('=') {
                config.set(name, value);
            }
        }
    }
    config
}

struct Tally {
    started: Instant,
    first: Option<Instant>,
    seen: u64,
    bytes: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            started: Instant::now(),
            first: None,
            seen: 0,
            bytes: 0,
        }
    }

    fn saw(&mut self, payload: Option<&[u8]>) {
        if self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.seen += 1;
        self.bytes += payload.map_or(0, |p| p.len() as u64);
    }

    fn report(&self) {
        let first = self.first.unwrap_or(self.started);
        let seconds = first.elapsed().as_secs_f64();
        // The first record arrived at `first`: the timed interval reads the rest.
        let rate = (self.seen.saturating_sub(1)) as f64 / seconds;
        println!(
            "records={} first_record_after={:.2} seconds={seconds:.3} rate={rate:.0} bytes={}",
            self.seen,
            (first - self.started).as_secs_f64(),
            self.bytes
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: raw_consume BROKERS TOPIC GROUP RECORDS [stream|base]");
    }
    let (brokers, topic, group) = (&args[0], &args[1], &args[2]);
    let records: u64 = args[3].replace('_', "").parse().context("RECORDS")?;
    let mode = args.get(4).map_or("stream", String::as_str);
    let deadline = Duration::from_secs(600);
    match mode {
        "stream" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let consumer: StreamConsumer<Quiet> =
                    config(brokers, group).create_with_context(Quiet)?;
                consumer.subscribe(&[topic])?;
                let mut tally = Tally::new();
                while tally.seen < records {
                    if tally.started.elapsed() > deadline {
                        bail!(
                            "only {} of {records} records after {deadline:?}",
                            tally.seen
                        );
                    }
                    match consumer.recv().await {
                        Ok(message) => tally.saw(message.payload()),
                        Err(err) => eprintln!("consumer error: {err}"),
                    }
                }
                tally.report();
                Ok(())
            })
        }
        "base" => {
            let consumer: BaseConsumer<Quiet> =
                config(brokers, group).create_with_context(Quiet)?;
            consumer.subscribe(&[topic])?;
            let mut tally = Tally::new();
            while tally.seen < records {
                if tally.started.elapsed() > deadline {
                    bail!(
                        "only {} of {records} records after {deadline:?}",
                        tally.seen
                    );
                }
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(message)) => tally.saw(message.payload()),
                    Some(Err(err)) => eprintln!("consumer error: {err}"),
                    None => {}
                }
            }
            tally.report();
            Ok(())
        }
        other => bail!("unknown mode {other:?}: stream or base"),
    }
}
