//! The changelog record: one customer's complete state (behavioural state, memberships, `seq`,
//! timer, recent event ids) and the input offset it reflects, as compact bytes.
//!
//! This module owns the record format. It is pure: the pipeline decides when records are
//! written to the compacted changelog topic (keyed by customer id) and read back on restore.
//!
//! Format (version 1), all integers LEB128 varints (signed ones zigzag-encoded), floats as 8
//! little-endian bytes:
//!
//! ```text
//! b'M' 1 | rules_version (string) | source offsets (count; one per input topic) | partition
//! | seq | timer
//! | strings used by the record (count, then each string) — interned values are written
//!   once here and referred to by index below, because symbol ids are local to a process
//! | last_seen first_seen purchase_count engagement_count spend quantity first_purchase
//!   last_purchase last_engagement plan(index+1, 0 = none) plan_ts profile_ts
//! | purchase buckets (count; bucket count spend) | engagement buckets (count; bucket action count)
//! | categories, channels, actions (count; string index, count each)
//! | attributes (count; tag 0 none / 1 number / 2 string / 3 bool, value)
//! | segment per segmentation (count; index, 65535 = none) | member bit words (count; word)
//! | recent event id hashes (count; 8 bytes each)
//! ```
//!
//! A record written under other rules (another `rules_version`) restores the behavioural state,
//! `seq` and recent ids, but not the memberships and timer, which only mean something under the
//! rules that computed them: [`Restored::rules_changed`] tells the caller to re-evaluate.

use smallvec::SmallVec;

use crate::engine::{Customer, Engine};
use crate::state::Activity;
use crate::state::{AttrVal, Attrs, CountKind, NEVER};
use crate::symbols::Sym;
use crate::windows;

const MAGIC: u8 = b'M';
const VERSION: u8 = 1;

/// Why a changelog record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad changelog record: {0}")]
pub struct CodecError(pub &'static str);

/// A decoded record.
#[derive(Debug, Clone)]
pub struct Restored {
    pub customer: Customer,
    /// The input partition the customer belonged to when the record was written.
    pub partition: i32,
    /// Per input topic (in configuration order), the next offset of the customer's partition
    /// that the state does not reflect yet (-1: nothing read from that topic).
    pub source_offsets: Vec<i64>,
    /// Written under other rules: memberships and timer were reset.
    pub rules_changed: bool,
}

struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn u(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn i(&mut self, v: i64) {
        self.u(((v << 1) ^ (v >> 63)) as u64);
    }
    fn f(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn s(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// A string's bytes, length first.
    fn bytes(&mut self, b: &[u8]) {
        self.u(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn offsets(&mut self, v: &[i64]) {
        self.u(v.len() as u64);
        for o in v {
            self.i(*o);
        }
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.0.split_first().ok_or(CodecError("truncated"))?;
        self.0 = rest;
        Ok(b)
    }
    fn u(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        // Over the slice, not byte by byte through `byte`: one bounds check per number.
        for (i, &b) in self.0.iter().take(10).enumerate() {
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        Err(CodecError(if self.0.len() < 10 {
            "truncated"
        } else {
            "varint too long"
        }))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        u32::try_from(self.u()?).map_err(|_| CodecError("number out of range"))
    }
    fn len(&mut self) -> Result<usize, CodecError> {
        let n = self.u()? as usize;
        // Every element takes at least one byte: a larger count is corrupt, not a reason to
        // allocate.
        if n > self.0.len() {
            return Err(CodecError("count larger than the record"));
        }
        Ok(n)
    }
    fn i(&mut self) -> Result<i64, CodecError> {
        let u = self.u()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    fn f(&mut self) -> Result<f64, CodecError> {
        let b = self.0.get(..8).ok_or(CodecError("truncated"))?;
        let v = f64::from_le_bytes(b.try_into().map_err(|_| CodecError("truncated"))?);
        self.0 = &self.0[8..];
        Ok(v)
    }
    fn offsets(&mut self) -> Result<Vec<i64>, CodecError> {
        let n = self.len()?;
        (0..n).map(|_| self.i()).collect()
    }
    /// A string's bytes, not checked as UTF-8.
    fn raw(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.len()?;
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }
    fn s(&mut self) -> Result<&'a str, CodecError> {
        std::str::from_utf8(self.raw()?).map_err(|_| CodecError("string is not UTF-8"))
    }
}

/// Appends the changelog record of `c`, a customer of input partition `partition`,
/// reflecting that partition's input up to `source_offsets` (per input topic, the next offset
/// to process), to `out`: the [`encode_header`] then the [`encode_body`].
pub fn encode(
    engine: &Engine,
    c: &Customer,
    partition: i32,
    source_offsets: &[i64],
    out: &mut Vec<u8>,
) {
    encode_header(engine, partition, source_offsets, out);
    encode_body(engine, c, out);
}

/// Appends the part of a record that does not depend on the customer (magic, version, rules
/// version, source offsets, partition): the same for every record of a partition's commit
/// interval.
pub fn encode_header(engine: &Engine, partition: i32, source_offsets: &[i64], out: &mut Vec<u8>) {
    let mut w = W(out);
    w.0.extend_from_slice(&[MAGIC, VERSION]);
    w.s(&engine.rules.version);
    w.offsets(source_offsets);
    w.i(partition as i64);
}

/// Appends the part of a record that only depends on the customer (everything after the
/// source offsets), so it can be encoded before the offsets are known.
pub fn encode_body(engine: &Engine, c: &Customer, out: &mut Vec<u8>) {
    let rules = &engine.rules;
    let st = &c.state;
    let names = rules.symbols.read();
    // In memory, engagement buckets are sorted by (bucket, action symbol id), and symbol ids
    // are process-local: write them in (bucket, action name) order, so the bytes do not
    // depend on the process; the reader sorts them by its own ids. Entries are already in
    // bucket order, so only ties compare names.
    let mut engagements: SmallVec<[(u32, Sym, u32); 16]> =
        st.activity.engagements().iter().collect();
    engagements.sort_by(|x, y| {
        x.0.cmp(&y.0)
            .then_with(|| names.name(x.1).cmp(names.name(y.1)))
    });
    // The record's own string table, in order of first use by what follows it.
    let mut table: SmallVec<[Sym; 16]> = SmallVec::new();
    let used = st
        .plan
        .into_iter()
        .chain(engagements.iter().map(|e| e.1))
        .chain(
            CountKind::ALL
                .iter()
                .flat_map(|k| st.activity.counts(*k).iter().map(|[s, _]| *s)),
        );
    for s in used {
        if !table.contains(&s) {
            table.push(s);
        }
    }
    // Every symbol written below is in the table (collected above from the same sources).
    let idx = |s: Sym| table.iter().position(|x| *x == s).map_or(0, |i| i as u64);
    let plan = st.plan.map_or(0, |s| idx(s) + 1);

    let mut w = W(out);
    w.u(c.seq);
    w.i(c.timer);
    w.u(table.len() as u64);
    for s in &table {
        w.s(names.name(*s));
    }
    for t in [st.last_seen, st.first_seen] {
        w.i(t);
    }
    w.u(st.purchase_count as u64);
    w.u(st.engagement_count as u64);
    w.f(st.spend);
    w.f(st.quantity);
    for t in [st.first_purchase, st.last_purchase, st.last_engagement] {
        w.i(t);
    }
    w.u(plan);
    w.i(st.plan_ts);
    w.i(st.profile_ts);
    let purchases = st.activity.purchases();
    w.u(purchases.len() as u64);
    for (bucket, count, spend) in purchases.iter() {
        w.u(bucket as u64);
        w.u(count as u64);
        w.f(windows::from_micros(spend));
    }
    w.u(engagements.len() as u64);
    for &(bucket, action, count) in &engagements {
        w.u(bucket as u64);
        w.u(idx(action));
        w.u(count as u64);
    }
    for kind in CountKind::ALL {
        let l = st.activity.counts(kind);
        w.u(l.len() as u64);
        for &[s, n] in l {
            w.u(idx(s));
            w.u(n as u64);
        }
    }
    // Every declared attribute, set or not (slots not allocated are unset).
    let declared = rules.state.attributes.len();
    w.u(declared as u64);
    for a in st.attrs().values(declared) {
        match a {
            None => w.u(0),
            Some(AttrVal::Num(n)) => {
                w.u(1);
                w.f(n);
            }
            Some(AttrVal::Str(s)) => {
                w.u(2);
                w.bytes(names.name(s).as_bytes());
            }
            Some(AttrVal::Bool(b)) => {
                w.u(3);
                w.u(b as u64);
            }
        }
    }
    let n = engine.counts();
    w.u(rules.segmentations.len() as u64);
    for s in c.segments(n) {
        w.u(s as u64);
    }
    w.u(c.members(n).len() as u64);
    for m in c.members(n) {
        w.u(m);
    }
    w.u(c.recent_ids().count() as u64);
    for h in c.recent_ids() {
        w.0.extend_from_slice(&h.to_le_bytes());
    }
}

/// The symbol ids a restorer has met, by their bytes: with it, a record's strings are looked
/// up without the shared symbol table's lock, which the restore workers would otherwise all
/// take for every record, on one cache line. Symbols are never removed, so an id, once
/// cached, stays right.
#[derive(Default)]
pub struct SymbolCache(std::collections::HashMap<Box<[u8]>, Sym, foldhash::fast::RandomState>);

/// Reads a changelog record back into a customer of `engine`'s rules.
pub fn decode(engine: &Engine, bytes: &[u8]) -> Result<Restored, CodecError> {
    decode_inner(engine, bytes, None)
}

/// [`decode`], looking the record's strings up in `cache` first.
pub fn decode_cached(
    engine: &Engine,
    bytes: &[u8],
    cache: &mut SymbolCache,
) -> Result<Restored, CodecError> {
    decode_inner(engine, bytes, Some(cache))
}

fn decode_inner(
    engine: &Engine,
    bytes: &[u8],
    mut cache: Option<&mut SymbolCache>,
) -> Result<Restored, CodecError> {
    let rules = &engine.rules;
    let mut r = R(bytes);
    if r.byte()? != MAGIC {
        return Err(CodecError("not a microseg changelog record"));
    }
    if r.byte()? != VERSION {
        return Err(CodecError("unknown record version"));
    }
    let rules_changed = r.s()? != rules.version;
    let source_offsets = r.offsets()?;
    let partition = i32::try_from(r.i()?).map_err(|_| CodecError("partition out of range"))?;
    let mut c = engine.blank_customer();
    c.seq = r.u()?;
    c.timer = r.i()?;
    // The record's strings, looked up under one read lock; only new ones are interned.
    let n = r.len()?;
    let mut strings: SmallVec<[&[u8]; 16]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        strings.push(r.raw()?);
    }
    let cached: Option<SmallVec<[Sym; 16]>> = cache
        .as_ref()
        .and_then(|cache| strings.iter().map(|s| cache.0.get(*s).copied()).collect());
    let table: SmallVec<[Sym; 16]> = match cached {
        Some(table) => table,
        None => {
            let table: SmallVec<[Sym; 16]> = rules
                .symbols
                .intern_all(&strings)
                .ok_or(CodecError("string is not UTF-8"))?;
            if let Some(cache) = cache.as_deref_mut() {
                for (s, id) in strings.iter().zip(&table) {
                    cache.0.entry(Box::from(*s)).or_insert(*id);
                }
            }
            table
        }
    };
    // An attribute's string, not in the record's table (written inline: the format predates
    // interned attributes).
    let mut intern = |s: &[u8]| -> Result<Sym, CodecError> {
        if let Some(id) = cache.as_deref().and_then(|c| c.0.get(s)) {
            return Ok(*id);
        }
        let s = std::str::from_utf8(s).map_err(|_| CodecError("string is not UTF-8"))?;
        let id = rules.symbols.intern(s);
        if let Some(c) = cache.as_deref_mut() {
            c.0.insert(Box::from(s.as_bytes()), id);
        }
        Ok(id)
    };
    let sym = |i: u64| -> Result<Sym, CodecError> {
        table
            .get(i as usize)
            .copied()
            .ok_or(CodecError("string index out of range"))
    };
    let st = &mut c.state;
    st.last_seen = r.i()?;
    st.first_seen = r.i()?;
    st.purchase_count = r.u32()?;
    st.engagement_count = r.u32()?;
    st.spend = r.f()?;
    st.quantity = r.f()?;
    st.first_purchase = r.i()?;
    st.last_purchase = r.i()?;
    st.last_engagement = r.i()?;
    st.plan = match r.u()? {
        0 => None,
        i => Some(sym(i - 1)?),
    };
    st.plan_ts = r.i()?;
    st.profile_ts = r.i()?;
    let n = r.len()?;
    let mut purchases: SmallVec<[(u32, u32, i64); 16]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        let (bucket, count, spend) = (r.u32()?, r.u32()?, r.f()?);
        purchases.push((bucket, count, windows::to_micros(spend)));
    }
    let n = r.len()?;
    let mut engagements = Vec::with_capacity(n);
    for _ in 0..n {
        engagements.push((r.u32()?, sym(r.u()?)?, r.u32()?));
    }
    let mut counts: [SmallVec<[(Sym, u32); 16]>; 3] = Default::default();
    for list in &mut counts {
        let n = r.len()?;
        list.reserve_exact(n);
        for _ in 0..n {
            list.push((sym(r.u()?)?, r.u32()?));
        }
    }
    let n = r.len()?;
    let declared = rules.state.attributes.len();
    if n != declared && !rules_changed {
        return Err(CodecError("attribute count does not match the rules"));
    }
    // Read into the customer's own slots. Under other rules, attributes are declared by the
    // rules file: only a layout that still fits is kept (the values are read either way).
    let fits = n == declared;
    let mut values: SmallVec<[Option<AttrVal>; 8]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        values.push(match r.u()? {
            0 => None,
            1 => Some(AttrVal::Num(r.f()?)),
            2 => Some(AttrVal::Str(intern(r.raw()?)?)),
            3 => Some(AttrVal::Bool(r.u()? != 0)),
            _ => return Err(CodecError("unknown attribute tag")),
        });
    }
    // Under other rules the values are read but not kept (see above).
    let attr_words = if fits {
        Attrs::encode(&values)
    } else {
        SmallVec::new()
    };
    let n = r.len()?;
    let mut segment: SmallVec<[u16; 8]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        segment.push(u16::try_from(r.u()?).map_err(|_| CodecError("segment out of range"))?);
    }
    let n = r.len()?;
    let mut member: SmallVec<[u64; 4]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        member.push(r.u()?);
    }
    let n = r.len()?;
    let mut recent: SmallVec<[u64; 8]> = SmallVec::with_capacity(n);
    for _ in 0..n {
        let b = r.0.get(..8).ok_or(CodecError("truncated"))?;
        recent.push(u64::from_le_bytes(
            b.try_into().map_err(|_| CodecError("truncated"))?,
        ));
        r.0 = &r.0[8..];
    }
    if !r.0.is_empty() {
        return Err(CodecError("trailing bytes"));
    }
    let rule_words = if rules_changed {
        // New memberships come from a re-evaluation ([`Engine::reset_memberships`]).
        c.timer = NEVER;
        engine.initial_rule_words()
    } else {
        engine
            .restored_rule_words(&segment, &member)
            .ok_or(CodecError("membership layout does not match the rules"))?
    };
    // One allocation of the final size.
    let recent = Customer::recent_of(&recent, engine.dedup);
    c.state.activity = Activity::from_parts(
        &rule_words,
        &attr_words,
        [&counts[0], &counts[1], &counts[2]],
        &purchases,
        engagements,
        &recent,
    );
    Ok(Restored {
        customer: c,
        partition,
        source_offsets,
        rules_changed,
    })
}

/// The most bytes [`encode_header`] writes for `topics` input topics under `engine`'s rules.
pub fn header_room(engine: &Engine, topics: usize) -> usize {
    let mut out = Vec::new();
    // Zigzag of i64::MIN is the longest varint.
    encode_header(engine, i32::MIN, &vec![i64::MIN; topics], &mut out);
    out.len()
}

/// Changelog records, keys and values, in one buffer: what a take hands out, without an
/// allocation per record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where one record's key and value are in its batch's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub key: (usize, usize),
    pub value: (usize, usize),
}

impl Batch {
    /// A batch of the records at `spans` in `bytes` (in that order).
    ///
    /// # Panics
    ///
    /// If a span is out of `bytes`.
    pub fn from_parts(bytes: Vec<u8>, spans: Vec<Span>) -> Batch {
        for s in &spans {
            assert!(
                s.key.0 <= s.key.1 && s.key.1 <= bytes.len(),
                "a key out of the batch"
            );
            assert!(
                s.value.0 <= s.value.1 && s.value.1 <= bytes.len(),
                "a value out of the batch"
            );
        }
        Batch { bytes, spans }
    }

    /// Appends a record.
    pub fn push(&mut self, key: &[u8], value: &[u8]) {
        let k = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let v = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.spans.push(Span {
            key: (k, v),
            value: (v, self.bytes.len()),
        });
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Bytes of keys and values (and of any unused room between them).
    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    /// Its buffers, emptied, with their capacity: for the next batch to be written into
    /// memory already in use instead of fresh pages.
    pub fn into_buffers(self) -> (Vec<u8>, Vec<Span>) {
        let (mut bytes, mut spans) = (self.bytes, self.spans);
        bytes.clear();
        spans.clear();
        (bytes, spans)
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The records, `(key, value)`, in order.
    pub fn iter(&self) -> Records<'_> {
        Records {
            bytes: &self.bytes,
            spans: self.spans.iter(),
        }
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Records<'a>;
    fn into_iter(self) -> Records<'a> {
        self.iter()
    }
}

/// The records of a [`Batch`], `(key, value)`.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    bytes: &'a [u8],
    spans: std::slice::Iter<'a, Span>,
}

impl<'a> Iterator for Records<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let s = self.spans.next()?;
        // In the bytes: checked when the batch was made.
        Some((
            &self.bytes[s.key.0..s.key.1],
            &self.bytes[s.value.0..s.value.1],
        ))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Records<'_> {}

/// The key of a partition's checkpoint record: one byte that is not UTF-8, so no customer id
/// can be it (and not empty: librdkafka sends an empty key as null, which a compacted topic
/// refuses).
pub const CHECKPOINT_KEY: &[u8] = b"\xff";

const CHECKPOINT_MAGIC: u8 = b'P';

/// A partition's progress, written after the partition's customer records in every commit
/// interval: the input offsets its state reflects, and its clock, so that a restore resumes
/// the watermark (and idle detection) where it was.
///
/// ```text
/// b'P' 1 | offsets (count; one per input topic) | watermark
/// | topic clocks (count; newest event time, wall time it arrived)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Per input topic, the next offset to process (-1: nothing read from it).
    pub offsets: Vec<i64>,
    pub watermark: i64,
    /// Per input topic: the newest event time seen, and the wall time it arrived.
    pub topics: Vec<(i64, i64)>,
}

impl Checkpoint {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        w.0.extend_from_slice(&[CHECKPOINT_MAGIC, VERSION]);
        w.offsets(&self.offsets);
        w.i(self.watermark);
        w.u(self.topics.len() as u64);
        for (ts, wall) in &self.topics {
            w.i(*ts);
            w.i(*wall);
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CodecError> {
        let mut r = R(bytes);
        if r.byte()? != CHECKPOINT_MAGIC {
            return Err(CodecError("not a microseg checkpoint record"));
        }
        if r.byte()? != VERSION {
            return Err(CodecError("unknown record version"));
        }
        let offsets = r.offsets()?;
        let watermark = r.i()?;
        let n = r.len()?;
        let topics = (0..n)
            .map(|_| Ok((r.i()?, r.i()?)))
            .collect::<Result<Vec<_>, CodecError>>()?;
        if !r.0.is_empty() {
            return Err(CodecError("trailing bytes"));
        }
        Ok(Checkpoint {
            offsets,
            watermark,
            topics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode as decode_event;
    use crate::generate::Generator;
    use crate::rules::RuleSet;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    #[test]
    fn a_batch_hands_out_its_records_in_order_and_refuses_spans_outside_it() {
        let mut b = Batch::default();
        assert!(b.is_empty());
        b.push(b"c-1", b"one");
        b.push(b"", b"");
        b.push(CHECKPOINT_KEY, b"three");
        let got: Vec<(&[u8], &[u8])> = b.iter().collect();
        let want: [(&[u8], &[u8]); 3] = [(b"c-1", b"one"), (b"", b""), (CHECKPOINT_KEY, b"three")];
        assert_eq!(got, want);
        assert_eq!((b.len(), b.iter().len()), (3, 3));
        // Spans may leave gaps and point anywhere inside the bytes.
        let spans = vec![Span {
            key: (4, 5),
            value: (0, 3),
        }];
        let b = Batch::from_parts(b"abc.k".to_vec(), spans);
        assert_eq!(b.iter().collect::<Vec<_>>(), [(&b"k"[..], &b"abc"[..])]);
        let outside = vec![Span {
            key: (0, 1),
            value: (2, 6),
        }];
        assert!(
            std::panic::catch_unwind(|| Batch::from_parts(b"abcde".to_vec(), outside)).is_err()
        );
    }

    /// Customers built by the engine from generated input (all event types, attributes,
    /// windows, timers, recent ids).
    fn customers(engine: &Engine) -> BTreeMap<String, Customer> {
        let mut g = Generator::new(3, 200, 1_767_225_600_000, 20 * 60_000);
        engine.replay(&mut g, 5000, |_| {})
    }

    /// A restored customer has no rule timer cache yet, but a timer: an event that does not
    /// touch the rules behind the timer must not lose it (the engine may take a customer
    /// without a cache for one whose rules are all `NEVER` only when its timer says so).
    #[test]
    fn a_restored_customer_keeps_its_timer_through_an_event_of_another_kind() {
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        let day = crate::time::DAY_MS;
        let mut c = engine.new_customer();
        let mut out = Vec::new();
        let bought =
            format!(r#"{{"customer_id":"c","type":"purchase","timestamp":{day},"amount":10}}"#);
        engine
            .apply(&mut c, &decode_event(bought.as_bytes()).unwrap(), &mut out)
            .unwrap();
        assert!(
            c.timer > day && c.timer < NEVER,
            "active until the purchase leaves 30d"
        );
        let mut bytes = Vec::new();
        encode(&engine, &c, 3, &[1], &mut bytes);
        let mut back = decode(&engine, &bytes).unwrap().customer;
        assert_eq!(back.timer, c.timer);
        let opened = format!(
            r#"{{"customer_id":"c","type":"engagement","timestamp":{},"action":"open"}}"#,
            2 * day
        );
        let opened = decode_event(opened.as_bytes()).unwrap();
        engine.apply(&mut c, &opened, &mut out).unwrap();
        engine.apply(&mut back, &opened, &mut out).unwrap();
        assert!(c.timer < NEVER);
        assert_eq!(back.timer, c.timer);
    }

    #[test]
    fn a_record_restores_the_customer_exactly_even_in_another_process() {
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        let all = customers(&engine);
        assert!(all
            .values()
            .any(|c| c.timer != NEVER && c.recent_ids().next().is_some()));
        // Another process: same rules file, its own symbol table, which met the values in
        // another order (so in-memory orders by symbol id differ).
        let other = Engine::new(Arc::new(RuleSet::embedded_default()));
        let n = engine.rules.symbols.len() as Sym;
        for id in (0..n).rev() {
            other.rules.symbols.intern(&engine.rules.symbols.name(id));
        }
        let mut reordered = 0;
        // A restorer's cache of the symbols it met, filled by the first records.
        let mut cache = SymbolCache::default();
        for (i, c) in all.values().enumerate() {
            let mut bytes = Vec::new();
            let offsets = [1000 + i as i64, -1, 3];
            encode(&engine, c, 3, &offsets, &mut bytes);
            let back = decode(&engine, &bytes).unwrap();
            assert_eq!(engine.view(&back.customer), engine.view(c));
            assert_eq!(
                (back.partition, back.source_offsets, back.rules_changed),
                (3, offsets.to_vec(), false)
            );
            let there = decode(&other, &bytes).unwrap();
            let cached = decode_cached(&other, &bytes, &mut cache).unwrap();
            assert_eq!(other.view(&cached.customer), other.view(&there.customer));
            assert_eq!(
                (
                    cached.partition,
                    &cached.source_offsets,
                    cached.rules_changed
                ),
                (there.partition, &there.source_offsets, there.rules_changed)
            );
            let sorted = |cu: &Customer| {
                let keys: Vec<_> = cu
                    .state
                    .activity
                    .engagements()
                    .iter()
                    .map(|(b, a, _)| (b, a))
                    .collect();
                keys.windows(2).all(|w| w[0] < w[1])
            };
            assert!(
                sorted(&there.customer),
                "buckets sorted by the reader's ids"
            );
            reordered += (there
                .customer
                .state
                .activity
                .engagements()
                .iter()
                .map(|b| other.rules.symbols.name(b.1))
                .collect::<Vec<_>>()
                != c.state
                    .activity
                    .engagements()
                    .iter()
                    .map(|b| engine.rules.symbols.name(b.1))
                    .collect::<Vec<_>>()) as usize;
            let mut again = Vec::new();
            encode(&other, &there.customer, 3, &offsets, &mut again);
            assert_eq!(
                again, bytes,
                "same bytes after a trip through another symbol table"
            );
            assert_eq!(other.memberships(&there.customer), engine.memberships(c));
        }
        assert!(reordered > 0, "some bucket lists came out in another order");
    }

    #[test]
    fn a_record_from_other_rules_keeps_state_and_seq_but_not_memberships() {
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        let c = customers(&engine)
            .into_values()
            .find(|c| c.seq > 2)
            .unwrap();
        let mut bytes = Vec::new();
        encode(&engine, &c, 3, &[7], &mut bytes);
        let text = crate::rules::DEFAULT_RULES.replace(
            "days_since(purchases.last) > 60",
            "days_since(purchases.last) > 61",
        );
        let changed = Engine::new(Arc::new(RuleSet::from_toml("new.toml", &text).unwrap()));
        let back = decode(&changed, &bytes).unwrap();
        assert!(back.rules_changed);
        assert_eq!(back.customer.seq, c.seq);
        assert_eq!(back.customer.state.purchase_count, c.state.purchase_count);
        assert_eq!(back.customer.timer, NEVER);
        let segments: Vec<u16> = back.customer.segments(changed.counts()).collect();
        assert_eq!(segments, [crate::engine::NO_SEGMENT; 2]);
    }

    #[test]
    fn a_customer_no_profile_described_keeps_no_attribute_words_and_writes_them_unset() {
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        let declared = engine.rules.state.attributes.len();
        assert!(declared > 0);
        let mut c = engine.new_customer();
        let ev = decode_event(
            br#"{"customer_id":"c","type":"engagement","timestamp":0,"action":"email_open"}"#,
        )
        .unwrap();
        engine.apply(&mut c, &ev, &mut Vec::new()).unwrap();
        assert_eq!(c.state.attrs().bytes(), 0);
        let mut bytes = Vec::new();
        encode(&engine, &c, 3, &[1], &mut bytes);
        // The same customer after an attribute was set and unset: no words again, equal, and
        // the same record.
        let mut cleared = c.clone();
        cleared.state.set_attr(0, declared, Some(AttrVal::Num(1.0)));
        assert_ne!(engine.view(&cleared), engine.view(&c));
        assert_eq!(cleared.state.attrs().bytes(), 4 * (1 + 2));
        cleared.state.set_attr(0, declared, None);
        assert_eq!(cleared.state.attrs().bytes(), 0);
        assert_eq!(engine.view(&cleared), engine.view(&c));
        let mut again = Vec::new();
        encode(&engine, &cleared, 3, &[1], &mut again);
        assert_eq!(again, bytes);
        let back = decode(&engine, &bytes).unwrap();
        assert_eq!(engine.view(&back.customer), engine.view(&c));
        assert_eq!(back.customer.state.attrs().bytes(), 0);
    }

    #[test]
    fn varints_round_trip_and_bad_ones_say_why() {
        let values = [0, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX];
        let mut bytes = Vec::new();
        for v in values {
            W(&mut bytes).u(v);
        }
        bytes.push(0x2a);
        let mut r = R(&bytes);
        let back: Vec<u64> = values.iter().map(|_| r.u().unwrap()).collect();
        assert_eq!(back, values);
        assert_eq!(r.0, [0x2a], "reads exactly its own bytes");
        for v in [-1i64, 0, 1, i64::MIN, i64::MAX, 1_767_225_600_000] {
            let mut b = Vec::new();
            W(&mut b).i(v);
            assert_eq!(R(&b).i(), Ok(v));
        }
        let mut b = Vec::new();
        W(&mut b).u(1 << 35);
        for n in 0..b.len() {
            assert_eq!(R(&b[..n]).u(), Err(CodecError("truncated")));
        }
        assert_eq!(R(&[0x80; 10]).u(), Err(CodecError("varint too long")));
        assert_eq!(R(&[0x80; 9]).u(), Err(CodecError("truncated")));
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        let c = customers(&engine).into_values().next().unwrap();
        let mut bytes = Vec::new();
        encode(&engine, &c, 3, &[1], &mut bytes);
        for n in 0..bytes.len() {
            assert!(decode(&engine, &bytes[..n]).is_err(), "truncated at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&engine, &longer).unwrap_err(),
            CodecError("trailing bytes")
        );
        // A string of the record's table that is not UTF-8 (its first byte made 0xff).
        let names = engine.rules.symbols.read();
        let name = CountKind::ALL
            .iter()
            .flat_map(|k| c.state.activity.counts(*k))
            .map(|[s, _]| names.name(*s).to_string())
            .next()
            .unwrap();
        drop(names);
        let at = bytes
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .unwrap();
        let mut bad = bytes.clone();
        bad[at] = 0xff;
        assert_eq!(
            decode(&engine, &bad).unwrap_err(),
            CodecError("string is not UTF-8")
        );
        let mut cache = SymbolCache::default();
        assert!(decode_cached(&engine, &bytes, &mut cache).is_ok());
        assert_eq!(
            decode_cached(&engine, &bad, &mut cache).unwrap_err(),
            CodecError("string is not UTF-8")
        );
        // Flipped bytes: any outcome but a panic.
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xa5;
            let _ = decode(&engine, &b);
        }
    }

    #[test]
    fn a_checkpoint_round_trips_and_is_not_a_customer() {
        let cp = Checkpoint {
            offsets: vec![12, -1, 0],
            watermark: 1_767_225_600_000,
            topics: vec![(1_767_225_900_000, 1_800_000_000_000), (NEVER, 0)],
        };
        let mut bytes = Vec::new();
        cp.encode(&mut bytes);
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), cp);
        for n in 0..bytes.len() {
            assert!(Checkpoint::decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
        let engine = Engine::new(Arc::new(RuleSet::embedded_default()));
        assert!(decode(&engine, &bytes).is_err());
        let mut customer = Vec::new();
        encode(&engine, &engine.new_customer(), 3, &[1], &mut customer);
        assert!(Checkpoint::decode(&customer).is_err());
    }
}
