//! Every metric of the edge, registered into the registry the caller passes in.
//!
//! Labels are bounded: `route` from [`Route::ALL`], `status` an HTTP status code,
//! `reason` an [`IngestError::code`](crate::IngestError::code), `kind` a fixed
//! produce-error kind. No keys, tokens or request ids ever become labels.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::error::IngestError;
use crate::handlers::Route;

/// Latency buckets in seconds: sub-millisecond answers up to the delivery timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why a produce attempt failed; the `kind` label of `tally_ingest_produce_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProduceErrorKind {
    /// The producer's local queue was full when enqueuing.
    QueueFull,
    /// The record could not be enqueued for another reason (unknown topic, fatal producer).
    EnqueueFailed,
    /// The broker did not acknowledge within the delivery timeout.
    TimedOut,
    /// librdkafka reported a delivery failure.
    DeliveryFailed,
    /// The delivery report never came (the producer was dropped).
    Canceled,
}

impl ProduceErrorKind {
    const ALL: [ProduceErrorKind; 5] = [
        ProduceErrorKind::QueueFull,
        ProduceErrorKind::EnqueueFailed,
        ProduceErrorKind::TimedOut,
        ProduceErrorKind::DeliveryFailed,
        ProduceErrorKind::Canceled,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            ProduceErrorKind::QueueFull => "queue_full",
            ProduceErrorKind::EnqueueFailed => "enqueue_failed",
            ProduceErrorKind::TimedOut => "timed_out",
            ProduceErrorKind::DeliveryFailed => "delivery_failed",
            ProduceErrorKind::Canceled => "canceled",
        }
    }
}

/// Handles to the ingest metrics. The hot path (latency per route, the `202` counter)
/// uses handles resolved once here, so a request does no label lookup for them.
#[derive(Clone)]
pub(crate) struct IngestMetrics {
    requests: IntCounterVec,
    rejections: IntCounterVec,
    produce_errors: IntCounterVec,
    records_accepted: IntCounter,
    in_flight_requests: IntGauge,
    open_connections: IntGauge,
    latency_by_route: [Histogram; Route::ALL.len()],
    accepted_by_route: [IntCounter; Route::ALL.len()],
}

impl IngestMetrics {
    /// Creates the metrics and registers them; fails if the registry already holds them.
    pub(crate) fn register(registry: &Registry) -> Result<Self, IngestError> {
        let requests = IntCounterVec::new(
            Opts::new(
                "tally_ingest_requests_total",
                "HTTP requests answered by the ingest edge, by route and status code.",
            ),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tally_ingest_request_duration_seconds",
                "Time from request headers to response, by route (a 202 includes the broker acknowledgement).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "tally_ingest_rejections_total",
                "Requests refused because of the client's input, by error code.",
            ),
            &["reason"],
        )?;
        let produce_errors = IntCounterVec::new(
            Opts::new(
                "tally_ingest_produce_errors_total",
                "Records whose produce failed (no 202 was sent for them), by kind.",
            ),
            &["kind"],
        )?;
        let records_accepted = IntCounter::new(
            "tally_ingest_records_accepted_total",
            "Increments acknowledged by the broker and answered with 202.",
        )?;
        let in_flight_requests = IntGauge::new(
            "tally_ingest_in_flight_requests",
            "Requests being handled right now.",
        )?;
        let open_connections = IntGauge::new(
            "tally_ingest_open_connections",
            "Client connections open right now.",
        )?;

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(produce_errors.clone()))?;
        registry.register(Box::new(records_accepted.clone()))?;
        registry.register(Box::new(in_flight_requests.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;

        // Pre-create the produce error series so dashboards and alerts see zeros.
        for kind in ProduceErrorKind::ALL {
            produce_errors.with_label_values(&[kind.label()]);
        }
        let latency_by_route = Route::ALL.map(|route| latency.with_label_values(&[route.label()]));
        let accepted_by_route =
            Route::ALL.map(|route| requests.with_label_values(&[route.label(), "202"]));

        Ok(IngestMetrics {
            requests,
            rejections,
            produce_errors,
            records_accepted,
            in_flight_requests,
            open_connections,
            latency_by_route,
            accepted_by_route,
        })
    }

    /// Records one answered request.
    pub(crate) fn observe_request(&self, route: Route, status: http::StatusCode, seconds: f64) {
        let route_index = route.index();
        self.latency_by_route[route_index].observe(seconds);
        if status == http::StatusCode::ACCEPTED {
            self.accepted_by_route[route_index].inc();
        } else {
            self.requests
                .with_label_values(&[route.label(), status.as_str()])
                .inc();
        }
    }

    /// Records a request refused because of its input.
    pub(crate) fn observe_rejection(&self, code: &'static str) {
        self.rejections.with_label_values(&[code]).inc();
    }

    pub(crate) fn observe_produce_error(&self, kind: ProduceErrorKind, records: u64) {
        self.produce_errors
            .with_label_values(&[kind.label()])
            .inc_by(records);
    }

    pub(crate) fn observe_records_accepted(&self, records: u64) {
        self.records_accepted.inc_by(records);
    }

    pub(crate) fn in_flight_requests(&self) -> &IntGauge {
        &self.in_flight_requests
    }

    pub(crate) fn open_connections(&self) -> &IntGauge {
        &self.open_connections
    }
}

/// Decrements a gauge when dropped, so early returns and cancellations cannot leak it.
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn increment(gauge: &IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn registers_once_and_exports_tally_ingest_names() {
        let registry = Registry::new();
        let metrics = IngestMetrics::register(&registry).unwrap();
        metrics.observe_request(Route::Increment, http::StatusCode::ACCEPTED, 0.001);
        metrics.observe_request(Route::Increment, http::StatusCode::BAD_REQUEST, 0.001);
        metrics.observe_rejection("invalid_json");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        for name in &names {
            assert!(name.starts_with("tally_ingest_"), "{name}");
        }
        assert!(names.contains(&"tally_ingest_requests_total".to_owned()));
        assert!(names.contains(&"tally_ingest_produce_errors_total".to_owned()));
        // A second registration into the same registry is refused, not silently doubled.
        assert!(IngestMetrics::register(&registry).is_err());
    }
}
