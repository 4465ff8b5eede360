//! A customer's activity in one allocation: lifetime counts per category, channel and action,
//! and the purchase and engagement buckets of the windows. Pure: no I/O.
//!
//! This module owns how those four variable-length lists, the hashes of the customer's
//! most recent event ids (for duplicate detection) and the words of the profile attributes
//! (packed by [`crate::state::Attrs`]) share one buffer of `u32` words:
//!
//! ```text
//! [attributes…][counts: lengths, categories…, channels…, actions…][purchases…][engagements…][recent ids…]
//! ```
//!
//! Every event touches at least one of them, and a changelog record reads all of them. One
//! buffer instead of three vectors saves about 90 bytes per customer (one vector header
//! instead of three, and less rounding to the allocator's size classes), and a restore builds
//! it in one allocation (BENCHMARKS.md, ninth session). The buffer grows to the allocator's
//! size class of what an insertion needs ([`crate::alloc::good_size`]): no spare room beyond
//! what the allocator gives anyway, and no call to it while the next entries fit.
//!
//! [`crate::windows`] owns what the bucket entries mean (running totals) and how they are
//! read; this module only inserts and removes their words.

use std::ops::Range;

use crate::symbols::Sym;
use crate::windows::{self, EngagementTotal, Engagements, Entry, PurchaseTotal, Purchases, Words};

/// Which list of lifetime counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountKind {
    Category = 0,
    Channel = 1,
    Action = 2,
}

impl CountKind {
    pub const ALL: [CountKind; 3] = [CountKind::Category, CountKind::Channel, CountKind::Action];
}

/// A lifetime count: `[symbol, count]`.
pub type Count = [u32; 2];

/// The parts of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Attrs,
    Counts,
    Purchases,
    Engagements,
    Recent,
}

/// A recent event id hash: `[low, high]`.
pub type RecentId = [u32; 2];

fn split(h: u64) -> RecentId {
    [h as u32, (h >> 32) as u32]
}

/// The hash a [`RecentId`] holds.
pub fn join(x: &RecentId) -> u64 {
    x[0] as u64 | (x[1] as u64) << 32
}

/// Counts per category / channel / action (each list in order of first occurrence), then
/// purchase and engagement entries (sorted, see [`crate::windows`]), then recent event id
/// hashes (in the order the owner keeps them: [`crate::engine::Customer`] keeps a ring), in one
/// buffer. The counts start with one `[categories, channels]` pair holding the lengths of the
/// first two lists, and are absent altogether (no words) for a customer with none. The recent
/// ids grow one at a time up to the owner's limit, so a customer seen once keeps one.
///
/// Equality compares the counts and the buckets, not the recent ids: a ring's rotation is its
/// owner's business, and the owner compares the ids in order.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// The words: the first `len` are used, the rest is room for insertions. A boxed slice
    /// and a 32-bit length beside the other fields instead of a vector (a 64-bit length and
    /// capacity): 8 bytes fewer per customer.
    buf: Box<[u32]>,
    /// Words used.
    len: u32,
    /// Words of the counts, their lengths included.
    counts: u32,
    /// Words of the purchase entries (the low 31 bits), and [`REFUNDS`].
    purchases: u32,
    /// Words of the recent ids, at the end; the engagement entries take what is between.
    recent: u16,
    /// Words of the attributes, at the start.
    attrs: u16,
}

/// The bit of `Activity::purchases` that says whether a purchase entry may have a negative
/// spend of its own (a refund): set when a negative amount is added, kept until a restore
/// rebuilds the entries (then exact). Without one, a window's spend only falls as time
/// passes, and the timer analysis can search it as it does counts. Derived, so not compared.
/// A bit rather than a field: the struct stays 32 bytes.
const REFUNDS: u32 = 1 << 31;

impl PartialEq for Activity {
    fn eq(&self, o: &Self) -> bool {
        let end = |a: &Activity| a.len as usize - a.recent as usize;
        let parts = |a: &Activity| (a.attrs, a.counts, a.purchases & !REFUNDS);
        parts(self) == parts(o) && self.buf[..end(self)] == o.buf[..end(o)]
    }
}

impl Activity {
    /// Builds from a changelog record's attribute words and lists (counts in order of first
    /// occurrence, purchases and engagements in any order), in one allocation of the final
    /// size with room for `recent` recent ids (set next by the owner).
    pub fn from_parts(
        attr_words: &[u32],
        counts: [&[(Sym, u32)]; 3],
        purchases: &[(u32, u32, i64)],
        mut engagements: Vec<(u32, Sym, u32)>,
        recent: usize,
    ) -> Self {
        let n: usize = counts.iter().map(|l| l.len()).sum();
        let words = if n > 0 { 2 + 2 * n } else { 0 }
            + PurchaseTotal::WORDS * purchases.len()
            + EngagementTotal::WORDS * engagements.len()
            + 2 * recent
            + attr_words.len();
        let mut a = Activity {
            buf: vec![0; words].into_boxed_slice(),
            ..Default::default()
        };
        a.set_attr_words(attr_words);
        for (kind, list) in CountKind::ALL.into_iter().zip(counts) {
            for &(sym, n) in list {
                a.add_count(kind, sym, n);
            }
        }
        for &(bucket, count, spend) in purchases {
            a.add_purchase(bucket, count, spend);
        }
        engagements.sort_unstable_by_key(|&(b, a, _)| (b, a));
        let mut total = 0u32;
        for (bucket, action, n) in engagements {
            total = total.wrapping_add(n);
            let end = a.len as usize;
            a.insert(
                Part::Engagements,
                end,
                EngagementTotal::new((bucket, action), total).words(),
            );
        }
        a
    }

    /// The words of one part.
    fn bounds(&self, part: Part) -> Range<usize> {
        let a = self.attrs as usize;
        let c = a + self.counts as usize;
        let p = c + (self.purchases & !REFUNDS) as usize;
        let len = self.len as usize;
        let r = len - self.recent as usize;
        match part {
            Part::Attrs => 0..a,
            Part::Counts => a..c,
            Part::Purchases => c..p,
            Part::Engagements => p..r,
            Part::Recent => r..len,
        }
    }

    /// Inserts `words` at index `at` of the buffer, inside or at the end of `part`.
    fn insert(&mut self, part: Part, at: usize, words: &[u32]) {
        let (old, n) = (self.len as usize, words.len());
        let len = old + n;
        if self.buf.len() < len {
            // Up to the allocator's size class: that room is given anyway, and the next
            // insertions fit in it without a call to the allocator.
            let bytes = crate::alloc::good_size(len * std::mem::size_of::<u32>());
            let mut grown = Vec::with_capacity(bytes / std::mem::size_of::<u32>());
            grown.extend_from_slice(&self.buf[..at]);
            grown.extend_from_slice(words);
            grown.extend_from_slice(&self.buf[at..old]);
            grown.resize(grown.capacity(), 0);
            self.buf = grown.into_boxed_slice();
        } else {
            self.buf.copy_within(at..old, at + n);
            self.buf[at..at + n].copy_from_slice(words);
        }
        self.len = len as u32;
        self.resize(part, n as i64);
    }

    /// Removes the words `r` of the buffer, all in `part`.
    fn remove(&mut self, part: Part, r: Range<usize>) {
        let n = r.len();
        self.buf.copy_within(r.end..self.len as usize, r.start);
        self.len -= n as u32;
        self.resize(part, -(n as i64));
    }

    fn resize(&mut self, part: Part, by: i64) {
        match part {
            Part::Attrs => self.attrs = (self.attrs as i64 + by) as u16,
            Part::Counts => self.counts = (self.counts as i64 + by) as u32,
            Part::Purchases => self.purchases = (self.purchases as i64 + by) as u32,
            Part::Engagements => {}
            Part::Recent => self.recent = (self.recent as i64 + by) as u16,
        }
    }

    fn entries<E: Entry>(&self, part: Part) -> &[E] {
        E::cast(&self.buf[self.bounds(part)])
    }

    /// Adds `v` at `key` to the running totals of `part` (an entry for `key` is inserted if
    /// there is none).
    fn add_total<E: Entry>(&mut self, part: Part, key: E::Key, v: E::Total) {
        let (i, new) = windows::locate(self.entries::<E>(part), key);
        if let Some(e) = new {
            let at = self.bounds(part).start + i * E::WORDS;
            self.insert(part, at, e.words());
        }
        let r = self.bounds(part);
        windows::add_from(E::cast_mut(&mut self.buf[r]), i, v);
    }

    /// Drops the entries of `part` before bucket `horizon`, and rebases the others.
    fn prune_totals<E: Entry>(&mut self, part: Part, horizon: u32) {
        let (n, t) = windows::prune_point(self.entries::<E>(part), horizon);
        if n == 0 {
            return;
        }
        let start = self.bounds(part).start;
        self.remove(part, start..start + n * E::WORDS);
        let r = self.bounds(part);
        windows::rebase(E::cast_mut(&mut self.buf[r]), t);
    }

    pub fn purchases(&self) -> Purchases<'_> {
        Purchases::new(self.entries(Part::Purchases))
    }

    pub fn engagements(&self) -> Engagements<'_> {
        Engagements::new(self.entries(Part::Engagements))
    }

    /// Adds `count` purchases spending `spend` (millionths) to bucket `b`.
    pub fn add_purchase(&mut self, b: u32, count: u32, spend: i64) {
        if spend < 0 {
            self.purchases |= REFUNDS;
        }
        self.add_total::<PurchaseTotal>(Part::Purchases, b, (count, spend));
    }

    /// Whether a purchase entry may have a negative spend of its own (a refund); false
    /// means a window's spend only falls as buckets leave it.
    pub fn may_have_refunds(&self) -> bool {
        self.purchases & REFUNDS != 0
    }

    /// Adds one engagement of `action` to bucket `b`.
    pub fn add_engagement(&mut self, b: u32, action: Sym) {
        self.add_total::<EngagementTotal>(Part::Engagements, (b, action), 1);
    }

    /// Drops the purchase and engagement buckets before `horizon`.
    pub fn prune(&mut self, horizon: u32) {
        self.prune_totals::<PurchaseTotal>(Part::Purchases, horizon);
        self.prune_totals::<EngagementTotal>(Part::Engagements, horizon);
    }

    /// Start and end (in words) of each list of counts.
    fn count_bounds(&self) -> [usize; 4] {
        let o = self.attrs as usize;
        if self.counts == 0 {
            return [o; 4];
        }
        let a = o + 2 + 2 * self.buf[o] as usize;
        [
            o + 2,
            a,
            a + 2 * self.buf[o + 1] as usize,
            o + self.counts as usize,
        ]
    }

    /// `[symbol, count]` of one list, in order of first occurrence.
    pub fn counts(&self, kind: CountKind) -> &[Count] {
        let b = self.count_bounds();
        let k = kind as usize;
        Count::cast(&self.buf[b[k]..b[k + 1]])
    }

    /// Adds `n` to `sym` in one list (appending it if new).
    pub fn add_count(&mut self, kind: CountKind, sym: Sym, n: u32) {
        let b = self.count_bounds();
        let k = kind as usize;
        let list = Count::cast_mut(&mut self.buf[b[k]..b[k + 1]]);
        if let Some(x) = list.iter_mut().find(|x| x[0] == sym) {
            x[1] = x[1].saturating_add(n);
            return;
        }
        if self.counts == 0 {
            self.insert(Part::Counts, b[0], &[0, 0, sym, n]);
        } else {
            self.insert(Part::Counts, b[k + 1], &[sym, n]);
        }
        match kind {
            CountKind::Category => self.buf[self.attrs as usize] += 1,
            CountKind::Channel => self.buf[self.attrs as usize + 1] += 1,
            CountKind::Action => {}
        }
    }

    /// The attributes' words ([`crate::state::Attrs`] reads them).
    pub fn attr_words(&self) -> &[u32] {
        &self.buf[self.bounds(Part::Attrs)]
    }

    /// Replaces the attributes' words (at most `u16::MAX`, which [`crate::state::MAX_ATTRIBUTES`]
    /// keeps them under: more are not stored).
    pub fn set_attr_words(&mut self, words: &[u32]) {
        if words.len() > u16::MAX as usize {
            return;
        }
        let r = self.bounds(Part::Attrs);
        if r.len() == words.len() {
            self.buf[r].copy_from_slice(words);
            return;
        }
        self.remove(Part::Attrs, r);
        self.insert(Part::Attrs, 0, words);
    }

    /// The recent event id hashes, as their owner stored them.
    pub fn recent(&self) -> &[RecentId] {
        RecentId::cast(&self.buf[self.bounds(Part::Recent)])
    }

    /// Appends a recent id hash (at most `u16::MAX / 2` are kept: more are not stored).
    pub fn push_recent(&mut self, h: u64) {
        if (self.recent as usize) + 2 <= u16::MAX as usize {
            self.insert(Part::Recent, self.len as usize, &split(h));
        }
    }

    /// Overwrites recent id `i` (nothing if there is none).
    pub fn set_recent(&mut self, i: usize, h: u64) {
        let r = self.bounds(Part::Recent);
        let ids = RecentId::cast_mut(&mut self.buf[r]);
        if let Some(x) = ids.get_mut(i) {
            *x = split(h);
        }
    }

    /// Forgets every recent id.
    pub fn clear_recent(&mut self) {
        let r = self.bounds(Part::Recent);
        self.remove(Part::Recent, r);
    }

    /// Starts loading the buffer's cache lines (see [`crate::state::prefetch`]).
    pub(crate) fn prefetch(&self) {
        crate::state::prefetch(&self.buf[..self.len as usize]);
    }

    pub fn capacity_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buf)
    }

    /// The buffer's bytes by part, and its room not used yet.
    pub fn bytes(&self) -> ActivityBytes {
        let b = |part| self.bounds(part).len() * std::mem::size_of::<u32>();
        ActivityBytes {
            attributes: b(Part::Attrs),
            counts: b(Part::Counts),
            purchases: b(Part::Purchases),
            engagements: b(Part::Engagements),
            recent_ids: b(Part::Recent),
            spare: (self.buf.len() - self.len as usize) * std::mem::size_of::<u32>(),
        }
    }
}

/// What an [`Activity`]'s buffer holds, in bytes ([`Activity::bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActivityBytes {
    /// The profile attributes' words.
    pub attributes: usize,
    /// Lifetime counts per category, channel and action, with their lengths.
    pub counts: usize,
    /// The windows' purchase entries.
    pub purchases: usize,
    /// The windows' engagement entries.
    pub engagements: usize,
    /// The recent event ids kept for duplicate detection.
    pub recent_ids: usize,
    /// Room the buffer has and does not use yet (up to the allocator's size class).
    pub spare: usize,
}

impl std::ops::AddAssign for ActivityBytes {
    fn add_assign(&mut self, o: Self) {
        self.attributes += o.attributes;
        self.counts += o.counts;
        self.purchases += o.purchases;
        self.engagements += o.engagements;
        self.recent_ids += o.recent_ids;
        self.spare += o.spare;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Count(usize, Sym, u32),
        Purchase(u32, u32, i64),
        Engagement(u32, Sym),
        Prune(u32),
        Recent(u64),
        ClearRecent,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3, 0u32..6, 1u32..3).prop_map(|(k, s, n)| Op::Count(k, s, n)),
            (0u32..30, 1u32..3, -3_000_000i64..9_000_000_000)
                .prop_map(|(b, c, s)| Op::Purchase(b, c, s)),
            (0u32..30, 0u32..3).prop_map(|(b, a)| Op::Engagement(b, a)),
            (0u32..30).prop_map(Op::Prune),
            any::<u64>().prop_map(Op::Recent),
            Just(Op::ClearRecent),
        ]
    }

    proptest! {
        /// The four lists in one buffer behave like four separate ones, whatever the order of
        /// changes to them, and a rebuild from the lists gives the same buffer.
        #[test]
        fn like_four_lists(ops in proptest::collection::vec(op(), 0..80)) {
            let mut a = Activity::default();
            let mut counts: [Vec<(Sym, u32)>; 3] = Default::default();
            let mut purchases: std::collections::BTreeMap<u32, (u32, i64)> = Default::default();
            let mut engagements: std::collections::BTreeMap<(u32, Sym), u32> = Default::default();
            let mut recent: Vec<u64> = Vec::new();
            let mut horizon = 0;
            for o in ops {
                match o {
                    Op::Count(k, sym, n) => {
                        a.add_count(CountKind::ALL[k], sym, n);
                        match counts[k].iter_mut().find(|(s, _)| *s == sym) {
                            Some(x) => x.1 += n,
                            None => counts[k].push((sym, n)),
                        }
                    }
                    Op::Purchase(b, c, s) => {
                        a.add_purchase(b, c, s);
                        let x = purchases.entry(b).or_default();
                        *x = (x.0 + c, x.1 + s);
                    }
                    Op::Engagement(b, act) => {
                        a.add_engagement(b, act);
                        *engagements.entry((b, act)).or_default() += 1;
                    }
                    Op::Prune(h) => horizon = h,
                    Op::Recent(h) => {
                        a.push_recent(h);
                        recent.push(h);
                    }
                    Op::ClearRecent => {
                        a.clear_recent();
                        recent.clear();
                    }
                }
                a.prune(horizon);
                purchases.retain(|b, _| *b >= horizon);
                engagements.retain(|(b, _), _| *b >= horizon);
                for (kind, list) in CountKind::ALL.iter().zip(&counts) {
                    let got: Vec<(Sym, u32)> = a.counts(*kind).iter().map(|&[s, n]| (s, n)).collect();
                    prop_assert_eq!(&got, list);
                }
                let want: Vec<_> = purchases.iter().map(|(b, (c, s))| (*b, *c, *s)).collect();
                prop_assert_eq!(a.purchases().iter().collect::<Vec<_>>(), want);
                let want: Vec<_> = engagements.iter().map(|((b, act), n)| (*b, *act, *n)).collect();
                prop_assert_eq!(a.engagements().iter().collect::<Vec<_>>(), want);
                prop_assert_eq!(&a.recent().iter().map(join).collect::<Vec<_>>(), &recent);
                // The bytes by part, as the lists above take them.
                let n: usize = counts.iter().map(|l| l.len()).sum();
                let b = a.bytes();
                prop_assert_eq!(
                    (b.counts, b.purchases, b.engagements, b.recent_ids),
                    (
                        if n > 0 { 8 + 8 * n } else { 0 },
                        4 * PurchaseTotal::WORDS * purchases.len(),
                        4 * EngagementTotal::WORDS * engagements.len(),
                        8 * recent.len(),
                    )
                );
                prop_assert_eq!(
                    b.counts + b.purchases + b.engagements + b.recent_ids + b.spare,
                    a.capacity_bytes()
                );
            }
            let p: Vec<_> = a.purchases().iter().collect();
            let mut e: Vec<_> = a.engagements().iter().collect();
            e.reverse();
            let mut rebuilt = Activity::from_parts(&[], [&counts[0], &counts[1], &counts[2]], &p, e, recent.len());
            for h in &recent {
                rebuilt.push_recent(*h);
            }
            prop_assert_eq!(rebuilt.capacity_bytes(), rebuilt.len as usize * 4, "one allocation of the final size");
            prop_assert_eq!(rebuilt.recent(), a.recent());
            prop_assert_eq!(&rebuilt, &a);
            // Equality leaves the recent ids to their owner.
            rebuilt.push_recent(1);
            prop_assert_eq!(rebuilt, a);
        }
    }
}
