//! An in-process CQL node for tests and benchmarks: kassandra-tester (an in-memory
//! CQL server) seeded so the `scylla` driver finds it, behind a proxy that records
//! what the driver sends and makes up for the node's parser.
//!
//! The node's parser knows only `=` restrictions and no `USING` clause: it silently
//! drops everything after the last equality of a WHERE (`window_start >= ? AND
//! window_start < ?`) and every `USING TTL ?`, and answers PREPARE with one bind
//! marker per clause it kept. The driver would then refuse to bind the values the
//! real statement takes (which is also what the store does, on purpose, when it
//! connects to the node directly). The proxy appends the dropped markers to each
//! PREPARED answer (`window_start` as a timestamp, `[ttl]` as an int), so the driver
//! sends every value of the production statements; the node ignores the extra ones:
//! it answers a range read with the whole partition (the store filters by the range
//! itself, as it always does) and never expires anything. What the values were is
//! recorded ([`Seen`]), so tests check them on the wire instead.
//!
//! Shared by `sink/tests/scylla_cql.rs` and `tally/examples/read_bench.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::anyhow;
use kassandra_tester::kassandra::frame::request::query::Query;
use kassandra_tester::kassandra::KassandraSession;
use kassandra_tester::KassandraTester;

/// The seed row the driver needs to find the node (see
/// /work/shared/notes/cql-test-node.md): kassandra answers the driver's prepared
/// `system.local` lookup with a wrong bind-marker count, so one peer row stands in.
pub const PEER_SEED: &str = "INSERT INTO system.peers (peer, host_id, rpc_address, data_center, rack, tokens, schema_version) \
     VALUES ('127.0.0.1', aa1f1ae0-469d-4abf-ae3f-ecb7a17132fe, '127.0.0.1', 'datacenter1', 'rack', ['0'], \
     0b1c3252-f787-4099-8594-157323b71789)";

/// Runs `body` against a fresh CQL node (on a current-thread runtime with a
/// `LocalSet`, as kassandra-tester needs) and returns its result. `in_scope` discards
/// the closure's own result, so it travels out through a shared cell; a body that
/// never ran is a failure too.
pub fn with_cql_node<F, Fut, T>(body: F) -> anyhow::Result<T>
where
    F: Fn(SocketAddr) -> Fut + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + 'static,
    T: 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let outcome: Rc<RefCell<Option<anyhow::Result<T>>>> = Rc::new(RefCell::new(None));
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
                    let result = body(addr).await;
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

/// One EXECUTE the driver sent.
#[derive(Debug, Clone)]
pub struct Execute {
    /// The statement's text (from the PREPARE that produced its id), if seen.
    pub statement: Option<String>,
    /// The protocol-level default timestamp (the write timestamp), if set.
    pub timestamp: Option<i64>,
    /// The bound values, raw (`None` for null or unset).
    pub values: Vec<Option<Vec<u8>>>,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub prepares: Vec<String>,
    pub executes: Vec<Execute>,
    /// PREPARED answers the proxy completed: (statement, markers added).
    pub patched: Vec<(String, usize)>,
    pub problems: Vec<String>,
    ids: HashMap<Vec<u8>, String>,
}

impl Seen {
    /// The EXECUTEs of statements whose text contains `fragment`.
    pub fn executes_of(&self, fragment: &str) -> Vec<&Execute> {
        self.executes
            .iter()
            .filter(|e| e.statement.as_deref().is_some_and(|s| s.contains(fragment)))
            .collect()
    }
}

const OPCODE_PREPARE: u8 = 0x09;
const OPCODE_EXECUTE: u8 = 0x0A;
const OPCODE_RESULT: u8 = 0x08;
const RESULT_PREPARED: i32 = 0x0004;

/// CQL type ids of the columns whose markers the node drops.
const TIMESTAMP: u16 = 0x000B;
const INT: u16 = 0x0009;

/// A TCP proxy in front of the node (CQL protocol v4, no compression) that records
/// what the driver sends and completes PREPARED answers (see the module docs).
pub async fn start_proxy(
    upstream: SocketAddr,
    seen: Rc<RefCell<Seen>>,
) -> anyhow::Result<SocketAddr> {
    use tokio::io::AsyncWriteExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::task::spawn_local(async move {
        while let Ok((client, _)) = listener.accept().await {
            let _ = client.set_nodelay(true);
            let seen = Rc::clone(&seen);
            tokio::task::spawn_local(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = server.set_nodelay(true);
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                // PREPARE texts by stream id, waiting for their answer.
                let pending: Rc<RefCell<HashMap<[u8; 2], String>>> = Rc::default();
                let requests = {
                    let (seen, pending) = (Rc::clone(&seen), Rc::clone(&pending));
                    async move {
                        while let Some((header, body)) = read_frame(&mut client_read).await {
                            match header[4] {
                                OPCODE_PREPARE => {
                                    if let Some(text) = long_string(&body) {
                                        seen.borrow_mut().prepares.push(text.clone());
                                        pending.borrow_mut().insert([header[2], header[3]], text);
                                    }
                                }
                                OPCODE_EXECUTE => {
                                    let mut seen = seen.borrow_mut();
                                    match parse_execute(header[0], header[1], &body) {
                                        Ok((id, timestamp, values)) => {
                                            let statement = seen.ids.get(&id).cloned();
                                            seen.executes.push(Execute {
                                                statement,
                                                timestamp,
                                                values,
                                            });
                                        }
                                        Err(problem) => seen.problems.push(problem),
                                    }
                                }
                                _ => {}
                            }
                            if server_write.write_all(&header).await.is_err()
                                || server_write.write_all(&body).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                };
                let responses = async move {
                    while let Some((mut header, mut body)) = read_frame(&mut server_read).await {
                        let waiting = pending.borrow_mut().remove(&[header[2], header[3]]);
                        if let (OPCODE_RESULT, Some(text)) = (header[4], waiting) {
                            match complete_prepared(&text, header[1], &body) {
                                Ok(Some((id, patched, added))) => {
                                    let mut seen = seen.borrow_mut();
                                    seen.ids.insert(id, text.clone());
                                    if added > 0 {
                                        seen.patched.push((text, added));
                                        body = patched;
                                        header[5..9]
                                            .copy_from_slice(&(body.len() as u32).to_be_bytes());
                                    }
                                }
                                Ok(None) => {}
                                Err(problem) => seen.borrow_mut().problems.push(problem),
                            }
                        }
                        if client_write.write_all(&header).await.is_err()
                            || client_write.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                };
                tokio::select! {
                    () = requests => {}
                    () = responses => {}
                }
            });
        }
    });
    Ok(address)
}

async fn read_frame(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Option<([u8; 9], Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.ok()?;
    let length = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
    let mut body = vec![0u8; length as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some((header, body))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("frame body truncated (wanted {n} more bytes)"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn short(&mut self) -> Result<usize, String> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn int(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.short()?;
        self.take(n)
    }
    fn bytes(&mut self) -> Result<Option<Vec<u8>>, String> {
        let length = self.int()?;
        if length < 0 {
            return Ok(None);
        }
        Ok(Some(self.take(length as usize)?.to_vec()))
    }
}

fn long_string(body: &[u8]) -> Option<String> {
    let mut reader = Reader(body);
    let n = reader.int().ok()?;
    let text = reader.take(usize::try_from(n).ok()?).ok()?;
    String::from_utf8(text.to_vec()).ok()
}

/// A v4 EXECUTE body:
/// `<id: short bytes><consistency: short><flags: byte>[<n: short><n × bytes>]
///  [<page_size: int>][<paging_state: bytes>][<serial_consistency: short>][<timestamp: long>]`.
#[allow(clippy::type_complexity)]
fn parse_execute(
    version: u8,
    frame_flags: u8,
    body: &[u8],
) -> Result<(Vec<u8>, Option<i64>, Vec<Option<Vec<u8>>>), String> {
    if version != 0x04 {
        return Err(format!(
            "expected CQL protocol v4 requests, got version byte {version:#x}"
        ));
    }
    // Compression or a custom payload would change the body layout.
    if frame_flags & 0x05 != 0 {
        return Err(format!("unexpected frame flags {frame_flags:#x}"));
    }
    let mut reader = Reader(body);
    let id = reader.string()?.to_vec();
    reader.short()?; // consistency
    let flags = reader.take(1)?[0];
    if flags & 0x40 != 0 {
        return Err("named values are not expected".into());
    }
    let mut values = Vec::new();
    if flags & 0x01 != 0 {
        for _ in 0..reader.short()? {
            values.push(reader.bytes()?);
        }
    }
    if flags & 0x04 != 0 {
        reader.int()?; // page size
    }
    if flags & 0x08 != 0 {
        reader.bytes()?; // paging state
    }
    if flags & 0x10 != 0 {
        reader.short()?; // serial consistency
    }
    if flags & 0x20 == 0 {
        return Ok((id, None, values));
    }
    let b = reader.take(8)?;
    let timestamp = i64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    Ok((id, Some(timestamp), values))
}

/// The types of the bind markers the node drops from `text`, in order: the range
/// restrictions after the equalities, and `USING TTL ?`.
fn dropped_markers(text: &str) -> Vec<(&'static str, u16)> {
    let mut dropped = Vec::new();
    for (clause, marker) in [
        ("window_start >= ?", ("window_start", TIMESTAMP)),
        ("window_start < ?", ("window_start", TIMESTAMP)),
        ("USING TTL ?", ("[ttl]", INT)),
    ] {
        if text.contains(clause) {
            dropped.push(marker);
        }
    }
    dropped
}

/// For a PREPARED answer to `text`: its statement id and, if the node dropped bind
/// markers, the body with them added (and how many). `None` for other results.
#[allow(clippy::type_complexity)]
fn complete_prepared(
    text: &str,
    frame_flags: u8,
    body: &[u8],
) -> Result<Option<(Vec<u8>, Vec<u8>, usize)>, String> {
    let mut reader = Reader(body);
    if reader.int()? != RESULT_PREPARED {
        return Ok(None);
    }
    if frame_flags != 0 {
        return Err(format!("unexpected response frame flags {frame_flags:#x}"));
    }
    let id = reader.string()?.to_vec();
    let flags_at = body.len() - reader.0.len();
    let flags = reader.int()?;
    let count_at = body.len() - reader.0.len();
    let columns = usize::try_from(reader.int()?).map_err(|_| "negative column count")?;
    let pk_count = usize::try_from(reader.int()?).map_err(|_| "negative pk count")?;
    for _ in 0..pk_count {
        reader.short()?;
    }
    let global = flags & 0x0001 != 0;
    if global {
        reader.string()?;
        reader.string()?;
    }
    for _ in 0..columns {
        if !global {
            reader.string()?;
            reader.string()?;
        }
        reader.string()?;
        let type_id = reader.short()?;
        if type_id == 0 || (0x20..=0x31).contains(&type_id) {
            return Err(format!(
                "{text}: collection or custom types are not expected"
            ));
        }
    }
    let specs_end = body.len() - reader.0.len();
    let wanted = text.matches('?').count();
    let dropped = dropped_markers(text);
    let missing = wanted.saturating_sub(columns);
    if missing == 0 {
        return Ok(Some((id, body.to_vec(), 0)));
    }
    if missing != dropped.len() || !global {
        return Err(format!(
            "{text}: the node reported {columns} of {wanted} bind markers; cannot tell the types of the others"
        ));
    }
    let _ = flags_at;
    let mut patched = body[..specs_end].to_vec();
    let new_count = (columns + missing) as i32;
    patched[count_at..count_at + 4].copy_from_slice(&new_count.to_be_bytes());
    for (name, type_id) in dropped {
        patched.extend_from_slice(&(name.len() as u16).to_be_bytes());
        patched.extend_from_slice(name.as_bytes());
        patched.extend_from_slice(&type_id.to_be_bytes());
    }
    patched.extend_from_slice(&body[specs_end..]);
    Ok(Some((id, patched, missing)))
}

/// A big-endian CQL `int` or `bigint`/`timestamp` value.
pub fn int_value(raw: &Option<Vec<u8>>) -> Option<i64> {
    let raw = raw.as_ref()?;
    match raw.len() {
        4 => Some(i64::from(i32::from_be_bytes([
            raw[0], raw[1], raw[2], raw[3],
        ]))),
        8 => Some(i64::from_be_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ])),
        _ => None,
    }
}
