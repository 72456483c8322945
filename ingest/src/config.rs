//! Ingest settings: every one is a command-line flag with an environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tally_schemas::names::INCREMENTS_TOPIC;

use crate::error::IngestError;

/// librdkafka settings the edge's durability promise depends on; `--kafka-option`
/// may not override them.
const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "partitioner",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "bootstrap.servers",
    "metadata.broker.list",
    "linger.ms",
    "queue.buffering.max.ms",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// Settings of the HTTP edge and its Kafka producer.
///
/// Durations are written the humantime way: `500ms`, `5s`, `1m`.
#[derive(clap::Args, Clone, PartialEq)]
pub struct IngestConfig {
    /// Address the HTTP server listens on (used by the binary that binds the socket).
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers, comma-separated `host:port`.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,

    /// Topic that accepted increments are produced to.
    #[arg(long, env = "TALLY_TOPIC", default_value = INCREMENTS_TOPIC)]
    pub topic: String,

    /// How long a request waits for the broker's acknowledgement before it is answered
    /// `503 broker_unavailable`; also the producer's `message.timeout.ms`.
    #[arg(long, env = "TALLY_DELIVERY_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Duration,

    /// Largest request body accepted, in bytes; larger bodies get `413` and are never
    /// read in full.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most increments accepted in one `POST /increments` batch.
    #[arg(long, env = "TALLY_MAX_BATCH_ITEMS", default_value_t = 10_000)]
    pub max_batch_items: usize,

    /// Accepted bearer tokens, comma-separated. Auth is on when this or
    /// `--auth-token-file` gives at least one token.
    #[arg(
        long,
        env = "TALLY_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_tokens: Vec<AuthToken>,

    /// File with accepted bearer tokens, one per line (blank lines and lines starting
    /// with `#` are ignored).
    #[arg(long, env = "TALLY_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Requests per second allowed per client (bearer token when auth is on, else peer
    /// IP); 0 turns rate limiting off.
    #[arg(long, env = "TALLY_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,

    /// Bucket size of the rate limiter: requests a client may send at once after being
    /// idle. 0 means one second's worth (`--rate-limit`, at least 1).
    #[arg(long, env = "TALLY_RATE_BURST", default_value_t = 0)]
    pub rate_burst: u32,

    /// Most clients whose buckets are remembered; idle ones are evicted first.
    #[arg(long, env = "TALLY_RATE_LIMIT_MAX_CLIENTS", default_value_t = 100_000)]
    pub rate_limit_max_clients: usize,

    /// Time a connection has to send complete request headers.
    #[arg(long, env = "TALLY_HEADER_READ_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Time a request has from its headers to its answer, body read included
    /// (`408` when exceeded). Must be longer than `--delivery-timeout`.
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Most open client connections; further connections wait in the listen backlog.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// On shutdown: time to finish in-flight requests and then flush the producer.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Producer `linger.ms`: how long librdkafka waits to fill a batch. Every `202`
    /// waits for it, so keep it small; under load batches fill up anyway while earlier
    /// requests are in flight. 500µs measured best on the benchmark (BENCHMARKS.md):
    /// 0 sends many tiny requests (more CPU, worse p99), 1ms+ adds its full length to
    /// every answer.
    #[arg(long, env = "TALLY_LINGER", default_value = "500us", value_parser = humantime::parse_duration)]
    pub linger: Duration,

    /// Most records waiting in the producer's queue; when full, requests get
    /// `503 queue_full` at once. Must hold at least one full batch.
    #[arg(long, env = "TALLY_MAX_QUEUED_RECORDS", default_value_t = 100_000)]
    pub max_queued_records: usize,

    /// How long `/readyz` waits for broker metadata.
    #[arg(long, env = "TALLY_READY_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,

    /// Extra librdkafka producer settings as `key=value` (e.g. `security.protocol=SSL`);
    /// repeat the flag or separate with commas. Settings the durability promise relies
    /// on (acks, idempotence, partitioner, timeouts) cannot be overridden.
    #[arg(
        long = "kafka-option",
        env = "TALLY_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_options: Vec<KafkaOption>,
}

/// Parses an empty command line: the flag defaults, without reading the environment.
impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            brokers: "localhost:9092".to_owned(),
            topic: INCREMENTS_TOPIC.to_owned(),
            delivery_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            max_batch_items: 10_000,
            auth_tokens: Vec::new(),
            auth_token_file: None,
            rate_limit: 0.0,
            rate_burst: 0,
            rate_limit_max_clients: 100_000,
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(10),
            linger: Duration::from_micros(500),
            max_queued_records: 100_000,
            ready_timeout: Duration::from_secs(2),
            kafka_options: Vec::new(),
        }
    }
}

// Hand-written so that tokens and Kafka options (which may hold SASL passwords) never
// reach a log line through `{:?}`.
impl fmt::Debug for IngestConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestConfig")
            .field("listen", &self.listen)
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch_items", &self.max_batch_items)
            .field("auth_tokens", &self.auth_tokens)
            .field("auth_token_file", &self.auth_token_file)
            .field("rate_limit", &self.rate_limit)
            .field("rate_burst", &self.rate_burst)
            .field("rate_limit_max_clients", &self.rate_limit_max_clients)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_connections", &self.max_connections)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("linger", &self.linger)
            .field("max_queued_records", &self.max_queued_records)
            .field("ready_timeout", &self.ready_timeout)
            .field("kafka_options", &self.kafka_options)
            .finish()
    }
}

impl IngestConfig {
    /// Checks the settings against each other; called by `run` before serving.
    pub fn validate(&self) -> Result<(), IngestError> {
        let invalid = |message: String| Err(IngestError::Config(message));
        if self.brokers.trim().is_empty() {
            return invalid("--brokers must name at least one broker".into());
        }
        if self.topic.trim().is_empty() {
            return invalid("--topic must not be empty".into());
        }
        if self.delivery_timeout.is_zero() {
            return invalid("--delivery-timeout must be positive".into());
        }
        if u32::try_from(self.delivery_timeout.as_millis()).is_err() {
            return invalid("--delivery-timeout is too long".into());
        }
        if self.request_timeout <= self.delivery_timeout {
            return invalid(format!(
                "--request-timeout ({}) must be longer than --delivery-timeout ({}) so a request can wait for the broker",
                humantime::format_duration(self.request_timeout),
                humantime::format_duration(self.delivery_timeout)
            ));
        }
        if self.max_body_bytes == 0 {
            return invalid("--max-body-bytes must be positive".into());
        }
        if self.max_batch_items == 0 {
            return invalid("--max-batch-items must be positive".into());
        }
        if self.max_queued_records < self.max_batch_items {
            return invalid(format!(
                "--max-queued-records ({}) must be at least --max-batch-items ({})",
                self.max_queued_records, self.max_batch_items
            ));
        }
        if !self.rate_limit.is_finite() || self.rate_limit < 0.0 {
            return invalid("--rate-limit must be a non-negative number".into());
        }
        if self.rate_limit_max_clients == 0 {
            return invalid("--rate-limit-max-clients must be positive".into());
        }
        if self.max_connections == 0 {
            return invalid("--max-connections must be positive".into());
        }
        if self.header_read_timeout.is_zero() || self.request_timeout.is_zero() {
            return invalid("timeouts must be positive".into());
        }
        if self.linger > Duration::from_secs(1) {
            return invalid("--linger above 1s would delay every 202 by that much".into());
        }
        if let Some(option) =
            KafkaOption::first_protected(&self.kafka_options, PROTECTED_KAFKA_OPTIONS)
        {
            return invalid(format!(
                "--kafka-option may not set {:?}: ingest's delivery guarantee depends on it",
                option.key
            ));
        }
        Ok(())
    }

    /// All accepted tokens: `--auth-tokens` plus the lines of `--auth-token-file`.
    /// Empty means auth is off.
    pub fn load_auth_tokens(&self) -> Result<Vec<AuthToken>, IngestError> {
        let mut tokens: Vec<AuthToken> = self
            .auth_tokens
            .iter()
            .filter(|token| !token.0.is_empty())
            .cloned()
            .collect();
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                IngestError::Config(format!(
                    "cannot read --auth-token-file {}: {err}",
                    path.display()
                ))
            })?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty() && !line.starts_with('#'))
                    .map(|line| AuthToken(line.to_owned())),
            );
        }
        Ok(tokens)
    }
}

/// A bearer token. Its `Debug` output is redacted so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(String);

impl AuthToken {
    pub fn new(token: impl Into<String>) -> Self {
        AuthToken(token.into())
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

impl FromStr for AuthToken {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let token = text.trim();
        if token.bytes().any(|byte| !byte.is_ascii_graphic()) {
            return Err("a token may contain only visible ASCII characters".into());
        }
        Ok(AuthToken(token.to_owned()))
    }
}

/// Extra librdkafka settings (`--kafka-option`), shared with the aggregator.
pub use tally_schemas::KafkaOption;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        ingest: IngestConfig,
    }

    #[test]
    fn default_matches_the_flag_defaults() {
        // Guards against the two lists of defaults drifting apart. The env vars are
        // detached from the parse, so whatever the test environment sets cannot
        // change it (and the test never has to be skipped).
        use clap::{CommandFactory, FromArgMatches};
        let command = Cli::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command.try_get_matches_from(["ingest"]).unwrap();
        let parsed = Cli::from_arg_matches(&matches).unwrap();
        assert_eq!(parsed.ingest, IngestConfig::default());
        parsed.ingest.validate().unwrap();
    }

    #[test]
    fn parses_durations_tokens_and_options() {
        let parsed = Cli::try_parse_from([
            "ingest",
            "--delivery-timeout",
            "500ms",
            "--auth-tokens",
            "alpha,beta",
            "--kafka-option",
            "security.protocol=SSL",
            "--linger",
            "0ms",
        ])
        .unwrap()
        .ingest;
        assert_eq!(parsed.delivery_timeout, Duration::from_millis(500));
        assert_eq!(
            parsed.auth_tokens,
            vec![AuthToken::new("alpha"), AuthToken::new("beta")]
        );
        assert_eq!(parsed.kafka_options[0].key, "security.protocol");
        assert_eq!(parsed.linger, Duration::ZERO);
        parsed.validate().unwrap();
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = IngestConfig {
            auth_tokens: vec![AuthToken::new("s3cret-token")],
            kafka_options: vec!["sasl.password=hunter2".parse().unwrap()],
            ..IngestConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
    }

    #[test]
    fn rejects_inconsistent_settings() {
        let short_request = IngestConfig {
            request_timeout: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(5),
            ..IngestConfig::default()
        };
        assert!(short_request.validate().is_err());
        let overrides_acks = IngestConfig {
            kafka_options: vec!["acks=1".parse().unwrap()],
            ..IngestConfig::default()
        };
        assert!(overrides_acks.validate().is_err());
        let small_queue = IngestConfig {
            max_queued_records: 10,
            ..IngestConfig::default()
        };
        assert!(small_queue.validate().is_err());
    }

    #[test]
    fn token_file_adds_tokens_and_skips_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\n\n  gamma  \ndelta\n").unwrap();
        let config = IngestConfig {
            auth_tokens: vec![AuthToken::new("alpha")],
            auth_token_file: Some(path.clone()),
            ..IngestConfig::default()
        };
        let tokens = config.load_auth_tokens().unwrap();
        assert_eq!(
            tokens,
            vec![
                AuthToken::new("alpha"),
                AuthToken::new("gamma"),
                AuthToken::new("delta")
            ]
        );
        let missing = IngestConfig {
            auth_token_file: Some(dir.path().join("missing")),
            ..IngestConfig::default()
        };
        assert!(missing.load_auth_tokens().is_err());
    }
}
