//! A customer's activity in one allocation: lifetime counts per category, channel and action,
//! and the purchase and engagement buckets of the windows. Pure: no I/O.
//!
//! This module owns how those four variable-length lists, the hashes of the customer's
//! most recent event ids (for duplicate detection), the words of the profile attributes
//! (packed by [`crate::state::Attrs`]) and the rule words of [`crate::engine::Customer`]
//! (segments, membership bits, rule timer cache) share one buffer of `u32` words:
//!
//! ```text
//! [rule words…][attributes…][counts: lengths, categories…, channels…, actions…][purchases…][engagements…][recent ids…]
//! ```
//!
//! Every event touches at least one of them, and a changelog record reads all of them. One
//! buffer instead of three vectors saves about 90 bytes per customer (one vector header
//! instead of three, and less rounding to the allocator's size classes), and a restore builds
//! it in one allocation (BENCHMARKS.md, ninth session). The buffer is a [`Words`]: a pointer
//! and a length, its capacity the allocator's size class of that length, so insertions call
//! the allocator only when they cross a class, and the struct keeps room for the parts'
//! lengths in 32 bytes.
//!
//! [`crate::windows`] owns what the bucket entries mean (running totals) and how they are
//! read; this module only inserts and removes their words.

use std::ops::Range;

use crate::symbols::Sym;
use crate::windows::{
    self, EngagementTotal, Engagements, Entry, PurchaseTotal, Purchases, Total, Words as _,
};
use crate::words::Words;

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
    Rules,
    Attrs,
    Counts,
    Purchases,
    Engagements,
    Recent,
}

/// A recent event id hash: `[low, high]`.
pub type RecentId = [u32; 2];

/// `[low, high]` halves of a 64-bit word.
pub fn split(h: u64) -> [u32; 2] {
    [h as u32, (h >> 32) as u32]
}

/// The 64-bit word (a recent id's hash, a rule word) of `[low, high]` halves.
pub fn join(x: &[u32; 2]) -> u64 {
    x[0] as u64 | (x[1] as u64) << 32
}

/// Counts per category / channel / action (each list in order of first occurrence), then
/// purchase and engagement entries (sorted, see [`crate::windows`]), then recent event id
/// hashes (oldest first), and the owner's rule words first ([`crate::engine::Customer`]), in
/// one buffer. The counts start with one `[categories, channels]` pair holding the lengths of the
/// first two lists, and are absent altogether (no words) for a customer with none. The recent
/// ids grow one at a time up to the owner's limit, so a customer seen once keeps one.
///
/// Equality compares the attributes, the counts and the buckets, not the recent ids or the
/// rule words: the owner compares those (and leaves out what is a cache).
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// The words, exactly as many as the parts take, in a block of the allocator's size
    /// class for them ([`crate::words`]: 12 bytes, no capacity stored).
    buf: Words,
    /// Words of the rule words, at the very start.
    rules: u16,
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
        let kept = |a: &Activity| a.rules as usize..a.buf.len() - a.recent as usize;
        let parts = |a: &Activity| (a.attrs, a.counts, a.purchases & !REFUNDS);
        parts(self) == parts(o) && self.buf[kept(self)] == o.buf[kept(o)]
    }
}

impl Activity {
    /// Builds from rule words, a changelog record's attribute words and lists (counts in
    /// order of first occurrence, each symbol once; purchases and engagements in any order)
    /// and recent id hashes (stored as given), in one allocation of the final size.
    pub fn from_parts(
        rule_words: &[u64],
        attr_words: &[u32],
        counts: [&[(Sym, u32)]; 3],
        purchases: &[(u32, u32, i64)],
        mut engagements: Vec<(u32, Sym, u32)>,
        recent: &[u64],
    ) -> Self {
        let n: usize = counts.iter().map(|l| l.len()).sum();
        let words = 2 * rule_words.len()
            + attr_words.len()
            + if n > 0 { 2 + 2 * n } else { 0 }
            + PurchaseTotal::WORDS * purchases.len()
            + EngagementTotal::WORDS * engagements.len()
            + 2 * recent.len();
        let mut v: Vec<u32> = Vec::with_capacity(crate::words::capacity(words));
        v.extend(rule_words.iter().flat_map(|&w| split(w)));
        let rules = v.len();
        v.extend_from_slice(attr_words);
        let attrs = v.len();
        if n > 0 {
            v.extend([counts[0].len() as u32, counts[1].len() as u32]);
            v.extend(
                counts
                    .iter()
                    .flat_map(|l| l.iter().flat_map(|&(s, n)| [s, n])),
            );
        }
        let counted = v.len();
        let mut purchases: smallvec::SmallVec<[(u32, u32, i64); 16]> = purchases.into();
        purchases.sort_unstable_by_key(|&(b, _, _)| b);
        let mut total = (0u32, 0i64);
        for (i, &(bucket, count, spend)) in purchases.iter().enumerate() {
            total = total.plus((count, spend));
            if i > 0 && purchases[i - 1].0 == bucket {
                v.truncate(v.len() - PurchaseTotal::WORDS);
            }
            v.extend_from_slice(PurchaseTotal::new(bucket, total).words());
        }
        let bought = v.len();
        engagements.sort_unstable_by_key(|&(b, a, _)| (b, a));
        let mut total = 0u32;
        for &(bucket, action, n) in &engagements {
            total = total.wrapping_add(n);
            v.extend_from_slice(EngagementTotal::new((bucket, action), total).words());
        }
        v.extend(recent.iter().flat_map(|&h| split(h)));
        let refunds = purchases.iter().any(|&(_, _, spend)| spend < 0);
        Activity {
            rules: rules as u16,
            attrs: (attrs - rules) as u16,
            counts: (counted - attrs) as u32,
            purchases: (bought - counted) as u32 | if refunds { REFUNDS } else { 0 },
            recent: (2 * recent.len()) as u16,
            buf: Words::from_vec(v),
        }
    }

    /// The words of one part.
    fn bounds(&self, part: Part) -> Range<usize> {
        let s = self.rules as usize;
        let a = s + self.attrs as usize;
        let c = a + self.counts as usize;
        let p = c + (self.purchases & !REFUNDS) as usize;
        let len = self.buf.len();
        let r = len - self.recent as usize;
        match part {
            Part::Rules => 0..s,
            Part::Attrs => s..a,
            Part::Counts => a..c,
            Part::Purchases => c..p,
            Part::Engagements => p..r,
            Part::Recent => r..len,
        }
    }

    /// Inserts `words` at index `at` of the buffer, inside or at the end of `part`.
    fn insert(&mut self, part: Part, at: usize, words: &[u32]) {
        self.buf.insert(at, words);
        self.resize(part, words.len() as i64);
    }

    /// Replaces the words of `part` with `words`.
    fn replace(&mut self, part: Part, words: &[u32]) {
        let r = self.bounds(part);
        let by = words.len() as i64 - r.len() as i64;
        self.buf.replace(r, words);
        self.resize(part, by);
    }

    /// Removes the words `r` of the buffer, all in `part`.
    fn remove(&mut self, part: Part, r: Range<usize>) {
        let n = r.len();
        self.buf.remove(r);
        self.resize(part, -(n as i64));
    }

    fn resize(&mut self, part: Part, by: i64) {
        match part {
            Part::Rules => self.rules = (self.rules as i64 + by) as u16,
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
        let o = self.bounds(Part::Counts).start;
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
        let o = self.bounds(Part::Counts).start;
        match kind {
            CountKind::Category => self.buf[o] += 1,
            CountKind::Channel => self.buf[o + 1] += 1,
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
        if words.len() <= u16::MAX as usize {
            self.replace(Part::Attrs, words);
        }
    }

    /// The rule words: [`crate::engine::Customer`]'s segments, membership bits and rule timer
    /// cache, 64-bit words as `[low, high]` pairs (read them with [`join`]).
    pub fn rule_words(&self) -> &[[u32; 2]] {
        <[u32; 2]>::cast(&self.buf[self.bounds(Part::Rules)])
    }

    /// Replaces the rule words (at most `u16::MAX / 2`, which
    /// [`crate::rules::MAX_RULES`] keeps them under: more are not stored).
    pub fn set_rule_words(&mut self, words: &[u64]) {
        let r = self.bounds(Part::Rules);
        if r.len() == 2 * words.len() {
            // The common case (an evaluation writing its words back): in place.
            let pairs = <[u32; 2]>::cast_mut(&mut self.buf[r]);
            for (p, &w) in pairs.iter_mut().zip(words) {
                *p = split(w);
            }
        } else {
            self.replace_halves(Part::Rules, words);
        }
    }

    /// The recent event id hashes, as their owner stored them.
    pub fn recent(&self) -> &[RecentId] {
        RecentId::cast(&self.buf[self.bounds(Part::Recent)])
    }

    /// Appends a recent id hash (at most `u16::MAX / 2` are kept: more are not stored).
    #[cfg(test)]
    pub fn push_recent(&mut self, h: u64) {
        if (self.recent as usize) + 2 <= u16::MAX as usize {
            self.insert(Part::Recent, self.buf.len(), &split(h));
        }
    }

    /// Appends a recent id hash as the newest, first dropping the oldest so that at most
    /// `keep` remain (none kept: every one dropped).
    pub fn push_recent_keeping(&mut self, h: u64, keep: usize) {
        let keep = keep.min((u16::MAX / 2) as usize);
        let r = self.bounds(Part::Recent);
        let n = r.len() / 2;
        if keep == 0 {
            self.remove(Part::Recent, r);
        } else if n < keep {
            self.insert(Part::Recent, r.end, &split(h));
        } else {
            // Full: the ones beyond `keep` go (if it was lowered), then the others move down
            // one place over the oldest, making room at the end without a change of length.
            self.remove(Part::Recent, r.start..r.start + 2 * (n - keep));
            let r = self.bounds(Part::Recent);
            self.buf.copy_within(r.start + 2..r.end, r.start);
            self.buf[r.end - 2..r.end].copy_from_slice(&split(h));
        }
    }

    /// Replaces the recent ids (at most `u16::MAX / 2`: more are not stored).
    #[cfg(test)]
    pub fn replace_recent(&mut self, ids: &[u64]) {
        self.replace_halves(Part::Recent, ids);
    }

    /// Replaces the words of `part` with the `[low, high]` halves of `words` (at most
    /// `u16::MAX / 2` of them, what a 16-bit part length holds: more are not stored).
    fn replace_halves(&mut self, part: Part, words: &[u64]) {
        if words.len() <= (u16::MAX / 2) as usize {
            let pairs: smallvec::SmallVec<[u32; 64]> =
                words.iter().flat_map(|&w| split(w)).collect();
            self.replace(part, &pairs);
        }
    }

    /// A mark the owner keeps in the header's spare room (not part of the activity: never
    /// compared, never written to a changelog record; 0 in a new or rebuilt buffer).
    pub fn mark(&self) -> u32 {
        self.buf.aux()
    }
    pub fn set_mark(&mut self, v: u32) {
        self.buf.set_aux(v);
    }

    /// Starts loading the buffer's cache lines (see [`crate::state::prefetch`]).
    pub(crate) fn prefetch(&self) {
        crate::state::prefetch(&self.buf);
    }

    /// Bytes of the words used (the allocator's block is [`ActivityBytes::spare`] more).
    pub fn capacity_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buf)
    }

    /// The buffer's bytes by part, and its room not used yet.
    pub fn bytes(&self) -> ActivityBytes {
        let b = |part| self.bounds(part).len() * std::mem::size_of::<u32>();
        ActivityBytes {
            rule_words: b(Part::Rules),
            attributes: b(Part::Attrs),
            counts: b(Part::Counts),
            purchases: b(Part::Purchases),
            engagements: b(Part::Engagements),
            recent_ids: b(Part::Recent),
            spare: (crate::words::capacity(self.buf.len()) - self.buf.len()) * 4,
        }
    }
}

/// What an [`Activity`]'s buffer holds, in bytes ([`Activity::bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActivityBytes {
    /// The rule words (segments, membership bits, rule timer cache).
    pub rule_words: usize,
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
    /// Room the buffer's block has and does not use yet (up to the allocator's size class).
    pub spare: usize,
}

impl std::ops::AddAssign for ActivityBytes {
    fn add_assign(&mut self, o: Self) {
        self.rule_words += o.rule_words;
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
        Rules(Vec<u64>),
        Attrs(Vec<u32>),
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
            proptest::collection::vec(any::<u64>(), 0..5).prop_map(Op::Rules),
            proptest::collection::vec(any::<u32>(), 0..5).prop_map(Op::Attrs),
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
            let mut rules: Vec<u64> = Vec::new();
            let mut attrs: Vec<u32> = Vec::new();
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
                        a.replace_recent(&[]);
                        recent.clear();
                    }
                    Op::Rules(w) => {
                        a.set_rule_words(&w);
                        rules = w;
                    }
                    Op::Attrs(w) => {
                        a.set_attr_words(&w);
                        attrs = w;
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
                prop_assert_eq!(&a.rule_words().iter().map(join).collect::<Vec<_>>(), &rules);
                prop_assert_eq!(a.attr_words(), &attrs[..]);
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
                prop_assert_eq!((b.rule_words, b.attributes), (8 * rules.len(), 4 * attrs.len()));
                prop_assert_eq!(
                    b.rule_words + b.attributes + b.counts + b.purchases + b.engagements + b.recent_ids,
                    a.capacity_bytes()
                );
            }
            let p: Vec<_> = a.purchases().iter().collect();
            let mut e: Vec<_> = a.engagements().iter().collect();
            e.reverse();
            let mut rebuilt = Activity::from_parts(&rules, &attrs, [&counts[0], &counts[1], &counts[2]], &p, e, &recent);
            prop_assert_eq!(rebuilt.recent(), a.recent());
            prop_assert_eq!(rebuilt.rule_words(), a.rule_words());
            prop_assert_eq!(rebuilt.bytes(), a.bytes());
            prop_assert_eq!(&rebuilt, &a);
            // Equality leaves the recent ids and rule words to their owner.
            rebuilt.push_recent(1);
            rebuilt.set_rule_words(&[7]);
            prop_assert_eq!(rebuilt, a);
        }
    }
}
