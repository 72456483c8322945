//! `tally aggregator` settings: every one a flag with an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use tally_sink::scylla_session::{ClientCertificate, ScyllaAuth, ScyllaTls, Secret};

use crate::engine::EngineConfig;
use crate::error::AggregatorError;

/// Parses durations written like `10s`, `500ms`, `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{text:?}: {err}"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct AggregatorConfig {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Consumer group shared by all aggregator instances.
    #[arg(long, env = "TALLY_GROUP", default_value = "tally-aggregator")]
    pub group: String,
    /// Input topic.
    #[arg(long, env = "TALLY_TOPIC", default_value = tally_schemas::names::INCREMENTS_TOPIC)]
    pub topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = tally_schemas::names::DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Window store: sqlite://PATH or scylla://host:port[,host:port]/keyspace.
    #[arg(
        long,
        env = "TALLY_STORE",
        default_value = "sqlite://data/tally.sqlite"
    )]
    pub store: String,
    /// Tumbling window size.
    #[arg(long, env = "TALLY_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub window: Duration,
    /// How far behind the partition's newest event time a record may still arrive.
    #[arg(long, env = "TALLY_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How often changed open windows are written as provisional rows.
    #[arg(long, env = "TALLY_FLUSH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// Records stamped further than this ahead of the wall clock are dead-lettered.
    #[arg(long, env = "TALLY_MAX_FUTURE_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_future_skew: Duration,
    /// Deadline for one dead-letter delivery.
    #[arg(long, env = "TALLY_DLQ_DELIVERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub dlq_delivery_timeout: Duration,
    /// Consecutive failed store writes that open the circuit breaker.
    #[arg(long, env = "TALLY_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: u32,
    /// How long the circuit stays open before a probe write.
    #[arg(long, env = "TALLY_BREAKER_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub breaker_probe_interval: Duration,
    /// Longest wait between store write retries (exponential backoff with jitter).
    #[arg(long, env = "TALLY_RETRY_MAX_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub retry_max_delay: Duration,
    /// How long a revoked partition may spend writing its last rows before it is
    /// handed over uncommitted (the new owner then replays; nothing is lost).
    #[arg(long, env = "TALLY_REVOKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub revoke_timeout: Duration,
    /// Deadline for the final flush and commit on shutdown.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Keep window rows this long after their window ended (event time, so a replay
    /// cannot extend it), then drop them: ScyllaDB rows get a TTL, SQLite prunes final
    /// rows after its flushes. Checkpoints expire this long after they were saved.
    /// Default: keep everything.
    #[arg(long, env = "TALLY_RETENTION", value_parser = parse_duration)]
    pub retention: Option<Duration>,
    /// After offsets vanished before they were read (retention deleted them), go on
    /// from the log start instead of halting the partition. The loss is counted
    /// (`tally_aggregator_lost_offsets_total`) and the windows it can touch are never
    /// rewritten.
    #[arg(long, env = "TALLY_ACCEPT_DATA_LOSS")]
    pub accept_data_loss: bool,
    /// `/readyz` fails when a partition with lag has not advanced its committed
    /// offset for this long.
    #[arg(long, env = "TALLY_STALL_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// A partition that read nothing for this long while it holds open windows gets
    /// an idle marker, so its windows become final without new traffic. `0s`: never.
    #[arg(long, env = "TALLY_IDLE_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub idle_after: Duration,
    /// Idle markers are stamped this long before now. At least the edge's
    /// `--delivery-timeout` plus the clock skew between hosts, so a marker never makes
    /// an acknowledged record late; windows close this much later when idle.
    #[arg(long, env = "TALLY_IDLE_MARKER_LAG", default_value = "10s", value_parser = parse_duration)]
    pub idle_marker_lag: Duration,
    #[command(flatten)]
    pub scylla: ScyllaArgs,
    /// Extra librdkafka settings for the consumer and the dead-letter producer as
    /// `key=value` (e.g. `security.protocol=SSL`); repeat the flag or separate with
    /// commas. Settings the exactly-once bookkeeping relies on cannot be overridden.
    #[arg(
        long = "kafka-option",
        env = "TALLY_KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_options: Vec<tally_schemas::KafkaOption>,
}

/// librdkafka settings the aggregator's guarantees rest on (manual commits after the
/// flush, one group protocol, idempotent acks=all dead letters).
const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    // Where a partition starts is the protocol's decision; an offset that vanished
    // must surface as an error, never as a silent jump.
    "auto.offset.reset",
    // Aborted transactional writes of direct producers must never be counted.
    "isolation.level",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
];

/// ScyllaDB settings, shared by every command that opens a store.
///
/// Authentication and TLS are off unless given. The password never has a default,
/// is never shown by `--help` (`hide_env_values`) and prints as `[redacted]` in
/// `Debug`; pass it by `TALLY_SCYLLA_PASSWORD` or a file (`--scylla-password-file`,
/// e.g. a mounted secret) rather than the flag, which other users can read in the
/// process list.
#[derive(clap::Args, Debug, Clone)]
pub struct ScyllaArgs {
    /// ScyllaDB keyspace replication used when the keyspace is created.
    #[arg(
        long,
        env = "TALLY_SCYLLA_REPLICATION",
        default_value = "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}"
    )]
    pub scylla_replication: String,
    /// ScyllaDB consistency level for reads and writes.
    #[arg(long, env = "TALLY_SCYLLA_CONSISTENCY", default_value = "LOCAL_QUORUM")]
    pub scylla_consistency: String,
    /// Most ScyllaDB statements in flight per store call.
    #[arg(long, env = "TALLY_SCYLLA_CONCURRENCY", default_value_t = 256)]
    pub scylla_concurrency: usize,
    /// ScyllaDB partition bucket: a key's windows of one bucket share a partition, so a
    /// range read is one query per bucket. Pinned in the store on first use; every
    /// process must use the pinned value.
    #[arg(long, env = "TALLY_SCYLLA_BUCKET", default_value = "1d", value_parser = parse_duration)]
    pub scylla_bucket: Duration,
    /// ScyllaDB username (PasswordAuthenticator); needs a password.
    #[arg(
        long,
        env = "TALLY_SCYLLA_USERNAME",
        requires = "scylla_password_source"
    )]
    pub scylla_username: Option<String>,
    /// ScyllaDB password; prefer the env var or a password file, which the process list does not show.
    #[arg(
        long,
        env = "TALLY_SCYLLA_PASSWORD",
        hide_env_values = true,
        value_parser = parse_secret,
        group = "scylla_password_source",
        requires = "scylla_username"
    )]
    pub scylla_password: Option<Secret>,
    /// File whose content (one trailing newline ignored) is the ScyllaDB password.
    #[arg(
        long,
        env = "TALLY_SCYLLA_PASSWORD_FILE",
        value_parser = read_secret_file,
        group = "scylla_password_source",
        requires = "scylla_username"
    )]
    pub scylla_password_file: Option<Secret>,
    /// Connect to ScyllaDB over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, env = "TALLY_SCYLLA_TLS_CA_FILE")]
    pub scylla_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM chain) for clusters that require one; needs the key.
    #[arg(
        long,
        env = "TALLY_SCYLLA_TLS_CERT_FILE",
        requires_all = ["scylla_tls_key_file", "scylla_tls_ca_file"]
    )]
    pub scylla_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        env = "TALLY_SCYLLA_TLS_KEY_FILE",
        requires = "scylla_tls_cert_file"
    )]
    pub scylla_tls_key_file: Option<PathBuf>,
    /// Verify node certificates against this DNS name instead of each node's IP
    /// address (the driver connects by IP).
    #[arg(
        long,
        env = "TALLY_SCYLLA_TLS_SERVER_NAME",
        requires = "scylla_tls_ca_file"
    )]
    pub scylla_tls_server_name: Option<String>,
    /// `false`: check only that node certificates are signed by the CA, not the
    /// name they carry.
    #[arg(
        long,
        env = "TALLY_SCYLLA_TLS_VERIFY_HOSTNAME",
        default_value_t = true,
        action = clap::ArgAction::Set,
        requires = "scylla_tls_ca_file"
    )]
    pub scylla_tls_verify_hostname: bool,
    /// Send requests only to nodes of this datacenter (token and shard aware within
    /// it, no failover to other datacenters); for multi-DC clusters.
    #[arg(long, env = "TALLY_SCYLLA_LOCAL_DC")]
    pub scylla_local_dc: Option<String>,
}

/// Passwords longer than this are refused (a file given by mistake, e.g. a key).
const MAX_SECRET_BYTES: u64 = 4096;

fn parse_secret(text: &str) -> Result<Secret, String> {
    if text.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(Secret::new(text))
}

/// Reads a secret file at parse time, so a wrong path fails before anything starts.
/// Errors name the file, never its content.
fn read_secret_file(path: &str) -> Result<Secret, String> {
    let length = std::fs::metadata(path)
        .map_err(|err| format!("{path}: {err}"))?
        .len();
    if length > MAX_SECRET_BYTES {
        return Err(format!(
            "{path} is {length} bytes; a password file holds at most {MAX_SECRET_BYTES}"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|err| format!("{path}: {err}"))?;
    let password = text
        .strip_suffix('\n')
        .map(|rest| rest.strip_suffix('\r').unwrap_or(rest))
        .unwrap_or(&text);
    parse_secret(password).map_err(|err| format!("{path}: {err}"))
}

impl ScyllaArgs {
    pub fn options(&self) -> tally_sink::store::ScyllaOptions {
        let password = self
            .scylla_password
            .clone()
            .or_else(|| self.scylla_password_file.clone());
        // clap guarantees a password with a username (and a username with a password).
        let auth = self
            .scylla_username
            .clone()
            .zip(password)
            .map(|(username, password)| ScyllaAuth { username, password });
        let tls = self.scylla_tls_ca_file.clone().map(|ca_file| ScyllaTls {
            ca_file,
            client_cert: self
                .scylla_tls_cert_file
                .clone()
                .zip(self.scylla_tls_key_file.clone())
                .map(|(cert_file, key_file)| ClientCertificate {
                    cert_file,
                    key_file,
                }),
            server_name: self.scylla_tls_server_name.clone(),
            verify_hostname: self.scylla_tls_verify_hostname,
        });
        tally_sink::store::ScyllaOptions {
            replication: self.scylla_replication.clone(),
            consistency: self.scylla_consistency.clone(),
            max_concurrency: self.scylla_concurrency.max(1),
            auth,
            tls,
            local_dc: self.scylla_local_dc.clone(),
        }
    }

    /// The options to open a store with, for a process with this `retention` role.
    pub fn store_options(
        &self,
        retention: tally_sink::store::Retention,
    ) -> tally_sink::StoreOptions {
        tally_sink::StoreOptions {
            scylla: self.options(),
            bucket_ms: i64::try_from(self.scylla_bucket.as_millis()).unwrap_or(i64::MAX),
            retention,
        }
    }

    /// Opens the store at `url` as a reader (`sqlite://` ignores these settings).
    pub async fn open(
        &self,
        url: &str,
    ) -> Result<std::sync::Arc<dyn tally_sink::WindowStore>, AggregatorError> {
        let options = self.store_options(tally_sink::store::Retention::AsRecorded);
        Ok(tally_sink::open_store(url, &options).await?)
    }
}

fn millis(duration: Duration, name: &str) -> Result<i64, AggregatorError> {
    i64::try_from(duration.as_millis())
        .map_err(|_| AggregatorError::Config(format!("--{name} is too large")))
}

impl AggregatorConfig {
    /// The engine settings these flags describe, validated.
    pub fn engine_config(&self) -> Result<EngineConfig, AggregatorError> {
        let window_ms = millis(self.window, "window")?;
        if window_ms <= 0 {
            return Err(AggregatorError::Config(
                "--window must be at least 1ms".into(),
            ));
        }
        if self.flush_interval.is_zero() {
            return Err(AggregatorError::Config(
                "--flush-interval must be positive".into(),
            ));
        }
        Ok(EngineConfig {
            window_ms,
            grace_ms: millis(self.grace, "grace")?,
            max_future_skew_ms: millis(self.max_future_skew, "max-future-skew")?,
        })
    }

    /// Refuses `--kafka-option`s that would break commits-after-flush or the
    /// dead-letter guarantee.
    pub fn validate_kafka_options(&self) -> Result<(), AggregatorError> {
        match tally_schemas::KafkaOption::first_protected(
            &self.kafka_options,
            PROTECTED_KAFKA_OPTIONS,
        ) {
            Some(option) => Err(AggregatorError::Config(format!(
                "--kafka-option may not set {:?}: the aggregator's guarantees depend on it",
                option.key
            ))),
            None => Ok(()),
        }
    }

    /// How this aggregator opens its store: the ScyllaDB settings, the bucket, and
    /// the retention it enforces. (The name predates the retention.)
    pub fn scylla_options(&self) -> tally_sink::StoreOptions {
        let retention_ms = self
            .retention
            .map(|retention| i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        self.scylla
            .store_options(tally_sink::store::Retention::Enforce(retention_ms))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: AggregatorConfig,
    }

    /// Every parse reads the process environment; the one test that sets variables
    /// holds this lock, so no other parse sees them.
    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn try_parse(args: &[&str]) -> Result<AggregatorConfig, clap::Error> {
        let _env = ENV_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        try_parse_locked(args)
    }

    fn try_parse_locked(args: &[&str]) -> Result<AggregatorConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("tally").chain(args.iter().copied()))
            .map(|cli| cli.config)
    }

    fn parse(args: &[&str]) -> AggregatorConfig {
        try_parse(args).unwrap()
    }

    #[test]
    fn scylla_auth_tls_and_local_dc_become_driver_options() {
        let config = parse(&[
            "--scylla-username",
            "tally",
            "--scylla-password",
            "hunter2",
            "--scylla-tls-ca-file",
            "/etc/tally/ca.pem",
            "--scylla-tls-cert-file",
            "/etc/tally/client.pem",
            "--scylla-tls-key-file",
            "/etc/tally/client.key",
            "--scylla-tls-server-name",
            "scylla.internal",
            "--scylla-local-dc",
            "eu-west",
        ]);
        let options = config.scylla.options();
        let auth = options.auth.as_ref().unwrap();
        assert_eq!(auth.username, "tally");
        assert_eq!(auth.password.expose(), "hunter2");
        let tls = options.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/etc/tally/ca.pem"));
        assert_eq!(
            tls.client_cert,
            Some(ClientCertificate {
                cert_file: "/etc/tally/client.pem".into(),
                key_file: "/etc/tally/client.key".into(),
            })
        );
        assert_eq!(tls.server_name.as_deref(), Some("scylla.internal"));
        assert!(tls.verify_hostname);
        assert_eq!(options.local_dc.as_deref(), Some("eu-west"));
        // The driver gets the credentials and the DC-aware policy.
        let builder = tally_sink::scylla_session::configure(
            scylla::client::session_builder::SessionBuilder::new(),
            options.auth.as_ref(),
            None,
            options.local_dc.as_deref(),
        )
        .unwrap();
        assert!(builder.config.authenticator.is_some());
        // Nothing secret in a settings dump.
        for printed in [format!("{config:?}"), format!("{options:?}")] {
            assert!(!printed.contains("hunter2"), "{printed}");
        }

        let plain = parse(&[]).scylla.options();
        assert!(plain.auth.is_none() && plain.tls.is_none() && plain.local_dc.is_none());
        let chain_only = parse(&[
            "--scylla-tls-ca-file",
            "ca.pem",
            "--scylla-tls-verify-hostname",
            "false",
        ])
        .scylla
        .options();
        let tls = chain_only.tls.unwrap();
        assert!(!tls.verify_hostname && tls.client_cert.is_none() && tls.server_name.is_none());
    }

    #[test]
    fn scylla_password_file_is_read_at_parse_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let options = parse(&["--scylla-username", "tally", "--scylla-password-file", path])
            .scylla
            .options();
        assert_eq!(options.auth.unwrap().password.expose(), "s3cret");
        std::fs::write(&file, "").unwrap();
        let err = try_parse(&["--scylla-username", "u", "--scylla-password-file", path])
            .err()
            .unwrap();
        assert!(err.to_string().contains("empty"), "{err}");
        let missing = dir.path().join("absent");
        let err = try_parse(&[
            "--scylla-username",
            "u",
            "--scylla-password-file",
            missing.to_str().unwrap(),
        ])
        .err()
        .unwrap();
        assert!(err.to_string().contains("absent"), "{err}");
    }

    #[test]
    fn incomplete_or_contradictory_scylla_settings_are_refused() {
        let refused: [&[&str]; 8] = [
            &["--scylla-username", "u"],
            &["--scylla-password", "p"],
            &[
                "--scylla-username",
                "u",
                "--scylla-password",
                "p",
                "--scylla-password-file",
                "/dev/null",
            ],
            &[
                "--scylla-tls-ca-file",
                "ca.pem",
                "--scylla-tls-cert-file",
                "c.pem",
            ],
            &[
                "--scylla-tls-ca-file",
                "ca.pem",
                "--scylla-tls-key-file",
                "k.pem",
            ],
            &[
                "--scylla-tls-cert-file",
                "c.pem",
                "--scylla-tls-key-file",
                "k.pem",
            ],
            &["--scylla-tls-server-name", "scylla.internal"],
            &["--scylla-tls-verify-hostname", "false"],
        ];
        for args in refused {
            assert!(try_parse(args).is_err(), "{args:?} should be refused");
        }
    }

    #[test]
    fn scylla_settings_come_from_env_vars_and_help_shows_no_secret() {
        use clap::CommandFactory;
        let _env = ENV_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let vars = [
            ("TALLY_SCYLLA_USERNAME", "tally"),
            ("TALLY_SCYLLA_PASSWORD", "env-hunter2"),
            ("TALLY_SCYLLA_TLS_CA_FILE", "/run/secrets/ca.pem"),
            ("TALLY_SCYLLA_TLS_VERIFY_HOSTNAME", "false"),
            ("TALLY_SCYLLA_LOCAL_DC", "dc2"),
        ];
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
        let parsed = try_parse_locked(&[]);
        let help = Cli::command().render_long_help().to_string();
        for (name, _) in vars {
            std::env::remove_var(name);
        }
        let options = parsed.unwrap().scylla.options();
        let auth = options.auth.unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.expose()),
            ("tally", "env-hunter2")
        );
        let tls = options.tls.unwrap();
        assert_eq!(tls.ca_file, PathBuf::from("/run/secrets/ca.pem"));
        assert!(!tls.verify_hostname);
        assert_eq!(options.local_dc.as_deref(), Some("dc2"));
        assert!(help.contains("--scylla-password"), "{help}");
        assert!(help.contains("TALLY_SCYLLA_PASSWORD"), "{help}");
        assert!(
            !help.contains("env-hunter2"),
            "the password leaked into --help"
        );
    }

    #[test]
    fn kafka_options_pass_unless_they_touch_the_guarantees() {
        let config = parse(&[
            "--kafka-option",
            "security.protocol=SSL,fetch.max.bytes=1048576",
        ]);
        assert_eq!(config.kafka_options.len(), 2);
        assert!(config.validate_kafka_options().is_ok());
        for key in [
            "enable.auto.commit",
            "group.id",
            "acks",
            "partition.assignment.strategy",
            "auto.offset.reset",
            "isolation.level",
        ] {
            let config = parse(&["--kafka-option", &format!("{key}=x")]);
            let err = config.validate_kafka_options().unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn durations_parse_like_the_docs_say() {
        let config = parse(&[
            "--window",
            "500ms",
            "--grace",
            "0s",
            "--flush-interval",
            "2s",
        ]);
        let engine = config.engine_config().unwrap();
        assert_eq!((engine.window_ms, engine.grace_ms), (500, 0));
        assert!(parse(&["--flush-interval", "0s"]).engine_config().is_err());
    }

    #[test]
    fn retention_is_off_by_default_and_reaches_the_store_options() {
        use tally_sink::store::Retention;
        let options = parse(&[]).scylla_options();
        assert_eq!(options.retention, Retention::Enforce(None));
        assert_eq!(options.bucket_ms, 86_400_000);
        let options = parse(&["--retention", "7d", "--scylla-bucket", "1h"]).scylla_options();
        assert_eq!(options.retention, Retention::Enforce(Some(7 * 86_400_000)));
        assert_eq!(options.bucket_ms, 3_600_000);
        // Readers never enforce one.
        let reader = parse(&["--retention", "7d"])
            .scylla
            .store_options(Retention::AsRecorded);
        assert_eq!(reader.retention, Retention::AsRecorded);
    }
}
