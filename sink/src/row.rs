//! The stored row and its version.

use uuid::Uuid;

/// One row of `window_sums`: the sum of one key's increments in one window, as
/// counted from one Kafka partition. ScyllaDB: `PRIMARY KEY ((key, bucket),
/// window_start, partition)` ([`bucket_of`]); SQLite: `PRIMARY KEY (window_start, key,
/// partition)` with an index on `(key, window_start, partition)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowRow {
    pub key: Uuid,
    /// Inclusive window start, ms since the Unix epoch.
    pub window_start_ms: i64,
    /// Exclusive window end, ms since the Unix epoch.
    pub window_end_ms: i64,
    pub partition: i32,
    pub sum: i64,
    pub count: i64,
    /// True once the partition's watermark passed the window end: the sum is complete.
    pub is_final: bool,
    /// The partition offset through which the engine had read when it produced the row.
    pub through_offset: i64,
    /// Replay generation that produced the row.
    pub generation: u16,
}

/// Bits of the version given to `through_offset` (offsets up to 2^46 ≈ 7·10^13).
const OFFSET_BITS: u32 = 46;
const OFFSET_MASK: i64 = (1 << OFFSET_BITS) - 1;

impl WindowRow {
    /// The row's completeness version, ordered by (generation, through_offset, final).
    ///
    /// Layout (63 bits, always ≥ 0): generation in bits 47..62, through_offset in bits
    /// 1..46, final in bit 0. ScyllaDB uses it as the write timestamp and SQLite
    /// guards its upsert with it, so a less complete row can never replace a more
    /// complete one, in whatever order writes arrive.
    pub fn version(&self) -> i64 {
        version_of(self.generation, self.through_offset, self.is_final)
    }
}

/// See [`WindowRow::version`]. Offsets beyond 2^46 are clamped (never reached in
/// practice; clamping keeps the order monotone rather than wrapping).
pub fn version_of(generation: u16, through_offset: i64, is_final: bool) -> i64 {
    let offset = through_offset.clamp(0, OFFSET_MASK);
    (i64::from(generation) << (OFFSET_BITS + 1)) | (offset << 1) | i64::from(is_final)
}

/// The ScyllaDB partition bucket of a window: its start rounded down to a multiple of
/// `bucket_ms` (a day by default), so one key's windows of one bucket share a
/// partition and a range read is one query per bucket touched.
pub fn bucket_of(window_start_ms: i64, bucket_ms: i64) -> i64 {
    let bucket_ms = bucket_ms.max(1);
    window_start_ms.div_euclid(bucket_ms) * bucket_ms
}

/// Whether a row of a window that ended at `window_end_ms` is past a retention of
/// `retention_ms` at `now_ms` (event time: the window's end, never the write time, so
/// a replay cannot extend it). Such rows are gone, or about to be, from every backend.
pub fn is_expired(window_end_ms: i64, retention_ms: i64, now_ms: i64) -> bool {
    window_end_ms.saturating_add(retention_ms) <= now_ms
}

/// The answer to a read: one window of one key, summed over its partition rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowTotal {
    pub key: Uuid,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub sum: i64,
    pub count: i64,
    /// True only if every partition row of the window is final.
    pub is_final: bool,
}

impl WindowTotal {
    /// Sums partition rows (any order) into one total per window, ordered by start.
    pub fn from_rows(rows: &[WindowRow]) -> Vec<WindowTotal> {
        let mut totals: std::collections::BTreeMap<(i64, Uuid), WindowTotal> =
            std::collections::BTreeMap::new();
        for row in rows {
            let total = totals
                .entry((row.window_start_ms, row.key))
                .or_insert(WindowTotal {
                    key: row.key,
                    window_start_ms: row.window_start_ms,
                    window_end_ms: row.window_end_ms,
                    sum: 0,
                    count: 0,
                    is_final: true,
                });
            total.sum = total.sum.saturating_add(row.sum);
            total.count = total.count.saturating_add(row.count);
            total.is_final &= row.is_final;
        }
        totals.into_values().collect()
    }
}

/// Totals over a range of windows: what a read answers besides the windows themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeTotal {
    pub sum: i64,
    pub count: i64,
    /// Windows with at least one row in the range.
    pub windows: u64,
    /// True if every window of the range is final (also when there is none).
    pub all_final: bool,
}

impl Default for RangeTotal {
    fn default() -> Self {
        RangeTotal {
            sum: 0,
            count: 0,
            windows: 0,
            all_final: true,
        }
    }
}

impl RangeTotal {
    /// Adds one window (saturating, like the per-window totals).
    pub fn add(&mut self, window: &WindowTotal) {
        self.sum = self.sum.saturating_add(window.sum);
        self.count = self.count.saturating_add(window.count);
        self.windows += 1;
        self.all_final &= window.is_final;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_orders_by_generation_then_offset_then_final() {
        let cases = [
            (0u16, 0i64, false),
            (0, 0, true),
            (0, 1, false),
            (0, 1, true),
            (0, OFFSET_MASK, false),
            (0, OFFSET_MASK, true),
            (1, 0, false),
            (1, 5, true),
            (u16::MAX, 0, false),
            (u16::MAX, OFFSET_MASK, true),
        ];
        for pair in cases.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                version_of(a.0, a.1, a.2) < version_of(b.0, b.1, b.2),
                "{a:?} should be below {b:?}"
            );
        }
        assert!(version_of(u16::MAX, OFFSET_MASK, true) > 0);
        assert!(version_of(0, 0, false) >= 0);
    }

    #[test]
    fn totals_sum_partition_rows() {
        let key = Uuid::from_u128(7);
        let row = |partition, sum, is_final| WindowRow {
            key,
            window_start_ms: 10_000,
            window_end_ms: 20_000,
            partition,
            sum,
            count: 1,
            is_final,
            through_offset: 0,
            generation: 0,
        };
        let totals = WindowTotal::from_rows(&[row(0, 5, true), row(3, 7, false)]);
        assert_eq!(totals.len(), 1);
        assert_eq!(totals[0].sum, 12);
        assert_eq!(totals[0].count, 2);
        assert!(!totals[0].is_final);
    }

    #[test]
    fn buckets_are_aligned_and_contain_the_window() {
        const DAY: i64 = 86_400_000;
        assert_eq!(bucket_of(0, DAY), 0);
        assert_eq!(bucket_of(DAY - 1, DAY), 0);
        assert_eq!(bucket_of(DAY, DAY), DAY);
        assert_eq!(bucket_of(-1, DAY), -DAY);
        for start in [1_790_000_000_000i64, 1_790_000_123_456, -5] {
            let bucket = bucket_of(start, DAY);
            assert!(bucket <= start && start < bucket + DAY);
            assert_eq!(bucket.rem_euclid(DAY), 0);
        }
    }

    #[test]
    fn expiry_counts_from_the_window_end() {
        assert!(!is_expired(1_000, 500, 1_499));
        assert!(is_expired(1_000, 500, 1_500));
        assert!(!is_expired(i64::MAX - 1, i64::MAX, i64::MAX - 1));
    }

    #[test]
    fn range_totals_add_windows() {
        let window = |sum, is_final| WindowTotal {
            key: Uuid::nil(),
            window_start_ms: 0,
            window_end_ms: 10,
            sum,
            count: 1,
            is_final,
        };
        let mut total = RangeTotal::default();
        assert!(total.all_final);
        total.add(&window(5, true));
        total.add(&window(i64::MAX, true));
        assert_eq!((total.sum, total.count, total.windows), (i64::MAX, 2, 2));
        assert!(total.all_final);
        total.add(&window(1, false));
        assert!(!total.all_final);
    }
}
