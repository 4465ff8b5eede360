//! The engine: one event → updated customer → re-evaluated rules → segment changes.
//! Pure: no I/O, no clocks, no Kafka. Runs identically in the Kafka pipeline, the benchmark
//! and the tests.
//!
//! This module owns a customer's memberships and change sequence (`seq`), incremental
//! evaluation and the diff. Incremental evaluation: every rule unit (a segmentation, or an
//! independent segment) has a dependency mask (purchase / engagement / profile / time); an
//! event re-evaluates only the units whose mask contains the event's kind or `time` (the
//! customer's clock moved). A customer's first event evaluates everything.
//!
//! Time: after every evaluation the engine computes the customer's *timer*, the next instant
//! at which a time-dependent rule can flip with no event (see [`crate::rules::timing`]). The
//! caller keeps an index of timers and calls [`Engine::advance`] when one is due; the engine
//! also fires a customer's due timers itself before applying an event with a later
//! timestamp, so a change caused by time passing always carries the exact instant it
//! happened. Which clock drives time (event time with a watermark, or processing time) is
//! the caller's choice, passed as a [`Clock`].
//!
//! Late and duplicate events: an event older than the watermark counts in the lifetime
//! aggregates only (see [`CustomerState::apply_with`]); an event whose `event_id` is among
//! the customer's last `dedup` ids changes nothing.

use serde::Serialize;

use crate::event::{Event, EventKind};
use crate::rules::compile::{deps, val_to_json, Atom, Ctx, Shown};
use crate::rules::{fnv1a, Rule, RuleSet};
use crate::state::{CustomerState, Rejected, NEVER, NO_TIME};
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::Arc;

/// "Not in any segment of this segmentation yet."
pub const NO_SEGMENT: u16 = u16::MAX;

/// A customer: state, current memberships and the last change sequence number.
///
/// Laid out to fit 136 bytes (a test holds it to that), since a million customers are a
/// million of these. Everything whose size the rules fix, the *rule words*, lives at the
/// start of the state's activity buffer ([`crate::activity::Activity::rule_words`]), in
/// 64-bit words:
///
/// ```text
/// [segment per segmentation, 4 u16 per word][membership bits][rule timer cache]
/// ```
///
/// The rule timer cache is there only once the customer has had a timer: a customer that
/// time alone never changes (only a profile, say) keeps the first two parts alone, 16 bytes
/// with the default rules instead of 64 (the cache is added by the analysis that first finds
/// a timer).
///
/// The hashes of the most recent event ids (never 0), up to `dedup` of them oldest first,
/// live at the end of the state's [`crate::activity::Activity`]: they grow with the
/// customer's events, so a customer seen once keeps one. Once there are `dedup`, a new one
/// moves the others down over the oldest: a copy of `dedup - 1` words of 8 bytes (56 with
/// the default), instead of a ring's two 16-bit positions in the struct.
#[derive(Debug, Clone)]
pub struct Customer {
    pub state: CustomerState,
    /// Sequence number of the last change emitted for this customer (0: none yet).
    pub seq: u64,
    /// When a time-dependent rule can next flip (`NEVER`: no timer).
    pub timer: i64,
}

/// A copy of a customer's rule words (segments, membership bits and rule timer cache, see
/// `RuleTimers`: the layout above), which live at the start of its activity buffer
/// ([`crate::activity::Activity::rule_words`]). An evaluation, which reads the state beside
/// them, works on a copy on the stack and writes it back (`Engine::with_timer_cache`):
/// a few words copied instead of the 16-byte pointer and the allocation they took as a
/// field of their own.
pub type RuleWords = SmallVec<[u64; 8]>;

/// Per time-dependent rule (its `timer_slot`), the instant computed by the last timer
/// analysis: the rule's value cannot change before it unless an event it depends on is
/// applied. An entry is valid while it is later than the evaluation instant and no such event
/// came since (applying one clears the entries of the rules that read it), so the analysis
/// only re-runs for the rules an event touched or whose instant has come.
///
/// It is a cache derived from the state: never written to the changelog, stale after a
/// restore, and ignored when customers are compared. It lives in the words of
/// [`Customer`] after the membership bits, from the customer's first timer on (until then
/// every analysis starts from a fresh cache: [`Engine::with_timer_cache`]; a restored
/// customer starts without one): one word for a base instant, then one 32-bit entry
/// per rule, two to a word, each the instant as milliseconds after the base (about 49 days
/// of range; 8-byte instants took twice the room). Codes: [`STALE`] (recompute),
/// [`NEVER_CODE`] (time alone never changes the rule), [`BEYOND`] (the instant is later than
/// the base plus the range: a lower bound). An instant out of range moves the base to the
/// evaluation instant first; if it is still out of range the entry is [`BEYOND`], and
/// [`Engine::next_timer`] computes the exact instant again only when the bound is earlier
/// than every other rule's instant, so a bound never becomes a timer that fires for nothing.
struct RuleTimers;

/// An entry that must be recomputed. Offset 0 is the base itself, never later than an
/// evaluation instant, so never a valid entry anyway.
const STALE: u32 = 0;
/// An entry for a rule that time alone never changes.
const NEVER_CODE: u32 = u32::MAX;
/// An entry whose instant is at least the base plus this many milliseconds.
const BEYOND: u32 = u32::MAX - 1;

/// What the cache knows of one rule's next instant at an evaluation instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cached {
    /// Nothing valid: analyse the rule.
    Stale,
    /// The rule cannot change before this instant (`NEVER`: by time alone, never).
    At(i64),
    /// The rule cannot change before this instant, and its own is later.
    Beyond(i64),
}

impl RuleTimers {
    /// Words for `n` rules' entries and the base.
    fn words(n: usize) -> usize {
        if n == 0 {
            0
        } else {
            1 + n.div_ceil(2)
        }
    }
    /// Entry `i` of a cache: 32-bit lane `i + 2`, after the base's word (`STALE` past the
    /// end).
    fn entry(cache: &[u64], i: usize) -> u32 {
        lane::<32>(cache, i + 2) as u32
    }
    fn set_entry(cache: &mut [u64], i: usize, v: u32) {
        set_lane::<32>(cache, i + 2, v as u64);
    }
    fn base(cache: &[u64]) -> i64 {
        cache.first().map_or(i64::MIN, |b| *b as i64)
    }
    /// Every entry stale, and no base yet.
    fn clear(cache: &mut [u64]) {
        cache.fill(0);
        if let Some(b) = cache.first_mut() {
            *b = i64::MIN as u64;
        }
    }
    fn get(cache: &[u64], slot: Option<u16>, now: i64) -> Cached {
        Self::get_from(cache, Self::base(cache), slot, now)
    }
    /// [`RuleTimers::get`] with the cache's base already read.
    fn get_from(cache: &[u64], base: i64, slot: Option<u16>, now: i64) -> Cached {
        let Some(i) = slot else {
            return Cached::Stale;
        };
        match Self::entry(cache, i as usize) {
            STALE => Cached::Stale,
            NEVER_CODE => Cached::At(NEVER),
            BEYOND => match base.checked_add(BEYOND as i64) {
                Some(b) if b > now => Cached::Beyond(b),
                _ => Cached::Stale,
            },
            o => match base.checked_add(o as i64) {
                Some(t) if t > now => Cached::At(t),
                _ => Cached::Stale,
            },
        }
    }
    /// Whether the cache says the rule cannot change at `now` or before.
    fn holds(cache: &[u64], slot: Option<u16>, now: i64) -> bool {
        Self::get(cache, slot, now) != Cached::Stale
    }
    /// Records instant `t` of the rule at `slot`, computed at `now`.
    #[cfg(test)]
    fn set(cache: &mut [u64], slot: Option<u16>, t: i64, now: i64) {
        let mut base = Self::base(cache);
        Self::set_from(cache, &mut base, slot, t, now);
    }
    /// [`RuleTimers::set`] with the cache's base already read into `base`, which follows a
    /// move of the base.
    fn set_from(cache: &mut [u64], base: &mut i64, slot: Option<u16>, t: i64, now: i64) {
        let Some(i) = slot.map(|i| i as usize) else {
            return;
        };
        if t == NEVER {
            return Self::set_entry(cache, i, NEVER_CODE);
        }
        let fits = |base: i64| t.checked_sub(base).filter(|o| *o > 0 && *o < BEYOND as i64);
        if fits(*base).is_none() && now > *base {
            Self::rebase(cache, now);
            *base = now;
        }
        let code = match fits(*base) {
            Some(o) => o as u32,
            // Later than the range: a lower bound. (Earlier than the base cannot be, since
            // instants follow `now` and the base is an earlier `now`; stale is safe anyway.)
            None if t > *base => BEYOND,
            None => STALE,
        };
        Self::set_entry(cache, i, code);
    }
    /// Moves the base to `now`, keeping every exact entry still ahead of it. Bounds are
    /// dropped: relative to a later base they would claim more than is known.
    fn rebase(cache: &mut [u64], now: i64) {
        let base = Self::base(cache);
        let n = (cache.len().saturating_sub(1)) * 2;
        for i in 0..n {
            let v = match Self::entry(cache, i) {
                STALE => STALE,
                NEVER_CODE => NEVER_CODE,
                BEYOND => STALE,
                o => match base.checked_add(o as i64) {
                    Some(t) if t > now => (t - now) as u32,
                    _ => STALE,
                },
            };
            Self::set_entry(cache, i, v);
        }
        if let Some(b) = cache.first_mut() {
            *b = now as u64;
        }
    }
    /// Every one of the first `n` entries `NEVER`.
    fn all_never(cache: &mut [u64], n: usize) {
        for i in 0..n {
            Self::set_entry(cache, i, NEVER_CODE);
        }
    }
    /// Forgets the entries of the rules that read what `mask` (event kinds) changes.
    fn invalidate(cache: &mut [u64], rules: &RuleSet, mask: u8) {
        for (i, deps) in rules.timer_slot_deps.iter().enumerate() {
            if deps & mask != 0 {
                Self::set_entry(cache, i, STALE);
            }
        }
    }
}

/// What of a customer compares ([`Engine::view`]): state, memberships, `seq`, timer and
/// recent ids; not the rule timer cache or the changelog's dirty mark. A customer does not
/// know where its rule words' parts are ([`RuleCounts`]), so its engine makes the view (a
/// copy: for tests and checks, not for the event path).
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerView {
    pub state: CustomerState,
    pub segments: Vec<u16>,
    pub members: Vec<u64>,
    pub seq: u64,
    pub timer: i64,
    pub recent_ids: Vec<u64>,
}

/// Words holding `n` segment indexes (four per word).
fn segment_words(n: usize) -> usize {
    n.div_ceil(4)
}

/// Lane `i` of `BITS`-bit lanes packed into `words`, lowest bits first (0 past the end).
fn lane<const BITS: usize>(words: &[u64], i: usize) -> u64 {
    let per = 64 / BITS;
    words
        .get(i / per)
        .map_or(0, |w| (w >> (BITS * (i % per))) & (u64::MAX >> (64 - BITS)))
}

/// Sets lane `i` of `BITS`-bit lanes packed into `words` (nothing past the end).
fn set_lane<const BITS: usize>(words: &mut [u64], i: usize, v: u64) {
    let per = 64 / BITS;
    let mask = u64::MAX >> (64 - BITS);
    if let Some(w) = words.get_mut(i / per) {
        let shift = BITS * (i % per);
        *w = (*w & !(mask << shift)) | ((v & mask) << shift);
    }
}

/// Segment index `si` in the leading words of a customer's `words`.
fn segment_in(words: &[u64], si: usize) -> u16 {
    lane::<16>(words, si) as u16
}

/// Where a customer's membership bits and rule timer cache are in its `words`.
#[derive(Clone)]
struct Layout {
    members: usize,
    timers: Range<usize>,
}

/// How many segmentations and independent segments a rule set has: what it takes to read a
/// customer's rule words, which the customer does not keep (every customer of an engine has
/// the same).
#[derive(Debug, Clone, Copy)]
pub struct RuleCounts {
    segmentations: usize,
    member_words: usize,
}

impl RuleCounts {
    pub fn of(rules: &RuleSet) -> Self {
        RuleCounts {
            segmentations: rules.segmentations.len(),
            member_words: rules.segments.len().div_ceil(64),
        }
    }
    /// Where the membership bits start in the rule words.
    fn member_start(self) -> usize {
        segment_words(self.segmentations)
    }
}

impl Customer {
    fn layout(&self, n: RuleCounts) -> Layout {
        Layout {
            members: n.member_start(),
            timers: self.timer_range(n),
        }
    }
    /// Where the rule timer cache starts and ends in the rule words.
    fn timer_range(&self, n: RuleCounts) -> Range<usize> {
        n.member_start() + n.member_words..self.state.activity.rule_words().len()
    }
    /// Rule word `i` (0 past the end).
    fn rule_word(&self, i: usize) -> u64 {
        self.state
            .activity
            .rule_words()
            .get(i)
            .map_or(0, crate::activity::join)
    }
    /// A copy of the rule words.
    fn load_words(&self) -> RuleWords {
        let w = self.state.activity.rule_words();
        w.iter().map(crate::activity::join).collect()
    }
    /// Runs `f` on a copy of the rule words, and writes them back.
    fn edit_words<R>(&mut self, f: impl FnOnce(&mut [u64]) -> R) -> R {
        let mut w = self.load_words();
        let r = f(&mut w);
        self.state.activity.set_rule_words(&w);
        r
    }

    /// Current segment index of segmentation `si` (`NO_SEGMENT` before the first event).
    pub fn segment(&self, si: usize) -> u16 {
        segment_in(&[self.rule_word(si / 4)], si % 4)
    }
    /// Current segment index per segmentation.
    pub fn segments(&self, n: RuleCounts) -> impl Iterator<Item = u16> + '_ {
        (0..n.segmentations).map(|si| self.segment(si))
    }
    /// Replaces every segment index (same number of segmentations); false otherwise.
    pub fn set_segments(&mut self, n: RuleCounts, segments: &[u16]) -> bool {
        if segments.len() != n.segmentations {
            return false;
        }
        self.edit_words(|w| {
            for (si, &v) in segments.iter().enumerate() {
                set_lane::<16>(w, si, v as u64);
            }
        });
        true
    }
    /// Whether the customer is in independent segment `i`.
    pub fn is_member(&self, n: RuleCounts, i: usize) -> bool {
        i / 64 < n.member_words && self.rule_word(n.member_start() + i / 64) & (1 << (i % 64)) != 0
    }
    #[cfg(test)]
    fn set_member(&mut self, n: RuleCounts, i: usize, on: bool) {
        let start = n.member_start();
        self.edit_words(|w| {
            let w = &mut w[start + i / 64];
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        });
    }
    /// Starts loading the customer's separate allocations, which an event and its changelog
    /// record read (see `state::prefetch`).
    pub fn prefetch(&self) {
        // The struct's own lines first: reading the pointers below waits for one of them.
        crate::state::prefetch(std::slice::from_ref(self));
        self.state.prefetch();
    }
    /// The processor's mark of the customer's entry in its partition's dirty list, if it has
    /// one: where the customer's entry was put in its partition's list of customers changed
    /// since their last changelog record (and at which take: the processor's encoding). It
    /// is this customer's entry only if the entry there names it: the list is emptied at
    /// every take without visiting the customers. Bookkeeping of the processor, like the
    /// timer cache ignored when customers are compared; kept in the activity buffer's
    /// header, in room that would be padding ([`crate::activity::Activity::mark`]).
    pub fn dirty_slot(&self) -> u32 {
        self.state.activity.mark()
    }
    pub fn set_dirty_slot(&mut self, slot: u32) {
        self.state.activity.set_mark(slot);
    }
    /// Membership bits of the independent segments (bit `i % 64` of word `i / 64`).
    pub fn members(&self, n: RuleCounts) -> impl ExactSizeIterator<Item = u64> + '_ {
        let start = n.member_start();
        let w = self.state.activity.rule_words();
        w[start.min(w.len())..(start + n.member_words).min(w.len())]
            .iter()
            .map(crate::activity::join)
    }
    /// Replaces the membership bits (same number of words).
    pub fn set_members(&mut self, n: RuleCounts, words: &[u64]) -> bool {
        let (start, n) = (n.member_start(), n.member_words);
        if words.len() != n {
            return false;
        }
        self.edit_words(|w| w[start..start + n].copy_from_slice(words));
        true
    }
    /// Forgets the rule timer cache (the state was replaced).
    pub fn clear_rule_timers(&mut self, n: RuleCounts) {
        let r = self.timer_range(n);
        self.edit_words(|w| RuleTimers::clear(&mut w[r]));
    }
    /// Hashes of the most recent event ids applied, oldest first.
    pub fn recent_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.state
            .activity
            .recent()
            .iter()
            .map(crate::activity::join)
    }
    /// Records an event id hash; false if it is among the `keep` most recent ones.
    fn remember(&mut self, h: u64, keep: usize) -> bool {
        let h = h | 1;
        if self
            .state
            .activity
            .recent()
            .iter()
            .any(|x| crate::activity::join(x) == h)
        {
            return false;
        }
        self.state.activity.push_recent_keeping(h, keep);
        true
    }
    /// Replaces the recent event id hashes (oldest first), keeping the newest `keep`.
    #[cfg(test)]
    pub fn set_recent_ids(&mut self, ids: &[u64], keep: usize) {
        self.state
            .activity
            .replace_recent(&Self::recent_of(ids, keep));
    }
    /// The recent ids kept of `ids` (oldest first) with `keep` kept: the newest, in order.
    pub fn recent_of(ids: &[u64], keep: usize) -> SmallVec<[u64; 8]> {
        let newest = &ids[ids.len().saturating_sub(keep)..];
        newest.iter().map(|h| h | 1).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Entered,
    Exited,
}

/// One segment change, before it is addressed to a customer and a cause.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'r> {
    /// Index into `RuleSet::segmentations`, or None for an independent segment.
    pub segmentation: Option<usize>,
    pub segment: &'r str,
    pub kind: ChangeKind,
    /// For a segmentation's `entered`: the segment left (None on first assignment).
    pub previous: Option<&'r str>,
    /// For a segmentation's `exited`: the segment entered instead.
    pub next: Option<&'r str>,
    /// `segment`'s index: in its segmentation (the default after the segments), or in
    /// `RuleSet::segments`; `previous`'s and `next`'s in the segmentation. For what is kept
    /// per segment (the names the serializer writes, [`crate::output::Names`]).
    pub index: ChangeIndex,
    /// When the change happened (the customer's clock, epoch ms).
    pub at: i64,
    pub seq: u64,
    /// The feature values behind the decision, in rule order (shared by the `exited` and
    /// `entered` of one move).
    pub because: Because<'r>,
    /// Caused by time passing (a timer due at `at`) rather than by an event.
    pub by_timer: bool,
}

/// Indexes of a [`Change`]'s segments (see [`Change::index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeIndex {
    pub segment: u32,
    pub previous: Option<u32>,
    pub next: Option<u32>,
}

/// The values behind a change: `(atom, value)` in rule order.
pub type Because<'r> = Arc<[(&'r Atom, Shown)]>;

/// `because` as JSON values, by atom text (for tests and tools; the output writes [`Shown`]
/// directly).
pub fn because_json<'r>(b: &[(&'r Atom, Shown)]) -> Vec<(&'r str, serde_json::Value)> {
    b.iter()
        .map(|(a, v)| (a.text.as_str(), v.to_json()))
        .collect()
}

/// Which clock an event is evaluated against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Event time: `watermark` is the partition's watermark (`NO_TIME` before there is one).
    /// An event older than it is late; evaluation happens at the later of the customer's
    /// clock and the watermark.
    Event { watermark: i64 },
    /// Processing time: evaluation (and timers) at the wall clock `now`.
    Processing { now: i64 },
}

/// What became of an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to the state.
    Applied,
    /// Older than the watermark: applied to the lifetime aggregates only.
    Late,
    /// Its `event_id` was already applied for this customer: nothing changed.
    Duplicate,
    /// Replayed input that the customer's restored state already reflects (its changelog
    /// record was written after this offset): nothing changed, nothing emitted.
    Reflected,
}

/// Most timers one call may fire for one customer before it evaluates straight at the target
/// instant (only reached by rules re-checked periodically; see `rules::timing`).
const MAX_FIRES: usize = 256;

/// Every membership of a customer, evaluated from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memberships {
    pub segment: Vec<u16>,
    pub member: Vec<bool>,
}

/// The engine: compiled rules plus the logic that applies them.
#[derive(Debug, Clone)]
pub struct Engine {
    pub rules: Arc<RuleSet>,
    /// Event ids remembered per customer for duplicate detection (0: off).
    pub dedup: usize,
    /// The rule timer cache a customer without one starts an analysis with
    /// ([`Engine::with_timer_cache`]): every entry stale, then, per event kind, every entry
    /// `NEVER` but those of the rules that read that kind.
    fresh_timer_caches: [Box<[u64]>; 4],
    /// What it takes to read a customer's rule words.
    counts: RuleCounts,
}

/// Most event ids a customer may remember (their words' count in the activity buffer is a
/// `u16`).
pub const MAX_DEDUP_IDS: usize = 4096;

/// Default number of event ids remembered per customer.
pub const DEFAULT_DEDUP_IDS: usize = 8;

fn kind_bit(k: EventKind) -> u8 {
    match k {
        EventKind::Purchase => deps::PURCHASE,
        EventKind::Engagement => deps::ENGAGEMENT,
        EventKind::Profile => deps::PROFILE,
    }
}

impl Engine {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        let n = rules.timer_slot_deps.len();
        let fresh = |never_but: Option<u8>| {
            let mut cache = vec![0; RuleTimers::words(n)];
            RuleTimers::clear(&mut cache);
            if let Some(kinds) = never_but {
                RuleTimers::all_never(&mut cache, n);
                RuleTimers::invalidate(&mut cache, &rules, kinds);
            }
            cache.into_boxed_slice()
        };
        let fresh_timer_caches = [
            fresh(None),
            fresh(Some(deps::PURCHASE)),
            fresh(Some(deps::ENGAGEMENT)),
            fresh(Some(deps::PROFILE)),
        ];
        Engine {
            counts: RuleCounts::of(&rules),
            rules,
            dedup: DEFAULT_DEDUP_IDS,
            fresh_timer_caches,
        }
    }

    /// The cache [`Engine::with_timer_cache`] starts with (`never_but`: one event kind).
    fn fresh_timer_cache(&self, never_but: Option<u8>) -> &[u64] {
        let i = match never_but {
            Some(deps::PURCHASE) => 1,
            Some(deps::ENGAGEMENT) => 2,
            Some(deps::PROFILE) => 3,
            _ => 0,
        };
        &self.fresh_timer_caches[i]
    }

    pub fn with_dedup(mut self, ids: usize) -> Self {
        self.dedup = ids;
        self
    }

    pub fn new_customer(&self) -> Customer {
        let mut c = self.blank_customer();
        c.state.activity.set_rule_words(&self.initial_rule_words());
        c
    }

    /// A new customer without its rule words: the caller sets them (in the state's activity
    /// buffer, which a restore builds whole: [`crate::activity::Activity::from_parts`]).
    pub(crate) fn blank_customer(&self) -> Customer {
        Customer {
            state: CustomerState::new(),
            seq: 0,
            timer: NEVER,
        }
    }

    /// A new customer's rule words: every segment `NO_SEGMENT`, no membership, and no rule
    /// timer cache until the customer has a timer (`Engine::with_timer_cache`).
    pub fn initial_rule_words(&self) -> RuleWords {
        let segmentations = self.rules.segmentations.len();
        let member_words = self.rules.segments.len().div_ceil(64);
        let mut w: RuleWords = smallvec::smallvec![0; segment_words(segmentations) + member_words];
        for si in 0..segmentations {
            set_lane::<16>(&mut w, si, NO_SEGMENT as u64);
        }
        w
    }

    /// The rule words of a restored customer with these segments and membership bits (no
    /// rule timer cache); None if their numbers are not those of the rules.
    pub fn restored_rule_words(&self, segments: &[u16], members: &[u64]) -> Option<RuleWords> {
        let mut w = self.initial_rule_words();
        let start = segment_words(self.rules.segmentations.len());
        if segments.len() != self.rules.segmentations.len() || members.len() != w.len() - start {
            return None;
        }
        for (si, &v) in segments.iter().enumerate() {
            set_lane::<16>(&mut w, si, v as u64);
        }
        w[start..].copy_from_slice(members);
        Some(w)
    }

    fn ctx<'a>(&'a self, st: &'a CustomerState, now: i64) -> Ctx<'a> {
        Ctx::new(st, &self.rules.state, &self.rules.symbols, now)
    }

    /// Applies one event at the customer's own clock (event time, no watermark) and appends
    /// the resulting changes to `out`. A refused event (e.g. an attribute of the wrong type)
    /// changes nothing.
    pub fn apply<'r>(
        &'r self,
        c: &mut Customer,
        ev: &Event<'_>,
        out: &mut Vec<Change<'r>>,
    ) -> Result<Applied, Rejected> {
        self.apply_at(c, ev, Clock::Event { watermark: NO_TIME }, out)
    }

    /// Applies one event under `clock`: fires the customer's timers due before it, applies
    /// it (lifetime aggregates only if it is late), re-evaluates the rules it can affect and
    /// sets the customer's next timer. A refused event changes nothing.
    pub fn apply_at<'r>(
        &'r self,
        c: &mut Customer,
        ev: &Event<'_>,
        clock: Clock,
        out: &mut Vec<Change<'r>>,
    ) -> Result<Applied, Rejected> {
        CustomerState::validate(&self.rules.state, ev)?;
        if !self.remember(c, ev.event_id.as_deref()) {
            return Ok(Applied::Duplicate);
        }
        let (late, due_by) = match clock {
            Clock::Event { watermark } => (ev.ts < watermark, ev.ts.max(watermark)),
            Clock::Processing { now } => (false, now),
        };
        let first = c.state.last_seen == NO_TIME;
        // No timer after an evaluation: every rule was `NEVER`, and only this event's kind
        // can change that ([`Engine::with_timer_cache`]).
        let never_but = (!first && c.timer == NEVER).then_some(kind_bit(ev.kind()));
        if !first {
            self.advance(c, due_by, out);
        }
        c.state
            .apply_with(&self.rules.state, &self.rules.symbols, ev, !late);
        let mask = if first {
            u8::MAX
        } else {
            kind_bit(ev.kind()) | deps::TIME
        };
        let now = match clock {
            Clock::Event { watermark } => c.state.last_seen.max(watermark),
            Clock::Processing { now } => now,
        };
        c.timer = self
            .evaluate_and_schedule(c, mask, never_but, kind_bit(ev.kind()), now, false, out)
            .max(now.saturating_add(1));
        Ok(if late {
            Applied::Late
        } else {
            Applied::Applied
        })
    }

    /// Records an event id; false if it is among the customer's recent ones (a duplicate).
    fn remember(&self, c: &mut Customer, event_id: Option<&str>) -> bool {
        let Some(id) = event_id.filter(|_| self.dedup > 0) else {
            return true;
        };
        c.remember(fnv1a(id.as_bytes()), self.dedup)
    }

    /// Fires every timer of the customer due at or before `upto`, in order: each re-evaluates
    /// the time-dependent rules at its due instant (changes marked `by_timer`, `at` = due) and
    /// sets the next timer.
    pub fn advance<'r>(&'r self, c: &mut Customer, upto: i64, out: &mut Vec<Change<'r>>) {
        for _ in 0..MAX_FIRES {
            let due = c.timer;
            if due > upto {
                return;
            }
            c.timer = self
                .evaluate_and_schedule(c, deps::TIME, None, 0, due, true, out)
                .max(due + 1);
        }
        if c.timer <= upto {
            c.timer = self
                .evaluate_and_schedule(c, deps::TIME, None, 0, upto, true, out)
                .max(upto.saturating_add(1));
        }
    }

    /// The next instant after `now` at which one of the customer's time-dependent rules may
    /// flip (`NEVER` if none can). For a segmentation only the rules up to the current winner
    /// matter: a later rule cannot change the outcome unless one of those does first.
    pub fn next_timer(&self, c: &mut Customer, now: i64) -> i64 {
        self.with_timer_cache(c, None, 0, |state, _, words, layout| {
            self.next_timer_in(&self.ctx(state, now), words, layout)
        })
    }

    /// Runs `analyse` (an analysis, which returns the customer's next timer) over the
    /// customer's `words` with a rule timer cache. A customer gets its cache when it first has
    /// a timer: one that time alone never changes (nothing bought, say) keeps none, 48 bytes
    /// fewer with the default rules. Until then the analysis runs with a cache on the stack,
    /// kept if a timer comes out, otherwise dropped (the segments and bits written are kept).
    /// That cache starts stale, unless `never_but` says that every rule was `NEVER` at the
    /// last analysis and only events of these kinds came since: then only the rules that read
    /// them are analysed again, as with a cache of its own. An existing cache first forgets
    /// the entries of the rules that read events of the kinds in `applied`.
    ///
    /// The words are copied out of the customer's activity buffer and written back after
    /// ([`RuleWords`]): the analysis reads the state in the same buffer.
    fn with_timer_cache(
        &self,
        c: &mut Customer,
        never_but: Option<u8>,
        applied: u8,
        analyse: impl FnOnce(&CustomerState, &mut u64, &mut [u64], Layout) -> i64,
    ) -> i64 {
        let n = RuleTimers::words(self.rules.timer_slot_deps.len());
        let mut layout = c.layout(self.counts);
        let fresh = layout.timers.is_empty() && n > 0;
        if fresh {
            layout.timers = layout.timers.start..layout.timers.start + n;
        }
        // On the stack (a vector only for rule sets too large for it), filled in place.
        let mut on_stack = [0u64; 32];
        let mut on_heap = Vec::new();
        let words = match on_stack.get_mut(..layout.timers.end) {
            Some(w) => w,
            None => {
                on_heap.resize(layout.timers.end, 0);
                &mut on_heap[..]
            }
        };
        let stored = c.state.activity.rule_words();
        for (w, s) in words.iter_mut().zip(stored) {
            *w = crate::activity::join(s);
        }
        if fresh {
            words[layout.timers.clone()].copy_from_slice(self.fresh_timer_cache(never_but));
        } else if applied != 0 {
            RuleTimers::invalidate(&mut words[layout.timers.clone()], &self.rules, applied);
        }
        let Customer { state, seq, .. } = c;
        let t = analyse(state, seq, words, layout.clone());
        let keep = if fresh && t == NEVER {
            layout.timers.start
        } else {
            layout.timers.end
        };
        c.state.activity.set_rule_words(&words[..keep]);
        t
    }

    /// [`Engine::next_timer`] in a context already built (by [`Engine::evaluate_in`], whose
    /// window reads it reuses), over the customer's `words`. The memberships in `words` must
    /// be those at `cx.now` (as after an evaluation): they tell the analysis each rule's value.
    fn next_timer_in(&self, cx: &Ctx<'_>, words: &mut [u64], layout: Layout) -> i64 {
        let (now, Layout { members, timers }) = (cx.now, layout);
        // The segment words come first: read them beside the cache, which is written.
        let (head, rest) = words.split_at_mut(timers.start);
        let cache = &mut rest[..timers.len()];
        let mut base = RuleTimers::base(cache);
        // Rules whose instant is only known to be later than a bound, looked at last.
        let mut beyond: SmallVec<[(i64, &Rule, Option<bool>); 4]> = SmallVec::new();
        let mut next = |r, value| Self::cached_next(cache, &mut base, cx, r, value, &mut beyond);
        let mut t = NEVER;
        for (si, seg) in self.rules.segmentations.iter().enumerate() {
            if seg.deps & deps::TIME == 0 {
                continue;
            }
            let winner = segment_in(head, si);
            let upto = (winner as usize).saturating_add(1).min(seg.segments.len());
            for (j, r) in seg.segments[..upto].iter().enumerate() {
                if r.deps & deps::TIME != 0 {
                    // The rules before the winner are false, the winner's is true.
                    let value = (winner != NO_SEGMENT).then_some(j == winner as usize);
                    t = t.min(next(r, value));
                }
            }
        }
        for (i, r) in self.rules.segments.iter().enumerate() {
            if r.deps & deps::TIME != 0 {
                let value = head[members + i / 64] & (1 << (i % 64)) != 0;
                t = t.min(next(r, Some(value)));
            }
        }
        // A bound matters only if it is earlier than every instant known.
        for (bound, r, value) in beyond {
            if bound < t {
                let x = r.timing.next_change_given(cx, value);
                RuleTimers::set_from(cache, &mut base, r.timer_slot, x, now);
                t = t.min(x);
            }
        }
        t
    }

    /// Rule `r`'s next instant from the cache, analysed if stale (`value`: the rule's value
    /// now, if known); a bound is put in `beyond` (and counts as `NEVER` here).
    fn cached_next<'a>(
        cache: &mut [u64],
        base: &mut i64,
        cx: &Ctx<'_>,
        r: &'a Rule,
        value: Option<bool>,
        beyond: &mut SmallVec<[(i64, &'a Rule, Option<bool>); 4]>,
    ) -> i64 {
        match RuleTimers::get_from(cache, *base, r.timer_slot, cx.now) {
            Cached::At(t) => t,
            Cached::Beyond(bound) => {
                beyond.push((bound, r, value));
                NEVER
            }
            Cached::Stale => {
                let t = r.timing.next_change_given(cx, value);
                RuleTimers::set_from(cache, base, r.timer_slot, t, cx.now);
                t
            }
        }
    }

    /// Re-evaluates the rule units whose dependencies intersect `mask` at time `now`, records
    /// and appends every change, and returns the next timer ([`Engine::next_timer`]). The
    /// timer analysis reads the windows the evaluation has read from the same context
    /// ([`Ctx`]), instead of searching the buckets again. `applied` is the kind of the event
    /// just applied (0 for none), whose rules' cached instants are stale.
    #[allow(clippy::too_many_arguments)]
    fn evaluate_and_schedule<'r>(
        &'r self,
        c: &mut Customer,
        mask: u8,
        never_but: Option<u8>,
        applied: u8,
        now: i64,
        by_timer: bool,
        out: &mut Vec<Change<'r>>,
    ) -> i64 {
        self.with_timer_cache(c, never_but, applied, |state, seq, words, layout| {
            let cx = self.ctx(state, now);
            self.evaluate_in(&cx, words, seq, layout.clone(), mask, by_timer, out);
            self.next_timer_in(&cx, words, layout)
        })
    }

    /// The evaluation of [`Engine::evaluate_and_schedule`], in one context for every unit, so
    /// that a window read by several rules is searched once ([`Ctx`]). `words` and `seq` are
    /// the customer's, written beside it.
    #[allow(clippy::too_many_arguments)]
    fn evaluate_in<'r>(
        &'r self,
        cx: &Ctx<'_>,
        words: &mut [u64],
        seq: &mut u64,
        Layout { members, timers }: Layout,
        mask: u8,
        by_timer: bool,
        out: &mut Vec<Change<'r>>,
    ) {
        let rules = &*self.rules;
        let now = cx.now;
        // Whether one of these rules may have changed value by `now` as time passed: its
        // cached timer (see [`RuleTimers`]) is due or unknown. False means every one of them
        // still has the value it had when last evaluated.
        let time_may_flip = |words: &[u64], rules: &[Rule]| {
            let cache = &words[timers.clone()];
            rules
                .iter()
                .any(|r| r.deps & deps::TIME != 0 && !RuleTimers::holds(cache, r.timer_slot, now))
        };
        for (si, seg) in rules.segmentations.iter().enumerate() {
            let current = segment_in(words, si);
            if current != NO_SEGMENT {
                if seg.deps & mask == 0 {
                    continue;
                }
                // Only time moved for this unit: nothing to do unless one of the rules that
                // decide the winner (those up to it) may have flipped by now.
                let upto = (current as usize + 1).min(seg.segments.len());
                if seg.deps & mask & !deps::TIME == 0
                    && !time_may_flip(words, &seg.segments[..upto])
                {
                    continue;
                }
            }
            let winner = seg
                .segments
                .iter()
                .position(|r| r.program.holds(cx))
                .unwrap_or(seg.default_index()) as u16;
            if winner == current {
                continue;
            }
            let because = self.shown(seg.atoms_upto(winner as usize), cx);
            let new_name = seg.segment_name(winner as usize);
            if current != NO_SEGMENT {
                *seq += 1;
                out.push(Change {
                    segmentation: Some(si),
                    segment: seg.segment_name(current as usize),
                    kind: ChangeKind::Exited,
                    previous: None,
                    next: Some(new_name),
                    index: ChangeIndex {
                        segment: current.into(),
                        previous: None,
                        next: Some(winner.into()),
                    },
                    at: now,
                    seq: *seq,
                    because: because.clone(),
                    by_timer,
                });
            }
            *seq += 1;
            out.push(Change {
                segmentation: Some(si),
                segment: new_name,
                kind: ChangeKind::Entered,
                previous: (current != NO_SEGMENT).then(|| seg.segment_name(current as usize)),
                next: None,
                index: ChangeIndex {
                    segment: winner.into(),
                    previous: (current != NO_SEGMENT).then_some(current.into()),
                    next: None,
                },
                at: now,
                seq: *seq,
                because,
                by_timer,
            });
            set_lane::<16>(words, si, winner as u64);
        }
        for (i, rule) in rules.segments.iter().enumerate() {
            if rule.deps & mask == 0
                || (rule.deps & mask & !deps::TIME == 0
                    && !time_may_flip(words, std::slice::from_ref(rule)))
            {
                continue;
            }
            let holds = rule.program.holds(cx);
            let (word, bit) = (&mut words[members + i / 64], 1u64 << (i % 64));
            if holds == (*word & bit != 0) {
                continue;
            }
            *word ^= bit; // the bit differs from `holds`: now it is `holds`
            *seq += 1;
            out.push(Change {
                segmentation: None,
                segment: &rule.name,
                kind: if holds {
                    ChangeKind::Entered
                } else {
                    ChangeKind::Exited
                },
                previous: None,
                next: None,
                index: ChangeIndex {
                    // Fewer rules than memory has bytes.
                    segment: i as u32,
                    ..Default::default()
                },
                at: now,
                seq: *seq,
                because: self.shown(&rule.atoms, cx),
                by_timer,
            });
        }
    }

    /// The values of `atoms` (each text once already), for a change.
    fn shown<'r>(&'r self, atoms: &'r [Atom], cx: &Ctx<'_>) -> Because<'r> {
        atoms.iter().map(|a| (a, a.shown(cx))).collect()
    }

    /// The values of the given atoms, deduplicated by text, in order, as JSON (for
    /// explanations; a change carries [`Shown`] values instead).
    pub fn because<'r>(
        &'r self,
        atoms: impl Iterator<Item = &'r Atom>,
        st: &CustomerState,
        now: i64,
    ) -> Vec<(&'r str, serde_json::Value)> {
        let cx = self.ctx(st, now);
        let mut out: Vec<(&'r str, serde_json::Value)> = Vec::new();
        for a in atoms {
            if !out.iter().any(|(t, _)| *t == a.text) {
                out.push((
                    a.text.as_str(),
                    val_to_json(a.expr.eval(&cx), &self.rules.symbols),
                ));
            }
        }
        out
    }

    /// Recomputes memberships and the timer from the state at `now` without emitting changes
    /// or touching `seq`: for state restored from a changelog written under other rules.
    pub fn reset_memberships(&self, c: &mut Customer, now: i64) {
        c.clear_rule_timers(self.counts);
        let m = self.evaluate_all(&c.state, now);
        c.set_segments(self.counts, &m.segment);
        let mut bits: RuleWords = smallvec::smallvec![0; self.counts.member_words];
        for (i, _) in m.member.iter().enumerate().filter(|(_, on)| **on) {
            bits[i / 64] |= 1 << (i % 64);
        }
        c.set_members(self.counts, &bits);
        c.timer = self.next_timer(c, now).max(now.saturating_add(1));
    }

    /// Every membership evaluated from scratch at `now` (for queries and as the reference the
    /// incremental path is tested against).
    pub fn evaluate_all(&self, st: &CustomerState, now: i64) -> Memberships {
        let cx = self.ctx(st, now);
        Memberships {
            segment: self
                .rules
                .segmentations
                .iter()
                .map(|s| {
                    s.segments
                        .iter()
                        .position(|r| r.expr.eval_bool(&cx))
                        .unwrap_or(s.default_index()) as u16
                })
                .collect(),
            member: self
                .rules
                .segments
                .iter()
                .map(|r| r.expr.eval_bool(&cx))
                .collect(),
        }
    }

    /// The customer's current memberships as recorded by incremental evaluation.
    pub fn memberships(&self, c: &Customer) -> Memberships {
        Memberships {
            segment: c.segments(self.counts).collect(),
            member: (0..self.rules.segments.len())
                .map(|i| c.is_member(self.counts, i))
                .collect(),
        }
    }

    /// How to read this engine's customers' rule words.
    pub fn counts(&self) -> RuleCounts {
        self.counts
    }

    /// What of `c` compares.
    pub fn view(&self, c: &Customer) -> CustomerView {
        CustomerView {
            state: c.state.clone(),
            segments: c.segments(self.counts).collect(),
            members: c.members(self.counts).collect(),
            seq: c.seq,
            timer: c.timer,
            recent_ids: c.recent_ids().collect(),
        }
    }
}

/// Test support: customers built by the engine from generated input.
#[cfg(test)]
impl Engine {
    /// Applies `events` events of `g` to customers it creates (malformed ones skipped),
    /// handing each event's changes to `each`; returns the customers by id.
    pub(crate) fn replay<'r>(
        &'r self,
        g: &mut crate::generate::Generator,
        events: usize,
        mut each: impl FnMut(&[Change<'r>]),
    ) -> std::collections::BTreeMap<String, Customer> {
        let mut customers = std::collections::BTreeMap::new();
        for _ in 0..events {
            let ev = g.next_event();
            let Ok(decoded) = crate::event::decode(ev.json.as_bytes()) else {
                continue;
            };
            let c = customers
                .entry(ev.customer_id.clone())
                .or_insert_with(|| self.new_customer());
            let mut out = Vec::new();
            let _ = self.apply(c, &decoded, &mut out);
            each(&out);
        }
        customers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;

    const RULES: &str = r#"
[attributes]
industry = "string"
company_size = "number"

[[segmentation]]
name = "lifecycle"
default = "prospect"
  [[segmentation.segment]]
  name = "lapsed"
  when = "purchases.count > 0 && days_since(purchases.last) > 60"
  [[segmentation.segment]]
  name = "active"
  when = "purchases.count_30d >= 1"

[[segment]]
name = "enterprise_finance"
when = 'attr.industry == "finance" && attr.company_size > 500'

[[segment]]
name = "frequent"
when = "purchases.count_30d >= 3"
"#;

    fn engine() -> Engine {
        Engine::new(Arc::new(RuleSet::from_toml("t.toml", RULES).unwrap()))
    }

    #[test]
    fn a_customer_fits_136_bytes() {
        assert!(
            std::mem::size_of::<Customer>() <= 136,
            "{}",
            std::mem::size_of::<Customer>()
        );
    }

    #[test]
    fn segments_members_and_timers_share_one_block_without_overlap() {
        // Six segmentations (two words of segment indexes), 70 independent segments (two
        // words of bits), each a time-dependent rule (timer cache slots).
        let mut text = String::new();
        for s in 0..6 {
            text += &format!(
                "[[segmentation]]\nname = \"s{s}\"\ndefault = \"none\"\n[[segmentation.segment]]\nname = \"a\"\nwhen = \"purchases.count_30d >= {s}\"\n"
            );
        }
        for i in 0..70 {
            text +=
                &format!("[[segment]]\nname = \"m{i}\"\nwhen = \"purchases.count_7d >= {i}\"\n");
        }
        let e = Engine::new(Arc::new(RuleSet::from_toml("t.toml", &text).unwrap()));
        let mut c = e.new_customer();
        assert_eq!(
            c.segments(e.counts).collect::<Vec<_>>(),
            vec![NO_SEGMENT; 6]
        );
        assert_eq!(c.members(e.counts).collect::<Vec<_>>(), [0, 0]);
        // No timer cache before the customer has a timer.
        assert!(c.timer_range(e.counts).is_empty());
        assert_eq!(c.load_words().len(), 4);
        assert_eq!(
            e.next_timer(&mut c, 0),
            NEVER,
            "nothing bought: no count can fall"
        );
        assert!(c.timer_range(e.counts).is_empty(), "no timer, no cache");
        // A purchase: `count_7d >= 1` and `count_30d >= 1` hold until it leaves the windows.
        run(&e, &mut c, &purchase(1));
        assert!(c.timer < NEVER);
        let timers = c.timer_range(e.counts);
        // A base word and 32 bits per time-dependent rule, filled by the analysis that found
        // the timer.
        assert!(e.rules.timer_slot_deps.len() >= 70);
        assert_eq!(timers.len(), 1 + e.rules.timer_slot_deps.len().div_ceil(2));
        let words = c.load_words();
        let cache = &words[timers.clone()];
        assert!(
            (0..70).all(|i| RuleTimers::get(cache, Some(i), crate::time::DAY_MS) != Cached::Stale)
        );
        // The evaluation's segments and bits, written before the cache came, are kept.
        let none = e.rules.segmentations[2].default_index() as u16;
        assert_eq!(
            c.segments(e.counts).collect::<Vec<_>>(),
            [0, 0, none, none, none, none]
        );
        assert_eq!(c.members(e.counts).collect::<Vec<_>>(), [0b11, 0]);
        c.set_member(e.counts, 1, false);
        c.edit_words(|w| set_lane::<16>(w, 3, 7));
        c.set_member(e.counts, 69, true);
        c.edit_words(|w| set_lane::<16>(w, 4, 9));
        c.set_member(e.counts, 0, true);
        let r = c.timer_range(e.counts);
        c.edit_words(|w| w[r.clone()].fill(42));
        assert!(c.remember(5, 4) && c.remember(8, 4));
        assert_eq!(
            c.segments(e.counts).collect::<Vec<_>>(),
            [0, 0, none, 7, 9, none]
        );
        assert_eq!(c.members(e.counts).collect::<Vec<_>>(), [1, 1 << 5]);
        assert!(
            c.is_member(e.counts, 69) && c.is_member(e.counts, 0) && !c.is_member(e.counts, 68)
        );
        assert!(
            c.load_words()[r].iter().all(|t| *t == 42),
            "the recent ids are outside the block"
        );
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![5, 9]);
        assert!(
            !c.set_segments(e.counts, &[1, 2]),
            "another number of segmentations"
        );
        assert!(c.set_segments(e.counts, &[0, 1, 2, 3, 4, 5]));
        assert_eq!(
            c.segments(e.counts).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5]
        );
        c.set_recent_ids(&[], 4);
        assert_eq!(
            (
                c.recent_ids().count(),
                c.members(e.counts).collect::<Vec<_>>()
            ),
            (0, vec![1u64, 1 << 5])
        );
        assert_eq!(c.load_words().len(), 2 + 2 + timers.len());
        c.set_recent_ids(&[3], 0);
        assert_eq!(c.recent_ids().count(), 0);
        assert!(c.remember(3, 0), "none kept");
        assert_eq!(c.recent_ids().count(), 0);
    }

    #[test]
    fn recent_ids_are_the_newest_in_order() {
        let mut c = engine().new_customer();
        assert!(c.remember(2, 3));
        assert_eq!(
            c.state.activity.recent().len(),
            1,
            "one id kept, not three slots"
        );
        for h in [4, 6, 8, 10] {
            assert!(c.remember(h, 3));
        }
        assert_eq!(c.state.activity.recent().len(), 3);
        // Stored with the low bit set; oldest first.
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![7, 9, 11]);
        assert!(!c.remember(8, 3), "among the newest three");
        assert!(!c.remember(6, 3));
        assert!(c.remember(4, 3), "forgotten");
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![9, 11, 5]);
        // Another setting keeps the newest that fit, in order.
        c.set_recent_ids(&[1, 3, 5, 7], 2);
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![5, 7]);
        assert!(c.remember(8, 4), "the list grows to the new setting");
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![5, 7, 9]);
        assert!(!c.remember(4, 4));
        // A lower setting drops the oldest beyond it first.
        assert!(c.remember(10, 2));
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![9, 11]);
        assert!(c.remember(12, 2));
        assert_eq!(c.recent_ids().collect::<Vec<_>>(), vec![11, 13]);
        assert!(c.remember(14, 0) && c.remember(14, 0), "none kept");
        assert_eq!(c.recent_ids().count(), 0);
        assert!(c.remember(2, 8));
        c.set_recent_ids(&[], 8);
        assert_eq!(c.recent_ids().count(), 0);
    }

    fn run<'r>(e: &'r Engine, c: &mut Customer, json: &str) -> Vec<Change<'r>> {
        let mut out = Vec::new();
        e.apply(c, &decode(json.as_bytes()).unwrap(), &mut out)
            .unwrap();
        out
    }

    fn purchase(day: i64) -> String {
        format!(
            r#"{{"customer_id":"c","type":"purchase","timestamp":{},"amount":10}}"#,
            day * crate::time::DAY_MS
        )
    }

    #[test]
    fn a_change_indexes_the_segments_it_names() {
        let e = Engine::new(Arc::new(RuleSet::embedded_default()));
        let rules = &e.rules;
        let mut g = crate::generate::Generator::new(7, 50, 1_767_225_600_000, 3_600_000);
        let (mut entered_with_previous, mut exited_with_next, mut independent) = (0, 0, 0);
        e.replay(&mut g, 3_000, |out| {
            for ch in out {
                let name = |i: u32| match ch.segmentation {
                    Some(s) => rules.segmentations[s].segment_name(i as usize),
                    None => rules.segments[i as usize].name.as_str(),
                };
                assert_eq!(name(ch.index.segment), ch.segment, "{ch:?}");
                assert_eq!(ch.index.previous.map(name), ch.previous, "{ch:?}");
                assert_eq!(ch.index.next.map(name), ch.next, "{ch:?}");
                entered_with_previous += ch.previous.is_some() as u32;
                exited_with_next += ch.next.is_some() as u32;
                independent += ch.segmentation.is_none() as u32;
            }
        });
        // Every kind of index was checked.
        assert!(entered_with_previous > 0 && exited_with_next > 0 && independent > 0);
    }

    #[test]
    fn first_event_assigns_default_and_purchases_move_segments() {
        let e = engine();
        let mut c = e.new_customer();
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"engagement","timestamp":0,"action":"login"}"#,
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segment, ch[0].kind, ch[0].previous, ch[0].seq),
            ("prospect", ChangeKind::Entered, None, 1)
        );

        let ch = run(&e, &mut c, &purchase(1));
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert_eq!(
            (ch[0].segment, ch[0].kind, ch[0].next),
            ("prospect", ChangeKind::Exited, Some("active"))
        );
        assert_eq!(
            (ch[1].segment, ch[1].kind, ch[1].previous, ch[1].seq),
            ("active", ChangeKind::Entered, Some("prospect"), 3)
        );
        assert_eq!(
            because_json(&ch[1].because),
            vec![
                ("purchases.count", serde_json::json!(1)),
                ("days_since(purchases.last)", serde_json::json!(0)),
                ("purchases.count_30d", serde_json::json!(1))
            ]
        );

        run(&e, &mut c, &purchase(2));
        let ch = run(&e, &mut c, &purchase(3));
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segmentation, ch[0].segment, ch[0].kind),
            (None, "frequent", ChangeKind::Entered)
        );
        assert_eq!(c.seq, 4);
    }

    #[test]
    fn time_passing_fires_timers_at_the_exact_instant_before_the_next_event() {
        let e = engine();
        let mut c = e.new_customer();
        run(&e, &mut c, &purchase(0));
        // The 30-day window loses the purchase's bucket exactly 30 days later.
        assert_eq!(c.timer, 30 * crate::time::DAY_MS);
        // 70 days later an engagement arrives: first the two moves time caused, each at its
        // own instant, then the event itself (which changes nothing more).
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"engagement","timestamp":6048000000,"action":"login"}"#,
        );
        let got: Vec<_> = ch
            .iter()
            .map(|c| (c.segment, c.kind, c.at, c.by_timer))
            .collect();
        let d30 = 30 * crate::time::DAY_MS;
        let d60 = 60 * crate::time::DAY_MS + 1; // days_since > 60: the first ms after 60 days
        assert_eq!(
            got,
            vec![
                ("active", ChangeKind::Exited, d30, true),
                ("prospect", ChangeKind::Entered, d30, true),
                ("prospect", ChangeKind::Exited, d60, true),
                ("lapsed", ChangeKind::Entered, d60, true),
            ]
        );
        assert_eq!(
            because_json(&ch[3].because)[1],
            // 60 days and 1 ms, shown rounded to 6 decimals.
            ("days_since(purchases.last)", serde_json::json!(60.0))
        );
        assert_eq!(c.timer, NEVER, "nothing left that time can change");
    }

    #[test]
    fn the_timer_cache_keeps_exact_instants_across_a_rebase_and_bounds_only_below_the_truth() {
        let day = crate::time::DAY_MS;
        let mut cache = vec![0u64; RuleTimers::words(4)];
        RuleTimers::clear(&mut cache);
        let at = |cache: &[u64], i: u16, now: i64| RuleTimers::get(cache, Some(i), now);
        assert_eq!(at(&cache, 0, 0), Cached::Stale, "nothing known yet");
        RuleTimers::set(&mut cache, Some(0), 10 * day, 0);
        RuleTimers::set(&mut cache, Some(1), 30 * day, 0);
        RuleTimers::set(&mut cache, Some(2), 60 * day, 0);
        RuleTimers::set(&mut cache, Some(3), NEVER, 0);
        let range = BEYOND as i64;
        assert_eq!(
            [0, 1, 2, 3].map(|i| at(&cache, i, 0)),
            [
                Cached::At(10 * day),
                Cached::At(30 * day),
                Cached::Beyond(range),
                Cached::At(NEVER)
            ]
        );
        assert_eq!(
            at(&cache, 0, 10 * day),
            Cached::Stale,
            "due: no longer valid"
        );
        // 65 days, seen from day 20, fits once the base moves to day 20: exact entries keep
        // their instants, the bound is dropped (it would claim more than is known).
        RuleTimers::set(&mut cache, Some(0), 65 * day, 20 * day);
        assert_eq!(
            [0, 1, 2, 3].map(|i| at(&cache, i, 20 * day)),
            [
                Cached::At(65 * day),
                Cached::At(30 * day),
                Cached::Stale,
                Cached::At(NEVER)
            ]
        );
        // An event forgets the entries of the rules that read what it changes, only those.
        let rules = RuleSet::embedded_default();
        let n = rules.timer_slot_deps.len();
        let mut cache = vec![0u64; RuleTimers::words(n)];
        RuleTimers::clear(&mut cache);
        for i in 0..n as u16 {
            RuleTimers::set(&mut cache, Some(i), day + i as i64, 0);
        }
        let mask = kind_bit(EventKind::Engagement);
        RuleTimers::invalidate(&mut cache, &rules, mask);
        let kept: Vec<bool> = (0..n as u16)
            .map(|i| at(&cache, i, 0) == Cached::At(day + i as i64))
            .collect();
        let want: Vec<bool> = rules
            .timer_slot_deps
            .iter()
            .map(|d| d & mask == 0)
            .collect();
        assert_eq!(kept, want);
        assert!(want.contains(&true) && want.contains(&false));
    }

    #[test]
    fn a_rule_instant_beyond_the_timer_cache_range_is_still_the_exact_timer() {
        let day = crate::time::DAY_MS;
        let e = engine();
        let mut c = e.new_customer();
        run(&e, &mut c, &purchase(0));
        assert_eq!(c.timer, 30 * day);
        // Past 30 days the only rule left that time can change is the 60-day lapse, further
        // than the cache's range from its base: the timer is its exact instant, not a bound
        // that would fire for nothing first.
        let mut out = Vec::new();
        e.advance(&mut c, 30 * day, &mut out);
        assert_eq!(out.len(), 2, "active -> prospect");
        assert_eq!(c.timer, 60 * day + 1);
        // The same with that rule alone, from the first event.
        let rules = r#"
[[segmentation]]
name = "life"
default = "other"
[[segmentation.segment]]
name = "lapsed"
when = "purchases.count > 0 && days_since(purchases.last) > 60"
"#;
        let e = Engine::new(Arc::new(RuleSet::from_toml("t.toml", rules).unwrap()));
        let mut c = e.new_customer();
        run(&e, &mut c, &purchase(0));
        assert_eq!(c.timer, 60 * day + 1);
        let mut out = Vec::new();
        e.advance(&mut c, 60 * day, &mut out);
        assert!(out.is_empty());
        e.advance(&mut c, 60 * day + 1, &mut out);
        assert_eq!((out.len(), out[1].segment), (2, "lapsed"));
    }

    #[test]
    fn profile_only_touches_profile_rules() {
        let e = engine();
        let mut c = e.new_customer();
        run(&e, &mut c, &purchase(0));
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"industry":"finance","company_size":900}}"#,
        );
        assert_eq!(ch.len(), 1);
        assert_eq!(
            (ch[0].segment, ch[0].kind),
            ("enterprise_finance", ChangeKind::Entered)
        );
        let ch = run(
            &e,
            &mut c,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"company_size":100}}"#,
        );
        assert_eq!(
            (ch[0].segment, ch[0].kind),
            ("enterprise_finance", ChangeKind::Exited)
        );
        assert_eq!(
            because_json(&ch[0].because),
            vec![
                ("attr.industry", serde_json::json!("finance")),
                ("attr.company_size", serde_json::json!(100))
            ]
        );
    }

    #[test]
    fn rejected_event_changes_nothing() {
        let e = engine();
        let mut c = e.new_customer();
        run(&e, &mut c, &purchase(0));
        let before = c.clone();
        let mut out = Vec::new();
        let ev = decode(br#"{"customer_id":"c","type":"profile","timestamp":5,"attributes":{"company_size":"huge"}}"#).unwrap();
        assert!(e.apply(&mut c, &ev, &mut out).is_err());
        assert!(out.is_empty());
        assert_eq!(e.view(&c), e.view(&before));
    }
}
