//! Per-client token buckets with bounded memory.
//!
//! Each client has a bucket of `burst` tokens refilled at `rate` tokens per second; a
//! request takes one token or is refused with the time until the next token.
//! Buckets live in a fixed number of mutex-guarded shards (short critical sections, no
//! awaiting while held), each capped at its share of `max_clients`. When a shard is
//! full, buckets idle long enough to be full again are dropped first (forgetting them
//! changes nothing: a new bucket starts full); if none is, the least recently seen
//! client is forgotten, which at worst grants that client a fresh burst.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who a request is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientId {
    /// Index of the bearer token the client presented (auth on).
    Token(usize),
    /// Peer address (auth off).
    Ip(IpAddr),
}

/// Enough shards that two cores rarely contend on one lock.
const SHARD_COUNT: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_refill: Instant,
}

pub(crate) struct RateLimiter {
    rate_per_second: f64,
    burst: f64,
    /// Time for an empty bucket to fill up again; idle at least this long = forgettable.
    refill_time: Duration,
    max_clients_per_shard: usize,
    shard_hasher: RandomState,
    shards: Vec<Mutex<HashMap<ClientId, Bucket>>>,
}

impl RateLimiter {
    /// `None` when rate limiting is off (`rate_per_second == 0`).
    pub(crate) fn new(rate_per_second: f64, burst: u32, max_clients: usize) -> Option<Self> {
        if rate_per_second <= 0.0 || !rate_per_second.is_finite() {
            return None;
        }
        let burst = if burst == 0 {
            rate_per_second.max(1.0)
        } else {
            f64::from(burst)
        };
        let refill_time = Duration::from_secs_f64(burst / rate_per_second);
        Some(RateLimiter {
            rate_per_second,
            burst,
            refill_time,
            max_clients_per_shard: max_clients.div_ceil(SHARD_COUNT).max(1),
            shard_hasher: RandomState::new(),
            shards: (0..SHARD_COUNT)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        })
    }

    /// Takes one token for `client`; `Err(wait)` when the bucket is empty.
    pub(crate) fn try_acquire(&self, client: ClientId, now: Instant) -> Result<(), Duration> {
        let shard_index = (self.shard_hasher.hash_one(client) as usize) % SHARD_COUNT;
        let Some(shard) = self.shards.get(shard_index) else {
            return Ok(());
        };
        // A poisoned lock only means another request panicked mid-update of a bucket;
        // the map itself is still consistent, so keep using it.
        let mut buckets = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(&client) && buckets.len() >= self.max_clients_per_shard {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            last_refill: now,
        });
        let elapsed = now
            .saturating_duration_since(bucket.last_refill)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_second).min(self.burst);
        bucket.last_refill = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Duration::from_secs_f64(missing / self.rate_per_second))
        }
    }

    /// Makes room for one more client in a full shard.
    fn evict(&self, buckets: &mut HashMap<ClientId, Bucket>, now: Instant) {
        let before = buckets.len();
        buckets.retain(|_, bucket| {
            now.saturating_duration_since(bucket.last_refill) < self.refill_time
        });
        if buckets.len() < before {
            return;
        }
        let least_recent = buckets
            .iter()
            .min_by_key(|(_, bucket)| bucket.last_refill)
            .map(|(client, _)| *client);
        if let Some(client) = least_recent {
            buckets.remove(&client);
        }
    }

    #[cfg(test)]
    fn tracked_clients(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map(|buckets| buckets.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ip(last: u8) -> ClientId {
        ClientId::Ip(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn off_when_rate_is_zero() {
        assert!(RateLimiter::new(0.0, 10, 10).is_none());
    }

    #[test]
    fn allows_the_burst_then_refuses_until_refilled() {
        let limiter = RateLimiter::new(2.0, 3, 100).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.try_acquire(ip(1), start).is_ok());
        }
        let wait = limiter.try_acquire(ip(1), start).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another client has its own bucket.
        assert!(limiter.try_acquire(ip(2), start).is_ok());
        // Half a second later one token (rate 2/s) is back.
        let later = start + Duration::from_millis(500);
        assert!(limiter.try_acquire(ip(1), later).is_ok());
        assert!(limiter.try_acquire(ip(1), later).is_err());
    }

    #[test]
    fn memory_stays_bounded_under_many_clients() {
        let max_clients = 64;
        let limiter = RateLimiter::new(1.0, 1, max_clients).unwrap();
        let now = Instant::now();
        for index in 0..10_000u32 {
            let client = ClientId::Ip(IpAddr::from(index.to_be_bytes()));
            let _ = limiter.try_acquire(client, now);
        }
        let bound = max_clients.div_ceil(SHARD_COUNT) * SHARD_COUNT;
        assert!(
            limiter.tracked_clients() <= bound,
            "{}",
            limiter.tracked_clients()
        );
    }

    #[test]
    fn idle_clients_are_evicted_before_active_ones() {
        // Two clients per shard; burst 1 at 1/s, so a bucket is full again after 1s idle.
        let limiter = RateLimiter::new(1.0, 1, 2 * SHARD_COUNT).unwrap();
        let shard_of =
            |client: ClientId| (limiter.shard_hasher.hash_one(client) as usize) % SHARD_COUNT;
        let busy = ip(1);
        let same_shard: Vec<ClientId> = (2..=255)
            .map(ip)
            .filter(|client| shard_of(*client) == shard_of(busy))
            .take(2)
            .collect();
        assert_eq!(
            same_shard.len(),
            2,
            "255 addresses over 16 shards must collide"
        );
        let (idle, newcomer) = (same_shard[0], same_shard[1]);

        let start = Instant::now();
        assert!(limiter.try_acquire(idle, start).is_ok());
        let later = start + Duration::from_secs(2);
        // The busy client drains its bucket just before the newcomer arrives.
        assert!(limiter.try_acquire(busy, later).is_ok());
        assert!(limiter.try_acquire(newcomer, later).is_ok());
        // The idle client was forgotten, the busy one kept its empty bucket.
        let shard = limiter.shards[shard_of(busy)].lock().unwrap();
        assert!(!shard.contains_key(&idle));
        assert!(shard.contains_key(&busy));
        drop(shard);
        assert!(limiter.try_acquire(busy, later).is_err());
    }
}
