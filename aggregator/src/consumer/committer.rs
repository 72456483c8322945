//! The commit thread: every offset commit of this process runs here, one at a time
//! and in the order it was queued.
//!
//! librdkafka reports no result for a manual asynchronous commit when its event API
//! is used (as rust-rdkafka's consumers do), and the protocol must learn every
//! result, so commits are synchronous, on a thread of their own. Running revokes'
//! and the shutdown's commits on the same thread, behind the ordinary ones, is what
//! keeps the group from moving back: an ordinary commit already under way when a
//! revoke settles finishes before the revoke's newer commit is sent, and the ordinary
//! commits queued behind it skip the partitions that are no longer owned.

use std::sync::mpsc::{Receiver, SyncSender};

use rdkafka::error::KafkaResult;
use tally_schemas::Checkpoint;

/// Commits waiting for the commit thread. The protocol keeps at most one ordinary
/// commit in flight, and revokes and the shutdown wait for theirs, so the queue is
/// only full while the thread is stuck in a commit.
pub(crate) const COMMIT_QUEUE: usize = 4;

/// Work for the commit thread.
pub(crate) enum CommitJob {
    /// The protocol's ordinary commit: only for partitions still owned when it runs;
    /// its result goes back to the protocol.
    Ordinary(Vec<(i32, Checkpoint)>),
    /// A commit that a revoke or the shutdown decided; the caller waits for it.
    Final {
        offsets: Vec<(i32, Checkpoint)>,
        done: SyncSender<KafkaResult<()>>,
    },
    /// Nothing to commit: answers once every job queued before it is done.
    Barrier { done: SyncSender<()> },
}

/// What the commit thread commits through (the shell; a recorder in tests).
pub(crate) trait CommitTarget {
    /// The partitions this process owns now.
    fn owned(&self) -> Vec<i32>;
    /// One synchronous commit.
    fn commit(&self, offsets: &[(i32, Checkpoint)]) -> KafkaResult<()>;
    /// The result of an ordinary commit, for the protocol.
    fn ordinary_done(&self, offsets: &[(i32, Checkpoint)], result: KafkaResult<()>);
}

/// Runs jobs until the queue closes or `target` is gone.
pub(crate) fn serve<T: CommitTarget>(jobs: Receiver<CommitJob>, target: impl Fn() -> Option<T>) {
    while let Ok(job) = jobs.recv() {
        let Some(target) = target() else {
            return;
        };
        match job {
            CommitJob::Ordinary(offsets) => {
                let owned = target.owned();
                let offsets: Vec<(i32, Checkpoint)> = offsets
                    .into_iter()
                    .filter(|(partition, _)| owned.contains(partition))
                    .collect();
                if !offsets.is_empty() {
                    let result = target.commit(&offsets);
                    target.ordinary_done(&offsets, result);
                }
            }
            CommitJob::Final { offsets, done } => {
                let result = target.commit(&offsets);
                // The caller may have stopped waiting (its patience ran out).
                let _ = done.try_send(result);
            }
            CommitJob::Barrier { done } => {
                let _ = done.try_send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::mpsc::{sync_channel, Receiver};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tally_schemas::Checkpoint;

    use super::*;

    /// Records what was committed; the first commit waits until the test lets it go,
    /// so the test can queue work while a commit is under way.
    struct Recorder {
        owned: Mutex<Vec<i32>>,
        committed: Mutex<Vec<(i32, i64)>>,
        reported: Mutex<Vec<(i32, i64)>>,
        hold_first: Mutex<Option<Receiver<()>>>,
        started: SyncSender<()>,
    }

    impl CommitTarget for Arc<Recorder> {
        fn owned(&self) -> Vec<i32> {
            self.owned.lock().unwrap().clone()
        }
        fn commit(&self, offsets: &[(i32, Checkpoint)]) -> KafkaResult<()> {
            let _ = self.started.try_send(());
            if let Some(release) = self.hold_first.lock().unwrap().take() {
                release.recv().unwrap();
            }
            let mut committed = self.committed.lock().unwrap();
            committed.extend(offsets.iter().map(|(p, c)| (*p, c.next_offset)));
            Ok(())
        }
        fn ordinary_done(&self, offsets: &[(i32, Checkpoint)], result: KafkaResult<()>) {
            assert!(result.is_ok());
            let mut reported = self.reported.lock().unwrap();
            reported.extend(offsets.iter().map(|(p, c)| (*p, c.next_offset)));
        }
    }

    fn at(partition: i32, next_offset: i64) -> (i32, Checkpoint) {
        (partition, Checkpoint::fresh(next_offset))
    }

    fn start(
        owned: Vec<i32>,
    ) -> (
        Arc<Recorder>,
        SyncSender<CommitJob>,
        SyncSender<()>,
        Receiver<()>,
    ) {
        let (release, hold) = sync_channel(1);
        let (started, on_start) = sync_channel(16);
        let recorder = Arc::new(Recorder {
            owned: Mutex::new(owned),
            committed: Mutex::new(Vec::new()),
            reported: Mutex::new(Vec::new()),
            hold_first: Mutex::new(Some(hold)),
            started,
        });
        let (queue, jobs) = sync_channel(COMMIT_QUEUE);
        let target = Arc::clone(&recorder);
        std::thread::spawn(move || serve(jobs, move || Some(Arc::clone(&target))));
        (recorder, queue, release, on_start)
    }

    #[test]
    fn a_revoke_commit_lands_after_the_ordinary_commit_under_way_and_later_ones_skip_it() {
        let (recorder, queue, release, on_start) = start(vec![0, 1]);
        // An ordinary commit of partition 0 at 10 is under way...
        queue
            .send(CommitJob::Ordinary(vec![at(0, 10), at(1, 5)]))
            .unwrap();
        on_start.recv_timeout(Duration::from_secs(5)).unwrap();
        // ...when partition 0 is revoked: the protocol no longer owns it, queues one
        // more ordinary commit (older than the revoke's) and the revoke's own at 20.
        recorder.owned.lock().unwrap().retain(|p| *p != 0);
        queue
            .send(CommitJob::Ordinary(vec![at(0, 15), at(1, 6)]))
            .unwrap();
        let (done, result) = sync_channel(1);
        queue
            .send(CommitJob::Final {
                offsets: vec![at(0, 20)],
                done,
            })
            .unwrap();
        queue.send(CommitJob::Ordinary(vec![at(0, 17)])).unwrap();
        // Nothing else runs while the first commit is under way.
        assert!(result.recv_timeout(Duration::from_millis(100)).is_err());
        release.send(()).unwrap();
        result
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap();
        let (done, barrier) = sync_channel(1);
        queue.send(CommitJob::Barrier { done }).unwrap();
        barrier.recv_timeout(Duration::from_secs(5)).unwrap();

        let committed = recorder.committed.lock().unwrap().clone();
        assert_eq!(committed, vec![(0, 10), (1, 5), (1, 6), (0, 20)]);
        let partition_0: Vec<i64> = committed
            .iter()
            .filter(|(p, _)| *p == 0)
            .map(|(_, o)| *o)
            .collect();
        assert!(
            partition_0.windows(2).all(|w| w[0] < w[1]),
            "{partition_0:?}"
        );
        assert_eq!(
            recorder.reported.lock().unwrap().clone(),
            vec![(0, 10), (1, 5), (1, 6)]
        );
    }

    #[test]
    fn a_barrier_answers_only_after_the_commit_under_way() {
        let (_recorder, queue, release, on_start) = start(vec![3]);
        queue.send(CommitJob::Ordinary(vec![at(3, 1)])).unwrap();
        on_start.recv_timeout(Duration::from_secs(5)).unwrap();
        let (done, barrier) = sync_channel(1);
        queue.send(CommitJob::Barrier { done }).unwrap();
        assert!(barrier.recv_timeout(Duration::from_millis(100)).is_err());
        release.send(()).unwrap();
        barrier.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
