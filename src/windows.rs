//! Windowed activity of one customer: sparse time buckets holding *running totals*, so that a
//! window's sum is two binary searches and a subtraction, whatever the number of buckets.
//!
//! This module owns what the sliding-window entries hold and how they are read and updated.
//! They are stored in a customer's [`crate::activity::Activity`] (one buffer with the lifetime
//! counts), which calls the functions here around its own insertions and removals. Only
//! buckets with activity are stored, in ascending order. Each holds the totals of every
//! windowed event up to and including its bucket (a prefix sum), so the sum over buckets
//! `start..=end` is the total at the last bucket `<= end` minus the total just before the
//! first bucket `>= start` (zero before the first). Pruning old buckets subtracts the total of the last
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

/// How [`Purchases::first_change`] and [`Engagements::first_change`] may walk the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Entry by entry: any `differs`.
    Linear,
    /// `differs` reads a value that only falls as entries leave the window (a count, or a
    /// spend with no refund among the entries) and, as it falls, turns true at most once (an
    /// inequality against a constant, `< k`, `>= k`…, or `== k` / `!= k` with the count at
    /// or below `k`): with no entry left to enter the window, the walk can be a search (see
    /// `Totals::first_change`).
    Monotone,
}

/// A running total: added and subtracted with wrapping, so differences are exact.
pub(crate) trait Total: Copy + Default {
    fn plus(self, o: Self) -> Self;
    fn minus(self, o: Self) -> Self;
}

impl Total for u32 {
    fn plus(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn minus(self, o: Self) -> Self {
        self.wrapping_sub(o)
    }
}

/// Purchases and spend (millionths).
impl Total for (u32, i64) {
    fn plus(self, o: Self) -> Self {
        (self.0.wrapping_add(o.0), self.1.wrapping_add(o.1))
    }
    fn minus(self, o: Self) -> Self {
        (self.0.wrapping_sub(o.0), self.1.wrapping_sub(o.1))
    }
}

/// A fixed number of `u32` words, read as typed slices of a word buffer.
pub(crate) trait Words: Copy {
    /// `u32` words per value.
    const WORDS: usize;
    /// The values in `words` (a whole number of them).
    fn cast(words: &[u32]) -> &[Self];
    fn cast_mut(words: &mut [u32]) -> &mut [Self];
    fn words(&self) -> &[u32];
}

impl<const N: usize> Words for [u32; N] {
    const WORDS: usize = N;
    fn cast(words: &[u32]) -> &[Self] {
        words.as_chunks().0
    }
    fn cast_mut(words: &mut [u32]) -> &mut [Self] {
        words.as_chunks_mut().0
    }
    fn words(&self) -> &[u32] {
        self
    }
}

/// One stored entry, as `u32` words of a customer's [`crate::activity::Activity`]: its key
/// (ordered, bucket first) and the total up to and including it. Words rather than a struct so
/// that every part of the activity shares one buffer without `unsafe` casts.
pub(crate) trait Entry: Words {
    type Key: Ord + Copy;
    type Total: Total;
    fn new(key: Self::Key, total: Self::Total) -> Self;
    fn key(&self) -> Self::Key;
    fn bucket(&self) -> u32;
    fn total(&self) -> Self::Total;
    fn set_total(&mut self, t: Self::Total);
}

/// Entries sorted by key, each holding the running total up to it (the module docs): the
/// reads. Changes go through [`locate`], [`add_from`], [`prune_point`] and [`rebase`], which
/// the owner of the buffer calls around its own insertions and removals.
#[derive(Debug, Clone, Copy)]
struct Totals<'a, E>(&'a [E]);

/// Where adding at `key` goes: the index of its entry, and the entry to insert at that index
/// first when there is none yet (its total the one before it, so [`add_from`] can add).
pub(crate) fn locate<E: Entry>(e: &[E], key: E::Key) -> (usize, Option<E>) {
    let i = match e.last() {
        // In order: the newest entry, or a new one after it.
        Some(last) if last.key() == key => return (e.len() - 1, None),
        Some(last) if last.key() < key => e.len(),
        None => 0,
        _ => match e.binary_search_by_key(&key, |x| x.key()) {
            Ok(i) => return (i, None),
            Err(i) => i,
        },
    };
    (i, Some(E::new(key, Totals(e).total_before(i))))
}

/// Adds `v` to the running totals from index `i` on.
pub(crate) fn add_from<E: Entry>(e: &mut [E], i: usize, v: E::Total) {
    for x in &mut e[i..] {
        x.set_total(x.total().plus(v));
    }
}

/// How many entries lie before bucket `horizon`, and the total they hold.
pub(crate) fn prune_point<E: Entry>(e: &[E], horizon: u32) -> (usize, E::Total) {
    if e.first().is_none_or(|x| x.bucket() >= horizon) {
        return (0, Default::default());
    }
    let n = e.partition_point(|x| x.bucket() < horizon);
    (n, Totals(e).total_before(n))
}

/// Subtracts `t` (what the dropped entries held) from every running total.
pub(crate) fn rebase<E: Entry>(e: &mut [E], t: E::Total) {
    for x in e {
        x.set_total(x.total().minus(t));
    }
}

impl<'a, E: Entry> Totals<'a, E> {
    /// The total of the entries before index `i`.
    fn total_before(&self, i: usize) -> E::Total {
        i.checked_sub(1)
            .map_or_else(Default::default, |j| self.0[j].total())
    }

    /// The entries in buckets `span`: `lo..hi`.
    fn range(&self, span: Span) -> (usize, usize) {
        // A window read at `now` mostly ends at or after the newest entry: no search for it.
        let hi = match self.0.last() {
            Some(last) if last.bucket() <= span.end => self.0.len(),
            _ => self.0.partition_point(|x| x.bucket() <= span.end),
        };
        (
            self.0[..hi].partition_point(|x| x.bucket() < span.start),
            hi,
        )
    }

    fn sum(&self, span: Span) -> E::Total {
        let (lo, hi) = self.range(span);
        if hi <= lo {
            return Default::default();
        }
        self.0[hi - 1].total().minus(self.total_before(lo))
    }

    /// The entry at index `i`'s own value.
    fn own(&self, i: usize) -> E::Total {
        self.0[i].total().minus(self.total_before(i))
    }

    /// Walks the window forward in time from `span` (value `initial()`, computed only by the
    /// walk: the search below does without it) with no new data: at every instant an entry
    /// leaves the window (bucket `b` at `(b + window) * bucket_ms`) or enters it (an entry
    /// after the span, at its bucket's start), updates the value with the entries `counts`
    /// selects, and returns the first such instant at which `differs(value)` holds; `NEVER` if
    /// none. Linear in the entries, constant work per entry.
    ///
    /// `counts` selects the entries that make the value (None: all of them).
    ///
    /// With [`Walk::Monotone`] (the caller's promise: once `differs` holds at an instant at
    /// which entries only left, it holds at every later one, as an inequality on a count
    /// does) and no entry after the span to enter, the walk is a search instead: binary over
    /// the running totals when every entry counts (logarithmic), otherwise back from the
    /// newest entry, which stops as soon as the entries still inside hold enough (for
    /// `>= k`, about `k` selected entries).
    #[allow(clippy::too_many_arguments)]
    fn first_change(
        &self,
        span: Span,
        window: u32,
        bucket_ms: i64,
        initial: impl FnOnce() -> E::Total,
        walk: Walk,
        counts: Option<impl Fn(&E) -> bool>,
        mut differs: impl FnMut(E::Total) -> bool,
    ) -> i64 {
        let never = crate::state::NEVER;
        if bucket_ms <= 0 {
            return never;
        }
        let e = &self.0;
        let leaves = |i: usize| (e[i].bucket() as i64 + window as i64) * bucket_ms;
        let enters = |i: usize| e[i].bucket() as i64 * bucket_ms;
        let (mut lo, mut hi) = self.range(span);
        if walk == Walk::Monotone && hi == e.len() {
            // The value once the entries before index `j` have left; `differs` of it turns
            // true at most once as `j` grows. The first `j` at which it is true: the entry
            // `j - 1` leaving (with any others of its bucket) makes the difference.
            let first = match &counts {
                None => {
                    let end = self.total_before(hi);
                    let (mut a, mut b) = (lo + 1, hi + 1);
                    while a < b {
                        let j = a + (b - a) / 2;
                        if differs(end.minus(self.total_before(j))) {
                            b = j;
                        } else {
                            a = j + 1;
                        }
                    }
                    a
                }
                Some(counts) => {
                    // Back from `j = hi + 1`, `v` being the value once `j - 1` entries have
                    // left (the entries `j - 1..hi`, none at first): while it differs, so
                    // does every later one, and `j` steps back.
                    let mut v = E::Total::default();
                    let mut j = hi + 1;
                    while j > lo + 1 && differs(v) {
                        j -= 1;
                        if counts(&e[j - 1]) {
                            v = v.plus(self.own(j - 1));
                        }
                    }
                    j
                }
            };
            return if first <= hi {
                leaves(first - 1)
            } else {
                never
            };
        }
        let counts = |x: &E| counts.as_ref().is_none_or(|f| f(x));
        let mut v = initial();
        loop {
            let next_leave = if lo < hi { leaves(lo) } else { never };
            let next_enter = e.get(hi).map_or(never, |_| enters(hi));
            let t = next_leave.min(next_enter);
            if t == never {
                return never;
            }
            while lo < hi && leaves(lo) <= t {
                if counts(&e[lo]) {
                    v = v.minus(self.own(lo));
                }
                lo += 1;
            }
            while hi < e.len() && enters(hi) <= t {
                if counts(&e[hi]) {
                    v = v.plus(self.own(hi));
                }
                hi += 1;
            }
            if differs(v) {
                return t;
            }
        }
    }

    /// `(key, own value)` of every entry, in order.
    fn iter(self) -> impl Iterator<Item = (E::Key, E::Total)> + 'a {
        (0..self.0.len()).map(move |i| (self.0[i].key(), self.own(i)))
    }
}

/// A purchase entry: `[bucket, count, spend low, spend high]`, the count and spend
/// (millionths, an `i64` in two words) up to and including the bucket (wrapping).
pub(crate) type PurchaseTotal = [u32; 4];

impl Entry for PurchaseTotal {
    type Key = u32;
    type Total = (u32, i64);
    fn new(bucket: u32, (count, spend): (u32, i64)) -> Self {
        [bucket, count, spend as u32, (spend >> 32) as u32]
    }
    fn key(&self) -> u32 {
        self[0]
    }
    fn bucket(&self) -> u32 {
        self[0]
    }
    fn total(&self) -> (u32, i64) {
        (self[1], (self[2] as u64 | (self[3] as u64) << 32) as i64)
    }
    fn set_total(&mut self, t: (u32, i64)) {
        *self = Self::new(self[0], t);
    }
}

/// Purchases per bucket (count and spend), read from a customer's activity.
#[derive(Debug, Clone, Copy)]
pub struct Purchases<'a>(Totals<'a, PurchaseTotal>);

/// Every purchase entry counts.
const NONE: Option<fn(&PurchaseTotal) -> bool> = None;

impl<'a> Purchases<'a> {
    pub(crate) fn new(entries: &'a [PurchaseTotal]) -> Self {
        Purchases(Totals(entries))
    }

    /// Purchases (count, spend in millionths) in buckets `span`.
    pub fn sum(&self, span: Span) -> (u32, i64) {
        self.0.sum(span)
    }

    /// `(bucket, count, spend in millionths)` of every bucket, ascending.
    pub fn iter(self) -> impl Iterator<Item = (u32, u32, i64)> + 'a {
        self.0.iter().map(|(b, (c, s))| (b, c, s))
    }

    pub fn len(&self) -> usize {
        self.0 .0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0 .0.is_empty()
    }

    /// The first instant after the window's `span` at which, with no new purchase,
    /// `differs(count, spend in millionths)` holds for the window's sums (`NEVER`: none).
    /// Linear in the buckets, constant work per bucket; logarithmic with [`Walk::Monotone`]
    /// (`differs` then reads the count, or the spend when no bucket holds a refund: see
    /// [`crate::activity::Activity::may_have_refunds`]).
    pub fn first_change(
        &self,
        span: Span,
        window: u32,
        bucket_ms: i64,
        walk: Walk,
        mut differs: impl FnMut(u32, i64) -> bool,
    ) -> i64 {
        let initial = || self.sum(span);
        let differs = |(count, spend)| differs(count, spend);
        self.0
            .first_change(span, window, bucket_ms, initial, walk, NONE, differs)
    }

    /// The first instant after the window's `span` at which a bucket holding data leaves it
    /// or enters it (`NEVER`: none will).
    pub fn next_change(&self, span: Span, window: u32, bucket_ms: i64) -> i64 {
        let (lo, hi) = self.0.range(span);
        let bucket = |i: usize| self.0 .0.get(i).map(|x| x.bucket());
        next_change(bucket(lo), bucket(hi), span, window, bucket_ms)
    }
}

/// An engagement entry: `[bucket, action, count]`, the count of every action's engagements up
/// to and including the entry (wrapping). Entries are sorted by bucket, then action symbol.
pub(crate) type EngagementTotal = [u32; 3];

impl Entry for EngagementTotal {
    type Key = (u32, Sym);
    type Total = u32;
    fn new((bucket, action): (u32, Sym), count: u32) -> Self {
        [bucket, action, count]
    }
    fn key(&self) -> (u32, Sym) {
        (self[0], self[1])
    }
    fn bucket(&self) -> u32 {
        self[0]
    }
    fn total(&self) -> u32 {
        self[2]
    }
    fn set_total(&mut self, count: u32) {
        self[2] = count;
    }
}

/// Engagements per (bucket, action), read from a customer's activity.
#[derive(Debug, Clone, Copy)]
pub struct Engagements<'a>(Totals<'a, EngagementTotal>);

impl<'a> Engagements<'a> {
    pub(crate) fn new(entries: &'a [EngagementTotal]) -> Self {
        Engagements(Totals(entries))
    }

    /// Engagements (of one action, or all) in buckets `span`. All actions: constant work;
    /// one action: linear in the entries inside the span.
    pub fn sum(&self, span: Span, action: Option<Sym>) -> u32 {
        let Some(a) = action else {
            return self.0.sum(span);
        };
        let (lo, hi) = self.0.range(span);
        (lo..hi)
            .filter(|&i| self.0 .0[i][1] == a)
            .map(|i| self.0.own(i))
            .fold(0u32, u32::wrapping_add)
    }

    /// Whether buckets `span` hold at least `k` engagements of `action`: counted back from
    /// the newest entry, stopping once `k` are found (a comparison of `action_count(a, w)`
    /// with a number needs no more than that; the whole count is linear in the entries).
    pub fn at_least(&self, span: Span, action: Sym, k: u32) -> bool {
        if k == 0 {
            return true;
        }
        let (lo, hi) = self.0.range(span);
        let mut n = 0u32;
        for i in (lo..hi).rev() {
            if self.0 .0[i][1] == action {
                n = n.wrapping_add(self.0.own(i));
                if n >= k {
                    return true;
                }
            }
        }
        false
    }

    /// `(bucket, action, count)` of every entry, sorted by bucket then action symbol.
    pub fn iter(self) -> impl Iterator<Item = (u32, Sym, u32)> + 'a {
        self.0.iter().map(|((b, a), n)| (b, a, n))
    }

    pub fn len(&self) -> usize {
        self.0 .0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0 .0.is_empty()
    }

    /// Like [`Purchases::first_change`], for the engagements (of one action, or all) in
    /// the window.
    pub fn first_change(
        &self,
        span: Span,
        window: u32,
        bucket_ms: i64,
        action: Option<Sym>,
        walk: Walk,
        differs: impl FnMut(u32) -> bool,
    ) -> i64 {
        let initial = || self.sum(span, action);
        let counts = action.map(|a| move |x: &EngagementTotal| a == x[1]);
        self.0
            .first_change(span, window, bucket_ms, initial, walk, counts, differs)
    }

    /// Like [`Purchases::next_change`], for the engagements (of one action, or all); for one
    /// action, linear in the entries from the span's start to that action's first entry.
    pub fn next_change(&self, span: Span, window: u32, bucket_ms: i64, action: Option<Sym>) -> i64 {
        let (lo, hi) = self.0.range(span);
        let first = |from: usize| {
            self.0 .0[from..]
                .iter()
                .find(|x| action.is_none_or(|a| a == x[1]))
                .map(|x| x.bucket())
        };
        next_change(first(lo), first(hi), span, window, bucket_ms)
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
    use crate::activity::Activity;
    use proptest::prelude::*;

    fn span(start: u32, end: u32) -> Span {
        Span { start, end }
    }

    #[test]
    fn sums_after_out_of_order_adds_and_prunes() {
        let mut a = Activity::default();
        a.add_purchase(10, 1, 5_000_000);
        a.add_purchase(12, 1, 1_000_000);
        a.add_purchase(11, 2, 250_000); // out of order
        a.add_purchase(12, 1, 1);
        let p = a.purchases();
        assert_eq!(p.sum(span(0, 100)), (5, 6_250_001));
        assert_eq!(p.sum(span(11, 11)), (2, 250_000));
        assert_eq!(p.sum(span(11, 12)), (4, 1_250_001));
        assert_eq!(p.sum(span(13, 20)), (0, 0));
        a.prune(11);
        let p = a.purchases();
        assert_eq!(p.len(), 2);
        assert_eq!(p.sum(span(0, 100)), (4, 1_250_001));
        assert_eq!(
            p.iter().collect::<Vec<_>>(),
            vec![(11, 2, 250_000), (12, 2, 1_000_001)]
        );
        // An add before the first kept bucket (no window reaches it in practice) still sums.
        a.add_purchase(5, 1, 7);
        assert_eq!(a.purchases().sum(span(0, 100)), (5, 1_250_008));
    }

    #[test]
    fn next_change_leaves_and_enters() {
        let mut a = Activity::default();
        a.add_engagement(10, 1);
        a.add_engagement(12, 2);
        a.add_engagement(20, 1);
        let e = a.engagements();
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
        /// next change of every window, the first instant it crosses a threshold, and the
        /// per-bucket view.
        #[test]
        fn matches_a_plain_list(ops in proptest::collection::vec(op(), 1..60)) {
            let mut act = Activity::default();
            let mut plain: Vec<(u32, Sym, u32, i64)> = Vec::new();
            let mut horizon = 0u32;
            for o in &ops {
                match *o {
                    Op::Add(b, a, c, s) => {
                        act.add_purchase(b, c, s);
                        for _ in 0..c {
                            act.add_engagement(b, a as Sym);
                        }
                        plain.push((b, a as Sym, c, s));
                    }
                    Op::Prune(h) => horizon = horizon.max(h),
                }
                // Like the state, which prunes after every update.
                act.prune(horizon);
                plain.retain(|x| x.0 >= horizon);
            }
            let (p, e) = (act.purchases(), act.engagements());
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
                        // The first instant (bucket K at K * 10, window K-w+1..=K) at which the
                        // window's value crosses a threshold, by brute force: every bucket has
                        // left by K = end + w + 40.
                        let at = |k: u32| {
                            let s = k + 1 - w;
                            plain.iter().filter(of).filter(|x| x.0 >= s && x.0 <= k)
                                .fold((0u32, 0i64), |(n, m), x| (n + x.2, m + x.3))
                        };
                        let first = |pred: &dyn Fn((u32, i64)) -> bool| {
                            let initial = pred(at(end));
                            let t = (end + 1..=end + w + 40).find(|&k| pred(at(k)) != initial);
                            (t.map_or(i64::MAX, |k| k as i64 * 10), initial)
                        };
                        for limit in [1u32, 2, 4, 9] {
                            // A count against a limit: walked, or searched when nothing enters.
                            let (want, initial) = first(&|v| v.0 < limit);
                            for walk in [Walk::Linear, Walk::Monotone] {
                                prop_assert_eq!(e.first_change(sp, w, 10, a, walk, |n| (n < limit) != initial), want, "{:?}", walk);
                                if a.is_none() {
                                    prop_assert_eq!(p.first_change(sp, w, 10, walk, |n, _| (n < limit) != initial), want, "{:?}", walk);
                                }
                            }
                            if a.is_none() {
                                let cap = limit as i64 * 500_000;
                                let (want, initial) = first(&|v| v.1 < cap);
                                prop_assert_eq!(p.first_change(sp, w, 10, Walk::Linear, |_, m| (m < cap) != initial), want);
                            }
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
        }
    }
}
