//! Windowed activity of one customer: sparse time buckets holding *running totals*, so that a
//! window's sum is two binary searches and a subtraction, whatever the number of buckets.
//!
//! This module owns how sliding-window counts and sums are stored and read. Only buckets with
//! activity are stored, in ascending order. Each holds the totals of every windowed event up
//! to and including its bucket (a prefix sum), so the sum over buckets `start..=end` is the
//! total at the last bucket `<= end` minus the total just before the first bucket
//! `>= start` (zero before the first). Pruning old buckets subtracts the total of the last
//! one dropped from the others, in the same pass that moves them to the front.
//!
//! Totals are integers and wrap (`u32` counts, `i64` spend in millionths): a difference of
//! two wrapped totals is exact as long as the window's own sum fits, so there is no rounding
//! drift however long a customer lives. Spend is therefore kept in millionths of the
//! currency unit (amounts are rounded to six decimals for windows; the lifetime spend is not).
//!
//! An event out of order (into an older bucket) adds to every later total: linear in the
//! buckets after it, as an insertion into the sorted vector already is.
//!
//! Pure: no I/O.

use crate::symbols::Sym;

/// Millionths of a currency unit per unit.
const MICROS: f64 = 1_000_000.0;

/// A purchase amount in millionths (rounded; saturating for absurd amounts).
pub fn to_micros(amount: f64) -> i64 {
    (amount * MICROS).round() as i64
}

pub fn from_micros(micros: i64) -> f64 {
    micros as f64 / MICROS
}

/// Bucket range of a window: buckets `start..=end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PurchaseTotal {
    bucket: u32,
    /// Purchases up to and including this bucket (wrapping).
    count: u32,
    /// Spend up to and including this bucket, millionths (wrapping).
    spend: i64,
}

/// Purchases per bucket (count and spend).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purchases {
    buckets: Vec<PurchaseTotal>,
}

impl Purchases {
    pub fn with_capacity(n: usize) -> Self {
        Purchases {
            buckets: Vec::with_capacity(n),
        }
    }

    /// Adds `count` purchases spending `spend` (millionths) to bucket `b`.
    pub fn add(&mut self, b: u32, count: u32, spend: i64) {
        let i = match self.buckets.last() {
            // In order: the newest bucket, or a new one after it.
            Some(last) if last.bucket == b => self.buckets.len() - 1,
            Some(last) if last.bucket < b => self.push_new(b),
            None => self.push_new(b),
            _ => match self.buckets.binary_search_by_key(&b, |x| x.bucket) {
                Ok(i) => i,
                Err(i) => {
                    let (c, s) = self.total_before(i);
                    self.buckets.insert(
                        i,
                        PurchaseTotal {
                            bucket: b,
                            count: c,
                            spend: s,
                        },
                    );
                    i
                }
            },
        };
        for x in &mut self.buckets[i..] {
            x.count = x.count.wrapping_add(count);
            x.spend = x.spend.wrapping_add(spend);
        }
    }

    fn push_new(&mut self, b: u32) -> usize {
        let (count, spend) = self.total_before(self.buckets.len());
        self.buckets.push(PurchaseTotal {
            bucket: b,
            count,
            spend,
        });
        self.buckets.len() - 1
    }

    /// Totals of the buckets before index `i`.
    fn total_before(&self, i: usize) -> (u32, i64) {
        match i.checked_sub(1) {
            Some(j) => (self.buckets[j].count, self.buckets[j].spend),
            None => (0, 0),
        }
    }

    /// Purchases (count, spend in millionths) in buckets `span`.
    pub fn sum(&self, span: Span) -> (u32, i64) {
        let lo = self.buckets.partition_point(|x| x.bucket < span.start);
        let hi = self.buckets.partition_point(|x| x.bucket <= span.end);
        if hi <= lo {
            return (0, 0);
        }
        let (c0, s0) = self.total_before(lo);
        let top = self.buckets[hi - 1];
        (top.count.wrapping_sub(c0), top.spend.wrapping_sub(s0))
    }

    /// Drops buckets before `horizon`.
    pub fn prune(&mut self, horizon: u32) {
        if self.buckets.first().is_none_or(|x| x.bucket >= horizon) {
            return;
        }
        let n = self.buckets.partition_point(|x| x.bucket < horizon);
        let (c, s) = self.total_before(n);
        self.buckets.drain(..n);
        for x in &mut self.buckets {
            x.count = x.count.wrapping_sub(c);
            x.spend = x.spend.wrapping_sub(s);
        }
    }

    /// `(bucket, count, spend in millionths)` of every bucket, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, i64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, x)| {
            let (c, s) = self.total_before(i);
            (x.bucket, x.count.wrapping_sub(c), x.spend.wrapping_sub(s))
        })
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn capacity_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<PurchaseTotal>()
    }

    /// See [`next_change`].
    pub fn next_change(&self, span: Span, window: u32, bucket_ms: i64) -> i64 {
        let lo = self.buckets.partition_point(|x| x.bucket < span.start);
        let hi = self.buckets.partition_point(|x| x.bucket <= span.end);
        next_change(
            self.buckets.get(lo).map(|x| x.bucket),
            self.buckets.get(hi).map(|x| x.bucket),
            span,
            window,
            bucket_ms,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EngagementTotal {
    bucket: u32,
    action: Sym,
    /// Engagements of every action up to and including this entry (wrapping).
    count: u32,
}

/// Engagements per (bucket, action), sorted by bucket then action symbol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Engagements {
    entries: Vec<EngagementTotal>,
}

impl Engagements {
    /// Builds from per-entry counts in any order (a changelog record).
    pub fn from_counts(mut counts: Vec<(u32, Sym, u32)>) -> Self {
        counts.sort_unstable_by_key(|&(b, a, _)| (b, a));
        let mut total = 0u32;
        let entries = counts
            .into_iter()
            .map(|(bucket, action, n)| {
                total = total.wrapping_add(n);
                EngagementTotal {
                    bucket,
                    action,
                    count: total,
                }
            })
            .collect();
        Engagements { entries }
    }

    /// Adds one engagement of `action` to bucket `b`.
    pub fn add(&mut self, b: u32, action: Sym) {
        let key = (b, action);
        let i = match self.entries.last() {
            Some(last) if (last.bucket, last.action) == key => self.entries.len() - 1,
            Some(last) if (last.bucket, last.action) < key => self.push_new(b, action),
            None => self.push_new(b, action),
            _ => match self
                .entries
                .binary_search_by_key(&key, |x| (x.bucket, x.action))
            {
                Ok(i) => i,
                Err(i) => {
                    let count = self.total_before(i);
                    self.entries.insert(
                        i,
                        EngagementTotal {
                            bucket: b,
                            action,
                            count,
                        },
                    );
                    i
                }
            },
        };
        for x in &mut self.entries[i..] {
            x.count = x.count.wrapping_add(1);
        }
    }

    fn push_new(&mut self, bucket: u32, action: Sym) -> usize {
        let count = self.total_before(self.entries.len());
        self.entries.push(EngagementTotal {
            bucket,
            action,
            count,
        });
        self.entries.len() - 1
    }

    fn total_before(&self, i: usize) -> u32 {
        i.checked_sub(1).map_or(0, |j| self.entries[j].count)
    }

    fn range(&self, span: Span) -> (usize, usize) {
        (
            self.entries.partition_point(|x| x.bucket < span.start),
            self.entries.partition_point(|x| x.bucket <= span.end),
        )
    }

    /// Engagements (of one action, or all) in buckets `span`. All actions: constant work;
    /// one action: linear in the entries inside the span.
    pub fn sum(&self, span: Span, action: Option<Sym>) -> u32 {
        let (lo, hi) = self.range(span);
        if hi <= lo {
            return 0;
        }
        match action {
            None => self.entries[hi - 1]
                .count
                .wrapping_sub(self.total_before(lo)),
            Some(a) => (lo..hi)
                .filter(|&i| self.entries[i].action == a)
                .map(|i| self.entries[i].count.wrapping_sub(self.total_before(i)))
                .fold(0u32, u32::wrapping_add),
        }
    }

    /// Drops entries before `horizon`.
    pub fn prune(&mut self, horizon: u32) {
        if self.entries.first().is_none_or(|x| x.bucket >= horizon) {
            return;
        }
        let n = self.entries.partition_point(|x| x.bucket < horizon);
        let c = self.total_before(n);
        self.entries.drain(..n);
        for x in &mut self.entries {
            x.count = x.count.wrapping_sub(c);
        }
    }

    /// `(bucket, action, count)` of every entry, sorted by bucket then action symbol.
    pub fn iter(&self) -> impl Iterator<Item = (u32, Sym, u32)> + '_ {
        self.entries.iter().enumerate().map(|(i, x)| {
            (
                x.bucket,
                x.action,
                x.count.wrapping_sub(self.total_before(i)),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<EngagementTotal>()
    }

    /// See [`next_change`]; for one action, linear in the entries from the span's start to
    /// that action's first entry.
    pub fn next_change(&self, span: Span, window: u32, bucket_ms: i64, action: Option<Sym>) -> i64 {
        let (lo, hi) = self.range(span);
        let first = |from: usize| {
            self.entries[from..]
                .iter()
                .find(|x| action.is_none_or(|a| a == x.action))
                .map(|x| x.bucket)
        };
        let inside = first(lo).filter(|b| *b <= span.end);
        next_change(inside, first(hi), span, window, bucket_ms)
    }
}

/// The first instant after the window's `span` at which a bucket holding data leaves it (the
/// oldest bucket `b` inside, at `(b + window) * bucket_ms`) or enters it (the first bucket
/// after the span, at its start); `NEVER` if none will. `first` is the first bucket at or
/// after the span's start, `after` the first one after its end.
fn next_change(
    first: Option<u32>,
    after: Option<u32>,
    span: Span,
    window: u32,
    bucket_ms: i64,
) -> i64 {
    let never = crate::state::NEVER;
    if bucket_ms <= 0 {
        return never;
    }
    let leaves = first
        .filter(|b| *b <= span.end)
        .map_or(never, |b| (b as i64 + window as i64) * bucket_ms);
    let enters = after.map_or(never, |b| b as i64 * bucket_ms);
    leaves.min(enters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn span(start: u32, end: u32) -> Span {
        Span { start, end }
    }

    #[test]
    fn sums_after_out_of_order_adds_and_prunes() {
        let mut p = Purchases::default();
        p.add(10, 1, 5_000_000);
        p.add(12, 1, 1_000_000);
        p.add(11, 2, 250_000); // out of order
        p.add(12, 1, 1);
        assert_eq!(p.sum(span(0, 100)), (5, 6_250_001));
        assert_eq!(p.sum(span(11, 11)), (2, 250_000));
        assert_eq!(p.sum(span(11, 12)), (4, 1_250_001));
        assert_eq!(p.sum(span(13, 20)), (0, 0));
        p.prune(11);
        assert_eq!(p.len(), 2);
        assert_eq!(p.sum(span(0, 100)), (4, 1_250_001));
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![(11, 2, 250_000), (12, 2, 1_000_001)]
        );
        // An add before the first kept bucket (no window reaches it in practice) still sums.
        p.add(5, 1, 7);
        assert_eq!(p.sum(span(0, 100)), (5, 1_250_008));
    }

    #[test]
    fn next_change_leaves_and_enters() {
        let mut e = Engagements::default();
        e.add(10, 1);
        e.add(12, 2);
        e.add(20, 1);
        // Window of 5 buckets ending at 13: buckets 9..=13; bucket 10 leaves at 15, bucket 20
        // enters at 20.
        assert_eq!(e.next_change(span(9, 13), 5, 100, None), 1500);
        assert_eq!(e.next_change(span(9, 13), 5, 100, Some(2)), 1700);
        assert_eq!(
            e.next_change(span(13, 13), 5, 100, Some(2)),
            crate::state::NEVER
        );
        assert_eq!(e.next_change(span(11, 13), 5, 100, Some(1)), 2000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u32, u8, u32, i64),
        Prune(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..40, 0u8..3, 1u32..4, -5_000_000i64..5_000_000).prop_map(|(b, a, c, s)| Op::Add(b, a, c, s)),
            1 => (0u32..40).prop_map(Op::Prune),
        ]
    }

    proptest! {
        /// Against a plain list of what was added and not pruned: sums over every span, the
        /// next change of every window, and the per-bucket view.
        #[test]
        fn matches_a_plain_list(ops in proptest::collection::vec(op(), 1..60)) {
            let mut p = Purchases::default();
            let mut e = Engagements::default();
            let mut plain: Vec<(u32, Sym, u32, i64)> = Vec::new();
            let mut horizon = 0u32;
            for o in &ops {
                match *o {
                    Op::Add(b, a, c, s) => {
                        p.add(b, c, s);
                        for _ in 0..c {
                            e.add(b, a as Sym);
                        }
                        plain.push((b, a as Sym, c, s));
                    }
                    Op::Prune(h) => horizon = horizon.max(h),
                }
                // Like the state, which prunes after every update.
                p.prune(horizon);
                e.prune(horizon);
                plain.retain(|x| x.0 >= horizon);
            }
            for start in 0..42u32 {
                for end in start..42u32 {
                    let sp = span(start, end);
                    let inside = plain.iter().filter(|x| x.0 >= start && x.0 <= end);
                    let want = inside.clone().fold((0u32, 0i64), |(n, s), x| (n + x.2, s + x.3));
                    prop_assert_eq!(p.sum(sp), want);
                    for a in [None, Some(0), Some(1), Some(2)] {
                        let n: u32 = inside.clone().filter(|x| a.is_none_or(|a| a == x.1)).map(|x| x.2).sum();
                        prop_assert_eq!(e.sum(sp, a), n);
                        let w = end - start + 1;
                        let of = |x: &&(u32, Sym, u32, i64)| a.is_none_or(|a| a == x.1);
                        let leaves = plain.iter().filter(of).filter(|x| x.0 >= start && x.0 <= end).map(|x| (x.0 + w) as i64 * 10).min();
                        let enters = plain.iter().filter(of).filter(|x| x.0 > end).map(|x| x.0 as i64 * 10).min();
                        let want = leaves.unwrap_or(i64::MAX).min(enters.unwrap_or(i64::MAX));
                        prop_assert_eq!(e.next_change(sp, w, 10, a), want);
                        if a.is_none() {
                            prop_assert_eq!(p.next_change(sp, w, 10), want);
                        }
                    }
                }
            }
            let mut per_bucket: Vec<(u32, u32, i64)> = Vec::new();
            let mut sorted = plain.clone();
            sorted.sort_by_key(|x| x.0);
            for x in &sorted {
                match per_bucket.last_mut() {
                    Some(l) if l.0 == x.0 => { l.1 += x.2; l.2 += x.3; }
                    _ => per_bucket.push((x.0, x.2, x.3)),
                }
            }
            prop_assert_eq!(p.iter().collect::<Vec<_>>(), per_bucket);
            let rebuilt = Engagements::from_counts(e.iter().collect());
            prop_assert!(rebuilt == e);
        }
    }
}
