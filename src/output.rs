//! The output contract: segment-change messages (JSON) and dead-letter records.
//!
//! This module owns the exact JSON written to the segment-change topic (field names, order,
//! null handling; see README "Output format") and the dead-letter headers. Pure: it builds
//! bytes, it does not send them.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::engine::{Change, ChangeKind};
use crate::rules::RuleSet;
use crate::time::format_rfc3339;

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

struct Because<'a>(&'a [(&'a str, serde_json::Value)]);

impl Serialize for Because<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

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
    because: Because<'a>,
    seq: u64,
}

/// Serializes one change as the JSON message published on the output topic.
pub fn change_json(
    rules: &RuleSet,
    customer_id: &str,
    cause: Cause<'_>,
    change: &Change<'_>,
) -> Vec<u8> {
    let msg = ChangeMessage {
        customer_id,
        segmentation: change
            .segmentation
            .map(|i| rules.segmentations[i].name.as_str()),
        segment: change.segment,
        change: change.kind,
        previous: change.previous,
        next: change.next,
        at: format_rfc3339(change.at),
        rules_version: &rules.version,
        cause,
        because: Because(&change.because),
        seq: change.seq,
    };
    // Serializing these plain types into a Vec cannot fail.
    serde_json::to_vec(&msg).unwrap_or_default()
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
    use crate::engine::Engine;
    use crate::event::decode;
    use std::sync::Arc;

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
        let mut c = e.new_customer(3);
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
