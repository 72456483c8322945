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
use tally_schemas::RejectReason;

/// Every `reason` of `tally_ingest_rejections_total` other than the body's own
/// [`RejectReason`]s: the [`IngestError::code`]s of the client-input errors. Listed so
/// the series exist (at 0) from startup; a code missing here still counts, it just
/// appears on first use.
const REQUEST_REJECTION_CODES: [&str; 10] = [
    "invalid_items",
    "too_many_items",
    "body_too_large",
    "body_read_failed",
    "unsupported_media_type",
    "unauthorized",
    "rate_limited",
    "not_found",
    "method_not_allowed",
    "request_timeout",
];

/// Every `reason` label of `tally_ingest_rejections_total` known at startup.
fn rejection_reasons() -> impl Iterator<Item = &'static str> {
    RejectReason::ALL
        .into_iter()
        // A body can break every rule but those decided from a Kafka record's metadata
        // or by the window engine.
        .filter(|reason| reason.is_poison() && *reason != RejectReason::InvalidTimestamp)
        .map(RejectReason::code)
        .chain(REQUEST_REJECTION_CODES)
}

/// The statuses a route answers with (its `status` label values in
/// `tally_ingest_requests_total`), so the series exist from startup.
fn route_statuses(route: Route) -> &'static [u16] {
    match route {
        Route::Increment | Route::Increments => &[202, 400, 401, 405, 408, 413, 415, 422, 429, 503],
        Route::Healthz => &[200, 405],
        Route::Readyz => &[200, 405, 408, 503],
        Route::Metrics => &[200, 405],
        Route::Windows => &[200, 400, 401, 404, 405, 408, 429, 503],
        Route::Ui => &[200, 404, 405],
        Route::Unknown => &[404],
    }
}

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

        // Pre-create every series with a known label set, so dashboards and alerts
        // see zeros from the first scrape instead of "no data" until the first event.
        for kind in ProduceErrorKind::ALL {
            produce_errors.with_label_values(&[kind.label()]);
        }
        for reason in rejection_reasons() {
            rejections.with_label_values(&[reason]);
        }
        for route in Route::ALL {
            for status in route_statuses(route) {
                requests.with_label_values(&[route.label(), &status.to_string()]);
            }
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

    /// One exported sample: family name, label pairs, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Every counter and gauge sample the registry exports.
    fn samples(registry: &Registry) -> Vec<Sample> {
        let mut out = Vec::new();
        for family in registry.gather() {
            for metric in family.get_metric() {
                let labels = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
                    .collect();
                let value = match family.get_field_type() {
                    prometheus::proto::MetricType::COUNTER => metric.get_counter().get_value(),
                    prometheus::proto::MetricType::GAUGE => metric.get_gauge().get_value(),
                    _ => continue,
                };
                out.push((family.name().to_owned(), labels, value));
            }
        }
        out
    }

    fn has_series(samples: &[Sample], family: &str, label: (&str, &str)) -> bool {
        samples.iter().any(|(name, labels, value)| {
            name == family
                && *value == 0.0
                && labels
                    .iter()
                    .any(|(key, val)| key == label.0 && val == label.1)
        })
    }

    #[test]
    fn every_known_label_is_exported_at_zero_before_any_request() {
        let registry = Registry::new();
        let _metrics = IngestMetrics::register(&registry).unwrap();
        let samples = samples(&registry);
        for reason in [
            "invalid_json",
            "unknown_field",
            "invalid_key",
            "invalid_value",
            "duplicate_field",
            "body_too_large",
            "unsupported_media_type",
            "rate_limited",
            "unauthorized",
        ] {
            assert!(
                has_series(
                    &samples,
                    "tally_ingest_rejections_total",
                    ("reason", reason)
                ),
                "no zero series for rejection reason {reason}"
            );
        }
        // Reasons only the aggregator decides never appear on the edge.
        for reason in [
            "late",
            "future_timestamp",
            "sum_overflow",
            "invalid_timestamp",
        ] {
            assert!(
                !has_series(
                    &samples,
                    "tally_ingest_rejections_total",
                    ("reason", reason)
                ),
                "{reason} is not an edge rejection"
            );
        }
        for kind in ProduceErrorKind::ALL {
            assert!(has_series(
                &samples,
                "tally_ingest_produce_errors_total",
                ("kind", kind.label())
            ));
        }
        for route in Route::ALL {
            for status in route_statuses(route) {
                let found = samples.iter().any(|(name, labels, value)| {
                    name == "tally_ingest_requests_total"
                        && *value == 0.0
                        && labels.contains(&("route".to_owned(), route.label().to_owned()))
                        && labels.contains(&("status".to_owned(), status.to_string()))
                });
                assert!(found, "no zero series for {} {status}", route.label());
            }
        }
    }

    #[test]
    fn every_client_input_code_is_a_known_rejection_reason() {
        let known: Vec<&str> = rejection_reasons().collect();
        let errors = [
            IngestError::BodyTooLarge { limit: 1 },
            IngestError::BodyRead("reset".into()),
            IngestError::UnsupportedMediaType { expected: "x" },
            IngestError::Unauthorized,
            IngestError::RateLimited {
                retry_after: std::time::Duration::from_secs(1),
            },
            IngestError::NotFound,
            IngestError::MethodNotAllowed { allow: "GET" },
            IngestError::RequestTimeout(std::time::Duration::from_secs(1)),
            IngestError::InvalidBatch(tally_schemas::BatchRejection::TooManyItems {
                count: 3,
                limit: 2,
            }),
        ];
        for error in errors {
            assert!(error.is_client_input(), "{error:?}");
            assert!(
                known.contains(&error.code()),
                "{} is not pre-created",
                error.code()
            );
        }
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"value":1}"#,
            br#"{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe"}"#,
            br#"{"key":"x","value":1}"#,
            br#"{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":0}"#,
            br#"{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":1,"x":1}"#,
            br#"{"key":"7c9e6679-7425-40de-944b-e07fc1f66afe","key":"7c9e6679-7425-40de-944b-e07fc1f66afe","value":1}"#,
        ] {
            let error = IngestError::InvalidIncrement(
                tally_schemas::decode_increment(body).unwrap_err(),
            );
            assert!(known.contains(&error.code()), "{} is not pre-created", error.code());
        }
    }
}
