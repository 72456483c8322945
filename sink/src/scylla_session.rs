//! How the ScyllaDB backend reaches a production cluster: username/password
//! authentication, TLS (CA, optional client certificate, hostname verification) and
//! local-datacenter-aware load balancing. These settings only shape the driver's
//! [`SessionBuilder`]; the schema and statements live in
//! [`scylla_store`](crate::scylla_store).
//!
//! TLS uses the driver's rustls backend (no system OpenSSL). The driver connects to
//! each node by IP address and asks rustls to verify the certificate against that
//! address, so by default a node's certificate must name its IP (an IP subject
//! alternative name). Certificates issued for a DNS name are verified against
//! [`ScyllaTls::server_name`] instead; [`ScyllaTls::verify_hostname`] `false` checks
//! only the chain (the certificate must still be signed by the CA), like cqlsh's
//! `check_hostname = false`.
//!
//! Secrets: the password is a [`Secret`], whose `Debug` and `Display` print
//! `[redacted]`, so it never reaches a log line through a settings dump.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;

use crate::error::SinkError;

/// PEM files above this size are refused: a CA bundle or a key is a few KiB.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// A value that must never be printed (a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it (the driver).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Username/password authentication (ScyllaDB's `PasswordAuthenticator`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaAuth {
    pub username: String,
    pub password: Secret,
}

/// TLS to every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaTls {
    /// PEM file with the CA certificate(s) that sign the nodes' certificates.
    pub ca_file: PathBuf,
    /// PEM files with a client certificate (chain) and its private key, for clusters
    /// that require client certificates (`require_client_auth: true`).
    pub client_cert: Option<ClientCertificate>,
    /// Verify the nodes' certificates against this DNS name instead of each node's
    /// IP address.
    pub server_name: Option<String>,
    /// `false`: check only that the certificate is signed by the CA, not whom it names.
    pub verify_hostname: bool,
}

/// A client certificate chain and its key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Applies authentication, TLS and the local datacenter to `builder`.
pub fn configure(
    builder: SessionBuilder,
    auth: Option<&ScyllaAuth>,
    tls: Option<&ScyllaTls>,
    local_dc: Option<&str>,
) -> Result<SessionBuilder, SinkError> {
    let mut builder = builder;
    if let Some(auth) = auth {
        if auth.username.is_empty() {
            return Err(SinkError::Config("ScyllaDB username is empty".into()));
        }
        builder = builder.user(auth.username.clone(), auth.password.expose().to_owned());
    }
    if let Some(tls) = tls {
        builder = builder.tls_context(Some(Arc::new(client_config(tls)?)));
    }
    if let Some(dc) = local_dc {
        if dc.trim().is_empty() {
            return Err(SinkError::Config(
                "ScyllaDB local datacenter is empty".into(),
            ));
        }
        builder = builder.default_execution_profile_handle(local_dc_profile(dc));
    }
    Ok(builder)
}

/// Token- and shard-aware routing that only ever sends requests to `dc` (what
/// `LOCAL_QUORUM` expects): no failover to remote datacenters.
fn local_dc_profile(dc: &str) -> scylla::client::execution_profile::ExecutionProfileHandle {
    let policy = DefaultPolicy::builder()
        .prefer_datacenter(dc.to_owned())
        .token_aware(true)
        .permit_dc_failover(false)
        .build();
    ExecutionProfile::builder()
        .load_balancing_policy(policy)
        .build()
        .into_handle()
}

/// The rustls client configuration `tls` describes.
pub fn client_config(tls: &ScyllaTls) -> Result<ClientConfig, SinkError> {
    if tls.server_name.is_some() && !tls.verify_hostname {
        return Err(SinkError::Config(
            "a TLS server name to verify and turning hostname verification off contradict each other"
                .into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    let ca_certs = read_certificates(&tls.ca_file, "ScyllaDB TLS CA file")?;
    for cert in ca_certs {
        roots.add(cert).map_err(|err| {
            SinkError::Config(format!(
                "ScyllaDB TLS CA file {}: {err}",
                tls.ca_file.display()
            ))
        })?;
    }
    let roots = Arc::new(roots);
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
            .build()
            .map_err(|err| SinkError::Config(format!("ScyllaDB TLS verifier: {err}")))?;
    let host_check = match (&tls.server_name, tls.verify_hostname) {
        (Some(name), _) => HostCheck::Name(ServerName::try_from(name.clone()).map_err(|err| {
            SinkError::Config(format!("ScyllaDB TLS server name {name:?}: {err}"))
        })?),
        (None, true) => HostCheck::NodeAddress,
        (None, false) => HostCheck::ChainOnly,
    };
    let verifier = Arc::new(NodeCertVerifier {
        webpki,
        roots,
        provider: Arc::clone(&provider),
        host_check,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| SinkError::Config(format!("ScyllaDB TLS: {err}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &tls.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some(client) => {
            let chain = read_certificates(&client.cert_file, "ScyllaDB TLS client certificate")?;
            let key = read_private_key(&client.key_file)?;
            builder.with_client_auth_cert(chain, key).map_err(|err| {
                SinkError::Config(format!(
                    "ScyllaDB TLS client certificate {} with key {}: {err}",
                    client.cert_file.display(),
                    client.key_file.display()
                ))
            })
        }
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, SinkError> {
    let unreadable =
        |err: std::io::Error| SinkError::Config(format!("{what} {}: {err}", path.display()));
    let length = std::fs::metadata(path).map_err(unreadable)?.len();
    if length > MAX_PEM_BYTES {
        return Err(SinkError::Config(format!(
            "{what} {} is {length} bytes; a PEM file is at most {MAX_PEM_BYTES}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(unreadable)
}

fn read_certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, SinkError> {
    let pem = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| SinkError::Config(format!("{what} {}: {err}", path.display())))?;
    if certs.is_empty() {
        return Err(SinkError::Config(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, SinkError> {
    let what = "ScyllaDB TLS client key";
    let pem = read_pem(path, what)?;
    // The error names the file, never its contents.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
        SinkError::Config(format!(
            "{what} {}: no usable PEM private key ({err})",
            path.display()
        ))
    })
}

/// Whom a node's certificate must name.
#[derive(Debug)]
enum HostCheck {
    /// The node's IP address (what the driver passes as the server name).
    NodeAddress,
    /// This DNS name, whatever node is being connected to.
    Name(ServerName<'static>),
    /// Nobody in particular: only the chain to the CA is checked.
    ChainOnly,
}

/// WebPKI verification with a choice of the name the certificate must carry.
#[derive(Debug)]
struct NodeCertVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    host_check: HostCheck,
}

impl ServerCertVerifier for NodeCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.host_check {
            HostCheck::NodeAddress => self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            HostCheck::Name(name) => {
                self.webpki
                    .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
            }
            HostCheck::ChainOnly => {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )?;
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn secrets_never_print() {
        let auth = ScyllaAuth {
            username: "tally".into(),
            password: Secret::new("hunter2"),
        };
        let printed = format!("{auth:?} {}", auth.password);
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("tally") && printed.contains("[redacted]"),
            "{printed}"
        );
    }

    #[test]
    fn builder_carries_auth_and_local_dc() {
        let auth = ScyllaAuth {
            username: "tally".into(),
            password: Secret::new("hunter2"),
        };
        let plain = configure(SessionBuilder::new(), None, None, None).unwrap();
        assert!(plain.config.authenticator.is_none());
        assert!(plain.config.tls_context.is_none());

        let builder = configure(SessionBuilder::new(), Some(&auth), None, Some("dc-east")).unwrap();
        assert!(builder.config.authenticator.is_some());
        let profile = builder.config.default_execution_profile_handle.to_profile();
        let policy = format!("{:?}", profile.get_load_balancing_policy());
        assert!(
            policy.contains("dc-east") && policy.contains("permit_dc_failover: false"),
            "{policy}"
        );
        assert!(configure(SessionBuilder::new(), None, None, Some(" ")).is_err());
        let nameless = ScyllaAuth {
            username: String::new(),
            password: Secret::new("x"),
        };
        assert!(configure(SessionBuilder::new(), Some(&nameless), None, None).is_err());
    }

    #[test]
    fn unreadable_tls_files_are_configuration_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ScyllaTls {
            ca_file: dir.path().join("absent.pem"),
            client_cert: None,
            server_name: None,
            verify_hostname: true,
        };
        let err = client_config(&missing).unwrap_err();
        assert!(
            matches!(&err, SinkError::Config(text) if text.contains("absent.pem")),
            "{err:?}"
        );
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let err = client_config(&ScyllaTls {
            ca_file: not_pem,
            ..missing.clone()
        })
        .unwrap_err();
        assert!(
            matches!(&err, SinkError::Config(text) if text.contains("no PEM")),
            "{err:?}"
        );
        let contradictory = ScyllaTls {
            server_name: Some("scylla.example".into()),
            verify_hostname: false,
            ..missing
        };
        assert!(matches!(
            client_config(&contradictory),
            Err(SinkError::Config(_))
        ));
    }
}
