//! Integration tests through a real Kafka-protocol broker (Nisshi, started per test).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{change_key, comparable, config, day, expected_changes, start, wait_for, Broker};
use microseg::generate::Generator;
use microseg::metrics::EventResult;
use microseg::output::dlq_headers;
use microseg::rules::RuleSet;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};

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

/// The subset of a change message a test pins down exactly.
fn essentials(v: &Value) -> Value {
    json!({
        "segmentation": v["segmentation"], "segment": v["segment"], "change": v["change"],
        "previous": v["previous"], "next": v["next"], "seq": v["seq"], "event_id": v["cause"]["event_id"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_changes_out_and_bad_input_dead_lettered() {
    let broker = Broker::start();
    broker
        .create_topics(&["purchases", "engagement", "profiles"], 3)
        .await;
    let rules = Arc::new(RuleSet::from_toml("test.toml", RULES).unwrap());
    let run = start(
        config(
            &broker,
            "g-golden",
            &["purchases", "engagement", "profiles"],
        ),
        rules.clone(),
    );
    let p = run.pipeline.clone();
    wait_for("partition assignment", Duration::from_secs(30), || {
        p.assigned().len() == 9
    })
    .await;

    let prod = broker.producer();
    // Events of one customer on different topics are not ordered by Kafka; the test waits
    // for each step's effect before sending the next one that depends on it.
    let steps: Vec<(&str, &str, String, usize)> = vec![
        (
            "profiles",
            "c-1",
            format!(
                r#"{{"event_id":"p1","customer_id":"c-1","type":"profile","timestamp":{},"attributes":{{"industry":"finance","company_size":900}}}}"#,
                day(0)
            ),
            2,
        ),
        (
            "purchases",
            "c-1",
            format!(
                r#"{{"event_id":"b1","customer_id":"c-1","type":"purchase","timestamp":{},"amount":100}}"#,
                day(1)
            ),
            4,
        ),
        (
            "purchases",
            "c-1",
            format!(
                r#"{{"event_id":"b2","customer_id":"c-1","type":"purchase","timestamp":{},"amount":50}}"#,
                day(2)
            ),
            4,
        ),
        (
            "purchases",
            "c-1",
            format!(
                r#"{{"event_id":"b3","customer_id":"c-1","type":"purchase","timestamp":{},"amount":25,"channel":"online"}}"#,
                day(3)
            ),
            5,
        ),
        (
            "engagement",
            "c-1",
            format!(
                r#"{{"event_id":"g1","customer_id":"c-1","type":"engagement","action":"login","timestamp":{}}}"#,
                day(70)
            ),
            10,
        ),
        (
            "purchases",
            "c-2",
            format!(
                r#"{{"event_id":"x1","customer_id":"c-2","type":"purchase","timestamp":{},"amount":10}}"#,
                day(0)
            ),
            11,
        ),
        (
            "purchases",
            "c-2",
            r#"{"event_id":"x2","customer_id":"c-2","type":"purchase","amount":10"#.to_string(),
            11,
        ),
        (
            "profiles",
            "c-3",
            format!(
                r#"{{"event_id":"y1","customer_id":"c-3","type":"profile","timestamp":{},"attributes":{{"company_size":"big"}}}}"#,
                day(0)
            ),
            11,
        ),
    ];
    let m = run.metrics.clone();
    for (i, (topic, key, payload, changes_after)) in steps.iter().enumerate() {
        broker.produce(&prod, topic, key, payload.as_bytes()).await;
        let processed = i as u64 + 1;
        let want = *changes_after as u64;
        wait_for("the step to be processed", Duration::from_secs(30), || {
            m.events_total(EventResult::Ok) + m.events_total(EventResult::DeadLettered) == processed
                && m.changes_total("entered") + m.changes_total("exited") == want
        })
        .await;
    }

    let out = broker
        .read(
            "segment-changes",
            11,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(
        out.len(),
        11,
        "{:#?}",
        out.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    let mut by_customer: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in &out {
        let v = r.json();
        assert_eq!(
            r.key.as_deref(),
            v["customer_id"].as_str(),
            "keyed by customer id"
        );
        assert_eq!(v["rules_version"], json!(rules.version));
        by_customer
            .entry(v["customer_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v);
    }
    let c1: Vec<Value> = by_customer["c-1"].iter().map(essentials).collect();
    let n = Value::Null;
    let e = |seg: Value,
             segment: &str,
             change: &str,
             previous: Value,
             next: Value,
             seq: u64,
             ev: &str| {
        json!({"segmentation": seg, "segment": segment, "change": change, "previous": previous, "next": next, "seq": seq, "event_id": if ev.is_empty() { Value::Null } else { json!(ev) }})
    };
    let lc = json!("lifecycle");
    assert_eq!(
        c1,
        vec![
            e(
                lc.clone(),
                "prospect",
                "entered",
                n.clone(),
                n.clone(),
                1,
                "p1"
            ),
            e(
                n.clone(),
                "enterprise_finance",
                "entered",
                n.clone(),
                n.clone(),
                2,
                "p1"
            ),
            e(
                lc.clone(),
                "prospect",
                "exited",
                n.clone(),
                json!("active"),
                3,
                "b1"
            ),
            e(
                lc.clone(),
                "active",
                "entered",
                json!("prospect"),
                n.clone(),
                4,
                "b1"
            ),
            e(
                n.clone(),
                "frequent",
                "entered",
                n.clone(),
                n.clone(),
                5,
                "b3"
            ),
            // The engagement 70 days later first fires c-1's timers, each at its instant:
            // they carry no event id.
            e(n.clone(), "frequent", "exited", n.clone(), n.clone(), 6, ""),
            e(
                lc.clone(),
                "active",
                "exited",
                n.clone(),
                json!("prospect"),
                7,
                ""
            ),
            e(
                lc.clone(),
                "prospect",
                "entered",
                json!("active"),
                n.clone(),
                8,
                ""
            ),
            e(
                lc.clone(),
                "prospect",
                "exited",
                n.clone(),
                json!("lapsed"),
                9,
                ""
            ),
            e(
                lc.clone(),
                "lapsed",
                "entered",
                json!("prospect"),
                n.clone(),
                10,
                ""
            ),
        ]
    );
    let c1 = &by_customer["c-1"];
    // Purchases on days 1-3: `frequent` (3 in 30 days) ends when day 1 leaves the window,
    // `active` when day 3 does, and `lapsed` starts 60 days (and 1 ms) after day 3.
    for (i, at) in [
        (5, "2026-02-01T00:00:00Z"),
        (6, "2026-02-03T00:00:00Z"),
        (9, "2026-03-05T00:00:00.001Z"),
    ] {
        assert_eq!(c1[i]["at"], json!(at), "{}", c1[i]);
        assert_eq!(c1[i]["cause"], json!({"kind": "timer"}));
    }
    assert_eq!(
        c1[9]["because"],
        json!({"purchases.count": 3, "days_since(purchases.last)": 60.0})
    );
    assert_eq!(
        by_customer["c-2"]
            .iter()
            .map(essentials)
            .collect::<Vec<_>>(),
        vec![e(lc, "active", "entered", n.clone(), n, 1, "x1")]
    );
    assert!(
        !by_customer.contains_key("c-3"),
        "a refused event changes nothing"
    );

    let dead = broker
        .read(
            "microseg-dead-letters",
            2,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(dead.len(), 2);
    let bad_json = dead
        .iter()
        .find(|r| r.key.as_deref() == Some("c-2"))
        .expect("malformed JSON dead-lettered");
    assert_eq!(
        bad_json.payload,
        steps[6].2.as_bytes(),
        "original bytes kept"
    );
    assert!(
        bad_json
            .header(dlq_headers::REASON)
            .unwrap()
            .contains("invalid JSON"),
        "{:?}",
        bad_json.headers
    );
    assert_eq!(bad_json.header(dlq_headers::TOPIC), Some("purchases"));
    assert!(bad_json
        .header(dlq_headers::OFFSET)
        .unwrap()
        .parse::<i64>()
        .is_ok());
    assert!(bad_json
        .header(dlq_headers::PARTITION)
        .unwrap()
        .parse::<i32>()
        .is_ok());
    let bad_type = dead
        .iter()
        .find(|r| r.key.as_deref() == Some("c-3"))
        .expect("wrongly typed attribute dead-lettered");
    assert!(bad_type
        .header(dlq_headers::REASON)
        .unwrap()
        .contains("`company_size` must be a number"));
    assert_eq!(run.metrics.events_total(EventResult::DeadLettered), 2);

    let summary = run.stop().await;
    assert_eq!(
        (summary.events_ok, summary.dead_lettered, summary.changes),
        (6, 2, 11)
    );

    // Everything processed was committed: the group's offsets equal the end of each partition.
    let check: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "g-golden")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in ["purchases", "engagement", "profiles"] {
        for p in 0..3 {
            tpl.add_partition(t, p);
        }
    }
    let committed = check
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    for el in committed.elements() {
        let (_, high) = check
            .fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(10))
            .unwrap();
        let got = match el.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        assert_eq!(
            got,
            high,
            "committed offset of {}/{}",
            el.topic(),
            el.partition()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_and_emit_exactly_the_expected_changes() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 6).await;
    let rules = Arc::new(RuleSet::embedded_default());
    let cfg_pair = config(&broker, "g-pair", &["events"]);
    let a = start(cfg_pair.clone(), rules.clone());
    let (pa, ma) = (a.pipeline.clone(), a.metrics.clone());
    wait_for("first instance assigned", Duration::from_secs(30), || {
        pa.assigned().len() == 6
    })
    .await;
    let b = start(config(&broker, "g-pair", &["events"]), rules.clone());
    let (pb, mb) = (b.pipeline.clone(), b.metrics.clone());
    wait_for(
        "partitions split between the instances",
        Duration::from_secs(60),
        || {
            let (x, y) = (pa.assigned(), pb.assigned());
            !x.is_empty()
                && !y.is_empty()
                && x.len() + y.len() == 6
                && x.iter().all(|p| !y.contains(p))
        },
    )
    .await;

    // Generated customers, all event types on one topic: per-customer order is the partition
    // order, so the expected stream is exact.
    let mut g = Generator::new(11, 150, day(0), 20 * 60_000);
    g.malformed_every = 401;
    let events: Vec<_> = (0..3000).map(|_| g.next_event()).collect();
    let prod = broker.producer();
    let sends: Vec<_> = events
        .iter()
        .map(|ev| {
            prod.send_result(
                rdkafka::producer::FutureRecord::to("events")
                    .key(ev.customer_id.as_str())
                    .payload(ev.json.as_str()),
            )
            .unwrap_or_else(|(e, _)| panic!("{e}"))
        })
        .collect();
    let mut placed = Vec::new();
    for (s, ev) in sends.into_iter().zip(&events) {
        let d = s.await.unwrap().unwrap_or_else(|(e, _)| panic!("{e}"));
        placed.push((ev.clone(), d.partition));
    }

    // Expected: the Kafka-free processor over each partition's events in partition order.
    let (mut expected, bad) = expected_changes(&rules, &cfg_pair, &placed);
    assert!(
        bad > 0 && expected.len() > 500,
        "the scenario exercises dead letters and many changes"
    );

    let got = broker
        .read(
            "segment-changes",
            expected.len(),
            Duration::from_secs(90),
            Duration::from_secs(2),
        )
        .await;
    let mut got: Vec<Value> = got.iter().map(|r| comparable(r.json())).collect();
    got.sort_by_key(change_key);
    expected.sort_by_key(change_key);
    assert_eq!(got.len(), expected.len());
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e);
    }
    let (ea, eb) = (
        ma.events_total(EventResult::Ok),
        mb.events_total(EventResult::Ok),
    );
    assert!(
        ea > 0 && eb > 0,
        "both instances processed events: {ea} and {eb}"
    );
    assert_eq!(
        ea + eb
            + ma.events_total(EventResult::DeadLettered)
            + mb.events_total(EventResult::DeadLettered),
        events.len() as u64
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_passing_moves_customers_with_no_further_event_of_theirs() {
    let broker = Broker::start();
    // One partition: every customer shares the watermark.
    broker.create_topics(&["events"], 1).await;
    let rules = Arc::new(RuleSet::from_toml("test.toml", RULES).unwrap());
    let mut cfg = config(&broker, "g-timer", &["events"]);
    cfg.time.allowed_lateness_ms = 0;
    cfg.time.idle_timeout_ms = 1_000;
    cfg.time.late_to_dead_letter = true;
    let run = start(cfg, rules.clone());
    let p = run.pipeline.clone();
    wait_for("assignment", Duration::from_secs(30), || {
        p.assigned().len() == 1
    })
    .await;
    let prod = broker.producer();
    let purchase = |id: &str, c: &str, ts: i64| {
        format!(
            r#"{{"event_id":"{id}","customer_id":"{c}","type":"purchase","timestamp":{ts},"amount":10}}"#
        )
    };
    // 1. Event time: alice buys on day 0 and never again; bob's purchase on day 40 moves the
    //    watermark past day 30, when alice's purchase leaves the 30-day window.
    for (id, c, ts) in [("a1", "alice", day(0)), ("b1", "bob", day(40))] {
        broker
            .produce(&prod, "events", c, purchase(id, c, ts).as_bytes())
            .await;
    }
    // 2. Idle: carol's purchase leaves the window at day 100 00:00; dave's, the newest event,
    //    is 2 s before that. Nothing else arrives: after the 1 s idle timeout event time
    //    follows the wall clock and passes day 100 about 2 s later.
    for (id, c, ts) in [("c1", "carol", day(70)), ("d1", "dave", day(100) - 2_000)] {
        broker
            .produce(&prod, "events", c, purchase(id, c, ts).as_bytes())
            .await;
    }

    // Every purchase enters `active` (4). By timer: bob's day-40 event ends alice's window
    // (2); carol's day-70 event lapses alice (2) and ends bob's window (2); then, with no
    // event at all, idle time ends carol's window at day 100 (2) and lapses bob 1 ms later (2).
    let out = broker
        .read(
            "segment-changes",
            14,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
    let msgs: Vec<Value> = out.iter().map(|r| r.json()).collect();
    let mut timer: Vec<(&str, &str, &str, &str)> = msgs
        .iter()
        .filter(|v| v["cause"]["kind"] == "timer")
        .map(|v| {
            (
                v["customer_id"].as_str().unwrap(),
                v["segment"].as_str().unwrap(),
                v["change"].as_str().unwrap(),
                v["at"].as_str().unwrap(),
            )
        })
        .collect();
    // Customers' changes land in different output partitions, read in no particular order
    // relative to each other; one customer's stay in order.
    timer.sort_by_key(|(customer, ..)| *customer);
    let (d30, d60, d70, d100, d100_1) = (
        "2026-01-31T00:00:00Z",
        "2026-03-02T00:00:00.001Z",
        "2026-03-12T00:00:00Z",
        "2026-04-11T00:00:00Z",
        "2026-04-11T00:00:00.001Z",
    );
    let mut want = vec![
        ("alice", "active", "exited", d30),
        ("alice", "prospect", "entered", d30),
        ("alice", "prospect", "exited", d60),
        ("alice", "lapsed", "entered", d60),
        ("bob", "active", "exited", d70),
        ("bob", "prospect", "entered", d70),
        ("carol", "active", "exited", d100),
        ("carol", "prospect", "entered", d100),
        ("bob", "prospect", "exited", d100_1),
        ("bob", "lapsed", "entered", d100_1),
    ];
    want.sort_by_key(|(customer, ..)| *customer);
    assert_eq!(timer, want, "{msgs:#?}");
    assert_eq!(msgs.len(), 14, "{msgs:#?}");
    assert!(run.metrics.timers_fired.get() >= 5);

    // A redelivered event (same id) is counted as a duplicate and changes nothing; a purchase
    // from long before the watermark is late: counted, reported on the dead-letter topic, and
    // applied to lifetime aggregates only.
    for (id, c, ts) in [("b1", "bob", day(40)), ("a2", "alice", day(1))] {
        broker
            .produce(&prod, "events", c, purchase(id, c, ts).as_bytes())
            .await;
    }
    let m = run.metrics.clone();
    wait_for(
        "duplicate and late counted",
        Duration::from_secs(30),
        || m.events_total(EventResult::Duplicate) == 1 && m.events_total(EventResult::Late) == 1,
    )
    .await;
    let dead = broker
        .read(
            "microseg-dead-letters",
            1,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key.as_deref(), Some("alice"));
    let reason = dead[0].header(dlq_headers::REASON).unwrap();
    assert!(reason.starts_with("late event"), "{reason}");
    let alice = p.customer("alice").unwrap();
    assert_eq!(
        alice.state.purchase_count, 2,
        "late purchase counted in lifetime"
    );
    assert_eq!(
        alice.state.activity.purchases().len(),
        1,
        "and not in any window"
    );
    let summary = run.stop().await;
    assert_eq!(summary.changes, 14, "neither changed a segment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_time_publishes_a_due_change_within_a_second() {
    let broker = Broker::start();
    broker.create_topics(&["events"], 1).await;
    let rules = Arc::new(RuleSet::from_toml("test.toml", RULES).unwrap());
    let mut cfg = config(&broker, "g-ptime", &["events"]);
    cfg.time.clock = microseg::config::ClockMode::Processing;
    let run = start(cfg, rules.clone());
    let p = run.pipeline.clone();
    wait_for("assignment", Duration::from_secs(30), || {
        p.assigned().len() == 1
    })
    .await;
    // A purchase 60 days minus 3 s ago: `lapsed` (days_since > 60) is due 3 s from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ts = now - 60 * 86_400_000 + 3_000;
    let due = ts + 60 * 86_400_000 + 1;
    let prod = broker.producer();
    broker
        .produce(
            &prod,
            "events",
            "erin",
            format!(r#"{{"event_id":"e1","customer_id":"erin","type":"purchase","timestamp":{ts},"amount":10}}"#)
                .as_bytes(),
        )
        .await;
    let out = broker
        .read(
            "segment-changes",
            3,
            Duration::from_secs(30),
            Duration::from_millis(500),
        )
        .await;
    let msgs: Vec<Value> = out.iter().map(|r| r.json()).collect();
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    assert_eq!(
        (msgs[1]["segment"].as_str(), msgs[1]["change"].as_str()),
        (Some("prospect"), Some("exited")),
        "{msgs:#?}"
    );
    assert_eq!(msgs[1]["cause"]["kind"], "timer");
    assert_eq!(msgs[1]["at"], json!(microseg::time::format_rfc3339(due)));
    let published = out[1].timestamp.expect("record timestamp");
    assert!(
        (due..due + 1_000).contains(&published),
        "due at {due}, published at {published} ({} ms late)",
        published - due
    );
    run.stop().await;
}
