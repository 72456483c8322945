//! rdkafka's callbacks: rebalances, commit results and statistics, translated into
//! protocol events.
//!
//! The assignment callback assigns every partition at the position the protocol
//! decides (from the committed offsets and the store's checkpoint rows, looked up
//! concurrently), so a partition never starts where librdkafka's own reset policy
//! would put it. The revoke callback handles every revoked partition at once: one
//! last flush, one wait bounded by `--revoke-timeout`, one synchronous commit; so a
//! rebalance costs about one revoke timeout whatever the number of partitions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tally_sink::SinkError;
use tracing::{error, info, warn};

use super::shell::Shell;
use crate::protocol::{
    AssignedPartition, Command, CommittedOffset, Event, StartAt, StoreCheckpoints,
};

/// How long an assignment waits for the store's checkpoints before the process stops.
const ASSIGN_LOOKUP_PATIENCE: Duration = Duration::from_secs(120);
/// Deadline for fetching committed offsets on assignment.
const COMMITTED_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The rdkafka context of the aggregator's consumer.
pub struct AggregatorContext {
    shell: Arc<Shell>,
}

impl AggregatorContext {
    pub(crate) fn new(shell: Arc<Shell>) -> Self {
        AggregatorContext { shell }
    }
}

impl ClientContext for AggregatorContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.shell.topic) {
            for (id, partition) in &topic.partitions {
                if *id >= 0 && partition.hi_offset >= 0 {
                    self.shell.health.high_watermark(*id, partition.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for AggregatorContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                error!(error = ?other, "rebalance error; giving the partitions back");
                if let Err(err) = consumer.incremental_unassign(tpl) {
                    warn!(%err, "could not unassign after a rebalance error");
                }
            }
        }
    }
}

impl AggregatorContext {
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let shell = &self.shell;
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&shell.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let committed = match consumer.committed_offsets(tpl.clone(), COMMITTED_FETCH_TIMEOUT) {
            Ok(committed) => committed,
            Err(err) => {
                // Without the committed offsets the state cannot be rebuilt exactly.
                shell.fail(format!(
                    "could not fetch committed offsets on assignment: {err}"
                ));
                let _ = consumer.incremental_assign(tpl);
                return;
            }
        };
        let committed: Vec<(i32, CommittedOffset)> = partitions
            .iter()
            .map(|&partition| {
                let state = committed
                    .find_partition(&shell.topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(CommittedOffset::At {
                            offset,
                            metadata: element.metadata().to_owned(),
                        }),
                        _ => None,
                    })
                    .unwrap_or(CommittedOffset::None);
                (partition, state)
            })
            .collect();

        let lookups = block_on(shell, lookup_all(Arc::clone(shell), committed));
        let mut assigned = Vec::new();
        let mut events = Vec::new();
        match lookups {
            Some(results) => {
                for (partition, committed, store) in results {
                    match store {
                        Ok(store) => assigned.push(AssignedPartition {
                            partition,
                            committed,
                            store,
                        }),
                        Err(err) => events.push(Event::AssignLookupFailed {
                            partition,
                            error: err.to_string(),
                        }),
                    }
                }
            }
            None => shell.fail("cannot wait for the store on this runtime".into()),
        }
        for event in events {
            shell.handle_and_execute(event);
        }
        let committed_offsets: Vec<(i32, Option<i64>)> = assigned
            .iter()
            .map(|a| match a.committed {
                CommittedOffset::At { offset, .. } => (a.partition, Some(offset)),
                CommittedOffset::None => (a.partition, None),
            })
            .collect();
        let commands = shell.handle(Event::Assigned {
            partitions: assigned,
        });
        // Every partition is assigned, at the protocol's positions where it gave them
        // (after a stop it gave none: librdkafka must still get its assignment).
        let mut positions = TopicPartitionList::new();
        for element in tpl.elements() {
            let _ = positions.add_partition_offset(
                element.topic(),
                element.partition(),
                element.offset(),
            );
        }
        let mut rest = Vec::with_capacity(commands.len());
        for command in commands {
            match command {
                Command::Assign { positions: decided } => {
                    for (partition, decision) in decided {
                        let start = decision.start;
                        let offset = match start {
                            StartAt::Beginning => Offset::Beginning,
                            StartAt::Offset(offset) => Offset::Offset(offset),
                        };
                        if let Err(err) =
                            positions.set_partition_offset(&shell.topic, partition, offset)
                        {
                            shell.fail(format!(
                                "partition {partition}: cannot set its start: {err}"
                            ));
                        }
                        info!(partition, resume = ?decision.resume, source = ?decision.source, "assigned");
                    }
                }
                other => rest.push(other),
            }
        }
        if let Err(err) = consumer.incremental_assign(&positions) {
            shell.fail(format!("could not take the assignment: {err}"));
        }
        for (partition, committed) in committed_offsets {
            shell.health.assigned(partition, committed);
            shell.metrics.track_partition(partition);
        }
        shell.execute(rest, consumer);
        shell.metrics.assigned_partitions.set(owned_count(shell));
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let shell = &self.shell;
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&shell.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let lost = consumer.assignment_lost();
        let started = Instant::now();
        let deadline = started + shell.revoke_timeout;
        let commands = shell.handle(Event::Revoked {
            partitions: partitions.clone(),
        });
        shell.execute(commands, consumer);
        if !lost {
            let waiting = wait_until(shell, deadline, {
                let partitions = partitions.clone();
                move |shell: &Shell| shell.protocol().revoke_ready(&partitions)
            });
            if block_on(shell, waiting).is_none() {
                warn!("cannot wait for revoked partitions on this runtime");
            }
        }
        let settled = shell.handle(Event::RevokeSettled {
            partitions: partitions.clone(),
        });
        let patience = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(500))
        };
        let mut committed = false;
        for command in settled {
            match command {
                Command::Commit { offsets, .. } if lost => {
                    info!(
                        ?offsets,
                        "partitions lost before the revoke: not committing; the next owner replays"
                    );
                }
                Command::Commit { offsets, .. } => {
                    // Queued behind any ordinary commit already under way.
                    committed = true;
                    if shell.commit_sync(&offsets, patience()) {
                        info!(?partitions, "revoked and committed");
                    }
                }
                other => shell.execute(vec![other], consumer),
            }
        }
        if !committed && !shell.wait_for_commits(patience()) {
            warn!(
                ?partitions,
                "an offset commit was still under way at the hand-over"
            );
        }
        for partition in &partitions {
            shell.health.revoked(*partition);
            shell.metrics.forget_partition(*partition);
        }
        if let Err(err) = consumer.incremental_unassign(tpl) {
            warn!(%err, "could not unassign revoked partitions");
        }
        shell.metrics.assigned_partitions.set(owned_count(shell));
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(?partitions, took_ms, "revoke settled");
    }
}

fn owned_count(shell: &Shell) -> i64 {
    i64::try_from(shell.protocol().owned().len()).unwrap_or(i64::MAX)
}

/// The store's checkpoints for every assigned partition, looked up concurrently and
/// retried; without them neither the exact state nor the generation can be known.
async fn lookup_all(
    shell: Arc<Shell>,
    committed: Vec<(i32, CommittedOffset)>,
) -> Vec<(i32, CommittedOffset, Result<StoreCheckpoints, SinkError>)> {
    let lookups = committed.into_iter().map(|(partition, committed)| {
        let shell = Arc::clone(&shell);
        async move {
            let result = lookup(&shell, partition, &committed).await;
            (partition, committed, result)
        }
    });
    futures::future::join_all(lookups).await
}

async fn lookup(
    shell: &Shell,
    partition: i32,
    committed: &CommittedOffset,
) -> Result<StoreCheckpoints, SinkError> {
    let scope = shell.scope(partition);
    let mut delays = backon::ExponentialBuilder::default()
        .with_jitter()
        .with_max_delay(Duration::from_secs(5))
        .with_total_delay(Some(ASSIGN_LOOKUP_PATIENCE))
        .build();
    loop {
        let attempt = async {
            let exact = match committed {
                CommittedOffset::At { offset, .. } => {
                    shell.store.load_checkpoint(&scope, Some(*offset)).await?
                }
                CommittedOffset::None => None,
            };
            let latest = shell.store.load_checkpoint(&scope, None).await?;
            Ok::<_, SinkError>(StoreCheckpoints { exact, latest })
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(err) if !err.is_retryable() => return Err(err),
            Err(err) => {
                shell.metrics.store_errors.inc();
                match delays.next() {
                    Some(delay) => {
                        warn!(partition, %err, retry_in = ?delay, "store checkpoint lookup failed");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(err),
                }
            }
        }
    }
}

/// Waits until `done` holds or `deadline` passes, waking on the shell's progress.
pub(crate) async fn wait_until(
    shell: &Shell,
    deadline: Instant,
    done: impl Fn(&Shell) -> bool,
) -> bool {
    loop {
        let notified = shell.progress.notified();
        if done(shell) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || shell.stopped() {
            return false;
        }
        // Also poll now and then: a wake-up between the check and the wait is missed.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), notified).await;
    }
}

/// Runs a future to completion from a synchronous rdkafka callback.
fn block_on<F: std::future::Future>(shell: &Shell, future: F) -> Option<F::Output> {
    match shell.runtime.runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => None,
        _ => Some(tokio::task::block_in_place(|| {
            shell.runtime.block_on(future)
        })),
    }
}
