//! Per-customer behavioural state and its update from one event. Pure: no I/O, no clocks.
//!
//! This module owns what microseg remembers about a customer and how an event changes it:
//! lifetime purchase aggregates, sliding windows kept as *sparse time buckets* (only buckets
//! with activity are stored, and buckets older than the longest window are pruned, so memory
//! is bounded by the window length over the bucket width and is tiny for typical customers;
//! [`crate::windows`] keeps them as running totals, so reading a window costs two binary
//! searches), per-category / per-channel / per-action counts (these and the buckets share one
//! buffer, [`crate::activity`]), plan, engagement and the declared profile attributes.
//!
//! Window semantics (documented in the README): with bucket width `b`, a window of length `w`
//! evaluated at time `now` covers the `w / b` buckets ending with the bucket that contains
//! `now`, i.e. events with `ts >= floor(now / b) * b + b - w`.

pub use crate::activity::{Activity, Count, CountKind};
use smallvec::SmallVec;

use crate::event::{Body, Event, Scalar};
use crate::symbols::{Sym, Symbols};
use crate::windows::{self, Span, Walk};

/// Sentinel for "no timestamp".
pub const NO_TIME: i64 = i64::MIN;

/// The declared type of a profile attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    Number,
    String,
    Bool,
}

impl AttrType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "number" => Some(AttrType::Number),
            "string" => Some(AttrType::String),
            "bool" => Some(AttrType::Bool),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            AttrType::Number => "number",
            AttrType::String => "string",
            AttrType::Bool => "bool",
        }
    }
}

/// A profile attribute's value. A string is interned in the shared [`Symbols`] table, like a
/// category: attributes rules read are categorical (a country, an industry, a role), so many
/// customers share each value, and a rule compares it with a literal by its id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttrVal {
    Num(f64),
    Str(Sym),
    Bool(bool),
}

/// What the state keeps and how: bucket width, windows and declared attributes.
#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    pub bucket_ms: i64,
    /// Window lengths, in the order declared (feature names use them, e.g. `count_30d`).
    pub windows: Vec<Window>,
    pub attributes: Vec<(String, AttrType)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The name used in features (`7d`, `30d`, …).
    pub name: String,
    pub ms: i64,
}

impl StateConfig {
    /// Number of buckets spanned by the longest window.
    pub fn max_buckets(&self) -> u32 {
        self.windows
            .iter()
            .map(|w| (w.ms / self.bucket_ms) as u32)
            .max()
            .unwrap_or(0)
    }
    pub fn bucket_of(&self, ts: i64) -> u32 {
        ts.div_euclid(self.bucket_ms).clamp(0, u32::MAX as i64) as u32
    }
    /// The first bucket inside a window of `window_buckets` buckets at time `now`.
    pub fn window_start(&self, now: i64, window_buckets: u32) -> u32 {
        (self.bucket_of(now) + 1).saturating_sub(window_buckets)
    }
    /// The buckets of a window of `window_buckets` buckets at time `now`.
    pub fn span(&self, now: i64, window_buckets: u32) -> Span {
        Span {
            start: self.window_start(now, window_buckets),
            end: self.bucket_of(now),
        }
    }
    pub fn attribute_index(&self, name: &str) -> Option<usize> {
        self.attributes.iter().position(|(n, _)| n == name)
    }
}

/// Everything microseg remembers about one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerState {
    /// The customer's clock: the latest event time seen (epoch ms), `NO_TIME` before any.
    pub last_seen: i64,
    pub first_seen: i64,
    pub purchase_count: u32,
    pub engagement_count: u32,
    pub spend: f64,
    pub quantity: f64,
    pub first_purchase: i64,
    pub last_purchase: i64,
    pub last_engagement: i64,
    /// Plan of the latest purchase (by event time) that named one.
    pub plan: Option<Sym>,
    pub(crate) plan_ts: i64,
    /// Time of the latest profile event applied (older ones do not overwrite attributes).
    pub(crate) profile_ts: i64,
    /// The declared attributes' values ([`CustomerState::attrs`]), lifetime counts per
    /// category, channel and action, and the windows' purchases per bucket and engagements
    /// per bucket and action: one allocation.
    pub activity: Activity,
}

impl Default for CustomerState {
    /// A customer no event has described yet: every time is `NO_TIME`.
    fn default() -> Self {
        CustomerState {
            last_seen: NO_TIME,
            first_seen: NO_TIME,
            purchase_count: 0,
            engagement_count: 0,
            spend: 0.0,
            quantity: 0.0,
            first_purchase: NO_TIME,
            last_purchase: NO_TIME,
            last_engagement: NO_TIME,
            plan: None,
            plan_ts: NO_TIME,
            profile_ts: NO_TIME,
            activity: Activity::default(),
        }
    }
}

/// A view of the declared attributes' values, at the start of the customer's activity buffer
/// ([`crate::activity`]): a customer with none set (an anonymous visitor, say) keeps no
/// words, and attributes past the words read as unset.
///
/// The words are a tag per declared attribute, 4 bits each and 8 to a word, in declaration
/// order, then the payloads of the set values in the same order: two words for a number (its
/// bits), one for a string (its symbol), none for a bool (in the tag) or an unset value. The
/// four default attributes (three strings, a number) take 24 bytes; 16-byte slots with the
/// strings inline took 64.
///
/// The number of tag words is not stored: it is the first `k` for which `k` plus the payloads
/// of the first `k` tag words is the length (later `k` give larger sums, and for a smaller `k`
/// the sum falls short of the true one, so only the true `k` matches).
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a>(pub(crate) &'a [u32]);

/// The most attributes a rules file may declare: their words must fit the activity buffer's
/// 16-bit count of them (4 096 numbers take 512 tag words and 8 192 payload words).
pub const MAX_ATTRIBUTES: usize = 4096;

/// A tag: how an attribute's value is held. The low two bits are the payload's words, so
/// that a word's payloads are counted without looking at each tag ([`payloads`]).
const UNSET: u32 = 0b0000;
const STR: u32 = 0b0001;
const NUM: u32 = 0b0010;
const FALSE: u32 = 0b0100;
const TRUE: u32 = 0b1000;
const TAG_BITS: usize = 4;
const TAGS_PER_WORD: usize = 32 / TAG_BITS;

/// Payload words of a value with tag `t`.
fn payload(t: u32) -> usize {
    (t & 0b11) as usize
}

/// Payload words of the values whose tags are the first `n` (at most 8) of `word`.
#[inline]
fn payloads(word: u32, n: usize) -> usize {
    // Each tag's low two bits (0 to 2), summed a byte at a time (at most 4 a byte), then the
    // four bytes by a multiplication (at most 16): no per-tag loop, no `count_ones` (not an
    // instruction of the x86_64 baseline).
    let w = word & ((1u64 << (n * TAG_BITS)) - 1) as u32 & 0x3333_3333;
    let bytes = (w & 0x0F0F_0F0F) + (w >> 4 & 0x0F0F_0F0F);
    (bytes.wrapping_mul(0x0101_0101) >> 24) as usize
}

/// Tag `lane` (0 to 7) of a tag word.
fn tag_in(word: u32, lane: usize) -> u32 {
    word >> (lane * TAG_BITS) & 0xF
}

/// The value of tag `tag` whose payload starts with words `a`, `b`.
fn decode(tag: u32, a: u32, b: u32) -> Option<AttrVal> {
    match tag {
        NUM => Some(AttrVal::Num(f64::from_bits(a as u64 | (b as u64) << 32))),
        STR => Some(AttrVal::Str(a)),
        FALSE => Some(AttrVal::Bool(false)),
        TRUE => Some(AttrVal::Bool(true)),
        _ => None,
    }
}

fn tag_of(v: Option<AttrVal>) -> u32 {
    match v {
        None => UNSET,
        Some(AttrVal::Num(_)) => NUM,
        Some(AttrVal::Str(_)) => STR,
        Some(AttrVal::Bool(false)) => FALSE,
        Some(AttrVal::Bool(true)) => TRUE,
    }
}

impl Attrs<'_> {
    /// The number of tag words (see the type's docs).
    fn tag_words(&self) -> usize {
        let mut end = 0;
        for (k, w) in self.0.iter().enumerate() {
            end += 1 + payloads(*w, TAGS_PER_WORD);
            if end == self.0.len() {
                return k + 1;
            }
        }
        0
    }

    /// Attribute `i`'s tag and where its payload starts.
    #[inline]
    fn find(&self, i: usize) -> Option<(u32, usize)> {
        let (word, lane) = (i / TAGS_PER_WORD, i % TAGS_PER_WORD);
        let w0 = *self.0.first()?;
        // Up to 8 declared attributes (one tag word), without the general search.
        if word == 0 && self.0.len() == 1 + payloads(w0, TAGS_PER_WORD) {
            return Some((tag_in(w0, lane), 1 + payloads(w0, lane)));
        }
        let k = self.tag_words();
        if word >= k {
            return None;
        }
        let before: usize = self.0[..word]
            .iter()
            .map(|w| payloads(*w, TAGS_PER_WORD))
            .sum();
        let w = self.0[word];
        Some((tag_in(w, lane), k + before + payloads(w, lane)))
    }

    /// Attribute `i`'s value, if set.
    #[inline]
    pub fn get(&self, i: usize) -> Option<AttrVal> {
        let (tag, at) = self.find(i)?;
        let word = |j: usize| self.0.get(at + j).copied().unwrap_or_default();
        decode(tag, word(0), word(1))
    }

    /// The values of the `declared` attributes, in order.
    pub fn values(&self, declared: usize) -> SmallVec<[Option<AttrVal>; 8]> {
        let k = self.tag_words();
        let mut at = k;
        let word = |j: usize| self.0.get(j).copied().unwrap_or_default();
        (0..declared)
            .map(|i| {
                let tag = if i / TAGS_PER_WORD < k {
                    tag_in(word(i / TAGS_PER_WORD), i % TAGS_PER_WORD)
                } else {
                    UNSET
                };
                let v = decode(tag, word(at), word(at + 1));
                at += payload(tag);
                v
            })
            .collect()
    }

    /// The words that hold `values` (one per declared attribute): none if none is set.
    pub fn encode(values: &[Option<AttrVal>]) -> SmallVec<[u32; 16]> {
        let mut words = SmallVec::new();
        if values.iter().all(Option::is_none) {
            return words;
        }
        let k = values.len().div_ceil(TAGS_PER_WORD);
        words.resize(k, UNSET);
        for (i, v) in values.iter().enumerate() {
            words[i / TAGS_PER_WORD] |= tag_of(*v) << (i % TAGS_PER_WORD * TAG_BITS);
            match v {
                Some(AttrVal::Num(x)) => {
                    let b = x.to_bits();
                    words.extend_from_slice(&[b as u32, (b >> 32) as u32]);
                }
                Some(AttrVal::Str(s)) => words.push(*s),
                _ => {}
            }
        }
        words
    }

    /// Bytes of the words.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0)
    }
}

impl PartialEq for Attrs<'_> {
    fn eq(&self, o: &Self) -> bool {
        let n = TAGS_PER_WORD * self.tag_words().max(o.tag_words());
        (0..n).all(|i| self.get(i) == o.get(i))
    }
}

/// "Never": no instant at which a time-dependent value changes.
pub const NEVER: i64 = i64::MAX;

/// Why an event was refused by the state (it is not applied at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Asks the CPU to start loading `s`'s cache lines (all of them up to 512 bytes, otherwise
/// those of its first and last 256 bytes), so that the misses of a customer's separate
/// allocations overlap instead of coming one after the other. Only a hint: it never faults
/// and changes nothing.
pub(crate) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let (p, len) = (s.as_ptr().cast::<i8>(), std::mem::size_of_val(s));
        // A plain loop: one with `step_by` and `chain` took about 16 instructions a line.
        let lines = |mut at: usize, to: usize| {
            let last = to - 1;
            loop {
                // SAFETY: a prefetch is a hint to the cache: it does not fault on any
                // address and reads nothing into the program; SSE is part of the x86_64
                // baseline. The address is computed without dereferencing anything.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at.min(last))) };
                if at >= last {
                    break;
                }
                at += LINE;
            }
        };
        match len {
            0 => {}
            1..=512 => lines(0, len),
            _ => {
                lines(0, 256);
                lines(len - 256, len);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

impl CustomerState {
    /// Starts loading the state's separate allocation (see [`prefetch`]).
    pub(crate) fn prefetch(&self) {
        self.activity.prefetch();
    }

    /// The declared attributes' values.
    pub fn attrs(&self) -> Attrs<'_> {
        Attrs(self.activity.attr_words())
    }

    /// Holds `values`, one per declared attribute ([`Attrs::encode`]).
    pub fn set_attrs(&mut self, values: &[Option<AttrVal>]) {
        self.activity.set_attr_words(&Attrs::encode(values));
    }

    /// Sets attribute `i` of `declared` (the rules' count).
    pub fn set_attr(&mut self, i: usize, declared: usize, v: Option<AttrVal>) {
        let mut values = self.attrs().values(declared);
        if let Some(x) = values.get_mut(i) {
            *x = v;
            self.set_attrs(&values);
        }
    }

    /// A customer no event has described yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks an event against the declared attribute types without changing anything.
    pub fn validate(cfg: &StateConfig, ev: &Event<'_>) -> Result<(), Rejected> {
        if let Body::Profile { attributes } = &ev.body {
            for (name, value) in attributes {
                let Some(i) = cfg.attribute_index(name) else {
                    continue;
                };
                let ty = cfg.attributes[i].1;
                let ok = matches!(
                    (ty, value),
                    (_, Scalar::Null)
                        | (AttrType::Number, Scalar::Num(_))
                        | (AttrType::String, Scalar::Str(_))
                        | (AttrType::Bool, Scalar::Bool(_))
                );
                if !ok {
                    return Err(Rejected(format!(
                        "attribute `{name}` must be a {} (or null), got {}",
                        ty.as_str(),
                        scalar_kind(value)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Applies an already validated event. Events older than the longest window (relative to
    /// the customer's clock) still count in the lifetime aggregates but not in any window.
    pub fn apply(&mut self, cfg: &StateConfig, syms: &Symbols, ev: &Event<'_>) {
        self.apply_with(cfg, syms, ev, true)
    }

    /// Applies an already validated event; with `windows = false` (an event later than the
    /// allowed lateness) only to the lifetime aggregates, which stay correct whatever the
    /// arrival order: counts and sums, first/last times (min/max), per-category/channel/action
    /// counts, and plan and attributes only when newer than the values they would replace.
    pub fn apply_with(&mut self, cfg: &StateConfig, syms: &Symbols, ev: &Event<'_>, windows: bool) {
        let ts = ev.ts;
        if self.first_seen == NO_TIME || ts < self.first_seen {
            self.first_seen = ts;
        }
        self.last_seen = self.last_seen.max(ts);
        let horizon = self.last_seen_bucket_horizon(cfg);
        let b = cfg.bucket_of(ts);
        match &ev.body {
            Body::Purchase(p) => {
                self.purchase_count = self.purchase_count.saturating_add(1);
                self.spend += p.amount;
                self.quantity += p.quantity.unwrap_or(1.0);
                if self.first_purchase == NO_TIME || ts < self.first_purchase {
                    self.first_purchase = ts;
                }
                self.last_purchase = self.last_purchase.max(ts);
                if let Some(c) = &p.category {
                    self.activity
                        .add_count(CountKind::Category, syms.intern(c), 1);
                }
                if let Some(c) = &p.channel {
                    self.activity
                        .add_count(CountKind::Channel, syms.intern(c), 1);
                }
                if let Some(plan) = &p.plan {
                    if ts >= self.plan_ts {
                        self.plan = Some(syms.intern(plan));
                        self.plan_ts = ts;
                    }
                }
                if windows && b >= horizon && cfg.bucket_ms > 0 {
                    self.activity
                        .add_purchase(b, 1, windows::to_micros(p.amount));
                }
            }
            Body::Engagement { action } => {
                self.engagement_count = self.engagement_count.saturating_add(1);
                self.last_engagement = self.last_engagement.max(ts);
                let a = syms.intern(action);
                self.activity.add_count(CountKind::Action, a, 1);
                if windows && b >= horizon && cfg.bucket_ms > 0 {
                    self.activity.add_engagement(b, a);
                }
            }
            Body::Profile { attributes } => {
                if ts < self.profile_ts {
                    return self.prune(cfg);
                }
                self.profile_ts = ts;
                let mut values = self.attrs().values(cfg.attributes.len());
                for (name, value) in attributes {
                    let Some(i) = cfg.attribute_index(name) else {
                        continue;
                    };
                    values[i] = match value {
                        Scalar::Num(n) => Some(AttrVal::Num(*n)),
                        Scalar::Str(s) => Some(AttrVal::Str(syms.intern(s))),
                        Scalar::Bool(v) => Some(AttrVal::Bool(*v)),
                        Scalar::Null | Scalar::Nested => None,
                    };
                }
                self.set_attrs(&values);
            }
        }
        self.prune(cfg);
    }

    /// The oldest bucket any window can still see at the customer's clock.
    fn last_seen_bucket_horizon(&self, cfg: &StateConfig) -> u32 {
        cfg.window_start(self.last_seen, cfg.max_buckets())
    }

    /// Drops buckets that no window can see any more. Called after every update.
    pub fn prune(&mut self, cfg: &StateConfig) {
        let horizon = self.last_seen_bucket_horizon(cfg);
        self.activity.prune(horizon);
    }

    /// Purchases (count, spend) in a window of `buckets` buckets at time `now`.
    pub fn purchases_in(&self, cfg: &StateConfig, now: i64, buckets: u32) -> (u32, f64) {
        let (count, spend) = self.activity.purchases().sum(cfg.span(now, buckets));
        (count, windows::from_micros(spend))
    }

    /// The next instant after `now` at which a window of `buckets` buckets over the purchase
    /// buckets gains or loses one holding data (`NEVER` if none will).
    pub fn purchases_window_next(&self, cfg: &StateConfig, now: i64, buckets: u32) -> i64 {
        self.activity
            .purchases()
            .next_change(cfg.span(now, buckets), buckets, cfg.bucket_ms)
    }

    /// Like [`Self::purchases_window_next`] for engagements (of one action, or all).
    pub fn engagements_window_next(
        &self,
        cfg: &StateConfig,
        now: i64,
        buckets: u32,
        action: Option<Sym>,
    ) -> i64 {
        self.activity.engagements().next_change(
            cfg.span(now, buckets),
            buckets,
            cfg.bucket_ms,
            action,
        )
    }

    /// The first instant after `now` at which, with no new purchase, `differs(count, spend)`
    /// holds for the purchases in a window of `buckets` buckets (`NEVER`: none).
    pub fn purchases_first_change(
        &self,
        cfg: &StateConfig,
        now: i64,
        buckets: u32,
        walk: Walk,
        mut differs: impl FnMut(u32, f64) -> bool,
    ) -> i64 {
        let differs = |count, spend| differs(count, windows::from_micros(spend));
        self.activity.purchases().first_change(
            cfg.span(now, buckets),
            buckets,
            cfg.bucket_ms,
            walk,
            differs,
        )
    }

    /// Like [`Self::purchases_first_change`] for engagements (of one action, or all).
    pub fn engagements_first_change(
        &self,
        cfg: &StateConfig,
        now: i64,
        buckets: u32,
        action: Option<Sym>,
        walk: Walk,
        differs: impl FnMut(u32) -> bool,
    ) -> i64 {
        self.activity.engagements().first_change(
            cfg.span(now, buckets),
            buckets,
            cfg.bucket_ms,
            action,
            walk,
            differs,
        )
    }

    /// Engagements (of one action, or all when `action` is None) in a window at `now`.
    pub fn engagements_in(
        &self,
        cfg: &StateConfig,
        now: i64,
        buckets: u32,
        action: Option<Sym>,
    ) -> u32 {
        self.activity
            .engagements()
            .sum(cfg.span(now, buckets), action)
    }

    /// Whether the window of `buckets` buckets at `now` holds at least `k` engagements of
    /// `action` ([`crate::windows::Engagements::at_least`]).
    pub fn engagements_at_least(
        &self,
        cfg: &StateConfig,
        now: i64,
        buckets: u32,
        action: Sym,
        k: u32,
    ) -> bool {
        self.activity
            .engagements()
            .at_least(cfg.span(now, buckets), action, k)
    }

    pub fn categories(&self) -> &[Count] {
        self.activity.counts(CountKind::Category)
    }

    pub fn channels(&self) -> &[Count] {
        self.activity.counts(CountKind::Channel)
    }

    pub fn actions(&self) -> &[Count] {
        self.activity.counts(CountKind::Action)
    }

    /// The most frequent symbol in a count list (ties: the one seen first).
    pub fn top(list: &[Count]) -> Option<Sym> {
        let mut best: Option<(Sym, u32)> = None;
        for &[s, n] in list {
            if best.is_none_or(|(_, bn)| n > bn) {
                best = Some((s, n));
            }
        }
        best.map(|(s, _)| s)
    }

    pub fn count_of(list: &[Count], sym: Option<Sym>) -> u32 {
        sym.and_then(|s| list.iter().find(|[x, _]| *x == s))
            .map_or(0, |[_, n]| *n)
    }

    /// An estimate of the heap and inline bytes this state uses.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.activity.capacity_bytes()
    }
}

fn scalar_kind(v: &Scalar<'_>) -> &'static str {
    match v {
        Scalar::Str(_) => "a string",
        Scalar::Num(_) => "a number",
        Scalar::Bool(_) => "a bool",
        Scalar::Null => "null",
        Scalar::Nested => "an object or array",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use crate::time::{DAY_MS, HOUR_MS};

    fn attr_val() -> impl proptest::strategy::Strategy<Value = Option<AttrVal>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            any::<f64>()
                .prop_filter("JSON has no NaN", |x| !x.is_nan())
                .prop_map(|x| Some(AttrVal::Num(x))),
            any::<u32>().prop_map(|s| Some(AttrVal::Str(s))),
            any::<bool>().prop_map(|b| Some(AttrVal::Bool(b))),
        ]
    }

    /// An operation on a customer's activity buffer: an attribute set, or one of the other
    /// parts grown.
    #[derive(Debug, Clone)]
    enum Op {
        Attr(usize, Option<AttrVal>),
        Count(u32),
        Purchase(u32),
        Engagement(u32),
        Recent(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0usize..24, attr_val()).prop_map(|(i, v)| Op::Attr(i, v)),
            1 => (0u32..5).prop_map(Op::Count),
            1 => (0u32..50).prop_map(Op::Purchase),
            1 => (0u32..50).prop_map(Op::Engagement),
            1 => any::<u64>().prop_map(Op::Recent),
        ]
    }

    proptest::proptest! {
        /// The packed words hold what a list of values would, take a tag per attribute and
        /// each set value's payload and nothing else (none while no value is set), read the
        /// same in one pass, and leave the activity buffer's other parts as they would be
        /// without them.
        #[test]
        fn attributes_read_back_what_was_set(
            declared in 1usize..20,
            ops in proptest::collection::vec(op(), 0..60),
        ) {
            let mut st = CustomerState::new();
            let mut without = Activity::default();
            let mut model = vec![None; declared];
            for op in ops {
                match op {
                    Op::Attr(i, v) => {
                        st.set_attr(i, declared, v);
                        if let Some(x) = model.get_mut(i) {
                            *x = v;
                        }
                    }
                    Op::Count(sym) => {
                        for a in [&mut st.activity, &mut without] {
                            a.add_count(CountKind::Channel, sym, 1);
                        }
                    }
                    Op::Purchase(b) => {
                        for a in [&mut st.activity, &mut without] {
                            a.add_purchase(b, 1, 5);
                        }
                    }
                    Op::Engagement(b) => {
                        for a in [&mut st.activity, &mut without] {
                            a.add_engagement(b, 3);
                        }
                    }
                    Op::Recent(h) => {
                        for a in [&mut st.activity, &mut without] {
                            a.push_recent(h);
                        }
                    }
                }
                let attrs = st.attrs();
                for (j, want) in model.iter().enumerate() {
                    proptest::prop_assert_eq!(attrs.get(j), *want, "attribute {}", j);
                }
                proptest::prop_assert_eq!(attrs.values(declared).to_vec(), model.clone());
                proptest::prop_assert_eq!(attrs.get(declared.next_multiple_of(8)), None);
                let payload: usize = model
                    .iter()
                    .map(|v| match v {
                        Some(AttrVal::Num(_)) => 2,
                        Some(AttrVal::Str(_)) => 1,
                        _ => 0,
                    })
                    .sum();
                let words = if model.iter().any(Option::is_some) {
                    declared.div_ceil(8) + payload
                } else {
                    0
                };
                proptest::prop_assert_eq!(attrs.bytes(), 4 * words);
                proptest::prop_assert_eq!(st.activity.bytes().attributes, 4 * words);
                proptest::prop_assert_eq!(Attrs(&Attrs::encode(&model)), attrs);
                let a = &st.activity;
                for k in CountKind::ALL {
                    proptest::prop_assert_eq!(a.counts(k), without.counts(k));
                }
                proptest::prop_assert_eq!(
                    a.purchases().iter().collect::<Vec<_>>(),
                    without.purchases().iter().collect::<Vec<_>>()
                );
                proptest::prop_assert_eq!(
                    a.engagements().iter().collect::<Vec<_>>(),
                    without.engagements().iter().collect::<Vec<_>>()
                );
                proptest::prop_assert_eq!(a.recent(), without.recent());
            }
        }
    }

    #[test]
    fn attributes_with_other_values_differ() {
        let mut a = CustomerState::new();
        a.set_attr(1, 3, Some(AttrVal::Str(7)));
        let mut b = a.clone();
        assert_eq!(a, b);
        b.set_attr(1, 3, Some(AttrVal::Str(8)));
        assert_ne!(a, b);
        assert_ne!(a.attrs(), b.attrs());
        b.set_attr(1, 3, None);
        assert_ne!(a, b);
        assert_eq!(b, CustomerState::new(), "all unset: no words");
        b.set_attr(2, 3, Some(AttrVal::Bool(false)));
        assert_ne!(b, CustomerState::new());
    }

    fn cfg() -> StateConfig {
        StateConfig {
            bucket_ms: HOUR_MS,
            windows: vec![
                Window {
                    name: "7d".into(),
                    ms: 7 * DAY_MS,
                },
                Window {
                    name: "30d".into(),
                    ms: 30 * DAY_MS,
                },
            ],
            attributes: vec![
                ("industry".into(), AttrType::String),
                ("company_size".into(), AttrType::Number),
            ],
        }
    }

    fn apply(st: &mut CustomerState, syms: &Symbols, json: &str) {
        let ev = decode(json.as_bytes()).unwrap();
        CustomerState::validate(&cfg(), &ev).unwrap();
        st.apply(&cfg(), syms, &ev);
    }

    fn purchase(ts: i64, amount: f64, cat: &str, channel: &str) -> String {
        format!(
            r#"{{"customer_id":"c","type":"purchase","timestamp":{ts},"amount":{amount},"category":"{cat}","channel":"{channel}","plan":"p{ts}"}}"#
        )
    }

    #[test]
    fn lifetime_aggregates() {
        let syms = Symbols::new();
        let mut st = CustomerState::new();
        apply(
            &mut st,
            &syms,
            &purchase(10 * DAY_MS, 10.0, "books", "online"),
        );
        apply(
            &mut st,
            &syms,
            &purchase(12 * DAY_MS, 30.0, "books", "store"),
        );
        apply(
            &mut st,
            &syms,
            &purchase(11 * DAY_MS, 5.0, "toys", "online"),
        );
        assert_eq!(st.purchase_count, 3);
        assert_eq!(st.spend, 45.0);
        assert_eq!(st.first_purchase, 10 * DAY_MS);
        assert_eq!(st.last_purchase, 12 * DAY_MS);
        assert_eq!(st.last_seen, 12 * DAY_MS);
        assert_eq!(
            CustomerState::count_of(st.categories(), syms.get("books")),
            2
        );
        assert_eq!(CustomerState::top(st.channels()), syms.get("online"));
        // The plan follows event time, not arrival order.
        assert_eq!(st.plan, syms.get(&format!("p{}", 12 * DAY_MS)));
    }

    #[test]
    fn windows_slide_and_prune() {
        let syms = Symbols::new();
        let c = cfg();
        let mut st = CustomerState::new();
        apply(&mut st, &syms, &purchase(0, 1.0, "a", "online"));
        apply(&mut st, &syms, &purchase(5 * DAY_MS, 2.0, "a", "online"));
        let now = 5 * DAY_MS;
        assert_eq!(st.purchases_in(&c, now, 7 * 24), (2, 3.0));
        // 7 days after the first purchase's bucket, it has left the 7d window.
        assert_eq!(st.purchases_in(&c, 7 * DAY_MS, 7 * 24), (1, 2.0));
        assert_eq!(st.purchases_in(&c, 7 * DAY_MS - 1, 7 * 24), (2, 3.0));
        assert_eq!(st.purchases_in(&c, 7 * DAY_MS, 30 * 24), (2, 3.0));
        // A purchase 40 days later prunes buckets older than the 30d window.
        apply(&mut st, &syms, &purchase(40 * DAY_MS, 4.0, "a", "online"));
        assert_eq!(st.activity.purchases().len(), 1);
        assert_eq!(st.purchase_count, 3);
        // A very late purchase counts for the lifetime only.
        apply(&mut st, &syms, &purchase(DAY_MS, 8.0, "a", "online"));
        assert_eq!(st.activity.purchases().len(), 1);
        assert_eq!(st.purchase_count, 4);
        assert_eq!(st.spend, 15.0);
    }

    #[test]
    fn engagement_windows_per_action() {
        let syms = Symbols::new();
        let c = cfg();
        let mut st = CustomerState::new();
        for (ts, a) in [
            (0, "email_open"),
            (HOUR_MS, "email_open"),
            (2 * HOUR_MS, "page_view"),
        ] {
            apply(
                &mut st,
                &syms,
                &format!(
                    r#"{{"customer_id":"c","type":"engagement","timestamp":{ts},"action":"{a}"}}"#
                ),
            );
        }
        let now = 2 * HOUR_MS;
        assert_eq!(
            st.engagements_in(&c, now, 7 * 24, syms.get("email_open")),
            2
        );
        assert_eq!(st.engagements_in(&c, now, 7 * 24, None), 3);
        assert_eq!(st.engagement_count, 3);
    }

    #[test]
    fn profile_attributes_typed() {
        let syms = Symbols::new();
        let c = cfg();
        let mut st = CustomerState::new();
        apply(
            &mut st,
            &syms,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"industry":null,"unknown":1}}"#,
        );
        assert_eq!(st.attrs().bytes(), 0, "no words until a value is set");
        apply(
            &mut st,
            &syms,
            r#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"industry":"finance","company_size":850,"unknown":1}}"#,
        );
        // A tag word, the string's symbol, the number's two words.
        assert_eq!(st.attrs().bytes(), 4 * (1 + 1 + 2));
        assert_eq!(
            st.attrs().get(0),
            Some(AttrVal::Str(syms.intern("finance")))
        );
        assert_eq!(st.attrs().get(1), Some(AttrVal::Num(850.0)));
        apply(
            &mut st,
            &syms,
            r#"{"customer_id":"c","type":"profile","timestamp":1,"attributes":{"industry":null}}"#,
        );
        assert_eq!(st.attrs().get(0), None);
        let bad = decode(br#"{"customer_id":"c","type":"profile","timestamp":0,"attributes":{"company_size":"big"}}"#).unwrap();
        let e = CustomerState::validate(&c, &bad).unwrap_err();
        assert!(e.0.contains("`company_size` must be a number"), "{e}");
    }
}
