//! The stored row and its version.

use uuid::Uuid;

/// One row of `window_sums`: the sum of one key's increments in one window, as
/// counted from one Kafka partition. `PRIMARY KEY ((key, window_start), partition)`.
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
}
