//! What every part of the shell shares: the protocol behind one lock, and the one
//! place where its commands are executed.
//!
//! The protocol is called from the consumer loop (records, ticks), from rdkafka's
//! rebalance callbacks (which run inside the loop's `recv`), from the commit thread,
//! from the writer task and from dead-letter deliveries. Each caller takes the lock, hands
//! over one event, releases the lock and executes the commands: no Kafka or store
//! call ever runs under the lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tally_schemas::Checkpoint;
use tally_sink::store::CheckpointScope;
use tally_sink::WindowStore;
use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use super::committer::{self, CommitJob, CommitTarget, COMMIT_QUEUE};
use super::dead_letters::DeadLetters;
use super::health::Health;
use super::rebalance::AggregatorContext;
use crate::metrics::AggregatorMetrics;
use crate::protocol::{Command, Event, Protocol, WriteBatch};

pub(crate) type AggregatorConsumer = StreamConsumer<AggregatorContext>;

/// Pauses and seeks on whichever handle the caller has: the loop's stream
/// consumer, or the base consumer a rebalance callback is given.
pub(crate) trait KafkaHandle {
    fn pause_list(&self, list: &TopicPartitionList) -> KafkaResult<()>;
    fn resume_list(&self, list: &TopicPartitionList) -> KafkaResult<()>;
    fn seek_to(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()>;
}

impl<T: Consumer<AggregatorContext>> KafkaHandle for T {
    fn pause_list(&self, list: &TopicPartitionList) -> KafkaResult<()> {
        self.pause(list)
    }
    fn resume_list(&self, list: &TopicPartitionList) -> KafkaResult<()> {
        self.resume(list)
    }
    fn seek_to(&self, topic: &str, partition: i32, offset: i64) -> KafkaResult<()> {
        let sought = self.seek(
            topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        );
        if sought.is_ok() {
            return Ok(());
        }
        // After an out-of-range error (`auto.offset.reset=error`) the partition is not
        // fetching, and librdkafka only seeks fetching partitions: assign it again at
        // the offset instead.
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.incremental_unassign(&list)?;
        self.incremental_assign(&list)
    }
}

pub(crate) struct Shell {
    pub topic: String,
    pub group: String,
    pub store: Arc<dyn WindowStore>,
    pub metrics: AggregatorMetrics,
    pub health: Health,
    pub revoke_timeout: Duration,
    protocol: Mutex<Protocol>,
    /// The loop's consumer, for commands executed by tasks (set once it exists).
    consumer: OnceLock<Weak<AggregatorConsumer>>,
    writes: mpsc::Sender<WriteBatch>,
    pub dead_letters: DeadLetters,
    /// Signalled whenever a write or a letter settles (revokes and the loop wait on it).
    pub progress: Notify,
    stopped: AtomicBool,
    pub runtime: tokio::runtime::Handle,
    /// The commit thread's queue (see [`Shell::start_committer`]).
    committer: OnceLock<std::sync::mpsc::SyncSender<CommitJob>>,
}

impl Shell {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: String,
        group: String,
        store: Arc<dyn WindowStore>,
        metrics: AggregatorMetrics,
        health: Health,
        revoke_timeout: Duration,
        protocol: Protocol,
        writes: mpsc::Sender<WriteBatch>,
        dead_letters: DeadLetters,
    ) -> Self {
        Shell {
            topic,
            group,
            store,
            metrics,
            health,
            revoke_timeout,
            protocol: Mutex::new(protocol),
            consumer: OnceLock::new(),
            writes,
            dead_letters,
            progress: Notify::new(),
            stopped: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
            committer: OnceLock::new(),
        }
    }

    /// Starts the commit thread (see [`super::committer`]).
    pub fn start_committer(self: &Arc<Self>) -> std::io::Result<()> {
        let (queue, jobs) = std::sync::mpsc::sync_channel::<CommitJob>(COMMIT_QUEUE);
        let shell = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tally-committer".into())
            .spawn(move || committer::serve(jobs, move || shell.upgrade()))?;
        let _ = self.committer.set(queue);
        Ok(())
    }

    fn count_commit(&self, offsets: &[(i32, Checkpoint)], ok: bool) {
        let label = if ok { "ok" } else { "error" };
        self.metrics.commits.with_label_values(&[label]).inc();
        if ok {
            for (partition, checkpoint) in offsets {
                self.health.committed(*partition, checkpoint.next_offset);
            }
        }
    }

    pub fn set_consumer(&self, consumer: &Arc<AggregatorConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    pub fn consumer(&self) -> Option<Arc<AggregatorConsumer>> {
        self.consumer.get().and_then(Weak::upgrade)
    }

    /// The protocol, for one event or a batch of them. A poisoned lock means a panic
    /// elsewhere; the protocol's state is still whole between events, so go on.
    pub fn protocol(&self) -> MutexGuard<'_, Protocol> {
        self.protocol
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands one event to the protocol and returns its commands (lock released).
    pub fn handle(&self, event: Event<'_>) -> Vec<Command> {
        self.protocol().handle(event)
    }

    /// Handles an event and executes its commands through the loop's consumer.
    pub fn handle_and_execute(self: &Arc<Self>, event: Event<'_>) {
        let commands = self.handle(event);
        match self.consumer() {
            Some(consumer) => self.execute(commands, consumer.as_ref()),
            None => self.execute(commands, &NoKafka),
        }
    }

    pub fn scope(&self, partition: i32) -> CheckpointScope {
        CheckpointScope {
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition,
        }
    }

    /// True once the protocol said stop (or the shell had to).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Executes commands. `Assign` is only meaningful inside the assignment callback,
    /// which handles it itself; synchronous commits (revokes, shutdown) are bounded by
    /// the revoke timeout.
    pub fn execute(self: &Arc<Self>, commands: Vec<Command>, kafka: &dyn KafkaHandle) {
        for command in commands {
            match command {
                Command::Assign { .. } => {}
                Command::WriteRows(batch) => self.queue_write(batch),
                Command::SendLetter { id, letter } => self.dead_letters.send(self, id, letter),
                Command::SendMarker {
                    partition,
                    timestamp_ms,
                } => match self.dead_letters.queue_marker(partition, timestamp_ms) {
                    Ok(()) => self.metrics.idle_markers.inc(),
                    Err(err) => {
                        warn!(%err, partition, "idle marker not sent; the next tick asks again")
                    }
                },
                Command::Commit { offsets, sync } => {
                    if sync {
                        self.commit_sync(&offsets, self.revoke_timeout);
                    } else {
                        self.commit_async(&offsets, kafka);
                    }
                }
                Command::Pause { partitions } => {
                    if let Err(err) = kafka.pause_list(&self.list(&partitions)) {
                        warn!(%err, ?partitions, "could not pause partitions");
                    }
                }
                Command::Resume { partitions } => {
                    if let Err(err) = kafka.resume_list(&self.list(&partitions)) {
                        warn!(%err, ?partitions, "could not resume partitions");
                    }
                }
                Command::Seek { partition, offset } => {
                    if let Err(err) = kafka.seek_to(&self.topic, partition, offset) {
                        // Without the seek the partition reads on past the gap: stop.
                        self.fail(format!(
                            "partition {partition}: could not seek to {offset}: {err}"
                        ));
                    }
                }
                Command::HandOverUncommitted { partition, why } => {
                    info!(
                        partition,
                        ?why,
                        "revoked partition handed over uncommitted; its next owner replays"
                    );
                    self.metrics.handovers.inc();
                }
                Command::OffsetsLost {
                    partition,
                    from,
                    to,
                    accepted,
                } => {
                    if accepted {
                        warn!(partition, from, to, "offsets vanished before they were read (retention?); continuing from the log start as accepted by --accept-data-loss; windows they touch stay as stored");
                    } else {
                        error!(partition, from, to, "offsets vanished before they were read (retention?); the partition halts here, uncommitted past the gap; restart with --accept-data-loss to go on without them");
                    }
                    self.health.set_halted(partition, !accepted);
                }
                Command::Stop { error } => self.fail(error.to_string()),
            }
        }
    }

    fn queue_write(&self, batch: WriteBatch) {
        // The protocol keeps at most a few writes outstanding (one flush, revokes,
        // reset claims), far below the channel's capacity.
        if let Err(err) = self.writes.try_send(batch) {
            self.fail(format!("the writer cannot take another write: {err}"));
        }
    }

    fn list(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for partition in partitions {
            list.add_partition(&self.topic, *partition);
        }
        list
    }

    /// The offsets to commit, each with its checkpoint as metadata.
    fn commit_list(&self, offsets: &[(i32, Checkpoint)]) -> KafkaResult<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (partition, checkpoint) in offsets {
            list.add_partition_offset(
                &self.topic,
                *partition,
                Offset::Offset(checkpoint.next_offset),
            )?;
            if let Some(mut element) = list.find_partition(&self.topic, *partition) {
                element.set_metadata(checkpoint.to_metadata());
            }
        }
        Ok(list)
    }

    /// Queued for the commit thread, which hands the result to the protocol.
    fn commit_async(self: &Arc<Self>, offsets: &[(i32, Checkpoint)], kafka: &dyn KafkaHandle) {
        if !self.queue_job(CommitJob::Ordinary(offsets.to_vec())) {
            self.metrics.commits.with_label_values(&["error"]).inc();
            warn!("offset commit could not be queued; retried at the next flush");
            let offsets = offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
            let commands = self.handle(Event::CommitResult { offsets, ok: false });
            self.execute(commands, kafka);
        }
    }

    /// A commit on the commit thread, after every commit queued before it, waited for
    /// at most `patience` (if it runs later, it is still a correct commit, and no
    /// ordinary commit of these partitions can follow it: they are no longer owned).
    /// Never called on the commit thread itself (it would wait for its own job until
    /// `patience` ran out): only revokes and the shutdown commit synchronously.
    pub fn commit_sync(
        self: &Arc<Self>,
        offsets: &[(i32, Checkpoint)],
        patience: Duration,
    ) -> bool {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job = CommitJob::Final {
            offsets: offsets.to_vec(),
            done,
        };
        let ok = if !self.queue_job(job) {
            warn!("commit could not be queued; the next owner replays");
            false
        } else {
            match result.recv_timeout(patience) {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    warn!(%err, "commit failed; the next owner replays");
                    false
                }
                Err(_) => {
                    warn!(
                        ?patience,
                        "commit did not finish in time; the next owner replays"
                    );
                    false
                }
            }
        };
        self.count_commit(offsets, ok);
        let offsets = offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
        let _ = self.handle(Event::CommitResult { offsets, ok });
        ok
    }

    /// Waits (at most `patience`) until every commit queued so far is done: a revoke
    /// that hands partitions over without a commit of its own calls this, so that an
    /// ordinary commit under way cannot land after the next owner's.
    pub fn wait_for_commits(&self, patience: Duration) -> bool {
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        self.queue_job(CommitJob::Barrier { done }) && finished.recv_timeout(patience).is_ok()
    }

    /// Queues a job for the commit thread without waiting: the queue is only full
    /// while the thread is stuck in a commit, and revokes and the shutdown must stay
    /// bounded (the queued ordinary commits skip partitions revoked meanwhile).
    fn queue_job(&self, job: CommitJob) -> bool {
        self.committer
            .get()
            .is_some_and(|queue| queue.try_send(job).is_ok())
    }

    /// Something the aggregator cannot go on under: stop without committing (a
    /// restart replays from the last commit).
    pub fn fail(&self, reason: String) {
        if !self.stopped.swap(true, Ordering::AcqRel) {
            error!(%reason, "aggregator must stop");
            self.health.set_fatal(reason);
        }
        self.progress.notify_waiters();
    }
}

impl CommitTarget for Arc<Shell> {
    fn owned(&self) -> Vec<i32> {
        self.protocol().owned()
    }

    fn commit(&self, offsets: &[(i32, Checkpoint)]) -> KafkaResult<()> {
        let consumer = self
            .consumer()
            .ok_or_else(|| KafkaError::ClientCreation("the consumer is gone".to_string()))?;
        consumer.commit(&self.commit_list(offsets)?, CommitMode::Sync)
    }

    fn ordinary_done(&self, offsets: &[(i32, Checkpoint)], result: KafkaResult<()>) {
        let ok = match result {
            Ok(()) => true,
            Err(err) => {
                warn!(%err, "offset commit failed; retried at the next flush");
                false
            }
        };
        self.count_commit(offsets, ok);
        let results = offsets.iter().map(|(p, c)| (*p, c.next_offset)).collect();
        let commands = self.handle(Event::CommitResult {
            offsets: results,
            ok,
        });
        match self.consumer() {
            Some(consumer) => self.execute(commands, consumer.as_ref()),
            None => self.execute(commands, &NoKafka),
        }
    }
}

/// Before the consumer exists nothing can be committed, paused or sought.
struct NoKafka;

impl KafkaHandle for NoKafka {
    fn pause_list(&self, _: &TopicPartitionList) -> KafkaResult<()> {
        Ok(())
    }
    fn resume_list(&self, _: &TopicPartitionList) -> KafkaResult<()> {
        Ok(())
    }
    fn seek_to(&self, _: &str, _: i32, _: i64) -> KafkaResult<()> {
        Err(rdkafka::error::KafkaError::ClientCreation(
            "no consumer yet".into(),
        ))
    }
}
