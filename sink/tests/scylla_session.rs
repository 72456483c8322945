#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ScyllaDB backend reaching a cluster as production runs it: TLS (CA, client
//! certificate, hostname verification), username/password authentication and a local
//! datacenter, over the real CQL wire with the real `scylla` driver.
//!
//! The CQL node is kassandra-tester (see /work/shared/notes/cql-test-node.md), which
//! speaks neither TLS nor authentication. So a proxy in front of it plays the part of
//! ScyllaDB's transport: it terminates TLS with a certificate from a test CA made here
//! (rcgen), optionally requires a client certificate signed by that CA, and optionally
//! runs ScyllaDB's `PasswordAuthenticator` exchange (STARTUP → AUTHENTICATE →
//! AUTH_RESPONSE → AUTH_SUCCESS or a "bad credentials" ERROR), then pipes the decrypted
//! bytes to the node. What the driver sends is what a real node would receive.
//!
//! What this cannot show: ScyllaDB's own TLS settings and role management; only a real
//! cluster (docker compose with TLS configured) would.

#[path = "support/cql_node.rs"]
mod cql_node;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context};
use kassandra_tester::kassandra::frame::request::query::Query;
use kassandra_tester::kassandra::KassandraSession;
use kassandra_tester::KassandraTester;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tally_sink::scylla_session::{ClientCertificate, ScyllaAuth, ScyllaTls, Secret};
use tally_sink::scylla_store::ScyllaStore;
use tally_sink::store::ScyllaOptions;
use tally_sink::{SinkError, WindowRow, WindowStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

const PEER_SEED: &str = "INSERT INTO system.peers (peer, host_id, rpc_address, data_center, rack, tokens, schema_version) \
     VALUES ('127.0.0.1', aa1f1ae0-469d-4abf-ae3f-ecb7a17132fe, '127.0.0.1', 'datacenter1', 'rack', ['0'], \
     0b1c3252-f787-4099-8594-157323b71789)";
const WINDOW: i64 = 10_000;
const T0: i64 = 1_790_000_000_000;
const USER: &str = "tally";
const PASSWORD: &str = "correct horse battery staple";

/// Runs `body` against a fresh CQL node; the body's result travels out through a
/// shared cell (`in_scope` discards it), and a body that never ran is a failure.
fn with_cql_node<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: Fn(SocketAddr) -> Fut + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let outcome: Rc<RefCell<Option<anyhow::Result<()>>>> = Rc::new(RefCell::new(None));
    let slot = Rc::clone(&outcome);
    let served: anyhow::Result<()> = local.block_on(&runtime, async move {
        let mut node = KassandraSession::new();
        node.process(Query::simple(PEER_SEED).map_err(|e| anyhow!("seed parse: {e}"))?)
            .map_err(|e| anyhow!("seed insert: {e}"))?;
        let body = &body;
        KassandraTester::new(node)
            .in_scope(|addr| {
                let slot = Rc::clone(&slot);
                async move {
                    // The store's statements need the bind markers the node's parser
                    // drops: the proxies below reach it through cql_node's proxy.
                    let result = match cql_node::start_proxy(addr, Rc::default()).await {
                        Ok(patched) => body(patched).await,
                        Err(err) => Err(err),
                    };
                    *slot.borrow_mut() = Some(result);
                    Ok::<(), anyhow::Error>(())
                }
            })
            .await?;
        Ok(())
    });
    served?;
    let result = outcome.borrow_mut().take();
    result.unwrap_or_else(|| Err(anyhow!("the test body never ran")))
}

// ---- test PKI ---------------------------------------------------------------------------

/// PEM files of a test CA, a second unrelated CA, node certificates and a client
/// certificate, in a temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    /// A node certificate naming 127.0.0.1 (an IP subject alternative name).
    node_by_ip: (PathBuf, PathBuf),
    /// A node certificate naming only the DNS name `scylla.test`.
    node_by_name: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let authority = ca("tally test CA")?;
        let other = ca("some other CA")?;
        let ca_path = dir.path().join("ca.pem");
        let other_path = dir.path().join("other-ca.pem");
        std::fs::write(&ca_path, authority.pem())?;
        std::fs::write(&other_path, other.pem())?;
        Ok(Pki {
            node_by_ip: leaf(dir.path(), "node-ip", &["127.0.0.1"], &authority)?,
            node_by_name: leaf(dir.path(), "node-name", &["scylla.test"], &authority)?,
            client: leaf(dir.path(), "client", &["tally-client"], &authority)?,
            ca: ca_path,
            other_ca: other_path,
            _dir: dir,
        })
    }

    fn tls(&self) -> ScyllaTls {
        ScyllaTls {
            ca_file: self.ca.clone(),
            client_cert: None,
            server_name: None,
            verify_hostname: true,
        }
    }

    fn client_cert(&self) -> ClientCertificate {
        ClientCertificate {
            cert_file: self.client.0.clone(),
            key_file: self.client.1.clone(),
        }
    }
}

// ---- the proxy: TLS and PasswordAuthenticator in front of the node ------------------------

struct ProxySettings {
    /// Node certificate and key the proxy presents.
    node_cert: (PathBuf, PathBuf),
    /// Require a client certificate signed by this CA.
    client_ca: Option<PathBuf>,
    /// Require `PasswordAuthenticator` with these credentials.
    credentials: Option<(String, String)>,
}

/// What the proxy saw.
#[derive(Default)]
struct Seen {
    handshakes_ok: usize,
    handshake_errors: Vec<String>,
    client_certificates: usize,
    /// Credentials received in AUTH_RESPONSE frames.
    credentials: Vec<(String, String)>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn server_config(settings: &ProxySettings) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain =
        CertificateDer::pem_file_iter(&settings.node_cert.0)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&settings.node_cert.1)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(builder.with_single_cert(chain, key)?)
}

async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<([u8; 9], Vec<u8>)> {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await?;
    let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    if length > 16 * 1024 * 1024 {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut body = vec![0u8; length as usize];
    stream.read_exact(&mut body).await?;
    Ok((header, body))
}

/// A response frame to the request whose header is `request`.
fn response(request: &[u8; 9], opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![
        0x80 | (request[0] & 0x7f),
        0,
        request[2],
        request[3],
        opcode,
    ];
    frame.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

fn cql_string(text: &str) -> Vec<u8> {
    let mut out = u16::try_from(text.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

const OPCODE_ERROR: u8 = 0x00;
const OPCODE_STARTUP: u8 = 0x01;
const OPCODE_AUTHENTICATE: u8 = 0x03;
const OPCODE_AUTH_RESPONSE: u8 = 0x0F;
const OPCODE_AUTH_SUCCESS: u8 = 0x10;
const BAD_CREDENTIALS: i32 = 0x0100;

/// Relays frames until STARTUP; answers it with the PasswordAuthenticator challenge
/// (after the node accepted the STARTUP) and checks the AUTH_RESPONSE. Ok(true) when
/// the client authenticated, Ok(false) when it was refused.
async fn authenticate<C, S>(
    client: &mut C,
    node: &mut S,
    expected: &(String, String),
    seen: &Rc<RefCell<Seen>>,
) -> anyhow::Result<bool>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let (header, body) = read_frame(client).await?;
        node.write_all(&header).await?;
        node.write_all(&body).await?;
        let (reply_header, reply_body) = read_frame(node).await?;
        if header[4] != OPCODE_STARTUP {
            client.write_all(&reply_header).await?;
            client.write_all(&reply_body).await?;
            continue;
        }
        client
            .write_all(&response(
                &header,
                OPCODE_AUTHENTICATE,
                &cql_string("org.apache.cassandra.auth.PasswordAuthenticator"),
            ))
            .await?;
        let (auth_header, auth_body) = read_frame(client).await?;
        ensure!(
            auth_header[4] == OPCODE_AUTH_RESPONSE,
            "expected AUTH_RESPONSE, got opcode {}",
            auth_header[4]
        );
        // [bytes] token = "\0user\0password" (SASL PLAIN).
        let token = auth_body.get(4..).context("short AUTH_RESPONSE")?;
        let mut parts = token.split(|byte| *byte == 0).skip(1);
        let user = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let password = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        seen.borrow_mut()
            .credentials
            .push((user.clone(), password.clone()));
        if (user, password) == *expected {
            client
                .write_all(&response(
                    &auth_header,
                    OPCODE_AUTH_SUCCESS,
                    &(-1i32).to_be_bytes(),
                ))
                .await?;
            return Ok(true);
        }
        let mut error = BAD_CREDENTIALS.to_be_bytes().to_vec();
        error.extend_from_slice(&cql_string(
            "Provided username and/or password are incorrect",
        ));
        client
            .write_all(&response(&auth_header, OPCODE_ERROR, &error))
            .await?;
        return Ok(false);
    }
}

async fn start_proxy(
    upstream: SocketAddr,
    settings: ProxySettings,
    seen: Rc<RefCell<Seen>>,
) -> anyhow::Result<SocketAddr> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&settings)?));
    let credentials = settings.credentials.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::task::spawn_local(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = Rc::clone(&seen);
            let credentials = credentials.clone();
            tokio::task::spawn_local(async move {
                let mut client = match acceptor.accept(tcp).await {
                    Ok(client) => client,
                    Err(err) => {
                        seen.borrow_mut().handshake_errors.push(err.to_string());
                        return;
                    }
                };
                {
                    let mut seen = seen.borrow_mut();
                    seen.handshakes_ok += 1;
                    if client
                        .get_ref()
                        .1
                        .peer_certificates()
                        .is_some_and(|c| !c.is_empty())
                    {
                        seen.client_certificates += 1;
                    }
                }
                let Ok(mut node) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if let Some(expected) = &credentials {
                    match authenticate(&mut client, &mut node, expected, &seen).await {
                        Ok(true) => {}
                        _ => return,
                    }
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut node).await;
            });
        }
    });
    Ok(address)
}

// ---- helpers ------------------------------------------------------------------------------

fn options(
    auth: Option<ScyllaAuth>,
    tls: Option<ScyllaTls>,
    local_dc: Option<&str>,
) -> ScyllaOptions {
    ScyllaOptions {
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        max_concurrency: 4,
        auth,
        tls,
        local_dc: local_dc.map(str::to_owned),
    }
}

fn auth(password: &str) -> Option<ScyllaAuth> {
    Some(ScyllaAuth {
        username: USER.into(),
        password: Secret::new(password),
    })
}

async fn connect(address: SocketAddr, options: &ScyllaOptions) -> Result<ScyllaStore, SinkError> {
    ScyllaStore::connect(&[address.to_string()], "tally_tls_test", options).await
}

/// A row written and read back over the connection.
async fn round_trip(store: &ScyllaStore) -> anyhow::Result<()> {
    let row = WindowRow {
        key: Uuid::new_v4(),
        window_start_ms: T0,
        window_end_ms: T0 + WINDOW,
        partition: 2,
        sum: 42,
        count: 3,
        is_final: true,
        through_offset: 17,
        generation: 0,
    };
    store.write_rows(&[row]).await?;
    let read = store.read_rows(row.key, T0, T0 + WINDOW, 100).await?;
    ensure!(read == vec![row], "read back {read:?}");
    Ok(())
}

// ---- tests --------------------------------------------------------------------------------

#[test]
fn tls_with_client_certificate_and_password_reaches_the_node() -> anyhow::Result<()> {
    let pki = Rc::new(Pki::new()?);
    with_cql_node(move |node| {
        let pki = Rc::clone(&pki);
        async move {
            let seen = Rc::new(RefCell::new(Seen::default()));
            let proxy = start_proxy(
                node,
                ProxySettings {
                    node_cert: pki.node_by_name.clone(),
                    client_ca: Some(pki.ca.clone()),
                    credentials: Some((USER.into(), PASSWORD.into())),
                },
                Rc::clone(&seen),
            )
            .await?;
            let production = ScyllaTls {
                client_cert: Some(pki.client_cert()),
                server_name: Some("scylla.test".into()),
                ..pki.tls()
            };

            let store = connect(
                proxy,
                &options(
                    auth(PASSWORD),
                    Some(production.clone()),
                    Some("datacenter1"),
                ),
            )
            .await
            .context("TLS + client certificate + password")?;
            round_trip(&store).await?;
            {
                let seen = seen.borrow();
                ensure!(seen.handshakes_ok >= 1 && seen.client_certificates == seen.handshakes_ok);
                ensure!(
                    !seen.credentials.is_empty()
                        && seen
                            .credentials
                            .iter()
                            .all(|c| *c == (USER.to_owned(), PASSWORD.to_owned())),
                    "credentials seen: {:?}",
                    seen.credentials
                );
            }
            drop(store);

            // A wrong password is refused, and the error does not repeat it.
            let wrong = "not-the-password";
            let err = connect(proxy, &options(auth(wrong), Some(production.clone()), None))
                .await
                .err()
                .context("a wrong password was accepted")?;
            let text = format!("{err} {err:?}");
            ensure!(
                !text.contains(wrong),
                "the password leaked into the error: {text}"
            );
            ensure!(seen.borrow().credentials.iter().any(|(_, p)| p == wrong));

            // No credentials at all: the node's challenge cannot be answered.
            ensure!(
                connect(proxy, &options(None, Some(production.clone()), None))
                    .await
                    .is_err(),
                "connected without credentials to a node that requires them"
            );

            // No client certificate: the handshake is refused.
            let before = seen.borrow().handshake_errors.len();
            let no_client_cert = ScyllaTls {
                client_cert: None,
                ..production
            };
            ensure!(
                connect(proxy, &options(auth(PASSWORD), Some(no_client_cert), None))
                    .await
                    .is_err(),
                "connected without the client certificate the node requires"
            );
            ensure!(
                seen.borrow().handshake_errors.len() > before,
                "the proxy saw no refused handshake"
            );
            Ok(())
        }
    })
}

#[test]
fn node_certificates_are_verified_against_the_ca_and_the_name() -> anyhow::Result<()> {
    let pki = Rc::new(Pki::new()?);
    with_cql_node(move |node| {
        let pki = Rc::clone(&pki);
        async move {
            let plain = |cert: (PathBuf, PathBuf)| ProxySettings {
                node_cert: cert,
                client_ca: None,
                credentials: None,
            };
            let by_ip = start_proxy(node, plain(pki.node_by_ip.clone()), Rc::default()).await?;
            let by_name = start_proxy(node, plain(pki.node_by_name.clone()), Rc::default()).await?;

            // Default: the certificate must name the node's IP address.
            let store = connect(by_ip, &options(None, Some(pki.tls()), None))
                .await
                .context("certificate naming 127.0.0.1, default verification")?;
            round_trip(&store).await?;
            drop(store);
            ensure!(
                connect(by_name, &options(None, Some(pki.tls()), None))
                    .await
                    .is_err(),
                "a certificate for scylla.test was accepted for 127.0.0.1"
            );

            // A certificate from another CA is refused whatever it names.
            let other_ca = ScyllaTls {
                ca_file: pki.other_ca.clone(),
                ..pki.tls()
            };
            ensure!(
                connect(by_ip, &options(None, Some(other_ca.clone()), None))
                    .await
                    .is_err(),
                "a node certificate from an untrusted CA was accepted"
            );
            let other_ca_chain_only = ScyllaTls {
                verify_hostname: false,
                ..other_ca
            };
            ensure!(
                connect(by_ip, &options(None, Some(other_ca_chain_only), None))
                    .await
                    .is_err(),
                "hostname verification off must still check the CA"
            );

            // --scylla-tls-server-name: verified against that name instead.
            let named = ScyllaTls {
                server_name: Some("scylla.test".into()),
                ..pki.tls()
            };
            let store = connect(by_name, &options(None, Some(named.clone()), None))
                .await
                .context("certificate naming scylla.test, --scylla-tls-server-name scylla.test")?;
            round_trip(&store).await?;
            drop(store);
            let misnamed = ScyllaTls {
                server_name: Some("other.test".into()),
                ..pki.tls()
            };
            ensure!(
                connect(by_name, &options(None, Some(misnamed), None))
                    .await
                    .is_err(),
                "a certificate for scylla.test was accepted as other.test"
            );

            // --scylla-tls-verify-hostname false: the chain only.
            let chain_only = ScyllaTls {
                verify_hostname: false,
                ..pki.tls()
            };
            connect(by_name, &options(None, Some(chain_only), None))
                .await
                .context("hostname verification off, CA-signed certificate")?;

            // Plain TCP to a TLS port fails rather than hanging or succeeding.
            ensure!(connect(by_ip, &options(None, None, None)).await.is_err());
            Ok(())
        }
    })
}

#[test]
fn local_dc_routes_only_to_that_datacenter() -> anyhow::Result<()> {
    with_cql_node(|node| async move {
        // The node's system.peers row says data_center = 'datacenter1'.
        let store = connect(node, &options(None, None, Some("datacenter1")))
            .await
            .context("local DC = the node's DC")?;
        round_trip(&store).await?;
        drop(store);
        let refused = connect(node, &options(None, None, Some("elsewhere"))).await;
        ensure!(
            refused.is_err(),
            "a session limited to a DC without nodes still ran statements"
        );
        Ok(())
    })
}
