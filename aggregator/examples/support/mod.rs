//! Shared by the benchmark examples: the deterministic key set and random stream
//! they all derive from one seed, and Kafka's key → partition mapping, so that a
//! store filler or a memory check can reproduce exactly what `prefill` produced.

#![allow(dead_code)] // each example uses a different part

use uuid::Uuid;

/// The aggregator's default window, used to count the expected rows.
pub const WINDOW_MS: i64 = 10_000;

/// SplitMix64: a small, fast, deterministic generator (same as the engine bench).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// The `count` random (v4-like) keys every example draws first from `rng`.
pub fn keys(rng: &mut SplitMix64, count: usize) -> Vec<Uuid> {
    (0..count)
        .map(|_| Uuid::from_u64_pair(rng.next_u64(), rng.next_u64()))
        .collect()
}

/// Kafka's default partitioner for keyed records (Java `murmur2`, librdkafka's
/// `murmur2_random`): `(murmur2(key) & 0x7fffffff) % partitions`.
pub fn kafka_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Parses positional argument `index` (underscores allowed in numbers), or returns
/// `default`; `usage` is shown when a required one is missing.
pub fn arg<T: std::str::FromStr>(
    args: &[String],
    index: usize,
    default: Option<T>,
    usage: &str,
) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match args.get(index) {
        Some(text) => text
            .replace('_', "")
            .parse()
            .map_err(|err| anyhow::anyhow!("argument {} ({text:?}): {err}\n{usage}", index + 1)),
        None => default.ok_or_else(|| anyhow::anyhow!("{usage}")),
    }
}

/// Resident set size and its peak of process `pid` ("self" for this one), in bytes,
/// from /proc/PID/status.
pub fn rss_bytes(pid: &str) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|line| line.starts_with(name))
            .ok_or_else(|| anyhow::anyhow!("{name} missing from /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("malformed {line:?}"))?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
