//! Every aggregator metric, defined in one place. Labels are bounded: outcomes and
//! reasons come from fixed enums, partitions from the topic's partition count.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct AggregatorMetrics {
    /// Records by outcome: counted, already_final, poison, late, future_timestamp,
    /// sum_overflow, invalid_timestamp.
    pub records: IntCounterVec,
    /// Open window groups (distinct window starts) over owned partitions.
    pub open_windows: IntGauge,
    /// Open key-windows held in memory over owned partitions.
    pub keys_in_memory: IntGauge,
    pub flush_duration: Histogram,
    /// Rows written by kind: provisional, final.
    pub rows_written: IntCounterVec,
    /// Failed store operations (writes, probes, checkpoints).
    pub store_errors: IntCounter,
    /// 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGauge,
    /// Dead letters acknowledged by Kafka, by reason.
    pub dlq_writes: IntCounterVec,
    /// Kafka commits by result: ok, error.
    pub commits: IntCounterVec,
    /// Records between the read position and the partition's high watermark.
    pub consumer_lag: IntGaugeVec,
    /// Records between the last committed offset and the partition's high watermark:
    /// what a restart would read again. Grows while commits are stuck.
    pub commit_lag: IntGaugeVec,
    /// Records dead-lettered as `late`, per partition (a direct producer whose
    /// buffered records arrive after newer ones shows up here).
    pub late_by_partition: IntCounterVec,
    /// Wall clock minus the partition watermark, seconds.
    pub watermark_lag: HistogramVec,
    /// Age of the oldest counted increment not yet flushed, seconds.
    pub freshness: prometheus::Gauge,
    /// Owned partitions.
    pub assigned_partitions: IntGauge,
    /// Revoked partitions handed over without a commit (the next owner replays).
    pub handovers: IntCounter,
    /// Dead-letter deliveries that failed, by kind: `transient` (retried) or why the
    /// letter can never be delivered (`too_large`, `topic_missing`, … : the aggregator
    /// stops).
    pub dlq_failures: IntCounterVec,
    /// Offsets that vanished before they were read (retention), per partition.
    pub lost_offsets: IntCounterVec,
    /// Idle markers appended to idle partitions (so their windows close).
    pub idle_markers: IntCounter,
    /// 1 while `/readyz` would answer 200, 0 otherwise (the reason is in `/readyz`).
    pub ready: IntGauge,
    /// `records` resolved per outcome once, so the per-record path does no label lookup.
    pub outcomes: OutcomeCounters,
}

/// One counter handle per `outcome` label value of `tally_aggregator_records_total`.
#[derive(Clone)]
pub struct OutcomeCounters {
    pub counted: IntCounter,
    pub already_final: IntCounter,
    pub poison: IntCounter,
    pub late: IntCounter,
    pub future_timestamp: IntCounter,
    pub sum_overflow: IntCounter,
    pub invalid_timestamp: IntCounter,
}

impl OutcomeCounters {
    fn new(records: &IntCounterVec) -> Self {
        OutcomeCounters {
            counted: records.with_label_values(&["counted"]),
            already_final: records.with_label_values(&["already_final"]),
            poison: records.with_label_values(&["poison"]),
            late: records.with_label_values(&["late"]),
            future_timestamp: records.with_label_values(&["future_timestamp"]),
            sum_overflow: records.with_label_values(&["sum_overflow"]),
            invalid_timestamp: records.with_label_values(&["invalid_timestamp"]),
        }
    }

    /// The counter for a record the engine rejected (poison is counted separately).
    pub fn rejected(&self, reason: tally_schemas::RejectReason) -> &IntCounter {
        use tally_schemas::RejectReason as R;
        match reason {
            R::Late => &self.late,
            R::FutureTimestamp => &self.future_timestamp,
            R::SumOverflow => &self.sum_overflow,
            R::InvalidTimestamp => &self.invalid_timestamp,
            _ => &self.poison,
        }
    }
}

impl AggregatorMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let records = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_records_total",
                "Records consumed, by outcome",
            ),
            &["outcome"],
        )?;
        let open_windows = IntGauge::new(
            "tally_aggregator_open_windows",
            "Open windows (distinct window starts per partition)",
        )?;
        let keys_in_memory = IntGauge::new(
            "tally_aggregator_keys_in_memory",
            "Open key-windows held in memory",
        )?;
        let flush_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tally_aggregator_flush_duration_seconds",
                "Time to write one flush (rows and checkpoints) to the store",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let rows_written = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_rows_written_total",
                "Window rows written, by kind",
            ),
            &["kind"],
        )?;
        let store_errors = IntCounter::new(
            "tally_aggregator_store_errors_total",
            "Failed store operations",
        )?;
        let circuit_state = IntGauge::new(
            "tally_aggregator_circuit_state",
            "Store circuit breaker: 0 closed, 1 open, 2 half-open",
        )?;
        let dlq_writes = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_dlq_writes_total",
                "Dead letters acknowledged, by reason",
            ),
            &["reason"],
        )?;
        let commits = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_commits_total",
                "Kafka offset commits, by result",
            ),
            &["result"],
        )?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "tally_aggregator_consumer_lag",
                "Records between the read position and the high watermark, per partition",
            ),
            &["partition"],
        )?;
        let commit_lag = IntGaugeVec::new(
            Opts::new(
                "tally_aggregator_commit_lag",
                "Records between the committed offset and the high watermark, per partition",
            ),
            &["partition"],
        )?;
        let late_by_partition = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_late_records_total",
                "Records dead-lettered as late, per partition",
            ),
            &["partition"],
        )?;
        let watermark_lag = HistogramVec::new(
            HistogramOpts::new(
                "tally_aggregator_watermark_lag_seconds",
                "Wall clock minus the partition watermark at each flush",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            &["partition"],
        )?;
        let freshness = prometheus::Gauge::new(
            "tally_aggregator_freshness_seconds",
            "Age of the oldest counted increment not yet durable in the store (not yet flushed, or in the write under way)",
        )?;
        let assigned_partitions = IntGauge::new(
            "tally_aggregator_assigned_partitions",
            "Partitions owned by this instance",
        )?;
        let handovers = IntCounter::new(
            "tally_aggregator_handovers_total",
            "Revoked partitions handed over uncommitted",
        )?;
        let dlq_failures = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_dlq_failures_total",
                "Dead-letter deliveries that failed, by kind (transient, or why never deliverable)",
            ),
            &["kind"],
        )?;
        let lost_offsets = IntCounterVec::new(
            Opts::new(
                "tally_aggregator_lost_offsets_total",
                "Offsets that vanished before they were read, per partition",
            ),
            &["partition"],
        )?;
        let idle_markers = IntCounter::new(
            "tally_aggregator_idle_markers_total",
            "Idle markers appended to idle partitions so their windows close",
        )?;
        registry.register(Box::new(idle_markers.clone()))?;
        let ready = IntGauge::new(
            "tally_aggregator_ready",
            "1 while /readyz answers 200 (no open circuit, fatal error, halted or stalled partition)",
        )?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(handovers.clone()))?;
        registry.register(Box::new(dlq_failures.clone()))?;
        registry.register(Box::new(lost_offsets.clone()))?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(open_windows.clone()))?;
        registry.register(Box::new(keys_in_memory.clone()))?;
        registry.register(Box::new(flush_duration.clone()))?;
        registry.register(Box::new(rows_written.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(circuit_state.clone()))?;
        registry.register(Box::new(dlq_writes.clone()))?;
        registry.register(Box::new(commits.clone()))?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(commit_lag.clone()))?;
        registry.register(Box::new(late_by_partition.clone()))?;
        registry.register(Box::new(watermark_lag.clone()))?;
        registry.register(Box::new(freshness.clone()))?;
        registry.register(Box::new(assigned_partitions.clone()))?;
        // Pre-create the fixed label values so dashboards see zeros, not gaps (the
        // outcome series are created by `OutcomeCounters::new`).
        for kind in ["provisional", "final"] {
            rows_written.with_label_values(&[kind]);
        }
        for reason in tally_schemas::RejectReason::ALL {
            dlq_writes.with_label_values(&[reason.code()]);
        }
        for result in ["ok", "error"] {
            commits.with_label_values(&[result]);
        }
        dlq_failures.with_label_values(&["transient"]);
        for kind in tally_sink::dlq::Undeliverable::ALL {
            dlq_failures.with_label_values(&[kind.code()]);
        }
        let outcomes = OutcomeCounters::new(&records);
        Ok(AggregatorMetrics {
            outcomes,
            records,
            open_windows,
            keys_in_memory,
            flush_duration,
            rows_written,
            store_errors,
            circuit_state,
            dlq_writes,
            commits,
            consumer_lag,
            commit_lag,
            late_by_partition,
            watermark_lag,
            freshness,
            assigned_partitions,
            handovers,
            dlq_failures,
            lost_offsets,
            idle_markers,
            ready,
        })
    }

    /// Creates every partition-labelled series of `partition` (lag, commit lag, late
    /// letters, watermark lag), so a dashboard sees the partition from its assignment
    /// on, at 0, instead of from its first record. The consumer calls it on assign.
    pub fn track_partition(&self, partition: i32) {
        let label = partition.to_string();
        let labels = [label.as_str()];
        self.consumer_lag.with_label_values(&labels);
        self.commit_lag.with_label_values(&labels);
        self.late_by_partition.with_label_values(&labels);
        self.watermark_lag.with_label_values(&labels);
    }

    /// Drops the series of a partition this instance no longer owns (on revoke), so
    /// its last lag is not reported forever; the new owner reports it from then on.
    /// The late-letter counter is kept: it is a total, and a counter that vanished
    /// and came back would read as a reset.
    pub fn forget_partition(&self, partition: i32) {
        let label = partition.to_string();
        let labels = [label.as_str()];
        // An error only means the series did not exist.
        let _ = self.consumer_lag.remove_label_values(&labels);
        let _ = self.commit_lag.remove_label_values(&labels);
        let _ = self.watermark_lag.remove_label_values(&labels);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// `(family, label pairs)` of every exported series.
    fn series(registry: &Registry) -> Vec<(String, Vec<(String, String)>)> {
        registry
            .gather()
            .iter()
            .flat_map(|family| {
                family.get_metric().iter().map(|metric| {
                    let labels = metric
                        .get_label()
                        .iter()
                        .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
                        .collect();
                    (family.name().to_owned(), labels)
                })
            })
            .collect()
    }

    fn has(series: &[(String, Vec<(String, String)>)], family: &str, label: (&str, &str)) -> bool {
        series.iter().any(|(name, labels)| {
            name == family
                && labels
                    .iter()
                    .any(|(key, value)| key == label.0 && value == label.1)
        })
    }

    #[test]
    fn bounded_labels_are_exported_at_zero_from_startup() {
        let registry = Registry::new();
        let _metrics = AggregatorMetrics::new(&registry).unwrap();
        let series = series(&registry);
        for outcome in [
            "counted",
            "already_final",
            "poison",
            "late",
            "future_timestamp",
            "sum_overflow",
            "invalid_timestamp",
        ] {
            assert!(
                has(
                    &series,
                    "tally_aggregator_records_total",
                    ("outcome", outcome)
                ),
                "{outcome}"
            );
        }
        for reason in tally_schemas::RejectReason::ALL {
            assert!(has(
                &series,
                "tally_aggregator_dlq_writes_total",
                ("reason", reason.code())
            ));
        }
        for kind in ["provisional", "final"] {
            assert!(has(
                &series,
                "tally_aggregator_rows_written_total",
                ("kind", kind)
            ));
        }
        for result in ["ok", "error"] {
            assert!(has(
                &series,
                "tally_aggregator_commits_total",
                ("result", result)
            ));
        }
        // Every value is 0 before anything happened.
        for family in registry.gather() {
            for metric in family.get_metric() {
                assert_eq!(metric.get_counter().get_value(), 0.0, "{}", family.name());
            }
        }
    }

    #[test]
    fn partition_series_follow_assignment() {
        let registry = Registry::new();
        let metrics = AggregatorMetrics::new(&registry).unwrap();
        let families = [
            "tally_aggregator_consumer_lag",
            "tally_aggregator_commit_lag",
            "tally_aggregator_late_records_total",
            "tally_aggregator_watermark_lag_seconds",
        ];
        assert!(families
            .iter()
            .all(|family| !has(&series(&registry), family, ("partition", "3"))));
        metrics.track_partition(3);
        let assigned = series(&registry);
        for family in families {
            assert!(has(&assigned, family, ("partition", "3")), "{family}");
        }
        metrics.late_by_partition.with_label_values(&["3"]).inc();
        metrics.forget_partition(3);
        let revoked = series(&registry);
        for family in &families[..2] {
            assert!(!has(&revoked, family, ("partition", "3")), "{family}");
        }
        assert!(!has(
            &revoked,
            "tally_aggregator_watermark_lag_seconds",
            ("partition", "3")
        ));
        // The late total survives the revoke (no false counter reset).
        assert_eq!(metrics.late_by_partition.with_label_values(&["3"]).get(), 1);
        // Forgetting twice, or an unknown partition, is harmless.
        metrics.forget_partition(3);
        metrics.forget_partition(99);
    }
}
