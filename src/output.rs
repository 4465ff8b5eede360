//! The output contract: segment-change messages (JSON) and dead-letter records.
//!
//! This module owns the exact JSON written to the segment-change topic (field names, order,
//! null handling; see README "Output format"), the rule set's names rendered as JSON once for
//! it ([`Names`]), and the dead-letter headers. Pure: it builds bytes, it does not send them.

use serde::Serialize;

use crate::engine::{Change, ChangeKind};
use crate::rules::compile::Shown;
use crate::rules::{Rule, RuleSet, Segmentation};
use crate::time::write_rfc3339;

/// What caused a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Cause<'a> {
    /// An input event, with its position in Kafka.
    Event {
        event_id: Option<&'a str>,
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
    /// Time passing (a timer that came due at `at`).
    Timer,
}

impl<'a> Cause<'a> {
    /// What to publish as the cause of `change`, made while applying the input `event`:
    /// the event, unless a timer the event made due caused the change.
    pub fn of(change: &Change<'_>, event: Cause<'a>) -> Cause<'a> {
        if change.by_timer {
            Cause::Timer
        } else {
            event
        }
    }
}

/// The rule set's names and version as JSON strings, rendered once: a change's message holds
/// two to four of them ([`Change::index`] says which).
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Per segmentation: its name, then its segments' names (the default last).
    segmentations: Vec<(Json, Vec<Json>)>,
    segments: Vec<Json>,
    version: Json,
}

/// A string rendered as JSON, quotes included.
type Json = Box<[u8]>;

fn rendered(s: &str) -> Json {
    let mut o = Vec::with_capacity(s.len() + 2);
    json_str(&mut o, s);
    o.into()
}

impl Names {
    pub fn new(version: &str, segmentations: &[Segmentation], segments: &[Rule]) -> Self {
        Names {
            segmentations: (segmentations.iter())
                .map(|s| {
                    let names = (0..=s.default_index()).map(|i| rendered(s.segment_name(i)));
                    (rendered(&s.name), names.collect())
                })
                .collect(),
            segments: segments.iter().map(|r| rendered(&r.name)).collect(),
            version: rendered(version),
        }
    }

    /// Segment `i` of segmentation `segmentation`, or independent segment `i`.
    fn segment(&self, segmentation: Option<usize>, i: u32) -> Option<&[u8]> {
        let list = match segmentation {
            Some(s) => &self.segmentations.get(s)?.1,
            None => &self.segments,
        };
        list.get(i as usize).map(|n| &n[..])
    }
}

/// Appends a rendered name, or `text` rendered now if there is none (a change whose indexes
/// are not the rule set's, as tests may build).
fn name(o: &mut Vec<u8>, rendered: Option<&[u8]>, text: &str) {
    match rendered {
        Some(r) => o.extend_from_slice(r),
        None => json_str(o, text),
    }
}

/// Like [`name`] for an optional one (`null` if absent).
fn opt_name(o: &mut Vec<u8>, rendered: Option<&[u8]>, text: Option<&str>) {
    match text {
        Some(t) => name(o, rendered, t),
        None => o.extend_from_slice(b"null"),
    }
}

/// Serializes one change as the JSON message published on the output topic.
///
/// Written by hand, field by field, in the order of the README's "Output format" (the
/// serde-derived equivalent is the reference in the tests): it runs once per change, and
/// this is several times faster.
pub fn change_json(
    rules: &RuleSet,
    customer_id: &str,
    cause: Cause<'_>,
    change: &Change<'_>,
) -> Vec<u8> {
    let mut o = Vec::with_capacity(capacity(rules, customer_id, cause, change));
    o.extend_from_slice(b"{\"customer_id\":");
    json_str(&mut o, customer_id);
    let (names, si, index) = (&rules.names, change.segmentation, change.index);
    o.extend_from_slice(b",\"segmentation\":");
    match si.and_then(|i| names.segmentations.get(i)) {
        Some((rendered, _)) => o.extend_from_slice(rendered),
        None => o.extend_from_slice(b"null"),
    }
    o.extend_from_slice(b",\"segment\":");
    name(&mut o, names.segment(si, index.segment), change.segment);
    o.extend_from_slice(match change.kind {
        ChangeKind::Entered => b",\"change\":\"entered\",\"previous\":".as_slice(),
        ChangeKind::Exited => b",\"change\":\"exited\",\"previous\":".as_slice(),
    });
    let other = |i: Option<u32>| i.and_then(|i| names.segment(si, i));
    opt_name(&mut o, other(index.previous), change.previous);
    o.extend_from_slice(b",\"next\":");
    opt_name(&mut o, other(index.next), change.next);
    o.extend_from_slice(b",\"at\":\"");
    write_rfc3339(&mut o, change.at);
    o.extend_from_slice(b"\",\"rules_version\":");
    o.extend_from_slice(&names.version);
    match cause {
        Cause::Event {
            event_id,
            topic,
            partition,
            offset,
        } => {
            o.extend_from_slice(b",\"cause\":{\"kind\":\"event\",\"event_id\":");
            opt_str(&mut o, event_id);
            o.extend_from_slice(b",\"topic\":");
            json_str(&mut o, topic);
            o.extend_from_slice(b",\"partition\":");
            o.extend_from_slice(itoa::Buffer::new().format(partition).as_bytes());
            o.extend_from_slice(b",\"offset\":");
            o.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
            o.push(b'}');
        }
        Cause::Timer => o.extend_from_slice(b",\"cause\":{\"kind\":\"timer\"}"),
    }
    o.extend_from_slice(b",\"because\":{");
    for (i, (atom, v)) in change.because.iter().enumerate() {
        if i > 0 {
            o.push(b',');
        }
        o.extend_from_slice(atom.json_key());
        v.write_json(&mut o);
    }
    o.extend_from_slice(b"},\"seq\":");
    o.extend_from_slice(itoa::Buffer::new().format(change.seq).as_bytes());
    o.push(b'}');
    o
}

/// Bytes of [`change_json`]'s message unless strings need escaping: its fixed text, the
/// strings' lengths, and per `because` entry its key and at most [`VALUE_ROOM`] besides a
/// string value's length. The buffer is allocated once at this size; a fixed size smaller
/// than some messages made a fraction of them grow (a copy), and one larger than most wasted
/// memory on the messages waiting in the producer.
fn capacity(rules: &RuleSet, customer_id: &str, cause: Cause<'_>, change: &Change<'_>) -> usize {
    let len = |s: Option<&str>| s.map_or(0, str::len);
    let cause = match cause {
        Cause::Event {
            event_id, topic, ..
        } => len(event_id) + topic.len(),
        Cause::Timer => 0,
    };
    let because: usize = (change.because.iter())
        .map(|(k, v)| {
            let string = if let Shown::Str(s) = v { s.len() } else { 0 };
            k.json_key().len() + VALUE_ROOM + string
        })
        .sum();
    FIXED_ROOM
        + customer_id.len()
        + (change.segmentation)
            .and_then(|i| rules.segmentations.get(i))
            .map_or(0, |s| s.name.len())
        + change.segment.len()
        + len(change.previous)
        + len(change.next)
        + rules.version.len()
        + cause
        + because
}

/// [`change_json`]'s text around the strings and `because`, with numbers and `at` at their
/// longest (a test holds it to that, exactly).
const FIXED_ROOM: usize = 296;
/// A `because` entry's bytes besides its key and a string value's length, at most: a comma
/// and a value at its longest (a timestamp at `i64`'s limits, quoted: 31 bytes; a number
/// takes up to 24).
const VALUE_ROOM: usize = 32;

/// Appends `s` as a JSON string.
pub(crate) fn json_str(o: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        o.push(b'"');
        o.extend_from_slice(s.as_bytes());
        o.push(b'"');
    } else {
        // Something to escape: serde_json's escaping (writing into a Vec cannot fail).
        let _ = serde_json::to_writer(o, s);
    }
}

/// Whether `s` holds a byte JSON escapes in a string: a control character, `"` or `\\`.
///
/// Eight bytes at a time (byte by byte, the check was half of [`change_json`]'s
/// instructions): with `x` eight bytes and `ONES` a 1 in each byte, `(x - n * ONES) & !x`
/// has a byte's top bit set only if some byte of `x` is below `n` (for `n` up to 0x80: a
/// borrow can set further bits, but only above a byte that is below `n`, so the answer is
/// exact as a whole). A byte equal to `c` is a byte of `x ^ (c * ONES)` below 1.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    fn any(x: u64) -> bool {
        let below = |x: u64, n: u64| x.wrapping_sub(n * ONES) & !x;
        let quote = x ^ (b'"' as u64 * ONES);
        let backslash = x ^ (b'\\' as u64 * ONES);
        (below(x, 0x20) | below(quote, 1) | below(backslash, 1)) & HIGH != 0
    }
    let (chunks, tail) = s.as_chunks::<8>();
    if chunks.iter().any(|c| any(u64::from_le_bytes(*c))) {
        return true;
    }
    // The last bytes padded with spaces, which need no escape.
    let mut last = [b' '; 8];
    last[..tail.len()].copy_from_slice(tail);
    any(u64::from_le_bytes(last))
}

fn opt_str(o: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(o, s),
        None => o.extend_from_slice(b"null"),
    }
}

/// Header names on a dead-letter record (its payload is the original message, unchanged).
pub mod dlq_headers {
    pub const REASON: &str = "microseg.error.reason";
    pub const TOPIC: &str = "microseg.source.topic";
    pub const PARTITION: &str = "microseg.source.partition";
    pub const OFFSET: &str = "microseg.source.offset";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ChangeIndex, Engine};
    use crate::event::decode;
    use crate::rules::compile::{Atom, Expr, Lit, Shown};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// The serde-derived message: the reference the hand-written serializer must match.
    #[derive(Serialize)]
    struct ChangeMessage<'a> {
        customer_id: &'a str,
        segmentation: Option<&'a str>,
        segment: &'a str,
        change: ChangeKind,
        previous: Option<&'a str>,
        next: Option<&'a str>,
        at: String,
        rules_version: &'a str,
        cause: Cause<'a>,
        because: serde_json::Map<String, serde_json::Value>,
        seq: u64,
    }

    fn reference(rules: &RuleSet, customer_id: &str, cause: Cause<'_>, c: &Change<'_>) -> Vec<u8> {
        serde_json::to_vec(&ChangeMessage {
            customer_id,
            segmentation: c.segmentation.map(|i| rules.segmentations[i].name.as_str()),
            segment: c.segment,
            change: c.kind,
            previous: c.previous,
            next: c.next,
            at: crate::time::format_rfc3339(c.at),
            rules_version: &rules.version,
            cause,
            because: c
                .because
                .iter()
                .map(|(k, v)| (k.text.clone(), v.to_json()))
                .collect(),
            seq: c.seq,
        })
        .unwrap()
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_-]{0,12}",
            any::<String>(),
            Just("quote\" back\\ nl\n tab\t nul\u{0} del\u{7f} é€".to_string()),
        ]
    }

    fn value() -> impl Strategy<Value = Shown> {
        prop_oneof![
            Just(Shown::Null),
            any::<bool>().prop_map(Shown::Bool),
            any::<i64>().prop_map(Shown::Int),
            (-1e12f64..1e12).prop_map(Shown::Num),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Shown::Num),
            (-10_000_000_000_000i64..300_000_000_000_000).prop_map(Shown::Time),
            text().prop_map(|t| Shown::Str(t.into())),
        ]
    }

    proptest! {
        #[test]
        fn the_hand_written_message_equals_the_serde_one(
            customer_id in text(),
            named in proptest::option::of((text(), proptest::option::of(text()), proptest::option::of(text()))),
            indexes in (0u32..8, proptest::option::of(0u32..8), proptest::option::of(0u32..8)),
            segmentation in proptest::option::of(0usize..2),
            entered in any::<bool>(),
            at in -10_000_000_000_000i64..300_000_000_000_000,
            seq in any::<u64>(),
            because in proptest::collection::vec((text(), value()), 0..4),
            event in proptest::option::of((proptest::option::of(text()), text(), any::<i32>(), any::<i64>())),
        ) {
            let rules = RuleSet::from_toml("config/segments.toml", include_str!("../config/segments.toml")).unwrap();
            // Distinct keys, as rule atoms are.
            let mut because: Vec<(String, Shown)> = because;
            because.sort_by(|a, b| a.0.cmp(&b.0));
            because.dedup_by(|a, b| a.0 == b.0);
            let because: Vec<(Atom, Shown)> = because.into_iter().map(|(k, v)| (atom(k), v)).collect();
            // The rule set's segments by index, as the engine makes them, or any names with
            // indexes the rule set does not have (as a test may build them).
            let (segment, previous, next, index) = match &named {
                None => {
                    let (seg, prev, next) = indexes;
                    let name = |i: u32| match segmentation {
                        Some(s) => rules.segmentations[s].segment_name(i as usize),
                        None => rules.segments[i as usize].name.as_str(),
                    };
                    let within = |i: u32| match segmentation {
                        Some(s) => i % (rules.segmentations[s].default_index() as u32 + 1),
                        None => i % rules.segments.len() as u32,
                    };
                    let (prev, next) = match segmentation {
                        Some(_) => (prev.map(within), next.map(within)),
                        None => (None, None),
                    };
                    let index = ChangeIndex { segment: within(seg), previous: prev, next };
                    (name(index.segment), prev.map(name), next.map(name), index)
                }
                Some((segment, previous, next)) => {
                    let index = ChangeIndex {
                        segment: u32::MAX,
                        previous: previous.as_ref().map(|_| u32::MAX),
                        next: next.as_ref().map(|_| u32::MAX),
                    };
                    (segment.as_str(), previous.as_deref(), next.as_deref(), index)
                }
            };
            let change = Change {
                segmentation,
                segment,
                kind: if entered { ChangeKind::Entered } else { ChangeKind::Exited },
                previous,
                next,
                index,
                at,
                seq,
                because: because.iter().map(|(k, v)| (k, v.clone())).collect(),
                by_timer: event.is_none(),
            };
            let cause = match &event {
                Some((event_id, topic, partition, offset)) => Cause::Event {
                    event_id: event_id.as_deref(),
                    topic,
                    partition: *partition,
                    offset: *offset,
                },
                None => Cause::Timer,
            };
            let ours = change_json(&rules, &customer_id, cause, &change);
            let theirs = reference(&rules, &customer_id, cause, &change);
            prop_assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(theirs).unwrap());
        }
    }

    /// An atom named `text` (its expression does not matter to the output).
    fn atom(text: String) -> Atom {
        Atom::new(text, Expr::Lit(Lit::Bool(true)))
    }

    /// A byte that needs no escape in a JSON string.
    fn plain() -> impl Strategy<Value = u8> {
        prop_oneof![Just(b' '), Just(b'!'), 0x23u8..0x5c, 0x5du8..=0xff]
    }

    proptest! {
        #[test]
        fn the_escape_check_finds_any_byte_json_escapes_wherever_it_is(
            mut s in proptest::collection::vec(plain(), 0..40),
            special in proptest::option::of((any::<proptest::sample::Index>(), prop_oneof![Just(0x1f), 0u8..0x20, Just(b'"'), Just(b'\\')])),
        ) {
            if let Some((at, b)) = special {
                s.insert(at.index(s.len() + 1), b);
            }
            prop_assert_eq!(needs_escape(&s), special.is_some());
        }
    }

    #[test]
    fn a_message_at_its_longest_fits_the_room_reserved() {
        let rules = RuleSet::from_toml(
            "config/segments.toml",
            include_str!("../config/segments.toml"),
        )
        .unwrap();
        // Every kind of value at its longest but strings (whose room is their length).
        let because = [
            (atom("a".into()), Shown::Int(i64::MIN)),
            (atom("b".into()), Shown::Num(-2.2250738585072014e-308)),
            (atom("c".into()), Shown::Time(i64::MIN)),
            (atom("d".into()), Shown::Time(i64::MAX)),
            (atom("e".into()), Shown::Bool(false)),
            (atom("f".into()), Shown::Null),
            (atom("g".into()), Shown::Str("a string".into())),
        ];
        // With no `because` (the fixed text), then with each value alone.
        let cases = std::iter::once(&because[..0]).chain(because.chunks(1));
        for (because, at) in
            cases.flat_map(|b| [i64::MIN, i64::MAX, 1_795_341_600_123].map(|at| (b, at)))
        {
            for timer in [false, true] {
                let lifecycle = &rules.segmentations[0];
                let change = Change {
                    segmentation: Some(0),
                    segment: lifecycle.segment_name(0),
                    kind: ChangeKind::Exited,
                    previous: None,
                    next: Some(lifecycle.segment_name(1)),
                    index: ChangeIndex {
                        segment: 0,
                        previous: None,
                        next: Some(1),
                    },
                    at,
                    seq: u64::MAX,
                    because: because.iter().map(|(k, v)| (k, v.clone())).collect(),
                    by_timer: timer,
                };
                let cause = if timer {
                    Cause::Timer
                } else {
                    Cause::Event {
                        event_id: None,
                        topic: "t",
                        partition: i32::MIN,
                        offset: i64::MIN,
                    }
                };
                let json = change_json(&rules, "c", cause, &change);
                let room = capacity(&rules, "c", cause, &change);
                assert!(json.len() <= room, "{} > {room}", json.len());
                assert_eq!(json.capacity(), room, "the buffer grew");
            }
        }
    }

    #[test]
    fn golden_change_message() {
        let rules = Arc::new(
            RuleSet::from_toml(
                "t.toml",
                "[[segment]]\nname = \"big\"\nwhen = \"purchases.spend > 100\"\n",
            )
            .unwrap(),
        );
        let e = Engine::new(rules.clone());
        let mut c = e.new_customer();
        let ev = decode(br#"{"event_id":"e-1","customer_id":"c-42","type":"purchase","timestamp":"2026-11-22T10:00:00Z","amount":129.95}"#).unwrap();
        let mut out = Vec::new();
        e.apply(&mut c, &ev, &mut out).unwrap();
        let cause = Cause::Event {
            event_id: Some("e-1"),
            topic: "purchases",
            partition: 3,
            offset: 1234,
        };
        let json = String::from_utf8(change_json(&rules, "c-42", cause, &out[0])).unwrap();
        let want = format!(
            r#"{{"customer_id":"c-42","segmentation":null,"segment":"big","change":"entered","previous":null,"next":null,"at":"2026-11-22T10:00:00Z","rules_version":"{}","cause":{{"kind":"event","event_id":"e-1","topic":"purchases","partition":3,"offset":1234}},"because":{{"purchases.spend":129.95}},"seq":1}}"#,
            rules.version
        );
        assert_eq!(json, want);
    }
}
