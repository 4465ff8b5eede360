//! Input events: the typed, borrowed form of one Kafka message, and its decoder.
//!
//! This module owns the input contract (see README "Event format"): which JSON shapes are
//! accepted, which fields are required, and the reason text given when a message is refused.
//! Decoding borrows strings from the message bytes wherever JSON escaping allows it, so the hot
//! path allocates nothing for ids, categories or actions. It does no I/O.
//!
//! Two shapes are accepted:
//! - microseg's own (`type` = `purchase` | `engagement` | `profile`), as in DESIGN.md;
//! - Segment-spec `track` / `identify` events (as written by Segment or RudderStack):
//!   `track` with event `Order Completed` (or `Product Purchased`) is a purchase, any other
//!   `track` is an engagement whose action is the event name in snake_case, and `identify`
//!   is a profile update with `traits` as the attributes.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::time::parse_rfc3339;

/// Which kind of event this is; also the bit used for rule dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Purchase,
    Engagement,
    Profile,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Purchase => "purchase",
            EventKind::Engagement => "engagement",
            EventKind::Profile => "profile",
        }
    }
}

/// A scalar JSON value, borrowed where possible (profile attributes).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    Str(Cow<'a, str>),
    Num(f64),
    Bool(bool),
    Null,
    /// An object or array: not a valid attribute value.
    Nested,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Purchase<'a> {
    pub amount: f64,
    pub currency: Option<Cow<'a, str>>,
    pub category: Option<Cow<'a, str>>,
    pub channel: Option<Cow<'a, str>>,
    pub plan: Option<Cow<'a, str>>,
    pub quantity: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body<'a> {
    Purchase(Purchase<'a>),
    Engagement {
        action: Cow<'a, str>,
    },
    Profile {
        attributes: Vec<(Cow<'a, str>, Scalar<'a>)>,
    },
}

/// One decoded event. Lifetimes borrow from the message payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub event_id: Option<Cow<'a, str>>,
    pub customer_id: Cow<'a, str>,
    /// Event time, epoch milliseconds.
    pub ts: i64,
    pub body: Body<'a>,
}

impl Event<'_> {
    pub fn kind(&self) -> EventKind {
        match self.body {
            Body::Purchase(_) => EventKind::Purchase,
            Body::Engagement { .. } => EventKind::Engagement,
            Body::Profile { .. } => EventKind::Profile,
        }
    }
}

/// Why a message was refused. The text goes to the dead-letter topic as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// A string or integer id (customer ids are often numeric in exports).
struct Id<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Id<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Id<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or integer id")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Id(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Id(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Id(Cow::Owned(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Id(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Id(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                // Spreadsheet exports write integer ids as 17850.0: use the integer text.
                if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
                    Ok(Id(Cow::Owned((v as i64).to_string())))
                } else {
                    Err(E::custom(format!("id {v} is not an integer")))
                }
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A timestamp: RFC 3339 string or epoch milliseconds.
struct Ts(Result<i64, String>);

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 string or epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Ts(
                    parse_rfc3339(v).ok_or_else(|| format!("timestamp {v:?} is not RFC 3339"))
                ))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Ts(
                    i64::try_from(v).map_err(|_| format!("timestamp {v} out of range"))
                ))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Ts(Ok(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if v.is_finite() && v.abs() < 9.0e15 {
                    Ok(Ts(Ok(v as i64)))
                } else {
                    Ok(Ts(Err(format!("timestamp {v} out of range"))))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Num(v as f64))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Num(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Num(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Nested)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An object of attributes, kept in document order.
struct Attrs<'a>(Vec<(Cow<'a, str>, Scalar<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Attrs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Attrs<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of attributes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<Cow<'de, str>, Scalar<'de>>()? {
                    out.push((k, v));
                }
                Ok(Attrs(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Segment-spec `properties` of a purchase-like `track` event.
#[derive(Deserialize, Default)]
struct SegmentProps<'a> {
    revenue: Option<f64>,
    total: Option<f64>,
    amount: Option<f64>,
    #[serde(borrow)]
    currency: Option<Cow<'a, str>>,
    #[serde(borrow)]
    category: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    plan: Option<Cow<'a, str>>,
    quantity: Option<f64>,
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_id: Option<Id<'a>>,
    #[serde(borrow)]
    customer_id: Option<Id<'a>>,
    timestamp: Option<Ts>,
    amount: Option<f64>,
    #[serde(borrow)]
    currency: Option<Cow<'a, str>>,
    #[serde(borrow)]
    category: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow)]
    plan: Option<Cow<'a, str>>,
    quantity: Option<f64>,
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    attributes: Option<Attrs<'a>>,
    // Segment spec
    #[serde(rename = "userId", borrow)]
    user_id: Option<Id<'a>>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<Id<'a>>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    properties: Option<SegmentProps<'a>>,
    #[serde(borrow)]
    traits: Option<Attrs<'a>>,
}

/// Segment event names that are purchases.
const SEGMENT_PURCHASE_EVENTS: [&str; 3] =
    ["Order Completed", "Product Purchased", "Checkout Completed"];

fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

fn finite(name: &str, v: f64) -> Result<f64, DecodeError> {
    if v.is_finite() {
        Ok(v)
    } else {
        err(format!("{name} must be a finite number"))
    }
}

/// Decodes one message payload. Never panics; every refusal says why.
pub fn decode(payload: &[u8]) -> Result<Event<'_>, DecodeError> {
    let raw: Raw<'_> = serde_json::from_slice(payload)
        .map_err(|e| DecodeError(format!("invalid JSON event: {e}")))?;
    let Some(kind) = raw.kind else {
        return err("missing field `type`");
    };
    let segment = matches!(&*kind, "track" | "identify");
    let customer_id = match (raw.customer_id, raw.user_id) {
        (Some(Id(c)), _) if !segment => c,
        (_, Some(Id(c))) if segment => c,
        _ => {
            return err(if segment {
                "missing field `userId`"
            } else {
                "missing field `customer_id`"
            })
        }
    };
    if customer_id.is_empty() {
        return err("empty customer id");
    }
    let ts = match raw.timestamp {
        Some(Ts(Ok(ts))) => ts,
        Some(Ts(Err(e))) => return err(e),
        None => return err("missing field `timestamp`"),
    };
    let event_id = if segment {
        raw.message_id.or(raw.event_id)
    } else {
        raw.event_id
    }
    .map(|Id(s)| s);
    let body = match &*kind {
        "purchase" => {
            let Some(amount) = raw.amount else {
                return err("purchase without `amount`");
            };
            Body::Purchase(Purchase {
                amount: finite("amount", amount)?,
                currency: raw.currency,
                category: raw.category,
                channel: raw.channel,
                plan: raw.plan,
                quantity: raw.quantity.map(|q| finite("quantity", q)).transpose()?,
            })
        }
        "engagement" => match raw.action {
            Some(action) if !action.is_empty() => Body::Engagement { action },
            _ => return err("engagement without `action`"),
        },
        "profile" => match raw.attributes {
            Some(Attrs(attributes)) => Body::Profile { attributes },
            None => return err("profile without `attributes`"),
        },
        "track" => {
            let Some(name) = raw.event else {
                return err("track without `event`");
            };
            if SEGMENT_PURCHASE_EVENTS.contains(&&*name) {
                let p = raw.properties.unwrap_or_default();
                let Some(amount) = p.revenue.or(p.total).or(p.amount) else {
                    return err(format!("track {name:?} without properties.revenue, .total or .amount"));
                };
                Body::Purchase(Purchase {
                    amount: finite("revenue", amount)?,
                    currency: p.currency,
                    category: p.category,
                    channel: p.channel,
                    plan: p.plan,
                    quantity: p.quantity.map(|q| finite("quantity", q)).transpose()?,
                })
            } else {
                let action = snake_case(&name);
                if action.is_empty() {
                    return err("track with an empty `event` name");
                }
                Body::Engagement { action: Cow::Owned(action) }
            }
        }
        "identify" => Body::Profile { attributes: raw.traits.map(|t| t.0).unwrap_or_default() },
        other => return err(format!("unknown event type {other:?} (expected purchase, engagement, profile, track or identify)")),
    };
    Ok(Event {
        event_id,
        customer_id,
        ts,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_design_examples() {
        let p = decode(br#"{"event_id":"e-1","customer_id":"c-42","type":"purchase","timestamp":"2026-11-22T10:00:00Z","amount":129.95,"currency":"EUR","category":"skincare","channel":"online","plan":"annual","quantity":3}"#).unwrap();
        assert_eq!(p.customer_id, "c-42");
        assert_eq!(p.ts, 1_795_341_600_000);
        assert!(
            matches!(p.customer_id, Cow::Borrowed(_)),
            "ids borrow from the payload"
        );
        let Body::Purchase(pu) = &p.body else {
            panic!("not a purchase")
        };
        assert_eq!(pu.amount, 129.95);
        assert_eq!(pu.category.as_deref(), Some("skincare"));
        assert_eq!(pu.quantity, Some(3.0));

        let e = decode(br#"{"event_id":"e-2","customer_id":"c-42","type":"engagement","action":"email_open","timestamp":1763805600000}"#).unwrap();
        assert_eq!(e.ts, 1_763_805_600_000); // the epoch-ms example in DESIGN.md is 2025-11-22
        assert_eq!(
            e.body,
            Body::Engagement {
                action: Cow::Borrowed("email_open")
            }
        );

        let pr = decode(br#"{"event_id":"e-3","customer_id":"c-42","type":"profile","timestamp":"2026-11-22T09:00:00Z","attributes":{"industry":"finance","company_size":850,"country":"DE","job_role":"cto"}}"#).unwrap();
        let Body::Profile { attributes } = pr.body else {
            panic!("not a profile")
        };
        assert_eq!(attributes.len(), 4);
        assert_eq!(
            attributes[1],
            (Cow::Borrowed("company_size"), Scalar::Num(850.0))
        );
    }

    #[test]
    fn unknown_fields_ignored_and_numeric_ids_accepted() {
        let e = decode(br#"{"customer_id":17850,"type":"purchase","timestamp":0,"amount":5,"extra":{"x":[1,2]}}"#).unwrap();
        assert_eq!(e.customer_id, "17850");
        let f = decode(br#"{"customer_id":17850.0,"type":"purchase","timestamp":"2010-12-01T08:26:00","amount":5}"#).unwrap();
        assert_eq!(f.customer_id, "17850");
        assert_eq!(
            f.ts,
            crate::time::parse_rfc3339("2010-12-01T08:26:00Z").unwrap(),
            "no offset: UTC"
        );
        assert!(
            decode(br#"{"customer_id":1.5,"type":"purchase","timestamp":0,"amount":5}"#).is_err()
        );
        assert_eq!(e.event_id, None);
    }

    #[test]
    fn refusals_say_why() {
        let cases: [(&[u8], &str); 10] = [
            (b"not json", "invalid JSON"),
            (
                br#"{"type":"purchase","timestamp":0,"amount":1}"#,
                "missing field `customer_id`",
            ),
            (
                br#"{"customer_id":"c","timestamp":0}"#,
                "missing field `type`",
            ),
            (
                br#"{"customer_id":"c","type":"refund","timestamp":0}"#,
                "unknown event type \"refund\"",
            ),
            (
                br#"{"customer_id":"c","type":"purchase","timestamp":0,"amount":"lots"}"#,
                "invalid type: string \"lots\"",
            ),
            (
                br#"{"customer_id":"c","type":"purchase","timestamp":0}"#,
                "without `amount`",
            ),
            (
                br#"{"customer_id":"c","type":"purchase","timestamp":"last tuesday","amount":1}"#,
                "not RFC 3339",
            ),
            (
                br#"{"customer_id":"c","type":"purchase","amount":1}"#,
                "missing field `timestamp`",
            ),
            (
                br#"{"customer_id":"c","type":"engagement","timestamp":0}"#,
                "without `action`",
            ),
            (
                br#"{"customer_id":"","type":"engagement","timestamp":0,"action":"x"}"#,
                "empty customer id",
            ),
        ];
        for (input, want) in cases {
            let got = decode(input).expect_err(std::str::from_utf8(input).unwrap());
            assert!(
                got.0.contains(want),
                "{:?}: got {:?}, want {:?}",
                std::str::from_utf8(input),
                got.0,
                want
            );
        }
    }

    #[test]
    fn segment_spec_events() {
        let t = decode(br#"{"type":"track","event":"Order Completed","userId":"u1","messageId":"m1","timestamp":"2026-01-01T00:00:00Z","properties":{"revenue":42.5,"category":"books"}}"#).unwrap();
        assert_eq!(t.customer_id, "u1");
        assert_eq!(t.event_id.as_deref(), Some("m1"));
        assert!(matches!(
            t.body,
            Body::Purchase(Purchase { amount: 42.5, .. })
        ));
        let v = decode(br#"{"type":"track","event":"Product Viewed","userId":"u1","timestamp":0}"#)
            .unwrap();
        assert_eq!(
            v.body,
            Body::Engagement {
                action: Cow::Owned("product_viewed".into())
            }
        );
        let i = decode(
            br#"{"type":"identify","userId":"u1","timestamp":0,"traits":{"industry":"retail"}}"#,
        )
        .unwrap();
        assert_eq!(i.kind(), EventKind::Profile);
    }
}
