//! Metrics from the protocol's counters and read-only view, exported once per tick
//! (the per-record path touches no metric).

use super::shell::Shell;
use crate::protocol::Stats;

#[derive(Default)]
pub(crate) struct Gauges {
    exported: Stats,
}

impl Gauges {
    pub fn update(&mut self, shell: &Shell, now_ms: i64) {
        let (stats, views, oldest_not_durable) = {
            let protocol = shell.protocol();
            (
                protocol.stats().clone(),
                protocol.views().collect::<Vec<_>>(),
                protocol.oldest_not_durable_ms(),
            )
        };
        let metrics = &shell.metrics;
        metrics
            .ready
            .set(i64::from(shell.health.readiness().is_ok()));
        let last = &self.exported;
        let outcomes = &metrics.outcomes;
        outcomes.counted.inc_by(stats.counted - last.counted);
        outcomes
            .already_final
            .inc_by(stats.already_final - last.already_final);
        outcomes.poison.inc_by(stats.poison - last.poison);
        outcomes.late.inc_by(stats.late - last.late);
        outcomes
            .future_timestamp
            .inc_by(stats.future_timestamp - last.future_timestamp);
        outcomes
            .sum_overflow
            .inc_by(stats.sum_overflow - last.sum_overflow);
        outcomes
            .invalid_timestamp
            .inc_by(stats.invalid_timestamp - last.invalid_timestamp);
        for (reason, count) in &stats.letters_acked {
            let before = last.letters_acked.get(reason).copied().unwrap_or(0);
            metrics
                .dlq_writes
                .with_label_values(&[reason])
                .inc_by(count - before);
        }
        for (partition, count) in &stats.late_by_partition {
            let before = last.late_by_partition.get(partition).copied().unwrap_or(0);
            metrics
                .late_by_partition
                .with_label_values(&[&partition.to_string()])
                .inc_by(count - before);
        }
        for (partition, count) in &stats.lost_offsets {
            let before = last.lost_offsets.get(partition).copied().unwrap_or(0);
            metrics
                .lost_offsets
                .with_label_values(&[&partition.to_string()])
                .inc_by(count - before);
        }
        self.exported = stats;

        let mut groups = 0usize;
        let mut cells = 0usize;
        for view in &views {
            groups += view.open_windows;
            cells += view.open_key_windows;
            if let Some(watermark) = view.watermark_ms {
                metrics
                    .watermark_lag
                    .with_label_values(&[&view.partition.to_string()])
                    .observe((now_ms - watermark).max(0) as f64 / 1000.0);
            }
        }
        for (partition, committed, high) in shell.health.offsets() {
            let Some(high) = high else {
                continue;
            };
            let label = partition.to_string();
            if let Some(view) = views.iter().find(|v| v.partition == partition) {
                metrics
                    .consumer_lag
                    .with_label_values(&[&label])
                    .set((high - view.next_offset).max(0));
            }
            metrics
                .commit_lag
                .with_label_values(&[&label])
                .set((high - committed.unwrap_or(0)).max(0));
        }
        metrics
            .open_windows
            .set(i64::try_from(groups).unwrap_or(i64::MAX));
        metrics
            .keys_in_memory
            .set(i64::try_from(cells).unwrap_or(i64::MAX));
        metrics
            .freshness
            .set(oldest_not_durable.map_or(0.0, |since| (now_ms - since).max(0) as f64 / 1000.0));
        metrics
            .assigned_partitions
            .set(i64::try_from(views.len()).unwrap_or(i64::MAX));
    }
}
